#!/usr/bin/env bash
# Cross-checks the Laplace posteriors against laplace-torch (tests/test_laplace_torch_crosscheck.py).
#
#   scripts/check_laplace_torch.sh                          # torch==2.13.0 and laplace-torch==0.3
#   LAPLACE_TORCH_SPEC="laplace-torch>=0.3" scripts/check_laplace_torch.sh   # try another laplace-torch
#   LAPLACE_TORCH_VENV=/tmp/my_env REUSE=1 scripts/check_laplace_torch.sh    # rerun in an existing environment
#   scripts/check_laplace_torch.sh -v -k kron               # extra arguments go to pytest
#
# torch and laplace-torch are not test dependencies (the main suite skips the module:
# `pytest.importorskip("laplace")`), so this script
# 1. creates a fresh virtual environment (default /tmp/neuron_optax_laplace_torch; set LAPLACE_TORCH_VENV;
#    REUSE=1 keeps an existing one and only runs step 3),
# 2. installs torch==2.13.0 first (no extra index: a CPU wheel where pip's configuration provides one), then
#    laplace-torch and its curvature back-ends *without* their dependencies (laplace-torch 0.3 also asks for
#    torchvision, which it does not import here and whose wheels pin another torch), then this checkout
#    editable with its test extra (`-e ".[test]"`),
# 3. runs the cross-check in float64: a 3-4-3 tanh MLP (with biases; bias-free for "kron", see the test's
#    docstring for why), 12 data points as the whole Fisher batch, comparing the posterior covariances of
#    hessian_structure="full", "diag" and "kron" with ours ("full", "diagonal", "kfac"), the log marginal
#    likelihood at three prior precisions and the GLM predictive (probit and Laplace bridge) at 1e-10.
# Needs PyPI (or a pip cache / local index) and the python given by $PYTHON (default python3, >= 3.11).
# The test takes about a minute on 2 cores; installing torch takes a few more.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${LAPLACE_TORCH_VENV:-/tmp/neuron_optax_laplace_torch}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LAPLACE_TORCH_SPEC="${LAPLACE_TORCH_SPEC:-laplace-torch==0.3}"

if [ "${REUSE:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  # laplace-torch's own requirements minus torchvision (unused here; its wheels would replace torch).
  "$VENV/bin/python" -m pip install --quiet --no-deps "$LAPLACE_TORCH_SPEC" asdfghjkl==0.1a4 \
    backpack-for-pytorch "curvlinops-for-pytorch>=3.0.1" unfoldNd einconv linear_operator einops torchmetrics \
    lightning-utilities
  "$VENV/bin/python" -m pip install --quiet "scipy>=1.12" tqdm opt-einsum
fi
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|numpy|torch|laplace-torch|curvlinops-for-pytorch) '
cd "$ROOT"
# addopts="" drops the project's `-n auto` (pytest-xdist): one process compiles each program once.
"$VENV/bin/python" -m pytest tests/test_laplace_torch_crosscheck.py -q -o addopts="" -p no:cacheprovider "$@"
