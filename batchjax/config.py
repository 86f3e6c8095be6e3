"""Run configuration: a frozen, validated dataclass whose defaults are the original experiment.

The original Keras recipe trains Flatten -> Dense(128, relu) -> Dense(10, softmax) with Adam
(learning rate 1e-3, Keras' defaults) for 10 epochs. `TrainConfig` holds one run of it; a sweep
varies it with `dataclasses.replace`. Every field is a JSON scalar, so `dataclasses.asdict` is
the saved `config.json` and CLI flags map one to one onto fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from batchjax.errors import BatchjaxError

LR_SCALINGS = ("none", "linear", "sqrt")
OPTIMIZERS = ("adam_keras", "adam", "sgd", "momentum", "nesterov")
NOISE_SCHEDULES = ("epoch", "log", "none")


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BatchjaxError(f"{name} must be an integer, got {value!r}{hint}")
    if value < minimum:
        raise BatchjaxError(f"{name} must be at least {minimum}, got {value}{hint}")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BatchjaxError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise BatchjaxError(f"{name} must be a finite number > 0, got {value}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults reproduce the original experiment at batch size 32.

    Attributes:
      batch_size: examples per optimizer step; the last batch of an epoch is partial when it
        does not divide the training set (used, as Keras does, never dropped).
      epochs: passes over the training set, reshuffled every epoch.
      learning_rate: base learning rate, before `lr_scaling`.
      lr_scaling: "none", "linear" (lr * B / B_ref; Goyal et al. 2017) or "sqrt"
        (lr * sqrt(B / B_ref)), relative to `reference_batch_size`.
      reference_batch_size: B_ref of `lr_scaling`.
      optimizer: "adam_keras" (Keras' Adam: epsilon added to sqrt(v) before bias correction,
        the default), "adam" (optax.adam: epsilon added after bias correction), "sgd",
        "momentum" (heavy ball: v <- momentum v + g, theta <- theta - lr v) or "nesterov"
        (theta <- theta - lr (g + momentum v), with v updated as for heavy ball).
      b1, b2, eps: Adam's hyperparameters, Keras' defaults (optax's default eps is 1e-8).
      momentum: the momentum coefficient of "momentum" and "nesterov".
      hidden: widths of the hidden layers, e.g. (128,) as in the original or (256, 128); an
        int means one layer.
      seed: seeds initialisation (`init`) and shuffling (`shuffle`) through separate keys.
      noise_schedule: when gradient-noise statistics are measured: "epoch" (before the first
        step and at every epoch end), "log" (`noise_points` log-spaced steps) or "none".
      noise_points: number of log-spaced measurement steps for the "log" schedule.
      probe_size: examples of the training set used by the noise statistics (0: all of them).
      unroll: `lax.scan` unroll factor of the epoch; changes speed, never the numbers.
    """

    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    lr_scaling: str = "none"
    reference_batch_size: int = 32
    optimizer: str = "adam_keras"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7
    momentum: float = 0.9
    hidden: tuple[int, ...] = (128,)
    seed: int = 0
    noise_schedule: str = "epoch"
    noise_points: int = 20
    probe_size: int = 0
    unroll: int = 1

    def __post_init__(self):
        hidden = self.hidden
        if isinstance(hidden, (list, tuple)):
            hidden = tuple(hidden)
        elif isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = (hidden,)
        else:
            raise BatchjaxError(f"hidden must be a width or a tuple of widths, got {hidden!r}")
        if not hidden:
            raise BatchjaxError("hidden needs at least one layer width, e.g. (128,)")
        for width in hidden:
            _check_int("hidden width", width, 1, " (e.g. hidden=(256, 128), --hidden 256,128)")
        object.__setattr__(self, "hidden", hidden)
        _check_int("batch_size", self.batch_size, 1, " (use e.g. --batch-sizes 8,32,128)")
        _check_int("epochs", self.epochs, 1)
        _check_positive_float("learning_rate", self.learning_rate)
        _check_int("reference_batch_size", self.reference_batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("noise_points", self.noise_points, 1)
        _check_int("probe_size", self.probe_size, 0, " (0 means the whole training set)")
        _check_int("unroll", self.unroll, 1)
        for name in ("b1", "b2", "momentum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise BatchjaxError(f"{name} must be in [0, 1), got {value!r}")
        _check_positive_float("eps", self.eps)
        for name, value, allowed in (
            ("lr_scaling", self.lr_scaling, LR_SCALINGS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("noise_schedule", self.noise_schedule, NOISE_SCHEDULES),
        ):
            if value not in allowed:
                raise BatchjaxError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    @property
    def effective_learning_rate(self) -> float:
        """The learning rate the optimizer uses, after the named `lr_scaling` rule."""
        ratio = self.batch_size / self.reference_batch_size
        factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]
        return self.learning_rate * factor

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        """A seconds-long configuration for tests and smoke runs."""
        return cls(**{"batch_size": 16, "epochs": 2, "hidden": (16,), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (`hidden` as a list)."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BatchjaxError(f"unknown TrainConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)
