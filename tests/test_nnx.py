"""Flax NNX capture and transforms: against linen, float64 NumPy references, and training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_stats_match_grads
from flax import nnx
from numpy_reference import augment, im2col, same_padding

import neuron_optax as nox
from neuron_optax._src import nnx as nox_nnx
from neuron_optax._src import nnx_recording
from neuron_optax._src import param_layout as _params

F64 = jnp.float64


def _xent(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _jitted(loss_fn, **kwargs):
  """``nox_nnx.value_grad_and_stats`` under ``nnx.jit`` (one compilation instead of many eager ops)."""
  return nnx.jit(nox_nnx.value_grad_and_stats(loss_fn, **kwargs))


def _node(tree, key):
  node = nnx.as_pure(tree) if isinstance(tree, nnx.State) else tree
  for k in key:
    node = node[k]
  return node


class NnxMLP(nnx.Module):
  def __init__(self, rngs, d_in=4, hidden=5, classes=3, dtype=F64):
    self.layers = nnx.List(
      [
        nnx.Linear(d_in, hidden, param_dtype=dtype, rngs=rngs),
        nnx.Linear(hidden, classes, use_bias=False, param_dtype=dtype, rngs=rngs),
      ]
    )

  def __call__(self, x):
    return self.layers[1](jnp.tanh(self.layers[0](x)))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, use_bias=False, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(x)))


_LINEN_KEY = {("layers", 0): ("hidden",), ("layers", 1): ("out",)}


def _linen_params(model: NnxMLP):
  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  return {"hidden": dict(pure["layers"][0]), "out": dict(pure["layers"][1])}


def _data(seed, n=7, d=4, classes=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.integers(0, classes, size=n))


# --------------------------------------------------------------------------- #
# Capture
# --------------------------------------------------------------------------- #


def test_mlp_stats_match_numpy_and_linen(x64):
  x, y = _data(0)
  model = NnxMLP(nnx.Rngs(0))
  loss, grads, stats = nnx.jit(nox_nnx.value_grad_and_stats(_xent))(model, x, y)

  params = _linen_params(model)
  w1, b1, w2 = (
    np.asarray(params["hidden"]["kernel"]),
    np.asarray(params["hidden"]["bias"]),
    np.asarray(params["out"]["kernel"]),
  )
  h = np.tanh(np.asarray(x) @ w1 + b1)
  logits = h @ w2
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  cot_out = (p - np.eye(3)[np.asarray(y)]) / 7
  cot_hidden = (cot_out @ w2.T) * (1 - h**2)
  assert list(stats) == [("layers", 0), ("layers", 1)]
  np.testing.assert_allclose(loss, -np.log(p[np.arange(7), np.asarray(y)]).mean(), rtol=1e-12)
  np.testing.assert_allclose(stats[("layers", 0)].inputs[:, 0], np.asarray(x), rtol=1e-12)
  np.testing.assert_allclose(stats[("layers", 1)].inputs[:, 0], h, rtol=1e-12)
  np.testing.assert_allclose(stats[("layers", 1)].cotangents[:, 0], cot_out, rtol=1e-10)
  np.testing.assert_allclose(stats[("layers", 0)].cotangents[:, 0], cot_hidden, rtol=1e-10, atol=1e-14)
  assert stats[("layers", 0)].has_bias and not stats[("layers", 1)].has_bias
  assert_stats_match_grads(grads, stats, atol=1e-13)

  # grads: exactly what nnx.value_and_grad gives (a State of nnx.Param).
  ref_loss, ref_grads = nnx.value_and_grad(_xent)(model, x, y)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  assert isinstance(grads, nnx.State) and isinstance(grads["layers"][0]["kernel"], nnx.Param)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, ref_grads)

  # the equivalent linen model records the same rows and cotangents
  linen = LinenMLP()
  _, linen_grads, linen_stats = nox.value_grad_and_stats(
    lambda p: optax.softmax_cross_entropy_with_integer_labels(linen.apply({"params": p}, x), y).mean()
  )(params)
  for key, linen_key in _LINEN_KEY.items():
    for field in ("inputs", "cotangents"):
      np.testing.assert_allclose(
        getattr(stats[key], field), getattr(linen_stats[linen_key], field), rtol=1e-12, atol=1e-15
      )
    assert stats[key].kernel_shape == linen_stats[linen_key].kernel_shape
    assert stats[key].kernel_input_ndim == linen_stats[linen_key].kernel_input_ndim
  # the user's model object is left as it was
  assert type(model.layers[0]) is nnx.Linear and type(model) is NnxMLP


@pytest.mark.parametrize("fisher", ["mc", "full"])
def test_fisher_cotangents_match_linen(x64, fisher):
  x, y = _data(1)
  model = NnxMLP(nnx.Rngs(1))
  kw = {"rng": jax.random.key(4)} if fisher == "mc" else {}
  loss, grads, stats = _jitted(_xent, fisher=fisher, likelihood="categorical")(model, x, y, **kw)
  linen = LinenMLP()
  linen_loss, linen_grads, linen_stats = nox.value_grad_and_stats(
    lambda p: optax.softmax_cross_entropy_with_integer_labels(linen.apply({"params": p}, x), y).mean(),
    fisher=fisher,
    likelihood="categorical",
  )(_linen_params(model), **kw)
  np.testing.assert_allclose(loss, linen_loss, rtol=1e-12)
  for key, linen_key in _LINEN_KEY.items():
    s, ref = stats[key], linen_stats[linen_key]
    assert s.fisher_cotangents.shape == ref.fisher_cotangents.shape
    np.testing.assert_allclose(s.fisher_cotangents, ref.fisher_cotangents, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(s.cotangents, ref.cotangents, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(_node(grads, key)["kernel"], linen_grads[linen_key[0]]["kernel"], rtol=1e-10)
  if fisher == "full":
    # Σ_sets g gᵀ is the exact Fisher: for the logits layer, n · Σ_i (diag p_i − p_i p_iᵀ) per row
    logits = np.asarray(model(x))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = np.asarray(stats[("layers", 1)].fisher_cotangents)[:, :, 0]  # (S, n, d_out)
    for i in range(7):
      np.testing.assert_allclose(g[:, i].T @ g[:, i], np.diag(p[i]) - np.outer(p[i], p[i]), rtol=1e-10, atol=1e-14)


def test_top_level_linear_with_tokens_and_jax_jit(x64):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 4, 6)))
  target = jnp.asarray(rng.normal(size=(3, 4, 2)))
  model = nnx.Linear(6, 2, param_dtype=F64, rngs=nnx.Rngs(0))

  def loss_fn(m, x):
    return jnp.mean(jnp.sum((m(x) - target) ** 2, -1))

  # jax.jit with the module as a pytree argument
  _, grads, stats = jax.jit(nox_nnx.value_grad_and_stats(loss_fn))(model, x)
  assert list(stats) == [()]
  s = stats[()]
  assert s.inputs.shape == (3, 4, 6) and s.cotangents.shape == (3, 4, 2)
  pred = np.asarray(x) @ np.asarray(model.kernel[...]) + np.asarray(model.bias[...])
  np.testing.assert_allclose(s.cotangents, 2 * (pred - np.asarray(target)) / 12, rtol=1e-10)
  assert_stats_match_grads(grads, stats, [()], atol=1e-13)
  # full Gaussian Fisher on a top-level layer: per-example cotangents are the unit vectors / T
  _, _, fstats = _jitted(lambda m, x: loss_fn(m, x), fisher="full", likelihood="gaussian")(model, x)
  g = np.asarray(fstats[()].fisher_cotangents)  # (T*k, n, T, k)
  np.testing.assert_allclose(
    np.einsum("snta,snub->ntaub", g, g),
    np.broadcast_to(np.eye(8).reshape(4, 2, 4, 2) / 16, (3, 4, 2, 4, 2)),
    rtol=1e-12,
    atol=1e-15,
  )


def test_tree_mode_matches_graph_mode(x64):
  x, y = _data(3)
  model = NnxMLP(nnx.Rngs(3))
  _, grads, stats = _jitted(_xent)(model, x, y)
  with nnx.set_graph_mode(False):
    _, tree_grads, tree_stats = _jitted(_xent)(model, x, y)
  assert list(tree_stats) == list(stats)
  for key in stats:
    np.testing.assert_allclose(tree_stats[key].cotangents, stats[key].cotangents, rtol=1e-12)
    np.testing.assert_allclose(tree_stats[key].inputs, stats[key].inputs, rtol=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), nnx.as_pure(tree_grads), nnx.as_pure(grads))


def test_shared_layer_applied_twice_pools_rows(x64):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.inner = nnx.Linear(3, 3, param_dtype=F64, rngs=rngs)
      self.alias = self.inner  # one layer, two attribute paths
      self.head = nnx.Linear(3, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
      return self.head(self.alias(jnp.tanh(self.inner(x))))

  x = jnp.asarray(np.random.default_rng(14).normal(size=(4, 3)))
  model = Model(nnx.Rngs(0))
  _, grads, stats = _jitted(lambda m, x: jnp.mean(m(x) ** 2))(model, x)
  # NNX lists a shared module once, at its first path in sorted attribute order ('alias'); the
  # stats use the path the gradient State uses.
  assert set(stats) == {("alias",), ("head",)} and "inner" not in grads
  inner = stats[("alias",)]
  assert inner.inputs.shape == (4, 2, 3) and inner.cotangents.shape == (4, 2, 3)
  np.testing.assert_allclose(inner.inputs[:, 0], x, rtol=1e-12)
  h = np.tanh(np.asarray(x) @ np.asarray(model.inner.kernel[...]) + np.asarray(model.inner.bias[...]))
  np.testing.assert_allclose(inner.inputs[:, 1], h, rtol=1e-12)
  assert_stats_match_grads(grads, stats, atol=1e-13)


def _conv_reference_patches(x, kernel_size, strides, padding, dilation):
  """im2col after the padding ``nnx.Conv`` documents, written out with np.pad."""
  rank = len(kernel_size)
  spatial = x.shape[1:-1]
  if padding == "SAME":
    return im2col(x, kernel_size, strides, same_padding(spatial, kernel_size, strides, dilation), dilation)
  if padding == "VALID":
    return im2col(x, kernel_size, strides, [(0, 0)] * rank, dilation)
  if padding == "CIRCULAR":
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    return im2col(np.pad(x, pads, mode="wrap"), kernel_size, strides, [(0, 0)] * rank, dilation)
  if padding == "CAUSAL":
    return im2col(x, kernel_size, strides, [(dilation[0] * (kernel_size[0] - 1), 0)], dilation)
  if isinstance(padding, int):
    return im2col(x, kernel_size, strides, [(padding, padding)] * rank, dilation)
  return im2col(x, kernel_size, strides, list(padding), dilation)


@pytest.mark.parametrize(
  "case",
  [
    dict(kernel_size=(3, 3), strides=(2, 2), padding="SAME"),
    dict(kernel_size=(3, 2), strides=(2, 1), padding="VALID"),
    dict(kernel_size=(2, 2), strides=(1, 1), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1)),
    dict(kernel_size=(3, 3), strides=(1, 1), padding="CIRCULAR"),
    dict(kernel_size=(3,), strides=(1,), padding="CAUSAL", kernel_dilation=(2,)),
  ],
)
def test_conv_im2col_matches_explicit_patches(x64, case):
  rank = len(case["kernel_size"])
  spatial = (7, 6)[:rank]
  x = np.random.default_rng(4).normal(size=(2,) + spatial + (3,))
  conv = nnx.Conv(3, 4, param_dtype=F64, rngs=nnx.Rngs(0), **case)

  def loss_fn(m, x):
    return jnp.mean(jnp.sin(m(x)))

  _, grads, stats = _jitted(loss_fn)(conv, jnp.asarray(x))
  s = stats[()]
  assert s.kind == "conv" and s.kernel_input_ndim == rank + 1
  dilation = case.get("kernel_dilation", (1,) * rank)
  patches = _conv_reference_patches(x, case["kernel_size"], case["strides"], case["padding"], dilation)
  np.testing.assert_allclose(s.inputs, patches.reshape(2, -1, patches.shape[-1]), rtol=1e-12)
  out = np.asarray(conv(jnp.asarray(x)))
  w = np.asarray(conv.kernel[...]).reshape(-1, 4)
  np.testing.assert_allclose(patches @ w + np.asarray(conv.bias[...]), out, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(s.cotangents, (np.cos(out) / out.size).reshape(2, -1, 4), rtol=1e-10)
  assert_stats_match_grads(grads, stats, [()], atol=1e-13)


def test_linear_general_multi_axis(x64):
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 4, 5)))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.LinearGeneral((4, 5), (2, 3), axis=(-2, -1), param_dtype=F64, rngs=rngs)
      self.merge = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), param_dtype=F64, rngs=rngs)
      self.middle = nnx.LinearGeneral(3, 2, axis=1, use_bias=False, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
      h = self.merge(self.proj(x))  # (2, 3, 4)
      return self.middle(h)  # contracts axis 1 -> (2, 4, 2)

  model = Model(nnx.Rngs(0))

  def loss_fn(m, x):
    return jnp.mean(m(x) ** 2)

  _, grads, stats = _jitted(loss_fn)(model, x)
  proj, merge, middle = stats[("proj",)], stats[("merge",)], stats[("middle",)]
  assert proj.inputs.shape == (2, 3, 20) and proj.cotangents.shape == (2, 3, 6)
  assert (proj.kernel_input_ndim, merge.kernel_input_ndim, middle.kernel_input_ndim) == (2, 2, 1)
  np.testing.assert_allclose(proj.inputs, np.asarray(x).reshape(2, 3, 20))
  h = np.asarray(model.merge(model.proj(x)))
  np.testing.assert_allclose(middle.inputs, np.transpose(h, (0, 2, 1)), rtol=1e-12)  # rows: (n, 4, 3)
  out = np.einsum("nkp,ko->npo", h, np.asarray(model.middle.kernel[...]))
  np.testing.assert_allclose(middle.cotangents, 2 * out / out.size, rtol=1e-10)
  assert_stats_match_grads(grads, stats, atol=1e-13)
  assert nox_nnx.kernel_layouts(model) == {"proj": 2, "merge": 2, "middle": 1}


def test_kernel_input_ndim_from_the_model_for_multi_axis_outputs(x64):
  x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 5)))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.split = nnx.LinearGeneral(5, (2, 3), param_dtype=F64, rngs=rngs)  # kernel (5, 2, 3)

    def __call__(self, x):
      return self.split(x).sum(-1)

  model = Model(nnx.Rngs(0))
  _, grads, stats = _jitted(lambda m, x: jnp.mean(m(x) ** 2))(model, x)
  assert stats[("split",)].kernel_input_ndim == 1
  params = nnx.state(model, nnx.Param)
  with pytest.raises(ValueError, match=r"kernel_input_ndim=\{'split': 1\}"):
    tx = nox.foof(1.0)
    tx.update(grads, tx.init(params), params, stats=stats)
  tx = nox.foof(1.0, kernel_input_ndim=nox_nnx.kernel_layouts(model))
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  a = augment(np.asarray(x))
  g = np.concatenate(
    [np.asarray(grads["split"]["kernel"][...]).reshape(5, 6), np.asarray(grads["split"]["bias"][...]).reshape(1, 6)]
  )
  expected = np.linalg.solve(a.T @ a / 4 + np.eye(6), g)
  np.testing.assert_allclose(np.asarray(updates["split"]["kernel"][...]).reshape(5, 6), expected[:5], rtol=1e-9)
  np.testing.assert_allclose(np.asarray(updates["split"]["bias"][...]).reshape(6), expected[5], rtol=1e-9)


def test_einsum_plain_contractions_are_captured(x64):
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 3, 4)))

  class Model(nnx.Module):
    def __init__(self, rngs):
      # output axes permuted: canonical rows are (b, t), the cotangent is read as (b, t, k)
      self.permuted = nnx.Einsum("btd,dk->bkt", (4, 5), (5,), param_dtype=F64, rngs=rngs)
      self.ellipsis = nnx.Einsum("...d,dhk->...hk", (5, 2, 3), (2, 3), param_dtype=F64, rngs=rngs)

    def __call__(self, x):
      h = jnp.tanh(self.permuted(x))  # (2, 5, 3)
      return self.ellipsis(jnp.swapaxes(h, 1, 2))  # (2, 3, 2, 3)

  model = Model(nnx.Rngs(0))

  def loss_fn(m, x):
    return jnp.mean(jnp.sin(m(x)))

  _, grads, stats = _jitted(loss_fn)(model, x)
  permuted, ellipsis = stats[("permuted",)], stats[("ellipsis",)]
  assert permuted.inputs.shape == (2, 3, 4) and permuted.cotangents.shape == (2, 3, 5)
  assert ellipsis.inputs.shape == (2, 3, 5) and ellipsis.cotangents.shape == (2, 3, 6)
  assert ellipsis.kernel_input_ndim == 1
  # numpy forward and backward
  w1, b1 = np.asarray(model.permuted.kernel[...]), np.asarray(model.permuted.bias[...])
  w2, b2 = np.asarray(model.ellipsis.kernel[...]), np.asarray(model.ellipsis.bias[...])
  z1 = np.einsum("btd,dk->bkt", np.asarray(x), w1) + b1[None, :, None]
  h = np.swapaxes(np.tanh(z1), 1, 2)  # (b, t, k)
  z2 = np.einsum("btd,dhk->bthk", h, w2) + b2
  cot2 = np.cos(z2) / z2.size
  cot1 = np.einsum("bthk,dhk->btd", cot2, w2) * (1 - h**2)  # (b, t, k): canonical layout
  np.testing.assert_allclose(permuted.inputs, np.asarray(x), rtol=1e-12)
  np.testing.assert_allclose(ellipsis.inputs, h, rtol=1e-12)
  np.testing.assert_allclose(ellipsis.cotangents, cot2.reshape(2, 3, 6), rtol=1e-10)
  np.testing.assert_allclose(permuted.cotangents, cot1, rtol=1e-10, atol=1e-15)
  assert_stats_match_grads(grads, stats, atol=1e-13)
  assert nox_nnx.kernel_layouts(model) == {"permuted": 1, "ellipsis": 1}


@pytest.mark.parametrize(
  "equation,reason",
  [
    ("nta,hab->nthb", "contracted axes do not all come before"),
    ("btd,bdk->btk", "one kernel per index"),
    ("bd,dk->b", "summed over"),
    ("bd,...->b...", "kernel has an ellipsis"),
    ("bd,dd->bd", "repeats"),
    ("db,dk->bk", "first (example) axis is contracted"),
    ("btd,dhk->btkh", "not in the kernel's order"),
  ],
)
def test_einsum_layouts_that_are_not_one_matrix(equation, reason):
  from neuron_optax._src.layer_rows import einsum_layout as _einsum_layout

  lhs, rhs = equation.split("->")[0].split(",")
  layout = _einsum_layout(equation, len(lhs) if "..." not in lhs else 3, len(rhs) if "..." not in rhs else 2)
  assert isinstance(layout, str) and reason in layout


def test_uncaptured_einsum_warns_and_passes_through(x64):
  x = jnp.asarray(np.random.default_rng(8).normal(size=(3, 4, 2)))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.heads = nnx.Einsum("nta,hab->nthb", (2, 2, 3), (2, 3), param_dtype=F64, rngs=rngs)
      self.head = nnx.Linear(6, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
      return self.head(self.heads(x).reshape(3, 4, 6))

  model = Model(nnx.Rngs(0))
  loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
  with pytest.warns(UserWarning, match=r"'heads' \(nnx.Einsum 'nta,hab->nthb'\) is not captured"):
    _, grads, stats = _jitted(loss_fn)(model, x)
  assert list(stats) == [("head",)]
  params = nnx.state(model, nnx.Param)
  tx = nox.foof(1.0)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  np.testing.assert_array_equal(updates["heads"]["kernel"][...], grads["heads"]["kernel"][...])
  assert not np.allclose(updates["head"]["kernel"][...], grads["head"]["kernel"][...])


def _comparable(state):
  def leaf(v):
    return jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v

  return jax.tree.map(leaf, nnx.as_pure(state))


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # float32 BatchStat
def test_state_updates_propagate_like_nnx_value_and_grad(x64):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 6, param_dtype=F64, rngs=rngs)
      self.norm = nnx.BatchNorm(6, dtype=F64, param_dtype=F64, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.out = nnx.Linear(6, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
      return self.out(self.drop(nnx.relu(self.norm(self.linear(x)))))

  x, y = _data(9, n=8)
  model = Model(nnx.Rngs(0, dropout=1))
  reference = nnx.clone(model)
  for _ in range(2):  # two steps: the second sees the first's batch statistics and RNG count
    loss, grads, stats = _jitted(_xent)(model, x, y)
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(_xent))(reference, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), nnx.as_pure(grads), nnx.as_pure(ref_grads)
    )
    jax.tree.map(
      np.testing.assert_array_equal,
      _comparable(nnx.state(model, nnx.Not(nnx.Param))),
      _comparable(nnx.state(reference, nnx.Not(nnx.Param))),
    )
  assert int(model.drop.rngs.count[...]) == 2
  assert set(stats) == {("linear",), ("out",)}
  assert_stats_match_grads(grads, stats, atol=1e-13)


class DropoutMLP(nnx.Module):
  """Dropout that takes its ``nnx.Rngs`` at call time, as Flax's NNX MNIST example does."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 6, param_dtype=F64, rngs=rngs)
    self.drop = nnx.Dropout(0.5)
    self.out = nnx.Linear(6, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x, rngs):
    return self.out(self.drop(nnx.relu(self.linear(x)), rngs=rngs))


def _loss_with_nnx_args(model, x, y, rngs, head):
  # rngs as Flax's NNX MNIST example passes it; head: a second module with parameters and batch stats
  return optax.softmax_cross_entropy_with_integer_labels(head(model(x, rngs)), y).mean()


def _loss_with_nested_nnx_args(model, batch, head):
  return _loss_with_nnx_args(model, batch["x"], batch["y"], batch["rngs"], head)


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # float32 BatchStat
def test_other_nnx_arguments_like_nnx_value_and_grad(x64):
  x, y = _data(17, n=8)

  def make():
    head = nnx.BatchNorm(3, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(1))
    return DropoutMLP(nnx.Rngs(0)), nnx.Rngs(dropout=5), head

  def check(loss, grads, ref_loss, ref_grads):
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), nnx.as_pure(grads), nnx.as_pure(ref_grads)
    )

  ours, ref = make(), make()
  for _ in range(2):  # positionally, under nnx.jit; the second step sees the first's RNG count and batch stats
    loss, grads, stats = _jitted(_loss_with_nnx_args)(ours[0], x, y, ours[1], ours[2])
    check(loss, grads, *nnx.jit(nnx.value_and_grad(_loss_with_nnx_args))(ref[0], x, y, ref[1], ref[2]))
    jax.tree.map(np.testing.assert_array_equal, _comparable(nnx.state(ours)), _comparable(nnx.state(ref)))
  assert int(ours[1].dropout.count[...]) == 2
  assert set(stats) == {("linear",), ("out",)}  # the second module is not the model: not captured
  assert_stats_match_grads(grads, stats, atol=1e-13)
  # eagerly, with the Rngs inside a pytree and the second module passed by keyword
  model, rngs, head = ours
  loss, grads, stats = nox_nnx.value_grad_and_stats(_loss_with_nested_nnx_args)(
    model, {"x": x, "y": y, "rngs": rngs}, head=head
  )
  check(
    loss, grads, *nnx.value_and_grad(_loss_with_nested_nnx_args)(ref[0], {"x": x, "y": y, "rngs": ref[1]}, head=ref[2])
  )
  jax.tree.map(np.testing.assert_array_equal, _comparable(nnx.state(ours)), _comparable(nnx.state(ref)))
  assert int(rngs.dropout.count[...]) == 3
  assert_stats_match_grads(grads, stats, atol=1e-13)


def test_params_helpers_accept_nnx_state(x64):
  model = NnxMLP(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  pure = nnx.as_pure(state)
  expected = {
    ("layers", 0): _params.LayerShape(5, 5, True, (4, 5), 1),
    ("layers", 1): _params.LayerShape(5, 3, False, (5, 3), 1),
  }
  for tree in (state, pure, nnx.to_pure_dict(state)):
    assert _params.candidate_layers(tree) == expected

  def double(key, matrix):
    return 2 * matrix

  for tree in (state, pure):
    out = _params.map_layers(tree, expected, [("layers", 0)], double)
    assert type(out) is nnx.State and jax.tree.structure(out) == jax.tree.structure(tree)
    np.testing.assert_array_equal(_node(out, ("layers", 0))["kernel"], 2 * _node(tree, ("layers", 0))["kernel"])
    np.testing.assert_array_equal(_node(out, ("layers", 1))["kernel"], _node(tree, ("layers", 1))["kernel"])
  assert isinstance(_params.map_layers(state, expected, [("layers", 0)], double)["layers"][0]["bias"], nnx.Param)
  # a plain dict of nnx.Param leaves keeps its wrappers
  wrapped = {"dense": {"kernel": nnx.Param(jnp.ones((2, 3))), "bias": nnx.Param(jnp.ones(3))}}
  layers = _params.candidate_layers(wrapped)
  out = _params.map_layers(wrapped, layers, [("dense",)], double)
  assert isinstance(out["dense"]["kernel"], nnx.Param)
  np.testing.assert_array_equal(out["dense"]["bias"][...], 2 * np.ones(3))
  with pytest.raises(TypeError, match="nnx.State"):
    _params.candidate_layers([jnp.ones((2, 2))])


# --------------------------------------------------------------------------- #
# Transforms with NNX
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("contraction", ["rows", "gradient"])
def test_foof_with_nnx_equals_foof_with_linen(x64, contraction):
  model = NnxMLP(nnx.Rngs(2))
  linen = LinenMLP()
  params_linen = _linen_params(model)
  params_nnx = nnx.state(model, nnx.Param)
  damping, decay = 0.3, 0.8
  tx = nox.foof(damping, ema_decay=decay, inverse_every=2, contraction=contraction)
  state_nnx, state_linen = tx.init(params_nnx), tx.init(params_linen)

  @nnx.jit
  def nnx_step(model, state, x, y):
    _, grads, stats = nox_nnx.value_grad_and_stats(_xent)(model, x, y)
    params = nnx.state(model, nnx.Param)
    return tx.update(grads, state, params, stats=stats) + (grads,)

  @jax.jit
  def linen_step(params, state, x, y):
    _, grads, stats = nox.value_grad_and_stats(
      lambda p: optax.softmax_cross_entropy_with_integer_labels(linen.apply({"params": p}, x), y).mean()
    )(params)
    return tx.update(grads, state, params, stats=stats)

  for step in range(3):
    x, y = _data(10 + step)
    updates_nnx, state_nnx, grads = nnx_step(model, state_nnx, x, y)
    updates_linen, state_linen = linen_step(params_linen, state_linen, x, y)
    assert isinstance(updates_nnx, nnx.State) and isinstance(updates_nnx["layers"][0]["kernel"], nnx.Param)
    for key, linen_key in _LINEN_KEY.items():
      for leaf in ("kernel", "bias") if key == ("layers", 0) else ("kernel",):
        np.testing.assert_allclose(
          _node(updates_nnx, key)[leaf], updates_linen[linen_key[0]][leaf], rtol=1e-9, atol=1e-14
        )
    if step == 0:  # independent check: (A + λI)⁻¹ ∇W with the first batch's A
      a = augment(np.asarray(x))
      grad = np.concatenate(
        [np.asarray(_node(grads, ("layers", 0))["kernel"]), np.asarray(_node(grads, ("layers", 0))["bias"])[None]]
      )
      expected = np.linalg.solve(a.T @ a / len(a) + damping * np.eye(5), grad)
      np.testing.assert_allclose(_node(updates_nnx, ("layers", 0))["kernel"], expected[:4], rtol=1e-9)
      np.testing.assert_allclose(_node(updates_nnx, ("layers", 0))["bias"], expected[4], rtol=1e-9)


def test_training_loop_with_nnx_optimizer_reduces_loss():
  rng = np.random.default_rng(11)
  centers = rng.normal(size=(3, 8)) * 2
  labels = rng.integers(0, 3, size=64)
  x = jnp.asarray(centers[labels] + rng.normal(size=(64, 8)), jnp.float32)
  y = jnp.asarray(labels)
  model = NnxMLP(nnx.Rngs(0), d_in=8, hidden=16, classes=3, dtype=jnp.float32)
  optimizer = nnx.Optimizer(model, optax.chain(nox.foof(1.0), optax.sgd(0.1)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, stats = nox_nnx.value_grad_and_stats(_xent)(model, x, y)
    optimizer.update(model, grads, stats=stats)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(25)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(optimizer.opt_state[0].count[...]) == 25
  assert type(model.layers[0]) is nnx.Linear


@pytest.mark.parametrize("transform,fisher", [("kfac", "mc"), ("natural_gradient", "full"), ("fngd", "empirical")])
def test_other_transforms_train_nnx_models(transform, fisher):
  import importlib

  module = importlib.import_module(f"neuron_optax._src.{transform}")
  tx = {
    "kfac": lambda: module.kfac(1.0),
    "natural_gradient": lambda: module.natural_gradient(1.0),
    "fngd": lambda: module.fngd(0.1, steps_per_epoch=1, batch_size=32),
  }[transform]()
  rng = np.random.default_rng(15)
  labels = rng.integers(0, 3, size=32)
  x = jnp.asarray(rng.normal(size=(3, 8))[labels] * 2 + rng.normal(size=(32, 8)), jnp.float32)
  y = jnp.asarray(labels)
  model = NnxMLP(nnx.Rngs(0), d_in=8, hidden=8, classes=3, dtype=jnp.float32)
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(0.1)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y, key):
    kw = {"rng": key} if fisher == "mc" else {}
    loss, grads, stats = nox_nnx.value_grad_and_stats(_xent, fisher=fisher, likelihood="categorical")(model, x, y, **kw)
    optimizer.update(model, grads, stats=stats)
    return loss

  losses = [float(train_step(model, optimizer, x, y, jax.random.key(i))) for i in range(8)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


class AttentionBlock(nnx.Module):
  def __init__(self, rngs, dtype=F64):
    self.attention = nnx.MultiHeadAttention(
      num_heads=2, in_features=4, qkv_features=4, decode=False, param_dtype=dtype, rngs=rngs
    )
    self.head = nnx.Linear(4, 3, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.head((x + self.attention(x)).mean(1))


def test_multi_head_attention_is_captured_and_trains_with_foof(x64):
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(6, 5, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=6))
  model = AttentionBlock(nnx.Rngs(0))
  _, grads, stats = _jitted(_xent)(model, x, y)
  projections = [("attention", name) for name in ("query", "key", "value", "out")]
  assert set(stats) == set(projections) | {("head",)}
  for key in projections:
    s = stats[key]
    assert s.inputs.shape == (6, 5, 4) and s.cotangents.shape == (6, 5, 4)
    assert s.kernel_input_ndim == (2 if key[-1] == "out" else 1)
    assert_stats_match_grads(grads, stats, [key], atol=1e-13)
  np.testing.assert_allclose(stats[("attention", "query")].inputs, x, rtol=1e-12)

  # the default kernel layout of the transforms fits nnx attention: no kernel_input_ndim needed
  optimizer = nnx.Optimizer(model, optax.chain(nox.foof(1.0), optax.sgd(0.2)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, stats = nox_nnx.value_grad_and_stats(_xent)(model, x, y)
    optimizer.update(model, grads, stats=stats)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(15)]
  assert losses[-1] < 0.6 * losses[0], losses


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_errors_are_clear():
  x, y = _data(13)
  model = NnxMLP(nnx.Rngs(0), dtype=jnp.float32)
  with pytest.raises(ValueError, match="fisher must be one of"):
    nox_nnx.value_grad_and_stats(_xent, fisher="exact")
  with pytest.raises(ValueError, match="likelihood="):
    nox_nnx.value_grad_and_stats(_xent, fisher="full")
  with pytest.raises(ValueError, match="rng="):
    nox_nnx.value_grad_and_stats(_xent, fisher="mc", likelihood="categorical")(model, x, y)
  with pytest.raises(ValueError, match="rng= is only used"):
    nox_nnx.value_grad_and_stats(_xent)(model, x, y, rng=jax.random.key(0))
  with pytest.raises(TypeError, match="nnx.Module as its first argument"):
    nox_nnx.value_grad_and_stats(lambda p, x: x.sum())({"kernel": jnp.ones((2, 2))}, x)
  with pytest.raises(ValueError, match="found no nnx.Linear"):
    nox_nnx.value_grad_and_stats(lambda m, x: jnp.sum(x**2))(model, x)
  with pytest.raises(ValueError, match="exactly once"):
    nox_nnx.value_grad_and_stats(
      lambda m, x, y: _xent(m, x, y) + _xent(m, x, y), fisher="full", likelihood="categorical"
    )(model, x, y)

  # abstract modules (nnx.eval_shape): the errors are raised while tracing, before any compute
  batched = nnx.eval_shape(lambda: nnx.LinearGeneral(4, 2, batch_axis={0: 7}, rngs=nnx.Rngs(0)))
  with pytest.raises(NotImplementedError, match="batch_axis"):
    nox_nnx.value_grad_and_stats(lambda m, x: m(x).sum())(batched, x)
  first_axis = nnx.eval_shape(lambda: nnx.LinearGeneral(7, 2, axis=0, rngs=nnx.Rngs(0)))
  with pytest.raises(NotImplementedError, match="contracts axis 0"):
    nox_nnx.value_grad_and_stats(lambda m, x: m(x).sum())(first_axis, x)
  images = jnp.ones((2, 5, 5, 4))
  grouped = nnx.eval_shape(lambda: nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)))
  with pytest.raises(NotImplementedError, match="grouped"):
    nox_nnx.value_grad_and_stats(lambda m, x: m(x).sum())(grouped, images)
  masked = nnx.eval_shape(lambda: nnx.Conv(4, 2, (3, 3), mask=jnp.ones((3, 3, 4, 2)), rngs=nnx.Rngs(0)))
  with pytest.raises(NotImplementedError, match="masked"):
    nox_nnx.value_grad_and_stats(lambda m, x: m(x).sum())(masked, images)

  class PerExample(nnx.Module):  # jax.vmap over examples: one weight serves every example's iteration
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(self.linear, x)

  per_example = nnx.eval_shape(lambda: PerExample(nnx.Rngs(0)))
  with pytest.raises(NotImplementedError, match=r"'linear'.*serve several iterations"):
    nox_nnx.value_grad_and_stats(_xent)(per_example, x, y)
  assert nnx_recording.active_recording() is None  # the interception was undone despite the error
  assert not hasattr(per_example.linear, nox_nnx._KEY_ATTRIBUTE)
  # a transform given stats for a layer its parameters do not have
  _, grads, stats = _jitted(_xent)(model, x, y)
  other = nnx.state(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0), hidden=6, dtype=jnp.float32)), nnx.Param)
  tx = nox.foof(1.0)
  with pytest.raises(ValueError, match=r"layer 'layers/\d'.*tx.init"):
    tx.update(grads, tx.init(other), other, stats=stats)
