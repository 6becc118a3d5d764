"""Kronecker factors of one layer's batch and the heuristic (π) damping.

``A_batch = mean_r ā_r ā_rᵀ`` and ``G_batch = mean_r Σ_s g_sr g_srᵀ`` of the
recorded rows, and Martens & Grosse's factored Tikhonov damping (2015,
section 6.3): ``π = sqrt((tr A / dim A) / (tr G / dim G))``, ``A`` damped by
``π√λ`` and ``G`` by ``√λ/π``. Shared by :func:`neuron_optax.kfac`,
:func:`neuron_optax.foof` and the diagnostics.

Layers shared over the ``P`` positions of an example (tokens, convolution
patches) have two Kronecker approximations (Eschenhagen et al., NeurIPS 2023):

* ``"expand"`` (the library's default): every position is a row of its own,
  ``A = mean_{i,p} ā_ip ā_ipᵀ``, ``G = Σ_s mean_{i,p} g_sip g_sipᵀ``;
* ``"reduce"``: positions are pooled first, ``ā_i = mean_p ā_ip`` and
  ``ĝ_si = Σ_p g_sip``: ``A = mean_i ā_i ā_iᵀ``, ``G = Σ_s mean_i ĝ_si ĝ_siᵀ / P``.

Both keep the library's scale (the Fisher divided by ``P``: expand's factors are
Eschenhagen et al.'s ``A``, ``G / P``; reduce's are theirs with ``G / P``), so a
damping means the same under either, and for ``P = 1`` they coincide. Reduce
costs ``n`` rows instead of ``n·P``.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax._src.layer_stats import LayerMoments, LayerStats

WeightSharing = Literal["expand", "reduce"]
WEIGHT_SHARING = ("expand", "reduce")


def check_statistics_rows(method: str, rows: Any) -> None:
  """Construction-time check of ``statistics_rows``: a positive integer or ``None``."""
  if rows is not None and (isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1):
    raise ValueError(f"{method}: statistics_rows={rows!r}: expected a positive integer or None (every row).")


def require_rows(stats: LayerStats | LayerMoments, method: str, option: str = "weight_sharing='reduce'") -> None:
  """Trace-time error where ``option`` needs the recorded rows but the statistics are moments only."""
  if not stats.has_rows:
    raise ValueError(
      f"{method}: {option} needs each layer's recorded rows, but these statistics are second moments "
      "without rows (nox.accumulate_micro_batches keeps the expand moments of all rows). Leave the "
      "option at its default with accumulated micro-batches."
    )


def row_count(stats: LayerStats, weight_sharing: WeightSharing = "expand") -> int:
  """Rows of the factors' outer products: ``n·P`` for expand, ``n`` for reduce."""
  return stats.batch_size if weight_sharing == "reduce" else stats.num_rows


def row_sample(count: jax.Array, total: int, rows: int | None) -> jax.Array | None:
  """``rows`` of ``total`` row indices drawn uniformly without replacement, fresh at every step ``count``
  (the same key for every layer of a step, so a step is reproducible); ``None`` for every row."""
  if rows is None or rows >= total:
    return None
  key = jax.random.fold_in(jax.random.key(0x0F00F), count)
  return jax.random.choice(key, total, (rows,), replace=False)


def statistics_sample(
  stats: LayerStats | LayerMoments, count: jax.Array, rows: int | None, weight_sharing: WeightSharing, method: str
) -> jax.Array | None:
  """The rows a step's factors are formed from with ``statistics_rows=rows`` (:func:`row_sample`);
  ``None`` (every row) without it and for embeddings (a diagonal ``A``: cheap with every row)."""
  if rows is None or stats.kind == "embed":
    return None
  require_rows(stats, method, "statistics_rows")
  return row_sample(count, row_count(stats, weight_sharing), rows)


def input_rows(stats: LayerStats, dtype, weight_sharing: WeightSharing = "expand") -> jax.Array:
  """The rows whose mean outer product is ``A_batch``: ``(n·P, d_in)`` for expand, the per-example
  means over positions ``(n, d_in)`` for reduce (bias column included)."""
  x = stats.augmented_inputs(dtype)
  if weight_sharing == "reduce":
    x = jnp.mean(x, axis=1)
  return x.reshape(-1, x.shape[-1])


def cotangent_rows(stats: LayerStats, dtype, weight_sharing: WeightSharing = "expand") -> jax.Array:
  """The rows whose mean outer product, summed over the label sets, is ``G_batch``: ``(S, n·P, d_out)``
  for expand, ``Σ_p g_sip / √P`` ``(S, n, d_out)`` for reduce (the ``√P`` keeps the library's scale)."""
  g = stats.per_example_cotangents(dtype)  # (S, n, P, d_out)
  if weight_sharing == "reduce":
    return jnp.sum(g, axis=2) / jnp.sqrt(jnp.asarray(g.shape[2], g.dtype))
  return g.reshape(g.shape[0], -1, g.shape[-1])


def _sampled(stats, weight_sharing, sample, method, option) -> bool:
  """Whether the factor is formed here from (pooled or sampled) rows rather than read from ``stats``."""
  if stats.kind == "embed" or (weight_sharing == "expand" and sample is None):
    return False
  require_rows(stats, method, option)
  return True


def input_factor(
  stats: LayerStats | LayerMoments,
  dtype,
  weight_sharing: WeightSharing = "expand",
  method: str = "kfac",
  sample: jax.Array | None = None,
) -> jax.Array:
  """``A_batch`` of one layer under ``weight_sharing``, from the rows ``sample`` (:func:`row_sample`) or
  all of them: ``(1/m) Σ_{r∈S} ā_r ā_rᵀ``, unbiased over draws. An embedding's (diagonal) ``A`` is
  expand's over every row, kept as its diagonal ``(vocab,)``: pooling one-hot rows would make it dense."""
  option = "weight_sharing='reduce'" if sample is None else "statistics_rows"
  if not _sampled(stats, weight_sharing, sample, method, option):
    return stats.input_moment(dtype)
  x = input_rows(stats, dtype, weight_sharing)
  if sample is not None:
    x = x[sample]
  return (x.T @ x) / x.shape[0]


def cotangent_factor(
  stats: LayerStats | LayerMoments,
  dtype,
  weight_sharing: WeightSharing = "expand",
  method: str = "kfac",
  sample: jax.Array | None = None,
) -> jax.Array:
  """``G_batch`` of one layer under ``weight_sharing``, from the rows ``sample`` or all of them
  (embeddings: every row, as :func:`input_factor`)."""
  option = "weight_sharing='reduce'" if sample is None else "statistics_rows"
  if not _sampled(stats, weight_sharing, sample, method, option):
    return stats.cotangent_moment(dtype)
  g = cotangent_rows(stats, dtype, weight_sharing)
  if sample is not None:
    g = g[:, sample]
  return jnp.einsum("sri,srj->ij", g, g) / g.shape[1]


def batch_factors(
  stats: LayerStats | LayerMoments,
  dtype,
  weight_sharing: WeightSharing = "expand",
  method: str = "kfac",
  sample: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``(A_batch, G_batch)`` of one layer's recorded rows (or accumulated moments) under ``weight_sharing``,
  both from the same rows ``sample``; an embedding's ``A`` is diagonal and kept as its diagonal ``(vocab,)``."""
  return (
    input_factor(stats, dtype, weight_sharing, method, sample),
    cotangent_factor(stats, dtype, weight_sharing, method, sample),
  )


def heuristic_pi(a: jax.Array, g: jax.Array) -> jax.Array:
  """``π = sqrt((tr A / dim A) / (tr G / dim G))``; 1 where either trace is not positive."""
  mean_a = (jnp.sum(a) if a.ndim == 1 else jnp.trace(a)) / a.shape[0]  # a diagonal A kept as its diagonal
  mean_g = jnp.trace(g) / g.shape[0]
  valid = (mean_a > 0) & (mean_g > 0)
  ratio = jnp.where(valid, mean_a, 1) / jnp.where(valid, mean_g, 1)
  valid &= jnp.isfinite(ratio) & (ratio > 0)
  return jnp.sqrt(jnp.where(valid, ratio, 1))


def heuristic_dampings(a: jax.Array, g: jax.Array, damping) -> tuple[jax.Array, jax.Array]:
  """``(π√λ, √λ/π)``, the dampings of ``A`` and ``G`` (Martens & Grosse 2015, section 6.3)."""
  pi = heuristic_pi(a, g)
  root = jnp.sqrt(jnp.asarray(damping, a.dtype))
  return pi * root, root / pi
