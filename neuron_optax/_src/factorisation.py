"""Batched (and optionally distributed) factorisations of many layers' matrices.

At a re-factorisation step every layer's factor is factorised; layers whose
matrices have the same shape share one batched call (fewer, larger kernels on
accelerators), and with ``distribute_factorisations=(mesh, axis)`` each device
of that mesh axis factorises a share of them (``jax.shard_map``), as kfac-jax
distributes its inverses.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Distribution = tuple[jax.sharding.Mesh, str]


def validate_distribution(transform: str, distribute: Distribution | None) -> None:
  if distribute is None:
    return
  if (
    not isinstance(distribute, tuple)
    or len(distribute) != 2
    or not isinstance(distribute[0], jax.sharding.Mesh)
    or not isinstance(distribute[1], str)
  ):
    raise ValueError(
      f"{transform}: distribute_factorisations must be None or a (jax.sharding.Mesh, axis name) "
      f"pair, e.g. (mesh, 'data'), got {distribute!r}."
    )
  mesh, axis = distribute
  if axis not in mesh.axis_names:
    raise ValueError(
      f"{transform}: distribute_factorisations names axis {axis!r}, but the mesh has axes {tuple(mesh.axis_names)}."
    )


def factorise_by_shape(
  fn: Callable[..., Any],
  operands: Mapping[Hashable, Sequence[jax.Array]],
  distribute: Distribution | None = None,
  diagonal: Callable[..., Any] | None = None,
) -> dict[Hashable, Any]:
  """``{name: fn(*operands[name])}``, with one batched call of ``fn`` per group of equal shapes.

  ``fn`` must accept stacked operands (a leading axis of matrices) and return
  a pytree of stacked results, as ``linalg.damped_inverse`` and
  ``linalg.sym_eigh`` do. Operands whose matrix is 1-D are diagonal matrices
  kept as their diagonal (an embedding's input factor): ``diagonal(*operands)``
  handles them elementwise, nothing is factorised.

  With ``distribute=(mesh, axis)`` each stack is split along the mesh axis
  (``jax.shard_map``): every device factorises its share of the layers and the
  results are all-gathered where the update uses them. A stack is padded with
  copies of its first entry to a multiple of the axis size.
  """
  fn = _one_by_one_on_cpu(fn)
  groups: dict[Any, list[Hashable]] = collections.defaultdict(list)
  results = {}
  for name, args in operands.items():
    if args[0].ndim == 1:
      if diagonal is None:
        raise ValueError(f"factorise_by_shape: {name!r} has a diagonal factor and no `diagonal` function.")
      results[name] = diagonal(*args)
    else:
      groups[tuple((x.shape, x.dtype) for x in args)].append(name)
  for names in groups.values():
    stacked = tuple(jnp.stack(column) for column in zip(*(operands[name] for name in names)))
    batched = fn(*stacked) if distribute is None else _distributed(fn, stacked, distribute)
    for index, name in enumerate(names):
      results[name] = jax.tree.map(lambda x, i=index: x[i], batched)
  return results


def _one_by_one_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
  """On CPU, ``fn`` applied to one matrix at a time and the results stacked.

  Batched LAPACK calls gain nothing on CPU (they loop over the matrices), and
  several of them in one computation can deadlock XLA:CPU's thread pool
  (README, "Benchmarks and step cost").
  """

  def apply(*stacked):
    if jax.default_backend() != "cpu":
      return fn(*stacked)
    results = [fn(*(x[i] for x in stacked)) for i in range(stacked[0].shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)

  return apply


def _distributed(fn: Callable[..., Any], stacked: tuple[jax.Array, ...], distribute: Distribution):
  mesh, axis = distribute
  devices = mesh.shape[axis]
  count = stacked[0].shape[0]
  padded_count = -(-count // devices) * devices
  if padded_count != count:
    stacked = tuple(
      jnp.concatenate([x, jnp.broadcast_to(x[:1], (padded_count - count,) + x.shape[1:])]) for x in stacked
    )
  spec = jax.sharding.PartitionSpec(axis)
  result = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(*stacked)
  return jax.tree.map(lambda x: x[:count], result)
