"""Benchmark: batchjax against the peers on MNIST-sized data, one machine, one run.

Every measurement runs in a subprocess of its own, so each reports its own peak memory
(`ru_maxrss`) and none inherits another's compiled code or allocations. Data is synthetic,
60,000 train / 10,000 validation 28x28 images (timing does not depend on pixel values), as in
the peer scripts of ../shared/peers.

Rows:
  scan        batchjax's epoch: one jitted `lax.scan` over the steps, plus the validation pass;
              measured in --rounds processes alternating with the peers, the median reported
  loop        the same steps as a Python loop of one jitted step per batch
  seeds S     S seeds vmapped in one jitted epoch; seconds per seed-epoch (median of --rounds
              processes)
  noise       `gradient_stats` over the 60,000 training examples: the fast Dense path with the
              per-parameter variances and with the traces alone (the sweep's measurement),
              each the median of --rounds processes, and the vmap path; against BackPACK's
              `Variance` and `BatchL2Grad` (alternating with batchjax's processes, median of
              --rounds) and a `torch.func` vmap of per-example gradients (one process), at the
              same parameters on the same examples (benchmarks/peers/backpack_noise.py, in the
              torch venv with backpack-for-pytorch installed)
  grid        a learning-rate grid of 6 rates x 3 seeds vmapped in one jitted epoch, against one
              run's epoch in the same process, on 1 CPU device and on one per core (median of
              --rounds processes of the ratio)
  second call a second `train()` of one epoch at the largest B with a new learning rate and seed,
              after a first in the same process: its wall time over its epoch (nothing
              compiles again); the median of --rounds processes
  peers       Keras `fit` (TensorFlow and JAX backends) and a PyTorch loop, when their Python
              environments exist (see README: Benchmark)
  sweep       `scripts/sweep.py` with its defaults (B = 8, 32, 128; 10 epochs; 3 seeds; noise
              at every epoch; sharpness; figures and report) on the same synthetic data, end to
              end: once with an empty compilation cache, once with the cache it left; against
              the original Keras recipe training the same 3 x 3 runs, at the issue's reference
              Keras-TF epochs and at this run's Keras-TF train-only epochs when measured

Usage:
  python scripts/bench.py                      # everything that is installed, ~20 minutes
  python scripts/bench.py --quick              # fewer repeats, no peers, no sweep
  python scripts/bench.py --no-sweep           # everything but the ~3-minute sweep rows
  python scripts/bench.py --only noise         # the gradient statistics against BackPACK
  python scripts/bench.py --json bench.json    # where the table is written as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _synthetic(num_train):
    from batchjax.data import make_synthetic
    return make_synthetic(num_train=num_train, num_val=10_000, seed=0)


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_scan(batch_size, seeds, repeats, num_train, cpu_devices=1):
    """Median epoch time of the library's training loop (train + validation).

    With `cpu_devices` > 1 the CPU is split into that many JAX devices and the seeds are
    sharded across them (`batchjax.train.seed_shardings`): each core trains its own seeds.
    """
    import jax
    if cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    from batchjax import TrainConfig, train_seeds
    data = _synthetic(num_train)
    config = TrainConfig(batch_size=batch_size, epochs=repeats, noise_schedule="none",
                         unroll=int(os.environ.get("BENCH_UNROLL", 0)) or TrainConfig.unroll)
    results = train_seeds(config, data, list(range(seeds)))
    h = results[0].history
    epoch = [t + e for t, e in zip(h["train_seconds"], h["eval_seconds"])]
    return {"epoch_s": statistics.median(epoch), "train_s": statistics.median(h["train_seconds"]),
            "compile_s": results[0].compile_seconds, "per_seed_epoch_s": statistics.median(epoch) / seeds,
            "epochs_timed": len(epoch)}


def worker_loop(batch_size, seeds, repeats, num_train):
    """The same epoch as a Python loop of jitted steps (gathering each batch on the device)."""
    import jax
    import numpy as np
    from batchjax import TrainConfig
    from batchjax.model import MLP
    from batchjax.train import init_train_state, make_evaluate, make_optimizer, make_train_step
    data = _synthetic(num_train)
    config = TrainConfig(batch_size=batch_size)
    step_fn = make_train_step(MLP(), make_optimizer(config))

    @jax.jit
    def step(state, x, y, idx):
        return step_fn(state, x[idx], y[idx])

    step = jax.jit(step, donate_argnums=0)
    evaluate = jax.jit(make_evaluate(MLP()))
    x, y = jax.device_put(data.x_train), jax.device_put(data.y_train)
    xv, yv = jax.device_put(data.x_val), jax.device_put(data.y_val)
    state = init_train_state(config, jax.random.key(0), (28, 28))
    rng = np.random.default_rng(0)
    times = []
    t_compile = time.perf_counter()
    for epoch in range(repeats + 1):
        t0 = time.perf_counter()
        perm = rng.permutation(num_train)
        for start in range(0, num_train, batch_size):
            state, (loss, _) = step(state, x, y, perm[start:start + batch_size])
        loss.block_until_ready()
        jax.block_until_ready(evaluate(state.params, xv, yv))
        times.append(time.perf_counter() - t0)
    # The first epoch compiles the full-batch and partial-batch steps and the evaluation.
    return {"epoch_s": statistics.median(times[1:]), "compile_s": times[0] - times[1],
            "first_epoch_s": times[0], "epochs_timed": repeats, "_t": t_compile}


def worker_noise(method, repeats, num_train, elementwise=1):
    import jax
    import numpy as np
    from batchjax.model import MLP, init_params
    from batchjax.noise import gradient_stats
    data = _synthetic(num_train)
    params = init_params(MLP(), jax.random.key(0), (28, 28))
    x, y = jax.device_put(data.x_train), jax.device_put(data.y_train)
    t0 = time.perf_counter()
    gradient_stats(params, x, y, method=method, elementwise=bool(elementwise))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = gradient_stats(params, x, y, method=method, elementwise=bool(elementwise))
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"seconds": s, "examples_per_s": num_train / s, "first_call_s": first,
            "trace_cov": float(stats.trace_cov), "grad_sq_norm": float(np.asarray(stats.grad_sq_norm))}


def worker_noise_params(path):
    """Writes the parameters `worker_noise` measures at, for the PyTorch noise peers: an npz
    with one key per leaf ("hidden/kernel", ...)."""
    import jax
    import numpy as np
    from batchjax.model import MLP, init_params
    params = init_params(MLP(), jax.random.key(0), (28, 28))
    np.savez(path, **{f"{layer}/{name}": np.asarray(value)
                      for layer, leaves in params.items() for name, value in leaves.items()})
    return {"path": str(path)}


def worker_second_call(batch_size, num_train):
    """A second `train()` of one epoch with another learning rate and seed, in the process
    that made the first: its wall time against its own epoch (train + validation)."""
    import dataclasses
    from batchjax import TrainConfig, train
    data = _synthetic(num_train)
    first = TrainConfig(batch_size=batch_size, epochs=1, noise_schedule="none")
    t0 = time.perf_counter()
    train(first, data)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = train(dataclasses.replace(first, learning_rate=2e-3, seed=1), data)
    wall = time.perf_counter() - t0
    epoch = float(run.history["train_seconds"][0] + run.history["eval_seconds"][0])
    return {"first_call_s": first_s, "second_call_s": wall, "epoch_s": epoch,
            "ratio": wall / epoch, "compile_s": run.compile_seconds}


def worker_grid(batch_size, rates, seeds, repeats, num_train, cpu_devices=1):
    """A learning-rate grid of `rates` x `seeds` in one jitted program (`train_runs`) against
    one run, in the same process: each one's median epoch (train + validation) and the ratio
    (the issue's goal for 6 x 3: at most 8x, not 18x). With `cpu_devices` > 1 the grid is
    sharded over that many CPU devices (the one run uses one)."""
    import dataclasses
    import jax
    if cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    from batchjax import TrainConfig
    from batchjax.train import train_runs
    data = _synthetic(num_train)
    base = TrainConfig(batch_size=batch_size, epochs=repeats, noise_schedule="none")

    def median_epoch(configs):
        h = train_runs(configs, data)[0].history
        return statistics.median(t + e for t, e in zip(h["train_seconds"], h["eval_seconds"]))

    one = median_epoch([base])
    grid = [dataclasses.replace(base, learning_rate=1e-3 * 2.0 ** (k - rates // 2), seed=s,
                                epochs=max(2, repeats // 2))
            for k in range(rates) for s in range(seeds)]
    together = median_epoch(grid)
    return {"one_epoch_s": one, "grid_epoch_s": together, "ratio": together / one,
            "runs": len(grid), "devices": len(jax.devices())}


SECTIONS = ("epochs", "grid", "second-call", "noise", "sweep")
WORKERS = {"scan": worker_scan, "loop": worker_loop, "noise": worker_noise,
           "noise_params": worker_noise_params, "second_call": worker_second_call,
           "grid": worker_grid}
# The learning-rate grid rows: rates x seeds trained in one program (issue #15).
GRID_RATES, GRID_SEEDS = 6, 3
# (row name, method, elementwise) of the gradient-statistics rows.
NOISE_ROWS = (("dense", "dense", 1), ("dense-traces", "dense", 0), ("vmap", "vmap", 1))
NOISE_LABELS = {"dense": "dense, with per-parameter variances",
                "dense-traces": "dense, traces only (the sweep's)",
                "vmap": "vmap, with per-parameter variances"}
NOISE_PEER_SCRIPT = REPO / "benchmarks" / "peers" / "backpack_noise.py"
# PyTorch noise peer -> (label, the batchjax row computing the same quantities).
NOISE_PEERS = {"backpack_l2": ("BackPACK `BatchL2Grad` (traces)", "dense-traces"),
               "backpack_variance": ("BackPACK `Variance` (per-parameter variances)", "dense"),
               "torch_func": ("`torch.func` vmap of per-example gradients (variances)", "dense")}


def run_noise_peer(python, way, params_path, repeats, num_train):
    """One PyTorch noise peer (`NOISE_PEERS`) in its own process: its row, or {"error": ...}."""
    out = _peer_output([python, str(NOISE_PEER_SCRIPT), "--params", str(params_path),
                        "--only", way, "--repeats", str(repeats), "--num-train", str(num_train)])
    if "error" in out:
        return out
    return {**out[way], "peak_mib": out["meta"]["ru_maxrss_mib"], "torch": out["meta"]["torch"],
            "backpack": out["meta"]["backpack"], "threads": out["meta"]["threads"]}


# The reference epoch seconds of the original Keras recipe (TensorFlow backend,
# validation included; medians of 5-6 runs on a 2-vCPU AMD EPYC machine).
KERAS_TF_REFERENCE = {8: 11.2, 32: 3.16, 128: 1.06}


def run_sweep_end_to_end():
    """The default `scripts/sweep.py` on its 60,000-example synthetic data, twice: with an
    empty compilation cache, then with the cache the first run left.

    Returns {"cold": row, "warm": row}; a row holds the process's wall seconds and, from the
    saved results, the seconds of training (each batch size's epochs, all seeds at once),
    validation, compilation, noise measurements, sharpness, and the rest (start-up, data,
    final train-set evaluation, saving, figures, report).
    """
    import tempfile
    from batchjax.results import load_sweep
    rows = {}
    with tempfile.TemporaryDirectory(prefix="batchjax-bench-sweep-") as tmp:
        tmp = Path(tmp)
        for label in ("cold", "warm"):
            out = tmp / label
            cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"), "--dataset", "synthetic",
                   "--out", str(out), "--figures-dir", str(out / "figures"), "--quiet",
                   "--compile-cache", str(tmp / "cache")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                rows[label] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                continue
            runs = load_sweep(out).runs
            first = {}  # one run per batch size: its clock covers all the seeds trained with it
            for r in runs:
                first.setdefault(r.batch_size, r)
            parts = {
                "train_s": sum(sum(r.history["train_seconds"]) for r in first.values()),
                "eval_s": sum(sum(r.history["eval_seconds"]) for r in first.values()),
                "compile_s": sum(r.compile_seconds for r in first.values()),
                "noise_s": sum(rec["seconds"] for r in runs for rec in r.noise),
                "sharpness_s": sum(r.sharpness["seconds"] for r in runs if r.sharpness),
            }
            rows[label] = {"wall_s": wall, **parts, "other_s": wall - sum(parts.values()),
                           "runs": len(runs),
                           "epochs": sum(len(r.history["epoch"]) for r in runs)}
    return rows


def run_worker(kind, *args, timeout=1800):
    cmd = [sys.executable, __file__, "--worker", kind, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peer_output(cmd, env=None):
    """Run a peer script; its last JSON line as a dict, or {"error": one line}."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": str(err)}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def run_peer(python, script, batch_size, epochs, env=None, args=()):
    out = _peer_output([python, str(script), "--batch-size", str(batch_size), "--epochs",
                        str(epochs), *args], env)
    if "error" in out:
        return out
    return {"epoch_s": out["last_epoch_s"], "train_s": out["last_train_only_s"],
            "peak_mib": out["ru_maxrss_mib"]}


def median_run(runs, field):
    """The run with the median `field` (the lower middle one of an even count), plus all values.

    Failed runs are skipped; if every run failed, the first failure is returned.
    """
    ok = sorted((r for r in runs if field in r), key=lambda r: r[field])
    if not ok:
        return runs[0]
    return {**ok[(len(ok) - 1) // 2], f"{field}_runs": [r[field] for r in runs if field in r]}


def find_python(flag_value, env_name, default_dir):
    venv = default_dir.lstrip(".")  # also ../venvs/peer-keras, ../venvs/peer-torch
    for candidate in (flag_value, os.environ.get(env_name), REPO / default_dir / "bin" / "python",
                      REPO.parent / default_dir / "bin" / "python",
                      REPO.parent / "venvs" / venv / "bin" / "python"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--seeds", default="1,4,8", help="seed counts for the vmapped-seeds rows")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per measurement")
    ap.add_argument("--num-train", type=int, default=60_000)
    ap.add_argument("--peers-dir", default=str(REPO.parent / "shared" / "peers"))
    ap.add_argument("--keras-python", default=None, help="python of a venv with tensorflow-cpu, keras, jax")
    ap.add_argument("--torch-python", default=None, help="python of a venv with torch")
    ap.add_argument("--peer-epochs", type=int, default=3)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="processes measuring each batchjax row (epoch, seeds, dense noise "
                         "path); the median one is reported")
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip the default sweep end to end (about 3 minutes)")
    ap.add_argument("--no-grid", action="store_true",
                    help="skip the learning-rate grid rows (6 rates x 3 seeds against one run)")
    ap.add_argument("--quick", action="store_true", help="2 repeats, 1 round, no peers, no sweep")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help="comma-separated sections to run, of " + ", ".join(SECTIONS)
                         + " (e.g. --only noise: the gradient statistics and their PyTorch "
                           "peers, a few minutes)")
    ap.add_argument("--json", default="bench.json", help="output JSON path")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        fn = WORKERS[kind]
        parsed = [int(r) if r.lstrip("-").isdigit() else r for r in rest]
        out = fn(*parsed)
        out["peak_mib"] = _peak_mib()
        print(json.dumps(out))
        return 0

    if args.quick:
        args.repeats, args.rounds, args.no_peers, args.no_sweep = 2, 1, True, True
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"--only: unknown section(s) {', '.join(sorted(sections - set(SECTIONS)))}; "
                 f"choose from {', '.join(SECTIONS)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    seed_counts = [int(s) for s in args.seeds.split(",")]
    n = args.num_train
    rows = {}

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    peers_dir = Path(args.peers_dir)
    peers = []  # (row name, batch size -> row)
    if not args.no_peers and peers_dir.exists():
        keras = find_python(args.keras_python, "BATCHJAX_KERAS_PYTHON", ".peer-keras")
        torch = find_python(args.torch_python, "BATCHJAX_TORCH_PYTHON", ".peer-torch")
        for backend in ("tensorflow", "jax") if keras else ():
            peers.append((f"keras_{backend}", lambda b, backend=backend: run_peer(
                keras, peers_dir / "keras_fit.py", b, args.peer_epochs,
                {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"})))
        if torch:
            peers.append(("torch", lambda b: run_peer(torch, peers_dir / "torch_loop.py", b,
                                                      args.peer_epochs, args=("--threads", "1"))))

    for b in batch_sizes if "epochs" in sections else ():
        # batchjax's epoch runs `rounds` times in fresh processes, alternating with the peers
        # of the same batch size, and the median process counts: slow spells of a shared
        # machine then hit both sides of a ratio alike.
        log(f"batch size {b}: scan x{args.rounds}, peers, loop, seeds ...")
        scans = []
        for r in range(max(args.rounds, len(peers) + 1)):
            if r < args.rounds:
                scans.append(run_worker("scan", b, 1, args.repeats, n))
            if r < len(peers):
                name, run = peers[r]
                log(f"  peer {name} ...")
                rows[f"{name}/{b}"] = run(b)
        rows[f"scan/{b}"] = median_run(scans, "epoch_s")
        rows[f"loop/{b}"] = run_worker("loop", b, 1, args.repeats, n)
        cores = os.cpu_count() or 1
        for s in seed_counts:
            if s > 1:
                epochs = max(2, args.repeats // 2)
                rows[f"seeds{s}/{b}"] = median_run(
                    [run_worker("scan", b, s, epochs, n) for _ in range(args.rounds)],
                    "per_seed_epoch_s")
                if cores > 1 and s % cores == 0:
                    rows[f"seeds{s}x{cores}dev/{b}"] = median_run(
                        [run_worker("scan", b, s, epochs, n, cores) for _ in range(args.rounds)],
                        "per_seed_epoch_s")
    for b in [] if args.no_grid or "grid" not in sections else batch_sizes:
        cores = os.cpu_count() or 1
        for devices in sorted({1, cores}):
            log(f"batch size {b}: a grid of {GRID_RATES} rates x {GRID_SEEDS} seeds on "
                f"{devices} device(s) x{args.rounds} ...")
            rows[f"grid{devices}dev/{b}"] = median_run(
                [run_worker("grid", b, GRID_RATES, GRID_SEEDS, args.repeats, n, devices)
                 for _ in range(args.rounds)], "ratio")
    if "second-call" in sections:
        b = max(batch_sizes)
        log(f"a second train() call at B = {b} x{args.rounds} ...")
        rows[f"second_call/{b}"] = median_run(
            [run_worker("second_call", b, n) for _ in range(args.rounds)], "ratio")
    if "noise" in sections:
        # The PyTorch noise peers need torch and backpack-for-pytorch (benchmarks/peers).
        torch_python = None if args.no_peers else find_python(
            args.torch_python, "BATCHJAX_TORCH_PYTHON", ".peer-torch")
        with tempfile.TemporaryDirectory(prefix="batchjax-bench-noise-") as tmp:
            params_path = Path(tmp) / "params.npz"
            if torch_python:
                run_worker("noise_params", params_path)
            for name, method, elementwise in NOISE_ROWS:
                log(f"noise statistics: {name} ...")
                runs = args.rounds if method == "dense" else 1
                peer = {"dense": "backpack_variance", "dense-traces": "backpack_l2"}.get(name)
                ours, theirs = [], []
                for _ in range(runs):  # alternating, as for the epochs
                    ours.append(run_worker("noise", method, args.repeats, n, elementwise))
                    if torch_python and peer:
                        theirs.append(run_noise_peer(torch_python, peer, params_path,
                                                     args.repeats, n))
                rows[f"noise/{name}"] = median_run(ours, "seconds")
                if theirs:
                    rows[f"noise/{peer}"] = median_run(theirs, "seconds")
            if torch_python:
                log("noise statistics: torch.func ...")
                rows["noise/torch_func"] = run_noise_peer(torch_python, "torch_func",
                                                          params_path, 0, n)
    if not args.no_sweep and "sweep" in sections:
        log("the default sweep, end to end: empty, then warm compilation cache ...")
        for label, row in run_sweep_end_to_end().items():
            rows[f"sweep/{label}"] = row

    import jax
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "python": platform.python_version(), "num_train": n, "repeats": args.repeats,
            "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d")}
    try:
        meta["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                                 if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    table = render(rows, batch_sizes, seed_counts, meta)
    print(table)
    tmp = Path(args.json).with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2))
    os.replace(tmp, args.json)
    return 0


def epoch_tables(rows, batch_sizes, seed_counts, meta, get):
    """The epoch-seconds and vmapped-seeds tables (Markdown lines)."""
    lines = [f"## Epoch seconds, 60,000 train + 10,000 validation ({meta.get('cpu_model', meta['machine'])},"
             f" {meta['cpus']} CPUs, jax {meta['jax']}; medians of {meta['repeats']} epochs; batchjax: the "
             f"median of {meta.get('rounds', 1)} processes, alternating with the peers)", "",
             "| B | batchjax scan | compile | Python loop of jitted steps | Keras fit (TF) | Keras fit (JAX) "
             "| PyTorch loop | vs Keras TF | vs Keras JAX | peak MiB (batchjax / Keras JAX) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in batch_sizes:
        ours = get(f"scan/{b}")
        ktf, kjax = get(f"keras_tensorflow/{b}"), get(f"keras_jax/{b}")
        ratio = lambda peer: f"{peer / ours:.1f}x" if peer and ours else "-"  # noqa: E731
        lines.append(f"| {b} | {fmt(ours)} | {fmt(get(f'scan/{b}', 'compile_s'), 2)} | "
                     f"{fmt(get(f'loop/{b}'))} | {fmt(ktf)} | {fmt(kjax)} | {fmt(get(f'torch/{b}'))} | "
                     f"{ratio(ktf)} | {ratio(kjax)} | {fmt(get(f'scan/{b}', 'peak_mib'), 0)} / "
                     f"{fmt(get(f'keras_jax/{b}', 'peak_mib'), 0)} |")
    cores = meta["cpus"]
    multi = [s for s in seed_counts if s > 1 and cores > 1 and s % cores == 0]
    lines += ["", "## Seeds vmapped: seconds per seed-epoch", "",
              "| B | " + " | ".join(f"S = {s}" for s in seed_counts)
              + "".join(f" | S = {s}, {cores} CPU devices" for s in multi)
              + " | best speed-up |",
              "|---|" + "---|" * (len(seed_counts) + len(multi) + 1)]
    for b in batch_sizes:
        vals = [get(f"scan/{b}") if s == 1 else get(f"seeds{s}/{b}", "per_seed_epoch_s")
                for s in seed_counts]
        vals += [get(f"seeds{s}x{cores}dev/{b}", "per_seed_epoch_s") for s in multi]
        best = min((v for v in vals[1:] if v), default=None)
        speedup = f"{vals[0] / best:.2f}x" if vals[0] and best else "-"
        lines.append(f"| {b} | " + " | ".join(fmt(v) for v in vals) + f" | {speedup} |")
    return lines


def render(rows, batch_sizes, seed_counts, meta):
    def get(key, field="epoch_s"):
        return rows.get(key, {}).get(field)

    cores = meta["cpus"]
    lines = []
    epoch_rows = ("scan", "loop", "keras_tensorflow", "keras_jax", "torch")
    if any(k.split("/")[0] in epoch_rows or k.startswith("seeds") for k in rows):
        lines += epoch_tables(rows, batch_sizes, seed_counts, meta, get)
    else:  # the machine, which the epoch table's heading names otherwise
        lines += [f"Machine: {meta.get('cpu_model', meta['machine'])}, {meta['cpus']} CPUs, "
                  f"jax {meta['jax']}, {meta['date']}"]
    lines += render_grid(rows, batch_sizes, cores)
    epoch = get(f"scan/{max(batch_sizes)}")
    if any(f"noise/{name}" in rows for name, _, _ in NOISE_ROWS):
        lines += ["", "## Gradient statistics over all training examples", "",
                  f"| path | seconds | examples/s | x one B = {max(batch_sizes)} epoch | peak MiB |",
                  "|---|---|---|---|---|"]
        for name, _, _ in NOISE_ROWS:
            r = rows.get(f"noise/{name}", {})
            if not r:
                continue
            ratio = f"{r['seconds'] / epoch:.2f}" if r.get("seconds") and epoch else "-"
            lines.append(f"| {NOISE_LABELS[name]} | {fmt(r.get('seconds'))} | "
                         f"{fmt(r.get('examples_per_s'), 0)} | {ratio} | {fmt(r.get('peak_mib'), 0)} |")
    second = rows.get(f"second_call/{max(batch_sizes)}", {})
    if "ratio" in second:
        lines += ["", f"## A second `train()` call: one epoch at B = {max(batch_sizes)}, another "
                  "learning rate and seed, in the same process (median of the processes)", "",
                  "| first call (s) | second call (s) | its epoch (s) | second call / epoch | "
                  "compile in the second (s) |", "|---|---|---|---|---|",
                  f"| {fmt(second['first_call_s'])} | {fmt(second['second_call_s'])} | "
                  f"{fmt(second['epoch_s'])} | {second['ratio']:.2f}x | "
                  f"{fmt(second['compile_s'])} |"]
    lines += render_noise_peers(rows)
    lines += render_sweep(rows)
    errors = [f"- {k}: {v['error']}" for k, v in rows.items() if "error" in v]
    if errors:
        lines += ["", "Failed measurements:", *errors]
    return "\n".join(lines).lstrip("\n")


def render_grid(rows, batch_sizes, cores):
    """The learning-rate grid rows: one run's epoch and the grid's, measured in one process."""
    devices = sorted({1, cores})
    if not any(f"grid{d}dev/{b}" in rows for d in devices for b in batch_sizes):
        return []
    head = "| B | " + " | ".join(f"one run, grid, grid / one run ({d} CPU device{'s' * (d > 1)})"
                                 for d in devices) + " |"
    lines = ["", f"## Learning-rate grid: {GRID_RATES} rates x {GRID_SEEDS} seeds in one "
             f"program against one run (epoch seconds, the same process; goal <= 8x, "
             f"separate runs {GRID_RATES * GRID_SEEDS}x)", "", head,
             "|---|" + "---|" * len(devices)]
    for b in batch_sizes:
        cells = []
        for d in devices:
            r = rows.get(f"grid{d}dev/{b}", {})
            cells.append(f"{fmt(r.get('one_epoch_s'))}, {fmt(r.get('grid_epoch_s'))}, "
                         f"{r['ratio']:.1f}x" if "ratio" in r else "-")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def render_noise_peers(rows):
    """The PyTorch noise peers against the batchjax rows that compute the same quantities."""
    body = []
    for peer, (label, ours_name) in NOISE_PEERS.items():
        theirs, ours = rows.get(f"noise/{peer}", {}), rows.get(f"noise/{ours_name}", {})
        if "seconds" not in theirs:
            continue
        ahead = (f"{theirs['seconds'] / ours['seconds']:.2f}x" if ours.get("seconds")
                 else "-")
        agree = (f"{abs(theirs['trace_cov'] - ours['trace_cov']) / abs(ours['trace_cov']):.0e}"
                 if ours.get("trace_cov") else "-")
        body.append(f"| {label} | {fmt(theirs['seconds'])} | {fmt(theirs.get('first_call_s'))} "
                    f"| {NOISE_LABELS[ours_name]} | {fmt(ours.get('seconds'))} "
                    f"| {fmt(ours.get('first_call_s'))} | {ahead} | {agree} |")
    if not body:
        return []
    return ["", "## Gradient statistics against PyTorch (the same MLP, parameters and 60,000 "
            "examples, each in its own process)", "",
            "| peer | seconds | first call | batchjax | seconds | first call | batchjax ahead by "
            "| trace_cov relative difference |", "|---|---|---|---|---|---|---|---|", *body]


def render_sweep(rows):
    """The sweep rows as a table, against the Keras recipe training the same 3 x 3 runs."""
    if not any(k.startswith("sweep/") for k in rows):
        return []
    reference = 30 * sum(KERAS_TF_REFERENCE.values())
    keras = [rows.get(f"keras_tensorflow/{b}", {}).get("train_s") for b in KERAS_TF_REFERENCE]
    this_run = 30 * sum(keras) if all(keras) else None
    lines = ["", "## The default sweep end to end (scripts/sweep.py: B = 8, 32, 128; 10 epochs; "
             "3 seeds; noise at every epoch; 60,000 synthetic examples)", "",
             "| compilation cache | wall s | training | validation | compile | noise | sharpness "
             "| other (start-up, data, final train-set evaluation, figures, report) "
             "| vs Keras recipe, reference | vs Keras recipe, "
             "this run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in ("cold", "warm"):
        r = rows.get(f"sweep/{label}", {})
        if "wall_s" not in r:
            continue
        parts = [fmt(r.get(k), 1) for k in ("wall_s", "train_s", "eval_s", "compile_s",
                                            "noise_s", "sharpness_s", "other_s")]
        name = "empty" if label == "cold" else "warm (second run)"
        ours = f"{this_run / r['wall_s']:.1f}x" if this_run else "-"
        lines.append(f"| {name} | " + " | ".join(parts)
                     + f" | {reference / r['wall_s']:.1f}x | {ours} |")
    lines += ["", f"Keras recipe: the same 3 batch sizes x 3 seeds x 10 epochs; reference "
              f"{reference:.0f} s (the issue's Keras-TF epochs, validation included)"
              + (f", this run {this_run:.0f} s (its Keras-TF train-only epochs)." if this_run
                 else "; Keras-TF not measured in this run.")]
    return lines


if __name__ == "__main__":
    sys.exit(main())
