"""neuron_optax: optax transforms that precondition each layer with statistics of its neurons.

Public API:
  value_grad_and_stats  capture layer inputs and output cotangents in one forward/backward pass
  foof                  (A + λI)⁻¹ ∇W  (Benzing 2022)
"""

from neuron_optax.capture import LayerStats, value_grad_and_stats
from neuron_optax.foof import FoofState, foof

__version__ = "0.1.0"

__all__ = [
    "LayerStats",
    "value_grad_and_stats",
    "foof",
    "FoofState",
]
