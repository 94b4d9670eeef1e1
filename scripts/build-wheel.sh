#!/usr/bin/env bash
# Builds the Python wheel (abi3: one wheel for CPython 3.9 and later) of the
# `onnx_idprune` module and `onnx-idprune` command into target/wheels/ (or
# the folder given), with maturin from PyPI installed into .venv-build/
# (git-ignored). Prints the wheel's path on the last line.
#
# WHEEL_PROFILE picks the Cargo profile (default release, the wheel to ship).
# The test command builds with `dev`: the same source, compiled as the
# crate's tests are (dependencies fully optimised; debug assertions on, so
# every rewrite pass is validated too), reusing their build instead of a
# second full optimised build of every dependency.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-$root/target/wheels}"
MATURIN_VERSION="${MATURIN_VERSION:-1.16.0}"
venv="$root/.venv-build"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "build-wheel: python3 with pip is needed" >&2; exit 1; }
if [[ ! -x "$venv/bin/maturin" ]] || ! "$venv/bin/maturin" --version | grep -qF "$MATURIN_VERSION"; then
  echo "build-wheel: installing maturin $MATURIN_VERSION into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "maturin==$MATURIN_VERSION"
fi
mkdir -p "$out"
# Only this build's wheel in the listing below: an older one of the same
# version would be overwritten anyway.
rm -f "$out"/onnx_idprune-*.whl
profile="${WHEEL_PROFILE:-release}"
"$venv/bin/maturin" build --profile "$profile" --locked --manifest-path python/Cargo.toml \
  --interpreter "$venv/bin/python" --out "$out" >&2
ls "$out"/onnx_idprune-*.whl
