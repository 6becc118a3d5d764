"""The capture driver shared by the linen and NNX front-ends.

A front-end only knows how to run the user's loss with its layers
intercepted; it hands this module a ``run(recorder, params)`` function and
gets back ``(value, grads, stats)``. The driver:

1. traces the loss abstractly (``jax.eval_shape``) with a shape-only
   :class:`Recorder`, which learns every captured call's output shape;
2. differentiates the loss with respect to the parameters **and** a zero array
   added to each captured call's output, in one ``jax.value_and_grad`` (the
   output cotangents cost no extra backward pass); the recorded inputs come back
   as auxiliary outputs;
3. for the Monte-Carlo and full Fisher, pulls the sampled (or every) label's
   negative log-likelihood cotangents back through the same linearisation
   (``jax.vjp``), vmapped over the label sets;
4. assembles one :class:`LayerStats` per layer.

Layers applied inside lifted transforms (``nn.scan``/``nn.vmap`` over stacked
parameters, ``nn.remat``, ``nn.jit`` and their NNX counterparts) run in an
inner JAX trace: what they see cannot be handed out of it as Python values.
For them the shape pass also learns the stack axes (the leading axes their
parameter has outside the transform) and the real pass gives each call two
zero **probes** with those axes in front, stored next to the layer's
parameters so that the transform slices them exactly as it slices the kernel.
One custom-VJP identity adds the output probe to the call's output and
returns the call's input as the input probe's cotangent, so differentiating
w.r.t. the probes yields every copy's output cotangents and inputs, stacked,
through any number of nested scans, vmaps and rematerialisations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax import param_layout
from neuron_optax.layer_stats import ConvGeometry, LayerKey, LayerStats, Stats, layer_name

FisherType = Literal["empirical", "mc", "full"]
Likelihood = Literal["categorical", "gaussian"]

FISHER_TYPES = ("empirical", "mc", "full")
LIKELIHOODS = ("categorical", "gaussian")


def validate_capture_args(fisher: str, likelihood: str | None) -> None:
  """Checks ``value_grad_and_stats``'s ``fisher=`` and ``likelihood=``."""
  if fisher not in FISHER_TYPES:
    raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
  if fisher != "empirical" and likelihood not in LIKELIHOODS:
    raise ValueError(
      f"fisher={fisher!r} needs the model's likelihood to sample or enumerate labels: pass "
      f"likelihood='categorical' (the model returns logits) or likelihood='gaussian' "
      f"(squared-error regression); got likelihood={likelihood!r}."
    )
  if fisher == "empirical" and likelihood is not None and likelihood not in LIKELIHOODS:
    raise ValueError(f"likelihood must be one of {LIKELIHOODS} or None, got {likelihood!r}.")


def validate_rng(fisher: str, rng: jax.Array | None) -> None:
  """Checks the ``rng=`` a call of the returned function got against ``fisher``."""
  if fisher == "mc" and rng is None:
    raise ValueError("fisher='mc' samples labels: call the returned function with rng=<PRNG key>.")
  if fisher != "mc" and rng is not None:
    raise ValueError(f"rng= is only used with fisher='mc' (got fisher={fisher!r}).")


def split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
  """``(loss, aux)`` of what ``loss_fn`` returned, checked against ``has_aux``."""
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      got = f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else _describe(out)
      raise ValueError(
        f"has_aux=True: loss_fn must return a pair (loss, aux), got {got}. Return (loss, aux), or "
        "call value_grad_and_stats without has_aux=True if loss_fn returns the loss alone."
      )
    loss, aux = out
  elif isinstance(out, (tuple, list)):
    raise ValueError(
      f"loss_fn returned a {type(out).__name__} of length {len(out)}, not a scalar loss; if it returns "
      "(loss, aux), pass has_aux=True to value_grad_and_stats."
    )
  else:
    loss, aux = out, None
  if jnp.ndim(loss) != 0:
    raise ValueError(
      f"loss_fn must return a scalar loss (the mean over the batch), got {_describe(loss)}. Reduce "
      "per-example losses with .mean()."
    )
  return loss, aux


def _describe(value: Any) -> str:
  shape = getattr(value, "shape", None)
  return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"


# --------------------------------------------------------------------------- #
# Where a captured call runs: the JAX traces between the loss and the call
# --------------------------------------------------------------------------- #


def _find_trace_state_getter() -> Callable[[], Any] | None:
  """``get_opaque_trace_state`` of this JAX version, or ``None`` where it has none.

  Public as ``jax.extend.core.get_opaque_trace_state`` from JAX 0.10 on and as
  ``jax.core.get_opaque_trace_state`` in the stackless-tracing releases before
  (the ones Flax's ``flax.core.tracers.current_trace`` also uses).
  """
  for namespace in ("jax.extend.core", "jax.core"):
    try:
      module = __import__(namespace, fromlist=["get_opaque_trace_state"])
      getter = module.get_opaque_trace_state
    except (ImportError, AttributeError):
      continue
    return lambda: getter(convention="flax")
  return None


_get_trace_state = _find_trace_state_getter()


def trace_state() -> Any:
  """An opaque token of the innermost active JAX trace: equal tokens mean the same trace."""
  return None if _get_trace_state is None else _get_trace_state()


def _current_trace() -> Any:
  """The innermost JAX trace object (``None`` where JAX does not expose it; then no
  layer inside a transform is captured)."""
  try:
    from jax._src import core as jax_core

    return jax_core.trace_ctx.trace
  except (ImportError, AttributeError):  # pragma: no cover - other JAX versions
    return None


# Traces that run their function once per call: the probes of a call inside them are used once.
_SINGLE_USE = ("jit", "pjit", "checkpoint / remat", "remat")


class Nesting(NamedTuple):
  """The JAX transforms between the loss's trace and a captured call (innermost first)."""

  repeated: int  # transforms that run their body once per index of an axis: vmap, scan
  prepass: bool  # a partial-evaluation pass whose results are discarded (nn.scan's loop-invariant pass)
  unsupported: tuple[str, ...]  # any other transform (cond, while_loop, nested differentiation, ...)


def nesting(reference: Any) -> Nesting | None:
  """How the current trace nests inside ``reference`` (the loss's own trace); ``None`` if unknown.

  Reads JAX's trace objects (``parent_trace``, the name a jaxpr trace was
  started for); where this JAX version does not have them, returns ``None``
  and capture refuses layers inside transforms, as before it supported them.
  """
  trace = _current_trace()
  repeated, prepass, unsupported = 0, False, []
  try:
    while trace is not None and trace is not reference:
      kind = type(trace).__name__
      if kind == "BatchTrace":
        repeated += 1
      elif kind == "JaxprTrace":
        prepass = True
      elif kind == "DynamicJaxprTrace":
        traced_for = getattr(getattr(trace.frame, "debug_info", None), "traced_for", None)
        if traced_for == "scan":
          repeated += 1
        elif traced_for not in _SINGLE_USE:
          unsupported.append(str(traced_for))
      else:
        unsupported.append(kind)
      trace = trace.parent_trace
  except AttributeError:  # pragma: no cover - other JAX versions
    return None
  if trace is None:
    return None
  return Nesting(repeated, prepass, tuple(unsupported))


# --------------------------------------------------------------------------- #
# Probes of layers inside transforms
# --------------------------------------------------------------------------- #


class _Attend:
  """Last entry of the record key of an embedding table's calls as an output layer (``Embed.attend``)."""

  def __repr__(self) -> str:
    return "attend"


# ``key + (ATTEND,)`` records the ``attend`` calls of the embedding at ``key``: a dense layer with
# kernel ``tableᵀ`` (attend orientation ``(features, vocab)``), folded into the table's statistics
# as ``LayerStats.tied``.
ATTEND = _Attend()


def is_attend(key: LayerKey) -> bool:
  return bool(key) and key[-1] is ATTEND


def probe_names(index: int, key: LayerKey = (), tag: str = "") -> tuple[str, str]:
  """Names of the output and input probes of the ``index``-th call recorded under ``key`` inside a
  transform, stored next to the layer's parameters (linen: in the ``params`` collection; NNX: as
  attributes). ``tag`` tells apart layers whose probes sit on one module (a LoRA adapter's factors)."""
  part = "attend_" if is_attend(key) else f"{tag}_" if tag else ""
  return f"__nox_{part}output_probe_{index}__", f"__nox_{part}input_probe_{index}__"


def _zero_cotangent(x: jax.Array):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _probe_dtype(dtype) -> Any:
  """Integer inputs (token ids) travel as float32 cotangents (exact below 2**24)."""
  return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32


@jax.custom_vjp
def _attach_probes(y: jax.Array, output_probe: jax.Array, input_probe: jax.Array, x: jax.Array) -> jax.Array:
  """``y + output_probe``; the cotangent of ``input_probe`` is ``x`` (whatever the output's is).

  ``x`` gets a zero cotangent here: the layer's own use of it carries its gradient.
  """
  del input_probe, x
  return y + output_probe


def _attach_fwd(y, output_probe, input_probe, x):
  del input_probe
  return y + output_probe, x


def _attach_bwd(x, g):
  return g, g, x.astype(_probe_dtype(x.dtype)), _zero_cotangent(x)


_attach_probes.defvjp(_attach_fwd, _attach_bwd)


class CallLayout(NamedTuple):
  """How a front-end reads one captured call."""

  rows: Callable[
    [jax.Array], Any
  ]  # layer input -> dense rows (n, P, d_in), token ids (n, P), or (conv input, geometry)
  meta: dict[str, Any]  # LayerStats static fields
  # Output axes in the canonical order (example/position axes, then kernel output axes in kernel
  # order), or None when the output already is canonical.
  output_perm: tuple[int, ...] | None = None


class _InnerCall(NamedTuple):
  """A call inside a transform, as the shape pass saw it (one copy)."""

  input: jax.ShapeDtypeStruct
  output: jax.ShapeDtypeStruct
  layout: CallLayout


def _array_part(recorded):
  return recorded[0] if isinstance(recorded, tuple) else recorded


def _aval(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


class Recorder:
  """What one traced call of the loss records (``perturbations=None``: the shape probe).

  Args:
    perturbations: per layer and call, the zero arrays added to the outputs of
      calls in the loss's own trace (``None`` in the shape pass).
    probes: per layer and call inside a transform, the ``(output, input)``
      zero probes (``None`` in the shape pass); a front-end stores them next
      to the layer's parameters (:func:`probe_names`).
    param_shapes: ``{path: shape}`` of the differentiated parameters, for the
      stack axes of layers inside transforms.
  """

  def __init__(
    self,
    perturbations: dict[LayerKey, list[jax.Array]] | None = None,
    probes: dict[LayerKey, list[tuple[jax.Array, jax.Array]]] | None = None,
    param_shapes: Mapping[tuple, tuple[int, ...]] | None = None,
  ):
    self.perturbations = perturbations
    self.probes = probes
    self.param_shapes = param_shapes or {}
    self.calls: dict[LayerKey, int] = {}
    self.inputs: dict[LayerKey, list[jax.Array]] = {}
    self.outputs: dict[LayerKey, list[jax.ShapeDtypeStruct]] = {}
    self.meta: dict[LayerKey, dict[str, Any]] = {}
    self.inner: dict[LayerKey, list[_InnerCall]] = {}  # calls inside transforms (shape pass)
    self.used: set[tuple[LayerKey, int]] = set()  # probes used (real pass)
    self._inner_index: dict[tuple[LayerKey, int], int] = {}
    self._inner_traces: dict[LayerKey, Any] = {}
    self.model_outputs: list[Any] = []
    self.depth = 0
    self.reference_state: Any = None
    self.reference_trace: Any = None

  def start(self) -> None:
    """Marks the current trace as the loss's own (call inside the traced loss, before ``loss_fn``)."""
    self.reference_state = trace_state()
    self.reference_trace = _current_trace()

  def nested_call(self, call: Callable[[], Any]) -> Any:
    """Runs a module call; the outermost one's output is the model's output (for the Fisher)."""
    outermost = self.depth == 0
    self.depth += 1
    try:
      y = call()
    finally:
      self.depth -= 1
    if outermost:
      self.model_outputs.append(y)
    return y

  def layer_call(
    self, key: LayerKey, recorded, meta: dict[str, Any], y: jax.Array, output_perm: tuple[int, ...] | None = None
  ) -> jax.Array:
    """Records one captured call and returns its output (plus the zero perturbation).

    Args:
      key: the layer's path in the parameter tree.
      recorded: dense rows ``(n, P, d_in)``, or a convolution's ``(prepared
        input, ConvGeometry)``.
      meta: the static :class:`LayerStats` fields (``kind``, ``has_bias``,
        ``kernel_shape``, ``kernel_input_ndim``).
      y: the call's output.
      output_perm: the output's axes in the canonical order (example and
        position axes, then the kernel's output axes), where it is not
        canonical already.
    """
    rows, conv = recorded if isinstance(recorded, tuple) else (recorded, None)
    meta = dict(meta, conv=conv, stack_shape=())
    if key in self.meta and self.meta[key] != meta:
      raise ValueError(f"Layer {layer_name(key)!r} was called twice with different layouts.")
    self.meta[key] = meta
    index = self.calls.get(key, 0)
    self.calls[key] = index + 1
    if self.perturbations is None:
      shape = y.shape if output_perm is None else tuple(y.shape[i] for i in output_perm)
      self.outputs.setdefault(key, []).append(jax.ShapeDtypeStruct(shape, y.dtype))
      return y
    perturbations = self.perturbations.get(key, [])
    if index >= len(perturbations):
      raise ValueError(
        f"Layer {layer_name(key)!r} was called more often than when neuron_optax traced the loss "
        "for shapes; loss_fn must apply the same layers on every call."
      )
    perturbation = perturbations[index]
    if output_perm is not None:
      perturbation = jnp.transpose(perturbation, tuple(sorted(range(len(output_perm)), key=output_perm.__getitem__)))
    self.inputs.setdefault(key, []).append(rows)
    return y + perturbation

  def captured_call(
    self,
    key: LayerKey,
    x: jax.Array,
    call: Callable[[], jax.Array],
    layout: CallLayout,
    probe: Callable[[int], tuple[jax.Array | None, jax.Array | None]],
    transform_names: str,
  ) -> jax.Array:
    """One call of a captured layer, wherever it runs; returns its output.

    ``call()`` computes the output from ``x``; ``probe(i)`` reads the probes
    of the layer's ``i``-th call in the current trace from where the front-end
    stored them (``(None, None)`` if absent); ``transform_names`` names the
    front-end's transforms in errors.
    """
    if trace_state() == self.reference_state:
      y = call()
      return self.layer_call(key, layout.rows(x), layout.meta, y, layout.output_perm)
    where = nesting(self.reference_trace)
    if where is None or where.unsupported:
      inside = "" if where is None else f" (JAX traces it for {', '.join(where.unsupported)})"
      raise NotImplementedError(
        f"Layer {layer_name(key)!r} is applied inside a transform{inside} that value_grad_and_stats "
        f"cannot capture. Supported: {transform_names}. Apply the layer outside other transforms "
        "(cond, while_loop, differentiation inside loss_fn, ...)."
      )
    if where.prepass:  # nn.scan's loop-invariant pass: its results are discarded
      return call()
    meta = dict(layout.meta, stack_shape=self._stack_shape(key, layout.meta))
    stack = meta["stack_shape"]
    if where.repeated != len(stack):
      raise NotImplementedError(
        f"Layer {layer_name(key)!r} runs inside {where.repeated} nested vmap/scan transform(s), "
        f"but its parameters have {len(stack)} stacked axes {stack}: the same weights "
        "serve several iterations (nn.scan with variable_broadcast='params', as in nn.RNN; nn.vmap "
        "with variable_axes={'params': None}; jax.vmap over examples inside loss_fn), which "
        "value_grad_and_stats cannot capture. Stack the parameters (variable_axes={'params': 0}), "
        "or apply the layer outside the transform."
      )
    trace = _current_trace()
    index = self._inner_index.get((key, id(trace)), 0)
    self._inner_index[key, id(trace)] = index + 1
    # Calls are numbered per trace, so that a body JAX traces twice (a retrace) uses the same probes;
    # the same layer in two different transforms would then share a probe and sum its rows.
    if index == 0 and self._inner_traces.setdefault(key, trace) is not trace:
      raise NotImplementedError(
        f"Layer {layer_name(key)!r} is applied inside two separate transforms (e.g. one layer "
        "shared by two nn.remat blocks); value_grad_and_stats cannot capture it. Apply it "
        "inside one transform, or outside."
      )
    y = call()
    recorded = layout.rows(x)  # validates the call and, for convolutions, gives the geometry
    meta["conv"] = recorded[1] if isinstance(recorded, tuple) else None
    if key in self.meta and self.meta[key] != meta:
      raise ValueError(f"Layer {layer_name(key)!r} was called twice with different layouts.")
    self.meta[key] = meta
    if self.probes is None:
      calls = self.inner.setdefault(key, [])
      if index == len(calls):
        calls.append(_InnerCall(_aval(x), _aval(y), layout))
      return y
    output_probe, input_probe = probe(index)
    expected = self.probes.get(key, [])
    if index >= len(expected) or output_probe is None or input_probe is None:
      raise ValueError(
        f"Layer {layer_name(key)!r} was called more often inside a transform than when "
        "neuron_optax traced the loss for shapes; loss_fn must apply the same layers on every call."
      )
    if output_probe.shape != y.shape or input_probe.shape != jnp.shape(x):
      raise NotImplementedError(
        f"Layer {layer_name(key)!r}: the transform around it did not slice the probes stored next "
        f"to its parameters as it sliced the parameters (probe {output_probe.shape}, call output "
        f"{y.shape}); value_grad_and_stats needs the layer's whole parameter subtree scanned or "
        "vmapped along axis 0 (variable_axes={'params': 0}; NNX: in_axes=0 for the module's state)."
      )
    self.used.add((key, index))
    return _attach_probes(y, output_probe, input_probe, x)

  def _stack_shape(self, key: LayerKey, meta: dict[str, Any]) -> tuple[int, ...]:
    """The leading axes the layer's parameter has outside the transform (``()``: not stacked)."""
    attend = is_attend(key)
    name = "embedding" if meta["kind"] == "embed" or attend else "kernel"
    outer = self.param_shapes.get((key[:-1] if attend else key) + (name,))
    if outer is None and name == "kernel":  # a LoRA factor: the weight leaf is the layer key itself
      outer = self.param_shapes.get(key)
    inner = tuple(meta["kernel_shape"])[:: -1 if attend else 1]  # attend's kernel is the table transposed
    if outer is None:
      raise NotImplementedError(
        f"Layer {layer_name(key)!r} is applied inside a transform, but the differentiated "
        f"parameters have no {name!r} at that path, so its stacked axes are unknown. Apply the "
        "model to the whole parameter tree passed to loss_fn."
      )
    stack = len(outer) - len(inner)
    if stack < 0 or tuple(outer[stack:]) != inner:
      raise NotImplementedError(
        f"Layer {layer_name(key)!r}: its {name} has shape {tuple(outer)} in the parameters but "
        f"{inner} inside the transform; neuron_optax supports transforms that stack parameters "
        "along leading axes only (variable_axes={'params': 0}; NNX: in_axes=0)."
      )
    return tuple(outer[:stack])


def fisher_output_cotangents(output: jax.Array, fisher: str, likelihood: str, rng: jax.Array | None) -> jax.Array:
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


def _concat_calls(key: LayerKey, parts: list[jax.Array], axis: int) -> jax.Array:
  """The calls of a shared layer pooled along ``axis`` (positions; the example axis is just before)."""
  if len(parts) == 1:
    return parts[0]
  if len({p.shape[axis - 1] for p in parts}) != 1:
    raise ValueError(
      f"Layer {layer_name(key)!r} is applied {len(parts)} times in one forward pass with "
      f"different leading (example) sizes {[p.shape[axis - 1] for p in parts]}; neuron_optax pools "
      "the rows of shared layers per example and needs the same number of examples in each call."
    )
  return jnp.concatenate(parts, axis=axis)


def _rows_like(meta: dict[str, Any], y: jax.Array, n: int) -> jax.Array:
  """Output cotangent ``y`` of a layer call (stack axes first) -> ``stack + (n, P, d_out)`` rows."""
  d_out = math.prod(meta["kernel_shape"][meta["kernel_input_ndim"] :])
  k = len(meta.get("stack_shape", ()))
  return y.reshape(y.shape[:k] + (n, -1, d_out))


class CallRecord(NamedTuple):
  """What one call of a layer left: inputs, canonical output cotangents, ``(S, ...)`` Fisher cotangents.

  All with the layer's stack axes first (the Fisher's label-set axis before them).
  """

  inputs: jax.Array
  cotangents: jax.Array
  fisher_cotangents: jax.Array | None


def assemble_stats(meta: dict[LayerKey, dict[str, Any]], calls: Mapping[LayerKey, Sequence[CallRecord]]) -> Stats:
  """One :class:`LayerStats` per layer of ``meta`` from what its calls recorded, in call order."""
  stats: Stats = {}
  for key, layer_meta in meta.items():
    records = calls[key]
    k = len(layer_meta.get("stack_shape", ()))
    conv: ConvGeometry | None = layer_meta.get("conv")
    if conv is None:
      layer_inputs = _concat_calls(key, [r.inputs for r in records], k + 1)
      n = layer_inputs.shape[k]
    else:  # the im2col rows are built on demand (LayerStats.inputs)
      layer_inputs = tuple(r.inputs for r in records)
      n = conv.examples
    layer_cots = _concat_calls(key, [_rows_like(layer_meta, r.cotangents, n) for r in records], k + 1)
    layer_fisher = None
    if records[0].fisher_cotangents is not None:
      sets = [jax.vmap(lambda c: _rows_like(layer_meta, c, n))(r.fisher_cotangents) for r in records]
      sets = [jnp.moveaxis(c, 0, k) for c in sets]  # stack axes, then the label sets
      layer_fisher = _concat_calls(key, sets, k + 2)
    stats[key] = LayerStats(
      layer_inputs=layer_inputs, cotangents=layer_cots, fisher_cotangents=layer_fisher, **layer_meta
    )
  return _fold_attend_calls(stats)


def _fold_attend_calls(stats: Stats) -> Stats:
  """An embedding's ``attend`` calls (recorded as a dense layer with kernel ``tableᵀ``) as its ``tied`` part."""
  folded: Stats = {key: s for key, s in stats.items() if not is_attend(key)}
  for key, s in stats.items():
    if not is_attend(key):
      continue
    table = key[:-1]
    lookup = folded.get(table)
    if lookup is None:  # the table is only used as an output layer: no lookups
      k = len(s.stack_shape)
      n = s.cotangents.shape[k]
      features = s.kernel_shape[0]
      fisher = None if s.fisher_cotangents is None else s.fisher_cotangents.shape[: k + 2]
      lookup = LayerStats(
        layer_inputs=jnp.zeros(s.stack_shape + (n, 0), jnp.int32),
        cotangents=jnp.zeros(s.stack_shape + (n, 0, features), s.cotangents.dtype),
        fisher_cotangents=None if fisher is None else jnp.zeros(fisher + (0, features), s.cotangents.dtype),
        kind="embed",
        has_bias=False,
        kernel_shape=tuple(s.kernel_shape[::-1]),
        kernel_input_ndim=1,
        stack_shape=s.stack_shape,
      )
    folded[table] = lookup.replace(tied=s)
  return folded


def _inner_inputs(call: _InnerCall, stack: tuple[int, ...], recorded: jax.Array) -> jax.Array:
  """Rows of every copy from the stacked inputs a call's input probe received."""
  x = recorded.astype(call.input.dtype).reshape((-1,) + call.input.shape)
  rows = jax.vmap(lambda v: _array_part(call.layout.rows(v)))(x)
  return rows.reshape(stack + rows.shape[1:])


def _inner_cotangents(call: _InnerCall, stack: tuple[int, ...], cotangent: jax.Array, sets: bool = False) -> jax.Array:
  """A call's output-probe cotangent, stacked, with the output axes in canonical order."""
  perm = call.layout.output_perm
  if perm is None:
    return cotangent
  lead = len(stack) + int(sets)
  return jnp.transpose(cotangent, tuple(range(lead)) + tuple(lead + i for i in perm))


Run = Callable[[Recorder, Any], tuple[jax.Array, Any, Any]]


def value_grad_and_stats(
  run: Run,
  params,
  *,
  has_aux: bool,
  fisher: str,
  likelihood: str | None,
  rng: jax.Array | None,
  no_layers: Callable[[], Exception],
  model_calls: str,
) -> tuple[Any, Any, Stats, Any]:
  """``(value, grads, stats, extra)`` of one loss evaluation with its layers recorded.

  Args:
    run: ``run(recorder, params) -> (loss, aux, extra)`` evaluates the user's
      loss with every captured layer call reported to ``recorder`` (and the
      outermost module call to ``recorder.nested_call``); ``extra`` is
      anything the front-end needs back (NNX: the updated non-parameter state).
    params: what the gradient is taken with respect to.
    has_aux, fisher, likelihood, rng: as in ``value_grad_and_stats``.
    no_layers: builds the error raised when the loss applies no captured layer.
    model_calls: names, in an error, the calls that count as applying the model.
  """
  validate_rng(fisher, rng)
  param_shapes = {path: tuple(jnp.shape(leaf)) for path, leaf in param_layout.flatten(params).leaves.items()}
  probe = Recorder(param_shapes=param_shapes)
  jax.eval_shape(lambda p: run(probe, p)[0], params)
  if not probe.meta:
    raise no_layers()
  empty = sorted(
    layer_name(k) for k, outs in probe.outputs.items() if any(len(o.shape) > 1 and not o.shape[0] for o in outs)
  )
  if empty:
    raise ValueError(
      f"Layers {empty} were applied to an empty batch (0 examples): there are no statistics to record and "
      "the mean loss over no examples is undefined. Skip empty batches (e.g. drop_remainder=True)."
    )
  keys = list(probe.meta)
  perturbations = [[jnp.zeros(s.shape, s.dtype) for s in probe.outputs.get(k, [])] for k in keys]
  stacks = {k: probe.meta[k]["stack_shape"] for k in keys}
  probes = [
    [
      (
        jnp.zeros(stacks[k] + c.output.shape, c.output.dtype),
        jnp.zeros(stacks[k] + c.input.shape, _probe_dtype(c.input.dtype)),
      )
      for c in probe.inner.get(k, [])
    ]
    for k in keys
  ]

  def traced(p, perts, inner):
    recorder = Recorder(dict(zip(keys, perts)), dict(zip(keys, inner)), param_shapes)
    loss, aux, extra = run(recorder, p)
    missing = [
      layer_name(k)
      for k, calls in zip(keys, inner)
      if (probe.outputs.get(k) and k not in recorder.inputs)
      or any((k, i) not in recorder.used for i in range(len(calls)))
    ]
    if missing:
      raise ValueError(
        f"Layers {missing} were applied when neuron_optax traced the loss for shapes but not in "
        "the differentiated pass; loss_fn must apply the same layers on every call."
      )
    return loss, recorder, (aux, [recorder.inputs.get(k, []) for k in keys], extra)

  if fisher == "empirical":

    def differentiable(p, perts, inner):
      loss, _, recorded = traced(p, perts, inner)
      return loss, recorded

    (loss, (aux, inputs, extra)), (grads, cots, inner_grads) = jax.value_and_grad(
      differentiable, argnums=(0, 1, 2), has_aux=True
    )(params, perturbations, probes)
    fisher_cots = fisher_inner = None
  else:

    def with_output(p, perts, inner):
      loss, recorder, recorded = traced(p, perts, inner)
      outputs = recorder.model_outputs
      if len(outputs) != 1 or not isinstance(outputs[0], jax.Array):
        raise ValueError(
          f"fisher={fisher!r} needs loss_fn to apply the model exactly once and the model to "
          f"return one array (logits or predictions); found {len(outputs)} {model_calls}."
        )
      return (loss, outputs[0]), recorded

    (loss, model_out), vjp_fn, (aux, inputs, extra) = jax.vjp(with_output, params, perturbations, probes, has_aux=True)
    grads, cots, inner_grads = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(model_out)))
    out_cots = fisher_output_cotangents(model_out, fisher, likelihood, rng)
    _, fisher_cots, fisher_inner = jax.vmap(lambda c: vjp_fn((jnp.zeros_like(loss), c)))(out_cots)

  calls = {}
  for i, key in enumerate(keys):
    records = [
      CallRecord(inputs[i][j], cots[i][j], None if fisher_cots is None else fisher_cots[i][j])
      for j in range(len(perturbations[i]))
    ]
    for j, call in enumerate(probe.inner.get(key, [])):
      output_grad, input_grad = inner_grads[i][j]
      records.append(
        CallRecord(
          _inner_inputs(call, stacks[key], input_grad),
          _inner_cotangents(call, stacks[key], output_grad),
          None if fisher_inner is None else _inner_cotangents(call, stacks[key], fisher_inner[i][j][0], sets=True),
        )
      )
    calls[key] = records
  stats = assemble_stats(probe.meta, calls)
  value = (loss, aux) if has_aux else loss
  return value, grads, stats, extra
