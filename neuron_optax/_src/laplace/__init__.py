"""Laplace posteriors and fast Fisher products (Benzing 2022, App. C).

The same columns and linear algebra as :func:`neuron_optax.natural_gradient`.
For every captured layer the Fisher cotangents ``g`` (``(S, n, P, d_out)``,
``LayerStats.per_example_cotangents``) and the bias-augmented inputs ``ā``
(``(n, P, d_in)``) give one column per label set ``s`` and example ``i``,
``j = (s, i)``, ``m = S·n`` columns::

    ψ_j = Σ_p ā_ip g_sipᵀ          F = (1/n) Σ_j ψ_j ψ_jᵀ = (1/n) Ψ Ψᵀ          K = ΨᵀΨ  (m × m)

with ``n`` the size of the Fisher batch. ``K`` is a sum over layers of
``linalg.gradient_gram``; products ``Ψᵀv`` and ``Ψc`` are ``gradient_dots`` and
``weighted_gradient_sum``, so no dense per-example gradient is formed.

Vectors are trees shaped like the parameters (dict, ``FrozenDict``,
``nnx.State``). Only the ``kernel``/``bias`` leaves of the layers in ``stats``
are part of ``F``; every other leaf is ignored on input and returned as zeros
by the Fisher products (the samplers return it unchanged, broadcast along the
sample axis: those parameters are held at their value).

Transformers. Every copy of an ``nn.scan``/``nnx.scan``-stacked layer is a
layer of its own (its own columns' block, its own Kronecker factors, named
``'cells/mlp[2]'``), as the optimizers treat it. An ``nn.Embed`` table is a
bias-free dense layer on one-hot rows, kept as token ids: its Gram block is
token equality and its Kronecker input factor the diagonal of token
frequencies. A table tied to an output layer (``Embed.attend``) is exact in
``"full"`` and ``"diagonal"`` (its columns carry both uses); the Kronecker
structures raise ``NotImplementedError`` for it (no single ``A ⊗ G`` holds
both uses). With ``P`` output positions per example (tokens), the captured
Fisher is that of each example's negative log-likelihood *averaged* over its
positions, ``(1/n) Σ_i (1/P²) Σ_p J_ipᵀ H_ip J_ip``; the curvature of the
log-likelihood *summed* over ``N`` sequences is ``N P² F``, so pass
``dataset_size=N * P**2`` for a posterior over whole sequences.

Fisher products (App. C.2, C.3)::

    F v           = (1/n) Ψ (Ψᵀ v)
    (F + λI)⁻¹ v  = (v − Ψ c) / λ,    c = (K + nλI)⁻¹ Ψᵀ v                  (Woodbury)

Laplace posterior (App. C.1). With a Gaussian prior ``N(0, τ⁻¹ I)`` on the
captured parameters, ``N`` training examples and the mini-batch Fisher as the
per-example curvature, the posterior around the MAP ``θ*`` is ``N(θ*, Λ⁻¹)``
with precision::

    Λ = τI + N F = τI + U Uᵀ,    U = √(N/n) Ψ

An exact sample costs one prior draw, ``m`` standard normals and one ``m × m``
solve (Matheron's rule; Hoffman & Ribak 1991, Doucet 2010)::

    θ₀ = ε / √τ,  ε ~ N(0, I_d);    ζ ~ N(0, I_m)
    c  = (K + (nτ/N) I)⁻¹ (Ψᵀθ₀ + √(n/N) ζ)
    θ  = θ* + θ₀ − Ψ c

``Cov(θ) = τ⁻¹I − τ⁻¹U(I + UᵀU/τ)⁻¹Uᵀτ⁻¹ = Λ⁻¹`` by Woodbury: the sample is
exact for the subsampled Fisher. Cost ``O(m² Σ_ℓ(d_in + d_out) + m³)`` plus
``O(m Σ_ℓ d_in d_out)`` per sample for dense layers.

Log marginal likelihood (MacKay 1992; the form of laplace-torch, Daxberger et
al. 2021), by the matrix determinant lemma on the ``m × m`` Gram::

    log p(D) ≈ log p(D | θ*) − ½ (τ ‖θ*‖² + log det Λ − d log τ)
    log det Λ − d log τ = log det(I_m + (N / (nτ)) K) = Σ_k log(1 + N e_k / (nτ))

(``e_k``: eigenvalues of ``K``). :func:`tune_prior_precision` maximises it
over ``τ``; in ``u = log τ`` it is strictly concave for every structure below
except ``"kfac_heuristic"``.

Structured posteriors (``structure=``), per captured layer (block diagonal),
from Kronecker factors ``A = mean_r ā_r ā_rᵀ`` and ``G`` (see
:func:`kronecker_factors`; for layers with ``P`` positions per example ``G`` is
summed over positions, so that ``A ⊗ G`` approximates the per-example Fisher as
in KFC), with ``A = U_A diag(a) U_Aᵀ``, ``G = U_G diag(g) U_Gᵀ``, ``vec``
row-major::

    "diagonal"        Λ = τI + N diag(F)
    "kfac"            Λ = τI + N A ⊗ G                              (Ritter et al. 2018, standard damping)
    "kfac_heuristic"  Λ = N (A + π√(τ/N) I) ⊗ (G + √(τ/N)/π I),  π = √((tr A/dim A)/(tr G/dim G))
    "input_factor"    Λ = τI + N ḡ A ⊗ I,  ḡ = tr G / d_out         (FOOF-like, App. G)

(``"kfac_heuristic"`` with ``π = 1`` is Ritter et al.'s
``(√N A + √τ I) ⊗ (√N G + √τ I)``.) A sample is ``θ* + U_A (Z ⊘ √λ_ij) U_Gᵀ``
with ``Z`` standard normal and ``λ_ij`` the eigenvalues of ``Λ`` in the
Kronecker eigenbasis.

References: F. Benzing, "Gradient Descent on Neurons and its Link to
Approximate Second-Order Optimization", ICML 2022, App. C, G, I; Y. Hoffman
and E. Ribak, "Constrained realizations of Gaussian fields", ApJ 1991;
A. Doucet, "A note on efficient conditional simulation of Gaussian
distributions", 2010; D. MacKay, "A practical Bayesian framework for
backpropagation networks", 1992; H. Ritter, A. Botev, D. Barber, "A scalable
Laplace approximation for neural networks", ICLR 2018; E. Daxberger et al.,
"Laplace Redux", NeurIPS 2021; A. Immer, M. Korzepa, M. Bauer, "Improving
predictions of Bayesian neural nets via local linearization", AISTATS 2021.
"""

from neuron_optax._src.laplace.factors import KroneckerFactors, kronecker_factors
from neuron_optax._src.laplace.functions import (
  Structure,
  laplace_log_marginal_likelihood,
  laplace_sample,
  laplace_sample_from_noise,
  tune_prior_precision,
)
from neuron_optax._src.laplace.posteriors import STRUCTURES
from neuron_optax._src.laplace.predictive import (
  LinkApprox,
  expected_calibration_error,
  glm_predictive,
  grid_search_prior_precision,
  linearized_predictive,
  negative_log_likelihood,
)
from neuron_optax._src.laplace.products import damped_fisher_solve, fisher_diagonal, fisher_vector_product

__all__ = [
  "STRUCTURES",
  "KroneckerFactors",
  "Structure",
  "damped_fisher_solve",
  "fisher_diagonal",
  "fisher_vector_product",
  "kronecker_factors",
  "laplace_log_marginal_likelihood",
  "laplace_sample",
  "laplace_sample_from_noise",
  "linearized_predictive",
  "glm_predictive",
  "grid_search_prior_precision",
  "expected_calibration_error",
  "negative_log_likelihood",
  "LinkApprox",
  "tune_prior_precision",
]
