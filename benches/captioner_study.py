#!/usr/bin/env python3
"""Quality study of the trained captioner: caption accuracy after pruning its folder
(vision encoder + text decoder, pruned as one model), per budget and per tower, in one run.

Usage: python benches/captioner_study.py [--keeps 0.9 0.75 0.6 0.5] [--binary PATH]
                                         [--json OUT.json] [--markdown OUT.md]

Needs numpy and onnxruntime (tests/requirements.txt has both) and a build of onnx-idprune
(default: target/release/onnx-idprune, else target/debug/onnx-idprune).

For every kept fraction F of block parameters:
  joint        onnx-idprune FOLDER OUT --calib calib.npz --keep-params F: one decision over both
               towers (the default mode and repair)
  vision only  --vision-keep F --text-keep 1: the decoder kept whole
  text only    --vision-keep 1 --text-keep F: the vision encoder kept whole
Each pruned folder is scored by fixtures/trained_captioner/eval.py on eval.npz (960 images the
decisions never see): the shares of greedy captions naming the colour, the shape, the position
and all three right. The report's held-out next-token agreement and greedy-caption agreement
(on the calibration file's last 64 samples) are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "fixtures", "trained_captioner")
sys.path.insert(0, FIXTURE)
from eval import folder_accuracy  # noqa: E402


def binary(given):
    if given:
        return given
    for profile in ("release", "debug"):
        path = os.path.join(ROOT, "target", profile, "onnx-idprune")
        if os.path.exists(path):
            return path
    raise SystemExit("no onnx-idprune build: cargo build --release")


def prune(tool, flags, work):
    out = tempfile.mkdtemp(dir=work)
    os.rmdir(out)
    report = out + ".json"
    start = time.time()
    subprocess.run([tool, os.path.join(FIXTURE, "model"), out, "--calib",
                    os.path.join(FIXTURE, "calib.npz"), "--report", report, *flags],
                   check=True, capture_output=True, text=True)
    seconds = time.time() - start
    with open(report) as f:
        rep = json.load(f)
    return out, rep, seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.75, 0.6, 0.5])
    parser.add_argument("--binary")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    tool = binary(args.binary)
    eval_path = os.path.join(FIXTURE, "eval.npz")
    rows = [{"method": "original", "keep": 1.0, "kept": 1.0,
             **folder_accuracy(os.path.join(FIXTURE, "model"), eval_path)}]
    with tempfile.TemporaryDirectory() as work:
        for keep in args.keeps:
            for method, flags in [
                ("joint", ["--keep-params", str(keep)]),
                ("vision only", ["--vision-keep", str(keep), "--text-keep", "1"]),
                ("text only", ["--vision-keep", "1", "--text-keep", str(keep)]),
            ]:
                out, rep, seconds = prune(tool, flags, work)
                towers = rep["params"]
                row = {"method": method, "keep": keep, "kept": rep["params"]["blocks_kept"],
                       "vision_kept": towers["towers_after"]["vision"] / towers["towers_before"]["vision"],
                       "text_kept": towers["towers_after"]["text"] / towers["towers_before"]["text"],
                       "next_token_agreement": rep["fidelity"].get("next_token_agreement"),
                       "greedy_exact": (rep["fidelity"].get("captions") or {}).get("exact_match"),
                       "seconds": round(seconds, 2),
                       **folder_accuracy(out, eval_path)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| method | asked | kept (vision / text) | colour | shape | position | all three "
             "| held-out next-token agr. | greedy captions identical |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"
    for r in rows:
        split = "" if r["method"] == "original" else f" ({pct(r['vision_kept'])} / {pct(r['text_kept'])})"
        lines.append(f"| {r['method']} | {r['keep']:.2f} | {pct(r['kept'])}{split} | {pct(r['color'])} "
                     f"| {pct(r['shape'])} | {pct(r['position'])} | {pct(r['all_three'])} "
                     f"| {pct(r.get('next_token_agreement'))} | {pct(r.get('greedy_exact'))} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
