"""Results files: strict JSON, atomic writes, per-step arrays in .npz, tidy tables, the
directory lock, and errors that name the broken file."""

import csv
import errno
import json
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from batchjax import results
from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.run import HISTORY_KEYS, Run


def test_run_names_sort_by_batch_size_and_parse_back():
    names = [results.run_name(b, s) for b, s in [(128, 0), (8, 2), (32, 1)]]
    assert names[1] == "bs00008_seed2"
    assert sorted(names) == ["bs00008_seed2", "bs00032_seed1", "bs00128_seed0"]
    assert [results.parse_run_name(n) for n in names] == [(128, 0), (8, 2), (32, 1)]
    assert results.parse_run_name("figures") is None


def test_json_is_strict_and_nonfinite_floats_become_null(tmp_path):
    path = tmp_path / "a.json"
    results.write_json_atomic(path, {"x": np.float32(1.5), "n": np.int64(3),
                                     "v": np.array([1.0, np.nan, np.inf]), "ok": np.bool_(True)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"x": 1.5, "n": 3, "v": [1.0, None, None], "ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_written_files_follow_the_umask(tmp_path):
    path = tmp_path / "a.json"
    results.write_json_atomic(path, {})
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~results._UMASK


def test_failed_write_keeps_the_old_file_and_says_which(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    results.write_json_atomic(path, {"version": 1})

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(BatchjaxError, match="could not write .*metrics.json.*No space left"):
        results.write_json_atomic(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BatchjaxError, match="could not write"):
        results.write_json_atomic(blocker / "sub" / "x.json", {})


@pytest.mark.parametrize("content", ['{"complete": true, "hist', "", "\x00\x01 not json"])
def test_corrupt_or_truncated_json_names_the_file(tmp_path, content):
    path = tmp_path / "bs00008_seed0" / "metrics.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(BatchjaxError) as err:
        results.read_json(path)
    message = str(err.value)
    assert str(path) in message and "corrupt or truncated" in message and "\n" not in message


GROUP = ["bs00008_seed0", "bs00008_seed1"]


def _result(batch_size=8, seed=0, status="complete", final_train=None):
    history = {k: np.array([1.0, 2.0]) for k in HISTORY_KEYS}
    losses = np.array([2.3, 1.0, np.nan if status == "diverged" else 0.5], np.float32)
    return Run(config=TrainConfig.tiny(batch_size=batch_size, seed=seed),
               dataset={"name": "d", "num_train": 24, "num_val": 8},
               step_losses=losses, step_batch_sizes=np.array([8, 8, 8]),
               history=history, compile_seconds=0.5, trained_with=GROUP,
               noise=[{"step": 0, "examples_seen": 0, "noise_scale": 3.0}],
               status=status, diverged_step=2 if status == "diverged" else None,
               final_train=final_train)


def test_run_round_trip(tmp_path):
    results.write_run(tmp_path, _result(final_train={"loss": 0.4, "accuracy": 0.9}))
    results.write_run(tmp_path, _result(seed=1, status="diverged"))
    run = results.load_run(tmp_path / "bs00008_seed0")
    assert isinstance(run, Run) and run.path == tmp_path / "bs00008_seed0"
    assert run.config == TrainConfig.tiny(batch_size=8, seed=0)
    assert run.status == "complete" and run.trained_with == GROUP
    np.testing.assert_array_equal(run.step_losses, np.float32([2.3, 1.0, 0.5]))
    np.testing.assert_array_equal(run.examples_seen, [8, 16, 24])
    assert run.final_train == {"loss": 0.4, "accuracy": 0.9}
    assert run.noise[0]["noise_scale"] == 3.0
    dead = results.load_run(tmp_path / "bs00008_seed1")
    assert dead.diverged and dead.diverged_step == 2 and np.isnan(dead.step_losses[-1])
    metrics = json.loads((tmp_path / "bs00008_seed0" / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["schema"] == results.SCHEMA_VERSION


def test_per_step_arrays_are_npz_not_json(tmp_path):
    run_dir = results.write_run(tmp_path, _result())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "step_losses" not in metrics and "step_batch_sizes" not in metrics
    with np.load(run_dir / "steps.npz") as npz:  # plain NumPy reads it
        assert npz["step_losses"].dtype == np.float32  # as trained: no rounding through text
        np.testing.assert_array_equal(npz["step_losses"], np.float32([2.3, 1.0, 0.5]))
        np.testing.assert_array_equal(npz["step_batch_sizes"], [8, 8, 8])
    # 62,500 losses (B = 8 on real MNIST, 10 epochs) take 4 bytes each, not ~20 characters.
    run = _result()
    run.step_losses = np.linspace(0, 2, 62_500, dtype=np.float32)
    run.step_batch_sizes = np.full(62_500, 8)
    run_dir = results.write_run(tmp_path / "big", run)
    assert (run_dir / "steps.npz").stat().st_size < 62_500 * 12 + 1_000
    np.testing.assert_array_equal(results.load_run(run_dir).step_losses, run.step_losses)


def test_schema_1_directories_still_load(tmp_path):
    run_dir = tmp_path / "bs00008_seed1"
    results.write_json_atomic(run_dir / "config.json", TrainConfig.tiny(batch_size=8,
                                                                        seed=1).to_dict())
    results.write_json_atomic(run_dir / "metrics.json", {
        "schema": 1, "complete": True, "status": "complete", "diverged_step": None,
        "history": {k: [1.0] for k in HISTORY_KEYS}, "step_losses": [2.0, None],
        "step_batch_sizes": [8, 8], "trained_with_seeds": [0, 1], "compile_seconds": 1.0})
    run = results.load_run(run_dir)
    assert run.trained_with == GROUP
    np.testing.assert_array_equal(run.step_losses, [2.0, np.nan])


def test_a_missing_or_corrupt_steps_file_is_named(tmp_path):
    run_dir = results.write_run(tmp_path, _result())
    (run_dir / "steps.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BatchjaxError, match="bs00008_seed0/steps.npz is corrupt"):
        results.load_run(run_dir)
    (run_dir / "steps.npz").unlink()
    with pytest.raises(BatchjaxError, match="steps.npz does not exist"):
        results.load_run(run_dir)


def test_a_run_without_its_final_file_is_incomplete(tmp_path):
    run_dir = tmp_path / "bs00008_seed0"
    results.write_json_atomic(run_dir / "config.json", TrainConfig.tiny().to_dict())
    assert results.load_run(run_dir) is None
    sweep = results.load_sweep(tmp_path, require_runs=False)
    assert sweep.runs == []
    with pytest.raises(BatchjaxError, match="no completed run"):
        results.load_sweep(tmp_path)


def test_load_sweep_errors_name_the_problem(tmp_path):
    with pytest.raises(BatchjaxError, match="does not exist"):
        results.load_sweep(tmp_path / "missing")
    results.write_run(tmp_path, _result())
    bad = tmp_path / "bs00008_seed0" / "metrics.json"
    bad.write_text(bad.read_text()[:100])
    with pytest.raises(BatchjaxError, match="bs00008_seed0/metrics.json is corrupt"):
        results.load_sweep(tmp_path)


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / "bs00008_seed0").mkdir()
    stale = tmp_path / "bs00008_seed0" / ".metrics.json.abc.tmp"
    stale.write_text("{")
    keep = tmp_path / "bs00008_seed0" / "config.json"
    keep.write_text("{}")
    assert results.remove_stale_temp_files(tmp_path) == 1
    assert not stale.exists() and keep.exists()


# --------------------------------------------------------------------------------------------
# Tidy tables


def _two_runs():
    a = _result(final_train={"loss": 0.4, "accuracy": 0.9})
    a.noise = [{"step": 0, "examples_seen": 0, "noise_scale": 3.0, "method": "dense",
                "minibatch_variance": {"8": 0.5, "32": 0.125},
                "trace_cov_per_layer": {"hidden/kernel": 1.5, "output/bias": 0.25},
                "empirical": {"mean": 0.4, "stderr": 0.1}},
               {"step": 3, "examples_seen": 24, "noise_scale": float("nan"), "method": "vmap",
                "minibatch_variance": {"8": 0.25, "32": 0.0625},
                "trace_cov_per_layer": {"hidden/kernel": 1.0, "output/bias": 0.5},
                "empirical": {"mean": 0.2, "stderr": 0.05}}]
    b = _result(batch_size=16, seed=1, status="diverged")
    b.history = {k: np.array([7.0]) for k in HISTORY_KEYS}
    b.noise = []
    return [a, b]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_history_csv_has_one_row_per_run_and_epoch(tmp_path):
    runs = _two_runs()
    results.write_tables(tmp_path, runs)
    rows = read_csv(tmp_path / "history.csv")
    expected = [(r, i) for r in runs for i in range(len(r.history["epoch"]))]
    assert len(rows) == len(expected) == 3
    for row, (run, i) in zip(rows, expected):
        assert row["run"] == f"bs{run.batch_size:05d}_seed{run.seed}"
        assert int(row["batch_size"]) == run.batch_size and int(row["seed"]) == run.seed
        assert float(row["learning_rate"]) == run.config.effective_learning_rate
        assert row["status"] == run.status
        for k in HISTORY_KEYS:
            assert float(row[k]) == run.history[k][i], k
    assert rows[0]["epoch"] == "1" and rows[0]["steps"] == "1"  # counts written as integers


def test_noise_csv_has_one_row_per_measurement_with_every_scalar(tmp_path):
    runs = _two_runs()
    results.write_tables(tmp_path, runs)
    rows = read_csv(tmp_path / "noise.csv")
    assert [(r["run"], r["step"]) for r in rows] == [("bs00008_seed0", "0"),
                                                    ("bs00008_seed0", "3")]
    for row, record in zip(rows, runs[0].noise):
        assert row["method"] == record["method"]
        for b in ("8", "32"):
            assert float(row[f"minibatch_variance.{b}"]) == record["minibatch_variance"][b]
        for layer in ("hidden/kernel", "output/bias"):
            assert float(row[f"trace_cov_per_layer.{layer}"]) == \
                record["trace_cov_per_layer"][layer]
        assert float(row["empirical.mean"]) == record["empirical"]["mean"]
    assert rows[1]["noise_scale"] == ""  # NaN: an empty cell, which pandas reads as NaN
    # Without any noise record the table is not written (and a stale one is removed).
    results.write_tables(tmp_path, runs[1:])
    assert not (tmp_path / "noise.csv").exists()


def test_tables_load_with_one_pandas_line(tmp_path):
    pd = pytest.importorskip("pandas")
    results.write_tables(tmp_path, _two_runs())
    history = pd.read_csv(tmp_path / "history.csv")  # the README's line
    noise = pd.read_csv(tmp_path / "noise.csv")
    assert len(history) == 3 and history["train_loss"].dtype == float
    assert np.isnan(noise["noise_scale"][1]) and noise["trace_cov_per_layer.hidden/kernel"][0] == 1.5


def test_abbreviate_shortens_long_lists():
    assert results.abbreviate(range(100_000)) == "0..99999"
    assert results.abbreviate([5, 0, 1]) == "0,1,5"
    assert results.abbreviate([0, 1, 2, 7, 8, 9, 10]) == "0..2,7..10"
    text = results.abbreviate(range(0, 200_000, 2))
    assert len(text) < 60 and text.endswith("(100,000 values)") and "199998" in text


def test_manifest_differences_name_fields_not_flags():
    asked = results.sweep_identity(batch_sizes=[8, 32], seeds=range(100_000),
                                   config=TrainConfig(), sharpness=None,
                                   dataset={"name": "d", "num_train": 10, "num_val": 2})
    saved = results.sweep_identity(batch_sizes=[8, 32], seeds=range(3),
                                   config=TrainConfig(learning_rate=0.01), sharpness=None,
                                   dataset={"name": "d", "num_train": 10, "num_val": 2})
    diffs = results.manifest_differences(saved, asked)
    assert diffs == ["seeds saved 0..2, asked 0..99999",
                     "learning_rate saved 0.01, asked 0.001"]


# --------------------------------------------------------------------------------------------
# The directory lock


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with results.DirectoryLock(tmp_path):
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(BatchjaxError) as err:
            results.DirectoryLock(tmp_path).acquire()
        message = str(err.value)
        assert f"process {os.getpid()} on host {socket.gethostname()}" in message
        assert "in use" in message and "\n" not in message
    assert (tmp_path / ".lock").read_text() == ""  # released: emptied, not removed
    lock = results.DirectoryLock(tmp_path).acquire()
    assert lock.taken_over is None
    lock.release()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "since": "earlier"}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with results.DirectoryLock(tmp_path) as lock:
        assert lock.taken_over["pid"] == stale["pid"]
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    live = {"host": socket.gethostname(), "pid": os.getppid(), "since": "earlier"}
    (tmp_path / ".lock").write_text(json.dumps(live))
    with pytest.raises(BatchjaxError, match=f"locked by the sweep of process {os.getppid()} "):
        results.DirectoryLock(tmp_path).acquire()
    other_host = {**live, "host": "elsewhere"}  # liveness unknowable: refused, with the fix
    (tmp_path / ".lock").write_text(json.dumps(other_host))
    with pytest.raises(BatchjaxError, match="if that process is gone, delete .*\\.lock"):
        results.DirectoryLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text(json.dumps({**live, "pid": dead_pid()}))
    with results.DirectoryLock(tmp_path) as lock:
        assert lock.taken_over is not None
