"""Scaling: no recompilation across epochs, and seeds sharded over devices give the same numbers."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from batchjax import TrainConfig, make_synthetic, train, train_seeds
from compiles import count_compiles


def test_no_recompilation_after_the_first_epoch():
    data = make_synthetic(num_train=203, num_val=40, seed=0)
    counts_at_epoch_end = []
    with count_compiles() as compiles:
        # Shapes no other test uses, so the first epoch really compiles.
        train(TrainConfig.tiny(batch_size=19, hidden=13, epochs=4, noise_schedule="none"), data,
              on_epoch_end=lambda epoch, results: counts_at_epoch_end.append(len(compiles)))
    assert counts_at_epoch_end[0] > 0
    assert counts_at_epoch_end == [counts_at_epoch_end[0]] * 4, counts_at_epoch_end


SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    from batchjax import TrainConfig, make_synthetic, train_seeds
    data = make_synthetic(num_train=300, num_val=50, seed=1)
    cfg = TrainConfig.tiny(batch_size=32, epochs=2, noise_schedule="none")
    results = train_seeds(cfg, data, [0, 1, 2, 3])
    print(json.dumps({"devices": len(jax.devices()),
                      "losses": [r.step_losses.tolist() for r in results],
                      "val": [r.history["val_loss"].tolist() for r in results]}))
""")


def run_with_devices(count):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_seeds_sharded_over_four_devices_match_one_device():
    one, four = run_with_devices(1), run_with_devices(4)
    assert (one["devices"], four["devices"]) == (1, 4)
    # Each device multiplies a batch of one seed instead of four: the same arithmetic up to the
    # order of float32 accumulation inside the matmul kernels.
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(four["val"], one["val"], rtol=1e-5, atol=1e-6)
    assert np.std(one["losses"][0]) > 0 and one["losses"][0] != one["losses"][1]


def test_vmapped_seeds_match_separate_runs():
    data = make_synthetic(num_train=150, num_val=30, seed=2)
    cfg = TrainConfig.tiny(batch_size=16, noise_schedule="none")
    together = train_seeds(cfg, data, [3, 5])
    for result, seed in zip(together, [3, 5]):
        alone = train(cfg.__class__(**{**cfg.to_dict(), "seed": seed}), data)
        np.testing.assert_allclose(result.step_losses, alone.step_losses, rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     result.params, alone.params)
