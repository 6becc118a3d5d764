"""Predictives of a Laplace posterior: the linearised model (GLM predictive) and its link approximations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def linearized_predictive(apply_fn: Callable[[Any], Any], params, samples):
  """Outputs of the linearised model (GLM predictive; Immer et al. 2021) for posterior samples.

  ``f_lin(θ_s) = f(θ*) + J_f(θ*) (θ_s − θ*)`` for every sample ``θ_s``: one
  ``jax.linearize`` of ``apply_fn`` at ``params`` and a ``vmap`` of its JVP over
  the deltas. For classification, average ``softmax`` of the returned logits
  over the sample axis for the predictive distribution.

  Args:
    apply_fn: ``params -> outputs`` (close over the inputs), e.g.
      ``lambda p: model.apply({"params": p}, x)``.
    params: ``θ*``, the linearisation point.
    samples: a tree like ``params`` with a leading sample axis (from
      :func:`laplace_sample`).

  Returns:
    ``apply_fn``'s outputs with a leading sample axis.
  """
  outputs, jvp = jax.linearize(apply_fn, params)
  deltas = jax.tree_util.tree_map(lambda s, p: s - p, samples, params)
  changes = jax.vmap(jvp)(deltas)
  return jax.tree_util.tree_map(lambda o, c: o[None] + c, outputs, changes)
