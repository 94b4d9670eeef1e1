#!/usr/bin/env bash
# The main job on the bundled default model: installs ONNX Runtime, builds
# the release binary and runs it on the tiny CLIP fixture, writing into out/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-ort.sh
cargo build --locked --release
mkdir -p out
set -x
target/release/onnx-idprune fixtures/clip_tiny_torchscript_op17.onnx out/clip_tiny.onnx \
  --calib fixtures/calib/clip_tiny_calib.npz --keep-params 0.75 \
  --plan-out out/plan.json --report out/report.json
