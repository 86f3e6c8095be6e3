"""Every number of a sweep's report and figures, computed from its saved runs, as typed values.

`analyse(results)` reads a `batchjax.results.SweepResults` (a list of `batchjax.run.Run` and the
manifest) and returns an `Analysis`: per-run statistics, per-batch-size `Estimate`s, the test
and verdict of each claim of the original write-up, the sharpness and critical-batch-size
analyses, and the curves the figures draw. `batchjax.report` puts it into words and
`batchjax.plots` draws it; neither computes a statistic of its own. No JAX, no matplotlib.

Definitions:
* Uncertainty: every "mean ± s.d." is over seeds (sample s.d., ddof 1); intervals and tests
  are t-based (`batchjax.stats`): differences between batch sizes by Welch's t on the
  Welch-Satterthwaite df, slopes on n - 2 df, alpha = 0.05. Directional claims (1-4 and sharp
  minima: "smaller batches give MORE noise, ROUGHER curves, a SMALLER gap, FLATTER minima")
  are one-sided in the claimed direction, and refuted by the one-sided test the other way;
  "consistent with a slope of -1" is two-sided; claim 5 asks whether B = 32 is significantly
  worse than the best (one-sided). One seed gives no seed-to-seed spread: a claim that needs
  it is inconclusive.
* Generalisation gap, at the final parameters (both splits evaluated after training, not Keras'
  running epoch mean): loss gap = validation loss - training loss, accuracy gap = training
  accuracy - validation accuracy. Larger means worse generalisation in both.
* Roughness of a loss curve (`compute_roughness`): on the per-step training losses l_t of epochs
  2..E (all of them when E = 1), per epoch window, R = sd(l_{t+1} - l_t) / sqrt(2), skipping the
  partial last batch of each epoch; a run's R is the mean over its windows. The first difference
  removes the trend: it cancels any slowly varying trend, and over one step the trend's change
  is small next to the noise; for independent noise of s.d. s around a smooth trend, R
  estimates s. R is in loss units per optimizer step: what a linear-scale plot shows. At equal
  epochs a small batch size has reached a much lower loss, and fluctuations shrink with the
  loss itself, so R alone understates small batches' choppiness; the relative roughness
  R_rel = R / (mean loss of the window), per window, is level-free (what a log-scale plot
  shows). If the choppiness were only the sampling noise of a minibatch mean of per-example
  losses, R would fall as B^(-1/2) at a fixed loss level; the fitted log-log slopes (over
  runs) are compared with -1/2.
* Target validation accuracy (claim 4, unless given): the best accuracy every non-diverged run
  reaches at some epoch end, rounded down to 0.5 percentage points. Time to target counts
  training and validation seconds, not compilation; runs trained in one program share their
  epoch times.
* Sharp minima (Keskar et al. 2017): lambda_max and tr(H) of the training-loss Hessian at each
  run's end, smallest against largest batch size.
* Critical batch size (McCandlish et al. 2018, eq. 2.11; `batchjax.critical`): steps to a
  target per batch size and the fit of S(B) = S_min + E_min / B. Primary target: a training
  loss, read from the smoothed per-step losses; by default the lowest smoothed loss every
  non-diverged run reaches, rounded up to two significant digits. Secondary: the
  validation-accuracy target of claim 4 (epoch resolution; runs at the target at their first
  evaluation are upper bounds, left out of the fit). A fit needs >= 3 batch sizes at which every
  seed reached the target; B_crit is compared with B_simple averaged over training (each run's
  mean over its noise records, then the mean over runs).
* Critical batch size with the learning rate tuned per batch size (issue #15; `analyse_grid`,
  for a sweep with a learning-rate grid): steps to the sweep's fixed training-loss target for
  every (B, rate, seed), each run reached or not with the reason (diverged, hopeless, budget,
  missing: counted, never dropped). The best rate of B has the fewest mean steps among the
  rates where every seed reached the target (`choose_best_rate`; exact ties to the smaller
  rate); at an edge of B's final grid it is unreliable (out of the rate fits, kept in S(B)).
  S(B), E(B): mean over seeds at the best rate, t intervals. Eq. 2.11 is fitted to S(B); its
  bootstrap resamples seeds within each batch size and re-selects the best rate in every draw.
  The best rate against B: eq. 2.7 (`critical.fit_optimal_learning_rate`, t intervals on n - 2
  df) and a power law (slope of log2 rate on log2 B, t interval). B_simple along the best runs:
  each run's time average from step 0 to its crossing (`run_b_simple_average`), the mean over
  seeds, then over batch sizes (t interval on their number - 1 df); B_simple / B_crit by a t
  test on the logs (delta method, Satterthwaite df), two-sided.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from batchjax import critical, stats
from batchjax.errors import BatchjaxError
from batchjax.results import SweepResults, run_name
from batchjax.run import Run
from batchjax.stats import Estimate, Slope, TTest

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
MODERATE_BATCH_SIZE = 32
STEP_LOSS_SMOOTHING = 8  # the figures' moving average spans 1/8 epoch of examples
NOISE_QUANTITIES = ("grad_sq_norm", "trace_cov", "noise_scale")

# --------------------------------------------------------------------------------------------
# Per run


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
    """The numbers tabulated for one run; NaN where a diverged run has none."""
    nan = float("nan")
    h = run.history
    ok = not run.diverged and len(h["epoch"]) > 0
    final_train = run.final_train or {}
    train_loss = final_train.get("loss", h["train_loss"][-1] if ok else nan)
    train_acc = final_train.get("accuracy", h["train_accuracy"][-1] if ok else nan)
    val_loss = float(h["val_loss"][-1]) if ok else nan
    val_acc = float(h["val_accuracy"][-1]) if ok else nan
    records = [r for r in run.noise if r.get("noise_scale") is not None]
    out = {
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
        out[key] = float(value) if value is not None else nan
    if target_accuracy is not None and ok:
        reached = np.nonzero(h["val_accuracy"] >= target_accuracy)[0]
        if len(reached):
            e = int(reached[0])
            out["epochs_to_target"] = float(h["epoch"][e])
            out["steps_to_target"] = float(h["steps"][e])
            out["seconds_to_target"] = float(np.sum(epoch_seconds(run)[: e + 1]))
    for key in ("epochs_to_target", "steps_to_target", "seconds_to_target"):
        out.setdefault(key, nan)
    return out


# --------------------------------------------------------------------------------------------
# Per batch size


@dataclasses.dataclass
class BatchSummary:
    """The runs of one batch size: counts and an `Estimate` of every `run_stats` quantity.

    `summary[key]` is `summary.stats[key]`.
    """

    batch_size: int
    runs: int
    diverged: int
    seeds: list[int]
    stats: dict[str, Estimate]

    def __getitem__(self, key: str) -> Estimate:
        return self.stats[key]


def summarize(results: SweepResults, target_accuracy: float | None = None
              ) -> dict[int, BatchSummary]:
    """Per batch size (ascending): run counts and an `Estimate` of every `run_stats` quantity."""
    out = {}
    for b, runs in results.by_batch_size().items():
        per_run = [run_stats(r, target_accuracy) for r in runs]
        out[b] = BatchSummary(b, len(runs), sum(r.diverged for r in runs), [r.seed for r in runs],
                              {k: Estimate.of([s[k] for s in per_run]) for k in per_run[0]})
    return out


def _group_key(run: Run) -> tuple:
    """Runs trained in one program share their epoch times; a run with no group is its own."""
    return tuple(run.trained_with) or (run_name(run.batch_size, run.seed),)


def epoch_time_estimate(results: SweepResults, batch_size: int) -> Estimate:
    """Seconds per epoch at a batch size, spread over epochs (one series per training group)."""
    times = {}
    for r in results.by_batch_size().get(batch_size, []):
        if not r.diverged:
            times.setdefault(_group_key(r), epoch_seconds(r))
    return Estimate.of(np.concatenate(list(times.values())) if times else [])


# --------------------------------------------------------------------------------------------
# Targets


def default_target_accuracy(results: SweepResults) -> float | None:
    """The best validation accuracy every non-diverged run reaches, floored to 0.005."""
    best = [np.max(r.history["val_accuracy"]) for r in results.runs
            if not r.diverged and len(r.history["val_accuracy"])]
    if not best:
        return None
    return math.floor(min(best) * 200 + 1e-9) / 200


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


# --------------------------------------------------------------------------------------------
# Gradient noise (claim 1, figures 4 and 5)


def noise_moments(results: SweepResults, max_moments: int = 4) -> list[float]:
    """Moments of training (in epochs) at which noise measurements are compared across runs:
    initialisation, after the first epoch, halfway and at the end, where the records allow."""
    epochs = max(r.config.epochs for r in results.runs)
    targets = sorted({0.0, 1.0, float(round(epochs / 2)), float(epochs)})
    return [t for t in targets if t <= epochs][:max_moments]


def moment_name(epoch: float) -> str:
    """"initialisation" or "after epoch 3"."""
    return "initialisation" if epoch == 0 else f"after epoch {epoch:g}"


def record_at(run: Run, epoch: float, tolerance: float = 0.5) -> dict | None:
    """The noise record of `run` nearest to `epoch` (in epochs of examples), within `tolerance`."""
    n = int(run.dataset.get("num_train", 0)) or 1
    best, best_d = None, tolerance + 1e-9
    for rec in run.noise:
        d = abs(rec.get("examples_seen", 0) / n - epoch)
        if d <= best_d:
            best, best_d = rec, d
    return best


def trace_from_record(rec: dict) -> tuple[float, int] | None:
    """tr(Sigma_pop) and the probe size N, read back from a record's minibatch variances.

    Inverting var(B) = tr / B * (N - B) / (N - 1) keeps the curve consistent with the values
    the noise module computed, whatever divisor its tr(Sigma) uses.
    """
    n = int(rec.get("probe_size") or 0)
    for key, v in (rec.get("minibatch_variance") or {}).items():
        b = int(key)
        if v is not None and n > b:
            return float(v) * b * (n - 1) / (n - b), n
    if rec.get("trace_cov") is not None and n > 1:
        return float(rec["trace_cov"]), n
    return None


def minibatch_variance_curve(trace: float, num_examples: int, batch_sizes: np.ndarray
                             ) -> np.ndarray:
    """tr(Sigma) / B * (N - B) / (N - 1): sampling B of N examples without replacement."""
    b = np.asarray(batch_sizes, float)
    return trace / b * (num_examples - b) / (num_examples - 1)


@dataclasses.dataclass
class NoisePoint:
    """One run's empirical minibatch gradient variance E|G_B - G|^2 at its own batch size."""

    batch_size: int
    seed: int
    mean: float
    stderr: float
    analytic: float | None


@dataclasses.dataclass
class VarianceAtBatchSize:
    """Figure 4 at one batch size and moment: the analytic curve's tr(Sigma) (mean over runs)
    and the empirical point (mean over runs, SE combined over them)."""

    batch_size: int
    trace: float | None
    probe_size: int | None
    empirical_batch_size: int | None
    empirical_mean: float | None
    empirical_se: float | None


@dataclasses.dataclass
class NoiseMoment:
    """Gradient-noise measurements of every run at one moment of training, and their fit.

    Attributes:
      epoch: the moment (epochs of examples seen).
      points: the empirical variances with a positive mean.
      batch_sizes: the batch sizes among `points`.
      fit: weighted least squares of log2 variance on log2 B (`stats.fit_slope`, error bars
        from each point's SE), or None (fewer than two batch sizes, or SEs missing).
      probe_size: N of the finite-population correction, or None.
      fpc_slope: the log-log slope of (N - B) / (B (N - 1)) over `batch_sizes` (NaN without N):
        what 1/B scaling with the correction predicts.
      within_3se, compared: runs whose empirical value is within 3 SE of the analytic one.
      by_batch_size: what figure 4 draws.
    """

    epoch: float
    points: list[NoisePoint]
    batch_sizes: list[int]
    fit: Slope | None
    probe_size: int | None
    fpc_slope: float
    within_3se: int
    compared: int
    by_batch_size: dict[int, VarianceAtBatchSize]

    @property
    def name(self) -> str:
        return moment_name(self.epoch)

    @property
    def stderr_missing(self) -> bool:
        return len(self.batch_sizes) >= 2 and self.fit is None

    def tests(self) -> tuple[TTest, TTest, TTest]:
        """The slope against 0, against -1 (1/B) and against `fpc_slope`."""
        return self.fit.test(0.0), self.fit.test(-1.0), self.fit.test(self.fpc_slope)


def noise_moment(results: SweepResults, epoch: float) -> NoiseMoment:
    """The `NoiseMoment` of every run's record nearest to `epoch`."""
    points = []
    for r in results.runs:
        emp = (record_at(r, epoch) or {}).get("empirical") or {}
        mean, stderr = emp.get("mean"), emp.get("stderr")
        if mean is None or not (np.isfinite(mean) and mean > 0):
            continue
        points.append(NoisePoint(int(emp.get("batch_size", r.batch_size)), r.seed, float(mean),
                                 float(stderr) if stderr is not None else float("nan"),
                                 emp.get("analytic")))
    bs = sorted({p.batch_size for p in points})
    probe_size = None
    for r in results.runs:
        rec = record_at(r, epoch)
        if rec and rec.get("probe_size"):
            probe_size = int(rec["probe_size"])
    fit, fpc_slope = None, float("nan")
    if len(bs) >= 2:
        x = np.log2([p.batch_size for p in points])
        y = np.log2([p.mean for p in points])
        sy = np.asarray([p.stderr / (p.mean * math.log(2)) for p in points])
        if np.all(np.isfinite(sy) & (sy > 0)):
            fit = stats.fit_slope(x, y, sy)
        if probe_size:
            b_arr = np.asarray(bs, float)
            fpc = np.log2((probe_size - b_arr) / (b_arr * (probe_size - 1)))
            fpc_slope = float(np.polyfit(np.log2(b_arr), fpc, 1)[0])
    agree = [abs(p.mean - p.analytic) / p.stderr for p in points
             if p.analytic is not None and np.isfinite(p.stderr) and p.stderr > 0]
    return NoiseMoment(epoch, points, bs, fit, probe_size, fpc_slope,
                       sum(a <= 3 for a in agree), len(agree),
                       _variance_by_batch_size(results, epoch))


def _variance_by_batch_size(results: SweepResults, epoch: float
                            ) -> dict[int, VarianceAtBatchSize]:
    out = {}
    for b, runs in results.by_batch_size().items():
        traces, emp, emp_se, emp_b, n_probe = [], [], [], None, None
        for r in [r for r in runs if not r.diverged] or runs:
            rec = record_at(r, epoch)
            if rec is None:
                continue
            t = trace_from_record(rec)
            if t is not None:
                traces.append(t[0])
                n_probe = t[1]
            e = rec.get("empirical") or {}
            if e.get("mean") is not None:
                emp.append(float(e["mean"]))
                emp_se.append(float(e.get("stderr") or 0.0))
                emp_b = int(e.get("batch_size", b))
        out[b] = VarianceAtBatchSize(
            b, float(np.mean(traces)) if traces else None, n_probe, emp_b,
            float(np.mean(emp)) if emp else None,
            math.sqrt(np.sum(np.square(emp_se))) / len(emp_se) if emp else None)
    return out


@dataclasses.dataclass
class Band:
    """A mean curve over seeds with its spread: mean ± 1 s.d., or with `geometric`, the
    geometric mean ×/÷ one geometric s.d. (for positive quantities spanning decades)."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int
    geometric: bool = False


def band(x: np.ndarray, arrays: Sequence[np.ndarray], *, geometric: bool = False) -> Band:
    """The `Band` of equally long series `arrays` (one per seed) over `x`."""
    if geometric:
        arrays = [np.log(np.maximum(np.asarray(a, float), np.finfo(float).tiny)) for a in arrays]
    stack = np.vstack(arrays)
    mean = stack.mean(axis=0)
    sd = stack.std(axis=0, ddof=1) if len(arrays) > 1 else np.zeros(stack.shape[1])
    if geometric:
        return Band(np.asarray(x), np.exp(mean), np.exp(mean - sd), np.exp(mean + sd),
                    len(arrays), True)
    return Band(np.asarray(x), mean, mean - sd, mean + sd, len(arrays))


def noise_series(results: SweepResults, quantity: str) -> dict[int, Band | None]:
    """Per batch size, the geometric band over seeds of `quantity` (a noise-record key) against
    epochs of examples; None where the seeds' records do not line up."""
    out = {}
    for b, runs in results.by_batch_size().items():
        series = []
        for r in runs:
            if r.diverged:
                continue
            n = int(r.dataset.get("num_train", 0)) or 1
            recs = [rec for rec in r.noise if rec.get(quantity) is not None]
            if recs:
                series.append((np.array([rec["examples_seen"] / n for rec in recs]),
                               np.array([float(rec[quantity]) for rec in recs])))
        lengths = {len(s[0]) for s in series}
        out[b] = (band(series[0][0], [s[1] for s in series], geometric=True)
                  if series and len(lengths) == 1 else None)
    return out


# --------------------------------------------------------------------------------------------
# Per-step losses (figure 2)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` points ('valid' part: len - window + 1 values)."""
    window = max(1, min(int(window), len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def smoothing_window(run: Run, examples: int | None = None) -> int:
    """Steps covering `examples` examples (default 1/8 of an epoch), so all B smooth alike."""
    n = int(run.dataset.get("num_train", 0)) or len(run.step_losses) * run.batch_size
    examples = examples or max(1, n // STEP_LOSS_SMOOTHING)
    return max(1, int(round(examples / run.batch_size)))


@dataclasses.dataclass
class StepLossCurve:
    """The per-step training loss of one batch size, smoothed.

    Attributes:
      batch_size: B.
      window: steps of the moving average (`smoothing_window`: 1/8 epoch of examples).
      smoothed: geometric band over non-diverged seeds of the moving averages, against examples
        seen; None when no seed is left, the seeds differ in length, or the run is shorter
        than the window.
    """

    batch_size: int
    window: int | None
    smoothed: Band | None


def step_loss_curves(results: SweepResults) -> dict[int, StepLossCurve]:
    """Per batch size, the smoothed per-step loss that figure 2 draws."""
    out = {}
    for b, runs in results.by_batch_size().items():
        ok = [r for r in runs if not r.diverged]
        if not ok:
            out[b] = StepLossCurve(b, None, None)
            continue
        w = smoothing_window(ok[0])
        lengths = {len(r.step_losses) for r in ok}
        smoothed = None
        if len(lengths) == 1 and w < min(lengths):
            x = moving_average(ok[0].examples_seen.astype(float), w)
            smoothed = band(x, [moving_average(r.step_losses, w) for r in ok], geometric=True)
        out[b] = StepLossCurve(b, w, smoothed)
    return out


# --------------------------------------------------------------------------------------------
# Claims


@dataclasses.dataclass
class Claim:
    """A claim of the original write-up and its verdict (`SUPPORTED`, `NOT_SUPPORTED`,
    `INCONCLUSIVE`); subclasses hold the tests and numbers behind it."""

    number: int
    statement: str
    verdict: str


@dataclasses.dataclass
class NoiseClaim(Claim):
    """Claim 1. `moments`: those with >= 2 batch sizes; the verdict is the slope test (< 0) at
    `decided_at`, the first fitted one (initialisation: every batch size at the same
    parameters), or None. `measured`: whether there are noise records at all."""

    measured: bool
    moments: list[NoiseMoment]
    decided_at: NoiseMoment | None


def claim_noise(results: SweepResults, moments: Sequence[NoiseMoment]) -> NoiseClaim:
    statement = "smaller batches carry more gradient noise"
    if not results.has_noise:
        return NoiseClaim(1, statement, INCONCLUSIVE, False, [], None)
    usable = [m for m in moments if len(m.batch_sizes) >= 2]
    fitted = [m for m in usable if m.fit is not None]
    if not fitted:
        return NoiseClaim(1, statement, INCONCLUSIVE, True, usable, None)
    decided = fitted[0]
    direction = decided.fit.test(0.0).direction()
    verdict = {-1: SUPPORTED, 1: NOT_SUPPORTED}.get(direction, INCONCLUSIVE)
    return NoiseClaim(1, statement, verdict, True, usable, decided)


@dataclasses.dataclass
class RoughnessMeasure:
    """One roughness measure ("roughness": R, or "roughness_relative": R_rel) across B.

    Attributes:
      key: the `run_stats` key.
      test: Welch's t of the smallest minus the largest batch size.
      slope: log2 of each run's value against log2 B, over runs (t interval on n - 2 df), or
        None.
      monotone: whether the means fall with every step up in B.
      outcome: "down" (smallest significantly rougher and monotone), "up" (smallest
        significantly smoother), "flat" or "unknown" (no SE).
      ratio: mean at the smallest over the mean at the largest batch size.
    """

    key: str
    test: TTest
    slope: Slope | None
    monotone: bool
    outcome: str
    ratio: float


@dataclasses.dataclass
class RoughnessClaim(Claim):
    """Claim 2: supported when both measures are "down", refuted when both are "up"."""

    batch_sizes: list[int]
    measures: list[RoughnessMeasure]
    seeds: int


def _log_slope_over_runs(points: Sequence[tuple[float, float]]) -> Slope | None:
    pts = [(b, v) for b, v in points if np.isfinite(v) and v > 0]
    if len(pts) < 3:
        return None
    x, y = np.log2(np.asarray(pts, float)).T
    return stats.fit_slope(x, y)


def claim_roughness(results: SweepResults, summary: dict[int, BatchSummary],
                    per_run: Sequence[dict[str, float]]) -> RoughnessClaim:
    statement = "smaller batches give choppier loss curves"
    bs = list(summary)
    if len(bs) < 2:
        return RoughnessClaim(2, statement, INCONCLUSIVE, bs, [],
                              summary[bs[0]]["roughness"].n if bs else 0)
    measures = []
    for key in ("roughness", "roughness_relative"):
        means = [summary[b][key].mean for b in bs]
        test = stats.welch(summary[bs[0]][key], summary[bs[-1]][key])
        slope = _log_slope_over_runs([(r.batch_size, s[key]) for r, s in
                                      zip(results.runs, per_run)])
        monotone = all(np.isfinite(means)) and all(np.diff(means) < 0)
        direction = test.direction()
        outcome = ("unknown" if not test.known else "down" if direction > 0 and monotone
                   else "up" if direction < 0 else "flat")
        measures.append(RoughnessMeasure(key, test, slope, monotone, outcome,
                                         means[0] / means[-1] if means[-1] else float("nan")))
    outcomes = [m.outcome for m in measures]
    verdict = (INCONCLUSIVE if "unknown" in outcomes else SUPPORTED if outcomes == ["down"] * 2
               else NOT_SUPPORTED if outcomes == ["up"] * 2 else INCONCLUSIVE)
    return RoughnessClaim(2, statement, verdict, bs, measures, summary[bs[0]]["roughness"].n)


@dataclasses.dataclass
class GeneralisationClaim(Claim):
    """Claim 3: Welch's t of the loss gap, smallest minus largest batch size (< 0 supports, > 0
    refutes), and of the validation accuracy (said alongside); None with one batch size."""

    batch_sizes: list[int]
    gap: TTest | None
    accuracy: TTest | None
    seeds: int


def claim_generalisation(summary: dict[int, BatchSummary]) -> GeneralisationClaim:
    statement = "smaller batches can generalise better"
    bs = list(summary)
    seeds = summary[bs[0]]["gap_loss"].n if bs else 0
    if len(bs) < 2:
        return GeneralisationClaim(3, statement, INCONCLUSIVE, bs, None, None, seeds)
    b0, b1 = bs[0], bs[-1]
    gap = stats.welch(summary[b0]["gap_loss"], summary[b1]["gap_loss"])
    accuracy = stats.welch(summary[b0]["val_accuracy"], summary[b1]["val_accuracy"])
    verdict = {-1: SUPPORTED, 1: NOT_SUPPORTED}.get(gap.direction(), INCONCLUSIVE)
    return GeneralisationClaim(3, statement, verdict, bs, gap, accuracy, seeds)


def time_to_target_components(results: SweepResults, summary: dict[int, BatchSummary],
                              batch_size: int) -> list[tuple[float, float]] | None:
    """The variance of the mean seconds to target at a batch size, as (variance, df) parts:
    the seed-to-seed spread (SE^2 on n - 1 df) and the epoch-time jitter of the e epochs summed
    (e sd_epoch^2 on its df), which seeds trained together share, so that it does not average
    down over seeds. None with fewer than two seeds."""
    est = summary[batch_size]["seconds_to_target"]
    if est.n < 2:
        return None
    parts = [(est.se ** 2, est.n - 1.0)]
    jitter = epoch_time_estimate(results, batch_size)
    epochs = summary[batch_size]["epochs_to_target"].mean
    if jitter.n > 1 and np.isfinite(epochs):
        parts.append((epochs * jitter.sd ** 2, jitter.n - 1.0))
    return parts


def _time_to_target_test(results, summary, a: int, b: int) -> TTest:
    """The t test of mean seconds to target at a minus at b (`time_to_target_components`)."""
    diff = summary[a]["seconds_to_target"].mean - summary[b]["seconds_to_target"].mean
    parts_a = time_to_target_components(results, summary, a)
    parts_b = time_to_target_components(results, summary, b)
    if parts_a is None or parts_b is None:
        return stats.t_test(diff, float("nan"), float("nan"))
    return stats.combined_test(diff, parts_a + parts_b)


@dataclasses.dataclass
class SpeedClaim(Claim):
    """Claim 4 as the trade-off it describes: epochs take longer at the smallest batch size
    (`epoch_time_test` > 0) and yet it reaches the target sooner (`time_to_target_test` < 0).

    Attributes:
      target: the validation-accuracy target, or None.
      batch_sizes: the sweep's.
      epoch_time: seconds per epoch per batch size, spread over epochs.
      epoch_time_test: Welch's t of the epoch time, smallest minus largest batch size.
      time_to_target_test: t test of the mean seconds to target, smallest minus largest, with
        seed spread and epoch-time jitter combined (Satterthwaite df).
      fastest: the batch size with the fewest mean seconds to target, or None.
    """

    target: float | None
    batch_sizes: list[int]
    epoch_time: dict[int, Estimate]
    epoch_time_test: TTest | None
    time_to_target_test: TTest | None
    fastest: int | None


def claim_speed(results: SweepResults, summary: dict[int, BatchSummary],
                target: float | None) -> SpeedClaim:
    statement = ("larger batches progress faster per epoch, smaller ones can reach a good "
                 "solution faster in time")
    bs = list(summary)
    epoch_time = {b: epoch_time_estimate(results, b) for b in bs}
    times = {b: summary[b]["seconds_to_target"].mean for b in bs
             if np.isfinite(summary[b]["seconds_to_target"].mean)}
    fastest = min(times, key=times.get) if times else None
    if len(bs) < 2 or target is None:
        return SpeedClaim(4, statement, INCONCLUSIVE, target, bs, epoch_time, None, None,
                          fastest)
    b0, b1 = bs[0], bs[-1]
    epoch_test = stats.welch(epoch_time[b0], epoch_time[b1])
    target_test = _time_to_target_test(results, summary, b0, b1)
    if not (epoch_test.known and target_test.known):
        verdict = INCONCLUSIVE
    elif epoch_test.direction() > 0 and target_test.direction() < 0:
        verdict = SUPPORTED
    elif epoch_test.direction() < 0 or target_test.direction() > 0:
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    return SpeedClaim(4, statement, verdict, target, bs, epoch_time, epoch_test, target_test,
                      fastest)


@dataclasses.dataclass
class BalanceCheck:
    """One comparison of claim 5: B_mid against the best batch size by `key` (or, for
    "roughness", against the smallest).

    Attributes:
      key: "val_accuracy", "seconds_to_target" or "roughness".
      against: the batch size compared with.
      test: the t test of B_mid minus `against`, or None when B_mid is the best.
      outcome: "best", "ok" (not significantly worse; for roughness: significantly smoother),
        "failed" (significantly worse; rougher) or "unknown".
    """

    key: str
    against: int | None
    test: TTest | None
    outcome: str


@dataclasses.dataclass
class BalanceClaim(Claim):
    """Claim 5, judged from the others' quantities: B_mid is not significantly less accurate
    nor slower to the target than the best batch size, and significantly smoother than the
    smallest."""

    batch_size: int
    prior: list[tuple[int, str]]
    b_simple_end: dict[int, Estimate]
    checks: list[BalanceCheck]
    in_sweep: bool


def claim_balance(results: SweepResults, summary: dict[int, BatchSummary],
                  claims: Sequence[Claim]) -> BalanceClaim:
    b_mid = MODERATE_BATCH_SIZE
    statement = f"a moderate batch size ({b_mid}) strikes the balance"
    bs = list(summary)
    prior = [(c.number, c.verdict) for c in claims]
    b_simple = {b: summary[b]["b_simple_end"] for b in bs
                if np.isfinite(summary[b]["b_simple_end"].mean)}
    if b_mid not in summary or len(bs) < 2:
        return BalanceClaim(5, statement, INCONCLUSIVE, b_mid, prior, b_simple, [], False)
    checks = []
    for key, better, worse in (("val_accuracy", max, -1), ("seconds_to_target", min, 1)):
        means = {b: summary[b][key].mean for b in bs if np.isfinite(summary[b][key].mean)}
        if b_mid not in means:
            checks.append(BalanceCheck(key, None, None, "unknown"))
            continue
        best = better(means, key=means.get)
        if best == b_mid:
            checks.append(BalanceCheck(key, best, None, "best"))
            continue
        test = (stats.welch(summary[b_mid][key], summary[best][key]) if key == "val_accuracy"
                else _time_to_target_test(results, summary, b_mid, best))
        outcome = ("unknown" if not test.known else
                   "failed" if test.direction() == worse else "ok")
        checks.append(BalanceCheck(key, best, test, outcome))
    if bs[0] != b_mid:
        test = stats.welch(summary[b_mid]["roughness"], summary[bs[0]]["roughness"])
        outcome = {1: "failed", -1: "ok"}.get(test.direction(), "unknown")
        checks.append(BalanceCheck("roughness", bs[0], test, outcome))
    outcomes = [c.outcome for c in checks]
    verdict = (NOT_SUPPORTED if "failed" in outcomes else INCONCLUSIVE if "unknown" in outcomes
               else SUPPORTED)
    return BalanceClaim(5, statement, verdict, b_mid, prior, b_simple, checks, True)


# --------------------------------------------------------------------------------------------
# Beyond the original: sharpness


@dataclasses.dataclass
class SharpnessMeasure:
    """lambda_max or tr(H) ("hessian_trace") across batch sizes.

    Attributes:
      key: the `run_stats` key.
      test: Welch's t, smallest minus largest batch size (None with one batch size).
      slope: log2 value against log2 B over runs, or None (fewer than 3 runs).
      points: runs in the slope.
      outcome: "flatter" (smaller at the smallest B, significantly), "sharper", "same" or
        "unknown".
    """

    key: str
    test: TTest | None
    slope: Slope | None
    points: int
    outcome: str


@dataclasses.dataclass
class SharpnessAnalysis:
    """The "sharp minima" claim (Keskar et al. 2017): smaller batches end at flatter points.

    Attributes:
      measured: whether any run has sharpness measurements.
      verdict: supported when both measures are "flatter", refuted when both are "sharper".
      batch_sizes: the sweep's.
      probe_examples, hutchinson_samples, tol: the measurement's settings.
      measures: lambda_max and tr(H).
      correlation, correlation_runs: Pearson r of log lambda_max with the loss gap over runs
        (NaN with fewer than 3 runs or no spread).
      negative, runs, median_negative_ratio: runs with lambda_min < 0 among the measured, and
        the median |lambda_min| / lambda_max among those.
      unconverged: runs where Lanczos did not reach its tolerance.
      lambda_ratio: mean lambda_max at the largest over the smallest batch size.
      train_loss: mean final training loss per batch size (the confound).
    """

    measured: bool
    verdict: str
    batch_sizes: list[int]
    probe_examples: int | None = None
    hutchinson_samples: int | None = None
    tol: float | None = None
    measures: list[SharpnessMeasure] = dataclasses.field(default_factory=list)
    correlation: float = float("nan")
    correlation_runs: int = 0
    negative: int = 0
    runs: int = 0
    median_negative_ratio: float = float("nan")
    unconverged: int = 0
    lambda_ratio: float = float("nan")
    train_loss: dict[int, float] = dataclasses.field(default_factory=dict)


def sharpness_analysis(results: SweepResults, summary: dict[int, BatchSummary],
                       per_run: Sequence[dict[str, float]]) -> SharpnessAnalysis:
    bs = list(summary)
    if not results.has_sharpness:
        return SharpnessAnalysis(False, INCONCLUSIVE, bs)
    settings = results.manifest.get("sharpness") or {}
    records = [r.sharpness for r in results.runs if r.sharpness]
    out = SharpnessAnalysis(
        True, INCONCLUSIVE, bs, probe_examples=records[0].get("num_examples"),
        hutchinson_samples=records[0].get("hutchinson_samples",
                                          settings.get("hutchinson_samples")),
        tol=settings.get("tol"),
        train_loss={b: summary[b]["train_loss"].mean for b in bs})
    measured = [(r, s) for r, s in zip(results.runs, per_run) if r.sharpness and not r.diverged]
    for key, field in (("lambda_max", "lambda_max"), ("hessian_trace", "trace")):
        pts = [(r.batch_size, r.sharpness[field]) for r, _ in measured]
        pts = [(b, v) for b, v in pts if v is not None and np.isfinite(v) and v > 0]
        slope = stats.fit_slope(*np.log2(np.asarray(pts, float)).T) if len(pts) >= 3 else None
        if len(bs) < 2:
            out.measures.append(SharpnessMeasure(key, None, slope, len(pts), "unknown"))
            continue
        test = stats.welch(summary[bs[0]][key], summary[bs[-1]][key])
        outcome = ("unknown" if not test.known else
                   {-1: "flatter", 1: "sharper"}.get(test.direction(), "same"))
        out.measures.append(SharpnessMeasure(key, test, slope, len(pts), outcome))
    gap_pts = [(math.log(r.sharpness["lambda_max"]), s["gap_loss"]) for r, s in measured
               if (r.sharpness.get("lambda_max") or 0) > 0]
    gap_pts = [p for p in gap_pts if np.isfinite(p[1])]
    if len(gap_pts) >= 3 and np.ptp([p[0] for p in gap_pts]) > 0 \
            and np.ptp([p[1] for p in gap_pts]) > 0:
        out.correlation = float(np.corrcoef(np.asarray(gap_pts).T)[0, 1])
        out.correlation_runs = len(gap_pts)
    runs = [r for r, _ in measured]
    negative = [r for r in runs if r.sharpness.get("lambda_min") is not None
                and r.sharpness["lambda_min"] < 0]
    # The smallest Ritz value bounds the smallest eigenvalue from above (Cauchy interlacing),
    # so a negative one proves a direction of negative curvature; its size says how much.
    ratios = [abs(r.sharpness["lambda_min"]) / r.sharpness["lambda_max"] for r in negative
              if r.sharpness["lambda_max"] > 0]
    out.negative, out.runs = len(negative), len(runs)
    out.median_negative_ratio = float(np.median(ratios)) if ratios else float("nan")
    out.unconverged = sum(not r.sharpness.get("converged", True) for r in runs)
    outcomes = [m.outcome for m in out.measures]
    if len(bs) >= 2 and "unknown" not in outcomes:
        out.verdict = (SUPPORTED if outcomes == ["flatter"] * 2 else
                       NOT_SUPPORTED if outcomes == ["sharper"] * 2 else INCONCLUSIVE)
        out.lambda_ratio = summary[bs[-1]]["lambda_max"].mean / summary[bs[0]]["lambda_max"].mean
    return out


# --------------------------------------------------------------------------------------------
# Beyond the original: the critical batch size


@dataclasses.dataclass
class TargetAnalysis:
    """Steps to one target per batch size and seed, and the fit of eq. 2.11 to them.

    Attributes:
      kind: "train_loss" or "val_accuracy".
      target: the target value, or None when none could be chosen.
      given: whether the caller gave the target (else it was chosen by the default rule).
      batch_sizes, seeds: the table's axes.
      steps, examples: [num_B, num_seeds], NaN where not reached (or the run is missing).
      upper_bound: [num_B, num_seeds], reached at the first measurement, so steps are only an
        upper bound (left out of the fit).
      fit: the `critical.CriticalFit`, or None.
      regimes: `critical.regimes(fit)` of a valid fit, or None.
      note: why there is no fit, or None.
    """

    kind: str
    target: float | None
    given: bool
    batch_sizes: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray
    examples: np.ndarray
    upper_bound: np.ndarray
    fit: critical.CriticalFit | None = None
    regimes: critical.Regimes | None = None
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

    @property
    def fit_df(self) -> int:
        """Residual degrees of freedom of the fit: batch sizes fitted - 2 (0 without a fit)."""
        return len(self.fit.batch_sizes) - 2 if self.fit is not None else 0

    @property
    def b_crit_t_interval(self) -> tuple[float, float] | None:
        """The 95% t interval of B_crit on `fit_df` df, taken on log B_crit (SE of the log by
        the delta method, SE / B_crit), so that it stays positive like the ratio E_min / S_min:
        B_crit x/÷ exp(t_{0.975, fit_df} SE / B_crit). None without a valid fit or residual df.
        """
        fit = self.fit
        if fit is None or not fit.valid or self.fit_df < 1 or not np.isfinite(fit.b_crit_stderr):
            return None
        half = stats.t_quantile(0.975, self.fit_df) * fit.b_crit_stderr / fit.b_crit
        return fit.b_crit * math.exp(-half), fit.b_crit * math.exp(half)

    def by_batch_size(self) -> list[tuple[int, Estimate, Estimate, int, int]]:
        """Per batch size: (B, steps Estimate, examples Estimate, seeds reached, upper bounds)."""
        return [(int(b), Estimate.of(self.steps[i]), Estimate.of(self.examples[i]),
                 int(np.isfinite(self.steps[i]).sum()), int(self.upper_bound[i].sum()))
                for i, b in enumerate(self.batch_sizes)]


def analyse_target(results: SweepResults, kind: str, target: float | None,
                   given: bool) -> TargetAnalysis:
    """Steps to `target` for every run of the sweep and, with >= 3 batch sizes, the fit."""
    empty = np.zeros((0, 0))
    if target is None:
        return TargetAnalysis(kind, None, given, np.zeros(0, int), np.zeros(0, int), empty,
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
    out = TargetAnalysis(kind, target, given, batch_sizes, seeds, steps, examples, upper)
    fit_steps = out.fit_steps
    full = np.isfinite(fit_steps).all(axis=1)
    if full.sum() < 3:
        reached = np.isfinite(steps).all(axis=1)
        out.note = (f"only {int(full.sum())} of {len(batch_sizes)} batch sizes reached "
                    f"{out.label} with every seed"
                    + (f" ({int(reached.sum() - full.sum())} more only "
                       + ("at their first evaluation, an upper bound)"
                          if kind == "val_accuracy" else "at step 0 of the smoothed loss)")
                       if reached.sum() > full.sum() else "")
                    + "; the fit of eq. 2.11 needs at least 3 (more batch sizes, e.g. "
                    "--preset critical, or more epochs, or another target)")
        return out
    try:
        out.fit = critical.fit_critical_batch(batch_sizes, fit_steps,
                                              num_bootstrap=1000 if len(seeds) > 1 else 0)
    except BatchjaxError as err:
        out.note = str(err)
        return out
    if out.fit.valid:
        out.regimes = critical.regimes(out.fit)
    return out


def run_b_simple(run: Run, until_step: float | None = None) -> float:
    """A run's B_simple averaged over training: the mean over its noise records (those at or
    before `until_step`, when given)."""
    values = [float(rec["noise_scale"]) for rec in run.noise
              if rec.get("noise_scale") is not None and np.isfinite(rec["noise_scale"])
              and (until_step is None or rec.get("step", 0) <= until_step)]
    return float(np.mean(values)) if values else float("nan")


@dataclasses.dataclass
class CriticalAnalysis:
    """The critical-batch-size analysis of a sweep (see `critical_analysis`).

    Attributes:
      primary: steps to the training-loss target and their fit.
      secondary: steps to the validation-accuracy target and their fit.
      b_simple: B_simple averaged over training, over non-diverged runs.
      b_simple_by_batch_size: the same per batch size.
      records_per_run: the most noise records of a run.
      b_simple_to_target: over the records up to each run's crossing of the primary target.
    """

    primary: TargetAnalysis
    secondary: TargetAnalysis
    b_simple: Estimate
    b_simple_by_batch_size: dict[int, Estimate]
    records_per_run: int
    b_simple_to_target: Estimate

    @property
    def targets(self) -> tuple[TargetAnalysis, TargetAnalysis]:
        return self.primary, self.secondary


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
    primary = analyse_target(results, "train_loss", loss, target_loss is not None)
    secondary = analyse_target(results, "val_accuracy", acc, target_accuracy is not None)
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


# --------------------------------------------------------------------------------------------
# The critical batch size with the learning rate tuned per batch size (issue #15)

REACHED, DIVERGED, HOPELESS, BUDGET, NOT_REACHED, MISSING, AT_START = (
    "reached", "diverged", "hopeless", "budget", "not reached", "missing", "at start")
OUTCOME_TEXT = {
    DIVERGED: "diverged before reaching it", HOPELESS: "stopped as hopeless (its steps exceeded "
    "the sweep's stop factor times the fewest steps to the target at its batch size)",
    BUDGET: "stopped at the epoch budget", NOT_REACHED: "trained to its end without reaching it",
    MISSING: "no completed run", AT_START: "at the target before its first step (the target "
    "is above the initial loss; not a usable count)"}
GRID_BOOTSTRAP = 1000
MAX_GRID_EXTENSIONS = 2  # per direction, as the sweep extends (design.md, round 2)
SGD_FAMILY = ("sgd", "momentum", "nesterov")


def is_grid_sweep(results: SweepResults) -> bool:
    """Whether the sweep tuned the learning rate per batch size: its manifest has a `grid`, or
    runs of one batch size differ in learning rate."""
    if results.manifest.get("grid"):
        return True
    rates: dict[int, set[float]] = {}
    for r in results.runs:
        rates.setdefault(r.batch_size, set()).add(r.config.learning_rate)
    return any(len(v) > 1 for v in rates.values())


def run_stop_reason(run: Run) -> str | None:
    """Why the sweep stopped a run ("target", "hopeless", "budget", "diverged": `Run.stopped`),
    or None when not recorded."""
    return getattr(run, "stopped", None)


def default_grid_target_loss(results: SweepResults) -> float | None:
    """For a grid without a recorded target: the lowest smoothed training loss that, at every
    batch size, some learning rate brings every seed to (per rate, the highest of its seeds'
    lowest smoothed losses; per batch size, the lowest of those over rates; then the highest
    over batch sizes), rounded up to two significant digits."""
    per_rate: dict[tuple[int, float], list[float]] = {}
    for r in results.runs:
        per_rate.setdefault((r.batch_size, r.config.learning_rate), []).append(
            min_smoothed_loss(r))
    best: dict[int, float] = {}
    for (b, _), lows in per_rate.items():
        worst = max(lows) if all(np.isfinite(lows)) else float("nan")
        if np.isfinite(worst) and worst > 0:
            best[b] = min(best.get(b, math.inf), worst)
    return _ceil_significant(max(best.values())) if best else None


def grid_run_label(run: Run) -> str:
    """The run's directory name, or `bs00032_lr0.00316_seed0` as a grid sweep names it."""
    if run.path is not None:
        return run.path.name
    return f"bs{run.batch_size:05d}_lr{run.config.learning_rate:.3g}_seed{run.seed}"


def run_b_simple_average(run: Run, until_step: float) -> float:
    """A run's B_simple averaged over training from its first noise record to `until_step`:
    the time average (in steps, equivalently in examples) of the records joined by straight
    lines, the value at `until_step` interpolated towards the next record (or held after the
    last). The records of a log-spaced schedule crowd the first steps, so their plain mean
    would weigh the first percent of training as much as the rest. NaN without a record at or
    before `until_step`."""
    points = sorted((float(rec["step"]), float(rec["noise_scale"])) for rec in run.noise
                    if rec.get("noise_scale") is not None and rec.get("step") is not None
                    and np.isfinite(rec["noise_scale"]))
    if not points or points[0][0] > until_step:
        return float("nan")
    steps_R, values_R = (np.asarray(v) for v in zip(*points))
    if until_step <= steps_R[0]:
        return float(values_R[0])
    value_end = float(np.interp(until_step, steps_R, values_R))  # held beyond the last
    keep = steps_R < until_step
    x = np.concatenate([steps_R[keep], [until_step]])
    y = np.concatenate([values_R[keep], [value_end]])
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


@dataclasses.dataclass
class SeedOutcome:
    """One run of the grid (or the absence of one) against the target.

    Attributes:
      seed: the seed.
      outcome: `REACHED`, or why not: `DIVERGED`, `HOPELESS`, `BUDGET`, `NOT_REACHED`,
        `MISSING` (no completed run), `AT_START`.
      steps, examples: to the target (interpolated crossing), NaN unless reached.
      b_simple: B_simple averaged over the run's records up to its crossing
        (`run_b_simple_average`), NaN unless reached with records.
      name: the run's name.
      run: the run itself (None when missing; in memory only).
    """

    seed: int
    outcome: str
    steps: float
    examples: float
    b_simple: float
    name: str
    run: Run | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class RateCell:
    """The runs of one batch size and learning rate, one per expected seed."""

    batch_size: int
    learning_rate: float
    seeds: list[SeedOutcome]

    @property
    def reached(self) -> int:
        return sum(s.outcome == REACHED for s in self.seeds)

    @property
    def complete(self) -> bool:
        """Every expected seed reached the target (the rule for the best rate)."""
        return bool(self.seeds) and self.reached == len(self.seeds)

    @property
    def steps(self) -> Estimate:
        """Steps to the target over the seeds that reached it."""
        return Estimate.of([s.steps for s in self.seeds])

    @property
    def examples(self) -> Estimate:
        return Estimate.of([s.examples for s in self.seeds])

    @property
    def b_simple(self) -> Estimate:
        return Estimate.of([s.b_simple for s in self.seeds])

    def outcomes(self) -> dict[str, int]:
        """How many seeds ended how, e.g. {"reached": 2, "hopeless": 1}."""
        out: dict[str, int] = {}
        for s in self.seeds:
            out[s.outcome] = out.get(s.outcome, 0) + 1
        return out


@dataclasses.dataclass
class BestRate:
    """The best learning rate of one batch size, chosen from a table of steps (`choose_best_rate`).

    Attributes:
      index: of the best rate among the rates given, or None when no rate had every seed
        reach the target.
      edge: "low" or "high" when the best is the smallest or largest rate of the grid, "single"
        when the grid has one rate, else None.
      near: indices of the eligible rates whose mean steps are not significantly above the
        best's (one-sided Welch t test at `stats.ALPHA`), the best included: how sharply the
        grid pins the best rate down.
      ties: indices of eligible rates with exactly the best's mean steps (the smallest rate
        among them is chosen).
      faster_partial: indices of rates where some seeds, not all, reached the target, with a
        lower mean over those than the best's: excluded by the rule, listed for the report.
    """

    index: int | None
    edge: str | None
    near: list[int]
    ties: list[int]
    faster_partial: list[int]


def interpolate_optimum(learning_rates: Sequence[float], mean_steps: Sequence[float]) -> float:
    """The rate at the vertex of the parabola through (log rate, log steps) at three rates,
    the middle one the fewest steps: the continuous optimum that a grid brackets. Kept
    within the outer two rates (it lies within half a step of the middle one when the rates
    are evenly spaced in log)."""
    x = np.log(np.asarray(learning_rates, np.float64))
    y = np.log(np.asarray(mean_steps, np.float64))
    if x.shape != (3,) or y.shape != (3,) or not (np.all(np.isfinite(x)) and np.all(np.diff(x) > 0)):
        raise BatchjaxError("interpolating the optimum needs 3 ascending positive rates")
    # Newton's form y = y0 + d0 (x - x0) + c (x - x0)(x - x1); the vertex is where y' = 0.
    d0, d1 = (y[1] - y[0]) / (x[1] - x[0]), (y[2] - y[1]) / (x[2] - x[1])
    c = (d1 - d0) / (x[2] - x[0])
    if not (c > 0):  # flat or concave: no interior minimum; the middle rate
        return float(learning_rates[1])
    vertex = 0.5 * (x[0] + x[1]) - d0 / (2 * c)
    return float(np.exp(np.clip(vertex, x[0], x[2])))


def choose_best_rate(steps_RxS: np.ndarray) -> BestRate:
    """The best learning rate of one batch size: among the rates (rows, ascending) whose every
    seed (column) reached the target (finite steps), the fewest mean steps; exact ties go to
    the smaller rate. NaN marks a seed that did not reach the target (or is missing), so a rate
    with one such seed is never the best: runs that fail count as failures, not as absent.

    Args:
      steps_RxS: steps to the target [num_rates, num_seeds], rates ascending.

    Returns:
      A `BestRate`.
    """
    steps_RxS = np.asarray(steps_RxS, np.float64)
    num_rates = steps_RxS.shape[0]
    finite_RxS = np.isfinite(steps_RxS)
    eligible_R = finite_RxS.all(axis=1) & (steps_RxS.shape[1] > 0)
    if not eligible_R.any():
        return BestRate(None, None, [], [], [])
    means_R = np.full(num_rates, np.nan)
    means_R[eligible_R] = steps_RxS[eligible_R].mean(axis=1)
    best_mean = np.nanmin(means_R)
    ties = [int(i) for i in np.flatnonzero(means_R == best_mean)]
    best = ties[0]
    edge = ("single" if num_rates == 1 else "low" if best == 0
            else "high" if best == num_rates - 1 else None)
    near = []
    for i in np.flatnonzero(eligible_R):
        test = stats.welch(steps_RxS[i], steps_RxS[best])
        if i == best or not (test.known and test.p(stats.GREATER) < stats.ALPHA):
            near.append(int(i))
    partial_R = finite_RxS.any(axis=1) & ~eligible_R
    faster = [int(i) for i in np.flatnonzero(partial_R)
              if np.mean(steps_RxS[i][finite_RxS[i]]) < best_mean]
    return BestRate(best, edge, near, ties, faster)


@dataclasses.dataclass
class BatchRates:
    """One batch size of a learning-rate grid: every rate tried and the best one.

    Attributes:
      batch_size: B.
      cells: one per learning rate of the grid at B, ascending.
      choice: the `BestRate` over `cells`.
      extended: the sweep's extensions of this B's grid ("up", "down"), from the manifest.
      note: why there is no best rate, or None.
    """

    batch_size: int
    cells: list[RateCell]
    choice: BestRate
    extended: list[str]
    note: str | None = None

    @property
    def learning_rates(self) -> list[float]:
        return [c.learning_rate for c in self.cells]

    @property
    def best(self) -> RateCell | None:
        return self.cells[self.choice.index] if self.choice.index is not None else None

    @property
    def edge(self) -> str | None:
        return self.choice.edge

    @property
    def unreliable(self) -> bool:
        """The best rate is at an edge of the (final) grid: the optimum may lie beyond it, so
        the rate is a bound and its steps an upper bound on those at the optimum. Left out of
        the fits of the best rate against B."""
        return self.choice.edge is not None

    @property
    def extensions_left(self) -> bool:
        """Whether the sweep would still extend the grid past the edge the best rate is on."""
        direction = {"low": "down", "high": "up"}.get(self.choice.edge or "")
        return direction is not None and self.extended.count(direction) < MAX_GRID_EXTENSIONS

    @property
    def optimum(self) -> float | None:
        """The best rate refined between grid points: the vertex of the parabola through
        (log rate, log mean steps) at the best rate and its two neighbours
        (`interpolate_optimum`), when both neighbours had every seed reach the target; else
        the best grid rate. None without a best rate. On a grid of rates a factor 2 apart the
        best grid rate alone is known to within a factor sqrt(2) either way, and an adaptive
        search that centres each grid on a scaled guess would hand the fits of the best rate
        against B its own scaling whenever the best is the guess; the vertex is not tied to
        the grid."""
        if self.best is None:
            return None
        i = self.choice.index
        if self.unreliable or i == 0 or i == len(self.cells) - 1:
            return self.best.learning_rate
        trio = self.cells[i - 1:i + 2]
        if not all(c.complete for c in trio):
            return self.best.learning_rate
        return interpolate_optimum([c.learning_rate for c in trio],
                                   [c.steps.mean for c in trio])

    @property
    def steps(self) -> Estimate:
        """S(B): steps to the target at the best rate (t interval over seeds)."""
        return self.best.steps if self.best else Estimate.of([])

    @property
    def examples(self) -> Estimate:
        """E(B): examples to the target at the best rate."""
        return self.best.examples if self.best else Estimate.of([])

    def not_reached(self) -> dict[str, int]:
        """Runs of this batch size that did not reach the target, by reason."""
        out: dict[str, int] = {}
        for cell in self.cells:
            for outcome, n in cell.outcomes().items():
                if outcome != REACHED:
                    out[outcome] = out.get(outcome, 0) + n
        return out


@dataclasses.dataclass
class RateScaling:
    """The best learning rate against batch size, over the batch sizes with a reliable best.

    Attributes:
      batch_sizes, learning_rates: the points (unreliable and rate-less batch sizes left out).
      excluded: (B, reason) of the batch sizes left out.
      eq27: eps_opt(B) = eps_max / (1 + B_noise / B) (`critical.fit_optimal_learning_rate`),
        or None (fewer than 3 points).
      power: the slope k of log2 eps on log2 B, with its t interval on n - 2 df (eps ∝ B^k),
        or None.
      primary: "eq27" for the SGD family, "power" for Adam (what the figure draws).
      note: why a fit is missing, or None.
    """

    batch_sizes: list[int]
    learning_rates: list[float]
    excluded: list[tuple[int, str]]
    eq27: critical.OptimalRateFit | None
    power: Slope | None
    primary: str
    note: str | None = None


@dataclasses.dataclass
class NoiseComparison:
    """B_simple along the best runs against B_crit.

    Attributes:
      by_batch_size: per batch size in the fit, the `Estimate` over seeds of each best run's
        B_simple averaged over training up to its crossing (`run_b_simple_average`).
      b_simple: the `Estimate` over batch sizes of those means (t interval on batch sizes - 1
        df: the batch sizes are the units; their seeds' spread is inside each mean).
      ratio: B_simple / B_crit.
      test: the t test of log(B_simple) - log(B_crit): SE^2 = (SE / mean)^2 of B_simple plus
        (SE / B_crit)^2 of the fit (delta method), on the Satterthwaite df of the two.
      ratio_interval: exp of the 95% t interval of that log difference.
      ratio_bootstrap: 95% percentile interval of the ratio over the seed bootstrap (the same
        draws as B_crit's), or None.
      records: the most noise records a best run had up to its crossing.
    """

    by_batch_size: dict[int, Estimate]
    b_simple: Estimate
    ratio: float
    test: TTest
    ratio_interval: tuple[float, float]
    ratio_bootstrap: tuple[float, float] | None
    records: int

    @property
    def outcome(self) -> str:
        """"larger" (B_simple significantly above B_crit, two-sided p < ALPHA), "smaller",
        "indistinguishable", or "unknown" (no SE)."""
        if not self.test.known:
            return "unknown"
        if self.test.p() >= stats.ALPHA:
            return "indistinguishable"
        return "larger" if self.test.diff > 0 else "smaller"


@dataclasses.dataclass
class GridAnalysis:
    """The critical batch size with the learning rate tuned per batch size (`analyse_grid`).

    Attributes:
      optimizer: the sweep's optimizer.
      target_loss: the training-loss target (smoothed per-step loss, `critical`).
      target_source: "given", "manifest" (fixed by the sweep before training) or "default"
        (`default_grid_target_loss`: the sweep recorded none).
      seeds: the seeds expected at every batch size and rate.
      rates: per batch size (ascending), the `BatchRates`.
      fit: eq. 2.11 fitted to S(B) at the best rates (`critical.fit_critical_batch`), its
        bootstrap interval that of the seed bootstrap that re-selects the best rate in every
        draw (`_bootstrap_grid`); None without 3 batch sizes with a best rate.
      fit_without_unreliable: the same fit without the unreliable batch sizes, when some are
        and 3 others remain (a robustness check), else None.
      fit_note: why there is no fit, or None.
      regimes: `critical.regimes(fit)` of a valid fit, or None.
      scaling: the best learning rate against B.
      noise: B_simple along the best runs against B_crit, or None (no fit or no records).
      noise_description: how the sweep measured noise (schedule, probe size).
      settings: the sweep's grid settings from the manifest (stop_factor, max_epochs, ...).
      num_bootstrap: bootstrap draws behind the intervals.
    """

    optimizer: str
    target_loss: float
    target_source: str
    seeds: list[int]
    rates: dict[int, BatchRates]
    fit: critical.CriticalFit | None
    fit_without_unreliable: critical.CriticalFit | None
    fit_note: str | None
    regimes: critical.Regimes | None
    scaling: RateScaling
    noise: NoiseComparison | None
    noise_description: str
    settings: dict
    num_bootstrap: int

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.rates)

    @property
    def fit_df(self) -> int:
        return len(self.fit.batch_sizes) - 2 if self.fit is not None else 0

    @property
    def b_crit_t_interval(self) -> tuple[float, float] | None:
        """95% t interval of B_crit on `fit_df` df, on the log scale (as
        `TargetAnalysis.b_crit_t_interval`)."""
        return _log_t_interval(self.fit, self.fit_df)

    @property
    def unreliable(self) -> list[int]:
        return [b for b, r in self.rates.items() if r.best is not None and r.unreliable]

    @property
    def unreached(self) -> list[int]:
        """Batch sizes where no rate brought every seed to the target."""
        return [b for b, r in self.rates.items() if r.best is None]


def _log_t_interval(fit: critical.CriticalFit | None, df: int) -> tuple[float, float] | None:
    if fit is None or not fit.valid or df < 1 or not np.isfinite(fit.b_crit_stderr):
        return None
    half = stats.t_quantile(0.975, df) * fit.b_crit_stderr / fit.b_crit
    return fit.b_crit * math.exp(-half), fit.b_crit * math.exp(half)


def _same_rate(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _seed_outcome(run: Run | None, seed: int, target: float, label: str) -> SeedOutcome:
    nan = float("nan")
    if run is None:
        return SeedOutcome(seed, MISSING, nan, nan, nan, label)
    hit = critical.steps_to_target(run, train_loss=target)
    if hit is not None and hit[0] > 0:
        return SeedOutcome(seed, REACHED, hit[0], hit[1], run_b_simple_average(run, hit[0]),
                           grid_run_label(run), run)
    if hit is not None:
        outcome = AT_START
    elif run.diverged or run_stop_reason(run) == "diverged":
        outcome = DIVERGED
    else:
        outcome = {"hopeless": HOPELESS, "budget": BUDGET}.get(run_stop_reason(run) or "",
                                                               NOT_REACHED)
    return SeedOutcome(seed, outcome, nan, nan, nan, grid_run_label(run), run)


def _grid_settings(results: SweepResults) -> dict:
    return dict(results.manifest.get("grid") or {})


def _batch_rates(results: SweepResults, target: float, seeds: list[int]
                 ) -> dict[int, BatchRates]:
    grid = _grid_settings(results)
    listed = {int(b): [float(v) for v in rates]
              for b, rates in (grid.get("learning_rates") or {}).items()}
    extended = {int(b): list(v) for b, v in (grid.get("extended") or {}).items()}
    batch_sizes = sorted(set(results.manifest.get("sweep", {}).get("batch_sizes", []))
                         | set(listed) | {r.batch_size for r in results.runs})
    out = {}
    for b in batch_sizes:
        runs = [r for r in results.runs if r.batch_size == b]
        rates = list(listed.get(b, []))
        for r in runs:
            if not any(_same_rate(r.config.learning_rate, v) for v in rates):
                rates.append(r.config.learning_rate)
        cells = []
        for lr in sorted(rates):
            at = {r.seed: r for r in runs if _same_rate(r.config.learning_rate, lr)}
            cells.append(RateCell(b, lr, [
                _seed_outcome(at.get(s), s, target, f"bs{b:05d}_lr{lr:.3g}_seed{s}")
                for s in seeds]))
        steps_RxS = np.array([[s.steps for s in c.seeds] for c in cells]).reshape(
            len(cells), len(seeds))
        choice = choose_best_rate(steps_RxS)
        note = None
        if choice.index is None:
            partial = sum(0 < c.reached < len(c.seeds) for c in cells)
            note = (f"no rate reached: none of the {len(cells)} learning rates brought all "
                    f"{len(seeds)} seeds to the target"
                    + (f" ({partial} brought some)" if partial else "")
                    if cells else "no rate reached: no completed run at this batch size")
        out[b] = BatchRates(b, cells, choice, extended.get(b, []), note)
    return out


def _noise_description(results: SweepResults) -> str:
    config = results.manifest.get("config") or (results.runs[0].config.to_dict()
                                                if results.runs else {})
    schedule = config.get("noise_schedule", "?")
    probes = {rec.get("probe_size") for r in results.runs for rec in r.noise
              if rec.get("probe_size")}
    if not any(r.noise for r in results.runs):
        return "no gradient-noise records"
    schedule_text = {"log": f"the log-spaced schedule ({config.get('noise_points', '?')} steps "
                            "from the first to the last, plus step 0 and every epoch end)",
                     "epoch": "every epoch end and step 0"}.get(schedule, f"schedule {schedule}")
    probe = (f"a probe subset of {max(probes):,} training examples" if probes
             else "the whole training set")
    return f"measured on every run, on {schedule_text}, on {probe}"


def _bootstrap_grid(rates: dict[int, BatchRates], fit_batch_sizes: Sequence[int],
                    num_seeds: int, num_bootstrap: int, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Draws of B_crit and of the B_simple mean along the best runs: within each batch size
    the seeds are resampled with replacement, the same draw for all its rates, and its best
    rate is chosen again among the rates every seed reached (which rates are eligible is
    fixed by the full data). Batch sizes are drawn independently: with 3 seeds, resampling
    whole seed columns across batch sizes would give only 10 distinct draws in all, and a
    seed's shared effect at every batch size (its initialisation) scales S(B) alike and
    cancels in B_crit = E_min / S_min, so ignoring it widens the interval, if anything.
    Returns ([D] B_crit, [D] B_simple), NaN where a draw gives no positive fit."""
    rng = np.random.default_rng(seed)
    tables = []
    for b in fit_batch_sizes:
        eligible = [c for c in rates[b].cells if c.complete]
        tables.append((np.array([[s.steps for s in c.seeds] for c in eligible]),
                       np.array([[s.b_simple for s in c.seeds] for c in eligible])))
    b_K = np.asarray(fit_batch_sizes, np.float64)
    b_crit_D = np.full(num_bootstrap, np.nan)
    b_simple_D = np.full(num_bootstrap, np.nan)
    for d in range(num_bootstrap):
        means, noise = [], []
        for steps_RxS, noise_RxS in tables:
            cols = rng.integers(0, num_seeds, num_seeds)
            drawn = steps_RxS[:, cols].mean(axis=1)
            best = int(np.argmin(drawn))  # argmin takes the first: the smaller rate on ties
            means.append(drawn[best])
            values = noise_RxS[best, cols]
            noise.append(np.mean(values[np.isfinite(values)]) if np.isfinite(values).any()
                         else np.nan)
        s_min, e_min = critical.fit_line(b_K, means)
        if s_min > 0 and e_min > 0:
            b_crit_D[d] = e_min / s_min
        noise = np.asarray(noise)
        if np.isfinite(noise).any():
            b_simple_D[d] = float(np.mean(noise[np.isfinite(noise)]))
    return b_crit_D, b_simple_D


def _percentiles(draws: np.ndarray) -> tuple[float, float] | None:
    draws = draws[np.isfinite(draws)]
    if draws.size < 10:
        return None
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def _rate_scaling(rates: dict[int, BatchRates], optimizer: str) -> RateScaling:
    points, excluded = [], []
    for b, r in rates.items():
        if r.best is None:
            excluded.append((b, "no rate reached"))
        elif r.unreliable:
            where = {"low": "smallest", "high": "largest", "single": "only"}[r.edge]
            excluded.append((b, f"unreliable: the best is the {where} rate of the grid"))
        else:
            points.append((b, r.optimum))
    primary = "eq27" if optimizer in SGD_FAMILY else "power"
    out = RateScaling([b for b, _ in points], [v for _, v in points], excluded, None, None,
                      primary)
    if len(points) < 3:
        out.note = (f"only {len(points)} batch size(s) with a reliable best rate; the fits of "
                    "the best rate against B need at least 3")
        return out
    b_K, lr_K = np.asarray(points, np.float64).T
    out.eq27 = critical.fit_optimal_learning_rate(b_K, lr_K)
    out.power = stats.fit_slope(np.log2(b_K), np.log2(lr_K))
    return out


def analyse_grid(results: SweepResults, *, target_loss: float | None = None,
                 num_bootstrap: int = GRID_BOOTSTRAP) -> GridAnalysis:
    """The critical batch size as McCandlish et al. and Shallue et al. measure it: steps to a
    training-loss target at the best learning rate of each batch size.

    Per batch size and rate, steps and examples to the target per seed (reached, or why
    not); the best rate (`choose_best_rate`) with its edge and unreliable flags; S(B) and E(B)
    at it with t intervals; the fit of eq. 2.11 over the batch sizes with a best rate, its
    bootstrap over seeds re-selecting the best rate in every draw; the best rate against B
    (eq. 2.7 and a power law); B_simple averaged over each best run's training up to its
    crossing, and its ratio to B_crit.

    Args:
      results: a grid sweep (`is_grid_sweep`).
      target_loss: the training-loss target (default: the one the sweep fixed before training,
        the manifest's `grid.target_loss`; without one, `default_grid_target_loss`).
      num_bootstrap: bootstrap draws (0: none).

    Raises:
      BatchjaxError: no run, or no target given, recorded or reachable.
    """
    grid = _grid_settings(results)
    if not results.runs:
        raise BatchjaxError(f"{results.path} holds no completed run; nothing to analyse")
    source = "given" if target_loss is not None else "manifest"
    target = target_loss if target_loss is not None else grid.get("target_loss")
    if target is None:
        source, target = "default", default_grid_target_loss(results)
    if target is None:
        raise BatchjaxError(f"{results.path}: no learning-rate grid target recorded and no rate "
                            "brings every seed to a finite loss; give one (target_loss=..., "
                            "--target-loss)")
    target = float(target)
    seeds = sorted(set(results.manifest.get("sweep", {}).get("seeds", []))
                   | {r.seed for r in results.runs})
    optimizer = (results.manifest.get("config") or {}).get("optimizer",
                                                           results.runs[0].config.optimizer)
    rates = _batch_rates(results, target, seeds)
    out = GridAnalysis(optimizer, target, source, seeds, rates, None, None, None, None,
                       _rate_scaling(rates, optimizer), None, _noise_description(results),
                       grid, 0)
    with_best = [b for b, r in rates.items() if r.best is not None]
    if len(with_best) < 3:
        out.fit_note = (f"only {len(with_best)} of {len(rates)} batch sizes have a rate at "
                        "which every seed reached the target; the fit of eq. 2.11 needs at "
                        "least 3 (a higher target, more epochs, or a wider grid)")
        return out
    steps_KxS = np.array([[s.steps for s in rates[b].best.seeds] for b in with_best])
    try:
        fit = critical.fit_critical_batch(with_best, steps_KxS, num_bootstrap=0)
    except BatchjaxError as err:
        out.fit_note = str(err)
        return out
    reliable = [b for b in with_best if not rates[b].unreliable]
    if len(reliable) < len(with_best) and len(reliable) >= 3:
        out.fit_without_unreliable = critical.fit_critical_batch(
            reliable, np.array([[s.steps for s in rates[b].best.seeds] for b in reliable]),
            num_bootstrap=0)
    b_crit_D = b_simple_D = np.zeros(0)
    if len(seeds) > 1 and num_bootstrap > 0:
        b_crit_D, b_simple_D = _bootstrap_grid(rates, with_best, len(seeds), num_bootstrap)
        interval = _percentiles(b_crit_D)
        fit = dataclasses.replace(fit, b_crit_interval=interval,
                                  num_bootstrap=int(np.isfinite(b_crit_D).sum()))
        out.num_bootstrap = num_bootstrap
    out.fit = fit
    out.regimes = critical.regimes(fit) if fit.valid else None
    by_b = {b: rates[b].best.b_simple for b in with_best}
    by_b = {b: e for b, e in by_b.items() if e.n}
    if fit.valid and by_b:
        b_simple = Estimate.of([e.mean for e in by_b.values()])
        diff = math.log(b_simple.mean) - math.log(fit.b_crit)
        parts = []
        if b_simple.n > 1:
            parts.append(((b_simple.se / b_simple.mean) ** 2, b_simple.n - 1.0))
        if out.fit_df > 0 and np.isfinite(fit.b_crit_stderr):
            parts.append(((fit.b_crit_stderr / fit.b_crit) ** 2, float(out.fit_df)))
        test = (stats.combined_test(diff, parts) if len(parts) == 2
                else stats.t_test(diff, float("nan"), float("nan")))
        lo, hi = test.interval()
        ratio_D = b_simple_D / b_crit_D if b_crit_D.size else np.zeros(0)
        records = max((sum(1 for rec in s.run.noise if rec.get("noise_scale") is not None
                           and rec.get("step", 0) <= s.steps)
                       for b in by_b for s in rates[b].best.seeds if s.run is not None),
                      default=0)
        out.noise = NoiseComparison(by_b, b_simple, math.exp(diff), test,
                                    (math.exp(lo), math.exp(hi)) if test.known
                                    else (float("nan"), float("nan")),
                                    _percentiles(ratio_D) if ratio_D.size else None, records)
    return out


# --------------------------------------------------------------------------------------------
# Everything


@dataclasses.dataclass
class Analysis:
    """Every number of a sweep's report and figures (`analyse`).

    Attributes:
      results: the sweep analysed (figures draw raw curves from its runs).
      target_accuracy: the validation-accuracy target of claim 4, or None.
      target_accuracy_given: whether the caller gave it (else: the default rule).
      run_stats: `run_stats` of each run of `results.runs`, in that order.
      summary: per batch size (ascending), a `BatchSummary`.
      noise_moments: the gradient-noise measurements at each moment of `noise_moments`.
      claims: the five claims of the original write-up, in order.
      sharpness: the sharp-minima analysis.
      critical: the critical-batch-size analysis at the sweep's one learning rate (None for a
        learning-rate grid, whose `grid` holds it).
      step_loss: per batch size, the smoothed per-step losses (figure 2).
      noise_series: per `NOISE_QUANTITIES` quantity and batch size, its band over training.
      diverged: (run name, diverged step) of each diverged run.
      grid: for a sweep with a learning-rate grid (`is_grid_sweep`), the `GridAnalysis`; the
        claims, summary and the one-rate parts are then empty (they compare batch sizes at one
        learning rate).
    """

    results: SweepResults
    target_accuracy: float | None
    target_accuracy_given: bool
    run_stats: list[dict[str, float]]
    summary: dict[int, BatchSummary]
    noise_moments: list[NoiseMoment]
    claims: list[Claim]
    sharpness: SharpnessAnalysis
    critical: CriticalAnalysis | None
    step_loss: dict[int, StepLossCurve]
    noise_series: dict[str, dict[int, Band | None]]
    diverged: list[tuple[str, int | None]]
    grid: GridAnalysis | None = None

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.summary)

    @property
    def seeds(self) -> int:
        """The most runs at one batch size."""
        return max((row.runs for row in self.summary.values()), default=0)


def analyse(results: SweepResults, *, target_loss: float | None = None,
            target_accuracy: float | None = None) -> Analysis:
    """Every number of the report and the figures, from a loaded sweep.

    Args:
      results: a loaded sweep (`batchjax.results.load_sweep`), or one built from `Run`s.
      target_loss: training-loss target of the critical batch size (default
        `default_target_loss`).
      target_accuracy: validation-accuracy target of claim 4 and of the critical batch size
        (default `default_target_accuracy`).

    A sweep with a learning-rate grid (`is_grid_sweep`) gets `analyse_grid` (with
    `target_loss`) and empty claims.

    Raises:
      BatchjaxError: the sweep holds no run.
    """
    if not results.runs:
        raise BatchjaxError(f"{results.path} holds no completed run; nothing to analyse (run "
                            "scripts/sweep.py first)")
    if is_grid_sweep(results):
        return Analysis(
            results=results, target_accuracy=None, target_accuracy_given=False, run_stats=[],
            summary={}, noise_moments=[], claims=[],
            sharpness=SharpnessAnalysis(False, INCONCLUSIVE, []), critical=None, step_loss={},
            noise_series={},
            diverged=[(grid_run_label(r), r.diverged_step) for r in results.runs if r.diverged],
            grid=analyse_grid(results, target_loss=target_loss))
    target = target_accuracy if target_accuracy is not None else default_target_accuracy(results)
    per_run = [run_stats(r, target) for r in results.runs]
    summary = summarize(results, target)
    moments = [noise_moment(results, e) for e in noise_moments(results)]
    claims: list[Claim] = [claim_noise(results, moments),
                           claim_roughness(results, summary, per_run),
                           claim_generalisation(summary), claim_speed(results, summary, target)]
    claims.append(claim_balance(results, summary, claims))
    return Analysis(
        results=results, target_accuracy=target,
        target_accuracy_given=target_accuracy is not None, run_stats=per_run, summary=summary,
        noise_moments=moments, claims=claims,
        sharpness=sharpness_analysis(results, summary, per_run),
        critical=critical_analysis(results, target_loss=target_loss,
                                   target_accuracy=target_accuracy),
        step_loss=step_loss_curves(results),
        noise_series={q: noise_series(results, q) for q in NOISE_QUANTITIES},
        diverged=[(r.path.name if r.path else run_name(r.batch_size, r.seed), r.diverged_step)
                  for r in results.runs if r.diverged])
