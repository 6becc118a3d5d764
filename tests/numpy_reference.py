"""Independent float64 NumPy references: forward passes, im2col, FOOF.

Nothing here calls neuron_optax; the tests compare the library against these.
"""

from __future__ import annotations

import itertools

import numpy as np


def augment(x: np.ndarray) -> np.ndarray:
  return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)


def im2col(x: np.ndarray, kernel_size, strides, padding, dilation=None) -> np.ndarray:
  """Patches of an NHWC-style input by explicit loops: ``(N, *out_spatial, prod(window) * C)``.

  ``padding`` is a list of ``(low, high)`` pairs; zeros are padded. Each patch is
  flattened in the kernel's ``(*window, C)`` order.
  """
  x = np.asarray(x, np.float64)
  rank = len(kernel_size)
  dilation = dilation or (1,) * rank
  x = np.pad(x, [(0, 0)] + list(padding) + [(0, 0)])
  spatial = x.shape[1:-1]
  eff = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  out = [(s - e) // st + 1 for s, e, st in zip(spatial, eff, strides)]
  patches = np.zeros((x.shape[0],) + tuple(out) + (int(np.prod(kernel_size)) * x.shape[-1],))
  for pos in itertools.product(*[range(o) for o in out]):
    cols = []
    for offset in itertools.product(*[range(k) for k in kernel_size]):
      idx = tuple(p * st + o * d for p, st, o, d in zip(pos, strides, offset, dilation))
      cols.append(x[(slice(None),) + idx])
    patches[(slice(None),) + pos] = np.concatenate(cols, axis=-1)
  return patches


def same_padding(spatial, kernel_size, strides, dilation=None):
  dilation = dilation or (1,) * len(kernel_size)
  pads = []
  for s, k, st, d in zip(spatial, kernel_size, strides, dilation):
    out = -(-s // st)
    total = max((out - 1) * st + (k - 1) * d + 1 - s, 0)
    pads.append((total // 2, total - total // 2))
  return pads


def ema_schedule(num_steps: int, inverse_every: int, stats_window: int | None):
  """Per step: (update statistics?, re-factorise?) exactly as design.md defines them."""
  flags = []
  for t in range(num_steps):
    refactor = t % inverse_every == 0
    if stats_window is None:
      update = True
    else:
      next_refactor = t if refactor else (t // inverse_every + 1) * inverse_every
      update = next_refactor - stats_window < t <= next_refactor
    flags.append((update, refactor))
  return flags


def foof_directions(a_batches, grads, damping, decay, inverse_every, stats_window):
  """FOOF directions for a sequence of steps from explicit batch second moments."""
  directions = []
  weights, total = 0.0, 0.0
  inverse = None
  for t, (update, refactor) in enumerate(ema_schedule(len(a_batches), inverse_every, stats_window)):
    if update:
      weights = decay * weights + 1.0
      total = decay * total + a_batches[t]
    if refactor:
      a = total / weights
      inverse = np.linalg.inv(a + damping * np.eye(a.shape[0]))
    directions.append(inverse @ grads[t])
  return directions
