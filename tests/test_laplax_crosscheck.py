"""Cross-check of the full-covariance Laplace posterior against laplax (float64).

Runs only where laplax is installed (``scripts/check_laplax.sh``; the main
test environment does not install it, so this module is skipped there).

A tiny linen MLP (3 → 4 → 3 logits or 2 regression outputs, biases, 31 or 26
parameters, every parameter in a captured ``nn.Dense``), 12 data points, the
whole data set as the Fisher batch (``n = N``), the exact Fisher
(``fisher="full"``), which for softmax cross-entropy and for a unit-variance
Gaussian equals the GGN that laplax builds. Compared with laplax 0.0.2's
``laplax.laplace(..., curv_type="full")`` (dense GGN ``to_dense`` of its
GGN-vector product, posterior precision ``σ²·GGN + τI``, Cholesky scale
``L``, ``cov_mv``) and ``laplax.eval.marginal_log_likelihood``. The
parameters are random, not a MAP: both libraries evaluate the same formulas
at the given ``θ*``.

Conventions mapped (read from laplax 0.0.2's source):

- Curvature: laplax's GGN is a **sum** over the batch,
  ``factor · Σ_i J_iᵀ H_i J_i`` with ``factor = num_curv_samples /
  num_total_samples`` in ``laplax.laplace``; with the whole data set as the
  batch both are ``N`` and ``factor = 1``. (For a subsample that factor is
  ``n/N``, the inverse of ``create_ggn_mv``'s ``num_total / num_curv``; the
  whole data set avoids depending on it.) Ours is the per-example **mean**
  ``F = (1/n) Σ_i J_iᵀ H_i J_i`` times ``dataset_size = N``, so
  ``GGN_laplax = N F``.
- Prior: both use ``N(0, τ⁻¹ I)`` on every parameter (laplax's
  ``prior_arguments["prior_prec"]`` is our ``prior_precision``), so both
  posteriors are ``N(θ*, (τI + N F)⁻¹)``.
- ``"cross_entropy"``: laplax's loss Hessian ``diag(p) − ppᵀ`` of the softmax
  cross-entropy per example is the Hessian of ``likelihood="categorical"``;
  no rescaling.
- ``"mse"``: laplax's loss is ``Σ ‖f − y‖²`` (Hessian ``2I``), ours is the
  unit-variance Gaussian (Hessian ``I``). laplax multiplies its curvature by
  ``prior_arguments["sigma_squared"]``, so ``sigma_squared = ½`` maps it.
- Evidence: laplax's ``log p(D, θ*) − ½ log det(Λ/2π)`` with
  ``log p(D|θ*) = −(1/(2σ)) · loss_sum`` (``prior_arguments["sigma"]``,
  default 1) equals ours, ``log p(D|θ*) − ½(τ‖θ*‖² + log det Λ − d log τ)``,
  when our ``log_likelihood`` is laplax's likelihood term. For MSE and ``σ = 1``
  that is ``−½ Σ ‖f − y‖²`` (the unit-variance Gaussian without its constant).
  laplax's own ``"cross_entropy"`` evidence uses an element-wise *sigmoid*
  cross-entropy, so the classification evidence passes the summed softmax
  cross-entropy as a callable loss and ``sigma = ½`` (likelihood term
  ``−Σ CE``).
- Flattening: laplax's dense matrices use ``jax.tree.flatten`` order, the same
  as ``ravel_pytree``; the comparisons go through laplax's pytree ``cov_mv``
  anyway.
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

laplax = pytest.importorskip("laplax")

from laplax.curv.full import full_curvature_to_precision  # noqa: E402
from laplax.eval import marginal_log_likelihood  # noqa: E402
from loguru import logger  # noqa: E402  (a laplax dependency)

import neuron_optax as nox  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")
logger.disable("laplax")  # laplax logs every curvature build at DEBUG level

TAU = 0.2  # prior precision τ (small, so that N F dominates the posterior in its range)
N_DATA = 12  # N: the whole data set is the Fisher batch (n = N)
TOL = 1e-8  # relative, float64


class MLP(nn.Module):
  outputs: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.outputs, name="out")(jnp.tanh(nn.Dense(4, name="hidden")(x)))


# task -> (outputs, laplax loss, our likelihood, laplax prior_arguments besides prior_prec)
TASKS = {
  "classification": (3, "cross_entropy", "categorical", {}),
  "regression": (2, "mse", "gaussian", {"sigma_squared": 0.5}),  # laplax's Σ‖f−y‖² has Hessian 2I
}


@functools.cache
def problem(task):
  """``(model, params, x, y)``: float64 parameters with non-trivial biases, and the data set."""
  outputs = TASKS[task][0]
  model = MLP(outputs)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N_DATA, 3)))
  if task == "classification":
    y = jnp.asarray(rng.integers(0, outputs, N_DATA))
  else:
    y = jnp.asarray(rng.normal(size=(N_DATA, outputs)))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64) + 0.3 * rng.normal(size=p.shape), params)
  return model, params, x, y


def summed_loss(task, outputs, targets):
  """The training loss summed over the data set: ``−log p(D|θ)`` (up to the Gaussian's constant)."""
  if task == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).sum()
  return 0.5 * jnp.sum((outputs - targets) ** 2)


@functools.cache
def ours(task):
  """Our Fisher, posterior covariance (two deterministic routes), evidence and stats on the whole data set.

  Several small programs rather than one: on 2 CPU cores jax 0.10.2 deadlocks (reproducibly) executing
  all of this as a single jit (XLA:CPU's concurrency-optimised scheduler; not with
  ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` or on one core).
  """
  model, params, x, y = problem(task)
  likelihood = TASKS[task][2]
  flat, unravel = ravel_pytree(params)
  eye = jnp.eye(flat.size)

  def loss_fn(p):  # a mean over the batch, as value_grad_and_stats expects
    return summed_loss(task, model.apply({"params": p}, x), y) / N_DATA

  value, _, stats = jax.jit(nox.value_grad_and_stats(loss_fn, fisher="full", likelihood=likelihood))(params)
  assert set(stats) == {("hidden",), ("out",)}  # every parameter is in the posterior
  cots = stats[("out",)].per_example_cotangents()
  m = cots.shape[0] * cots.shape[1]  # Fisher columns: (label sets) x (examples)

  def columns(fn):
    return jax.vmap(lambda e: ravel_pytree(fn(unravel(e)))[0])(eye).T

  @jax.jit
  def matrices(stats):
    fisher = columns(lambda v: nox.fisher_vector_product(stats, v))
    # (τI + N F)⁻¹ = (1/N) (F + (τ/N) I)⁻¹, column by column.
    solved = columns(lambda v: nox.damped_fisher_solve(stats, v, TAU / N_DATA)) / N_DATA
    return fisher, solved

  @jax.jit
  def sampler(stats):
    """The exact sampler as a linear map of its noise (ε, ζ), ``(d, d + m)``: L Lᵀ must be the covariance."""

    def sample(noise):
      out = nox.laplace_sample_from_noise(
        params, stats, unravel(noise[: flat.size]), noise[flat.size :], prior_precision=TAU, dataset_size=N_DATA
      )
      return ravel_pytree(out)[0] - flat

    return jax.vmap(sample)(jnp.eye(flat.size + m)).T

  @jax.jit
  def evidence(stats, value):
    lml = nox.laplace_log_marginal_likelihood(
      params, stats, log_likelihood=-N_DATA * value, prior_precision=TAU, dataset_size=N_DATA
    )
    return lml, nox.tune_prior_precision(params, stats, dataset_size=N_DATA)

  fisher, solved = matrices(stats)
  lml, tuned = evidence(stats, value)
  return dict(
    fisher=np.asarray(fisher),
    solved=np.asarray(solved),
    sampler=np.asarray(sampler(stats)),
    evidence=float(lml),
    tuned=float(tuned),
    stats=stats,
  )


def model_fn(model):
  return lambda input, params: model.apply({"params": params}, input)  # one example (laplax vmaps over data)


@functools.cache
def reference(task):
  """laplax's dense GGN, its posterior covariance and precision at ``TAU`` and the flat MAP."""
  model, params, x, y = problem(task)
  _, loss, _, extra = TASKS[task]
  flat, unravel = ravel_pytree(params)
  posterior_fn, curvature = laplax.laplace(
    model_fn(model),
    params,
    {"input": x, "target": y},
    loss_fn=loss,
    curv_type="full",
    num_curv_samples=N_DATA,  # the whole data set: factor = num_curv_samples / num_total_samples = 1
    num_total_samples=N_DATA,
  )
  prior_arguments = {"prior_prec": TAU, **extra}
  posterior = posterior_fn(prior_arguments)
  cov_mv = posterior.cov_mv(posterior.state)  # pytree in, pytree out
  covariance = jax.vmap(lambda e: ravel_pytree(cov_mv(unravel(e)))[0])(jnp.eye(flat.size)).T
  scale = posterior.state["scale"]
  return dict(
    curvature=np.asarray(curvature),
    covariance=np.asarray(covariance),
    scale_covariance=np.asarray(scale @ scale.T),
    precision=np.asarray(full_curvature_to_precision(curvature, prior_arguments)),
    flat=np.asarray(flat),
  )


def laplax_evidence(task, tau):
  """laplax's Laplace evidence at prior precision ``tau`` (conventions mapped, see the module docstring)."""
  model, params, x, y = problem(task)
  _, loss, _, extra = TASKS[task]
  prior_arguments = {"prior_prec": tau, **extra}
  if task == "classification":
    # laplax's built-in "cross_entropy" evidence is an element-wise sigmoid loss: pass the summed softmax
    # cross-entropy instead, with sigma = 1/2 so that its likelihood term -(1/(2 sigma)) loss is -Σ CE.
    loss, prior_arguments["sigma"] = (lambda logits, labels: summed_loss(task, logits, labels)), 0.5
  return float(
    marginal_log_likelihood(
      curv_estimate=jnp.asarray(reference(task)["curvature"]),
      prior_arguments=prior_arguments,
      data={"input": x, "target": y},
      model_fn=model_fn(model),
      params=params,
      loss_fn=loss,
      curv_type="full",
      vmap_over_data=True,
    )
  )


def relative_error(actual, expected):
  return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("task", list(TASKS))
def test_curvature_is_n_times_our_fisher(task):
  scale = 2 if task == "regression" else 1  # laplax's MSE Hessian is 2I
  expected = reference(task)["curvature"]
  assert relative_error(scale * N_DATA * ours(task)["fisher"], expected) < TOL


@pytest.mark.parametrize("task", list(TASKS))
def test_full_covariance_matches_laplax(task):
  ref, mine = reference(task), ours(task)
  covariance = ref["covariance"]
  np.testing.assert_allclose(ref["scale_covariance"], covariance, rtol=0, atol=1e-12 * np.abs(covariance).max())
  assert relative_error(mine["solved"], covariance) < TOL  # damped_fisher_solve on basis vectors
  sampler = mine["sampler"]
  assert relative_error(sampler @ sampler.T, covariance) < TOL  # laplace_sample_from_noise: L Lᵀ
  # Precision-side check (no inverse of an ill-conditioned matrix involved).
  assert relative_error(np.linalg.inv(mine["solved"]), ref["precision"]) < TOL


def test_laplace_sample_matches_laplax_covariance():
  """20k exact samples, whitened by laplax's precision: standard normal within sampling error."""
  num, ref = 20_000, reference("classification")
  _, params, _, _ = problem("classification")
  draw = jax.jit(
    lambda stats: nox.laplace_sample(
      jax.random.key(1), params, stats, prior_precision=TAU, dataset_size=N_DATA, num_samples=num
    )
  )
  samples = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(draw(ours("classification")["stats"])))
  white = (samples - ref["flat"]) @ np.linalg.cholesky(ref["precision"])  # Cov = Lᵀ Λ⁻¹ L = I for Λ = L Lᵀ
  assert np.abs(white.mean(0)).max() < 5 / np.sqrt(num)
  assert np.abs(np.cov(white.T) - np.eye(white.shape[1])).max() < 6 / np.sqrt(num)
  assert relative_error(np.cov(samples.T), ref["covariance"]) < 0.1


@pytest.mark.parametrize("task", list(TASKS))
def test_log_marginal_likelihood_matches_laplax(task):
  np.testing.assert_allclose(ours(task)["evidence"], laplax_evidence(task, TAU), rtol=1e-10)


@pytest.mark.parametrize("task", list(TASKS))
def test_tuned_prior_precision_maximises_laplax_evidence(task):
  tau = ours(task)["tuned"]
  best = laplax_evidence(task, tau)
  assert best >= max(laplax_evidence(task, tau * 1.01), laplax_evidence(task, tau / 1.01))
