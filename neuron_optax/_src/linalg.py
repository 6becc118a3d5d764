"""Shared linear algebra for the neuron-statistics transforms.

Everything here works on one layer's recorded rows: inputs ``a`` of shape
``(n, P, d_in)`` (bias column already appended) and Fisher cotangents ``g`` of
shape ``(S, n, P, d_out)`` (``S`` label sets, ``P`` positions per example). The
per-example gradient of column ``(s, i)`` is ``ψ_si = Σ_p a_ip g_sipᵀ``; these
functions compute products with the ``ψ`` without materialising them where a
cheaper contraction exists (Benzing 2022, App. I, eqs. 21-23).

An embedding's inputs are one-hot rows, given as their token ids
(:class:`~neuron_optax._src.layer_stats.TokenRows`): products with them become
token comparisons, gathers and scatter-adds, and no ``vocab``-sized row is
formed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from neuron_optax._src.layer_stats import TokenRows

Rows = jax.Array | TokenRows


def sym_eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigendecomposition of a symmetric matrix or stack ``(..., d, d)`` (symmetrised first)."""
  return jnp.linalg.eigh(_symmetrised(matrix))


def _symmetrised(matrix: jax.Array) -> jax.Array:
  return (matrix + jnp.swapaxes(matrix, -1, -2)) / 2


# A symmetric PSD matrix stored in floating point is only known to about ``ε·‖M‖`` (rounding of its
# entries, of the moving averages and of the factorisation; ``ε`` the dtype's machine epsilon), so its
# eigenvalues below that are indistinguishable from 0. ``RESOLUTION · ε · ‖M‖`` is the level below which
# a damped solve stops trusting them (measured: float32 factors of 4-100 rows in 33-1001 dimensions have
# eigenvalue noise of 0.1-0.3 ε‖M‖, and directions within 1e-2 of float64 need the floor 100x above it).
RESOLUTION = 300


def resolution(norm: jax.Array, dtype) -> jax.Array:
  """``τ = RESOLUTION · ε · norm``: the smallest eigenvalue a matrix of that norm resolves in ``dtype``."""
  return RESOLUTION * jnp.finfo(dtype).eps * norm


def _floored_eigen(symmetric: jax.Array, damping: jax.Array):
  """``(U, divisors, floor)`` of ``M + λI`` with its eigenvalues raised to the resolution ``τ``.

  ``divisors = max(max(μ, 0) + λ, τ)``, ``τ = resolution(max μ)``; ``floor`` is ``τ`` where that
  raised an eigenvalue by more than 1 % (per matrix of the stack), else 0.
  """
  evals, evecs = jnp.linalg.eigh(symmetric)
  floor = resolution(jnp.max(evals, axis=-1, keepdims=True), symmetric.dtype)
  shifted = jnp.maximum(evals, 0) + damping
  divisors = jnp.maximum(shifted, floor)
  floored = jnp.any(divisors > 1.01 * shifted, axis=-1)
  return evecs, divisors, jnp.where(floored, floor[..., 0], 0)


def _prepare(matrix: jax.Array, damping: jax.Array | float):
  """``(symmetrised M, λ as (..., 1), M + λI, whether every λ >= the resolution of its ‖M‖_F)``."""
  symmetric = _symmetrised(matrix)
  damping = jnp.broadcast_to(jnp.asarray(damping, matrix.dtype), matrix.shape[:-2])[..., None]
  damped = symmetric + damping[..., None] * jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  frobenius = jnp.sqrt(jnp.sum(symmetric * symmetric, axis=(-2, -1)))
  resolved = jnp.all(damping[..., 0] >= resolution(frobenius, matrix.dtype))
  return symmetric, damping, damped, resolved


def damped_solve(
  matrix: jax.Array,
  damping: jax.Array | float,
  rhs: jax.Array,
  *,
  return_floor: bool = False,
  on_floor: Callable[[jax.Array], None] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """``(M + λI)⁻¹ rhs`` for a symmetric PSD ``M`` and ``λ > 0``.

  Batched: ``matrix`` may be a stack ``(..., d, d)`` with ``damping`` a scalar
  or one value per matrix ``(...)`` and ``rhs`` of shape ``(..., d)`` or
  ``(..., d, k)``; one batched factorisation serves the whole stack.

  **Precision.** ``M`` is known only to its float resolution
  ``τ = RESOLUTION·ε·‖M‖`` (``ε`` of its dtype; :func:`resolution`): its
  eigenvalues below ``τ`` are round-off (a matrix of fewer rows than columns,
  ``ĀᵀĀ``, has ``d − rows`` of them). When every ``λ`` is at least the
  resolution of ``‖M‖_F`` (a bound on ``‖M‖₂``), round-off moves the result by
  at most about ``ε‖M‖/λ ≤ 1/RESOLUTION`` and a Cholesky factorisation is used
  (the usual case). Otherwise, or if the Cholesky factorisation fails, the
  whole stack is solved by an eigendecomposition whose damped eigenvalues
  ``max(μ, 0) + λ`` are raised to at least ``τ``: components of ``rhs`` in the
  span of ``M``'s resolved eigenvectors are solved as exactly as the stored
  ``M`` allows, and round-off outside it is divided by ``τ`` rather than by a
  tiny ``λ``. Never NaN for finite input.

  With ``return_floor=True`` also returns, per matrix, the ``τ`` that raised
  an eigenvalue by more than 1 % (0 where none was), for the precision
  warning (:mod:`neuron_optax._src.precision`); ``on_floor(τ)`` is called with it
  inside the eigendecomposition branch only, so that a warning costs nothing
  in the usual Cholesky case.
  """
  symmetric, damping, damped, resolved = _prepare(matrix, damping)
  vector = rhs.ndim == matrix.ndim - 1
  columns = rhs[..., None] if vector else rhs
  lower = jax.lax.linalg.cholesky(damped, symmetrize_input=False)
  half = jax.lax.linalg.triangular_solve(lower, columns, left_side=True, lower=True)
  solution = jax.lax.linalg.triangular_solve(lower, half, left_side=True, lower=True, transpose_a=True)
  no_floor = jnp.zeros(matrix.shape[:-2], matrix.dtype)

  def eigh_solve(_):
    evecs, divisors, floor = _floored_eigen(symmetric, damping)
    if on_floor is not None:
      on_floor(floor)
    return evecs @ ((jnp.swapaxes(evecs, -1, -2) @ columns) / divisors[..., None]), floor

  use_cholesky = resolved & jnp.all(jnp.isfinite(solution))
  solution, floor = jax.lax.cond(use_cholesky, lambda _: (solution, no_floor), eigh_solve, None)
  solution = solution[..., 0] if vector else solution
  return (solution, floor) if return_floor else solution


def damped_inverse(
  matrix: jax.Array, damping: jax.Array | float, *, return_floor: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """``(M + λI)⁻¹`` of a symmetric PSD ``M`` or of a stack of them (precision as in :func:`damped_solve`).

  The Cholesky path forms ``L⁻ᵀL⁻¹`` (``M + λI = LLᵀ``): symmetric by
  construction and 3-10x more accurate than solving ``LLᵀX = I`` column by
  column (measured in float32).
  """
  symmetric, damping, damped, resolved = _prepare(matrix, damping)
  identity = jnp.broadcast_to(jnp.eye(matrix.shape[-1], dtype=matrix.dtype), matrix.shape)
  lower = jax.lax.linalg.cholesky(damped, symmetrize_input=False)
  lower_inverse = jax.lax.linalg.triangular_solve(lower, identity, left_side=True, lower=True)
  inverse = jnp.swapaxes(lower_inverse, -1, -2) @ lower_inverse
  no_floor = jnp.zeros(matrix.shape[:-2], matrix.dtype)

  def eigh_inverse(_):
    evecs, divisors, floor = _floored_eigen(symmetric, damping)
    return (evecs / divisors[..., None, :]) @ jnp.swapaxes(evecs, -1, -2), floor

  use_cholesky = resolved & jnp.all(jnp.isfinite(inverse))
  inverse, floor = jax.lax.cond(use_cholesky, lambda _: (inverse, no_floor), eigh_inverse, None)
  return (inverse, floor) if return_floor else inverse


def damped_inverse_diagonal(diagonal: jax.Array, damping: jax.Array | float) -> jax.Array:
  """``(diag(d) + λI)⁻¹`` of a diagonal factor kept as its diagonal (an embedding's input factor).

  The diagonal of a second moment is non-negative; it is clamped at 0 as the
  eigenvalues in :func:`kronecker_eigen_solve` are, so every divisor is at least ``λ``.
  """
  damping = jnp.asarray(damping, diagonal.dtype)
  return 1 / (jnp.maximum(diagonal, 0) + damping[..., None])


def as_columns(a: Rows, g: jax.Array) -> tuple[Rows, jax.Array]:
  """Broadcasts inputs ``(n,P,di)`` against cotangents ``(S,n,P,do)`` into ``m = S·n`` columns."""
  s = g.shape[0]

  def columns(x):
    return jnp.broadcast_to(x[None], (s,) + x.shape).reshape((-1,) + x.shape[1:])

  g_cols = g.reshape((-1,) + g.shape[2:])
  if not isinstance(a, TokenRows):
    return columns(a), g_cols
  if a.queries is None:
    return TokenRows(columns(a.ids), a.vocab), g_cols
  h = a.attend_cotangents
  return TokenRows(columns(a.ids), a.vocab, columns(a.queries), h.reshape((-1,) + h.shape[2:])), g_cols


def _scatter_rows(ids: jax.Array, values: jax.Array, vocab: int) -> jax.Array:
  """``Σ_p e_{ids_p} v_pᵀ`` of one column: ``(vocab, d_out)`` from ids ``(P,)`` and values ``(P, d_out)``."""
  return jax.ops.segment_sum(values, ids, num_segments=vocab)


def _token_psi(a_cols: TokenRows, g_cols: jax.Array) -> jax.Array:
  """Per-example gradients ``(m, vocab, d_out)`` of one-hot columns (and of a tied output use)."""
  psi = jax.vmap(lambda ids, v: _scatter_rows(ids, v, a_cols.vocab))(a_cols.ids, g_cols)
  if a_cols.queries is not None:
    psi = psi + jnp.einsum("mqv,mqf->mvf", a_cols.attend_cotangents, a_cols.queries)
  return psi


def per_example_gradients(a: Rows, g: jax.Array) -> jax.Array:
  """``ψ`` of every column: ``(S·n, d_in, d_out)``. Costs ``S·n·P·d_in·d_out``."""
  a_cols, g_cols = as_columns(a, g)
  if isinstance(a_cols, TokenRows):
    return _token_psi(a_cols, g_cols)
  return jnp.einsum("mpi,mpo->mio", a_cols, g_cols)


def _dense_gram(a_cols: jax.Array, g_cols: jax.Array) -> jax.Array:
  """``K = ΨᵀΨ`` of dense columns ``(m, P, d_in)``, ``(m, P, d_out)`` (see :func:`gradient_gram`)."""
  m, p, d_in = a_cols.shape
  d_out = g_cols.shape[-1]
  if p == 1:
    a2, g2 = a_cols[:, 0], g_cols[:, 0]
    return (a2 @ a2.T) * (g2 @ g2.T)
  cost_psi = m * p * d_in * d_out + m * m * d_in * d_out
  cost_pairs = m * m * p * p * (d_in + d_out)
  if cost_psi <= cost_pairs:
    psi = jnp.einsum("mpi,mpo->mio", a_cols, g_cols).reshape(m, -1)
    return psi @ psi.T
  aa = jnp.einsum("mpi,nqi->mnpq", a_cols, a_cols)
  gg = jnp.einsum("mpo,nqo->mnpq", g_cols, g_cols)
  return jnp.sum(aa * gg, axis=(2, 3))


def _token_gram(a_cols: TokenRows, g_cols: jax.Array) -> jax.Array:
  """``K = ΨᵀΨ`` for one-hot inputs: ``Σ_pq [t_mp = t_nq] <g_mp, g_nq>``, ``O(m²P²(1 + d_out))``.

  With a tied output use (``h``, ``q``), ``ψ_m = Σ_p e_{t_mp} g_mpᵀ + Σ_q h_mq q_mqᵀ``, so ``K`` adds
  that use's own Gram ``Σ_qr (q_mq·q_nr)(h_mq·h_nr)`` and the cross terms
  ``Σ_pq h_nq[t_mp] (g_mp·q_nq)`` and their transpose. Or through the per-example gradients
  (``m·vocab·d_out`` memory) when that is cheaper.
  """
  m, p = a_cols.ids.shape
  d_out, vocab = g_cols.shape[-1], a_cols.vocab
  tied = a_cols.queries is not None
  q = a_cols.queries.shape[1] if tied else 0
  cost_psi = m * vocab * d_out * (1 + m) + m * q * vocab * d_out
  cost_pairs = m * m * (p * p * (1 + d_out) + q * q * (d_out + vocab) + 2 * p * q * (1 + d_out))
  if cost_psi <= cost_pairs:
    psi = _token_psi(a_cols, g_cols).reshape(m, -1)
    return psi @ psi.T
  same = (a_cols.ids[:, None, :, None] == a_cols.ids[None, :, None, :]).astype(g_cols.dtype)
  gram = jnp.einsum("mnpq,mpo,nqo->mn", same, g_cols, g_cols)
  if not tied:
    return gram
  h_at_tokens = jnp.take(a_cols.attend_cotangents, a_cols.ids, axis=2)  # h_nq[t_mp]: (n, Q, m, P)
  cross = jnp.einsum("nqmp,mpf,nqf->mn", h_at_tokens, g_cols, a_cols.queries)
  return gram + _dense_gram(a_cols.queries, a_cols.attend_cotangents) + cross + cross.T


def gradient_gram(a: Rows, g: jax.Array) -> jax.Array:
  """``K[(s,i),(t,j)] = <ψ_si, ψ_tj>`` of shape ``(S·n, S·n)``.

  One position (``P = 1``): ``(ĀĀᵀ) ⊙ (ĜĜᵀ)`` (Khatri-Rao identity; cost
  ``m²(d_in + d_out)``). Several positions (convolutions, tokens): the exact
  sum over position pairs, by whichever is cheaper of materialising the
  per-example gradients (``m·P·d_in·d_out + m²·d_in·d_out``) or the position
  Gram matrices (``m²P²(d_in + d_out)``). One-hot inputs (:class:`TokenRows`):
  ``ĀĀᵀ`` is token equality.
  """
  a_cols, g_cols = as_columns(a, g)
  if isinstance(a_cols, TokenRows):
    return _token_gram(a_cols, g_cols)
  return _dense_gram(a_cols, g_cols)


def gradient_dots(a: Rows, g: jax.Array, matrix: jax.Array) -> jax.Array:
  """``Jᵀ v``: ``<ψ_si, V>`` for every column, ``(S·n,)``, for ``V`` of shape ``(d_in, d_out)``."""
  av = matrix[a.ids] if isinstance(a, TokenRows) else jnp.einsum("npi,io->npo", a, matrix)
  dots = jnp.einsum("npo,snpo->sn", av, g)
  if isinstance(a, TokenRows) and a.queries is not None:  # a tied output use: <h qᵀ, V> = hᵀ V q
    dots = dots + jnp.einsum("snqv,vf,nqf->sn", a.attend_cotangents, matrix, a.queries)
  return dots.reshape(-1)


def weighted_gradient_sum(a: Rows, g: jax.Array, weights: jax.Array) -> jax.Array:
  """``J w = Σ_si w_si ψ_si`` of shape ``(d_in, d_out)`` for ``weights`` of shape ``(S·n,)``.

  The weighted-input trick: weight the cotangents, then one ``aᵀ g`` product;
  the per-example gradients are never formed.
  """
  s, n = g.shape[:2]
  weighted = jnp.einsum("sn,snpo->npo", weights.reshape(s, n), g)
  if isinstance(a, TokenRows):
    total = _scatter_rows(a.ids.reshape(-1), weighted.reshape(-1, weighted.shape[-1]), a.vocab)
    if a.queries is not None:  # a tied output use: Σ w h qᵀ
      total = total + jnp.einsum("sn,snqv,nqf->vf", weights.reshape(s, n), a.attend_cotangents, a.queries)
    return total
  # One (rows × d_in)ᵀ (rows × d_out) product, the layout of the weight-gradient matmul it replaces.
  return a.reshape(-1, a.shape[-1]).T @ weighted.reshape(-1, weighted.shape[-1])


def kronecker_eigen_solve(
  a_eigh: tuple[jax.Array, jax.Array],
  g_eigh: tuple[jax.Array, jax.Array],
  matrix: jax.Array,
  damping: jax.Array | float,
  *,
  a_rotated: bool = False,
) -> jax.Array:
  """``D`` with ``vec D = (A⊗G + λI)⁻¹ vec V`` (row-major ``vec``), i.e. ``A D G + λD = V``.

  With ``A = U_A diag(a) U_Aᵀ`` and ``G = U_G diag(g) U_Gᵀ`` (``a_eigh = (a, U_A)``,
  ``g_eigh = (g, U_G)``, as ``jnp.linalg.eigh`` returns them)::

      D = U_A [(U_Aᵀ V U_G) / (a gᵀ + λ)] U_Gᵀ

  The Kronecker product is never formed: cost ``2(d_a² d_g + d_a d_g²)``.
  Eigenvalues are clamped at 0 (round-off can make those of a PSD matrix
  slightly negative), so every divisor is at least ``λ``, and divisors are
  raised to the float resolution of their product (:func:`kronecker_floor`):
  ``a_i`` is known to ``τ_A = RESOLUTION·ε·max(a)`` and ``g_j`` to ``τ_G``
  (as :func:`damped_solve` treats one matrix), so a product of two resolved
  eigenvalues is accurate however small and is not raised; one with an
  unresolved factor is raised to ``RESOLUTION·ε·â_i·ĝ_j``, where ``â``
  (``ĝ``) is the eigenvalue with an unresolved one replaced by ``max(a)``
  (``max(g)``). A no-op unless ``λ`` is below that. With ``a_rotated=True``, ``matrix`` is ``U_Aᵀ V``
  already (callers that can form it in a cheaper order). ``U_A = None`` stands for the identity (a diagonal ``A``).
  """
  a_values, a_vectors = a_eigh
  g_values, g_vectors = g_eigh
  # A diagonal A (an embedding's input factor) has eigenvectors I, stored as None.
  rotated = matrix if a_rotated or a_vectors is None else a_vectors.T @ matrix
  rotated = rotated @ g_vectors
  scale = jnp.outer(jnp.maximum(a_values, 0), jnp.maximum(g_values, 0)) + damping
  scale = jnp.maximum(scale, _kronecker_resolutions(a_values, g_values))
  solved = (rotated / scale) @ g_vectors.T
  return solved if a_vectors is None else a_vectors @ solved


def _kronecker_resolutions(a_values: jax.Array, g_values: jax.Array) -> jax.Array:
  """``(d_a, d_g)``: the resolution of each eigenvalue ``a_i g_j`` of ``A⊗G`` (0 where both are resolved).

  A single resolution ``RESOLUTION·ε·max(a)·max(g)`` would raise products of resolved eigenvalues too: with
  non-centred inputs ``max(a)`` is the mean's direction, far above the data's other eigenvalues, and the
  gradient's components along them were divided by that floor (float32 KFAC with standard damping was 0.86
  from float64 at inputs of mean 2 and damping 1e-4 times the mean eigenvalue).
  """
  a, g = jnp.maximum(a_values, 0), jnp.maximum(g_values, 0)
  a_max, g_max = jnp.max(a), jnp.max(g)
  a_unresolved, g_unresolved = a < resolution(a_max, a.dtype), g < resolution(g_max, g.dtype)
  a_hat, g_hat = jnp.where(a_unresolved, a_max, a), jnp.where(g_unresolved, g_max, g)
  either = a_unresolved[:, None] | g_unresolved[None, :]
  return jnp.where(either, resolution(jnp.outer(a_hat, g_hat), a.dtype), 0)


def kronecker_floor(a_values: jax.Array, g_values: jax.Array, damping: jax.Array | float) -> jax.Array:
  """The largest resolution that raises a divisor of :func:`kronecker_eigen_solve` by more than 1 %, else 0."""
  floors = _kronecker_resolutions(a_values, g_values)
  divisors = jnp.outer(jnp.maximum(a_values, 0), jnp.maximum(g_values, 0)) + damping
  return jnp.max(jnp.where(floors > 1.01 * divisors, floors, 0))
