"""How much memory a sweep needs, estimated before anything is computed, and how to group it.

The runs of one batch size are trained together, vmapped and sharded over the devices
(`batchjax.train.train_runs`), so their memory adds up. Per device, for R runs of batch size B
on d devices (R/d runs each, rounded up):

    total = ceil(R / d) * per_run + shared
    per_run  = params + optimizer state                        (shapes from `jax.eval_shape`
                                                                of model.init, optimizer.init)
             + 2 * params                                      gradients and updates
             + B * (x_bytes + 3 * a_bytes)                      the gathered batch; activations
                                                                kept for the backward pass, their
                                                                nonlinearities, the backward deltas
             + N * 4 * 6                                        the epoch's permutation (int32 keys,
                                                                sort buffers)
             + S * 8                                            per-step loss and correct count
             + min(N, 10,000) * a_bytes                         evaluation chunk
             [+ params + T * 12 on CPU, where device = host:    final parameters and every step's
                                                                loss and batch size, as NumPy]
    shared   = runtime (compiler and executables: RUNTIME_BYTES, 128 MiB)
             + data (train and validation, inputs and labels)
             + noise (when measured, one run at a time): a probe copy of the data, and a chunk
               of per-example gradients (C = 64 examples x P parameters, the vmap path) or,
               for a dense stack, of activations and deltas (C = 2,048 x a)
             + sharpness (when measured, one run at a time): Lanczos vectors, num_iters x P
               float64 on the host (CPU) and a 1,024-example chunk of activations

where a_bytes is the bytes of every module output for one example (`capture_intermediates` of
flax, by `jax.eval_shape`), x_bytes the bytes of one input, N the training examples, S the steps
per epoch, T all steps, P the parameter count. A formula, not a measurement; against the peak
resident memory of training on CPU (`resource.getrusage`, less the process before training) it
came within 0.9-1.4x for 1 to 256 runs of widths 128 to 4,096 (and is checked in
tests/test_reliability.py): enough to refuse a grid that cannot fit and to choose groups.

The limit is `memory_stats()["bytes_limit"]` of the device where the backend reports it (GPU,
TPU), else the host's available memory (`MemAvailable` of /proc/meminfo), divided among the
local devices that share it (several CPU devices); `memory_limit` (bytes per device, or text
such as "8G") or $BATCHJAX_MEMORY_LIMIT override it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np

from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.model import MLP
from batchjax.optim import make_optimizer
from batchjax.results import abbreviate

MEMORY_LIMIT_ENV = "BATCHJAX_MEMORY_LIMIT"
EVAL_CHUNK = 10_000
NOISE_VMAP_CHUNK, NOISE_DENSE_CHUNK = 64, 2048
SHARPNESS_CHUNK = 1024
# Compiler and runtime memory of a training process beyond its arrays (measured on CPU: one
# run of width 4,096 peaked ~110 MiB above its arrays).
RUNTIME_BYTES = 128 * 2 ** 20
# Optimizer state in units of the parameters, for an optimizer jax.eval_shape cannot trace.
_STATE_PER_PARAM = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adam_keras": 2}
_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_bytes(text: str | int | float) -> int:
    """Bytes from `1234`, `"512M"`, `"8G"`, `"1.5GiB"` (binary units; the B is optional)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if not match:
            raise BatchjaxError(f"memory_limit must be a size such as 8G, 512M or 1000000, "
                                f"got {text!r}")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise BatchjaxError(f"memory_limit must be a positive size, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """`1.6 GiB`, `35.2 MiB`, `812 B`."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def _tree_size(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _host_available() -> tuple[int, str]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory (MemAvailable)"
    except OSError:
        pass
    try:
        return (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                "physical host memory")
    except (ValueError, OSError, AttributeError):
        return 2 ** 63, "unknown (no limit)"


def memory_limit(device: jax.Device | None = None,
                 override: str | int | None = None) -> tuple[int, str]:
    """(bytes, where the number comes from) of the memory one device may use.

    `override`, else $BATCHJAX_MEMORY_LIMIT, else the device's `bytes_limit`, else the host's
    available memory.
    """
    if override is not None:
        return parse_bytes(override), "memory_limit"
    if os.environ.get(MEMORY_LIMIT_ENV):
        return parse_bytes(os.environ[MEMORY_LIMIT_ENV]), f"${MEMORY_LIMIT_ENV}"
    device = device if device is not None else jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without statistics raise various errors
        stats = {}
    if stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"free memory of {device.device_kind} {device.id}"
    return _host_available()


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one batch size's runs; see the module docstring for the formula.

    Attributes:
      batch_size: the batch size.
      params, optimizer, step: per run: parameters, optimizer state, and the per-step and
        per-epoch buffers (gradients, updates, activations, permutation, evaluation, host
        copies).
      runtime, data, noise, sharpness: shared by the runs on one device.
      num_params: parameters of one run.
    """

    batch_size: int
    params: int
    optimizer: int
    step: int
    data: int
    noise: int
    sharpness: int
    num_params: int
    runtime: int = RUNTIME_BYTES

    @property
    def per_run(self) -> int:
        return self.params + self.optimizer + self.step

    @property
    def shared(self) -> int:
        return self.runtime + self.data + self.noise + self.sharpness

    def per_device(self, runs: int, devices: int = 1) -> int:
        """Bytes on the busiest device for `runs` runs over up to `devices` devices."""
        return runs_per_device(runs, devices) * self.per_run + self.shared

    def text(self, runs: int, devices: int = 1) -> str:
        """E.g. `12.3 GiB per device (per run: parameters 0.4 MiB, ...; shared: ...)`."""
        shared = [f"runtime {format_bytes(self.runtime)}", f"data {format_bytes(self.data)}"]
        if self.noise:
            shared.append(f"noise measurement {format_bytes(self.noise)}")
        if self.sharpness:
            shared.append(f"sharpness {format_bytes(self.sharpness)}")
        return (f"{format_bytes(self.per_device(runs, devices))} per device "
                f"({runs_per_device(runs, devices):,} runs x (parameters "
                f"{format_bytes(self.params)} + optimizer state {format_bytes(self.optimizer)} "
                f"+ step buffers {format_bytes(self.step)}) + {' + '.join(shared)})")


def runs_per_device(runs: int, devices: int) -> int:
    """Runs on the busiest device: the runs are split over the largest number of devices
    (at most `devices`) that divides them, as `batchjax.train.seed_shardings` does."""
    used = max(d for d in range(1, max(1, min(devices, runs)) + 1) if runs % d == 0)
    return -(-runs // used)


def _optimizer_state_bytes(config: TrainConfig, optimizer, params_shape) -> int:
    if optimizer is None:
        optimizer = make_optimizer(config)
    if optimizer is not None:
        try:
            return _tree_bytes(jax.eval_shape(optimizer.init, params_shape))
        except Exception:  # noqa: BLE001 - an optimizer eval_shape cannot trace
            pass
    return _STATE_PER_PARAM.get(config.optimizer, 2) * _tree_bytes(params_shape)


def estimate_memory(config: TrainConfig, dataset, *, model=None, optimizer=None,
                    noise: bool | None = None, sharpness_iters: int = 0,
                    platform: str | None = None) -> MemoryEstimate:
    """The memory of training runs of `config` (its batch size) on `dataset`; no computation.

    Args:
      config: the runs' configuration.
      dataset: a `batchjax.Dataset` (only shapes and sizes are read).
      model: the flax model (default: `MLP(config.hidden, dataset.num_classes)`).
      optimizer: an optax optimizer (default: the one `config.optimizer` names).
      noise: whether gradient noise is measured (default: `config.noise_schedule != "none"`).
      sharpness_iters: Lanczos iterations of the sharpness measurement (0: not measured).
      platform: the devices' platform (default: JAX's default backend); on "cpu" the host
        copies of the results count too.

    Returns:
      A `MemoryEstimate`.
    """
    model = model if model is not None else MLP(config.hidden, dataset.num_classes)
    x_1 = jax.ShapeDtypeStruct((1, *dataset.x_train.shape[1:]), dataset.x_train.dtype)
    params_shape = jax.eval_shape(lambda k, x: model.init(k, x)["params"],
                                  jax.random.key(0), x_1)
    _, state = jax.eval_shape(lambda p, x: model.apply({"params": p}, x,
                                                       capture_intermediates=True),
                              params_shape, x_1)
    act_bytes = _tree_bytes(state)  # bytes of every module output for one example
    params = _tree_bytes(params_shape)
    num_params = _tree_size(params_shape)
    x_bytes = int(np.prod(x_1.shape)) * np.dtype(x_1.dtype).itemsize
    n, b = dataset.num_train, config.batch_size
    steps = -(-n // b)
    step = (2 * params + b * (x_bytes + 3 * act_bytes) + n * 4 * 6 + steps * 8
            + min(n, EVAL_CHUNK) * act_bytes)
    platform = platform or jax.default_backend()
    if platform == "cpu":
        step += params + config.epochs * steps * 12
    data = sum(np.asarray(a).nbytes for a in (dataset.x_train, dataset.y_train,
                                              dataset.x_val, dataset.y_val))
    noise = config.noise_schedule != "none" if noise is None else noise
    noise_bytes = 0
    if noise:
        probe = min(config.probe_size or n, n)
        dense = isinstance(model, MLP)
        chunk = (NOISE_DENSE_CHUNK * (x_bytes + 3 * act_bytes) if dense
                 else NOISE_VMAP_CHUNK * 4 * num_params * 3)
        noise_bytes = probe * (x_bytes + 4) + chunk + 4 * params
    sharpness_bytes = 0
    if sharpness_iters:
        sharpness_bytes = SHARPNESS_CHUNK * (x_bytes + 3 * act_bytes) + 4 * params
        if platform == "cpu":
            sharpness_bytes += (sharpness_iters + 2) * num_params * 8
    optimizer_bytes = _optimizer_state_bytes(config, optimizer, params_shape)
    return MemoryEstimate(batch_size=b, params=params, optimizer=optimizer_bytes, step=step,
                          data=data, noise=noise_bytes, sharpness=sharpness_bytes,
                          num_params=num_params)


def plan_groups(estimate: MemoryEstimate, num_runs: int, *, limit: int, limit_source: str,
                devices: int = 1, group_size: int | None = None) -> int:
    """The number of runs to train together (one group) so that a group fits in `limit`.

    With `group_size` None: all `num_runs` if they fit, else the most that fit (a multiple of
    `devices` where possible). A given `group_size` is checked, not changed.

    Raises:
      BatchjaxError: the given `group_size` does not fit, or not even one run fits; the one
        line gives the estimate, the limit and the fix.
    """
    b = estimate.batch_size
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise BatchjaxError(f"group_size must be a positive integer or None, got "
                                f"{group_size!r}")
        group_size = min(group_size, num_runs)
    room = limit - estimate.shared
    most_per_device = room // estimate.per_run if room > 0 else 0
    if most_per_device < 1:
        raise BatchjaxError(
            f"batch size {b}: even one run needs an estimated {estimate.text(1, devices)}, "
            f"more than the limit of {format_bytes(limit)} ({limit_source}); use a smaller "
            "model, fewer training examples, or a device with more memory")
    most = min(num_runs, most_per_device * devices)
    if group_size is None:
        if runs_per_device(num_runs, devices) <= most_per_device:
            return num_runs
        return most - most % devices if most > devices else most
    if runs_per_device(group_size, devices) > most_per_device:
        raise BatchjaxError(
            f"batch size {b}: {group_size:,} runs trained together need an estimated "
            f"{estimate.text(group_size, devices)}, more than the limit of {format_bytes(limit)} "
            f"({limit_source}); set group_size to at most {most:,}, use fewer seeds, or more "
            "devices")
    return group_size


def split_groups(seeds: Sequence[int], group_size: int) -> list[list[int]]:
    """`seeds` in consecutive groups of at most `group_size`, as even as possible (groups of
    equal size compile once)."""
    seeds = list(seeds)
    if not seeds:
        return []
    count = -(-len(seeds) // group_size)
    size = -(-len(seeds) // count)
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def describe_groups(groups: Sequence[Sequence[int]]) -> str:
    """E.g. `11 groups of 9,091 (seeds 0..9090, ...)`."""
    if len(groups) == 1:
        return f"one group (seeds {abbreviate(groups[0])})"
    return f"{len(groups)} groups of up to {max(len(g) for g in groups):,} seeds"


def check_memory(config: TrainConfig, dataset, *, batch_sizes: Sequence[int], num_runs: int,
                 devices: Sequence[Any] | None = None, model=None, optimizer=None,
                 group_size: int | None = None, limit: str | int | None = None,
                 sharpness_iters: int = 0) -> tuple[dict[int, int], dict[int, MemoryEstimate],
                                                   tuple[int, str]]:
    """Group sizes per batch size for `num_runs` runs each, estimated before any work.

    Returns:
      ({batch_size: group size}, {batch_size: MemoryEstimate}, (limit bytes, its source)).

    Raises:
      BatchjaxError: a grid that cannot fit (see `plan_groups`).
    """
    devices = list(devices if devices is not None else jax.local_devices())
    limit_bytes, source = memory_limit(devices[0], limit)
    if "host memory" in source and len(devices) > 1:  # CPU devices share the host's memory
        limit_bytes //= len(devices)
        source += f", shared by {len(devices)} devices"
    sizes, estimates = {}, {}
    for b in batch_sizes:
        est = estimate_memory(dataclasses.replace(config, batch_size=b), dataset, model=model,
                              optimizer=optimizer, sharpness_iters=sharpness_iters,
                              platform=devices[0].platform)
        sizes[b] = plan_groups(est, num_runs, limit=limit_bytes, limit_source=source,
                               devices=len(devices), group_size=group_size)
        estimates[b] = est
    return sizes, estimates, (limit_bytes, source)

