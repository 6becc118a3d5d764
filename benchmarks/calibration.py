"""Evaluation shared by the calibration benchmarks (``laplace.py``, ``laplace_lora.py``, ``laplace_charlm.py``).

* :func:`metrics`: held-out NLL, ECE (:data:`BINS` equal-width bins of the top-class confidence), accuracy and the
  reliability bins, in NumPy from predictive probabilities ``(..., classes)``.
* :func:`timed`: result and seconds of a second call (compilation excluded).
* :func:`temperature_scaling`: one temperature on the validation NLL (a 2001-point grid in ``log T``), applied to
  the test logits.
* :class:`Table`: one row per method and prior-precision choice, printed as it is recorded; :func:`write_csv`,
  :func:`plot_reliability`.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import neuron_optax as nox

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BINS = 15
TABLE_FIELDS = ["method", "tau_from", "tau", "nll", "ece", "accuracy", "fit_seconds", "predict_seconds"]


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """NLL, ECE (15 bins, top label), accuracy, and the reliability bins ``[bin, count, confidence, accuracy]``."""
  probs = np.asarray(probs)
  probs, labels = probs.reshape(-1, probs.shape[-1]), np.asarray(labels).reshape(-1)
  confidence, predicted = probs.max(1), probs.argmax(1)
  correct = predicted == labels
  edges = np.linspace(0, 1, BINS + 1)
  index = np.clip(np.digitize(confidence, edges[1:-1]), 0, BINS - 1)
  bins, ece = [], 0.0
  for b in range(BINS):
    mask = index == b
    if mask.any():
      ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
      bins.append([b, int(mask.sum()), float(confidence[mask].mean()), float(correct[mask].mean())])
  nll = -np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None)))
  return {"nll": float(nll), "ece": float(ece), "accuracy": float(correct.mean()), "bins": bins}


def timed(fn, *args):
  """``(result, seconds of a second call)``: compilation excluded."""
  jax.block_until_ready(fn(*args))
  begin = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - begin


def temperature_scaling(val_logits, val_labels, test_logits):
  """One temperature ``T > 0`` by the validation NLL (a 2001-point grid in ``log T``, ``e^-3 … e^3``).

  Returns ``(T, softmax(test_logits / T), fit seconds, predict seconds)``.
  """
  labels = jnp.asarray(val_labels)

  def fit(val_logits):
    temperatures = jnp.exp(jnp.linspace(-3.0, 3.0, 2001))
    nll = jax.lax.map(
      lambda t: nox.negative_log_likelihood(jax.nn.softmax(val_logits / t), labels), temperatures, batch_size=64
    )
    return temperatures[jnp.argmin(nll)]

  temperature, fit_seconds = timed(jax.jit(fit), val_logits)
  scaled, predict_seconds = timed(jax.jit(lambda logits, t: jax.nn.softmax(logits / t)), test_logits, temperature)
  return temperature, scaled, fit_seconds, predict_seconds


class Table:
  """Rows ``{method, tau_from, tau, nll, ece, accuracy, bins, fit_seconds, predict_seconds, ...}`` on one test set."""

  def __init__(self, labels, width: int = 22):
    self.labels = np.asarray(labels)
    self.width = width
    self.rows: list[dict[str, Any]] = []

  def record(self, name, tau_from, tau, probs, fit_seconds, predict_seconds, **extra) -> dict[str, Any]:
    row = {"method": name, "tau_from": tau_from, "tau": None if tau is None else float(tau)}
    row.update(metrics(np.asarray(probs), self.labels), fit_seconds=round(fit_seconds, 3))
    row["predict_seconds"] = round(predict_seconds, 3)
    self.rows.append({**row, **extra})
    print(
      f"{name:>{self.width}} {tau_from:>16}: NLL {row['nll']:.4f} ECE {row['ece']:.4f} acc {row['accuracy']:.3f} "
      f"(τ {'-' if tau is None else f'{float(tau):.3g}'}, fit {fit_seconds:.2f} s, predict {predict_seconds:.2f} s)",
      flush=True,
    )
    return row


def write_csv(path: str, rows: Sequence[dict[str, Any]], fields: Sequence[str] = TABLE_FIELDS) -> None:
  with open(path, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def plot_reliability(rows, path: str, title: str, panels=("evidence", "validation NLL"), always=("-",)) -> None:
  """One reliability diagram per ``tau_from`` in ``panels``; rows whose ``tau_from`` is in ``always`` (the MAPs) and
  temperature scaling appear in every panel."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
  for ax, tau_from in zip(axes[0], panels):
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    for row in rows:
      if row["tau_from"] not in (tau_from, *always) and not row["method"].startswith("temperature scaling"):
        continue
      bins = np.asarray(row["bins"])
      style = dict(color="k", lw=2) if row["method"] == "MAP" else {}
      label = f"{row['method']} (ECE {row['ece']:.3f}, NLL {row['nll']:.3f})"
      ax.plot(bins[:, 2], bins[:, 3], marker="o", ms=3, label=label, **style)
    ax.set_title(f"reliability, Laplace τ by {tau_from}")
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("accuracy (bin)")
    ax.set_xlim(0, 1.01)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def prior_precisions(apply_val, params, stats, val_labels, *, log_likelihood, grid, num_samples, key, **posterior):
  """``τ`` by the marginal likelihood and by the validation NLL of the probit GLM predictive (jit-able).

  ``posterior``: ``dataset_size``, ``structure`` (and any other argument of the posterior). Returns
  ``(τ_evidence, log evidence at τ_evidence, τ_validation, validation NLL at every grid point)``.
  """
  tau = nox.tune_prior_precision(params, stats, **posterior)
  evidence = nox.laplace_log_marginal_likelihood(
    params, stats, log_likelihood=log_likelihood, prior_precision=tau, **posterior
  )
  tau_val, scores = nox.grid_search_prior_precision(
    apply_val, params, stats, val_labels, grid=grid, num_samples=num_samples, key=key, **posterior
  )
  return tau, evidence, tau_val, scores


def probit_predictive(apply_fn, params, stats, tau, key, num_samples, **posterior):
  """``nox.glm_predictive`` with the probit link from ``num_samples`` posterior samples (no Jacobian formed)."""
  return nox.glm_predictive(
    apply_fn,
    params,
    stats,
    prior_precision=tau,
    link_approx="probit",
    num_samples=num_samples,
    key=key,
    **posterior,
  )
