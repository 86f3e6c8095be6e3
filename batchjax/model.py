"""The seed model, Flatten -> Dense(hidden, relu) -> ... -> Dense(num_classes), in flax.linen.

Keras-faithful: glorot-uniform kernels and zero biases (flax's default kernel init is
lecun-normal). The module returns logits; the softmax of the original lives in the loss
(`batchjax.losses.cross_entropy`), which is what Keras computes for a softmax layer followed by
`sparse_categorical_crossentropy`. Parameters are a plain dict pytree
`{"hidden": {"kernel", "bias"}, "output": {"kernel", "bias"}}`; on 28x28 inputs there are
784*128 + 128 + 128*10 + 10 = 101,770 of them. Deeper stacks (`MLP(hidden=(256, 128))`) name
their hidden layers "hidden_0", "hidden_1", ...

`init_params` initialises any flax model from the image shape; `check_model` says whether a
model is one training can use (parameters only, deterministic).

All layers multiply through `dense_dot_general`: the forward product is `lax.dot_general`
itself; only the kernel gradient of a short or narrow product is formed differently (see there).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from batchjax.errors import BatchjaxError

Params = Any

# Kernel gradients x^T g with fewer rows (the batch) or columns (the features) than this are
# formed from a materialised x^T; see `dense_dot_general`.
SMALL_PRODUCT = 16


@jax.custom_jvp
def _dense_matmul(x_BxD: jax.Array, kernel_DxH: jax.Array) -> jax.Array:
    return lax.dot_general(x_BxD, kernel_DxH, (((1,), (0,)), ((), ())))


@_dense_matmul.defjvp
def _dense_matmul_jvp(primals, tangents):
    x_BxD, kernel_DxH = primals
    dx_BxD, dkernel_DxH = tangents
    tangent_BxH = lax.dot_general(dx_BxD, kernel_DxH, (((1,), (0,)), ((), ())))
    if min(x_BxD.shape[0], kernel_DxH.shape[1]) < SMALL_PRODUCT:
        # x dkernel written as (x^T)^T dkernel on a materialised x^T: its transpose, the
        # kernel gradient, is then the plain product x^T g. The barrier keeps XLA from
        # folding the transpose back into the product.
        xt_DxB = lax.optimization_barrier(x_BxD.T)
        tangent_BxH += lax.dot_general(xt_DxB, dkernel_DxH, (((0,), (0,)), ((), ())))
    else:
        tangent_BxH += lax.dot_general(x_BxD, dkernel_DxH, (((1,), (0,)), ((), ())))
    return _dense_matmul(x_BxD, kernel_DxH), tangent_BxH


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense`, with the kernel gradient of small products re-formed.

    Values and every derivative are those of `lax.dot_general` (a `jax.custom_jvp`, so
    reverse mode, forward mode, vmap and Hessian-vector products all work). The one change:
    for a [B, D] x [D, H] product with B or H below `SMALL_PRODUCT`, reverse mode computes
    the kernel gradient x^T g from an explicit transpose of x instead of contracting the
    batch axis of x in place. On XLA:CPU the in-place form goes to a general kernel; the
    explicit one to the same kernel as the forward product: 28 instead of 47 us per step at
    B = 8 (x 784 wide, g 128), and 11 instead of 18 us for the output layer's [128, 128]^T
    [128, 10] at B = 128 (measured in a `lax.scan` of 60,000 examples). Each entry is the
    same sum of B products; only the kernel, hence at most the float32 rounding of that sum,
    differs.
    """
    if (lhs.ndim == 2 and rhs.ndim == 2 and precision is None
            and preferred_element_type is None
            and tuple(map(tuple, dimension_numbers[0])) == ((1,), (0,))
            and not any(dimension_numbers[1])):
        return _dense_matmul(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


class MLP(nn.Module):
    """Flatten -> [Dense(width) -> relu] for each hidden width -> Dense(num_classes) logits.

    Layers are named "hidden" (one hidden layer, as in the original) or "hidden_0",
    "hidden_1", ... (several), and "output"; `model_from_params` reads the widths back from
    these names.

    Attributes:
      hidden: the hidden layers' widths, e.g. (128,) (the original) or (256, 128); an int
        means one layer. Stored as a tuple, so `MLP(128) == MLP((128,))`.
      num_classes: number of output logits (10 for MNIST).
    """

    hidden: int | Sequence[int] = (128,)
    num_classes: int = 10

    def __post_init__(self):
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        object.__setattr__(self, "hidden", hidden)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=nn.initializers.glorot_uniform(),
            bias_init=nn.initializers.zeros, dot_general=dense_dot_general, name=name)
        x = x.reshape((x.shape[0], -1))
        for name, width in zip(hidden_layer_names(len(self.hidden)), self.hidden):
            x = nn.relu(dense(width, name)(x))
        return dense(self.num_classes, "output")(x)


def hidden_layer_names(depth: int) -> list[str]:
    """The names of an `MLP`'s hidden layers: ["hidden"] for one, "hidden_0", ... for more."""
    return ["hidden"] if depth == 1 else [f"hidden_{i}" for i in range(depth)]


def init_params(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> Params:
    """Initial parameters of `model` for images of `image_shape`, a plain dict pytree.

    The model is initialised on one all-zero image (`model.init(key, x_1)`); only the
    "params" collection is kept (`check_model` says whether there is anything else).
    """
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))
    return jax.tree.map(lambda p: p, dict(variables["params"]))


@functools.lru_cache(maxsize=64)
def check_model(model: nn.Module, image_shape: tuple[int, ...]) -> None:
    """Raise `BatchjaxError` unless `model` is one that training can use as it is.

    Training needs a function of the parameters alone: a flax module whose only variable
    collection is "params" (no BatchNorm statistics or other state) and that needs no random
    numbers when applied (no active dropout), mapping a batch [B, *image_shape] to outputs
    [B, ...]. Checked abstractly (`jax.eval_shape`): nothing is computed.
    """
    if not isinstance(model, nn.Module):
        raise BatchjaxError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    x_1 = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    try:
        variables = jax.eval_shape(model.init, jax.random.key(0), x_1)
    except flax.errors.FlaxError as err:
        raise BatchjaxError(f"model {type(model).__name__} cannot be initialised on images of "
                            f"shape {tuple(image_shape)}: {str(err).splitlines()[0]}") from None
    others = {name: sorted(tree) for name, tree in variables.items() if name != "params"}
    if others:
        got = "; ".join(f"{name}: {', '.join(map(str, keys)) or '-'}"
                        for name, keys in others.items())
        raise BatchjaxError(f"train needs a model whose only variables are params; got {got} "
                            "(e.g. BatchNorm statistics): use a model without them")
    x_2 = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    try:
        out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x),
                             variables.get("params", {}), x_2)
    except flax.errors.InvalidRngError as err:
        problem = str(err).split(" (")[0]
        raise BatchjaxError(f"train needs a deterministic model, but {problem} (dropout): "
                            "turn it off, e.g. nn.Dropout(deterministic=True)") from None
    if not hasattr(out, "shape") or out.shape[:1] != (2,):
        raise BatchjaxError(f"model {type(model).__name__} must map a batch [B, ...] to "
                            f"outputs [B, ...]; on 2 images it returned {out}")


def count_params(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def model_from_params(params: Params) -> MLP:
    """The `MLP` whose parameters have the shapes of `params` (hidden widths, class count)."""
    try:
        if "hidden" in params:
            names = ["hidden"]
        else:
            names = hidden_layer_names(sum(1 for k in params if k.startswith("hidden_")))
            if len(names) < 2 or set(params) != {*names, "output"}:
                raise KeyError("hidden")
        hidden = tuple(int(params[name]["kernel"].shape[1]) for name in names)
        num_classes = params["output"]["kernel"].shape[1]
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError("params are not those of batchjax.MLP; pass the model explicitly") from err
    return MLP(hidden=hidden, num_classes=num_classes)
