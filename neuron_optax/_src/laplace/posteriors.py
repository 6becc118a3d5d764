"""One Laplace posterior type per structure, chosen once by :func:`posterior`.

Each type knows its precision ``Λ(τ)``, the log-determinant ratio
``log det Λ − d log τ`` and the linear noise-to-sample map (module docstring of
:mod:`neuron_optax._src.laplace`). ``"full"`` works on the Fisher's columns; the
layer-wise types (``"diagonal"``, ``"kfac"``, ``"kfac_heuristic"``,
``"input_factor"``) on one eigenbasis per layer (every copy of a stacked layer
its own).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from neuron_optax._src import hyperparams, kronecker, linalg, param_layout
from neuron_optax._src.laplace import _trees, factors, products
from neuron_optax._src.layer_stats import LayerKey, layer_name

STRUCTURES = ("full", "diagonal", "kfac", "kfac_heuristic", "input_factor")


class Posterior:
  """The Laplace posterior ``N(θ*, Λ⁻¹)`` of one structure over the layers it covers (built inside the caller's trace).

  Subclasses set :attr:`structure` and build their curvature in :meth:`_build`.
  """

  structure: ClassVar[str]
  noise_columns: int = 0  # likelihood noise per sample (Matheron's rule: "full" only)
  vectorise_tau: ClassVar[bool] = False  # whether many τ evaluations may be vmapped (cheap per τ)

  def __init__(self, where: str, params, stats, dataset_size, *, output_scale=None, max_columns: int | None = 4096):
    hyperparams.check_positive_scalar(
      where, "dataset_size", dataset_size, explain=" (the number N of training examples)"
    )
    hyperparams.check_integer(where, "max_columns", max_columns, optional=True)
    self.where, self.params = where, params
    self.shapes, self.keys = self._layers(stats)
    theta = _trees.matrices(where, params, self.shapes, self.keys, "params")
    self.dtype = _trees.dtype_of(theta)
    self.theta = {k: t.astype(self.dtype) for k, t in theta.items()}
    self.size = jnp.asarray(dataset_size, self.dtype)
    self.scatter = sum(jnp.sum(t**2) for t in self.theta.values())
    self.num_parameters = sum(t.size for t in self.theta.values())
    self._build(output_scale=output_scale, max_columns=max_columns)

  def _layers(self, stats) -> tuple[_trees.Shapes, list[LayerKey]]:
    """Rows are needed: ``stats`` from ``value_grad_and_stats``."""
    if stats and not _trees.is_stats(stats):
      raise TypeError(
        f"{self.where}: structure={self.structure!r} needs the `stats` dict from nox.value_grad_and_stats (with "
        f"the recorded rows), got {type(stats).__name__}."
      )
    shapes, keys, self.stats = _trees.layers_of_stats(self.where, self.params, stats, "params")
    return shapes, keys

  def _build(self, *, output_scale, max_columns) -> None:
    raise NotImplementedError

  def log_det_ratio(self, tau) -> jax.Array:
    """``log det Λ − d log τ``: log-determinant of the posterior over the prior precision."""
    raise NotImplementedError

  def prepare_log_det(self) -> Posterior:
    """Factorises what :meth:`log_det_ratio` needs once, before any transformation over ``τ``."""
    return self

  def log_marginal_likelihood(self, log_likelihood, tau) -> jax.Array:
    tau = jnp.asarray(tau, self.dtype)
    return jnp.asarray(log_likelihood, self.dtype) - 0.5 * (tau * self.scatter + self.log_det_ratio(tau))

  def deltas(self, prior_noise: Mapping[LayerKey, jax.Array], likelihood_noise: jax.Array | None, tau):
    """``θ − θ*`` for noise with a leading sample axis: ``{key: (s, d_in, d_out)}``, ``(s, m)``."""
    raise NotImplementedError

  def covariance_product(self, vectors: Mapping[LayerKey, jax.Array], tau) -> dict[LayerKey, jax.Array]:
    """``Λ⁻¹ v`` for ``v`` given as one ``(d_in, d_out)`` matrix per layer."""
    raise NotImplementedError

  def samples(self, deltas: Mapping[LayerKey, jax.Array]):
    return _trees.write_samples(self.params, self.shapes, {k: self.theta[k] + deltas[k] for k in self.keys})


class FullPosterior(Posterior):
  """``Λ = τI + N F`` with the mini-batch Fisher ``F = (1/n) ΨΨᵀ``: Woodbury, determinant lemma, Matheron."""

  structure = "full"
  vectorise_tau = True

  def _build(self, *, output_scale, max_columns) -> None:
    del output_scale
    self.columns = products.columns_of(self.where, self.stats, self.keys, self.dtype, max_columns)
    self.n = self.columns.n
    self.gram = self.columns.gram()
    self.m = self.noise_columns = self.columns.m

  def prepare_log_det(self) -> Posterior:
    self.gram_eigenvalues = jnp.maximum(jnp.linalg.eigvalsh(self.gram), 0)
    return self

  def log_det_ratio(self, tau) -> jax.Array:
    tau = jnp.asarray(tau, self.dtype)
    return jnp.sum(jnp.log1p(self.size * self.gram_eigenvalues / (self.n * tau)))

  def covariance_product(self, vectors, tau):
    # Λ = τI + (N/n) ΨΨᵀ, so Λ⁻¹v = (v − Ψ (K + (nτ/N) I)⁻¹ Ψᵀv) / τ (Woodbury).
    tau = jnp.asarray(tau, self.dtype)
    c = linalg.damped_solve(self.gram, self.n * tau / self.size, self.columns.dots(vectors))
    return {k: (vectors[k] - self.columns.weighted_sum(k, c)) / tau for k in self.keys}

  def deltas(self, prior_noise, likelihood_noise, tau):
    tau = jnp.asarray(tau, self.dtype)
    theta0 = {k: prior_noise[k] / jnp.sqrt(tau) for k in self.keys}
    dots = jax.vmap(self.columns.dots)(theta0)
    rhs = dots + jnp.sqrt(self.n / self.size) * likelihood_noise
    c = linalg.damped_solve(self.gram, self.n * tau / self.size, rhs.T).T
    return {k: theta0[k] - jax.vmap(lambda w, k=k: self.columns.weighted_sum(k, w))(c) for k in self.keys}


class _Layer(NamedTuple):
  """One layer of a layer-wise posterior: eigenbases and the curvature in them."""

  u_a: jax.Array | None  # (d_in, d_in) or None (identity)
  u_g: jax.Array | None  # (d_out, d_out) or None (identity)
  curvature: jax.Array | tuple  # (d_in, d_out) eigenvalues c_ij, Λ_ij = τ + N c_ij (kfac_heuristic: (a, g))
  pi: jax.Array | None = None  # kfac_heuristic: π


class _LayerwisePosterior(Posterior):
  """Block diagonal over layers, each block diagonal in its own eigenbasis: ``Λ_ij = τ + N c_ij``."""

  def _precision(self, layer: _Layer, tau) -> jax.Array:
    return tau + self.size * layer.curvature

  def _log_det_ratio(self, layer: _Layer, tau) -> jax.Array:
    return jnp.sum(jnp.log1p(self.size * layer.curvature / tau))

  def log_det_ratio(self, tau) -> jax.Array:
    tau = jnp.asarray(tau, self.dtype)
    return sum(self._log_det_ratio(layer, tau) for layer in self.layers.values())

  def covariance_product(self, vectors, tau):
    tau = jnp.asarray(tau, self.dtype)
    out = {}
    for k, layer in self.layers.items():
      v = vectors[k] if layer.u_a is None else layer.u_a.T @ vectors[k]
      v = v if layer.u_g is None else v @ layer.u_g
      v = v / self._precision(layer, tau)
      v = v if layer.u_g is None else v @ layer.u_g.T
      out[k] = v if layer.u_a is None else layer.u_a @ v
    return out

  def deltas(self, prior_noise, likelihood_noise, tau):
    del likelihood_noise
    tau = jnp.asarray(tau, self.dtype)
    out = {}
    for k, layer in self.layers.items():
      delta = prior_noise[k] / jnp.sqrt(self._precision(layer, tau))
      if layer.u_a is not None:
        delta = jnp.einsum("ij,sjo->sio", layer.u_a, delta)
      if layer.u_g is not None:
        delta = jnp.einsum("sio,po->sip", delta, layer.u_g)
      out[k] = delta
    return out


class DiagonalPosterior(_LayerwisePosterior):
  """``Λ = τI + N diag(F)``."""

  structure = "diagonal"

  def _build(self, *, output_scale, max_columns) -> None:
    del output_scale, max_columns
    self.layers = {k: _Layer(None, None, products.layer_fisher_diagonal(self.stats[k], self.dtype)) for k in self.keys}


def _factor_layouts(names) -> param_layout.KernelInputNdim:
  """Layouts of the stacked layers that factor names such as ``'cells/mlp[2]'`` imply (default elsewhere)."""
  stacked = {}
  for name in names:
    match = re.fullmatch(r"(.*)\[([0-9, ]+)\]", name)
    if match:
      stacked[match.group(1)] = len(match.group(2).split(","))

  def layout(path, shape):
    if path not in stacked:
      return None
    s = stacked[path]
    return param_layout.KernelLayout(param_layout.default_kernel_input_ndim(path, shape[s:]), s)

  return layout


class KfacPosterior(_LayerwisePosterior):
  """``Λ = τI + N A ⊗ G`` per layer (Ritter et al. 2018), from :func:`kronecker_factors`."""

  structure = "kfac"

  def _layers(self, stats):
    if _trees.is_stats(stats):
      shapes, keys, stats = _trees.layers_of_stats(self.where, self.params, stats, "params")
      self.factors = factors.kronecker_factors(stats)
      return shapes, keys
    if not (factors.is_moments(stats) or factors.is_factors(stats)):
      raise TypeError(
        f"{self.where}: structure={self.structure!r} takes the `stats` of a batch or the mapping returned by "
        f"nox.kronecker_factors (use that for a KFAC/FOOF optimiser state), got {type(stats).__name__}."
      )
    self.factors = factors.kronecker_factors(stats)
    shapes = param_layout.candidate_layers(self.params, _factor_layouts(self.factors))
    names = {layer_name(k): k for k in shapes}
    unknown = sorted(set(self.factors) - set(names))
    if unknown:
      raise ValueError(
        f"{self.where}: the factors name layers {unknown} that have no kernel in params (layers with kernels: "
        f"{sorted(names)})."
      )
    return shapes, [names[name] for name in self.factors]

  def _build(self, *, output_scale, max_columns) -> None:
    del max_columns
    self.layers = {}
    for key in self.keys:
      name, shape = layer_name(key), self.shapes[key]
      a, g = self.factors[name]
      if a.shape not in ((shape.d_in, shape.d_in), (shape.d_in,)) or (
        g is not None and g.shape != (shape.d_out, shape.d_out)
      ):
        raise ValueError(
          f"{self.where}: layer {name!r} has a {shape.d_in}x{shape.d_out} weight matrix (bias row included) but "
          f"factors A {a.shape} and G {None if g is None else g.shape}."
        )
      a = a.astype(self.dtype)
      if a.ndim == 1:  # an embedding's diagonal A: its eigenbasis is the identity
        a_eigh = (jnp.maximum(a, 0), None)
      else:
        values, vectors = linalg.sym_eigh(a)
        a_eigh = (jnp.maximum(values, 0), vectors)
      self.layers[key] = self._layer(name, shape, a, a_eigh, None if g is None else g.astype(self.dtype), output_scale)

  def _needs_g(self, name, g) -> None:
    if g is None:
      raise ValueError(
        f"{self.where}: structure={self.structure!r} needs the output factor G of layer {name!r}; a FOOF "
        "state has none. Use structure='input_factor' (with output_scale=) or factors from a KFAC state or "
        "from stats."
      )

  def _layer(self, name, shape, a, a_eigh, g, output_scale) -> _Layer:
    del shape, a, output_scale
    self._needs_g(name, g)
    g_values, u_g = linalg.sym_eigh(g)
    return _Layer(a_eigh[1], u_g, jnp.outer(a_eigh[0], jnp.maximum(g_values, 0)))


class KfacHeuristicPosterior(KfacPosterior):
  """``Λ = N (A + π√(τ/N) I) ⊗ (G + √(τ/N)/π I)``, Martens & Grosse's factored damping."""

  structure = "kfac_heuristic"

  def _layer(self, name, shape, a, a_eigh, g, output_scale) -> _Layer:
    del shape, output_scale
    self._needs_g(name, g)
    g_values, u_g = linalg.sym_eigh(g)
    # The factors' eigenvalues stay apart: the damping enters each factor, not their product.
    return _Layer(a_eigh[1], u_g, (a_eigh[0], jnp.maximum(g_values, 0)), kronecker.heuristic_pi(a, g))

  def _precision(self, layer: _Layer, tau) -> jax.Array:
    a, g = layer.curvature
    root = jnp.sqrt(tau / self.size)
    return self.size * jnp.outer(a + layer.pi * root, g + root / layer.pi)

  def _log_det_ratio(self, layer: _Layer, tau) -> jax.Array:
    return jnp.sum(jnp.log(self._precision(layer, tau) / tau))


class InputFactorPosterior(KfacPosterior):
  """``Λ = τI + N ḡ A ⊗ I``, ``ḡ = tr G / d_out`` or ``output_scale`` (FOOF-like, App. G)."""

  structure = "input_factor"

  def _layer(self, name, shape, a, a_eigh, g, output_scale) -> _Layer:
    if output_scale is None:
      if g is None:
        raise ValueError(
          f"{self.where}: layer {name!r} has no output factor G (a FOOF state); pass output_scale= (the "
          "isotropic output curvature ḡ, e.g. tr G / d_out of a batch's KFAC factors)."
        )
      scale = jnp.trace(g) / shape.d_out
    else:
      scale = jnp.asarray(output_scale, self.dtype)
    values = scale * a_eigh[0]
    return _Layer(a_eigh[1], None, jnp.broadcast_to(values[:, None], (shape.d_in, shape.d_out)))


POSTERIORS: dict[str, type[Posterior]] = {
  cls.structure: cls
  for cls in (FullPosterior, DiagonalPosterior, KfacPosterior, KfacHeuristicPosterior, InputFactorPosterior)
}


def posterior(where: str, structure: str, params, stats, dataset_size, **options) -> Posterior:
  """The posterior of ``structure`` (one of :data:`STRUCTURES`) over the layers of ``stats``."""
  hyperparams.check_choice(where, "structure", structure, STRUCTURES)
  return POSTERIORS[structure](where, params, stats, dataset_size, **options)
