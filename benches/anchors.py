#!/usr/bin/env python3
"""onnx-idprune next to its Python anchors, on the same inputs, in one run.

Usage: python benches/anchors.py [--model M.onnx --calib C.npz] [--samples N]
                                 [--id-n 2000 --id-dim 38400] [--runs 3]
                                 [--binary PATH] [--json OUT.json]

Defaults: the trained fixture (fixtures/trained/clip_trained.onnx and its
calib.npz). Rows (median wall seconds of --runs runs, each tool in its own
process, page cache warm):

  load+save      onnx-idprune round trip (empty plan)  vs  onnx.load + onnx.save
  TwoNN          onnx-idprune id --data X.npy           vs  skdim.id.TwoNN().fit(X)
                 (X: a 12-d Gaussian pushed through a fixed nonlinear map into
                 --id-dim dimensions, float32, --id-n rows; both estimates shown)
  block pruning  onnx-idprune IN OUT --calib C --samples N --keep-params 0.75
                 --mode blocks (sub-blocks only, like the anchor)
                 vs  onnxsim.apply_transformer_block_pruning with its default
                 8 random calibration batches, sparsity 0.25 of sub-blocks
  calibration    onnx-idprune's deciding stage (calibrate, judge: …, decide
                 in its report)  vs
                 plain onnxruntime inference of the same N samples, same batch
                 size, no taps, optimisations off like calibration's
  main job       onnx-idprune IN OUT --calib C --samples N --keep-params 0.75
                 (default mode) vs plain onnxruntime inference of the same N
                 samples with default optimisations; both processes' peak RSS

Prints a Markdown table with the ratio anchor / onnx-idprune (> 1: we are
faster). Python tools are timed inside their process (interpreter and
import start-up excluded); onnx-idprune is timed as a whole command.
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

LOAD_SAVE = """
import sys, time, onnx
t = time.perf_counter()
m = onnx.load(sys.argv[1])
onnx.save(m, sys.argv[2])
print(time.perf_counter() - t)
"""

TWONN = """
import sys, time, numpy as np, skdim
x = np.load(sys.argv[1])
t = time.perf_counter()
est = skdim.id.TwoNN().fit(x)
print(time.perf_counter() - t, est.dimension_)
"""

ONNXSIM = """
import sys, time, onnx, onnxsim
m = onnx.load(sys.argv[1])
t = time.perf_counter()
out = onnxsim.apply_transformer_block_pruning(m, num_samples=8, sparsity=0.25)
onnx.save(out, sys.argv[2])
print(time.perf_counter() - t)
"""

INFERENCE = """
import sys, time, numpy as np, onnxruntime as ort
model, calib, n, batch, level = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
so = ort.SessionOptions()
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
data = np.load(calib)
t = time.perf_counter()
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
names = [i.name for i in sess.get_inputs()]
feeds = {k: data[k][:n] for k in names}
for s in range(0, n, batch):
    sess.run(None, {k: v[s:s + batch] for k, v in feeds.items()})
print(time.perf_counter() - t)
"""


PEAK_RSS = {}

# Every command is started by this small launcher process, made before the
# benchmark allocates anything: a child's peak RSS (ru_maxrss) counts the
# memory of the process it was forked from until its exec, so children of
# this script itself (which holds the ID test matrix) would all report its
# size.
LAUNCHER = """
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    job = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(job["cmd"], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=job["env"])
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        reply = {"code": os.waitstatus_to_exitcode(status), "wall": wall, "rss_kib": usage.ru_maxrss,
                 "stdout": out.read().decode(), "stderr": err.read().decode()}
    print(json.dumps(reply), flush=True)
"""
_launcher = None


def run(cmd, env=None):
    """Runs cmd, returns (wall seconds, stdout); its peak RSS (MiB) is kept
    in PEAK_RSS under the command's first two words."""
    global _launcher
    if _launcher is None:
        _launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
    job = {"cmd": [str(c) for c in cmd], "env": dict(env if env is not None else os.environ)}
    _launcher.stdin.write(json.dumps(job) + "\n")
    _launcher.stdin.flush()
    line = _launcher.stdout.readline()
    if not line:
        sys.exit(f"anchors: the launcher process ended while running {' '.join(map(str, cmd[:3]))} …")
    reply = json.loads(line)
    if reply["code"] != 0:
        sys.exit(f"{' '.join(map(str, cmd[:3]))} … failed ({reply['code']}): {reply['stderr'].strip()[-2000:]}")
    PEAK_RSS[tuple(map(str, cmd[:2]))] = reply["rss_kib"] / 1024
    return reply["wall"], reply["stdout"]


def median(f, runs):
    values = [f() for _ in range(runs)]
    return statistics.median(v[0] for v in values), values[-1][1:]


def manifold(n, dim, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 12))
    w1 = rng.normal(size=(12, 256)) / np.sqrt(12)
    w2 = rng.normal(size=(256, dim)) / 16.0
    return (np.tanh(z @ w1) @ w2).astype(np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(ROOT, "fixtures/trained/clip_trained.onnx"))
    p.add_argument("--calib", default=os.path.join(ROOT, "fixtures/trained/calib.npz"))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--id-n", type=int, default=2000)
    p.add_argument("--id-dim", type=int, default=38400)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/onnx-idprune"))
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    run([sys.executable, "-c", "pass"])  # starts the launcher while this process is small
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.model))) as tmp:
        out = os.path.join(tmp, "out.onnx")
        plan = os.path.join(tmp, "empty.json")
        with open(plan, "w") as f:
            f.write('{"format": "onnx-idprune-plan", "version": 1, "blocks": []}')
        with open(a.model, "rb") as f:
            while f.read(1 << 24):
                pass

        ours, _ = median(lambda: run([a.binary, a.model, out, "--plan", plan]), a.runs)
        theirs, _ = median(lambda: (float(run([py, "-c", LOAD_SAVE, a.model, out])[1].split()[0]),), a.runs)
        rows.append(("load+save", os.path.basename(a.model), ours, "onnx.load+save", theirs, ""))

        x = os.path.join(tmp, "x.npy")
        import numpy as np

        np.save(x, manifold(a.id_n, a.id_dim))

        def ours_id():
            wall, stdout = run([a.binary, "id", "--data", x, "--json"])
            return wall, json.loads(stdout)["id"]

        def skdim_id():
            t, d = run([py, "-c", TWONN, x])[1].split()
            return float(t), float(d)

        ours, (our_d,) = median(ours_id, a.runs)
        theirs, (their_d,) = median(skdim_id, a.runs)
        rows.append(("TwoNN", f"N={a.id_n}, D={a.id_dim}", ours, "skdim TwoNN", theirs,
                     f"ID {our_d:.3f} vs {their_d:.3f}"))

        report = os.path.join(tmp, "report.json")

        def prune():
            wall, _ = run([a.binary, a.model, out, "--calib", a.calib, "--samples", str(a.samples),
                           "--keep-params", "0.75", "--mode", "blocks", "--report", report])
            return (wall,)

        ours, _ = median(prune, a.runs)
        with open(report) as f:
            rep = json.load(f)
        # The deciding stage's parts (calibrate, judge: …, decide), summed.
        calib_s = sum(v for k, v in rep["timings"] if k == "calibrate" or k == "decide" or k.startswith("judge"))
        theirs, _ = median(lambda: (float(run([py, "-c", ONNXSIM, a.model, out])[1].split()[0]),), a.runs)
        rows.append(("block pruning", f"{a.samples} samples vs 8", ours, "onnxsim block pruning", theirs,
                     f"kept {rep['params']['blocks_kept']:.3f} of block params"))

        batch = 16

        def inference(level):
            return median(lambda: (float(run([py, "-c", INFERENCE, a.model, a.calib, str(a.samples),
                                              str(batch), level])[1].split()[0]),), a.runs)[0]

        floor = inference("ORT_DISABLE_ALL")
        rows.append(("calibration", f"{a.samples} samples", calib_s, "plain ORT inference (optimisations off)",
                     floor, "ours: taps + ID + scores + judged candidates"))

        # The main job as users run it (default mode) against plain
        # inference of the same samples with ONNX Runtime's default
        # optimisations (reading the samples and creating the session
        # included on both sides).
        def main_job():
            wall, _ = run([a.binary, a.model, out, "--calib", a.calib, "--samples", str(a.samples),
                           "--keep-params", "0.75", "--report", report])
            return (wall,)

        ours, _ = median(main_job, a.runs)
        ours_rss = PEAK_RSS[(a.binary, a.model)]
        with open(report) as f:
            rep = json.load(f)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in rep["timings"] if v >= 0.05)
        plain = inference("ORT_ENABLE_ALL")
        plain_rss = PEAK_RSS[(py, "-c")]
        rows.append(("main job (default mode)", f"{a.samples} samples, keep 0.75", ours,
                     "plain ORT inference (default optimisations)", plain,
                     f"peak RSS {ours_rss:.0f} MiB vs {plain_rss:.0f} MiB; stages: {stages}"))

    print(f"| task | input | onnx-idprune s | anchor | anchor s | anchor / ours | note |")
    print(f"|---|---|---:|---|---:|---:|---|")
    for task, what, ours, anchor, theirs, note in rows:
        print(f"| {task} | {what} | {ours:.3f} | {anchor} | {theirs:.3f} | {theirs / ours:.2f} | {note} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(zip(["task", "input", "ours_s", "anchor", "anchor_s", "note"], r)) for r in rows],
                      f, indent=2)


if __name__ == "__main__":
    main()
