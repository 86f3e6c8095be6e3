"""The MLP against its definition: shapes, parameter count, Keras' initialisation, forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from batchjax.errors import BatchjaxError
from batchjax.model import (MLP, SMALL_PRODUCT, check_model, count_params, dense_dot_general,
                            init_params, model_from_params)


def test_parameter_count_and_shapes():
    params = init_params(MLP(), jax.random.key(0), (28, 28))
    assert count_params(params) == 101_770
    shapes = jax.tree.map(lambda p: p.shape, params)
    assert shapes == {"hidden": {"kernel": (784, 128), "bias": (128,)},
                      "output": {"kernel": (128, 10), "bias": (10,)}}
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))


def test_width_and_classes_are_configurable():
    params = init_params(MLP(hidden=32, num_classes=7), jax.random.key(0), (8, 8, 3))
    assert params["hidden"]["kernel"].shape == (192, 32)
    assert params["output"]["kernel"].shape == (32, 7)
    assert model_from_params(params) == MLP(hidden=32, num_classes=7)


def test_deeper_stacks_name_their_layers_and_round_trip():
    model = MLP(hidden=(12, 6), num_classes=4)
    params = init_params(model, jax.random.key(0), (5, 5))
    shapes = jax.tree.map(lambda p: p.shape, params)
    assert shapes == {"hidden_0": {"kernel": (25, 12), "bias": (12,)},
                      "hidden_1": {"kernel": (12, 6), "bias": (6,)},
                      "output": {"kernel": (6, 4), "bias": (4,)}}
    assert count_params(params) == 25 * 12 + 12 + 12 * 6 + 6 + 6 * 4 + 4
    assert model_from_params(params) == model
    # One hidden layer keeps the original name, so saved per-layer names stay "hidden/kernel".
    assert MLP(hidden=[7]) == MLP(7) and MLP(7).hidden == (7,)
    assert set(init_params(MLP(7), jax.random.key(0), (5, 5))) == {"hidden", "output"}
    with pytest.raises(ValueError, match="not those of batchjax.MLP"):
        model_from_params({"hidden_0": params["hidden_0"], "output": params["output"]})


def test_deep_forward_matches_numpy():
    rng = np.random.default_rng(3)
    model = MLP(hidden=(9, 7, 5), num_classes=3)
    params = init_params(model, jax.random.key(4), (4, 4))
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.1, p.shape).astype(np.float32), params)
    x = rng.random((6, 4, 4), dtype=np.float32)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = x.reshape(6, -1).astype(np.float64)
    for name in ("hidden_0", "hidden_1", "hidden_2"):
        h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
    expected = h @ p["output"]["kernel"] + p["output"]["bias"]
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)), expected,
                               rtol=1e-5, atol=1e-5)


class _WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
        return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(x))


class _WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=False)(x))


class _Pooled(nn.Module):  # averages over the batch: one output for all examples
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape((x.shape[0], -1)).mean(axis=0))


@pytest.mark.parametrize("model,fragment", [
    (_WithBatchNorm(), "only variables are params; got batch_stats: BatchNorm_0"),
    (_WithDropout(), "deterministic model, but Dropout_0 needs PRNG"),
    (_Pooled(), "must map a batch"),
])
def test_models_training_cannot_use_are_one_line_errors(model, fragment):
    with pytest.raises(BatchjaxError, match=fragment) as err:
        check_model(model, (4, 4))
    assert "\n" not in str(err.value)
    check_model(MLP(hidden=(4, 3)), (4, 4))  # the MLP passes


@pytest.mark.parametrize("layer,fan_in,fan_out", [("hidden", 784, 128), ("output", 128, 10)])
def test_glorot_uniform_kernels_and_zero_biases(layer, fan_in, fan_out):
    params = init_params(MLP(), jax.random.key(1), (28, 28))
    kernel = np.asarray(params[layer]["kernel"], np.float64)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    # Glorot-uniform: U(-limit, limit), variance 2 / (fan_in + fan_out).
    # lecun-normal (flax's default) has variance 1 / fan_in: 2.6x larger for the output layer.
    assert np.abs(kernel).max() <= limit
    n = kernel.size
    var = kernel.var()
    expected = 2.0 / (fan_in + fan_out)
    # The sample variance of U(-a, a) has relative standard error sqrt(0.8 / n).
    assert abs(var / expected - 1) < 5 * np.sqrt(0.8 / n)
    assert abs(kernel.mean()) < 5 * np.sqrt(expected / n)
    np.testing.assert_array_equal(np.asarray(params[layer]["bias"]), 0.0)


def test_forward_matches_numpy():
    rng = np.random.default_rng(0)
    model = MLP(hidden=16, num_classes=10)
    params = init_params(model, jax.random.key(2), (28, 28))
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.1, p.shape).astype(np.float32), params)
    x = rng.random((5, 28, 28), dtype=np.float32)
    logits = np.asarray(model.apply({"params": params}, x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.maximum(x.reshape(5, -1) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    expected = h @ p["output"]["kernel"] + p["output"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


# dense_dot_general: every derivative that of x @ W, checked against closed forms in float64.
# For f(W) = |x W|^2 / 2: grad = x^T x W, Hessian-vector product H v = x^T x v, and the
# per-example gradients are x_i^T x_i W.
@pytest.mark.parametrize("batch,width", [(1, 5), (8, 5), (8, 32), (15, 16), (32, 5), (32, 32)])
def test_dense_dot_general_derivatives_match_closed_forms(batch, width):
    rng = np.random.default_rng(batch * 100 + width)
    x = rng.standard_normal((batch, 20)).astype(np.float32)
    w = rng.standard_normal((20, width)).astype(np.float32)
    v = rng.standard_normal((20, width)).astype(np.float32)
    x64, w64, v64 = (a.astype(np.float64) for a in (x, w, v))
    dims = (((1,), (0,)), ((), ()))

    def f(w_, x_=x):
        return 0.5 * jnp.sum(jnp.square(dense_dot_general(x_, w_, dims)))

    assert (min(batch, width) < SMALL_PRODUCT) == (batch < 16 or width < 16)
    np.testing.assert_allclose(jax.jit(f)(w), 0.5 * np.sum((x64 @ w64) ** 2), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(w), x64.T @ x64 @ w64, rtol=1e-4, atol=1e-4)
    hvp = jax.jit(lambda w_, v_: jax.jvp(jax.grad(f), (w_,), (v_,))[1])(w, v)
    np.testing.assert_allclose(hvp, x64.T @ x64 @ v64, rtol=1e-4, atol=1e-4)
    jac_fwd = jax.jacfwd(lambda w_: dense_dot_general(x, w_, dims))(w)
    np.testing.assert_allclose(jac_fwd, np.einsum("bd,hk->bhdk", x64, np.eye(width)), atol=1e-6)
    per_example = jax.vmap(jax.grad(lambda w_, x_i: f(w_, x_i[None])), in_axes=(None, 0))(w, x)
    np.testing.assert_allclose(per_example, np.einsum("bd,be,eh->bdh", x64, x64, w64),
                               rtol=1e-4, atol=1e-4)
    dx = jax.grad(lambda x_: f(w, x_))(x)
    np.testing.assert_allclose(dx, x64 @ w64 @ w64.T, rtol=1e-4, atol=1e-4)
