//! Allocation: one threshold over the scores of both towers.
//!
//! Sub-blocks sorted by score (ascending; ties by tower, block, attention
//! before MLP) are removed until the kept share of transformer-block
//! parameters is at most the budget's. A block that loses both sub-blocks
//! is dropped whole (its norms go too). Each tower keeps at least one
//! attention and one MLP sub-block.
//!
//! Units (heads and neurons) go the same way under one threshold; every
//! block keeps at least one head and, for hardware-friendly shapes, a
//! multiple of 8 neurons (at least 8).

use super::budget::{Budget, Spending};
use super::score::{Candidate, Part, Score, Unit, UnitOrder};
use crate::arch::{Architecture, TowerKind};
use crate::plan::{BlockAction, Plan};

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
        c.score = score.of(c);
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
        if !spending.open(c.tower) || !spending.fits(c.tower, c.params) {
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
                tower: tower.kind,
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
    by: UnitOrder,
) -> Plan {
    let mut spending = Spending::new(arch, budget);
    for &(tower, params) in spent {
        spending.spend(tower, params);
    }
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&units[a], &units[b]);
        x.key(by)
            .total_cmp(&y.key(by))
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
        if !spending.open(units[i].tower) || !spending.fits(units[i].tower, units[i].params) {
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
            // Attention units are key/value groups: the plan lists their
            // query heads.
            let (groups, h_total) = kept(Part::Attention);
            let attention = &block.attention.body;
            let heads = attention.group_heads(&groups);
            let (heads, h_total) = (heads, h_total * attention.group());
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
                tower: tower.kind,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Architecture;
    use crate::decide::budget::{MIN_TOWER_KEEP, removed_params};
    use crate::decide::score::{sub_block_params, unit_candidates};
    use crate::ir::{Graph, Model};

    /// The tiny CLIP fixture: 3 vision blocks (hidden 32, 4 heads, MLP 64)
    /// and 2 text blocks (hidden 24, 3 heads, MLP 48).
    fn clip() -> (Architecture, Graph) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/clip_tiny_torchscript_op17.onnx");
        let loaded = crate::onnx::load(&path).unwrap();
        let model = Model::from_proto(loaded.proto).unwrap();
        let arch = crate::arch::discover(&model.graph).unwrap();
        (arch, model.graph)
    }

    /// Every sub-block with `score(tower, block, part)` as its ID (and
    /// influence 1, so the `id` score equals it).
    fn candidates(
        arch: &Architecture,
        graph: &Graph,
        score: impl Fn(TowerKind, usize, Part) -> f64,
    ) -> Vec<Candidate> {
        let mut out = Vec::new();
        for tower in &arch.towers {
            for block in &tower.blocks {
                for part in [Part::Attention, Part::Mlp] {
                    out.push(Candidate {
                        tower: tower.kind,
                        block: block.index,
                        part,
                        params: sub_block_params(graph, block, part),
                        id: score(tower.kind, block.index, part),
                        influence: 1.0,
                        magnitude: 0.0,
                        score: 0.0,
                        removed: false,
                        units: None,
                    });
                }
            }
        }
        out
    }

    fn removed(arch: &Architecture, graph: &Graph, plan: &Plan, tower: TowerKind) -> u64 {
        removed_params(arch, graph, plan)
            .into_iter()
            .find(|(t, _)| *t == tower)
            .map_or(0, |(_, p)| p)
    }

    #[test]
    fn one_threshold_over_both_towers_removes_the_lowest_scores_first() {
        let (arch, graph) = clip();
        // Distinct scores, interleaving the towers.
        let score = |t: TowerKind, b: usize, p: Part| {
            let base = if t == TowerKind::Vision { 1.0 } else { 1.5 };
            base + b as f64 + if p == Part::Mlp { 0.25 } else { 0.0 }
        };
        for keep in [0.9, 0.75, 0.6, 0.45, 0.3] {
            let mut c = candidates(&arch, &graph, score);
            let plan = allocate(&arch, &mut c, Score::Id, &Budget::overall(keep));
            // The budget holds, unless the floors stop it.
            let total = arch.params_blocks() as f64;
            let gone = (removed(&arch, &graph, &plan, TowerKind::Vision)
                + removed(&arch, &graph, &plan, TowerKind::Text)) as f64;
            let floor_hit = [TowerKind::Vision, TowerKind::Text].iter().any(|&t| {
                [Part::Attention, Part::Mlp].iter().any(|&p| {
                    c.iter()
                        .filter(|x| x.tower == t && x.part == p && !x.removed)
                        .count()
                        == 1
                })
            });
            assert!(
                1.0 - gone / total <= keep + 1e-12 || floor_hit,
                "keep {keep}: kept {}",
                1.0 - gone / total
            );
            // One threshold: a kept sub-block scores above every removed
            // one, unless it is the last of its kind in its tower.
            let highest_removed = c
                .iter()
                .filter(|x| x.removed)
                .map(|x| x.score)
                .fold(f64::NEG_INFINITY, f64::max);
            for kept in c.iter().filter(|x| !x.removed) {
                let last_of_kind = c
                    .iter()
                    .filter(|x| x.tower == kept.tower && x.part == kept.part && !x.removed)
                    .count()
                    == 1;
                assert!(
                    kept.score > highest_removed || last_of_kind,
                    "keep {keep}: {:?}/{} {:?} kept at {} below a removed {highest_removed}",
                    kept.tower,
                    kept.block,
                    kept.part,
                    kept.score
                );
            }
            // Every tower keeps one attention and one MLP sub-block.
            for t in [TowerKind::Vision, TowerKind::Text] {
                for p in [Part::Attention, Part::Mlp] {
                    assert!(
                        c.iter().any(|x| x.tower == t && x.part == p && !x.removed),
                        "keep {keep}: {t:?} lost every {p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_threshold_takes_more_from_the_low_id_tower() {
        let (arch, graph) = clip();
        // Equal influence; vision IDs ten times the text IDs (the paper's
        // asymmetry): the text tower goes first.
        let mut c = candidates(&arch, &graph, |t, b, _| {
            (if t == TowerKind::Vision { 20.0 } else { 2.0 }) + b as f64 * 0.1
        });
        let plan = allocate(&arch, &mut c, Score::Id, &Budget::overall(0.9));
        assert!(removed(&arch, &graph, &plan, TowerKind::Text) > 0);
        assert_eq!(removed(&arch, &graph, &plan, TowerKind::Vision), 0);
        // A block that loses both sub-blocks is dropped whole.
        assert!(
            plan.blocks
                .iter()
                .all(|a| a.drop || a.drop_attention != a.drop_mlp)
        );
    }

    #[test]
    fn a_tower_budget_binds_only_its_tower() {
        let (arch, graph) = clip();
        let mut c = candidates(&arch, &graph, |t, b, _| {
            (if t == TowerKind::Vision { 1.0 } else { 5.0 }) + b as f64
        });
        let budget = Budget {
            keep: Some(0.7),
            vision: Some(0.9),
            text: None,
        };
        let plan = allocate(&arch, &mut c, Score::Id, &budget);
        let vision_params: u64 = arch.towers[0].blocks.iter().map(|b| b.params).sum();
        let biggest = c
            .iter()
            .filter(|x| x.tower == TowerKind::Vision)
            .map(|x| x.params)
            .max()
            .unwrap();
        // At most its own share, overshooting by at most the last removal.
        let vision = removed(&arch, &graph, &plan, TowerKind::Vision);
        assert!(vision as f64 <= 0.1 * vision_params as f64 + biggest as f64);
        assert!(removed(&arch, &graph, &plan, TowerKind::Text) > 0);
    }

    #[test]
    fn kept_neurons_round_down_to_multiples_of_eight_and_heads_stay() {
        let (arch, graph) = clip();
        let mut slimmed = 0;
        for keep in [0.95, 0.8, 0.6, 0.4, 0.2] {
            let mut c = candidates(&arch, &graph, |_, _, _| 1.0);
            let mut units = Vec::new();
            for tower in &arch.towers {
                for block in &tower.blocks {
                    let a = &block.attention.body;
                    let m = &block.mlp.body;
                    // Energies that differ per channel, so the order is strict.
                    let context: Vec<f64> = (0..a.inner_width())
                        .map(|i| 1.0 + ((i * 7 + block.index) % 13) as f64)
                        .collect();
                    let activation: Vec<f64> = (0..m.width())
                        .map(|i| 1.0 + ((i * 5 + block.index) % 17) as f64)
                        .collect();
                    units.extend(unit_candidates(
                        &graph,
                        tower.kind,
                        block,
                        &context,
                        &activation,
                        3.0,
                        4.0,
                    ));
                }
            }
            let plan = allocate_units(
                &arch,
                &mut units,
                &mut c,
                &Budget::overall(keep),
                &[],
                UnitOrder::Score,
            );
            let gone = removed(&arch, &graph, &plan, TowerKind::Vision)
                + removed(&arch, &graph, &plan, TowerKind::Text);
            let needed = ((1.0 - keep) * arch.params_blocks() as f64).ceil() as u64;
            for action in &plan.blocks {
                let block = &arch.tower(action.tower).unwrap().blocks[action.index];
                if let Some(heads) = &action.keep_heads {
                    assert!(!heads.is_empty());
                }
                if let Some(neurons) = &action.keep_mlp {
                    slimmed += 1;
                    let n = neurons.len();
                    assert!(
                        n >= 8 && n.is_multiple_of(8) && n < block.mlp.body.width(),
                        "keep {keep}: {} keeps {n} neurons",
                        action.label()
                    );
                }
            }
            // Rounding only ever removes more: the budget holds (these
            // budgets stay clear of the one-head, eight-neuron floors).
            if keep >= 0.6 {
                assert!(gone >= needed, "keep {keep}: removed {gone} of {needed}");
            }
        }
        assert!(slimmed > 5, "only {slimmed} MLPs were slimmed");
    }

    #[test]
    fn no_budget_takes_a_tower_below_its_floor() {
        let (arch, _) = clip();
        let text: u64 = arch
            .tower(TowerKind::Text)
            .unwrap()
            .blocks
            .iter()
            .map(|b| b.params)
            .sum();
        // Budgets that would take nearly everything, shared or the tower's
        // own: both stop at the floor.
        let step = text / 100;
        for budget in [
            Budget::overall(0.01),
            Budget {
                keep: None,
                vision: Some(0.5),
                text: Some(0.01),
            },
        ] {
            let mut spending = Spending::new(&arch, &budget);
            let mut gone = 0;
            while spending.open(TowerKind::Text) && spending.fits(TowerKind::Text, step) {
                spending.spend(TowerKind::Text, step);
                gone += step;
            }
            let kept = 1.0 - gone as f64 / text as f64;
            assert!(kept >= MIN_TOWER_KEEP, "{budget:?}: kept {kept}");
            assert!(kept < MIN_TOWER_KEEP + 0.02, "{budget:?}: kept {kept}");
            // The vision tower may still spend.
            assert!(spending.open(TowerKind::Vision) && spending.fits(TowerKind::Vision, step));
        }
    }
}
