"""Test-wide settings: fail on implicit rank promotion, draw figures off-screen, and one
compilation cache for the session (in a temporary directory, never ~/.cache).

The cache: programs that several tests, or the sweeps they start in subprocesses, build alike
compile once (a fresh checkout's suite is ~10% faster). The worker processes of pytest-xdist
(pyproject's addopts) share it: without that, each would compile what the other has. JAX's
backend-compile event, which `tests/compiles.py` counts, fires for a program loaded from the
cache too, so "compiles nothing" still means nothing was compiled or loaded. A test that needs
a cold compilation gives its sweep `--compile-cache none`.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
if "BATCHJAX_COMPILE_CACHE" not in os.environ:
    # Made by the first process that imports this file: the one of `pytest`, whose test
    # worker processes (pytest-xdist) inherit the variable, use the same cache and leave it.
    os.environ["BATCHJAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="batchjax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["BATCHJAX_COMPILE_CACHE"], ignore_errors=True)
# No test may find or fill a real Keras cache (~/.keras/datasets/mnist.npz, which "auto"
# would load): a path under this file holds nothing and cannot be written to.
os.environ["KERAS_HOME"] = os.path.join(__file__, "keras")

import jax  # noqa: E402

from sweeputil import load_script  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# The sweep script's own settings, for the programs compiled in this process too.
_sweep = load_script("sweep")
_sweep.enable_compile_cache(_sweep.compile_cache_dir())
