#!/usr/bin/env bash
# Installs the ONNX Runtime shared library from the PyPI `onnxruntime` wheel
# into .ort/ (git-ignored) and links .ort/lib/libonnxruntime.so to it.
# Idempotent: does nothing when the pinned version is already there.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.31.1}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.ort"
stamp="$dest/installed-$ORT_VERSION"
if [[ -f "$stamp" && -e "$dest/lib/libonnxruntime.so" ]]; then
  exit 0
fi
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "install-ort: python3 with pip is needed to fetch the onnxruntime wheel" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
echo "install-ort: installing onnxruntime $ORT_VERSION from PyPI into $dest" >&2
"$python" -m pip install --quiet --disable-pip-version-check --no-deps \
  --target "$dest/pkg" "onnxruntime==$ORT_VERSION"
capi="$dest/pkg/onnxruntime/capi"
lib="$(ls "$capi"/libonnxruntime.so.* 2>/dev/null | head -n 1)"
[[ -n "$lib" ]] || { echo "install-ort: the wheel has no libonnxruntime.so in $capi" >&2; exit 1; }
# The provider libraries sit next to libonnxruntime.so and are found from
# its folder, so link the folder rather than copying the library.
ln -sfn "pkg/onnxruntime/capi" "$dest/lib"
ln -sfn "$(basename "$lib")" "$capi/libonnxruntime.so"
touch "$stamp"
echo "install-ort: $dest/lib/libonnxruntime.so -> $(basename "$lib")" >&2
