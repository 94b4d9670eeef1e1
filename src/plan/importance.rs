//! Deciding what to remove: importance per sub-block and a global
//! threshold across both towers.
//!
//! Importance follows the ID-pruning paper's rule — a base score times the
//! raw intrinsic dimension of the layer, with ONE threshold for all layers
//! of both towers. Because vision layers have far higher ID than text
//! layers, the same threshold removes more of the text tower: the
//! asymmetric strategy.
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
//! Allocation: sub-blocks sorted by score (ascending; ties by tower, block,
//! attention before MLP) are removed until the kept share of
//! transformer-block parameters is at most `--keep-params`. A block that
//! loses both sub-blocks is dropped whole (its norms go too). Each tower
//! keeps at least one attention and one MLP sub-block.
//!
//! In `units` mode the same single threshold runs over attention heads and
//! MLP neurons ([`unit_candidates`], [`allocate_units`]).

use serde::Serialize;

use super::{BlockAction, Plan};
use crate::arch::{Architecture, Block, TowerKind};
use crate::ir::Graph;

/// How sub-blocks are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
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

/// Parameters that removing a sub-block removes: its weights and biases,
/// and the norm in front of it when only it reads that norm (pre-norm). A
/// post-norm sub-block keeps its norm; a fused norm stays with the join
/// node that computes it.
pub fn sub_block_params(graph: &Graph, block: &Block, part: Part) -> u64 {
    let (names, join, input_norm) = match part {
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
    let numel = |n: &String| crate::arch::patterns::numel(graph, n);
    let bias = join.bias.iter().map(|b| numel(&b.name));
    let norm: u64 = match input_norm {
        Some(norm) if !block.norm_after_join && norm.kind != crate::arch::NormKind::Skip => {
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
            let only_this = graph
                .consumers(&norm.output)
                .iter()
                .all(|r| own.contains(r) || matches!(graph.node(*r).op(), "Shape" | "Size"));
            if only_this {
                numel(&norm.scale) + norm.bias.as_ref().map_or(0, numel)
            } else {
                0
            }
        }
        _ => 0,
    };
    names.iter().map(numel).chain(bias).sum::<u64>() + norm
}

/// Mean |w| over a sub-block's weight matrices.
pub fn sub_block_magnitude(graph: &Graph, block: &Block, part: Part) -> f64 {
    let names = match part {
        Part::Attention => block.attention.body.parameters(),
        Part::Mlp => block.mlp.body.parameters(),
    };
    let (mut sum, mut count) = (0f64, 0f64);
    for name in names {
        let Some(t) = graph.initializer(&name) else {
            continue;
        };
        if t.dims().len() != 2 {
            continue;
        }
        if let Ok(values) = t.to_f32() {
            sum += values.iter().map(|v| v.abs() as f64).sum::<f64>();
            count += values.len() as f64;
        }
    }
    sum / count.max(1.0)
}

/// How many block parameters may be removed: a fraction kept overall,
/// and optionally a fraction kept in one tower or both.
///
/// A tower with its own fraction spends only its own budget. The towers
/// without one share what the overall fraction leaves after the
/// overridden towers' budgets — and compete there under the one global
/// threshold, as without overrides. `--vision-keep F --text-keep F` is the
/// symmetric variant (same fraction in each tower).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budget {
    /// Fraction of all block parameters to keep.
    pub keep: Option<f64>,
    /// Fraction of the vision tower's block parameters to keep.
    pub vision: Option<f64>,
    /// Fraction of the text tower's block parameters to keep.
    pub text: Option<f64>,
}

impl Budget {
    /// The budget that removes `share` of what this one removes (each
    /// fraction kept moves towards 1).
    pub fn scaled(&self, share: f64) -> Self {
        let scale = |k: Option<f64>| k.map(|k| 1.0 - share * (1.0 - k));
        Self {
            keep: scale(self.keep),
            vision: scale(self.vision),
            text: scale(self.text),
        }
    }

    /// Keep `keep` of all block parameters, under one threshold.
    pub fn overall(keep: f64) -> Self {
        Self {
            keep: Some(keep),
            vision: None,
            text: None,
        }
    }

    fn tower(&self, kind: TowerKind) -> Option<f64> {
        match kind {
            TowerKind::Vision => self.vision,
            TowerKind::Text => self.text,
        }
    }

    /// The fraction of all block parameters this budget keeps in `arch`.
    pub fn kept_fraction(&self, arch: &Architecture) -> f64 {
        let total = arch.params_blocks().max(1) as f64;
        1.0 - Spending::new(arch, self).limit() as f64 / total
    }
}

/// Parameters removed so far against a [`Budget`].
struct Spending {
    /// Per tower: its own limit (when overridden) and what it spent.
    own: Vec<(TowerKind, Option<u64>, u64)>,
    shared_limit: u64,
    shared_spent: u64,
}

impl Spending {
    fn new(arch: &Architecture, budget: &Budget) -> Self {
        let removable = |params: u64, keep: f64| (params as f64 * (1.0 - keep)).ceil() as u64;
        let own: Vec<(TowerKind, Option<u64>, u64)> = arch
            .towers
            .iter()
            .map(|t| {
                let params = t.blocks.iter().map(|b| b.params).sum::<u64>();
                (
                    t.kind,
                    budget.tower(t.kind).map(|k| removable(params, k)),
                    0,
                )
            })
            .collect();
        let overridden: u64 = own.iter().filter_map(|o| o.1).sum();
        let shared_limit = budget.keep.map_or(0, |k| {
            removable(arch.params_blocks(), k).saturating_sub(overridden)
        });
        Self {
            own,
            shared_limit,
            shared_spent: 0,
        }
    }

    /// Whether `tower` may still lose parameters (the last removal may
    /// overshoot its limit by one unit, as the threshold falls between
    /// units).
    fn open(&self, tower: TowerKind) -> bool {
        match self.own.iter().find(|o| o.0 == tower) {
            Some((_, Some(limit), spent)) => spent < limit,
            _ => self.shared_spent < self.shared_limit,
        }
    }

    fn spend(&mut self, tower: TowerKind, params: u64) {
        match self.own.iter_mut().find(|o| o.0 == tower) {
            Some((_, Some(_), spent)) => *spent += params,
            _ => self.shared_spent += params,
        }
    }

    /// Whether no tower may lose anything more.
    fn closed(&self) -> bool {
        self.own.iter().all(|o| !self.open(o.0))
    }

    fn limit(&self) -> u64 {
        self.shared_limit + self.own.iter().filter_map(|o| o.1).sum::<u64>()
    }
}

/// Scores `candidates` with `score` and marks the ones to remove so that at
/// most `budget`'s share of `arch`'s block parameters remains. Returns the
/// plan.
pub fn allocate(
    arch: &Architecture,
    candidates: &mut [Candidate],
    score: Score,
    budget: &Budget,
) -> Plan {
    for c in candidates.iter_mut() {
        c.score = match score {
            Score::Id => c.influence * c.id,
            Score::Bi => c.influence,
            Score::Magnitude => c.magnitude,
        };
        c.removed = false;
    }
    let mut spending = Spending::new(arch, budget);
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&candidates[a], &candidates[b]);
        x.score
            .total_cmp(&y.score)
            .then((x.tower, x.block, x.part).cmp(&(y.tower, y.block, y.part)))
    });
    for i in order {
        if spending.closed() {
            break;
        }
        let c = &candidates[i];
        if !spending.open(c.tower) {
            continue;
        }
        // Keep one sub-block of each kind per tower.
        let left = candidates
            .iter()
            .filter(|o| o.tower == c.tower && o.part == c.part && !o.removed)
            .count();
        if left <= 1 {
            continue;
        }
        spending.spend(c.tower, c.params);
        candidates[i].removed = true;
    }
    let mut blocks = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            let gone = |part| {
                candidates.iter().any(|c| {
                    c.tower == tower.kind && c.block == block.index && c.part == part && c.removed
                })
            };
            let (attention, mlp) = (gone(Part::Attention), gone(Part::Mlp));
            if !(attention || mlp) {
                continue;
            }
            blocks.push(BlockAction {
                tower: tower.kind.name().to_string(),
                index: block.index,
                drop: attention && mlp,
                drop_attention: attention && !mlp,
                drop_mlp: mlp && !attention,
                keep_heads: None,
                keep_mlp: None,
                zero_below: None,
            });
        }
    }
    Plan {
        blocks,
        ..Plan::empty()
    }
    .normalized()
}

/// Block parameters `plan` removes from each tower of `arch` (exact: the
/// weights and biases that the rewrites slice away or drop).
pub fn removed_params(arch: &Architecture, graph: &Graph, plan: &Plan) -> Vec<(TowerKind, u64)> {
    let mut out: Vec<(TowerKind, u64)> = arch.towers.iter().map(|t| (t.kind, 0)).collect();
    for action in &plan.blocks {
        let kind = if action.tower == "vision" {
            TowerKind::Vision
        } else {
            TowerKind::Text
        };
        let Some(block) = arch.tower(kind).and_then(|t| t.blocks.get(action.index)) else {
            continue;
        };
        let mut removed = 0u64;
        if action.drop {
            removed += block.params;
        }
        if action.drop_attention {
            removed += sub_block_params(graph, block, Part::Attention);
        }
        if action.drop_mlp {
            removed += sub_block_params(graph, block, Part::Mlp);
        }
        if let Some(keep) = &action.keep_heads {
            let a = &block.attention.body;
            let gone = ((a.heads - keep.len()) * a.head_dim) as u64;
            let input = match &a.projections {
                crate::arch::Projections::Separate { q, .. } => q.in_features,
                crate::arch::Projections::Packed { qkv } => qkv.in_features,
                crate::arch::Projections::Fused { in_features, .. } => *in_features,
            } as u64;
            // q, k, v columns with their biases, and the output rows.
            removed += 3 * gone * (input + 1) + gone * a.out.out_features as u64;
        }
        if let Some(keep) = &action.keep_mlp {
            let m = &block.mlp.body;
            let gone = (m.width() - keep.len()) as u64;
            removed += gone * (m.fc1.in_features as u64 + 1) + gone * m.fc2.out_features as u64;
        }
        if let Some(entry) = out.iter_mut().find(|(k, _)| *k == kind) {
            entry.1 += removed;
        }
    }
    out
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
    let input = match &a.projections {
        crate::arch::Projections::Separate { q, .. } => q.in_features,
        crate::arch::Projections::Packed { qkv } => qkv.in_features,
        crate::arch::Projections::Fused { in_features, .. } => *in_features,
    } as u64;
    let d = a.head_dim;
    for h in 0..a.heads {
        let energy: f64 = (h * d..(h + 1) * d)
            .map(|c| context_energy.get(c).copied().unwrap_or(0.0))
            .sum();
        let weight: f64 = (h * d..(h + 1) * d)
            .map(|r| out_rows.get(r).copied().unwrap_or(0.0).powi(2))
            .sum();
        units.push(Unit {
            tower,
            block: block.index,
            part: Part::Attention,
            index: h,
            params: d as u64 * (3 * (input + 1) + a.out.out_features as u64),
            score: energy.sqrt() * weight.sqrt() * attention_id,
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
            params: m.fc1.in_features as u64 + 1 + m.fc2.out_features as u64,
            score: energy.sqrt() * fc2_rows.get(j).copied().unwrap_or(0.0) * mlp_id,
            removed: false,
        });
    }
    units
}

/// L2 norm of each input row of a linear layer's weight (the weights that
/// carry input feature i).
fn row_norms(graph: &Graph, linear: &crate::arch::Linear) -> Vec<f64> {
    let Some(values) = graph
        .initializer(&linear.weight)
        .and_then(|t| t.to_f32().ok())
    else {
        return Vec::new();
    };
    let (rows, cols) = (linear.in_features, linear.out_features);
    (0..rows)
        .map(|i| {
            (0..cols)
                .map(|o| {
                    // [in, out] for MatMul; [out, in] when stored transposed.
                    let v = if linear.transposed {
                        values[o * rows + i]
                    } else {
                        values[i * cols + o]
                    };
                    (v as f64) * (v as f64)
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// Removes the lowest-scored units across both towers (one threshold)
/// until at most `budget`'s share of the block parameters remains, `spent`
/// (per tower) having gone already. Every block keeps
/// at least one head and, for hardware-friendly shapes, a multiple of 8
/// neurons (at least 8). Fills the per-sub-block unit counts of
/// `candidates` and returns the plan.
pub fn allocate_units(
    arch: &Architecture,
    units: &mut [Unit],
    candidates: &mut [Candidate],
    budget: &Budget,
    spent: &[(TowerKind, u64)],
) -> Plan {
    let mut spending = Spending::new(arch, budget);
    for &(tower, params) in spent {
        spending.spend(tower, params);
    }
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&units[a], &units[b]);
        x.score
            .total_cmp(&y.score)
            .then((x.tower, x.block, x.part, x.index).cmp(&(y.tower, y.block, y.part, y.index)))
    });
    // Kept and total units per (tower, block, part).
    let key = |u: &Unit| (u.tower, u.block, u.part);
    let mut counts: std::collections::HashMap<(TowerKind, usize, Part), (usize, usize)> =
        std::collections::HashMap::new();
    for u in units.iter() {
        let entry = counts.entry(key(u)).or_default();
        entry.0 += 1;
        entry.1 += 1;
    }
    for &i in &order {
        if spending.closed() {
            break;
        }
        if !spending.open(units[i].tower) {
            continue;
        }
        let (kept, total) = counts[&key(&units[i])];
        let floor = match units[i].part {
            Part::Attention => 1,
            Part::Mlp => 8.min(total),
        };
        if kept <= floor {
            continue;
        }
        units[i].removed = true;
        spending.spend(units[i].tower, units[i].params);
        counts.get_mut(&key(&units[i])).expect("counted").0 -= 1;
    }
    // Round kept neuron counts down to a multiple of 8 by removing the
    // lowest-scored kept neurons of that MLP: widths stay hardware-friendly
    // and the budget is still met (rounding up would overshoot it).
    for &i in &order {
        if units[i].part != Part::Mlp || units[i].removed {
            continue;
        }
        let entry = counts.get_mut(&key(&units[i])).expect("counted");
        if entry.0 < entry.1 && entry.0 > 8 && !entry.0.is_multiple_of(8) {
            units[i].removed = true;
            entry.0 -= 1;
        }
    }
    let mut blocks = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            let kept = |part| -> (Vec<usize>, usize) {
                let mine: Vec<&Unit> = units
                    .iter()
                    .filter(|u| u.tower == tower.kind && u.block == block.index && u.part == part)
                    .collect();
                let mut k: Vec<usize> = mine
                    .iter()
                    .filter(|u| !u.removed)
                    .map(|u| u.index)
                    .collect();
                k.sort_unstable();
                (k, mine.len())
            };
            let (heads, h_total) = kept(Part::Attention);
            let (neurons, n_total) = kept(Part::Mlp);
            for c in candidates
                .iter_mut()
                .filter(|c| c.tower == tower.kind && c.block == block.index && !c.removed)
            {
                c.units = Some(match c.part {
                    Part::Attention => [heads.len(), h_total],
                    Part::Mlp => [neurons.len(), n_total],
                });
            }
            if heads.len() == h_total && neurons.len() == n_total {
                continue;
            }
            blocks.push(BlockAction {
                tower: tower.kind.name().to_string(),
                index: block.index,
                drop: false,
                drop_attention: false,
                drop_mlp: false,
                keep_heads: (heads.len() < h_total).then_some(heads),
                keep_mlp: (neurons.len() < n_total).then_some(neurons),
                zero_below: None,
            });
        }
    }
    Plan {
        blocks,
        ..Plan::empty()
    }
    .normalized()
}
