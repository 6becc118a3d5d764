"""Hyperparameter guide: which damping (or FNGD's alpha) x learning rate trains and which diverges.

For every method — ``nox.foof``, ``nox.kfac`` (heuristic damping, Monte-Carlo
Fisher), ``nox.fngd`` and ``nox.natural_gradient`` (whole network, Monte-Carlo
Fisher) — chained with ``optax.sgd(lr, momentum=0.9)``, a grid of its damping
(``alpha`` for FNGD) times the learning rate is trained for a few hundred steps
on three small, quick workloads (CPU minutes), from the same initialisation on
the same batches (150 steps each):

* ``mlp``: ReLU MLP 784-256-256-256-10 (the paper's depth, narrower), batch 100,
  on the bundled 5,000-image MNIST subset;
* ``cnn``: Flax's official MNIST CNN layout (conv 3x3, avg-pool, conv 3x3,
  avg-pool, dense, dense) at half width (16, 32, 128 features), batch 32, on
  the same subset as 28x28x1 images;
* ``transformer``: the char-level Transformer LM of ``benchmarks/transformer_lm.py``
  (2 blocks, d_model 64, 4 heads, 32 tokens, batch 32) on Python's bundled docs.

FOOF and KFAC use ``--amortisation`` (default ``T=100, S=10``, the recommended defaults
of ``benchmarks/defaults.py``). A run **diverged** if a loss is not finite or its final
loss (mean of its last tenth of steps) is not below the first step's loss; it **trains**
if the final loss is below 0.75x the first one (else ``slow``). Damping and learning rate
live in the optimizer state (``optax.inject_hyperparams``): one compilation per method
and workload.

Writes ``benchmarks/results/hyperparameter_guide{_quick}.md`` (a grid per method and
workload: final loss, ``slow``, ``✗`` for diverged, best cell in bold; and the summary
table the README shows), ``.csv`` (one row per run) and ``.json`` (also every loss
curve).

    python benchmarks/hyperparameter_guide.py [--quick] [--workloads mlp,cnn,transformer]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import defaults  # noqa: E402  (sets up sys.path and OPENBLAS_NUM_THREADS)

GRIDS: dict[str, tuple[float, ...]] = {
  "foof": (0.01, 0.1, 1.0, 10.0, 100.0),
  "kfac_mc": (1e-3, 0.01, 0.1, 1.0, 10.0),
  "fngd": (1e-3, 0.01, 0.1, 1.0, 10.0),
  "natural_gradient": (0.01, 0.1, 1.0, 10.0, 100.0),
}
LEARNING_RATES = (0.01, 0.1, 1.0)
STEPS = {"mlp": 150, "cnn": 150, "transformer": 150}
SYMBOL = {"foof": "λ", "kfac_mc": "λ", "fngd": "α", "natural_gradient": "λ"}
METHOD_LABEL = {
  "foof": "`foof(λ)`",
  "kfac_mc": "`kfac(λ)` (heuristic, MC Fisher)",
  "fngd": "`fngd(α, …)`",
  "natural_gradient": "`natural_gradient(λ)` (MC Fisher)",
}


def workloads() -> dict[str, defaults.Workload]:
  mlp = defaults.mlp_workload(100, (256, 256, 256))
  mlp.description = "MLP 784-256-256-256-10, batch 100, MNIST subset"
  cnn = defaults.cnn_workload(32)
  cnn.model = _HalfWidthCNN()
  cnn.description = "Flax MNIST CNN layout at half width (Conv16, Conv32, Dense128), batch 32, MNIST subset"
  return {"mlp": mlp, "cnn": cnn, "transformer": defaults.transformer_workload()}


class _HalfWidthCNN(defaults.nn.Module):
  @defaults.nn.compact
  def __call__(self, x):
    nn = defaults.nn
    x = nn.avg_pool(nn.relu(nn.Conv(features=16, kernel_size=(3, 3))(x)), window_shape=(2, 2), strides=(2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x)), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=128)(x))
    return nn.Dense(features=10)(x)


def run_grid(names, quick: bool, schedule: tuple[int, int | None]) -> list[dict[str, Any]]:
  rows = []
  all_workloads = workloads()
  for name in names:
    w = all_workloads[name]
    steps = 30 if quick else STEPS[name]
    trainer = defaults.Trainer(w, steps)
    plan = [(defaults.SPECS["sgd"], None, lr) for lr in LEARNING_RATES]
    for method, values in GRIDS.items():
      plan += [(defaults.SPECS[method], v, lr) for v in values for lr in LEARNING_RATES]
    for spec, value, lr in plan:
      row = trainer.run(spec, value, lr, *schedule)
      row["description"] = w.description
      rows.append(row)
      print(
        f"  [{name}] {spec.name:16s} {value!s:6s} lr={lr:<5}: {row['status']:8s} "
        f"{row['initial_loss']:.3f} -> {row['final_loss']} ({row['seconds']:.0f} s)",
        flush=True,
      )
  return rows


def _cell(row: dict[str, Any], best: bool) -> str:
  if row["status"] == "diverged":
    return "✗"
  text = f"{row['final_loss']:.2f}" if row["status"] == "trains" else f"slow ({row['final_loss']:.2f})"
  return f"**{text}**" if best else text


def _fmt(value: float) -> str:
  return f"{value:g}"


def _ranges(rows: list[dict[str, Any]], lr: float, status: set[str]) -> str:
  values = [r["value"] for r in rows if r["lr"] == lr and r["status"] in status]
  return ", ".join(_fmt(v) for v in sorted(values)) if values else "—"


def markdown(rows: list[dict[str, Any]], schedule) -> str:
  names = list(dict.fromkeys(r["workload"] for r in rows))
  lines = [
    "# Hyperparameter guide (generated by `benchmarks/hyperparameter_guide.py`)",
    "",
    "Every method is chained with `optax.sgd(lr, momentum=0.9)`; FOOF/KFAC use "
    f"`inverse_every={schedule[0]}, stats_window={schedule[1]}`. Cells: the final training loss "
    "(mean of the last tenth of the steps); `slow`: finite but above 0.75x the first step's "
    "loss; ✗: diverged (a non-finite loss, or no decrease). Bold: the best cell of the grid.",
    "",
  ]
  for name in names:
    wrows = [r for r in rows if r["workload"] == name]
    lines += [f"## {name}: {wrows[0]['description']}, {wrows[0]['steps']} steps", ""]
    sgd = {r["lr"]: r for r in wrows if r["method"] == "sgd"}
    lines += [
      "SGD+momentum alone: " + ", ".join(f"lr {_fmt(lr)}: {_cell(r, False)}" for lr, r in sgd.items()),
      "",
    ]
    for method in GRIDS:
      mrows = [r for r in wrows if r["method"] == method]
      if not mrows:
        continue
      finite = [r for r in mrows if r["status"] != "diverged"]
      best = min(finite, key=lambda r: r["final_loss"]) if finite else None
      lrs = sorted({r["lr"] for r in mrows})
      lines += [f"**{METHOD_LABEL[method]}**", ""]
      lines += [f"| {SYMBOL[method]} \\ lr | " + " | ".join(_fmt(lr) for lr in lrs) + " |"]
      lines += ["|---" * (len(lrs) + 1) + "|"]
      for value in sorted({r["value"] for r in mrows}):
        cells = []
        for lr in lrs:
          row = next(r for r in mrows if r["value"] == value and r["lr"] == lr)
          cells.append(_cell(row, row is best))
        lines.append(f"| {_fmt(value)} | " + " | ".join(cells) + " |")
      lines.append("")
  lines += ["## Summary: values that train (diverge) at each learning rate", "", summary_table(rows), ""]
  return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]]) -> str:
  """``method | lr | per workload: values that train (values that diverge)``."""
  names = list(dict.fromkeys(r["workload"] for r in rows))
  out = ["| method | lr | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]
  for method in GRIDS:
    for lr in LEARNING_RATES:
      cells = []
      for name in names:
        mrows = [r for r in rows if r["workload"] == name and r["method"] == method]
        if not mrows:
          cells.append("")
          continue
        trains = _ranges(mrows, lr, {"trains"})
        diverges = _ranges(mrows, lr, {"diverged"})
        cells.append(f"{trains} (✗ {diverges})" if diverges != "—" else trains)
      out.append(f"| {METHOD_LABEL[method]} {SYMBOL[method]} | {_fmt(lr)} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="30 steps (a smoke run)")
  parser.add_argument("--workloads", default="mlp,cnn,transformer")
  parser.add_argument("--amortisation", default="100:10", help="T:S for FOOF/KFAC")
  args = parser.parse_args(argv)
  schedule = defaults.parse_amortisation(args.amortisation)[0]
  started = time.perf_counter()
  rows = run_grid(args.workloads.split(","), args.quick, schedule)
  stem = os.path.join(defaults.RESULTS, "hyperparameter_guide" + ("_quick" if args.quick else ""))
  os.makedirs(defaults.RESULTS, exist_ok=True)
  text = markdown(rows, (schedule[0], "None" if schedule[1] is None else schedule[1]))
  with open(stem + ".md", "w") as f:
    f.write(text)
  result = dict(
    machine=common.machine_info(),
    arguments=vars(args),
    seconds=round(time.perf_counter() - started, 1),
    grids=GRIDS,
    learning_rates=LEARNING_RATES,
    runs=rows,
  )
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  fields = [k for k in rows[0] if k != "losses"]
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  print(text)
  print(f"wrote {stem}.md/.csv/.json")
  return result


if __name__ == "__main__":
  main()
