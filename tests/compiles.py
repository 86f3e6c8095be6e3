"""A counter of XLA compilations, for the tests that check that nothing recompiles."""

import contextlib

import jax

EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Names of the XLA compilations inside the block (JAX's backend-compile event)."""
    names = []

    def listener(event, duration, **kwargs):
        if event == EVENT:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
