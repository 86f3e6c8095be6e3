"""Peer: the gradient-noise statistics of `batchjax.gradient_stats` with BackPACK and torch.func.

The model is the seed MLP (Flatten -> Linear(784, 128) -> ReLU -> Linear(128, 10)) with the
per-example softmax cross-entropy, at parameters loaded from an .npz that batchjax writes
(keys "hidden/kernel" [784, 128], "hidden/bias", "output/kernel" [128, 10], "output/bias": the
kernels are the transposes of torch's weights), on 60,000 MNIST-shaped examples: those of
batchjax's `make_synthetic(seed=0)` (numpy's default_rng(0): uniform float32 pixels, then
uniform labels; the same draws as the training peer torch_loop.py), or an .npz given with
--data (keys x [N, 28, 28] float32, y [N] int).

Three ways, each timed over all N examples, first call and the median of --repeats calls (wall
and CPU seconds):

  backpack_l2        BackPACK's `BatchL2Grad` with a summed loss: |g_i|^2 per example and
                     parameter array, and the summed gradient (`.grad`); then
                     tr(Sigma) = mean_i |g_i|^2 - |G|^2 per array (the traces only, as
                     `gradient_stats(elementwise=False)`).
  backpack_variance  BackPACK's `Variance` with a summed loss: the per-parameter variances
                     (1/N) sum_i g_i^2 - G^2, divisor N, as `gradient_stats(elementwise=True)`'s
                     `variance`; the traces are their sums.
  BackPACK runs on all N examples in one backward pass (--chunk 0, the default and its fastest
  here), or on chunks of --chunk examples merged in float64.
  torch_func         `torch.func.vmap(torch.func.grad(...))` per-example gradients, in chunks of
                     --func-chunk examples, with their sums and sums of squares (float32 per
                     chunk, accumulated in float64) giving the same variances. One call only
                     (torch compiles nothing, so its first call is a fair one).

BackPACK's note applies: differentiating the summed loss gives the per-example gradients g_i of
each example's own loss (a mean would give g_i / N). Dangel, Kunstner & Hennig 2020,
"BackPACK: Packing more into backprop", arXiv:1912.10985.

Set-up (a venv of its own, outside the repository):
    python3 -m venv /work/venvs/peer-torch
    /work/venvs/peer-torch/bin/pip install torch==2.13.0 numpy backpack-for-pytorch

Run (prints ONE JSON line: per way, seconds, cpu_seconds, first_call_s, trace_cov,
trace_cov_per_layer, grad_sq_norm; plus versions, thread count and peak memory):
    /work/venvs/peer-torch/bin/python benchmarks/peers/backpack_noise.py --params params.npz \\
        [--data data.npz] [--repeats 5] [--only backpack_l2,backpack_variance,torch_func]
"""

import argparse
import importlib.metadata
import json
import platform
import resource
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

LAYERS = ("hidden", "output")


def make_data(num_train=60_000, seed=0):
    """batchjax's `make_synthetic(num_train, seed=seed)` training set, drawn the same way."""
    rng = np.random.default_rng(seed)
    x = rng.random((num_train, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, num_train).astype(np.int64)
    return x, y


def make_model(params):
    """The MLP with batchjax's parameters (kernels [in, out] -> torch weights [out, in])."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for name, linear in zip(LAYERS, (model[1], model[3])):
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(params[f"{name}/kernel"].T)))
            linear.bias.copy_(torch.from_numpy(params[f"{name}/bias"]))
    return model


def named_params(model):
    """(batchjax leaf name, parameter) pairs."""
    out = []
    for name, linear in zip(LAYERS, (model[1], model[3])):
        out += [(f"{name}/kernel", linear.weight), (f"{name}/bias", linear.bias)]
    return out


def summarise(per_layer, mean_grads):
    return {"trace_cov": float(sum(per_layer.values())),
            "trace_cov_per_layer": {k: float(v) for k, v in per_layer.items()},
            "grad_sq_norm": float(sum(float((g.double() ** 2).sum()) for g in mean_grads))}


def run_backpack(model, x, y, extension_name, chunk):
    """BackPACK on chunks of `chunk` examples (all N at once if chunk >= N), merged in float64:
    the per-example squared norms and gradients summed (l2), or the chunk variances combined
    with Chan et al.'s pairwise update (variance)."""
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad, Variance
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    extension = {"l2": BatchL2Grad, "variance": Variance}[extension_name]()
    n = x.shape[0]
    params = named_params(model)

    def call():
        count, sums, m2s, sq_norms = 0, None, None, None
        for start in range(0, n, chunk):
            x_c, y_c = x[start:start + chunk], y[start:start + chunk]
            n_c = x_c.shape[0]
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_c), y_c)
            with backpack(extension):
                loss.backward()
            grads = [p.grad.double() for _, p in params]
            if extension_name == "l2":
                norms = [p.batch_l2.double().sum() for _, p in params]
                sq_norms = norms if sq_norms is None else [a + b for a, b in zip(sq_norms, norms)]
                sums = grads if sums is None else [a + b for a, b in zip(sums, grads)]
            else:  # Chan et al.: M2 = M2_a + M2_b + (m_b - m_a)^2 n_a n_b / (n_a + n_b)
                m2_c = [p.variance.double() * n_c for _, p in params]
                if sums is None:
                    sums, m2s = grads, m2_c
                else:
                    m2s = [m2_a + m2_b + (g_b / n_c - s_a / count) ** 2 * count * n_c
                           / (count + n_c) for m2_a, m2_b, s_a, g_b in zip(m2s, m2_c, sums, grads)]
                    sums = [a + b for a, b in zip(sums, grads)]
            count += n_c
        means = [s / n for s in sums]
        if extension_name == "l2":
            per_layer = {name: sq / n - (m ** 2).sum()
                         for (name, _), sq, m in zip(params, sq_norms, means)}
        else:
            per_layer = {name: m2.sum() / n for (name, _), m2 in zip(params, m2s)}
        return summarise(per_layer, means)

    return call


def run_torch_func(model, x, y, chunk):
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = dict(zip(params, (name for name, _ in named_params(model))))
    loss_fn = nn.CrossEntropyLoss()

    def example_loss(p, x_1, y_1):
        return loss_fn(functional_call(model, p, (x_1[None],)), y_1[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    n = x.shape[0]

    def call():
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
        squares = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
        for start in range(0, n, chunk):
            grads = per_example(params, x[start:start + chunk], y[start:start + chunk])
            for k, g in grads.items():  # chunk sums in float32, accumulated in float64
                sums[k] += g.sum(0).double()
                squares[k] += (g * g).sum(0).double()
        per_layer = {names[k]: (squares[k] / n - (sums[k] / n) ** 2).sum() for k in params}
        return summarise(per_layer, [(sums[k] / n) for k in params])

    return call


def cpu_seconds():
    """CPU time of this process, all threads (steadier than wall time on a shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(call, repeats):
    """The first call's seconds, and the median of `repeats` more (the first if none), wall
    and CPU."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    values = call()
    first, first_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    times, cpus = ([first], [first_cpu]) if not repeats else ([], [])
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        values = call()
        times.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return {"seconds": statistics.median(times), "seconds_runs": times,
            "cpu_seconds": statistics.median(cpus), "first_call_s": first, **values}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True, help="npz of batchjax's MLP parameters")
    ap.add_argument("--data", help="npz with x [N, 28, 28] and y [N]; default: make_synthetic's")
    ap.add_argument("--num-train", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="BackPACK's examples per backward pass (0: all at once)")
    ap.add_argument("--func-chunk", type=int, default=256)
    ap.add_argument("--only", default="backpack_l2,backpack_variance,torch_func")
    args = ap.parse_args()
    # BackPACK's hooks on a model whose input needs no gradient: torch's notice, not a problem.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads:
        torch.set_num_threads(args.threads)
    with np.load(args.params) as f:
        params = {k: np.asarray(f[k], np.float32) for k in f.files}
    if args.data:
        with np.load(args.data) as f:
            x, y = np.asarray(f["x"], np.float32), np.asarray(f["y"], np.int64)
    else:
        x, y = make_data(args.num_train)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model = make_model(params)
    chunk = args.chunk or x.shape[0]
    ways = {"backpack_l2": lambda: run_backpack(make_model(params), x, y, "l2", chunk),
            "backpack_variance": lambda: run_backpack(make_model(params), x, y, "variance",
                                                      chunk),
            "torch_func": lambda: run_torch_func(model, x, y, args.func_chunk)}
    out = {}
    for name in args.only.split(","):
        # torch.func takes seconds per call: its first call is its one timed run.
        repeats = args.repeats if name != "torch_func" else 0
        out[name] = timed(ways[name](), repeats)
    out["meta"] = {"torch": torch.__version__, "backpack": importlib.metadata.version(
                       "backpack-for-pytorch"),
                   "threads": torch.get_num_threads(), "num_examples": int(x.shape[0]),
                   "python": platform.python_version(),
                   "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
