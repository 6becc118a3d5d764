"""Small dampings with the KL constraint on Flax's official MNIST CNN (issue 27, item 1).

``kfac(1e-3)`` and ``foof(1e-3)`` before ``optax.sgd(0.1, momentum=0.9)`` diverge within a few steps; wrapped in
``nox.norm_constrained(..., max_kl=κ, learning_rate=0.1)`` they stay finite. This script measures whether they then
train as well as SGD, on the official CNN at its official width (Conv32, Conv64, Dense256) and config
(``sgd(0.1, momentum=0.9)``, batch 128), in its linen form and its NNX form (BatchNorm, Dropout). The model
definitions and the ``# nox``-marked train steps are imported from ``tests/test_official_examples.py`` (one
place), at the official width.

Protocol, on ``data.load("mnist_subset")`` (5,000 images) split once into train / validation / test
(3000/1000/1000 by default):

1. **bare**: each preconditioner without the constraint, one epoch on seed 0: the first step whose loss is not
   finite (or 10x the first), and whether ``nox.DivergenceWarning`` fired (its message names the step).
2. **tune**: SGD+M alone and each guarded method for every ``κ`` of the grid on the tuning seed (0), scored by
   validation accuracy; the chosen ``κ`` and whether it lies strictly inside the grid. ``κ`` is a state
   hyperparameter (``optax.inject_hyperparams``), so one compiled step serves the whole grid. Each run records the
   constraint's scale ``ν`` at every step (its median and the fraction of steps with ``ν < 1``).
3. **test**: SGD+M and both guarded methods at their chosen ``κ`` on seeds nobody tuned on (1, 2, 3): held-out
   test accuracy, mean ± std. A seed sets the initialisation, the shuffling and NNX's dropout. NNX runs also
   report the accuracy with BatchNorm on the evaluated split's own statistics (``*_accuracy_batch_stats``), which
   separates the preconditioner from the lag of BatchNorm's running averages in a short run.
4. **timing** (linen, ``--timing-steps``): per-step time of the guarded vs the bare preconditioner, steps
   interleaved on the same batches (damping 1.0, where neither diverges, so both run the same arithmetic).

Outputs: ``benchmarks/results/safeguard_mnist[_quick].json`` (everything, per-step losses and ``ν`` included,
with the machine) and ``.csv`` (one row per run). Results are written after every run.

    python benchmarks/safeguard_mnist.py --quick     # 1 epoch, kfac only, linen, 2 values of κ
    python benchmarks/safeguard_mnist.py             # the table of docs/hyperparameters.md
    python benchmarks/safeguard_mnist.py --apis nnx --phases test --kappa-for kfac=1e-5,foof=3.16e-5 \
        --timing-steps 0 --output safeguard_mnist_nnx_batch_stats      # its BatchNorm row
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(_HERE, "..", "tests"))

import common  # noqa: E402
import test_official_examples as official  # noqa: E402  (the official models and train steps, one place)

import neuron_optax as nox  # noqa: E402
from neuron_optax.examples import data as nox_data  # noqa: E402

OFFICIAL_FEATURES = (32, 64, 256)  # Flax's MNIST CNN: Conv32, Conv64, Dense256
LEARNING_RATE, MOMENTUM = official.LEARNING_RATE, official.MOMENTUM  # the official linen config: 0.1, 0.9
PRECONDITIONERS = {"kfac": nox.kfac, "foof": nox.foof}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="1 epoch, linen, kfac, κ in {1e-3, 1e-2}")
  parser.add_argument("--apis", default="linen,nnx")
  parser.add_argument("--methods", default="kfac,foof")
  parser.add_argument("--damping", type=float, default=1e-3)
  parser.add_argument("--inverse-every", type=int, default=None, help="the preconditioners' T (default: theirs)")
  parser.add_argument("--kappas", default=None, help="comma-separated; default 1e-6 ... 1e-3 in steps of x√10")
  parser.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 1)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--split", default="3000,1000,1000", help="train,validation,test sizes")
  parser.add_argument("--tune-seed", type=int, default=0)
  parser.add_argument("--test-seeds", default="1,2,3")
  parser.add_argument("--phases", default="bare,tune,test", help="which of bare, tune, test to run")
  parser.add_argument("--kappa-for", default=None, help="without tune: method=κ,... e.g. kfac=1e-5,foof=3.16e-5")
  parser.add_argument("--timing-steps", type=int, default=None, help="interleaved timed steps each (default 20)")
  parser.add_argument("--output", default=None, help="results basename (default safeguard_mnist[_quick])")
  parser.add_argument("--output-dir", default=os.path.join(_HERE, "results"))
  args = parser.parse_args(argv)
  args.apis = args.apis.split(",")
  args.methods = args.methods.split(",")
  if args.quick:
    args.apis, args.methods = ["linen"], ["kfac"]
  args.epochs = args.epochs or (1 if args.quick else 3)
  if args.kappas:
    args.kappas = [float(x) for x in args.kappas.split(",")]
  else:
    args.kappas = [1e-3, 1e-2] if args.quick else [float(f"{x:.3g}") for x in np.logspace(-6, -3, 7)]
  args.split = [int(x) for x in args.split.split(",")]
  args.phases = args.phases.split(",")
  args.kappa_for = {k: float(v) for k, v in (x.split("=") for x in args.kappa_for.split(","))} if args.kappa_for else {}
  args.test_seeds = [] if args.quick else [int(x) for x in args.test_seeds.split(",")]
  args.timing_steps = args.timing_steps if args.timing_steps is not None else (5 if args.quick else 20)
  args.output = args.output or ("safeguard_mnist_quick" if args.quick else "safeguard_mnist")
  return args


def load_splits(sizes):
  dataset = nox_data.load("mnist_subset", layout="nhwc")
  order = np.random.default_rng(0).permutation(len(dataset.labels))
  splits, start = [], 0
  for size in sizes:
    index = order[start : start + size]
    splits.append({"image": dataset.images[index], "label": dataset.labels[index]})
    start += size
  return splits


def epoch_batches(train, batch_size, rng):
  """The official example's epoch: a fresh permutation, the last partial batch dropped."""
  order = rng.permutation(len(train["label"]))
  for start in range(0, len(order) - batch_size + 1, batch_size):
    index = order[start : start + batch_size]
    yield {k: v[index] for k, v in train.items()}


# --------------------------------------------------------------------------- #
# One training run: the official train steps of tests/test_official_examples.py
# --------------------------------------------------------------------------- #


class Linen:
  """linen + ``TrainState`` (the pre-NNX official example)."""

  def __init__(self):
    self.cnn = official.CNN(features=OFFICIAL_FEATURES)
    self.logits = jax.jit(lambda params, images: self.cnn.apply({"params": params}, images))

  def start(self, tx, seed):
    params = self.cnn.init(jax.random.key(seed), jnp.ones([1, 28, 28, 1]))["params"]
    return train_state.TrainState.create(apply_fn=self.cnn.apply, params=params, tx=tx)

  def opt_state(self, run):
    return run.opt_state

  def set_opt_state(self, run, opt_state):
    return run.replace(opt_state=opt_state)

  def step(self, run, batch):
    grads, stats, loss, _ = official.apply_model(run, batch["image"], batch["label"])
    return official.update_model(run, grads, stats), loss

  def accuracy(self, run, split):
    return float(jnp.mean(jnp.argmax(self.logits(run.params, split["image"]), -1) == split["label"]))


class Nnx:
  """NNX + ``nnx.Optimizer`` + ``nnx.MultiMetric`` (the current official example, BatchNorm and Dropout)."""

  def __init__(self):
    self.metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))

  def start(self, tx, seed):
    model = official.NnxCNN(rngs=nnx.Rngs(seed), features=OFFICIAL_FEATURES)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param), nnx.Rngs(seed)

  def opt_state(self, run):
    return run[1].opt_state

  def set_opt_state(self, run, opt_state):
    return run  # the NNX state is set in place (see set_kappa)

  def step(self, run, batch):
    model, optimizer, rngs = run
    model.train()
    self.metrics.reset()
    official.train_step(model, optimizer, self.metrics, batch, rngs)
    return run, self.metrics.compute()["loss"]

  def accuracy(self, run, split):
    model = run[0]
    model.eval()
    self.metrics.reset()
    official.eval_step(model, self.metrics, split)
    return float(self.metrics.compute()["accuracy"])

  def batch_stats_accuracy(self, run, split):
    """Accuracy with BatchNorm normalising by the split's own statistics: without the lag of the running
    averages (momentum 0.99, a ~100-step memory, longer than these runs). A diagnostic, after ``accuracy``."""
    model = run[0]
    model.set_attributes(deterministic=True, use_running_average=False)
    logits = model(split["image"], None)
    return float(jnp.mean(jnp.argmax(logits, -1) == split["label"]))


def value(x):
  return float(x[...]) if isinstance(x, nnx.Variable) else float(x)


def set_kappa(api, run, kappa):
  """Writes ``κ`` into the injected hyperparameters of the chain's first state (the guarded transform's)."""
  opt_state = api.opt_state(run)
  hyperparams = opt_state[0].hyperparams
  if isinstance(hyperparams["max_kl"], nnx.Variable):
    hyperparams["max_kl"][...] = jnp.asarray(kappa, jnp.float32)
    return run
  hyperparams = dict(hyperparams, max_kl=jnp.asarray(kappa, jnp.float32))
  return api.set_opt_state(run, (opt_state[0]._replace(hyperparams=hyperparams),) + tuple(opt_state[1:]))


def train(api, tx, seed, epochs, train_split, eval_splits, batch_size, kappa=None, stop_when_diverged=False):
  """One run: per-step losses (and ``ν`` for a guarded run), accuracy on each evaluation split, seconds."""
  started = time.perf_counter()
  run = api.start(tx, seed)
  if kappa is not None:
    run = set_kappa(api, run, kappa)
  rng = np.random.default_rng(seed)
  losses, scales = [], []
  for _ in range(epochs):
    for batch in epoch_batches(train_split, batch_size, rng):
      run, loss = api.step(run, batch)
      losses.append(float(loss))
      if kappa is not None:
        scales.append(value(api.opt_state(run)[0].inner_state.scale))
      if stop_when_diverged and (not np.isfinite(losses[-1]) or losses[-1] > 1e3 * losses[0]):
        break
  result = {"losses": losses, "seconds": time.perf_counter() - started}
  result.update({f"{name}_accuracy": api.accuracy(run, split) for name, split in eval_splits.items()})
  if hasattr(api, "batch_stats_accuracy"):
    result.update({f"{k}_accuracy_batch_stats": api.batch_stats_accuracy(run, v) for k, v in eval_splits.items()})
  if kappa is not None:
    scales = np.asarray(scales)
    result.update(
      scales=scales.tolist(),
      median_scale=float(np.median(scales)),
      constrained_fraction=float(np.mean(scales < 1)),
    )
  return result


def guarded_tx(method, damping, inverse_every):
  # κ is a state hyperparameter: one compiled step (and one tx object, jit's static argument) for the whole grid.
  preconditioner = PRECONDITIONERS[method](damping, inverse_every=inverse_every)
  guarded = optax.inject_hyperparams(nox.norm_constrained, static_args=("learning_rate",))(
    preconditioner, max_kl=1.0, learning_rate=LEARNING_RATE
  )
  return optax.chain(guarded, optax.sgd(LEARNING_RATE, MOMENTUM))


def first_step(losses, predicate):
  return next((i for i, x in enumerate(losses) if predicate(x)), None)


# --------------------------------------------------------------------------- #
# Timing: guarded vs bare, interleaved
# --------------------------------------------------------------------------- #


def lockstep_timing(method, steps, train_split, batch_size, inverse_every):
  api = Linen()
  bare = api.start(optax.chain(PRECONDITIONERS[method](1.0, inverse_every=inverse_every), optax.sgd(0.1, 0.9)), 0)
  guarded = api.start(
    optax.chain(
      nox.norm_constrained(PRECONDITIONERS[method](1.0, inverse_every=inverse_every), 3e-4, learning_rate=0.1),
      optax.sgd(0.1, 0.9),
    ),
    0,
  )
  batches = list(epoch_batches(train_split, batch_size, np.random.default_rng(0)))
  runs = {"bare": bare, "guarded": guarded}
  times = {"bare": [], "guarded": []}
  for i in range(steps + 2):  # two warm-up steps each (compilation, the first re-factorisation)
    for name in ("bare", "guarded") if i % 2 == 0 else ("guarded", "bare"):
      start = time.perf_counter()
      runs[name], loss = api.step(runs[name], batches[i % len(batches)])
      jax.block_until_ready((runs[name].params, loss))
      if i >= 2:
        times[name].append(time.perf_counter() - start)
  medians = {k: float(np.median(v)) for k, v in times.items()}
  return {
    "method": method,
    "damping": 1.0,
    "steps": steps,
    "median_seconds": medians,
    "ratio_guarded_over_bare": medians["guarded"] / medians["bare"],
  }


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def summarise(runs):
  return {"mean": float(np.mean(runs)), "std": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0, "n": len(runs)}


def write(result, args):
  base = os.path.join(args.output_dir, args.output)
  os.makedirs(args.output_dir, exist_ok=True)
  with open(base + ".json", "w") as f:
    json.dump(result, f, indent=1, default=float)
  fields = ["api", "phase", "method", "kappa", "seed", "validation_accuracy", "test_accuracy", "final_loss"]
  fields += ["test_accuracy_batch_stats", "median_scale", "constrained_fraction", "first_nonfinite_step", "warned"]
  fields += ["seconds"]
  with open(base + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fields, extrasaction="ignore")
    writer.writeheader()
    for row in result["runs"]:
      losses = row.get("losses") or [float("nan")]
      writer.writerow({**row, "final_loss": losses[-1]})


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  started = time.perf_counter()
  train_split, validation, test = load_splits(args.split)
  result: dict[str, Any] = {
    "machine": common.machine_info(),
    "settings": {
      "features": OFFICIAL_FEATURES,
      "learning_rate": LEARNING_RATE,
      "momentum": MOMENTUM,
      "damping": args.damping,
      "inverse_every": args.inverse_every,
      "batch_size": args.batch_size,
      "epochs": args.epochs,
      "split": args.split,
      "kappas": args.kappas,
      "tune_seed": args.tune_seed,
      "test_seeds": args.test_seeds,
    },
    "runs": [],
    "chosen": {},
    "summary": {},
  }

  def record(row):
    result["runs"].append(row)
    result["total_seconds"] = time.perf_counter() - started
    write(result, args)
    shown = {k: v for k, v in row.items() if k not in ("losses", "scales")}
    print(f"[{result['total_seconds']:6.0f} s] {shown}", flush=True)

  sgd = lambda: optax.sgd(LEARNING_RATE, MOMENTUM)  # noqa: E731
  for api_name in args.apis:
    api = {"linen": Linen, "nnx": Nnx}[api_name]()
    # 1. bare: diverges, warns
    for method in args.methods if "bare" in args.phases else []:
      tx = optax.chain(PRECONDITIONERS[method](args.damping, inverse_every=args.inverse_every), sgd())
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train(api, tx, args.tune_seed, 1, train_split, {"validation": validation}, args.batch_size,
                    stop_when_diverged=True)  # fmt: skip
        jax.effects_barrier()
      messages = [str(w.message) for w in caught if issubclass(w.category, nox.DivergenceWarning)]
      losses = run["losses"]
      record({
        "api": api_name, "phase": "bare", "method": method, "seed": args.tune_seed, **run,
        "first_nonfinite_step": first_step(losses, lambda x: not np.isfinite(x)),
        "first_step_above_10x": first_step(losses, lambda x, first=losses[0]: not x < 10 * first),
        "warned": bool(messages), "warning": messages[0] if messages else None,
      })  # fmt: skip
    # 2. tune κ on the validation split
    evals = {"validation": validation}
    txs = {method: guarded_tx(method, args.damping, args.inverse_every) for method in args.methods}
    for method, kappa in args.kappa_for.items():
      result["chosen"][f"{api_name}/{method}"] = {"kappa": kappa, "given": True}
    if "tune" in args.phases:
      record({"api": api_name, "phase": "tune", "method": "sgd", "seed": args.tune_seed,
            **train(api, sgd(), args.tune_seed, args.epochs, train_split, evals, args.batch_size)})  # fmt: skip
    for method in args.methods if "tune" in args.phases else []:
      scores = {}
      for kappa in args.kappas:
        run = train(api, txs[method], args.tune_seed, args.epochs, train_split, evals, args.batch_size, kappa)
        scores[kappa] = run["validation_accuracy"] if np.isfinite(run["losses"]).all() else -1.0
        record({"api": api_name, "phase": "tune", "method": method, "kappa": kappa, "seed": args.tune_seed, **run})
      best = max(scores, key=scores.get)
      result["chosen"][f"{api_name}/{method}"] = {
        "kappa": best,
        "validation_accuracy": scores[best],
        "strictly_inside_grid": args.kappas.index(best) not in (0, len(args.kappas) - 1),
        "scores": scores,
      }
    # 3. test on untouched seeds
    for seed in args.test_seeds if "test" in args.phases else []:
      evals = {"validation": validation, "test": test}
      record({"api": api_name, "phase": "test", "method": "sgd", "seed": seed,
              **train(api, sgd(), seed, args.epochs, train_split, evals, args.batch_size)})  # fmt: skip
      for method in args.methods:
        kappa = result["chosen"][f"{api_name}/{method}"]["kappa"]
        run = train(api, txs[method], seed, args.epochs, train_split, evals, args.batch_size, kappa)
        record({"api": api_name, "phase": "test", "method": method, "kappa": kappa, "seed": seed, **run})
    for method in ["sgd", *args.methods]:
      accuracies = [
        r["test_accuracy"]
        for r in result["runs"]
        if r["api"] == api_name and r["phase"] == "test" and r["method"] == method
      ]
      if accuracies:
        result["summary"][f"{api_name}/{method}"] = summarise(accuracies)
  # 4. per-step cost of the constraint
  if args.timing_steps:
    result["timing"] = [
      lockstep_timing(m, args.timing_steps, train_split, args.batch_size, args.inverse_every) for m in args.methods
    ]
  result["total_seconds"] = time.perf_counter() - started
  write(result, args)
  print(
    json.dumps({"chosen": result["chosen"], "summary": result["summary"], "timing": result.get("timing")}, indent=1)
  )
  return result


if __name__ == "__main__":
  main()
