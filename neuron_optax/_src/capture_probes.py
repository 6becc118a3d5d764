"""Probes of layers applied inside lifted transforms (``nn.scan``/``nn.vmap``, ``remat``, ``jit``, NNX's too).

What a layer sees inside a transform runs in an inner JAX trace and cannot be
handed out of it as a Python value. Instead each such call gets two zero
**probes** with the layer's stack axes in front, stored next to the layer's
parameters (linen: in the ``params`` collection; NNX: as attributes of the
kernel's Variable type) so that the transform slices them exactly as it slices
the kernel. :func:`attach_probes`, one custom-VJP identity, adds the output
probe to the call's output and returns the call's input as the input probe's
cotangent: differentiating w.r.t. the probes yields every copy's output
cotangents and inputs, stacked, through any number of nested scans, vmaps and
rematerialisations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax._src.layer_stats import LayerKey


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


def probe_dtype(dtype) -> Any:
  """Integer inputs (token ids) travel as float32 cotangents (exact below 2**24)."""
  return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32


@jax.custom_vjp
def attach_probes(y: jax.Array, output_probe: jax.Array, input_probe: jax.Array, x: jax.Array) -> jax.Array:
  """``y + output_probe``; the cotangent of ``input_probe`` is ``x`` (whatever the output's is).

  ``x`` gets a zero cotangent here: the layer's own use of it carries its gradient.
  """
  del input_probe, x
  return y + output_probe


def _attach_fwd(y, output_probe, input_probe, x):
  del input_probe
  return y + output_probe, x


def _attach_bwd(x, g):
  return g, g, x.astype(probe_dtype(x.dtype)), _zero_cotangent(x)


attach_probes.defvjp(_attach_fwd, _attach_bwd)
