//! Attention sub-blocks, anchored on `Softmax` or a fused attention op.
//!
//! ```text
//! separate q/k/v (CLIP, BLIP text, BERT):
//!   x ─► Linear q ─► Reshape[B,T,H,D] ─► Transpose ─┐
//!   x ─► Linear k ─► Reshape ─► Transpose ──────────┴► MatMul ─► Mul|Div(scale) ─► [Add(mask)] ─► Softmax
//!   x ─► Linear v ─► Reshape ─► Transpose ─────────────────────────────────────────────┐           │
//!                                                   Linear out ◄─ Reshape ◄─ Transpose ◄┴─ MatMul ◄─┘
//! packed qkv (BLIP vision):
//!   x ─► Linear qkv ─► Reshape[B,T,3,H,D] ─► Transpose ─► Gather(0|1|2) ─► … as above
//! fused (ONNX Runtime optimizer):
//!   x ─► com.microsoft Attention(x, W_qkv, b_qkv; num_heads) ─► Linear out
//! ```
//! Cross-attention is the separate form whose key/value input differs from
//! the query input.

use super::patterns::{
    Linear, const_ints, const_scalar, is_const, linear_at, linear_producing, single_consumer,
};
use crate::ir::{Graph, NodeId};

/// How the query/key/value projections are stored.
// A few values per model: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Projections {
    /// Three linear layers.
    Separate {
        /// Query projection.
        q: Linear,
        /// Key projection.
        k: Linear,
        /// Value projection.
        v: Linear,
    },
    /// One linear layer whose output holds q, k and v.
    Packed {
        /// The packed projection (`out_features = 3 · hidden`).
        qkv: Linear,
    },
    /// A fused attention operator with a packed `[hidden, 3·hidden]` weight.
    Fused {
        /// The operator node.
        node: NodeId,
        /// The packed weight.
        weight: String,
        /// The packed bias.
        bias: Option<String>,
        /// The input width.
        in_features: usize,
        /// The operator's output (the merged heads).
        output: String,
    },
}

/// A recognised attention sub-block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attention {
    /// The projections.
    pub projections: Projections,
    /// The output projection.
    pub out: Linear,
    /// The Softmax (or the fused operator).
    pub anchor: NodeId,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Reshapes that split a projection into heads (`[B, T, H, D]` or packed
    /// `[B, T, 3, H, D]`); their target shape may encode H.
    pub split_sites: Vec<NodeId>,
    /// Reshapes that merge the heads back (`[B, T, H·D]`); their target may
    /// encode the merged width.
    pub merge_sites: Vec<NodeId>,
    /// The value the queries are computed from.
    pub query_input: String,
    /// The value the keys and values are computed from.
    pub key_input: String,
}

impl Attention {
    /// Whether keys and values come from another sequence than queries.
    pub fn is_cross(&self) -> bool {
        self.query_input != self.key_input
    }

    /// Width of the stream the projections read.
    pub fn in_features(&self) -> usize {
        match &self.projections {
            Projections::Separate { q, .. } => q.in_features,
            Projections::Packed { qkv } => qkv.in_features,
            Projections::Fused { in_features, .. } => *in_features,
        }
    }

    /// Width of the concatenated heads.
    pub fn inner_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// The parameter tensors of the projections (weights and biases).
    pub fn parameters(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut linear = |l: &Linear| {
            names.push(l.weight.clone());
            names.extend(l.bias.as_ref().map(|b| b.name.clone()));
        };
        match &self.projections {
            Projections::Separate { q, k, v } => {
                linear(q);
                linear(k);
                linear(v);
            }
            Projections::Packed { qkv } => linear(qkv),
            Projections::Fused { weight, bias, .. } => {
                names.push(weight.clone());
                names.extend(bias.clone());
            }
        }
        names.push(self.out.weight.clone());
        names.extend(self.out.bias.as_ref().map(|b| b.name.clone()));
        names
    }
}

const QKV_PATH_OPS: &[&str] = &[
    "Transpose",
    "Reshape",
    "Cast",
    "Identity",
    "Squeeze",
    "Unsqueeze",
    "Gather",
    "Split",
    "Slice",
    "Mul",
    "Div",
];
const SCORE_PATH_OPS: &[&str] = &["Add", "Mul", "Div", "Cast", "Where", "Sub"];
const CONTEXT_PATH_OPS: &[&str] = &["Transpose", "Reshape", "Cast", "Identity"];

/// Matches the attention sub-block around `anchor` (a Softmax or a fused
/// attention operator). `None`: not an attention this matcher understands.
pub fn match_attention(graph: &Graph, anchor: NodeId) -> Option<Attention> {
    let node = graph.node(anchor);
    match (node.op(), node.domain()) {
        ("Softmax", "") => from_softmax(graph, anchor),
        ("Attention", "com.microsoft") => from_fused(graph, anchor),
        _ => None,
    }
}

fn from_softmax(graph: &Graph, softmax: NodeId) -> Option<Attention> {
    // Scores: walk back (breadth first, a few steps) to the MatMul of two
    // activations; note the scale constant on the way.
    let mut scale = None;
    let mut frontier = vec![graph.node(softmax).inputs()[0].clone()];
    let mut scores = None;
    'search: for _ in 0..6 {
        let mut next = Vec::new();
        for value in frontier {
            let Some(id) = graph.producer_node(&value) else {
                continue;
            };
            let n = graph.node(id);
            if n.op() == "MatMul" && n.inputs().iter().all(|i| !is_const(graph, i)) {
                scores = Some(id);
                break 'search;
            }
            if !SCORE_PATH_OPS.contains(&n.op()) {
                continue;
            }
            if matches!(n.op(), "Mul" | "Div")
                && scale.is_none()
                && let Some(s) = n.inputs().get(1).and_then(|c| const_scalar(graph, c))
            {
                scale = Some((s, n.op() == "Div"));
            }
            next.extend(
                n.inputs()
                    .iter()
                    .filter(|i| !i.is_empty() && !is_const(graph, i))
                    .cloned(),
            );
        }
        frontier = next;
    }
    let scores = scores?;
    // Probabilities forward to the context MatMul.
    let mut probs = graph.node(softmax).outputs()[0].clone();
    let context = loop {
        let next = single_consumer(graph, &probs)?;
        let n = graph.node(next);
        match n.op() {
            "MatMul" if n.inputs()[0] == probs => break next,
            "Cast" | "Dropout" | "Identity" => probs = n.outputs()[0].clone(),
            _ => return None,
        }
    };
    let score_inputs = graph.node(scores).inputs();
    let (q, q_path) = trace_to_linear(graph, &score_inputs[0])?;
    let (k, k_path) = trace_to_linear(graph, &score_inputs[1])?;
    let (v, v_path) = trace_to_linear(graph, &graph.node(context).inputs()[1])?;
    let (out, out_path) = forward_to_linear(graph, &graph.node(context).outputs()[0])?;

    let packed = q.matmul == k.matmul && k.matmul == v.matmul;
    if !packed && (q.matmul == k.matmul || q.matmul == v.matmul || k.matmul == v.matmul) {
        return None;
    }
    let q_width = if packed {
        q.out_features / 3
    } else {
        q.out_features
    };
    if q_width == 0 || (packed && q.out_features % 3 != 0) {
        return None;
    }
    let reshapes = |path: &[NodeId]| -> Vec<NodeId> {
        path.iter()
            .copied()
            .filter(|id| graph.node(*id).op() == "Reshape")
            .collect()
    };
    let mut split_sites = reshapes(&q_path);
    for id in reshapes(&k_path).into_iter().chain(reshapes(&v_path)) {
        if !split_sites.contains(&id) {
            split_sites.push(id);
        }
    }
    let merge_sites = reshapes(&out_path);
    let (heads, head_dim) = head_geometry(graph, &q_path, q_width, scale)?;
    let query_input = q.input.clone();
    let key_input = k.input.clone();
    let projections = if packed {
        Projections::Packed { qkv: q }
    } else {
        Projections::Separate { q, k, v }
    };
    Some(Attention {
        projections,
        out,
        anchor: softmax,
        heads,
        head_dim,
        split_sites,
        merge_sites,
        query_input,
        key_input,
    })
}

fn from_fused(graph: &Graph, id: NodeId) -> Option<Attention> {
    let node = graph.node(id);
    let inputs = node.inputs();
    let weight = graph.initializer(inputs.get(1)?)?;
    let dims = weight.dims();
    if dims.len() != 2 || dims[1] % 3 != 0 {
        return None;
    }
    let heads = usize::try_from(node.attr_int("num_heads")?)
        .ok()
        .filter(|h| *h > 0)?;
    let inner = dims[1] as usize / 3;
    if !inner.is_multiple_of(heads) {
        return None;
    }
    let (out, _) = forward_to_linear(graph, &node.outputs()[0])?;
    Some(Attention {
        projections: Projections::Fused {
            node: id,
            weight: inputs[1].clone(),
            bias: inputs
                .get(2)
                .filter(|b| graph.initializer(b).is_some())
                .cloned(),
            in_features: dims[0] as usize,
            output: node.outputs()[0].clone(),
        },
        out,
        anchor: id,
        heads,
        head_dim: inner / heads,
        split_sites: Vec::new(),
        merge_sites: Vec::new(),
        query_input: inputs[0].clone(),
        key_input: inputs[0].clone(),
    })
}

/// Follows `value` back through reshapes, transposes, head selection and
/// scaling to the linear layer that produced it.
fn trace_to_linear(graph: &Graph, value: &str) -> Option<(Linear, Vec<NodeId>)> {
    let mut path = Vec::new();
    let mut current = value.to_string();
    for _ in 0..12 {
        if let Some(linear) = linear_producing(graph, &current) {
            return Some((linear, path));
        }
        let id = graph.producer_node(&current)?;
        let n = graph.node(id);
        if !QKV_PATH_OPS.contains(&n.op()) {
            return None;
        }
        path.push(id);
        current = match n.op() {
            "Mul" | "Div" => n.inputs().iter().find(|i| !is_const(graph, i))?.clone(),
            _ => n.inputs()[0].clone(),
        };
    }
    None
}

/// Follows `value` forward through the head merge to the output projection.
fn forward_to_linear(graph: &Graph, value: &str) -> Option<(Linear, Vec<NodeId>)> {
    let mut path = Vec::new();
    let mut current = value.to_string();
    for _ in 0..6 {
        let next = single_consumer(graph, &current)?;
        let n = graph.node(next);
        if matches!(n.op(), "MatMul" | "Gemm") {
            return linear_at(graph, next)
                .filter(|l| l.input == current)
                .map(|l| (l, path));
        }
        if !CONTEXT_PATH_OPS.contains(&n.op()) {
            return None;
        }
        path.push(next);
        current = n.outputs()[0].clone();
    }
    None
}

/// Heads and head width from the query path's Reshape constant
/// (`[B, T, H, D]` or packed `[B, T, 3, H, D]`, where one of H and D may be
/// -1 or computed), falling back to the score scale 1/√D.
fn head_geometry(
    graph: &Graph,
    q_path: &[NodeId],
    width: usize,
    scale: Option<(f32, bool)>,
) -> Option<(usize, usize)> {
    let fits = |heads: usize, dim: usize| {
        (heads > 0 && dim > 0 && heads * dim == width).then_some((heads, dim))
    };
    for id in q_path {
        let node = graph.node(*id);
        if node.op() != "Reshape" {
            continue;
        }
        let Some(shape) = shape_constant(graph, &node.inputs()[1]) else {
            continue;
        };
        if shape.len() < 4 {
            continue;
        }
        let (h, d) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        if d > 0 && width.is_multiple_of(d as usize) {
            return fits(width / d as usize, d as usize);
        }
        if h > 0 && width.is_multiple_of(h as usize) {
            return fits(h as usize, width / h as usize);
        }
    }
    let (s, divides) = scale?;
    let dim = if divides { s * s } else { 1.0 / (s * s) };
    let dim = dim.round() as usize;
    (dim > 0 && width.is_multiple_of(dim))
        .then(|| fits(width / dim, dim))
        .flatten()
}

/// The target shape of a Reshape: a constant, or a Concat of pieces where
/// computed pieces (e.g. the batch size) read as 0 ("unknown").
fn shape_constant(graph: &Graph, value: &str) -> Option<Vec<i64>> {
    if let Some(shape) = const_ints(graph, value) {
        return Some(shape);
    }
    let id = graph.producer_node(value)?;
    let node = graph.node(id);
    if node.op() != "Concat" {
        return None;
    }
    let mut shape = Vec::new();
    for piece in node.inputs() {
        match const_ints(graph, piece) {
            Some(values) => shape.extend(values),
            None => shape.push(0),
        }
    }
    Some(shape)
}
