import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test in float64 and restores the previous setting afterwards."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


def init_f64(model, *inputs, seed: int = 0):
  """``model.init(...)['params']`` cast to float64 (Flax initialises in float32)."""
  import jax.numpy as jnp

  params = model.init(jax.random.key(seed), *inputs)["params"]
  return jax.tree.map(lambda p: p.astype(jnp.float64), params)
