"""Gradient accumulation whose curvature statistics cover every micro-batch.

``optax.MultiSteps(tx, k)`` averages the gradients of ``k`` micro-batches and
hands ``tx`` the statistics of the last one only. :func:`accumulate_micro_batches`
also averages each layer's second moments ``A = mean_r ā_r ā_rᵀ`` and
``G = Σ_s mean_r g_sr g_srᵀ`` (:class:`~neuron_optax._src.layer_stats.LayerMoments`,
``d_in² + d_out²`` numbers per layer, not the rows), so that ``k``
micro-batches of ``b`` examples give FOOF and KFAC exactly the direction of one
batch of ``k·b`` examples: the mean of the micro-batch gradients is the
gradient of the mean loss, and with equal micro-batch sizes the mean of their
moments is the moment over all rows (per-example cotangents ``g = n·cot`` do not
depend on the batch size).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from neuron_optax._src import hyperparams, param_layout
from neuron_optax._src.layer_stats import LayerMoments, Stats, layer_name


class AccumulationState(NamedTuple):
  mini_step: jax.Array  # micro-batches accumulated so far in this step
  gradients: Any  # sum of the micro-batch gradients
  moments: dict[str, tuple[jax.Array, jax.Array]]  # per layer: sums of A and G
  inner_state: Any
  # every_k held in a shape: a state saved with another every_k fails at trace time when restored, rather than
  # counting to a step it never reaches.
  period: jax.Array


def accumulate_micro_batches(
  inner: optax.GradientTransformation,
  every_k: int,
  *,
  kernel_input_ndim: param_layout.KernelInputNdim = None,
) -> optax.GradientTransformationExtraArgs:
  """Accumulates ``every_k`` micro-batches, gradients **and** curvature statistics, then steps ``inner``.

  Call ``update(grads, state, params, stats=stats)`` once per micro-batch.
  The first ``every_k − 1`` calls return zero updates; the ``every_k``-th calls
  ``inner.update(mean gradient, ..., stats=mean moments)``, where each
  captured layer's ``stats`` entry is a
  :class:`~neuron_optax._src.layer_stats.LayerMoments` with
  ``A = (1/k) Σ_micro A_micro`` and ``G = (1/k) Σ_micro G_micro``. With micro-batches
  of equal size this equals the statistics of one batch of all the rows, so
  FOOF and KFAC give exactly the direction of the large batch. FNGD and the
  natural gradient need every example's rows and reject moments: use
  ``optax.MultiSteps`` with them.

  Args:
    inner: the transformation to step, e.g. ``optax.chain(nox.foof(1.0), optax.sgd(0.1))``.
    every_k: micro-batches per step.
    kernel_input_ndim: as in :func:`neuron_optax.foof` (which layers' moments are kept).
  """
  hyperparams.check_integer("accumulate_micro_batches", "every_k", every_k)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params) -> AccumulationState:
    moments = {}
    for key, shape in param_layout.candidate_layers(params, kernel_input_ndim).items():
      dtype = param_layout.statistics_dtype(param_layout.kernel_dtype(params, key))
      input_moment = jnp.zeros(param_layout.input_factor_shape(shape), dtype)  # embeddings: the diagonal
      moments[layer_name(key)] = (input_moment, jnp.zeros((shape.d_out,) * 2, dtype))
    gradients = jax.tree.map(jnp.zeros_like, params)
    return AccumulationState(
      jnp.zeros([], jnp.int32), gradients, moments, inner.init(params), jnp.zeros((every_k,), jnp.int8)
    )

  def update_fn(updates, state: AccumulationState, params=None, *, stats: Stats | None = None, **extra_args):
    if jnp.shape(state.period) != (every_k,):
      raise ValueError(
        f"accumulate_micro_batches: the state was made with every_k={jnp.shape(state.period)[0]} (e.g. restored "
        f"from a checkpoint) but this transform has every_k={every_k}: its partial sums would never step. Restore "
        "into a transform with the same every_k, or start from a fresh tx.init(params)."
      )
    shapes = param_layout.candidate_layers(updates, kernel_input_ndim)
    stats = param_layout.check_stats(stats, shapes, "accumulate_micro_batches", tied_tables=False)
    gradients = jax.tree.map(jnp.add, state.gradients, updates)
    moments = dict(state.moments)
    for key, layer_stats in stats.items():
      name = layer_name(key)
      if name not in moments:
        raise ValueError(
          f"accumulate_micro_batches: the state has no moments for layer {name!r}: it was initialised with "
          "other parameters. Call tx.init(params) with this model's params."
        )
      a_sum, g_sum = moments[name]
      moments[name] = (a_sum + layer_stats.input_moment(a_sum.dtype), g_sum + layer_stats.cotangent_moment(g_sum.dtype))
    emit = state.mini_step == every_k - 1

    def step():
      mean_gradients = jax.tree.map(lambda g: g / every_k, gradients)
      mean_stats = {
        key: LayerMoments(
          moments[layer_name(key)][0] / every_k,
          moments[layer_name(key)][1] / every_k,
          s.kind,
          s.has_bias,
          s.kernel_shape,
          s.kernel_input_ndim,
        )
        for key, s in stats.items()
      }
      new_updates, inner_state = inner.update(mean_gradients, state.inner_state, params, stats=mean_stats, **extra_args)
      zeros = jax.tree.map(jnp.zeros_like, gradients)
      cleared = {name: (jnp.zeros_like(a), jnp.zeros_like(g)) for name, (a, g) in moments.items()}
      new_updates = jax.tree.map(lambda u, like: u.astype(like.dtype), new_updates, updates)
      return new_updates, AccumulationState(jnp.zeros([], jnp.int32), zeros, cleared, inner_state, state.period)

    def wait():
      zero_updates = jax.tree.map(jnp.zeros_like, updates)
      return zero_updates, AccumulationState(state.mini_step + 1, gradients, moments, state.inner_state, state.period)

    return jax.lax.cond(emit, step, wait)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
