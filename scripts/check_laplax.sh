#!/usr/bin/env bash
# Cross-checks the full-covariance Laplace posterior against laplax (tests/test_laplax_crosscheck.py).
#
#   scripts/check_laplax.sh                    # laplax==0.0.2, the version whose conventions the test maps
#   LAPLAX_SPEC="laplax>=0.0.2" scripts/check_laplax.sh   # try another laplax
#   LAPLAX_VENV=/tmp/my_env REUSE=1 scripts/check_laplax.sh   # rerun in an existing environment
#   scripts/check_laplax.sh -v -k evidence     # extra arguments go to pytest
#
# laplax is not a test dependency (the main suite skips the module: `pytest.importorskip("laplax")`),
# so this script
# 1. creates a fresh virtual environment (default /tmp/neuron_optax_laplax; set LAPLAX_VENV; REUSE=1
#    keeps an existing one and only runs step 3),
# 2. installs this checkout editable with its test extra (`-e ".[test]"`) plus laplax,
# 3. runs the cross-check in float64: a 31-parameter MLP (softmax cross-entropy) and a 26-parameter
#    one (squared error), the whole 12-point data set as the Fisher batch, comparing our GGN/Fisher,
#    posterior covariance (damped_fisher_solve and laplace_sample_from_noise), laplace_sample's sample
#    covariance, the log marginal likelihood and tune_prior_precision with laplax.laplace(...,
#    curv_type="full") and laplax.eval.marginal_log_likelihood. The conventions mapped (laplax's
#    summed GGN vs our per-example mean times dataset_size, its 2x MSE Hessian, its evidence's
#    likelihood term) are documented at the top of the test module.
# Needs network access to PyPI (or a pip cache) and the python given by $PYTHON (default python3,
# >= 3.11). The test itself takes about a minute on 2 cores; installing takes a few more.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${LAPLAX_VENV:-/tmp/neuron_optax_laplax}"
LAPLAX_SPEC="${LAPLAX_SPEC:-laplax==0.0.2}"

if [ "${REUSE:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" "$LAPLAX_SPEC"
fi
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|numpy|laplax) '
cd "$ROOT"
# addopts="" drops the project's `-n auto` (pytest-xdist): one process compiles each program once.
"$VENV/bin/python" -m pytest tests/test_laplax_crosscheck.py -q -o addopts="" -p no:cacheprovider "$@"
