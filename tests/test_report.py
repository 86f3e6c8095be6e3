"""The claims report: its statistics on constructed results with known answers, and its files.

`fake_sweep` builds results in memory whose properties are set by construction (per-step loss
noise of s.d. 0.5 / sqrt(B), a gap that shrinks with B, minibatch variance exactly 1/B with the
finite-population correction), so each verdict has a known right answer. `tests/test_plots.py`
draws the same constructed sweeps.
"""

import csv
import io
import math
import pathlib

import numpy as np
import pytest

from batchjax import report
from batchjax.config import TrainConfig
from batchjax.results import Run, SweepResults

CLAIM_VERDICTS = {report.SUPPORTED, report.NOT_SUPPORTED, report.INCONCLUSIVE}


def fake_run(batch_size, seed, *, epochs=4, num_train=512, noise=True, diverge_epoch=None):
    """One constructed run (see the module docstring); `diverge_epoch` stops it in that epoch."""
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
    run = Run(config=TrainConfig(batch_size=batch_size, epochs=epochs, seed=seed, hidden=16),
              status="complete", diverged_step=None, history=history,
              final_train={"loss": float(history["train_loss"][-1] - 0.02),
                           "accuracy": float(history["val_accuracy"][-1] + gap / 4)},
              step_losses=losses, step_batch_sizes=step_sizes, noise=records,
              compile_seconds=1.0, trained_with_seeds=[seed],
              dataset={"name": "fake-digits", "source": "constructed in tests",
                       "num_train": num_train, "num_val": 128, "image_shape": [28, 28],
                       "num_classes": 10})
    if diverge_epoch is not None:
        stop = (diverge_epoch - 1) * spe + 3
        run.status, run.diverged_step = "diverged", stop
        run.step_losses = np.concatenate([losses[:stop], [np.nan]])
        run.step_batch_sizes = step_sizes[:stop + 1]
        run.history = {k: v[:diverge_epoch - 1] for k, v in history.items()}
        run.noise = records[:diverge_epoch]
        run.final_train = None
    return run


def fake_sweep(batch_sizes=(8, 32, 128), seeds=(0, 1, 2), *, diverged=(), **kw) -> SweepResults:
    """A constructed sweep; `diverged` lists (batch_size, seed, epoch) of runs that diverge."""
    stops = {(b, s): e for b, s, e in diverged}
    runs = [fake_run(b, s, diverge_epoch=stops.get((b, s)), **kw)
            for b in batch_sizes for s in seeds]
    manifest = {"kind": "batchjax-sweep", "sweep": {"batch_sizes": list(batch_sizes),
                                                    "seeds": list(seeds)},
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
