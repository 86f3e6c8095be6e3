"""Per-example losses, and how every part of the library finds the loss of a model.

The contract, the same for `batchjax.train`, `batchjax.gradient_stats`, `batchjax.sharpness`
and the sweep:

  model      a `flax.linen.Module` mapping a batch of inputs x_B (shape [B, ...]) to outputs
             (logits) [B, K], each example's row depending on that example alone (no batch
             statistics), with a "params" collection only. Initialised from the input shape.
  apply_fn   instead of a model: any `apply_fn(params, x_B) -> outputs_B` with the same
             properties (a plain function of a parameter pytree).
  loss_fn    `loss_fn(outputs_B, labels_B) -> losses_B`: the loss of EACH example, shape [B],
             not their mean. Default: softmax cross-entropy on integer labels (`cross_entropy`),
             what Keras computes for a softmax layer and `sparse_categorical_crossentropy`.

The training loss of a batch is the mean of `loss_fn` over its examples; the gradient noise
statistics differentiate each example's own loss (`batchjax.noise`). The functions built here
are cached per (model or apply_fn, loss_fn), so that `jax.jit` sees one function object per
pair and compiles once: pass the same objects to repeated calls.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax

from batchjax.errors import BatchjaxError
from batchjax.model import model_from_params

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
ExampleLossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy on integer labels, from logits (shape [B])."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)


@functools.lru_cache(maxsize=128)
def model_apply_fn(model) -> ApplyFn:
    """`apply_fn(params, x_B) -> outputs_B` of a flax module; one function object per model."""

    def apply_fn(params, x_B):
        return model.apply({"params": params}, x_B)

    return apply_fn


@functools.lru_cache(maxsize=128)
def example_losses_fn(apply_fn: ApplyFn, loss_fn: LossFn = cross_entropy) -> ExampleLossFn:
    """`losses(params, x_B, y_B) -> losses_B`: the per-example losses of `apply_fn`'s outputs."""

    def losses(params, x_B, y_B):
        return loss_fn(apply_fn(params, x_B), y_B)

    return losses


def resolve(params: Params, *, model=None, apply_fn: ApplyFn | None = None,
            loss_fn: LossFn | None = None) -> tuple[ExampleLossFn, Any]:
    """The per-example loss of a model (or apply_fn) and loss_fn, and the model it belongs to.

    With neither `model` nor `apply_fn`, the model is `batchjax.model.model_from_params(params)`
    (the MLP whose parameters `params` are). Returns `(losses, model)`, `model` None when the
    outputs come from an `apply_fn`.

    Raises:
      BatchjaxError: both `model` and `apply_fn`, or params that are no MLP's and no model.
    """
    if model is not None and apply_fn is not None:
        raise BatchjaxError("pass either model or apply_fn, not both")
    if loss_fn is None:
        loss_fn = cross_entropy
    if apply_fn is None:
        if model is None:
            try:
                model = model_from_params(params)
            except ValueError as err:
                raise BatchjaxError(str(err)) from None
        apply_fn = model_apply_fn(model)
    return example_losses_fn(apply_fn, loss_fn), model
