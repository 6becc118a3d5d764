"""GLM predictive (probit, Laplace bridge, Monte Carlo) and prior precision by validation grid, float64.

References use the explicit Jacobian ``J`` of the logits (``jax.jacfwd`` over the flat parameters), the explicit
Fisher (generalised Gauss-Newton ``Jᵀ ∇²_z L J`` of the mean loss on the Fisher batch) and the posterior
covariance inverted in NumPy; the link approximations are written out in NumPy from their formulas.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import neuron_optax as nox

pytestmark = pytest.mark.usefixtures("x64")

TAU, N_DATA, CLASSES = 0.8, 30.0, 3


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES, name="out")(jnp.tanh(nn.Dense(4, name="hidden")(x)))


@functools.cache
def problem():
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.integers(0, CLASSES, 5))
  x_val, y_val = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.integers(0, CLASSES, 4))
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), MLP().init(jax.random.key(0), x)["params"])
  params = jax.tree.map(lambda p: p + 0.2 * rng.normal(size=p.shape), params)
  return params, (x, y), (x_val, y_val)


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@functools.cache
def explicit():
  """``(μ, J, Σ_full, Σ_diagonal)`` on the validation inputs, in ravel order."""
  params, (x, y), (x_val, _) = problem()
  flat, unravel = ravel_pytree(params)
  logits = lambda f, x: MLP().apply({"params": unravel(f)}, x)
  jac = jax.jacfwd(logits)(flat, x).reshape(-1, flat.size)
  hessian = jax.hessian(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())(logits(flat, x))
  fisher = np.asarray(jac.T @ hessian.reshape(jac.shape[0], -1) @ jac)
  d = flat.size
  full = np.linalg.inv(TAU * np.eye(d) + N_DATA * fisher)
  diagonal = np.diag(1 / (TAU + N_DATA * np.diag(fisher)))
  j_val = np.asarray(jax.jacfwd(logits)(flat, x_val))  # (B, C, d)
  return np.asarray(logits(flat, x_val)), j_val, {"full": full, "diagonal": diagonal}


def probit(mean, f_var):
  return softmax(mean / np.sqrt(1 + np.pi / 8 * np.diagonal(f_var, axis1=1, axis2=2)))


def bridge(mean, f_var):
  """laplace-torch's Laplace bridge with its zero-mean correction, written out per row."""
  out = []
  for mu, var in zip(mean, f_var):
    s, total = var.sum(-1), var.sum()
    mu = mu - s * mu.sum() / total
    var = var - np.outer(s, s) / total
    k = mu.size
    alpha = (1 - 2 / k + np.exp(mu) / k**2 * np.exp(-mu).sum()) / np.diag(var)
    out.append(alpha / alpha.sum())
  return np.stack(out)


@functools.cache
def computed():
  params, (x, y), (x_val, y_val) = problem()
  grid = jnp.asarray([0.1, TAU, 10.0])

  @jax.jit
  def run(key):
    _, _, stats = nox.value_grad_and_stats(
      lambda p: optax.softmax_cross_entropy_with_integer_labels(MLP().apply({"params": p}, x), y).mean(),
      fisher="full",
      likelihood="categorical",
    )(params)
    apply_fn = lambda p: MLP().apply({"params": p}, x_val)
    kw = dict(prior_precision=TAU, dataset_size=N_DATA)
    out = {}
    for structure in ("full", "diagonal"):
      for link in ("probit", "bridge"):
        out[structure, link] = nox.glm_predictive(apply_fn, params, stats, structure=structure, link_approx=link, **kw)
      for link in ("probit", "bridge", "mc"):
        out[structure, link, "sampled"] = nox.glm_predictive(
          apply_fn, params, stats, structure=structure, link_approx=link, num_samples=7, key=key, **kw
        )
      samples = nox.laplace_sample(key, params, stats, num_samples=7, structure=structure, **kw)
      out[structure, "samples"] = ravel_samples(samples)
    for metric in ("nll", "ece"):
      out["grid", metric] = nox.grid_search_prior_precision(
        apply_fn, params, stats, y_val, dataset_size=N_DATA, grid=grid, metric=metric
      )
    return out

  return run(jax.random.key(4))


def ravel_samples(samples):
  return jax.vmap(lambda t: ravel_pytree(t)[0])(samples)


@pytest.mark.parametrize("structure", [pytest.param("full", marks=pytest.mark.slow), "diagonal"])
@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_exact_functional_covariance_links(structure, link):
  mean, jac, covariance = explicit()
  f_var = np.einsum("bcd,de,bke->bck", jac, covariance[structure], jac)
  expected = (probit if link == "probit" else bridge)(mean, f_var)
  np.testing.assert_allclose(computed()[structure, link], expected, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(np.asarray(computed()[structure, link]).sum(-1), 1, rtol=1e-12)


@pytest.mark.parametrize("structure", ["full", "diagonal"])
@pytest.mark.parametrize("link", ["probit", "bridge", "mc"])
def test_sampled_links_use_jvps_of_the_posterior_samples(structure, link):
  """With ``num_samples`` the links use ``J δ_s`` of the posterior samples laplace_sample draws with the same key
  (one JVP each, no row of ``J``): mc averages their softmax, probit/bridge use their second moments."""
  mean, jac, _ = explicit()
  params = problem()[0]
  deltas = np.asarray(computed()[structure, "samples"]) - np.asarray(ravel_pytree(params)[0])
  deviations = np.einsum("bcd,sd->sbc", jac, deltas)
  if link == "mc":
    expected = softmax(mean[None] + deviations).mean(0)
  else:
    f_var = np.einsum("sbc,sbk->bck", deviations, deviations) / deltas.shape[0]
    expected = (probit if link == "probit" else bridge)(mean, f_var)
  np.testing.assert_allclose(computed()[structure, link, "sampled"], expected, rtol=1e-10, atol=1e-14)


def numpy_ece(probs, labels, bins=15):
  confidence, predicted = probs.max(-1), probs.argmax(-1)
  total = 0.0
  for b in range(bins):
    inside = (confidence > b / bins) & (confidence <= (b + 1) / bins)
    if inside.any():
      total += inside.mean() * abs((predicted[inside] == labels[inside]).mean() - confidence[inside].mean())
  return total


def test_expected_calibration_error_and_nll():
  rng = np.random.default_rng(1)
  probs = softmax(3 * rng.normal(size=(200, 4)))
  labels = rng.integers(0, 4, 200)
  np.testing.assert_allclose(
    nox.expected_calibration_error(jnp.asarray(probs), jnp.asarray(labels)), numpy_ece(probs, labels), rtol=1e-12
  )
  np.testing.assert_allclose(
    nox.negative_log_likelihood(jnp.asarray(probs), jnp.asarray(labels)),
    -np.log(probs[np.arange(200), labels]).mean(),
    rtol=1e-12,
  )


@pytest.mark.parametrize("metric", ["nll", pytest.param("ece", marks=pytest.mark.slow)])
def test_grid_search_prior_precision(metric):
  mean, jac, _ = explicit()
  params, (x, y), (_, y_val) = problem()
  d = jac.shape[-1]
  flat, unravel = ravel_pytree(params)
  logits = lambda f: MLP().apply({"params": unravel(f)}, x)
  jac_train = jax.jacfwd(logits)(flat).reshape(-1, d)
  hessian = jax.hessian(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())(logits(flat))
  fisher = np.asarray(jac_train.T @ hessian.reshape(jac_train.shape[0], -1) @ jac_train)
  scores = []
  for tau in (0.1, TAU, 10.0):
    covariance = np.linalg.inv(tau * np.eye(d) + N_DATA * fisher)
    probs = probit(mean, np.einsum("bcd,de,bke->bck", jac, covariance, jac))
    labels = np.asarray(y_val)
    scores.append(
      -np.log(probs[np.arange(len(labels)), labels]).mean() if metric == "nll" else numpy_ece(probs, labels)
    )
  best, got = computed()["grid", metric]
  np.testing.assert_allclose(got, scores, rtol=1e-10, atol=1e-14)
  assert best == (0.1, TAU, 10.0)[int(np.argmin(scores))]


def test_errors():
  params, (x, y), _ = problem()
  _, _, stats = nox.value_grad_and_stats(
    lambda p: optax.softmax_cross_entropy_with_integer_labels(MLP().apply({"params": p}, x), y).mean()
  )(params)
  apply_fn = lambda p: MLP().apply({"params": p}, x)
  kw = dict(prior_precision=TAU, dataset_size=N_DATA)
  with pytest.raises(ValueError, match="link_approx must be 'probit', 'bridge' or 'mc'"):
    nox.glm_predictive(apply_fn, params, stats, link_approx="laplace", **kw)
  with pytest.raises(ValueError, match="link_approx='mc' averages over posterior samples; pass num_samples="):
    nox.glm_predictive(apply_fn, params, stats, link_approx="mc", **kw)
  with pytest.raises(ValueError, match="pass key="):
    nox.glm_predictive(apply_fn, params, stats, num_samples=3, **kw)
  with pytest.raises(ValueError, match="metric must be 'nll' or 'ece'"):
    nox.grid_search_prior_precision(apply_fn, params, stats, y, dataset_size=N_DATA, metric="brier")
