"""The capture driver shared by the linen and NNX front-ends.

A front-end only knows how to run the user's loss with its layers
intercepted; it hands this module a ``run(recorder, params)`` function and
gets back ``(value, grads, stats)``. The driver:

1. traces the loss abstractly (``jax.eval_shape``) with a shape-only
   :class:`~neuron_optax._src.capture_recorder.Recorder`, which learns every
   captured call's output shape;
2. differentiates the loss with respect to the parameters **and** a zero array
   added to each captured call's output, in one ``jax.value_and_grad`` (the
   output cotangents cost no extra backward pass); the recorded inputs come back
   as auxiliary outputs, and layers inside lifted transforms report through
   probes (:mod:`neuron_optax._src.capture_probes`);
3. for the Monte-Carlo and full Fisher, pulls the sampled (or every) label's
   negative log-likelihood cotangents (:mod:`neuron_optax._src.capture_fisher`)
   back through the same linearisation (``jax.vjp``), vmapped over the label
   sets;
4. assembles one :class:`LayerStats` per layer.

The capture wing (this module, ``capture_args``, ``capture_trace``,
``capture_probes``, ``capture_fisher``, ``capture_recorder``, ``layer_rows``
and the front-ends) imports nothing from the optimizer side: only the data
contract (``layer_stats``) and ``tree_paths``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from neuron_optax._src.capture_args import validate_rng
from neuron_optax._src.capture_fisher import fisher_output_cotangents
from neuron_optax._src.capture_probes import is_attend, probe_dtype
from neuron_optax._src.capture_recorder import InnerCall, Recorder, array_part
from neuron_optax._src.layer_stats import ConvGeometry, LayerKey, LayerStats, Stats, layer_name
from neuron_optax._src.tree_paths import flatten


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


def _inner_inputs(call: InnerCall, stack: tuple[int, ...], recorded: jax.Array) -> jax.Array:
  """Rows of every copy from the stacked inputs a call's input probe received."""
  x = recorded.astype(call.input.dtype).reshape((-1,) + call.input.shape)
  rows = jax.vmap(lambda v: array_part(call.layout.rows(v)))(x)
  return rows.reshape(stack + rows.shape[1:])


def _inner_cotangents(call: InnerCall, stack: tuple[int, ...], cotangent: jax.Array, sets: bool = False) -> jax.Array:
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
  param_shapes = {path: tuple(jnp.shape(leaf)) for path, leaf in flatten(params).leaves.items()}
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
        jnp.zeros(stacks[k] + c.input.shape, probe_dtype(c.input.dtype)),
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
