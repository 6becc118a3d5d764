r"""A safeguard against divergence: the KL (update-norm) constraint of Ba, Grosse & Martens (2017).

A small damping makes a preconditioned direction ``d`` long where the curvature is small; with a learning rate
set for SGD the step ``η d`` can leave the region where the quadratic model holds, and momentum keeps pushing
after the loss has blown up. The constraint bounds the step's predicted KL divergence
``½ η² dᵀ F d ≈ ½ η² ⟨d, g⟩`` (for ``d = F⁻¹ g``) by rescaling the whole direction:

.. math::

   d \leftarrow \nu\, d, \qquad
   \nu = \min\Bigl(1, \sqrt{\frac{\kappa}{\eta^2\, |\sum_l \langle d_l, g_l \rangle|}}\Bigr),

where ``g`` is the update the preconditioner received, ``η`` the learning rate of the optimizer chained after
it and ``κ`` = ``max_kl``. It is what kfac-jax calls ``norm_constraint``. Where training is stable ``ν = 1``
and the step is unchanged.

Without the constraint, FOOF and KFAC warn (:class:`DivergenceWarning`, once per transform) at the first step
whose direction is more than :data:`DIVERGENCE_RATIO` times longer than its gradient in some layer
(:func:`warn_if_diverging`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neuron_optax._src import hyperparams
from neuron_optax._src.hyperparams import ScalarOrSchedule


class NormConstraintState(NamedTuple):
  count: jax.Array  # steps taken, for schedules
  scale: jax.Array  # ν of the last step (1 where the constraint was inactive), for monitoring
  inner_state: Any


def norm_constrained(
  preconditioner: optax.GradientTransformation,
  max_kl: ScalarOrSchedule = 3e-4,
  *,
  learning_rate: ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps a preconditioner so that every step's predicted KL divergence is at most ``max_kl``.

  .. math::

     \nu = \min\Bigl(1, \sqrt{\kappa / (\eta^2 |\textstyle\sum_l \langle d_l, g_l\rangle|)}\Bigr),
     \qquad \text{output} = \nu\, d,

  with ``d`` the preconditioner's output for the incoming updates ``g`` (summed over every leaf, captured or
  not), ``η`` = ``learning_rate`` (the one of the optimizer chained after it) and ``κ`` = ``max_kl``. A
  direction whose inner product with ``g`` is not finite gives a zero update (the preconditioner's own state
  rules keep its state). ``state.scale`` holds the last ``ν``.

  Use it where a small damping is wanted (``kfac(1e-3)`` or ``foof(1e-3)`` with ``sgd(0.1, momentum=0.9)``
  diverges within a few steps without it); with a damping that already follows ``lr ≤ λ/10`` the constraint is
  rarely active and costs one inner product per step.

  Args:
    preconditioner: e.g. ``nox.kfac(1e-3)`` or ``nox.foof(1e-3)``.
    max_kl: ``κ``, the largest predicted KL divergence of one step (kfac-jax's ``norm_constraint``).
    learning_rate: ``η`` of the optimizer chained after this transform (a scalar or an optax schedule).

  Examples:
    >>> import optax, neuron_optax as nox
    >>> tx = optax.chain(
    ...     nox.norm_constrained(nox.kfac(damping=1e-3), max_kl=3e-4, learning_rate=0.1),
    ...     optax.sgd(0.1, momentum=0.9),
    ... )

  References:
    Ba, Grosse & Martens, `Distributed second-order optimization using Kronecker-factored approximations
    <https://openreview.net/forum?id=SkkTMpjex>`_, ICLR 2017 (Sec. 5, the KL-based step-size clipping).
  """
  hyperparams.check_scalar_or_schedule("norm_constrained", "max_kl", max_kl)
  hyperparams.check_scalar_or_schedule("norm_constrained", "learning_rate", learning_rate)
  preconditioner = optax.with_extra_args_support(preconditioner)

  def init_fn(params) -> NormConstraintState:
    return NormConstraintState(jnp.zeros([], jnp.int32), jnp.ones([]), preconditioner.init(params))

  def update_fn(updates, state: NormConstraintState, params=None, **extra_args):
    with _guarded():  # the constraint bounds the step: the preconditioner's divergence warning would be noise
      directions, inner_state = preconditioner.update(updates, state.inner_state, params, **extra_args)
    inner_product = sum(jnp.vdot(d, g) for d, g in zip(jax.tree.leaves(directions), jax.tree.leaves(updates)))
    predicted = hyperparams.value_at(learning_rate, state.count) ** 2 * jnp.abs(inner_product)
    kappa = hyperparams.value_at(max_kl, state.count)
    usable = jnp.isfinite(predicted) & hyperparams.valid(kappa)
    scale = jnp.where(predicted > kappa, jnp.sqrt(kappa / jnp.where(predicted > 0, predicted, 1.0)), 1.0)
    scale = jnp.where(usable, scale, 0.0)
    directions = jax.tree.map(lambda d: jnp.where(usable, d * scale.astype(d.dtype), jnp.zeros_like(d)), directions)
    return directions, NormConstraintState(optax.safe_int32_increment(state.count), scale, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DivergenceWarning(UserWarning):
  """A preconditioned direction orders of magnitude longer than its gradient (see :func:`warn_if_diverging`)."""


# ‖d‖ / ‖∇W‖ above which a layer's direction is reported. FOOF's and KFAC's directions are at most 1/λ times
# longer than their gradient (every divisor is at least λ), so a damping of at least 1/DIVERGENCE_RATIO never
# warns; the diverging settings of issue 27 (damping 1e-3 before sgd(0.1, momentum=0.9) on the MNIST CNN) reach
# 240-1000 within their first two steps, the recipes of the docs (damping >= 0.1) at most 10.
DIVERGENCE_RATIO = 100.0
# Rounding can put a ratio that is exactly 1/λ a few ulps above it: a damping of exactly 1/DIVERGENCE_RATIO
# must stay silent.
_ROUNDING_MARGIN = 1.001

_GUARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("neuron_optax_guarded", default=False)


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
  """While tracing a preconditioner inside :func:`norm_constrained`: its long directions are rescaled, no warning."""
  token = _GUARDED.set(True)
  try:
    yield
  finally:
    _GUARDED.reset(token)


class DivergenceMonitor:
  """The once-per-transform memory of the divergence warning: one per ``foof(...)``/``kfac(...)`` call."""

  def __init__(self, transform: str):
    self.transform = transform
    self.warned = False


def cannot_diverge(damping: ScalarOrSchedule) -> bool:
  """Whether a fixed ``damping`` bounds every FOOF/KFAC direction below the warning's threshold (``λ ≥ 1/100``)."""
  return isinstance(damping, numbers.Real) and not isinstance(damping, bool) and float(damping) >= 1 / DIVERGENCE_RATIO


def warn_if_diverging(
  monitor: DivergenceMonitor,
  layers: Sequence[str],
  direction_norms: Sequence[jax.Array],
  gradient_norms: Sequence[jax.Array],
  damping: jax.Array,
  count: jax.Array,
) -> None:
  r"""Warns once per transform when a layer's direction is more than :data:`DIVERGENCE_RATIO` times its gradient.

  .. math::

     \max_l \frac{\lVert d_l \rVert}{\lVert \nabla W_l \rVert} > 100 .

  The direction of FOOF or KFAC is at most ``1/λ`` times longer than its gradient, so the criterion can only
  hold for a damping below 1e-2, and it does where the gradient lies along the small eigenvalues of the
  factors: there a step ``lr·d`` is ``lr/λ`` times SGD's, and with ``optax.sgd(0.1, momentum=0.9)`` after it
  the loss blows up within a few steps. It costs one sum of squares per layer of the direction and of the
  gradient and one ``lax.cond`` on their worst ratio; the host callback runs only when it fires, and once this
  transform has warned, later traces compile no check. A preconditioner wrapped in :func:`norm_constrained`
  is not checked (its step is bounded), nor is a step of a fixed ``phase="plain"`` or ``"statistics"``
  (those compile no conditional; their ``"inversion"`` steps are checked).

  Args:
    monitor: the transform's :class:`DivergenceMonitor`.
    layers: the layer names, in the order of the norms.
    direction_norms: ``‖d_l‖²`` of each layer's direction.
    gradient_norms: ``‖∇W_l‖²`` of each layer's incoming gradient.
    damping: the step's ``λ``, for the message.
    count: the step's counter, for the message.
  """
  if monitor.warned or _GUARDED.get() or not layers:
    return
  directions = jnp.stack([jnp.asarray(x, jnp.float32) for x in direction_norms])
  gradients = jnp.stack([jnp.asarray(x, jnp.float32) for x in gradient_norms])
  # Squared ratios; a zero gradient, a non-finite direction (a step that is not taken) or 0/0 never fires.
  ratios = jnp.where(gradients > 0, directions / jnp.where(gradients > 0, gradients, 1.0), 0.0)
  worst = jnp.argmax(jnp.where(jnp.isfinite(ratios), ratios, 0.0))
  fires = ratios[worst] > (DIVERGENCE_RATIO * _ROUNDING_MARGIN) ** 2
  callback = functools.partial(_warn, monitor, tuple(layers))
  jax.lax.cond(
    fires,
    lambda: jax.debug.callback(callback, worst, jnp.sqrt(ratios[worst]), jnp.asarray(damping, jnp.float32), count),
    lambda: None,
  )


def _warn(monitor: DivergenceMonitor, layers: tuple[str, ...], worst, ratio, damping, count) -> None:
  if monitor.warned:
    return
  monitor.warned = True
  warnings.warn(
    f"{monitor.transform}: layer {layers[int(worst)]!r}: at step {int(count)} the direction is "
    f"{float(ratio):.3g} times longer than its gradient (‖d‖/‖∇W‖; at most 1/damping, damping "
    f"{float(np.asarray(damping)):.3g}). With optax.sgd after it keep lr <= damping/10 (so lr·‖d‖ <= ‖∇W‖/10), "
    f"raise the damping, or wrap the preconditioner in nox.norm_constrained(..., learning_rate=lr); a small "
    "damping at an ordinary learning rate diverges within a few steps. After an optimizer that normalises its "
    "input (optax.adam) a long direction is harmless: silence this with "
    "warnings.filterwarnings('ignore', category=nox.DivergenceWarning). Warned once per transform.",
    DivergenceWarning,
    stacklevel=1,  # raised in a host callback: no user frame to point at
  )
