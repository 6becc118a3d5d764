"""Contraction orders: the cheapest way to apply a layer's preconditioner.

FOOF and KFAC multiply a ``d_in × d_in`` matrix ``M`` (and for KFAC a
``d_out × d_out`` matrix on the right) into the layer's gradient ``∇W``; a
diagonal ``M`` (an embedding's, kept as its diagonal) scales its rows. The
gradient is ``Āᵀ Cot`` over the ``R`` recorded rows, so the product can also be
taken from the rows: ``(M Āᵀ) Cot``, cheaper when the batch has fewer rows than
the layer is wide. This module chooses the order; the methods only say which
matrices to apply.

The optax contract: a transform's output is a function of the incoming
``updates``. The rows give ``M ∇W`` only when the incoming gradient *is* the
recorded one; ``"auto"`` checks that at run time and ``"rows"`` assumes it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax import hyperparams
from neuron_optax.layer_stats import LayerStats

Contraction = Literal["auto", "gradient", "rows"]
CONTRACTIONS = ("auto", "gradient", "rows")


def validate_contraction(transform: str, contraction: str) -> None:
  hyperparams.check_choice(transform, "contraction", contraction, CONTRACTIONS)


def use_rows(stats: LayerStats, contraction: Contraction) -> bool:
  """Whether to take ``M ∇W`` from the recorded rows (``"auto"``: when that is cheaper).

  ``(M Āᵀ) Cot`` costs ``rows · d_in · (d_in + d_out)`` multiply-adds; ``M ∇W``
  costs ``d_in² · d_out``. Statistics without rows (accumulated moments) always
  use the gradient.
  """
  if contraction == "gradient" or not stats.has_rows or stats.kind == "embed":
    return False  # an embedding's input factor is diagonal: the gradient order is a row scaling
  if contraction == "rows":
    return True
  return stats.num_rows * (stats.d_in + stats.d_out) < stats.d_in * stats.d_out


def _rows(stats: LayerStats, dtype) -> tuple[jax.Array, jax.Array]:
  """``(Ā, Cot)``: the recorded input rows (with the bias column) and output cotangents, 2-D."""
  a = stats.augmented_inputs(dtype).reshape(-1, stats.d_in)
  cot = stats.cotangents.astype(dtype).reshape(-1, stats.d_out)
  return a, cot


def recorded_gradient(stats: LayerStats, dtype) -> jax.Array:
  """``Āᵀ Cot``: the layer's gradient matrix recomputed from the recorded rows (no im2col for convolutions)."""
  cot = stats.cotangents.astype(dtype)
  kernel = stats.kernel_gradient(cot)
  if getattr(stats, "tied", None) is not None:  # an embedding tied to an output layer: both uses
    kernel = kernel + stats.tied_gradient(dtype)
  if not stats.has_bias:
    return kernel
  return jnp.concatenate([kernel, jnp.sum(cot.reshape(-1, cot.shape[-1]), axis=0)[None]], axis=0)


def recorded_gradient_matches(gradient: jax.Array, stats: LayerStats, scale: jax.Array | float = 1.0) -> jax.Array:
  """Whether the incoming gradient is ``scale`` times the recorded ``Āᵀ Cot`` (a randomised check, traced).

  Compares ``rᵀ ∇W s`` with ``rᵀ Āᵀ (Cot s)`` for fixed Gaussian probes
  ``r, s``: ``O(d_in·d_out + rows·(d_in + d_out))`` (for convolutions one
  backward-filter convolution with a single output channel), against the
  ``rows·d_in·(d_in + d_out)`` of the products it guards. Both sides agree to
  round-off when nothing changed the gradient; a change ``Δ`` (clipping, weight
  decay, accumulation, another optimiser) moves the left side by
  ``rᵀΔs ~ ‖Δ‖_F``. The tolerance is ``√ε·‖∇W‖_F`` (``ε`` of the dtype): a
  change smaller than that relative size may go unnoticed, and its effect on
  the direction is of that size.
  """
  d_in, d_out = gradient.shape
  probes = np.random.default_rng(d_in * 1_000_003 + d_out)
  r = jnp.asarray(probes.standard_normal(d_in), gradient.dtype)
  s = jnp.asarray(probes.standard_normal(d_out), gradient.dtype)
  projected = r @ gradient @ s
  if stats.kind == "embed":  # a scatter-add (of both uses, if tied): the recorded gradient is cheap
    from_rows = r @ recorded_gradient(stats, gradient.dtype) @ s
  else:
    cot_s = stats.cotangents.astype(gradient.dtype) @ s  # (n, P)
    from_rows = r[: d_in - int(stats.has_bias)] @ stats.kernel_gradient(cot_s[..., None])[:, 0]
    if stats.has_bias:
      from_rows = from_rows + r[-1] * jnp.sum(cot_s)
  norm = jnp.sqrt(jnp.sum(gradient * gradient))
  tolerance = np.sqrt(np.finfo(gradient.dtype).eps) * norm
  return jnp.isfinite(norm) & (jnp.abs(projected - scale * from_rows) <= tolerance)


def _gradient_product(matrix: jax.Array, gradient: jax.Array, stats: LayerStats) -> jax.Array:
  gradient = gradient.astype(matrix.dtype)
  if matrix.ndim == 1:  # a diagonal factor kept as its diagonal (embeddings)
    return matrix[:, None] * gradient
  if not stats.has_bias or jax.default_backend() == "cpu":
    return matrix @ gradient
  # On accelerators M [K; bᵀ] = M[:, :-1] K + M[:, -1] bᵀ: the kernel and bias gradients arrive as
  # separate leaves and are never copied into one (d_in+1)-row matrix, and the GEMM has aligned
  # d_in-sized operands (H200, MLP 3x1000: FOOF's plain step 371 -> 291 µs of kernels). XLA:CPU runs
  # the single product faster (the split form cost 15-25 % more there).
  return matrix[:, :-1] @ gradient[:-1] + matrix[:, -1:] * gradient[-1:]


def _from_rows_if_recorded(
  contraction: Contraction, gradient: jax.Array, stats: LayerStats, dtype, from_rows, from_gradient
) -> jax.Array:
  a, cot = _rows(stats, dtype)
  if contraction == "rows":
    return from_rows(a, cot)
  matches = recorded_gradient_matches(gradient.astype(dtype), stats)
  return jax.lax.cond(matches, lambda: from_rows(a, cot), from_gradient)


def left_precondition(matrix: jax.Array, gradient: jax.Array, stats: LayerStats, contraction: Contraction) -> jax.Array:
  """``matrix @ ∇W`` for the incoming gradient ``∇W``, in the cheaper order where that is exact.

  ``"gradient"``: ``M ∇W``. ``"rows"``: ``(M Āᵀ) Cot`` from the recorded rows,
  whatever the incoming gradient is (an opt-in: right only when the incoming
  updates are the recorded gradient, i.e. the transform comes first in its
  chain, outside ``MultiSteps``). ``"auto"``: the rows where they are cheaper
  **and** the incoming gradient is the recorded one
  (:func:`recorded_gradient_matches`, one ``lax.cond``), else ``M ∇W``.
  """
  if not use_rows(stats, contraction):
    return _gradient_product(matrix, gradient, stats)
  return _from_rows_if_recorded(
    contraction,
    gradient,
    stats,
    matrix.dtype,
    lambda a, cot: (matrix @ a.T) @ cot,
    lambda: _gradient_product(matrix, gradient, stats),
  )


def both_sides_from_rows(stats: LayerStats, contraction: Contraction) -> bool:
  """Whether ``(A⁻¹Āᵀ)(Cot G⁻¹)`` is the cheapest order of ``A⁻¹ ∇W G⁻¹``.

  Multiply-adds with ``R`` rows: ``R(d_in² + d_out² + d_in·d_out)`` for both
  sides from the rows, against ``d_in·d_out·(d_in + d_out)`` from the gradient
  and ``R·d_in(d_in + d_out) + d_in·d_out²`` with only the ``A`` side from the
  rows; it wins when the batch has fewer rows than the layer has inputs and
  outputs (an MLP at batch 100).
  """
  if contraction == "gradient" or not stats.has_rows or stats.kind == "embed":
    return False
  rows = stats.num_rows
  d_in, d_out = stats.d_in, stats.d_out
  both = rows * (d_in * d_in + d_out * d_out + d_in * d_out)
  left = rows * d_in * (d_in + d_out) + d_in * d_out * d_out
  if contraction == "rows":
    return both < left
  return both < min(left, d_in * d_out * (d_in + d_out))


def two_sided_precondition(
  left: jax.Array, gradient: jax.Array, right: jax.Array, stats: LayerStats, contraction: Contraction
) -> jax.Array:
  """``left @ ∇W @ right`` in the cheapest order that is exact (rows as in :func:`left_precondition`)."""
  if not both_sides_from_rows(stats, contraction):
    return left_precondition(left, gradient, stats, contraction) @ right
  return _from_rows_if_recorded(
    contraction,
    gradient,
    stats,
    left.dtype,
    lambda a, cot: (left @ a.T) @ (cot @ right),
    lambda: left_precondition(left, gradient, stats, "gradient") @ right,
  )
