"""How a layer call's input becomes rows: the row builders both front-ends share.

Dense layers (and ``einsum`` contractions that are one weight matrix,
:func:`einsum_layout`) give rows ``(n, P, d_in)`` (leading axis examples, the other
non-contracted axes positions); embeddings their token ids ``(n, P)``. Convolutions give their prepared input (one
batch axis, padding modes applied) and a :class:`ConvGeometry`, from which the
im2col rows are built on demand. The functions take the layers' attributes as
plain values, named as ``nn.DenseGeneral``/``nn.Conv`` and
``nnx.LinearGeneral``/``nnx.Conv`` name them, so linen and NNX share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

from neuron_optax._src.layer_stats import ConvGeometry, LayerKey, layer_name


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


class EinsumLayout(NamedTuple):
  """``einsum(equation, x, kernel)`` read as ``rows @ W``: how ``x`` becomes rows and the output's axis order."""

  input_perm: tuple[int, ...]  # input axes -> (batch axes in input order, contracted in kernel order)
  n_batch: int
  n_contracted: int
  output_perm: tuple[int, ...] | None


def einsum_layout(equation: str, x_ndim: int, kernel_ndim: int) -> EinsumLayout | str:
  """Layout of ``einsum(equation, x, kernel)`` as ``rows @ W``, or why it is not one (a string).

  One weight matrix applied to rows of the input: every kernel label is either
  contracted with the input (and absent from the output) or an output label
  (absent from the input), the contracted labels come first in the kernel, the
  output lists the kernel's output labels in kernel order, the input's first
  axis is not contracted, and every non-contracted input label reaches the
  output (no ``...`` in the kernel, no repeated labels).
  """
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    return "the equation is not explicit with two operands"
  operands, out = equation.split("->")
  lhs, rhs = operands.split(",")
  if "..." in rhs:
    return "the kernel has an ellipsis"
  if "..." in lhs:
    used = set(lhs + rhs + out)
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    n_ellipsis = x_ndim - (len(lhs) - 3)
    if n_ellipsis < 0 or n_ellipsis > len(free):
      return "the ellipsis does not fit the input"
    fill = "".join(free[:n_ellipsis])
    lhs = lhs.replace("...", fill)
    out = out.replace("...", fill) if "..." in out else out
  if "." in lhs + rhs + out:
    return "the equation has a misplaced ellipsis"
  if len(lhs) != x_ndim or len(rhs) != kernel_ndim:
    return "the equation does not match the operands' ranks"
  if any(len(set(s)) != len(s) for s in (lhs, rhs, out)):
    return "a label repeats within an operand (a diagonal)"
  contracted = [c for c in rhs if c in lhs]
  outputs = [c for c in rhs if c not in lhs]
  batch = [c for c in lhs if c not in rhs]
  if any(c in out for c in contracted):
    return "a kernel axis is shared with the input and the output (one kernel per index)"
  if any(c not in out for c in outputs):
    return "a kernel axis is summed over"
  if any(c not in out for c in batch):
    return "an input axis is summed over"
  if not contracted:
    return "no axis is contracted"
  if list(rhs) != contracted + outputs:
    return "the kernel's contracted axes do not all come before its output axes"
  if [c for c in out if c in outputs] != outputs:
    return "the output's kernel axes are not in the kernel's order"
  if batch and lhs[0] not in batch:
    return "the input's first (example) axis is contracted"
  input_perm = tuple(lhs.index(c) for c in batch + contracted)
  output_perm = tuple(out.index(c) for c in batch + outputs)
  identity = output_perm == tuple(range(len(out)))
  return EinsumLayout(input_perm, len(batch), len(contracted), None if identity else output_perm)


def einsum_rows(layout: EinsumLayout, x: jax.Array) -> jax.Array:
  return transposed_rows(x, layout.input_perm, layout.n_batch)


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


CONV_SETTINGS = (
  "kernel_size",
  "strides",
  "padding",
  "input_dilation",
  "kernel_dilation",
  "feature_group_count",
  "mask",
)


def conv_settings(module) -> dict:
  """The keyword arguments of :func:`conv_input` read off a convolution module (``nn.Conv`` and ``nnx.Conv`` name
  them alike)."""
  return {name: getattr(module, name) for name in CONV_SETTINGS}


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
