"""KFAC (heuristic and standard damping) and the KFAC/FOOF similarity vs float64 NumPy references.

The references recompute every layer's input rows and per-example output
cotangents with a hand-written NumPy forward/backward pass (explicit im2col for
the convolution, explicit per-class cotangents for the full Fisher), form the
Kronecker factors, average them with the debiased EMA of design.md, and solve
with the explicit Kronecker product ``np.kron(·, ·)``.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_f64
from numpy_reference import augment, ema_schedule, im2col

from neuron_optax import kfac_foof_similarity, value_grad_and_stats
from neuron_optax._src.kfac import EigenFactors, HeuristicFactors, KfacState, kfac


@pytest.fixture(autouse=True)
def _float64(x64):
  yield


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(5, name="hidden")(x))
    return nn.Dense(3, name="out")(h)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (3, 3), strides=(2, 2), padding="VALID", name="conv")(x))
    return nn.Dense(3, name="out")(h.reshape(h.shape[0], -1))


class WideMLP(nn.Module):
  """Fewer rows (2) than inputs and outputs: both KFAC factors are applied from the rows."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(12, name="hidden")(x))
    return nn.Dense(3, name="out")(h)


MODELS = {
  "mlp": (MLP, ("hidden",), (6, 4)),
  "wide": (WideMLP, ("hidden",), (2, 10)),
  "conv": (ConvNet, ("conv",), (3, 5, 5, 2)),
}


def _batches(kind, steps, seed=0):
  _, _, shape = MODELS[kind]
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=shape), rng.integers(0, 3, size=shape[0])) for _ in range(steps)]


def _loss(model):
  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

  return loss_fn


# --------------------------------------------------------------------------- #
# NumPy reference
# --------------------------------------------------------------------------- #


def _np_forward(kind, params, x):
  """Input rows ``(n, P, d)`` of both layers (without bias column) and the logits."""
  first = MODELS[kind][1][0]
  w1 = np.asarray(params[first]["kernel"])
  b1 = np.asarray(params[first]["bias"])
  w2, b2 = np.asarray(params["out"]["kernel"]), np.asarray(params["out"]["bias"])
  n = x.shape[0]
  if kind in ("mlp", "wide"):
    rows1 = x[:, None, :]
  else:
    rows1 = im2col(x, (3, 3), (2, 2), [(0, 0), (0, 0)]).reshape(n, -1, 3 * 3 * x.shape[-1])
  h = np.tanh(rows1 @ w1.reshape(-1, w1.shape[-1]) + b1)  # (n, P, c)
  rows2 = h.reshape(n, 1, -1)
  logits = rows2[:, 0] @ w2 + b2
  return {first: rows1, "out": rows2}, h, logits


def _np_backward(kind, params, h, delta_out):
  """Per-example output cotangents of both layers for the logits' per-example cotangent ``delta_out``."""
  first = MODELS[kind][1][0]
  w2 = np.asarray(params["out"]["kernel"])
  delta1 = (delta_out @ w2.T).reshape(h.shape) * (1 - h**2)
  return {first: delta1, "out": delta_out[:, None, :]}


def _softmax(z):
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _np_statistics(kind, params, x, y, fisher):
  """Per layer: ``(A_batch, G_batch, ∇W)`` from explicit formulas."""
  rows, h, logits = _np_forward(kind, params, x)
  p = _softmax(logits)
  n, k = p.shape
  onehot = np.eye(k)[y]
  true_cots = _np_backward(kind, params, h, p - onehot)
  if fisher == "empirical":
    sets = [(np.ones(n), true_cots)]
  else:  # every class c with weight p_c, cotangents computed one class at a time
    sets = [(p[:, c], _np_backward(kind, params, h, p - np.eye(k)[c])) for c in range(k)]
  out = {}
  for name, a_rows in rows.items():
    a = augment(a_rows).reshape(-1, a_rows.shape[-1] + 1)
    a_batch = a.T @ a / a.shape[0]
    g_batch = 0
    for weight, cots in sets:
      g = cots[name]
      w = np.broadcast_to(weight[:, None], g.shape[:2]).reshape(-1)
      g = g.reshape(-1, g.shape[-1])
      g_batch = g_batch + (g * w[:, None]).T @ g / g.shape[0]
    cot = true_cots[name]
    grad = a.T @ cot.reshape(-1, cot.shape[-1]) / n  # the mean loss's gradient
    out[name] = (a_batch, g_batch, grad)
  return out


def _np_kfac_directions(a_batches, g_batches, grads, damping, decay, inverse_every, stats_window, mode):
  """KFAC directions over steps with the explicit Kronecker product of the damped factors."""
  weight, a_sum, g_sum = 0.0, 0.0, 0.0
  directions = []
  for t, (update, refactor) in enumerate(ema_schedule(len(grads), inverse_every, stats_window)):
    if update:
      weight = decay * weight + 1.0
      a_sum = decay * a_sum + a_batches[t]
      g_sum = decay * g_sum + g_batches[t]
    if refactor:
      a, g = a_sum / weight, g_sum / weight
      eye_a, eye_g = np.eye(a.shape[0]), np.eye(g.shape[0])
      if mode == "heuristic":
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
        curvature = np.kron(a + pi * np.sqrt(damping) * eye_a, g + np.sqrt(damping) / pi * eye_g)
      else:
        curvature = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
    directions.append(np.linalg.solve(curvature, grads[t].reshape(-1)).reshape(grads[t].shape))
  return directions


def _matrix(tree, key):
  node = tree
  for k in key:
    node = node[k]
  kernel = np.asarray(node["kernel"], np.float64)
  kernel = kernel.reshape(-1, kernel.shape[-1])
  return np.concatenate([kernel, np.asarray(node["bias"], np.float64)[None]], axis=0)


def _run_kfac(kind, tx, batches, fisher="empirical"):
  model_cls, _, _ = MODELS[kind]
  model = model_cls()
  params = init_f64(model, jnp.asarray(batches[0][0]), seed=1)
  grad_fn = value_grad_and_stats(
    _loss(model), fisher=fisher, likelihood=None if fisher == "empirical" else "categorical"
  )

  @jax.jit
  def step(state, x, y):
    _, grads, stats = grad_fn(params, x, y)
    return tx.update(grads, state, params, stats=stats)

  state = tx.init(params)
  updates = []
  for x, y in batches:
    u, state = step(state, jnp.asarray(x), jnp.asarray(y))
    updates.append(u)
  return params, updates, state


# --------------------------------------------------------------------------- #
# Directions vs the reference
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mode", ["heuristic", "standard"])
@pytest.mark.parametrize(
  "kind, fisher, inverse_every, stats_window, contraction",
  [
    ("mlp", "empirical", 3, 2, "rows"),
    ("mlp", "full", 3, 2, "gradient"),
    ("conv", "empirical", 3, 2, "gradient"),
    ("conv", "full", 3, 2, "rows"),
    ("mlp", "empirical", 1, None, "auto"),  # the defaults: average and re-factorise every step
    ("wide", "empirical", 3, 2, "auto"),  # (A⁻¹Āᵀ)(Cot G⁻¹) for heuristic damping
    ("wide", "full", 1, None, "rows"),
    ("mlp", "full", 3, 2, "gpu"),  # the accelerator code paths, traced on the CPU
  ],
)
def test_directions_match_explicit_kronecker_solve(
  monkeypatch, kind, mode, fisher, inverse_every, stats_window, contraction
):
  if contraction == "gpu":  # A⁻¹[:, :-1]∇K + A⁻¹[:, -1]∇bᵀ and batched factorisations
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    contraction = "gradient"
  damping, decay, steps = 0.05, 0.8, 6 if inverse_every > 1 else 3
  batches = _batches(kind, steps)
  tx = kfac(
    damping,
    ema_decay=decay,
    inverse_every=inverse_every,
    stats_window=stats_window,
    damping_mode=mode,
    contraction=contraction,
  )
  params, updates, state = _run_kfac(kind, tx, batches, fisher)

  per_step = [_np_statistics(kind, params, x, y, fisher) for x, y in batches]
  for name in (MODELS[kind][1][0], "out"):
    a_batches, g_batches, grads = ([s[name][i] for s in per_step] for i in range(3))
    expected = _np_kfac_directions(a_batches, g_batches, grads, damping, decay, inverse_every, stats_window, mode)
    for t, u in enumerate(updates):
      np.testing.assert_allclose(
        _matrix(u, (name,)), expected[t], rtol=1e-8, atol=1e-12, err_msg=f"layer {name}, step {t}"
      )
  assert int(state.count) == steps
  factors = state.layers["out"].factors
  assert isinstance(factors, HeuristicFactors if mode == "heuristic" else EigenFactors)


def test_contraction_order_choice():
  from neuron_optax._src.contraction import both_sides_from_rows as _both_sides_from_rows

  model, _, shape = MODELS["wide"]
  x, y = _batches("wide", 1)[0]
  params = init_f64(model(), jnp.asarray(x))
  _, _, stats = value_grad_and_stats(_loss(model()))(params, jnp.asarray(x), jnp.asarray(y))
  for key in (("hidden",), ("out",)):
    assert _both_sides_from_rows(stats[key], "auto") and _both_sides_from_rows(stats[key], "rows")
    assert not _both_sides_from_rows(stats[key], "gradient")
  x, y = _batches("mlp", 1)[0]
  params = init_f64(MLP(), jnp.asarray(x))
  _, _, stats = value_grad_and_stats(_loss(MLP()))(params, jnp.asarray(x), jnp.asarray(y))
  assert not _both_sides_from_rows(stats[("hidden",)], "auto")  # 6 rows, 5 inputs, 5 outputs


def test_top_level_dense_standard_damping():
  model = nn.Dense(3)
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(4, 2)), rng.integers(0, 3, size=4)
  params = init_f64(model, jnp.asarray(x))
  _, grads, stats = jax.jit(value_grad_and_stats(_loss(model)))(params, jnp.asarray(x), jnp.asarray(y))
  tx = kfac(0.3, damping_mode="standard")
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  assert list(state.layers) == ["<top-level>"]

  w, b = np.asarray(params["kernel"]), np.asarray(params["bias"])
  g = _softmax(x @ w + b) - np.eye(3)[y]
  a = augment(x)
  grad = a.T @ g / 4
  curvature = np.kron(a.T @ a / 4, g.T @ g / 4) + 0.3 * np.eye(9)
  expected = np.linalg.solve(curvature, grad.reshape(-1)).reshape(3, 3)
  np.testing.assert_allclose(_matrix(updates, ()), expected, rtol=1e-9)


# --------------------------------------------------------------------------- #
# Monte-Carlo Fisher
# --------------------------------------------------------------------------- #


def _mc_g(model, params, x, y, tx):
  grad_fn = value_grad_and_stats(_loss(model), fisher="mc", likelihood="categorical")

  def one(key):
    _, grads, stats = grad_fn(params, x, y, rng=key)
    _, state = tx.update(grads, tx.init(params), params, stats=stats)
    return {name: layer.g_ema for name, layer in state.layers.items()}  # ema_decay=0: the batch G

  return one


@pytest.mark.slow  # 4000 vmapped Fisher samples: CI runs it in its second step
def test_mc_fisher_g_averages_to_full_fisher_g():
  model = MLP()
  x, y = _batches("mlp", 1, seed=7)[0]
  params = init_f64(model, jnp.asarray(x), seed=2)
  tx = kfac(1.0, ema_decay=0.0)
  num = 4000
  samples = jax.jit(jax.vmap(_mc_g(model, params, jnp.asarray(x), jnp.asarray(y), tx)))(
    jax.random.split(jax.random.key(0), num)
  )
  reference = _np_statistics("mlp", params, x, y, "full")
  empirical = _np_statistics("mlp", params, x, y, "empirical")
  for name in ("hidden", "out"):
    g = np.asarray(samples[name])
    full = reference[name][1]
    # The samples are i.i.d. (independent keys), so by the CLT the mean's error per entry
    # is ~N(0, σ²/num); 5 standard errors make a false failure over these ≤25 entries
    # improbable (< 2e-5), while the bound stays a small fraction of G.
    tolerance = 5 * g.std(axis=0) / np.sqrt(num) + 1e-12
    np.testing.assert_array_less(np.abs(g.mean(axis=0) - full), tolerance)
    assert tolerance.max() < 0.1 * np.abs(full).max()
    # The test has power: the empirical Fisher's G (true labels) lies far outside the bound.
    assert np.any(np.abs(empirical[name][1] - full) > 3 * tolerance)


def test_mc_fisher_same_rng_same_statistics():
  model = MLP()
  x, y = _batches("mlp", 1, seed=8)[0]
  params = init_f64(model, jnp.asarray(x))
  one = jax.jit(_mc_g(model, params, jnp.asarray(x), jnp.asarray(y), kfac(1.0, ema_decay=0.0)))
  first, again = one(jax.random.key(11)), one(jax.random.key(11))
  other = one(jax.random.key(12))
  for name in first:
    np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(again[name]))
  assert any(not np.allclose(first[name], other[name]) for name in first)


# --------------------------------------------------------------------------- #
# KFAC / FOOF similarity
# --------------------------------------------------------------------------- #


def _similarity_setup(seed=4):
  model = MLP()
  x, y = _batches("mlp", 1, seed=seed)[0]
  params = init_f64(model, jnp.asarray(x), seed=3)
  _, grads, stats = jax.jit(value_grad_and_stats(_loss(model)))(params, jnp.asarray(x), jnp.asarray(y))
  return params, x, y, grads, stats


@pytest.mark.parametrize("foof_damping", [None, 0.2])
def test_similarity_matches_numpy(foof_damping):
  params, x, y, grads, stats = _similarity_setup()
  damping = 0.1
  got = jax.jit(lambda g, s: kfac_foof_similarity(g, s, damping, foof_damping=foof_damping))(grads, stats)
  assert set(got) == {"hidden", "out"}
  for name, (a, g, grad) in _np_statistics("mlp", params, x, y, "empirical").items():
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    a_damping = pi * np.sqrt(damping)
    kfac_dir = np.linalg.solve(a + a_damping * np.eye(a.shape[0]), grad) @ np.linalg.inv(
      g + np.sqrt(damping) / pi * np.eye(g.shape[0])
    )
    foof_dir = np.linalg.solve(a + (a_damping if foof_damping is None else foof_damping) * np.eye(a.shape[0]), grad)
    expected = np.sum(kfac_dir * foof_dir) / np.linalg.norm(kfac_dir) / np.linalg.norm(foof_dir)
    np.testing.assert_allclose(float(got[name]), expected, rtol=1e-9)


def test_similarity_takes_a_traced_damping():
  _, _, _, grads, stats = _similarity_setup()
  traced = jax.jit(lambda g, s, d: kfac_foof_similarity(g, s, d, foof_damping=d))
  concrete = kfac_foof_similarity(grads, stats, 0.3, foof_damping=0.3)
  got = traced(grads, stats, jnp.float64(0.3))
  for name in concrete:
    np.testing.assert_allclose(float(got[name]), float(concrete[name]), rtol=1e-12)
  assert all(np.isnan(float(v)) for v in traced(grads, stats, jnp.float64(0.0)).values())
  with pytest.raises(ValueError, match="not a schedule"):
    kfac_foof_similarity(grads, stats, lambda count: 1.0)


def test_similarity_approaches_one_with_heuristic_damping():
  _, _, _, grads, stats = _similarity_setup()
  dampings = (1e-4, 1e-2, 1.0, 1e2, 1e4)
  sweep = jax.jit(lambda g, s: [kfac_foof_similarity(g, s, d) for d in dampings])(grads, stats)
  for name in ("hidden", "out"):
    values = np.array([float(s[name]) for s in sweep])
    assert values[-1] > 0.99999, values
    assert values[0] < 0.9, values
    assert np.all(np.diff(values) > 0), values  # Benzing 2022, Fig. 3B


# --------------------------------------------------------------------------- #
# Training, pass-through, dtypes, non-finite batches
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mode", ["heuristic", "standard"])
def test_jitted_train_step_reduces_loss(mode):
  model = MLP()
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=32))
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.chain(kfac(1e-2, damping_mode=mode, inverse_every=2), optax.sgd(0.1))
  grad_fn = value_grad_and_stats(_loss(model))

  @jax.jit
  def train_step(params, opt_state):
    loss, grads, stats = grad_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(30):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


class NormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(nn.Dense(4, name="hidden")(x))
    return nn.Dense(3, name="out")(jnp.tanh(h))


def test_uncaptured_leaves_pass_through_and_dtypes():
  model = NormMLP()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=5))
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init(jax.random.key(0), x)["params"])
  _, grads, stats = jax.jit(value_grad_and_stats(_loss(model)))(params, x, y)
  for mode in ("heuristic", "standard"):
    tx = kfac(0.1, damping_mode=mode)
    state = tx.init(params)
    assert isinstance(state, KfacState)
    updates, state = jax.jit(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, state, stats)
    for leaf in ("scale", "bias"):
      np.testing.assert_array_equal(
        np.asarray(updates["norm"][leaf], np.float32), np.asarray(grads["norm"][leaf], np.float32)
      )
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      assert u.dtype == jnp.bfloat16 and u.shape == g.shape
    for layer in state.layers.values():
      assert {leaf.dtype for leaf in jax.tree.leaves((layer.a_ema, layer.g_ema, layer.factors))} == {
        jnp.dtype(jnp.float32)
      }
    assert not np.allclose(
      np.asarray(updates["out"]["kernel"], np.float32), np.asarray(grads["out"]["kernel"], np.float32)
    )


def test_non_finite_batch_is_skipped():
  model = MLP()
  ((x, y),) = _batches("mlp", 1, seed=2)
  params = init_f64(model, jnp.asarray(x))
  _, grads, stats = jax.jit(value_grad_and_stats(_loss(model)))(params, jnp.asarray(x), jnp.asarray(y))
  tx = kfac(0.1, ema_decay=0.5, inverse_every=1)
  update = jax.jit(tx.update)
  _, state = update(grads, tx.init(params), params, stats=stats)
  bad = dict(stats)
  bad[("out",)] = dataclasses.replace(stats[("out",)], cotangents=stats[("out",)].cotangents * np.nan)
  _, after = update(grads, state, params, stats=bad)
  before, now = state.layers["out"], after.layers["out"]
  assert int(now.g_updates) == 1 and int(now.a_updates) == 2
  np.testing.assert_array_equal(np.asarray(now.g_ema), np.asarray(before.g_ema))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(now.factors))


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(damping=0.0), "damping must be a positive"),
    (dict(damping=-1.0), "damping must be a positive"),
    (dict(damping=1.0, ema_decay=1.0), "ema_decay"),
    (dict(damping=1.0, inverse_every=0), "inverse_every"),
    (dict(damping=1.0, inverse_every=2, stats_window=3), "stats_window"),
    (dict(damping=1.0, damping_mode="exact"), "damping_mode"),
    (dict(damping=1.0, contraction="columns"), "contraction"),
  ],
)
def test_construction_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kfac(**kwargs)


def test_update_errors():
  params, x, y, grads, stats = _similarity_setup()
  tx = kfac(1.0)
  state = tx.init(params)
  with pytest.raises(ValueError, match="value_grad_and_stats"):
    tx.update(grads, state, params)
  other = ConvNet()
  conv_params = init_f64(other, jnp.zeros((1, 5, 5, 2)))
  with pytest.raises(ValueError, match="conv"):
    tx.update(
      grads,
      state,
      params,
      stats={("conv",): dataclasses.replace(stats[("hidden",)], kernel_shape=conv_params["conv"]["kernel"].shape)},
    )
  with pytest.raises(ValueError, match="value_grad_and_stats"):
    kfac_foof_similarity(grads, None, 1.0)
  with pytest.raises(ValueError, match="damping must be a positive"):
    kfac_foof_similarity(grads, stats, 0.0)
  with pytest.raises(ValueError, match="foof_damping must be a positive"):
    kfac_foof_similarity(grads, stats, 1.0, foof_damping=-1.0)
