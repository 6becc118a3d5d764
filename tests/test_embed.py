"""Embeddings: ``nn.Embed``/``nnx.Embed`` against the equivalent bias-free Dense on one-hot inputs (float64).

An embedding lookup is a dense layer whose input row is the one-hot vector of the token: every
method must give the embedding table exactly the direction it gives the kernel of a bias-free
``nn.Dense`` applied to ``one_hot(tokens)`` (FOOF's and KFAC's input factor is then the diagonal
of token frequencies, kept as a vector; the natural gradient's and FNGD's Gram block is token
equality), step after step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import assert_stats_match_grads
from flax import nnx

import neuron_optax as nox

VOCAB, FEATURES, CLASSES, N, T = 7, 3, 4, 5, 3


class Embedded(nn.Module):
  one_hot: bool = False

  @nn.compact
  def __call__(self, tokens):
    if self.one_hot:
      x = nn.Dense(FEATURES, use_bias=False, name="embed")(jax.nn.one_hot(tokens, VOCAB, dtype=jnp.float64))
    else:
      x = nn.Embed(VOCAB, FEATURES, param_dtype=jnp.float64, name="embed")(tokens)
    return nn.Dense(CLASSES, param_dtype=jnp.float64, name="head")(jnp.tanh(x))


def _data():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB - 1, size=(N, T))  # token VOCAB - 1 never occurs: a zero frequency
  return jnp.asarray(tokens), jnp.asarray(rng.integers(0, CLASSES, size=(N, T)))


def _xent(model, tokens, labels):
  return lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, tokens), labels).mean()


def _as_dense(params):
  """The embedding model's parameters as the one-hot model's (the table is the Dense kernel)."""
  return {"embed": {"kernel": params["embed"]["embedding"]}, "head": params["head"]}


METHODS = {
  "foof": lambda: nox.foof(0.3, inverse_every=2),
  "kfac_heuristic": lambda: nox.kfac(0.05),
  "kfac_standard": lambda: nox.kfac(0.05, damping_mode="standard"),
  "fngd": lambda: nox.fngd(0.2, steps_per_epoch=2, batch_size=N),
  "natural_gradient": lambda: nox.natural_gradient(0.01),
  "natural_gradient_block": lambda: nox.natural_gradient(0.01, block_diagonal=True),
}


def test_embed_rows_and_directions_equal_one_hot_dense_for_every_method(x64):
  """The recorded rows, then three steps of every method on both models, from one MC-Fisher capture
  per step (FOOF and FNGD ignore its Fisher cotangents); the parameters follow FOOF."""
  tokens, labels = _data()
  params = Embedded().init(jax.random.key(0), tokens)["params"]
  embedded = {name: make() for name, make in METHODS.items()}
  dense = {name: make() for name, make in METHODS.items()}

  def run(model, transforms, params, states, key):
    capture = nox.value_grad_and_stats(_xent(model, tokens, labels), fisher="mc", likelihood="categorical")
    _, grads, stats = capture(params, rng=key)
    return grads, stats, {name: tx.update(grads, states[name], params, stats=stats) for name, tx in transforms.items()}

  @jax.jit
  def step(params, states, dense_states, key):
    return run(Embedded(), embedded, params, states, key), run(
      Embedded(one_hot=True), dense, _as_dense(params), dense_states, key
    )

  states = {name: tx.init(params) for name, tx in embedded.items()}
  dense_states = {name: tx.init(_as_dense(params)) for name, tx in dense.items()}
  assert states["foof"].layers["embed"].a_ema.shape == (VOCAB,)  # a vector, not a vocab x vocab matrix
  for t in range(3):
    (grads, stats, out), (_, dense_stats, out_dense) = step(params, states, dense_states, jax.random.key(t))
    if t == 0:
      s = stats[("embed",)]
      assert (s.kind, s.has_bias, s.kernel_shape, s.d_in) == ("embed", False, (VOCAB, FEATURES), VOCAB)
      np.testing.assert_array_equal(s.layer_inputs, tokens)  # rows are tokens: the ids, never one-hot rows
      np.testing.assert_allclose(s.inputs, dense_stats[("embed",)].inputs)
      np.testing.assert_allclose(s.cotangents, dense_stats[("embed",)].cotangents, rtol=1e-12)
      counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=VOCAB)
      np.testing.assert_allclose(s.input_moment(), counts / (N * T))  # the diagonal of A
      assert_stats_match_grads(grads, {("embed",): s}, rtol=1e-12)  # the lookups' scatter-add is the gradient
    for name in METHODS:
      (direction, states[name]), (expected, dense_states[name]) = out[name], out_dense[name]
      assert not np.allclose(direction["embed"]["embedding"], 0)
      jax.tree.map(
        lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13, err_msg=f"{name}, step {t}"),
        _as_dense(direction),
        expected,
      )
    params = jax.tree.map(lambda p, d: p - 0.3 * d, params, out["foof"][0])


class NnxEmbedded(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, FEATURES, param_dtype=jnp.float64, rngs=rngs)
    self.head = nnx.Linear(FEATURES, CLASSES, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, tokens):
    return self.head(jnp.tanh(self.embed(tokens)))


def test_nnx_embed_matches_linen(x64):
  tokens, labels = _data()
  model = NnxEmbedded(nnx.Rngs(0))
  params = {"embed": {"embedding": model.embed.embedding[...]}, "head": nnx.to_pure_dict(nnx.state(model.head))}
  assert nox.nnx.kernel_input_ndim(model) == {"embed": 1, "head": 1}

  def loss_fn(model, tokens, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()

  @nnx.jit
  def run(model):
    _, grads, stats = nox.nnx.value_grad_and_stats(loss_fn)(model, tokens, labels)
    tx = nox.kfac(0.05, damping_mode="standard")
    state = nnx.state(model, nnx.Param)
    return stats, tx.update(grads, tx.init(state), state, stats=stats)[0]

  stats, direction = run(model)
  _, linen_grads, linen_stats = nox.value_grad_and_stats(_xent(Embedded(), tokens, labels))(params)
  np.testing.assert_array_equal(stats[("embed",)].layer_inputs, tokens)
  np.testing.assert_allclose(stats[("embed",)].cotangents, linen_stats[("embed",)].cotangents, rtol=1e-12)
  tx = nox.kfac(0.05, damping_mode="standard")
  expected, _ = tx.update(linen_grads, tx.init(params), params, stats=linen_stats)
  np.testing.assert_allclose(direction["embed"]["embedding"][...], expected["embed"]["embedding"], rtol=1e-10)


def test_token_rows_linear_algebra_equals_one_hot_rows(x64):
  """Gram matrix (both contraction orders), Jᵀv and Jw of one-hot rows kept as token ids."""
  from neuron_optax import linalg
  from neuron_optax.layer_stats import TokenRows

  rng = np.random.default_rng(1)
  for vocab, positions in ((4, 3), (60, 2)):  # per-example gradients cheaper / position pairs cheaper
    ids = jnp.asarray(rng.integers(0, vocab, size=(5, positions)))
    g = jnp.asarray(rng.normal(size=(2, 5, positions, 3)))
    rows, one_hot = TokenRows(ids, vocab), jax.nn.one_hot(ids, vocab, dtype=jnp.float64)
    v, w = jnp.asarray(rng.normal(size=(vocab, 3))), jnp.asarray(rng.normal(size=(10,)))
    np.testing.assert_allclose(linalg.gradient_gram(rows, g), linalg.gradient_gram(one_hot, g), rtol=1e-12)
    np.testing.assert_allclose(linalg.gradient_dots(rows, g, v), linalg.gradient_dots(one_hot, g, v), rtol=1e-12)
    np.testing.assert_allclose(
      linalg.weighted_gradient_sum(rows, g, w), linalg.weighted_gradient_sum(one_hot, g, w), rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(linalg.per_example_gradients(rows, g), linalg.per_example_gradients(one_hot, g))
