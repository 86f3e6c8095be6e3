"""Research use: any flax model, any optax optimizer or loss, compiled once, grids in one program.

References: `gradient_stats` of the model that trained (not of an MLP); NumPy float64 softmax
regression with each named optimizer's update rule; exact identities (a loss scaled by 2 with
half the learning rate; optax.sgd against the named "sgd"); separate runs against a vmapped
grid; and a compile counter on JAX's backend-compile event.
"""

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from batchjax import BatchjaxError, TrainConfig, gradient_stats, train, train_seeds
from batchjax import rng
from batchjax.data import load_dataset, make_synthetic
from batchjax.losses import cross_entropy
from batchjax.model import init_params
from batchjax.train import clear_compiled, train_runs
from compiles import count_compiles

ROOT = Path(__file__).resolve().parent.parent

# The README's "Your own model" example (kept equal to the README's code block, when the
# README has the section; see test_readme_your_own_model_example_is_this_one).
README_EXAMPLE = '''
import flax.linen as nn
import batchjax
from batchjax import TrainConfig


class CNN(nn.Module):
    """Two strided 3x3 convolutions and a Dense layer: images [B, 28, 28] -> logits [B, 10]."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x[..., None]  # a channel axis
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


data = batchjax.load_dataset("mnist-5k")
model = CNN()
config = TrainConfig(batch_size=32, epochs=3, optimizer="momentum", learning_rate=0.05,
                     probe_size=1000)
run = batchjax.train(config, data, model=model)
print(f"val accuracy {run.history['val_accuracy'][-1]:.3f}, "
      f"{run.history['train_seconds'][-1]:.2f} s per epoch")
stats = batchjax.gradient_stats(run.params, data.x_train, data.y_train, model=model)
print(f"B_simple = tr(Sigma) / |G|^2 = {stats.noise_scale:.0f} at the end, "
      f"{run.noise[0]['noise_scale']:.0f} at the start (noise records: {len(run.noise)})")
'''


class CNN(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x[..., None]
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class Linear(nn.Module):
    """Softmax regression: logits = x W + b."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def small():
    return make_synthetic(num_train=203, num_val=50, seed=3)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist-5k", verbose=False)


# --------------------------------------------------------------------------------------------
# Any model, optimizer and loss


def test_readme_your_own_model_example_runs():
    namespace = {}
    exec(compile(README_EXAMPLE, "README_EXAMPLE", "exec"), namespace)
    run, stats = namespace["run"], namespace["stats"]
    assert run.status == "complete" and run.history["val_accuracy"][-1] > 0.85
    assert run.history["train_loss"][-1] < run.history["train_loss"][0]
    assert set(run.params) == {"Conv_0", "Conv_1", "Dense_0"}
    assert set(stats.trace_cov_per_layer) == {f"{layer}/{p}" for layer in run.params
                                              for p in ("kernel", "bias")}
    assert len(run.noise) == 4 and stats.noise_scale > 0


def test_readme_your_own_model_example_is_this_one():
    readme = (ROOT / "README.md").read_text()
    if "## Your own model" not in readme:
        pytest.skip("the README has no 'Your own model' section yet")
    code = readme.split("## Your own model", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert code.strip() == README_EXAMPLE.strip()


def test_a_cnn_is_measured_as_the_cnn_that_trained(small):
    model = CNN()
    config = TrainConfig(batch_size=16, epochs=2, probe_size=120, seed=4)
    run = train(config, small, model=model)
    assert [r["step"] for r in run.noise] == [0, 13, 26]
    x, y = small.x_train[:120], small.y_train[:120]
    params0 = init_params(model, rng.stream_key(4, "init"), (28, 28))
    for record, params in ((run.noise[0], params0), (run.noise[-1], run.params)):
        stats = gradient_stats(params, x, y, model=model)
        assert record["train_loss"] == pytest.approx(float(stats.mean_loss), rel=1e-5)
        for key in ("grad_sq_norm", "trace_cov", "noise_scale"):
            assert record[key] == pytest.approx(getattr(stats, key), rel=1e-4), key
        # The CNN's layers, so not an MLP's ("hidden/kernel", "output/kernel").
        assert set(record["trace_cov_per_layer"]) == {
            "Conv_0/kernel", "Conv_0/bias", "Dense_0/kernel", "Dense_0/bias"}
        for layer, value in stats.trace_cov_per_layer.items():
            assert record["trace_cov_per_layer"][layer] == pytest.approx(value, rel=1e-4)
    assert run.noise[0]["trace_cov"] != pytest.approx(run.noise[-1]["trace_cov"], rel=1e-3)


def test_a_deeper_mlp_from_the_config_trains_and_is_measured(small):
    run = train(TrainConfig.tiny(hidden=(24, 12), probe_size=100), small)
    assert set(run.params) == {"hidden_0", "hidden_1", "output"}
    assert run.params["hidden_1"]["kernel"].shape == (24, 12)
    assert {"hidden_1/kernel", "output/bias"} <= set(run.noise[-1]["trace_cov_per_layer"])


def softmax_regression_reference(name, w0, b0, x, y, lr, mu, steps):
    """Full-batch softmax regression in float64, with the named optimizer's textbook rule."""
    x = x.reshape(len(x), -1).astype(np.float64)
    onehot = np.eye(w0.shape[1])[y]
    params = [w0.astype(np.float64), b0.astype(np.float64)]
    traces = [np.zeros_like(p) for p in params]
    for _ in range(steps):
        z = x @ params[0] + params[1]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        delta = (p - onehot) / len(x)
        grads = [x.T @ delta, delta.sum(0)]
        for i, g in enumerate(grads):
            if name == "sgd":
                params[i] = params[i] - lr * g
            else:
                traces[i] = mu * traces[i] + g
                step = traces[i] if name == "momentum" else g + mu * traces[i]
                params[i] = params[i] - lr * step
    return params


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
def test_named_sgd_optimizers_train_as_their_numpy_update_rules(name):
    # One batch per epoch (B = N), so each epoch is one full-batch step whatever the order.
    data = make_synthetic(num_train=64, num_val=16, seed=5)
    model = Linear()
    config = TrainConfig(batch_size=64, epochs=5, optimizer=name, learning_rate=0.5,
                         momentum=0.8, noise_schedule="none", seed=2)
    run = train(config, data, model=model)
    params0 = init_params(model, rng.stream_key(2, "init"), (28, 28))
    w, b = softmax_regression_reference(name, np.asarray(params0["Dense_0"]["kernel"]),
                                        np.asarray(params0["Dense_0"]["bias"]),
                                        data.x_train, data.y_train, 0.5, 0.8, 5)
    np.testing.assert_allclose(run.params["Dense_0"]["kernel"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(run.params["Dense_0"]["bias"], b, rtol=1e-4, atol=1e-6)
    plain = softmax_regression_reference("sgd", np.asarray(params0["Dense_0"]["kernel"]),
                                         np.asarray(params0["Dense_0"]["bias"]),
                                         data.x_train, data.y_train, 0.5, 0.8, 5)
    if name != "sgd":  # the reference can tell the rules apart at this tolerance
        assert not np.allclose(plain[0], w, rtol=1e-3, atol=1e-5)


def test_an_optax_optimizer_replaces_the_named_one(small):
    config = TrainConfig.tiny(optimizer="sgd", learning_rate=0.1, noise_schedule="none")
    named = train(config, small)
    given = train(dataclasses.replace(config, optimizer="adam_keras", learning_rate=1e-3),
                  small, optimizer=optax.sgd(0.1))
    np.testing.assert_array_equal(named.step_losses, given.step_losses)
    jax.tree.map(np.testing.assert_array_equal, named.params, given.params)
    with pytest.raises(BatchjaxError, match="may differ only in seed; these differ: "
                                            "learning_rate"):
        train_runs([config, dataclasses.replace(config, learning_rate=0.2)], small,
                   optimizer=optax.sgd(0.1))


def test_a_loss_fn_is_what_trains(small):
    # Twice the cross-entropy at half the learning rate: gradients exactly 2x, steps equal
    # (scaling by 2 is exact in float32), so the runs agree bit for bit; the losses are 2x.
    config = TrainConfig.tiny(optimizer="sgd", learning_rate=0.1, noise_schedule="none")
    plain = train(config, small)
    doubled = train(dataclasses.replace(config, learning_rate=0.05), small,
                    loss_fn=lambda outputs, labels: 2 * cross_entropy(outputs, labels))
    np.testing.assert_array_equal(doubled.step_losses, 2 * plain.step_losses)
    jax.tree.map(np.testing.assert_array_equal, doubled.params, plain.params)
    np.testing.assert_array_equal(doubled.history["val_loss"], 2 * plain.history["val_loss"])


class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
        return nn.Dense(10)(nn.BatchNorm(use_running_average=False)(x))


class WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
        return nn.Dense(10)(nn.Dropout(0.5, deterministic=False)(x))


@pytest.mark.parametrize("model,fragment", [
    (WithBatchNorm(), "only variables are params; got batch_stats"),
    (WithDropout(), "deterministic model, but Dropout_0 needs PRNG"),
])
def test_models_with_state_or_randomness_are_refused(small, model, fragment):
    with pytest.raises(BatchjaxError, match=fragment) as err:
        train(TrainConfig.tiny(noise_schedule="none"), small, model=model)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Compiled once; grids in one program


def test_a_second_call_compiles_nothing_and_copies_no_data(monkeypatch):
    data = make_synthetic(num_train=300, num_val=40, seed=6)
    base = TrainConfig.tiny(batch_size=32, epochs=1, noise_schedule="none")
    changed = dataclasses.replace(base, learning_rate=3e-3, seed=7, b1=0.8, b2=0.99, eps=1e-6,
                                  epochs=2)
    model = CNN()
    with count_compiles() as first:
        a = train(base, data)
        train_seeds(base, data, [0, 1])
        train(dataclasses.replace(base, optimizer="nesterov"), data)
        train(base, data, model=model, segment_seconds=1e-6)
    assert len(first) >= 4 and a.compile_seconds > 0  # the counter sees compilations

    copied = []
    put = jax.device_put

    def counting_put(x, *args, **kwargs):
        copied.extend(np.size(leaf) for leaf in jax.tree.leaves(x))
        return put(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting_put)
    with count_compiles() as second:
        b = train(changed, data)
        train_seeds(changed, data, [4, 2])
        train(dataclasses.replace(changed, optimizer="nesterov", momentum=0.5), data)
        train(changed, data, model=CNN(), segment_seconds=1e-6)  # an equal model
    assert second == [] and b.compile_seconds == 0.0
    assert copied and max(copied) < data.x_val.size  # keys and hyperparameters only
    assert not np.array_equal(a.step_losses, b.step_losses[:len(a.step_losses)])


def test_initial_states_and_epoch_orders_compile_once_for_every_batch_size():
    data = make_synthetic(num_train=300, num_val=40, seed=9)
    base = TrainConfig.tiny(batch_size=32, epochs=1, noise_schedule="none", hidden=11)
    segmented = {"segment_seconds": 1e-6}  # epochs in segments: the order is drawn apart
    clear_compiled()  # what earlier tests kept in this process (N = 300 is common)
    with count_compiles() as first:
        train(base, data, **segmented)
    assert "jit(init)" in first and "jit(order)" in first  # the counter sees them
    with count_compiles() as second:  # other batch sizes; one run, then three
        train(dataclasses.replace(base, batch_size=16, seed=5), data, **segmented)
        train_seeds(dataclasses.replace(base, batch_size=8), data, [0, 2, 5], **segmented)
    assert "jit(init)" not in second and "jit(stack)" in second, second
    assert second.count("jit(order)") == 1, second  # only for three runs
    # That each run of a group starts where it would alone: the vmapped-seeds tests.


def test_a_second_call_with_default_measurements_compiles_nothing():
    data = make_synthetic(num_train=300, num_val=40, seed=8)
    base = TrainConfig.tiny(batch_size=32, epochs=1, probe_size=64)
    train(base, data)
    with count_compiles() as second:
        run = train(dataclasses.replace(base, learning_rate=3e-3, seed=1, epochs=2), data)
    assert len(run.noise) == 3
    assert second == [], second


def test_a_learning_rate_grid_equals_separate_runs_and_recompiles_nothing(small):
    base = TrainConfig.tiny(batch_size=16, epochs=2, noise_schedule="none")
    grid = [dataclasses.replace(base, learning_rate=lr, seed=s)
            for lr in (1e-3, 4e-3) for s in (0, 1)]
    together = train_runs(grid, small)
    for run, config in zip(together, grid):
        alone = train(config, small)
        assert run.config == config and run.learning_rate == config.learning_rate
        # The vmapped program sums a batch's per-example losses in another order: a few
        # float32 ulps per step (as for vmapped seeds, tests/test_sweep.py).
        np.testing.assert_allclose(run.step_losses, alone.step_losses, rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     run.params, alone.params)
    # The grid's learning rates matter: lr 4e-3 is not lr 1e-3 with the same seed.
    assert not np.allclose(together[0].step_losses, together[2].step_losses, rtol=1e-3)
    assert together[0].trained_with == together[3].trained_with and \
        len(together[0].trained_with) == 4
    other = [dataclasses.replace(c, learning_rate=c.learning_rate * 3, b2=0.99) for c in grid]
    with count_compiles() as compiles:
        train_runs(other, small)
    assert compiles == []


def test_sgd_momentum_grid_trains_each_momentum(small):
    base = TrainConfig.tiny(batch_size=16, epochs=1, optimizer="momentum", learning_rate=0.05,
                            noise_schedule="none")
    grid = [dataclasses.replace(base, momentum=m) for m in (0.0, 0.9)]
    heavy0, heavy9 = train_runs(grid, small)
    sgd = train(dataclasses.replace(base, optimizer="sgd"), small)
    # momentum 0 is plain SGD: v = g.
    np.testing.assert_allclose(heavy0.step_losses, sgd.step_losses, rtol=1e-5, atol=1e-6)
    assert not np.allclose(heavy9.step_losses, sgd.step_losses, rtol=1e-3)
