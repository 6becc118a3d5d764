"""Where a method's extra step time goes: device kernels per step, from a profiler trace.

For one workload of ``step_time.py`` and a few methods (``sgd`` always), runs the
same compiled steps as ``step_time.py`` (after its warm-up; FOOF/KFAC: plain
steps, between statistics windows), records
``--steps`` steps of each under ``jax.profiler.trace``, and summarises the
device events of the trace: kernels per step, summed kernel time per step
(device busy time), and the kernels that take the most time. Also reports, per
method, the blocked step time (``block_until_ready`` after each step, what
``step_time.py`` reports) and the pipelined step time (``--steps`` steps
enqueued back to back, as a training loop runs them).

On a GPU the step of a small model is bound by kernel launches and host
dispatch rather than FLOPs; this tells which kernels a method adds. On CPU the
trace has no device events (XLA:CPU runs on host threads) and only the timings
are printed.

    python benchmarks/kernel_profile.py --model mlp_b1000 --methods fngd,foof_phased
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
from typing import Any

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402
import step_time  # noqa: E402


def _device_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
  """Complete events on device (GPU/TPU) processes, from a Chrome-trace dict."""
  names = {
    e["pid"]: e.get("args", {}).get("name", "")
    for e in trace.get("traceEvents", [])
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  device_pids = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name}
  threads = {
    (e["pid"], e["tid"]): e.get("args", {}).get("name", "")
    for e in trace.get("traceEvents", [])
    if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  out = []
  for e in trace.get("traceEvents", []):
    if e.get("ph") != "X" or e.get("pid") not in device_pids:
      continue
    thread = threads.get((e["pid"], e.get("tid")), "")
    if "Stream" not in thread:  # "XLA Ops"/"XLA Modules" lines repeat the stream's kernels
      continue
    out.append(e)
  return out


def _plain_steps_from(runner: step_time.Runner, count: int = 1) -> None:
  """Amortised methods: move the schedule to ``count`` (plain steps follow, up to the window)."""
  if runner.amortised:
    runner.jump(count)


def profile(runner: step_time.Runner, steps: int, directory: str) -> dict[str, Any]:
  _plain_steps_from(runner)
  runner.run(2, record=False)
  jax.block_until_ready(runner.params)
  with jax.profiler.trace(directory):
    runner.run(steps, record=False)
  (path,) = glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz"))
  with gzip.open(path) as f:
    events = _device_events(json.load(f))
  by_name: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    by_name[e["name"]].append(float(e["dur"]))
  top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
  return {
    "kernels_per_step": len(events) / steps,
    "kernel_us_per_step": sum(float(e["dur"]) for e in events) / steps,
    "top_kernels": [
      {"name": name[:90], "calls_per_step": len(d) / steps, "us_per_step": sum(d) / steps} for name, d in top
    ],
  }


def timings(runner: step_time.Runner, steps: int) -> dict[str, float]:
  runner.times = {k: [] for k in runner.times}
  runner.sequence = []
  _plain_steps_from(runner)
  runner.run(steps)
  pipelined, fraction = step_time.pipelined(runner, 3, steps)
  return {
    "blocked_ms": 1e3 * statistics.median(runner.sequence),
    "pipelined_ms": 1e3 * pipelined,
    "dispatch_fraction": fraction,
  }


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="mlp_b1000", choices=step_time.MODEL_NAMES)
  parser.add_argument("--methods", default="fngd,foof_phased,kfac_phased")
  parser.add_argument("--steps", type=int, default=20, help="steps traced and timed per method")
  parser.add_argument("--quick", action="store_true", help="step_time.py's small models")
  parser.add_argument("--output", default=None, help="JSON path (default: print only)")
  args = parser.parse_args(argv)
  methods = ["sgd"] + [m for m in args.methods.split(",") if m and m != "sgd"]
  st_args = step_time.parse_args(
    ["--models", args.model, "--methods", ",".join(methods)] + (["--quick"] if args.quick else [])
  )
  workload = step_time.workloads(st_args)[args.model]
  variables = step_time.models.init_variables(workload)
  batches = step_time.synthetic_batches(workload, 2)
  print(f"{common.machine_info()['device']}, jax {jax.__version__}; {workload.description}")
  result: dict[str, Any] = {"machine": common.machine_info(), "model": args.model, "methods": {}}
  for m in methods:
    runner = step_time.Runner(m, workload, variables, batches, st_args.fngd_epoch)
    runner.run(st_args.fngd_epoch + 2 if m.startswith("fngd") else 2, record=False)
    entry = timings(runner, max(args.steps, 20))
    if jax.devices()[0].platform != "cpu":
      with tempfile.TemporaryDirectory() as directory:
        entry.update(profile(runner, args.steps, directory))
    result["methods"][m] = entry
    line = f"{m:16s} blocked {entry['blocked_ms']:7.3f} ms  pipelined {entry['pipelined_ms']:7.3f} ms"
    if "kernels_per_step" in entry:
      line += f"  kernels/step {entry['kernels_per_step']:6.1f}  kernel time/step {entry['kernel_us_per_step']:8.1f} us"
    print(line, flush=True)
    for k in entry.get("top_kernels", []):
      print(f"    {k['us_per_step']:8.1f} us  x{k['calls_per_step']:4.1f}  {k['name']}")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2, default=float)
  return result


if __name__ == "__main__":
  main()
