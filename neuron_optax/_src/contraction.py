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
recorded one; ``"auto"`` checks that at run time, once per step for all layers
(:func:`recorded_scale`, which also accepts a common scale ``σ``, e.g. a clipped
gradient) and picks every layer's order with one branch (:func:`one_decision`);
``"rows"`` assumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax._src import amortisation, hyperparams, param_layout
from neuron_optax._src.layer_stats import LayerStats

Contraction = Literal["auto", "gradient", "rows"]
CONTRACTIONS = ("auto", "gradient", "rows")
Order = Literal["gradient", "rows", "both"]


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


def gradient_product(matrix: jax.Array, gradient: jax.Array, stats: LayerStats) -> jax.Array:
  """``M ∇W`` of the incoming gradient (a diagonal ``M``, kept as its diagonal, scales the rows)."""
  gradient = gradient.astype(matrix.dtype)
  if matrix.ndim == 1:  # a diagonal factor kept as its diagonal (embeddings)
    return matrix[:, None] * gradient
  if not stats.has_bias or jax.default_backend() == "cpu":
    return matrix @ gradient
  # On accelerators M [K; bᵀ] = M[:, :-1] K + M[:, -1] bᵀ: the kernel and bias gradients arrive as
  # separate leaves and are never copied into one (d_in+1)-row matrix, and the GEMM has aligned
  # d_in-sized operands. XLA:CPU runs the single product faster.
  return matrix[:, :-1] @ gradient[:-1] + matrix[:, -1:] * gradient[-1:]


def left_order(stats: LayerStats, contraction: Contraction) -> Order:
  """``"rows"`` or ``"gradient"``: the order :func:`left_precondition` takes ``M ∇W`` in, assuming the
  incoming gradient is the recorded one (``"auto"``: the cheaper; ``"rows"``: wherever there are rows)."""
  return "rows" if use_rows(stats, contraction) else "gradient"


def two_sided_order(stats: LayerStats, contraction: Contraction) -> Order:
  """``"both"``, ``"rows"`` (only the left side from the rows) or ``"gradient"``, for ``L ∇W R``."""
  if both_sides_from_rows(stats, contraction):
    return "both"
  return left_order(stats, contraction)


def left_precondition(matrix: jax.Array, gradient: jax.Array, stats: LayerStats, order: Order) -> jax.Array:
  """``matrix @ ∇W`` in the given order: ``"gradient"`` reads the incoming gradient ``∇W``;
  ``"rows"`` forms ``(M Āᵀ) Cot`` from the recorded rows (equal only when ``∇W`` is the recorded
  gradient; :func:`one_decision` checks that)."""
  if order == "gradient":
    return gradient_product(matrix, gradient, stats)
  a, cot = _rows(stats, matrix.dtype)
  return (matrix @ a.T) @ cot


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
  left: jax.Array, gradient: jax.Array, right: jax.Array, stats: LayerStats, order: Order
) -> jax.Array:
  """``left @ ∇W @ right`` in the given order (:func:`two_sided_order`)."""
  if order != "both":
    return left_precondition(left, gradient, stats, order) @ right
  a, cot = _rows(stats, left.dtype)
  return (left @ a.T) @ (cot @ right)


# --------------------------------------------------------------------------- #
# One decision per step: is the incoming tree the recorded gradient, up to one scale?
# --------------------------------------------------------------------------- #

# Probe pairs per layer: one estimates the scale σ, the others check it (independent of the estimate).
_CHECK_PROBES = 4
_PROBE_SEED = 0x6E6F78  # any fixed seed; the probes are fresh at every step (folded with the step counter)


def recorded_scale(
  gradients: Mapping[Any, jax.Array], stats: Mapping[Any, LayerStats], count: jax.Array
) -> tuple[jax.Array, jax.Array]:
  r"""``(matches, σ)``: whether the incoming gradients are ``σ`` times the recorded ones, for one ``σ``.

    A randomised check of the whole tree. At step ``count`` fresh Gaussian probes
    ``r_j, s_j`` (``j = 0 … k``, ``k = 4``) are drawn for every layer ``l``;
    ``p_lj = r_jᵀ U_l s_j`` is read from the incoming gradient ``U_l`` and
    ``q_lj = (Ā r_j)ᵀ (Cot s_j)`` from the recorded rows (``O((d_in + d_out)·rows)``,
    for convolutions one backward-filter convolution with ``k + 1`` output
    channels). Probe 0 of every layer estimates ``σ = Σ_l p_l0 q_l0 / Σ_l q_l0²``;
    the check accepts when ``|p_lj − σ q_lj| ≤ √ε ‖U_l‖_F`` for every layer and
    ``j ≥ 1`` (``ε`` of the dtype: round-off of two summation orders).

    False-positive probability: write ``ρ = min_σ max_l ‖U_l − σ G_l‖_F / ‖U_l‖_F``
    for how far the tree is from a multiple of the recorded gradient ``G``. Given
    probe 0, some layer has ``E = U_l − σ̂ G_l`` with ``‖E‖_F ≥ ρ ‖U_l‖_F``, and
    ``r_jᵀ E s_j`` (``j ≥ 1``, independent of ``σ̂``) has the law of
    ``‖E‖_F Σ_i w_i a_i b_i`` (``a, b`` standard normal, ``Σ w_i² = 1``), which is
    most concentrated at 0 for a rank-one ``E``. So

    .. math::
      P(	ext{accept}) \le \pi(\sqrt{arepsilon}/
  ho)^k, \qquad
      \pi(x) = P(|a b| \le x) = E_b[\operatorname{erf}(x / (|b|\sqrt{2}))],

    at every step, independently of the other steps: in float32
    ``≤ 10⁻⁴`` for ``ρ = 10⁻²`` and ``≤ 5·10⁻⁸`` for ``ρ = 0.1``; in float64
    ``≤ 3·10⁻⁹`` for ``ρ = 10⁻⁵``. A change smaller than that goes unnoticed with
    an effect on the direction of its own relative size. ``tests/test_optax_contract.py``
    measures the rate.
  """
  keys = list(gradients)
  base = jax.random.fold_in(jax.random.key(_PROBE_SEED), count)
  p, q, tolerance = [], [], []
  for index, key in enumerate(keys):
    gradient, layer = gradients[key], stats[key]
    d_in, d_out = gradient.shape
    r_key, s_key = jax.random.split(jax.random.fold_in(base, index))
    r = jax.random.normal(r_key, (d_in, _CHECK_PROBES + 1), gradient.dtype)
    s = jax.random.normal(s_key, (d_out, _CHECK_PROBES + 1), gradient.dtype)
    p.append(jnp.sum(r * (gradient @ s), axis=0))
    q.append(_recorded_probes(layer, r, s))
    tolerance.append(np.sqrt(np.finfo(gradient.dtype).eps) * jnp.sqrt(jnp.sum(gradient * gradient)))
  p, q, tolerance = jnp.stack(p), jnp.stack(q), jnp.stack(tolerance)
  q0 = jnp.sum(q[:, 0] * q[:, 0])
  scale = jnp.where(q0 > 0, jnp.sum(p[:, 0] * q[:, 0]) / jnp.where(q0 > 0, q0, 1), 0)
  residual = jnp.abs(p[:, 1:] - scale * q[:, 1:])
  matches = jnp.all(jnp.isfinite(tolerance)) & jnp.isfinite(scale) & jnp.all(residual <= tolerance[:, None])
  return matches, scale


def _recorded_probes(stats: LayerStats, r: jax.Array, s: jax.Array) -> jax.Array:
  """``diag(Rᵀ G S)`` of the recorded gradient ``G = Āᵀ Cot``, from the rows."""
  if stats.kind == "embed":  # a scatter-add (of both uses, if tied): the recorded gradient is cheap
    return jnp.sum(r * (recorded_gradient(stats, r.dtype) @ s), axis=0)
  cot_s = stats.cotangents.astype(r.dtype) @ s  # (n, P, k + 1)
  kernel_rows = r.shape[0] - int(stats.has_bias)
  probes = jnp.sum(r[:kernel_rows] * stats.kernel_gradient(cot_s), axis=0)
  if stats.has_bias:
    probes = probes + r[-1] * jnp.sum(cot_s.reshape(-1, s.shape[1]), axis=0)
  return probes


def incoming_matrices(updates, shapes: Mapping[Any, Any], dtypes: Mapping[Any, Any]) -> dict:
  """``{key: ∇W}``, the incoming gradient matrix of every layer in ``dtypes``, cast to its dtype."""
  leaves = param_layout.flatten(updates).leaves
  return {key: param_layout.gradient_matrix(leaves, key, shapes[key]).astype(dtype) for key, dtype in dtypes.items()}


def one_decision(
  gradients: Mapping[Any, jax.Array],
  stats: Mapping[Any, LayerStats],
  count: jax.Array,
  contraction: Contraction,
  from_rows: Callable[[Mapping[Any, LayerStats]], dict],
  exact: Callable[[Mapping[Any, LayerStats]], dict],
) -> dict:
  """Directions from the recorded rows (``from_rows(stats)``, times ``σ``) or ``exact(stats)``, one choice per step.

  ``from_rows(stats)`` builds the directions of the layers in ``gradients`` from the
  recorded rows; ``exact(stats)`` from the incoming ``gradients`` (the optax
  contract at any input). ``"rows"`` takes ``from_rows(stats)`` without a check
  (``gradients`` may be empty then); otherwise one :func:`recorded_scale`
  check of all layers and one ``lax.cond``: no per-layer conditional.
  """
  if contraction == "rows":
    return from_rows(stats)
  if not gradients:
    return {}

  def scaled(scale, stats):
    return {key: (scale * d).astype(d.dtype) for key, d in from_rows(stats).items()}

  matches, scale = recorded_scale(gradients, stats, count)
  return amortisation.branch(matches, scaled, lambda _, stats: exact(stats), scale, stats)
