"""The claims report: a summary table per batch size and a verdict on each claim of the original.

Reads saved results only (`batchjax.results.load_sweep`) and writes, into the sweep directory,
`report.md`, `summary.csv` and `summary.tex`. Definitions used throughout:

* Uncertainty: every "mean ± s.d." is over seeds (sample standard deviation, ddof 1); a
  difference between two batch sizes is called significant when it exceeds twice its standard
  error, SE = sqrt(sd_1^2 / n_1 + sd_2^2 / n_2). With one seed there is no seed-to-seed spread, and
  a claim that needs it is "inconclusive at this number of seeds".
* Generalisation gap, at the final parameters (both splits evaluated after training, not Keras'
  running epoch mean): loss gap = validation loss - training loss, accuracy gap = training accuracy
  - validation accuracy. Larger means worse generalisation in both.
* Roughness of a loss curve (`compute_roughness`): on the per-step training losses l_t of epochs
  2..E (all of them when E = 1), per epoch window, R = sd(l_{t+1} - l_t) / sqrt(2), skipping the
  partial last batch of each epoch; a run's R is the mean over its windows. The first difference
  is the trend removal: it cancels any slowly varying trend, and over one step the trend's change
  is small next to the noise; for independent noise of s.d. s around a smooth trend, R estimates
  s. R is in loss units per optimizer step: what a linear-scale plot of the per-step loss shows.
  Fairness: at equal epochs a small batch size has reached a much lower loss, and fluctuations
  shrink with the loss itself, so R alone understates small batches' choppiness. The relative
  roughness R_rel = R / (mean loss of the window), computed per window, is level-free: it is what
  a log-scale plot shows. Both are reported; the claim needs both to agree. If the choppiness
  were only the sampling noise of a minibatch mean of per-example losses, R would fall as
  B^(-1/2) at a fixed loss level; the fitted log-log slopes are compared with -1/2.
* Target validation accuracy (claim 4, unless given): the best accuracy that every non-diverged run
  reaches at some epoch end, rounded down to 0.5 percentage points. Time to target counts training
  and validation seconds, not compilation; seeds of a batch size train together (vmapped), so
  epoch times are those of the group.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from batchjax.results import Run, SweepResults, write_bytes_atomic

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
Z_SIGNIFICANT = 2.0
MODERATE_BATCH_SIZE = 32

# --------------------------------------------------------------------------------------------
# Per-run statistics


def steps_per_epoch(run: Run) -> int:
    """Optimizer steps in one epoch of `run` (the partial last batch counts as a step)."""
    n, b = int(run.dataset.get("num_train", 0)), run.batch_size
    if n:
        return -(-n // b)
    steps = run.history.get("steps")
    return int(steps[0]) if steps is not None and len(steps) else len(run.step_losses)


def compute_roughness(step_losses: np.ndarray, step_batch_sizes: np.ndarray, batch_size: int,
                      steps_per_epoch: int, *, relative: bool = False) -> np.ndarray:
    """Roughness of each epoch window of a per-step loss curve (see the module docstring).

    Args:
      step_losses: the loss of every optimizer step.
      step_batch_sizes: the batch size of every step; steps of another size (the partial last
        batch of an epoch) are left out, and so are the differences that cross them.
      batch_size: the run's batch size.
      steps_per_epoch: steps in one epoch.
      relative: divide each window's roughness by the window's mean (full-batch) loss.

    Returns:
      One value per epoch window, epochs 2..E (epoch 1 alone when E = 1): sd(l_{t+1} - l_t) /
      sqrt(2) over the window's consecutive full-batch steps. NaN where a window has fewer than
      three differences or a non-finite loss.
    """
    losses = np.asarray(step_losses, np.float64)
    full = np.asarray(step_batch_sizes) == batch_size
    num_epochs = int(math.ceil(len(losses) / steps_per_epoch)) if steps_per_epoch else 0
    epochs = range(1, num_epochs) if num_epochs > 1 else range(num_epochs)
    values = []
    for e in epochs:
        window = slice(e * steps_per_epoch, (e + 1) * steps_per_epoch)
        l_w, full_w = losses[window], full[window]
        valid = full_w[1:] & full_w[:-1]
        diffs = np.diff(l_w)[valid]
        if len(diffs) < 3 or not np.all(np.isfinite(l_w)):
            values.append(np.nan)
            continue
        r = float(np.std(diffs, ddof=1) / math.sqrt(2))
        values.append(r / float(np.mean(l_w[full_w])) if relative else r)
    return np.asarray(values)


def run_roughness(run: Run, *, relative: bool = False) -> float:
    """Mean roughness over a run's epoch windows; NaN for a diverged run."""
    if run.diverged:
        return float("nan")
    values = compute_roughness(run.step_losses, run.step_batch_sizes, run.batch_size,
                               steps_per_epoch(run), relative=relative)
    values = values[np.isfinite(values)]
    return float(np.mean(values)) if len(values) else float("nan")


def epoch_seconds(run: Run) -> np.ndarray:
    """Wall seconds of every finished epoch (training plus validation; no compilation)."""
    return run.history["train_seconds"] + run.history["eval_seconds"]


def run_stats(run: Run, target_accuracy: float | None = None) -> dict[str, float]:
    """The numbers the report tabulates for one run; NaN where a diverged run has none."""
    nan = float("nan")
    h = run.history
    ok = not run.diverged and len(h["epoch"]) > 0
    final_train = run.final_train or {}
    train_loss = final_train.get("loss", h["train_loss"][-1] if ok else nan)
    train_acc = final_train.get("accuracy", h["train_accuracy"][-1] if ok else nan)
    val_loss = float(h["val_loss"][-1]) if ok else nan
    val_acc = float(h["val_accuracy"][-1]) if ok else nan
    records = [r for r in run.noise if r.get("noise_scale") is not None]
    stats = {
        "train_loss": float(train_loss) if ok else nan,
        "val_loss": val_loss,
        "train_accuracy": float(train_acc) if ok else nan,
        "val_accuracy": val_acc,
        "gap_loss": val_loss - float(train_loss) if ok else nan,
        "gap_accuracy": float(train_acc) - val_acc if ok else nan,
        "b_simple_end": float(records[-1]["noise_scale"]) if records and ok else nan,
        "roughness": run_roughness(run),
        "roughness_relative": run_roughness(run, relative=True),
        "wall_seconds": float(np.sum(epoch_seconds(run))) if ok else nan,
        "epoch_seconds": float(np.mean(epoch_seconds(run))) if ok else nan,
        "compile_seconds": run.compile_seconds,
        "steps": float(h["steps"][-1]) if ok else nan,
        "val_loss_epoch1": float(h["val_loss"][0]) if ok else nan,
        "best_val_accuracy": float(np.max(h["val_accuracy"])) if ok else nan,
    }
    if target_accuracy is not None and ok:
        reached = np.nonzero(h["val_accuracy"] >= target_accuracy)[0]
        if len(reached):
            e = int(reached[0])
            stats["epochs_to_target"] = float(h["epoch"][e])
            stats["steps_to_target"] = float(h["steps"][e])
            stats["seconds_to_target"] = float(np.sum(epoch_seconds(run)[: e + 1]))
    for key in ("epochs_to_target", "steps_to_target", "seconds_to_target"):
        stats.setdefault(key, nan)
    return stats


# --------------------------------------------------------------------------------------------
# Per-batch-size summaries


@dataclasses.dataclass
class Estimate:
    """Mean, sample s.d. and count of a quantity over seeds (NaNs, i.e. diverged runs, left out)."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Estimate":
        v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
        if len(v) == 0:
            return cls(float("nan"), float("nan"), 0)
        return cls(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v))

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n > 1 else float("nan")

    def format(self, fmt: str = ".4f") -> str:
        if not np.isfinite(self.mean):
            return "n/a"
        if self.n > 1 and np.isfinite(self.sd):
            return f"{self.mean:{fmt}} ± {self.sd:{fmt}}"
        return f"{self.mean:{fmt}}"


def difference(a: Estimate, b: Estimate) -> tuple[float, float, float]:
    """a.mean - b.mean, its standard error, and their ratio z (NaN when the SE is unknown)."""
    diff = a.mean - b.mean
    se = math.sqrt(a.se ** 2 + b.se ** 2) if a.n > 1 and b.n > 1 else float("nan")
    return diff, se, _ratio(diff, se)


def _ratio(diff: float, se: float) -> float:
    """diff / se; +-inf for a difference with zero spread, NaN when the SE is unknown."""
    if not np.isfinite(se) or not np.isfinite(diff):
        return float("nan")
    if se > 0:
        return diff / se
    return math.copysign(float("inf"), diff) if diff != 0 else 0.0


COLUMNS = [  # key, header, format
    ("steps", "steps", ".0f"),
    ("train_loss", "train loss", ".4f"),
    ("val_loss", "val loss", ".4f"),
    ("train_accuracy", "train acc", ".4f"),
    ("val_accuracy", "val acc", ".4f"),
    ("gap_loss", "loss gap", ".4f"),
    ("gap_accuracy", "acc gap", ".4f"),
    ("b_simple_end", "B_simple end", ".1f"),
    ("roughness", "roughness", ".4f"),
    ("roughness_relative", "rel. roughness", ".3f"),
    ("wall_seconds", "time (s)", ".2f"),
    ("compile_seconds", "compile (s)", ".2f"),
]


def default_target_accuracy(results: SweepResults) -> float | None:
    """The best validation accuracy every non-diverged run reaches, floored to 0.005."""
    best = [np.max(r.history["val_accuracy"]) for r in results.runs
            if not r.diverged and len(r.history["val_accuracy"])]
    if not best:
        return None
    return math.floor(min(best) * 200 + 1e-9) / 200


def summarize(results: SweepResults, target_accuracy: float | None = None
              ) -> dict[int, dict[str, Any]]:
    """Per batch size: run counts and an `Estimate` of every `run_stats` quantity."""
    out = {}
    for b, runs in results.by_batch_size().items():
        stats = [run_stats(r, target_accuracy) for r in runs]
        row: dict[str, Any] = {"runs": len(runs), "diverged": sum(r.diverged for r in runs),
                               "seeds": [r.seed for r in runs]}
        for key in stats[0]:
            row[key] = Estimate.of([s[key] for s in stats])
        out[b] = row
    return out


def summary_csv(summary: dict[int, dict[str, Any]]) -> str:
    """The summary as CSV: one row per batch size, `<quantity>_mean` and `<quantity>_sd` columns."""
    keys = [k for k in next(iter(summary.values())) if isinstance(
        next(iter(summary.values()))[k], Estimate)] if summary else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["batch_size", "runs", "diverged"]
                    + [f"{k}_{s}" for k in keys for s in ("mean", "sd")])
    for b, row in summary.items():
        writer.writerow([b, row["runs"], row["diverged"]] + [
            "" if not np.isfinite(v) else f"{v:.6g}"
            for k in keys for v in (row[k].mean, row[k].sd)])
    return buf.getvalue()


def summary_latex(summary: dict[int, dict[str, Any]], caption: str) -> str:
    """The summary as a booktabs LaTeX table (mean $\\pm$ s.d. over seeds)."""
    def cell(e: Estimate, fmt: str) -> str:
        if not np.isfinite(e.mean):
            return "--"
        if e.n > 1 and np.isfinite(e.sd):
            return f"${e.mean:{fmt}} \\pm {e.sd:{fmt}}$"
        return f"${e.mean:{fmt}}$"

    headers = ["$B$", "runs"] + [h.replace("_", r"\_") for _, h, _ in COLUMNS]
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
             r"\begin{tabular}{" + "r" * len(headers) + "}", r"\toprule",
             " & ".join(headers) + r" \\", r"\midrule"]
    for b, row in summary.items():
        runs = f"{row['runs']}" + (f" ({row['diverged']} div.)" if row["diverged"] else "")
        lines.append(" & ".join([str(b), runs] + [cell(row[k], f) for k, _, f in COLUMNS])
                     + r" \\")
    caption = caption.replace("_", r"\_").replace("%", r"\%")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}",
              r"\label{tab:batch-size-summary}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict[int, dict[str, Any]]) -> str:
    headers = ["B", "runs"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for b, row in summary.items():
        runs = f"{row['runs']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        lines.append("| " + " | ".join([str(b), runs] + [row[k].format(f) for k, _, f in COLUMNS])
                     + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Claims


@dataclasses.dataclass
class Claim:
    """One claim of the original write-up, the test applied, the numbers, and the verdict."""

    number: int
    statement: str
    test: str
    evidence: list[str]
    verdict: str
    reason: str

    def markdown(self) -> str:
        lines = [f"### Claim {self.number}: {self.statement}", "",
                 f"**Verdict: {self.verdict}.** {self.reason}", "", f"*Test.* {self.test}", ""]
        lines += [f"- {e}" for e in self.evidence]
        return "\n".join(lines) + "\n"


def _fmt_z(z: float) -> str:
    if np.isnan(z):
        return "n/a"
    return f"{z:+.1f}" if np.isfinite(z) else ("+inf" if z > 0 else "-inf")


def _weighted_slope(x: np.ndarray, y: np.ndarray, sy: np.ndarray) -> tuple[float, float, int]:
    """Weighted least-squares slope of y on x, its standard error, and the residual dof.

    The SE is inflated by sqrt(chi^2 / dof) when the scatter exceeds the error bars.
    """
    w = 1.0 / sy ** 2
    xm = np.sum(w * x) / np.sum(w)
    ym = np.sum(w * y) / np.sum(w)
    sxx = np.sum(w * (x - xm) ** 2)
    slope = np.sum(w * (x - xm) * (y - ym)) / sxx
    se = math.sqrt(1.0 / sxx)
    dof = len(x) - 2
    if dof > 0:
        chi2 = np.sum(w * (y - ym - slope * (x - xm)) ** 2) / dof
        se *= math.sqrt(max(chi2, 1.0))
    return float(slope), float(se), dof


def noise_moments(results: SweepResults, max_moments: int = 4) -> list[float]:
    """Moments of training (in epochs) at which to compare noise measurements across runs.

    Initialisation, after the first epoch, halfway and at the end, where the records allow.
    """
    epochs = max(r.config.epochs for r in results.runs)
    targets = sorted({0.0, 1.0, float(round(epochs / 2)), float(epochs)})
    return [t for t in targets if t <= epochs][:max_moments]


def record_at(run: Run, epoch: float, tolerance: float = 0.5) -> dict | None:
    """The noise record of `run` nearest to `epoch` (in epochs of examples), within `tolerance`."""
    n = int(run.dataset.get("num_train", 0)) or 1
    best, best_d = None, tolerance + 1e-9
    for rec in run.noise:
        d = abs(rec.get("examples_seen", 0) / n - epoch)
        if d <= best_d:
            best, best_d = rec, d
    return best


def _empirical_points(results: SweepResults, epoch: float):
    points = []
    for r in results.runs:
        rec = record_at(r, epoch)
        emp = (rec or {}).get("empirical") or {}
        mean, stderr = emp.get("mean"), emp.get("stderr")
        if mean is None or not (np.isfinite(mean) and mean > 0):
            continue
        points.append((int(emp.get("batch_size", r.batch_size)), r.seed, float(mean),
                       float(stderr) if stderr is not None else float("nan"),
                       emp.get("analytic")))
    return points


def _moment_name(epoch: float) -> str:
    return "initialisation" if epoch == 0 else f"after epoch {epoch:g}"


def _at_moment(epoch: float) -> str:
    return "at initialisation" if epoch == 0 else f"after epoch {epoch:g}"


def claim_noise(results: SweepResults) -> Claim:
    statement = "smaller batches carry more gradient noise"
    test = ("At each moment of training, a weighted least-squares fit of log2 of the empirical "
            "minibatch gradient variance E|G_B - G|^2 (measured at each run's own batch size, "
            "weights from its standard error over minibatches) against log2 B, over all runs. "
            "1/B scaling predicts a slope of -1 (slightly steeper with the finite-population "
            "correction). The verdict comes from the first moment, initialisation, where every "
            "batch size has the same parameters (same seed), so the fit isolates the batch size: "
            "the claim holds if that slope is negative by more than 2 SE. Later moments compare "
            "runs at different parameters and are reported, not judged.")
    if not results.has_noise:
        return Claim(1, statement, test, ["no gradient-noise records in these results "
                                          "(noise schedule 'none')"], INCONCLUSIVE,
                     "Nothing was measured; rerun with --noise-every epoch.")
    evidence, slopes = [], []
    n_probe = None
    for epoch in noise_moments(results):
        pts = _empirical_points(results, epoch)
        bs = sorted({p[0] for p in pts})
        if len(bs) < 2:
            continue
        x = np.log2([p[0] for p in pts])
        y = np.log2([p[2] for p in pts])
        sy = np.asarray([p[3] / (p[2] * math.log(2)) for p in pts])
        if not np.all(np.isfinite(sy) & (sy > 0)):
            evidence.append(f"{_moment_name(epoch)}: standard errors missing; no fit")
            continue
        slope, se, dof = _weighted_slope(x, y, sy)
        z_zero, z_one = slope / se, (slope + 1) / se
        # The finite-population correction's own slope over the same batch sizes.
        for r in results.runs:
            rec = record_at(r, epoch)
            if rec and rec.get("probe_size"):
                n_probe = int(rec["probe_size"])
        fpc_slope = float("nan")
        if n_probe:
            b_arr = np.asarray(bs, float)
            fpc = np.log2((n_probe - b_arr) / (b_arr * (n_probe - 1)))
            fpc_slope = float(np.polyfit(np.log2(b_arr), fpc, 1)[0])
        agree = [abs(p[2] - p[4]) / p[3] for p in pts
                 if p[4] is not None and np.isfinite(p[3]) and p[3] > 0]
        within = sum(a <= 3 for a in agree)
        z_fpc = (slope - fpc_slope) / se
        evidence.append(
            f"{_moment_name(epoch)}: slope {slope:+.3f} ± {se:.3f} (SE; {len(pts)} runs, "
            f"B = {', '.join(map(str, bs))}); {abs(z_zero):.1f} SE "
            f"{'below' if slope < 0 else 'above'} zero; against -1: z = {_fmt_z(z_one)} "
            f"({'consistent' if abs(z_one) <= Z_SIGNIFICANT else 'inconsistent'}); against "
            f"{fpc_slope:+.3f}, the slope of 1/B with the finite-population correction at "
            f"N = {n_probe}: z = {_fmt_z(z_fpc)} "
            f"({'consistent' if abs(z_fpc) <= Z_SIGNIFICANT else 'inconsistent'}); empirical "
            f"within 3 SE of the analytic value in {within}/{len(agree)} runs")
        slopes.append((epoch, slope, se))
    if not slopes:
        return Claim(1, statement, test, evidence or ["fewer than two batch sizes with "
                                                      "empirical measurements"],
                     INCONCLUSIVE, "A slope needs at least two batch sizes with measurements.")
    # The verdict is taken where the parameters are matched across batch sizes (initialisation:
    # same seed, same parameters); later fits compare runs that training has taken to different
    # places, which the reason reports but which does not isolate the batch size.
    epoch, slope, se = slopes[0]
    later = [f"{s:+.2f} ± {e:.2f} {_at_moment(t)}" for t, s, e in slopes[1:]]
    trajectory = (f" Across runs, which training has taken to different parameters, the slope "
                  f"is {', '.join(later)}." if later else "")
    if slope + Z_SIGNIFICANT * se < 0:
        verdict = SUPPORTED
        reason = (f"{_at_moment(epoch).capitalize()}, the minibatch gradient variance falls as "
                  f"B^({slope:+.2f} ± {se:.2f}) with the batch size.{trajectory}")
    elif slope - Z_SIGNIFICANT * se > 0:
        verdict = NOT_SUPPORTED
        reason = f"{_at_moment(epoch).capitalize()}, the variance grows with B.{trajectory}"
    else:
        verdict = INCONCLUSIVE
        reason = (f"{_at_moment(epoch).capitalize()}, the slope is within 2 SE of zero."
                  f"{trajectory}")
    return Claim(1, statement, test, evidence, verdict, reason)


def _sig_decreasing(summary, key: str) -> tuple[float, float, float, int, int]:
    bs = list(summary)
    small, large = summary[bs[0]][key], summary[bs[-1]][key]
    diff, se, z = difference(small, large)
    return diff, se, z, bs[0], bs[-1]


def claim_roughness(results: SweepResults, summary) -> Claim:
    statement = "smaller batches give choppier loss curves"
    test = ("Roughness of each run's per-step training loss, in loss units (R) and relative to "
            "the loss level (R_rel = R / mean loss), as defined above; mean ± s.d. over seeds "
            "per batch size. The claim holds if both fall with B and, for both, the smallest "
            "batch size exceeds the largest by more than 2 SE; it fails if both rise.")
    bs = list(summary)
    evidence = [f"B = {b}: R = {summary[b]['roughness'].format('.4f')}, R_rel = "
                f"{summary[b]['roughness_relative'].format('.3f')}" for b in bs]
    if len(bs) < 2:
        return Claim(2, statement, test, evidence, INCONCLUSIVE, "Only one batch size.")
    outcomes, ratios = [], []
    for key, name in (("roughness", "R"), ("roughness_relative", "R_rel")):
        means = [summary[b][key].mean for b in bs]
        diff, se, z, b0, b1 = _sig_decreasing(summary, key)
        slope = (float(np.polyfit(np.log2(bs), np.log2(means), 1)[0])
                 if all(np.isfinite(means) & (np.asarray(means) > 0)) else float("nan"))
        evidence.append(f"{name}({b0}) - {name}({b1}) = {diff:+.4f} ± {se:.4f} (SE), "
                        f"z = {_fmt_z(z)}; log-log slope against B {slope:+.2f} (sampling noise "
                        "at a fixed loss level: -0.5)")
        monotone = all(np.isfinite(means)) and all(np.diff(means) < 0)
        outcomes.append("unknown" if np.isnan(z) else
                        "down" if z > Z_SIGNIFICANT and monotone else
                        "up" if z < -Z_SIGNIFICANT else "flat")
        ratios.append(means[0] / means[-1] if means[-1] else float("nan"))
    n = summary[bs[0]]["roughness"].n
    if "unknown" in outcomes:
        verdict = INCONCLUSIVE
        reason = f"At {n} seed(s) the seed-to-seed uncertainty cannot be estimated."
    elif outcomes == ["down", "down"]:
        verdict = SUPPORTED
        reason = (f"Per-step losses at B = {bs[0]} fluctuate {ratios[0]:.1f}x as much as at "
                  f"B = {bs[-1]} in loss units and {ratios[1]:.1f}x relative to the loss level, "
                  "falling with every step up in batch size.")
    elif outcomes == ["up", "up"]:
        verdict, reason = NOT_SUPPORTED, "The smallest batch size gives the smoother curve."
    else:
        verdict = INCONCLUSIVE
        reason = (f"The two measures disagree or do not separate (R: {outcomes[0]}, R_rel: "
                  f"{outcomes[1]}).")
    return Claim(2, statement, test, evidence, verdict, reason)


def claim_generalisation(results: SweepResults, summary) -> Claim:
    statement = "smaller batches can generalise better"
    test = ("Final generalisation gap (validation loss - training loss, both at the final "
            "parameters), smallest against largest batch size, with SE over seeds. The claim "
            "holds if the smallest batch size's gap is smaller by more than 2 SE. Runs compare at "
            "equal epochs, so the smaller batch size has taken more optimizer steps.")
    bs = list(summary)
    evidence = [f"B = {b}: loss gap {summary[b]['gap_loss'].format('.4f')}, accuracy gap "
                f"{summary[b]['gap_accuracy'].format('.4f')}, val accuracy "
                f"{summary[b]['val_accuracy'].format('.4f')}, val loss "
                f"{summary[b]['val_loss'].format('.4f')}" for b in bs]
    if len(bs) < 2:
        return Claim(3, statement, test, evidence, INCONCLUSIVE, "Only one batch size.")
    diff, se, z, b0, b1 = _sig_decreasing(summary, "gap_loss")
    evidence.append(f"loss gap({b0}) - loss gap({b1}) = {diff:+.4f} ± {se:.4f} (SE), "
                    f"z = {_fmt_z(z)}")
    d_acc, se_acc, z_acc = difference(summary[b0]["val_accuracy"], summary[b1]["val_accuracy"])
    evidence.append(f"val accuracy({b0}) - val accuracy({b1}) = {d_acc:+.4f} ± {se_acc:.4f} "
                    f"(SE), z = {_fmt_z(z_acc)}")
    if np.isnan(z):
        verdict, reason = INCONCLUSIVE, (f"At {summary[b0]['gap_loss'].n} seed(s) the "
                                         "seed-to-seed uncertainty cannot be estimated.")
    elif z < -Z_SIGNIFICANT:
        verdict = SUPPORTED
        reason = f"B = {b0} ends with a smaller gap than B = {b1}."
    elif z > Z_SIGNIFICANT:
        verdict = NOT_SUPPORTED
        steps0, steps1 = summary[b0]["steps"].mean, summary[b1]["steps"].mean
        reason = (f"B = {b0} ends with a larger gap than B = {b1} (after {steps0:,.0f} vs "
                  f"{steps1:,.0f} steps): at equal epochs the smaller batch fits the training "
                  "set more closely.")
        if z_acc > Z_SIGNIFICANT:
            reason += (f" Its validation accuracy is nevertheless higher by {100 * d_acc:.1f} "
                       f"points (z = {_fmt_z(z_acc)}): it generalises no better by the gap, "
                       "but ends more accurate on held-out data.")
    else:
        verdict, reason = INCONCLUSIVE, "The gaps differ by less than 2 SE."
    return Claim(3, statement, test, evidence, verdict, reason)


def epoch_time_estimate(results: SweepResults, batch_size: int) -> Estimate:
    """Seconds per epoch at a batch size, spread over epochs (one series per vmapped group)."""
    times = {}
    for r in results.by_batch_size().get(batch_size, []):
        if not r.diverged:
            times.setdefault(tuple(r.trained_with_seeds), epoch_seconds(r))
    return Estimate.of(np.concatenate(list(times.values())) if times else [])


def time_to_target_se(results: SweepResults, summary, batch_size: int) -> float:
    """SE of the mean seconds to target: seed spread and epoch-time jitter in quadrature.

    Seeds of a vmapped group share their epoch times, so the jitter of the e epochs summed
    (variance e * sd_epoch^2) does not average down over seeds. NaN with one seed.
    """
    est = summary[batch_size]["seconds_to_target"]
    jitter = epoch_time_estimate(results, batch_size)
    epochs = summary[batch_size]["epochs_to_target"].mean
    if est.n < 2:
        return float("nan")
    var = est.se ** 2
    if jitter.n > 1 and np.isfinite(epochs):
        var += epochs * jitter.sd ** 2
    return math.sqrt(var)


def claim_speed(results: SweepResults, summary, target: float | None) -> Claim:
    statement = ("larger batches progress faster per epoch, smaller ones can reach a good "
                 "solution faster in time")
    test = ("Read as the trade-off it describes: an epoch takes less wall time at a larger batch "
            "size, yet a smaller batch size reaches a target validation accuracy in fewer seconds. "
            "(If 'progress faster per epoch' meant more progress per epoch, both halves could not "
            "hold at once unless small-batch epochs were also faster; epochs to target are listed "
            "for that reading.) The SE of an epoch time is over epochs; the SE of the time to "
            "target adds the seed-to-seed spread and the epoch-time jitter in quadrature.")
    bs = list(summary)
    target_text = f"{100 * target:.1f}%" if target is not None else "n/a"
    evidence = [f"target validation accuracy: {target_text}"]
    for b in bs:
        row = summary[b]
        evidence.append(f"B = {b}: {row['epoch_seconds'].format('.3f')} s per epoch; to target: "
                        f"{row['epochs_to_target'].format('.1f')} epochs, "
                        f"{row['steps_to_target'].format('.0f')} steps, "
                        f"{row['seconds_to_target'].format('.2f')} s")
    if len(bs) < 2 or target is None:
        return Claim(4, statement, test, evidence, INCONCLUSIVE, "Needs two batch sizes and a "
                     "reachable target.")
    b0, b1 = bs[0], bs[-1]
    t0, t1 = epoch_time_estimate(results, b0), epoch_time_estimate(results, b1)
    d_t, se_t, z_t = difference(t0, t1)
    evidence.append(f"epoch time({b0}) - epoch time({b1}) = {d_t:+.3f} ± {se_t:.3f} s (SE over "
                    f"epochs), z = {_fmt_z(z_t)}")
    s0, s1 = summary[b0]["seconds_to_target"], summary[b1]["seconds_to_target"]
    d_s = s0.mean - s1.mean
    se_s = math.sqrt(time_to_target_se(results, summary, b0) ** 2
                     + time_to_target_se(results, summary, b1) ** 2)
    z_s = _ratio(d_s, se_s)
    evidence.append(f"time to target({b0}) - time to target({b1}) = {d_s:+.2f} ± {se_s:.2f} s "
                    f"(SE), z = {_fmt_z(z_s)}")
    times = {b: summary[b]["seconds_to_target"].mean for b in bs
             if np.isfinite(summary[b]["seconds_to_target"].mean)}
    if times:
        fastest = min(times, key=times.get)
        evidence.append(f"fastest to the target: B = {fastest} ({times[fastest]:.2f} s); the "
                        f"verdict compares the pre-set pair B = {b0} and B = {b1}")
    e0, e1 = summary[b0]["epochs_to_target"].mean, summary[b1]["epochs_to_target"].mean
    evidence.append(f"per epoch of data, B = {b0 if e0 < e1 else b1} gets to the target sooner "
                    f"({e0:.1f} vs {e1:.1f} epochs)" if e0 != e1 else
                    f"both reach the target after {e0:.1f} epochs")
    faster_epochs = z_t > Z_SIGNIFICANT
    faster_target = z_s < -Z_SIGNIFICANT
    if np.isnan(z_s) or np.isnan(z_t):
        verdict = INCONCLUSIVE
        reason = "The uncertainty of the times cannot be estimated at this number of seeds."
    elif faster_epochs and faster_target:
        verdict = SUPPORTED
        reason = (f"Epochs at B = {b1} take {t1.mean / t0.mean:.2f}x the time of those at "
                  f"B = {b0}, but B = {b0} reaches {target_text} in {s0.mean:.2f} s against "
                  f"{s1.mean:.2f} s.")
    elif z_t < -Z_SIGNIFICANT or z_s > Z_SIGNIFICANT:
        verdict = NOT_SUPPORTED
        reason = (f"B = {b1} " + ("does not run epochs faster" if z_t < -Z_SIGNIFICANT else
                                  f"reaches {target_text} sooner in wall time") +
                  f" than B = {b0}.")
    else:
        verdict = INCONCLUSIVE
        halves = [
            (f"epochs take {t1.mean:.3f} s at B = {b1} against {t0.mean:.3f} s at B = {b0} "
             f"(z = {_fmt_z(z_t)})"),
            (f"B = {b0} reaches {target_text} in {s0.mean:.2f} s against {s1.mean:.2f} s at "
             f"B = {b1} (z = {_fmt_z(z_s)})")]
        reason = (f"The first half {'holds' if faster_epochs else 'is undecided'}: "
                  f"{halves[0]}; the second {'holds' if faster_target else 'is undecided'}: "
                  f"{halves[1]}. Validation runs only at epoch ends, so times to target move in "
                  "whole epochs.")
    return Claim(4, statement, test, evidence, verdict, reason)


def claim_balance(results: SweepResults, summary, claims: list[Claim]) -> Claim:
    b_mid = MODERATE_BATCH_SIZE
    statement = f"a moderate batch size ({b_mid}) strikes the balance"
    test = (f"Judged from claims 1-4: B = {b_mid} strikes the balance if its final validation "
            "accuracy and its time to the target are each within 2 SE of the best batch size's "
            f"(or it is the best), and its curve is smoother than the smallest batch size's. It "
            "fails if it is worse than the best by more than 2 SE on either, or rougher than the "
            "smallest.")
    bs = list(summary)
    evidence = [f"claims 1-4: " + ", ".join(f"{c.number} {c.verdict}" for c in claims)]
    b_simple = [f"{b}: {summary[b]['b_simple_end'].format('.0f')}" for b in bs
                if np.isfinite(summary[b]["b_simple_end"].mean)]
    if b_simple:
        evidence.append("B_simple at the end of training (batch sizes well below it are "
                        "noise-dominated, McCandlish et al. 2018): " + "; ".join(b_simple))
    if b_mid not in summary or len(bs) < 2:
        return Claim(5, statement, test, evidence, INCONCLUSIVE,
                     f"B = {b_mid} and at least one other batch size must be in the sweep.")
    checks, unknown, failed = [], False, []
    for key, better, name, fmt in (("val_accuracy", max, "final validation accuracy", ".4f"),
                                   ("seconds_to_target", min, "time to target (s)", ".2f")):
        means = {b: summary[b][key].mean for b in bs if np.isfinite(summary[b][key].mean)}
        if b_mid not in means:
            unknown = True
            continue
        best = better(means, key=means.get)
        if best == b_mid:
            checks.append(f"{name}: B = {b_mid} is the best")
            continue
        diff, se, z = difference(summary[b_mid][key], summary[best][key])
        if key == "seconds_to_target":
            se = math.sqrt(time_to_target_se(results, summary, b_mid) ** 2
                           + time_to_target_se(results, summary, best) ** 2)
            z = -_ratio(diff, se)  # fewer seconds is better
        checks.append(f"{name}: B = {b_mid} vs the best (B = {best}): {diff:+{fmt}} ± "
                      f"{se:{fmt}} (SE), z = {_fmt_z(z)}")
        if np.isnan(z):
            unknown = True
        elif z < -Z_SIGNIFICANT:
            failed.append(name)
    if bs[0] != b_mid:
        diff, se, z = difference(summary[b_mid]["roughness"], summary[bs[0]]["roughness"])
        checks.append(f"roughness: B = {b_mid} vs B = {bs[0]}: {diff:+.4f} ± {se:.4f} (SE), "
                      f"z = {_fmt_z(z)}")
        if z > Z_SIGNIFICANT:
            failed.append(f"a smoother curve than B = {bs[0]}")
        elif not z < -Z_SIGNIFICANT:  # within 2 SE, or no SE
            unknown = True
    evidence += checks
    if failed:
        verdict = NOT_SUPPORTED
        reason = f"B = {b_mid} falls short on: {', '.join(failed)}."
    elif unknown:
        verdict = INCONCLUSIVE
        reason = (f"Some comparisons cannot be decided at {summary[b_mid]['val_accuracy'].n} "
                  "seed(s).")
    else:
        verdict = SUPPORTED
        reason = (f"B = {b_mid} is as accurate and as fast to the target as the best batch size "
                  f"within the uncertainty, with a smoother curve than B = {bs[0]}.")
    return Claim(5, statement, test, evidence, verdict, reason)


def evaluate_claims(results: SweepResults, target_accuracy: float | None = None) -> list[Claim]:
    """The five claims of the original write-up, each with its test, numbers and verdict."""
    target = target_accuracy if target_accuracy is not None else default_target_accuracy(results)
    summary = summarize(results, target)
    claims = [claim_noise(results), claim_roughness(results, summary),
              claim_generalisation(results, summary), claim_speed(results, summary, target)]
    claims.append(claim_balance(results, summary, claims))
    return claims


# --------------------------------------------------------------------------------------------
# The report


def _provenance_lines(results: SweepResults) -> list[str]:
    m = results.manifest
    sweep, config, d = m.get("sweep", {}), m.get("config", {}), results.dataset
    sessions = m.get("sessions", [])
    last = sessions[-1] if sessions else {}
    versions = last.get("versions", {})
    lines = [
        f"- data: {results.dataset_label()}; source: {d.get('source', 'unknown')}",
        f"- batch sizes {', '.join(map(str, sweep.get('batch_sizes', results.batch_sizes)))}; "
        f"seeds {', '.join(map(str, sweep.get('seeds', [])))}; {config.get('epochs', '?')} epochs; "
        f"learning rate {config.get('learning_rate', '?')} ({config.get('lr_scaling', '?')} "
        f"scaling, reference B {config.get('reference_batch_size', '?')}); optimizer "
        f"{config.get('optimizer', '?')}; hidden {config.get('hidden', '?')}; noise schedule "
        f"{config.get('noise_schedule', '?')}",
    ]
    if last:
        lines.append(f"- device: {last.get('device_count')} x {last.get('device_kind')} "
                     f"({last.get('backend')}), {last.get('platform')}, Python "
                     f"{last.get('python')}; " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                                           if v))
        lines.append(f"- started {m.get('started')}, finished {m.get('finished') or 'not yet'}"
                     f" ({len(sessions)} session{'s' if len(sessions) != 1 else ''})")
    return lines


def build_report(results: SweepResults, *, target_accuracy: float | None = None,
                 figures: Sequence[str | os.PathLike] = (), notes: Sequence[str] = ()) -> str:
    """The report as Markdown: provenance, notes, the summary table, definitions, the claims."""
    target = target_accuracy if target_accuracy is not None else default_target_accuracy(results)
    summary = summarize(results, target)
    claims = evaluate_claims(results, target)
    seeds = max(row["runs"] for row in summary.values())
    target_text = "n/a" if target is None else f"{100 * target:.1f}%" + (
        " (given)" if target_accuracy is not None else
        " (the best accuracy every run reaches, rounded down to 0.5 points)")
    lines = [f"# Batch-size sweep report: {results.dataset_label()}", ""]
    lines += _provenance_lines(results) + [""]
    all_notes = list(notes)
    for r in results.runs:
        if r.diverged:
            all_notes.append(f"run {r.path.name if r.path else (r.batch_size, r.seed)} DIVERGED "
                             f"at step {r.diverged_step} (non-finite loss); left out of the means "
                             "and shown as diverged in the figures")
    if results.missing:
        all_notes.append("incomplete: no finished run for " + ", ".join(
            f"B = {b} seed {s}" for b, s in results.missing) + " (continue with --resume)")
    if not results.has_noise and not any("noise" in n for n in notes):
        all_notes.append("no gradient-noise records (noise schedule 'none'): B_simple and "
                         "claim 1 are unavailable, figures 4 and 5 were skipped")
    if all_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    lines += ["## Summary per batch size", "",
              f"Mean ± s.d. over seeds (up to {seeds}); diverged runs left out. Losses and "
              "accuracies at the end of training; train loss/accuracy evaluated at the final "
              "parameters; gaps as defined below; time = training + validation seconds "
              "(compilation separate; seeds train together, so times are per vmapped group). "
              "Also in `summary.csv` and `summary.tex`.", "",
              summary_markdown(summary), "",
              "## Definitions", "",
              "- **loss gap** = validation loss - training loss; **accuracy gap** = training "
              "accuracy - validation accuracy (both at the final parameters; larger = worse "
              "generalisation).",
              "- **roughness** R = sd(l_{t+1} - l_t) / sqrt(2) over the per-step training losses "
              "l_t of each epoch 2..E (epoch 1 when E = 1), partial batches left out, averaged "
              "over epochs; the first difference removes the slow trend. R is the step-to-step "
              "noise of the loss curve in loss units (a linear-scale plot). **rel. roughness** "
              "R_rel divides each epoch's R by that epoch's mean loss (a log-scale plot): at "
              "equal epochs small batches reach lower losses, whose fluctuations are smaller in "
              "absolute terms, so R_rel is the level-free comparison.",
              "- **B_simple** = tr(Sigma) / |G|^2 at the last measurement (McCandlish et al. "
              "2018).",
              f"- **target** validation accuracy for claim 4: {target_text}.",
              f"- **significant**: a difference larger than {Z_SIGNIFICANT:g} standard errors "
              "(SE over seeds unless stated).", "",
              "## Claims", ""]
    lines += ["| # | claim | verdict |", "|---|---|---|"]
    lines += [f"| {c.number} | {c.statement} | **{c.verdict}** |" for c in claims] + [""]
    lines += [c.markdown() for c in claims]
    if figures:
        lines += ["## Figures", ""] + [f"- `{f}`" for f in figures] + [""]
    return "\n".join(lines)


def write_report(results: SweepResults, out_dir: str | os.PathLike | None = None, *,
                 target_accuracy: float | None = None,
                 figures: Sequence[str | os.PathLike] = (),
                 notes: Sequence[str] = ()) -> str:
    """Write `report.md`, `summary.csv` and `summary.tex` into `out_dir` (default: the sweep's).

    Returns:
      The Markdown report.
    """
    out_dir = pathlib.Path(out_dir) if out_dir is not None else results.path
    text = build_report(results, target_accuracy=target_accuracy, figures=figures, notes=notes)
    target = target_accuracy if target_accuracy is not None else default_target_accuracy(results)
    summary = summarize(results, target)
    caption = (f"Final metrics per batch size on {results.dataset_label()}, mean $\\pm$ s.d. "
               "over seeds.")
    write_bytes_atomic(out_dir / "summary.csv", summary_csv(summary).encode())
    write_bytes_atomic(out_dir / "summary.tex", summary_latex(summary, caption).encode())
    write_bytes_atomic(out_dir / "report.md", text.encode())
    return text
