"""The sweep end to end: schema on disk, resume, refusals, divergence, progress and the CLI.

A tiny real sweep (2 batch sizes x 2 seeds x 2 epochs on 512 bundled MNIST digits, hidden 16,
gradient noise on) is the reference that interrupted and resumed sweeps must reproduce.
Signals, memory, the lock and a full disk at their limits: tests/test_reliability.py.
"""

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from batchjax import TrainConfig, train, train_seeds
from batchjax.data import load_dataset
from batchjax.errors import BatchjaxError
from batchjax.losses import cross_entropy
from batchjax.model import MLP
from batchjax.results import load_sweep
from batchjax.sweep import _Console, run_sweep
from sweeputil import ROOT, TIMING_KEYS, Stop, at_a_terminal, load_script

CONFIG = TrainConfig.tiny(epochs=2)  # hidden 16
BATCH_SIZES, SEEDS = [16, 64], [0, 1]


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist-5k", verbose=False).subset(512, 256)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("reference")
    return out, run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS,
                          verbose=False, command=["pytest"])


def numbers(run) -> dict:
    """Everything a run measured, without wall-clock timings."""
    strip = lambda d: {k: v for k, v in d.items() if k not in TIMING_KEYS}  # noqa: E731
    return {"status": run.status, "diverged_step": run.diverged_step,
            "history": strip(run.history), "final_train": run.final_train,
            "step_losses": run.step_losses, "step_batch_sizes": run.step_batch_sizes,
            "noise": [strip(r) for r in run.noise],
            "sharpness": strip(run.sharpness) if run.sharpness else None}


def assert_same_results(a, b, rtol=0.0):
    assert [(r.batch_size, r.seed) for r in a.runs] == [(r.batch_size, r.seed) for r in b.runs]
    for ra, rb in zip(a.runs, b.runs):
        na, nb = numbers(ra), numbers(rb)
        assert (na["status"], na["diverged_step"]) == (nb["status"], nb["diverged_step"])
        np.testing.assert_allclose(na["step_losses"], nb["step_losses"], rtol=rtol)
        np.testing.assert_array_equal(na["step_batch_sizes"], nb["step_batch_sizes"])
        for k in na["history"]:
            np.testing.assert_allclose(na["history"][k], nb["history"][k], rtol=rtol)
        np.testing.assert_allclose(list(na["final_train"].values()),
                                   list(nb["final_train"].values()), rtol=rtol)
        assert len(na["noise"]) == len(nb["noise"])
        for x, y in zip(na["noise"], nb["noise"]):
            for key in ("step", "examples_seen", "probe_size"):
                assert x[key] == y[key]
            for key in ("grad_sq_norm", "trace_cov", "noise_scale", "train_loss"):
                np.testing.assert_allclose(x[key], y[key], rtol=max(rtol, 1e-6))
            np.testing.assert_allclose(x["empirical"]["mean"], y["empirical"]["mean"],
                                       rtol=max(rtol, 1e-6))
        assert (na["sharpness"] is None) == (nb["sharpness"] is None)
        if na["sharpness"] is not None:
            for key in ("lambda_max", "lambda_min", "trace", "loss"):
                # A few float32 ulps of the parameters move the Ritz values by about as much.
                np.testing.assert_allclose(na["sharpness"][key], nb["sharpness"][key],
                                           rtol=max(rtol, 1e-4) if rtol else 0.0)


def test_sweep_writes_every_file_of_the_schema(reference, data):
    out, results = reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "batchjax-sweep" and manifest["schema"] == 2
    assert manifest["sweep"] == {"batch_sizes": BATCH_SIZES, "seeds": SEEDS, "epochs": 2}
    assert manifest["sharpness"] == {"probe_size": 1024, "num_iters": 100, "tol": 0.01,
                                     "hutchinson_samples": 20}
    assert manifest["config"]["hidden"] == [16] and "batch_size" not in manifest["config"]
    assert manifest["dataset"] == data.describe()
    assert manifest["started"] and manifest["finished"]
    # What run_sweep returns is what it wrote last, the finished time included.
    assert results.manifest["finished"] == manifest["finished"]
    session = manifest["sessions"][0]
    assert session["command"] == ["pytest"]
    assert {"jax", "jaxlib", "flax", "optax", "numpy", "matplotlib", "tensorflow-datasets",
            "tqdm", "batchjax"} == set(session["versions"])
    assert session["group_sizes"] == {"16": 2, "64": 2}  # every seed of a batch size together
    assert session["device_count"] >= 1 and session["device_kind"] and session["python"]
    for b in BATCH_SIZES:
        steps = 2 * -(-512 // b)
        for s in SEEDS:
            run_dir = out / f"bs{b:05d}_seed{s}"
            config = json.loads((run_dir / "config.json").read_text())
            assert config == dataclasses.replace(CONFIG, batch_size=b, seed=s).to_dict()
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert metrics["complete"] is True and metrics["status"] == "complete"
            with np.load(run_dir / "steps.npz") as arrays:
                assert len(arrays["step_losses"]) == len(arrays["step_batch_sizes"]) == steps
            assert metrics["steps"] == {"file": "steps.npz", "count": steps}
            assert metrics["history"]["epoch"] == [1, 2]
            assert metrics["compile_seconds"] > 0
            assert metrics["trained_with"] == [f"bs{b:05d}_seed{t}" for t in SEEDS]
            assert set(metrics["final_train"]) == {"loss", "accuracy"}
            assert len(metrics["noise"]) == 3  # initialisation and two epoch ends
            record = metrics["noise"][-1]
            assert set(record["minibatch_variance"]) == {str(x) for x in BATCH_SIZES}
            assert record["empirical"]["batch_size"] == b
            hessian = metrics["sharpness"]
            assert hessian["num_examples"] == 512  # the probe, capped at the training set
            assert hessian["hutchinson_samples"] == 20 and hessian["converged"] is True
            assert hessian["step"] == steps and hessian["examples_seen"] == 2 * 512
            assert hessian["lambda_max"] > 0 > hessian["lambda_min"] > -hessian["lambda_max"]
            assert hessian["trace"] > hessian["lambda_max"] and hessian["trace_stderr"] > 0
            assert hessian["loss"] == pytest.approx(metrics["final_train"]["loss"], rel=1e-5)
    assert not list(out.rglob("*.tmp"))
    assert len(results.runs) == 4 and results.missing == []
    assert (out / ".lock").read_text() == ""  # released
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4 * 2  # a header, then one row per run and epoch
    noise = (out / "noise.csv").read_text().splitlines()
    assert len(noise) == 1 + 4 * 3 and "minibatch_variance.16" in noise[0]


def test_figures_and_report_from_the_saved_sweep(reference, tmp_path, capsys):
    out, _ = reference
    figures = load_script("figures")
    assert figures.main([str(out), "--figures-dir", str(tmp_path), "--quiet"]) == 0
    names = ["bs16_curves", "bs64_curves", "step_loss", "validation", "gradient_variance",
             "noise_over_training", "roughness_gap", "sharpness_gap"]
    for name in names:
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            path = tmp_path / f"{name}.{ext}"
            assert path.read_bytes()[:4] == magic and path.stat().st_size > 5000, path
    assert not (tmp_path / "critical_batch.png").exists()  # two batch sizes: no fit
    text = (out / "report.md").read_text()
    for n in range(1, 6):
        assert f"### Claim {n}:" in text
    assert text.count("**Verdict:") == 5
    assert "## Sharp minima" in text and "flatter minima here: " in text
    assert "**No fit:** only " in text and "needs at least 3" in text
    assert (out / "summary.csv").exists() and (out / "summary.tex").exists()
    assert "lambda_max_mean" in (out / "summary.csv").read_text()


def test_interrupted_sweep_resumes_to_the_uninterrupted_results(reference, data, tmp_path):
    out = tmp_path / "sweep"

    def kill_at_second_batch_size(batch_size, epoch, results):
        if batch_size == 64 and epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS, verbose=False,
                  on_epoch_end=kill_at_second_batch_size)
    partial = load_sweep(out)
    assert [(r.batch_size, r.seed) for r in partial.runs] == [(16, 0), (16, 1)]
    assert partial.missing == [(64, 0), (64, 1)]
    assert (out / "bs00064_seed0" / "config.json").exists()
    assert not (out / "bs00064_seed0" / "metrics.json").exists()
    assert json.loads((out / "manifest.json").read_text())["finished"] is None
    done = out / "bs00016_seed0" / "metrics.json"
    mtime = done.stat().st_mtime_ns

    trained = {}
    resumed = run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS, resume=True,
                        verbose=False, on_epoch_end=lambda b, e, rs: trained.setdefault(
                            b, [r.config.seed for r in rs]))
    assert trained == {64: [0, 1]}, "a complete batch size was trained again"
    assert done.stat().st_mtime_ns == mtime
    # The same seeds trained as the same vmapped group: the numbers are bitwise equal.
    assert_same_results(resumed, reference[1], rtol=0.0)
    assert len(json.loads((out / "manifest.json").read_text())["sessions"]) == 2


def test_resume_trains_only_the_missing_seeds(reference, data, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(reference[0], out)
    (out / "bs00016_seed1" / "metrics.json").unlink()
    trained = {}
    resumed = run_sweep(out, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS, resume=True,
                        verbose=False, on_epoch_end=lambda b, e, rs: trained.setdefault(
                            b, [r.config.seed for r in rs]))
    assert trained == {16: [1]}
    # Seed 1 alone vs vmapped with seed 0: the batched program reduces the batch-mean loss
    # in another order, a few float32 ulps (see test_vmapped_seeds_equal_separate_runs).
    assert_same_results(resumed, reference[1], rtol=1e-5)


def test_vmapped_seeds_equal_separate_runs(data):
    config = dataclasses.replace(CONFIG, noise_schedule="none")
    together = train_seeds(config, data, [0, 1])
    for result in together:
        alone = train(dataclasses.replace(config, seed=result.config.seed), data)
        # Observed: parameters bitwise equal, per-step losses within 2 ulp (2.4e-7): the
        # vmapped program sums the batch's per-example losses in another order. 1e-6
        # relative is a few ulps of float32, far below any effect the sweep measures.
        np.testing.assert_allclose(result.step_losses, alone.step_losses, rtol=1e-6)
        for a, b in zip(result.params.values(), alone.params.values()):
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
        for k in ("val_loss", "val_accuracy", "train_loss", "train_accuracy"):
            np.testing.assert_allclose(result.history[k], alone.history[k], rtol=1e-6)


# The library names the fields (the flags are the fields with dashes: --learning-rate).
@pytest.mark.parametrize("change, field", [
    (dict(config=dataclasses.replace(CONFIG, epochs=3)), "epochs saved 2, asked 3"),
    (dict(config=dataclasses.replace(CONFIG, learning_rate=0.01)), "learning_rate saved"),
    (dict(batch_sizes=[16, 32]), "batch_sizes saved 16,64, asked 16,32"),
    (dict(seeds=[0, 1, 2]), "seeds saved 0,1, asked 0..2"),
    (dict(sharpness=None), "sharpness saved on (probe_size 1024, num_iters 100, tol 0.01, "
                           "hutchinson_samples 20), asked off"),
])
def test_resume_refuses_a_different_configuration(reference, data, change, field):
    out, _ = reference
    kwargs = dict(config=CONFIG, batch_sizes=BATCH_SIZES, seeds=SEEDS) | change
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BatchjaxError) as err:
        run_sweep(out, kwargs.pop("config"), data, resume=True, verbose=False, **kwargs)
    message = str(err.value)
    assert field in message and str(out) in message and "\n" not in message
    assert "--" not in message  # no command-line flags in library messages
    assert (out / "manifest.json").read_bytes() == before


def test_resume_refuses_other_data(reference, data):
    with pytest.raises(BatchjaxError, match="dataset saved mnist-5k .512 train"):
        run_sweep(reference[0], CONFIG, data.subset(256, 256), batch_sizes=BATCH_SIZES,
                  seeds=SEEDS, resume=True, verbose=False)


def test_fresh_sweep_refuses_a_nonempty_directory(reference, data, tmp_path):
    with pytest.raises(BatchjaxError, match="already holds a sweep; continue it with resume, "
                                            "or choose another directory"):
        run_sweep(reference[0], CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS,
                  verbose=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BatchjaxError, match="is not empty .*choose another directory"):
        run_sweep(tmp_path, CONFIG, data, batch_sizes=BATCH_SIZES, seeds=SEEDS, verbose=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_sizes=[0, 16]), "batch_size must be at least 1"),
    (dict(batch_sizes=[16, 16]), "distinct"),
    (dict(batch_sizes=[1024]), "larger than the training set"),
    (dict(seeds=[]), "seeds must be a non-empty list"),
    (dict(config=dataclasses.replace(CONFIG, probe_size=600)), "probe size 600 is larger"),
])
def test_bad_grid_is_refused_before_anything_is_written(data, tmp_path, kwargs, match):
    kwargs = dict(config=CONFIG, batch_sizes=BATCH_SIZES, seeds=SEEDS) | kwargs
    with pytest.raises(BatchjaxError, match=match):
        run_sweep(tmp_path / "out", kwargs.pop("config"), data, verbose=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_divergence_is_saved_and_the_sweep_goes_on(data, tmp_path, capsys):
    config = dataclasses.replace(CONFIG, learning_rate=1e20, noise_schedule="none")
    stream = io.StringIO()
    results = run_sweep(tmp_path, config, data, batch_sizes=BATCH_SIZES, seeds=[0],
                        stream=stream)
    assert [r.status for r in results.runs] == ["diverged", "diverged"]
    assert all(r.diverged_step is not None for r in results.runs)
    assert all(r.sharpness is None for r in results.runs)  # not measured, not made up
    log = stream.getvalue()
    assert "bs    16 | Epoch 1/2 - every seed has diverged" in log
    assert "seed 0 diverged at step" in log and "bs    64 | training" in log
    assert "\r" not in log  # off a terminal: whole lines, no bar
    # Figures of diverged runs are drawn in tests/test_plots.py.
    assert load_script("figures").main([str(tmp_path), "--no-figures"]) == 0
    # The console shows the verdicts; the report (report.md) names each diverged run.
    assert (tmp_path / "report.md").read_text().count("DIVERGED at step") == 2


def test_progress_is_plain_lines_off_a_terminal_and_a_tqdm_bar_on_one():
    log = io.StringIO()
    console = _Console(4, log, verbose=True)
    console.update()
    console.write("bs     8 | Epoch 1/2 - ...")
    console.update(3)
    console.close()
    assert log.getvalue() == "bs     8 | Epoch 1/2 - ...\n"  # no bar in a log file

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    console = _Console(2, tty, verbose=True)
    console.update()
    console.write("a line")
    console.close()
    text = tty.getvalue()
    assert "\r" in text and "a line\n" in text and "1/2" in text and "epoch" in text
    quiet = Terminal()
    console = _Console(2, quiet, verbose=False)
    console.update()
    console.write("a line")
    console.close()
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("argv, match", [
    (["--batch-sizes", "0"], "batch_size must be at least 1"),
    (["--batch-sizes", "8,x"], "comma-separated integers"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--lr", "nan"], "learning_rate must be a finite number"),
    (["--dataset", "nope"], "nope"),
    (["--dataset", "mnist-5k", "--batch-sizes", "5000"], "larger than the training set"),
    (["--dataset", "mnist-5k", "--probe-size", "4001"], "probe size 4001 is larger"),
    (["--target-loss", "-1"], "--target-loss must be a finite number > 0"),
    (["--target-accuracy", "1.5"], "--target-accuracy must be in (0, 1]"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--cpu-devices", "-1"], "--cpu-devices must be >= 0"),
    (["--hidden", "16,x"], "comma-separated integers"),
    (["--hidden", "16,0"], "hidden width must be at least 1"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["--dataset", "mnist-5k", "--group-size", "0"], "group_size must be a positive integer"),
    (["--memory-limit", "lots"], "memory_limit must be a size such as 8G"),
])
def test_cli_bad_input_is_one_line_and_status_2(argv, match, capsys, tmp_path):
    sweep = load_script("sweep")
    try:
        status = sweep.main(argv + ["--out", str(tmp_path / "out"), "--quiet"])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert not (tmp_path / "out").exists()


def test_cli_unwritable_output_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status = load_script("sweep").main(["--dataset", "mnist-5k", "--batch-sizes", "128",
                                        "--epochs", "1", "--seeds", "1", "--quiet",
                                        "--out", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_cli_figures_names_a_corrupt_file(reference, tmp_path, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(reference[0], out)
    (out / "bs00064_seed1" / "metrics.json").write_text('{"complete": tr')
    assert load_script("figures").main([str(out), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bs00064_seed1/metrics.json is corrupt" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_keeps_finished_runs_and_resume_matches_an_uninterrupted_sweep(tmp_path, signum):
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--dataset", "mnist-5k",
            "--batch-sizes", "32,64", "--epochs", "1", "--seeds", "2", "--hidden", "16",
            "--noise-every", "none", "--no-sharpness", "--out", str(out), "--no-figures"]
    proc = subprocess.Popen(at_a_terminal(*argv[1:]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = out / "bs00032_seed1" / "metrics.json"
    deadline = time.monotonic() + 60
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep never finished its first batch size"
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1].startswith("interrupted: finished runs are saved")
    partial = load_sweep(out)  # every file that exists is whole
    assert {(32, 0), (32, 1)} <= {(r.batch_size, r.seed) for r in partial.runs}
    assert partial.missing, "the signal arrived after the sweep had finished"
    assert not list(out.rglob("*.tmp"))
    if signum == signal.SIGINT:
        return  # the two signals take one path from here; resuming is checked once

    resumed = subprocess.run(argv + ["--resume", "--quiet"], capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    reference = run_sweep(tmp_path / "ref", TrainConfig(epochs=1, hidden=16,
                                                        noise_schedule="none"),
                          load_dataset("mnist-5k", verbose=False), batch_sizes=[32, 64],
                          seeds=[0, 1], verbose=False, sharpness=None)
    assert_same_results(load_sweep(out), reference, rtol=1e-6)


@pytest.mark.parametrize("last_epoch, training", [(False, True), (True, True), (True, False)])
def test_a_signal_inside_a_callback_still_stops_the_sweep(tmp_path, monkeypatch, capsys,
                                                          last_epoch, training):
    # A signal can land while Python runs a callback whose exceptions it ignores (JAX's
    # garbage-collection hook, a __del__): an exception raised by the handler there is printed
    # and dropped. In training the handler raises nothing (the sweep polls at safe points);
    # in a phase where it raises (set-up, figures), it first records the request. Either way
    # the sweep stops at its next check: after the epoch, or before the figures.
    sweep = load_script("sweep")
    from batchjax.sweep import Interrupted
    ignored, epochs_after = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: ignored.append(u.exc_type))

    class SignalInCallback:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    def fake_run_sweep(*args, should_stop, on_phase, **kwargs):
        if training:
            on_phase("compiling or training batch size 32, seeds 0")  # as run_sweep does
        SignalInCallback()  # dropped at once: its __del__ receives the signal
        deadline = time.monotonic() + 10
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)  # the watchdog thread takes note
        if not last_epoch:
            if should_stop():  # the check after each epoch
                raise Interrupted("stop requested")
            epochs_after.append(2)
        return None  # after the last epoch: the check before the figures must stop it

    monkeypatch.setattr("batchjax.sweep.run_sweep", fake_run_sweep)
    status = sweep.main(["--dataset", "mnist-5k", "--batch-sizes", "32", "--epochs", "2",
                         "--seeds", "1", "--quiet", "--out", str(tmp_path / "out")])
    # Outside training the handler's own exception was indeed lost; in training none was raised.
    assert ignored == ([] if training else [KeyboardInterrupt])
    assert status == 130 and not epochs_after
    assert capsys.readouterr().err.splitlines()[-1].startswith("interrupted: finished runs")


def power_iteration_top_eigenvalue(params, x, y, model, iters=300):
    """lambda_max by plain power iteration on Hessian-vector products (jvp of grad): a reference
    independent of the Lanczos code. Near a minimum the top eigenvalue is also the largest in
    magnitude, so power iteration finds it."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)

    def loss(p):
        return jnp.mean(cross_entropy(model.apply({"params": unravel(p)}, x), y))

    hvp = jax.jit(lambda v: jax.jvp(jax.grad(loss), (flat,), (v,))[1])
    v = jax.random.normal(jax.random.key(7), flat.shape)
    for _ in range(iters):
        w = hvp(v / jnp.linalg.norm(v))
        v = w
    v = v / jnp.linalg.norm(v)
    return float(v @ hvp(v))


def test_saved_sharpness_matches_an_independent_power_iteration(reference, data):
    out, results = reference
    run = next(r for r in results.runs if r.batch_size == 64 and r.seed == 0)
    # Retrain the same vmapped group: the sweep's final parameters, bitwise.
    config = dataclasses.replace(CONFIG, batch_size=64, noise_schedule="none")
    params = train_seeds(config, data, SEEDS)[0].params
    reference_top = power_iteration_top_eigenvalue(params, data.x_train, data.y_train,
                                                   MLP(16, data.num_classes))
    # Lanczos to a relative Ritz residual of 1e-2 guarantees an eigenvalue within 1%.
    assert run.sharpness["lambda_max"] == pytest.approx(reference_top, rel=1e-2)


def test_preset_expands_and_explicit_flags_win():
    sweep = load_script("sweep")

    def parsed(argv):
        return sweep.apply_preset(sweep.build_parser().parse_args(argv))

    critical = parsed(["--preset", "critical"])
    assert critical.batch_sizes == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert (critical.epochs, critical.seeds) == (20, 3)
    mixed = parsed(["--preset", "critical", "--batch-sizes", "8,64", "--epochs", "2"])
    assert mixed.batch_sizes == [8, 64] and mixed.epochs == 2 and mixed.seeds == 3
    plain = parsed([])
    assert plain.batch_sizes == [8, 32, 128] and plain.epochs == 10 and plain.seeds == 3
    assert plain.sharpness is True and parsed(["--no-sharpness"]).sharpness is False


def test_compile_cache_directory_from_flag_environment_or_default(monkeypatch, tmp_path):
    compile_cache_dir = load_script("sweep").compile_cache_dir
    monkeypatch.setenv("BATCHJAX_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")  # flag wins
    assert compile_cache_dir("none") is None and compile_cache_dir(" ") is None
    assert compile_cache_dir() == str(tmp_path / "env")
    monkeypatch.setenv("BATCHJAX_COMPILE_CACHE", "None")
    assert compile_cache_dir() is None
    monkeypatch.delenv("BATCHJAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    kept = jax.config.jax_compilation_cache_dir  # the test session's (conftest)
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
        assert compile_cache_dir() == str(tmp_path / "jax")  # a cache JAX was given
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_cache_dir() == str(tmp_path / "xdg" / "batchjax" / "xla")
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert compile_cache_dir() == str(tmp_path / "home" / ".cache" / "batchjax" / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", kept)


def test_cli_unusable_compile_cache(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    argv = ["--dataset", "mnist-5k", "--batch-sizes", "128", "--epochs", "1", "--seeds", "1",
            "--quiet", "--out", str(tmp_path / "out")]
    sweep = load_script("sweep")
    # Asked for by flag: refused in one line, nothing written.
    assert sweep.main(argv + ["--compile-cache", str(tmp_path / "file" / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a writable directory" in err
    assert not (tmp_path / "out").exists()
    # The default (here from the environment): one note, and the sweep runs without a cache.
    monkeypatch.setenv("BATCHJAX_COMPILE_CACHE", str(tmp_path / "file" / "cache"))
    assert sweep.main(argv + ["--noise-every", "none", "--no-sharpness", "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: compile cache") and \
        err.rstrip().endswith("compiling without it")
    assert load_sweep(tmp_path / "out").manifest["sessions"][0]["compile_cache"] is None


def test_cli_draws_figures_into_the_results_directory_and_ends_with_the_verdicts(tmp_path,
                                                                                 capsys):
    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()}
    out = tmp_path / "out"
    status = load_script("sweep").main(["--dataset", "mnist-5k", "--batch-sizes", "64,128",
                                        "--epochs", "1", "--seeds", "1", "--hidden", "16",
                                        "--noise-schedule", "none", "--no-sharpness",
                                        "--quiet", "--out", str(out)])
    assert status == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == f"full report: {out / 'report.md'}"
    assert "verdict" in stdout and "### Claim" not in stdout  # the verdicts, not the report
    assert "### Claim 1:" in (out / "report.md").read_text()
    assert (out / "figures" / "step_loss.png").read_bytes()[:4] == b"\x89PNG"
    # The committed figures are redrawn on purpose only (scripts/figures.py --figures-dir).
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()} == committed


def double_cross_entropy(outputs, labels):
    return 2.0 * cross_entropy(outputs, labels)


def test_model_optimizer_and_loss_fn_reach_training_evaluation_and_sharpness(reference, data,
                                                                            tmp_path):
    # An 8-wide model that the config (16 wide) does not describe, trained with a learning
    # rate of zero: the parameters stay at their initial values.
    frozen = run_sweep(tmp_path / "frozen", dataclasses.replace(CONFIG, epochs=1), data,
                       batch_sizes=[64], seeds=[0], model=MLP((8,), 10),
                       optimizer=optax.sgd(0.0), verbose=False).runs[0]
    assert frozen.sharpness["num_params"] == 784 * 8 + 8 + 8 * 10 + 10  # the model's
    initial = frozen.noise[0]["train_loss"]  # step 0, on the whole training set (probe 0)
    assert frozen.noise[-1]["train_loss"] == pytest.approx(initial, rel=1e-6)
    assert frozen.final_train["loss"] == pytest.approx(initial, rel=1e-5)
    assert frozen.history["train_loss"][0] == pytest.approx(initial, rel=1e-5)
    # Twice the cross-entropy: Adam's steps do not see a constant factor on the gradient
    # (m / sqrt(v); eps is negligible), so the runs are those of the reference with every
    # loss doubled: training, final evaluation, noise (gradients doubled: variances x4) and
    # sharpness (the Hessian doubled).
    doubled = run_sweep(tmp_path / "doubled", CONFIG, data, batch_sizes=[64], seeds=[0],
                        loss_fn=double_cross_entropy, verbose=False).runs[0]
    plain = next(r for r in reference[1].runs if (r.batch_size, r.seed) == (64, 0))
    np.testing.assert_allclose(doubled.step_losses, 2 * plain.step_losses, rtol=1e-3)
    assert doubled.final_train["loss"] == pytest.approx(2 * plain.final_train["loss"], rel=1e-3)
    assert doubled.final_train["accuracy"] == pytest.approx(plain.final_train["accuracy"],
                                                            abs=2 / 512)
    assert doubled.noise[-1]["trace_cov"] == pytest.approx(4 * plain.noise[-1]["trace_cov"],
                                                           rel=1e-2)
    assert doubled.sharpness["lambda_max"] == pytest.approx(2 * plain.sharpness["lambda_max"],
                                                            rel=3e-2)


def test_a_warm_compile_cache_gives_the_numbers_of_a_fresh_compile(tmp_path):
    cache = tmp_path / "cache"
    argv = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--dataset", "mnist-5k",
            "--batch-sizes", "64", "--epochs", "1", "--seeds", "2", "--hidden", "16",
            "--no-sharpness", "--no-figures", "--quiet", "--compile-cache", str(cache)]

    def run(out):
        proc = subprocess.run(argv + ["--out", str(tmp_path / out)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert manifest["sessions"][0]["compile_cache"] == str(cache)
        return load_sweep(tmp_path / out), sorted(p.name for p in cache.iterdir())

    fresh, entries = run("fresh")  # compiles everything and stores it
    assert any(name.startswith("jit_") and "segment" in name for name in entries), entries
    warm, entries_after = run("warm")  # loads every program
    assert entries_after == entries  # nothing was compiled again
    assert_same_results(warm, fresh)  # bit for bit
