"""MNIST and Fashion-MNIST files without TensorFlow: IDX and Keras npz readers, content checks.

Two containers hold the same four arrays (`x_train`, `y_train`, `x_test`, `y_test`, uint8):
  * IDX, the format of the original MNIST files (LeCun et al.): a big-endian magic number
    0x00000801 (labels, 1 dimension) or 0x00000803 (images, 3 dimensions), where 0x08 means
    unsigned bytes, then one big-endian uint32 per dimension, then the data in C order. The
    files are often gzipped; gzip is detected from its first two bytes, not the name.
  * Keras' `mnist.npz` (`keras.datasets.mnist`), an npz archive of the four arrays.

A copy may come from anywhere, so the content is checked, not the container: `verify_mnist`
compares the SHA-256 of each array's bytes (uint8, C order) with the canonical values pinned in
`MNIST_ARRAYS` (about 0.05 s for all 70,000 images), which a recompressed npz or a gzipped IDX
passes and a damaged, edited or substituted copy fails. tfds stores MNIST's records in its own
order, so its training split is checked order-independently (`records_sha256`). Fashion-MNIST
has no pinned array hashes here: its shapes and classes are checked, its content is not.
"""

import gzip
import hashlib
import pathlib
import zipfile
import zlib

import numpy as np

from batchjax.errors import BatchjaxError

KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10

# Shape and SHA-256 of each canonical MNIST array's bytes (uint8, C order).
MNIST_ARRAYS = {
    "x_train": ((60000, 28, 28),
                "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757"),
    "y_train": ((60000,), "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13"),
    "x_test": ((10000, 28, 28),
               "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"),
    "y_test": ((10000,), "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"),
}
# `records_sha256` of MNIST's 60,000 training records, computed from arrays that match
# MNIST_ARRAYS; it holds for the records in any order.
MNIST_TRAIN_RECORDS_SHA256 = "3655811c0e1223700a4714a92a51f55bd215ed7dc1fa2baa4326a2b58042d82d"
FASHION_MNIST_SHAPES = {
    "x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,),
}

MNIST_VERIFIED = "content verified: canonical MNIST arrays (SHA-256)"
FASHION_CHECKED = "shape and classes checked, content not verified"
_REPLACE = "replace it with an intact copy"
_REFUSE = (
    "refusing a damaged, edited or substituted copy: delete it and fetch MNIST again "
    "(download=True, --download), or use 'mnist-5k'"
)


def find_idx_files(directory: str | pathlib.Path) -> dict[str, pathlib.Path] | None:
    """The four IDX files in `directory`, each plain or `.gz`.

    Args:
        directory: where to look (need not exist).

    Returns:
        Array key ("x_train", ...) -> path, or None when none of the four is there.

    Raises:
        BatchjaxError: only some of the four are there.
    """
    directory = pathlib.Path(directory)
    found, missing = {}, []
    for key, name in IDX_FILES.items():
        # The plain file first: it reads faster than its gzipped twin.
        path = next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[key] = path
    if not found:
        return None
    if missing:
        have = ", ".join(p.name for p in found.values())
        raise BatchjaxError(
            f"{directory} holds {have} but not {', '.join(missing)} (plain or .gz); add the "
            "missing IDX files or remove the others"
        )
    return found


def read_idx(path: str | pathlib.Path, ndim: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes with `ndim` dimensions, gzipped or not.

    Args:
        path: the file.
        ndim: 1 for labels, 3 for images.

    Returns:
        A read-only uint8 array with the dimensions of the file's header.

    Raises:
        BatchjaxError: unreadable, wrong magic number, truncated, or trailing data.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if gzipped:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise BatchjaxError(f"cannot read IDX file {path} ({_why(err)}); {_REPLACE}") from err
    expected = 0x800 | ndim
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or magic != expected:
        got = f"0x{magic:08x}" if len(raw) >= 4 else f"a {len(raw)}-byte file"
        raise BatchjaxError(
            f"{path} has magic number {got}, not 0x{expected:08x} (IDX, unsigned bytes, {ndim} "
            f"dimension{'s' if ndim > 1 else ''}); is it the right file? {_REPLACE}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise BatchjaxError(f"{path} is truncated inside its IDX header; {_REPLACE}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    data = len(raw) - header
    if data < size:
        raise BatchjaxError(
            f"{path} is truncated: its header promises {dims} = {size:,} bytes of data but it "
            f"holds {data:,}; {_REPLACE}"
        )
    if data > size:
        raise BatchjaxError(
            f"{path} has {data - size:,} bytes of trailing data after the {size:,} its header "
            f"{dims} promises; {_REPLACE}"
        )
    return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims)


def read_idx_files(paths: dict[str, pathlib.Path]) -> dict[str, np.ndarray]:
    """Reads the four IDX files that `find_idx_files` found, keyed like Keras' npz."""
    return {key: read_idx(path, 3 if key.startswith("x") else 1) for key, path in paths.items()}


def read_keras_npz(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads `x_train`, `y_train`, `x_test`, `y_test` from an npz archive like Keras' mnist.npz.

    Args:
        path: the npz file.

    Returns:
        The four arrays, as stored (dtypes and shapes are `check_arrays`' job).

    Raises:
        BatchjaxError: not a readable npz archive, or a key is missing.
    """
    path = pathlib.Path(path)
    fix = "delete it and fetch it again (download=True, --download)"
    try:
        npz = np.load(path, allow_pickle=False)
        if not hasattr(npz, "files"):
            raise BatchjaxError(f"{path} holds a single array, not an npz archive; {fix}")
        with npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise BatchjaxError(
                    f"{path} has no {', '.join(missing)} (it holds "
                    f"{', '.join(npz.files) or 'nothing'}; Keras' mnist.npz holds "
                    f"{', '.join(KEYS)}); {fix}"
                )
            return {k: npz[k] for k in KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if isinstance(err, BatchjaxError):
            raise
        raise BatchjaxError(f"cannot read {path} as an npz archive ({_why(err)}); {fix}") from err


def check_arrays(
    arrays: dict[str, np.ndarray], files: dict[str, str], shapes: dict[str, tuple[int, ...]],
    what: str,
) -> None:
    """Checks dtypes, image/label counts, shapes and classes of the four arrays.

    Args:
        arrays: the four arrays by key.
        files: key -> the file it came from, named in errors.
        shapes: key -> expected shape.
        what: the dataset's name in errors, e.g. "MNIST".

    Raises:
        BatchjaxError: naming the file and what differs.
    """
    for key in KEYS:
        if arrays[key].dtype != np.uint8:
            raise BatchjaxError(
                f"{files[key]}: {key} is {arrays[key].dtype}, but {what} stores uint8; {_REPLACE}"
            )
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim and y.ndim and len(x) != len(y):
            raise BatchjaxError(
                f"{files[f'x_{split}']} has {len(x):,} images but {files[f'y_{split}']} has "
                f"{len(y):,} labels; they do not belong together: {_REPLACE}"
            )
    for key, shape in shapes.items():
        if arrays[key].shape != tuple(shape):
            raise BatchjaxError(
                f"{files[key]}: {key} has shape {arrays[key].shape}, but {what}'s is "
                f"{tuple(shape)}; {_REPLACE}"
            )
    for key in ("y_train", "y_test"):
        y = arrays[key]
        if y.size and y.max() >= NUM_CLASSES:
            raise BatchjaxError(
                f"{files[key]}: {key} has labels outside 0..{NUM_CLASSES - 1} (max {y.max()}); "
                f"{_REPLACE}"
            )
        absent = np.flatnonzero(np.bincount(y, minlength=NUM_CLASSES) == 0).tolist()
        if absent:
            raise BatchjaxError(
                f"{files[key]}: {key} has no example of class {', '.join(map(str, absent))}, "
                f"but {what} has all {NUM_CLASSES}; {_REPLACE}"
            )


def verify_mnist(arrays: dict[str, np.ndarray], files: dict[str, str]) -> str:
    """Checks the four arrays against canonical MNIST, shapes first, then SHA-256.

    Args:
        arrays: the four arrays by key, as read.
        files: key -> the file it came from, named in errors.

    Returns:
        `MNIST_VERIFIED`, the text that goes into `Dataset.source`.

    Raises:
        BatchjaxError: naming the file, the array and what differs.
    """
    check_arrays(arrays, files, {k: shape for k, (shape, _) in MNIST_ARRAYS.items()}, "MNIST")
    for key, (_, expected) in MNIST_ARRAYS.items():
        got = hashlib.sha256(np.ascontiguousarray(arrays[key])).hexdigest()
        if got != expected:
            raise BatchjaxError(
                f"{files[key]}: {key} differs from canonical MNIST (SHA-256 {got[:16]}..., "
                f"expected {expected[:16]}...); {_REFUSE}"
            )
    return MNIST_VERIFIED


def check_fashion_mnist(arrays: dict[str, np.ndarray], files: dict[str, str]) -> str:
    """Checks the four Fashion-MNIST arrays' shapes and classes; returns `FASHION_CHECKED`."""
    check_arrays(arrays, files, FASHION_MNIST_SHAPES, "Fashion-MNIST")
    return FASHION_CHECKED


def records_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """An order-independent SHA-256 of (image, label) records.

    Each record's digest is the SHA-256 of its label byte followed by its image bytes; the
    result is the SHA-256 of the sorted digests (0.1 s for MNIST's 60,000 records).
    """
    labels = np.asarray(labels).astype(np.uint8)
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    digests = sorted(
        hashlib.sha256(bytes([int(y)]) + x.tobytes()).digest() for x, y in zip(flat, labels)
    )
    return hashlib.sha256(b"".join(digests)).hexdigest()


def verify_mnist_train_records(images: np.ndarray, labels: np.ndarray, where: str) -> str:
    """Checks a training split against canonical MNIST's records, in any order.

    Args:
        images: uint8 images (N, 28, 28).
        labels: integer labels (N,).
        where: the source, named in errors.

    Returns:
        The verification text for `Dataset.source`: verified when N is MNIST's 60,000;
        "not verified" for another N (a subset or a test build is not MNIST).

    Raises:
        BatchjaxError: N is 60,000 and the records differ from MNIST's.
    """
    num = MNIST_ARRAYS["x_train"][0][0]
    if len(images) != num:
        return f"content not verified: {len(images):,} training records, not MNIST's {num:,}"
    got = records_sha256(images, labels)
    if got != MNIST_TRAIN_RECORDS_SHA256:
        raise BatchjaxError(
            f"{where}: the training records differ from canonical MNIST (SHA-256 of the sorted "
            f"records {got[:16]}..., expected {MNIST_TRAIN_RECORDS_SHA256[:16]}...); {_REFUSE}"
        )
    return "content verified: canonical MNIST training records (order-independent SHA-256)"


def _why(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0]}"
