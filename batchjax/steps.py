"""The jitted building blocks of training: one step, an epoch, a segment, evaluation.

`make_train_step` builds one optimizer step of any flax model (or `apply_fn`), optimizer and
per-example loss; `make_train_epoch` the whole epoch (the permutation of `epoch_permutation`, a
`lax.scan` over the full batches gathering each batch inside the scan, then the partial
batch); `make_train_segment` steps a..b of an epoch in a loop whose length is data, so one
compiled program runs segments of every length with the numbers of the whole-epoch scan;
`make_evaluate` the mean loss and accuracy over a split. None is jitted here: `batchjax.train`
vmaps them over runs and compiles them once (with `compiler_options`, placed by
`seed_shardings`).

The step's hyperparameters ride in `TrainState.hparams` (a named optimizer, built inside the
step by `batchjax.optim.resolve`, so they are traced values), or the step applies a given
`optax.GradientTransformation` as it is.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchjax import optim
from batchjax.config import TrainConfig
from batchjax.losses import LossFn, cross_entropy, model_apply_fn
from batchjax.model import MLP, Params, init_params


class TrainState(NamedTuple):
    """Everything a step changes or reads: parameters, optimizer state, hyperparameters.

    `hparams` are the named optimizer's traced hyperparameters (`optim.hyperparams`), or None
    for a given optax optimizer (whose hyperparameters are its own).
    """

    params: Params
    opt_state: Any
    hparams: Any = None


def _apply_fn(model) -> Callable:
    """`apply_fn(params, x_B)` of a flax module (one function object per module), or itself."""
    return model_apply_fn(model) if isinstance(model, nn.Module) else model


def init_train_state(config: TrainConfig, key: jax.Array, image_shape: Sequence[int],
                     num_classes: int = 10, *, model: nn.Module | None = None,
                     optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """Initial parameters from `key` and a fresh optimizer state.

    Defaults: the Glorot-initialised `MLP(config.hidden, num_classes)` and the named optimizer
    `config.optimizer` with its hyperparameters in `hparams`.
    """
    model = MLP(config.hidden, num_classes) if model is None else model
    params = init_params(model, key, tuple(image_shape))
    hparams = optim.hyperparams(config) if optimizer is None else None
    transform = optim.resolve(config.optimizer if optimizer is None else optimizer, hparams)
    return TrainState(params, transform.init(params), hparams)


def _count_correct(outputs, labels_B) -> jax.Array:
    """Examples whose largest output is their label (0 when labels are not class indices)."""
    if outputs.ndim == labels_B.ndim + 1 and jnp.issubdtype(labels_B.dtype, jnp.integer):
        return jnp.sum(jnp.argmax(outputs, axis=-1) == labels_B)
    return jnp.zeros([], jnp.int32)


def make_train_step(model, optimizer: str | optax.GradientTransformation,
                    loss_fn: LossFn | None = None) -> Callable:
    """`train_step(state, x_B, y_B) -> (state, (loss, correct))`: one optimizer step.

    Args:
      model: a flax module, or `apply_fn(params, x_B) -> outputs_B`.
      optimizer: an `optax.GradientTransformation`, or the name of one of `batchjax.optim`
        (built from `state.hparams` inside the step, so its hyperparameters are traced).
      loss_fn: per-example `loss_fn(outputs_B, labels_B) -> losses_B`; default cross-entropy.

    The loss is the batch mean before the update, as Keras reports it. Wrap in `jax.jit` to
    call it on its own; the epoch function inlines it into its scan.
    """
    apply_fn = _apply_fn(model)
    loss_fn = cross_entropy if loss_fn is None else loss_fn

    def loss_and_correct(params, x_B, y_B):
        outputs = apply_fn(params, x_B)
        return jnp.mean(loss_fn(outputs, y_B)), _count_correct(outputs, y_B)

    grad_fn = jax.value_and_grad(loss_and_correct, has_aux=True)

    def train_step(state: TrainState, x_B, y_B):
        (loss, correct), grads = grad_fn(state.params, x_B, y_B)
        transform = optim.resolve(optimizer, state.hparams)
        updates, opt_state = transform.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.hparams), (loss, correct)

    return train_step


class EpochMetrics(NamedTuple):
    """Per-step outputs of an epoch: loss before each update, correct predictions per batch."""

    losses: jax.Array  # [steps] float32
    correct: jax.Array  # [steps] int32


def epoch_batch_sizes(num_train: int, batch_size: int) -> np.ndarray:
    """The size of every batch of an epoch: full batches, then the partial one if any."""
    sizes = [batch_size] * (num_train // batch_size)
    if num_train % batch_size:
        sizes.append(num_train % batch_size)
    return np.asarray(sizes, np.int64)


def make_train_steps(model, optimizer, unroll: int = 1, *, loss_fn: LossFn | None = None,
                     train_step: Callable | None = None) -> Callable:
    """`train_steps(state, x_N, y_N, idx_SxB) -> (state, EpochMetrics)`: S steps in one scan.

    Step s trains on the examples `idx_SxB[s]`, gathered from the device-resident data inside
    the loop (measured faster than building a shuffled copy of the data first). Every batch
    has the same size; `train_step(state, x_B, y_B) -> (state, (loss, correct))` replaces the
    step of `model`, `optimizer` and `loss_fn` when given.
    """
    if train_step is None:
        train_step = make_train_step(model, optimizer, loss_fn)

    def train_steps(state: TrainState, x, y, idx_SxB):
        def body(state, idx_B):
            return train_step(state, jnp.take(x, idx_B, axis=0), jnp.take(y, idx_B, axis=0))

        state, (losses, correct) = jax.lax.scan(body, state, idx_SxB, unroll=unroll)
        return state, EpochMetrics(losses, correct)

    return train_steps


def _stable_sort_values(keys_N: jax.Array, values_N: jax.Array) -> jax.Array:
    """`lax.sort_key_val(keys_N, values_N)[1]` (a stable sort) for integer keys, faster on CPU.

    XLA:CPU sorts a single array of integers several times faster than (key, value) pairs,
    which go through a generic comparator (60,000 pairs: 12 ms; the keys alone: 2 ms). So:
    sort the keys alone, find each key's first slot in the sorted keys by binary search, and
    place equal keys in slots by their original order (a scatter-min per round; one round
    when all keys differ, which is almost always the case for random 32-bit keys).
    """
    n = keys_N.shape[0]
    sorted_N = jnp.sort(keys_N)
    slot_N = jnp.searchsorted(sorted_N, keys_N, side="left",
                              method="scan_unrolled").astype(jnp.int32)
    index_N = jnp.arange(n, dtype=jnp.int32)

    def place_ties(carry):
        slot_N, placed_N = carry
        # Among the unplaced examples aiming at a slot, the one with the smallest index
        # takes it; the others move on to the next slot of their run of equal keys.
        claim_N = jnp.full((n,), n, jnp.int32).at[slot_N].min(jnp.where(placed_N, n, index_N))
        won_N = ~placed_N & (claim_N[slot_N] == index_N)
        return jnp.where(placed_N | won_N, slot_N, slot_N + 1), placed_N | won_N

    slot_N, _ = jax.lax.while_loop(lambda carry: ~jnp.all(carry[1]), place_ties,
                                   (slot_N, jnp.zeros((n,), bool)))
    return jnp.zeros_like(values_N).at[slot_N].set(values_N, unique_indices=True)


def epoch_permutation(key: jax.Array, num_train: int) -> jax.Array:
    """The order in which an epoch visits the examples: a permutation drawn from `key`.

    Equal to `jax.random.permutation(key, num_train)` (the same rounds of stable sorts by
    random 32-bit keys, as `jax.random` draws them; tested element for element), in a sixth
    of the time on CPU (60,000 examples: 4.3 instead of 25 ms): see `_stable_sort_values`.
    """
    num_rounds = int(np.ceil(3 * np.log(max(1, num_train)) / np.log(np.iinfo(np.uint32).max)))
    perm_N = jnp.arange(num_train)
    for _ in range(num_rounds):
        key, subkey = jax.random.split(key)
        perm_N = _stable_sort_values(jax.random.bits(subkey, (num_train,), jnp.uint32), perm_N)
    return perm_N


def make_train_epoch(model, optimizer, num_train: int, batch_size: int, unroll: int = 1, *,
                     loss_fn: LossFn | None = None,
                     train_step: Callable | None = None) -> Callable:
    """`train_epoch(state, x_N, y_N, key) -> (state, EpochMetrics)`: one epoch, one function.

    The permutation of the N examples from `key` (`epoch_permutation`); a `lax.scan` over the
    N // B full batches (`make_train_steps`); then one step on the N % B remaining examples
    when there are any. Not jitted here, so callers may `jax.vmap` it over runs before
    `jax.jit`. `train_step(state, x_B, y_B) -> (state, (loss, correct))` replaces the step of
    `model`, `optimizer` and `loss_fn` when given.
    """
    if train_step is None:
        train_step = make_train_step(model, optimizer, loss_fn)
    train_steps = make_train_steps(None, None, unroll, train_step=train_step)
    num_full = num_train // batch_size
    remainder = num_train % batch_size

    def train_epoch(state: TrainState, x, y, key):
        perm = epoch_permutation(key, num_train)
        idx_SxB = perm[: num_full * batch_size].reshape(num_full, batch_size)
        state, metrics = train_steps(state, x, y, idx_SxB)
        if remainder:
            idx_R = perm[num_full * batch_size:]
            state, (loss_r, correct_r) = train_step(state, x[idx_R], y[idx_R])
            metrics = EpochMetrics(jnp.concatenate([metrics.losses, loss_r[None]]),
                                   jnp.concatenate([metrics.correct, correct_r[None]]))
        return state, metrics

    return train_epoch


def make_train_segment(train_step: Callable, num_train: int, batch_size: int) -> Callable:
    """`segment(state, metrics, x_N, y_N, perm_N, start, stop) -> (state, metrics)`.

    Steps `start`..`stop - 1` of the epoch that visits the examples in the order `perm_N`:
    the steps of `make_train_epoch` with that permutation, in a loop whose length is data
    (`lax.fori_loop` with traced bounds), so one compiled program runs segments of every
    length (without `unroll`: the trip count is data). Step s writes its loss and correct
    count into entry s of the `metrics` buffers (length: the epoch's steps); the partial last
    batch is step N // B, run when `stop` passes it.
    """
    num_full, remainder = divmod(num_train, batch_size)

    def segment(state: TrainState, metrics: EpochMetrics, x, y, perm_N, start, stop):
        def body(s, carry):
            state, losses, correct = carry
            idx_B = jax.lax.dynamic_slice_in_dim(perm_N, s * batch_size, batch_size)
            state, (loss, c) = train_step(state, jnp.take(x, idx_B, axis=0),
                                          jnp.take(y, idx_B, axis=0))
            return (state, jax.lax.dynamic_update_index_in_dim(losses, loss, s, 0),
                    jax.lax.dynamic_update_index_in_dim(correct, c, s, 0))

        carry = jax.lax.fori_loop(start, jnp.minimum(stop, num_full), body, (state, *metrics))
        if remainder:
            def last(carry):
                state, losses, correct = carry
                idx_R = perm_N[num_full * batch_size:]
                state, (loss, c) = train_step(state, x[idx_R], y[idx_R])
                return state, losses.at[num_full].set(loss), correct.at[num_full].set(c)

            carry = jax.lax.cond(stop > num_full, last, lambda carry: carry, carry)
        state, losses, correct = carry
        return state, EpochMetrics(losses, correct)

    return segment


def make_evaluate(model, loss_fn: LossFn | None = None, chunk_size: int = 10_000) -> Callable:
    """`evaluate(params, x_N, y_N) -> (mean loss, accuracy)` over all N examples, in chunks.

    Args:
      model: a flax module, or `apply_fn(params, x_B) -> outputs_B`.
      loss_fn: per-example `loss_fn(outputs_B, labels_B) -> losses_B`; default cross-entropy.
      chunk_size: examples per forward pass; bounds the memory of the outputs.

    The result is the exact mean over examples, whatever the chunk size.
    """
    apply_fn = _apply_fn(model)
    loss_fn = cross_entropy if loss_fn is None else loss_fn

    def sums(params, x, y):
        outputs = apply_fn(params, x)
        return (jnp.sum(loss_fn(outputs, y)),
                _count_correct(outputs, y).astype(jnp.float32))

    def evaluate(params, x, y):
        n = x.shape[0]
        num_full, tail = divmod(n, chunk_size)
        loss_sum = jnp.zeros([], jnp.float32)
        correct = jnp.zeros([], jnp.float32)
        if num_full:
            xs = x[: num_full * chunk_size].reshape(num_full, chunk_size, *x.shape[1:])
            ys = y[: num_full * chunk_size].reshape(num_full, chunk_size, *y.shape[1:])

            def body(carry, xy):
                s, c = sums(params, *xy)
                return (carry[0] + s, carry[1] + c), None

            (loss_sum, correct), _ = jax.lax.scan(body, (loss_sum, correct), (xs, ys))
        if tail:
            s, c = sums(params, x[num_full * chunk_size:], y[num_full * chunk_size:])
            loss_sum, correct = loss_sum + s, correct + c
        return loss_sum / n, correct / n

    return evaluate


def compiler_options(devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """XLA options for the training executables on the platform of `devices` (default: local).

    On CPU: the memory-optimized instruction scheduler. The default (concurrency-optimized)
    order lets the thunk executor hand independent kernels of one step to different threads;
    at small batches each hand-off costs more than the kernel (2 cores, 60,000 examples: B = 8
    epoch 0.60-0.70 s instead of 0.72-0.75 s, depending on the machine's load; B = 32 0.28
    instead of 0.31 s; no change at B = 128). Scheduling orders the same kernels differently;
    it changes no arithmetic. Elsewhere: none.
    """
    devices = list(devices if devices is not None else jax.local_devices())
    if devices[0].platform == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return {}


def seed_shardings(num_runs: int, devices: Sequence[jax.Device] | None = None):
    """Shardings that split a leading run axis across devices and replicate the data.

    Uses the largest number of `devices` (default: this process's local devices; in a
    multi-host job each host trains its own runs) that divides `num_runs`, so every device
    trains whole runs and no communication is needed; one device (or one run) gives plain
    single-device placement. Returns `(run_sharding, replicated)`.
    """
    devices = list(devices if devices is not None else jax.local_devices())
    count = max(d for d in range(1, len(devices) + 1) if num_runs % d == 0)
    if count == 1 or num_runs == 1:
        single = jax.sharding.SingleDeviceSharding(devices[0])
        return single, single
    mesh = jax.sharding.Mesh(np.asarray(devices[:count]), ("seed",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
