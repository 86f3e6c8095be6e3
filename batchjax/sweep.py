"""A sweep: a grid of batch sizes x seeds -> training runs -> results on disk, resumable.

`run_sweep` trains, for every batch size, all the seeds that have no completed run yet, vmapped
together in one jitted epoch (`batchjax.train_seeds`), and writes each run as soon as its batch
size finishes (layout and atomicity: `batchjax.results`). A sweep directory belongs to exactly one
configuration, recorded in its `manifest.json`:

  * a fresh sweep refuses a non-empty directory (no mixing of two sweeps' results);
  * `resume=True` refuses a directory whose saved configuration differs from the one asked for,
    naming each differing flag; otherwise it skips the completed runs and trains the others
    (only the missing seeds of a batch size, still vmapped together).

After training, each completed run's sharpness (the extreme Hessian eigenvalues and the trace,
`batchjax.sharpness`, on a fixed probe of training examples; `SharpnessSettings`) is measured at
its final parameters and saved with its metrics; the settings are part of the sweep's identity.

A run whose loss becomes NaN or infinite is saved with status "diverged" and the step (and no
sharpness); the sweep goes on. Progress: a bar over the whole sweep (epochs summed over batch
sizes) and a Keras-like line per finished epoch per batch size, both on stderr; the bar is
redrawn in place on a terminal and printed as one line per update otherwise (CI logs).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import importlib.metadata
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Sequence, TextIO

import jax
import numpy as np

from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.model import MLP
from batchjax.results import (CONFIG, MANIFEST, SCHEMA_VERSION, SweepResults, load_run,
                              load_sweep, parse_run_name, read_json, remove_stale_temp_files,
                              run_name, write_json_atomic, write_run)
from batchjax.sharpness import SharpnessSettings, sharpness as compute_sharpness
from batchjax.train import format_epoch, make_evaluate, train_seeds

# The command-line flag of each swept or shared setting, for messages that say what to change.
FLAGS = {
    "batch_sizes": "--batch-sizes", "seeds": "--seeds", "dataset": "--dataset",
    "epochs": "--epochs", "learning_rate": "--lr", "lr_scaling": "--lr-scaling",
    "reference_batch_size": "--reference-batch-size", "optimizer": "--optimizer",
    "b1": "--b1", "b2": "--b2", "eps": "--eps", "hidden": "--hidden",
    "noise_schedule": "--noise-every", "noise_points": "--noise-points",
    "probe_size": "--probe-size", "unroll": "--unroll",
}
# Sharpness keys: fold_in(key(seed), _SHARPNESS_KEY) keeps them apart from the initialisation
# (0) and shuffling (1) keys of `batchjax.train`.
_SHARPNESS_KEY = 2
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "matplotlib", "tensorflow-datasets",
            "batchjax")
# Dataset fields that identify the data; `source` may word the same data differently.
_DATASET_IDENTITY = ("name", "num_train", "num_val", "image_shape", "num_classes")


# --------------------------------------------------------------------------------------------
# Compilation cache

COMPILE_CACHE_ENV = "BATCHJAX_COMPILE_CACHE"


def compile_cache_dir(flag: str | None = None) -> str | None:
    """The compilation cache directory of `scripts/sweep.py --compile-cache FLAG` (None: off).

    FLAG "none" (or empty) turns the cache off. Without the flag: $BATCHJAX_COMPILE_CACHE if
    set (again "none": off); else a cache JAX was already given (JAX_COMPILATION_CACHE_DIR);
    else $XDG_CACHE_HOME/batchjax/xla, by default ~/.cache/batchjax/xla.
    """
    chosen = flag if flag is not None else os.environ.get(COMPILE_CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none") else chosen
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "batchjax", "xla")


def enable_compile_cache(path: str | os.PathLike | None) -> str | None:
    """Keep this process's compiled XLA programs in JAX's persistent cache at `path`.

    A later process that compiles the same program (same code, shapes, options, jax and
    jaxlib) loads it instead: on 2 CPU cores a second default sweep on 60,000 examples takes
    83 instead of 95 s. Loaded and freshly compiled programs compute the same numbers. Every
    program is cached, however quickly it compiled (unless
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise). Call before the first
    compilation; `path` None turns the cache off for this process. Returns the directory.

    Raises:
      BatchjaxError: `path` cannot be created or written (the cache is then left off).
    """
    jax.config.update("jax_enable_compilation_cache", False)
    if path is None:
        return None
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as err:
        raise BatchjaxError(f"compile cache {path} is not a writable directory "
                            f"({err.strerror or err})") from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's choice wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A plain-text progress bar over `total` epochs, on `stream` (stderr by default).

    On a terminal the bar is redrawn in place with a carriage return and other lines are printed
    above it; elsewhere (CI logs, files) each update prints one line.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 width: int = 30):
        self.total, self.done, self.width = max(total, 0), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._drawn = False

    def _bar(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_text = _clock(eta) if np.isfinite(eta) else "?"
        return (f"sweep [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"epochs {100 * frac:3.0f}% | elapsed {_clock(elapsed)} | eta {eta_text}")

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\033[K")
            self._drawn = False

    def write(self, line: str) -> None:
        """Print `line` (above the bar on a terminal)."""
        if not self.enabled:
            return
        self._clear()
        self.stream.write(line + "\n")
        if self.tty:
            self._draw()
        self.stream.flush()

    def _draw(self) -> None:
        self.stream.write(self._bar())
        self._drawn = True

    def update(self, n: int = 1) -> None:
        """Advance by `n` epochs and show the bar."""
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        if self.tty:
            self._clear()
            self._draw()
        else:
            self.stream.write(self._bar() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def mean_epoch_line(batch_size: int, epoch: int, results: list) -> str:
    """The Keras-like line of one finished epoch, averaged over the seeds still training."""
    active = [r for r in results if len(r.history["epoch"]) == epoch]
    prefix = f"bs {batch_size:>5d} | "
    if not active:
        return prefix + f"Epoch {epoch}/{results[0].config.epochs} - every seed has diverged"
    history = {k: [float(np.mean([r.history[k][-1] for r in active]))]
               for k in results[0].history}
    line = prefix + format_epoch(epoch, results[0].config.epochs, history)
    if len(results) > 1:
        line += f" (mean of {len(active)} seeds)"
    newly = [r for r in results if r.status == "diverged" and r.diverged_step is not None
             and len(r.history["epoch"]) == epoch - 1]
    for r in newly:
        line += f" - seed {r.config.seed} DIVERGED at step {r.diverged_step}"
    return line


# --------------------------------------------------------------------------------------------
# Provenance and the sweep's identity


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


def shared_config(config: TrainConfig) -> dict[str, Any]:
    """The configuration every run of a sweep shares: all fields but batch size and seed."""
    d = config.to_dict()
    d.pop("batch_size")
    d.pop("seed")
    return d


def _identity(dataset_description: dict) -> dict:
    return {k: dataset_description.get(k) for k in _DATASET_IDENTITY}


def _differences(saved: dict, asked: dict) -> list[str]:
    """Human-readable differences between a saved and an asked sweep description."""
    diffs = []
    for key, flag in (("batch_sizes", "--batch-sizes"), ("seeds", "--seeds")):
        a, b = sorted(saved.get("sweep", {}).get(key, [])), sorted(asked["sweep"][key])
        if a != b:
            shown = (lambda s: len(s)) if key == "seeds" and a == list(range(len(a))) \
                and b == list(range(len(b))) else (lambda s: ",".join(map(str, s)))
            diffs.append(f"{flag} saved {shown(a)}, asked {shown(b)}")
    saved_config, asked_config = saved.get("config", {}), asked["config"]
    for key in sorted(set(saved_config) | set(asked_config)):
        if saved_config.get(key) != asked_config.get(key):
            diffs.append(f"{FLAGS.get(key, key)} saved {saved_config.get(key)!r}, "
                         f"asked {asked_config.get(key)!r}")
    if saved.get("sharpness") != asked["sharpness"]:
        diffs.append(f"--sharpness saved {_sharpness_text(saved.get('sharpness'))}, "
                     f"asked {_sharpness_text(asked['sharpness'])}")
    saved_data = _identity(saved.get("dataset", {}))
    asked_data = _identity(asked["dataset"])
    if saved_data != asked_data:
        diffs.append(f"--dataset saved {saved_data['name']} ({saved_data['num_train']} train / "
                     f"{saved_data['num_val']} val), asked {asked_data['name']} "
                     f"({asked_data['num_train']} train / {asked_data['num_val']} val)")
    return diffs


def _sharpness_text(settings: dict | None) -> str:
    if not settings:
        return "off"
    return "on (" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")"


# --------------------------------------------------------------------------------------------
# Preparing the output directory


def check_grid(config: TrainConfig, batch_sizes: Sequence[int],
               seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate a grid before any data is loaded; returns it sorted.

    Raises:
      BatchjaxError: empty or repeated batch sizes or seeds, or a value `TrainConfig` rejects.
    """
    batch_sizes, seeds = list(batch_sizes), list(seeds)
    if not batch_sizes:
        raise BatchjaxError("batch sizes must be a non-empty list, e.g. --batch-sizes 8,32,128")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise BatchjaxError(f"batch sizes must be distinct, got {batch_sizes}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise BatchjaxError(f"seeds must be a non-empty list of distinct integers, got {seeds}; "
                            "use e.g. --seeds 3")
    for b in batch_sizes:
        dataclasses.replace(config, batch_size=b)  # validates the type and range
    for s in seeds:
        dataclasses.replace(config, seed=s)
    return sorted(batch_sizes), sorted(seeds)


def check_against_data(config: TrainConfig, dataset, batch_sizes: Sequence[int]) -> None:
    """Batch sizes and the probe size must fit in the training set."""
    for b in batch_sizes:
        if b > dataset.num_train:
            raise BatchjaxError(f"batch size {b} is larger than the training set "
                                f"({dataset.num_train:,} examples of {dataset.name}); choose "
                                f"--batch-sizes of at most {dataset.num_train}")
    if config.probe_size > dataset.num_train:
        raise BatchjaxError(f"probe size {config.probe_size} is larger than the training set "
                            f"({dataset.num_train:,} examples); choose --probe-size of at most "
                            f"{dataset.num_train} (0 means all of it)")


def prepare_out_dir(out_dir: pathlib.Path, asked: dict, resume: bool) -> dict | None:
    """Check that `out_dir` may hold the asked sweep; returns the saved manifest, if any.

    Raises:
      BatchjaxError: the directory holds another sweep, or something else, or a sweep while
        `resume` is False; or it cannot be created.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchjaxError(f"--out {out_dir} is a file, not a directory; choose another --out")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    manifest_path = out_dir / MANIFEST
    if not entries:
        return None
    if not manifest_path.exists():
        run_dirs = [e for e in entries if parse_run_name(e)]
        what = (f"run directories ({run_dirs[0]}, ...) but no {MANIFEST}" if run_dirs
                else f"{len(entries)} entries but no batchjax {MANIFEST}")
        raise BatchjaxError(f"--out {out_dir} is not empty ({what}); choose another --out "
                            "or empty it")
    saved = read_json(manifest_path)
    if not isinstance(saved, dict) or saved.get("kind") != "batchjax-sweep":
        raise BatchjaxError(f"{manifest_path} is not a batchjax sweep manifest; choose "
                            "another --out")
    if not resume:
        raise BatchjaxError(f"--out {out_dir} already holds a sweep; continue it with --resume, "
                            f"or choose another --out (or delete {out_dir})")
    diffs = _differences(saved, asked)
    if diffs:
        raise BatchjaxError(f"--resume: {out_dir} holds a sweep with a different configuration "
                            f"({'; '.join(diffs)}); rerun with the saved flags, choose another "
                            f"--out, or delete {out_dir} to start over")
    return saved


def _completed_seeds(out_dir: pathlib.Path, config: TrainConfig, seeds: list[int]) -> list[int]:
    done = []
    for s in seeds:
        run_dir = out_dir / run_name(config.batch_size, s)
        run = load_run(run_dir)
        if run is None:
            continue
        asked = dataclasses.replace(config, seed=s)
        if run.config != asked:
            raise BatchjaxError(f"--resume: {run_dir / CONFIG} differs from the asked "
                                f"configuration; choose another --out, or delete {run_dir}")
        done.append(s)
    return done


# --------------------------------------------------------------------------------------------
# The sweep


def _load_make_measure() -> Callable:
    # Imported when needed, so the sweep (and its tests) work with noise measurement off.
    return importlib.import_module("batchjax.noise").make_measure


@functools.lru_cache(maxsize=None)
def _jitted_evaluate(hidden: int, num_classes: int) -> Callable:
    # One compiled evaluation per model shape for the whole sweep, not one per batch size.
    return jax.jit(make_evaluate(MLP(hidden, num_classes)))


def evaluate_final_train(results: list, dataset) -> list[dict[str, float] | None]:
    """Loss and accuracy of each result's final parameters on the whole training set.

    Keras' epoch `train_loss` is a running mean over an epoch in which the parameters move; the
    generalisation gap needs the final parameters on both splits. None for a diverged run.
    """
    config = results[0].config
    evaluate = _jitted_evaluate(config.hidden, dataset.num_classes)
    out = []
    for r in results:
        if r.status != "complete":
            out.append(None)
            continue
        loss, accuracy = evaluate(r.params, dataset.x_train, dataset.y_train)
        out.append({"loss": float(loss), "accuracy": float(accuracy)})
    return out


def measure_final_sharpness(results: list, dataset, settings: SharpnessSettings
                            ) -> list[dict[str, Any] | None]:
    """Sharpness of each result's final parameters on the probe of `settings`; None if diverged.

    The probe is the first min(probe_size, N) training examples, the same for every run; the
    Lanczos start vector and the Hutchinson probes come from the run's seed alone, so a resumed
    sweep measures what an uninterrupted one would.
    """
    config = results[0].config
    n = min(settings.probe_size or dataset.num_train, dataset.num_train)
    x_N, y_N = dataset.x_train[:n], dataset.y_train[:n]
    model = MLP(config.hidden, dataset.num_classes)
    evaluate = _jitted_evaluate(config.hidden, dataset.num_classes)
    out = []
    for r in results:
        if r.status != "complete":
            out.append(None)
            continue
        key = jax.random.fold_in(jax.random.key(r.config.seed), _SHARPNESS_KEY)
        measured = compute_sharpness(r.params, x_N, y_N, model=model, key=key,
                                     num_iters=settings.num_iters, tol=settings.tol,
                                     hutchinson_samples=settings.hutchinson_samples)
        loss, accuracy = evaluate(r.params, x_N, y_N)
        out.append({**measured.to_dict(), "loss": float(loss), "accuracy": float(accuracy),
                    "step": int(r.history["steps"][-1]),
                    "examples_seen": int(r.history["examples_seen"][-1])})
    return out


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


def run_sweep(out_dir: str | os.PathLike, config: TrainConfig, dataset, *,
              batch_sizes: Sequence[int], seeds: Sequence[int], resume: bool = False,
              command: Sequence[str] | None = None, verbose: bool = True,
              stream: TextIO | None = None,
              on_epoch_end: Callable[[int, int, list], None] | None = None,
              sharpness: SharpnessSettings | None = SharpnessSettings(),
              process_index: int = 0, process_count: int = 1,
              barrier: Callable[[str], None] | None = None) -> SweepResults:
    """Train every (batch size, seed) of the grid and save each run under `out_dir`.

    Args:
      out_dir: the sweep directory (created if missing).
      config: the shared configuration; its `batch_size` and `seed` are replaced per run.
      dataset: a `batchjax.Dataset`.
      batch_sizes: the batch sizes to sweep.
      seeds: the seeds of every batch size, trained together (vmapped).
      resume: continue the sweep already in `out_dir`: skip completed runs, train the others.
      command: the command line to record (default `sys.argv`).
      verbose: show the progress bar and a line per finished epoch on `stream`.
      stream: where progress goes (default stderr).
      on_epoch_end: optional `on_epoch_end(batch_size, epoch, results)` after each epoch's line.
      sharpness: how to measure each run's sharpness at its end, or None not to.
      process_index, process_count, barrier: for a multi-host job (`jax.distributed`), every
        process calls `run_sweep` on the same shared `out_dir`; process p trains the batch
        sizes whose position in `batch_sizes` is p modulo `process_count`, on its own local
        devices. Process 0 alone checks the directory and writes the manifest;
        `barrier(name)` (e.g. `multihost_utils.sync_global_devices`) orders the processes.

    Returns:
      The sweep as loaded back from disk (after every process has finished).

    Raises:
      BatchjaxError: bad batch sizes, seeds or probe size; an output directory that holds
        something else, or another configuration on resume; a write that failed.
    """
    out_dir = pathlib.Path(out_dir)
    batch_sizes, seeds = check_grid(config, batch_sizes, seeds)
    check_against_data(config, dataset, batch_sizes)
    configs = {b: dataclasses.replace(config, batch_size=b, seed=seeds[0]) for b in batch_sizes}
    asked = {"sweep": {"batch_sizes": batch_sizes, "seeds": seeds, "epochs": config.epochs},
             "config": shared_config(config),
             "sharpness": sharpness.to_dict() if sharpness is not None else None,
             "dataset": dataset.describe()}
    if not 0 <= process_index < process_count:
        raise BatchjaxError(f"process_index {process_index} is not in [0, {process_count})")
    if process_count > 1 and barrier is None:
        raise BatchjaxError("a multi-process sweep needs a barrier (multihost_utils)")
    lead = process_index == 0
    if lead:
        saved = prepare_out_dir(out_dir, asked, resume)
        if saved is not None:
            remove_stale_temp_files(out_dir)
    if process_count > 1:
        barrier("batchjax-sweep-start")  # the lead has checked and prepared the directory
    if not lead:
        saved = read_json(out_dir / MANIFEST) if resume else None
    mine = [b for i, b in enumerate(batch_sizes) if i % process_count == process_index]
    todo = {}
    for b in mine:
        done = _completed_seeds(out_dir, configs[b], seeds) if saved is not None else []
        missing = [s for s in seeds if s not in done]
        if missing:
            todo[b] = missing

    session = {**collect_provenance(command), "started": _now(), "finished": None,
               "trained": [run_name(b, s) for b, ss in todo.items() for s in ss]}
    manifest = saved or {"kind": "batchjax-sweep", "schema": SCHEMA_VERSION, **asked,
                         "started": session["started"], "finished": None, "sessions": []}
    manifest["sessions"] = list(manifest.get("sessions", [])) + [session]
    manifest["finished"] = None
    if lead:
        write_json_atomic(out_dir / MANIFEST, manifest)

    progress = Progress(sum(config.epochs for _ in todo), stream=stream, enabled=verbose)
    skipped = [b for b in mine if b not in todo]
    if skipped:
        progress.write(f"resume: batch sizes {', '.join(map(str, skipped))} already complete "
                       "for every seed; skipped")
    make_measure = None
    if config.noise_schedule != "none" and todo:
        make_measure = _load_make_measure()
    try:
        for b, missing in todo.items():
            run_config = configs[b]
            for s in missing:
                write_json_atomic(out_dir / run_name(b, s) / CONFIG,
                                  dataclasses.replace(run_config, seed=s).to_dict())
            progress.write(f"bs {b:>5d} | training seeds {','.join(map(str, missing))} "
                           f"({dataset.name}, {dataset.num_train:,} examples, "
                           f"{-(-dataset.num_train // b)} steps per epoch)")
            measure = None
            if make_measure is not None:
                # Keyed by seed, not by position in the group, so a resumed sweep that trains
                # only some seeds measures what an uninterrupted one would.
                measure = make_measure(dataset, run_config, batch_sizes=batch_sizes,
                                       seeds=missing)

            def epoch_done(epoch, results, b=b):
                progress.update(1)
                progress.write(mean_epoch_line(b, epoch, results))
                if on_epoch_end is not None:
                    on_epoch_end(b, epoch, results)

            results = train_seeds(run_config, dataset, missing, measure=measure,
                                  on_epoch_end=epoch_done)
            left = config.epochs - max(len(r.history["epoch"]) for r in results)
            if left:  # every seed diverged early: the bar still ends at its total
                progress.update(left)
            hessians = (measure_final_sharpness(results, dataset, sharpness)
                        if sharpness is not None else [None] * len(results))
            for r, final_train, hessian in zip(results, evaluate_final_train(results, dataset),
                                               hessians):
                write_run(out_dir, r, trained_with_seeds=missing, final_train=final_train,
                          sharpness=hessian)
                if hessian is not None:
                    progress.write(_sharpness_line(b, r.config.seed, hessian))
                if r.status == "diverged":
                    progress.write(f"bs {b:>5d} | seed {r.config.seed} diverged at step "
                                   f"{r.diverged_step}; saved with status 'diverged'")
    finally:
        progress.close()
    if process_count > 1:
        barrier("batchjax-sweep-end")  # every process has written its runs
    if lead:
        session["finished"] = manifest["finished"] = _now()
        if process_count > 1:
            session["processes"] = process_count
            session["trained"] = [run_name(b, s) for b in batch_sizes for s in seeds]
        write_json_atomic(out_dir / MANIFEST, manifest)
    if process_count > 1:
        barrier("batchjax-sweep-manifest")
    return load_sweep(out_dir)
