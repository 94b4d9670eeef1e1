#!/usr/bin/env python3
"""Quality study: zero-shot top-1 after pruning, per trained fixture, method
and kept fraction of transformer-block parameters, next to onnxsim 0.8.1's
structured pruning at the same kept fraction -- all in one run.

Usage: python benches/study.py [--fixtures trained trained_deep_text ...]
                               [--keeps 0.9 0.75 0.65 0.5 0.4] [--binary PATH]
                               [--json OUT.json] [--svg OUT.svg] [--markdown OUT.md]

Needs benches/requirements.txt (onnx, onnxruntime, numpy, onnxsim 0.8.1) and
a release build (cargo build --release).

Fixtures (fixtures/<name>/: the model, calib.npz, eval.py, eval.npz):
  trained            the development model: the one defaults were tuned on
  trained_deep_text  held out: text tower 12 blocks x 96, vision 4 x 192
  trained_wide_vision held out: vision 4 blocks x 256, text 4 x 96
Every method decides on the fixture's calib.npz only; eval.npz is touched by
the final accuracy measurement alone.

Methods:
  default        onnx-idprune with no flags but the budget (--mode all,
                 --repair lsq+bias: sub-blocks and heads/neurons, the split
                 between them and between the towers judged on decision
                 samples, least-squares refits and mean-output compensation)
  blocks         --mode blocks (sub-blocks only), score id (influence x ID)
  blocks-bi      --mode blocks --score bi (block influence alone, ShortGPT)
  blocks-mag     --mode blocks --score magnitude
  units          --mode units (heads and neurons only)
  symmetric      the default with the same kept fraction in each tower
  random         random sub-blocks to the budget, no repair (mean of 3 seeds)
  onnxsim-blocks onnxsim.apply_transformer_block_pruning with the calibration
                 samples, the number of sub-blocks closest to the budget
  onnxsim-wanda  onnxsim.apply_structured_wanda_pruning (MLP/projection
                 channels), sparsity searched to the budget
  onnxsim-wanda+bc  the same followed by onnxsim.correct_bias (its refit)
  onnxsim-heads  onnxsim.apply_attention_head_wanda_pruning, sparsity searched
                 to the budget (capped by what heads can give)

A cell is top-1 % (the kept fraction of block parameters actually reached);
a method that stays more than 0.05 above the asked fraction (it matched too
little to remove that much) shows "—" with what it reached.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = {
    "trained": "clip_trained.onnx",
    "trained_deep_text": "clip_deep_text.onnx",
    "trained_wide_vision": "clip_wide_vision.onnx",
}
ONNXSIM_SAMPLES = 32


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} … failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


class Fixture:
    def __init__(self, name, binary):
        self.name = name
        self.dir = os.path.join(ROOT, "fixtures", name)
        self.model = os.path.join(self.dir, FIXTURES[name])
        self.calib = os.path.join(self.dir, "calib.npz")
        self.eval = os.path.join(self.dir, "eval.py")
        self.binary = binary
        info = json.loads(run([binary, "inspect", self.model, "--json"]))
        self.towers = {t["name"]: sum(b["params"] for b in t["blocks"]) for t in info["towers"]}
        self.block_total = sum(self.towers.values())
        self.params = initializer_params(self.model)

    def top1(self, model):
        return json.loads(run([sys.executable, self.eval, model, "--json"]))["top1"]

    def kept(self, model):
        """Kept fraction of block parameters, from the initializers a node reads."""
        return 1 - (self.params - initializer_params(model)) / self.block_total


def initializer_params(model):
    import onnx

    m = onnx.load(model)
    used = {name for node in m.graph.node for name in node.input}
    return sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.name in used)


def ours(fx, tmp, name, flags):
    out = os.path.join(tmp, f"{fx.name}-{name}.onnx")
    report = os.path.join(tmp, f"{fx.name}-{name}.json")
    t0 = time.perf_counter()
    run([fx.binary, fx.model, out, "--calib", fx.calib, "--report", report, *flags])
    seconds = time.perf_counter() - t0
    with open(report) as f:
        rep = json.load(f)
    before, after = rep["params"]["towers_before"], rep["params"]["towers_after"]
    return {
        "top1": fx.top1(out),
        "kept": rep["params"]["blocks_kept"],
        "tower_kept": {t: after[t] / before[t] for t in before},
        "seconds": round(seconds, 2),
        "candidates": rep["candidates"],
    }


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


def random_cells(fx, tmp, keep, candidates):
    budget = (1 - keep) * fx.block_total
    accs, kepts = [], []
    for seed in range(3):
        plan = os.path.join(tmp, f"{fx.name}-random-{keep}-{seed}.json")
        with open(plan, "w") as f:
            json.dump(random_plan(candidates, budget, seed), f)
        out = os.path.join(tmp, f"{fx.name}-random-{keep}-{seed}.onnx")
        report = os.path.join(tmp, f"{fx.name}-random-{keep}-{seed}.report.json")
        run([fx.binary, fx.model, out, "--plan", plan, "--report", report])
        with open(report) as f:
            kepts.append(json.load(f)["params"]["blocks_kept"])
        accs.append(fx.top1(out))
    return {"top1": sum(accs) / 3, "kept": sum(kepts) / 3, "seeds": accs}


def onnxsim_calibration(fx):
    """The first ONNXSIM_SAMPLES calibration samples, one dict per sample
    batch of 8 (onnxsim takes a list of input batches)."""
    data = np.load(fx.calib)
    names = list(data.keys())
    n = min(ONNXSIM_SAMPLES, min(data[k].shape[0] for k in names))
    return [{k: data[k][i:i + 8] for k in names} for i in range(0, n, 8)]


def onnxsim_cell(fx, tmp, keep, label, make):
    """`make(sparsity)` returns a ModelProto; the sparsity is searched (by
    bisection, 7 steps) for the kept fraction closest to `keep`."""
    import onnx

    path = os.path.join(tmp, f"{fx.name}-{label}-{keep}.onnx")
    best = None
    lo, hi = 0.0, 0.99
    for _ in range(7):
        s = (lo + hi) / 2
        try:
            onnx.save(make(s), path)
        except Exception as e:  # noqa: BLE001 - a method that declines is a result
            return {"top1": None, "kept": None, "error": str(e)[:200]}
        kept = fx.kept(path)
        if best is None or abs(kept - keep) < abs(best[1] - keep):
            best = (s, kept)
        if kept > keep:
            lo = s
        else:
            hi = s
    onnx.save(make(best[0]), path)
    return {"top1": fx.top1(path), "kept": fx.kept(path), "sparsity": round(best[0], 4)}


def onnxsim_blocks(fx, tmp, keep, candidates, calibration):
    import onnx
    import onnxsim

    budget = (1 - keep) * fx.block_total
    mean_size = sum(c["params"] for c in candidates) / len(candidates)
    count = max(1, round(budget / mean_size))
    path = os.path.join(tmp, f"{fx.name}-onnxsim-blocks-{keep}.onnx")
    try:
        onnx.save(onnxsim.apply_transformer_block_pruning(
            fx.model, calibration_data=calibration, num_blocks_to_drop=count), path)
    except Exception as e:  # noqa: BLE001
        return {"top1": None, "kept": None, "error": str(e)[:200]}
    return {"top1": fx.top1(path), "kept": fx.kept(path), "sub_blocks": count}


def cell_text(c, keep=None):
    if c.get("top1") is None:
        return "n/a"
    if keep is not None and c["kept"] > keep + 0.05:
        # A method that could not remove this much is not compared at a
        # budget it did not reach.
        return f"— (reached {c['kept']:.2f})"
    return f"{c['top1'] * 100:.1f} ({c['kept']:.2f})"


def svg(study, keeps, path):
    panels = list(study.items())
    pw, ph, l, r, t, b = 520, 340, 55, 130, 30, 45
    w, h = pw * len(panels), ph
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
              "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for p, (name, fixture) in enumerate(panels):
        ox = p * pw
        x = lambda k: ox + l + (max(keeps) - k) / (max(keeps) - min(keeps) or 1) * (pw - l - r)
        y = lambda a: t + (1 - a) * (ph - t - b)
        out.append(f'<text x="{ox + pw / 2 - 40}" y="16" text-anchor="middle" font-size="13">{name} (unpruned {fixture["unpruned"] * 100:.1f}%)</text>')
        for a in [0, 0.25, 0.5, 0.75, 1.0]:
            out.append(f'<line x1="{ox + l}" x2="{ox + pw - r}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{ox + l - 5}" y="{y(a) + 4:.1f}" text-anchor="end">{a * 100:.0f}%</text>')
        for k in keeps:
            out.append(f'<text x="{x(k):.1f}" y="{ph - b + 15}" text-anchor="middle">{k:.2f}</text>')
        out.append(f'<text x="{ox + (l + pw - r) / 2}" y="{ph - 10}" text-anchor="middle">kept fraction of block parameters (asked)</text>')
        for i, (method, row) in enumerate(fixture["results"].items()):
            pts = [(x(k), y(row[str(k)]["top1"])) for k in keeps
                   if str(k) in row and row[str(k)].get("top1") is not None
                   and row[str(k)]["kept"] <= k + 0.05]
            c = colors[i % len(colors)]
            dash = ' stroke-dasharray="4 3"' if method.startswith("onnxsim") else ""
            out.append('<polyline fill="none" stroke="{}" stroke-width="2"{} points="{}"/>'.format(
                c, dash, " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)))
            for px, py in pts:
                out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{c}"/>')
            out.append(f'<text x="{ox + pw - r + 8}" y="{t + 14 * i + 8}" fill="{c}">{method}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def markdown(study, keeps, machine):
    lines = [f"Measured {machine}. Cells: zero-shot top-1 % (kept fraction of block parameters reached).", ""]
    for name, fixture in study.items():
        role = "development model" if name == "trained" else "held out (never tuned on)"
        lines.append(f"**{name}** ({role}; unpruned {fixture['unpruned'] * 100:.2f}%)")
        lines.append("")
        lines.append("| method | " + " | ".join(f"keep {k:.2f}" for k in keeps) + " |")
        lines.append("|---|" + "---:|" * len(keeps))
        for method, row in fixture["results"].items():
            lines.append(f"| {method} | " + " | ".join(cell_text(row.get(str(k), {}), k) for k in keeps) + " |")
        d = fixture["results"]["default"]
        shares = ", ".join(
            f"{k}: " + " / ".join(f"{t} {v * 100:.0f}%" for t, v in sorted(d[str(k)]["tower_kept"].items()))
            for k in keeps if str(k) in d)
        lines.append("")
        lines.append(f"Default mode, each tower's kept share: {shares}.")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fixtures", nargs="+", default=list(FIXTURES))
    p.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.75, 0.65, 0.5, 0.4])
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/onnx-idprune"))
    p.add_argument("--no-onnxsim", action="store_true")
    p.add_argument("--json", default=os.path.join(ROOT, "benches/study.json"))
    p.add_argument("--svg", default=os.path.join(ROOT, "benches/study.svg"))
    p.add_argument("--markdown", default=os.path.join(ROOT, "benches/study.md"))
    a = p.parse_args()
    import platform

    machine = f"on {platform.node() or 'this machine'} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}"
    study = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.fixtures:
            fx = Fixture(name, a.binary)
            base = fx.top1(fx.model)
            methods = {
                "default": lambda k: ["--keep-params", str(k)],
                "blocks": lambda k: ["--keep-params", str(k), "--mode", "blocks"],
                "blocks-bi": lambda k: ["--keep-params", str(k), "--mode", "blocks", "--score", "bi"],
                "blocks-mag": lambda k: ["--keep-params", str(k), "--mode", "blocks", "--score", "magnitude"],
                "units": lambda k: ["--keep-params", str(k), "--mode", "units"],
                "symmetric": lambda k: ["--vision-keep", str(k), "--text-keep", str(k)],
            }
            names = [*methods, "random"]
            if not a.no_onnxsim:
                names += ["onnxsim-blocks", "onnxsim-wanda", "onnxsim-wanda+bc", "onnxsim-heads"]
            results = {m: {} for m in names}
            calibration = None if a.no_onnxsim else onnxsim_calibration(fx)
            for keep in a.keeps:
                candidates = None
                for method, flags in methods.items():
                    cell = ours(fx, tmp, f"{method}-{keep}", flags(keep))
                    if method == "blocks":
                        candidates = cell["candidates"]
                    del cell["candidates"]
                    results[method][str(keep)] = cell
                    print(f"[{name} {keep}] {method}: {cell_text(cell)} {cell['seconds']} s", file=sys.stderr)
                results["random"][str(keep)] = random_cells(fx, tmp, keep, candidates)
                if a.no_onnxsim:
                    continue
                import onnxsim

                results["onnxsim-blocks"][str(keep)] = onnxsim_blocks(fx, tmp, keep, candidates, calibration)
                results["onnxsim-wanda"][str(keep)] = onnxsim_cell(
                    fx, tmp, keep, "onnxsim-wanda",
                    lambda s: onnxsim.apply_structured_wanda_pruning(
                        fx.model, calibration_data=calibration, sparsity=s))
                results["onnxsim-wanda+bc"][str(keep)] = onnxsim_cell(
                    fx, tmp, keep, "onnxsim-wanda-bc",
                    lambda s: onnxsim.correct_bias(
                        fx.model,
                        onnxsim.apply_structured_wanda_pruning(
                            fx.model, calibration_data=calibration, sparsity=s),
                        calibration_data=calibration))
                results["onnxsim-heads"][str(keep)] = onnxsim_cell(
                    fx, tmp, keep, "onnxsim-heads",
                    lambda s: onnxsim.apply_attention_head_wanda_pruning(
                        fx.model, calibration_data=calibration, sparsity=s))
                for m in ["random", "onnxsim-blocks", "onnxsim-wanda", "onnxsim-wanda+bc", "onnxsim-heads"]:
                    print(f"[{name} {keep}] {m}: {cell_text(results[m][str(keep)])}", file=sys.stderr)
            study[name] = {"unpruned": base, "results": results}
            with open(a.json, "w") as f:
                json.dump({"machine": machine, "keeps": a.keeps, "study": study}, f, indent=1)
    text = markdown(study, a.keeps, machine)
    print(text)
    with open(a.markdown, "w") as f:
        f.write(text + "\n")
    svg(study, a.keeps, a.svg)


if __name__ == "__main__":
    main()
