"""What the default (``phase="auto"``) step compiles around its conditionals (issue #24).

A statistics or coefficient conditional reads the recorded rows. They must enter it as
matrices: XLA:CPU gives an ``(n, P, d)`` conditional operand a layout of its own and
writes every layer's activation into it at every step, taken or not (three 1000x1000
copies per step on the MLP of ``benchmarks/step_time.py``).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jaxpr_equations import equations

import neuron_optax as nox

N, D = 12, 16


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (D, D):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(3)(x)


TRANSFORMS = {
  "foof": lambda: nox.foof(1.0, inverse_every=10, stats_window=1),
  "kfac": lambda: nox.kfac(1.0, inverse_every=10, stats_window=1),
  "fngd": lambda: nox.fngd(1.0, steps_per_epoch=2, batch_size=N),
  "eigenbasis": lambda: nox.eigenbasis(optax.adam(1e-3), sides="both", refresh_every=10, stats_window=1),
}


def _step(name):
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (N, D))
  y = jnp.arange(N) % 3
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  tx = optax.chain(TRANSFORMS[name](), optax.sgd(0.1))
  compute = nox.value_grad_and_stats(loss_fn)

  def step(params, state, x, y):
    loss, grads, stats = compute(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  return step, (params, tx.init(params), x, y)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_conditionals_read_the_recorded_rows_as_matrices(name):
  step, args = _step(name)
  conds = [eqn for eqn in equations(jax.make_jaxpr(step)(*args).jaxpr) if eqn.primitive.name == "cond"]
  assert conds, "the auto step has a conditional"
  rows = [(cond.params["branches"][0].jaxpr.debug_info, v.aval.shape) for cond in conds for v in cond.invars]
  # every operand of shape (n, P, d) would be an activation in the layout the conditional picks
  assert not [(info, shape) for info, shape in rows if len(shape) == 3 and shape[0] == N], rows


def test_auto_step_compiles_no_copy_of_the_activations():
  step, args = _step("foof")
  text = jax.jit(step).lower(*args).compile().as_text()
  entry = next(part for part in re.split(r"\n(?=\S)", text) if part.startswith("ENTRY"))
  # an (n, 1, d) array the entry computation writes (not a bitcast of the forward pass's buffer)
  written = [
    line.strip()[:120]
    for line in entry.splitlines()
    if re.search(rf"= f32\[{N},1,{D}\]\S* (?!bitcast|parameter|get-tuple-element)\S+\(", line)
  ]
  assert not written, written
