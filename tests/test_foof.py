"""FOOF vs an explicit float64 NumPy reference, amortisation, errors, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_f64
from numpy_reference import augment, foof_directions, im2col, same_padding

import neuron_optax as nox


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(6, name="hidden")(x))
    return nn.Dense(3, use_bias=False, name="out")(h)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME", name="conv")(x))
    return nn.Dense(2, name="head")(h.reshape(h.shape[0], -1))


def _loss(model, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()


def _mlp_a(params, x):
  h = np.tanh(x @ np.asarray(params["hidden"]["kernel"]) + np.asarray(params["hidden"]["bias"]))
  return {"hidden": augment(x).T @ augment(x) / len(x), "out": h.T @ h / len(x)}


def _conv_a(params, x):
  pads = same_padding(x.shape[1:3], (3, 3), (2, 2))
  patches = augment(im2col(x, (3, 3), (2, 2), pads)).reshape(-1, 28)
  z = patches[:, :27] @ np.asarray(params["conv"]["kernel"]).reshape(27, 3) + np.asarray(params["conv"]["bias"])
  h = augment(np.maximum(z, 0).reshape(x.shape[0], -1))
  return {"conv": patches.T @ patches / len(patches), "head": h.T @ h / len(h)}


def _matrix(grads, name):
  kernel = np.asarray(grads[name]["kernel"])
  kernel = kernel.reshape(-1, kernel.shape[-1])
  if "bias" in grads[name]:
    return np.concatenate([kernel, np.asarray(grads[name]["bias"])[None]], axis=0)
  return kernel


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize(
  "inverse_every,stats_window,contraction,backend",
  [
    (1, None, "auto", "cpu"),
    (3, None, "rows", "cpu"),
    (3, 2, "gradient", "cpu"),
    (4, 1, "auto", "cpu"),
    (3, 2, "gradient", "gpu"),
  ],
)
def test_foof_matches_numpy_reference_over_steps(
  x64, monkeypatch, net, inverse_every, stats_window, contraction, backend
):
  # backend="gpu" traces the accelerator code paths (A⁻¹[:, :-1]∇K + A⁻¹[:, -1]∇bᵀ, batched
  # factorisations) on the CPU.
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  rng = np.random.default_rng(0)
  if net == "mlp":
    model, a_fn, shape = MLP(), _mlp_a, (8, 4)
  else:
    model, a_fn, shape = ConvNet(), _conv_a, (3, 5, 5, 3)
  xs = [rng.normal(size=shape) for _ in range(7)]
  ys = [rng.integers(0, 2, size=shape[0]) for _ in range(7)]
  params = init_f64(model, jnp.asarray(xs[0]))
  damping, decay = 0.3, 0.8
  tx = nox.foof(
    damping, ema_decay=decay, inverse_every=inverse_every, stats_window=stats_window, contraction=contraction
  )
  state = tx.init(params)

  @jax.jit
  def step(state, x, y):
    _, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x, y))(params)
    updates, state = tx.update(grads, state, params, stats=stats)
    return updates, state, grads

  outputs, a_batches, grad_mats = [], [], []
  for x, y in zip(xs, ys):
    updates, state, grads = step(state, jnp.asarray(x), jnp.asarray(y))
    outputs.append(updates)
    a_batches.append(a_fn(params, x))
    grad_mats.append(grads)
  for name in params:
    expected = foof_directions(
      [a[name] for a in a_batches], [_matrix(g, name) for g in grad_mats], damping, decay, inverse_every, stats_window
    )
    for t, (out, exp) in enumerate(zip(outputs, expected)):
      np.testing.assert_allclose(_matrix(out, name), exp, rtol=1e-8, atol=1e-12, err_msg=f"layer {name}, step {t}")
  assert int(state.count) == 7


def test_paper_toy_example_appendix_f(x64):
  """Benzing 2022 App. F: undamped FOOF gives (-1, 4); SGD gives (2, 1) (up to sign and scale)."""
  x = jnp.array([[3.0, 1.0], [1.0, 0.0]])
  y = jnp.array([1.0, -1.0])
  model = nn.Dense(1, use_bias=False)
  params = {"kernel": jnp.zeros((2, 1))}

  def loss_fn(p):
    return jnp.mean(0.5 * (model.apply({"params": p}, x)[:, 0] - y) ** 2)

  _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
  np.testing.assert_allclose(-2 * grads["kernel"][:, 0], [2.0, 1.0])  # SGD direction, summed
  tx = nox.foof(1e-9)
  direction, _ = tx.update(grads, tx.init(params), params, stats=stats)
  np.testing.assert_allclose(-direction["kernel"][:, 0], [-1.0, 4.0], rtol=1e-6)
  # one step of size 1 reaches the global optimum: zero loss on both points
  new = optax.apply_updates(params, jax.tree.map(lambda d: -d, direction))
  np.testing.assert_allclose(loss_fn(new), 0.0, atol=1e-12)


def test_uncaptured_leaves_pass_through_and_chain_trains():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(nn.relu(nn.Dense(16)(x)))
      return nn.Dense(3)(h)

  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=32))
  model = Model()
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.chain(nox.foof(1.0), optax.sgd(0.2, momentum=0.9))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state):
    loss, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x, y))(params)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss, grads

  foof_only = nox.foof(1.0)
  _, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x, y))(params)
  direction, _ = jax.jit(foof_only.update)(grads, foof_only.init(params), params, stats=stats)
  np.testing.assert_array_equal(direction["LayerNorm_0"]["scale"], grads["LayerNorm_0"]["scale"])
  assert not np.allclose(direction["Dense_0"]["kernel"], grads["Dense_0"]["kernel"])

  losses = []
  for _ in range(30):
    params, state, loss, _ = train_step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]


def test_state_has_fixed_structure_for_scan():
  model = MLP()
  x = jnp.ones((4, 4))
  y = jnp.array([0, 1, 2, 0])
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.chain(nox.foof(0.5, inverse_every=2, stats_window=1), optax.sgd(0.1))

  def body(carry, _):
    params, state = carry
    loss, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x, y))(params)
    updates, state = tx.update(grads, state, params, stats=stats)
    return (optax.apply_updates(params, updates), state), loss

  (_, state), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=5)
  assert losses.shape == (5,) and np.all(np.isfinite(losses))
  assert int(state[0].count) == 5


def test_kernel_input_ndim_for_multi_axis_dense_general(x64):
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(features=(2, 3), name="proj")(x).sum(-1)

  model = Model()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(5, 4)))
  params = init_f64(model, x)
  loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
  tx = nox.foof(0.1)
  with pytest.raises(ValueError, match=r"kernel_input_ndim=\{'proj': 1\}"):
    tx.update(grads, tx.init(params), params, stats=stats)
  tx = nox.foof(0.1, kernel_input_ndim={"proj": 1})
  direction, _ = tx.update(grads, tx.init(params), params, stats=stats)
  a = augment(np.asarray(x))
  grad = np.concatenate(
    [np.asarray(grads["proj"]["kernel"]).reshape(4, 6), np.asarray(grads["proj"]["bias"]).reshape(1, 6)]
  )
  expected = np.linalg.solve(a.T @ a / 5 + 0.1 * np.eye(5), grad)
  np.testing.assert_allclose(direction["proj"]["kernel"].reshape(4, 6), expected[:4], rtol=1e-10)
  np.testing.assert_allclose(direction["proj"]["bias"].reshape(6), expected[4], rtol=1e-10)


def test_bf16_parameters_keep_float32_statistics():
  model = MLP()
  x = jnp.ones((4, 4), jnp.bfloat16)
  y = jnp.array([0, 1, 2, 0])
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init(jax.random.key(0), x)["params"])
  tx = nox.foof(1.0)
  state = tx.init(params)
  assert state.layers["hidden"].a_ema.dtype == jnp.float32
  _, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x, y))(params)
  direction, state = jax.jit(tx.update)(grads, state, params, stats=stats)
  assert direction["hidden"]["kernel"].dtype == jnp.bfloat16
  assert state.layers["hidden"].a_inverse.dtype == jnp.float32
  assert all(np.all(np.isfinite(np.asarray(l, np.float32))) for l in jax.tree.leaves(direction))


def test_non_finite_batch_does_not_poison_the_average(x64):
  model = MLP()
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(6, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=6))
  params = init_f64(model, x)
  tx = nox.foof(0.5)
  state = tx.init(params)
  vgs = nox.value_grad_and_stats(lambda p, x: _loss(model, p, x, y))
  _, grads, stats = vgs(params, x)
  _, state = tx.update(grads, state, params, stats=stats)
  good = state.layers["hidden"]
  _, grads_bad, stats_bad = vgs(params, x.at[0, 0].set(jnp.nan))
  bad_direction, state = tx.update(grads_bad, state, params, stats=stats_bad)
  np.testing.assert_array_equal(state.layers["hidden"].a_ema, good.a_ema)
  np.testing.assert_array_equal(state.layers["hidden"].a_updates, good.a_updates)
  assert np.all(np.isfinite(state.layers["hidden"].a_inverse))
  # the bad step is defined: captured layers take no step
  for leaf in jax.tree.leaves(bad_direction):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  assert int(state.count) == 2
  direction, state = tx.update(grads, state, params, stats=stats)
  assert all(np.all(np.isfinite(leaf)) and np.any(leaf != 0) for leaf in jax.tree.leaves(direction))


def test_construction_errors():
  with pytest.raises(ValueError, match="damping"):
    nox.foof(0.0)
  with pytest.raises(ValueError, match="damping"):
    nox.foof(-1.0)
  with pytest.raises(ValueError, match="ema_decay"):
    nox.foof(1.0, ema_decay=1.0)
  with pytest.raises(ValueError, match="ema_decay"):
    nox.foof(1.0, ema_decay=-0.1)
  with pytest.raises(ValueError, match="inverse_every"):
    nox.foof(1.0, inverse_every=0)
  with pytest.raises(ValueError, match="stats_window"):
    nox.foof(1.0, inverse_every=5, stats_window=6)
  with pytest.raises(ValueError, match="contraction"):
    nox.foof(1.0, contraction="fast")


def test_update_errors():
  model = MLP()
  x = jnp.ones((4, 4))
  y = jnp.array([0, 1, 2, 0])
  params = model.init(jax.random.key(0), x)["params"]
  tx = nox.foof(1.0)
  state = tx.init(params)
  _, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x, y))(params)
  with pytest.raises(ValueError, match="value_grad_and_stats"):
    tx.update(grads, state, params)
  other = MLP().init(jax.random.key(0), jnp.ones((4, 7)))["params"]
  _, other_grads, other_stats = nox.value_grad_and_stats(lambda p: _loss(model, p, jnp.ones((4, 7)), y))(other)
  with pytest.raises(ValueError, match="hidden"):
    tx.update(other_grads, state, params, stats=other_stats)
  with pytest.raises(ValueError, match="'params' collection"):
    wrapped = {"params": grads}
    nox.foof(1.0).update(wrapped, nox.foof(1.0).init({"params": params}), stats=stats)


@pytest.mark.parametrize(
  "make",
  [
    lambda phase: nox.foof(0.3, ema_decay=0.7, inverse_every=4, stats_window=2, phase=phase),
    lambda phase: nox.kfac(0.3, ema_decay=0.7, inverse_every=4, stats_window=2, phase=phase),
  ],
  ids=["foof", "kfac"],
)
def test_fixed_phase_steps_chosen_on_the_host_match_auto(x64, make):
  """One compiled step per phase, picked with amortisation_phase: the "auto" trajectory exactly."""
  model = ConvNet()
  rng = np.random.default_rng(11)
  batches = [(jnp.asarray(rng.normal(size=(3, 5, 5, 2))), jnp.asarray(rng.integers(0, 2, size=3))) for _ in range(9)]
  params = init_f64(model, batches[0][0])
  capture = nox.value_grad_and_stats(lambda p, x, y: _loss(model, p, x, y))

  def stepper(tx):
    @jax.jit
    def step(state, x, y):
      _, grads, stats = capture(params, x, y)
      return tx.update(grads, state, params, stats=stats)

    return step

  auto = stepper(make("auto"))
  fixed = {phase: stepper(make(phase)) for phase in ("plain", "statistics", "inversion")}
  auto_state = phased_state = make("auto").init(params)
  kinds = []
  for step, (x, y) in enumerate(batches):
    kind = nox.amortisation_phase(step, 4, 2)
    kinds.append(kind)
    auto_update, auto_state = auto(auto_state, x, y)
    phased_update, phased_state = fixed[kind](phased_state, x, y)
    for a, b in zip(jax.tree.leaves(auto_update), jax.tree.leaves(phased_update)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)  # other fusions: round-off only
  assert kinds == ["inversion", "plain", "plain", "statistics"] * 2 + ["inversion"]
  for a, b in zip(jax.tree.leaves(auto_state), jax.tree.leaves(phased_state)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)

  x, y = batches[0]
  _, grads, stats = capture(params, x, y)
  state = make("plain").init(params)

  def primitives(phase):
    jaxpr = jax.make_jaxpr(lambda s, st: make(phase).update(grads, s, params, stats=st))(state, stats)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}

  assert "cond" not in primitives("plain") and "cholesky" not in str(primitives("plain"))
  assert "cond" in primitives("auto")
  with pytest.raises(ValueError, match="phase must be"):
    make("refactor")


def test_amortisation_phase_schedule():
  assert [nox.amortisation_phase(s, 5, 2) for s in range(6)] == [
    "inversion",
    "plain",
    "plain",
    "plain",
    "statistics",
    "inversion",
  ]
  assert [nox.amortisation_phase(s, 3) for s in range(4)] == ["inversion", "statistics", "statistics", "inversion"]
  # The transforms' defaults: T = 100, S = min(10, T); S defaults to min(10, T) for a given T too.
  assert [nox.amortisation_phase(s) for s in (0, 1, 89, 90, 91, 99, 100)] == [
    "inversion",
    "plain",
    "plain",
    "plain",
    "statistics",
    "statistics",
    "inversion",
  ]
  assert [nox.amortisation_phase(s, 20) for s in (9, 10, 11, 20)] == ["plain", "plain", "statistics", "inversion"]
  assert nox.amortisation_phase(7, 1) == "inversion"


def test_defaults_amortise_every_100_steps_with_a_10_step_window():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  model = Model()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=8))
  params = model.init(jax.random.key(0), x)["params"]
  tx = nox.foof()  # damping 1.0, inverse_every 100, stats_window 10
  assert float(tx.init(params).damping) == 1.0

  @jax.jit
  def step(state, t):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x * (1 + t)), y
    ).mean()
    _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
    return tx.update(grads, state, params, stats=stats)[1]

  state = tx.init(params)
  updates, inverses = [], []
  for t in range(101):
    state = step(state, jnp.float32(t % 7))
    updates.append(int(state.layers["Dense_0"].a_updates))
    inverses.append(np.asarray(state.layers["Dense_0"].a_inverse))
  # Step 0 updates the average and factorises; steps 91-99 update it; step 100 updates and factorises.
  assert updates[0] == 1 and updates[90] == 1 and updates[91] == 2 and updates[99] == 10 and updates[100] == 11
  assert all(np.array_equal(inverses[0], inverses[t]) for t in range(1, 100))
  assert not np.allclose(inverses[99], inverses[100])
