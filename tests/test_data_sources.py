"""Tests for real MNIST without TensorFlow: Keras' npz, IDX files, the download, content checks.

Hermetic: tiny MNIST-like arrays are written here as Keras npz and IDX files, and the canonical
hash table is replaced by theirs (one test pins the real values). Downloads come from an
http.server on 127.0.0.1; Keras' cache and HOME are temporary directories.
"""

import gzip
import hashlib
import http.server
import io
import os
import pathlib
import socket
import sys
import threading
import time

import numpy as np
import pytest

from batchjax import data, mnist_files
from batchjax.errors import BatchjaxError

NUM_TRAIN, NUM_TEST = 60, 20
MAGIC = {1: 0x801, 3: 0x803}


def _tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    return {
        "x_train": generator.integers(0, 256, (NUM_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(NUM_TRAIN) % 10).astype(np.uint8),
        "x_test": generator.integers(0, 256, (NUM_TEST, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(NUM_TEST) % 10).astype(np.uint8),
    }


@pytest.fixture
def tiny(monkeypatch):
    """Tiny arrays, declared canonical MNIST (and the expected Fashion-MNIST shapes)."""
    arrays = _tiny_arrays()
    table = {k: (a.shape, hashlib.sha256(a).hexdigest()) for k, a in arrays.items()}
    monkeypatch.setattr(mnist_files, "MNIST_ARRAYS", table)
    shapes = {k: a.shape for k, a in arrays.items()}
    monkeypatch.setattr(mnist_files, "FASHION_MNIST_SHAPES", shapes)
    return arrays


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty Keras cache, HOME and data_dir; no proxies. Returns a namespace of paths."""
    class Places:
        keras = tmp_path / "keras"
        datasets = tmp_path / "keras" / "datasets"
        home = tmp_path / "home"
        data_dir = tmp_path / "data"

    for path in (Places.home, Places.data_dir):
        path.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(Places.keras))
    monkeypatch.setenv("HOME", str(Places.home))
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    return Places


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network touched: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_npz_bytes(arrays))
    return path


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    header = (magic if magic is not None else MAGIC[array.ndim]).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_idx(directory: pathlib.Path, arrays: dict[str, np.ndarray], gz=("x_train", "y_test"),
               raw: dict[str, bytes] | None = None) -> dict[str, pathlib.Path]:
    """Writes the four IDX files (the keys in `gz` gzipped); `raw` replaces a file's bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, name in mnist_files.IDX_FILES.items():
        content = (raw or {}).get(key, _idx_bytes(arrays[key]))
        path = directory / (f"{name}.gz" if key in gz else name)
        path.write_bytes(gzip.compress(content) if key in gz else content)
        paths[key] = path
    return paths


def _load(name="mnist", places=None, **kwargs):
    kwargs.setdefault("verbose", False)
    return data.load_dataset(name, data_dir=str(places.data_dir), **kwargs)


def _assert_split(ds, arrays, num_val=10):
    num_train = NUM_TRAIN - num_val
    assert (ds.num_train, ds.num_val, ds.image_shape, ds.num_classes) == (num_train, num_val,
                                                                          (28, 28), 10)
    for x in (ds.x_train, ds.x_val):
        assert x.dtype == np.float32 and not x.flags.writeable and x.ctypes.data % 64 == 0
    np.testing.assert_array_equal(ds.x_train * 255, arrays["x_train"][:num_train])
    np.testing.assert_array_equal(ds.x_val * 255, arrays["x_train"][num_train:])  # the LAST ones
    assert ds.y_train.dtype == ds.y_val.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"][:num_train])
    np.testing.assert_array_equal(ds.y_val, arrays["y_train"][num_train:])


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- the pinned values ---------------------------------------------------------------


def test_canonical_constants_are_the_issue_values():
    assert {k: sha for k, (_, sha) in mnist_files.MNIST_ARRAYS.items()} == {
        "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    }
    assert {k: s for k, (s, _) in mnist_files.MNIST_ARRAYS.items()} == {
        "x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28),
        "y_test": (10000,),
    }
    assert mnist_files.FASHION_MNIST_SHAPES == {k: s for k, (s, _) in
                                                mnist_files.MNIST_ARRAYS.items()}
    # As pinned in Keras' keras/src/datasets/mnist.py.
    assert data._KERAS_MNIST_URL == (
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz")
    assert data._KERAS_MNIST_SHA256 == (
        "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1")


def test_hashing_mnist_sized_arrays_is_fast():
    images = np.random.default_rng(0).integers(0, 256, (70000, 28, 28), dtype=np.uint8)
    start = time.perf_counter()
    hashlib.sha256(images).hexdigest()
    assert time.perf_counter() - start < 1.0


# --- Keras' npz ----------------------------------------------------------------------------


def test_keras_cache_loads_verified_and_splits_the_last_images(places, tiny, capsys):
    npz = _write_npz(places.datasets / "mnist.npz", tiny)
    ds = _load(places=places, verbose=True)
    _assert_split(ds, tiny)
    assert ds.name == "mnist"
    assert ds.verified == "content verified: canonical MNIST arrays (SHA-256)"
    assert ds.source == (
        f"mnist from Keras' cache {npz}: 60 training images, last 10 held out for validation, "
        "test images unused; content verified: canonical MNIST arrays (SHA-256)")
    assert ds.describe()["verified"] == ds.verified
    assert ds.subset(20, 5).verified == ds.verified
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"dataset mnist -> Keras' cache {npz}; content verified" in err


def test_keras_cache_under_home_without_keras_home(places, tiny, monkeypatch):
    monkeypatch.delenv("KERAS_HOME")
    npz = _write_npz(places.home / ".keras" / "datasets" / "mnist.npz", tiny)
    assert str(npz) in _load(places=places).source


def test_keras_cache_needs_no_tensorflow_datasets(places, tiny, monkeypatch):
    _write_npz(places.datasets / "mnist.npz", tiny)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    ds = _load(places=places, val_size=7)
    assert (ds.num_train, ds.num_val) == (53, 7)
    with pytest.raises(BatchjaxError, match="val_size=60 must be between 1 and 59"):
        _load(places=places, val_size=60)


@pytest.mark.parametrize("change, match", [
    (lambda a: a["x_test"].__setitem__((3, 5, 5), a["x_test"][3, 5, 5] ^ 1),
     r"x_test differs from canonical MNIST \(SHA-256 [0-9a-f]{16}\.\.\., expected [0-9a-f]{16}"),
    (lambda a: a.pop("y_test"), r"has no y_test \(it holds x_train, y_train, x_test"),
    (lambda a: a.__setitem__("y_train", a["y_train"].astype(np.int64)),
     "y_train is int64, but MNIST stores uint8"),
    (lambda a: a.__setitem__("x_train", a["x_train"][:, :, :27]),
     r"x_train has shape \(60, 28, 27\), but MNIST's is \(60, 28, 28\)"),
    (lambda a: a.__setitem__("y_train", np.where(a["y_train"] == 9, 12, a["y_train"])),
     r"y_train has labels outside 0..9 \(max 12\)"),
])
def test_keras_cache_refuses_a_changed_copy(places, tiny, change, match):
    arrays = {k: a.copy() for k, a in tiny.items()}
    change(arrays)
    npz = _write_npz(places.datasets / "mnist.npz", arrays)
    with pytest.raises(BatchjaxError, match=match) as err:
        _load(places=places)
    assert _one_line(err).startswith(str(npz))


def test_keras_cache_not_an_npz(places, tiny):
    places.datasets.mkdir(parents=True)
    (places.datasets / "mnist.npz").write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(BatchjaxError, match="cannot read .*mnist.npz as an npz archive") as err:
        _load(places=places)
    assert "--download" in _one_line(err)


# --- IDX files ----------------------------------------------------------------------------


def test_idx_files_in_data_dir(places, tiny, capsys):
    _write_idx(places.data_dir, tiny)  # two gzipped, two plain
    ds = _load(places=places, verbose=True)
    _assert_split(ds, tiny)
    assert ds.source.startswith(f"mnist from IDX files in {places.data_dir}: 60 training images")
    assert ds.source.endswith("content verified: canonical MNIST arrays (SHA-256)")
    assert f"dataset mnist -> IDX files in {places.data_dir}; content verified" in (
        capsys.readouterr().err)


def test_gzip_is_detected_by_content_not_name(places, tiny):
    paths = _write_idx(places.data_dir, tiny, gz=())
    # A browser may store a gunzipped file under its .gz name, and the reverse happens too.
    paths["y_train"].rename(paths["y_train"].with_name(paths["y_train"].name + ".gz"))
    paths["x_test"].write_bytes(gzip.compress(paths["x_test"].read_bytes()))
    _assert_split(_load(places=places), tiny)


def test_keras_cache_comes_before_idx_files(places, tiny):
    _write_npz(places.datasets / "mnist.npz", tiny)
    _write_idx(places.data_dir, tiny, raw={"x_train": b"junk"})  # never read
    assert "Keras' cache" in _load(places=places).source


@pytest.mark.parametrize("key, content, match", [
    ("y_train", _idx_bytes(np.zeros((NUM_TRAIN, 28, 28), np.uint8)),
     r"has magic number 0x00000803, not 0x00000801 \(IDX, unsigned bytes, 1 dimension\)"),
    ("x_test", _idx_bytes(np.zeros(NUM_TEST, np.uint8), magic=0x803)[:8],
     "is truncated inside its IDX header"),
    ("x_train", _idx_bytes(np.zeros((NUM_TRAIN, 28, 27), np.uint8)),
     r"x_train has shape \(60, 28, 27\), but MNIST's is \(60, 28, 28\)"),
    ("x_train", _idx_bytes(np.zeros((NUM_TRAIN, 28, 28), np.uint8))[:-100],
     r"is truncated: its header promises \(60, 28, 28\) = 47,040 bytes of data but it holds "
     "46,940"),
    ("y_test", _idx_bytes(np.arange(NUM_TEST, dtype=np.uint8) % 10) + b"\0\0\0",
     r"has 3 bytes of trailing data after the 20 its header \(20,\) promises"),
    ("y_train", _idx_bytes(np.arange(NUM_TRAIN - 1, dtype=np.uint8) % 10),
     "has 60 images but .* has 59 labels; they do not belong together"),
    ("y_test", _idx_bytes(np.arange(NUM_TEST, dtype=np.uint8) % 11),
     r"y_test has labels outside 0..9 \(max 10\)"),
])
def test_idx_errors_name_the_file(places, tiny, key, content, match):
    paths = _write_idx(places.data_dir, tiny, raw={key: content})
    with pytest.raises(BatchjaxError, match=match) as err:
        _load(places=places)
    assert str(paths[key]) in _one_line(err)


def test_idx_truncated_gzip(places, tiny):
    paths = _write_idx(places.data_dir, tiny)
    paths["x_train"].write_bytes(paths["x_train"].read_bytes()[:-200])
    with pytest.raises(BatchjaxError, match=f"cannot read IDX file {paths['x_train']}") as err:
        _load(places=places)
    assert "EOFError" in _one_line(err)


def test_idx_changed_pixel_is_refused(places, tiny):
    arrays = {k: a.copy() for k, a in tiny.items()}
    arrays["x_train"][0, 0, 0] ^= 0xFF
    paths = _write_idx(places.data_dir, arrays)
    with pytest.raises(BatchjaxError, match="x_train differs from canonical MNIST") as err:
        _load(places=places)
    assert _one_line(err).startswith(f"{paths['x_train']}: ")


def test_idx_partial_set(places, tiny):
    paths = _write_idx(places.data_dir, tiny)
    paths["y_test"].unlink()
    with pytest.raises(BatchjaxError, match="but not t10k-labels-idx1-ubyte \\(plain or .gz\\)"):
        _load(places=places)


# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_fashion_mnist_from_data_dir_and_keras_cache(places, tiny, capsys):
    _write_idx(places.data_dir, tiny, gz=tuple(mnist_files.KEYS))
    ds = _load("fashion_mnist", places=places, verbose=True)
    _assert_split(ds, tiny)
    assert ds.name == "fashion_mnist"
    assert ds.verified == "shape and classes checked, content not verified"
    assert ds.source.endswith("content not verified")
    assert "dataset fashion_mnist -> IDX files in" in capsys.readouterr().err
    # Keras keeps the four .gz files in datasets/fashion-mnist/, and comes first.
    keras_dir = places.datasets / "fashion-mnist"
    _write_idx(keras_dir, tiny, gz=tuple(mnist_files.KEYS))
    assert ds.source.replace(f"IDX files in {places.data_dir}",
                             f"IDX files in Keras' cache {keras_dir}") == (
        _load("fashion_mnist", places=places).source)


def test_fashion_mnist_needs_every_class(places, tiny):
    labels = np.where(tiny["y_train"] == 4, 5, tiny["y_train"]).astype(np.uint8)
    paths = _write_idx(places.data_dir, tiny, raw={"y_train": _idx_bytes(labels)})
    with pytest.raises(BatchjaxError, match="y_train has no example of class 4") as err:
        _load("fashion_mnist", places=places)
    assert str(paths["y_train"]) in _one_line(err)


def test_fashion_mnist_not_found(places, no_network):
    with pytest.raises(BatchjaxError) as err:
        _load("fashion_mnist", places=places)
    message = _one_line(err)
    assert message.startswith("fashion_mnist not found: tfds fashion_mnist is not prepared in")
    assert f"no IDX files in Keras' cache {places.datasets / 'fashion-mnist'}" in message
    assert "--data-dir" in message and "batchjax[tfds-prepare]" in message


# --- not found, and auto ---------------------------------------------------------------------


def test_mnist_not_found_says_where_it_looked(places, no_network):
    start = time.perf_counter()
    with pytest.raises(BatchjaxError) as err:
        _load(places=places)
    assert time.perf_counter() - start < 10.0
    message = _one_line(err)
    assert message.startswith(f"mnist not found: tfds mnist is not prepared in {places.data_dir}")
    assert f"no Keras cache {places.datasets / 'mnist.npz'}" in message
    assert f"no IDX files in {places.data_dir}" in message
    for fix in ("download=True (--download)", "data_dir (--data-dir)", "'mnist-5k'"):
        assert fix in message
    assert not places.keras.exists()  # looking writes nothing


def test_auto_takes_keras_cache_then_idx_then_bundled(places, tiny, capsys, no_network):
    npz = _write_npz(places.datasets / "mnist.npz", tiny)
    _write_idx(places.data_dir, tiny)
    ds = data.load_dataset("auto", data_dir=str(places.data_dir))
    assert ds.name == "mnist" and ds.source.startswith(f"auto -> mnist from Keras' cache {npz}")
    assert ds.describe()["verified"] == "content verified: canonical MNIST arrays (SHA-256)"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"dataset auto -> mnist (tfds mnist is not prepared in {places.data_dir}; using " \
           f"Keras' cache {npz}; content verified: canonical MNIST arrays (SHA-256))" in err

    npz.unlink()
    ds = data.load_dataset("auto", data_dir=str(places.data_dir), verbose=False)
    assert ds.source.startswith(f"auto -> mnist from IDX files in {places.data_dir}")

    ds = data.load_dataset("auto", data_dir=str(places.home), verbose=False)
    assert ds.name == "mnist-5k" and "verified" not in ds.describe()
    assert f"no Keras cache {npz}; no IDX files in {places.home}]" in ds.source


def test_auto_refuses_a_tampered_keras_cache(places, tiny):
    arrays = {k: a.copy() for k, a in tiny.items()}
    arrays["y_train"][:2] = arrays["y_train"][1::-1]  # two labels swapped
    _write_npz(places.datasets / "mnist.npz", arrays)
    with pytest.raises(BatchjaxError, match="y_train differs from canonical MNIST"):
        data.load_dataset("auto", data_dir=str(places.data_dir), verbose=False)


# --- tfds comes first, and is checked in any order ----------------------------------------------


def test_records_hash_ignores_order_but_not_content(tiny):
    x, y = tiny["x_train"], tiny["y_train"]
    reference = mnist_files.records_sha256(x, y)
    order = np.random.default_rng(1).permutation(len(x))
    assert mnist_files.records_sha256(x[order], y[order]) == reference
    assert mnist_files.records_sha256(x, np.roll(y, 1)) != reference
    changed = x.copy()
    changed[7, 3, 3] ^= 1
    assert mnist_files.records_sha256(changed, y) != reference


@pytest.fixture(scope="module")
def tfds_mnist(tmp_path_factory):
    """A tfds data dir with a genuine array_record `mnist` of the tiny training arrays."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pil_image = pytest.importorskip("PIL.Image")
    data_dir = tmp_path_factory.mktemp("tfds")
    arrays = _tiny_arrays()
    mnist_cls = tfds.builder_cls("mnist")

    with tfds.core.registered.skip_registration():

        class LocalMnist(mnist_cls):
            name = "mnist"

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, (image, label) in enumerate(zip(arrays["x_train"], arrays["y_train"])):
                    yield i, {"image": pil_image.fromarray(image), "label": int(label)}

    LocalMnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_comes_first_and_is_verified(tfds_mnist, places, tiny, monkeypatch, capsys):
    _write_npz(places.datasets / "mnist.npz", tiny)  # present, but tfds wins
    monkeypatch.setattr(mnist_files, "MNIST_TRAIN_RECORDS_SHA256",
                        mnist_files.records_sha256(tiny["x_train"], tiny["y_train"]))
    ds = data.load_dataset("mnist", data_dir=str(tfds_mnist))
    assert ds.source.startswith(f"tfds mnist 3.0.1 from {tfds_mnist}")
    assert ds.verified == "content verified: canonical MNIST training records " \
                          "(order-independent SHA-256)"
    assert "tfds mnist: content verified" in capsys.readouterr().err
    # Same records as the npz (tfds reorders them), none left out.
    loaded = sorted(x.tobytes() for x in np.concatenate([ds.x_train, ds.x_val]) * 255)
    assert loaded == sorted(x.astype(np.float32).tobytes() for x in tiny["x_train"])

    monkeypatch.setattr(mnist_files, "MNIST_TRAIN_RECORDS_SHA256", "0" * 64)
    with pytest.raises(BatchjaxError, match=f"tfds mnist in {tfds_mnist}: the training records "
                                            "differ from canonical MNIST") as err:
        data.load_dataset("mnist", data_dir=str(tfds_mnist), verbose=False)
    _one_line(err)


# --- the download -----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append(self.path)
        if self.path not in ("/mnist.npz", "/cut.npz", "/stall.npz"):
            self.send_error(404)
            return
        body = server.body
        half = len(body) // 2
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:half])
        self.wfile.flush()
        if self.path == "/cut.npz":
            return  # HTTP/1.0: the connection closes with half the promised bytes sent
        if self.path == "/stall.npz":
            server.release.wait(10)
            return
        time.sleep(0.05)
        server.listing_midway = sorted(os.listdir(server.watch))
        self.wfile.write(body[half:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(places, tiny):
    """A local server of a tiny mnist.npz; URL base and expected hash injected into `data`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.body = _npz_bytes(tiny)
    httpd.requests, httpd.watch, httpd.release = [], places.datasets, threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.sha256 = hashlib.sha256(httpd.body).hexdigest()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def serve(monkeypatch, server):
    def point_at(path="/mnist.npz", sha256=None):
        monkeypatch.setattr(data, "_KERAS_MNIST_URL", server.base + path)
        monkeypatch.setattr(data, "_KERAS_MNIST_SHA256", sha256 or server.sha256)
    return point_at


def test_download_verifies_and_renames_into_keras_cache(places, tiny, server, serve, capsys,
                                                        monkeypatch):
    serve()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # draw the progress bar
    ds = _load(places=places, download=True, verbose=True)
    _assert_split(ds, tiny)
    target = places.datasets / "mnist.npz"
    assert ds.source.startswith(f"mnist from Keras' cache {target} (downloaded now): 60 ")
    assert ds.verified == "content verified: canonical MNIST arrays (SHA-256)"
    assert os.listdir(places.datasets) == ["mnist.npz"]
    assert target.read_bytes() == server.body
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as a file Keras downloads
    # While it downloaded, only the temporary file was there.
    assert len(server.listing_midway) == 1
    assert server.listing_midway[0].startswith(".mnist.npz.")
    assert server.listing_midway[0].endswith(".part")
    err = capsys.readouterr().err
    assert f"batchjax: downloading {server.base}/mnist.npz (0.1 MB)\n" in err
    assert "\rbatchjax: [" in err and "] 100% of 0.1 MB\n" in err
    assert "batchjax: downloaded 0.1 MB in " in err
    # The next load reads the cache: no second request.
    _load(places=places, download=True)
    assert server.requests == ["/mnist.npz"]


def _assert_cache_empty(places):
    assert not places.datasets.exists() or os.listdir(places.datasets) == []


def test_download_cut_off_keeps_nothing(places, server, serve):
    serve("/cut.npz")
    size = len(server.body)
    with pytest.raises(BatchjaxError, match=f"stopped at {size // 2:,} of {size:,} bytes") as err:
        _load(places=places, download=True)
    assert "nothing was kept" in _one_line(err)
    _assert_cache_empty(places)


def test_download_hash_mismatch_keeps_nothing(places, server, serve):
    serve(sha256="ab" * 32)
    with pytest.raises(BatchjaxError) as err:
        _load(places=places, download=True)
    message = _one_line(err)
    assert f"has SHA-256 {server.sha256}, expected {'ab' * 32}; it was not kept" in message
    _assert_cache_empty(places)


def test_download_http_error(places, serve):
    serve("/missing.npz")
    with pytest.raises(BatchjaxError, match=r"downloading .*/missing.npz failed after 0 bytes "
                                            r"\(HTTPError: HTTP Error 404"):
        _load(places=places, download=True)
    _assert_cache_empty(places)


def test_download_stalled_midway_times_out(places, serve, monkeypatch):
    serve("/stall.npz")
    monkeypatch.setattr(data, "_DOWNLOAD_TIMEOUT_S", 0.3)
    start = time.perf_counter()
    with pytest.raises(BatchjaxError, match="TimeoutError: timed out"):
        _load(places=places, download=True)
    assert time.perf_counter() - start < 3.0
    _assert_cache_empty(places)


def test_download_interrupted_removes_the_temporary_file(places, serve, monkeypatch):
    serve()

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.os, "fsync", interrupt)  # after every byte is in the temp file
    with pytest.raises(KeyboardInterrupt):
        _load(places=places, download=True)
    _assert_cache_empty(places)


def test_download_from_a_server_that_never_answers(places, monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # connections complete in the kernel; nothing ever reads or answers
    try:
        monkeypatch.setattr(data, "_KERAS_MNIST_URL",
                            f"http://127.0.0.1:{silent.getsockname()[1]}/mnist.npz")
        monkeypatch.setattr(data, "_DOWNLOAD_TIMEOUT_S", 0.3)
        start = time.perf_counter()
        with pytest.raises(BatchjaxError, match="failed after 0 bytes .*timed out") as err:
            _load(places=places, download=True)
        assert time.perf_counter() - start < 3.0
        _one_line(err)
    finally:
        silent.close()
    _assert_cache_empty(places)


def test_download_from_a_closed_port_fails_at_once(places, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setattr(data, "_KERAS_MNIST_URL", f"http://127.0.0.1:{port}/mnist.npz")
    start = time.perf_counter()
    with pytest.raises(BatchjaxError, match=f"cannot reach 127.0.0.1:{port} to download Keras' "
                                            "mnist.npz") as err:
        _load(places=places, download=True)
    assert time.perf_counter() - start < 3.0
    assert "'mnist-5k'" in _one_line(err)
    assert not places.keras.exists()


def test_download_into_an_unwritable_cache(places, server, serve, monkeypatch, tmp_path):
    # A path under a regular file cannot be created, even by root (chmod would not stop root).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KERAS_HOME", str(blocker / "keras"))
    serve()
    with pytest.raises(BatchjaxError, match=f"cannot write to Keras' cache {blocker}/keras/"
                                            "datasets .*; set KERAS_HOME to a writable") as err:
        _load(places=places, download=True)
    _one_line(err)
    assert server.requests == []  # nothing was fetched
