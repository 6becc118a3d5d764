"""Stacked layers: layers inside lifted transforms against the unrolled model (float64).

A model whose cells run in ``nn.scan`` over stacked parameters (``variable_axes={'params': 0}``)
and the unrolled model with the same parameters (unstacked) must record the same rows and
cotangents per copy and get the same direction from every method, step after step; ``nn.remat``
changes nothing. ``nn.remat_scan``, ``nn.vmap`` and ``nn.jit`` are checked the same way, and
transforms whose weights serve several iterations (``nn.RNN``, broadcast parameters,
``jax.vmap`` over examples) or other transforms (``nn.cond``) raise a clear error.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_stats_match_grads, init_f64
from flax import nnx

import neuron_optax as nox
from neuron_optax._src import nnx_recording

LENGTH, WIDTH, N = 3, 4, 6


class Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(WIDTH, name="mlp")(carry)), None


class Scanned(nn.Module):
  """``LENGTH`` tanh-Dense cells in ``nn.scan`` (optionally rematerialised), then a head."""

  remat: bool = False

  @nn.compact
  def __call__(self, x):
    cell = nn.remat(Cell) if self.remat else Cell
    scan = nn.scan(cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=LENGTH)
    x, _ = scan(name="cells")(x, None)
    return nn.Dense(2, name="head")(x)


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(LENGTH):
      x, _ = Cell(name=f"cell_{i}")(x, None)
    return nn.Dense(2, name="head")(x)


def _unroll(params):
  """The scanned model's parameters as the unrolled model's."""
  cells = {f"cell_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], params["cells"]) for i in range(LENGTH)}
  return {"head": params["head"], **cells}


def _data():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(N, WIDTH))), jnp.asarray(rng.integers(0, 2, size=N))


def _xent(model, x, y):
  return lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()


def test_scanned_rows_and_cotangents_match_unrolled(x64):
  """Per copy: the recorded inputs, the loss's output cotangents and the full Fisher's."""
  x, y = _data()
  params = init_f64(Scanned(), x)
  assert params["cells"]["mlp"]["kernel"].shape == (LENGTH, WIDTH, WIDTH)
  kw = dict(fisher="full", likelihood="categorical")
  loss_fn = _xent(Scanned(), x, y)

  @jax.jit
  def run(params):
    return nox.value_grad_and_stats(loss_fn, **kw)(params), jax.value_and_grad(loss_fn)(params)

  (loss, grads, stats), (plain_loss, plain_grads) = run(params)
  _, unrolled_grads, unrolled = jax.jit(nox.value_grad_and_stats(_xent(Unrolled(), x, y), **kw))(_unroll(params))
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads, plain_grads)
  assert set(stats) == {("cells", "mlp"), ("head",)}
  stacked = stats[("cells", "mlp")]
  assert stacked.stack_shape == (LENGTH,) and stacked.kernel_shape == (WIDTH, WIDTH)
  assert stacked.layer_inputs.shape == (LENGTH, N, 1, WIDTH) and stacked.cotangents.shape == (LENGTH, N, 1, WIDTH)
  for i in range(LENGTH):
    copy, reference = stacked.copy((i,)), unrolled[(f"cell_{i}", "mlp")]
    np.testing.assert_allclose(copy.inputs, reference.inputs, rtol=1e-12)
    np.testing.assert_allclose(copy.cotangents, reference.cotangents, rtol=1e-10, atol=1e-16)
    assert copy.fisher_cotangents.shape == reference.fisher_cotangents.shape == (2, N, 1, WIDTH)
    np.testing.assert_allclose(copy.fisher_cotangents, reference.fisher_cotangents, rtol=1e-10, atol=1e-16)
    assert_stats_match_grads(_unroll(grads), {(f"cell_{i}", "mlp"): copy})  # the copy's rows give its gradient
  np.testing.assert_allclose(stats[("head",)].inputs, unrolled[("head",)].inputs, rtol=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), _unroll(grads), unrolled_grads)


METHODS = {
  "foof": lambda layout: nox.foof(0.5, inverse_every=2, kernel_input_ndim=layout),
  "kfac_heuristic": lambda layout: nox.kfac(0.1, kernel_input_ndim=layout),
  "kfac_standard": lambda layout: nox.kfac(0.1, damping_mode="standard", inverse_every=2, kernel_input_ndim=layout),
  "fngd": lambda layout: nox.fngd(0.3, steps_per_epoch=2, batch_size=N, kernel_input_ndim=layout),
  "natural_gradient": lambda layout: nox.natural_gradient(0.1),
  "natural_gradient_block": lambda layout: nox.natural_gradient(0.1, block_diagonal=True),
}


def test_scanned_directions_match_unrolled_for_every_method(x64):
  """Three steps of every method on both models, from one MC-Fisher capture per step (FOOF and FNGD
  ignore its Fisher cotangents); every method keeps its own state, the parameters follow FOOF. The
  scanned cells are rematerialised (nn.remat), which changes nothing but memory."""
  x, y = _data()
  params = init_f64(Scanned(), x)
  _, _, stats = nox.value_grad_and_stats(_xent(Scanned(), x, y))(params)
  layout = nox.kernel_layouts(stats)
  assert layout == {"cells/mlp": nox.KernelLayout(1, 1), "head": 1}
  scanned = {name: make(layout) for name, make in METHODS.items()}
  unrolled = {name: make(None) for name, make in METHODS.items()}

  def run(model, transforms, params, states, key):
    capture = nox.value_grad_and_stats(_xent(model, x, y), fisher="mc", likelihood="categorical")
    _, grads, stats = capture(params, rng=key)
    return {name: tx.update(grads, states[name], params, stats=stats) for name, tx in transforms.items()}

  @jax.jit
  def step(params, states, unrolled_states, key):
    return run(Scanned(remat=True), scanned, params, states, key), run(
      Unrolled(), unrolled, _unroll(params), unrolled_states, key
    )

  states = {name: tx.init(params) for name, tx in scanned.items()}
  unrolled_states = {name: tx.init(_unroll(params)) for name, tx in unrolled.items()}
  for t in range(3):
    out, out_unrolled = step(params, states, unrolled_states, jax.random.key(t))
    for name in METHODS:
      (direction, states[name]), (expected, unrolled_states[name]) = out[name], out_unrolled[name]
      jax.tree.map(
        lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13, err_msg=f"{name}, step {t}"),
        _unroll(direction),
        expected,
      )
    params = jax.tree.map(lambda p, d: p - 0.3 * d, params, out["foof"][0])


class Cell2(nn.Module):
  @nn.compact
  def __call__(self, carry):
    return jnp.tanh(nn.Dense(WIDTH, name="mlp")(carry))


class Lifted(nn.Module):
  """Dense layers inside ``nn.remat_scan`` (2 x 3 stacked cells), ``nn.vmap`` (3 dense layers on the
  same input, summed) or ``nn.jit`` (one cell)."""

  kind: str

  @nn.compact
  def __call__(self, x):
    if self.kind == "remat_scan":
      x = nn.remat_scan(Cell2, lengths=(2, 3))(name="cells")(x)
    elif self.kind == "vmap":
      vmapped = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, axis_size=3)
      x = jnp.tanh(vmapped(WIDTH, name="ensemble")(x)).sum(0)
    else:
      x = nn.jit(Cell2)(name="cell")(x)
    return nn.Dense(2, name="head")(x)


class LiftedUnrolled(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    if self.kind == "remat_scan":
      for i in range(6):
        x = Cell2(name=f"cell_{i}")(x)
    elif self.kind == "vmap":
      x = sum(jnp.tanh(nn.Dense(WIDTH, name=f"member_{i}")(x)) for i in range(3))
    else:
      x = Cell2(name="cell")(x)
    return nn.Dense(2, name="head")(x)


def _lifted_unroll(kind, params):
  if kind == "remat_scan":  # iteration (i, j) of the nested scans is cell 3 i + j
    cells = params["cells"]
    unrolled = {
      f"cell_{3 * i + j}": jax.tree.map(lambda leaf, i=i, j=j: leaf[i, j], cells) for i in range(2) for j in range(3)
    }
  elif kind == "vmap":
    unrolled = {f"member_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], params["ensemble"]) for i in range(3)}
  else:
    unrolled = {"cell": params["cell"]}
  return {"head": params["head"], **unrolled}


@pytest.mark.parametrize("kind", ["remat_scan", "vmap", "jit"])
def test_remat_scan_vmap_and_jit_match_unrolled(x64, kind):
  x, y = _data()
  params = init_f64(Lifted(kind), x)
  unrolled_params = _lifted_unroll(kind, params)

  @jax.jit
  def directions(params, unrolled_params):
    out = []
    for model, p, layout in ((Lifted(kind), params, True), (LiftedUnrolled(kind), unrolled_params, False)):
      _, grads, stats = nox.value_grad_and_stats(_xent(model, x, y))(p)
      tx = nox.foof(0.5, kernel_input_ndim=nox.kernel_layouts(stats) if layout else None)
      out.append((stats, tx.update(grads, tx.init(p), p, stats=stats)[0]))
    return out

  (stats, foof), (_, foof_unrolled) = directions(params, unrolled_params)
  stack = {"remat_scan": (2, 3), "vmap": (3,), "jit": ()}[kind]
  assert [s.stack_shape for key, s in stats.items() if key != ("head",)] == [stack]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13), _lifted_unroll(kind, foof), foof_unrolled
  )


class SharedBlock(nn.Module):
  dense: nn.Module

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(self.dense(x))


class Unsupported(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    if self.kind == "rnn":  # nn.RNN scans its cell with variable_broadcast="params"
      return nn.RNN(nn.SimpleCell(WIDTH, param_dtype=x.dtype), name="rnn")(x[:, None].repeat(3, 1))[:, -1]
    if self.kind == "broadcast_vmap":
      dense = nn.vmap(nn.Dense, variable_axes={"params": None}, split_rngs={"params": False})
      return dense(WIDTH, name="dense")(x)
    if self.kind == "vmap_in_loss":
      dense = nn.Dense(WIDTH, name="dense")
      return jax.vmap(dense)(x)
    if self.kind == "shared_by_two_remat_blocks":
      shared = nn.Dense(WIDTH, name="shared")
      return nn.remat(SharedBlock)(shared, name="block_1")(nn.remat(SharedBlock)(shared, name="block_0")(x))
    return nn.cond(True, lambda module, x: module(x), lambda module, x: 2 * module(x), Cell2(name="cell"), x)


@pytest.mark.parametrize(
  "kind, match",
  [
    ("rnn", r"'SimpleCell_0/i'.*serve several iterations.*variable_axes=\{'params': 0\}"),
    ("broadcast_vmap", r"'dense'.*serve several iterations"),
    ("vmap_in_loss", r"'dense'.*serve several iterations"),
    ("cond", r"'cell/mlp'.*traces it for cond"),
    ("shared_by_two_remat_blocks", r"'shared' is applied inside two separate transforms"),
  ],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unsupported_transforms_raise_while_tracing(kind, match, jit):
  x = jnp.ones((2, WIDTH))
  model = Unsupported(kind)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  capture = nox.value_grad_and_stats(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))
  with pytest.raises(NotImplementedError, match=match):
    if jit:
      jax.jit(capture).lower(params)
    else:
      capture(jax.tree.map(jnp.zeros_like, params))


def test_stateful_transforms_need_the_layout_of_stacked_layers():
  x, y = jnp.ones((N, WIDTH)), jnp.zeros(N, jnp.int32)
  params = jax.eval_shape(Scanned().init, jax.random.key(0), x)["params"]
  capture = nox.value_grad_and_stats(_xent(Scanned(), x, y))
  _, grads, stats = jax.eval_shape(capture, params)
  tx = nox.foof(1.0)  # the default layout reads the (3, 4, 4) kernel as one 12 x 4 matrix
  with pytest.raises(ValueError, match=r"'cells/mlp' is stacked.*kernel_input_ndim=nox.kernel_layouts\(stats\)"):
    jax.eval_shape(lambda g, s, p: tx.update(g, tx.init(p), p, stats=s), grads, stats, params)
  tx = nox.foof(1.0, kernel_input_ndim=nox.kernel_layouts(stats))
  state = jax.eval_shape(tx.init, params)
  assert set(state.layers) == {"cells/mlp[0]", "cells/mlp[1]", "cells/mlp[2]", "head"}
  assert state.layers["cells/mlp[1]"].a_ema.shape == (WIDTH + 1, WIDTH + 1)
  direction, _ = jax.eval_shape(lambda g, s, p: tx.update(g, tx.init(p), p, stats=s), grads, stats, params)
  assert direction["cells"]["mlp"]["kernel"].shape == (LENGTH, WIDTH, WIDTH)


# --------------------------------------------------------------------------- #
# NNX: modules built with nnx.vmap, applied with nnx.scan (+ nnx.remat) or nnx.vmap
# --------------------------------------------------------------------------- #


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class NnxStacked(nnx.Module):
  """``LENGTH`` blocks with stacked parameters, applied in sequence (``nnx.scan`` of ``nnx.remat``)
  or side by side (``nnx.vmap``, summed)."""

  def __init__(self, rngs, kind):
    @nnx.split_rngs(splits=LENGTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NnxBlock(rngs)

    self.blocks = create(rngs)
    self.head = nnx.Linear(WIDTH, 2, rngs=rngs, param_dtype=jnp.float64)
    self.kind = kind

  def __call__(self, x):
    if self.kind == "scan":

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, block):
        return nnx.remat(lambda block, x: block(x))(block, x)

      x = body(x, self.blocks)
    else:
      x = nnx.vmap(lambda block, x: block(x), in_axes=(0, None))(self.blocks, x).sum(0)
    return self.head(x)


class NnxUnrolled(nnx.Module):
  """The same blocks as separate modules (parameters copied from a stacked model)."""

  def __init__(self, stacked: NnxStacked):
    self.blocks = nnx.List([NnxBlock(nnx.Rngs(0)) for _ in range(LENGTH)])
    for i, block in enumerate(self.blocks):
      block.linear.kernel[...] = stacked.blocks.linear.kernel[i]
      block.linear.bias[...] = stacked.blocks.linear.bias[i]
    self.head = nnx.clone(stacked.head)
    self.kind = stacked.kind

  def __call__(self, x):
    if self.kind == "scan":
      for block in self.blocks:
        x = block(x)
    else:
      x = sum(block(x) for block in self.blocks)
    return self.head(x)


def _nnx_xent(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@pytest.mark.parametrize("kind", ["scan", "vmap"])
def test_nnx_stacked_modules_match_unrolled(x64, kind):
  x, y = _data()
  model = NnxStacked(nnx.Rngs(0), kind)
  unrolled = NnxUnrolled(model)
  layout = nox.nnx.kernel_layouts(model)
  assert layout == {"blocks/linear": nox.KernelLayout(1, 1), "head": 1}

  @nnx.jit
  def directions(model, unrolled):
    out = []
    for m, kin in ((model, layout), (unrolled, None)):
      _, grads, stats = nox.nnx.value_grad_and_stats(_nnx_xent, fisher="full", likelihood="categorical")(m, x, y)
      params = nnx.state(m, nnx.Param)
      foof = nox.foof(0.5, kernel_input_ndim=kin)
      natural = nox.natural_gradient(0.1)
      out.append(
        (
          stats,
          foof.update(grads, foof.init(params), params, stats=stats)[0],
          natural.update(grads, natural.init(params), params, stats=stats)[0],
        )
      )
    return out

  (stats, *stacked), (unrolled_stats, *reference) = directions(model, unrolled)
  assert not hasattr(model.blocks.linear, nnx_recording.KEY_ATTRIBUTE)  # nothing left on the user's model
  assert stats[("blocks", "linear")].stack_shape == (LENGTH,)
  for i in range(LENGTH):
    copy, expected = stats[("blocks", "linear")].copy((i,)), unrolled_stats[("blocks", i, "linear")]
    np.testing.assert_allclose(copy.inputs, expected.inputs, rtol=1e-12)
    np.testing.assert_allclose(copy.fisher_cotangents, expected.fisher_cotangents, rtol=1e-10, atol=1e-16)
  for direction, expected in zip(stacked, reference):
    direction, expected = nnx.to_pure_dict(direction), nnx.to_pure_dict(expected)
    np.testing.assert_allclose(direction["head"]["kernel"], expected["head"]["kernel"], rtol=1e-9)
    for i in range(LENGTH):
      for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(
          direction["blocks"]["linear"][leaf][i], expected["blocks"][i]["linear"][leaf], rtol=1e-9, atol=1e-13
        )


# --------------------------------------------------------------------------- #
# bfloat16: a tiny scanned, rematerialised Transformer LM trains with every method
# --------------------------------------------------------------------------- #

BF16, VOCAB, D_MODEL, SEQ = jnp.bfloat16, 11, 8, 5


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=BF16, param_dtype=BF16)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention", **kw)(nn.LayerNorm(**kw)(x), mask=mask)
    return x + nn.Dense(D_MODEL, name="mlp_in", **kw)(nn.gelu(x)), None


class ScannedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    kw = dict(dtype=BF16, param_dtype=BF16)
    x = nn.Embed(VOCAB, D_MODEL, name="embed", **kw)(tokens)
    blocks = nn.scan(
      nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast, length=2
    )
    x, _ = blocks(name="blocks")(x, nn.make_causal_mask(tokens))
    return nn.Dense(VOCAB, name="head", **kw)(nn.LayerNorm(**kw)(x))


@pytest.mark.slow
def test_scanned_bfloat16_transformer_takes_finite_steps_with_every_method():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(3, SEQ + 1)))
  model = ScannedLM()
  params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"]
  assert params["blocks"]["attention"]["query"]["kernel"].shape == (2, D_MODEL, 2, D_MODEL // 2)

  def loss_fn(p):
    logits = model.apply({"params": p}, tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  _, _, stats = jax.eval_shape(nox.value_grad_and_stats(loss_fn), params)
  layout = nox.kernel_layouts(stats)
  assert layout["blocks/attention/out"] == nox.KernelLayout(2, 1) and layout["embed"] == 1
  methods = {
    "foof": nox.foof(1.0, kernel_input_ndim=layout),
    "kfac_heuristic": nox.kfac(0.1, kernel_input_ndim=layout),
    "kfac_standard": nox.kfac(0.1, damping_mode="standard", kernel_input_ndim=layout),
    "fngd": nox.fngd(0.1, steps_per_epoch=2, batch_size=3, kernel_input_ndim=layout),
    "natural_gradient": nox.natural_gradient(1.0),
  }
  capture = nox.value_grad_and_stats(loss_fn, fisher="mc", likelihood="categorical")

  @jax.jit
  def step(params, states, key):
    # One capture per step (MC Fisher: KFAC and the natural gradient use it, FOOF and FNGD ignore it);
    # every method updates its own state, and the parameters follow FOOF.
    loss, grads, stats = capture(params, rng=key)
    out = {name: tx.update(grads, states[name], params, stats=stats) for name, tx in methods.items()}
    return loss, optax.apply_updates(params, jax.tree.map(lambda d: -0.1 * d, out["foof"][0])), out

  states = {name: tx.init(params) for name, tx in methods.items()}
  assert states["foof"].layers["blocks/attention/query[1]"].a_ema.dtype == jnp.float32  # statistics in float32
  assert states["kfac_heuristic"].layers["embed"].a_ema.shape == (VOCAB,)
  for t in range(2):
    loss, params, out = step(params, states, jax.random.key(t))
    assert np.isfinite(loss)
    for name, (direction, states[name]) in out.items():
      for leaf in jax.tree.leaves(direction):
        assert leaf.dtype == BF16 and np.all(np.isfinite(np.asarray(leaf, np.float32))), name
      assert np.any(np.asarray(direction["embed"]["embedding"], np.float32) != 0), name
      assert np.any(np.asarray(direction["blocks"]["mlp_in"]["kernel"][1], np.float32) != 0), name
