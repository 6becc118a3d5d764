"""The paper's MLP and the optimisers of the demo and the benchmarks, defined once.

* :class:`MLP`: the ReLU MLP of Benzing 2022 (App. D.5: 784-1000-1000-1000-10;
  here with biases and He initialisation).
* :class:`Method` and :data:`METHODS`: every optimiser as an ``optax`` chain
  ending in the same first-order step (SGD with momentum 0.9 for all but
  Adam), built from a dict of hyperparameters (``lr`` and ``damping`` or
  ``alpha``) and the run's amortisation options::

      from neuron_optax.examples import models

      method = models.METHODS["foof"]
      tx = method.make({"lr": 0.1, "damping": 1.0}, inverse_every=20)
      # method.fisher: the fisher= of nox.value_grad_and_stats (None: jax.value_and_grad)

  ``python -m neuron_optax.demo`` runs the methods that have a ``grid``;
  ``benchmarks/`` time and compare all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import optax

import neuron_optax as nox

Hyperparameters = Mapping[str, float]


class MLP(nn.Module):
  """ReLU MLP with He-initialised dense layers; ``features`` ends with the classes.

  ``train`` is accepted (and ignored) so that the MLP is called like models
  with BatchNorm.
  """

  features: Sequence[int]

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape(x.shape[0], -1)
    init = nn.initializers.he_normal()
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width, kernel_init=init)(x))
    return nn.Dense(self.features[-1], kernel_init=init)(x)


# --------------------------------------------------------------------------- #
# Methods
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Options:
  """The run-dependent arguments of :meth:`Method.make` (a method uses those it needs).

  Attributes:
    inverse_every: FOOF/KFAC re-factorisation period ``T``.
    stats_window: FOOF/KFAC statistics window ``S`` (``None``: the transforms' default ``min(10, T)``).
    steps_per_epoch: FNGD's epoch length (rows of its coefficient table).
    batch_size: FNGD's batch size (fixes the table's shape at ``init``).
    phase: ``"auto"`` (the schedule inside the compiled step), or one phase
      for loops that compile one step per phase: ``"plain"``,
      ``"statistics"``, ``"inversion"`` (FOOF/KFAC; FNGD: ``"inversion"``,
      ``"plain"``). Ignored by the other methods.
  """

  inverse_every: int = 1
  stats_window: int | None = None
  steps_per_epoch: int | None = None
  batch_size: int | None = None
  phase: str = "auto"


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimiser: how to build it and which statistics its step captures.

  Attributes:
    name: command-line name (the key in :data:`METHODS`).
    fisher: ``None`` for first-order methods (plain ``jax.value_and_grad``),
      else the ``fisher=`` of :func:`neuron_optax.value_grad_and_stats`.
    build: ``build(hp, options) -> optax.GradientTransformation``; call
      :meth:`make` instead.
    label: for tables and plots.
    amortised: whether the step cost follows the ``inverse_every`` schedule
      (FOOF/KFAC).
    phased: whether the benchmarks run it with a Python-level switch and no
      ``lax.cond`` in any compiled step. FNGD: ``make(..., phase="inversion")``
      for the computing epoch, ``make(..., phase="plain")`` afterwards.
      FOOF/KFAC: one step per ``phase`` in ``("plain", "statistics",
      "inversion")``, picked on the host with
      :func:`neuron_optax.amortisation_phase`.
    grid: the demo's hyperparameter settings, most promising first (empty for
      methods the demo does not run).
  """

  name: str
  fisher: str | None
  build: Callable[[Hyperparameters, Options], optax.GradientTransformation]
  label: str = ""
  amortised: bool = False
  phased: bool = False
  grid: tuple[Hyperparameters, ...] = ()

  def make(
    self,
    hp: Hyperparameters,
    *,
    inverse_every: int = 1,
    stats_window: int | None = None,
    steps_per_epoch: int | None = None,
    batch_size: int | None = None,
    phase: str = "auto",
  ) -> optax.GradientTransformation:
    """The optax transformation for hyperparameters ``hp`` (see :class:`Options`)."""
    return self.build(hp, Options(inverse_every, stats_window, steps_per_epoch, batch_size, phase))


def momentum(lr: float) -> optax.GradientTransformation:
  """The first-order step every preconditioner is chained with: SGD with momentum 0.9."""
  return optax.sgd(lr, momentum=0.9)


def _sgd(hp: Hyperparameters, options: Options) -> optax.GradientTransformation:
  del options
  return momentum(hp["lr"])


def _adam(hp: Hyperparameters, options: Options) -> optax.GradientTransformation:
  del options
  return optax.adam(hp["lr"])


def _foof_with(contraction: str):
  def build(hp: Hyperparameters, options: Options) -> optax.GradientTransformation:
    return optax.chain(
      nox.foof(
        hp["damping"],
        inverse_every=options.inverse_every,
        stats_window=options.stats_window,
        phase=options.phase,
        contraction=contraction,
      ),
      momentum(hp["lr"]),
    )

  return build


_foof = _foof_with("auto")


def _kfac(damping_mode: str):
  def build(hp: Hyperparameters, options: Options) -> optax.GradientTransformation:
    return optax.chain(
      nox.kfac(
        hp["damping"],
        inverse_every=options.inverse_every,
        stats_window=options.stats_window,
        damping_mode=damping_mode,
        phase=options.phase,
      ),
      momentum(hp["lr"]),
    )

  return build


def _fngd(share_coefficients: bool, contraction: str = "auto"):
  def build(hp: Hyperparameters, options: Options) -> optax.GradientTransformation:
    if share_coefficients:
      tx = nox.fngd(
        hp["alpha"],
        steps_per_epoch=options.steps_per_epoch,
        batch_size=options.batch_size,
        phase=options.phase,
        contraction=contraction,
      )
    else:
      tx = nox.fngd(hp["alpha"], share_coefficients=False, contraction=contraction)
    return optax.chain(tx, momentum(hp["lr"]))

  return build


def _natural_gradient(block_diagonal: bool):
  def build(hp: Hyperparameters, options: Options) -> optax.GradientTransformation:
    del options
    # max_columns=None: the exact natural gradient at any batch size (no O(m²) memory guard).
    return optax.chain(
      nox.natural_gradient(hp["damping"], block_diagonal=block_diagonal, max_columns=None), momentum(hp["lr"])
    )

  return build


# The demo's grids, from a sweep on the full MLP (200 steps, batch 100, T=10; final training losses
# in parentheses): SGD lr 0.03 (0.0045) > 0.01 > 0.1; Adam 3e-4 (0.010); FOOF lr 0.1, λ 1 (0.0006),
# lr 0.03, λ 0.3 (0.0010); KFAC lr 0.3, λ 10 (0.0032); FNGD lr 0.03, α 1 (0.0060); natural
# gradient lr 1, λ 30 (0.0036). Three times larger learning rates than the first points diverged
# for SGD, FOOF, KFAC and FNGD. The first point of each grid is the most promising.
METHODS: dict[str, Method] = {
  m.name: m
  for m in (
    Method("sgd", None, _sgd, label="SGD+M", grid=({"lr": 0.03}, {"lr": 0.1}, {"lr": 0.01})),
    Method("adam", None, _adam, label="Adam", grid=({"lr": 3e-4}, {"lr": 1e-3}, {"lr": 1e-4})),
    Method(
      "foof",
      "empirical",
      _foof,
      label="FOOF",
      amortised=True,
      grid=({"lr": 0.1, "damping": 1.0}, {"lr": 0.03, "damping": 0.3}, {"lr": 1.0, "damping": 10.0}),
    ),
    Method(
      "kfac",
      "mc",
      _kfac("heuristic"),
      label="KFAC (heuristic damping)",
      amortised=True,
      grid=({"lr": 0.3, "damping": 10.0}, {"lr": 0.03, "damping": 1.0}, {"lr": 1.0, "damping": 100.0}),
    ),
    Method("kfac_standard", "mc", _kfac("standard"), label="KFAC (standard damping)", amortised=True),
    Method(
      "kfac_empirical",
      "empirical",
      _kfac("heuristic"),
      amortised=True,
      label="KFAC (heuristic damping, empirical Fisher)",
    ),
    Method("foof_phased", "empirical", _foof, label="FOOF, one compiled step per phase", amortised=True, phased=True),
    Method(
      "kfac_phased",
      "mc",
      _kfac("heuristic"),
      label="KFAC (heuristic), one compiled step per phase",
      amortised=True,
      phased=True,
    ),
    Method(
      "fngd",
      "empirical",
      _fngd(True),
      label="FNGD (shared coefficients)",
      phased=True,
      grid=({"lr": 0.03, "alpha": 1.0}, {"lr": 0.03, "alpha": 0.1}, {"lr": 0.03, "alpha": 0.01}),
    ),
    Method("fngd_auto", "empirical", _fngd(True), label="FNGD (shared, phase='auto': lax.cond)"),
    Method(
      "fngd_rows",
      "empirical",
      _fngd(True, "rows"),
      label="FNGD (shared, contraction='rows': opt-in, first in its chain)",
      phased=True,
    ),
    Method(
      "foof_phased_rows",
      "empirical",
      _foof_with("rows"),
      label="FOOF, one compiled step per phase, contraction='rows' (opt-in)",
      amortised=True,
      phased=True,
    ),
    Method("fngd_unshared", "empirical", _fngd(False), label="FNGD (w/o sharing)"),
    Method(
      "natural_gradient",
      "mc",
      _natural_gradient(False),
      label="natural gradient (MC Fisher)",
      grid=({"lr": 1.0, "damping": 30.0}, {"lr": 3.0, "damping": 100.0}, {"lr": 0.3, "damping": 10.0}),
    ),
    Method(
      "natural_gradient_block", "mc", _natural_gradient(True), label="natural gradient, block-diagonal (MC Fisher)"
    ),
  )
}
"""Every optimiser, by name. ``sgd``, ``adam``: first-order baselines; ``foof``, ``kfac``
(heuristic damping, MC Fisher), ``kfac_standard``, ``kfac_empirical`` (empirical Fisher);
``*_phased``: the same with one compiled step per amortisation phase; ``fngd`` (shared
coefficients), ``fngd_auto`` (the same, always ``phase="auto"`` in the benchmarks),
``fngd_unshared``; ``natural_gradient`` (whole network) and ``natural_gradient_block``."""

DEMO_METHODS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.grid)
"""The methods with a grid, in :data:`METHODS` order: those ``python -m neuron_optax.demo`` runs."""
