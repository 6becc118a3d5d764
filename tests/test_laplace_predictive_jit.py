"""The sampled GLM predictive gives the same probabilities under ``jax.jit`` as eagerly, in float32 at a size where
XLA:CPU fuses and partitions its reductions.

Regression: on jaxlib 0.10.2 the jitted predictive of a char-LM returned uniform or NaN probabilities (the JVP of
the full parameter tree, with unbatched zero tangents for the layers outside the posterior, met XLA:CPU's YNN reduce
fusion; the same computation is right with ``--xla_cpu_experimental_ynn_fusion_type=-reduce``). This model is the
smallest found that failed: 2,048 output rows, two posterior samples.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax

import neuron_optax as nox


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(64, name="mixer")(nn.Dense(256, use_bias=False, name="posterior")(x))
    return nn.Dense(96, name="head")(nn.LayerNorm(use_scale=False, use_bias=False)(h))


def test_jitted_sampled_predictive_equals_eager():
  model = Model()
  x = jax.random.normal(jax.random.key(3), (32, 64, 64))
  labels = jax.random.randint(jax.random.key(4), (32, 64), 0, 96)
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss_fn(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, batch[0]), batch[1]).mean()

  _, _, stats = nox.value_grad_and_stats(loss_fn)(params, (x[:4], labels[:4]))
  stats = {k: v for k, v in stats.items() if k == ("posterior",)}

  def predict(params, stats, x):
    return nox.glm_predictive(
      lambda p: model.apply({"params": p}, x), params, stats, prior_precision=1e-2, dataset_size=1000,
      structure="kfac", link_approx="probit", num_samples=2, key=jax.random.key(7),
    )  # fmt: skip

  eager = np.asarray(predict(params, stats, x))
  jitted = np.asarray(jax.jit(predict)(params, stats, x))
  map_probabilities = np.asarray(jax.nn.softmax(model.apply({"params": params}, x)))
  assert np.abs(eager - map_probabilities).max() > 1e-3  # the posterior is wide enough to move the probabilities
  np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-6)
