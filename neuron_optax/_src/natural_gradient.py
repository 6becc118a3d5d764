"""Exact natural gradient for a mini-batch Fisher, by the Woodbury identity.

Columns. For every captured layer the Fisher cotangents ``g`` (``S`` label sets,
``(S, n, P, d_out)``, from ``LayerStats.per_example_cotangents``) and the
augmented inputs ``ā`` (``(n, P, d_in)``) give one column per label set ``s``
and example ``i``, ``j = (s, i)``, ``m = S·n`` columns in all::

    ψ_j = Σ_p ā_ip g_sipᵀ                       (layer's part, shape (d_in, d_out))

``ψ_j`` is the gradient of example ``i``'s own loss (empirical Fisher, ``S=1``),
of the negative log-likelihood of one sampled label (``fisher="mc"``, ``S=1``),
or of label ``c``'s negative log-likelihood times ``sqrt(p(c|x_i))``
(``fisher="full"``: ``S`` = classes × output positions, the weights are
already in ``g``). With ``Ψ`` the ``d × m`` matrix of the columns (``d``: all
captured parameters) and ``n`` the batch size of the Fisher batch::

    F = (1/n) Σ_j ψ_j ψ_jᵀ = (1/n) Ψ Ψᵀ

and the update is exactly ``(F + λI)⁻¹ ∇`` for the incoming gradient ``∇``
(what ``grads`` holds: the gradient of the **mean** loss, possibly changed by
earlier transforms of a chain). By the matrix inversion lemma::

    (F + λI)⁻¹ ∇ = (1/λ) (∇ − Ψ c),   c = (nλI + K)⁻¹ Ψᵀ∇,   K = ΨᵀΨ

where only the ``m × m`` matrix ``nλI + K`` is factorised (Cholesky; an
eigendecomposition with eigenvalues raised to the float resolution of ``K`` for
a damping below it, see :func:`neuron_optax._src.linalg.damped_solve`). ``K``,
``Ψᵀ∇`` and ``Ψ c`` are sums over layers of the rank-structured products of
:mod:`neuron_optax._src.linalg` (``gradient_gram``, ``gradient_dots``,
``weighted_gradient_sum``; Benzing 2022, App. I, eqs. 21-23), so no
per-example gradient of a dense layer is ever materialised.

Cancellation. Where ``∇`` lies in the span of the columns, ``∇ − Ψc`` cancels
to a small difference of large terms, and its round-off is divided by ``λ``
(float32, ``λ`` = 1e-6 of the Fisher's mean eigenvalue: 70 % error). With the
empirical Fisher of the gradient's own batch the recorded gradient is
``∇_rec = Ψ1/n``, whose direction has the cancellation-free form
``(F + λI)⁻¹∇_rec = Ψ(K + nλI)⁻¹1``. Where the incoming ``∇`` is
``s ∇_rec`` (a randomised run-time check, tolerance ``√ε``, as for the row
contraction of FOOF; ``s = <∇, ∇_rec>/‖∇_rec‖²`` from ``Ψᵀ∇`` and ``K``)::

    (F + λI)⁻¹∇ = s Ψ(K + nλI)⁻¹1

and any other ``∇`` (changed by an earlier transform; other Fishers:
``fisher="mc"``, ``"full"``, ``fisher_stats``) goes through the Woodbury form.

``block_diagonal=True`` uses the Fisher's diagonal blocks, one per layer
(``F_ℓ = (1/n) Ψ_ℓ Ψ_ℓᵀ``): the same computation with one ``m × m`` system per
layer (the paper's block-diagonal control, §3.2).

Which parameters. The Fisher is over the parameters of the captured layers
(``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``; kernel and bias;
every copy of a stacked layer is a layer of its own) only. Other leaves (norm
scales, ...) are **not** part of the Fisher: their gradients pass through
unchanged, for the chained optimiser to handle. An embedding's input rows are
one-hot: its Gram block is the token-equality matrix times the cotangents'.

Fisher batch. By default the Fisher comes from the same mini-batch as the
gradient (``stats``). Passing ``fisher_stats`` (from
``value_grad_and_stats`` on an independent batch, with any ``fisher=``)
estimates ``F`` there instead, which removes the bias of using one batch for
both (Benzing 2022, App. I.5); ``n`` is then the Fisher batch's size.

Cost, with ``m = S·n`` columns: memory ``O(m²)`` plus the recorded rows; time
``O(m² Σ_ℓ (d_in + d_out) + m³ + n Σ_ℓ d_in d_out)`` for dense layers. For
layers with ``P > 1`` rows per example (convolutions, tokens) the Gram block
is exact and costs ``min(m·P·d_in·d_out + m²·d_in·d_out, m²·P²·(d_in + d_out))``
time, with memory ``m·d_in·d_out`` or ``m²·P²`` respectively (see
:func:`neuron_optax._src.linalg.gradient_gram`). ``max_columns`` guards against an
accidental ``m`` that would not fit (e.g. ``fisher="full"`` with many classes).

References: F. Benzing, "Gradient Descent on Neurons and its Link to
Approximate Second-Order Optimization", ICML 2022, §3 and App. I;
Y. Ren and D. Goldfarb, "Efficient Subsampled Gauss-Newton and Natural
Gradient Methods for Training Neural Networks", 2019.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from neuron_optax._src import hyperparams, linalg, param_layout, precision
from neuron_optax._src.contraction import recorded_gradient_matches
from neuron_optax._src.fisher_columns import fisher_columns
from neuron_optax._src.layer_stats import LayerKey, LayerStats, Stats, layer_name


class NaturalGradientState(NamedTuple):
  count: jax.Array  # steps taken (for a damping schedule)


def _validate(damping, max_columns) -> None:
  hyperparams.check_scalar_or_schedule("natural_gradient", "damping", damping)
  if not isinstance(max_columns, jax.core.Tracer):  # optax.inject_hyperparams traces numeric arguments
    hyperparams.check_integer("natural_gradient", "max_columns", max_columns, optional=True)


def _fisher_stats(
  stats: Stats | None, fisher_stats: Stats | None, shapes: Mapping[LayerKey, param_layout.LayerShape]
) -> Stats:
  """The statistics that define the Fisher, validated against the gradient's layers."""
  if fisher_stats is None:
    return param_layout.check_stats(stats, shapes, "natural_gradient", need_rows=True)
  fisher_stats = param_layout.check_stats(fisher_stats, shapes, "natural_gradient (fisher_stats)", need_rows=True)
  if stats is not None:
    stats = param_layout.check_stats(stats, shapes, "natural_gradient", need_rows=True)
    if set(stats) != set(fisher_stats):
      only_stats = sorted(layer_name(k) for k in set(stats) - set(fisher_stats))
      only_fisher = sorted(layer_name(k) for k in set(fisher_stats) - set(stats))
      raise ValueError(
        "natural_gradient: stats and fisher_stats capture different layers (only in stats: "
        f"{only_stats}; only in fisher_stats: {only_fisher}). Compute both with the same model "
        "and loss function."
      )
  return fisher_stats


def natural_gradient(
  damping: hyperparams.ScalarOrSchedule = 1.0,
  *,
  block_diagonal: bool = False,
  max_columns: int | None = 4096,
  kernel_input_ndim: param_layout.KernelInputNdim = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The exact damped natural gradient for the mini-batch Fisher, by the Woodbury identity.

  With the columns :math:`\psi_j` of :math:`\Psi` the per-example (per label set) gradients of the
  captured layers (see the module docstring) and :math:`F = \frac{1}{n}\Psi\Psi^\top`,

  .. math::

    D = (F + \lambda I)^{-1} g = \frac{1}{\lambda}\big(g - \Psi c\big),
    \qquad c = (n\lambda I + K)^{-1} \Psi^\top g, \qquad K = \Psi^\top \Psi ,

  so only an :math:`m \times m` system is solved (:math:`m` = label sets times examples), and
  :math:`K` is a sum over layers of :math:`(\bar A \bar A^\top) \odot (\hat G \hat G^\top)` for dense
  layers (Benzing 2022, App. I; Ren & Goldfarb 2019). With ``block_diagonal=True`` the sums over
  layers are dropped: each layer solves its own system (the exact natural gradient of the
  block-diagonal Fisher).

  **Damping and learning rate.** Chained with ``optax.sgd``, keep ``lr <= damping / 10``, as for
  :func:`neuron_optax.foof`. Wrap the chain in ``optax.apply_if_finite(tx, max_consecutive_errors=5)``
  to skip a step that is not finite.

  Args:
    damping: ``λ > 0``: a number or an optax schedule of the step count. The
      default 1.0 trains with ``optax.sgd(0.1, momentum=0.9)`` on the MLP,
      CNN and Transformer benchmarks (docs: hyperparameter guide).
    block_diagonal: use the layer-wise block-diagonal Fisher.
    max_columns: largest allowed ``m`` (checked at trace time; ``None``: no
      limit). Memory is ``O(m²)``, time ``O(m² Σ_ℓ(d_in + d_out) + m³)`` for
      dense layers (conv layers: see :func:`neuron_optax._src.linalg.gradient_gram`).
    kernel_input_ndim: per-layer number of kernel input axes where it is not
      "all but the last", keyed by layer path such as ``"attention/query"``.

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``. Call
    ``update(grads, state, params, stats=stats)`` with ``stats`` from
    :func:`neuron_optax.value_grad_and_stats` (use ``fisher="mc"`` or
    ``"full"`` there for the true Fisher; the default is the empirical
    Fisher). To estimate the Fisher on an independent batch (Benzing 2022,
    App. I.5), also pass ``fisher_stats=`` from ``value_grad_and_stats`` on
    that batch; ``stats`` may then be omitted and ``grads`` is the gradient of
    the first batch. Leaves of uncaptured layers pass through unchanged.

  Examples:
    The natural gradient of the Monte-Carlo Fisher equals the explicit :math:`(F + \lambda I)^{-1} g`:

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import neuron_optax as nox
    >>> model = nn.Dense(3)
    >>> x, y = jnp.arange(20.0).reshape(4, 5) / 20, jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> def loss_fn(params):
    ...   logits = model.apply({"params": params}, x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> capture = nox.value_grad_and_stats(loss_fn, fisher="mc", likelihood="categorical")
    >>> loss, grads, stats = capture(params, rng=jax.random.key(1))
    >>> tx = nox.natural_gradient(damping=1.0)
    >>> direction, _ = tx.update(grads, tx.init(params), params, stats=stats)
    >>> jax.tree.map(jnp.shape, direction)
    {'bias': (3,), 'kernel': (5, 3)}

  References:
    - F. Benzing, `Gradient Descent on Neurons and its Link to Approximate Second-order
      Optimization <https://arxiv.org/abs/2201.12250>`__, ICML 2022.
    - Y. Ren and D. Goldfarb, `Efficient Subsampled Gauss-Newton and Natural Gradient
      Methods for Training Neural Networks <https://arxiv.org/abs/1906.02353>`__, 2019.
  """
  _validate(damping, max_columns)

  def init_fn(params) -> NaturalGradientState:
    param_layout.candidate_layers(params, kernel_input_ndim)  # validates the tree and overrides
    return NaturalGradientState(count=jnp.zeros([], jnp.int32))

  def update_fn(
    updates, state, params=None, *, stats: Stats | None = None, fisher_stats: Stats | None = None, **extra_args
  ):
    del params, extra_args
    # Stateless: the statistics' own layouts (stacked layers) need no kernel_input_ndim.
    for given, what in ((stats, "natural_gradient"), (fisher_stats, "natural_gradient (fisher_stats)")):
      if given is not None:
        param_layout.check_stats_type(given, what)
    shapes = param_layout.candidate_layers(updates, kernel_input_ndim, stats if fisher_stats is None else fisher_stats)
    fisher = _fisher_stats(stats, fisher_stats, shapes)
    keys = list(fisher)
    if not keys:
      return updates, NaturalGradientState(count=optax.safe_int32_increment(state.count))
    grads = param_layout.gradient_matrices(updates, shapes, keys)
    dtype = param_layout.statistics_dtype(jnp.result_type(*grads.values()))
    grads = {key: grad.astype(dtype) for key, grad in grads.items()}
    damping_now = hyperparams.value_at(damping, state.count, dtype)
    damping_ok = hyperparams.valid(damping_now)

    # The Woodbury form (∇ − Ψc)/λ cancels where ∇ lies in the span of the columns: its round-off,
    # divided by a small λ, swamps the direction (float32, λ = 1e-6 of the Fisher's mean eigenvalue:
    # 70 % error). With the empirical Fisher of this batch the recorded gradient is ∇_rec = Ψ1/n, whose
    # direction has the cancellation-free form (F + λI)⁻¹Ψ1/n = Ψ(K + nλI)⁻¹1 (FNGD's). So where ∇ is
    # s·∇_rec (checked at run time), that form is used.
    empirical = fisher_stats is None and all(fisher[key].fisher_cotangents is None for key in keys)

    def solve(layer_keys, where):
      """Directions for the Fisher block spanned by ``layer_keys``."""
      columns = fisher_columns(
        "natural_gradient",
        fisher,
        layer_keys,
        dtype,
        max_columns=max_columns,
        block=f" block of layer {where!r}" if block_diagonal else "",
        smaller="estimate the Fisher on a smaller batch (pass fisher_stats= from value_grad_and_stats on fewer "
        "examples)",
        layerwise="use block_diagonal=True",
      )
      n = columns.n
      gram = columns.gram()
      dots = columns.dots(grads)
      recorded = jnp.asarray(False)
      scale = jnp.zeros([], dtype)
      if empirical:
        recorded, scale = _multiple_of_recorded(
          {k: grads[k] for k in layer_keys}, {k: fisher[k] for k in layer_keys}, gram, dots
        )
      rhs = jnp.where(recorded, scale, -dots / damping_now)
      # The precision warning, if any, is issued inside the eigendecomposition branch: no host
      # callback in the usual (Cholesky) step.
      warn = lambda floor: precision.warn_if_floored("natural_gradient", {where: (floor, n * damping_now)})
      coefficients = linalg.damped_solve(gram, n * damping_now, rhs, on_floor=warn)
      return {
        k: columns.weighted_sum(k, coefficients) + jnp.where(recorded, 0, grads[k] / damping_now) for k in layer_keys
      }

    if block_diagonal:
      directions = {}
      for key in keys:
        directions.update(solve([key], layer_name(key)))
    else:
      directions = solve(keys, "all captured layers")

    # An invalid damping (a schedule's or an injected value) gives no step, as a non-finite batch.
    out = param_layout.map_layers(updates, shapes, keys, lambda key, _: jnp.where(damping_ok, directions[key], jnp.nan))
    return out, NaturalGradientState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _multiple_of_recorded(
  grads: Mapping[LayerKey, jax.Array], stats: Mapping[LayerKey, LayerStats], gram: jax.Array, dots: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(whether ∇ = s·∇_rec, s)`` for the empirical Fisher's columns ``Ψ`` and ``∇_rec = Ψ1/n``.

  ``s = <∇, ∇_rec> / ‖∇_rec‖²`` costs nothing more: ``<∇, ∇_rec> = 1ᵀΨᵀ∇/n`` (the
  ``dots``) and ``‖∇_rec‖² = 1ᵀK1/n²``. Whether ``∇/s`` is the recorded gradient
  is the randomised check of :func:`~neuron_optax._src.contraction.recorded_gradient_matches`
  per layer (tolerance ``√ε``): an unchanged gradient, or one that earlier
  transforms rescaled (clipping, accumulation of equal gradients).
  """
  n = dots.shape[0]
  norm = jnp.sum(gram) / (n * n)
  scale = jnp.where(norm > 0, (jnp.sum(dots) / n) / jnp.where(norm > 0, norm, 1), 0)
  matches = [recorded_gradient_matches(grad, stats[k], scale) for k, grad in grads.items()]
  return (scale != 0) & jnp.all(jnp.stack(matches)), scale
