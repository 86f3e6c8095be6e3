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

Beyond the original, two sections (after the claims):
* Sharp minima (Keskar et al. 2017): lambda_max and tr(H) of the training-loss Hessian at each
  run's end (`batchjax.sharpness`, as saved by the sweep) per batch size; "smaller batches ended
  in flatter minima" is supported when both are smaller at the smallest than at the largest
  batch size by more than 2 SE. The runs end at equal epochs but different training losses, a
  confound the section states with the numbers.
* Critical batch size (McCandlish et al. 2018, eq. 2.11; `batchjax.critical`): steps to a target
  per batch size and the fit of S(B) = S_min + E_min / B. Primary target: a training loss, read
  from the smoothed per-step losses (per-step resolution); by default the lowest smoothed loss
  every non-diverged run reaches, rounded up to two significant digits. Secondary: the
  validation-accuracy target of claim 4 (epoch resolution; runs at the target at their first
  evaluation are upper bounds, left out of the fit). A fit needs >= 3 batch sizes at which every
  seed reached the target; B_crit is compared with B_simple averaged over training (each run's
  mean over its noise records, then the mean over runs).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from batchjax import critical
from batchjax.errors import BatchjaxError
from batchjax.results import Run, SweepResults, to_jsonable, write_bytes_atomic

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
    hessian = run.sharpness if ok and run.sharpness else {}
    for key, field in (("lambda_max", "lambda_max"), ("lambda_min", "lambda_min"),
                       ("hessian_trace", "trace")):
        value = hessian.get(field)
        stats[key] = float(value) if value is not None else nan
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
    ("lambda_max", "lambda_max", ".3g"),
    ("hessian_trace", "tr(H)", ".3g"),
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
    evidence = ["claims 1-4: " + ", ".join(f"{c.number} {c.verdict}" for c in claims)]
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
# Beyond the original: sharpness


def _sharpness_settings_text(results: SweepResults) -> str:
    settings = results.manifest.get("sharpness") or {}
    records = [r.sharpness for r in results.runs if r.sharpness]
    n = records[0].get("num_examples") if records else None
    probes = records[0].get("hutchinson_samples") if records else settings.get(
        "hutchinson_samples")
    return (f"the Hessian of the mean training loss over the first {n or '?':,} training "
            f"examples at each run's final parameters; lambda_max by Lanczos on Hessian-vector "
            f"products to a relative Ritz residual of {settings.get('tol', '?')}, tr(H) by "
            f"Hutchinson's estimator with {probes} Rademacher probes")


def _log_slope(batch_sizes: Sequence[int], values: Sequence[float]) -> tuple[float, float]:
    """OLS slope of log2(value) on log2(B) over runs and its standard error (NaN if < 3 runs)."""
    x, y = np.log2(np.asarray(batch_sizes, float)), np.log2(np.asarray(values, float))
    if len(x) < 3 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    se = math.sqrt(np.sum(resid ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2))
    return float(slope), float(se)


def _loss_ratio_text(summary, bs) -> str:
    small, large = summary[bs[0]]["train_loss"].mean, summary[bs[-1]]["train_loss"].mean
    if not (np.isfinite(small) and np.isfinite(large) and small > 0 and large > 0):
        return ""
    ratio = large / small
    return (f", where B = {bs[0]} also ended at a {ratio:.2g}x lower training loss (see the "
            "confound)" if ratio > 1 else f", where B = {bs[0]} ended at a {1 / ratio:.2g}x "
            "HIGHER training loss")


def sharpness_section(results: SweepResults, summary) -> list[str]:
    """Markdown lines of the section testing the "sharp minima" claim (Keskar et al. 2017)."""
    title = "## Sharp minima (Keskar et al. 2017)"
    statement = ("Keskar et al. (2017, arXiv:1609.04836) report that large-batch training "
                 "converges to sharp minimizers of the training loss and small-batch training to "
                 "flat ones, and that the sharp ones generalise worse; the original write-up "
                 "speaks of large batches settling in \"sharp local minima\".")
    if not results.has_sharpness:
        return [title, "", statement, "", "Not measured in this sweep (run with --sharpness).",
                ""]
    bs = list(summary)
    lines = [title, "", statement, "",
             f"*Measured:* {_sharpness_settings_text(results)}. Every run stops after the same "
             "number of epochs, so batch sizes are compared at equal epochs (not at equal "
             "steps or equal training loss). Mean ± s.d. over seeds; diverged runs have no "
             "sharpness and are left out.", "",
             "| B | lambda_max | tr(H) | lambda_min | final train loss | loss gap | "
             "val accuracy |", "|---|---|---|---|---|---|---|"]
    for b in bs:
        row = summary[b]
        lines.append(f"| {b} | {row['lambda_max'].format('.3g')} | "
                     f"{row['hessian_trace'].format('.3g')} | {row['lambda_min'].format('.3g')} | "
                     f"{row['train_loss'].format('.4f')} | {row['gap_loss'].format('.4f')} | "
                     f"{row['val_accuracy'].format('.4f')} |")
    lines.append("")
    runs = [r for r in results.runs if r.sharpness and not r.diverged]
    evidence, outcomes = [], []
    for key, name in (("lambda_max", "lambda_max"), ("hessian_trace", "tr(H)")):
        pts = [(r.batch_size, r.sharpness[key if key == "lambda_max" else "trace"])
               for r in runs]
        pts = [(b, v) for b, v in pts if v is not None and np.isfinite(v) and v > 0]
        slope, slope_se = _log_slope([p[0] for p in pts], [p[1] for p in pts])
        if len(bs) < 2:
            outcomes.append("unknown")
            continue
        diff, se, z, b0, b1 = _sig_decreasing(summary, key)
        evidence.append(f"{name}({b0}) - {name}({b1}) = {diff:+.4g} ± {se:.2g} (SE), "
                        f"z = {_fmt_z(z)}; log2-log2 slope against B over {len(pts)} runs: "
                        + (f"{slope:+.2f} ± {slope_se:.2f}" if np.isfinite(slope) else "n/a"))
        outcomes.append("unknown" if np.isnan(z) else "flatter" if z < -Z_SIGNIFICANT
                        else "sharper" if z > Z_SIGNIFICANT else "same")
    gap_pts = [(math.log(r.sharpness["lambda_max"]), run_stats(r)["gap_loss"]) for r in runs
               if r.sharpness.get("lambda_max", 0) > 0]
    gap_pts = [p for p in gap_pts if np.isfinite(p[1])]
    corr = float("nan")
    if len(gap_pts) >= 3 and np.ptp([p[0] for p in gap_pts]) > 0 \
            and np.ptp([p[1] for p in gap_pts]) > 0:
        corr = float(np.corrcoef(np.asarray(gap_pts).T)[0, 1])
        evidence.append(f"correlation of log lambda_max with the loss gap over {len(gap_pts)} "
                        f"runs: r = {corr:+.2f} (runs of all batch sizes pooled, so it mixes "
                        "the batch size's effect on both)")
    negative = [r for r in runs if r.sharpness.get("lambda_min") is not None
                and r.sharpness["lambda_min"] < 0]
    if runs:
        ratios = [abs(r.sharpness["lambda_min"]) / r.sharpness["lambda_max"] for r in negative
                  if r.sharpness["lambda_max"] > 0]
        # The smallest Ritz value bounds the smallest eigenvalue from above (Cauchy
        # interlacing), so a negative one proves a direction of negative curvature; its size
        # says whether that matters.
        median = float(np.median(ratios)) if ratios else float("nan")
        evidence.append(f"lambda_min < 0 in {len(negative)}/{len(runs)} runs"
                        + (f" (median |lambda_min| / lambda_max = {median:.2g})"
                           if ratios else "")
                        + (": the end points are minima up to nearly flat directions"
                           if median < 1e-3 else
                           ": the end points are not minima, as usual for a network trained "
                           "for a fixed number of epochs" if negative else ""))
    unconverged = [r for r in runs if not r.sharpness.get("converged", True)]
    if unconverged:
        evidence.append(f"Lanczos did not reach its tolerance in {len(unconverged)} run(s); "
                        "their lambda_max is a lower bound")
    if "unknown" in outcomes or len(bs) < 2:
        verdict = INCONCLUSIVE
        reason = ("Only one batch size." if len(bs) < 2 else
                  f"At {summary[bs[0]]['lambda_max'].n} seed(s) the seed-to-seed uncertainty "
                  "cannot be estimated.")
    elif outcomes == ["flatter", "flatter"]:
        verdict = SUPPORTED
        ratio = summary[bs[-1]]["lambda_max"].mean / summary[bs[0]]["lambda_max"].mean
        reason = (f"B = {bs[0]} ended at a flatter point than B = {bs[-1]} by both measures "
                  f"(lambda_max {ratio:.2g}x smaller), beyond 2 SE, at equal epochs"
                  + _loss_ratio_text(summary, bs) + ".")
    elif outcomes == ["sharper", "sharper"]:
        verdict = NOT_SUPPORTED
        reason = (f"B = {bs[0]} ended at a SHARPER point than B = {bs[-1]} by both measures, "
                  "beyond 2 SE, at equal epochs" + _loss_ratio_text(summary, bs) + ".")
    else:
        verdict = INCONCLUSIVE
        reason = (f"lambda_max and tr(H) do not both separate the smallest from the largest "
                  f"batch size in the same direction (lambda_max: {outcomes[0]}, tr(H): "
                  f"{outcomes[1]} at B = {bs[0]} relative to B = {bs[-1]}).")
    losses = {b: summary[b]["train_loss"].mean for b in bs}
    confound = ("*Confound.* The comparison is at equal epochs, and the runs end at different "
                "training losses")
    if len(bs) > 1 and all(np.isfinite(list(losses.values()))):
        confound += (f": {losses[bs[0]]:.4f} at B = {bs[0]} against {losses[bs[-1]]:.4f} at "
                     f"B = {bs[-1]} (final parameters, whole training set)")
    confound += (". The Hessian of the softmax cross-entropy is weighted by the predicted "
                 "probabilities' variance p(1 - p), which vanishes as the training examples are "
                 "fitted with growing confidence: a run that has gone further down the loss is "
                 "flatter for that reason alone, whatever its batch size. Sharpness measured "
                 "once at the end cannot separate the two; comparing at equal training loss "
                 "would. Sharpness also depends on the parametrisation (Dinh et al. 2017, "
                 "arXiv:1703.04933), so it is a description of these runs, not a cause of the "
                 "gap.")
    lines += [f"**Smaller batches ended in flatter minima here: {verdict}.** {reason}", ""]
    lines += [f"- {e}" for e in evidence] + ["", confound, ""]
    if np.isfinite(corr):
        lines += [f"*Sharper and worse?* Across runs, r = {corr:+.2f} between log lambda_max "
                  "and the loss gap: " + ("sharper end points went with larger gaps" if
                                          corr > 0.5 else "sharper end points went with "
                                          "SMALLER gaps" if corr < -0.5 else
                                          "no strong relation") + " in this sweep.", ""]
    return lines


# --------------------------------------------------------------------------------------------
# Beyond the original: the critical batch size


def min_smoothed_loss(run: Run, window_examples: int = critical.LOSS_WINDOW_EXAMPLES) -> float:
    """The lowest smoothed per-step training loss of a run (before any non-finite loss)."""
    losses = np.asarray(run.step_losses, np.float64)
    finite = np.isfinite(losses)
    stop = len(losses) if finite.all() else int(np.argmin(finite))
    if stop == 0:
        return float("nan")
    return float(np.min(critical.smooth_step_losses(losses[:stop], run.step_batch_sizes[:stop],
                                                    window_examples)))


def _ceil_significant(value: float, digits: int = 2) -> float:
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.ceil(value / scale - 1e-9) * scale:.{digits}g}")


def default_target_loss(results: SweepResults) -> float | None:
    """The lowest smoothed training loss every non-diverged run reaches, rounded up to two
    significant digits (so that every run does reach it)."""
    lows = [min_smoothed_loss(r) for r in results.runs if not r.diverged]
    lows = [v for v in lows if np.isfinite(v) and v > 0]
    return _ceil_significant(max(lows)) if lows else None


@dataclasses.dataclass
class TargetAnalysis:
    """Steps to one target per batch size and seed, and the fit of eq. 2.11 to them.

    Attributes:
      kind: "train_loss" or "val_accuracy".
      target: the target value, or None when none could be chosen.
      chosen: how the target was chosen (for the report).
      batch_sizes, seeds: the table's axes.
      steps, examples: [num_B, num_seeds], NaN where not reached (or the run is missing).
      upper_bound: [num_B, num_seeds], reached at the first measurement, so steps are only an
        upper bound (left out of the fit).
      fit: the `critical.CriticalFit`, or None.
      note: why there is no fit, or None.
    """

    kind: str
    target: float | None
    chosen: str
    batch_sizes: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray
    examples: np.ndarray
    upper_bound: np.ndarray
    fit: Any = None
    note: str | None = None

    @property
    def label(self) -> str:
        if self.target is None:
            return "n/a"
        return (f"training loss {self.target:g}" if self.kind == "train_loss"
                else f"val. accuracy {100 * self.target:.1f}%")

    @property
    def fit_steps(self) -> np.ndarray:
        """The steps the fit uses: upper bounds removed."""
        return np.where(self.upper_bound, np.nan, self.steps)


def analyse_target(results: SweepResults, kind: str, target: float | None,
                   chosen: str) -> TargetAnalysis:
    """Steps to `target` for every run of the sweep and, with >= 3 batch sizes, the fit."""
    empty = np.zeros((0, 0))
    if target is None:
        return TargetAnalysis(kind, None, chosen, np.zeros(0, int), np.zeros(0, int), empty,
                              empty, empty.astype(bool),
                              note="no target: no run has a finished epoch")
    kw = {kind: target}
    batch_sizes, seeds, steps, examples = critical.steps_to_target_table(results.runs, **kw)
    upper = np.zeros(steps.shape, bool)
    for r in results.runs:
        i, j = np.searchsorted(batch_sizes, r.batch_size), np.searchsorted(seeds, r.seed)
        if kind == "val_accuracy":
            acc = r.history["val_accuracy"]
            upper[i, j] = bool(len(acc) and acc[0] >= target - 1e-6)
        else:
            upper[i, j] = steps[i, j] == 0  # below the target before the first step
    analysis = TargetAnalysis(kind, target, chosen, batch_sizes, seeds, steps, examples, upper)
    fit_steps = analysis.fit_steps
    full = np.isfinite(fit_steps).all(axis=1)
    if full.sum() < 3:
        reached = np.isfinite(steps).all(axis=1)
        analysis.note = (f"only {int(full.sum())} of {len(batch_sizes)} batch sizes reached "
                         f"{analysis.label} with every seed"
                         + (f" ({int(reached.sum() - full.sum())} more only "
                            + ("at their first evaluation, an upper bound)"
                               if kind == "val_accuracy" else "at step 0 of the smoothed loss)")
                            if reached.sum() > full.sum() else "")
                         + "; the fit of eq. 2.11 needs at least 3 (more batch sizes, e.g. "
                         "--preset critical, or more epochs, or another target)")
        return analysis
    try:
        analysis.fit = critical.fit_critical_batch(batch_sizes, fit_steps,
                                                   num_bootstrap=1000 if len(seeds) > 1 else 0)
    except BatchjaxError as err:
        analysis.note = str(err)
    return analysis


def run_b_simple(run: Run, until_step: float | None = None) -> float:
    """A run's B_simple averaged over training: the mean over its noise records (those at or
    before `until_step`, when given)."""
    values = [float(rec["noise_scale"]) for rec in run.noise
              if rec.get("noise_scale") is not None and np.isfinite(rec["noise_scale"])
              and (until_step is None or rec.get("step", 0) <= until_step)]
    return float(np.mean(values)) if values else float("nan")


@dataclasses.dataclass
class CriticalAnalysis:
    """The critical-batch-size analysis of a sweep (see `critical_analysis`)."""

    primary: TargetAnalysis
    secondary: TargetAnalysis
    b_simple: Estimate
    b_simple_by_batch_size: dict[int, Estimate]
    records_per_run: int
    b_simple_to_target: Estimate  # over the records up to each run's primary crossing


def critical_analysis(results: SweepResults, *, target_loss: float | None = None,
                      target_accuracy: float | None = None) -> CriticalAnalysis:
    """Steps to a training-loss target (primary) and a validation-accuracy target (secondary),
    their fits of McCandlish et al. eq. 2.11, and B_simple averaged over training.

    Args:
      results: a loaded sweep.
      target_loss: training-loss target (default `default_target_loss`).
      target_accuracy: validation-accuracy target (default `default_target_accuracy`).
    """
    loss = target_loss if target_loss is not None else default_target_loss(results)
    acc = target_accuracy if target_accuracy is not None else default_target_accuracy(results)
    primary = analyse_target(
        results, "train_loss", loss,
        "given" if target_loss is not None else
        "the lowest smoothed training loss every run reaches, rounded up to two significant "
        "digits")
    secondary = analyse_target(
        results, "val_accuracy", acc,
        "given" if target_accuracy is not None else
        "the best validation accuracy every run reaches, rounded down to 0.5 points")
    ok = [r for r in results.runs if not r.diverged]
    by_batch = {b: Estimate.of([run_b_simple(r) for r in ok if r.batch_size == b])
                for b in results.batch_sizes}
    to_target = []
    for r in ok:
        if primary.steps.size:
            i = np.searchsorted(primary.batch_sizes, r.batch_size)
            crossing = primary.steps[i, np.searchsorted(primary.seeds, r.seed)]
            if np.isfinite(crossing):
                to_target.append(run_b_simple(r, until_step=crossing))
    return CriticalAnalysis(primary, secondary, Estimate.of([run_b_simple(r) for r in ok]),
                            by_batch, max((len(r.noise) for r in ok), default=0),
                            Estimate.of(to_target))


def critical_record(analysis: CriticalAnalysis) -> dict[str, Any]:
    """The critical-batch-size analysis as plain values (NaN: not reached)."""
    def target(t: TargetAnalysis) -> dict[str, Any]:
        return {"kind": t.kind, "target": t.target, "chosen": t.chosen,
                "batch_sizes": t.batch_sizes, "seeds": t.seeds, "steps": t.steps,
                "examples": t.examples, "upper_bound": t.upper_bound,
                "fit": t.fit.to_dict() if t.fit is not None else None, "note": t.note}

    return {"primary": target(analysis.primary), "secondary": target(analysis.secondary),
            "b_simple_mean": analysis.b_simple.mean, "b_simple_sd": analysis.b_simple.sd,
            "b_simple_runs": analysis.b_simple.n,
            "b_simple_to_primary_target_mean": analysis.b_simple_to_target.mean,
            "b_simple_by_batch_size": {b: e.mean for b, e in
                                       analysis.b_simple_by_batch_size.items()}}


def _interval_text(interval) -> str:
    return (f"; 95% bootstrap interval over seeds [{critical._number(interval[0])}, "
            f"{critical._number(interval[1])}]" if interval else "")


def _target_lines(analysis: TargetAnalysis, heading: str, caveat: str) -> list[str]:
    lines = [f"### {heading}: {analysis.label}", "",
             f"Target: {analysis.label} ({analysis.chosen}). {caveat}", ""]
    if analysis.target is None:
        return lines + [f"**No fit:** {analysis.note}.", ""]
    fit = analysis.fit
    bounds = critical.regimes(fit) if fit is not None and fit.valid else None
    lines += ["| B | steps to target | examples to target | seeds reached | regime |",
              "|---|---|---|---|---|"]
    for i, b in enumerate(analysis.batch_sizes):
        steps, examples = analysis.steps[i], analysis.examples[i]
        n_up = int(analysis.upper_bound[i].sum())
        reached = int(np.isfinite(steps).sum())
        regime = bounds.regime(b).replace("_", " ") if bounds else "-"
        if fit is not None and float(b) not in fit.batch_sizes:
            regime += " (not in fit)"
        mark = ""
        if n_up:
            mark = (f" ({n_up} at the first evaluation: upper bound)"
                    if analysis.kind == "val_accuracy" else f" ({n_up} at step 0: not fitted)")
        lines.append(f"| {b} | {Estimate.of(steps).format('.0f')} | "
                     f"{Estimate.of(examples).format('.0f')} | {reached}/{len(steps)}{mark} | "
                     f"{regime} |")
    lines.append("")
    if fit is None:
        return lines + [f"**No fit:** {analysis.note}.", ""]
    b_text = (f"**B_crit = {critical._number(fit.b_crit)} ± {fit.b_crit_stderr:.2g}** (± SE of "
              "the weighted fit, delta method"
              + (_interval_text(fit.b_crit_interval) if fit.num_seeds >= 3 else "") + ")")
    lines.append(f"Fit over B = {', '.join(f'{b:g}' for b in fit.batch_sizes)}"
                 + (f" (left out: {', '.join(f'{b:g}' for b in fit.excluded_batch_sizes)})"
                    if fit.excluded_batch_sizes else "")
                 + f": S_min = {critical._number(fit.s_min)} ± {fit.s_min_stderr:.2g} steps, "
                 f"E_min = {critical._number(fit.e_min)} ± {fit.e_min_stderr:.2g} examples, "
                 f"{b_text}; relative rms residual {fit.rms_relative_residual:.2g}."
                 + (f" With {len(fit.batch_sizes)} batch sizes the residual SE rests on "
                    f"{len(fit.batch_sizes) - 2} degree(s) of freedom and S_min on the largest "
                    "one or two batch sizes; "
                    + ("the bootstrap interval is the better guide, and "
                       if fit.b_crit_interval and fit.num_seeds >= 3 else "")
                    + "--preset critical (8 batch sizes) is the better experiment."
                    if len(fit.batch_sizes) < 5 else ""))
    if bounds:
        lines.append(f"Regimes (Shallue et al. 2019; factor {bounds.factor:g}): perfect scaling "
                     f"for B ≤ {critical._number(bounds.perfect_scaling_max)}, diminishing "
                     f"returns in between, maximal data parallelism for B ≥ "
                     f"{critical._number(bounds.maximal_parallelism_min)}.")
    else:
        lines.append(f"The fit is not of the model's shape (S_min = {fit.s_min:.3g}, E_min = "
                     f"{fit.e_min:.3g}): no B_crit or regimes to report.")
    return lines + [""]


def critical_section(results: SweepResults, analysis: CriticalAnalysis) -> list[str]:
    """Markdown lines of the critical-batch-size section."""
    lines = ["## Critical batch size (McCandlish et al. 2018)", "",
             "McCandlish et al. (2018, arXiv:1812.06162, eq. 2.11) model the optimizer steps S "
             "and examples E = B S needed to reach a target as (S / S_min - 1)(E / E_min - 1) = "
             "1, i.e. S(B) = S_min + E_min / B, with the critical batch size B_crit = E_min / "
             "S_min: below it, doubling B nearly halves the steps; above it, it barely saves "
             "any. Steps to target are the first crossing per run; the fit uses the mean over "
             "seeds of each batch size that every seed brought to the target, weighted by "
             "relative error (`batchjax.critical`).", ""]
    lines += _target_lines(
        analysis.primary, "Primary target",
        f"Per-step resolution: every step's minibatch loss, smoothed by a centred moving "
        f"average over {critical.LOSS_WINDOW_EXAMPLES:,} examples, crossing interpolated "
        "between steps.")
    n_val = results.dataset.get("num_train", 0)
    lines += _target_lines(
        analysis.secondary, "Secondary target",
        "Resolution caveat: validation runs only at epoch ends, so the crossing is "
        "interpolated between two evaluations one epoch apart"
        + (f" ({n_val // results.batch_sizes[0]:,} steps at B = {results.batch_sizes[0]})"
           if n_val and results.batch_sizes else "")
        + "; a run already at the target at its first evaluation gives only an upper bound "
          "and is left out of the fit.")
    lines += ["### B_crit against the measured noise scale", ""]
    b_simple = analysis.b_simple
    if not b_simple.n:
        return lines + ["No gradient-noise records: B_simple is unavailable (run with "
                        "--noise-every epoch).", ""]
    per_b = "; ".join(f"{b}: {e.format('.0f')}" for b, e in
                      analysis.b_simple_by_batch_size.items() if e.n)
    lines += [f"B_simple = tr(Sigma) / |G|^2 averaged over training (each run's mean over its "
              f"{analysis.records_per_run} noise records, then over {b_simple.n} runs): "
              f"**{b_simple.format('.0f')}** (mean ± s.d. over runs; per batch size: {per_b}).",
              ""]
    early = analysis.b_simple_to_target
    if early.n:
        lines += [f"Averaged only over the records up to each run's crossing of the primary "
                  f"target (the part of training that the steps to target count; the noise "
                  f"scale grows as the loss falls): {early.format('.0f')} over {early.n} runs.",
                  ""]
    lines.append("The paper derives B_crit ≈ B_noise for SGD near a quadratic minimum, with "
                 "B_simple equal to B_noise when the Hessian is a multiple of the identity, and "
                 "finds B_simple a good predictor of the measured B_crit up to a factor of order "
                 "one. This sweep trains with Adam, whose per-parameter step sizes are outside "
                 "that derivation.")
    lines.append("")
    for target in (analysis.primary, analysis.secondary):
        fit = target.fit
        if fit is None or not fit.valid:
            lines.append(f"- {target.label}: no B_crit to compare"
                         + (f" ({target.note})" if target.note else "") + ".")
            continue
        ratio = fit.b_crit / b_simple.mean
        inside = ""
        if fit.b_crit_interval and fit.num_seeds >= 3:
            lo, hi = fit.b_crit_interval
            where = "inside" if lo <= b_simple.mean <= hi else "outside"
            inside = f" B_simple lies {where} the bootstrap interval of B_crit."
        lines.append(f"- {target.label}: B_crit = {critical._number(fit.b_crit)} ± "
                     f"{fit.b_crit_stderr:.2g} against B_simple = {b_simple.mean:.0f}: "
                     f"B_crit / B_simple = {ratio:.2g}." + inside)
    lines.append("")
    primary = analysis.primary.fit
    if primary is not None and primary.valid:
        ratio = primary.b_crit / b_simple.mean
        found = (f"with Adam, B_crit and B_simple agree within a factor of "
                 f"{max(ratio, 1 / ratio):.2g}." if 0.5 <= ratio <= 2 else
                 f"with Adam, B_crit is {ratio:.2g} times B_simple averaged over training: "
                 + ("the benefit of larger batches saturates well before the gradient noise "
                    "scale predicts." if ratio < 1 else "larger batches keep paying off "
                    "beyond the gradient noise scale."))
        if early.n:
            found += (f" Up to the target, B_crit / B_simple = "
                      f"{primary.b_crit / early.mean:.2g}.")
        lines += ["**Found (primary target):** " + found, ""]
    return lines


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
        f"{config.get('noise_schedule', '?')}; sharpness at the end of each run: "
        + (", ".join(f"{k} {v}" for k, v in m["sharpness"].items()) if m.get("sharpness")
           else "off"),
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
                 target_loss: float | None = None,
                 figures: Sequence[str | os.PathLike] = (), notes: Sequence[str] = (),
                 analysis: CriticalAnalysis | None = None) -> str:
    """The report as Markdown: provenance, notes, the summary table, definitions, the claims,
    then sharpness and the critical batch size.

    Args:
      results: a loaded sweep.
      target_accuracy: validation-accuracy target of claim 4 and of the critical batch size's
        secondary target (default `default_target_accuracy`).
      target_loss: training-loss target of the critical batch size (default
        `default_target_loss`).
      figures: figure files to list.
      notes: notes to print at the top.
      analysis: `critical_analysis(results, target_loss=..., target_accuracy=...)` when the
        caller has it already (it is computed otherwise).
    """
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
              "- **lambda_max**, **tr(H)**: the largest eigenvalue and the trace of the Hessian "
              "of the training loss at the final parameters (see *Sharp minima* below).",
              f"- **target** validation accuracy for claim 4: {target_text}.",
              f"- **significant**: a difference larger than {Z_SIGNIFICANT:g} standard errors "
              "(SE over seeds unless stated).", "",
              "## Claims", ""]
    lines += ["| # | claim | verdict |", "|---|---|---|"]
    lines += [f"| {c.number} | {c.statement} | **{c.verdict}** |" for c in claims] + [""]
    lines += [c.markdown() for c in claims]
    lines += sharpness_section(results, summary)
    if analysis is None:
        analysis = critical_analysis(results, target_loss=target_loss,
                                     target_accuracy=target_accuracy)
    lines += critical_section(results, analysis)
    if figures:
        lines += ["## Figures", ""] + [f"- `{f}`" for f in figures] + [""]
    return "\n".join(lines)


def write_report(results: SweepResults, out_dir: str | os.PathLike | None = None, *,
                 target_accuracy: float | None = None, target_loss: float | None = None,
                 figures: Sequence[str | os.PathLike] = (),
                 notes: Sequence[str] = (), analysis: CriticalAnalysis | None = None) -> str:
    """Write `report.md`, `summary.csv`, `summary.tex` and `critical.json` (targets, steps to
    them, fits and B_simple; `critical_record`) into `out_dir` (default: the sweep's).

    `analysis`: as in `build_report`.

    Returns:
      The Markdown report.
    """
    out_dir = pathlib.Path(out_dir) if out_dir is not None else results.path
    if analysis is None:
        analysis = critical_analysis(results, target_loss=target_loss,
                                     target_accuracy=target_accuracy)
    text = build_report(results, target_accuracy=target_accuracy, target_loss=target_loss,
                        figures=figures, notes=notes, analysis=analysis)
    target = target_accuracy if target_accuracy is not None else default_target_accuracy(results)
    summary = summarize(results, target)
    caption = (f"Final metrics per batch size on {results.dataset_label()}, mean $\\pm$ s.d. "
               "over seeds.")
    write_bytes_atomic(out_dir / "summary.csv", summary_csv(summary).encode())
    write_bytes_atomic(out_dir / "summary.tex", summary_latex(summary, caption).encode())
    write_bytes_atomic(out_dir / "critical.json",
                       (json.dumps(to_jsonable(critical_record(analysis)), indent=1,
                                   allow_nan=False) + "\n").encode())
    write_bytes_atomic(out_dir / "report.md", text.encode())
    return text
