"""Training against independent references: NumPy loss, a Python loop of steps, NumPy means;
segmented epochs against whole ones; and a pin of the default run's numbers (see there)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batchjax import BatchjaxError, TrainConfig, train, train_seeds
from batchjax.data import load_dataset, make_synthetic
from batchjax.model import MLP, init_params
from batchjax.train import (Interrupted, clear_compiled, compiler_options, cross_entropy,
                            epoch_batch_sizes, epoch_permutation, init_train_state,
                            make_evaluate, make_optimizer, make_train_epoch, make_train_step,
                            train_runs)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(num_train=203, num_val=50, seed=3)


def numpy_cross_entropy(logits, labels):
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), labels]


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, (64, 10)).astype(np.float32)
    logits[0, 3] = 80.0  # far from zero: a naive softmax overflows
    labels = rng.integers(0, 10, 64)
    np.testing.assert_allclose(np.asarray(cross_entropy(logits, labels)),
                               numpy_cross_entropy(logits, labels), rtol=1e-5, atol=1e-5)


def test_scan_epoch_equals_python_loop_of_steps(small):
    cfg = TrainConfig(batch_size=32, hidden=16)
    model, opt = MLP(16, 10), make_optimizer(cfg)
    state0 = init_train_state(cfg, jax.random.key(0), (28, 28))
    key = jax.random.key(7)
    epoch = jax.jit(make_train_epoch(model, opt, small.num_train, 32))
    state, metrics = epoch(state0, small.x_train, small.y_train, key)

    # Reference: the documented schedule (the permutation of `key`, full batches, then the rest),
    # each batch one jitted step called from Python.
    step = jax.jit(make_train_step(model, opt))
    perm = np.asarray(jax.random.permutation(key, small.num_train))
    ref_state, ref_losses = state0, []
    for start in range(0, small.num_train, 32):
        idx = perm[start:start + 32]
        ref_state, (loss, _) = step(ref_state, small.x_train[idx], small.y_train[idx])
        ref_losses.append(float(loss))
    assert len(ref_losses) == 7  # 6 full batches of 32 and one of 11
    np.testing.assert_allclose(np.asarray(metrics.losses), ref_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state.params, ref_state.params)


@pytest.mark.parametrize("num_train", [1, 2, 7, 203, 4000, 60000])
def test_epoch_permutation_is_jax_random_permutation(num_train):
    # The same permutation as jax.random.permutation, element for element: typed and raw keys,
    # jitted and vmapped over seeds (as train_seeds calls it).
    keys = [jax.random.key(s) for s in range(3)]
    perm = jax.jit(epoch_permutation, static_argnums=1)
    for key in keys:
        np.testing.assert_array_equal(perm(key, num_train), jax.random.permutation(key, num_train))
    raw = jax.random.PRNGKey(11)
    np.testing.assert_array_equal(epoch_permutation(raw, num_train),
                                  jax.random.permutation(raw, num_train))
    batched = jax.jit(jax.vmap(lambda k: epoch_permutation(k, num_train)))(jnp.stack(keys))
    for key, row in zip(keys, np.asarray(batched)):
        np.testing.assert_array_equal(row, jax.random.permutation(key, num_train))


@pytest.mark.parametrize("num_keys,key_range", [(1000, 7), (1000, 1000), (257, 2), (64, 2**32)])
def test_stable_sort_with_ties_matches_numpy_stable_argsort(num_keys, key_range):
    # Random 32-bit keys almost never tie; these do, in runs of up to ~150 equal keys.
    from batchjax.steps import _stable_sort_values
    rng = np.random.default_rng(num_keys + key_range)
    keys = rng.integers(0, key_range, num_keys, dtype=np.uint64).astype(np.uint32)
    values = rng.permutation(num_keys).astype(np.int32)
    expected = values[np.argsort(keys, kind="stable")]
    np.testing.assert_array_equal(jax.jit(_stable_sort_values)(keys, values), expected)
    batched = jax.jit(jax.vmap(_stable_sort_values))(np.stack([keys, keys[::-1]]),
                                                       np.stack([values, values]))
    np.testing.assert_array_equal(batched[0], expected)
    np.testing.assert_array_equal(batched[1], values[np.argsort(keys[::-1], kind="stable")])


def test_cpu_compiler_options_change_no_number(small):
    # The CPU scheduling option reorders kernels; the epoch must come out bit for bit the same.
    assert compiler_options(jax.devices("cpu")) == {
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    cfg = TrainConfig(batch_size=8, hidden=16)
    epoch = make_train_epoch(MLP(16, 10), make_optimizer(cfg), small.num_train, 8)
    state0 = init_train_state(cfg, jax.random.key(0), (28, 28))
    outs = [jax.jit(epoch, compiler_options=opts)(state0, small.x_train, small.y_train,
                                                 jax.random.key(1))
            for opts in ({}, compiler_options())]
    jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])


@pytest.mark.parametrize("num_train,batch_size", [(103, 10), (64, 8), (5, 5), (7, 1), (9, 4)])
def test_every_example_seen_exactly_once_per_epoch(num_train, batch_size):
    # A "step" that counts how often it sees each example: images are their own indices.
    def counting_step(counts, x_B, y_B):
        del y_B
        return counts.at[x_B].add(1), (jnp.float32(x_B.shape[0]), jnp.int32(0))

    epoch = jax.jit(make_train_epoch(None, None, num_train, batch_size,
                                     train_step=counting_step))
    x = jnp.arange(num_train)
    for seed in range(3):
        counts, metrics = epoch(jnp.zeros(num_train, jnp.int32), x, x, jax.random.key(seed))
        np.testing.assert_array_equal(np.asarray(counts), 1)
        sizes = np.asarray(metrics.losses)
        expected = [batch_size] * (num_train // batch_size) + (
            [num_train % batch_size] if num_train % batch_size else [])
        np.testing.assert_array_equal(sizes, expected)
        np.testing.assert_array_equal(epoch_batch_sizes(num_train, batch_size), expected)


def test_evaluate_matches_numpy_for_chunk_sizes_that_do_not_divide(small):
    model = MLP(16, 10)
    params = init_params(model, jax.random.key(0), (28, 28))
    logits = np.asarray(model.apply({"params": params}, small.x_train))
    loss_ref = numpy_cross_entropy(logits, small.y_train).mean()
    acc_ref = (logits.argmax(1) == small.y_train).mean()
    for chunk in (7, 64, 203, 10_000):
        evaluate = jax.jit(make_evaluate(model, chunk_size=chunk))
        loss, acc = evaluate(params, small.x_train, small.y_train)
        assert float(loss) == pytest.approx(loss_ref, rel=1e-5)
        assert float(acc) == pytest.approx(acc_ref, abs=1e-6)


def test_history_is_keras_epoch_means(small):
    clear_compiled()  # compile_seconds counts this call's compilation
    result = train(TrainConfig.tiny(batch_size=32, epochs=2, noise_schedule="none"), small)
    sizes = epoch_batch_sizes(small.num_train, 32)
    assert len(result.step_losses) == 2 * len(sizes)
    for e in range(2):
        losses = result.step_losses[e * len(sizes):(e + 1) * len(sizes)]
        assert result.history["train_loss"][e] == pytest.approx(np.average(losses, weights=sizes))
    np.testing.assert_array_equal(result.history["steps"], [7, 14])
    np.testing.assert_array_equal(result.history["examples_seen"], [203, 406])
    assert result.compile_seconds > 0 and min(result.history["train_seconds"]) > 0


def test_same_seed_same_results_and_different_seed_differs(small):
    cfg = TrainConfig.tiny(batch_size=16, noise_schedule="none")
    a, b = train(cfg, small), train(cfg, small)
    c = train(dataclasses.replace(cfg, seed=1), small)
    np.testing.assert_array_equal(a.step_losses, b.step_losses)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    for k, v in a.history.items():
        if not k.endswith("seconds"):
            np.testing.assert_array_equal(v, b.history[k])
    assert not np.array_equal(a.step_losses, c.step_losses)


def test_learns_real_digits_to_90_percent():
    data = load_dataset("mnist-5k", verbose=False)
    result = train(TrainConfig(batch_size=32, epochs=10, noise_schedule="none"), data)
    assert result.status == "complete"
    assert result.history["val_accuracy"][-1] >= 0.90, result.history["val_accuracy"]
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]


@pytest.mark.parametrize("kwargs,fragment", [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"batch_size": -3}, "batch_size must be at least 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
    ({"lr_scaling": "cubic"}, "lr_scaling must be one of none, linear, sqrt"),
])
def test_bad_config_is_a_one_line_error(kwargs, fragment):
    with pytest.raises(BatchjaxError, match=fragment) as err:
        TrainConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_batch_size_larger_than_training_set(small):
    with pytest.raises(BatchjaxError, match="larger than the training set") as err:
        train(TrainConfig(batch_size=204), small)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_log_schedule_measures_inside_epochs_without_changing_training(small, seeds):
    calls = []

    def measure(params_list, step, examples_seen):
        calls.append((step, examples_seen))
        return [[{"step": step}] for _ in params_list]

    cfg = TrainConfig.tiny(batch_size=16, epochs=3, noise_schedule="log", noise_points=8)
    logged = train_seeds(cfg, small, seeds, measure=measure)
    # 203 examples at B = 16: 12 full batches and one of 11, 13 steps per epoch, 39 in all.
    # log-spaced: geomspace(1, 39, 8) rounds to 1, 2, 3, 5, 8, 14, 23, 39; epoch ends 13, 26, 39.
    expected_steps = [0, 1, 2, 3, 5, 8, 13, 14, 23, 26, 39]
    assert [s for s, _ in calls] == expected_steps
    seen = {s: e for s, e in calls}
    assert seen[8] == 8 * 16 and seen[13] == 203 and seen[14] == 203 + 16 and seen[39] == 609
    assert [r["step"] for r in logged[-1].noise] == expected_steps
    plain = train_seeds(dataclasses.replace(cfg, noise_schedule="epoch"), small, seeds)
    for a, b in zip(logged, plain):
        np.testing.assert_array_equal(a.step_losses, b.step_losses)
        np.testing.assert_array_equal(a.history["val_loss"], b.history["val_loss"])


def test_train_measures_gradient_noise_by_default(small):
    result = train(TrainConfig.tiny(batch_size=16, epochs=2), small)
    assert [r["step"] for r in result.noise] == [0, 13, 26]
    assert [r["examples_seen"] for r in result.noise] == [0, 203, 406]
    first = result.noise[0]
    # Before the first step the probe loss is the loss of the initial parameters on all data.
    model = MLP(16, 10)
    params0 = init_params(model, jax.random.fold_in(jax.random.key(0), 0), (28, 28))
    logits = np.asarray(model.apply({"params": params0}, small.x_train))
    assert first["train_loss"] == pytest.approx(
        numpy_cross_entropy(logits, small.y_train).mean(), rel=1e-5)
    assert first["noise_scale"] == pytest.approx(first["trace_cov"] / first["grad_sq_norm"])
    assert train(TrainConfig.tiny(noise_schedule="none"), small).noise == []


# --------------------------------------------------------------------------------------------
# The default run, pinned; segments; stopping

# Recorded from batchjax at commit 25a8574 (before models, optimizers and hyperparameters
# became arguments and traced values), CPU, jax 0.10.2. A regression pin against the old
# implementation's output, the one allowed exception to "independent references": it checks
# that the default sweep (Keras' Adam, lr 1e-3, MLP 128, init and shuffle keys) trains bit for
# bit as before.
PINNED = {
    "default": {
        "losses": [2.49177622795105, 2.6186575889587402, 2.4818015098571777,
                   2.3147804737091064, 2.4187347888946533, 2.2900967597961426,
                   2.3414456844329834, 2.3286948204040527, 2.3888909816741943,
                   2.2129366397857666, 2.260842800140381, 2.2165029048919678,
                   2.196688652038574, 2.027827501296997],
        "val_loss": [2.4100496768951416, 2.4492862224578857],
        "kernel_sum": -198.69105847115725},
    "seed0": {"losses": [2.4226155281066895, 2.3704845905303955, 2.4163570404052734,
                         2.3577890396118164, 2.249924659729004, 2.364798069000244,
                         2.238741636276245],
              "val_loss": [2.3585407733917236], "kernel_sum": -12.118143215512646},
    "seed5": {"losses": [2.346212863922119, 2.4148168563842773, 2.2979447841644287,
                         2.336332321166992, 2.3223440647125244, 2.3410093784332275,
                         2.2825875282287598],
              "val_loss": [2.305708169937134], "kernel_sum": -29.86450451740984},
    "adam_first": [2.5514659881591797, 2.2990989685058594, 2.4861233234405518,
                   2.304628610610962],
    "adam_last": [2.2694201469421387, 2.3924875259399414, 2.2831692695617676,
                  2.2682275772094727, 2.2802786827087402],
}


def assert_pinned(run, pinned):
    np.testing.assert_array_equal(np.float32(run.step_losses), np.float32(pinned["losses"]))
    np.testing.assert_array_equal(np.float32(run.history["val_loss"]),
                                  np.float32(pinned["val_loss"]))
    assert float(np.asarray(run.params["hidden"]["kernel"], np.float64).sum()) == \
        pytest.approx(pinned["kernel_sum"], rel=1e-12)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="numbers pinned on XLA:CPU")
def test_default_training_is_bit_for_bit_that_of_batchjax_0_1(small):
    assert_pinned(train(TrainConfig(batch_size=32, epochs=2, noise_schedule="none"), small),
                  PINNED["default"])
    seed0, seed5 = train_seeds(TrainConfig(batch_size=32, epochs=1, hidden=16,
                                           noise_schedule="none"), small, [0, 5])
    assert_pinned(seed0, PINNED["seed0"])
    assert_pinned(seed5, PINNED["seed5"])
    adam = train(TrainConfig.tiny(batch_size=16, noise_schedule="none", optimizer="adam"), small)
    np.testing.assert_array_equal(np.float32(adam.step_losses[:4]),
                                  np.float32(PINNED["adam_first"]))
    np.testing.assert_array_equal(np.float32(adam.step_losses[-5:]),
                                  np.float32(PINNED["adam_last"]))


@pytest.mark.parametrize("seeds,schedule", [([0], "none"), ([0, 1], "none"), ([2], "log")])
def test_segmented_epochs_give_the_numbers_of_whole_ones(small, seeds, schedule):
    # Segments of about a microsecond: one step each (the partial last batch too), every
    # segment the same compiled loop of dynamic length. Bit for bit the whole-epoch scan.
    cfg = TrainConfig.tiny(batch_size=16, epochs=2, noise_schedule=schedule, noise_points=6)
    measure = (lambda params_list, step, seen: [[{"step": step}] for _ in params_list])
    whole = train_seeds(cfg, small, seeds, measure=measure)
    polls = []
    cut = train_seeds(cfg, small, seeds, measure=measure, segment_seconds=1e-6,
                      should_stop=lambda: polls.append(1) and False)
    for a, b in zip(whole, cut):
        np.testing.assert_array_equal(a.step_losses, b.step_losses)
        np.testing.assert_array_equal(a.history["train_accuracy"], b.history["train_accuracy"])
        np.testing.assert_array_equal(a.history["val_loss"], b.history["val_loss"])
        jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
        assert [r["step"] for r in a.noise] == [r["step"] for r in b.noise]
    # 13 steps per epoch: polled after each of the first 12 segments of both epochs, at
    # least, plus before each epoch.
    assert len(polls) >= 2 * 12 + 2


def test_should_stop_raises_interrupted_at_the_next_safe_point(small):
    calls = []

    def stop_on_third_poll():
        calls.append(1)
        return len(calls) == 3

    epochs_done = []
    cfg = TrainConfig.tiny(batch_size=16, epochs=5, noise_schedule="none")
    with pytest.raises(Interrupted, match="stopped by should_stop"):
        train(cfg, small, should_stop=stop_on_third_poll,
              on_epoch_end=lambda epoch, runs: epochs_done.append(epoch))
    # Polls: before epoch 1, before epoch 2, before epoch 3 (True): two epochs finished.
    assert epochs_done == [1, 2] and len(calls) == 3
    assert issubclass(Interrupted, KeyboardInterrupt)
    # With measurements, polled before and after each one as well.
    calls.clear()
    measured = []
    with pytest.raises(Interrupted):
        train(dataclasses.replace(cfg, noise_schedule="epoch"), small,
              should_stop=stop_on_third_poll,
              measure=lambda ps, step, seen: measured.append(step) or [[{}] for _ in ps])
    # Poll 1 before the step-0 measurement, 2 after it, 3 before epoch 1: stopped.
    assert measured == [0]


def test_train_runs_refuses_configs_that_cannot_share_a_program(small):
    base = TrainConfig.tiny(noise_schedule="none")
    with pytest.raises(BatchjaxError, match="may differ only in .*these differ: batch_size"):
        train_runs([base, dataclasses.replace(base, batch_size=8)], small)
    with pytest.raises(BatchjaxError, match="same config twice"):
        train_runs([base, base], small)
    with pytest.raises(BatchjaxError, match="seeds must be a non-empty list of distinct"):
        train_seeds(base, small, [1, 1])
    with pytest.raises(BatchjaxError, match="segment_seconds must be > 0"):
        train(base, small, segment_seconds=0)
