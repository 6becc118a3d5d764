"""Flax linen front-end: record each layer's neurons in one forward and one backward pass.

:func:`value_grad_and_stats` wraps a loss function that applies a linen model
and returns, next to the loss and its gradient, a :class:`LayerStats` for every
captured layer (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``).

How: a ``flax.linen.intercept_methods`` interceptor sees every module call;
for captured layers it reports the call's input rows and output to the shared
:class:`~neuron_optax.capture_driver.Recorder`, and the shared driver
(:mod:`neuron_optax.capture_driver`) does the rest.

Captured layers must run in the trace of the loss itself: a layer applied inside
a lifted transform (``nn.remat``, ``nn.scan``, ``nn.vmap``, ``nn.jit``, ...) or
a JAX transform within ``loss_fn`` raises ``NotImplementedError`` (not yet
supported).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from neuron_optax import capture_driver, layer_rows
from neuron_optax.capture_driver import FisherType, Likelihood, Recorder
from neuron_optax.layer_stats import LayerKey, layer_name


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
      getter = module.get_opaque_trace_state
    except (ImportError, AttributeError):
      continue
    return lambda: getter(convention="flax")
  return None


_get_trace_state = _find_trace_state_getter()


def _trace_state() -> Any:
  """An opaque token of the innermost active JAX trace: equal tokens mean the same trace."""
  return None if _get_trace_state is None else _get_trace_state()


def _is_captured(module: nn.Module) -> bool:
  return isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))


def _recorded(module: nn.Module, x: jax.Array, key: LayerKey):
  """Dense rows ``(n, P, d_in)``, or a convolution's ``(prepared input, geometry)``."""
  if isinstance(module, nn.Conv):
    return layer_rows.conv_input(
      x,
      key,
      kernel_size=module.kernel_size,
      strides=module.strides,
      padding=module.padding,
      input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation,
      feature_group_count=module.feature_group_count,
      mask=module.mask,
    )
  if isinstance(module, nn.DenseGeneral):
    return layer_rows.dense_general_rows(module.axis, module.batch_dims, x, key)
  return layer_rows.as_rows(x)


def _meta(module: nn.Module, x_ndim: int, key: LayerKey) -> dict[str, Any]:
  kernel = module.get_variable("params", "kernel")
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


class _Interceptor:
  """A ``flax.linen.intercept_methods`` interceptor reporting to one :class:`Recorder`."""

  def __init__(self, recorder: Recorder):
    self.recorder = recorder
    self.trace_state = None  # the loss's own trace, set by `intercepting`

  @contextlib.contextmanager
  def intercepting(self):
    """Intercepts module calls; call inside the traced loss so that its trace is the reference."""
    self.trace_state = _trace_state()
    with nn.intercept_methods(self):
      yield self

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not _is_captured(module) or not args:
      call = lambda: next_fun(*args, **kwargs)
    else:
      call = lambda: self._captured_call(module, next_fun, args, kwargs)
    return self.recorder.nested_call(call)

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
        "separately named blocks, or jit the whole training step instead of using nn.jit."
      )
    x = args[0]
    y = next_fun(*args, **kwargs)
    return self.recorder.layer_call(key, _recorded(module, x, key), _meta(module, jnp.ndim(x), key), y)


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
  capture_driver.validate_capture_args(fisher, likelihood)

  @functools.wraps(loss_fn)
  def wrapped(params, *args, rng: jax.Array | None = None, **kwargs):
    def run(recorder: Recorder, p):
      with _Interceptor(recorder).intercepting():
        out = loss_fn(p, *args, **kwargs)
      loss, aux = capture_driver.split_aux(out, has_aux)
      return loss, aux, None

    def no_layers():
      return ValueError(
        "value_grad_and_stats found no nn.Dense/nn.DenseGeneral/nn.Conv call inside loss_fn. "
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
