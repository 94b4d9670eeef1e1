//! Allocations checked against measured sensitivity: several ways to spend
//! the budget are made into plans, the pipeline's apply-and-verify step
//! judges every plan on decision samples (never the held-out ones), and the
//! plan whose model follows the original most closely wins.
//!
//! The intrinsic dimension shapes each candidate (it weights the scores
//! under one global threshold, as the ID-pruning paper proposes), but a
//! one-shot structural prune can starve a tower that ID calls robust:
//! many individually cheap removals add up. So the split of the budget
//! between the towers is tried, not assumed: the global threshold's own
//! split, and splits that keep more or less of the vision tower. In `all`
//! mode the share of the budget taken as whole sub-blocks is tried too.

use serde::Serialize;

use super::allocate::{allocate, allocate_units};
use super::budget::{Budget, MIN_TOWER_KEEP, removed_params};
use super::score::{Candidate, Part, Score, Unit, UnitOrder};
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
    /// Distinct top-1 picks of the original per sample compared (see
    /// [`crate::verify::Fidelity::top1_spread`]).
    pub top1_spread: Option<f64>,
    /// Whether the plan could be applied at all (a rewrite the model's
    /// form does not support loses to every plan that applies, instead of
    /// ending the search).
    pub applied: bool,
}

/// Below this spread of the original's top-1 picks the agreement is not
/// used to rank: on the untrained fixture most images ranked the same text
/// first, the agreement jumped between 6% and 94% with one flip, and the
/// allocation it preferred was the one with the worst held-out cosine.
pub const MIN_TOP1_SPREAD: f64 = 0.5;

impl Verdict {
    /// The agreement, where the original's picks are spread enough for
    /// it to mean something.
    fn informative_top1(&self) -> Option<f64> {
        self.top1_agreement
            .filter(|_| self.top1_spread.is_some_and(|s| s >= MIN_TOP1_SPREAD))
    }

    /// Whether this verdict beats `other`. The task-level agreement comes
    /// first where the model has an informative one (on the trained
    /// fixture the split with the better embedding cosine had the worse
    /// zero-shot accuracy: the cosine of one tower's embeddings says
    /// little about how the other tower's changes move the ranking); the
    /// cosine decides ties and models without it.
    pub fn beats(&self, other: &Verdict) -> bool {
        if self.applied != other.applied {
            return self.applied;
        }
        match (self.informative_top1(), other.informative_top1()) {
            (Some(a), Some(b)) if a != b => a > b,
            _ => self.min_cosine > other.min_cosine,
        }
    }
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

/// One allocation tried.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// What was tried (`global threshold`, `vision keeps 0.60`, …).
    pub label: String,
    /// `all` mode: the share of the removed parameters taken as whole
    /// sub-blocks.
    pub sub_block_share: Option<f64>,
    /// The kept fraction of each tower's block parameters the allocation
    /// asked for (none: the global threshold chose).
    pub tower_keep: Vec<(TowerKind, f64)>,
    /// Smallest per-output cosine to the original on the judged samples.
    pub min_cosine: f64,
    /// Top-1 agreement on the judged samples (CLIP-style outputs).
    pub top1_agreement: Option<f64>,
    /// Distinct top-1 picks of the original per judged sample; below
    /// [`MIN_TOP1_SPREAD`] the agreement was not used to rank.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_spread: Option<f64>,
    /// False when the plan could not be applied to this model (its
    /// cosine and agreement are then meaningless).
    pub applied: bool,
    /// The earlier allocation that made the same plan (not judged again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_plan_as: Option<String>,
    /// Whether this allocation was chosen.
    pub chosen: bool,
}

impl Trial {
    fn verdict(&self) -> Verdict {
        Verdict {
            min_cosine: self.min_cosine,
            top1_agreement: self.top1_agreement,
            top1_spread: self.top1_spread,
            applied: self.applied,
        }
    }
}

/// Shares of the removed parameters taken as whole sub-blocks (`all`).
pub const SUB_BLOCK_SHARES: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// Offsets of the vision tower's kept fraction from the overall one.
pub const TOWER_OFFSETS: [f64; 6] = [-0.3, -0.2, -0.1, 0.1, 0.2, 0.3];

/// What makes a plan from a budget.
#[derive(Debug, Clone, Copy)]
pub enum Allocation {
    /// Whole sub-blocks by `score`.
    SubBlocks(Score),
    /// Heads and neurons, in this order.
    Units(UnitOrder),
    /// A share of the budget as sub-blocks, the rest as units of what
    /// remains.
    Both(Score, f64, UnitOrder),
}

/// The inputs every allocation reads.
pub struct Ground<'a> {
    /// The architecture.
    pub arch: &'a Architecture,
    /// The original graph.
    pub graph: &'a Graph,
    /// Every sub-block with its measurements.
    pub candidates: &'a [Candidate],
    /// Every head and neuron with its score (empty unless units count).
    pub units: &'a [Unit],
}

impl Ground<'_> {
    /// The plan `allocation` makes under `budget`, and the sub-blocks with
    /// their decisions.
    pub fn plan(&self, allocation: Allocation, budget: &Budget) -> (Plan, Vec<Candidate>) {
        let mut chosen = self.candidates.to_vec();
        match allocation {
            Allocation::SubBlocks(score) => {
                let plan = allocate(self.arch, &mut chosen, score, budget);
                (plan, chosen)
            }
            Allocation::Units(by) => {
                let mut units = self.units.to_vec();
                let plan = allocate_units(self.arch, &mut units, &mut chosen, budget, &[], by);
                (plan, chosen)
            }
            Allocation::Both(score, share, by) => {
                let blocks_plan = allocate(self.arch, &mut chosen, score, &budget.scaled(share));
                let spent = removed_params(self.arch, self.graph, &blocks_plan);
                let gone = |t: TowerKind, b: usize, p: Part| {
                    chosen
                        .iter()
                        .any(|c| c.removed && c.tower == t && c.block == b && c.part == p)
                };
                let mut rest: Vec<Unit> = self
                    .units
                    .iter()
                    .filter(|u| !gone(u.tower, u.block, u.part))
                    .cloned()
                    .collect();
                let units_plan =
                    allocate_units(self.arch, &mut rest, &mut chosen, budget, &spent, by);
                (merge_plans(&blocks_plan, &units_plan), chosen)
            }
        }
    }
}

/// The budgets to try for `budget`: itself (the global threshold decides
/// the split), then fixed splits between the towers that keep the same
/// overall fraction. A budget that already fixes a tower's share, or a
/// model with one tower, is tried as it is.
pub fn tower_splits(arch: &Architecture, budget: &Budget) -> Vec<(String, Budget)> {
    let mut out = vec![("global threshold".to_string(), *budget)];
    let (Some(keep), None, None) = (budget.keep, budget.vision, budget.text) else {
        return out;
    };
    let params = |k: TowerKind| -> f64 {
        arch.tower(k)
            .map_or(0, |t| t.blocks.iter().map(|b| b.params).sum::<u64>()) as f64
    };
    let (pv, pt) = (params(TowerKind::Vision), params(TowerKind::Text));
    if pv == 0.0 || pt == 0.0 {
        return out;
    }
    for offset in TOWER_OFFSETS {
        let kv = keep + offset;
        let kt = (keep * (pv + pt) - kv * pv) / pt;
        if !(MIN_TOWER_KEEP..=1.0).contains(&kv) || !(MIN_TOWER_KEEP..=1.0).contains(&kt) {
            continue;
        }
        out.push((
            format!("vision keeps {kv:.2}, text {kt:.2}"),
            Budget {
                keep: None,
                vision: Some(kv),
                text: Some(kt),
            },
        ));
    }
    out
}

/// One candidate of a search.
struct Option_ {
    label: String,
    share: Option<f64>,
    budget: Budget,
    plan: Plan,
    chosen: Vec<Candidate>,
}

/// Finds the best allocation in two rounds of judging: first every one of
/// `allocations` under the global threshold, then the tower splits of the
/// best of them. Plans are completed by `finish` (the repair record).
/// Ties go to the earlier candidate: the global threshold before fixed
/// splits, larger sub-block shares before smaller ones.
pub fn search<J: Judge>(
    ground: &Ground<'_>,
    allocations: &[(Option<f64>, Allocation)],
    budget: &Budget,
    finish: impl Fn(Plan) -> Plan,
    judge: &mut J,
) -> Result<(Plan, Vec<Candidate>, Vec<Trial>), J::Error> {
    let make = |share: Option<f64>, allocation: Allocation, label: String, split: Budget| {
        let (plan, chosen) = ground.plan(allocation, &split);
        let mut label = match share {
            Some(s) => format!("{label}, sub-block share {s:.2}"),
            None => label,
        };
        if let Allocation::Units(UnitOrder::PerParameter)
        | Allocation::Both(_, _, UnitOrder::PerParameter) = allocation
        {
            label.push_str(", units per parameter");
        }
        Option_ {
            label,
            share,
            budget: split,
            plan: finish(plan),
            chosen,
        }
    };
    let global: Vec<Option_> = allocations
        .iter()
        .map(|&(share, a)| make(share, a, "global threshold".into(), *budget))
        .collect();
    let mut trials = Vec::new();
    let mut options = Vec::new();
    let first = judge_all(global, judge, &mut trials, &mut options)?;
    let (share, allocation) = allocations[first];
    let splits: Vec<Option_> = tower_splits(ground.arch, budget)
        .into_iter()
        .skip(1)
        .map(|(label, split)| make(share, allocation, label, split))
        .collect();
    judge_all(splits, judge, &mut trials, &mut options)?;
    let mut best = 0;
    for (i, t) in trials.iter().enumerate() {
        if t.verdict().beats(&trials[best].verdict()) {
            best = i;
        }
    }
    if let Some(trial) = trials.get_mut(best) {
        trial.chosen = true;
    }
    let option = options.swap_remove(best);
    Ok((option.plan, option.chosen, trials))
}

/// Judges the new `candidates` (plans already tried are not judged again),
/// records their trials and returns the index among `candidates` of the
/// best.
fn judge_all<J: Judge>(
    candidates: Vec<Option_>,
    judge: &mut J,
    trials: &mut Vec<Trial>,
    options: &mut Vec<Option_>,
) -> Result<usize, J::Error> {
    let fresh: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            !options.iter().any(|o| o.plan == candidates[i].plan)
                && !candidates[..i].iter().any(|o| o.plan == candidates[i].plan)
        })
        .collect();
    let plans: Vec<Plan> = fresh.iter().map(|&i| candidates[i].plan.clone()).collect();
    let verdicts = judge.judge(&plans)?;
    let mut best: Option<(Verdict, usize)> = None;
    for (&i, verdict) in fresh.iter().zip(&verdicts) {
        if best.is_none_or(|b| verdict.beats(&b.0)) {
            best = Some((*verdict, i));
        }
    }
    for (i, option) in candidates.into_iter().enumerate() {
        // An allocation whose plan was already judged is listed with that
        // one's verdict (so the report shows every allocation considered),
        // and never beats it.
        let (verdict, same_plan_as) = match fresh.iter().position(|&f| f == i) {
            Some(k) => (verdicts[k], None),
            None => {
                let Some(earlier) = options.iter().position(|o| o.plan == option.plan) else {
                    continue;
                };
                let first = &trials[earlier];
                let label = first.same_plan_as.clone().unwrap_or(first.label.clone());
                (first.verdict(), Some(label))
            }
        };
        let tower_keep = [
            (TowerKind::Vision, option.budget.vision),
            (TowerKind::Text, option.budget.text),
        ]
        .into_iter()
        .filter_map(|(t, k)| k.map(|k| (t, k)))
        .collect();
        trials.push(Trial {
            label: option.label.clone(),
            sub_block_share: option.share,
            tower_keep,
            min_cosine: verdict.min_cosine,
            top1_agreement: verdict.top1_agreement,
            top1_spread: verdict.top1_spread,
            applied: verdict.applied,
            same_plan_as,
            chosen: false,
        });
        options.push(option);
    }
    Ok(best.map_or(0, |b| b.1))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(min_cosine: f64, top1: f64, spread: f64) -> Verdict {
        Verdict {
            min_cosine,
            top1_agreement: Some(top1),
            top1_spread: Some(spread),
            applied: true,
        }
    }

    #[test]
    fn agreement_ranks_first_where_the_picks_are_spread() {
        let better_task = verdict(0.95, 0.98, 0.9);
        let better_cosine = verdict(0.99, 0.90, 0.9);
        assert!(better_task.beats(&better_cosine));
        assert!(!better_cosine.beats(&better_task));
        // Equal agreement: the cosine decides.
        assert!(verdict(0.99, 0.9, 0.9).beats(&verdict(0.98, 0.9, 0.9)));
    }

    #[test]
    fn concentrated_picks_leave_the_ranking_to_the_cosine() {
        let a = verdict(0.95, 0.94, 0.1);
        let b = verdict(0.99, 0.06, 0.1);
        assert!(b.beats(&a) && !a.beats(&b));
        // Without an agreement at all (not a CLIP-style model).
        let plain = |c| Verdict {
            min_cosine: c,
            top1_agreement: None,
            top1_spread: None,
            applied: true,
        };
        assert!(plain(0.9).beats(&plain(0.8)));
        assert!(!plain(0.8).beats(&plain(0.8)));
        // A plan that could not be applied loses whatever its numbers.
        let failed = Verdict {
            applied: false,
            ..verdict(1.0, 1.0, 1.0)
        };
        assert!(plain(0.1).beats(&failed) && !failed.beats(&plain(0.1)));
    }
}
