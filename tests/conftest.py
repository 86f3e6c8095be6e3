"""Test-wide settings: fail on implicit rank promotion, draw figures off-screen, and keep the
sweep script's compilation cache off unless a test asks for one (no writes to ~/.cache)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("BATCHJAX_COMPILE_CACHE", "none")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
