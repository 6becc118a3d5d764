"""Trees by path: the ``{path: leaf}`` view of a parameter or gradient tree that both wings read.

Trees are read through ``jax.tree_util`` key paths, so any pytree of arrays
works: nested dicts, ``FrozenDict``, ``flax.nnx.State`` and leaf wrappers such
as ``nnx.Param`` (whose array appears under a trailing attribute key, dropped
from the path). The capture driver reads parameter shapes through it and the
transforms read and write gradient matrices through it (:mod:`param_layout`),
so it sits below both.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import jax

Path = tuple[Hashable, ...]


def _entry(key) -> Hashable:
  for attribute in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(key, attribute):
      return getattr(key, attribute)
  return str(key)


def _path(key_path) -> Path:
  """A key path as plain entries, without the trailing attribute keys of leaf wrappers."""
  entries = list(key_path)
  while entries and isinstance(entries[-1], jax.tree_util.GetAttrKey):
    entries.pop()
  return tuple(_entry(k) for k in entries)


class FlatTree(NamedTuple):
  """A tree's leaves by path, and how to rebuild the tree (wrappers and containers kept)."""

  leaves: dict[Path, Any]
  treedef: Any
  paths: tuple[Path, ...]

  def rebuild(self, leaves: Mapping[Path, Any]) -> Any:
    return jax.tree_util.tree_unflatten(self.treedef, [leaves[p] for p in self.paths])


def flatten(tree) -> FlatTree:
  """``{path: array}`` of a params/updates tree (a mapping: dict, ``FrozenDict``, ``nnx.State``)."""
  if not isinstance(tree, Mapping):
    raise TypeError(
      "neuron_optax expects the parameters as a (nested) dict, the 'params' collection of a "
      "Flax linen model, or a flax.nnx.State such as nnx.state(model, nnx.Param); got "
      f"{type(tree).__name__}."
    )
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = tuple(_path(p) for p, _ in with_path)
  return FlatTree(dict(zip(paths, (leaf for _, leaf in with_path))), treedef, paths)
