"""A sweep: a grid of batch sizes x seeds -> training runs -> results on disk, resumable.

`run_sweep` orchestrates; the other modules do the work:

  1. check the grid against the data, and its memory against the devices before any work
     (`batchjax.memory`): a grid that cannot fit is refused, one that fits only in groups of
     seeds is trained in groups;
  2. lock the results directory (`batchjax.results.DirectoryLock`: one sweep per directory)
     and check that it may hold this sweep: a fresh sweep refuses a non-empty directory,
     `resume=True` refuses one whose saved configuration differs (naming each differing
     field) and otherwise trains only the runs without a saved result;
  3. train each group of seeds of a batch size in one program (`batchjax.train.train_runs`),
     then evaluate each run's final parameters on the whole training set and measure its
     sharpness (`batchjax.sharpness`, settings `SharpnessSettings`, part of the sweep's
     identity), and save it at once (`batchjax.results.write_run`);
  4. write the tidy tables (`history.csv`, `noise.csv`) and close the manifest.

A run whose loss becomes NaN or infinite is saved with status "diverged" and the step (and no
sharpness); the sweep goes on. `should_stop()` is polled at every safe point (between epoch
segments and measurements inside training, between runs outside it); when it returns True the
sweep raises `batchjax.train.Interrupted` and keeps every run saved so far. Progress: a tqdm
bar over the sweep's epochs on a terminal, and a Keras-like line per finished epoch.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import pathlib
import platform
import sys
from typing import Any, Callable, Sequence, TextIO

import jax
import numpy as np
from tqdm import tqdm

from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.memory import check_memory, describe_groups, split_groups
from batchjax.model import MLP
from batchjax.noise import make_measure
from batchjax.results import (CONFIG, MANIFEST, SCHEMA_VERSION, DirectoryLock, SweepResults,
                              abbreviate, check_out_dir, load_run, load_sweep, read_json,
                              remove_stale_temp_files, run_name, sweep_identity,
                              write_json_atomic, write_run, write_tables)
from batchjax.rng import stream_key
from batchjax.run import Run
from batchjax.sharpness import SharpnessSettings, sharpness as compute_sharpness
from batchjax.train import Interrupted, make_evaluate, train_runs

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "matplotlib", "tensorflow-datasets",
            "tqdm", "batchjax")
# Epoch segments of at most about this long, so that a stop request waits at most one.
SEGMENT_SECONDS = 1.0


# --------------------------------------------------------------------------------------------
# Provenance


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def collect_provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """Package versions, Python, platform and devices of this process, and its command line."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "command": list(command) if command is not None else list(sys.argv),
        "cwd": os.getcwd(),
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else None,
        "device_count": len(devices),
        "compile_cache": (jax.config.jax_compilation_cache_dir
                          if jax.config.jax_enable_compilation_cache else None),
    }


# --------------------------------------------------------------------------------------------
# Checks before any work


def check_grid(config: TrainConfig, batch_sizes: Sequence[int],
               seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate a grid before any data is loaded; returns it sorted.

    Raises:
      BatchjaxError: empty or repeated batch sizes or seeds, or a value `TrainConfig` rejects.
    """
    batch_sizes, seeds = list(batch_sizes), list(seeds)
    if not batch_sizes:
        raise BatchjaxError("batch_sizes must be a non-empty list, e.g. [8, 32, 128]")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise BatchjaxError(f"batch sizes must be distinct, got {abbreviate(batch_sizes)} "
                            f"({len(batch_sizes) - len(set(batch_sizes))} repeated)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise BatchjaxError(f"seeds must be a non-empty list of distinct integers, got "
                            f"{abbreviate(seeds) if seeds else '[]'}")
    for b in batch_sizes:
        dataclasses.replace(config, batch_size=b)  # validates the type and range
    for s in (min(seeds), max(seeds)):
        dataclasses.replace(config, seed=s)
    return sorted(batch_sizes), sorted(seeds)


def check_against_data(config: TrainConfig, dataset, batch_sizes: Sequence[int]) -> None:
    """Batch sizes and the probe size must fit in the training set."""
    for b in batch_sizes:
        if b > dataset.num_train:
            raise BatchjaxError(f"batch size {b} is larger than the training set "
                                f"({dataset.num_train:,} examples of {dataset.name}); choose "
                                f"batch sizes of at most {dataset.num_train}")
    if config.probe_size > dataset.num_train:
        raise BatchjaxError(f"probe size {config.probe_size} is larger than the training set "
                            f"({dataset.num_train:,} examples); choose probe_size of at most "
                            f"{dataset.num_train} (0 means all of it)")


def _completed_seeds(out_dir: pathlib.Path, config: TrainConfig, seeds: list[int]) -> list[int]:
    done = []
    for s in seeds:
        run_dir = out_dir / run_name(config.batch_size, s)
        if not (run_dir / "metrics.json").exists():
            continue
        run = load_run(run_dir)
        if run is None:
            continue
        if run.config != dataclasses.replace(config, seed=s):
            raise BatchjaxError(f"resume: {run_dir / CONFIG} differs from the asked "
                                f"configuration; choose another results directory, or delete "
                                f"{run_dir}")
        done.append(s)
    return done


# --------------------------------------------------------------------------------------------
# Training one group, final evaluation, sharpness


_EVALUATORS: dict = {}


def _evaluator(model, loss_fn) -> Callable:
    """One jitted evaluation per (model, loss_fn) for the whole sweep."""
    key = (model, loss_fn)
    try:
        return _EVALUATORS[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable model: not cached
        key = None
    evaluate = jax.jit(make_evaluate(model, loss_fn))
    if key is not None:
        _EVALUATORS[key] = evaluate
    return evaluate


def evaluate_final_train(run: Run, dataset, *, model, loss_fn=None) -> dict[str, float] | None:
    """Loss and accuracy of the run's final parameters on the whole training set (None if it
    diverged). Keras' epoch `train_loss` is a running mean over an epoch in which the
    parameters move; the generalisation gap needs the final parameters on both splits."""
    if run.status != "complete":
        return None
    loss, accuracy = _evaluator(model, loss_fn)(run.params, dataset.x_train, dataset.y_train)
    return {"loss": float(loss), "accuracy": float(accuracy)}


def measure_final_sharpness(run: Run, dataset, settings: SharpnessSettings, *, model,
                            loss_fn=None) -> dict[str, Any] | None:
    """Sharpness of the run's final parameters on the probe of `settings`; None if diverged.

    The probe is the first min(probe_size, N) training examples, the same for every run; the
    Lanczos start vector and the Hutchinson probes come from `rng.stream_key(seed,
    "sharpness")`, so a resumed sweep measures what an uninterrupted one would.
    """
    if run.status != "complete":
        return None
    n = min(settings.probe_size or dataset.num_train, dataset.num_train)
    x_N, y_N = dataset.x_train[:n], dataset.y_train[:n]
    measured = compute_sharpness(run.params, x_N, y_N, model=model, loss_fn=loss_fn,
                                 key=stream_key(run.seed, "sharpness"),
                                 num_iters=settings.num_iters, tol=settings.tol,
                                 hutchinson_samples=settings.hutchinson_samples)
    loss, accuracy = _evaluator(model, loss_fn)(run.params, x_N, y_N)
    return {**measured.to_dict(), "loss": float(loss), "accuracy": float(accuracy),
            "step": int(run.history["steps"][-1]),
            "examples_seen": int(run.history["examples_seen"][-1])}


# --------------------------------------------------------------------------------------------
# Messages


def _epoch_text(epoch: int, epochs: int, h: dict[str, float]) -> str:
    return (f"Epoch {epoch}/{epochs} - {h['train_seconds'] + h['eval_seconds']:.2f}s"
            f" - loss: {h['train_loss']:.4f} - accuracy: {h['train_accuracy']:.4f}"
            f" - val_loss: {h['val_loss']:.4f} - val_accuracy: {h['val_accuracy']:.4f}")


def mean_epoch_line(batch_size: int, epoch: int, results: list) -> str:
    """The Keras-like line of one finished epoch, averaged over the seeds still training."""
    active = [r for r in results if len(r.history["epoch"]) == epoch]
    prefix = f"bs {batch_size:>5d} | "
    epochs = results[0].config.epochs
    if not active:
        return prefix + f"Epoch {epoch}/{epochs} - every seed has diverged"
    mean = {k: float(np.mean([r.history[k][-1] for r in active])) for k in results[0].history}
    line = prefix + _epoch_text(epoch, epochs, mean)
    if len(results) > 1:
        line += f" (mean of {len(active)} seeds)"
    newly = [r.config.seed for r in results if r.status == "diverged"
             and r.diverged_step is not None and len(r.history["epoch"]) == epoch - 1]
    if newly:
        line += f" - seeds {abbreviate(newly)} DIVERGED" if len(newly) > 1 else \
            f" - seed {newly[0]} DIVERGED at step " + str(next(
                r.diverged_step for r in results if r.config.seed == newly[0]))
    return line


def _sharpness_line(batch_size: int, seed: int, record: dict) -> str:
    trace = ""
    if record.get("trace") is not None:
        trace = f", tr(H) {record['trace']:.4g}"
        if record.get("trace_stderr") is not None:
            trace += f" ± {record['trace_stderr']:.2g}"
    return (f"bs {batch_size:>5d} | seed {seed} sharpness: lambda_max "
            f"{record['lambda_max']:.4g}{trace} on {record['num_examples']:,} examples "
            f"(loss {record['loss']:.4f}; {record['iterations']} Lanczos iterations"
            f"{'' if record['converged'] else ', NOT converged'}; {record['seconds']:.1f} s)")


class _Console:
    """Lines on `stream`, under a tqdm bar over the sweep's epochs when it is a terminal."""

    def __init__(self, total: int, stream: TextIO | None, verbose: bool):
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose
        tty = verbose and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, unit="epoch", desc="sweep", file=self.stream,
                        disable=not tty, dynamic_ncols=True, leave=False)

    def write(self, line: str) -> None:
        if self.verbose:
            self.bar.write(line, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------
# The sweep


def _start_together(ok: bool, broadcast: Callable | None, barrier: Callable[[str], None]) -> bool:
    """Every process of a multi-host job learns whether process 0 may start the sweep."""
    if broadcast is None:
        from jax.experimental import multihost_utils  # only multi-host jobs need it
        broadcast = multihost_utils.broadcast_one_to_all
    ok = bool(np.asarray(broadcast(np.int32(ok))))
    barrier("batchjax-sweep-start")
    return ok


def run_sweep(out_dir: str | os.PathLike, config: TrainConfig, dataset, *,
              batch_sizes: Sequence[int], seeds: Sequence[int], model=None, optimizer=None,
              loss_fn=None, resume: bool = False, command: Sequence[str] | None = None,
              verbose: bool = True, stream: TextIO | None = None,
              on_epoch_end: Callable[[int, int, list], None] | None = None,
              sharpness: SharpnessSettings | None = SharpnessSettings(),
              group_size: int | None = None, memory_limit: str | int | None = None,
              should_stop: Callable[[], bool] | None = None,
              segment_seconds: float | None = SEGMENT_SECONDS,
              on_phase: Callable[[str], None] | None = None,
              process_index: int = 0, process_count: int = 1,
              barrier: Callable[[str], None] | None = None,
              broadcast: Callable | None = None) -> SweepResults:
    """Train every (batch size, seed) of the grid and save each run under `out_dir`.

    Args:
      out_dir: the sweep directory (created if missing).
      config: the shared configuration; its `batch_size` and `seed` are replaced per run.
      dataset: a `batchjax.Dataset`.
      batch_sizes: the batch sizes to sweep.
      seeds: the seeds of every batch size, trained together (vmapped) in groups that fit.
      model, optimizer, loss_fn: the flax model, optax optimizer and per-example loss
        (defaults: `MLP(config.hidden)`, `config.optimizer`, cross-entropy), used for
        training, the final evaluation and sharpness. Not part of the saved identity: resume
        with the same ones.
      resume: continue the sweep already in `out_dir`: skip completed runs, train the others.
      command: the command line to record (default `sys.argv`).
      verbose: show progress and a line per finished epoch on `stream` (default stderr).
      stream: where progress goes.
      on_epoch_end: optional `on_epoch_end(batch_size, epoch, results)` after each epoch.
      sharpness: how to measure each run's sharpness at its end, or None not to.
      group_size: most seeds trained together; None: as many as fit in memory.
      memory_limit: bytes (or "8G") one device may use; default: `batchjax.memory`.
      should_stop: polled at every safe point; True stops the sweep (`Interrupted`).
      segment_seconds: epochs run in scan segments of about this long, so that a stop waits
        at most one segment (None: whole epochs).
      on_phase: called with a short description of each phase as it starts (for messages).
      process_index, process_count, barrier, broadcast: for a multi-host job
        (`jax.distributed`), every process calls `run_sweep` on the same shared `out_dir`;
        process p trains the batch sizes whose position in `batch_sizes` is p modulo
        `process_count`, on its own local devices. Process 0 alone locks and checks the
        directory and writes the manifest and tables; `barrier(name)` (e.g.
        `multihost_utils.sync_global_devices`) orders the processes, `broadcast` (default
        `multihost_utils.broadcast_one_to_all`) tells them whether process 0 could start.

    Returns:
      The sweep as loaded back from disk (after every process has finished).

    Raises:
      BatchjaxError: bad batch sizes, seeds or probe size; a grid that does not fit in
        memory; a directory in use by another sweep, or holding something else, or another
        configuration on resume; a write that failed.
      Interrupted: `should_stop()` returned True (every run saved so far is kept).
    """
    out_dir = pathlib.Path(out_dir)
    stop = should_stop if should_stop is not None else (lambda: False)
    phase = on_phase if on_phase is not None else (lambda text: None)
    if not 0 <= process_index < process_count:
        raise BatchjaxError(f"process_index {process_index} is not in [0, {process_count})")
    if process_count > 1 and barrier is None:
        raise BatchjaxError("a multi-process sweep needs a barrier (multihost_utils)")
    phase("checking the grid and its memory")
    batch_sizes, seeds = check_grid(config, batch_sizes, seeds)
    check_against_data(config, dataset, batch_sizes)
    group_sizes, _, _ = check_memory(
        config, dataset, batch_sizes=batch_sizes, num_runs=len(seeds), model=model,
        optimizer=optimizer, group_size=group_size, limit=memory_limit,
        sharpness_iters=sharpness.num_iters if sharpness is not None else 0)
    asked = sweep_identity(batch_sizes=batch_sizes, seeds=seeds, config=config,
                           sharpness=sharpness.to_dict() if sharpness is not None else None,
                           dataset=dataset.describe())
    lead = process_index == 0
    lock, saved, error = None, None, None
    if lead:
        try:
            lock, saved = _open_out_dir(out_dir, asked, resume, process_count)
        except BatchjaxError as err:
            error = err
    if process_count > 1 and not _start_together(error is None, broadcast, barrier) and not lead:
        raise BatchjaxError(f"process 0 could not start the sweep in {out_dir} (see its error)")
    if error is not None:
        raise error
    console = _Console(0, stream, verbose)
    try:
        if lock is not None and lock.taken_over:
            console.write(f"note: took over the lock of {out_dir} left by process "
                          f"{lock.taken_over.get('pid')} on {lock.taken_over.get('host')}, "
                          "which no longer runs")
        return _sweep(out_dir, config, dataset, batch_sizes=batch_sizes, seeds=seeds,
                      model=model, optimizer=optimizer, loss_fn=loss_fn, resume=resume,
                      saved=saved, asked=asked, group_sizes=group_sizes, command=command,
                      console=console, on_epoch_end=on_epoch_end, sharpness=sharpness,
                      stop=stop, phase=phase, segment_seconds=segment_seconds,
                      process_index=process_index, process_count=process_count,
                      barrier=barrier)
    finally:
        console.close()
        if lock is not None:
            lock.release()


def _open_out_dir(out_dir: pathlib.Path, asked: dict, resume: bool,
                  process_count: int) -> tuple[DirectoryLock, dict | None]:
    """Create and lock `out_dir` and check that it may hold the asked sweep (process 0).

    Returns the held lock and the saved manifest (None for a fresh sweep)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchjaxError(f"results directory {out_dir} is a file; choose another directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BatchjaxError(f"cannot create the results directory {out_dir}: "
                            f"{err.strerror or err}; choose another") from None
    lock = DirectoryLock(out_dir, processes=process_count).acquire()
    try:
        saved = check_out_dir(out_dir, asked, resume)
        if saved is not None:
            remove_stale_temp_files(out_dir)
    except BaseException:
        lock.release()
        raise
    return lock, saved


def _sweep(out_dir, config, dataset, *, batch_sizes, seeds, model, optimizer, loss_fn, resume,
           saved, asked, group_sizes, command, console, on_epoch_end, sharpness, stop, phase,
           segment_seconds, process_index, process_count, barrier) -> SweepResults:
    lead = process_index == 0
    if not lead:
        saved = read_json(out_dir / MANIFEST) if resume else None
    mine = [b for i, b in enumerate(batch_sizes) if i % process_count == process_index]
    groups = {}
    for b in mine:
        base = dataclasses.replace(config, batch_size=b, seed=seeds[0])
        done = _completed_seeds(out_dir, base, seeds) if saved is not None else []
        missing = [s for s in seeds if s not in set(done)]
        if missing:
            groups[b] = split_groups(missing, group_sizes[b])
    session = {**collect_provenance(command), "started": _now(), "finished": None,
               "trained": [run_name(b, s) for b, gs in groups.items() for g in gs for s in g],
               "group_sizes": {str(b): group_sizes[b] for b in groups}}
    manifest = saved or {"kind": "batchjax-sweep", "schema": SCHEMA_VERSION, **asked,
                         "started": session["started"], "finished": None, "sessions": []}
    manifest["schema"] = SCHEMA_VERSION
    manifest["sessions"] = list(manifest.get("sessions", [])) + [session]
    manifest["finished"] = None
    if lead:
        write_json_atomic(out_dir / MANIFEST, manifest)

    console.bar.reset(total=sum(config.epochs * len(gs) for gs in groups.values()))
    skipped = [b for b in mine if b not in groups]
    if skipped:
        console.write(f"resume: batch sizes {abbreviate(skipped)} already complete for every "
                      "seed; skipped")
    model = model if model is not None else MLP(config.hidden, dataset.num_classes)
    noise_on = config.noise_schedule != "none"
    for b, group_list in groups.items():
        if len(group_list) > 1:
            console.write(f"bs {b:>5d} | {sum(map(len, group_list)):,} seeds do not fit in "
                          f"memory together: {describe_groups(group_list)}")
        for g, group in enumerate(group_list):
            _check(stop)
            configs = [dataclasses.replace(config, batch_size=b, seed=s) for s in group]
            names = [run_name(b, s) for s in group]
            for c, name in zip(configs, names):
                write_json_atomic(out_dir / name / CONFIG, c.to_dict())
            where = f" (group {g + 1}/{len(group_list)})" if len(group_list) > 1 else ""
            console.write(f"bs {b:>5d} | training seeds {abbreviate(group)}{where} "
                          f"({dataset.name}, {dataset.num_train:,} examples, "
                          f"{-(-dataset.num_train // b):,} steps per epoch)")
            training = f"compiling or training batch size {b}, seeds {abbreviate(group)}"
            measure = None
            if noise_on:
                # Keyed by seed, not by position in the group, so a resumed sweep that trains
                # only some seeds measures what an uninterrupted one would.
                measure_noise = make_measure(dataset, configs[0], batch_sizes=batch_sizes,
                                             seeds=group, model=model, loss_fn=loss_fn)

                def measure(params_list, step, examples_seen, b=b, training=training,
                            measure_noise=measure_noise):
                    phase(f"measuring the gradient noise of batch size {b} at step {step}")
                    records = measure_noise(params_list, step, examples_seen)
                    phase(training)
                    return records

            def epoch_done(epoch, results, b=b):
                console.update(1)
                console.write(mean_epoch_line(b, epoch, results))
                if on_epoch_end is not None:
                    on_epoch_end(b, epoch, results)
                _check(stop)

            phase(training)
            results = train_runs(configs, dataset, model=model, optimizer=optimizer,
                                 loss_fn=loss_fn, measure=measure, on_epoch_end=epoch_done,
                                 should_stop=stop, segment_seconds=segment_seconds)
            left = config.epochs - max(len(r.history["epoch"]) for r in results)
            console.update(left)  # every seed diverged early: the bar still ends at its total
            for run in results:
                run.trained_with = list(names)
                _check(stop)
                phase(f"final evaluation and sharpness of {run_name(b, run.seed)}")
                run.final_train = evaluate_final_train(run, dataset, model=model, loss_fn=loss_fn)
                if sharpness is not None:
                    run.sharpness = measure_final_sharpness(run, dataset, sharpness, model=model,
                                                            loss_fn=loss_fn)
                write_run(out_dir, run)
                if run.sharpness is not None:
                    console.write(_sharpness_line(b, run.seed, run.sharpness))
                if run.status == "diverged":
                    console.write(f"bs {b:>5d} | seed {run.seed} diverged at step "
                                  f"{run.diverged_step}; saved with status 'diverged'")
                run.params = None  # keep memory bounded over many groups
    if process_count > 1:
        barrier("batchjax-sweep-end")  # every process has written its runs
    results = None
    if lead:
        phase("writing the tables")
        results = load_sweep(out_dir)
        write_tables(out_dir, results.runs)
        session["finished"] = manifest["finished"] = _now()
        if process_count > 1:
            session["processes"] = process_count
            session["trained"] = [run_name(b, s) for b in batch_sizes for s in seeds]
        write_json_atomic(out_dir / MANIFEST, manifest)
    if process_count > 1:
        barrier("batchjax-sweep-manifest")
    return results if results is not None else load_sweep(out_dir)


def _check(stop: Callable[[], bool]) -> None:
    if stop():
        raise Interrupted("stop requested")
