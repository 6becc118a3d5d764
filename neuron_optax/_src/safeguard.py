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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
