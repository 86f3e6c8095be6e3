"""The analysis and its statistics, on constructed results with known answers.

`fake_sweep` builds results in memory whose properties are set by construction (per-step loss
noise of s.d. 0.5 / sqrt(B), a gap that shrinks with B, minibatch variance exactly 1/B with the
finite-population correction, sharpness growing as B^0.3), so each verdict has a known right
answer; `critical_sweep` builds runs that reach their targets after exactly S(B) = S_min +
E_min / B steps. `tests/test_report.py` and `tests/test_plots.py` render the same sweeps. The
statistics are checked against closed forms, textbook t quantiles and scipy.stats.
"""

import math
import pathlib

import numpy as np
import pytest
import scipy.stats

from batchjax import analysis, stats
from batchjax.analysis import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, analyse
from batchjax.config import TrainConfig
from batchjax.results import SweepResults, run_name
from batchjax.run import Run

CLAIM_VERDICTS = {SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE}


def fake_run(batch_size, seed, *, epochs=4, num_train=512, noise=True, diverge_epoch=None,
             sharpness_exponent=0.3):
    """One constructed run (see the module docstring); `diverge_epoch` stops it in that epoch.

    Its sharpness grows as B^sharpness_exponent (with 2% seed-to-seed scatter); None: not
    measured.
    """
    rng = np.random.default_rng(1000 * batch_size + seed)
    spe = -(-num_train // batch_size)
    sizes = np.array([batch_size] * (num_train // batch_size)
                     + ([num_train % batch_size] if num_train % batch_size else []))
    step_sizes = np.tile(sizes, epochs)
    seen = np.cumsum(step_sizes)
    trend = 0.3 + 2.0 * np.exp(-seen / num_train)
    losses = trend + rng.normal(0, 0.5 / math.sqrt(batch_size), len(seen))
    e = np.arange(1, epochs + 1, dtype=float)
    gap = 0.2 / math.log2(batch_size)
    history = {
        "epoch": e, "train_loss": 0.3 + 2.0 * np.exp(-e) + rng.normal(0, 0.005, epochs),
        "train_accuracy": 0.95 - 0.5 * np.exp(-e * 32 / batch_size),
        "val_loss": 0.3 + gap + 2.0 * np.exp(-e) + rng.normal(0, 0.005, epochs),
        "val_accuracy": 0.95 - gap / 4 - 0.5 * np.exp(-e * 32 / batch_size)
        + rng.normal(0, 0.002, epochs),
        "train_seconds": 0.002 * spe * (1 + rng.normal(0, 0.02, epochs)),
        "eval_seconds": np.full(epochs, 0.01),
        "steps": e * spe, "examples_seen": e * num_train,
    }
    records = []
    for k in range(epochs + 1) if noise else []:
        trace = 40.0 * (1 + 0.1 * k)
        variance = {str(b): trace / b * (num_train - b) / (num_train - 1) for b in (8, 32, 128)}
        analytic = trace / batch_size * (num_train - batch_size) / (num_train - 1)
        records.append({
            "step": k * spe, "examples_seen": k * num_train, "train_loss": 2.0,
            "grad_sq_norm": 1.0 / (k + 1), "trace_cov": trace, "trace_cov_per_layer": {},
            "noise_scale": trace * (k + 1), "mean_gsnr": 0.1, "minibatch_variance": variance,
            "snr": {}, "probe_size": num_train, "seconds": 0.01,
            "empirical": {"batch_size": batch_size, "num_batches": 200, "analytic": analytic,
                          "mean": analytic * (1 + rng.normal(0, 0.03)),
                          "stderr": 0.03 * analytic},
        })
    hessian = None
    if sharpness_exponent is not None:
        scale = batch_size ** sharpness_exponent * (1 + rng.normal(0, 0.02))
        hessian = {"lambda_max": 4.0 * scale, "lambda_min": -0.01 * scale,
                   "trace": 60.0 * scale, "trace_stderr": 0.5, "converged": True,
                   "iterations": 12, "num_examples": num_train, "hutchinson_samples": 20,
                   "num_params": 12730, "seconds": 0.5, "loss": 0.3, "accuracy": 0.95}
    run = Run(config=TrainConfig(batch_size=batch_size, epochs=epochs, seed=seed, hidden=16),
              dataset={"name": "fake-digits", "source": "constructed in tests",
                       "num_train": num_train, "num_val": 128, "image_shape": [28, 28],
                       "num_classes": 10},
              history=history, step_losses=losses, step_batch_sizes=step_sizes, noise=records,
              compile_seconds=1.0, trained_with=[run_name(batch_size, seed)],
              final_train={"loss": float(history["train_loss"][-1] - 0.02),
                           "accuracy": float(history["val_accuracy"][-1] + gap / 4)},
              sharpness=hessian)
    if diverge_epoch is not None:
        stop = (diverge_epoch - 1) * spe + 3
        run.status, run.diverged_step = "diverged", stop
        run.step_losses = np.concatenate([losses[:stop], [np.nan]])
        run.step_batch_sizes = step_sizes[:stop + 1]
        run.history = {k: v[:diverge_epoch - 1] for k, v in history.items()}
        run.noise = records[:diverge_epoch]
        run.final_train = None
        run.sharpness = None
    return run


def fake_sweep(batch_sizes=(8, 32, 128), seeds=(0, 1, 2), *, diverged=(), **kw) -> SweepResults:
    """A constructed sweep; `diverged` lists (batch_size, seed, epoch) of runs that diverge."""
    stops = {(b, s): e for b, s, e in diverged}
    runs = [fake_run(b, s, diverge_epoch=stops.get((b, s)), **kw)
            for b in batch_sizes for s in seeds]
    manifest = {"kind": "batchjax-sweep", "sweep": {"batch_sizes": list(batch_sizes),
                                                    "seeds": list(seeds)},
                "sharpness": {"probe_size": 1024, "num_iters": 100, "tol": 0.01,
                              "hutchinson_samples": 20},
                "config": {"epochs": runs[0].config.epochs}, "dataset": runs[0].dataset,
                "sessions": [], "started": "then", "finished": "now"}
    return SweepResults(manifest=manifest, runs=runs, missing=[], path=pathlib.Path("."))


S_MIN, E_MIN, TARGET_LOSS, TARGET_ACC, B_SIMPLE = 50.0, 10_000.0, 0.4, 0.5, 150.0


def critical_run(batch_size, seed, *, num_train=4096, epochs=20, floor=None):
    """A run that reaches TARGET_LOSS and TARGET_ACC after exactly S(B) = S_MIN + E_MIN / B
    steps (McCandlish et al. eq. 2.11).

    Per-step loss: linear in the step, so the centred moving average leaves it unchanged; it
    crosses TARGET_LOSS at S(B) and levels off at `floor` (default TARGET_LOSS - 0.5) far from
    the crossing. Validation accuracy: 0.5 steps / S(B) at epoch ends, linear through the two
    evaluations that bracket the crossing.
    """
    s_b = S_MIN + E_MIN / batch_size
    spe = num_train // batch_size
    t = np.arange(epochs * spe, dtype=float)
    floor = TARGET_LOSS - 0.5 if floor is None else floor
    losses = np.maximum(TARGET_LOSS + 1.0 - t / s_b, floor)
    steps = spe * np.arange(1, epochs + 1, dtype=float)
    history = {"epoch": np.arange(1, epochs + 1, dtype=float),
               "train_loss": np.full(epochs, 0.5), "train_accuracy": np.full(epochs, 0.9),
               "val_loss": np.full(epochs, 0.6), "val_accuracy": np.minimum(0.5 * steps / s_b,
                                                                           1.0),
               "train_seconds": np.full(epochs, 0.1), "eval_seconds": np.full(epochs, 0.01),
               "steps": steps, "examples_seen": steps * batch_size}
    records = [{"step": 0, "examples_seen": 0, "noise_scale": B_SIMPLE / 2},
               {"step": int(steps[-1]), "examples_seen": int(steps[-1]) * batch_size,
                "noise_scale": 1.5 * B_SIMPLE}]
    return Run(config=TrainConfig(batch_size=batch_size, epochs=epochs, seed=seed),
               dataset={"name": "model-digits", "num_train": num_train, "num_val": 512},
               history=history, final_train={"loss": 0.5, "accuracy": 0.9},
               step_losses=losses, step_batch_sizes=np.full(len(t), batch_size),
               noise=records, compile_seconds=1.0, trained_with=[run_name(batch_size, seed)])


def critical_sweep(batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024), seeds=(0,), **kw):
    runs = [critical_run(b, s, **kw) for b in batch_sizes for s in seeds]
    manifest = {"kind": "batchjax-sweep", "dataset": runs[0].dataset,
                "sweep": {"batch_sizes": list(batch_sizes), "seeds": list(seeds)}}
    return SweepResults(manifest=manifest, runs=runs, missing=[], path=pathlib.Path("."))


# --------------------------------------------------------------------------------------------
# Statistics: closed forms, textbook quantiles, scipy


def test_t_distribution_against_closed_forms_and_tables():
    for t in (-3.0, -0.5, 0.0, 1.2, 7.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                  abs=1e-12)
        assert stats.t_cdf(t, math.inf) == pytest.approx(0.5 * math.erfc(-t / math.sqrt(2)),
                                                         abs=1e-12)
    # Student's table: two-sided 95% and one-sided 95% critical values.
    for df, two, one in ((1, 12.706, 6.314), (2, 4.303, 2.920), (4, 2.776, 2.132),
                         (7, 2.365, 1.895), (math.inf, 1.960, 1.645)):
        assert stats.t_quantile(0.975, df) == pytest.approx(two, abs=5e-4)
        assert stats.t_quantile(0.95, df) == pytest.approx(one, abs=5e-4)
    assert math.isnan(stats.t_cdf(1.0, 0)) and math.isnan(stats.t_quantile(0.5, float("nan")))


def test_mean_interval_is_the_t_interval():
    values = [0.31, 0.35, 0.29, float("nan"), None]
    e = stats.mean_interval(values)
    v = np.array([0.31, 0.35, 0.29])
    assert (e.mean, e.n, e.df) == (pytest.approx(v.mean()), 3, 2)
    assert e.sd == pytest.approx(math.sqrt(np.sum((v - v.mean()) ** 2) / 2))
    half = 4.302652729911275 * e.sd / math.sqrt(3)  # t_{0.975, 2}
    assert (e.lo, e.hi) == (pytest.approx(v.mean() - half), pytest.approx(v.mean() + half))
    one = stats.mean_interval([2.0])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.lo) and math.isnan(one.se)
    assert stats.mean_interval([]).n == 0


def test_estimate_and_difference():
    # Moved from the report's tests: the difference of two estimates is now Welch's test.
    a, b = stats.Estimate.of([1.0, 2.0, 3.0, float("nan")]), stats.Estimate.of([0.0, 0.0])
    assert (a.mean, a.n) == (2.0, 3) and a.sd == pytest.approx(1.0)
    test = stats.welch(a, stats.Estimate.of([1.0, 1.0, 1.0]))
    assert test.diff == 1.0 and test.se == pytest.approx(1 / math.sqrt(3))
    assert test.t == pytest.approx(math.sqrt(3))
    assert test.df == pytest.approx(2.0)  # the constant sample adds no variance: df of a
    assert math.isnan(stats.welch(stats.Estimate.of([1.0]), b).t)  # one seed: no SE


def test_welch_against_the_formula_and_scipy():
    rng = np.random.default_rng(0)
    for n_a, n_b in ((3, 3), (3, 5), (10, 4)):
        a, b = rng.normal(0.3, 0.1, n_a), rng.normal(0.2, 0.3, n_b)
        test = stats.welch(a, b)
        va, vb = a.var(ddof=1) / n_a, b.var(ddof=1) / n_b
        df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
        assert test.diff == pytest.approx(a.mean() - b.mean())
        assert test.se == pytest.approx(math.sqrt(va + vb))
        assert test.df == pytest.approx(df)
        for alternative in ("two-sided", "less", "greater"):
            ref = scipy.stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
            assert test.t == pytest.approx(ref.statistic)
            assert test.p(alternative) == pytest.approx(ref.pvalue, rel=1e-9)
        assert test.p_one_sided == pytest.approx(min(test.p("less"), test.p("greater")))
        lo, hi = test.interval()
        q = scipy.stats.t.ppf(0.975, df)
        assert (lo, hi) == (pytest.approx(test.diff - q * test.se),
                            pytest.approx(test.diff + q * test.se))


def test_welch_keeps_its_false_positive_rate_at_three_seeds():
    """Equal means, 3 seeds each: the one-sided test at 0.05 rejects at most about 5% of the
    time (Welch is slightly conservative here); the old rule, beyond 2 SE, rejected 6%."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (4000, 3)), rng.normal(0, 2, (4000, 3))
    rejected = np.mean([stats.welch(x, y).p("less") < stats.ALPHA for x, y in zip(a, b)])
    se = math.sqrt(0.05 * 0.95 / 4000)
    assert 0.02 < rejected < 0.05 + 3 * se


def test_direction_and_degenerate_tests():
    big = stats.welch([1.0, 1.1, 0.9], [0.0, 0.1, -0.1])
    assert big.direction() == 1
    assert stats.welch([0.0, 0.1, -0.1], [1.0, 1.1, 0.9]).direction() == -1
    # t = 2.5 on 2 df: beyond the old 2-SE rule, not significant at 0.05 one-sided.
    close = stats.t_test(2.5, 1.0, 2.0)
    assert close.p("greater") == pytest.approx(0.5 - 2.5 / (2 * math.sqrt(2 + 6.25)))
    assert close.p("greater") > 0.05 and close.direction() == 0
    exact = stats.welch([1.0, 1.0], [0.0, 0.0])  # no spread at all
    assert exact.t == math.inf and exact.direction() == 1 and exact.p("less") == 1.0
    same = stats.welch([1.0, 1.0], [1.0, 1.0])
    assert same.t == 0.0 and same.direction() == 0
    assert not stats.welch([1.0], [0.0, 1.0]).known


def test_satterthwaite_combines_variances():
    parts = [(0.04, 2.0), (0.01, 9.0), (0.09, 4.0)]
    total = sum(v for v, _ in parts)
    assert stats.satterthwaite_df(parts) == pytest.approx(
        total ** 2 / sum(v * v / d for v, d in parts))
    test = stats.combined_test(-0.5, parts)
    assert test.se == pytest.approx(math.sqrt(total)) and test.t == pytest.approx(-0.5 / 0.374166,
                                                                                rel=1e-5)
    # One component is the one-sample case: df unchanged.
    assert stats.satterthwaite_df([(0.3, 5.0)]) == pytest.approx(5.0)


def test_fit_slope_against_least_squares_references():
    rng = np.random.default_rng(2)
    x = np.log2(np.repeat([8.0, 32.0, 128.0], 3))
    y = 0.6 * x + 1.0 + rng.normal(0, 0.1, x.size)
    fit = stats.fit_slope(x, y)
    ref = scipy.stats.linregress(x, y)
    assert fit.slope == pytest.approx(ref.slope) and fit.intercept == pytest.approx(ref.intercept)
    assert fit.se == pytest.approx(ref.stderr) and fit.df == 7 and fit.n == 9
    q = scipy.stats.t.ppf(0.975, 7)
    assert (fit.lo, fit.hi) == (pytest.approx(ref.slope - q * ref.stderr),
                                pytest.approx(ref.slope + q * ref.stderr))
    assert fit.test(0.6).t == pytest.approx((ref.slope - 0.6) / ref.stderr)
    assert stats.fit_slope(x[:2], y[:2]) is None  # OLS needs a residual
    # OLS through points exactly on a line (rates on a lattice): no SE, not an SE of 1e-17.
    lattice = stats.fit_slope(np.log2([8.0, 16, 32, 64]), np.log2([1e-3, 2e-3, 4e-3, 8e-3]))
    assert lattice.slope == pytest.approx(1.0) and math.isnan(lattice.se)
    assert not lattice.test(0.5).known and math.isnan(lattice.lo)
    # Weighted: points exactly on a line keep the error-bar SE (never scaled down) ...
    sy = np.array([0.1, 0.2, 0.1, 0.3])
    xw = np.array([1.0, 2.0, 3.0, 4.0])
    exact = stats.fit_slope(xw, 2.0 - xw, sy)
    w = 1 / sy ** 2
    sxx = np.sum(w * (xw - np.sum(w * xw) / np.sum(w)) ** 2)
    assert exact.slope == pytest.approx(-1.0) and exact.se == pytest.approx(1 / math.sqrt(sxx))
    # ... and scatter beyond the error bars scales it by sqrt(chi^2 / dof).
    yw = 2.0 - xw + np.array([0.5, -0.5, 0.5, -0.5])
    scattered = stats.fit_slope(xw, yw, sy)
    ref_slope = np.polyfit(xw, yw, 1, w=1 / sy)[0]  # polyfit weights multiply residuals
    resid = yw - np.polyval(np.polyfit(xw, yw, 1, w=1 / sy), xw)
    chi2 = np.sum(w * resid ** 2) / 2
    assert scattered.slope == pytest.approx(ref_slope)
    assert scattered.se == pytest.approx(math.sqrt(chi2 / sxx)) and scattered.df == 2
    # Two points with error bars: the slope from the error bars, on the normal distribution.
    two = stats.fit_slope([0.0, 1.0], [0.0, 1.0], [0.1, 0.1])
    assert two.df == math.inf and two.se == pytest.approx(0.1 * math.sqrt(2))


def test_plain_number_writes_no_exponent():
    cases = {256: "256", 260.4: "260", 0.001: "0.001", 2e-7: "0.0000002", 0.0625: "0.0625",
             44.123: "44.1", 1234567.8: "1230000", -0.5: "-0.5", 0: "0"}
    for value, text in cases.items():
        assert stats.plain_number(value) == text
    assert stats.plain_number(212.4, 2) == "210" and stats.plain_number(5.8, 2) == "5.8"


# --------------------------------------------------------------------------------------------
# Per-run statistics


def test_roughness_recovers_the_noise_sd_around_a_trend():
    rng = np.random.default_rng(0)
    steps, sd = 4000, 0.2
    losses = np.linspace(2.0, 0.5, steps) + rng.normal(0, sd, steps)
    sizes = np.full(steps, 32)
    values = analysis.compute_roughness(losses, sizes, 32, steps_per_epoch=500)
    assert len(values) == 7  # epochs 2..8
    assert np.mean(values) == pytest.approx(sd, rel=0.05)


def test_roughness_leaves_out_partial_batches():
    rng = np.random.default_rng(1)
    losses = rng.normal(1.0, 0.1, 1000)
    sizes = np.tile(np.r_[np.full(99, 32), 7], 10)
    spiked = losses.copy()
    spiked[sizes == 7] += 50.0  # the partial batch's loss is noisier; it must not count
    a = analysis.compute_roughness(losses, sizes, 32, 100)
    b = analysis.compute_roughness(spiked, sizes, 32, 100)
    np.testing.assert_allclose(a, b)


def test_summary_leaves_diverged_runs_out_of_means():
    results = fake_sweep(diverged=[(8, 1, 2)])
    a = analyse(results)
    assert a.summary[8].diverged == 1 and a.summary[8]["val_loss"].n == 2
    assert a.summary[32]["val_loss"].n == 3
    ok = [r for r in results.runs if r.batch_size == 8 and not r.diverged]
    assert a.summary[8]["val_loss"].mean == pytest.approx(
        np.mean([r.history["val_loss"][-1] for r in ok]))
    assert a.diverged == [(run_name(8, 1), results.runs[1].diverged_step)]


def test_target_accuracy_default_is_reached_by_every_run():
    results = fake_sweep()
    target = analysis.default_target_accuracy(results)
    for run in results.runs:
        assert run.history["val_accuracy"].max() >= target
    stats_ = [analysis.run_stats(r, target) for r in results.runs]
    assert all(np.isfinite(s["seconds_to_target"]) for s in stats_)


# --------------------------------------------------------------------------------------------
# Claims


def test_claims_on_constructed_sweep_have_the_known_answers():
    a = analyse(fake_sweep())
    claims = a.claims
    assert [c.number for c in claims] == [1, 2, 3, 4, 5]
    verdicts = {c.number: c.verdict for c in claims}
    assert verdicts[1] == SUPPORTED  # variance exactly ~1/B
    init = claims[0].decided_at
    assert init.epoch == 0 and init.fit.n == 9 and init.fit.df == 7
    # N = 512: the finite-population correction makes the expected slope -1.098, not -1 ...
    b = np.array([8.0, 32.0, 128.0])
    fpc = np.polyfit(np.log2(b), np.log2((512 - b) / (b * 511)), 1)[0]
    assert init.fpc_slope == pytest.approx(fpc) and round(fpc, 3) == -1.098
    # ... and the fitted slope is consistent with it (two-sided p >= 0.05).
    assert init.tests()[2].p() >= 0.05 and init.within_3se == init.compared == 9
    assert verdicts[2] == SUPPORTED  # noise sd 0.5 / sqrt(B)
    for measure in claims[1].measures:
        assert measure.outcome == "down" and measure.test.direction() == 1
    # R falls with B over runs; its slope is less steep than the noise's -1/2, because at large
    # B one step moves the constructed trend by as much as the noise (a trend the first
    # difference cannot remove).
    r_slope = claims[1].measures[0].slope
    assert -0.5 < r_slope.lo < r_slope.hi < 0 and r_slope.df == 7
    assert verdicts[3] == NOT_SUPPORTED  # the gap shrinks with B by construction
    assert claims[2].gap.direction() == 1
    assert all(c.verdict in CLAIM_VERDICTS for c in claims)


def test_claim_tests_are_welch_tests_of_the_seed_values():
    results = fake_sweep()
    a = analyse(results)
    gaps = {b: [analysis.run_stats(r)["gap_loss"] for r in results.runs if r.batch_size == b]
            for b in (8, 128)}
    ref = scipy.stats.ttest_ind(gaps[8], gaps[128], equal_var=False)
    gap = a.claims[2].gap
    assert gap.t == pytest.approx(ref.statistic) and gap.df == pytest.approx(ref.df)
    # Claim 4's time to target: seed spread and epoch-time jitter, by hand.
    speed = a.claims[3]
    parts = []
    for b in (8, 128):
        runs = [r for r in results.runs if r.batch_size == b]
        seconds = [analysis.run_stats(r, a.target_accuracy)["seconds_to_target"] for r in runs]
        epochs = [analysis.run_stats(r, a.target_accuracy)["epochs_to_target"] for r in runs]
        # Each fake run is its own training group: its epoch times are all separate series.
        times = np.concatenate([r.history["train_seconds"] + r.history["eval_seconds"]
                                for r in runs])
        parts += [(np.var(seconds, ddof=1) / 3, 2.0),
                  (np.mean(epochs) * np.var(times, ddof=1), times.size - 1.0)]
    v = sum(p for p, _ in parts)
    assert speed.time_to_target_test.se == pytest.approx(math.sqrt(v))
    assert speed.time_to_target_test.df == pytest.approx(v ** 2 / sum(p * p / d for p, d in parts))


def test_a_difference_beyond_two_se_is_not_enough_at_three_seeds():
    """Gaps whose Welch t is 2.5 on about 2 df: the old 2-SE rule said 'not supported', the
    one-sided t test at 0.05 (p = 0.065) leaves claim 3 inconclusive."""
    results = fake_sweep()
    sd = 0.1 / 2.5 * math.sqrt(3)  # SE of the B = 8 mean: 0.04, so t = 0.1 / 0.04
    gap_values = {8: [0.2 - sd, 0.2, 0.2 + sd], 128: [0.1, 0.1, 0.1]}
    for b, values in gap_values.items():
        for r, g in zip([r for r in results.runs if r.batch_size == b], values):
            r.final_train = dict(r.final_train, loss=0.1)
            r.history["val_loss"][-1] = 0.1 + g
    claim = analyse(results).claims[2]
    assert claim.gap.t == pytest.approx(2.5) and claim.gap.df == pytest.approx(2.0)
    assert claim.gap.p("greater") == pytest.approx(
        scipy.stats.t.sf(2.5, 2)) and claim.gap.p("greater") > 0.05
    assert claim.verdict == INCONCLUSIVE


def test_one_seed_is_inconclusive_where_seed_spread_is_needed():
    claims = analyse(fake_sweep(seeds=(0,))).claims
    verdicts = {c.number: c.verdict for c in claims}
    assert verdicts[2] == verdicts[3] == INCONCLUSIVE
    assert not claims[2].gap.known and claims[1].measures[0].outcome == "unknown"
    # Claim 1 has its own uncertainty (minibatch sampling), so one seed can decide it.
    assert verdicts[1] == SUPPORTED and claims[0].decided_at.fit.df == 1


def test_missing_noise_records_make_claim_1_inconclusive():
    claim = analyse(fake_sweep(noise=False)).claims[0]
    assert claim.verdict == INCONCLUSIVE and not claim.measured and claim.decided_at is None


def test_balance_claim_compares_with_the_best():
    a = analyse(fake_sweep())
    claim = a.claims[4]
    assert claim.prior == [(c.number, c.verdict) for c in a.claims[:4]]
    keys = [c.key for c in claim.checks]
    assert keys == ["val_accuracy", "seconds_to_target", "roughness"]
    roughness = claim.checks[2]
    assert roughness.against == 8 and roughness.outcome == "ok"  # smoother than B = 8
    assert roughness.test.diff == pytest.approx(a.summary[32]["roughness"].mean
                                                - a.summary[8]["roughness"].mean)


# --------------------------------------------------------------------------------------------
# Beyond the original: sharpness and the critical batch size


def test_sharpness_has_the_known_answer():
    s = analyse(fake_sweep()).sharpness  # lambda_max and tr(H) grow as B^0.3
    assert s.measured and s.verdict == SUPPORTED
    for m in s.measures:
        # The fitted slope recovers the constructed exponent, inside its t interval.
        assert m.slope.slope == pytest.approx(0.3, abs=0.02) and m.points == 9
        assert m.slope.lo < 0.3 < m.slope.hi and m.outcome == "flatter"
    assert s.negative == s.runs == 9 and s.median_negative_ratio == pytest.approx(0.0025)
    assert s.lambda_ratio == pytest.approx(16 ** 0.3, rel=0.05)
    assert analyse(fake_sweep(sharpness_exponent=-0.3)).sharpness.verdict == NOT_SUPPORTED
    assert not analyse(fake_sweep(sharpness_exponent=None)).sharpness.measured


def test_critical_analysis_recovers_b_crit_from_runs_on_the_model():
    results = critical_sweep()
    crit = analyse(results, target_loss=TARGET_LOSS, target_accuracy=TARGET_ACC).critical
    for target in crit.targets:
        np.testing.assert_allclose(target.steps[:, 0], S_MIN + E_MIN / target.batch_sizes,
                                   rtol=1e-9)
        assert target.fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-6)
        assert target.fit.s_min == pytest.approx(S_MIN, rel=1e-6)
        assert target.fit.e_min == pytest.approx(E_MIN, rel=1e-6)
        assert target.regimes.perfect_scaling_max == pytest.approx(50.0)
        assert target.regimes.maximal_parallelism_min == pytest.approx(800.0)
        assert target.given and target.fit_df == 6
        lo, hi = target.b_crit_t_interval  # exact points: SE ~ 0, so the interval is B_crit
        assert lo == pytest.approx(200.0, rel=1e-6) and hi == pytest.approx(200.0, rel=1e-6)
        rows = target.by_batch_size()
        assert rows[0][:1] == (8,) and rows[0][1].mean == pytest.approx(1300.0)
        assert rows[-1][2].mean == pytest.approx(61200.0) and rows[-1][3] == 1
    assert crit.b_simple.mean == pytest.approx(B_SIMPLE)  # mean of 75 and 225


def test_b_crit_t_interval_is_on_the_log_scale():
    rng = np.random.default_rng(4)
    results = critical_sweep(batch_sizes=(8, 32, 128, 512))
    for r in results.runs:  # 3% noise on every step count: the fit has residuals
        r.step_losses = TARGET_LOSS + 1.0 - np.arange(r.step_losses.size) / (
            (S_MIN + E_MIN / r.batch_size) * (1 + 0.03 * rng.normal()))
    target = analyse(results, target_loss=TARGET_LOSS).critical.primary
    fit = target.fit
    half = scipy.stats.t.ppf(0.975, 2) * fit.b_crit_stderr / fit.b_crit
    lo, hi = target.b_crit_t_interval
    assert target.fit_df == 2 and lo > 0
    assert (lo, hi) == (pytest.approx(fit.b_crit * math.exp(-half)),
                        pytest.approx(fit.b_crit * math.exp(half)))


def test_critical_default_loss_target_is_reached_by_every_run():
    # Runs level off at different losses: the target is the highest of their floors, rounded up.
    runs = [critical_run(b, 0, floor=f) for b, f in ((8, 0.0123), (64, 0.0456), (512, 0.0321))]
    results = SweepResults(manifest={}, runs=runs, missing=[], path=pathlib.Path("."))
    assert analysis.default_target_loss(results) == 0.046
    primary = analyse(results).critical.primary
    assert np.isfinite(primary.steps).all() and primary.target == 0.046
    assert not primary.given


def test_critical_analysis_without_enough_batch_sizes_says_why():
    two = analyse(critical_sweep(batch_sizes=(8, 64)), target_loss=TARGET_LOSS,
                  target_accuracy=TARGET_ACC).critical
    for target in two.targets:
        assert target.fit is None and target.note.startswith("only 2 of 2 batch sizes reached")
        assert "needs at least 3" in target.note
    # A batch size that never reaches the target is left out; three others still give the fit.
    results = critical_sweep(batch_sizes=(8, 64, 256, 1024))
    results.runs[-1].step_losses = np.maximum(results.runs[-1].step_losses, TARGET_LOSS + 0.2)
    fit = analyse(results, target_loss=TARGET_LOSS).critical.primary.fit
    assert fit.excluded_batch_sizes == (1024.0,)
    assert fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-6)


def test_accuracy_target_reached_at_the_first_evaluation_is_an_upper_bound():
    results = critical_sweep(batch_sizes=(8, 64, 256, 1024))
    results.runs[0].history["val_accuracy"][:] = 0.9  # B = 8 at the target after one epoch
    secondary = analyse(results, target_accuracy=TARGET_ACC).critical.secondary
    assert secondary.upper_bound[:, 0].tolist() == [True, False, False, False]
    assert secondary.fit.excluded_batch_sizes == (8.0,)
    assert secondary.fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-6)


# --------------------------------------------------------------------------------------------
# What the figures draw


def test_smoothed_step_losses_are_geometric_means_of_moving_averages():
    results = fake_sweep(seeds=(0, 1))
    curve = analyse(results).step_loss[32]
    runs = [r for r in results.runs if r.batch_size == 32]
    w = round(512 / 8 / 32)  # 1/8 epoch of examples
    assert curve.window == w
    cums = [np.cumsum(np.r_[0.0, r.step_losses]) for r in runs]
    averages = [(c[w:] - c[:-w]) / w for c in cums]
    np.testing.assert_allclose(curve.smoothed.mean, np.sqrt(averages[0] * averages[1]),
                               rtol=1e-9)
    assert curve.smoothed.n == 2 and np.all(curve.smoothed.low <= curve.smoothed.mean)


def test_noise_moments_hold_what_figure_4_draws():
    results = fake_sweep(seeds=(0, 1))
    a = analyse(results)
    assert [m.epoch for m in a.noise_moments] == [0.0, 1.0, 2.0, 4.0]
    at = a.noise_moments[1].by_batch_size[32]
    runs = [r for r in results.runs if r.batch_size == 32]
    emp = [r.noise[1]["empirical"] for r in runs]
    assert at.empirical_mean == pytest.approx(np.mean([e["mean"] for e in emp]))
    assert at.empirical_se == pytest.approx(math.hypot(*[e["stderr"] for e in emp]) / 2)
    assert at.trace == pytest.approx(44.0) and at.probe_size == 512  # 40 (1 + 0.1 k), k = 1


def test_an_ordinary_sweep_is_not_a_grid():
    results = fake_sweep()
    a = analyse(results)
    assert not analysis.is_grid_sweep(results) and a.grid is None and a.critical is not None
    assert len(a.claims) == 5
