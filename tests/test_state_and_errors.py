"""Restored states that contradict their transform, FNGD's never-computed rows, and clear errors for edge inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_f64

import neuron_optax as nox


class MLP(nn.Module):
  width: int = 5

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.tanh(nn.Dense(self.width, name="hidden")(x)))


def _batch(seed, n=6):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, 4))), jnp.asarray(rng.integers(0, 3, size=n))


def _captured(params, seed=0, model=None, n=6):
  model = model or MLP()
  x, y = _batch(seed, n)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  return nox.value_grad_and_stats(loss_fn)(params)[1:]


def _matrix(tree, name):
  return np.concatenate([np.asarray(tree[name]["kernel"]), np.asarray(tree[name]["bias"])[None]])


def _run(tx, params, steps):
  state = tx.init(params)
  for t in range(steps):
    grads, stats = _captured(params, t)
    _, state = tx.update(grads, state, params, stats=stats)
  return state


# --------------------------------------------------------------------------- #
# Hyperparameters that cannot work
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1.0])
def test_non_finite_or_non_positive_damping_and_alpha_are_rejected(bad):
  for make in (nox.foof, nox.kfac, nox.natural_gradient):
    with pytest.raises(ValueError, match="damping must be a positive number"):
      make(bad)
  with pytest.raises(ValueError, match="alpha must be a positive number"):
    nox.fngd(bad, steps_per_epoch=2, batch_size=6)


def _bad_at_step_one(good, bad):
  return lambda count: jnp.where(count == 1, bad, good)


_BAD_VALUES = [0.0, float("nan"), -1.0, float("inf")]
_ONE_STEP_BAD = {
  **{
    f"{name}-damping={bad}": (make, dict(damping=_bad_at_step_one(0.5, bad)))
    for name, make in (
      ("foof", lambda **kw: nox.foof(ema_decay=kw.pop("ema_decay", 0.9), inverse_every=1, **kw)),
      ("kfac", lambda **kw: nox.kfac(ema_decay=kw.pop("ema_decay", 0.9), inverse_every=1, **kw)),
      (
        "kfac_standard",
        lambda **kw: nox.kfac(ema_decay=kw.pop("ema_decay", 0.9), inverse_every=1, damping_mode="standard", **kw),
      ),
      ("foof_inversion_phase", lambda **kw: nox.foof(ema_decay=kw.pop("ema_decay", 0.9), phase="inversion", **kw)),
    )
    for bad in _BAD_VALUES
  },
  **{
    f"{name}-ema_decay={bad}": (make, dict(damping=0.5, ema_decay=_bad_at_step_one(0.9, bad)))
    for name, make in (
      ("foof", lambda **kw: nox.foof(inverse_every=1, **kw)),
      ("kfac", lambda **kw: nox.kfac(inverse_every=1, **kw)),
      ("kfac_standard", lambda **kw: nox.kfac(inverse_every=1, damping_mode="standard", **kw)),
      ("kfac_statistics_phase", lambda **kw: nox.kfac(phase="statistics", **kw)),
    )
    for bad in (-0.5, float("nan"), 1.0, float("inf"))
  },
  **{
    f"fngd-alpha={bad}": (
      lambda **kw: nox.fngd(kw["alpha"], steps_per_epoch=3, batch_size=6),
      dict(alpha=_bad_at_step_one(0.1, bad)),
    )
    for bad in _BAD_VALUES
  },
}


@pytest.mark.parametrize("case", _ONE_STEP_BAD)
def test_a_hyperparameter_invalid_at_one_step_keeps_the_whole_state_and_gives_no_step(x64, case):
  """Issue 27: statistics, their counts, the factors (FNGD: the table) stay as they were; the direction is
  zero; only the step counter advances, and the next step (valid again) trains as before."""
  make, kwargs = _ONE_STEP_BAD[case]
  tx = make(**kwargs)
  params = init_f64(MLP(), _batch(0)[0])
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads, stats = _captured(params, 0)
  _, before = step(grads, state, params, stats=stats)
  grads, stats = _captured(params, 1)
  updates, after = step(grads, before, params, stats=stats)
  assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(updates)), case
  assert int(after.count) == int(before.count) + 1
  for old, new in zip(jax.tree.leaves(before._replace(count=0)), jax.tree.leaves(after._replace(count=0))):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=case)
  grads, stats = _captured(params, 2)
  updates, recovered = step(grads, after, params, stats=stats)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves((updates, recovered)))
  assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(updates)), case


# --------------------------------------------------------------------------- #
# Restored states
# --------------------------------------------------------------------------- #


@pytest.mark.slow  # CI's second step (issue 28: the default run within 10 minutes)
def test_restored_state_with_another_damping_refactorises_at_the_next_step(x64):
  """phase="auto": the state records the damping its factors were built with; a transform with
  another damping re-factorises the restored moving averages at once, even between inversion steps."""
  params = init_f64(MLP(), _batch(0)[0])
  state = _run(nox.foof(0.5, inverse_every=3), params, 4)  # step 4 is not an inversion step
  assert float(state.damping) == 0.5
  grads, stats = _captured(params, 4)
  updates, new_state = nox.foof(2.0, inverse_every=3).update(grads, state, params, stats=stats)
  layer = new_state.layers["hidden"]  # the moving average including this batch (stats_window=None)
  a = np.asarray(layer.a_ema) / float(layer.a_weight)
  expected = np.linalg.solve(a + 2.0 * np.eye(len(a)), _matrix(grads, "hidden"))
  np.testing.assert_allclose(_matrix(updates, "hidden"), expected, rtol=1e-10)
  assert float(new_state.damping) == 2.0

  kfac_state = _run(nox.kfac(0.5, inverse_every=3), params, 4)
  updates, new_state = nox.kfac(2.0, inverse_every=3).update(grads, kfac_state, params, stats=stats)
  layer = new_state.layers["hidden"]
  a = np.asarray(layer.a_ema) / float(layer.a_weight)
  g = np.asarray(layer.g_ema) / float(layer.g_weight)
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  expected = np.linalg.solve(a + pi * np.sqrt(2.0) * np.eye(len(a)), _matrix(grads, "hidden"))
  expected = expected @ np.linalg.inv(g + np.sqrt(2.0) / pi * np.eye(len(g)))
  np.testing.assert_allclose(_matrix(updates, "hidden"), expected, rtol=1e-10)
  assert float(new_state.damping) == 2.0


def test_fixed_plain_phase_applies_the_stored_factors_until_the_next_inversion_step(x64):
  """A fixed phase="plain" step compiles no factorisation: it applies the stored inverse, built with
  state.damping, and keeps that damping in the state; the next phase="inversion" step uses the new one."""
  params = init_f64(MLP(), _batch(0)[0])
  state = _run(nox.foof(0.5, inverse_every=3), params, 4)
  grads, stats = _captured(params, 4)
  updates, plain_state = nox.foof(2.0, inverse_every=3, phase="plain").update(grads, state, params, stats=stats)
  np.testing.assert_allclose(
    _matrix(updates, "hidden"), np.asarray(state.layers["hidden"].a_inverse) @ _matrix(grads, "hidden"), rtol=1e-12
  )
  assert float(plain_state.damping) == 0.5  # says which damping the applied inverse has
  _, inverted = nox.foof(2.0, inverse_every=3, phase="inversion").update(grads, plain_state, params, stats=stats)
  assert float(inverted.damping) == 2.0
  layer = inverted.layers["hidden"]
  a = np.asarray(layer.a_ema) / float(layer.a_weight)
  np.testing.assert_allclose(np.asarray(layer.a_inverse), np.linalg.inv(a + 2.0 * np.eye(len(a))), rtol=1e-10)


def test_state_of_other_layer_sizes_or_damping_mode_is_rejected():
  params = MLP().init(jax.random.key(0), _batch(0)[0])["params"]
  wide = MLP(width=7).init(jax.random.key(0), _batch(0)[0])["params"]
  grads, stats = _captured(params)
  with pytest.raises(ValueError, match=r"foof: layer 'out' has a a_ema of shape \(8, 8\).*need \(6, 6\)"):
    nox.foof(1.0).update(grads, nox.foof(1.0).init(wide), params, stats=stats)
  with pytest.raises(ValueError, match=r"kfac: layer 'hidden' has a g_ema of shape \(7, 7\).*need \(5, 5\)"):
    nox.kfac(1.0).update(grads, nox.kfac(1.0).init(wide), params, stats=stats)
  foof_state = nox.foof(1.0).init(params)
  inverse = foof_state.layers["out"].a_inverse
  broken = foof_state._replace(
    layers={**foof_state.layers, "out": foof_state.layers["out"]._replace(a_inverse=inverse[:-1, :-1])}
  )
  with pytest.raises(ValueError, match=r"foof: layer 'out' has a a_inverse of shape \(5, 5\)"):
    nox.foof(1.0).update(grads, broken, params, stats=stats)
  standard_state = nox.kfac(1.0, damping_mode="standard").init(params)
  with pytest.raises(ValueError, match=r"EigenFactors.*damping_mode='standard'.*damping_mode='heuristic'"):
    nox.kfac(1.0).update(grads, standard_state, params, stats=stats)
  with pytest.raises(ValueError, match=r"HeuristicFactors.*damping_mode='heuristic'"):
    nox.kfac(1.0, damping_mode="standard").update(grads, nox.kfac(1.0).init(params), params, stats=stats)


@pytest.mark.parametrize("make", [nox.foof, nox.kfac], ids=["foof", "kfac"])
def test_state_without_a_layer_names_it(make):
  params = MLP().init(jax.random.key(0), _batch(0)[0])["params"]
  grads, stats = _captured(params)
  state = make(1.0).init(params)
  state = state._replace(layers={"hidden": state.layers["hidden"]})
  with pytest.raises(ValueError, match=r"no entry for layer 'out'.*tx.init\(params\)"):
    make(1.0).update(grads, state, params, stats=stats)


def test_fngd_table_of_other_settings_is_rejected():
  params = MLP().init(jax.random.key(0), _batch(0)[0])["params"]
  grads, stats = _captured(params)
  saved = nox.fngd(0.1, steps_per_epoch=3, batch_size=6).init(params)
  for settings in (dict(steps_per_epoch=5, batch_size=6), dict(steps_per_epoch=3, batch_size=8)):
    tx = nox.fngd(0.1, **settings)
    with pytest.raises(ValueError, match=r"coefficient table of shape \(3, 6\).*steps_per_epoch=.*batch_size"):
      tx.update(grads, saved, params, stats=stats)


def test_fngd_reusing_a_never_computed_row_gives_the_mean_gradient(phase="plain"):
  """A fresh table reused by a fixed reusing phase has no coefficients yet: the step uses 1/n (SGD)."""
  params = MLP().init(jax.random.key(0), _batch(0)[0])["params"]
  grads, stats = _captured(params)
  tx = nox.fngd(0.1, steps_per_epoch=3, batch_size=6, phase=phase)
  updates, state = tx.update(grads, tx.init(params), params, stats=stats)
  for leaf, grad in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(leaf, grad, rtol=1e-5, atol=1e-7)
  assert all(np.all(np.asarray(layer.coefficients) == 0) for layer in state.layers.values())  # nothing stored


# --------------------------------------------------------------------------- #
# Clear errors for edge inputs
# --------------------------------------------------------------------------- #


def _loss_fn(model, x, y):
  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  return loss_fn


def test_loss_function_output_errors():
  model = MLP()
  x, y = _batch(0)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = _loss_fn(model, x, y)
  with pytest.raises(ValueError, match=r"has_aux=True: loss_fn must return a pair \(loss, aux\), got an array"):
    nox.value_grad_and_stats(loss_fn, has_aux=True)(params)
  with pytest.raises(ValueError, match="pass has_aux=True"):
    nox.value_grad_and_stats(lambda p: (loss_fn(p), {"n": 6}))(params)
  with pytest.raises(ValueError, match=r"scalar loss .* shape \(6,\).*\.mean\(\)"):
    nox.value_grad_and_stats(
      lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)
    )(params)
  (loss, aux), _, _ = nox.value_grad_and_stats(lambda p: (loss_fn(p), {"n": 6}), has_aux=True)(params)
  assert aux == {"n": 6} and np.isfinite(loss)


def test_nnx_loss_function_output_errors():
  from flax import nnx

  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  x, y = _batch(0)

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  with pytest.raises(ValueError, match=r"has_aux=True: loss_fn must return a pair \(loss, aux\)"):
    nox.nnx.value_grad_and_stats(loss_fn, has_aux=True)(model)
  with pytest.raises(ValueError, match="pass has_aux=True"):
    nox.nnx.value_grad_and_stats(lambda m: (loss_fn(m), 1.0))(model)


def test_empty_batch_error_names_the_layers():
  model = MLP()
  params = model.init(jax.random.key(0), _batch(0)[0])["params"]
  x, y = jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32)
  with pytest.raises(ValueError, match=r"\['hidden', 'out'\] were applied to an empty batch"):
    nox.value_grad_and_stats(_loss_fn(model, x, y))(params)


def test_schedule_helpers_reject_impossible_periods():
  with pytest.raises(ValueError, match="amortisation_phase: inverse_every must be an integer >= 1, got 0"):
    nox.amortisation_phase(3, 0)
  with pytest.raises(ValueError, match="amortisation_phase: step must be an integer >= 0"):
    nox.amortisation_phase(-1, 3)
  with pytest.raises(ValueError, match="amortisation_phase: stats_window=4 > inverse_every=3"):
    nox.amortisation_phase(1, 3, 4)
  with pytest.raises(ValueError, match="coefficient_phase: steps_per_epoch must be an integer >= 1, got 0"):
    nox.coefficient_phase(3, 0)
  with pytest.raises(ValueError, match="coefficient_phase: refresh_every_epochs must be None or an integer >= 1"):
    nox.coefficient_phase(3, 2, 0)
  assert nox.amortisation_phase(np.int64(6), 3) == "inversion" and nox.coefficient_phase(4, 2, 2) == "inversion"


@pytest.mark.parametrize(
  "tx",
  [
    nox.foof(1.0),
    nox.kfac(1.0),
    nox.natural_gradient(1.0),
    nox.natural_gradient(1.0, block_diagonal=True),
    nox.fngd(0.1, steps_per_epoch=2, batch_size=6),
  ],
  ids=["foof", "kfac", "natural_gradient", "natural_gradient_blocks", "fngd"],
)
def test_stats_whose_inputs_and_cotangents_disagree_are_rejected(tx):
  params = MLP().init(jax.random.key(0), _batch(0)[0])["params"]
  grads, stats = _captured(params)
  hidden = stats[("hidden",)]
  edited = {**stats, ("hidden",): hidden.replace(layer_inputs=hidden.layer_inputs[:4])}
  with pytest.raises(ValueError, match=r"layer 'hidden' recorded inputs \(4, 1, 4\).*cotangents \(6, 1, 5\)"):
    tx.update(grads, tx.init(params), params, stats=edited)
  fisher = {**stats, ("hidden",): hidden.replace(fisher_cotangents=jnp.zeros((2, 5, 1, 5)))}
  with pytest.raises(ValueError, match=r"layer 'hidden' has Fisher cotangents \(2, 5, 1, 5\)"):
    tx.update(grads, tx.init(params), params, stats=fisher)
