"""One skeleton for the amortised preconditioners (FOOF, KFAC).

Both keep debiased moving averages of per-layer factors, re-factorise them on
the schedule of :mod:`neuron_optax._src.amortisation` (or when the damping changes)
and apply the stored factorisation to every layer's gradient. A method is its
factor definitions and its apply (:class:`Preconditioner`); :func:`update` runs
the rest: the prologue (stats and state checks, the step's hyperparameters),
the statistics/re-factorisation schedule, the stored-vs-new damping rule, one
contraction decision per step (:func:`neuron_optax._src.contraction.one_decision`)
and the state rebuild. A step whose damping or decay is invalid leaves the
state as it was and gives a zero direction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from neuron_optax._src import amortisation, factorisation, hyperparams, linalg, param_layout, precision, safeguard
from neuron_optax._src.contraction import Contraction, Order, incoming_matrices, one_decision, validate_contraction
from neuron_optax._src.layer_stats import LayerKey, LayerStats, Stats, layer_name

# A factor's damped inverse and the eigenvalue floor its factorisation needed (precision warnings).
inverse_and_floor = functools.partial(linalg.damped_inverse, return_floor=True)


def diagonal_inverse_and_floor(diagonal: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A diagonal factor (an embedding's ``A``) inverted elementwise: every divisor is at least ``λ``, no floor."""
  return linalg.damped_inverse_diagonal(diagonal, damping), jnp.zeros([], diagonal.dtype)


class MovingAverage(NamedTuple):
  """A debiased moving average that skips non-finite batches.

  After ``k`` finite batches ``X_j`` with decays ``β_j`` the average is
  ``value / weight`` with ``value = Σ_j (1 − β_j) Π_{i>j} β_i X_j`` and
  ``weight`` the same sum of the weights alone (``1 − β^k`` for a constant ``β``).
  """

  value: jax.Array  # the biased average
  weight: jax.Array  # its debiasing weight
  updates: jax.Array  # number of finite batches in it

  @classmethod
  def zeros(cls, shape: tuple[int, ...], dtype) -> MovingAverage:
    return cls(jnp.zeros(shape, dtype), jnp.zeros([], dtype), jnp.zeros([], jnp.int32))

  def update(self, batch_value: jax.Array, decay: jax.Array) -> MovingAverage:
    """One step with decay ``β``; a non-finite ``batch_value`` leaves the average as it was."""
    value, updates, weight = amortisation.ema_update(self.value, self.updates, self.weight, batch_value, decay)
    return MovingAverage(value, weight, updates)

  def debiased(self) -> jax.Array:
    """``value / weight``; zero while no finite batch has been seen."""
    return amortisation.debiased(self.value, self.weight)


class Preconditioner(NamedTuple):
  """What distinguishes one amortised method; :func:`update` does the rest.

  Attributes:
    name: the transform's name, for errors and warnings.
    check_layer: ``check_layer(layers, key, shape)``, the trace-time check that
      the state holds this layer with the shapes the gradient needs.
    averages: the layer state's moving averages by factor (``{"a": …}``).
    batch_values: ``batch_values(stats, dtype)``, this batch's factor values by factor.
    factors: the layer state's stored factorisation.
    factorise: ``factorise({name: {factor: debiased average}}, damping)``, the
      factorisations of all layers (batched by shape) with this damping.
    rebuild: ``rebuild(layer, averages, factors)``, the new layer state.
    order: ``order(stats)``, the layer's contraction order when the incoming
      gradient is the recorded one (:mod:`neuron_optax._src.contraction`).
    apply: ``apply(factors, gradient, stats, damping, order)``, the direction
      (``gradient`` is ``None`` for a rows order).
    damping_refactorises: whether the factors depend on the damping (a changed
      damping then re-factorises at once with ``phase="auto"``).
    batch_values_at: ``batch_values_at(stats, dtype, count)``, used instead of
      ``batch_values`` where the batch values depend on the step (a random
      subsample of rows drawn afresh each step).
  """

  name: str
  check_layer: Callable[[Mapping[str, Any], LayerKey, param_layout.LayerShape], None]
  averages: Callable[[Any], dict[str, MovingAverage]]
  batch_values: Callable[[LayerStats, Any], dict[str, jax.Array]]
  factors: Callable[[Any], Any]
  factorise: Callable[[dict[str, dict[str, jax.Array]], jax.Array], dict[str, Any]]
  rebuild: Callable[[Any, dict[str, MovingAverage], Any], Any]
  order: Callable[[LayerStats], Order]
  apply: Callable[[Any, jax.Array | None, LayerStats, jax.Array, Order], jax.Array]
  damping_refactorises: bool = True
  batch_values_at: Callable[[LayerStats, Any, jax.Array], dict[str, jax.Array]] | None = None


class Settings(NamedTuple):
  """The transform's arguments that :func:`update` needs."""

  damping: hyperparams.ScalarOrSchedule
  ema_decay: hyperparams.ScalarOrSchedule
  inverse_every: int
  stats_window: int | None
  phase: amortisation.Phase
  contraction: Contraction
  kernel_input_ndim: param_layout.KernelInputNdim


def settings(
  transform: str,
  damping: hyperparams.ScalarOrSchedule,
  ema_decay: hyperparams.ScalarOrSchedule,
  inverse_every: int | None,
  stats_window: int | None,
  phase: amortisation.Phase,
  contraction: Contraction,
  kernel_input_ndim: param_layout.KernelInputNdim,
) -> Settings:
  """The validated :class:`Settings` (defaults resolved); a clear ``ValueError`` naming ``transform`` otherwise."""
  hyperparams.check_scalar_or_schedule(transform, "damping", damping)
  inverse_every, stats_window = amortisation.resolve_amortisation(inverse_every, stats_window)
  amortisation.validate_amortisation(transform, ema_decay, inverse_every, stats_window)
  validate_contraction(transform, contraction)
  amortisation.validate_phase(transform, phase)
  return Settings(damping, ema_decay, inverse_every, stats_window, phase, contraction, kernel_input_ndim)


def init_layers(params, settings: Settings, make_layer: Callable[..., Any]) -> tuple[dict[str, Any], jax.Array]:
  """``({name: make_layer(shape, dtype, initial damping)}, initial damping)`` for every candidate layer."""
  initial_damping = hyperparams.value_at(settings.damping, jnp.zeros([], jnp.int32))
  layers = {}
  for key, shape in param_layout.candidate_layers(params, settings.kernel_input_ndim).items():
    dtype = param_layout.statistics_dtype(param_layout.kernel_dtype(params, key))
    layers[layer_name(key)] = make_layer(shape, dtype, initial_damping)
  return layers, initial_damping


def factorise_all(
  method: str,
  operands: Mapping[Any, tuple[jax.Array, ...]],
  damping: jax.Array,
  distribute: factorisation.Distribution | None,
) -> dict[Any, jax.Array]:
  """Damped inverses of many factors (batched by shape), warning where a factor needed a floor.

  ``operands`` maps a name (a layer name, or ``(layer, side)``) to ``(factor,
  damping of that factor)``; the warning names them with ``damping``.
  """
  solved = factorisation.factorise_by_shape(inverse_and_floor, operands, distribute, diagonal_inverse_and_floor)
  precision.warn_if_floored(method, {_label(name): (floor, operands[name][1]) for name, (_, floor) in solved.items()})
  return {name: inverse for name, (inverse, _) in solved.items()}


def _label(name) -> str:
  if isinstance(name, tuple):  # (layer, side)
    return f"{name[0]} ({name[1].upper()} factor)"
  return name


def update(
  method: Preconditioner,
  settings: Settings,
  updates,
  state,
  stats: Stats | None,
  monitor: safeguard.DivergenceMonitor | None = None,
):
  """One step of an amortised preconditioner: ``(directions, new layers, damping the factors were built with)``.

  ``state`` has ``count``, ``layers`` and ``damping`` (the damping the stored
  factors were built with); the caller wraps the new layers and damping with
  the incremented count into its state class. ``monitor``: warn where a
  direction is orders of magnitude longer than its gradient
  (:func:`neuron_optax.safeguard.warn_if_diverging`).
  """
  shapes = param_layout.candidate_layers(updates, settings.kernel_input_ndim)
  stats = param_layout.check_stats(stats, shapes, method.name, tied_tables=False)
  names = {key: layer_name(key) for key in stats}
  for key in stats:
    method.check_layer(state.layers, key, shapes[key])
  layers = {name: state.layers[name] for name in names.values()}
  damping = hyperparams.value_at(settings.damping, state.count, state.damping.dtype)
  decay = hyperparams.value_at(settings.ema_decay, state.count, state.damping.dtype)
  usable = amortisation.hyperparameters_ok(damping, decay)  # else: no step, the state kept
  update_statistics, refactorise = amortisation.schedule(
    state.count,
    settings.inverse_every,
    settings.stats_window,
    settings.phase,
    stats,
    damping_changed=(damping != state.damping) if method.damping_refactorises else False,
  )

  def accumulate(stats):
    new = {}
    for key, name in names.items():
      current = method.averages(layers[name])
      dtype = next(iter(current.values())).value.dtype
      if method.batch_values_at is None:
        values = method.batch_values(stats[key], dtype)
      else:
        values = method.batch_values_at(stats[key], dtype, state.count)
      new[name] = {factor: average.update(values[factor], decay) for factor, average in current.items()}
    return new

  current = {name: method.averages(layer) for name, layer in layers.items()}
  averages = amortisation.maybe_valid(update_statistics, usable, accumulate, current, stats)

  def refactor():
    debiased = {name: {factor: a.debiased() for factor, a in by_factor.items()} for name, by_factor in averages.items()}
    return method.factorise(debiased, damping)

  stored = {name: method.factors(layer) for name, layer in layers.items()}
  factors, built_with = amortisation.refactorised(refactorise, refactor, stored, state.damping, damping, usable)

  orders = {key: method.order(stats[key]) for key in stats}
  rows = [key for key in stats if orders[key] != "gradient"]
  dtypes = {key: jax.tree.leaves(factors[names[key]])[0].dtype for key in rows}

  def from_rows(stats):
    return {key: method.apply(factors[names[key]], None, stats[key], damping, orders[key]) for key in rows}

  def exact(stats):
    return {key: method.apply(factors[names[key]], gradients[key], stats[key], damping, "gradient") for key in rows}

  gradients = incoming_matrices(updates, shapes, dtypes)
  chosen = one_decision(gradients, stats, state.count, settings.contraction, from_rows, exact)

  lengths = {}  # key: (‖d‖², ‖∇W‖²), for the divergence warning

  def direction(key, grad):
    if key in chosen:
      preconditioned = chosen[key]
    else:
      preconditioned = method.apply(factors[names[key]], grad, stats[key], damping, "gradient")
    lengths[key] = (_squared_norm(preconditioned), _squared_norm(grad))
    return jnp.where(usable, preconditioned, jnp.nan)  # zeroed like a non-finite batch

  directions = param_layout.map_layers(updates, shapes, stats.keys(), direction)
  # A fixed "plain" or "statistics" step compiles no conditional (on a GPU each makes the host wait for its
  # predicate): the check runs in "auto" and "inversion" steps only.
  if monitor is not None and settings.phase in ("auto", "inversion"):
    keys = list(lengths)
    safeguard.warn_if_diverging(
      monitor,
      [names[key] for key in keys],
      [jnp.where(usable, lengths[key][0], jnp.nan) for key in keys],
      [lengths[key][1] for key in keys],
      damping,
      state.count,
    )
  new_layers = dict(state.layers)
  for name, layer in layers.items():
    new_layers[name] = method.rebuild(layer, averages[name], factors[name])
  return directions, new_layers, built_with


def _squared_norm(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.vdot(x, x).real


def transformation(
  method: Preconditioner, settings: Settings, make_layer: Callable[..., Any], state_class: type
) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of ``method``: a ``state_class(count, layers, damping)`` state.

  ``make_layer(shape, dtype, initial damping)`` builds a layer's initial state
  (zero averages, the factors of ``A = G = 0``).
  """

  # A fixed damping of at least 1/DIVERGENCE_RATIO bounds every direction below the warning's threshold:
  # no check is compiled (no conditional in the default step).
  monitor = None if safeguard.cannot_diverge(settings.damping) else safeguard.DivergenceMonitor(method.name)

  def init_fn(params):
    layers, initial_damping = init_layers(params, settings, make_layer)
    return state_class(count=jnp.zeros([], jnp.int32), layers=layers, damping=initial_damping)

  def update_fn(updates, state, params=None, *, stats: Stats | None = None, **extra_args):
    del params, extra_args
    directions, layers, built_with = update(method, settings, updates, state, stats, monitor)
    return directions, state_class(count=optax.safe_int32_increment(state.count), layers=layers, damping=built_with)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
