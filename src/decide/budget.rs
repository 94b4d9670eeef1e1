//! Budgets: how many block parameters may go, overall and per tower, and
//! what a plan actually removes.

use serde::Serialize;

use super::score::{Part, sub_block_params};
use crate::arch::{Architecture, TowerKind};
use crate::ir::Graph;
use crate::plan::Plan;

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

/// Fewest of its block parameters a tower keeps, whatever the budget (the
/// command line refuses smaller per-tower fractions). One threshold over
/// towers whose scores live on different scales can otherwise hollow one
/// out: many individually cheap removals add up.
pub const MIN_TOWER_KEEP: f64 = 0.1;

/// Parameters removed so far against a [`Budget`].
pub(super) struct Spending {
    /// Per tower: its own limit (when overridden), what it spent, and the
    /// most it may spend at all ([`MIN_TOWER_KEEP`]).
    own: Vec<(TowerKind, Option<u64>, u64, u64)>,
    shared_limit: u64,
    shared_spent: u64,
}

impl Spending {
    pub(super) fn new(arch: &Architecture, budget: &Budget) -> Self {
        let removable = |params: u64, keep: f64| (params as f64 * (1.0 - keep)).ceil() as u64;
        let own: Vec<(TowerKind, Option<u64>, u64, u64)> = arch
            .towers
            .iter()
            .map(|t| {
                let params = t.blocks.iter().map(|b| b.params).sum::<u64>();
                (
                    t.kind,
                    budget.tower(t.kind).map(|k| removable(params, k)),
                    0,
                    (params as f64 * (1.0 - MIN_TOWER_KEEP)).floor() as u64,
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
    pub(super) fn open(&self, tower: TowerKind) -> bool {
        match self.own.iter().find(|o| o.0 == tower) {
            Some((_, Some(limit), spent, _)) => spent < limit,
            _ => self.shared_spent < self.shared_limit,
        }
    }

    /// Whether removing `params` more from `tower` keeps it at or above
    /// its floor ([`MIN_TOWER_KEEP`]).
    pub(super) fn fits(&self, tower: TowerKind, params: u64) -> bool {
        match self.own.iter().find(|o| o.0 == tower) {
            Some((_, _, spent, cap)) => spent + params <= *cap,
            None => true,
        }
    }

    pub(super) fn spend(&mut self, tower: TowerKind, params: u64) {
        match self.own.iter_mut().find(|o| o.0 == tower) {
            Some((_, limit, spent, _)) => {
                *spent += params;
                if limit.is_none() {
                    self.shared_spent += params;
                }
            }
            None => self.shared_spent += params,
        }
    }

    /// Whether no tower may lose anything more.
    pub(super) fn closed(&self) -> bool {
        self.own.iter().all(|o| !self.open(o.0))
    }

    fn limit(&self) -> u64 {
        self.shared_limit + self.own.iter().filter_map(|o| o.1).sum::<u64>()
    }
}

/// Block parameters `plan` removes from each tower of `arch` (exact: the
/// weights and biases that the rewrites slice away or drop).
pub fn removed_params(arch: &Architecture, graph: &Graph, plan: &Plan) -> Vec<(TowerKind, u64)> {
    let mut out: Vec<(TowerKind, u64)> = arch.towers.iter().map(|t| (t.kind, 0)).collect();
    for action in &plan.blocks {
        let kind = action.tower;
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
            let groups = a.kept_groups(keep).map_or(a.kv_heads, |g| g.len());
            let gone_kv = ((a.kv_heads - groups) * a.head_dim) as u64;
            let input = a.in_features() as u64;
            // q columns and the k, v columns of the removed key/value heads
            // with their biases, and the output rows.
            removed += (gone + 2 * gone_kv) * (input + 1) + gone * a.out.out_features as u64;
        }
        if let Some(keep) = &action.keep_mlp {
            let m = &block.mlp.body;
            let gone = (m.width() - keep.len()) as u64;
            let gated = 1 + u64::from(m.up.is_some());
            removed +=
                gated * gone * (m.fc1.in_features as u64 + 1) + gone * m.fc2.out_features as u64;
        }
        if let Some(entry) = out.iter_mut().find(|(k, _)| *k == kind) {
            entry.1 += removed;
        }
    }
    out
}
