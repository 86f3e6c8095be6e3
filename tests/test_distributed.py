"""A multi-host sweep, run as two local jax.distributed processes, equals a one-process sweep."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

WORKER = textwrap.dedent("""
    import sys
    import jax
    from jax.experimental import multihost_utils
    from batchjax import TrainConfig, load_dataset
    from batchjax.sweep import run_sweep

    address, count, index, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if count > 1:
        jax.distributed.initialize(address, count, index)
    data = load_dataset("mnist-5k", verbose=False).subset(240, 60)
    config = TrainConfig.tiny(epochs=2, hidden=8, probe_size=120)
    kwargs = {}
    if count > 1:
        kwargs = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                  "barrier": multihost_utils.sync_global_devices}
    run_sweep(out, config, data, batch_sizes=[8, 32, 64], seeds=[0, 1], verbose=False,
              sharpness=None, **kwargs)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(out):
    runs = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[name] = json.load(f)["step_losses"]
    return runs


def test_two_process_sweep_matches_one_process(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, "2", str(i),
                               str(tmp_path / "multi")], env=env, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    subprocess.run([sys.executable, "-c", WORKER, "-", "1", "0", str(tmp_path / "single")],
                   env=env, check=True, timeout=300, capture_output=True)

    multi, single = step_losses(tmp_path / "multi"), step_losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == [f"bs{b:05d}_seed{s}" for b in (8, 32, 64)
                                               for s in (0, 1)]
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-6)
    with open(tmp_path / "multi" / "manifest.json") as f:
        manifest = json.load(f)
    # Process 0 wrote the manifest once, after every process had saved its runs.
    assert manifest["finished"] is not None and len(manifest["sessions"]) == 1
    assert manifest["sessions"][0]["processes"] == 2
