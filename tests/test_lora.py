"""LoRA adapters (``nnx.LoRA``, ``nnx.LoRALinear``): each factor a bias-free dense layer.

Reference: the same function written with explicit ``nnx.Linear(use_bias=False)`` layers for the
factors (``x -> x·A`` and ``h -> h·B``), whose capture is checked against NumPy elsewhere
(test_nnx.py). Statistics and every optimizer's direction must agree in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_stats_match_grads
from flax import nnx
from lora_models import B_INIT, F64, ExplicitModel, LoraModel, xent

import neuron_optax as nox

# LoRA model layer -> (explicit layer, LoRA model's weight leaf path, explicit model's kernel path)
_LAYERS = {
  ("hidden",): ("base1",),
  ("hidden", "lora", "lora_a"): ("a1",),
  ("hidden", "lora", "lora_b"): ("b1",),
  ("head", "base_module"): ("base2",),
  ("head", "lora_a"): ("a2",),
  ("head", "lora_b"): ("b2",),
}
_ADAPTERS = [k for k in _LAYERS if k[-1] in ("lora_a", "lora_b")]
_EXPLICIT_ADAPTERS = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(_LAYERS[k][0]) for k in _ADAPTERS)))


def _setup(seed=0, n=6):
  rng = np.random.default_rng(seed)
  x, y = jnp.asarray(rng.normal(size=(n, 4))), jnp.asarray(rng.integers(0, 3, size=n))
  lora = LoraModel(nnx.Rngs(seed))
  return lora, ExplicitModel(lora), x, y


def _leaf(tree, key, explicit=False):
  node = nnx.as_pure(tree)
  for k in key:
    node = node[k]
  if explicit:
    return node["kernel"]
  return node if key[-1] in ("lora_a", "lora_b") else node["kernel"]


@pytest.mark.parametrize("adapters_only", [False, True])
def test_lora_stats_equal_explicit_model(x64, adapters_only):
  lora, explicit, x, y = _setup()
  kw = dict(fisher="full", likelihood="categorical")  # the empirical cotangents come with the Fisher ones
  wrt, explicit_wrt = (nnx.LoRAParam, _EXPLICIT_ADAPTERS) if adapters_only else (nnx.Param, nnx.Param)
  loss, grads, stats = nnx.jit(nox.nnx.value_grad_and_stats(xent, wrt=wrt, **kw))(lora, x, y)
  ref_loss, ref_grads, ref_stats = nnx.jit(nox.nnx.value_grad_and_stats(xent, wrt=explicit_wrt, **kw))(explicit, x, y)

  keys = _ADAPTERS if adapters_only else list(_LAYERS)
  assert sorted(stats) == sorted(keys)
  assert sorted(ref_stats) == sorted(_LAYERS[k] for k in keys)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
  for key in keys:
    s, ref = stats[key], ref_stats[_LAYERS[key]]
    assert (s.kind, s.has_bias, s.kernel_shape, s.kernel_input_ndim) == (
      ref.kind,
      ref.has_bias,
      ref.kernel_shape,
      ref.kernel_input_ndim,
    )
    np.testing.assert_allclose(s.inputs, ref.inputs, rtol=1e-12, atol=1e-14, err_msg=str(key))
    np.testing.assert_allclose(s.cotangents, ref.cotangents, rtol=1e-12, atol=1e-14, err_msg=str(key))
    np.testing.assert_allclose(s.fisher_cotangents, ref.fisher_cotangents, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_leaf(grads, key), _leaf(ref_grads, _LAYERS[key], True), rtol=1e-12, atol=1e-14)
  assert_stats_match_grads(grads, stats, atol=1e-13)
  # adapters only: the gradient holds the adapters' factors and nothing else
  grad_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(nnx.as_pure(grads))[0]}
  assert len(grad_paths) == (4 if adapters_only else 8)
  assert nox.nnx.kernel_layouts(lora, wrt) == {"/".join(map(str, k)): 1 for k in keys}


_TRANSFORMS = {
  "foof": lambda: nox.foof(0.5),
  "kfac": lambda: nox.kfac(0.5, damping_mode="standard"),
  "natural_gradient": lambda: nox.natural_gradient(0.5),
  "fngd": lambda: nox.fngd(0.3, steps_per_epoch=2, batch_size=6),
}


# All parameters: the base layers are plain nnx.Linear layers (checked elsewhere) and the compilation of
# four transforms over six layers is slow; the adapters alone keep the LoRA-specific part in the quick run.
@pytest.mark.parametrize("adapters_only", [pytest.param(False, marks=pytest.mark.slow), True])
def test_every_optimizer_direction_equals_explicit_model(x64, adapters_only):
  lora, explicit, x, y = _setup(seed=1)
  wrt, explicit_wrt = (nnx.LoRAParam, _EXPLICIT_ADAPTERS) if adapters_only else (nnx.Param, nnx.Param)
  keys = _ADAPTERS if adapters_only else list(_LAYERS)
  # Fisher cotangents, so that KFAC and the natural gradient use the Fisher they are defined with
  kw = dict(fisher="full", likelihood="categorical")
  _, grads, stats = nnx.jit(nox.nnx.value_grad_and_stats(xent, wrt=wrt, **kw))(lora, x, y)
  _, ref_grads, ref_stats = nnx.jit(nox.nnx.value_grad_and_stats(xent, wrt=explicit_wrt, **kw))(explicit, x, y)
  params, ref_params = nnx.state(lora, wrt), nnx.state(explicit, explicit_wrt)

  @jax.jit
  def directions(grads, stats, params, ref_grads, ref_stats, ref_params):
    out = {}
    for name, make in _TRANSFORMS.items():
      tx = make()
      updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
      ref_updates, _ = tx.update(ref_grads, tx.init(ref_params), ref_params, stats=ref_stats)
      out[name] = (updates, ref_updates)
    return out

  for name, (updates, ref_updates) in directions(grads, stats, params, ref_grads, ref_stats, ref_params).items():
    for key in keys:
      got, want = _leaf(updates, key), _leaf(ref_updates, _LAYERS[key], True)
      # preconditioned: not the raw gradient
      assert not np.allclose(got, _leaf(grads, key), rtol=1e-3), (name, key)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"{name} {key}")


def test_adapter_only_training_leaves_base_weights(x64):
  lora, _, x, y = _setup(seed=2)
  base = np.asarray(lora.hidden.kernel[...])
  tx = optax.chain(nox.foof(1.0), optax.sgd(0.2))
  optimizer = nnx.Optimizer(lora, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads, stats = nox.nnx.value_grad_and_stats(xent, wrt=nnx.LoRAParam)(model, x, y)
    optimizer.update(model, grads, stats=stats)
    return loss

  losses = [float(step(lora, optimizer, x, y)) for _ in range(5)]
  assert losses[-1] < losses[0]
  np.testing.assert_array_equal(lora.hidden.kernel[...], base)
  # the adapters moved
  assert not np.allclose(lora.head.lora_a[...], ExplicitModel(LoraModel(nnx.Rngs(2))).a2.kernel[...])


def test_linen_has_no_lora_module():
  """Flax linen has no LoRA layer to capture (documented); revisit if one appears."""
  import flax.linen as nn

  assert not [name for name in dir(nn) if "lora" in name.lower()]


_LENGTH, _WIDTH = 2, 3


def _lora_block(rngs):
  return nnx.LoRALinear(
    _WIDTH, _WIDTH, lora_rank=2, param_dtype=F64, lora_param_dtype=F64, b_initializer=B_INIT, rngs=rngs
  )


class StackedLora(nnx.Module):
  """LoRA-adapted blocks with stacked parameters (``nnx.vmap``), applied in sequence with ``nnx.scan``."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=_LENGTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return _lora_block(rngs)

    self.blocks = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return jnp.tanh(block(x))

    return body(x, self.blocks)


class UnrolledLora(nnx.Module):
  def __init__(self, stacked: StackedLora):
    self.blocks = nnx.List([_lora_block(nnx.Rngs(0)) for _ in range(_LENGTH)])
    for i, block in enumerate(self.blocks):
      for variable, source in (
        (block.kernel, stacked.blocks.kernel),
        (block.bias, stacked.blocks.bias),
        (block.lora.lora_a, stacked.blocks.lora.lora_a),
        (block.lora.lora_b, stacked.blocks.lora.lora_b),
      ):
        variable[...] = source[i]

  def __call__(self, x):
    for block in self.blocks:
      x = jnp.tanh(block(x))
    return x


def test_stacked_adapters_in_nnx_scan_equal_unrolled(x64):
  rng = np.random.default_rng(3)
  x, y = jnp.asarray(rng.normal(size=(5, _WIDTH))), jnp.asarray(rng.integers(0, _WIDTH, size=5))
  model = StackedLora(nnx.Rngs(0))
  unrolled = UnrolledLora(model)
  layout = nox.nnx.kernel_layouts(model, nnx.LoRAParam)
  assert layout == {f"blocks/lora/{f}": nox.KernelLayout(1, 1) for f in ("lora_a", "lora_b")}

  @nnx.jit
  def directions(model, unrolled):
    out = []
    for m, kernel_input_ndim in ((model, layout), (unrolled, None)):
      _, grads, stats = nox.nnx.value_grad_and_stats(xent, wrt=nnx.LoRAParam)(m, x, y)
      params, tx = nnx.state(m, nnx.LoRAParam), nox.foof(0.5, kernel_input_ndim=kernel_input_ndim)
      out.append((stats, nnx.as_pure(tx.update(grads, tx.init(params), params, stats=stats)[0])))
    return out

  (stats, updates), (ref_stats, ref_updates) = directions(model, unrolled)
  for factor in ("lora_a", "lora_b"):
    s = stats[("blocks", "lora", factor)]
    assert s.stack_shape == (_LENGTH,)
    for i in range(_LENGTH):
      ref = ref_stats[("blocks", i, "lora", factor)]
      np.testing.assert_allclose(s.copy((i,)).inputs, ref.inputs, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(s.copy((i,)).cotangents, ref.cotangents, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(
        updates["blocks"]["lora"][factor][i], ref_updates["blocks"][i]["lora"][factor], rtol=1e-10, atol=1e-12
      )


@pytest.mark.slow  # eager Laplace over two models: ~13 s of CPU
def test_adapter_only_laplace_equals_explicit_model(x64):
  """A Laplace posterior over the adapters alone is one call, and equals the explicit model's."""
  # The Laplace tools write trees through the library's layer mapping from the laplace/ package on
  # (issue 26.1); the single-module laplace.py before it knew only kernel leaves.
  pytest.importorskip("neuron_optax._src.laplace.posteriors")
  lora, explicit, x, y = _setup(seed=4)
  kw = dict(fisher="full", likelihood="categorical")
  _, grads, stats = nox.nnx.value_grad_and_stats(xent, wrt=nnx.LoRAParam, **kw)(lora, x, y)
  _, ref_grads, ref_stats = nox.nnx.value_grad_and_stats(xent, wrt=_EXPLICIT_ADAPTERS, **kw)(explicit, x, y)
  params, ref_params = nnx.state(lora, nnx.LoRAParam), nnx.state(explicit, _EXPLICIT_ADAPTERS)
  for structure in ("full", "kfac"):
    evidence = [
      nox.laplace_log_marginal_likelihood(
        p, s, log_likelihood=-3.0, prior_precision=0.7, dataset_size=50, structure=structure
      )
      for p, s in ((params, stats), (ref_params, ref_stats))
    ]
    np.testing.assert_allclose(evidence[0], evidence[1], rtol=1e-12, err_msg=structure)
  product, ref_product = nox.fisher_vector_product(stats, grads), nox.fisher_vector_product(ref_stats, ref_grads)
  for key in _ADAPTERS:
    got, want = _leaf(product, key), _leaf(ref_product, _LAYERS[key], True)
    assert np.abs(got).max() > 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=str(key))
