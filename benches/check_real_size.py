#!/usr/bin/env python3
"""Real-size check of plan rewrites against PyTorch (CLIP B/32 forms and,
when its export is present, BLIP ITM base).

Usage: python benches/check_real_size.py BENCH_DIR [--binary PATH]

Rebuilds the CLIP ViT-B/32 of make_real_size.py (same seeds), applies a plan
mixing all five actions in both towers to the PyTorch model
(fixtures/reference_plans.py) and, with onnx-idprune, to every real-size
CLIP export found in BENCH_DIR; runs both on the saved inputs and prints the
relative error of each output (max |ONNX Runtime - PyTorch| / max |PyTorch|)
and the file sizes.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
import torch
from transformers import CLIPConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))
import generate  # noqa: E402
import reference_plans  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benches"))
import make_real_size  # noqa: E402

PLAN = [
    {"tower": "vision", "index": 2, "drop": True},
    {"tower": "vision", "index": 5, "drop_attention": True},
    {"tower": "vision", "index": 7, "drop_mlp": True},
    {"tower": "vision", "index": 0, "keep_heads": [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]},
    {"tower": "vision", "index": 10, "keep_mlp": list(range(0, 3072, 2))},
    {"tower": "text", "index": 4, "drop": True},
    {"tower": "text", "index": 6, "drop_attention": True},
    {"tower": "text", "index": 8, "drop_mlp": True},
    {"tower": "text", "index": 1, "keep_heads": [0, 3, 5, 7]},
    {"tower": "text", "index": 11, "keep_mlp": list(range(1000))},
]


BLIP_PLAN = [
    {"tower": "vision", "index": 3, "drop": True},
    {"tower": "vision", "index": 0, "keep_heads": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11]},
    {"tower": "vision", "index": 5, "keep_mlp": list(range(0, 3072, 2))},
    {"tower": "vision", "index": 8, "drop_mlp": True},
    {"tower": "text", "index": 2, "drop": True},
    {"tower": "text", "index": 4, "drop_attention": True},
    {"tower": "text", "index": 7, "drop_mlp": True},
    {"tower": "text", "index": 1, "keep_heads": [0, 1, 2, 3, 4, 5, 6, 7]},
    {"tower": "text", "index": 9, "keep_mlp": list(range(2000))},
]


def check_blip(bench, binary, tmp):
    src = os.path.join(bench, "blip_itm_base_torchscript_op17.onnx")
    if not os.path.exists(src):
        return
    model = make_real_size.blip_model()
    reference_plans.apply_blip(model, BLIP_PLAN)
    inputs = dict(np.load(os.path.join(bench, "blip_base_inputs.npz")))
    names = ["input_ids", "pixel_values", "attention_mask"]
    with torch.no_grad():
        expected = model(*(torch.from_numpy(inputs[n]) for n in names)).numpy()
    plan = os.path.join(tmp, "blip_plan.json")
    with open(plan, "w") as f:
        json.dump({"format": "onnx-idprune-plan", "version": 1, "blocks": BLIP_PLAN}, f)
    out = os.path.join(tmp, "blip.pruned.onnx")
    subprocess.run([binary, src, out, "--plan", plan], check=True)
    got = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {n: inputs[n] for n in names})[0]
    err = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    print(f"blip_itm_base_torchscript_op17: {os.path.getsize(src)} -> {os.path.getsize(out)} bytes; "
          f"itm_score relative error vs PyTorch {err:.1e}")


def main():
    bench = sys.argv[1]
    binary = sys.argv[sys.argv.index("--binary") + 1] if "--binary" in sys.argv else os.path.join(ROOT, "target/release/onnx-idprune")
    generate.seed_everything(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = CLIPConfig(text_config={"eos_token_id": 2}, vision_config={})
    generate.set_eager(config)
    model = generate.ClipExport(config).eval()
    generate.make_weights_realistic(model, seed=0)
    reference_plans.apply_clip(model, PLAN)
    inputs = dict(np.load(os.path.join(bench, "clip_b32_inputs.npz")))
    names = ["input_ids", "pixel_values", "attention_mask"]
    with torch.no_grad():
        expected = [t.numpy() for t in model(*(torch.from_numpy(inputs[n]) for n in names))]
    with tempfile.TemporaryDirectory() as tmp:
        plan = os.path.join(tmp, "plan.json")
        with open(plan, "w") as f:
            json.dump({"format": "onnx-idprune-plan", "version": 1, "blocks": PLAN}, f)
        for form in ("clip_b32_torchscript_op17", "clip_b32_dynamo_op18", "clip_b32_ort_fused"):
            src = os.path.join(bench, form + ".onnx")
            if not os.path.exists(src):
                continue
            out = os.path.join(tmp, form + ".pruned.onnx")
            subprocess.run([binary, src, out, "--plan", plan], check=True)
            sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
            got = sess.run(None, {n: inputs[n] for n in names})
            errors = []
            for name, a, b in zip(["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"], got, expected):
                errors.append(f"{name} {float(np.max(np.abs(a - b)) / np.max(np.abs(b))):.1e}")
            print(f"{form}: {os.path.getsize(src)} -> {os.path.getsize(out)} bytes; relative error vs PyTorch: {', '.join(errors)}")
        check_blip(bench, binary, tmp)


if __name__ == "__main__":
    main()
