"""Steady-state step time of every method as a ratio to SGD with momentum, with FLOP floors.

One process, one device (whatever JAX sees: CPU here, a GPU unchanged), and for
every workload the same model, data and first-order step for all methods:

* models: (a) the paper's MLP 784-1000-1000-1000-10 at batch 100 and 1000
  (FOOF/KFAC with ``T=100, S=50``: re-factorise every 100 steps, update the
  moving averages in the 50 steps that end with a re-factorisation; Benzing 2022,
  App. D.8/K); (b) ResNet-18, CIFAR variant, BatchNorm, 32x32x3, batch 128,
  ``T=390, S=10`` (once per epoch, App. D.6); (c) a Transformer encoder stack
  (``nn.MultiHeadDotProductAttention`` + MLP, tokens as rows), ``T=100, S=50``;
* methods: ``sgd`` (``optax.sgd(lr, momentum=0.9)``, the reference), ``adam``,
  ``foof``, ``kfac`` (heuristic damping), ``kfac_standard``, ``fngd`` (shared
  coefficients), and ``natural_gradient`` (exact, MC Fisher, ``m = batch``
  columns) where ``m`` is affordable (not the ResNet). Also available:
  ``fngd_unshared``, ``natural_gradient_block``. All neuron methods are chained
  with the same SGD+momentum; KFAC and the natural gradient use the Monte-Carlo
  Fisher (one sampled label per example, one extra backward pass), FOOF and
  FNGD the true-label cotangents of the ordinary backward pass.

Measurement: each step is one ``jax.jit``-compiled function (compiled ahead of
time; compile time reported), parameters, model state and optimiser state
donated, ``block_until_ready`` after every step, on a few synthetic batches that
live on the device. Warm-up (excluded): two steps, i.e. after the first
re-factorisation of FOOF/KFAC (step 0), and for FNGD its whole first (computing)
epoch of ``--fngd-epoch`` steps, so FNGD is timed in its shared steady state.
Then the methods' timed steps are interleaved in blocks of ``--block`` steps, so
that load changes on the machine hit every method alike.

The blocked step time includes the host's dispatch of each step. A training
loop does not wait for each step, so the table also reports the **pipelined**
step time: the median over ``--pipelined-blocks`` blocks of the mean time of
``--pipelined-steps`` steps enqueued back to back (FOOF/KFAC: plain steps),
which on an accelerator is the device time (or the dispatch time, whichever is
longer), and its ratio to SGD's.

Amortised methods (FOOF, KFAC) have three kinds of steps: plain (apply the last
inverse), statistics (also update the moving averages: ``S - 1`` per period) and
inversion (also re-factorise: 1 per period). The reported numbers are the
**median step** (median of the plain steps; of all steps for the others) and the
**period mean** ``Σ_kind (steps of that kind per period) x (median time of that
kind) / T``, the average cost per step over a full amortisation period, which is
what counts for these methods. If ``--steps`` covers whole periods the timed
steps are consecutive (and the raw mean over them is reported too); otherwise
(ResNet's ``T=390``) each round times ``S`` plain steps and then jumps the
schedule counter to the statistics window that ends with an inversion (the work
of a step depends on the counter only through the schedule), so inversions are
sampled several times without running 390 steps per sample.

Floors (see ``benchmarks/common.py``): analytic FLOPs of the model's forward and
backward pass and of each method's extra work per step; ``floor = (model +
extra) / model`` for a plain step and for the period mean; ``measured/floor`` is
the measured ratio over the floor. XLA's own count
(``jit(step).lower(...).compile().cost_analysis()["flops"]``) is printed as a
ratio to SGD's as a cross-check; it counts the untaken branches of
``lax.cond`` (re-factorisations, FNGD's computing branch) too, so for amortised
methods it is an every-step-inverts upper bound.

On CPU, ``OPENBLAS_NUM_THREADS`` defaults to 1 (jaxlib's LAPACK kernels run on
scipy's OpenBLAS, whose threads compete with XLA's own pool), and the ResNet is
reduced (width 16, batch 32) unless ``--resnet-width/--resnet-batch`` say
otherwise: the full one costs seconds per step. ``--quick`` shrinks everything:
MLP 784-256-256-10 (batches 100 and 1000), a ResNet with one block per stage
(ResNet-10 layout) of width 8 at batch 16, a one-block Transformer with
``d_model=64`` and 16 tokens, all with ``T=10, S=5``; compilation dominates its
run time.

Writes ``benchmarks/results/step_time_<device>[_quick].json`` and ``.csv``.

    python benchmarks/step_time.py --quick
    python benchmarks/step_time.py                      # the full table
    python benchmarks/step_time.py --models mlp_b100 --methods sgd,foof,kfac --steps 200
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import models  # noqa: E402

DEFAULT_METHODS = ("sgd", "adam", "foof", "kfac", "kfac_standard", "fngd", "natural_gradient")
MODEL_NAMES = ("mlp_b100", "mlp_b1000", "resnet18", "transformer")

# Hyperparameters only matter for timing insofar as the run must stay finite (a non-finite
# Cholesky would take the eigendecomposition fallback); small steps on random data do.
HYPERPARAMETERS = {
  "sgd": {"lr": 1e-3},
  "adam": {"lr": 1e-4},
  "foof": {"lr": 1e-3, "damping": 1.0},
  "kfac": {"lr": 1e-3, "damping": 1.0},
  "kfac_standard": {"lr": 1e-3, "damping": 1.0},
  "kfac_empirical": {"lr": 1e-3, "damping": 1.0},
  "foof_phased": {"lr": 1e-3, "damping": 1.0},
  "kfac_phased": {"lr": 1e-3, "damping": 1.0},
  "fngd": {"lr": 1e-3, "alpha": 0.1},
  "fngd_auto": {"lr": 1e-3, "alpha": 0.1},
  "fngd_unshared": {"lr": 1e-3, "alpha": 0.1},
  "fngd_rows": {"lr": 1e-3, "alpha": 0.1},
  "foof_phased_rows": {"lr": 1e-3, "damping": 1.0},
  "natural_gradient": {"lr": 1e-3, "damping": 1.0},
  "natural_gradient_block": {"lr": 1e-3, "damping": 1.0},
}


def workloads(args) -> dict[str, models.Workload]:
  on_cpu = jax.devices()[0].platform == "cpu"
  if args.quick:
    t, s = 10, 5
    out = {
      "mlp_b100": models.mlp_workload(100, (256, 256), inverse_every=t, stats_window=s),
      "mlp_b1000": models.mlp_workload(1000, (256, 256), inverse_every=t, stats_window=s),
      "resnet18": models.resnet_workload(
        args.resnet_batch or 16, args.resnet_width or 8, inverse_every=t, stats_window=s, stage_sizes=(1, 1, 1, 1)
      ),
      "transformer": models.transformer_workload(
        16, tokens=16, d_model=64, heads=4, depth=1, features=32, inverse_every=t, stats_window=s
      ),
    }
  else:
    width = args.resnet_width or (16 if on_cpu else 64)
    batch = args.resnet_batch or (32 if on_cpu else 128)
    out = {
      "mlp_b100": models.mlp_workload(100),
      "mlp_b1000": models.mlp_workload(1000),
      "resnet18": models.resnet_workload(batch, width),
      "transformer": models.transformer_workload(32, tokens=64, d_model=256, heads=4, depth=4, features=64),
    }
  chosen = {name: out[name] for name in args.models}
  if args.inverse_every is not None or args.stats_window is not None:  # e.g. the issue-24 goals: T=100, S=1
    for name, w in chosen.items():
      t = args.inverse_every or w.inverse_every
      s = args.stats_window or min(w.stats_window, t)
      described = w.description.replace(f"T={w.inverse_every}, S={w.stats_window}", f"T={t}, S={s}")
      chosen[name] = dataclasses.replace(w, inverse_every=t, stats_window=s, description=described)
  return chosen


# --------------------------------------------------------------------------- #
# One method on one workload
# --------------------------------------------------------------------------- #


def large_dots(compiled, min_elements: int = 100_000) -> dict[str, int]:
  """``{output shape: count}`` of the dot products in a compiled (plain) step with large outputs.

  Read from the compiled HLO text, so every branch of a conditional counts (the
  contraction check's two branches too): the products a step can run, beside
  the analytic floor. Small products (the check's probes, the output layer's
  ``d_out = 10``) are left out.
  """
  found: dict[str, int] = {}
  for match in re.finditer(r"= \w+\[([\d,]+)\]\S* dot\(", compiled.as_text()):
    dims = tuple(int(d) for d in match.group(1).split(","))
    if math.prod(dims) >= min_elements:
      key = "x".join(map(str, dims))
      found[key] = found.get(key, 0) + 1
  return found


class Runner:
  """A method's compiled step, its own (donated) buffers, and its timed steps by kind."""

  def __init__(self, name: str, workload: models.Workload, variables, batches, fngd_epoch: int):
    self.name, self.workload, self.batches = name, workload, batches
    method = common.METHODS[name]
    self.amortised = method.amortised
    tx = method.make(
      HYPERPARAMETERS[name],
      inverse_every=workload.inverse_every,
      stats_window=workload.stats_window,
      steps_per_epoch=fngd_epoch,
      batch_size=workload.batch_size,
    )
    self.params = jax.tree.map(jnp.copy, variables["params"])
    self.model_state = jax.tree.map(jnp.copy, {k: v for k, v in variables.items() if k != "params"})
    self.opt_state = tx.init(self.params)
    x, y = batches[0]
    start = time.perf_counter()
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*donated.*")

      def compile_step(tx):
        step = models.make_step(workload, tx, method.fisher)
        return (
          jax.jit(step, donate_argnums=(0, 1, 2))
          .lower(self.params, self.model_state, self.opt_state, x, y, np.int32(0))
          .compile()
        )

      self.by_phase = {}
      if method.phased and method.amortised:  # FOOF/KFAC: one compiled step per phase
        self.warmup_steps = 0
        self.by_phase = {
          phase: compile_step(
            method.make(
              HYPERPARAMETERS[name],
              inverse_every=workload.inverse_every,
              stats_window=workload.stats_window,
              phase=phase,
            )
          )
          for phase in ("plain", "statistics", "inversion")
        }
      elif method.phased:  # FNGD's Python-level switch: computing epoch, then the reusing step
        self.warmup_steps = fngd_epoch
        self.warmup_compiled = compile_step(
          method.make(
            HYPERPARAMETERS[name], steps_per_epoch=fngd_epoch, batch_size=workload.batch_size, phase="inversion"
          )
        )
        tx = method.make(
          HYPERPARAMETERS[name], steps_per_epoch=fngd_epoch, batch_size=workload.batch_size, phase="plain"
        )
      else:
        self.warmup_steps = 0
      self.compiled = self.by_phase["plain"] if self.by_phase else compile_step(tx)
    self.compile_seconds = time.perf_counter() - start
    self.xla_flops = common.xla_flops(self.compiled)
    self.large_dots = large_dots(self.compiled)
    self.count = 0  # the schedule counter of FOOF/KFAC (and the MC Fisher's sampling index)
    self.times: dict[str, list[float]] = {"plain": [], "statistics": [], "inversion": []}
    self.sequence: list[float] = []
    self.loss = math.nan

  def kind(self) -> str:
    if not self.amortised:
      return "plain"
    return common.step_kind(self.count, self.workload.inverse_every, self.workload.stats_window)

  def step_function(self):
    if self.by_phase:
      return self.by_phase[self.kind()]
    return self.warmup_compiled if self.count < self.warmup_steps else self.compiled

  def jump(self, count: int) -> None:
    self.opt_state = common.set_schedule_count(self.opt_state, count)
    self.count = count

  def dispatch(self) -> jax.Array:
    """Enqueues the next step (not waited for) and returns its loss."""
    x, y = self.batches[self.count % len(self.batches)]
    self.params, self.model_state, self.opt_state, loss = self.step_function()(
      self.params, self.model_state, self.opt_state, x, y, np.int32(self.count)
    )
    self.count += 1
    return loss

  def run(self, num_steps: int, record: bool = True) -> None:
    for _ in range(num_steps):
      kind = self.kind()
      start = time.perf_counter()
      loss = self.dispatch()
      jax.block_until_ready((self.params, self.model_state, self.opt_state, loss))
      elapsed = time.perf_counter() - start
      if record:
        self.times[kind].append(elapsed)
        self.sequence.append(elapsed)
    self.loss = float(loss)


def pipelined(runner: Runner, blocks: int, steps: int) -> tuple[float, float]:
  """``(median step seconds, dispatch fraction)`` over ``blocks`` blocks of steps enqueued back to back.

  A training loop does not wait for each step: JAX dispatches asynchronously,
  so on an accelerator the host enqueues the next steps while the device runs
  and the step time is the device's (or the host's, whichever is slower), not
  their sum as with ``block_until_ready`` after every step. Each block times
  ``steps`` consecutive steps (FOOF/KFAC: plain steps, from count 1 up to the
  statistics window) and waits once at the end; the step time is the median of
  the blocks' means. The dispatch fraction is the time to *enqueue* a block
  over the time until it finishes: small when the device is the bottleneck,
  about 1 when something makes the host wait for the device each step (e.g. a
  conditional whose predicate must be copied to the host) or when dispatch
  dominates. On CPU both say little.
  """
  length = steps
  if runner.amortised:
    w = runner.workload
    plain = 0
    while plain < steps and common.step_kind(1 + plain, w.inverse_every, w.stats_window) == "plain":
      plain += 1
    length = max(1, plain)
  per_step, fractions = [], []
  for _ in range(blocks):
    if runner.amortised:
      runner.jump(1)
    jax.block_until_ready((runner.params, runner.opt_state))
    start = time.perf_counter()
    for _ in range(length):
      loss = runner.dispatch()
    enqueued = time.perf_counter() - start
    jax.block_until_ready((runner.params, runner.opt_state, loss))
    elapsed = time.perf_counter() - start
    per_step.append(elapsed / length)
    fractions.append(enqueued / elapsed)
  return statistics.median(per_step), statistics.median(fractions)


def timing_plan(runner: Runner, steps: int, block: int) -> list[tuple[int | None, int]]:
  """``[(jump_to or None, steps), ...]`` blocks of at most ``block`` steps, ``steps`` in all."""
  w = runner.workload
  t, s = w.inverse_every, w.stats_window
  segments: list[tuple[int | None, int]] = []
  if not runner.amortised or steps >= t:
    segments.append((None, steps))
  else:
    plain = max(0, min(s, t - s))
    per_round = plain + s
    rounds = max(1, math.ceil(steps / per_round))
    for r in range(rounds):
      # Round r times `plain` plain steps, then the window of S steps that ends with the inversion at
      # count (r + 2)·T. Counts stay above the warm-up's, so the first re-factorisation has happened.
      end = (r + 2) * t
      segments.append((end - s + 1 - plain, per_round))
  blocks = []
  for jump, length in segments:
    first = True
    while length > 0:
      take = min(block, length)
      blocks.append((jump if first else None, take))
      first, length = False, length - take
  return blocks


def summarise(runner: Runner, contiguous: bool) -> dict[str, Any]:
  w = runner.workload
  times = runner.times
  medians = {k: statistics.median(v) for k, v in times.items() if v}
  out: dict[str, Any] = {
    "timed_steps": {k: len(v) for k, v in times.items()},
    "median_seconds_by_kind": medians,
    "compile_seconds": runner.compile_seconds,
    "xla_flops": runner.xla_flops,
    "large_dots": runner.large_dots,
    "final_loss": runner.loss,
  }
  out["median_step_seconds"] = medians.get("plain", statistics.median(runner.sequence))
  if runner.amortised:
    counts = common.kind_counts(w.inverse_every, w.stats_window)
    missing = [k for k, c in counts.items() if c and k not in medians]
    if missing:
      out["period_mean_seconds"] = None
      out["note"] = f"no timed step of kind {missing}; use more --steps"
    else:
      out["period_mean_seconds"] = sum(c * medians[k] for k, c in counts.items() if c) / w.inverse_every
  else:
    out["period_mean_seconds"] = out["median_step_seconds"]
  if contiguous:
    out["raw_mean_seconds"] = statistics.fmean(runner.sequence)
  return out


def synthetic_batches(w: models.Workload, count: int) -> list[tuple[jax.Array, jax.Array]]:
  """``count`` batches of standard-normal inputs and uniform labels of 10 classes, on the device."""
  keys = jax.random.split(jax.random.key(1), 2 * count)
  return [
    (
      jax.random.normal(keys[2 * i], (w.batch_size,) + w.input_shape, jnp.float32),
      jax.random.randint(keys[2 * i + 1], (w.batch_size,), 0, 10),
    )
    for i in range(count)
  ]


def benchmark_workload(name: str, w: models.Workload, methods: list[str], args) -> dict[str, Any]:
  print(f"\n== {name}: {w.description}", flush=True)
  variables = models.init_variables(w)
  batches = synthetic_batches(w, args.batches)
  methods = [m for m in methods if w.natural_gradient or not m.startswith("natural_gradient")]
  skipped = [m for m in args.methods if m not in methods]

  loss_fn = models.make_loss_fn(w)
  model_state = {k: v for k, v in variables.items() if k != "params"}
  geometry = common.layer_geometry(loss_fn, variables["params"], model_state, *batches[0])
  flops = common.flop_model(geometry, w.uncaptured_forward_flops)

  runners = {}
  for m in methods:
    runners[m] = Runner(m, w, variables, batches, args.fngd_epoch)
    print(f"  compiled {m:24s} {runners[m].compile_seconds:6.1f} s", flush=True)
  for m, r in runners.items():  # warm-up: first re-factorisation, FNGD's computing epoch
    r.run(args.fngd_epoch + 2 if m.startswith("fngd") else 2, record=False)

  steps = args.steps or (
    2 * w.inverse_every if args.quick else (w.inverse_every if w.inverse_every <= 100 else 6 * w.stats_window)
  )
  contiguous = steps >= w.inverse_every
  if contiguous:
    steps = math.ceil(steps / w.inverse_every) * w.inverse_every  # whole periods
  plans = {m: timing_plan(r, steps, args.block) for m, r in runners.items()}
  start = time.perf_counter()
  while any(plans.values()):
    for m, r in runners.items():
      if plans[m]:
        jump, length = plans[m].pop(0)
        if jump is not None:
          r.jump(jump)
        r.run(length)
  timing_seconds = time.perf_counter() - start

  results = {m: summarise(r, contiguous or not r.amortised) for m, r in runners.items()}
  for _ in range(args.pipelined_blocks):  # interleaved, like the blocked timings
    for m, r in runners.items():
      step, fraction = pipelined(r, 1, args.pipelined_steps)
      results[m].setdefault("_pipelined", []).append((step, fraction))
  for res in results.values():
    samples = res.pop("_pipelined")
    res["pipelined_step_seconds"] = statistics.median(t for t, _ in samples)
    res["dispatch_fraction"] = statistics.median(f for _, f in samples)
  sgd = results.get("sgd")
  for m, res in results.items():
    floors = common.floor_ratios(flops, m, w.inverse_every, w.stats_window)
    res["floor_step"], res["floor_period_mean"] = floors["step"], floors["period_mean"]
    res["analytic_flops_step"] = flops["model"] + flops["extra"][m]["step"]
    if sgd:
      res["ratio_median"] = res["median_step_seconds"] / sgd["median_step_seconds"]
      res["ratio_pipelined"] = res["pipelined_step_seconds"] / sgd["pipelined_step_seconds"]
      res["ratio_period_mean"] = (
        res["period_mean_seconds"] / sgd["median_step_seconds"] if res["period_mean_seconds"] else None
      )
      res["measured_over_floor"] = (
        res["ratio_period_mean"] / floors["period_mean"] if res["ratio_period_mean"] else None
      )
      if res["xla_flops"] and sgd["xla_flops"]:
        res["xla_flops_ratio"] = res["xla_flops"] / sgd["xla_flops"]
  xla_model = sgd["xla_flops"] / flops["model"] if sgd and sgd["xla_flops"] else None
  return {
    "description": w.description,
    "batch_size": w.batch_size,
    "inverse_every": w.inverse_every,
    "xla_over_analytic_model_flops": xla_model,
    "stats_window": w.stats_window,
    "timed_steps_per_method": steps,
    "timing": "consecutive whole periods" if contiguous else "rounds jumping to the statistics window",
    "timing_seconds": timing_seconds,
    "analytic_flops": {
      "model_step": flops["model"],
      "forward": flops["forward"],
      "mc_extra_backward": flops["mc_backward"],
      "fngd_computing_epoch_extra_per_step": flops["fngd_computing_epoch_extra"],
      "extra": flops["extra"],
    },
    "layers": [vars(l) for l in geometry],
    "skipped_methods": skipped,
    "methods": results,
  }


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #

COLUMNS = (
  "model",
  "method",
  "median_ms",
  "period_mean_ms",
  "pipelined_ms",
  "ratio_median",
  "ratio_period_mean",
  "ratio_pipelined",
  "floor_step",
  "floor_period_mean",
  "measured_over_floor",
  "xla_flops_ratio",
  "compile_s",
)


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
  out = []
  for model, wres in result["workloads"].items():
    for m, r in wres["methods"].items():
      out.append(
        {
          "model": model,
          "method": m,
          "median_ms": 1e3 * r["median_step_seconds"],
          "period_mean_ms": 1e3 * r["period_mean_seconds"] if r["period_mean_seconds"] else None,
          "pipelined_ms": 1e3 * r["pipelined_step_seconds"],
          "ratio_median": r.get("ratio_median"),
          "ratio_period_mean": r.get("ratio_period_mean"),
          "ratio_pipelined": r.get("ratio_pipelined"),
          "floor_step": r["floor_step"],
          "floor_period_mean": r["floor_period_mean"],
          "measured_over_floor": r.get("measured_over_floor"),
          "xla_flops_ratio": r.get("xla_flops_ratio"),
          "compile_s": r["compile_seconds"],
        }
      )
  return out


def fmt(value, spec: str) -> str:
  return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def print_table(result: dict[str, Any]) -> str:
  lines = []
  for model, wres in result["workloads"].items():
    lines.append(
      f"\n{model}: {wres['description']}  ({wres['timing']}, {wres['timed_steps_per_method']} timed steps per method)"
    )
    lines.append(
      "| method | median ms | period-mean ms | pipelined ms | ratio (median) | ratio (mean) | "
      "ratio (pipelined) | floor (step) | floor (mean) | measured/floor | XLA FLOPs ratio | "
      "dispatch fraction |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in wres["methods"].items():
      lines.append(
        f"| {m} | {fmt(1e3 * r['median_step_seconds'], '.2f')} | "
        f"{fmt(r['period_mean_seconds'] and 1e3 * r['period_mean_seconds'], '.2f')} | "
        f"{fmt(1e3 * r['pipelined_step_seconds'], '.2f')} | "
        f"{fmt(r.get('ratio_median'), '.2f')} | {fmt(r.get('ratio_period_mean'), '.2f')} | "
        f"{fmt(r.get('ratio_pipelined'), '.2f')} | "
        f"{fmt(r['floor_step'], '.2f')} | {fmt(r['floor_period_mean'], '.2f')} | "
        f"{fmt(r.get('measured_over_floor'), '.2f')} | {fmt(r.get('xla_flops_ratio'), '.2f')} | "
        f"{fmt(r.get('dispatch_fraction'), '.2f')} |"
      )
    lines.append(
      "Large dot products in the compiled plain step (all branches): "
      + "; ".join(f"{m} {sum(r['large_dots'].values())}" for m, r in wres["methods"].items())
    )
    if wres["xla_over_analytic_model_flops"]:
      lines.append(
        f"XLA cost analysis of the SGD step / analytic model FLOPs "
        f"({wres['analytic_flops']['model_step']:.3g}): {wres['xla_over_analytic_model_flops']:.3f}"
      )
    if wres["skipped_methods"]:
      lines.append(
        f"(not run here: {', '.join(wres['skipped_methods'])} — m x m systems over conv positions are not affordable)"
      )
  text = "\n".join(lines)
  print(text, flush=True)
  return text


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small models, T=10, S=5 (< 2 min on 2 CPU cores)")
  parser.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma-separated from {MODEL_NAMES}")
  parser.add_argument(
    "--methods",
    default=",".join(DEFAULT_METHODS),
    help=f"comma-separated from {tuple(common.METHODS)} (sgd is always added)",
  )
  parser.add_argument(
    "--steps", type=int, default=None, help="timed steps per method (default: one period T, 2T with --quick; ResNet 6S)"
  )
  parser.add_argument("--block", type=int, default=5, help="steps per interleaved timing block")
  parser.add_argument("--batches", type=int, default=4, help="distinct synthetic batches cycled through")
  parser.add_argument(
    "--pipelined-blocks", type=int, default=5, help="blocks of back-to-back (not waited-for) steps per method"
  )
  parser.add_argument(
    "--pipelined-steps",
    type=int,
    default=20,
    help="steps per pipelined block (FOOF/KFAC: at most the plain steps before the window)",
  )
  parser.add_argument("--fngd-epoch", type=int, default=5, help="FNGD steps_per_epoch (computing epoch, untimed)")
  parser.add_argument("--inverse-every", type=int, default=None, help="override every workload's FOOF/KFAC T")
  parser.add_argument("--stats-window", type=int, default=None, help="override every workload's FOOF/KFAC S")
  parser.add_argument("--resnet-width", type=int, default=None, help="ResNet first-stage channels")
  parser.add_argument("--resnet-batch", type=int, default=None, help="ResNet batch size")
  parser.add_argument("--output", default=None, help="output path without extension")
  args = parser.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  for m in args.models:
    if m not in MODEL_NAMES:
      parser.error(f"unknown model {m!r}; choose from {MODEL_NAMES}")
  for m in args.methods:
    if m not in common.METHODS:
      parser.error(f"unknown method {m!r}; choose from {tuple(common.METHODS)}")
  if "sgd" not in args.methods:
    args.methods.insert(0, "sgd")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  info = common.machine_info()
  print(
    f"{info['device']} ({info['cpu_model']}, {info['cpu_count']} CPUs), jax {info['jax']}, "
    f"load average {info['load_average_1_5_15min']}",
    flush=True,
  )
  started = time.perf_counter()
  result = {
    "machine": info,
    "setting": "quick" if args.quick else "full",
    "args": vars(args),
    "hyperparameters": HYPERPARAMETERS,
    "workloads": {},
  }
  for name, w in workloads(args).items():
    result["workloads"][name] = benchmark_workload(name, w, list(args.methods), args)
  result["total_seconds"] = time.perf_counter() - started
  result["machine"]["load_average_at_end"] = common.load_average()
  result["table_markdown"] = print_table(result)

  base = args.output or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "results",
    f"step_time_{common.device_slug()}{'_quick' if args.quick else ''}",
  )
  os.makedirs(os.path.dirname(base), exist_ok=True)
  with open(base + ".json", "w") as f:
    json.dump(result, f, indent=2, default=float)
  with open(base + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows(result))
  print(
    f"\ntotal {result['total_seconds']:.0f} s; load average {info['load_average_1_5_15min']} -> "
    f"{result['machine']['load_average_at_end']}; wrote {base}.json and .csv"
  )
  return result


if __name__ == "__main__":
  main()
