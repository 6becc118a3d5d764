"""Helpers shared by the benchmarks: methods, machine description, timing and FLOP counting.

Methods (:data:`METHODS`, :class:`Method`): every optimiser of the benchmarks as an
``optax`` chain ending in the same first-order step, built from a dict of
hyperparameters and the workload's amortisation; defined once, for the demo and
the benchmarks, in :mod:`neuron_optax.examples.models`.

FLOP model (:func:`flop_model`): analytic floating-point operation counts of one
training step, from the layer geometry that ``value_grad_and_stats`` records
(obtained with ``jax.eval_shape``, so no computation runs). A multiply-add is 2
FLOPs. For one captured layer with ``R`` rows (examples x positions), ``d_in``
inputs (bias row included) and ``d_out`` outputs, and ``U`` the uncaptured
forward matmul FLOPs (attention scores):

* model (forward + backward): ``Σ 2R·d_in·d_out`` forward, the same again for
  the weight gradients, and the same minus the first layer for the input
  cotangents (the data needs none), plus ``3U``: about 3x the forward matmuls.
* Products with the factors are counted in the cheapest order, so the floor
  is the method's, not one implementation's: ``M ∇W`` costs ``2·d_in²·d_out``,
  ``(M Āᵀ) Cot`` costs ``2R·d_in·(d_in+d_out)`` but rebuilds the gradient from the
  recorded rows, which makes the layer's weight-gradient matmul ``2R·d_in·d_out``
  dead code (XLA removes it): net ``2R·d_in²``.
* FOOF per step: ``(A+λI)⁻¹∇W``, ``2·min(R, d_out)·d_in²``. Statistics steps
  (``S`` of every ``T``): ``A``, ``2R·d_in²``. Inversion steps (1 of ``T``):
  Cholesky and inverse, ``(1/3 + 2)·d_in³``.
* KFAC heuristic: ``(A+·)⁻¹ ∇W (G+·)⁻¹``, each side on the matrix or on the rows:
  ``2·min(R, d_out)·d_in² + 2·min(R, d_in)·d_out²``; statistics also ``G``:
  ``2R·d_out²``; inversions of both factors; and the Monte-Carlo Fisher's extra
  backward pass (input cotangents of every layer but the first,
  ``Σ 2R·d_in·d_out + 2U``), every step. KFAC standard: rotation into both
  eigenbases (as the heuristic's two sides), division, rotation back
  ``2·d_in²·d_out + 2·d_in·d_out²``; eigendecompositions ``≈ 9d³`` each (Golub &
  Van Loan's count for the symmetric QR algorithm with vectors).
* FNGD shared: the weighted sum ``Σ c_i ā_i g_iᵀ`` replaces the weight-gradient
  matmul (same cost, the gradient's is dead) plus ``3R·d_out`` for weighting the
  cotangents and the bias row: the floor is SGD's. The first (computing) epoch,
  excluded from the steady state, adds the Gram matrix and an ``n x n`` Cholesky.
* natural gradient (MC Fisher, ``m = n`` columns): the extra backward pass,
  per layer the Gram block (``2m²(d_in+d_out)`` for one position per example,
  the cheaper exact contraction otherwise), ``Ψᵀ∇`` and ``Ψc``
  (``2·2R·d_in·d_out``), and the ``m x m`` Cholesky solve ``m³/3 + 2m²``.
* Elementwise optimiser work (momentum, Adam's moments, EMA blends) is not
  counted: it is memory-bound and small next to the matmuls.

``floor ratio = (model + extra) / model`` is the lowest step-time ratio to SGD
that a method could reach if every FLOP ran at SGD's rate; ``measured /
floor`` is how far an implementation is from that.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import neuron_optax as nox

# The optimisers of the demo and the benchmarks, defined once (re-exported for the scripts).
from neuron_optax.examples.models import METHODS, Method  # noqa: F401

# --------------------------------------------------------------------------- #
# Machine
# --------------------------------------------------------------------------- #


def device_slug() -> str:
  device = jax.devices()[0]
  kind = device.device_kind if device.platform != "cpu" else "cpu"
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return platform.processor() or "unknown"


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_info() -> dict[str, Any]:
  import flax

  device = jax.devices()[0]
  return {
    "device": str(device),
    "platform": device.platform,
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "cpu_model": cpu_model(),
    "cpu_count": os.cpu_count(),
    "load_average_1_5_15min": load_average(),
    "jax": jax.__version__,
    "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
    "flax": flax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
  }


def _jaxlib_version() -> str | None:
  try:
    import jaxlib

    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


# --------------------------------------------------------------------------- #
# Schedule of the amortised methods
# --------------------------------------------------------------------------- #


def step_kind(count: int, inverse_every: int, stats_window: int | None) -> str:
  """``"inversion"``, ``"statistics"`` or ``"plain"`` for the 0-based step ``count``."""
  return nox.amortisation_phase(count, inverse_every, stats_window)


def kind_counts(inverse_every: int, stats_window: int | None) -> dict[str, int]:
  """How many steps of each kind one amortisation period has."""
  counts = {"plain": 0, "statistics": 0, "inversion": 0}
  for c in range(inverse_every):
    counts[step_kind(c, inverse_every, stats_window)] += 1
  return counts


def set_schedule_count(opt_state, count: int):
  """``opt_state`` with the step counter of every FOOF/KFAC state set to ``count``.

  The work of a FOOF/KFAC step depends on the counter only through the
  amortisation schedule, so the timing can jump to the statistics window that
  ends with an inversion instead of running the whole period.
  """

  def visit(node):
    if isinstance(node, (nox.FoofState, nox.KfacState)):
      return node._replace(count=jnp.asarray(count, node.count.dtype))
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
      return tuple(visit(x) for x in node)
    if isinstance(node, tuple):  # other NamedTuples (optax states)
      return type(node)(*(visit(x) for x in node))
    return node

  return visit(opt_state)


# --------------------------------------------------------------------------- #
# FLOP model
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
  name: str
  n: int  # examples
  positions: int  # rows per example
  d_in: int  # incl. bias row
  d_out: int

  @property
  def rows(self) -> int:
    return self.n * self.positions


def layer_name(key: tuple) -> str:
  """``"Block_0/Dense_1"`` for a layer path (``"<top-level>"`` for ``()``)."""
  return "/".join(map(str, key)) if key else "<top-level>"


def layer_geometry(loss_fn: Callable, params, *args) -> list[LayerGeometry]:
  """Captured layers in call order, from an abstract ``value_grad_and_stats`` (``has_aux`` form)."""
  _, _, stats = jax.eval_shape(nox.value_grad_and_stats(loss_fn, has_aux=True), params, *args)
  return [
    LayerGeometry(layer_name(k), s.cotangents.shape[0], s.cotangents.shape[1], s.d_in, s.d_out)
    for k, s in stats.items()
  ]


def _left(layer: LayerGeometry) -> float:
  """Net FLOPs of ``M ∇W`` (``M``: ``d_in x d_in``) in the cheaper order.

  ``M ∇W`` costs ``2·d_in²·d_out``; ``(M Āᵀ) Cot`` costs ``2R·d_in·(d_in + d_out)``
  but rebuilds the gradient, so the layer's weight-gradient matmul ``2R·d_in·d_out``
  is dead code: net ``2R·d_in²``. Cheapest: ``2·min(R, d_out)·d_in²``.
  """
  return 2 * min(layer.rows, layer.d_out) * layer.d_in**2


def _two_sided(layer: LayerGeometry) -> float:
  """Net FLOPs of ``L ∇W R`` (``d_in x d_in`` and ``d_out x d_out``) in the cheapest of the 4 orders.

  Each side either multiplies the ``d_in x d_out`` matrix or the recorded rows
  (``(L Āᵀ)(Cot R)``), which separates into ``2·min(R, d_out)·d_in² + 2·min(R, d_in)·d_out²``.
  """
  r = layer.rows
  return 2 * min(r, layer.d_out) * layer.d_in**2 + 2 * min(r, layer.d_in) * layer.d_out**2


def _gram(layer: LayerGeometry, m: int) -> float:
  p, di, do = layer.positions, layer.d_in, layer.d_out
  if p == 1:
    return 2 * m * m * (di + do) + m * m
  return 2 * min(m * p * di * do + m * m * di * do, m * m * p * p * (di + do))


CHOLESKY_INVERSE = 1 / 3 + 2  # x d³: factorisation plus two triangular solves with d right-hand sides
EIGH = 9.0  # x d³: symmetric eigendecomposition with eigenvectors


def flop_model(layers: Sequence[LayerGeometry], uncaptured_forward: float = 0.0) -> dict[str, Any]:
  """Per-step FLOPs: the model's forward+backward and every method's extra work (see module doc)."""
  forward = sum(2 * l.rows * l.d_in * l.d_out for l in layers) + uncaptured_forward
  first = 2 * layers[0].rows * layers[0].d_in * layers[0].d_out
  model = 3 * forward - first
  mc_backward = forward - first  # input cotangents of every layer but the first, attention's included
  n = layers[0].n

  def per(fn):
    return float(sum(fn(l) for l in layers))

  extra = {
    "sgd": {"step": 0.0, "statistics": 0.0, "inversion": 0.0},
    "adam": {"step": 0.0, "statistics": 0.0, "inversion": 0.0},
    "foof": {
      "step": per(_left),
      "statistics": per(lambda l: 2 * l.rows * l.d_in**2),
      "inversion": per(lambda l: CHOLESKY_INVERSE * l.d_in**3),
    },
    "kfac": {
      "step": mc_backward + per(_two_sided),
      "statistics": per(lambda l: 2 * l.rows * (l.d_in**2 + l.d_out**2)),
      "inversion": per(lambda l: CHOLESKY_INVERSE * (l.d_in**3 + l.d_out**3)),
    },
    "foof_phased": None,
    "kfac_phased": None,
    "kfac_empirical": {
      "step": per(_two_sided),
      "statistics": per(lambda l: 2 * l.rows * (l.d_in**2 + l.d_out**2)),
      "inversion": per(lambda l: CHOLESKY_INVERSE * (l.d_in**3 + l.d_out**3)),
    },
    "kfac_standard": {
      "step": mc_backward + per(lambda l: _two_sided(l) + 2 * l.d_in**2 * l.d_out + 2 * l.d_in * l.d_out**2),
      "statistics": per(lambda l: 2 * l.rows * (l.d_in**2 + l.d_out**2)),
      "inversion": per(lambda l: EIGH * (l.d_in**3 + l.d_out**3)),
    },
    "fngd": {"step": per(lambda l: 3 * l.rows * l.d_out), "statistics": 0.0, "inversion": 0.0},
    "fngd_auto": {"step": per(lambda l: 3 * l.rows * l.d_out), "statistics": 0.0, "inversion": 0.0},
    "fngd_unshared": {
      "step": per(lambda l: 3 * l.rows * l.d_out + _gram(l, l.n) + l.n**3 / 3 + 2 * l.n**2),
      "statistics": 0.0,
      "inversion": 0.0,
    },
    "natural_gradient": {
      "step": mc_backward + per(lambda l: _gram(l, n) + 4 * l.rows * l.d_in * l.d_out) + n**3 / 3 + 2 * n**2,
      "statistics": 0.0,
      "inversion": 0.0,
    },
    "natural_gradient_block": {
      "step": mc_backward + per(lambda l: _gram(l, n) + 4 * l.rows * l.d_in * l.d_out + n**3 / 3 + 2 * n**2),
      "statistics": 0.0,
      "inversion": 0.0,
    },
  }
  extra["foof_phased"], extra["kfac_phased"], extra["foof_phased_rows"] = extra["foof"], extra["kfac"], extra["foof"]
  # contraction="rows" rebuilds FNGD's direction from the rows and XLA drops SGD's weight-gradient
  # product; the default reads the incoming gradient, so its weighted sum is a second such product.
  extra["fngd_rows"] = dict(extra["fngd"])
  for name in ("fngd", "fngd_auto"):
    extra[name] = dict(extra[name], step=extra[name]["step"] + per(lambda l: 2 * l.rows * l.d_in * l.d_out))
  fngd_first_epoch = per(lambda l: _gram(l, l.n) + l.n**3 / 3 + 2 * l.n**2)
  return {
    "forward": float(forward),
    "model": float(model),
    "mc_backward": float(mc_backward),
    "extra": extra,
    "fngd_computing_epoch_extra": fngd_first_epoch,
  }


def floor_ratios(flops: dict[str, Any], method: str, inverse_every: int, stats_window: int | None) -> dict[str, float]:
  """``(model + extra) / model`` for a plain step and averaged over an amortisation period."""
  model = flops["model"]
  extra = flops["extra"][method]
  step = (model + extra["step"]) / model
  if not METHODS[method].amortised:
    return {"step": step, "period_mean": step}
  counts = kind_counts(inverse_every, stats_window)
  stat_steps = counts["statistics"] + counts["inversion"]
  mean_extra = (
    extra["step"] + (stat_steps * extra["statistics"] + counts["inversion"] * extra["inversion"]) / inverse_every
  )
  return {"step": step, "period_mean": (model + mean_extra) / model}


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled computation from XLA's cost analysis (``None`` where unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - start
