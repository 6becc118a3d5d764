"""Layer capture: one forward and one backward pass that also record neurons.

`value_grad_and_stats` wraps a loss function that applies a Flax linen model and
returns, next to the loss and its gradient, a :class:`LayerStats` for every
captured layer: the layer's inputs (im2col patches for convolutions) and the
cotangent of the loss with respect to the layer's outputs.

How it works: a `flax.linen.intercept_methods` interceptor sees every call of a
supported module. A first, abstract pass (`jax.eval_shape`) records the output
shape of each call; the real pass adds a zero array to each output and
differentiates the loss with respect to those zeros together with the
parameters, so the output cotangents cost no extra backward pass. The layer
inputs recorded during the traced call come back as auxiliary outputs. For the
Monte-Carlo and full Fisher, the cotangents of the sampled (or every) label's
negative log-likelihood are pulled back through the same linearisation
(`jax.vjp`), vmapped over the label sets.

Captured layers must run in the trace of the loss itself: a layer applied inside
a lifted transform (``nn.remat``, ``nn.scan``, ``nn.vmap``, ``nn.jit``, ...) or
a JAX transform within ``loss_fn`` raises ``NotImplementedError`` (not yet
supported).

Conventions (see the README, "Conventions"): rows are examples (Dense; extra
leading axes such as tokens are positions within an example) or examples times
output positions (Conv). ``n`` is the size of the leading (example) axis; the
per-example cotangent is ``g = n * cot``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

FisherType = Literal["empirical", "mc", "full"]
Likelihood = Literal["categorical", "gaussian"]
LayerKey = tuple[str, ...]

_FISHER_TYPES = ("empirical", "mc", "full")
_LIKELIHOODS = ("categorical", "gaussian")


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
    spatial = "DHW"[-len(self.kernel_size):]
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")

  def rows(self, x: jax.Array) -> jax.Array:
    """im2col patches ``(n, P, prod(window) * C_in)`` in the kernel's flattening order."""
    rank = len(self.kernel_size)
    patches = jax.lax.conv_general_dilated_patches(
        x, self.kernel_size, self.strides, self.padding, lhs_dilation=self.input_dilation,
        rhs_dilation=self.kernel_dilation, dimension_numbers=self._dimension_numbers())
    c_in = x.shape[-1]
    # lax orders patch features (C, *window); the kernel flattens as (*window, C).
    patches = patches.reshape(patches.shape[:-1] + (c_in,) + self.kernel_size)
    patches = jnp.moveaxis(patches, -rank - 1, -1)
    return patches.reshape(self.examples, -1, c_in * math.prod(self.kernel_size))

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
          x.astype(cotangents.dtype), k, self.strides, self.padding, lhs_dilation=self.input_dilation,
          rhs_dilation=self.kernel_dilation, dimension_numbers=self._dimension_numbers())

    out_shape = jax.eval_shape(convolve, kernel).shape
    (gradient,) = jax.linear_transpose(convolve, kernel)(cotangents.reshape(out_shape))
    return gradient.reshape(-1, d_out)


@struct.dataclass
class LayerStats:
  """What one captured layer recorded in one forward/backward pass.

  Attributes:
    layer_inputs: what the layer's calls received. Dense layers: the rows
      ``(n, P, d_in)`` (all calls of a shared layer concatenated along ``P``).
      Convolutions: a tuple with each call's (prepared) input; their im2col
      rows are only built when :attr:`inputs` is read, so a step that needs
      only the gradient-shaped products (FNGD's weighted sum, FOOF's
      ``A⁻¹∇W``) never forms them.
    cotangents: ``(n, P, d_out)`` cotangent of the (mean) loss w.r.t. the layer
      outputs. The layer's weight gradient is ``inputsᵀ cotangents`` summed
      over examples and positions.
    fisher_cotangents: ``(S, n, P, d_out)`` per-example output cotangents of the
      Fisher (``S`` label sets; square-root probability weights already applied
      for the full Fisher), or ``None`` for the empirical Fisher, whose single
      set is ``n * cotangents``.
    kind: ``"dense"`` or ``"conv"``.
    has_bias: whether the layer has a bias (the last row of the gradient matrix).
    kernel_shape: the kernel's shape.
    kernel_input_ndim: how many leading kernel axes are input axes; the kernel
      is the matrix ``kernel.reshape(prod(shape[:k]), prod(shape[k:]))``.
    conv: the convolution's :class:`ConvGeometry` (``None`` for dense layers).
  """

  layer_inputs: jax.Array | tuple[jax.Array, ...]
  cotangents: jax.Array
  fisher_cotangents: jax.Array | None = None
  kind: str = struct.field(pytree_node=False, default="dense")
  has_bias: bool = struct.field(pytree_node=False, default=True)
  kernel_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
  kernel_input_ndim: int = struct.field(pytree_node=False, default=1)
  conv: ConvGeometry | None = struct.field(pytree_node=False, default=None)

  @property
  def inputs(self) -> jax.Array:
    """``(n, P, d_in)`` input rows without the bias column (im2col patches for convolutions)."""
    if self.conv is None:
      return self.layer_inputs
    parts = [self.conv.rows(x) for x in self.layer_inputs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

  @property
  def batch_size(self) -> int:
    return self.cotangents.shape[0]

  @property
  def num_rows(self) -> int:
    """Rows ``R = n · P`` (examples × positions)."""
    return self.cotangents.shape[0] * self.cotangents.shape[1]

  @property
  def d_in(self) -> int:
    if self.conv is None:
      return self.layer_inputs.shape[-1] + int(self.has_bias)
    return math.prod(self.kernel_shape[:-1]) + int(self.has_bias)

  @property
  def d_out(self) -> int:
    return self.cotangents.shape[-1]

  def augmented_inputs(self, dtype=None) -> jax.Array:
    """``(n, P, d_in+1)`` inputs with the trailing 1 of the bias (if any)."""
    x = self.inputs if dtype is None else self.inputs.astype(dtype)
    if not self.has_bias:
      return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)

  def kernel_gradient(self, cotangents: jax.Array) -> jax.Array:
    """``Σ_rows a_r c_rᵀ`` (``(d_in without bias, d_out)``) for cotangent rows ``c`` shaped like :attr:`cotangents`.

    With the recorded cotangents this is the kernel's gradient; with
    re-weighted ones (FNGD) a weighted sum of per-example gradients. For
    convolutions it is a backward-filter convolution per call; the im2col
    rows are not formed.
    """
    if self.conv is None:
      a = self.layer_inputs.astype(cotangents.dtype)
      return a.reshape(-1, a.shape[-1]).T @ cotangents.reshape(-1, cotangents.shape[-1])
    total, start = None, 0
    for x in self.layer_inputs:
      positions = _conv_positions(self.conv, x)
      part = self.conv.kernel_gradient(x, cotangents[:, start:start + positions])
      total = part if total is None else total + part
      start += positions
    return total

  def per_example_cotangents(self, dtype=None) -> jax.Array:
    """``(S, n, P, d_out)`` Fisher cotangents ``g`` (empirical: ``n * cot``)."""
    if self.fisher_cotangents is None:
      g = self.cotangents[None] * self.batch_size
    else:
      g = self.fisher_cotangents
    return g if dtype is None else g.astype(dtype)


Stats = dict[LayerKey, LayerStats]


def layer_name(key: LayerKey) -> str:
  """Human-readable layer path used in error messages (``'<top-level>'`` for ``()``)."""
  return "/".join(map(str, key)) if key else "<top-level>"


# --------------------------------------------------------------------------- #
# Per-module row extraction
# --------------------------------------------------------------------------- #


def _is_captured(module: nn.Module) -> bool:
  return isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))


def _as_rows(x: jax.Array) -> jax.Array:
  """``(..., d)`` -> ``(n, P, d)``: leading axis examples, the rest positions."""
  if x.ndim == 1:
    return x.reshape(1, 1, x.shape[0])
  return x.reshape(x.shape[0], -1, x.shape[-1])


def _dense_general_axes(axis, batch_dims, ndim: int, key: LayerKey, *,
                        layer_type: str = "nn.DenseGeneral", batch_arg: str = "batch_dims"):
  """Sorted contracted axes and the remaining (example, position) axes of a general dense layer.

  Takes plain attributes so that ``nn.DenseGeneral`` (``axis``, ``batch_dims``) and
  ``nnx.LinearGeneral`` (``axis``, ``batch_axis``) share it; ``layer_type`` and
  ``batch_arg`` only name the layer and its argument in error messages.
  """
  given = axis
  axis = axis if isinstance(axis, Sequence) else (axis,)
  axis = tuple(sorted(a if a >= 0 else ndim + a for a in axis))
  batch_dims = tuple(batch_dims) if isinstance(batch_dims, Sequence) else (batch_dims,)
  if batch_dims:
    raise NotImplementedError(
        f"Layer {layer_name(key)!r}: {layer_type} with {batch_arg}={batch_dims} has one "
        "kernel per batch index, which is not a single weight matrix; neuron_optax cannot "
        f"precondition it. Use {batch_arg}=() (or a plain Dense per batch index).")
  rest = tuple(a for a in range(ndim) if a not in axis)
  if rest and rest[0] != 0:
    raise NotImplementedError(
        f"Layer {layer_name(key)!r}: {layer_type} contracts axis 0 (axis={given}), "
        "but neuron_optax treats axis 0 as the example axis. Contract non-leading axes only.")
  return axis, rest


def _dense_general_rows(axis, batch_dims, x: jax.Array, key: LayerKey, **names) -> jax.Array:
  """``(n, P, d_in)`` rows of a general dense layer: contracted axes last, flattened."""
  axis, rest = _dense_general_axes(axis, batch_dims, x.ndim, key, **names)
  x = jnp.transpose(x, rest + axis)
  d_in = math.prod(x.shape[len(rest):])
  if not rest:
    return x.reshape(1, 1, d_in)
  return x.reshape(x.shape[0], -1, d_in)


def _conv_padding(padding, x: jax.Array, kernel_size, kernel_dilation):
  """Returns (possibly padded inputs, lax padding) exactly as ``nn.Conv`` / ``nnx.Conv`` do."""
  padding = nn.linear.canonicalize_padding(padding, len(kernel_size))
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


def _conv_positions(geometry: ConvGeometry, x: jax.Array) -> int:
  """Output positions per example of one call (``P`` of its rows)."""
  rows = jax.eval_shape(geometry.rows, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return rows.shape[1]


def _conv_input(x: jax.Array, key: LayerKey, *, kernel_size, strides, padding, input_dilation,
                kernel_dilation, feature_group_count: int, mask,
                layer_type: str = "nn.Conv") -> tuple[jax.Array, ConvGeometry]:
  """The convolution's input prepared for im2col (one batch axis, modes padded) and its geometry.

  Takes the convolution's attributes (as ``nn.Conv`` and ``nnx.Conv`` name
  them) rather than a module, so both APIs share it.
  """
  if feature_group_count != 1:
    raise NotImplementedError(
        f"Layer {layer_name(key)!r}: grouped/depthwise convolutions (feature_group_count="
        f"{feature_group_count}) are not supported yet; their kernel is not one matrix.")
  if mask is not None:
    raise NotImplementedError(
        f"Layer {layer_name(key)!r}: masked convolutions ({layer_type} with mask=...) are not "
        "supported: preconditioning would move weights the mask keeps at zero.")
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  rank = len(kernel_size)
  if rank > 3:
    raise NotImplementedError(f"Layer {layer_name(key)!r}: convolutions of rank {rank} > 3.")

  def broadcast(v):
    v = 1 if v is None else v
    return (v,) * rank if isinstance(v, int) else tuple(v)

  n_batch = x.ndim - (rank + 1)
  n_examples = x.shape[0] if n_batch >= 1 else 1
  x = x.reshape((-1,) + x.shape[n_batch:])
  strides, input_dilation, kernel_dilation = map(broadcast, (strides, input_dilation, kernel_dilation))
  x, padding = _conv_padding(padding, x, kernel_size, kernel_dilation)
  if not isinstance(padding, str):
    padding = tuple(tuple(pair) for pair in padding)
  return x, ConvGeometry(kernel_size, strides, padding, input_dilation, kernel_dilation, n_examples)


def _layer_rows(module: nn.Module, x: jax.Array, key: LayerKey) -> jax.Array | tuple[jax.Array, ConvGeometry]:
  """Dense rows ``(n, P, d_in)``, or a convolution's ``(prepared input, geometry)``."""
  if isinstance(module, nn.Conv):
    return _conv_input(x, key, kernel_size=module.kernel_size, strides=module.strides,
                      padding=module.padding, input_dilation=module.input_dilation,
                      kernel_dilation=module.kernel_dilation,
                      feature_group_count=module.feature_group_count, mask=module.mask)
  if isinstance(module, nn.DenseGeneral):
    return _dense_general_rows(module.axis, module.batch_dims, x, key)
  return _as_rows(x)


def _layer_meta(module: nn.Module, x_ndim: int, key: LayerKey) -> dict[str, Any]:
  kernel = module.get_variable("params", "kernel")
  if isinstance(module, nn.DenseGeneral):
    axis, _ = _dense_general_axes(module.axis, module.batch_dims, x_ndim, key)
    input_ndim = len(axis)
  else:
    input_ndim = kernel.ndim - 1
  return dict(kind="conv" if isinstance(module, nn.Conv) else "dense",
              has_bias=bool(module.use_bias), kernel_shape=tuple(kernel.shape),
              kernel_input_ndim=input_ndim)


# --------------------------------------------------------------------------- #
# Fisher output cotangents
# --------------------------------------------------------------------------- #


def _fisher_output_cotangents(output: jax.Array, fisher: str, likelihood: str,
                              rng: jax.Array | None) -> jax.Array:
  """``(S, *output.shape)`` per-example cotangents of the model output.

  The likelihood's negative log-probability is averaged over all leading
  positions of ``output`` (all axes but the last), as a mean loss would be,
  and multiplied by ``n`` (the leading axis) to get per-example scale.
  """
  output = jax.lax.stop_gradient(output)
  shape = output.shape if output.ndim > 1 else (1,) + output.shape
  n, k = shape[0], shape[-1]
  per_example = math.prod(shape[1:-1])  # output positions per example (tokens, pixels)
  scale = 1.0 / per_example  # n · d/dout of a mean over n · per_example positions
  compute_dtype = jnp.promote_types(output.dtype, jnp.float32)
  out = output.reshape(n, per_example, k).astype(compute_dtype)
  if likelihood == "categorical":
    probs = jax.nn.softmax(out, axis=-1)
    if fisher == "mc":
      labels = jax.random.categorical(rng, out, axis=-1)
      sets = (probs - jax.nn.one_hot(labels, k, dtype=compute_dtype))[None]
    else:
      # One set per (position, class) with sqrt(p) folded in, zero at other positions.
      per_class = jnp.sqrt(probs)[..., :, None] * (probs[..., None, :] - jnp.eye(k, dtype=compute_dtype))
      per_class = jnp.moveaxis(per_class, 2, 0)  # (c, n, T, k)
      eye_t = jnp.eye(per_example, dtype=compute_dtype)
      sets = eye_t[:, None, None, :, None] * per_class[None]  # (T0, c, n, T, k)
      sets = sets.reshape((per_example * k, n, per_example, k))
  elif fisher == "mc":
    # unit-variance Gaussian: cot = f - y with y ~ N(f, I)
    sets = -jax.random.normal(rng, out.shape, compute_dtype)[None]
  else:
    eye = jnp.eye(per_example * k, dtype=compute_dtype).reshape(per_example * k, 1, per_example, k)
    sets = jnp.broadcast_to(eye, (per_example * k, n, per_example, k))
  return (scale * sets).reshape((sets.shape[0],) + output.shape).astype(output.dtype)


# --------------------------------------------------------------------------- #
# value_grad_and_stats
# --------------------------------------------------------------------------- #


def _find_trace_state_getter() -> Callable[[], Any] | None:
  """``get_opaque_trace_state`` of this JAX version, or ``None`` where it has none.

  Public as ``jax.extend.core.get_opaque_trace_state`` from JAX 0.10 on and as
  ``jax.core.get_opaque_trace_state`` in the stackless-tracing releases before
  (the ones Flax's ``flax.core.tracers.current_trace`` also uses). Older JAX has no
  equivalent; there the lifted-transform check below is skipped and such models
  fail as before (with JAX's ``UnexpectedTracerError`` under ``jit``).
  """
  for namespace in ("jax.extend.core", "jax.core"):
    try:
      module = __import__(namespace, fromlist=["get_opaque_trace_state"])
      getter = getattr(module, "get_opaque_trace_state")
    except (ImportError, AttributeError):
      continue
    return lambda: getter(convention="flax")
  return None


_get_trace_state = _find_trace_state_getter()


def _trace_state() -> Any:
  """An opaque token of the innermost active JAX trace: equal tokens mean the same trace."""
  return None if _get_trace_state is None else _get_trace_state()


class _Recorder:
  """Interceptor state for one traced call of the loss."""

  def __init__(self, perturbations=None):
    self.perturbations = perturbations
    self.trace_state = None  # the loss's own trace, set by `intercepting`
    self.calls: dict[LayerKey, int] = {}
    self.inputs: dict[LayerKey, list[jax.Array]] = {}
    self.outputs: dict[LayerKey, list[Any]] = {}
    self.meta: dict[LayerKey, dict[str, Any]] = {}
    self.model_outputs: list[Any] = []
    self.depth = 0

  @contextlib.contextmanager
  def intercepting(self):
    """Intercepts module calls; call inside the traced loss so that its trace is the reference."""
    self.trace_state = _trace_state()
    with nn.intercept_methods(self):
      yield self

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    outermost = self.depth == 0
    self.depth += 1
    try:
      if context.method_name != "__call__" or not _is_captured(module) or not args:
        y = next_fun(*args, **kwargs)
      else:
        y = self._captured_call(module, next_fun, args, kwargs)
    finally:
      self.depth -= 1
    if outermost:
      self.model_outputs.append(y)
    return y

  def _captured_call(self, module, next_fun, args, kwargs):
    key = tuple(module.path)
    if _trace_state() != self.trace_state:
      # A lifted transform (nn.remat -> jax.checkpoint, nn.scan -> lax.scan, nn.vmap, nn.jit,
      # nn.while_loop, nn.cond, ...) or a JAX transform inside loss_fn traces this call in an inner
      # trace: the recorded inputs would be that trace's tracers and leak out of it (under jit an
      # UnexpectedTracerError far from here), and the layer's gradient would not line up with them.
      raise NotImplementedError(
          f"Layer {layer_name(key)!r} is applied inside a lifted Flax transform (nn.remat, nn.scan, "
          "nn.vmap, nn.jit, nn.while_loop, nn.cond, ...) or a JAX transform within loss_fn "
          "(jax.checkpoint, jax.vmap, lax.scan, ...), which traces it separately; "
          "value_grad_and_stats cannot capture such layers yet. Apply the captured layers outside "
          "the transform: drop nn.remat around these blocks, unroll nn.scan into a Python loop of "
          "separately named blocks, or jit the whole training step instead of using nn.jit.")
    x = args[0]
    y = next_fun(*args, **kwargs)
    index = self.calls.get(key, 0)
    self.calls[key] = index + 1
    recorded, conv = split_recorded(_layer_rows(module, x, key))
    meta = dict(_layer_meta(module, jnp.ndim(x), key), conv=conv)
    if key in self.meta and self.meta[key] != meta:
      raise ValueError(f"Layer {layer_name(key)!r} was called twice with different layouts.")
    self.meta[key] = meta
    if self.perturbations is None:
      self.outputs.setdefault(key, []).append(jax.ShapeDtypeStruct(y.shape, y.dtype))
      return y
    y = y + self.perturbations[key][index]
    self.inputs.setdefault(key, []).append(recorded)
    return y


def split_recorded(rows) -> tuple[jax.Array, ConvGeometry | None]:
  """What a call records (dense rows, or a convolution's prepared input) and its static geometry.

  The geometry goes into the layer's static metadata, the array through the
  differentiated function's auxiliary outputs.
  """
  if isinstance(rows, tuple):
    return rows
  return rows, None


def _concat_calls(key: LayerKey, parts: list[jax.Array]) -> jax.Array:
  if len(parts) == 1:
    return parts[0]
  if len({p.shape[0] for p in parts}) != 1:
    raise ValueError(
        f"Layer {layer_name(key)!r} is applied {len(parts)} times in one forward pass with "
        f"different leading (example) sizes {[p.shape[0] for p in parts]}; neuron_optax pools "
        "the rows of shared layers per example and needs the same number of examples in each call.")
  return jnp.concatenate(parts, axis=1)


def _validate_capture_args(fisher: str, likelihood: str | None) -> None:
  """Checks ``value_grad_and_stats``'s ``fisher=`` and ``likelihood=`` (linen and NNX)."""
  if fisher not in _FISHER_TYPES:
    raise ValueError(f"fisher must be one of {_FISHER_TYPES}, got {fisher!r}.")
  if fisher != "empirical" and likelihood not in _LIKELIHOODS:
    raise ValueError(
        f"fisher={fisher!r} needs the model's likelihood to sample or enumerate labels: pass "
        f"likelihood='categorical' (the model returns logits) or likelihood='gaussian' "
        f"(squared-error regression); got likelihood={likelihood!r}.")
  if fisher == "empirical" and likelihood is not None and likelihood not in _LIKELIHOODS:
    raise ValueError(f"likelihood must be one of {_LIKELIHOODS} or None, got {likelihood!r}.")


def _validate_rng(fisher: str, rng: jax.Array | None) -> None:
  """Checks the ``rng=`` a call of the returned function got against ``fisher``."""
  if fisher == "mc" and rng is None:
    raise ValueError("fisher='mc' samples labels: call the returned function with rng=<PRNG key>.")
  if fisher != "mc" and rng is not None:
    raise ValueError(f"rng= is only used with fisher='mc' (got fisher={fisher!r}).")


def _assemble_stats(meta: dict[LayerKey, dict[str, Any]], inputs: Sequence[list[jax.Array]],
                    cots: Sequence[list[jax.Array]],
                    fisher_cots: Sequence[list[jax.Array]] | None) -> Stats:
  """One :class:`LayerStats` per layer of ``meta`` from what its calls recorded.

  ``inputs[i]``, ``cots[i]`` and ``fisher_cots[i]`` (``None`` for the empirical
  Fisher) list the input rows, output cotangents and ``(S, ...)`` Fisher output
  cotangents of every call of the ``i``-th layer of ``meta``, in call order.
  """
  stats: Stats = {}
  for i, (key, layer_meta) in enumerate(meta.items()):
    if layer_meta.get("conv") is None:
      layer_inputs = _concat_calls(key, inputs[i])
      n = layer_inputs.shape[0]
    else:  # the im2col rows are built on demand (LayerStats.inputs)
      layer_inputs = tuple(inputs[i])
      n = layer_meta["conv"].examples
    layer_cots = _concat_calls(key, [_rows_like(layer_meta, c, n) for c in cots[i]])
    layer_fisher = None
    if fisher_cots is not None:
      sets = [jax.vmap(lambda c: _rows_like(layer_meta, c, n))(c) for c in fisher_cots[i]]
      layer_fisher = sets[0] if len(sets) == 1 else jnp.concatenate(sets, axis=2)
    stats[key] = LayerStats(layer_inputs=layer_inputs, cotangents=layer_cots,
                            fisher_cotangents=layer_fisher, **layer_meta)
  return stats


def value_grad_and_stats(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    fisher: FisherType = "empirical",
    likelihood: Likelihood | None = None,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad(loss_fn)``, and also records each layer's neurons.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` that applies a Flax linen model
      (``model.apply({"params": params, ...}, ...)``) and returns the **mean**
      loss over the batch (or ``(loss, aux)`` with ``has_aux=True``). The
      gradient is taken w.r.t. its first argument.
    has_aux: as in ``jax.value_and_grad``.
    fisher: which curvature the recorded output cotangents describe:
      ``"empirical"`` (the true labels' cotangents, no extra work), ``"mc"``
      (one label per output position sampled from the model's predictive
      distribution; the returned function takes ``rng=``) or ``"full"`` (every
      label, weighted by its probability: ``positions * classes`` cotangent
      sets computed in one vmapped VJP).
    likelihood: ``"categorical"`` (the model returns logits) or ``"gaussian"``
      (unit-variance regression); required unless ``fisher="empirical"``.

  Returns:
    A function with ``loss_fn``'s signature (plus ``rng=`` for ``fisher="mc"``)
    returning ``(value, grads, stats)``; ``stats`` maps each captured layer's
    module path (the keys of the ``params`` tree) to a :class:`LayerStats`.
    Captured modules: ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv``. All
    other parameters are not in ``stats`` and pass through the transforms.

  Raises:
    NotImplementedError: (when the returned function is called or traced) a
      captured layer is applied inside a lifted transform (``nn.remat``,
      ``nn.scan``, ``nn.vmap``, ``nn.jit``, ...) or a JAX transform within
      ``loss_fn``; such layers cannot be captured yet.
  """
  _validate_capture_args(fisher, likelihood)

  @functools.wraps(loss_fn)
  def wrapped(params, *args, rng: jax.Array | None = None, **kwargs):
    _validate_rng(fisher, rng)

    probe = _Recorder()

    def probe_loss(p):
      with probe.intercepting():
        return loss_fn(p, *args, **kwargs)

    jax.eval_shape(probe_loss, params)
    if not probe.outputs:
      raise ValueError(
          "value_grad_and_stats found no nn.Dense/nn.DenseGeneral/nn.Conv call inside loss_fn. "
          "The loss function must apply a Flax linen model (model.apply) when called.")
    perturbations = {k: [jnp.zeros(s.shape, s.dtype) for s in v] for k, v in probe.outputs.items()}

    def traced(p, perts):
      recorder = _Recorder(perts)
      with recorder.intercepting():
        out = loss_fn(p, *args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, recorder)

    if fisher == "empirical":
      def differentiable(p, perts):
        loss, (aux, recorder) = traced(p, perts)
        return loss, (aux, recorder.inputs)

      (loss, (aux, inputs)), (grads, cots) = jax.value_and_grad(
          differentiable, argnums=(0, 1), has_aux=True)(params, perturbations)
      fisher_cots = None
    else:
      def with_output(p, perts):
        loss, (aux, recorder) = traced(p, perts)
        if len(recorder.model_outputs) != 1 or not isinstance(recorder.model_outputs[0], jax.Array):
          raise ValueError(
              f"fisher={fisher!r} needs loss_fn to apply the model exactly once and the model to "
              "return one array (logits or predictions); found "
              f"{len(recorder.model_outputs)} top-level module call(s).")
        return (loss, recorder.model_outputs[0]), (aux, recorder.inputs)

      (loss, model_out), vjp_fn, (aux, inputs) = jax.vjp(
          with_output, params, perturbations, has_aux=True)
      one = jnp.ones_like(loss)
      grads, cots = vjp_fn((one, jnp.zeros_like(model_out)))
      out_cots = _fisher_output_cotangents(model_out, fisher, likelihood, rng)
      _, fisher_cots = jax.vmap(
          lambda c: vjp_fn((jnp.zeros_like(loss), c)))(out_cots)

    keys = list(probe.meta)
    stats = _assemble_stats(probe.meta, [inputs[k] for k in keys], [cots[k] for k in keys],
                            None if fisher_cots is None else [fisher_cots[k] for k in keys])
    value = (loss, aux) if has_aux else loss
    return value, grads, stats

  return wrapped


def _rows_like(meta: dict[str, Any], y: jax.Array, n: int) -> jax.Array:
  """Output cotangent ``y`` of a layer call -> ``(n, P, d_out)`` rows."""
  d_out = math.prod(meta["kernel_shape"][meta["kernel_input_ndim"]:])
  return y.reshape(n, -1, d_out)
