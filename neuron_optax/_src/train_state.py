"""A ``flax.training.train_state.TrainState`` that forwards the layer statistics to its optimizer."""

from __future__ import annotations

from typing import Any

import optax
from flax.training import train_state

from neuron_optax._src.layer_stats import Stats


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` whose ``apply_gradients`` also takes ``stats``.

  The official linen examples keep their update function; only the call
  changes::

      loss, grads, stats = nox.value_grad_and_stats(loss_fn)(state.params)
      state = state.apply_gradients(grads=grads, stats=stats)

  ``stats`` (and any other keyword accepted by the chain's transforms) is passed
  to ``tx.update``; transforms that take no extra arguments ignore it.
  """

  def apply_gradients(self, *, grads: Any, stats: Stats | None = None, **kwargs) -> TrainState:
    tx = optax.with_extra_args_support(self.tx)
    extra = {} if stats is None else {"stats": stats}
    updates, new_opt_state = tx.update(grads, self.opt_state, self.params, **extra)
    new_params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)
