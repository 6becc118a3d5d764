"""neuron_optax: optax transforms that precondition each layer with statistics of its neurons.

Public API:
  value_grad_and_stats  capture layer inputs and output cotangents in one forward/backward pass
  foof                  (A + λI)⁻¹ ∇W                                  (Benzing 2022)
  kfac                  KFAC with heuristic (π) or standard damping   (Martens & Grosse 2015)
  kfac_foof_similarity  per-layer cosine similarity of KFAC and FOOF  (Benzing 2022, Fig. 3B)
  natural_gradient      exact (F + λI)⁻¹ g via the Woodbury identity  (Benzing 2022 App. I)
  fngd                  inverse-free fast natural gradient            (FNGD)
  amortisation_phase    the kind of a FOOF/KFAC step, for loops that compile one step per phase
  coefficient_phase     the same for FNGD's coefficient sharing
  nnx.value_grad_and_stats  the same capture for flax.nnx models
"""

from neuron_optax import nnx
from neuron_optax.amortisation import amortisation_phase, coefficient_phase
from neuron_optax.diagnostics import kfac_foof_similarity
from neuron_optax.fngd import FngdState, fngd
from neuron_optax.foof import FoofState, foof
from neuron_optax.kfac import KfacState, kfac
from neuron_optax.layer_stats import LayerStats
from neuron_optax.linen import value_grad_and_stats
from neuron_optax.natural_gradient import natural_gradient

__version__ = "0.1.0"

__all__ = [
  "nnx",
  "LayerStats",
  "value_grad_and_stats",
  "foof",
  "FoofState",
  "kfac",
  "KfacState",
  "kfac_foof_similarity",
  "natural_gradient",
  "fngd",
  "FngdState",
  "amortisation_phase",
  "coefficient_phase",
]
