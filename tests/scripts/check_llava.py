"""Independent checks of a LLaVA-style folder written by onnx-idprune (transformers.js's
layout: onnx/vision_encoder.onnx, onnx/embed_tokens.onnx, onnx/decoder_model_merged.onnx).

Usage: check_llava.py --calib inputs.npz [--reference logits.npz] [--steps N] ORIGINAL PRUNED

  * onnx.checker.check_model(full_check=True) on each pruned file, and each keeps the
    original's interface but for key/value cache entries of removed layers (in pairs);
  * the pruned files chained as transformers.js chains them (image features, then the
    text's embeddings; the image tokens real in the mask; positions from 0) run on the
    samples; with --reference, the logits of the first rows at their real positions are
    within 1e-4 of it (the PyTorch model pruned as the plan says);
  * greedy generation of --steps tokens after the image and each of the first text prompts,
    step by step with the decoder's cache (with-past branch) and without it (no-past branch,
    the whole sequence again), gives the same tokens with next-token logits within 1e-4.

Prints one line per check ending in ": ok"; exits 1 if any fails.
"""

import argparse
import os
import re
import sys

import numpy as np
import onnx

FILES = ("vision_encoder", "embed_tokens", "decoder_model_merged")
CACHE = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")
PROMPT = 4
ATOL = 1e-4


from onnx_files import interface, session


class Folder:
    def __init__(self, root):
        self.paths = {f: os.path.join(root, "onnx", f + ".onnx") for f in FILES}
        self.vision, self.embed, self.decoder = (session(self.paths[f]) for f in FILES)
        self.past = [i for i in self.decoder.get_inputs() if CACHE.match(i.name)]

    def empty_past(self, batch):
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}

    def step(self, embeds, mask, positions, past, with_past):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                 "use_cache_branch": np.array([with_past]), **past}
        names = [o.name for o in self.decoder.get_outputs()]
        out = dict(zip(names, self.decoder.run(None, feeds)))
        presents = {n.replace("present", "past_key_values", 1): v for n, v in out.items() if CACHE.match(n)}
        return out["logits"], presents

    def logits(self, pixels, ids, text_mask):
        image = self.vision.run(None, {"pixel_values": pixels})[0]
        text = self.embed.run(None, {"input_ids": ids})[0]
        mask = np.concatenate([np.ones(image.shape[:2], np.int64), text_mask], axis=1)
        positions = np.cumsum(mask, axis=1) - 1
        logits, _ = self.step(np.concatenate([image, text], axis=1), mask, positions,
                              self.empty_past(ids.shape[0]), False)
        return logits, image.shape[1]

    def generate(self, pixels, prompt, steps, cached):
        image = self.vision.run(None, {"pixel_values": pixels})[0]
        tokens, scores = prompt.copy(), []
        past = self.empty_past(prompt.shape[0])
        for s in range(steps):
            if cached and s > 0:
                embeds = self.embed.run(None, {"input_ids": tokens[:, -1:]})[0]
                total = image.shape[1] + tokens.shape[1]
                mask = np.ones((tokens.shape[0], total), np.int64)
                positions = np.full((tokens.shape[0], 1), total - 1, np.int64)
                logits, past = self.step(embeds, mask, positions, past, True)
            else:
                text = self.embed.run(None, {"input_ids": tokens})[0]
                embeds = np.concatenate([image, text], axis=1)
                mask = np.ones(embeds.shape[:2], np.int64)
                positions = np.cumsum(mask, axis=1) - 1
                logits, presents = self.step(embeds, mask, positions, self.empty_past(tokens.shape[0]), False)
                if cached:
                    past = presents
            last = logits[:, -1]
            scores.append(last)
            tokens = np.concatenate([tokens, last.argmax(-1)[:, None].astype(np.int64)], axis=1)
        return tokens[:, prompt.shape[1]:], np.stack(scores, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True)
    ap.add_argument("--reference")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("original")
    ap.add_argument("pruned")
    args = ap.parse_args()
    data = np.load(args.calib)
    failures = []

    for f in FILES:
        path = os.path.join(args.pruned, "onnx", f + ".onnx")
        onnx.checker.check_model(onnx.load(path), full_check=True)
        ins, outs, oins, oouts = map(set, (*interface(path),
                                           *interface(os.path.join(args.original, "onnx", f + ".onnx"))))
        gone = sorted(n for n, _ in (oins - ins) | (oouts - outs))
        extra = (ins - oins) | (outs - oouts)
        cache_only = all(CACHE.match(n) for n in gone) and len(gone) % 2 == 0
        if extra or not cache_only:
            failures.append(f"{f}: interface changed: gone {gone}, new {sorted(extra)}")
    print(f"{args.pruned}: checker and interface: {'ok' if not failures else 'FAILED'}")

    pruned = Folder(args.pruned)
    rows = min(4, data["input_ids"].shape[0])
    logits, image_tokens = pruned.logits(data["pixel_values"][:rows], data["input_ids"][:rows],
                                         data["attention_mask"][:rows])
    if not np.isfinite(logits).all():
        failures.append("the pruned folder's logits are not finite")
    if args.reference:
        want = np.load(args.reference)["logits"]
        n = want.shape[0]
        real = np.concatenate([np.ones((n, image_tokens), bool), data["attention_mask"][:n] != 0], axis=1)
        diff = float(np.abs(logits[:n] - want)[real].max())
        ok = diff <= ATOL
        if not ok:
            failures.append(f"logits differ from the reference by {diff:.2e}")
        print(f"{args.pruned}: reference logits within {diff:.1e}: {'ok' if ok else 'FAILED'}")

    real = (data["attention_mask"][:rows, :PROMPT] != 0).all(1)
    pixels, prompts = data["pixel_values"][:rows][real], data["input_ids"][:rows, :PROMPT][real]
    with_cache, s1 = pruned.generate(pixels, prompts, args.steps, True)
    without, s2 = pruned.generate(pixels, prompts, args.steps, False)
    drift = float(np.abs(s1 - s2).max())
    ok = np.array_equal(with_cache, without) and drift <= ATOL
    if not ok:
        failures.append(f"cached generation differs from uncached (logits by {drift:.2e}): "
                        f"{with_cache.tolist()} vs {without.tolist()}")
    original, _ = Folder(args.original).generate(pixels, prompts, args.steps, True)
    agreement = float((original == with_cache).mean())
    print(f"{args.pruned}: {len(prompts)} prompts, cached = uncached (logits within {drift:.1e}), "
          f"{agreement:.2f} of tokens as the original's: {'ok' if ok else 'FAILED'}")
    for f in failures:
        print("FAILED:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
