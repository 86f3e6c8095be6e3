"""A counter of XLA compilations, for the tests that check that nothing recompiles."""

import contextlib

import jax

EVENT = "/jax/core/compile/backend_compile_duration"
# A program loaded from the persistent compilation cache instead (conftest enables one).
CACHE_HIT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def count_compiles():
    """Names of the XLA compilations inside the block (JAX's backend-compile event), and
    "cache hit" for each program loaded from the persistent cache instead of compiled."""
    names = []

    def listener(event, duration, **kwargs):
        if event == EVENT:
            names.append(kwargs.get("fun_name", "?"))

    def hits(event, **kwargs):
        if event == CACHE_HIT:
            names.append("cache hit")

    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(hits)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.monitoring.unregister_event_listener(hits)
