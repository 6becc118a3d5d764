"""Matrix views of layer parameters: where a captured layer's gradient lives.

A captured layer's parameters ``kernel`` (and ``bias``) are viewed as one matrix
``W`` of shape ``(d_in (+1), d_out)``: the kernel reshaped to
``(prod(shape[:k]), prod(shape[k:]))`` with ``k`` its number of input axes, and
the bias as the last row. The transforms read gradients through this view and
write their directions back through it; leaves of layers that were not captured
are left untouched.

Trees are read by path (:mod:`neuron_optax._src.tree_paths`): nested dicts,
``FrozenDict``, ``flax.nnx.State`` and leaf wrappers such as ``nnx.Param``. A
layer's key is the path of its ``kernel`` leaf without the last entry:
``('Dense_0',)``, ``('layers', 0)``, ``()`` for a top-level layer.

Embeddings (an ``embedding`` leaf, ``(vocab, features)``) are layers without a
bias whose input rows are one-hot. The two factors of a LoRA adapter
(``nnx.LoRA``: ``x -> x·lora_a -> (x·lora_a)·lora_b``) are two bias-free dense
layers keyed by their leaves' own paths: ``('lora', 'lora_a')`` (named
``'lora/lora_a'``) and ``('lora', 'lora_b')``. A **stacked** layer (applied inside
``nn.scan``/``nn.vmap`` over parameters with leading layer axes, a
:class:`KernelLayout` with ``stack_ndim > 0``) is ``L`` separate layers, one per
copy, keyed ``path + (StackIndex(index),)`` (named ``'blocks/mlp[2]'``): each
copy has its own gradient matrix, statistics and optimiser state, and the
directions of all copies are written back as one stacked leaf.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax._src.layer_stats import (
  LORA_FACTORS,
  KernelLayout,
  LayerKey,
  LayerMoments,
  LayerStats,
  StackIndex,
  Stats,
  TokenRows,
  layer_name,
)
from neuron_optax._src.tree_paths import Path, flatten

KernelInputNdim = Mapping[str, int | KernelLayout] | Callable[[str, tuple[int, ...]], int | KernelLayout | None] | None

# Attention projections of flax.linen.MultiHeadDotProductAttention and flax.nnx.MultiHeadAttention
# map d_model to (heads, head_dim): their 3-D kernels have one input axis.
_ATTENTION_PROJECTIONS = ("query", "key", "value")


def default_kernel_input_ndim(path: str, shape: tuple[int, ...]) -> int:
  """All but the last kernel axis are inputs, except attention query/key/value projections."""
  if len(shape) == 3 and path.rsplit("/", 1)[-1] in _ATTENTION_PROJECTIONS:
    return 1
  return len(shape) - 1


def _as_layout(value: int | KernelLayout) -> KernelLayout:
  return value if isinstance(value, KernelLayout) else KernelLayout(int(value))


def _resolve_layout(kernel_input_ndim: KernelInputNdim, path: str, shape, used: set, captured) -> KernelLayout | None:
  """The layout given for ``path`` (the user's, else the captured statistics'), or ``None`` for the default."""
  if callable(kernel_input_ndim):
    k = kernel_input_ndim(path, shape)
    if k is not None:
      return _as_layout(k)
  else:
    for pattern, k in (kernel_input_ndim or {}).items():
      if pattern == path or fnmatch.fnmatchcase(path, pattern):
        used.add(pattern)
        return _as_layout(k)
  return captured


class LayerShape(NamedTuple):
  """Static shape of one candidate layer's gradient matrix (one copy's, for stacked layers)."""

  d_in: int  # including the bias row
  d_out: int
  has_bias: bool
  kernel_shape: tuple[int, ...]  # one copy's kernel
  kernel_input_ndim: int
  # the leaf holding the weights: "kernel", "embedding" (one-hot input rows), or a LoRA factor
  # ("lora_a"/"lora_b", the leaf at the layer key itself)
  param: str = "kernel"
  stack_shape: tuple[int, ...] = ()  # the layer's stack axes (this is one copy of them)

  @property
  def is_embedding(self) -> bool:
    return self.param == "embedding"


def _leaf_and_index(key: LayerKey) -> tuple[LayerKey, tuple[int, ...] | None]:
  """The module path of a layer key, and the copy index of a stacked layer's copy."""
  if key and isinstance(key[-1], StackIndex):
    return key[:-1], tuple(key[-1])
  return key, None


def _leaf_path(path: LayerKey, name: str) -> Path:
  """The path of a layer's leaf ``name`` (``"kernel"``, ``"bias"``, ...); a LoRA factor is its own leaf."""
  return path if name in LORA_FACTORS else path + (name,)


def candidate_layers(
  params, kernel_input_ndim: KernelInputNdim = None, stats: Stats | None = None
) -> dict[LayerKey, LayerShape]:
  """Every ``kernel`` leaf of rank >= 2, every 2-D ``embedding`` and LoRA factor (``lora_a``/``lora_b``) leaf:
  the layers a transform allocates state for.

  The parameters alone do not say how a kernel splits into input and output
  axes; the default is "all but the last axis are inputs" (``nn.Dense``,
  ``nn.Conv``, ``nn.DenseGeneral`` with one output axis), except that 3-D
  kernels of layers named ``query``/``key``/``value`` (Flax attention) have one
  input axis. ``kernel_input_ndim`` overrides this: a mapping from a layer path
  or glob pattern (``"Block_0/Dense_1"``, ``"*/proj"``) to its number of input
  axes or a :class:`KernelLayout` (with stack axes), or a callable
  ``(path, kernel_shape) -> int | KernelLayout | None`` (``None`` keeps the
  default). Where it says nothing, ``stats`` (captured statistics, if given)
  give the layout of their layers. A stacked layer yields one entry per copy.
  """
  used: set = set()
  layers = {}
  flat = flatten(params).leaves
  captured = {key: KernelLayout(s.kernel_input_ndim, len(s.stack_shape)) for key, s in (stats or {}).items()}
  for path, leaf in flat.items():
    if not path or path[-1] not in ("kernel", "embedding", *LORA_FACTORS) or jnp.ndim(leaf) < 2:
      continue
    lora = path[-1] in LORA_FACTORS
    key = tuple(path) if lora else tuple(path[:-1])
    shape = tuple(jnp.shape(leaf))
    layout = _resolve_layout(kernel_input_ndim, layer_name(key), shape, used, captured.get(key))
    embedding = path[-1] == "embedding"
    one_input = embedding or lora  # a table's one-hot rows; a LoRA factor's (d_in, rank) / (rank, d_out)
    if layout is None:
      if one_input and len(shape) != 2:
        continue  # a table or factor with more axes: not one we capture unless told its layout
      layout = KernelLayout(1 if one_input else default_kernel_input_ndim(layer_name(key), shape))
    stack, k = layout.stack_ndim, layout.input_ndim
    if not 0 <= stack < len(shape) - 1 or not 1 <= k < len(shape) - stack or (one_input and k != 1):
      given = layout if stack else k
      raise ValueError(
        f"kernel_input_ndim[{layer_name(key)!r}]={given} is not in [1, {len(shape) - stack - 1}] for a "
        f"{path[-1]} of shape {shape} with {stack} stack axes (embeddings and LoRA factors have 1 input axis)."
      )
    kernel_shape = shape[stack:]
    has_bias = not one_input and key + ("bias",) in flat
    layer = LayerShape(
      math.prod(kernel_shape[:k]) + int(has_bias),
      math.prod(kernel_shape[k:]),
      has_bias,
      kernel_shape,
      k,
      path[-1],
      shape[:stack],
    )
    if not stack:
      layers[key] = layer
      continue
    for index in np.ndindex(*shape[:stack]):
      layers[key + (StackIndex(index),)] = layer
  if isinstance(kernel_input_ndim, Mapping) and set(kernel_input_ndim) - used:
    raise ValueError(
      f"kernel_input_ndim names layers without a kernel in params: {sorted(set(kernel_input_ndim) - used)}."
    )
  return layers


def kernel_layouts(stats: Stats) -> dict[str, int | KernelLayout]:
  """``{layer path: layout}`` of the captured layers, for a transform's ``kernel_input_ndim=``.

  A plain layer maps to its number of kernel input axes, a stacked one to a
  :class:`KernelLayout` with its stack axes. Stateful transforms (FOOF, KFAC,
  FNGD, ``accumulate_micro_batches``) allocate one state per copy of a stacked
  layer at ``init``, before any statistics exist, so they need this layout
  (``nox.kernel_layouts(stats)``) when the model has stacked layers.
  """
  layouts = {}
  for key, s in stats.items():
    stack = len(s.stack_shape)
    layouts[layer_name(key)] = KernelLayout(s.kernel_input_ndim, stack) if stack else s.kernel_input_ndim
  return layouts


def kernel_dtype(params, key: LayerKey):
  """The dtype of layer ``key``'s kernel (embedding, LoRA factor) leaf."""
  leaves = flatten(params).leaves
  path, _ = _leaf_and_index(key)
  for leaf_path in (path + ("kernel",), path + ("embedding",), path):  # the last: a LoRA factor
    if leaf_path in leaves:
      return leaves[leaf_path].dtype
  raise KeyError(f"no kernel, embedding or LoRA factor at layer {layer_name(key)!r}")


def check_stats_type(stats, transform: str) -> None:
  """A clear TypeError where ``stats`` is not what ``value_grad_and_stats`` returns (e.g. ``grads`` and ``stats`` swapped)."""
  if isinstance(stats, Mapping) and all(isinstance(v, (LayerStats, LayerMoments)) for v in stats.values()):
    return
  if isinstance(stats, Mapping):
    wrong = next(v for v in stats.values() if not isinstance(v, (LayerStats, LayerMoments)))
    got = f"a dict whose values include a {type(wrong).__name__}"
  else:
    got = f"a {type(stats).__name__}"
  raise TypeError(
    f"{transform}: `stats` must be the dict returned by nox.value_grad_and_stats (layer name -> LayerStats), got "
    f"{got}. If you passed the gradients there, the arguments are swapped: "
    "`loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params)` then "
    "`tx.update(grads, opt_state, params, stats=stats)`."
  )


def check_stats(
  stats: Stats | None,
  layers: Mapping[LayerKey, LayerShape],
  transform: str,
  *,
  need_rows: bool = False,
  tied_tables: bool = True,
) -> Stats:
  """Trace-time validation of ``stats`` against the layers of the incoming updates.

  Returns the statistics of the layers present in the updates, a stacked
  layer's split into one entry per copy (``key + (StackIndex(index),)``).
  Layers whose parameters are not there (masked out by ``optax.masked``,
  routed to another optimiser by ``optax.multi_transform``) are ignored;
  statistics that match none of the updates' layers are an error (e.g. the
  whole variables dict passed instead of its ``'params'`` collection).
  ``tied_tables=False`` (FOOF, KFAC: their factors cannot combine a table's
  two uses) leaves embeddings tied to an output layer out, with a warning:
  their gradients pass through.
  """
  if stats is None:
    raise ValueError(
      f"{transform}.update needs the layer statistics: compute them with "
      "`loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params, ...)` and call "
      "`tx.update(grads, opt_state, params, stats=stats)`."
    )
  check_stats_type(stats, transform)
  present = {}
  for key, s in stats.items():
    if not tied_tables and getattr(s, "tied", None) is not None:
      if _present(key, s, layers):
        warnings.warn(
          f"{transform}: embedding {layer_name(key)!r} is tied to an output layer (Embed.attend); "
          f"{transform} does not precondition tied tables (the lookups' input factor and the output "
          "layer's lie on different sides of the table), so its gradient passes through unchanged. "
          "natural_gradient and fngd precondition tied tables exactly; route the table to another "
          "optimiser with optax.multi_transform to silence this warning.",
          stacklevel=3,
        )
      continue
    copies = [key + (StackIndex(index),) for index in np.ndindex(*s.stack_shape)] if s.stack_shape else []
    if copies and all(copy in layers for copy in copies):
      present.update((copy, s.copy(tuple(copy[-1]))) for copy in copies)
    elif copies and key in layers:
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r} is stacked: its parameter holds {len(copies)} copies "
        f"(stack shape {s.stack_shape}) of a {s.kernel_shape} kernel (applied inside nn.scan/nn.vmap), "
        "but the transform treats it as one matrix. Pass kernel_input_ndim=nox.kernel_layouts(stats) "
        "(nox.nnx.kernel_layouts(model) for NNX) to the transform, so that init gives every copy "
        "its own state."
      )
    elif key in layers:
      present[key] = s
  if stats and layers and not present:
    key = next(iter(stats))
    raise ValueError(
      f"{transform}: stats hold layer {layer_name(key)!r} but the parameters have no kernel at "
      f"that path (layers with kernels: {sorted(layer_name(k) for k in layers)}). Pass the "
      "model's 'params' collection (not the whole variables dict) to init and update."
    )
  for key, s in present.items():
    shape = layers[key]
    path, index = _leaf_and_index(key)
    if (s.kind == "embed") != shape.is_embedding:
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r} is {'an embedding' if s.kind == 'embed' else 'a ' + s.kind} "
        f"layer in stats but its parameters hold a {shape.param!r}."
      )
    if shape.kernel_shape != s.kernel_shape:
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r} has kernel {shape.kernel_shape} in params but {s.kernel_shape} in stats."
      )
    if shape.kernel_input_ndim != s.kernel_input_ndim:
      layout = s.kernel_input_ndim if index is None else KernelLayout(s.kernel_input_ndim, len(index))
      raise ValueError(
        f"{transform}: layer {layer_name(key)!r} has {s.kernel_input_ndim} kernel input axes "
        f"(kernel {s.kernel_shape}), but the state was built assuming {shape.kernel_input_ndim}. "
        f"Pass kernel_input_ndim={{{layer_name(path)!r}: {layout}}} to the transform."
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
  stacked = len(s.stack_shape)  # a stacked layer's arrays have its stack axes in front
  cot = tuple(s.cotangents.shape)[stacked:]
  if len(cot) != 3:
    raise ValueError(
      f"{transform}: layer {name!r} has cotangents of shape {cot}; LayerStats.cotangents must be "
      "(examples, positions, d_out), as nox.value_grad_and_stats records them."
    )
  if s.kind == "embed":  # (examples, positions) token ids
    ids = s.layer_inputs.ids if isinstance(s.layer_inputs, TokenRows) else s.layer_inputs
    inputs = tuple(jnp.shape(ids))[stacked:]
    rows_in = inputs if len(inputs) == 2 else None
  elif s.conv is None:
    inputs = tuple(jnp.shape(s.layer_inputs))[stacked:]
    rows_in = inputs[:2] if len(inputs) == 3 else None
  else:
    rows_in = (s.conv.examples, sum(s.conv.positions(x) for x in s.layer_inputs))
    inputs = tuple(tuple(jnp.shape(x))[stacked:] for x in s.layer_inputs)
  if rows_in != cot[:2]:
    raise ValueError(
      f"{transform}: layer {name!r} recorded inputs {inputs} for (examples, positions) = {rows_in} but "
      f"cotangents {cot} for {cot[:2]}: the statistics were edited or assembled from different batches. "
      "Pass the stats that nox.value_grad_and_stats returned for this batch."
    )
  if s.fisher_cotangents is not None and tuple(s.fisher_cotangents.shape)[stacked + 1 :] != cot:
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


def _present(key: LayerKey, s, layers: Mapping[LayerKey, LayerShape]) -> bool:
  """Whether the updates hold layer ``key`` (or its first copy, for a stacked layer)."""
  return key in layers or (bool(s.stack_shape) and key + (StackIndex((0,) * len(s.stack_shape)),) in layers)


def _leaf(flat: Mapping[Path, Any], key: LayerKey, name: str) -> jax.Array:
  path, index = _leaf_and_index(key)
  leaf = flat[_leaf_path(path, name)]
  return leaf if index is None else leaf[index]


def gradient_matrix(flat: Mapping[Path, Any], key: LayerKey, shape: LayerShape) -> jax.Array:
  """``(d_in(+1), d_out)`` matrix of the layer's kernel (and bias) leaves (one copy's for a stacked layer)."""
  kernel = _leaf(flat, key, shape.param).reshape(shape.d_in - int(shape.has_bias), shape.d_out)
  if not shape.has_bias:
    return kernel
  return jnp.concatenate([kernel, _leaf(flat, key, "bias").reshape(1, shape.d_out)], axis=0)


def gradient_matrices(tree, layers: Mapping[LayerKey, LayerShape], keys) -> dict[LayerKey, jax.Array]:
  """``{key: gradient matrix}`` of the layers ``keys`` of a params-shaped tree."""
  flat = flatten(tree).leaves
  return {key: gradient_matrix(flat, key, layers[key]) for key in keys}


def _split_matrix(shape: LayerShape, matrix: jax.Array) -> dict[str, jax.Array]:
  """A gradient-matrix-shaped update as one copy's leaves ``{leaf name: array}``."""
  rows = shape.d_in - int(shape.has_bias)
  leaves = {shape.param: matrix[:rows].reshape(shape.kernel_shape)}
  if shape.has_bias:
    leaves["bias"] = matrix[rows]
  return leaves


def map_layers(
  updates,
  layers: Mapping[LayerKey, LayerShape],
  keys,
  fn: Callable[[LayerKey, jax.Array], jax.Array],
  *,
  keep_non_finite: bool = False,
):
  """Replaces the gradient matrix of every layer in ``keys`` by ``fn(key, matrix)``.

  A direction that is not finite (a bad batch) is replaced by zeros, so that
  layer (that copy of a stacked layer) takes no step; the optimizer states
  stay finite by construction (``keep_non_finite=True``: written as is, for
  results that are not steps, such as posterior samples). The copies of a stacked layer are written back
  as one stacked leaf.
  """
  tree = flatten(updates)
  flat = dict(tree.leaves)
  copies: dict[Path, dict[tuple[int, ...], jax.Array]] = {}
  for key in keys:
    shape = layers[key]
    direction = fn(key, gradient_matrix(tree.leaves, key, shape))
    finite = True if keep_non_finite else jnp.all(jnp.isfinite(direction))
    path, index = _leaf_and_index(key)
    # Guarding the split leaves (not the matrix) lets XLA fold slice(concatenate(kernel, bias))
    # away, so a direction built as kernel and bias parts is never copied into one matrix.
    for name, value in _split_matrix(shape, direction).items():
      leaf_path = _leaf_path(path, name)
      leaf = tree.leaves[leaf_path]
      value = jnp.where(finite, value, jnp.zeros_like(value)).astype(leaf.dtype)
      if index is None:
        flat[leaf_path] = value.reshape(leaf.shape)
      else:
        copies.setdefault(leaf_path, {})[index] = value
  for leaf_path, parts in copies.items():
    leaf = tree.leaves[leaf_path]
    stack_shape = leaf.shape[: len(next(iter(parts)))]
    indices = list(np.ndindex(*stack_shape))
    if all(index in parts for index in indices):
      flat[leaf_path] = jnp.stack([parts[index] for index in indices]).reshape(leaf.shape)
    else:
      value = leaf
      for index, part in parts.items():
        value = value.at[index].set(part.reshape(leaf.shape[len(index) :]))
      flat[leaf_path] = value
  return tree.rebuild(flat)


def input_factor_shape(shape: LayerShape) -> tuple[int, ...]:
  """Shape of a layer's input factor ``A``: ``(d_in, d_in)``, or ``(vocab,)`` for an embedding,
  whose ``A`` (of one-hot rows) is diagonal and kept as its diagonal."""
  return (shape.d_in,) if shape.is_embedding else (shape.d_in, shape.d_in)


def identity(factor_shape: tuple[int, ...], dtype) -> jax.Array:
  """The identity matrix in a factor's storage (a vector of ones for a diagonal factor)."""
  return jnp.ones(factor_shape, dtype) if len(factor_shape) == 1 else jnp.eye(factor_shape[0], dtype=dtype)


def statistics_dtype(dtype) -> jnp.dtype:
  """At least float32: bf16/fp16 statistics are accumulated in float32."""
  return jnp.promote_types(dtype, jnp.float32)
