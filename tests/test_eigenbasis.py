"""``nox.eigenbasis``: any optax transform run in the eigenbasis of the recorded factors (float64).

* a NumPy reference of AdamW run in ``Q_Aᵀ ∇W Q_G`` (explicit eigenvectors of the debiased moving
  averages, refreshed every T steps with the sign of the previous basis kept, rotated parameters
  for the decoupled decay), one- and two-sided, eigendecomposition and SOAP's power step;
* a diagonal ``A`` (a permutation basis) and an embedding under ``sides="input"`` give the inner
  update unchanged;
* the optax contract: inject_hyperparams (own and inner hyperparameters), MultiSteps, masked,
  apply_if_finite; a scanned model gets per-copy bases equal to the unrolled model's; clear errors.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_stats_match_grads, init_f64

import neuron_optax as nox

N = 8
# Adam's eps well above rounding: the LayerNorm makes A of "out" singular, and the rotated gradient along
# its null direction is zero up to rounding, where g / (|g| + eps) would amplify the rounding.
EPS = 1e-4


class MLP(nn.Module):
  """Two captured Dense layers around an (uncaptured) LayerNorm."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(5, name="hidden")(x))
    return nn.Dense(3, name="out")(nn.LayerNorm(name="norm")(h))


def _batch(seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(N, 4))), jnp.asarray(rng.integers(0, 3, size=N))


def _capture(model, params, x, y):
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  _, grads, stats = nox.value_grad_and_stats(loss)(params)
  return grads, stats


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _matrix(tree, layer):
  return np.concatenate([np.asarray(tree[layer]["kernel"]), np.asarray(tree[layer]["bias"])[None]], axis=0)


def _align(new, old):
  return new * np.where(np.sum(old * new, axis=0) < 0, -1.0, 1.0)


def _reference(params, batches, *, sides, refresh, lr, wd, decay, every, b1=0.9, b2=0.999, eps=1e-8):
  """AdamW in the eigenbasis, layer by layer, from the recorded rows (checked against autodiff)."""
  layers = {name: dict(a=0, wa=0.0, g=0, wg=0.0, m=0, v=0) for name in ("hidden", "out")}
  for name, layer in layers.items():
    d_in, d_out = _matrix(params, name).shape
    layer["qa"], layer["qg"] = np.eye(d_in), np.eye(d_out)
  other = {"m": 0, "v": 0}
  directions = []
  for t, (grads, stats) in enumerate(batches, start=1):
    out = {}
    for name, layer in layers.items():
      s = stats[(name,)]
      rows = np.asarray(s.augmented_inputs()).reshape(-1, s.d_in)
      cot = N * np.asarray(s.cotangents).reshape(-1, s.d_out)
      layer["a"] = decay * layer["a"] + (1 - decay) * rows.T @ rows / len(rows)
      layer["wa"] = decay * layer["wa"] + (1 - decay)
      layer["g"] = decay * layer["g"] + (1 - decay) * cot.T @ cot / len(cot)
      layer["wg"] = decay * layer["wg"] + (1 - decay)
      if (t - 1) % every == 0:
        for side in ("a", "g"):
          factor, old = layer[side] / layer["w" + side], layer["q" + side]
          if refresh == "power" and t > 1:  # columns by decreasing Rayleigh quotient, then back in place
            order = np.argsort(-np.diag(old.T @ factor @ old))
            new = np.empty_like(old)
            new[:, order] = np.linalg.qr(factor @ old[:, order])[0]
          else:
            new = np.linalg.eigh(factor)[1]
          layer["q" + side] = _align(new, old)
      qa, qg = layer["qa"], layer["qg"] if sides == "both" else np.eye(s.d_out)
      rotated = qa.T @ _matrix(grads, name) @ qg
      weights = qa.T @ _matrix(params, name) @ qg
      layer["m"] = b1 * layer["m"] + (1 - b1) * rotated
      layer["v"] = b2 * layer["v"] + (1 - b2) * rotated**2
      step = (layer["m"] / (1 - b1**t)) / (np.sqrt(layer["v"] / (1 - b2**t)) + eps)
      out[name] = qa @ (-lr * (step + wd * weights)) @ qg.T
    g = np.concatenate([np.ravel(grads["norm"]["bias"]), np.ravel(grads["norm"]["scale"])])
    p = np.concatenate([np.ravel(params["norm"]["bias"]), np.ravel(params["norm"]["scale"])])
    other["m"] = b1 * other["m"] + (1 - b1) * g
    other["v"] = b2 * other["v"] + (1 - b2) * g**2
    out["norm"] = -lr * ((other["m"] / (1 - b1**t)) / (np.sqrt(other["v"] / (1 - b2**t)) + eps) + wd * p)
    directions.append(out)
  return directions


@pytest.mark.parametrize(
  "sides,refresh", [("input", "eigh"), ("both", "eigh"), ("both", "power")], ids=["input", "both", "both-power"]
)
def test_rotated_adamw_matches_numpy_reference(x64, sides, refresh):
  model = MLP()
  x, _ = _batch(0)
  params = init_f64(model, x)
  batches = [_capture(model, params, *_batch(seed)) for seed in range(5)]
  for grads, stats in batches[:1]:
    assert_stats_match_grads(grads, stats)
  options = dict(lr=0.05, wd=0.3, decay=0.8, every=2, eps=EPS)
  tx = nox.eigenbasis(
    optax.adamw(options["lr"], weight_decay=options["wd"], eps=options["eps"]),
    sides=sides,
    ema_decay=options["decay"],
    refresh_every=options["every"],
    stats_window=options["every"],
    refresh=refresh,
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  want = _reference(params, batches, sides=sides, refresh=refresh, **options)
  for t, ((grads, stats), expected) in enumerate(zip(batches, want)):
    got, state = update(grads, state, params, stats=stats)
    for name in ("hidden", "out"):
      np.testing.assert_allclose(_matrix(got, name), expected[name], rtol=1e-7, atol=1e-12, err_msg=f"{name} {t}")
    norm = np.concatenate([np.ravel(got["norm"]["bias"]), np.ravel(got["norm"]["scale"])])
    np.testing.assert_allclose(norm, expected["norm"], rtol=1e-9, atol=1e-14)
  basis = np.asarray(state.layers["hidden"].a_basis)
  np.testing.assert_allclose(basis.T @ basis, np.eye(len(basis)), atol=1e-10)  # orthonormal after power steps
  assert (state.layers["hidden"].g_basis is None) == (sides == "input")


class DiagonalAndEmbed(nn.Module):
  """A bias-free Dense fed scaled one-hot rows (diagonal A) plus an embedding."""

  @nn.compact
  def __call__(self, x, tokens):
    return nn.Dense(3, use_bias=False, name="proj")(x) + nn.Embed(7, 3, name="embed")(tokens)


def test_a_diagonal_factor_and_an_embedding_give_the_inner_update(x64):
  """``A`` diagonal with distinct entries: its eigenbasis is a permutation, under which Adam is
  unchanged; the embedding's gradient passes unrotated (``sides="input"``)."""
  rng = np.random.default_rng(0)
  model = DiagonalAndEmbed()
  ids = np.arange(12) % 4
  x = jnp.asarray(np.eye(4)[ids] * np.array([0.5, 1.0, 2.0, 3.0])[ids, None])
  tokens = jnp.asarray(rng.integers(0, 7, size=12))
  params = init_f64(model, x, tokens)
  tx, adam = nox.eigenbasis(optax.adam(0.1), sides="input", refresh_every=1), optax.adam(0.1)
  state, adam_state = tx.init(params), adam.init(params)
  assert set(state.layers) == {"proj"}
  for seed in range(3):
    y = jnp.asarray(np.random.default_rng(seed).integers(0, 3, size=12))
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x, tokens), y).mean()
    _, grads, stats = nox.value_grad_and_stats(loss)(params)
    got, state = jax.jit(tx.update)(grads, state, params, stats=stats)
    want, adam_state = adam.update(grads, adam_state, params)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-10, atol=1e-14)
    params = optax.apply_updates(params, got)
  basis = np.abs(np.asarray(state.layers["proj"].a_basis))
  np.testing.assert_array_equal(np.sort(basis, axis=0)[-1], np.ones(4))  # a permutation (up to signs)


@pytest.fixture
def mlp_setup(x64):
  model = MLP()
  x, _ = _batch(0)
  params = init_f64(model, x)
  return model, params


def test_inject_hyperparams_own_and_inner(mlp_setup):
  model, params = mlp_setup
  grads, stats = _capture(model, params, *_batch(1))
  injected = optax.inject_hyperparams(nox.eigenbasis)(
    optax.inject_hyperparams(optax.adam)(learning_rate=0.1, eps=EPS), sides="both", ema_decay=0.9
  )
  state = injected.init(params)
  state.hyperparams["ema_decay"] = jnp.asarray(0.5, state.hyperparams["ema_decay"].dtype)
  inner = state.inner_state.inner_state
  inner.hyperparams["learning_rate"] = jnp.asarray(0.02, inner.hyperparams["learning_rate"].dtype)
  step = jax.jit(lambda g, s, st: injected.update(g, s, params, stats=st))
  for _ in range(2):
    got, state = step(grads, state, stats)
  assert step._cache_size() == 1
  tx = nox.eigenbasis(optax.adam(0.02, eps=EPS), sides="both", ema_decay=0.5)
  s = tx.init(params)
  for _ in range(2):
    want, s = jax.jit(tx.update)(grads, s, params, stats=stats)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-10, atol=1e-14)


def test_multisteps_masked_and_apply_if_finite(mlp_setup):
  model, params = mlp_setup
  (g1, s1), (g2, s2) = _capture(model, params, *_batch(1)), _capture(model, params, *_batch(2))
  make = lambda: nox.eigenbasis(optax.adam(0.1, eps=EPS), sides="both")

  multi = optax.MultiSteps(make(), every_k_schedule=2, accumulator_dtype=jnp.float64)
  state = multi.init(params)
  first, state = jax.jit(multi.update)(g1, state, params, stats=s1)
  assert np.all(_flat(first) == 0)
  second, _ = jax.jit(multi.update)(g2, state, params, stats=s2)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  tx = make()
  want, _ = jax.jit(tx.update)(mean, tx.init(params), params, stats=s2)
  np.testing.assert_allclose(_flat(second), _flat(want), rtol=1e-9, atol=1e-14)

  # optax.masked: "out" passes through; "hidden" gets what it gets without the mask.
  mask = jax.tree.map(lambda _: True, params)
  mask["out"] = jax.tree.map(lambda _: False, params["out"])
  masked = optax.masked(make(), mask)
  out, _ = jax.jit(masked.update)(g1, masked.init(params), params, stats=s1)
  alone, _ = jax.jit(tx.update)(g1, tx.init(params), params, stats=s1)
  np.testing.assert_array_equal(out["out"]["kernel"], g1["out"]["kernel"])
  np.testing.assert_allclose(out["hidden"]["kernel"], alone["hidden"]["kernel"], rtol=1e-12)

  # optax.apply_if_finite: a non-finite gradient gives no step and leaves the state as it was.
  guarded = optax.apply_if_finite(make(), max_consecutive_errors=3)
  state = guarded.init(params)
  bad = jax.tree.map(lambda g: g * jnp.nan, g1)
  out, new_state = jax.jit(guarded.update)(bad, state, params, stats=s1)
  assert np.all(_flat(out) == 0)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), new_state.inner_state, state.inner_state))

  # Non-finite statistics alone: the moving averages skip the batch, the state stays finite.
  tx = make()
  bad_stats = jax.tree.map(lambda a: a * jnp.nan if a.dtype == jnp.float64 else a, s1)
  _, state = jax.jit(tx.update)(g1, tx.init(params), params, stats=bad_stats)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))


LENGTH, WIDTH = 3, 4


class Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(WIDTH, name="mlp")(carry)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(nn.remat(Cell), variable_axes={"params": 0}, split_rngs={"params": True}, length=LENGTH)
    x, _ = scan(name="cells")(x, None)
    return nn.Dense(2, name="head")(x)


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(LENGTH):
      x, _ = Cell(name=f"cell_{i}")(x, None)
    return nn.Dense(2, name="head")(x)


def _unroll(tree):
  cells = {f"cell_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], tree["cells"]) for i in range(LENGTH)}
  return {"head": tree["head"], **cells}


@pytest.mark.slow  # CI's second step (issue 28: the default run within 10 minutes)
def test_scanned_layers_get_one_basis_per_copy(x64):
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(6, WIDTH))), jnp.asarray(rng.integers(0, 2, size=6))
  params = init_f64(Scanned(), x)
  loss = lambda model: (
    lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  )
  _, _, stats = nox.value_grad_and_stats(loss(Scanned()))(params)
  scanned = nox.eigenbasis(optax.adam(0.1), sides="both", refresh_every=2, kernel_input_ndim=nox.kernel_layouts(stats))
  unrolled = nox.eigenbasis(optax.adam(0.1), sides="both", refresh_every=2)
  state, unrolled_state = scanned.init(params), unrolled.init(_unroll(params))
  assert "cells/mlp[2]" in state.layers
  for t in range(3):
    _, grads, stats = nox.value_grad_and_stats(loss(Scanned()))(params)
    _, u_grads, u_stats = nox.value_grad_and_stats(loss(Unrolled()))(_unroll(params))
    got, state = jax.jit(scanned.update)(grads, state, params, stats=stats)
    want, unrolled_state = jax.jit(unrolled.update)(u_grads, unrolled_state, _unroll(params), stats=u_stats)
    # Adam divides every rotated component by its own size: components near its eps (the 2-class head's
    # null direction) turn rounding-order differences of the two graphs into 1e-10 (XLA -O0 codegen).
    np.testing.assert_allclose(_flat(_unroll(got)), _flat(want), rtol=1e-9, atol=1e-9, err_msg=f"step {t}")
    params = optax.apply_updates(params, got)


def test_clear_errors(mlp_setup):
  model, params = mlp_setup
  grads, stats = _capture(model, params, *_batch(1))
  with pytest.raises(TypeError, match="inner must be an optax transform"):
    nox.eigenbasis(lambda g: g)
  with pytest.raises(ValueError, match="sides"):
    nox.eigenbasis(optax.adam(0.1), sides="output")
  with pytest.raises(ValueError, match="refresh"):
    nox.eigenbasis(optax.adam(0.1), refresh="qr")
  with pytest.raises(ValueError, match="stats_window"):
    nox.eigenbasis(optax.adam(0.1), refresh_every=2, stats_window=3)
  tx = nox.eigenbasis(optax.adam(0.1))
  with pytest.raises(ValueError, match="value_grad_and_stats"):
    tx.update(grads, tx.init(params), params)
  small = tx.init({"hidden": {"kernel": jnp.ones((2, 5)), "bias": jnp.ones(5)}})  # other parameters
  with pytest.raises(ValueError, match="tx.init"):
    tx.update(grads, small._replace(inner_state=tx.init(params).inner_state), params, stats=stats)
