"""KFAC: Kronecker-factored approximate curvature, with heuristic or standard damping.

For every captured layer with gradient matrix ``∇W`` (kernel rows, then the bias
row; shape ``(d_in, d_out)``), inputs ``ā_r = [a_r, 1]`` and per-example output
cotangents ``g_sr`` (``S`` label sets, see below) over the rows ``r`` (examples,
or examples × positions for convolutions and tokens)::

    A_batch = mean_r ā_r ā_rᵀ                 G_batch = mean_r Σ_s g_sr g_srᵀ
    A, G    = debiased EMAs of A_batch, G_batch (decay β)

    heuristic damping:  π = sqrt((tr A / dim A) / (tr G / dim G))
                        D = (A + π√λ I)⁻¹ ∇W (G + √λ/π I)⁻¹
    standard damping:   vec D = (A⊗G + λI)⁻¹ vec ∇W
                        D = U_A [(U_Aᵀ ∇W U_G) / (a gᵀ + λ)] U_Gᵀ

with ``A = U_A diag(a) U_Aᵀ``, ``G = U_G diag(g) U_Gᵀ`` and the row-major
``vec`` (``(A⊗G) vec W = vec(A W G)``). The Kronecker product is never formed.

Which Fisher ``G`` describes is chosen when the statistics are captured:
``nox.value_grad_and_stats(loss_fn, fisher=...)`` with ``"empirical"`` (true
labels, ``g = n·cot``; no extra cost), ``"mc"`` (one sampled label per input,
Martens & Grosse's default) or ``"full"`` (all labels, ``√p`` folded into the
cotangents so that ``Σ_s`` is the expectation over labels).

Design decisions:
  * Amortisation and averaging are shared with FOOF (``neuron_optax._src.amortisation``):
    ``inverse_every=T`` re-factorises at steps ``0, T, 2T, …`` and
    ``stats_window=S`` updates both moving averages only in the ``S`` steps
    that end with a re-factorisation; batches with non-finite statistics are
    skipped. ``A`` and ``G`` share one schedule but keep separate update counts.
  * ``π`` is computed from the debiased averages at re-factorisation time; it
    is 1 where a trace is zero (e.g. before the first finite batch, or a layer
    whose cotangents vanish), so a degenerate factor falls back to ``√λ I``.
  * Heuristic damping stores the two damped inverses (Cholesky, eigh fallback);
    standard damping stores both eigendecompositions. Per step, two (heuristic)
    or four (standard) matrix products; the ``A``-side product may be taken
    from the recorded rows (``contraction``), as in FOOF.
  * Statistics and factors are kept in at least float32; the direction is cast
    back to each parameter's dtype.
  * Embeddings: ``A`` is the diagonal of token frequencies, stored and
    inverted as a vector (standard damping: ``U_A = I``). A table tied to an
    output layer (``Embed.attend``) passes through, with a warning: the two
    uses' factors lie on opposite sides of the table. Each copy of a stacked
    layer (``nn.scan``) is a layer of its own.
  * Conv layers and tokens: both factors are means over all rows
    (examples × positions), the convention of the whole library; the scale of
    ``G`` (and so the meaning of ``λ`` under standard damping) therefore
    differs from KFC's (Grosse & Martens 2016) sum over positions by ``P``.
    ``weight_sharing="reduce"`` pools each example's positions first
    (KFAC-reduce, Eschenhagen et al. 2023; :mod:`neuron_optax._src.kronecker`).

Other leaves pass through unchanged. Chain with a first-order optimiser for the
step size and momentum::

    tx = optax.chain(nox.kfac(damping=1.0), optax.sgd(0.1, momentum=0.9))

References: J. Martens and R. Grosse, "Optimizing Neural Networks with
Kronecker-factored Approximate Curvature", ICML 2015 (heuristic damping:
section 6.3); F. Benzing, "Gradient Descent on Neurons and its Link to
Approximate Second-Order Optimization", ICML 2022, eqs. 2-4 and section 4.2
(heuristic damping makes KFAC approximate FOOF; Fig. 3B, App. D.9).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from neuron_optax._src import (
  amortisation,
  amortised,
  factorisation,
  hyperparams,
  kronecker,
  linalg,
  param_layout,
  precision,
)
from neuron_optax._src.contraction import (
  Contraction,
  Order,
  left_order,
  left_precondition,
  two_sided_order,
  two_sided_precondition,
)
from neuron_optax._src.layer_stats import LayerStats, layer_name

DampingMode = Literal["heuristic", "standard"]
_DAMPING_MODES = ("heuristic", "standard")


class HeuristicFactors(NamedTuple):
  """Products of a heuristic-damping re-factorisation."""

  a_inverse: jax.Array  # (A + π√λ I)⁻¹, (d_in, d_in)
  g_inverse: jax.Array  # (G + √λ/π I)⁻¹, (d_out, d_out)


class EigenFactors(NamedTuple):
  """Products of a standard-damping re-factorisation: ``A = U_A diag(a) U_Aᵀ``, same for ``G``."""

  a_eigenvalues: jax.Array  # (d_in,)
  a_eigenvectors: jax.Array | None  # (d_in, d_in), columns; None for a diagonal A (embeddings: U_A = I)
  g_eigenvalues: jax.Array  # (d_out,)
  g_eigenvectors: jax.Array  # (d_out, d_out), columns


class KfacLayerState(NamedTuple):
  a_ema: jax.Array  # biased EMA of A (divide by a_weight); an embedding's diagonal A as its diagonal
  a_updates: jax.Array  # number of finite batches in the EMA of A
  g_ema: jax.Array  # biased EMA of G (divide by g_weight)
  g_updates: jax.Array  # number of finite batches in the EMA of G
  factors: HeuristicFactors | EigenFactors  # from the last re-factorisation
  a_weight: jax.Array  # debiasing weights of the EMAs (1 − β^k for a constant decay β)
  g_weight: jax.Array


class KfacState(NamedTuple):
  count: jax.Array  # steps taken
  layers: dict[str, KfacLayerState]
  damping: jax.Array  # the λ the stored factors were built with (heuristic damping)


def precondition(
  factors: HeuristicFactors | EigenFactors,
  gradient: jax.Array,
  stats: LayerStats,
  damping: jax.Array | float,
  order: Order = "gradient",
) -> jax.Array:
  """The KFAC direction ``D`` of one layer from its stored factorisation.

  ``order`` (:func:`order`): ``"gradient"`` reads the incoming ``gradient``; the
  other orders form the ``A`` side (``"both"``: both sides) from the recorded rows.
  """
  if isinstance(factors, HeuristicFactors):
    return two_sided_precondition(factors.a_inverse, gradient, factors.g_inverse, stats, order)
  if factors.a_eigenvectors is None:  # a diagonal A: U_A = I
    rotated = gradient.astype(factors.a_eigenvalues.dtype)
  else:
    rotated = left_precondition(
      factors.a_eigenvectors.T, gradient, stats, "gradient" if order == "gradient" else "rows"
    )
  return linalg.kronecker_eigen_solve(
    (factors.a_eigenvalues, factors.a_eigenvectors),
    (factors.g_eigenvalues, factors.g_eigenvectors),
    rotated,
    jnp.asarray(damping, rotated.dtype),
    a_rotated=True,
  )


def order(stats: LayerStats, contraction: Contraction, heuristic: bool) -> Order:
  """The cheapest exact order of one layer's products when the incoming gradient is the recorded one."""
  return two_sided_order(stats, contraction) if heuristic else left_order(stats, contraction)


def kfac(
  damping: hyperparams.ScalarOrSchedule = 1.0,
  *,
  ema_decay: hyperparams.ScalarOrSchedule = 0.95,
  inverse_every: int | None = None,
  stats_window: int | None = None,
  damping_mode: DampingMode = "heuristic",
  contraction: Contraction = "auto",
  kernel_input_ndim: param_layout.KernelInputNdim = None,
  distribute_factorisations: factorisation.Distribution | None = None,
  phase: amortisation.Phase = "auto",
  weight_sharing: kronecker.WeightSharing = "expand",
  statistics_rows: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""KFAC: precondition each captured layer's gradient with the Kronecker factors of its inputs and outputs.

  With :math:`A` the debiased moving average of the input rows' second moment
  :math:`\frac{1}{R}\sum_r \bar a_r \bar a_r^\top` and :math:`G` that of the output cotangents,
  :math:`\frac{1}{R}\sum_r \sum_s g_{sr} g_{sr}^\top` (of the Fisher chosen by
  ``value_grad_and_stats(fisher=...)``), KFAC (Martens & Grosse 2015; Benzing 2022, eqs. 2-4) returns

  .. math::

    \text{heuristic:}\quad D = (A + \pi\sqrt{\lambda} I)^{-1}\, \nabla W\, (G + \tfrac{\sqrt{\lambda}}{\pi} I)^{-1},
    \qquad \pi = \sqrt{\frac{\operatorname{tr} A / \dim A}{\operatorname{tr} G / \dim G}},

    \text{standard:}\quad \operatorname{vec} D = (A \otimes G + \lambda I)^{-1} \operatorname{vec} \nabla W ,

  the standard form computed from eigendecompositions of :math:`A` and :math:`G` (the Kronecker
  product is never formed).

  **Damping and learning rate.** Chained with ``optax.sgd``, keep ``lr <= damping / 10``, as for
  :func:`neuron_optax.foof`: a small damping at an ordinary learning rate diverges within a few steps
  (``kfac(damping=1e-3)`` with ``sgd(0.1)``). Wrap the chain in
  ``optax.apply_if_finite(tx, max_consecutive_errors=5)`` to skip a step that is not finite. The first step
  whose direction is more than 100 times its gradient in some layer (possible only for ``damping < 1e-2``)
  issues one :class:`~neuron_optax.DivergenceWarning` naming the layer; :func:`neuron_optax.norm_constrained`
  bounds such steps.

  Args:
    damping: ``λ > 0``: a number or an optax schedule. Heuristic damping
      re-factorises when it changes, as :func:`neuron_optax.foof` (the same
      rules for fixed phases and restored states); standard damping applies
      it at every step (the eigendecompositions do not depend on it). The default 1.0 trains with
      ``optax.sgd(0.1, momentum=0.9)`` on the MLP, CNN and Transformer
      benchmarks; heuristic KFAC at ``λ ≤ 0.1`` diverges there at that
      learning rate (docs: hyperparameter guide).
    ema_decay: decay ``β`` of the debiased moving averages of ``A`` and ``G``.
    inverse_every: ``T``: re-factorise at steps ``0, T, 2T, …`` (damped
      inverses for heuristic damping, eigendecompositions for standard); in
      between the last factorisation is reused. ``None`` (default): 100.
    stats_window: ``S``: update the moving averages only in the ``S`` steps
      that end with a re-factorisation (paper: ``T=100, S=50``). ``None``
      (default): ``min(10, T)``; ``S = T`` updates them every step.
    damping_mode: ``"heuristic"`` (factor-wise damping, KFAC's default and
      the one that makes it approximate FOOF) or ``"standard"`` (``λI`` added
      to the Kronecker product).
    contraction: how the ``A``-side product is taken, as in
      :func:`neuron_optax.foof`: ``"auto"`` picks per layer the cheaper of
      recomputing ``∇W`` from the recorded rows and using the incoming
      gradient where the incoming gradient is the recorded one (a run-time
      check); ``"gradient"`` / ``"rows"`` force one (``"rows"`` is an opt-in
      that ignores changes earlier transforms made to the gradient).
    kernel_input_ndim: per-layer number of kernel input axes where it is not
      "all but the last", keyed by layer path such as ``"attention/query"``.
    distribute_factorisations: ``(mesh, axis name)``: split the
      re-factorisations across the devices of that mesh axis (each device
      factorises a share of the equal-sized factors; results are
      all-gathered), as in :func:`neuron_optax.foof`. ``None``: every device
      factorises every layer (one batched call per factor size).
    phase: ``"auto"`` (default), or a fixed ``"plain"``, ``"statistics"`` or
      ``"inversion"`` step compiled on its own and picked on the host with
      ``nox.amortisation_phase``, as in :func:`neuron_optax.foof`.
    weight_sharing: the factors of layers shared over the ``P`` positions of
      an example (tokens, convolution patches; Eschenhagen et al. 2023):
      ``"expand"`` (default) treats every position as a row,
      ``A = mean_{i,p} ā_ip ā_ipᵀ``, ``G = Σ_s mean_{i,p} g_sip g_sipᵀ``, the
      choice for losses per position (language models); ``"reduce"`` pools
      each example first, ``A = mean_i ā_i ā_iᵀ`` with ``ā_i = mean_p ā_ip`` and
      ``G = Σ_s mean_i ĝ_si ĝ_siᵀ / P`` with ``ĝ_si = Σ_p g_sip``, the choice
      for one loss per example after pooling (classification ViTs), at ``1/P``
      of the statistics' cost. Both keep the library's scale (equal for
      ``P = 1``); embeddings keep expand's diagonal ``A``.
    statistics_rows: ``m``: form each batch's ``A`` and ``G`` from the same
      ``m`` of its rows, drawn uniformly without replacement afresh at every
      step (unbiased for both), as :func:`neuron_optax.foof`'s option; it cuts
      the statistics' ``R·(d_in² + d_out²)`` products by ``R/m``. Embeddings use
      every row. ``None`` (default): every row.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, stats=stats)`` with ``stats`` from
    :func:`neuron_optax.value_grad_and_stats` (its ``fisher=`` argument picks
    the empirical, Monte-Carlo or full Fisher for ``G``).

  Examples:
    One KFAC step with the Monte-Carlo Fisher (one sampled label per example):

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import neuron_optax as nox
    >>> model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(2)])
    >>> inputs, labels = jnp.linspace(-1.0, 1.0, 18).reshape(6, 3), jnp.array([0, 1, 1, 0, 1, 0])
    >>> params = model.init(jax.random.key(0), inputs)["params"]
    >>> capture = nox.value_grad_and_stats(
    ...   lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, inputs), labels).mean(),
    ...   fisher="mc",
    ...   likelihood="categorical",
    ... )
    >>> loss, grads, stats = capture(params, rng=jax.random.key(1))
    >>> tx = optax.chain(nox.kfac(damping=1.0), optax.sgd(0.1, momentum=0.9))  # lr <= damping / 10
    >>> updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    >>> sorted(stats), updates["layers_2"]["kernel"].shape
    ([('layers_0',), ('layers_2',)], (4, 2))

  References:
    - J. Martens and R. Grosse, `Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature <https://arxiv.org/abs/1503.05671>`__, ICML 2015.
    - R. Eschenhagen, A. Immer, R. E. Turner, F. Schneider and P. Hennig, `Kronecker-Factored
      Approximate Curvature for Modern Neural Network Architectures
      <https://arxiv.org/abs/2311.00636>`__, NeurIPS 2023 (expand and reduce).
    - F. Benzing, `Gradient Descent on Neurons and its Link to Approximate Second-order
      Optimization <https://arxiv.org/abs/2201.12250>`__, ICML 2022.
  """
  settings = amortised.settings(
    "kfac", damping, ema_decay, inverse_every, stats_window, phase, contraction, kernel_input_ndim
  )
  factorisation.validate_distribution("kfac", distribute_factorisations)
  hyperparams.check_choice("kfac", "damping_mode", damping_mode, _DAMPING_MODES)
  hyperparams.check_choice("kfac", "weight_sharing", weight_sharing, kronecker.WEIGHT_SHARING)
  kronecker.check_statistics_rows("kfac", statistics_rows)
  heuristic = damping_mode == "heuristic"

  def factorise(debiased, damping_now):
    if heuristic:
      operands = {}
      for name, f in debiased.items():
        a_damping, g_damping = kronecker.heuristic_dampings(f["a"], f["g"], damping_now)
        operands[name, "a"], operands[name, "g"] = (f["a"], a_damping), (f["g"], g_damping)
      inverses = amortised.factorise_all("kfac", operands, damping_now, distribute_factorisations)
      return {name: HeuristicFactors(inverses[name, "a"], inverses[name, "g"]) for name in debiased}
    operands = {(name, side): (f[side],) for name, f in debiased.items() for side in ("a", "g")}
    solved = factorisation.factorise_by_shape(
      linalg.sym_eigh,
      operands,
      distribute_factorisations,
      lambda a: (a, None),  # diagonal A: U_A = I
    )
    floors = {
      name: (linalg.kronecker_floor(solved[name, "a"][0], solved[name, "g"][0], damping_now), damping_now)
      for name in debiased
    }
    precision.warn_if_floored("kfac", floors)
    return {name: EigenFactors(*solved[name, "a"], *solved[name, "g"]) for name in debiased}

  def rebuild(layer, averages, factors) -> KfacLayerState:
    a, g = averages["a"], averages["g"]
    return KfacLayerState(a.value, a.updates, g.value, g.updates, factors, a.weight, g.weight)

  method = amortised.Preconditioner(
    name="kfac",
    check_layer=lambda layers, key, shape: _check_state_layer(layers, key, shape, heuristic),
    averages=lambda layer: {
      "a": amortised.MovingAverage(layer.a_ema, layer.a_weight, layer.a_updates),
      "g": amortised.MovingAverage(layer.g_ema, layer.g_weight, layer.g_updates),
    },
    batch_values=lambda layer_stats, dtype: dict(
      zip("ag", kronecker.batch_factors(layer_stats, dtype, weight_sharing, "kfac"))
    ),
    batch_values_at=None
    if statistics_rows is None
    else lambda layer_stats, dtype, count: dict(
      zip(
        "ag",
        kronecker.batch_factors(
          layer_stats,
          dtype,
          weight_sharing,
          "kfac",
          kronecker.statistics_sample(layer_stats, count, statistics_rows, weight_sharing, "kfac"),
        ),
      )
    ),
    factors=lambda layer: layer.factors,
    factorise=factorise,
    rebuild=rebuild,
    order=lambda layer_stats: order(layer_stats, contraction, heuristic),
    apply=precondition,
    # Standard damping applies λ at every step (eigendecompositions are damping-free).
    damping_refactorises=heuristic,
  )

  def initial_factors(shape, dtype, initial_damping) -> HeuristicFactors | EigenFactors:
    # What refactorise gives for A = G = 0 (π = 1), without running the factorisations.
    d_in, d_out = shape.d_in, shape.d_out
    a_identity = param_layout.identity(param_layout.input_factor_shape(shape), dtype)
    if heuristic:
      root = jnp.sqrt(initial_damping).astype(dtype)
      return HeuristicFactors(a_identity / root, jnp.eye(d_out, dtype=dtype) / root)
    a_vectors = None if shape.is_embedding else a_identity
    return EigenFactors(jnp.zeros([d_in], dtype), a_vectors, jnp.zeros([d_out], dtype), jnp.eye(d_out, dtype=dtype))

  def make_layer(shape, dtype, initial_damping):
    a = amortised.MovingAverage.zeros(param_layout.input_factor_shape(shape), dtype)
    g = amortised.MovingAverage.zeros((shape.d_out, shape.d_out), dtype)
    return rebuild(None, {"a": a, "g": g}, initial_factors(shape, dtype, initial_damping))

  return amortised.transformation(method, settings, make_layer, KfacState)


def _check_state_layer(layers: dict, key, shape: param_layout.LayerShape, heuristic: bool) -> None:
  """Trace-time check that the state was built by a ``kfac`` of this damping mode for these parameters."""
  name = layer_name(key)
  wanted = HeuristicFactors if heuristic else EigenFactors
  if name in layers and not isinstance(layers[name].factors, wanted):
    saved, mode = ("standard", "heuristic") if heuristic else ("heuristic", "standard")
    raise ValueError(
      f"kfac: layer {name!r} holds {type(layers[name].factors).__name__} in the optimizer state, the "
      f"factorisation of damping_mode={saved!r}, but this transform uses damping_mode={mode!r}. Build the "
      "transform with the damping mode the state was saved with, or call tx.init(params)."
    )
  d_in, d_out = shape.d_in, shape.d_out
  a_factor = param_layout.input_factor_shape(shape)  # an embedding's diagonal A: a vector
  if heuristic:
    factors = {"factors.a_inverse": a_factor, "factors.g_inverse": (d_out, d_out)}
  else:
    factors = {"factors.a_eigenvalues": (d_in,), "factors.g_eigenvectors": (d_out, d_out)}
    if not shape.is_embedding:  # a diagonal A keeps no eigenvectors (U_A = I)
      factors["factors.a_eigenvectors"] = (d_in, d_in)
  amortisation.check_state_layer("kfac", layers, key, {"a_ema": a_factor, "g_ema": (d_out, d_out), **factors})
