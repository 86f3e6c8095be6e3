"""The critical batch size with the learning rate tuned per batch size (issue #15), on constructed
grids with known answers.

`grid_sweep` builds a learning-rate grid whose runs reach the training-loss target after exactly
S(B, eps) = S_opt(B) (1 + 0.15 k^2) f_seed steps, where eps = eps_opt(B) 2^k, eps_opt(B) =
EPS_MAX / (1 + B_NOISE / B) (McCandlish et al. eq. 2.7), S_opt(B) = S_MIN + E_MIN / B (eq. 2.11)
and the seed factors f_seed = 0.97, 1, 1.03 average to 1. So the best rate of each batch size is
eps_opt(B), the mean steps there are S_opt(B), and the fits must return the constants. Their
noise records follow B_simple(step) = NOISE0 (B / 64)^0.25 (1 + step / S_opt(B)) on log-spaced
steps, so B_simple averaged over training up to the crossing has a closed form. Special cases:
B = 4, where no rate brings every seed to the target; B = 1024, whose grid ends at the best
rate (an edge: unreliable); B = 16, where one seed of one rate diverged.

`tests/test_report.py` and `tests/test_plots.py` render the same grids.
"""

import math
import pathlib

import numpy as np
import pytest
import scipy.stats

from batchjax import analysis, critical, stats
from batchjax.analysis import (BUDGET, DIVERGED, HOPELESS, MISSING, NOT_REACHED, REACHED,
                               analyse, analyse_grid, choose_best_rate, interpolate_optimum,
                               run_b_simple_average)
from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.results import SweepResults
from batchjax.run import Run

S_MIN, E_MIN = 50.0, 10_000.0  # B_crit = 200
EPS_MAX, B_NOISE = 0.5, 100.0
NOISE0 = 400.0
TARGET = 0.4
FLOOR = 0.2  # where the loss of a run that reaches the target levels off
SEED_FACTORS = (0.97, 1.0, 1.03)
BATCH_SIZES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
CURVATURE = 0.15  # S grows by this fraction times k^2, k the log2 distance from the best rate
NUM_TRAIN = 4096


def s_opt(batch_size):
    return S_MIN + E_MIN / np.asarray(batch_size, float)


def eps_opt(batch_size):
    return EPS_MAX / (1 + B_NOISE / np.asarray(batch_size, float))


def noise_scale(batch_size, step):
    return NOISE0 * (batch_size / 64) ** 0.25 * (1 + step / s_opt(batch_size))


def grid_run(batch_size, learning_rate, seed, steps=None, *, optimizer="sgd", diverge_at=None,
             stopped=None, noise=True):
    """A run whose smoothed loss crosses TARGET after exactly `steps` steps (None: never).

    The loss is linear in the step until well past the crossing (a centred moving average
    leaves it unchanged); a run that never reaches the target levels off above it.
    """
    length = int(1.6 * (steps if steps is not None else s_opt(batch_size))) + 400
    t = np.arange(length, dtype=float)
    if steps is not None:
        losses = np.maximum(TARGET + 1.0 - t / steps, FLOOR)
    else:
        losses = np.maximum(TARGET + 1.0 - t / s_opt(batch_size), TARGET + 0.1)
    status, diverged_step = "complete", None
    if diverge_at is not None:
        losses = np.concatenate([losses[:diverge_at], [np.nan]])
        status, diverged_step = "diverged", diverge_at
    record_steps = sorted({0, *np.unique(np.round(np.geomspace(1, len(losses), 20))).astype(int)})
    records = [{"step": int(k), "examples_seen": int(k) * batch_size,
                "noise_scale": float(noise_scale(batch_size, k)), "probe_size": 1000,
                "grad_sq_norm": 1.0, "trace_cov": float(noise_scale(batch_size, k)),
                "method": "dense"} for k in record_steps if k < len(losses)] if noise else []
    spe = NUM_TRAIN // batch_size
    epochs = max(1, len(losses) // spe)
    e = np.arange(1, epochs + 1, dtype=float)
    history = {"epoch": e, "train_loss": np.full(epochs, 0.5),
               "train_accuracy": np.full(epochs, 0.9), "val_loss": np.full(epochs, 0.6),
               "val_accuracy": np.full(epochs, 0.9), "train_seconds": np.full(epochs, 0.1),
               "eval_seconds": np.full(epochs, 0.01), "steps": e * spe,
               "examples_seen": e * spe * batch_size}
    run = Run(config=TrainConfig(batch_size=batch_size, seed=seed, learning_rate=learning_rate,
                                 optimizer=optimizer, epochs=epochs, noise_schedule="log"),
              dataset={"name": "grid-digits", "num_train": NUM_TRAIN, "num_val": 512},
              history=history, step_losses=losses,
              step_batch_sizes=np.full(len(losses), batch_size), noise=records,
              status=status, diverged_step=diverged_step,
              path=pathlib.Path(f"bs{batch_size:05d}_lr{learning_rate:.3g}_seed{seed}"))
    run.stopped = stopped or ("diverged" if diverge_at is not None else
                              "target" if steps is not None else "hopeless")
    return run


def grid_ks(batch_size):
    """The grid at B, as log2 distances k from eps_opt(B): 6 rates, the best inside but at
    B = 1024, where the grid ends at the best rate."""
    return range(-5, 1) if batch_size == 1024 else range(-2, 4)


def grid_sweep(batch_sizes=BATCH_SIZES, seeds=(0, 1, 2), *, optimizer="sgd", rate=eps_opt,
               drop=(), noise=True):
    """A constructed grid sweep (module docstring); `drop` lists (B, k, seed) of missing runs."""
    runs, listed = [], {}
    for b in batch_sizes:
        listed[str(b)] = []
        for k in grid_ks(b):
            lr = float(rate(b) * 2.0 ** k)
            listed[str(b)].append(lr)
            for s in seeds:
                if (b, k, s) in drop:
                    continue
                steps = s_opt(b) * (1 + CURVATURE * k * k) * SEED_FACTORS[s]
                if b == 4:  # no rate brings every seed to the target
                    runs.append(grid_run(b, lr, s, steps if s == 0 else None,
                                         optimizer=optimizer, noise=noise,
                                         stopped=None if s == 0 else
                                         ("hopeless" if s == 1 else "budget")))
                elif b == 16 and k == 2 and s == 1:  # one seed of one rate diverged
                    runs.append(grid_run(b, lr, s, None, optimizer=optimizer, noise=noise,
                                         diverge_at=int(steps / 3)))
                else:
                    runs.append(grid_run(b, lr, s, steps, optimizer=optimizer, noise=noise))
    manifest = {"kind": "batchjax-sweep", "dataset": runs[0].dataset,
                "sweep": {"batch_sizes": list(batch_sizes), "seeds": list(seeds)},
                "config": {"optimizer": optimizer, "noise_schedule": "log", "noise_points": 20,
                           "lr_scaling": "none"},
                "grid": {"learning_rates": listed, "extended": {"1024": ["up", "up"]},
                         "target_loss": TARGET, "stop_factor": 3, "max_epochs": 40}}
    return SweepResults(manifest=manifest, runs=runs, missing=[], path=pathlib.Path("grid"))


# --------------------------------------------------------------------------------------------
# The best rate on constructed tables


def test_best_rate_is_the_fewest_mean_steps_among_rates_every_seed_reached():
    nan = np.nan
    table = np.array([[130.0, 140.0, 150.0],   # eligible, mean 140
                      [100.0, 104.0, 96.0],    # eligible, mean 100: the best
                      [60.0, nan, 70.0],       # faster, but one seed did not reach: excluded
                      [110.0, 112.0, 108.0],   # eligible, mean 110
                      [nan, nan, nan]])
    best = choose_best_rate(table)
    assert best.index == 1 and best.edge is None and best.ties == [1]
    assert best.faster_partial == [2]
    # Near the best: not significantly slower by Welch's one-sided test (scipy as reference).
    near = [i for i in (0, 1, 3) if i == 1 or scipy.stats.ttest_ind(
        table[i], table[1], equal_var=False, alternative="greater").pvalue >= stats.ALPHA]
    assert best.near == near and 0 not in near
    # Ties go to the smaller rate; edges are flagged.
    tie = choose_best_rate(np.array([[90.0, 90.0], [80.0, 80.0], [80.0, 80.0]]))
    assert tie.index == 1 and tie.ties == [1, 2] and tie.edge is None
    assert choose_best_rate(np.array([[50.0, 52.0], [60.0, 61.0]])).edge == "low"
    assert choose_best_rate(np.array([[70.0, 72.0], [60.0, 61.0]])).edge == "high"
    assert choose_best_rate(np.array([[70.0, 72.0]])).edge == "single"
    # No rate at which every seed reached: no best rate, and nothing is dropped silently.
    none = choose_best_rate(np.array([[nan, 5.0], [nan, nan]]))
    assert none.index is None and none.edge is None


def test_grid_reads_steps_outcomes_and_the_best_rate_per_batch_size():
    g = analyse_grid(grid_sweep())
    assert g.batch_sizes == list(BATCH_SIZES) and g.seeds == [0, 1, 2]
    assert g.target_loss == TARGET and g.target_source == "manifest" and g.optimizer == "sgd"
    for b in BATCH_SIZES[1:]:
        rates = g.rates[b]
        ks = list(grid_ks(b))
        np.testing.assert_allclose(rates.learning_rates, eps_opt(b) * 2.0 ** np.array(ks))
        for cell, k in zip(rates.cells, ks):
            expected = s_opt(b) * (1 + CURVATURE * k * k) * np.array(SEED_FACTORS)
            if b == 16 and k == 2:
                assert [s.outcome for s in cell.seeds] == [REACHED, DIVERGED, REACHED]
                assert not cell.complete and cell.steps.n == 2
                expected[1] = np.nan
            np.testing.assert_allclose([s.steps for s in cell.seeds], expected, rtol=1e-9)
            np.testing.assert_allclose([s.examples for s in cell.seeds], expected * b,
                                       rtol=1e-9)
        assert rates.best.learning_rate == pytest.approx(eps_opt(b), rel=1e-12)
        # S(B) and E(B) at the best rate, with the t interval over the 3 seeds.
        values = s_opt(b) * np.array(SEED_FACTORS)
        half = scipy.stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
        assert rates.steps.mean == pytest.approx(s_opt(b), rel=1e-9)
        assert (rates.steps.lo, rates.steps.hi) == (pytest.approx(s_opt(b) - half, rel=1e-9),
                                                    pytest.approx(s_opt(b) + half, rel=1e-9))
        assert rates.examples.mean == pytest.approx(b * s_opt(b), rel=1e-9)
    assert g.rates[16].not_reached() == {DIVERGED: 1}
    # B = 1024: the best is the largest rate of its grid, after the sweep's two extensions.
    top = g.rates[1024]
    assert top.edge == "high" and top.unreliable and not top.extensions_left
    assert g.unreliable == [1024]
    assert all(not g.rates[b].unreliable for b in BATCH_SIZES[1:-1])


def test_a_batch_size_where_no_rate_reached_is_reported_and_left_out():
    g = analyse_grid(grid_sweep())
    four = g.rates[4]
    assert four.best is None and g.unreached == [4]
    assert four.note.startswith("no rate reached: none of the 6 learning rates brought all 3 "
                                "seeds to the target (6 brought some)")
    assert four.not_reached() == {HOPELESS: 6, BUDGET: 6}  # counted, not dropped
    assert [c.reached for c in four.cells] == [1] * 6
    assert 4.0 not in g.fit.batch_sizes
    assert (4, "no rate reached") in g.scaling.excluded


def test_missing_runs_count_as_not_reached():
    # Seed 2 of the best rate at B = 64 never finished: that rate cannot be the best.
    g = analyse_grid(grid_sweep(drop=[(64, 0, 2)]))
    rates = g.rates[64]
    k0 = rates.cells[2]
    assert k0.learning_rate == pytest.approx(eps_opt(64)) and k0.outcomes() == {REACHED: 2,
                                                                                MISSING: 1}
    # The next best: k = -1 and k = +1 tie exactly (1.15 S_opt); the smaller rate wins.
    assert rates.best.learning_rate == pytest.approx(eps_opt(64) / 2)
    assert rates.choice.ties == [1, 3] and rates.choice.faster_partial == [2]


def test_outcome_without_a_recorded_reason():
    run = grid_run(32, 0.1, 0, None)
    run.stopped = None
    out = analysis._seed_outcome(run, 0, TARGET, "x")
    assert out.outcome == NOT_REACHED and math.isnan(out.steps)


# --------------------------------------------------------------------------------------------
# The fits


def test_eq_2_11_at_the_best_rates_recovers_the_constants():
    g = analyse_grid(grid_sweep())
    fit = g.fit
    assert fit.batch_sizes == tuple(float(b) for b in BATCH_SIZES[1:])
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-6)
    assert fit.e_min == pytest.approx(E_MIN, rel=1e-6)
    assert fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-6)
    assert g.fit_df == 6 and g.regimes.perfect_scaling_max == pytest.approx(50.0)
    # The bootstrap over seeds, drawn within each batch size: the seed factors (3% apart)
    # move S(B) apart independently, so the interval has a width and holds 200.
    lo, hi = fit.b_crit_interval
    assert lo < 200.0 < hi and 1.01 < hi / lo < 1.5
    assert g.num_bootstrap == analysis.GRID_BOOTSTRAP
    # Without the unreliable B = 1024 (still on the model): the same constants.
    assert g.fit_without_unreliable.b_crit == pytest.approx(200.0, rel=1e-6)
    assert 1024.0 not in g.fit_without_unreliable.batch_sizes


def test_bootstrap_reselects_the_best_rate_within_each_batch_size():
    # Seed-to-seed scatter that differs between batch sizes: the bootstrap interval widens.
    results = grid_sweep(batch_sizes=(8, 32, 128, 512))
    rng = np.random.default_rng(7)
    for r in results.runs:
        steps = critical.steps_to_target(r, train_loss=TARGET)[0]
        factor = math.exp(0.1 * rng.normal())
        r.step_losses = np.maximum(TARGET + 1.0 - np.arange(r.step_losses.size)
                                   / (steps * factor), FLOOR)
    g = analyse_grid(results, num_bootstrap=300)
    lo, hi = g.fit.b_crit_interval
    assert lo < g.fit.b_crit < hi and hi / lo > 1.05
    # The reference: the same draws by hand (numpy only).
    rng = np.random.default_rng(0)
    tables = [np.array([[s.steps for s in c.seeds] for c in g.rates[b].cells if c.complete])
              for b in (8, 32, 128, 512)]
    draws = []
    for _ in range(300):
        means = [t[:, rng.integers(0, 3, 3)].mean(axis=1).min() for t in tables]
        s_min, e_min = critical.fit_line([8, 32, 128, 512], means)
        draws.append(e_min / s_min)
    assert (lo, hi) == tuple(pytest.approx(v) for v in np.percentile(draws, [2.5, 97.5]))


def test_eq_2_7_fit_recovers_known_parameters_from_noisy_data():
    b = 2.0 ** np.arange(3, 11)
    exact = critical.fit_optimal_learning_rate(b, eps_opt(b))
    assert exact.eps_max == pytest.approx(EPS_MAX, rel=1e-6)
    assert exact.b_noise == pytest.approx(B_NOISE, rel=1e-6) and exact.identified
    rng = np.random.default_rng(0)
    fits = [critical.fit_optimal_learning_rate(b, eps_opt(b) * np.exp(0.15 * rng.normal(size=8)))
            for _ in range(300)]
    assert np.median([f.eps_max for f in fits]) == pytest.approx(EPS_MAX, rel=0.03)
    assert np.median([f.b_noise for f in fits]) == pytest.approx(B_NOISE, rel=0.1)
    # The t intervals on n - 2 = 6 df cover the truth about 95% of the time.
    se = math.sqrt(0.95 * 0.05 / 300)
    for name, truth in (("b_noise", B_NOISE), ("eps_max", EPS_MAX)):
        covered = np.mean([getattr(f, f"{name}_interval")[0] <= truth
                           <= getattr(f, f"{name}_interval")[1] for f in fits])
        assert abs(covered - 0.95) < 4 * se, (name, covered)
    # The SE of log B_noise matches the scatter of the estimates.
    log_b = np.log([f.b_noise for f in fits])
    assert np.median([f.log_b_noise_se for f in fits]) == pytest.approx(log_b.std(), rel=0.3)
    assert np.mean([f.rms_log_residual for f in fits]) == pytest.approx(0.15, rel=0.15)
    # A rate that does not grow with B, or grows as B: B_noise is not identified.
    assert not critical.fit_optimal_learning_rate(b, np.full(8, 0.1)).identified
    linear = critical.fit_optimal_learning_rate(b, 1e-3 * b)
    assert not linear.identified and linear.b_noise_interval is None
    with pytest.raises(BatchjaxError, match="at 3 or more batch sizes"):
        critical.fit_optimal_learning_rate(b[:2], eps_opt(b[:2]))


def test_best_rate_against_b_on_the_grid():
    g = analyse_grid(grid_sweep())
    scaling = g.scaling
    assert scaling.batch_sizes == list(BATCH_SIZES[1:-1]) and scaling.primary == "eq27"
    assert dict(scaling.excluded)[1024].startswith("unreliable: the best is the largest rate")
    assert scaling.eq27.eps_max == pytest.approx(EPS_MAX, rel=1e-6)
    assert scaling.eq27.b_noise == pytest.approx(B_NOISE, rel=1e-6)
    ref = scipy.stats.linregress(np.log2(BATCH_SIZES[1:-1]), np.log2(eps_opt(BATCH_SIZES[1:-1])))
    assert scaling.power.slope == pytest.approx(ref.slope) and scaling.power.df == 5


def test_adam_gets_the_power_law():
    g = analyse_grid(grid_sweep(optimizer="adam_keras", rate=lambda b: 1e-3 * np.sqrt(b / 8)))
    assert g.scaling.primary == "power"
    assert g.scaling.power.slope == pytest.approx(0.5, rel=1e-9)
    # The constructed optima lie exactly on the line: no residual, so no SE and no interval
    # (rather than an interval of width 0 and t statistics of 1e15).
    assert np.isnan(g.scaling.power.se) and np.isnan(g.scaling.power.lo)
    assert "no residual: no interval, no test" in grid_section_text(g)


def grid_section_text(g):
    from batchjax import report
    return "\n".join(report._scaling_lines(g))


def test_the_optimum_is_the_vertex_of_the_parabola_through_the_best_and_its_neighbours():
    # log steps = 5 + 0.7 (log lr - log 0.013)^2 exactly: the vertex is 0.013, between the
    # grid's 0.01 and 0.02.
    rates = np.array([0.005, 0.01, 0.02])
    steps = np.exp(5 + 0.7 * (np.log(rates) - np.log(0.013)) ** 2)
    assert interpolate_optimum(rates, steps) == pytest.approx(0.013, rel=1e-12)
    # Flat: the middle rate; never beyond the outer rates.
    assert interpolate_optimum(rates, [100, 100, 100]) == 0.01
    assert 0.005 <= interpolate_optimum(rates, [100, 99.999, 1e9]) <= 0.02


def test_the_best_rate_against_b_uses_the_refined_optima():
    # Steps asymmetric about the grid's best rate: log steps a parabola in log2 lr whose
    # vertex sits a third of a grid step above eps_opt(B); the refined optima recover it and
    # eq. 2.7 is fitted to them, not to the grid rates.
    shift = 1 / 3

    def tilted(b):
        return eps_opt(b) * 2.0 ** shift

    sweep = grid_sweep(rate=eps_opt)
    by_cell = {}
    for run in sweep.runs:
        k = round(math.log2(run.config.learning_rate / eps_opt(run.batch_size)))
        if run.batch_size in (4, 16, 1024) or not np.isfinite(run.step_losses).all():
            continue
        steps = s_opt(run.batch_size) * math.exp(0.3 * (k - shift) ** 2)
        by_cell[(run.batch_size, k, run.seed)] = steps
        run.step_losses = np.maximum(TARGET + 1.0 - np.arange(len(run.step_losses)) / steps,
                                     FLOOR)
    g = analyse_grid(sweep)
    for b in g.scaling.batch_sizes:
        if b in (4, 16, 1024):
            continue
        assert g.rates[b].best.learning_rate == pytest.approx(eps_opt(b))  # the grid's best
        assert g.rates[b].optimum == pytest.approx(tilted(b), rel=0.02)  # the vertex
    i = g.scaling.batch_sizes.index(64)
    assert g.scaling.learning_rates[i] == g.rates[64].optimum


# --------------------------------------------------------------------------------------------
# B_simple along the best runs


def test_b_simple_is_the_time_average_up_to_the_crossing():
    run = grid_run(64, 0.1, 0, 500.0)
    # Linear in the step, so its average from 0 to S is its value at S / 2, exactly.
    assert run_b_simple_average(run, 500.0) == pytest.approx(noise_scale(64, 250.0))
    # The records are log-spaced: their plain mean is far below the time average.
    plain = np.mean([rec["noise_scale"] for rec in run.noise if rec["step"] <= 500])
    assert plain < 0.9 * noise_scale(64, 250.0)
    assert math.isnan(run_b_simple_average(grid_run(64, 0.1, 0, 500.0, noise=False), 500.0))
    assert run_b_simple_average(run, 0.0) == pytest.approx(noise_scale(64, 0.0))


def test_b_simple_against_b_crit_with_a_t_interval():
    g = analyse_grid(grid_sweep())
    noise = g.noise
    per_b = {b: noise_scale(b, s_opt(b) * np.array(SEED_FACTORS) / 2) for b in BATCH_SIZES[1:]}
    for b, values in per_b.items():
        assert noise.by_batch_size[b].mean == pytest.approx(values.mean(), rel=1e-9)
    means = np.array([v.mean() for v in per_b.values()])
    assert noise.b_simple.mean == pytest.approx(means.mean(), rel=1e-9)
    assert noise.b_simple.n == 8 and noise.b_simple.df == 7
    assert noise.ratio == pytest.approx(means.mean() / 200.0, rel=1e-6)
    # The log ratio's t test: B_crit has no scatter here (points on the model), so its SE is
    # B_simple's alone, on 7 df.
    se = means.std(ddof=1) / math.sqrt(8) / means.mean()
    assert noise.test.se == pytest.approx(se, rel=1e-4) and noise.test.df == pytest.approx(7.0)
    q = scipy.stats.t.ppf(0.975, 7)
    assert noise.ratio_interval[0] == pytest.approx(noise.ratio * math.exp(-q * se), rel=1e-4)
    assert noise.outcome == ("larger" if noise.ratio > 1 else "smaller")
    assert noise.records >= 10
    assert "log-spaced" in g.noise_description and "1,000" in g.noise_description


def test_ratio_test_combines_both_uncertainties():
    results = grid_sweep(batch_sizes=(8, 32, 128, 512))
    rng = np.random.default_rng(3)
    for r in results.runs:  # 5% scatter of the counts about the model: the fit has residuals
        steps = critical.steps_to_target(r, train_loss=TARGET)[0]
        r.step_losses = np.maximum(TARGET + 1.0 - np.arange(r.step_losses.size)
                                   / (steps * math.exp(0.05 * rng.normal())), FLOOR)
    g = analyse_grid(results, num_bootstrap=50)
    fit, noise = g.fit, g.noise
    parts = [((noise.b_simple.se / noise.b_simple.mean) ** 2, 3.0),
             ((fit.b_crit_stderr / fit.b_crit) ** 2, 2.0)]
    v = sum(p for p, _ in parts)
    assert noise.test.se == pytest.approx(math.sqrt(v))
    assert noise.test.df == pytest.approx(v ** 2 / sum(p * p / d for p, d in parts))
    assert noise.test.diff == pytest.approx(math.log(noise.b_simple.mean / fit.b_crit))
    assert noise.ratio_bootstrap is not None


# --------------------------------------------------------------------------------------------
# The sweep's analysis


def test_analyse_on_a_grid_sweep_has_no_claims():
    a = analyse(grid_sweep())
    assert a.claims == [] and a.critical is None and a.grid is not None
    assert a.grid.fit.b_crit == pytest.approx(200.0, rel=1e-6)
    assert [name for name, _ in a.diverged] == [f"bs00016_lr{4 * eps_opt(16):.3g}_seed1"]
    assert analysis.is_grid_sweep(grid_sweep())


def test_target_may_be_given_or_chosen_when_the_sweep_recorded_none():
    results = grid_sweep(batch_sizes=(8, 32, 128))
    results.manifest["grid"]["target_loss"] = None
    g = analyse_grid(results, target_loss=TARGET, num_bootstrap=0)
    assert g.target_source == "given" and g.fit.b_crit_interval is None
    # Every run that reaches the target levels off at FLOOR (its lowest smoothed loss: the
    # centred average of a constant tail is that constant); at B = 4 only seed 0 does.
    lows = [np.min(r.step_losses) for r in results.runs]
    assert analysis.default_grid_target_loss(results) == pytest.approx(max(lows))
    g = analyse_grid(results, num_bootstrap=0)
    assert g.target_source == "default" and g.target_loss == pytest.approx(FLOOR)
    # A rate some seed of which levels off higher only raises the target if no other rate
    # at that batch size brings every seed lower.
    worst = next(r for r in results.runs if r.batch_size == 32)
    worst.step_losses = np.maximum(worst.step_losses, 0.25)
    assert analysis.default_grid_target_loss(results) == pytest.approx(FLOOR)


def test_too_few_batch_sizes_give_no_fit_and_say_why():
    g = analyse_grid(grid_sweep(batch_sizes=(4, 8, 16)))
    assert g.fit is None and g.noise is None
    assert g.fit_note.startswith("only 2 of 3 batch sizes have a rate at which every seed")
    assert g.scaling.eq27 is None and "at least 3" in g.scaling.note


# --------------------------------------------------------------------------------------------
# The script on a directory of grid sweeps


def test_figures_script_writes_each_report_and_the_comparison(tmp_path, monkeypatch, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "figures_script", pathlib.Path(__file__).parents[1] / "scripts" / "figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sweeps = {"sgd": grid_sweep(batch_sizes=(8, 32, 128, 512)),
              "adam_keras": grid_sweep(batch_sizes=(8, 32, 128, 512), optimizer="adam_keras",
                                       rate=lambda b: 1e-3 * np.sqrt(b / 8))}
    for name, results in sweeps.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        results.path = tmp_path / name
    # The grid engineer's loader reads the run directories; here the constructed sweeps.
    monkeypatch.setattr(script, "load_sweep", lambda path: sweeps[pathlib.Path(path).name])
    assert script.main([str(tmp_path), "--no-figures", "--quiet"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# The critical batch size with the learning rate tuned")
    assert "## SGD (`sgd`)" in text and "## Adam (Keras) (`adam_keras`)" in text
    for name in sweeps:
        assert (tmp_path / name / "report.md").exists()
        assert (tmp_path / name / "grid.json").exists() and (tmp_path / name / "grid.csv").exists()
    assert (tmp_path / "grids.json").exists()
    # An ordinary sweep among them: refused with one line.
    from test_analysis import fake_sweep
    sweeps["sgd"] = fake_sweep()
    sweeps["sgd"].path = tmp_path / "sgd"
    assert script.main([str(tmp_path), "--no-figures", "--quiet"]) == 2
    assert "holds sweeps without a learning-rate grid (sgd)" in capsys.readouterr().err
