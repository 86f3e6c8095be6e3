"""Named random streams: every random number of a run comes from its seed through one of these.

A run's seed gives the root key `jax.random.key(seed)`; each purpose folds in a number of its
own, so no two purposes can share a key (tested):

    init       fold_in(root, 0)                      parameter initialisation
    shuffle    fold_in(fold_in(root, 1), epoch)      the order of an epoch's examples
    sharpness  fold_in(root, 2)                      Lanczos start vector and Hutchinson probes
    noise      fold_in(fold_in(root, 3), step)       the sampled minibatches of the noise check

Keys depend on the seed alone (not on the other runs trained beside it), so a resumed sweep
draws what an uninterrupted one would. The init and shuffle streams are those of batchjax
0.1; the noise stream moved off fold_in(fold_in(root, step), 0), which equalled the shuffle key
of epoch 0 at step 1.
"""

from __future__ import annotations

import jax

STREAMS = {"init": 0, "shuffle": 1, "sharpness": 2, "noise": 3}


def root_key(seed: int) -> jax.Array:
    """The typed key every stream of the run with `seed` derives from."""
    return jax.random.key(seed)


def stream_key(seed: int | jax.Array, stream: str, index: int | None = None) -> jax.Array:
    """The key of `stream` for the run with `seed`; `index` is the epoch or step where needed.

    Args:
      seed: the run's seed, or its root key (a typed key, e.g. traced inside `jax.vmap`).
      stream: one of `STREAMS`.
      index: the epoch ("shuffle") or global step ("noise"); None for "init" and "sharpness".

    Returns:
      A typed `jax.random` key.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    needs_index = stream in ("shuffle", "noise")
    if needs_index != (index is not None):
        raise ValueError(f"stream {stream!r} {'needs' if needs_index else 'takes no'} index")
    is_key = jax.dtypes.issubdtype(getattr(seed, "dtype", None), jax.dtypes.prng_key)
    root = seed if is_key else root_key(int(seed))
    key = jax.random.fold_in(root, STREAMS[stream])
    return key if index is None else jax.random.fold_in(key, index)
