"""Cosine similarity of the KFAC and FOOF directions against damping (Benzing 2022, Fig. 3B).

An MLP (784-1000-1000-1000-10 by default) is trained a little (``--train-steps``
steps of SGD with momentum, batch 100) on the embedded 5,000-image MNIST subset;
then, on ``--batches`` fresh mini-batches, each layer's gradient is
preconditioned with factors of that batch alone (no moving average), for every
damping ``λ`` of a log grid:

* heuristic damping — the formula of ``nox.kfac_foof_similarity(grads, stats, λ)``
  (evaluated with a traced ``λ`` so that one compilation serves every damping,
  and checked against that function at three dampings on the first batch):
  ``KFAC = (A + π√λ I)⁻¹ ∇W (G + √λ/π I)⁻¹`` against
  ``FOOF = (A + π√λ I)⁻¹ ∇W`` (the paper's App. D.9 FOOF, which uses KFAC's own
  first damped factor), ``π = sqrt((tr A/dim A)/(tr G/dim G))``;
* standard damping — ``vec KFAC = (A⊗G + λI)⁻¹ vec ∇W`` (eigendecompositions of
  ``A`` and ``G``, as in ``nox.kfac(damping_mode="standard")``) against the same
  FOOF direction as above;
* for reference, the plain gradient ``∇W`` against that FOOF direction.

The similarity is ``<D_1, D_2> / (‖D_1‖ ‖D_2‖)`` over the layer's weight matrix
(bias row included). ``G`` is the Monte-Carlo Fisher's (one sampled label per
example, ``--fisher``), KFAC's usual choice. Expected: with heuristic damping the
similarity rises towards 1 as ``λ`` grows (the second factor tends to a
multiple of the identity); with standard damping it stays low until ``λ``
dominates both factors.

Outputs: ``benchmarks/results/similarity[_quick].csv`` (``mode, layer, damping,
batch, cosine``), ``.json`` (settings, mean/std per layer and damping) and
``.png`` (one panel per layer, mean ± std over the batches).

    python benchmarks/similarity.py --quick
    python benchmarks/similarity.py
"""

from __future__ import annotations

import argparse
import csv
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
from flax.traverse_util import flatten_dict  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import models  # noqa: E402

import neuron_optax as nox  # noqa: E402
from neuron_optax.examples import data as nox_data  # noqa: E402

MODES = ("heuristic", "standard", "gradient")


def train_a_bit(model, dataset, steps: int, batch_size: int, lr: float, seed: int):
  params = model.init(jax.random.key(seed), dataset.images[:1])["params"]
  tx = optax.sgd(lr, momentum=0.9)
  step = jax.jit(models.make_step(model, tx, None))
  opt_state = tx.init(params)
  loss = float("nan")
  batches = nox_data.batches(dataset, batch_size, seed=seed, epochs=None)
  for index in range(steps):
    batch = next(batches)
    params, _, opt_state, loss = step(params, {}, opt_state, batch["image"], batch["label"], np.int32(index))
  return params, float(loss)


def layer_factors(grads, stats) -> dict[str, tuple]:
  """Per layer: the gradient matrix and the batch's ``A``, ``G`` (λ-independent)."""
  flat = flatten_dict(grads)
  out = {}
  for key, s in stats.items():
    # The layer's (d_in + 1, d_out) gradient matrix: the Dense kernel with the bias as last row.
    kernel = flat[key + ("kernel",)].reshape(-1, s.d_out)
    gradient = jnp.concatenate([kernel, flat[key + ("bias",)].reshape(1, s.d_out)]).astype(jnp.float32)
    a = s.input_moment(jnp.float32)  # the batch's A and G, as kfac's
    g = s.cotangent_moment(jnp.float32)
    out[common.layer_name(key)] = (gradient, a, g)
  return out


def _cosine(x, y):
  return jnp.vdot(x, y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y))


def _damped_inverse(m, damping):
  return jnp.linalg.inv(m + damping * jnp.eye(m.shape[0], dtype=m.dtype))


def _kronecker_eigen_solve(a_eigh, g_eigh, gradient, damping):
  """``D`` with ``A D G + λD = ∇W`` (standard damping), in the factors' eigenbases."""
  (a_values, a_vectors), (g_values, g_vectors) = a_eigh, g_eigh
  rotated = a_vectors.T @ gradient @ g_vectors
  divisors = jnp.maximum(a_values, 0)[:, None] * jnp.maximum(g_values, 0)[None, :] + damping
  return a_vectors @ (rotated / divisors) @ g_vectors.T


@jax.jit
def layer_cosines(gradient, a, g, a_eigh, g_eigh, damping):
  """``(heuristic, standard, gradient)`` cosines to FOOF for one layer and a traced ``λ``.

  The heuristic one is ``kfac_foof_similarity``'s formula (checked against it
  in :func:`similarities`); the standard one solves ``A D G + λD = ∇W`` in the factors' eigenbases.
  """
  pi = jnp.sqrt((jnp.trace(a) / a.shape[0]) / (jnp.trace(g) / g.shape[0]))  # Martens & Grosse's π
  root = jnp.sqrt(damping)
  foof = _damped_inverse(a, pi * root) @ gradient
  heuristic = foof @ _damped_inverse(g, root / pi)
  standard = _kronecker_eigen_solve(a_eigh, g_eigh, gradient, damping)
  return _cosine(heuristic, foof), _cosine(standard, foof), _cosine(gradient, foof)


def similarities(grads, stats, dampings, check: bool = False) -> tuple[dict, float | None]:
  """``{mode: {layer: [cosine per damping]}}`` for one batch, and (``check``) the largest
  difference of the heuristic cosines from ``nox.kfac_foof_similarity``'s at three dampings."""
  out = {mode: {} for mode in MODES}
  factors = layer_factors(grads, stats)
  eighs = {
    layer: (jnp.linalg.eigh((a + a.T) / 2), jnp.linalg.eigh((g + g.T) / 2)) for layer, (_, a, g) in factors.items()
  }
  for damping in dampings:
    for layer, (gradient, a, g) in factors.items():
      values = layer_cosines(gradient, a, g, *eighs[layer], jnp.float32(damping))
      for mode, value in zip(MODES, values):
        out[mode].setdefault(layer, []).append(float(value))
  deviation = None
  if check:
    deviation = 0.0
    for i in sorted({0, len(dampings) // 2, len(dampings) - 1}):
      reference = nox.kfac_foof_similarity(grads, stats, float(dampings[i]))
      for layer, value in reference.items():
        deviation = max(deviation, abs(float(value) - out["heuristic"][layer][i]))
  return out, deviation


def plot(summary: dict[str, Any], dampings, path: str, title: str) -> bool:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot")
    return False
  layers = list(summary["heuristic"])
  fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.6), squeeze=False, sharey=True)
  styles = {
    "heuristic": ("KFAC, heuristic damping", "-", "tab:blue"),
    "standard": ("KFAC, standard damping", "--", "tab:red"),
    "gradient": ("gradient (SGD direction)", ":", "tab:gray"),
  }
  for ax, layer in zip(axes[0], layers):
    for mode in MODES:
      label, style, color = styles[mode]
      mean = np.asarray(summary[mode][layer]["mean"])
      std = np.asarray(summary[mode][layer]["std"])
      ax.plot(dampings, mean, style, color=color, label=label, marker="o", markersize=3)
      ax.fill_between(dampings, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("damping λ")
    ax.set_title(layer, fontsize=10)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("cosine similarity to FOOF")
  axes[0][0].legend(fontsize=7, loc="lower right")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="MLP 784-256-256-10, 2 batches, 10 dampings")
  parser.add_argument("--width", type=int, default=None)
  parser.add_argument("--train-steps", type=int, default=50, help="SGD+M steps before measuring (1 epoch)")
  parser.add_argument("--lr", type=float, default=0.03)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--batches", type=int, default=None, help="batches to average over (5)")
  parser.add_argument("--dampings", default=None, help="comma-separated; default 1e-6 ... 1e3, 19 points")
  parser.add_argument("--fisher", default="mc", choices=("mc", "empirical", "full"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = parser.parse_args(argv)
  args.width = args.width or (256 if args.quick else 1000)
  args.batches = args.batches or (2 if args.quick else 5)
  if args.dampings:
    args.dampings = [float(x) for x in args.dampings.split(",")]
  else:
    args.dampings = list(np.logspace(-6, 3, 10 if args.quick else 19))
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  info = common.machine_info()
  started = time.perf_counter()
  dataset = nox_data.load("mnist_subset")
  features = ((args.width,) * 2 if args.quick else (args.width,) * 3) + (10,)
  model = models.MLP(features)
  name = "MLP 784-" + "-".join(map(str, features))
  params, train_loss = train_a_bit(model, dataset, args.train_steps, args.batch_size, args.lr, args.seed)
  print(f"{name}: {args.train_steps} SGD+M steps (lr {args.lr}), last mini-batch loss {train_loss:.3f}", flush=True)

  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  capture = jax.jit(
    nox.value_grad_and_stats(
      loss_fn, fisher=args.fisher, likelihood=None if args.fisher == "empirical" else "categorical"
    )
  )
  batches = nox_data.batches(dataset, args.batch_size, seed=args.seed + 1, epochs=None)
  per_batch, check = [], None
  for b in range(args.batches):
    batch = next(batches)
    kwargs = {"rng": jax.random.key(1000 + b)} if args.fisher == "mc" else {}
    _, grads, stats = capture(params, batch["image"], batch["label"], **kwargs)
    similarity, deviation = similarities(grads, stats, args.dampings, check=b == 0)
    per_batch.append(similarity)
    if deviation is not None:
      check = deviation
      print(f"  heuristic cosines vs nox.kfac_foof_similarity: max |difference| {deviation:.2e}", flush=True)
    print(
      f"  batch {b}: "
      + ", ".join(f"{layer} {v[0]:.2f}..{v[-1]:.2f}" for layer, v in per_batch[-1]["heuristic"].items()),
      flush=True,
    )

  summary = {
    mode: {
      layer: {
        "mean": list(np.mean([pb[mode][layer] for pb in per_batch], 0)),
        "std": list(np.std([pb[mode][layer] for pb in per_batch], 0)),
      }
      for layer in per_batch[0][mode]
    }
    for mode in MODES
  }
  suffix = "_quick" if args.quick else ""
  os.makedirs(args.output_dir, exist_ok=True)
  base = os.path.join(args.output_dir, f"similarity{suffix}")
  with open(base + ".csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["mode", "layer", "damping", "batch", "cosine"])
    for b, pb in enumerate(per_batch):
      for mode in MODES:
        for layer, values in pb[mode].items():
          writer.writerows([mode, layer, d, b, v] for d, v in zip(args.dampings, values))
  title = (
    f"KFAC vs FOOF cosine similarity, {name} after {args.train_steps} SGD steps, {args.fisher} Fisher, "
    f"mean ± std over {args.batches} batches of {args.batch_size} (cf. Benzing 2022, Fig. 3B)"
  )
  plotted = plot(summary, args.dampings, base + ".png", title)
  result = {
    "machine": info,
    "args": vars(args),
    "model": name,
    "train_loss": train_loss,
    "dampings": args.dampings,
    "summary": summary,
    "max_difference_from_kfac_foof_similarity": check,
    "plot": base + ".png" if plotted else None,
    "total_seconds": time.perf_counter() - started,
  }
  with open(base + ".json", "w") as f:
    json.dump(result, f, indent=1, default=float)
  print("\n| layer | mode | " + " | ".join(f"λ={d:.0e}" for d in args.dampings[::3]) + " |")
  print("|---|---|" + "---:|" * len(args.dampings[::3]))
  for layer in summary["heuristic"]:
    for mode in MODES:
      print(f"| {layer} | {mode} | " + " | ".join(f"{v:.2f}" for v in summary[mode][layer]["mean"][::3]) + " |")
  print(f"\ntotal {result['total_seconds']:.0f} s; wrote {base}.csv/.json/.png")
  return result


if __name__ == "__main__":
  main()
