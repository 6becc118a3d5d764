"""Amortised, debiased moving averages of Kronecker factors (shared by FOOF and KFAC).

Schedule (Benzing 2022, App. D.6/K): with ``inverse_every=T`` the factors are
re-factorised at steps ``0, T, 2T, …``; with ``stats_window=S`` the moving
averages are updated only in the ``S`` steps that end with a re-factorisation
step (steps ``kT-S+1 … kT``; step 0 is its own window), ``None`` meaning every
step. Moving averages are debiased: after ``k`` updates with decay ``β`` the
factor is ``Σ_j β^(k−j) X_j / Σ_j β^(k−j)``.

A batch whose statistics are not finite is skipped: the average keeps its last
finite value and its update count does not advance.

Also here: the fixed-``phase`` variant of the schedule (one compiled step per
phase, no conditional), and the re-factorisation of all layers grouped by
matrix size, optionally split across the devices of a mesh axis.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Hashable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp

from neuron_optax.capture import layer_name

Distribution = tuple[jax.sharding.Mesh, str]
Phase = Literal["auto", "plain", "statistics", "inversion"]
PHASES = ("plain", "statistics", "inversion")


def validate_amortisation(transform: str, damping: float, ema_decay: float, inverse_every: int,
                          stats_window: int | None) -> None:
  if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping > 0:
    raise ValueError(f"{transform}: damping must be a positive number, got {damping!r}.")
  if not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
    raise ValueError(f"{transform}: ema_decay must be in [0, 1), got {ema_decay!r}.")
  if not isinstance(inverse_every, int) or isinstance(inverse_every, bool) or inverse_every < 1:
    raise ValueError(f"{transform}: inverse_every must be an integer >= 1, got {inverse_every!r}.")
  if stats_window is not None:
    if not isinstance(stats_window, int) or isinstance(stats_window, bool) or stats_window < 1:
      raise ValueError(f"{transform}: stats_window must be None or an integer >= 1, got {stats_window!r}.")
    if stats_window > inverse_every:
      raise ValueError(
          f"{transform}: stats_window={stats_window} > inverse_every={inverse_every}: the statistics "
          "window must fit in one amortisation period. Use stats_window <= inverse_every (or None "
          "to update the averages every step).")


def validate_distribution(transform: str, distribute: Distribution | None) -> None:
  if distribute is None:
    return
  if (not isinstance(distribute, tuple) or len(distribute) != 2
      or not isinstance(distribute[0], jax.sharding.Mesh) or not isinstance(distribute[1], str)):
    raise ValueError(
        f"{transform}: distribute_factorisations must be None or a (jax.sharding.Mesh, axis name) "
        f"pair, e.g. (mesh, 'data'), got {distribute!r}.")
  mesh, axis = distribute
  if axis not in mesh.axis_names:
    raise ValueError(f"{transform}: distribute_factorisations names axis {axis!r}, but the mesh has "
                     f"axes {tuple(mesh.axis_names)}.")


def factorise_by_shape(fn: Callable[..., Any], operands: Mapping[Hashable, Sequence[jax.Array]],
                       distribute: Distribution | None = None) -> dict[Hashable, Any]:
  """``{name: fn(*operands[name])}``, with one batched call of ``fn`` per group of equal shapes.

  ``fn`` must accept stacked operands (a leading axis of matrices) and return
  a pytree of stacked results, as ``linalg.damped_inverse`` and
  ``linalg.sym_eigh`` do. Layers of equal size share one batched Cholesky or
  eigendecomposition instead of one call each (fewer, larger kernels on
  accelerators).

  With ``distribute=(mesh, axis)`` each stack is split along the mesh axis
  (``jax.shard_map``): every device factorises its share of the layers and the
  results are all-gathered where the update uses them. A stack is padded with
  copies of its first entry to a multiple of the axis size.
  """
  fn = _one_by_one_on_cpu(fn)
  groups: dict[Any, list[Hashable]] = collections.defaultdict(list)
  for name, args in operands.items():
    groups[tuple((x.shape, x.dtype) for x in args)].append(name)
  results = {}
  for names in groups.values():
    stacked = tuple(jnp.stack(column) for column in zip(*(operands[name] for name in names)))
    batched = fn(*stacked) if distribute is None else _distributed(fn, stacked, distribute)
    for index, name in enumerate(names):
      results[name] = jax.tree.map(lambda x, i=index: x[i], batched)
  return results


def _one_by_one_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
  """On CPU, ``fn`` applied to one matrix at a time and the results stacked.

  Batched LAPACK calls gain nothing on CPU (they loop over the matrices), and
  with jaxlib 0.10 several of them in one computation deadlocked XLA:CPU's
  thread pool (a ResNet's re-factorisation step never returned).
  """
  def apply(*stacked):
    if jax.default_backend() != "cpu":
      return fn(*stacked)
    results = [fn(*(x[i] for x in stacked)) for i in range(stacked[0].shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
  return apply


def _distributed(fn: Callable[..., Any], stacked: tuple[jax.Array, ...], distribute: Distribution):
  mesh, axis = distribute
  devices = mesh.shape[axis]
  count = stacked[0].shape[0]
  padded_count = -(-count // devices) * devices
  if padded_count != count:
    stacked = tuple(
        jnp.concatenate([x, jnp.broadcast_to(x[:1], (padded_count - count,) + x.shape[1:])])
        for x in stacked)
  spec = jax.sharding.PartitionSpec(axis)
  result = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(*stacked)
  return jax.tree.map(lambda x: x[:count], result)


def validate_phase(transform: str, phase: str) -> None:
  if phase != "auto" and phase not in PHASES:
    raise ValueError(f"{transform}: phase must be 'auto', 'plain', 'statistics' or 'inversion', "
                     f"got {phase!r}.")


def amortisation_phase(step: int, inverse_every: int = 1, stats_window: int | None = None) -> str:
  """The kind of the 0-based ``step`` under ``inverse_every=T``, ``stats_window=S``.

  ``"inversion"`` (update the moving averages and re-factorise: steps ``0, T,
  2T, …``), ``"statistics"`` (update the averages: the ``S − 1`` steps before
  each inversion, or every step when ``S`` is ``None``) or ``"plain"`` (apply
  the stored factorisation). A host-side (Python) function for training loops
  that compile one step per phase (``foof(..., phase=...)``).
  """
  position = int(step) % inverse_every
  if position == 0:
    return "inversion"
  if stats_window is None or stats_window >= inverse_every or position >= inverse_every - stats_window + 1:
    return "statistics"
  return "plain"


def schedule(count: jax.Array, inverse_every: int, stats_window: int | None, phase: Phase,
             stats: Mapping[Any, Any]):
  """``(update_statistics, refactorise)`` for step ``count`` (0-based).

  Traced booleans with ``phase="auto"``, tied to the layers' cotangents
  (:func:`after_backward`); Python booleans for a fixed phase, so that
  :func:`maybe` runs or drops its branch without a conditional.
  """
  if phase != "auto":
    return phase != "plain", phase == "inversion"
  position = count % inverse_every
  refactorise = position == 0
  if stats_window is None or stats_window >= inverse_every:
    update_statistics = jnp.asarray(True)
  else:
    update_statistics = refactorise | (position >= inverse_every - stats_window + 1)
  return after_backward((update_statistics, refactorise), stats)


def ema_update(ema: jax.Array, updates: jax.Array, batch_value: jax.Array, decay: float):
  """One debiasing-ready EMA step that skips non-finite batch values."""
  finite = jnp.all(jnp.isfinite(batch_value))
  new = decay * ema + (1 - decay) * jnp.where(finite, batch_value, 0).astype(ema.dtype)
  return jnp.where(finite, new, ema), updates + finite.astype(updates.dtype)


def debiased(ema: jax.Array, updates: jax.Array, decay: float) -> jax.Array:
  """``ema / (1 − β^k)``; zero while no finite batch has been seen."""
  correction = 1 - jnp.asarray(decay, ema.dtype) ** updates.astype(ema.dtype)
  return jnp.where(updates > 0, ema / jnp.where(updates > 0, correction, 1), 0)


def state_name(key) -> str:
  return layer_name(key)


def after_backward(predicate: Any, stats: Mapping[Any, Any]) -> Any:
  """``predicate`` (an array or a tuple of them), available once every layer's cotangents exist.

  A conditional can start only when its predicate is known; a predicate that
  depends on the step counter alone lets XLA place it before the backward
  pass, where (on CPU) it stalls the rest of the step: a conditional with the
  layer statistics as operands cost 10-13 % of an MLP step there, against 3 %
  when scheduled after the backward pass. Tying the predicate to the
  cotangents (``lax.optimization_barrier``, no computation) moves it there.
  """
  if isinstance(predicate, bool):
    return predicate
  cotangents = [layer.cotangents for layer in stats.values()]
  return jax.lax.optimization_barrier((predicate, cotangents))[0]


def maybe(predicate: jax.Array, fn: Callable[[], Any], current: Any) -> Any:
  """``fn()`` if ``predicate`` else ``current``, without running ``fn`` when false."""
  if isinstance(predicate, bool):  # a fixed phase: no conditional in the compiled step
    return fn() if predicate else current
  return jax.lax.cond(predicate, lambda _: fn(), lambda _: current, None)


def check_state_layer(transform: str, layers: dict, key, expected_shape: tuple[int, ...],
                      field: str) -> None:
  """Trace-time check that the state was initialised for these parameters."""
  name = state_name(key)
  if name not in layers:
    raise ValueError(f"{transform}: the optimizer state has no entry for layer {name!r}: it was "
                     "initialised with other parameters. Call tx.init(params) with this model's params.")
  actual = getattr(layers[name], field).shape
  if tuple(actual) != tuple(expected_shape):
    raise ValueError(f"{transform}: layer {name!r} has a {field} of shape {tuple(actual)} in the "
                     f"optimizer state but the gradients need {tuple(expected_shape)}: the state was "
                     "initialised for different parameters. Call tx.init(params) with this model's params.")
