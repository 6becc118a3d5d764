"""Fisher label sampling: the output cotangents of sampled (``"mc"``) or all (``"full"``) labels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def fisher_output_cotangents(output: jax.Array, fisher: str, likelihood: str, rng: jax.Array | None) -> jax.Array:
  """``(S, *output.shape)`` per-example cotangents of the model output.

  The likelihood's negative log-probability is averaged over all leading
  positions of ``output`` (all axes but the last), as a mean loss would be,
  and multiplied by ``n`` (the leading axis) to get per-example scale.
  """
  output = jax.lax.stop_gradient(output)
  shape = output.shape if output.ndim > 1 else (1,) + output.shape
  n, k = shape[0], shape[-1]
  per_example = math.prod(shape[1:-1])  # output positions per example (tokens, pixels)
  scale = 1.0 / per_example  # n · d/dout of a mean over n · per_example positions
  compute_dtype = jnp.promote_types(output.dtype, jnp.float32)
  out = output.reshape(n, per_example, k).astype(compute_dtype)
  if likelihood == "categorical":
    probs = jax.nn.softmax(out, axis=-1)
    if fisher == "mc":
      labels = jax.random.categorical(rng, out, axis=-1)
      sets = (probs - jax.nn.one_hot(labels, k, dtype=compute_dtype))[None]
    else:
      # One set per (position, class) with sqrt(p) folded in, zero at other positions.
      per_class = jnp.sqrt(probs)[..., :, None] * (probs[..., None, :] - jnp.eye(k, dtype=compute_dtype))
      per_class = jnp.moveaxis(per_class, 2, 0)  # (c, n, T, k)
      eye_t = jnp.eye(per_example, dtype=compute_dtype)
      sets = eye_t[:, None, None, :, None] * per_class[None]  # (T0, c, n, T, k)
      sets = sets.reshape((per_example * k, n, per_example, k))
  elif fisher == "mc":
    # unit-variance Gaussian: cot = f - y with y ~ N(f, I)
    sets = -jax.random.normal(rng, out.shape, compute_dtype)[None]
  else:
    eye = jnp.eye(per_example * k, dtype=compute_dtype).reshape(per_example * k, 1, per_example, k)
    sets = jnp.broadcast_to(eye, (per_example * k, n, per_example, k))
  return (scale * sets).reshape((sets.shape[0],) + output.shape).astype(output.dtype)
