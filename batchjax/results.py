"""Results on disk: the layout of a sweep directory, atomic writes, the loader, tidy tables.

Layout of a sweep directory `OUT/`:

    OUT/manifest.json           what was swept and with what: the batch sizes, seeds and shared
                                configuration, the sharpness settings (null: not measured),
                                the dataset (name, source, sizes), and one provenance record
                                per session (command line, start and end times, package
                                versions, Python, platform, devices, groups trained).
    OUT/history.csv             one row per run and finished epoch (tidy, long form).
    OUT/noise.csv               one row per run and gradient-noise measurement: every scalar,
                                nested values flattened to `minibatch_variance.32`,
                                `trace_cov_per_layer.hidden/kernel`, `empirical.mean`, ...
    OUT/.lock                   who is writing the directory (`DirectoryLock`).
    OUT/bs00032_seed0/config.json    the run's `TrainConfig`, written before it trains; in a
                                sweep with a learning-rate grid the runs are named
                                `bs00032_lr0.00316_seed0` (the rate as `{lr:.3g}`).
    OUT/bs00032_seed0/steps.npz      every optimizer step: step_losses, step_batch_sizes.
    OUT/bs00032_seed0/metrics.json   everything else the run produced, written last:
        complete (true), status ("complete" | "diverged"), diverged_step, learning_rate
        (effective), dataset, history (per-epoch lists, Keras semantics), final_train (loss
        and accuracy of the final parameters on the whole training set), noise
        (gradient-noise records), compile_seconds, trained_with (the names of the runs
        trained in one program with this one: epoch times are those of the group),
        sharpness (the Hessian of the training loss at the final parameters, null when it
        was not measured or the run diverged; settings in the manifest's `sharpness`),
        stopped and target (grid sweeps with a training-loss target: why its group stopped
        training it, and its steps and examples to the target in the saved steps, null when
        not reached; null elsewhere).

A grid sweep's manifest also holds `grid`: the learning rates per batch size (growing as an
adaptive search extends them), the extensions made, the target, stop factor, epoch budget
and search settings, and the sweep's provisional best rate per batch size (`grid_record`);
plain sweeps have `"grid": null`.

A run is complete exactly when its `metrics.json` exists: every file is written to a temporary
name in the same directory, flushed, fsynced and renamed over its final name (`os.replace` is
atomic on POSIX), and `metrics.json` comes last, so a killed process (or a full disk) never
leaves a file that looks complete but is not. Non-finite floats (a diverged run's last loss)
are stored as JSON `null`, which keeps the files strict JSON; the loader turns them back into
NaN. Loading gives `batchjax.run.Run`, the type training returns. Schema 1 directories
(per-step arrays inside metrics.json, `trained_with_seeds`) still load.

No JAX here: figure and report processes load results without it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import errno
import io
import json
import math
import os
import pathlib
import re
import socket
import tempfile
import zipfile
from typing import Any, Iterable, Sequence

import numpy as np

from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.run import HISTORY_KEYS, Run

__all__ = ["Run", "SweepResults", "DirectoryLock", "load_run", "load_sweep", "write_run",
           "write_tables", "abbreviate"]

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
CONFIG = "config.json"
METRICS = "metrics.json"
STEPS = "steps.npz"
HISTORY_CSV = "history.csv"
NOISE_CSV = "noise.csv"
LOCK = ".lock"
TEMP_SUFFIX = ".tmp"
_RUN_DIR = re.compile(r"^bs(\d{5,})(?:_lr([0-9][0-9.e+-]*))?_seed(\d+)$")
# mkstemp creates files readable by the owner only; results get the usual umask instead.
_UMASK = os.umask(0)
os.umask(_UMASK)
# Dataset fields that identify the data; `source` may word the same data differently.
_DATASET_IDENTITY = ("name", "num_train", "num_val", "image_shape", "num_classes")


def run_name(batch_size: int, seed: int, learning_rate: float | None = None) -> str:
    """The directory name of one run, e.g. `bs00032_seed0` (sorts by batch size), or in a
    sweep with a learning-rate grid `bs00032_lr0.00316_seed0` (the rate as `{lr:.3g}`)."""
    if learning_rate is None:
        return f"bs{batch_size:05d}_seed{seed}"
    return f"bs{batch_size:05d}_lr{learning_rate:.3g}_seed{seed}"


def parse_run_key(name: str) -> tuple[int, float | None, int] | None:
    """(batch_size, learning_rate or None, seed) of a run directory name, or None if it is
    not one. The rate is the name's 3 significant digits; `config.json` holds the exact one."""
    match = _RUN_DIR.match(name)
    if not match:
        return None
    try:
        rate = float(match.group(2)) if match.group(2) is not None else None
    except ValueError:
        return None
    return int(match.group(1)), rate, int(match.group(3))


def parse_run_name(name: str) -> tuple[int, int] | None:
    """(batch_size, seed) of a run directory name (with or without a learning rate), or None
    if it is not one."""
    key = parse_run_key(name)
    return (key[0], key[2]) if key else None


def abbreviate(values: Iterable[int], limit: int = 6) -> str:
    """Integers for a message: runs of 3+ consecutive values as `a..b`, at most `limit` pieces.

    `abbreviate(range(100000))` is "0..99999"; `abbreviate([0, 1, 5])` is "0,1,5"; a long
    irregular list keeps its first pieces and its last: "0,2,4,...,98 (50 values)".
    """
    values = sorted(int(v) for v in values)
    pieces, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            pieces.append(f"{values[i]}..{values[j]}")
        else:
            pieces.extend(str(v) for v in values[i:j + 1])
        i = j + 1
    if len(pieces) <= limit:
        return ",".join(pieces)
    return ",".join(pieces[:limit - 1]) + f",...,{pieces[-1]} ({len(values):,} values)"


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
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    return obj


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename.

    Raises:
      BatchjaxError: the file could not be written (disk full, no permission); any earlier
        version of it is untouched and the temporary file is removed.
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
                            "before it are intact (free some space, or choose another results "
                            "directory, then resume)") from err
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


def write_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write NumPy arrays as an uncompressed `.npz` (`np.load` reads it), atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes_atomic(path, buffer.getvalue())


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
                            f"{err.lineno}); delete it and resume the sweep") from err


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


def metrics_record(run: Run) -> dict[str, Any]:
    """The `metrics.json` content of one `Run` (everything but the per-step arrays)."""
    return {
        "schema": SCHEMA_VERSION,
        "complete": True,
        "batch_size": run.batch_size,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "status": run.status,
        "diverged_step": run.diverged_step,
        "dataset": run.dataset,
        "compile_seconds": run.compile_seconds,
        "trained_with": list(run.trained_with),
        "history": run.history,
        "final_train": run.final_train,
        "noise": run.noise,
        "sharpness": run.sharpness,
        "stopped": run.stopped,
        "target": run.target,
        "steps": {"file": STEPS, "count": int(len(run.step_losses))},
    }


def write_run(out_dir: str | os.PathLike, run: Run, name: str | None = None) -> pathlib.Path:
    """Write one finished run: `config.json`, `steps.npz`, then `metrics.json` (last).

    Args:
      out_dir: the sweep directory.
      run: the run.
      name: its directory name (default `run_name(batch_size, seed)`; a grid sweep names
        the learning rate too).

    Returns:
      The run directory (also stored in `run.path`).
    """
    run_dir = pathlib.Path(out_dir) / (name or run_name(run.batch_size, run.seed))
    write_json_atomic(run_dir / CONFIG, run.config.to_dict())
    losses = np.asarray(run.step_losses)
    write_npz_atomic(run_dir / STEPS,
                     step_losses=losses if losses.dtype.kind == "f" else losses.astype(float),
                     step_batch_sizes=np.asarray(run.step_batch_sizes, np.int64))
    write_json_atomic(run_dir / METRICS, metrics_record(run), flat=True)
    run.path = run_dir
    return run_dir


# --------------------------------------------------------------------------------------------
# Loading


def _floats(values: Sequence) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _field(d: dict, key: str, path: pathlib.Path) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError):
        raise BatchjaxError(f"results file {path} lacks {key!r}; it was not written by this "
                            "version of batchjax (delete it and resume the sweep)") from None


def _read_steps(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return (np.asarray(npz["step_losses"], np.float64),
                    np.asarray(npz["step_batch_sizes"], np.int64))
    except FileNotFoundError:
        raise BatchjaxError(f"results file {path} does not exist although its metrics.json "
                            "does; delete the run directory and resume the sweep") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise BatchjaxError(f"results file {path} is corrupt or truncated ({err}); delete it "
                            "and resume the sweep") from None


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
    if m.get("schema", 1) == 1:  # per-step arrays inline, trained_with_seeds
        step_losses = _floats(_field(m, "step_losses", metrics_path))
        step_batch_sizes = np.asarray(_field(m, "step_batch_sizes", metrics_path), np.int64)
        trained_with = [run_name(config.batch_size, s)
                        for s in m.get("trained_with_seeds") or [config.seed]]
    else:
        step_losses, step_batch_sizes = _read_steps(run_dir / STEPS)
        trained_with = list(m.get("trained_with") or [run_dir.name])
    return Run(
        config=config,
        dataset=m.get("dataset") or {},
        history=history,
        step_losses=step_losses,
        step_batch_sizes=step_batch_sizes,
        noise=list(m.get("noise") or []),
        status=_field(m, "status", metrics_path),
        diverged_step=m.get("diverged_step"),
        compile_seconds=float(m.get("compile_seconds") or 0.0),
        trained_with=trained_with,
        final_train=m.get("final_train"),
        sharpness=m.get("sharpness"),
        path=run_dir,
        stopped=m.get("stopped"),
        target=m.get("target"),
    )


@dataclasses.dataclass
class SweepResults:
    """A loaded sweep directory: its manifest and its completed runs.

    Attributes:
      manifest: the parsed `manifest.json` (empty when there is none).
      runs: completed runs (`batchjax.run.Run`), sorted by batch size, then learning rate
        (grid sweeps), then seed.
      missing: (batch_size, seed) pairs of the manifest with no completed run (grid sweeps:
        with no completed run at some learning rate the manifest lists, or at all).
      path: the sweep directory.
      missing_names: the directory names of the runs the manifest lists without a completed
        run (grid sweeps name each learning rate; batch sizes whose rates an adaptive search
        has not chosen yet are in `missing` only).
    """

    manifest: dict
    runs: list[Run]
    missing: list[tuple[int, int]]
    path: pathlib.Path
    missing_names: list[str] = dataclasses.field(default_factory=list)

    @property
    def grid(self) -> dict | None:
        """The manifest's learning-rate grid record (`grid_record`), or None (a plain sweep)."""
        return self.manifest.get("grid") or None

    def learning_rates(self, batch_size: int) -> list[float]:
        """The learning rates of `batch_size` the manifest's grid lists (ascending; [] for a
        plain sweep or a batch size not reached yet)."""
        grid = self.grid or {}
        return sorted(float(v) for v in (grid.get("learning_rates") or {}).get(
            str(batch_size), []))

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
        raise BatchjaxError(f"results directory {out_dir} does not exist; run a sweep into it "
                            "first (run_sweep, or scripts/sweep.py)")
    manifest_path = out_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    runs = []
    for child in sorted(out_dir.iterdir()):
        if child.is_dir() and parse_run_name(child.name):
            run = load_run(child)
            if run is not None:
                runs.append(run)
    runs.sort(key=lambda r: (r.batch_size, r.config.learning_rate, r.seed))
    sweep = manifest.get("sweep", {})
    done = {(r.batch_size, r.seed) for r in runs}
    grid = manifest.get("grid") or None
    missing_names = []
    if grid is None:
        missing = [(b, s) for b in sweep.get("batch_sizes", []) for s in sweep.get("seeds", [])
                   if (b, s) not in done]
        missing_names = [run_name(b, s) for b, s in missing]
    else:
        names = {r.path.name for r in runs if r.path is not None}
        missing = []
        for b in sweep.get("batch_sizes", []):
            rates = (grid.get("learning_rates") or {}).get(str(b))
            for s in sweep.get("seeds", []):
                absent = [run_name(b, s, lr) for lr in rates or []
                          if run_name(b, s, lr) not in names]
                missing_names.extend(absent)
                if absent or (not rates and (b, s) not in done):
                    missing.append((b, s))
    if require_runs and not runs:
        raise BatchjaxError(f"{out_dir} holds no completed run; run the sweep (resume it if it "
                            "was stopped)")
    return SweepResults(manifest=manifest, runs=runs, missing=missing, path=out_dir,
                        missing_names=sorted(missing_names))


# --------------------------------------------------------------------------------------------
# Tidy tables: one row per run and epoch, one row per run and measurement

_RUN_COLUMNS = ("run", "batch_size", "seed", "learning_rate", "status")
_INTEGER_HISTORY = ("epoch", "steps", "examples_seen")


def _run_columns(run: Run) -> dict[str, Any]:
    columns = {"run": run.path.name if run.path is not None else
               run_name(run.batch_size, run.seed), "batch_size": run.batch_size,
               "seed": run.seed, "learning_rate": run.learning_rate, "status": run.status}
    if run.stopped is not None:  # grid sweeps: why its group stopped training it
        columns["stopped"] = run.stopped
    return columns


def history_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """One row per run and finished epoch: the run's identity, then `HISTORY_KEYS`."""
    rows = []
    for run in runs:
        ident = _run_columns(run)
        for i in range(run.num_epochs):
            row = dict(ident)
            for k in HISTORY_KEYS:
                value = float(run.history[k][i])
                row[k] = int(value) if k in _INTEGER_HISTORY and math.isfinite(value) else value
            rows.append(row)
    return rows


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(to_jsonable(value))
        else:
            flat[name] = value
    return flat


def noise_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """One row per run and noise measurement: every scalar of the record, nested keys joined
    with dots (`minibatch_variance.32`, `trace_cov_per_layer.hidden/kernel`)."""
    return [{**_run_columns(run), **_flatten(record)} for run in runs for record in run.noise]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else ""
    return value


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of `rows`; the columns are the union of the rows' keys in first-seen order,
    missing and non-finite values are empty cells (NaN for pandas)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    return out.getvalue()


def write_tables(out_dir: str | os.PathLike, runs: Sequence[Run]) -> list[pathlib.Path]:
    """Write `history.csv` and `noise.csv` (when any run has noise records) at `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    written = [out_dir / HISTORY_CSV]
    write_bytes_atomic(written[0], rows_to_csv(history_rows(runs)).encode())
    noise = noise_rows(runs)
    if noise:
        written.append(out_dir / NOISE_CSV)
        write_bytes_atomic(written[1], rows_to_csv(noise).encode())
    elif (out_dir / NOISE_CSV).exists():
        (out_dir / NOISE_CSV).unlink()
    return written


# --------------------------------------------------------------------------------------------
# The sweep's identity: what a resumed sweep must match


def grid_record(*, learning_rates: dict[int, Sequence[float]], target_loss: float | None,
                stop_factor: float, max_epochs: int, search: dict | None = None,
                noise_steps: str | None = None) -> dict:
    """The manifest's `grid` of a sweep with a learning-rate grid.

    Args:
      learning_rates: the rates of each batch size so far (an adaptive search adds batch
        sizes and extends their rates as it goes; `extended` records how).
      target_loss: the training-loss target fixed before training, or None (no early stop).
      stop_factor: a run is hopeless past this many times the fewest steps to the target of
        any run of its batch size.
      max_epochs: the epoch budget (the configuration's `epochs`).
      search: the settings of an adaptive search (`batchjax.sweep.LearningRateSearch`), or
        None for a fixed grid.
      noise_steps: when the runs' gradient noise was measured: "log" (the log-spaced steps of
        the "log" schedule alone, without its epoch ends), "epoch", or None (not measured).

    Returns:
      {"learning_rates": {"8": [...]}, "extended": {"8": ["up", ...]}, "target_loss",
      "stop_factor", "max_epochs", "search", "noise_steps", "best": {"8": the sweep's
      provisional best rate or null}, "unreliable": {"8": why}}: the identity is the search
      settings (adaptive) or the learning rates (fixed), with the target and the stop factor.
    """
    return {"learning_rates": {str(b): [float(v) for v in sorted(rates)]
                               for b, rates in sorted(learning_rates.items())},
            "extended": {}, "target_loss": target_loss, "stop_factor": stop_factor,
            "max_epochs": max_epochs, "search": search, "noise_steps": noise_steps,
            "best": {}, "unreliable": {}}


def sweep_identity(*, batch_sizes: Sequence[int], seeds: Sequence[int],
                   config: TrainConfig, sharpness: dict | None, dataset: dict,
                   grid: dict | None = None) -> dict:
    """What a sweep directory holds, as the manifest records it (all fields but batch size and
    seed, and the learning rate in a sweep with a `grid` (`grid_record`), are shared by every
    run)."""
    shared = config.to_dict()
    shared.pop("batch_size")
    shared.pop("seed")
    if grid is not None:
        shared.pop("learning_rate")
    return {"sweep": {"batch_sizes": list(batch_sizes), "seeds": list(seeds),
                      "epochs": config.epochs},
            "config": shared, "sharpness": sharpness, "dataset": dataset, "grid": grid}


def rates_text(rates: Iterable[float]) -> str:
    """Learning rates for a message: `0.001,0.002,0.004`."""
    return ",".join(f"{v:.3g}" for v in sorted(rates))


def _grid_text(grid: dict | None) -> str:
    if not grid:
        return "none (one learning rate per batch size)"
    if grid.get("search"):
        return "an adaptive search (" + ", ".join(f"{k} {v}" for k, v in
                                                  grid["search"].items()) + ")"
    rates = {tuple(v) for v in (grid.get("learning_rates") or {}).values()}
    if len(rates) == 1:
        return f"learning rates {rates_text(next(iter(rates)))}"
    return f"{len(rates)} lists of learning rates"


def _grid_differences(saved: dict | None, asked: dict | None) -> list[str]:
    if not saved and not asked:
        return []
    if not saved or not asked or bool(saved.get("search")) != bool(asked.get("search")):
        return [f"learning-rate grid saved {_grid_text(saved)}, asked {_grid_text(asked)}"]
    diffs = []
    for key in ("target_loss", "stop_factor"):
        if saved.get(key) != asked.get(key):
            diffs.append(f"{key} saved {saved.get(key)!r}, asked {asked.get(key)!r}")
    if asked.get("search"):
        if saved["search"] != asked["search"]:
            diffs.append(f"learning-rate grid saved {_grid_text(saved)}, "
                         f"asked {_grid_text(asked)}")
        return diffs
    saved_rates, asked_rates = saved.get("learning_rates") or {}, asked["learning_rates"]
    for b in sorted(set(saved_rates) | set(asked_rates), key=int):
        a, c = saved_rates.get(b, []), asked_rates.get(b, [])
        if sorted(a) != sorted(c):
            diffs.append(f"learning rates at batch size {b} saved {rates_text(a) or 'none'}, "
                         f"asked {rates_text(c) or 'none'}")
    return diffs


def _sharpness_text(settings: dict | None) -> str:
    if not settings:
        return "off"
    return "on (" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")"


def manifest_differences(saved: dict, asked: dict) -> list[str]:
    """Differences between a saved and an asked `sweep_identity`, naming the fields."""
    diffs = []
    for key in ("batch_sizes", "seeds"):
        a, b = saved.get("sweep", {}).get(key, []), asked["sweep"][key]
        if sorted(a) != sorted(b):
            diffs.append(f"{key} saved {abbreviate(a)}, asked {abbreviate(b)}")
    saved_config, asked_config = saved.get("config", {}), asked["config"]
    for key in sorted(set(saved_config) | set(asked_config)):
        if saved_config.get(key) != asked_config.get(key):
            diffs.append(f"{key} saved {saved_config.get(key)!r}, "
                         f"asked {asked_config.get(key)!r}")
    diffs.extend(_grid_differences(saved.get("grid"), asked.get("grid")))
    if saved.get("sharpness") != asked["sharpness"]:
        diffs.append(f"sharpness saved {_sharpness_text(saved.get('sharpness'))}, "
                     f"asked {_sharpness_text(asked['sharpness'])}")
    saved_data = {k: saved.get("dataset", {}).get(k) for k in _DATASET_IDENTITY}
    asked_data = {k: asked["dataset"].get(k) for k in _DATASET_IDENTITY}
    if saved_data != asked_data:
        diffs.append(f"dataset saved {saved_data['name']} ({saved_data['num_train']} train / "
                     f"{saved_data['num_val']} val), asked {asked_data['name']} "
                     f"({asked_data['num_train']} train / {asked_data['num_val']} val)")
    return diffs


# Files a sweep writes at its root besides the run directories; a fresh sweep ignores them
# only together with a manifest.
_OWN_FILES = {LOCK}


def check_out_dir(out_dir: pathlib.Path, asked: dict, resume: bool) -> dict | None:
    """Check that `out_dir` may hold the asked sweep; returns the saved manifest, if any.

    Raises:
      BatchjaxError: the directory holds another sweep, or something else, or a sweep while
        `resume` is False.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchjaxError(f"results directory {out_dir} is a file; choose another directory")
    entries = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in _OWN_FILES) if out_dir.is_dir() else []
    manifest_path = out_dir / MANIFEST
    if not entries:
        return None
    if not manifest_path.exists():
        run_dirs = [e for e in entries if parse_run_name(e)]
        what = (f"run directories ({run_dirs[0]}, ...) but no {MANIFEST}" if run_dirs
                else f"{len(entries)} entries but no batchjax {MANIFEST}")
        raise BatchjaxError(f"results directory {out_dir} is not empty ({what}); choose "
                            "another directory or empty it")
    saved = read_json(manifest_path)
    if not isinstance(saved, dict) or saved.get("kind") != "batchjax-sweep":
        raise BatchjaxError(f"{manifest_path} is not a batchjax sweep manifest; choose "
                            "another results directory")
    if not resume:
        raise BatchjaxError(f"results directory {out_dir} already holds a sweep; continue it "
                            f"with resume, or choose another directory (or delete {out_dir})")
    diffs = manifest_differences(saved, asked)
    if diffs:
        raise BatchjaxError(f"resume: {out_dir} holds a sweep with a different configuration "
                            f"({'; '.join(diffs)}); resume with the saved settings, choose "
                            f"another directory, or delete {out_dir} to start over")
    return saved


# --------------------------------------------------------------------------------------------
# The directory lock: one sweep writes a directory at a time


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused
    pid from the original process; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def _holder_text(info: dict) -> str:
    job = f", {info['processes']} processes of one job" if info.get("processes", 1) > 1 else ""
    return (f"process {info.get('pid', '?')} on host {info.get('host', '?')} (since "
            f"{info.get('since', '?')}{job})")


class DirectoryLock:
    """An exclusive lock on a results directory, held by one sweep (one job) at a time.

    The lock is `fcntl.flock` on `OUT/.lock`, so the kernel releases it when its holder dies,
    however it dies (SIGKILL included); on shared file systems whose flock is not supported
    it is the file's content alone. The file records the holder (host, pid, start time, the
    number of processes of its job), for the refusal message and for spotting a lock left by
    a process that no longer runs, which is then taken over (`taken_over` says whose). The
    file stays in place, emptied on release. A multi-host job locks once, in its process 0.

    Raises (from `acquire`):
      BatchjaxError: another live process holds the lock (named), or the lock file cannot be
        written.
    """

    _held: set["DirectoryLock"] = set()  # released by `release_all` on a hard exit

    def __init__(self, directory: str | os.PathLike, *, processes: int = 1):
        self.path = pathlib.Path(directory) / LOCK
        self.processes = processes
        self.taken_over: dict | None = None
        self._fd: int | None = None

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
            info = json.loads(text) if text.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "DirectoryLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as err:
            raise BatchjaxError(f"cannot create the lock file {self.path}: "
                                f"{err.strerror or err}") from None
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            os.close(fd)
            raise BatchjaxError(f"results directory {self.path.parent} is in use by the sweep "
                                f"of {_holder_text(self._read())}; wait for it to finish or "
                                "stop it, or choose another directory") from None
        except (ImportError, OSError) as err:
            # No flock here (some network file systems): the holder's record decides.
            if isinstance(err, OSError) and err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP,
                                                              errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise BatchjaxError(f"cannot lock {self.path}: {err.strerror or err}") from None
            flocked = False
        info = self._read()
        if info:
            same_host = info.get("host") == socket.gethostname()
            if not flocked and not (same_host and not _alive(int(info.get("pid", -1)),
                                                              info.get("start"))):
                os.close(fd)
                raise BatchjaxError(
                    f"results directory {self.path.parent} is locked by the sweep of "
                    f"{_holder_text(info)}; if that process is gone, delete {self.path}")
            self.taken_over = info  # flock was free: its holder is gone
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "start": _process_start(os.getpid()), "processes": self.processes,
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            raise BatchjaxError(f"could not write the lock file {self.path}: "
                                f"{err.strerror or err}") from None
        self._fd = fd
        DirectoryLock._held.add(self)
        return self

    def release(self) -> None:
        """Empty the lock file and unlock (closing the descriptor releases the flock)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        DirectoryLock._held.discard(self)

    @classmethod
    def release_all(cls) -> None:
        """Release every lock this process holds (before a hard exit)."""
        for lock in list(cls._held):
            lock.release()

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
