"""nox.state_sharding: FOOF/KFAC/FNGD/natural-gradient states sharded like FSDP / tensor-parallel parameters.

The 8-device checks run in a subprocess: XLA_FLAGS must be set before jax is imported.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import neuron_optax as nox

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import neuron_optax as nox
    assert jax.device_count() == 8, jax.devices()

    class Mlp(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = nn.tanh(nn.Dense(16, param_dtype=jnp.float64)(x))  # A (8, 8), G (16, 16)
        h = nn.tanh(nn.Dense(8, param_dtype=jnp.float64)(h))  # A (17, 17): odd, stays replicated
        return nn.Dense(4, use_bias=False, param_dtype=jnp.float64)(h)  # A (8, 8)

    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return nn.tanh(nn.Dense(8, use_bias=False, param_dtype=jnp.float64)(x)), None

    class Scanned(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Dense(8, use_bias=False, param_dtype=jnp.float64)(x)
        x, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="stack")(x, None)
        return nn.Dense(4, param_dtype=jnp.float64)(x)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 7)))
    y = jnp.asarray(rng.integers(0, 4, size=16))
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))

    def fsdp(params):
      # FSDP over d_out where it divides, else over d_in; tensor parallel on the other axis where that divides.
      def spec(x):
        if x.ndim < 2:
          return P()
        dims = [None] * x.ndim
        if x.shape[-1] % 4 == 0:
          dims[-1] = "fsdp"
          if x.shape[-2] % 2 == 0:
            dims[-2] = "tp"
        elif x.shape[-2] % 4 == 0:
          dims[-2] = "fsdp"
        return P(*dims)
      return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params)

    def check(model, name, make_tx, stats_layout, padded=False):
      params = model.init(jax.random.key(0), x)["params"]
      def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
      kernel_input_ndim = nox.kernel_layouts(nox.value_grad_and_stats(loss_fn)(params)[2]) if stats_layout else None
      pre = make_tx(kernel_input_ndim)
      param_sharding = fsdp(params)
      runs = []
      for sharded in (False, True):
        # The padded layout only where it is sharded: the replicated run is the plain transform.
        tx = optax.chain(nox.pad_for_sharding(pre, 4, min_elements=1) if padded and sharded else pre, optax.adam(1e-2))
        shardings = nox.state_sharding(jax.eval_shape(tx.init, params), param_sharding, min_elements=1)
        p = jax.device_put(params, param_sharding) if sharded else params
        if sharded:
          state = jax.jit(tx.init, out_shardings=shardings)(p)
          step = jax.jit(lambda p, s: _step(tx, loss_fn, p, s), out_shardings=(param_sharding, shardings))
        else:
          state = tx.init(p)
          step = jax.jit(lambda p, s: _step(tx, loss_fn, p, s))
        for _ in range(3):  # inverse_every=2: re-factorisations at steps 0 and 2
          p, state = step(p, state)
        runs.append((p, state))
        if sharded:
          spread = [l for l in jax.tree.leaves(state[0]) if not l.sharding.is_fully_replicated]
          print(name, "sharded leaves", len(spread), "per-device bytes", nox.state_bytes_per_device(state),
                "replicated", nox.state_bytes_per_device(runs[0][1]))
          for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
            assert got.sharding.is_equivalent_to(want, got.ndim), (name, got.sharding, want)
          if not name.startswith("natural_gradient"):
            assert spread, name
      if padded:  # the odd factor (17, 17) is stored as (20, 17) and split 4 ways, its padding zero
        a_ema = runs[1][1][0].inner.layers["Dense_1"].a_ema
        assert a_ema.shape == (20, 17) and not a_ema.sharding.is_fully_replicated, a_ema.sharding
        assert not np.any(np.asarray(a_ema)[17:])
        runs = [run[0] for run in runs]  # compare the parameters
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(runs[0]), jax.tree.leaves(runs[1])):
        a, b = np.asarray(a), np.asarray(b)
        if "eigenvectors" in jax.tree_util.keystr(path):  # a column's sign is arbitrary; the update is not
          a, b = np.abs(a), np.abs(b)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name + jax.tree_util.keystr(path))
      print("OK", name)

    def _step(tx, loss_fn, p, s):
      _, grads, stats = nox.value_grad_and_stats(loss_fn)(p)
      updates, s = tx.update(grads, s, p, stats=stats)
      return optax.apply_updates(p, updates), s

    transforms = {
        "foof": lambda k: nox.foof(0.5, inverse_every=2, kernel_input_ndim=k),
        "kfac": lambda k: nox.kfac(0.5, inverse_every=2, kernel_input_ndim=k),
        "kfac_standard": lambda k: nox.kfac(0.5, damping_mode="standard", inverse_every=2, kernel_input_ndim=k),
        "fngd": lambda k: nox.fngd(0.1, steps_per_epoch=2, batch_size=16, kernel_input_ndim=k),
        "natural_gradient": lambda k: nox.natural_gradient(0.5),
    }
    for name, make_tx in transforms.items():
      check(Mlp(), name + "/mlp", make_tx, False)
    check(Scanned(), "foof/scan", transforms["foof"], True)
    check(Mlp(), "foof_padded/mlp", transforms["foof"], False, padded=True)
    check(Mlp(), "kfac_standard_padded/mlp", transforms["kfac_standard"], False, padded=True)
""")


@pytest.mark.slow
def test_sharded_state_on_8_devices_matches_replicated():
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count("OK") == 8, result.stdout


def test_rule_splits_first_divisible_axis_and_replicates_the_rest():
  from neuron_optax._src import sharding

  mesh = AbstractMesh((8, 2), ("fsdp", "tp"))
  assert sharding._split((65, 64), mesh, ("fsdp",), 16) == P(None, "fsdp")
  assert sharding._split((64, 64), mesh, ("fsdp", "tp"), 16) == P(("fsdp", "tp"))
  assert sharding._split((24, 65), mesh, ("fsdp", "tp"), 16) == P("fsdp")  # 24 = 8·3 but no axis is 16·k
  assert sharding._split((65, 65), mesh, ("fsdp",), 16) == P()  # bias-augmented odd factor
  assert sharding._split((64, 64), mesh, ("fsdp",), 10_000) == P()  # too small to be worth it
  assert sharding._split((), mesh, ("fsdp",), 0) == P()


PARAMS = {
  "a": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)},
  "b": {"kernel": np.zeros((8, 2)), "bias": np.zeros(2)},
}


def test_layers_follow_their_kernel_and_other_leaves_follow_params():
  mesh = AbstractMesh((8,), ("fsdp",))
  sharded, replicated = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P())
  param_sharding = {"a": {"kernel": sharded, "bias": replicated}, "b": {"kernel": replicated, "bias": replicated}}
  tx = optax.chain(nox.kfac(1.0), optax.adam(1e-3))
  out = nox.state_sharding(jax.eval_shape(tx.init, PARAMS), param_sharding, min_elements=1)
  kfac_state, adam_state = out[0], out[1][0]
  assert kfac_state.layers["a"].a_ema.spec == P()  # (5, 5): no axis divisible by 8
  assert kfac_state.layers["a"].g_ema.spec == P("fsdp")  # (8, 8) on its kernel's axis
  assert kfac_state.layers["a"].factors.g_inverse.spec == P("fsdp")
  assert kfac_state.layers["b"].a_ema.spec == P()  # (9, 9) and its kernel is replicated anyway
  assert kfac_state.count.spec == P()
  assert adam_state.mu["a"]["kernel"] is sharded
  assert adam_state.nu["b"]["bias"] is replicated


def test_mesh_argument_spreads_every_layer():
  mesh = AbstractMesh((2, 4), ("data", "fsdp"))
  out = nox.state_sharding(jax.eval_shape(nox.fngd(0.1, steps_per_epoch=3, batch_size=16).init, PARAMS), mesh)
  assert out.layers["b"].coefficients.spec == P()  # 48 elements < min_elements
  out = nox.state_sharding(jax.eval_shape(nox.foof(1.0).init, PARAMS), mesh, min_elements=1)
  assert out.layers["b"].a_inverse.spec == P()  # (9, 9): neither 8 nor 4 nor 2 divides 9
  out = nox.state_sharding(
    jax.eval_shape(nox.fngd(0.1, steps_per_epoch=3, batch_size=16).init, PARAMS), mesh, min_elements=1
  )
  assert out.layers["a"].coefficients.spec == P(None, ("data", "fsdp"))


def test_pad_for_sharding_pads_odd_arrays_and_gives_the_same_updates():
  import flax.linen as nn

  model = nn.Dense(3)
  x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  plain, padded = (
    nox.foof(0.5, inverse_every=2),
    nox.pad_for_sharding(nox.foof(0.5, inverse_every=2), 4, min_elements=1),
  )
  state_plain, state_padded = plain.init(params), padded.init(params)
  assert state_padded.inner.layers["<top-level>"].a_ema.shape == (8, 5)  # (5, 5): first axis padded to 4·2
  for _ in range(3):
    _, grads, stats = nox.value_grad_and_stats(lambda p: (model.apply({"params": p}, x) ** 2).mean())(params)
    want, state_plain = plain.update(grads, state_plain, params, stats=stats)
    got, state_padded = padded.update(grads, state_padded, params, stats=stats)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
    state_padded.inner.layers["<top-level>"].a_inverse[:5], state_plain.layers["<top-level>"].a_inverse
  )
  assert not np.any(state_padded.inner.layers["<top-level>"].a_inverse[5:])
  with pytest.raises(ValueError, match="devices must be a positive int"):
    nox.pad_for_sharding(nox.foof(1.0), 0)


def test_bad_params_sharding_is_a_clear_error():
  with pytest.raises(TypeError, match="params_sharding must be a jax.sharding.Mesh"):
    nox.state_sharding(jax.eval_shape(nox.foof(1.0).init, PARAMS), {"a": None})
