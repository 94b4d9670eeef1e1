#!/usr/bin/env python3
"""Round-trip I/O benchmark: onnx-idprune vs copying the file vs Python onnx.

Usage: python benches/io_roundtrip.py MODEL [MODEL ...] [--runs N] [--binary PATH]

For each model, with a warm page cache, runs N times each (median reported):
  cp        `cp MODEL copy.onnx` — the floor: read + write every byte;
  idprune   `onnx-idprune MODEL out.onnx --plan <empty plan>` (load, IR,
            save; a faithful round trip);
  onnx      `onnx.load(MODEL)` + `onnx.save(model, out.onnx)` in a fresh
            Python process (import time excluded: measured inside).
Peak RSS is the child's ru_maxrss (os.wait4), so each tool is measured in
its own process. Prints a Markdown table with ratios to cp and to the file
size. Outputs go next to the model and are deleted afterwards.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONNX_SNIPPET = """
import sys, time, onnx
t = time.perf_counter()
m = onnx.load(sys.argv[1])
onnx.save(m, sys.argv[2])
print(time.perf_counter() - t)
"""


def run(cmd):
    """Runs cmd, returns (wall seconds, peak RSS bytes, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}): {err.strip()}")
    return wall, usage.ru_maxrss * 1024, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/onnx-idprune"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    plan = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    plan.write('{"format": "onnx-idprune-plan", "version": 1, "blocks": []}')
    plan.close()
    results = []
    for model in args.models:
        size = os.path.getsize(model)
        folder = os.path.dirname(os.path.abspath(model))
        out = os.path.join(folder, ".bench-out.onnx")
        with open(model, "rb") as f:  # warm the page cache
            while f.read(1 << 24):
                pass
        tools = {
            "cp": lambda: run(["cp", model, out]),
            "onnx-idprune": lambda: run([args.binary, model, out, "--plan", plan.name]),
            "python onnx": lambda: run([sys.executable, "-c", ONNX_SNIPPET, model, out]),
        }
        row = {"model": os.path.basename(model), "bytes": size}
        for name, fn in tools.items():
            walls, rss = [], []
            for _ in range(args.runs):
                wall, peak, stdout = fn()
                if name == "python onnx":
                    wall = float(stdout.strip().splitlines()[-1])  # excludes interpreter start-up
                walls.append(wall)
                rss.append(peak)
                os.remove(out)
            row[name] = {"seconds": statistics.median(walls), "peak_rss": max(rss)}
        results.append(row)
    os.unlink(plan.name)

    print("| model | size | tool | wall (median) | × copy | peak RSS | × file size |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for row in results:
        base = row["cp"]["seconds"]
        for name in ("cp", "onnx-idprune", "python onnx"):
            r = row[name]
            print(
                f"| {row['model']} | {row['bytes'] / 1e6:.0f} MB | {name} | {r['seconds']:.3f} s "
                f"| {r['seconds'] / base:.2f} | {r['peak_rss'] / 1e6:.0f} MB | {r['peak_rss'] / row['bytes']:.2f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
