"""A sweep: batch sizes x seeds (x learning rates) -> training runs -> results on disk, resumable.

`run_sweep` orchestrates; the other modules do the work:

  1. check the grid against the data, and its memory against the devices before any work
     (`batchjax.memory`): a grid that cannot fit is refused, one that fits only in groups of
     runs is trained in groups;
  2. lock the results directory (`batchjax.results.DirectoryLock`: one sweep per directory)
     and check that it may hold this sweep: a fresh sweep refuses a non-empty directory,
     `resume=True` refuses one whose saved configuration (or learning-rate grid) differs,
     naming each differing field, and otherwise trains only the runs without a saved result;
  3. train each group of runs of a batch size in one program (`batchjax.train.train_runs`),
     then evaluate each run's final parameters on the whole training set and measure its
     sharpness (`batchjax.sharpness`, settings `SharpnessSettings`, part of the sweep's
     identity), and save it at once (`batchjax.results.write_run`);
  4. write the tidy tables (`history.csv`, `noise.csv`) and close the manifest.

Learning-rate grids (issue #15; McCandlish et al. 2018, arXiv:1812.06162, and Shallue et al.
2019, arXiv:1811.03600, count the steps to a target at the best learning rate of each batch
size): with `learning_rates`, every (rate, seed) of a batch size trains in one vmapped program
and is saved as its own run (`bs00032_lr0.00316_seed0`). With a `target_loss` fixed before
training, a group stops early (`EarlyStop`): at the first epoch end at which every run has
reached the target (the smoothed per-step loss of `batchjax.critical.steps_to_target`),
diverged, or is hopeless (more than `stop_factor` times the fewest steps to the target of
any run of its batch size), or at the epoch budget; each run records why (`Run.stopped`) and
runs that never reach the target are saved like the others. A `LearningRateSearch` chooses the
rates as it goes: batch sizes in ascending order, each grid centred on the best rate of the
batch size before (`choose_learning_rate`, the rule of design.md), extended past an edge;
the manifest records the grid as it grows, so a killed search resumes where it stopped.

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
import math
import os
import pathlib
import platform
import sys
from typing import Any, Callable, Sequence, TextIO

import jax
import numpy as np
from tqdm import tqdm

from batchjax import critical
from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.memory import check_memory, describe_groups, format_bytes, split_groups
from batchjax.model import MLP
from batchjax.noise import make_measure
from batchjax.results import (CONFIG, MANIFEST, SCHEMA_VERSION, DirectoryLock, SweepResults,
                              abbreviate, check_out_dir, grid_record, load_run, load_sweep,
                              rates_text, read_json, remove_stale_temp_files, run_name,
                              sweep_identity, write_json_atomic, write_run, write_tables)
from batchjax.rng import stream_key
from batchjax.run import Run
from batchjax.sharpness import SharpnessSettings, sharpness as compute_sharpness
from batchjax.train import Interrupted, make_evaluate, measurement_steps, train_runs

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "matplotlib", "tensorflow-datasets",
            "tqdm", "batchjax")
# Epoch segments of at most about this long, so that a stop request waits at most one.
SEGMENT_SECONDS = 1.0
# A run of a grid sweep is hopeless past this many times the fewest steps to the target of
# any run of its batch size (design.md, round 2).
STOP_FACTOR = 3.0
# Minibatches of the sampled check of each noise record in a grid sweep (every run of a grid
# is measured; at B = 1,024 the default 200 cost 6x the rest of a record on CPU).
GRID_EMPIRICAL_BATCHES = 20


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


def _completed_runs(out_dir: pathlib.Path, expected: dict[str, TrainConfig]) -> dict[str, Run]:
    """The saved, complete runs among `expected` ({directory name: its configuration})."""
    done = {}
    for name, config in expected.items():
        run_dir = out_dir / name
        if not (run_dir / "metrics.json").exists():
            continue
        run = load_run(run_dir)
        if run is None:
            continue
        if run.config != config:
            raise BatchjaxError(f"resume: {run_dir / CONFIG} differs from the asked "
                                f"configuration; choose another results directory, or delete "
                                f"{run_dir}")
        done[name] = run
    return done


# --------------------------------------------------------------------------------------------
# Learning-rate grids: the adaptive search, the provisional best rate, the early stop


@dataclasses.dataclass(frozen=True)
class LearningRateSearch:
    """The adaptive learning-rate grid of the critical-batch-size protocol (issue #15).

    At the first batch size the grid is `num_rates` rates `spacing` apart around `centre`:
    centre * spacing**k for k = -(num_rates // 2), ..., num_rates - num_rates // 2 - 1 (6 rates
    factor 2 apart: centre / 8 ... centre * 4; more below the guess than above it, since the
    best rate grows at most linearly with B). At each later batch size B the guess is the
    best rate at the previous batch size B' times `scale`**log2(B / B'): 2 per doubling for SGD
    (the linear scaling of the small-batch regime, McCandlish et al. 2018 eq. 2.7), sqrt(2)
    for Adam. When the best rate is the smallest or largest of its grid, `extend_by` more
    rates `spacing` apart beyond that edge are trained (the same seeds), at most
    `max_extensions` times per direction; a best rate still on the edge marks the batch size
    unreliable.

    Attributes:
      centre: the guess at `centre_batch_size` (chosen by a pilot; scripts/sweep.py).
      num_rates, spacing: the grid around each guess.
      scale: the guess's factor per doubling of the batch size.
      extend_by, max_extensions: the extensions beyond an edge.
      centre_batch_size: the batch size of `centre`; the first batch size's guess is
        centre * scale**log2(B / centre_batch_size). None: the first batch size's.
    """

    centre: float
    num_rates: int = 6
    spacing: float = 2.0
    scale: float = 2.0
    extend_by: int = 2
    max_extensions: int = 2
    centre_batch_size: int | None = None

    def __post_init__(self):
        for name in ("centre", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise BatchjaxError(f"LearningRateSearch {name} must be a finite number > 0, "
                                    f"got {value!r}")
        if not (isinstance(self.spacing, (int, float)) and math.isfinite(self.spacing)
                and self.spacing > 1):
            raise BatchjaxError(f"LearningRateSearch spacing must be a number > 1, got "
                                f"{self.spacing!r}")
        for name, least in (("num_rates", 2), ("extend_by", 1), ("max_extensions", 0),
                            ("centre_batch_size", 1)):
            value = getattr(self, name)
            if name == "centre_batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BatchjaxError(f"LearningRateSearch {name} must be an integer >= {least}, "
                                    f"got {value!r}")

    def rates_around(self, guess: float) -> list[float]:
        """The grid of `num_rates` rates around `guess`, ascending."""
        low = -(self.num_rates // 2)
        return [guess * self.spacing ** k for k in range(low, low + self.num_rates)]

    def guess(self, batch_size: int, previous: tuple[int, float] | None) -> float:
        """The centre of the grid at `batch_size`, from (B', best rate at B'), or for the first
        batch size from `centre`."""
        if previous is None:
            previous = (self.centre_batch_size or batch_size, self.centre)
        b, rate = previous
        if b == batch_size:
            return float(rate)
        return float(rate * self.scale ** math.log2(batch_size / b))

    def extend(self, rates: Sequence[float], direction: str) -> list[float]:
        """`extend_by` rates beyond the "up" (largest) or "down" (smallest) edge of `rates`."""
        if direction == "up":
            return [max(rates) * self.spacing ** j for j in range(1, self.extend_by + 1)]
        return [min(rates) / self.spacing ** j for j in range(self.extend_by, 0, -1)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RateChoice:
    """The sweep's provisional best learning rate of one batch size (`choose_learning_rate`).

    Attributes:
      best: the rate with the fewest mean steps to the target among the rates whose every
        seed reached it (exact ties: the smaller rate), or None when no rate did.
      leaning: `best`, or without one the rate closest to reaching the target: the most seeds
        reached, then the fewest mean steps over those, then the lowest mean of each run's
        lowest smoothed loss. It decides the extension and the next batch size's guess.
      edge: "up" or "down" when `leaning` is the largest or smallest rate of the grid.
      steps: per rate (ascending), the steps to the target of each seed (None: not reached).
    """

    best: float | None
    leaning: float
    edge: str | None
    steps: dict[float, list[float | None]]


def run_steps_to_target(run: Run, target_loss: float) -> float | None:
    """Steps at which a run first reached the training-loss target (the smoothed per-step
    loss of `critical.steps_to_target`), or None. At the target before the first step (0)
    counts as not reached, as the analysis counts it: such a target says nothing of speed."""
    hit = critical.steps_to_target(run, train_loss=target_loss)
    return hit[0] if hit is not None and hit[0] > 0 else None


def _lowest_smoothed_loss(run: Run) -> float:
    losses = np.asarray(run.step_losses, np.float64)
    finite = int(np.argmin(np.isfinite(losses))) if not np.isfinite(losses).all() else len(losses)
    if finite == 0:
        return math.inf
    return float(critical.smooth_step_losses(losses[:finite],
                                             run.step_batch_sizes[:finite]).min())


def choose_learning_rate(runs: Sequence[Run], target_loss: float) -> RateChoice:
    """The provisional best learning rate of one batch size's runs (every rate and seed).

    The rule of design.md (round 2), which `batchjax.analysis.analyse_grid` applies to the
    saved runs with the authority: the fewest mean steps to the training-loss target among
    the rates whose every seed reached it, ties to the smaller rate. A run that never reached
    the target counts as a failure of its rate, never as absent.

    Args:
      runs: the runs of one batch size (any learning rates and seeds).
      target_loss: the training-loss target.

    Returns:
      A `RateChoice`.
    """
    by_rate: dict[float, list[Run]] = {}
    for run in runs:
        by_rate.setdefault(run.config.learning_rate, []).append(run)
    rates = sorted(by_rate)
    if not rates:
        raise BatchjaxError("choose_learning_rate needs at least one run")
    steps = {lr: [run_steps_to_target(r, target_loss) for r in by_rate[lr]] for lr in rates}
    complete = [lr for lr in rates if all(v is not None for v in steps[lr])]
    best = min(complete, key=lambda lr: (float(np.mean(steps[lr])), lr)) if complete else None

    def closeness(lr):
        reached = [v for v in steps[lr] if v is not None]
        return (-len(reached), float(np.mean(reached)) if reached else math.inf,
                float(np.mean([_lowest_smoothed_loss(r) for r in by_rate[lr]])), lr)

    leaning = best if best is not None else min(rates, key=closeness)
    edge = None
    if len(rates) > 1:
        edge = "up" if leaning == rates[-1] else "down" if leaning == rates[0] else None
    return RateChoice(best, leaning, edge, steps)


class EarlyStop:
    """The early stop of one group of runs of a grid sweep (design.md, round 2).

    Called as `should_finish(epoch, runs)` after each epoch (`batchjax.train.train_runs`): it
    notes the runs that have reached the training-loss target (`run_steps_to_target` on the
    steps trained so far) and returns True at the first epoch at which every run has reached
    it, diverged, or is hopeless: its steps exceed `stop_factor` times the fewest steps to the
    target of any run of the batch size so far (this group's, or earlier groups' given as
    `best_steps`). The epoch budget ends the group in any case. `finish` then records each
    run's `stopped` and `target`.
    """

    def __init__(self, target_loss: float, stop_factor: float, best_steps: float = math.inf):
        self.target_loss, self.stop_factor = float(target_loss), float(stop_factor)
        self.best_steps = float(best_steps)
        self.reached: dict[int, tuple[float, float]] = {}

    def _update(self, runs: Sequence[Run]) -> None:
        for i, run in enumerate(runs):
            if i in self.reached or not len(run.step_losses):
                continue
            hit = critical.steps_to_target(run, train_loss=self.target_loss)
            if hit is not None and hit[0] > 0:
                self.reached[i] = hit
                self.best_steps = min(self.best_steps, hit[0])

    def hopeless(self, run: Run) -> bool:
        return len(run.step_losses) > self.stop_factor * self.best_steps

    def __call__(self, epoch: int, runs: Sequence[Run]) -> bool:
        self._update(runs)
        return all(i in self.reached or run.diverged or self.hopeless(run)
                   for i, run in enumerate(runs))

    def finish(self, runs: Sequence[Run]) -> None:
        """Set each run's `stopped` ("target", "diverged", "hopeless", "budget") and `target`,
        from all the steps it trained: the crossing the analysis will find in the saved run
        (with the steps after it, the centred average may place it earlier than the epoch
        end that detected it did)."""
        self._update(runs)
        hits = [critical.steps_to_target(run, train_loss=self.target_loss) for run in runs]
        hits = [hit if hit is not None and hit[0] > 0 else None for hit in hits]
        self.best_steps = min([self.best_steps] + [hit[0] for hit in hits if hit])
        for run, hit in zip(runs, hits):
            run.target = {"train_loss": self.target_loss,
                          "steps": hit[0] if hit else None,
                          "examples": hit[1] if hit else None}
            run.stopped = ("target" if hit else "diverged" if run.diverged
                           else "hopeless" if self.hopeless(run) else "budget")


def check_learning_rates(learning_rates, config: TrainConfig, batch_sizes: Sequence[int],
                         target_loss: float | None, stop_factor: float):
    """Validate a sweep's learning-rate grid before any work.

    Returns:
      None (one learning rate: `config.learning_rate`), {batch_size: sorted rates} (a fixed
      grid), or the `LearningRateSearch`.

    Raises:
      BatchjaxError: an empty grid, a rate that is not a finite number > 0, two rates with one
        name (`{lr:.3g}`), a learning-rate scaling rule with a grid, a target without a grid
        or a search without a target, or a stop factor <= 1.
    """
    if target_loss is not None and not (isinstance(target_loss, (int, float))
                                        and math.isfinite(target_loss) and target_loss > 0):
        raise BatchjaxError(f"target_loss must be a finite number > 0, got {target_loss!r}")
    if not (isinstance(stop_factor, (int, float)) and math.isfinite(stop_factor)
            and stop_factor > 1):
        raise BatchjaxError(f"stop_factor must be a number > 1, got {stop_factor!r}")
    if learning_rates is None:
        if target_loss is not None:
            raise BatchjaxError("target_loss stops the runs of a learning-rate grid early; give "
                                "learning_rates too (a plain sweep trains every epoch and its "
                                "analysis chooses targets afterwards)")
        return None
    if config.lr_scaling != "none":
        raise BatchjaxError(f"a learning-rate grid gives each batch size its own rates; set "
                            f"lr_scaling to 'none' (got {config.lr_scaling!r})")
    if isinstance(learning_rates, LearningRateSearch):
        if target_loss is None:
            raise BatchjaxError("an adaptive learning-rate search needs a target_loss (the best "
                                "rate is the one that reaches it in the fewest steps)")
        return learning_rates
    if isinstance(learning_rates, dict):
        if sorted(learning_rates) != sorted(batch_sizes):
            raise BatchjaxError(f"learning_rates must give rates for exactly the batch sizes "
                                f"{abbreviate(batch_sizes)}, got {abbreviate(learning_rates)}")
        grid = {b: list(v) for b, v in learning_rates.items()}
    else:
        grid = {b: list(learning_rates) for b in batch_sizes}
    for b, rates in grid.items():
        if not rates:
            raise BatchjaxError("learning_rates must be a non-empty list, e.g. [1e-3, 3e-3, 1e-2]")
        for lr in rates:
            dataclasses.replace(config, learning_rate=lr)  # a finite number > 0
        names = [f"{float(lr):.3g}" for lr in rates]
        if len(set(names)) != len(names):
            raise BatchjaxError(f"learning rates {rates_text(rates)} repeat a rate at 3 "
                                "significant digits (how runs are named); give distinct rates")
        grid[b] = sorted(float(lr) for lr in rates)
    return grid


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


def mean_epoch_line(batch_size: int, epoch: int, results: list, unit: str = "seeds") -> str:
    """The Keras-like line of one finished epoch, averaged over the runs still training
    (`unit` names them: "seeds", or "runs" in a learning-rate grid)."""
    active = [r for r in results if len(r.history["epoch"]) == epoch]
    prefix = f"bs {batch_size:>5d} | "
    epochs = results[0].config.epochs
    if not active:
        return prefix + f"Epoch {epoch}/{epochs} - every {unit[:-1]} has diverged"
    mean = {k: float(np.mean([r.history[k][-1] for r in active])) for k in results[0].history}
    line = prefix + _epoch_text(epoch, epochs, mean)
    if len(results) > 1:
        line += f" (mean of {len(active)} {unit})"
    newly = [r.config.seed for r in results if r.status == "diverged"
             and r.diverged_step is not None and len(r.history["epoch"]) == epoch - 1]
    if newly and unit == "runs":
        rates = [r.config.learning_rate for r in results if r.status == "diverged"
                 and r.diverged_step is not None and len(r.history["epoch"]) == epoch - 1]
        line += f" - {len(newly)} run{'s' * (len(newly) > 1)} DIVERGED (lr {rates_text(set(rates))})"
    elif newly:
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
              broadcast: Callable | None = None,
              learning_rates: Sequence[float] | dict | LearningRateSearch | None = None,
              target_loss: float | None = None,
              stop_factor: float = STOP_FACTOR) -> SweepResults:
    """Train every (batch size, seed) of the grid, or every (batch size, learning rate, seed)
    of a learning-rate grid, and save each run under `out_dir`.

    Args:
      out_dir: the sweep directory (created if missing).
      config: the shared configuration; its `batch_size` and `seed` (and in a learning-rate
        grid its `learning_rate`) are replaced per run.
      dataset: a `batchjax.Dataset`.
      batch_sizes: the batch sizes to sweep.
      seeds: the seeds of every batch size (and rate), trained together (vmapped) in groups
        that fit.
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
      group_size: most runs trained together; None: as many as fit in memory.
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
      learning_rates: None (every run at `config.learning_rate`); a list of rates (the same
        at every batch size) or {batch_size: rates}: a fixed learning-rate grid, every
        (rate, seed) of a batch size trained together; or a `LearningRateSearch`: the
        adaptive grid of the critical-batch-size protocol (batch sizes in ascending order,
        each grid centred on the best rate of the one before, extended past an edge; one
        process). Runs are then named with their rate (`results.run_name`), `lr_scaling`
        must be "none", and the manifest records the grid as it grows (`grid_record`).
      target_loss: a learning-rate grid's training-loss target, fixed before training: the
        runs of a group stop at the first epoch end at which each has reached it, diverged
        or is hopeless (`EarlyStop`), and each records why (`Run.stopped`). None: every run
        trains `config.epochs` epochs. Required by a `LearningRateSearch`.
      stop_factor: a run is hopeless once its steps exceed this many times the fewest steps
        to the target of any run of its batch size.

    Returns:
      The sweep as loaded back from disk (after every process has finished).

    Raises:
      BatchjaxError: bad batch sizes, seeds, probe size or learning rates; a grid that does
        not fit in memory; a directory in use by another sweep, or holding something else, or
        another configuration (or another learning-rate grid) on resume; a write that failed.
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
    grid = check_learning_rates(learning_rates, config, batch_sizes, target_loss, stop_factor)
    search = grid if isinstance(grid, LearningRateSearch) else None
    if search is not None and process_count > 1:
        raise BatchjaxError("an adaptive learning-rate search runs one batch size after another "
                            "in one process; give a fixed list of learning rates to a "
                            "multi-process sweep")
    if grid is None:
        runs_per_batch = {b: len(seeds) for b in batch_sizes}
    elif search is not None:
        runs_per_batch = {b: search.num_rates * len(seeds) for b in batch_sizes}
    else:
        runs_per_batch = {b: len(grid[b]) * len(seeds) for b in batch_sizes}
    group_sizes, estimates, limit = {}, {}, None
    for count in sorted(set(runs_per_batch.values())):
        sizes, est, limit = check_memory(
            config, dataset, batch_sizes=[b for b in batch_sizes if runs_per_batch[b] == count],
            num_runs=count, model=model, optimizer=optimizer, group_size=group_size,
            limit=memory_limit,
            sharpness_iters=sharpness.num_iters if sharpness is not None else 0)
        group_sizes.update(sizes)
        estimates.update(est)
    record = None
    if grid is not None:
        record = grid_record(learning_rates={} if search is not None else grid,
                             target_loss=target_loss, stop_factor=float(stop_factor),
                             max_epochs=config.epochs,
                             search=search.to_dict() if search is not None else None,
                             noise_steps={"none": None}.get(config.noise_schedule,
                                                            config.noise_schedule))
    asked = sweep_identity(batch_sizes=batch_sizes, seeds=seeds, config=config,
                           sharpness=sharpness.to_dict() if sharpness is not None else None,
                           dataset=dataset.describe(), grid=record)
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
        sweeper = _Sweeper(
            out_dir, config, dataset, batch_sizes=batch_sizes, seeds=seeds, grid=grid,
            target_loss=target_loss, stop_factor=float(stop_factor), model=model,
            optimizer=optimizer, loss_fn=loss_fn, resume=resume, saved=saved, asked=asked,
            group_sizes=group_sizes, estimates=estimates, limit=limit, command=command,
            console=console, on_epoch_end=on_epoch_end, sharpness=sharpness, stop=stop,
            phase=phase, segment_seconds=segment_seconds, process_index=process_index,
            process_count=process_count, barrier=barrier)
        return sweeper.run()
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


class _Sweeper:
    """One `run_sweep` call after the checks: trains the missing runs, batch size by batch
    size, group by group, and keeps the manifest (and the grid it records) up to date."""

    def __init__(self, out_dir, config, dataset, *, batch_sizes, seeds, grid, target_loss,
                 stop_factor, model, optimizer, loss_fn, resume, saved, asked, group_sizes,
                 estimates, limit, command, console, on_epoch_end, sharpness, stop, phase,
                 segment_seconds, process_index, process_count, barrier):
        self.out_dir, self.config, self.dataset = out_dir, config, dataset
        self.batch_sizes, self.seeds, self.grid = batch_sizes, seeds, grid
        self.search = grid if isinstance(grid, LearningRateSearch) else None
        self.target_loss, self.stop_factor = target_loss, stop_factor
        self.model = model if model is not None else MLP(config.hidden, dataset.num_classes)
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self.group_sizes, self.estimates, self.limit = group_sizes, estimates, limit
        self.console, self.on_epoch_end, self.sharpness = console, on_epoch_end, sharpness
        self.stop, self.phase, self.segment_seconds = stop, phase, segment_seconds
        self.process_index, self.process_count, self.barrier = (process_index, process_count,
                                                                 barrier)
        self.lead = process_index == 0
        if not self.lead:
            saved = read_json(out_dir / MANIFEST) if resume else None
        self.resumed = saved is not None
        self.mine = [b for i, b in enumerate(batch_sizes) if i % process_count == process_index]
        self.session = {**collect_provenance(command), "started": _now(), "finished": None,
                        "trained": [],
                        "group_sizes": {str(b): group_sizes[b] for b in self.mine}}
        manifest = saved or {"kind": "batchjax-sweep", "schema": SCHEMA_VERSION, **asked,
                             "started": self.session["started"], "finished": None,
                             "sessions": []}
        manifest["schema"] = SCHEMA_VERSION
        manifest["sessions"] = list(manifest.get("sessions", [])) + [self.session]
        manifest["finished"] = None
        manifest.setdefault("grid", asked.get("grid"))
        self.manifest = manifest

    # ---------------------------------------------------------------------------------- names

    def name(self, batch_size: int, learning_rate: float | None, seed: int) -> str:
        return run_name(batch_size, seed, learning_rate if self.grid is not None else None)

    def run_config(self, batch_size: int, learning_rate: float | None, seed: int) -> TrainConfig:
        changes = {"batch_size": batch_size, "seed": seed}
        if learning_rate is not None:
            changes["learning_rate"] = learning_rate
        return dataclasses.replace(self.config, **changes)

    def write_manifest(self) -> None:
        if self.lead:
            write_json_atomic(self.out_dir / MANIFEST, self.manifest)

    # ---------------------------------------------------------------------------------- sweep

    def run(self) -> SweepResults:
        self.write_manifest()
        if self.grid is None:
            self.plain()
        elif self.search is None:
            self.fixed_grid()
        else:
            self.adaptive_grid()
        if self.process_count > 1:
            self.barrier("batchjax-sweep-end")  # every process has written its runs
        results = None
        if self.lead:
            self.phase("writing the tables")
            results = load_sweep(self.out_dir)
            write_tables(self.out_dir, results.runs)
            self.session["finished"] = self.manifest["finished"] = _now()
            if self.process_count > 1:
                self.session["processes"] = self.process_count
                self.session["trained"] = [n for b in self.batch_sizes
                                           for n in self.expected(b, self.rates_of(b))]
            self.write_manifest()
            results = dataclasses.replace(results, manifest=self.manifest)
        if self.process_count > 1:
            self.barrier("batchjax-sweep-manifest")
        return results if results is not None else load_sweep(self.out_dir)

    def rates_of(self, batch_size: int) -> list[float | None]:
        if self.grid is None:
            return [None]
        return [float(v) for v in self.manifest["grid"]["learning_rates"].get(
            str(batch_size), [])]

    def expected(self, batch_size: int, rates: Sequence[float | None]) -> dict[str, tuple]:
        """{name: (learning rate, seed)} of every run of `rates` x seeds at `batch_size`."""
        return {self.name(batch_size, lr, s): (lr, s) for lr in rates for s in self.seeds}

    def completed(self, batch_size: int, rates: Sequence[float | None]) -> dict[str, Run]:
        if not self.resumed:
            return {}
        expected = self.expected(batch_size, rates)
        return _completed_runs(self.out_dir, {n: self.run_config(batch_size, *spec)
                                              for n, spec in expected.items()})

    def plain(self) -> None:
        todo = {}
        for b in self.mine:
            done = self.completed(b, [None])
            missing = [spec for n, spec in self.expected(b, [None]).items() if n not in done]
            if missing:
                todo[b] = missing
        skipped = [b for b in self.mine if b not in todo]
        if skipped:
            self.console.write(f"resume: batch sizes {abbreviate(skipped)} already complete "
                               "for every seed; skipped")
        for b, missing in todo.items():
            self.train(b, missing, {})

    def fixed_grid(self) -> None:
        for b in self.mine:
            rates = self.rates_of(b)
            done = self.completed(b, rates)
            missing = [spec for n, spec in self.expected(b, rates).items() if n not in done]
            if not missing:
                self.console.write(f"resume: batch size {b} already complete for every "
                                   "learning rate and seed; skipped")
            runs = list(done.values()) + (self.train(b, missing, done) if missing else [])
            if self.target_loss is not None:
                choice = choose_learning_rate(runs, self.target_loss)
                self.record_choice(b, choice, rates, extensible=False)

    def adaptive_grid(self) -> None:
        search, previous = self.search, None
        grid = self.manifest["grid"]
        for b in self.batch_sizes:
            rates = self.rates_of(b)
            if not rates:
                guess = search.guess(b, previous)
                rates = search.rates_around(guess)
                grid["learning_rates"][str(b)] = rates
                self.write_manifest()
                self.console.write(f"bs {b:>5d} | learning rates {rates_text(rates)} around "
                                   f"{guess:.3g}" + (f" (the best at {previous[0]}, "
                                                     f"{previous[1]:.3g}, scaled)"
                                                     if previous else " (the search's centre)"))
            runs = list(self.completed(b, rates).values())
            while True:
                names = {r.path.name for r in runs if r.path is not None}
                missing = [spec for n, spec in self.expected(b, rates).items()
                           if n not in names]
                if missing:
                    done = {r.path.name: r for r in runs if r.path is not None}
                    runs += self.train(b, missing, done)
                choice = choose_learning_rate(runs, self.target_loss)
                extended = grid["extended"].get(str(b), [])
                if choice.edge is None or extended.count(choice.edge) >= search.max_extensions:
                    break
                new = search.extend(rates, choice.edge)
                self.console.write(f"bs {b:>5d} | the best rate so far ({choice.leaning:.3g}) "
                                   f"is the {'largest' if choice.edge == 'up' else 'smallest'} "
                                   f"of the grid: extending it by {rates_text(new)}")
                rates = sorted(rates + new)
                grid["extended"][str(b)] = extended + [choice.edge]
                grid["learning_rates"][str(b)] = rates
                self.write_manifest()
            self.record_choice(b, choice, rates, extensible=True)
            previous = (b, choice.leaning)

    def record_choice(self, batch_size: int, choice: RateChoice, rates: Sequence[float],
                      extensible: bool) -> None:
        """The provisional best rate into the manifest and onto the console."""
        grid, key = self.manifest["grid"], str(batch_size)
        grid["best"][key] = choice.best
        reason = None
        if choice.best is None:
            reason = "no learning rate brought every seed to the target"
        elif choice.edge is not None:
            reason = (f"the best rate is the {'largest' if choice.edge == 'up' else 'smallest'} "
                      "of the grid" + (" after its extensions" if extensible else
                                       " (a fixed grid is not extended)"))
        if reason is None:
            grid["unreliable"].pop(key, None)
        else:
            grid["unreliable"][key] = reason
        self.write_manifest()
        b = batch_size
        for lr, steps in choice.steps.items():
            reached = [v for v in steps if v is not None]
            text = (f"{np.mean(reached):,.0f} steps to the target (mean of {len(reached)})"
                    if reached else "target not reached")
            self.console.write(f"bs {b:>5d} | lr {lr:.3g}: {text}; {len(reached)}/{len(steps)} "
                               "seeds reached it" + (" <- best" if lr == choice.best else ""))
        if reason is not None:
            self.console.write(f"bs {b:>5d} | unreliable: {reason}")

    # ------------------------------------------------------------------------------ training

    def best_steps(self, runs) -> float:
        if self.target_loss is None:
            return math.inf
        steps = [run_steps_to_target(r, self.target_loss) for r in runs]
        return min([v for v in steps if v is not None], default=math.inf)

    def train(self, b: int, specs: list[tuple], done: dict[str, Run]) -> list[Run]:
        """Train the (learning rate, seed) pairs `specs` at batch size `b`, in groups that fit;
        save each run at once. `done`: the runs of `b` saved before (for the early stop).
        Returns the runs trained (without their parameters)."""
        groups = split_groups(specs, self.group_sizes[b])
        rates = sorted({lr for lr, _ in specs if lr is not None})
        if len(groups) > 1:
            what = (f"{len(specs):,} runs ({len(rates)} learning rates x seeds)" if rates
                    else f"{len(specs):,} seeds")
            self.console.write(
                f"bs {b:>5d} | {what} do not fit in memory together (an estimated "
                f"{self.estimates[b].text(len(specs), len(jax.local_devices()))}; limit "
                f"{format_bytes(self.limit[0])}, {self.limit[1]}): {len(groups)} groups of up "
                f"to {max(map(len, groups)):,} runs" if rates else
                f"bs {b:>5d} | {what} do not fit in memory together: "
                f"{describe_groups([[s for _, s in g] for g in groups])}")
        trained, earlier = [], list(done.values())
        for g, group in enumerate(groups):
            where = f" (group {g + 1}/{len(groups)})" if len(groups) > 1 else ""
            runs = self.train_group(b, group, where, self.best_steps(earlier + trained))
            trained.extend(runs)
        return trained

    def train_group(self, b: int, group: list[tuple], where: str, best_steps: float) -> list[Run]:
        config, dataset = self.config, self.dataset
        configs = [self.run_config(b, lr, s) for lr, s in group]
        names = [self.name(b, lr, s) for lr, s in group]
        for c, name in zip(configs, names):
            write_json_atomic(self.out_dir / name / CONFIG, c.to_dict())
        self.session["trained"].extend(names)
        self.write_manifest()
        seeds = [s for _, s in group]
        rates = sorted({lr for lr, _ in group if lr is not None})
        what = (f"learning rates {rates_text(rates)} x seeds {abbreviate(sorted(set(seeds)))} "
                f"({len(group)} runs)" if rates else f"seeds {abbreviate(seeds)}")
        self.console.write(f"bs {b:>5d} | training {what}{where} ({dataset.name}, "
                           f"{dataset.num_train:,} examples, {-(-dataset.num_train // b):,} "
                           "steps per epoch)")
        self.console.bar.total = (self.console.bar.total or 0) + config.epochs
        self.console.bar.refresh()
        training = f"compiling or training batch size {b}, {what}"
        measure = None
        if config.noise_schedule != "none":
            # Keyed by seed, not by position in the group, so a resumed sweep that trains
            # only some runs measures what an uninterrupted one would.
            fewer = {"empirical_batches": GRID_EMPIRICAL_BATCHES} if rates else {}
            measure_noise = make_measure(dataset, configs[0], batch_sizes=self.batch_sizes,
                                         seeds=seeds, model=self.model, loss_fn=self.loss_fn,
                                         **fewer)

            def measure(params_list, step, examples_seen):
                self.phase(f"measuring the gradient noise of batch size {b} at step {step}")
                records = measure_noise(params_list, step, examples_seen)
                self.phase(training)
                return records

        early = (EarlyStop(self.target_loss, self.stop_factor, best_steps)
                 if self.target_loss is not None else None)
        unit = "runs" if rates else "seeds"

        def epoch_done(epoch, results):
            self.console.update(1)
            line = mean_epoch_line(b, epoch, results, unit=unit)
            if early is not None:
                early._update(results)
                line += f" - {len(early.reached)}/{len(results)} reached the target"
            self.console.write(line)
            if self.on_epoch_end is not None:
                self.on_epoch_end(b, epoch, results)
            _check(self.stop)

        # Grid runs are measured at the log-spaced steps alone: every run of a grid is
        # measured, and epoch ends would add a record per run and epoch (at large B, where
        # epochs are a few steps, most of the time of the sweep).
        steps = (measurement_steps(configs[0], -(-dataset.num_train // b), epoch_ends=False)
                 if rates else None)
        self.phase(training)
        results = train_runs(configs, dataset, model=self.model, optimizer=self.optimizer,
                             loss_fn=self.loss_fn, measure=measure, on_epoch_end=epoch_done,
                             should_stop=self.stop, segment_seconds=self.segment_seconds,
                             should_finish=early, measure_steps=steps)
        epochs = max(len(r.history["epoch"]) for r in results)
        self.console.update(config.epochs - epochs)  # stopped early: the bar still ends
        if early is not None:
            early.finish(results)
            if epochs < config.epochs:
                self.console.write(f"bs {b:>5d} | stopped after epoch {epochs}: every run has "
                                   "reached the target, diverged or is hopeless")
        elif rates:
            for run in results:
                run.stopped = "diverged" if run.diverged else "budget"
        for run, name in zip(results, names):
            run.trained_with = list(names)
            _check(self.stop)
            self.phase(f"final evaluation and sharpness of {name}")
            run.final_train = evaluate_final_train(run, dataset, model=self.model,
                                                   loss_fn=self.loss_fn)
            if self.sharpness is not None:
                run.sharpness = measure_final_sharpness(run, dataset, self.sharpness,
                                                        model=self.model, loss_fn=self.loss_fn)
            write_run(self.out_dir, run, name)
            if run.sharpness is not None:
                self.console.write(_sharpness_line(b, run.seed, run.sharpness))
            if run.status == "diverged":
                self.console.write(f"bs {b:>5d} | {name} diverged at step {run.diverged_step}; "
                                   "saved with status 'diverged'" if rates else
                                   f"bs {b:>5d} | seed {run.seed} diverged at step "
                                   f"{run.diverged_step}; saved with status 'diverged'")
            run.params = None  # keep memory bounded over many groups
        return results


def _check(stop: Callable[[], bool]) -> None:
    if stop():
        raise Interrupted("stop requested")
