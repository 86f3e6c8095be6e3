"""Results on disk: the schema of a sweep directory, an atomic writer and a loader.

Layout of a sweep directory `OUT/`:

    OUT/manifest.json           what was swept and with what: the batch sizes, seeds and shared
                                configuration, the sharpness settings (null: not measured),
                                the dataset (name, source, sizes), and one
                                provenance record per session (command line, start and end times,
                                package versions, Python, platform, devices).
    OUT/bs00032_seed0/config.json    the run's `TrainConfig`, written before it trains.
    OUT/bs00032_seed0/metrics.json   everything the run produced, written last:
        complete (true), status ("complete" | "diverged"), diverged_step, dataset, history
        (per-epoch lists, Keras semantics), final_train (loss and accuracy of the final
        parameters on the whole training set), step_losses and step_batch_sizes (every optimizer
        step), noise (gradient-noise records), compile_seconds, trained_with_seeds (the seeds
        vmapped together with this one: epoch times are those of the group), sharpness (the
        Hessian of the training loss at the final parameters: `SharpnessResult.to_dict()` plus
        the probe's loss and accuracy, step and examples_seen; null when it was not measured
        or the run diverged; settings in the manifest's `sharpness`).

A run is complete exactly when its `metrics.json` exists: every file is written to a temporary
name in the same directory, flushed, fsynced and renamed over its final name (`os.replace` is
atomic on POSIX), so a killed process never leaves a file that looks complete but is not.
Non-finite floats (a diverged run's last loss) are stored as JSON `null`, which keeps the files
strict JSON; the loader turns them back into NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any

import numpy as np

from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
METRICS = "metrics.json"
TEMP_SUFFIX = ".tmp"
_RUN_DIR = re.compile(r"^bs(\d{5,})_seed(\d+)$")
# mkstemp creates files readable by the owner only; results get the usual umask instead.
_UMASK = os.umask(0)
os.umask(_UMASK)


def run_name(batch_size: int, seed: int) -> str:
    """The directory name of one run, e.g. `bs00032_seed0` (sorts by batch size)."""
    return f"bs{batch_size:05d}_seed{seed}"


def parse_run_name(name: str) -> tuple[int, int] | None:
    """(batch_size, seed) of a run directory name, or None if it is not one."""
    match = _RUN_DIR.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


# --------------------------------------------------------------------------------------------
# Writing


def to_jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars and arrays as Python values and non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename.

    Raises:
      BatchjaxError: the file could not be written; any earlier version of it is untouched.
    """
    path = pathlib.Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise BatchjaxError(f"could not write {path}: {err.strerror or err}; files written "
                            "before it are intact (free space or choose another --out)") from err
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_dir(directory: pathlib.Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, flat: bool = False) -> None:
    """Write `obj` as strict JSON (NaN/inf become null) to `path`, atomically.

    `flat=True` puts each top-level key of a dict on one line (long arrays stay one line each)
    instead of indenting every element.
    """
    obj = to_jsonable(obj)
    if flat and isinstance(obj, dict):
        text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}"
                                   for k, v in obj.items()) + "\n}"
    else:
        text = json.dumps(obj, indent=1, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a corrupt, truncated or unreadable one raises an error naming it."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BatchjaxError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BatchjaxError(f"cannot read results file {path}: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BatchjaxError(f"results file {path} is corrupt or truncated ({err.msg} at line "
                            f"{err.lineno}); delete it and rerun with --resume") from err


def remove_stale_temp_files(out_dir: str | os.PathLike) -> int:
    """Delete temporary files left by a killed writer in `out_dir` and its run directories."""
    out_dir = pathlib.Path(out_dir)
    removed = 0
    for pattern in (f".*{TEMP_SUFFIX}", f"*/.*{TEMP_SUFFIX}"):
        for p in out_dir.glob(pattern):
            if p.is_file():
                p.unlink()
                removed += 1
    return removed


def metrics_record(result, *, trained_with_seeds: list[int],
                   final_train: dict[str, float] | None,
                   sharpness: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `metrics.json` content of one `batchjax.TrainResult`."""
    return {
        "schema": SCHEMA_VERSION,
        "complete": True,
        "batch_size": result.config.batch_size,
        "seed": result.config.seed,
        "status": result.status,
        "diverged_step": result.diverged_step,
        "effective_learning_rate": result.config.effective_learning_rate,
        "dataset": result.dataset,
        "compile_seconds": result.compile_seconds,
        "trained_with_seeds": list(trained_with_seeds),
        "history": result.history,
        "final_train": final_train,
        "noise": result.noise,
        "sharpness": sharpness,
        "step_losses": np.asarray(result.step_losses, np.float64),
        "step_batch_sizes": np.asarray(result.step_batch_sizes, np.int64),
    }


def write_run(out_dir: str | os.PathLike, result, *, trained_with_seeds: list[int],
              final_train: dict[str, float] | None = None,
              sharpness: dict[str, Any] | None = None) -> pathlib.Path:
    """Write one finished run's `metrics.json` (its `config.json` is written before training).

    Returns:
      The run directory.
    """
    run_dir = pathlib.Path(out_dir) / run_name(result.config.batch_size, result.config.seed)
    write_json_atomic(run_dir / CONFIG, result.config.to_dict())
    write_json_atomic(run_dir / METRICS, metrics_record(
        result, trained_with_seeds=trained_with_seeds, final_train=final_train,
        sharpness=sharpness), flat=True)
    return run_dir


# --------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Run:
    """One completed run as saved on disk; arrays are NumPy, history values are float arrays.

    Attributes:
      config: the run's `TrainConfig`.
      status: "complete" or "diverged".
      diverged_step: first step (0-based) with a non-finite loss, or None.
      history: per-epoch arrays (epoch, train_loss, ..., examples_seen) of the finished epochs.
      final_train: {"loss", "accuracy"} of the final parameters on the training set, or None.
      step_losses, step_batch_sizes: every optimizer step.
      noise: gradient-noise records, in the order they were taken.
      compile_seconds: one-off compilation time of the run's group.
      trained_with_seeds: the seeds trained together in one vmapped group with this one.
      dataset: `Dataset.describe()` of the data.
      path: the run directory.
      sharpness: Hessian measurements at the final parameters (see the module docstring), or
        None.
    """

    config: TrainConfig
    status: str
    diverged_step: int | None
    history: dict[str, np.ndarray]
    final_train: dict[str, float] | None
    step_losses: np.ndarray
    step_batch_sizes: np.ndarray
    noise: list[dict]
    compile_seconds: float
    trained_with_seeds: list[int]
    dataset: dict
    path: pathlib.Path | None = None
    sharpness: dict | None = None

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def examples_seen(self) -> np.ndarray:
        """Examples seen after each step (cumulative sum of the step batch sizes)."""
        return np.cumsum(self.step_batch_sizes)


def _floats(values: list) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _field(d: dict, key: str, path: pathlib.Path) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError):
        raise BatchjaxError(f"results file {path} lacks {key!r}; it was not written by this "
                            "version of batchjax (delete it and rerun with --resume)") from None


def load_run(run_dir: str | os.PathLike) -> Run | None:
    """Load one run directory; None when the run is incomplete (no `metrics.json`).

    Raises:
      BatchjaxError: a file is corrupt, truncated or not of this schema (the message names it).
    """
    run_dir = pathlib.Path(run_dir)
    metrics_path = run_dir / METRICS
    if not metrics_path.exists():
        return None
    config_path = run_dir / CONFIG
    config_dict = read_json(config_path)
    try:
        config = TrainConfig.from_dict(config_dict)
    except (BatchjaxError, TypeError) as err:
        raise BatchjaxError(f"results file {config_path} is not a valid configuration: "
                            f"{err}") from err
    m = read_json(metrics_path)
    if _field(m, "complete", metrics_path) is not True:
        return None
    history = {k: _floats(v) for k, v in _field(m, "history", metrics_path).items()}
    return Run(
        config=config,
        status=_field(m, "status", metrics_path),
        diverged_step=m.get("diverged_step"),
        history=history,
        final_train=m.get("final_train"),
        step_losses=_floats(_field(m, "step_losses", metrics_path)),
        step_batch_sizes=np.asarray(_field(m, "step_batch_sizes", metrics_path), np.int64),
        noise=list(m.get("noise") or []),
        compile_seconds=float(m.get("compile_seconds") or 0.0),
        trained_with_seeds=list(m.get("trained_with_seeds") or [config.seed]),
        dataset=m.get("dataset") or {},
        path=run_dir,
        sharpness=m.get("sharpness"),
    )


@dataclasses.dataclass
class SweepResults:
    """A loaded sweep directory: its manifest and its completed runs.

    Attributes:
      manifest: the parsed `manifest.json` (empty when there is none).
      runs: completed runs, sorted by batch size then seed.
      missing: (batch_size, seed) pairs of the manifest with no completed run.
      path: the sweep directory.
    """

    manifest: dict
    runs: list[Run]
    missing: list[tuple[int, int]]
    path: pathlib.Path

    @property
    def batch_sizes(self) -> list[int]:
        """Batch sizes with at least one completed run, ascending."""
        return sorted({r.batch_size for r in self.runs})

    def by_batch_size(self) -> dict[int, list[Run]]:
        """Completed runs grouped by batch size (ascending), each sorted by seed."""
        return {b: [r for r in self.runs if r.batch_size == b] for b in self.batch_sizes}

    @property
    def dataset(self) -> dict:
        """`Dataset.describe()` of the sweep's data."""
        return self.manifest.get("dataset") or (self.runs[0].dataset if self.runs else {})

    @property
    def has_noise(self) -> bool:
        return any(r.noise for r in self.runs)

    @property
    def has_sharpness(self) -> bool:
        return any(r.sharpness for r in self.runs)

    def dataset_label(self) -> str:
        """E.g. `mnist-5k (4,000 train / 1,000 val)`: how figures and reports name the data."""
        d = self.dataset
        if not d:
            return "unknown data"
        return (f"{d.get('name', '?')} ({d.get('num_train', 0):,} train / "
                f"{d.get('num_val', 0):,} val)")


def load_sweep(out_dir: str | os.PathLike, *, require_runs: bool = True) -> SweepResults:
    """Load a sweep directory written by `batchjax.sweep.run_sweep`.

    Args:
      out_dir: the sweep directory (holding `manifest.json` and the run directories).
      require_runs: raise when there is no completed run.

    Returns:
      The manifest and every completed run.

    Raises:
      BatchjaxError: no such directory, no completed run, or a corrupt file (named).
    """
    out_dir = pathlib.Path(out_dir)
    if not out_dir.is_dir():
        raise BatchjaxError(f"results directory {out_dir} does not exist; run "
                            f"scripts/sweep.py --out {out_dir} first")
    manifest_path = out_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    runs = []
    for child in sorted(out_dir.iterdir()):
        if child.is_dir() and parse_run_name(child.name):
            run = load_run(child)
            if run is not None:
                runs.append(run)
    runs.sort(key=lambda r: (r.batch_size, r.seed))
    sweep = manifest.get("sweep", {})
    done = {(r.batch_size, r.seed) for r in runs}
    missing = [(b, s) for b in sweep.get("batch_sizes", []) for s in sweep.get("seeds", [])
               if (b, s) not in done]
    if require_runs and not runs:
        raise BatchjaxError(f"{out_dir} holds no completed run; run scripts/sweep.py "
                            f"--out {out_dir} (add --resume to continue a stopped sweep)")
    return SweepResults(manifest=manifest, runs=runs, missing=missing, path=out_dir)
