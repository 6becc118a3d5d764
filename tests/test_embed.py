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
import pytest
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


def test_token_rows_linear_algebra_equals_explicit_per_example_gradients(x64):
  """Gram matrix (both contraction orders), Jᵀv and Jw of one-hot rows kept as token ids, with and
  without a tied output use, against explicit per-example gradients ``ψ``."""
  from neuron_optax._src import linalg
  from neuron_optax._src.layer_stats import TokenRows

  rng = np.random.default_rng(1)
  for vocab, positions in ((4, 3), (60, 2)):  # per-example gradients cheaper / position pairs cheaper
    ids = jnp.asarray(rng.integers(0, vocab, size=(5, positions)))
    g = jnp.asarray(rng.normal(size=(2, 5, positions, 3)))
    queries, h = jnp.asarray(rng.normal(size=(5, 2, 3))), jnp.asarray(rng.normal(size=(2, 5, 2, vocab)))
    v, w = jnp.asarray(rng.normal(size=(vocab, 3))), jnp.asarray(rng.normal(size=(10,)))
    psi = np.einsum("nps,tnpo->tnso", np.eye(vocab)[np.asarray(ids)], np.asarray(g)).reshape(10, vocab, 3)
    tied_psi = psi + np.einsum("tnqs,nqf->tnsf", np.asarray(h), np.asarray(queries)).reshape(10, vocab, 3)
    for rows, expected in ((TokenRows(ids, vocab), psi), (TokenRows(ids, vocab, queries, h), tied_psi)):
      flat = expected.reshape(10, -1)
      np.testing.assert_allclose(linalg.per_example_gradients(rows, g), expected, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(linalg.gradient_gram(rows, g), flat @ flat.T, rtol=1e-11, atol=1e-12)
      np.testing.assert_allclose(linalg.gradient_dots(rows, g, v), flat @ np.asarray(v).reshape(-1), rtol=1e-11)
      np.testing.assert_allclose(
        linalg.weighted_gradient_sum(rows, g, w), np.einsum("m,mso->so", w, expected), rtol=1e-11
      )


class Tied(nn.Module):
  """Lookup, a tanh-Dense, and the table again as the output layer (``Embed.attend``), or, with
  ``untied``, a bias-free Dense head whose kernel is the table transposed."""

  untied: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, FEATURES, param_dtype=jnp.float64, name="embed")
    h = jnp.tanh(nn.Dense(FEATURES, param_dtype=jnp.float64, name="mid")(embed(tokens)))
    if self.untied:
      return nn.Dense(VOCAB, use_bias=False, param_dtype=jnp.float64, name="head")(h)
    return embed.attend(h)


def test_tied_table_rows_and_exact_natural_gradient_and_fngd(x64):
  """A tied table records the rows of both uses (its output use exactly as a bias-free head with the
  table transposed as kernel would); the natural gradient (whole network and block-diagonal) and FNGD
  match explicit per-example gradients over both uses; FOOF and KFAC warn and pass it through."""
  from jax.flatten_util import ravel_pytree

  tokens, labels = _data()
  model = Tied()
  params = model.init(jax.random.key(0), tokens)["params"]
  untied = {**params, "head": {"kernel": params["embed"]["embedding"].T}}
  kw = dict(fisher="full", likelihood="categorical")
  _, grads, stats = jax.jit(nox.value_grad_and_stats(_xent(model, tokens, labels), **kw))(params)
  _, _, untied_stats = jax.jit(nox.value_grad_and_stats(_xent(Tied(untied=True), tokens, labels), **kw))(untied)
  table, head = stats[("embed",)], untied_stats[("head",)]
  assert set(stats) == {("embed",), ("mid",)} and table.tied.kernel_shape == (FEATURES, VOCAB)
  for field in ("inputs", "cotangents", "fisher_cotangents"):
    np.testing.assert_allclose(getattr(table.tied, field), getattr(head, field), rtol=1e-10, atol=1e-16)
  np.testing.assert_allclose(
    table.kernel_gradient(table.cotangents) + table.tied_gradient(), grads["embed"]["embedding"], rtol=1e-10
  )

  damping, alpha = 0.05, 0.3
  transforms = {
    "natural_gradient": nox.natural_gradient(damping),
    "block": nox.natural_gradient(damping, block_diagonal=True),
    "fngd": nox.fngd(alpha, steps_per_epoch=1, batch_size=N),
    "foof": nox.foof(1.0),
    "kfac": nox.kfac(0.1),
  }

  @jax.jit
  def directions(params):
    _, grads, stats = nox.value_grad_and_stats(_xent(model, tokens, labels))(params)  # empirical Fisher
    return grads, {name: tx.update(grads, tx.init(params), params, stats=stats)[0] for name, tx in transforms.items()}

  with pytest.warns(UserWarning, match="'embed' is tied to an output layer") as warned:
    grads, out = directions(params)
  assert {str(w.message).split(":")[0] for w in warned} == {"foof", "kfac"}
  for name in ("foof", "kfac"):  # the tied table passes through, the other layers are preconditioned
    np.testing.assert_array_equal(out[name]["embed"]["embedding"], grads["embed"]["embedding"])
    assert not np.allclose(out[name]["mid"]["kernel"], grads["mid"]["kernel"])

  def example_loss(p, t, y):
    return _xent(model, t[None], y[None])(p)

  psi = jax.jit(jax.vmap(lambda t, y: ravel_pytree(jax.grad(example_loss)(params, t, y))[0]))(tokens, labels)
  psi, grad = np.asarray(psi), np.asarray(ravel_pytree(grads)[0])
  np.testing.assert_allclose(psi.mean(0), grad, rtol=1e-10, atol=1e-15)
  table_leaves = jax.tree.map(lambda x: jnp.full(x.shape, x.shape == (VOCAB, FEATURES)), params)
  in_table = np.asarray(ravel_pytree(table_leaves)[0])
  table_psi = psi[:, in_table]
  gram = table_psi @ table_psi.T
  c = np.linalg.solve(np.eye(N) + gram / (alpha * np.linalg.norm(gram)), np.ones(N)) / N
  expected = {
    "natural_gradient": np.linalg.solve(psi.T @ psi / N + damping * np.eye(len(grad)), grad),
    "block": np.linalg.solve(table_psi.T @ table_psi / N + damping * np.eye(in_table.sum()), grad[in_table]),
    "fngd": c @ table_psi,
  }
  for name, reference in expected.items():
    direction = np.asarray(ravel_pytree(out[name])[0])
    got = direction if name == "natural_gradient" else direction[in_table]
    np.testing.assert_allclose(got, reference, rtol=1e-8, atol=1e-12, err_msg=name)


class NnxTied(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, FEATURES, param_dtype=jnp.float64, rngs=rngs)
    self.mid = nnx.Linear(FEATURES, FEATURES, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, tokens):
    return self.embed.attend(jnp.tanh(self.mid(self.embed(tokens))))


@pytest.mark.slow  # CI's second step (issue 28: the default run within 10 minutes)
def test_nnx_embed_and_tied_output_match_linen(x64):
  tokens, labels = _data()
  model = NnxTied(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert nox.nnx.kernel_layouts(model) == {"embed": 1, "mid": 1}

  def loss_fn(model, tokens, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()

  @nnx.jit
  def run(model):
    _, grads, stats = nox.nnx.value_grad_and_stats(loss_fn, fisher="full", likelihood="categorical")(
      model, tokens, labels
    )
    state, tx = nnx.state(model, nnx.Param), nox.natural_gradient(0.05)
    return stats, tx.update(grads, tx.init(state), state, stats=stats)[0]

  stats, direction = run(model)
  capture = nox.value_grad_and_stats(_xent(Tied(), tokens, labels), fisher="full", likelihood="categorical")
  _, linen_grads, linen_stats = jax.jit(capture)(params)
  nnx_table, linen_table = stats[("embed",)], linen_stats[("embed",)]
  np.testing.assert_array_equal(nnx_table.layer_inputs, tokens)
  for part, expected in ((nnx_table, linen_table), (nnx_table.tied, linen_table.tied)):
    for field in ("layer_inputs", "cotangents", "fisher_cotangents"):
      np.testing.assert_allclose(getattr(part, field), getattr(expected, field), rtol=1e-10, atol=1e-16)
  tx = nox.natural_gradient(0.05)
  expected, _ = tx.update(linen_grads, tx.init(params), params, stats=linen_stats)
  np.testing.assert_allclose(direction["embed"]["embedding"][...], expected["embed"]["embedding"], rtol=1e-9)
