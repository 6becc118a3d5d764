"""Products with the mini-batch Fisher (Benzing 2022, App. C.2, C.3), through its columns."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neuron_optax._src import hyperparams, linalg
from neuron_optax._src.fisher_columns import FisherColumns, fisher_columns
from neuron_optax._src.laplace import _trees
from neuron_optax._src.layer_stats import LayerStats, Stats, TokenRows

LAYERWISE = "use a layer-wise structure such as structure='kfac'"


def columns_of(where: str, stats: Stats, keys, dtype, max_columns: int | None = None) -> FisherColumns:
  return fisher_columns(where, stats, keys, dtype, max_columns=max_columns, layerwise=LAYERWISE)


def fisher_vector_product(stats: Stats, vector):
  """``F v`` for the mini-batch Fisher ``F = (1/n) Σ_j ψ_j ψ_jᵀ``, without forming ``F``.

  ``F v = (1/n) Ψ (Ψᵀ v)``: per layer one ``Ψᵀ v`` contraction
  (``linalg.gradient_dots``) and one weighted-input sum
  (``linalg.weighted_gradient_sum``); dense per-example gradients are never
  formed. Cost ``O(m Σ_ℓ P·d_in·d_out)`` for ``m = S·n`` columns. Useful for
  EWC-style penalties ``vᵀFv`` (Benzing 2022, App. C.2). Stacked layers (every
  copy a layer of its own), embeddings (token-id rows) and tables tied to an
  output layer (both uses) are columns like any other layer.

  Args:
    stats: from :func:`neuron_optax.value_grad_and_stats` (``fisher=`` picks
      the empirical, Monte-Carlo or full Fisher).
    vector: a tree shaped like the parameters ``stats`` were computed with.

  Returns:
    ``F v`` shaped like ``vector``: the captured layers' ``kernel``/``bias``
    (``embedding``) leaves hold the product, every other leaf is zeros (those
    parameters are not part of ``F``).

  Examples:
    >>> _, _, stats = nox.value_grad_and_stats(loss_fn, fisher="mc", likelihood="categorical")(params, rng=key)
    >>> fv = nox.fisher_vector_product(stats, params)  # doctest: +SKIP
  """
  where = "fisher_vector_product"
  shapes, keys, stats = _trees.layers_of_stats(where, vector, stats, "vector")
  v = _trees.matrices(where, vector, shapes, keys, "vector")
  dtype = _trees.dtype_of(v)
  columns = columns_of(where, stats, keys, dtype)
  dots = columns.dots({k: x.astype(dtype) for k, x in v.items()})
  return _trees.write(vector, shapes, {k: columns.weighted_sum(k, dots) / columns.n for k in keys}, zeros=True)


def damped_fisher_solve(stats: Stats, vector, damping, *, max_columns: int | None = 4096):
  """``(F + λI)⁻¹ v`` for the mini-batch Fisher, by the Woodbury identity.

  ``(F + λI)⁻¹ v = (v − Ψ c) / λ`` with ``c = (K + nλI)⁻¹ Ψᵀ v`` and
  ``K = ΨᵀΨ`` (``m × m``, Cholesky; eigendecomposition fallback), as in
  :func:`neuron_optax.natural_gradient` (Benzing 2022, App. I) and with the
  same columns. Cost ``O(m² Σ_ℓ (d_in + d_out) + m³)`` for dense layers.

  Args:
    stats: from :func:`neuron_optax.value_grad_and_stats`.
    vector: a tree shaped like the parameters.
    damping: ``λ > 0``.
    max_columns: largest allowed ``m`` (``None``: no limit).

  Returns:
    ``(F + λI)⁻¹ v`` shaped like ``vector``, zeros on the leaves outside the
    captured layers.
  """
  where = "damped_fisher_solve"
  hyperparams.check_positive_scalar(where, "damping", damping)
  hyperparams.check_integer(where, "max_columns", max_columns, optional=True)
  shapes, keys, stats = _trees.layers_of_stats(where, vector, stats, "vector")
  v = _trees.matrices(where, vector, shapes, keys, "vector")
  dtype = _trees.dtype_of(v)
  v = {k: x.astype(dtype) for k, x in v.items()}
  columns = columns_of(where, stats, keys, dtype, max_columns)
  damping = jnp.asarray(damping, dtype)
  c = linalg.damped_solve(columns.gram(), columns.n * damping, columns.dots(v))
  out = {k: (v[k] - columns.weighted_sum(k, c)) / damping for k in keys}
  return _trees.write(vector, shapes, out, zeros=True)


def fisher_diagonal(stats: Stats, like):
  """``diag(F)`` of the mini-batch Fisher, shaped like ``like`` (zeros outside the captured layers).

  ``diag F = (1/n) Σ_j ψ_j ⊙ ψ_j``. One position per example (dense layers):
  ``(1/n) (ā ⊙ ā)ᵀ Σ_s (g_s ⊙ g_s)``, cost ``O(m(d_in + d_out) + n·d_in·d_out)``.
  Several positions (convolutions, tokens) and embeddings: the per-example
  gradients are formed one example at a time (a loop), cost
  ``O(m·P·d_in·d_out)``, memory ``O(S·d_in·d_out)``.

  Args:
    stats: from :func:`neuron_optax.value_grad_and_stats`.
    like: a tree shaped like the parameters (e.g. ``params``).
  """
  where = "fisher_diagonal"
  shapes, keys, stats = _trees.layers_of_stats(where, like, stats, "like")
  dtype = _trees.dtype_of(_trees.matrices(where, like, shapes, keys, "like"))
  return _trees.write(like, shapes, {k: layer_fisher_diagonal(stats[k], dtype) for k in keys}, zeros=True)


def layer_fisher_diagonal(stats: LayerStats, dtype) -> jax.Array:
  """``(1/n) Σ_j ψ_j ⊙ ψ_j`` of one layer (one copy), ``(d_in, d_out)``."""
  a, g = stats.row_operand(dtype), stats.per_example_cotangents(dtype)
  n = g.shape[1]
  if not isinstance(a, TokenRows) and a.shape[1] == 1:
    return (a[:, 0] ** 2).T @ jnp.sum(g[:, :, 0] ** 2, axis=0) / n

  def example(i):
    """Example ``i``'s rows and cotangents, as a batch of one."""
    take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i, 1, axis)
    if isinstance(a, TokenRows):
      queries = None if a.queries is None else take(a.queries, 0)
      attend = None if a.attend_cotangents is None else take(a.attend_cotangents, 1)
      return TokenRows(take(a.ids, 0), a.vocab, queries, attend), take(g, 1)
    return take(a, 0), take(g, 1)

  def add(i, total):
    return total + jnp.sum(linalg.per_example_gradients(*example(i)) ** 2, axis=0)

  total = jnp.zeros((stats.d_in, g.shape[-1]), dtype)
  return jax.lax.fori_loop(0, n, add, total) / n
