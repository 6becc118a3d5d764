"""State rules at the edges: restored states that contradict static settings, swapped arguments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import neuron_optax as nox


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))


def _setup(n: int = 6):
  x = jax.random.normal(jax.random.key(1), (n, 2))
  y = jnp.arange(n) % 3
  model = _Mlp()
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  _, grads, stats = nox.value_grad_and_stats(loss)(params)
  return params, grads, stats


TRANSFORMS = {
  "foof": lambda: nox.foof(1.0),
  "kfac": lambda: nox.kfac(1.0),
  "natural_gradient": lambda: nox.natural_gradient(1.0),
  "natural_gradient_blocks": lambda: nox.natural_gradient(1.0, block_diagonal=True),
  "fngd": lambda: nox.fngd(0.1, steps_per_epoch=2, batch_size=6),
  "accumulate_micro_batches": lambda: nox.accumulate_micro_batches(nox.foof(1.0), 2),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_swapped_grads_and_stats_say_so(name):
  params, grads, stats = _setup()
  tx = TRANSFORMS[name]()
  with pytest.raises(TypeError, match=r"`stats` must be the dict returned by nox.value_grad_and_stats.*swapped"):
    tx.update(stats, tx.init(params), params, stats=grads)


def test_accumulation_state_restored_into_another_every_k_raises():
  params, grads, stats = _setup()
  saved_with_3 = nox.accumulate_micro_batches(nox.foof(1.0), 3)
  state = saved_with_3.init(params)
  _, state = saved_with_3.update(grads, state, params, stats=stats)
  _, state = saved_with_3.update(grads, state, params, stats=stats)  # mini_step 2: one short of a step
  restored_into_2 = nox.accumulate_micro_batches(nox.foof(1.0), 2)
  with pytest.raises(ValueError, match=r"every_k=3.*every_k=2"):
    jax.jit(lambda s: restored_into_2.update(grads, s, params, stats=stats))(state)
  # The same every_k restores and steps on the third micro-batch.
  updates, _ = jax.jit(lambda s: saved_with_3.update(grads, s, params, stats=stats))(state)
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
  fresh = restored_into_2.init(params)
  zero, fresh = restored_into_2.update(grads, fresh, params, stats=stats)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(zero))
  stepped, _ = restored_into_2.update(grads, fresh, params, stats=stats)
  np.testing.assert_array_less(0, max(float(jnp.abs(u).max()) for u in jax.tree.leaves(stepped)))


class _Lm(nn.Module):
  vocab: int = 5

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(self.vocab)(nn.tanh(nn.Embed(self.vocab, 3)(ids)))


def _lm_directions(ids, targets, tx_factory):
  model = _Lm()
  params = model.init(jax.random.key(0), ids)["params"]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, ids), targets).mean()

  _, grads, stats = nox.value_grad_and_stats(loss)(params)
  tx = tx_factory()
  directions, _ = tx.update(grads, tx.init(params), params, stats=stats)
  return directions


@pytest.mark.parametrize(
  "name",
  [
    "foof",
    pytest.param("kfac", marks=pytest.mark.slow),
    pytest.param("natural_gradient", marks=pytest.mark.slow),
    "natural_gradient_blocks",
    "fngd",
  ],
)
def test_negative_token_ids_give_the_direction_of_the_row_flax_looked_up(name, x64):
  vocab = 5
  wrapped = jnp.array([[4, 1, 0], [2, 4, 3], [1, 1, 4], [0, 3, 2], [4, 4, 1], [3, 0, 2]])
  negative = jnp.where(wrapped == vocab - 1, -1, wrapped)  # Flax's Embed looks up id -1 as row vocab - 1
  targets = (wrapped + 1) % vocab
  factory = TRANSFORMS[name]
  if name == "fngd":
    factory = lambda: nox.fngd(0.1, steps_per_epoch=2, batch_size=6)
  expected = _lm_directions(wrapped, targets, factory)
  got = _lm_directions(negative, targets, factory)
  for leaf_expected, leaf_got in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(leaf_got, leaf_expected, rtol=1e-10, atol=1e-12)


def test_nnx_negative_token_ids_give_the_statistics_of_the_looked_up_row(x64):
  from flax import nnx

  class Lm(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(5, 3, rngs=rngs)
      self.head = nnx.Linear(3, 5, rngs=rngs)

    def __call__(self, ids):
      return self.head(jnp.tanh(self.embed(ids)))

  wrapped = jnp.array([[4, 1], [2, 4], [1, 3]])
  negative = jnp.where(wrapped == 4, -1, wrapped)
  targets = (wrapped + 1) % 5

  def stats_of(ids):
    model = Lm(nnx.Rngs(0))
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(ids), targets).mean()
    return nox.nnx.value_grad_and_stats(loss_fn)(model)[2]

  expected, got = stats_of(wrapped)[("embed",)], stats_of(negative)[("embed",)]
  np.testing.assert_array_equal(got.layer_inputs, expected.layer_inputs)
  np.testing.assert_allclose(got.cotangents, expected.cotangents, rtol=1e-12)
