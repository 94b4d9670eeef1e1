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
//!   x ─► Linear [q|k|v] ─► com.microsoft GroupQueryAttention(packed, ∅, ∅, past_k, past_v, …;
//!        num_heads, kv_num_heads, do_rotary) ─► Linear out      (onnxruntime-genai's builder)
//! ```
//! Decoder language models add three things on the q/k paths, all followed:
//! rotary position embeddings (`Add(Mul(x, cos), Mul(rotate_half(x), sin))`
//! with `rotate_half = Concat(Neg(Slice), Slice)`, or a `RotaryEmbedding`
//! operator), a key/value cache (`Concat(past, new)` along the sequence, the
//! concatenation being the `present` output), and grouped-query attention:
//! fewer key/value heads than query heads, each repeated for its group by
//! `Unsqueeze ─► Expand ─► Reshape` before the scores.
//!
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
use crate::ir::{NodeId, Producer};

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
    /// The number of key/value heads (grouped-query attention, before the
    /// repeat), in a reshape or in the repeat's `Expand` target.
    KvHeads,
}

/// An entry of a reshape (or repeat `Expand`) target that depends on the
/// head count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeSite {
    /// The Reshape or Expand (the target is its input 1).
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

/// A layer's key/value cache: the graph inputs holding the past keys and
/// values (`[batch, kv_heads, past, head_dim]`) and the outputs holding them
/// with this step's appended. A decoder without past (the first step of a
/// merged decoder) only writes the presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    /// Past keys (a graph input), when the model reads a past.
    pub past_key: Option<String>,
    /// Past values (a graph input), when the model reads a past.
    pub past_value: Option<String>,
    /// Present keys (a graph output), when the model returns them.
    pub present_key: Option<String>,
    /// Present values (a graph output), when the model returns them.
    pub present_value: Option<String>,
}

impl Cache {
    /// The past inputs, then the present outputs there are.
    pub fn names(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        out.extend(self.past_key.as_deref());
        out.extend(self.past_value.as_deref());
        out.extend(self.present_key.as_deref());
        out.extend(self.present_value.as_deref());
        out
    }
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
    /// Number of (query) heads.
    pub heads: usize,
    /// Number of key/value heads: fewer than `heads` with grouped-query
    /// attention, each shared by `heads / kv_heads` query heads.
    pub kv_heads: usize,
    /// The key/value cache, when the model reads and writes one.
    pub cache: Option<Cache>,
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

    /// Query heads per key/value head (1 without grouped-query attention).
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// The query heads kept when `groups` of the key/value heads are.
    pub fn group_heads(&self, groups: &[usize]) -> Vec<usize> {
        let g = self.group();
        groups.iter().flat_map(|k| k * g..(k + 1) * g).collect()
    }

    /// The key/value heads `keep` (query heads) needs, when `keep` holds
    /// whole groups.
    pub fn kept_groups(&self, keep: &[usize]) -> Option<Vec<usize>> {
        let g = self.group();
        let mut groups: Vec<usize> = keep.iter().map(|h| h / g).collect();
        groups.dedup();
        (self.group_heads(&groups) == keep).then_some(groups)
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
        ("GroupQueryAttention", "com.microsoft") => from_group_query_operator(view, anchor),
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
    /// `Concat(past, new)`: the past (a graph input) and the concatenation.
    cache: Option<(String, String)>,
    /// Where in `path` the grouped-query repeat (`Expand`) sits: nodes
    /// after it are between the projection and the repeat.
    repeat: Option<usize>,
    /// The first value on the way that is also a graph output (a present
    /// written without a past).
    present: Option<String>,
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
    // Keys and values as wide as the queries, or (grouped-query attention)
    // narrower by a whole factor and repeated for each group.
    let kv_width = k.linear.out_features;
    let grouped = !packed && kv_width != q_width;
    if !packed
        && (v.linear.out_features != kv_width
            || kv_width == 0
            || !q_width.is_multiple_of(kv_width)
            || (grouped && (k.repeat.is_none() || v.repeat.is_none())))
    {
        return Err(Miss::new(
            view,
            k.linear.matmul,
            &format!(
                "key and value projections as wide as the query's {q_width}, or narrower by a whole factor and repeated per group (found {} and {})",
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
        .filter(|&d| d > 0 && kv_width % d as usize == 0 && q_width % d as usize == 0)
        .map(|d| d as usize)
        .or_else(|| {
            let d = (1.0 / (scale * scale)).round();
            (scale > 0.0 && scale < 1.0 && d >= 1.0 && kv_width % d as usize == 0)
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
    let kv_heads = if packed { heads } else { kv_width / head_dim };
    // Split reshapes on the q path and on the k/v paths after the repeat
    // count query heads; those between a k/v projection and its repeat
    // count key/value heads, and so does the repeat's Expand target.
    let mut split: Vec<(NodeId, usize, bool)> = Vec::new();
    for (trace, is_kv) in [(&q, false), (&k, true), (&v, true)] {
        for (i, id) in trace.path.iter().enumerate() {
            let before_repeat = is_kv && trace.repeat.is_some_and(|r| i > r);
            let counted = if before_repeat { kv_heads } else { heads };
            if graph.node(*id).op() == "Reshape" && !split.iter().any(|(s, _, _)| s == id) {
                split.push((*id, counted, before_repeat && grouped));
            }
        }
    }
    let merge: Vec<NodeId> = out_path
        .iter()
        .copied()
        .filter(|id| graph.node(*id).op() == "Reshape")
        .collect();
    let mut shape_sites = Vec::new();
    let mut opaque_sites = Vec::new();
    for (id, counted, kv_site, merge) in split
        .iter()
        .map(|&(i, c, kv)| (i, c, kv, false))
        .chain(merge.iter().map(|&i| (i, heads, false, true)))
    {
        match classify(view, id, counted, head_dim, merge) {
            Some(sites) => shape_sites.extend(sites.into_iter().map(|mut s| {
                if kv_site && s.role == ShapeRole::Heads {
                    s.role = ShapeRole::KvHeads;
                }
                s
            })),
            None => opaque_sites.push(id),
        }
    }
    if grouped {
        for trace in [&k, &v] {
            let expand = trace.path[trace.repeat.expect("grouped traces repeat")];
            match repeat_site(view, expand, kv_heads) {
                Some(site) => {
                    if !shape_sites.contains(&site) {
                        shape_sites.push(site);
                    }
                }
                None => opaque_sites.push(expand),
            }
        }
    }
    let cache = cache_of(view, &k, &v);
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
        kv_heads,
        cache,
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
        kv_heads: heads,
        cache: None,
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
    let cache = cache_of(view, &k, &v);
    Ok(Attention {
        projections: Projections::Separate {
            q: q.linear,
            k: k.linear,
            v: v.linear,
        },
        out,
        anchor: id,
        heads,
        kv_heads: heads,
        cache,
        head_dim,
        shape_sites,
        opaque_sites,
        head_attributes,
        packed_bias,
        query_input,
        key_input,
    })
}

/// com.microsoft `GroupQueryAttention` (onnxruntime-genai's model builder):
/// `query` the packed projection `[q (H·D) | k (KV·D) | v (KV·D)]` with
/// `key` and `value` empty, or three projections; rotary embeddings inside
/// (`do_rotary`); the cache its inputs 3-4 (`past_key`, `past_value`) and
/// outputs 1-2 (`present_key`, `present_value`).
fn from_group_query_operator(view: &View<'_>, id: NodeId) -> Result<Attention, Miss> {
    let graph = view.graph;
    let node = graph.node(id);
    let inputs = node.inputs();
    let count = |name: &str| {
        node.attr_int(name)
            .and_then(|h| usize::try_from(h).ok())
            .filter(|h| *h > 0)
            .ok_or_else(|| Miss::new(view, id, "num_heads and kv_num_heads attributes"))
    };
    let (heads, kv_heads) = (count("num_heads")?, count("kv_num_heads")?);
    if !heads.is_multiple_of(kv_heads) {
        return Err(Miss::new(
            view,
            id,
            "a query head count that is a multiple of the key/value head count",
        ));
    }
    let separate = inputs.get(1).is_some_and(|k| !k.is_empty());
    let q = trace_to_linear(view, &inputs[0]).map_err(|m| m.context("query path"))?;
    let (projections, head_dim) = if separate {
        let value = inputs
            .get(2)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Miss::new(view, id, "a value input beside the key input"))?;
        let k = trace_to_linear(view, &inputs[1]).map_err(|m| m.context("key path"))?;
        let v = trace_to_linear(view, value).map_err(|m| m.context("value path"))?;
        let width = q.linear.out_features;
        if !width.is_multiple_of(heads) {
            return Err(Miss::new(view, id, "a query width the head count divides"));
        }
        (
            Projections::Separate {
                q: q.linear.clone(),
                k: k.linear,
                v: v.linear,
            },
            width / heads,
        )
    } else {
        let width = q.linear.out_features;
        let parts = heads + 2 * kv_heads;
        if !width.is_multiple_of(parts) {
            return Err(Miss::new(
                view,
                id,
                "a packed projection of (num_heads + 2·kv_num_heads) heads",
            ));
        }
        (
            Projections::Packed {
                qkv: q.linear.clone(),
            },
            width / parts,
        )
    };
    if !q.path.is_empty() {
        return Err(Miss::new(
            view,
            id,
            "the projection read directly (no layout operators before GroupQueryAttention)",
        ));
    }
    let (out, out_path) = forward_to_linear(view, &node.outputs()[0])?;
    if !out_path.is_empty() {
        return Err(Miss::new(
            view,
            id,
            "the output projection reading the operator's output directly",
        ));
    }
    let graph_input = |slot: usize| {
        inputs
            .get(slot)
            .filter(|v| !v.is_empty() && matches!(graph.producer(v), Some(Producer::Input)))
            .cloned()
    };
    let graph_output = |slot: usize| {
        node.outputs()
            .get(slot)
            .filter(|v| !v.is_empty())
            .and_then(|v| present_output(view, v))
    };
    let cache = Cache {
        past_key: graph_input(3),
        past_value: graph_input(4),
        present_key: graph_output(1),
        present_value: graph_output(2),
    };
    let has_cache = !cache.names().is_empty();
    let query_input = q.linear.input.clone();
    let key_input = match &projections {
        Projections::Separate { k, .. } => k.input.clone(),
        _ => query_input.clone(),
    };
    Ok(Attention {
        projections,
        out,
        anchor: id,
        heads,
        kv_heads,
        cache: has_cache.then_some(cache),
        head_dim,
        shape_sites: Vec::new(),
        opaque_sites: Vec::new(),
        head_attributes: vec![(id, "num_heads"), (id, "kv_num_heads")],
        packed_bias: None,
        query_input,
        key_input,
    })
}

/// Follows `value` back through layout operators, head selection and
/// scaling, rotary embeddings, a cache concatenation and a grouped-query
/// repeat to the linear layer that produced it.
fn trace_to_linear(view: &View<'_>, value: &str) -> Result<Trace, Miss> {
    let graph = view.graph;
    let mut path = Vec::new();
    let mut scale = 1.0f64;
    let mut cache = None;
    let mut repeat = None;
    let mut present = None;
    let mut current = value.to_string();
    for _ in 0..24 {
        if present.is_none() {
            present = present_output(view, &current);
        }
        if let Some(linear) = linear_producing(view, &current) {
            return Ok(Trace {
                linear,
                path,
                scale,
                cache,
                repeat,
                present,
            });
        }
        let Some(id) = view.producer(&current) else {
            return Err(Miss {
                at: format!("value '{current}'"),
                expected: "a linear projection (a MatMul or Gemm with a constant weight)".into(),
            });
        };
        let n = graph.node(id);
        let op = (n.op(), n.domain());
        if let ("Add", "") = op
            && let Some(x) = rotary_input(view, id)
        {
            current = x;
            continue;
        }
        if let ("RotaryEmbedding", "" | "ai.onnx" | "com.microsoft") = op {
            current = n.inputs()[0].clone();
            continue;
        }
        if let ("Concat", "") = op {
            let (past, new) = cache_concat(view, id).ok_or_else(|| {
                Miss::new(
                    view,
                    id,
                    "a cache concatenation Concat(past, new) with the past a graph input",
                )
            })?;
            if cache.replace((past, n.outputs()[0].clone())).is_some() {
                return Err(Miss::new(view, id, "one cache concatenation"));
            }
            current = new;
            continue;
        }
        if !QKV_PATH_OPS.contains(&n.op()) || !n.domain().is_empty() {
            return Err(Miss::new(
                view,
                id,
                "a linear projection, or a layout operator on the way to one",
            ));
        }
        if n.op() == "Expand" && repeat.is_none() {
            repeat = Some(path.len());
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
        expected: "a linear projection within 24 layout steps".into(),
    })
}

/// The input `x` of a rotary embedding written out as
/// `Add(Mul(x, cos), Mul(rotate_half(x), sin))`, where `rotate_half(x)` is
/// `Concat(Neg(Slice(x)), Slice(x))` (halves swapped, one negated).
fn rotary_input(view: &View<'_>, add: NodeId) -> Option<String> {
    let graph = view.graph;
    let inputs = graph.node(add).inputs();
    if inputs.len() != 2 {
        return None;
    }
    let muls: Vec<NodeId> = inputs
        .iter()
        .map(|i| view.producer(i).filter(|m| graph.node(*m).op() == "Mul"))
        .collect::<Option<_>>()?;
    // The rotated side: a Mul reading a Concat of a Neg and a Slice.
    let rotated_source = |mul: NodeId| -> Option<String> {
        graph.node(mul).inputs().iter().find_map(|i| {
            let concat = view
                .producer(i)
                .filter(|c| graph.node(*c).op() == "Concat")?;
            let parts = graph.node(concat).inputs();
            if parts.len() != 2 {
                return None;
            }
            let mut source = None;
            for part in parts {
                let mut p = view.producer(part)?;
                if graph.node(p).op() == "Neg" {
                    p = view.producer(&graph.node(p).inputs()[0])?;
                }
                if graph.node(p).op() != "Slice" {
                    return None;
                }
                let x = view.origin(&graph.node(p).inputs()[0]);
                if source.get_or_insert_with(|| x.clone()) != &x {
                    return None;
                }
            }
            source
        })
    };
    for (rot, plain) in [(muls[1], muls[0]), (muls[0], muls[1])] {
        let Some(x) = rotated_source(rot) else {
            continue;
        };
        if graph
            .node(plain)
            .inputs()
            .iter()
            .any(|i| view.origin(i) == x)
        {
            return Some(x);
        }
    }
    None
}

/// `Concat(past, new)` of a key/value cache: (the past graph input, the
/// new value).
fn cache_concat(view: &View<'_>, concat: NodeId) -> Option<(String, String)> {
    let graph = view.graph;
    let inputs = graph.node(concat).inputs();
    if inputs.len() != 2 {
        return None;
    }
    let is_input = |v: &str| matches!(graph.producer(&view.origin(v)), Some(Producer::Input));
    match (is_input(&inputs[0]), is_input(&inputs[1])) {
        (true, false) => Some((view.origin(&inputs[0]), inputs[1].clone())),
        _ => None,
    }
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
        let target = view.shapes.ints(node.inputs().get(1)?)?;
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

/// The key/value heads entry of a grouped-query repeat's `Expand` target
/// (`[batch, kv_heads, group, seq, head_dim]`): the axis where the input
/// (with its group axis unsqueezed to 1) has the key/value heads.
fn repeat_site(view: &View<'_>, expand: NodeId, kv_heads: usize) -> Option<ShapeSite> {
    let node = view.graph.node(expand);
    let target = view.shapes.ints(node.inputs().get(1)?)?;
    let input = view.shapes.shape(&node.inputs()[0]);
    let n = target.len();
    let kv = kv_heads as i64;
    let position = (0..n)
        .filter(|&p| target[p].value() == Some(kv))
        .find(|&p| {
            input
                .as_ref()
                .and_then(|s| s.get(p))
                .is_some_and(|d| d.value() == Some(kv))
        })
        .or_else(|| (n >= 4 && target[n - 4].value() == Some(kv)).then(|| n - 4))?;
    Some(ShapeSite {
        node: expand,
        position,
        role: ShapeRole::KvHeads,
        len: n,
        wildcard_elsewhere: false,
    })
}

/// The cache of a layer whose key and value paths both concatenate a past.
fn cache_of(view: &View<'_>, k: &Trace, v: &Trace) -> Option<Cache> {
    match (&k.cache, &v.cache) {
        (Some((past_key, key)), Some((past_value, value))) => Some(Cache {
            past_key: Some(past_key.clone()),
            past_value: Some(past_value.clone()),
            present_key: present_output(view, key),
            present_value: present_output(view, value),
        }),
        // No past: the keys and values themselves are the presents.
        (None, None) if k.present.is_some() || v.present.is_some() => Some(Cache {
            past_key: None,
            past_value: None,
            present_key: k.present.clone(),
            present_value: v.present.clone(),
        }),
        _ => None,
    }
}

/// The graph output carrying `value` (itself or a transparent copy).
fn present_output(view: &View<'_>, value: &str) -> Option<String> {
    let graph = view.graph;
    if graph.is_output(value) {
        return Some(value.to_string());
    }
    let mut stack = vec![value.to_string()];
    while let Some(v) = stack.pop() {
        for reader in graph.consumers(&v) {
            if view.is_transparent(reader) {
                let out = &graph.node(reader).outputs()[0];
                if graph.is_output(out) {
                    return Some(out.clone());
                }
                stack.push(out.clone());
            }
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
    // A Reshape of another domain may have one input.
    let target = view.shapes.ints(view.graph.node(id).inputs().get(1)?)?;
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
