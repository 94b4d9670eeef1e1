#!/usr/bin/env bash
# The speed suite: cargo micro-benchmarks, the k-d tree / GEMM crossover,
# and onnx-idprune next to its Python anchors (onnx load+save,
# scikit-dimension TwoNN, onnxsim block pruning, plain ONNX Runtime
# inference, the main job against plain inference with peak RSS) on the
# trained fixture. Installs what it needs (.ort/, .venv-bench/). Extra
# arguments go to benches/anchors.py (e.g. --runs 1).
#
#   scripts/bench.sh --real-size [ARGS]   the anchors on CLIP ViT-B/32 instead:
#       exported with transformers' defaults into target/bench/ (about 600 MB,
#       generated on demand by benches/make_real_size.py in .venv-fixtures/,
#       which installs fixtures/requirements.txt: torch, transformers) with
#       256 seeded calibration samples (192 decide, 64 verify)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-ort.sh
scripts/install-bench-env.sh
venv="$root/.venv-bench"
anchor_args=()
if [[ "${1:-}" == "--real-size" ]]; then
  shift
  bench="$root/target/bench"
  if [[ ! -f "$bench/clip_b32_torchscript_op17.onnx" || ! -f "$bench/clip_b32_calib.npz" ]]; then
    fixtures_venv="$root/.venv-fixtures"
    if ! cmp -s fixtures/requirements.txt "$fixtures_venv/.requirements" 2>/dev/null; then
      "${PYTHON:-python3}" -m venv "$fixtures_venv"
      "$fixtures_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r fixtures/requirements.txt
      cp fixtures/requirements.txt "$fixtures_venv/.requirements"
    fi
    "$fixtures_venv/bin/python" benches/make_real_size.py "$bench" --calib 256
  fi
  anchor_args=(--model "$bench/clip_b32_torchscript_op17.onnx" --calib "$bench/clip_b32_calib.npz" --samples 256)
fi
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(ls "$root"/.ort/lib/libonnxruntime.so* | head -1)}"
cargo build --release --locked
echo "## machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%F)"
echo "## cargo bench --bench micro"
cargo bench --locked --bench micro
echo "## cargo bench --bench knn"
cargo bench --locked --bench knn
echo "## anchors"
# (the +-form: an empty array under set -u is an error before bash 4.4)
"$venv/bin/python" benches/anchors.py ${anchor_args[@]+"${anchor_args[@]}"} "$@"
