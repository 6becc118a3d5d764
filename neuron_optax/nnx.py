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
transforms unchanged. Subclasses of these modules (``nnx.LoRALinear``) are
captured through their ``__call__``'s input and output. ``nnx.MultiHeadAttention``
is captured through its ``query``/``key``/``value``/``out`` ``LinearGeneral``
layers. ``nnx.Embed`` is captured with one-hot input rows kept as token ids,
and its ``attend`` (a tied output layer) adds that use's rows.

How the layers are intercepted (NNX has no method interceptor): the model is
split into its ``nnx.Param`` state and the rest; inside the differentiated
function a copy is merged from that state (``nnx.merge(..., copy=True)``), and
for the duration of ``loss_fn`` each captured layer of the *copy* has its
``__class__`` swapped for a cached subclass whose ``__call__`` records the
input rows and adds a zero perturbation to the output (restored in a
``finally`` block; the user's model object is never touched). A first pass
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
:mod:`neuron_optax.capture_driver`); ``nnx.remat`` and ``nnx.jit`` work the
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
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from neuron_optax import capture_driver, layer_rows
from neuron_optax.capture_driver import CallLayout, FisherType, Likelihood, Recorder
from neuron_optax.layer_stats import LayerKey, layer_name
from neuron_optax.param_layout import KernelLayout

__all__ = ["value_grad_and_stats", "kernel_layouts", "captured_layers"]

_CAPTURED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum, nnx.Embed)


# --------------------------------------------------------------------------- #
# Layer layouts: how a call's input becomes rows and its output cotangent rows
# --------------------------------------------------------------------------- #


_Layout = CallLayout  # rows (input -> rows), meta (LayerStats static fields), output_perm


class _EinsumLayout(NamedTuple):
  input_perm: tuple[int, ...]  # input axes -> (batch axes in input order, contracted in kernel order)
  n_batch: int
  n_contracted: int
  output_perm: tuple[int, ...] | None


def _einsum_layout(equation: str, x_ndim: int, kernel_ndim: int) -> _EinsumLayout | str:
  """Layout of ``einsum(equation, x, kernel)`` as ``rows @ W``, or why it is not one."""
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    return "the equation is not explicit with two operands"
  operands, out = equation.split("->")
  lhs, rhs = operands.split(",")
  if "..." in rhs:
    return "the kernel has an ellipsis"
  if "..." in lhs:
    used = set(lhs + rhs + out)
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    n_ellipsis = x_ndim - (len(lhs) - 3)
    if n_ellipsis < 0 or n_ellipsis > len(free):
      return "the ellipsis does not fit the input"
    fill = "".join(free[:n_ellipsis])
    lhs = lhs.replace("...", fill)
    out = out.replace("...", fill) if "..." in out else out
  if "." in lhs + rhs + out:
    return "the equation has a misplaced ellipsis"
  if len(lhs) != x_ndim or len(rhs) != kernel_ndim:
    return "the equation does not match the operands' ranks"
  if any(len(set(s)) != len(s) for s in (lhs, rhs, out)):
    return "a label repeats within an operand (a diagonal)"
  contracted = [c for c in rhs if c in lhs]
  outputs = [c for c in rhs if c not in lhs]
  batch = [c for c in lhs if c not in rhs]
  if any(c in out for c in contracted):
    return "a kernel axis is shared with the input and the output (one kernel per index)"
  if any(c not in out for c in outputs):
    return "a kernel axis is summed over"
  if any(c not in out for c in batch):
    return "an input axis is summed over"
  if not contracted:
    return "no axis is contracted"
  if list(rhs) != contracted + outputs:
    return "the kernel's contracted axes do not all come before its output axes"
  if [c for c in out if c in outputs] != outputs:
    return "the output's kernel axes are not in the kernel's order"
  if batch and lhs[0] not in batch:
    return "the input's first (example) axis is contracted"
  input_perm = tuple(lhs.index(c) for c in batch + contracted)
  output_perm = tuple(out.index(c) for c in batch + outputs)
  identity = output_perm == tuple(range(len(out)))
  return _EinsumLayout(input_perm, len(batch), len(contracted), None if identity else output_perm)


def _einsum_rows(layout: _EinsumLayout, x: jax.Array) -> jax.Array:
  return layer_rows.transposed_rows(x, layout.input_perm, layout.n_batch)


def _einsum_equation(module: nnx.Einsum, args, kwargs) -> str:
  if len(args) > 1 and args[1] is not None:
    return args[1]
  return kwargs.get("einsum_str") or module.einsum_str


def _meta(module, kind: str, input_ndim: int) -> dict[str, Any]:
  return dict(
    kind=kind, has_bias=module.bias is not None, kernel_shape=tuple(module.kernel.shape), kernel_input_ndim=input_ndim
  )


def _layout(module, key: LayerKey, x: jax.Array, args, kwargs) -> _Layout | None:
  """How to read rows off this call of ``module``; ``None`` leaves it uncaptured."""
  if isinstance(module, nnx.Embed):
    meta = dict(kind="embed", has_bias=False, kernel_shape=tuple(module.embedding.shape), kernel_input_ndim=1)
    return _Layout(functools.partial(layer_rows.token_rows, key=key, vocab=module.num_embeddings), meta)
  if isinstance(module, nnx.Conv):
    rows = functools.partial(
      layer_rows.conv_input,
      key=key,
      kernel_size=module.kernel_size,
      strides=module.strides,
      padding=module.padding,
      input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation,
      feature_group_count=module.feature_group_count,
      mask=module.mask,
      layer_type="nnx.Conv",
    )
    return _Layout(rows, _meta(module, "conv", module.kernel.ndim - 1))
  if isinstance(module, nnx.LinearGeneral):
    names = dict(layer_type="nnx.LinearGeneral", batch_arg="batch_axis")
    batch_axis = tuple(module.batch_axis.keys())
    axis, _ = layer_rows.dense_general_axes(module.axis, batch_axis, jnp.ndim(x), key, **names)
    return _Layout(
      lambda x: layer_rows.dense_general_rows(module.axis, batch_axis, x, key, **names),
      _meta(module, "dense", len(axis)),
    )
  if isinstance(module, nnx.Einsum):
    equation = _einsum_equation(module, args, kwargs)
    layout = _einsum_layout(equation, jnp.ndim(x), module.kernel.ndim)
    if isinstance(layout, str):
      warnings.warn(
        f"neuron_optax.nnx: layer {layer_name(key)!r} (nnx.Einsum {equation!r}) is not captured: "
        f"{layout}, so it is not one weight matrix applied to rows of its input. Its parameters "
        "pass through the transforms unchanged.",
        stacklevel=2,
      )
      return None
    return _Layout(
      functools.partial(_einsum_rows, layout), _meta(module, "dense", layout.n_contracted), layout.output_perm
    )
  return _Layout(layer_rows.as_rows, _meta(module, "dense", module.kernel.ndim - 1))


# --------------------------------------------------------------------------- #
# Interception by swapping the class of the (copied) modules
# --------------------------------------------------------------------------- #


class _Entry(NamedTuple):
  recorder: Recorder
  key: LayerKey
  capture: bool  # record this module's calls as a layer
  model: bool  # the top-level module: record its output (Fisher)


_RECORDING_CLASSES: dict[type, type] = {}
_ACTIVE: dict[int, _Entry] = {}  # id(module copy) -> what to record while loss_fn runs
_RECORDERS: list[Recorder] = []  # the recorders of the loss functions running now, innermost last
# A static attribute set on every captured layer of the private copy while loss_fn runs: NNX transforms
# inside loss_fn (nnx.scan, nnx.vmap, nnx.remat) copy modules with their static attributes, so a copy
# knows which layer it is; the probes of such layers are attributes next to their kernels.
_KEY_ATTRIBUTE = "_nox_layer_key"
_TRANSFORMS = (
  "nnx.scan and nnx.vmap over stacked modules (in_axes=0 for the module's state), nnx.remat, nnx.jit, "
  "jax.checkpoint and jax.jit"
)


def _recording_class(cls: type) -> type:
  """A cached subclass of ``cls`` whose ``__call__`` reports to the active recorder."""
  recording = _RECORDING_CLASSES.get(cls)
  if recording is not None:
    return recording

  def __call__(self, *args, **kwargs):
    call = functools.partial(cls.__call__, self)
    entry = _ACTIVE.get(id(self))
    if entry is None:
      # A copy made by an NNX transform (nnx.scan, nnx.vmap, nnx.remat, nnx.jit, nnx.clone) inside
      # loss_fn. A captured layer's copy knows its layer; the recorder decides from the trace it runs
      # in whether it can be captured. Any other copy (the model's, for the Fisher) is not recorded.
      key = getattr(self, _KEY_ATTRIBUTE, None)
      if key is None or not _RECORDERS:
        return call(*args, **kwargs)
      entry = _Entry(_RECORDERS[-1], key, True, False)
    if entry.capture:
      layer = call
      call = lambda *a, **k: _layer_call(entry.recorder, self, entry.key, layer, a, k)
    if entry.model:
      return entry.recorder.nested_call(lambda: call(*args, **kwargs))
    return call(*args, **kwargs)

  namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
  if issubclass(cls, nnx.Embed):

    def attend(self, query, *args, **kwargs):
      # A tied output layer, logits = q tableᵀ: a dense layer with kernel tableᵀ, recorded with the table.
      call = functools.partial(cls.attend, self)
      entry = _ACTIVE.get(id(self))
      key = entry.key if entry is not None else getattr(self, _KEY_ATTRIBUTE, None)
      if key is None or (entry is not None and not entry.capture) or not _RECORDERS:
        return call(query, *args, **kwargs)
      recorder = entry.recorder if entry is not None else _RECORDERS[-1]
      key = key + (capture_driver.ATTEND,)
      meta = dict(kind="dense", has_bias=False, kernel_shape=tuple(self.embedding.shape[::-1]), kernel_input_ndim=1)
      layout = _Layout(layer_rows.as_rows, meta)

      def probe(index):
        return tuple(getattr(self, name, None) for name in capture_driver.probe_names(index, key))

      return recorder.captured_call(
        key, query, lambda: call(query, *args, **kwargs), layout, _probe_values(probe), _TRANSFORMS
      )

    namespace["attend"] = attend
  class_kwargs = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
  recording = types.new_class(cls.__name__, (cls,), class_kwargs, lambda ns: ns.update(namespace))
  _RECORDING_CLASSES[cls] = recording
  return recording


def captured_layers(model: nnx.Module) -> dict[LayerKey, nnx.Module]:
  """The modules :func:`value_grad_and_stats` intercepts, by their path in ``nnx.state(model)``."""
  return {tuple(path): module for path, module in nnx.iter_modules(model) if isinstance(module, _CAPTURED_TYPES)}


class _Recording:
  """Context manager: swaps the classes of ``model``'s captured modules, restores them."""

  def __init__(self, model: nnx.Module, recorder: Recorder, record_output: bool):
    self.targets: dict[int, tuple[nnx.Module, _Entry]] = {}
    for key, module in captured_layers(model).items():
      self.targets[id(module)] = (module, _Entry(recorder, key, True, False))
    if record_output:
      module, entry = self.targets.get(id(model), (model, _Entry(recorder, (), False, False)))
      self.targets[id(model)] = (model, entry._replace(model=True))
    self.swapped: list[tuple[nnx.Module, type]] = []

    self.recorder = recorder
    self.attributes: list[tuple[nnx.Module, str]] = []

  def __enter__(self):
    try:
      self.recorder.start()
      _RECORDERS.append(self.recorder)
      for module, entry in self.targets.values():
        original = type(module)
        # object.__setattr__: the module's own __setattr__ would treat __class__ as an attribute.
        object.__setattr__(module, "__class__", _recording_class(original))
        self.swapped.append((module, original))
        _ACTIVE[id(module)] = entry
        if entry.capture:
          self._set(module, _KEY_ATTRIBUTE, entry.key)
          weights = getattr(module, "embedding" if isinstance(module, nnx.Embed) else "kernel")
          for key in (entry.key, entry.key + (capture_driver.ATTEND,)):  # an embedding's attend calls too
            for index, probes in enumerate((self.recorder.probes or {}).get(key, [])):
              for name, probe in zip(capture_driver.probe_names(index, key), probes):
                # The kernel's Variable type: the transform's state filters treat the probe like the kernel.
                self._set(module, name, type(weights)(probe))
    except BaseException:
      self.__exit__()
      raise
    return self

  def _set(self, module: nnx.Module, name: str, value) -> None:
    setattr(module, name, value)
    self.attributes.append((module, name))

  def __exit__(self, *exc_info):
    for module, name in reversed(self.attributes):
      delattr(module, name)
    self.attributes.clear()
    for module, original in reversed(self.swapped):
      _ACTIVE.pop(id(module), None)
      object.__setattr__(module, "__class__", original)
    self.swapped.clear()
    if self.recorder in _RECORDERS:
      _RECORDERS.remove(self.recorder)
    return False


def _layer_call(recorder: Recorder, module, key: LayerKey, call, args, kwargs):
  """One call of a captured module: its output, with its rows reported to ``recorder``."""
  x = args[0] if args else kwargs.get("inputs")
  layout = None if x is None else _layout(module, key, x, args, kwargs)
  if layout is None:
    return call(*args, **kwargs)

  def probe(index):
    return tuple(getattr(module, name, None) for name in capture_driver.probe_names(index))

  return recorder.captured_call(key, x, lambda: call(*args, **kwargs), layout, _probe_values(probe), _TRANSFORMS)


def _probe_values(probe: Callable[[int], tuple]) -> Callable[[int], tuple]:
  return lambda index: tuple(None if v is None else v[...] for v in probe(index))


# --------------------------------------------------------------------------- #
# value_grad_and_stats
# --------------------------------------------------------------------------- #


def _in_model(path, variable) -> bool:
  """Filter: a variable of the model, the first of the graph nodes split together."""
  del variable
  return bool(path) and path[0] == 0


_MODEL_PARAMS = nnx.All(nnx.Param, _in_model)


def value_grad_and_stats(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  fisher: FisherType = "empirical",
  likelihood: Likelihood | None = None,
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

  Returns:
    A function with ``loss_fn``'s signature (plus ``rng=`` for
    ``fisher="mc"``) returning ``(value, grads, stats)``: ``grads`` is the
    ``nnx.State`` of the ``nnx.Param`` gradients, ``stats`` maps each captured
    layer's path in that State to a :class:`LayerStats`. Updates of
    non-parameter variables made by ``loss_fn`` are applied to the model and
    to the other NNX arguments.
  """
  capture_driver.validate_capture_args(fisher, likelihood)

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
    graphdef, params, rest = nnx.split((model, *(leaves[i] for i in node_index)), _MODEL_PARAMS, ...)
    params = params[0] if 0 in params else nnx.State({})
    record_output = fisher != "empirical"

    def run(recorder: Recorder, p):
      merged = nnx.merge(graphdef, nnx.State({0: p}), rest, copy=True)
      clone, call_leaves = merged[0], list(leaves)
      for i, node in zip(node_index, merged[1:]):
        call_leaves[i] = node
      call_args, call_kwargs = jax.tree.unflatten(treedef, call_leaves)
      with _Recording(clone, recorder, record_output):
        out = loss_fn(clone, *call_args, **call_kwargs)
      loss, aux = capture_driver.split_aux(out, has_aux)
      return loss, aux, nnx.state(merged, nnx.Not(_MODEL_PARAMS))

    def no_layers():
      return ValueError(
        "neuron_optax.nnx.value_grad_and_stats found no nnx.Linear/nnx.LinearGeneral/nnx.Conv/"
        "nnx.Einsum call inside loss_fn: loss_fn(model, ...) must apply the layers of `model` "
        f"(captured layers of this model: {sorted(layer_name(k) for k in captured_layers(model))})."
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


def kernel_layouts(model: nnx.Module) -> dict[str, int | KernelLayout]:
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
  """
  layout = {}
  for key, module in captured_layers(model).items():
    weights = module.embedding if isinstance(module, nnx.Embed) else module.kernel
    stack = weights.ndim - _copy_ndim(module)
    if isinstance(module, nnx.LinearGeneral):
      k = len(tuple(module.in_features))
    elif isinstance(module, nnx.Einsum):
      if module.einsum_str is None:  # given at call time: the layout is only known then
        continue
      operands = module.einsum_str.replace(" ", "").split("->")[0].split(",")
      if len(operands) != 2 or "." in operands[1]:
        continue
      lhs, rhs = operands
      contracted = [c for c in rhs if c in lhs]
      if not contracted or list(rhs[: len(contracted)]) != contracted:
        continue
      k = len(contracted)
    else:
      k = weights.ndim - stack - 1 if not isinstance(module, nnx.Embed) else 1
    layout[layer_name(key)] = KernelLayout(k, stack) if stack > 0 else k
  return layout
