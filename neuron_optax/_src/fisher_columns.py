"""The columns of a mini-batch Fisher, shared by the natural gradient and the Laplace tools.

For every captured layer (every copy of a stacked layer) the Fisher cotangents
``g`` (``(S, n, P, d_out)``, :meth:`LayerStats.per_example_cotangents`) and the
input rows ``ā`` (``(n, P, d_in)``, bias column appended; an embedding's as token
ids, :meth:`LayerStats.row_operand`) give one column per label set ``s`` and
example ``i``, ``m = S·n`` columns::

    ψ_si = Σ_p ā_ip g_sipᵀ          F = (1/n) Σ_si ψ_si ψ_siᵀ = (1/n) Ψ Ψᵀ          K = ΨᵀΨ

The products ``K``, ``Ψᵀv`` and ``Ψc`` are sums over layers of
:func:`~neuron_optax._src.linalg.gradient_gram`, ``gradient_dots`` and
``weighted_gradient_sum``; no per-example gradient is formed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax

from neuron_optax._src import linalg
from neuron_optax._src.layer_stats import LayerKey, LayerStats, layer_name


class FisherColumns(NamedTuple):
  """The Fisher's columns over the layers ``keys``: their rows, cotangents and count ``m = sets · n``."""

  keys: tuple[LayerKey, ...]
  inputs: dict[LayerKey, linalg.Rows]  # (n, P, d_in) augmented rows, or TokenRows for embeddings
  cotangents: dict[LayerKey, jax.Array]  # (S, n, P, d_out)
  sets: int
  n: int

  @property
  def m(self) -> int:
    return self.sets * self.n

  def gram(self) -> jax.Array:
    """``K = ΨᵀΨ``, ``(m, m)``."""
    return sum(linalg.gradient_gram(self.inputs[k], self.cotangents[k]) for k in self.keys)

  def dots(self, matrices: Mapping[LayerKey, jax.Array]) -> jax.Array:
    """``Ψᵀv`` for ``v`` given as one ``(d_in, d_out)`` matrix per layer, ``(m,)``."""
    return sum(linalg.gradient_dots(self.inputs[k], self.cotangents[k], matrices[k]) for k in self.keys)

  def weighted_sum(self, key: LayerKey, weights: jax.Array) -> jax.Array:
    """Layer ``key``'s part of ``Ψc`` for column weights ``c`` ``(m,)``: ``(d_in, d_out)``."""
    return linalg.weighted_gradient_sum(self.inputs[key], self.cotangents[key], weights)


def check_count(where: str, columns: int, max_columns: int | None, *, block: str = "", smaller: str) -> None:
  """``m <= max_columns``, with what to do otherwise (``smaller``: how to use fewer examples)."""
  if max_columns is not None and not isinstance(max_columns, jax.core.Tracer) and columns > max_columns:
    raise ValueError(
      f"{where}: the Fisher{block} has m = {columns} columns (label sets x examples) > max_columns = "
      f"{max_columns}; the m x m system needs O(m²) memory and O(m³) time. Use fisher='mc' (one sampled "
      f"label per output) instead of 'full', {smaller}, or raise max_columns."
    )


def fisher_columns(
  where: str,
  stats: Mapping[LayerKey, LayerStats],
  keys: Sequence[LayerKey],
  dtype,
  *,
  max_columns: int | None = None,
  block: str = "",
  smaller: str = "compute the stats on fewer examples",
  layerwise: str,
) -> FisherColumns:
  """The columns of the Fisher over ``keys`` (one stats entry per layer or copy), checked.

  All layers must agree on ``(label sets, examples)`` (otherwise their per-example
  gradients are not columns of one Fisher; ``layerwise`` says what to use
  instead), and ``m`` must not exceed ``max_columns``.
  """
  keys = tuple(keys)
  inputs = {k: stats[k].row_operand(dtype) for k in keys}  # embeddings: token ids, not one-hot rows
  cotangents = {k: stats[k].per_example_cotangents(dtype) for k in keys}
  shapes = {k: cotangents[k].shape[:2] for k in keys}
  if len(set(shapes.values())) > 1:
    raise ValueError(
      f"{where}: the captured layers disagree on (label sets, examples) "
      f"{ {layer_name(k): v for k, v in shapes.items()} }, so their per-example gradients are not columns of "
      "one Fisher. This happens when a layer sees a different leading (example) axis, e.g. inputs reshaped "
      f"to (batch * tokens, features); keep the example axis leading, or {layerwise}."
    )
  sets, n = shapes[keys[0]]
  check_count(where, sets * n, max_columns, block=block, smaller=smaller)
  return FisherColumns(keys, inputs, cotangents, sets, n)
