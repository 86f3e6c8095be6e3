"""Optimizers by name, Keras' Adam among them, with hyperparameters that are traced values.

`TrainConfig.optimizer` names one of these (g the minibatch gradient, lr the effective learning
rate, mu `momentum`; every state starts at zero):

  sgd         theta <- theta - lr g
  momentum    heavy ball, as optax.sgd(lr, momentum=mu): v <- mu v + g; theta <- theta - lr v
  nesterov    as optax.sgd(lr, momentum=mu, nesterov=True): v <- mu v + g;
              theta <- theta - lr (g + mu v)
  adam        as optax.adam (Kingma & Ba 2015): m <- b1 m + (1 - b1) g,
              v <- b2 v + (1 - b2) g^2; theta <- theta - lr m_hat / (sqrt(v_hat) + eps) with
              m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
  adam_keras  Keras' Adam, the default (`scale_by_keras_adam`): the same moments;
              theta <- theta - lr alpha_t m / (sqrt(v) + eps), alpha_t = sqrt(1 - b2^t) / (1 - b1^t)

Hyperparameters are data, not constants baked into a program: `hyperparams(config)` gives them
as float32 scalars and `named_optimizer(name, hparams)` builds the optax transformation from
them inside the traced training step. One compiled program then serves every learning rate,
b1, b2, eps and momentum, and runs with different ones train together under `jax.vmap`.

Rounding: Keras and optax compute 1 - b1 and 1 - b2 in Python (double precision) and round
the result to float32; 1 - float32(b2) computed in float32 is another number (b2 = 0.999:
1.3e-5 relative). The hyperparameters therefore carry these complements, computed on the host,
and the traced updates equal those of Python-float constants bit for bit (tested).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchjax.config import OPTIMIZERS, TrainConfig
from batchjax.errors import BatchjaxError

Params = Any
# The traced hyperparameters of every named optimizer (each uses some of them).
HYPERPARAMS = ("learning_rate", "b1", "one_minus_b1", "b2", "one_minus_b2", "eps", "momentum")


class ScaleByKerasAdamState(NamedTuple):
    count: jax.Array
    mu: Params
    nu: Params


def scale_by_keras_adam(b1=0.9, b2=0.999, eps=1e-7, *, one_minus_b1=None,
                        one_minus_b2=None) -> optax.GradientTransformation:
    """Adam's direction as Keras computes it: alpha_t * m_t / (sqrt(v_t) + eps).

    alpha_t = sqrt(1 - b2^t) / (1 - b1^t). This equals optax's m_hat / (sqrt(v_hat) + eps_t)
    with eps_t = eps / sqrt(1 - b2^t): Keras adds epsilon before the bias correction, optax
    after it, so the two differ most in the first steps (eps_1 is 32x eps). The moments
    follow Keras' arithmetic, m <- m + (g - m)(1 - b1). Hyperparameters may be floats or
    traced arrays; with arrays pass `one_minus_b1`/`one_minus_b2` computed in double
    precision (see the module docstring).
    """
    one_minus_b1 = 1 - b1 if one_minus_b1 is None else one_minus_b1
    one_minus_b2 = 1 - b2 if one_minus_b2 is None else one_minus_b2

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return ScaleByKerasAdamState(jnp.zeros([], jnp.int32),
                                     jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: m + (g - m) * one_minus_b1, state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * one_minus_b2, state.nu, updates)
        t = count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: alpha * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, ScaleByKerasAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, *, one_minus_b1=None,
                  one_minus_b2=None) -> optax.GradientTransformation:
    """`optax.scale_by_adam` (no eps_root, no Nesterov), its arithmetic step for step.

    Written out so that b1 and b2 can be traced values with their complements computed in
    double precision, as optax computes them for Python floats. The state is optax's
    `ScaleByAdamState`.
    """
    one_minus_b1 = 1 - b1 if one_minus_b1 is None else one_minus_b1
    one_minus_b2 = 1 - b2 if one_minus_b2 is None else one_minus_b2

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                      jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: one_minus_b1 * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: one_minus_b2 * (g**2) + b2 * v, updates, state.nu)
        count = optax.safe_increment(state.count)
        correction1, correction2 = 1 - b1**count, 1 - b2**count
        updates = jax.tree.map(
            lambda m, v: (m / correction1.astype(m.dtype))
            / (jnp.sqrt(v / correction2.astype(v.dtype)) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def hyperparams(config: TrainConfig, dtype=np.float32) -> dict[str, Any]:
    """The hyperparameters of `config`'s optimizer (`HYPERPARAMS`), as scalars of `dtype`.

    learning_rate is the effective one (after `lr_scaling`). The complements 1 - b1 and
    1 - b2 are computed in double precision before the cast. `dtype=None` gives Python floats
    (constants, as `make_optimizer` uses them).
    """
    values = {"learning_rate": config.effective_learning_rate, "b1": config.b1,
              "one_minus_b1": 1 - config.b1, "b2": config.b2, "one_minus_b2": 1 - config.b2,
              "eps": config.eps, "momentum": config.momentum}
    cast = float if dtype is None else np.dtype(dtype).type
    return {name: cast(values[name]) for name in HYPERPARAMS}


def named_optimizer(name: str, hparams: dict[str, Any]) -> optax.GradientTransformation:
    """The optimizer `name` (one of `config.OPTIMIZERS`) with hyperparameters `hparams`.

    `hparams` holds `HYPERPARAMS` (`hyperparams(config)`), as floats or as (traced) scalars.
    Every optimizer is `optax.chain(direction, optax.scale(-learning_rate))`, so its state
    has the same structure whatever the values.
    """
    if name == "sgd":
        direction = optax.identity()
    elif name in ("momentum", "nesterov"):
        direction = optax.trace(decay=hparams["momentum"], nesterov=name == "nesterov")
    elif name in ("adam", "adam_keras"):
        scale_by = scale_by_adam if name == "adam" else scale_by_keras_adam
        direction = scale_by(hparams["b1"], hparams["b2"], hparams["eps"],
                             one_minus_b1=hparams["one_minus_b1"],
                             one_minus_b2=hparams["one_minus_b2"])
    else:
        raise BatchjaxError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    return optax.chain(direction, optax.scale(-hparams["learning_rate"]))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optimizer of `config` with its hyperparameters as constants (Python floats)."""
    return named_optimizer(config.optimizer, hyperparams(config, dtype=None))


def resolve(optimizer: str | optax.GradientTransformation,
            hparams: dict[str, Any] | None) -> optax.GradientTransformation:
    """The transformation a training step applies: a named optimizer built from `hparams`,
    or a given `optax.GradientTransformation` itself (its hyperparameters are its own)."""
    if isinstance(optimizer, str):
        return named_optimizer(optimizer, hparams)
    return optimizer
