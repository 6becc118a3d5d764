"""Long bf16 run (issue #27.5): the char-LM Transformer in float32 and in bf16 for thousands of steps.

Each recipe is trained twice with ``benchmarks/transformer_lm.py`` (its ``main``, imported: same model, data,
splits, recipes, schedule and step), once with ``--dtype float32`` and once with ``--dtype bfloat16``
(parameters and activations bf16, initialised as float32's initial values rounded to bf16; Adam's and Muon's
moments follow the parameters' dtype, optax's default; the neuron statistics and factors are float32, the
library's rule; the loss is computed in float32 from the bf16 logits), back to back, from the same
initialisation and on the same batches (seed 1). Recipes, on the CPU setting's d64 model (2 layers, 4 heads,
context 64, batch 32):

* ``foofmuon``: the recommended FOOF + Muon (``transformer_lm.COMPARE_RECIPES["cpu"]``, ``rec=1``),
* ``adamw``, ``muon``: tuned AdamW and tuned Muon (the same table),
* ``kfac``, ``fngd``: the library defaults before ``adam(1e-3)`` (``transformer_lm.DEFAULTS_RECIPES``:
  ``kfac(1.0, inverse_every=100, stats_window=10)`` / ``fngd(1.0)``, constant learning rate, no clipping).

Learning rates: the tuned recipes use ``transformer_lm``'s cosine schedule over the run's own ``--steps``
(linear warm-up over the first 5 %, then cosine to 10 % of the peak); the defaults recipes a constant one.
Nothing is re-tuned for the longer run or for bf16.

Per recipe and dtype ``benchmarks/results/long_bf16.json`` (and ``.csv``) records: steps taken, non-finite
steps (loss or any update not finite), first and final training loss (final: mean of the last 100 steps),
final held-out loss on the **test** split, the held-out curve, training and wall seconds, the machine and its
load; per recipe the relative gap of bf16's final test loss to float32's (``(bf16 - f32) / f32``) and whether
it is within 1 % with zero non-finite steps. The file is rewritten after every run (an interrupted invocation
keeps what finished) and merged with an existing file of the same steps and setting, so recipes can be run in
separate invocations.

    python benchmarks/long_bf16.py --steps 200 --output /tmp/long_bf16_smoke      # smoke
    nice -n 10 python benchmarks/long_bf16.py --recipes foofmuon,adamw,muon      # 5,000 steps
    nice -n 10 python benchmarks/long_bf16.py --recipes kfac,fngd                # merged into the same file
    python benchmarks/long_bf16.py --table                                        # the docs table (comparison refreshed)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformer_lm  # noqa: E402  benchmarks/transformer_lm.py

DTYPES = ("float32", "bfloat16")
TOLERANCE = 0.01  # issue #27.5: bf16's final loss within 1 % of float32's


def recipes() -> dict[str, str]:
  """The recipe strings, in the order they run (the recommended one first)."""
  compare = {r.family: r.spec for r in transformer_lm.parse_recipes(transformer_lm.COMPARE_RECIPES["cpu"])}
  defaults = {r.name: r.spec for r in transformer_lm.parse_recipes(transformer_lm.DEFAULTS_RECIPES)}
  return {
    "foofmuon": compare["neuron"],
    "adamw": compare["adamw"],
    "muon": compare["muon"],
    "kfac": defaults["kfac defaults + adam(1e-3)"],
    "fngd": defaults["fngd defaults + adam(1e-3)"],
  }


def run_one(key: str, spec: str, dtype: str, args) -> tuple[dict, dict]:
  """One ``transformer_lm`` run (one recipe, one seed, one dtype), summarised."""
  eval_every = args.eval_every or min(500, max(1, args.steps // 10))
  argv = ["--recipes", spec, "--dtype", dtype, "--steps", str(args.steps), "--seeds", str(args.seed)]
  argv += ["--eval-every", str(eval_every), "--no-plot", "--tag", f"long_bf16_{key}_{dtype}"]
  argv += ["--quick"] if args.quick else []
  print(f"== {key} {dtype}: transformer_lm {' '.join(argv)}", flush=True)
  with tempfile.TemporaryDirectory() as tmp:  # the summary below is the result; transformer_lm's file is not kept
    result = transformer_lm.main(argv + ["--output-dir", tmp])
  (run,) = result["runs"]
  (row,) = result["summary"]
  losses = run["train_losses"]
  tail = losses[-min(100, len(losses)) :]
  record = dict(
    recipe=key,
    name=run["name"],
    spec=run["recipe"],
    dtype=dtype,
    steps=run["steps"],
    run_steps=row["run_steps"],
    nonfinite_steps=run["nonfinite_steps"],
    diverged=run["diverged"],
    first_train_loss=losses[0] if losses else None,
    final_train_loss=sum(tail) / len(tail) if tail else None,
    final_test_loss=run["final"].get("test"),
    final_validation_loss=run["final"].get("validation"),
    schedule=transformer_lm.parse_recipes(spec)[0].options["sched"],
    train_seconds=run["seconds"],
    ms_per_step=row["ms_per_step"],
    compile_seconds=result["compile_seconds"],
    wall_seconds=result["wall_seconds"],
    load_average_before=result["load_average_before"],
    load_average_after=result["load_average_after"],
    test_curve=run["evals"],  # (step, test loss, training seconds)
    train_loss_per_100_steps=[sum(losses[i : i + 100]) / len(losses[i : i + 100]) for i in range(0, len(losses), 100)],
  )
  print(
    f"   {key} {dtype}: {record['steps']} steps, {record['nonfinite_steps']} non-finite, train "
    f"{_fmt(record['first_train_loss'])} -> {_fmt(record['final_train_loss'])}, test {_fmt(record['final_test_loss'])}, "
    f"{record['ms_per_step'] or float('nan'):.0f} ms/step, {record['wall_seconds']:.0f} s",
    flush=True,
  )
  return record, result


def comparisons(records: list[dict]) -> list[dict]:
  """Per recipe with both dtypes: bf16's relative gap to float32's final test loss and the verdict."""
  out = []
  for key in dict.fromkeys(r["recipe"] for r in records):
    by_dtype = {r["dtype"]: r for r in records if r["recipe"] == key}
    if set(by_dtype) != set(DTYPES):
      continue
    f32, bf16 = by_dtype["float32"], by_dtype["bfloat16"]
    gap, train_gap = None, None
    if f32["final_test_loss"] is not None and bf16["final_test_loss"] is not None:
      gap = (bf16["final_test_loss"] - f32["final_test_loss"]) / f32["final_test_loss"]
    if f32["final_train_loss"] is not None and bf16["final_train_loss"] is not None:
      train_gap = (bf16["final_train_loss"] - f32["final_train_loss"]) / f32["final_train_loss"]
    finite = f32["nonfinite_steps"] == 0 and bf16["nonfinite_steps"] == 0
    complete = bf16["steps"] == bf16["run_steps"] and f32["steps"] == f32["run_steps"]
    out.append(
      dict(
        recipe=key,
        name=f32["name"],
        float32_test_loss=f32["final_test_loss"],
        bfloat16_test_loss=bf16["final_test_loss"],
        relative_gap=gap,
        train_relative_gap=train_gap,  # the same for the final training loss (mean of the last 100 steps)
        nonfinite_steps_float32=f32["nonfinite_steps"],
        nonfinite_steps_bfloat16=bf16["nonfinite_steps"],
        within_tolerance=bool(gap is not None and abs(gap) <= TOLERANCE and finite and complete),
      )
    )
  return out


def _fmt(value, spec=".4f") -> str:
  return "-" if value is None else format(value, spec)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5000)
  parser.add_argument(
    "--recipes", default=",".join(recipes()), help=f"comma-separated, run in this order (of {', '.join(recipes())})"
  )
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--eval-every", type=int, default=None, help="default: min(500, steps // 10)")
  parser.add_argument("--quick", action="store_true", help="transformer_lm's tiny quick model (the smoke test)")
  parser.add_argument(
    "--output",
    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "long_bf16"),
    help="output stem: <output>.json and <output>.csv",
  )
  parser.add_argument(
    "--table", action="store_true", help="recompute the comparison of <output>.json, rewrite it, print the table"
  )
  args = parser.parse_args(argv)
  if args.table:
    with open(args.output + ".json") as f:
      out = json.load(f)
    out["comparison"] = comparisons(out["records"])
    write(out, args.output)
    print(markdown(out))
    return out
  table = recipes()
  keys = [k.strip() for k in args.recipes.split(",") if k.strip()]
  unknown = [k for k in keys if k not in table]
  if unknown or not keys:
    parser.error(f"unknown recipes {unknown}; expected some of {list(table)}")
  setting = "quick" if args.quick else "cpu"

  from common import machine_info  # benchmarks/common.py

  previous = []
  if os.path.exists(args.output + ".json"):
    with open(args.output + ".json") as f:
      old = json.load(f)
    if old.get("steps") == args.steps and old.get("setting") == setting and old.get("seed") == args.seed:
      previous = [r for r in old["records"] if r["recipe"] not in keys]  # merged: another invocation's recipes
  records, config, started = [], None, time.perf_counter()
  for key in keys:
    for dtype in DTYPES:
      record, result = run_one(key, table[key], dtype, args)
      records.append(record)
      config = {k: v for k, v in result["config"].items() if k != "dtype"}
      ordered = sorted(previous + records, key=lambda r: (list(table).index(r["recipe"]), DTYPES.index(r["dtype"])))
      out = dict(
        steps=args.steps,
        setting=setting,
        seed=args.seed,
        config=config,
        tolerance=TOLERANCE,
        schedule="tuned recipes: linear warm-up over 5 % of the steps, then cosine to 10 % of the peak over the "
        "run's steps; kfac/fngd defaults: constant adam(1e-3)",
        machine=machine_info(),
        comparison=comparisons(ordered),
        records=ordered,
        wall_seconds_this_invocation=time.perf_counter() - started,
      )
      write(out, args.output)
  for row in out["comparison"]:
    print(
      f"{row['recipe']:9s} float32 {_fmt(row['float32_test_loss'])}  bf16 {_fmt(row['bfloat16_test_loss'])}  "
      f"gap {_fmt(row['relative_gap'], '+.2%')}  non-finite {row['nonfinite_steps_float32']}/"
      f"{row['nonfinite_steps_bfloat16']}  {'within 1 %' if row['within_tolerance'] else 'NOT within 1 %'}"
    )
  print(markdown(out))
  print(f"wrote {args.output}.json/.csv")
  return out


def markdown(out: dict) -> str:
  """The docs table (docs/scale.md): one row per recipe and dtype, bf16's gap on its row."""
  gaps = {row["recipe"]: row for row in out["comparison"]}
  lines = [
    "| recipe | dtype | steps | non-finite steps | training loss first → final | test loss | bf16 gap: test "
    "(training) | ms/step |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in out["records"]:
    row = gaps.get(r["recipe"]) if r["dtype"] == "bfloat16" else None
    gap = ""
    if row is not None:
      gap = f"{_fmt(row['relative_gap'], '+.2%')} ({_fmt(row.get('train_relative_gap'), '+.2%')})"
    lines.append(
      f"| {r['name']} | {r['dtype']} | {r['steps']} | {r['nonfinite_steps']} | {_fmt(r['first_train_loss'], '.3f')} → "
      f"{_fmt(r['final_train_loss'], '.3f')} | {_fmt(r['final_test_loss'])} | {gap} | {_fmt(r['ms_per_step'], '.0f')} |"
    )
  return "\n".join(lines)


def write(out: dict, stem: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(out, f, indent=1)
  gaps = {row["recipe"]: row["relative_gap"] for row in out["comparison"]}
  fields = [
    "recipe",
    "name",
    "dtype",
    "steps",
    "nonfinite_steps",
    "first_train_loss",
    "final_train_loss",
    "final_test_loss",
    "schedule",
    "ms_per_step",
    "wall_seconds",
  ]
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(fields + ["bf16_relative_gap", "load_average_before"])
    for r in out["records"]:
      gap = gaps.get(r["recipe"]) if r["dtype"] == "bfloat16" else None
      writer.writerow([r[k] for k in fields] + [gap, round(r["load_average_before"][0], 2)])


if __name__ == "__main__":
  main()
