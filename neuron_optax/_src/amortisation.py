"""Amortisation: when the statistics are updated and the factors re-factorised.

One schedule for every method that keeps factors between steps:

* FOOF and KFAC (Benzing 2022, App. D.6/K): with ``inverse_every=T`` the
  factors are re-factorised at steps ``0, T, 2T, …``; with ``stats_window=S``
  the moving averages are updated only in the ``S`` steps that end with a
  re-factorisation step (steps ``kT-S+1 … kT``; step 0 is its own window).
  Defaults (``None``): ``T = 100`` and ``S = min(10, T)``, chosen with
  ``benchmarks/defaults.py`` (README, "Step cost of the amortisation"); ``S = T``
  updates the averages every step.
* FNGD (coefficient sharing): the coefficients are solved for in the steps of
  epochs ``0, R, 2R, …`` and reused from the table otherwise.

Every step has a **phase**: ``"inversion"`` (update the statistics and
re-factorise / solve), ``"statistics"`` (update the statistics only) or
``"plain"`` (apply what is stored). ``phase="auto"`` picks it inside the
compiled step (one ``lax.cond``); a fixed phase compiles one step per phase,
picked on the host with :func:`amortisation_phase` / :func:`coefficient_phase`.

Moving averages are debiased: after ``k`` updates with decay ``β`` the factor
is ``Σ_j β^(k−j) X_j / Σ_j β^(k−j)``. A batch whose statistics are not finite
is skipped: the average keeps its last finite value and its update count does
not advance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax._src import hyperparams
from neuron_optax._src.layer_stats import LayerKey, layer_name

Phase = Literal["auto", "plain", "statistics", "inversion"]
PHASES = ("plain", "statistics", "inversion")

# FOOF's and KFAC's amortisation when none is given (``None``; the README's step-cost table shows
# why). ``None`` rather than a number as the default keeps them out of optax.inject_hyperparams'
# traced hyperparameters.
DEFAULT_INVERSE_EVERY = 100
DEFAULT_STATS_WINDOW = 10


def resolve_amortisation(inverse_every: int | None, stats_window: int | None) -> tuple[int, int]:
  """``(T, S)``: ``T`` defaults to ``DEFAULT_INVERSE_EVERY``, ``S`` to ``min(DEFAULT_STATS_WINDOW, T)``."""
  if inverse_every is None:
    inverse_every = DEFAULT_INVERSE_EVERY
  if stats_window is None and (hyperparams.is_integer(inverse_every) or isinstance(inverse_every, np.integer)):
    stats_window = min(DEFAULT_STATS_WINDOW, int(inverse_every))  # invalid periods are left to validation
  return inverse_every, stats_window


def validate_amortisation(transform: str, ema_decay: float, inverse_every: int, stats_window: int | None) -> None:
  hyperparams.check_scalar_or_schedule(transform, "ema_decay", ema_decay, upper=1.0, include_lower=True)
  validate_schedule(transform, inverse_every, stats_window)


def validate_schedule(transform: str, inverse_every: int, stats_window: int | None) -> None:
  hyperparams.check_integer(transform, "inverse_every", inverse_every)
  hyperparams.check_integer(transform, "stats_window", stats_window, optional=True)
  if stats_window is not None and stats_window > inverse_every:
    raise ValueError(
      f"{transform}: stats_window={stats_window} > inverse_every={inverse_every}: the statistics "
      "window must fit in one amortisation period. Use stats_window <= inverse_every "
      "(stats_window=inverse_every updates the averages every step)."
    )


def validate_phase(transform: str, phase: str, phases=("auto",) + PHASES) -> None:
  hyperparams.check_choice(transform, "phase", phase, phases)


def amortisation_phase(step: int, inverse_every: int | None = None, stats_window: int | None = None) -> str:
  """The kind of the 0-based ``step`` under ``inverse_every=T``, ``stats_window=S``.

  ``"inversion"`` (update the moving averages and re-factorise: steps ``0, T,
  2T, …``), ``"statistics"`` (update the averages: the ``S − 1`` steps before
  each inversion) or ``"plain"`` (apply the stored factorisation). ``None``
  takes the transforms' defaults (``T = 100``, ``S = min(10, T)``). A
  host-side (Python) function for training loops that compile one step per
  phase (``foof(..., phase=...)``); pass it the transform's own settings.
  """
  _check_step("amortisation_phase", step)
  inverse_every, stats_window = resolve_amortisation(inverse_every, stats_window)
  validate_schedule("amortisation_phase", inverse_every, stats_window)
  position = int(step) % inverse_every
  if position == 0:
    return "inversion"
  if stats_window is None or stats_window >= inverse_every or position >= inverse_every - stats_window + 1:
    return "statistics"
  return "plain"


def coefficient_phase(step: int, steps_per_epoch: int, refresh_every_epochs: int | None = None) -> str:
  """FNGD's kind of the 0-based ``step``: ``"inversion"`` (solve for and store the coefficients)
  in epochs ``0, R, 2R, …`` (only epoch 0 when ``R`` is ``None``), else ``"plain"`` (reuse them).

  The host-side counterpart of ``fngd(..., phase="auto")``, for loops that
  compile one step per phase (``fngd(..., phase="inversion")`` and ``"plain"``).
  """
  _check_step("coefficient_phase", step)
  hyperparams.check_integer("coefficient_phase", "steps_per_epoch", steps_per_epoch)
  hyperparams.check_integer("coefficient_phase", "refresh_every_epochs", refresh_every_epochs, optional=True)
  epoch = int(step) // steps_per_epoch
  computing = epoch == 0 if refresh_every_epochs is None else epoch % refresh_every_epochs == 0
  return "inversion" if computing else "plain"


def _check_step(function: str, step) -> None:
  """``step`` is a 0-based step number (a Python or NumPy integer, or a concrete integer array)."""
  hyperparams.check_integer(function, "step", step, minimum=0)


def schedule(
  count: jax.Array,
  inverse_every: int,
  stats_window: int | None,
  phase: Phase,
  stats: Mapping[Any, Any],
  damping_changed: jax.Array | bool = False,
):
  """``(update_statistics, refactorise)`` for step ``count`` (0-based).

  Traced booleans with ``phase="auto"``, tied to the layers' cotangents
  (:func:`after_backward`); Python booleans for a fixed phase, so that
  :func:`maybe` runs or drops its branch without a conditional. With
  ``phase="auto"`` a step whose damping differs from the one the stored
  factors were built with (``damping_changed``) re-factorises too.
  """
  if phase != "auto":
    return phase != "plain", phase == "inversion"
  position = count % inverse_every
  scheduled = position == 0
  if stats_window is None or stats_window >= inverse_every:
    update_statistics = jnp.asarray(True)
  else:
    update_statistics = scheduled | (position >= inverse_every - stats_window + 1)
  refactorise = scheduled | damping_changed
  return after_backward((update_statistics, refactorise), stats)


def coefficient_schedule(
  count: jax.Array, steps_per_epoch: int, refresh_every_epochs: int | None, phase: Phase, stats: Mapping[Any, Any]
):
  """Whether step ``count`` solves for FNGD's coefficients (traced with ``phase="auto"``)."""
  if phase != "auto":
    return phase == "inversion"
  epoch = count // steps_per_epoch
  computing = epoch == 0 if refresh_every_epochs is None else epoch % refresh_every_epochs == 0
  return after_backward(computing, stats)


def ema_update(ema: jax.Array, updates: jax.Array, weight: jax.Array, batch_value: jax.Array, decay: jax.Array):
  """One moving-average step that skips non-finite batch values.

  Returns ``(ema, updates, weight)``: the biased average
  ``β·ema + (1 − β)·X``, the number of finite batches in it, and the
  debiasing weight ``β·weight + (1 − β)`` (``1 − β^k`` for a constant ``β``;
  also right when ``β`` follows a schedule).
  """
  finite = jnp.all(jnp.isfinite(batch_value))
  decay = jnp.asarray(decay, ema.dtype)
  new = decay * ema + (1 - decay) * jnp.where(finite, batch_value, 0).astype(ema.dtype)
  new_weight = decay * weight + (1 - decay)
  return (
    jnp.where(finite, new, ema),
    updates + finite.astype(updates.dtype),
    jnp.where(finite, new_weight, weight).astype(weight.dtype),
  )


def debiased(ema: jax.Array, weight: jax.Array) -> jax.Array:
  """``ema / weight``; zero while no finite batch has been seen."""
  return jnp.where(weight > 0, ema / jnp.where(weight > 0, weight, 1).astype(ema.dtype), 0)


def after_backward(predicate: Any, stats: Mapping[Any, Any]) -> Any:
  """``predicate`` (an array or a tuple of them), available once every layer's cotangents exist.

  A conditional can start only when its predicate is known; a predicate that
  depends on the step counter alone lets XLA place it before the backward
  pass. Tying the predicate to the cotangents (``lax.optimization_barrier``, no
  computation) is meant to keep it after the backward pass. On jaxlib 0.10.2's
  XLA:CPU it changes nothing measurable: the compiled step keeps no barrier and
  still runs the statistics and contraction conditionals between the forward and
  the backward pass, and removing it left the MLP step's ratio unchanged
  (docs/benchmarks.md, "Where the ``phase="auto"`` overhead goes"). It is kept
  for backends whose scheduler honours it.
  """
  if isinstance(predicate, bool):
    return predicate
  cotangents = [getattr(layer, "cotangents", None) for layer in stats.values()]  # LayerMoments have none
  return jax.lax.optimization_barrier((predicate, cotangents))[0]


def branch(predicate: jax.Array, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any) -> Any:
  """``jax.lax.cond(predicate, true_fn, false_fn, *operands)``, the operands' arrays entering as matrices.

  Arrays a branch reads should come as ``operands``, not through its closure,
  and enter the conditional with their leading axes merged (a bitcast): XLA:CPU
  gives a conditional's ``(n, P, d)`` operand a layout of its own and writes the
  activation into it at every step, whichever branch runs; a matrix shares the
  forward pass's buffer (``tests/test_step_structure.py``).
  """
  leaves, treedef = jax.tree.flatten(operands)
  shapes = [jnp.shape(leaf) for leaf in leaves]
  matrices = [
    jnp.reshape(leaf, (math.prod(shape[:-1]), shape[-1])) if len(shape) > 2 else leaf
    for leaf, shape in zip(leaves, shapes)
  ]

  def restored(fn):
    return lambda matrices: fn(*jax.tree.unflatten(treedef, [jnp.reshape(m, s) for m, s in zip(matrices, shapes)]))

  return jax.lax.cond(predicate, restored(true_fn), restored(false_fn), matrices)


def maybe(predicate: jax.Array | bool, fn: Callable[..., Any], current: Any, *operands: Any) -> Any:
  """``fn(*operands)`` if ``predicate`` else ``current``, without running ``fn`` when false (:func:`branch`)."""
  if isinstance(predicate, bool):  # a fixed phase: no conditional in the compiled step
    return fn(*operands) if predicate else current
  return branch(predicate, fn, lambda *_: current, *operands)


def hyperparameters_ok(damping: jax.Array, decay: jax.Array) -> jax.Array:
  """Whether this step's damping (``> 0``, finite) and moving-average decay (in ``[0, 1)``) are usable.

  A step where either is not (a schedule's or an injected value) leaves the
  whole state as it was (statistics, their update counts, the factors) and
  gives a zero direction; only the step counter advances, so that a schedule
  bad at one step recovers at the next.
  """
  return hyperparams.valid(damping) & hyperparams.valid(decay, upper=1.0, include_lower=True)


def maybe_valid(
  predicate: jax.Array | bool, ok: jax.Array, fn: Callable[..., Any], current: Any, *operands: Any
) -> Any:
  """:func:`maybe`, keeping ``current`` where ``ok`` is false (a traced check of this step's hyperparameters)."""
  if isinstance(predicate, bool):  # a fixed phase: the branch is compiled in, so select its result
    return jax.tree.map(lambda new, old: jnp.where(ok, new, old), fn(*operands), current) if predicate else current
  return maybe(predicate & ok, fn, current, *operands)


def refactorised(
  predicate: jax.Array | bool,
  factorise: Callable[[], Any],
  stored: Any,
  built_with: jax.Array,
  damping: jax.Array,
  damping_ok: jax.Array,
) -> tuple[Any, jax.Array]:
  """``(factors, damping they were built with)`` after a possible re-factorisation.

  ``factorise()`` (run only when ``predicate`` holds) builds fresh factors with
  ``damping``; an invalid damping (a schedule's or an injected value,
  ``damping_ok`` false) keeps the ``stored`` factors and their ``built_with``.
  """

  def refactor():
    fresh = factorise()
    return jax.tree.map(lambda new, old: jnp.where(damping_ok, new, old), fresh, stored), damping

  factors, used = maybe(predicate, refactor, (stored, built_with))
  return factors, jnp.where(damping_ok, used, built_with)


def check_state_layer(transform: str, layers: dict, key: LayerKey, expected: Mapping[str, tuple[int, ...]]) -> None:
  """Trace-time check that the state was initialised for these parameters.

  ``expected`` maps fields of the layer's state (dotted for nested ones, e.g.
  ``"factors.a_inverse"``) to the shapes the gradients need.
  """
  name = layer_name(key)
  if name not in layers:
    raise ValueError(
      f"{transform}: the optimizer state has no entry for layer {name!r}: it was "
      "initialised with other parameters. Call tx.init(params) with this model's params."
    )
  for field, expected_shape in expected.items():
    value = layers[name]
    for part in field.split("."):
      value = getattr(value, part)
    actual = tuple(jnp.shape(value))
    if actual != tuple(expected_shape):
      raise ValueError(
        f"{transform}: layer {name!r} has a {field} of shape {actual} in the "
        f"optimizer state but the gradients need {tuple(expected_shape)}: the state was "
        "initialised for different parameters. Call tx.init(params) with this model's params."
      )
