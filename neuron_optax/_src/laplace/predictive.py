"""Predictives of a Laplace posterior: the linearised model (GLM predictive) and its link approximations."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from neuron_optax._src import hyperparams
from neuron_optax._src.laplace import _trees
from neuron_optax._src.laplace.functions import Structure, draw_noise
from neuron_optax._src.laplace.posteriors import posterior


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


LinkApprox = Literal["probit", "bridge", "mc"]
LINKS = ("probit", "bridge", "mc")
Metric = Literal["nll", "ece"]


class _Predictor:
  """The GLM predictive of one posterior at any ``τ``; the ``τ``-independent parts are computed once.

  Built by :func:`glm_predictive` (one ``τ``) and :func:`grid_search_prior_precision` (a grid), which check their
  own arguments first; the link arguments are checked here.
  """

  def __init__(self, where, apply_fn, params, stats, dataset_size, structure, link_approx, num_samples, key, options):
    hyperparams.check_choice(where, "link_approx", link_approx, LINKS)
    hyperparams.check_integer(where, "num_samples", num_samples, optional=True)
    if link_approx == "mc" and num_samples is None:
      raise ValueError(f"{where}: link_approx='mc' averages over posterior samples; pass num_samples= and key=.")
    self.link_approx = link_approx
    self.post = posterior(where, structure, params, stats, dataset_size, **options)
    # Linearise in the posterior's layers only: the other parameters' tangents stay symbolic zeros, so no
    # unbatched zero tree meets the batched deltas under vmap. That mix is also what miscompiled on XLA:CPU
    # (jaxlib 0.10.2's YNN reduce fusion returned garbage once jitted from ~2k output rows; docs/laplace.md).
    layers = _trees.matrices(where, params, self.post.shapes, self.post.keys, "params")
    self.layer_dtypes = {k: v.dtype for k, v in layers.items()}

    def apply_layers(matrices):
      return apply_fn(_trees.write(params, self.post.shapes, matrices))

    self.mean, self.jvp = jax.linearize(apply_layers, layers)
    if jnp.ndim(self.mean) < 1:
      raise ValueError(f"{where}: apply_fn must return logits with a trailing class axis, got a scalar.")
    self.classes = self.mean.shape[-1]
    self.num_samples = num_samples
    if num_samples is None:
      # Exact functional covariance: one VJP per output (rows of J), O(outputs) of them.
      _, vjp = jax.vjp(apply_layers, layers)
      basis = jnp.eye(self.mean.size, dtype=self.mean.dtype).reshape((self.mean.size,) + self.mean.shape)
      self.rows = {k: v.astype(self.post.dtype) for k, v in jax.vmap(vjp)(basis)[0].items()}
    else:
      if key is None:
        raise ValueError(f"{where}: num_samples={num_samples} draws posterior samples; pass key=.")
      self.noise = draw_noise(key, self.post, num_samples)

  def _outputs(self, matrices):
    """``J m``: the change of the outputs along the posterior layers' matrices ``m``."""
    return self.jvp({k: v.astype(self.layer_dtypes[k]) for k, v in matrices.items()})

  def moments(self, tau):
    """``(μ, diag Σ_f, Σ_f 1, 1ᵀ Σ_f 1)`` per output row, ``(R, C)``, ``(R, C)``, ``(R, C)``, ``(R,)``; or the
    sampled functional deviations ``(S, R, C)`` with ``num_samples``."""
    mean = self.mean.reshape(-1, self.classes).astype(self.post.dtype)
    rows = mean.shape[0]
    if self.num_samples is None:
      cov = jax.vmap(lambda m: self.post.covariance_product(m, tau))(self.rows)
      f = jax.vmap(self._outputs)(cov).reshape(rows, self.classes, rows, self.classes)
      index = jnp.arange(rows)
      f_var = f[index, :, index, :]  # (R, C, C): the blocks of one output row
      return mean, f_var, None
    deltas = self.post.deltas(*self.noise, tau)
    deviations = jax.vmap(self._outputs)(deltas)
    return mean, None, deviations.reshape(self.num_samples, rows, self.classes).astype(self.post.dtype)

  def probabilities(self, tau):
    mean, f_var, deviations = self.moments(tau)
    if self.link_approx == "mc":
      probs = jnp.mean(jax.nn.softmax(mean[None] + deviations, axis=-1), axis=0)
      return probs.reshape(self.mean.shape)
    if f_var is not None:
      diagonal = jnp.diagonal(f_var, axis1=1, axis2=2)
      row_sums = jnp.sum(f_var, axis=-1)
      total = jnp.sum(f_var, axis=(1, 2))
    else:  # Monte-Carlo moments of J δ (the deviations have mean zero exactly)
      diagonal = jnp.mean(deviations**2, axis=0)
      sums = jnp.sum(deviations, axis=-1)
      row_sums = jnp.mean(deviations * sums[..., None], axis=0)
      total = jnp.mean(sums**2, axis=0)
    if self.link_approx == "probit":
      probs = jax.nn.softmax(mean / jnp.sqrt(1 + math.pi / 8 * diagonal), axis=-1)
    else:
      probs = _laplace_bridge(mean, diagonal, row_sums, total)
    return probs.reshape(self.mean.shape)


def _laplace_bridge(mean, diagonal, row_sums, total):
  """Laplace bridge (Hobbhahn et al. 2022) as laplace-torch computes it, after its zero-mean correction.

  ``μ ← μ − Σ_f1 (1ᵀμ)/(1ᵀΣ_f1)``, ``diag Σ_f ← diag Σ_f − (Σ_f1)²/(1ᵀΣ_f1)``, then the Dirichlet
  ``α_k = (1 − 2/K + e^{μ_k} Σ_l e^{−μ_l} / K²) / Σ_kk`` and its mean ``α / Σ α``.
  """
  k = mean.shape[-1]
  total = total[..., None]
  mean = mean - row_sums * jnp.sum(mean, axis=-1, keepdims=True) / total
  diagonal = diagonal - row_sums**2 / total
  alpha = (1 - 2 / k + jnp.exp(mean) / k**2 * jnp.sum(jnp.exp(-mean), axis=-1, keepdims=True)) / diagonal
  return jnp.nan_to_num(alpha / jnp.sum(alpha, axis=-1, keepdims=True), nan=1.0)


def glm_predictive(
  apply_fn: Callable[[Any], jax.Array],
  params,
  stats,
  *,
  prior_precision,
  dataset_size,
  structure: Structure = "full",
  link_approx: LinkApprox = "probit",
  num_samples: int | None = None,
  key: jax.Array | None = None,
  output_scale=None,
  max_columns: int | None = 4096,
) -> jax.Array:
  r"""Class probabilities of the GLM (linearised) Laplace predictive (Immer et al. 2021; laplace-torch's ``"glm"``).

  The linearised model ``f_lin(θ) = f(θ*) + J(θ − θ*)`` under the posterior ``N(θ*, Λ⁻¹)`` has Gaussian logits
  ``N(μ, Σ_f)``, ``μ = f(θ*)``, ``Σ_f = J Λ⁻¹ Jᵀ`` per output row; the softmax of a Gaussian is approximated by

  .. math::

     \text{probit:}\quad p = \operatorname{softmax}\big(\mu / \sqrt{1 + \tfrac{\pi}{8}\operatorname{diag}\Sigma_f}\big)
     \qquad \text{mc:}\quad p = \tfrac{1}{S}\textstyle\sum_s \operatorname{softmax}(\mu + J\delta_s)

  or the Laplace bridge (``"bridge"``, a Dirichlet matched to ``N(μ, Σ_f)``, laplace-torch's form with its
  zero-mean correction). With ``num_samples=None`` ``Σ_f`` is exact: one VJP per output (a row of ``J``), one
  posterior covariance product and one JVP each, ``O(outputs)`` of them (memory
  ``O(outputs · (d + outputs))`` for ``outputs = rows × classes``): for few classes and inputs, e.g. tests
  and small evaluation batches.
  With ``num_samples=S`` no row of ``J`` is formed: ``S`` exact posterior samples ``δ_s`` (as
  :func:`laplace_sample` draws them) are pushed through one JVP each, and ``mc`` averages their softmax while
  ``probit``/``bridge`` use the sample moments of ``Jδ`` (``diag Σ_f``, ``Σ_f1``, ``1ᵀΣ_f1``; ``O(S·C)``
  memory): the form for a large vocabulary.

  Args:
    apply_fn: ``params -> logits`` of shape ``(..., classes)`` (close over the inputs).
    params: the MAP ``θ*``.
    stats: as for :func:`laplace_sample` (the posterior's layers; other parameters are held fixed).
    prior_precision: ``τ > 0``.
    dataset_size: ``N > 0`` (as for :func:`laplace_sample`).
    structure: as for :func:`laplace_sample`.
    link_approx: ``"probit"``, ``"bridge"`` or ``"mc"`` (needs ``num_samples``).
    num_samples: ``None`` (exact ``Σ_f``) or the number of posterior samples.
    key: a PRNG key (with ``num_samples``).
    output_scale, max_columns: as for :func:`laplace_sample`.

  Returns:
    Probabilities shaped like ``apply_fn``'s logits.

  Examples:
    >>> apply_fn = lambda p: model.apply({"params": p}, x_test)
    >>> probs = nox.glm_predictive(apply_fn, params, stats, prior_precision=1.0, dataset_size=60000)  # doctest: +SKIP

  References:
    A. Immer, M. Korzepa, M. Bauer, "Improving predictions of Bayesian neural nets via local linearization",
    AISTATS 2021; D. MacKay, "The evidence framework applied to classification networks", 1992 (probit);
    M. Hobbhahn, A. Kristiadi, P. Hennig, "Fast predictive uncertainty for classification with Bayesian deep
    networks", UAI 2022 (Laplace bridge); E. Daxberger et al., "Laplace Redux", NeurIPS 2021.
  """
  where = "glm_predictive"
  options = dict(output_scale=output_scale, max_columns=max_columns)
  hyperparams.check_positive_scalar(where, "prior_precision", prior_precision)
  predictor = _Predictor(
    where, apply_fn, params, stats, dataset_size, structure, link_approx, num_samples, key, options
  )
  return predictor.probabilities(prior_precision)


def negative_log_likelihood(probabilities: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean ``−log p(y)`` of integer ``labels`` under ``probabilities`` ``(..., classes)``."""
  picked = jnp.take_along_axis(probabilities, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.mean(jnp.log(jnp.maximum(picked, jnp.finfo(probabilities.dtype).tiny)))


def expected_calibration_error(probabilities: jax.Array, labels: jax.Array, *, num_bins: int = 15) -> jax.Array:
  r"""Expected calibration error of the top-class confidence (Naeini et al. 2015; Guo et al. 2017).

  .. math:: \mathrm{ECE} = \sum_b \frac{|B_b|}{n} \big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|

  over ``num_bins`` equal-width confidence bins ``(b/B, (b+1)/B]``.
  """
  hyperparams.check_integer("expected_calibration_error", "num_bins", num_bins)
  probs = probabilities.reshape(-1, probabilities.shape[-1])
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels.reshape(-1)).astype(probs.dtype)
  bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  # Σ_b |B_b|/n |acc_b − conf_b| = Σ_b |Σ_{i∈B_b} (correct_i − conf_i)| / n
  gap = jax.ops.segment_sum(correct - confidence, bins, num_segments=num_bins)
  return jnp.sum(jnp.abs(gap)) / confidence.shape[0]


def grid_search_prior_precision(
  apply_fn: Callable[[Any], jax.Array],
  params,
  stats,
  labels: jax.Array,
  *,
  dataset_size,
  grid=None,
  metric: Metric = "nll",
  structure: Structure = "full",
  link_approx: LinkApprox = "probit",
  num_samples: int | None = None,
  key: jax.Array | None = None,
  output_scale=None,
  max_columns: int | None = 4096,
) -> tuple[jax.Array, jax.Array]:
  """The prior precision ``τ`` of ``grid`` whose GLM predictive scores best on validation data.

  laplace-torch's ``optimize_prior_precision(method="gridsearch")``: the validation negative log-likelihood
  (``metric="nll"``) or expected calibration error (``"ece"``) of :func:`glm_predictive` at every ``τ`` in
  ``grid``; the posterior, ``J``'s rows (exact mode) or the sample noise (``num_samples``: common random numbers
  across ``τ``) are computed once. The marginal-likelihood alternative is :func:`tune_prior_precision`.

  Args:
    apply_fn: ``params -> logits`` on the validation inputs.
    params, stats, dataset_size, structure, link_approx, num_samples, key, output_scale, max_columns: as for
      :func:`glm_predictive`.
    labels: integer validation labels, shaped like the logits without their class axis.
    grid: the candidate ``τ`` (default ``logspace(-4, 4, 21)``).
    metric: ``"nll"`` or ``"ece"``.

  Returns:
    ``(τ, scores)``: the best ``τ`` (the smallest score, first on ties) and the score at every grid point.
  """
  where = "grid_search_prior_precision"
  options = dict(output_scale=output_scale, max_columns=max_columns)
  hyperparams.check_choice(where, "metric", metric, ("nll", "ece"))
  predictor = _Predictor(
    where, apply_fn, params, stats, dataset_size, structure, link_approx, num_samples, key, options
  )
  grid = (
    jnp.logspace(-4, 4, 21, dtype=predictor.post.dtype) if grid is None else jnp.asarray(grid, predictor.post.dtype)
  )
  if grid.ndim != 1 or grid.shape[0] < 1:
    raise ValueError(f"{where}: grid must be a non-empty 1-D sequence of prior precisions, got shape {grid.shape}.")
  score = negative_log_likelihood if metric == "nll" else expected_calibration_error

  def evaluate(tau):
    return score(predictor.probabilities(tau), labels)

  scores = jax.lax.map(evaluate, grid)
  return grid[jnp.argmin(jnp.where(jnp.isnan(scores), jnp.inf, scores))], scores
