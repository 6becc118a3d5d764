"""nox.norm_constrained: the KL constraint (Ba, Grosse & Martens 2017) against a float64 NumPy reference; the
divergence warning of unguarded FOOF and KFAC."""

import re
import warnings

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


def _problem(input_scales=(1.0, 1.0, 1.0)):
  x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64) * jnp.asarray(input_scales)
  y = jnp.arange(8) % 3
  model = _Mlp()
  params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), x)["params"])

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  return params, *nox.value_grad_and_stats(loss)(params)[1:]


def _reference(directions, grads, learning_rate, max_kl):
  d = np.concatenate([np.ravel(v) for v in jax.tree.leaves(directions)])
  g = np.concatenate([np.ravel(v) for v in jax.tree.leaves(grads)])
  predicted = learning_rate**2 * abs(d @ g)
  return min(1.0, np.sqrt(max_kl / predicted))


@pytest.mark.parametrize("make", [lambda: nox.kfac(1e-3), lambda: nox.foof(1e-3), lambda: nox.natural_gradient(1e-3)])
@pytest.mark.parametrize("max_kl", [1e-6, 1e3])
def test_scales_the_direction_as_the_reference(make, max_kl, x64):
  params, grads, stats = _problem()
  plain = make()
  directions, _ = plain.update(grads, plain.init(params), params, stats=stats)
  nu = _reference(directions, grads, 0.1, max_kl)
  assert (nu < 1) == (max_kl < 1)  # both branches: active and inactive
  tx = nox.norm_constrained(make(), max_kl, learning_rate=0.1)
  state = tx.init(params)
  constrained, state = jax.jit(lambda g, s: tx.update(g, s, params, stats=stats))(grads, state)
  np.testing.assert_allclose(float(state.scale), nu, rtol=1e-12)
  for got, want in zip(jax.tree.leaves(constrained), jax.tree.leaves(directions)):
    np.testing.assert_allclose(got, nu * np.asarray(want), rtol=1e-12, atol=1e-15)


def test_schedules_inject_hyperparams_and_wrappers_compose(x64):
  params, grads, stats = _problem()
  schedule = optax.linear_schedule(0.1, 0.05, 10)
  chains = [
    optax.chain(nox.norm_constrained(nox.kfac(1e-3), 1e-6, learning_rate=schedule), optax.sgd(schedule)),
    optax.inject_hyperparams(nox.norm_constrained, static_args=("preconditioner",))(
      nox.foof(1e-3), max_kl=1e-6, learning_rate=0.1
    ),
    optax.MultiSteps(nox.norm_constrained(nox.foof(1e-3), 1e-6, learning_rate=0.1), 2),
    optax.apply_if_finite(nox.norm_constrained(nox.kfac(1e-3), 1e-6, learning_rate=0.1), 3),
  ]
  for tx in chains:
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params, stats=stats)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert any(np.abs(u).max() > 0 for u in jax.tree.leaves(updates))


def test_a_non_finite_direction_gives_a_zero_update(x64):
  params, grads, stats = _problem()
  tx = nox.norm_constrained(nox.foof(1e-3), learning_rate=0.1)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, state = tx.update(bad, state, params, stats=stats)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert float(state.scale) == 0.0


def test_invalid_arguments_are_rejected():
  with pytest.raises(ValueError, match="norm_constrained: max_kl"):
    nox.norm_constrained(nox.foof(1.0), -1.0, learning_rate=0.1)
  with pytest.raises(ValueError, match="norm_constrained: learning_rate"):
    nox.norm_constrained(nox.foof(1.0), learning_rate=0.0)


class _DigitsCnn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize(
  "make", [pytest.param(lambda: nox.kfac(1e-3), marks=pytest.mark.slow), lambda: nox.foof(1e-3)], ids=["kfac", "foof"]
)
def test_small_damping_with_momentum_sgd_trains_instead_of_diverging(make):
  """A damping of 1e-3 before sgd(0.1, momentum=0.9) blows up on a small CNN; the constraint keeps it training."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = jnp.asarray(digits.images[..., None] / 16.0, jnp.float32)
  labels = jnp.asarray(digits.target)
  model = _DigitsCnn()
  params0 = model.init(jax.random.key(0), images[:2])["params"]

  def train(tx, steps=12, batch=64):
    @jax.jit
    def step(params, state, x, y):
      loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
      loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
      updates, state = tx.update(grads, state, params, stats=stats)
      return optax.apply_updates(params, updates), state, loss

    params, state, losses = params0, tx.init(params0), []
    for i in range(steps):
      params, state, loss = step(
        params, state, images[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch]
      )
      losses.append(float(loss))
    return losses

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bare = train(optax.chain(make(), optax.sgd(0.1, momentum=0.9)))
    guarded = train(optax.chain(nox.norm_constrained(make(), learning_rate=0.1), optax.sgd(0.1, momentum=0.9)))
    jax.effects_barrier()
  assert not np.isfinite(bare[-1]) or bare[-1] > 10 * bare[0]  # the failure the safeguard is for
  # ... is announced once (the bare run; the guarded one is bounded), naming a layer and the rule
  (warned,) = [w for w in caught if issubclass(w.category, nox.DivergenceWarning)]
  assert re.search(r"layer '(Conv|Dense)_\d'.*damping 0\.001.*lr <= damping/10.*norm_constrained", str(warned.message))
  assert np.isfinite(guarded).all() and max(guarded) < 2 * guarded[0]  # bounded steps: no blow-up
  assert min(guarded[-4:]) < 0.8 * guarded[0]  # and it learns


def _layer_ratios(directions, grads):
  """‖d‖ / ‖∇W‖ of each layer (kernel and bias together), in float64 NumPy."""
  squares = lambda tree: sum(float(np.sum(np.square(np.asarray(v)))) for v in jax.tree.leaves(tree))
  return {name: np.sqrt(squares(directions[name]) / squares(grads[name])) for name in grads}


def _divergence_warnings(caught):
  return [str(w.message) for w in caught if issubclass(w.category, nox.DivergenceWarning)]


def test_divergence_warning_fires_where_a_direction_is_100_times_its_gradient(x64):
  """The criterion against ‖d‖/‖∇W‖ of each layer computed here: it fires iff some layer's ratio exceeds 100
  and names that layer; a damping >= 1e-2 never fires (the ratio is at most 1/λ)."""
  make = {
    "foof": nox.foof,
    "kfac": nox.kfac,
    "kfac_standard": lambda damping: nox.kfac(damping, damping_mode="standard"),
  }
  # An input feature of scale 1e-3 gives the factors a small eigenvalue the gradient has a component along.
  params, grads, stats = _problem((1.0, 1.0, 1e-3))
  outcomes = []
  for method, damping in [
    ("foof", 1e-3),  # ratio about 21: silent
    ("foof", 1e-4),  # about 184 (Dense_0)
    ("kfac", 1e-4),  # about 56: silent
    ("kfac", 1e-6),  # about 184 (Dense_1)
    ("kfac_standard", 1e-3),  # about 141 (Dense_1)
    ("kfac_standard", 1e-2),  # about 35: silent
  ]:
    tx = make[method](damping)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      directions, _ = jax.jit(lambda g, s, tx=tx: tx.update(g, s, params, stats=stats))(grads, tx.init(params))
      jax.effects_barrier()
    ratios = _layer_ratios(directions, grads)
    worst = max(ratios, key=ratios.get)
    messages = _divergence_warnings(caught)
    outcomes.append(bool(ratios[worst] > 100))
    if ratios[worst] > 100:
      assert len(messages) == 1, (method, damping, ratios)
      assert f"{method[:4]}: layer {worst!r}: at step 0" in messages[0]
      assert f"{ratios[worst]:.3g} times longer" in messages[0] and f"damping {damping:.3g}" in messages[0]
    else:
      assert not messages, (method, damping, ratios, messages)
  assert outcomes == [False, True, False, True, True, False]  # the cases are where they should be


def test_divergence_warning_once_per_transform_under_jit_inject_hyperparams_and_multisteps(x64):
  params, grads, stats = _problem((1.0, 1.0, 1e-3))
  chains = {
    "chain": lambda: optax.chain(nox.kfac(1e-6), optax.sgd(0.1, momentum=0.9)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(nox.foof)(damping=1e-6),
    "multisteps": lambda: optax.MultiSteps(nox.foof(1e-6), 2),
    "guarded": lambda: nox.norm_constrained(nox.foof(1e-6), learning_rate=0.1),
  }
  for name, make in chains.items():
    tx = make()
    step = jax.jit(lambda g, s, tx=tx: tx.update(g, s, params, stats=stats))
    state = tx.init(params)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      for _ in range(4):
        _, state = step(grads, state)
      jax.effects_barrier()
    messages = _divergence_warnings(caught)
    if name == "guarded":
      assert not messages, (name, messages)
    else:
      assert len(messages) == 1 and "layer 'Dense_" in messages[0], (name, messages)
    if name == "chain":  # a new transform warns again
      tx = make()
      with pytest.warns(nox.DivergenceWarning, match="kfac: layer 'Dense_1'"):
        tx.update(grads, tx.init(params), params, stats=stats)
        jax.effects_barrier()


def test_no_divergence_check_is_compiled_for_a_fixed_damping_of_at_least_one_hundredth():
  """A fixed damping λ >= 1e-2 bounds ‖d‖/‖∇W‖ by 1/λ <= 100: the default step carries no callback or conditional."""
  params, grads, stats = _problem((1.0, 1.0, 1e-3))

  def callbacks(tx):  # host callbacks in the compiled update (the precision warning has its own)
    text = jax.jit(lambda g, s: tx.update(g, s, params, stats=stats)).lower(grads, tx.init(params)).as_text()
    return text.count("callback(")

  for make in (nox.foof, nox.kfac):
    without = callbacks(make(1e-2, inverse_every=1))
    assert callbacks(make(1e-3, inverse_every=1)) == without + 1
    assert callbacks(make(lambda count: 1.0, inverse_every=1)) == without + 1  # a schedule may go below 1e-2
