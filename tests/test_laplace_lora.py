"""A Laplace posterior over LoRA adapters only (``nnx.LoRALinear``, ``nnx.LoRA``; stats with ``wrt=nnx.LoRAParam``).

Every App. C function on the LoRA model's adapter state must equal, in float64, the same function on the explicit
model that writes each adapter as two bias-free ``nnx.Linear`` layers (base weights frozen, not captured), and for
``"full"`` the explicit Gauss-Newton matrix over the adapter parameters (``Jᵀ H J`` with ``J`` from ``jax.jacfwd``
over the flat adapter vector and the softmax Hessian ``H = diag p − p pᵀ`` in NumPy).
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lora_models import ExplicitModel, LoraModel, xent

import neuron_optax as nox

pytestmark = pytest.mark.usefixtures("x64")

D_IN, HIDDEN, CLASSES, RANK, N = 3, 4, 3, 2, 5
TAU, N_DATA, DAMPING = 0.7, 40.0, 0.1
STRUCTURES = ("full", "diagonal", "kfac", "kfac_heuristic", "input_factor")

# adapter leaf path in the LoRA model -> the explicit model's bias-free layer; this order is the flat order
ADAPTERS = {
  ("hidden", "lora", "lora_a"): "a1",
  ("hidden", "lora", "lora_b"): "b1",
  ("head", "lora_a"): "a2",
  ("head", "lora_b"): "b2",
}
EXPLICIT_ADAPTERS = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(name) for name in ADAPTERS.values())))


def lora_model(seed):
  return LoraModel(nnx.Rngs(seed), D_IN, HIDDEN, CLASSES, RANK)


def lora_flat(tree):
  pure = nnx.to_pure_dict(tree)
  out = []
  for path in ADAPTERS:
    node = pure
    for k in path:
      node = node[k]
    out.append(jnp.ravel(node))
  return jnp.concatenate(out)


def explicit_flat(tree):
  pure = nnx.to_pure_dict(tree)
  return jnp.concatenate([jnp.ravel(pure[name]["kernel"]) for name in ADAPTERS.values()])


def everything(model, wrt, to_flat, x, y, key, names):
  """Every App. C function on the adapters of ``model``, flattened in ``ADAPTERS`` order where a tree."""
  graphdef, params, rest = nnx.split(model, wrt, ...)
  _, _, stats = nox.nnx.value_grad_and_stats(xent, fisher="full", likelihood="categorical", wrt=wrt)(model, x, y)
  flat = to_flat(params)
  vector = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.2, params)
  apply_fn = lambda p: nnx.merge(graphdef, p, rest)(x[:3])
  kw = dict(prior_precision=TAU, dataset_size=N_DATA)
  m = CLASSES * N
  out = {
    "params": flat,
    "vector": to_flat(vector),
    "fv": to_flat(nox.fisher_vector_product(stats, vector)),
    "solve": to_flat(nox.damped_fisher_solve(stats, vector, DAMPING)),
    "fisher_diagonal": to_flat(nox.fisher_diagonal(stats, vector)),
    "factors": {names.get(k, k): f for k, f in nox.kronecker_factors(stats).items()},
  }
  for s in STRUCTURES:
    samples = nox.laplace_sample(key, params, stats, num_samples=3, structure=s, **kw)
    out[f"sample_shape/{s}"] = jax.vmap(to_flat)(samples).shape
    # the sampler as a linear map of its noise: J Jᵀ is the posterior covariance whatever the layer order
    _, unravel = jax.flatten_util.ravel_pytree(params)
    d, cols = flat.size, m if s == "full" else 0

    def sample(z, s=s, d=d, cols=cols, unravel=unravel):
      noise = unravel(z[:d])
      return to_flat(nox.laplace_sample_from_noise(params, stats, noise, z[d:] if cols else None, structure=s, **kw))

    jacobian = jax.jacfwd(sample)(jnp.zeros(d + cols))
    out[f"covariance/{s}"] = jacobian @ jacobian.T
    out[f"mean/{s}"] = sample(jnp.zeros(d + cols))
    out[f"evidence/{s}"] = nox.laplace_log_marginal_likelihood(params, stats, log_likelihood=-2.0, structure=s, **kw)
    out[f"tau/{s}"] = nox.tune_prior_precision(params, stats, dataset_size=N_DATA, structure=s, grid_points=21)
    out[f"probit/{s}"] = nox.glm_predictive(apply_fn, params, stats, structure=s, **kw)
  # Same key, same noise: both models capture their layers in call order (a1, b1, a2, b2), so the noise is
  # sliced alike and the Monte-Carlo predictives must agree exactly.
  out["mc"] = nox.glm_predictive(apply_fn, params, stats, link_approx="mc", num_samples=4, key=key, **kw)
  return out


def explicit_ggn(explicit, x):
  """``(1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` over the flat adapter vector of the explicit model (NumPy)."""
  graphdef, params, rest = nnx.split(explicit, EXPLICIT_ADAPTERS, ...)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  # explicit_flat order of the adapters, as a permutation of ravel_pytree's order
  perm = np.asarray(jax.jacfwd(lambda f: explicit_flat(unravel(f)))(flat)).argmax(1)
  logits_of = lambda f: nnx.merge(graphdef, unravel(f), rest)(x)
  jacobian = np.asarray(jax.jacfwd(logits_of)(flat))[:, :, perm]  # (n, C, d)
  probs = np.asarray(jax.nn.softmax(logits_of(flat)))
  hessians = np.stack([np.diag(p) - np.outer(p, p) for p in probs])
  return np.einsum("ncd,nce,nef->df", jacobian, hessians, jacobian) / x.shape[0]


@pytest.mark.slow  # CI's second step (issue 28: the default run within 10 minutes)
def test_lora_laplace_equals_explicit_two_linear_model():
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(N, D_IN))), jnp.asarray(rng.integers(0, CLASSES, size=N))
  lora = lora_model(0)
  explicit = ExplicitModel(lora)
  key = jax.random.key(1)

  @nnx.jit
  def run(lora, explicit):
    return (
      everything(lora, nnx.LoRAParam, lora_flat, x, y, key, {"/".join(k): v for k, v in ADAPTERS.items()}),
      everything(explicit, EXPLICIT_ADAPTERS, explicit_flat, x, y, key, {}),
    )

  got, want = run(lora, explicit)
  assert got.keys() == want.keys()
  for name, value in got.items():
    rtol = 1e-6 if name.startswith("tau/") else 1e-10  # golden-section maximiser: ~√ε of a flat objective
    if name == "factors":
      assert sorted(value) == sorted(ADAPTERS.values())
      for layer, factors in value.items():
        for f, ref in zip(factors, want[name][layer]):
          np.testing.assert_allclose(f, ref, rtol=1e-10, atol=1e-12, err_msg=layer)
    elif name.startswith("sample_shape/"):
      assert tuple(map(int, value)) == tuple(map(int, want[name])) == (3, got["params"].size), name
    else:
      np.testing.assert_allclose(value, want[name], rtol=rtol, atol=1e-12, err_msg=name)

  # The explicit Gauss-Newton matrix over the 28 adapter parameters, and only them (base weights frozen).
  d = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(nnx.state(lora, nnx.LoRAParam)))
  assert d == D_IN * RANK + RANK * HIDDEN + HIDDEN * RANK + RANK * CLASSES
  fisher = explicit_ggn(explicit, x)
  theta, v = np.asarray(got["params"]), np.asarray(got["vector"])
  assert np.all(np.abs(np.asarray(got["fv"])) > 1e-8)  # every adapter leaf gets a non-trivial product
  assert not np.allclose(fisher[: D_IN * RANK, : D_IN * RANK], 0)  # lora_a gets curvature (lora_b is not zero)
  np.testing.assert_allclose(got["fv"], fisher @ v, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(got["solve"], np.linalg.solve(fisher + DAMPING * np.eye(d), v), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(got["fisher_diagonal"], np.diag(fisher), rtol=1e-10, atol=1e-12)
  precision = TAU * np.eye(d) + N_DATA * fisher
  np.testing.assert_allclose(got["covariance/full"], np.linalg.inv(precision), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(got["mean/full"], theta, rtol=1e-12)
  evidence = -2.0 - 0.5 * (TAU * theta @ theta + np.linalg.slogdet(precision)[1] - d * np.log(TAU))
  np.testing.assert_allclose(got["evidence/full"], evidence, rtol=1e-10)
  diagonal = TAU + N_DATA * np.diag(fisher)
  np.testing.assert_allclose(got["covariance/diagonal"], np.diag(1 / diagonal), rtol=1e-10, atol=1e-12)


def test_lora_stats_with_whole_param_state_and_mismatch_errors():
  """Adapter-only stats on the whole ``nnx.Param`` state: zeros on the frozen base weights; stats of every
  parameter on the adapter state alone: a clear error naming the missing base layers."""
  rng = np.random.default_rng(1)
  x, y = jnp.asarray(rng.normal(size=(N, D_IN))), jnp.asarray(rng.integers(0, CLASSES, size=N))
  lora = lora_model(1)
  capture = lambda wrt: nnx.jit(nox.nnx.value_grad_and_stats(xent, fisher="full", likelihood="categorical", wrt=wrt))
  _, _, adapter_stats = capture(nnx.LoRAParam)(lora, x, y)
  _, _, all_stats = capture(nnx.Param)(lora, x, y)
  everything_ = nnx.state(lora, nnx.Param)
  adapters = nnx.state(lora, nnx.LoRAParam)
  whole = jax.jit(nox.fisher_vector_product)(adapter_stats, everything_)
  only = jax.jit(nox.fisher_vector_product)(adapter_stats, adapters)
  np.testing.assert_allclose(lora_flat(whole), lora_flat(only), rtol=1e-12)
  pure = nnx.to_pure_dict(whole)
  for leaf in (pure["hidden"]["kernel"], pure["hidden"]["bias"], pure["head"]["base_module"]["kernel"]):
    np.testing.assert_array_equal(leaf, 0.0)
  with pytest.raises(ValueError, match=r"no kernel for the captured layers.*hidden"):
    nox.fisher_vector_product(all_stats, adapters)
