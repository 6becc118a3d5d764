"""Batched damped solves and the grouping of re-factorisations by shape (float64 NumPy references)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neuron_optax._src import factorisation as _factors
from neuron_optax._src import linalg


@pytest.fixture(autouse=True)
def _float64(x64):
  yield


def _psd(rng, d):
  x = rng.normal(size=(3 * d, d))
  return x.T @ x / (3 * d)


def test_batched_damped_inverse_matches_numpy_per_matrix_damping():
  rng = np.random.default_rng(0)
  stack = np.stack([_psd(rng, 4) for _ in range(3)])
  dampings = np.array([0.1, 1.0, 3.0])
  got = jax.jit(linalg.damped_inverse)(stack, dampings)
  for matrix, damping, inverse in zip(stack, dampings, got):
    np.testing.assert_allclose(inverse, np.linalg.inv(matrix + damping * np.eye(4)), rtol=1e-12)
  # A scalar damping broadcasts over the stack; a vector right-hand side per matrix.
  rhs = rng.normal(size=(3, 4))
  solved = linalg.damped_solve(stack, 0.5, rhs)
  for matrix, b, x in zip(stack, rhs, solved):
    np.testing.assert_allclose(x, np.linalg.solve(matrix + 0.5 * np.eye(4), b), rtol=1e-12)


def test_batched_fallback_when_one_cholesky_fails():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  broken = (q * np.array([-1e-3, 1.0, 2.0, 3.0])) @ q.T  # "PSD" gone slightly indefinite
  healthy = _psd(rng, 4)
  got = jax.jit(linalg.damped_inverse)(np.stack([healthy, broken]), 1e-4)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got[0], np.linalg.inv(healthy + 1e-4 * np.eye(4)), rtol=1e-8)
  clamped = np.maximum(np.array([-1e-3, 1.0, 2.0, 3.0]) + 1e-4, 1e-4)
  np.testing.assert_allclose(got[1], (q / clamped) @ q.T, rtol=1e-8)


def test_factorise_by_shape_batches_equal_shapes_once(monkeypatch):
  rng = np.random.default_rng(2)
  operands = {"a": (_psd(rng, 3),), "b": (_psd(rng, 5),), "c": (_psd(rng, 3),), "d": (_psd(rng, 3),)}
  calls = []

  def inverse(stack):
    calls.append(stack.shape)
    return linalg.damped_inverse(stack, 1.0)

  got = _factors.factorise_by_shape(inverse, operands)
  assert sorted(calls) == [(3, 3)] * 3 + [(5, 5)]  # CPU: one matrix per call (see _one_by_one_on_cpu)
  calls.clear()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  got = _factors.factorise_by_shape(inverse, operands)
  assert sorted(calls) == [(1, 5, 5), (3, 3, 3)]
  for name, (matrix,) in operands.items():
    np.testing.assert_allclose(got[name], np.linalg.inv(matrix + np.eye(len(matrix))), rtol=1e-12)
  eigen = _factors.factorise_by_shape(linalg.sym_eigh, operands)
  values, vectors = eigen["c"]
  np.testing.assert_allclose((vectors * values) @ vectors.T, operands["c"][0], atol=1e-12)


def test_distribute_factorisations_is_validated():
  import neuron_optax as nox

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(ValueError, match="axis 'model'"):
    nox.foof(1.0, distribute_factorisations=(mesh, "model"))
  with pytest.raises(ValueError, match=r"\(jax.sharding.Mesh, axis name\)"):
    nox.kfac(1.0, distribute_factorisations="data")
  # A one-device mesh is valid and gives the undistributed result.
  operands = {"a": (jnp.eye(3) * 2.0,), "b": (jnp.eye(3) * 4.0,)}
  got = _factors.factorise_by_shape(lambda s: linalg.damped_inverse(s, 1.0), operands, (mesh, "data"))
  np.testing.assert_allclose(got["b"], np.eye(3) / 5.0, rtol=1e-14)
