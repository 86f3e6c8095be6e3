"""batchjax: how batch size shapes neural-network training, measured in pure JAX."""

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
from batchjax.train import TrainResult, TrainState, train, train_seeds

__version__ = "0.1.0"

__all__ = [
    "BatchjaxError", "CriticalFit", "Dataset", "EmpiricalVariance", "GradientStats", "MLP",
    "SharpnessResult", "TrainConfig", "TrainResult", "TrainState", "empirical_minibatch_variance",
    "fit_critical_batch", "gradient_stats", "load_dataset", "make_measure", "make_synthetic",
    "per_example_grads", "per_example_sq_norms", "regimes", "sharpness", "steps_to_target",
    "steps_to_target_table", "train", "train_seeds", "two_batch_noise_estimate",
]
