"""Which layers a Laplace call covers, and reading and writing them through the library's layer view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from neuron_optax._src import param_layout
from neuron_optax._src.layer_stats import LayerKey, LayerStats, StackIndex, Stats, layer_name

Shapes = dict[LayerKey, param_layout.LayerShape]


def is_stats(stats: Any) -> bool:
  """A non-empty ``{layer key: LayerStats}`` (the recorded rows are available)."""
  return isinstance(stats, Mapping) and bool(stats) and all(isinstance(v, LayerStats) for v in stats.values())


def _present(key: LayerKey, s: LayerStats, shapes: Shapes) -> bool:
  return key in shapes or (bool(s.stack_shape) and key + (StackIndex((0,) * len(s.stack_shape)),) in shapes)


def layers_of_stats(where: str, tree, stats, what: str) -> tuple[Shapes, list[LayerKey], Stats]:
  """``(shapes, keys, per-layer stats)`` of the captured layers in ``tree``, validated.

  A stacked layer becomes one key per copy (``path + (StackIndex(i),)``) with
  that copy's statistics, as the optimizers see it.
  """
  if stats is None or (isinstance(stats, Mapping) and not stats):
    raise ValueError(
      f"{where}: `stats` is empty; compute it with `_, _, stats = nox.value_grad_and_stats(loss_fn, "
      "fisher=...)(params, ...)` on the model whose Fisher you want (it must capture at least one layer)."
    )
  if not is_stats(stats):
    raise TypeError(
      f"{where}: `stats` must be the dict returned by nox.value_grad_and_stats, got {type(stats).__name__}."
    )
  shapes = param_layout.candidate_layers(tree, None, stats)
  missing = sorted(layer_name(k) for k, s in stats.items() if not _present(k, s, shapes))
  if missing:
    raise ValueError(
      f"{where}: `{what}` has no kernel for the captured layers {missing} (its layers with kernels: "
      f"{sorted({layer_name(k[:-1] if k and isinstance(k[-1], StackIndex) else k) for k in shapes})}). "
      f"`{what}` must be a tree shaped like the parameters that `stats` were computed with (the 'params' "
      "collection, not the whole variables dict)."
    )
  present = param_layout.check_stats(stats, shapes, f"{where} ({what})")
  return shapes, list(present), present


def matrices(where: str, tree, shapes: Shapes, keys, what: str) -> dict[LayerKey, jax.Array]:
  """The ``(d_in, d_out)`` matrices of ``keys`` in a params-shaped ``tree``."""
  try:
    return param_layout.gradient_matrices(tree, shapes, keys)
  except KeyError as error:
    raise ValueError(
      f"{where}: `{what}` has no leaf {error} for the layers {sorted(layer_name(k) for k in keys)}; shape it like "
      "params."
    ) from None


def dtype_of(values: Mapping[Any, jax.Array]):
  return param_layout.statistics_dtype(jnp.result_type(*values.values()))


def write(tree, shapes: Shapes, values: Mapping[LayerKey, jax.Array], *, zeros: bool = False):
  """``tree`` with the layers in ``values`` replaced by them (every other leaf: kept, or zeros)."""
  base = jax.tree_util.tree_map(jnp.zeros_like, tree) if zeros else tree
  return param_layout.map_layers(base, shapes, list(values), lambda key, _: values[key], keep_non_finite=True)


def write_samples(tree, shapes: Shapes, values: Mapping[LayerKey, jax.Array]):
  """:func:`write` for values with a leading sample axis; other leaves are broadcast along it."""
  return jax.vmap(lambda v: write(tree, shapes, v))(dict(values))  # vmap broadcasts the unbatched leaves
