"""Where a captured call runs: the JAX traces between the loss and a layer call.

This is the only module that reads JAX internals (``jax._src``, trace class
names, a jaxpr trace's ``debug_info.traced_for``). Layers applied outside any
transform need none of it: equal public trace-state tokens
(``jax.extend.core.get_opaque_trace_state``) mean the call runs in the
loss's own trace. For a call inside a lifted transform (``nn.scan``,
``nnx.vmap``, ``remat``, ``jit``, ...) the trace stack tells whether the
transform runs its body once per index of a stacked axis (vmap, scan), once
(jit, remat), or in a way capture cannot follow (cond, while_loop, nested
differentiation). Every read of the internals goes through :func:`_guarded`,
which turns a JAX version whose internals moved into one clear error naming
that version, instead of an ``AttributeError`` deep inside a trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax

T = TypeVar("T")

# The JAX release line whose internals this module was written against (and tested with).
_TESTED_JAX = "0.10"


class TraceInspectionError(NotImplementedError):
  """This JAX version's trace internals are not the ones neuron_optax reads for layers inside transforms."""


def _guarded(read: Callable[[], T]) -> T:
  """Runs ``read`` (which touches JAX internals); a failure becomes one error naming the JAX version."""
  try:
    return read()
  except (ImportError, AttributeError) as error:
    raise TraceInspectionError(
      f"neuron_optax cannot read the trace stack of JAX {jax.__version__} ({type(error).__name__}: {error}); "
      f"it reads JAX internals (jax._src.core.trace_ctx, trace parents) written for JAX {_TESTED_JAX}.x to "
      "capture layers applied inside transforms (nn.scan, nn.vmap, remat, jit and their NNX counterparts). "
      "Apply the layers outside transforms, or use a JAX version neuron_optax supports; layers outside "
      "transforms do not need these internals."
    ) from error


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
  """An opaque token of the innermost active JAX trace: equal tokens mean the same trace (public API)."""
  return None if _get_trace_state is None else _get_trace_state()


def _read_current_trace() -> Any:
  from jax._src import core as jax_core

  return jax_core.trace_ctx.trace


def current_trace() -> Any:
  """The innermost JAX trace object; raises :class:`TraceInspectionError` where JAX does not expose it."""
  return _guarded(_read_current_trace)


# Traces that run their function once per call: the probes of a call inside them are used once.
_SINGLE_USE = ("jit", "pjit", "checkpoint / remat", "remat")


class Nesting(NamedTuple):
  """The JAX transforms between the loss's trace and a captured call (innermost first)."""

  repeated: int  # transforms that run their body once per index of an axis: vmap, scan
  prepass: bool  # a partial-evaluation pass whose results are discarded (nn.scan's loop-invariant pass)
  unsupported: tuple[str, ...]  # any other transform (cond, while_loop, nested differentiation, ...)


def _walk(reference: Any) -> Nesting | None:
  trace = _read_current_trace()
  repeated, prepass, unsupported = 0, False, []
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
  if trace is None:
    return None
  return Nesting(repeated, prepass, tuple(unsupported))


def nesting(reference: Any) -> Nesting | None:
  """How the current trace nests inside ``reference`` (the loss's own trace, from :func:`current_trace`).

  ``None`` when ``reference`` is not among the current trace's ancestors (the
  call runs in a trace the loss did not start). Raises
  :class:`TraceInspectionError` where this JAX version's traces are not the
  ones this module reads.
  """
  return _guarded(lambda: _walk(reference))
