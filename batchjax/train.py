"""Training: the loop that runs the jitted steps of `batchjax.steps`, compiled once.

Semantics follow Keras `model.fit` on the original recipe:
  * loss: the mean over the batch of a per-example loss (default softmax cross-entropy on
    integer labels); metric: accuracy (argmax of the outputs equals the label);
  * the optimizer: Keras' Adam by default (lr 1e-3, b1 0.9, b2 0.999, eps 1e-7), or another
    named one (`batchjax.optim`), or any `optax.GradientTransformation`;
  * an epoch reshuffles the training set and visits every example exactly once; the partial
    last batch is a step of its own (its loss is the mean over its real examples), never dropped;
  * the epoch's training loss and accuracy are means over the epoch's examples as seen during
    training (each batch weighted by its size, as Keras 3's loss tracker does); validation is
    evaluated with the parameters at the end of the epoch.

What trains (the contract of `batchjax.losses`): a `flax.linen.Module` mapping a batch of images
[B, *image_shape] to outputs [B, K], initialised from the image shape, whose only variables are
"params" and which needs no random numbers (no BatchNorm statistics, no active dropout:
`batchjax.model.check_model`); a per-example `loss_fn(outputs_B, labels_B) -> losses_B`.
Defaults: the MLP of `config.hidden`, the optimizer `config.optimizer`, cross-entropy.

Runs: `train_runs` trains configs that differ in seed and in the traced hyperparameters
(`TRACED_FIELDS`) together, `jax.vmap`ped in one jitted epoch and sharded over devices; the
data is an argument, shared (closed-over arrays would be baked into the executable as
constants). `train_seeds` and `train` are its special cases.

Compiled once: everything that is not a shape or a function is data. The hyperparameters of a
named optimizer (`batchjax.optim.hyperparams`) ride in `TrainState.hparams`; seeds enter as
key data and the epoch as a number. The compiled functions of one static setting (model,
optimizer name or object, loss_fn, N, B, unroll, number of runs, devices) are kept in
`_PROGRAMS`, and each dataset's device copies in `_DEVICE_DATA`: a repeated call with another
learning rate, seed, b1, b2, eps, momentum or number of epochs compiles and copies nothing.
The initial state is drawn one run at a time by a program per (model, optimizer, image shape)
(`_INITIALS`), so other batch sizes and numbers of runs do not compile it again.

Stopping: `should_stop()` is polled at safe points and raises `Interrupted`; with
`segment_seconds` an epoch runs in segments of about that length (`steps.make_train_segment`,
the same numbers), so a stop request waits at most one segment.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
import weakref
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchjax import optim, rng
from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.losses import LossFn, cross_entropy
from batchjax.model import MLP, check_model, init_params
from batchjax.noise import make_measure
from batchjax.optim import make_optimizer, scale_by_keras_adam
from batchjax.run import HISTORY_KEYS, Run
from batchjax.steps import (EpochMetrics, TrainState, compiler_options, epoch_batch_sizes,
                            epoch_permutation, init_train_state, make_evaluate,
                            make_train_epoch, make_train_segment, make_train_step,
                            seed_shardings)

# Re-exported here: code that trains imports these from `batchjax.train`.
__all__ = ["HISTORY_KEYS", "EpochMetrics", "Interrupted", "TrainResult", "TrainState",
           "clear_compiled", "compiler_options", "cross_entropy", "epoch_batch_sizes",
           "epoch_permutation", "init_train_state", "make_evaluate", "make_optimizer",
           "make_train_epoch", "make_train_step", "scale_by_keras_adam", "seed_shardings",
           "train", "train_runs", "train_seeds"]

TrainResult = Run
# Config fields in which the runs of one `train_runs` call may differ: they are data.
TRACED_FIELDS = ("seed", "learning_rate", "b1", "b2", "eps", "momentum")


class Interrupted(KeyboardInterrupt):
    """Training stopped because `should_stop()` returned True; nothing was returned."""


def measurement_steps(config: TrainConfig, steps_per_epoch: int,
                      epoch_ends: bool = True) -> list[int]:
    """Global steps after which the noise statistics are measured (0: before the first step).

    "epoch": 0 and every epoch end. "log": 0, `noise_points` steps log-spaced between 1 and the
    last step (rounded, duplicates merged), and every epoch end, so per-epoch records exist
    under either schedule; with `epoch_ends` False the log-spaced steps alone (what grid
    sweeps measure, `batchjax.sweep`). "none": no measurements.
    """
    total = config.epochs * steps_per_epoch
    if config.noise_schedule == "none":
        return []
    steps = {0}
    if config.noise_schedule == "epoch" or epoch_ends:
        steps |= {e * steps_per_epoch for e in range(1, config.epochs + 1)}
    if config.noise_schedule == "log":
        steps |= {int(round(s)) for s in np.geomspace(1, total, config.noise_points)}
    return sorted(steps)


# --------------------------------------------------------------------------------------------
# Compiled once: the programs of a static setting, and the data on the device


class _Compiled:
    """Jitted functions (`jitted`, by name), each compiled for its arguments' shapes on first
    use and kept; `compile_seconds` counts all the compiling they have done, ever."""

    def __init__(self):
        self.jitted: dict = {}
        self.compiled: dict = {}
        self.compile_seconds = 0.0

    def __call__(self, name: str, *args):
        """Run function `name` on `args`, compiling it for their shapes the first time."""
        leaves, treedef = jax.tree.flatten(args)  # every leaf is an array or NumPy scalar
        signature = (name, treedef, tuple((a.shape, a.dtype) for a in leaves))
        executable = self.compiled.get(signature)
        if executable is None:
            t0 = time.perf_counter()
            executable = self.jitted[name].lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.compiled[signature] = executable
        return executable(*args)


class _Initial(_Compiled):
    """One run's initial state, `init(key_data, hparams) -> TrainState`, for a (model,
    optimizer, image shape): shared by the programs of every batch size and number of runs.

    Initialising is one of the slower programs to compile on CPU (the threefry draws of every
    kernel: 1-2.5 s), so it is compiled once, not once per program; a program stacks its
    runs' states. Each run's numbers are those of the vmapped draw (threefry is per key).
    """

    def __init__(self, model, optimizer, image_shape):
        super().__init__()

        def init(key_data, hparams):
            key = rng.stream_key(jax.random.wrap_key_data(key_data), "init")
            params = init_params(model, key, image_shape)
            return TrainState(params, optim.resolve(optimizer, hparams).init(params), hparams)

        self.jitted["init"] = jax.jit(init)


class _Order(_Compiled):
    """`order(key_data, epoch) -> perm`: each run's order of the N examples in an epoch,
    placed like the runs; shared by the programs of every batch size (a segmented epoch's
    start; the threefry draws make it slow to compile, like `_Initial`)."""

    def __init__(self, num_train, num_runs, devices):
        super().__init__()

        def order(key_data, epoch_index):
            key = rng.stream_key(jax.random.wrap_key_data(key_data), "shuffle", epoch_index)
            return epoch_permutation(key, num_train)

        vmap = jax.vmap if num_runs > 1 else (lambda fn, in_axes: fn)
        self.jitted["order"] = jax.jit(vmap(order, in_axes=(0, None)),
                                       out_shardings=seed_shardings(num_runs, devices)[0])


class _Program(_Compiled):
    """The jitted functions of one static setting, each compiled on first use and kept.

    Functions (R runs; with R = 1 nothing is vmapped); the initial state comes from the
    method `init` (the shared `_Initial` per run, then `stack`):
      stack(states) -> state: R runs' states stacked on a leading axis, placed like the runs
      epoch(state, x, y, key_data, epoch) -> (state, EpochMetrics): a whole epoch (scan)
      zeros() -> EpochMetrics of zeros: a segmented epoch's buffers (its order: `_Order`)
      segment(state, metrics, x, y, perm, start, stop) -> (state, metrics)
      evaluate(params, x, y) -> (mean loss, accuracy)
      unstack(params) -> R pytrees, one per run
    """

    def __init__(self, model, optimizer, loss_fn, image_shape, num_train, batch_size, unroll,
                 num_runs, devices):
        super().__init__()
        self.optimizer, self.num_runs = optimizer, num_runs
        self.run_sharding, self.replicated = seed_shardings(num_runs, devices)
        self.initial = _kept(_INITIALS, _Initial, model, optimizer, image_shape)
        self.order = _kept(_ORDERS, _Order, num_train, num_runs, devices)
        self.seconds_per_step: float | None = None  # the latest measured epoch pace
        step = make_train_step(model, optimizer, loss_fn)
        epoch = make_train_epoch(None, None, num_train, batch_size, unroll, train_step=step)
        segment = make_train_segment(step, num_train, batch_size)
        evaluate = make_evaluate(model, loss_fn)
        steps_per_epoch = len(epoch_batch_sizes(num_train, batch_size))

        def run_epoch(state, x, y, key_data, epoch_index):
            key = rng.stream_key(jax.random.wrap_key_data(key_data), "shuffle", epoch_index)
            return epoch(state, x, y, key)

        metrics_shape = (num_runs, steps_per_epoch) if num_runs > 1 else (steps_per_epoch,)

        def zeros():
            return EpochMetrics(jnp.zeros(metrics_shape, jnp.float32),
                                jnp.zeros(metrics_shape, jnp.int32))

        def stack(states):
            return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

        batched = num_runs > 1
        vmap = jax.vmap if batched else (lambda fn, in_axes: fn)
        options = compiler_options(devices)
        self.jitted = {
            "stack": jax.jit(stack, out_shardings=self.run_sharding),
            "epoch": jax.jit(vmap(run_epoch, in_axes=(0, None, None, 0, None)),
                             donate_argnums=0, compiler_options=options),
            # Placed like the runs, so that a segment's inputs (these buffers and the order,
            # or the previous segment's) always have the sharding it was compiled for.
            "zeros": jax.jit(zeros, out_shardings=self.run_sharding),
            "segment": jax.jit(vmap(segment, in_axes=(0, 0, None, None, 0, None, None)),
                               donate_argnums=(0, 1), compiler_options=options,
                               out_shardings=self.run_sharding),
            "unstack": jax.jit(lambda tree: [jax.tree.map(lambda a, i=i: a[i], tree)
                                             for i in range(num_runs)]),
        }
        if batched and isinstance(self.run_sharding, jax.sharding.SingleDeviceSharding):
            # One run after another: on one device R plain [N, D] x [D, H] products beat one
            # batched [R, N, D] x [R, D, H] (CPU, R = 4, B = 128: 11 vs 16 ms per run-epoch).
            self.jitted["evaluate"] = jax.jit(
                lambda params, x, y: jax.lax.map(lambda p: evaluate(p, x, y), params))
        else:
            self.jitted["evaluate"] = jax.jit(vmap(evaluate, in_axes=(0, None, None)))

    def _shared(self, shared: _Compiled, name: str, *args):
        """`shared(name, *args)`, its compiling counted as this program's."""
        before = shared.compile_seconds
        out = shared(name, *args)
        self.compile_seconds += shared.compile_seconds - before
        return out

    def start(self, key_data, epoch: int) -> tuple[jax.Array, EpochMetrics]:
        """A segmented epoch's order of the examples and its zeroed metrics buffers."""
        return self._shared(self.order, "order", key_data, np.int32(epoch)), self("zeros")

    def init(self, key_data: np.ndarray, hparams) -> TrainState:
        """The runs' initial states from host arrays ([R, ...] leaves; unbatched for R = 1),
        placed like the runs."""
        if self.num_runs == 1:
            return jax.device_put(self._shared(self.initial, "init", key_data, hparams),
                                  self.run_sharding)
        return self("stack", [self._shared(self.initial, "init", key_data[i],
                                           jax.tree.map(lambda a, i=i: a[i], hparams))
                              for i in range(self.num_runs)])


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_INITIALS: collections.OrderedDict = collections.OrderedDict()
_ORDERS: collections.OrderedDict = collections.OrderedDict()
_MAX_PROGRAMS = 16
# Each dataset's arrays on the device, per sharding; dropped with the dataset.
_DEVICE_DATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kept(cache: collections.OrderedDict, make: Callable, *static):
    """`make(*static)`, kept in `cache` (the `_MAX_PROGRAMS` least recently used)."""
    value = cache.pop(static, None) or make(*static)
    cache[static] = value
    while len(cache) > _MAX_PROGRAMS:
        cache.popitem(last=False)
    return value


def _program(*static) -> _Program:
    """The program of a static setting (kept, see `_kept`)."""
    return _kept(_PROGRAMS, _Program, *static)


def clear_compiled() -> None:
    """Forget every kept program and device copy of a dataset (frees their memory)."""
    _PROGRAMS.clear()
    _INITIALS.clear()
    _ORDERS.clear()
    _DEVICE_DATA.clear()


def _device_data(dataset, sharding) -> tuple[jax.Array, ...]:
    """(x_train, y_train, x_val, y_val) of `dataset` on the device(s), copied once."""
    per_sharding = _DEVICE_DATA.setdefault(dataset, {})
    if sharding not in per_sharding:
        per_sharding[sharding] = jax.device_put(
            (dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val), sharding)
    return per_sharding[sharding]


# --------------------------------------------------------------------------------------------
# The training loop


def format_epoch(epoch: int, epochs: int, history: dict, i: int = -1) -> str:
    """A Keras-like line for one finished epoch."""
    h = {k: v[i] for k, v in history.items()}
    return (f"Epoch {epoch}/{epochs} - {h['train_seconds'] + h['eval_seconds']:.2f}s"
            f" - loss: {h['train_loss']:.4f} - accuracy: {h['train_accuracy']:.4f}"
            f" - val_loss: {h['val_loss']:.4f} - val_accuracy: {h['val_accuracy']:.4f}")


def check_batch_size(batch_size: int, num_train: int) -> None:
    if batch_size > num_train:
        raise BatchjaxError(f"batch_size {batch_size} is larger than the training set "
                            f"({num_train} examples); choose a batch size <= {num_train}")


def check_configs(configs: Sequence[TrainConfig], *, optimizer=None) -> list[TrainConfig]:
    """The configs of one `train_runs` call: distinct, differing only in `TRACED_FIELDS`.

    With a given optax `optimizer` the named optimizer's hyperparameters are unused, so the
    configs may differ in their seeds only.
    """
    configs = list(configs)
    if not configs or not all(isinstance(c, TrainConfig) for c in configs):
        raise BatchjaxError("train_runs needs a non-empty list of TrainConfig")
    may_differ = TRACED_FIELDS if optimizer is None else ("seed",)
    first = configs[0].to_dict()
    differ = sorted({k for c in configs for k, v in c.to_dict().items()
                     if k not in may_differ and v != first[k]})
    if differ:
        raise BatchjaxError(f"runs trained together may differ only in {', '.join(may_differ)}"
                            f"; these differ: {', '.join(differ)} (train them separately)")
    if len(set(configs)) != len(configs):
        raise BatchjaxError("train_runs got the same config twice; give each run once")
    return configs


def _run_name(config: TrainConfig, with_learning_rate: bool = False) -> str:
    # Shim: the directory name of `batchjax.results.run_name` (which comes after this module),
    # naming the learning rate when the runs of one call differ in it, as grid sweeps do.
    if with_learning_rate:
        return f"bs{config.batch_size:05d}_lr{config.learning_rate:.3g}_seed{config.seed}"
    return f"bs{config.batch_size:05d}_seed{config.seed}"


def _poll(should_stop: Callable[[], bool] | None, where: str) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted(f"training stopped by should_stop() {where}")


class _Session:
    """One `train_runs` call: the state of its runs on the device and their `Run`s so far."""

    def __init__(self, program: _Program, configs: list[TrainConfig], dataset, measure,
                 should_stop, segment_seconds, measure_steps=None):
        self.program, self.configs, self.measure = program, configs, measure
        self.should_stop, self.segment_seconds = should_stop, segment_seconds
        config = configs[0]
        self.num_train, self.batch_size = dataset.num_train, config.batch_size
        self.batch_sizes = epoch_batch_sizes(self.num_train, self.batch_size)
        self.steps_per_epoch = len(self.batch_sizes)
        self.compile_seconds_before = program.compile_seconds
        grid = len({c.learning_rate for c in configs}) > 1
        names = [_run_name(c, grid) for c in configs]
        self.runs = [Run(config=c, dataset=dataset.describe(), trained_with=names)
                     for c in configs]
        self.active = list(range(len(configs)))
        if measure is None:
            self.schedule = []
        elif measure_steps is not None:
            self.schedule = sorted({int(v) for v in measure_steps})
        else:
            self.schedule = measurement_steps(config, self.steps_per_epoch)
        self.x_train, self.y_train, self.x_val, self.y_val = _device_data(
            dataset, program.replicated)
        key_data = np.stack([jax.random.key_data(rng.root_key(c.seed)) for c in configs])
        hparams = None
        if isinstance(program.optimizer, str):
            values = [optim.hyperparams(c) for c in configs]
            hparams = {k: np.stack([v[k] for v in values]) for k in optim.HYPERPARAMS}
        if len(configs) == 1:
            key_data, hparams = key_data[0], jax.tree.map(lambda a: a[0], hparams)
        self.state = program.init(key_data, hparams)
        self.key_data = jax.device_put(key_data, program.run_sharding)

    def _unstack(self, tree) -> list:
        return [tree] if self.program.num_runs == 1 else self.program("unstack", tree)

    def record_noise(self, step: int) -> float:
        """Measure after global `step`; returns the seconds it took."""
        if step not in self.schedule or not self.active:
            return 0.0
        _poll(self.should_stop, f"before the measurement at step {step}")
        t0 = time.perf_counter()
        epoch, local = divmod(step, self.steps_per_epoch)
        seen = epoch * self.num_train + int(self.batch_sizes[:local].sum())
        for i, records in enumerate(self.measure(self._unstack(self.state.params), step, seen)):
            if i in self.active:
                self.runs[i].noise.extend(records)
        seconds = time.perf_counter() - t0
        _poll(self.should_stop, f"after the measurement at step {step}")
        return seconds

    def _segment_length(self, done: int) -> int:
        """Steps in the next segment: about `segment_seconds` at the measured pace."""
        left = self.steps_per_epoch - done
        if self.segment_seconds is None:
            return left
        pace = self.program.seconds_per_step
        if pace is None:  # no pace measured yet: a one-step probe
            return 1
        return min(left, max(1, int(self.segment_seconds / pace)))

    def _timed(self, name: str, *args):
        """`program(name, *args)` to completion; records the pace of a training call."""
        compiled, t0 = self.program.compile_seconds, time.perf_counter()
        out = self.program(name, *args)
        jax.block_until_ready(out)
        if self.program.compile_seconds == compiled:  # a compilation says nothing of the pace
            steps = self.steps_per_epoch if name == "epoch" else int(args[-1] - args[-2])
            self.program.seconds_per_step = (time.perf_counter() - t0) / steps
        return out

    def train_epoch(self, epoch: int) -> tuple[EpochMetrics, float]:
        """One epoch, measured where the schedule says; returns metrics and measuring time."""
        first = epoch * self.steps_per_epoch
        cuts = [s - first for s in self.schedule if first < s < first + self.steps_per_epoch]
        if not cuts and self.segment_seconds is None:
            self.state, metrics = self._timed("epoch", self.state, self.x_train, self.y_train,
                                              self.key_data, np.int32(epoch))
            return metrics, 0.0
        perm, metrics = self.program.start(self.key_data, epoch)
        done, measure_seconds = 0, 0.0
        while done < self.steps_per_epoch:
            stop = min([done + self._segment_length(done), *(c for c in cuts if c > done)])
            args = (self.state, metrics, self.x_train, self.y_train, perm, np.int32(done),
                    np.int32(stop))
            if self.segment_seconds is None:
                self.state, metrics = self.program("segment", *args)
            else:
                self.state, metrics = self._timed("segment", *args)
            done = stop
            if done in cuts:
                measure_seconds += self.record_noise(first + done)
            elif done < self.steps_per_epoch:
                _poll(self.should_stop, f"in epoch {epoch + 1} after step {first + done}")
        return jax.block_until_ready(metrics), measure_seconds

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        """Validation loss and accuracy of every run, as NumPy arrays [runs]."""
        loss, accuracy = self.program("evaluate", self.state.params, self.x_val, self.y_val)
        count = len(self.configs)
        return np.asarray(loss).reshape(count), np.asarray(accuracy).reshape(count)

    def record_epoch(self, epoch: int, metrics: EpochMetrics, val, seconds) -> None:
        """Append the epoch to every active run's history; a non-finite loss ends a run."""
        count, steps = len(self.configs), self.steps_per_epoch
        losses = np.asarray(metrics.losses).reshape(count, steps)
        correct = np.asarray(metrics.correct).reshape(count, steps)
        for i in list(self.active):
            r = self.runs[i]
            finite = np.isfinite(losses[i])
            if not finite.all():
                first = int(np.argmin(finite))
                r.step_losses = np.concatenate([r.step_losses, losses[i][:first + 1]])
                r.step_batch_sizes = np.concatenate([r.step_batch_sizes,
                                                     self.batch_sizes[:first + 1]])
                r.status, r.diverged_step = "diverged", epoch * steps + first
                self.active.remove(i)
                continue
            r.step_losses = np.concatenate([r.step_losses, losses[i]])
            r.step_batch_sizes = np.concatenate([r.step_batch_sizes, self.batch_sizes])
            values = {"epoch": epoch + 1,
                      "train_loss": np.dot(losses[i], self.batch_sizes) / self.num_train,
                      "train_accuracy": correct[i].sum() / self.num_train,
                      "val_loss": val[0][i], "val_accuracy": val[1][i],
                      "train_seconds": seconds[0], "eval_seconds": seconds[1],
                      "steps": (epoch + 1) * steps,
                      "examples_seen": (epoch + 1) * self.num_train}
            for k in HISTORY_KEYS:
                r.history[k] = np.append(r.history[k], np.float64(values[k]))
        for r in self.runs:
            r.compile_seconds = self.program.compile_seconds - self.compile_seconds_before

    def finish(self) -> list[Run]:
        params = self._unstack(self.state.params)
        for r, p in zip(self.runs, params):
            r.params = jax.tree.map(np.asarray, p)
        return self.runs


def _clock(program: _Program, fn: Callable, *args):
    """`fn(*args)` (which returns once its work is done) and its seconds, less compilation."""
    compiled, t0 = program.compile_seconds, time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0 - (program.compile_seconds - compiled)


def _resolve_measure(measure, configs, dataset, model, loss_fn):
    if isinstance(measure, str):
        if measure != "default":
            raise BatchjaxError(f"measure must be a callable, None or 'default', got {measure!r}")
        if configs[0].noise_schedule == "none":
            return None
        return make_measure(dataset, configs[0], batch_sizes=[configs[0].batch_size],
                            seeds=[c.seed for c in configs], model=model, loss_fn=loss_fn)
    if measure is not None and not callable(measure):
        raise BatchjaxError(f"measure must be a callable, None or 'default', got {measure!r}")
    return measure


def train_runs(configs: Sequence[TrainConfig], dataset, *, model: nn.Module | None = None,
               optimizer: optax.GradientTransformation | None = None,
               loss_fn: LossFn | None = None, verbose: bool = False,
               devices: Sequence[jax.Device] | None = None,
               on_epoch_end: Callable[[int, list[Run]], None] | None = None,
               measure: Callable | None | str = "default",
               should_stop: Callable[[], bool] | None = None,
               segment_seconds: float | None = None,
               should_finish: Callable[[int, list[Run]], bool] | None = None,
               measure_steps: Sequence[int] | None = None) -> list[Run]:
    """Train the runs of `configs` on `dataset` together: one jitted program, `jax.vmap`ped.

    The configs may differ in their seeds and in the traced hyperparameters (learning_rate,
    after `lr_scaling`; b1, b2, eps, momentum), so a grid of learning rates x seeds trains in
    one program. Each run's numbers equal those of training it alone up to float rounding of
    the batched products (nothing is vmapped for one run).

    Args:
      configs: the runs; all fields but `TRACED_FIELDS` equal.
      dataset: a `batchjax.Dataset`.
      model: a `flax.linen.Module` mapping images [B, *image_shape] to outputs [B, K], with
        "params" its only variables and no randomness (see `batchjax.losses`); default
        `MLP(config.hidden, dataset.num_classes)`. Pass the same object (or an equal one) to
        repeated calls: programs are compiled once per model.
      optimizer: an `optax.GradientTransformation` replacing the named `config.optimizer`
        (its hyperparameters are its own; the configs may then differ only in seed).
      loss_fn: per-example `loss_fn(outputs_B, labels_B) -> losses_B`; default cross-entropy.
      verbose: print a Keras-like line per epoch (the first run's numbers) to stderr.
      devices: devices to spread the runs over (default: the local ones; `seed_shardings`).
      on_epoch_end: called as `on_epoch_end(epoch, runs)` after each epoch (1-based).
      measure: `measure(params_list, step, examples_seen) -> list[list[dict]]` (one list of
        records per run), or None. "default": `batchjax.noise.make_measure` of this model and
        loss at the runs' batch size, unless `noise_schedule` is "none". Called after the
        steps of `measurement_steps`; its time is not counted in `train_seconds`.
      should_stop: polled at every safe point (between epochs and segments, before and after
        each measurement); when it returns True, `Interrupted` is raised.
      segment_seconds: cut each epoch into segments of about this many seconds (from the
        measured step time), so that `should_stop` is heard within one segment. The numbers
        are those of whole-epoch scans.
      should_finish: called as `should_finish(epoch, runs)` after each epoch (1-based, after
        `on_epoch_end` and the epoch's measurement); when it returns True, training ends
        there and the runs are returned with the epochs trained so far (an early stop, e.g.
        once every run reached a target; `batchjax.sweep`).
      measure_steps: the global steps after which `measure` runs (0: before the first step);
        default `measurement_steps(config, steps per epoch)`.

    Returns:
      One `Run` per config, in order.

    Raises:
      BatchjaxError: configs that may not train together, a batch larger than the training
        set, or a model with state or randomness.
      Interrupted: `should_stop()` returned True.
    """
    configs = check_configs(configs, optimizer=optimizer)
    config = configs[0]
    check_batch_size(config.batch_size, dataset.num_train)
    if segment_seconds is not None and not segment_seconds > 0:
        raise BatchjaxError(f"segment_seconds must be > 0 or None, got {segment_seconds!r}")
    model = MLP(config.hidden, dataset.num_classes) if model is None else model
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    try:  # they key the compiled programs
        hash((model, optimizer, loss_fn))
    except TypeError as err:
        raise BatchjaxError(f"model, optimizer and loss_fn must be hashable ({err}); give a "
                            "module's fields as tuples, not lists") from None
    image_shape = tuple(dataset.x_train.shape[1:])
    check_model(model, image_shape)
    measure = _resolve_measure(measure, configs, dataset, model, loss_fn)
    devices = tuple(devices if devices is not None else jax.local_devices())
    program = _program(model, config.optimizer if optimizer is None else optimizer, loss_fn,
                       image_shape, dataset.num_train, config.batch_size, config.unroll,
                       len(configs), devices)
    session = _Session(program, configs, dataset, measure, should_stop, segment_seconds,
                       measure_steps)

    session.record_noise(0)
    for epoch in range(config.epochs):
        _poll(should_stop, f"before epoch {epoch + 1}")
        (metrics, measure_seconds), train_seconds = _clock(program, session.train_epoch, epoch)
        val, eval_seconds = _clock(program, session.evaluate)
        session.record_epoch(epoch, metrics, val, (train_seconds - measure_seconds, eval_seconds))
        if verbose and 0 in session.active:
            print(format_epoch(epoch + 1, config.epochs, session.runs[0].history),
                  file=sys.stderr)
        session.record_noise((epoch + 1) * session.steps_per_epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, session.runs)
        if not session.active or (should_finish is not None
                                  and should_finish(epoch + 1, session.runs)):
            break
    return session.finish()


def train_seeds(config: TrainConfig, dataset, seeds: Sequence[int], **kwargs) -> list[Run]:
    """Train one run per seed of `config` on `dataset`, vmapped together (`train_runs`).

    Each seed's numbers equal those of `train(dataclasses.replace(config, seed=s), dataset)`
    up to float rounding of the batched matmuls. Keywords as for `train_runs` (model,
    optimizer, loss_fn, verbose, devices, on_epoch_end, measure, should_stop,
    segment_seconds, should_finish, measure_steps). Returns one `Run` per seed, in the order of `seeds`.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise BatchjaxError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    return train_runs([dataclasses.replace(config, seed=s) for s in seeds], dataset, **kwargs)


def train(config: TrainConfig, dataset, **kwargs) -> Run:
    """Train one run of `config` on `dataset` (a `batchjax.Dataset`); see `train_runs`.

    Example, any flax model and optax optimizer (a model maps images to logits, with "params"
    its only variables; `loss_fn(outputs_B, labels_B)` returns each example's loss):

        run = batchjax.train(TrainConfig(batch_size=32), dataset, model=MyCNN(),
                             optimizer=optax.sgd(0.1))
    """
    return train_runs([config], dataset, **kwargs)[0]
