"""The data contract: what one captured layer recorded in one forward/backward pass.

Everything the transforms read about a layer is a :class:`LayerStats`: its
input rows (im2col patches for convolutions, rebuilt on demand from the
recorded input and a :class:`ConvGeometry`), the cotangent of the mean loss
with respect to its outputs, and for the Monte-Carlo/full Fisher the Fisher's
output cotangents. ``Stats`` maps each layer's path in the parameter tree
(``LayerKey``) to its ``LayerStats``.

This module imports no Flax: the linen and NNX front-ends produce these
records, the methods consume them.

Conventions (README, "Conventions"): rows are examples (dense layers; extra
leading axes such as tokens are positions within an example) or examples times
output positions (convolutions). ``n`` is the size of the leading (example)
axis; the per-example cotangent is ``g = n · cot``.

Embeddings (``kind="embed"``) are dense layers whose input row is the one-hot
vector of a token: they record the token ids, never the one-hot rows. Stacked
layers (applied inside ``nn.scan``/``nn.vmap``/``nnx.scan``/``nnx.vmap`` over
parameters with leading layer axes) record every copy: their data fields have
those axes in front (``stack_shape``), and :meth:`LayerStats.copy` gives one
copy's statistics; the transforms treat the copies as separate layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp

LayerKey = tuple[Hashable, ...]

# nnx.LoRA's adapter leaves: each is the weight matrix of a bias-free dense layer of its own, keyed by the
# leaf's own path (one module holds both, so its path cannot be the key as it is for a kernel).
LORA_FACTORS = ("lora_a", "lora_b")


class KernelLayout(NamedTuple):
  """How a parameter splits into copies, input and output axes.

  ``param[index]`` for an index over the first ``stack_ndim`` axes is one
  copy's kernel, whose first ``input_ndim`` axes are inputs and the rest
  outputs. A plain ``int`` in a ``kernel_input_ndim`` mapping means
  ``KernelLayout(int, 0)``.
  """

  input_ndim: int
  stack_ndim: int = 0


class StackIndex(tuple):
  """Last entry of the key of one copy of a stacked layer: its index along the stack axes.

  ``('blocks', 'mlp', StackIndex((2,)))`` is copy 2 of the layer whose kernel
  ``params['blocks']['mlp']['kernel']`` has one leading stack axis; its name
  is ``'blocks/mlp[2]'``.
  """

  def __str__(self) -> str:
    return "[" + ",".join(map(str, self)) + "]"

  def __repr__(self) -> str:
    return f"StackIndex({tuple(self)!r})"


def layer_name(key: LayerKey) -> str:
  """Human-readable layer path used in errors and state keys (``'<top-level>'`` for ``()``).

  A copy of a stacked layer is named by its layer and index: ``'blocks/mlp[2]'``.
  """
  if key and isinstance(key[-1], StackIndex):
    return layer_name(key[:-1]) + str(key[-1])
  return "/".join(map(str, key)) if key else "<top-level>"


@dataclasses.dataclass(frozen=True)
class TokenRows:
  """One-hot input rows kept as token ids (a pytree): row ``(i, p)`` is ``e_{ids[i, p]}`` in ``R^vocab``.

  What an embedding's statistics give the linear algebra instead of ``(n, P,
  vocab)`` one-hot rows: products with them are gathers and scatter-adds. For a
  table tied to an output layer (``Embed.attend``, ``logits = q tableᵀ``) it
  also carries that use's rows, whose per-example gradients add to the
  lookups': ``ψ_si = Σ_p e_{t_ip} g_sipᵀ + Σ_q h_siq q_iqᵀ``.
  """

  ids: jax.Array  # (n, P) integer token ids
  vocab: int
  queries: jax.Array | None = None  # (n, Q, features): the inputs of the attend calls
  attend_cotangents: jax.Array | None = None  # (S, n, Q, vocab): their per-example output cotangents h

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of the one-hot rows these ids stand for, ``(n, P, vocab)``."""
    return tuple(self.ids.shape) + (self.vocab,)

  def one_hot(self, dtype=None) -> jax.Array:
    return jax.nn.one_hot(self.ids, self.vocab, dtype=dtype or jnp.float32)


jax.tree_util.register_dataclass(TokenRows, data_fields=["ids", "queries", "attend_cotangents"], meta_fields=["vocab"])


class ConvGeometry(NamedTuple):
  """Static description of a convolution call, enough to rebuild its im2col rows.

  The recorded input is already reshaped to one leading batch axis and padded
  for the ``CIRCULAR``/``REFLECT``/``CAUSAL`` modes; ``padding`` is what
  ``lax.conv_general_dilated`` gets; ``examples`` is ``n``.
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  examples: int

  def _dimension_numbers(self):
    spatial = "DHW"[-len(self.kernel_size) :]
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")

  def rows(self, x: jax.Array) -> jax.Array:
    """im2col patches ``(n, P, prod(window) * C_in)`` in the kernel's flattening order."""
    rank = len(self.kernel_size)
    patches = jax.lax.conv_general_dilated_patches(
      x,
      self.kernel_size,
      self.strides,
      self.padding,
      lhs_dilation=self.input_dilation,
      rhs_dilation=self.kernel_dilation,
      dimension_numbers=self._dimension_numbers(),
    )
    c_in = x.shape[-1]
    # lax orders patch features (C, *window); the kernel flattens as (*window, C).
    patches = patches.reshape(patches.shape[:-1] + (c_in,) + self.kernel_size)
    patches = jnp.moveaxis(patches, -rank - 1, -1)
    return patches.reshape(self.examples, -1, c_in * math.prod(self.kernel_size))

  def positions(self, x: jax.Array) -> int:
    """Output positions per example of one call (``P`` of its rows)."""
    return jax.eval_shape(self.rows, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[1]

  def kernel_gradient(self, x: jax.Array, cotangents: jax.Array) -> jax.Array:
    """``Σ_rows patch_r cot_rᵀ``, ``(prod(window) * C_in, d_out)``, without forming the patches.

    The convolution is linear in its kernel; its transpose applied to the
    output cotangents is the kernel gradient (one backward-filter convolution,
    as in the ordinary backward pass).
    """
    d_out = cotangents.shape[-1]
    kernel = jax.ShapeDtypeStruct(self.kernel_size + (x.shape[-1], d_out), cotangents.dtype)

    def convolve(k):
      return jax.lax.conv_general_dilated(
        x.astype(cotangents.dtype),
        k,
        self.strides,
        self.padding,
        lhs_dilation=self.input_dilation,
        rhs_dilation=self.kernel_dilation,
        dimension_numbers=self._dimension_numbers(),
      )

    out_shape = jax.eval_shape(convolve, kernel).shape
    (gradient,) = jax.linear_transpose(convolve, kernel)(cotangents.reshape(out_shape))
    return gradient.reshape(-1, d_out)


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """What one captured layer recorded in one forward/backward pass (a pytree).

  Attributes:
    layer_inputs: what the layer's calls received. Dense layers: the rows
      ``(n, P, d_in)`` (all calls of a shared layer concatenated along ``P``).
      Convolutions: a tuple with each call's (prepared) input; their im2col
      rows are only built when :attr:`inputs` is read, so a step that needs
      only the gradient-shaped products (FNGD's weighted sum, FOOF's
      ``A⁻¹∇W``) never forms them. Embeddings: the token ids ``(n, P)``, the
      one-hot rows they stand for are never formed.
    cotangents: ``(n, P, d_out)`` cotangent of the (mean) loss w.r.t. the layer
      outputs. The layer's weight gradient is ``inputsᵀ cotangents`` summed
      over examples and positions.
    fisher_cotangents: ``(S, n, P, d_out)`` per-example output cotangents of the
      Fisher (``S`` label sets; square-root probability weights already applied
      for the full Fisher), or ``None`` for the empirical Fisher, whose single
      set is ``n * cotangents``.
    kind: ``"dense"``, ``"conv"`` or ``"embed"`` (static).
    has_bias: whether the layer has a bias, the last row of the gradient matrix (static).
    kernel_shape: the kernel's shape (an embedding's table ``(vocab, features)``;
      one copy's kernel for stacked layers) (static).
    kernel_input_ndim: how many leading kernel axes are input axes; the kernel
      is the matrix ``kernel.reshape(prod(shape[:k]), prod(shape[k:]))`` (static).
    conv: the convolution's :class:`ConvGeometry` (``None`` for dense layers; static).
    stack_shape: the leading stack axes of a layer applied inside ``nn.scan`` /
      ``nn.vmap`` over stacked parameters (its parameter is
      ``stack_shape + kernel_shape``); every data field then has these axes in
      front (``fisher_cotangents``: ``stack_shape + (S, n, P, d_out)``), and
      the methods below apply to one copy (:meth:`copy`) (static).
    tied: an embedding's calls as an output layer (``Embed.attend``:
      ``logits = q tableᵀ``), a dense :class:`LayerStats` with kernel
      ``tableᵀ`` (``(features, vocab)``, no bias); the table's gradient is the
      sum of both uses' (``None``: the table is only looked up).
  """

  layer_inputs: jax.Array | tuple[jax.Array, ...]
  cotangents: jax.Array
  fisher_cotangents: jax.Array | None = None
  kind: str = "dense"
  has_bias: bool = True
  kernel_shape: tuple[int, ...] = ()
  kernel_input_ndim: int = 1
  conv: ConvGeometry | None = None
  stack_shape: tuple[int, ...] = ()
  tied: LayerStats | None = None

  def replace(self, **changes) -> LayerStats:
    return dataclasses.replace(self, **changes)

  has_rows = True  # the recorded rows are available (LayerMoments: only their second moments)

  def copy(self, index: tuple[int, ...]) -> LayerStats:
    """The statistics of copy ``index`` (a tuple over :attr:`stack_shape`) of a stacked layer."""
    index = tuple(index)
    if len(index) != len(self.stack_shape):
      raise ValueError(f"copy index {index} does not match the stack shape {self.stack_shape}.")
    leaves = jax.tree.map(lambda x: x[index], (self.layer_inputs, self.cotangents, self.fisher_cotangents))
    return self.replace(
      layer_inputs=leaves[0],
      cotangents=leaves[1],
      fisher_cotangents=leaves[2],
      stack_shape=(),
      tied=None if self.tied is None else self.tied.copy(index),
    )

  def _one_copy(self, what: str) -> None:
    if self.stack_shape:
      raise ValueError(
        f"LayerStats.{what} of a stacked layer (stack shape {self.stack_shape}): select one copy "
        "with .copy(index) first."
      )

  def input_moment(self, dtype=None) -> jax.Array:
    """``A_batch = mean_r ā_r ā_rᵀ`` over the recorded rows, ``(d_in, d_in)``.

    Embeddings: the diagonal ``(vocab,)`` (token frequencies), the matrix is diagonal.
    """
    self._one_copy("input_moment")
    if self.kind == "embed":
      ids = self.layer_inputs.reshape(-1)
      counts = jnp.zeros(self.d_in, dtype or jnp.float32).at[ids].add(1)
      return counts / ids.shape[0]
    x = self.augmented_inputs(dtype)
    x = x.reshape(-1, x.shape[-1])
    return (x.T @ x) / x.shape[0]

  def cotangent_moment(self, dtype=None) -> jax.Array:
    """``G_batch = Σ_s mean_r g_sr g_srᵀ`` of the Fisher cotangents, ``(d_out, d_out)``.

    Summed over the ``S`` label sets (the full Fisher's sets carry ``√p``
    already, so the sum is the expectation over labels) and averaged over the
    ``n·P`` rows.
    """
    g = self.per_example_cotangents(dtype)
    x = g.reshape(g.shape[0], -1, g.shape[-1])
    return jnp.einsum("sri,srj->ij", x, x) / x.shape[1]

  @property
  def inputs(self) -> jax.Array:
    """``(n, P, d_in)`` input rows without the bias column (im2col patches for convolutions, one-hot rows for embeddings)."""
    self._one_copy("inputs")
    if self.kind == "embed":
      return jax.nn.one_hot(self.layer_inputs, self.d_in, dtype=self.cotangents.dtype)
    if self.conv is None:
      return self.layer_inputs
    parts = [self.conv.rows(x) for x in self.layer_inputs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

  @property
  def batch_size(self) -> int:
    return self.cotangents.shape[len(self.stack_shape)]

  @property
  def num_rows(self) -> int:
    """Rows ``R = n · P`` (examples × positions)."""
    k = len(self.stack_shape)
    return self.cotangents.shape[k] * self.cotangents.shape[k + 1]

  @property
  def d_in(self) -> int:
    """Rows of the gradient matrix: kernel input size, plus one for the bias."""
    if self.conv is None and self.kind != "embed":
      return self.layer_inputs.shape[-1] + int(self.has_bias)
    return math.prod(self.kernel_shape[: self.kernel_input_ndim]) + int(self.has_bias)

  @property
  def d_out(self) -> int:
    return self.cotangents.shape[-1]

  def augmented_inputs(self, dtype=None) -> jax.Array:
    """``(n, P, d_in)`` inputs with the trailing 1 of the bias (if any)."""
    x = self.inputs if dtype is None else self.inputs.astype(dtype)
    if not self.has_bias:
      return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)

  def row_operand(self, dtype=None, *, empirical: bool = False) -> jax.Array | TokenRows:
    """The augmented input rows as the linear algebra takes them: :meth:`augmented_inputs`,
    or for embeddings the token ids (:class:`TokenRows`) instead of one-hot rows, with the rows
    of a tied output use and their per-example cotangents (the Fisher's, or with ``empirical``
    the true labels' ``n · cot``)."""
    if self.kind == "embed":
      self._one_copy("row_operand")
      if self.tied is None:
        return TokenRows(self.layer_inputs, self.d_in)
      queries = self.tied.inputs if dtype is None else self.tied.inputs.astype(dtype)
      if empirical:
        cotangents = self.tied.cotangents[None] * self.batch_size
        cotangents = cotangents if dtype is None else cotangents.astype(dtype)
      else:
        cotangents = self.tied.per_example_cotangents(dtype)
      return TokenRows(self.layer_inputs, self.d_in, queries, cotangents)
    return self.augmented_inputs(dtype)

  def kernel_gradient(self, cotangents: jax.Array) -> jax.Array:
    """``Σ_rows a_r c_rᵀ`` (``(d_in without bias, d_out)``) for cotangent rows ``c`` shaped like :attr:`cotangents`.

    With the recorded cotangents this is the kernel's gradient; with
    re-weighted ones (FNGD) a weighted sum of per-example gradients. For
    convolutions it is a backward-filter convolution per call; the im2col
    rows are not formed. For embeddings it is a scatter-add of the
    cotangents into the rows of their tokens (the lookups' part only: a tied
    output use adds :meth:`tied_gradient`).
    """
    self._one_copy("kernel_gradient")
    if self.kind == "embed":
      ids = self.layer_inputs.reshape(-1)
      return jax.ops.segment_sum(cotangents.reshape(ids.shape[0], -1), ids, num_segments=self.d_in)
    if self.conv is None:
      a = self.layer_inputs.astype(cotangents.dtype)
      return a.reshape(-1, a.shape[-1]).T @ cotangents.reshape(-1, cotangents.shape[-1])
    total, start = None, 0
    for x in self.layer_inputs:
      positions = self.conv.positions(x)
      part = self.conv.kernel_gradient(x, cotangents[:, start : start + positions])
      total = part if total is None else total + part
      start += positions
    return total

  def tied_gradient(self, dtype=None) -> jax.Array | None:
    """A tied table's gradient from its output use, ``Σ_rows h_r q_rᵀ`` in the table's orientation
    ``(vocab, features)`` (``None`` without one)."""
    if self.tied is None:
      return None
    cotangents = self.tied.cotangents if dtype is None else self.tied.cotangents.astype(dtype)
    return self.tied.kernel_gradient(cotangents).T

  def per_example_cotangents(self, dtype=None) -> jax.Array:
    """``(S, n, P, d_out)`` Fisher cotangents ``g`` (empirical: ``n * cot``).

    A tied table's output use keeps its own (``tied.per_example_cotangents``), with the same ``n``.
    """
    self._one_copy("per_example_cotangents")
    if self.fisher_cotangents is None:
      g = self.cotangents[None] * self.batch_size
    else:
      g = self.fisher_cotangents
    return g if dtype is None else g.astype(dtype)


jax.tree_util.register_dataclass(
  LayerStats,
  data_fields=["layer_inputs", "cotangents", "fisher_cotangents", "tied"],
  meta_fields=["kind", "has_bias", "kernel_shape", "kernel_input_ndim", "conv", "stack_shape"],
)


Stats = dict[LayerKey, LayerStats]


@dataclasses.dataclass(frozen=True)
class LayerMoments:
  """A layer's second moments without its rows (a pytree): what FOOF and KFAC need.

  :func:`neuron_optax.accumulate_micro_batches` averages these over the
  micro-batches of one step, so that ``k`` micro-batches give exactly the
  statistics of one batch of all their rows. FOOF and KFAC accept them in
  place of :class:`LayerStats`; methods that need the rows (FNGD, the natural
  gradient) reject them.

  Attributes:
    input_second_moment: ``mean_r ā_r ā_rᵀ`` ``(d_in, d_in)`` (bias column included;
      embeddings: its diagonal ``(vocab,)``).
    cotangent_second_moment: ``Σ_s mean_r g_sr g_srᵀ`` ``(d_out, d_out)``.
    kind, has_bias, kernel_shape, kernel_input_ndim: as in :class:`LayerStats` (static).
  """

  input_second_moment: jax.Array
  cotangent_second_moment: jax.Array
  kind: str = "dense"
  has_bias: bool = True
  kernel_shape: tuple[int, ...] = ()
  kernel_input_ndim: int = 1

  has_rows = False
  stack_shape = ()  # moments are accumulated per copy of a stacked layer

  @classmethod
  def of(cls, stats: LayerStats, dtype=None) -> LayerMoments:
    """The moments of one layer's recorded rows."""
    return cls(
      stats.input_moment(dtype),
      stats.cotangent_moment(dtype),
      stats.kind,
      stats.has_bias,
      stats.kernel_shape,
      stats.kernel_input_ndim,
    )

  @property
  def d_in(self) -> int:
    return self.input_second_moment.shape[-1]

  @property
  def d_out(self) -> int:
    return self.cotangent_second_moment.shape[-1]

  def input_moment(self, dtype=None) -> jax.Array:
    return self.input_second_moment if dtype is None else self.input_second_moment.astype(dtype)

  def cotangent_moment(self, dtype=None) -> jax.Array:
    return self.cotangent_second_moment if dtype is None else self.cotangent_second_moment.astype(dtype)


jax.tree_util.register_dataclass(
  LayerMoments,
  data_fields=["input_second_moment", "cotangent_second_moment"],
  meta_fields=["kind", "has_bias", "kernel_shape", "kernel_input_ndim"],
)
