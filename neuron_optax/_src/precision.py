"""The warning for a damping below the float resolution of a layer's factor.

A factor stored in floating point (``A``, ``G``, the Gram matrix of the
natural gradient) is only known to its resolution ``τ = RESOLUTION·ε·‖M‖``
(:func:`neuron_optax._src.linalg.resolution`). The damped solves of
:mod:`neuron_optax._src.linalg` raise the eigenvalues of ``M + λI`` that fall below
``τ`` to ``τ``: directions within the factor's resolved range stay accurate
(within 1e-2 of a float64 computation on the same rows, tested), but
components of a gradient outside it are divided by ``τ`` instead of the
requested ``λ``. That is a deviation from the formula, so it is reported: the
factorisation returns the ``τ`` it used and :func:`warn_if_floored` emits one
:class:`PrecisionWarning` per transform and layer and process, through a host
callback (the damping and the factor are only known at run time, inside the
compiled step; the callback runs in re-factorisation steps only).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


class PrecisionWarning(UserWarning):
  """A damping below the float resolution of a layer's factor (see :mod:`neuron_optax._src.precision`)."""


# (transform, layer) pairs warned about in this process.
_WARNED: set[tuple[str, str]] = set()


def warn_if_floored(transform: str, floors: Mapping[str, tuple[jax.Array, jax.Array]]) -> None:
  """Warns once per layer whose solve raised an eigenvalue to the resolution.

  Args:
    transform: the transform's name, for the message.
    floors: ``{layer name: (τ, λ)}``: the resolution the solve raised an
      eigenvalue to (0 where it raised none, as ``linalg.damped_inverse(...,
      return_floor=True)`` returns it) and the damping it was asked for.
  """
  if not floors:
    return
  names = tuple(sorted(floors))
  taus = jnp.stack([jnp.max(jnp.asarray(floors[name][0], jnp.float32)) for name in names])
  dampings = jnp.stack([jnp.max(jnp.asarray(floors[name][1], jnp.float32)) for name in names])
  jax.debug.callback(functools.partial(_warn, transform, names), taus, dampings)


def _warn(transform: str, names: tuple[str, ...], taus, dampings) -> None:
  for name, tau, damping in zip(names, np.asarray(taus), np.asarray(dampings)):
    # An invalid damping (a schedule's or an injected value) gives no step at all; nothing to warn about.
    if tau > 0 and damping > 0 and np.isfinite(damping) and (transform, name) not in _WARNED:
      _WARNED.add((transform, name))
      warnings.warn(
        f"{transform}: layer {name!r}: the damping {damping:.3g} is below the float resolution "
        f"{tau:.3g} of its factor (eigenvalues below it are round-off in this dtype). Directions within the "
        "factor's range stay accurate; components outside it are damped by the resolution instead of the "
        "damping. Use a damping of at least the resolution, or float64 (jax_enable_x64 and float64 "
        "parameters). Warned once per layer.",
        PrecisionWarning,
        stacklevel=1,  # raised in a host callback: no user frame to point at
      )
