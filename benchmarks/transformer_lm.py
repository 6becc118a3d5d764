"""Character-level Transformer LM on Python's own documentation: AdamW vs FOOF vs KFAC vs FNGD.

The corpus is ``pydoc_data.topics`` (the text of ``help()``, shipped with Python;
:mod:`neuron_optax.examples.text`), 96 characters, the last 10% held out. The model is a
small pre-LayerNorm decoder-only Transformer in Flax linen: ``nn.Embed`` plus a
learned position table, ``--layers`` blocks of causal
``nn.MultiHeadDotProductAttention`` and a GELU MLP (4x), a final LayerNorm and a
``Dense`` to the vocabulary. Every query/key/value/out projection, MLP layer and
the head is preconditioned; the embedding, the position table and the LayerNorm
parameters pass through to the chained optimizer.

Optimizers (each with a small learning-rate grid; the same initial parameters
and the same batch order for every run):

* ``sgd``:   ``optax.sgd(lr, momentum=0.9)`` (the first-order reference for step time)
* ``adamw``: ``optax.adamw(lr)`` (optax defaults: b1=0.9, b2=0.999, weight decay 1e-4)
* ``foof``:  ``chain(nox.foof(1.0), sgd(lr, momentum=0.9))``
* ``kfac``:  ``chain(nox.kfac(0.1), sgd(lr, momentum=0.9))`` (heuristic damping, empirical Fisher)
* ``fngd``:  ``chain(fngd(0.1, steps_per_epoch, batch_size), sgd(lr, momentum=0.9))``; an epoch is
  one pass over the training windows (``text.steps_per_epoch``), so the coefficients
  are computed during the first epoch and shared afterwards.

FOOF and KFAC re-factorise every step (``inverse_every=1``; pass
``--inverse-every`` to amortise). Constant learning rates, no warm-up, no clipping.

Measured:

* training loss per step (curves) and the held-out loss at the end of each run
  (the best learning rate of each method is the one with the lowest held-out loss;
  a run whose loss is not finite or exceeds 10 nats stops and counts as diverged);
* steady-state time of one jit-compiled training step (``block_until_ready``), after
  compilation, interleaved across methods in short blocks so that load on the machine
  affects all of them alike; FNGD is timed both in its first epoch (Gram matrices and
  solves) and in later epochs (shared coefficients). Ratios are median step times
  divided by AdamW's and SGD's.

On CPU, ``OPENBLAS_NUM_THREADS`` defaults to 1 (see ``benchmarks/fngd_step_time.py``).
Writes ``benchmarks/results/transformer_lm{_quick}.json`` (configuration, timings,
every run's loss curve), ``.csv`` (one row per method and learning rate) and
``.png`` (loss curves of each method's best run against steps and against
estimated time).

    python benchmarks/transformer_lm.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neuron_optax import fngd, foof, kfac, value_grad_and_stats  # noqa: E402
from neuron_optax.examples import text  # noqa: E402

DIVERGED = 10.0  # nats; the uniform distribution over the vocabulary is ln 96 = 4.56


class Block(nn.Module):
  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * self.d_model, name="mlp_in")(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d_model, name="mlp_out")(h)


class TransformerLM(nn.Module):
  d_model: int
  heads: int
  layers: int
  seq_len: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(text.VOCAB_SIZE, self.d_model, name="embed")(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), (self.seq_len, self.d_model))[: tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      x = Block(self.d_model, self.heads, name=f"block_{i}")(x, mask)
    return nn.Dense(text.VOCAB_SIZE, name="head")(nn.LayerNorm()(x))


class Method(NamedTuple):
  preconditioner: Callable[[], optax.GradientTransformationExtraArgs] | None
  optimizer: Callable[..., optax.GradientTransformation]  # takes learning_rate
  learning_rates: tuple[float, ...]
  description: str


def methods(args, steps_per_epoch: int) -> dict[str, Method]:
  sgdm = lambda learning_rate: optax.sgd(learning_rate, momentum=0.9)
  return {
    "sgd": Method(None, sgdm, (0.03, 0.1, 0.3), "sgd(lr, momentum=0.9)"),
    "adamw": Method(None, optax.adamw, (1e-3, 3e-3, 1e-2), "adamw(lr)"),
    "foof": Method(
      lambda: foof(args.foof_damping, inverse_every=args.inverse_every),
      sgdm,
      (0.1, 0.3, 1.0),
      f"foof({args.foof_damping}, inverse_every={args.inverse_every}) + sgd-m",
    ),
    "kfac": Method(
      lambda: kfac(args.kfac_damping, inverse_every=args.inverse_every),
      sgdm,
      (0.01, 0.03, 0.1),
      f"kfac({args.kfac_damping}, heuristic, inverse_every={args.inverse_every}) + sgd-m",
    ),
    "fngd": Method(
      lambda: fngd(args.fngd_alpha, steps_per_epoch=steps_per_epoch, batch_size=args.batch_size),
      sgdm,
      (0.1, 0.3, 1.0),
      f"fngd({args.fngd_alpha}, steps_per_epoch={steps_per_epoch}) + sgd-m",
    ),
  }


def lm_loss(model, params, window):
  logits = model.apply({"params": params}, window[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()


def make_step(model, method: Method):
  """(transform, jitted step). The learning rate lives in the state (inject_hyperparams)."""
  inner = optax.inject_hyperparams(method.optimizer)(learning_rate=0.0)
  parts = ([method.preconditioner()] if method.preconditioner else []) + [inner]
  tx = optax.chain(*parts)

  def loss_fn(params, window):
    return lm_loss(model, params, window)

  def step(params, opt_state, window):
    if method.preconditioner is None:
      loss, grads = jax.value_and_grad(loss_fn)(params, window)
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      loss, grads, stats = value_grad_and_stats(loss_fn)(params, window)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def init_state(tx, params, learning_rate: float, count: int | None = None):
  state = tx.init(params)
  inner = state[-1]
  hyperparams = dict(inner.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
  state = state[:-1] + (inner._replace(hyperparams=hyperparams),)
  if count is not None:  # FNGD: start in a later epoch (shared coefficients)
    state = (state[0]._replace(count=jnp.asarray(count, jnp.int32)),) + state[1:]
  return state


def train(step, tx, params, learning_rate, batches, num_steps, evaluate) -> dict[str, Any]:
  params = jax.tree.map(jnp.copy, params)
  opt_state = init_state(tx, params, learning_rate)
  losses, start = [], time.perf_counter()
  for _, window in zip(range(num_steps), batches):
    params, opt_state, loss = step(params, opt_state, window)
    losses.append(float(loss))
    if not math.isfinite(losses[-1]) or losses[-1] > DIVERGED:
      break
  diverged = len(losses) < num_steps or not math.isfinite(losses[-1]) or losses[-1] > DIVERGED
  tail = losses[-max(1, num_steps // 10) :]
  return dict(
    learning_rate=learning_rate,
    losses=losses,
    diverged=diverged,
    final_train_loss=float(np.mean(tail)) if not diverged else None,
    valid_loss=None if diverged else evaluate(params),
    seconds=time.perf_counter() - start,
  )


def time_steps(runners: dict[str, list], rounds: int, block: int) -> dict[str, float]:
  """Median seconds per step, interleaving blocks of ``block`` steps of every runner."""
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, runner in runners.items():
      step, params, state, window = runner
      for _ in range(block):
        start = time.perf_counter()
        params, state, loss = step(params, state, window)
        jax.block_until_ready((params, state, loss))
        times[name].append(time.perf_counter() - start)
      runner[1], runner[2] = params, state
  return {name: statistics.median(t) for name, t in times.items()}


def smooth(values, weight=0.9):
  out, running = [], None
  for v in values:
    running = v if running is None else weight * running + (1 - weight) * v
    out.append(running)
  return out


def plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for name, best in result["best"].items():
    if best is None:
      continue
    losses = smooth(best["losses"])
    steps = np.arange(1, len(losses) + 1)
    per_step = np.full(len(losses), result["median_step_seconds"][name])
    if name == "fngd":  # the first epoch computes the coefficients, later epochs reuse them
      per_step[: result["config"]["steps_per_epoch"]] = result["median_step_seconds"]["fngd_first_epoch"]
    seconds = np.cumsum(per_step)
    label = f"{name} (lr={best['learning_rate']:g})"
    axes[0].plot(steps, losses, label=label)
    axes[1].plot(seconds, losses, label=label)
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("seconds (cumulative median step time)")
  axes[0].set_ylabel("training loss (nats/char, EMA 0.9)")
  epoch = result["config"]["steps_per_epoch"]
  if epoch < result["config"]["steps"]:
    axes[0].axvline(epoch, color="gray", lw=0.8, ls=":")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend()
  c = result["config"]
  fig.suptitle(
    f"char Transformer LM (d={c['d_model']}, {c['layers']} layers, seq {c['seq_len']}, "
    f"batch {c['batch_size']}) on pydoc topics, {result['device']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="smaller model and corpus, 50 steps, one learning rate per method"
  )
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--d-model", type=int, default=None)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--seq-len", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--foof-damping", type=float, default=1.0)
  parser.add_argument("--kfac-damping", type=float, default=0.1)
  parser.add_argument("--fngd-alpha", type=float, default=0.1)
  parser.add_argument("--inverse-every", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=None, help="interleaved timing blocks")
  parser.add_argument("--block", type=int, default=3, help="steps per timing block")
  parser.add_argument(
    "--max-chars",
    type=int,
    default=None,
    help="use the first MAX_CHARS characters of the corpus (default 200000, quick 20000): "
    "short epochs, so FNGD shares its coefficients after the first",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--methods", default="sgd,adamw,foof,kfac,fngd")
  parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = parser.parse_args()
  quick = args.quick
  args.steps = args.steps or (50 if quick else 400)
  args.max_chars = args.max_chars or (20_000 if quick else 200_000)
  args.d_model = args.d_model or (32 if quick else 64)
  args.seq_len = args.seq_len or 32
  args.batch_size = args.batch_size or (16 if quick else 32)
  args.rounds = args.rounds or (3 if quick else 10)
  load_before = os.getloadavg()
  started = time.perf_counter()

  tokens = text.encode(text.python_docs(max_chars=args.max_chars))
  train_tokens, valid_tokens = text.split(tokens, valid_fraction=0.1)
  steps_per_epoch = text.steps_per_epoch(train_tokens, args.batch_size, args.seq_len)
  model = TransformerLM(args.d_model, args.heads, args.layers, args.seq_len)
  valid = [
    jnp.asarray(text.sample_windows(valid_tokens, args.batch_size, args.seq_len, seed=1000 + i)) for i in range(8)
  ]
  params = jax.jit(model.init)(jax.random.key(args.seed), valid[0][:, :-1])["params"]
  eval_loss = jax.jit(lambda p, w: lm_loss(model, p, w))
  evaluate = lambda p: float(np.mean([eval_loss(p, w) for w in valid]))
  all_methods = methods(args, steps_per_epoch)
  chosen = {name: all_methods[name] for name in args.methods.split(",")}
  print(
    f"corpus: {len(train_tokens)} training / {len(valid_tokens)} held-out characters; "
    f"{steps_per_epoch} steps per epoch; {args.steps} steps per run; "
    f"{sum(x.size for x in jax.tree.leaves(params))} parameters; load {load_before[0]:.1f}",
    flush=True,
  )

  runs, steps = {}, {}
  for name, method in chosen.items():
    tx, step = make_step(model, method)
    steps[name] = (tx, step)
    grid = method.learning_rates[1:2] if quick else method.learning_rates
    runs[name] = []
    for learning_rate in grid:
      batches = (
        jnp.asarray(w) for w in text.batches(train_tokens, args.batch_size, args.seq_len, seed=args.seed, epochs=None)
      )
      run = train(step, tx, params, learning_rate, batches, args.steps, evaluate)
      runs[name].append(run)
      outcome = (
        "diverged" if run["diverged"] else (f"train {run['final_train_loss']:.3f}  held-out {run['valid_loss']:.3f}")
      )
      print(f"  {name:6s} lr={learning_rate:<6g} {outcome}  ({run['seconds']:.0f} s)", flush=True)

  window = valid[0]
  runners = {}
  for name, (tx, step) in steps.items():
    lr = chosen[name].learning_rates[1]
    if name == "fngd":
      runners["fngd_first_epoch"] = [step, jax.tree.map(jnp.copy, params), init_state(tx, params, lr), window]
      runners["fngd"] = [
        step,
        jax.tree.map(jnp.copy, params),
        init_state(tx, params, lr, count=steps_per_epoch),
        window,
      ]
    else:
      runners[name] = [step, jax.tree.map(jnp.copy, params), init_state(tx, params, lr), window]
  for runner in runners.values():  # warm-up (compiled already; first-call overheads)
    runner[1], runner[2], _ = runner[0](*runner[1:])
  medians = time_steps(runners, args.rounds, args.block)
  ratio = lambda base: {n: t / medians[base] for n, t in medians.items()} if base in medians else {}

  best = {}
  for name, name_runs in runs.items():
    finished = [r for r in name_runs if not r["diverged"]]
    best[name] = min(finished, key=lambda r: r["valid_loss"]) if finished else None
  result = {
    "device": str(jax.devices()[0]),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "setting": "quick" if quick else "default",
    "config": dict(
      vars(args),
      steps_per_epoch=steps_per_epoch,
      vocab_size=text.VOCAB_SIZE,
      train_characters=int(len(train_tokens)),
      valid_characters=int(len(valid_tokens)),
      parameters=int(sum(x.size for x in jax.tree.leaves(params))),
      methods={n: m.description for n, m in chosen.items()},
    ),
    "load_average_before": load_before,
    "load_average_after": os.getloadavg(),
    "cpu_count": os.cpu_count(),
    "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    "median_step_seconds": medians,
    "step_time_ratio_to_adamw": ratio("adamw"),
    "step_time_ratio_to_sgd": ratio("sgd"),
    "runs": runs,
    "best": best,
    "wall_seconds": None,
  }

  print(f"\n{'method':18s} {'ms/step':>8s} {'/adamw':>7s} {'/sgd':>6s}  {'best lr':>7s} {'train':>6s} {'held-out':>8s}")
  for name, seconds in medians.items():
    b = best.get(name)
    tail = (
      f"{b['learning_rate']:7g} {b['final_train_loss']:6.3f} {b['valid_loss']:8.3f}"
      if b
      else ("" if name not in best else "   all runs diverged")
    )
    print(
      f"{name:18s} {1e3 * seconds:8.2f} {result['step_time_ratio_to_adamw'].get(name, float('nan')):7.2f} "
      f"{result['step_time_ratio_to_sgd'].get(name, float('nan')):6.2f}  {tail}"
    )

  os.makedirs(args.output_dir, exist_ok=True)
  stem = os.path.join(args.output_dir, "transformer_lm" + ("_quick" if quick else ""))
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      [
        "method",
        "learning_rate",
        "best",
        "diverged",
        "final_train_loss",
        "valid_loss",
        "median_step_ms",
        "step_time_ratio_to_adamw",
        "step_time_ratio_to_sgd",
      ]
    )
    for name, name_runs in runs.items():
      for r in name_runs:
        writer.writerow(
          [
            name,
            r["learning_rate"],
            r is best[name],
            r["diverged"],
            r["final_train_loss"],
            r["valid_loss"],
            1e3 * medians[name],
            result["step_time_ratio_to_adamw"].get(name),
            result["step_time_ratio_to_sgd"].get(name),
          ]
        )
    if "fngd_first_epoch" in medians:
      writer.writerow(
        [
          "fngd_first_epoch",
          "",
          "",
          "",
          "",
          "",
          1e3 * medians["fngd_first_epoch"],
          result["step_time_ratio_to_adamw"].get("fngd_first_epoch"),
          result["step_time_ratio_to_sgd"].get("fngd_first_epoch"),
        ]
      )
  plot(result, stem + ".png")
  result["wall_seconds"] = time.perf_counter() - started
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  print(
    f"wrote {stem}.json, .csv, .png in {result['wall_seconds']:.0f} s "
    f"(load average {load_before[0]:.1f} -> {result['load_average_after'][0]:.1f})"
  )


if __name__ == "__main__":
  main()
