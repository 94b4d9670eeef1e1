#!/usr/bin/env bash
# The quality study: zero-shot top-1 of the trained fixtures pruned by each
# method at several kept fractions (benches/study.py). Installs what it
# needs (.ort/, .venv-bench/); extra arguments go to the script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-ort.sh
scripts/install-bench-env.sh
venv="$root/.venv-bench"
cargo build --release --locked
"$venv/bin/python" benches/study.py --json benches/study.json "$@"
