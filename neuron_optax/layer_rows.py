"""How a layer call's input becomes rows: the row builders both front-ends share.

Dense layers give rows ``(n, P, d_in)`` (leading axis examples, the other
non-contracted axes positions); embeddings their token ids ``(n, P)``. Convolutions give their prepared input (one
batch axis, padding modes applied) and a :class:`ConvGeometry`, from which the
im2col rows are built on demand. The functions take the layers' attributes as
plain values, named as ``nn.DenseGeneral``/``nn.Conv`` and
``nnx.LinearGeneral``/``nnx.Conv`` name them, so linen and NNX share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

from neuron_optax.layer_stats import ConvGeometry, LayerKey, layer_name


def as_rows(x: jax.Array) -> jax.Array:
  """``(..., d)`` -> ``(n, P, d)``: leading axis examples, the rest positions."""
  if x.ndim == 1:
    return x.reshape(1, 1, x.shape[0])
  return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # no -1: an empty batch has no size to infer


def token_rows(ids: jax.Array, key: LayerKey, vocab: int) -> jax.Array:
  """``(...)`` token ids of an embedding lookup -> ``(n, P)``: leading axis examples, the rest positions.

  The row of a lookup is the one-hot vector of its token, which is never formed. Ids in ``[-vocab, 0)`` are
  wrapped to ``id + vocab``, the row Flax's ``jnp.take`` looks up, so that every method preconditions the row
  the model used (ids outside ``[-vocab, vocab)`` look up NaN in Flax and give a non-finite loss).
  """
  if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
    raise TypeError(
      f"Layer {layer_name(key)!r}: an embedding lookup needs integer token ids, got {jnp.result_type(ids)}."
    )
  ids = jnp.where(ids < 0, ids + vocab, ids)
  if jnp.ndim(ids) == 0:
    return jnp.reshape(ids, (1, 1))
  return jnp.reshape(ids, (jnp.shape(ids)[0], -1))


def dense_general_axes(
  axis, batch_dims, ndim: int, key: LayerKey, *, layer_type: str = "nn.DenseGeneral", batch_arg: str = "batch_dims"
):
  """Sorted contracted axes and the remaining (example, position) axes of a general dense layer.

  ``layer_type`` and ``batch_arg`` only name the layer and its argument in
  error messages.
  """
  given = axis
  axis = axis if isinstance(axis, Sequence) else (axis,)
  axis = tuple(sorted(a if a >= 0 else ndim + a for a in axis))
  batch_dims = tuple(batch_dims) if isinstance(batch_dims, Sequence) else (batch_dims,)
  if batch_dims:
    raise NotImplementedError(
      f"Layer {layer_name(key)!r}: {layer_type} with {batch_arg}={batch_dims} has one "
      "kernel per batch index, which is not a single weight matrix; neuron_optax cannot "
      f"precondition it. Use {batch_arg}=() (or a plain Dense per batch index)."
    )
  rest = tuple(a for a in range(ndim) if a not in axis)
  if rest and rest[0] != 0:
    raise NotImplementedError(
      f"Layer {layer_name(key)!r}: {layer_type} contracts axis 0 (axis={given}), "
      "but neuron_optax treats axis 0 as the example axis. Contract non-leading axes only."
    )
  return axis, rest


def dense_general_rows(axis, batch_dims, x: jax.Array, key: LayerKey, **names) -> jax.Array:
  """``(n, P, d_in)`` rows of a general dense layer: contracted axes last, flattened."""
  axis, rest = dense_general_axes(axis, batch_dims, x.ndim, key, **names)
  return transposed_rows(x, rest + axis, len(rest))


def transposed_rows(x: jax.Array, permutation: tuple[int, ...], n_batch: int) -> jax.Array:
  """Rows ``(n, P, d_in)`` of ``x`` with its axes permuted to (batch axes, contracted axes)."""
  x = jnp.transpose(x, permutation)
  d_in = math.prod(x.shape[n_batch:])
  if not n_batch:
    return x.reshape(1, 1, d_in)
  return x.reshape(x.shape[0], math.prod(x.shape[1:n_batch]), d_in)


def _conv_padding(padding, x: jax.Array, kernel_size, kernel_dilation):
  """Returns (possibly padded inputs, lax padding) exactly as ``nn.Conv`` / ``nnx.Conv`` do."""
  padding = flax_linear.canonicalize_padding(padding, len(kernel_size))
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    left = kernel_dilation[0] * (kernel_size[0] - 1)
    x = jnp.pad(x, [(0, 0), (left, 0), (0, 0)])
    padding = "VALID"
  return x, padding


def conv_input(
  x: jax.Array,
  key: LayerKey,
  *,
  kernel_size,
  strides,
  padding,
  input_dilation,
  kernel_dilation,
  feature_group_count: int,
  mask,
  layer_type: str = "nn.Conv",
) -> tuple[jax.Array, ConvGeometry]:
  """The convolution's input prepared for im2col (one batch axis, modes padded) and its geometry."""
  if feature_group_count != 1:
    raise NotImplementedError(
      f"Layer {layer_name(key)!r}: grouped/depthwise convolutions (feature_group_count="
      f"{feature_group_count}) are not supported yet; their kernel is not one matrix."
    )
  if mask is not None:
    raise NotImplementedError(
      f"Layer {layer_name(key)!r}: masked convolutions ({layer_type} with mask=...) are not "
      "supported: preconditioning would move weights the mask keeps at zero."
    )
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  rank = len(kernel_size)
  if rank > 3:
    raise NotImplementedError(f"Layer {layer_name(key)!r}: convolutions of rank {rank} > 3.")

  def broadcast(v):
    v = 1 if v is None else v
    return (v,) * rank if isinstance(v, int) else tuple(v)

  n_batch = x.ndim - (rank + 1)
  n_examples = x.shape[0] if n_batch >= 1 else 1
  x = x.reshape((math.prod(x.shape[:n_batch]),) + x.shape[n_batch:])
  strides, input_dilation, kernel_dilation = map(broadcast, (strides, input_dilation, kernel_dilation))
  x, padding = _conv_padding(padding, x, kernel_size, kernel_dilation)
  if not isinstance(padding, str):
    padding = tuple(tuple(pair) for pair in padding)
  return x, ConvGeometry(kernel_size, strides, padding, input_dilation, kernel_dilation, n_examples)
