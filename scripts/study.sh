#!/usr/bin/env bash
# The quality study: zero-shot top-1 of the trained fixture pruned by each
# method at several kept fractions (benches/study.py). Installs what it
# needs (.ort/, .venv-bench/); extra arguments go to the script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-ort.sh
venv="$root/.venv-bench"
if [[ ! -x "$venv/bin/python" ]] || ! cmp -s benches/requirements.txt "$venv/.requirements"; then
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r benches/requirements.txt
  cp benches/requirements.txt "$venv/.requirements"
fi
cargo build --release --locked
"$venv/bin/python" benches/study.py --json benches/study.json "$@"
