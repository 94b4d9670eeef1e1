//! Discovery: the towers and transformer blocks of a model, found from the
//! graph's structure.
//!
//! Matching runs on a normalised view of the graph ([`view`]): it sees
//! through `Identity`, `Cast`, dropout, fake quantisation and dequantising
//! chains, and knows constant values and tensor sizes from a partial shape
//! inference ([`shapes`]). What it finds is named in the original graph, so
//! the rewrites edit exactly the nodes and tensors the model has.
//!
//! Matching starts from anchors (Softmax or a fused attention operator for
//! attention; any linear layer for MLPs), then follows each sub-block's
//! output to its residual join (`Add`, or a fused `SkipLayerNormalization`;
//! through a layer-scale `Mul`) and chains sub-blocks along the residual
//! stream: a block is a self-attention, an optional cross-attention and an
//! MLP, each reading the stream the previous one wrote. The norm placement
//! follows from where the layer norms sit:
//!
//! ```text
//! pre   x ─► LN ─► attention ─► Add(x, ·) = h ─► LN ─► MLP ─► Add(h, ·) = y
//! post  x ─► attention ─► Add(x, ·) ─► LN = h ─► MLP ─► Add(h, ·) ─► LN = y
//! fused x ─► SkipLN(attention, x)[0] ─► MLP …, the stream in SkipLN output 3
//! ```
//!
//! Towers come from reachability: blocks downstream of the token input (an
//! integer input read by an embedding `Gather`) form the text tower, the
//! others the vision tower. Node names are never needed.
//!
//! Sub-blocks outside a tower's chain of blocks (an attention-pooling head,
//! a pooler's MLP) are left alone and listed; a sub-block *inside* the
//! chain that is not part of a block is an error, because skipping it would
//! renumber every block after it.

mod attention;
mod mlp;
pub mod patterns;
pub mod shapes;
pub mod view;

use std::collections::{HashMap, HashSet};

use serde::Serialize;

pub use attention::{Attention, Cache, Projections, ShapeRole, ShapeSite};
pub use mlp::Mlp;
pub use patterns::{Bias, LayerNorm, Linear, NormKind};
pub use view::{Operand, Step, View};

use crate::ir::{Graph, NodeId};
use crate::onnx::dtype;

/// Which tower a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TowerKind {
    /// The image encoder.
    Vision,
    /// The text encoder (or decoder).
    Text,
}

impl TowerKind {
    /// `vision` or `text`.
    pub fn name(self) -> &'static str {
        match self {
            TowerKind::Vision => "vision",
            TowerKind::Text => "text",
        }
    }
}

impl std::str::FromStr for TowerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vision" => Ok(TowerKind::Vision),
            "text" => Ok(TowerKind::Text),
            other => Err(format!(
                "unknown tower '{other}' (expected 'vision' or 'text')"
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for TowerKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a block's layer norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// Before each sub-block, inside the residual branch (CLIP, BLIP vision).
    Pre,
    /// After each residual add (BERT, BLIP text).
    Post,
    /// Fused into `SkipLayerNormalization` by the ONNX Runtime optimizer.
    Fused,
}

/// Why a pattern did not match, for `inspect --explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Miss {
    /// Where matching stopped (a node label or a value).
    pub at: String,
    /// What was expected there.
    pub expected: String,
}

impl Miss {
    pub(crate) fn new(view: &View<'_>, node: NodeId, expected: &str) -> Self {
        Self {
            at: view.graph.node(node).label(),
            expected: expected.to_string(),
        }
    }

    pub(crate) fn context(self, what: &str) -> Self {
        Self {
            expected: format!("{what}: {}", self.expected),
            ..self
        }
    }
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped at {}, expected {}", self.at, self.expected)
    }
}

/// Where a sub-block's output re-enters the residual stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The `Add` or `SkipLayerNormalization` node.
    pub node: NodeId,
    /// The residual stream entering the join (the skip connection), as
    /// the join node reads it.
    pub stream_in: String,
    /// The residual sum, when the graph materialises it.
    pub sum: Option<String>,
    /// The stream leaving: the sum (pre-norm) or its norm (post-norm).
    pub stream_out: String,
    /// The norm applied to the sum (post-norm and fused forms).
    pub norm: Option<LayerNorm>,
    /// A bias the fused join adds (SkipLayerNormalization input 4).
    pub bias: Option<Bias>,
    /// A per-channel layer-scale factor between the branch and the join
    /// (DINOv2, CaiT).
    pub layer_scale: Option<Operand>,
}

/// One residual sub-block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubBlock<T> {
    /// The matched computation.
    pub body: T,
    /// The norm in front of it (pre-norm and fused forms).
    pub input_norm: Option<LayerNorm>,
    /// Where it joins the stream.
    pub join: Join,
}

/// A transformer block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Position in its tower, in execution order from 0.
    pub index: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// Norm placement.
    pub norm: NormPlacement,
    /// Self-attention.
    pub attention: SubBlock<Attention>,
    /// Cross-attention to another sequence (BLIP text).
    pub cross_attention: Option<SubBlock<Attention>>,
    /// The MLP.
    pub mlp: SubBlock<Mlp>,
    /// Whether each sub-block's norm sits after its residual join (post-norm,
    /// and fused post-norm), rather than in front of the sub-block.
    pub norm_after_join: bool,
    /// Number of parameters (weights, biases, norm and layer-scale
    /// parameters), each use counted: a tensor the exporter shares between
    /// layers counts in each, as the source model's parameters do.
    pub params: u64,
}

/// One linear layer of a block, named by its plan role
/// ([`crate::plan::LINEAR_ROLES`]).
#[derive(Debug, Clone, Copy)]
pub struct RoleLinear<'a> {
    /// `q`, `k`, `v`, `qkv`, `out`, `fc1`, `up` (gated MLPs) or `fc2`.
    pub role: &'static str,
    /// The node that reads the weight: the MatMul/Gemm, or the fused
    /// attention operator (weight at input 1).
    pub node: NodeId,
    /// The recognised linear layer (none for a fused operator's packed
    /// projection).
    pub linear: Option<&'a Linear>,
    /// Whether the layer belongs to the attention sub-block.
    pub attention: bool,
    /// The weight.
    pub weight: &'a Operand,
    /// The bias, if any.
    pub bias: Option<&'a Operand>,
    /// The layer's output value (after its bias).
    pub output: &'a str,
}

impl Block {
    /// The block's self-attention and MLP linear layers by role, in
    /// execution order.
    pub fn linears(&self) -> Vec<RoleLinear<'_>> {
        fn of<'a>(role: &'static str, linear: &'a Linear, attention: bool) -> RoleLinear<'a> {
            RoleLinear {
                role,
                node: linear.matmul,
                linear: Some(linear),
                attention,
                weight: &linear.weight,
                bias: linear.bias.as_ref(),
                output: &linear.output,
            }
        }
        let mut out = Vec::new();
        match &self.attention.body.projections {
            Projections::Separate { q, k, v } => {
                out.extend([of("q", q, true), of("k", k, true), of("v", v, true)])
            }
            Projections::Packed { qkv } => out.push(of("qkv", qkv, true)),
            Projections::Fused {
                node,
                weight,
                bias,
                output,
                ..
            } => out.push(RoleLinear {
                role: "qkv",
                node: *node,
                linear: None,
                attention: true,
                weight,
                bias: bias.as_ref(),
                output,
            }),
        }
        out.push(of("out", &self.attention.body.out, true));
        out.push(of("fc1", &self.mlp.body.fc1, false));
        if let Some(up) = &self.mlp.body.up {
            out.push(of("up", up, false));
        }
        out.push(of("fc2", &self.mlp.body.fc2, false));
        out
    }

    /// `rms` when the block's norms are RMS norms, else `layer`.
    pub fn norm_kind(&self) -> &'static str {
        let norms = [
            &self.attention.input_norm,
            &self.attention.join.norm,
            &self.mlp.input_norm,
            &self.mlp.join.norm,
        ];
        let rms = norms.iter().filter_map(|n| n.as_ref()).any(|n| n.rms);
        if rms { "rms" } else { "layer" }
    }

    /// The residual stream entering the block.
    pub fn input(&self) -> &str {
        &self.attention.join.stream_in
    }
    /// The residual stream leaving the block.
    pub fn output(&self) -> &str {
        &self.mlp.join.stream_out
    }

    /// Every parameter operand of the block: each sub-block's weights and
    /// biases, its fused join bias, its layer scale and its norm.
    pub fn parameters(&self) -> Vec<Operand> {
        let mut out = Vec::new();
        let norm = |norm: &Option<LayerNorm>| -> Vec<Operand> {
            norm.iter()
                .flat_map(|n| n.scale.iter().chain(&n.bias).cloned())
                .collect()
        };
        let mut sub = |params: Vec<Operand>, input_norm: &Option<LayerNorm>, join: &Join| {
            out.extend(params);
            out.extend(join.bias.clone());
            out.extend(join.layer_scale.clone());
            // Each norm is counted once: pre-norm blocks own the norm in
            // front of each sub-block, post-norm blocks the one after it.
            if self.norm_after_join {
                out.extend(norm(&join.norm));
            } else {
                out.extend(norm(input_norm));
            }
        };
        sub(
            self.attention.body.parameters(),
            &self.attention.input_norm,
            &self.attention.join,
        );
        if let Some(cross) = &self.cross_attention {
            sub(cross.body.parameters(), &cross.input_norm, &cross.join);
        }
        sub(
            self.mlp.body.parameters(),
            &self.mlp.input_norm,
            &self.mlp.join,
        );
        out
    }
}

/// A tower: its blocks in execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tower {
    /// Vision or text.
    pub kind: TowerKind,
    /// The blocks, `blocks[i].index == i`.
    pub blocks: Vec<Block>,
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Architecture {
    /// Towers present, vision first.
    pub towers: Vec<Tower>,
    /// Parameters of the whole model as stored: elements of the stored
    /// tensors (initializers, `Constant` nodes) with more than one element
    /// that hold floating-point weights, or integer weights a dequantising
    /// node reads.
    pub params_total: u64,
    /// Recognised sub-blocks outside every tower's chain of blocks (heads,
    /// poolers), left untouched.
    pub outside: Vec<String>,
}

impl Architecture {
    /// The tower of `kind`, if present.
    pub fn tower(&self, kind: TowerKind) -> Option<&Tower> {
        self.towers.iter().find(|t| t.kind == kind)
    }

    /// Parameters inside transformer blocks.
    pub fn params_blocks(&self) -> u64 {
        self.towers
            .iter()
            .flat_map(|t| &t.blocks)
            .map(|b| b.params)
            .sum()
    }

    /// The JSON form of `inspect --json` (DESIGN.md §3).
    pub fn to_json(&self) -> serde_json::Value {
        let towers: Vec<serde_json::Value> = self
            .towers
            .iter()
            .map(|t| {
                let blocks: Vec<serde_json::Value> = t
                    .blocks
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "index": b.index,
                            "hidden": b.hidden,
                            "heads": b.attention.body.heads,
                            "kv_heads": b.attention.body.kv_heads,
                            "head_dim": b.attention.body.head_dim,
                            "mlp": b.mlp.body.width(),
                            "gated": b.mlp.body.up.is_some(),
                            "norm": b.norm,
                            "norm_kind": b.norm_kind(),
                            "cache": b.attention.body.cache.is_some(),
                            "cross_attention": b.cross_attention.is_some(),
                            "params": b.params,
                        })
                    })
                    .collect();
                serde_json::json!({"name": t.kind.name(), "blocks": blocks})
            })
            .collect();
        serde_json::json!({
            "towers": towers,
            "params_total": self.params_total,
            "params_blocks": self.params_blocks(),
            "outside": self.outside,
        })
    }
}

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverError {
    /// Nothing that looks like a transformer block.
    #[error(
        "no transformer block found ({0}; `inspect --explain` says where each pattern stopped)"
    )]
    NoBlocks(String),
    /// Blocks found, but no tower input to assign them to.
    #[error("transformer blocks found, but {0}")]
    NoTowers(String),
    /// A block's linear layers do not hold floating-point weights of one
    /// element type (an edited or corrupted export: no runtime would run it,
    /// and slicing it would only carry the defect over).
    #[error("{0}")]
    WeightTypes(String),
    /// Recognised blocks of a tower do not follow each other.
    #[error("{0}")]
    Gap(String),
}

/// Everything matching tried, for `inspect --explain`.
struct Found {
    attentions: Vec<SubBlock<Attention>>,
    mlps: Vec<SubBlock<Mlp>>,
    /// Attention anchors that did not match, with why.
    unrecognised_anchors: Vec<(NodeId, Miss)>,
    /// One line per anchor and MLP candidate.
    explanations: Vec<String>,
    anchors: usize,
}

/// Runs every matcher over the graph.
fn find_sub_blocks(view: &View<'_>, order: &HashMap<NodeId, usize>) -> Found {
    let graph = view.graph;
    let mut by_order: Vec<NodeId> = order.keys().copied().collect();
    by_order.sort_by_key(|id| order[id]);
    let mut found = Found {
        attentions: Vec::new(),
        mlps: Vec::new(),
        unrecognised_anchors: Vec::new(),
        explanations: Vec::new(),
        anchors: 0,
    };
    let mut attention_linears: HashSet<NodeId> = HashSet::new();
    for &id in &by_order {
        let node = graph.node(id);
        let anchor = matches!(
            (node.op(), node.domain()),
            ("Softmax", "")
                | ("Attention", "com.microsoft" | "" | "ai.onnx")
                | (
                    "MultiHeadAttention" | "GroupQueryAttention",
                    "com.microsoft"
                )
        );
        if !anchor {
            continue;
        }
        found.anchors += 1;
        let label = node.label();
        let matched = attention::match_attention(view, id).and_then(|body| {
            let join = raw_join(view, &body.out.output).ok_or_else(|| Miss {
                at: format!("value '{}'", body.out.output),
                expected: "the output projection's output joining a residual stream (an Add or a Skip(Simplified)LayerNormalization, through an optional layer-scale Mul)".into(),
            })?;
            Ok((body, join))
        });
        match matched {
            Ok((body, join)) => {
                found.explanations.push(format!(
                    "attention at {label}: matched ({} heads{} × {}, {}{}{})",
                    body.heads,
                    if body.kv_heads != body.heads {
                        format!(" sharing {} key/value heads", body.kv_heads)
                    } else {
                        String::new()
                    },
                    body.head_dim,
                    match &body.projections {
                        Projections::Separate { .. } => "separate q/k/v",
                        Projections::Packed { .. } => "packed qkv",
                        Projections::Fused { .. } => "fused operator",
                    },
                    if body.is_cross() {
                        ", cross-attention"
                    } else {
                        ""
                    },
                    if body.cache.is_some() {
                        ", with a key/value cache"
                    } else {
                        ""
                    }
                ));
                attention_linears.insert(body.out.matmul);
                match &body.projections {
                    Projections::Separate { q, k, v } => {
                        attention_linears.extend([q.matmul, k.matmul, v.matmul])
                    }
                    Projections::Packed { qkv } => {
                        attention_linears.insert(qkv.matmul);
                    }
                    Projections::Fused { .. } => {}
                }
                let input_norm = patterns::norm_producing(view, &body.query_input);
                found.attentions.push(SubBlock {
                    body,
                    input_norm,
                    join,
                });
            }
            Err(miss) => {
                found
                    .explanations
                    .push(format!("attention at {label}: {miss}"));
                found.unrecognised_anchors.push((id, miss));
            }
        }
    }
    // The up projections of gated MLPs already matched: not MLPs of their own.
    let mut gated_up: HashSet<NodeId> = HashSet::new();
    for &id in &by_order {
        if attention_linears.contains(&id) || gated_up.contains(&id) {
            continue;
        }
        let Some(fc1) = patterns::linear_at(view, id) else {
            continue;
        };
        let label = graph.node(id).label();
        let matched = mlp::match_mlp(view, &fc1, order).and_then(|body| {
            let join = raw_join(view, &body.fc2.output).ok_or_else(|| Miss {
                at: format!("value '{}'", body.fc2.output),
                expected: "fc2's output joining a residual stream (an Add or a Skip(Simplified)LayerNormalization, through an optional layer-scale Mul)".into(),
            })?;
            Ok((body, join))
        });
        match matched {
            Ok((body, join)) => {
                found.explanations.push(format!(
                    "MLP at {label}: matched ({} → {} → {}{})",
                    body.fc1.in_features,
                    body.width(),
                    body.fc2.out_features,
                    if body.up.is_some() { ", gated" } else { "" }
                ));
                if let Some(up) = &body.up {
                    gated_up.insert(up.matmul);
                }
                let input_norm = patterns::norm_producing(view, &body.fc1.input);
                found.mlps.push(SubBlock {
                    body,
                    input_norm,
                    join,
                });
            }
            Err(miss) => found.explanations.push(format!("MLP at {label}: {miss}")),
        }
    }
    found
}

/// For `inspect --explain`: one line per attention anchor and MLP
/// candidate, saying what matched or where the pattern stopped, then what
/// discovery concluded.
pub fn explain(graph: &Graph) -> Vec<String> {
    let view = View::new(graph);
    let order = node_order(graph);
    let mut lines = find_sub_blocks(&view, &order).explanations;
    match discover_in(&view) {
        Ok(arch) => {
            for tower in &arch.towers {
                lines.push(format!(
                    "{} tower: {} blocks",
                    tower.kind.name(),
                    tower.blocks.len()
                ));
            }
            for note in &arch.outside {
                lines.push(format!("outside the block chain: {note}"));
            }
        }
        Err(e) => lines.push(format!("discovery: {e}")),
    }
    lines
}

fn node_order(graph: &Graph) -> HashMap<NodeId, usize> {
    graph
        .nodes()
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect()
}

/// Finds the towers and blocks of `graph`.
pub fn discover(graph: &Graph) -> Result<Architecture, DiscoverError> {
    discover_in(&View::new(graph))
}

fn discover_in(view: &View<'_>) -> Result<Architecture, DiscoverError> {
    let graph = view.graph;
    let order = node_order(graph);
    let Found {
        attentions,
        mlps,
        unrecognised_anchors,
        anchors,
        ..
    } = find_sub_blocks(view, &order);
    if attentions.is_empty() || mlps.is_empty() {
        let first_miss = unrecognised_anchors
            .first()
            .map(|(_, m)| format!("; the first attention {m}"))
            .unwrap_or_default();
        return Err(DiscoverError::NoBlocks(format!(
            "{anchors} attention anchors (Softmax or fused Attention), {} attention and {} MLP sub-blocks recognised{first_miss}",
            attentions.len(),
            mlps.len()
        )));
    }
    let canon = |v: &str| view.origin(v);

    // Chain self-attention ─► [cross-attention] ─► MLP along the stream.
    let mut blocks: Vec<(NodeId, Block)> = Vec::new();
    let mut used_attention = vec![false; attentions.len()];
    let mut used_mlp = vec![false; mlps.len()];
    for (ai, first) in attentions.iter().enumerate() {
        if first.body.is_cross() {
            continue;
        }
        let Some(norm) = placement(view, first) else {
            continue;
        };
        // Fused joins without a materialised sum carry the normalised stream.
        let after = norm == NormPlacement::Post
            || (norm == NormPlacement::Fused && first.join.sum.is_none());
        let attention = settle(first.clone(), norm, after);
        let mut stream = canon(&attention.join.stream_out);
        let mut cross = None;
        if let Some(ci) = attentions.iter().position(|c| {
            c.body.is_cross()
                && canon(&c.join.stream_in) == stream
                && (norm != NormPlacement::Post || canon(&c.body.query_input) == stream)
        }) {
            let c = settle(attentions[ci].clone(), norm, after);
            stream = canon(&c.join.stream_out);
            used_attention[ci] = true;
            cross = Some(c);
        }
        let Some(mi) = mlps.iter().position(|m| canon(&m.join.stream_in) == stream) else {
            continue;
        };
        let mlp = settle(mlps[mi].clone(), norm, after);
        used_attention[ai] = true;
        used_mlp[mi] = true;
        let hidden = attention.body.out.out_features;
        let mut block = Block {
            index: 0,
            hidden,
            norm,
            attention,
            cross_attention: cross,
            mlp,
            norm_after_join: after,
            params: 0,
        };
        block.params = block.parameters().iter().map(|p| p.numel(graph)).sum();
        blocks.push((block.attention.join.node, block));
    }
    if blocks.is_empty() {
        return Err(DiscoverError::NoBlocks(format!(
            "{} attention and {} MLP sub-blocks recognised, but none chain into a block along a residual stream",
            attentions.len(),
            mlps.len()
        )));
    }

    // Towers by reachability from the inputs.
    let (text_inputs, other_inputs) = tower_inputs(view);
    let reach = |inputs: &[String]| -> HashSet<NodeId> {
        inputs
            .iter()
            .flat_map(|i| data_descendants(graph, i))
            .collect()
    };
    let text_reach = reach(&text_inputs);
    let vision_reach = reach(&other_inputs);
    let mut towers: Vec<Tower> = Vec::new();
    blocks.sort_by_key(|(join, _)| order[join]);
    for (join, mut block) in blocks {
        let kind = if text_reach.contains(&join) {
            TowerKind::Text
        } else if vision_reach.contains(&join) {
            TowerKind::Vision
        } else {
            return Err(DiscoverError::NoTowers(format!(
                "block at {} is reachable from neither a token input nor another model input (inputs seen: text {:?}, others {:?})",
                graph.node(join).label(),
                text_inputs,
                other_inputs
            )));
        };
        let tower = match towers.iter_mut().position(|t| t.kind == kind) {
            Some(i) => &mut towers[i],
            None => {
                towers.push(Tower {
                    kind,
                    blocks: Vec::new(),
                });
                towers.last_mut().expect("just pushed")
            }
        };
        block.index = tower.blocks.len();
        tower.blocks.push(block);
    }
    towers.sort_by_key(|t| t.kind);
    for tower in &towers {
        for block in &tower.blocks {
            check_weight_types(graph, tower.kind, block)?;
        }
        check_consecutive(view, tower)?;
    }

    // What matched but is no block: if it feeds a block of its own tower
    // it is a layer discovery did not recognise, and skipping it would
    // renumber the blocks after it; otherwise (a pooling head, a pooler's
    // MLP after the last block) it is left alone and listed.
    let tower_of = |node: NodeId| {
        if text_reach.contains(&node) {
            Some(TowerKind::Text)
        } else if vision_reach.contains(&node) {
            Some(TowerKind::Vision)
        } else {
            None
        }
    };
    let feeds_block = |node: NodeId| -> Option<(TowerKind, usize)> {
        let kind = tower_of(node)?;
        let downstream: HashSet<NodeId> = graph
            .node(node)
            .outputs()
            .iter()
            .flat_map(|o| graph.descendants(o))
            .collect();
        towers
            .iter()
            .find(|t| t.kind == kind)?
            .blocks
            .iter()
            .find(|b| {
                downstream.contains(&b.attention.join.node) || downstream.contains(&b.mlp.join.node)
            })
            .map(|b| (kind, b.index))
    };
    let mut outside = Vec::new();
    let mut gaps = Vec::new();
    let unused = attentions
        .iter()
        .zip(&used_attention)
        .filter(|(_, u)| !**u)
        .map(|(a, _)| {
            (
                format!("attention at {}", graph.node(a.body.anchor).label()),
                a.join.node,
            )
        })
        .chain(
            mlps.iter()
                .zip(&used_mlp)
                .filter(|(_, u)| !**u)
                .map(|(m, _)| {
                    (
                        format!("MLP at {}", graph.node(m.body.fc1.matmul).label()),
                        m.join.node,
                    )
                }),
        );
    for (label, join) in unused {
        match feeds_block(join) {
            Some((kind, index)) => {
                gaps.push(format!("{label} (before {} block {index})", kind.name()))
            }
            None => outside.push(label),
        }
    }
    if !gaps.is_empty() {
        return Err(DiscoverError::Gap(format!(
            "{} not part of a recognised block: the layer it belongs to does not match a transformer block (weights of unexpected shape or type, or an unusual operator), and skipping it would shift the index of every block after it",
            gaps.join(", ")
        )));
    }
    // An attention that was not recognised and feeds a block of its tower
    // is a whole layer left out (the gap check only sees holes between
    // recognised blocks).
    for (anchor, miss) in &unrecognised_anchors {
        if let Some((kind, index)) = feeds_block(*anchor) {
            return Err(DiscoverError::Gap(format!(
                "the attention at {} feeds {} block {index} but does not match an attention sub-block ({miss}); skipping its layer would shift the index of every block after it",
                graph.node(*anchor).label(),
                kind.name(),
            )));
        }
    }
    Ok(Architecture {
        towers,
        params_total: stored_params(graph),
        outside,
    })
}

/// The nodes `value`'s data reaches. Reading only its size (`Shape`,
/// `Size`) does not count: exporters compute every tower's reshape targets
/// from one input's batch size.
fn data_descendants(graph: &Graph, value: &str) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack = vec![value.to_string()];
    while let Some(v) = stack.pop() {
        for reader in graph.consumers(&v) {
            let node = graph.node(reader);
            if matches!(node.op(), "Shape" | "Size") || !seen.insert(reader) {
                continue;
            }
            stack.extend(node.outputs().iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    seen
}

/// Elements of the stored weights of `graph`: floating-point tensors, and
/// integer tensors read by a dequantising node, with more than one
/// element (what [`Architecture::params_total`] counts).
pub fn stored_params(graph: &Graph) -> u64 {
    let dequantised = |name: &str| {
        graph.consumers(name).iter().any(|&c| {
            let n = graph.node(c);
            (n.op() == "DequantizeLinear" && n.inputs().first().is_some_and(|i| i == name))
                || (n.op() == "Cast" && n.attr_int("to").is_some_and(|t| dtype::is_float(t as i32)))
        })
    };
    let counts = |name: &str, t: &crate::ir::Tensor| -> u64 {
        let kind = t.data_type();
        if t.len() > 1 && (dtype::is_float(kind) || (dtype::is_integer(kind) && dequantised(name)))
        {
            t.len() as u64
        } else {
            0
        }
    };
    let mut total: u64 = graph.initializers().map(|(n, t)| counts(n, t)).sum();
    for id in graph.nodes() {
        let node = graph.node(id);
        if node.op() == "Constant"
            && let Some(out) = node.outputs().first()
            && let Some(t) = view::stored_tensor(graph, out)
        {
            total += counts(out, &t);
        }
    }
    total
}

/// A tower's blocks must follow each other along the residual stream: what
/// leaves block i enters block i + 1. A gap means a layer in between was not
/// recognised (a weight of the wrong shape, an unusual operator); skipping
/// it would number every later block one too low, and a plan's `index`
/// would then name the wrong layer.
fn check_consecutive(view: &View<'_>, tower: &Tower) -> Result<(), DiscoverError> {
    for pair in tower.blocks.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let leaving = &before.mlp.join.stream_out;
        let entering = &after.attention.join.stream_in;
        if view.origin(leaving) != view.origin(entering) {
            return Err(DiscoverError::Gap(format!(
                "{} tower: block {} ends at '{leaving}', but the next recognised block starts from '{entering}' (at {}); the layer in between does not match a transformer block, and skipping it would shift the index of every block after it",
                tower.kind.name(),
                before.index,
                view.graph.node(after.attention.join.node).label()
            )));
        }
    }
    Ok(())
}

/// The weights and biases of `block`'s linear layers must be floating-point
/// (as their readers see them: a dequantised int8 weight reads as float)
/// and of one element type: a MatMul or Gemm takes both operands in one
/// type, and the activations of a block flow through all of them. Norm
/// parameters are left out, because mixed precision exports keep
/// LayerNormalization in float32 around float16 linears.
fn check_weight_types(graph: &Graph, tower: TowerKind, block: &Block) -> Result<(), DiscoverError> {
    let mut tensors: Vec<(&'static str, &str, &Operand)> = Vec::new();
    for linear in block.linears() {
        tensors.push((linear.role, "weight", linear.weight));
        if let Some(b) = linear.bias {
            tensors.push((linear.role, "bias", b));
        }
    }
    let mut first: Option<(&str, &str, &str, i32)> = None;
    for (role, what, operand) in tensors {
        let data_type = operand.read_type(graph);
        let name = operand.storage.as_str();
        let place = format!("{} block {}", tower.name(), block.index);
        if !dtype::is_float(data_type) {
            return Err(DiscoverError::WeightTypes(format!(
                "{place}: the {role} {what} '{name}' holds {} values, not floating-point numbers",
                dtype::name(data_type)
            )));
        }
        match first {
            None => first = Some((role, what, name, data_type)),
            Some((role0, what0, name0, type0)) if type0 != data_type => {
                return Err(DiscoverError::WeightTypes(format!(
                    "{place}: the {role} {what} '{name}' is {} but the {role0} {what0} '{name0}' is {}; a block's linear layers must share one element type",
                    dtype::name(data_type),
                    dtype::name(type0)
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The residual join right after a sub-block's output (through a
/// layer-scale `Mul` and a reshape back to the stream's layout), before
/// deciding the norm placement.
fn raw_join(view: &View<'_>, output: &str) -> Option<Join> {
    let graph = view.graph;
    let mut value = output.to_string();
    let mut layer_scale = None;
    for _ in 0..4 {
        let (id, read) = view.single_reader(&value)?;
        let node = graph.node(id);
        let inputs = node.inputs();
        match (node.op(), node.domain()) {
            ("Mul", "") if inputs.len() == 2 && layer_scale.is_none() => {
                let other = usize::from(inputs[0] == read);
                let factor = view.operand(id, other)?;
                let t = factor.tensor(graph)?;
                if t.len() <= 1 || t.dims().iter().filter(|&&d| d > 1).count() != 1 {
                    return None;
                }
                layer_scale = Some(factor);
                value = node.outputs()[0].clone();
            }
            ("Reshape", "") if inputs[0] == read => value = node.outputs()[0].clone(),
            ("Add", "") if inputs.len() == 2 => {
                let stream_in = if inputs[0] == read {
                    &inputs[1]
                } else {
                    &inputs[0]
                };
                if !view.is_data(stream_in) {
                    return None;
                }
                let sum = node.outputs()[0].clone();
                let norm = patterns::norm_reading(view, &sum);
                return Some(Join {
                    node: id,
                    stream_in: stream_in.clone(),
                    stream_out: sum.clone(),
                    sum: Some(sum),
                    norm,
                    bias: None,
                    layer_scale,
                });
            }
            // SkipSimplifiedLayerNormalization (the RMS form) has no beta:
            // its bias is input 3, SkipLayerNormalization's input 4.
            ("SkipLayerNormalization" | "SkipSimplifiedLayerNormalization", "com.microsoft")
                if inputs.len() >= 3 =>
            {
                if inputs[0] != read && inputs[1] != read {
                    return None;
                }
                let stream_in = if inputs[0] == read {
                    &inputs[1]
                } else {
                    &inputs[0]
                };
                let outputs = node.outputs();
                let sum = outputs.get(3).filter(|s| !s.is_empty()).cloned();
                let normed = patterns::norm_producing(view, &outputs[0]);
                let bias_slot = if node.op() == "SkipLayerNormalization" {
                    4
                } else {
                    3
                };
                let bias = inputs
                    .get(bias_slot)
                    .filter(|b| !b.is_empty())
                    .and_then(|_| view.operand(id, bias_slot));
                let stream_out = sum.clone().unwrap_or_else(|| outputs[0].clone());
                return Some(Join {
                    node: id,
                    stream_in: stream_in.clone(),
                    sum,
                    stream_out,
                    norm: normed,
                    bias,
                    layer_scale,
                });
            }
            _ => return None,
        }
    }
    None
}

/// The norm placement a block starting with `attention` has, if any.
fn placement(view: &View<'_>, attention: &SubBlock<Attention>) -> Option<NormPlacement> {
    let stream = view.origin(&attention.join.stream_in);
    if attention
        .join
        .norm
        .as_ref()
        .is_some_and(|n| n.kind == NormKind::Skip)
    {
        return Some(NormPlacement::Fused);
    }
    match &attention.input_norm {
        Some(norm) if view.origin(&norm.input) == stream => Some(NormPlacement::Pre),
        Some(norm) if norm.kind == NormKind::Skip => Some(NormPlacement::Fused),
        _ if view.origin(&attention.body.query_input) == stream
            && attention.join.norm.is_some() =>
        {
            Some(NormPlacement::Post)
        }
        _ => None,
    }
}

/// Fixes a sub-block's view of the stream for the block's norm placement:
/// pre-norm streams carry the sum (a norm reading it belongs to the next
/// sub-block), post-norm streams carry the normalised sum.
fn settle<T>(mut sub: SubBlock<T>, norm: NormPlacement, norm_after_join: bool) -> SubBlock<T> {
    match norm {
        NormPlacement::Pre => {
            sub.join.norm = None;
            if let Some(sum) = &sub.join.sum {
                sub.join.stream_out = sum.clone();
            }
        }
        NormPlacement::Post => {
            if let Some(n) = &sub.join.norm {
                sub.join.stream_out = n.output.clone();
            }
            sub.input_norm = None;
        }
        NormPlacement::Fused => {
            if norm_after_join {
                // BERT-style: the SkipLayerNorm's norm is the block's own
                sub.input_norm = None;
            } else {
                // CLIP-style: its norm belongs to the next sub-block, whose
                // input it is; the stream is the materialised sum (or, after
                // the last block, the fused final norm)
                sub.join.norm = None;
            }
        }
    }
    sub
}

/// Graph inputs of the text tower (token ids read by an embedding lookup),
/// and the other inputs that carry data (images, patches, encoder states).
fn tower_inputs(view: &View<'_>) -> (Vec<String>, Vec<String>) {
    let graph = view.graph;
    let mut text = Vec::new();
    let mut other = Vec::new();
    for input in &graph.inputs {
        let name = input.name();
        if graph.initializer(name).is_some() {
            continue;
        }
        let elem = graph.value_type(name).map_or(0, |t| t.elem_type);
        let mut frontier = vec![name.to_string()];
        let mut embeds = false;
        for _ in 0..4 {
            let mut next = Vec::new();
            for value in &frontier {
                for reader in graph.consumers(value) {
                    let n = graph.node(reader);
                    match n.op() {
                        "Gather"
                            if n.inputs().get(1) == Some(value)
                                && view.operand(reader, 0).is_some() =>
                        {
                            embeds = true
                        }
                        // ONNX Runtime's fused embedding: token ids at input 0.
                        "EmbedLayerNormalization"
                            if n.domain() == "com.microsoft"
                                && n.inputs().first() == Some(value) =>
                        {
                            embeds = true
                        }
                        "Cast" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" => {
                            next.push(n.outputs()[0].clone())
                        }
                        _ => {}
                    }
                }
            }
            frontier = next;
        }
        // `inputs_embeds` (a decoder language model's embedded tokens, by
        // the name transformers gives them) is text too.
        if (embeds && matches!(elem, 6 | 7)) || (name == "inputs_embeds" && dtype::is_float(elem)) {
            text.push(name.to_string());
        } else if dtype::is_float(elem) {
            other.push(name.to_string());
        }
    }
    (text, other)
}

#[cfg(test)]
mod tests;
