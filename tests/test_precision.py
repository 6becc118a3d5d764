"""float32 directions at small damping against float64 computations on the same recorded rows.

The issue's case: float32 parameters, a batch of 4 examples and ``d_in = 33`` (32 inputs and the
bias; inputs of mean 0, 1 or 2), so ``A = ĀᵀĀ/4`` has 29 eigenvalues that float32 only knows as
round-off. Dampings are relative to the factor's mean eigenvalue (``tr A / d``; for KFAC that of ``A⊗G``; for the natural
gradient that of the Fisher). References are float64 NumPy from the formulas, on the float32 rows
cast to float64.
"""

import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import neuron_optax as nox
from neuron_optax._src import linalg, precision

N, D_IN, D_OUT = 4, 32, 8
ACCURATE_DOWN_TO = 1e-6  # the README's guarantee: within 1e-2 of float64 for relative dampings >= this
RELATIVE_DAMPINGS = [1.0, 1e-2, 1e-4, 1e-6, 1e-8, 1e-12]


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, name="layer")(x)


def _recorded(seed, mean=0.0):
  """float32 gradients and statistics of one batch, and its rows in float64."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N, D_IN)) + mean, jnp.float32)
  y = jnp.asarray(rng.integers(0, D_OUT, size=N))
  model = Linear()
  params = model.init(jax.random.key(seed), x)["params"]

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
  s = stats[("layer",)]
  a = np.concatenate([np.asarray(s.inputs, np.float64).reshape(N, D_IN), np.ones((N, 1))], axis=1)
  cot = np.asarray(s.cotangents, np.float64).reshape(N, D_OUT)
  return params, grads, stats, a, cot


def _factors(a, cot):
  g = N * cot
  return a.T @ a / N, g.T @ g / N, np.einsum("ni,no->nio", a, g).reshape(N, -1)


def _mean_eigenvalue(method, a, cot):
  big_a, big_g, psi = _factors(a, cot)
  if method == "foof":
    return np.trace(big_a) / len(big_a)
  if method.startswith("kfac"):
    return np.trace(big_a) / len(big_a) * np.trace(big_g) / len(big_g)
  return np.sum(psi * psi) / N / psi.shape[1]  # tr F / dim F, F = ΨᵀΨ/n


def _reference(method, a, cot, damping):
  """float64 directions from the formulas. (A + λI)⁻¹Āᵀ = Āᵀ(ĀĀᵀ + λI)⁻¹ is used where A + λI would
  have a condition number beyond float64's own precision at the smallest dampings."""
  big_a, big_g, psi = _factors(a, cot)
  gradient = a.T @ cot
  if method == "foof":
    return a.T @ np.linalg.solve(a @ a.T / N + damping * np.eye(N), cot)
  if method == "kfac_heuristic":
    pi = np.sqrt((np.trace(big_a) / len(big_a)) / (np.trace(big_g) / len(big_g)))
    left = a.T @ np.linalg.solve(a @ a.T / N + pi * np.sqrt(damping) * np.eye(N), cot)
    return left @ np.linalg.inv(big_g + np.sqrt(damping) / pi * np.eye(len(big_g)))
  if method == "kfac_standard":
    a_values, u_a = np.linalg.eigh(big_a)
    g_values, u_g = np.linalg.eigh(big_g)
    scale = np.outer(np.maximum(a_values, 0), np.maximum(g_values, 0)) + damping
    return u_a @ ((u_a.T @ gradient @ u_g) / scale) @ u_g.T
  # (F + λI)⁻¹ ∇ with F = ΨᵀΨ/n and ∇ = Ψᵀ1/n (the mean of the per-example gradients).
  return (psi.T @ np.linalg.solve(psi @ psi.T + N * damping * np.eye(N), np.ones(N))).reshape(gradient.shape)


def _transform(method, damping):
  return {
    "foof": lambda: nox.foof(damping, inverse_every=1),
    "kfac_heuristic": lambda: nox.kfac(damping, inverse_every=1),
    "kfac_standard": lambda: nox.kfac(damping, inverse_every=1, damping_mode="standard"),
    "natural_gradient": lambda: nox.natural_gradient(damping),
  }[method]()


def _direction(tx, params, grads, stats):
  updates, _ = jax.jit(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, tx.init(params), stats)
  jax.effects_barrier()  # the precision warning comes from a host callback
  layer = updates["layer"]
  return np.concatenate([np.asarray(layer["kernel"], np.float64), np.asarray(layer["bias"], np.float64)[None]])


_STEPS = {}


def _direction_at(method, damping, params, grads, stats):
  """:func:`_direction` of ``_transform(method, damping)``, the damping injected (``optax.inject_hyperparams``) so
  that one compiled step serves every damping and seed (the suite's time is compilation)."""
  if method not in _STEPS:
    kwargs = {"damping_mode": "standard"} if method == "kfac_standard" else {}
    make = {"foof": nox.foof, "kfac_heuristic": nox.kfac, "kfac_standard": nox.kfac}.get(method)
    if make is None:
      tx = optax.inject_hyperparams(nox.natural_gradient)(damping=1.0)
    else:
      tx = optax.inject_hyperparams(make, static_args=("inverse_every",))(damping=1.0, inverse_every=1, **kwargs)

    def step(damping, params, grads, stats):
      state = tx.init(params)
      state = state._replace(hyperparams={**state.hyperparams, "damping": damping})
      return tx.update(grads, state, params, stats=stats)[0]

    _STEPS[method] = jax.jit(step)
  updates = _STEPS[method](jnp.float32(damping), params, grads, stats)
  jax.effects_barrier()  # the precision warning comes from a host callback
  layer = updates["layer"]
  return np.concatenate([np.asarray(layer["kernel"], np.float64), np.asarray(layer["bias"], np.float64)[None]])


@pytest.mark.parametrize(
  "method, mean",
  [
    (method, mean)
    # Inputs of mean 2: KFAC's standard damping was 0.86 from float64 at relative dampings 1e-4 and 1e-6
    # when A⊗G's eigenvalues were all floored at one resolution set by the mean's direction (issue 27).
    if (method, mean) in {("foof", 0.0), ("kfac_heuristic", 0.0), ("kfac_standard", 2.0)}
    else pytest.param(method, mean, marks=pytest.mark.slow)
    for method in ["foof", "kfac_heuristic", "kfac_standard", "natural_gradient"]
    for mean in [0.0, 1.0, 2.0]
  ],
)
def test_float32_directions_match_float64_on_the_same_rows(method, mean):
  for seed in range(2):
    params, grads, stats, a, cot = _recorded(seed, mean)
    scale = _mean_eigenvalue(method, a, cot)
    for relative in RELATIVE_DAMPINGS:
      damping = relative * scale
      precision._WARNED.clear()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _direction_at(method, damping, params, grads, stats)
      expected = _reference(method, a, cot, damping)
      error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
      warned = [w for w in caught if issubclass(w.category, nox.PrecisionWarning)]
      assert np.all(np.isfinite(got))
      if relative >= ACCURATE_DOWN_TO or not warned:
        assert error < 1e-2, (method, relative, error)
      else:  # below the guarantee: accurate, or a warning that names the layer
        assert all("'layer" in str(w.message) for w in warned)


@pytest.mark.slow
@pytest.mark.parametrize("method, rows", [("kfac_heuristic", 16), ("kfac_standard", 64)])
def test_float32_kfac_with_non_centred_inputs_holds_the_documented_bound(method, rows, monkeypatch):
  """Inputs of mean 2 and more rows than the issue's case: within 1e-2 of float64 down to relative damping
  1e-4, the documented bound for non-centred inputs (measured at 1e-6: up to 3e-2). Standard KFAC was 0.4-0.6
  here at 1e-4 with the single Kronecker floor."""
  monkeypatch.setattr(sys.modules[__name__], "N", rows)
  params, grads, stats, a, cot = _recorded(0, mean=2.0)
  damping = 1e-4 * _mean_eigenvalue(method, a, cot)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", nox.PrecisionWarning)
    got = _direction(_transform(method, float(damping)), params, grads, stats)
  expected = _reference(method, a, cot, damping)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2


def test_float32_natural_gradient_of_a_rescaled_or_changed_gradient():
  """The recorded part of the incoming gradient is preconditioned without cancellation, the rest by
  the Woodbury form: a rescaled gradient (clipping) stays accurate at small damping, and any other
  incoming gradient gives the exact (F + λI)⁻¹∇ (float64 check in test_optax_contract)."""
  params, grads, stats, a, cot = _recorded(0)
  damping = 1e-6 * _mean_eigenvalue("natural_gradient", a, cot)
  tx = nox.natural_gradient(float(damping))
  half = jax.tree.map(lambda g: 0.5 * g, grads)
  got = _direction(tx, params, half, stats)
  expected = 0.5 * _reference("natural_gradient", a, cot, damping)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2


def test_precision_warning_names_the_layer_once_per_process():
  params, grads, stats, a, cot = _recorded(0)
  tx = nox.foof(float(1e-8 * _mean_eigenvalue("foof", a, cot)), inverse_every=1)
  precision._WARNED.clear()
  with pytest.warns(nox.PrecisionWarning, match=r"foof: layer 'layer': the damping .* float resolution"):
    _direction(tx, params, grads, stats)
  with warnings.catch_warnings():
    warnings.simplefilter("error", nox.PrecisionWarning)
    _direction(tx, params, grads, stats)  # the same layer is not warned about again


def test_no_precision_warning_at_an_ordinary_damping():
  params, grads, stats, _, _ = _recorded(0)
  precision._WARNED.clear()
  with warnings.catch_warnings():
    warnings.simplefilter("error", nox.PrecisionWarning)
    for method in ["foof", "kfac_heuristic", "kfac_standard", "natural_gradient"]:
      _direction(_transform(method, 0.1), params, grads, stats)


def test_damped_inverse_raises_unresolved_eigenvalues_to_the_resolution(x64):
  """float64: Cholesky (exact) where λ resolves the matrix; below it, eigenvalues of M + λI under
  τ = RESOLUTION·ε·max μ are raised to τ and τ is reported."""
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(3, 6))
  matrix = rows.T @ rows  # rank 3
  evals, evecs = np.linalg.eigh(matrix)
  tau = linalg.RESOLUTION * np.finfo(np.float64).eps * evals.max()
  for damping in (1.0, 1e-20):
    inverse, floor = jax.jit(lambda m, d: linalg.damped_inverse(m, d, return_floor=True))(matrix, damping)
    divisors = np.maximum(np.maximum(evals, 0) + damping, tau)
    np.testing.assert_allclose(inverse, (evecs / divisors) @ evecs.T, rtol=1e-9)
    assert float(floor) == (0.0 if damping == 1.0 else pytest.approx(tau))
    solved = linalg.damped_solve(matrix, damping, np.ones(6))
    np.testing.assert_allclose(solved, inverse @ np.ones(6), rtol=1e-9)
  # Kronecker eigenvalue divisors get the same floor, at the resolution of A⊗G.
  g_values = np.array([0.0, 2.0])
  assert float(linalg.kronecker_floor(jnp.asarray(evals), jnp.asarray(g_values), 1.0)) == 0.0
  kron_tau = linalg.RESOLUTION * np.finfo(np.float64).eps * evals.max() * 2.0
  assert float(linalg.kronecker_floor(jnp.asarray(evals), jnp.asarray(g_values), 1e-20)) == pytest.approx(kron_tau)
