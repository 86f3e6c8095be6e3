"""What the sweep tests share: the repository root, the timing fields, loading a script."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Fields that differ between two runs of the same numbers.
TIMING_KEYS = {"train_seconds", "eval_seconds", "seconds", "compile_seconds"}


class Stop(Exception):
    """Stands in for a kill in the middle of a sweep."""


def load_script(name):
    """scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def at_a_terminal(script, *args):
    """The command that runs `script` with SIGINT handled as in a terminal's foreground job.

    A shell starts background jobs with SIGINT ignored and children inherit that, and the sweep
    (like any well-behaved program) leaves an ignored SIGINT ignored; the tests that send it
    must not depend on how pytest itself was started. The child restores the handler itself
    before it runs the script (a `preexec_fn` would run Python between fork and exec, which JAX's
    threads in the test process make unsafe).
    """
    restore = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", restore, str(script), *map(str, args)]
