"""Flax NNX support: record each layer's neurons in one forward and one backward pass.

:func:`value_grad_and_stats` is the NNX counterpart of
:func:`neuron_optax.value_grad_and_stats`: it wraps ``loss_fn(model, *args)``,
whose first argument is an ``nnx.Module``, and returns ``(value, grads,
stats)``. ``grads`` is the ``nnx.State`` of the model's ``nnx.Param`` variables,
as ``nnx.value_and_grad(loss_fn)`` returns it, and ``stats`` maps the path of
every captured layer in that State (``('layers', 0)``, ``('linear1',)``,
``()`` for a top-level layer) to a :class:`neuron_optax.LayerStats` with
exactly the linen conventions: rows ``(n, P, d_in)`` of layer inputs (im2col
patches for convolutions), cotangents ``(n, P, d_out)`` of the **mean** loss
w.r.t. the layer outputs, and for ``fisher="mc"``/``"full"`` the Fisher
cotangents ``(S, n, P, d_out)``.

Training loop (the transforms accept ``nnx.State`` parameters and gradients, so
``nnx.Optimizer`` forwards ``stats=`` to them)::

    import optax
    from flax import nnx
    import neuron_optax as nox

    model = MLP(rngs=nnx.Rngs(0))
    tx = optax.chain(nox.foof(damping=1.0), optax.sgd(0.1, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, x, y):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads, stats = nox.nnx.value_grad_and_stats(loss_fn)(model, x, y)
      optimizer.update(model, grads, stats=stats)
      return loss

Captured layers: ``nnx.Linear``, ``nnx.LinearGeneral`` (``batch_axis`` must be
empty, axis 0 must not be contracted), ``nnx.Conv`` (same padding modes as
linen: ``SAME``/``VALID``/explicit/``CIRCULAR``/``REFLECT``/``CAUSAL``; no
groups, no mask) and ``nnx.Einsum`` where it is a plain matrix contraction:
every kernel label is either contracted with the input (and absent from the
output) or an output label (absent from the input), the contracted labels come
first in the kernel, the output lists the kernel's output labels in kernel
order, the input's first axis is not contracted, and every non-contracted input
label reaches the output (no ``...`` in the kernel, no repeated labels). Any
other ``nnx.Einsum`` (e.g. ``'nta,hab->nthb'``, whose kernel has a per-head
axis) is left uncaptured with a warning: its parameters pass through the
transforms unchanged. Subclasses of these modules are captured through their
``__call__``'s input and output. ``nnx.LoRA`` is captured as two bias-free
dense layers, ``x -> h = x·lora_a`` and ``h -> h·lora_b``, keyed by the paths
of its ``lora_a`` and ``lora_b`` leaves; the base weight of ``nnx.LoRALinear``
(or an ``nnx.LoRA``'s ``base_module``) is a layer of its own when it is
differentiated (``wrt=nnx.LoRAParam`` freezes it). ``nnx.MultiHeadAttention``
is captured through its ``query``/``key``/``value``/``out`` ``LinearGeneral``
layers. ``nnx.Embed`` is captured with one-hot input rows kept as token ids,
and its ``attend`` (a tied output layer) adds that use's rows.

How the layers are intercepted (NNX has no method interceptor; see
:mod:`neuron_optax.nnx_recording`): the model is split into its
differentiated state (``wrt``, by default ``nnx.Param``) and the rest; inside
the differentiated function a copy is merged from that state
(``nnx.merge(..., copy=True)``), and for the duration of ``loss_fn`` each
captured layer of the *copy* has its ``__class__`` swapped for a cached
subclass whose ``__call__`` records the input rows and adds a zero
perturbation to the output (restored when ``loss_fn`` returns or raises; the
user's model object is never touched; the active recording is a context
variable scoped to the call). A first pass
under ``jax.eval_shape`` records the output shapes; the real pass
differentiates w.r.t. the parameters and the zero perturbations together, so
the output cotangents cost no extra backward pass. Updates the loss makes to
non-parameter variables (``BatchStat``, RNG counts, ``sow``n intermediates)
are written back to the model, as ``nnx.value_and_grad`` does. This works eagerly, under ``nnx.jit``
and under ``jax.jit``.

Cost: the same as the linen path and ``nnx.value_and_grad``: one forward and
one backward pass (``fisher="full"`` adds a vmapped VJP over ``positions ×
classes`` cotangent sets, ``"mc"`` over one set), plus one extra trace of the
loss under ``jax.eval_shape`` (trace time only, nothing runs; under ``jit``
it is paid once per compilation). Memory: each captured layer keeps its input
rows (for a convolution the im2col patches, ``prod(kernel_size)`` times its
input) and its output cotangents until the transform has used them.

Other NNX arguments: ``loss_fn(model, *args, **kwargs)`` may take further NNX
objects besides the model (an ``nnx.Rngs`` for dropout, a second module with
state, ``nnx.Metric``s), positionally, by keyword or inside pytrees, as with
``nnx.value_and_grad``: they are split together with the model (shared
references stay shared), merged inside the differentiated function, where
``loss_fn`` may use and mutate them, and their updated state (RNG counts, batch
statistics) is written back. Only the model's (the first argument's)
``nnx.Param`` variables are differentiated and only its layers are captured;
a layer shared with another argument counts as the model's.

Layers inside NNX transforms: ``nnx.scan``/``nnx.vmap`` copy the modules they
get; a captured layer's copy carries its layer's path (a static attribute set
on the private copy while ``loss_fn`` runs), so its calls are recorded too.
Over stacked modules (built with ``nnx.vmap``, ``in_axes=0`` for their state)
each call reads two zero probes stored as Variables of the kernel's type next
to the kernel, which the transform slices like the kernel (see
:mod:`neuron_optax.capture_probes`); ``nnx.remat`` and ``nnx.jit`` work the
same way. A layer whose weights serve several iterations of a vmap/scan, or
called inside ``nnx.cond``/``nnx.while_loop``, raises ``NotImplementedError``
rather than returning statistics that disagree with the gradient. For
``fisher="mc"``/``"full"`` ``loss_fn`` must call the model (its ``__call__``)
exactly once, directly, and the model must return one array (logits or
predictions).

Kernel layout: the transforms split a kernel into input and output axes by
``kernel_input_ndim`` ("all but the last", attention ``query/key/value``: 1).
For stacked modules and other multi-axis ``nnx.LinearGeneral``/``nnx.Einsum``
outputs pass ``kernel_input_ndim=nox.nnx.kernel_layouts(model)``, which
reads the layout off the modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from neuron_optax import capture_driver, layer_rows
from neuron_optax.capture_args import FisherType, Likelihood, split_aux, validate_capture_args
from neuron_optax.capture_recorder import Recorder
from neuron_optax.layer_stats import LORA_FACTORS, KernelLayout, layer_name
from neuron_optax.nnx_recording import KEY_ATTRIBUTE as _KEY_ATTRIBUTE  # noqa: F401  (tests: nothing left behind)
from neuron_optax.nnx_recording import Recording, captured_layers

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
