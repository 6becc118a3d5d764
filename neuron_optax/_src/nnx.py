"""Flax NNX capture: the implementation behind the public :mod:`neuron_optax.nnx`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from neuron_optax._src import capture_driver, layer_rows
from neuron_optax._src.capture_args import FisherType, Likelihood, split_aux, validate_capture_args
from neuron_optax._src.capture_recorder import Recorder
from neuron_optax._src.layer_stats import LORA_FACTORS, KernelLayout, layer_name
from neuron_optax._src.nnx_recording import KEY_ATTRIBUTE as _KEY_ATTRIBUTE  # noqa: F401  (tests: nothing left behind)
from neuron_optax._src.nnx_recording import Recording, captured_layers

__all__ = ["value_grad_and_stats", "kernel_layouts", "captured_layers"]

# --------------------------------------------------------------------------- #
# value_grad_and_stats
# --------------------------------------------------------------------------- #


def _in_model(path, variable) -> bool:
  """Filter: a variable of the model, the first of the graph nodes split together."""
  del variable
  return bool(path) and path[0] == 0


def value_grad_and_stats(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  fisher: FisherType = "empirical",
  likelihood: Likelihood | None = None,
  wrt: Any = nnx.Param,
) -> Callable[..., Any]:
  """Like ``nnx.value_and_grad(loss_fn)``, and also records each layer's neurons.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` with an ``nnx.Module`` first,
      returning the **mean** loss over the batch (or ``(loss, aux)`` with
      ``has_aux=True``). The gradient is taken w.r.t. the model's
      ``nnx.Param`` variables. Other arguments may be arrays, pytrees or NNX
      objects (``nnx.Rngs``, other modules): as in ``nnx.value_and_grad``,
      their state changes (RNG counts, batch statistics) are written back.
    has_aux: as in ``nnx.value_and_grad``.
    fisher: ``"empirical"``, ``"mc"`` (the returned function takes ``rng=``)
      or ``"full"``; see :func:`neuron_optax.value_grad_and_stats`.
    likelihood: ``"categorical"`` or ``"gaussian"``; required unless
      ``fisher="empirical"``.
    wrt: an NNX filter of the model's variables to differentiate, as in
      ``nnx.value_and_grad(..., argnums=nnx.DiffState(0, wrt))``; by default
      every ``nnx.Param``. ``wrt=nnx.LoRAParam`` differentiates only LoRA
      adapters: the statistics then hold the adapters' factors alone, and the
      frozen base weights are neither differentiated nor captured.

  Returns:
    A function with ``loss_fn``'s signature (plus ``rng=`` for
    ``fisher="mc"``) returning ``(value, grads, stats)``: ``grads`` is the
    ``nnx.State`` of the ``nnx.Param`` gradients, ``stats`` maps each captured
    layer's path in that State to a :class:`LayerStats`. Updates of
    non-parameter variables made by ``loss_fn`` are applied to the model and
    to the other NNX arguments.
  """
  validate_capture_args(fisher, likelihood)
  model_params = nnx.All(wrt, _in_model)

  @functools.wraps(loss_fn)
  def wrapped(model, *args, rng: jax.Array | None = None, **kwargs):
    if not isinstance(model, nnx.Module):
      raise TypeError(
        "neuron_optax.nnx.value_grad_and_stats: loss_fn(model, *args) must get an nnx.Module as "
        f"its first argument, got {type(model).__name__}. For Flax linen models use "
        "neuron_optax.value_grad_and_stats(loss_fn)(params, ...)."
      )
    # Every NNX graph node among the other arguments (nnx.Rngs, other modules, metrics, also inside
    # pytrees) is split together with the model, as nnx.value_and_grad splits its arguments: shared
    # references stay shared, the model's nnx.Param variables are differentiated, and everything
    # else is merged inside the traced function (so loss_fn may mutate it there) and written back.
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=nnx.graph.is_graph_node)
    node_index = [i for i, leaf in enumerate(leaves) if nnx.graph.is_graph_node(leaf)]
    graphdef, params, rest = nnx.split((model, *(leaves[i] for i in node_index)), model_params, ...)
    params = params[0] if 0 in params else nnx.State({})
    record_output = fisher != "empirical"

    def run(recorder: Recorder, p):
      merged = nnx.merge(graphdef, nnx.State({0: p}), rest, copy=True)
      clone, call_leaves = merged[0], list(leaves)
      for i, node in zip(node_index, merged[1:]):
        call_leaves[i] = node
      call_args, call_kwargs = jax.tree.unflatten(treedef, call_leaves)
      with Recording(clone, recorder, record_output, wrt):
        out = loss_fn(clone, *call_args, **call_kwargs)
      loss, aux = split_aux(out, has_aux)
      return loss, aux, nnx.state(merged, nnx.Not(model_params))

    def no_layers():
      return ValueError(
        "neuron_optax.nnx.value_grad_and_stats found no nnx.Linear/nnx.LinearGeneral/nnx.Conv/"
        "nnx.Einsum/nnx.Embed/nnx.LoRA call inside loss_fn whose weights are differentiated (wrt="
        f"{wrt!r}): loss_fn(model, ...) must apply the layers of `model` (captured layers of this "
        f"model: {sorted(layer_name(k) for k in captured_layers(model, wrt))})."
      )

    value, grads, stats, new_rest = capture_driver.value_grad_and_stats(
      run,
      params,
      has_aux=has_aux,
      fisher=fisher,
      likelihood=likelihood,
      rng=rng,
      no_layers=no_layers,
      model_calls=f"call(s) of {type(model).__name__}.__call__",
    )
    nnx.update((model, *(leaves[i] for i in node_index)), new_rest)
    return value, grads, stats

  return wrapped


def _copy_ndim(module) -> int:
  """The rank of one copy's kernel, as the module's attributes describe it."""
  if isinstance(module, nnx.LinearGeneral):
    return len(tuple(module.in_features)) + len(tuple(module.out_features)) + len(module.batch_axis)
  if isinstance(module, (nnx.Conv, nnx.Einsum)):
    return len(module.kernel_shape)
  return 2  # nnx.Linear, nnx.Embed


def kernel_layouts(model: nnx.Module, wrt: Any = nnx.Param) -> dict[str, int | KernelLayout]:
  """``{layer path: layout}`` read off the model's captured modules.

  A layer maps to its number of kernel input axes; a stacked layer (a module
  built with ``nnx.vmap``, whose kernel has leading copy axes, applied with
  ``nnx.scan``/``nnx.vmap``) to a :class:`~neuron_optax.KernelLayout` with its
  stack axes. Pass it to a transform (``nox.foof(1.0,
  kernel_input_ndim=nox.nnx.kernel_layouts(model))``) when the model has
  stacked layers (FOOF, KFAC, FNGD and ``accumulate_micro_batches`` keep one
  state per copy) or ``nnx.LinearGeneral``/``nnx.Einsum`` layers whose output
  has several axes, which the parameters alone cannot tell apart from input
  axes. ``nnx.Einsum`` layers that are not plain matrix contractions are left out.
  ``wrt`` is the filter given to :func:`value_grad_and_stats` (only the layers
  it differentiates are listed: ``wrt=nnx.LoRAParam`` gives the LoRA factors).
  """
  layout = {}
  for key, module in captured_layers(model, wrt).items():
    if isinstance(module, nnx.LoRA):  # two bias-free dense layers, (d_in, rank) and (rank, d_out)
      for name in LORA_FACTORS:
        stack = getattr(module, name).ndim - 2
        layout[layer_name(key + (name,))] = KernelLayout(1, stack) if stack > 0 else 1
      continue
    weights = module.embedding if isinstance(module, nnx.Embed) else module.kernel
    stack = weights.ndim - _copy_ndim(module)
    if isinstance(module, nnx.LinearGeneral):
      k = len(tuple(module.in_features))
    elif isinstance(module, nnx.Einsum):
      if module.einsum_str is None:  # given at call time: the layout is only known then
        continue
      lhs = module.einsum_str.replace(" ", "").split("->")[0].split(",")[0]
      x_ndim = len(lhs) - 2 if "..." in lhs else len(lhs)  # an input ellipsis: one axis stands for it
      parsed = layer_rows.einsum_layout(module.einsum_str, x_ndim, module.kernel.ndim - stack)
      if isinstance(parsed, str):  # not one weight matrix: not captured (a warning says so at call time)
        continue
      k = parsed.n_contracted
    else:
      k = weights.ndim - stack - 1 if not isinstance(module, nnx.Embed) else 1
    layout[layer_name(key)] = KernelLayout(k, stack) if stack > 0 else k
  return layout
