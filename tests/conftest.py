import os

# The suite is dominated by compiling many tiny XLA programs, not by running them: LLVM's -O0 code
# generation roughly halves the CPU time of a test run (measured: 155 -> 99 s user for test_foof.py +
# test_kfac.py, 60 -> 33 s for the MNIST/Transformer training tests) and leaves the HLO, and so every
# result the tests check, unchanged. Set NOX_TEST_XLA_OPTIMIZE=1 to test with XLA's default code generation.
if os.environ.get("NOX_TEST_XLA_OPTIMIZE") != "1":
  os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
  ).strip()

import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test in float64 and restores the previous setting afterwards."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


def init_f64(model, *inputs, seed: int = 0):
  """``model.init(...)['params']`` cast to float64 (Flax initialises in float32)."""
  import jax.numpy as jnp

  params = model.init(jax.random.key(seed), *inputs)["params"]
  return jax.tree.map(lambda p: p.astype(jnp.float64), params)


def assert_stats_match_grads(grads, stats, keys=None, *, rtol: float = 1e-10, atol: float = 1e-12):
  """Σ over rows of ā cotᵀ (recorded inputs with the bias's 1, times output cotangents) must equal
  each layer's autodiff gradient of kernel (and bias).

  ``grads``: a linen ``params``-shaped dict or an ``nnx.State``; ``keys``: the layer paths to
  check (all of ``stats`` by default).
  """
  import numpy as np
  from flax import nnx

  tree = nnx.as_pure(grads) if isinstance(grads, nnx.State) else grads
  for key in stats if keys is None else keys:
    s = stats[key]
    node = tree
    for k in key:
      node = node[k]
    a = np.asarray(s.augmented_inputs()).reshape(-1, s.d_in)
    cot = np.asarray(s.cotangents).reshape(-1, s.d_out)
    from_rows = a.T @ cot
    d_kernel = s.d_in - int(s.has_bias)
    # a LoRA factor (nnx.LoRA's lora_a/lora_b) is its own weight leaf
    weights = node if key and key[-1] in ("lora_a", "lora_b") else node["embedding" if s.kind == "embed" else "kernel"]
    np.testing.assert_allclose(
      from_rows[:d_kernel],
      np.asarray(weights).reshape(d_kernel, -1),
      rtol=rtol,
      atol=atol,
      err_msg=f"kernel of layer {key}",
    )
    if s.has_bias:
      np.testing.assert_allclose(
        from_rows[-1], np.asarray(node["bias"]).reshape(-1), rtol=rtol, atol=atol, err_msg=f"bias of layer {key}"
      )
    # The same product without the rows (a backward-filter convolution for conv layers).
    np.testing.assert_allclose(
      np.asarray(s.kernel_gradient(s.cotangents)),
      from_rows[:d_kernel],
      rtol=rtol,
      atol=atol,
      err_msg=f"kernel_gradient of layer {key}",
    )
