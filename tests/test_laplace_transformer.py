"""The App. C tools on Transformer-shaped models: ``nn.scan``-stacked layers, ``nn.Embed``, tied ``attend`` heads.

A model whose residual cells run in ``nn.scan`` over stacked parameters, with an ``nn.Embed`` lookup of token
ids, must give every Laplace function exactly what the same function written unrolled, with the embedding as a
bias-free ``nn.Dense`` on one-hot rows, gives (float64): every copy of a stacked layer is a layer of its own and
the table's input factor is the diagonal of token frequencies. Independently of the library's cotangents, the
unrolled model's Fisher products and evidence are checked against the explicit generalised Gauss-Newton matrix
``Jᵀ (∇²_z L) J`` of the mean loss (``jax.jacfwd`` / ``jax.hessian`` over the flat parameters), and a table tied
to its output layer (``Embed.attend``) against the same explicit matrix: ``"full"`` and ``"diagonal"`` are exact
over both uses of the table, the Kronecker structures raise.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_f64
from jax.flatten_util import ravel_pytree

import neuron_optax as nox

pytestmark = pytest.mark.usefixtures("x64")

VOCAB, FEATURES, CLASSES, LENGTH, N, T = 6, 3, 3, 2, 4, 3
TAU, N_DATA, DAMPING = 0.7, 40.0, 0.1
STRUCTURES = ("full", "diagonal", "kfac", "kfac_heuristic", "input_factor")


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


class Cell(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + jnp.tanh(nn.Dense(FEATURES, name="mlp")(x)), None


class Scanned(nn.Module):
  """Embedding, ``LENGTH`` residual cells in ``nn.scan``, a Dense head (or, ``tied``, the table's ``attend``)."""

  tied: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, FEATURES, name="embed")
    scan = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=LENGTH)
    x, _ = scan(name="cells")(embed(tokens), None)
    return embed.attend(x) if self.tied else nn.Dense(CLASSES, name="head")(x)


class Unrolled(nn.Module):
  """The same function with the embedding as a bias-free Dense on one-hot rows and the cells unrolled."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Dense(FEATURES, use_bias=False, name="embed")(jax.nn.one_hot(tokens, VOCAB, dtype=jnp.float64))
    for i in range(LENGTH):
      x, _ = Cell(name=f"cell_{i}")(x, None)
    return nn.Dense(CLASSES, name="head")(x)


def unroll(tree, lead=0):
  """A scanned-model tree as the unrolled model's (``lead`` leading sample axes kept)."""
  index = (slice(None),) * lead
  cells = {f"cell_{i}": jax.tree.map(lambda x, i=i: x[index + (i,)], tree["cells"]) for i in range(LENGTH)}
  return {"embed": {"kernel": tree["embed"]["embedding"]}, "head": tree["head"], **cells}


@functools.cache
def data():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB - 1, size=(N, T))  # the last token never occurs: a zero frequency
  return jnp.asarray(tokens), jnp.asarray(rng.integers(0, CLASSES, size=(N, T)))


def loss_of(model, labels_of=None):
  tokens, labels = data()
  labels = labels if labels_of is None else labels_of

  def loss_fn(params):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, tokens), labels).mean()

  return loss_fn


@functools.cache
def scanned_params(tied=False):
  params = init_f64(Scanned(tied), data()[0])
  rng = np.random.default_rng(3)  # non-trivial biases
  return jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape), params)


def everything(model, params, stats, vector, key, to_flat, structures=STRUCTURES):
  """Every App. C function on one model, in one compilation.

  Samplers are compared through their noise-to-sample maps ``L`` (``"noise/..."``: ``L Lᵀ`` in the unrolled
  model's ravel order, and ``L(0)``): the eigenbasis of a factor with repeated eigenvalues (token frequencies)
  is not unique, so ``L`` itself is only defined up to a rotation of the noise.
  """
  out = {
    "fv": nox.fisher_vector_product(stats, vector),
    "solve": nox.damped_fisher_solve(stats, vector, DAMPING),
    "diagonal": nox.fisher_diagonal(stats, vector),
  }
  kw = dict(prior_precision=TAU, dataset_size=N_DATA)
  for s in structures:
    out[f"sample/{s}"] = nox.laplace_sample(key, params, stats, num_samples=2, structure=s, **kw)
    flat, unravel = ravel_pytree(vector)
    m = CLASSES * T * N if s == "full" else 0

    def sample(z, s=s, unravel=unravel, d=flat.size, m=m):
      out = nox.laplace_sample_from_noise(params, stats, unravel(z[:d]), z[d:] if m else None, structure=s, **kw)
      return to_flat(out)

    jacobian = jax.jacfwd(sample)(jnp.zeros(flat.size + m))
    out[f"noise/{s}"] = (jacobian @ jacobian.T, sample(jnp.zeros(flat.size + m)))
    out[f"evidence/{s}"] = nox.laplace_log_marginal_likelihood(params, stats, log_likelihood=-3.0, structure=s, **kw)
    out[f"tau/{s}"] = nox.tune_prior_precision(
      params, stats, dataset_size=N_DATA, structure=s, grid_points=21, refine_steps=30
    )
  tokens = data()[0]
  apply_fn = lambda p: model.apply({"params": p}, tokens)
  out["predictive"] = nox.linearized_predictive(apply_fn, params, out["sample/full"])
  return out


@functools.cache
def scanned_and_unrolled():
  params = scanned_params()
  vector = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.2, params)
  kw = dict(fisher="full", likelihood="categorical")

  @jax.jit
  def run(params, vector, key):
    _, _, stats = nox.value_grad_and_stats(loss_of(Scanned()), **kw)(params)
    _, _, unrolled_stats = nox.value_grad_and_stats(loss_of(Unrolled()), **kw)(unroll(params))
    return (
      stats,
      unrolled_stats,
      everything(Scanned(), params, stats, vector, key, lambda t: ravel_pytree(unroll(t))[0]),
      everything(Unrolled(), unroll(params), unrolled_stats, unroll(vector), key, lambda t: ravel_pytree(t)[0]),
    )

  return params, vector, run(params, vector, jax.random.key(0))


@pytest.mark.parametrize(
  "name",
  # the default run computes every function once (one compilation) and checks the Fisher-vector product;
  # CI's second step checks the rest
  ["fv"]
  + [
    pytest.param(n, marks=pytest.mark.slow)
    for n in ["solve", "diagonal", "noise", "sample", "evidence", "tau", "predictive"]
  ],
)
def test_scanned_embed_model_equals_unrolled_one_hot_model(name):
  _, _, (stats, unrolled_stats, scanned, unrolled) = scanned_and_unrolled()
  assert stats[("cells", "mlp")].stack_shape == (LENGTH,) and stats[("embed",)].kind == "embed"
  keys = [k for k in scanned if k == name or k.startswith(name + "/")]
  assert keys
  for key in keys:
    got, expected = scanned[key], unrolled[key]
    if key.startswith("sample/") and key != "sample/full":  # the eigenbases differ by a rotation: shapes only
      jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), unroll(got, lead=1), expected)
      got = expected = None
    if isinstance(got, dict):
      got = unroll(got, lead=1 if key.startswith("sample/") else 0)
    rtol = 1e-6 if key.startswith("tau/") else 1e-9  # golden-section maximisers: ~√ε of a flat objective
    jax.tree.map(
      lambda a, b, key=key, rtol=rtol: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12, err_msg=key),
      got,
      expected,
    )
    for leaf in jax.tree.leaves(got):
      assert np.all(np.isfinite(leaf)), key
  if name == "sample":  # the samples differ from the mean on every captured leaf, stacked ones included
    for key in keys:
      for leaf, mean in zip(jax.tree.leaves(scanned[key]), jax.tree.leaves(scanned_params())):
        assert not np.allclose(leaf, mean[None]), key


def test_kronecker_factors_of_copies_and_embeddings():
  """Every copy of a stacked layer gets its own factors; an embedding's A is the diagonal of token frequencies,
  and factors from a KFAC state built with nox.kernel_layouts give the same posterior as the batch's."""
  params, _, (stats, unrolled_stats, _, _) = scanned_and_unrolled()
  factors, dense = nox.kronecker_factors(stats), nox.kronecker_factors(unrolled_stats)
  assert set(factors) == {"embed", "cells/mlp[0]", "cells/mlp[1]", "head"}
  np.testing.assert_allclose(np.diag(dense["embed"].a), factors["embed"].a, rtol=1e-12)
  np.testing.assert_allclose(dense["embed"].a, np.diag(np.diag(dense["embed"].a)), atol=1e-15)
  counts = np.bincount(np.asarray(data()[0]).reshape(-1), minlength=VOCAB)
  np.testing.assert_allclose(factors["embed"].a, counts / (N * T), rtol=1e-12)
  for i in range(LENGTH):
    for part in (0, 1):
      np.testing.assert_allclose(factors[f"cells/mlp[{i}]"][part], dense[f"cell_{i}/mlp"][part], rtol=1e-10)

  tx = nox.kfac(1e-3, ema_decay=0.9, phase="statistics", kernel_input_ndim=nox.kernel_layouts(stats))
  kw = dict(prior_precision=TAU, dataset_size=N_DATA, structure="kfac")

  @jax.jit
  def from_state_and_stats(stats, key):
    state = tx.update(params, tx.init(params), params, stats=stats)[1]
    from_state = nox.kronecker_factors(state, positions=T)  # a state averages G over rows, not examples
    evidence = [nox.laplace_log_marginal_likelihood(params, f, log_likelihood=0.0, **kw) for f in (from_state, stats)]
    return from_state, nox.laplace_sample(key, params, from_state, num_samples=3, **kw), evidence

  from_state, sample, (evidence, expected) = from_state_and_stats(stats, jax.random.key(1))
  assert set(from_state) == set(factors)
  for name in factors:
    for part in (0, 1):
      np.testing.assert_allclose(from_state[name][part], factors[name][part], rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(evidence, expected, rtol=1e-12)
  jax.tree.map(lambda s, p: np.testing.assert_equal(s.shape, (3,) + p.shape), sample, params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(sample))


def explicit_ggn(model, params):
  """``Jᵀ (∇²_z L) J / T`` over all parameters (ravel order) for the mean loss ``L`` of ``model``.

  The captured Fisher is that of each sequence's negative log-likelihood averaged over its ``T`` positions,
  ``(1/n) Σ_i (1/T²) Σ_t J_itᵀ H_it J_it``, and ``∇²_z L`` of the mean over ``n·T`` positions is
  ``H_it / (nT)``: hence the ``1/T``.
  """
  tokens, _ = data()
  flat, unravel = ravel_pytree(params)
  logits_of = lambda f: model.apply({"params": unravel(f)}, tokens)

  @jax.jit
  def run(flat):
    jacobian = jax.jacfwd(logits_of)(flat).reshape(-1, flat.size)
    z = logits_of(flat)
    hessian = jax.hessian(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, data()[1]).mean())(z)
    return jacobian.T @ hessian.reshape(z.size, z.size) @ jacobian / T

  return np.asarray(run(flat)), flat, unravel


def assert_close(actual, expected, rtol=1e-9):
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_unrolled_one_hot_model_against_explicit_ggn():
  """The reference side of the equality above, independently: F v, (F + λI)⁻¹v, diag F, the full posterior's
  evidence and its sample map against the explicit Gauss-Newton matrix of the unrolled model."""
  params, vector, (_, _, _, unrolled) = scanned_and_unrolled()
  fisher, flat, _ = explicit_ggn(Unrolled(), unroll(params))
  v = np.asarray(ravel_pytree(unroll(vector))[0])
  d = flat.size
  assert_close(ravel_pytree(unrolled["fv"])[0], fisher @ v)
  assert_close(ravel_pytree(unrolled["solve"])[0], np.linalg.solve(fisher + DAMPING * np.eye(d), v))
  assert_close(ravel_pytree(unrolled["diagonal"])[0], np.diag(fisher))
  precision = TAU * np.eye(d) + N_DATA * fisher
  evidence = -3.0 - 0.5 * (TAU * flat @ flat + np.linalg.slogdet(precision)[1] - d * np.log(TAU))
  np.testing.assert_allclose(unrolled["evidence/full"], evidence, rtol=1e-10)
  diagonal = TAU * np.eye(d) + N_DATA * np.diag(np.diag(fisher))
  evidence = -3.0 - 0.5 * (TAU * flat @ flat + np.linalg.slogdet(diagonal)[1] - d * np.log(TAU))
  np.testing.assert_allclose(unrolled["evidence/diagonal"], evidence, rtol=1e-10)


def test_tied_attend_head():
  """A table used by the lookups and as the output layer (Embed.attend): the full and diagonal posteriors are
  exact over both uses; the Kronecker structures raise a clear error naming the table and what to use."""
  params = scanned_params(tied=True)
  tokens, _ = data()
  labels = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, size=(N, T)))
  vector = jax.tree.map(lambda x: jnp.sin(2.0 * x) + 0.3, params)
  capture = nox.value_grad_and_stats(loss_of(Scanned(tied=True), labels), fisher="full", likelihood="categorical")

  @jax.jit
  def run(params, vector):
    _, _, stats = capture(params)
    kw = dict(prior_precision=TAU, dataset_size=N_DATA)
    evidence = {
      s: nox.laplace_log_marginal_likelihood(params, stats, log_likelihood=0.0, structure=s, **kw)
      for s in ("full", "diagonal")
    }
    return stats, nox.fisher_vector_product(stats, vector), nox.fisher_diagonal(stats, vector), evidence

  stats, fv, diagonal, evidence = run(params, vector)
  assert stats[("embed",)].tied is not None
  tokens_model = Scanned(tied=True)
  flat, unravel = ravel_pytree(params)
  logits_of = lambda f: tokens_model.apply({"params": unravel(f)}, tokens)

  @jax.jit
  def ggn(flat):
    jacobian = jax.jacfwd(logits_of)(flat).reshape(-1, flat.size)
    z = logits_of(flat)
    hessian = jax.hessian(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(z)
    return jacobian.T @ hessian.reshape(z.size, z.size) @ jacobian / T

  fisher = np.asarray(ggn(flat))
  d = flat.size
  assert_close(ravel_pytree(fv)[0], fisher @ np.asarray(ravel_pytree(vector)[0]))
  assert_close(ravel_pytree(diagonal)[0], np.diag(fisher))
  for structure, precision in (
    ("full", TAU * np.eye(d) + N_DATA * fisher),
    ("diagonal", TAU * np.eye(d) + N_DATA * np.diag(np.diag(fisher))),
  ):
    expected = -0.5 * (TAU * flat @ flat + np.linalg.slogdet(precision)[1] - d * np.log(TAU))
    np.testing.assert_allclose(evidence[structure], expected, rtol=1e-10, err_msg=structure)
  for structure in ("kfac", "kfac_heuristic", "input_factor"):
    with pytest.raises(NotImplementedError, match=r"\['embed'\] are tied.*structure='full' or 'diagonal'"):
      jax.eval_shape(
        lambda: nox.laplace_sample(
          jax.random.key(0), params, stats, prior_precision=TAU, dataset_size=N_DATA, structure=structure
        )
      )
