"""Reliability at the limits (issue #17), with the sweep driven as a user drives it: the script
in a subprocess, real signals, wall-clock timings.

  * a grid that cannot fit in memory is refused within seconds, in one short line; one that
    fits only in groups trains in groups; the estimate is checked against a measured peak;
  * the first SIGTERM stops the sweep within a bounded time whatever it is doing (a long
    compilation, a long epoch), a second ends it at once; finished runs are kept and
    --resume continues;
  * one sweep per results directory (a lock naming its holder; a dead holder's lock is taken
    over);
  * a disk that fills keeps every earlier file whole and ends with one line.

The stop bound is lowered to STOP = 1 s here ($BATCHJAX_STOP_SECONDS) so that a compilation of
a few seconds outlasts it; the long-epoch test raises it to 10 s, to show that the epoch's
segments, not the bound, end the wait. Timings are asserted with margins for a loaded machine.
"""

import dataclasses
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from batchjax import TrainConfig
from batchjax.data import load_dataset
from batchjax.errors import BatchjaxError
from batchjax.memory import (MemoryEstimate, estimate_memory, format_bytes, plan_groups,
                             split_groups)
from batchjax.results import load_sweep
from batchjax.sweep import run_sweep
from sweeputil import at_a_terminal

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "sweep.py")
STOP = 1.0  # $BATCHJAX_STOP_SECONDS of the subprocesses
SLACK = 4.0  # start-up of a signal's handling and process exit, on a loaded machine
ENV = {**os.environ, "BATCHJAX_STOP_SECONDS": str(STOP), "PYTHONUNBUFFERED": "1"}
# For the tests that signal a sweep while it compiles: no cache may shorten the compilation.
COLD = {**ENV, "BATCHJAX_COMPILE_CACHE": "none"}
TINY = ["--dataset", "mnist-5k", "--epochs", "1", "--seeds", "1", "--noise-schedule", "none",
        "--no-sharpness", "--no-figures"]
# 24 hidden layers: each of a few programs takes seconds to compile, the training little.
DEEP = TINY + ["--batch-sizes", "128", "--hidden", ",".join(["16"] * 24)]


class Sweep:
    """`scripts/sweep.py` in a subprocess, its stderr lines collected as they come."""

    def __init__(self, *args, env=ENV):
        self.proc = subprocess.Popen(at_a_terminal(SCRIPT, *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None or self._reader.is_alive(), \
                f"exited before {text!r}: {self.lines}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s: {self.lines}"
            time.sleep(0.02)

    def signal(self, signum: int) -> float:
        self.proc.send_signal(signum)
        return time.monotonic()

    def finish(self, timeout: float = 300) -> float:
        """Wait for the exit; returns the monotonic time it was seen."""
        self.proc.wait(timeout=timeout)
        ended = time.monotonic()
        self.stdout = self.proc.stdout.read()
        self._reader.join(timeout=10)
        return ended


def lock_holder(out: pathlib.Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = json.loads((out / ".lock").read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if info:
            return info
        assert time.monotonic() < deadline, "the sweep never locked its directory"
        time.sleep(0.02)


def assert_whole(out: pathlib.Path) -> None:
    """Every file that exists is complete: loads, parses, and no temporary file is left."""
    load_sweep(out, require_runs=False)
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))


# --------------------------------------------------------------------------------------------
# Memory


def test_an_oversized_grid_is_refused_within_seconds_in_one_short_line(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--seeds", "100000", "--batch-sizes",
                           "128", "--group-size", "100000", "--memory-limit", "4G",
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env=ENV)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert err.count("\n") == 1 and len(err) < 600, err
    assert err.startswith("error: batch size 128: 100,000 runs trained together need an "
                          "estimated ")
    assert "more than the limit of 4.0 GiB (memory_limit)" in err
    assert "set group_size to at most " in err and "fewer seeds, or more devices" in err
    assert not out.exists()  # refused before anything was written
    assert elapsed < 30, elapsed  # no training, no compilation: imports and a shape estimate


def test_a_grid_that_fits_only_in_groups_trains_in_groups(tmp_path):
    data = load_dataset("mnist-5k", verbose=False).subset(256, 64)
    config = TrainConfig.tiny(epochs=1, noise_schedule="none")
    estimate = estimate_memory(dataclasses.replace(config, batch_size=64), data)
    limit = estimate.shared + 2 * estimate.per_run + estimate.per_run // 2  # two runs fit
    stream = io.StringIO()
    results = run_sweep(tmp_path, config, data, batch_sizes=[64], seeds=range(4),
                        sharpness=None, memory_limit=limit, stream=stream)
    assert {tuple(r.trained_with) for r in results.runs} == {
        ("bs00064_seed0", "bs00064_seed1"), ("bs00064_seed2", "bs00064_seed3")}
    log = stream.getvalue()
    assert "4 seeds do not fit in memory together: 2 groups of up to 2 seeds" in log
    assert "training seeds 0,1 (group 1/2)" in log and "training seeds 2,3 (group 2/2)" in log
    with pytest.raises(BatchjaxError, match="even one run needs an estimated"):
        run_sweep(tmp_path / "small", config, data, batch_sizes=[64], seeds=[0],
                  sharpness=None, memory_limit=estimate.shared, verbose=False)
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("optimizer, moments", [("sgd", 0), ("momentum", 1),
                                                ("nesterov", 1), ("adam", 2), ("adam_keras", 2)])
def test_the_estimate_counts_parameters_and_optimizer_state_exactly(optimizer, moments):
    data = load_dataset("mnist-5k", verbose=False)
    config = TrainConfig(batch_size=32, optimizer=optimizer, hidden=(256, 128))
    est = estimate_memory(config, data)
    p = 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10  # weights and biases, by hand
    assert est.num_params == p and est.params == 4 * p  # float32
    step_count = 4 if moments == 2 else 0  # Adam's int32 step counter
    assert est.optimizer == moments * 4 * p + step_count
    assert est.data == (4000 + 1000) * (784 * 4 + 4)  # float32 images, int32 labels


def test_groups_are_the_most_runs_that_fit():
    est = MemoryEstimate(batch_size=8, params=60, optimizer=30, step=10, data=500, noise=0,
                         sharpness=0, num_params=15, runtime=500)  # 100 per run, 1,000 shared
    plan = lambda runs, limit, **kw: plan_groups(est, runs, limit=limit,  # noqa: E731
                                                 limit_source="test", **kw)
    assert plan(10, 2000) == 10 and plan(10, 1999) == 9 and plan(10, 1350) == 3
    assert plan(10, 1250, devices=4) == 8  # two per device, a multiple of the devices
    assert plan(10, 1350, group_size=3) == 3
    with pytest.raises(BatchjaxError, match="set group_size to at most 3, use fewer seeds"):
        plan(10, 1350, group_size=4)
    with pytest.raises(BatchjaxError, match="even one run needs an estimated"):
        plan(10, 1099)
    assert split_groups(range(10), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert split_groups(range(10), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


PEAK = textwrap.dedent("""
    import dataclasses
    import jax
    from batchjax import TrainConfig, make_synthetic
    from batchjax.memory import estimate_memory
    from batchjax.train import train_runs

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    jax.numpy.zeros(1).block_until_ready()
    base = status("VmRSS")
    data = make_synthetic(num_train=128, num_val=32, seed=0)
    config = TrainConfig(batch_size=128, epochs=1, hidden=(4096,), noise_schedule="none")
    train_runs([dataclasses.replace(config, seed=s) for s in range(8)], data)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a large
    # process (pytest late in the suite) would report its parent's size.
    peak = status("VmHWM")
    print(peak - base, estimate_memory(config, data, platform="cpu").per_device(8))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_the_memory_estimate_is_near_the_measured_peak():
    # 8 runs of width 4,096 (13 MiB of parameters each, Adam): the runs dominate the peak.
    proc = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    measured, estimated = map(int, proc.stdout.split())
    assert 0.67 < estimated / measured < 1.5, (format_bytes(estimated), format_bytes(measured))


# --------------------------------------------------------------------------------------------
# Signals


def test_sigterm_during_compilation_ends_within_the_bound_and_resume_completes(tmp_path):
    out = tmp_path / "out"
    sweep = Sweep(*DEEP, "--out", str(out), env=COLD)
    sweep.wait_for("training seeds 0")  # compilation follows at once and takes seconds
    sent = sweep.signal(signal.SIGTERM)
    ended = sweep.finish()
    assert sweep.proc.returncode == 130, sweep.lines
    assert ended - sent < STOP + SLACK, ended - sent
    assert sweep.lines[-1].startswith(f"interrupted: finished runs are saved in {out}/; "
                                      "continue with --resume"), sweep.lines
    # The watchdog, not a safe point, ended it: the compilation outlasted the bound.
    assert f"no safe point within {STOP:g} s" in sweep.lines[-1], sweep.lines
    assert not (out / "bs00128_seed0" / "metrics.json").exists()
    assert_whole(out)
    assert (out / ".lock").read_text() == ""  # released before the exit

    resumed = subprocess.run([sys.executable, SCRIPT, *DEEP, "--out", str(out), "--resume",
                              "--quiet"], capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    results = load_sweep(out)
    assert [r.status for r in results.runs] == ["complete"] and results.missing == []
    assert len(results.manifest["sessions"]) == 2


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    out = tmp_path / "out"
    env = {**COLD, "BATCHJAX_STOP_SECONDS": "60"}  # only the second signal can end it soon
    sweep = Sweep(*DEEP, "--out", str(out), env=env)
    sweep.wait_for("training seeds 0")
    sweep.signal(signal.SIGTERM)
    sweep.wait_for("stopping at the next safe point", timeout=10)
    sent = sweep.signal(signal.SIGINT)
    ended = sweep.finish()
    assert sweep.proc.returncode == 130 and ended - sent < SLACK, (ended - sent, sweep.lines)
    assert sweep.lines[-1].endswith("(stopped at once by a second signal)"), sweep.lines
    assert_whole(out)


def test_sigterm_in_a_long_epoch_stops_within_a_segment_and_the_lock_refuses_a_second_sweep(
        tmp_path):
    # Two 2,048-wide layers on 60,000 synthetic examples: an epoch of minutes.
    out = tmp_path / "out"
    env = {**ENV, "BATCHJAX_STOP_SECONDS": "10"}  # segments of ~1 s must come well before
    long_epoch = ["--dataset", "synthetic", "--batch-sizes", "64", "--epochs", "1", "--seeds",
                  "1", "--hidden", "2048,2048", "--noise-schedule", "none", "--no-sharpness",
                  "--no-figures", "--out", str(out)]
    sweep = Sweep(*long_epoch, env=env)
    holder = lock_holder(out)
    assert holder["pid"] == sweep.proc.pid
    sweep.wait_for("training seeds 0")

    # A second sweep on the same directory is refused in one line naming the holder.
    second = subprocess.run([sys.executable, SCRIPT, *long_epoch, "--resume"],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"is in use by the sweep of process {holder['pid']} on host {holder['host']}" \
        in second.stderr
    assert sweep.proc.poll() is None  # the first one goes on

    time.sleep(4)  # compiled by now (two layers), inside the epoch's segments
    sent = sweep.signal(signal.SIGTERM)
    ended = sweep.finish()
    assert sweep.proc.returncode == 130, sweep.lines
    assert ended - sent < 1.0 + SLACK, ended - sent  # one segment, then the exit
    assert not any("Epoch 1/1" in line for line in sweep.lines)  # the epoch was cut
    # At a safe point between segments (the watchdog would name the phase it cut short).
    assert sweep.lines[-1] == f"interrupted: finished runs are saved in {out}/; continue " \
                              "with --resume", sweep.lines
    assert (out / ".lock").read_text() == ""

    # A lock whose holder was killed outright (SIGKILL: no clean-up at all) is taken over.
    killed = Sweep(*long_epoch, "--resume", env=env)
    pid = lock_holder(out)["pid"]
    killed.proc.kill()
    killed.finish()
    assert json.loads((out / ".lock").read_text())["pid"] == pid  # left behind
    third = Sweep(*long_epoch, "--resume", env=env)
    third.wait_for(f"took over the lock of {out} left by process {pid}")
    third.wait_for("training seeds 0")
    third.signal(signal.SIGTERM)
    third.finish()
    assert third.proc.returncode == 130
    assert_whole(out)


# --------------------------------------------------------------------------------------------
# A full disk


DISK_KIB = 32  # holds the manifest and the first run, not the second


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /tmp && touch /tmp/x"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and user namespaces to "
                                                   "mount a small tmpfs")
def test_a_full_disk_keeps_earlier_files_whole_and_ends_with_one_line(tmp_path):
    # A real full disk: a 32 KiB tmpfs, private to the sweep's mount namespace, fills up
    # while the runs are written; what it held is copied out for inspection.
    mount = tmp_path / "disk"
    mount.mkdir()
    command = (f"mount -t tmpfs -o size={DISK_KIB}k tmpfs {mount} || exit 99; "
               f"{sys.executable} {SCRIPT} {' '.join(TINY)} --batch-sizes 16,32 --seeds 2 "
               f"--hidden 16 --quiet --out {mount}/out; "
               f"status=$?; cp -a {mount}/out {tmp_path}/copy; exit $status")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           command], capture_output=True, text=True, timeout=300, env=ENV)
    err = proc.stderr
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error: could not write "), err
    assert "No space left on device" in err and "files written before it are intact" in err
    copy = tmp_path / "copy"
    assert_whole(copy)
    partial = load_sweep(copy)
    assert partial.runs and partial.missing, "the disk filled too early or not at all"
    for run in partial.runs:  # every run that claims to be complete is: all its steps
        assert len(run.step_losses) == -(-4000 // run.batch_size)
        np.testing.assert_array_equal(np.isfinite(run.step_losses), True)
    assert (copy / ".lock").read_text() == ""


def test_a_failed_write_in_the_sweep_keeps_earlier_files(tmp_path, monkeypatch):
    # The same without a real small disk: seed 1's metrics.json, the last file of the
    # second run, fails with ENOSPC.
    import batchjax.results as results_module

    data = load_dataset("mnist-5k", verbose=False).subset(128, 32)
    real = results_module.os.fdopen
    calls = []

    def fdopen(fd, *args, **kwargs):
        calls.append(fd)
        f = real(fd, *args, **kwargs)
        # manifest, 2 configs before training, then config, steps, metrics per run
        if len(calls) == 9:
            def full(_):
                raise OSError(28, "No space left on device")
            f.write = full
        return f

    monkeypatch.setattr(results_module.os, "fdopen", fdopen)
    with pytest.raises(BatchjaxError, match="No space left on device; files written before it "
                                            "are intact"):
        run_sweep(tmp_path, TrainConfig.tiny(epochs=1, noise_schedule="none"), data,
                  batch_sizes=[64], seeds=[0, 1], sharpness=None, verbose=False)
    assert_whole(tmp_path)
    partial = load_sweep(tmp_path)
    assert [r.seed for r in partial.runs] == [0] and partial.missing == [(64, 1)]
    assert (tmp_path / ".lock").read_text() == ""
