"""Models shared by the benchmarks, and the loss/step builders that train them.

* :class:`MLP`: the paper's ReLU MLP (Benzing 2022, App. D.5: 784-1000-1000-1000-10;
  here with biases and He initialisation), the demo's, from
  :mod:`neuron_optax.examples.models`.
* :class:`ResNet18`: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool, four
  stages of two basic blocks, BatchNorm, global average pooling); ``width`` is the
  first stage's channel count (64 in the standard network).
* :class:`Transformer`: a pre-LayerNorm Transformer encoder stack
  (``nn.MultiHeadDotProductAttention`` + MLP) on ``(batch, tokens, features)``
  inputs, mean-pooled into a classifier. Every token is a row of the
  statistics of each Dense / attention projection.

:class:`Workload` bundles a model with its input shape, batch size and the
amortisation the paper uses for it; :func:`make_step` builds the usual training
step (``jax.value_and_grad`` for first-order methods, ``value_grad_and_stats``
for the neuron methods), with BatchNorm statistics threaded through as the
mutable ``batch_stats`` collection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import neuron_optax as nox
from neuron_optax.examples.models import MLP


class BasicBlock(nn.Module):
  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
    y = nn.Conv(self.channels, (3, 3), (self.strides,) * 2, padding="SAME", use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), (self.strides,) * 2, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """CIFAR ResNet-18 (He et al. 2016, the 32x32 variant): stem conv, 4 stages x 2 basic blocks.

  ``stage_sizes=(1, 1, 1, 1)`` gives the ResNet-10 layout the quick benchmarks use.
  """

  width: int = 64
  classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes)(x)


class TransformerBlock(nn.Module):
  heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_ratio * d)(y)
    y = nn.Dense(d)(nn.gelu(y))
    return x + y


class Transformer(nn.Module):
  """Token features -> Dense embedding -> ``depth`` pre-LN blocks -> mean over tokens -> classes."""

  d_model: int = 256
  heads: int = 4
  depth: int = 4
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = nn.Dense(self.d_model)(x)
    for _ in range(self.depth):
      x = TransformerBlock(self.heads)(x)
    x = nn.LayerNorm()(x).mean(axis=1)
    return nn.Dense(self.classes)(x)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A model at one batch size, with the amortisation used for FOOF/KFAC on it.

  Attributes:
    name: table label.
    model: the Flax module (called as ``model.apply(variables, x, train=True)``).
    input_shape: shape of one example.
    batch_size: examples per step.
    inverse_every: ``T`` for FOOF/KFAC.
    stats_window: ``S`` for FOOF/KFAC.
    natural_gradient: whether the exact natural gradient (``m = batch`` columns
      of the MC Fisher) is affordable here.
    uncaptured_forward_flops: forward matmul FLOPs that no captured layer does
      (attention scores and their weighted sum), per step.
    description: what the setting is (and how it differs from the paper).
  """

  name: str
  model: nn.Module
  input_shape: tuple[int, ...]
  batch_size: int
  inverse_every: int
  stats_window: int
  natural_gradient: bool = True
  uncaptured_forward_flops: float = 0.0
  description: str = ""

  @property
  def has_batch_stats(self) -> bool:
    return isinstance(self.model, ResNet18)


def mlp_workload(
  batch_size: int,
  widths: Sequence[int] = (1000, 1000, 1000),
  *,
  inverse_every: int = 100,
  stats_window: int = 50,
  name: str | None = None,
) -> Workload:
  features = tuple(widths) + (10,)
  label = name or f"mlp{'-'.join(map(str, (784,) + features))}_b{batch_size}"
  return Workload(
    label,
    MLP(features),
    (784,),
    batch_size,
    inverse_every,
    stats_window,
    True,
    0.0,
    f"MLP 784-{'-'.join(map(str, features))}, batch {batch_size}, T={inverse_every}, S={stats_window}",
  )


def resnet_workload(
  batch_size: int = 128,
  width: int = 64,
  *,
  inverse_every: int = 390,
  stats_window: int = 10,
  stage_sizes: Sequence[int] = (2, 2, 2, 2),
  name: str | None = None,
) -> Workload:
  depth = 2 + 2 * sum(stage_sizes)
  label = name or f"resnet{depth}_w{width}_b{batch_size}"
  return Workload(
    label,
    ResNet18(width, stage_sizes=tuple(stage_sizes)),
    (32, 32, 3),
    batch_size,
    inverse_every,
    stats_window,
    False,
    0.0,
    f"ResNet-{depth} (CIFAR, BatchNorm) width {width}, 32x32x3, batch {batch_size}, "
    f"T={inverse_every}, S={stats_window}",
  )


def transformer_workload(
  batch_size: int = 32,
  tokens: int = 64,
  d_model: int = 256,
  heads: int = 4,
  depth: int = 4,
  features: int = 64,
  *,
  inverse_every: int = 100,
  stats_window: int = 50,
  name: str | None = None,
) -> Workload:
  label = name or f"transformer_d{d_model}_l{depth}_t{tokens}_b{batch_size}"
  # Q Kᵀ and (softmax) V: 2 matmuls of tokens x tokens x d_model per block and example.
  attention = depth * batch_size * 2 * (2 * tokens * tokens * d_model)
  return Workload(
    label,
    Transformer(d_model, heads, depth),
    (tokens, features),
    batch_size,
    inverse_every,
    stats_window,
    True,
    float(attention),
    f"Transformer {depth} blocks, d_model {d_model}, {heads} heads, {tokens} tokens of "
    f"{features} features, batch {batch_size}, T={inverse_every}, S={stats_window}",
  )


def init_variables(workload: Workload, seed: int = 0) -> dict[str, Any]:
  x = jnp.zeros((2,) + workload.input_shape, jnp.float32)
  return workload.model.init(jax.random.key(seed), x, train=False)


def make_loss_fn(workload_or_model) -> Callable:
  """``loss_fn(params, model_state, x, y) -> (mean loss, new model_state)`` (``has_aux`` form)."""
  model = getattr(workload_or_model, "model", workload_or_model)
  has_batch_stats = isinstance(model, ResNet18)

  def loss_fn(params, model_state, x, y):
    if has_batch_stats:
      logits, updates = model.apply({"params": params, **model_state}, x, train=True, mutable=["batch_stats"])
      model_state = dict(updates)
    else:
      logits = model.apply({"params": params}, x, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, model_state

  return loss_fn


def make_step(workload_or_model, tx: optax.GradientTransformation, fisher: str | None, seed: int = 0) -> Callable:
  """``step(params, model_state, opt_state, x, y, step_index) -> (params, model_state, opt_state, loss)``.

  Not jitted. ``fisher=None``: ``jax.value_and_grad`` and ``tx.update(grads,
  state, params)`` (first-order baselines); otherwise ``value_grad_and_stats``
  with that Fisher and ``tx.update(..., stats=stats)``. The Monte-Carlo
  Fisher's labels are sampled with ``fold_in(key(seed), step_index)``.
  """
  loss_fn = make_loss_fn(workload_or_model)
  if fisher is None:

    def step(params, model_state, opt_state, x, y, step_index):
      del step_index
      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), model_state, opt_state, loss

    return step

  capture = nox.value_grad_and_stats(
    loss_fn, has_aux=True, fisher=fisher, likelihood=None if fisher == "empirical" else "categorical"
  )
  base_key = jax.random.key(seed)

  def step(params, model_state, opt_state, x, y, step_index):
    kwargs = {"rng": jax.random.fold_in(base_key, step_index)} if fisher == "mc" else {}
    (loss, model_state), grads, stats = capture(params, model_state, x, y, **kwargs)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), model_state, opt_state, loss

  return step
