"""Steady-state step time of FNGD with shared coefficients versus SGD with momentum.

Measures, in one process and on the same device, the median time of a jit-compiled
training step (``block_until_ready`` after each step) of

* ``sgd``: ``jax.value_and_grad`` + ``optax.sgd(lr, momentum=0.9)``;
* ``fngd_shared``: ``nox.value_grad_and_stats`` + ``chain(fngd(α, shared), sgd)``,
  timed after the first epoch, when the coefficient table is reused;
* ``fngd_computing``: the step of a computing epoch (Gram matrix and Cholesky
  solve per layer inside the ``lax.cond`` branch), measured in steady state with
  ``refresh_every_epochs=1`` (every epoch computes), i.e. the first-epoch cost;
* ``fngd_unshared``: ``fngd(share_coefficients=False)`` (the paper's "w/o sharing").

The model is the MLP 784-1000-1000-1000-10 at batch 1000 (``--quick``: 784-256-256-10
at batch 256) on synthetic data. Every optimizer first runs one epoch (compilation,
FNGD's computing epoch); then the timings of all optimizers are interleaved in
short blocks so that load on the machine affects them alike.

On CPU, ``OPENBLAS_NUM_THREADS`` defaults to 1 here: jaxlib's LAPACK kernels
(the Cholesky factorisation) run on scipy's OpenBLAS, whose own threads compete
with XLA's thread pool; on a busy 2-core machine this made a 256x256 Cholesky
take 0.2 s instead of 0.3 ms. Set the variable to override. Prints the ratios and
writes ``benchmarks/results/fngd_step_time_<device>.json`` (``..._quick.json``).

Paper (FNGD, Table III): 1.03-1.06x the per-epoch time of SGD-m.

    python benchmarks/fngd_step_time.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neuron_optax import fngd, value_grad_and_stats  # noqa: E402


class MLP(nn.Module):
  widths: tuple[int, ...]
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.classes)(x)


def device_slug() -> str:
  device = jax.devices()[0]
  kind = device.device_kind if device.platform != "cpu" else "cpu"
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def make_steps(model, lr, alpha, steps_per_epoch, batch_size):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def sgd_step_fn(tx):
    def step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))

  def fngd_step_fn(tx):
    def step(params, opt_state, x, y):
      loss, grads, stats = value_grad_and_stats(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))

  sgd = optax.sgd(lr, momentum=0.9)
  shared = optax.chain(fngd(alpha, steps_per_epoch=steps_per_epoch, batch_size=batch_size), optax.sgd(lr, momentum=0.9))
  computing = optax.chain(
    fngd(alpha, steps_per_epoch=steps_per_epoch, batch_size=batch_size, refresh_every_epochs=1),
    optax.sgd(lr, momentum=0.9),
  )
  unshared = optax.chain(fngd(alpha, share_coefficients=False), optax.sgd(lr, momentum=0.9))
  return {
    "sgd": (sgd, sgd_step_fn(sgd)),
    "fngd_shared": (shared, fngd_step_fn(shared)),
    "fngd_computing": (computing, fngd_step_fn(computing)),
    "fngd_unshared": (unshared, fngd_step_fn(unshared)),
  }


class Runner:
  """One optimizer's params, state and step counter; times single steps."""

  def __init__(self, tx, step, params, data):
    self.step, self.data, self.count = step, data, 0
    self.params = jax.tree.map(jnp.copy, params)
    self.opt_state = tx.init(self.params)

  def run(self, num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
      x, y = self.data[self.count % len(self.data)]
      start = time.perf_counter()
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, x, y)
      jax.block_until_ready((self.params, self.opt_state, loss))
      times.append(time.perf_counter() - start)
      self.count += 1
    return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="784-256-256-10 at batch 256")
  parser.add_argument("--steps-per-epoch", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=None, help="interleaved timing blocks")
  parser.add_argument("--block", type=int, default=2, help="steps per timing block")
  parser.add_argument("--alpha", type=float, default=0.01)
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--output", default=None)
  args = parser.parse_args()

  widths, batch_size = ((256, 256), 256) if args.quick else ((1000, 1000, 1000), 1000)
  steps_per_epoch = args.steps_per_epoch or (4 if args.quick else 3)
  rounds = args.rounds or (20 if args.quick else 6)
  model = MLP(widths)
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * steps_per_epoch + 1)
  data = [
    (jax.random.normal(keys[2 * k], (batch_size, 784)), jax.random.randint(keys[2 * k + 1], (batch_size,), 0, 10))
    for k in range(steps_per_epoch)
  ]
  params = model.init(keys[-1], data[0][0][:1])["params"]
  steps = make_steps(model, args.lr, args.alpha, steps_per_epoch, batch_size)
  runners = {name: Runner(tx, step, params, data) for name, (tx, step) in steps.items()}

  for runner in runners.values():  # compilation and the first (computing) epoch
    runner.run(steps_per_epoch)

  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, runner in runners.items():
      times[name] += runner.run(args.block)
  medians = {name: statistics.median(t) for name, t in times.items()}
  ratios = {name: medians[name] / medians["sgd"] for name in medians if name != "sgd"}

  result = {
    "device": str(jax.devices()[0]),
    "device_kind": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "setting": "quick" if args.quick else "full",
    "model": "MLP 784-" + "-".join(map(str, widths)) + "-10",
    "batch_size": batch_size,
    "steps_per_epoch": steps_per_epoch,
    "alpha": args.alpha,
    "timed_steps": {name: len(t) for name, t in times.items()},
    "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    "median_step_seconds": medians,
    "ratio_to_sgd": ratios,
    "last_loss": {
      name: float(runner.step(runner.params, runner.opt_state, *data[0])[2]) for name, runner in runners.items()
    },
  }
  print(f"{result['model']}, batch {batch_size}, {result['device']}")
  for name, seconds in medians.items():
    ratio = "" if name == "sgd" else f"  ({ratios[name]:.2f}x sgd)"
    print(f"  {name:18s} {1e3 * seconds:9.2f} ms/step{ratio}")

  output = args.output or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "results",
    f"fngd_step_time_{device_slug()}{'_quick' if args.quick else ''}.json",
  )
  os.makedirs(os.path.dirname(output), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {output}")


if __name__ == "__main__":
  main()
