"""Gradient noise: per-example gradients and the statistics built on them.

Definitions, for N examples (x_i, y_i) and parameters theta with P entries:

  l_i(theta)     the per-example loss, `loss_fn(outputs, labels)[i]` of the model's outputs
                 (default: softmax cross-entropy, `batchjax.losses.cross_entropy`; the
                 model/apply_fn/loss_fn contract is that of `batchjax.losses`).
  g_i = grad l_i the gradient of the per-example loss itself, NOT of its 1/N share of the mean
                 training loss (BackPACK's warning, Dangel et al. 2020, arXiv:1912.10985: a
                 library that differentiates a mean returns g_i / N). Hence G below is exactly
                 the gradient of the training loss (the mean over examples).
  G              = (1/N) sum_i g_i, the full-batch gradient; |G|^2 its squared norm.
  Sigma          = (1/N) sum_i (g_i - G)(g_i - G)^T, the per-example gradient covariance with
                 the POPULATION divisor N: the exact covariance of this finite set of examples.
                 Only its diagonal is formed: Var_j = (1/N) sum_i (g_ij - G_j)^2, and
                 tr(Sigma) = sum_j Var_j = (1/N) sum_i |g_i - G|^2.
  Minibatch noise: G_B, the mean gradient of B examples drawn uniformly WITHOUT replacement,
                 has E|G_B - G|^2 = tr(Sigma) / B * (N - B) / (N - 1): the finite-population
                 correction (Cochran, "Sampling Techniques", 1977, Thm. 2.2), 0 at B = N and
                 tr(Sigma) at B = 1. With replacement it is tr(Sigma) / B.
  B_simple       = tr(Sigma) / |G|^2, the simple noise scale (McCandlish et al. 2018,
                 arXiv:1812.06162, eq. 2.8). tr(Sigma) here is the divisor-N trace above, so
                 that E|G_B - G|^2 = |G|^2 B_simple / B * (N - B) / (N - 1) holds exactly.
  GSNR_j         = G_j^2 / Var_j, the gradient signal-to-noise ratio of parameter j (Liu et al.
                 2020, arXiv:2001.07384); `mean_gsnr` is its mean over the parameters with
                 Var_j > 0 (those with Var_j = 0, e.g. weights of always-black pixels, have
                 GSNR 0/0 or inf and are counted in `num_zero_variance` instead).

Bias. For the N examples themselves all of the above are exact, up to float rounding. As
estimates for the distribution the examples were drawn from: G is unbiased; |G|^2 is biased
upward by tr(Sigma_true) / N; the divisor-N tr(Sigma) is biased downward by (N - 1) / N
(N / (N - 1) tr(Sigma) is unbiased); B_simple and GSNR are ratios, biased but consistent.
`empirical_minibatch_variance` is an unbiased Monte Carlo estimate of E|G_B - G|^2;
`two_batch_noise_estimate` gives unbiased estimates of |G|^2 and tr(Sigma) and a biased but
consistent B_simple.

Numerics. `gradient_stats` streams over chunks of examples, so peak memory does not depend on N.
Each chunk c yields its count n_c, mean m_c and centred sum of squares
M2_c = sum_{i in c} (g_i - m_c)^2 (elementwise, float32), and chunks merge with Chan, Golub &
LeVeque's (1979) pairwise update
    M2 = M2_a + M2_b + (m_b - m_a)^2 n_a n_b / (n_a + n_b):
inside one jitted call (a `lax.scan` over up to 32 chunks, so the rounding of the float32
running sums stays that of a few dozen additions), then across calls on the host in float64.
Nothing forms E|g|^2 - |G|^2, whose float32 rounding error relative to Var grows like
eps * G^2 / Var (it loses every digit for near-identical examples; see the tests). Chunks that
do not divide N need no padding: the last window is shifted back to end at example N and the
examples it re-reads are masked out (weight 0), so every chunk has one shape and the whole
pass one compilation (a second, once, for data that need the dense path's shift, below).

Two ways to get a chunk's (n_c, m_c, M2_c):
  * "vmap": materialise the chunk's per-example gradients (as `per_example_grads`; any model
    and loss) and centre them directly. The reference; memory chunk_size * P floats.
  * "dense": a stack of Dense layers (`flax.linen.Dense`, any depth and widths, with or
    without biases; every parameter in one of them and each called once per forward pass on
    [batch, features] inputs; any activations or other parameter-free, row-wise operations
    between them; any per-example loss), recognised from the model itself (`dense_layers`).
    No per-example gradient is formed. A Dense layer with inputs a_i and pre-activation
    gradients delta_i = d l_i / d z_i (z = a K + b its output; one forward pass and one vjp
    of sum_i l_i per chunk, the deltas read off zero perturbations added to every z) has
    g_i = a_i delta_i^T for the kernel and delta_i for the bias, so |g_i|^2 =
    |a_i|^2 |delta_i|^2 (Goodfellow 2015, arXiv:1510.01799) and sums of squares are matrix
    products ((a^2)^T (delta^2), BackPACK's SumGradSquared). The sums are taken about a shift
    s = a~ d_bar^T (d_bar the chunk mean of delta; a~ see below): with alpha_i = a_i - a~
    and beta_i = delta_i - d_bar,
    g_i - s = alpha_i delta_i^T + a~ beta_i^T, so, exactly for any a~,
        m   = a~ d_bar^T + alpha^T delta / n,
        M2  = (alpha^2)^T (delta^2) + 2 a~ * alpha^T (delta * beta)
              + a~^2 (sum_i beta_i^2)^T - (alpha^T delta)^2 / n.
    With a~ = 0 this is the plain sum of squares minus n m^2, whose condition number for weight
    j is 1 + GSNR_j: fine for inputs that vary (MNIST pixels, relu outputs; it also gives exact
    zeros for weights whose every g_i is 0). For inputs that are nearly constant across the
    chunk (mean^2 > 64 variance) a~_p is their value in one of the chunk's examples: what the
    examples share then cancels exactly before anything is squared, and the relative error of
    Var_j is O(eps |G_j| / std_j), the rounding of the inputs and deltas themselves (which the
    vmap path shares), instead of O(eps G_j^2 / Var_j). A call takes the plain sums (a~ = 0)
    first and checks them: where some sum of squares exceeds 64 times its M2 (more than 6 of
    float32's 24 bits cancelled), it computes its chunks again about the shift. Cost per
    chunk: the forward pass, the backward pass to the deltas, and per layer two [n, D]^T
    [n, H] products (three if some input is nearly constant). The traces alone
    (`elementwise=False`) need only alpha^T delta: summed over the layer, the squares are
    per-example scalars,
        sum_j M2_j = sum_i (|alpha_i|^2 |delta_i|^2 + 2 (alpha_i . a~)(delta_i . beta_i)
                     + |a~|^2 |beta_i|^2) - |alpha^T delta + a~ (sum_i beta_i)^T|^2 / n,
    the same shift and the same rounding argument, at the cost of a training epoch's products
    (forward pass plus one kernel-gradient product per layer).
  "auto" takes the dense path whenever the model is such a stack and the vmap path otherwise;
  every result says which (`method`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from batchjax.errors import BatchjaxError
from batchjax.losses import (ApplyFn, ExampleLossFn, LossFn, cross_entropy, model_apply_fn,
                             resolve)
from batchjax.model import MLP, Params, dense_dot_general
from batchjax.rng import stream_key

METHODS = ("auto", "dense", "vmap")
# Examples per chunk: the unit of memory. Dense: a chunk's [C, D] layer inputs should stay in
# cache; vmap: chunk_size * P floats of per-example gradients.
DENSE_CHUNK_SIZE = 2048
VMAP_CHUNK_SIZE = 64
_GRAD_CHUNK_SIZE = 4096
_MINIBATCH_GROUP = 16


# --------------------------------------------------------------------------------------------
# The model and loss: batchjax.losses' contract


class _Loss(NamedTuple):
    """How outputs and per-example losses are computed (hashable: static under `jax.jit`)."""

    apply_fn: ApplyFn  # (params, x_B) -> outputs_B
    loss_fn: LossFn  # (outputs_B, labels_B) -> losses_B
    example_losses: ExampleLossFn  # (params, x_B, y_B) -> losses_B


def _structure(tree) -> tuple:
    """A hashable description of a pytree's structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), np.dtype(getattr(a, "dtype", np.float32)))
                          for a in leaves)


def _resolve_loss(params: Params, x_N: jax.Array, y_N: jax.Array, *, model, apply_fn,
                  loss_fn) -> _Loss:
    """The model's outputs and per-example losses; checks that they are one loss per example.

    Raises:
      BatchjaxError: both `model` and `apply_fn`, params of no MLP without a model, or a
        loss that is not one value per example.
    """
    example_losses, model = resolve(params, model=model, apply_fn=apply_fn, loss_fn=loss_fn)
    loss = _Loss(apply_fn if apply_fn is not None else model_apply_fn(model),
                 loss_fn if loss_fn is not None else cross_entropy, example_losses)
    problem = _loss_shape_problem(loss.example_losses, _structure(params),
                                  x_N.shape[1:], x_N.dtype, y_N.shape[1:], y_N.dtype)
    if problem:
        raise BatchjaxError(problem)
    return loss


@functools.lru_cache(maxsize=256)
def _loss_shape_problem(example_losses, params_structure, x_shape, x_dtype, y_shape,
                        y_dtype) -> str | None:
    treedef, leaves = params_structure
    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    batch = 3
    out = jax.eval_shape(example_losses, params, jax.ShapeDtypeStruct((batch, *x_shape), x_dtype),
                         jax.ShapeDtypeStruct((batch, *y_shape), y_dtype))
    if getattr(out, "shape", None) != (batch,):
        return (f"loss_fn must return one loss per example (shape [B]), got shape "
                f"{getattr(out, 'shape', type(out).__name__)} for a batch of {batch}; "
                f"return the per-example losses, not their mean")
    return None


def _example_loss(example_losses: ExampleLossFn) -> Callable:
    """The loss of ONE example: a batch axis of 1 is added for the model and removed again."""

    def example_loss(params, x, y):
        return example_losses(params, x[None], y[None])[0]

    return example_loss


@functools.partial(jax.jit, static_argnames="loss")
def _per_example_grads(params, x_N, y_N, loss):
    return jax.vmap(jax.grad(_example_loss(loss.example_losses)),
                    in_axes=(None, 0, 0))(params, x_N, y_N)


def per_example_grads(params: Params, x: Any, y: Any, *, model: nn.Module | None = None,
                      apply_fn: ApplyFn | None = None, loss_fn: LossFn | None = None) -> Params:
    """Gradients of each example's own loss, stacked: the reference for every other routine.

    Args:
      params: model parameters (a pytree).
      x: inputs, shape [N, ...].
      y: labels, shape [N] (integers for the default cross-entropy).
      model: the flax model; defaults to `batchjax.model.model_from_params(params)`.
      apply_fn: instead of a model, `apply_fn(params, x_B) -> outputs_B`.
      loss_fn: `loss_fn(outputs_B, labels_B) -> losses_B`; default cross-entropy.

    Returns:
      A pytree like `params` whose leaves have a leading axis of length N; entry i is g_i.
    """
    x_N, y_N = _check_xy(x, y)
    loss = _resolve_loss(params, x_N, y_N, model=model, apply_fn=apply_fn, loss_fn=loss_fn)
    return _per_example_grads(params, x_N, y_N, loss)


# --------------------------------------------------------------------------------------------
# The dense fast path: recognising a stack of Dense layers, and its inputs and deltas


class DenseLayer(NamedTuple):
    """One `nn.Dense` call of a model, as the dense path sees it.

    Attributes:
      kernel: index of its kernel among `jax.tree.leaves(params)`.
      bias: index of its bias, or -1 (`use_bias=False`).
    """

    kernel: int
    bias: int


_PLAIN_DOT_GENERALS = (None, lax.dot_general, dense_dot_general)


def _is_dense_call(context) -> bool:
    return isinstance(context.module, nn.Dense) and context.method_name == "__call__"


def _dense_call_problem(module, args, kwargs, kernel, bias, index, seen, batch) -> str | None:
    """Why one `nn.Dense` call cannot be treated as a_i -> a_i K + b per example (None: it can)."""
    name = "/".join(module.path) or type(module).__name__
    if type(module).__call__ is not nn.Dense.__call__:
        return f"{name} overrides nn.Dense.__call__"
    if module.dot_general not in _PLAIN_DOT_GENERALS or module.dot_general_cls is not None:
        return f"{name} has its own dot_general"
    if kwargs or len(args) != 1:
        return f"{name} is called with extra arguments"
    k = index.get(id(kernel))
    if k is None or (module.use_bias and index.get(id(bias)) is None):
        return f"{name}'s parameters are not leaves of params"
    if k in seen:
        return f"{name} is called more than once"
    a = args[0]
    compute = jnp.result_type(a.dtype, kernel.dtype) if module.dtype is None else module.dtype
    if jnp.dtype(compute) != kernel.dtype:
        return f"{name} computes in {jnp.dtype(compute)}, its parameters are {kernel.dtype}"
    if np.ndim(a) != 2 or a.shape[0] != batch or np.ndim(kernel) != 2:
        return (f"{name} gets inputs of shape {tuple(np.shape(a))} for a batch of {batch}, "
                f"not [batch, features]")
    return None


@functools.lru_cache(maxsize=256)
def _dense_plan(apply_fn: ApplyFn, params_structure, x_shape, x_dtype
                ) -> tuple[tuple[DenseLayer, ...] | None, str]:
    """The Dense calls of `apply_fn` in call order, or None and the reason it is no Dense stack.

    `apply_fn` is traced once (no compilation) on a batch of 3 with every `nn.Dense.__call__`
    intercepted (`flax.linen.intercept_methods`). Each call is checked
    (`_dense_call_problem`), and replaced by a stand-in that does not read the parameters; the
    model is a Dense stack when every call passes and the parameters are then read nowhere
    else (no parameter outside a Dense layer, no weight shared with anything else).
    """
    treedef, leaves = params_structure
    batch = 3
    layers: list[DenseLayer] = []
    problems: list[str] = []

    def stand_in_model(params, x):
        index = {id(a): i for i, a in enumerate(jax.tree.leaves(params))}

        def interceptor(next_fun, args, kwargs, context):
            if not _is_dense_call(context):
                return next_fun(*args, **kwargs)
            module = context.module
            variables = module.variables.get("params", {})
            kernel, bias = variables.get("kernel"), variables.get("bias")
            problem = _dense_call_problem(module, args, kwargs, kernel, bias, index,
                                          {layer.kernel for layer in layers}, batch)
            if problem:
                problems.append(problem)
                return next_fun(*args, **kwargs)
            layers.append(DenseLayer(index[id(kernel)],
                                     index[id(bias)] if module.use_bias else -1))
            return jnp.zeros((batch, kernel.shape[1]), kernel.dtype) + 0 * args[0][:, :1]

        with nn.intercept_methods(interceptor):
            return apply_fn(params, x)

    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    try:
        closed = jax.make_jaxpr(stand_in_model)(params,
                                                jax.ShapeDtypeStruct((batch, *x_shape), x_dtype))
    except Exception as err:  # noqa: BLE001  (a model that a stand-in breaks is no Dense stack)
        return None, f"the model cannot be traced with Dense layers intercepted ({err!r:.200})"
    if problems:
        return None, problems[0]
    if not layers:
        return None, "the model calls no flax.linen.Dense on its parameters"
    owned = {layer.kernel for layer in layers} | {layer.bias for layer in layers}
    if len(owned - {-1}) != len(leaves):
        return None, "some parameters belong to no Dense layer"
    param_vars = {id(v) for v in closed.jaxpr.invars[:len(leaves)]}
    used = [v for eqn in closed.jaxpr.eqns for v in eqn.invars] + list(closed.jaxpr.outvars)
    if any(id(v) in param_vars for v in used):
        return None, "some parameters are used outside a Dense layer's own call"
    return tuple(layers), ""


def dense_layers(params: Params, x: Any, *, model: nn.Module | None = None,
                 apply_fn: ApplyFn | None = None) -> tuple[DenseLayer, ...] | None:
    """The Dense layers the dense path sees, in call order; None if the model is no Dense stack.

    A model is a Dense stack when every parameter leaf is the kernel or bias of a
    `flax.linen.Dense` that is called exactly once per forward pass, on inputs of shape
    [batch, features], with the plain product (its default `dot_general`, or
    `batchjax.model.dense_dot_general`) in its parameters' dtype, and no parameter is read
    anywhere else. What lies between the layers is free (activations, reshapes, any row-wise
    operation without parameters), and so is the per-example loss.

    Args:
      params, model, apply_fn: as for `gradient_stats`.
      x: inputs [N, ...] (only their shape and dtype matter).

    Returns:
      A tuple of `DenseLayer` (leaf indices of each kernel and bias), or None.
    """
    _, model = resolve(params, model=model, apply_fn=apply_fn)
    fn = apply_fn if apply_fn is not None else model_apply_fn(model)
    # Inputs are float32 for every routine here (`_check_xy`).
    return _dense_plan(fn, _structure(params), tuple(np.shape(x)[1:]), np.dtype(np.float32))[0]


def _dense_forward(module: nn.Dense, x_BxD, variables):
    """`nn.Dense.__call__` on [B, D] inputs with the plain product: (its inputs, its output).

    The same values as the layer's own call (`_dense_call_problem` admits only products equal
    to `lax.dot_general`), but no custom derivative rule: differentiating the deltas alone
    then forms no product with the kernel's (zero) tangent.
    """
    kernel = variables["kernel"]
    a_BxD = x_BxD.astype(kernel.dtype)
    z_BxH = lax.dot_general(a_BxD, kernel, (((1,), (0,)), ((), ())), precision=module.precision)
    if module.use_bias:
        z_BxH = z_BxH + variables["bias"][None, :]
    return a_BxD, z_BxH


def _dense_inputs_and_deltas(params, x_C, y_C, w_C, loss: _Loss, plan):
    """One forward pass and one vjp: each Dense layer's inputs a and w_i * d l_i / d z.

    The loss differentiated is sum_i w_i l_i, with a zero perturbation added to every Dense
    output z, so each row of delta (the gradient of the perturbation) is the pre-activation
    gradient of that example's own loss (zero for masked examples). The parameters are not
    differentiated.
    """
    leaves = jax.tree.leaves(params)
    layer_of = {id(leaves[layer.kernel]): j for j, layer in enumerate(plan)}
    batch = x_C.shape[0]

    def summed_loss(perturbations):
        inputs = [None] * len(plan)

        def interceptor(next_fun, args, kwargs, context):
            if _is_dense_call(context):
                variables = context.module.variables.get("params", {})
                j = layer_of.get(id(variables.get("kernel")))
                if j is not None:
                    inputs[j], z = _dense_forward(context.module, args[0], variables)
                    return z + perturbations[j]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            outputs = loss.apply_fn(params, x_C)
        losses_C = loss.loss_fn(outputs, y_C)
        return jnp.sum(w_C * losses_C), (inputs, losses_C)

    zeros = [jnp.zeros((batch, leaves[layer.kernel].shape[1]), leaves[layer.kernel].dtype)
             for layer in plan]
    deltas, (inputs, losses_C) = jax.grad(summed_loss, has_aux=True)(zeros)
    return inputs, deltas, losses_C


@functools.partial(jax.jit, static_argnames=("loss", "plan"))
def _dense_sq_norms(params, x_N, y_N, *, loss, plan):
    """|g_i|^2 = sum over layers of (|a_i|^2 + 1) |delta_i|^2 (Goodfellow 2015); no +1 without
    a bias."""
    w_N = jnp.ones(x_N.shape[:1], jax.tree.leaves(params)[plan[0].kernel].dtype)
    inputs, deltas, _ = _dense_inputs_and_deltas(params, x_N, y_N, w_N, loss, plan)
    return sum((jnp.sum(a * a, axis=1) + (layer.bias >= 0)) * jnp.sum(d * d, axis=1)
               for layer, a, d in zip(plan, inputs, deltas))


# --------------------------------------------------------------------------------------------
# Per-chunk statistics


class _Moments(NamedTuple):
    """Sufficient statistics of a set of examples (a chunk, or everything merged so far)."""

    count: Any  # number of (unmasked) examples
    mean: Any  # list like jax.tree.leaves(params): mean gradient
    m2: Any  # list: elementwise sum of squared deviations from `mean` (or its sum per leaf)
    loss_sum: Any  # sum_i l_i


# Inputs with mean^2 > _SHIFT_RATIO * variance are shifted (see `_shifted_layer_moments`);
# the decision looks at every _SHIFT_STRIDE-th example only.
_SHIFT_RATIO = 64
_SHIFT_STRIDE = 16
# A call keeps the plain sums unless some sum of squares exceeds this many times its M2.
_PLAIN_RATIO = 64


def _centred_moments(v_CxP, w_C, count):
    """Weighted mean and M2 = sum_i w_i (v_i - mean)^2 of the rows of v, in two passes.

    Sums over rows are products with w: on CPU a reduction over the leading axis of [C, P]
    walks memory with stride P, much slower than the matrix-vector product.
    """
    mean_P = (w_C @ v_CxP) / count
    return mean_P, w_C @ jnp.square(v_CxP - mean_P[None, :])


def _vmap_chunk_moments(params, x_C, y_C, w_C, *, loss: _Loss, elementwise) -> _Moments:
    losses_C, grads = jax.vmap(jax.value_and_grad(_example_loss(loss.example_losses)),
                               in_axes=(None, 0, 0))(params, x_C, y_C)
    count = jnp.maximum(jnp.sum(w_C), 1)
    mean, m2 = [], []
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        m, s = _centred_moments(g.reshape((g.shape[0], -1)), w_C, count)
        mean.append(m.reshape(p.shape))
        m2.append(s.reshape(p.shape) if elementwise else jnp.sum(s))
    return _Moments(jnp.sum(w_C), mean, m2, jnp.sum(w_C * losses_C))


def _plain_layer_moments(a_CxD, d_CxH, w_C, count, elementwise):
    """`_shifted_layer_moments` with a~ = 0 (the plain sums of squares minus n m^2), and
    whether they cancelled: a sum of squares above `_PLAIN_RATIO` times its M2 (for a weight,
    or with `elementwise` False for the layer's kernel), so that more than log2(_PLAIN_RATIO)
    of float32's bits may be lost.
    """
    # Rows of delta for masked examples are zero, so products with delta need no mask.
    d_bar_H, beta_sq_H = _centred_moments(d_CxH, w_C, count)
    sum_DxH = a_CxD.T @ d_CxH
    if elementwise:
        sq = jnp.square(a_CxD).T @ jnp.square(d_CxH)
        m2 = sq - jnp.square(sum_DxH) / count
    else:
        sq = jnp.sum(jnp.square(d_CxH), axis=1) @ jnp.sum(jnp.square(a_CxD), axis=1)
        m2, beta_sq_H = sq - jnp.sum(jnp.square(sum_DxH)) / count, jnp.sum(beta_sq_H)
    return (sum_DxH / count, m2, d_bar_H, beta_sq_H), jnp.any(sq > _PLAIN_RATIO * m2)


def _shifted_layer_moments(a_CxD, d_CxH, w_C, count, elementwise):
    """Kernel and bias moments of one Dense layer about the shift s = a~ d_bar^T (see top).

    a~_p is input p of a reference example (the chunk's last) where that input is nearly
    constant (mean^2 above `_SHIFT_RATIO` times its variance), the case where plain sums
    cancel, and 0 elsewhere (e.g. MNIST pixels, relu outputs), where the plain sums have
    condition number 1 + GSNR and give exact zeros for weights whose every g_i is 0. Any
    shift is exact in exact arithmetic; the choice only decides where rounding goes (an
    example rather than the mean: no extra pass over the [C, D] inputs). Only calls whose
    plain sums cancelled come here (`_window_moments`), so there is no branch for chunks
    that need no shift: a~ = 0 gives alpha = a exactly and the plain sums.

    With `elementwise` False, M2 is summed over the layer's kernel (and bias) in the chunk:
    |g_i - s|^2 = |alpha_i|^2 |delta_i|^2 + 2 (alpha_i . a~)(delta_i . beta_i)
    + |a~|^2 |beta_i|^2 needs no [D, H] product, so alpha^T delta is the only one.

    Returns:
      (kernel mean, kernel M2, bias mean, bias M2); the M2s summed without `elementwise`.
    """
    # The subsample runs back from the last row, which is never masked.
    w_S, a_SxD = w_C[::-_SHIFT_STRIDE], a_CxD[::-_SHIFT_STRIDE]
    sub_count = jnp.maximum(jnp.sum(w_S), 1)
    a_bar_D = (w_S @ a_SxD) / sub_count
    a_sq_bar_D = (w_S @ jnp.square(a_SxD)) / sub_count
    needs_shift_D = (1 + _SHIFT_RATIO) * jnp.square(a_bar_D) > _SHIFT_RATIO * a_sq_bar_D
    a_shift_D = jnp.where(needs_shift_D, a_CxD[-1], 0)  # the last row is never masked
    d_bar_H, beta_sq_H = _centred_moments(d_CxH, w_C, count)
    beta_CxH = w_C[:, None] * (d_CxH - d_bar_H[None, :])
    hidden = d_CxH.shape[1]
    alpha_CxD = a_CxD - a_shift_D[None, :]
    if elementwise:
        # One product for alpha^T delta and alpha^T (delta * beta): one pass over alpha.
        both_Dx2H = alpha_CxD.T @ jnp.concatenate([d_CxH, d_CxH * beta_CxH], axis=1)
        ad_DxH, cross = both_Dx2H[:, :hidden], both_Dx2H[:, hidden:]
        sq = jnp.square(alpha_CxD).T @ jnp.square(d_CxH)
    else:
        ad_DxH = alpha_CxD.T @ d_CxH
        cross = jnp.sum(d_CxH * beta_CxH, axis=1) @ (alpha_CxD @ a_shift_D)
        sq = jnp.sum(jnp.square(d_CxH), axis=1) @ jnp.sum(jnp.square(alpha_CxD), axis=1)
    # sum_i (g_i - s) = alpha^T delta + a~ (sum_i beta_i)^T; the last sum is 0 up to rounding.
    dev_sum_DxH = ad_DxH + a_shift_D[:, None] * jnp.sum(beta_CxH, axis=0)[None, :]
    kernel_mean = a_shift_D[:, None] * d_bar_H[None, :] + dev_sum_DxH / count
    if not elementwise:
        kernel_m2 = (sq + 2 * cross + jnp.sum(jnp.square(a_shift_D)) * jnp.sum(beta_sq_H)
                     - jnp.sum(jnp.square(dev_sum_DxH)) / count)
        return kernel_mean, kernel_m2, d_bar_H, jnp.sum(beta_sq_H)
    kernel_m2 = (sq + 2 * a_shift_D[:, None] * cross
                 + jnp.square(a_shift_D)[:, None] * beta_sq_H[None, :]
                 - jnp.square(dev_sum_DxH) / count)
    return kernel_mean, kernel_m2, d_bar_H, beta_sq_H


def _dense_chunk_moments(params, x_C, y_C, w_C, *, loss: _Loss, plan, elementwise,
                         shifted) -> tuple[_Moments, jax.Array]:
    """A chunk's moments, plain (`shifted` False) or about the shift; and whether the plain sums
    of some layer cancelled (`_plain_layer_moments`; always False when `shifted`)."""
    inputs, deltas, losses_C = _dense_inputs_and_deltas(params, x_C, y_C, w_C, loss, plan)
    count = jnp.maximum(jnp.sum(w_C), 1)
    num_leaves = len(jax.tree.leaves(params))
    mean, m2 = [None] * num_leaves, [None] * num_leaves
    needs_shift = jnp.zeros((), bool)
    for layer, a_CxD, d_CxH in zip(plan, inputs, deltas):
        if shifted:
            layer_moments = _shifted_layer_moments(a_CxD, d_CxH, w_C, count, elementwise)
        else:
            layer_moments, cancelled = _plain_layer_moments(a_CxD, d_CxH, w_C, count,
                                                            elementwise)
            needs_shift = needs_shift | cancelled
        k_mean, k_m2, b_mean, b_m2 = layer_moments
        mean[layer.kernel], m2[layer.kernel] = k_mean, k_m2
        if layer.bias >= 0:
            mean[layer.bias], m2[layer.bias] = b_mean, b_m2
    return _Moments(jnp.sum(w_C), mean, m2, jnp.sum(w_C * losses_C)), needs_shift


def _window(x_N, y_N, start, size, dtype):
    """Examples [start, start + size), shifted back to end at N; those before start masked.

    The shift keeps every call the same shape (one compilation) with no padding: the tail
    window overlaps examples already counted, and the mask removes them.
    """
    begin = jnp.minimum(start, x_N.shape[0] - size)
    x_W = jax.lax.dynamic_slice_in_dim(x_N, begin, size)
    y_W = jax.lax.dynamic_slice_in_dim(y_N, begin, size)
    w_W = (begin + jnp.arange(size) >= start).astype(dtype)
    return x_W, y_W, w_W


# One jitted call merges at most this many chunks on the device (in float32, sequentially:
# its rounding grows with the count); the calls are merged on the host in float64.
_CALL_CHUNKS = 32


def _layout(num_examples: int, chunk_size: int) -> tuple[int, int, int]:
    """(chunk, windows per call, calls): the chunking of N examples into jitted calls.

    The chunk is the smallest that needs no more windows than `chunk_size` does (2,000 rather
    than 2,048 for N = 60,000, so that no window re-reads examples of another), and the calls
    share the windows evenly.
    """
    num_chunks = -(-num_examples // chunk_size)
    chunk = -(-num_examples // num_chunks)
    num_calls = -(-num_chunks // _CALL_CHUNKS)
    return chunk, -(-num_chunks // num_calls), num_calls


def _merge_on_device(acc: _Moments, new: _Moments) -> _Moments:
    """Chan et al.'s pairwise update in the parameters' dtype, inside a jitted scan.

    The deviation m_b - m_a is formed before it is squared, so nothing cancels; a chunk with
    count 0 (a wholly masked window) changes nothing.
    """
    count = acc.count + new.count
    fraction = new.count / jnp.maximum(count, 1)
    weight = acc.count * fraction  # n_a n_b / (n_a + n_b)
    mean, m2 = [], []
    for m_a, m_b, s_a, s_b in zip(acc.mean, new.mean, acc.m2, new.m2):
        delta = m_b - m_a
        mean.append(m_a + delta * fraction)
        sq_delta = jnp.square(delta) if s_a.ndim else jnp.sum(jnp.square(delta))
        m2.append(s_a + s_b + sq_delta * weight)
    return _Moments(count, mean, m2, acc.loss_sum + new.loss_sum)


@functools.partial(jax.jit, static_argnames=("kind", "loss", "plan", "chunk_size",
                                             "num_windows", "elementwise", "shifted"))
def _window_moments(params, x_N, y_N, first, *, kind, loss, plan, chunk_size, num_windows,
                    elementwise, shifted=False) -> tuple[_Moments, jax.Array]:
    """The moments of `num_windows` chunks from example `first` on, in one call: a scan over
    the windows that merges each chunk into the running moments (`_merge_on_device`); and
    whether the plain sums of some chunk cancelled (dense path, `shifted` False only).

    Windows that start at or after N are wholly masked (count 0). The dense path takes the
    plain sums unless `shifted`; a call whose plain sums cancelled is made again with
    `shifted` (about the shift, per chunk where some input is nearly constant), so the shift's
    extra work is paid for, and compiled, only where needed.
    """
    leaves = jax.tree.leaves(params)
    dtype = leaves[0].dtype
    if kind == "vmap":
        vmap_fn = functools.partial(_vmap_chunk_moments, loss=loss, elementwise=elementwise)
        chunk_fn = lambda *chunk: (vmap_fn(*chunk), jnp.zeros((), bool))  # noqa: E731
    else:
        chunk_fn = functools.partial(_dense_chunk_moments, loss=loss, plan=plan,
                                     elementwise=elementwise, shifted=shifted)

    def step(carry, start):
        acc, cancelled = carry
        moments, chunk_cancelled = chunk_fn(params, *_window(x_N, y_N, start, chunk_size,
                                                              dtype))
        return (_merge_on_device(acc, moments), cancelled | chunk_cancelled), None

    zero = jnp.zeros((), dtype)
    zeros = _Moments(zero, [jnp.zeros_like(p) for p in leaves],
                     [jnp.zeros_like(p) if elementwise else zero for p in leaves], zero)
    starts = first + chunk_size * jnp.arange(num_windows, dtype=jnp.int32)
    return lax.scan(step, (zeros, jnp.zeros((), bool)), starts)[0]


def _chan_merge(acc: _Moments | None, new: _Moments) -> _Moments:
    """Chan et al.'s pairwise update in float64 NumPy (leaves as lists).

    An M2 leaf may be a scalar, the sum of its parameter array's M2 (`elementwise` False):
    the update is linear in M2, so it is summed the same way.
    """
    as64 = lambda leaves: [np.asarray(a, np.float64) for a in leaves]  # noqa: E731
    new = _Moments(float(new.count), as64(new.mean), as64(new.m2), float(new.loss_sum))
    if acc is None:
        return new
    count = acc.count + new.count
    mean, m2 = [], []
    for m_a, m_b, s_a, s_b in zip(acc.mean, new.mean, acc.m2, new.m2):
        delta = m_b - m_a
        mean.append(m_a + delta * (new.count / count))
        sq_delta = np.square(delta) if np.ndim(s_a) else np.sum(np.square(delta))
        m2.append(s_a + s_b + sq_delta * (acc.count * new.count / count))
    return _Moments(count, mean, m2, acc.loss_sum + new.loss_sum)


def _stream(call: Callable[[int], Any], num_examples: int, per_call: int,
            merge: Callable[[Any, Any], Any]):
    """Runs `call(start)` over the windows and merges on the host while the next one runs."""
    acc, pending = None, None
    for start in range(0, num_examples, per_call):
        out = call(start)  # dispatched asynchronously
        if pending is not None:
            acc = merge(acc, pending)
        pending = out
    return merge(acc, pending)


# --------------------------------------------------------------------------------------------
# GradientStats


def _leaf_names(tree) -> list[str]:
    def key_name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return ["/".join(key_name(k) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_batch_sizes(batch_size, num_examples: int) -> np.ndarray:
    b = np.asarray(batch_size)
    if b.dtype == bool or not np.issubdtype(b.dtype, np.integer):
        raise BatchjaxError(f"batch sizes must be integers, got {batch_size!r}")
    if b.size and (b.min() < 1 or b.max() > num_examples):
        raise BatchjaxError(f"batch sizes must be in [1, {num_examples}] (the number of "
                            f"examples), got {batch_size!r}")
    return b.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class GradientStats:
    """Exact gradient-noise statistics of a finite set of N examples (definitions at the top).

    Attributes:
      num_examples: N.
      mean_grad: G, a pytree like params of float64 arrays.
      variance: Var_j = diag(Sigma) with divisor N, a pytree like params of float64 arrays
        (None if computed with `elementwise=False`).
      grad_sq_norm: |G|^2.
      trace_cov: tr(Sigma), divisor N (the population covariance of the N examples).
      trace_cov_per_layer: tr(Sigma) restricted to each parameter array ("hidden/kernel", ...).
      noise_scale: B_simple = trace_cov / grad_sq_norm (inf if G = 0).
      mean_gsnr: mean of G_j^2 / Var_j over parameters with Var_j > 0 (nan if there are none;
        None without `variance`).
      num_zero_variance: parameters left out of `mean_gsnr` because Var_j = 0 (None without
        `variance`).
      mean_loss: (1/N) sum_i l_i, the training loss on these examples.
      method: "dense" or "vmap", the path that computed it.
    """

    num_examples: int
    mean_grad: Params
    variance: Params | None
    grad_sq_norm: float
    trace_cov: float
    trace_cov_per_layer: dict[str, float]
    noise_scale: float
    mean_gsnr: float | None
    num_zero_variance: int | None
    mean_loss: float
    method: str

    def minibatch_variance(self, batch_size):
        """E|G_B - G|^2 for B examples drawn without replacement: tr(Sigma)/B (N-B)/(N-1).

        Args:
          batch_size: an int B in [1, N], or an array of them.

        Returns:
          A float for an int, else a float64 array of the same shape.
        """
        b = _check_batch_sizes(batch_size, self.num_examples)
        n = self.num_examples
        fpc = (n - b) / (n - 1) if n > 1 else np.zeros(b.shape)
        out = self.trace_cov / b * fpc
        return float(out) if out.ndim == 0 else out

    def snr(self, batch_size):
        """|G|^2 / E|G_B - G|^2: inf at B = N (nan if G = 0 there too)."""
        variance = np.asarray(self.minibatch_variance(batch_size), np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(variance > 0, self.grad_sq_norm / variance,
                           np.inf if self.grad_sq_norm > 0 else np.nan)
        return float(out) if out.ndim == 0 else out

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        """JSON-ready scalars; `mean_grad` and `variance` as nested lists if `include_arrays`
        (`variance` None if it was not computed)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("mean_grad", "variance")}
        d["trace_cov_per_layer"] = dict(self.trace_cov_per_layer)
        if include_arrays:
            d["mean_grad"] = jax.tree.map(lambda a: np.asarray(a).tolist(), self.mean_grad)
            d["variance"] = (None if self.variance is None else
                             jax.tree.map(lambda a: np.asarray(a).tolist(), self.variance))
        return d


def _stats_from_moments(moments: _Moments, treedef, names: list[str], method: str,
                        elementwise: bool) -> GradientStats:
    n = moments.count
    variances = [np.maximum(m2, 0.0) / n for m2 in moments.m2]  # rounding can dip below 0
    per_layer = {name: float(np.sum(v)) for name, v in zip(names, variances)}
    trace_cov = float(sum(per_layer.values()))
    grad_sq_norm = float(sum(np.sum(np.square(m)) for m in moments.mean))
    if grad_sq_norm > 0:
        noise_scale = trace_cov / grad_sq_norm
    else:
        noise_scale = float("inf") if trace_cov > 0 else float("nan")
    variance = mean_gsnr = num_zero_variance = None
    if elementwise:
        mean_sq = np.concatenate([np.square(m).ravel() for m in moments.mean])
        var = np.concatenate([v.ravel() for v in variances])
        positive = var > 0
        mean_gsnr = (float(np.mean(mean_sq[positive] / var[positive])) if positive.any()
                     else float("nan"))
        num_zero_variance = int(var.size - positive.sum())
        variance = jax.tree.unflatten(treedef, variances)
    return GradientStats(
        num_examples=int(n),
        mean_grad=jax.tree.unflatten(treedef, moments.mean),
        variance=variance,
        grad_sq_norm=grad_sq_norm, trace_cov=trace_cov, trace_cov_per_layer=per_layer,
        noise_scale=float(noise_scale), mean_gsnr=mean_gsnr,
        num_zero_variance=num_zero_variance,
        mean_loss=moments.loss_sum / n, method=method)


def _as_float(x) -> jax.Array:
    """`x` as a float32 array; a float32 jax array is passed through as it is (no copy)."""
    if isinstance(x, jax.Array) and x.dtype == jnp.float32:
        return x
    return jnp.asarray(x, jnp.float32)


def _check_xy(x, y) -> tuple[jax.Array, jax.Array]:
    """Inputs as float32 and labels as int32 (float32 targets for a custom `loss_fn`).

    Jax arrays of those dtypes are used as they are, so repeated calls on the same data
    copy nothing to the device (numpy inputs are copied on every call).
    """
    x_N = _as_float(x)
    y_N = y if isinstance(y, jax.Array) else jnp.asarray(y)
    target = jnp.int32 if jnp.issubdtype(y_N.dtype, jnp.integer) else jnp.float32
    if y_N.dtype != target:
        y_N = y_N.astype(target)
    if x_N.ndim < 1 or y_N.ndim < 1 or x_N.shape[0] != y_N.shape[0]:
        raise BatchjaxError(f"x and y must have the same number of examples, got shapes "
                            f"{x_N.shape} and {y_N.shape}")
    if x_N.shape[0] == 0:
        raise BatchjaxError("need at least one example")
    return x_N, y_N


def _select_method(params, x_N, loss: _Loss, method: str):
    """The path to take ("dense" or "vmap") and the Dense layers (None for "vmap")."""
    if method not in METHODS:
        raise BatchjaxError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "vmap":
        return "vmap", None
    plan, reason = _dense_plan(loss.apply_fn, _structure(params), x_N.shape[1:], x_N.dtype)
    if method == "dense" and plan is None:
        raise BatchjaxError(f"method='dense' needs a stack of flax.linen.Dense layers, but "
                            f"{reason}; use method='vmap' (or 'auto')")
    return ("dense", plan) if plan is not None else ("vmap", None)


def gradient_stats(params: Params, x: Any, y: Any, *, model: nn.Module | None = None,
                   apply_fn: ApplyFn | None = None, loss_fn: LossFn | None = None,
                   chunk_size: int | None = None, method: str = "auto",
                   elementwise: bool = True) -> GradientStats:
    """Exact G, diag(Sigma), tr(Sigma), B_simple and GSNR over all N examples, streamed.

    Args:
      params: model parameters.
      x: inputs [N, ...]; y: labels or targets [N, ...]. Jax arrays (float32 inputs, int32
        labels) are used as they are; NumPy arrays are put on the device at every call (on CPU
        without a copy only when aligned and read-only, as `batchjax.data`'s are), so repeated
        calls should get `jax.device_put` arrays.
      model: the flax model; defaults to `batchjax.model.model_from_params(params)`.
      apply_fn: instead of a model, `apply_fn(params, x_B) -> outputs_B`.
      loss_fn: `loss_fn(outputs_B, labels_B) -> losses_B`; default cross-entropy.
      chunk_size: examples per chunk (the unit of memory); default `DENSE_CHUNK_SIZE` or
        `VMAP_CHUNK_SIZE`. Need not divide N.
      method: "dense" (closed forms for a stack of Dense layers, see `dense_layers`), "vmap"
        (materialised per-example gradients, any model), or "auto" (dense whenever the model
        is a Dense stack).
      elementwise: also diag(Sigma) (`variance`) and the GSNR. False gives only the traces
        (total and per layer), |G|^2, B_simple and the minibatch variances: on the dense
        path one [N, D]^T [N, H] product per layer fewer.

    Returns:
      A `GradientStats`.
    """
    if not isinstance(elementwise, bool):
        raise BatchjaxError(f"elementwise must be True or False, got {elementwise!r}")
    x_N, y_N = _check_xy(x, y)
    loss = _resolve_loss(params, x_N, y_N, model=model, apply_fn=apply_fn, loss_fn=loss_fn)
    method, plan = _select_method(params, x_N, loss, method)
    n = x_N.shape[0]
    if chunk_size is None:
        chunk_size = DENSE_CHUNK_SIZE if method == "dense" else VMAP_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise BatchjaxError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk, per_call, num_calls = _layout(n, min(int(chunk_size), n))
    window_moments = functools.partial(_window_moments, params, x_N, y_N, kind=method,
                                       loss=loss, plan=plan, chunk_size=chunk,
                                       num_windows=per_call, elementwise=elementwise)

    def call(start):
        # The first example of each call is put on the device explicitly: the only transfer
        # of a call on jax arrays (see the tests' transfer guard).
        first = jax.device_put(np.int32(start))
        return first, window_moments(first)

    def merge(acc, out):
        first, (moments, cancelled) = out
        if cancelled:  # rare (nearly identical examples, constant inputs): about the shift
            moments, _ = window_moments(first, shifted=True)
        return _chan_merge(acc, moments)

    moments = _stream(call, num_calls * per_call * chunk, per_call * chunk, merge)
    return _stats_from_moments(moments, jax.tree.structure(params), _leaf_names(params), method,
                               elementwise)


def per_example_sq_norms(params: Params, x: Any, y: Any, *, model: nn.Module | None = None,
                         apply_fn: ApplyFn | None = None, loss_fn: LossFn | None = None,
                         method: str = "auto") -> np.ndarray:
    """|g_i|^2 for every example, in one shot (memory grows with N; for checks and small N).

    The dense path uses |a_i|^2 |delta_i|^2 per Dense kernel plus |delta_i|^2 per bias and
    forms no per-example gradient; the vmap path squares `per_example_grads`.

    Returns:
      float32 array of shape [N].
    """
    x_N, y_N = _check_xy(x, y)
    loss = _resolve_loss(params, x_N, y_N, model=model, apply_fn=apply_fn, loss_fn=loss_fn)
    method, plan = _select_method(params, x_N, loss, method)
    if method == "dense":
        return np.asarray(_dense_sq_norms(params, x_N, y_N, loss=loss, plan=plan))
    grads = _per_example_grads(params, x_N, y_N, loss)
    return np.asarray(sum(jnp.sum(jnp.square(g).reshape((g.shape[0], -1)), axis=1)
                          for g in jax.tree.leaves(grads)))


# --------------------------------------------------------------------------------------------
# Ordinary (minibatch) gradients and sampled estimates


@functools.partial(jax.jit, static_argnames=("example_losses", "size"))
def _call_grad_sum(params, x_N, y_N, start, *, example_losses, size):
    dtype = jax.tree.leaves(params)[0].dtype
    x_W, y_W, w_W = _window(x_N, y_N, start, size, dtype)
    loss_sum, grad_sum = jax.value_and_grad(
        lambda p: jnp.sum(w_W * example_losses(p, x_W, y_W)))(params)
    return jnp.sum(w_W), grad_sum, loss_sum


def _full_batch_grad(params, x_N, y_N, example_losses) -> Params:
    """G = gradient of the mean loss over all N examples, chunked, summed in float64."""
    n = x_N.shape[0]
    size = min(_GRAD_CHUNK_SIZE, n)

    def merge(acc, out):
        grad = [np.asarray(g, np.float64) for g in jax.tree.leaves(out[1])]
        return grad if acc is None else [a + g for a, g in zip(acc, grad)]

    total = _stream(lambda s: _call_grad_sum(params, x_N, y_N, s, example_losses=example_losses,
                                             size=size), n, size, merge)
    return jax.tree.unflatten(jax.tree.structure(params), [g / n for g in total])


def _random_subset(key: jax.Array, n: int, size: int) -> jax.Array:
    """`size` distinct indices in [0, n), every subset equally likely (order not uniform).

    Floyd's algorithm (Bentley & Floyd, CACM 30(9), 1987): for j = n - size, ..., n - 1 draw
    t uniform in [0, j] and take t, or j if t is already taken. `size` draws and O(size^2)
    comparisons instead of N random numbers. t is 32 random bits mod (j + 1): bias below
    N / 2^32.
    """
    bits_S = jax.random.bits(key, (size,), jnp.uint32)
    slots_S = jnp.arange(size, dtype=jnp.int32)

    def draw(i, chosen_S):
        j = n - size + i
        t = (bits_S[i] % jnp.uint32(j + 1)).astype(jnp.int32)
        taken = jnp.any((chosen_S == t) & (slots_S < i))
        return chosen_S.at[i].set(jnp.where(taken, j, t))

    return jax.lax.fori_loop(0, size, draw, jnp.zeros(size, jnp.int32))


@functools.partial(jax.jit, static_argnames=("example_losses", "batch_size", "num_batches",
                                             "replace"))
def _minibatch_sq_norms(params, x_N, y_N, mean_grad, key, *, example_losses, batch_size,
                        num_batches, replace):
    """|G_B - G|^2 for `num_batches` independent minibatches; G_B = grad of the batch mean."""
    n = x_N.shape[0]

    def one(k):
        if replace:
            # 32 random bits mod N: bias below N / 2^32, and cheaper to compile than
            # `jax.random.randint`.
            idx_B = (jax.random.bits(k, (batch_size,), jnp.uint32) % n).astype(jnp.int32)
        else:
            idx_B = _random_subset(k, n, batch_size)
        g_B = jax.grad(lambda p: jnp.mean(example_losses(p, x_N[idx_B], y_N[idx_B])))(params)
        return sum(jnp.sum(jnp.square(g - m))
                   for g, m in zip(jax.tree.leaves(g_B), jax.tree.leaves(mean_grad)))

    keys = jax.random.split(key, num_batches)
    return jax.lax.map(one, keys, batch_size=min(_MINIBATCH_GROUP, num_batches))


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BatchjaxError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class EmpiricalVariance:
    """Sampled E|G_B - G|^2 over independent minibatches (unbiased; Monte Carlo error only).

    Attributes:
      batch_size: B.
      num_batches: minibatches drawn.
      mean: mean of |G_B - G|^2 over the minibatches.
      stderr: its standard error, sample std (ddof 1) / sqrt(num_batches).
    """

    batch_size: int
    num_batches: int
    mean: float
    stderr: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def empirical_minibatch_variance(params: Params, x: Any, y: Any, batch_size: int,
                                 num_batches: int, key: jax.Array, *,
                                 model: nn.Module | None = None,
                                 apply_fn: ApplyFn | None = None,
                                 loss_fn: LossFn | None = None,
                                 mean_grad: Params | None = None) -> EmpiricalVariance:
    """Monte Carlo E|G_B - G|^2 from ordinary minibatch gradients (a check on the formula).

    Each minibatch is a uniform random subset of B of the N examples (without replacement);
    minibatches are independent. G_B is `jax.grad` of the minibatch-mean loss.

    Args:
      params, x, y, model, apply_fn, loss_fn: as for `gradient_stats`.
      batch_size: B in [1, N].
      num_batches: minibatches to draw (>= 2).
      key: a `jax.random.key`.
      mean_grad: G if already known (e.g. `GradientStats.mean_grad`); computed otherwise.

    Returns:
      An `EmpiricalVariance`.
    """
    x_N, y_N = _check_xy(x, y)
    loss = _resolve_loss(params, x_N, y_N, model=model, apply_fn=apply_fn, loss_fn=loss_fn)
    _check_batch_sizes(batch_size, x_N.shape[0])
    num_batches = _check_count("num_batches", num_batches, 2)
    if mean_grad is None:
        mean_grad = _full_batch_grad(params, x_N, y_N, loss.example_losses)
    mean_grad = jax.tree.map(lambda m, p: jnp.asarray(m, jnp.result_type(p)), mean_grad, params)
    sq = np.asarray(_minibatch_sq_norms(params, x_N, y_N, mean_grad, key,
                                        example_losses=loss.example_losses,
                                        batch_size=int(batch_size), num_batches=num_batches,
                                        replace=False), np.float64)
    return EmpiricalVariance(batch_size=int(batch_size), num_batches=num_batches,
                             mean=float(sq.mean()),
                             stderr=float(sq.std(ddof=1) / np.sqrt(num_batches)))


@dataclasses.dataclass(frozen=True)
class TwoBatchEstimate:
    """McCandlish et al.'s two-batch-size estimates (their Appendix A).

    Attributes:
      grad_sq_norm, grad_sq_norm_stderr: unbiased estimate of |G|^2 and its standard error.
      trace_cov, trace_cov_stderr: unbiased estimate of tr(Sigma) (divisor N) and its error.
      noise_scale, noise_scale_stderr: their ratio B_simple (biased, consistent) and its
        delta-method standard error.
      small_batch_size, big_batch_size, num_draws, replace: how it was sampled.
    """

    grad_sq_norm: float
    grad_sq_norm_stderr: float
    trace_cov: float
    trace_cov_stderr: float
    noise_scale: float
    noise_scale_stderr: float
    small_batch_size: int
    big_batch_size: int
    num_draws: int
    replace: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def two_batch_noise_estimate(params: Params, x: Any, y: Any, key: jax.Array, *,
                             small_batch_size: int, big_batch_size: int, num_draws: int,
                             replace: bool = False, model: nn.Module | None = None,
                             apply_fn: ApplyFn | None = None,
                             loss_fn: LossFn | None = None) -> TwoBatchEstimate:
    """|G|^2, tr(Sigma) and B_simple from ordinary gradients at two batch sizes only.

    McCandlish et al. 2018, Appendix A: with v(B) = E|G_B - G|^2 / tr(Sigma),
    E|G_B|^2 = |G|^2 + tr(Sigma) v(B), so two batch sizes b < B give
        |G|^2     = (v(b) E|G_B|^2 - v(B) E|G_b|^2) / (v(b) - v(B)),
        tr(Sigma) = (E|G_b|^2 - E|G_B|^2) / (v(b) - v(B)).
    The paper's v(B) = 1/B (its formulas (B|G_B|^2 - b|G_b|^2)/(B - b) and
    (|G_b|^2 - |G_B|^2)/(1/b - 1/B)) holds for sampling with replacement, or N much larger
    than B; `replace=False` samples without replacement and uses the finite-population
    v(B) = (N - B) / (B (N - 1)). Either way both estimates are unbiased for this finite set.
    The two expectations are averaged over `num_draws` independent draws each before the
    division, as the paper recommends; B_simple is their ratio.

    Args:
      params, x, y, model, apply_fn, loss_fn: as for `gradient_stats`.
      key: a `jax.random.key`.
      small_batch_size, big_batch_size: b < B (B <= N without replacement).
      num_draws: minibatches drawn at each size (>= 2).
      replace: sample each minibatch with replacement.

    Returns:
      A `TwoBatchEstimate`.
    """
    x_N, y_N = _check_xy(x, y)
    loss = _resolve_loss(params, x_N, y_N, model=model, apply_fn=apply_fn, loss_fn=loss_fn)
    n = x_N.shape[0]
    small = _check_count("small_batch_size", small_batch_size)
    big = _check_count("big_batch_size", big_batch_size)
    num_draws = _check_count("num_draws", num_draws, 2)
    if small >= big:
        raise BatchjaxError(f"small_batch_size must be < big_batch_size, got {small} and {big}")
    if not replace:
        _check_batch_sizes([small, big], n)

    def v(b):
        return 1 / b if replace else (n - b) / (b * (n - 1))

    zeros = jax.tree.map(jnp.zeros_like, params)
    key_small, key_big = jax.random.split(key)
    means, errs = [], []
    for b, k in ((small, key_small), (big, key_big)):
        sq = np.asarray(_minibatch_sq_norms(params, x_N, y_N, zeros, k,
                                            example_losses=loss.example_losses, batch_size=b,
                                            num_batches=num_draws, replace=bool(replace)),
                        np.float64)
        means.append(sq.mean())
        errs.append(sq.std(ddof=1) / np.sqrt(num_draws))
    (m_s, m_b), (e_s, e_b), dv = means, errs, v(small) - v(big)
    grad_sq = (v(small) * m_b - v(big) * m_s) / dv
    trace = (m_s - m_b) / dv
    ratio = trace / grad_sq
    # Delta method on ratio(m_s, m_b); the two means are independent.
    d_s = (grad_sq + trace * v(big)) / (dv * grad_sq**2)
    d_b = -(grad_sq + trace * v(small)) / (dv * grad_sq**2)
    return TwoBatchEstimate(
        grad_sq_norm=float(grad_sq),
        grad_sq_norm_stderr=float(np.hypot(v(small) * e_b, v(big) * e_s) / dv),
        trace_cov=float(trace), trace_cov_stderr=float(np.hypot(e_s, e_b) / dv),
        noise_scale=float(ratio), noise_scale_stderr=float(np.hypot(d_s * e_s, d_b * e_b)),
        small_batch_size=small, big_batch_size=big, num_draws=num_draws, replace=bool(replace))


# --------------------------------------------------------------------------------------------
# Measurement during training


def make_measure(dataset, config, *, batch_sizes: Sequence[int],
                 seeds: Sequence[int] | None = None, model: nn.Module | None = None,
                 loss_fn: LossFn | None = None, key: jax.Array | None = None,
                 empirical_batches: int = 200, chunk_size: int | None = None,
                 method: str = "auto", elementwise: bool = False
                 ) -> Callable[[Sequence[Params], int, int], list[list[dict]]]:
    """The `measure` callback of `batchjax.train.train_runs`: noise records on a probe set.

    The probe set is the first `config.probe_size` training examples (0: all). Each call
    returns, per element of `params_list` (one per run), a one-record list; a record holds
    step, examples_seen, train_loss (mean loss on the probe set), grad_sq_norm, trace_cov,
    trace_cov_per_layer, noise_scale, minibatch_variance and snr (dicts keyed by str(B) for
    every B in `batch_sizes`), empirical (a sampled check at config.batch_size: batch_size,
    mean, stderr, num_batches and the analytic value), probe_size, method ("dense" or
    "vmap", the path that measured it) and seconds; with `elementwise`, also mean_gsnr.

    Args:
      dataset: a `batchjax.data.Dataset` (x_train, y_train, num_train, num_classes).
      config: the run's `TrainConfig` (hidden, batch_size, probe_size, seed).
      batch_sizes: batch sizes at which minibatch variance and SNR are reported.
      seeds: the seeds of the runs whose params come in, in order. The sampled check of the
        i-th params at step s draws with `batchjax.rng.stream_key(seeds[i], "noise", s)`:
        the same numbers whatever group the run trains in. Default: `config.seed` for every
        params.
      model: the flax model that trained; default `MLP(config.hidden, dataset.num_classes)`.
      loss_fn: the per-example loss that trained; default cross-entropy.
      key: instead of the seeds, one root key for every params (`stream_key(key, "noise", s)`).
      empirical_batches: minibatches of the sampled check (>= 2).
      chunk_size, method, elementwise: passed to `gradient_stats`. Off by default: only
        mean_gsnr needs the per-parameter variances.

    Returns:
      `measure(params_list, step, examples_seen) -> list[list[dict]]`.
    """
    num_train = dataset.num_train
    probe = config.probe_size
    if probe > num_train:
        raise BatchjaxError(f"probe_size {probe} is larger than the training set "
                            f"({num_train} examples); use 0 (all) or at most {num_train}")
    probe = probe or num_train
    sizes = [int(b) for b in _check_batch_sizes(list(batch_sizes), probe)]
    _check_batch_sizes(config.batch_size, probe)
    empirical_batches = _check_count("empirical_batches", empirical_batches, 2)
    if model is None:
        model = MLP(config.hidden, dataset.num_classes)
    x_N, y_N = _check_xy(np.asarray(dataset.x_train[:probe], np.float32),
                         np.asarray(dataset.y_train[:probe]))

    def root(i):
        if key is not None:
            return key
        return config.seed if seeds is None else seeds[i]

    def measure(params_list, step, examples_seen):
        if seeds is not None and len(params_list) != len(seeds):
            raise ValueError(f"measure got {len(params_list)} params for seeds {list(seeds)}")
        out = []
        for i, params in enumerate(params_list):
            t0 = time.perf_counter()
            stats = gradient_stats(params, x_N, y_N, model=model, loss_fn=loss_fn,
                                   chunk_size=chunk_size, method=method,
                                   elementwise=elementwise)
            emp = empirical_minibatch_variance(
                params, x_N, y_N, config.batch_size, empirical_batches,
                stream_key(root(i), "noise", int(step)), model=model, loss_fn=loss_fn,
                mean_grad=stats.mean_grad)
            record = {
                "step": int(step),
                "examples_seen": int(examples_seen),
                "train_loss": float(stats.mean_loss),
                "grad_sq_norm": stats.grad_sq_norm,
                "trace_cov": stats.trace_cov,
                "trace_cov_per_layer": dict(stats.trace_cov_per_layer),
                "noise_scale": stats.noise_scale,
                "minibatch_variance": {str(b): stats.minibatch_variance(b) for b in sizes},
                "snr": {str(b): stats.snr(b) for b in sizes},
                "empirical": {**emp.to_dict(),
                              "analytic": stats.minibatch_variance(config.batch_size)},
                "probe_size": probe,
                "method": stats.method,
            }
            if elementwise:
                record["mean_gsnr"] = stats.mean_gsnr
            record["seconds"] = time.perf_counter() - t0
            out.append([record])
        return out

    return measure
