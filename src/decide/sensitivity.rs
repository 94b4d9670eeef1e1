//! The seed's claims checked on the model at hand instead of assumed: each
//! sub-block is removed alone, the judge measures how far the outputs move,
//! and the ranking by that cost is compared (Spearman) with the ranking by
//! intrinsic dimension, by block influence and by the score that decides.
//!
//! The paper's premise is that a layer whose representation has a higher
//! ID matters more, so removing it should cost more: a positive
//! correlation between ID and the output change supports it on this model,
//! one near zero says the ID carries no ranking signal here.

use serde::Serialize;

use super::score::{Candidate, Part, Score};
use super::search::{Judge, Verdict};
use crate::arch::TowerKind;
use crate::plan::{BlockAction, Plan};

/// One sub-block removed alone.
#[derive(Debug, Clone, Serialize)]
pub struct SubBlockCost {
    /// Its tower.
    pub tower: TowerKind,
    /// Its block.
    pub block: usize,
    /// Attention or MLP.
    pub part: Part,
    /// ID of the block's output representation (as the decision uses it).
    pub id: f64,
    /// Block influence (1 − cosine between the sub-block's input and
    /// output residual streams).
    pub influence: f64,
    /// The score the decision ranks it by.
    pub score: f64,
    /// Output change when it alone is removed: 1 − the smallest per-output
    /// mean cosine to the original.
    pub output_change: f64,
    /// Top-1 agreement with the original when it alone is removed
    /// (CLIP-style outputs).
    pub top1_agreement: Option<f64>,
}

/// Rank correlations of one tower.
#[derive(Debug, Clone, Serialize)]
pub struct TowerSensitivity {
    /// The tower.
    pub tower: TowerKind,
    /// Mean ID of its sub-blocks' representations.
    pub mean_id: f64,
    /// Sub-blocks measured.
    pub sub_blocks: usize,
    /// Spearman correlation of ID with the output change (none: fewer than
    /// three sub-blocks, or one side constant).
    pub spearman_id: Option<f64>,
    /// Spearman correlation of block influence with the output change.
    pub spearman_influence: Option<f64>,
    /// Spearman correlation of the deciding score with the output change.
    pub spearman_score: Option<f64>,
    /// Mean output change of removing one of its sub-blocks.
    pub mean_output_change: f64,
}

/// What removing each sub-block alone costs, and how well the measurements
/// rank that cost.
#[derive(Debug, Clone, Serialize)]
pub struct Sensitivity {
    /// The score the correlations are taken against.
    pub score: Score,
    /// Per tower.
    pub towers: Vec<TowerSensitivity>,
    /// Over both towers.
    pub spearman_id: Option<f64>,
    /// Over both towers.
    pub spearman_score: Option<f64>,
    /// Every sub-block.
    pub sub_blocks: Vec<SubBlockCost>,
}

/// The plan that removes one sub-block and nothing else (no repair: the
/// cost of the removal itself).
pub fn single_removal(tower: TowerKind, block: usize, part: Part) -> Plan {
    Plan {
        blocks: vec![BlockAction {
            tower,
            index: block,
            drop: false,
            drop_attention: part == Part::Attention,
            drop_mlp: part == Part::Mlp,
            keep_heads: None,
            keep_mlp: None,
            zero_below: None,
        }],
        ..Plan::default()
    }
    .normalized()
}

/// Removes every sub-block of `candidates` alone, has `judge` measure the
/// output change, and correlates it with the measurements.
pub fn measure<J: Judge>(
    candidates: &[Candidate],
    score: Score,
    judge: &mut J,
) -> Result<Sensitivity, J::Error> {
    let plans: Vec<Plan> = candidates
        .iter()
        .map(|c| single_removal(c.tower, c.block, c.part))
        .collect();
    let verdicts: Vec<Verdict> = judge.judge(&plans)?;
    let sub_blocks: Vec<SubBlockCost> = candidates
        .iter()
        .zip(&verdicts)
        .map(|(c, v)| SubBlockCost {
            tower: c.tower,
            block: c.block,
            part: c.part,
            id: c.id,
            influence: c.influence,
            score: score.of(c),
            // NaN (null in the JSON) where the removal cannot be applied to
            // this model; left out of the means and correlations.
            output_change: if v.applied {
                1.0 - v.min_cosine
            } else {
                f64::NAN
            },
            top1_agreement: v.top1_agreement,
        })
        .collect();
    let correlate = |costs: &[&SubBlockCost], key: fn(&SubBlockCost) -> f64| {
        let x: Vec<f64> = costs.iter().map(|c| key(c)).collect();
        let y: Vec<f64> = costs.iter().map(|c| c.output_change).collect();
        spearman(&x, &y)
    };
    let mut towers = Vec::new();
    for kind in [TowerKind::Vision, TowerKind::Text] {
        let mine: Vec<&SubBlockCost> = sub_blocks.iter().filter(|c| c.tower == kind).collect();
        if mine.is_empty() {
            continue;
        }
        let n = mine.len() as f64;
        towers.push(TowerSensitivity {
            tower: kind,
            mean_id: mine.iter().map(|c| c.id).sum::<f64>() / n,
            sub_blocks: mine.len(),
            spearman_id: correlate(&mine, |c| c.id),
            spearman_influence: correlate(&mine, |c| c.influence),
            spearman_score: correlate(&mine, |c| c.score),
            mean_output_change: mean_finite(mine.iter().map(|c| c.output_change)),
        });
    }
    let all: Vec<&SubBlockCost> = sub_blocks.iter().collect();
    Ok(Sensitivity {
        score,
        spearman_id: correlate(&all, |c| c.id),
        spearman_score: correlate(&all, |c| c.score),
        towers,
        sub_blocks,
    })
}

/// The mean of the finite values (NaN when there are none).
fn mean_finite(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values
        .filter(|v| v.is_finite())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// Spearman's rank correlation (ties get their mean rank); none for fewer
/// than three pairs or a constant side.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() {
        return None;
    }
    // Pairs with a non-finite side (an ID estimate that failed, a NaN
    // output) have no place in a ranking: left out.
    let (x, y): (Vec<f64>, Vec<f64>) = x
        .iter()
        .zip(y)
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .map(|(a, b)| (*a, *b))
        .unzip();
    if x.len() < 3 {
        return None;
    }
    let (rx, ry) = (ranks(&x), ranks(&y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// 1-based ranks, ties sharing their mean rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_matches_hand_computed_values() {
        // Monotone either way.
        assert_eq!(
            spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 35.0, 90.0]),
            Some(1.0)
        );
        assert_eq!(
            spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]),
            Some(-1.0)
        );
        // Non-finite pairs are left out.
        assert_eq!(
            spearman(
                &[1.0, f64::NAN, 2.0, 3.0, 4.0],
                &[1.0, 5.0, 2.0, 3.0, f64::INFINITY]
            ),
            Some(1.0)
        );
        assert_eq!(spearman(&[1.0, 2.0, f64::NAN], &[1.0, 2.0, 3.0]), None);
        // d = (0, -1, 1, 0, 0): 1 − 6·2 / (5·24) = 0.9.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[1.0, 3.0, 2.0, 4.0, 5.0]).unwrap();
        assert!((r - 0.9).abs() < 1e-12, "{r}");
        // Ties get mean ranks: x ranks (1.5, 1.5, 3, 4) against y's
        // (1, 2, 3, 4) give Pearson 0.9486832980505138.
        let r = spearman(&[5.0, 5.0, 7.0, 9.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((r - 0.948_683_298_050_513_8).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn single_removals_remove_one_sub_block() {
        let plan = single_removal(TowerKind::Text, 3, Part::Mlp);
        assert_eq!(plan.blocks.len(), 1);
        let a = &plan.blocks[0];
        assert!(a.drop_mlp && !a.drop_attention && !a.drop);
        assert!(a.keep_heads.is_none() && a.keep_mlp.is_none() && plan.repair.is_none());
    }
}
