"""Learning-rate grids in the sweep (issue #15): every (batch size, rate, seed) its own saved
run, trained in one program per batch size, resumable; the early stop at a training-loss
target; the adaptive search of `--preset critical`; and the command line.

References: separate plain sweeps of each rate (a grid is separate runs up to float rounding);
JAX's compile counter; an independent NumPy twin of the early-stop rule on the saved per-step
losses; a monkeypatched best-rate function whose choices fix the extensions exactly.
"""

import dataclasses
import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from batchjax import TrainConfig
from batchjax import sweep as sweep_module
from batchjax.data import load_dataset
from batchjax.errors import BatchjaxError
from batchjax.results import load_sweep, parse_run_key, parse_run_name, run_name
from batchjax.run import Run
from batchjax.sweep import (EarlyStop, LearningRateSearch, RateChoice, choose_learning_rate,
                            run_sweep)
from batchjax.train import train_runs
from compiles import count_compiles
from sweeputil import ROOT, Stop, load_script

CONFIG = TrainConfig.tiny(optimizer="sgd", epochs=2)  # hidden 16, noise at every epoch
RATES = [0.05, 0.2]
BATCH_SIZES, SEEDS = [32, 64], [0, 1]


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist-5k", verbose=False).subset(512, 256)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """A fixed grid of 2 rates x 2 seeds at 2 batch sizes, no target: every run 2 epochs."""
    out = tmp_path_factory.mktemp("grid")
    return out, run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS,
                          learning_rates=RATES, sharpness=None, verbose=False)


def key(run):
    return run.batch_size, run.config.learning_rate, run.seed


def assert_same_runs(a, b, rtol=0.0):
    assert [key(r) for r in a.runs] == [key(r) for r in b.runs]
    for ra, rb in zip(a.runs, b.runs):
        assert (ra.status, ra.stopped, ra.target) == (rb.status, rb.stopped, rb.target)
        np.testing.assert_allclose(ra.step_losses, rb.step_losses, rtol=rtol)
        for k in ("val_loss", "val_accuracy", "train_loss", "steps"):
            np.testing.assert_allclose(ra.history[k], rb.history[k], rtol=rtol)
        assert [r["step"] for r in ra.noise] == [r["step"] for r in rb.noise]
        np.testing.assert_allclose([r["noise_scale"] for r in ra.noise],
                                   [r["noise_scale"] for r in rb.noise], rtol=max(rtol, 1e-6))


# --------------------------------------------------------------------------------------------
# Names


def test_grid_run_names_carry_the_rate_and_parse_back():
    assert run_name(32, 0, 0.00316227766) == "bs00032_lr0.00316_seed0"
    assert run_name(8, 2, 1e-5) == "bs00008_lr1e-05_seed2"
    assert run_name(32, 0) == "bs00032_seed0"  # plain sweeps keep their names
    assert parse_run_key("bs00032_lr0.00316_seed0") == (32, 0.00316, 0)
    assert parse_run_key("bs00008_lr1e-05_seed2") == (8, 1e-5, 2)
    assert parse_run_key("bs00032_seed1") == (32, None, 1)
    assert parse_run_name("bs00032_lr0.00316_seed0") == (32, 0)
    assert parse_run_key("bs00032_lrx_seed0") is None and parse_run_key("figures") is None
    names = [run_name(b, 0, lr) for b, lr in [(64, 0.1), (8, 0.4), (32, 0.02)]]
    assert sorted(names)[0].startswith("bs00008_")  # still sorted by batch size


# --------------------------------------------------------------------------------------------
# A grid is separate runs, trained together, saved one by one


def test_a_grid_sweep_equals_separate_sweeps_of_each_rate(reference, data, tmp_path):
    out, grid = reference
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == sorted(run_name(b, s, lr) for b in BATCH_SIZES for lr in RATES
                           for s in SEEDS)
    assert len(grid.runs) == 8 and grid.missing == [] and grid.missing_names == []
    record = grid.manifest["grid"]
    assert record["learning_rates"] == {"32": RATES, "64": RATES}
    assert record["search"] is None and record["target_loss"] is None
    assert record["max_epochs"] == 2 and record["stop_factor"] == 3.0
    assert "learning_rate" not in grid.manifest["config"]  # it varies per run
    for lr in RATES:
        alone = run_sweep(tmp_path / f"lr{lr}", dataclasses.replace(CONFIG, learning_rate=lr),
                          data, batch_sizes=BATCH_SIZES, seeds=SEEDS, sharpness=None,
                          verbose=False)
        assert alone.manifest["grid"] is None
        for single in alone.runs:
            run = next(r for r in grid.runs if key(r) == key(single))
            assert run.config == single.config and run.learning_rate == lr
            # 4 runs vmapped against 2: the batch means are summed in another order, a few
            # float32 ulps per step, which training carries along.
            np.testing.assert_allclose(run.step_losses, single.step_losses, rtol=2e-5,
                                       atol=1e-6)
            for k in ("val_loss", "val_accuracy", "train_loss", "train_accuracy"):
                np.testing.assert_allclose(run.history[k], single.history[k], rtol=2e-5)
            np.testing.assert_allclose(run.final_train["loss"], single.final_train["loss"],
                                       rtol=2e-5)
            per_epoch = 512 // run.batch_size
            assert [r["step"] for r in run.noise] == [0, per_epoch, 2 * per_epoch]
            for a, b in zip(run.noise, single.noise):
                for k in ("train_loss", "trace_cov", "noise_scale"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4), k
            assert run.stopped == "budget" and single.stopped is None
            assert run.trained_with == [run_name(run.batch_size, s, v) for v in RATES
                                        for s in SEEDS]
            assert run.path.name == run_name(run.batch_size, run.seed, lr)
    # The rates matter: same seed, other rate, other numbers.
    a, b = (next(r for r in grid.runs if key(r) == (32, lr, 0)) for lr in RATES)
    assert not np.allclose(a.step_losses, b.step_losses, rtol=1e-2)
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("run,batch_size,seed,learning_rate,status,stopped,epoch")
    assert len(history) == 1 + 8 * 2 and "bs00032_lr0.05_seed0,32,0,0.05," in history[1]


def test_grid_runs_are_measured_at_the_log_spaced_steps_alone(data, tmp_path):
    # 512 examples at B = 64: 8 steps per epoch, 16 in all; 3 log-spaced points from 1 to 16
    # are 1, 4, 16; no other epoch end (step 8).
    config = dataclasses.replace(CONFIG, noise_schedule="log", noise_points=3)
    results = run_sweep(tmp_path, config, data, batch_sizes=[64], seeds=[0],
                        learning_rates=RATES, sharpness=None, verbose=False)
    assert [[r["step"] for r in run.noise] for run in results.runs] == [[0, 1, 4, 16]] * 2
    assert results.manifest["grid"]["noise_steps"] == "log"
    assert [r["empirical"]["num_batches"] for r in results.runs[0].noise] == [20] * 4


def test_a_grid_split_over_two_cpu_devices_equals_one_device(tmp_path):
    # Segmented epochs (the sweep's default) and log-spaced measurements cut the epochs of
    # runs sharded over devices; 2 rates x 2 seeds put 2 runs on each of 2 devices.
    flags = ["--dataset", "mnist-5k", "--batch-sizes", "256", "--epochs", "2", "--seeds", "2",
             "--hidden", "8", "--optimizer", "sgd", "--lrs", "0.05,0.2", "--noise-schedule",
             "log", "--noise-points", "4", "--probe-size", "500", "--no-sharpness",
             "--no-figures", "--quiet", "--compile-cache", "none"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), *flags,
                           "--cpu-devices", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    two = load_sweep(tmp_path / "two")
    assert two.manifest["sessions"][0]["device_count"] == 2
    config = TrainConfig(epochs=2, hidden=8, optimizer="sgd", noise_schedule="log",
                         noise_points=4, probe_size=500)
    one = run_sweep(tmp_path / "one", config, load_dataset("mnist-5k", verbose=False),
                    batch_sizes=[256], seeds=[0, 1], learning_rates=[0.05, 0.2],
                    sharpness=None, verbose=False)
    assert_same_runs(two, one, rtol=2e-5)


def test_another_grid_of_rates_compiles_nothing(data, tmp_path):
    config = dataclasses.replace(CONFIG, noise_schedule="none", epochs=1)
    kw = dict(batch_sizes=[32], seeds=[0, 1], sharpness=None, verbose=False)
    run_sweep(tmp_path / "a", config, data, learning_rates=[0.01, 0.02, 0.04], **kw)
    with count_compiles() as compiles:
        other = run_sweep(tmp_path / "b", config, data, learning_rates=[0.1, 0.3, 0.9],
                          target_loss=2.0, **kw)
    assert compiles == [], compiles
    assert sorted({r.config.learning_rate for r in other.runs}) == [0.1, 0.3, 0.9]


# --------------------------------------------------------------------------------------------
# Resume per (batch size, rate, seed)


def test_a_killed_grid_resumes_to_the_uninterrupted_results(reference, data, tmp_path):
    out = tmp_path / "grid"

    def kill_at_second_batch_size(batch_size, epoch, results):
        if batch_size == 64 and epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS,
                  learning_rates=RATES, sharpness=None, verbose=False,
                  on_epoch_end=kill_at_second_batch_size)
    partial = load_sweep(out)
    assert {key(r) for r in partial.runs} == {(32, lr, s) for lr in RATES for s in SEEDS}
    assert partial.missing == [(64, 0), (64, 1)]
    assert partial.missing_names == sorted(run_name(64, s, lr) for lr in RATES for s in SEEDS)
    trained = {}
    resumed = run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS,
                        learning_rates=RATES, sharpness=None, verbose=False, resume=True,
                        on_epoch_end=lambda b, e, rs: trained.setdefault(
                            b, [(r.config.learning_rate, r.seed) for r in rs]))
    assert trained == {64: [(lr, s) for lr in RATES for s in SEEDS]}
    # The same runs trained as the same vmapped group: bitwise equal.
    assert_same_runs(resumed, reference[1], rtol=0.0)
    assert len(resumed.manifest["sessions"]) == 2


def test_resume_trains_only_the_missing_rate_and_seed(reference, data, tmp_path):
    out = tmp_path / "grid"
    shutil.copytree(reference[0], out)
    (out / run_name(32, 1, 0.2) / "metrics.json").unlink()
    assert load_sweep(out).missing_names == [run_name(32, 1, 0.2)]
    trained = []
    resumed = run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS,
                        learning_rates=RATES, sharpness=None, verbose=False, resume=True,
                        on_epoch_end=lambda b, e, rs: trained.append(
                            [(b, r.config.learning_rate, r.seed) for r in rs]))
    assert trained == [[(32, 0.2, 1)], [(32, 0.2, 1)]]  # its two epochs, alone
    assert_same_runs(resumed, reference[1], rtol=2e-5)


def test_a_grid_that_fits_only_in_groups_trains_in_groups_and_says_why(data, tmp_path):
    from batchjax.memory import estimate_memory
    config = dataclasses.replace(CONFIG, epochs=1, noise_schedule="none")
    estimate = estimate_memory(dataclasses.replace(config, batch_size=64), data)
    limit = estimate.shared + 2 * estimate.per_run + estimate.per_run // 2  # two runs fit
    stream = io.StringIO()
    results = run_sweep(tmp_path, config, data, batch_sizes=[64], seeds=SEEDS,
                        learning_rates=RATES, sharpness=None, memory_limit=limit,
                        stream=stream)
    assert {tuple(r.trained_with) for r in results.runs} == {
        (run_name(64, 0, 0.05), run_name(64, 1, 0.05)),
        (run_name(64, 0, 0.2), run_name(64, 1, 0.2))}
    log = stream.getvalue()
    assert ("bs    64 | 4 runs (2 learning rates x seeds) do not fit in memory together (an "
            f"estimated {estimate.text(4)}; limit ") in log
    assert "): 2 groups of up to 2 runs" in log
    assert "training learning rates 0.05 x seeds 0,1 (2 runs) (group 1/2)" in log


@pytest.mark.parametrize("change, message", [
    (dict(learning_rates=[0.05, 0.1]), "learning rates at batch size 32 saved 0.05,0.2, "
                                       "asked 0.05,0.1"),
    (dict(learning_rates=None), "learning-rate grid saved learning rates 0.05,0.2, asked none"),
    (dict(target_loss=0.5), "target_loss saved None, asked 0.5"),
    (dict(learning_rates=LearningRateSearch(0.1), target_loss=0.5),
     "learning-rate grid saved learning rates 0.05,0.2, asked an adaptive search (centre 0.1"),
])
def test_resume_refuses_another_grid(reference, data, change, message):
    out, _ = reference
    before = (out / "manifest.json").read_bytes()
    kwargs = dict(learning_rates=RATES) | change
    with pytest.raises(BatchjaxError) as err:
        run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS, sharpness=None,
                  verbose=False, resume=True, **kwargs)
    text = str(err.value)
    assert message in text and "\n" not in text and "--" not in text
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rates=[]), "learning_rates must be a non-empty list"),
    (dict(learning_rates=[0.1, -1.0]), "learning_rate must be a finite number > 0"),
    (dict(learning_rates=[0.1, 0.1000001]), "repeat a rate at 3 significant digits"),
    (dict(learning_rates=[0.1], config=dataclasses.replace(CONFIG, lr_scaling="linear")),
     "set lr_scaling to 'none'"),
    (dict(target_loss=0.5), "give learning_rates too"),
    (dict(learning_rates=LearningRateSearch(0.1)), "needs a target_loss"),
    (dict(learning_rates=[0.1], target_loss=0.5, stop_factor=1.0), "stop_factor must be a "
                                                                   "number > 1"),
    (dict(learning_rates={32: [0.1]}), "exactly the batch sizes 32,64"),
])
def test_bad_learning_rates_are_refused_before_anything_is_written(data, tmp_path, kwargs,
                                                                   message):
    config = kwargs.pop("config", CONFIG)
    with pytest.raises(BatchjaxError, match=None) as err:
        run_sweep(tmp_path / "out", config, data, batch_sizes=BATCH_SIZES, seeds=SEEDS,
                  verbose=False, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# The early stop


def smoothed_twin(losses, batch_size, window_examples=1024):
    """Centred moving average over ceil(window / B) // 2 steps each side, truncated at both
    ends (every batch full: 512 examples in batches of 32): a loop, not critical's cumsums."""
    half = math.ceil(window_examples / batch_size) // 2
    return [float(np.mean(losses[max(0, t - half):t + half + 1])) for t in range(len(losses))]


def crossing_twin(losses, batch_size, target):
    """Steps to the target (loss t is that after t updates, interpolated), None unless > 0."""
    s = smoothed_twin(losses, batch_size)
    for i, v in enumerate(s):
        if v <= target:
            return None if i == 0 else (i - 1) + (s[i - 1] - target) / (s[i - 1] - s[i])
    return None


def test_a_hopeless_rate_and_a_diverged_one_end_the_group_early_and_are_saved(data, tmp_path):
    config = dataclasses.replace(CONFIG, batch_size=32, epochs=8, noise_schedule="none")
    target, factor, steps_per_epoch = 1.0, 2.5, 16
    rates = [1e-5, 0.1, 0.3, 1e20]  # never moves, slower, faster, diverges
    results = run_sweep(tmp_path, config, data, batch_sizes=[32], seeds=SEEDS,
                        learning_rates=rates, target_loss=target, stop_factor=factor,
                        sharpness=None, verbose=False)
    runs = {key(r)[1:]: r for r in results.runs}
    assert len(runs) == 8  # every run saved, whether it reached the target or not
    # The rule, replayed on the saved per-step losses epoch by epoch.
    expected_epochs = None
    for epoch in range(1, config.epochs + 1):
        prefix = {k: r.step_losses[:epoch * steps_per_epoch] for k, r in runs.items()}
        reached = {k: crossing_twin(v, 32, target) for k, v in prefix.items()
                   if not runs[k].diverged}
        best = min([v for v in reached.values() if v is not None], default=math.inf)
        if all(runs[k].diverged or reached[k] is not None
               or epoch * steps_per_epoch > factor * best for k in runs):
            expected_epochs = epoch
            break
    assert expected_epochs is not None and expected_epochs < config.epochs
    for (lr, seed), run in runs.items():
        if run.diverged:
            assert run.stopped == "diverged" and lr == 1e20
            continue
        assert run.num_epochs == expected_epochs
        assert len(run.step_losses) == expected_epochs * steps_per_epoch
        hit = crossing_twin(run.step_losses, 32, target)
        if lr == 1e-5:
            assert hit is None and run.stopped == "hopeless"
            assert run.target == {"train_loss": target, "steps": None, "examples": None}
        else:
            assert run.stopped == "target"
            assert run.target["steps"] == pytest.approx(hit, rel=1e-9)
            assert run.target["examples"] == pytest.approx(32 * hit, rel=1e-9)
        saved = json.loads((run.path / "metrics.json").read_text())
        assert saved["stopped"] == run.stopped and saved["status"] == "complete"
    assert results.manifest["grid"]["best"] == {"32": 0.3}
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert sum(",hopeless," in row for row in rows) == 2 * expected_epochs


def test_runs_that_never_reach_the_target_train_to_the_budget_and_are_saved(data, tmp_path):
    config = dataclasses.replace(CONFIG, batch_size=64, epochs=2, noise_schedule="none")
    results = run_sweep(tmp_path, config, data, batch_sizes=[64], seeds=[0],
                        learning_rates=[1e-6, 2e-6], target_loss=0.01, sharpness=None,
                        verbose=False)
    assert [(r.stopped, r.num_epochs, r.target["steps"]) for r in results.runs] == \
        [("budget", 2, None)] * 2
    grid = results.manifest["grid"]
    assert grid["best"] == {"64": None}
    assert grid["unreliable"] == {"64": "no learning rate brought every seed to the target"}


def test_train_runs_ends_where_should_finish_says(data):
    seen = []

    def finish_after_two(epoch, runs):
        seen.append((epoch, [r.num_epochs for r in runs]))
        return epoch == 2

    config = dataclasses.replace(CONFIG, epochs=5, noise_schedule="none")
    runs = train_runs([config, dataclasses.replace(config, learning_rate=0.5)], data,
                      should_finish=finish_after_two)
    assert seen == [(1, [1, 1]), (2, [2, 2])]
    assert [r.num_epochs for r in runs] == [2, 2] and runs[0].params is not None
    full = train_runs([dataclasses.replace(config, epochs=2)], data)[0]
    np.testing.assert_allclose(runs[0].step_losses, full.step_losses, rtol=2e-5, atol=1e-6)


def make_run(lr, seed, crossing_step, batch_size=1024, steps=40):
    """A run whose loss is 2 until step `crossing_step`, 0 from it on (None: never): with
    B = 1,024 the smoothing window is one step, so it reaches a target of 1 at step
    crossing_step - 0.5."""
    losses = np.full(steps, 2.0)
    if crossing_step is not None:
        losses[crossing_step:] = 0.0
    config = TrainConfig(batch_size=batch_size, learning_rate=lr, seed=seed)
    return Run(config=config, dataset={}, step_losses=losses,
               step_batch_sizes=np.full(steps, batch_size))


def test_the_best_rate_is_the_fewest_mean_steps_among_rates_every_seed_reached():
    runs = [make_run(0.1, 0, 20), make_run(0.1, 1, 22),   # mean 20.5
            make_run(0.2, 0, 10), make_run(0.2, 1, 26),   # mean 17.5: the best
            make_run(0.4, 0, 5), make_run(0.4, 1, None),  # faster, but a seed failed
            make_run(0.8, 0, None), make_run(0.8, 1, None)]
    choice = choose_learning_rate(runs, 1.0)
    assert choice.best == 0.2 and choice.leaning == 0.2 and choice.edge is None
    assert choice.steps[0.2] == [9.5, 25.5] and choice.steps[0.4] == [4.5, None]
    # Ties go to the smaller rate; the best at the smallest rate is an edge.
    tied = [make_run(0.1, 0, 10), make_run(0.2, 0, 10), make_run(0.4, 0, 12)]
    assert (choose_learning_rate(tied, 1.0).best, choose_learning_rate(tied, 1.0).edge) == \
        (0.1, "down")
    # No rate with every seed: the closest (most seeds reached) decides the direction.
    partial = [make_run(0.1, 0, None), make_run(0.1, 1, None), make_run(0.2, 0, 30),
               make_run(0.2, 1, None)]
    choice = choose_learning_rate(partial, 1.0)
    assert choice.best is None and choice.leaning == 0.2 and choice.edge == "up"
    # At the target before the first step: not a step count, so not reached.
    assert choose_learning_rate([make_run(0.1, 0, 0)], 1.0).best is None


def test_early_stop_counts_earlier_groups_best(data):
    # Another group of the batch size reached the target in 3 steps: a run with more than
    # 2 x 3 steps and no crossing is hopeless at once.
    early = EarlyStop(1.0, 2.0, best_steps=3.0)
    slow = make_run(0.1, 0, None, steps=7)
    assert early(1, [slow]) is True
    early.finish([slow])
    assert slow.stopped == "hopeless"
    patient = EarlyStop(1.0, 2.0, best_steps=4.0)
    assert patient(1, [make_run(0.1, 0, None, steps=7)]) is False


# --------------------------------------------------------------------------------------------
# The adaptive search


SEARCH = LearningRateSearch(centre=0.1, num_rates=2, spacing=2.0, scale=2.0, extend_by=1,
                            max_extensions=2)


def always_the_largest(calls):
    def choose(runs, target_loss):
        rates = sorted({r.config.learning_rate for r in runs})
        calls.append((runs[0].batch_size, rates))
        return RateChoice(best=rates[-1], leaning=rates[-1], edge="up",
                          steps={lr: [] for lr in rates})
    return choose


def test_the_search_extends_past_an_edge_at_most_twice_and_centres_the_next_batch_size(
        data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_module, "choose_learning_rate", always_the_largest(calls))
    config = dataclasses.replace(CONFIG, epochs=1, noise_schedule="none")
    results = run_sweep(tmp_path, config, data, batch_sizes=[32, 64], seeds=[0],
                        learning_rates=SEARCH, target_loss=0.5, sharpness=None, verbose=False)
    grid = results.manifest["grid"]
    # B = 32: [0.1 / 2, 0.1], then 0.2 and 0.4 above the edge; B = 64 around 0.4 x 2.
    assert grid["learning_rates"]["32"] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert grid["learning_rates"]["64"] == pytest.approx([0.4, 0.8, 1.6, 3.2])
    assert grid["extended"] == {"32": ["up", "up"], "64": ["up", "up"]}
    assert set(grid["unreliable"]) == {"32", "64"} and grid["best"]["64"] == pytest.approx(3.2)
    assert grid["search"] == dataclasses.asdict(SEARCH)
    assert [(b, len(rates)) for b, rates in calls] == [(32, 2), (32, 3), (32, 4), (64, 2),
                                                        (64, 3), (64, 4)]
    assert len(results.runs) == 8 and results.missing == []
    extension = next(r for r in results.runs if r.config.learning_rate == pytest.approx(0.2))
    assert extension.trained_with == [run_name(32, 0, extension.config.learning_rate)]


def test_a_search_killed_in_an_extension_resumes_where_it_stopped(data, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "choose_learning_rate", always_the_largest([]))
    config = dataclasses.replace(CONFIG, epochs=2, noise_schedule="none")
    kw = dict(batch_sizes=[32, 64], seeds=[0, 1], learning_rates=SEARCH, target_loss=0.5,
              sharpness=None, verbose=False)
    reference = run_sweep(tmp_path / "reference", config, data, **kw)

    def kill_in_the_second_extension(batch_size, epoch, results):
        if batch_size == 32 and results[0].config.learning_rate > 0.3:
            raise Stop

    out = tmp_path / "killed"
    with pytest.raises(Stop):
        run_sweep(out, config, data, on_epoch_end=kill_in_the_second_extension, **kw)
    saved = json.loads((out / "manifest.json").read_text())["grid"]
    assert saved["extended"] == {"32": ["up", "up"]}  # recorded before it trained
    assert load_sweep(out).missing_names == [run_name(32, s, 0.4) for s in (0, 1)]
    trained = []
    resumed = run_sweep(out, config, data, resume=True, on_epoch_end=lambda b, e, rs:
                        trained.append((b, sorted({r.config.learning_rate for r in rs}))), **kw)
    assert trained[0] == (32, [0.4]) and {b for b, _ in trained} == {32, 64}
    for k in ("learning_rates", "extended", "best", "unreliable", "search"):
        assert resumed.manifest["grid"][k] == reference.manifest["grid"][k], k
    assert_same_runs(resumed, reference, rtol=0.0)


def test_the_search_guesses_from_the_centre_batch_size():
    search = LearningRateSearch(centre=0.1, scale=2.0, centre_batch_size=8)
    assert search.guess(8, None) == 0.1 and search.guess(64, None) == pytest.approx(0.8)
    assert search.guess(64, (32, 0.3)) == pytest.approx(0.6)
    assert LearningRateSearch(0.1, scale=math.sqrt(2)).guess(64, (16, 0.01)) == \
        pytest.approx(0.02)
    assert search.rates_around(0.1) == pytest.approx([0.0125, 0.025, 0.05, 0.1, 0.2, 0.4])
    assert search.extend([0.1, 0.2], "down") == pytest.approx([0.025, 0.05])
    with pytest.raises(BatchjaxError, match="spacing must be a number > 1"):
        LearningRateSearch(0.1, spacing=1.0)


# --------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("argv, match", [
    (["--lrs", "1e-3,x"], "comma-separated numbers such as 1e-3,3e-3,1e-2"),
    (["--lrs", ","], "comma-separated numbers"),
    (["--lr-grid", "1e-3:1e-1"], "expected LOW:HIGH:N such as 1e-3:1e-1:6"),
    (["--lr-grid", "1e-3:1e-1:6:2"], "expected LOW:HIGH:N"),
    (["--lr-grid", "1e-1:1e-3:4"], "0 < LOW < HIGH"),
    (["--lr-grid", "1e-3:1e-1:1"], "N >= 2"),
    (["--lrs", "1e-3", "--lr-grid", "1e-3:1e-1:3"], "not allowed with argument"),
    (["--lrs", "0.001,0.001"], "repeat a rate at 3 significant digits"),
    (["--lrs", "0,0.1"], "learning_rate must be a finite number > 0"),
    (["--lrs", "0.1,0.2", "--lr-scaling", "linear"], "set lr_scaling to 'none'"),
    (["--lrs", "0.1,0.2", "--stop-factor", "0.5"], "stop_factor must be a number > 1"),
    (["--stop-factor", "2"], "--stop-factor applies to a learning-rate grid"),
    (["--preset", "critical", "--optimizer", "momentum"], "give --lrs or --lr-grid for "
                                                          "momentum"),
])
def test_cli_bad_grid_input_is_one_line_and_status_2(argv, match, capsys, tmp_path):
    script = load_script("sweep")
    try:
        status = script.main(argv + ["--out", str(tmp_path / "out"), "--quiet"])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert not (tmp_path / "out").exists()


def test_cli_lr_grid_is_log_spaced_and_includes_both_ends():
    rates = load_script("sweep").lr_grid("1e-3:1e-1:5")
    assert rates == pytest.approx([1e-3, 10 ** -2.5, 1e-2, 10 ** -1.5, 1e-1], rel=1e-12)


def test_cli_critical_preset_runs_each_optimizer_and_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "critical"
    status = load_script("sweep").main([
        "--preset", "critical", "--dataset", "mnist-5k", "--batch-sizes", "512",
        "--seeds", "1", "--epochs", "2", "--hidden", "8", "--noise-schedule", "none",
        "--no-figures", "--quiet", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    for optimizer, scale in (("sgd", 2.0), ("adam_keras", math.sqrt(2))):
        results = load_sweep(out / optimizer)
        grid = results.manifest["grid"]
        assert grid["search"]["centre_batch_size"] == 8 and grid["search"]["scale"] == scale
        assert grid["target_loss"] == load_script("sweep").CRITICAL_TARGET_LOSS[optimizer]
        # The preset's centre is for B = 8; the first grid here is at 512 = 8 x 2^6.
        centre = grid["search"]["centre"] * scale ** 6
        initial = [centre * 2.0 ** k for k in range(-3, 3)]
        rates = grid["learning_rates"]["512"]
        assert [v for v in rates if min(initial) / 1.01 < v < max(initial) * 1.01] == \
            pytest.approx(initial)
        assert len(rates) == 6 + 2 * len(grid["extended"].get("512", []))
        assert {r.config.optimizer for r in results.runs} == {optimizer}
        assert results.manifest["config"]["probe_size"] == 0  # 10,000 capped: all 4,000
    assert (out / "report.md").exists()
    assert capsys.readouterr().out.splitlines()[-1] == f"full report: {out / 'report.md'}"
