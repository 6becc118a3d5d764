#!/usr/bin/env bash
# Checks that the lowest dependency versions pyproject.toml allows really work.
#
#   scripts/check_version_floors.sh                       # the floors declared in pyproject.toml
#   scripts/check_version_floors.sh jax==0.8.2 optax==0.2.4   # try other candidates (override by name)
#
# 1. creates a fresh virtual environment (default /tmp/neuron_optax_floors; set FLOORS_VENV),
# 2. installs every runtime dependency of pyproject.toml pinned to its floor (`name>=X` -> `name==X`),
#    with any NAME==VERSION arguments replacing the pin of that name (pip resolves the transitive
#    dependencies, e.g. flax's orbax-checkpoint, to versions compatible with the pins),
# 3. installs this package with --no-deps (a non-editable build of the checkout),
# 4. runs `pip check` (only reported when trying candidates) and scripts/smoke_test.py (every transform with linen and NNX capture, a few
#    training steps each, asserting a finite, decreasing loss) from outside the checkout, so the
#    installed package is what is tested.
# Needs network access to PyPI (or a pip cache) and the python given by $PYTHON (default python3).
# Takes 2-4 minutes, most of it downloading and installing jaxlib.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${FLOORS_VENV:-/tmp/neuron_optax_floors}"

# The floors, read from pyproject.toml (Python >= 3.11 has tomllib), overridden by the arguments.
mapfile -t PINS < <("$PYTHON" - "$ROOT/pyproject.toml" "$@" <<'EOF'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
  dependencies = tomllib.load(f)["project"]["dependencies"]
overrides = {}
for arg in sys.argv[2:]:
  name, sep, version = arg.partition("==")
  if not sep or not version:
    sys.exit(f"arguments must be NAME==VERSION, got {arg!r}")
  overrides[name.lower()] = arg
pins = []
for requirement in dependencies:
  match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*", requirement)
  if not match:
    sys.exit(f"cannot find a floor in the dependency {requirement!r}: expected NAME>=VERSION")
  name = match.group(1).lower()
  pins.append(overrides.pop(name, f"{name}=={match.group(2)}"))
pins += overrides.values()  # extra pins, e.g. of a transitive dependency
print("\n".join(pins))
EOF
)

echo "== pins: ${PINS[*]}"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
"$VENV/bin/python" -m pip install --quiet --no-deps "$ROOT"
if [ $# -eq 0 ]; then
  "$VENV/bin/python" -m pip check
else  # candidates below the declared floors make neuron_optax's own requirements fail: report only
  "$VENV/bin/python" -m pip check || echo "(pip check failed; expected for candidates below the declared floors)"
fi
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|chex|numpy|scipy|ml.dtypes|orbax-checkpoint) '
# Run from an empty directory so that `import neuron_optax` finds the installed copy, not the checkout.
cd "$(mktemp -d)"
"$VENV/bin/python" "$ROOT/scripts/smoke_test.py"
echo "== floors OK: ${PINS[*]}"
