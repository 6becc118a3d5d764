"""FNGD against float64 references built from explicit per-example gradients.

The references never call neuron_optax: per-example gradients come from
``jax.vmap(jax.grad)`` of the single-example loss, and the Gram matrix,
coefficients, directions and the Woodbury identity are written out in NumPy.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxpr_equations import equations

from neuron_optax import value_grad_and_stats
from neuron_optax._src.fngd import FngdState, coefficients, fngd

RTOL = 1e-9
ATOL = 1e-12


# --------------------------------------------------------------------------- #
# Models and float64 references
# --------------------------------------------------------------------------- #


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5)(x))
    return nn.Dense(3, use_bias=False)(x)


class TokenMLP(nn.Module):
  """A Dense on ``(batch, tokens, d)``: every token is a position of its example."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5)(x)).mean(axis=1)
    return nn.Dense(3)(x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (2, 2), padding="SAME")(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class NormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(5)(x))
    return nn.Dense(3)(jnp.tanh(x))


def make_batch(seed, n, shape, classes=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n,) + shape)), jnp.asarray(rng.integers(0, classes, n))


def init(model, x):
  """Parameters in the inputs' dtype (float64 under x64; Flax initialises float32)."""
  return init_params(model, x[:1])


@functools.partial(jax.jit, static_argnums=0)
def init_params(model, example):
  params = model.init(jax.random.PRNGKey(0), example)["params"]
  return jax.tree.map(lambda p: p.astype(example.dtype), params)


def mean_loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def layer_matrix(tree, name):
  """Kernel rows then the bias row (leading example axis kept)."""
  layer = tree[name]
  kernel = np.asarray(layer["kernel"], np.float64)
  n = kernel.shape[0]
  kernel = kernel.reshape(n, -1, kernel.shape[-1])
  if "bias" not in layer:
    return kernel
  return np.concatenate([kernel, np.asarray(layer["bias"], np.float64)[:, None]], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def mean_gradients(model, params, x, y):
  return jax.grad(mean_loss(model))(params, x, y)


@functools.partial(jax.jit, static_argnums=0)
def all_per_example_gradients(model, params, x, y):
  def single(p, xi, yi):
    return mean_loss(model)(p, xi[None], yi[None])

  return jax.vmap(jax.grad(single), in_axes=(None, 0, 0))(params, x, y)


def per_example_gradients(model, params, x, y, name):
  """``Ψ`` as ``(n, d_in(+1), d_out)``: gradients of each example's own loss."""
  return layer_matrix(all_per_example_gradients(model, params, x, y), name)


def reference_coefficients(psi, alpha):
  psi = psi.reshape(psi.shape[0], -1)
  n = psi.shape[0]
  gram = psi @ psi.T
  lam = alpha * np.linalg.norm(gram, "fro")
  return np.linalg.solve(np.eye(n) + gram / lam, np.ones(n) / n), lam


def reference_direction(psi, c):
  return np.einsum("i,ijk->jk", c, psi)


def direction_matrix(updates, name):
  return layer_matrix(jax.tree.map(lambda v: v[None], updates), name)[0]


def run_steps(tx, model, params, batches, fisher="empirical"):
  """Updates and states of consecutive steps (params fixed: FNGD does not read them)."""
  state = tx.init(params)
  kwargs = {} if fisher == "empirical" else dict(likelihood="categorical")
  compute = value_grad_and_stats(mean_loss(model), fisher=fisher, **kwargs)

  @jax.jit
  def step_fn(state, x, y, rng):
    extra = {} if fisher == "empirical" else dict(rng=rng)
    _, grads, stats = compute(params, x, y, **extra)
    return tx.update(grads, state, params, stats=stats)

  updates_list, states = [], []
  for step, (x, y) in enumerate(batches):
    updates, state = step_fn(state, x, y, jax.random.PRNGKey(step))
    updates_list.append(updates)
    states.append(state)
  return updates_list, states


CASES = {
  "dense": (MLP(), (4,), ["Dense_0", "Dense_1"]),
  "tokens": (TokenMLP(), (3, 4), ["Dense_0", "Dense_1"]),
  "conv": (ConvNet(), (3, 3, 2), ["Conv_0", "Dense_0"]),
}


# --------------------------------------------------------------------------- #
# Coefficients and directions
# --------------------------------------------------------------------------- #


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_step_coefficients_table_and_direction(case):
  model, shape, names = CASES[case]
  n, alpha = 6, 0.05
  x, y = make_batch(1, n, shape)
  params = init(model, x)
  (updates,), (state,) = run_steps(fngd(alpha, steps_per_epoch=3, batch_size=n), model, params, [(x, y)])
  for name in names:
    psi = per_example_gradients(model, params, x, y, name)
    c, _ = reference_coefficients(psi, alpha)
    # the coefficients are far from SGD's 1/n, so the checks below are not vacuous
    assert np.max(np.abs(c * n - 1)) > 1e-2
    np.testing.assert_allclose(direction_matrix(updates, name), reference_direction(psi, c), rtol=RTOL, atol=ATOL)
    table = np.asarray(state.layers[name].coefficients)
    assert table.shape == (3, n)
    np.testing.assert_allclose(table[0], c, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(table[1:], 0)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", sorted(CASES))
def test_unshared_step_is_the_damped_empirical_fisher_natural_gradient(case):
  """``Σ c_i ψ_i = λ(ΨΨᵀ + λI)⁻¹ ∇W = μ(F_emp + μI)⁻¹ ∇W`` with ``μ = λ/n``, explicit inverses."""
  model, shape, names = CASES[case]
  n, alpha = 5, 0.02
  x, y = make_batch(2, n, shape)
  params = init(model, x)
  grads = mean_gradients(model, params, x, y)
  (updates,), (state,) = run_steps(fngd(alpha, share_coefficients=False), model, params, [(x, y)])
  assert state.layers == {}
  for name in names:
    psi = per_example_gradients(model, params, x, y, name)
    c, lam = reference_coefficients(psi, alpha)
    direction = direction_matrix(updates, name)
    np.testing.assert_allclose(direction, reference_direction(psi, c), rtol=RTOL, atol=ATOL)
    cols = psi.reshape(n, -1).T  # Ψ: (d_in·d_out, n)
    grad = direction_matrix(grads, name).reshape(-1)
    np.testing.assert_allclose(cols.mean(axis=1), grad, rtol=1e-10, atol=1e-13)
    eye = np.eye(cols.shape[0])
    woodbury = lam * np.linalg.inv(cols @ cols.T + lam * eye) @ grad
    mu, fisher = lam / n, cols @ cols.T / n
    natural = mu * np.linalg.inv(fisher + mu * eye) @ grad
    np.testing.assert_allclose(woodbury, natural, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(direction, woodbury.reshape(psi.shape[1:]), rtol=1e-8, atol=1e-12)
    assert not np.allclose(woodbury, grad, rtol=1e-2)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", sorted(CASES))
def test_large_alpha_gives_the_mean_gradient(case):
  model, shape, names = CASES[case]
  x, y = make_batch(3, 6, shape)
  params = init(model, x)
  grads = mean_gradients(model, params, x, y)
  (updates,), _ = run_steps(fngd(1e12, steps_per_epoch=2, batch_size=6), model, params, [(x, y)])
  for name in names:
    np.testing.assert_allclose(direction_matrix(updates, name), direction_matrix(grads, name), rtol=1e-9, atol=1e-14)


@pytest.mark.usefixtures("x64")
def test_fisher_cotangents_are_ignored():
  """FNGD is an empirical-Fisher method: MC stats give the true-label update."""
  model, shape, names = CASES["dense"]
  x, y = make_batch(4, 6, shape)
  params = init(model, x)
  tx = fngd(0.1, share_coefficients=False)
  (empirical,), _ = run_steps(tx, model, params, [(x, y)])
  (mc,), _ = run_steps(tx, model, params, [(x, y)], fisher="mc")
  for name in names:
    np.testing.assert_allclose(direction_matrix(mc, name), direction_matrix(empirical, name), rtol=1e-12, atol=1e-15)


@pytest.mark.usefixtures("x64")
def test_coefficients_solve_zero_gram_and_tiny_gradients():
  rng = np.random.default_rng(5)
  psi = rng.normal(size=(6, 11))
  gram = psi @ psi.T
  expected, _ = reference_coefficients(psi[:, :, None], 0.2)
  solve = jax.jit(coefficients, static_argnums=1)
  np.testing.assert_allclose(solve(jnp.asarray(gram), 0.2), expected, rtol=1e-12)
  np.testing.assert_array_equal(solve(jnp.zeros((4, 4)), 0.2), np.full(4, 0.25))
  # gradients of size 1e-13 give K ~ 1e-26, whose square underflows float32: normalised first
  tiny = solve(jnp.asarray(gram * 1e-26, jnp.float32), 0.2)
  np.testing.assert_allclose(tiny, expected, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Sharing across epochs
# --------------------------------------------------------------------------- #


def expected_sharing(model, params, batches, names, alpha, computed_at):
  """Reference coefficients of the computing steps and every step's direction.

  Step ``k`` uses the coefficients computed at step ``computed_at[k]`` (their
  first ``m`` entries for a batch of ``m``) with its own per-example gradients.
  """
  psis = [{name: per_example_gradients(model, params, x, y, name) for name in names} for x, y in batches]
  coeffs = {}
  directions = []
  for step, source in enumerate(computed_at):
    if source == step:
      coeffs[step] = {name: reference_coefficients(psis[step][name], alpha)[0] for name in names}
    directions.append(
      {name: reference_direction(psi, coeffs[source][name][: len(psi)]) for name, psi in psis[step].items()}
    )
  return coeffs, directions


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", ["dense", "conv"])
def test_coefficients_are_reused_across_epochs_with_new_batches(case):
  model, shape, names = CASES[case]
  n, alpha = 5, 0.03
  batches = [make_batch(10 + k, n, shape) for k in range(5)]
  params = init(model, batches[0][0])
  updates, states = run_steps(fngd(alpha, steps_per_epoch=2, batch_size=n), model, params, batches)
  # steps 2, 3, 4 use rows 0, 1, 0 (computed at steps 0, 1) with their own batch's rows
  coeffs, expected = expected_sharing(model, params, batches, names, alpha, [0, 1, 0, 1, 0])
  for step in range(5):
    for name in names:
      np.testing.assert_allclose(direction_matrix(updates[step], name), expected[step][name], rtol=RTOL, atol=ATOL)
  for name in names:
    table = np.stack([coeffs[0][name], coeffs[1][name]])
    for state in states[1:]:
      np.testing.assert_allclose(np.asarray(state.layers[name].coefficients), table, rtol=RTOL, atol=ATOL)
    # fresh coefficients of step 2's batch differ: reuse is observable
    psi = per_example_gradients(model, params, *batches[2], name)
    fresh = reference_direction(psi, reference_coefficients(psi, alpha)[0])
    assert not np.allclose(fresh, expected[2][name], rtol=1e-4)
  assert [int(s.count) for s in states] == [1, 2, 3, 4, 5]


@pytest.mark.usefixtures("x64")
def test_refresh_every_epochs_recomputes_the_table():
  model, shape, names = CASES["dense"]
  n, alpha = 5, 0.03
  batches = [make_batch(20 + k, n, shape) for k in range(7)]
  params = init(model, batches[0][0])
  tx = fngd(alpha, steps_per_epoch=2, batch_size=n, refresh_every_epochs=2)
  updates, states = run_steps(tx, model, params, batches)
  # epochs 0 and 2 compute (steps 0, 1, 4, 5); epochs 1 and 3 reuse
  coeffs, expected = expected_sharing(model, params, batches, names, alpha, [0, 1, 0, 1, 4, 5, 4])
  for step in range(7):
    for name in names:
      np.testing.assert_allclose(direction_matrix(updates[step], name), expected[step][name], rtol=RTOL, atol=ATOL)
  for name in names:
    np.testing.assert_allclose(
      np.asarray(states[-1].layers[name].coefficients),
      np.stack([coeffs[4][name], coeffs[5][name]]),
      rtol=RTOL,
      atol=ATOL,
    )


@pytest.mark.usefixtures("x64")
def test_smaller_last_batch_uses_the_first_entries_of_its_row():
  model, shape, names = CASES["dense"]
  alpha = 0.03
  sizes = [4, 3, 4, 3]
  batches = [make_batch(30 + k, m, shape) for k, m in enumerate(sizes)]
  params = init(model, batches[0][0])
  updates, states = run_steps(fngd(alpha, steps_per_epoch=2, batch_size=4), model, params, batches)
  coeffs, expected = expected_sharing(model, params, batches, names, alpha, [0, 1, 0, 1])
  for step in range(4):
    for name in names:
      np.testing.assert_allclose(direction_matrix(updates[step], name), expected[step][name], rtol=RTOL, atol=ATOL)
  for name in names:
    row = np.asarray(states[-1].layers[name].coefficients)[1]
    np.testing.assert_allclose(row[:3], coeffs[1][name], rtol=RTOL, atol=ATOL)
    assert row[3] == 0


@pytest.mark.usefixtures("x64")
def test_non_finite_batch_stores_sgd_coefficients():
  """A bad batch in a computing epoch takes no finite step and stores ``c = 1/n`` for its row."""
  model, shape, names = CASES["dense"]
  n = 4
  x, y = make_batch(40, n, shape)
  x2, y2 = make_batch(41, n, shape)
  params = init(model, x)
  bad = x.at[0, 0].set(jnp.nan)
  updates, states = run_steps(fngd(0.1, steps_per_epoch=2, batch_size=n), model, params, [(bad, y), (x, y), (x2, y2)])
  grads = mean_gradients(model, params, x2, y2)
  for name in names:
    np.testing.assert_array_equal(np.asarray(states[0].layers[name].coefficients)[0], np.full(n, 1 / n))
    assert np.all(np.isfinite(np.asarray(states[1].layers[name].coefficients)))
    direction = direction_matrix(updates[0], name)
    assert not np.any(np.isfinite(direction) & (direction != 0))
    # step 2 reuses row 0: the SGD coefficients give the mean gradient of the new batch
    np.testing.assert_allclose(direction_matrix(updates[2], name), direction_matrix(grads, name), rtol=RTOL, atol=ATOL)


def test_gram_and_solve_only_run_inside_the_cond_branch():
  """With sharing, no top-level equation forms the ``n × n`` Gram matrix or factorises it."""
  model, shape, _ = CASES["dense"]
  n = 7  # no other axis has this size
  x, y = make_batch(50, n, shape)
  params = init(model, x)
  _, grads, stats = jax.jit(value_grad_and_stats(mean_loss(model)))(params, x, y)

  def found(jaxpr, inside_cond):
    """(primitive, output shapes, inside a cond branch) of every equation, recursively."""
    out = []
    for eqn in jaxpr.eqns:
      shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
      out.append((eqn.primitive.name, shapes, inside_cond))
      for param in eqn.params.values():
        subs = param if isinstance(param, (tuple, list)) else [param]
        for sub in subs:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            out += found(sub.jaxpr, inside_cond or eqn.primitive.name == "cond")
          elif isinstance(sub, jax.extend.core.Jaxpr):
            out += found(sub, inside_cond or eqn.primitive.name == "cond")
    return out

  def equations(tx):
    state = tx.init(params)
    return found(jax.make_jaxpr(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, state, stats).jaxpr, False)

  shared = equations(fngd(0.1, steps_per_epoch=3, batch_size=n))
  assert any(name == "cholesky" and inside for name, _, inside in shared)
  assert any((n, n) in shapes and inside for _, shapes, inside in shared)
  assert not any(name == "cholesky" and not inside for name, _, inside in shared)
  assert not any((n, n) in shapes and not inside for _, shapes, inside in shared)
  # the walker does see them at top level when there is no sharing
  unshared = equations(fngd(0.1, share_coefficients=False))
  assert any(name == "cholesky" and not inside for name, _, inside in unshared)
  assert any((n, n) in shapes and not inside for _, shapes, inside in unshared)


@pytest.mark.usefixtures("x64")
def test_python_phase_switch_gives_the_auto_trajectory_without_a_cond():
  """phase="inversion" for the first epoch, then phase="plain": the same updates and states as "auto"."""
  model, shape, names = CASES["dense"]
  n = 5
  batches = [make_batch(70 + k, n, shape) for k in range(5)]
  params = init(model, batches[0][0])
  auto_updates, auto_states = run_steps(fngd(0.05, steps_per_epoch=2, batch_size=n), model, params, batches)
  compute_tx = fngd(0.05, steps_per_epoch=2, batch_size=n, phase="inversion")
  reuse_tx = fngd(0.05, steps_per_epoch=2, batch_size=n, phase="plain")
  first_updates, first_states = run_steps(compute_tx, model, params, batches[:2])

  compute = value_grad_and_stats(mean_loss(model))
  state, later_updates = first_states[-1], []
  for x, y in batches[2:]:
    _, grads, stats = compute(params, x, y)
    update, state = jax.jit(reuse_tx.update)(grads, state, params, stats=stats)
    later_updates.append(update)
  assert jax.tree.structure(state) == jax.tree.structure(auto_states[-1])
  for got, want in zip(first_updates + later_updates, auto_updates):
    for name in names:
      np.testing.assert_allclose(direction_matrix(got, name), direction_matrix(want, name), rtol=1e-12)
  for name in names:
    np.testing.assert_array_equal(state.layers[name].coefficients, auto_states[-1].layers[name].coefficients)

  _, grads, stats = compute(params, *batches[0])

  def jaxpr_of(tx):
    return str(jax.make_jaxpr(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, tx.init(params), stats))

  # The reusing step never solves; its one conditional is the incoming-gradient check (one for all
  # layers), which the opt-in contraction="rows" drops.
  assert "cholesky" not in jaxpr_of(reuse_tx)
  assert jaxpr_of(reuse_tx).count("cond[") == 1
  rows_tx = fngd(0.05, steps_per_epoch=2, batch_size=n, phase="plain", contraction="rows")
  assert "cond" not in jaxpr_of(rows_tx) and "cholesky" not in jaxpr_of(rows_tx)
  jaxpr = str(
    jax.make_jaxpr(lambda g, s, st: compute_tx.update(g, s, params, stats=st))(grads, compute_tx.init(params), stats)
  )
  assert "cholesky" in jaxpr


@pytest.mark.usefixtures("x64")
def test_shared_conv_step_never_forms_im2col_rows():
  """The reusing step weights the cotangents and runs one backward-filter convolution per layer."""
  model, shape, _ = CASES["conv"]
  x, y = make_batch(80, 4, shape)
  params = init(model, x)
  _, grads, stats = value_grad_and_stats(mean_loss(model))(params, x, y)

  def group_counts(phase):
    tx = fngd(0.1, steps_per_epoch=2, batch_size=4, phase=phase)
    jaxpr = jax.make_jaxpr(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, tx.init(params), stats)
    return [
      e.params["feature_group_count"] for e in equations(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"
    ]

  # Backward-filter convolutions only (the direction, the recorded gradient of the exact branch, the
  # incoming-gradient check's probes): no patches.
  assert set(group_counts("plain")) == {1}
  assert 2 in group_counts("inversion")  # the Gram matrix needs the patches (one group per input channel)


# --------------------------------------------------------------------------- #
# Integration and errors
# --------------------------------------------------------------------------- #


@pytest.mark.usefixtures("x64")
def test_uncaptured_leaves_pass_through():
  model = NormMLP()
  x, y = make_batch(60, 6, (4,))
  params = init(model, x)
  (updates,), _ = run_steps(fngd(0.1, steps_per_epoch=2, batch_size=6), model, params, [(x, y)])
  grads = mean_gradients(model, params, x, y)
  for leaf in ("scale", "bias"):
    np.testing.assert_allclose(updates["LayerNorm_0"][leaf], grads["LayerNorm_0"][leaf], rtol=1e-12)
  assert not np.allclose(updates["Dense_0"]["kernel"], grads["Dense_0"]["kernel"], rtol=1e-3)


def test_jit_training_with_sgd_reduces_the_loss():
  model = MLP()
  n, steps_per_epoch = 16, 4
  teacher = jax.random.normal(jax.random.PRNGKey(7), (4, 3))
  inputs = [jax.random.normal(jax.random.PRNGKey(70 + k), (n, 4)) for k in range(steps_per_epoch)]
  data = [(x, jnp.argmax(x @ teacher, axis=-1)) for x in inputs]
  params = init(model, data[0][0])
  tx = optax.chain(fngd(0.1, steps_per_epoch=steps_per_epoch, batch_size=n), optax.sgd(0.3, momentum=0.9))
  opt_state = tx.init(params)
  loss_fn = mean_loss(model)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, stats = value_grad_and_stats(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  def dataset_loss(p):
    return float(np.mean([loss_fn(p, x, y) for x, y in data]))

  initial = dataset_loss(params)
  structure = jax.tree.structure(opt_state)
  for _ in range(5):
    for x, y in data:
      params, opt_state, _ = train_step(params, opt_state, x, y)
  assert jax.tree.structure(opt_state) == structure
  fngd_state = opt_state[0]
  assert isinstance(fngd_state, FngdState) and int(fngd_state.count) == 20
  assert np.all(np.asarray(fngd_state.layers["Dense_0"].coefficients) != 0)
  assert dataset_loss(params) < 0.5 * initial


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(alpha=0.0, steps_per_epoch=2, batch_size=4), "alpha"),
    (dict(alpha=-1.0, steps_per_epoch=2, batch_size=4), "alpha"),
    (dict(alpha=float("inf"), steps_per_epoch=2, batch_size=4), "alpha"),
    (dict(alpha=True, steps_per_epoch=2, batch_size=4), "alpha"),
    (dict(alpha="1", steps_per_epoch=2, batch_size=4), "alpha"),
    (dict(alpha=0.1, batch_size=4), "steps_per_epoch is required"),
    (dict(alpha=0.1, steps_per_epoch=2), "batch_size is required"),
    (dict(alpha=0.1, steps_per_epoch=0, batch_size=4), "steps_per_epoch must be"),
    (dict(alpha=0.1, steps_per_epoch=2.0, batch_size=4), "steps_per_epoch must be"),
    (dict(alpha=0.1, steps_per_epoch=True, batch_size=4), "steps_per_epoch must be"),
    (dict(alpha=0.1, steps_per_epoch=2, batch_size=0), "batch_size must be"),
    (dict(alpha=0.1, steps_per_epoch=2, batch_size=4, refresh_every_epochs=0), "refresh_every_epochs"),
    (dict(alpha=0.1, steps_per_epoch=2, batch_size=4, refresh_every_epochs=1.5), "refresh_every_epochs"),
    (dict(alpha=0.1, share_coefficients=False, refresh_every_epochs=2), "refresh_every_epochs only"),
    (dict(alpha=0.1, share_coefficients=1, steps_per_epoch=2, batch_size=4), "share_coefficients"),
    (dict(alpha=0.1, steps_per_epoch=2, batch_size=4, phase="shared"), "phase must be"),
    (dict(alpha=0.1, share_coefficients=False, phase="plain"), "phase only applies"),
    (dict(alpha=0.1, steps_per_epoch=2, batch_size=4, phase="reuse"), "phase must be"),
    (dict(alpha=0.1, steps_per_epoch=2, batch_size=4, contraction="columns"), "contraction must be"),
  ],
)
def test_bad_arguments(kwargs, match):
  alpha = kwargs.pop("alpha")
  with pytest.raises(ValueError, match=match):
    fngd(alpha, **kwargs)


def test_update_errors():
  model = MLP()
  x, y = make_batch(80, 6, (4,))
  params = init(model, x)
  _, grads, stats = jax.jit(value_grad_and_stats(mean_loss(model)))(params, x, y)
  tx = fngd(0.1, steps_per_epoch=2, batch_size=4)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the layer statistics"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=r"'Dense_0' sees a batch of 6 examples.*batch_size=4"):
    tx.update(grads, state, params, stats=stats)
  with pytest.raises(ValueError, match="no coefficient table for layer 'Dense_0'"):
    tx.update(grads, state._replace(layers={"Dense_1": state.layers["Dense_1"]}), params, stats=stats)
