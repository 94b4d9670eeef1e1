#!/usr/bin/env bash
# The speed suite: cargo micro-benchmarks, the k-d tree / GEMM crossover,
# and onnx-idprune next to its Python anchors (onnx load+save,
# scikit-dimension TwoNN, onnxsim block pruning, plain ONNX Runtime
# inference) on the trained fixture. Installs what it needs (.ort/,
# .venv-bench/). Extra arguments go to benches/anchors.py (e.g. --model
# target/bench/clip_b32.onnx --calib target/bench/b32_calib.npz).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-ort.sh
scripts/install-bench-env.sh
venv="$root/.venv-bench"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(ls "$root"/.ort/lib/libonnxruntime.so* | head -1)}"
cargo build --release --locked
echo "## machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%F)"
echo "## cargo bench --bench micro"
cargo bench --locked --bench micro
echo "## cargo bench --bench knn"
cargo bench --locked --bench knn
echo "## anchors"
"$venv/bin/python" benches/anchors.py "$@"
