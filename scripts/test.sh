#!/usr/bin/env bash
# The test command: installs what the tests need (ONNX Runtime into .ort/,
# the reference Python packages into .venv/), then runs every test: the
# crate's, its doc tests, and the Python wheel's in a fresh virtual
# environment, compared with the command the crate's tests built.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# Each step's wall time on stderr, so a slow CI run says where the time went.
step() {
  local label="$1" start=$SECONDS
  shift
  "$@"
  echo "test.sh: $label took $((SECONDS - start)) s" >&2
}
step "ONNX Runtime" scripts/install-ort.sh
step "Python references" scripts/install-python-env.sh
step "cargo test" cargo test --locked --all-targets "$@"
step "doc tests" cargo test --locked --doc
# The command the tests just built, wherever the target folder is.
cli="$(cargo build --locked --bin onnx-idprune --message-format=json-render-diagnostics |
  python3 -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin)
    if m.get("reason") == "compiler-artifact" and m.get("executable")][-1])')"
step "wheel" env ONNX_IDPRUNE_CLI="$cli" scripts/test-wheel.sh
