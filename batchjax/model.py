"""The seed model: Flatten -> Dense(hidden, relu) -> Dense(num_classes), as a flax.linen module.

Keras-faithful: glorot-uniform kernels and zero biases (flax's default kernel init is
lecun-normal). The module returns logits; the softmax of the original lives in the loss
(`batchjax.train.cross_entropy`), which is what Keras computes for a softmax layer followed by
`sparse_categorical_crossentropy`. Parameters are a plain dict pytree
`{"hidden": {"kernel", "bias"}, "output": {"kernel", "bias"}}`; on 28x28 inputs there are
784*128 + 128 + 128*10 + 10 = 101,770 of them.

Both layers multiply through `dense_dot_general`: the forward product is `lax.dot_general`
itself; only the kernel gradient of a short or narrow product is formed differently (see there).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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
    """Flatten -> Dense(hidden) -> relu -> Dense(num_classes) logits.

    Attributes:
      hidden: width of the hidden layer (128 in the original).
      num_classes: number of output logits (10 for MNIST).
    """

    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=nn.initializers.glorot_uniform(),
            bias_init=nn.initializers.zeros, dot_general=dense_dot_general, name=name)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(dense(self.hidden, "hidden")(x))
        return dense(self.num_classes, "output")(x)


def init_params(model: MLP, key: jax.Array, image_shape: tuple[int, ...]) -> Params:
    """Initial parameters of `model` for images of `image_shape`, a plain dict pytree."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))
    return jax.tree.map(lambda p: p, dict(variables["params"]))


def count_params(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def model_from_params(params: Params) -> MLP:
    """The `MLP` whose parameters have the shapes of `params` (hidden width, class count)."""
    try:
        hidden = params["hidden"]["kernel"].shape[1]
        num_classes = params["output"]["kernel"].shape[1]
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError("params are not those of batchjax.MLP; pass the model explicitly") from err
    return MLP(hidden=hidden, num_classes=num_classes)
