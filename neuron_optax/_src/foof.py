"""FOOF: first-order optimisation on neurons ("gradient descent on neurons").

For every captured layer with gradient matrix ``∇W`` (kernel rows, then the bias
row) and inputs ``ā_r = [a_r, 1]``::

    A_batch = mean_r ā_r ā_rᵀ
    A       = debiased EMA of A_batch (decay β)
    D       = (A + λI)⁻¹ ∇W

``D`` is the weight change that moves each layer's outputs (its neurons) along
their gradient ``∂L/∂z`` in the least-squares sense, with the proximity term
``λ``. An embedding's rows are one-hot, so its ``A`` is the diagonal of token
frequencies, kept as a vector: ``D`` divides each row of ``∇W`` by ``f_v + λ``.
Each copy of a stacked layer (``nn.scan``) is a layer of its own. A table tied
to an output layer (``Embed.attend``) passes through, with a warning. Other
leaves pass through unchanged. Chain with a first-order optimiser for step
size and momentum::

    tx = optax.chain(nox.foof(damping=1.0), optax.sgd(0.1, momentum=0.9))

Reference: F. Benzing, "Gradient Descent on Neurons and its Link to
Approximate Second-Order Optimization", ICML 2022, eqs. 5-6 and Algorithm 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from neuron_optax._src import amortisation, amortised, factorisation, hyperparams, kronecker, param_layout
from neuron_optax._src.contraction import Contraction, left_order, left_precondition


class FoofLayerState(NamedTuple):
  a_ema: jax.Array  # biased EMA of A (divide by a_weight); an embedding's diagonal A as its diagonal
  a_updates: jax.Array  # number of finite batches in the EMA
  a_inverse: jax.Array  # (A + λI)⁻¹ from the last re-factorisation (embeddings: its diagonal)
  a_weight: jax.Array  # debiasing weight of the EMA (1 − β^k for a constant decay β)


class FoofState(NamedTuple):
  count: jax.Array  # steps taken
  layers: dict[str, FoofLayerState]
  damping: jax.Array  # the λ the stored inverses were built with


def foof(
  damping: hyperparams.ScalarOrSchedule = 1.0,
  *,
  ema_decay: hyperparams.ScalarOrSchedule = 0.95,
  inverse_every: int | None = None,
  stats_window: int | None = None,
  contraction: Contraction = "auto",
  kernel_input_ndim: param_layout.KernelInputNdim = None,
  distribute_factorisations: factorisation.Distribution | None = None,
  phase: amortisation.Phase = "auto",
  statistics_rows: int | None = None,
  weight_sharing: kronecker.WeightSharing = "expand",
) -> optax.GradientTransformationExtraArgs:
  r"""FOOF: precondition each captured layer's gradient with its inputs' second moment.

  For a layer with gradient :math:`\nabla W` (kernel rows, then the bias row) and input rows
  :math:`\bar a_r` (with a trailing 1 for the bias), FOOF ("gradient descent on neurons", Benzing 2022,
  eqs. 5-6, Algorithm 1) returns

  .. math::

    D = (A + \lambda I)^{-1} \nabla W, \qquad A = \frac{1}{R} \sum_{r=1}^{R} \bar a_r \bar a_r^\top ,

  where :math:`A` is a debiased moving average over steps. The inverse is an eigenvalue-floored inverse
  formed at re-factorisation steps: eigenvalues of :math:`A + \lambda I` below the factor's float
  resolution are raised to it (Cholesky when the damping is above it, else an eigendecomposition and a
  :class:`~neuron_optax.PrecisionWarning`).

  **Damping and learning rate.** Chained with ``optax.sgd``, keep ``lr <= damping / 10``: for a large
  damping the direction approaches :math:`\nabla W / \lambda`, so ``lr / damping`` plays SGD's learning
  rate, and a smaller damping needs a smaller ratio (``foof(1.0)`` with ``sgd(0.1, momentum=0.9)`` trains
  on every benchmark; ``lr = damping`` diverged on all of them). Wrap the chain in
  ``optax.apply_if_finite(tx, max_consecutive_errors=5)`` to skip a step that is not finite. The first step
  whose direction is more than 100 times its gradient in some layer (possible only for ``damping < 1e-2``)
  issues one :class:`~neuron_optax.DivergenceWarning` naming the layer; :func:`neuron_optax.norm_constrained`
  bounds such steps. Gradient
  clipping and other changes to the raw gradient go *before* ``foof`` in the chain.

  Args:
    damping: ``λ > 0`` added to the input second moment before inversion: a
      number or an optax schedule of the step count. The state records the
      damping its inverses were built with (``state.damping``); with
      ``phase="auto"`` a step whose damping differs (a schedule, an injected
      value, a state restored into a transform with another damping)
      re-factorises at once. A fixed ``"plain"``/``"statistics"`` step
      compiles no factorisation: it applies the stored inverse and keeps its
      damping in the state, and the new damping takes effect at the next
      ``"inversion"`` step (after restoring a checkpoint, run one). The default 1.0
      trains with ``optax.sgd(0.1, momentum=0.9)`` on the MLP, CNN and
      Transformer benchmarks (docs: hyperparameter guide).
    ema_decay: decay ``β`` of the debiased moving average of ``A``.
    inverse_every: ``T``: re-factorise ``A + λI`` at steps
      ``0, T, 2T, …``; in between the last inverse is reused. ``None``
      (default): 100, as in the paper.
    stats_window: ``S``: update the moving average only in the ``S`` steps
      that end with a re-factorisation (paper: ``T=100, S=50``). ``None``
      (default): ``min(10, T)``; ``S = T`` updates it every step.
    contraction: ``"auto"`` takes ``(A⁻¹Āᵀ)Cot`` from the recorded rows where
      that is cheaper **and** a run-time check finds the incoming gradient to
      be the recorded one, else ``A⁻¹∇W`` of the incoming gradient
      (:func:`neuron_optax._src.contraction.left_precondition`); ``"gradient"``
      always uses the incoming gradient; ``"rows"`` (opt-in) always the rows,
      right only when ``foof`` is first in its chain, outside ``MultiSteps``.
    kernel_input_ndim: per-layer number of kernel input axes where it is not
      "all but the last" (multi-axis ``nn.DenseGeneral`` outputs), keyed by
      layer path such as ``"attention/query"``.
    distribute_factorisations: ``(mesh, axis name)``, e.g. ``(mesh, "data")``
      for the mesh the batch is sharded over: at re-factorisation steps each
      device of that axis factorises a share of the layers (of each size) and
      the inverses are all-gathered, as kfac-jax distributes its inverses.
      ``None`` (default): every device factorises every layer. Layers of equal
      ``d_in`` always share one batched factorisation call.
    phase: ``"auto"`` (default) picks the step's kind from the step counter
      inside the compiled step (``jax.lax.cond``). ``"plain"``,
      ``"statistics"`` or ``"inversion"`` fix it: compile one step per phase
      and pick it on the host with
      ``nox.amortisation_phase(step, inverse_every, stats_window)``; the
      states are interchangeable and the trajectory is the same. On a GPU each
      conditional makes the host wait for its predicate, so a fixed-phase
      plain step keeps the device queue full.
    statistics_rows: ``m``: estimate each batch's ``A_batch`` from ``m`` of its
      ``R`` input rows drawn uniformly without replacement, afresh at every
      step (``(1/m) Σ_{r∈S} ā_r ā_rᵀ``, an unbiased estimate of ``A_batch``),
      which cuts the statistics' ``R·d_in²`` products by ``R/m``; for layers
      shared over many tokens (Transformers, convolutions), whose rows are
      strongly correlated. Embeddings (a diagonal ``A``) always use every row.
      ``None`` (default): every row. With ``weight_sharing="reduce"`` the
      ``m`` rows are drawn from the ``n`` pooled rows.
    weight_sharing: ``A`` of layers shared over the ``P`` positions of an
      example (tokens, patches), as in :func:`neuron_optax.kfac`:
      ``"expand"`` (default) ``A = mean_{i,p} ā_ip ā_ipᵀ``; ``"reduce"``
      ``A = mean_i ā_i ā_iᵀ`` of the per-example means ``ā_i = mean_p ā_ip``
      (Eschenhagen et al. 2023), for one loss per example after pooling, at
      ``1/P`` of the statistics' cost. Embeddings keep expand's diagonal ``A``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, stats=stats)`` with ``stats`` from
    :func:`neuron_optax.value_grad_and_stats`.

  Examples:
    One step of FOOF followed by SGD on a single dense layer; the update is
    :math:`-\mathrm{lr}\,(A + \lambda I)^{-1} \nabla W`:

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import neuron_optax as nox
    >>> model = nn.Dense(3)
    >>> x, y = jnp.arange(20.0).reshape(4, 5) / 20, jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> def loss_fn(params):
    ...   logits = model.apply({"params": params}, x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> tx = optax.chain(nox.foof(damping=1.0), optax.sgd(0.1, momentum=0.9))  # lr <= damping / 10
    >>> opt_state = tx.init(params)
    >>> loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    >>> a = jnp.concatenate([x, jnp.ones((4, 1))], axis=1)  # input rows with the bias's 1
    >>> grad_w = jnp.concatenate([grads["kernel"], grads["bias"][None]])
    >>> direction = jnp.linalg.solve(a.T @ a / 4 + jnp.eye(6), grad_w)
    >>> bool(jnp.allclose(updates["kernel"], -0.1 * direction[:-1], atol=1e-6))
    True

  References:
    - F. Benzing, `Gradient Descent on Neurons and its Link to Approximate Second-order
      Optimization <https://arxiv.org/abs/2201.12250>`__, ICML 2022.
  """
  settings = amortised.settings(
    "foof", damping, ema_decay, inverse_every, stats_window, phase, contraction, kernel_input_ndim
  )
  factorisation.validate_distribution("foof", distribute_factorisations)
  kronecker.check_statistics_rows("foof", statistics_rows)
  hyperparams.check_choice("foof", "weight_sharing", weight_sharing, kronecker.WEIGHT_SHARING)

  def check_layer(layers, key, shape) -> None:
    factor = param_layout.input_factor_shape(shape)  # an embedding's diagonal A: a vector
    amortisation.check_state_layer("foof", layers, key, {"a_ema": factor, "a_inverse": factor})

  def factorise(debiased, damping_now):
    operands = {name: (a["a"], damping_now.astype(a["a"].dtype)) for name, a in debiased.items()}
    return amortised.factorise_all("foof", operands, damping_now, distribute_factorisations)

  method = amortised.Preconditioner(
    name="foof",
    check_layer=check_layer,
    averages=lambda layer: {"a": amortised.MovingAverage(layer.a_ema, layer.a_weight, layer.a_updates)},
    batch_values=lambda layer_stats, dtype: {"a": kronecker.input_factor(layer_stats, dtype, weight_sharing, "foof")},
    batch_values_at=None
    if statistics_rows is None
    else lambda layer_stats, dtype, count: {
      "a": kronecker.input_factor(
        layer_stats,
        dtype,
        weight_sharing,
        "foof",
        kronecker.statistics_sample(layer_stats, count, statistics_rows, weight_sharing, "foof"),
      )
    },
    factors=lambda layer: layer.a_inverse,
    factorise=factorise,
    rebuild=lambda layer, averages, inverse: FoofLayerState(
      averages["a"].value, averages["a"].updates, inverse, averages["a"].weight
    ),
    order=lambda layer_stats: left_order(layer_stats, contraction),
    apply=lambda inverse, gradient, layer_stats, damping_now, order: left_precondition(
      inverse, gradient, layer_stats, order
    ),
  )

  def make_layer(shape, dtype, initial_damping):
    factor_shape = param_layout.input_factor_shape(shape)
    a = amortised.MovingAverage.zeros(factor_shape, dtype)
    inverse = param_layout.identity(factor_shape, dtype) / initial_damping.astype(dtype)
    return FoofLayerState(a_ema=a.value, a_updates=a.updates, a_inverse=inverse, a_weight=a.weight)

  return amortised.transformation(method, settings, make_layer, FoofState)
