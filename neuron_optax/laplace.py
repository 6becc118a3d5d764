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

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from neuron_optax import hyperparams, kronecker, linalg, param_layout
from neuron_optax.layer_stats import LayerKey, LayerStats, Stats, layer_name

Structure = Literal["full", "diagonal", "kfac", "kfac_heuristic", "input_factor"]
STRUCTURES = ("full", "diagonal", "kfac", "kfac_heuristic", "input_factor")


class KroneckerFactors(NamedTuple):
  """One layer's Kronecker factors for a structured Laplace posterior (``A ⊗ G ≈`` per-example Fisher).

  Attributes:
    a: ``(d_in, d_in)`` input factor ``A`` (bias row included).
    g: ``(d_out, d_out)`` output factor ``G``, or ``None`` where only ``A`` is
      known (a FOOF state): then only ``structure="input_factor"`` with an
      explicit ``output_scale`` works.
  """

  a: jax.Array
  g: jax.Array | None


Factors = Mapping[str, KroneckerFactors]


# --------------------------------------------------------------------------- #
# Validation and tree access
# --------------------------------------------------------------------------- #


def _check_positive(where: str, name: str, value: Any, explain: str = "") -> None:
  """``value > 0`` for Python numbers and concrete arrays; traced values are not checked."""
  if isinstance(value, jax.core.Tracer):
    return
  if hyperparams.is_number(value):
    hyperparams.check_positive(where, name, value, finite=True, explain=explain)
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
    number = np.asarray(value).item()
    if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number) and number > 0:
      return
  raise ValueError(f"{where}: {name} must be a positive finite number{explain}, got {value!r}.")


def _check_structure(where: str, structure: str) -> None:
  hyperparams.check_choice(where, "structure", structure, STRUCTURES)


def _is_stats(stats: Any) -> bool:
  """A non-empty ``{layer key: LayerStats}`` (the recorded rows are available)."""
  return isinstance(stats, Mapping) and bool(stats) and all(isinstance(v, LayerStats) for v in stats.values())


def _is_moments(stats: Any) -> bool:
  """Layer statistics with at least second moments (``LayerStats`` or rowless moments)."""
  return (
    isinstance(stats, Mapping)
    and bool(stats)
    and all(hasattr(v, "input_moment") and hasattr(v, "cotangent_moment") for v in stats.values())
  )


def _is_factors(stats: Any) -> bool:
  return isinstance(stats, Mapping) and bool(stats) and all(isinstance(v, KroneckerFactors) for v in stats.values())


def _check_supported(where: str, stats: Mapping) -> None:
  """Stacked layers and embeddings are not handled by the Laplace tools yet."""
  unsupported = sorted(
    layer_name(key) for key, s in stats.items() if getattr(s, "stack_shape", ()) or getattr(s, "kind", "") == "embed"
  )
  if unsupported:
    raise NotImplementedError(
      f"{where}: layers {unsupported} are stacked (nn.scan/nn.vmap) or embeddings, which the Laplace tools do "
      "not handle yet. Pass a sub-dict of stats without them (those parameters are then held at the MAP)."
    )


def _layers(where: str, tree, stats, what: str) -> tuple[dict[LayerKey, param_layout.LayerShape], list[LayerKey]]:
  """Shapes of ``tree``'s candidate layers and the keys of ``stats``, validated."""
  if stats is None or (isinstance(stats, Mapping) and not stats):
    raise ValueError(
      f"{where}: `stats` is empty; compute it with `_, _, stats = nox.value_grad_and_stats(loss_fn, "
      "fisher=...)(params, ...)` on the model whose Fisher you want (it must capture at least one layer)."
    )
  if not _is_stats(stats):
    raise TypeError(
      f"{where}: `stats` must be the dict returned by nox.value_grad_and_stats, got {type(stats).__name__}."
    )
  _check_supported(where, stats)
  shapes = param_layout.candidate_layers(tree)
  missing = sorted(layer_name(k) for k in stats if k not in shapes)
  if missing:
    raise ValueError(
      f"{where}: `{what}` has no kernel for the captured layers {missing} (its layers with kernels: "
      f"{sorted(layer_name(k) for k in shapes)}). `{what}` must be a tree shaped like the parameters that "
      "`stats` were computed with (the 'params' collection, not the whole variables dict)."
    )
  param_layout.check_stats(stats, shapes, f"{where} ({what})")
  return shapes, list(stats)


def _columns(where: str, stats: Stats, keys, dtype, max_columns: int | None):
  """``(inputs, cotangents, S, n)`` of the Fisher columns, checked for one column set and ``m``."""
  inputs = {k: stats[k].augmented_inputs(dtype) for k in keys}
  cots = {k: stats[k].per_example_cotangents(dtype) for k in keys}
  columns = {k: cots[k].shape[:2] for k in keys}
  if len(set(columns.values())) > 1:
    raise ValueError(
      f"{where}: the captured layers disagree on (label sets, examples) "
      f"{ {layer_name(k): v for k, v in columns.items()} }, so their per-example gradients are not columns "
      "of one Fisher. Keep the example axis leading in every captured layer (e.g. do not reshape inputs to "
      "(batch * tokens, features)), or use a layer-wise structure such as structure='kfac'."
    )
  sets, n = columns[keys[0]]
  if max_columns is not None and sets * n > max_columns:
    raise ValueError(
      f"{where}: the Fisher has m = {sets * n} columns (label sets x examples) > max_columns = "
      f"{max_columns}; the m x m system needs O(m²) memory and O(m³) time. Use fisher='mc' (one sampled "
      "label per output) instead of 'full', compute the stats on fewer examples, or raise max_columns."
    )
  return inputs, cots, sets, n


def _dtype(matrices: Mapping[Any, jax.Array]):
  return param_layout.statistics_dtype(jnp.result_type(*matrices.values()))


def _write(tree, shapes, matrices: Mapping[LayerKey, jax.Array], fill: Callable[[jax.Array], jax.Array]):
  """``tree`` with the layers in ``matrices`` replaced by them and every other leaf mapped by ``fill``.

  ``matrices[key]`` has shape ``(..., d_in, d_out)``; leading (sample) axes
  are kept in the leaves, and ``fill`` must produce them for the other leaves.
  """
  flat = param_layout.flatten(tree)
  leaves = {path: fill(leaf) for path, leaf in flat.leaves.items()}
  for key, matrix in matrices.items():
    shape = shapes[key]
    lead = matrix.shape[:-2]
    rows = shape.d_in - int(shape.has_bias)
    kernel = flat.leaves[key + ("kernel",)]
    leaves[key + ("kernel",)] = matrix[..., :rows, :].reshape(lead + kernel.shape).astype(kernel.dtype)
    if shape.has_bias:
      bias = flat.leaves[key + ("bias",)]
      leaves[key + ("bias",)] = matrix[..., rows, :].reshape(lead + bias.shape).astype(bias.dtype)
  return flat.rebuild(leaves)


def _zeros(leaf):
  return jnp.zeros_like(leaf)


# --------------------------------------------------------------------------- #
# Fisher products
# --------------------------------------------------------------------------- #


def fisher_vector_product(stats: Stats, vector):
  """``F v`` for the mini-batch Fisher ``F = (1/n) Σ_j ψ_j ψ_jᵀ``, without forming ``F``.

  ``F v = (1/n) Ψ (Ψᵀ v)``: per layer one ``Ψᵀ v`` contraction
  (``linalg.gradient_dots``) and one weighted-input sum
  (``linalg.weighted_gradient_sum``); dense per-example gradients are never
  formed. Cost ``O(m Σ_ℓ P·d_in·d_out)`` for ``m = S·n`` columns. Useful for
  EWC-style penalties ``vᵀFv`` (Benzing 2022, App. C.2).

  Args:
    stats: from :func:`neuron_optax.value_grad_and_stats` (``fisher=`` picks
      the empirical, Monte-Carlo or full Fisher).
    vector: a tree shaped like the parameters ``stats`` were computed with.

  Returns:
    ``F v`` shaped like ``vector``: the captured layers' ``kernel``/``bias``
    leaves hold the product, every other leaf is zeros (those parameters are
    not part of ``F``).
  """
  where = "fisher_vector_product"
  shapes, keys = _layers(where, vector, stats, "vector")
  v = param_layout.gradient_matrices(vector, shapes, keys)
  dtype = _dtype(v)
  inputs, cots, _, n = _columns(where, stats, keys, dtype, None)
  dots = sum(linalg.gradient_dots(inputs[k], cots[k], v[k].astype(dtype)) for k in keys)
  out = {k: linalg.weighted_gradient_sum(inputs[k], cots[k], dots) / n for k in keys}
  return _write(vector, shapes, out, _zeros)


def damped_fisher_solve(stats: Stats, vector, damping, *, max_columns: int | None = 4096):
  """``(F + λI)⁻¹ v`` for the mini-batch Fisher, by the Woodbury identity.

  ``(F + λI)⁻¹ v = (v − Ψ c) / λ`` with ``c = (K + nλI)⁻¹ Ψᵀ v`` and
  ``K = ΨᵀΨ`` (``m × m``, Cholesky; eigendecomposition fallback), as in
  :func:`neuron_optax.natural_gradient` (Benzing 2022, App. I). Cost
  ``O(m² Σ_ℓ (d_in + d_out) + m³)`` for dense layers.

  Args:
    stats: from :func:`neuron_optax.value_grad_and_stats`.
    vector: a tree shaped like the parameters.
    damping: ``λ > 0``.
    max_columns: largest allowed ``m`` (``None``: no limit).

  Returns:
    ``(F + λI)⁻¹ v`` shaped like ``vector``, zeros on the leaves outside the
    captured layers.
  """
  where = "damped_fisher_solve"
  _check_positive(where, "damping", damping)
  hyperparams.check_integer(where, "max_columns", max_columns, optional=True)
  shapes, keys = _layers(where, vector, stats, "vector")
  v = param_layout.gradient_matrices(vector, shapes, keys)
  dtype = _dtype(v)
  v = {k: x.astype(dtype) for k, x in v.items()}
  inputs, cots, _, n = _columns(where, stats, keys, dtype, max_columns)
  damping = jnp.asarray(damping, dtype)
  gram = sum(linalg.gradient_gram(inputs[k], cots[k]) for k in keys)
  dots = sum(linalg.gradient_dots(inputs[k], cots[k], v[k]) for k in keys)
  c = linalg.damped_solve(gram, n * damping, dots)
  out = {k: (v[k] - linalg.weighted_gradient_sum(inputs[k], cots[k], c)) / damping for k in keys}
  return _write(vector, shapes, out, _zeros)


def fisher_diagonal(stats: Stats, like):
  """``diag(F)`` of the mini-batch Fisher, shaped like ``like`` (zeros outside the captured layers).

  ``diag F = (1/n) Σ_j ψ_j ⊙ ψ_j``. One position per example (dense layers):
  ``(1/n) (ā ⊙ ā)ᵀ Σ_s (g_s ⊙ g_s)``, cost ``O(m(d_in + d_out) + n·d_in·d_out)``.
  Several positions (convolutions, tokens): the per-example gradients are
  formed one example at a time (a scan), cost ``O(m·P·d_in·d_out)``, memory
  ``O(S·d_in·d_out)``.

  Args:
    stats: from :func:`neuron_optax.value_grad_and_stats`.
    like: a tree shaped like the parameters (e.g. ``params``).
  """
  shapes, keys = _layers("fisher_diagonal", like, stats, "like")
  dtype = _dtype(param_layout.gradient_matrices(like, shapes, keys))
  out = {}
  for k in keys:
    a, g = stats[k].augmented_inputs(dtype), stats[k].per_example_cotangents(dtype)
    out[k] = _layer_fisher_diagonal(a, g)
  return _write(like, shapes, out, _zeros)


def _layer_fisher_diagonal(a: jax.Array, g: jax.Array) -> jax.Array:
  """``(1/n) Σ_j ψ_j ⊙ ψ_j`` of one layer, ``(d_in, d_out)``."""
  n = a.shape[0]
  if a.shape[1] == 1:
    return (a[:, 0] ** 2).T @ jnp.sum(g[:, :, 0] ** 2, axis=0) / n

  def add(total, example):
    a_i, g_i = example  # (P, d_in), (S, P, d_out)
    psi = jnp.einsum("pi,spo->sio", a_i, g_i)
    return total + jnp.sum(psi**2, axis=0), None

  total = jnp.zeros((a.shape[-1], g.shape[-1]), a.dtype)
  total, _ = jax.lax.scan(add, total, (a, jnp.swapaxes(g, 0, 1)))
  return total / n


# --------------------------------------------------------------------------- #
# Kronecker factors
# --------------------------------------------------------------------------- #


def kronecker_factors(source, *, ema_decay: float | None = None, positions: int | Mapping[str, int] = 1) -> Factors:
  """``{layer name: KroneckerFactors(A, G)}`` for the structured Laplace posteriors.

  Args:
    source: one of

      * the ``stats`` of a batch: ``A = mean_r ā_r ā_rᵀ`` and
        ``G = P · mean_r Σ_s g_sr g_srᵀ`` over the ``n·P`` rows (``G`` summed
        over the ``P`` positions of an example, averaged over examples, so
        that for dense layers with one position ``A ⊗ G`` is exactly the
        Kronecker approximation ``E[āāᵀ] ⊗ E[ggᵀ]`` of ``F``). Per-layer
        second moments without rows (``LayerMoments``) work too; their ``G``
        is multiplied by ``positions``;
      * a ``nox.KfacState`` (debiased moving averages of ``A`` and ``G``) or a
        ``nox.FoofState`` (``A`` only; ``G`` is ``None``). For a chained
        optimiser pass the element of the chain's state, e.g. ``opt_state[0]``;
      * a mapping ``{layer name: KroneckerFactors}`` (returned as is).
    ema_decay: only for states that store no debiasing weight: the
      ``ema_decay`` they were built with (their averages are stored biased).
    positions: for states and moments, the positions per example ``P`` that
      ``G`` is multiplied by (an int for every layer, or ``{layer name: P}``;
      layers not named get 1). They average over rows, so convolutions need
      their output positions here to match the scale of the ``stats`` path.

  Returns:
    A dict keyed by layer name (``'Dense_0'``, ``'block/conv'``; the keys of a
    KFAC/FOOF state).
  """
  where = "kronecker_factors"

  def positions_of(name):
    p = positions.get(name, 1) if isinstance(positions, Mapping) else positions
    hyperparams.check_integer(where, f"positions[{name!r}]" if isinstance(positions, Mapping) else "positions", p)
    return p

  if _is_factors(source):
    return dict(source)
  if _is_moments(source):
    _check_supported(where, source)
    out = {}
    for key, s in source.items():
      dtype = param_layout.statistics_dtype(jnp.result_type(*jax.tree_util.tree_leaves(s)))
      a, g = kronecker.batch_factors(s, dtype)
      p = s.cotangents.shape[1] if isinstance(s, LayerStats) else positions_of(layer_name(key))
      out[layer_name(key)] = KroneckerFactors(a, g * p)
    return out
  layers = getattr(source, "layers", None)
  if isinstance(layers, Mapping) and layers and all(hasattr(v, "a_ema") for v in layers.values()):
    out = {}
    for name, layer in layers.items():
      p = positions_of(name)
      a = _debiased(where, layer, "a", ema_decay)
      if a.ndim == 1:
        raise NotImplementedError(
          f"{where}: layer {name!r} of the state is an embedding (a diagonal input factor), which the Laplace "
          "tools do not handle yet; pass a mapping of KroneckerFactors without it."
        )
      g = _debiased(where, layer, "g", ema_decay) * p if hasattr(layer, "g_ema") else None
      out[name] = KroneckerFactors(a, g)
    return out
  raise TypeError(
    f"{where}: expected the stats of a batch (from nox.value_grad_and_stats), a nox.KfacState or "
    f"nox.FoofState (for a chain, its element such as opt_state[0]), or a mapping of KroneckerFactors; got "
    f"{type(source).__name__}."
  )


def _debiased(where: str, layer, factor: str, ema_decay) -> jax.Array:
  """A state's debiased moving average: ``ema / weight`` (``weight = 1 − β^k`` for a constant decay ``β``)."""
  ema = getattr(layer, f"{factor}_ema")
  weight = getattr(layer, f"{factor}_weight", None)
  if weight is None:
    if ema_decay is None:
      raise ValueError(
        f"{where}: pass ema_decay= (the value the KFAC/FOOF transform was built with) to debias the state's "
        "moving averages."
      )
    if not hyperparams.is_number(ema_decay) or not 0 <= ema_decay < 1:
      raise ValueError(f"{where}: ema_decay must be in [0, 1), got {ema_decay!r}.")
    updates = getattr(layer, f"{factor}_updates")
    weight = 1 - jnp.asarray(ema_decay, ema.dtype) ** updates.astype(ema.dtype)
  weight = jnp.asarray(weight, ema.dtype)
  return jnp.where(weight > 0, ema / jnp.where(weight > 0, weight, 1), 0)


# --------------------------------------------------------------------------- #
# Posteriors
# --------------------------------------------------------------------------- #


class _Layer(NamedTuple):
  """One layer of a structured posterior: eigenbases and the curvature in them."""

  u_a: jax.Array | None  # (d_in, d_in) or None (identity)
  u_g: jax.Array | None  # (d_out, d_out) or None (identity)
  curvature: jax.Array  # (d_in, d_out): per-example curvature eigenvalues c_ij, Λ_ij = τ + N c_ij
  heuristic: tuple[jax.Array, jax.Array, jax.Array] | None  # (a, g, π) for "kfac_heuristic"


class _Posterior:
  """The Laplace posterior of one structure, built once per call (inside the caller's trace)."""

  def __init__(
    self,
    where: str,
    params,
    stats,
    structure: str,
    dataset_size,
    *,
    output_scale=None,
    max_columns: int | None = 4096,
  ):
    _check_structure(where, structure)
    _check_positive(where, "dataset_size", dataset_size, " (the number N of training examples)")
    hyperparams.check_integer(where, "max_columns", max_columns, optional=True)
    self.where, self.structure, self.params = where, structure, params
    if structure in ("full", "diagonal"):
      if not _is_stats(stats) and stats:
        raise TypeError(
          f"{where}: structure={structure!r} needs the `stats` dict from nox.value_grad_and_stats (with the "
          f"recorded rows), got {type(stats).__name__}."
        )
      self.shapes, self.keys = _layers(where, params, stats, "params")
    else:
      self.shapes = param_layout.candidate_layers(params)
      if _is_stats(stats):
        _layers(where, params, stats, "params")
      elif not (_is_moments(stats) or _is_factors(stats)):
        raise TypeError(
          f"{where}: structure={structure!r} takes the `stats` of a batch or the mapping returned by "
          f"nox.kronecker_factors (use that for a KFAC/FOOF optimiser state), got {type(stats).__name__}."
        )
      self.factors = kronecker_factors(stats)
      names = {layer_name(k): k for k in self.shapes}
      unknown = sorted(set(self.factors) - set(names))
      if unknown:
        raise ValueError(
          f"{where}: the factors name layers {unknown} that have no kernel in params (layers with kernels: "
          f"{sorted(names)})."
        )
      self.keys = [names[name] for name in self.factors]
    self.theta = param_layout.gradient_matrices(params, self.shapes, self.keys)
    self.dtype = _dtype(self.theta)
    self.theta = {k: t.astype(self.dtype) for k, t in self.theta.items()}
    self.size = jnp.asarray(dataset_size, self.dtype)
    self.scatter = sum(jnp.sum(t**2) for t in self.theta.values())
    self.num_parameters = sum(t.size for t in self.theta.values())
    if structure == "full":
      self.inputs, self.cots, _, self.n = _columns(where, stats, self.keys, self.dtype, max_columns)
      self.gram = sum(linalg.gradient_gram(self.inputs[k], self.cots[k]) for k in self.keys)
      self.m = self.gram.shape[0]
    elif structure == "diagonal":
      self.layers = {
        k: _Layer(
          None,
          None,
          _layer_fisher_diagonal(stats[k].augmented_inputs(self.dtype), stats[k].per_example_cotangents(self.dtype)),
          None,
        )
        for k in self.keys
      }
    else:
      self.layers = {k: self._kronecker_layer(k, output_scale) for k in self.keys}

  def _kronecker_layer(self, key: LayerKey, output_scale) -> _Layer:
    name, shape = layer_name(key), self.shapes[key]
    a, g = self.factors[name]
    if a.shape != (shape.d_in, shape.d_in) or (g is not None and g.shape != (shape.d_out, shape.d_out)):
      raise ValueError(
        f"{self.where}: layer {name!r} has a {shape.d_in}x{shape.d_out} weight matrix (bias row included) but "
        f"factors A {a.shape} and G {None if g is None else g.shape}."
      )
    a_values, u_a = linalg.sym_eigh(a.astype(self.dtype))
    a_values = jnp.maximum(a_values, 0)
    if self.structure == "input_factor":
      if output_scale is None:
        if g is None:
          raise ValueError(
            f"{self.where}: layer {name!r} has no output factor G (a FOOF state); pass output_scale= (the "
            "isotropic output curvature ḡ, e.g. tr G / d_out of a batch's KFAC factors)."
          )
        scale = jnp.trace(g.astype(self.dtype)) / shape.d_out
      else:
        scale = jnp.asarray(output_scale, self.dtype)
      return _Layer(u_a, None, jnp.broadcast_to((scale * a_values)[:, None], (shape.d_in, shape.d_out)), None)
    if g is None:
      raise ValueError(
        f"{self.where}: structure={self.structure!r} needs the output factor G of layer {name!r}; a FOOF "
        "state has none. Use structure='input_factor' (with output_scale=) or factors from a KFAC state or "
        "from stats."
      )
    g = g.astype(self.dtype)
    g_values, u_g = linalg.sym_eigh(g)
    g_values = jnp.maximum(g_values, 0)
    heuristic = None
    if self.structure == "kfac_heuristic":
      heuristic = (a_values, g_values, kronecker.heuristic_pi(a.astype(self.dtype), g))
    return _Layer(u_a, u_g, jnp.outer(a_values, g_values), heuristic)

  # Precision eigenvalues and log-determinants --------------------------------

  def _layer_precision(self, layer: _Layer, tau) -> jax.Array:
    if layer.heuristic is None:
      return tau + self.size * layer.curvature
    a, g, pi = layer.heuristic
    root = jnp.sqrt(tau / self.size)
    return self.size * jnp.outer(a + pi * root, g + root / pi)

  def log_det_ratio(self, tau) -> jax.Array:
    """``log det Λ − d log τ``: log-determinant of the posterior over the prior precision."""
    tau = jnp.asarray(tau, self.dtype)
    if self.structure == "full":
      return jnp.sum(jnp.log1p(self.size * self.gram_eigenvalues / (self.n * tau)))
    total = 0.0
    for layer in self.layers.values():
      if layer.heuristic is None:
        total = total + jnp.sum(jnp.log1p(self.size * layer.curvature / tau))
      else:
        total = total + jnp.sum(jnp.log(self._layer_precision(layer, tau) / tau))
    return total

  def prepare_log_det(self) -> _Posterior:
    """Factorises what :meth:`log_det_ratio` needs (``"full"``: eigenvalues of ``K``, ``O(m³)``) once.

    Called before any transformation of the ``τ`` evaluations (``vmap``,
    loops), so that the factorisation is computed once, outside them.
    """
    if self.structure == "full":
      self.gram_eigenvalues = jnp.maximum(jnp.linalg.eigvalsh(self.gram), 0)
    return self

  def log_marginal_likelihood(self, log_likelihood, tau) -> jax.Array:
    tau = jnp.asarray(tau, self.dtype)
    return jnp.asarray(log_likelihood, self.dtype) - 0.5 * (tau * self.scatter + self.log_det_ratio(tau))

  # Samples ---------------------------------------------------------------------

  def deltas(self, prior_noise: Mapping[LayerKey, jax.Array], likelihood_noise: jax.Array | None, tau):
    """``θ − θ*`` for noise with a leading sample axis: ``{key: (s, d_in, d_out)}``, ``(s, m)``."""
    tau = jnp.asarray(tau, self.dtype)
    if self.structure != "full":
      out = {}
      for k, layer in self.layers.items():
        delta = prior_noise[k] / jnp.sqrt(self._layer_precision(layer, tau))
        if layer.u_a is not None:
          delta = jnp.einsum("ij,sjo->sio", layer.u_a, delta)
        if layer.u_g is not None:
          delta = jnp.einsum("sio,po->sip", delta, layer.u_g)
        out[k] = delta
      return out
    theta0 = {k: prior_noise[k] / jnp.sqrt(tau) for k in self.keys}
    dots = sum(
      jax.vmap(linalg.gradient_dots, (None, None, 0))(self.inputs[k], self.cots[k], theta0[k]) for k in self.keys
    )
    rhs = dots + jnp.sqrt(self.n / self.size) * likelihood_noise
    c = linalg.damped_solve(self.gram, self.n * tau / self.size, rhs.T).T
    return {
      k: theta0[k] - jax.vmap(linalg.weighted_gradient_sum, (None, None, 0))(self.inputs[k], self.cots[k], c)
      for k in self.keys
    }

  def samples(self, deltas: Mapping[LayerKey, jax.Array], num_samples: int):
    matrices = {k: self.theta[k] + deltas[k] for k in self.keys}
    return _write(self.params, self.shapes, matrices, lambda leaf: jnp.broadcast_to(leaf, (num_samples,) + leaf.shape))


# --------------------------------------------------------------------------- #
# Public Laplace functions
# --------------------------------------------------------------------------- #


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
      sums over (``F`` is the per-example Fisher).
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
  _check_positive(where, "prior_precision", prior_precision, " (the prior is N(0, 1/prior_precision I))")
  posterior = _Posterior(
    where, params, stats, structure, dataset_size, output_scale=output_scale, max_columns=max_columns
  )
  prior_noise, likelihood_noise = _draw_noise(key, posterior, num_samples)
  deltas = posterior.deltas(prior_noise, likelihood_noise, prior_precision)
  return posterior.samples(deltas, num_samples)


def _draw_noise(key, posterior: _Posterior, num_samples: int):
  """Standard normal prior noise per layer ``(s, d_in, d_out)`` and likelihood noise ``(s, m)`` (full only).

  One ``jax.random.normal`` call for everything, sliced (each call adds its own
  copy of the generator to the compiled program).
  """
  sizes = [posterior.theta[k].size for k in posterior.keys]
  m = posterior.m if posterior.structure == "full" else 0
  noise = jax.random.normal(key, (num_samples, sum(sizes) + m), posterior.dtype)
  prior, start = {}, 0
  for k, size in zip(posterior.keys, sizes):
    prior[k] = noise[:, start : start + size].reshape((num_samples,) + posterior.theta[k].shape)
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
  _check_positive(where, "prior_precision", prior_precision)
  posterior = _Posterior(
    where, params, stats, structure, dataset_size, output_scale=output_scale, max_columns=max_columns
  )
  noise_shapes = param_layout.candidate_layers(prior_noise)
  missing = sorted(layer_name(k) for k in posterior.keys if k not in noise_shapes)
  if missing:
    raise ValueError(f"{where}: prior_noise has no kernel for the layers {missing}; shape it like params.")
  prior = param_layout.gradient_matrices(prior_noise, noise_shapes, posterior.keys)
  prior = {k: v.astype(posterior.dtype)[None] for k, v in prior.items()}
  if structure == "full":
    if likelihood_noise is None or jnp.shape(likelihood_noise) != (posterior.m,):
      raise ValueError(
        f"{where}: structure='full' needs likelihood_noise of shape ({posterior.m},) (one standard normal per "
        f"Fisher column), got {None if likelihood_noise is None else jnp.shape(likelihood_noise)}."
      )
    likelihood_noise = jnp.asarray(likelihood_noise, posterior.dtype)[None]
  elif likelihood_noise is not None:
    raise ValueError(f"{where}: likelihood_noise is only used by structure='full'; pass None for {structure!r}.")
  deltas = posterior.deltas(prior, likelihood_noise, prior_precision)
  samples = posterior.samples(deltas, 1)
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
    dataset_size: ``N > 0``.
    structure, output_scale, max_columns: as for :func:`laplace_sample`.

  Returns:
    A scalar.
  """
  where = "laplace_log_marginal_likelihood"
  _check_positive(where, "prior_precision", prior_precision)
  posterior = _Posterior(
    where, params, stats, structure, dataset_size, output_scale=output_scale, max_columns=max_columns
  )
  return posterior.prepare_log_det().log_marginal_likelihood(log_likelihood, prior_precision)


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
    dataset_size: ``N > 0``.
    structure: as for :func:`laplace_sample`.
    bounds: ``(lowest, highest)`` prior precision searched.
    grid_points: grid size (at least 3).
    refine_steps: golden-section iterations.
    output_scale, max_columns: as for :func:`laplace_sample`.

  Returns:
    ``τ`` as a scalar array (jit-compatible).
  """
  where = "tune_prior_precision"
  lo, hi = bounds
  _check_positive(where, "bounds[0]", lo)
  _check_positive(where, "bounds[1]", hi)
  if not lo < hi:
    raise ValueError(f"{where}: bounds must be (lowest, highest) with lowest < highest, got {bounds!r}.")
  hyperparams.check_integer(where, "grid_points", grid_points, minimum=3)
  hyperparams.check_integer(where, "refine_steps", refine_steps, minimum=0)
  posterior = _Posterior(
    where, params, stats, structure, dataset_size, output_scale=output_scale, max_columns=max_columns
  ).prepare_log_det()

  def objective(u):
    return posterior.log_marginal_likelihood(0.0, jnp.exp(u))

  grid = jnp.linspace(math.log(lo), math.log(hi), grid_points, dtype=posterior.dtype)
  values = jax.lax.map(objective, grid) if structure != "full" else jax.vmap(objective)(grid)
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
