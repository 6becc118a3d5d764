"""Smoke test of ``benchmarks/transformer_lm.py``: the quick setting trains and writes its results."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def test_grids_and_the_tuning_table():
  recipes = transformer_lm.parse_recipes("none+adamw:lr=1e-3/2e-3/4e-3,wd=0/0.1,name=A;eigen+adam:sides=input/both")
  assert len(recipes) == 8 and recipes[0].grid == ("lr", "wd") and recipes[-1].options["sides"] == "both"
  assert recipes[0].structure() == recipes[2].structure() != recipes[1].structure()  # lr is injected, wd is not
  assert [r.family for r in recipes[::6]] == ["adamw", "neuron"]
  losses = {"A lr=0.001 wd=0": 2.0, "A lr=0.002 wd=0": 1.5, "A lr=0.004 wd=0": 1.7, "A lr=0.001 wd=0.1": 2.1}
  rows = [dict(name=r.name, final_curve_mean=losses.get(r.name, 1.9)) for r in recipes]
  table = transformer_lm.tuning_table(recipes, rows)
  assert table[0]["best"] == "A lr=0.002 wd=0" and table[0]["strictly_inside"] == {"lr": True, "wd": False}
  assert table[1]["strictly_inside"] == {"sides": False}  # two values: never strictly inside


def test_muon_split_on_the_scanned_layout():
  """optax.contrib.muon's standard split: every hidden matrix of every block, AdamW for the rest."""
  model = transformer_lm.TransformerLM(16, 2, 2, 8, scan=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  dims = transformer_lm.muon_dimension_numbers(params)
  muon = {"/".join(map(str, k)) for k, d in _items(dims) if d is not None}
  assert muon == {
    f"blocks/{m}/kernel"
    for m in ("attention/query", "attention/key", "attention/value", "attention/out", "mlp_in", "mlp_out")
  }
  query = dims["blocks"]["attention"]["query"]["kernel"]  # (layers, d_model, heads, head_dim)
  assert query == optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=(2, 3))
  assert dims["blocks"]["attention"]["out"]["kernel"].reduction_axis == (1, 2)


def _items(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _items(value, prefix + (key,))
    else:
      yield prefix + (key,), value


@pytest.mark.slow  # three recipes x training in lockstep: CI runs it in its second step
def test_quick_compare_writes_the_summary(tmp_path):
  """``--recipes compare`` (tuned AdamW, tuned Muon, the recommended neuron recipe) in lockstep."""
  result = transformer_lm.main(["--quick", "--recipes", "compare", "--output-dir", str(tmp_path), "--no-plot"])
  with open(tmp_path / "transformer_lm_quick.json") as f:
    saved = json.load(f)
  assert saved["machine"]["jax"] == jax.__version__ and saved["curve_split"] == "test"
  summary = saved["summary"]
  assert [row["family"] for row in summary] == ["adamw", "muon", "neuron"]
  assert [row["recommended"] for row in summary] == [False, False, True]
  for row in summary:
    assert {"recipe", "final_test_loss", "steps_to_reference", "wallclock_to_reference", "step_time_ratio"} <= set(row)
    assert row["diverged"] == 0, row
    assert row["final_test_loss"] < np.log(96), row  # learnt something in 40 steps
    assert row["step_time_ratio"] > 0
  assert summary[0]["steps_to_reference"] == 1.0 and summary[0]["step_time_ratio"] == 1.0
  assert result["reference"] == summary[0]["recipe"]
  assert (tmp_path / "transformer_lm_quick.csv").exists()


def test_fixed_phase_picks_one_compiled_step_per_amortisation_phase():
  (recipe,) = transformer_lm.parse_recipes("foof+muon:adam_lr=1e-2,every=4,window=2,phase=fixed,rows=16")
  assert transformer_lm.fixed_phase(recipe) and recipe.options["rows"] == "16"
  called = []
  steps = {
    phase: (lambda p, s, w, phase=phase: called.append(phase) or (p, s, 0.0))
    for phase in ("plain", "statistics", "inversion")
  }
  phased = transformer_lm.PhasedStep(steps, 4, 2)
  for index in range(6):
    phased(None, None, None, index)
  assert called == ["inversion", "plain", "plain", "statistics", "inversion", "plain"]
  model = transformer_lm.TransformerLM(16, 2, 1, 8, scan=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  tx, _ = transformer_lm.build_transform(recipe, params, 10, 10, 2, phase="plain")
  assert tx.init(params) is not None


@pytest.mark.slow  # two compiled runs of the quick model (about 15 s): CI's second step
def test_long_bf16_driver_runs_both_dtypes(tmp_path):
  """``benchmarks/long_bf16.py``: float32 and bf16 runs of one recipe, their records and bf16's relative gap."""
  import long_bf16

  out = long_bf16.main(["--quick", "--steps", "4", "--recipes", "adamw", "--output", str(tmp_path / "long")])
  assert [(r["recipe"], r["dtype"], r["steps"], r["nonfinite_steps"]) for r in out["records"]] == [
    ("adamw", "float32", 4, 0),
    ("adamw", "bfloat16", 4, 0),
  ]
  (row,) = out["comparison"]
  f32, bf16 = row["float32_test_loss"], row["bfloat16_test_loss"]
  assert f32 != bf16 and np.isclose(row["relative_gap"], (bf16 - f32) / f32) and abs(row["relative_gap"]) < 0.05
  assert json.loads((tmp_path / "long.json").read_text())["records"][1]["dtype"] == "bfloat16"
  model = transformer_lm.TransformerLM(16, 2, 1, 8, scan=True, dtype=jnp.bfloat16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert transformer_lm.lm_loss(model, params, jnp.zeros((1, 9), jnp.int32)).dtype == jnp.float32
