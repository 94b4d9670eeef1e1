//! Discovery: the towers and transformer blocks of a model, found from the
//! graph's structure.
//!
//! Matching starts from anchors (Softmax or a fused attention operator for
//! attention; any linear layer for MLPs), then follows each sub-block's
//! output to its residual join (`Add`, or a fused `SkipLayerNormalization`)
//! and chains sub-blocks along the residual stream: a block is a
//! self-attention, an optional cross-attention and an MLP, each reading the
//! stream the previous one wrote. The norm placement follows from where the
//! layer norms sit:
//!
//! ```text
//! pre   x ─► LN ─► attention ─► Add(x, ·) = h ─► LN ─► MLP ─► Add(h, ·) = y
//! post  x ─► attention ─► Add(x, ·) ─► LN = h ─► MLP ─► Add(h, ·) ─► LN = y
//! fused x ─► SkipLN(attention, x)[0] ─► MLP …, the stream in SkipLN output 3
//! ```
//!
//! Towers come from reachability: blocks downstream of the token input (an
//! integer input read by an embedding `Gather`) form the text tower, the
//! others downstream of the image input (a rank-4 float input) the vision
//! tower. Node names are never needed.

mod attention;
mod mlp;
pub mod patterns;

use std::collections::{HashMap, HashSet};

use serde::Serialize;

pub use attention::{Attention, Projections};
pub use mlp::Mlp;
pub use patterns::{Bias, LayerNorm, Linear, NormKind};

use crate::ir::{Graph, NodeId};
use crate::onnx::dtype;

/// Which tower a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TowerKind {
    /// The image encoder.
    Vision,
    /// The text encoder.
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

/// Where a sub-block's output re-enters the residual stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The `Add` or `SkipLayerNormalization` node.
    pub node: NodeId,
    /// The residual stream entering the join (the skip connection).
    pub stream_in: String,
    /// The residual sum, when the graph materialises it.
    pub sum: Option<String>,
    /// The stream leaving: the sum (pre-norm) or its norm (post-norm).
    pub stream_out: String,
    /// The norm applied to the sum (post-norm and fused forms).
    pub norm: Option<LayerNorm>,
    /// A bias the fused join adds (SkipLayerNormalization input 4).
    pub bias: Option<Bias>,
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
    /// Cross-attention to the other tower (BLIP text).
    pub cross_attention: Option<SubBlock<Attention>>,
    /// The MLP.
    pub mlp: SubBlock<Mlp>,
    /// Whether each sub-block's norm sits after its residual join (post-norm,
    /// and fused post-norm), rather than in front of the sub-block.
    pub norm_after_join: bool,
    /// Number of parameters (weights, biases and norm parameters).
    pub params: u64,
}

/// One linear layer of a block, named by its plan role
/// ([`crate::plan::LINEAR_ROLES`]).
#[derive(Debug, Clone, Copy)]
pub struct RoleLinear<'a> {
    /// `q`, `k`, `v`, `qkv`, `out`, `fc1` or `fc2`.
    pub role: &'static str,
    /// The node that reads the weight: the MatMul/Gemm, or the fused
    /// attention operator (weight at input 1).
    pub node: NodeId,
    /// The recognised linear layer (none for a fused operator's packed
    /// projection).
    pub linear: Option<&'a Linear>,
    /// Whether the layer belongs to the attention sub-block.
    pub attention: bool,
    /// The weight initializer (as discovered).
    pub weight: &'a str,
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
                output,
                ..
            } => out.push(RoleLinear {
                role: "qkv",
                node: *node,
                linear: None,
                attention: true,
                weight,
                output,
            }),
        }
        out.push(of("out", &self.attention.body.out, true));
        out.push(of("fc1", &self.mlp.body.fc1, false));
        out.push(of("fc2", &self.mlp.body.fc2, false));
        out
    }

    /// The residual stream entering the block.
    pub fn input(&self) -> &str {
        &self.attention.join.stream_in
    }
    /// The residual stream leaving the block.
    pub fn output(&self) -> &str {
        &self.mlp.join.stream_out
    }
    /// Every parameter tensor of the block, each once.
    pub fn parameters(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let mut add = |name: &String| {
            if !names.contains(name) {
                names.push(name.clone());
            }
        };
        let norm_params = |norm: &Option<LayerNorm>| -> Vec<String> {
            norm.iter()
                .flat_map(|n| std::iter::once(n.scale.clone()).chain(n.bias.clone()))
                .collect()
        };
        let mut sub = |params: Vec<String>, input_norm: &Option<LayerNorm>, join: &Join| {
            for p in &params {
                add(p);
            }
            if let Some(b) = &join.bias {
                add(&b.name);
            }
            // Each norm is counted once: pre-norm blocks own the norm in
            // front of each sub-block, post-norm blocks the one after it.
            let norm = if self.norm_after_join {
                norm_params(&join.norm)
            } else {
                norm_params(input_norm)
            };
            for p in &norm {
                add(p);
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
        names
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
    /// Parameters of the whole model: elements of floating-point
    /// initializers with more than one element (scalars and integer tensors
    /// are constants, not parameters).
    pub params_total: u64,
    /// Sub-blocks that matched but are not part of any block (for
    /// diagnostics), as labels.
    pub unmatched: Vec<String>,
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
                            "head_dim": b.attention.body.head_dim,
                            "mlp": b.mlp.body.width(),
                            "norm": b.norm,
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
        })
    }
}

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverError {
    /// Nothing that looks like a transformer block.
    #[error("no transformer block found ({0})")]
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

/// Finds the towers and blocks of `graph`.
pub fn discover(graph: &Graph) -> Result<Architecture, DiscoverError> {
    let order: HashMap<NodeId, usize> = graph
        .nodes()
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    let mut by_order: Vec<NodeId> = order.keys().copied().collect();
    by_order.sort_by_key(|id| order[id]);

    // Attention sub-blocks.
    let mut attentions: Vec<SubBlock<Attention>> = Vec::new();
    let mut attention_linears: HashSet<NodeId> = HashSet::new();
    let mut anchors = 0;
    let mut unrecognised_anchors: Vec<NodeId> = Vec::new();
    for &id in &by_order {
        let node = graph.node(id);
        if !matches!(node.op(), "Softmax" | "Attention") {
            continue;
        }
        anchors += 1;
        let Some(body) = attention::match_attention(graph, id) else {
            unrecognised_anchors.push(id);
            continue;
        };
        let Some(join) = raw_join(graph, &body.out.output) else {
            unrecognised_anchors.push(id);
            continue;
        };
        attention_linears.insert(body.out.matmul);
        if let Projections::Separate { q, k, v } = &body.projections {
            attention_linears.extend([q.matmul, k.matmul, v.matmul]);
        } else if let Projections::Packed { qkv } = &body.projections {
            attention_linears.insert(qkv.matmul);
        }
        let input_norm = patterns::norm_producing(graph, &body.query_input);
        attentions.push(SubBlock {
            body,
            input_norm,
            join,
        });
    }

    // MLP sub-blocks.
    let mut mlps: Vec<SubBlock<Mlp>> = Vec::new();
    for &id in &by_order {
        if attention_linears.contains(&id) {
            continue;
        }
        let Some(fc1) = patterns::linear_at(graph, id) else {
            continue;
        };
        let Some(body) = mlp::match_mlp(graph, &fc1, &order) else {
            continue;
        };
        let Some(join) = raw_join(graph, &body.fc2.output) else {
            continue;
        };
        let input_norm = patterns::norm_producing(graph, &body.fc1.input);
        mlps.push(SubBlock {
            body,
            input_norm,
            join,
        });
    }
    if attentions.is_empty() || mlps.is_empty() {
        return Err(DiscoverError::NoBlocks(format!(
            "{anchors} attention anchors (Softmax or fused Attention), {} attention and {} MLP sub-blocks recognised",
            attentions.len(),
            mlps.len()
        )));
    }

    // Chain self-attention ─► [cross-attention] ─► MLP along the stream.
    let mut blocks: Vec<(NodeId, Block)> = Vec::new();
    let mut used_attention = vec![false; attentions.len()];
    let mut used_mlp = vec![false; mlps.len()];
    for (ai, first) in attentions.iter().enumerate() {
        if first.body.is_cross() {
            continue;
        }
        let Some(norm) = placement(first) else {
            continue;
        };
        // Fused joins without a materialised sum carry the normalised stream.
        let after = norm == NormPlacement::Post
            || (norm == NormPlacement::Fused && first.join.sum.is_none());
        let attention = settle(first.clone(), norm, after);
        let mut stream = attention.join.stream_out.clone();
        let mut cross = None;
        if let Some(ci) = attentions.iter().position(|c| {
            c.body.is_cross()
                && c.join.stream_in == stream
                && c.body.query_input_matches(&stream, norm)
        }) {
            let c = settle(attentions[ci].clone(), norm, after);
            stream = c.join.stream_out.clone();
            used_attention[ci] = true;
            cross = Some(c);
        }
        let Some(mi) = mlps.iter().position(|m| m.join.stream_in == stream) else {
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
        block.params = block
            .parameters()
            .iter()
            .map(|p| patterns::numel(graph, p))
            .sum();
        blocks.push((block.attention.join.node, block));
    }
    if blocks.is_empty() {
        return Err(DiscoverError::NoBlocks(format!(
            "{} attention and {} MLP sub-blocks recognised, but none chain into a block along a residual stream",
            attentions.len(),
            mlps.len()
        )));
    }
    let mut unmatched: Vec<String> = Vec::new();
    for (a, used) in attentions.iter().zip(&used_attention) {
        if !used {
            unmatched.push(format!(
                "attention at {}",
                graph.node(a.body.anchor).label()
            ));
        }
    }
    for (m, used) in mlps.iter().zip(&used_mlp) {
        if !used {
            unmatched.push(format!("MLP at {}", graph.node(m.body.fc1.matmul).label()));
        }
    }

    if !unmatched.is_empty() {
        // A residual sub-block that does not chain into a block is a layer
        // whose other half was not recognised: leaving it out would
        // renumber the blocks after it.
        return Err(DiscoverError::Gap(format!(
            "{} not part of a recognised block: the layer it belongs to does not match a transformer block (weights of unexpected shape or type, or an unusual operator), and skipping it would shift the index of every block after it",
            unmatched.join(", ")
        )));
    }

    // Towers by reachability from the inputs.
    let (text_inputs, image_inputs) = tower_inputs(graph);
    let reach = |inputs: &[String]| -> HashSet<NodeId> {
        inputs.iter().flat_map(|i| graph.descendants(i)).collect()
    };
    let text_reach = reach(&text_inputs);
    let vision_reach = reach(&image_inputs);
    let mut towers: Vec<Tower> = Vec::new();
    blocks.sort_by_key(|(join, _)| order[join]);
    for (join, mut block) in blocks {
        let kind = if text_reach.contains(&join) {
            TowerKind::Text
        } else if vision_reach.contains(&join) {
            TowerKind::Vision
        } else {
            return Err(DiscoverError::NoTowers(format!(
                "block at {} is reachable from neither a token input nor an image input (inputs seen: text {:?}, image {:?})",
                graph.node(join).label(),
                text_inputs,
                image_inputs
            )));
        };
        let tower = match towers.iter_mut().position(|t| t.kind == kind) {
            Some(i) => &mut towers[i],
            None => {
                towers.push(Tower {
                    kind,
                    blocks: Vec::new(),
                });
                towers.last_mut().unwrap()
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
        check_consecutive(graph, tower)?;
    }
    // An attention that was not recognised and feeds a recognised block is
    // a whole layer left out in front of it (the gap check above only sees
    // holes between recognised blocks).
    let joins: Vec<(TowerKind, &Block)> = towers
        .iter()
        .flat_map(|t| t.blocks.iter().map(move |b| (t.kind, b)))
        .collect();
    for &anchor in &unrecognised_anchors {
        let Some(output) = graph.node(anchor).outputs().first() else {
            continue;
        };
        let downstream = graph.descendants(output);
        if let Some((kind, block)) = joins
            .iter()
            .find(|(_, b)| downstream.contains(&b.attention.join.node))
        {
            return Err(DiscoverError::Gap(format!(
                "the attention at {} feeds {} block {} but does not match an attention sub-block (weights of unexpected shape or type, or an unusual operator); skipping its layer would shift the index of every block after it",
                graph.node(anchor).label(),
                kind.name(),
                block.index
            )));
        }
    }
    let params_total = graph
        .initializers()
        .filter(|(_, t)| matches!(t.data_type(), 1 | 10 | 11 | 16) && t.len() > 1)
        .map(|(_, t)| t.len() as u64)
        .sum();
    Ok(Architecture {
        towers,
        params_total,
        unmatched,
    })
}

/// A tower's blocks must follow each other along the residual stream: what
/// leaves block i enters block i + 1. A gap means a layer in between was not
/// recognised (a weight of the wrong shape, an unusual operator); skipping
/// it would number every later block one too low, and a plan's `index`
/// would then name the wrong layer.
fn check_consecutive(graph: &Graph, tower: &Tower) -> Result<(), DiscoverError> {
    for pair in tower.blocks.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let leaving = &before.mlp.join.stream_out;
        let entering = &after.attention.join.stream_in;
        if leaving != entering {
            return Err(DiscoverError::Gap(format!(
                "{} tower: block {} ends at '{leaving}', but the next recognised block starts from '{entering}' (at {}); the layer in between does not match a transformer block, and skipping it would shift the index of every block after it",
                tower.kind.name(),
                before.index,
                graph.node(after.attention.join.node).label()
            )));
        }
    }
    Ok(())
}

/// The weights and biases of `block`'s linear layers (those stored as
/// initializers) must be floating-point and of one element type: a MatMul
/// or Gemm takes both operands in one type, and the activations of a block
/// flow through all of them. Norm parameters are left out, because mixed
/// precision exports keep LayerNormalization in float32 around float16
/// linears.
fn check_weight_types(graph: &Graph, tower: TowerKind, block: &Block) -> Result<(), DiscoverError> {
    let mut tensors: Vec<(&'static str, &str, &str)> = Vec::new();
    for linear in block.linears() {
        match linear.linear {
            Some(l) => {
                tensors.push((linear.role, "weight", &l.weight));
                if let Some(b) = &l.bias {
                    tensors.push((linear.role, "bias", &b.name));
                }
            }
            None => {
                if let Projections::Fused { weight, bias, .. } = &block.attention.body.projections {
                    tensors.push((linear.role, "weight", weight));
                    if let Some(b) = bias {
                        tensors.push((linear.role, "bias", b));
                    }
                }
            }
        }
    }
    let mut first: Option<(&str, &str, &str, i32)> = None;
    for (role, what, name) in tensors {
        let Some(tensor) = graph.initializer(name) else {
            continue;
        };
        let data_type = tensor.data_type();
        let place = format!("{} block {}", tower.name(), block.index);
        // float32, float16, float64, bfloat16, the float8 kinds, float4.
        if !matches!(data_type, 1 | 10 | 11 | 16..=20 | 23) {
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

impl Attention {
    /// Whether this sub-block's queries come from `stream` (post-norm) or a
    /// norm of it (pre-norm and fused).
    fn query_input_matches(&self, stream: &str, norm: NormPlacement) -> bool {
        match norm {
            NormPlacement::Post => self.query_input == stream,
            _ => true,
        }
    }
}

/// The residual join right after a sub-block output, before deciding the
/// norm placement.
fn raw_join(graph: &Graph, output: &str) -> Option<Join> {
    let id = patterns::single_consumer(graph, output)?;
    let node = graph.node(id);
    let inputs = node.inputs();
    match (node.op(), node.domain()) {
        ("Add", "") if inputs.len() == 2 => {
            let stream_in = if inputs[0] == output {
                &inputs[1]
            } else {
                &inputs[0]
            };
            let sum = node.outputs()[0].clone();
            let norm = patterns::norm_reading(graph, &sum);
            Some(Join {
                node: id,
                stream_in: stream_in.clone(),
                stream_out: sum.clone(),
                sum: Some(sum),
                norm,
                bias: None,
            })
        }
        ("SkipLayerNormalization", "com.microsoft") if inputs.len() >= 3 => {
            let stream_in = if inputs[0] == output {
                &inputs[1]
            } else {
                &inputs[0]
            };
            let outputs = node.outputs();
            let sum = outputs.get(3).filter(|s| !s.is_empty()).cloned();
            let normed = patterns::norm_producing(graph, &outputs[0]);
            let bias = inputs.get(4).filter(|b| !b.is_empty()).map(|b| Bias {
                node: id,
                slot: 4,
                name: b.clone(),
            });
            let stream_out = sum.clone().unwrap_or_else(|| outputs[0].clone());
            Some(Join {
                node: id,
                stream_in: stream_in.clone(),
                sum,
                stream_out,
                norm: normed,
                bias,
            })
        }
        _ => None,
    }
}

/// The norm placement a block starting with `attention` has, if any.
fn placement(attention: &SubBlock<Attention>) -> Option<NormPlacement> {
    let stream = &attention.join.stream_in;
    if attention
        .join
        .norm
        .as_ref()
        .is_some_and(|n| n.kind == NormKind::Skip)
    {
        return Some(NormPlacement::Fused);
    }
    match &attention.input_norm {
        Some(norm) if norm.input == *stream => Some(NormPlacement::Pre),
        Some(norm) if norm.kind == NormKind::Skip => Some(NormPlacement::Fused),
        _ if attention.body.query_input == *stream && attention.join.norm.is_some() => {
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

/// Graph inputs of the text tower (token ids read by an embedding lookup)
/// and of the vision tower (rank-4 floating inputs, or inputs read by a Conv).
fn tower_inputs(graph: &Graph) -> (Vec<String>, Vec<String>) {
    let mut text = Vec::new();
    let mut image = Vec::new();
    for input in &graph.inputs {
        let name = input.name();
        if graph.initializer(name).is_some() {
            continue;
        }
        let ty = graph.value_type(name);
        let rank = ty.as_ref().and_then(|t| t.shape.as_ref().map(|s| s.len()));
        let elem = ty.map_or(0, |t| t.elem_type);
        let mut frontier = vec![name.to_string()];
        let mut embeds = false;
        let mut convolves = false;
        for _ in 0..3 {
            let mut next = Vec::new();
            for value in &frontier {
                for reader in graph.consumers(value) {
                    let n = graph.node(reader);
                    match n.op() {
                        "Gather"
                            if n.inputs().get(1) == Some(value)
                                && graph.initializer(&n.inputs()[0]).is_some() =>
                        {
                            embeds = true
                        }
                        "Conv" if n.inputs()[0] == *value => convolves = true,
                        "Cast" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" => {
                            next.push(n.outputs()[0].clone())
                        }
                        _ => {}
                    }
                }
            }
            frontier = next;
        }
        if embeds && matches!(elem, 6 | 7) {
            text.push(name.to_string());
        } else if convolves || (rank == Some(4) && matches!(elem, 1 | 10 | 11 | 16)) {
            image.push(name.to_string());
        }
    }
    (text, image)
}

#[cfg(test)]
mod tests;
