"""The LoRA test model shared by ``test_lora.py`` and ``test_laplace_lora.py``, and its explicit twin.

``LoraModel``: an ``nnx.LoRALinear`` hidden layer (tanh) and an ``nnx.LoRA`` head wrapping an ``nnx.Linear``.
``ExplicitModel``: the same function with each adapter factor a plain bias-free ``nnx.Linear`` (``x -> x·A``,
``h -> h·B``), the weights copied from a ``LoraModel``. Both in float64.
"""

import jax.numpy as jnp
import optax
from flax import nnx

F64 = jnp.float64
B_INIT = nnx.initializers.normal(0.7)  # lora_b starts at zero by default, which would make A's cotangents zero


class LoraModel(nnx.Module):
  """An ``nnx.LoRALinear`` hidden layer and an ``nnx.LoRA`` head wrapping an ``nnx.Linear``."""

  def __init__(self, rngs, d_in=4, hidden=5, classes=3, rank=2):
    self.hidden = nnx.LoRALinear(
      d_in, hidden, lora_rank=rank, param_dtype=F64, lora_param_dtype=F64, b_initializer=B_INIT, rngs=rngs
    )
    base = nnx.Linear(hidden, classes, param_dtype=F64, rngs=rngs)
    self.head = nnx.LoRA(hidden, rank, classes, base_module=base, param_dtype=F64, b_initializer=B_INIT, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


class ExplicitModel(nnx.Module):
  """The same function with the adapters' factors as plain bias-free ``nnx.Linear`` layers ``a1, b1, a2, b2``."""

  def __init__(self, lora: LoraModel):
    rngs = nnx.Rngs(0)

    def linear(source_kernel, source_bias=None):
      layer = nnx.Linear(*source_kernel.shape, use_bias=source_bias is not None, param_dtype=F64, rngs=rngs)
      layer.kernel[...] = source_kernel[...]
      if source_bias is not None:
        layer.bias[...] = source_bias[...]
      return layer

    self.base1 = linear(lora.hidden.kernel, lora.hidden.bias)
    self.a1, self.b1 = linear(lora.hidden.lora.lora_a), linear(lora.hidden.lora.lora_b)
    self.base2 = linear(lora.head.base_module.kernel, lora.head.base_module.bias)
    self.a2, self.b2 = linear(lora.head.lora_a), linear(lora.head.lora_b)

  def __call__(self, x):
    h = jnp.tanh(self.base1(x) + self.b1(self.a1(x)))
    return self.base2(h) + self.b2(self.a2(h))


def xent(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
