"""natural_gradient against explicit float64 (F + λI)⁻¹ g built from per-example gradients.

The references never use the library's cotangents: per-example (and per-class)
gradients come from ``jax.vmap(jax.grad(...))`` over a flat vector of the
captured layers' parameters (``ravel_pytree``), and the Fisher is formed and
solved in NumPy. Expensive pieces (captures, references) are cached per
configuration so each is compiled once.
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

from neuron_optax import value_grad_and_stats
from neuron_optax._src.linalg import damped_solve
from neuron_optax._src.natural_gradient import natural_gradient

pytestmark = pytest.mark.usefixtures("x64")

DAMPING = 1e-3
UNCAPTURED = "norm"


class MLP(nn.Module):
  """Two captured Dense layers around an uncaptured LayerNorm."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(5, name="hidden")(x)
    x = nn.LayerNorm(name=UNCAPTURED)(jnp.tanh(x))
    return nn.Dense(3, name="out")(x)


class ConvNet(nn.Module):
  """Exercises both exact Gram contractions of linalg.gradient_gram for P > 1 rows."""

  @nn.compact
  def __call__(self, x):
    # 6 positions, 19 x 4 gradient: per-example gradients are the cheaper contraction.
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv")(x))
    # 2 positions, 17 x 8 gradient: position-pair Gram matrices are the cheaper contraction.
    x = jnp.tanh(nn.Conv(8, (2, 2), padding="VALID", name="conv_2")(x))
    return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


class Logistic(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(x)


class WiderMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(7, name="hidden")(x)
    x = nn.LayerNorm(name=UNCAPTURED)(jnp.tanh(x))
    return nn.Dense(3, name="out")(x)


class Reshaped(nn.Module):
  """The first layer sees (batch * 2, 2) rows: its example axis is not the batch."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(3, name="first")(x.reshape(-1, 2)))
    return nn.Dense(3, name="out")(h.reshape(x.shape[0], -1))


MODELS = {
  "mlp": (MLP(), (6, 4)),
  "conv": (ConvNet(), (3, 6, 4, 2)),
  "logistic": (Logistic(), (7, 4)),
  "wider": (WiderMLP(), (6, 4)),
  "reshaped": (Reshaped(), (5, 4)),
}


@functools.cache
def parameters(name):
  """float64 parameters, non-trivial everywhere (biases and norm parameters too)."""
  model, x_shape = MODELS[name]
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(x_shape, jnp.float64))
  rng = np.random.default_rng(0)

  def draw(leaf):
    scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.3
    return jnp.asarray(rng.normal(scale=scale, size=leaf.shape))

  return jax.tree_util.tree_map(draw, shapes["params"])


@functools.cache
def batch(name, seed=2, n=None, classes=3):
  x_shape = MODELS[name][1]
  x_shape = x_shape if n is None else (n,) + x_shape[1:]
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.integers(0, classes, x_shape[:1]))


def ce_loss(model, x, y):
  def loss_fn(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


@functools.cache
def captured(name, fisher="empirical", seed=2, n=None):
  """``(grads, stats)`` from value_grad_and_stats on a batch of model ``name``."""
  x, y = batch(name, seed, n)
  likelihood = None if fisher == "empirical" else "categorical"
  capture = jax.jit(value_grad_and_stats(ce_loss(MODELS[name][0], x, y), fisher=fisher, likelihood=likelihood))
  _, grads, stats = capture(parameters(name), **({"rng": jax.random.PRNGKey(7)} if fisher == "mc" else {}))
  return grads, stats


def split(params):
  captured_layers = {k: v for k, v in params.items() if k != UNCAPTURED}
  return captured_layers, {k: v for k, v in params.items() if k == UNCAPTURED}


class Reference:
  """Per-example gradients of the captured layers' flat parameter vector."""

  def __init__(self, name):
    self.model = MODELS[name][0]
    captured_layers, self.rest = split(parameters(name))
    self.flat, self.unravel = ravel_pytree(captured_layers)
    ids = {
      layer: jax.tree_util.tree_map(lambda leaf, i=i: jnp.full(leaf.shape, i), leaves)
      for i, (layer, leaves) in enumerate(sorted(captured_layers.items()))
    }
    self.layer_of = np.asarray(ravel_pytree(ids)[0])

  def logits(self, flat, x):
    return self.model.apply({"params": {**self.unravel(flat), **self.rest}}, x[None])[0]

  def nll(self, flat, x, label):
    return -jax.nn.log_softmax(self.logits(flat, x))[label]

  def gradient(self, x, y):
    """Gradient of the mean loss (what ``grads`` should hold)."""
    mean_loss = lambda f: jnp.mean(jax.vmap(lambda xi, yi: self.nll(f, xi, yi))(x, y))
    return np.asarray(jax.jit(jax.grad(mean_loss))(self.flat))

  def empirical_fisher(self, x, y):
    """``(1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` with the given labels."""
    psi = np.asarray(jax.jit(jax.vmap(jax.grad(self.nll), (None, 0, 0)))(self.flat, x, y))
    return psi.T @ psi / x.shape[0]

  def full_fisher(self, x):
    """``(1/n) Σ_i Σ_c p(c|x_i) ∇(−log p(c|x_i)) ∇(−log p(c|x_i))ᵀ``."""

    @jax.jit
    def per_class_gradients_and_probs(flat):
      logits = jax.vmap(lambda xi: self.logits(flat, xi))(x)
      labels = jnp.arange(logits.shape[-1])
      per_class = jax.vmap(jax.grad(self.nll), (None, None, 0))
      return jax.vmap(lambda xi: per_class(flat, xi, labels))(x), jax.nn.softmax(logits)

    psi, probs = map(np.asarray, per_class_gradients_and_probs(self.flat))  # (n, c, d), (n, c)
    return np.einsum("ic,icd,ice->de", probs, psi, psi) / x.shape[0]

  def gaussian_full_fisher(self, x):
    """``(1/n) Σ_i J_iᵀ J_i`` with ``J_i`` the Jacobian of the outputs."""
    jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(self.logits), (None, 0)))(self.flat, x))  # (n, k, d)
    return np.einsum("ikd,ike->de", jac, jac) / x.shape[0]

  def block_diagonal(self, fisher):
    return np.where(self.layer_of[:, None] == self.layer_of[None, :], fisher, 0.0)

  @staticmethod
  def natural_gradient(fisher, gradient):
    return np.linalg.solve(fisher + DAMPING * np.eye(fisher.shape[0]), gradient)

  @staticmethod
  def captured_vector(updates):
    return np.asarray(ravel_pytree(split(updates)[0])[0])


@functools.cache
def reference(name):
  return Reference(name)


@functools.cache
def explicit(name, fisher, seed=2, n=None):
  """``(F, g)``: explicit Fisher of the batch and gradient of the mean loss on it."""
  ref, (x, y) = reference(name), batch(name, seed, n)
  f = ref.empirical_fisher(x, y) if fisher == "empirical" else ref.full_fisher(x)
  return f, ref.gradient(x, y)


def whole_and_block(name, grads, stats=None, fisher_stats=None, also_without_stats=False):
  """Updates of the whole-network and block-diagonal transforms, compiled together.

  With ``also_without_stats``, a third result: the whole-network update given
  ``fisher_stats`` only.
  """
  params = parameters(name)
  whole, block = natural_gradient(DAMPING), natural_gradient(DAMPING, block_diagonal=True)

  @jax.jit
  def run(grads, stats, fisher_stats):
    calls = [(whole, stats), (block, stats)] + [(whole, None)] * also_without_stats
    outs = [tx.update(grads, tx.init(params), params, stats=s, fisher_stats=fisher_stats) for tx, s in calls]
    assert all(type(state).__name__ == "NaturalGradientState" for _, state in outs)  # a step counter (schedules)
    return [updates for updates, _ in outs]

  return run(grads, stats, fisher_stats)


def assert_close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("fisher", ["empirical", "full"])
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_matches_explicit_fisher(name, fisher):
  grads, stats = captured(name, fisher)
  whole, block = whole_and_block(name, grads, stats)
  f, g = explicit(name, fisher)
  ref = reference(name)
  assert_close(ref.captured_vector(whole), ref.natural_gradient(f, g))
  assert_close(ref.captured_vector(block), ref.natural_gradient(ref.block_diagonal(f), g))
  # The cross-layer blocks matter here, so the two checks above are distinct.
  assert np.linalg.norm(ref.captured_vector(whole) - ref.captured_vector(block)) > 0.05 * np.linalg.norm(
    ref.captured_vector(whole)
  )
  # The uncaptured LayerNorm is not in the Fisher: its gradient passes through untouched.
  for updates in (whole, block):
    assert set(updates) == set(grads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, split(updates)[1], split(grads)[1])


def test_mc_fisher_matches_explicit():
  grads, stats = captured("mlp", "mc")
  whole, _ = whole_and_block("mlp", grads, stats)
  # The sampled label is where the output cotangent p − onehot(label) is negative.
  sampled = jnp.argmin(stats[("out",)].fisher_cotangents[0, :, 0], axis=-1)
  ref, (x, y) = reference("mlp"), batch("mlp")
  expected = ref.natural_gradient(ref.empirical_fisher(x, sampled), ref.gradient(x, y))
  assert_close(ref.captured_vector(whole), expected)


def test_gaussian_full_fisher_matches_explicit():
  model, params, (x, _) = MODELS["mlp"][0], parameters("mlp"), batch("mlp")
  targets = jnp.asarray(np.random.default_rng(5).normal(size=(x.shape[0], 3)))

  def loss_fn(p):
    return 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, x) - targets) ** 2, axis=-1))

  _, grads, stats = jax.jit(value_grad_and_stats(loss_fn, fisher="full", likelihood="gaussian"))(params)
  whole, _ = whole_and_block("mlp", grads, stats)
  ref = reference("mlp")
  gradient = np.asarray(jax.jit(jax.grad(lambda f: loss_fn({**ref.unravel(f), **ref.rest})))(ref.flat))
  assert_close(ref.captured_vector(whole), ref.natural_gradient(ref.gaussian_full_fisher(x), gradient))


def test_logistic_regression_full_fisher_block_diagonal_is_exact():
  """One layer: the block-diagonal Fisher is the Fisher (Benzing 2022, §3.2)."""
  grads, stats = captured("logistic", "full")
  whole, block = whole_and_block("logistic", grads, stats)
  f, g = explicit("logistic", "full")
  ref = reference("logistic")
  assert_close(ref.captured_vector(whole), ref.natural_gradient(f, g))
  assert_close(ref.captured_vector(block), ref.natural_gradient(f, g))


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_fisher_from_independent_batch(name):
  """Gradient on batch 1, full Fisher on a batch 2 of another size (Benzing 2022, App. I.5)."""
  grads, stats = captured(name, "empirical", seed=2)
  _, fisher_stats = captured(name, "full", seed=3, n=4)
  f, _ = explicit(name, "full", seed=3, n=4)
  _, g = explicit(name, "empirical", seed=2)
  ref = reference(name)
  whole, block, fisher_stats_only = whole_and_block(name, grads, stats, fisher_stats, also_without_stats=True)
  assert_close(ref.captured_vector(whole), ref.natural_gradient(f, g))
  assert_close(ref.captured_vector(block), ref.natural_gradient(ref.block_diagonal(f), g))
  # stats are optional when fisher_stats define the Fisher.
  assert_close(ref.captured_vector(fisher_stats_only), ref.natural_gradient(f, g))


def trace_update(tx, grads, params, **stats):
  """Runs ``update`` abstractly: trace-time checks fire, nothing is compiled."""
  return jax.eval_shape(lambda g, s: tx.update(g, tx.init(params), params, **s), grads, stats)


@pytest.mark.parametrize("block_diagonal", [False, True], ids=["whole", "block"])
def test_max_columns(block_diagonal):
  grads, stats = captured("mlp", "full")
  params = parameters("mlp")
  columns = 3 * MODELS["mlp"][1][0]  # classes x examples
  trace_update(
    natural_gradient(DAMPING, block_diagonal=block_diagonal, max_columns=columns), grads, params, stats=stats
  )
  trace_update(natural_gradient(DAMPING, block_diagonal=block_diagonal, max_columns=None), grads, params, stats=stats)
  tx = natural_gradient(DAMPING, block_diagonal=block_diagonal, max_columns=columns - 1)
  with pytest.raises(ValueError, match=f"m = {columns} columns.*fisher='mc'.*fisher_stats.*max_columns"):
    trace_update(tx, grads, params, stats=stats)
  with pytest.raises(ValueError, match="max_columns"):
    tx.update(grads, tx.init(params), params, stats=stats)


@pytest.mark.parametrize("damping", [0, 0.0, -1.0, True, "1", None])
def test_rejects_bad_damping(damping):
  with pytest.raises(ValueError, match="damping must be a positive number"):
    natural_gradient(damping)


@pytest.mark.parametrize("max_columns", [0, -5, 2.5, True])
def test_rejects_bad_max_columns(max_columns):
  with pytest.raises(ValueError, match="max_columns must be None or an integer"):
    natural_gradient(1.0, max_columns=max_columns)


def test_stats_errors():
  grads, stats = captured("mlp")
  params = parameters("mlp")
  _, wide_stats = captured("wider")
  tx = natural_gradient(DAMPING)
  with pytest.raises(ValueError, match="value_grad_and_stats"):
    trace_update(tx, grads, params)
  with pytest.raises(ValueError, match="'hidden' has kernel"):
    trace_update(tx, grads, params, stats=wide_stats)
  with pytest.raises(ValueError, match="fisher_stats.*'hidden' has kernel"):
    trace_update(tx, grads, params, stats=stats, fisher_stats=wide_stats)
  with pytest.raises(ValueError, match=r"different layers \(only in stats: \['out'\]"):
    trace_update(tx, grads, params, stats=stats, fisher_stats={("hidden",): stats[("hidden",)]})


def test_layers_with_different_example_axes():
  grads, stats = captured("reshaped")
  params = parameters("reshaped")
  assert stats[("first",)].batch_size != stats[("out",)].batch_size
  with pytest.raises(ValueError, match="disagree on .*block_diagonal=True"):
    trace_update(natural_gradient(DAMPING), grads, params, stats=stats)
  trace_update(natural_gradient(DAMPING, block_diagonal=True), grads, params, stats=stats)


def test_damped_solve_falls_back_when_cholesky_fails():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  rhs, shift = rng.normal(size=5), 1e-4
  indefinite = (q * np.array([-1e-3, 0.0, 1.0, 2.0, 3.0])) @ q.T  # a "PSD" matrix gone wrong
  psd = (q * np.array([1e-3, 0.0, 1.0, 2.0, 3.0])) @ q.T
  solve = jax.jit(damped_solve)
  expected = q @ ((q.T @ rhs) / np.array([shift, shift, 1 + shift, 2 + shift, 3 + shift]))
  np.testing.assert_allclose(solve(indefinite, shift, rhs), expected, rtol=1e-8)
  np.testing.assert_allclose(solve(psd, shift, rhs), np.linalg.solve(psd + shift * np.eye(5), rhs), rtol=1e-8)


def test_jit_train_step_reduces_loss():
  model = MLP()
  params = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float32), parameters("mlp"))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(32, 4)), jnp.float32)
  y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32) + (x[:, 2] > 1).astype(jnp.int32)
  tx = optax.chain(natural_gradient(0.1), optax.sgd(0.2))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, rng):
    loss, grads, stats = value_grad_and_stats(ce_loss(model, x, y), fisher="mc", likelihood="categorical")(
      params, rng=rng
    )
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for rng in jax.random.split(jax.random.PRNGKey(0), 25):
    params, opt_state, loss = train_step(params, opt_state, rng)
    losses.append(float(loss))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
