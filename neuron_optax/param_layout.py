"""Matrix views of layer parameters: where a captured layer's gradient lives.

A captured layer's parameters ``kernel`` (and ``bias``) are viewed as one matrix
``W`` of shape ``(d_in (+1), d_out)``: the kernel reshaped to
``(prod(shape[:k]), prod(shape[k:]))`` with ``k`` its number of input axes, and
the bias as the last row. The transforms read gradients through this view and
write their directions back through it; leaves of layers that were not captured
are left untouched.

Trees are read through ``jax.tree_util`` key paths, so any pytree of arrays
works: nested dicts, ``FrozenDict``, ``flax.nnx.State`` and leaf wrappers such
as ``nnx.Param`` (whose array appears under a trailing attribute key, dropped
from the layer path). A layer's key is the path of its ``kernel`` leaf without
the last entry: ``('Dense_0',)``, ``('layers', 0)``, ``()`` for a top-level layer.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from neuron_optax.layer_stats import LayerKey, LayerMoments, LayerStats, Stats, layer_name

KernelInputNdim = Mapping[str, int] | Callable[[str, tuple[int, ...]], int | None] | None
Path = tuple[Hashable, ...]

# Attention projections of flax.linen.MultiHeadDotProductAttention and flax.nnx.MultiHeadAttention
# map d_model to (heads, head_dim): their 3-D kernels have one input axis.
_ATTENTION_PROJECTIONS = ("query", "key", "value")


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


def default_kernel_input_ndim(path: str, shape: tuple[int, ...]) -> int:
  """All but the last kernel axis are inputs, except attention query/key/value projections."""
  if len(shape) == 3 and path.rsplit("/", 1)[-1] in _ATTENTION_PROJECTIONS:
    return 1
  return len(shape) - 1


def _resolve_input_ndim(kernel_input_ndim: KernelInputNdim, path: str, shape, used: set) -> int:
  if callable(kernel_input_ndim):
    k = kernel_input_ndim(path, shape)
    return default_kernel_input_ndim(path, shape) if k is None else k
  for pattern, k in (kernel_input_ndim or {}).items():
    if pattern == path or fnmatch.fnmatchcase(path, pattern):
      used.add(pattern)
      return k
  return default_kernel_input_ndim(path, shape)


class LayerShape(NamedTuple):
  """Static shape of one candidate layer's gradient matrix."""

  d_in: int  # including the bias row
  d_out: int
  has_bias: bool
  kernel_shape: tuple[int, ...]
  kernel_input_ndim: int


def candidate_layers(params, kernel_input_ndim: KernelInputNdim = None) -> dict[LayerKey, LayerShape]:
  """Every ``kernel`` leaf of rank >= 2: the layers a transform allocates state for.

  The parameters alone do not say how a kernel splits into input and output
  axes; the default is "all but the last axis are inputs" (``nn.Dense``,
  ``nn.Conv``, ``nn.DenseGeneral`` with one output axis), except that 3-D
  kernels of layers named ``query``/``key``/``value`` (Flax attention) have one
  input axis. ``kernel_input_ndim`` overrides this: a mapping from a layer path
  or glob pattern (``"Block_0/Dense_1"``, ``"*/proj"``) to its number of input
  axes, or a callable ``(path, kernel_shape) -> int | None`` (``None`` keeps
  the default).
  """
  used: set = set()
  layers = {}
  flat = flatten(params).leaves
  for path, leaf in flat.items():
    if not path or path[-1] != "kernel" or jnp.ndim(leaf) < 2:
      continue
    key = tuple(path[:-1])
    shape = tuple(jnp.shape(leaf))
    k = _resolve_input_ndim(kernel_input_ndim, layer_name(key), shape, used)
    if not 1 <= k < len(shape):
      raise ValueError(
        f"kernel_input_ndim[{layer_name(key)!r}]={k} is not in [1, {len(shape) - 1}] for a kernel of shape {shape}."
      )
    has_bias = key + ("bias",) in flat
    layers[key] = LayerShape(math.prod(shape[:k]) + int(has_bias), math.prod(shape[k:]), has_bias, shape, k)
  if isinstance(kernel_input_ndim, Mapping) and set(kernel_input_ndim) - used:
    raise ValueError(
      f"kernel_input_ndim names layers without a kernel in params: {sorted(set(kernel_input_ndim) - used)}."
    )
  return layers


def kernel_dtype(params, key: LayerKey):
  """The dtype of layer ``key``'s kernel leaf."""
  return flatten(params).leaves[key + ("kernel",)].dtype


def check_stats(
  stats: Stats | None, layers: Mapping[LayerKey, LayerShape], transform: str, *, need_rows: bool = False
) -> Stats:
  """Trace-time validation of ``stats`` against the layers of the incoming updates.

  Returns the statistics of the layers present in the updates. Layers whose
  parameters are not there (masked out by ``optax.masked``, routed to another
  optimiser by ``optax.multi_transform``) are ignored; statistics that match
  none of the updates' layers are an error (e.g. the whole variables dict
  passed instead of its ``'params'`` collection).
  """
  if stats is None:
    raise ValueError(
      f"{transform}.update needs the layer statistics: compute them with "
      "`loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params, ...)` and call "
      "`tx.update(grads, opt_state, params, stats=stats)`."
    )
  if not isinstance(stats, Mapping) or not all(isinstance(v, (LayerStats, LayerMoments)) for v in stats.values()):
    raise TypeError(
      f"{transform}: `stats` must be the dict returned by nox.value_grad_and_stats, got {type(stats).__name__}."
    )
  present = {key: s for key, s in stats.items() if key in layers}
  if stats and layers and not present:
    key = next(iter(stats))
    raise ValueError(
      f"{transform}: stats hold layer {layer_name(key)!r} but the parameters have no kernel at "
      f"that path (layers with kernels: {sorted(layer_name(k) for k in layers)}). Pass the "
      "model's 'params' collection (not the whole variables dict) to init and update."
    )
  for key, s in present.items():
    shape = layers[key]
    if shape.kernel_shape != s.kernel_shape:
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r} has kernel {shape.kernel_shape} in params but {s.kernel_shape} in stats."
      )
    if shape.kernel_input_ndim != s.kernel_input_ndim:
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r} has {s.kernel_input_ndim} kernel input axes "
        f"(kernel {s.kernel_shape}), but the state was built assuming {shape.kernel_input_ndim}. "
        f"Pass kernel_input_ndim={{{layer_name(key)!r}: {s.kernel_input_ndim}}} to the transform."
      )
    if shape.d_in != s.d_in or shape.d_out != s.d_out or shape.has_bias != s.has_bias:
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r}: stats give a {s.d_in}x{s.d_out} gradient matrix "
        f"(bias={s.has_bias}) but its parameters give {shape.d_in}x{shape.d_out} "
        f"(bias={shape.has_bias})."
      )
    if s.has_rows:
      _check_rows(transform, key, s)
    if need_rows and not s.has_rows:
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r} has only accumulated second moments "
        "(nox.accumulate_micro_batches), but this method needs the recorded rows of every example. "
        "Use optax.MultiSteps for gradient accumulation with this method."
      )
  return present


def _check_rows(transform: str, key: LayerKey, s: LayerStats) -> None:
  """The recorded inputs, cotangents and Fisher cotangents of one layer describe the same rows."""
  name = layer_name(key)
  cot = tuple(s.cotangents.shape)
  if len(cot) != 3:
    raise ValueError(
      f"{transform}: layer {name!r} has cotangents of shape {cot}; LayerStats.cotangents must be "
      "(examples, positions, d_out), as nox.value_grad_and_stats records them."
    )
  if s.conv is None:
    inputs = tuple(jnp.shape(s.layer_inputs))
    rows_in = inputs[:2] if len(inputs) == 3 else None
  else:
    rows_in = (s.conv.examples, sum(s.conv.positions(x) for x in s.layer_inputs))
    inputs = tuple(tuple(jnp.shape(x)) for x in s.layer_inputs)
  if rows_in != cot[:2]:
    raise ValueError(
      f"{transform}: layer {name!r} recorded inputs {inputs} for (examples, positions) = {rows_in} but "
      f"cotangents {cot} for {cot[:2]}: the statistics were edited or assembled from different batches. "
      "Pass the stats that nox.value_grad_and_stats returned for this batch."
    )
  if s.fisher_cotangents is not None and tuple(s.fisher_cotangents.shape[1:]) != cot:
    raise ValueError(
      f"{transform}: layer {name!r} has Fisher cotangents {tuple(s.fisher_cotangents.shape)} for cotangents "
      f"{cot}; they must be (label sets,) + {cot}. Pass the stats that nox.value_grad_and_stats returned."
    )
  if cot[0] == 0:
    raise ValueError(
      f"{transform}: layer {name!r} recorded an empty batch (0 examples): there are no statistics to "
      "precondition with, and the mean loss over no examples is undefined. Skip empty batches (e.g. "
      "drop_remainder=True in the data pipeline)."
    )


def gradient_matrix(flat: Mapping[Path, Any], key: LayerKey, shape: LayerShape) -> jax.Array:
  """``(d_in(+1), d_out)`` matrix of the layer's kernel (and bias) leaves."""
  kernel = flat[key + ("kernel",)].reshape(shape.d_in - int(shape.has_bias), shape.d_out)
  if not shape.has_bias:
    return kernel
  return jnp.concatenate([kernel, flat[key + ("bias",)].reshape(1, shape.d_out)], axis=0)


def gradient_matrices(tree, layers: Mapping[LayerKey, LayerShape], keys) -> dict[LayerKey, jax.Array]:
  """``{key: gradient matrix}`` of the layers ``keys`` of a params-shaped tree."""
  flat = flatten(tree).leaves
  return {key: gradient_matrix(flat, key, layers[key]) for key in keys}


def _split_matrix(flat: dict[Path, Any], key: LayerKey, shape: LayerShape, matrix: jax.Array) -> None:
  """Writes a gradient-matrix-shaped update back into ``flat`` (in place)."""
  kernel_leaf = flat[key + ("kernel",)]
  rows = shape.d_in - int(shape.has_bias)
  flat[key + ("kernel",)] = matrix[:rows].reshape(kernel_leaf.shape).astype(kernel_leaf.dtype)
  if shape.has_bias:
    bias_leaf = flat[key + ("bias",)]
    flat[key + ("bias",)] = matrix[rows].reshape(bias_leaf.shape).astype(bias_leaf.dtype)


def map_layers(updates, layers: Mapping[LayerKey, LayerShape], keys, fn: Callable[[LayerKey, jax.Array], jax.Array]):
  """Replaces the gradient matrix of every layer in ``keys`` by ``fn(key, matrix)``.

  A direction that is not finite (a bad batch) is replaced by zeros, so that
  layer takes no step; the optimizer states stay finite by construction.
  """
  tree = flatten(updates)
  flat = dict(tree.leaves)
  for key in keys:
    direction = fn(key, gradient_matrix(flat, key, layers[key]))
    finite = jnp.all(jnp.isfinite(direction))
    _split_matrix(flat, key, layers[key], direction)
    # Guarding the split leaves (not the matrix) lets XLA fold slice(concatenate(kernel, bias))
    # away, so a direction built as kernel and bias parts is never copied into one matrix.
    for leaf in ("kernel", "bias") if layers[key].has_bias else ("kernel",):
      value = flat[key + (leaf,)]
      flat[key + (leaf,)] = jnp.where(finite, value, jnp.zeros_like(value))
  return tree.rebuild(flat)


def statistics_dtype(dtype) -> jnp.dtype:
  """At least float32: bf16/fp16 statistics are accumulated in float32."""
  return jnp.promote_types(dtype, jnp.float32)
