#!/usr/bin/env bash
# The main job on the bundled default model: installs ONNX Runtime (and the
# Python evaluation packages), builds the release binary, prunes the trained
# CLIP fixture to 75% of its block parameters with its calibration set, and
# measures zero-shot top-1 on the held-apart evaluation set before and after.
# Writes into out/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-ort.sh
scripts/install-python-env.sh
cargo build --locked --release
mkdir -p out
model=fixtures/trained/clip_trained.onnx
set -x
target/release/onnx-idprune "$model" out/clip_pruned.onnx \
  --calib fixtures/trained/calib.npz --keep-params 0.75 \
  --plan-out out/plan.json --report out/report.json
.venv/bin/python fixtures/trained/eval.py "$model"
.venv/bin/python fixtures/trained/eval.py out/clip_pruned.onnx
