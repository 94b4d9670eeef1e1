#!/usr/bin/env bash
# Creates .venv (git-ignored) with the Python packages the tests use as
# independent references (onnx, onnxruntime, numpy; tests/requirements.txt).
# Idempotent: reinstalls only when the requirements change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
requirements="$root/tests/requirements.txt"
stamp="$venv/.requirements"
if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$requirements" "$stamp"; then
  exit 0
fi
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "install-python-env: python3 is needed" >&2; exit 1; }
echo "install-python-env: creating $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
