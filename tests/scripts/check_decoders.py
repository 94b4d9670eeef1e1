"""Independent checks of decoder language models written by onnx-idprune.

Usage: check_decoders.py --calib inputs.npz [--steps N] ORIGINAL PRUNED [ORIGINAL PRUNED ...]

For each pair:
  * onnx.checker.check_model(full_check=True) on the pruned file, where the original
    passes it (onnxruntime-genai's builder writes ONNX Runtime's own
    SimplifiedLayerNormalization in the default domain, which the checker rejects);
  * every graph input and output of the pruned file is one of the
    original's, with the same element type; what went is only key/value
    cache entries (`past_key_values.N.*`, `present.N.*`), in pairs;
  * for a file with a cache: greedy generation of --steps tokens from each
    of the first prompts, once step by step with the cache (each step fed
    the previous step's presents) and once without it (the whole sequence
    again, with an empty past), must give the same tokens, and next-token
    logits within 1e-4 of each other (a merged decoder takes its no-past
    branch for an empty past, its with-past branch after: both are run);
  * for a file without a cache: it runs on the prompts.

Prints one line per pair ending in ": ok"; exits 1 if any check fails.
"""

import argparse
import re
import sys

import numpy as np
import onnx


from onnx_files import interface, session


CACHE = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


def cache_inputs(sess):
    return [i for i in sess.get_inputs() if CACHE.match(i.name)]


def run(sess, ids, past):
    """Logits of the last position and the presents, for `ids` after `past`."""
    batch, seq = ids.shape
    past_len = next(iter(past.values())).shape[2] if past else 0
    feeds = {"input_ids": ids}
    names = {i.name for i in sess.get_inputs()}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((batch, past_len + seq), np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None].repeat(batch, 0)
    if "use_cache_branch" in names:  # a merged decoder: the with-past branch once there is a past
        feeds["use_cache_branch"] = np.array([past_len > 0])
    feeds.update(past)
    outputs = sess.run(None, feeds)
    named = dict(zip([o.name for o in sess.get_outputs()], outputs))
    presents = {k: v for k, v in named.items() if CACHE.match(k)}
    return named["logits"][:, -1], presents


def head_width(path):
    """The head width of a decoder whose cache declares it symbolically (onnxruntime-genai's
    builder): its GroupQueryAttention's packed projection over num_heads + 2 kv_num_heads."""
    graph = onnx.load(path).graph
    weights = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: a.i for a in node.attribute}
            value = node.input[0]
            while producer[value].op_type == "Add":
                value = producer[value].input[0]
            width = weights[producer[value].input[1]].dims[-1]
            return width // (attrs["num_heads"] + 2 * attrs["kv_num_heads"])
    raise AssertionError("a cache of symbolic head width, and no GroupQueryAttention")


def empty_past(sess, batch, path):
    past = {}
    for i in cache_inputs(sess):
        heads, width = i.shape[1], i.shape[3]
        if not isinstance(width, int):
            width = head_width(path)
        past[i.name] = np.zeros((batch, heads, 0, width), np.float32)
    return past


def generate_cached(sess, prompt, steps, path):
    logits, presents = run(sess, prompt, empty_past(sess, prompt.shape[0], path))
    tokens, all_logits = [], []
    for _ in range(steps):
        token = logits.argmax(-1)[:, None].astype(np.int64)
        tokens.append(token)
        all_logits.append(logits)
        past = {k.replace("present", "past_key_values"): v for k, v in presents.items()}
        logits, presents = run(sess, token, past)
    return np.concatenate(tokens, 1), np.stack(all_logits, 1)


def generate_uncached(sess, prompt, steps, path):
    ids = prompt
    tokens, all_logits = [], []
    for _ in range(steps):
        logits, _ = run(sess, ids, empty_past(sess, ids.shape[0], path))
        token = logits.argmax(-1)[:, None].astype(np.int64)
        tokens.append(token)
        all_logits.append(logits)
        ids = np.concatenate([ids, token], 1)
    return np.concatenate(tokens, 1), np.stack(all_logits, 1)


def passes_checker(path):
    try:
        onnx.checker.check_model(onnx.load(path), full_check=True)
        return True
    except onnx.checker.ValidationError:
        return False


def check(original, pruned, calib, steps):
    # onnxruntime-genai's builder writes ONNX Runtime's SimplifiedLayerNormalization in the
    # default domain, which onnx.checker rejects: a pruned file must pass where its original does.
    if passes_checker(original):
        onnx.checker.check_model(onnx.load(pruned), full_check=True)
    (ins_a, outs_a), (ins_b, outs_b) = interface(original), interface(pruned)
    for what, a, b in (("input", ins_a, ins_b), ("output", outs_a, outs_b)):
        extra = [v for v in b if v not in a]
        if extra:
            raise AssertionError(f"new or re-typed {what}s {extra}")
        gone = [n for n, _ in a if (n, _) not in b]
        if any(not CACHE.match(n) for n in gone):
            raise AssertionError(f"{what}s other than cache entries went: {gone}")
    sess = session(pruned)
    data = np.load(calib)
    prompts = data["input_ids"][:2, :5]
    if not cache_inputs(sess):
        logits, _ = run(sess, prompts, {})
        if not np.isfinite(logits).all():
            raise AssertionError("non-finite logits")
        return "runs without a cache"
    cached, cached_logits = generate_cached(sess, prompts, steps, pruned)
    uncached, uncached_logits = generate_uncached(sess, prompts, steps, pruned)
    if not np.array_equal(cached, uncached):
        raise AssertionError(f"cached generation {cached.tolist()} != uncached {uncached.tolist()}")
    diff = float(np.abs(cached_logits - uncached_logits).max())
    if diff > 1e-4:
        raise AssertionError(f"cached and uncached next-token logits differ by {diff:.2e}")
    return f"cached greedy generation of {steps} tokens equals uncached (logits within {diff:.1e})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("pairs", nargs="+")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("models come in ORIGINAL PRUNED pairs")
    failed = 0
    for original, pruned in zip(args.pairs[::2], args.pairs[1::2]):
        try:
            what = check(original, pruned, args.calib, args.steps)
            print(f"{pruned}: {what}: ok")
        except Exception as e:  # one line per failed pair
            failed += 1
            print(f"{pruned}: FAILED: {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
