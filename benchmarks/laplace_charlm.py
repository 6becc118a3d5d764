"""Calibration of the Transformer benchmark's char-LM: MAP, temperature scaling, last-layer, KFAC and LoRA Laplace.

Setup (float32, as the Transformer benchmark). The corpus and the three contiguous splits of
``benchmarks/transformer_lm.py`` (Python's bundled docs, 96 characters; train 80 %, validation 10 %, test 10 %)
and its model, ``TransformerLM`` unrolled (``nn.Embed`` + position table, ``--layers`` pre-LN blocks of causal
attention and a GELU MLP, final LayerNorm, untied ``Dense`` head; d64, 4 heads, 2 layers, context 64 by default),
trained to a MAP with AdamW (``--steps`` steps of batch 32, cosine schedule with warm-up, weight decay 0.1 on
kernels and the embedding, clipping 1.0). Every number is next-character prediction on held-out windows:
validation (τ and ``T`` choices) and test (every reported number).

Methods, each with held-out NLL, ECE (15 bins, top-1 confidence), accuracy, the reliability bins and the cost:

* **MAP** and **temperature scaling** (one ``T`` on the validation NLL).
* **Laplace** posteriors around the MAP from the Monte-Carlo Fisher (``fisher="mc"``, one sampled next character
  per position) of ``--fisher-batch`` training windows: **last-layer KFAC** (the head only: a sub-dict of
  ``stats``), **last-block KFAC** (the last block's attention and MLP layers and the head) and **all-layer
  KFAC** (embedding, every attention and MLP layer, head; LayerNorms and the position table held at the MAP).
* **LoRA**: flax.linen has no LoRA module, so the adapters are written as ``nnx.LoRALinear``'s are captured: two
  bias-free ``Dense`` layers ``lora_b(lora_a(x))`` (rank ``--lora-rank``, ``lora_b`` initialised to zero)
  beside each MLP layer of every block and beside the head; the base weights are frozen. The MAP is fine-tuned
  for ``--lora-steps`` more steps on the training split with only the adapters trained (AdamW, weight decay 0);
  rows: **LoRA MAP**, its temperature scaling and **LoRA-Laplace** (KFAC over the adapters only).

Laplace rows use ``nox.glm_predictive(..., link_approx="probit", num_samples=S)``: ``S`` exact posterior samples
pushed through one JVP each, no Jacobian over the vocabulary formed. Sequences are the examples: the captured
Fisher is that of a window's NLL averaged over its ``P`` positions, so ``dataset_size = N·P²`` with ``N`` the
number of training windows (the curvature of the NLL summed over all training tokens; ``nox.laplace_sample``'s
docstring). ``τ`` from the marginal likelihood (``nox.tune_prior_precision``) and from the validation NLL
(``nox.grid_search_prior_precision``). Cost: *fit s* the compiled capture + evidence ``τ`` + validation grid,
*predict s* the test predictive (compilation excluded; MAP rows: the training, compilation included).

``--train-chars N --steps S --weight-decay W``: the MAP trained on the first ``N`` training characters only (an
over-fitted, over-confident MAP for a long enough run).

    python benchmarks/laplace_charlm.py            # about 10 min on a shared 2-core machine
    python benchmarks/laplace_charlm.py --quick    # seconds; the smoke test

Writes ``benchmarks/results/laplace_charlm[_quick].{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibration as cal  # noqa: E402
import common  # noqa: E402
import transformer_lm as tlm  # noqa: E402

import neuron_optax as nox  # noqa: E402
from neuron_optax.examples import text  # noqa: E402


class LoraBlock(nn.Module):
  """``transformer_lm.Block`` with a LoRA adapter ``lora_b(lora_a(x))`` beside each MLP layer (same base names)."""

  d_model: int
  heads: int
  rank: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm(name="ln_attention")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(h, mask=mask)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.gelu(lora_dense("mlp_in", 4 * self.d_model, self.rank, h))
    return x + lora_dense("mlp_out", self.d_model, self.rank, h)


def lora_dense(name: str, features: int, rank: int, x):
  """``Dense(name)(x) + lora_b(lora_a(x))`` inside a compact method: the adapter is two bias-free dense layers
  (as the library captures ``nnx.LoRALinear``), ``lora_b`` starts at zero."""
  down = nn.Dense(rank, use_bias=False, name=f"{name}_lora_a")(x)
  up = nn.Dense(features, use_bias=False, kernel_init=nn.initializers.zeros, name=f"{name}_lora_b")(down)
  return nn.Dense(features, name=name)(x) + up


class LoraLM(nn.Module):
  """``transformer_lm.TransformerLM`` (unrolled, untied) with LoRA adapters on every MLP layer and on the head."""

  d_model: int
  heads: int
  layers: int
  seq_len: int
  rank: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(text.VOCAB_SIZE, self.d_model, name="embed")(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), (self.seq_len, self.d_model))[: tokens.shape[1]]
    for i in range(self.layers):
      x = LoraBlock(self.d_model, self.heads, self.rank, name=f"block_{i}")(x)
    return lora_dense("head", text.VOCAB_SIZE, self.rank, nn.LayerNorm(name="ln_final")(x))


def is_adapter(layer: tuple) -> bool:
  """Whether a layer (a ``stats`` key, or a parameter path without its leaf name) is a LoRA factor."""
  return bool(layer) and str(layer[-1]).endswith(("_lora_a", "_lora_b"))


def names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (the smoke test)")
  parser.add_argument("--d-model", type=int, default=64)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=500, help="AdamW steps to the MAP")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--fisher-batch", type=int, default=256, help="training windows of the captured Fisher")
  parser.add_argument("--val-windows", type=int, default=32)
  parser.add_argument("--test-windows", type=int, default=128)
  parser.add_argument("--samples", type=int, default=32, help="posterior samples per predictive")
  parser.add_argument("--predict-chunk", type=int, default=32, help="test windows per call of the predictive")
  parser.add_argument(
    "--eager-predict", action="store_true", help="the test predictive without jax.jit (a cross-check of the jitted one)"
  )
  parser.add_argument("--lora-only", action="store_true", help="skip the Laplace posteriors of the base model")
  parser.add_argument("--grid-points", type=int, default=13, help="validation τ grid, 1e-2 .. 1e10")
  parser.add_argument("--lora-rank", type=int, default=4)
  parser.add_argument("--lora-steps", type=int, default=200)
  parser.add_argument("--train-chars", type=int, default=None, help="train on the first N characters only")
  parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's decay of the MAP training")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output-dir", default=cal.RESULTS)
  args = parser.parse_args(argv)
  if args.quick:
    args.d_model, args.heads, args.layers, args.seq_len, args.batch_size = 16, 2, 1, 16, 8
    args.steps, args.fisher_batch, args.val_windows, args.test_windows = 30, 16, 8, 8
    args.samples, args.grid_points, args.lora_rank, args.lora_steps = 8, 4, 2, 10
  if args.test_windows % args.predict_chunk and args.test_windows > args.predict_chunk:
    parser.error("--test-windows must be a multiple of --predict-chunk (one compiled program for every chunk)")
  return args


def train(loss, params, batches, steps: int, lr: float, trainable=None, weight_decay: float = 0.1):
  """AdamW (cosine schedule, 5 % warm-up, clipping 1.0, decay on kernels and the embedding) on ``trainable``."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, end_value=lr / 10)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, b2=0.99, weight_decay=weight_decay, mask=tlm._decay_mask),
  )
  if trainable is not None:
    labels = jax.tree_util.tree_map_with_path(lambda path, _: "train" if trainable(names(path)) else "frozen", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

  @jax.jit
  def step(params, state, window):
    value, grads = jax.value_and_grad(loss)(params, window)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  state = tx.init(params)
  for _ in range(steps):
    params, state, value = step(params, state, jnp.asarray(next(batches)))
  return params, float(value)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  info, started = common.machine_info(), time.perf_counter()
  splits = tlm.three_splits(text.encode(text.python_docs()))
  if args.train_chars:
    splits["train"] = splits["train"][: args.train_chars]
  p = args.seq_len
  windows = lambda split, count: jnp.concatenate(tlm.eval_windows(splits[split], p, count))
  val, test = windows("validation", args.val_windows), windows("test", args.test_windows)
  val_x, val_y, test_x, test_y = val[:, :-1], val[:, 1:], test[:, :-1], np.asarray(test[:, 1:])
  fisher_windows = jnp.asarray(text.sample_windows(splits["train"], args.fisher_batch, p, seed=args.seed + 7))
  n_windows = len(splits["train"]) // p
  dataset_size = n_windows * p**2  # N windows, the NLL summed over their N·P tokens (module docstring)

  model = tlm.TransformerLM(args.d_model, args.heads, args.layers, p)
  params = model.init(jax.random.key(args.seed), val_x[:1])["params"]

  def loss_of(model):
    def loss(params, window):
      logits = model.apply({"params": params}, window[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()

    return loss

  batches = text.batches(splits["train"], args.batch_size, p, seed=args.seed, epochs=None)
  begin = time.perf_counter()
  params, final_loss = train(loss_of(model), params, batches, args.steps, args.lr, weight_decay=args.weight_decay)
  map_seconds = time.perf_counter() - begin
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"char-LM d{args.d_model} L{args.layers} ({num_params} parameters), {args.steps} AdamW steps in "
    f"{map_seconds:.1f} s, final training loss {final_loss:.3f}; N = {n_windows} training windows of {p}",
    flush=True,
  )
  table = cal.Table(test_y, width=26)
  laplace_rows: dict[str, Any] = {}

  def evaluate(model, params, label: str, fit_seconds: float, posteriors):
    """MAP, temperature scaling and KFAC-Laplace over each ``(method, selected(layer))`` of ``posteriors``."""
    apply = jax.jit(lambda params, x: model.apply({"params": params}, x))
    probs, seconds = cal.timed(lambda params: jax.nn.softmax(apply(params, test_x)), params)
    table.record(label, "-", None, probs, fit_seconds, seconds)
    temperature, scaled, fit_t, predict_t = cal.temperature_scaling(apply(params, val_x), val_y, apply(params, test_x))
    name = "temperature scaling" + ("" if label == "MAP" else f" ({label})")
    table.record(name, "validation NLL", None, scaled, fit_t, predict_t, temperature=float(temperature))
    train_nll = float(loss_of(model)(params, fisher_windows))
    log_likelihood = -n_windows * p * train_nll
    capture = nox.value_grad_and_stats(loss_of(model), fisher="mc", likelihood="categorical")
    grid = jnp.logspace(-2, 10, args.grid_points)
    for index, (method, selected) in enumerate(posteriors):
      key = jax.random.key(100 + index)
      kw = dict(dataset_size=dataset_size, structure="kfac", num_samples=args.samples)

      def fit(params, key, fisher_windows, val_x, val_y, selected=selected):
        stats = capture(params, fisher_windows, rng=key)[2]
        stats = {k: v for k, v in stats.items() if selected(k)}
        apply_val = lambda q: model.apply({"params": q}, val_x)
        tau, evidence, tau_val, scores = cal.prior_precisions(
          apply_val, params, stats, val_y, log_likelihood=log_likelihood, grid=grid, key=key, **kw
        )
        return stats, tau, tau_val, evidence, scores

      (stats, tau, tau_val, evidence, scores), fit_seconds = compiled_timed(
        jax.jit(fit), params, key, fisher_windows, val_x, val_y
      )
      layer_names = ["/".join(map(str, k)) for k in stats]

      def predict(params, stats, tau, key, test_x):
        apply_test = lambda q: model.apply({"params": q}, test_x)
        return cal.probit_predictive(apply_test, params, stats, tau, key, **kw)

      # The test windows in chunks (memory), one compiled program, the same posterior samples (key) for every chunk.
      chunks = [test_x[i : i + args.predict_chunk] for i in range(0, len(test_x), args.predict_chunk)]
      if not args.eager_predict:
        predict = jax.jit(predict).lower(params, stats, tau, jax.random.key(7), chunks[0]).compile()
      laplace_rows[method] = {"layers": layer_names, "validation_nll": [float(s) for s in scores]}
      for tau_from, value in (("evidence", tau), ("validation NLL", tau_val)):
        begin = time.perf_counter()
        chunked = [predict(params, stats, value, jax.random.key(7), chunk) for chunk in chunks]
        probs = jax.block_until_ready(jnp.concatenate(chunked))
        seconds = time.perf_counter() - begin
        table.record(method, tau_from, value, probs, fit_seconds, seconds, log_evidence=float(evidence))
    return apply

  head = lambda k: k == ("head",)
  last_block = lambda k: k == ("head",) or k[0] == f"block_{args.layers - 1}"
  everything = lambda k: True
  posteriors = [("last-layer KFAC", head), ("last-block KFAC", last_block), ("all-layer KFAC", everything)]
  posteriors = [] if args.lora_only else posteriors
  evaluate(model, params, "MAP", map_seconds, posteriors)

  # LoRA: the MAP plus zero-initialised adapters (lora_b = 0, so the function is the MAP's), adapters fine-tuned.
  lora = LoraLM(args.d_model, args.heads, args.layers, p, args.lora_rank)
  lora_params = lora.init(jax.random.key(args.seed + 1), val_x[:1])["params"]
  lora_params = merge(lora_params, params)
  same = jnp.max(jnp.abs(lora.apply({"params": lora_params}, val_x) - model.apply({"params": params}, val_x)))
  assert float(same) < 1e-5, f"the LoRA model at lora_b = 0 is not the MAP ({float(same)})"
  begin = time.perf_counter()
  lora_params, lora_loss = train(
    loss_of(lora),
    lora_params,
    batches,
    args.lora_steps,
    args.lr,
    trainable=lambda n: is_adapter(n[:-1]),
    weight_decay=0,
  )
  lora_seconds = time.perf_counter() - begin
  adapters = sum(x.size for k, x in flat(lora_params).items() if is_adapter(k[:-1]))
  print(f"LoRA fine-tune: {adapters} adapter parameters, {args.lora_steps} steps, loss {lora_loss:.3f}", flush=True)
  evaluate(lora, lora_params, "LoRA MAP", lora_seconds, [("LoRA-Laplace KFAC", is_adapter)])

  os.makedirs(args.output_dir, exist_ok=True)
  suffix = ("_quick" if args.quick else "") + (f"_train{args.train_chars}" if args.train_chars else "")
  suffix += ("_lora" if args.lora_only else "") + ("_eager" if args.eager_predict else "")
  base = os.path.join(args.output_dir, "laplace_charlm" + suffix)
  cal.write_csv(base + ".csv", table.rows)
  info["load_average_end"] = common.load_average()
  result = {
    "settings": {
      "corpus": "pydoc_data.topics (neuron_optax.examples.text), splits of benchmarks/transformer_lm.py",
      "model": f"TransformerLM unrolled d{args.d_model} heads {args.heads} layers {args.layers} context {p}",
      "parameters": int(num_params),
      "map": f"AdamW lr {args.lr} cosine, wd {args.weight_decay}, clip 1, batch {args.batch_size}, {args.steps} steps",
      "train_chars": int(len(splits["train"])),
      "map_final_training_loss": final_loss,
      "lora": f"rank {args.lora_rank} adapters beside every MLP layer and the head, {adapters} parameters, "
      f"{args.lora_steps} AdamW steps (wd 0) on the training split",
      "lora_final_training_loss": lora_loss,
      "fisher": f"mc, {args.fisher_batch} training windows",
      "dataset_size": int(dataset_size),
      "training_windows": int(n_windows),
      "validation_tokens": int(val_y.size),
      "test_tokens": int(test_y.size),
      "samples": args.samples,
      "validation_tau_grid": [float(t) for t in jnp.logspace(-2, 10, args.grid_points)],
      "predictive": "glm_predictive, probit link, moments of num_samples posterior samples through one JVP each"
      + (", eager (no jax.jit)" if args.eager_predict else ", jitted, in chunks of --predict-chunk windows"),
      "dtype": "float32",
      "ece_bins": cal.BINS,
      "seed": args.seed,
      "timing": "seconds of the compiled call (MAP rows: training incl. compilation), 2 shared CPU cores",
    },
    "machine": info,
    "rows": table.rows,
    "laplace": laplace_rows,
    "seconds_total": round(time.perf_counter() - started, 1),
  }
  with open(base + ".json", "w") as handle:
    json.dump(result, handle, indent=1)
  title = f"Calibration of the char-LM (d{args.d_model}, {args.layers} layers) on held-out next characters"
  cal.plot_reliability(table.rows, base + ".png", title)
  print(f"wrote {base}.csv, .json, .png in {result['seconds_total']} s", flush=True)
  return result


def compiled_timed(jitted, *args):
  """``(result, seconds)`` of one call of the compiled ``jitted`` (compilation excluded, without a second run)."""
  compiled = jitted.lower(*args).compile()
  begin = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, time.perf_counter() - begin


def flat(tree) -> dict:
  return {names(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def merge(lora_params, params):
  """The LoRA model's parameters with every base parameter taken from the MAP ``params``."""
  base = flat(params)
  return jax.tree_util.tree_map_with_path(lambda path, x: base.get(names(path), x), lora_params)


if __name__ == "__main__":
  main()
