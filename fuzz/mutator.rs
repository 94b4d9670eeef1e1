//! A structure-aware mutator for `load_model`: decodes the input as a
//! `ModelProto`, makes one or a few graph-level edits (drop or rewire a node
//! input, change an operator, an attribute, a tensor's dims or type,
//! reorder or duplicate nodes, …) and encodes it again.
//!
//! Byte-level mutations almost never produce a valid nested protobuf message
//! with a *different structure* (every enclosing length prefix would have to
//! change too), so without this the fuzzer mostly exercises the protobuf
//! decoder. A share of the mutations is still left to libFuzzer's own byte
//! mutator, for the decoder and the loader's checks.
//!
//! Fuzzing only: not used by the corpus replay test, which runs the bodies
//! in `bodies.rs` on stored inputs.

use bytes::Bytes;
use onnx_idprune::onnx::dtype;
use onnx_idprune::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
    tensor_proto::Segment,
};
use prost::Message;

/// Operators discovery and the IR treat specially, plus a few others.
const OPS: &[&str] = &[
    "Softmax",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "Div",
    "Sub",
    "Transpose",
    "Reshape",
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "Constant",
    "Gather",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
    "Sigmoid",
    "Erf",
    "Tanh",
    "Relu",
    "Cast",
    "Identity",
    "Dropout",
    "Conv",
    "Concat",
    "Split",
    "Shape",
    "Size",
    "Where",
    "If",
    "Loop",
    "Unsqueeze",
    "Slice",
    "Flatten",
    "ReduceMean",
    "Pow",
    "Sqrt",
];

const ATTRS: &[&str] = &[
    "perm",
    "axis",
    "axes",
    "transA",
    "transB",
    "num_heads",
    "epsilon",
    "value",
    "value_int",
    "value_ints",
    "value_float",
    "alpha",
    "beta",
    "to",
    "then_branch",
];

const INTS: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    4,
    8,
    24,
    32,
    64,
    -2,
    i64::MAX,
    i64::MIN,
    1 << 31,
    1 << 32,
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }

    fn int(&mut self) -> i64 {
        if self.below(4) == 0 {
            self.next() as i64
        } else {
            INTS[self.below(INTS.len())]
        }
    }
}

/// libFuzzer's `LLVMFuzzerCustomMutator`: writes the mutated input into
/// `data` and returns its length.
pub fn mutate(data: &mut [u8], size: usize, max_size: usize, seed: u32) -> usize {
    let mut rng = Rng(u64::from(seed) | 1 << 40);
    if rng.below(5) == 0 {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    let Ok(mut model) = ModelProto::decode(&data[..size]) else {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    };
    let Some(graph) = model.graph.as_mut() else {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    };
    for _ in 0..1 + rng.below(3) {
        edit(graph, &mut rng);
    }
    let bytes = model.encode_to_vec();
    if bytes.len() > max_size || bytes.is_empty() {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    data[..bytes.len()].copy_from_slice(&bytes);
    bytes.len()
}

fn value_names(graph: &GraphProto) -> Vec<String> {
    let mut names: Vec<String> = graph.input.iter().map(|v| v.name().to_string()).collect();
    names.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    for node in &graph.node {
        names.extend(node.output.iter().cloned());
    }
    names
}

fn edit(graph: &mut GraphProto, rng: &mut Rng) {
    let nodes = graph.node.len();
    match rng.below(16) {
        // Drop one input or output of a node (arity the matchers assume).
        0 => {
            if let Some(n) = node_mut(graph, rng) {
                let list = if rng.below(3) == 0 {
                    &mut n.output
                } else {
                    &mut n.input
                };
                if !list.is_empty() {
                    let at = rng.below(list.len());
                    if rng.below(2) == 0 {
                        list.remove(at);
                    } else {
                        list.truncate(at);
                    }
                }
            }
        }
        // Rewire an input to another value, an empty name or a new name.
        1 => {
            let names = value_names(graph);
            let choice = match rng.below(6) {
                0 => String::new(),
                1 => format!("fresh{}", rng.below(4)),
                _ => rng.pick(&names).cloned().unwrap_or_default(),
            };
            if let Some(n) = node_mut(graph, rng) {
                if n.input.is_empty() || rng.below(4) == 0 {
                    n.input.push(choice);
                } else {
                    let at = rng.below(n.input.len());
                    n.input[at] = choice;
                }
            }
        }
        // Change the operator (and sometimes the domain).
        2 => {
            let op = rng.pick(OPS).copied().unwrap_or("Add");
            let domain = rng.below(4);
            if let Some(n) = node_mut(graph, rng) {
                n.op_type = Some(op.to_string());
                match domain {
                    0 => n.domain = Some("com.microsoft".into()),
                    1 => n.domain = None,
                    _ => {}
                }
            }
        }
        // Attributes: change a value, drop one, add one.
        3 => {
            let what = rng.below(3);
            let name = rng.pick(ATTRS).copied().unwrap_or("axis");
            let Some(n) = node_mut(graph, rng) else {
                return;
            };
            match what {
                0 if !n.attribute.is_empty() => {
                    let at = rng.below(n.attribute.len());
                    n.attribute.remove(at);
                }
                1 if !n.attribute.is_empty() => {
                    let at = rng.below(n.attribute.len());
                    let attr = &mut n.attribute[at];
                    tweak_attribute(attr, rng);
                }
                _ => {
                    let mut attr = AttributeProto {
                        name: Some(name.to_string()),
                        ..Default::default()
                    };
                    tweak_attribute(&mut attr, rng);
                    n.attribute.push(attr);
                }
            }
        }
        // A tensor's dims or element type, with a payload that matches (so
        // the loader's size check passes and later stages see it).
        4 | 5 => {
            if let Some(t) = tensor_mut(graph, rng) {
                reshape_tensor(t, rng);
            }
        }
        // A tensor turned into a segment, or its payload moved to a typed
        // field, or dropped.
        6 => {
            if let Some(t) = tensor_mut(graph, rng) {
                match rng.below(3) {
                    0 => {
                        t.segment = Some(Segment {
                            begin: Some(0),
                            end: Some(rng.int()),
                        })
                    }
                    1 => {
                        if let Some(raw) = t.raw_data.take() {
                            t.float_data = raw
                                .chunks_exact(4)
                                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                .collect();
                        }
                    }
                    _ => t.raw_data = None,
                }
            }
        }
        // Remove or duplicate a node; duplicates get fresh output names.
        7 => {
            if nodes > 0 {
                let at = rng.below(nodes);
                if rng.below(2) == 0 {
                    graph.node.remove(at);
                } else {
                    let mut copy = graph.node[at].clone();
                    for out in &mut copy.output {
                        out.push_str("_dup");
                    }
                    let to = rng.below(nodes + 1);
                    graph.node.insert(to, copy);
                }
            }
        }
        // Node order: swap two, or reverse all (the IR must sort them).
        8 => {
            if nodes > 1 {
                if rng.below(4) == 0 {
                    graph.node.reverse();
                } else {
                    let (a, b) = (rng.below(nodes), rng.below(nodes));
                    graph.node.swap(a, b);
                }
            }
        }
        // Graph inputs and outputs: drop, add, change the declared type.
        9 => match rng.below(4) {
            0 if !graph.input.is_empty() => {
                let at = rng.below(graph.input.len());
                graph.input.remove(at);
            }
            1 if !graph.output.is_empty() => {
                let at = rng.below(graph.output.len());
                graph.output.remove(at);
            }
            2 => {
                let names = value_names(graph);
                if let Some(name) = rng.pick(&names).cloned() {
                    graph.output.push(ValueInfoProto {
                        name: Some(name),
                        ..Default::default()
                    });
                }
            }
            _ => {
                if !graph.input.is_empty() {
                    let at = rng.below(graph.input.len());
                    retype(&mut graph.input[at], rng);
                }
            }
        },
        // An initializer removed, or renamed onto another value's name.
        10 => {
            if !graph.initializer.is_empty() {
                let at = rng.below(graph.initializer.len());
                if rng.below(2) == 0 {
                    graph.initializer.remove(at);
                } else {
                    let names = value_names(graph);
                    graph.initializer[at].name = rng.pick(&names).cloned();
                }
            }
        }
        // An initializer becomes a Constant node, or a Constant's value an
        // initializer.
        11 => {
            if !graph.initializer.is_empty() && rng.below(2) == 0 {
                let at = rng.below(graph.initializer.len());
                let t = graph.initializer.remove(at);
                graph.node.insert(
                    0,
                    NodeProto {
                        op_type: Some("Constant".into()),
                        output: vec![t.name().to_string()],
                        attribute: vec![AttributeProto {
                            name: Some("value".into()),
                            r#type: Some(4),
                            t: Some(t),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                );
            } else if let Some(at) = graph.node.iter().position(|n| {
                n.op_type() == "Constant" && n.attribute.iter().any(|a| a.t.is_some())
            }) {
                let n = graph.node.remove(at);
                if let (Some(out), Some(mut t)) = (
                    n.output.first().cloned(),
                    n.attribute.into_iter().find_map(|a| a.t),
                ) {
                    t.name = Some(out);
                    graph.initializer.push(t);
                }
            }
        }
        // A node listing the same output twice.
        12 => {
            if let Some(n) = node_mut(graph, rng)
                && let Some(out) = n.output.first().cloned()
            {
                n.output.push(out);
            }
        }
        // Wrap a node into an If subgraph that reads outer values.
        13 => {
            if nodes > 0 {
                let at = rng.below(nodes);
                let inner = graph.node[at].clone();
                let outputs = inner.output.clone();
                graph.node[at] = NodeProto {
                    op_type: Some("If".into()),
                    input: vec![inner.input.first().cloned().unwrap_or_default()],
                    output: outputs.clone(),
                    attribute: vec![AttributeProto {
                        name: Some("then_branch".into()),
                        r#type: Some(5),
                        g: Some(GraphProto {
                            node: vec![inner],
                            output: outputs
                                .into_iter()
                                .map(|name| ValueInfoProto {
                                    name: Some(name),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
            }
        }
        // Swap the two inputs of a node (MatMul(W, x), Add(b, y), …).
        14 => {
            if let Some(n) = node_mut(graph, rng)
                && n.input.len() >= 2
            {
                let (a, b) = (rng.below(n.input.len()), rng.below(n.input.len()));
                n.input.swap(a, b);
            }
        }
        // A node reading its own output (a cycle), or two nodes producing
        // the same value.
        _ => {
            if nodes > 1 {
                let (a, b) = (rng.below(nodes), rng.below(nodes));
                if let Some(out) = graph.node[b].output.first().cloned() {
                    if rng.below(2) == 0 {
                        graph.node[a].input.push(out);
                    } else {
                        graph.node[a].output.push(out);
                    }
                }
            }
        }
    }
}

fn node_mut<'a>(graph: &'a mut GraphProto, rng: &mut Rng) -> Option<&'a mut NodeProto> {
    if graph.node.is_empty() {
        return None;
    }
    // Prefer the operators discovery looks at.
    let interesting: Vec<usize> = (0..graph.node.len())
        .filter(|&i| {
            matches!(
                graph.node[i].op_type(),
                "Softmax"
                    | "MatMul"
                    | "Gemm"
                    | "Add"
                    | "Transpose"
                    | "Reshape"
                    | "LayerNormalization"
                    | "SkipLayerNormalization"
                    | "Attention"
                    | "Constant"
                    | "Gather"
                    | "Mul"
                    | "Div"
            )
        })
        .collect();
    let at = if !interesting.is_empty() && rng.below(3) != 0 {
        interesting[rng.below(interesting.len())]
    } else {
        rng.below(graph.node.len())
    };
    Some(&mut graph.node[at])
}

fn tensor_mut<'a>(graph: &'a mut GraphProto, rng: &mut Rng) -> Option<&'a mut TensorProto> {
    let constants = graph
        .node
        .iter()
        .filter(|n| n.attribute.iter().any(|a| a.t.is_some()))
        .count();
    let total = graph.initializer.len() + constants;
    if total == 0 {
        return None;
    }
    let at = rng.below(total);
    if at < graph.initializer.len() {
        return graph.initializer.get_mut(at);
    }
    graph
        .node
        .iter_mut()
        .filter_map(|n| n.attribute.iter_mut().find_map(|a| a.t.as_mut()))
        .nth(at - graph.initializer.len())
}

fn tweak_attribute(attr: &mut AttributeProto, rng: &mut Rng) {
    match rng.below(6) {
        0 => {
            attr.r#type = Some(2);
            attr.i = Some(rng.int());
        }
        1 => {
            attr.r#type = Some(7);
            let len = rng.below(5);
            attr.ints = (0..len).map(|_| rng.int()).collect();
        }
        2 => {
            attr.r#type = Some(1);
            attr.f = Some([0.0, -1.0, 1e-5, f32::NAN, f32::INFINITY, 0.125, 8.0][rng.below(7)]);
        }
        3 => {
            if attr.ints.is_empty() {
                attr.i = Some(rng.int());
            } else {
                let at = rng.below(attr.ints.len());
                attr.ints[at] = rng.int();
            }
        }
        4 => {
            let mut t = TensorProto {
                data_type: Some(1),
                ..Default::default()
            };
            reshape_tensor(&mut t, rng);
            attr.r#type = Some(4);
            attr.t = Some(t);
        }
        _ => {
            attr.r#type = Some(rng.below(16) as i32);
        }
    }
}

/// New dims and/or element type, with a zero-filled payload of the size the
/// loader expects when it is small enough (else none at all).
fn reshape_tensor(t: &mut TensorProto, rng: &mut Rng) {
    match rng.below(4) {
        0 => {
            let rank = rng.below(5);
            t.dims = (0..rank)
                .map(|_| {
                    if rng.below(3) == 0 {
                        rng.int()
                    } else {
                        rng.below(40) as i64
                    }
                })
                .collect();
        }
        1 if !t.dims.is_empty() => {
            let at = rng.below(t.dims.len());
            t.dims[at] = if rng.below(2) == 0 {
                rng.int()
            } else {
                rng.below(65) as i64
            };
        }
        2 => {
            t.dims.reverse();
            if rng.below(2) == 0 {
                t.dims.pop();
            } else {
                t.dims.push(1 + rng.below(3) as i64);
            }
        }
        _ => {
            t.data_type = Some([1, 7, 6, 10, 11, 16, 2, 3, 9, 22, 8, 0][rng.below(12)]);
        }
    }
    let elements = t.dims.iter().try_fold(1u64, |acc, &d| {
        u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    });
    t.float_data.clear();
    t.int32_data.clear();
    t.int64_data.clear();
    t.segment = None;
    t.raw_data = match elements.and_then(|n| dtype::raw_len(t.data_type(), n)) {
        Some(len) if len <= 1 << 16 => Some(Bytes::from(vec![0u8; len as usize])),
        _ => t.raw_data.take(),
    };
}

fn retype(input: &mut ValueInfoProto, rng: &mut Rng) {
    use onnx_idprune::onnx::proto::{
        TensorShapeProto, TypeProto,
        tensor_shape_proto::{Dimension, dimension::Value},
        type_proto,
    };
    let rank = rng.below(5);
    let elem = [1, 7, 6, 10, 9][rng.below(5)];
    input.r#type = Some(TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(elem),
            shape: Some(TensorShapeProto {
                dim: (0..rank)
                    .map(|_| Dimension {
                        value: Some(if rng.below(2) == 0 {
                            Value::DimValue(rng.below(8) as i64)
                        } else {
                            Value::DimParam("n".into())
                        }),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    });
}
