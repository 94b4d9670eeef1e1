"""Independent checks of a model folder written by onnx-idprune.

Usage: check_folder.py ORIGINAL_DIR OUTPUT_DIR --calib c.npz --files a.onnx,b.onnx

  * onnx.checker.check_model(full_check=True) on every pruned file;
  * the pruned files keep the originals' graph inputs and outputs (names,
    element types);
  * ONNX Runtime (the Python package) runs the files in the order given, as
    a deployment chains them: a file input missing from the calibration
    data (a decoder's encoder_hidden_states) is fed from an earlier file's
    last_hidden_state. Every output of the pruned chain must have the
    original's shape and a mean per-sample cosine of at least --min-cosine.

Prints one line per file; exits 1 if any check fails.
"""

import argparse
import os
import sys

import numpy as np
import onnx


from onnx_files import interface, session


def chain(folder, files, calib, samples):
    values = {k: calib[k][:samples] for k in calib.files}
    outputs = {}
    for name in files:
        sess = session(os.path.join(folder, name))
        feed = {}
        for meta in sess.get_inputs():
            if meta.name in values:
                feed[meta.name] = values[meta.name]
            elif meta.name == "encoder_hidden_states":
                feed[meta.name] = values["last_hidden_state"]
            else:
                raise SystemExit(f"{name}: no data for input {meta.name}")
        for meta, value in zip(sess.get_outputs(), sess.run(None, feed)):
            values[meta.name] = value
            outputs[(name, meta.name)] = value
    return outputs


def mean_cosine(a, b):
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("original")
    parser.add_argument("output")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--files", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--min-cosine", type=float, default=0.9)
    args = parser.parse_args()
    files = args.files.split(",")
    calib = np.load(args.calib)
    failed = False
    for name in files:
        problems = []
        path = os.path.join(args.output, name)
        try:
            onnx.checker.check_model(path, full_check=True)
        except Exception as e:  # noqa: BLE001 - report any checker failure
            problems.append(f"checker: {str(e).splitlines()[0]}")
        if interface(path) != interface(os.path.join(args.original, name)):
            problems.append(f"interface changed: {interface(path)}")
        if problems:
            failed = True
            print(f"{name}: " + "; ".join(problems))
    original = chain(args.original, files, calib, args.samples)
    pruned = chain(args.output, files, calib, args.samples)
    for name in files:
        problems = []
        for (file, output), a in original.items():
            if file != name:
                continue
            b = pruned[(file, output)]
            if a.shape != b.shape:
                problems.append(f"{output}: shape {a.shape} vs {b.shape}")
                continue
            cosine = mean_cosine(a, b)
            if not cosine >= args.min_cosine:
                problems.append(f"{output}: mean cosine {cosine:.4f} < {args.min_cosine}")
        failed |= bool(problems)
        print(f"{name}: " + ("; ".join(problems) if problems else "ok"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
