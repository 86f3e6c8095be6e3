"""The critical batch size: steps to a target against batch size, and the model that fits them.

McCandlish et al. 2018 (arXiv:1812.06162, sec. 2.2, eq. 2.11) predict that the optimizer steps S
and training examples E = B S needed to reach a given loss trade off as

    (S / S_min - 1) (E / E_min - 1) = 1,

S_min being the fewest steps (B -> infinity) and E_min the fewest examples (B -> 0). With E = B S
this is S(B) = S_min (1 + B_crit / B) = S_min + E_min / B, with the critical batch size
B_crit = E_min / S_min; likewise E(B) = E_min (1 + B / B_crit). S is LINEAR in 1/B, so S_min
(intercept) and E_min (slope) come from a weighted least-squares line in closed form.

Weights. The seed-to-seed scatter of steps-to-target is roughly proportional to S (Shallue et al.
2019, arXiv:1811.03600, fig. 5 shows similar relative spreads at all batch sizes), and the small
batch sizes have S hundreds of times larger than the large ones: an unweighted fit would be
decided by the small batches alone and leave S_min to chance. We minimise the squared RELATIVE
error sum_b ((S_b - S_min - E_min / B_b) / S_hat_b)^2 by iteratively reweighted least squares
(weights 1 / S_hat_b^2 from the current fit, starting from the data), a log-space fit to first
order that keeps each step closed-form; weighting by the model rather than by the data avoids
favouring points that came out low by chance.

Uncertainty. Two, both reported: the covariance of the weighted linear fit with the scatter
estimated from its residuals (needs more than 2 batch sizes; 0 on exact points), propagated to
B_crit = E_min / S_min by the delta method; and, with several seeds per batch size, a bootstrap
over seeds. Seeds are resampled as whole columns, since seed s initialises the same weights at
every batch size and its steps are correlated across batch sizes.

Regimes (Shallue et al. 2019, sec. 4): from the model, E / E_min = 1 + B / B_crit and
S / S_min = 1 + B_crit / B. With a factor k (default 4):
  perfect scaling            B <= B_crit / k: at most 1/k (25%) more examples than the
                             fewest, i.e. steps within that of the perfect-scaling line
                             E_min / B, so doubling B nearly halves the steps;
  diminishing returns        B_crit / k < B < k B_crit;
  maximal data parallelism   B >= k B_crit: steps within 1/k of the fewest possible, S_min,
                             so doubling B saves at most about 1/(2k + 2) (10%) of them.

The model is derived for SGD near a quadratic minimum; with Adam (the optimizer of this
library) it is an empirical description whose fit quality the residuals report.

The learning rate tuned per batch size (McCandlish et al. sec. 2.1; Shallue et al. 2019 count
steps at the best rate of each batch size too): for SGD near a quadratic minimum, the step size
that gains the most per step is

    eps_opt(B) = eps_max / (1 + B_noise / B)     (sec. 2.1, cited as eq. 2.7 in issue #15; the
                                                   best gain per step dL_opt(B) has this form too)

eps_max being the best step of the full-batch gradient and B_noise = tr(H Sigma) / G^T H G the
noise scale of the optimal step. `fit_optimal_learning_rate` fits it to the best rate of each
batch size by least squares in log space, log eps = log eps_max - log(1 + B_noise / B), over
log eps_max and log B_noise (so both stay positive): for a fixed B_noise, log eps_max is the
weighted mean of log eps + log(1 + B_noise / B) in closed form, so the fit is a search over one
variable (a grid over log B_noise, refined by golden sections). Standard errors come from the
Gauss-Newton covariance with the scatter estimated from the residuals on n - 2 degrees of
freedom, and 95% intervals from the t distribution on those df, taken on the logs and
exponentiated (the best rates come from a grid a factor 2 apart: every point carries the same
rounding error of up to a factor sqrt(2), which the residual scatter includes). A minimum at
either end of the search range means the data cannot tell B_noise apart from 0 (the rate does
not grow with B) or from infinity (it grows as B): `identified` is False.

Numbers only: `batchjax.analysis` applies this to a sweep and `batchjax.plots` draws it
(`plot_steps_to_target`).

Steps to a target, from a run's saved history:
  * validation accuracy is measured only at epoch ends: the first epoch e whose accuracy reaches
    the target is found, and steps and examples are interpolated linearly in steps between the
    evaluations of epochs e - 1 and e (the crossing lies somewhere between them). When the first
    evaluation already reaches the target, its steps are returned: an upper bound.
  * training loss uses every step's loss, smoothed by a CENTRED moving average over a window of
    about `window_examples` examples (ceil(window_examples / B) steps, made odd), weighted by the
    batch sizes. A window of fixed examples gives every batch size the same noise in the
    smoothed loss (the per-step loss has variance proportional to 1/B); centring avoids the lag
    of a trailing average, which would add about window_examples / (2B) steps at batch size B,
    i.e. inflate the fitted E_min by window_examples / 2. The loss of step t is the loss of the
    parameters after t updates, so reaching it takes t steps; the crossing is interpolated
    linearly between steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Sequence

import numpy as np

from batchjax.errors import BatchjaxError
from batchjax.run import Run

# Saved accuracies are float32 values such as 0.949999988 for 950/1000: a target of 0.95 counts
# as reached by values this close below it.
_ACCURACY_TOLERANCE = 1e-6
LOSS_WINDOW_EXAMPLES = 1024
REGIME_FACTOR = 4.0
_IRLS_ITERS = 50


# --------------------------------------------------------------------------------------------
# Steps to a target


def _check_history(history: Mapping, keys: tuple[str, ...]) -> None:
    if not all(k in history for k in keys):
        raise BatchjaxError(f"the run has no per-epoch history with {', '.join(keys)} (a Run "
                            "as training returns it or results.load_sweep loads it has one)")


def _interpolate_crossing(steps_K: np.ndarray, examples_K: np.ndarray, i: int,
                          fraction: float) -> tuple[float, float]:
    """Steps and examples a `fraction` of the way from point i - 1 to point i."""
    fraction = min(max(fraction, 0.0), 1.0)
    return (float(steps_K[i - 1] + fraction * (steps_K[i] - steps_K[i - 1])),
            float(examples_K[i - 1] + fraction * (examples_K[i] - examples_K[i - 1])))


def _accuracy_crossing(history: Mapping, target: float) -> tuple[float, float] | None:
    acc_E = np.asarray(history["val_accuracy"], np.float64)
    steps_E = np.asarray(history["steps"], np.float64)
    examples_E = np.asarray(history["examples_seen"], np.float64)
    reached = np.flatnonzero(acc_E >= target - _ACCURACY_TOLERANCE)  # NaN never reaches
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(steps_E[0]), float(examples_E[0])
    fraction = (target - acc_E[i - 1]) / (acc_E[i] - acc_E[i - 1])
    return _interpolate_crossing(steps_E, examples_E, i, fraction)


def smooth_step_losses(losses_T: np.ndarray, batch_sizes_T: np.ndarray,
                       window_examples: int = LOSS_WINDOW_EXAMPLES) -> np.ndarray:
    """Centred moving average of per-step losses over about `window_examples` examples.

    Args:
      losses_T: the loss of every step (finite).
      batch_sizes_T: every step's batch size; the average is weighted by them.
      window_examples: examples the window spans; the window is 2h + 1 steps with
        h = ceil(window_examples / B) // 2 for the run's batch size B (its largest step), and
        is truncated at both ends of training.

    Returns:
      The smoothed losses, one per step.
    """
    losses_T = np.asarray(losses_T, np.float64)
    weights_T = np.asarray(batch_sizes_T, np.float64)
    half = math.ceil(window_examples / max(float(weights_T.max()), 1.0)) // 2
    sum_T = np.concatenate([[0.0], np.cumsum(losses_T * weights_T)])
    count_T = np.concatenate([[0.0], np.cumsum(weights_T)])
    t = np.arange(losses_T.size)
    lo, hi = np.maximum(t - half, 0), np.minimum(t + half + 1, losses_T.size)
    return (sum_T[hi] - sum_T[lo]) / (count_T[hi] - count_T[lo])


def _loss_crossing(run: Run, target: float, window_examples: int
                   ) -> tuple[float, float] | None:
    history = run.history
    losses_T = np.asarray(run.step_losses, np.float64)
    finite = np.isfinite(losses_T)
    if not finite.all():  # a diverged run: only the steps before the first non-finite loss
        losses_T = losses_T[: int(np.argmin(finite))]
    if losses_T.size == 0:
        return None
    batch_sizes_T = run.step_batch_sizes
    steps_T1 = np.arange(losses_T.size + 1, dtype=np.float64)
    if len(batch_sizes_T) >= losses_T.size:
        batch_sizes_T = np.asarray(batch_sizes_T, np.float64)[: losses_T.size]
        examples_T1 = np.concatenate([[0.0], np.cumsum(batch_sizes_T)])
    else:
        # Without per-step batch sizes: examples linear in steps between epoch ends, exact at
        # each epoch end and off by less than one batch in between.
        _check_history(history, ("steps", "examples_seen"))
        epoch_steps = np.concatenate([[0.0], np.asarray(history["steps"], np.float64)])
        epoch_examples = np.concatenate([[0.0], np.asarray(history["examples_seen"],
                                                          np.float64)])
        if epoch_steps.size < 2:
            raise BatchjaxError("a training-loss target needs 'step_batch_sizes' or at least "
                                "one finished epoch in the history")
        # Past the last finished epoch (a run that diverged mid-epoch): the average rate.
        examples_T1 = np.where(steps_T1 <= epoch_steps[-1],
                               np.interp(steps_T1, epoch_steps, epoch_examples),
                               steps_T1 * (epoch_examples[-1] / epoch_steps[-1]))
        batch_sizes_T = np.diff(examples_T1)
    smoothed_T = smooth_step_losses(losses_T, batch_sizes_T, window_examples)
    reached = np.flatnonzero(smoothed_T <= target)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return 0.0, 0.0
    fraction = (smoothed_T[i - 1] - target) / (smoothed_T[i - 1] - smoothed_T[i])
    return _interpolate_crossing(steps_T1, examples_T1, i, fraction)


def steps_to_target(run: Run, *, val_accuracy: float | None = None,
                    train_loss: float | None = None,
                    window_examples: int = LOSS_WINDOW_EXAMPLES) -> tuple[float, float] | None:
    """Optimizer steps and examples a run needed to first reach a target; None if it never did.

    Exactly one target is given. Validation accuracy is interpolated between the two epoch-end
    evaluations that bracket its first crossing; training loss is the centred moving average of
    the per-step losses (see the module docstring for both choices).

    Args:
      run: a `batchjax.run.Run`. A loss target reads its `step_losses` and
        `step_batch_sizes` (without the latter, examples are interpolated from the history's
        epoch ends), an accuracy target its `history`.
      val_accuracy: target validation accuracy (reached when >= it).
      train_loss: target training loss (reached when the smoothed loss is <= it).
      window_examples: examples spanned by the loss smoothing window.

    Returns:
      (steps, examples) at the first crossing, both floats (interpolated), or None.

    Raises:
      BatchjaxError: not exactly one target, or the run lacks what the target needs.
    """
    if (val_accuracy is None) == (train_loss is None):
        raise BatchjaxError("give exactly one target: val_accuracy=... or train_loss=...")
    if val_accuracy is not None:
        _check_history(run.history, ("steps", "examples_seen", "val_accuracy"))
        return _accuracy_crossing(run.history, float(val_accuracy))
    if not (isinstance(window_examples, int) and window_examples >= 1):
        raise BatchjaxError(f"window_examples must be an integer >= 1, got {window_examples!r}")
    return _loss_crossing(run, float(train_loss), window_examples)


def steps_to_target_table(runs: Iterable[Run], *, val_accuracy: float | None = None,
                          train_loss: float | None = None,
                          window_examples: int = LOSS_WINDOW_EXAMPLES):
    """`steps_to_target` of many runs, as arrays over batch sizes and seeds.

    Args:
      runs: `Run`s.
      val_accuracy, train_loss, window_examples: as for `steps_to_target`.

    Returns:
      (batch_sizes [num_B], seeds [num_seeds], steps [num_B, num_seeds],
      examples [num_B, num_seeds]): sorted; NaN where the target was not reached or the run
      is missing.
    """
    found = {}
    for run in runs:
        found[run.batch_size, run.seed] = steps_to_target(
            run, val_accuracy=val_accuracy, train_loss=train_loss,
            window_examples=window_examples)
    batch_sizes = np.asarray(sorted({b for b, _ in found}), np.int64)
    seeds = np.asarray(sorted({s for _, s in found}), np.int64)
    steps_BxS = np.full((batch_sizes.size, seeds.size), np.nan)
    examples_BxS = np.full_like(steps_BxS, np.nan)
    for (b, s), hit in found.items():
        if hit is not None:
            i, j = np.searchsorted(batch_sizes, b), np.searchsorted(seeds, s)
            steps_BxS[i, j], examples_BxS[i, j] = hit
    return batch_sizes, seeds, steps_BxS, examples_BxS


# --------------------------------------------------------------------------------------------
# The fit


@dataclasses.dataclass(frozen=True)
class CriticalFit:
    """S(B) = S_min + E_min / B fitted to steps-to-target points (McCandlish et al. eq. 2.11).

    Attributes:
      s_min, e_min: fitted fewest steps and fewest examples.
      b_crit: E_min / S_min.
      s_min_stderr, e_min_stderr, b_crit_stderr: from the weighted fit's covariance, with the
        scatter estimated from the residuals (0 for points exactly on the model).
      s_min_e_min_cov: covariance of the two fitted parameters.
      rms_relative_residual: root-mean-square of (S_b - S_hat_b) / S_hat_b over the points,
        with n - 2 degrees of freedom: the relative scatter about the model.
      batch_sizes: the batch sizes used in the fit (every seed reached the target, by default).
      mean_steps: the mean steps over seeds at those batch sizes (the points fitted).
      excluded_batch_sizes: batch sizes left out because (some of) their seeds did not reach.
      num_seeds: seeds per batch size given (columns of the steps array).
      b_crit_interval, s_min_interval, e_min_interval: 95% bootstrap intervals over seeds
        (2.5th and 97.5th percentiles), or None with a single seed.
      num_bootstrap: bootstrap replicates drawn (0 when none).
    """

    s_min: float
    e_min: float
    b_crit: float
    s_min_stderr: float
    e_min_stderr: float
    b_crit_stderr: float
    s_min_e_min_cov: float
    rms_relative_residual: float
    batch_sizes: tuple[float, ...]
    mean_steps: tuple[float, ...]
    excluded_batch_sizes: tuple[float, ...]
    num_seeds: int
    b_crit_interval: tuple[float, float] | None = None
    s_min_interval: tuple[float, float] | None = None
    e_min_interval: tuple[float, float] | None = None
    num_bootstrap: int = 0

    @property
    def valid(self) -> bool:
        """S_min > 0 and E_min > 0: the fit is of the model's shape and B_crit is meaningful."""
        return self.s_min > 0 and self.e_min > 0

    def predict_steps(self, batch_size: Any) -> np.ndarray | float:
        """S(B) = S_min + E_min / B, for a scalar or an array of batch sizes."""
        out = self.s_min + self.e_min / np.asarray(batch_size, np.float64)
        return float(out) if np.ndim(out) == 0 else out

    def predict_examples(self, batch_size: Any) -> np.ndarray | float:
        """E(B) = B S(B) = E_min + S_min B."""
        return np.asarray(batch_size, np.float64) * self.predict_steps(batch_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists when dumped)."""
        return dataclasses.asdict(self)


def _weighted_line(u_K: np.ndarray, s_K: np.ndarray):
    """IRLS for s = a + b u with relative errors: (a, b, cov [2, 2], rms relative residual)."""
    design_Kx2 = np.stack([np.ones_like(u_K), u_K], axis=1)
    weights_K = 1.0 / s_K**2
    for _ in range(_IRLS_ITERS):
        gram = design_Kx2.T @ (weights_K[:, None] * design_Kx2)
        coef = np.linalg.solve(gram, design_Kx2.T @ (weights_K * s_K))
        fitted_K = design_Kx2 @ coef
        if np.any(fitted_K <= 0):  # relative weights need a positive model; keep the last
            break
        new_weights_K = 1.0 / fitted_K**2
        done = np.allclose(new_weights_K, weights_K, rtol=1e-12, atol=0)
        weights_K = new_weights_K
        if done:
            break
    gram = design_Kx2.T @ (weights_K[:, None] * design_Kx2)
    coef = np.linalg.solve(gram, design_Kx2.T @ (weights_K * s_K))
    residual_K = s_K - design_Kx2 @ coef
    dof = s_K.size - 2
    scatter2 = float(np.sum(weights_K * residual_K**2) / dof) if dof > 0 else float("nan")
    return float(coef[0]), float(coef[1]), scatter2 * np.linalg.inv(gram), math.sqrt(scatter2)


def fit_line(batch_sizes: Sequence[float], mean_steps: Sequence[float]) -> tuple[float, float]:
    """(S_min, E_min) of S(B) = S_min + E_min / B through mean steps, with the weights of
    `fit_critical_batch` (relative errors) and no checks: the inner step of bootstraps."""
    b_K = np.asarray(batch_sizes, np.float64)
    s_min, e_min, _, _ = _weighted_line(1.0 / b_K, np.asarray(mean_steps, np.float64))
    return s_min, e_min


def _ratio_stderr(a: float, b: float, cov: np.ndarray) -> float:
    """Delta-method standard error of b / a."""
    grad = np.array([-b / a**2, 1.0 / a])
    return float(math.sqrt(max(grad @ cov @ grad, 0.0)))


def fit_critical_batch(batch_sizes: Sequence[float], steps: Any, *,
                       require_all_seeds: bool = True, num_bootstrap: int = 1000,
                       seed: int = 0) -> CriticalFit:
    """Fit S_min and E_min of S(B) = S_min + E_min / B; B_crit = E_min / S_min.

    Args:
      batch_sizes: the batch sizes B, distinct and positive [num_B].
      steps: steps to the target, [num_B] or per seed [num_B, num_seeds], NaN where a run
        never reached it. Each batch size contributes the mean over its seeds.
      require_all_seeds: use only batch sizes where every seed reached the target (the mean of
        those that did would be biased low); False uses any batch size with one that did.
      num_bootstrap: bootstrap replicates over seeds (with more than one seed; 0 skips).
      seed: seeds the bootstrap resampling.

    Returns:
      A `CriticalFit`.

    Raises:
      BatchjaxError: malformed input, or fewer than 3 batch sizes reached the target.
    """
    b_K = np.asarray(batch_sizes, np.float64)
    steps_KxS = np.asarray(steps, np.float64)
    if steps_KxS.ndim == 1:
        steps_KxS = steps_KxS[:, None]
    if (b_K.ndim != 1 or steps_KxS.ndim != 2 or steps_KxS.shape[0] != b_K.size
            or steps_KxS.shape[1] == 0):
        raise BatchjaxError(f"steps must be [num_B] or [num_B, num_seeds] for {b_K.size} "
                            f"batch sizes, got shape {np.shape(steps)}")
    if not np.all(np.isfinite(b_K) & (b_K > 0)) or np.unique(b_K).size != b_K.size:
        raise BatchjaxError(f"batch sizes must be distinct positive numbers, got {b_K.tolist()}")
    if np.any(steps_KxS <= 0):
        raise BatchjaxError("steps to target must be positive (NaN for not reached)")
    reached_KxS = np.isfinite(steps_KxS)
    keep_K = reached_KxS.all(axis=1) if require_all_seeds else reached_KxS.any(axis=1)
    if keep_K.sum() < 3:
        raise BatchjaxError(
            f"only {int(keep_K.sum())} of {b_K.size} batch sizes reached the target"
            f"{' with every seed' if require_all_seeds else ''}; fitting S_min and E_min needs "
            "at least 3 (lower the target, train for more epochs, or add batch sizes)")
    b_used, steps_used = b_K[keep_K], steps_KxS[keep_K]
    order = np.argsort(b_used)
    b_used, steps_used = b_used[order], steps_used[order]
    mean_K = np.nanmean(steps_used, axis=1)
    s_min, e_min, cov, rms = _weighted_line(1.0 / b_used, mean_K)

    intervals: dict[str, tuple[float, float] | None] = dict.fromkeys(("b_crit", "s_min", "e_min"))
    num_drawn = 0
    num_seeds = steps_KxS.shape[1]
    if num_seeds > 1 and num_bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(num_bootstrap):
            cols = rng.integers(0, num_seeds, num_seeds)
            sample_KxS = steps_used[:, cols]
            if not np.isfinite(sample_KxS).any(axis=1).all():
                continue  # a batch size without any reached seed in this draw
            a, b, _, _ = _weighted_line(1.0 / b_used, np.nanmean(sample_KxS, axis=1))
            draws.append((a, b, b / a))
        num_drawn = len(draws)
        if draws:
            draws_Dx3 = np.asarray(draws)
            for j, name in enumerate(("s_min", "e_min", "b_crit")):
                lo, hi = np.percentile(draws_Dx3[:, j], [2.5, 97.5])
                intervals[name] = (float(lo), float(hi))
    return CriticalFit(
        s_min=s_min, e_min=e_min, b_crit=e_min / s_min,
        s_min_stderr=float(math.sqrt(cov[0, 0])) if np.isfinite(cov[0, 0]) else float("nan"),
        e_min_stderr=float(math.sqrt(cov[1, 1])) if np.isfinite(cov[1, 1]) else float("nan"),
        b_crit_stderr=_ratio_stderr(s_min, e_min, cov) if np.all(np.isfinite(cov))
        else float("nan"),
        s_min_e_min_cov=float(cov[0, 1]), rms_relative_residual=rms,
        batch_sizes=tuple(b_used.tolist()), mean_steps=tuple(mean_K.tolist()),
        excluded_batch_sizes=tuple(np.sort(b_K[~keep_K]).tolist()), num_seeds=num_seeds,
        b_crit_interval=intervals["b_crit"], s_min_interval=intervals["s_min"],
        e_min_interval=intervals["e_min"], num_bootstrap=num_drawn)


# --------------------------------------------------------------------------------------------
# Regimes


@dataclasses.dataclass(frozen=True)
class Regimes:
    """Batch-size boundaries of the three regimes of Shallue et al. 2019, from a fit.

    Attributes:
      perfect_scaling_max: B_crit / factor; below it, E <= (1 + 1/factor) E_min.
      maximal_parallelism_min: factor * B_crit; above it, S <= (1 + 1/factor) S_min.
      factor: k of the module docstring.
    """

    perfect_scaling_max: float
    maximal_parallelism_min: float
    factor: float

    def regime(self, batch_size: float) -> str:
        """"perfect_scaling", "diminishing_returns" or "maximal_data_parallelism"."""
        if batch_size <= self.perfect_scaling_max:
            return "perfect_scaling"
        if batch_size >= self.maximal_parallelism_min:
            return "maximal_data_parallelism"
        return "diminishing_returns"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def regimes(fit: CriticalFit, factor: float = REGIME_FACTOR) -> Regimes:
    """The regime boundaries B_crit / factor and factor * B_crit of a valid fit.

    Raises:
      BatchjaxError: the fit is not valid (S_min or E_min <= 0), or factor <= 1.
    """
    if not fit.valid:
        raise BatchjaxError(f"the fit has S_min = {fit.s_min:.4g}, E_min = {fit.e_min:.4g}; "
                            "regimes need both > 0 (more batch sizes above B_crit are needed)")
    if not factor > 1:
        raise BatchjaxError(f"factor must be > 1, got {factor}")
    return Regimes(fit.b_crit / factor, fit.b_crit * factor, float(factor))


# --------------------------------------------------------------------------------------------
# The best learning rate against batch size (module docstring)

_LOG_B_NOISE_SPAN = math.log(1e4)  # the search reaches this factor beyond the batch sizes
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class OptimalRateFit:
    """eps_opt(B) = eps_max / (1 + B_noise / B) fitted to best learning rates.

    Attributes:
      eps_max, b_noise: the fitted parameters.
      log_eps_max_se, log_b_noise_se: standard errors of their natural logs (Gauss-Newton,
        scatter from the residuals); NaN without residual df.
      log_cov: covariance of (log eps_max, log B_noise), 2 x 2.
      df: residual degrees of freedom, points - 2.
      eps_max_interval, b_noise_interval: 95% t intervals on `df` (exponentiated from the
        logs), or None without residual df.
      rms_log_residual: root-mean-square residual of log eps (natural log) on `df`.
      batch_sizes, learning_rates: the points fitted.
      identified: False when the minimum lies at an end of the search range (B_noise
        indistinguishable from 0 or from infinity); then the intervals are None.
    """

    eps_max: float
    b_noise: float
    log_eps_max_se: float
    log_b_noise_se: float
    log_cov: tuple[tuple[float, float], tuple[float, float]]
    df: int
    eps_max_interval: tuple[float, float] | None
    b_noise_interval: tuple[float, float] | None
    rms_log_residual: float
    batch_sizes: tuple[float, ...]
    learning_rates: tuple[float, ...]
    identified: bool

    def predict(self, batch_size: Any) -> np.ndarray | float:
        """eps_opt(B) = eps_max / (1 + B_noise / B), for a scalar or an array."""
        out = self.eps_max / (1.0 + self.b_noise / np.asarray(batch_size, np.float64))
        return float(out) if np.ndim(out) == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _profile(log_b_noise: float, b_K: np.ndarray, y_K: np.ndarray, w_K: np.ndarray
             ) -> tuple[float, float]:
    """(log eps_max minimising the weighted squared log residuals at this B_noise, their sum)."""
    shift_K = np.log1p(math.exp(log_b_noise) / b_K)
    a = float(np.sum(w_K * (y_K + shift_K)) / np.sum(w_K))
    return a, float(np.sum(w_K * (y_K - a + shift_K) ** 2))


def fit_optimal_learning_rate(batch_sizes: Sequence[float], learning_rates: Sequence[float],
                              weights: Sequence[float] | None = None, *,
                              level: float = 0.95) -> OptimalRateFit:
    """Fit eps_opt(B) = eps_max / (1 + B_noise / B) in log space (module docstring).

    Args:
      batch_sizes: B, distinct and positive [num_B].
      learning_rates: the best learning rate at each B, positive [num_B].
      weights: relative weights of the points' squared log residuals (default equal: every
        best rate comes from the same factor-2 grid).
      level: of the t intervals.

    Returns:
      An `OptimalRateFit`.

    Raises:
      BatchjaxError: fewer than 3 points, or non-positive or repeated values.
    """
    b_K = np.asarray(batch_sizes, np.float64)
    lr_K = np.asarray(learning_rates, np.float64)
    w_K = np.ones_like(b_K) if weights is None else np.asarray(weights, np.float64)
    if b_K.ndim != 1 or lr_K.shape != b_K.shape or w_K.shape != b_K.shape:
        raise BatchjaxError(f"batch sizes, learning rates and weights must be equally long 1-d "
                            f"lists, got shapes {b_K.shape}, {lr_K.shape}, {w_K.shape}")
    if b_K.size < 3:
        raise BatchjaxError(f"fitting eps_max and B_noise needs best learning rates at 3 or more "
                            f"batch sizes, got {b_K.size}")
    if (not np.all(np.isfinite(b_K) & (b_K > 0)) or np.unique(b_K).size != b_K.size
            or not np.all(np.isfinite(lr_K) & (lr_K > 0))
            or not np.all(np.isfinite(w_K) & (w_K > 0))):
        raise BatchjaxError("batch sizes must be distinct and positive, learning rates and "
                            "weights positive and finite")
    order = np.argsort(b_K)
    b_K, lr_K, w_K = b_K[order], lr_K[order], w_K[order]
    y_K = np.log(lr_K)
    lo = math.log(b_K[0]) - _LOG_B_NOISE_SPAN
    hi = math.log(b_K[-1]) + _LOG_B_NOISE_SPAN
    grid = np.linspace(lo, hi, 801)
    shift_GxK = np.log1p(np.exp(grid)[:, None] / b_K[None, :])
    a_G = (shift_GxK + y_K) @ w_K / np.sum(w_K)
    rss = ((y_K + shift_GxK - a_G[:, None]) ** 2) @ w_K
    i = int(np.argmin(rss))
    identified = 0 < i < grid.size - 1
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    for _ in range(60):  # golden sections: the bracket shrinks by 0.618 each time
        c1, c2 = right - _GOLDEN * (right - left), left + _GOLDEN * (right - left)
        if _profile(c1, b_K, y_K, w_K)[1] <= _profile(c2, b_K, y_K, w_K)[1]:
            right = c2
        else:
            left = c1
    c = 0.5 * (left + right)
    a, rss_min = _profile(c, b_K, y_K, w_K)
    df = b_K.size - 2
    scatter2 = rss_min / df
    # d log eps / d (a, c): 1 and -B_noise / (B + B_noise).
    jac_Kx2 = np.stack([np.ones_like(b_K), -math.exp(c) / (b_K + math.exp(c))], axis=1)
    gram = jac_Kx2.T @ (w_K[:, None] * jac_Kx2)
    try:
        cov = scatter2 * np.linalg.inv(gram)
    except np.linalg.LinAlgError:
        cov = np.full((2, 2), np.nan)
    se_a, se_c = (math.sqrt(max(cov[k, k], 0.0)) if np.isfinite(cov[k, k]) else float("nan")
                  for k in range(2))
    eps_interval = b_noise_interval = None
    if identified and np.isfinite(se_a) and np.isfinite(se_c):
        from scipy import special  # on first use, as in batchjax.stats (which comes later)
        q = float(special.stdtrit(df, 0.5 + level / 2))
        eps_interval = (math.exp(a - q * se_a), math.exp(a + q * se_a))
        b_noise_interval = (math.exp(c - q * se_c), math.exp(c + q * se_c))
    return OptimalRateFit(
        eps_max=math.exp(a), b_noise=math.exp(c), log_eps_max_se=se_a, log_b_noise_se=se_c,
        log_cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
        df=df, eps_max_interval=eps_interval, b_noise_interval=b_noise_interval,
        rms_log_residual=math.sqrt(rss_min / np.mean(w_K) / df),
        batch_sizes=tuple(b_K.tolist()), learning_rates=tuple(lr_K.tolist()),
        identified=identified)
