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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

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


class Recorder:
  """What one traced call of the loss records (``perturbations=None``: the shape probe)."""

  def __init__(self, perturbations: dict[LayerKey, list[jax.Array]] | None = None):
    self.perturbations = perturbations
    self.calls: dict[LayerKey, int] = {}
    self.inputs: dict[LayerKey, list[jax.Array]] = {}
    self.outputs: dict[LayerKey, list[jax.ShapeDtypeStruct]] = {}
    self.meta: dict[LayerKey, dict[str, Any]] = {}
    self.model_outputs: list[Any] = []
    self.depth = 0

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
    meta = dict(meta, conv=conv)
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


def _concat_calls(key: LayerKey, parts: list[jax.Array]) -> jax.Array:
  if len(parts) == 1:
    return parts[0]
  if len({p.shape[0] for p in parts}) != 1:
    raise ValueError(
      f"Layer {layer_name(key)!r} is applied {len(parts)} times in one forward pass with "
      f"different leading (example) sizes {[p.shape[0] for p in parts]}; neuron_optax pools "
      "the rows of shared layers per example and needs the same number of examples in each call."
    )
  return jnp.concatenate(parts, axis=1)


def _rows_like(meta: dict[str, Any], y: jax.Array, n: int) -> jax.Array:
  """Output cotangent ``y`` of a layer call -> ``(n, P, d_out)`` rows."""
  d_out = math.prod(meta["kernel_shape"][meta["kernel_input_ndim"] :])
  return y.reshape(n, -1, d_out)


def assemble_stats(
  meta: dict[LayerKey, dict[str, Any]],
  inputs: Sequence[list[jax.Array]],
  cots: Sequence[list[jax.Array]],
  fisher_cots: Sequence[list[jax.Array]] | None,
) -> Stats:
  """One :class:`LayerStats` per layer of ``meta`` from what its calls recorded.

  ``inputs[i]``, ``cots[i]`` and ``fisher_cots[i]`` (``None`` for the empirical
  Fisher) list the input rows, output cotangents and ``(S, ...)`` Fisher output
  cotangents of every call of the ``i``-th layer of ``meta``, in call order.
  """
  stats: Stats = {}
  for i, (key, layer_meta) in enumerate(meta.items()):
    conv: ConvGeometry | None = layer_meta.get("conv")
    if conv is None:
      layer_inputs = _concat_calls(key, inputs[i])
      n = layer_inputs.shape[0]
    else:  # the im2col rows are built on demand (LayerStats.inputs)
      layer_inputs = tuple(inputs[i])
      n = conv.examples
    layer_cots = _concat_calls(key, [_rows_like(layer_meta, c, n) for c in cots[i]])
    layer_fisher = None
    if fisher_cots is not None:
      sets = [jax.vmap(lambda c: _rows_like(layer_meta, c, n))(c) for c in fisher_cots[i]]
      layer_fisher = sets[0] if len(sets) == 1 else jnp.concatenate(sets, axis=2)
    stats[key] = LayerStats(
      layer_inputs=layer_inputs, cotangents=layer_cots, fisher_cotangents=layer_fisher, **layer_meta
    )
  return stats


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
  probe = Recorder()
  jax.eval_shape(lambda p: run(probe, p)[0], params)
  if not probe.outputs:
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
  perturbations = [[jnp.zeros(s.shape, s.dtype) for s in probe.outputs[k]] for k in keys]

  def traced(p, perts):
    recorder = Recorder(dict(zip(keys, perts)))
    loss, aux, extra = run(recorder, p)
    missing = [layer_name(k) for k in keys if k not in recorder.inputs]
    if missing:
      raise ValueError(
        f"Layers {missing} were applied when neuron_optax traced the loss for shapes but not in "
        "the differentiated pass; loss_fn must apply the same layers on every call."
      )
    return loss, recorder, (aux, [recorder.inputs[k] for k in keys], extra)

  if fisher == "empirical":

    def differentiable(p, perts):
      loss, _, recorded = traced(p, perts)
      return loss, recorded

    (loss, (aux, inputs, extra)), (grads, cots) = jax.value_and_grad(differentiable, argnums=(0, 1), has_aux=True)(
      params, perturbations
    )
    fisher_cots = None
  else:

    def with_output(p, perts):
      loss, recorder, recorded = traced(p, perts)
      outputs = recorder.model_outputs
      if len(outputs) != 1 or not isinstance(outputs[0], jax.Array):
        raise ValueError(
          f"fisher={fisher!r} needs loss_fn to apply the model exactly once and the model to "
          f"return one array (logits or predictions); found {len(outputs)} {model_calls}."
        )
      return (loss, outputs[0]), recorded

    (loss, model_out), vjp_fn, (aux, inputs, extra) = jax.vjp(with_output, params, perturbations, has_aux=True)
    grads, cots = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(model_out)))
    out_cots = fisher_output_cotangents(model_out, fisher, likelihood, rng)
    _, fisher_cots = jax.vmap(lambda c: vjp_fn((jnp.zeros_like(loss), c)))(out_cots)

  stats = assemble_stats(probe.meta, inputs, cots, fisher_cots)
  value = (loss, aux) if has_aux else loss
  return value, grads, stats, extra
