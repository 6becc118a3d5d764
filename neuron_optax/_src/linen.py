"""Flax linen front-end: record each layer's neurons in one forward and one backward pass.

:func:`value_grad_and_stats` wraps a loss function that applies a linen model
and returns, next to the loss and its gradient, a :class:`LayerStats` for every
captured layer (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``).

How: a ``flax.linen.intercept_methods`` interceptor sees every module call;
for captured layers it reports the call's input and output to the shared
:class:`~neuron_optax._src.capture_driver.Recorder`, and the shared driver
(:mod:`neuron_optax._src.capture_driver`) does the rest.

Layers inside lifted transforms: ``nn.scan``/``nn.vmap`` over stacked parameters
(``variable_axes={'params': 0}``), ``nn.remat``, ``nn.remat_scan`` and
``nn.jit`` (and ``jax.checkpoint``/``jax.jit`` inside ``loss_fn``) are captured
through probes that the driver adds to the ``params`` collection next to each
such layer's kernel (so the transform slices them like the kernel); ``loss_fn``
therefore sees a ``params`` tree with these extra zero leaves. Layers whose
weights serve several iterations of a ``vmap``/``scan`` (``nn.RNN``,
``variable_broadcast='params'``, ``jax.vmap`` over examples) and layers inside
other transforms (``nn.cond``, ``nn.while_loop``, ...) raise
``NotImplementedError``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from neuron_optax._src import capture_driver, layer_rows
from neuron_optax._src.capture_args import FisherType, Likelihood, split_aux, validate_capture_args
from neuron_optax._src.capture_probes import ATTEND, is_attend, probe_names
from neuron_optax._src.capture_recorder import CallLayout, Recorder
from neuron_optax._src.layer_stats import LayerKey

_TRANSFORMS = (
  "nn.scan, nn.vmap and nn.remat_scan over stacked parameters (variable_axes={'params': 0}), nn.remat, "
  "nn.jit, jax.checkpoint and jax.jit"
)


def _is_captured(module: nn.Module) -> bool:
  return isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed))


def _param_name(module: nn.Module) -> str:
  return "embedding" if isinstance(module, nn.Embed) else "kernel"


def _recorded(module: nn.Module, x: jax.Array, key: LayerKey):
  """Dense rows ``(n, P, d_in)``, token ids ``(n, P)``, or a convolution's ``(prepared input, geometry)``."""
  if isinstance(module, nn.Embed):
    return layer_rows.token_rows(x, key, module.num_embeddings)
  if isinstance(module, nn.Conv):
    return layer_rows.conv_input(x, key, **layer_rows.conv_settings(module))
  if isinstance(module, nn.DenseGeneral):
    return layer_rows.dense_general_rows(module.axis, module.batch_dims, x, key)
  return layer_rows.as_rows(x)


def _meta(module: nn.Module, x_ndim: int, key: LayerKey) -> dict[str, Any]:
  kernel = module.get_variable("params", _param_name(module))
  if isinstance(module, nn.Embed):
    return dict(kind="embed", has_bias=False, kernel_shape=tuple(kernel.shape), kernel_input_ndim=1)
  if isinstance(module, nn.DenseGeneral):
    axis, _ = layer_rows.dense_general_axes(module.axis, module.batch_dims, x_ndim, key)
    input_ndim = len(axis)
  else:
    input_ndim = kernel.ndim - 1
  return dict(
    kind="conv" if isinstance(module, nn.Conv) else "dense",
    has_bias=bool(module.use_bias),
    kernel_shape=tuple(kernel.shape),
    kernel_input_ndim=input_ndim,
  )


def _attend_meta(table: jax.Array) -> dict[str, Any]:
  return dict(kind="dense", has_bias=False, kernel_shape=tuple(table.shape[::-1]), kernel_input_ndim=1)


def with_probes(params, probes: Mapping[LayerKey, list[tuple[jax.Array, jax.Array]]] | None):
  """``params`` with each layer's probes added next to its kernel (``params[*key][probe name]``)."""
  if not probes or not any(probes.values()):
    return params
  frozen = isinstance(params, FrozenDict)
  tree = dict(params)
  for key, calls in probes.items():
    if not calls:
      continue
    node = tree
    for name in key[:-1] if is_attend(key) else key:  # attend calls: next to the table
      node[name] = dict(node[name])
      node = node[name]
    for index, (output_probe, input_probe) in enumerate(calls):
      output_name, input_name = probe_names(index, key)
      node[output_name], node[input_name] = output_probe, input_probe
  return FrozenDict(tree) if frozen else tree


class _Interceptor:
  """A ``flax.linen.intercept_methods`` interceptor reporting to one :class:`Recorder`."""

  def __init__(self, recorder: Recorder):
    self.recorder = recorder

  @contextlib.contextmanager
  def intercepting(self):
    """Intercepts module calls; call inside the traced loss so that its trace is the reference."""
    self.recorder.start()
    with nn.intercept_methods(self):
      yield self

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    method = context.method_name
    if (
      not (method == "__call__" or (method == "attend" and isinstance(module, nn.Embed)))
      or not _is_captured(module)
      or not args
      # A lifted transform's wrapper module (nn.vmap(nn.Dense)): its parameters live in the
      # transformed scope, where the interceptor sees the wrapped call.
      or module.get_variable("params", _param_name(module)) is None
    ):
      call = lambda: next_fun(*args, **kwargs)
    else:
      call = lambda: self._captured_call(module, next_fun, args, kwargs, method == "attend")
    return self.recorder.nested_call(call)

  def _captured_call(self, module, next_fun, args, kwargs, attend: bool):
    key = tuple(module.path)
    x = args[0]
    if attend:  # Embed.attend: logits = q tableᵀ, a dense layer with kernel tableᵀ, recorded with the table
      key = key + (ATTEND,)
      layout = CallLayout(layer_rows.as_rows, _attend_meta(module.get_variable("params", "embedding")))
    else:
      layout = CallLayout(lambda v: _recorded(module, v, key), _meta(module, jnp.ndim(x), key))

    def probe(index):
      return tuple(module.get_variable("params", name) for name in probe_names(index, key))

    return self.recorder.captured_call(key, x, lambda: next_fun(*args, **kwargs), layout, probe, _TRANSFORMS)


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
    Captured modules: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` and
    ``nn.Embed``, also inside ``nn.scan``/``nn.vmap``/``nn.remat_scan`` over
    stacked parameters (their statistics have the stack axes in front,
    ``LayerStats.stack_shape``), ``nn.remat`` and ``nn.jit``. All other
    parameters are not in ``stats`` and pass through the transforms.

  Raises:
    NotImplementedError: (when the returned function is called or traced) a
      captured layer's weights serve several iterations of a ``vmap``/``scan``
      (``nn.RNN``, ``variable_broadcast='params'``, ``jax.vmap`` over
      examples), or it is applied inside another transform (``nn.cond``,
      ``nn.while_loop``, differentiation inside ``loss_fn``).
  """
  validate_capture_args(fisher, likelihood)

  @functools.wraps(loss_fn)
  def wrapped(params, *args, rng: jax.Array | None = None, **kwargs):
    def run(recorder: Recorder, p):
      with _Interceptor(recorder).intercepting():
        out = loss_fn(with_probes(p, recorder.probes), *args, **kwargs)
      loss, aux = split_aux(out, has_aux)
      return loss, aux, None

    def no_layers():
      return ValueError(
        "value_grad_and_stats found no nn.Dense/nn.DenseGeneral/nn.Conv/nn.Embed call inside loss_fn. "
        "The loss function must apply a Flax linen model (model.apply) when called."
      )

    value, grads, stats, _ = capture_driver.value_grad_and_stats(
      run,
      params,
      has_aux=has_aux,
      fisher=fisher,
      likelihood=likelihood,
      rng=rng,
      no_layers=no_layers,
      model_calls="top-level module call(s)",
    )
    return value, grads, stats

  return wrapped
