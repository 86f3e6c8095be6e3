"""Training: loss, Keras' Adam, a jitted train step, a whole epoch as one `lax.scan`, evaluation.

Semantics follow Keras `model.fit` on the original recipe:
  * loss: softmax cross-entropy on integer labels, mean over the batch; metric: accuracy;
  * Adam with Keras' update rule and defaults (lr 1e-3, b1 0.9, b2 0.999, eps 1e-7);
  * an epoch reshuffles the training set and visits every example exactly once; the partial
    last batch is a step of its own (its loss is the mean over its real examples), never dropped;
  * the epoch's training loss and accuracy are means over the epoch's examples as seen during
    training (each batch weighted by its size, as Keras 3's loss tracker does); validation is
    evaluated with the parameters at the end of the epoch.

jit boundaries: `make_train_step` builds one optimizer step; `make_train_epoch` builds the whole
epoch (permutation, a scan over full batches gathering each batch inside the scan, then the
partial batch), compiled once per batch size. The dataset is passed as an argument (closed-over
arrays would be baked into the executable as constants). Several seeds train together by
`jax.vmap` over the state and the shuffle key; the data is shared. On CPU the executables are
compiled with `compiler_options` (an instruction schedule that suits small steps; it changes no
number).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.model import MLP, Params, init_params

# --------------------------------------------------------------------------------------------
# Loss and optimizer


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy on integer labels, from logits (shape [B])."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)


def loss_and_correct(params: Params, model: MLP, x: jax.Array, y: jax.Array):
    """Mean loss over the batch and, as auxiliary output, the number of correct predictions."""
    logits = model.apply({"params": params}, x)
    loss = jnp.mean(cross_entropy(logits, y))
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
    return loss, correct


class ScaleByKerasAdamState(NamedTuple):
    count: jax.Array
    mu: Params
    nu: Params


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-7) -> optax.GradientTransformation:
    """Adam's direction as Keras computes it: alpha_t * m_t / (sqrt(v_t) + eps).

    alpha_t = sqrt(1 - b2^t) / (1 - b1^t). This equals optax's m_hat / (sqrt(v_hat) + eps_t)
    with eps_t = eps / sqrt(1 - b2^t): Keras adds epsilon before the bias correction, optax
    after it, so the two differ most in the first steps (eps_1 is 32x eps).
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return ScaleByKerasAdamState(jnp.zeros([], jnp.int32),
                                     jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, updates)
        t = count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: alpha * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, ScaleByKerasAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optimizer of `config`, at its effective (possibly batch-size-scaled) learning rate."""
    lr = config.effective_learning_rate
    if config.optimizer == "adam":
        return optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps)
    return optax.chain(scale_by_keras_adam(config.b1, config.b2, config.eps), optax.scale(-lr))


# --------------------------------------------------------------------------------------------
# Jitted building blocks


class TrainState(NamedTuple):
    """Everything a step changes: parameters and optimizer state (a pytree)."""

    params: Params
    opt_state: Any


def init_train_state(config: TrainConfig, key: jax.Array, image_shape: Sequence[int],
                     num_classes: int = 10) -> TrainState:
    """Glorot-initialised parameters from `key` and a fresh optimizer state."""
    params = init_params(MLP(config.hidden, num_classes), key, tuple(image_shape))
    return TrainState(params, make_optimizer(config).init(params))


def make_train_step(model: MLP, optimizer: optax.GradientTransformation) -> Callable:
    """`train_step(state, x_B, y_B) -> (state, (loss, correct))`: one Adam step on one batch.

    The loss is the batch mean before the update, as Keras reports it. Wrap in `jax.jit` to
    call it on its own; the epoch function inlines it into its scan.
    """
    grad_fn = jax.value_and_grad(loss_and_correct, has_aux=True)

    def train_step(state: TrainState, x_B, y_B):
        (loss, correct), grads = grad_fn(state.params, model, x_B, y_B)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), (loss, correct)

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


def make_train_steps(model: MLP | None, optimizer: optax.GradientTransformation | None,
                     unroll: int = 1, *, train_step: Callable | None = None) -> Callable:
    """`train_steps(state, x_N, y_N, idx_SxB) -> (state, EpochMetrics)`: S steps in one scan.

    Step s trains on the examples `idx_SxB[s]`, gathered from the device-resident data inside
    the loop (measured faster than building a shuffled copy of the data first). Every batch
    has the same size; `train_step(state, x_B, y_B) -> (state, (loss, correct))` replaces the
    Adam step of `model` and `optimizer` when given.
    """
    if train_step is None:
        train_step = make_train_step(model, optimizer)

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


def make_train_epoch(model: MLP | None, optimizer: optax.GradientTransformation | None,
                     num_train: int, batch_size: int, unroll: int = 1, *,
                     train_step: Callable | None = None) -> Callable:
    """`train_epoch(state, x_N, y_N, key) -> (state, EpochMetrics)`: one epoch, one function.

    The permutation of the N examples from `key` (`epoch_permutation`); a `lax.scan` over the
    N // B full batches (`make_train_steps`); then one step on the N % B remaining examples
    when there are any. Not jitted here, so callers may `jax.vmap` it over seeds before
    `jax.jit`. `train_step(state, x_B, y_B) -> (state, (loss, correct))` replaces the Adam
    step of `model` and `optimizer` when given.
    """
    if train_step is None:
        train_step = make_train_step(model, optimizer)
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


def measurement_steps(config: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Global steps after which the noise statistics are measured (0: before the first step).

    "epoch": 0 and every epoch end. "log": 0, `noise_points` steps log-spaced between 1 and the
    last step (rounded, duplicates merged), and every epoch end, so per-epoch records exist
    under either schedule. "none": no measurements.
    """
    total = config.epochs * steps_per_epoch
    if config.noise_schedule == "none":
        return []
    steps = {0, *(e * steps_per_epoch for e in range(1, config.epochs + 1))}
    if config.noise_schedule == "log":
        steps |= {int(round(s)) for s in np.geomspace(1, total, config.noise_points)}
    return sorted(steps)


def make_evaluate(model: MLP, chunk_size: int = 10_000) -> Callable:
    """`evaluate(params, x_N, y_N) -> (mean loss, accuracy)` over all N examples, in chunks.

    Chunks bound the memory of the logits; the result is the exact mean over examples.
    """

    def sums(params, x, y):
        logits = model.apply({"params": params}, x)
        return (jnp.sum(cross_entropy(logits, y)),
                jnp.sum(jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))

    def evaluate(params, x, y):
        n = x.shape[0]
        num_full, tail = divmod(n, chunk_size)
        loss_sum = jnp.zeros([], jnp.float32)
        correct = jnp.zeros([], jnp.float32)
        if num_full:
            xs = x[: num_full * chunk_size].reshape(num_full, chunk_size, *x.shape[1:])
            ys = y[: num_full * chunk_size].reshape(num_full, chunk_size)

            def body(carry, xy):
                s, c = sums(params, *xy)
                return (carry[0] + s, carry[1] + c), None

            (loss_sum, correct), _ = jax.lax.scan(body, (loss_sum, correct), (xs, ys))
        if tail:
            s, c = sums(params, x[num_full * chunk_size:], y[num_full * chunk_size:])
            loss_sum, correct = loss_sum + s, correct + c
        return loss_sum / n, correct / n

    return evaluate


# --------------------------------------------------------------------------------------------
# The training loop


@dataclasses.dataclass
class TrainResult:
    """What one run produced. Arrays are NumPy; `history` has one entry per finished epoch.

    Attributes:
      config: the run's configuration.
      dataset: `Dataset.describe()` of the data it trained on.
      step_losses: the raw training loss of every optimizer step (not running means).
      step_batch_sizes: the size of every step's batch (the last of an epoch may be partial).
      history: per-epoch lists: epoch, train_loss, train_accuracy, val_loss, val_accuracy,
        train_seconds, eval_seconds, steps (cumulative), examples_seen (cumulative).
      compile_seconds: one-off compilation time, not included in the epoch times.
      params: final parameters.
      noise: gradient-noise records (see `batchjax.noise`), each with its step.
      status: "complete", or "diverged" when the loss became NaN or infinite.
      diverged_step: the first step (0-based, global) whose loss was not finite.
    """

    config: TrainConfig
    dataset: dict
    step_losses: np.ndarray
    step_batch_sizes: np.ndarray
    history: dict[str, list]
    compile_seconds: float
    params: Params
    noise: list[dict] = dataclasses.field(default_factory=list)
    status: str = "complete"
    diverged_step: int | None = None


HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                "train_seconds", "eval_seconds", "steps", "examples_seen")


def format_epoch(epoch: int, epochs: int, history: dict[str, list], i: int = -1) -> str:
    """A Keras-like line for one finished epoch."""
    h = {k: v[i] for k, v in history.items()}
    return (f"Epoch {epoch}/{epochs} - {h['train_seconds'] + h['eval_seconds']:.2f}s"
            f" - loss: {h['train_loss']:.4f} - accuracy: {h['train_accuracy']:.4f}"
            f" - val_loss: {h['val_loss']:.4f} - val_accuracy: {h['val_accuracy']:.4f}")


def check_batch_size(batch_size: int, num_train: int) -> None:
    if batch_size > num_train:
        raise BatchjaxError(f"batch_size {batch_size} is larger than the training set "
                            f"({num_train} examples); choose a batch size <= {num_train}")


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


def seed_shardings(num_seeds: int, devices: Sequence[jax.Device] | None = None):
    """Shardings that split a leading seed axis across devices and replicate the data.

    Uses the largest number of `devices` (default: this process's local devices; in a
    multi-host job each host trains its own runs) that divides `num_seeds`, so
    every device trains whole seeds and no communication is needed; one device (or one seed)
    gives plain single-device placement. Returns `(seed_sharding, replicated)`.
    """
    devices = list(devices if devices is not None else jax.local_devices())
    count = max(d for d in range(1, len(devices) + 1) if num_seeds % d == 0)
    if count == 1 or num_seeds == 1:
        single = jax.sharding.SingleDeviceSharding(devices[0])
        return single, single
    mesh = jax.sharding.Mesh(np.asarray(devices[:count]), ("seed",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def train_seeds(config: TrainConfig, dataset, seeds: Sequence[int], *,
                verbose: bool = False, devices: Sequence[jax.Device] | None = None,
                on_epoch_end: Callable[[int, list[TrainResult]], None] | None = None,
                measure: Callable | None | str = "default") -> list[TrainResult]:
    """Train one run per seed of `config` on `dataset`, the seeds `jax.vmap`ped together.

    Each seed's numbers equal those of `train(dataclasses.replace(config, seed=s), dataset)`
    up to float rounding of the batched matmuls. With one seed nothing is vmapped.

    Args:
      config: the run configuration; its `seed` field is replaced by each of `seeds`.
      dataset: a `batchjax.Dataset`.
      seeds: distinct non-negative seeds.
      verbose: print a Keras-like line per epoch (the first seed's numbers).
      devices: devices to spread the seeds over (default: the local ones; `seed_shardings`).
      on_epoch_end: called as `on_epoch_end(epoch, results)` after each epoch (1-based).
      measure: `measure(params_list, step, examples_seen) -> list[list[dict]]` (one list of
        records per seed), or None for no measurements. The default, "default", is
        `batchjax.noise.make_measure` at the run's own batch size when `config.noise_schedule`
        is not "none". It is called after the steps of `measurement_steps(config, ...)`
        (before the first step and at every epoch end; also at log-spaced steps inside epochs
        for `noise_schedule="log"`); the records are appended to each run's `noise`. Its time
        is not counted in `train_seconds`.

    Returns:
      One `TrainResult` per seed, in the order of `seeds`.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise BatchjaxError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    configs = [dataclasses.replace(config, seed=s) for s in seeds]  # validates each seed
    num_train = dataset.num_train
    check_batch_size(config.batch_size, num_train)
    if isinstance(measure, str):
        if measure != "default":
            raise BatchjaxError(f"measure must be a callable, None or 'default', got {measure!r}")
        measure = None
        if config.noise_schedule != "none":
            from batchjax.noise import make_measure  # noise builds on this module
            measure = make_measure(dataset, config, batch_sizes=[config.batch_size], seeds=seeds)
    model = MLP(config.hidden, dataset.num_classes)
    optimizer = make_optimizer(config)
    image_shape = dataset.x_train.shape[1:]

    def init_one(key):
        params = init_params(model, jax.random.fold_in(key, 0), image_shape)
        return TrainState(params, optimizer.init(params))

    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
    epoch_fn = make_train_epoch(model, optimizer, num_train, config.batch_size, config.unroll)
    steps_fn = make_train_steps(model, optimizer, config.unroll)
    evaluate = make_evaluate(model)
    perm_fn = functools.partial(epoch_permutation, num_train=num_train)
    if len(seeds) == 1:
        state = init_one(jax.random.wrap_key_data(keys[0]))
        vmap_seeds = lambda fn, in_axes: fn  # noqa: E731
        unstack = lambda tree: [tree]  # noqa: E731
    else:
        state = jax.vmap(lambda k: init_one(jax.random.wrap_key_data(k)))(keys)
        vmap_seeds = jax.vmap
        unstack = lambda tree: [jax.tree.map(lambda a, i=i: a[i], tree)  # noqa: E731
                                for i in range(len(seeds))]
    options = compiler_options(devices)
    epoch_jit = jax.jit(vmap_seeds(epoch_fn, in_axes=(0, None, None, 0)), donate_argnums=0,
                        compiler_options=options)
    steps_jit = jax.jit(vmap_seeds(steps_fn, in_axes=(0, None, None, 0)), donate_argnums=0,
                        compiler_options=options)
    perm_jit = jax.jit(vmap_seeds(perm_fn, in_axes=0))
    seed_sharding, replicated = seed_shardings(len(seeds), devices)
    if len(seeds) > 1 and isinstance(seed_sharding, jax.sharding.SingleDeviceSharding):
        # One seed after another: on one device S plain [N, D] x [D, H] products beat one
        # batched [S, N, D] x [S, D, H] (CPU, S = 4, B = 128: 11 vs 16 ms per seed-epoch).
        eval_jit = jax.jit(lambda params, x, y: jax.lax.map(lambda p: evaluate(p, x, y), params))
    else:
        eval_jit = jax.jit(vmap_seeds(evaluate, in_axes=(0, None, None)))

    state = jax.device_put(state, seed_sharding)
    x_train, y_train = jax.device_put((dataset.x_train, dataset.y_train), replicated)
    x_val, y_val = jax.device_put((dataset.x_val, dataset.y_val), replicated)

    def epoch_keys(epoch):
        k = jnp.stack([jax.random.key_data(jax.random.fold_in(
            jax.random.fold_in(jax.random.wrap_key_data(k), 1), epoch)) for k in keys])
        k = jax.device_put(jax.random.wrap_key_data(k), seed_sharding)
        return k[0] if len(seeds) == 1 else k

    t0 = time.perf_counter()
    epoch_exec = epoch_jit.lower(state, x_train, y_train, epoch_keys(0)).compile()
    eval_exec = eval_jit.lower(state.params, x_val, y_val).compile()
    compile_seconds = time.perf_counter() - t0

    batch_sizes = epoch_batch_sizes(num_train, config.batch_size)
    steps_per_epoch = len(batch_sizes)
    results = [TrainResult(config=c, dataset=dataset.describe(), step_losses=np.zeros(0, np.float32),
                           step_batch_sizes=np.zeros(0, np.int64),
                           history={k: [] for k in HISTORY_KEYS},
                           compile_seconds=compile_seconds, params=None) for c in configs]
    losses_per_seed: list[list[np.ndarray]] = [[] for _ in seeds]
    active = list(range(len(seeds)))

    def record_noise(params, step, examples_seen):
        for i, records in enumerate(measure(unstack(params), step, examples_seen)):
            if i in active:
                results[i].noise.extend(records)

    schedule = measurement_steps(config, steps_per_epoch) if measure is not None else []
    batch_size, num_full = config.batch_size, num_train // config.batch_size

    def run_segmented_epoch(state, epoch, cuts):
        """The epoch in `lax.scan` segments, measuring after the local steps in `cuts`.

        The same permutation and steps as `epoch_exec`, hence the same numbers; each distinct
        segment length compiles once. Returns the state, metrics and seconds spent measuring.
        """
        perm = perm_jit(epoch_keys(epoch))
        lead = perm.shape[:-1]
        parts, measure_seconds = [], 0.0
        for a, b in zip([0, *cuts], [*cuts, steps_per_epoch]):
            if min(b, num_full) > a:
                idx = perm[..., a * batch_size:min(b, num_full) * batch_size]
                state, m = steps_jit(state, x_train, y_train,
                                     idx.reshape(*lead, min(b, num_full) - a, batch_size))
                parts.append(m)
            if b > num_full:  # the partial last batch: a one-step segment of its own size
                idx = perm[..., num_full * batch_size:]
                state, m = steps_jit(state, x_train, y_train, idx.reshape(*lead, 1, -1))
                parts.append(m)
            if b < steps_per_epoch:
                tm = time.perf_counter()
                record_noise(state.params, epoch * steps_per_epoch + b,
                             epoch * num_train + b * batch_size)
                measure_seconds += time.perf_counter() - tm
        metrics = EpochMetrics(*(jnp.concatenate([getattr(m, f) for m in parts], axis=-1)
                                 for f in EpochMetrics._fields))
        return state, metrics, measure_seconds

    if measure is not None:
        record_noise(state.params, 0, 0)
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        cuts = [s - epoch * steps_per_epoch for s in schedule
                if epoch * steps_per_epoch < s < (epoch + 1) * steps_per_epoch]
        if cuts:
            state, metrics, measure_seconds = run_segmented_epoch(state, epoch, cuts)
        else:
            state, metrics = epoch_exec(state, x_train, y_train, epoch_keys(epoch))
            measure_seconds = 0.0
        losses = np.asarray(metrics.losses).reshape(len(seeds), steps_per_epoch)
        correct = np.asarray(metrics.correct).reshape(len(seeds), steps_per_epoch)
        t1 = time.perf_counter()
        val_loss, val_acc = eval_exec(state.params, x_val, y_val)
        val_loss = np.asarray(val_loss).reshape(len(seeds))
        val_acc = np.asarray(val_acc).reshape(len(seeds))
        t2 = time.perf_counter()
        for i in list(active):
            r = results[i]
            finite = np.isfinite(losses[i])
            if not finite.all():
                first = int(np.argmin(finite))
                losses_per_seed[i].append(losses[i][:first + 1])
                r.status, r.diverged_step = "diverged", epoch * steps_per_epoch + first
                r.step_batch_sizes = np.concatenate([r.step_batch_sizes, batch_sizes[:first + 1]])
                active.remove(i)
                continue
            losses_per_seed[i].append(losses[i])
            r.step_batch_sizes = np.concatenate([r.step_batch_sizes, batch_sizes])
            h = r.history
            h["epoch"].append(epoch + 1)
            h["train_loss"].append(float(np.dot(losses[i], batch_sizes) / num_train))
            h["train_accuracy"].append(float(correct[i].sum() / num_train))
            h["val_loss"].append(float(val_loss[i]))
            h["val_accuracy"].append(float(val_acc[i]))
            h["train_seconds"].append(t1 - t0 - measure_seconds)
            h["eval_seconds"].append(t2 - t1)
            h["steps"].append((epoch + 1) * steps_per_epoch)
            h["examples_seen"].append((epoch + 1) * num_train)
        if verbose and 0 in active:
            print(format_epoch(epoch + 1, config.epochs, results[0].history), file=sys.stderr)
        if measure is not None and active:
            record_noise(state.params, (epoch + 1) * steps_per_epoch, (epoch + 1) * num_train)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, results)
        if not active:
            break

    final_params = unstack(jax.tree.map(np.asarray, state.params))
    for i, r in enumerate(results):
        r.step_losses = np.concatenate(losses_per_seed[i]) if losses_per_seed[i] else r.step_losses
        r.params = final_params[i]
    return results


def train(config: TrainConfig, dataset, **kwargs) -> TrainResult:
    """Train one run of `config` on `dataset` (a `batchjax.Dataset`); see `train_seeds`."""
    return train_seeds(config, dataset, [config.seed], **kwargs)[0]
