"""batchjax: how batch size shapes neural-network training, measured in pure JAX.

The public names below are loaded on first use (PEP 562), so that `import batchjax.plots`,
`batchjax.report` or `batchjax.results` (figures and reports from saved results) does not
import JAX: the processes that draw figures start in a third of the time.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "TrainConfig": "config",
    "CriticalFit": "critical", "fit_critical_batch": "critical", "regimes": "critical",
    "steps_to_target": "critical", "steps_to_target_table": "critical",
    "Dataset": "data", "load_dataset": "data", "make_synthetic": "data",
    "BatchjaxError": "errors",
    "MLP": "model",
    "EmpiricalVariance": "noise", "GradientStats": "noise",
    "empirical_minibatch_variance": "noise", "gradient_stats": "noise", "make_measure": "noise",
    "per_example_grads": "noise", "per_example_sq_norms": "noise",
    "two_batch_noise_estimate": "noise",
    "SharpnessResult": "sharpness", "sharpness": "sharpness",
    "Interrupted": "train", "TrainResult": "train", "TrainState": "train", "train": "train",
    "train_runs": "train", "train_seeds": "train",
    "Run": "run",
    "OPTIMIZERS": "config",
    "analyse": "analysis",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"batchjax.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps `batchjax.train` and `batchjax.sharpness` the functions, as their names promise.

    Importing the submodule of the same name makes the import system bind it here; that one
    binding is skipped (the submodule stays in `sys.modules` for `from batchjax.train import`).
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from batchjax.config import TrainConfig
    from batchjax.critical import (CriticalFit, fit_critical_batch, regimes, steps_to_target,
                                   steps_to_target_table)
    from batchjax.data import Dataset, load_dataset, make_synthetic
    from batchjax.errors import BatchjaxError
    from batchjax.model import MLP
    from batchjax.noise import (EmpiricalVariance, GradientStats, empirical_minibatch_variance,
                                gradient_stats, make_measure, per_example_grads,
                                per_example_sq_norms, two_batch_noise_estimate)
    from batchjax.sharpness import SharpnessResult, sharpness
    from batchjax.analysis import analyse
    from batchjax.config import OPTIMIZERS
    from batchjax.run import Run
    from batchjax.train import (Interrupted, TrainResult, TrainState, train, train_runs,
                                train_seeds)
