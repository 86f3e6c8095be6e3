"""Test-wide settings: fail on implicit rank promotion, draw figures off-screen, and keep the
sweep script's compilation cache off unless a test asks for one (no writes to ~/.cache)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("BATCHJAX_COMPILE_CACHE", "none")
# No test may find or fill a real Keras cache (~/.keras/datasets/mnist.npz, which "auto"
# would load): a path under this file holds nothing and cannot be written to.
os.environ["KERAS_HOME"] = os.path.join(__file__, "keras")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
