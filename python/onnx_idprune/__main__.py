"""The wheel's ``onnx-idprune`` command: the same command line as the cargo
build's binary (ONNX Runtime from the ``onnxruntime`` wheel unless
``--ort-lib`` or ``ORT_DYLIB_PATH`` says otherwise)."""

import sys

from . import _native


def main() -> None:
    # The command's own name in its messages, also under `python -m`.
    sys.exit(_native.main(["onnx-idprune", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
