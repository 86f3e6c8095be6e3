"""Property-based tests of the noise estimators over random shapes, chunk sizes and data."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchjax.losses import cross_entropy
from batchjax.model import MLP, init_params
from batchjax.noise import gradient_stats, per_example_grads

SETTINGS = settings(max_examples=3, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def seed_mlp(hidden, num_classes):
    """batchjax's MLP with one hidden layer of `hidden` units ("hidden" and "output")."""
    return MLP(hidden=(hidden,), num_classes=num_classes)


@st.composite
def problems(draw):
    """A small MLP, its data and a chunk size, all of random shape."""
    n = draw(st.integers(1, 37))
    height = draw(st.integers(1, 5))
    width = draw(st.integers(1, 4))
    hidden = draw(st.integers(1, 6))
    classes = draw(st.integers(2, 5))
    chunk = draw(st.integers(1, n + 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.random((n, height, width), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    params = init_params(seed_mlp(hidden, classes), jax.random.key(seed), (height, width))
    return params, x, y, chunk


@SETTINGS
@given(problems(), st.sampled_from(["dense", "vmap"]))
def test_variances_are_non_negative_and_minibatch_variance_falls_with_batch_size(problem, method):
    params, x, y, chunk = problem
    n = len(y)
    stats = gradient_stats(params, x, y, chunk_size=chunk, method=method)
    assert stats.num_examples == n
    assert stats.trace_cov >= 0 and stats.grad_sq_norm >= 0
    assert all(v >= 0 for v in stats.trace_cov_per_layer.values())
    assert all((np.asarray(v) >= 0).all() for v in jax.tree.leaves(stats.variance))
    assert np.isclose(sum(stats.trace_cov_per_layer.values()), stats.trace_cov, rtol=1e-9)
    variances = np.asarray(stats.minibatch_variance(np.arange(1, n + 1)))
    assert variances[-1] == 0.0
    assert (np.diff(variances) <= 1e-12 * max(variances[0], 1e-30)).all()
    assert variances[0] == np.float64(stats.trace_cov) or np.isclose(variances[0], stats.trace_cov)
    if n == 1:
        assert stats.trace_cov == 0.0
    if stats.grad_sq_norm > 0:
        assert stats.noise_scale >= 0


@SETTINGS
@given(problems(), st.sampled_from(["dense", "vmap"]))
def test_traces_alone_equal_the_sums_of_per_example_gradient_variances(problem, method):
    params, x, y, chunk = problem
    g = per_example_grads(params, x, y)
    per_leaf = [np.asarray(a, np.float64).reshape(len(y), -1) for a in jax.tree.leaves(g)]
    var_sums = [a.var(0).sum() for a in per_leaf]
    scale = sum(np.square(a).mean(0).sum() for a in per_leaf)  # E|g|^2: rounding's yardstick
    stats = gradient_stats(params, x, y, chunk_size=chunk, method=method, elementwise=False)
    assert stats.variance is None and stats.mean_gsnr is None
    for got, want in zip(stats.trace_cov_per_layer.values(), var_sums):
        assert got >= 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(stats.trace_cov, sum(var_sums), rtol=1e-4, atol=1e-6 * scale)


@SETTINGS
@given(problems(), st.floats(0.01, 100.0))
def test_noise_scale_is_invariant_to_scaling_the_loss(problem, scale):
    params, x, y, chunk = problem
    model = seed_mlp(params["hidden"]["kernel"].shape[1], params["output"]["kernel"].shape[1])

    def scaled_loss(logits_BxK, y_B):
        return scale * cross_entropy(logits_BxK, y_B)

    plain = gradient_stats(params, x, y, model=model, chunk_size=chunk, method="vmap")
    scaled = gradient_stats(params, x, y, model=model, chunk_size=chunk, method="vmap",
                            loss_fn=scaled_loss)
    # G scales by c and Sigma by c^2, so B_simple = tr(Sigma) / |G|^2 does not change.
    np.testing.assert_allclose(scaled.grad_sq_norm, scale**2 * plain.grad_sq_norm, rtol=1e-4,
                               atol=1e-12)
    np.testing.assert_allclose(scaled.trace_cov, scale**2 * plain.trace_cov, rtol=1e-4,
                               atol=1e-12)
    if plain.grad_sq_norm > 1e-8 and plain.trace_cov > 1e-8:
        np.testing.assert_allclose(scaled.noise_scale, plain.noise_scale, rtol=1e-3)
    # Any per-example loss takes the dense path, with the vmap path's values.
    dense = gradient_stats(params, x, y, model=model, chunk_size=chunk, loss_fn=scaled_loss,
                           elementwise=False)
    assert dense.method == "dense"
    np.testing.assert_allclose(dense.trace_cov, scaled.trace_cov, rtol=1e-4,
                               atol=1e-6 * scale**2)
    np.testing.assert_allclose(dense.grad_sq_norm, scaled.grad_sq_norm, rtol=1e-4,
                               atol=1e-6 * scale**2)


@settings(SETTINGS, max_examples=2)
@given(st.integers(1, 40), st.integers(1, 45))
def test_identical_examples_have_no_variance_whatever_the_chunking(n, chunk):
    rng = np.random.default_rng(n * 100 + chunk)
    one = rng.random((1, 4, 3), dtype=np.float32)
    x = np.repeat(one, n, axis=0)
    y = np.full(n, 2, np.int32)
    model = seed_mlp(5, 4)
    params = init_params(model, jax.random.key(n), (4, 3))
    for method, elementwise in [(m, e) for m in ("dense", "vmap") for e in (True, False)]:
        stats = gradient_stats(params, x, y, chunk_size=chunk, method=method,
                               elementwise=elementwise)
        assert stats.trace_cov == 0.0 or stats.trace_cov < 1e-12 * stats.grad_sq_norm
        assert stats.minibatch_variance(1) <= 1e-12 * stats.grad_sq_norm + 1e-30
        assert stats.grad_sq_norm > 0
        np.testing.assert_allclose(
            jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(stats.mean_grad)]),
            jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(
                jax.grad(lambda p: cross_entropy(model.apply({"params": p}, one),
                                                 y[:1]).mean())(params))]),
            rtol=1e-4, atol=1e-7)
