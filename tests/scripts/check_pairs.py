"""Compares the calibration inputs onnx-idprune built from images and
captions (an .npz written by `onnx-idprune calib`) with what Hugging Face's
CLIPImageProcessor and tokenizer make of the same files.

    check_pairs.py GOT.npz PAIRS_DIR

Token ids and attention masks must match exactly. Pixels must agree closely
but not bit for bit: PIL's bicubic filter and the image crate's Catmull-Rom
filter differ in their last digits and at borders.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast


def main() -> int:
    got = np.load(sys.argv[1])
    pairs = Path(sys.argv[2])
    processor = CLIPImageProcessor.from_pretrained(str(pairs))
    files = sorted((pairs / "images").glob("*.png"))
    want = processor(images=[Image.open(f) for f in files], return_tensors="np")["pixel_values"]
    diff = np.abs(want - got["pixel_values"])
    print(f"pixels: mean |diff| {diff.mean():.4f}, max {diff.max():.4f} (normalised units)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(pairs / "tokenizer.json"), pad_token="<pad>")
    captions = (pairs / "captions.txt").read_text().splitlines()
    enc = tokenizer(captions, padding="longest", truncation=True, max_length=16, return_tensors="np")
    ok = True
    for name in ("input_ids", "attention_mask"):
        if enc[name].shape != got[name].shape or not (enc[name] == got[name]).all():
            print(f"{name} differ:\n{enc[name]}\n{got[name]}")
            ok = False
    if got["pixel_values"].shape != want.shape or diff.mean() > 0.03 or diff.max() > 0.8:
        print("pixels differ too much")
        ok = False
    print("pairs: ok" if ok else "pairs: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
