"""Executes every notebook in notebooks/ on the CPU (quick mode), and checks the committed copies.

The notebooks are committed executed (full mode, with their outputs and small PNG plots), as
``python notebooks/build_notebooks.py`` writes them; their cells must match that generator.
"""

import importlib.util
import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Generous per-cell limit for loaded CI machines.
CELL_TIMEOUT_S = 180
MAX_NOTEBOOK_BYTES = 300_000


def _generator():
  spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOK_DIR / "build_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_both_notebooks_exist():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "paper_reproduction.ipynb"}


@pytest.mark.slow  # executes whole notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv("NOX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel imports neuron_optax from this checkout even when it is not pip-installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError if any cell (or one of its asserts) fails
  elapsed = time.perf_counter() - start
  errors = [
    output
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
    if output.get("output_type") == "error"
  ]
  assert not errors
  print(f"{path.name}: executed in {elapsed:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_with_outputs_and_in_sync(path):
  assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  # Executed in order, every cell, without errors; at least one plot embedded.
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"{path.name} not executed"
  outputs = [output for cell in code for output in cell.outputs]
  assert not [output for output in outputs if output.get("output_type") == "error"]
  assert any("image/png" in output.get("data", {}) for output in outputs), f"{path.name} has no plot"
  # Install cell: skipped where the packages are importable; else from the checkout the notebook is in,
  # else from a wheel next to it, else the published package. No placeholder left to fill in.
  install = code[0].source
  assert "find_spec" in install and '%pip install -q -e "{target}"' in install, install
  assert 'glob("neuron_optax-*.whl")' in install and '%pip install -q "neuron_optax[examples]"' in install
  text = path.read_text()
  assert "OWNER" not in text and "<path to>" not in text and "git URL>" not in text
  builders = {"quickstart.ipynb": "quickstart", "paper_reproduction.ipynb": "paper_reproduction"}
  if path.name in builders:
    generated = getattr(_generator(), builders[path.name])()
    assert [c.source for c in generated.cells] == [c.source for c in notebook.cells], (
      f"{path.name} differs from notebooks/build_notebooks.py: run python notebooks/build_notebooks.py"
    )
