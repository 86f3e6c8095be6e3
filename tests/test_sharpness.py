"""Sharpness against the exact Hessian of a small MLP and of a quadratic with a known Hessian."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from batchjax import BatchjaxError
from batchjax.losses import cross_entropy, example_losses_fn, model_apply_fn
from batchjax.model import MLP, init_params
from batchjax.sharpness import _hvp, sharpness
from compiles import count_compiles


def seed_mlp(hidden, num_classes):
    """batchjax's MLP with one hidden layer of `hidden` units ("hidden" and "output")."""
    return MLP(hidden=(hidden,), num_classes=num_classes)


MODEL = seed_mlp(4, 3)  # 36*4 + 4 + 4*3 + 3 = 163 parameters on 6x6 inputs
NUM_EXAMPLES = 60


def mean_loss(params, x, y):
    return jnp.mean(cross_entropy(MODEL.apply({"params": params}, x), y))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_EXAMPLES, 6, 6)).astype(np.float32)
    teacher = rng.normal(size=(36, 3))
    y = np.argmax(x.reshape(NUM_EXAMPLES, -1) @ teacher + rng.normal(size=(NUM_EXAMPLES, 3)),
                  axis=1).astype(np.int32)
    return x, y


@pytest.fixture(scope="module")
def points(data):
    """Parameters at initialisation and after 300 full-batch Adam steps."""
    x, y = data
    init = init_params(MODEL, jax.random.key(1), (6, 6))
    optimizer = optax.adam(0.03)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(mean_loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    (trained, _), _ = jax.jit(lambda p: jax.lax.scan(
        step, (p, optimizer.init(p)), None, length=300))(init)
    return {"init": init, "trained": trained}


def exact_hessian(params, x, y) -> np.ndarray:
    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda f: mean_loss(unravel(f), x, y)))(flat)
    hessian = np.asarray(hessian, np.float64)
    return (hessian + hessian.T) / 2


@pytest.mark.parametrize("point", ["init", "trained"])
def test_extreme_eigenvalues_match_the_exact_hessian(data, points, point):
    x, y = data
    params = points[point]
    eigenvalues = np.linalg.eigvalsh(exact_hessian(params, x, y))
    # The claim that needs Lanczos rather than power iteration: the spectrum has both signs.
    assert eigenvalues[0] < 0 < eigenvalues[-1]
    result = sharpness(params, x, y, num_iters=163, tol=1e-6, hutchinson_samples=0)
    radius = np.abs(eigenvalues).max()
    assert result.converged
    assert abs(result.lambda_max - eigenvalues[-1]) <= 1e-3 * abs(eigenvalues[-1])
    assert abs(result.lambda_min - eigenvalues[0]) <= 1e-3 * radius
    assert result.spectral_radius == pytest.approx(radius, rel=1e-3)
    assert result.num_params == 163 and result.num_examples == NUM_EXAMPLES


def test_default_tolerance_converges_in_few_iterations(data, points):
    x, y = data
    result = sharpness(points["trained"], x, y, hutchinson_samples=0)
    top = np.linalg.eigvalsh(exact_hessian(points["trained"], x, y))[-1]
    assert result.converged and result.iterations < 100
    assert result.lambda_max_residual <= 1e-3
    assert abs(result.lambda_max - top) <= 1e-3 * abs(top)
    assert result.relative_change < 1e-3


def test_hutchinson_trace_within_four_standard_errors_and_the_error_shrinks(data, points):
    x, y = data
    exact = np.trace(exact_hessian(points["trained"], x, y))
    few = sharpness(points["trained"], x, y, num_iters=2, hutchinson_samples=20,
                    key=jax.random.key(3))
    many = sharpness(points["trained"], x, y, num_iters=2, hutchinson_samples=320,
                     key=jax.random.key(4))
    for result in (few, many):
        assert abs(result.trace - exact) <= 4 * result.trace_stderr
    # The standard error goes as 1/sqrt(samples): 16x the probes, about 1/4 the error.
    assert many.trace_stderr < few.trace_stderr / 2


def test_chunked_equals_unchunked(data, points):
    x, y = data
    params = points["trained"]
    flat, _ = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(0), flat.shape)
    exact_hv = exact_hessian(params, x, y) @ np.asarray(v, np.float64)
    for chunk_size in (7, 32, NUM_EXAMPLES):  # 7 and 32 leave a partial last chunk
        hv = _hvp(params, v, jnp.asarray(x), jnp.asarray(y),
                  example_losses=example_losses_fn(model_apply_fn(MODEL)),
                  chunk_size=chunk_size)
        np.testing.assert_allclose(np.asarray(hv), exact_hv, rtol=1e-4,
                                   atol=1e-5 * np.abs(exact_hv).max())
    whole, chunked = (sharpness(params, x, y, chunk_size=c, hutchinson_samples=10,
                                key=jax.random.key(5)) for c in (NUM_EXAMPLES, 7))
    assert chunked.lambda_max == pytest.approx(whole.lambda_max, rel=1e-5)
    assert chunked.trace == pytest.approx(whole.trace, rel=1e-5)


def rotated(spectrum: np.ndarray, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(spectrum.size,) * 2))
    return q @ np.diag(spectrum) @ q.T


QUADRATIC_SPECTRUM = np.array([-5.0, -1.0, 0.5, 2.0, 3.0])
QUADRATIC_A = jnp.asarray(rotated(QUADRATIC_SPECTRUM, seed=1), jnp.float32)


def offsets(params, x_B):
    """apply_fn: d_i = w - x_i, the output whose quadratic form is the loss."""
    return params["w"][None, :] - x_B


def quadratic_form(d_BxP, y_B):
    """loss_fn: l_i = 0.5 d_i^T A d_i, so l_i(w) = 0.5 (w - x_i)^T A (w - x_i) and the mean
    loss has Hessian A at every w."""
    del y_B
    return 0.5 * jnp.einsum("bi,ij,bj->b", d_BxP, QUADRATIC_A, d_BxP)


class Offsets(nn.Module):
    """The same offsets as a flax module with the parameter w."""

    @nn.compact
    def __call__(self, x_B):
        return self.param("w", nn.initializers.zeros, (x_B.shape[1],))[None, :] - x_B


def test_quadratic_with_known_hessian():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(13, 5)).astype(np.float32)
    y = np.zeros(13, np.int32)
    params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
    results = [sharpness(params, x, y, loss_fn=quadratic_form, chunk_size=4,
                         hutchinson_samples=200, **how)
               for how in ({"apply_fn": offsets}, {"model": Offsets()})]
    for result in results:
        # The most negative eigenvalue is the largest in magnitude: power iteration would
        # return -5; the largest algebraic eigenvalue is 3.
        assert result.lambda_max == pytest.approx(3.0, rel=1e-5)
        assert result.lambda_min == pytest.approx(-5.0, rel=1e-5)
        assert result.spectral_radius == pytest.approx(5.0, rel=1e-5)
        assert result.converged and result.iterations <= 5
        assert abs(result.trace - QUADRATIC_SPECTRUM.sum()) <= 4 * result.trace_stderr
    assert results[0].trace == pytest.approx(results[1].trace, rel=1e-5)


def test_result_is_json_and_the_hvp_compiles_once_per_shape(data, points):
    x, y = data
    sharpness(points["init"], x, y, num_iters=3, hutchinson_samples=2, chunk_size=16)
    compiled = _hvp._cache_size()
    result = sharpness(points["trained"], x, y, num_iters=5, hutchinson_samples=3,
                       chunk_size=16)
    assert _hvp._cache_size() == compiled
    # The same shapes again, at other parameters, with another key, given the model or not, on
    # NumPy or jax arrays: nothing at all is compiled.
    key = jax.random.key(9)
    with count_compiles() as compiles:
        sharpness(points["trained"], x, y, num_iters=3, hutchinson_samples=2, chunk_size=16,
                  key=key)
        sharpness(points["init"], jnp.asarray(x), jnp.asarray(y), model=MODEL, num_iters=4,
                  hutchinson_samples=2, chunk_size=16, key=key)
    assert len(compiles) == 0
    record = json.loads(json.dumps(result.to_dict()))
    assert record["iterations"] == result.iterations and record["trace"] == result.trace


def test_bad_input_raises(data, points):
    x, y = data
    with pytest.raises(BatchjaxError, match="either model or apply_fn"):
        sharpness(points["init"], x, y, model=MODEL, apply_fn=model_apply_fn(MODEL))
    with pytest.raises(BatchjaxError, match="one loss per example"):
        sharpness(points["init"], x, y, loss_fn=lambda out, lab: jnp.mean(
            cross_entropy(out, lab)))
    with pytest.raises(BatchjaxError, match="same positive number"):
        sharpness(points["init"], x, y[:-1])
    with pytest.raises(BatchjaxError, match="num_iters"):
        sharpness(points["init"], x, y, num_iters=0)
    with pytest.raises(BatchjaxError, match="not those of batchjax.MLP"):
        sharpness({"w": jnp.zeros(3)}, x, y)
