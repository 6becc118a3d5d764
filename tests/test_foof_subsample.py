"""``statistics_rows`` (FOOF, KFAC): the factors from a random subset of rows, against float64 NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_f64

import neuron_optax as nox

N, P, D_IN, D_OUT, M = 3, 4, 12, 2, 5  # R = N * P = 12 rows of which M are drawn


def _loss(model, params, x):
  return jnp.mean(model.apply({"params": params}, x) ** 2)


def test_the_subsampled_moment_is_the_mean_over_m_distinct_rows_and_the_direction_solves_with_it(x64):
  """Row r of the input is ``c_r e_r``: the subsampled ``A`` names the rows it used, exactly."""
  model = nn.Dense(D_OUT)
  scales = np.linspace(1.0, 2.1, N * P)
  x = jnp.asarray((np.eye(N * P) * scales[:, None]).reshape(N, P, D_IN))
  params = init_f64(model, x)
  loss, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x))(params)
  damping = 0.3
  tx = nox.foof(damping, inverse_every=1, statistics_rows=M)
  direction, state = tx.update(grads, tx.init(params), params, stats=stats)
  layer = state.layers["Dense_0"] if "Dense_0" in state.layers else next(iter(state.layers.values()))
  a = np.asarray(layer.a_ema) / np.asarray(layer.a_weight)
  kernel_block = a[:D_IN, :D_IN]
  chosen = np.flatnonzero(np.diag(kernel_block))
  assert len(chosen) == M  # M distinct rows
  np.testing.assert_allclose(np.diag(kernel_block)[chosen], scales[chosen] ** 2 / M, rtol=1e-12)
  np.testing.assert_allclose(kernel_block - np.diag(np.diag(kernel_block)), 0.0, atol=1e-15)
  # the same rows, from the explicit rows of the reference: (1/M) Σ_{r∈S} ā_r ā_rᵀ
  rows = np.concatenate([np.asarray(x).reshape(-1, D_IN), np.ones((N * P, 1))], axis=1)[chosen]
  expected_a = rows.T @ rows / M
  np.testing.assert_allclose(a, expected_a, rtol=1e-12, atol=1e-15)
  grad_w = np.concatenate([np.asarray(grads["kernel"]), np.asarray(grads["bias"])[None]])
  expected = np.linalg.solve(expected_a + damping * np.eye(D_IN + 1), grad_w)
  got = np.concatenate([np.asarray(direction["kernel"]), np.asarray(direction["bias"])[None]])
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
  # the next step draws other rows
  _, state2 = tx.update(grads, state, params, stats=stats)
  layer2 = next(iter(state2.layers.values()))
  a2_batch = (np.asarray(layer2.a_ema) - 0.95 * np.asarray(layer.a_ema)) / 0.05
  assert set(np.flatnonzero(np.diag(a2_batch[:D_IN, :D_IN]) > 1e-12)) != set(chosen)


def test_the_subsampled_moment_is_unbiased(x64):
  """The mean over many steps' draws is the full batch moment (within five Monte-Carlo standard errors)."""
  model = nn.Dense(D_OUT)
  x = jax.random.normal(jax.random.key(1), (N, P, D_IN), jnp.float64)
  params = init_f64(model, x)
  _, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x))(params)
  tx = nox.foof(1.0, inverse_every=1, phase="statistics", statistics_rows=M)
  start = tx.init(params)

  def batch_moment(count, rows_tx=tx):
    _, state = rows_tx.update(grads, start._replace(count=count), params, stats=stats)
    layer = next(iter(state.layers.values()))
    return layer.a_ema / layer.a_weight  # one finite batch: the debiased average is that batch's moment

  draws = np.asarray(jax.jit(jax.vmap(batch_moment))(jnp.arange(1000)))
  rows = np.concatenate([np.asarray(x).reshape(-1, D_IN), np.ones((N * P, 1))], axis=1)
  full = rows.T @ rows / (N * P)
  error = np.abs(draws.mean(0) - full)
  standard_error = draws.std(0) / np.sqrt(len(draws))
  assert np.all(error <= 5 * standard_error + 1e-12), (error / (standard_error + 1e-30)).max()
  assert np.all(draws.std(0)[:D_IN, :D_IN] > 0)  # the draws differ
  # with at least R rows it is the exact moment
  every = batch_moment(jnp.asarray(0), nox.foof(1.0, inverse_every=1, phase="statistics", statistics_rows=N * P))
  np.testing.assert_allclose(np.asarray(every), full, rtol=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_statistics_rows_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="statistics_rows"):
    nox.foof(1.0, statistics_rows=bad)


def _square_loss_rows(x, params):
  """NumPy: the augmented input rows ``(R, d_in)`` and per-example cotangents ``n·cot`` ``(R, d_out)`` of
  ``mean(Dense(x)²)`` over every element."""
  rows = np.concatenate([np.asarray(x).reshape(-1, D_IN), np.ones((N * P, 1))], axis=1)
  weights = np.concatenate([np.asarray(params["kernel"]), np.asarray(params["bias"])[None]])
  out = rows @ weights
  return rows, N * 2 * out / out.size


def test_kfac_forms_both_factors_from_the_same_sampled_rows(x64):
  """KFAC's ``statistics_rows``: ``A`` and ``G`` from the same ``M`` rows (named by the one-hot inputs)."""
  model = nn.Dense(D_OUT)
  scales = np.linspace(1.0, 2.1, N * P)
  x = jnp.asarray((np.eye(N * P) * scales[:, None]).reshape(N, P, D_IN))
  params = init_f64(model, x)
  _, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x))(params)
  for mode in ("heuristic", "standard"):
    tx = nox.kfac(0.3, inverse_every=1, damping_mode=mode, statistics_rows=M)
    _, state = tx.update(grads, tx.init(params), params, stats=stats)
    layer = next(iter(state.layers.values()))
    a = np.asarray(layer.a_ema) / np.asarray(layer.a_weight)
    chosen = np.flatnonzero(np.diag(a[:D_IN, :D_IN]))
    assert len(chosen) == M
    rows, g = _square_loss_rows(x, params)
    np.testing.assert_allclose(a, rows[chosen].T @ rows[chosen] / M, rtol=1e-12, atol=1e-15)
    g_factor = np.asarray(layer.g_ema) / np.asarray(layer.g_weight)
    np.testing.assert_allclose(g_factor, g[chosen].T @ g[chosen] / M, rtol=1e-10, atol=1e-15)
    assert not np.allclose(g_factor, g.T @ g / (N * P))  # not every row's


def test_kfac_sampled_factors_are_unbiased_and_reduce_draws_examples(x64):
  """Over many steps' draws the mean of each factor is the batch's (five standard errors); with
  ``weight_sharing="reduce"`` the rows drawn are the ``n`` pooled ones, so ``statistics_rows >= n`` is exact."""
  model = nn.Dense(D_OUT)
  x = jax.random.normal(jax.random.key(2), (N, P, D_IN), jnp.float64) + 0.5
  params = init_f64(model, x)
  _, grads, stats = nox.value_grad_and_stats(lambda p: _loss(model, p, x))(params)

  def factors(tx, count):
    _, state = tx.update(grads, tx.init(params)._replace(count=count), params, stats=stats)
    layer = next(iter(state.layers.values()))
    return layer.a_ema / layer.a_weight, layer.g_ema / layer.g_weight

  tx = nox.kfac(1.0, inverse_every=1, phase="statistics", statistics_rows=M)
  draws = jax.jit(jax.vmap(lambda c: factors(tx, c)))(jnp.arange(1000))
  rows, g = _square_loss_rows(x, params)
  for draw, full in zip(draws, (rows.T @ rows / (N * P), g.T @ g / (N * P))):
    draw = np.asarray(draw)
    error, standard_error = np.abs(draw.mean(0) - full), draw.std(0) / np.sqrt(len(draw))
    assert np.all(error <= 5 * standard_error + 1e-12), (error / (standard_error + 1e-30)).max()

  pooled_rows = rows.reshape(N, P, -1).mean(1)
  pooled_g = g.reshape(N, P, -1).sum(1)
  reduce = nox.kfac(1.0, inverse_every=1, phase="statistics", weight_sharing="reduce", statistics_rows=N)
  a, g_factor = factors(reduce, jnp.asarray(0))
  np.testing.assert_allclose(a, pooled_rows.T @ pooled_rows / N, rtol=1e-12)
  np.testing.assert_allclose(g_factor, pooled_g.T @ pooled_g / (N * P), rtol=1e-10)
  a, _ = factors(nox.kfac(1.0, inverse_every=1, phase="statistics", weight_sharing="reduce", statistics_rows=2), 0)
  assert np.linalg.matrix_rank(np.asarray(a)) == 2  # two of the n pooled rows


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_kfac_statistics_rows_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="statistics_rows"):
    nox.kfac(1.0, statistics_rows=bad)
