"""Validation of hyperparameters, one spelling for every transform.

Each check raises a ``ValueError`` that names the transform, the argument,
what it got and what it accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(transform: str, name: str, value: Any, *, finite: bool = False, explain: str = "") -> None:
  """``value`` is a number ``> 0`` (and finite if ``finite``)."""
  if not is_number(value) or not value > 0 or (finite and not math.isfinite(value)):
    what = "a positive finite number" if finite else "a positive number"
    raise ValueError(f"{transform}: {name} must be {what}{explain}, got {value!r}.")


def check_integer(transform: str, name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
  """``value`` is an integer ``>= minimum`` (or ``None`` if ``optional``)."""
  if optional and value is None:
    return
  if isinstance(value, (jax.Array, np.ndarray, np.integer)) and not isinstance(value, jax.core.Tracer):
    if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer):
      value = int(value)  # e.g. optax.inject_hyperparams' init with the integer given
  if not is_integer(value) or value < minimum:
    prefix = "None or " if optional else ""
    hint = ""
    if isinstance(value, (jax.Array, np.ndarray)):
      hint = (
        f" It fixes the structure of the computation, so it cannot be a traced hyperparameter: with "
        f"optax.inject_hyperparams pass static_args=({name!r},)."
      )
    raise ValueError(f"{transform}: {name} must be {prefix}an integer >= {minimum}, got {value!r}.{hint}")


def check_choice(transform: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
    raise ValueError(f"{transform}: {name} must be {listed}, got {value!r}.")


def check_bool(transform: str, name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{transform}: {name} must be True or False, got {value!r}.")


# --------------------------------------------------------------------------- #
# Scalars or schedules (optax's ScalarOrSchedule)
# --------------------------------------------------------------------------- #

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.typing.ArrayLike]


def _concrete_scalar(value: Any) -> float | None:
  """``value`` as a Python float if it is a concrete number or 0-d array; ``None`` if traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise TypeError
  if is_number(value):
    return float(value)
  array = np.asarray(value)
  if array.ndim != 0 or not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_):
    raise TypeError
  return float(array)


def check_scalar_or_schedule(
  transform: str,
  name: str,
  value: Any,
  *,
  lower: float = 0.0,
  upper: float | None = None,
  include_lower: bool = False,
  explain: str = "",
) -> None:
  """``value`` is a schedule (a callable of the step count) or a scalar in the allowed range.

  Python numbers, NumPy scalars and 0-d (concrete) JAX arrays are checked here,
  at construction; traced values (``optax.inject_hyperparams`` inside a
  compiled step) and schedules are checked where they are used
  (:func:`valid`).
  """
  if callable(value):
    return
  if upper is None and lower == 0 and not include_lower:
    bounds = "a positive number (finite)"
  elif upper is None:
    bounds = f"a finite number {'>=' if include_lower else '>'} {lower:g}"
  else:
    bounds = f"in [{lower:g}, {upper:g})"
  try:
    number = _concrete_scalar(value)
  except TypeError:
    raise ValueError(
      f"{transform}: {name} must be {bounds}{explain}, a NumPy/JAX scalar or an optax schedule "
      f"(a callable of the step count), got {value!r}."
    ) from None
  if number is None:
    return
  above = number >= lower if include_lower else number > lower
  below = math.isfinite(number) if upper is None else number < upper
  if not (above and below):
    raise ValueError(f"{transform}: {name} must be {bounds}{explain}, got {value!r}.")


def value_at(value: ScalarOrSchedule, count: jax.Array, dtype=float) -> jax.Array:
  """The hyperparameter at step ``count``: ``value(count)`` for a schedule, else ``value``."""
  return jnp.asarray(value(count) if callable(value) else value, dtype)


def valid(
  value: jax.Array, *, lower: float = 0.0, upper: float | None = None, include_lower: bool = False
) -> jax.Array:
  """Traced check of a hyperparameter's value (a schedule's output or an injected one)."""
  above = value >= lower if include_lower else value > lower
  below = jnp.isfinite(value) if upper is None else value < upper
  return above & below


def is_constant(value: Any) -> bool:
  """Whether ``value`` is a concrete number (not a schedule, not traced)."""
  if callable(value):
    return False
  try:
    return _concrete_scalar(value) is not None
  except TypeError:
    return False


def check_positive_scalar(transform: str, name: str, value: Any, *, explain: str = "") -> None:
  """``value`` is a positive finite number or concrete 0-d array; traced values are checked where used.

  For arguments of functions (not transforms) that may be differentiated or
  traced, such as a prior precision under ``jax.grad``; schedules are not
  accepted.
  """
  if isinstance(value, jax.core.Tracer):
    return
  try:
    number = None if callable(value) else _concrete_scalar(value)
  except TypeError:
    number = None
  if number is None or not (math.isfinite(number) and number > 0):
    raise ValueError(f"{transform}: {name} must be a positive finite number{explain}, got {value!r}.")


def check_pair(transform: str, name: str, value: Any) -> tuple[float, float]:
  """``value`` is ``(lowest, highest)`` with ``0 < lowest < highest`` finite numbers."""
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise ValueError(f"{transform}: {name} must be a pair (lowest, highest), got {value!r}.")
  lo, hi = value
  check_positive_scalar(transform, f"{name}[0]", lo)
  check_positive_scalar(transform, f"{name}[1]", hi)
  if not float(lo) < float(hi):
    raise ValueError(f"{transform}: {name} must be (lowest, highest) with lowest < highest, got {value!r}.")
  return float(lo), float(hi)
