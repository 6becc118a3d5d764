"""LoRA-Laplace on scikit-learn's digits: a Laplace posterior over the adapters of a LoRA fine-tune only.

Setup (float64). The digits split of ``benchmarks/laplace.py --calibration`` (``split(0.2)`` test, then
``split(0.15)`` validation of the rest). An NNX MLP 64-64-64-10 (ReLU) whose three layers are
``nnx.LoRALinear`` (rank ``--rank``) is *pretrained* on the unshifted training images (base weights only,
prior ``τ₀ = 1``, full-batch Adam), then *fine-tuned* on a shifted domain: every image rolled by one pixel to the
right, ``--train-size`` shifted training examples, adapters only (``wrt=nnx.LoRAParam``, weak prior
``--map-prior`` on the adapters, so the fine-tuned MAP is over-confident). Evaluation on the shifted validation
and test images: the fine-tuned MAP, temperature scaling (one ``T`` on the validation NLL) and LoRA-Laplace
(``"kfac"``, ``"diagonal"`` and the exact ``"full"`` posterior of the full Fisher of all fine-tuning examples,
``m = 10·N``) over the adapter weights only, with ``τ`` from the marginal likelihood
(``nox.tune_prior_precision``) and from the validation NLL (``nox.grid_search_prior_precision``); predictive
``nox.glm_predictive`` (probit link, ``--samples`` exact posterior samples through one JVP each).

    python benchmarks/laplace_lora.py            # about 3 min on a shared 2-core machine

Writes ``benchmarks/results/laplace_lora.{csv,json}`` (suffixes ``_n<size>``/``_grid<k>`` for other
``--train-size``/``--grid-points``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibration as cal  # noqa: E402
import common  # noqa: E402

import neuron_optax as nox  # noqa: E402
from neuron_optax.examples import data as nox_data  # noqa: E402


class LoraMLP(nnx.Module):
  def __init__(self, rank: int, rngs: nnx.Rngs, features=(64, 64, 64, 10)):
    kw = dict(lora_rank=rank, param_dtype=jnp.float64, lora_param_dtype=jnp.float64, rngs=rngs)
    self.layers = nnx.List([nnx.LoRALinear(a, b, **kw) for a, b in zip(features[:-1], features[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--train-size", type=int, default=200, help="shifted fine-tuning examples")
  parser.add_argument("--map-prior", type=float, default=0.01, help="prior precision τ₀ on the adapters")
  parser.add_argument("--pretrain-steps", type=int, default=1500)
  parser.add_argument("--steps", type=int, default=2000, help="full-batch Adam steps of the fine-tune")
  parser.add_argument("--samples", type=int, default=200)
  parser.add_argument("--grid-points", type=int, default=13, help="τ grid of the validation control, 1e-2 .. 1e5")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def shift(images: np.ndarray) -> np.ndarray:
  """The fine-tuning domain: every 8x8 image rolled one pixel to the right."""
  return np.roll(images.reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64)


def fit(model, wrt, x, y, prior: float, steps: int):
  """MAP of ``mean CE + τ₀/(2N) ‖θ_wrt‖²`` over the ``wrt`` parameters (full-batch Adam, cosine decay)."""
  n = x.shape[0]
  optimizer = nnx.Optimizer(model, optax.adam(optax.cosine_decay_schedule(3e-3, steps)), wrt=wrt)

  def objective(model):
    ce = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    return ce + prior / (2 * n) * sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(model, wrt)))

  @nnx.jit
  def run(model, optimizer):
    def step(carry, _):
      model, optimizer = carry
      value, grads = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt))(model)
      optimizer.update(model, grads)
      return (model, optimizer), value

    _, values = nnx.scan(step, in_axes=(nnx.Carry, None), length=steps)((model, optimizer), None)
    return values[-1]

  return float(run(model, optimizer))


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  info, started = common.machine_info(), time.perf_counter()
  dataset = nox_data.load("digits")
  train_val, test = dataset.split(0.2, seed=args.seed)
  train, val = train_val.split(0.15, seed=args.seed + 1)
  tune = train.take(args.train_size, seed=args.seed + 3)
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  x_pre, y_pre = f64(train.images), jnp.asarray(train.labels)
  x, y = f64(shift(tune.images)), jnp.asarray(tune.labels)
  x_val, y_val = f64(shift(val.images)), jnp.asarray(val.labels)
  x_test, y_test = f64(shift(test.images)), np.asarray(test.labels)
  n_train = x.shape[0]

  model = LoraMLP(args.rank, nnx.Rngs(args.seed))
  begin = time.perf_counter()
  fit(model, BASE, x_pre, y_pre, 1.0, args.pretrain_steps)  # lora_b = 0: the adapters are inactive here
  pretrain_seconds = time.perf_counter() - begin
  graphdef, _, _ = nnx.split(model, nnx.LoRAParam, ...)
  apply = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(inputs))
  table, settings_extra = cal.Table(y_test, width=24), {}

  state = nnx.state(model)
  probs, seconds = cal.timed(lambda s: jax.nn.softmax(apply(s, x_test)), state)
  table.record("pretrained (no fine-tune)", "-", None, probs, pretrain_seconds, seconds)

  begin = time.perf_counter()
  final_loss = fit(model, nnx.LoRAParam, x, y, args.map_prior, args.steps)
  tune_seconds = time.perf_counter() - begin
  settings_extra["fine_tune_final_objective"] = final_loss
  state = nnx.state(model)
  probs, seconds = cal.timed(lambda s: jax.nn.softmax(apply(s, x_test)), state)
  table.record("LoRA MAP", "-", None, probs, tune_seconds, seconds)

  temperature, scaled, fit_seconds, seconds = cal.temperature_scaling(apply(state, x_val), y_val, apply(state, x_test))
  table.record(
    "temperature scaling", "validation NLL", None, scaled, fit_seconds, seconds, temperature=float(temperature)
  )

  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
  log_likelihood = -n_train * float(optax.softmax_cross_entropy_with_integer_labels(apply(state, x), y).mean())
  grid = jnp.logspace(-2, 5, args.grid_points)

  def xent(model, inputs, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(inputs), labels).mean()

  for index, structure in enumerate(("kfac", "diagonal", "full")):
    key = jax.random.key(100 + index)

    def fit_laplace(adapters, frozen, key, x, y, x_val, y_val, structure=structure):
      model = nnx.merge(graphdef, adapters, frozen)
      capture = nox.nnx.value_grad_and_stats(xent, fisher="full", likelihood="categorical", wrt=nnx.LoRAParam)
      stats = capture(model, x, y)[2]  # the adapters' factors only
      kw = dict(dataset_size=n_train, structure=structure, num_samples=args.samples, key=key)
      apply_val = lambda p: nnx.merge(graphdef, p, frozen)(x_val)
      tau, evidence, tau_val, _ = cal.prior_precisions(
        apply_val, adapters, stats, y_val, log_likelihood=log_likelihood, grid=grid, **kw
      )
      return stats, tau, tau_val, evidence

    (stats, tau, tau_val, evidence), fit_seconds = cal.timed(
      jax.jit(fit_laplace), adapters, frozen, key, x, y, x_val, y_val
    )

    def predict(adapters, frozen, stats, tau, key, x_test, structure=structure):
      apply_test = lambda p: nnx.merge(graphdef, p, frozen)(x_test)
      return cal.probit_predictive(
        apply_test, adapters, stats, tau, key, args.samples, dataset_size=n_train, structure=structure
      )

    predict = jax.jit(predict)
    for tau_from, value in (("evidence", tau), ("validation NLL", tau_val)):
      probs, seconds = cal.timed(predict, adapters, frozen, stats, value, jax.random.key(7), x_test)
      table.record(
        f"LoRA-Laplace {structure}", tau_from, value, probs, fit_seconds, seconds, log_evidence=float(evidence)
      )

  os.makedirs(cal.RESULTS, exist_ok=True)
  suffix = ("" if args.train_size == 200 else f"_n{args.train_size}") + (
    "" if args.grid_points == 13 else f"_grid{args.grid_points}"
  )
  base = os.path.join(cal.RESULTS, f"laplace_lora{suffix}")
  cal.write_csv(base + ".csv", table.rows)
  info["load_average_end"] = common.load_average()
  adapter_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(adapters))
  result = {
    "settings": {
      "dataset": "sklearn digits (8x8), standardised; split(0.2) test, split(0.15) validation; fine-tune, "
      "validation and test images rolled one pixel right",
      "pretrain": int(x_pre.shape[0]),
      "fine_tune": int(n_train),
      "validation": int(len(y_val)),
      "test": int(len(y_test)),
      "model": f"MLP 64-64-64-10 ReLU, every layer nnx.LoRALinear rank {args.rank}",
      "adapter_parameters": adapter_count,
      "pretrain_prior_precision": 1.0,
      "adapter_map_prior_precision": args.map_prior,
      "pretrain_steps": args.pretrain_steps,
      "fine_tune_steps": args.steps,
      "samples": args.samples,
      "validation_tau_grid": [float(t) for t in grid],
      "predictive": "glm_predictive, probit link, moments of num_samples posterior samples through one JVP each",
      "dtype": "float64",
      "ece_bins": cal.BINS,
      "seed": args.seed,
      "timing": "seconds of a second call (compilation excluded; MAP rows: training incl. compilation)",
      **settings_extra,
    },
    "machine": info,
    "rows": table.rows,
    "seconds_total": round(time.perf_counter() - started, 1),
  }
  with open(base + ".json", "w") as handle:
    json.dump(result, handle, indent=1)
  print(f"wrote {base}.csv, .json in {result['seconds_total']} s", flush=True)
  return result


if __name__ == "__main__":
  main()
