"""The public Laplace functions: samples, evidence and prior precision (Benzing 2022, App. C.1)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from neuron_optax._src import hyperparams
from neuron_optax._src.laplace import _trees
from neuron_optax._src.laplace.posteriors import Posterior, posterior

Structure = Literal["full", "diagonal", "kfac", "kfac_heuristic", "input_factor"]


def laplace_sample(
  key: jax.Array,
  params,
  stats,
  *,
  prior_precision,
  dataset_size,
  num_samples: int = 1,
  structure: Structure = "full",
  output_scale=None,
  max_columns: int | None = 4096,
):
  """Samples of the Laplace posterior ``N(θ*, (τI + N F)⁻¹)`` around ``params`` (Benzing 2022, App. C.1).

  ``structure="full"`` (default) is exact for the mini-batch Fisher of
  ``stats``, by Matheron's rule (Hoffman & Ribak 1991, Doucet 2010)::

      θ₀ = ε/√τ,  ζ ~ N(0, I_m),  c = (K + (nτ/N) I)⁻¹ (Ψᵀθ₀ + √(n/N) ζ),  θ = θ* + θ₀ − Ψc

  one prior draw and one ``m × m`` solve; ``Cov θ = (τI + N F)⁻¹`` exactly.
  Cost ``O(m² Σ_ℓ(d_in + d_out) + m³)`` once plus ``O(m Σ_ℓ d_in d_out)`` per
  sample (dense layers). The other structures (``"diagonal"``, ``"kfac"``,
  ``"kfac_heuristic"``, ``"input_factor"``) sample their layer-wise posteriors
  (module docstring); they cost ``O(d_in³ + d_out³)`` per layer once and one
  rotation per sample.

  Args:
    key: a PRNG key.
    params: the MAP parameters ``θ*`` (the posterior mean).
    stats: from :func:`neuron_optax.value_grad_and_stats` (use
      ``fisher="full"`` or ``"mc"`` for the Fisher / GGN; the empirical Fisher
      is possible but biased). For the Kronecker structures also the result
      of :func:`kronecker_factors` (e.g. of a KFAC state).
    prior_precision: ``τ > 0`` of the prior ``N(0, τ⁻¹ I)`` on the captured
      parameters (see :func:`tune_prior_precision`).
    dataset_size: ``N > 0``, the number of training examples the likelihood
      sums over (``F`` is the per-example Fisher). With ``P`` output positions
      per example (tokens) ``F`` is that of the NLL averaged over positions:
      pass ``N * P**2`` for the log-likelihood summed over all tokens
      (:mod:`neuron_optax._src.laplace`, "Transformers").
    num_samples: number of samples (the leading axis of the result).
    structure: ``"full"``, ``"diagonal"``, ``"kfac"``, ``"kfac_heuristic"`` or
      ``"input_factor"``.
    output_scale: ``"input_factor"`` only: the isotropic output curvature ``ḡ``
      (default ``tr G / d_out``).
    max_columns: ``"full"`` only: the largest allowed ``m`` (``None``: no limit).

  Returns:
    A tree like ``params`` whose leaves have a leading axis of ``num_samples``:
    samples on the captured layers' ``kernel``/``bias`` leaves (the layers in
    the factors for Kronecker structures), every other leaf ``params``'s value
    broadcast (held fixed).
  """
  where = "laplace_sample"
  hyperparams.check_integer(where, "num_samples", num_samples)
  _check_prior_precision(where, prior_precision)
  post = posterior(where, structure, params, stats, dataset_size, output_scale=output_scale, max_columns=max_columns)
  prior_noise, likelihood_noise = draw_noise(key, post, num_samples)
  return post.samples(post.deltas(prior_noise, likelihood_noise, prior_precision))


def _check_prior_precision(where: str, prior_precision) -> None:
  hyperparams.check_positive_scalar(
    where, "prior_precision", prior_precision, explain=" (the prior is N(0, 1/prior_precision I))"
  )


def draw_noise(key, post: Posterior, num_samples: int):
  """Standard normal prior noise per layer ``(s, d_in, d_out)`` and likelihood noise ``(s, m)`` (full only).

  One ``jax.random.normal`` call for everything, sliced (each call adds its own
  copy of the generator to the compiled program).
  """
  sizes = [post.theta[k].size for k in post.keys]
  m = post.noise_columns
  noise = jax.random.normal(key, (num_samples, sum(sizes) + m), post.dtype)
  prior, start = {}, 0
  for k, size in zip(post.keys, sizes):
    prior[k] = noise[:, start : start + size].reshape((num_samples,) + post.theta[k].shape)
    start += size
  return prior, (noise[:, start:] if m else None)


def laplace_sample_from_noise(
  params,
  stats,
  prior_noise,
  likelihood_noise=None,
  *,
  prior_precision,
  dataset_size,
  structure: Structure = "full",
  output_scale=None,
  max_columns: int | None = 4096,
):
  """One Laplace sample as a linear function of standard-normal noise (what :func:`laplace_sample` draws).

  ``θ = θ* + L(ε, ζ)`` with ``L`` linear and ``L Lᵀ = Λ⁻¹`` (module docstring), so
  ``ε ~ N(0, I_d)``, ``ζ ~ N(0, I_m)`` give an exact posterior sample; with
  fixed noise the map is deterministic and differentiable (its Jacobian
  ``J`` satisfies ``J Jᵀ = Λ⁻¹``, which the tests check).

  Args:
    params: the MAP parameters ``θ*``.
    stats: as for :func:`laplace_sample`.
    prior_noise: a tree shaped like ``params`` (only the captured layers'
      leaves are read): ``ε``.
    likelihood_noise: ``ζ``, shape ``(m,)`` with ``m = S·n`` the Fisher's
      columns; ``"full"`` only (``None`` elsewhere).
    prior_precision, dataset_size, structure, output_scale, max_columns: as for
      :func:`laplace_sample`.

  Returns:
    A tree like ``params`` (no sample axis): the sample on the posterior's
    layers, ``params`` elsewhere.
  """
  where = "laplace_sample_from_noise"
  _check_prior_precision(where, prior_precision)
  post = posterior(where, structure, params, stats, dataset_size, output_scale=output_scale, max_columns=max_columns)
  prior = _trees.matrices(where, prior_noise, post.shapes, post.keys, "prior_noise")
  prior = {k: v.astype(post.dtype)[None] for k, v in prior.items()}
  if post.noise_columns:
    if likelihood_noise is None or jnp.shape(likelihood_noise) != (post.noise_columns,):
      raise ValueError(
        f"{where}: structure={structure!r} needs likelihood_noise of shape ({post.noise_columns},) (one standard "
        f"normal per Fisher column), got {None if likelihood_noise is None else jnp.shape(likelihood_noise)}."
      )
    likelihood_noise = jnp.asarray(likelihood_noise, post.dtype)[None]
  elif likelihood_noise is not None:
    raise ValueError(f"{where}: likelihood_noise is only used by structure='full'; pass None for {structure!r}.")
  samples = post.samples(post.deltas(prior, likelihood_noise, prior_precision))
  return jax.tree_util.tree_map(lambda leaf: leaf[0], samples)


def laplace_log_marginal_likelihood(
  params,
  stats,
  *,
  log_likelihood,
  prior_precision,
  dataset_size,
  structure: Structure = "full",
  output_scale=None,
  max_columns: int | None = 4096,
) -> jax.Array:
  """Laplace approximation of the log marginal likelihood (evidence) ``log p(D | τ)``.

  ::

      log p(D) ≈ log p(D | θ*) − ½ (τ ‖θ*‖² + log det Λ − d log τ)

  (MacKay 1992; laplace-torch's ``log_likelihood − ½(log_det_ratio +
  scatter)``, Daxberger et al. 2021), ``d`` the number of parameters in the
  posterior and ``‖θ*‖²`` over them. For ``"full"`` the determinant lemma gives
  ``log det Λ − d log τ = Σ_k log(1 + N e_k / (nτ))`` with ``e_k`` the
  eigenvalues of the ``m × m`` Gram ``K`` (cost ``O(m³)``); the structured
  posteriors use their Kronecker or diagonal eigenvalues. Differentiable in
  ``prior_precision`` and ``log_likelihood``.

  Args:
    params: the MAP parameters ``θ*``.
    stats: as for :func:`laplace_sample`.
    log_likelihood: ``log p(D | θ*)`` summed over the ``N`` training examples,
      e.g. ``-dataset_size * mean_nll`` (it does not depend on ``τ``).
    prior_precision: ``τ > 0`` (a traced value is fine, e.g. under ``jax.grad``).
    dataset_size: ``N > 0`` (as for :func:`laplace_sample`).
    structure, output_scale, max_columns: as for :func:`laplace_sample`.

  Returns:
    A scalar.
  """
  where = "laplace_log_marginal_likelihood"
  _check_prior_precision(where, prior_precision)
  post = posterior(where, structure, params, stats, dataset_size, output_scale=output_scale, max_columns=max_columns)
  return post.prepare_log_det().log_marginal_likelihood(log_likelihood, prior_precision)


def tune_prior_precision(
  params,
  stats,
  *,
  dataset_size,
  structure: Structure = "full",
  bounds: tuple[float, float] = (1e-4, 1e6),
  grid_points: int = 101,
  refine_steps: int = 60,
  output_scale=None,
  max_columns: int | None = 4096,
) -> jax.Array:
  """The prior precision ``τ`` that maximises :func:`laplace_log_marginal_likelihood`.

  The objective ``−½(τ‖θ*‖² + log det Λ(τ) − d log τ)`` (``log p(D|θ*)`` does
  not depend on ``τ``) is evaluated on a log-spaced grid of ``grid_points``
  values in ``bounds``, then refined by golden-section search on ``log τ``
  between the best grid point's neighbours. The curvature is factorised once
  (``"full"``: eigenvalues of the ``m × m`` Gram; Kronecker structures: of
  ``A`` and ``G``), so each evaluation is cheap. For every structure with
  ``Λ = τI + N C`` (all but ``"kfac_heuristic"``) the objective is strictly
  concave in ``u = log τ``: its derivative ``½(Σ_k N c_k/(τ + N c_k) − τ‖θ*‖²)``
  (MacKay's effective number of parameters minus ``τ‖θ*‖²``) decreases in
  ``τ``, so the maximiser is unique and found to float precision. (laplace-torch
  runs gradient steps on ``log τ`` instead.) A result at a bound means the
  maximiser lies outside ``bounds``.

  Args:
    params: the MAP parameters ``θ*``.
    stats: as for :func:`laplace_sample`.
    dataset_size: ``N > 0`` (as for :func:`laplace_sample`).
    structure: as for :func:`laplace_sample`.
    bounds: ``(lowest, highest)`` prior precision searched.
    grid_points: grid size (at least 3).
    refine_steps: golden-section iterations.
    output_scale, max_columns: as for :func:`laplace_sample`.

  Returns:
    ``τ`` as a scalar array (jit-compatible).
  """
  where = "tune_prior_precision"
  lo, hi = hyperparams.check_pair(where, "bounds", bounds)
  hyperparams.check_integer(where, "grid_points", grid_points, minimum=3)
  hyperparams.check_integer(where, "refine_steps", refine_steps, minimum=0)
  post = posterior(where, structure, params, stats, dataset_size, output_scale=output_scale, max_columns=max_columns)
  post = post.prepare_log_det()

  def objective(u):
    return post.log_marginal_likelihood(0.0, jnp.exp(u))

  grid = jnp.linspace(math.log(lo), math.log(hi), grid_points, dtype=post.dtype)
  values = jax.vmap(objective)(grid) if post.vectorise_tau else jax.lax.map(objective, grid)
  best = jnp.argmax(jnp.where(jnp.isfinite(values), values, -jnp.inf))
  left = grid[jnp.maximum(best - 1, 0)]
  right = grid[jnp.minimum(best + 1, grid_points - 1)]
  ratio = (math.sqrt(5) - 1) / 2

  def golden(_, bracket):
    a, b = bracket
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    keep_left = objective(c) >= objective(d)
    return jnp.where(keep_left, a, c), jnp.where(keep_left, d, b)

  a, b = jax.lax.fori_loop(0, refine_steps, golden, (left, right))
  candidates = jnp.stack([grid[best], (a + b) / 2])
  scores = jnp.stack([values[best], objective((a + b) / 2)])
  return jnp.exp(candidates[jnp.argmax(scores)])
