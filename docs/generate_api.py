"""Writes docs/api.md: one autodoc entry per public name, grouped as ``neuron_optax.__all__`` groups them.

Run ``python docs/generate_api.py`` from the repository root after adding or removing a public name; the groups
are the ``# comment`` lines of ``__all__`` in ``neuron_optax/__init__.py``. ``tests/test_docs_examples.py``
checks that every public name has an entry.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADER = """# API reference

Every public name of `neuron_optax` (imported as `nox`) and of `neuron_optax.nnx`, generated from the
docstrings. `tests/test_docs_examples.py` checks that each name in `neuron_optax.__all__` and
`neuron_optax.nnx.__all__` has an entry here (`python docs/generate_api.py` rewrites this page).
"""


def groups() -> list[tuple[str, list[str]]]:
  """``[(group title, names)]`` from the commented groups of ``__all__`` (the ``nnx`` module is its own section)."""
  source = (ROOT / "neuron_optax" / "__init__.py").read_text()
  body = source[source.index("__all__ = [") :]
  body = body[: body.index("]")]
  result: list[tuple[str, list[str]]] = [("Other names", [])]
  for line in body.splitlines()[1:]:
    line = line.strip()
    if line.startswith("#"):
      result.append((line[1:].strip(), []))
    elif line.startswith('"') and line.strip('",') != "nnx":
      result[-1][1].append(line.strip('",'))
  return [(title, names) for title, names in result if names]


def directive(module_name: str, name: str) -> str:
  obj = getattr(importlib.import_module(module_name), name)
  if inspect.isclass(obj) and issubclass(obj, BaseException):
    return f".. autoexception:: {module_name}.{name}"
  if inspect.isclass(obj):
    return f".. autoclass:: {module_name}.{name}"
  return f".. autofunction:: {module_name}.{name}"


def section(title: str, module_name: str, names: list[str]) -> list[str]:
  lines = [f"## {title}", "", "```{eval-rst}", f".. currentmodule:: {module_name}", "", ".. autosummary::", ""]
  lines += [f"   {name}" for name in names] + [""]
  for name in names:
    lines += [directive(module_name, name), ""]
  return lines + ["```", ""]


def main() -> None:
  import neuron_optax
  import neuron_optax.nnx

  grouped = groups()
  listed = sorted(name for _, names in grouped for name in names)
  expected = sorted(name for name in neuron_optax.__all__ if name != "nnx")
  if listed != expected:
    raise SystemExit(f"__all__ parsed wrongly: {sorted(set(listed) ^ set(expected))}")
  lines = [HEADER]
  for title, names in grouped:
    lines += section(title, "neuron_optax", names)
  lines += section("Flax NNX (`neuron_optax.nnx`)", "neuron_optax.nnx", list(neuron_optax.nnx.__all__))
  (ROOT / "docs" / "api.md").write_text("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
  main()
