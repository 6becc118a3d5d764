"""Cross-check of the Laplace posteriors against laplace-torch (float64).

Runs only where torch and laplace-torch are installed (``scripts/check_laplace_torch.sh``; the main test
environment does not install them, so this module is skipped there).

A tiny MLP (3 → 4 → 3 logits, tanh), the same weights in ``torch.nn.Sequential`` and in ``flax.linen``, 12 data
points, the whole data set as the Fisher batch (``n = N``) and the exact Fisher (``fisher="full"``), which for
softmax cross-entropy is the GGN laplace-torch builds (its default backend, ``CurvlinopsGGN``). The parameters are
random, not a MAP: both libraries evaluate the same formulas at the given ``θ*``. Compared, to 1e-10: the posterior
covariance of ``hessian_structure="full"``, ``"diag"`` and ``"kron"`` (ours: ``"full"``, ``"diagonal"``,
``"kfac"``), the log marginal likelihood at several prior precisions, and the GLM predictive with the probit and
Laplace-bridge link approximations.

Conventions mapped (read from laplace-torch 0.3's source):

- Curvature: laplace-torch's ``H`` is a **sum** over the data, ``Σ_i J_iᵀ H_i J_i`` (its loss has
  ``reduction="sum"``); ours is the per-example **mean** ``F`` times ``dataset_size = N``: ``H = N F``. Its
  posterior precision is ``H + τI`` (``prior_precision=τ``, temperature 1), ours ``τI + N F``.
- Kronecker factors: laplace-torch (curvlinops, ``separate_weight_and_bias=True``) factorises a layer's weight as
  ``B ⊗ A`` and its bias as a separate block ``B``; ours factorises weight and bias jointly through the augmented
  input ``ā = [a, 1]``. Both are ``A ⊗ G`` for bias-free layers, so ``"kron"`` is compared on the bias-free MLP.
  Its ``B`` is summed and ``A`` averaged over the data: ``B ⊗ A = N G ⊗ A``, our ``N A ⊗ G`` in the other
  ``vec`` order.
- Parameter order: torch's ``parameters_to_vector`` stacks ``weight`` ``(out, in)`` row-major then ``bias`` per
  layer; ours ravels the Flax tree (``kernel = weightᵀ``); the test maps one onto the other by a permutation.
- Evidence: laplace-torch's ``log_likelihood − ½(log_det_ratio + scatter)`` with ``log_likelihood = −Σ CE``
  equals ours with ``log_likelihood = −N · mean CE``.
- GLM predictive: ``la(x, pred_type="glm", link_approx=...)`` forms ``J Σ Jᵀ`` from explicit Jacobians; ours
  (``num_samples=None``) from one VJP per output and the posterior's covariance product. The bridge includes
  laplace-torch's zero-mean correction.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

torch = pytest.importorskip("torch")
laplace = pytest.importorskip("laplace")

import neuron_optax as nox  # noqa: E402

# Slow where torch is installed (~40 s of CPU, mostly laplace-torch's curvature backends).
pytestmark = [pytest.mark.usefixtures("x64"), pytest.mark.slow]

N, TAU = 12, 0.7
STRUCTURES = {"full": "full", "diag": "diagonal", "kron": "kfac"}


@pytest.fixture(scope="module", autouse=True)
def torch_float64():
  """laplace-torch builds its prior precision and some buffers in torch's default dtype."""
  previous = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  yield
  torch.set_default_dtype(previous)


class MLP(nn.Module):
  bias: bool = True

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, use_bias=self.bias, name="l2")(jnp.tanh(nn.Dense(4, use_bias=self.bias, name="l0")(x)))


@functools.cache
def setup(bias: bool):
  """The torch and Flax models with the same weights, the data, our stats and the torch → ours permutation."""
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(N, 3)), rng.integers(0, 3, N)
  net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=bias), torch.nn.Tanh(), torch.nn.Linear(4, 3, bias=bias))

  def as_tree(tensors):
    """Flax parameters from torch-layout arrays ``[W0, (b0), W2, (b2)]``."""
    tensors = list(tensors)
    tree = {}
    for name in ("l0", "l2"):
      tree[name] = {"kernel": jnp.asarray(tensors.pop(0)).T}
      if bias:
        tree[name]["bias"] = jnp.asarray(tensors.pop(0))
    return tree

  params = as_tree(p.detach().numpy() for p in net.parameters())
  sizes = [p.numel() for p in net.parameters()]
  index = np.arange(sum(sizes))
  parts = np.split(index, np.cumsum(sizes)[:-1])
  perm = np.asarray(ravel_pytree(as_tree(i.reshape(p.shape) for i, p in zip(parts, net.parameters())))[0])
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(MLP(bias).apply({"params": p}, x), y).mean()
  _, _, stats = nox.value_grad_and_stats(loss_fn, fisher="full", likelihood="categorical")(params)
  log_likelihood = -N * float(loss_fn(params))
  return net, params, (x, y), stats, perm.astype(int), log_likelihood


def fitted(bias: bool, structure: str):
  net, _, (x, y), *_ = setup(bias)
  data = torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y))
  la = laplace.Laplace(net, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=TAU)
  la.fit(torch.utils.data.DataLoader(data, batch_size=N))
  return la


def our_covariance(bias: bool, structure: str) -> np.ndarray:
  """``L Lᵀ`` of our sampler's noise-to-sample map (``L``: Jacobian of laplace_sample_from_noise)."""
  _, params, _, stats, _, _ = setup(bias)
  flat, unravel = ravel_pytree(params)
  m = 3 * N if structure == "full" else 0

  def sample(z):
    out = nox.laplace_sample_from_noise(
      params,
      stats,
      unravel(z[: flat.size]),
      z[flat.size :] if m else None,
      prior_precision=TAU,
      dataset_size=N,
      structure=structure,
    )
    return ravel_pytree(out)[0]

  root = np.asarray(jax.jacfwd(sample)(jnp.zeros(flat.size + m)))
  return root @ root.T


def their_covariance(la, structure: str) -> np.ndarray:
  precision = la.posterior_precision
  if structure == "diag":
    return np.diag(1 / precision.detach().numpy())
  if structure == "kron":
    precision = precision.to_matrix()
  return np.linalg.inv(precision.detach().numpy())


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_posterior_covariance(structure):
  bias = structure != "kron"
  perm = setup(bias)[4]
  theirs = their_covariance(fitted(bias, structure), structure)[np.ix_(perm, perm)]
  ours = our_covariance(bias, STRUCTURES[structure])
  np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10 * np.abs(theirs).max())


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_log_marginal_likelihood(structure):
  bias = structure != "kron"
  _, params, _, stats, _, log_likelihood = setup(bias)
  la = fitted(bias, structure)
  for tau in (0.05, TAU, 20.0):
    theirs = float(la.log_marginal_likelihood(torch.tensor(tau)))
    ours = nox.laplace_log_marginal_likelihood(
      params,
      stats,
      log_likelihood=log_likelihood,
      prior_precision=tau,
      dataset_size=N,
      structure=STRUCTURES[structure],
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, err_msg=f"tau={tau}")


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_glm_predictive(structure, link):
  bias = structure != "kron"
  _, params, (x, _), stats, _, _ = setup(bias)
  la = fitted(bias, structure)
  inputs = np.concatenate([x[:3], np.random.default_rng(1).normal(size=(3, 3))])
  theirs = la(torch.tensor(inputs), pred_type="glm", link_approx=link).detach().numpy()
  ours = nox.glm_predictive(
    lambda p: MLP(bias).apply({"params": p}, inputs),
    params,
    stats,
    prior_precision=TAU,
    dataset_size=N,
    structure=STRUCTURES[structure],
    link_approx=link,
  )
  np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-13)
