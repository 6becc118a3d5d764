"""neuron_optax: optax transforms that precondition each layer with statistics of its neurons.

Public API:
  value_grad_and_stats  capture layer inputs and output cotangents in one forward/backward pass
  foof                  (A + λI)⁻¹ ∇W                                  (Benzing 2022)
  kfac                  KFAC with heuristic (π) or standard damping   (Martens & Grosse 2015)
  kfac_foof_similarity  per-layer cosine similarity of KFAC and FOOF  (Benzing 2022, Fig. 3B)
  natural_gradient      exact (F + λI)⁻¹ g via the Woodbury identity  (Benzing 2022 App. I)
  fisher_vector_product, damped_fisher_solve, laplace_sample, laplace_log_marginal_likelihood,
  tune_prior_precision, glm_predictive, grid_search_prior_precision, ...  Fisher products, Laplace
                        posteriors and their predictives (Benzing 2022 App. C; laplace-torch's vocabulary)
  fngd                  inverse-free fast natural gradient            (FNGD)
  norm_constrained      the KL constraint on a preconditioned step    (Ba, Grosse & Martens 2017)
  eigenbasis            any optax transform in the factors' eigenbasis (EKFAC, SOAP)
  amortisation_phase    the kind of a FOOF/KFAC step, for loops that compile one step per phase
  coefficient_phase     the same for FNGD's coefficient sharing
  accumulate_micro_batches  gradient accumulation whose FOOF/KFAC statistics cover every micro-batch
  TrainState            flax TrainState whose apply_gradients(grads=..., stats=...) forwards stats
  PrecisionWarning      a damping below the float resolution of a layer's factor (warned once per layer)
  DivergenceWarning     a FOOF/KFAC direction orders of magnitude longer than its gradient (warned once)
  state_sharding        shardings of FOOF/KFAC/FNGD states that follow the parameters' (FSDP, tensor parallel)
  kernel_layouts        the layouts (input and stack axes) of captured layers, for the transforms
  nnx.value_grad_and_stats  the same capture for flax.nnx models
"""

from neuron_optax import nnx
from neuron_optax._src.accumulation import AccumulationState, accumulate_micro_batches
from neuron_optax._src.amortisation import amortisation_phase, coefficient_phase
from neuron_optax._src.diagnostics import kfac_foof_similarity
from neuron_optax._src.eigenbasis import EigenbasisLayerState, EigenbasisState, eigenbasis
from neuron_optax._src.fngd import FngdLayerState, FngdState, fngd
from neuron_optax._src.foof import FoofLayerState, FoofState, foof
from neuron_optax._src.kfac import EigenFactors, HeuristicFactors, KfacLayerState, KfacState, kfac
from neuron_optax._src.laplace import (
  KroneckerFactors,
  damped_fisher_solve,
  expected_calibration_error,
  fisher_diagonal,
  fisher_vector_product,
  glm_predictive,
  grid_search_prior_precision,
  kronecker_factors,
  laplace_log_marginal_likelihood,
  laplace_sample,
  laplace_sample_from_noise,
  linearized_predictive,
  negative_log_likelihood,
  tune_prior_precision,
)
from neuron_optax._src.layer_stats import LayerMoments, LayerStats
from neuron_optax._src.linen import value_grad_and_stats
from neuron_optax._src.natural_gradient import NaturalGradientState, natural_gradient
from neuron_optax._src.param_layout import KernelLayout, kernel_layouts
from neuron_optax._src.precision import PrecisionWarning
from neuron_optax._src.safeguard import DivergenceWarning, NormConstraintState, norm_constrained
from neuron_optax._src.sharding import PaddedState, pad_for_sharding, state_bytes_per_device, state_sharding
from neuron_optax._src.train_state import TrainState
from neuron_optax._version import __version__ as __version__

__all__ = [
  # Capture
  "value_grad_and_stats",
  "nnx",
  "LayerStats",
  "LayerMoments",
  "KernelLayout",
  "kernel_layouts",
  # Transforms and their states
  "foof",
  "FoofState",
  "FoofLayerState",
  "kfac",
  "KfacState",
  "KfacLayerState",
  "HeuristicFactors",
  "EigenFactors",
  "natural_gradient",
  "NaturalGradientState",
  "fngd",
  "FngdState",
  "FngdLayerState",
  "norm_constrained",
  "NormConstraintState",
  "eigenbasis",
  "EigenbasisState",
  "EigenbasisLayerState",
  # Training-loop helpers
  "accumulate_micro_batches",
  "AccumulationState",
  "amortisation_phase",
  "coefficient_phase",
  "TrainState",
  # Sharded optimizer state
  "state_sharding",
  "pad_for_sharding",
  "PaddedState",
  "state_bytes_per_device",
  # Fisher products and Laplace posteriors (Benzing 2022 App. C)
  "fisher_vector_product",
  "damped_fisher_solve",
  "fisher_diagonal",
  "kronecker_factors",
  "KroneckerFactors",
  "laplace_sample",
  "laplace_sample_from_noise",
  "laplace_log_marginal_likelihood",
  "tune_prior_precision",
  "linearized_predictive",
  "glm_predictive",
  "grid_search_prior_precision",
  "negative_log_likelihood",
  "expected_calibration_error",
  # Diagnostics
  "kfac_foof_similarity",
  "PrecisionWarning",
  "DivergenceWarning",
]
