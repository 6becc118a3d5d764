"""Diagnostics: how KFAC's and FOOF's directions relate on one batch (Benzing 2022, Fig. 3B)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neuron_optax._src import hyperparams, kronecker, linalg, param_layout
from neuron_optax._src.layer_stats import Stats, layer_name


def _cosine(x: jax.Array, y: jax.Array) -> jax.Array:
  norms = jnp.linalg.norm(x) * jnp.linalg.norm(y)
  return jnp.where(norms > 0, jnp.vdot(x, y) / jnp.where(norms > 0, norms, 1), jnp.nan)


def kfac_foof_similarity(
  grads,
  stats: Stats | None,
  damping: float | jax.Array,
  *,
  foof_damping: float | jax.Array | None = None,
  kernel_input_ndim: param_layout.KernelInputNdim = None,
) -> dict[str, jax.Array]:
  """Per-layer cosine similarity of the KFAC and FOOF directions on one batch (Benzing 2022, Fig. 3B).

  Both directions precondition the same gradient with factors from this
  batch alone (no moving average)::

      KFAC = (A + π√λ I)⁻¹ ∇W (G + √λ/π I)⁻¹      (heuristic damping)
      FOOF = (A + λ_F I)⁻¹ ∇W,   λ_F = π√λ (default) or foof_damping
      similarity = <KFAC, FOOF> / (‖KFAC‖ ‖FOOF‖)

  With the default ``λ_F = π√λ`` FOOF uses the same damped first factor as
  KFAC (the FOOF variant of the paper's App. D.9), so the similarity measures
  how far KFAC's second factor turns the update: as ``λ`` grows the second
  factor tends to a multiple of the identity and the similarity to 1.

  Args:
    grads: the gradients (``params``-shaped), as from
      :func:`neuron_optax.value_grad_and_stats`.
    stats: the layer statistics from the same call; its ``fisher=`` choice
      sets ``G``.
    damping: KFAC's ``λ > 0``: a number or a scalar array, traced ones
      included (a traced value that is not positive and finite gives NaN).
    foof_damping: a fixed FOOF damping ``λ_F > 0`` instead of KFAC's ``π√λ``
      (a number or a scalar array, as ``damping``).
    kernel_input_ndim: as in :func:`neuron_optax.kfac`.

  Returns:
    ``{layer name: scalar}`` for every layer in ``stats`` (names as in the
    optimiser states, e.g. ``"Dense_0"``, ``"block/conv"``); NaN for a layer
    whose gradient is zero. Jit-compatible.
  """
  for name, value in (("damping", damping), ("foof_damping", foof_damping)):
    if value is None and name == "foof_damping":
      continue
    if callable(value):
      raise ValueError(f"kfac_foof_similarity: {name} must be a number or a scalar array, not a schedule.")
    hyperparams.check_scalar_or_schedule("kfac_foof_similarity", name, value)  # concrete values only
  shapes = param_layout.candidate_layers(grads, kernel_input_ndim, stats)
  stats = param_layout.check_stats(stats, shapes, "kfac_foof_similarity", tied_tables=False)
  gradients = param_layout.gradient_matrices(grads, shapes, stats)
  similarity = {}
  for key, layer_stats in stats.items():
    dtype = param_layout.statistics_dtype(gradients[key].dtype)
    gradient = gradients[key].astype(dtype)
    kfac_damping = jnp.asarray(damping, dtype)  # may be traced (jit, inject_hyperparams)
    ok = hyperparams.valid(kfac_damping)
    a, g = kronecker.batch_factors(layer_stats, dtype)
    a_damping, g_damping = kronecker.heuristic_dampings(a, g, kfac_damping)
    # An embedding's A is diagonal, kept as its diagonal: its inverse scales the gradient's rows.
    inverse = linalg.damped_inverse_diagonal if a.ndim == 1 else linalg.damped_inverse
    apply = (lambda m, x: m[:, None] * x) if a.ndim == 1 else (lambda m, x: m @ x)
    a_inverse = inverse(a, a_damping)
    kfac_direction = apply(a_inverse, gradient) @ linalg.damped_inverse(g, g_damping)
    if foof_damping is not None:
      fixed = jnp.asarray(foof_damping, dtype)
      ok = ok & hyperparams.valid(fixed)
      a_inverse = inverse(a, fixed)
    similarity[layer_name(key)] = jnp.where(ok, _cosine(kfac_direction, apply(a_inverse, gradient)), jnp.nan)
  return similarity
