"""The seed model: Flatten -> Dense(hidden, relu) -> Dense(num_classes), as a flax.linen module.

Keras-faithful: glorot-uniform kernels and zero biases (flax's default kernel init is
lecun-normal). The module returns logits; the softmax of the original lives in the loss
(`batchjax.train.cross_entropy`), which is what Keras computes for a softmax layer followed by
`sparse_categorical_crossentropy`. Parameters are a plain dict pytree
`{"hidden": {"kernel", "bias"}, "output": {"kernel", "bias"}}`; on 28x28 inputs there are
784*128 + 128 + 128*10 + 10 = 101,770 of them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any


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
            bias_init=nn.initializers.zeros, name=name)
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
