"""Every ```python block of README.md and of the docs pages runs as pasted, and every public name is documented.

Each page's blocks run in order in one namespace. ``docs/getting_started.md`` defines the model, ``params``,
``batch``, ``loss_fn(params, batch)`` and ``train_step`` that the other docs pages build on, so each of those
pages starts from a copy of its namespace; README.md and the getting-started page run on their own. A block
that is deliberately not runnable is fenced as ```python notest (kept rare). The transforms' ``Examples:``
docstring sections run as doctests.
"""

import doctest
import importlib
import inspect
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GETTING_STARTED = DOCS / "getting_started.md"
FENCE = re.compile(r"^(\s*)(`{3,})(.*)$")


def code_blocks(path: pathlib.Path) -> list[tuple[int, str, str]]:
  """(line number, info string, code) of every fenced block, in order (indented fences dedented)."""
  blocks, lines, i = [], path.read_text().split("\n"), 0
  while i < len(lines):
    match = FENCE.match(lines[i])
    if match is None:
      i += 1
      continue
    indent, ticks, info = match.groups()
    body, j = [], i + 1
    while j < len(lines) and not (lines[j].strip() == ticks and lines[j].startswith(indent)):
      body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
      j += 1
    blocks.append((i + 1, info.strip(), "\n".join(body)))
    i = j + 1
  return blocks


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  return [
    (line, code) for line, info, code in code_blocks(path) if info.split()[:1] == ["python"] and "notest" not in info
  ]


def run_page(path: pathlib.Path, namespace: dict) -> dict:
  for line, code in python_blocks(path):
    name = f"{path.relative_to(ROOT)}:{line}"
    with warnings.catch_warnings():
      # Pages show what a user sees; a warning a page provokes on purpose must not fail the run.
      warnings.simplefilter("ignore")
      exec(compile(code, name, "exec"), namespace)  # noqa: S102
  return namespace


@pytest.fixture(scope="module")
def getting_started_namespace():
  return run_page(GETTING_STARTED, {"__name__": "docs_example"})


DOC_PAGES = sorted(p for p in DOCS.glob("*.md") if p != GETTING_STARTED)
# Pages whose examples compile training steps of their own (5-60 s each on a loaded 2-core machine) run in the
# slow CI step (`python -m pytest -m slow`), which keeps the default run within its 10-minute budget; README.md,
# Getting started, the doctests and the pages without such steps run by default.
SLOW_PAGES = {
  "fngd.md",
  "foof.md",
  "kfac.md",
  "laplace.md",
  "natural_gradient.md",
  "nnx.md",
  "optax.md",
  "scale.md",
  "stacked.md",
  "transformers.md",
}


def test_readme_runs_as_pasted():
  assert python_blocks(ROOT / "README.md"), "README.md has no python example"
  run_page(ROOT / "README.md", {"__name__": "readme_example"})


def test_readme_is_short_with_two_quick_start_commands():
  text = (ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= 250
  quick_start = text[text.index("## Quick start") :]
  bash = next(code for _, info, code in code_blocks(ROOT / "README.md") if info == "bash" and code in quick_start)
  commands = [line for line in bash.splitlines() if line.strip() and not line.lstrip().startswith("#")]
  # Exactly two commands, each doing its own install first.
  assert len(commands) == 2 and all(c.startswith('pip install -e ".[') and " && python -m " in c for c in commands)


def test_getting_started_defines_what_later_pages_use(getting_started_namespace):
  for name in ("model", "params", "batch", "loss_fn", "train_step", "opt_state", "tx", "make_train_step"):
    assert name in getting_started_namespace, name


@pytest.mark.parametrize(
  "page",
  [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p for p in DOC_PAGES],
  ids=lambda p: p.name,
)
def test_docs_page_runs_as_pasted(page, getting_started_namespace):
  run_page(page, dict(getting_started_namespace))


def test_every_python_block_is_run_or_marked():
  """A block fenced with another spelling (```py, ```Python) would silently escape the test."""
  for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
    for line, info, _ in code_blocks(path):
      lang = info.split()[0].lower() if info else ""
      assert lang not in ("py", "python3", "ipython") and (lang != "python" or info.split()[0] == "python"), (
        f"{path.name}:{line}: fence the block as ```python (or ```python notest)"
      )


def test_notest_blocks_are_rare():
  marked = sum("notest" in info for p in [ROOT / "README.md", *DOCS.glob("*.md")] for _, info, _ in code_blocks(p))
  assert marked <= 5, f"{marked} blocks are marked notest"


def _api_page() -> str:
  return (DOCS / "api.md").read_text()


def test_every_public_name_has_an_api_entry():
  import neuron_optax
  import neuron_optax.nnx

  text = _api_page()
  directive = re.compile(r"^\.\. auto(?:function|class|exception|data):: (\S+)$", re.M)
  documented = set(directive.findall(text))
  missing = [f"neuron_optax.{n}" for n in neuron_optax.__all__ if n != "nnx" and f"neuron_optax.{n}" not in documented]
  missing += [f"neuron_optax.nnx.{n}" for n in neuron_optax.nnx.__all__ if f"neuron_optax.nnx.{n}" not in documented]
  assert not missing, f"no entry in docs/api.md for {missing}: run python docs/generate_api.py"


def test_every_public_name_has_a_docstring():
  import neuron_optax
  import neuron_optax.nnx

  names = [(neuron_optax, n) for n in neuron_optax.__all__ if n != "nnx"]
  names += [(neuron_optax.nnx, n) for n in neuron_optax.nnx.__all__]
  undocumented = [n for module, n in names if not inspect.getdoc(getattr(module, n))]
  assert not undocumented


TRANSFORM_MODULES = [
  "neuron_optax._src.foof",
  "neuron_optax._src.kfac",
  "neuron_optax._src.natural_gradient",
  "neuron_optax._src.fngd",
]


@pytest.mark.parametrize("module_name", TRANSFORM_MODULES)
def test_transform_docstring_examples_run(module_name):
  module = importlib.import_module(module_name)
  transform = getattr(module, module_name.rsplit(".", 1)[1])
  doc = transform.__doc__ or ""
  assert doc.count(".. math::") >= 1 and "Examples:" in doc and "References:" in doc, module_name
  finder = doctest.DocTestFinder()
  tests = [t for t in finder.find(transform, module_name) if t.examples]
  assert tests, f"{module_name}: no doctest examples"
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{module_name}: {result.failed} doctest examples failed"
