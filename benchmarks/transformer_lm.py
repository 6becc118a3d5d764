"""GPT-style character LM on Python's bundled docs: AdamW, Muon, schedule-free AdamW and neuron recipes.

The corpus is ``pydoc_data.topics`` (the text of ``help()``, shipped with Python;
:mod:`neuron_optax.examples.text`), 96 characters, split in three contiguous parts:
**train** (first 80 %), **validation** (next 10 %: every tuning decision) and **test** (last
10 %: every reported number). The model is written the way Flax users write a small GPT:
``nn.Embed`` plus a learned position table, ``--layers`` pre-LayerNorm blocks (causal
``nn.MultiHeadDotProductAttention`` and a GELU MLP, 4x) stacked with
``nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True})``,
a final LayerNorm and an untied ``Dense`` head (``--tied``: ``embed.attend``).

Layouts. ``--layout scan`` uses the scanned, rematerialised stack; ``--layout unrolled``
applies the same blocks in a Python loop (parameters ``block_0 … block_{L-1}``, the
scanned parameters restacked, so every method sees identical initial values and the
functions are identical). ``--layout auto`` (default) uses the scan when
``nox.value_grad_and_stats`` can capture layers inside it and otherwise runs **every**
method unrolled, so step times compare like with like (``layout`` in the JSON).

Recipes. Each run is a recipe string ``PRE+OPT[:key=value,...]``:

* ``PRE`` ``none`` | ``foof`` | ``kfac`` | ``fngd`` | ``eigen`` (``nox.eigenbasis`` wrapping
  ``OPT``); ``OPT`` ``adamw`` | ``adam`` | ``sgd`` (momentum 0.9) | ``muon`` |
  ``sfadamw``. ``adamw`` is ``adamw(b1=0.9, b2, weight_decay=wd)`` with the decay on
  kernels and the embedding only; ``adam`` the same with ``wd=0``. ``muon`` is
  ``optax.contrib.muon`` with the standard split: ``MuonDimensionNumbers`` for every hidden
  matrix (attention query/key/value/out and the MLP kernels, per block of the scanned
  stack), AdamW (``adam_lr``, AdamW's decay mask) for the embedding, position table, norms,
  biases and head; ``sfadamw`` is ``optax.contrib.schedule_free_adamw`` (warm-up ``warmup``,
  evaluated at its averaged iterate).
* any option ``k=a/b/c`` is a grid (the cartesian product of all grids is run).
* ``lr`` peak learning rate, ``sched`` ``cosine`` (linear warm-up over ``warmup`` of the
  steps, default 0.05, then cosine to 10 % of the peak) or ``const``; ``horizon`` the
  fraction of ``--steps`` that the schedule and the run last.
* ``clip`` global-norm clipping (default 1.0, off for sgd; ``0``: off), ``b2``, ``wd``;
  Muon: ``adam_lr`` (the AdamW part's peak, required), ``beta`` (Muon's momentum).
* preconditioner: ``damping`` (a number, or ``A>B@F``: ``A`` until fraction ``F`` of
  the run, then ``B``), ``every`` (``inverse_every`` / ``refresh_every``), ``window``
  (``stats_window``, ``none`` = every step), ``ema`` (``ema_decay``), ``contraction``,
  ``phase`` (FOOF/KFAC: ``auto``, or ``fixed``: one compiled step per amortisation phase,
  picked on the host with ``nox.amortisation_phase``), ``rows`` (FOOF's ``statistics_rows``: ``A`` from
  a random subset of that many token rows per layer and step),
  ``alpha`` (FNGD), ``layers`` (FOOF/KFAC/FNGD on ``all`` or ``+``-joined ``mlp``,
  ``attn``, ``qkv``, ``out``, ``head``; via ``optax.masked``), ``sides`` (``input`` /
  ``both``) and ``refresh`` (``eigh`` / ``power``) for ``eigen``.
* ``rec=1`` marks the recommended recipe; ``name`` a label for the tables.

Every recipe is ``chain(PRE, clip, OPT, step sizes)`` (``eigen``: ``chain(clip,
nox.eigenbasis(OPT), step sizes)``) with the peak learning rates in the last state (one
compilation per recipe structure; the learning-rate grid and the seeds share it). All runs
of one invocation are trained **in lockstep**: chunks of ``--eval-every`` steps of each
run in turn, so that load on the machine affects all of them alike; each chunk is timed
(``block_until_ready`` at its end; evaluations are not counted). The step-time ratio is
the median over chunks of (this recipe's time per step) / (AdamW's, same chunk).

Modes. Reports (default, seeds ``1,2,3``, never used for tuning) record curves on the
**test** split; ``--tune`` (seed ``0``) records them on the **validation** split and adds a
``tuning`` table: for every recipe with grids, the best grid point and whether each grid
option's best value lies strictly inside its grid. Both modes evaluate both splits at the end.

Targets. The reference is the AdamW recipe (the first ``none+adamw`` run, else the first
``none+adam``/``none+sgd``, or ``--reference NAME``): its final loss on the curve split,
averaged over the seeds. For every run: the first step (linear interpolation between
evaluations) and the training seconds at which its loss reaches that target, as fractions
of AdamW's steps and seconds (``steps_to_reference``, ``wallclock_to_reference``).

``--recipes compare`` runs tuned AdamW, tuned Muon and the recommended neuron recipe and
writes ``<output-dir>/transformer_lm_<tag>.json`` whose ``summary`` has one entry per recipe:
``recipe``, ``family``, ``recommended``, ``final_test_loss`` (mean over seeds),
``steps_to_reference``, ``wallclock_to_reference`` and ``step_time_ratio`` (plus details).

Settings: ``--setting cpu`` (default: d_model 64, 4 heads, 2 layers, context 64,
batch 32, 500 steps; ``--d-model 128 --layers 4`` the larger CPU scale), ``--setting
accelerator`` (d_model 256, 8 heads, 4 layers, context 128, batch 64, 2000 steps) and
``--quick`` (seconds; used by the test). ``--dtype bfloat16``: parameters and activations in bf16 (``dtype`` and
``param_dtype`` of every layer, initialised as float32's initial values rounded; the loss in float32 from the
bf16 logits; ``benchmarks/long_bf16.py`` compares the two). Every run records ``nonfinite_steps`` (steps whose
loss or any update was not finite). Writes
``<output-dir>/transformer_lm_<tag>.{json,csv,png}`` with the machine, the versions, the
grids and every run's curves.

    python benchmarks/transformer_lm.py --recipes compare --tag compare_d64 --no-plot
    python benchmarks/transformer_lm.py --setting accelerator --recipes compare --tag compare_gpu
    python benchmarks/transformer_lm.py --tune --recipes "none+muon:lr=0.02/0.04/0.08,adam_lr=1.2e-2" --tag tune_muon
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import neuron_optax as nox  # noqa: E402
from neuron_optax.examples import text  # noqa: E402

DIVERGED = 10.0  # nats; the uniform distribution over the vocabulary is ln 96 = 4.56

# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #


class Block(nn.Module):
  """Pre-LN block: causal self-attention and a GELU MLP, each added to the residual stream.

  Returns ``(x, None)`` so that ``nn.scan`` can carry ``x``.
  """

  d_model: int
  heads: int
  dtype: Any = jnp.float32  # parameters and activations (LayerNorm reduces in float32 either way)

  @nn.compact
  def __call__(self, x, _=None):
    dt = dict(dtype=self.dtype, param_dtype=self.dtype)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm(name="ln_attention", **dt)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention", **dt)(h, mask=mask)
    h = nn.gelu(nn.Dense(4 * self.d_model, name="mlp_in", **dt)(nn.LayerNorm(name="ln_mlp", **dt)(x)))
    return x + nn.Dense(self.d_model, name="mlp_out", **dt)(h), None


class TransformerLM(nn.Module):
  """GPT-style decoder. ``scan=True``: ``nn.scan(nn.remat(Block))`` over ``layers`` (params ``blocks``)."""

  d_model: int
  heads: int
  layers: int
  seq_len: int
  scan: bool = False
  remat: bool = True
  tied: bool = False
  dtype: Any = jnp.float32  # parameters and activations (``--dtype``)

  @nn.compact
  def __call__(self, tokens):
    dt = dict(dtype=self.dtype, param_dtype=self.dtype)
    embed = nn.Embed(text.VOCAB_SIZE, self.d_model, name="embed", **dt)
    x = embed(tokens)
    position = self.param("position", nn.initializers.normal(0.02), (self.seq_len, self.d_model), self.dtype)
    x = x + position[: tokens.shape[1]]
    if self.scan:
      block = nn.remat(Block) if self.remat else Block
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
      x, _ = stack(self.d_model, self.heads, self.dtype, name="blocks")(x, None)
    else:
      for i in range(self.layers):
        x, _ = Block(self.d_model, self.heads, self.dtype, name=f"block_{i}")(x)
    x = nn.LayerNorm(name="ln_final", **dt)(x)
    return embed.attend(x) if self.tied else nn.Dense(text.VOCAB_SIZE, name="head", **dt)(x)


def unstack_blocks(params: dict, layers: int) -> dict:
  """Scanned parameters (``blocks``, leading axis ``layers``) as the unrolled model's ``block_i``."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(layers):
    out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return out


def stack_blocks(params: dict, layers: int) -> dict:
  """Inverse of :func:`unstack_blocks`."""
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(layers)])
  return out


def lm_loss(model, params, window):
  # bf16 models: the softmax cross-entropy is computed in float32 from the bf16 logits (a no-op in float32).
  logits = model.apply({"params": params}, window[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()


def scan_capturable(model_scan: TransformerLM, params_scan, window) -> tuple[bool, str]:
  """Whether ``nox.value_grad_and_stats`` captures the layers inside the scanned stack."""
  try:
    jax.eval_shape(nox.value_grad_and_stats(lambda p, w: lm_loss(model_scan, p, w)), params_scan, window)
  except NotImplementedError as error:
    return False, str(error).split("\n")[0][:200]
  return True, ""


# --------------------------------------------------------------------------- #
# Recipes
# --------------------------------------------------------------------------- #

RECIPE_DEFAULTS: dict[str, Any] = dict(
  lr=None,
  sched="cosine",
  warmup=0.05,
  final=0.1,
  horizon=1.0,
  clip=None,
  b2=0.99,
  wd=0.1,
  momentum=0.9,
  damping=1.0,
  every=100,
  window=10,
  ema=0.95,
  contraction="auto",
  phase="auto",
  rows=None,
  sharing="expand",
  alpha=1.0,
  layers="all",
  sides="input",
  refresh="eigh",
  adam_lr=None,
  beta=0.95,
  rec=0,
  name=None,
)
DEFAULT_LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.1, "muon": 0.04, "sfadamw": 3e-3}
PRECONDITIONERS = ("none", "foof", "kfac", "fngd", "eigen")
OPTIMIZERS = ("adamw", "adam", "sgd", "muon", "sfadamw")
# Options that do not change the compiled step: the injected learning rates and the labels.
_RUNTIME_OPTIONS = ("lr", "adam_lr", "name", "rec")


@dataclasses.dataclass(frozen=True)
class Recipe:
  spec: str  # the string it was parsed from, with one value per grid option
  pre: str
  opt: str
  options: dict
  base: str = ""  # the recipe string with its grids, shared by every point of the grid
  grid: tuple = ()  # the options given as grids (a/b/c)

  @property
  def name(self) -> str:
    return self.options["name"] or self.spec

  @property
  def lr(self) -> float:
    return float(self.options["lr"])

  @property
  def uses_stats(self) -> bool:
    return self.pre != "none"

  @property
  def family(self) -> str:
    if self.pre != "none":
      return "neuron"
    return {"adamw": "adamw", "adam": "adamw", "sgd": "sgd", "muon": "muon", "sfadamw": "schedule_free"}[self.opt]

  @property
  def recommended(self) -> bool:
    return str(self.options["rec"]) not in ("0", "False", "false", "no")

  def structure(self) -> str:
    """Everything but the injected learning rates and the labels: runs with equal structure share a compiled step.

    Schedule-free AdamW's learning rate is part of its update (no injected scale), so it is structure there.
    """
    runtime = () if self.opt == "sfadamw" else _RUNTIME_OPTIONS
    return f"{self.pre}+{self.opt}:" + ",".join(
      f"{k}={v}" for k, v in sorted(self.options.items()) if k not in runtime + ("name", "rec")
    )


def parse_recipes(spec: str) -> list[Recipe]:
  """``"a;b"``: one :class:`Recipe` per recipe and grid point (any option ``k=x/y/z`` is a grid)."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    head, _, tail = item.partition(":")
    pre, _, opt = head.partition("+")
    if pre not in PRECONDITIONERS or opt not in OPTIMIZERS:
      raise ValueError(
        f"recipe {item!r}: expected PRE+OPT with PRE in {'/'.join(PRECONDITIONERS)}, OPT in {'/'.join(OPTIMIZERS)}"
      )
    options = dict(RECIPE_DEFAULTS)
    for pair in filter(None, tail.split(",")):
      key, _, value = pair.partition("=")
      if key not in options:
        raise ValueError(f"recipe {item!r}: unknown option {key!r}")
      options[key] = value
    if options["lr"] is None:
      options["lr"] = str(DEFAULT_LR[opt])
    grid = tuple(k for k, v in options.items() if k != "name" and isinstance(v, str) and "/" in v)
    values = [options[k].split("/") for k in grid]
    for point in itertools.product(*values):
      one = dict(options, **dict(zip(grid, point)))
      one["lr"] = float(one["lr"])
      label = options["name"]
      suffix = " ".join(f"{k}={_number(v)}" for k, v in zip(grid, point))
      if label and grid:
        one["name"] = f"{label} {suffix}"
      spec_one = f"{pre}+{opt}:" + ",".join(
        f"{k}={_number(v)}" for k, v in one.items() if v != RECIPE_DEFAULTS[k] and k != "name"
      )
      if label:
        spec_one += f",name={one['name']}"
      out.append(Recipe(spec_one, pre, opt, one, base=item, grid=grid))
  return out


def _is_number(value) -> bool:
  try:
    float(value)
  except (TypeError, ValueError):
    return False
  return True


def _number(value) -> str:
  try:
    return format(float(value), "g")
  except (TypeError, ValueError):
    return str(value)


def _float_or_none(value):
  return None if value in (None, "none", "None") else float(value)


def damping_value(spec, steps: int):
  """A number, or ``"A>B@F"``: ``A`` for the first fraction ``F`` of ``steps``, then ``B``."""
  spec = str(spec)
  if ">" not in spec:
    return float(spec)
  first, _, rest = spec.partition(">")
  second, _, fraction = rest.partition("@")
  return optax.piecewise_constant_schedule(float(first), {int(float(fraction) * steps): float(second) / float(first)})


def unit_schedule(options: dict, steps: int):
  """The learning-rate shape with peak 1 (the peak is multiplied in by an injected scale)."""
  if options["sched"] == "const":
    return 1.0
  warmup = max(1, int(float(options["warmup"]) * steps))
  return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps, end_value=float(options["final"]))


def layer_selected(path: tuple[str, ...], layers: str) -> bool:
  """Whether the captured layer at ``path`` (module names) is preconditioned under ``layers``."""
  if layers == "all":
    return True
  if not path:
    return False
  groups = set(layers.split("+"))
  last = path[-1]
  in_attention = "attention" in path
  return (
    ("mlp" in groups and last in ("mlp_in", "mlp_out"))
    or ("attn" in groups and in_attention)
    or ("qkv" in groups and in_attention and last in ("query", "key", "value"))
    or ("out" in groups and in_attention and last == "out")
    or ("head" in groups and last == "head")
  )


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def muon_dimension_numbers(params):
  """``optax.contrib.muon``'s standard split: every hidden matrix (attention query/key/value/out and the MLP
  kernels, each copy of a stacked block separately) gets ``MuonDimensionNumbers``; embeddings, the position
  table, norms, biases and the head get ``None`` (AdamW)."""

  def dims(path, leaf):
    names = _path_names(path)
    if names[-1] != "kernel" or "head" in names:
      return None
    stack = leaf.ndim - (3 if names[-2] in ("query", "key", "value", "out") else 2)
    if names[-2] == "out":  # (heads, head_dim) -> d_model
      return optax.contrib.MuonDimensionNumbers(reduction_axis=(stack, stack + 1), output_axis=stack + 2)
    if names[-2] in ("query", "key", "value"):  # d_model -> (heads, head_dim)
      return optax.contrib.MuonDimensionNumbers(reduction_axis=stack, output_axis=(stack + 1, stack + 2))
    return optax.contrib.MuonDimensionNumbers(reduction_axis=stack, output_axis=stack + 1)

  return jax.tree_util.tree_map_with_path(dims, params)


def _decay_mask(params):
  """AdamW's weight decay: kernels and the embedding, not biases, norms or the position table."""
  return jax.tree_util.tree_map_with_path(lambda path, x: x.ndim >= 2 and "position" not in _path_names(path), params)


def decoupled_decay(weight_decay: float, schedule, mask) -> optax.GradientTransformation:
  """``u - schedule(t) * wd * p`` on ``mask``: the decoupled decay of ``optax.adamw`` (before its peak scale)."""

  def init(params):
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    factor = schedule(state.count) if callable(schedule) else schedule
    updates = jax.tree.map(lambda u, p, m: u - factor * weight_decay * p if m else u, updates, params, mask)
    return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


def scale_by_step_sizes(labels) -> optax.GradientTransformation:
  """Multiplies each leaf by the step size of its label (``"base"`` or ``"muon"``), held in the state.

  The peak learning rates live in the state, so a learning-rate grid and the seeds share one compiled step.
  """

  def init(params):
    del params
    return {"base": jnp.ones([], jnp.float32), "muon": jnp.ones([], jnp.float32)}

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, label: u * state[label].astype(u.dtype), updates, labels), state

  return optax.GradientTransformation(init, update)


def build_transform(
  recipe: Recipe,
  params,
  steps: int,
  steps_per_epoch: int,
  batch_size: int,
  kernel_input_ndim=None,
  phase=None,
  muon_split=None,
):
  """``chain(PRE, clip, OPT, step sizes)`` with the peak learning rates in the last state.

  ``phase``: FOOF/KFAC's fixed step kind (``"plain"``, ``"statistics"``, ``"inversion"``; default: the
  recipe's ``phase`` option unless that is ``"fixed"``, then ``"auto"``).

  ``PRE=eigen`` wraps ``clip, OPT`` instead: ``chain(clip, nox.eigenbasis(OPT), step sizes)``.
  ``kernel_input_ndim``: the captured layers' layouts, ``nox.kernel_layouts(stats)`` (the
  scanned model's kernels have a leading stack axis, one FOOF/KFAC state per block).
  ``muon_split``: ``params -> MuonDimensionNumbers or None`` per leaf for ``OPT=muon`` (default: this model's
  :func:`muon_dimension_numbers`).
  """
  o = recipe.options
  if phase is None:
    phase = "auto" if o["phase"] == "fixed" else o["phase"]
  run_steps = max(1, int(round(float(o["horizon"]) * steps)))
  window = stats_window_option(o)
  parts = []
  if recipe.pre in ("foof", "kfac", "fngd"):
    damping = damping_value(o["damping"], run_steps)
    if recipe.pre == "foof":
      pre = nox.foof(
        damping,
        inverse_every=int(o["every"]),
        stats_window=window,
        ema_decay=float(o["ema"]),
        contraction=o["contraction"],
        kernel_input_ndim=kernel_input_ndim,
        phase=phase,
        statistics_rows=None if o["rows"] in (None, "none") else int(o["rows"]),
        weight_sharing=o["sharing"],
      )
    elif recipe.pre == "kfac":
      pre = nox.kfac(
        damping,
        inverse_every=int(o["every"]),
        stats_window=window,
        ema_decay=float(o["ema"]),
        contraction=o["contraction"],
        kernel_input_ndim=kernel_input_ndim,
        phase=phase,
        weight_sharing=o["sharing"],
        statistics_rows=None if o["rows"] in (None, "none") else int(o["rows"]),
      )
    else:
      pre = nox.fngd(
        float(o["alpha"]),
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        kernel_input_ndim=kernel_input_ndim,
      )
    if o["layers"] != "all":
      mask = jax.tree_util.tree_map_with_path(
        lambda path, _: layer_selected(_path_names(path)[:-1], o["layers"]), params
      )
      pre = optax.masked(pre, mask)
    parts.append(pre)
  clip = _float_or_none(o["clip"])
  if clip is None:
    clip = 0.0 if recipe.opt == "sgd" else 1.0
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  unit = unit_schedule(o, run_steps)
  decay = float(o["wd"])
  labels = jax.tree.map(lambda _: "base", params)
  if recipe.opt == "sgd":
    opt = optax.sgd(unit, momentum=float(o["momentum"]))
  elif recipe.opt == "muon":
    dims = (muon_split or muon_dimension_numbers)(params)
    labels = jax.tree.map(
      lambda d: "base" if d is None else "muon",
      dims,
      is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers),
    )
    adam_decay = jax.tree.map(lambda m, label: bool(m) and label == "base", _decay_mask(params), labels)
    opt = optax.chain(
      optax.contrib.muon(
        unit,
        beta=float(o["beta"]),
        weight_decay=decay,
        adam_b1=0.9,
        adam_b2=float(o["b2"]),
        adam_weight_decay=0.0,  # AdamW's masked decay below, as in the AdamW baseline
        adam_learning_rate=unit,
        muon_weight_dimension_numbers=dims,
      ),
      decoupled_decay(decay, unit, adam_decay),
    )
  elif recipe.opt == "sfadamw":
    warmup = max(1, int(float(o["warmup"]) * run_steps))
    opt = optax.contrib.schedule_free_adamw(
      recipe.lr, warmup_steps=warmup, b1=0.9, b2=float(o["b2"]), weight_decay=decay
    )
  elif recipe.pre == "eigen":
    # AdamW's decoupled decay commutes with the orthogonal rotations, so it is applied outside the
    # eigenbasis (the same update as nox.eigenbasis(optax.adamw(...)), without rotating the parameters).
    opt = optax.adam(unit, b1=0.9, b2=float(o["b2"]))
  else:
    decay = decay if recipe.opt == "adamw" else 0.0
    opt = optax.adamw(unit, b1=0.9, b2=float(o["b2"]), weight_decay=decay, mask=_decay_mask(params))
  if recipe.pre == "eigen":
    decay = decay if recipe.opt == "adamw" else 0.0
    opt = nox.eigenbasis(
      opt,
      sides=o["sides"],
      ema_decay=float(o["ema"]),
      refresh_every=int(o["every"]),
      stats_window=window,
      refresh=o["refresh"],
      kernel_input_ndim=kernel_input_ndim,
    )
    if decay:
      opt = optax.chain(opt, decoupled_decay(decay, unit, _decay_mask(params)))
  parts.append(opt)
  parts.append(scale_by_step_sizes(labels))
  return optax.chain(*parts), run_steps


def step_sizes(recipe: Recipe) -> dict:
  """The injected peak learning rates: ``base`` (AdamW's, or Muon's AdamW part) and ``muon``."""
  if recipe.opt == "sfadamw":
    return {"base": 1.0, "muon": 1.0}
  if recipe.opt == "muon":
    if recipe.options["adam_lr"] is None:
      raise ValueError(f"recipe {recipe.spec!r}: Muon needs adam_lr= (the tuned AdamW learning rate)")
    return {"base": float(recipe.options["adam_lr"]), "muon": recipe.lr}
  return {"base": recipe.lr, "muon": recipe.lr}


def init_state(tx, params, sizes: dict):
  state = jax.tree.map(jnp.copy, tx.init(params))  # distinct buffers: the step donates its state
  return state[:-1] + ({k: jnp.asarray(v, jnp.float32) for k, v in sizes.items()},)


def eval_params(recipe: Recipe, params, state):
  """Schedule-free AdamW is evaluated at its averaged iterate ``x``, every other method at its parameters."""
  if recipe.opt != "sfadamw":
    return params
  return optax.contrib.schedule_free_eval_params(state[-2], params)


def make_step(loss_fn, tx, uses_stats: bool):
  """The jitted ``step(params, opt_state, window) -> (params, opt_state, loss, finite)``.

  ``finite``: whether the loss and every update of the step were finite (counted as ``nonfinite_steps``).
  """

  def step(params, opt_state, window):
    if uses_stats:
      loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params, window)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, window)
      updates, opt_state = tx.update(grads, opt_state, params)
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray([jnp.isfinite(u).all() for u in jax.tree.leaves(updates)]))
    return optax.apply_updates(params, updates), opt_state, loss, finite

  return jax.jit(step, donate_argnums=(0, 1))


class PhasedStep:
  """FOOF/KFAC with ``phase=fixed``: one compiled step per amortisation phase, picked on the host.

  ``nox.amortisation_phase(index, T, S)`` names the kind of step ``index``; the ``"plain"`` step
  (most steps) compiles neither the statistics nor a factorisation, nor a ``lax.cond`` around them.
  The states of the three transforms are interchangeable, so the trajectory is that of ``phase="auto"``.
  """

  def __init__(self, steps: dict, inverse_every: int, stats_window: int | None):
    self.steps, self.inverse_every, self.stats_window = steps, inverse_every, stats_window

  def __call__(self, params, opt_state, window, index: int):
    phase = nox.amortisation_phase(index, self.inverse_every, self.stats_window)
    return self.steps[phase](params, opt_state, window)


def fixed_phase(recipe: Recipe) -> bool:
  return recipe.pre in ("foof", "kfac") and recipe.options["phase"] == "fixed"


def stats_window_option(options: dict) -> int | None:
  return None if str(options["window"]).lower() == "none" else int(options["window"])


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #

# The tuned recipes of the CPU table (benchmarks/results/transformer_lm_tune_*.json hold the grids).
CPU_RECIPES = ";".join(
  [
    "none+adamw:lr=1.2e-2,name=AdamW (tuned)",
    "none+sgd:lr=0.3,name=SGD+M (tuned)",
    "foof+adam:lr=8e-3,damping=0.1,every=20,window=5,name=FOOF(0.1 T=20 S=5) + Adam",
    "foof+adam:lr=8e-3,damping=1.0,every=100,window=10,name=FOOF(1.0 T=100 S=10) + Adam",
  ]
)
# The accelerator setting (defined, not yet run): the learning rates tuned on CPU need not transfer, so each
# recipe carries a grid; the best of each is the one with the lowest final held-out loss.
ACCELERATOR_RECIPES = ";".join(
  [
    "none+adamw:lr=1e-3/2e-3/4e-3,name=AdamW",
    "none+sgd:lr=0.1/0.3,name=SGD+M",
    "foof+adam:lr=1e-3/2e-3/4e-3,damping=0.1,every=20,window=5,name=FOOF(0.1 T=20 S=5) + Adam",
    "foof+sgd:lr=0.3/1.0,damping=10,name=FOOF(10) + SGD+M",
  ]
)
# Issue #16's defaults with constant learning rates: foof(1.0) / kfac(1.0) at inverse_every=100,
# stats_window=10 and fngd(alpha=1.0), each before sgd(0.1, momentum=0.9) and before adam(1e-3).
DEFAULTS_RECIPES = ";".join(
  [
    "none+adam:lr=1e-3,sched=const,clip=0,b2=0.999,name=adam(1e-3)",
    "none+sgd:lr=0.1,sched=const,clip=0,name=sgd(0.1 m0.9)",
  ]
  + [
    f"{pre}+{opt}:lr={lr},sched=const,clip=0,b2=0.999,damping=1.0,every=100,window=10,alpha=1.0,name={pre} defaults + {label}"
    for pre in ("foof", "kfac", "fngd")
    for opt, lr, label in (("sgd", 0.1, "sgd(0.1 m0.9)"), ("adam", 1e-3, "adam(1e-3)"))
  ]
)

SETTINGS = {
  "cpu": dict(
    d_model=64, heads=4, layers=2, seq_len=64, batch_size=32, steps=500, eval_every=25, eval_windows=256, max_chars=None
  ),
  "accelerator": dict(
    d_model=256,
    heads=8,
    layers=4,
    seq_len=128,
    batch_size=64,
    steps=2000,
    eval_every=100,
    eval_windows=1024,
    max_chars=None,
  ),
  "quick": dict(
    d_model=32, heads=4, layers=2, seq_len=32, batch_size=16, steps=40, eval_every=10, eval_windows=32, max_chars=30_000
  ),
}
# --recipes compare: tuned AdamW, tuned Muon and the recommended neuron recipe (the tuning runs are
# benchmarks/results/transformer_lm_tune_*.json; tuned on validation, seed 0).
COMPARE_RECIPES = {
  "cpu": ";".join(
    [
      "none+adamw:lr=1.2e-2,name=AdamW (tuned)",
      "none+muon:lr=0.04,adam_lr=1.2e-2,name=Muon (tuned)",
      "foof+muon:lr=0.08,adam_lr=1.2e-2,damping=0.1,every=20,window=5,rows=512,contraction=gradient,phase=fixed,"
      "rec=1,name=FOOF(0.1 T=20 S=5 512 rows) + Muon",
    ]
  ),
}
COMPARE_RECIPES["accelerator"] = COMPARE_RECIPES["cpu"]
QUICK_COMPARE_RECIPES = (
  "none+adamw:lr=4e-3,name=AdamW;none+muon:lr=0.02,adam_lr=4e-3,name=Muon;"
  "foof+muon:lr=0.02,adam_lr=4e-3,damping=0.1,every=10,window=3,rows=128,contraction=gradient,phase=fixed,rec=1,"
  "name=FOOF + Muon"
)
QUICK_RECIPES = (
  "none+adamw:lr=4e-3,name=AdamW;foof+adam:lr=4e-3,name=FOOF + Adam;foof+sgd:lr=0.1,sched=const,clip=0,name=FOOF + SGD"
)

# --------------------------------------------------------------------------- #
# Training in lockstep
# --------------------------------------------------------------------------- #


class Run:
  def __init__(self, recipe: Recipe, seed: int, step, tx, params, run_steps: int, batches):
    self.recipe, self.seed, self.step, self.run_steps = recipe, seed, step, run_steps
    self.params = jax.tree.map(jnp.copy, params)
    self.state = init_state(tx, self.params, step_sizes(recipe))
    self.batches = batches
    self.done, self.diverged = 0, False
    self.nonfinite = 0  # steps whose loss or updates were not finite
    self.losses: list[float] = []
    self.evals: list[tuple[int, float, float]] = []  # (step, held-out loss, training seconds)
    self.seconds = 0.0
    self.chunk_seconds: list[float] = []  # per lockstep chunk, for the step-time ratio

  @property
  def eval_params(self):
    return eval_params(self.recipe, self.params, self.state)

  @property
  def finished(self) -> bool:
    return self.diverged or self.done >= self.run_steps

  def advance(self, k: int) -> None:
    k = min(k, self.run_steps - self.done)
    pending, finite = [], []
    start = time.perf_counter()
    phased = isinstance(self.step, PhasedStep)  # else a make_step step (three arguments)
    for i in range(self.done, self.done + k):
      extra = (i,) if phased else ()
      self.params, self.state, loss, ok = self.step(self.params, self.state, next(self.batches), *extra)
      pending.append(loss)
      finite.append(ok)
    jax.block_until_ready((self.params, self.state))
    elapsed = time.perf_counter() - start
    self.seconds += elapsed
    self.chunk_seconds.append(elapsed / k)
    self.done += k
    self.losses.extend(float(x) for x in pending)
    self.nonfinite += sum(not bool(x) for x in finite)
    tail = self.losses[-k:]
    if not all(math.isfinite(x) and x < DIVERGED for x in tail):
      self.diverged = True


def interpolate_target(evals, target: float):
  """(steps, seconds) at which the held-out curve first reaches ``target`` (linear between evaluations)."""
  previous = None
  for step, loss, seconds in evals:
    if loss <= target:
      if previous is None or previous[1] == loss:
        return float(step), float(seconds)
      s0, l0, t0 = previous
      w = (l0 - target) / (l0 - loss)
      return s0 + w * (step - s0), t0 + w * (seconds - t0)
    previous = (step, loss, seconds)
  return None, None


def summarise(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def three_splits(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """train (first 80 %), validation (next 10 %: all tuning) and test (last 10 %: every reported number)."""
  rest, test = text.split(tokens, valid_fraction=0.1)
  train, validation = text.split(rest, valid_fraction=1 / 9)
  return {"train": train, "validation": validation, "test": test}


def eval_windows(tokens: np.ndarray, seq_len: int, count: int) -> list[jax.Array]:
  """``count`` evenly spaced ``seq_len + 1`` windows of a held-out split, in batches of 64."""
  starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(int)
  windows = np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)]
  return [jnp.asarray(windows[i : i + 64]) for i in range(0, len(windows), 64)]


def lockstep_ratio(runs: list[Run], reference: list[Run]) -> float | None:
  """Median over lockstep chunks of (mean time per step of ``runs``) / (the reference's), chunk by chunk."""
  if not runs or not reference:
    return None
  chunks = min(len(r.chunk_seconds) for r in runs + reference)
  ratios = [
    float(np.mean([r.chunk_seconds[i] for r in runs]) / np.mean([r.chunk_seconds[i] for r in reference]))
    for i in range(chunks)
  ]
  return statistics.median(ratios) if ratios else None


def tuning_table(recipes: list[Recipe], rows: list[dict]) -> list[dict]:
  """Per recipe string with grids: the best grid point on the curve split and, per grid option, whether
  its best value lies strictly inside the grid (not its smallest or largest value)."""
  by_name = {row["name"]: row for row in rows}
  table = []
  for base in dict.fromkeys(r.base for r in recipes if r.grid):
    points = [r for r in recipes if r.base == base]
    scored = [(by_name[r.name]["final_curve_mean"], r) for r in points if by_name[r.name]["final_curve_mean"]]
    if not scored:
      table.append(dict(recipe=base, best=None, best_validation_loss=float("nan"), strictly_inside={}))
      continue
    loss, best = min(scored, key=lambda x: x[0])
    inside, grid = {}, {}
    for key in best.grid:
      values = list(dict.fromkeys(r.options[key] for r in points))
      if all(_is_number(v) for v in values):
        values = sorted(values, key=float)
      grid[key] = values
      inside[key] = len(values) >= 3 and values.index(best.options[key]) not in (0, len(values) - 1)
    table.append(
      dict(
        recipe=base,
        best=best.name,
        best_values={k: best.options[k] for k in best.grid},
        best_validation_loss=loss,
        strictly_inside=inside,
        grid=grid,
      )
    )
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--setting", choices=("cpu", "accelerator"), default="cpu")
  parser.add_argument("--quick", action="store_true", help="tiny model, 40 steps (seconds); used by the test")
  parser.add_argument(
    "--recipes",
    default=None,
    help="';'-separated recipe strings (see the module doc), or cpu / accelerator / defaults / quick "
    "(default: the setting's)",
  )
  parser.add_argument(
    "--reference", default=None, help="name of the AdamW reference recipe (default: first none+adamw)"
  )
  parser.add_argument(
    "--seeds", default=None, help="comma-separated (default: 1,2,3 for reports, 0 for --tune and --quick)"
  )
  parser.add_argument(
    "--tune",
    action="store_true",
    help="tuning mode: curves on the validation split, seed 0, and a 'tuning' table saying for every grid "
    "option which value was best and whether it lies strictly inside the grid",
  )
  parser.add_argument("--layout", choices=("auto", "scan", "unrolled"), default="auto")
  parser.add_argument("--no-remat", action="store_true", help="scan without nn.remat")
  parser.add_argument("--tied", action="store_true", help="tie the head to the embedding (embed.attend)")
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="the model's parameters and activations (bfloat16: initialised as float32, then rounded; the loss in "
    "float32 from the logits)",
  )
  for key in (
    "d_model",
    "heads",
    "layers",
    "seq_len",
    "batch_size",
    "steps",
    "eval_every",
    "eval_windows",
    "max_chars",
  ):
    parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
  parser.add_argument("--tag", default=None, help="output stem transformer_lm_<tag> (default: the setting)")
  parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)
  setting = "quick" if args.quick else args.setting
  config = dict(SETTINGS[setting])
  for key in config:
    if getattr(args, key) is not None:
      config[key] = getattr(args, key)
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick or args.tune else "1,2,3")).split(",")]
  named = {
    "cpu": CPU_RECIPES,
    "accelerator": ACCELERATOR_RECIPES,
    "defaults": DEFAULTS_RECIPES,
    "quick": QUICK_RECIPES,
    "compare": QUICK_COMPARE_RECIPES if args.quick else COMPARE_RECIPES.get(setting, COMPARE_RECIPES["cpu"]),
  }
  recipes = parse_recipes(named.get(args.recipes or setting, args.recipes))
  tag = args.tag or setting
  curve_split = "validation" if args.tune else "test"

  from common import machine_info  # benchmarks/common.py

  load_before = os.getloadavg()
  started = time.perf_counter()
  tokens = text.encode(text.python_docs(max_chars=config["max_chars"]))
  splits = three_splits(tokens)
  train_tokens = splits["train"]
  seq_len, batch_size = config["seq_len"], config["batch_size"]
  steps_per_epoch = text.steps_per_epoch(train_tokens, batch_size, seq_len)
  eval_sets = {name: eval_windows(splits[name], seq_len, config["eval_windows"]) for name in ("validation", "test")}

  dims = (config["d_model"], config["heads"], config["layers"], seq_len)
  dtype = jnp.dtype(args.dtype)
  model_scan = TransformerLM(*dims, scan=True, remat=not args.no_remat, tied=args.tied, dtype=dtype)
  model_unrolled = TransformerLM(*dims, scan=False, tied=args.tied, dtype=dtype)
  example = jnp.zeros((batch_size, seq_len + 1), jnp.int32)
  # bf16 runs start from float32's initial values, rounded: the two dtypes differ only in their arithmetic.
  model_init = dataclasses.replace(model_scan, dtype=jnp.float32)
  init_scan = jax.jit(
    lambda key: jax.tree.map(lambda x: x.astype(dtype), model_init.init(key, example[:, :-1])["params"])
  )

  layout, layout_note = args.layout, ""
  if layout == "auto":
    needs_stats = any(r.uses_stats for r in recipes)
    capturable, reason = (
      scan_capturable(model_scan, init_scan(jax.random.key(0)), example) if needs_stats else (True, "")
    )
    layout = "scan" if capturable else "unrolled"
    if not capturable:
      layout_note = (
        f"scan capture unsupported here ({reason}); every method runs unrolled with the scanned parameters restacked"
      )
  model = model_scan if layout == "scan" else model_unrolled
  to_layout = (lambda p: p) if layout == "scan" else (lambda p: unstack_blocks(p, config["layers"]))
  loss_fn = lambda p, w: lm_loss(model, p, w)
  eval_loss = jax.jit(loss_fn)

  def evaluate(p, split=curve_split):
    batches = eval_sets[split]
    return float(np.average([eval_loss(p, b) for b in batches], weights=[len(b) for b in batches]))

  params0 = {seed: to_layout(init_scan(jax.random.key(seed))) for seed in seeds}
  n_params = int(sum(x.size for x in jax.tree.leaves(params0[seeds[0]])))
  print(
    f"setting {setting}: {n_params} parameters, layout {layout}{' (' + layout_note + ')' if layout_note else ''}; "
    f"{len(train_tokens)} training / {len(splits['validation'])} validation / {len(splits['test'])} test characters, {steps_per_epoch} steps per epoch; "
    f"{config['steps']} steps, {len(recipes)} recipes x {len(seeds)} seeds; load {load_before[0]:.2f}",
    flush=True,
  )

  layouts = None
  if any(r.uses_stats for r in recipes):  # shapes only: no computation
    stats_shapes = jax.eval_shape(lambda p: nox.value_grad_and_stats(loss_fn)(p, example)[2], params0[seeds[0]])
    layouts = nox.kernel_layouts(stats_shapes)

  compiled: dict[str, tuple] = {}
  runs: list[Run] = []
  aliases: dict[str, str] = {}  # a grid point met again (coordinate grids share their centre): trained once
  trained: dict[tuple, str] = {}
  for recipe in recipes:
    key = recipe.structure()
    point = (key, recipe.lr, recipe.options["adam_lr"])
    if point in trained:
      aliases[recipe.name] = trained[point]
      continue
    trained[point] = recipe.name
    if key not in compiled:
      build = lambda phase=None: build_transform(
        recipe, params0[seeds[0]], config["steps"], steps_per_epoch, batch_size, kernel_input_ndim=layouts, phase=phase
      )
      tx, run_steps = build()
      if fixed_phase(recipe):
        phases = {phase: make_step(loss_fn, build(phase)[0], True) for phase in ("plain", "statistics", "inversion")}
        step = PhasedStep(phases, int(recipe.options["every"]), stats_window_option(recipe.options))
      else:
        step = make_step(loss_fn, tx, recipe.uses_stats)
      compiled[key] = (tx, run_steps, step)
    tx, run_steps, step = compiled[key]
    for seed in seeds:
      batches = (jnp.asarray(w) for w in text.batches(train_tokens, batch_size, seq_len, seed=seed, epochs=None))
      runs.append(Run(recipe, seed, step, tx, params0[seed], run_steps, batches))

  compile_start = time.perf_counter()
  for tx, _, step in compiled.values():  # compile outside the timed chunks
    for one in step.steps.values() if isinstance(step, PhasedStep) else (step,):
      p = jax.tree.map(jnp.copy, params0[seeds[0]])
      jax.block_until_ready(one(p, init_state(tx, p, {"base": 0.0, "muon": 0.0}), example))
  compile_seconds = time.perf_counter() - compile_start
  for run in runs:
    run.evals.append((0, evaluate(run.eval_params), 0.0))

  chunk = config["eval_every"]
  while not all(run.finished for run in runs):
    for run in runs:
      if not run.finished:
        run.advance(chunk)
        if not run.diverged:
          run.evals.append((run.done, evaluate(run.eval_params), run.seconds))
    done = min(run.done for run in runs if not run.finished) if not all(r.finished for r in runs) else config["steps"]
    latest = " ".join(f"{run.evals[-1][1]:.3f}" for run in runs)
    print(f"  step {done}/{config['steps']}  load {os.getloadavg()[0]:.2f}  {curve_split} {latest}", flush=True)

  # ---- the reference and the targets ---------------------------------------------------------
  for run in runs:  # both held-out splits at the end, whichever one the curves were recorded on
    run.final = {split: evaluate(run.eval_params, split) for split in eval_sets} if not run.diverged else {}
  names = list(dict.fromkeys([r.recipe.name for r in runs] + list(aliases)))
  by_name = {name: [r for r in runs if r.recipe.name == aliases.get(name, name)] for name in names}
  plain = [n for n in names if by_name[n][0].recipe.pre == "none"]  # AdamW first, then Adam, then any first-order
  reference = args.reference or next(
    (n for opt in ("adamw", "adam", "sgd") for n in plain if by_name[n][0].recipe.opt == opt), None
  )
  ref_runs = [r for r in by_name.get(reference, []) if not r.diverged]
  target = float(np.mean([r.evals[-1][1] for r in ref_runs])) if ref_runs else None
  ref_steps = float(np.mean([r.done for r in ref_runs])) if ref_runs else None
  ref_seconds = float(np.mean([r.seconds for r in ref_runs])) if ref_runs else None

  rows = []
  for name in names:
    group = by_name[name]
    recipe = group[0].recipe
    ok = [r for r in group if not r.diverged]
    finals = [r.evals[-1][1] for r in ok]
    hits = [interpolate_target(r.evals, target) if target is not None else (None, None) for r in ok]
    steps_hit = [h[0] for h in hits]
    seconds_hit = [h[1] for h in hits]
    reached = sum(h[0] is not None for h in hits)
    per_step = [r.seconds / r.done for r in ok if r.done]
    mean_final, sd_final = summarise(finals)
    mean_steps, _ = summarise(steps_hit) if reached == len(ok) and ok else (None, None)
    mean_seconds, _ = summarise(seconds_hit) if reached == len(ok) and ok else (None, None)
    steps_ratio = mean_steps / ref_steps if mean_steps is not None and ref_steps else None
    seconds_ratio = mean_seconds / ref_seconds if mean_seconds is not None and ref_seconds else None
    if name == reference and ok:
      # The target is the mean of AdamW's own finals, which its worse seeds never reach; AdamW takes
      # all its steps and seconds to get there by definition.
      steps_ratio = seconds_ratio = 1.0
    rows.append(
      dict(
        recipe=name,
        family=recipe.family,
        recommended=recipe.recommended,
        final_test_loss=summarise([r.final["test"] for r in ok])[0],
        steps_to_reference=steps_ratio,
        wallclock_to_reference=seconds_ratio,
        step_time_ratio=lockstep_ratio(ok, ref_runs),
        name=name,
        spec=recipe.spec,
        structure=recipe.structure(),
        learning_rate=recipe.lr,
        seeds=len(group),
        diverged=len(group) - len(ok),
        nonfinite_steps=sum(r.nonfinite for r in group),
        run_steps=group[0].run_steps,
        final_test_sd=summarise([r.final["test"] for r in ok])[1],
        final_validation_loss=summarise([r.final["validation"] for r in ok])[0],
        curve_split=curve_split,
        final_curve_mean=mean_final,
        final_curve_sd=sd_final,
        best_curve_mean=summarise([min(e[1] for e in r.evals) for r in ok])[0],
        final_train_mean=summarise([float(np.mean(r.losses[-max(1, r.done // 10) :])) for r in ok])[0],
        reached_target=f"{reached}/{len(group)}",
        steps_to_target=mean_steps,
        seconds_to_target=mean_seconds,
        ms_per_step=1e3 * statistics.median(per_step) if per_step else None,
        mean_step_time_ratio=(statistics.median(per_step) / statistics.median([r.seconds / r.done for r in ref_runs]))
        if per_step and ref_runs
        else None,
      )
    )
  tuning = tuning_table(recipes, rows) if args.tune else []

  fmt = lambda v, f: "-" if v is None else format(v, f)
  print(
    f"\ntarget: {reference} final {curve_split} loss {fmt(target, '.4f')} at {fmt(ref_steps, '.0f')} steps, "
    f"{fmt(ref_seconds, '.1f')} s"
  )
  print(
    f"{'recipe':56s} {'final ' + curve_split[:5]:>13s} {'test':>7s} {'reach':>5s} {'steps x':>7s} {'secs x':>7s} {'step t x':>8s}"
  )
  for row in rows:
    final = (
      f"{fmt(row['final_curve_mean'], '.4f')}±{fmt(row['final_curve_sd'], '.3f')}"
      if row["final_curve_mean"]
      else "diverged"
    )
    print(
      f"{row['name'][:56]:56s} {final:>13s} {fmt(row['final_test_loss'], '7.4f')} {row['reached_target']:>5s} "
      f"{fmt(row['steps_to_reference'], '7.2f')} {fmt(row['wallclock_to_reference'], '7.2f')} "
      f"{fmt(row['step_time_ratio'], '8.2f')}"
    )
  for entry in tuning:
    print(
      f"tuning {entry['recipe']}: best {entry['best']} (validation {entry['best_validation_loss']:.4f}); "
      + ", ".join(f"{k} {'inside' if v else 'AT THE EDGE'}" for k, v in entry["strictly_inside"].items())
    )

  result = dict(
    setting=setting,
    mode="tune" if args.tune else "report",
    curve_split=curve_split,
    config=dict(
      config,
      seeds=seeds,
      layout=layout,
      layout_note=layout_note,
      remat=not args.no_remat,
      tied=args.tied,
      dtype=args.dtype,
      steps_per_epoch=steps_per_epoch,
      train_characters=int(len(train_tokens)),
      validation_characters=int(len(splits["validation"])),
      test_characters=int(len(splits["test"])),
      parameters=n_params,
      vocab_size=text.VOCAB_SIZE,
    ),
    machine=machine_info(),
    load_average_before=list(load_before),
    load_average_after=list(os.getloadavg()),
    compile_seconds=compile_seconds,
    wall_seconds=time.perf_counter() - started,
    reference=reference,
    target_loss=target,
    reference_steps=ref_steps,
    reference_seconds=ref_seconds,
    grids=sorted({r.base for r in recipes}),
    shared_grid_points=aliases,
    tuning=tuning,
    summary=rows,
    runs=[run_record(r, evals=r.evals) for r in runs],
  )
  write_outputs(result, os.path.join(args.output_dir, f"transformer_lm_{tag}"), None if args.no_plot else plot)
  return result


def run_record(run: Run, **curves) -> dict:
  """One run of a benchmark's results file: its recipe, seed, fate, timing and ``curves``."""
  return dict(
    name=run.recipe.name,
    recipe=run.recipe.spec,
    seed=run.seed,
    learning_rate=run.recipe.lr,
    diverged=run.diverged,
    steps=run.done,
    nonfinite_steps=run.nonfinite,
    seconds=run.seconds,
    chunk_seconds_per_step=run.chunk_seconds,
    final=getattr(run, "final", {}),
    **curves,
    train_losses=run.losses,
  )


def write_outputs(result: dict, stem: str, plot_fn=None) -> None:
  """``stem.json`` (everything), ``stem.csv`` (the summary rows) and, with ``plot_fn``, ``stem.png``."""
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(result["summary"][0]))
    writer.writeheader()
    writer.writerows(result["summary"])
  if plot_fn is not None:
    plot_fn(result, stem + ".png")
  print(f"wrote {stem}.json/.csv{'' if plot_fn is None else '/.png'} ({result['wall_seconds']:.0f} s)")


def plot_curves(result: dict, *, curves: str, value: int, seconds: int, target, ylabel: str, title: str):
  """Held-out curves of every run against steps (left) and training seconds (right), one colour per recipe.

  ``curves``: the runs' key of ``(step, ...)`` rows; ``value``/``seconds``: their columns; ``target``: a dotted
  line (or ``None``). Returns ``(figure, axes)`` for the caller's extra marks; the caller saves it.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  names = list(dict.fromkeys(r["name"] for r in result["runs"]))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, name in enumerate(names):
    group = [r for r in result["runs"] if r["name"] == name and not r["diverged"]]
    for j, r in enumerate(group):
      rows = np.asarray(r[curves])
      kwargs = dict(color=colours[i % len(colours)], alpha=0.85, lw=1.2, label=name if j == 0 else None)
      axes[0].plot(rows[:, 0], rows[:, value], **kwargs)
      axes[1].plot(rows[:, seconds], rows[:, value], **kwargs)
  for ax in axes:
    if target is not None:
      ax.axhline(target, color="gray", ls=":", lw=1)
    ax.grid(alpha=0.3)
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("training seconds (timed in lockstep chunks)")
  axes[0].set_ylabel(ylabel)
  fig.suptitle(title, fontsize=9)
  return fig, axes


def save_figure(fig, axes, path: str) -> None:
  import matplotlib.pyplot as plt

  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot(result: dict, path: str) -> None:
  c = result["config"]
  title = (
    f"char GPT (d={c['d_model']}, {c['layers']} layers, {c['heads']} heads, ctx {c['seq_len']}, batch {c['batch_size']}, "
    f"{c['layout']}) on pydoc topics, seeds {c['seeds']}, {result['machine']['device_kind']}; "
    f"dotted: AdamW's final, dashed: 0.7x its steps"
  )
  ylabel = f"{result['curve_split']} loss (nats/char)"
  fig, axes = plot_curves(
    result, curves="evals", value=1, seconds=2, target=result["target_loss"], ylabel=ylabel, title=title
  )
  if result["reference_steps"]:
    axes[0].axvline(0.7 * result["reference_steps"], color="gray", ls="--", lw=0.8)
  finals = [r["evals"][-1][1] for r in result["runs"] if not r["diverged"]]
  if finals:
    axes[0].set_ylim(min(finals) - 0.05, min(finals) + 0.8)
  save_figure(fig, axes, path)


if __name__ == "__main__":
  main()
