"""Defaults that are fast and safe: amortisation and damping candidates, measured on CPU.

GitHub issue #16 asks that a transform built with only its required arguments
(``nox.foof(damping)``, ``nox.kfac(damping)``, ``nox.fngd(alpha, ...)``) costs a
few times SGD's step, not tens, and does not diverge. This script measures, in
one process, the numbers the defaults are chosen from. Every candidate is passed
explicitly, so the results do not depend on the library's current defaults.

**Step time** (``--skip-timing`` to leave out). Two workloads, both float32 on
whatever device JAX sees (the committed results: CPU):

* ``mlp``: the paper's MLP 784-1000-1000-1000-10 at batch 100;
* ``cnn``: Flax's official (linen) MNIST CNN, Conv32-3x3, avg-pool, Conv64-3x3,
  avg-pool, Dense256, Dense10 on 28x28x1 inputs at batch 128 (its first dense
  layer has 3,136 + 1 inputs).

For FOOF, KFAC (heuristic damping; empirical and Monte-Carlo Fisher) each step
kind — ``plain`` (apply the stored inverse), ``statistics`` (also update the
moving averages) and ``inversion`` (also re-factorise) — is timed on one compiled
``phase="auto"`` step (the default) by setting the step counter, interleaved
with SGD+momentum (``optax.sgd(lr, momentum=0.9)``) in rounds so that load on a
shared machine affects all alike; steps are jitted with donated parameters and
optimizer state, timed with ``block_until_ready`` after each step. The ratios
use the **CPU time** of the process per step (``time.process_time``, all
threads; medians), which does not depend on what else runs on a shared machine;
wall times (fastest and median samples) are in the JSON too. The mean over an
amortisation period of ``inverse_every=T`` steps with ``stats_window=S`` is
then ``(n_plain·t_plain + n_stats·t_stats + t_inversion) / T`` with the step
counts of the schedule (``nox.amortisation_phase``); ``T=1`` is an inversion
every step (the default before issue #16). One composed mean per workload is
checked against a directly timed run of whole periods (``direct_check`` in the
JSON). FNGD (``phase="auto"``) is timed in a computing (first-epoch) step and a
reusing step.

**Training** (``--skip-training`` to leave out). Each candidate damping (FOOF,
KFAC) or ``alpha`` (FNGD) is chained with ``optax.sgd(lr, momentum=0.9)`` for
``lr`` in 0.1 and 0.01 (the CNN, whose step is ~5x the MLP's: only 0.1, its
example's) and trained for a few hundred steps from the same
initialisation on the same batches: the MLP and the CNN on the bundled MNIST
subset (``neuron_optax.examples.data.load("mnist_subset")``, 5,000 images), and
a small character-level Transformer LM (``benchmarks/transformer_lm.py``'s
model: 2 blocks, d_model 64, 4 heads, 32 tokens, batch 32) on Python's bundled
docs. FOOF/KFAC use the candidate amortisation (``--amortisation``). A run
**diverged** if a loss is not finite or the mean loss of its last tenth of steps
is not below the first step's loss (the same initialisation and batch for
every run); it **trains** if that final loss is below 0.75 x the first one (else
``slow``). Damping and learning rate are
``optax.inject_hyperparams`` state, so one compilation serves every value.

Writes ``benchmarks/results/defaults{_quick}.json`` (machine, per-kind step
times, ratio table, every run's loss curve, summary) and ``.csv`` (one row per
ratio-table cell and per run, ``table`` column ``timing``/``training``).

    python benchmarks/defaults.py [--quick] [--skip-timing] [--skip-training]
        [--amortisation 100:10,20:none] [--timing-from PATH] [--output STEM]

The committed results ran the timing with XLA on one thread, so that idle worker
threads spinning do not count as CPU time, and the training separately::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      python benchmarks/defaults.py --skip-training --workloads mlp,cnn --output defaults_timing
    python benchmarks/defaults.py --timing-from benchmarks/results/defaults_timing.json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
try:
  import neuron_optax as nox  # noqa: E402
except ImportError:  # running from a clone without installing
  sys.path.insert(0, os.path.join(HERE, ".."))
  import neuron_optax as nox  # noqa: E402
sys.path.insert(0, HERE)

import common  # noqa: E402

from neuron_optax.examples import data, text  # noqa: E402
from neuron_optax.examples.models import MLP  # noqa: E402

RESULTS = os.path.join(HERE, "results")

# --------------------------------------------------------------------------- #
# Workloads
# --------------------------------------------------------------------------- #


class FlaxMnistCNN(nn.Module):
  """The CNN of Flax's official linen MNIST example (``examples/mnist/train.py`` before NNX)."""

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x)), window_shape=(2, 2), strides=(2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(features=64, kernel_size=(3, 3))(x)), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=256)(x))
    return nn.Dense(features=10)(x)


@dataclasses.dataclass
class Workload:
  """A model, its data and its loss: ``loss_fn(params, batch)`` is the mean cross-entropy."""

  name: str
  description: str
  model: nn.Module
  batch_size: int
  steps_per_epoch: int
  batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]  # seed -> endless (inputs, labels)
  example_input: np.ndarray

  def loss_fn(self, params, batch):
    inputs, labels = batch
    logits = self.model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def init(self, seed: int = 0):
    return self.model.init(jax.random.key(seed), self.example_input)["params"]


def _image_batches(dataset: data.Dataset, batch_size: int):
  def batches(seed: int):
    rng = np.random.default_rng(seed)
    steps = dataset.steps_per_epoch(batch_size)
    while True:
      order = rng.permutation(len(dataset))
      for k in range(steps):
        index = order[k * batch_size : (k + 1) * batch_size]
        yield dataset.images[index], dataset.labels[index]

  return batches


def mlp_workload(batch_size: int = 100, widths: Sequence[int] = (1000, 1000, 1000)) -> Workload:
  dataset = data.load("mnist_subset")
  features = tuple(widths) + (10,)
  return Workload(
    "mlp",
    f"MLP 784-{'-'.join(map(str, features))} (paper), batch {batch_size}, MNIST subset",
    MLP(features),
    batch_size,
    dataset.steps_per_epoch(batch_size),
    _image_batches(dataset, batch_size),
    dataset.images[:2],
  )


def cnn_workload(batch_size: int = 128) -> Workload:
  dataset = data.load("mnist_subset", layout="nhwc")
  return Workload(
    "cnn",
    f"Flax's official MNIST CNN (Conv32, Conv64, Dense256, Dense10), batch {batch_size}, MNIST subset",
    FlaxMnistCNN(),
    batch_size,
    dataset.steps_per_epoch(batch_size),
    _image_batches(dataset, batch_size),
    dataset.images[:2],
  )


def transformer_workload(
  batch_size: int = 32, seq_len: int = 32, d_model: int = 64, heads: int = 4, layers: int = 2, chars: int = 60_000
) -> Workload:
  import transformer_lm  # benchmarks/transformer_lm.py: the char LM's model

  tokens = text.encode(text.python_docs(max_chars=chars))

  def batches(seed: int):
    for window in text.batches(tokens, batch_size, seq_len, seed=seed, epochs=None):
      yield window[:, :-1], window[:, 1:]

  return Workload(
    "transformer",
    f"char-level Transformer LM ({layers} blocks, d_model {d_model}, {heads} heads, {seq_len} tokens), "
    f"batch {batch_size}, first {chars:,} characters of Python's docs",
    transformer_lm.TransformerLM(d_model, heads, layers, seq_len),
    batch_size,
    text.steps_per_epoch(tokens, batch_size, seq_len),
    batches,
    np.zeros((2, seq_len), np.int32),
  )


WORKLOADS: dict[str, Callable[[], Workload]] = {
  "mlp": mlp_workload,
  "cnn": cnn_workload,
  "transformer": transformer_workload,
}

# --------------------------------------------------------------------------- #
# Methods: the preconditioner's hyperparameter and the learning rate live in the optimizer state
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Spec:
  """A method of this benchmark: ``hyperparameter`` is ``"damping"``/``"alpha"`` (``None`` for SGD)."""

  name: str
  fisher: str | None  # None: jax.value_and_grad
  hyperparameter: str | None
  label: str
  amortised: bool = False


SPECS: dict[str, Spec] = {
  s.name: s
  for s in (
    Spec("sgd", None, None, "SGD+momentum"),
    Spec("foof", "empirical", "damping", "FOOF", amortised=True),
    Spec("kfac", "empirical", "damping", "KFAC (heuristic, empirical Fisher)", amortised=True),
    Spec("kfac_mc", "mc", "damping", "KFAC (heuristic, MC Fisher)", amortised=True),
    Spec("fngd", "empirical", "alpha", "FNGD"),
    Spec("natural_gradient", "mc", "damping", "natural gradient (MC Fisher)"),
  )
}


def make_tx(
  spec: Spec,
  value: float,
  lr: float,
  *,
  inverse_every: int = 1,
  stats_window: int | None = None,
  steps_per_epoch: int | None = None,
  batch_size: int | None = None,
) -> optax.GradientTransformation:
  """``chain(preconditioner(value), sgd(lr, momentum=0.9))``, both under ``inject_hyperparams``."""
  sgd = optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))(learning_rate=lr, momentum=0.9)
  if spec.name == "sgd":
    return sgd
  if spec.name == "foof":
    pre = optax.inject_hyperparams(nox.foof, static_args=("inverse_every", "stats_window"))(
      damping=value, inverse_every=inverse_every, stats_window=stats_window
    )
  elif spec.name in ("kfac", "kfac_mc"):
    pre = optax.inject_hyperparams(nox.kfac, static_args=("inverse_every", "stats_window"))(
      damping=value, inverse_every=inverse_every, stats_window=stats_window
    )
  elif spec.name == "fngd":
    pre = optax.inject_hyperparams(nox.fngd, static_args=("steps_per_epoch", "batch_size"))(
      alpha=value, steps_per_epoch=steps_per_epoch, batch_size=batch_size
    )
  elif spec.name == "natural_gradient":
    pre = optax.inject_hyperparams(nox.natural_gradient, static_args=("max_columns",))(damping=value, max_columns=None)
  else:
    raise ValueError(spec.name)
  return optax.chain(pre, sgd)


def make_step(w: Workload, spec: Spec, tx: optax.GradientTransformation, seed: int = 0):
  """``step(params, opt_state, batch, step_index) -> (params, opt_state, loss)``, jitted, donating."""
  if spec.fisher is None:

    def step(params, opt_state, batch, index):
      del index
      loss, grads = jax.value_and_grad(w.loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  else:
    likelihood = None if spec.fisher == "empirical" else "categorical"
    capture = nox.value_grad_and_stats(w.loss_fn, fisher=spec.fisher, likelihood=likelihood)
    key = jax.random.key(seed)

    def step(params, opt_state, batch, index):
      kwargs = {"rng": jax.random.fold_in(key, index)} if spec.fisher == "mc" else {}
      loss, grads, stats = capture(params, batch, **kwargs)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def set_count(opt_state, count: int):
  """``opt_state`` with the step counter of every FOOF/KFAC/FNGD state set to ``count``."""

  def visit(node):
    if isinstance(node, (nox.FoofState, nox.KfacState, nox.FngdState)):
      return node._replace(count=jnp.asarray(count, node.count.dtype))
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(visit(x) for x in node))
    if isinstance(node, tuple):
      return tuple(visit(x) for x in node)
    return node

  return visit(opt_state)


def _copy(tree):
  return jax.tree.map(jnp.array, tree)


# --------------------------------------------------------------------------- #
# Step time
# --------------------------------------------------------------------------- #

TIMED = ("foof", "kfac", "kfac_mc")
CANDIDATE_PERIODS = (1, 5, 10, 20, 50, 100, 200)
CANDIDATE_WINDOWS = (None, 1, 5, 10, 20, 50)


class Timer:
  """One compiled step with its state; ``run(count)`` times one step taken at schedule step ``count``."""

  def __init__(self, w: Workload, spec: Spec, tx, params, batch):
    self.step = make_step(w, spec, tx)
    self.params = _copy(params)
    self.state = _copy(tx.init(self.params))  # distinct buffers: the step donates them
    self.batch = batch
    self.index = 0

  def run(self, count: int | None) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one step."""
    state = self.state if count is None else set_count(self.state, count)
    start, start_cpu = time.perf_counter(), time.process_time()
    self.params, self.state, loss = self.step(self.params, state, self.batch, self.index)
    jax.block_until_ready((self.params, self.state, loss))
    self.index += 1
    return time.perf_counter() - start, time.process_time() - start_cpu


def time_workload(w: Workload, rounds: int, reps: int, direct_period: int) -> dict[str, Any]:
  """Median step time of SGD and of every kind of step of each method, interleaved."""
  params = w.init()
  batch = tuple(jnp.asarray(a) for a in next(w.batches(0)))
  # One phase="auto" program: T=4, S=2 has all three kinds (count 0: inversion, 1: plain, 3: statistics).
  kinds = {"inversion": 0, "plain": 1, "statistics": 3}
  timers: dict[str, tuple[Timer, dict[str, int | None]]] = {
    "sgd": (Timer(w, SPECS["sgd"], make_tx(SPECS["sgd"], 0.0, 0.01), params, batch), {"step": None})
  }
  for name in TIMED:
    tx = make_tx(SPECS[name], 1.0, 0.01, inverse_every=4, stats_window=2)
    timers[name] = (Timer(w, SPECS[name], tx, params, batch), kinds)
  tx = make_tx(SPECS["fngd"], 1.0, 0.01, steps_per_epoch=w.steps_per_epoch, batch_size=w.batch_size)
  timers["fngd"] = (Timer(w, SPECS["fngd"], tx, params, batch), {"compute": 0, "reuse": w.steps_per_epoch})

  compile_s = {}
  for name, (timer, counts) in timers.items():  # compile and warm up every kind
    start = time.perf_counter()
    for count in counts.values():
      timer.run(count)
    compile_s[name] = time.perf_counter() - start
  samples: dict[str, dict[str, list[tuple[float, float]]]] = {n: {k: [] for k in c} for n, (_, c) in timers.items()}
  for r in range(rounds):
    for name, (timer, counts) in timers.items():
      for kind, count in counts.items():
        n = 1 if kind == "inversion" and r % 2 else reps  # inversions are the slowest: fewer samples
        samples[name][kind].extend(timer.run(count) for _ in range(n))
    sgd = samples["sgd"]["step"]
    print(
      f"  [{w.name}] round {r + 1}/{rounds}: sgd {1e3 * statistics.median(t for t, _ in sgd):.1f} ms wall, "
      f"{1e3 * statistics.median(c for _, c in sgd):.1f} ms CPU",
      flush=True,
    )
  # CPU time of the process (all its threads) per step: what a step costs, whatever else runs on the
  # machine. The fastest wall time is kept beside it.
  cpu = {n: {k: statistics.median(c for _, c in v) for k, v in s.items()} for n, s in samples.items()}
  best = {n: {k: min(t for t, _ in v) for k, v in s.items()} for n, s in samples.items()}
  medians = {n: {k: statistics.median(t for t, _ in v) for k, v in s.items()} for n, s in samples.items()}

  # Check the composition once: whole periods of FOOF at T=direct_period, S=None, timed directly.
  tx = make_tx(SPECS["foof"], 1.0, 0.01, inverse_every=direct_period)
  timer = Timer(w, SPECS["foof"], tx, params, batch)
  for _ in range(direct_period):  # compile, one period
    timer.run(None)
  sgd_timer = timers["sgd"][0]
  direct, sgd_direct = [], []
  for _ in range(3):
    direct.append(sum(timer.run(None)[1] for _ in range(direct_period)) / direct_period)
    sgd_direct.append(statistics.median(sgd_timer.run(None)[1] for _ in range(max(3, direct_period // 2))))
  composed = (cpu["foof"]["inversion"] + (direct_period - 1) * cpu["foof"]["statistics"]) / direct_period
  return {
    "description": w.description,
    "batch_size": w.batch_size,
    "cpu_seconds": cpu,
    "best_wall_seconds": best,
    "median_wall_seconds": medians,
    "samples": {n: {k: len(v) for k, v in s.items()} for n, s in samples.items()},
    "compile_and_warmup_seconds": compile_s,
    "direct_check": {
      "method": "foof",
      "inverse_every": direct_period,
      "stats_window": None,
      "direct_period_mean_ratio": statistics.median(direct) / statistics.median(sgd_direct),
      "composed_period_mean_ratio": composed / cpu["sgd"]["step"],
    },
  }


def period_ratio(times: dict[str, float], sgd: float, inverse_every: int, stats_window: int | None) -> float:
  counts = common.kind_counts(inverse_every, stats_window)
  return sum(counts[k] * times[k] for k in counts) / inverse_every / sgd


def ratio_table(timing: dict[str, Any]) -> list[dict[str, Any]]:
  rows = []
  for workload, result in timing.items():
    best = result["cpu_seconds"]
    sgd = best["sgd"]["step"]
    for name in TIMED:
      for t in CANDIDATE_PERIODS:
        for s in CANDIDATE_WINDOWS:
          if s is not None and s >= t and t > 1:
            continue
          if t == 1 and s is not None:
            continue
          rows.append(
            dict(
              table="timing",
              workload=workload,
              method=name,
              inverse_every=t,
              stats_window="none" if s is None else s,
              period_mean_ratio=round(period_ratio(best[name], sgd, t, s), 3),
              plain_ratio=round(best[name]["plain"] / sgd, 3),
              statistics_ratio=round(best[name]["statistics"] / sgd, 3),
              inversion_ratio=round(best[name]["inversion"] / sgd, 3),
              sgd_cpu_ms=round(1e3 * sgd, 3),
            )
          )
    rows.append(
      dict(
        table="timing",
        workload=workload,
        method="fngd",
        compute_ratio=round(best["fngd"]["compute"] / sgd, 3),
        reuse_ratio=round(best["fngd"]["reuse"] / sgd, 3),
        sgd_cpu_ms=round(1e3 * sgd, 3),
      )
    )
  return rows


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def classify(losses: Sequence[float], steps: int) -> tuple[str, float | None, float]:
  """``(status, final, initial)``: ``diverged`` / ``slow`` / ``trains`` (see the module docstring)."""
  initial = float(losses[0])  # the same first batch and initialisation for every run
  if len(losses) < steps or not all(math.isfinite(v) for v in losses):
    return "diverged", None, initial
  final = float(np.mean(losses[-max(5, steps // 10) :]))
  if not final < initial:
    return "diverged", final, initial
  return ("trains" if final < 0.75 * initial else "slow"), final, initial


class Trainer:
  """Trains one workload with many methods and hyperparameters, compiling once per method and schedule."""

  def __init__(self, w: Workload, steps: int, seed: int = 0):
    self.w = w
    self.steps = steps
    self.params = w.init(seed)
    batches = w.batches(seed)
    self.batches = [tuple(jnp.asarray(a) for a in next(batches)) for _ in range(steps)]
    self.compiled: dict[tuple, Any] = {}

  def run(
    self, spec: Spec, value: float | None, lr: float, inverse_every: int = 1, stats_window: int | None = None
  ) -> dict[str, Any]:
    amortisation = dict(inverse_every=inverse_every, stats_window=stats_window) if spec.amortised else {}
    options = dict(amortisation, steps_per_epoch=self.w.steps_per_epoch, batch_size=self.w.batch_size)
    if spec.name != "fngd":
      options = amortisation
    tx = make_tx(spec, 0.0 if value is None else value, lr, **options)
    key = (spec.name, tuple(sorted(amortisation.items())))
    if key not in self.compiled:
      self.compiled[key] = make_step(self.w, spec, tx)
    step = self.compiled[key]
    params = _copy(self.params)
    opt_state = _copy(tx.init(params))
    losses, start = [], time.perf_counter()
    for index, batch in enumerate(self.batches):
      params, opt_state, loss = step(params, opt_state, batch, index)
      losses.append(float(loss))
      if not math.isfinite(losses[-1]) or losses[-1] > 100 * max(losses[0], 1.0):
        break
    status, final, initial = classify(losses, self.steps)
    return dict(
      table="training",
      workload=self.w.name,
      method=spec.name,
      fisher=spec.fisher,
      hyperparameter=spec.hyperparameter,
      value=value,
      lr=lr,
      inverse_every=inverse_every if spec.amortised else None,
      stats_window=("none" if stats_window is None else stats_window) if spec.amortised else None,
      steps=self.steps,
      status=status,
      initial_loss=round(initial, 4),
      final_loss=None if final is None else round(final, 4),
      seconds=round(time.perf_counter() - start, 2),
      losses=[round(v, 5) if math.isfinite(v) else str(v) for v in losses],
    )


CANDIDATES = {  # the candidate defaults checked for divergence (hyperparameter_guide.py: wider grids)
  "foof": (1.0,),
  "kfac": (0.1, 1.0),
  "kfac_mc": (1.0,),
  "fngd": (0.1, 1.0),
}
# The CNN's step is ~5x the MLP's on CPU: only the learning rate of Flax's example (0.1) there.
LEARNING_RATES = {"mlp": (0.1, 0.01), "cnn": (0.1,), "transformer": (0.1, 0.01)}
TRAIN_STEPS = {"mlp": 300, "cnn": 150, "transformer": 200}


def parse_amortisation(text_value: str) -> list[tuple[int, int | None]]:
  out = []
  for item in text_value.split(","):
    t, s = item.split(":")
    out.append((int(t), None if s.lower() == "none" else int(s)))
  return out


def train_candidates(
  workloads: Sequence[str], schedules: Sequence[tuple[int, int | None]], steps: dict[str, int], candidates=CANDIDATES
) -> list[dict[str, Any]]:
  rows = []
  for name in workloads:
    trainer = Trainer(WORKLOADS[name](), steps[name])
    lrs = LEARNING_RATES[name]
    plan = [(SPECS["sgd"], None, lr, 1, None) for lr in lrs]
    for method, values in candidates.items():
      spec = SPECS[method]
      for t, s in schedules if spec.amortised else [(1, None)]:
        plan += [(spec, v, lr, t, s) for v in values for lr in lrs]
    for spec, value, lr, t, s in plan:
      row = trainer.run(spec, value, lr, t, s)
      rows.append(row)
      amort = f" T={t} S={row['stats_window']}" if spec.amortised else ""
      print(
        f"  [{name}] {spec.name:7s} {spec.hyperparameter or '':7s}={value!s:6s} lr={lr:<5}{amort}: {row['status']:8s} "
        f"{row['initial_loss']:.3f} -> {row['final_loss']} ({row['seconds']:.0f} s)",
        flush=True,
      )
  return rows


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def summarise(timing: dict[str, Any], table: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Worst period-mean ratio over workloads and methods per (T, S), and the candidates' statuses."""
  summary: dict[str, Any] = {}
  if table:
    worst: dict[str, dict[str, float]] = {}
    for row in table:
      if row["method"] == "fngd":
        continue
      key = f"T={row['inverse_every']},S={row['stats_window']}"
      cell = worst.setdefault(key, {})
      cell[f"{row['workload']}/{row['method']}"] = row["period_mean_ratio"]
    summary["period_mean_ratio"] = {k: dict(v, max=max(v.values())) for k, v in worst.items()}
  if runs:
    statuses: dict[str, dict[str, str]] = {}
    for row in runs:
      amort = f",T={row['inverse_every']},S={row['stats_window']}" if row["inverse_every"] else ""
      key = f"{row['method']}({row['hyperparameter'] or ''}={row['value']}{amort}) lr={row['lr']}"
      statuses.setdefault(key, {})[row["workload"]] = row["status"]
    summary["training_status"] = statuses
  return summary


def write(result: dict[str, Any], rows: list[dict[str, Any]], stem: str) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
    json.dump(result, f, indent=1)
  fields: list[str] = []
  for row in rows:
    fields += [k for k in row if k not in fields and k != "losses"]
  with open(os.path.join(RESULTS, stem + ".csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  print(f"wrote {os.path.join(RESULTS, stem)}.json/.csv")


def print_timing(table: list[dict[str, Any]]) -> None:
  shown = [(1, None), (10, None), (20, None), (50, 10), (100, 10), (100, 50)]
  for workload in dict.fromkeys(r["workload"] for r in table):
    print(f"\n{workload}: period-mean step time / SGD+momentum (plain · statistics · inversion step)")
    for row in table:
      if row["workload"] != workload:
        continue
      if row["method"] == "fngd":
        print(f"  fngd: computing step {row['compute_ratio']:.2f}, reusing step {row['reuse_ratio']:.2f}")
        continue
      key = (row["inverse_every"], None if row["stats_window"] == "none" else row["stats_window"])
      if key in shown:
        print(
          f"  {row['method']:8s} T={key[0]:<4d} S={row['stats_window']!s:5s} {row['period_mean_ratio']:6.2f}   "
          f"({row['plain_ratio']:.2f} · {row['statistics_ratio']:.2f} · {row['inversion_ratio']:.2f})"
        )


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer timing rounds and training steps (a smoke run)")
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--skip-training", action="store_true")
  parser.add_argument("--workloads", default="mlp,cnn,transformer", help="comma-separated (timing: mlp, cnn)")
  parser.add_argument(
    "--amortisation", default="100:10", help="T:S pairs for FOOF/KFAC in the training runs, e.g. 20:none,100:10"
  )
  parser.add_argument("--timing-from", default=None, help="reuse the timing of an earlier run's JSON")
  parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 4; --quick 2)")
  parser.add_argument("--output", default=None, help="file stem in benchmarks/results (default: defaults[_quick])")
  args = parser.parse_args(argv)
  workloads = args.workloads.split(",")
  rounds = args.rounds or (2 if args.quick else 4)
  steps = {k: (30 if args.quick else v) for k, v in TRAIN_STEPS.items()}
  started = time.perf_counter()

  timing: dict[str, Any] = {}
  timing_machine = None
  if args.timing_from:
    with open(args.timing_from) as f:
      earlier = json.load(f)
    timing, timing_machine = earlier["timing"], earlier["machine"]
  elif not args.skip_timing:
    for name in workloads:
      if name in ("mlp", "cnn"):
        print(f"timing {name} ...", flush=True)
        timing[name] = time_workload(WORKLOADS[name](), rounds, reps=2 if args.quick else 3, direct_period=10)
  table = ratio_table(timing)
  if table:
    print_timing(table)
  runs = []
  if not args.skip_training:
    print("\ntraining the candidates ...", flush=True)
    runs = train_candidates(workloads, parse_amortisation(args.amortisation), steps)
  result = dict(
    machine=common.machine_info(),
    timing_machine=timing_machine,  # with --timing-from: the machine (and XLA_FLAGS) of the timing run
    arguments=vars(args),
    seconds=round(time.perf_counter() - started, 1),
    timing=timing,
    ratio_table=table,
    runs=runs,
    summary=summarise(timing, table, runs),
  )
  write(result, table + runs, args.output or ("defaults_quick" if args.quick else "defaults"))
  return result


if __name__ == "__main__":
  main()
