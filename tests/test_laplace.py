"""Laplace posteriors and Fisher products (Benzing 2022, App. C) against explicit float64 matrices.

References never use the library's cotangents for the Fisher: per-example (and
per-class) gradients come from ``jax.vmap(jax.grad(...))`` over the flat vector
of the captured layers' parameters (``ravel_pytree``), and ``F``, the posterior
covariances and log-determinants are formed in NumPy. Samplers are checked
through their noise-to-sample map ``L`` (linear): ``L Lᵀ`` must be the
posterior covariance and ``L(0)`` the mean. Captures and references are
cached per configuration so that each compiles once.
"""

from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import neuron_optax as nox
from neuron_optax._src import param_layout

pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
  """These tests compile many small one-off programs: XLA's optimisation passes cost more than they save."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


UNCAPTURED = "norm"
TAU, N_DATA = 0.7, 50.0


class MLP(nn.Module):
  """Two captured Dense layers around an uncaptured LayerNorm."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(5, name="hidden")(x)
    x = nn.LayerNorm(name=UNCAPTURED)(jnp.tanh(x))
    return nn.Dense(3, name="out")(x)


class ConvNet(nn.Module):
  """A strided conv (6 positions) and a dense head."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), strides=2, padding="SAME", name="conv")(x))
    return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


class Logistic(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(x)


class Reshaped(nn.Module):
  """The first layer sees (batch * 2, 2) rows: its example axis is not the batch."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(3, name="first")(x.reshape(-1, 2)))
    return nn.Dense(3, name="out")(h.reshape(x.shape[0], -1))


MODELS = {
  "mlp": (MLP(), (6, 4)),
  "conv": (ConvNet(), (3, 4, 4, 2)),
  "logistic": (Logistic(), (1, 4)),
  "reshaped": (Reshaped(), (5, 4)),
}


@functools.cache
def parameters(name, seed=0):
  """float64 parameters, non-trivial everywhere (biases and norm parameters too)."""
  model, x_shape = MODELS[name]
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(x_shape, jnp.float64))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.3
    return jnp.asarray(rng.normal(scale=scale, size=leaf.shape))

  return jax.tree_util.tree_map(draw, shapes["params"])


@functools.cache
def batch(name):
  rng = np.random.default_rng(2)
  x_shape = MODELS[name][1]
  return jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.integers(0, 3, x_shape[:1]))


@functools.cache
def captured(name, fisher="full"):
  """``stats`` of value_grad_and_stats on the batch of model ``name``."""
  model = MODELS[name][0]
  x, y = batch(name)

  def loss_fn(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  likelihood = None if fisher == "empirical" else "categorical"
  capture = jax.jit(nox.value_grad_and_stats(loss_fn, fisher=fisher, likelihood=likelihood))
  return capture(parameters(name))[2]


def split(tree):
  return {k: v for k, v in tree.items() if k != UNCAPTURED}, {k: v for k, v in tree.items() if k == UNCAPTURED}


class Reference:
  """Explicit Fisher of the captured layers' flat parameter vector."""

  def __init__(self, name):
    self.name = name
    self.model = MODELS[name][0]
    self.params = parameters(name)
    captured_layers, self.rest = split(self.params)
    self.flat, self.unravel = ravel_pytree(captured_layers)
    self.d = self.flat.size
    # ravel order -> the library's (d_in, d_out) matrices (bias last row), layer by layer.
    index_tree = self.unravel(jnp.arange(self.d, dtype=jnp.float64))
    shapes = param_layout.candidate_layers(index_tree)
    matrices = param_layout.gradient_matrices(index_tree, shapes, sorted(shapes))
    self.blocks = [np.asarray(m).astype(int) for m in matrices.values()]

  def logits(self, flat, x):
    return self.model.apply({"params": {**self.unravel(flat), **self.rest}}, x[None])[0]

  def nll(self, flat, x, label):
    return -jax.nn.log_softmax(self.logits(flat, x))[label]

  @functools.cached_property
  def per_class_gradients(self):
    """``(ψ, p)``: gradients of every class's NLL ``(n, classes, d)`` and the probabilities ``(n, classes)``."""
    x, _ = batch(self.name)

    @jax.jit
    def per_class(flat):
      logits = jax.vmap(lambda xi: self.logits(flat, xi))(x)
      grads = jax.vmap(lambda xi: jax.vmap(jax.grad(self.nll), (None, None, 0))(flat, xi, jnp.arange(3)))(x)
      return grads, jax.nn.softmax(logits)

    return tuple(map(np.asarray, per_class(self.flat)))

  def fisher(self, fisher):
    psi, probs = self.per_class_gradients
    n = psi.shape[0]
    if fisher == "empirical":  # (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ with the true labels
      psi = psi[np.arange(n), np.asarray(batch(self.name)[1])]
      return psi.T @ psi / n
    return np.einsum("ic,icd,ice->de", probs, psi, psi) / n  # (1/n) Σ_i Σ_c p(c|x_i) ∇ℓ_ic ∇ℓ_icᵀ

  def vector(self, tree):
    return np.asarray(ravel_pytree(split(tree)[0])[0])

  def tree(self, flat, rest=None):
    return {**self.unravel(jnp.asarray(flat)), **(self.rest if rest is None else rest)}

  def block_matrix(self, blocks):
    """A (d, d) matrix in ravel order from per-layer (d_in·d_out)² blocks in row-major matrix order."""
    out = np.zeros((self.d, self.d))
    for index, block in zip(self.blocks, blocks):
      flat = index.reshape(-1)
      out[np.ix_(flat, flat)] = block
    return out


@functools.cache
def reference(name):
  return Reference(name)


@functools.cache
def explicit_fisher(name, fisher):
  return reference(name).fisher(fisher)


def assert_close(actual, expected, rtol=1e-10):
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def posterior_covariance(fisher):
  return np.linalg.inv(TAU * np.eye(fisher.shape[0]) + N_DATA * fisher)


# --------------------------------------------------------------------------- #
# Fisher products
# --------------------------------------------------------------------------- #

DAMPING = 1e-2


@functools.cache
def products(name, fisher):
  """``F v``, ``(F + λI)⁻¹ v`` and ``diag F`` for a vector shaped like the parameters, in one compilation."""
  vector = jax.tree_util.tree_map(lambda leaf: leaf + 0.5, parameters(name, seed=1))

  @jax.jit
  def run(stats, vector):
    return (
      nox.fisher_vector_product(stats, vector),
      nox.damped_fisher_solve(stats, vector, DAMPING),
      nox.fisher_diagonal(stats, vector),
    )

  return vector, run(captured(name, fisher), vector)


@pytest.mark.parametrize("name,fisher", [("mlp", "empirical"), ("mlp", "full"), ("conv", "full")])
def test_fisher_products_match_explicit(name, fisher):
  ref, f = reference(name), explicit_fisher(name, fisher)
  vector, (fv, solved, diagonal) = products(name, fisher)
  v = ref.vector(vector)
  assert_close(ref.vector(fv), f @ v)
  assert_close(ref.vector(solved), np.linalg.solve(f + DAMPING * np.eye(ref.d), v))
  assert_close(ref.vector(diagonal), np.diag(f))  # conv: the per-example scan over positions
  for out in (fv, solved, diagonal):  # leaves outside the captured layers: zeros
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(vector)
    for leaf in jax.tree_util.tree_leaves(split(out)[1]):
      np.testing.assert_array_equal(leaf, 0)


# --------------------------------------------------------------------------- #
# Samplers: the noise-to-sample map
# --------------------------------------------------------------------------- #


@functools.cache
def sample_maps(name, structures):
  """``{structure: (L, mean)}``: each sampler as ``flat sample = mean + L noise``, one compilation per model.

  ``laplace_sample_from_noise`` is linear in the noise; it is evaluated on the
  standard basis (``vmap``), which gives ``L`` column by column.
  """
  ref = reference(name)
  m = 3 * MODELS[name][1][0]
  zeros_rest = jax.tree_util.tree_map(jnp.zeros_like, ref.rest)

  def sample(stats, noise, structure):
    prior = ref.tree(noise[: ref.d], zeros_rest)
    out = nox.laplace_sample_from_noise(
      ref.params,
      stats,
      prior,
      noise[ref.d :] if structure == "full" else None,
      prior_precision=TAU,
      dataset_size=N_DATA,
      structure=structure,
    )
    return ravel_pytree(split(out)[0])[0], split(out)[1]

  @jax.jit
  def run(stats):
    out = {}
    for structure in structures:
      size = ref.d + (m if structure == "full" else 0)
      columns, _ = jax.vmap(lambda z: sample(stats, z, structure))(jnp.eye(size))
      mean, rest = sample(stats, jnp.zeros(size), structure)
      out[structure] = (columns.T, mean, rest)
    return out

  result = run(captured(name))
  for _, _, rest in result.values():  # uncaptured leaves are held at their value
    jax.tree_util.tree_map(np.testing.assert_array_equal, rest, ref.rest)
  return {
    k: (np.asarray(linear) - np.asarray(mean)[:, None], np.asarray(mean)) for k, (linear, mean, _) in result.items()
  }


MAPS = {
  "mlp": ("full", "diagonal", "kfac", "kfac_heuristic", "input_factor"),
  "conv": ("full", "kfac"),
  "logistic": ("full", "kfac"),
}


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_full_sampler_is_exact(name):
  ref = reference(name)
  jacobian, mean = sample_maps(name, MAPS[name])["full"]
  np.testing.assert_array_equal(mean, ref.flat)  # the mean is the MAP
  assert_close(jacobian @ jacobian.T, posterior_covariance(explicit_fisher(name, "full")))


def kronecker_references(name):
  """Per layer (ravel order) ``A = mean ā āᵀ`` and ``G = P · mean Σ_s g gᵀ`` from the recorded rows."""
  stats = captured(name)
  out = []
  for key in sorted(stats):
    a = np.asarray(stats[key].augmented_inputs()).reshape(-1, stats[key].d_in)
    g = np.asarray(stats[key].per_example_cotangents())
    positions = g.shape[2]
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    out.append((a.T @ a / a.shape[0], positions * np.einsum("sri,srj->ij", g, g) / g.shape[1]))
  return out


def structured_precision(name, structure):
  ref = reference(name)
  if structure == "full":
    return TAU * np.eye(ref.d) + N_DATA * explicit_fisher(name, "full")
  if structure == "diagonal":
    return TAU * np.eye(ref.d) + N_DATA * np.diag(np.diag(explicit_fisher(name, "full")))
  blocks = []
  for a, g in kronecker_references(name):
    eye_a, eye_g = np.eye(a.shape[0]), np.eye(g.shape[0])
    if structure == "kfac":
      block = TAU * np.kron(eye_a, eye_g) + N_DATA * np.kron(a, g)
    elif structure == "input_factor":
      block = TAU * np.kron(eye_a, eye_g) + N_DATA * np.trace(g) / g.shape[0] * np.kron(a, eye_g)
    else:  # kfac_heuristic
      pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
      root = np.sqrt(TAU / N_DATA)
      block = N_DATA * np.kron(a + pi * root * eye_a, g + root / pi * eye_g)
    blocks.append(block)
  return ref.block_matrix(blocks)


@pytest.mark.parametrize(
  "name,structure",
  [("mlp", "diagonal"), ("mlp", "kfac"), ("mlp", "kfac_heuristic"), ("mlp", "input_factor"), ("conv", "kfac")],
)
def test_structured_samplers_are_exact(name, structure):
  jacobian, mean = sample_maps(name, MAPS[name])[structure]
  np.testing.assert_array_equal(mean, reference(name).flat)
  assert_close(jacobian @ jacobian.T, np.linalg.inv(structured_precision(name, structure)))


def test_kfac_of_one_example_is_the_full_posterior():
  """One dense layer, one example, full Fisher: F = (āāᵀ) ⊗ Σ_c g_c g_cᵀ = A ⊗ G exactly."""
  maps = sample_maps("logistic", MAPS["logistic"])
  (full, _), (kfac, _) = maps["full"], maps["kfac"]
  assert_close(full @ full.T, posterior_covariance(explicit_fisher("logistic", "full")))
  assert_close(kfac @ kfac.T, full @ full.T)


@functools.cache
def drawn(num):
  params = parameters("mlp")
  draw = jax.jit(
    lambda stats, key: nox.laplace_sample(key, params, stats, prior_precision=TAU, dataset_size=N_DATA, num_samples=num)
  )
  return draw(captured("mlp"), jax.random.key(0))


def test_laplace_sample_draws_from_the_posterior():
  num, ref, params = 4000, reference("mlp"), parameters("mlp")
  samples = drawn(num)
  for leaf, sample in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(samples)):
    assert sample.shape == (num,) + leaf.shape
  for leaf, sample in zip(jax.tree_util.tree_leaves(ref.rest), jax.tree_util.tree_leaves(split(samples)[1])):
    np.testing.assert_array_equal(sample, np.broadcast_to(leaf, sample.shape))  # held at its value
  flat = np.asarray(jax.vmap(lambda t: ravel_pytree(split(t)[0])[0])(samples))
  # Whitened by the exact precision, the samples must be standard normal.
  root = np.linalg.cholesky(structured_precision("mlp", "full"))
  white = (flat - ref.flat) @ root
  assert np.abs(white.mean(0)).max() < 5 / np.sqrt(num)
  assert np.abs(np.cov(white.T) - np.eye(ref.d)).max() < 6 / np.sqrt(num)


def test_factors_from_optimiser_states():
  stats, params = captured("mlp"), parameters("mlp")
  from_stats = nox.kronecker_factors(stats)

  @jax.jit
  def first_states(stats):
    out = []
    for tx in (nox.kfac(1e-3, ema_decay=0.9, phase="statistics"), nox.foof(1e-3, ema_decay=0.9, phase="statistics")):
      out.append(tx.update(params, tx.init(params), params, stats=stats)[1])
    return out

  for state in first_states(stats):  # after one update the debiased averages are this batch's factors
    factors = nox.kronecker_factors(state)
    assert set(factors) == set(from_stats) == {"hidden", "out"}
    for name, (a, g) in factors.items():
      assert_close(np.asarray(a), np.asarray(from_stats[name].a))
      if isinstance(state, nox.KfacState):
        assert_close(np.asarray(g), np.asarray(from_stats[name].g))
      else:
        assert g is None
  # Row-less second moments (gradient accumulation) give the same factors for one-position layers.
  moments = nox.kronecker_factors({k: nox.LayerMoments.of(v) for k, v in stats.items()})
  for name, (a, g) in moments.items():
    assert_close(np.asarray(a), np.asarray(from_stats[name].a))
    assert_close(np.asarray(g), np.asarray(from_stats[name].g))
  # A FOOF state has no G: the input-factor posterior needs its scale, the Kronecker ones fail.
  sample = functools.partial(nox.laplace_sample, prior_precision=TAU, dataset_size=N_DATA, num_samples=2)
  with pytest.raises(ValueError, match="output_scale="):
    sample(jax.random.key(0), params, factors, structure="input_factor")
  with pytest.raises(ValueError, match="needs the output factor G"):
    sample(jax.random.key(0), params, factors, structure="kfac")
  shapes = jax.eval_shape(
    lambda key, factors: sample(key, params, factors, structure="input_factor", output_scale=2.0),
    jax.random.key(0),
    factors,
  )
  assert shapes["hidden"]["kernel"].shape == (2,) + params["hidden"]["kernel"].shape


# --------------------------------------------------------------------------- #
# Marginal likelihood and prior precision
# --------------------------------------------------------------------------- #


def explicit_log_marginal(precision, theta, log_likelihood, tau):
  d = theta.size
  return log_likelihood - 0.5 * (tau * theta @ theta + np.linalg.slogdet(precision)[1] - d * np.log(tau))


@functools.cache
def evidences():
  """Log marginal likelihoods at ``TAU`` and tuned prior precisions of every structure, one compilation."""
  params = parameters("mlp")

  @jax.jit
  def run(stats):
    kwargs = dict(dataset_size=N_DATA)
    values, tuned = {}, {}
    for structure in MAPS["mlp"]:
      values[structure] = nox.laplace_log_marginal_likelihood(
        params, stats, log_likelihood=-12.5, prior_precision=TAU, structure=structure, **kwargs
      )
      tau = nox.tune_prior_precision(params, stats, structure=structure, grid_points=41, **kwargs)
      around = jnp.stack([tau, tau * 1.01, tau / 1.01])
      tuned[structure] = (
        tau,
        jax.vmap(
          lambda t: nox.laplace_log_marginal_likelihood(
            params, stats, log_likelihood=0.0, prior_precision=t, structure=structure, **kwargs
          )
        )(around),
      )
    return values, tuned

  return run(captured("mlp"))


@pytest.mark.parametrize("structure", MAPS["mlp"])
def test_log_marginal_likelihood_matches_explicit(structure):
  ref = reference("mlp")
  expected = explicit_log_marginal(structured_precision("mlp", structure), ref.flat, -12.5, TAU)
  np.testing.assert_allclose(evidences()[0][structure], expected, rtol=1e-10)


@pytest.mark.parametrize("structure", MAPS["mlp"])
def test_tune_prior_precision_maximises_the_evidence(structure):
  ref = reference("mlp")
  tau, around = evidences()[1][structure]
  assert around[0] >= around[1:].max()  # a maximum of the evidence in log τ
  if structure == "full":
    # MacKay's stationarity condition: effective number of parameters = τ ‖θ*‖².
    eigenvalues = np.clip(np.linalg.eigvalsh(explicit_fisher("mlp", "full")), 0, None)
    gamma = np.sum(N_DATA * eigenvalues / (tau + N_DATA * eigenvalues))
    np.testing.assert_allclose(gamma, tau * ref.flat @ ref.flat, rtol=1e-6)


# --------------------------------------------------------------------------- #
# Linearised predictive
# --------------------------------------------------------------------------- #


def test_linearized_predictive():
  ref, params, x = reference("mlp"), parameters("mlp"), batch("mlp")[0]
  samples = jax.tree_util.tree_map(lambda leaf: leaf[:3], drawn(4000))
  apply_fn = lambda p: MODELS["mlp"][0].apply({"params": p}, x)

  @jax.jit
  def run(samples):
    jacobian = jax.jacfwd(lambda flat: apply_fn(ref.tree(flat)))(ref.flat)  # (6, 3, d)
    return nox.linearized_predictive(apply_fn, params, samples), apply_fn(params), jacobian

  outputs, at_map, jacobian = map(np.asarray, run(samples))
  assert outputs.shape == (3, 6, 3)
  deltas = np.asarray(jax.vmap(lambda t: ravel_pytree(split(t)[0])[0])(samples)) - ref.flat
  assert_close(outputs, at_map + np.einsum("iod,sd->sio", jacobian, deltas))


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_errors():
  params, stats = parameters("mlp"), captured("mlp")
  key = jax.random.key(0)

  def traced(fn, *args, **kwargs):  # trace-time checks fire, nothing runs
    return jax.eval_shape(lambda: fn(*args, **kwargs))

  sample = functools.partial(traced, nox.laplace_sample, key, params, stats, dataset_size=N_DATA)
  for tau in (0, -1.0, float("nan"), None, jnp.asarray(-2.0)):
    with pytest.raises(ValueError, match="prior_precision must be a positive finite number"):
      nox.laplace_sample(key, params, stats, dataset_size=N_DATA, prior_precision=tau)
  with pytest.raises(ValueError, match="dataset_size must be a positive finite number"):
    sample(prior_precision=TAU, dataset_size=0) if False else nox.laplace_sample(
      key, params, stats, prior_precision=TAU, dataset_size=0
    )
  with pytest.raises(ValueError, match="damping must be a positive"):
    nox.damped_fisher_solve(stats, params, 0.0)
  with pytest.raises(ValueError, match="structure must be"):
    sample(prior_precision=TAU, structure="block")
  # m = 3 classes x 6 examples = 18 columns.
  with pytest.raises(ValueError, match=r"m = 18 columns.*fisher='mc'.*max_columns"):
    sample(prior_precision=TAU, max_columns=17)
  with pytest.raises(ValueError, match="m = 18 columns"):
    nox.laplace_log_marginal_likelihood(
      params, stats, log_likelihood=0.0, prior_precision=TAU, dataset_size=N_DATA, max_columns=17
    )
  sample(prior_precision=TAU, max_columns=18)
  # A vector whose structure does not match the captured layers.
  with pytest.raises(ValueError, match=r"`vector` has no kernel for the captured layers \['hidden'\]"):
    nox.fisher_vector_product(stats, {k: v for k, v in params.items() if k != "hidden"})
  wrong = {**params, "hidden": {"kernel": jnp.zeros((4, 7)), "bias": jnp.zeros(7)}}
  with pytest.raises(ValueError, match="'hidden' has kernel"):
    nox.fisher_vector_product(stats, wrong)
  with pytest.raises(ValueError, match="`stats` is empty"):
    nox.fisher_vector_product({}, params)
  with pytest.raises(ValueError, match=r"likelihood_noise of shape \(18,\)"):
    nox.laplace_sample_from_noise(params, stats, params, prior_precision=TAU, dataset_size=N_DATA)
  # Layers that disagree on the example axis are not columns of one Fisher.
  model, x_shape = MODELS["reshaped"]
  x = jnp.zeros(x_shape)
  capture = nox.value_grad_and_stats(lambda p: jnp.sum(model.apply({"params": p}, x)))
  with pytest.raises(ValueError, match="disagree on .*structure='kfac'"):
    traced(lambda: nox.fisher_vector_product(capture(parameters("reshaped"))[2], parameters("reshaped")))
  # A state that stores biased averages without their debiasing weight needs the decay.
  a = jnp.eye(5)
  legacy = types.SimpleNamespace(layers={"hidden": types.SimpleNamespace(a_ema=0.1 * a, a_updates=jnp.asarray(1))})
  with pytest.raises(ValueError, match="ema_decay="):
    nox.kronecker_factors(legacy)
  assert_close(np.asarray(nox.kronecker_factors(legacy, ema_decay=0.9)["hidden"].a), np.asarray(a))
  with pytest.raises(TypeError, match="KfacState"):
    nox.kronecker_factors([1, 2])
