"""Sharpness: the extreme eigenvalues and the trace of the training-loss Hessian.

L(theta) = (1/N) sum_i l_i(theta) is the MEAN training loss over the N examples given, and
H = d^2 L / d theta^2 its Hessian over all P parameters (flattened with
`jax.flatten_util.ravel_pytree`). H is never formed: everything is built on Hessian-vector
products H v = d/de grad L(theta + e v), forward-over-reverse (`jax.jvp` of `jax.grad`;
Pearlmutter 1994), at the cost of about two gradients.

Chunks. The examples are cut into chunks c of n_c examples; H v = sum_c (n_c / N) H_c v, where
H_c is the Hessian of the chunk's mean loss, so memory depends on the chunk size, not on N.
One jitted function runs the whole pass (a `lax.scan` over the full chunks, then the remainder),
compiled once per shape of (params, x, y, chunk_size).

Eigenvalues. Power iteration converges to the eigenvalue of largest MAGNITUDE, and the loss
Hessian of a ReLU network, even near a minimum, has negative eigenvalues: when the most negative
one is the larger in magnitude, power iteration returns it, not the sharpness. We use Lanczos
with full reorthogonalisation (Golub & Van Loan, "Matrix Computations", 4th ed., sec. 10.1;
Ghorbani et al. 2019, arXiv:1901.10159), which yields both ends of the spectrum at once:
  lambda_max  the largest ALGEBRAIC eigenvalue, the "sharpness" reported everywhere here
              (Keskar et al. 2017, arXiv:1609.04836; Cohen et al. 2021, arXiv:2103.00065);
  lambda_min  the smallest algebraic eigenvalue (negative: the point is not a minimum).
The largest magnitude, what power iteration would give, is max(|lambda_max|, |lambda_min|).
Convergence is judged by the Ritz residual |H y - theta y| = beta_k |s_k|, available at no
cost from the tridiagonal matrix; an eigenvalue of H lies within it of each Ritz value theta.

Trace. Hutchinson's estimator tr(H) = E[v^T H v] for Rademacher probes v (entries +-1 with
probability 1/2; Hutchinson 1990), unbiased with variance 2 sum_{i != j} H_ij^2, the lowest of
any probe with i.i.d. entries. We report the mean over the probes and its standard error
(sample standard deviation / sqrt(samples)).

Precision: Hessian-vector products are computed in the parameters' dtype (float32), Lanczos
and the probe averages in float64 on the host.

In a sweep (`SharpnessSettings`, measured at the end of each run) the defaults are lighter
than those of `sharpness`: the first 1,024 training examples, a relative Ritz residual of 1e-2
(lambda_max within 1%), and 20 probes (a trace standard error of about 5% on the trained MLP,
reported with every value).

The model and the loss follow `batchjax.losses`: a flax `model` or an `apply_fn`, and a
per-example `loss_fn(outputs_B, labels_B) -> losses_B` (default cross-entropy); L is the mean of
the per-example losses. One Hessian-vector product is compiled per shape of (params, x, y,
chunk_size) and per model and loss, and reused by every later call.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from batchjax.errors import BatchjaxError
from batchjax.losses import ApplyFn, ExampleLossFn, LossFn
from batchjax.model import Params
from batchjax.noise import _check_xy, _resolve_loss

# 1,024 examples of MNIST per chunk keep the forward-over-reverse intermediates of the
# 101,770-parameter MLP around 10 MB.
CHUNK_SIZE = 1024


def _chunk_mean_loss(example_losses: ExampleLossFn, params, x_C, y_C) -> jax.Array:
    """The chunk's mean loss, from the per-example losses."""
    return jnp.mean(example_losses(params, x_C, y_C))


@functools.partial(jax.jit, static_argnames=("example_losses", "chunk_size"))
def _hvp(params, v_P, x_N, y_N, *, example_losses, chunk_size):
    """H v for the mean loss over all N examples; v and H v are flat vectors of P entries."""
    _, unravel = ravel_pytree(params)
    tangent = unravel(v_P)
    num_examples = x_N.shape[0]
    grad_fn = jax.grad(functools.partial(_chunk_mean_loss, example_losses))

    def chunk_hvp(x_C, y_C):
        _, hv = jax.jvp(lambda p: grad_fn(p, x_C, y_C), (params,), (tangent,))
        return ravel_pytree(hv)[0]

    num_full, tail = divmod(num_examples, chunk_size)
    hv_P = jnp.zeros_like(v_P)
    if num_full:
        xs = x_N[: num_full * chunk_size].reshape((num_full, chunk_size) + x_N.shape[1:])
        ys = y_N[: num_full * chunk_size].reshape((num_full, chunk_size) + y_N.shape[1:])
        hv_P, _ = jax.lax.scan(lambda acc, xy: (acc + chunk_hvp(*xy), None), hv_P, (xs, ys))
        hv_P = hv_P * (chunk_size / num_examples)
    if tail:
        hv_P = hv_P + chunk_hvp(x_N[num_full * chunk_size:], y_N[num_full * chunk_size:]) * (
            tail / num_examples)
    return hv_P


@dataclasses.dataclass(frozen=True)
class SharpnessSettings:
    """How a sweep measures sharpness at the end of each run (see the module docstring).

    Attributes:
      probe_size: the Hessian is that of the mean loss over the first min(probe_size, N)
        training examples (0: all N).
      num_iters: most Lanczos iterations.
      tol: Lanczos tolerance, the relative Ritz residual of both extreme eigenvalues.
      hutchinson_samples: Rademacher probes for the trace.
    """

    probe_size: int = 1024
    num_iters: int = 100
    tol: float = 1e-2
    hutchinson_samples: int = 20

    def __post_init__(self):
        _check_count("probe_size", self.probe_size, 0)
        _check_count("num_iters", self.num_iters, 1)
        _check_count("hutchinson_samples", self.hutchinson_samples, 0)
        if isinstance(self.tol, bool) or not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise BatchjaxError(f"tol must be a number > 0, got {self.tol!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SharpnessResult:
    """Extreme Hessian eigenvalues by Lanczos and the Hessian trace by Hutchinson.

    Attributes:
      lambda_max: largest algebraic eigenvalue of H (the sharpness), the top Ritz value.
      lambda_min: smallest algebraic eigenvalue of H, the bottom Ritz value.
      lambda_max_residual: |H y - lambda_max y| for its unit Ritz vector y, relative to
        |lambda_max|: H has an eigenvalue within this relative distance of lambda_max. It is
        Lanczos' estimate and can fall far below the ~1e-6 relative accuracy that the float32
        Hessian-vector products allow.
      lambda_min_residual: the same for lambda_min, relative to max(|lambda_max|, |lambda_min|).
      relative_change: |change of lambda_max in the last iteration| / |lambda_max|.
      iterations: Lanczos iterations run (one Hessian-vector product each).
      converged: both residuals fell below the tolerance (or the Krylov space became
        invariant, which makes the Ritz values exact).
      trace: Hutchinson's estimate of tr(H), or None when no probes were asked for.
      trace_stderr: its standard error (None with fewer than two probes).
      hutchinson_samples: number of Rademacher probes.
      num_examples: N, the examples the mean loss is over.
      num_params: P.
      seconds: wall time of the whole measurement, compilation included.
    """

    lambda_max: float
    lambda_min: float
    lambda_max_residual: float
    lambda_min_residual: float
    relative_change: float
    iterations: int
    converged: bool
    trace: float | None
    trace_stderr: float | None
    hutchinson_samples: int
    num_examples: int
    num_params: int
    seconds: float

    @property
    def spectral_radius(self) -> float:
        """Largest |eigenvalue|: what power iteration would converge to."""
        return max(abs(self.lambda_max), abs(self.lambda_min))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return dataclasses.asdict(self)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BatchjaxError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _lanczos(matvec: Callable[[np.ndarray], np.ndarray], v0_P: np.ndarray, num_iters: int,
             tol: float) -> dict[str, Any]:
    """Extreme Ritz values of a symmetric operator, Lanczos with full reorthogonalisation."""
    basis_KxP = np.zeros((min(num_iters, v0_P.size), v0_P.size))
    basis_KxP[0] = v0_P / np.linalg.norm(v0_P)
    alphas: list[float] = []
    betas: list[float] = []
    top_prev = np.nan
    out: dict[str, Any] = {}
    for k in range(basis_KxP.shape[0]):
        w_P = matvec(basis_KxP[k])
        alphas.append(float(basis_KxP[k] @ w_P))
        q_KxP = basis_KxP[: k + 1]
        # Without full reorthogonalisation the basis loses orthogonality as soon as a Ritz
        # value converges, and spurious copies of it appear; one pass of classical Gram-Schmidt
        # leaves rounding errors, a second removes them (Kahan's "twice is enough", in Parlett,
        # "The Symmetric Eigenvalue Problem", 1980).
        for _ in range(2):
            w_P = w_P - q_KxP.T @ (q_KxP @ w_P)
        beta = float(np.linalg.norm(w_P))
        ritz, vecs = np.linalg.eigh(
            np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        top, bottom = float(ritz[-1]), float(ritz[0])
        scale = max(abs(top), abs(bottom), np.finfo(np.float64).tiny)
        top_scale = max(abs(top), scale * 1e-12)
        out = dict(lambda_max=top, lambda_min=bottom,
                   lambda_max_residual=float(beta * abs(vecs[-1, -1]) / top_scale),
                   lambda_min_residual=float(beta * abs(vecs[-1, 0]) / scale),
                   relative_change=float(abs(top - top_prev) / top_scale) if k else float("nan"),
                   iterations=k + 1)
        # The operator's float32 rounding makes beta ~1e-7 |H| rather than 0 once the Krylov
        # space is invariant (always, when P <= num_iters).
        invariant = beta <= 1e-6 * scale or k + 1 == v0_P.size
        done = out["lambda_max_residual"] <= tol and out["lambda_min_residual"] <= tol
        if invariant or done:
            out["converged"] = True
            return out
        if k + 1 < basis_KxP.shape[0]:
            top_prev = top
            betas.append(beta)
            basis_KxP[k + 1] = w_P / beta
    out["converged"] = False
    return out


def sharpness(params: Params, x: Any, y: Any, *, model: nn.Module | None = None,
              apply_fn: ApplyFn | None = None, loss_fn: LossFn | None = None,
              num_iters: int = 100, tol: float = 1e-3, key: jax.Array | None = None,
              chunk_size: int = CHUNK_SIZE, hutchinson_samples: int = 100) -> SharpnessResult:
    """Largest and smallest Hessian eigenvalues (Lanczos) and the trace (Hutchinson).

    Args:
      params: the point at which the Hessian is taken, a pytree of float arrays.
      x: inputs [N, ...] of the examples the mean loss is over (the training set, usually).
      y: their labels [N].
      model: the flax model; defaults to `batchjax.model.model_from_params(params)`.
      apply_fn: instead of a model, `apply_fn(params, x_B) -> outputs_B`.
      loss_fn: `loss_fn(outputs_B, labels_B) -> losses_B`, one loss per example; default
        cross-entropy. Pass the same `model`/`apply_fn` and `loss_fn` objects to repeated
        calls: the compiled Hessian-vector product is kept per pair.
      num_iters: most Lanczos iterations (Hessian-vector products over all N examples).
      tol: stop when both extreme Ritz residuals, relative to the spectral radius (to
        |lambda_max| for the top one), are at most `tol`.
      key: randomness for the Lanczos start vector and the probes (default `key(0)`).
      chunk_size: examples per Hessian-vector product chunk; changes memory, not the result.
      hutchinson_samples: Rademacher probes for the trace (0 skips it).

    Returns:
      A `SharpnessResult`.

    Raises:
      BatchjaxError: empty or mismatched data, bad counts, both `model` and `apply_fn`, or a
        loss that is not one value per example.
    """
    t0 = time.perf_counter()
    num_iters = _check_count("num_iters", num_iters, 1)
    chunk_size = _check_count("chunk_size", chunk_size, 1)
    hutchinson_samples = _check_count("hutchinson_samples", hutchinson_samples, 0)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise BatchjaxError(f"tol must be a number > 0, got {tol!r}")
    x_shape, y_shape = np.shape(x), np.shape(y)
    if len(x_shape) < 1 or x_shape[0] == 0 or y_shape[:1] != x_shape[:1]:
        raise BatchjaxError(f"x and y must hold the same positive number of examples, got "
                            f"shapes {x_shape} and {y_shape}")
    x_N, y_N = _check_xy(x, y)
    example_losses = _resolve_loss(params, x_N, y_N, model=model, apply_fn=apply_fn,
                                   loss_fn=loss_fn).example_losses
    params = jax.tree.map(jnp.asarray, params)
    flat_P, _ = ravel_pytree(params)
    num_params = int(flat_P.size)
    chunk_size = min(chunk_size, int(x_N.shape[0]))
    key = jax.random.key(0) if key is None else key
    start_key, probe_key = jax.random.split(key)

    def matvec(v_P: np.ndarray) -> np.ndarray:
        hv_P = _hvp(params, jnp.asarray(v_P, flat_P.dtype), x_N, y_N,
                    example_losses=example_losses, chunk_size=chunk_size)
        return np.asarray(hv_P, np.float64)

    v0_P = np.asarray(jax.random.normal(start_key, (num_params,)), np.float64)
    eig = _lanczos(matvec, v0_P, num_iters, tol)

    trace = trace_stderr = None
    if hutchinson_samples:
        probes_SxP = jax.random.rademacher(probe_key, (hutchinson_samples, num_params),
                                           dtype=flat_P.dtype)
        quad_S = np.asarray([float(np.asarray(v_P, np.float64) @ matvec(v_P))
                             for v_P in probes_SxP])
        trace = float(quad_S.mean())
        if hutchinson_samples > 1:
            trace_stderr = float(quad_S.std(ddof=1) / np.sqrt(hutchinson_samples))
    return SharpnessResult(**eig, trace=trace, trace_stderr=trace_stderr,
                           hutchinson_samples=hutchinson_samples,
                           num_examples=int(x_N.shape[0]), num_params=num_params,
                           seconds=time.perf_counter() - t0)
