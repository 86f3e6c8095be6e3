"""Tests of batchjax.noise: every statistic against an independent reference.

References: a Python loop of `jax.grad` on single examples; closed forms (example i's gradient is
i); float64 NumPy per-example gradients of the MLP written out by hand; the vmap path (the
per-example gradients themselves) for the dense path of other Dense stacks; and, on real MNIST
digits, sampled minibatch gradients compared with the analytic variance in standard errors.
"""

import dataclasses
import json
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from batchjax import noise
from batchjax.config import TrainConfig
from batchjax.errors import BatchjaxError
from batchjax.losses import cross_entropy
from batchjax.model import MLP, init_params
from batchjax.rng import stream_key
from compiles import count_compiles


@pytest.fixture(scope="module")
def mnist():
    """(x, y) of the 4,000 bundled MNIST training digits, x in [0, 1]."""
    try:
        from batchjax.data import load_dataset
        ds = load_dataset("mnist-5k", verbose=False)
        return np.asarray(ds.x_train, np.float32), np.asarray(ds.y_train, np.int32)
    except ImportError:
        import importlib.resources
        path = importlib.resources.files("batchjax") / "datasets" / "mnist_5k.npz"
        with np.load(path) as d:
            return d["x_train"].astype(np.float32) / 255, d["y_train"].astype(np.int32)


def seed_mlp(hidden, num_classes=10):
    """batchjax's MLP with one hidden layer of `hidden` units ("hidden" and "output")."""
    return MLP(hidden=(hidden,), num_classes=num_classes)


def mlp_params(hidden, seed=0):
    return init_params(seed_mlp(hidden), jax.random.key(seed), (28, 28))


def trained_params(x, y, hidden, steps, batch_size=32, seed=0, model=None):
    """`steps` Adam steps (Keras' defaults: lr 1e-3, eps 1e-7) on random batches from the
    initialisation of `model` (default: the seed MLP with `hidden` units)."""
    model = model if model is not None else seed_mlp(hidden)
    params = init_params(model, jax.random.key(seed), x.shape[1:])
    optimizer = optax.adam(1e-3, eps=1e-7)
    idx_SxB = jax.random.randint(jax.random.key(seed + 1), (steps, batch_size), 0, x.shape[0])
    x, y = jnp.asarray(x), jnp.asarray(y)

    def step(carry, idx):
        p, opt_state = carry
        grads = jax.grad(lambda q: jnp.mean(cross_entropy(
            model.apply({"params": q}, x[idx]), y[idx])))(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    run = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), idx_SxB)[0][0])
    return run(params)


def numpy_per_example_grads(params, x, y):
    """Per-example gradients of the MLP's cross-entropy in float64, written out by hand."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n = x.shape[0]
    a0 = np.asarray(x, np.float64).reshape(n, -1)
    z1 = a0 @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    a1 = np.maximum(z1, 0)
    z2 = a1 @ p["output"]["kernel"] + p["output"]["bias"]
    prob = np.exp(z2 - z2.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    d2 = prob - np.eye(z2.shape[1])[y]
    d1 = (d2 @ p["output"]["kernel"].T) * (z1 > 0)
    return {"hidden": {"kernel": a0[:, :, None] * d1[:, None, :], "bias": d1},
            "output": {"kernel": a1[:, :, None] * d2[:, None, :], "bias": d2}}


def leaves(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def assert_tree_close(actual, expected, rtol, atol_frac=0.0):
    """Leafwise allclose; atol is `atol_frac` times the largest |expected| entry of the leaf."""
    for a, e in zip(leaves(actual), leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_frac * np.abs(e).max())


def assert_stats_close(actual, expected, rtol=1e-5, atol_frac=1e-5):
    """Two GradientStats agree: traces (total and per layer), |G|^2, G, the variances."""
    assert actual.num_examples == expected.num_examples
    assert actual.grad_sq_norm == pytest.approx(expected.grad_sq_norm, rel=rtol)
    assert actual.trace_cov == pytest.approx(expected.trace_cov, rel=rtol)
    assert set(actual.trace_cov_per_layer) == set(expected.trace_cov_per_layer)
    for name, value in expected.trace_cov_per_layer.items():
        assert actual.trace_cov_per_layer[name] == pytest.approx(value, rel=rtol), name
    assert actual.mean_loss == pytest.approx(expected.mean_loss, rel=1e-6)
    assert_tree_close(actual.mean_grad, expected.mean_grad, rtol=rtol, atol_frac=atol_frac)
    if expected.variance is not None:
        assert_tree_close(actual.variance, expected.variance, rtol=rtol, atol_frac=atol_frac)


# Least squares and "example i's gradient is i" through the apply_fn + loss_fn contract; module
# level, so that repeated calls pass the same function objects.
def linear_apply(params, x_B):
    return x_B @ params["w"]


def identity_loss(outputs_B, labels_B):
    del labels_B
    return outputs_B


def half_squared_error(outputs_B, targets_B):
    return 0.5 * jnp.square(outputs_B - targets_B)


# --------------------------------------------------------------------------------------------
# Per-example gradients


def test_per_example_grads_equal_a_loop_of_single_example_grads(mnist):
    x, y = mnist[0][:6], mnist[1][:6]
    params, model = mlp_params(8), seed_mlp(8)
    grads = noise.per_example_grads(params, x, y)
    single_grad = jax.jit(jax.grad(lambda p, x_1, y_1: cross_entropy(
        model.apply({"params": p}, x_1), y_1)[0]))
    for i in range(6):
        expected = single_grad(params, x[i:i + 1], y[i:i + 1])
        assert_tree_close(jax.tree.map(lambda g, i=i: g[i], grads), expected, rtol=1e-5,
                          atol_frac=1e-6)


def test_mean_of_per_example_grads_is_the_gradient_of_the_mean_loss(mnist):
    x, y = mnist[0][:40], mnist[1][:40]
    params, model = mlp_params(8), seed_mlp(8)
    grads = noise.per_example_grads(params, x, y)
    mean_loss = lambda p: jnp.mean(  # noqa: E731
        cross_entropy(model.apply({"params": p}, x), y))
    assert_tree_close(jax.tree.map(lambda g: g.mean(0), grads), jax.grad(mean_loss)(params),
                      rtol=1e-5, atol_frac=1e-5)


def test_gradients_are_of_the_per_example_loss_not_its_share_of_the_mean(mnist):
    x, y = mnist[0][:1], mnist[1][:1]
    params = mlp_params(8)
    one = noise.per_example_grads(params, x, y)
    many = noise.per_example_grads(params, np.repeat(x, 10, 0), np.repeat(y, 10, 0))
    # Ten copies: each copy's gradient is the single example's, not a tenth of it.
    assert_tree_close(jax.tree.map(lambda g: g[3], many), jax.tree.map(lambda g: g[0], one),
                      rtol=1e-5, atol_frac=1e-6)


# --------------------------------------------------------------------------------------------
# gradient_stats against references


@pytest.mark.parametrize("elementwise", [True, False])
@pytest.mark.parametrize("method", ["dense", "vmap"])
def test_stats_equal_float64_numpy_and_do_not_depend_on_the_chunking(mnist, method, elementwise):
    n = 101
    x, y = mnist[0][:n], mnist[1][:n]
    params = mlp_params(8)
    g = numpy_per_example_grads(params, x, y)
    mean = jax.tree.map(lambda a: a.mean(0), g)
    var = jax.tree.map(lambda a: a.var(0), g)  # divisor N
    for chunk_size in (n, 33, 100, 1000):  # 33 and 100 do not divide 101
        stats = noise.gradient_stats(params, x, y, method=method, chunk_size=chunk_size,
                                     elementwise=elementwise)
        assert stats.num_examples == n and stats.method == method
        assert_tree_close(stats.mean_grad, mean, rtol=1e-4, atol_frac=1e-5)
        if elementwise:
            assert_tree_close(stats.variance, var, rtol=1e-4, atol_frac=1e-5)
        else:
            assert stats.variance is stats.mean_gsnr is stats.num_zero_variance is None
        np.testing.assert_allclose(stats.trace_cov, sum(a.sum() for a in leaves(var)), rtol=1e-5)
        np.testing.assert_allclose(stats.grad_sq_norm, sum((a**2).sum() for a in leaves(mean)),
                                   rtol=1e-5)
        for layer in ("hidden", "output"):
            for leaf in ("kernel", "bias"):
                np.testing.assert_allclose(stats.trace_cov_per_layer[f"{layer}/{leaf}"],
                                           var[layer][leaf].sum(), rtol=1e-5)


def test_closed_form_example_i_has_gradient_i():
    n = 10
    # loss_i = w . x_i with x_i = (i, i, i): g_i = (i, i, i), G = (n - 1) / 2,
    # Var = (n^2 - 1) / 12 per coordinate.
    params = {"w": jnp.zeros(3)}
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    y = np.zeros(n, np.int32)
    for chunk_size in (n, 3, 4):
        stats = noise.gradient_stats(params, x, y, apply_fn=linear_apply, loss_fn=identity_loss,
                                     chunk_size=chunk_size)
        assert stats.method == "vmap"
        np.testing.assert_allclose(stats.mean_grad["w"], [(n - 1) / 2] * 3, rtol=1e-7)
        np.testing.assert_allclose(stats.variance["w"], [(n * n - 1) / 12] * 3, rtol=1e-6)
        np.testing.assert_allclose(stats.trace_cov, 3 * (n * n - 1) / 12, rtol=1e-6)
        np.testing.assert_allclose(stats.noise_scale, (n * n - 1) / 12 / ((n - 1) / 2) ** 2,
                                   rtol=1e-6)
        np.testing.assert_allclose(stats.mean_gsnr, ((n - 1) / 2) ** 2 / ((n * n - 1) / 12),
                                   rtol=1e-6)
    # Sampling without replacement: Var(mean of B of 0..n-1) = (n^2 - 1)/12 / B (n - B)/(n - 1).
    for b in (1, 2, 5, n):
        np.testing.assert_allclose(stats.minibatch_variance(b),
                                   3 * (n * n - 1) / 12 / b * (n - b) / (n - 1), rtol=1e-6)


def test_closed_form_least_squares():
    # loss_i = (w . x_i - t_i)^2 / 2 has g_i = (w . x_i - t_i) x_i.
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=37).astype(np.float32)
    w = rng.normal(size=5).astype(np.float32)
    g = (x.astype(np.float64) @ w - t)[:, None] * x
    stats = noise.gradient_stats({"w": jnp.asarray(w)}, x, t, apply_fn=linear_apply,
                                 loss_fn=half_squared_error, chunk_size=8)
    assert stats.method == "vmap"
    np.testing.assert_allclose(stats.mean_grad["w"], g.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.variance["w"], g.var(0), rtol=1e-5)


@pytest.mark.parametrize("elementwise", [True, False])
@pytest.mark.parametrize("method", ["dense", "vmap"])
def test_identical_examples_have_zero_variance(mnist, method, elementwise):
    x, y = np.repeat(mnist[0][5:6], 101, 0), np.repeat(mnist[1][5:6], 101, 0)
    stats = noise.gradient_stats(mlp_params(8), x, y, method=method, chunk_size=33,
                                 elementwise=elementwise)
    # Zero up to the float32 rounding of the chunk means: std below 1e-5 |G|, where the
    # rounding of a naive E|g|^2 - |G|^2 alone allows sqrt(eps) |G| = 3e-4 |G|.
    assert stats.grad_sq_norm > 1
    assert 0 <= stats.trace_cov < 1e-10 * stats.grad_sq_norm
    assert stats.noise_scale < 1e-10
    assert stats.minibatch_variance(1) < 1e-10 * stats.grad_sq_norm


def test_minibatch_variance_endpoints_and_arguments(mnist):
    n = 101
    stats = noise.gradient_stats(mlp_params(8), mnist[0][:n], mnist[1][:n])
    assert stats.minibatch_variance(n) == 0 and stats.snr(n) == math.inf
    assert stats.minibatch_variance(1) == pytest.approx(stats.trace_cov, rel=1e-12)
    sizes = np.array([1, 8, 32, n])
    np.testing.assert_allclose(stats.minibatch_variance(sizes),
                               [stats.minibatch_variance(int(b)) for b in sizes])
    np.testing.assert_allclose(stats.snr(sizes[:-1]),
                               stats.grad_sq_norm / stats.minibatch_variance(sizes[:-1]))
    for bad in (0, n + 1, 2.5, True, [1, n + 1]):
        with pytest.raises(BatchjaxError):
            stats.minibatch_variance(bad)
    d = json.loads(json.dumps(stats.to_dict()))
    assert "mean_grad" not in d and d["trace_cov_per_layer"]["output/bias"] > 0
    full = stats.to_dict(include_arrays=True)
    assert np.shape(full["variance"]["hidden"]["kernel"]) == (784, 8)
    traces = noise.gradient_stats(mlp_params(8), mnist[0][:n], mnist[1][:n], elementwise=False)
    d = json.loads(json.dumps(traces.to_dict(include_arrays=True)))
    assert d["variance"] is d["mean_gsnr"] is None
    assert np.shape(d["mean_grad"]["output"]["bias"]) == (10,)
    for bad in (0, 1, "no", None):
        with pytest.raises(BatchjaxError, match="elementwise"):
            noise.gradient_stats(mlp_params(8), mnist[0][:n], mnist[1][:n], elementwise=bad)


@pytest.mark.parametrize("steps", [0, 200])
def test_dense_path_equals_vmap_path(mnist, steps):
    x, y = mnist[0][:300], mnist[1][:300]
    params = trained_params(*mnist, hidden=8, steps=steps) if steps else mlp_params(8)
    np.testing.assert_allclose(noise.per_example_sq_norms(params, x, y, method="dense"),
                               noise.per_example_sq_norms(params, x, y, method="vmap"),
                               rtol=1e-5)
    dense = noise.gradient_stats(params, x, y, chunk_size=128)  # "auto"
    vmap = noise.gradient_stats(params, x, y, method="vmap", chunk_size=128)
    assert dense.method == "dense"
    assert dense.grad_sq_norm == pytest.approx(vmap.grad_sq_norm, rel=1e-5)
    assert dense.trace_cov == pytest.approx(vmap.trace_cov, rel=1e-5)
    for name, value in vmap.trace_cov_per_layer.items():
        assert dense.trace_cov_per_layer[name] == pytest.approx(value, rel=1e-5), name
    assert_tree_close(dense.mean_grad, vmap.mean_grad, rtol=1e-5, atol_frac=1e-5)
    assert_tree_close(dense.variance, vmap.variance, rtol=1e-5, atol_frac=1e-5)
    # Weights whose every g_i is 0 (always-black pixels, dead units) are exact zeros in both.
    assert dense.num_zero_variance == vmap.num_zero_variance > 0
    assert dense.mean_gsnr == pytest.approx(vmap.mean_gsnr, rel=1e-4)
    assert dense.mean_loss == pytest.approx(vmap.mean_loss, rel=1e-6)
    # The traces alone (no [D, H] product of squares) against the vmap path's sums.
    traces = noise.gradient_stats(params, x, y, chunk_size=128, elementwise=False)
    assert traces.method == "dense" and traces.trace_cov == pytest.approx(vmap.trace_cov, rel=1e-5)
    for name, value in vmap.trace_cov_per_layer.items():
        assert traces.trace_cov_per_layer[name] == pytest.approx(value, rel=1e-5), name
    assert traces.grad_sq_norm == pytest.approx(vmap.grad_sq_norm, rel=1e-5)


def near_copies(mnist, noise_std, n=300):
    """Bright copies of one digit plus Gaussian noise, one label; with the float64 per-example
    gradients of `mlp_params(8)` there, their variances, tr(Sigma) and |G|^2."""
    rng = np.random.default_rng(0)
    x0 = 0.5 + 0.5 * mnist[0][0].astype(np.float64)
    x = (x0[None] + noise_std * rng.standard_normal((n, 28, 28))).astype(np.float32)
    y = np.full(n, 3, np.int32)
    g = numpy_per_example_grads(mlp_params(8), x, y)
    ref_var = jax.tree.map(lambda a: a.var(0), g)
    ref_gsq = sum((a.mean(0) ** 2).sum() for a in leaves(g))
    return x, y, g, ref_var, sum(v.sum() for v in leaves(ref_var)), ref_gsq


@pytest.mark.parametrize("method", ["dense", "vmap"])
@pytest.mark.parametrize("noise_std, min_snr, rel, var_atol, layer_rel", [
    # Signal-to-noise ~3e7, beyond float32's 1 / eps: the float32 per-example gradients
    # themselves carry relative errors ~1e-4 of their deviations (eps |G| / std); nothing
    # beyond that is lost.
    pytest.param(1e-4, 1e7, 1e-3, 2e-3, 2e-3, id="snr-3e7"),
    # ~4e3: plain sums of squares minus n m^2 would lose about 12 of float32's 24 bits
    # (relative errors ~1e-4 in tr(Sigma), ~5e-3 in a variance); the dense path notices the
    # cancellation and takes the chunks again about the shift.
    pytest.param(1e-2, 1e3, 2e-6, 5e-5, 5e-5, id="snr-4e3"),
])
def test_large_mean_tiny_variance_is_accurate_where_the_naive_formula_fails(
        mnist, method, noise_std, min_snr, rel, var_atol, layer_rel):
    x, y, g, ref_var, ref_trace, ref_gsq = near_copies(mnist, noise_std)
    params = mlp_params(8)
    assert min_snr < ref_gsq / ref_trace < 10 * min_snr

    stats = noise.gradient_stats(params, x, y, method=method, chunk_size=128)
    assert stats.trace_cov == pytest.approx(ref_trace, rel=rel)
    assert_tree_close(stats.variance, ref_var, rtol=0, atol_frac=var_atol)
    traces = noise.gradient_stats(params, x, y, method=method, chunk_size=128,
                                  elementwise=False)
    assert traces.trace_cov == pytest.approx(ref_trace, rel=rel)
    for name, value in zip(noise._leaf_names(params), leaves(ref_var)):
        assert traces.trace_cov_per_layer[name] == pytest.approx(value.sum(), rel=layer_rel), \
            name

    sq_norms = jnp.asarray(noise.per_example_sq_norms(params, x, y, method=method))
    mean_f32 = [jnp.mean(a.astype(jnp.float32), axis=0) for a in leaves(g)]
    naive = float(jnp.mean(sq_norms) - sum(jnp.sum(jnp.square(m)) for m in mean_f32))
    assert abs(naive - ref_trace) > 10 * rel * ref_trace


# --------------------------------------------------------------------------------------------
# The dense path for any stack of Dense layers


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.width, use_bias=False)(x))


class CustomStack(nn.Module):
    """A Dense stack in other words: gelu and tanh, free names, a nested layer without a bias,
    and a row-wise (not elementwise) normalisation between layers."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.gelu(nn.Dense(12, name="encoder")(x))
        x = Block(7, name="block")(x)
        x = x / (1 + jnp.linalg.norm(x, axis=1, keepdims=True))
        return nn.Dense(10, name="head")(x)


def smoothed_cross_entropy(logits_BxK, labels_B):
    """Cross-entropy against labels smoothed by 0.1: a loss other than the default."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxK.shape[-1]), 0.1)
    return optax.softmax_cross_entropy(logits_BxK, targets)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x[..., None]))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class SharedDense(nn.Module):
    """One Dense layer called twice: its per-example gradient is no longer a_i delta_i^T."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(6, name="first")(x.reshape((x.shape[0], -1))))
        shared = nn.Dense(6, name="shared")
        return nn.Dense(10, name="out")(jnp.tanh(shared(jnp.tanh(shared(x)))))


class WithTemperature(nn.Module):
    """A parameter outside every Dense layer."""

    @nn.compact
    def __call__(self, x):
        temperature = self.param("temperature", nn.initializers.ones, ())
        return nn.Dense(10)(x.reshape((x.shape[0], -1))) / temperature


class RowsOfPixels(nn.Module):
    """A Dense layer on [B, 28, 28]: one example's gradient sums over its 28 rows."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(3)(x))
        return nn.Dense(10)(h.reshape((h.shape[0], -1)))


class TiedWeights(nn.Module):
    """A Dense kernel read again outside its layer's call (a tied decoder)."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        encoder = nn.Dense(6, name="encoder")
        h = jnp.tanh(encoder(x))
        return nn.Dense(10, name="out")(h @ encoder.variables["params"]["kernel"].T)


def doubled_dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None):
    return 2 * jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)


class OwnProduct(nn.Module):
    """A Dense layer whose product is not the plain one."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, dot_general=doubled_dot_general)(x.reshape((x.shape[0], -1)))


def loop_stats(model, params, x, y, loss_fn=cross_entropy):
    """Mean gradient and divisor-N variances from a Python loop of jax.grad, in float64."""
    single = jax.jit(jax.grad(lambda p, x_1, y_1: loss_fn(model.apply({"params": p}, x_1),
                                                          y_1)[0]))
    grads = [leaves(single(params, x[i:i + 1], y[i:i + 1])) for i in range(len(y))]
    stacked = [np.stack(g) for g in zip(*grads)]
    return [g.mean(0) for g in stacked], [g.var(0) for g in stacked]


@pytest.mark.parametrize("steps", [0, 100])
def test_three_layer_mlp_dense_path_equals_vmap_path(mnist, steps):
    x, y = mnist[0][:300], mnist[1][:300]
    model = MLP(hidden=(16, 8))  # layers "hidden_0", "hidden_1", "output"
    params = (trained_params(*mnist, hidden=None, steps=steps, model=model) if steps
              else init_params(model, jax.random.key(0), (28, 28)))
    layers = noise.dense_layers(params, x, model=model)
    names = noise._leaf_names(params)
    assert [(names[layer.kernel], names[layer.bias]) for layer in layers] == [
        ("hidden_0/kernel", "hidden_0/bias"), ("hidden_1/kernel", "hidden_1/bias"),
        ("output/kernel", "output/bias")]
    np.testing.assert_allclose(
        noise.per_example_sq_norms(params, x, y, model=model, method="dense"),
        noise.per_example_sq_norms(params, x, y, model=model, method="vmap"), rtol=1e-5)
    vmap = noise.gradient_stats(params, x, y, model=model, method="vmap", chunk_size=128)
    for elementwise in (True, False):
        dense = noise.gradient_stats(params, x, y, model=model, chunk_size=128,  # "auto"
                                     elementwise=elementwise)
        assert dense.method == "dense" and vmap.method == "vmap"
        assert_stats_close(dense, vmap)
    assert dense.variance is None
    # Weights whose every g_i is 0 (always-black pixels, dead units) are exact zeros in both.
    dense = noise.gradient_stats(params, x, y, model=model, chunk_size=128)
    assert dense.num_zero_variance == vmap.num_zero_variance > 0
    assert dense.mean_gsnr == pytest.approx(vmap.mean_gsnr, rel=1e-4)


def test_any_dense_stack_and_any_loss_take_the_dense_path(mnist):
    x, y = mnist[0][:150], mnist[1][:150]
    model = CustomStack()
    params = init_params(model, jax.random.key(3), (28, 28))
    layers = noise.dense_layers(params, x, model=model)
    names = noise._leaf_names(params)
    assert [(names[layer.kernel], layer.bias if layer.bias < 0 else names[layer.bias])
            for layer in layers] == [("encoder/kernel", "encoder/bias"),
                                     ("block/Dense_0/kernel", -1),
                                     ("head/kernel", "head/bias")]
    for loss_fn in (cross_entropy, smoothed_cross_entropy):
        vmap = noise.gradient_stats(params, x, y, model=model, loss_fn=loss_fn, method="vmap")
        for elementwise in (True, False):
            dense = noise.gradient_stats(params, x, y, model=model, loss_fn=loss_fn,
                                         chunk_size=64, elementwise=elementwise)
            assert dense.method == "dense"
            assert_stats_close(dense, vmap)
    mean, var = loop_stats(model, params, x, y, smoothed_cross_entropy)
    assert_tree_close(dense.mean_grad, jax.tree.unflatten(jax.tree.structure(params), mean),
                      rtol=1e-4, atol_frac=1e-5)
    assert dense.trace_cov == pytest.approx(sum(v.sum() for v in var), rel=1e-4)
    # An apply_fn that calls the model is recognised too (the Dense calls are what count).
    wrapped = noise.gradient_stats(params, x, y, apply_fn=lambda p, x_B: model.apply(
        {"params": p}, x_B), loss_fn=smoothed_cross_entropy, chunk_size=64, elementwise=False)
    assert wrapped.method == "dense" and wrapped.trace_cov == pytest.approx(dense.trace_cov,
                                                                           rel=1e-6)


@pytest.mark.parametrize("model_cls,reason", [
    (SmallCNN, "belong to no Dense layer"),
    (SharedDense, "called more than once"),
    (WithTemperature, "belong to no Dense layer"),
    (RowsOfPixels, "not \\[batch, features\\]"),
    (TiedWeights, "used outside a Dense layer"),
    (OwnProduct, "its own dot_general"),
])
def test_models_that_are_no_dense_stack_take_the_vmap_path(mnist, model_cls, reason):
    x, y = mnist[0][:24], mnist[1][:24]
    model = model_cls()
    params = init_params(model, jax.random.key(1), (28, 28))
    assert noise.dense_layers(params, x, model=model) is None
    stats = noise.gradient_stats(params, x, y, model=model, chunk_size=10)
    assert stats.method == "vmap"
    # Right, where closed forms for a_i delta_i^T would not be.
    mean, var = loop_stats(model, params, x, y)
    assert_tree_close(stats.mean_grad, jax.tree.unflatten(jax.tree.structure(params), mean),
                      rtol=1e-4, atol_frac=1e-5)
    assert_tree_close(stats.variance, jax.tree.unflatten(jax.tree.structure(params), var),
                      rtol=1e-4, atol_frac=1e-5)
    with pytest.raises(BatchjaxError, match=reason):
        noise.gradient_stats(params, x, y, model=model, method="dense")


def test_repeated_calls_compile_nothing_new(mnist):
    x, y = jnp.asarray(mnist[0][:150]), jnp.asarray(mnist[1][:150])
    model = MLP(hidden=(10, 5))
    params = [init_params(model, jax.random.key(seed), (28, 28)) for seed in (0, 1)]
    key = jax.random.key(0)

    def calls(p):
        noise.gradient_stats(p, x, y, model=model, chunk_size=64)
        noise.gradient_stats(p, x, y, model=model, chunk_size=64, elementwise=False)
        noise.gradient_stats(p, x, y, model=model, method="vmap", chunk_size=32)
        noise.empirical_minibatch_variance(p, x, y, 8, 10, key, model=model)
        noise.two_batch_noise_estimate(p, x, y, key, small_batch_size=2, big_batch_size=8,
                                       num_draws=4, model=model)
        noise.per_example_grads(p, x, y, model=model)
        noise.per_example_sq_norms(p, x, y, model=model)

    calls(params[0])
    with count_compiles() as compiles:
        calls(params[1])
    assert len(compiles) == 0
    # Other shapes do compile: the counter sees compilations.
    with count_compiles() as compiles:
        noise.gradient_stats(params[1], x[:99], y[:99], model=model, chunk_size=64)
    assert len(compiles) > 0


def test_repeated_calls_with_jax_arrays_copy_no_data_to_the_device(mnist):
    x_np, y_np = mnist[0][:130], mnist[1][:130]
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    x_N, y_N = noise._check_xy(x, y)
    assert x_N is x and y_N is y  # used as they are
    params = mlp_params(8)
    for elementwise in (True, False):
        noise.gradient_stats(params, x, y, chunk_size=64, elementwise=elementwise)
        with jax.transfer_guard_host_to_device("disallow"):
            noise.gradient_stats(params, x, y, chunk_size=64, elementwise=elementwise)
            with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
                noise.gradient_stats(params, x_np, y_np, chunk_size=64)  # copies its data


def test_noise_and_sharpness_import_nothing_from_train():
    code = ("import sys, batchjax.noise, batchjax.sharpness; "
            "print(sorted(m for m in sys.modules if m.startswith('batchjax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    loaded = out.stdout.strip()
    assert "batchjax.noise" in loaded and "batchjax.train" not in loaded


# --------------------------------------------------------------------------------------------
# Sampled estimates on real data


@pytest.fixture(scope="module")
def mnist_params(mnist):
    return {"init": mlp_params(128), "trained": trained_params(*mnist, hidden=128, steps=300)}


@pytest.mark.parametrize("state", ["init", "trained"])
def test_empirical_minibatch_variance_matches_the_analytic_value(mnist, mnist_params, state):
    x, y = mnist
    params = mnist_params[state]
    stats = noise.gradient_stats(params, x, y)
    for batch_size, num_batches in ((8, 2000), (32, 1000), (128, 500)):
        key = jax.random.key(batch_size)
        emp = noise.empirical_minibatch_variance(params, x, y, batch_size, num_batches, key,
                                                 mean_grad=stats.mean_grad)
        assert (emp.batch_size, emp.num_batches) == (batch_size, num_batches)
        analytic = stats.minibatch_variance(batch_size)
        assert abs(emp.mean - analytic) < 3 * emp.stderr, (batch_size, emp, analytic)
        assert emp.stderr < 0.05 * analytic


def check_within_stderr(est, grad_sq_norm, trace_cov, max_rel_err=0.1):
    # Both estimates are linear in two independent means of num_draws squared norms, so by the
    # central limit theorem they are normal with the reported standard errors: 4 of them bound
    # a false failure at 6e-5 per quantity. The errors themselves must be small.
    for value, err, exact in ((est.grad_sq_norm, est.grad_sq_norm_stderr, grad_sq_norm),
                              (est.trace_cov, est.trace_cov_stderr, trace_cov),
                              (est.noise_scale, est.noise_scale_stderr, trace_cov / grad_sq_norm)):
        assert abs(value - exact) < 4 * err and err < max_rel_err * exact, (value, err, exact)


@pytest.mark.parametrize("replace", [False, True])
def test_two_batch_estimate_closed_form_with_and_without_replacement(replace):
    # Ten examples with g_i = (i - 3, i - 3, i - 3): |G|^2 = 3 * 1.5^2, tr(Sigma) = 3 * 8.25.
    # At N = 10 the finite-population v(5) = 1/9 is half of 1/5: the wrong v(B) would fail.
    n = 10
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None] - 3, 3, axis=1)
    est = noise.two_batch_noise_estimate(
        {"w": jnp.zeros(3)}, x, np.zeros(n, np.int32), jax.random.key(3), small_batch_size=1,
        big_batch_size=5, num_draws=20000, replace=replace, apply_fn=linear_apply,
        loss_fn=identity_loss)
    assert est.replace is replace and (est.small_batch_size, est.big_batch_size) == (1, 5)
    check_within_stderr(est, 3 * 1.5**2, 3 * 8.25)


def test_two_batch_estimate_converges_to_the_exact_values_on_mnist(mnist, mnist_params):
    x, y = mnist
    params = mnist_params["trained"]
    stats = noise.gradient_stats(params, x, y)
    est = noise.two_batch_noise_estimate(params, x, y, jax.random.key(7), small_batch_size=16,
                                         big_batch_size=1024, num_draws=300)
    assert not est.replace and est.num_draws == 300
    check_within_stderr(est, stats.grad_sq_norm, stats.trace_cov)
    assert est.noise_scale == pytest.approx(stats.noise_scale, rel=0.3)


def test_empirical_variance_computes_the_full_batch_gradient_when_not_given(mnist):
    x, y = mnist[0][:500], mnist[1][:500]  # the shapes of the make_measure test
    params, key = mlp_params(16), jax.random.key(0)
    given = noise.empirical_minibatch_variance(
        params, x, y, 16, 50, key, mean_grad=noise.gradient_stats(params, x, y).mean_grad)
    computed = noise.empirical_minibatch_variance(params, x, y, 16, 50, key)
    assert computed.mean == pytest.approx(given.mean, rel=1e-5)
    assert computed.stderr == pytest.approx(given.stderr, rel=1e-4)


def test_sampling_arguments_are_checked(mnist):
    x, y = mnist[0][:20], mnist[1][:20]
    params, key = mlp_params(8), jax.random.key(0)
    with pytest.raises(BatchjaxError):
        noise.empirical_minibatch_variance(params, x, y, 21, 10, key)
    with pytest.raises(BatchjaxError):
        noise.empirical_minibatch_variance(params, x, y, 4, 1, key)
    with pytest.raises(BatchjaxError):
        noise.two_batch_noise_estimate(params, x, y, key, small_batch_size=8,
                                       big_batch_size=8, num_draws=10)
    with pytest.raises(BatchjaxError):
        noise.gradient_stats(params, x, y, chunk_size=0)
    with pytest.raises(BatchjaxError, match="method='dense' needs a stack of flax.linen.Dense"):
        noise.gradient_stats({"w": jnp.zeros((784,))}, x, y, method="dense",
                             apply_fn=lambda p, a: a.reshape((len(a), -1)) * p["w"][None, :])
    with pytest.raises(BatchjaxError):
        noise.gradient_stats(params, x, y, method="fast")
    with pytest.raises(BatchjaxError):
        noise.gradient_stats({"w": jnp.zeros(3)}, x, y)  # not an MLP and no model or apply_fn
    with pytest.raises(BatchjaxError, match="either model or apply_fn"):
        noise.gradient_stats(params, x, y, model=seed_mlp(8), apply_fn=linear_apply)
    with pytest.raises(BatchjaxError, match="one loss per example"):
        noise.gradient_stats(params, x, y, loss_fn=lambda out, lab: jnp.mean(
            cross_entropy(out, lab)))


# --------------------------------------------------------------------------------------------
# make_measure


class _Data:
    def __init__(self, x, y):
        self.x_train, self.y_train, self.num_classes, self.num_train = x, y, 10, len(y)


RECORD_KEYS = {"step", "examples_seen", "train_loss", "grad_sq_norm", "trace_cov",
               "trace_cov_per_layer", "noise_scale", "minibatch_variance", "snr",
               "empirical", "probe_size", "method", "seconds"}


def test_make_measure_records_every_seed_and_batch_size_without_recompiling(mnist):
    data = _Data(mnist[0][:600], mnist[1][:600])
    config = TrainConfig.tiny(probe_size=500)
    model = seed_mlp(16)
    measure = noise.make_measure(data, config, batch_sizes=[8, 32, 128], empirical_batches=50,
                                 model=model)
    params_list = [mlp_params(16, seed) for seed in (0, 1)]
    first = measure(params_list, 10, 160)
    sizes = (noise._window_moments._cache_size(), noise._minibatch_sq_norms._cache_size())
    with count_compiles() as compiles:
        second = measure(params_list, 10, 160)
        third = measure(params_list, 11, 176)
    assert len(compiles) == 0
    assert (noise._window_moments._cache_size(),
            noise._minibatch_sq_norms._cache_size()) == sizes
    assert len(first) == 2 and all(len(records) == 1 for records in first)
    for records in first:
        r = records[0]
        assert set(r) == RECORD_KEYS and json.loads(json.dumps(r)) == r
        assert (r["step"], r["examples_seen"], r["probe_size"]) == (10, 160, 500)
        assert r["method"] == "dense"
        assert set(r["minibatch_variance"]) == set(r["snr"]) == {"8", "32", "128"}
        assert set(r["trace_cov_per_layer"]) == {"hidden/kernel", "hidden/bias",
                                                "output/kernel", "output/bias"}
        emp = r["empirical"]
        assert (emp["batch_size"], emp["num_batches"]) == (16, 50)
        assert abs(emp["mean"] - emp["analytic"]) < 4 * emp["stderr"]
    # Deterministic given the step; seeds and steps draw different minibatches.
    strip = lambda rs: [{k: v for k, v in r[0].items() if k != "seconds"} for r in rs]  # noqa
    assert strip(first) == strip(second)
    assert first[0][0]["empirical"]["mean"] != third[0][0]["empirical"]["mean"]
    assert first[0][0]["trace_cov"] != first[1][0]["trace_cov"]
    # With the per-parameter variances, the same record plus the mean GSNR of the probe set.
    full = noise.make_measure(data, config, batch_sizes=[8, 32, 128], empirical_batches=50,
                              elementwise=True, model=model)(params_list, 10, 160)
    stats = noise.gradient_stats(params_list[0], data.x_train[:500], data.y_train[:500])
    assert set(full[0][0]) == RECORD_KEYS | {"mean_gsnr"}
    assert full[0][0]["mean_gsnr"] == pytest.approx(stats.mean_gsnr, rel=1e-6)
    assert full[0][0]["trace_cov"] == pytest.approx(first[0][0]["trace_cov"], rel=1e-5)
    with pytest.raises(BatchjaxError):
        noise.make_measure(data, TrainConfig.tiny(probe_size=601), batch_sizes=[8])
    with pytest.raises(BatchjaxError):
        noise.make_measure(data, config, batch_sizes=[501])


def test_make_measure_defaults_to_the_mlp_of_the_config(mnist):
    data = _Data(mnist[0][:300], mnist[1][:300])
    config = TrainConfig.tiny(probe_size=256)  # hidden (16,)
    params = mlp_params(16)
    record = noise.make_measure(data, config, batch_sizes=[8], empirical_batches=20)(
        [params], 3, 48)[0][0]
    stats = noise.gradient_stats(params, data.x_train[:256], data.y_train[:256],
                                 model=seed_mlp(16), elementwise=False)
    assert record["method"] == "dense"
    assert record["trace_cov"] == pytest.approx(stats.trace_cov, rel=1e-6)


def test_the_sampled_check_draws_from_the_noise_stream_of_the_seed(mnist):
    x, y = mnist[0][:300], mnist[1][:300]
    data, model = _Data(x, y), seed_mlp(16)
    config = TrainConfig.tiny(probe_size=256, batch_size=8)
    params = mlp_params(16, 5)
    record = noise.make_measure(data, config, batch_sizes=[8], seeds=[5], empirical_batches=30,
                                model=model)([params], 7, 56)[0][0]
    stats = noise.gradient_stats(params, x[:256], y[:256], model=model)
    expected = noise.empirical_minibatch_variance(
        params, x[:256], y[:256], 8, 30, stream_key(5, "noise", 7), model=model,
        mean_grad=stats.mean_grad)
    assert record["empirical"]["mean"] == pytest.approx(expected.mean, rel=1e-6)
    assert record["empirical"]["stderr"] == pytest.approx(expected.stderr, rel=1e-5)
    # The old key fold_in(fold_in(key(seed), step), 0) draws other minibatches.
    old = noise.empirical_minibatch_variance(
        params, x[:256], y[:256], 8, 30,
        jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 7), 0), model=model,
        mean_grad=stats.mean_grad)
    assert old.mean != pytest.approx(expected.mean, rel=1e-6)


def test_make_measure_with_the_model_and_loss_that_trained(mnist):
    x, y = mnist[0][:300], mnist[1][:300]
    model = MLP(hidden=(12, 6))
    params = init_params(model, jax.random.key(2), (28, 28))
    loss_fn = smoothed_cross_entropy
    record = noise.make_measure(_Data(x, y), TrainConfig.tiny(probe_size=256),
                                batch_sizes=[8], empirical_batches=20, model=model,
                                loss_fn=loss_fn)([params], 0, 0)[0][0]
    vmap = noise.gradient_stats(params, x[:256], y[:256], model=model, loss_fn=loss_fn,
                                method="vmap")
    assert record["method"] == "dense"
    assert set(record["trace_cov_per_layer"]) == set(vmap.trace_cov_per_layer) == {
        f"{layer}/{leaf}" for layer in ("hidden_0", "hidden_1", "output")
        for leaf in ("kernel", "bias")}
    assert record["trace_cov"] == pytest.approx(vmap.trace_cov, rel=1e-5)
    assert record["train_loss"] == pytest.approx(vmap.mean_loss, rel=1e-6)


def test_group_measure_keyed_by_seed_equals_single_seed_measures(mnist):
    data = _Data(mnist[0][:300], mnist[1][:300])
    config = TrainConfig.tiny(probe_size=256)
    model = seed_mlp(16)
    params = {seed: mlp_params(16, seed) for seed in (3, 7)}
    group = noise.make_measure(data, config, batch_sizes=[8], seeds=[3, 7], empirical_batches=20,
                               model=model)
    together = group([params[3], params[7]], 5, 80)
    for i, seed in enumerate((3, 7)):
        alone = noise.make_measure(data, dataclasses.replace(config, seed=seed), batch_sizes=[8],
                                   empirical_batches=20, model=model)([params[seed]], 5, 80)
        assert together[i][0]["empirical"] == alone[0][0]["empirical"]
    # Order in the group does not matter: the key follows the seed, not the position.
    swapped = noise.make_measure(data, config, batch_sizes=[8], seeds=[7, 3],
                                 empirical_batches=20, model=model)([params[7], params[3]], 5, 80)
    assert swapped[1][0]["empirical"] == together[0][0]["empirical"]


# 99.9% quantiles of chi-square with C(n, size) - 1 degrees of freedom.
@pytest.mark.parametrize("n,size,chi2_999", [(6, 3, 43.82), (7, 1, 22.46), (9, 2, 66.62),
                                             (5, 5, None)])
def test_random_subsets_are_distinct_and_uniform(n, size, chi2_999):
    # Floyd's sampler: every one of the C(n, size) subsets equally likely. A chi-square test at
    # a fixed key, against the 99.9% quantile (a correct sampler fails it with p = 0.001).
    import collections
    import itertools
    draws = 20 * math.comb(n, size) * 100
    subsets_DxS = np.asarray(jax.jit(jax.vmap(lambda k: noise._random_subset(k, n, size)))(
        jax.random.split(jax.random.key(n * 10 + size), draws)))
    assert subsets_DxS.min() >= 0 and subsets_DxS.max() < n
    assert all(len(set(row)) == size for row in subsets_DxS)
    counts = collections.Counter(tuple(sorted(row)) for row in subsets_DxS)
    if chi2_999 is None:  # size == n: the only subset is everything
        assert list(counts) == [tuple(range(n))]
        return
    expected = draws / math.comb(n, size)
    chi2 = sum((counts[c] - expected) ** 2 / expected
               for c in itertools.combinations(range(n), size))
    assert chi2 < chi2_999
