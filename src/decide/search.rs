//! `all` mode: how much of the budget goes to whole sub-blocks and how much
//! to heads and neurons is not guessed but tried. Several splits each make
//! a plan; the pipeline's apply-and-verify step judges every plan on
//! decision samples, and the plan whose model follows the original most
//! closely wins.

use serde::Serialize;

use super::allocate::{allocate, allocate_units};
use super::budget::{Budget, removed_params};
use super::score::{Candidate, Part, Score, Unit};
use crate::arch::{Architecture, TowerKind};
use crate::ir::Graph;
use crate::plan::Plan;

/// How closely the model a plan makes follows the original.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Smallest per-output mean cosine to the original.
    pub min_cosine: f64,
    /// Top-1 agreement (CLIP-style outputs).
    pub top1_agreement: Option<f64>,
}

/// Judges candidate plans on decision samples (never the held-out ones).
/// The pipeline implements it with its one apply-and-verify step, so
/// deciding never calls back into calibration or rewriting itself.
pub trait Judge {
    /// What judging can fail with.
    type Error;
    /// One verdict per plan, in order.
    fn judge(&mut self, plans: &[Plan]) -> Result<Vec<Verdict>, Self::Error>;
}

/// One split of the budget tried in `all` mode.
#[derive(Debug, Clone, Serialize)]
pub struct SplitTrial {
    /// Share of the removed parameters taken as whole sub-blocks.
    pub sub_block_share: f64,
    /// Smallest per-output cosine to the original on the judged samples.
    pub min_cosine: f64,
    /// Top-1 agreement on the judged samples (CLIP-style outputs).
    pub top1_agreement: Option<f64>,
    /// Whether this split was chosen.
    pub chosen: bool,
}

/// Shares of the removed parameters taken as whole sub-blocks.
pub const SUB_BLOCK_SHARES: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// Removes sub-blocks with a share of the budget and heads and neurons of
/// the remaining sub-blocks with the rest, for each of
/// [`SUB_BLOCK_SHARES`], and keeps the plan `judge` rates highest (smallest
/// output cosine). Ties go to the larger sub-block share (whole sub-blocks
/// save more time than slimmed ones). `finish` completes each plan (the
/// repair record) before it is judged.
#[allow(clippy::too_many_arguments)]
pub fn search_split<J: Judge>(
    arch: &Architecture,
    graph: &Graph,
    candidates: &[Candidate],
    units: &[Unit],
    score: Score,
    budget: &Budget,
    finish: impl Fn(Plan) -> Plan,
    judge: &mut J,
) -> Result<(Plan, Vec<Candidate>, Vec<SplitTrial>), J::Error> {
    let mut tried = Vec::new();
    for share in SUB_BLOCK_SHARES {
        let mut chosen = candidates.to_vec();
        let blocks_plan = allocate(arch, &mut chosen, score, &budget.scaled(share));
        let spent = removed_params(arch, graph, &blocks_plan);
        let gone = |t: TowerKind, b: usize, p: Part| {
            chosen
                .iter()
                .any(|c| c.removed && c.tower == t && c.block == b && c.part == p)
        };
        let mut rest: Vec<Unit> = units
            .iter()
            .filter(|u| !gone(u.tower, u.block, u.part))
            .cloned()
            .collect();
        let units_plan = allocate_units(arch, &mut rest, &mut chosen, budget, &spent);
        let plan = finish(merge_plans(&blocks_plan, &units_plan));
        tried.push((share, plan, chosen));
    }
    let plans: Vec<Plan> = tried.iter().map(|t| t.1.clone()).collect();
    let verdicts = judge.judge(&plans)?;
    let mut trials = Vec::new();
    let mut best: Option<(f64, usize)> = None;
    for ((share, _, _), verdict) in tried.iter().zip(&verdicts) {
        trials.push(SplitTrial {
            sub_block_share: *share,
            min_cosine: verdict.min_cosine,
            top1_agreement: verdict.top1_agreement,
            chosen: false,
        });
        if best.is_none_or(|b| verdict.min_cosine >= b.0) {
            best = Some((verdict.min_cosine, trials.len() - 1));
        }
    }
    let index = best.map_or(0, |b| b.1);
    if let Some(trial) = trials.get_mut(index) {
        trial.chosen = true;
    }
    let (_, plan, chosen) = tried.swap_remove(index);
    Ok((plan, chosen, trials))
}

/// One plan with the actions of both (they touch different sub-blocks).
pub fn merge_plans(a: &Plan, b: &Plan) -> Plan {
    let mut blocks = a.blocks.clone();
    for action in &b.blocks {
        match blocks
            .iter_mut()
            .find(|x| x.tower == action.tower && x.index == action.index)
        {
            Some(x) if x.drop => {}
            Some(x) => {
                if !x.drop_attention {
                    x.keep_heads = action.keep_heads.clone();
                }
                if !x.drop_mlp {
                    x.keep_mlp = action.keep_mlp.clone();
                }
            }
            None => blocks.push(action.clone()),
        }
    }
    Plan {
        blocks,
        ..Plan::empty()
    }
    .normalized()
}
