#!/usr/bin/env python3
"""Quality study on the trained fixture: zero-shot top-1 after pruning, per
method and kept fraction of transformer-block parameters.

Usage: python benches/study.py [--keeps 0.9 0.75 0.65 0.5] [--samples 448]
                               [--binary PATH] [--json OUT.json] [--svg OUT.svg]

Methods (each decides on fixtures/trained/calib.npz only; fixtures/trained/
eval.npz is touched only by the final accuracy measurement):

  id            the default: sub-blocks, block influence x ID, one global
                threshold over both towers (asymmetric)
  id-symmetric  the same scores, but the same kept fraction in each tower
                (--vision-keep F --text-keep F)
  bi            block influence alone (ShortGPT)
  magnitude     mean |w| of the sub-block alone
  random        random sub-blocks until the budget is met (mean of 3 seeds)
  onnxsim       onnxsim.apply_transformer_block_pruning (8 random calibration
                batches, its default) dropping the number of sub-blocks whose
                parameters come closest to the budget
  units+lsq     heads and MLP neurons, activation-aware x ID, least-squares repair
  all+lsq       sub-blocks and units, split chosen on calibration samples, repair

Prints a Markdown table (top-1 %, and the share of each tower's block
parameters removed for the ID-guided rows) and writes an SVG plot.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = os.path.join(ROOT, "fixtures/trained")
MODEL = os.path.join(TRAINED, "clip_trained.onnx")
CALIB = os.path.join(TRAINED, "calib.npz")
EVAL = os.path.join(TRAINED, "eval.py")

ONNXSIM = """
import sys, onnx, onnxsim
m = onnx.load(sys.argv[1])
out = onnxsim.apply_transformer_block_pruning(m, num_samples=8, num_blocks_to_drop=int(sys.argv[3]))
onnx.save(out, sys.argv[2])
"""


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:4]))} … failed: {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def top1(model):
    return json.loads(run([sys.executable, EVAL, model, "--json"]))["top1"]


def block_params(model):
    """(vision, text) block parameters per `inspect --json`."""
    info = json.loads(run([BINARY, "inspect", model, "--json"]))
    return {t["name"]: sum(b["params"] for b in t["blocks"]) for t in info["towers"]}


def initializer_params(model):
    import numpy as np
    import onnx

    m = onnx.load(model)
    # Only initializers some node reads: a tool may leave dead ones behind.
    used = {name for node in m.graph.node for name in node.input}
    return sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.name in used)


def ours(tmp, name, keep, flags, samples):
    out = os.path.join(tmp, f"{name}-{keep}.onnx")
    report = os.path.join(tmp, f"{name}-{keep}.json")
    run([BINARY, MODEL, out, "--calib", CALIB, "--samples", str(samples), "--report", report, *flags])
    with open(report) as f:
        rep = json.load(f)
    before, after = rep["params"]["towers_before"], rep["params"]["towers_after"]
    removed = {t: 1 - after[t] / before[t] for t in before}
    return top1(out), rep["params"]["blocks_kept"], removed, rep


def random_plan(candidates, budget, seed):
    rng = random.Random(seed)
    order = list(range(len(candidates)))
    rng.shuffle(order)
    removed, gone = 0, set()
    for i in order:
        if removed >= budget:
            break
        c = candidates[i]
        # Keep one sub-block of each kind per tower, like the tool does.
        same = [j for j, o in enumerate(candidates)
                if o["tower"] == c["tower"] and o["part"] == c["part"] and j not in gone]
        if len(same) <= 1:
            continue
        gone.add(i)
        removed += c["params"]
    blocks = {}
    for i in gone:
        c = candidates[i]
        blocks.setdefault((c["tower"], c["block"]), set()).add(c["part"])
    entries = []
    for (tower, block), parts in sorted(blocks.items()):
        e = {"tower": tower, "index": block}
        if parts == {"attention", "mlp"}:
            e["drop"] = True
        elif parts == {"attention"}:
            e["drop_attention"] = True
        else:
            e["drop_mlp"] = True
        entries.append(e)
    return {"format": "onnx-idprune-plan", "version": 1, "blocks": entries}


def svg(results, keeps, path):
    w, h, l, r, t, b = 640, 380, 60, 150, 20, 50
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    lo = 0.0
    x = lambda k: l + (max(keeps) - k) / (max(keeps) - min(keeps) or 1) * (w - l - r)
    y = lambda a: t + (1 - (a - lo) / (1 - lo)) * (h - t - b)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for a in [0, 0.25, 0.5, 0.75, 1.0]:
        out.append(f'<line x1="{l}" x2="{w - r}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{l - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{a * 100:.0f}%</text>')
    for k in keeps:
        out.append(f'<text x="{x(k):.1f}" y="{h - b + 16}" text-anchor="middle">{k:.2f}</text>')
    out.append(f'<text x="{(l + w - r) / 2}" y="{h - 12}" text-anchor="middle">kept fraction of block parameters (requested)</text>')
    out.append(f'<text x="14" y="{(t + h - b) / 2}" transform="rotate(-90 14 {(t + h - b) / 2})" text-anchor="middle">zero-shot top-1</text>')
    for i, (method, row) in enumerate(results.items()):
        pts = [(x(k), y(row[k]["top1"])) for k in keeps if k in row]
        c = colors[i % len(colors)]
        out.append('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>'.format(
            c, " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)))
        for px, py in pts:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{c}"/>')
        out.append(f'<text x="{w - r + 10}" y="{t + 16 * i + 10}" fill="{c}">{method}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    global BINARY
    p = argparse.ArgumentParser()
    p.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.75, 0.65, 0.5])
    p.add_argument("--samples", type=int, default=448)
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/onnx-idprune"))
    p.add_argument("--json")
    p.add_argument("--svg", default=os.path.join(ROOT, "benches/study.svg"))
    a = p.parse_args()
    BINARY = a.binary
    base = top1(MODEL)
    towers = block_params(MODEL)
    total_blocks = sum(towers.values())
    total_params = initializer_params(MODEL)
    variants = {
        "id": lambda k: ["--keep-params", str(k)],
        "id-symmetric": lambda k: ["--vision-keep", str(k), "--text-keep", str(k)],
        "bi": lambda k: ["--keep-params", str(k), "--score", "bi"],
        "magnitude": lambda k: ["--keep-params", str(k), "--score", "magnitude"],
        "units+lsq": lambda k: ["--keep-params", str(k), "--mode", "units", "--repair", "lsq"],
        "all+lsq": lambda k: ["--keep-params", str(k), "--mode", "all", "--repair", "lsq"],
    }
    results = {m: {} for m in [*variants, "random", "onnxsim"]}
    with tempfile.TemporaryDirectory() as tmp:
        for keep in a.keeps:
            candidates = None
            for name, flags in variants.items():
                acc, kept, removed, rep = ours(tmp, name, keep, flags(keep), a.samples)
                results[name][keep] = {"top1": acc, "kept": kept, "removed": removed}
                if name == "id":
                    candidates = rep["candidates"]
                print(f"[{keep}] {name}: top-1 {acc:.4f}, kept {kept:.3f}, removed {removed}", file=sys.stderr)
            budget = (1 - keep) * total_blocks
            accs, kepts = [], []
            for seed in range(3):
                plan = os.path.join(tmp, f"random-{keep}-{seed}.json")
                with open(plan, "w") as f:
                    json.dump(random_plan(candidates, budget, seed), f)
                out = os.path.join(tmp, f"random-{keep}-{seed}.onnx")
                report = os.path.join(tmp, f"random-{keep}-{seed}.report.json")
                run([BINARY, MODEL, out, "--plan", plan, "--report", report])
                with open(report) as f:
                    kepts.append(json.load(f)["params"]["blocks_kept"])
                accs.append(top1(out))
            results["random"][keep] = {"top1": sum(accs) / 3, "kept": sum(kepts) / 3}
            print(f"[{keep}] random: {accs}", file=sys.stderr)
            # onnxsim drops sub-blocks by count: the count whose parameters
            # come closest to the budget (sub-blocks taken smallest first is
            # what its ranking cannot promise, so use the mean size).
            mean_size = sum(c["params"] for c in candidates) / len(candidates)
            count = max(1, round(budget / mean_size))
            out = os.path.join(tmp, f"onnxsim-{keep}.onnx")
            run([sys.executable, "-c", ONNXSIM, MODEL, out, str(count)])
            kept = 1 - (total_params - initializer_params(out)) / total_blocks
            results["onnxsim"][keep] = {"top1": top1(out), "kept": kept, "sub_blocks": count}
            print(f"[{keep}] onnxsim ({count} sub-blocks): {results['onnxsim'][keep]}", file=sys.stderr)
    print(f"Unpruned: top-1 {base * 100:.1f}%. Cells: top-1 % (kept fraction of block parameters).\n")
    print("| method | " + " | ".join(f"keep {k:.2f}" for k in a.keeps) + " |")
    print("|---|" + "---:|" * len(a.keeps))
    for method, row in results.items():
        cells = [f"{row[k]['top1'] * 100:.1f} ({row[k]['kept']:.2f})" for k in a.keeps]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nShare of each tower's block parameters removed (ID-guided, asymmetric):\n")
    print("| keep | vision removed | text removed |\n|---:|---:|---:|")
    for k in a.keeps:
        r = results["id"][k]["removed"]
        print(f"| {k:.2f} | {r.get('vision', 0) * 100:.1f}% | {r.get('text', 0) * 100:.1f}% |")
    svg(results, a.keeps, a.svg)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"unpruned": base, "results": {m: {str(k): v for k, v in r.items()} for m, r in results.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
