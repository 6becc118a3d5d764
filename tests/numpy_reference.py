"""Independent float64 NumPy references: forward passes, im2col, FOOF, KFAC, natural gradient, FNGD.

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


def foof_directions(a_batches, grads, damping, decay, inverse_every, stats_window, return_conditions=False):
  """FOOF directions for a sequence of steps from explicit batch second moments.

  With ``return_conditions``, also the condition number of the ``A + λI`` each step applies.
  """
  directions, conditions = [], []
  weights, total = 0.0, 0.0
  inverse = None
  for t, (update, refactor) in enumerate(ema_schedule(len(a_batches), inverse_every, stats_window)):
    if update:
      weights = decay * weights + 1.0
      total = decay * total + a_batches[t]
    if refactor:
      a = total / weights
      inverse = np.linalg.inv(a + damping * np.eye(a.shape[0]))
      condition = np.linalg.cond(a + damping * np.eye(a.shape[0]))
    directions.append(inverse @ grads[t])
    conditions.append(condition)
  return (directions, conditions) if return_conditions else directions


def kfac_directions(a_batches, g_batches, grads, damping, decay, inverse_every, stats_window, mode):
  """KFAC directions over steps with the explicit Kronecker product of the damped factors.

  Returns ``(directions, conditions)``: the conditions are those of the damped curvature
  (``(A + π√λ I)⊗(G + √λ/π I)`` or ``A⊗G + λI``) each step applies.
  """
  weight, a_sum, g_sum = 0.0, 0.0, 0.0
  directions, conditions = [], []
  for t, (update, refactor) in enumerate(ema_schedule(len(grads), inverse_every, stats_window)):
    if update:
      weight = decay * weight + 1.0
      a_sum = decay * a_sum + a_batches[t]
      g_sum = decay * g_sum + g_batches[t]
    if refactor:
      a, g = a_sum / weight, g_sum / weight
      eye_a, eye_g = np.eye(a.shape[0]), np.eye(g.shape[0])
      if mode == "heuristic":
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
        curvature = np.kron(a + pi * np.sqrt(damping) * eye_a, g + np.sqrt(damping) / pi * eye_g)
      else:
        curvature = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
    directions.append(np.linalg.solve(curvature, grads[t].reshape(-1)).reshape(grads[t].shape))
    conditions.append(np.linalg.cond(curvature))
  return directions, conditions


def per_example_gradients(inputs, cotangents):
  """``ψ_i = ā_i (n·cot_i)ᵀ`` of a dense layer with one position: ``(n, d_in, d_out)``."""
  n = inputs.shape[0]
  return np.einsum("ni,no->nio", inputs, n * cotangents)


def natural_gradient_directions(psis, grads, damping):
  """``(F + λI)⁻¹ ∇`` for ``F = (1/n) Σ_i ψ_i ψ_iᵀ`` over the layers given (their ψ concatenated).

  ``psis`` and ``grads`` are lists over layers; returns the directions per layer and the
  condition number of ``F + λI``.
  """
  n = psis[0].shape[0]
  columns = np.concatenate([psi.reshape(n, -1) for psi in psis], axis=1)
  fisher = columns.T @ columns / n + damping * np.eye(columns.shape[1])
  flat = np.linalg.solve(fisher, np.concatenate([g.reshape(-1) for g in grads]))
  out, start = [], 0
  for g in grads:
    out.append(flat[start : start + g.size].reshape(g.shape))
    start += g.size
  return out, np.linalg.cond(fisher)


def fngd_coefficients(psi, alpha):
  """``c = (1/n)(I + K/λ)⁻¹ 1`` with ``K = ΨΨᵀ``, ``λ = α‖K‖_F`` (``1/n`` for ``K = 0``)."""
  psi = psi.reshape(psi.shape[0], -1)
  n = psi.shape[0]
  gram = psi @ psi.T
  lam = alpha * np.linalg.norm(gram, "fro")
  if lam == 0:
    return np.full(n, 1.0 / n)
  return np.linalg.solve(np.eye(n) + gram / lam, np.ones(n) / n)
