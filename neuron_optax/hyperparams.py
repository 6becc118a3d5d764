"""Validation of hyperparameters, one spelling for every transform.

Each check raises a ``ValueError`` that names the transform, the argument,
what it got and what it accepts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


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
  if not is_integer(value) or value < minimum:
    prefix = "None or " if optional else ""
    raise ValueError(f"{transform}: {name} must be {prefix}an integer >= {minimum}, got {value!r}.")


def check_decay(transform: str, name: str, value: Any) -> None:
  """``value`` is a number in ``[0, 1)``."""
  if not is_number(value) or not 0 <= value < 1:
    raise ValueError(f"{transform}: {name} must be in [0, 1), got {value!r}.")


def check_choice(transform: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
    raise ValueError(f"{transform}: {name} must be {listed}, got {value!r}.")


def check_bool(transform: str, name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{transform}: {name} must be True or False, got {value!r}.")
