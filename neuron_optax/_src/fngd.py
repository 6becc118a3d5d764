"""FNGD: inverse-free fast natural gradient descent with shared coefficients.

For every captured layer, with augmented inputs ``ā_i`` (rows of ``Ā``) and
per-example output cotangents ``g_i = n · cot_i`` (rows of ``Ĝ``) of the ``n``
examples in the batch, the per-example gradients are ``ψ_i = ā_i g_iᵀ``
(``Σ_p ā_ip g_ipᵀ`` over the positions ``p`` of an example for convolutions,
im2col patches, and for dense layers on token axes) and::

    K = ΨᵀΨ              (n × n; (ĀĀᵀ) ⊙ (ĜĜᵀ) for one position, exact sum otherwise)
    λ = α ‖K‖_F
    c = (1/n) (I + K/λ)⁻¹ 1          (Cholesky solve)
    D = Σ_i c_i ψ_i = Σ_i c_i ā_i g_iᵀ

``D`` is formed by weighting the cotangents and contracting them once with the
inputs (the weighted-input trick); per-example gradients of dense layers are
never materialised.

**Scale.** With ``Ψ`` the ``(d_in·d_out) × n`` matrix of per-example gradients
and ``∇W = (1/n) Ψ 1`` the layer's (mean-loss) gradient, the Woodbury identity
gives exactly::

    D = Ψ c = λ (ΨΨᵀ + λI)⁻¹ ∇W = μ (F + μI)⁻¹ ∇W,   μ = λ/n,  F = (1/n) ΨΨᵀ,

the natural gradient of the layer's empirical Fisher ``F`` damped by
``μ = α‖K‖_F / n``, multiplied by ``μ``. The factor ``μ`` keeps the direction
gradient-sized (``α → ∞`` gives ``D = ∇W``, the SGD direction; smaller ``α``
shrinks the directions of large gradient variance more), which is the paper's
choice of folding ``λ`` into the learning rate (Sec. IV-D): start from SGD's
learning rate. ``c`` is invariant to rescaling the loss, so ``D`` scales like the
gradient.

**Coefficient sharing** (Sec. IV-B). The coefficients only depend on the
Gram matrix of the batch; FNGD computes them during the first epoch only, stores
them in a table of shape ``(steps_per_epoch, batch_size)`` per layer, and at
step ``k`` of a later epoch reuses row ``k mod steps_per_epoch`` with the *new*
batch's inputs and cotangents: a fixed weighted sum, as cheap as SGD's mean.
The Gram matrix and its solve run inside a ``jax.lax.cond`` branch that is only
taken in computing epochs, so shared steps never execute them; the schedule and
the conditional are the shared ones of :mod:`neuron_optax._src.amortisation`.
``refresh_every_epochs=R`` recomputes the table during epochs ``0, R, 2R, …``;
``share_coefficients=False`` recomputes every step (the "w/o sharing" ablation,
exact block-diagonal damped empirical-Fisher NGD up to the scale above).

Design decisions:

* FNGD is defined with the empirical Fisher (the per-example gradients whose
  mean is the gradient). It always uses the true-label cotangents
  ``n · stats.cotangents``; Fisher cotangents recorded with ``fisher="mc"`` or
  ``"full"`` are ignored (the update is the same as with ``"empirical"``).
* The optax contract: the direction is a function of the incoming gradient
  ``U``. When the whole tree is ``σ`` times the recorded gradient (one
  randomised check per step, :func:`~neuron_optax._src.contraction.recorded_scale`)
  the direction is ``σ Σ_i c_i ψ_i``, with no further product; otherwise the
  component of ``U`` along the recorded gradient is preconditioned and the
  rest passes through (:func:`incoming_direction`). The check reads ``U``, so
  the step still forms SGD's weight-gradient product; ``contraction="rows"``
  (an opt-in) skips the check and never reads ``U``, so under ``jit`` XLA drops
  that product: right only when ``fngd`` comes first in its chain, outside
  ``MultiSteps``.
* The state has a fixed structure, so the table size must be known at
  ``init``: ``batch_size`` (examples per batch, the leading axis) is a required
  argument when sharing. A batch with more examples is a trace-time error. A
  smaller batch (a ragged last batch) of ``m`` examples uses and stores the
  first ``m`` entries of its row; the rest of the row is zero. With a fixed
  dataset size and ``steps_per_epoch`` equal to the number of batches per
  epoch, the last step of every epoch has the same size, so it reuses exactly
  what was computed for it. A state whose table has another shape than
  ``(steps_per_epoch, batch_size)`` (restored from an ``fngd`` with other
  settings) is a trace-time error: its rows would be reused for other steps.
* A row that was never computed is all zeros (no solve stores zeros: bad
  batches store ``1/n``); a reusing step on such a row (``phase="plain"`` on a
  fresh table) uses the mean-gradient coefficients ``1/n``, i.e. SGD's
  direction, rather than a zero step.
* The step counter is the only notion of epoch: ``steps_per_epoch`` should
  be the number of batches per epoch of the data pipeline (any period works
  mechanically: step ``k`` reuses row ``k mod steps_per_epoch``).
* If a computing step's coefficients are not finite (non-finite statistics),
  the stored row falls back to the SGD coefficients ``1/n`` so one bad batch
  does not poison all later epochs. That step's own direction is built from
  the non-finite rows; the shared layer mapping (``param_layout.map_layers``)
  replaces a non-finite direction by zeros, so the layer takes no step.
* The Gram matrix is normalised by its largest entry before ``λ`` and the
  solve (``c`` is unchanged mathematically), so tiny or huge gradients neither
  underflow nor overflow the norm. ``I + K/λ`` has eigenvalues in
  ``[1, 1 + 1/α]``, so the Cholesky solve (the shared
  :func:`neuron_optax._src.linalg.damped_solve`, with its eigendecomposition
  fallback) is well conditioned for any ``α``.
* A layer whose Gram matrix is zero (all per-example gradients zero) gets the
  limit ``c = 1/n``.

Reference: "Inverse-Free Fast Natural Gradient Descent Method for Deep
Learning" (FNGD), Sec. IV-A (eq. 9, weighted sum of per-sample gradients),
IV-B (coefficient sharing), IV-C (eqs. 10-13, per-sample Gram matrices),
IV-D (eq. 14, ``λ = α‖K‖_F``), Algorithm 1.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from neuron_optax._src import amortisation, hyperparams, linalg, param_layout
from neuron_optax._src.contraction import CONTRACTIONS, Contraction, incoming_matrices, one_decision, recorded_gradient
from neuron_optax._src.layer_stats import LayerKey, LayerStats, Stats, TokenRows, layer_name

# FNGD's steps solve for their coefficients ("inversion") or reuse the stored ones ("plain").
Phase = Literal["auto", "plain", "inversion"]


class FngdLayerState(NamedTuple):
  coefficients: jax.Array  # (steps_per_epoch, batch_size): row k holds c of step k of a computing epoch


class FngdState(NamedTuple):
  count: jax.Array  # steps taken
  layers: dict[str, FngdLayerState]  # empty without sharing


def _validate(alpha, steps_per_epoch, batch_size, share_coefficients, refresh_every_epochs, phase, contraction) -> None:
  amortisation.validate_phase("fngd", phase, ("auto", "plain", "inversion"))
  hyperparams.check_choice("fngd", "contraction", contraction, CONTRACTIONS)
  hyperparams.check_bool("fngd", "share_coefficients", share_coefficients)
  if phase != "auto" and not share_coefficients:
    raise ValueError(
      "fngd: phase only applies with share_coefficients=True (without sharing every step computes its coefficients)."
    )
  hyperparams.check_scalar_or_schedule("fngd", "alpha", alpha, explain=" (λ = α‖K‖_F)")
  for name, value in (("steps_per_epoch", steps_per_epoch), ("batch_size", batch_size)):
    if value is None and share_coefficients:
      raise ValueError(
        f"fngd: {name} is required with share_coefficients=True: the coefficient table has one "
        "row per step of an epoch and one entry per example of a batch, and its shape is fixed "
        "at init. Pass steps_per_epoch=<batches per epoch>, batch_size=<examples per batch>."
      )
    hyperparams.check_integer("fngd", name, value, optional=True)
  if refresh_every_epochs is not None and not share_coefficients:
    raise ValueError(
      "fngd: refresh_every_epochs only applies with share_coefficients=True "
      "(without sharing the coefficients are recomputed every step)."
    )
  hyperparams.check_integer("fngd", "refresh_every_epochs", refresh_every_epochs, optional=True)


def empirical_rows(stats: LayerStats, dtype) -> tuple[jax.Array | TokenRows, jax.Array]:
  """``(ā, g)``: augmented inputs ``(n, P, d_in)`` (embeddings: token ids) and true-label cotangents ``(1, n, P, d_out)``."""
  a = stats.row_operand(dtype, empirical=True)
  g = stats.cotangents.astype(dtype)[None] * stats.batch_size
  return a, g


def coefficients(gram: jax.Array, alpha: float) -> jax.Array:
  """``c = (1/n) (I + K/λ)⁻¹ 1`` with ``λ = α‖K‖_F``, by Cholesky.

  ``K`` is first divided by its largest entry, which leaves ``c`` unchanged
  (``K/λ`` is scale-free) and keeps the norm finite. A zero ``K`` gives
  ``1/n``. A non-finite ``K`` gives non-finite ``c``.
  """
  n = gram.shape[0]
  scale = jnp.max(jnp.abs(gram))
  gram = gram / jnp.where(scale > 0, scale, 1)
  lam = alpha * jnp.sqrt(jnp.sum(gram * gram))
  return linalg.damped_solve(gram / jnp.where(lam > 0, lam, 1), 1.0, jnp.full((n,), 1 / n, gram.dtype))


def layer_coefficients(stats: LayerStats, alpha: float, dtype) -> jax.Array:
  """FNGD coefficients ``(n,)`` of one layer for the current batch (Gram + solve)."""
  a, g = empirical_rows(stats, dtype)
  return coefficients(linalg.gradient_gram(a, g), alpha)


def weighted_direction(stats: LayerStats, weights: jax.Array, dtype) -> jax.Array:
  """``Σ_i c_i ā_i g_iᵀ``, ``(d_in(+1), d_out)``, from the recorded rows.

  ``g_i = n · cot_i``, so the cotangents are weighted by ``n · c``; the bias row
  is the weighted cotangent sum (no augmented copy of the inputs). For
  convolutions this is one backward-filter convolution with the weighted
  cotangents: the im2col rows are never formed. For embeddings (also tied to
  an output layer) a scatter-add of the weighted per-example cotangents.
  """
  if stats.kind == "embed":
    a, g = empirical_rows(stats, dtype)
    return linalg.weighted_gradient_sum(a, g, weights.astype(dtype))
  per_example = weights.astype(dtype) * stats.batch_size
  weighted = stats.cotangents.astype(dtype) * per_example[:, None, None]
  kernel = stats.kernel_gradient(weighted)
  if not stats.has_bias:
    return kernel
  bias = jnp.einsum("npo,n->o", stats.cotangents.astype(dtype), per_example)
  return jnp.concatenate([kernel, bias[None]], axis=0)


def incoming_direction(gradient: jax.Array, preconditioned: jax.Array, stats: LayerStats) -> jax.Array:
  """FNGD's direction for an incoming gradient ``U`` that may differ from the recorded ``∇W``.

  The coefficients precondition the recorded gradient: ``Σ_i c_i ψ_i =
  μ (F + μI)⁻¹ ∇W``. ``U`` is split into its component along ``∇W`` and the
  rest, ``U = s ∇W + R`` with ``s = <U, ∇W> / ‖∇W‖²``; the first part is
  preconditioned and the rest passes through::

      D = s · Σ_i c_i ψ_i + (U − s ∇W)

  so a rescaled gradient (clipping, accumulation of equal gradients) gives
  the rescaled FNGD direction, and what earlier transforms added (weight
  decay, another optimiser's output) keeps its effect. For ``U = σ ∇W`` this is
  ``σ Σ_i c_i ψ_i``, which ``contraction="auto"`` takes without forming ``∇W``
  once its check (:func:`~neuron_optax._src.contraction.recorded_scale`) finds it.
  """
  recorded = recorded_gradient(stats, gradient.dtype)
  norm = jnp.sum(recorded * recorded)
  scale = jnp.where(norm > 0, jnp.sum(gradient * recorded) / jnp.where(norm > 0, norm, 1), 0)
  return scale * preconditioned + (gradient - scale * recorded)


def fngd(
  alpha: hyperparams.ScalarOrSchedule = 1.0,
  *,
  steps_per_epoch: int | None = None,
  batch_size: int | None = None,
  share_coefficients: bool = True,
  refresh_every_epochs: int | None = None,
  phase: Phase = "auto",
  kernel_input_ndim: param_layout.KernelInputNdim = None,
  contraction: Contraction = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""FNGD: the damped empirical-Fisher natural gradient as a weighted sum of per-example gradients.

  For each captured layer, with augmented input rows :math:`\bar a_i` and per-example output
  cotangents :math:`g_i` of the :math:`n` examples,

  .. math::

    D = \sum_i c_i\, \bar a_i g_i^\top, \qquad c = \frac{1}{n}\Big(I + \frac{K}{\lambda}\Big)^{-1} \mathbf 1,
    \qquad K = (\bar A \bar A^\top) \odot (\hat G \hat G^\top), \qquad \lambda = \alpha \lVert K \rVert_F ,

  equivalently :math:`D = \mu (F_\text{emp} + \mu I)^{-1} \nabla W` with :math:`\mu = \lambda / n`
  (see the module docstring): gradient-sized, and SGD's direction as :math:`\alpha \to \infty`. The
  coefficients are solved for in the first epoch and reused for the batch at the same position of
  later epochs (Ou et al. 2024), so a later step costs about what SGD's gradient costs.

  **Damping and learning rate.** The direction is never longer than the gradient, so use SGD's learning
  rate; ``alpha`` in ``0.1 - 10`` trained on every benchmark. Wrap the chain in
  ``optax.apply_if_finite(tx, max_consecutive_errors=5)`` to skip a step that is not finite.

  Args:
    alpha: ``α > 0``, the damping relative to the Gram matrix's Frobenius
      norm (paper eq. 14). Large ``α`` approaches SGD; ``K/λ`` has spectral
      norm at most ``1/α``. A number or an optax schedule of the step count;
      a changed ``α`` applies to the coefficients solved for from then on
      (stored rows keep the ``α`` they were solved with). The default 1.0
      trains with ``optax.sgd(0.1, momentum=0.9)`` on the MLP, CNN and
      Transformer benchmarks (docs: hyperparameter guide).
    steps_per_epoch: number of optimizer steps per epoch: the table has one
      row per step, and step ``k`` uses row ``k mod steps_per_epoch``.
      Required with sharing.
    batch_size: examples per batch (the leading axis of the layer inputs).
      Required with sharing. Batches with fewer examples use the first
      entries of their row; more examples is an error.
    share_coefficients: compute the coefficients only in computing epochs and
      reuse them afterwards (FNGD); ``False`` recomputes them every step.
    refresh_every_epochs: ``R``: recompute the table during epochs
      ``0, R, 2R, …``; ``None``: only during epoch 0.
    phase: ``"auto"`` decides per step from the step counter, inside the
      compiled step (``jax.lax.cond``). ``"inversion"`` always solves for
      and stores the current row, ``"plain"`` always reuses it (the phase
      names of :func:`neuron_optax.foof`): both states have the same structure, so a
      training loop can compile one step with each and pick it on the host
      with ``nox.coefficient_phase(step, steps_per_epoch,
      refresh_every_epochs)``; the reusing step then holds no coefficient
      conditional and no Gram-matrix code at all. Same trajectory as ``"auto"``. A reusing step
      whose row was never computed uses ``1/n`` (SGD's direction).
    kernel_input_ndim: per-layer number of kernel input axes where it is not
      "all but the last" (as in :func:`neuron_optax.foof`).
    contraction: ``"auto"`` (default): ``σ Σ_i c_i ψ_i`` when one run-time check
      per step finds the incoming updates to be ``σ`` times the recorded
      gradient, else :func:`incoming_direction` (the optax contract);
      ``"gradient"``: always :func:`incoming_direction`; ``"rows"``: rebuilt
      from the recorded rows alone (the incoming updates of captured layers
      are not read; fastest, right only when ``fngd`` is first in its chain).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, stats=stats)`` with ``stats`` from
    :func:`neuron_optax.value_grad_and_stats` (any ``fisher``: only the
    true-label cotangents are used).

  Examples:
    One FNGD step (first epoch: the coefficients are solved for and stored in row 0 of the table):

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import neuron_optax as nox
    >>> model = nn.Dense(3)
    >>> x, y = jnp.arange(20.0).reshape(4, 5) / 20, jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> def loss_fn(params):
    ...   logits = model.apply({"params": params}, x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> tx = optax.chain(nox.fngd(1.0, steps_per_epoch=10, batch_size=4), optax.sgd(0.1, momentum=0.9))
    >>> opt_state = tx.init(params)
    >>> loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    >>> jax.tree.map(jnp.shape, opt_state[0].layers)  # one (steps_per_epoch, batch_size) table per layer
    {'<top-level>': FngdLayerState(coefficients=(10, 4))}

  References:
    - X. Ou, C. Zhu, X. Huang and Y. Liu, `Inverse-Free Fast Natural Gradient Descent Method for
      Deep Learning <https://arxiv.org/abs/2403.03473>`__, 2024.
  """
  _validate(alpha, steps_per_epoch, batch_size, share_coefficients, refresh_every_epochs, phase, contraction)

  def init_fn(params) -> FngdState:
    layers = {}
    if share_coefficients:
      for key in param_layout.candidate_layers(params, kernel_input_ndim):
        dtype = param_layout.statistics_dtype(param_layout.kernel_dtype(params, key))
        layers[layer_name(key)] = FngdLayerState(coefficients=jnp.zeros((steps_per_epoch, batch_size), dtype))
    return FngdState(count=jnp.zeros([], jnp.int32), layers=layers)

  def update_fn(updates, state: FngdState, params=None, *, stats: Stats | None = None, **extra_args):
    del params, extra_args
    shapes = param_layout.candidate_layers(updates, kernel_input_ndim)
    stats = param_layout.check_stats(stats, shapes, "fngd", need_rows=True)
    dtypes = {key: param_layout.statistics_dtype(param_layout.kernel_dtype(updates, key)) for key in stats}
    alpha_now = hyperparams.value_at(alpha, state.count)
    alpha_ok = hyperparams.valid(alpha_now)

    def solve(stats, key, dtype):
      c = layer_coefficients(stats[key], alpha_now.astype(dtype), dtype)
      return jnp.where(alpha_ok, c, jnp.nan)  # an invalid α: no step (and no stored row)

    if not share_coefficients:
      coeffs = {key: solve(stats, key, dtypes[key]) for key in stats}
      layers = state.layers
    else:
      tables = _tables(state, stats)
      row = state.count % steps_per_epoch

      def stored():
        reused = {}
        for key, table in tables.items():
          n = stats[key].batch_size
          c = jax.lax.dynamic_index_in_dim(table, row, keepdims=False)[:n]
          # A row never computed (a fresh table reused by phase="plain") is all zeros, which no solve
          # stores: use the mean-gradient coefficients 1/n there, i.e. SGD's direction.
          reused[key] = jnp.where(jnp.all(c == 0), jnp.full_like(c, 1 / n), c)
        return reused, tables

      def compute(stats):
        fresh, new_tables = {}, {}
        for key, table in tables.items():
          n = stats[key].batch_size
          c = solve(stats, key, table.dtype)
          fresh[key] = c
          kept = jnp.where(jnp.all(jnp.isfinite(c)), c, jnp.full_like(c, 1 / n))
          padded = jnp.zeros(table.shape[1:], table.dtype).at[:n].set(kept)
          updated = jax.lax.dynamic_update_index_in_dim(table, padded, row, axis=0)
          new_tables[key] = jnp.where(alpha_ok, updated, table)  # an invalid α stores nothing
        return fresh, new_tables

      computing = amortisation.coefficient_schedule(state.count, steps_per_epoch, refresh_every_epochs, phase, stats)
      coeffs, tables = amortisation.maybe(computing, compute, stored(), stats)
      coeffs = {key: jnp.where(alpha_ok, c, jnp.nan) for key, c in coeffs.items()}  # an invalid α: no step
      layers = dict(state.layers)
      for key, table in tables.items():
        layers[layer_name(key)] = FngdLayerState(coefficients=table)

    def rows_directions(stats):
      return {key: weighted_direction(stats[key], coeffs[key], dtypes[key]) for key in stats}

    def exact_directions(stats):
      return {
        key: incoming_direction(gradients[key], weighted_direction(stats[key], coeffs[key], dtypes[key]), stats[key])
        for key in stats
      }

    gradients = {} if contraction == "rows" else incoming_matrices(updates, shapes, dtypes)
    if contraction == "gradient":
      chosen = exact_directions(stats)
    else:
      chosen = one_decision(gradients, stats, state.count, contraction, rows_directions, exact_directions)

    def direction(key, grad):
      del grad  # read through `gradients` (not at all with contraction="rows")
      return chosen[key]

    directions = param_layout.map_layers(updates, shapes, stats.keys(), direction)
    return directions, FngdState(count=optax.safe_int32_increment(state.count), layers=layers)

  def _tables(state: FngdState, stats: Stats) -> dict[LayerKey, jax.Array]:
    tables = {}
    for key, s in stats.items():
      name = layer_name(key)
      if name not in state.layers:
        raise ValueError(
          f"fngd: the state has no coefficient table for layer {name!r} (tables: "
          f"{sorted(state.layers)}). Initialise the optimizer with the same params it updates."
        )
      table = state.layers[name].coefficients
      if tuple(table.shape) != (steps_per_epoch, batch_size):
        raise ValueError(
          f"fngd: layer {name!r} has a coefficient table of shape {tuple(table.shape)} in the optimizer "
          f"state, but fngd(steps_per_epoch={steps_per_epoch}, batch_size={batch_size}) needs "
          f"{(steps_per_epoch, batch_size)}: the state was built by fngd with other settings (a restored "
          "checkpoint?), and its rows would be reused for the wrong steps or examples. Build the transform "
          "with the steps_per_epoch and batch_size the state was saved with, or start a new table with "
          "tx.init(params)."
        )
      if s.batch_size > table.shape[1]:
        raise ValueError(
          f"fngd: layer {layer_name(key)!r} sees a batch of {s.batch_size} examples, but the "
          f"coefficient table was built for batch_size={table.shape[1]}. Pass the largest batch "
          "size to fngd(batch_size=...) (smaller batches use the first entries of their row)."
        )
      tables[key] = table
    return tables

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
