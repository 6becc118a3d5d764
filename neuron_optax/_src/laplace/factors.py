"""Kronecker factors ``A ⊗ G`` of the per-example Fisher, from a batch, moments or an optimiser state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax._src import hyperparams, kronecker, param_layout
from neuron_optax._src.layer_stats import LayerStats, StackIndex, layer_name


class KroneckerFactors(NamedTuple):
  """One layer's Kronecker factors for a structured Laplace posterior (``A ⊗ G ≈`` per-example Fisher).

  Attributes:
    a: ``(d_in, d_in)`` input factor ``A`` (bias row included), or for an
      embedding its diagonal ``(vocab,)`` (token frequencies; ``A`` of one-hot
      rows is diagonal).
    g: ``(d_out, d_out)`` output factor ``G``, or ``None`` where only ``A`` is
      known (a FOOF state): then only ``structure="input_factor"`` with an
      explicit ``output_scale`` works.
  """

  a: jax.Array
  g: jax.Array | None


Factors = Mapping[str, KroneckerFactors]


def is_moments(stats: Any) -> bool:
  """Layer statistics with at least second moments (``LayerStats`` or rowless moments)."""
  return (
    isinstance(stats, Mapping)
    and bool(stats)
    and all(hasattr(v, "input_moment") and hasattr(v, "cotangent_moment") for v in stats.values())
  )


def is_factors(stats: Any) -> bool:
  return isinstance(stats, Mapping) and bool(stats) and all(isinstance(v, KroneckerFactors) for v in stats.values())


def copies(stats: Mapping) -> dict:
  """``stats`` with every stacked layer split into its copies (keys ``path + (StackIndex(i),)``)."""
  out = {}
  for key, s in stats.items():
    if getattr(s, "stack_shape", ()):
      out.update((key + (StackIndex(i),), s.copy(i)) for i in np.ndindex(*s.stack_shape))
    else:
      out[key] = s
  return out


def _check_untied(where: str, stats: Mapping) -> None:
  tied = sorted(layer_name(k) for k, s in stats.items() if getattr(s, "tied", None) is not None)
  if tied:
    raise NotImplementedError(
      f"{where}: embeddings {tied} are tied to an output layer (Embed.attend). A Kronecker factorisation "
      "A ⊗ G cannot hold both uses of the table (the lookups' input factor and the output layer's lie on "
      "different sides of it). Use structure='full' or 'diagonal' (exact over both uses), or leave the table "
      "out of the posterior: pass {k: v for k, v in stats.items() if k != <its key>} (it is then held at the MAP)."
    )


def kronecker_factors(source, *, ema_decay: float | None = None, positions: int | Mapping[str, int] = 1) -> Factors:
  """``{layer name: KroneckerFactors(A, G)}`` for the structured Laplace posteriors.

  Every copy of a stacked layer (``nn.scan``) gets its own factors, named
  ``'cells/mlp[2]'`` as in the optimiser states; an embedding's ``A`` is the
  diagonal of its token frequencies, kept as a vector.

  Args:
    source: one of

      * the ``stats`` of a batch: ``A = mean_r ā_r ā_rᵀ`` and
        ``G = P · mean_r Σ_s g_sr g_srᵀ`` over the ``n·P`` rows (``G`` summed
        over the ``P`` positions of an example, averaged over examples, so
        that for dense layers with one position ``A ⊗ G`` is exactly the
        Kronecker approximation ``E[āāᵀ] ⊗ E[ggᵀ]`` of ``F``). Per-layer
        second moments without rows (``LayerMoments``) work too; their ``G``
        is multiplied by ``positions``;
      * a ``nox.KfacState`` (debiased moving averages of ``A`` and ``G``) or a
        ``nox.FoofState`` (``A`` only; ``G`` is ``None``). For a chained
        optimiser pass the element of the chain's state, e.g. ``opt_state[0]``;
      * a mapping ``{layer name: KroneckerFactors}`` (returned as is).
    ema_decay: only for states that store no debiasing weight: the
      ``ema_decay`` they were built with (their averages are stored biased).
    positions: for states and moments, the positions per example ``P`` that
      ``G`` is multiplied by (an int for every layer, or ``{layer name: P}``;
      layers not named get 1). They average over rows, so convolutions need
      their output positions here to match the scale of the ``stats`` path.

  Returns:
    A dict keyed by layer name (``'Dense_0'``, ``'block/conv'``,
    ``'cells/mlp[0]'``; the keys of a KFAC/FOOF state).

  Raises:
    NotImplementedError: for an embedding tied to an output layer
      (``Embed.attend``), whose two uses no single ``A ⊗ G`` describes.

  Examples:
    >>> factors = nox.kronecker_factors(stats)  # doctest: +SKIP
    >>> factors = nox.kronecker_factors(opt_state[0])  # a chained KFAC state  # doctest: +SKIP
  """
  where = "kronecker_factors"

  def positions_of(name):
    p = positions.get(name, 1) if isinstance(positions, Mapping) else positions
    hyperparams.check_integer(where, f"positions[{name!r}]" if isinstance(positions, Mapping) else "positions", p)
    return p

  if is_factors(source):
    return dict(source)
  if is_moments(source):
    _check_untied(where, source)
    out = {}
    for key, s in copies(source).items():
      dtype = param_layout.statistics_dtype(jnp.result_type(*jax.tree_util.tree_leaves(s)))
      a, g = kronecker.batch_factors(s, dtype)
      p = s.cotangents.shape[1] if isinstance(s, LayerStats) else positions_of(layer_name(key))
      out[layer_name(key)] = KroneckerFactors(a, g * p)
    return out
  layers = getattr(source, "layers", None)
  if isinstance(layers, Mapping) and layers and all(hasattr(v, "a_ema") for v in layers.values()):
    out = {}
    for name, layer in layers.items():
      p = positions_of(name)
      a = _debiased(where, layer, "a", ema_decay)
      g = _debiased(where, layer, "g", ema_decay) * p if hasattr(layer, "g_ema") else None
      out[name] = KroneckerFactors(a, g)
    return out
  raise TypeError(
    f"{where}: expected the stats of a batch (from nox.value_grad_and_stats), a nox.KfacState or "
    f"nox.FoofState (for a chain, its element such as opt_state[0]), or a mapping of KroneckerFactors; got "
    f"{type(source).__name__}."
  )


def _debiased(where: str, layer, factor: str, ema_decay) -> jax.Array:
  """A state's debiased moving average: ``ema / weight`` (``weight = 1 − β^k`` for a constant decay ``β``)."""
  ema = getattr(layer, f"{factor}_ema")
  weight = getattr(layer, f"{factor}_weight", None)
  if weight is None:
    if ema_decay is None:
      raise ValueError(
        f"{where}: pass ema_decay= (the value the KFAC/FOOF transform was built with) to debias the state's "
        "moving averages."
      )
    if not hyperparams.is_number(ema_decay) or not 0 <= ema_decay < 1:
      raise ValueError(f"{where}: ema_decay must be in [0, 1), got {ema_decay!r}.")
    updates = getattr(layer, f"{factor}_updates")
    weight = 1 - jnp.asarray(ema_decay, ema.dtype) ** updates.astype(ema.dtype)
  weight = jnp.asarray(weight, ema.dtype)
  return jnp.where(weight > 0, ema / jnp.where(weight > 0, weight, 1), 0)
