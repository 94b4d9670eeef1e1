#!/usr/bin/env bash
# Creates .venv-bench (git-ignored) with the Python anchors of the speed
# suite and the quality study (benches/requirements.txt). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-bench"
requirements="$root/benches/requirements.txt"
if [[ -x "$venv/bin/python" ]] && cmp -s "$requirements" "$venv/.requirements"; then
  exit 0
fi
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$venv/.requirements"
