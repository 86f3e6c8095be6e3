"""Test-wide settings: fail on implicit rank promotion, draw figures off-screen."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
