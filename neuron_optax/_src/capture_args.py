"""Argument checks of ``value_grad_and_stats`` (both front-ends): ``fisher=``, ``likelihood=``, ``rng=``
and what ``loss_fn`` returned."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

FisherType = Literal["empirical", "mc", "full"]
Likelihood = Literal["categorical", "gaussian"]

FISHER_TYPES = ("empirical", "mc", "full")
LIKELIHOODS = ("categorical", "gaussian")


def validate_capture_args(fisher: str, likelihood: str | None) -> None:
  """Checks ``value_grad_and_stats``'s ``fisher=`` and ``likelihood=``."""
  if fisher not in FISHER_TYPES:
    raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
  if fisher != "empirical" and likelihood not in LIKELIHOODS:
    raise ValueError(
      f"fisher={fisher!r} needs the model's likelihood to sample or enumerate labels: pass "
      f"likelihood='categorical' (the model returns logits) or likelihood='gaussian' "
      f"(squared-error regression); got likelihood={likelihood!r}."
    )
  if fisher == "empirical" and likelihood is not None and likelihood not in LIKELIHOODS:
    raise ValueError(f"likelihood must be one of {LIKELIHOODS} or None, got {likelihood!r}.")


def validate_rng(fisher: str, rng: jax.Array | None) -> None:
  """Checks the ``rng=`` a call of the returned function got against ``fisher``."""
  if fisher == "mc" and rng is None:
    raise ValueError("fisher='mc' samples labels: call the returned function with rng=<PRNG key>.")
  if fisher != "mc" and rng is not None:
    raise ValueError(f"rng= is only used with fisher='mc' (got fisher={fisher!r}).")


def split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
  """``(loss, aux)`` of what ``loss_fn`` returned, checked against ``has_aux``."""
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      got = f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else _describe(out)
      raise ValueError(
        f"has_aux=True: loss_fn must return a pair (loss, aux), got {got}. Return (loss, aux), or "
        "call value_grad_and_stats without has_aux=True if loss_fn returns the loss alone."
      )
    loss, aux = out
  elif isinstance(out, (tuple, list)):
    raise ValueError(
      f"loss_fn returned a {type(out).__name__} of length {len(out)}, not a scalar loss; if it returns "
      "(loss, aux), pass has_aux=True to value_grad_and_stats."
    )
  else:
    loss, aux = out, None
  if jnp.ndim(loss) != 0:
    raise ValueError(
      f"loss_fn must return a scalar loss (the mean over the batch), got {_describe(loss)}. Reduce "
      "per-example losses with .mean()."
    )
  return loss, aux


def _describe(value: Any) -> str:
  shape = getattr(value, "shape", None)
  return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"
