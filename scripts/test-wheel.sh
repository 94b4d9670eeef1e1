#!/usr/bin/env bash
# Builds the wheel, installs it into a fresh virtual environment
# (.venv-wheel, git-ignored, recreated every run) with nothing else but the
# test suite's packages, and runs python/tests there. ONNX_IDPRUNE_CLI names
# the command the module is compared with (default: the wheel's own).
# The wheel is built with the dev profile (WHEEL_PROFILE=release for the
# wheel to ship): the release wheel's source with debug assertions on, built
# from what the crate's tests compiled.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
wheel="$(WHEEL_PROFILE="${WHEEL_PROFILE:-dev}" scripts/build-wheel.sh | tail -n 1)"
venv="$root/.venv-wheel"
python="${PYTHON:-python3}"
rm -rf "$venv"
"$python" -m venv "$venv"
# ONNX Runtime, onnx and numpy at the versions the Rust tests use.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c tests/requirements.txt -r python/tests/requirements.txt "$wheel"
# Run from outside the source tree, so `import onnx_idprune` is the
# installed wheel and not python/onnx_idprune.
cd "$venv"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/python/tests"
