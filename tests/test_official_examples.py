"""Flax's official MNIST examples, each switched to ``nox.foof`` by the few lines the README shows.

Small versions (narrower CNN, a few hundred images, a few steps) of

1. the linen example as it was before Flax migrated it to NNX
   (``examples/mnist/train.py``: ``CNN``, ``apply_model``, ``update_model``,
   ``create_train_state`` with ``flax.training.train_state.TrainState``), and
2. the current NNX example (``CNN`` with BatchNorm and Dropout taking ``rngs``
   at call time, ``loss_fn(model, batch, rngs)``, ``nnx.Optimizer``,
   ``nnx.MultiMetric``, ``train_step(model, optimizer, metrics, batch, rngs)``).

Lines marked ``# nox`` are the only ones that differ from the official code.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import neuron_optax as nox

# The official CNN is Conv32, Conv64, Dense256 (3,136 inputs); narrower here to keep the tests fast.
FEATURES = (4, 8, 32)
LEARNING_RATE, MOMENTUM = 0.1, 0.9  # the official linen config's
NNX_LEARNING_RATE = 0.005  # the NNX MNIST tutorial's adamw(0.005, 0.9)


@pytest.fixture(scope="module")
def mnist():
  from neuron_optax.examples import data

  dataset = data.load("mnist_subset", layout="nhwc").take(320, seed=0)
  return {"image": dataset.images, "label": dataset.labels}


def _batches(ds, batch_size=32):
  for start in range(0, len(ds["label"]) - batch_size + 1, batch_size):
    yield {k: v[start : start + batch_size] for k, v in ds.items()}


# --------------------------------------------------------------------------- #
# 1. linen, flax.training.train_state.TrainState
# --------------------------------------------------------------------------- #


class CNN(nn.Module):
  """A simple CNN model."""

  features: tuple[int, int, int] = FEATURES

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=self.features[0], kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=self.features[1], kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=self.features[2])(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


@jax.jit
def apply_model(state, images, labels):
  """Computes gradients, loss and accuracy for a single batch."""

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images)
    one_hot = jax.nn.one_hot(labels, 10)
    loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
    return loss, logits

  grad_fn = nox.value_grad_and_stats(loss_fn, has_aux=True)  # nox: was jax.value_and_grad
  (loss, logits), grads, stats = grad_fn(state.params)  # nox: + stats
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return grads, stats, loss, accuracy  # nox: + stats


@jax.jit
def update_model(state, grads, stats):  # nox: + stats
  # nox: was `return state.apply_gradients(grads=grads)`, which cannot pass stats to the transform
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, stats=stats)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def create_train_state(rng):
  """Creates initial `TrainState`."""
  cnn = CNN()
  params = cnn.init(rng, jnp.ones([1, 28, 28, 1]))["params"]
  tx = optax.chain(nox.foof(1.0), optax.sgd(LEARNING_RATE, MOMENTUM))  # nox: was optax.sgd(lr, momentum)
  return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def test_linen_train_state_example_trains_with_foof(mnist):
  state = create_train_state(jax.random.key(0))
  first = next(_batches(mnist))
  _, _, initial_loss, _ = apply_model(state, first["image"], first["label"])
  losses = []
  for _ in range(2):  # epochs
    for batch in _batches(mnist):
      grads, stats, loss, _ = apply_model(state, batch["image"], batch["label"])  # nox: + stats
      state = update_model(state, grads, stats)  # nox: + stats
      losses.append(float(loss))
  _, _, final_loss, accuracy = apply_model(state, first["image"], first["label"])
  assert np.all(np.isfinite(losses))
  assert int(state.step) == len(losses) == 20
  assert int(state.opt_state[0].count) == 20  # the FOOF state advanced with every update
  assert np.mean(losses[10:]) < np.mean(losses[:10]), losses  # the second epoch's loss is lower
  assert float(final_loss) < 0.8 * float(initial_loss), (initial_loss, final_loss)
  assert float(accuracy) > 0.3  # chance: 0.1


# --------------------------------------------------------------------------- #
# 2. NNX: nnx.Optimizer, nnx.MultiMetric, rngs passed into loss_fn
# --------------------------------------------------------------------------- #


class NnxCNN(nnx.Module):
  """A simple CNN model."""

  def __init__(self, rngs: nnx.Rngs, features=FEATURES):
    self.conv1 = nnx.Conv(1, features[0], kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(features[0], rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025)
    self.conv2 = nnx.Conv(features[0], features[1], kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(features[1], rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(7 * 7 * features[1], features[2], rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025)
    self.linear2 = nnx.Linear(features[2], 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    x = self.linear2(x)
    return x


def loss_fn(model: NnxCNN, batch, rngs):
  logits = model(batch["image"], rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch["label"]).mean()
  return loss, logits


@nnx.jit
def train_step(model: NnxCNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch, rngs):
  """Train for a single step."""
  grad_fn = nox.nnx.value_grad_and_stats(loss_fn, has_aux=True)  # nox: was nnx.value_and_grad
  (loss, logits), grads, stats = grad_fn(model, batch, rngs)  # nox: + stats
  metrics.update(loss=loss, logits=logits, labels=batch["label"])  # In-place updates.
  optimizer.update(model, grads, stats=stats)  # nox: + stats=stats


@nnx.jit
def eval_step(model: NnxCNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch, None)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])  # In-place updates.


def test_nnx_example_trains_with_foof(mnist):
  model = NnxCNN(rngs=nnx.Rngs(0))
  # The NNX MNIST tutorial's optimizer: on this narrow CNN with BatchNorm, SGD at the linen config's
  # lr 0.1 is itself unstable (its loss rises to 5-6 within 40 steps), with or without FOOF in front.
  tx = optax.chain(nox.foof(), optax.adamw(NNX_LEARNING_RATE, MOMENTUM))  # nox: was optax.adamw(lr, momentum)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  rngs = nnx.Rngs(0)

  def evaluate():
    model.eval()
    metrics.reset()
    eval_step(model, metrics, next(_batches(mnist)))
    result = {k: float(v) for k, v in metrics.compute().items()}
    metrics.reset()
    return result

  initial = evaluate()
  history = []
  for _ in range(2):  # epochs
    model.train()
    for batch in _batches(mnist):
      train_step(model, optimizer, metrics, batch, rngs)
    history.append({k: float(v) for k, v in metrics.compute().items()})
    metrics.reset()
  final = evaluate()
  assert all(np.isfinite(h["loss"]) for h in history)
  assert history[1]["loss"] < history[0]["loss"], history
  assert final["loss"] < 0.8 * initial["loss"], (initial, final)
  assert final["accuracy"] > 0.3  # chance: 0.1
  assert int(rngs.default.count[...]) == 40  # two dropout draws per step, written back
  assert int(optimizer.opt_state[0].count[...]) == 20
  assert type(model.linear1) is nnx.Linear  # the model's own modules are never swapped


# --------------------------------------------------------------------------- #
# 3. A small damping before SGD+momentum: diverges bare, trains with nox.norm_constrained
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def mnist_split():
  from neuron_optax.examples import data

  train, held_out = data.load("mnist_subset", layout="nhwc").take(1600, seed=1).split(0.2, seed=0)
  as_dict = lambda ds: {"image": ds.images, "label": ds.labels}
  return as_dict(train), as_dict(held_out)


def _train_linen(tx, train, held_out, epochs):
  cnn = CNN()
  params = cnn.init(jax.random.key(0), jnp.ones([1, 28, 28, 1]))["params"]
  state = train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)
  losses = []
  for _ in range(epochs):
    for batch in _batches(train):
      grads, stats, loss, _ = apply_model(state, batch["image"], batch["label"])
      state = update_model(state, grads, stats)
      losses.append(float(loss))
  _, _, _, accuracy = apply_model(state, held_out["image"], held_out["label"])
  return losses, float(accuracy)


def _train_nnx(tx, train, held_out, epochs):
  model = NnxCNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  rngs, losses = nnx.Rngs(0), []
  for _ in range(epochs):
    model.train()
    for batch in _batches(train):
      metrics.reset()
      train_step(model, optimizer, metrics, batch, rngs)
      losses.append(float(metrics.compute()["loss"]))
  model.eval()
  metrics.reset()
  eval_step(model, metrics, held_out)
  return losses, float(metrics.compute()["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_small_damping_diverges_and_warns_bare_and_stays_finite_with_norm_constrained(api, mnist_split):
  """kfac(1e-3) and foof(1e-3) before sgd(0.1, momentum=0.9) (issue 27): bare, they diverge and warn; wrapped in
  nox.norm_constrained they stay finite. Their held-out accuracy is printed, not asserted: in this short run
  (120 steps) it did not reach SGD's (docs/hyperparameters.md has the numbers)."""
  import warnings

  train, held_out = mnist_split
  run = {"linen": _train_linen, "nnx": _train_nnx}[api]
  epochs = 3  # 120 steps of 32 images
  sgd = lambda: optax.sgd(LEARNING_RATE, MOMENTUM)
  _, sgd_accuracy = run(sgd(), train, held_out, epochs)
  results = {}
  for name, make in {"kfac": lambda: nox.kfac(1e-3), "foof": lambda: nox.foof(1e-3)}.items():
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      bare, _ = run(optax.chain(make(), sgd()), train, held_out, 1)
      jax.effects_barrier()
    assert not np.isfinite(bare).all() or max(bare) > 10 * bare[0], (name, bare)  # diverged
    assert any(issubclass(w.category, nox.DivergenceWarning) for w in caught), name  # and said so
    guarded = optax.chain(nox.norm_constrained(make(), max_kl=3e-4, learning_rate=LEARNING_RATE), sgd())
    losses, accuracy = run(guarded, train, held_out, epochs)
    results[name] = accuracy
    assert np.isfinite(losses).all(), (name, losses)
  print(f"{api}: held-out accuracy SGD {sgd_accuracy:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
