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
    seen = []

    def on_phase(text):
        # While training, who holds the directory? Another sweep would be refused.
        if text.startswith("compiling") and not seen:
            import json, os
            from batchjax.errors import BatchjaxError
            from batchjax.results import DirectoryLock
            seen.append(json.loads(open(os.path.join(out, ".lock")).read()))
            try:
                DirectoryLock(out).acquire()
                seen.append("acquired")
            except BatchjaxError as err:
                seen.append(str(err))
            with open(f"{out}.lock-seen-{index}.json", "w") as f:
                json.dump(seen, f)

    run_sweep(out, config, data, batch_sizes=[8, 32], seeds=[0, 1], verbose=False,
              sharpness=None, on_phase=on_phase, **kwargs)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(out):
    runs = {}
    for name in sorted(os.listdir(out)):
        if os.path.exists(os.path.join(out, name, "metrics.json")):
            with np.load(os.path.join(out, name, "steps.npz")) as arrays:
                runs[name] = arrays["step_losses"]
    return runs


def test_two_process_sweep_matches_one_process(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # The one-process reference runs at the same time as the two processes of the job.
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env,
                              stderr=subprocess.PIPE, text=True)
             for args in ([address, "2", "0", str(tmp_path / "multi")],
                          [address, "2", "1", str(tmp_path / "multi")],
                          ["-", "1", "0", str(tmp_path / "single")])]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors

    multi, single = step_losses(tmp_path / "multi"), step_losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == [f"bs{b:05d}_seed{s}" for b in (8, 32)
                                               for s in (0, 1)]
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-6)
    with open(tmp_path / "multi" / "manifest.json") as f:
        manifest = json.load(f)
    # Process 0 wrote the manifest once, after every process had saved its runs.
    assert manifest["finished"] is not None and len(manifest["sessions"]) == 1
    assert manifest["sessions"][0]["processes"] == 2
    # One lock for the job, held by process 0 (pid of procs[0]) for both processes; any other
    # sweep of the directory, here one started inside either process, is refused meanwhile.
    for i in range(2):
        with open(f"{tmp_path / 'multi'}.lock-seen-{i}.json") as f:
            holder, attempt = json.load(f)
        assert holder["pid"] == procs[0].pid and holder["processes"] == 2
        assert f"in use by the sweep of process {procs[0].pid} on host" in attempt
        assert "2 processes of one job" in attempt
    assert (tmp_path / "multi" / ".lock").read_text() == ""  # released at the end
