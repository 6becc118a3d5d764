"""The App. C tools on Flax NNX: an ``nnx.Embed`` lookup and ``nnx.scan``-stacked blocks against the unrolled model.

The stacked model's ``nnx.State`` goes into every function as it is; its results must equal, per copy, those of
the same function written with separate blocks and the embedding as a bias-free ``nnx.Linear`` on one-hot rows
(float64). The unrolled side is the reference checked against explicit matrices in ``test_laplace_transformer``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import neuron_optax as nox

pytestmark = pytest.mark.usefixtures("x64")

VOCAB, FEATURES, CLASSES, LENGTH, N, T = 5, 3, 3, 2, 4, 2
TAU, N_DATA = 0.5, 30.0
STRUCTURES = ("full", "diagonal", "kfac", "kfac_heuristic", "input_factor")


class Block(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(FEATURES, FEATURES, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return x + jnp.tanh(self.linear(x))


class Stacked(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=LENGTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.embed = nnx.Embed(VOCAB, FEATURES, rngs=rngs, param_dtype=jnp.float64)
    self.blocks = create(rngs)
    self.head = nnx.Linear(FEATURES, CLASSES, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(self.embed(tokens), self.blocks))


class Unrolled(nnx.Module):
  def __init__(self, stacked: Stacked):
    self.embed = nnx.Linear(VOCAB, FEATURES, use_bias=False, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    self.embed.kernel[...] = stacked.embed.embedding[...]
    self.blocks = nnx.List([Block(nnx.Rngs(0)) for _ in range(LENGTH)])
    for i, block in enumerate(self.blocks):
      block.linear.kernel[...] = stacked.blocks.linear.kernel[i]
      block.linear.bias[...] = stacked.blocks.linear.bias[i]
    self.head = nnx.clone(stacked.head)

  def __call__(self, tokens):
    x = self.embed(jax.nn.one_hot(tokens, VOCAB, dtype=jnp.float64))
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def unroll(tree):
  tree = nnx.to_pure_dict(tree)
  blocks = {i: {"linear": jax.tree.map(lambda x, i=i: x[i], tree["blocks"]["linear"])} for i in range(LENGTH)}
  return {"embed": {"kernel": tree["embed"]["embedding"]}, "blocks": blocks, "head": tree["head"]}


@pytest.mark.slow  # CI's second step (issue 28: the default run within 10 minutes)
def test_nnx_scanned_embed_model_equals_unrolled():
  rng = np.random.default_rng(0)
  tokens, labels = jnp.asarray(rng.integers(0, VOCAB, (N, T))), jnp.asarray(rng.integers(0, CLASSES, (N, T)))
  model = Stacked(nnx.Rngs(0))
  unrolled = Unrolled(model)

  def loss_fn(model, tokens, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()

  @nnx.jit
  def run(model, unrolled):
    out = []
    for m in (model, unrolled):
      capture = nox.nnx.value_grad_and_stats(loss_fn, fisher="full", likelihood="categorical")
      _, _, stats = capture(m, tokens, labels)
      params = nnx.state(m, nnx.Param)
      vector = jax.tree.map(lambda x: jnp.cos(2.0 * x), params)
      kw = dict(prior_precision=TAU, dataset_size=N_DATA)
      results = {
        "fv": nox.fisher_vector_product(stats, vector),
        "solve": nox.damped_fisher_solve(stats, vector, 0.1),
        "fisher_diagonal": nox.fisher_diagonal(stats, vector),
        "probit": nox.glm_predictive(lambda p, m=m: nnx.merge(nnx.graphdef(m), p)(tokens[:2]), params, stats, **kw),
      }
      for s in STRUCTURES:
        results[s] = nox.laplace_log_marginal_likelihood(params, stats, log_likelihood=-1.0, structure=s, **kw)
        results[f"tau/{s}"] = nox.tune_prior_precision(params, stats, dataset_size=N_DATA, structure=s, grid_points=21)
      out.append(results)
    return out

  stacked, reference = run(model, unrolled)
  for key, value in stacked.items():
    expected = reference[key]
    if key in ("fv", "solve", "fisher_diagonal"):
      value, expected = unroll(value), nnx.to_pure_dict(expected)
    # A maximiser found by golden-section search is determined to ~√ε of the (flat) objective only.
    rtol = 1e-6 if key.startswith("tau/") else 1e-9
    jax.tree.map(
      lambda a, b, key=key, rtol=rtol: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-13, err_msg=key),
      value,
      expected,
    )
  assert not np.allclose(unroll(stacked["fv"])["blocks"][1]["linear"]["kernel"], 0)
