//! Attention sub-blocks, anchored on `Softmax` or a fused attention
//! operator, matched on the normalised view.
//!
//! ```text
//! separate q/k/v (CLIP, BERT, BLIP text; eager or SDPA as exporters lower it):
//!   x ─► Linear q ─► Reshape[…H,D] ─► Transpose ─► [Mul(√scale)] ─┐
//!   x ─► Linear k ─► Reshape ─► Transpose ─► [Mul(√scale)] ───────┴► MatMul ─► [Mul|Div(scale)] ─► [Add(mask)] ─► Softmax
//!   x ─► Linear v ─► Reshape ─► Transpose ──────────────────────────────────────────────┐  [Where(IsNaN(p), 0, p)] ◄─┘
//!                                           Linear out ◄─ Reshape ◄─ Transpose ◄─ MatMul ◄┘
//! packed qkv (BLIP vision, nn.MultiheadAttention's in_proj):
//!   x ─► Linear qkv ─► Reshape ─► Transpose ─► Gather|Split|Slice|Squeeze ─► … as above
//! fused (ONNX Runtime optimizer, opset 23):
//!   x ─► com.microsoft Attention(x, W_qkv, b_qkv; num_heads) ─► Linear out
//!   q, k, v ─► com.microsoft MultiHeadAttention(q, k, v[, bias]; num_heads) ─► Linear out
//!   q, k, v ─► Attention(Q, K, V; q_num_heads, kv_num_heads) ─► Linear out
//! ```
//! Layout operators between the parts are followed whatever the exporter
//! chose (one transpose or three nodes, scales folded into q and k or put
//! on the scores, masks boolean or additive). The head width comes from the
//! inferred size of q at the scores, else from the scale constant, else
//! from a reshape target. Cross-attention is the separate form whose
//! key/value input differs from the query input (another tower's output,
//! or a graph input such as `encoder_hidden_states`).

use super::Miss;
use super::patterns::{Linear, linear_at, linear_producing};
use super::shapes::Expr;
use super::view::{Operand, View};
use crate::ir::NodeId;

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
        /// The packed weight (input 1).
        weight: Operand,
        /// The packed bias (input 2).
        bias: Option<Operand>,
        /// The input width.
        in_features: usize,
        /// The operator's output (the merged heads).
        output: String,
    },
}

/// What an entry of a shape constant means for the head count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeRole {
    /// The number of heads.
    Heads,
    /// The width of all heads together.
    Width,
    /// A product of the head count and an unknown size (batch × heads):
    /// becomes -1 when heads are removed.
    HeadMultiple,
}

/// An entry of a reshape target that depends on the head count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeSite {
    /// The Reshape.
    pub node: NodeId,
    /// Position in its target shape.
    pub position: usize,
    /// What the entry is.
    pub role: ShapeRole,
    /// Entries in the target.
    pub len: usize,
    /// Whether another entry of the target is -1 (inferred), so this one
    /// cannot become -1 too.
    pub wildcard_elsewhere: bool,
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
    /// Reshape target entries that encode the head count or the merged
    /// width.
    pub shape_sites: Vec<ShapeSite>,
    /// Reshapes on the head paths whose targets could not be evaluated:
    /// heads cannot be removed safely while they exist.
    pub opaque_sites: Vec<NodeId>,
    /// Attributes holding the head count (fused operators).
    pub head_attributes: Vec<(NodeId, &'static str)>,
    /// A bias of the q, k and v projections packed into one input of a
    /// fused operator (`MultiHeadAttention` input 3).
    pub packed_bias: Option<Operand>,
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

    /// Whether heads can be removed: every shape entry that depends on
    /// the head count is known and can be rewritten.
    pub fn heads_prunable(&self) -> bool {
        self.opaque_sites.is_empty()
            && self
                .shape_sites
                .iter()
                .all(|s| s.role != ShapeRole::HeadMultiple || !s.wildcard_elsewhere)
    }

    /// Width of the concatenated heads.
    pub fn inner_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// The parameter operands of the projections (weights and biases).
    pub fn parameters(&self) -> Vec<Operand> {
        let mut out = Vec::new();
        let mut linear = |l: &Linear| {
            out.push(l.weight.clone());
            out.extend(l.bias.clone());
        };
        match &self.projections {
            Projections::Separate { q, k, v } => {
                linear(q);
                linear(k);
                linear(v);
            }
            Projections::Packed { qkv } => linear(qkv),
            Projections::Fused { weight, bias, .. } => {
                out.push(weight.clone());
                out.extend(bias.clone());
            }
        }
        out.extend(self.packed_bias.clone());
        out.push(self.out.weight.clone());
        out.extend(self.out.bias.clone());
        out
    }
}

/// Ops on the way from a projection to the scores or the values.
const QKV_PATH_OPS: &[&str] = &[
    "Transpose",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Gather",
    "Split",
    "Slice",
    "Mul",
    "Div",
    "Expand",
];
/// Ops between the score MatMul and the Softmax.
const SCORE_PATH_OPS: &[&str] = &["Add", "Sub", "Mul", "Div", "Where", "Reshape"];
/// Ops between the context MatMul and the output projection.
const CONTEXT_PATH_OPS: &[&str] = &["Transpose", "Reshape"];

/// Matches the attention sub-block around `anchor` (a Softmax or a fused
/// attention operator).
pub fn match_attention(view: &View<'_>, anchor: NodeId) -> Result<Attention, Miss> {
    let node = view.graph.node(anchor);
    match (node.op(), node.domain()) {
        ("Softmax", "") => from_softmax(view, anchor),
        ("Attention", "com.microsoft") => from_packed_operator(view, anchor),
        ("MultiHeadAttention", "com.microsoft") | ("Attention", "" | "ai.onnx") => {
            from_separate_operator(view, anchor)
        }
        _ => Err(Miss::new(view, anchor, "an attention operator")),
    }
}

/// What was found on the way from a projection.
struct Trace {
    linear: Linear,
    /// Layout nodes passed, in order from the attention back to the
    /// projection.
    path: Vec<NodeId>,
    /// Constant factors multiplied in on the way (a scale).
    scale: f64,
}

fn from_softmax(view: &View<'_>, softmax: NodeId) -> Result<Attention, Miss> {
    let graph = view.graph;
    // Scores: walk back (breadth first, a few steps) to the MatMul of two
    // activations; constant factors on the way are the scale.
    let mut score_scale = 1.0f64;
    let mut frontier = vec![graph.node(softmax).inputs()[0].clone()];
    let mut scores = None;
    let mut last = softmax;
    'search: for _ in 0..8 {
        let mut next = Vec::new();
        for value in frontier {
            let Some(id) = view.producer(&value) else {
                continue;
            };
            last = id;
            let n = graph.node(id);
            if n.op() == "MatMul" && n.inputs().iter().all(|i| view.is_data(i)) {
                scores = Some(id);
                break 'search;
            }
            if !SCORE_PATH_OPS.contains(&n.op()) || !n.domain().is_empty() {
                continue;
            }
            if matches!(n.op(), "Mul" | "Div")
                && let Some(c) = n.inputs().get(1).and_then(|c| view.scalar(c))
            {
                score_scale *= if n.op() == "Div" { 1.0 / c } else { c };
            }
            next.extend(
                n.inputs()
                    .iter()
                    .filter(|i| !i.is_empty() && view.is_data(i))
                    .cloned(),
            );
        }
        frontier = next;
    }
    let scores = scores.ok_or_else(|| {
        Miss::new(
            view,
            last,
            "the scores: a MatMul of two activations a few steps before the Softmax",
        )
    })?;
    // Probabilities forward to the context MatMul, through the NaN guard
    // SDPA exports put after a masked Softmax: Where(IsNaN(p), 0, p).
    let mut probs = graph.node(softmax).outputs()[0].clone();
    let context = loop {
        let readers = view.readers(&probs);
        if let Some(guarded) = nan_guard(view, &readers) {
            probs = guarded;
            continue;
        }
        let [(next, read)] = readers.as_slice() else {
            return Err(Miss::new(
                view,
                softmax,
                &format!("one reader of the probabilities (found {})", readers.len()),
            ));
        };
        let n = graph.node(*next);
        match n.op() {
            "MatMul" if n.inputs()[0] == *read => break *next,
            _ => {
                return Err(Miss::new(
                    view,
                    *next,
                    "MatMul(probabilities, values) after the Softmax",
                ));
            }
        }
    };
    let score_inputs = graph.node(scores).inputs();
    let q = trace_to_linear(view, &score_inputs[0]).map_err(|m| m.context("query path"))?;
    let k = trace_to_linear(view, &score_inputs[1]).map_err(|m| m.context("key path"))?;
    let v = trace_to_linear(view, &graph.node(context).inputs()[1])
        .map_err(|m| m.context("value path"))?;
    let (out, out_path) = forward_to_linear(view, &graph.node(context).outputs()[0])?;

    let packed = q.linear.matmul == k.linear.matmul && k.linear.matmul == v.linear.matmul;
    if !packed
        && (q.linear.matmul == k.linear.matmul
            || q.linear.matmul == v.linear.matmul
            || k.linear.matmul == v.linear.matmul)
    {
        return Err(Miss::new(
            view,
            q.linear.matmul,
            "separate q, k and v projections, or one packed projection",
        ));
    }
    let q_width = if packed {
        q.linear.out_features / 3
    } else {
        q.linear.out_features
    };
    if q_width == 0 || (packed && q.linear.out_features % 3 != 0) {
        return Err(Miss::new(
            view,
            q.linear.matmul,
            "a packed projection three times the head width",
        ));
    }
    if !packed && (k.linear.out_features != q_width || v.linear.out_features != q_width) {
        return Err(Miss::new(
            view,
            k.linear.matmul,
            &format!(
                "key and value projections as wide as the query's {q_width} (found {} and {})",
                k.linear.out_features, v.linear.out_features
            ),
        ));
    }
    // Head width: the size of q where it meets k, else the scale
    // (1/√d, split over q and k or on the scores), else a reshape target.
    let scale = q.scale * k.scale * score_scale;
    let head_dim = view
        .shapes
        .last_dim(&score_inputs[0])
        .filter(|&d| d > 0 && q_width % d as usize == 0)
        .map(|d| d as usize)
        .or_else(|| {
            let d = (1.0 / (scale * scale)).round();
            (scale > 0.0 && scale < 1.0 && d >= 1.0 && q_width % d as usize == 0)
                .then_some(d as usize)
        })
        .or_else(|| reshape_head_dim(view, &q.path, q_width))
        .ok_or_else(|| {
            Miss::new(
                view,
                scores,
                "a head width: from q's inferred size, the score scale or a reshape target",
            )
        })?;
    let heads = q_width / head_dim;
    let mut split: Vec<NodeId> = Vec::new();
    for id in q.path.iter().chain(&k.path).chain(&v.path) {
        if graph.node(*id).op() == "Reshape" && !split.contains(id) {
            split.push(*id);
        }
    }
    let merge: Vec<NodeId> = out_path
        .iter()
        .copied()
        .filter(|id| graph.node(*id).op() == "Reshape")
        .collect();
    let mut shape_sites = Vec::new();
    let mut opaque_sites = Vec::new();
    for (&id, merge) in split
        .iter()
        .map(|i| (i, false))
        .chain(merge.iter().map(|i| (i, true)))
    {
        match classify(view, id, heads, head_dim, merge) {
            Some(sites) => shape_sites.extend(sites),
            None => opaque_sites.push(id),
        }
    }
    let query_input = q.linear.input.clone();
    let key_input = k.linear.input.clone();
    let projections = if packed {
        Projections::Packed { qkv: q.linear }
    } else {
        Projections::Separate {
            q: q.linear,
            k: k.linear,
            v: v.linear,
        }
    };
    Ok(Attention {
        projections,
        out,
        anchor: softmax,
        heads,
        head_dim,
        shape_sites,
        opaque_sites,
        head_attributes: Vec::new(),
        packed_bias: None,
        query_input,
        key_input,
    })
}

/// The value after `Where(IsNaN(p), c, p)` when `readers` of `p` are
/// exactly that guard.
fn nan_guard(view: &View<'_>, readers: &[(NodeId, String)]) -> Option<String> {
    let graph = view.graph;
    let [(a, _), (b, _)] = readers else {
        return None;
    };
    let (isnan, guard) = match (graph.node(*a).op(), graph.node(*b).op()) {
        ("IsNaN", "Where") => (*a, *b),
        ("Where", "IsNaN") => (*b, *a),
        _ => return None,
    };
    let g = graph.node(guard);
    (g.inputs().first() == graph.node(isnan).outputs().first()).then(|| g.outputs()[0].clone())
}

fn from_packed_operator(view: &View<'_>, id: NodeId) -> Result<Attention, Miss> {
    let graph = view.graph;
    let node = graph.node(id);
    let inputs = node.inputs();
    let weight = view
        .operand(id, 1)
        .ok_or_else(|| Miss::new(view, id, "a constant packed weight at input 1"))?;
    let dims = weight
        .read_dims(graph)
        .filter(|d| d.len() == 2 && d[1] % 3 == 0)
        .ok_or_else(|| Miss::new(view, id, "a [hidden, 3·hidden] packed weight"))?;
    let heads = node
        .attr_int("num_heads")
        .and_then(|h| usize::try_from(h).ok())
        .filter(|h| *h > 0)
        .ok_or_else(|| Miss::new(view, id, "a num_heads attribute"))?;
    let inner = dims[1] / 3;
    if !inner.is_multiple_of(heads) {
        return Err(Miss::new(view, id, "a width divisible by num_heads"));
    }
    let (out, _) = forward_to_linear(view, &node.outputs()[0])?;
    let mut head_attributes = vec![(id, "num_heads")];
    if node.attribute("qkv_hidden_sizes").is_some() {
        head_attributes.push((id, "qkv_hidden_sizes"));
    }
    Ok(Attention {
        projections: Projections::Fused {
            node: id,
            weight,
            bias: inputs
                .get(2)
                .filter(|b| !b.is_empty())
                .and_then(|_| view.operand(id, 2)),
            in_features: dims[0],
            output: node.outputs()[0].clone(),
        },
        out,
        anchor: id,
        heads,
        head_dim: inner / heads,
        shape_sites: Vec::new(),
        opaque_sites: Vec::new(),
        head_attributes,
        packed_bias: None,
        query_input: inputs[0].clone(),
        key_input: inputs[0].clone(),
    })
}

/// com.microsoft `MultiHeadAttention(query, key, value[, bias])` and ONNX
/// `Attention(Q, K, V)`: separate projections before the operator.
fn from_separate_operator(view: &View<'_>, id: NodeId) -> Result<Attention, Miss> {
    let graph = view.graph;
    let node = graph.node(id);
    let inputs = node.inputs();
    let fused_ms = node.domain() == "com.microsoft";
    if inputs.len() < 3 || inputs[1].is_empty() || inputs[2].is_empty() {
        return Err(Miss::new(
            view,
            id,
            "separate query, key and value inputs (packed forms are not supported)",
        ));
    }
    let q = trace_to_linear(view, &inputs[0]).map_err(|m| m.context("query path"))?;
    let k = trace_to_linear(view, &inputs[1]).map_err(|m| m.context("key path"))?;
    let v = trace_to_linear(view, &inputs[2]).map_err(|m| m.context("value path"))?;
    let (out, out_path) = forward_to_linear(view, &node.outputs()[0])?;
    let width = q.linear.out_features;
    let three_d = view.shapes.shape(&inputs[0]).is_some_and(|s| s.len() == 3) || fused_ms;
    let (heads, head_attributes) = if fused_ms {
        (node.attr_int("num_heads"), vec![(id, "num_heads")])
    } else if three_d {
        (
            node.attr_int("q_num_heads"),
            vec![(id, "q_num_heads"), (id, "kv_num_heads")],
        )
    } else {
        // 4-D inputs [B, H, S, D]: the head count is the size of axis 1.
        (
            view.shapes
                .shape(&inputs[0])
                .and_then(|s| s.get(1))
                .and_then(Expr::value),
            Vec::new(),
        )
    };
    let heads = heads
        .and_then(|h| usize::try_from(h).ok())
        .filter(|h| *h > 0 && width.is_multiple_of(*h))
        .ok_or_else(|| Miss::new(view, id, "a head count (attribute or input layout)"))?;
    if node
        .attr_int("kv_num_heads")
        .is_some_and(|kv| kv as usize != heads)
    {
        return Err(Miss::new(
            view,
            id,
            "as many key/value heads as query heads (grouped-query attention is not supported)",
        ));
    }
    let head_dim = width / heads;
    let packed_bias = if fused_ms {
        inputs
            .get(3)
            .filter(|b| !b.is_empty())
            .and_then(|_| view.operand(id, 3))
    } else {
        None
    };
    let mut shape_sites = Vec::new();
    let mut opaque_sites = Vec::new();
    let mut seen = Vec::new();
    for (path, merge) in [
        (&q.path, false),
        (&k.path, false),
        (&v.path, false),
        (&out_path, true),
    ] {
        for &site in path.iter() {
            if graph.node(site).op() == "Reshape" && !seen.contains(&site) {
                seen.push(site);
                match classify(view, site, heads, head_dim, merge) {
                    Some(sites) => shape_sites.extend(sites),
                    None => opaque_sites.push(site),
                }
            }
        }
    }
    let query_input = q.linear.input.clone();
    let key_input = k.linear.input.clone();
    Ok(Attention {
        projections: Projections::Separate {
            q: q.linear,
            k: k.linear,
            v: v.linear,
        },
        out,
        anchor: id,
        heads,
        head_dim,
        shape_sites,
        opaque_sites,
        head_attributes,
        packed_bias,
        query_input,
        key_input,
    })
}

/// Follows `value` back through layout operators, head selection and
/// scaling to the linear layer that produced it.
fn trace_to_linear(view: &View<'_>, value: &str) -> Result<Trace, Miss> {
    let graph = view.graph;
    let mut path = Vec::new();
    let mut scale = 1.0f64;
    let mut current = value.to_string();
    for _ in 0..16 {
        if let Some(linear) = linear_producing(view, &current) {
            return Ok(Trace {
                linear,
                path,
                scale,
            });
        }
        let Some(id) = view.producer(&current) else {
            return Err(Miss {
                at: format!("value '{current}'"),
                expected: "a linear projection (a MatMul or Gemm with a constant weight)".into(),
            });
        };
        let n = graph.node(id);
        if !QKV_PATH_OPS.contains(&n.op()) || !n.domain().is_empty() {
            return Err(Miss::new(
                view,
                id,
                "a linear projection, or a layout operator on the way to one",
            ));
        }
        path.push(id);
        current = match n.op() {
            "Mul" | "Div" => {
                let inputs = n.inputs();
                let data = inputs
                    .iter()
                    .position(|i| view.is_data(i))
                    .ok_or_else(|| Miss::new(view, id, "a scaled activation"))?;
                if let Some(c) = inputs.get(1 - data.min(1)).and_then(|c| view.scalar(c)) {
                    scale *= if n.op() == "Div" { 1.0 / c } else { c };
                }
                inputs[data].clone()
            }
            _ => n.inputs()[0].clone(),
        };
    }
    Err(Miss {
        at: format!("value '{current}'"),
        expected: "a linear projection within 16 layout steps".into(),
    })
}

/// Follows `value` forward through the head merge to the output projection.
fn forward_to_linear(view: &View<'_>, value: &str) -> Result<(Linear, Vec<NodeId>), Miss> {
    let graph = view.graph;
    let mut path = Vec::new();
    let mut current = value.to_string();
    for _ in 0..8 {
        let Some((next, read)) = view.single_reader(&current) else {
            return Err(Miss {
                at: format!("value '{current}'"),
                expected: "one reader on the way to the output projection".into(),
            });
        };
        let n = graph.node(next);
        if matches!(n.op(), "MatMul" | "Gemm") {
            return linear_at(view, next)
                .filter(|l| l.input == read)
                .map(|l| (l, path))
                .ok_or_else(|| Miss::new(view, next, "the output projection (a constant weight)"));
        }
        if !CONTEXT_PATH_OPS.contains(&n.op()) {
            return Err(Miss::new(
                view,
                next,
                "the output projection, or a Transpose/Reshape merging the heads",
            ));
        }
        path.push(next);
        current = n.outputs()[0].clone();
    }
    Err(Miss {
        at: format!("value '{current}'"),
        expected: "the output projection within 8 steps".into(),
    })
}

/// The head width from a reshape target on the query path (`[…, H, D]`,
/// where one of them may be -1 or computed).
fn reshape_head_dim(view: &View<'_>, path: &[NodeId], width: usize) -> Option<usize> {
    for id in path {
        let node = view.graph.node(*id);
        if node.op() != "Reshape" {
            continue;
        }
        let target = view.shapes.ints(&node.inputs()[1])?;
        if target.len() < 3 {
            continue;
        }
        let (h, d) = (&target[target.len() - 2], &target[target.len() - 1]);
        if let Some(d) = d
            .value()
            .filter(|&d| d > 0 && width.is_multiple_of(d as usize))
        {
            return Some(d as usize);
        }
        if let Some(h) = h
            .value()
            .filter(|&h| h > 0 && width.is_multiple_of(h as usize))
        {
            return Some(width / h as usize);
        }
    }
    None
}

/// The entries of Reshape `id`'s target that depend on the head count.
///
/// Split reshapes (on the q/k/v paths) end in the head width (kept), with
/// the head count — or a product of it with the batch size — one or two
/// entries before; a reshape of the whole packed projection ends in the
/// full width. Merge reshapes end in the merged width. Entries of -1 adapt
/// by themselves.
fn classify(
    view: &View<'_>,
    id: NodeId,
    heads: usize,
    head_dim: usize,
    merge: bool,
) -> Option<Vec<ShapeSite>> {
    let target = view.shapes.ints(&view.graph.node(id).inputs()[1])?;
    let (h, w) = (heads as i64, (heads * head_dim) as i64);
    let n = target.len();
    let site = |position: usize, role: ShapeRole| ShapeSite {
        node: id,
        position,
        role,
        len: n,
        wildcard_elsewhere: target
            .iter()
            .enumerate()
            .any(|(i, e)| i != position && e.value() == Some(-1)),
    };
    let is_multiple = |e: &Expr| !e.symbols.is_empty() && e.factor % h == 0 && e.factor != 0;
    let mut out = Vec::new();
    if n == 0 {
        return Some(out);
    }
    if target[n - 1].value() == Some(w) {
        // The whole width: a merge, or a reshape of the unsplit packed
        // projection ([L, N, 3, W]); nothing else in it counts heads.
        out.push(site(n - 1, ShapeRole::Width));
        return Some(out);
    }
    if merge {
        return Some(out);
    }
    for from_end in [2, 3] {
        let Some(p) = n.checked_sub(from_end) else {
            break;
        };
        let e = &target[p];
        let role = if e.value() == Some(h) {
            Some(ShapeRole::Heads)
        } else if is_multiple(e) {
            Some(ShapeRole::HeadMultiple)
        } else {
            None
        };
        if let Some(role) = role {
            out.push(site(p, role));
            break;
        }
    }
    Some(out)
}
