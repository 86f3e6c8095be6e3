"""Optimizers against their update rules written out in NumPy, and traced against constant
hyperparameters (the same numbers, bit for bit, in a scan of steps as training runs them)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from batchjax import BatchjaxError, TrainConfig
from batchjax.config import OPTIMIZERS
from batchjax.optim import (HYPERPARAMS, hyperparams, make_optimizer, named_optimizer,
                            scale_by_keras_adam)


def gradients(steps=8, size=5, seed=1, tiny=True):
    """Gradients of magnitudes 1e-5 .. 1e-8 (where Adam's eps matters), then O(1) ones."""
    rng = np.random.default_rng(seed)
    scales = [10.0**(-4 - t) for t in range(1, steps // 2 + 1)] if tiny else []
    return [rng.normal(size=size) * s for s in scales + [1.0] * (steps - len(scales))]


def run_optax(opt, w0, grads):
    """The optimizer's parameters after each gradient, in float32, one jitted step at a time."""
    w, state = jnp.asarray(w0, jnp.float32), opt.init(jnp.asarray(w0, jnp.float32))
    step = jax.jit(opt.update)
    out = []
    for g in grads:
        updates, state = step(jnp.asarray(g, jnp.float32), state, w)
        w = optax.apply_updates(w, updates)
        out.append(np.asarray(w, np.float64))
    return out


def numpy_rule(name, w0, grads, lr, b1=0.9, b2=0.999, eps=1e-7, mu=0.9):
    """The textbook update rules in float64 (see batchjax.optim for the definitions)."""
    w, m, v, trace = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    out = []
    for t, g in enumerate(grads, start=1):
        if name == "sgd":
            w = w - lr * g
        elif name == "momentum":  # heavy ball
            trace = mu * trace + g
            w = w - lr * trace
        elif name == "nesterov":
            trace = mu * trace + g
            w = w - lr * (g + mu * trace)
        else:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            if name == "adam":  # Kingma & Ba: bias-corrected moments, eps outside the root
                w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            else:  # Keras 3: alpha = lr sqrt(1-b2^t)/(1-b1^t); w -= alpha m / (sqrt(v) + eps)
                w = w - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_named_optimizers_follow_their_update_rules(name):
    lr, mu = 0.05, 0.8
    w0 = np.random.default_rng(0).normal(size=5)
    # SGD steps are lr g: tiny gradients would move float32 weights by less than their ulp.
    grads = gradients(tiny=name.startswith("adam"))
    config = TrainConfig(optimizer=name, learning_rate=lr, momentum=mu, eps=1e-7)
    ours = run_optax(make_optimizer(config), w0, grads)
    ref = numpy_rule(name, w0, grads, lr, mu=mu)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a - w0, b - w0, rtol=2e-4, atol=1e-9)


def test_momentum_rules_differ_from_each_other_and_from_sgd():
    # The references above must be able to fail: the three rules give different steps.
    w0 = np.zeros(5)
    grads = gradients(tiny=False)
    finals = {n: numpy_rule(n, w0, grads, 0.05, mu=0.8)[-1] for n in ("sgd", "momentum",
                                                                      "nesterov")}
    assert not np.allclose(finals["sgd"], finals["momentum"], rtol=0.05)
    assert not np.allclose(finals["momentum"], finals["nesterov"], rtol=0.05)


def test_keras_adam_matches_the_keras_update_rule():
    """Keras 3 Adam: alpha = lr sqrt(1-b2^t)/(1-b1^t); w -= alpha m / (sqrt(v) + eps)."""
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-7
    rng = np.random.default_rng(1)
    w = rng.normal(size=5)
    m = np.zeros(5)
    v = np.zeros(5)
    w0 = w.copy()
    w_ours = w_optax = jnp.asarray(w, jnp.float32)
    opt = optax.chain(scale_by_keras_adam(b1, b2, eps), optax.scale(-lr))
    ref = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    state, ref_state = opt.init(w_ours), ref.init(w_optax)
    for t in range(1, 8):
        g = rng.normal(size=5) * 10.0**(-4 - t)  # gradients near eps make its placement matter
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - alpha * m / (np.sqrt(v) + eps)
        g32 = jnp.asarray(g, jnp.float32)
        updates, state = opt.update(g32, state, w_ours)
        w_ours = optax.apply_updates(w_ours, updates)
        updates, ref_state = ref.update(g32, ref_state, w_optax)
        w_optax = optax.apply_updates(w_optax, updates)
    np.testing.assert_allclose(np.asarray(w_ours) - w0, w - w0, rtol=1e-4, atol=1e-9)
    # optax.adam adds eps after the bias correction: with these gradients its steps differ.
    assert not np.allclose(np.asarray(w_optax) - w0, w - w0, rtol=0.05, atol=0)


def test_optimizer_choice_and_learning_rate_scaling():
    cfg = TrainConfig(batch_size=128, learning_rate=1e-3, reference_batch_size=32)
    assert cfg.effective_learning_rate == pytest.approx(1e-3)
    linear, sqrt = (dataclasses.replace(cfg, lr_scaling=s) for s in ("linear", "sqrt"))
    assert linear.effective_learning_rate == pytest.approx(4e-3)
    assert sqrt.effective_learning_rate == pytest.approx(2e-3)
    assert hyperparams(dataclasses.replace(cfg, lr_scaling="linear"))["learning_rate"] == \
        np.float32(4e-3)
    params = {"w": jnp.ones(3)}
    g = {"w": jnp.array([1e-6, 1.0, -2.0])}
    ref, _ = optax.adam(1e-3, eps=1e-7).update(g, optax.adam(1e-3, eps=1e-7).init(params))
    opt = make_optimizer(dataclasses.replace(cfg, optimizer="adam", eps=1e-7))
    ours, _ = opt.update(g, opt.init(params))
    np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-6)


@pytest.mark.parametrize("name,reference", [
    ("adam", lambda c: optax.adam(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps)),
    ("sgd", lambda c: optax.sgd(c.learning_rate)),
    ("momentum", lambda c: optax.sgd(c.learning_rate, momentum=c.momentum)),
    ("nesterov", lambda c: optax.sgd(c.learning_rate, momentum=c.momentum, nesterov=True)),
    ("adam_keras", None),
])
def test_traced_hyperparameters_give_the_numbers_of_constants(name, reference):
    """50 steps in a jitted scan (as training runs them): hyperparameters passed as float32
    data equal Python-float constants, and optax's own optimizers, bit for bit."""
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.normal(size=300), jnp.float32)
    grads_S = jnp.asarray(rng.normal(size=(50, 300)) * 10.0**-rng.integers(0, 8, (50, 1)),
                          jnp.float32)
    config = TrainConfig(optimizer=name, learning_rate=0.01, b2=0.999, momentum=0.9)

    def run(build, hparams):
        state0 = build(hyperparams(config, dtype=None)).init(w0)

        def go(w, state, hparams):
            opt = build(hparams)

            def body(carry, g):
                updates, state = opt.update(g, carry[1], carry[0])
                return (optax.apply_updates(carry[0], updates), state), None

            return jax.lax.scan(body, (w, state), grads_S)[0][0]

        return np.asarray(jax.jit(go)(w0, state0, hparams))

    constants = run(lambda hp: make_optimizer(config), None)
    traced = run(lambda hp: named_optimizer(name, hp), hyperparams(config))
    np.testing.assert_array_equal(traced, constants)
    if reference is not None:
        np.testing.assert_array_equal(run(lambda hp: reference(config), None), constants)


def test_hyperparameter_complements_are_rounded_from_double_precision():
    # 1 - b2 in float32 arithmetic is another number; the complements are Python's, rounded.
    hp = hyperparams(TrainConfig(b2=0.999))
    assert set(hp) == set(HYPERPARAMS)
    assert hp["one_minus_b2"] == np.float32(1 - 0.999)
    assert hp["one_minus_b2"] != np.float32(1) - np.float32(0.999)
    assert all(v.dtype == np.float32 for v in hp.values())


def test_unknown_optimizer_is_a_one_line_error():
    with pytest.raises(BatchjaxError, match="optimizer must be one of") as err:
        TrainConfig(optimizer="adagrad")
    assert "\n" not in str(err.value)
    with pytest.raises(BatchjaxError, match="optimizer must be one of"):
        named_optimizer("adagrad", hyperparams(TrainConfig()))
    with pytest.raises(BatchjaxError, match=r"momentum must be in \[0, 1\)"):
        TrainConfig(optimizer="momentum", momentum=1.0)
