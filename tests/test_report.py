"""The claims report: its statistics on constructed results with known answers, and its files.

`fake_sweep` builds results in memory whose properties are set by construction (per-step loss
noise of s.d. 0.5 / sqrt(B), a gap that shrinks with B, minibatch variance exactly 1/B with the
finite-population correction), so each verdict has a known right answer. `tests/test_plots.py`
draws the same constructed sweeps.
"""

import csv
import io
import json
import math
import pathlib

import numpy as np
import pytest

from batchjax import report
from batchjax.config import TrainConfig
from batchjax.results import Run, SweepResults

CLAIM_VERDICTS = {report.SUPPORTED, report.NOT_SUPPORTED, report.INCONCLUSIVE}


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
              status="complete", diverged_step=None, history=history,
              final_train={"loss": float(history["train_loss"][-1] - 0.02),
                           "accuracy": float(history["val_accuracy"][-1] + gap / 4)},
              step_losses=losses, step_batch_sizes=step_sizes, noise=records,
              compile_seconds=1.0, trained_with_seeds=[seed],
              dataset={"name": "fake-digits", "source": "constructed in tests",
                       "num_train": num_train, "num_val": 128, "image_shape": [28, 28],
                       "num_classes": 10},
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


def test_roughness_recovers_the_noise_sd_around_a_trend():
    rng = np.random.default_rng(0)
    steps, sd = 4000, 0.2
    losses = np.linspace(2.0, 0.5, steps) + rng.normal(0, sd, steps)
    sizes = np.full(steps, 32)
    values = report.compute_roughness(losses, sizes, 32, steps_per_epoch=500)
    assert len(values) == 7  # epochs 2..8
    assert np.mean(values) == pytest.approx(sd, rel=0.05)


def test_roughness_leaves_out_partial_batches():
    rng = np.random.default_rng(1)
    losses = rng.normal(1.0, 0.1, 1000)
    sizes = np.tile(np.r_[np.full(99, 32), 7], 10)
    spiked = losses.copy()
    spiked[sizes == 7] += 50.0  # the partial batch's loss is noisier; it must not count
    a = report.compute_roughness(losses, sizes, 32, 100)
    b = report.compute_roughness(spiked, sizes, 32, 100)
    np.testing.assert_allclose(a, b)


def test_estimate_and_difference():
    a, b = report.Estimate.of([1.0, 2.0, 3.0, float("nan")]), report.Estimate.of([0.0, 0.0])
    assert (a.mean, a.n) == (2.0, 3) and a.sd == pytest.approx(1.0)
    diff, se, z = report.difference(a, report.Estimate.of([1.0, 1.0, 1.0]))
    assert diff == 1.0 and se == pytest.approx(1 / math.sqrt(3))
    assert z == pytest.approx(math.sqrt(3))
    assert math.isnan(report.difference(report.Estimate.of([1.0]), b)[2])  # one seed: no SE


def test_claims_on_constructed_sweep_have_the_known_answers():
    claims = report.evaluate_claims(fake_sweep())
    assert [c.number for c in claims] == [1, 2, 3, 4, 5]
    verdicts = {c.number: c.verdict for c in claims}
    assert verdicts[1] == report.SUPPORTED  # variance exactly ~1/B
    # N = 512: the finite-population correction makes the expected slope -1.098, not -1.
    assert "-1.098, the slope of 1/B with the finite-population correction" in \
        claims[0].evidence[0]
    assert "(consistent); empirical" in claims[0].evidence[0]
    assert verdicts[2] == report.SUPPORTED  # noise sd 0.5 / sqrt(B)
    assert verdicts[3] == report.NOT_SUPPORTED  # the gap shrinks with B by construction
    assert all(c.verdict in CLAIM_VERDICTS for c in claims)


def test_one_seed_is_inconclusive_where_seed_spread_is_needed():
    claims = report.evaluate_claims(fake_sweep(seeds=(0,)))
    verdicts = {c.number: c.verdict for c in claims}
    assert verdicts[2] == verdicts[3] == report.INCONCLUSIVE
    assert "seed" in claims[1].reason and "seed" in claims[2].reason
    # Claim 1 has its own uncertainty (minibatch sampling), so one seed can decide it.
    assert verdicts[1] == report.SUPPORTED


def test_missing_noise_records_make_claim_1_inconclusive_and_are_noted():
    results = fake_sweep(noise=False)
    claims = report.evaluate_claims(results)
    assert claims[0].verdict == report.INCONCLUSIVE
    text = report.build_report(results)
    assert "no gradient-noise records" in text


def test_report_marks_diverged_runs_and_leaves_them_out_of_means():
    results = fake_sweep(diverged=[(8, 1, 2)])
    summary = report.summarize(results)
    assert summary[8]["diverged"] == 1 and summary[8]["val_loss"].n == 2
    assert summary[32]["val_loss"].n == 3
    text = report.build_report(results)
    assert "DIVERGED at step" in text and "1 diverged" in text


def test_write_report_files(tmp_path):
    results = fake_sweep()
    text = report.write_report(results, tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    for n in range(1, 6):
        assert f"### Claim {n}:" in text
    assert "**Verdict:" in text and "roughness" in text
    rows = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert [int(r["batch_size"]) for r in rows] == [8, 32, 128]
    assert {"val_accuracy_mean", "val_accuracy_sd", "gap_loss_mean", "b_simple_end_mean",
            "wall_seconds_mean", "steps_mean"} <= set(rows[0])
    tex = (tmp_path / "summary.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\pm" in tex and "fake-digits" in tex


def test_target_accuracy_default_is_reached_by_every_run():
    results = fake_sweep()
    target = report.default_target_accuracy(results)
    for run in results.runs:
        assert run.history["val_accuracy"].max() >= target
    stats = [report.run_stats(r, target) for r in results.runs]
    assert all(np.isfinite(s["seconds_to_target"]) for s in stats)


# --------------------------------------------------------------------------------------------
# Beyond the original: sharpness and the critical batch size


def test_sharpness_section_has_the_known_answer_and_states_the_confound():
    text = report.build_report(fake_sweep())  # lambda_max and tr(H) grow as B^0.3
    section = text[text.index("## Sharp minima"):text.index("## Critical batch size")]
    assert "**Smaller batches ended in flatter minima here: supported.**" in section
    # The fitted slope recovers the constructed exponent.
    slopes = [float(line.split("against B over 9 runs: ")[1].split(" ± ")[0])
              for line in section.splitlines() if "log2-log2 slope against B" in line]
    assert slopes == [pytest.approx(0.3, abs=0.02)] * 2
    assert "Confound" in section and "different training losses" in section
    assert "| 8 | " in section and "lambda_max" in section
    flatter_at_large = report.build_report(fake_sweep(sharpness_exponent=-0.3))
    assert "flatter minima here: not supported.**" in flatter_at_large


def test_sharpness_section_without_measurements_says_so():
    text = report.build_report(fake_sweep(sharpness_exponent=None))
    assert "## Sharp minima" in text and "Not measured in this sweep" in text


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
               status="complete", diverged_step=None, history=history,
               final_train={"loss": 0.5, "accuracy": 0.9}, step_losses=losses,
               step_batch_sizes=np.full(len(t), batch_size), noise=records,
               compile_seconds=1.0, trained_with_seeds=[seed],
               dataset={"name": "model-digits", "num_train": num_train, "num_val": 512})


def critical_sweep(batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024), seeds=(0,), **kw):
    runs = [critical_run(b, s, **kw) for b in batch_sizes for s in seeds]
    manifest = {"kind": "batchjax-sweep", "dataset": runs[0].dataset,
                "sweep": {"batch_sizes": list(batch_sizes), "seeds": list(seeds)}}
    return SweepResults(manifest=manifest, runs=runs, missing=[], path=pathlib.Path("."))


def test_critical_section_recovers_b_crit_from_runs_on_the_model():
    results = critical_sweep()
    analysis = report.critical_analysis(results, target_loss=TARGET_LOSS,
                                        target_accuracy=TARGET_ACC)
    for target in (analysis.primary, analysis.secondary):
        np.testing.assert_allclose(target.steps[:, 0], S_MIN + E_MIN / target.batch_sizes,
                                   rtol=1e-9)
        assert target.fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-6)
        assert target.fit.s_min == pytest.approx(S_MIN, rel=1e-6)
    assert analysis.b_simple.mean == pytest.approx(B_SIMPLE)  # mean of 75 and 225
    text = report.build_report(results, target_loss=TARGET_LOSS, target_accuracy=TARGET_ACC)
    section = text[text.index("## Critical batch size"):]
    assert "### Primary target: training loss 0.4" in section
    assert "### Secondary target: val. accuracy 50.0%" in section
    assert section.count("**B_crit = 200 ± ") == 2 and "No fit" not in section
    assert "S_min = 50 ±" in section and "E_min = 10000 ±" in section
    assert "B_crit / B_simple = 1.3" in section
    assert "perfect scaling for B ≤ 50" in section and "B ≥ 800" in section
    # The regime of each batch size, in the table.
    assert "| 8 | 1300 | 10400 | 1/1 | perfect scaling |" in section
    assert "| 1024 | 60 | 61200 | 1/1 | maximal data parallelism |" in section


def test_critical_default_loss_target_is_reached_by_every_run():
    # Runs level off at different losses: the target is the highest of their floors, rounded up.
    runs = [critical_run(b, 0, floor=f) for b, f in ((8, 0.0123), (64, 0.0456), (512, 0.0321))]
    results = SweepResults(manifest={}, runs=runs, missing=[], path=pathlib.Path("."))
    assert report.default_target_loss(results) == 0.046
    primary = report.critical_analysis(results).primary
    assert np.isfinite(primary.steps).all() and primary.target == 0.046
    assert "rounded up to two significant digits" in primary.chosen


def test_critical_section_without_enough_batch_sizes_says_why():
    two = critical_sweep(batch_sizes=(8, 64))
    text = report.build_report(two, target_loss=TARGET_LOSS, target_accuracy=TARGET_ACC)
    section = text[text.index("## Critical batch size"):]
    assert section.count("**No fit:** only 2 of 2 batch sizes reached") == 2
    assert "needs at least 3" in section and "**B_crit = " not in section
    # A batch size that never reaches the target is left out; three others still give the fit.
    results = critical_sweep(batch_sizes=(8, 64, 256, 1024))
    results.runs[-1].step_losses = np.maximum(results.runs[-1].step_losses, TARGET_LOSS + 0.2)
    fit = report.critical_analysis(results, target_loss=TARGET_LOSS).primary.fit
    assert fit.excluded_batch_sizes == (1024.0,)
    assert fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-6)


def test_accuracy_target_reached_at_the_first_evaluation_is_an_upper_bound():
    results = critical_sweep(batch_sizes=(8, 64, 256, 1024))
    results.runs[0].history["val_accuracy"][:] = 0.9  # B = 8 at the target after one epoch
    secondary = report.critical_analysis(results, target_accuracy=TARGET_ACC).secondary
    assert secondary.upper_bound[:, 0].tolist() == [True, False, False, False]
    assert secondary.fit.excluded_batch_sizes == (8.0,)
    assert secondary.fit.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-6)


def test_write_report_saves_the_critical_analysis(tmp_path):
    report.write_report(critical_sweep(), tmp_path, target_loss=TARGET_LOSS)
    saved = json.loads((tmp_path / "critical.json").read_text())
    assert saved["primary"]["fit"]["b_crit"] == pytest.approx(200.0, rel=1e-6)
    assert saved["primary"]["target"] == TARGET_LOSS
    assert saved["b_simple_mean"] == pytest.approx(B_SIMPLE)
