"""Walking a jaxpr: the tests that check what a step compiles (not how it computes) share this."""

from __future__ import annotations

import jax


def equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (``cond`` branches, ``pjit``)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from equations(inner)
