"""Critical batch size: the fit against points made by its own model, steps to target by hand.

The figure of a fit is drawn in tests/test_plots.py (`batchjax.plots.plot_steps_to_target`).
"""

import json

import numpy as np
import pytest

from batchjax import BatchjaxError, TrainConfig, TrainResult
from batchjax.critical import fit_line as critical_fit_line
from batchjax.critical import (fit_critical_batch, regimes, smooth_step_losses, steps_to_target,
                               steps_to_target_table)
from batchjax.run import Run

BATCH_SIZES = 2.0 ** np.arange(3, 11)  # 8 ... 1024
S_MIN, E_MIN = 50.0, 10_000.0  # B_crit = 200


def model_steps(batch_sizes):
    return S_MIN + E_MIN / np.asarray(batch_sizes)


# --------------------------------------------------------------------------------------------
# The fit


def test_fit_recovers_exact_points():
    fit = fit_critical_batch(BATCH_SIZES, model_steps(BATCH_SIZES))
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-10)
    assert fit.e_min == pytest.approx(E_MIN, rel=1e-10)
    assert fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-10)
    assert fit.b_crit_stderr == pytest.approx(0.0, abs=1e-6)
    assert fit.b_crit_interval is None and fit.num_seeds == 1  # one seed: no bootstrap
    assert fit.predict_steps(100.0) == pytest.approx(S_MIN + E_MIN / 100)
    np.testing.assert_allclose(fit.predict_examples(BATCH_SIZES),
                               E_MIN + S_MIN * BATCH_SIZES, rtol=1e-10)
    # Three points determine the line.
    three = fit_critical_batch([16, 128, 1024], model_steps([16, 128, 1024]))
    assert three.b_crit == pytest.approx(200.0, rel=1e-10)


def test_fit_of_noisy_points_is_unbiased_and_its_errors_are_calibrated():
    """5% multiplicative noise on 8 points: estimates within their standard errors."""
    rng = np.random.default_rng(0)
    fits = [fit_critical_batch(BATCH_SIZES, model_steps(BATCH_SIZES)
                               * np.exp(0.05 * rng.normal(size=BATCH_SIZES.size)))
            for _ in range(300)]
    b_crit = np.array([f.b_crit for f in fits])
    stderr = np.array([f.b_crit_stderr for f in fits])
    # Bias: far below the spread of a single fit (about 10% here).
    assert abs(b_crit.mean() / 200.0 - 1) < 0.02
    # The reported standard error matches the actual scatter of the estimates...
    assert np.median(stderr) == pytest.approx(b_crit.std(), rel=0.25)
    # ...and +-2 of them cover the truth about as often as a t(6) interval should (91%).
    covered = np.mean(np.abs(b_crit - 200.0) <= 2 * stderr)
    assert 0.85 <= covered <= 0.97
    assert np.mean([f.rms_relative_residual for f in fits]) == pytest.approx(0.05, rel=0.2)


def test_per_seed_steps_with_bootstrap_and_not_reached():
    rng = np.random.default_rng(1)
    steps = model_steps(BATCH_SIZES)[:, None] * np.exp(0.05 * rng.normal(size=(8, 5)))
    steps[-1, 2] = np.nan  # one seed at B = 1024 never reached the target
    fit = fit_critical_batch(BATCH_SIZES, steps, num_bootstrap=400)
    assert fit.excluded_batch_sizes == (1024.0,) and len(fit.batch_sizes) == 7
    np.testing.assert_allclose(fit.mean_steps, steps[:-1].mean(axis=1))
    lo, hi = fit.b_crit_interval
    assert lo < fit.b_crit < hi and lo < 200.0 < hi
    assert fit.num_bootstrap == 400 and fit.num_seeds == 5
    lenient = fit_critical_batch(BATCH_SIZES, steps, require_all_seeds=False, num_bootstrap=0)
    assert lenient.excluded_batch_sizes == () and lenient.b_crit_interval is None
    json.dumps(fit.to_dict())


def test_too_few_batch_sizes_reached_raises():
    steps = np.full(BATCH_SIZES.size, np.nan)
    steps[:2] = model_steps(BATCH_SIZES[:2])
    with pytest.raises(BatchjaxError, match="only 2 of 8 batch sizes reached"):
        fit_critical_batch(BATCH_SIZES, steps)
    with pytest.raises(BatchjaxError, match=r"\[num_B\]"):
        fit_critical_batch(BATCH_SIZES, steps[:5])
    with pytest.raises(BatchjaxError, match="distinct positive"):
        fit_critical_batch([8, 8, 16], [3.0, 2.0, 1.0])


def test_regimes_follow_from_the_model():
    fit = fit_critical_batch(BATCH_SIZES, model_steps(BATCH_SIZES))
    bounds = regimes(fit)
    assert bounds.perfect_scaling_max == pytest.approx(50.0)
    assert bounds.maximal_parallelism_min == pytest.approx(800.0)
    # At the boundaries: 25% more examples than E_min, 25% more steps than S_min.
    assert fit.predict_examples(bounds.perfect_scaling_max) == pytest.approx(1.25 * E_MIN)
    assert fit.predict_steps(bounds.maximal_parallelism_min) == pytest.approx(1.25 * S_MIN)
    assert [bounds.regime(b) for b in (8, 200, 1024)] == [
        "perfect_scaling", "diminishing_returns", "maximal_data_parallelism"]
    # Steps that fall faster than 1/B give S_min < 0: no regimes to speak of.
    bad = fit_critical_batch([8, 16, 32], [1000.0, 400.0, 150.0])
    assert not bad.valid
    with pytest.raises(BatchjaxError, match="regimes need both > 0"):
        regimes(bad)


# --------------------------------------------------------------------------------------------
# Steps to target


def history(val_accuracy, steps_per_epoch=100, batch_size=8):
    epochs = len(val_accuracy)
    return {"epoch": np.arange(1.0, epochs + 1), "val_accuracy": np.asarray(val_accuracy, float),
            "steps": steps_per_epoch * np.arange(1.0, epochs + 1),
            "examples_seen": steps_per_epoch * batch_size * np.arange(1.0, epochs + 1)}


def run(history_=None, step_losses=(), step_batch_sizes=(), batch_size=8, seed=0):
    """A `Run` with only what steps to target read."""
    return Run(config=TrainConfig(batch_size=batch_size, seed=seed), dataset={},
               history=history_ if history_ is not None else {},
               step_losses=np.asarray(step_losses, float),
               step_batch_sizes=np.asarray(step_batch_sizes, np.int64))


def test_accuracy_target_interpolates_between_the_bracketing_epochs():
    r = run(history([0.80, 0.90, 0.96, 0.95]))
    # 0.93 is half-way from 0.90 (step 200) to 0.96 (step 300).
    assert steps_to_target(r, val_accuracy=0.93) == pytest.approx((250.0, 2000.0))
    assert steps_to_target(r, val_accuracy=0.96) == pytest.approx((300.0, 2400.0))
    assert steps_to_target(r, val_accuracy=0.97) is None
    # Already reached at the first evaluation: its steps, an upper bound.
    assert steps_to_target(r, val_accuracy=0.5) == (100.0, 800.0)
    # Saved float32 accuracies: 950/1000 is 0.949999988 and counts as reaching 0.95.
    rounded = run(history([0.9, float(np.float32(0.95))]))
    assert steps_to_target(rounded, val_accuracy=0.95) == pytest.approx((200.0, 1600.0))


def test_loss_target_from_smoothed_step_losses():
    losses = 2.0 - 0.01 * np.arange(200)  # linear: a centred average leaves it unchanged
    h = history([0.5, 0.6], steps_per_epoch=100, batch_size=32)
    r = run(h, losses, [32] * 200, batch_size=32)
    # Smoothed loss of step t is 2 - 0.01 t away from the ends; 1.555 is crossed at t = 44.5.
    assert steps_to_target(r, train_loss=1.555) == pytest.approx((44.5, 44.5 * 32))
    assert steps_to_target(r, train_loss=0.001) is None  # the last loss is 0.01
    # Without per-step batch sizes, examples are interpolated from the epoch ends.
    r = run(h, losses, batch_size=32)
    assert steps_to_target(r, train_loss=1.555) == pytest.approx((44.5, 44.5 * 32))
    # A diverged run counts only its steps before the first non-finite loss.
    r = run(h, losses[:60].tolist() + [np.nan] + [0.0] * 100, batch_size=32)
    assert steps_to_target(r, train_loss=1.3) is None


def test_smoothing_window_spans_the_stated_examples():
    rng = np.random.default_rng(2)
    for batch_size, sigma in ((8, 1.0), (128, 0.25)):  # per-step noise ~ 1 / sqrt(B)
        noisy = sigma * rng.normal(size=4000)
        smoothed = smooth_step_losses(noisy, np.full(4000, batch_size), window_examples=1024)
        half = int(np.ceil(1024 / batch_size)) // 2
        # The same noise left at both batch sizes: sigma / sqrt(steps in the window).
        assert smoothed[500:-500].std() == pytest.approx(sigma / np.sqrt(2 * half + 1), rel=0.1)


def test_train_results_and_tables():
    def result(batch_size, seed, accuracies):
        h = history(accuracies, steps_per_epoch=800 // batch_size, batch_size=batch_size)
        h.update(train_loss=np.ones(len(accuracies)))
        return TrainResult(config=TrainConfig(batch_size=batch_size, seed=seed), dataset={},
                           step_losses=np.ones(1), step_batch_sizes=np.ones(1, np.int64),
                           history=h, compile_seconds=0.0, params=None)

    runs = [result(8, 0, [0.8, 0.95]), result(8, 1, [0.9, 0.95]), result(16, 0, [0.7, 0.8])]
    batch_sizes, seeds, steps, examples = steps_to_target_table(runs, val_accuracy=0.9)
    assert batch_sizes.tolist() == [8, 16] and seeds.tolist() == [0, 1]
    np.testing.assert_allclose(steps, [[100 + 100 * 2 / 3, 100], [np.nan, np.nan]])
    np.testing.assert_allclose(examples, steps * np.array([[8], [16]]))
    with pytest.raises(BatchjaxError, match="exactly one target"):
        steps_to_target(runs[0])
    with pytest.raises(BatchjaxError, match="no per-epoch history"):
        steps_to_target(run(step_losses=[1.0]), val_accuracy=0.9)
    # A loss target needs no history when every step's batch size is known.
    assert steps_to_target(run(step_losses=[2.0, 1.0, 0.5], step_batch_sizes=[4, 4, 4]),
                           train_loss=1.0, window_examples=1) == (1.0, 4.0)


def test_fit_line_is_the_fit_without_checks():
    # The bootstraps' inner step: the same weighted line as `fit_critical_batch`.
    rng = np.random.default_rng(5)
    steps = model_steps(BATCH_SIZES) * np.exp(0.05 * rng.normal(size=BATCH_SIZES.size))
    fit = fit_critical_batch(BATCH_SIZES, steps)
    assert critical_fit_line(BATCH_SIZES, steps) == (pytest.approx(fit.s_min),
                                                     pytest.approx(fit.e_min))
