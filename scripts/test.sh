#!/usr/bin/env bash
# The test command: installs what the tests need (ONNX Runtime into .ort/,
# the reference Python packages into .venv/), then runs every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-ort.sh
scripts/install-python-env.sh
cargo test --locked --all-targets "$@"
cargo test --locked --doc
