"""Independent checks of models written by onnx-idprune.

For each pair ORIGINAL OUTPUT given on the command line:
  * onnx.checker.check_model(OUTPUT, full_check=True) — the reference checker
    with strict shape inference, reading external data itself;
  * ONNX Runtime (the Python package, not the Rust binding) runs ORIGINAL and
    OUTPUT on the same inputs; outputs must be bit-identical (--exact) or
    agree to --rtol.

Inputs come from --calib (arrays named after the graph inputs, the first
--samples rows). Prints one line per pair; exits 1 if any check fails.
"""

import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feed(sess, calib, samples):
    inputs = {}
    for meta in sess.get_inputs():
        array = calib[meta.name][:samples]
        static = meta.shape[0]
        if isinstance(static, int) and static > 0:
            array = calib[meta.name][:static]
        inputs[meta.name] = array
    return inputs


def compare(name, a, b, exact, rtol):
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{name}: shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    if exact:
        same = np.array_equal(a.view(np.uint8), b.view(np.uint8))
        return None if same else f"{name}: outputs differ (max abs diff {np.max(np.abs(a - b)):.3g})"
    scale = max(float(np.max(np.abs(a))), 1e-12)
    err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / scale
    return None if err <= rtol else f"{name}: relative error {err:.3g} > {rtol}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="+", help="ORIGINAL OUTPUT [ORIGINAL OUTPUT ...]")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--exact", action="store_true")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--no-compare", action="store_true",
                        help="only check OUTPUT and run it (it computes another function, e.g. after pruning)")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give ORIGINAL OUTPUT pairs")
    calib = np.load(args.calib)
    failures = 0
    for original, output in zip(args.pairs[::2], args.pairs[1::2]):
        problems = []
        try:
            onnx.checker.check_model(output, full_check=True)
        except Exception as e:  # the checker raises several exception types
            problems.append(f"onnx.checker: {str(e).splitlines()[0]}")
        try:
            ref, got = session(original), session(output)
            inputs = feed(ref, calib, args.samples)
            names = [o.name for o in ref.get_outputs()]
            if names != [o.name for o in got.get_outputs()]:
                problems.append("output names differ")
            results = got.run(None, inputs)
            if args.no_compare:
                problems.extend(f"{n}: not finite" for n, r in zip(names, results) if not np.all(np.isfinite(r)))
            else:
                for name, a, b in zip(names, ref.run(None, inputs), results):
                    problem = compare(name, a, b, args.exact, args.rtol)
                    if problem:
                        problems.append(problem)
        except Exception as e:
            problems.append(f"onnxruntime: {str(e).splitlines()[0]}")
        status = "ok" if not problems else "FAIL " + "; ".join(problems)
        print(f"{output}: {status}")
        failures += bool(problems)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
