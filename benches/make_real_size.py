#!/usr/bin/env python3
"""Export real-size CLIP and BLIP models (random weights) for benchmarks and
acceptance checks on real geometry.

Usage: python benches/make_real_size.py OUT_DIR [--dynamo] [--fused] [--calib N] [--blip]

Always: transformers' default CLIPConfig, i.e. CLIP ViT-B/32 (vision 768 wide
x 12 layers, 12 heads, MLP 3072, patch 32 at 224 px; text 512 wide x 12
layers, 8 heads, MLP 2048; about 151 M parameters), seeded, exported with the
TorchScript exporter at opset 17 (~600 MB).
  --dynamo  also the dynamo exporter at opset 18 (static shapes)
  --fused   also the TorchScript export after ONNX Runtime's transformer
            optimizer (SkipLayerNormalization, Attention, QuickGelu)
  --blip-only  only the BLIP model below
  --calib N also N seeded calibration samples for the CLIP model
            (clip_b32_calib.npz: standard-normal pixels, random token ids,
            16 tokens) for the speed suite's main-job row
  --blip    also BLIP image-text retrieval at base size (BlipConfig defaults:
            ViT-B/16 at 384 px, BERT-base text with cross-attention), TorchScript
            opset 17 (~900 MB)
Needs the packages of fixtures/requirements.txt; nothing is downloaded from a
model hub. Not committed: generated on demand.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import BlipConfig, CLIPConfig  # noqa: E402

import generate  # noqa: E402  (the fixture generator: export helpers)


def main() -> int:
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    if "--blip-only" not in sys.argv:
        make_clip(out_dir)
    if "--blip" in sys.argv or "--blip-only" in sys.argv:
        make_blip(out_dir)
    return 0


def blip_model():
    """BLIP ITM base, seeded on its own (check_real_size.py rebuilds it)."""
    generate.seed_everything(1)
    # BlipTextConfig defaults to 8 heads; the released BLIP ITM-base
    # checkpoints use BERT-base's 12 heads of 64.
    config = BlipConfig(text_config={"num_attention_heads": 12})
    generate.set_eager(config)
    blip = generate.BlipItmExport(config).eval()
    generate.make_weights_realistic(blip, seed=1)
    return blip


def make_blip(out_dir):
    torch.set_num_threads(os.cpu_count() or 1)
    blip = blip_model()
    size = blip.config.vision_config.image_size
    rng = np.random.default_rng(1)
    sample = {
        "input_ids": rng.integers(1, 1000, size=(2, 16), dtype=np.int64),
        "pixel_values": rng.standard_normal((2, 3, size, size)).astype(np.float32),
        "attention_mask": np.ones((2, 16), dtype=np.int64),
    }
    names = ["input_ids", "pixel_values", "attention_mask"]
    path = os.path.join(out_dir, "blip_itm_base_torchscript_op17.onnx")
    generate.export_torchscript(blip, path, names, ["itm_score"], sample, 17, {"input_ids", "attention_mask"})
    print(f"{path}: {os.path.getsize(path)} bytes")
    np.savez(os.path.join(out_dir, "blip_base_inputs.npz"), **sample)


def make_clip(out_dir):
    generate.seed_everything(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = CLIPConfig(text_config={"eos_token_id": 2}, vision_config={})
    generate.set_eager(config)
    model = generate.ClipExport(config).eval()
    generate.make_weights_realistic(model, seed=0)
    rng = np.random.default_rng(0)
    sample = {
        "input_ids": rng.integers(1, 1000, size=(2, 16), dtype=np.int64),
        "pixel_values": rng.standard_normal((2, 3, 224, 224)).astype(np.float32),
        "attention_mask": np.ones((2, 16), dtype=np.int64),
    }
    names = ["input_ids", "pixel_values", "attention_mask"]
    outputs = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]
    path = os.path.join(out_dir, "clip_b32_torchscript_op17.onnx")
    generate.export_torchscript(model, path, names, outputs, sample, 17, {"input_ids", "attention_mask"})
    print(f"{path}: {os.path.getsize(path)} bytes")
    if "--dynamo" in sys.argv:
        path = os.path.join(out_dir, "clip_b32_dynamo_op18.onnx")
        generate.export_dynamo(model, path, names, outputs, sample, 18)
        print(f"{path}: {os.path.getsize(path)} bytes")
    np.savez(os.path.join(out_dir, "clip_b32_inputs.npz"), **sample)
    if "--calib" in sys.argv:
        n = int(sys.argv[sys.argv.index("--calib") + 1])
        rng = np.random.default_rng(7)
        np.savez(
            os.path.join(out_dir, "clip_b32_calib.npz"),
            input_ids=rng.integers(1, 1000, size=(n, 16), dtype=np.int64),
            pixel_values=rng.standard_normal((n, 3, 224, 224)).astype(np.float32),
            attention_mask=np.ones((n, 16), dtype=np.int64),
        )
    if "--fused" in sys.argv:
        src = os.path.join(out_dir, "clip_b32_torchscript_op17.onnx")
        dst = os.path.join(out_dir, "clip_b32_ort_fused.onnx")
        ops = generate.ort_optimize(src, dst, "clip", 0)
        print(f"{dst}: {os.path.getsize(dst)} bytes; fused ops {dict((k, v) for k, v in ops.items() if k in generate.FUSED_OPS)}")



if __name__ == "__main__":
    sys.exit(main())
