"""How NNX layer calls are intercepted and read: recording subclasses on a private copy of the model.

NNX has no method interceptor (``nnx.capture`` records outputs that modules
``sow``, and its ``method_outputs`` patches the methods of the classes
themselves, process-wide), so for the duration of ``loss_fn`` each captured
layer of the *private copy* that :func:`neuron_optax.nnx.value_grad_and_stats`
merges inside the differentiated function has its ``__class__`` swapped for a
cached subclass whose ``__call__`` reports to the active
:class:`~neuron_optax._src.capture_recorder.Recorder`. The active recording lives
in a context variable scoped to the call; the swap, the layer-key attributes
and the probes are undone when ``loss_fn`` returns or raises.
"""

from __future__ import annotations

import contextvars
import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from neuron_optax._src import layer_rows
from neuron_optax._src.capture_probes import ATTEND, probe_names
from neuron_optax._src.capture_recorder import CallLayout, Recorder
from neuron_optax._src.layer_stats import LORA_FACTORS, LayerKey, layer_name
from neuron_optax._src.tree_paths import flatten

_CAPTURED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum, nnx.Embed, nnx.LoRA)


def _weight_names(module: nnx.Module) -> tuple[str, ...]:
  """The attributes holding a captured module's weight matrices (one per layer it records)."""
  if isinstance(module, nnx.LoRA):
    return LORA_FACTORS
  return ("embedding",) if isinstance(module, nnx.Embed) else ("kernel",)


def _layer_keys(module: nnx.Module, key: LayerKey) -> tuple[LayerKey, ...]:
  """The record keys of a captured module's layers: its path, or a LoRA adapter's two factor paths."""
  if isinstance(module, nnx.LoRA):
    return tuple(key + (name,) for name in LORA_FACTORS)
  return (key, key + (ATTEND,)) if isinstance(module, nnx.Embed) else (key,)


# --------------------------------------------------------------------------- #
# Layer layouts: how a call's input becomes rows and its output cotangent rows
# --------------------------------------------------------------------------- #


def _einsum_equation(module: nnx.Einsum, args, kwargs) -> str:
  if len(args) > 1 and args[1] is not None:
    return args[1]
  return kwargs.get("einsum_str") or module.einsum_str


def _meta(module, kind: str, input_ndim: int) -> dict[str, Any]:
  return dict(
    kind=kind, has_bias=module.bias is not None, kernel_shape=tuple(module.kernel.shape), kernel_input_ndim=input_ndim
  )


def _layout(module, key: LayerKey, x: jax.Array, args, kwargs) -> CallLayout | None:
  """How to read rows off this call of ``module``; ``None`` leaves it uncaptured."""
  if isinstance(module, nnx.Embed):
    meta = dict(kind="embed", has_bias=False, kernel_shape=tuple(module.embedding.shape), kernel_input_ndim=1)
    return CallLayout(functools.partial(layer_rows.token_rows, key=key, vocab=module.num_embeddings), meta)
  if isinstance(module, nnx.Conv):
    rows = functools.partial(layer_rows.conv_input, key=key, layer_type="nnx.Conv", **layer_rows.conv_settings(module))
    return CallLayout(rows, _meta(module, "conv", module.kernel.ndim - 1))
  if isinstance(module, nnx.LinearGeneral):
    names = dict(layer_type="nnx.LinearGeneral", batch_arg="batch_axis")
    batch_axis = tuple(module.batch_axis.keys())
    axis, _ = layer_rows.dense_general_axes(module.axis, batch_axis, jnp.ndim(x), key, **names)
    return CallLayout(
      lambda x: layer_rows.dense_general_rows(module.axis, batch_axis, x, key, **names),
      _meta(module, "dense", len(axis)),
    )
  if isinstance(module, nnx.Einsum):
    equation = _einsum_equation(module, args, kwargs)
    layout = layer_rows.einsum_layout(equation, jnp.ndim(x), module.kernel.ndim)
    if isinstance(layout, str):
      warnings.warn(
        f"neuron_optax.nnx: layer {layer_name(key)!r} (nnx.Einsum {equation!r}) is not captured: "
        f"{layout}, so it is not one weight matrix applied to rows of its input. Its parameters "
        "pass through the transforms unchanged.",
        stacklevel=2,
      )
      return None
    return CallLayout(
      functools.partial(layer_rows.einsum_rows, layout), _meta(module, "dense", layout.n_contracted), layout.output_perm
    )
  return CallLayout(layer_rows.as_rows, _meta(module, "dense", module.kernel.ndim - 1))


# --------------------------------------------------------------------------- #
# Interception by swapping the class of the (copied) modules
# --------------------------------------------------------------------------- #


# The recording of the loss_fn running now (None outside one). Scoped to the call: set when a recording
# starts and reset when it ends, so nested or concurrent recordings (threads, contexts) never see another's.
_ACTIVE: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("neuron_optax_nnx_recording", default=None)
# Recording subclasses, one per captured class (a cache of types, no per-call state).
_RECORDING_CLASSES: dict[type, type] = {}
# A static attribute set on every captured layer of the private copy while loss_fn runs: NNX transforms
# inside loss_fn (nnx.scan, nnx.vmap, nnx.remat) copy modules with their static attributes, so a copy
# knows which layer it is; the probes of such layers are attributes next to their kernels.
KEY_ATTRIBUTE = "_nox_layer_key"
_TRANSFORMS = (
  "nnx.scan and nnx.vmap over stacked modules (in_axes=0 for the module's state), nnx.remat, nnx.jit, "
  "jax.checkpoint and jax.jit"
)


def active_recording() -> Recording | None:
  """The recording of the ``loss_fn`` running now, if any."""
  return _ACTIVE.get()


def _recording_class(cls: type) -> type:
  """A cached subclass of ``cls`` whose ``__call__`` reports to the active recording."""
  recording_class = _RECORDING_CLASSES.get(cls)
  if recording_class is not None:
    return recording_class

  def __call__(self, *args, **kwargs):
    call = functools.partial(cls.__call__, self)
    recording = _ACTIVE.get()
    if recording is None:
      return call(*args, **kwargs)
    # A captured layer of the private copy, or its copy made by an NNX transform (nnx.scan, nnx.vmap,
    # nnx.remat, nnx.jit, nnx.clone) inside loss_fn, knows its layer; the recorder decides from the
    # trace the call runs in whether it can be captured.
    key = getattr(self, KEY_ATTRIBUTE, None)
    if key is not None:
      layer = call
      call = lambda *a, **k: _layer_call(recording.recorder, self, key, layer, a, k)
    if self is recording.model:  # the model's own call (not a transform's copy): its output, for the Fisher
      return recording.recorder.nested_call(lambda: call(*args, **kwargs))
    return call(*args, **kwargs)

  namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
  if issubclass(cls, nnx.Embed):

    def attend(self, query, *args, **kwargs):
      # A tied output layer, logits = q tableᵀ: a dense layer with kernel tableᵀ, recorded with the table.
      call = functools.partial(cls.attend, self)
      recording = _ACTIVE.get()
      key = getattr(self, KEY_ATTRIBUTE, None)
      if key is None or recording is None:
        return call(query, *args, **kwargs)
      key = key + (ATTEND,)
      meta = dict(kind="dense", has_bias=False, kernel_shape=tuple(self.embedding.shape[::-1]), kernel_input_ndim=1)
      layout = CallLayout(layer_rows.as_rows, meta)

      def probe(index):
        return tuple(getattr(self, name, None) for name in probe_names(index, key))

      return recording.recorder.captured_call(
        key, query, lambda: call(query, *args, **kwargs), layout, _probe_values(probe), _TRANSFORMS
      )

    namespace["attend"] = attend
  class_kwargs = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
  recording_class = types.new_class(cls.__name__, (cls,), class_kwargs, lambda ns: ns.update(namespace))
  _RECORDING_CLASSES[cls] = recording_class
  return recording_class


def captured_layers(model: nnx.Module, wrt: Any = nnx.Param) -> dict[LayerKey, nnx.Module]:
  """The modules :func:`value_grad_and_stats` intercepts, by their path in ``nnx.state(model)``.

  A module is captured when its weights (``kernel``, ``embedding``, a LoRA
  adapter's ``lora_a`` and ``lora_b``) are among the variables ``wrt``
  selects, the ones differentiated: the frozen base layer of an
  ``nnx.LoRALinear`` differentiated with ``wrt=nnx.LoRAParam`` is not a layer.
  """
  differentiated = set(flatten(nnx.state(model, wrt)).leaves)
  return {
    tuple(path): module
    for path, module in nnx.iter_modules(model)
    if isinstance(module, _CAPTURED_TYPES)
    and all(tuple(path) + (name,) in differentiated for name in _weight_names(module))
  }


class Recording:
  """Context manager, entered inside the differentiated function around ``loss_fn``: gives the captured
  layers of ``model`` (the private copy) recording classes, their layer keys and probes, and restores them.

  ``model`` is the private copy merged inside the traced function: the user's
  model object is never touched. The swap is undone in ``__exit__`` (also on
  errors), and the recording is visible to the recording classes only through
  a context variable set for its duration.
  """

  def __init__(self, model: nnx.Module, recorder: Recorder, record_output: bool, wrt: Any):
    self.layers = captured_layers(model, wrt)
    self.model = model if record_output else None
    self.recorder = recorder
    self.swapped: list[tuple[nnx.Module, type]] = []
    self.attributes: list[tuple[nnx.Module, str]] = []
    self.token: contextvars.Token | None = None

  def __enter__(self) -> Recording:
    try:
      self.recorder.start()
      self.token = _ACTIVE.set(self)
      for key, module in self.layers.items():
        self._swap(module)
        self._set(module, KEY_ATTRIBUTE, key)
        for layer_key in _layer_keys(module, key):  # an embedding's attend calls too
          weights = getattr(module, layer_key[-1] if isinstance(module, nnx.LoRA) else _weight_names(module)[0])
          for index, probes in enumerate((self.recorder.probes or {}).get(layer_key, [])):
            for name, probe in zip(_probe_names(module, index, layer_key), probes):
              # The kernel's Variable type: the transform's state filters treat the probe like the kernel.
              self._set(module, name, type(weights)(probe))
      if self.model is not None:
        self._swap(self.model)
    except BaseException:
      self.__exit__()
      raise
    return self

  def _swap(self, module: nnx.Module) -> None:
    if any(m is module for m, _ in self.swapped):  # the model is also a captured layer
      return
    original = type(module)
    # object.__setattr__: the module's own __setattr__ would treat __class__ as an attribute.
    object.__setattr__(module, "__class__", _recording_class(original))
    self.swapped.append((module, original))

  def _set(self, module: nnx.Module, name: str, value) -> None:
    setattr(module, name, value)
    self.attributes.append((module, name))

  def __exit__(self, *exc_info) -> bool:
    for module, name in reversed(self.attributes):
      delattr(module, name)
    self.attributes.clear()
    for module, original in reversed(self.swapped):
      object.__setattr__(module, "__class__", original)
    self.swapped.clear()
    if self.token is not None:
      _ACTIVE.reset(self.token)
      self.token = None
    return False


def _probe_names(module: nnx.Module, index: int, key: LayerKey) -> tuple[str, str]:
  return probe_names(index, key, key[-1] if isinstance(module, nnx.LoRA) else "")


def _lora_call(recorder: Recorder, module: nnx.LoRA, key: LayerKey, x: jax.Array, kwargs) -> jax.Array:
  """``nnx.LoRA.__call__`` as two bias-free dense layers, ``x -> h = x·lora_a`` and ``h -> h·lora_b``."""
  # Mirrors flax.nnx.LoRA.__call__ (flax 0.12), with each product recorded as a layer of its own.
  x, lora_a, lora_b = module.promote_dtype((x, module.lora_a[...], module.lora_b[...]), dtype=module.dtype)

  def factor(name: str, inputs: jax.Array, weights: jax.Array) -> jax.Array:
    factor_key = key + (name,)
    meta = dict(kind="dense", has_bias=False, kernel_shape=tuple(weights.shape), kernel_input_ndim=1)

    def probe(index):
      return tuple(getattr(module, n, None) for n in _probe_names(module, index, factor_key))

    return recorder.captured_call(
      factor_key,
      inputs,
      lambda: inputs @ weights,
      CallLayout(layer_rows.as_rows, meta),
      _probe_values(probe),
      _TRANSFORMS,
    )

  out = factor("lora_b", factor("lora_a", x, lora_a), lora_b)
  if module.base_module is not None:
    if not callable(module.base_module):
      raise ValueError("`self.base_module` must be callable.")
    out += module.base_module(x, **kwargs)
  return out


def _layer_call(recorder: Recorder, module, key: LayerKey, call, args, kwargs):
  """One call of a captured module: its output, with its rows reported to ``recorder``."""
  if isinstance(module, nnx.LoRA) and args:
    return _lora_call(recorder, module, key, args[0], kwargs)
  x = args[0] if args else kwargs.get("inputs")
  layout = None if x is None else _layout(module, key, x, args, kwargs)
  if layout is None:
    return call(*args, **kwargs)

  def probe(index):
    return tuple(getattr(module, name, None) for name in probe_names(index))

  return recorder.captured_call(key, x, lambda: call(*args, **kwargs), layout, _probe_values(probe), _TRANSFORMS)


def _probe_values(probe: Callable[[int], tuple]) -> Callable[[int], tuple]:
  return lambda index: tuple(None if v is None else v[...] for v in probe(index))
