#!/usr/bin/env python3
"""Regenerates the fuzz seed corpus in fuzz/corpus/<target>/ from fixtures/.

Python standard library only; the output is deterministic (same fixtures,
same bytes). Only files named `seed-*` are written or removed, so minimised
crash reproducers saved next to them (`repro-*`) are kept.

    python3 fuzz/make_corpus.py            # rewrite the seeds
    python3 fuzz/make_corpus.py --check    # exit 1 if the seeds are stale

Seeds per target:

- load_model: the smallest fixture model as is; every fixture model
  "slimmed" (short value names, no node names, float tensors as float16,
  or as float8 bytes for the tiniest variant), which keeps the graph
  structure discovery sees at a fraction of the size; truncations and
  bit-flipped copies of the smallest slim model; hand-made small models for
  the loader's and the IR's edge cases (subgraphs, cycles, typed data,
  segments, sparse initializers, external data, ...).
- parse_plan: fixtures/plans/*.json and malformed or unusual plans.
- load_with_external: inputs in the structured format `load_with_external`
  in fuzz/bodies.rs decodes (the model and its data files are built from
  it), and raw models (first byte 0xFF) with external data.
"""

import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CORPUS = ROOT / "fuzz" / "corpus"

# --------------------------------------------------------------------------
# Protobuf wire format: just enough to read and rewrite ONNX models.


def varint(n):
    n &= (1 << 64) - 1  # negative int64 values are ten-byte varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, pos):
    shift = n = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def parse(buf):
    """A message as a list of [field, wire_type, value]."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        fields.append([field, wire, value])
    return fields


def encode(fields):
    out = bytearray()
    for field, wire, value in fields:
        out += varint(field << 3 | wire)
        if wire == 0:
            out += varint(value)
        elif wire == 2:
            out += varint(len(value)) + bytes(value)
        else:
            out += value
    return bytes(out)


# Building messages by hand: f(field, value) with the wire type implied.


def msg(*fields):
    return encode([f for f in fields if f is not None])


def s(field, text):
    data = text.encode() if isinstance(text, str) else text
    return [field, 2, data]


def i(field, n):
    return [field, 0, n]


def m(field, *fields):
    return [field, 2, msg(*fields)]


def packed(field, values, fmt=None):
    if fmt:
        data = struct.pack("<%d%s" % (len(values), fmt), *values)
    else:
        data = b"".join(varint(v) for v in values)
    return [field, 2, data]


# --------------------------------------------------------------------------
# ONNX field numbers used below.

MODEL_IR, MODEL_OPSET, MODEL_DOC, MODEL_GRAPH = 1, 8, 6, 7
MODEL_TRAINING, MODEL_FUNCTIONS = 20, 25
GRAPH_NODE, GRAPH_NAME, GRAPH_INIT, GRAPH_DOC = 1, 2, 5, 10
GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VI, GRAPH_SPARSE = 11, 12, 13, 15
NODE_IN, NODE_OUT, NODE_NAME, NODE_OP, NODE_ATTR, NODE_DOC, NODE_DOMAIN = 1, 2, 3, 4, 5, 6, 7
NODE_META = 9
ATTR_NAME, ATTR_F, ATTR_I, ATTR_T, ATTR_G, ATTR_INTS, ATTR_GRAPHS, ATTR_TYPE = 1, 2, 3, 5, 6, 8, 11, 20
T_DIMS, T_TYPE, T_SEGMENT, T_FLOATS, T_INT32, T_STRINGS, T_INT64 = 1, 2, 3, 4, 5, 6, 7
T_NAME, T_RAW, T_EXTERNAL, T_LOCATION = 8, 9, 13, 14
VI_NAME, VI_TYPE = 1, 2

FLOAT, UINT8, INT64, FLOAT16, FLOAT8, INT4 = 1, 2, 7, 10, 17, 22

# --------------------------------------------------------------------------
# Slimming a fixture: same graph structure, far fewer bytes.


class Names:
    """Short, stable replacements for value names (first-seen order)."""

    def __init__(self):
        self.map = {}

    def __call__(self, name):
        if not name:
            return b""
        if name not in self.map:
            n, short = len(self.map), ""
            while True:
                short = "abcdefghijklmnopqrstuvwxyz"[n % 26] + short
                n //= 26
                if n == 0:
                    break
            self.map[name] = short.encode()
        return self.map[name]


def slim_tensor(buf, names, weights):
    fields = parse(buf)
    dims = []
    dtype = None
    for f, w, v in fields:
        if f == T_DIMS:
            if w == 0:
                dims.append(v)
            else:
                pos = 0
                while pos < len(v):
                    d, pos = read_varint(v, pos)
                    dims.append(d)
        if f == T_TYPE:
            dtype = v
    count = 1
    for d in dims:
        count *= d
    out = []
    for f, w, v in fields:
        if f == T_NAME:
            v = names(v.decode())
        # Every float tensor changes type, small ones too: a block whose
        # weights and biases differ in element type is refused at discovery,
        # and the seeds should reach discovery.
        elif f == T_RAW and dtype == FLOAT and len(v) == 4 * count:
            if weights == "float16":
                values = struct.unpack("<%df" % count, v)
                values = [max(-60000.0, min(60000.0, x)) for x in values]
                v = struct.pack("<%de" % count, *values)
            else:  # one byte per value; the values do not matter here
                v = bytes((k * 37) & 0xFF for k in range(count))
        elif f == T_TYPE and dtype == FLOAT:
            v = FLOAT16 if weights == "float16" else FLOAT8
        out.append([f, w, v])
    return encode(out)


def slim_graph(buf, names, weights):
    out = []
    for f, w, v in parse(buf):
        if f in (GRAPH_DOC,):
            continue
        if f == GRAPH_NODE:
            v = slim_node(v, names, weights)
        elif f == GRAPH_INIT:
            v = slim_tensor(v, names, weights)
        elif f in (GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VI):
            v = encode(
                [[ff, ww, names(vv.decode()) if ff == VI_NAME else vv] for ff, ww, vv in parse(v)]
            )
        out.append([f, w, v])
    return encode(out)


def slim_node(buf, names, weights):
    out = []
    for f, w, v in parse(buf):
        if f in (NODE_NAME, NODE_DOC, NODE_META):
            continue
        if f in (NODE_IN, NODE_OUT):
            v = names(v.decode())
        elif f == NODE_ATTR:
            attr = []
            for af, aw, av in parse(v):
                if af == ATTR_G or af == ATTR_GRAPHS:
                    av = slim_graph(av, names, weights)
                attr.append([af, aw, av])
            v = encode(attr)
        out.append([f, w, v])
    return encode(out)


def slim_model(buf, weights):
    names = Names()
    out = []
    for f, w, v in parse(buf):
        if f == MODEL_DOC:
            continue
        if f == MODEL_GRAPH:
            v = slim_graph(v, names, weights)
        out.append([f, w, v])
    return encode(out)


# --------------------------------------------------------------------------
# Hand-made models.

OPSET = m(MODEL_OPSET, s(1, ""), i(2, 17))


def model(*graph_fields, extra=()):
    return msg(i(MODEL_IR, 8), OPSET, m(MODEL_GRAPH, s(GRAPH_NAME, "g"), *graph_fields), *extra)


def node(op, inputs, outputs, *attrs, domain=None, field=GRAPH_NODE):
    return m(
        field,
        *[s(NODE_IN, x) for x in inputs],
        *[s(NODE_OUT, x) for x in outputs],
        s(NODE_OP, op),
        *attrs,
        s(NODE_DOMAIN, domain) if domain is not None else None,
    )


def value(field, name, elem=FLOAT, shape=None):
    dims = [m(1, i(1, d)) if isinstance(d, int) else m(1, s(2, d)) for d in (shape or [])]
    tensor_type = m(1, i(1, elem), m(2, *dims))
    return m(field, s(VI_NAME, name), m(VI_TYPE, tensor_type))


AUTO = object()  # raw data: a float pattern matching the dims


def tensor(name, dims, dtype=FLOAT, raw=AUTO, *extra):
    count = 1
    for d in dims:
        count *= max(d, 0)
    if raw is AUTO:
        raw = struct.pack("<%df" % count, *[0.5 * (k % 7) for k in range(count)])
    return [
        packed(T_DIMS, dims) if dims else None,
        i(T_TYPE, dtype),
        s(T_NAME, name),
        s(T_RAW, raw) if raw is not None else None,
        *extra,
    ]


def init(name, dims, dtype=FLOAT, raw=AUTO, *extra):
    return m(GRAPH_INIT, *tensor(name, dims, dtype, raw, *extra))


def attr_tensor(name, fields):
    return m(NODE_ATTR, s(ATTR_NAME, name), i(ATTR_TYPE, 4), m(ATTR_T, *fields))


def attr_ints(name, values):
    return m(NODE_ATTR, s(ATTR_NAME, name), i(ATTR_TYPE, 7), *[i(ATTR_INTS, v) for v in values])


def attr_int(name, v):
    return m(NODE_ATTR, s(ATTR_NAME, name), i(ATTR_TYPE, 2), i(ATTR_I, v))


def attr_graph(name, *graph_fields):
    return m(NODE_ATTR, s(ATTR_NAME, name), i(ATTR_TYPE, 5), m(ATTR_G, *graph_fields))


def handmade_models():
    x = value(GRAPH_INPUT, "x", FLOAT, ["batch", 4])
    y = value(GRAPH_OUTPUT, "y")
    linear = [
        x,
        init("w", [4, 4]),
        init("b", [4]),
        node("MatMul", ["x", "w"], ["xw"]),
        node("Add", ["xw", "b"], ["y"]),
        y,
    ]
    ext = [s(1, "location"), s(2, "w.bin")]
    yield "ir-version-only", msg(i(MODEL_IR, 8))
    yield "no-ir-version", msg(OPSET, m(MODEL_GRAPH, s(GRAPH_NAME, "g")))
    yield "empty-graph", model()
    yield "linear", model(*linear)
    yield "constant-node", model(
        node("Constant", [], ["c"], attr_tensor("value", tensor("c", [2], FLOAT))),
        value(GRAPH_OUTPUT, "c"),
    )
    yield "constant-ints", model(
        node("Constant", [], ["c"], m(NODE_ATTR, s(ATTR_NAME, "value_ints"), i(ATTR_TYPE, 7), packed(ATTR_INTS, [1, -1, 4]))),
        value(GRAPH_OUTPUT, "c"),
    )
    yield "transpose-weight", model(
        x,
        init("w", [4, 4]),
        node("Transpose", ["w"], ["wt"], attr_ints("perm", [1, 0])),
        node("MatMul", ["x", "wt"], ["y"]),
        y,
    )
    yield "gemm", model(
        x, init("w", [4, 4]), init("b", [4]),
        node("Gemm", ["x", "w", "b"], ["y"], attr_int("transB", 1)),
        y,
    )
    yield "softmax-anchor", model(
        x,
        node("Softmax", ["x"], ["p"], attr_int("axis", -1)),
        node("MatMul", ["p", "x"], ["y"]),
        y,
    )
    yield "cycle", model(
        x, node("Add", ["x", "b"], ["a"]), node("Relu", ["a"], ["b"]), value(GRAPH_OUTPUT, "b"),
    )
    yield "two-producers", model(
        x, node("Relu", ["x"], ["y"]), node("Neg", ["x"], ["y"]), y,
    )
    yield "undefined-input", model(node("Relu", ["nothing"], ["y"]), y)
    yield "undefined-output", model(x, value(GRAPH_OUTPUT, "missing"))
    yield "duplicate-initializer", model(init("w", [2]), init("w", [2]))
    yield "duplicate-input", model(x, x)
    yield "unnamed-initializer", model(m(GRAPH_INIT, packed(T_DIMS, [2]), i(T_TYPE, FLOAT), s(T_RAW, b"\0" * 8)))
    yield "optional-input", model(x, node("Clip", ["x", "", "x"], ["y"]), y)
    yield "if-subgraph", model(
        x,
        value(GRAPH_INPUT, "cond", 9, []),
        node(
            "If", ["cond"], ["y"],
            attr_graph("then_branch", s(GRAPH_NAME, "t"), node("Relu", ["x"], ["r"]), value(GRAPH_OUTPUT, "r")),
            attr_graph("else_branch", s(GRAPH_NAME, "e"), node("Neg", ["x"], ["n"]), value(GRAPH_OUTPUT, "n")),
        ),
        y,
    )
    yield "typed-float-data", model(m(GRAPH_INIT, packed(T_DIMS, [2]), i(T_TYPE, FLOAT), s(T_NAME, "g"), packed(T_FLOATS, [1.0, 2.0], "f")))
    yield "typed-int64-data", model(m(GRAPH_INIT, packed(T_DIMS, [3]), i(T_TYPE, INT64), s(T_NAME, "shape"), packed(T_INT64, [1, 2, 3])))
    yield "typed-int32-float16", model(m(GRAPH_INIT, packed(T_DIMS, [2]), i(T_TYPE, FLOAT16), s(T_NAME, "h"), packed(T_INT32, [15360, 16384])))
    yield "typed-int4", model(m(GRAPH_INIT, packed(T_DIMS, [3]), i(T_TYPE, INT4), s(T_NAME, "q"), packed(T_INT32, [0x21, 0x3])))
    yield "string-tensor", model(m(GRAPH_INIT, packed(T_DIMS, [2]), i(T_TYPE, 8), s(T_NAME, "s"), s(T_STRINGS, "a"), s(T_STRINGS, "b")))
    yield "raw-size-mismatch", model(init("w", [2, 3], FLOAT, b"\0" * 20))
    yield "negative-dim", model(init("w", [-1], FLOAT, b""))
    yield "no-data", model(m(GRAPH_INIT, packed(T_DIMS, [5]), i(T_TYPE, FLOAT), s(T_NAME, "e")))
    yield "segment", model(init("seg", [4, 2], FLOAT, b"\0" * 8, m(T_SEGMENT, i(1, 0), i(2, 2))))
    yield "sparse-initializer", model(
        m(GRAPH_SPARSE, m(1, *tensor("sv", [2], FLOAT)), m(2, *tensor("si", [2], INT64, struct.pack("<2q", 0, 3))), packed(3, [4])),
        node("Relu", ["sv"], ["y"]),
        y,
    )
    yield "external-data", model(init("w", [4, 4], FLOAT, None, m(T_EXTERNAL, *ext), i(T_LOCATION, 1)), *linear[3:])
    yield "training-and-functions", msg(
        i(MODEL_IR, 8),
        OPSET,
        m(MODEL_GRAPH, *linear),
        m(MODEL_TRAINING, m(1, s(GRAPH_NAME, "init"), init("t", [2]))),
        m(
            MODEL_FUNCTIONS,
            s(1, "f"),
            s(10, "local"),
            s(4, "a"),
            s(5, "b"),
            node("Constant", [], ["c"], attr_tensor("value", tensor("c", [2])), field=7),
            node("Add", ["a", "c"], ["b"], field=7),
        ),
    )
    yield "custom-domain", model(x, node("Gelu", ["x"], ["y"], domain="com.microsoft"), y)
    yield "deep-subgraphs", model(x, nested_if(12), y)


def nested_if(depth):
    inner = [node("Relu", ["x"], ["y"]), value(GRAPH_OUTPUT, "y")]
    for _ in range(depth):
        inner = [node("If", ["x"], ["y"], attr_graph("then_branch", *inner)), value(GRAPH_OUTPUT, "y")]
    return inner[0]


# --------------------------------------------------------------------------
# load_with_external inputs: mirrors `external_model` in fuzz/bodies.rs.

LOCATIONS = [
    "w.bin", "./w.bin", "sub/w.bin", "sub/./w.bin", "sub//w.bin", "model.onnx", "missing.bin",
    "sub", ".", "", "../w.bin", "sub/../w.bin", "../outside.bin", "/etc/hostname", "out.bin",
    "up/outside.bin", "up/model/w.bin", "w.bin\0.txt", "w.bin/", "W.BIN",
]
DTYPES = [1, 7, 10, 2, 22, 26, 8, 0, 11, 16]
EXTERNAL, TEXT_LOCATION, NO_LOCATION, OFFSET, LENGTH, EXTRA = 0x1, 0x8, 0x10, 0x20, 0x40, 0x80
INIT, CONSTANT, SPARSE = 0, 1, 2


def number(kind, arg=None):
    """`number()` in bodies.rs: selector byte and its operand."""
    if kind == "byte":
        return bytes([1, arg])
    if kind == "u64":
        return bytes([10]) + struct.pack(">Q", arg)
    if kind == "text":
        data = arg.encode()
        return bytes([13, len(data)]) + data
    return bytes([{"zero": 0, "len": 2, "len+1": 3, "len-1": 4, "needed": 5, "needed-1": 6,
                   "max": 7, "2^62": 9, "-1": 11, "2^64": 12}[kind]])


def dim(d):
    table = {0: 0, 1: 1, 2: 2, 3: 3, 17: 4, -1: 5, 2**63 - 1: 6}
    if d in table:
        return bytes([table[d]])
    return bytes([7]) + struct.pack(">Q", d & (2**64 - 1))


def ext_tensor(dtype=1, dims=(4, 4), location="w.bin", offset=None, length=None,
               flags=EXTERNAL, extra=None, place=INIT, raw_len=0):
    out = bytes([DTYPES.index(dtype), len(dims)]) + b"".join(dim(d) for d in dims)
    if offset is not None:
        flags |= OFFSET
    if length is not None:
        flags |= LENGTH
    if extra is not None:
        flags |= EXTRA
    if isinstance(location, bytes):
        flags |= TEXT_LOCATION
    out += bytes([flags])
    if flags & 0x7:
        if flags & TEXT_LOCATION:
            out += bytes([len(location)]) + location
        else:
            out += bytes([LOCATIONS.index(location)])
        if offset is not None:
            out += number(*offset) if isinstance(offset, tuple) else number(offset)
        if length is not None:
            out += number(*length) if isinstance(length, tuple) else number(length)
        if extra is not None:
            key, text = extra
            out += bytes([0 if key == "location" else 1, len(text)]) + text.encode()
    else:
        out += bytes([raw_len])
    return out + bytes([place])


def ext_case(data_len, *tensors):
    assert data_len < 0xFF00 and 1 <= len(tensors) <= 3
    return bytes([data_len >> 8, data_len & 0xFF, len(tensors) - 1]) + b"".join(tensors)


def external_inputs():
    t = ext_tensor
    yield "whole-file", ext_case(64, t())
    yield "offset-length", ext_case(256, t(offset=("byte", 16), length="needed"))
    yield "length-only", ext_case(100, t(length="needed"))
    yield "subfolder", ext_case(128, t(location="sub/w.bin", length="needed"))
    yield "dot-path", ext_case(64, t(location="./w.bin"))
    yield "double-slash", ext_case(128, t(location="sub//w.bin", length="needed"))
    yield "via-parent-link", ext_case(64, t(location="up/model/w.bin"))
    yield "link-outside", ext_case(64, t(location="out.bin", length="needed"))
    yield "parent-outside", ext_case(64, t(location="up/outside.bin", length="needed"))
    yield "dotdot", ext_case(64, t(location="../w.bin"))
    yield "dotdot-inside", ext_case(64, t(location="sub/../w.bin"))
    yield "absolute", ext_case(64, t(location="/etc/hostname"))
    yield "missing", ext_case(64, t(location="missing.bin"))
    yield "folder", ext_case(64, t(location="sub"))
    yield "empty-location", ext_case(64, t(location=""))
    yield "nul-location", ext_case(64, t(location="w.bin\0.txt"))
    yield "model-itself", ext_case(0, t(dtype=2, dims=(), location="model.onnx", length=("byte", 1)))
    yield "no-location", ext_case(64, t(flags=EXTERNAL | NO_LOCATION))
    yield "text-location", ext_case(64, t(location=b"w.bin"))
    yield "offset-past-end", ext_case(64, t(offset="len+1"))
    yield "offset-at-end", ext_case(64, t(dims=(0,), offset="len"))
    yield "length-past-end", ext_case(64, t(length="len+1"))
    yield "length-max", ext_case(64, t(offset=("byte", 8), length="max"))
    yield "offset-max", ext_case(64, t(offset="max", length="needed"))
    yield "offset-u64", ext_case(64, t(offset=("u64", 2**63), length=("u64", 2**63)))
    yield "offset-negative", ext_case(64, t(offset="-1"))
    yield "offset-overflow", ext_case(64, t(offset="2^64"))
    yield "offset-text", ext_case(80, t(offset=("text", "+16"), length="needed"))
    yield "length-needed-minus-1", ext_case(64, t(length="needed-1"))
    yield "huge-dims", ext_case(64, t(dims=(2**63 - 1, 3)))
    yield "negative-dims", ext_case(64, t(dims=(-1,)))
    yield "int4-packed", ext_case(64, t(dtype=22, dims=(17,), length="needed"))
    yield "int2-packed", ext_case(64, t(dtype=26, dims=(3, 3), length="needed"))
    yield "string-external", ext_case(64, t(dtype=8, dims=(2,)))
    yield "float16", ext_case(64, t(dtype=10, dims=(2, 3), offset=("byte", 2), length="needed"))
    yield "constant-node", ext_case(64, t(place=CONSTANT))
    yield "sparse-values", ext_case(64, t(dims=(4,), length="needed", place=SPARSE))
    yield "duplicate-location", ext_case(64, t(extra=("location", "sub/w.bin"), length="needed"))
    yield "checksum-key", ext_case(64, t(extra=("checksum", "abc")))
    yield "shared-file", ext_case(
        96,
        t(dims=(2, 3), length="needed"),
        t(dims=(3, 2), offset=("byte", 24), length="needed"),
        t(dims=(2, 3), offset=("byte", 48), length="needed", place=CONSTANT),
    )
    yield "mixed-embedded", ext_case(64, t(dims=(2, 2), flags=0, raw_len=16), t(dtype=7, dims=(2,), length="needed"))
    # Raw mode: a protobuf model written verbatim, with w.bin of 64 bytes.
    ext = [m(T_EXTERNAL, s(1, "location"), s(2, "w.bin")), i(T_LOCATION, 1)]
    yield "raw-model", b"\xff" + model(
        value(GRAPH_INPUT, "x", FLOAT, [1, 4]),
        init("we", [4, 4], FLOAT, None, *ext),
        node("MatMul", ["x", "we"], ["y"]),
        value(GRAPH_OUTPUT, "y"),
    )
    yield "raw-model-offset", b"\xff" + model(
        m(GRAPH_INIT, packed(T_DIMS, [8]), i(T_TYPE, FLOAT16), s(T_NAME, "h"),
          m(T_EXTERNAL, s(1, "location"), s(2, "sub/w.bin")),
          m(T_EXTERNAL, s(1, "offset"), s(2, "8")),
          m(T_EXTERNAL, s(1, "length"), s(2, "16")),
          i(T_LOCATION, 1)),
    )


# --------------------------------------------------------------------------
# Plans.

FORMAT = '"format": "onnx-idprune-plan", "version": 1'


def plan(*entries, head=FORMAT):
    return ("{%s, \"blocks\": [%s]}\n" % (head, ", ".join(entries))).encode()


def plan_inputs():
    for path in sorted((FIXTURES / "plans").glob("*.json")):
        yield "fixture-" + path.stem, path.read_bytes()
    text = (FIXTURES / "plans" / "clip_mixed.json").read_bytes()
    yield "truncated", text[: len(text) // 2]
    yield "all-actions", plan(
        '{"tower": "text", "index": 5, "drop_attention": true}',
        '{"tower": "vision", "index": 3, "drop": true}',
        '{"tower": "text", "index": 6, "drop_mlp": true}',
        '{"tower": "vision", "index": 0, "keep_heads": [0, 1, 2, 4]}',
        '{"tower": "text", "index": 2, "keep_mlp": [0, 5, 9], "keep_heads": [1]}',
        '{"tower": "vision", "index": 1, "drop_attention": true, "keep_mlp": [3]}',
    )
    yield "no-blocks-key", ('{%s}' % FORMAT).encode()
    yield "blocks-null", ('{%s, "blocks": null}' % FORMAT).encode()
    yield "escaped-tower", plan('{"tower": "vis\\u0069on", "index": 0, "drop": true}')
    yield "huge-index", plan('{"tower": "text", "index": 18446744073709551615, "drop": true}')
    yield "index-overflow", plan('{"tower": "text", "index": 18446744073709551616, "drop": true}')
    yield "index-negative", plan('{"tower": "text", "index": -1, "drop": true}')
    yield "index-float", plan('{"tower": "text", "index": 1.0, "drop": true}')
    yield "huge-keep", plan('{"tower": "text", "index": 0, "keep_heads": [0, 18446744073709551615]}')
    yield "wrong-format", plan(head='"format": "x", "version": 1')
    yield "version-2", plan(head='"format": "onnx-idprune-plan", "version": 2')
    yield "version-negative", plan(head='"format": "onnx-idprune-plan", "version": -1')
    yield "unknown-key", plan(head=FORMAT + ', "extra": 1')
    yield "duplicate-key", plan(head=FORMAT + ', "version": 1')
    yield "unknown-tower", plan('{"tower": "audio", "index": 0, "drop": true}')
    yield "entry-unknown-key", plan('{"tower": "text", "index": 0, "drop": true, "why": "x"}')
    yield "no-action", plan('{"tower": "text", "index": 0}')
    yield "false-actions", plan('{"tower": "text", "index": 0, "drop": false, "drop_mlp": true}')
    yield "duplicate-block", plan(
        '{"tower": "text", "index": 1, "drop": true}', '{"tower": "text", "index": 1, "drop_mlp": true}'
    )
    yield "keep-empty", plan('{"tower": "text", "index": 0, "keep_heads": []}')
    yield "keep-duplicate", plan('{"tower": "text", "index": 0, "keep_mlp": [1, 1]}')
    yield "keep-descending", plan('{"tower": "text", "index": 0, "keep_mlp": [3, 1]}')
    yield "drop-and-more", plan('{"tower": "text", "index": 0, "drop": true, "keep_mlp": [1]}')
    yield "contradiction", plan('{"tower": "text", "index": 0, "drop_attention": true, "keep_heads": [0]}')
    yield "keep-null", plan('{"tower": "text", "index": 0, "keep_heads": null, "drop": true}')
    yield "many-blocks", plan(
        *['{"tower": "%s", "index": %d, "keep_mlp": [%s]}'
          % ("text" if k % 3 else "vision", 40 - k, ", ".join(str(j) for j in range(0, k + 1, 2)))
          for k in range(40)]
    )
    yield "zero-below", plan(
        '{"tower": "text", "index": 0, "zero_below": {"q": 0.01, "k": 0, "v": 1e-300, "out": 0.5}}',
        '{"tower": "vision", "index": 1, "keep_heads": [0], "zero_below": {"fc1": 2.5e-3, "fc2": 0.1}}',
        '{"tower": "vision", "index": 0, "drop_attention": true, "zero_below": {"fc2": 0.25}}',
    )
    yield "zero-below-edge-floats", plan(
        '{"tower": "text", "index": 3, "zero_below": {"qkv": -0.0, "fc1": 4.9e-324, "fc2": 1.7976931348623157e308}}'
    )
    yield "zero-below-bad", plan('{"tower": "text", "index": 0, "zero_below": {"fc3": 0.1}}')
    yield "zero-below-negative", plan('{"tower": "text", "index": 0, "zero_below": {"q": -1}}')
    yield "zero-below-overflow", plan('{"tower": "text", "index": 0, "zero_below": {"q": 1e400}}')
    yield "zero-below-empty", plan('{"tower": "text", "index": 0, "zero_below": {}}')
    yield "zero-below-dropped", plan('{"tower": "text", "index": 0, "drop_mlp": true, "zero_below": {"fc1": 0.1}}')
    yield "repair", plan(
        '{"tower": "text", "index": 0, "keep_mlp": [0, 2]}',
        head=FORMAT + ', "repair": {"method": "lsq", "samples": 16}',
    )
    yield "repair-bad", plan(head=FORMAT + ', "repair": {"method": "svd", "samples": 0}')
    yield "nested", b"[" * 300 + b"]" * 300
    yield "bom", b"\xef\xbb\xbf" + plan('{"tower": "text", "index": 0, "drop": true}')
    yield "trailing", plan('{"tower": "text", "index": 0, "drop": true}') + b"}"
    yield "not-utf8", b'{"format": "onnx-idprune-plan\xff", "version": 1}'
    yield "empty", b""
    yield "null", b"null"
    yield "array", b"[]"


# --------------------------------------------------------------------------


def load_model_inputs():
    models = sorted(FIXTURES.glob("*.onnx"))
    smallest = min(models, key=lambda p: (p.stat().st_size, p.name))
    yield "fixture-" + smallest.stem, smallest.read_bytes()
    for path in models:
        yield "f8-" + path.stem, slim_model(path.read_bytes(), "float8")
    small_slim = slim_model(smallest.read_bytes(), "float16")
    yield "f16-" + smallest.stem, small_slim
    tiny = slim_model(smallest.read_bytes(), "float8")
    for cut in (1, 2, 5, 64, 1000, len(tiny) // 3, len(tiny) // 2, len(tiny) - 1):
        yield "cut%d" % cut, tiny[:cut]
    rng = random.Random(20250101)
    for k in range(8):
        flipped = bytearray(tiny)
        for _ in range(1 + k % 4):
            pos = rng.randrange(len(flipped))
            flipped[pos] ^= 1 << rng.randrange(8)
        yield "flip%d" % k, bytes(flipped)
    yield from handmade_models()


def generate():
    return {
        "load_model": dict(load_model_inputs()),
        "parse_plan": dict(plan_inputs()),
        "load_with_external": dict(external_inputs()),
    }


def main():
    check = "--check" in sys.argv[1:]
    stale = False
    total = 0
    for target, seeds in generate().items():
        folder = CORPUS / target
        wanted = {"seed-" + name: data for name, data in seeds.items()}
        assert len(wanted) == len(seeds)
        existing = {p.name for p in folder.glob("seed-*")} if folder.is_dir() else set()
        for name in sorted(existing - set(wanted)):
            stale = True
            if not check:
                (folder / name).unlink()
        for name, data in sorted(wanted.items()):
            total += len(data)
            path = folder / name
            if path.is_file() and path.read_bytes() == data:
                continue
            stale = True
            if not check:
                folder.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        print("%-20s %3d seeds, %8d bytes" % (target, len(wanted), sum(map(len, wanted.values()))))
    print("total %d bytes" % total)
    if check and stale:
        print("the seed corpus is stale: run python3 fuzz/make_corpus.py", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
