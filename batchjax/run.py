"""One training run, as training returns it and as a results directory holds it: one type.

`batchjax.train` returns `Run`s (public name `TrainResult`); `batchjax.results` writes them and
loads them back as the same type, and analysis, figures and report read nothing else. Fields a
stage adds later (final training-set evaluation, sharpness, the directory) start as None.
No JAX here: figure processes load runs without importing it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from batchjax.config import TrainConfig

HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                "train_seconds", "eval_seconds", "steps", "examples_seen")


def empty_history() -> dict[str, np.ndarray]:
    """A history with no finished epoch."""
    return {k: np.zeros(0, np.float64) for k in HISTORY_KEYS}


@dataclasses.dataclass
class Run:
    """What one run produced. Arrays are NumPy; `history` has one entry per finished epoch.

    Attributes:
      config: the run's configuration.
      dataset: `Dataset.describe()` of the data it trained on.
      history: per-epoch float64 arrays (`HISTORY_KEYS`): epoch, train_loss, train_accuracy
        (Keras' running means over the epoch), val_loss, val_accuracy (at the epoch's end),
        train_seconds, eval_seconds, steps and examples_seen (cumulative).
      step_losses: the raw training loss of every optimizer step (not running means).
      step_batch_sizes: the size of every step's batch (the last of an epoch may be partial).
      noise: gradient-noise records (`batchjax.noise.make_measure`), in the order taken.
      status: "complete", or "diverged" when the loss became NaN or infinite.
      diverged_step: the first step (0-based, global) whose loss was not finite, or None.
      compile_seconds: one-off compilation time, not included in the epoch times.
      trained_with: names of the runs trained in one program with this one, itself included
        (their epoch times are the group's).
      params: final parameters (in memory only; None for a run loaded from disk).
      final_train: {"loss", "accuracy"} of the final parameters on the whole training set,
        or None (not evaluated, or diverged).
      sharpness: Hessian measurements at the final parameters (`batchjax.sharpness`), or None.
      path: the run's directory once saved, or None.
      stopped: in a sweep with a training-loss target (a learning-rate grid), why its group
        of runs stopped training it: "target" (it reached the target), "hopeless" (it had
        not, after more than the sweep's stop factor times the fewest steps any run of its
        batch size needed), "budget" (it had not, at the epoch budget) or "diverged"; None
        elsewhere.
      target: in such a sweep, {"train_loss": T, "steps": s, "examples": e}: the target and
        the steps and examples to it (`batchjax.critical.steps_to_target` on every step the
        run trained; None when it did not reach it); else None.
    """

    config: TrainConfig
    dataset: dict
    history: dict[str, np.ndarray] = dataclasses.field(default_factory=empty_history)
    step_losses: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.float64))
    step_batch_sizes: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int64))
    noise: list[dict] = dataclasses.field(default_factory=list)
    status: str = "complete"
    diverged_step: int | None = None
    compile_seconds: float = 0.0
    trained_with: list[str] = dataclasses.field(default_factory=list)
    params: Any = None
    final_train: dict[str, float] | None = None
    sharpness: dict[str, Any] | None = None
    path: pathlib.Path | None = None
    stopped: str | None = None
    target: dict[str, Any] | None = None

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def learning_rate(self) -> float:
        """The learning rate the optimizer used (after `lr_scaling`)."""
        return self.config.effective_learning_rate

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def num_epochs(self) -> int:
        """Epochs finished."""
        return len(self.history["epoch"])

    @property
    def examples_seen(self) -> np.ndarray:
        """Examples seen after each step (cumulative sum of the step batch sizes)."""
        return np.cumsum(self.step_batch_sizes)
