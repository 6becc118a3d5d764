"""Kronecker factors of one layer's batch and the heuristic (π) damping.

``A_batch = mean_r ā_r ā_rᵀ`` and ``G_batch = mean_r Σ_s g_sr g_srᵀ`` of the
recorded rows, and Martens & Grosse's factored Tikhonov damping (2015,
section 6.3): ``π = sqrt((tr A / dim A) / (tr G / dim G))``, ``A`` damped by
``π√λ`` and ``G`` by ``√λ/π``. Shared by :func:`neuron_optax.kfac` and the
diagnostics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neuron_optax._src.layer_stats import LayerMoments, LayerStats


def batch_factors(stats: LayerStats | LayerMoments, dtype) -> tuple[jax.Array, jax.Array]:
  """``(A_batch, G_batch)`` of one layer's recorded rows (or accumulated moments); an embedding's ``A``
  is diagonal and kept as its diagonal ``(vocab,)``."""
  return stats.input_moment(dtype), stats.cotangent_moment(dtype)


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
