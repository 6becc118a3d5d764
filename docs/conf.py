"""Sphinx configuration for the neuron_optax documentation (Markdown pages with MyST, notebooks with myst-nb).

Build: ``pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import neuron_optax  # noqa: E402

project = "neuron_optax"
author = "neuron_optax contributors"
copyright = "neuron_optax contributors"  # noqa: A001
release = neuron_optax.__version__
version = release

extensions = [
  "myst_nb",  # Markdown pages (MyST) and notebooks rendered from their saved outputs
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]

# The notebooks live in notebooks/ (built by notebooks/build_notebooks.py); the site renders copies of
# them with their committed outputs and never executes them.
_NB_SRC = ROOT / "notebooks"
_NB_DST = pathlib.Path(__file__).resolve().parent / "notebooks"
_NB_DST.mkdir(exist_ok=True)
for _nb in _NB_SRC.glob("*.ipynb"):
  shutil.copyfile(_nb, _NB_DST / _nb.name)
nb_execution_mode = "off"

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# Literal blocks without a language (docstrings' `::` blocks hold equations) are not highlighted.
highlight_language = "none"

autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"neuron_optax {release}"
