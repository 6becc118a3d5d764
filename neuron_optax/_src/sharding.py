r"""Shardings for the optimizer states of FOOF, KFAC, FNGD and the natural gradient.

Every factor, inverse, eigenbasis and coefficient table in a ``foof`` / ``kfac`` / ``fngd`` state
belongs to one captured layer (a copy of a stacked layer is a layer of its own,
``'blocks/mlp[2]'``). :func:`state_sharding` gives each of those arrays a
:class:`jax.sharding.NamedSharding` derived from its layer's kernel: the array is split along its
first axis that the kernel's mesh axes divide, so that under FSDP or tensor parallelism the
optimizer state is spread over the same devices as the parameters. Counts, scalars, small arrays
and arrays no axis of which the device count divides (a bias-augmented factor of size
:math:`d_\text{in} + 1` is often odd) stay replicated.

The state's values do not depend on the layout: XLA inserts the collectives a step needs, and a
sharded run equals the replicated one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from neuron_optax._src.fngd import FngdState
from neuron_optax._src.foof import FoofState
from neuron_optax._src.kfac import KfacState

_LAYERED_STATES = (FoofState, KfacState, FngdState)
_STACK_INDEX = re.compile(r"\[\d+\]$")


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
  axes: list[str] = []
  for entry in spec:
    for name in entry if isinstance(entry, tuple) else (entry,):
      if name is not None and name not in axes:
        axes.append(name)
  return tuple(axes)


def _kernel_sharding(params_sharding: Any, layer: str) -> NamedSharding | None:
  # State keys are layer paths joined by '/', a stacked copy suffixed '[i]' (layer_stats.layer_name).
  node = params_sharding
  if layer != "<top-level>":
    for part in _STACK_INDEX.sub("", layer).split("/"):
      if not isinstance(node, dict) or part not in node:
        return None
      node = node[part]
  if isinstance(node, NamedSharding):
    return node
  if isinstance(node, dict):
    for name in ("kernel", "embedding"):
      if isinstance(node.get(name), NamedSharding):
        return node[name]
    leaves = [leaf for leaf in jax.tree.leaves(node) if isinstance(leaf, NamedSharding)]
    return leaves[0] if leaves else None
  return None


def _split(shape: Sequence[int], mesh: Mesh | AbstractMesh, axes: tuple[str, ...], min_elements: int) -> PartitionSpec:
  if not axes or len(shape) == 0 or math.prod(shape) < min_elements:
    return PartitionSpec()
  # All the kernel's axes together first (the most even spread), then each axis alone, largest first.
  candidates = [axes] + [(axis,) for axis in sorted(axes, key=lambda a: -mesh.shape[a])] if len(axes) > 1 else [axes]
  for group in candidates:
    devices = math.prod(mesh.shape[a] for a in group)
    if devices == 1:
      continue
    for dim, size in enumerate(shape):
      if size % devices == 0:
        entry = group[0] if len(group) == 1 else group
        return PartitionSpec(*([None] * dim), entry)
  return PartitionSpec()


def state_sharding(
  state: Any,
  params_sharding: Any,
  *,
  min_elements: int = 1024,
) -> Any:
  r"""Shardings for a FOOF / KFAC / FNGD / natural-gradient state that follow the parameters' sharding.

  For each array :math:`X` of a layer's state (moving averages :math:`A, G`, inverses
  :math:`(A + \lambda I)^{-1}`, eigenvectors :math:`U_A, U_G`, FNGD's coefficient table) with
  :math:`k` = the number of devices on the mesh axes :math:`\mathcal{M}` its layer's kernel is
  sharded over,

  .. math::

    X \text{ is split along its first axis } j \text{ with } k \mid X.\text{shape}[j]
    \text{ over } \mathcal{M} \text{ (else over the largest single axis of } \mathcal{M}
    \text{ that divides one); otherwise it is replicated.}

  A layer whose kernel is replicated keeps a replicated state. Use the result as the
  ``out_shardings`` of a jitted ``tx.init`` and as the state's sharding in a jitted step.

  Args:
    state: the state, or its shapes (``jax.eval_shape(tx.init, params)``); a whole ``optax.chain``
      state works, neuron states anywhere inside it. Leaves of other transforms found under a
      parameter's path with a shape its sharding fits (Adam's moments, momentum traces) get that
      parameter's sharding; the rest are replicated.
    params_sharding: a pytree of :class:`~jax.sharding.NamedSharding` with the parameters'
      structure (e.g. ``jax.tree.map(lambda x: x.sharding, params)``), or a
      :class:`~jax.sharding.Mesh`: then every layer's state is spread over all its axes (a
      ZeRO-style split under pure data parallelism).
    min_elements: arrays with fewer elements stay replicated (the collectives would cost more
      than the memory saved).

  Returns:
    A pytree of :class:`~jax.sharding.NamedSharding` with the structure of ``state``.

  Examples:
    >>> import jax, numpy as np, optax, neuron_optax as nox
    >>> from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> params = {"Dense_0": {"kernel": np.zeros((4, 8), np.float32), "bias": np.zeros(8, np.float32)}}
    >>> shard = {"Dense_0": {"kernel": NamedSharding(mesh, P(None, "fsdp")), "bias": NamedSharding(mesh, P())}}
    >>> tx = nox.foof(1.0)
    >>> shardings = nox.state_sharding(jax.eval_shape(tx.init, params), shard)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)

  References:
    Rajbhandari et al., *ZeRO: Memory optimizations toward training trillion parameter models*,
    SC 2020 (optimizer-state partitioning).
  """
  if isinstance(params_sharding, (Mesh, AbstractMesh)):
    mesh = params_sharding
    every_axis = tuple(mesh.axis_names)

    def layer_axes(_: str) -> tuple[str, ...]:
      return every_axis

  else:
    named = [leaf for leaf in jax.tree.leaves(params_sharding) if isinstance(leaf, NamedSharding)]
    if not named:
      raise TypeError(
        "state_sharding: params_sharding must be a jax.sharding.Mesh or a pytree of NamedSharding with the "
        f"parameters' structure (e.g. jax.tree.map(lambda x: x.sharding, params)); got {type(params_sharding)}."
      )
    mesh = named[0].mesh

    def layer_axes(layer: str) -> tuple[str, ...]:
      kernel = _kernel_sharding(params_sharding, layer)
      return _spec_axes(kernel.spec) if kernel is not None else ()

  replicated = NamedSharding(mesh, PartitionSpec())
  by_path: dict[tuple[str, ...], NamedSharding] = {}
  if not isinstance(params_sharding, (Mesh, AbstractMesh)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_sharding):
      if isinstance(leaf, NamedSharding):
        by_path[_dict_keys(path)] = leaf

  def leaf_sharding(axes: tuple[str, ...]) -> Callable[[Any], NamedSharding]:
    return lambda x: NamedSharding(mesh, _split(getattr(x, "shape", ()), mesh, axes, min_elements))

  def other_sharding(path: Any, leaf: Any) -> NamedSharding:
    # Param-shaped leaves of other transforms (moments, traces) follow the parameters themselves.
    keys = _dict_keys(path)
    for start in range(len(keys)):
      sharding = by_path.get(keys[start:])
      if sharding is not None:
        try:
          sharding.shard_shape(tuple(getattr(leaf, "shape", ())))
        except (ValueError, IndexError):
          return replicated
        return sharding
    return replicated

  def node_sharding(path: Any, node: Any) -> Any:
    if isinstance(node, _LAYERED_STATES):
      layers = {name: jax.tree.map(leaf_sharding(layer_axes(name)), layer) for name, layer in node.layers.items()}
      rest = {field: jax.tree.map(lambda _: replicated, getattr(node, field)) for field in node._fields}
      return node._replace(**{**rest, "layers": layers})
    return other_sharding(path, node)

  return jax.tree_util.tree_map_with_path(node_sharding, state, is_leaf=lambda x: isinstance(x, _LAYERED_STATES))


def _dict_keys(path: Any) -> tuple[str, ...]:
  return tuple(str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey))


def state_bytes_per_device(state: Any) -> int:
  """Bytes of ``state``'s arrays held by the busiest device (the replicated size when unsharded).

  Examples:
    >>> import jax.numpy as jnp, neuron_optax as nox
    >>> nox.state_bytes_per_device({"a": jnp.zeros((4, 4), jnp.float32)})
    64
  """
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)


class PaddedState(NamedTuple):
  """The state of :func:`pad_for_sharding`: the inner state, its layers' odd-sized arrays zero-padded."""

  inner: Any


def _pad_layers(node: Any, multiple: int, min_elements: int, shapes: Any = None) -> Any:
  # Pads (shapes=None) or crops back to ``shapes`` every array of a neuron layer state that no axis of
  # ``multiple`` divides; everything else is returned as it is.
  def pad(x: jax.Array) -> jax.Array:
    if x.ndim == 0 or x.size < min_elements or any(size % multiple == 0 for size in x.shape):
      return x
    extra = -x.shape[0] % multiple
    return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))

  def crop(x: jax.Array, shape: Any) -> jax.Array:
    return x if x.shape == shape.shape else x[: shape.shape[0]]

  def visit(state: Any, reference: Any) -> Any:
    if isinstance(state, _LAYERED_STATES):
      if reference is None:
        return state._replace(layers=jax.tree.map(pad, state.layers))
      return state._replace(layers=jax.tree.map(crop, state.layers, reference.layers))
    return state

  is_state = lambda x: isinstance(x, _LAYERED_STATES)  # noqa: E731
  if shapes is None:
    return jax.tree.map(lambda s: visit(s, None), node, is_leaf=is_state)
  return jax.tree.map(visit, node, shapes, is_leaf=is_state)


def pad_for_sharding(
  tx: optax.GradientTransformation, devices: int, *, min_elements: int = 1024
) -> optax.GradientTransformationExtraArgs:
  r"""Store a FOOF / KFAC / FNGD state with its odd-sized arrays zero-padded so that they can be sharded.

  JAX splits an axis only into equal parts, and a bias-augmented factor :math:`A` of size
  :math:`d_\text{in} + 1` is often odd. This wrapper stores every such array of a layer's state
  (one that has at least ``min_elements`` elements and no axis divisible by ``devices``) with its
  first axis padded by zero rows to the next multiple of ``devices``,

  .. math::

    X \mapsto \begin{pmatrix} X \\ 0 \end{pmatrix} \in \mathbb{R}^{\lceil d / k \rceil k \times d'},

  and crops the padding off before every update, so the inner transform and its results are
  unchanged; :func:`state_sharding` then splits the padded arrays. The crop and the pad are slices
  and concatenations that XLA partitions with the state.

  Args:
    tx: the transform (``foof``, ``kfac``, ``fngd``, or a chain containing them).
    devices: the number of devices the state is to be split over (e.g. ``mesh.shape["fsdp"]``).
    min_elements: smaller arrays are left as they are (and stay replicated).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a :class:`PaddedState`.

  Examples:
    >>> import jax, numpy as np, neuron_optax as nox
    >>> tx = nox.pad_for_sharding(nox.foof(1.0), devices=8, min_elements=1)
    >>> state = tx.init({"Dense_0": {"kernel": np.zeros((4, 8), np.float32), "bias": np.zeros(8, np.float32)}})
    >>> state.inner.layers["Dense_0"].a_ema.shape  # (5, 5) padded to (8, 5)
    (8, 5)

  References:
    Rajbhandari et al., *ZeRO: Memory optimizations toward training trillion parameter models*,
    SC 2020 (optimizer-state partitioning).
  """
  if not isinstance(devices, int) or devices < 1:
    raise ValueError(f"pad_for_sharding: devices must be a positive int (the mesh axis size); got {devices!r}.")
  tx = optax.with_extra_args_support(tx)

  def init_fn(params: Any) -> PaddedState:
    return PaddedState(_pad_layers(tx.init(params), devices, min_elements))

  def update_fn(updates: Any, state: PaddedState, params: Any = None, **extra_args: Any) -> tuple[Any, PaddedState]:
    # The unpadded layout is a function of the parameters' shapes only (the updates have them).
    shapes = jax.eval_shape(tx.init, params if params is not None else updates)
    inner = _pad_layers(state.inner, devices, min_elements, shapes)
    updates, inner = tx.update(updates, inner, params, **extra_args)
    return updates, PaddedState(_pad_layers(inner, devices, min_elements))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
