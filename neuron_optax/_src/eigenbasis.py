r"""Any optax transform run in the eigenbasis of each layer's recorded factors (EKFAC / SOAP style).

For every captured layer with gradient matrix ``∇W`` (kernel rows, then the bias
row; shape ``(d_in, d_out)``) and the debiased moving averages ``A`` of
``mean_r ā_r ā_rᵀ`` and ``G`` of ``mean_r g_r g_rᵀ`` (the same statistics as
:func:`neuron_optax.foof` and :func:`neuron_optax.kfac`)::

    A = Q_A Λ_A Q_Aᵀ,  G = Q_G Λ_G Q_Gᵀ            (refreshed every T steps)
    R = Q_Aᵀ ∇W Q_G                                 (rotate in)
    R', s = inner.update(R, s, Q_Aᵀ W Q_G)          (any optax transform, e.g. Adam)
    D = Q_A R' Q_Gᵀ                                 (rotate back)

``sides="input"`` uses ``Q_G = I`` (one-sided, FOOF's basis); ``sides="both"``
uses both (KFAC's basis, as EKFAC and SOAP). With ``inner=optax.adam``, Adam's
per-coordinate second moment in the eigenbasis is EKFAC's re-scaling of the
Kronecker eigenvalues and SOAP's "Adam in Shampoo's eigenbasis".

Reference: T. George, C. Laurent, X. Bouthillier, N. Ballas, P. Vincent, "Fast
Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis",
NeurIPS 2018 (EKFAC); N. Vyas, D. Morwani, R. Zhao, I. Shapira, D. Brandfonbrener,
L. Janson, S. Kakade, "SOAP: Improving and Stabilizing Shampoo using Adam",
ICLR 2025 (arXiv:2409.11321; the one-step power-iteration refresh).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from neuron_optax._src import amortisation, factorisation, hyperparams, linalg, param_layout
from neuron_optax._src.layer_stats import Stats, layer_name

Sides = Literal["input", "both"]
Refresh = Literal["eigh", "power"]
DEFAULT_REFRESH_EVERY = 10


class EigenbasisLayerState(NamedTuple):
  a_ema: jax.Array | None  # biased EMA of A (divide by a_weight); None where the input side is not rotated
  a_updates: jax.Array | None
  a_weight: jax.Array | None
  g_ema: jax.Array | None  # biased EMA of G; None for sides="input"
  g_updates: jax.Array | None
  g_weight: jax.Array | None
  a_basis: jax.Array | None  # Q_A, eigenvectors as columns (d_in, d_in)
  g_basis: jax.Array | None  # Q_G (d_out, d_out)


class EigenbasisState(NamedTuple):
  count: jax.Array  # steps taken
  layers: dict[str, EigenbasisLayerState]
  inner_state: Any  # the inner transform's state, in the rotated coordinates


def _align(new: jax.Array, old: jax.Array) -> jax.Array:
  """Flips the sign of each new eigenvector that points away from the old one.

  An eigenvector's sign is arbitrary; flipping it would flip the sign of the
  inner transform's first moment in that coordinate, so refreshes keep the
  orientation of the basis they replace.
  """
  overlap = jnp.einsum("...ij,...ij->...j", old, new)
  return new * jnp.where(overlap < 0, -1, 1).astype(new.dtype)[..., None, :]


def _eigenvectors(matrix: jax.Array, old: jax.Array) -> jax.Array:
  return _align(linalg.sym_eigh(matrix)[1], old)


def _power_step(matrix: jax.Array, old: jax.Array) -> jax.Array:
  """SOAP's refresh: one power-iteration step from the last basis, re-orthonormalised by QR.

  QR keeps the direction of its first column and orthogonalises the later ones against it, so the
  columns go in by decreasing estimated eigenvalue ``diag(Qᵀ A Q)`` (as SOAP orders them): the
  directions a factor barely (or, after a LayerNorm, never) excites come last and are fixed by
  orthogonality, not by rounding noise. Each column returns to its old place, so the inner
  state's coordinates keep their meaning.
  """
  order = jnp.argsort(-jnp.einsum("...ij,...ik,...kj->...j", old, matrix, old), axis=-1)
  old_sorted = jnp.take_along_axis(old, order[..., None, :], axis=-1)
  q = jnp.linalg.qr(matrix @ old_sorted)[0]
  inverse = jnp.argsort(order, axis=-1)
  return _align(jnp.take_along_axis(q, inverse[..., None, :], axis=-1), old)


def _rotate_in(matrix: jax.Array, a_basis, g_basis) -> jax.Array:
  if a_basis is not None:
    matrix = a_basis.T @ matrix.astype(a_basis.dtype)
  if g_basis is not None:
    matrix = matrix.astype(g_basis.dtype) @ g_basis
  return matrix


def _rotate_out(matrix: jax.Array, a_basis, g_basis) -> jax.Array:
  if a_basis is not None:
    matrix = a_basis @ matrix.astype(a_basis.dtype)
  if g_basis is not None:
    matrix = matrix.astype(g_basis.dtype) @ g_basis.T
  return matrix


def eigenbasis(
  inner: optax.GradientTransformation,
  *,
  sides: Sides = "input",
  ema_decay: hyperparams.ScalarOrSchedule = 0.95,
  refresh_every: int | None = None,
  stats_window: int | None = None,
  refresh: Refresh = "eigh",
  kernel_input_ndim: param_layout.KernelInputNdim = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` in the eigenbasis of each captured layer's input (and output) factors.

  .. math::

    A = Q_A \Lambda_A Q_A^\top, \quad G = Q_G \Lambda_G Q_G^\top, \qquad
    \tilde R = Q_A^\top \nabla W \, Q_G, \qquad
    (\tilde D, s) = \mathrm{inner}(\tilde R, s), \qquad
    D = Q_A \tilde D \, Q_G^\top

  with ``Q_G = I`` for ``sides="input"``. ``A`` and ``G`` are debiased moving
  averages of ``mean_r ā_r ā_rᵀ`` and ``mean_r Σ_s g_sr g_srᵀ`` (as in
  :func:`neuron_optax.kfac`); the bases are refreshed at steps ``0, T, 2T, …``.
  The rotations are orthogonal: global-norm clipping before or after gives
  the same result, and a term of ``inner`` linear in the parameters (decoupled
  weight decay) acts on the parameters as without the wrapper, because
  ``inner`` receives the parameters rotated the same way.

  Layers that are not captured (norms, position tables, any other leaf) reach
  ``inner`` unrotated. An embedding's ``A`` is diagonal (one-hot rows), so its
  eigenbasis is the identity up to order: with ``sides="input"`` the table
  passes unrotated, with ``sides="both"`` only its output side is rotated. A
  table tied to an output layer (``Embed.attend``) passes unrotated, with a
  warning. Each copy of a stacked (``nn.scan``) layer has its own bases.

  The inner state lives in the rotated coordinates and is not transformed when
  a basis is refreshed (SOAP does the same for the second moment; a refresh
  keeps each eigenvector's sign, and ``refresh="power"`` moves the basis
  continuously). A gradient that is not finite in a captured layer reaches
  ``inner`` as zeros for that layer; wrap the chain in ``optax.apply_if_finite``
  to skip such steps altogether.

  Args:
    inner: any optax transform, e.g. ``optax.adam(1e-3)`` or
      ``optax.scale_by_adam()``; it is called with the rotated updates, the
      rotated parameters and the extra arguments of this update (not ``stats``).
    sides: ``"input"`` (``Q_A`` only, one-sided, FOOF's basis) or ``"both"``
      (``Q_A`` and ``Q_G``, KFAC's basis: EKFAC / SOAP).
    ema_decay: decay ``β`` of the debiased moving averages of ``A`` and ``G``.
    refresh_every: ``T``: recompute the bases at steps ``0, T, 2T, …``.
      ``None`` (default): 10, SOAP's preconditioning frequency.
    stats_window: ``S``: update the moving averages only in the ``S`` steps
      that end with a refresh. ``None`` (default): ``min(10, T)``.
    refresh: ``"eigh"`` (default: eigendecompositions) or ``"power"`` (SOAP:
      one power-iteration step ``QR(A Q_old)`` from the last basis; the first
      refresh is an eigendecomposition).
    kernel_input_ndim: the captured layers' layouts, ``nox.kernel_layouts(stats)``,
      needed at ``init`` for stacked layers (``nn.scan``); as in :func:`neuron_optax.foof`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, stats=stats)`` with ``stats`` from
    :func:`neuron_optax.value_grad_and_stats`.

  Example::

    tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      nox.eigenbasis(optax.adamw(3e-3, weight_decay=0.1), sides="both", refresh_every=10),
    )
    loss, grads, stats = nox.value_grad_and_stats(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"eigenbasis: inner must be an optax transform (e.g. optax.adam(1e-3)), got {type(inner).__name__}."
    )
  hyperparams.check_choice("eigenbasis", "sides", sides, ("input", "both"))
  hyperparams.check_choice("eigenbasis", "refresh", refresh, ("eigh", "power"))
  if refresh_every is None:
    refresh_every = DEFAULT_REFRESH_EVERY
  refresh_every, stats_window = amortisation.resolve_amortisation(refresh_every, stats_window)
  amortisation.validate_amortisation("eigenbasis", ema_decay, refresh_every, stats_window)
  inner = optax.with_extra_args_support(inner)
  both = sides == "both"

  def layer_state(shape: param_layout.LayerShape, dtype) -> EigenbasisLayerState | None:
    rotate_a = not shape.is_embedding
    if not rotate_a and not both:
      return None  # an embedding under sides="input": nothing to rotate
    zero, count = jnp.zeros([], dtype), jnp.zeros([], jnp.int32)
    a = (jnp.zeros((shape.d_in, shape.d_in), dtype), count, zero) if rotate_a else (None, None, None)
    g = (jnp.zeros((shape.d_out, shape.d_out), dtype), count, zero) if both else (None, None, None)
    return EigenbasisLayerState(
      *a,
      *g,
      a_basis=jnp.eye(shape.d_in, dtype=dtype) if rotate_a else None,
      g_basis=jnp.eye(shape.d_out, dtype=dtype) if both else None,
    )

  def init_fn(params) -> EigenbasisState:
    layers = {}
    for key, shape in param_layout.candidate_layers(params, kernel_input_ndim).items():
      state = layer_state(shape, param_layout.statistics_dtype(param_layout.kernel_dtype(params, key)))
      if state is not None:
        layers[layer_name(key)] = state
    return EigenbasisState(count=jnp.zeros([], jnp.int32), layers=layers, inner_state=inner.init(params))

  def update_fn(updates, state: EigenbasisState, params=None, *, stats: Stats | None = None, **extra_args):
    shapes = param_layout.candidate_layers(updates, kernel_input_ndim)
    stats = param_layout.check_stats(stats, shapes, "eigenbasis", tied_tables=False)
    names = {key: layer_name(key) for key in stats if not (shapes[key].is_embedding and not both)}
    for key in names:
      shape = shapes[key]
      expected = {"g_basis": (shape.d_out, shape.d_out)} if both else {}
      if not shape.is_embedding:
        expected["a_basis"] = (shape.d_in, shape.d_in)
      amortisation.check_state_layer("eigenbasis", state.layers, key, expected)
    layers = {name: state.layers[name] for name in names.values()}
    decay = hyperparams.value_at(ema_decay, state.count)
    update_statistics, refresh_now = amortisation.schedule(
      state.count, refresh_every, stats_window, "auto", {k: stats[k] for k in names}
    )

    def accumulate(stats):
      new = {}
      for key, name in names.items():
        layer = layers[name]
        a, g = (layer.a_ema, layer.a_updates, layer.a_weight), (layer.g_ema, layer.g_updates, layer.g_weight)
        if layer.a_ema is not None:
          a = amortisation.ema_update(*a, stats[key].input_moment(layer.a_ema.dtype), decay)
        if layer.g_ema is not None:
          g = amortisation.ema_update(*g, stats[key].cotangent_moment(layer.g_ema.dtype), decay)
        new[name] = (a, g)
      return new

    current = {
      name: ((layer.a_ema, layer.a_updates, layer.a_weight), (layer.g_ema, layer.g_updates, layer.g_weight))
      for name, layer in layers.items()
    }
    averages = amortisation.maybe(update_statistics, accumulate, current, stats)

    def recompute(method):
      operands = {}
      for name, (a, g) in averages.items():
        if a[0] is not None:
          operands[name, "a"] = (amortisation.debiased(a[0], a[2]), layers[name].a_basis)
        if g[0] is not None:
          operands[name, "g"] = (amortisation.debiased(g[0], g[2]), layers[name].g_basis)
      solved = factorisation.factorise_by_shape(method, operands)
      return {name: (solved.get((name, "a")), solved.get((name, "g"))) for name in averages}

    def refreshed():
      if refresh == "eigh":
        return recompute(_eigenvectors)
      # SOAP starts from an eigendecomposition, then takes one power step per refresh.
      return jax.lax.cond(state.count == 0, lambda: recompute(_eigenvectors), lambda: recompute(_power_step))

    stored = {name: (layer.a_basis, layer.g_basis) for name, layer in layers.items()}
    bases = amortisation.maybe(refresh_now, refreshed, stored)

    def rotate_in(key, matrix):
      return _rotate_in(matrix, *bases[names[key]])

    def rotate_out(key, matrix):
      return _rotate_out(matrix, *bases[names[key]])

    rotated = param_layout.map_layers(updates, shapes, names.keys(), rotate_in)
    rotated_params = None if params is None else param_layout.map_layers(params, shapes, names.keys(), rotate_in)
    inner_updates, inner_state = inner.update(rotated, state.inner_state, rotated_params, **extra_args)
    directions = param_layout.map_layers(inner_updates, shapes, names.keys(), rotate_out)

    new_layers = dict(state.layers)
    for name, ((a_ema, a_updates, a_weight), (g_ema, g_updates, g_weight)) in averages.items():
      new_layers[name] = EigenbasisLayerState(a_ema, a_updates, a_weight, g_ema, g_updates, g_weight, *bases[name])
    new_state = EigenbasisState(optax.safe_int32_increment(state.count), new_layers, inner_state)
    return directions, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
