"""Datasets for the batch-size experiments: what they are, where they come from.

A `Dataset` holds a training split and a validation split as numpy arrays
(images float32 in [0, 1], labels int32) plus a human-readable `source`, which
is saved with every result so a figure always says which data it was made on.

Kinds of data:
  * `"mnist-5k"`: 5,000 real MNIST digits bundled with the package (4,000 train
    / 1,000 validation, 400 / 100 per class), so the library runs real
    experiments with no download and no TensorFlow.
  * `"mnist"`, real MNIST, from the first of these that exists:
      1. a tfds-prepared `mnist` in `data_dir` (tfds' default without one);
      2. Keras' cached `mnist.npz` ($KERAS_HOME/datasets/, else ~/.keras/datasets/);
      3. the four IDX files (`train-images-idx3-ubyte`, ...; each may be `.gz`)
         in `data_dir`;
      4. with `download=True` only: the one file Keras downloads, fetched with
         the standard library, checked against its pinned SHA-256 and renamed
         into Keras' cache, which Keras and batchjax then share.
    Whatever the container, the content is checked against the SHA-256 of the
    canonical arrays (`batchjax.mnist_files`): a damaged, edited or
    substituted copy raises `BatchjaxError`, it is never trained on.
  * `"fashion_mnist"`: tfds-prepared, then the IDX files in Keras' cache
    ($KERAS_HOME/datasets/fashion-mnist/), then IDX files in `data_dir`, then
    (with `download=True`) tfds preparation. Shapes and classes are checked;
    there are no pinned hashes for its content.
  * other tfds datasets with `image` and `label` features, read with
    `tfds.data_source`, which needs no TensorFlow once the dataset is prepared.
  * `"synthetic"`: uniform random images and labels, for timing only.

Validation split convention: the test split is never used. The LAST
`val_size` training examples are held out for validation and the rest are the
training set (default `val_size = min(10000, n // 6)`, i.e. MNIST's 60,000
becomes 50,000 train / 10,000 validation). tfds stores MNIST's records in its
own order, so its hold-out holds other digits than that of the Keras or IDX
files, which keep the original order.

Offline behaviour: nothing is downloaded unless `download=True`. Without it a
dataset that is not found raises `BatchjaxError` at once, listing where it
looked and the fixes, instead of tfds' minutes of retries; with it, the
download host is probed with a short timeout first, and every read of a
download has a timeout. `"auto"` (the default) never touches the network: it
takes the first of tfds `mnist`, Keras' cached `mnist.npz` and IDX files in an
explicitly given `data_dir`, else the bundled `"mnist-5k"`, and says which on
stderr (and in `source`), with the result of the content check.
"""

import contextlib
import dataclasses
import hashlib
import http.client
import importlib.resources
import logging
import os
import pathlib
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from batchjax import mnist_files
from batchjax.errors import BatchjaxError

KNOWN_DATASETS = ("auto", "mnist-5k", "synthetic", "mnist", "fashion_mnist")

_BUNDLED_SOURCE = (
    "bundled mnist-5k: 5,000 real MNIST digits (4,000 train / 1,000 validation), CC BY-SA 3.0"
)
_BUNDLED_NUM_VAL = 1000
_PREPARE_HINT = (
    "prepare it with download=True (--download), which needs network access and TensorFlow "
    "(pip install 'batchjax[tfds-prepare]'), or use 'mnist-5k'"
)
# tfds fetches checksums and many datasets from here when a builder names no URL.
_DEFAULT_DOWNLOAD_HOST = "https://storage.googleapis.com/"
_NETWORK_TIMEOUT_S = 3.0
_READ_CHUNK = 1000
# The one file keras.datasets.mnist downloads, and its SHA-256 as pinned in Keras'
# keras/src/datasets/mnist.py. Tests point these at a local server.
_KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
_KERAS_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
# Seconds to connect and for each read: a stalled transfer fails after this, not hours later.
_DOWNLOAD_TIMEOUT_S = 30.0
_DOWNLOAD_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A training and a validation split, with where they came from.

    `eq=False` because the fields are numpy arrays: equality and hashing are by
    identity, as for any container of arrays.

    Attributes:
        x_train: float32 images in [0, 1], (N, H, W) grayscale or (N, H, W, C).
        y_train: int32 labels in [0, num_classes), shape (N,).
        x_val: float32 validation images, same image shape as `x_train`.
        y_val: int32 validation labels.
        name: short name, e.g. "mnist-5k".
        num_classes: number of classes.
        source: human-readable provenance, saved with results.
        verified: how the content was checked, e.g. "content verified: canonical
            MNIST arrays (SHA-256)"; "" when it was not.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    name: str
    num_classes: int
    source: str
    verified: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise BatchjaxError(f"Dataset name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.source, str) or not self.source:
            raise BatchjaxError(f"Dataset source must be a non-empty string, got {self.source!r}")
        if not isinstance(self.verified, str):
            raise BatchjaxError(f"Dataset verified must be a string, got {self.verified!r}")
        if (
            not isinstance(self.num_classes, (int, np.integer))
            or isinstance(self.num_classes, bool)
            or self.num_classes < 2
        ):
            raise BatchjaxError(
                f"Dataset num_classes must be an integer >= 2, got {self.num_classes!r}"
            )
        for split in ("train", "val"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            _check_images(x, f"x_{split}")
            _check_labels(y, f"y_{split}", self.num_classes)
            if len(x) != len(y):
                raise BatchjaxError(
                    f"Dataset x_{split} has {len(x)} images but y_{split} has {len(y)} labels; "
                    "pass one label per image"
                )
            if len(x) == 0:
                raise BatchjaxError(f"Dataset x_{split} is empty; pass at least one example")
        if self.x_train.shape[1:] != self.x_val.shape[1:]:
            raise BatchjaxError(
                f"Dataset x_train images are {self.x_train.shape[1:]} but x_val images are "
                f"{self.x_val.shape[1:]}; both splits need the same image shape"
            )

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_val(self) -> int:
        """Number of validation examples."""
        return int(self.x_val.shape[0])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image: (H, W) or (H, W, C)."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def subset(self, num_train: int | None = None, num_val: int | None = None) -> "Dataset":
        """Returns the first `num_train` / `num_val` examples (None keeps a split whole).

        Args:
            num_train: training examples to keep, 1..num_train.
            num_val: validation examples to keep, 1..num_val.

        Returns:
            A new Dataset whose `source` records the subset.
        """
        num_train = _check_count(num_train, self.num_train, "num_train")
        num_val = _check_count(num_val, self.num_val, "num_val")
        if num_train == self.num_train and num_val == self.num_val:
            return self
        return dataclasses.replace(
            self,
            x_train=self.x_train[:num_train],
            y_train=self.y_train[:num_train],
            x_val=self.x_val[:num_val],
            y_val=self.y_val[:num_val],
            source=f"{self.source}; subset: first {num_train:,} train / {num_val:,} validation",
        )

    def describe(self) -> dict[str, Any]:
        """Returns JSON-able metadata to save next to results ("verified" only when set)."""
        meta = {
            "name": self.name,
            "source": self.source,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "image_shape": list(self.image_shape),
            "num_classes": int(self.num_classes),
        }
        if self.verified:
            meta["verified"] = self.verified
        return meta


def _check_images(x: Any, field: str) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise BatchjaxError(
            f"Dataset {field} must be a float32 numpy array, got {kind}; "
            "convert with x.astype(np.float32) / 255"
        )
    if x.ndim not in (3, 4):
        raise BatchjaxError(
            f"Dataset {field} must have shape (N, H, W) or (N, H, W, C), got {x.shape}"
        )
    # min/max rather than a boolean mask: no image-sized temporary, and NaN fails both tests.
    if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):
        raise BatchjaxError(
            f"Dataset {field} has values outside [0, 1] (min {x.min()}, max {x.max()}); "
            "scale 8-bit pixels by 1/255"
        )


def _check_labels(y: Any, field: str, num_classes: int) -> None:
    if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.ndim != 1:
        kind = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise BatchjaxError(
            f"Dataset {field} must be a 1-D int32 numpy array, got {kind}; "
            "convert with y.astype(np.int32)"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise BatchjaxError(
            f"Dataset {field} has labels outside [0, {num_classes}) "
            f"(min {y.min()}, max {y.max()}); fix the labels or num_classes"
        )


def _check_count(value: Any, available: int, what: str) -> int:
    if value is None:
        return available
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise BatchjaxError(f"{what} must be an integer or None, got {value!r}")
    if not 1 <= value <= available:
        raise BatchjaxError(
            f"{what}={value} is not in 1..{available:,} (the split's size); pass a count "
            "in that range, or None for all"
        )
    return int(value)


def make_synthetic(
    num_train: int = 60000,
    num_val: int = 10000,
    image_shape: tuple[int, ...] = (28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Uniform random images and labels, for benchmarks (nothing to learn).

    Args:
        num_train: training examples.
        num_val: validation examples.
        image_shape: (H, W) or (H, W, C).
        num_classes: labels are uniform on 0..num_classes-1.
        seed: seed of `np.random.default_rng`.

    Returns:
        A Dataset named "synthetic".
    """
    for what, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise BatchjaxError(f"make_synthetic {what} must be a positive integer, got {value!r}")
    image_shape = tuple(image_shape)
    if len(image_shape) not in (2, 3) or not all(
        isinstance(d, (int, np.integer)) and d >= 1 for d in image_shape
    ):
        raise BatchjaxError(
            f"make_synthetic image_shape must be (H, W) or (H, W, C) of positive integers, "
            f"got {image_shape!r}"
        )
    generator = np.random.default_rng(seed)
    x_train = generator.random(dtype=np.float32, out=aligned_empty((num_train, *image_shape),
                                                                   np.float32))
    y_train = generator.integers(0, num_classes, num_train).astype(np.int32)
    x_val = generator.random(dtype=np.float32, out=aligned_empty((num_val, *image_shape),
                                                                 np.float32))
    x_train.flags.writeable = x_val.flags.writeable = False  # may be shared with the device
    y_val = generator.integers(0, num_classes, num_val).astype(np.int32)
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        name="synthetic",
        num_classes=num_classes,
        source=f"synthetic: uniform random images {image_shape} and labels, seed {seed}",
    )


def load_dataset(
    name: str = "auto",
    *,
    data_dir: str | None = None,
    download: bool = False,
    val_size: int | None = None,
    verbose: bool = True,
) -> Dataset:
    """Loads a dataset by name; never downloads unless `download=True`.

    Args:
        name: "auto" (real MNIST if found locally, else "mnist-5k"), "mnist"
            (real MNIST, content verified), "fashion_mnist", "mnist-5k"
            (bundled), "synthetic", or another tfds image classification
            dataset with `image` and `label` features ("cifar10", ...).
        data_dir: tfds data directory, also searched for the four IDX files of
            "mnist" and "fashion_mnist"; None means tfds' default
            ($TFDS_DATA_DIR or ~/tensorflow_datasets) and no IDX files.
        download: "mnist": fetch Keras' mnist.npz into Keras' cache when no
            local copy is found; other tfds datasets: download and prepare
            (as array_record, which `tfds.data_source` reads; needs TensorFlow).
        val_size: validation examples: the LAST `val_size` training examples
            are held out (default min(10000, n // 6)); "mnist-5k" has a fixed
            1,000-example split; for "synthetic" it is `num_val`.
        verbose: print which source was used, and download progress, on stderr.

    Returns:
        The Dataset; its `source` says what was loaded, from where, and how its
        content was checked.

    Raises:
        BatchjaxError: unknown name, dataset not found or not prepared, a copy
            whose content differs from the original, network unreachable, or a
            bad `val_size`.
    """
    if not isinstance(name, str):
        raise BatchjaxError(f"dataset name must be a string, got {name!r}; known: {_known_list()}")
    if val_size is not None and (
        not isinstance(val_size, (int, np.integer)) or isinstance(val_size, bool) or val_size < 1
    ):
        raise BatchjaxError(f"val_size must be a positive integer or None, got {val_size!r}")
    if name == "mnist-5k":
        return _load_bundled(val_size)
    if name == "synthetic":
        return make_synthetic() if val_size is None else make_synthetic(num_val=val_size)
    if name == "auto":
        return _load_auto(data_dir=data_dir, val_size=val_size, verbose=verbose)
    if name in ("mnist", "fashion_mnist"):
        return _load_mnist_like(
            name, data_dir=data_dir, download=download, val_size=val_size, verbose=verbose
        )
    return _load_tfds(
        name, data_dir=data_dir, download=download, val_size=val_size, verbose=verbose
    )


def _known_list() -> str:
    return ", ".join(repr(n) for n in KNOWN_DATASETS) + " or another tfds image dataset"


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(f"batchjax: {message}", file=sys.stderr, flush=True)


def _load_bundled(val_size: int | None) -> Dataset:
    if val_size not in (None, _BUNDLED_NUM_VAL):
        raise BatchjaxError(
            f"mnist-5k has a fixed {_BUNDLED_NUM_VAL:,}-example validation split, got "
            f"val_size={val_size}; pass val_size=None (use Dataset.subset to shrink it)"
        )
    resource = importlib.resources.files("batchjax") / "datasets" / "mnist_5k.npz"
    try:
        with resource.open("rb") as f, np.load(f) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    except (OSError, KeyError) as err:
        raise BatchjaxError(
            f"the bundled mnist-5k data is missing or damaged ({err}); reinstall batchjax "
            "or rebuild it with: python scripts/make_bundled_data.py"
        ) from err
    return Dataset(
        x_train=_to_float(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.int32),
        x_val=_to_float(arrays["x_val"]),
        y_val=arrays["y_val"].astype(np.int32),
        name="mnist-5k",
        num_classes=10,
        source=_BUNDLED_SOURCE,
    )


def _load_auto(*, data_dir: str | None, val_size: int | None, verbose: bool) -> Dataset:
    prepared, tfds_state = _probe_tfds("mnist", data_dir)
    if prepared:
        _say(verbose, f"dataset auto -> mnist ({tfds_state})")
        dataset = _load_tfds(
            "mnist", data_dir=data_dir, download=False, val_size=val_size, verbose=verbose
        )
        return dataclasses.replace(dataset, source=f"auto -> {dataset.source}")
    looked = [tfds_state]
    found = _find_files("mnist", data_dir, looked)
    if found is not None:
        dataset = _load_files("mnist", found, val_size)
        _say(verbose, f"dataset auto -> mnist ({tfds_state}; using {found[0]}; "
                      f"{dataset.verified})")
    else:
        reason = "; ".join(looked)
        _say(verbose, f"dataset auto -> mnist-5k ({reason}; bundled 5,000 real MNIST digits)")
        dataset = _load_bundled(val_size)
        dataset = dataclasses.replace(dataset, source=f"{dataset.source} [{reason}]")
    return dataclasses.replace(dataset, source=f"auto -> {dataset.source}")


def _probe_tfds(name: str, data_dir: str | None) -> tuple[bool, str]:
    """Whether tfds `name` is prepared and readable in `data_dir`, and a phrase saying so.

    Never touches the network: `tfds.builder(...).is_prepared()` only looks at files.
    """
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        return False, f"tensorflow_datasets cannot be imported ({_first_line(err)})"
    with _quiet_absl():
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():
                return False, f"tfds {name} is not prepared in {builder.data_dir_root}"
            problem = _format_problem(builder, tfds)
        except Exception as err:  # e.g. data_dir is a file; the other sources must still work.
            return False, f"tfds cannot look for {name} in {data_dir} ({_first_line(err)})"
    if problem is not None:
        return False, problem
    return True, f"tfds {name} is prepared in {builder.data_dir_root}"


def _keras_datasets_dir() -> pathlib.Path:
    """Keras' cache of datasets: $KERAS_HOME/datasets, else ~/.keras/datasets (as Keras)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return pathlib.Path(os.path.expanduser(home)) / "datasets"


def _find_files(
    name: str, data_dir: str | None, looked: list[str]
) -> tuple[str, dict[str, pathlib.Path]] | None:
    """The first local copy of `name` in Keras' cache or IDX files in `data_dir`.

    Returns (a phrase naming it, array key -> file), or None after adding to `looked` a
    phrase for each place that had nothing.
    """
    keras_dir = _keras_datasets_dir()
    if name == "mnist":
        npz = keras_dir / "mnist.npz"
        if npz.is_file():
            return f"Keras' cache {npz}", dict.fromkeys(mnist_files.KEYS, npz)
        looked.append(f"no Keras cache {npz}")
    else:
        fashion_dir = keras_dir / "fashion-mnist"
        if (paths := mnist_files.find_idx_files(fashion_dir)) is not None:
            return f"IDX files in Keras' cache {fashion_dir}", paths
        looked.append(f"no IDX files in Keras' cache {fashion_dir}")
    if data_dir is None:
        looked.append("no data_dir with IDX files")
    elif (paths := mnist_files.find_idx_files(data_dir)) is not None:
        return f"IDX files in {data_dir}", paths
    else:
        looked.append(f"no IDX files in {data_dir}")
    return None


def _load_files(
    name: str, found: tuple[str, dict[str, pathlib.Path]], val_size: int | None
) -> Dataset:
    """Reads and checks what `_find_files` found; splits it like the tfds path."""
    where, paths = found
    if all(p.suffix == ".npz" for p in paths.values()):
        arrays = mnist_files.read_keras_npz(paths["x_train"])
    else:
        arrays = mnist_files.read_idx_files(paths)
    files = {k: str(p) for k, p in paths.items()}
    if name == "mnist":
        verified = mnist_files.verify_mnist(arrays, files)
    else:
        verified = mnist_files.check_fashion_mnist(arrays, files)
    x, y = arrays["x_train"], arrays["y_train"]
    num_records = len(x)
    if val_size is None:
        val_size = min(10000, num_records // 6)
    if not 1 <= val_size < num_records:
        raise BatchjaxError(
            f"val_size={val_size} must be between 1 and {num_records - 1:,}: {name} has "
            f"{num_records:,} training images"
        )
    num_train = num_records - val_size
    return Dataset(
        x_train=_to_float(x[:num_train]),
        y_train=y[:num_train].astype(np.int32),
        x_val=_to_float(x[num_train:]),
        y_val=y[num_train:].astype(np.int32),
        name=name,
        num_classes=mnist_files.NUM_CLASSES,
        source=(
            f"{name} from {where}: {num_records:,} training images, last {val_size:,} held out "
            f"for validation, test images unused; {verified}"
        ),
        verified=verified,
    )


def _load_mnist_like(
    name: str, *, data_dir: str | None, download: bool, val_size: int | None, verbose: bool
) -> Dataset:
    """"mnist" or "fashion_mnist" from the first source that has it (module docstring)."""
    prepared, tfds_state = _probe_tfds(name, data_dir)
    if prepared:
        return _load_tfds(
            name, data_dir=data_dir, download=False, val_size=val_size, verbose=verbose
        )
    looked = [tfds_state]
    found = _find_files(name, data_dir, looked)
    if found is None and download:
        if name != "mnist":  # tfds prepares it (with TensorFlow), as for any tfds dataset
            return _load_tfds(
                name, data_dir=data_dir, download=True, val_size=val_size, verbose=verbose
            )
        npz = _download_keras_mnist(verbose)
        found = f"Keras' cache {npz} (downloaded now)", dict.fromkeys(mnist_files.KEYS, npz)
    if found is None:
        if name == "mnist":
            fix = (
                f"fix: download=True (--download) fetches Keras' mnist.npz (11 MB, SHA-256 "
                f"pinned) into {_keras_datasets_dir()}, or pass data_dir (--data-dir) holding the "
                "four MNIST IDX files (train-images-idx3-ubyte[.gz], ...), or use 'mnist-5k'"
            )
        else:
            fix = (
                "put the four IDX files (train-images-idx3-ubyte[.gz], ...) in data_dir "
                f"(--data-dir), or {_PREPARE_HINT}"
            )
        raise BatchjaxError(f"{name} not found: {'; '.join(looked)}; {fix}")
    dataset = _load_files(name, found, val_size)
    _say(verbose, f"dataset {name} -> {found[0]}; {dataset.verified}")
    return dataset


def _download_keras_mnist(verbose: bool) -> pathlib.Path:
    """Downloads Keras' mnist.npz into Keras' cache; returns its path.

    The file is written to a temporary file next to its destination, its SHA-256
    checked, and only then renamed into place (`os.replace`, atomic), so the
    cache never holds a partial or wrong file, whatever stops the download.
    """
    url, expected = _KERAS_MNIST_URL, _KERAS_MNIST_SHA256
    directory = _keras_datasets_dir()
    _check_reachable(
        url, "Keras' mnist.npz",
        f"connect to the network, or copy mnist.npz into {directory} or the four IDX files "
        "into data_dir (--data-dir), or use 'mnist-5k'",
    )
    part_path = directory / f".mnist.npz.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # os.open, not tempfile: the file gets the umask's permissions (tempfile's are 0600),
        # so the renamed file is readable like one Keras downloads.
        part = os.fdopen(os.open(part_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
    except OSError as err:
        raise BatchjaxError(
            f"cannot write to Keras' cache {directory} ({type(err).__name__}: "
            f"{_first_line(err)}); set KERAS_HOME to a writable directory"
        ) from err
    try:
        with part:
            got = _fetch(url, part, verbose)
            part.flush()
            os.fsync(part.fileno())
        if got != expected:
            raise BatchjaxError(
                f"the download of {url} has SHA-256 {got}, expected {expected}; it was not "
                "kept: try again later, or copy a good mnist.npz into "
                f"{directory}"
            )
        os.replace(part_path, directory / "mnist.npz")
    except BaseException:  # Ctrl-C included: never leave the partial file behind.
        with contextlib.suppress(OSError):
            os.unlink(part_path)
        raise
    return directory / "mnist.npz"


def _fetch(url: str, out: Any, verbose: bool) -> str:
    """Streams `url` into the open file `out`; returns the SHA-256 of what it wrote."""
    digest, received, total = hashlib.sha256(), 0, None
    start = time.perf_counter()
    shown = -1
    tty = verbose and sys.stderr.isatty()
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _say(verbose, f"downloading {url}" + (f" ({total / 1e6:.1f} MB)" if total else ""))
            while chunk := response.read(_DOWNLOAD_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if tty and total and (percent := 100 * received // total) != shown:
                    shown = percent
                    bar = "#" * (percent // 4)
                    print(f"\rbatchjax: [{bar:<25}] {percent:3d}% of {total / 1e6:.1f} MB",
                          end="", file=sys.stderr, flush=True)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise BatchjaxError(
            f"downloading {url} failed after {received:,} bytes ({type(err).__name__}: "
            f"{_first_line(err)}); nothing was kept: check the network and try again, or use "
            "'mnist-5k'"
        ) from err
    finally:
        if shown >= 0:
            print(file=sys.stderr, flush=True)
    if total is not None and received != total:
        raise BatchjaxError(
            f"the download of {url} stopped at {received:,} of {total:,} bytes; nothing was "
            "kept: try again"
        )
    _say(verbose, f"downloaded {received / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_absl():
    """Silences tfds' absl warnings while probing a data dir and decoding.

    tfds logs "Variant folder ... has no dataset_info.json" for every dataset
    that is not prepared (the expected state here, which we report in one line
    of our own) and recommends OpenCV when it decodes images with PIL.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _format_problem(builder: Any, tfds: Any) -> str | None:
    """Why `tfds.data_source` cannot read a prepared dataset, or None if it can."""
    formats = builder.info.available_file_formats()
    # tfds.load prepares tfrecord by default, which has no random access.
    if not formats & set(tfds.core.FileFormat.with_random_access()):
        names = ", ".join(sorted(f.value for f in formats)) or "an unrecorded format"
        return (
            f"tfds {builder.name} in {builder.data_dir_root} is stored as {names}, "
            "which tfds.data_source cannot read"
        )
    return None


def _load_tfds(
    name: str, *, data_dir: str | None, download: bool, val_size: int | None, verbose: bool
) -> Dataset:
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise BatchjaxError(
            f"dataset {name!r} needs tensorflow_datasets: pip install tensorflow-datasets "
            f"(or use one of {_known_list()})"
        ) from err
    # tfds registers the base name, without a config ("/...") or version (":...").
    base = name.split(":")[0].split("/")[0]
    if base not in tfds.list_builders(with_community_datasets=False):
        raise BatchjaxError(f"unknown dataset {name!r}; known: {_known_list()}")
    with _quiet_absl():
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as err:  # tfds raises many types for bad configs and versions.
            raise BatchjaxError(f"tfds cannot build {name!r}: {_first_line(err)}") from err
        features = builder.info.features
        label = features["label"] if "label" in features.keys() else None
        if "image" not in features.keys() or not hasattr(label, "num_classes"):
            raise BatchjaxError(
                f"tfds {name} has features {sorted(features.keys())}, but batchjax needs "
                f"'image' and a class 'label'; use one of {_known_list()}"
            )
        prepared = builder.is_prepared()
    root = builder.data_dir_root
    if not prepared:
        if not download:
            raise BatchjaxError(f"tfds {name} is not prepared in {root}; {_PREPARE_HINT}")
        _prepare(builder, verbose)
    elif (problem := _format_problem(builder, tfds)) is not None:
        raise BatchjaxError(
            f"{problem}; delete {builder.data_dir} and prepare it again with download=True, "
            "which writes array_record"
        )

    try:
        source = tfds.data_source(name, split="train", data_dir=data_dir, download=False)
    except Exception as err:  # Surface tfds' multi-line errors as one line.
        raise BatchjaxError(f"tfds cannot open {name} in {root}: {_first_line(err)}") from err
    num_records = len(source)
    if val_size is None:
        val_size = min(10000, num_records // 6)
    if not 1 <= val_size < num_records:
        raise BatchjaxError(
            f"val_size={val_size} must be between 1 and {num_records - 1:,}: tfds {name} "
            f"train split has {num_records:,} examples"
        )
    _say(verbose, f"reading tfds {name} train split ({num_records:,} examples) from {root}")
    with _quiet_absl():
        images, labels = _read_records(source, name)

    source = (
        f"tfds {name} {builder.info.version} from {root}: train split, "
        f"last {val_size:,} held out for validation"
    )
    verified = ""
    if base == "mnist":  # tfds gives the train split only: check its records, in any order
        verified = mnist_files.verify_mnist_train_records(images, labels, f"tfds {name} in {root}")
        source = f"{source}; {verified}"
        _say(verbose, f"tfds {name}: {verified}")
    num_train = num_records - val_size
    return Dataset(
        x_train=_to_float(images[:num_train]),
        y_train=labels[:num_train],
        x_val=_to_float(images[num_train:]),
        y_val=labels[num_train:],
        name=name,
        num_classes=int(label.num_classes),
        source=source,
        verified=verified,
    )


def aligned_empty(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary.

    JAX's CPU backend uses a 64-byte-aligned NumPy array in place instead of copying it
    (`jax.device_put` aliases it), so a dataset built on such arrays is not held twice in
    memory while training: 188 MB saved for MNIST's 60,000 training images.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + alignment, np.uint8)
    offset = (-buffer.ctypes.data) % alignment
    return buffer[offset:offset + nbytes].view(dtype).reshape(shape)


def _to_float(images: np.ndarray) -> np.ndarray:
    x = aligned_empty(images.shape, np.float32)
    np.divide(images, np.float32(255), out=x, dtype=np.float32)
    x.flags.writeable = False  # the device may share this memory: keep it as loaded
    return x


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _read_records(source: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of a tfds data source into uint8 images and int32 labels."""
    read = _batch_reader(source)
    num_records = len(source)
    images, labels = None, np.empty(num_records, np.int32)
    for start in range(0, num_records, _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, num_records)))
        records = read(keys)
        if images is None:
            first = np.asarray(records[0]["image"])
            if first.dtype != np.uint8:
                raise BatchjaxError(
                    f"tfds {name} images are {first.dtype}; batchjax reads 8-bit images only"
                )
            raw_shape = first.shape
            # Drop a trailing channel of size 1 so grayscale images are (H, W).
            shape = raw_shape[:-1] if first.ndim == 3 and raw_shape[-1] == 1 else raw_shape
            images = np.empty((num_records, *shape), np.uint8)
        for i, record in zip(keys, records):
            image = np.asarray(record["image"])
            if image.shape != raw_shape:
                raise BatchjaxError(
                    f"tfds {name} record {i} has image shape {image.shape}, unlike the first "
                    f"record's {raw_shape}; batchjax needs fixed-size images"
                )
            images[i] = image.reshape(shape)
            labels[i] = record["label"]
    return images, labels


def _batch_reader(source: Any):
    """Returns `keys -> records`, batched when the data source supports it.

    tfds data sources implement `__getitems__` (array_record reads a batch in
    one call), but tfds 4.9.10's `mock_data` installs it unbound on its mock
    reader, so it raises TypeError there; one record at a time always works.
    """
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None and len(source) > 0:
        try:
            getitems([0])
            return getitems
        except TypeError:
            pass
    return lambda keys: [source[k] for k in keys]


def _prepare(builder: Any, verbose: bool) -> None:
    """Downloads and prepares `builder` as array_record, failing fast when offline."""
    url = getattr(type(builder), "URL", None)
    if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        url = _DEFAULT_DOWNLOAD_HOST
    _check_reachable(
        url, f"tfds {builder.name}",
        "connect to the network, or prepare the dataset elsewhere and copy it into the tfds "
        "data_dir, or use 'mnist-5k'",
    )
    _say(verbose, f"downloading and preparing tfds {builder.name} in {builder.data_dir_root}")
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as err:  # Any failure becomes one actionable line.
        hint = ""
        if isinstance(err, ImportError):
            hint = "; install the preparation extras: pip install 'batchjax[tfds-prepare]'"
        raise BatchjaxError(
            f"preparing tfds {builder.name} in {builder.data_dir_root} failed: "
            f"{type(err).__name__}: {_first_line(err)}{hint}"
        ) from err


def _check_reachable(url: str, what: str, fix: str) -> None:
    """Raises BatchjaxError unless a TCP connection to `url`'s host (or proxy) opens.

    `what` is what would be downloaded and `fix` the advice, both for the message.

    Runs in a daemon thread because a DNS lookup ignores socket timeouts and
    can hang on a machine without a resolver.
    """
    timeout = _NETWORK_TIMEOUT_S
    parsed = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy:
        # Downloads then go through the proxy, so the proxy is what must answer.
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome or outcome[0] is not None:
        why = f"{type(outcome[0]).__name__}: {_first_line(outcome[0])}" if outcome else "timed out"
        raise BatchjaxError(f"cannot reach {host}:{port} to download {what} ({why}); {fix}")
