"""Reference accuracy: the ORIGINAL Keras recipe on real MNIST, with batchjax's split.

What it is
    The classic Keras batch-size experiment, unchanged:

        keras.Sequential([Flatten(input_shape=(28, 28)),
                          Dense(128, activation="relu"),
                          Dense(10, activation="softmax")])
        compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        fit(x_train, y_train, epochs=10, batch_size=B, validation_data=(x_val, y_val))

    trained on real MNIST with the project's split: of the 60,000 training images the first 50,000
    train and the LAST 10,000 are the validation split; the test images are never used. Pixels are
    float32 = uint8 / 255. Its final val_accuracy is the reference for batchjax's numbers.

Set-up (a venv of its own, outside the repository, so it never touches the project's environment)
    python3 -m venv /work/venvs/peer-keras
    /work/venvs/peer-keras/bin/pip install tensorflow-cpu keras

One run (prints ONE JSON line: per-epoch history, final val metrics, epoch wall times, versions)
    KERAS_BACKEND=tensorflow /work/venvs/peer-keras/bin/python benchmarks/keras_mnist.py \\
        --data /work/shared/data/mnist.npz --batch-size 32 --seed 0 [--epochs 10]

Sweep (every batch size x seed in a fresh subprocess, so runs share no state; the records, a
header and a per-batch-size summary are written atomically to --out after each run)
    KERAS_BACKEND=tensorflow /work/venvs/peer-keras/bin/python benchmarks/keras_mnist.py \\
        --data /work/shared/data/mnist.npz --all --batch-sizes 32 128 8 --seeds 0 1 2 \\
        --out benchmarks/keras-mnist.json

Summary of an existing sweep file
    python3 benchmarks/keras_mnist.py --summarize benchmarks/keras-mnist.json

The backend is chosen as usual by the KERAS_BACKEND environment variable (the original: tensorflow).
Wall times are for information only (shared, noisy CPUs); accuracy is what this script is for.
The summary's "final train loss/accuracy" are Keras' running means over the last epoch, as
``History`` reports them, not a re-evaluation after training.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

N_TRAIN = 50_000  # first 50,000 training images train; the last 10,000 validate

# Two-sided 95% Student-t quantiles t_{0.975, df}.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


# --------------------------------------------------------------------------- data
def load_split(path):
    """Keras-format mnist.npz -> (x_train, y_train, x_val, y_val); x float32 in [0, 1]."""
    with np.load(path) as d:
        x, y = d["x_train"], d["y_train"]
    if x.shape != (60000, 28, 28) or x.dtype != np.uint8 or y.shape != (60000,):
        raise ValueError(f"{path}: expected Keras mnist.npz layout, got x_train {x.shape} {x.dtype}")
    x = x.astype(np.float32) / np.float32(255.0)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def data_fingerprint(path):
    """SHA-256 of the x_train / y_train array bytes (what the run actually uses)."""
    with np.load(path) as d:
        return {k: hashlib.sha256(np.ascontiguousarray(d[k]).tobytes()).hexdigest()
                for k in ("x_train", "y_train")}


# --------------------------------------------------------------------------- one run
def run_one(data, batch_size, seed, epochs):
    """Train the original recipe once; return a JSON-able record."""
    import keras  # backend chosen by KERAS_BACKEND

    x_train, y_train, x_val, y_val = load_split(data)
    keras.utils.set_random_seed(seed)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_s, self.val_s = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self._e0 = time.perf_counter()

        def on_test_begin(self, logs=None):
            self._v0 = time.perf_counter()

        def on_test_end(self, logs=None):
            self.val_s.append(time.perf_counter() - self._v0)

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_s.append(time.perf_counter() - self._e0)

    model = keras.Sequential([
        keras.layers.Flatten(input_shape=(28, 28)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam",
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    timer = EpochTimer()
    t0 = time.perf_counter()
    hist = model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size,
                     validation_data=(x_val, y_val), callbacks=[timer], verbose=0)
    fit_s = time.perf_counter() - t0

    h = {k: [float(v) for v in hist.history[k]]
         for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    rec = {
        "batch_size": batch_size,
        "seed": seed,
        "epochs": epochs,
        "history": h,
        "final_val_accuracy": h["val_accuracy"][-1],
        "final_val_loss": h["val_loss"][-1],
        "final_train_accuracy": h["accuracy"][-1],
        "final_train_loss": h["loss"][-1],
        "epoch_s": timer.epoch_s,  # train + validation pass, per epoch
        "val_s": timer.val_s,
        "fit_total_s": fit_s,
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
    }
    if rec["backend"] == "tensorflow":
        import tensorflow as tf
        rec["tensorflow"] = tf.__version__
    return rec


# --------------------------------------------------------------------------- sweep
def summarize(records):
    """Per batch size: mean, sample std and 95% t-interval of the final metrics over seeds."""
    out = {}
    for bs in sorted({r["batch_size"] for r in records}):
        rs = [r for r in records if r["batch_size"] == bs]
        n = len(rs)
        s = {"n": n, "seeds": [r["seed"] for r in rs]}
        for key in ("final_val_accuracy", "final_val_loss", "final_train_accuracy",
                    "final_train_loss"):
            v = [r[key] for r in rs]
            m = statistics.fmean(v)
            sd = statistics.stdev(v) if n > 1 else float("nan")
            t = T975.get(n - 1)
            hw = t * sd / math.sqrt(n) if t is not None and n > 1 else float("nan")
            s[key] = {"values": v, "mean": m, "std": sd, "ci95": [m - hw, m + hw],
                      "ci95_halfwidth": hw, "t": t}
        all_epochs = [e for r in rs for e in r["epoch_s"]]
        later = [e for r in rs for e in r["epoch_s"][1:]]  # epoch 1 includes tracing
        s["epoch_s_median"] = statistics.median(all_epochs)
        s["epoch_s_median_excl_first"] = statistics.median(later) if later else None
        out[str(bs)] = s
    return out


def write_atomic(path, obj):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".keras-mnist.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def pkg_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_all(args):
    header = {
        "what": "original Keras recipe (Flatten-Dense128relu-Dense10softmax, adam, "
                "sparse_categorical_crossentropy) on real MNIST; train = first 50,000 "
                "training images, validation = last 10,000; test set unused",
        "command": " ".join([f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '')}",
                             sys.executable] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version()},
        "keras_backend_env": os.environ.get("KERAS_BACKEND"),
        "versions": {p: pkg_version(p) for p in ("keras", "tensorflow-cpu", "tensorflow",
                                                 "jax", "numpy")},
        "data": {"path": os.path.abspath(args.data), **data_fingerprint(args.data)},
        "epochs": args.epochs,
        "batch_sizes": args.batch_sizes,
        "seeds": args.seeds,
    }
    records = []
    for bs in args.batch_sizes:
        for seed in args.seeds:
            cmd = [sys.executable, os.path.abspath(__file__), "--data", args.data,
                   "--batch-size", str(bs), "--seed", str(seed), "--epochs", str(args.epochs)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if p.returncode != 0:
                sys.exit(f"run batch_size={bs} seed={seed} failed (rc={p.returncode})")
            rec = json.loads(p.stdout.strip().splitlines()[-1])
            rec["process_s"] = time.perf_counter() - t0
            records.append(rec)
            print(f"bs={bs:4d} seed={seed} val_acc={rec['final_val_accuracy']:.4f} "
                  f"val_loss={rec['final_val_loss']:.4f} "
                  f"median_epoch_s={statistics.median(rec['epoch_s']):.2f}", flush=True)
            write_atomic(args.out, {"header": header, "summary": summarize(records),
                                    "records": records})
    print_summary(summarize(records))


def print_summary(summary):
    print("| batch | n | val_acc mean ± sd | 95% t-CI | val_loss mean ± sd | "
          "train_loss mean | train_acc mean | epoch s median (excl. 1st) |")
    print("|---|---|---|---|---|---|---|---|")
    for bs, s in summary.items():
        va, vl = s["final_val_accuracy"], s["final_val_loss"]
        print(f"| {bs} | {s['n']} | {va['mean']:.4f} ± {va['std']:.4f} | "
              f"[{va['ci95'][0]:.4f}, {va['ci95'][1]:.4f}] | {vl['mean']:.4f} ± {vl['std']:.4f} | "
              f"{s['final_train_loss']['mean']:.4f} | {s['final_train_accuracy']['mean']:.4f} | "
              f"{s['epoch_s_median']:.2f} ({_fmt(s['epoch_s_median_excl_first'])}) |")


def _fmt(x):
    return "n/a" if x is None else f"{x:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/shared/data/mnist.npz",
                    help="a Keras-format mnist.npz")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--all", action="store_true",
                    help="sweep --batch-sizes x --seeds, one subprocess per run, write --out")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/keras-mnist.json")
    ap.add_argument("--summarize", metavar="JSON", help="print the summary of a sweep file")
    args = ap.parse_args()

    if args.summarize:
        with open(args.summarize) as f:
            print_summary(json.load(f)["summary"])
    elif args.all:
        run_all(args)
    else:
        print(json.dumps(run_one(args.data, args.batch_size, args.seed, args.epochs)),
              flush=True)


if __name__ == "__main__":
    main()
