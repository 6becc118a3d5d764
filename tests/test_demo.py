"""The demo job: a tiny in-process run of every method, its outputs, and its helpers."""

import csv
import json
import math

import numpy as np
import pytest

from neuron_optax.examples import demo

pytest.importorskip("mlxtend")


@pytest.mark.slow  # trains every method with its validation grid
def test_quick_demo_runs_every_method(tmp_path, capsys):
  out = tmp_path / "results"
  result = demo.main(
    [
      "--quick",
      "--steps",
      "12",
      "--train-size",
      "400",
      "--batch-size",
      "50",
      "--hidden",
      "32",
      "--grid-size",
      "1",
      "--out",
      str(out),
    ]
  )
  printed = capsys.readouterr().out  # not a terminal: one plain progress line per epoch, no bar

  methods = list(demo.METHODS)
  assert [row["method"] for row in result["summary"]] == methods
  initial = result["config"]["initial_loss"]
  assert math.isfinite(initial)
  for row in result["summary"]:
    run = result["best"][row["method"]]
    assert not run["diverged"] and len(run["losses"]) == 12
    assert all(math.isfinite(loss) for loss in run["losses"])
    # Training decreases the loss: on the whole training set and along the mini-batch curve.
    assert row["final_train_loss"] < 0.8 * initial, row
    assert np.mean(run["losses"][-4:]) < np.mean(run["losses"][:2]), row
    assert row["median_ms_per_step"] > 0 and 0 <= row["train_accuracy"] <= 1
    # Held-out accuracy: the 1,000 images split off the 5,000 (none of them trained on), above chance
    # (0.1) and near the training accuracy after 12 steps.
    assert 0.15 < row["test_accuracy"] <= 1 and math.isfinite(row["test_loss"]), row
    assert abs(row["test_accuracy"] - row["train_accuracy"]) < 0.2, row
    # The validation split (20 % of the 4,000 non-test images) chose the setting; it is reported too.
    assert 0.15 < row["validation_accuracy"] <= 1 and row["validation_accuracy"] == run["validation_accuracy"], row
  # The table's derived columns, recomputed from the stored curves.
  window, target = result["config"]["smoothing_window"], result["config"]["target_loss"]

  def smoothed(losses):
    return [np.mean(losses[max(0, i + 1 - window) : i + 1]) for i in range(len(losses))]

  assert target == pytest.approx(smoothed(result["best"]["sgd"]["losses"])[-1])  # SGD's final loss
  warmup = result["config"]["warmup_steps"]
  assert warmup == demo.warmup_steps(12) == 1
  sgd_median = np.median(result["best"]["sgd"]["step_seconds"][warmup:])
  for row in result["summary"]:
    run = result["best"][row["method"]]
    tolerance = 1e-9 * abs(target)  # the demo smooths with cumulative sums, this with means
    hit = next((i + 1 for i, value in enumerate(smoothed(run["losses"])) if value <= target + tolerance), None)
    assert row["steps_to_target"] == hit
    if hit is not None:
      assert row["seconds_to_target"] == pytest.approx(sum(run["step_seconds"][:hit]))
    # Every method's step time: the median after the same warm-up steps.
    assert row["median_ms_per_step"] == pytest.approx(1e3 * np.median(run["step_seconds"][warmup:]))
    assert row["time_vs_sgd"] == pytest.approx(np.median(run["step_seconds"][warmup:]) / sgd_median)
  assert result["summary"][0]["steps_to_target"] is not None  # SGD reaches its own final loss

  for name in ("summary.md", "summary.csv", "curves.csv", "results.json", "training_curves.png"):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name
  assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with open(out / "summary.csv") as f:
    assert [row["method"] for row in csv.DictReader(f)] == methods
  with open(out / "curves.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 12 * len(methods)
  assert all(math.isfinite(float(row["loss"])) for row in rows)
  stored = json.loads((out / "results.json").read_text())
  assert len(stored["runs"]) == len(methods) and stored["config"]["layers"] == "784-32-10"
  assert stored["config"]["train_size"] == 400 and stored["config"]["test_size"] == 1000
  assert stored["config"]["validation_size"] == 800
  for method in methods:
    assert method in printed
  assert "| method | best hyperparameters |" in printed and "| val acc | test acc |" in printed
  # The amortisation settings and the table in words are printed and written next to the table.
  assert "re-factorise every 20 steps" in printed and "reached the highest held-out accuracy" in printed
  summary_md = (out / "summary.md").read_text()
  assert "Amortisation:" in summary_md and "reached the highest held-out accuracy" in summary_md
  # 400 images at batch 50: 8 steps per epoch, so 12 steps print epoch 1/2 and a partial epoch 2/2.
  assert printed.count("epoch 1/2 mean batch loss") == len(methods)
  assert printed.count("epoch 2/2 (4/8 steps) mean batch loss") == len(methods)
  assert "\r" not in printed


def test_best_run_has_the_highest_validation_accuracy(tmp_path):
  result = demo.main(
    [
      "--quick",
      "--steps",
      "5",
      "--train-size",
      "200",
      "--batch-size",
      "50",
      "--hidden",
      "16",
      "--methods",
      "sgd",
      "--grid-size",
      "3",
      "--out",
      str(tmp_path),
      "--no-progress",
    ]
  )
  runs = result["runs"]
  assert len(runs) == 3
  keys = [
    (-r["validation_accuracy"], r["validation_loss"]) if not r["diverged"] else (math.inf, math.inf) for r in runs
  ]
  assert result["best"]["sgd"] is runs[min(range(3), key=keys.__getitem__)]


def test_selection_and_description():
  run = lambda acc, loss, diverged=False: {"validation_accuracy": acc, "validation_loss": loss, "diverged": diverged}
  assert demo.selection_key(run(0.9, 0.3)) < demo.selection_key(run(0.8, 0.1))  # accuracy first
  assert demo.selection_key(run(0.9, 0.2)) < demo.selection_key(run(0.9, 0.3))  # then the loss
  assert demo.selection_key(run(0.1, 2.0)) < demo.selection_key(run(math.nan, math.nan, diverged=True))
  row = lambda method, test, train, ratio: {
    "method": method,
    "test_accuracy": test,
    "final_train_loss": train,
    "time_vs_sgd": ratio,
  }
  words = demo.describe([row("sgd", 0.90, 0.2, 1.0), row("foof", 0.95, 0.1, 2.5), row("kfac", 0.949, 0.3, 3.0)], 1000)
  assert words.startswith("foof reached the highest held-out accuracy (0.950 on 1000 test images")
  assert "kfac is within two standard errors" in words and "foof 2.5x" in words and "sgd 1.0x" not in words
  cfg = demo.RunConfig(steps=100, batch_size=100, steps_per_epoch=32, inverse_every=20)
  text = demo.amortisation_text(["foof", "kfac", "fngd", "natural_gradient"], cfg)
  assert "FOOF and KFAC re-factorise every 20 steps" in text and "the 10 steps before" in text
  assert "first epoch (steps 1-32)" in text and "every step" in text


def test_smooth_and_steps_to_target():
  np.testing.assert_allclose(demo.smooth([4.0, 2.0, 0.0, 2.0], 2), [4.0, 3.0, 1.0, 1.0])
  assert demo.steps_to_target(np.array([3.0, 2.0, 1.0, 0.5]), 1.0) == 3
  assert demo.steps_to_target(np.array([3.0, 2.0]), 1.0) is None
  assert demo.steps_to_target(np.array([3.0, 2.0]), None) is None


def test_progress_mode(monkeypatch):
  monkeypatch.setattr(demo.sys.stdout, "isatty", lambda: False)
  assert demo.progress_mode(True) == "lines" and demo.progress_mode(False) == "off"
  monkeypatch.setattr(demo.sys.stdout, "isatty", lambda: True)
  assert demo.progress_mode(True) == "bar" and demo.progress_mode(False) == "off"
  assert [demo.warmup_steps(n) for n in (5, 12, 100, 1000)] == [0, 1, 10, 10]


def test_command_line_errors():
  with pytest.raises(SystemExit):
    demo.parse_args(["--methods", "sgd,lbfgs"])
  with pytest.raises(SystemExit):
    demo.parse_args(["--steps", "0"])
  with pytest.raises(SystemExit):
    demo.parse_args(["--test-fraction", "1"])
  with pytest.raises(SystemExit):
    demo.parse_args(["--validation-fraction", "0"])
  with pytest.raises(SystemExit):
    demo.parse_args(["--inverse-every", "5", "--stats-window", "6"])
  args = demo.parse_args(["--quick"])
  assert args.hidden == demo.QUICK_FEATURES[:-1] and args.steps == demo.QUICK_STEPS
  args = demo.parse_args([])
  assert args.hidden == demo.FULL_FEATURES[:-1] and args.steps == demo.DEFAULT_STEPS
  assert args.methods == list(demo.METHODS) and args.out == "demo_results"


def test_demo_methods_are_the_shared_registry():
  from neuron_optax.examples import models

  assert list(demo.METHODS) == list(models.DEMO_METHODS)
  assert all(demo.METHODS[name] is models.METHODS[name] and demo.METHODS[name].grid for name in demo.METHODS)
  assert demo.MLP is models.MLP
