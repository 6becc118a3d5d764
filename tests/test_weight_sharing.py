"""KFAC-expand and KFAC-reduce (``weight_sharing=``) for layers shared over positions, against float64 NumPy.

Eschenhagen et al. (NeurIPS 2023): expand treats every position as a row; reduce pools each example's
positions first, ``ā_i = mean_p ā_ip``, ``ĝ_si = Σ_p g_sip``, and keeps the library's scale with
``A = mean_i ā_i ā_iᵀ``, ``G = Σ_s mean_i ĝ_si ĝ_siᵀ / P``. The references below compute the forward and
backward pass of the tiny models in NumPy and form the damped Kronecker products explicitly.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_f64
from flax import nnx
from numpy_reference import augment, im2col

import neuron_optax as nox
from neuron_optax._src import nnx as nox_nnx

N, P, D, H, C = 5, 4, 3, 6, 3  # examples, positions (tokens), input width, hidden width, classes


class TokenClassifier(nn.Module):
  """A Dense layer shared over the tokens, tanh, mean-pooling over tokens, a Dense head."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(H, name="tokens")(x))
    return nn.Dense(C, name="head")(h.mean(axis=1))


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(N, P, D)) + 0.5), jnp.asarray(rng.integers(0, C, size=N))


def _xent(model, x, y):
  return lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()


def _np_rows_and_cotangents(params, x, y):
  """Per layer: (input rows with the bias's 1 ``(n, P, d_in)``, per-example cotangents ``n·cot`` ``(n, P, d_out)``,
  gradient matrix), from a NumPy forward and backward pass."""
  w1, b1 = np.asarray(params["tokens"]["kernel"]), np.asarray(params["tokens"]["bias"])
  w2, b2 = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
  x = np.asarray(x, np.float64)
  h = np.tanh(x @ w1 + b1)  # (n, P, H)
  pooled = h.mean(axis=1)  # (n, H)
  logits = pooled @ w2 + b2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  d_logits = (p - np.eye(C)[np.asarray(y)]) / N  # cotangent of the mean loss
  d_pre = (d_logits @ w2.T)[:, None, :] / P * (1 - h**2)  # (n, P, H)
  layers = {}
  for name, rows, cot in (("tokens", augment(x), d_pre), ("head", augment(pooled)[:, None, :], d_logits[:, None, :])):
    grad = rows.reshape(-1, rows.shape[-1]).T @ cot.reshape(-1, cot.shape[-1])
    layers[name] = (rows, N * cot, grad)
  return layers


def _np_factors(rows, g, weight_sharing):
  """``(A, G)`` of one batch by their definitions."""
  n, positions = rows.shape[:2]
  if weight_sharing == "expand":
    a_rows, g_rows = rows.reshape(-1, rows.shape[-1]), g.reshape(-1, g.shape[-1])
    return a_rows.T @ a_rows / (n * positions), g_rows.T @ g_rows / (n * positions)
  a_mean = rows.mean(axis=1)  # ā_i = mean_p ā_ip
  g_sum = g.sum(axis=1)  # ĝ_i = Σ_p g_ip
  return a_mean.T @ a_mean / n, g_sum.T @ g_sum / (n * positions)


def _np_kfac(a, g, grad, damping, mode):
  eye_a, eye_g = np.eye(a.shape[0]), np.eye(g.shape[0])
  if mode == "heuristic":
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    curvature = np.kron(a + pi * np.sqrt(damping) * eye_a, g + np.sqrt(damping) / pi * eye_g)
  else:
    curvature = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
  return np.linalg.solve(curvature, grad.reshape(-1)).reshape(grad.shape)


def _matrix(tree, name):
  return np.concatenate([np.asarray(tree[name]["kernel"]), np.asarray(tree[name]["bias"])[None]])


@pytest.mark.parametrize("weight_sharing", ["reduce", pytest.param("expand", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["foof", "kfac_heuristic", "kfac_standard"])
def test_directions_match_the_explicit_factors(x64, method, weight_sharing):
  """Two steps (statistics and re-factorisation every step): every layer's direction is the explicit
  solve with the EMA of the batches' factors; for the head (``P = 1``) expand and reduce coincide.
  (Expand against the same reference runs in the slow step; test_kfac.py and test_foof.py check it by default.)"""
  model, damping, decay = TokenClassifier(), 0.3, 0.9
  x0, y0 = _data(0)
  params = init_f64(model, x0)
  if method == "foof":
    tx = nox.foof(damping, ema_decay=decay, inverse_every=1, weight_sharing=weight_sharing)
  else:
    mode = method.split("_")[1]
    tx = nox.kfac(damping, ema_decay=decay, inverse_every=1, damping_mode=mode, weight_sharing=weight_sharing)
  state = tx.init(params)
  sums, weight = {}, 0.0

  @jax.jit
  def step(params, state, x, y):
    _, grads, stats = nox.value_grad_and_stats(_xent(model, x, y))(params)
    return grads, *tx.update(grads, state, params, stats=stats)

  for t in range(2):
    x, y = _data(t)
    grads, direction, state = step(params, state, x, y)
    reference = _np_rows_and_cotangents(params, x, y)
    weight = decay * weight + (1 - decay)
    for name, (rows, g, grad) in reference.items():
      np.testing.assert_allclose(_matrix(grads, name), grad, rtol=1e-10, atol=1e-13)  # the reference's backward
      a, g_factor = _np_factors(rows, g, weight_sharing)
      previous = sums.get(name, (0.0, 0.0))
      sums[name] = (decay * previous[0] + (1 - decay) * a, decay * previous[1] + (1 - decay) * g_factor)
      a_avg, g_avg = sums[name][0] / weight, sums[name][1] / weight
      if method == "foof":
        expected = np.linalg.solve(a_avg + damping * np.eye(a_avg.shape[0]), grad)
      else:
        expected = _np_kfac(a_avg, g_avg, grad, damping, method.split("_")[1])
      np.testing.assert_allclose(_matrix(direction, name), expected, rtol=1e-9, atol=1e-12, err_msg=f"{name}, step {t}")
    params = jax.tree.map(lambda p, d: p - 0.1 * d, params, direction)


def test_reduce_differs_from_expand_for_shared_layers_and_equals_it_without_positions(x64):
  """The test above cannot pass by accident: on the token layer the two factors differ; on a layer
  without positions (``P = 1``, an MLP) the whole direction is the same."""
  model = TokenClassifier()
  x, y = _data()
  params = init_f64(model, x)

  def directions(model, params, x, make):
    @jax.jit
    def both(params):
      _, grads, stats = nox.value_grad_and_stats(_xent(model, x, y))(params)
      return [make(ws).update(grads, make(ws).init(params), params, stats=stats)[0] for ws in ("expand", "reduce")]

    return both(params)

  expand, reduce = directions(model, params, x, lambda ws: nox.kfac(0.3, weight_sharing=ws))
  assert np.abs(_matrix(expand, "tokens") - _matrix(reduce, "tokens")).max() > 1e-3
  np.testing.assert_allclose(_matrix(expand, "head"), _matrix(reduce, "head"), rtol=1e-12)

  mlp = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(C)])
  flat = x.reshape(N, -1)
  mlp_params = init_f64(mlp, flat)
  for make in (
    lambda ws: nox.kfac(0.3, damping_mode="standard", weight_sharing=ws),
    lambda ws: nox.foof(0.3, weight_sharing=ws),
  ):
    expand, reduce = directions(mlp, mlp_params, flat, make)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), expand, reduce)


class ConvClassifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(3, (2, 2), padding="VALID", name="conv")(x)
    return nn.Dense(C, name="head")(h.mean(axis=(1, 2)))


def test_convolution_reduce_pools_the_patches(x64):
  """A convolution's positions are its output pixels: ``ā_i`` is the mean im2col patch, ``ĝ_i`` the sum of
  the per-pixel cotangents (here each pixel's is the pooled cotangent / P, so ``ĝ_i = n · d pooled_i``)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(N, 4, 4, 2)))
  y = jnp.asarray(rng.integers(0, C, size=N))
  model = ConvClassifier()
  params = init_f64(model, x)
  tx = nox.kfac(0.2, inverse_every=1, weight_sharing="reduce")

  @jax.jit
  def new_state(params):
    _, grads, stats = nox.value_grad_and_stats(_xent(model, x, y))(params)
    return tx.update(grads, tx.init(params), params, stats=stats)[1]

  layer = new_state(params).layers["conv"]
  patches = augment(im2col(np.asarray(x), (2, 2), (1, 1), [(0, 0), (0, 0)]).reshape(N, 9, -1))
  a_mean = patches.mean(axis=1)
  np.testing.assert_allclose(np.asarray(layer.a_ema / layer.a_weight), a_mean.T @ a_mean / N, rtol=1e-10)
  # the reference's backward: logits of the pooled conv output
  w2, b2 = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
  conv_out = patches[..., :-1] @ np.asarray(params["conv"]["kernel"]).reshape(-1, 3) + np.asarray(
    params["conv"]["bias"]
  )
  logits = conv_out.mean(axis=1) @ w2 + b2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  d_pooled = ((p - np.eye(C)[np.asarray(y)]) / N) @ w2.T  # (n, 3)
  g_sum = N * d_pooled  # Σ_p n · d_pooled / P
  np.testing.assert_allclose(np.asarray(layer.g_ema / layer.g_weight), g_sum.T @ g_sum / (N * 9), rtol=1e-10)


class Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(D, name="mlp")(carry)), None


class ScannedTokens(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(nn.remat(Cell), variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="cells")(
      x, None
    )
    return nn.Dense(C, name="head")(x.mean(axis=1))


class UnrolledTokens(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x, _ = Cell(name=f"cell_{i}")(x, None)
    return nn.Dense(C, name="head")(x.mean(axis=1))


class NnxTokens(nnx.Module):
  def __init__(self, rngs):
    self.cells = nnx.List([nnx.Linear(D, D, param_dtype=jnp.float64, rngs=rngs) for _ in range(2)])
    self.head = nnx.Linear(D, C, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    for cell in self.cells:
      x = jnp.tanh(cell(x))
    return self.head(x.mean(axis=1))


@pytest.mark.parametrize("method", ["kfac", pytest.param("foof", marks=pytest.mark.slow)])
def test_scanned_and_nnx_layouts_match_the_unrolled_linen_model(x64, method):
  """Reduce on a scanned (rematerialised) stack and on the NNX model gives the unrolled linen model's directions."""
  x, y = _data(1)
  scanned = init_f64(ScannedTokens(), x)
  unrolled = {
    "head": scanned["head"],
    **{f"cell_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], scanned["cells"]) for i in range(2)},
  }
  make = (
    (lambda layout: nox.foof(0.3, weight_sharing="reduce", kernel_input_ndim=layout))
    if method == "foof"
    else (lambda layout: nox.kfac(0.3, weight_sharing="reduce", kernel_input_ndim=layout))
  )

  def direction(model, params, layout):
    @jax.jit
    def run(params):
      _, grads, stats = nox.value_grad_and_stats(_xent(model, x, y))(params)
      tx = make(nox.kernel_layouts(stats) if layout else None)
      return tx.update(grads, tx.init(params), params, stats=stats)[0]

    return run(params)

  expected = direction(UnrolledTokens(), unrolled, False)
  got = direction(ScannedTokens(), scanned, True)
  for i in range(2):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
      jax.tree.map(lambda leaf, i=i: leaf[i], got["cells"]),
      expected[f"cell_{i}"],
    )

  model = NnxTokens(nnx.Rngs(0))
  for i, cell in enumerate(model.cells):
    cell.kernel[...] = unrolled[f"cell_{i}"]["mlp"]["kernel"]
    cell.bias[...] = unrolled[f"cell_{i}"]["mlp"]["bias"]
  model.head.kernel[...], model.head.bias[...] = unrolled["head"]["kernel"], unrolled["head"]["bias"]
  _, grads, stats = nox_nnx.value_grad_and_stats(
    lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  )(model)
  params = nnx.state(model, nnx.Param)
  tx = make(None)
  got = nnx.as_pure(tx.update(grads, tx.init(params), params, stats=stats)[0])
  for i in range(2):
    np.testing.assert_allclose(
      got["cells"][i]["kernel"], expected[f"cell_{i}"]["mlp"]["kernel"], rtol=1e-10, atol=1e-13
    )
  np.testing.assert_allclose(got["head"]["kernel"], expected["head"]["kernel"], rtol=1e-10, atol=1e-13)


def test_invalid_weight_sharing_and_moments_without_rows_raise():
  for make in (nox.foof, nox.kfac):
    with pytest.raises(ValueError, match="weight_sharing must be 'expand' or 'reduce'"):
      make(1.0, weight_sharing="mean")
  model = TokenClassifier()
  x, y = _data()
  params = model.init(jax.random.key(0), x)["params"]
  _, grads, stats = nox.value_grad_and_stats(_xent(model, x, y))(params)
  for inner in (nox.kfac(1.0, weight_sharing="reduce"), nox.foof(1.0, weight_sharing="reduce", statistics_rows=2)):
    tx = nox.accumulate_micro_batches(inner, every_k=1)
    with pytest.raises(ValueError, match="recorded rows.*accumulate_micro_batches"):  # while tracing
      jax.eval_shape(lambda: tx.update(grads, tx.init(params), params, stats=stats))
