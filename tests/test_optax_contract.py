"""The optax contract, for every transform: chains, accumulation, wrappers, schedules, TrainState.

In the spirit of optax's common optimizer tests. Float64 where results are compared.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_f64

import neuron_optax as nox


class WideMLP(nn.Module):
  """A 16-wide hidden layer at batch 3: FOOF/KFAC's "auto" contraction would pick the recorded rows."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16, name="hidden")(x))
    return nn.Dense(3, name="out")(h)


MODEL = WideMLP()


def _batch(seed, n=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, 16))), jnp.asarray(rng.integers(0, 3, size=n))


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(MODEL.apply({"params": params}, x), y).mean()


def _stats(params, seed, n=3):
  _, grads, stats = nox.value_grad_and_stats(_loss)(params, *_batch(seed, n))
  return grads, stats


TRANSFORMS = {
  "foof": lambda **kw: nox.foof(kw.pop("damping", 0.5), **kw),
  "kfac_heuristic": lambda **kw: nox.kfac(kw.pop("damping", 0.5), **kw),
  "kfac_standard": lambda **kw: nox.kfac(kw.pop("damping", 0.5), damping_mode="standard", **kw),
  "natural_gradient": lambda **kw: nox.natural_gradient(kw.pop("damping", 0.5), **kw),
  "fngd": lambda **kw: nox.fngd(kw.pop("alpha", 0.1), steps_per_epoch=2, batch_size=3, **kw),
  "fngd_unshared": lambda **kw: nox.fngd(kw.pop("alpha", 0.1), share_coefficients=False, **kw),
}


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def setup():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  params = init_f64(MODEL, jnp.ones((1, 16)))
  grads, stats = _stats(params, 0)
  yield params, grads, stats
  jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_output_is_linear_in_the_incoming_updates(setup, name):
  """Whatever an earlier transform did (scaling, clipping, weight decay) takes effect exactly."""
  params, grads, stats = setup
  tx = TRANSFORMS[name]()
  state = tx.init(params)

  update = jax.jit(lambda updates: tx.update(updates, state, params, stats=stats)[0])  # one compilation

  def direction(updates):
    return _flat(update(updates))

  other = jax.tree.map(lambda p: 0.3 * p, params)  # e.g. weight decay added before the transform
  total = jax.tree.map(jnp.add, grads, other)
  np.testing.assert_allclose(direction(total), direction(grads) + direction(other), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(direction(jax.tree.map(lambda g: 1e-3 * g, grads)), 1e-3 * direction(grads), rtol=1e-9)
  # optax.clip_by_global_norm before the transform: the clipped gradient is what is preconditioned.
  clipped, _ = optax.clip_by_global_norm(1e-3).update(grads, optax.EmptyState())
  chained = optax.chain(optax.clip_by_global_norm(1e-3), tx)
  got, _ = jax.jit(chained.update)(grads, chained.init(params), params, stats=stats)
  np.testing.assert_allclose(_flat(got), direction(clipped), rtol=1e-9)


@pytest.mark.parametrize("name", ["foof", "kfac_heuristic"])
def test_rows_contraction_is_an_explicit_opt_in(setup, name):
  params, grads, stats = setup
  fast = TRANSFORMS[name](contraction="rows")
  default = TRANSFORMS[name]()
  want, _ = jax.jit(default.update)(grads, default.init(params), params, stats=stats)
  got, _ = jax.jit(fast.update)(grads, fast.init(params), params, stats=stats)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-9)  # the same when the gradient is the recorded one
  scaled = jax.tree.map(lambda g: 2 * g, grads)
  got, _ = jax.jit(fast.update)(scaled, fast.init(params), params, stats=stats)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-9)  # "rows" ignores the incoming gradient


@pytest.mark.parametrize("name", TRANSFORMS)
def test_multisteps_preconditions_the_mean_gradient(setup, name):
  params, _, _ = setup
  tx = TRANSFORMS[name]()
  multi = optax.MultiSteps(optax.chain(tx, optax.sgd(1.0)), every_k_schedule=2, accumulator_dtype=jnp.float64)
  state = multi.init(params)
  (g1, s1), (g2, s2) = _stats(params, 1), _stats(params, 2)
  first, state = jax.jit(multi.update)(g1, state, params, stats=s1)
  assert np.all(_flat(first) == 0)
  second, state = jax.jit(multi.update)(g2, state, params, stats=s2)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = jax.jit(tx.update)(mean, tx.init(params), params, stats=s2)
  np.testing.assert_allclose(_flat(second), -_flat(want), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["foof", "kfac_heuristic", "kfac_standard"])
def test_accumulated_micro_batches_equal_one_large_batch(setup, name):
  params, _, _ = setup
  x, y = _batch(7, n=6)
  _, big_grads, big_stats = nox.value_grad_and_stats(_loss)(params, x, y)
  tx = TRANSFORMS[name]()
  want, _ = jax.jit(tx.update)(big_grads, tx.init(params), params, stats=big_stats)
  accumulated = nox.accumulate_micro_batches(TRANSFORMS[name](), every_k=2)
  state = accumulated.init(params)
  for half in (slice(0, 3), slice(3, 6)):
    _, grads, stats = nox.value_grad_and_stats(_loss)(params, x[half], y[half])
    got, state = jax.jit(accumulated.update)(grads, state, params, stats=stats)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-10, atol=1e-14)
  assert int(state.mini_step) == 0


def test_accumulated_moments_are_rejected_by_methods_that_need_rows(setup):
  params, grads, stats = setup
  accumulated = nox.accumulate_micro_batches(nox.fngd(0.1, steps_per_epoch=2, batch_size=3), every_k=1)
  with pytest.raises(ValueError, match="optax.MultiSteps"):
    jax.jit(accumulated.update)(grads, accumulated.init(params), params, stats=stats)


@pytest.mark.parametrize("name", ["foof", "kfac_heuristic", "kfac_standard", "natural_gradient"])
def test_damping_accepts_numbers_scalars_and_schedules(setup, name):
  params, grads, stats = setup
  want, _ = (tx := TRANSFORMS[name](damping=0.5)).update(grads, tx.init(params), params, stats=stats)
  for damping in (np.float32(0.5), jnp.asarray(0.5), optax.constant_schedule(0.5)):
    tx = TRANSFORMS[name](damping=damping)
    got, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-6)  # np.float32(0.5) is exact


@pytest.mark.parametrize("name", ["foof", "kfac_heuristic", "kfac_standard"])
def test_a_changed_damping_is_used_from_the_next_step(setup, name):
  """No stale inverse: a schedule that changes λ mid-period re-factorises at that step."""
  params, _, _ = setup
  batches = [_stats(params, seed) for seed in (3, 4)]
  schedule = lambda count: jnp.where(count < 1, 2.0, 0.25)
  scheduled = TRANSFORMS[name](damping=schedule, inverse_every=10)
  # Standard damping applies λ at every step to damping-free eigendecompositions: nothing is stale.
  reference = TRANSFORMS[name](damping=0.25, inverse_every=10 if name == "kfac_standard" else 1)
  s_state, r_state = scheduled.init(params), reference.init(params)
  for grads, stats in batches:
    got, s_state = jax.jit(scheduled.update)(grads, s_state, params, stats=stats)
    want, r_state = jax.jit(reference.update)(grads, r_state, params, stats=stats)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-9)
  if name != "kfac_standard":  # the damping the stored factors were built with
    assert float(s_state.damping) == 0.25


@pytest.mark.parametrize("name", TRANSFORMS)
def test_inject_hyperparams(setup, name):
  params, grads, stats = setup
  key = "alpha" if name.startswith("fngd") else "damping"
  factory = {
    "foof": nox.foof,
    "kfac_heuristic": nox.kfac,
    "kfac_standard": lambda damping: nox.kfac(damping, damping_mode="standard"),
    "natural_gradient": nox.natural_gradient,
    "fngd": lambda alpha: nox.fngd(alpha, steps_per_epoch=2, batch_size=3),
    "fngd_unshared": lambda alpha: nox.fngd(alpha, share_coefficients=False),
  }[name]
  injected = optax.inject_hyperparams(factory)(**{key: 0.5})
  state = injected.init(params)
  state.hyperparams[key] = jnp.asarray(0.25, state.hyperparams[key].dtype)
  step = jax.jit(lambda g, s, st: injected.update(g, s, params, stats=st))
  got, state = step(grads, state, stats)
  step(grads, state, stats)
  assert step._cache_size() == 1  # the second call does not recompile
  tx = TRANSFORMS[name](**{key: 0.25})
  want, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-9)


def test_integer_options_must_be_static_under_inject_hyperparams():
  params = {"d": {"kernel": jnp.ones((2, 2))}}
  tx = optax.inject_hyperparams(nox.foof)(damping=1.0, inverse_every=5)
  state = tx.init(params)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(lambda s: tx.update(params, s, params, stats={}))(state)
  tx = optax.inject_hyperparams(nox.foof, static_args=("inverse_every",))(damping=1.0, inverse_every=5)
  jax.jit(lambda s: tx.update(params, s, params, stats={}))(tx.init(params))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "1.0", np.ones(2)])
@pytest.mark.parametrize("name", ["foof", "kfac_heuristic", "natural_gradient"])
def test_invalid_constant_damping_is_rejected(name, bad):
  with pytest.raises(ValueError, match="damping must be"):
    TRANSFORMS[name](damping=bad)


@pytest.mark.parametrize("name", ["foof", "kfac_heuristic", "natural_gradient", "fngd"])
def test_invalid_scheduled_damping_gives_no_step_and_keeps_the_state(setup, name):
  params, grads, stats = setup
  key = "alpha" if name == "fngd" else "damping"
  tx = TRANSFORMS[name](**{key: lambda count: jnp.where(count < 1, 0.5, -1.0)})
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads, state, params, stats=stats)
  updates, new_state = jax.jit(tx.update)(grads, state, params, stats=stats)
  for layer in ("hidden", "out"):
    assert np.all(np.asarray(updates[layer]["kernel"]) == 0)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new_state))


@pytest.mark.parametrize(
  "name",
  [pytest.param(n, marks=pytest.mark.slow) if n in ("fngd_unshared", "kfac_standard") else n for n in TRANSFORMS],
)
def test_extra_args_dtypes_masked_multi_transform_apply_if_finite(setup, name):
  params, grads, stats = setup
  tx = TRANSFORMS[name]()
  want, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  got, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats, unknown_argument=1)  # ignored
  np.testing.assert_array_equal(_flat(got), _flat(want))
  assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, grads)

  # optax.masked: "out" is not ours; its gradient passes through, "hidden" is as without the mask.
  mask = {"hidden": {"kernel": True, "bias": True}, "out": {"kernel": False, "bias": False}}
  masked = optax.masked(TRANSFORMS[name](), mask)
  out, _ = jax.jit(masked.update)(grads, masked.init(params), params, stats=stats)
  np.testing.assert_array_equal(out["out"]["kernel"], grads["out"]["kernel"])
  if name not in ("natural_gradient",):  # the whole-network Fisher couples the layers
    np.testing.assert_allclose(out["hidden"]["kernel"], want["hidden"]["kernel"], rtol=1e-12)

  # optax.multi_transform: ours on "hidden", Adam on the rest.
  labels = {"hidden": {"kernel": "neuron", "bias": "neuron"}, "out": {"kernel": "adam", "bias": "adam"}}
  multi = optax.multi_transform({"neuron": TRANSFORMS[name](), "adam": optax.adam(1e-3)}, labels)
  out, _ = jax.jit(multi.update)(grads, multi.init(params), params, stats=stats)
  adam_out, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(params))
  np.testing.assert_allclose(out["out"]["kernel"], adam_out["out"]["kernel"], rtol=1e-12)
  if name not in ("natural_gradient",):
    np.testing.assert_allclose(out["hidden"]["kernel"], want["hidden"]["kernel"], rtol=1e-12)

  # optax.apply_if_finite: a non-finite gradient is skipped and the inner state is unchanged.
  guarded = optax.apply_if_finite(TRANSFORMS[name](), max_consecutive_errors=3)
  state = guarded.init(params)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  out, new_state = jax.jit(guarded.update)(bad, state, params, stats=stats)
  assert np.all(_flat(out) == 0)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), new_state.inner_state, state.inner_state))


def test_train_state_forwards_stats(setup):
  params, grads, stats = setup
  tx = optax.chain(nox.foof(0.5), optax.sgd(0.1, momentum=0.9))
  state = nox.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
  new = state.apply_gradients(grads=grads, stats=stats)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  np.testing.assert_allclose(_flat(new.params), _flat(optax.apply_updates(params, updates)), rtol=1e-12)
  assert int(new.step) == 1
  # a chain of plain optax transforms ignores the statistics
  plain = nox.TrainState.create(apply_fn=MODEL.apply, params=params, tx=optax.sgd(0.1))
  plain.apply_gradients(grads=grads, stats=stats)


def _probe_rates(grads, stats, change, dtype, draws=4000):
  """How often the one-per-step check accepts ``grads + change`` over ``draws`` steps' probes."""
  from neuron_optax._src import contraction, param_layout

  shapes = param_layout.candidate_layers(grads)
  stats = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, stats)
  gradients = contraction.incoming_matrices(grads, shapes, {key: dtype for key in stats})
  gradients = {key: g + change.get(key, 0) for key, g in gradients.items()}
  check = jax.jit(jax.vmap(lambda count: contraction.recorded_scale(gradients, stats, count)))
  matches, scales = check(jnp.arange(draws))
  return float(np.mean(matches)), np.asarray(scales)


def _false_positive_bound(rho, dtype, probes=4):
  """The stated bound π(√ε/ρ)^k, π(x) = P(|ab| ≤ x) for independent standard normals a, b."""
  from math import erf

  b = np.abs(np.random.default_rng(0).standard_normal(200_000))
  x = np.sqrt(np.finfo(dtype).eps) / rho
  return float(np.mean(np.vectorize(erf)(x / (b * np.sqrt(2))))) ** probes


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)])
def test_one_check_per_step_finds_scaled_gradients_and_states_its_false_positive_rate(setup, dtype):
  """The check of ``contraction.recorded_scale``: every multiple of the recorded gradient passes with
  its scale; a change orthogonal to it passes at most at the stated rate (rank one: the worst case)."""
  params, grads, stats = setup
  key = next(k for k in stats if "hidden" in str(k))
  for sigma in (1.0, 1e-3, -2.5):
    rate, scales = _probe_rates(jax.tree.map(lambda g: sigma * g, grads), stats, {}, dtype)
    assert rate == 1.0
    np.testing.assert_allclose(scales, sigma, rtol=np.sqrt(np.finfo(dtype).eps))
  from neuron_optax._src import contraction, param_layout

  recorded = np.asarray(
    contraction.incoming_matrices(grads, param_layout.candidate_layers(grads), {key: np.float64})[key]
  )
  rng = np.random.default_rng(1)
  change = np.outer(rng.standard_normal(recorded.shape[0]), rng.standard_normal(recorded.shape[1]))
  change -= np.sum(change * recorded) / np.sum(recorded * recorded) * recorded  # orthogonal to G
  for rho in (1e-3, 1e-2) if dtype == np.float32 else (1e-7, 1e-6):
    delta = rho * np.linalg.norm(recorded) * change / np.linalg.norm(change)
    rate, _ = _probe_rates(grads, stats, {key: jnp.asarray(delta, dtype)}, dtype)
    bound = _false_positive_bound(rho / np.sqrt(1 + rho**2), dtype)
    assert rate <= bound + 4 * np.sqrt(bound * (1 - bound) / 4000) + 1e-3, (rho, rate, bound)
  # With one check probe instead of four the rate at ρ = 1e-3 in float32 would be ~0.48, far above.
