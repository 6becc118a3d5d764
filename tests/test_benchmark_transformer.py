"""Smoke test of ``benchmarks/transformer_lm.py``: the quick setting trains and writes its results."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import transformer_lm  # noqa: E402


def test_scanned_and_unrolled_models_agree():
  dims = (16, 2, 2, 8)
  scanned = transformer_lm.TransformerLM(*dims, scan=True)
  unrolled = transformer_lm.TransformerLM(*dims)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 96
  params = scanned.init(jax.random.key(0), tokens)["params"]
  flat = transformer_lm.unstack_blocks(params, 2)
  np.testing.assert_allclose(
    scanned.apply({"params": params}, tokens), unrolled.apply({"params": flat}, tokens), rtol=1e-5, atol=1e-5
  )
  restacked = transformer_lm.stack_blocks(flat, 2)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, restacked))


def test_recipe_parsing():
  recipes = transformer_lm.parse_recipes("foof+adam:lr=1e-3/2e-3,damping=1>0.1@0.5,layers=mlp+head,name=x;none+sgd")
  assert [r.lr for r in recipes] == [1e-3, 2e-3, 0.1]
  assert recipes[0].structure() == recipes[1].structure()
  assert recipes[0].name == "x lr=0.001"
  assert transformer_lm.layer_selected(("block_0", "mlp_in"), "mlp+head")
  assert not transformer_lm.layer_selected(("block_0", "attention", "query"), "mlp+head")
  assert transformer_lm.layer_selected(("blocks", "attention", "out"), "out")


def test_quick_benchmark_runs(tmp_path):
  recipes = "none+adamw:lr=4e-3,name=AdamW;foof+adam:lr=4e-3,damping=0.1,every=5,window=2,name=FOOF + Adam"
  result = transformer_lm.main(["--quick", "--recipes", recipes, "--output-dir", str(tmp_path), "--no-plot"])
  assert result["reference"] == "AdamW" and result["target_valid_loss"] is not None
  for row in result["summary"]:
    assert row["diverged"] == 0, row
    assert row["final_valid_mean"] < np.log(96), row  # learnt something in 40 steps
  with open(tmp_path / "transformer_lm_quick.json") as f:
    saved = json.load(f)
  assert saved["machine"]["jax"] == jax.__version__
  assert (tmp_path / "transformer_lm_quick.csv").exists()
