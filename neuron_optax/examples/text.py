"""A tiny character-level text corpus that ships with Python: no download.

The corpus is the text of Python's own reference documentation that the
standard library carries for ``help()``: ``pydoc_data.topics.topics`` (about
465,000 characters on CPython 3.11; the exact text depends on the Python
version). It is large enough to train a small character-level language model
for a few hundred steps without repeating, which is what the Transformer
tests and ``benchmarks/transformer_lm.py`` need.

Vocabulary. A fixed one, so that model shapes do not depend on the Python
version: the newline and the 95 printable ASCII characters (96 symbols, ids
``0..95`` in that order). :func:`encode` first replaces typographic quotes,
dashes and the ellipsis by their ASCII spelling, then any other character
outside the vocabulary (tabs, ``ß``, ``°``, ...) by ``"?"``.

Batches are ``(batch_size, seq_len + 1)`` int32 windows: the model reads
``window[:, :-1]`` and predicts ``window[:, 1:]``.

* :func:`batches` iterates over epochs: each epoch cuts the token stream into
  non-overlapping windows starting at a random offset, shuffles them and
  yields ``steps_per_epoch(...)`` full batches (the last partial batch is
  dropped, so a jitted step compiles once and FNGD's coefficient table has a
  fixed number of rows per epoch).
* :func:`sample_windows` draws windows at uniformly random start positions
  (with replacement), e.g. for a held-out evaluation batch.

Example::

    from neuron_optax.examples import text

    tokens = text.encode(text.python_docs())
    train, valid = text.split(tokens, valid_fraction=0.1)
    for window in text.batches(train, batch_size=32, seq_len=64, seed=0, epochs=1):
      inputs, targets = window[:, :-1], window[:, 1:]
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

VOCABULARY: str = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE: int = len(VOCABULARY)
UNKNOWN: str = "?"

_ASCII_SPELLING = {"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "..."}
_IDS = {c: i for i, c in enumerate(VOCABULARY)}


def python_docs(max_chars: int | None = None) -> str:
  """The text of ``pydoc_data.topics.topics`` (topics in sorted order, blank line between).

  Args:
    max_chars: keep only the first ``max_chars`` characters (``None``: all).
  """
  try:
    from pydoc_data.topics import topics
  except ImportError as error:  # some distributions split the standard library
    raise ImportError(
      "neuron_optax.examples.text needs the standard-library module pydoc_data (Python's help() "
      "topics); your Python installation does not include it (on Debian/Ubuntu it is in "
      "the libpython3.X-stdlib package)."
    ) from error
  corpus = "\n\n".join(topics[name].strip("\n") for name in sorted(topics)) + "\n"
  if max_chars is not None:
    if max_chars < 1:
      raise ValueError(f"max_chars must be None or >= 1, got {max_chars!r}.")
    corpus = corpus[:max_chars]
  return corpus


def encode(string: str) -> np.ndarray:
  """Character ids ``(len,)`` int32 in :data:`VOCABULARY` (see the module docstring)."""
  string = "".join(_ASCII_SPELLING.get(c, c) for c in string)
  unknown = _IDS[UNKNOWN]
  return np.fromiter((_IDS.get(c, unknown) for c in string), dtype=np.int32, count=len(string))


def decode(ids) -> str:
  """Inverse of :func:`encode` for any sequence of ids in ``[0, VOCAB_SIZE)``."""
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}), got range [{ids.min()}, {ids.max()}].")
  return "".join(VOCABULARY[i] for i in ids.reshape(-1).tolist())


def split(tokens: np.ndarray, valid_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """``(train, valid)``: the last ``valid_fraction`` of the stream is held out (no shuffling)."""
  if not 0 < valid_fraction < 1:
    raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}.")
  cut = len(tokens) - int(round(len(tokens) * valid_fraction))
  return tokens[:cut], tokens[cut:]


def _check_window(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
  for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  if np.ndim(tokens) != 1:
    raise ValueError(f"tokens must be a 1-D array of ids, got shape {np.shape(tokens)}.")
  window = seq_len + 1
  if len(tokens) < window:
    raise ValueError(f"a corpus of {len(tokens)} tokens has no window of seq_len + 1 = {window}.")
  return window


def steps_per_epoch(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
  """Full batches per epoch of :func:`batches` (the same for every epoch and offset)."""
  window = _check_window(tokens, batch_size, seq_len)
  windows = (len(tokens) - (window - 1)) // window  # fits at any offset in [0, window)
  return windows // batch_size


def batches(
  tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, epochs: int | None = 1
) -> Iterator[np.ndarray]:
  """``(batch_size, seq_len + 1)`` int32 windows, epoch by epoch (``epochs=None``: forever).

  Each epoch starts the non-overlapping windows at a random offset in
  ``[0, seq_len]``, shuffles them and yields exactly
  ``steps_per_epoch(tokens, batch_size, seq_len)`` batches. Deterministic in
  ``seed``.
  """
  window = _check_window(tokens, batch_size, seq_len)
  steps = steps_per_epoch(tokens, batch_size, seq_len)
  if steps == 0:
    raise ValueError(
      f"a corpus of {len(tokens)} tokens has fewer than batch_size={batch_size} windows of {window} tokens."
    )
  tokens = np.asarray(tokens, np.int32)
  windows = (len(tokens) - (window - 1)) // window
  rng = np.random.default_rng(seed)
  epoch = 0
  while epochs is None or epoch < epochs:
    offset = int(rng.integers(window))
    cut = tokens[offset : offset + windows * window].reshape(windows, window)
    order = rng.permutation(windows)
    for step in range(steps):
      yield cut[order[step * batch_size : (step + 1) * batch_size]]
    epoch += 1


def sample_windows(
  tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int | np.random.Generator = 0
) -> np.ndarray:
  """``(batch_size, seq_len + 1)`` int32 windows at uniformly random starts (with replacement)."""
  window = _check_window(tokens, batch_size, seq_len)
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - window + 1, size=batch_size)
  return np.asarray(tokens, np.int32)[starts[:, None] + np.arange(window)]
