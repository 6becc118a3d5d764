"""value_grad_and_stats: recorded rows and cotangents vs independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_stats_match_grads, init_f64
from numpy_reference import im2col, same_padding

import neuron_optax as nox


def _xent(model, x, y):
  def loss_fn(params):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

  return loss_fn


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5, name="hidden")(x))
    return nn.Dense(3, use_bias=False, name="out")(x)


def test_dense_rows_and_cotangents_match_numpy(x64):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(7, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=7))
  model = MLP()
  params = init_f64(model, x, seed=0)
  loss, grads, stats = jax.jit(nox.value_grad_and_stats(_xent(model, x, y)))(params)

  w1, b1 = np.asarray(params["hidden"]["kernel"]), np.asarray(params["hidden"]["bias"])
  w2 = np.asarray(params["out"]["kernel"])
  h = np.tanh(np.asarray(x) @ w1 + b1)
  logits = h @ w2
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(3)[np.asarray(y)]
  cot_out = (p - onehot) / 7
  cot_hidden = (cot_out @ w2.T) * (1 - h**2)
  np.testing.assert_allclose(loss, -np.log(p[np.arange(7), np.asarray(y)]).mean(), rtol=1e-12)
  np.testing.assert_allclose(stats[("hidden",)].inputs[:, 0], np.asarray(x), rtol=1e-12)
  np.testing.assert_allclose(stats[("out",)].inputs[:, 0], h, rtol=1e-12)
  np.testing.assert_allclose(stats[("out",)].cotangents[:, 0], cot_out, rtol=1e-10)
  np.testing.assert_allclose(stats[("hidden",)].cotangents[:, 0], cot_hidden, rtol=1e-10, atol=1e-14)
  assert stats[("hidden",)].has_bias and not stats[("out",)].has_bias
  assert_stats_match_grads(grads, stats)


def test_value_and_grads_equal_plain_value_and_grad(x64):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(5, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=5))
  model = MLP()
  params = init_f64(model, x, seed=1)
  loss_fn = _xent(model, x, y)
  ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params)
  for fisher, kw in [("empirical", {}), ("mc", {"rng": jax.random.key(3)}), ("full", {})]:
    loss, grads, _ = nox.value_grad_and_stats(loss_fn, fisher=fisher, likelihood="categorical")(params, **kw)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, ref_grads)


def test_tokens_are_rows_and_top_level_dense(x64):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 4, 6)))
  model = nn.Dense(2)
  params = init_f64(model, x, seed=0)
  target = jnp.asarray(rng.normal(size=(3, 4, 2)))

  def loss_fn(p):
    return jnp.mean(jnp.sum((model.apply({"params": p}, x) - target) ** 2, -1))

  _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
  assert list(stats) == [()]
  s = stats[()]
  assert s.inputs.shape == (3, 4, 6) and s.cotangents.shape == (3, 4, 2)
  pred = np.asarray(x) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
  np.testing.assert_allclose(s.cotangents, 2 * (pred - np.asarray(target)) / 12, rtol=1e-10)
  assert_stats_match_grads(grads, stats, [()])


def test_dense_general_multi_axis(x64):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)))

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral(features=(2, 3), axis=(-2, -1), name="proj")(x)  # (2, 3, 2, 3)
      return nn.DenseGeneral(features=4, axis=(-2, -1), name="merge")(h).sum(1)

  model = Model()
  params = init_f64(model, x, seed=0)

  def loss_fn(p):
    return jnp.mean(model.apply({"params": p}, x) ** 2)

  _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
  proj, merge = stats[("proj",)], stats[("merge",)]
  assert proj.inputs.shape == (2, 3, 20) and proj.cotangents.shape == (2, 3, 6)
  assert proj.kernel_input_ndim == 2 and merge.kernel_input_ndim == 2
  np.testing.assert_allclose(proj.inputs, np.asarray(x).reshape(2, 3, 20))
  assert_stats_match_grads(grads, stats)


@pytest.mark.parametrize(
  "case",
  [
    dict(kernel_size=(3, 3), strides=(1, 1), padding="SAME"),
    dict(kernel_size=(3, 2), strides=(2, 1), padding="VALID"),
    dict(kernel_size=(3, 3), strides=(2, 2), padding=((1, 0), (2, 1))),
    dict(kernel_size=(2, 2), strides=(1, 1), padding=1, kernel_dilation=(2, 1)),
    dict(kernel_size=(3,), strides=(2,), padding="SAME"),
    dict(kernel_size=(2, 2, 2), strides=(1, 2, 1), padding="VALID"),
  ],
)
def test_conv_im2col_matches_explicit_patches(x64, case):
  rank = len(case["kernel_size"])
  spatial = (7, 6, 5)[:rank]
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2,) + spatial + (3,))
  conv = nn.Conv(4, **case)
  params = init_f64(conv, jnp.asarray(x), seed=0)

  def loss_fn(p):
    return jnp.mean(jnp.sin(conv.apply({"params": p}, jnp.asarray(x))))

  _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
  s = stats[()]
  padding = case["padding"]
  dilation = case.get("kernel_dilation", (1,) * rank)
  if padding == "SAME":
    pads = same_padding(spatial, case["kernel_size"], case["strides"], dilation)
  elif padding == "VALID":
    pads = [(0, 0)] * rank
  elif isinstance(padding, int):
    pads = [(padding, padding)] * rank
  else:
    pads = list(padding)
  patches = im2col(x, case["kernel_size"], case["strides"], pads, dilation)
  np.testing.assert_allclose(s.inputs, patches.reshape(2, -1, patches.shape[-1]), rtol=1e-12)
  # forward: patches @ W + b reproduces the layer output
  w = np.asarray(params["kernel"]).reshape(-1, 4)
  out = conv.apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(patches @ w + np.asarray(params["bias"]), out, rtol=1e-10, atol=1e-12)
  assert_stats_match_grads(grads, stats, [()])


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT", "CAUSAL"])
def test_conv_special_paddings_reproduce_gradient(x64, padding):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 9, 3)))
  conv = nn.Conv(2, (3,), padding=padding, kernel_dilation=2)
  params = init_f64(conv, x, seed=0)
  _, grads, stats = nox.value_grad_and_stats(lambda p: jnp.mean(jnp.tanh(conv.apply({"params": p}, x)) ** 2))(params)
  s = stats[()]
  out = conv.apply({"params": params}, x)
  np.testing.assert_allclose(
    np.asarray(s.inputs) @ np.asarray(params["kernel"]).reshape(-1, 2) + np.asarray(params["bias"]),
    np.asarray(out).reshape(2, -1, 2),
    rtol=1e-10,
    atol=1e-12,
  )
  assert_stats_match_grads(grads, stats, [()])


def test_nested_submodules_and_weight_sharing(x64):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.relu(nn.Dense(4, name="inner")(x))

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      shared = nn.Dense(4, name="shared")
      h = Block(name="block")(x)
      h = shared(h)
      h = shared(jnp.tanh(h))  # applied twice
      return nn.Dense(2, name="head")(h)

  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(5, 4)))
  y = jnp.asarray(rng.integers(0, 2, size=5))
  model = Model()
  params = init_f64(model, x, seed=0)
  _, grads, stats = jax.jit(nox.value_grad_and_stats(_xent(model, x, y)))(params)
  assert set(stats) == {("block", "inner"), ("shared",), ("head",)}
  assert stats[("shared",)].inputs.shape == (5, 2, 4)  # rows from both applications
  assert_stats_match_grads(grads, stats)


def test_full_fisher_cotangents_of_a_linear_softmax_model(x64):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(4, 3)))
  y = jnp.asarray(rng.integers(0, 5, size=4))
  model = nn.Dense(5)
  params = init_f64(model, x, seed=0)
  _, _, stats = nox.value_grad_and_stats(_xent(model, x, y), fisher="full", likelihood="categorical")(params)
  s = stats[()]
  logits = np.asarray(x) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = np.stack([np.sqrt(p[:, c : c + 1]) * (p - np.eye(5)[c]) for c in range(5)])
  np.testing.assert_allclose(s.fisher_cotangents[:, :, 0], expected, rtol=1e-10, atol=1e-14)
  # Σ_c over sets equals the exact expectation E_y[g gᵀ] per example
  g = np.asarray(s.fisher_cotangents[:, :, 0])
  exact = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])  # E_y[g gᵀ] = diag(p) - p pᵀ
  np.testing.assert_allclose(np.einsum("sij,sik->ijk", g, g), exact, rtol=1e-10, atol=1e-14)


def test_full_fisher_gaussian_and_tokens(x64):
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(3, 2, 4)))
  model = nn.Dense(2)
  params = init_f64(model, x, seed=0)
  target = jnp.zeros((3, 2, 2))

  def loss_fn(p):
    return 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, x) - target) ** 2, -1))

  _, _, stats = nox.value_grad_and_stats(loss_fn, fisher="full", likelihood="gaussian")(params)
  g = np.asarray(stats[()].fisher_cotangents)  # (S = 2 positions * 2 outputs, n, P, k)
  assert g.shape == (4, 3, 2, 2)
  # Σ_s g gᵀ over sets, per example and position pair = (1/T²) δ_tt' I  (T = 2 tokens per example)
  second = np.einsum("sitk,siul->itkul", g, g)
  expected = np.einsum("tu,kl->tkul", np.eye(2), np.eye(2)) / 4
  np.testing.assert_allclose(second, np.broadcast_to(expected, second.shape), atol=1e-14)


def test_mc_fisher_is_reproducible_and_unbiased(x64):
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(2, 3)))
  y = jnp.asarray([0, 1])
  model = nn.Dense(3)
  params = init_f64(model, x, seed=0)
  vgs = jax.jit(nox.value_grad_and_stats(_xent(model, x, y), fisher="mc", likelihood="categorical"))
  a = vgs(params, rng=jax.random.key(11))[2][()].fisher_cotangents
  b = vgs(params, rng=jax.random.key(11))[2][()].fisher_cotangents
  np.testing.assert_array_equal(a, b)
  full = nox.value_grad_and_stats(_xent(model, x, y), fisher="full", likelihood="categorical")(params)[2][()]
  exact = np.einsum("sipk,sipl->ikl", full.fisher_cotangents, full.fisher_cotangents)
  keys = jax.random.split(jax.random.key(5), 4000)
  samples = jax.vmap(lambda k: vgs(params, rng=k)[2][()].fisher_cotangents[0, :, 0])(keys)
  estimate = np.einsum("mik,mil->ikl", samples, samples) / len(keys)
  # entries of g gᵀ are bounded by 2 in magnitude: 4000 samples give a standard error below 0.03.
  np.testing.assert_allclose(estimate, exact, atol=0.1)
  assert np.abs(estimate - exact).max() > 0  # genuinely sampled


def test_errors():
  model = nn.Dense(2)
  x = jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x))
  with pytest.raises(ValueError, match="fisher must be one of"):
    nox.value_grad_and_stats(loss_fn, fisher="exact")
  with pytest.raises(ValueError, match="likelihood="):
    nox.value_grad_and_stats(loss_fn, fisher="mc")
  with pytest.raises(ValueError, match="rng="):
    nox.value_grad_and_stats(loss_fn, fisher="mc", likelihood="categorical")(params)
  with pytest.raises(ValueError, match="found no nn.Dense"):
    nox.value_grad_and_stats(lambda p: jnp.sum(p["kernel"]))(params)
  with pytest.raises(NotImplementedError, match="grouped"):
    conv = nn.Conv(4, (3, 3), feature_group_count=2)
    cp = conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 4)))["params"]
    nox.value_grad_and_stats(lambda p: jnp.mean(conv.apply({"params": p}, jnp.ones((1, 5, 5, 4)))))(cp)


def test_jax_internals_that_moved_give_one_clear_error(monkeypatch):
  """Layers inside transforms need JAX's trace internals; where they moved, one error names the JAX version,
  and layers outside transforms (which need none of them) still work."""
  from neuron_optax._src import capture_trace

  def moved():
    raise AttributeError("module 'jax._src.core' has no attribute 'trace_ctx'")

  monkeypatch.setattr(capture_trace, "_read_current_trace", moved)
  x = jnp.ones((2, 3))

  model = nn.Dense(2)
  params = model.init(jax.random.key(0), x)["params"]
  _, _, stats = nox.value_grad_and_stats(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))(params)
  assert list(stats) == [()]

  remat = nn.remat(nn.Dense)(2)
  params = remat.init(jax.random.key(0), x)["params"]
  with pytest.raises(capture_trace.TraceInspectionError, match=rf"JAX {jax.__version__}.*trace_ctx"):
    nox.value_grad_and_stats(lambda p: jnp.mean(remat.apply({"params": p}, x) ** 2))(params)
