"""The recorder: what one traced call of the loss sees of its captured layers.

A front-end reports every captured layer call to a :class:`Recorder`
(:meth:`Recorder.captured_call`, with a :class:`CallLayout` saying how the
call's input becomes rows) and the outermost module call to
:meth:`Recorder.nested_call` (the model's output, for the Fisher). The
driver (:mod:`neuron_optax._src.capture_driver`) runs the loss twice with one:
first shape-only (``perturbations=None``: output shapes, stack axes, calls
inside transforms), then for real (zero perturbations added to the outputs of
calls in the loss's own trace, probes attached to calls inside transforms).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from neuron_optax._src.capture_probes import attach_probes, is_attend
from neuron_optax._src.capture_trace import TraceInspectionError, current_trace, nesting, trace_state
from neuron_optax._src.layer_stats import LORA_FACTORS, LayerKey, layer_name


class CallLayout(NamedTuple):
  """How a front-end reads one captured call."""

  rows: Callable[
    [jax.Array], Any
  ]  # layer input -> dense rows (n, P, d_in), token ids (n, P), or (conv input, geometry)
  meta: dict[str, Any]  # LayerStats static fields
  # Output axes in the canonical order (example/position axes, then kernel output axes in kernel
  # order), or None when the output already is canonical.
  output_perm: tuple[int, ...] | None = None


class InnerCall(NamedTuple):
  """A call inside a transform, as the shape pass saw it (one copy)."""

  input: jax.ShapeDtypeStruct
  output: jax.ShapeDtypeStruct
  layout: CallLayout


def array_part(recorded):
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
    self.inner: dict[LayerKey, list[InnerCall]] = {}  # calls inside transforms (shape pass)
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
    try:
      self.reference_trace = current_trace()
    except TraceInspectionError as error:  # raised only if a layer turns out to run inside a transform
      self.reference_trace = error

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
    if isinstance(self.reference_trace, TraceInspectionError):
      raise self.reference_trace
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
    trace = current_trace()
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
        calls.append(InnerCall(_aval(x), _aval(y), layout))
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
    return attach_probes(y, output_probe, input_probe, x)

  def _stack_shape(self, key: LayerKey, meta: dict[str, Any]) -> tuple[int, ...]:
    """The leading axes the layer's parameter has outside the transform (``()``: not stacked)."""
    attend = is_attend(key)
    name = "embedding" if meta["kind"] == "embed" or attend else "kernel"
    outer = self.param_shapes.get((key[:-1] if attend else key) + (name,))
    if outer is None and key and key[-1] in LORA_FACTORS:  # a LoRA factor: its weight leaf is the layer key
      name, outer = key[-1], self.param_shapes.get(key)
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
