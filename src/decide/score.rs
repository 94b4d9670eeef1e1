//! Importance scores of sub-blocks and of units (attention heads, MLP
//! neurons), from the calibration measurements and the weights.
//!
//! Importance follows the ID-pruning paper's rule — a base score times the
//! raw intrinsic dimension of the layer, with ONE threshold for all layers
//! of both towers ([`super::allocate`]). Because vision layers have far
//! higher ID than text layers, the same threshold removes more of the text
//! tower: the asymmetric strategy.
//!
//! - `id` (default): block influence × ID. Block influence (ShortGPT) of a
//!   sub-block is 1 − the mean cosine similarity between the residual
//!   stream entering and leaving it (tokens of all calibration samples,
//!   padding excluded): how much the sub-block changes the stream. ID is
//!   that of the stream it writes (TwoNN on the pooled calibration
//!   features).
//! - `bi`: block influence alone.
//! - `magnitude`: mean |w| of the sub-block's weight matrices alone.
//!
//! Units are scored activation-aware (Wanda-style) times the ID of the
//! stream their sub-block writes ([`unit_candidates`]).

use serde::Serialize;

use crate::arch::{Architecture, Block, TowerKind};
use crate::ir::Graph;
use crate::measure::BlockMeasurements;

/// How sub-blocks are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// Block influence × intrinsic dimension (the paper's rule).
    Id,
    /// Block influence alone.
    Bi,
    /// Mean absolute weight alone.
    Magnitude,
}

/// A sub-block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// Self-attention.
    Attention,
    /// MLP.
    Mlp,
}

/// Measurements and the decision for one sub-block.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Tower.
    pub tower: TowerKind,
    /// Block index.
    pub block: usize,
    /// Which sub-block.
    pub part: Part,
    /// Parameters removed with it (weights and biases).
    pub params: u64,
    /// Intrinsic dimension of the stream it writes.
    pub id: f64,
    /// Block influence, 1 − cos(stream in, stream out).
    pub influence: f64,
    /// Mean |w| of its weight matrices.
    pub magnitude: f64,
    /// The importance used for the decision.
    pub score: f64,
    /// Whether it is removed.
    pub removed: bool,
    /// In `units` mode: heads or neurons kept and in total.
    pub units: Option<[usize; 2]>,
}

impl Score {
    /// The importance of a measured sub-block under this score.
    pub fn of(self, candidate: &Candidate) -> f64 {
        match self {
            Score::Id => candidate.influence * candidate.id,
            Score::Bi => candidate.influence,
            Score::Magnitude => candidate.magnitude,
        }
    }
}

impl std::str::FromStr for Score {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "id" => Ok(Score::Id),
            "bi" => Ok(Score::Bi),
            "magnitude" => Ok(Score::Magnitude),
            other => Err(format!(
                "unknown score '{other}' (expected id, bi or magnitude)"
            )),
        }
    }
}

/// Parameters that removing a sub-block removes: its weights and biases,
/// and the norm in front of it when only it reads that norm (pre-norm; a
/// fused norm in the join before it becomes a plain sum then, see
/// `rewrite`'s `unread_norms` pass). A post-norm sub-block keeps its norm.
pub fn sub_block_params(graph: &Graph, block: &Block, part: Part) -> u64 {
    let (operands, join, input_norm) = match part {
        Part::Attention => (
            block.attention.body.parameters(),
            &block.attention.join,
            &block.attention.input_norm,
        ),
        Part::Mlp => (
            block.mlp.body.parameters(),
            &block.mlp.join,
            &block.mlp.input_norm,
        ),
    };
    let joined: u64 = join
        .bias
        .iter()
        .chain(&join.layer_scale)
        .map(|o| o.numel(graph))
        .sum();
    let norm: u64 = match input_norm {
        Some(norm) if !block.norm_after_join => {
            let own: Vec<crate::ir::NodeId> = match part {
                Part::Attention => match &block.attention.body.projections {
                    crate::arch::Projections::Separate { q, k, v } => {
                        vec![q.matmul, k.matmul, v.matmul]
                    }
                    crate::arch::Projections::Packed { qkv } => vec![qkv.matmul],
                    crate::arch::Projections::Fused { node, .. } => vec![*node],
                },
                Part::Mlp => vec![block.mlp.body.fc1.matmul],
            };
            // Shape reads vanish with the sub-block too.
            let only_this = crate::arch::view::data_readers(graph, &norm.output)
                .iter()
                .all(|r| own.contains(r));
            if only_this { norm.params(graph) } else { 0 }
        }
        _ => 0,
    };
    operands.iter().map(|o| o.numel(graph)).sum::<u64>() + joined + norm
}

/// Mean |w| over a sub-block's weight matrices.
pub fn sub_block_magnitude(graph: &Graph, block: &Block, part: Part) -> f64 {
    let names = match part {
        Part::Attention => block.attention.body.parameters(),
        Part::Mlp => block.mlp.body.parameters(),
    };
    let (mut sum, mut count) = (0f64, 0f64);
    for operand in names {
        let Some((values, dims)) = operand.values(graph) else {
            continue;
        };
        if dims.len() != 2 {
            continue;
        }
        sum += values.iter().map(|v| v.abs() as f64).sum::<f64>();
        count += values.len() as f64;
    }
    sum / count.max(1.0)
}

/// How heads and neurons are ranked for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnitOrder {
    /// By `score`: activation-aware size × ID (removes many small units).
    Score,
    /// By `ratio`: relative contribution per parameter (a knapsack order:
    /// large units go when they carry little per parameter).
    PerParameter,
}

impl Unit {
    /// The key units are removed in ascending order of.
    pub fn key(&self, order: UnitOrder) -> f64 {
        match order {
            UnitOrder::Score => self.score,
            UnitOrder::PerParameter => self.ratio,
        }
    }
}

/// Every sub-block of `arch` with its measurements (`score` and `removed`
/// are left for the allocation), and with `units`, every head and neuron
/// scored.
pub fn candidates(
    arch: &Architecture,
    graph: &Graph,
    measured: &BlockMeasurements,
    units: bool,
) -> (Vec<Candidate>, Vec<Unit>) {
    let mut candidates = Vec::new();
    let mut scored = Vec::new();
    for stats in &measured.blocks {
        let Some(block) = arch
            .tower(stats.tower)
            .and_then(|t| t.blocks.get(stats.block))
        else {
            continue;
        };
        for (part, sub) in [(Part::Attention, &stats.attention), (Part::Mlp, &stats.mlp)] {
            candidates.push(Candidate {
                tower: stats.tower,
                block: stats.block,
                part,
                params: sub_block_params(graph, block, part),
                id: sub.id,
                influence: sub.influence,
                magnitude: sub_block_magnitude(graph, block, part),
                score: 0.0,
                removed: false,
                units: None,
            });
        }
        if units {
            let mut u = unit_candidates(
                graph,
                stats.tower,
                block,
                &stats.context_energy,
                &stats.activation_energy,
                stats.attention.id,
                stats.mlp.id,
            );
            for unit in &mut u {
                // The contribution's energy relative to the stream it
                // joins, times the layer's ID, per parameter.
                let (stream, id) = match unit.part {
                    Part::Attention => (stats.stream_energy[0], stats.attention.id),
                    Part::Mlp => (stats.stream_energy[1], stats.mlp.id),
                };
                let raw = if id > 0.0 { unit.score / id } else { 0.0 };
                unit.ratio = raw * raw / stream.max(1e-30) * id / unit.params.max(1) as f64;
            }
            scored.extend(u);
        }
    }
    (candidates, scored)
}

/// One attention head or MLP neuron, scored activation-aware (Wanda-style)
/// and by the layer's ID.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Tower.
    pub tower: TowerKind,
    /// Block index.
    pub block: usize,
    /// Head (attention) or neuron (MLP).
    pub part: Part,
    /// Head or neuron index in the source layer.
    pub index: usize,
    /// Parameters removed with it.
    pub params: u64,
    /// `‖activation‖ · ‖outgoing weights‖ · ID`.
    pub score: f64,
    /// The squared contribution relative to the residual stream's energy
    /// where the sub-block joins it, times ID, per parameter: comparable
    /// across layers, towers and unit sizes.
    pub ratio: f64,
    /// Whether it is removed.
    pub removed: bool,
}

/// The heads and neurons of `block` with their scores.
///
/// Neuron j: `sqrt(E[a_j²]) · ‖W_fc2[j, :]‖ · ID(stream after the MLP)`,
/// with `a` the activation entering fc2. Head h: `sqrt(Σ_{d∈h} E[c_d²]) ·
/// ‖W_out[h rows, :]‖_F · ID(stream after attention)`, with `c` the merged
/// context entering the output projection. The weight norm is the
/// contribution the unit can make per unit of activation; the activation
/// norm is how large it is on the calibration data.
pub fn unit_candidates(
    graph: &Graph,
    tower: TowerKind,
    block: &Block,
    context_energy: &[f64],
    activation_energy: &[f64],
    attention_id: f64,
    mlp_id: f64,
) -> Vec<Unit> {
    let mut units = Vec::new();
    let a = &block.attention.body;
    let m = &block.mlp.body;
    let out_rows = row_norms(graph, &a.out);
    let fc2_rows = row_norms(graph, &m.fc2);
    let input = a.in_features() as u64;
    let d = a.head_dim;
    // Heads whose count sits in shapes that cannot be rewritten stay. With
    // grouped-query attention a unit is a key/value head with the query
    // heads that share it (removing fewer would keep its keys and values).
    let group = a.group();
    let units_of_heads = if a.heads_prunable() { a.kv_heads } else { 0 };
    let unit_width = group * d;
    for g in 0..units_of_heads {
        let columns = g * unit_width..(g + 1) * unit_width;
        let energy: f64 = columns
            .clone()
            .map(|c| context_energy.get(c).copied().unwrap_or(0.0))
            .sum();
        let weight: f64 = columns
            .map(|r| out_rows.get(r).copied().unwrap_or(0.0).powi(2))
            .sum();
        units.push(Unit {
            tower,
            block: block.index,
            part: Part::Attention,
            index: g,
            params: unit_width as u64 * (input + 1 + a.out.out_features as u64)
                + 2 * d as u64 * (input + 1),
            score: energy.sqrt() * weight.sqrt() * attention_id,
            ratio: 0.0,
            removed: false,
        });
    }
    for j in 0..m.width() {
        let energy = activation_energy.get(j).copied().unwrap_or(0.0);
        units.push(Unit {
            tower,
            block: block.index,
            part: Part::Mlp,
            index: j,
            // A gate column, an up column (gated MLPs) and a down row.
            params: (1 + u64::from(m.up.is_some())) * (m.fc1.in_features as u64 + 1)
                + m.fc2.out_features as u64,
            score: energy.sqrt() * fc2_rows.get(j).copied().unwrap_or(0.0) * mlp_id,
            ratio: 0.0,
            removed: false,
        });
    }
    units
}

/// L2 norm of each input row of a linear layer's weight (the weights that
/// carry input feature i).
fn row_norms(graph: &Graph, linear: &crate::arch::Linear) -> Vec<f64> {
    let Some(values) = linear.matrix(graph) else {
        return Vec::new();
    };
    let (rows, cols) = (linear.in_features, linear.out_features);
    (0..rows)
        .map(|i| {
            values[i * cols..(i + 1) * cols]
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}
