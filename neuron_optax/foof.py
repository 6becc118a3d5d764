"""FOOF: first-order optimisation on neurons ("gradient descent on neurons").

For every captured layer with gradient matrix ``∇W`` (kernel rows, then the bias
row) and inputs ``ā_r = [a_r, 1]``::

    A_batch = mean_r ā_r ā_rᵀ
    A       = debiased EMA of A_batch (decay β)
    D       = (A + λI)⁻¹ ∇W

``D`` is the weight change that moves each layer's outputs (its neurons) along
their gradient ``∂L/∂z`` in the least-squares sense, with the proximity term
``λ``. Other leaves pass through unchanged. Chain with a first-order optimiser
for step size and momentum::

    tx = optax.chain(nox.foof(damping=1.0), optax.sgd(0.1, momentum=0.9))

Reference: F. Benzing, "Gradient Descent on Neurons and its Link to
Approximate Second-Order Optimization", ICML 2022, eqs. 5-6 and Algorithm 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from neuron_optax import amortisation, factorisation, hyperparams, linalg, param_layout
from neuron_optax.contraction import Contraction, left_precondition, validate_contraction
from neuron_optax.layer_stats import Stats, layer_name


class FoofLayerState(NamedTuple):
  a_ema: jax.Array  # biased EMA of A (debias with a_updates)
  a_updates: jax.Array  # number of finite batches in the EMA
  a_inverse: jax.Array  # (A + λI)⁻¹ from the last re-factorisation


class FoofState(NamedTuple):
  count: jax.Array  # steps taken
  layers: dict[str, FoofLayerState]


def foof(
  damping: float,
  *,
  ema_decay: float = 0.95,
  inverse_every: int = 1,
  stats_window: int | None = None,
  contraction: Contraction = "auto",
  kernel_input_ndim: param_layout.KernelInputNdim = None,
  distribute_factorisations: factorisation.Distribution | None = None,
  phase: amortisation.Phase = "auto",
) -> optax.GradientTransformationExtraArgs:
  """FOOF preconditioner ``D = (A + λI)⁻¹ ∇W`` per captured layer (Benzing 2022).

  Args:
    damping: ``λ > 0`` added to the input second moment before inversion.
    ema_decay: decay ``β`` of the debiased moving average of ``A``.
    inverse_every: ``T``: re-factorise ``A + λI`` (Cholesky) at steps
      ``0, T, 2T, …``; in between the last inverse is reused.
    stats_window: ``S``: update the moving average only in the ``S`` steps
      that end with a re-factorisation (paper: ``T=100, S=50``); ``None``
      updates it every step.
    contraction: ``"auto"`` picks per layer the cheaper of ``(A⁻¹Āᵀ)Cot``
      (recomputes ``∇W`` from the recorded rows) and ``A⁻¹∇W`` (uses the
      incoming gradient); ``"gradient"`` / ``"rows"`` force one. With rows,
      changes that earlier transforms in a chain made to the gradient of a
      captured layer are not seen: put gradient clipping after ``foof``.
    kernel_input_ndim: per-layer number of kernel input axes where it is not
      "all but the last" (multi-axis ``nn.DenseGeneral`` outputs), keyed by
      layer path such as ``"attention/query"``.
    distribute_factorisations: ``(mesh, axis name)``, e.g. ``(mesh, "data")``
      for the mesh the batch is sharded over: at re-factorisation steps each
      device of that axis factorises a share of the layers (of each size) and
      the inverses are all-gathered, as kfac-jax distributes its inverses.
      ``None`` (default): every device factorises every layer. Layers of equal
      ``d_in`` always share one batched Cholesky call.
    phase: ``"auto"`` (default) picks the step's kind from the step counter
      inside the compiled step (``jax.lax.cond``). ``"plain"``,
      ``"statistics"`` or ``"inversion"`` fix it: compile one step per phase
      and pick it on the host with
      ``nox.amortisation_phase(step, inverse_every, stats_window)``; the
      states are interchangeable and the trajectory is the same. On a GPU each
      conditional makes the host wait for its predicate, so a fixed-phase
      plain step keeps the device queue full.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, stats=stats)`` with ``stats`` from
    :func:`neuron_optax.value_grad_and_stats`.
  """
  hyperparams.check_positive("foof", "damping", damping)
  amortisation.validate_amortisation("foof", ema_decay, inverse_every, stats_window)
  validate_contraction("foof", contraction)
  factorisation.validate_distribution("foof", distribute_factorisations)
  amortisation.validate_phase("foof", phase)

  def init_fn(params) -> FoofState:
    layers = {}
    for key, shape in param_layout.candidate_layers(params, kernel_input_ndim).items():
      dtype = param_layout.statistics_dtype(param_layout.kernel_dtype(params, key))
      layers[layer_name(key)] = FoofLayerState(
        a_ema=jnp.zeros((shape.d_in, shape.d_in), dtype),
        a_updates=jnp.zeros([], jnp.int32),
        a_inverse=jnp.eye(shape.d_in, dtype=dtype) / damping,
      )
    return FoofState(count=jnp.zeros([], jnp.int32), layers=layers)

  def update_fn(updates, state: FoofState, params=None, *, stats: Stats | None = None, **extra_args):
    del params, extra_args
    shapes = param_layout.candidate_layers(updates, kernel_input_ndim)
    stats = param_layout.check_stats(stats, shapes, "foof")
    names = {key: layer_name(key) for key in stats}
    for key in stats:
      amortisation.check_state_layer("foof", state.layers, key, (shapes[key].d_in,) * 2, "a_ema")
    update_statistics, refactorise = amortisation.schedule(state.count, inverse_every, stats_window, phase, stats)

    def accumulate():
      new = {}
      for key, name in names.items():
        layer = state.layers[name]
        a_batch = linalg.second_moment(stats[key].augmented_inputs(layer.a_ema.dtype))
        new[name] = amortisation.ema_update(layer.a_ema, layer.a_updates, a_batch, ema_decay)
      return new

    current = {name: (state.layers[name].a_ema, state.layers[name].a_updates) for name in names.values()}
    averages = amortisation.maybe(update_statistics, accumulate, current)

    def refactor():
      operands = {
        name: (amortisation.debiased(ema, k, ema_decay), jnp.asarray(damping, ema.dtype))
        for name, (ema, k) in averages.items()
      }
      return factorisation.factorise_by_shape(linalg.damped_inverse, operands, distribute_factorisations)

    inverses = amortisation.maybe(
      refactorise, refactor, {name: state.layers[name].a_inverse for name in names.values()}
    )

    directions = param_layout.map_layers(
      updates,
      shapes,
      stats.keys(),
      lambda key, grad: left_precondition(inverses[names[key]], grad, stats[key], contraction),
    )
    layers = dict(state.layers)
    for name in names.values():
      layers[name] = FoofLayerState(averages[name][0], averages[name][1], inverses[name])
    return directions, FoofState(count=optax.safe_int32_increment(state.count), layers=layers)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
