"""Laplace posteriors on scikit-learn's digits: MAP vs diagonal, KFAC, input-factor and exact Laplace.

Setup. scikit-learn's 8x8 digits (1,797 images, ``neuron_optax.examples.data``),
a random 80/20 split (``Dataset.split(0.2, seed)``), an MLP 64-64-64-10 (ReLU),
trained to the MAP of ``mean CE + τ₀/(2N) ‖θ‖²`` (prior precision ``τ₀ = 1``;
Adam, full batch) in float64. Then, for every posterior (``nox.laplace_sample``'s
``structure``):

* ``diagonal``, ``kfac`` (``τI + N A⊗G``, no heuristic damping),
  ``kfac_heuristic`` (``N (A + π√(τ/N) I) ⊗ (G + √(τ/N)/π I)``) and
  ``input_factor`` (``τI + N ḡ A⊗I``, the FOOF-like one-factor posterior of
  Benzing 2022, App. G), from the full Fisher (all 10 classes) of all ``N``
  training examples;
* ``full``: the exact Laplace posterior of a subsampled Fisher with ``m``
  columns, ``m = 10 n`` (full Fisher on ``n`` random training examples) and
  ``m = N`` (Monte-Carlo Fisher, one sampled label per training example),
  sampled exactly by App. C.1;
* ``kfac`` from the same ``n`` examples as the largest exact posterior (the
  data control App. G asks for).

Each posterior's prior precision ``τ`` is tuned by maximising its Laplace log
marginal likelihood (``nox.tune_prior_precision``). Predictives on the held-out
20 %, from ``--samples`` posterior samples: *sampled* (softmax of the network at
each sample, averaged) and *linearised* (GLM: ``nox.linearized_predictive``,
softmax of ``f(θ*) + J(θ−θ*)``, averaged). Metrics: NLL, ECE (15 equal-width
confidence bins, top label), accuracy; also the mean total-variation distance
between the predictive distributions of the posteriors (App. G's question:
does KFAC without heuristic damping behave like the one-factor posterior?).

Outputs: ``benchmarks/results/laplace[_quick].csv`` (one row per posterior and
predictive), ``.json`` (settings, machine, rows, distances, reliability bins)
and ``.png`` (reliability diagrams).

    python benchmarks/laplace.py --quick     # ~1 min
    python benchmarks/laplace.py             # a few minutes on 2 CPU cores

Calibration table (``--calibration``, issue 26.6): on the same split and MAP, held-out NLL, ECE, accuracy and
reliability diagrams of the MAP, temperature scaling (one temperature fitted on the validation NLL),
last-layer Laplace (exact ``"full"`` posterior of the Monte-Carlo Fisher of all ``N`` training examples, and
``"kfac"``) and all-layer KFAC-Laplace, each with its prior precision chosen by the marginal likelihood
(``nox.tune_prior_precision``) and by the validation NLL (``nox.grid_search_prior_precision``); predictives are
``nox.glm_predictive`` (probit link, from ``--samples`` posterior samples pushed through one JVP each), with the
time to fit (capture, factorisation, τ) and to predict. Writes ``benchmarks/results/laplace_calibration[_quick]``
``.csv``/``.json``/``.png``.

    python benchmarks/laplace.py --calibration [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibration as cal  # noqa: E402
import common  # noqa: E402

import neuron_optax as nox  # noqa: E402
from neuron_optax.examples import data as nox_data  # noqa: E402

RESULTS, BINS, metrics = cal.RESULTS, cal.BINS, cal.metrics


class MLP(nn.Module):
  features: tuple[int, ...] = (64, 64, 10)

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer samples and smaller exact posteriors")
  parser.add_argument("--samples", type=int, default=None, help="posterior samples per predictive (default 200)")
  parser.add_argument("--subsets", default=None, help="examples n of the exact full-Fisher posteriors (m = 10 n)")
  parser.add_argument("--map-prior", type=float, default=1.0, help="prior precision τ₀ of the MAP training")
  parser.add_argument("--steps", type=int, default=3000, help="full-batch Adam steps to the MAP")
  parser.add_argument("--grid-points", type=int, default=13, help="τ grid of the validation control, 0.1 .. 1e5")
  parser.add_argument("--train-size", type=int, default=None, help="train on a random subset of this size")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--calibration", action="store_true", help="the calibration table (issue 26.6) instead")
  args = parser.parse_args(argv)
  args.samples = args.samples or (50 if args.quick else 200)
  args.subsets = [int(v) for v in (args.subsets or ("10,50" if args.quick else "20,100,300")).split(",")]
  return args


def train_map(model, x, y, prior: float, steps: int, seed: int):
  """MAP of ``Σ_i CE_i + τ₀/2 ‖θ‖²`` (divided by N): full-batch Adam with a cosine decay."""
  params = model.init(jax.random.key(seed), x[:1])["params"]
  params = jax.tree_util.tree_map(lambda p: p.astype(x.dtype), params)  # Flax initialises in float32
  n = x.shape[0]

  def objective(params):
    logits = model.apply({"params": params}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + prior / (2 * n) * sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))

  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(objective)(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value

    (params, _), values = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, values

  params, values = run(params)
  return params, float(values[-1])


def tv(p: np.ndarray, q: np.ndarray) -> float:
  """Mean total-variation distance between two predictive distributions over the test set."""
  return float(0.5 * np.abs(p - q).sum(1).mean())


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  if args.calibration:
    return calibration(args)
  info = common.machine_info()
  started = time.perf_counter()

  dataset = nox_data.load("digits")
  train_val, test = dataset.split(0.2, seed=args.seed)
  train, val = train_val.split(0.15, seed=args.seed + 1)
  if args.train_size:
    train = train.take(args.train_size, seed=args.seed + 3)
  as_x = lambda d: jnp.asarray(d.images, jnp.float64)
  x, y = as_x(train), jnp.asarray(train.labels)
  x_val, y_val, x_test, y_test = as_x(val), np.asarray(val.labels), as_x(test), np.asarray(test.labels)
  n_train = x.shape[0]
  model = MLP()
  params, objective = train_map(model, x, y, args.map_prior, args.steps, args.seed)
  apply = jax.jit(lambda p, inputs: model.apply({"params": p}, inputs))
  train_logits = apply(params, x)
  train_ce = float(optax.softmax_cross_entropy_with_integer_labels(train_logits, y).mean())
  log_likelihood = -n_train * train_ce
  num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  print(
    f"MLP 64-64-64-10 ({num_params} parameters) on digits: N = {n_train} train / {len(y_val)} validation / "
    f"{len(y_test)} test; MAP objective {objective:.4f}, train CE {train_ce:.4f}, train accuracy "
    f"{float(np.mean(np.argmax(train_logits, 1) == y)):.3f}, |θ*|² {sum(float(jnp.sum(p**2)) for p in jax.tree_util.tree_leaves(params)):.1f}",
    flush=True,
  )

  def ce_on(inputs, labels):
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, inputs), labels).mean()

  def capture(inputs, labels, fisher, rng=None):
    fn = jax.jit(nox.value_grad_and_stats(ce_on(inputs, labels), fisher=fisher, likelihood="categorical"))
    return fn(params, **({"rng": rng} if fisher == "mc" else {}))[2]

  order = np.random.default_rng(args.seed + 1).permutation(n_train)
  stats_all = capture(x, y, "full")
  posteriors = [
    ("diagonal", "diagonal", stats_all, n_train * 10),
    ("kfac", "kfac", stats_all, n_train * 10),
    ("kfac_heuristic", "kfac_heuristic", stats_all, n_train * 10),
    ("input_factor", "input_factor", stats_all, n_train * 10),
  ]
  for n in args.subsets:
    subset = np.sort(order[:n])
    posteriors.append((f"full m={10 * n}", "full", capture(x[subset], y[subset], "full"), 10 * n))
  posteriors.append((f"full mc m={n_train}", "full", capture(x, y, "mc", jax.random.key(args.seed + 2)), n_train))
  largest = np.sort(order[: args.subsets[-1]])
  posteriors.append((f"kfac n={args.subsets[-1]}", "kfac", capture(x[largest], y[largest], "full"), 10 * largest.size))
  grid = np.logspace(-1, 5, args.grid_points)

  def predictives(stats, key, structure):
    kwargs = dict(dataset_size=n_train, structure=structure)
    tau = nox.tune_prior_precision(params, stats, **kwargs)
    evidence = nox.laplace_log_marginal_likelihood(
      params, stats, log_likelihood=log_likelihood, prior_precision=tau, **kwargs
    )

    def at(tau, inputs, sampled=True):
      samples = nox.laplace_sample(key, params, stats, prior_precision=tau, num_samples=args.samples, **kwargs)
      linear = nox.linearized_predictive(lambda p: model.apply({"params": p}, inputs), params, samples)
      linear = jnp.mean(jax.nn.softmax(linear), 0)
      if not sampled:
        return linear
      logits = jax.vmap(lambda p: model.apply({"params": p}, inputs))(samples)
      return jnp.mean(jax.nn.softmax(logits), 0), linear

    sampled, linear = at(tau, x_test)
    # Control: τ on a grid, linearised predictive on the validation and test sets.
    both = jnp.concatenate([x_val, x_test])
    on_grid = jax.lax.map(lambda t: at(t, both, sampled=False), jnp.asarray(grid))
    return tau, evidence, sampled, linear, on_grid

  run = jax.jit(predictives, static_argnames="structure")
  map_probs = np.asarray(jax.nn.softmax(apply(params, x_test)))
  map_validation_nll = metrics(np.asarray(jax.nn.softmax(apply(params, x_val))), y_val)["nll"]
  base_row = {"tau_from": "", "m_or_rows": 0, "log_evidence": None}
  rows = [{**base_row, "posterior": "MAP", "predictive": "map", "tau": args.map_prior, **metrics(map_probs, y_test)}]
  probabilities = {("MAP", "map"): map_probs}
  validation_curves = {}
  for index, (name, structure, stats, columns) in enumerate(posteriors):
    begin = time.perf_counter()
    tau, evidence, sampled, linear, on_grid = jax.block_until_ready(run(stats, jax.random.key(100 + index), structure))
    seconds = time.perf_counter() - begin
    on_grid = np.asarray(on_grid)
    val_nll = [metrics(p[: len(y_val)], y_val)["nll"] for p in on_grid]
    best = int(np.argmin(val_nll))
    validation_curves[name] = {"tau": list(grid), "validation_nll": val_nll, "evidence_tau": float(tau)}
    common_fields = {"m_or_rows": columns, "log_evidence": float(evidence), "seconds_incl_compile": round(seconds, 2)}
    for kind, probs, tau_value, tau_from in (
      ("sampled", sampled, tau, "evidence"),
      ("linearised", linear, tau, "evidence"),
      ("linearised", on_grid[best][len(y_val) :], grid[best], "validation NLL"),
    ):
      probs = np.asarray(probs)
      if tau_from == "evidence":
        probabilities[(name, kind)] = probs
      row = {"posterior": name, "predictive": kind, "tau": float(tau_value), "tau_from": tau_from, **common_fields}
      rows.append({**row, **metrics(probs, y_test)})
    print(
      f"{name:>16}: τ {float(tau):8.3g} log ev {float(evidence):8.1f} | "
      + " | ".join(
        f"{r['predictive'][:3]}({r['tau_from'][:3]} τ={r['tau']:.3g}) NLL {r['nll']:.3f} ECE {r['ece']:.3f} "
        f"acc {r['accuracy']:.3f}"
        for r in rows[-3:]
      )
      + f" ({seconds:.1f} s)",
      flush=True,
    )

  # App. G: how close are the predictive distributions (mean total variation over the test set)?
  exact = [p[0] for p in posteriors if p[1] == "full"]
  compared = ["kfac", "input_factor", "kfac_heuristic", "diagonal", exact[-2], posteriors[-1][0]]
  distances = {
    kind: {
      **{
        f"{a} | {b}": tv(probabilities[(a, kind)], probabilities[(b, kind)])
        for i, a in enumerate(compared)
        for b in compared[i + 1 :]
      },
      **{f"MAP | {a}": tv(map_probs, probabilities[(a, kind)]) for a in compared},
    }
    for kind in ("sampled", "linearised")
  }

  os.makedirs(RESULTS, exist_ok=True)
  suffix = ("_quick" if args.quick else "") + (f"_n{args.train_size}" if args.train_size else "")
  base = os.path.join(RESULTS, f"laplace{suffix}")
  fields = ["posterior", "predictive", "tau_from", "m_or_rows", "tau", "log_evidence", "nll", "ece", "accuracy"]
  cal.write_csv(base + ".csv", rows, fields + ["seconds_incl_compile"])
  info["load_average_end"] = common.load_average()
  result = {
    "settings": {
      "dataset": "sklearn digits (8x8), standardised; split(0.2) test, then split(0.15) validation of the rest",
      "train": int(n_train),
      "validation": len(y_val),
      "test": len(y_test),
      "model": "MLP 64-64-64-10 ReLU",
      "parameters": int(num_params),
      "map_prior_precision": args.map_prior,
      "map_steps": args.steps,
      "samples": args.samples,
      "subsets": args.subsets,
      "validation_tau_grid": list(grid),
      "train_size": args.train_size,
      "seed": args.seed,
      "dtype": "float64",
      "ece_bins": BINS,
    },
    "machine": info,
    "map_train_cross_entropy": train_ce,
    "rows": rows,
    "mean_total_variation": distances,
    "validation_curves": validation_curves,
    "map_validation_nll": map_validation_nll,
    "seconds_total": round(time.perf_counter() - started, 1),
  }
  with open(base + ".json", "w") as handle:
    json.dump(result, handle, indent=1)
  plot(rows, validation_curves, map_validation_nll, base + ".png")
  print(f"wrote {base}.csv, .json, .png in {result['seconds_total']} s", flush=True)
  return result


def plot(rows, curves, map_validation_nll: float, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = ["MAP", "diagonal", "kfac", "kfac_heuristic", "input_factor"]
  exact = [r["posterior"] for r in rows if r["posterior"].startswith("full m=")]
  shown += exact[-1:]
  colors = dict(zip(shown[1:], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  for ax, kind in zip(axes[:2], ("sampled", "linearised")):
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    for name in shown:
      row = next(
        r
        for r in rows
        if r["posterior"] == name and r["predictive"] in (kind, "map") and r["tau_from"] != "validation NLL"
      )
      bins = np.asarray(row["bins"])
      label = f"{name} (ECE {row['ece']:.3f}, NLL {row['nll']:.3f})"
      style = dict(color="k", lw=2) if name == "MAP" else dict(color=colors[name])
      ax.plot(bins[:, 2], bins[:, 3], marker="o", ms=3, label=label, **style)
    ax.set_title(f"{kind} predictive" + ("" if kind == "sampled" else " (GLM)") + ", τ by evidence")
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("accuracy (bin)")
    ax.set_xlim(0, 1.01)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
  ax = axes[2]
  for name in shown[1:]:
    curve = curves[name]
    ax.plot(curve["tau"], curve["validation_nll"], color=colors[name], label=name)
    tau = curve["evidence_tau"]
    ax.axvline(tau, color=colors[name], ls=":", lw=1)
  ax.axhline(map_validation_nll, color="k", lw=1, ls="--", label="MAP")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("prior precision τ (dotted: evidence maximiser)")
  ax.set_ylabel("validation NLL, linearised predictive")
  ax.set_title("prior precision: evidence vs validation")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.suptitle("Laplace posteriors of an MLP on held-out digits")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def calibration(args) -> dict[str, Any]:
  """MAP, temperature scaling, last-layer Laplace and all-layer KFAC-Laplace on held-out digits."""
  info = common.machine_info()
  started = time.perf_counter()
  dataset = nox_data.load("digits")
  train_val, test = dataset.split(0.2, seed=args.seed)
  train, val = train_val.split(0.15, seed=args.seed + 1)
  if args.train_size:
    train = train.take(args.train_size, seed=args.seed + 3)
  as_x = lambda d: jnp.asarray(d.images, jnp.float64)
  x, y = as_x(train), jnp.asarray(train.labels)
  x_val, y_val, x_test, y_test = as_x(val), jnp.asarray(val.labels), as_x(test), np.asarray(test.labels)
  n_train = x.shape[0]
  model = MLP()
  begin = time.perf_counter()
  params, _ = train_map(model, x, y, args.map_prior, args.steps, args.seed)
  map_seconds = time.perf_counter() - begin
  apply = jax.jit(lambda p, inputs: model.apply({"params": p}, inputs))
  log_likelihood = -n_train * float(optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean())
  last = ("Dense_2",)

  def ce(p, inputs, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, inputs), labels).mean()

  table = cal.Table(y_test)
  map_probs, seconds = cal.timed(lambda p: jax.nn.softmax(apply(p, x_test)), params)
  table.record("MAP", "-", None, map_probs, map_seconds, seconds)
  temperature, scaled, fit_seconds, seconds = cal.temperature_scaling(
    apply(params, x_val), y_val, apply(params, x_test)
  )
  table.record(
    "temperature scaling", "validation NLL", None, scaled, fit_seconds, seconds, temperature=float(temperature)
  )

  grid = jnp.logspace(-2, 5, args.grid_points)
  posteriors = [
    ("last-layer full (MC)", "full", "mc", True),
    ("last-layer KFAC", "kfac", "full", True),
    ("all-layer KFAC", "kfac", "full", False),
  ]
  for index, (name, structure, fisher, last_only) in enumerate(posteriors):
    key = jax.random.key(100 + index)

    # The data are arguments, not constants of the compiled programs (XLA would constant-fold them).
    def fit(params, key, x, y, x_val, y_val, fisher=fisher, last_only=last_only, structure=structure):
      capture = nox.value_grad_and_stats(ce, fisher=fisher, likelihood="categorical")
      stats = capture(params, x, y, **({"rng": key} if fisher == "mc" else {}))[2]
      if last_only:
        stats = {k: v for k, v in stats.items() if k == last}
      kw = dict(dataset_size=n_train, structure=structure, num_samples=args.samples, key=key)
      apply_val = lambda p: model.apply({"params": p}, x_val)
      tau, evidence, tau_val, _ = cal.prior_precisions(
        apply_val, params, stats, y_val, log_likelihood=log_likelihood, grid=grid, **kw
      )
      return stats, tau, tau_val, evidence

    (stats, tau, tau_val, evidence), fit_seconds = cal.timed(jax.jit(fit), params, key, x, y, x_val, y_val)

    def predict(params, stats, tau, key, x_test, structure=structure):
      apply_test = lambda p: model.apply({"params": p}, x_test)
      return cal.probit_predictive(
        apply_test, params, stats, tau, key, args.samples, dataset_size=n_train, structure=structure
      )

    predict = jax.jit(predict)
    for tau_from, value in (("evidence", tau), ("validation NLL", tau_val)):
      probs, seconds = cal.timed(predict, params, stats, value, jax.random.key(7), x_test)
      table.record(name, tau_from, value, probs, fit_seconds, seconds, log_evidence=float(evidence))

  os.makedirs(RESULTS, exist_ok=True)
  suffix = ("_quick" if args.quick else "") + (f"_n{args.train_size}" if args.train_size else "")
  base = os.path.join(RESULTS, f"laplace_calibration{suffix}")
  cal.write_csv(base + ".csv", table.rows)
  info["load_average_end"] = common.load_average()
  result = {
    "settings": {
      "dataset": "sklearn digits (8x8), standardised; split(0.2) test, then split(0.15) validation of the rest",
      "train": int(n_train),
      "validation": int(len(y_val)),
      "test": int(len(y_test)),
      "model": "MLP 64-64-64-10 ReLU",
      "map_prior_precision": args.map_prior,
      "map_steps": args.steps,
      "samples": args.samples,
      "validation_tau_grid": [float(t) for t in grid],
      "predictive": "glm_predictive, probit link, moments of num_samples posterior samples through one JVP each",
      "dtype": "float64",
      "ece_bins": BINS,
      "seed": args.seed,
      "timing": "seconds of a second call (compilation excluded), 2 shared CPU cores",
    },
    "machine": info,
    "rows": table.rows,
    "seconds_total": round(time.perf_counter() - started, 1),
  }
  with open(base + ".json", "w") as handle:
    json.dump(result, handle, indent=1)
  title = "Calibration on held-out digits: MAP, temperature scaling, last-layer and all-layer KFAC Laplace"
  cal.plot_reliability(table.rows, base + ".png", title)
  print(f"wrote {base}.csv, .json, .png in {result['seconds_total']} s", flush=True)
  return result


if __name__ == "__main__":
  main()
