"""Smoke tests of ``benchmarks/laplace_charlm.py``: the LoRA char-LM and the quick calibration table."""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import laplace_charlm  # noqa: E402
import transformer_lm  # noqa: E402

import neuron_optax as nox  # noqa: E402


def test_lora_lm_is_the_benchmark_model_at_zero_adapters_and_captures_them_as_layers():
  dims = (16, 2, 2, 8)
  model = transformer_lm.TransformerLM(*dims)
  lora = laplace_charlm.LoraLM(*dims, rank=2)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 96
  params = model.init(jax.random.key(0), tokens)["params"]
  lora_params = laplace_charlm.merge(lora.init(jax.random.key(1), tokens)["params"], params)
  np.testing.assert_allclose(
    lora.apply({"params": lora_params}, tokens), model.apply({"params": params}, tokens), rtol=1e-6, atol=1e-6
  )
  # a nonzero lora_b changes the function: the adapters are live
  bumped = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.1 if laplace_charlm.names(path)[-2:-1] == ("head_lora_b",) else x, lora_params
  )
  assert not np.allclose(lora.apply({"params": bumped}, tokens), model.apply({"params": params}, tokens))

  def loss(p, window):
    logits = lora.apply({"params": p}, window[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), window[:, 1:, None], -1))

  window = jnp.concatenate([tokens, tokens[:, :1]], axis=1)
  stats = jax.eval_shape(nox.value_grad_and_stats(loss), lora_params, window)[2]
  adapters = sorted(k for k in stats if laplace_charlm.is_adapter(k))
  expected = [(f"block_{i}", f"mlp_{s}_lora_{f}") for i in range(2) for s in ("in", "out") for f in "ab"]
  assert adapters == sorted(expected + [("head_lora_a",), ("head_lora_b",)])
  assert ("block_1", "mlp_in") in stats and ("embed",) in stats  # the base layers are captured too (and dropped)


@pytest.mark.slow  # trains and compiles a dozen programs: about a minute alone, more on a shared machine
def test_quick_calibration_table(tmp_path):
  result = laplace_charlm.main(["--quick", "--output-dir", str(tmp_path)])
  for suffix in ("csv", "json", "png"):
    assert (tmp_path / f"laplace_charlm_quick.{suffix}").exists()
  with open(tmp_path / "laplace_charlm_quick.json") as handle:
    assert json.load(handle)["rows"] == json.loads(json.dumps(result["rows"]))
  rows = {(r["method"], r["tau_from"]): r for r in result["rows"]}
  methods = ["last-layer KFAC", "last-block KFAC", "all-layer KFAC", "LoRA-Laplace KFAC"]
  expected = {("MAP", "-"), ("LoRA MAP", "-"), ("temperature scaling", "validation NLL")}
  expected |= {(m, t) for m in methods for t in ("evidence", "validation NLL")}
  assert expected <= set(rows)
  for row in result["rows"]:
    assert math.isfinite(row["nll"]) and 0 <= row["ece"] <= 1 and 0 <= row["accuracy"] <= 1
    assert row["nll"] < math.log(96) + 1  # no worse than about uniform over the vocabulary
  grid = np.asarray(result["settings"]["validation_tau_grid"])
  for method in methods:
    scores = result["laplace"][method]["validation_nll"]
    assert rows[(method, "validation NLL")]["tau"] == pytest.approx(grid[int(np.nanargmin(scores))], rel=1e-5)
  assert all(laplace_charlm.is_adapter(tuple(k.split("/"))) for k in result["laplace"]["LoRA-Laplace KFAC"]["layers"])
  assert result["laplace"]["last-layer KFAC"]["layers"] == ["head"]
