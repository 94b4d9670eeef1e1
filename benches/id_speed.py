#!/usr/bin/env python3
"""ID speed: onnx-idprune `id --data` vs scikit-dimension TwoNN, same data, same run.

Usage: python benches/id_speed.py [--n 2000] [--dim 38400] [--binary PATH]

Makes a seeded matrix (a 12-dimensional Gaussian pushed through a fixed
nonlinear map into DIM dimensions, like flattened layer activations: 50
tokens x 768 channels = 38400), writes it as float32 .npy, then times
scikit-dimension's TwoNN().fit (including its neighbour search) and the
onnx-idprune binary (including reading the file). Prints both estimates,
both times and the speed-up.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import skdim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--dim", type=int, default=38400)
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/onnx-idprune"))
    a = p.parse_args()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((a.n, 12))
    features = np.concatenate([z, np.tanh(z), z ** 2], axis=1)
    x = (features @ rng.standard_normal((features.shape[1], a.dim))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, x)
        t = time.perf_counter()
        ref = skdim.id.TwoNN().fit(x).dimension_
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        out = subprocess.run([a.binary, "id", "--data", path, "--json"], check=True, capture_output=True, text=True)
        t_ours = time.perf_counter() - t
    ours = json.loads(out.stdout)["id"]
    print(f"N={a.n} D={a.dim}: scikit-dimension {ref:.4f} in {t_ref:.2f} s; onnx-idprune {ours:.4f} in {t_ours:.2f} s; "
          f"speed-up {t_ref / t_ours:.2f}x; relative difference {abs(ours - ref) / ref:.1e}")


if __name__ == "__main__":
    main()
