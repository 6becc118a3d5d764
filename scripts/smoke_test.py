"""Smoke test of every transform with linen and NNX capture, for checking dependency versions.

``python scripts/smoke_test.py`` trains a tiny convolutional classifier for a few steps with each
transform -- FOOF, KFAC (heuristic and standard damping), the exact natural gradient, FNGD -- once
captured with ``nox.value_grad_and_stats`` (flax.linen) and once with ``nox.nnx.value_grad_and_stats``
(flax.nnx, through ``nnx.Optimizer``), and checks that every loss is finite and that the loss on the
whole (synthetic) training set decreases. FOOF and KFAC also run with their factorisations
distributed over a 2-device CPU mesh (``jax.shard_map``), and FOOF runs inside the optax wrappers
the README says compose (``inject_hyperparams`` with a schedule, ``masked``, ``multi_transform``,
``MultiSteps``, ``apply_if_finite``), which must forward ``stats=``. It runs every check, then exits
non-zero if any failed.

It needs only the package's runtime dependencies (jax, optax, flax) and no data files; it runs on
the CPU in about a minute. ``scripts/check_version_floors.sh`` runs it against the lowest
versions that ``pyproject.toml`` allows.
"""

from __future__ import annotations

import os

# Two host devices for the distributed factorisations; must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import importlib.metadata  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import neuron_optax as nox  # noqa: E402

N, BATCH, CLASSES, SIDE = 128, 32, 4, 6
STEPS_PER_EPOCH = N // BATCH
STEPS = 3 * STEPS_PER_EPOCH  # FNGD computes its coefficients in the first epoch and reuses them after


def make_data(seed: int = 0):
  """Images ``(N, SIDE, SIDE, 1)`` labelled by a random linear teacher."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(N, SIDE, SIDE, 1)).astype(np.float32)
  teacher = rng.normal(size=(SIDE * SIDE, CLASSES)).astype(np.float32)
  labels = np.argmax(images.reshape(N, -1) @ teacher, axis=-1).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


# --------------------------------------------------------------------------- #
# The transforms: (name, fisher, optax chain). Small, conservative settings.
# --------------------------------------------------------------------------- #


def transforms(mesh: jax.sharding.Mesh | None) -> list[tuple[str, str, optax.GradientTransformation]]:
  def sgd(lr):
    return optax.sgd(lr, momentum=0.9)

  configs = [
    ("foof", "empirical", optax.chain(nox.foof(1.0, inverse_every=3, stats_window=2), sgd(0.05))),
    ("kfac heuristic", "mc", optax.chain(nox.kfac(1.0, inverse_every=3), sgd(0.05))),
    ("kfac standard", "full", optax.chain(nox.kfac(1.0, damping_mode="standard", inverse_every=3), sgd(0.05))),
    ("natural_gradient", "mc", optax.chain(nox.natural_gradient(1.0), sgd(0.05))),
    ("natural_gradient block", "empirical", optax.chain(nox.natural_gradient(1.0, block_diagonal=True), sgd(0.05))),
    (
      "fngd",
      "empirical",
      optax.chain(nox.fngd(1.0, steps_per_epoch=STEPS_PER_EPOCH, batch_size=BATCH), sgd(0.05)),
    ),
  ]
  if mesh is not None:
    distribute = (mesh, "data")
    configs += [
      ("foof distributed", "empirical", optax.chain(nox.foof(1.0, distribute_factorisations=distribute), sgd(0.05))),
      (
        "kfac standard distributed",
        "mc",
        optax.chain(nox.kfac(1.0, damping_mode="standard", distribute_factorisations=distribute), sgd(0.05)),
      ),
    ]
  return configs


def _likelihood(fisher: str) -> str | None:
  return None if fisher == "empirical" else "categorical"


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------------------- #
# flax.linen
# --------------------------------------------------------------------------- #


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16, name="hidden")(x))
    return nn.Dense(CLASSES, name="out")(x)


def train_linen(tx, fisher: str, images, labels) -> tuple[float, float, list[float]]:
  model = LinenNet()
  params = model.init(jax.random.key(0), images[:1])["params"]

  def loss_fn(params, x, y):
    return _xent(model.apply({"params": params}, x), y)

  capture = nox.value_grad_and_stats(loss_fn, fisher=fisher, likelihood=_likelihood(fisher))

  @jax.jit
  def step(params, opt_state, x, y, rng):
    kwargs = {"rng": rng} if fisher == "mc" else {}
    loss, grads, stats = capture(params, x, y, **kwargs)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  full_loss = jax.jit(loss_fn)
  before = float(full_loss(params, images, labels))
  opt_state = tx.init(params)
  losses = []
  for i in range(STEPS):
    batch = slice((i % STEPS_PER_EPOCH) * BATCH, (i % STEPS_PER_EPOCH + 1) * BATCH)
    params, opt_state, loss = step(params, opt_state, images[batch], labels[batch], jax.random.key(i))
    losses.append(float(loss))
  return before, float(full_loss(params, images, labels)), losses


# --------------------------------------------------------------------------- #
# flax.nnx
# --------------------------------------------------------------------------- #


class NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.layers = nnx.List([nnx.Linear(SIDE * SIDE * 4, 16, rngs=rngs), nnx.Linear(16, CLASSES, rngs=rngs)])

  def __call__(self, x):
    x = jax.nn.relu(self.conv(x))
    x = x.reshape(x.shape[0], -1)
    return self.layers[1](jax.nn.relu(self.layers[0](x)))


def train_nnx(tx, fisher: str, images, labels) -> tuple[float, float, list[float]]:
  model = NnxNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, x, y):
    return _xent(model(x), y)

  capture = nox.nnx.value_grad_and_stats(loss_fn, fisher=fisher, likelihood=_likelihood(fisher))

  @nnx.jit
  def step(model, optimizer, x, y, rng):
    kwargs = {"rng": rng} if fisher == "mc" else {}
    loss, grads, stats = capture(model, x, y, **kwargs)
    optimizer.update(model, grads, stats=stats)
    return loss

  full_loss = nnx.jit(loss_fn)
  before = float(full_loss(model, images, labels))
  losses = []
  for i in range(STEPS):
    batch = slice((i % STEPS_PER_EPOCH) * BATCH, (i % STEPS_PER_EPOCH + 1) * BATCH)
    losses.append(float(step(model, optimizer, images[batch], labels[batch], jax.random.key(i))))
  return before, float(full_loss(model, images, labels)), losses


# --------------------------------------------------------------------------- #
# optax wrappers: they must forward `stats=` to the transform (the README's optax contract)
# --------------------------------------------------------------------------- #


def compositions(params) -> dict[str, optax.GradientTransformation]:
  """FOOF inside each optax wrapper the README promises composes; the conv layer is left to Adam/unmasked."""
  not_conv = {name: jax.tree.map(lambda _: name != "conv", layer) for name, layer in params.items()}
  labels = {name: jax.tree.map(lambda _: "adam" if name == "conv" else "foof", layer) for name, layer in params.items()}
  return {
    "optax.inject_hyperparams": optax.inject_hyperparams(nox.foof, static_args=("inverse_every",))(
      damping=optax.linear_schedule(1.0, 0.5, 4), inverse_every=2
    ),
    "optax.masked": optax.masked(nox.foof(1.0), not_conv),
    "optax.multi_transform": optax.multi_transform({"foof": nox.foof(1.0), "adam": optax.adam(1e-3)}, labels),
    "optax.MultiSteps": optax.MultiSteps(nox.foof(1.0), every_k_schedule=2),
    "optax.apply_if_finite": optax.apply_if_finite(nox.foof(1.0), max_consecutive_errors=3),
  }


def check_compositions(images, labels) -> list[bool]:
  model = LinenNet()
  params = model.init(jax.random.key(0), images[:1])["params"]

  def loss_fn(params, x, y):
    return _xent(model.apply({"params": params}, x), y)

  _, grads, stats = jax.jit(nox.value_grad_and_stats(loss_fn))(params, images[:BATCH], labels[:BATCH])
  results = []
  for name, tx in compositions(params).items():
    try:
      update = jax.jit(tx.update)
      state = tx.init(params)
      for _ in range(2):  # MultiSteps applies the accumulated update at the second
        updates, state = update(grads, state, params, stats=stats)
      leaves = jax.tree.leaves(updates)
      ok = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves) and any(
        bool(jnp.any(leaf != 0)) for leaf in leaves
      )
      message = "finite, non-zero updates" if ok else "non-finite or all-zero updates"
    except Exception as error:
      ok, message = False, f"{type(error).__name__}: {error}"
    print(f"{'ok  ' if ok else 'FAIL'} linen foof inside {name:24s} {message}", flush=True)
    results.append(ok)
  return results


# --------------------------------------------------------------------------- #


def check(front_end: str, name: str, train: Callable, tx, fisher: str, images, labels) -> bool:
  start = time.perf_counter()
  try:
    before, after, losses = train(tx, fisher, images, labels)
  except Exception as error:  # report every failure, then exit non-zero
    print(f"FAIL {front_end:5s} {name:26s} {type(error).__name__}: {error}", flush=True)
    return False
  ok = all(math.isfinite(v) for v in [before, after, *losses]) and after < 0.95 * before
  print(
    f"{'ok  ' if ok else 'FAIL'} {front_end:5s} {name:26s} fisher={fisher:9s} "
    f"loss {before:.4f} -> {after:.4f} ({time.perf_counter() - start:.1f} s)",
    flush=True,
  )
  return ok


def _version(distribution: str) -> str:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def main() -> int:
  versions = ", ".join(
    f"{name} {_version(name)}" for name in ("jax", "jaxlib", "flax", "optax", "numpy", "neuron_optax")
  )
  print(f"python {sys.version.split()[0]}, {versions}", flush=True)
  images, labels = make_data()
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices[:2]), ("data",)) if len(devices) >= 2 else None
  if mesh is None:
    print("only one device: the distributed factorisations are not checked", flush=True)
  results = []
  for front_end, train in (("linen", train_linen), ("nnx", train_nnx)):
    for name, fisher, tx in transforms(mesh):
      results.append(check(front_end, name, train, tx, fisher, images, labels))
  results += check_compositions(images, labels)
  failed = results.count(False)
  print(f"{len(results) - failed}/{len(results)} passed", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
