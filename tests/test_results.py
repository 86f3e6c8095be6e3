"""Results files: strict JSON, atomic writes, and errors that name the broken file."""

import json
import os
import stat

import numpy as np
import pytest

from batchjax import results
from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.train import HISTORY_KEYS, TrainResult


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


def _result(batch_size=8, seed=0, status="complete"):
    history = {k: [1.0, 2.0] for k in HISTORY_KEYS}
    losses = np.array([2.3, 1.0, np.nan if status == "diverged" else 0.5], np.float32)
    return TrainResult(config=TrainConfig.tiny(batch_size=batch_size, seed=seed),
                       dataset={"name": "d", "num_train": 24, "num_val": 8},
                       step_losses=losses, step_batch_sizes=np.array([8, 8, 8]),
                       history=history, compile_seconds=0.5, params=None,
                       noise=[{"step": 0, "examples_seen": 0, "noise_scale": 3.0}],
                       status=status, diverged_step=2 if status == "diverged" else None)


def test_run_round_trip(tmp_path):
    results.write_run(tmp_path, _result(), trained_with_seeds=[0, 1],
                      final_train={"loss": 0.4, "accuracy": 0.9})
    results.write_run(tmp_path, _result(seed=1, status="diverged"), trained_with_seeds=[0, 1])
    run = results.load_run(tmp_path / "bs00008_seed0")
    assert run.config == TrainConfig.tiny(batch_size=8, seed=0)
    assert run.status == "complete" and run.trained_with_seeds == [0, 1]
    np.testing.assert_array_equal(run.step_losses, np.float32([2.3, 1.0, 0.5]))
    np.testing.assert_array_equal(run.examples_seen, [8, 16, 24])
    assert run.final_train == {"loss": 0.4, "accuracy": 0.9}
    assert run.noise[0]["noise_scale"] == 3.0
    dead = results.load_run(tmp_path / "bs00008_seed1")
    assert dead.diverged and dead.diverged_step == 2 and np.isnan(dead.step_losses[-1])
    metrics = json.loads((tmp_path / "bs00008_seed0" / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["schema"] == results.SCHEMA_VERSION


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
    results.write_run(tmp_path, _result(), trained_with_seeds=[0])
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
