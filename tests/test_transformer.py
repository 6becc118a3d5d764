"""Transformers (linen): token rows, attention projections, embedding capture.

* float64 references for the token-row convention: a Dense applied to
  ``(batch, tokens, d)`` has one row per token; FOOF, KFAC (heuristic and an
  explicit Kronecker product for standard damping), FNGD and the exact natural
  gradient are checked against NumPy built from an explicit forward/backward pass.
* attention: the query/key/value (3-D kernels, one input axis) and out (two input
  axes) projections of ``nn.MultiHeadDotProductAttention`` vs a NumPy attention.
* a 2-layer Transformer LM on :mod:`neuron_optax.examples.text` trains with every method,
  its embedding is preconditioned, and its positional table and LayerNorm leaves pass through unchanged.
* blocks inside ``nn.remat`` record what the same blocks without it record (jitted or not).
* :mod:`neuron_optax.examples.text`: vocabulary, encode/decode, batch samplers, errors.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_f64
from flax import traverse_util
from numpy_reference import augment

import neuron_optax as nox
from neuron_optax._src.fngd import fngd
from neuron_optax.examples import text

# --------------------------------------------------------------------------- #
# NumPy references
# --------------------------------------------------------------------------- #


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _matrix(tree, *path):
  """Gradient-matrix view ``(d_in (+1), d_out)`` with ``d_out`` the trailing kernel axes given by ``path``."""
  leaf = tree
  for p in path:
    leaf = leaf[p]
  kernel = np.asarray(leaf["kernel"])
  d_out = int(np.prod(np.shape(leaf["bias"]))) if "bias" in leaf else kernel.shape[-1]
  kernel = kernel.reshape(-1, d_out)
  if "bias" not in leaf:
    return kernel
  return np.concatenate([kernel, np.asarray(leaf["bias"]).reshape(1, d_out)], axis=0)


def _heuristic_kfac(a, g, grad, damping):
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  root = np.sqrt(damping)
  return np.linalg.inv(a + pi * root * np.eye(len(a))) @ grad @ np.linalg.inv(g + root / pi * np.eye(len(g)))


def _standard_kfac(a, g, grad, damping):
  # row-major vec: (A⊗G) vec W = vec(A W G) for symmetric G
  system = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
  return np.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)


class TokenMLP(nn.Module):
  """Dense -> tanh -> Dense applied to every token of ``(batch, tokens, d)``."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(x)))


def _token_loss(logits, labels):
  # mean over examples of the mean over tokens: the mean over batch × tokens
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _token_mlp_reference(params, x, labels):
  """Explicit forward and backward pass: rows ``ā``, per-example cotangents ``g = n·cot``, ``∇W``."""
  n, t, _ = x.shape
  w1, b1 = np.asarray(params["hidden"]["kernel"]), np.asarray(params["hidden"]["bias"])
  w2, b2 = np.asarray(params["out"]["kernel"]), np.asarray(params["out"]["bias"])
  h = np.tanh(x @ w1 + b1)
  p = _softmax(h @ w2 + b2)
  onehot = np.eye(p.shape[-1])[labels]
  loss = -np.mean(np.log(np.sum(p * onehot, -1)))
  cot_out = (p - onehot) / (n * t)
  cot_hidden = (cot_out @ w2.T) * (1 - h**2)
  layers = {}
  for name, inputs, cot in (("hidden", x, cot_hidden), ("out", h, cot_out)):
    a = augment(inputs)  # (n, T, d_in + 1)
    rows_a, rows_cot = a.reshape(n * t, -1), cot.reshape(n * t, -1)
    layers[name] = dict(
      a=a,
      g=n * cot,
      A=rows_a.T @ rows_a / (n * t),  # mean over batch × tokens of ā āᵀ
      G=(n * rows_cot).T @ (n * rows_cot) / (n * t),  # mean over rows of g gᵀ, g = n·cot
      grad=rows_a.T @ rows_cot,
    )
  return loss, layers


def _per_example_gradients(layer):
  """``ψ_i = Σ_t ā_it g_itᵀ`` flattened: ``(n, d_in · d_out)``."""
  return np.einsum("nti,nto->nio", layer["a"], layer["g"]).reshape(layer["a"].shape[0], -1)


def _attention_reference(params, x, num_heads):
  """NumPy causal multi-head attention as flax computes it; returns (output, context rows)."""
  n, t, _ = x.shape
  proj = {}
  for name in ("query", "key", "value"):
    proj[name] = np.einsum("ntd,dhk->nthk", x, np.asarray(params[name]["kernel"])) + np.asarray(params[name]["bias"])
  head_dim = proj["query"].shape[-1]
  scores = np.einsum("nqhk,nshk->nhqs", proj["query"] / np.sqrt(head_dim), proj["key"])
  causal = np.tril(np.ones((t, t), bool))
  scores = np.where(causal, scores, -np.inf)
  context = np.einsum("nhqs,nshk->nqhk", _softmax(scores), proj["value"])
  assert context.shape[2] == num_heads
  output = np.einsum("nthk,hkd->ntd", context, np.asarray(params["out"]["kernel"])) + np.asarray(params["out"]["bias"])
  return output, context.reshape(n, t, -1)


class Attention(nn.Module):
  heads: int = 2

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    return nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(x, mask=mask)


def _second_moment(rows):
  rows = augment(rows).reshape(-1, rows.shape[-1] + 1)
  return rows.T @ rows / len(rows)


# --------------------------------------------------------------------------- #
# float64 references: token rows
# --------------------------------------------------------------------------- #


def test_dense_on_tokens_matches_numpy_for_every_method(x64):
  rng = np.random.default_rng(0)
  n, t, d = 4, 3, 4
  x = rng.normal(size=(n, t, d))
  labels = rng.integers(0, 3, size=(n, t))
  model = TokenMLP()
  params = init_f64(model, jnp.asarray(x))
  foof_damping, kfac_damping, alpha, ng_damping = 0.3, 0.05, 0.2, 0.01
  transforms = {
    "foof": nox.foof(foof_damping),
    "kfac_heuristic": nox.kfac(kfac_damping),
    "kfac_standard": nox.kfac(kfac_damping, damping_mode="standard"),
    "fngd": fngd(alpha, steps_per_epoch=2, batch_size=n),
    "natural_gradient": nox.natural_gradient(ng_damping),
    "natural_gradient_block": nox.natural_gradient(ng_damping, block_diagonal=True),
  }

  @jax.jit
  def directions(params, x, labels):
    loss_fn = lambda p: _token_loss(model.apply({"params": p}, x), labels)
    loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
    out = {name: tx.update(grads, tx.init(params), params, stats=stats)[0] for name, tx in transforms.items()}
    return loss, grads, stats, out

  loss, grads, stats, out = directions(params, jnp.asarray(x), jnp.asarray(labels))
  ref_loss, ref = _token_mlp_reference(params, x, labels)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
  for name, layer in ref.items():
    assert stats[(name,)].inputs.shape == (n, t, layer["a"].shape[-1] - 1)  # one row per token
    np.testing.assert_allclose(_matrix(grads, name), layer["grad"], rtol=1e-10, atol=1e-14)
    expected = {
      "foof": np.linalg.solve(layer["A"] + foof_damping * np.eye(len(layer["A"])), layer["grad"]),
      "kfac_heuristic": _heuristic_kfac(layer["A"], layer["G"], layer["grad"], kfac_damping),
      "kfac_standard": _standard_kfac(layer["A"], layer["G"], layer["grad"], kfac_damping),
    }
    psi = _per_example_gradients(layer)
    np.testing.assert_allclose(psi.mean(0), layer["grad"].reshape(-1), rtol=1e-10, atol=1e-14)
    gram = psi @ psi.T
    c = np.linalg.solve(np.eye(n) + gram / (alpha * np.linalg.norm(gram)), np.ones(n)) / n
    expected["fngd"] = (c @ psi).reshape(layer["grad"].shape)
    fisher = psi.T @ psi / n
    expected["natural_gradient_block"] = np.linalg.solve(
      fisher + ng_damping * np.eye(len(fisher)), layer["grad"].reshape(-1)
    ).reshape(layer["grad"].shape)
    for method, direction in expected.items():
      np.testing.assert_allclose(
        _matrix(out[method], name), direction, rtol=1e-8, atol=1e-13, err_msg=f"{method}, layer {name}"
      )

  # whole-network natural gradient: one Fisher over both layers' parameters
  psi = np.concatenate([_per_example_gradients(ref[name]) for name in ("hidden", "out")], axis=1)
  grad = np.concatenate([ref[name]["grad"].reshape(-1) for name in ("hidden", "out")])
  full = np.linalg.solve(psi.T @ psi / n + ng_damping * np.eye(len(grad)), grad)
  got = np.concatenate([_matrix(out["natural_gradient"], name).reshape(-1) for name in ("hidden", "out")])
  np.testing.assert_allclose(got, full, rtol=1e-8, atol=1e-13)


def test_attention_projections_match_numpy_foof(x64):
  rng = np.random.default_rng(1)
  n, t, d, heads = 3, 4, 6, 2
  x = rng.normal(size=(n, t, d))
  target = rng.normal(size=(n, t, d))
  model = Attention(heads)
  params = init_f64(model, jnp.asarray(x))
  attention = params["attention"]
  assert attention["query"]["kernel"].shape == (d, heads, d // heads)
  assert attention["out"]["kernel"].shape == (heads, d // heads, d)
  damping = 0.2

  def loss_fn(p):
    return 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, jnp.asarray(x)) - target) ** 2, axis=(1, 2)))

  tx = nox.foof(damping)

  @jax.jit
  def run(params):
    _, grads, stats = nox.value_grad_and_stats(loss_fn)(params)
    direction, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return grads, stats, direction, jax.grad(loss_fn)(params)  # the last without the capture machinery

  grads, stats, direction, plain_grads = run(params)

  output, context = _attention_reference(attention, x, heads)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(x)), output, rtol=1e-10)
  a_inputs = _second_moment(x)  # query/key/value read the layer input, one row per token
  a_context = _second_moment(context)  # out reads the heads' context, (heads · head_dim) per token
  for name, a, input_ndim in (
    ("query", a_inputs, 1),
    ("key", a_inputs, 1),
    ("value", a_inputs, 1),
    ("out", a_context, 2),
  ):
    assert stats[("attention", name)].kernel_input_ndim == input_ndim
    assert stats[("attention", name)].inputs.shape == (n, t, d)
    grad = _matrix(plain_grads, "attention", name)
    assert grad.shape == (d + 1, d)  # (d_model + 1, heads · head_dim) or (heads · head_dim + 1, d_model)
    np.testing.assert_allclose(_matrix(grads, "attention", name), grad, rtol=1e-10, atol=1e-14)
    expected = np.linalg.solve(a + damping * np.eye(d + 1), grad)
    np.testing.assert_allclose(_matrix(direction, "attention", name), expected, rtol=1e-8, atol=1e-13, err_msg=name)


def test_attention_kernel_input_ndim_override_mismatch_names_the_layer():
  x = jnp.ones((2, 3, 4))
  model = Attention(2)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  tx = nox.foof(1.0, kernel_input_ndim={"*/query": 2})

  def update(params):
    _, grads, stats = nox.value_grad_and_stats(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)
    return tx.update(grads, tx.init(params), params, stats=stats)

  with pytest.raises(ValueError, match="attention/query"):  # raised while tracing
    jax.eval_shape(update, params)
  with pytest.raises(ValueError, match="not in"):
    nox.kfac(1.0, kernel_input_ndim={"attention/key": 3}).init(params)


# --------------------------------------------------------------------------- #
# A 2-layer Transformer language model trains with every method
# --------------------------------------------------------------------------- #

D_MODEL, HEADS, SEQ_LEN, BATCH, STEPS = 32, 4, 16, 8, 10


class Block(nn.Module):
  """Pre-LayerNorm Transformer block: causal self-attention and an MLP, both residual."""

  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * D_MODEL, name="mlp_in")(nn.LayerNorm()(x)))
    return x + nn.Dense(D_MODEL, name="mlp_out")(h)


class TransformerLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(text.VOCAB_SIZE, D_MODEL, name="embed")(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), (SEQ_LEN, D_MODEL))[: tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(2):
      x = Block(name=f"block_{i}")(x, mask)
    return nn.Dense(text.VOCAB_SIZE, name="head")(nn.LayerNorm()(x))


# (preconditioner, SGD-momentum learning rate, fisher); adamw is the first-order control
METHODS = {
  "adamw": (None, 3e-3, None),
  "foof": (lambda: nox.foof(1.0), 0.3, "empirical"),
  "kfac_heuristic": (lambda: nox.kfac(0.1), 0.03, "empirical"),
  "kfac_standard": (lambda: nox.kfac(0.1, damping_mode="standard"), 0.01, "empirical"),
  "fngd": (lambda: fngd(0.1, steps_per_epoch=4, batch_size=BATCH), 0.3, "empirical"),
  "natural_gradient_mc": (lambda: nox.natural_gradient(1.0), 0.1, "mc"),
}
CAPTURED = [  # leaves the methods precondition
  ("block_0", "attention", "query", "kernel"),
  ("block_1", "attention", "out", "kernel"),
  ("block_1", "mlp_in", "kernel"),
  ("head", "kernel"),
  ("embed", "embedding"),
]
PASSED_THROUGH = [("position",), ("block_0", "LayerNorm_0", "scale"), ("LayerNorm_0", "bias")]


@functools.cache
def _corpus():
  return text.encode(text.python_docs(max_chars=30_000))


def _lm_loss(model, params, window):
  return _token_loss(model.apply({"params": params}, window[:, :-1]), window[:, 1:])


@functools.cache
def _lm_setup():
  """(training tokens, held-out batch, initial parameters), shared by every method."""
  train, valid = text.split(_corpus(), valid_fraction=0.2)
  held_out = jnp.asarray(text.sample_windows(valid, BATCH, SEQ_LEN, seed=1))
  params = jax.jit(TransformerLM().init)(jax.random.key(0), held_out[:, :-1])["params"]
  return train, held_out, params


_held_out_loss = jax.jit(functools.partial(_lm_loss, TransformerLM()))


@functools.cache
def _train(method: str):
  """Trains the LM for STEPS steps; returns losses on a held-out batch and per-step pass-through checks."""
  make_preconditioner, learning_rate, fisher = METHODS[method]
  train, held_out, params = _lm_setup()
  loss_fn = functools.partial(_lm_loss, TransformerLM())
  if make_preconditioner is None:
    preconditioner, optimizer = None, optax.adamw(learning_rate)
  else:
    preconditioner, optimizer = make_preconditioner(), optax.sgd(learning_rate, momentum=0.9)

  @jax.jit
  def step(params, states, window, rng):
    if preconditioner is None:
      loss, grads = jax.value_and_grad(loss_fn)(params, window)
      directions, pre_state = grads, states[0]
    else:
      capture = nox.value_grad_and_stats(
        loss_fn, fisher=fisher, likelihood=None if fisher == "empirical" else "categorical"
      )
      loss, grads, stats = capture(params, window, **({"rng": rng} if fisher == "mc" else {}))
      directions, pre_state = preconditioner.update(grads, states[0], params, stats=stats)
    updates, opt_state = optimizer.update(directions, states[1], params)
    return optax.apply_updates(params, updates), (pre_state, opt_state), loss, grads, directions

  states = (preconditioner.init(params) if preconditioner else None, optimizer.init(params))
  before = float(_held_out_loss(params, held_out))
  losses, pass_through, changed = [], [], []
  for i, window in enumerate(text.batches(train, BATCH, SEQ_LEN, seed=0, epochs=None)):
    if i == STEPS:
      break
    params, states, loss, grads, directions = step(params, states, jnp.asarray(window), jax.random.key(i))
    losses.append(float(loss))
    flat_grads, flat_dirs = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(directions)
    pass_through.append(all(np.array_equal(flat_grads[k], flat_dirs[k]) for k in PASSED_THROUGH))
    changed.append({leaf: not np.allclose(flat_grads[leaf], flat_dirs[leaf]) for leaf in CAPTURED})
  return dict(
    before=before,
    after=float(_held_out_loss(params, held_out)),
    losses=losses,
    pass_through=pass_through,
    changed=changed,
  )


@pytest.mark.parametrize(
  "method",
  [m if m in ("adamw", "foof") else pytest.param(m, marks=pytest.mark.slow) for m in METHODS],
)
def test_transformer_lm_trains_and_preconditions_only_captured_layers(method):
  result = _train(method)
  assert np.all(np.isfinite(result["losses"]))
  # from ~ln(96) (uniform over the vocabulary) towards the character unigram entropy
  assert result["after"] < result["before"] - 0.5, result
  if method == "adamw":
    return
  assert all(result["pass_through"])  # every step: direction == gradient for position, LayerNorm
  assert all(all(step.values()) for step in result["changed"]), result["changed"]  # captured: preconditioned


def test_transformer_lm_captures_every_projection():
  _, held_out, params = _lm_setup()
  capture = nox.value_grad_and_stats(functools.partial(_lm_loss, TransformerLM()))
  _, _, stats = jax.eval_shape(capture, params, held_out[:2])  # shapes and static fields suffice
  expected = (
    {("head",), ("embed",)}
    | {(f"block_{i}", "attention", p) for i in range(2) for p in ("query", "key", "value", "out")}
    | {(f"block_{i}", m) for i in range(2) for m in ("mlp_in", "mlp_out")}
  )
  assert set(stats) == expected  # LayerNorm is not captured
  assert all(s.cotangents.shape[:2] == (2, SEQ_LEN) for s in stats.values())  # tokens are rows
  assert stats[("embed",)].layer_inputs.shape == (2, SEQ_LEN)  # the embedding records token ids
  assert stats[("block_0", "attention", "out")].kernel_input_ndim == 2
  assert stats[("block_0", "attention", "query")].d_in == D_MODEL + 1


class ResidualStack(nn.Module):
  """Two residual token-MLP blocks, optionally wrapped in ``nn.remat`` (activation checkpointing)."""

  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for i in range(2):
      x = block(name=f"block_{i}")(x)
    return x


class ResidualBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1], name="mlp")(jnp.tanh(nn.LayerNorm()(x)))


def _capture_stats(model, params, x, jit):
  loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  capture = nox.value_grad_and_stats(loss_fn)
  return (jax.jit(capture) if jit else capture)(params)[2]


# Layers inside lifted transforms run in an inner JAX trace; capture reads them through probes that
# nn.remat slices like the parameters (tests/test_stacked.py: nn.scan, nn.vmap, nn.remat_scan, errors).
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_remat_blocks_are_captured_like_plain_blocks(x64, jit):
  x = jax.random.normal(jax.random.key(0), (2, 3, 4), jnp.float64)
  params = init_f64(ResidualStack(), x)
  remat = _capture_stats(ResidualStack(remat=True), params, x, jit)
  plain = _capture_stats(ResidualStack(), params, x, jit)
  assert set(remat) == set(plain) == {("block_0", "mlp"), ("block_1", "mlp")}
  for key, s in plain.items():
    assert s.inputs.shape == (2, 3, 4) and remat[key].stack_shape == ()
    np.testing.assert_allclose(remat[key].inputs, s.inputs, rtol=1e-12)
    np.testing.assert_allclose(remat[key].cotangents, s.cotangents, rtol=1e-12)


# --------------------------------------------------------------------------- #
# neuron_optax.examples.text
# --------------------------------------------------------------------------- #


def test_vocabulary_and_round_trip():
  assert text.VOCAB_SIZE == 96 and text.VOCABULARY[0] == "\n" and len(set(text.VOCABULARY)) == 96
  s = 'def f(x):\n    return {"a": x ~ 1}  # ok'
  ids = text.encode(s)
  assert ids.dtype == np.int32 and ids.shape == (len(s),)
  assert text.decode(ids) == s
  assert text.decode(text.encode("“a”—b… ß\t")) == '"a"-b... ??'
  with pytest.raises(ValueError, match="ids must lie"):
    text.decode([0, 96])


def test_python_docs_corpus():
  corpus = text.python_docs()
  assert len(corpus) > 100_000 and "assert" in corpus
  assert text.python_docs(max_chars=50) == corpus[:50]
  tokens = text.encode(corpus)
  assert np.mean(tokens == text.encode("?")[0]) < 0.01  # almost everything is in the vocabulary
  with pytest.raises(ValueError, match="max_chars"):
    text.python_docs(max_chars=0)


def test_batches_are_shuffled_non_overlapping_windows():
  tokens = np.arange(1000, dtype=np.int32)  # ids equal positions, so windows show where they come from
  steps = text.steps_per_epoch(tokens, batch_size=4, seq_len=9)
  assert steps == (1000 - 9) // 10 // 4
  epochs = list(text.batches(tokens, 4, 9, seed=3, epochs=2))
  assert len(epochs) == 2 * steps
  for window in epochs:
    assert window.shape == (4, 10) and window.dtype == np.int32
    np.testing.assert_array_equal(window - window[:, :1], np.broadcast_to(np.arange(10), (4, 10)))
  first = np.concatenate(epochs[:steps])
  assert len(set(first[:, 0].tolist())) == len(first)  # no window repeats within an epoch
  assert len(set((first[:, 0] % 10).tolist())) == 1  # one offset per epoch
  again = list(text.batches(tokens, 4, 9, seed=3, epochs=2))
  assert all(np.array_equal(a, b) for a, b in zip(epochs, again))
  other = next(text.batches(tokens, 4, 9, seed=4))
  assert not np.array_equal(epochs[0], other)


def test_sample_windows_and_split():
  tokens = np.arange(50, dtype=np.int32)
  windows = text.sample_windows(tokens, 6, 7, seed=0)
  assert windows.shape == (6, 8)
  np.testing.assert_array_equal(windows - windows[:, :1], np.broadcast_to(np.arange(8), (6, 8)))
  np.testing.assert_array_equal(windows, text.sample_windows(tokens, 6, 7, seed=0))
  train, valid = text.split(tokens, valid_fraction=0.2)
  np.testing.assert_array_equal(np.concatenate([train, valid]), tokens)
  assert len(valid) == 10


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: text.sample_windows(np.arange(5), 2, 5), "no window"),
    (lambda: text.sample_windows(np.arange(50), 0, 5), "batch_size"),
    (lambda: next(text.batches(np.arange(50), 2, 0)), "seq_len"),
    (lambda: next(text.batches(np.arange(20), 4, 4)), "fewer than batch_size"),
    (lambda: next(text.batches(np.zeros((5, 5)), 1, 2)), "1-D"),
    (lambda: text.split(np.arange(10), 1.0), "valid_fraction"),
  ],
)
def test_text_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
