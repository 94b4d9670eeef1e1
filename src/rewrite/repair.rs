//! Least-squares repair of slimmed sub-blocks.
//!
//! Removing heads or MLP neurons removes rows of the downstream projection
//! (attention output, MLP `fc2`). The remaining rows were trained next to
//! the removed ones, so simply deleting rows loses the part of the output
//! that the removed units carried even where the kept units could express
//! it. Repair refits the kept rows and the bias so that the projection's
//! output stays as close as possible to the original on calibration data:
//!
//! ```text
//! a' = [a; 1]      (the projection's input, with a constant for the bias)
//! W' = [W; b]      (original weight and bias)
//! minimise Σ_tokens ‖X_Kᵀ a'_K − W'ᵀ a'‖²   over X_K   (K: kept rows + bias)
//! ⇔ (G_KK + λI) X_K = G_K· W'                 with G = mean a' a'ᵀ
//! ```
//!
//! Only the second moment `G` of the original model's activations is
//! needed (one pass, [`crate::calib::collect::Request::grams`]); λ is a
//! small ridge (1e-6 of the mean diagonal) for rank-deficient activations.
//! The fit is local: each sub-block reproduces what it contributed to the
//! residual stream of the original model.

use ndarray::{Array2, Axis, s};
use rayon::prelude::*;

use super::RewriteError;
use crate::arch::{Architecture, Block, Linear, TowerKind};
use crate::calib::collect;
use crate::calib::data::Inputs;
use crate::calib::{Pooling, Tap};
use crate::calib::{Provider, RuntimeError, RuntimeOptions};
use crate::ir::{Graph, Model};
use crate::linalg::{self, Threads};
use crate::plan::Plan;

/// What the refit of one projection achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refit {
    /// `vision/3 fc2` style label.
    pub layer: String,
    /// Rows kept and in total.
    pub rows: [usize; 2],
    /// Mean squared output error relative to the output's mean square,
    /// with the rows simply deleted.
    pub error_dropped: f64,
    /// The same after the refit.
    pub error_refit: f64,
}

/// One projection to refit.
struct Target<'a> {
    label: String,
    tower: TowerKind,
    linear: &'a Linear,
    bias: Option<&'a crate::arch::Bias>,
    kept: Vec<usize>,
    /// Rows a plan keeps or removes together (a key/value group's heads'
    /// rows for an attention output, one row for an MLP's).
    unit: usize,
}

fn targets<'a>(arch: &'a Architecture, plan: &Plan) -> Vec<Target<'a>> {
    let mut out = Vec::new();
    for action in &plan.blocks {
        let tower = action.tower;
        let Some(block): Option<&Block> =
            arch.tower(tower).and_then(|t| t.blocks.get(action.index))
        else {
            continue;
        };
        if let Some(heads) = &action.keep_heads {
            let a = &block.attention.body;
            let d = a.head_dim;
            out.push(Target {
                label: format!("{} out", action.label()),
                tower,
                linear: &a.out,
                bias: a.out.bias.as_ref().or(block.attention.join.bias.as_ref()),
                kept: heads.iter().flat_map(|h| h * d..(h + 1) * d).collect(),
                unit: a.group() * d,
            });
        }
        if let Some(neurons) = &action.keep_mlp {
            let m = &block.mlp.body;
            out.push(Target {
                label: format!("{} fc2", action.label()),
                tower,
                linear: &m.fc2,
                bias: m.fc2.bias.as_ref().or(block.mlp.join.bias.as_ref()),
                kept: neurons.clone(),
                unit: 1,
            });
        }
    }
    out
}

/// The residual branch of a sub-block as its join reads it: what a
/// removed sub-block no longer adds, and what bias compensation adds back
/// as its mean.
fn branch(join: &crate::arch::Join, graph_inputs: &[String]) -> Option<String> {
    graph_inputs
        .iter()
        .take(2)
        .find(|v| **v != join.stream_in)
        .cloned()
}

/// The branches a plan removes: (join node, branch value, tower), each
/// removed sub-block once; a pre-norm block drop removes both of its
/// branches (a post-norm one removes its norms too, so nothing is
/// compensated there).
fn removed_branches(
    original: &Graph,
    arch: &Architecture,
    plan: &Plan,
) -> Vec<(crate::ir::NodeId, String, TowerKind)> {
    let mut out = Vec::new();
    for action in &plan.blocks {
        let Some(block) = arch
            .tower(action.tower)
            .and_then(|t| t.blocks.get(action.index))
        else {
            continue;
        };
        let mut joins = Vec::new();
        if action.drop_attention || (action.drop && !block.norm_after_join) {
            joins.push(&block.attention.join);
        }
        if action.drop_mlp || (action.drop && !block.norm_after_join) {
            joins.push(&block.mlp.join);
        }
        for join in joins {
            if let Some(value) = branch(join, original.node(join.node).inputs()) {
                out.push((join.node, value, action.tower));
            }
        }
    }
    out
}

/// Value names, each with its tower.
pub type TowerValues = Vec<(String, TowerKind)>;

/// Every value a plan's repair could read statistics of: the inputs of
/// every block's attention output projection and `fc2` (second moments,
/// when `refits`) and every sub-block's residual branch (means, when
/// `compensates`), each with its tower. A measuring pass that gathers
/// these ([`Statistics::absorb`]) leaves the search's judge nothing to
/// gather.
pub fn every_tap(
    original: &Graph,
    arch: &Architecture,
    refits: bool,
    compensates: bool,
) -> (TowerValues, TowerValues) {
    let (mut grams, mut means) = (Vec::new(), Vec::new());
    for tower in &arch.towers {
        for block in &tower.blocks {
            if refits {
                for value in [&block.attention.body.out.input, &block.mlp.body.fc2.input] {
                    if !grams.iter().any(|(v, _)| v == value) {
                        grams.push((value.clone(), tower.kind));
                    }
                }
            }
            if compensates {
                for join in [&block.attention.join, &block.mlp.join] {
                    if let Some(value) = branch(join, original.node(join.node).inputs())
                        && !means.iter().any(|(v, _)| *v == value)
                    {
                        means.push((value, tower.kind));
                    }
                }
            }
        }
    }
    (grams, means)
}

/// What bias compensation adds in place of each removed branch: its mean
/// output (plus the bias a fused join adds to it), keyed by the join node.
pub fn compensation(
    original: &Graph,
    arch: &Architecture,
    plan: &Plan,
    statistics: &Statistics,
) -> super::Compensation {
    let mut out = super::Compensation::default();
    if !plan.repair.as_ref().is_some_and(|r| r.compensates()) {
        return out;
    }
    let biases: std::collections::HashMap<crate::ir::NodeId, Vec<f32>> = arch
        .towers
        .iter()
        .flat_map(|t| &t.blocks)
        .flat_map(|b| [&b.attention.join, &b.mlp.join])
        .filter_map(|j| Some((j.node, j.bias.as_ref()?.values(original)?.0)))
        .collect();
    for (join, value, _) in removed_branches(original, arch, plan) {
        let Some(mean) = statistics.means.get(&value) else {
            continue;
        };
        let mut shift: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        if let Some(bias) = biases.get(&join).filter(|b| b.len() == shift.len()) {
            for (s, b) in shift.iter_mut().zip(bias) {
                *s += b;
            }
        }
        out.insert(join, shift);
    }
    out
}

/// Second moments of the activations entering the projections that
/// plans may refit, keyed by the activation's value name, and the mean
/// outputs of the branches they remove.
///
/// Each statistic depends only on its tap and the samples read, so one set
/// grows across passes ([`Statistics::gather`]): the searches' judge and
/// the main job's final repair read the original model once per tap
/// instead of once per call.
#[derive(Debug, Clone, Default)]
pub struct Statistics {
    grams: std::collections::HashMap<String, Array2<f64>>,
    means: std::collections::HashMap<String, Vec<f64>>,
    /// Per projection (weight and input), the product G·W' and the output
    /// energy tr(W'ᵀGW'): the same for every candidate plan that refits
    /// it, so the search's candidates only take rows of it.
    products: Products,
    /// Calibration samples the statistics were computed over.
    samples: usize,
    /// The provider that ran.
    pub provider: Option<Provider>,
}

impl Statistics {
    /// Calibration samples these statistics were computed over (0 when
    /// none were gathered yet).
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Adds what `plans` need and these statistics lack, in one pass of the
    /// first `samples` rows of `inputs` through `original` (none when
    /// nothing is missing). Statistics of a different sample count are
    /// dropped first: they do not mix. The caller keeps `inputs` and `mask`
    /// the same across calls.
    #[allow(clippy::too_many_arguments)]
    pub fn gather(
        &mut self,
        original: &Model,
        arch: &Architecture,
        plans: &[&Plan],
        inputs: &Inputs,
        samples: usize,
        mask: Option<&str>,
        runtime: &RuntimeOptions,
    ) -> Result<(), RuntimeError> {
        if self.samples != samples {
            *self = Statistics {
                samples,
                ..Statistics::default()
            };
        }
        let Missing { taps, grams, means } = self.missing(original, arch, plans, mask);
        if taps.is_empty() {
            return Ok(());
        }
        let request = collect::Request {
            features: &[],
            pairs: &[],
            energies: &[],
            grams: &grams,
            means: &means,
            pooling: Pooling::Flatten,
            feature_budget: None,
        };
        let collected = collect::collect_all(original, inputs, samples, &taps, request, runtime)?;
        let name = |i: &usize| taps[*i].value.clone();
        let new: Vec<String> = grams.iter().map(name).collect();
        self.products.forget(&new);
        self.grams.extend(new.into_iter().zip(collected.grams));
        self.means
            .extend(means.iter().map(name).zip(collected.means));
        self.provider = Some(collected.provider);
        Ok(())
    }

    /// Takes over statistics another pass gathered over the same first
    /// `samples` samples (the measuring pass, [`every_tap`]): second
    /// moments and means keyed by value, as [`Statistics::gather`] would
    /// have computed them.
    pub fn absorb(
        &mut self,
        samples: usize,
        grams: Vec<(String, Array2<f64>)>,
        means: Vec<(String, Vec<f64>)>,
    ) {
        if self.samples != samples {
            *self = Statistics {
                samples,
                ..Statistics::default()
            };
        }
        let new: Vec<String> = grams.iter().map(|(v, _)| v.clone()).collect();
        self.products.forget(&new);
        self.grams.extend(grams);
        self.means.extend(means);
    }

    /// Whether `plans` need statistics over `samples` samples that these
    /// lack.
    pub fn lacks(
        &self,
        original: &Model,
        arch: &Architecture,
        plans: &[&Plan],
        samples: usize,
    ) -> bool {
        self.samples != samples || !self.missing(original, arch, plans, None).taps.is_empty()
    }

    /// The taps `plans` need that these statistics lack, and which of them
    /// feed a Gram and which a mean.
    fn missing(
        &self,
        original: &Model,
        arch: &Architecture,
        plans: &[&Plan],
        mask: Option<&str>,
    ) -> Missing {
        let view = crate::arch::View::new(&original.graph);
        let mut taps: Vec<Tap> = Vec::new();
        let mut grams = Vec::new();
        let mut means = Vec::new();
        let add = |value: &str, tower: TowerKind, taps: &mut Vec<Tap>| -> usize {
            if let Some(i) = taps.iter().position(|x| x.value == value) {
                return i;
            }
            taps.push(Tap {
                layout: crate::measure::layout(&view, value),
                value: value.to_string(),
                mask: (tower == TowerKind::Text)
                    .then(|| mask.map(str::to_string))
                    .flatten(),
            });
            taps.len() - 1
        };
        for plan in plans {
            let Some(repair) = &plan.repair else {
                continue;
            };
            if repair.refits() {
                for t in targets(arch, plan) {
                    if self.grams.contains_key(&t.linear.input) {
                        continue;
                    }
                    let i = add(&t.linear.input, t.tower, &mut taps);
                    if !grams.contains(&i) {
                        grams.push(i);
                    }
                }
            }
            if repair.compensates() {
                for (_, value, tower) in removed_branches(&original.graph, arch, plan) {
                    if self.means.contains_key(&value) {
                        continue;
                    }
                    let i = add(&value, tower, &mut taps);
                    if !means.contains(&i) {
                        means.push(i);
                    }
                }
            }
        }
        Missing { taps, grams, means }
    }
}

/// One projection's G·W', output energy tr(W'ᵀGW') and rank order, with
/// its Gram factored in that order once per ridge ([`Products`]).
#[derive(Debug)]
struct Product {
    g_full: Array2<f64>,
    energy: f64,
    /// The rows a fit can keep (the constant's first when there is a
    /// bias, then [`rank`]'s order): a plan's kept rows are almost always
    /// a leading run of it, because the allocation removes units by the
    /// same score.
    order: Vec<usize>,
    /// Each row's place in `order` (`usize::MAX` for rows outside it).
    place: Vec<usize>,
    /// The mean diagonal of G over `order`: the ridges' scale, the same
    /// for every plan (so that a plan keeping a leading run of `order`
    /// solves exactly the system the factor of the whole order holds).
    mean_diagonal: f64,
    /// Per ridge of [`RIDGES`], once a plan needed it: the factor of G in
    /// `order` and L⁻¹ applied to the rows of G·W' in `order`.
    levels: std::sync::Mutex<Vec<Option<std::sync::Arc<Level>>>>,
}

impl Product {
    /// G·W' and tr(W'ᵀGW') for `gram` (G) and `full` (W'), with `order`
    /// the rows a fit can keep, by rank.
    fn new(gram: &Array2<f64>, full: &Array2<f64>, order: Vec<usize>, threads: Threads) -> Self {
        let g_full = linalg::product(gram.view(), full.view(), threads);
        let energy = linalg::inner(full.view(), g_full.view());
        let mut place = vec![usize::MAX; full.nrows()];
        for (i, &r) in order.iter().enumerate() {
            place[r] = i;
        }
        let mean_diagonal =
            order.iter().map(|&r| gram[[r, r]]).sum::<f64>() / order.len().max(1) as f64;
        Self {
            g_full,
            energy,
            order,
            place,
            mean_diagonal,
            levels: std::sync::Mutex::new(vec![None; RIDGES.len()]),
        }
    }

    /// The Gram factored in `order` with `ridge` (the `level`th of
    /// [`RIDGES`]), made the first time. Made without holding the lock (the
    /// factorisation's products run on rayon, whose workers may pick up
    /// other fits meanwhile); two threads making the same level make the
    /// same numbers, and the first one stored is the one kept.
    fn level(
        &self,
        level: usize,
        ridge: f64,
        gram: &Array2<f64>,
        threads: Threads,
    ) -> std::sync::Arc<Level> {
        let stored = self.levels.lock().unwrap_or_else(|e| e.into_inner())[level].clone();
        if let Some(made) = stored {
            return made;
        }
        let order = &self.order;
        let a = Array2::from_shape_fn((order.len(), order.len()), |(i, j)| {
            gram[[order[i], order[j]]]
        });
        let factor = linalg::Cholesky::new(a, ridge, threads);
        let mut forward = self.g_full.select(Axis(0), &order[..factor.pivots()]);
        factor.forward(forward.view_mut(), threads);
        let mut levels = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        levels[level]
            .get_or_insert_with(|| std::sync::Arc::new(Level { factor, forward }))
            .clone()
    }
}

/// G + λI factored in a projection's rank order, and L⁻¹ (G·W') over the
/// factor's pivots ([`Product::levels`]).
#[derive(Debug)]
struct Level {
    factor: linalg::Cholesky,
    forward: Array2<f64>,
}

/// Relative ridges tried in turn ([`least_squares`]).
const RIDGES: [f64; 3] = [1e-6, 1e-4, 1e-2];

/// Projections with at most this many rows a fit can keep share one factor
/// across plans (CLIP ViT-B/32's widest, 3,073, does): the factor's lower
/// half and L⁻¹·G·W' then take ½ + outputs/rows of the projection's Gram,
/// which the statistics hold anyway (at most 1.5× where, as in MLP and
/// attention outputs, a projection has no more outputs than inputs). A wider one (a 7B decoder's 11,009-row MLP
/// output would keep about 0.8 GB per layer) factors each plan's kept
/// block alone, as every plan outside the rank order does.
const SHARED_FACTOR_ROWS: usize = 4097;

/// G·W', output energy and factors of projections, computed once per run
/// ([`Statistics`]): a dozen candidate plans refit the same projections
/// with different kept rows. Each refit's right-hand side is rows of the
/// product, and kept rows that lead the projection's rank order solve
/// with the leading block of one factor of the whole order (the
/// factorisation and the forward substitution were most of a refit's
/// work when made per candidate).
#[derive(Debug, Default)]
struct Products(std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Product>>>);

impl Clone for Products {
    fn clone(&self) -> Self {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Self(std::sync::Mutex::new(map))
    }
}

impl Products {
    /// Drops the products made from the Grams of `inputs` (replaced by new
    /// ones), so no refit reads a product of an old Gram.
    fn forget(&self, inputs: &[String]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| {
                key.split_once('\u{0}')
                    .is_none_or(|(_, input)| !inputs.iter().any(|i| i == input))
            });
    }

    /// The product under `key` of `target`'s projection, computed from
    /// `gram` and `full` the first time.
    fn get_or(
        &self,
        key: &str,
        target: &Target<'_>,
        gram: &Array2<f64>,
        full: &Array2<f64>,
        threads: Threads,
    ) -> std::sync::Arc<Product> {
        if let Some(p) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            return p.clone();
        }
        let rows = target.linear.in_features;
        let mut order = Vec::with_capacity(rows + 1);
        if target.bias.is_some() {
            order.push(rows);
        }
        order.extend(rank(gram, full, rows, target.unit));
        let product = std::sync::Arc::new(Product::new(gram, full, order, threads));
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), product.clone());
        product
    }
}

/// The input rows of a projection in the order a plan keeps them: units
/// of `unit` rows by (Σ second moment)·(Σ squared weight) over their
/// rows, largest first (the allocation's activation-aware score, squared
/// and without the layer's ID), ties to the higher index (the allocation
/// removes the lower one first); a unit's rows in order.
fn rank(gram: &Array2<f64>, full: &Array2<f64>, rows: usize, unit: usize) -> Vec<usize> {
    let unit = unit.clamp(1, rows.max(1));
    let units = rows / unit;
    let energies: Vec<f64> = (0..units)
        .map(|u| {
            let span = u * unit..(u + 1) * unit;
            let moment: f64 = span.clone().map(|r| gram[[r, r]]).sum();
            let weight: f64 = span
                .map(|r| full.row(r).iter().map(|w| w * w).sum::<f64>())
                .sum();
            moment * weight
        })
        .collect();
    let mut order: Vec<usize> = (0..units).collect();
    order.sort_by(|&a, &b| energies[b].total_cmp(&energies[a]).then(b.cmp(&a)));
    let mut in_order: Vec<usize> = order
        .into_iter()
        .flat_map(|u| u * unit..(u + 1) * unit)
        .collect();
    // Rows past the last whole unit (none in a well-formed layer).
    in_order.extend(units * unit..rows);
    in_order
}

/// Taps a set of statistics lacks ([`Statistics::missing`]): indices into
/// `taps` of those feeding Grams and means.
struct Missing {
    taps: Vec<Tap>,
    grams: Vec<usize>,
    means: Vec<usize>,
}

/// Refits, in `pruned` (`original` rewritten by `plan`), every projection
/// after a slimmed sub-block, from `statistics` of `original`.
pub fn apply(
    original: &Model,
    pruned: &mut Model,
    arch: &Architecture,
    plan: &Plan,
    statistics: &Statistics,
) -> Result<Vec<Refit>, RewriteError> {
    let mut refits = Vec::new();
    if !plan.repair.as_ref().is_some_and(|r| r.refits()) {
        return Ok(refits);
    }
    let targets = targets(arch, plan);
    let grams = targets
        .iter()
        .map(|target| {
            statistics
                .grams
                .get(&target.linear.input)
                .ok_or_else(|| RewriteError::Unsupported {
                    label: format!("repair {}", target.label),
                    reason: "no calibration statistics for this layer".into(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The fits are independent: one per thread, each on one thread (whole
    // layers keep both cores busier than the small products inside one
    // factorisation, and a product sums every element in the same order on
    // any number of threads, so the weights do not change). Fewer fits
    // than threads take turns with every thread each.
    let threads = if targets.len() >= rayon::current_num_threads() {
        Threads::One
    } else {
        Threads::All
    };
    let fit = |(target, gram): (&Target<'_>, &&Array2<f64>)| {
        solve(&original.graph, target, gram, &statistics.products, threads)
    };
    let fits: Vec<Result<Solved, RewriteError>> = match threads {
        Threads::One => targets.par_iter().zip(&grams).map(fit).collect(),
        Threads::All => targets.iter().zip(&grams).map(fit).collect(),
    };
    // The first failure in target order, whichever thread met it first.
    let solved: Vec<Solved> = fits.into_iter().collect::<Result<_, _>>()?;
    for (target, (refit, solution)) in targets.iter().zip(solved) {
        if let Some(solution) = solution {
            write(&original.graph, &mut pruned.graph, target, &solution)?;
        }
        refits.push(refit);
    }
    // The sliced weights the refits replaced are dead now.
    pruned.graph.eliminate_dead_code();
    Ok(refits)
}

/// The refit of one projection: its record, and the new weights with the
/// bias row last, or none when the plain slice stays.
type Solved = (Refit, Option<Array2<f64>>);

/// The refit of one projection ([`Solved`]).
fn solve(
    original: &Graph,
    target: &Target<'_>,
    gram: &Array2<f64>,
    products: &Products,
    threads: Threads,
) -> Result<Solved, RewriteError> {
    let label = format!("repair {}", target.label);
    let unsupported = |reason: String| RewriteError::Unsupported {
        label: label.clone(),
        reason,
    };
    let linear = target.linear;
    let (rows, cols) = (linear.in_features, linear.out_features);
    if gram.nrows() != rows + 1 {
        return Err(unsupported(format!(
            "activations are {} wide, the layer reads {rows}",
            gram.nrows().saturating_sub(1)
        )));
    }
    // W' = [W; b] as (rows + 1) × cols, in f64.
    let weight = linear.matrix(original).ok_or_else(|| {
        unsupported(format!(
            "weight '{}' cannot be read as numbers",
            linear.weight.storage
        ))
    })?;
    let mut full = Array2::<f64>::zeros((rows + 1, cols));
    for (mut row, w) in full
        .outer_iter_mut()
        .zip(weight[..rows * cols].chunks_exact(cols))
    {
        row.iter_mut().zip(w).for_each(|(f, &w)| *f = w as f64);
    }
    if let Some(bias) = target.bias {
        let values = bias
            .values(original)
            .map(|(v, _)| v)
            .ok_or_else(|| unsupported(format!("bias '{}' cannot be read", bias.storage)))?;
        if values.len() != cols {
            return Err(unsupported(format!(
                "bias '{}' has {} values for {cols} outputs",
                bias.storage,
                values.len()
            )));
        }
        for (o, v) in values.iter().enumerate() {
            full[[rows, o]] = *v as f64;
        }
    }
    // K: kept rows, plus the constant when a bias can absorb the rest.
    let mut k: Vec<usize> = target.kept.clone();
    if target.bias.is_some() {
        k.push(rows);
    }
    // The weights are the original's, the Gram its input's: one product
    // per pair, whichever plan refits it.
    let key = format!("{}\u{0}{}", linear.weight.storage, linear.input);
    let product = products.get_or(&key, target, gram, &full, threads);
    // K leads the rank order when every row of it has a place below |K|
    // (the rows are distinct): almost every plan the allocation makes.
    let leads = k.iter().all(|&r| product.place[r] < k.len());
    let solver = if leads && product.order.len() <= SHARED_FACTOR_ROWS {
        Solver::Leading { product: &product }
    } else {
        Solver::Direct {
            mean_diagonal: product.mean_diagonal,
        }
    };
    let fitted = least_squares(
        gram,
        &full,
        &k,
        &product.g_full,
        product.energy,
        solver,
        threads,
    );
    let error_dropped = fitted.error_dropped;
    let record = |error_refit| Refit {
        layer: target.label.clone(),
        rows: [target.kept.len(), rows],
        error_dropped,
        error_refit,
    };
    let (Some(solution), Some(error_refit)) = (fitted.solution, fitted.error_refit) else {
        return Ok((record(error_dropped), None));
    };
    // Never make things worse (numerical trouble): keep the plain slice.
    if !(error_refit.is_finite() && error_refit <= error_dropped) {
        return Ok((record(error_dropped), None));
    }
    Ok((record(error_refit), Some(solution)))
}

/// Writes the refit `solution` of `target` (from [`solve`]) into `graph`.
fn write(
    original: &Graph,
    graph: &mut Graph,
    target: &Target<'_>,
    solution: &Array2<f64>,
) -> Result<(), RewriteError> {
    let label = format!("repair {}", target.label);
    let unsupported = |reason: String| RewriteError::Unsupported {
        label: label.clone(),
        reason,
    };
    let linear = target.linear;
    let cols = linear.out_features;
    let kept = target.kept.len();
    // Written as the node reads it: [kept, out], or [out, kept] for a Gemm
    // with transB.
    let out_in = linear.read_axis(graph, true) == 0;
    let mut values = vec![0f32; kept * cols];
    for r in 0..kept {
        for o in 0..cols {
            let at = if out_in { o * kept + r } else { r * cols + o };
            values[at] = solution[[r, o]] as f32;
        }
    }
    let dims = if out_in {
        vec![cols as i64, kept as i64]
    } else {
        vec![kept as i64, cols as i64]
    };
    let new = super::NewValues {
        dims,
        values: &values,
        scales: super::Scales::Fit,
    };
    // The projection itself is kept (only its input rows were sliced).
    super::replace_values(graph, linear.matmul, 1, "refit", new, &label)?;
    if let Some(bias) = target.bias {
        let bias_values: Vec<f32> = (0..cols).map(|o| solution[[kept, o]] as f32).collect();
        let (reader, slot) = locate(original, graph, bias.reader, bias.slot).ok_or_else(|| {
            unsupported(format!(
                "the rewritten graph no longer reads the bias '{}'",
                bias.storage
            ))
        })?;
        let dims = crate::arch::view::operand_at(graph, reader, slot)
            .and_then(|b| b.read_dims(graph))
            .map(|d| d.iter().map(|&x| x as i64).collect())
            .unwrap_or_else(|| vec![cols as i64]);
        let new = super::NewValues {
            dims,
            values: &bias_values,
            scales: super::Scales::Fit,
        };
        super::replace_values(graph, reader, slot, "refit", new, &label)?;
    }
    Ok(())
}

/// The least-squares fit of one projection ([`least_squares`]).
struct Fitted {
    /// X_K, one row per index of K; `None` when no ridge made G_KK + λI
    /// positive definite.
    solution: Option<Array2<f64>>,
    /// tr(ΔᵀGΔ) / tr(W'ᵀGW') of the plain slice (Δ = W' outside K).
    error_dropped: f64,
    /// The same for the refit (Δ = W' − X on K, W' outside).
    error_refit: Option<f64>,
}

/// How a fit's normal equations are solved ([`least_squares`]).
#[derive(Clone, Copy)]
enum Solver<'a> {
    /// Factor G_KK + λI itself, λ relative to `mean_diagonal`.
    Direct { mean_diagonal: f64 },
    /// K is a leading run of `product`'s order: its factors' leading
    /// block (the same system; the factor is made once for every plan).
    Leading { product: &'a Product },
}

/// Fits the rows K of `full` (W' = [W; b]) to reproduce `full`'s output
/// under the second moment `gram` (G): (G_KK + λI) X = (G W')_K, given
/// `g_full` = G·W' and `total` = tr(W'ᵀGW').
fn least_squares(
    gram: &Array2<f64>,
    full: &Array2<f64>,
    k: &[usize],
    g_full: &Array2<f64>,
    total: f64,
    solver: Solver<'_>,
    threads: Threads,
) -> Fitted {
    let rows = full.nrows();
    // R: the rows outside K (the removed ones, and the constant's when
    // there is no bias; W' is zero there).
    let mut in_k = vec![false; rows];
    k.iter().for_each(|&i| in_k[i] = true);
    let removed: Vec<usize> = (0..rows).filter(|&i| !in_k[i]).collect();
    // Nothing the input carried was removed (a plan file can keep every
    // row): there is nothing to refit, and the closed-form error below
    // could round a refit that only shrinks the weights to "no worse".
    let slimmed = removed.iter().any(|&i| i + 1 < rows);
    // The right-hand side (G W')_K: rows of the product every candidate
    // plan shares.
    let rhs = g_full.select(Axis(0), k);
    let g_kk = || Array2::from_shape_fn((k.len(), k.len()), |(i, j)| gram[[k[i], k[j]]]);
    // A small ridge for rank-deficient activations (dead neurons, tokens
    // that repeat), larger when rounding in the accumulated moments still
    // leaves a negative pivot; no solution at all keeps the plain slice.
    // Its scale is the projection's, not K's: every plan that keeps a
    // leading run of the rank order then solves the very system its
    // shared factor holds.
    let mean_diagonal = match solver {
        Solver::Direct { mean_diagonal } => mean_diagonal,
        Solver::Leading { product } => product.mean_diagonal,
    };
    let levels = if slimmed { RIDGES.len() } else { 0 };
    let solution = (0..levels).find_map(|level| {
        let ridge = (RIDGES[level] * mean_diagonal).max(1e-12);
        match solver {
            Solver::Direct { .. } => {
                linalg::solve_spd(g_kk(), rhs.clone(), ridge, threads).map(|x| (x, ridge))
            }
            Solver::Leading { product } => {
                let made = product.level(level, ridge, gram, threads);
                if made.factor.pivots() < k.len() {
                    return None;
                }
                let mut y = made.forward.slice(s![..k.len(), ..]).to_owned();
                made.factor.backward(y.view_mut(), threads);
                // Rows come in the order's sequence; X's are K's.
                let x = Array2::from_shape_fn(rhs.dim(), |(i, o)| y[[product.place[k[i]], o]]);
                Some((x, ridge))
            }
        }
    });
    // Relative output errors, tr(Δᵀ G Δ) / tr(W'ᵀ G W'). Rounding can take
    // a near-zero error just below zero; NaN (a Gram with NaN) stays NaN.
    let non_negative = |e: f64| if e < 0.0 { 0.0 } else { e };
    // (`max` would turn a NaN total into the smallest positive number.)
    let scale = if total.is_nan() {
        f64::NAN
    } else {
        total.max(f64::MIN_POSITIVE)
    };
    // The plain slice leaves Δ = W' on the rows outside K, zero on K:
    // tr(W_Rᵀ G_RR W_R), from whichever side is smaller. With more rows
    // removed than kept, expanding tr(W'ᵀGW') over K and R gives
    // tr(W'ᵀGW') − 2⟨W_K, (GW')_K⟩ + tr(W_Kᵀ G_KK W_K) (a product over K).
    let quadratic = |w: &Array2<f64>, g: &Array2<f64>| {
        linalg::inner(
            w.view(),
            linalg::product(g.view(), w.view(), threads).view(),
        )
    };
    let dropped = if removed.len() <= k.len() {
        let g_removed = Array2::from_shape_fn((removed.len(), removed.len()), |(i, j)| {
            gram[[removed[i], removed[j]]]
        });
        quadratic(&full.select(Axis(0), &removed), &g_removed)
    } else {
        let w_k = full.select(Axis(0), k);
        total - 2.0 * linalg::inner(w_k.view(), rhs.view()) + quadratic(&w_k, &g_kk())
    };
    let error_dropped = non_negative(dropped / scale);
    let Some((solution, ridge)) = solution else {
        return Fitted {
            solution: None,
            error_dropped,
            error_refit: None,
        };
    };
    // The refit's from its normal equations (G_KK + λI) X = (GW')_K:
    // tr(ΔᵀGΔ) = tr(W'ᵀGW') − 2⟨X, (GW')_K⟩ + ⟨X, G_KK X⟩
    //          = tr(W'ᵀGW') − ⟨X, (GW')_K⟩ − λ‖X‖²,
    // exact up to the solve's rounding (Cholesky is backward stable and
    // the ridge bounds the condition number), without another product.
    let error_refit = non_negative(
        (total
            - linalg::inner(solution.view(), rhs.view())
            - ridge * linalg::inner(solution.view(), solution.view()))
            / scale,
    );
    Fitted {
        solution: Some(solution),
        error_dropped,
        error_refit: Some(error_refit),
    }
}

/// Where the rewritten `graph` reads the (unsliced) constant that input
/// `slot` of node `reader` read in `original`. Node ids are the
/// original's, but the passes before repair may have replaced the reader
/// (a fused join whose norm nobody reads becomes plain `Add`s, the bias
/// moving to one of them), and a removed node's id can be handed to a new
/// node: the value name is what identifies the operand.
fn locate(
    original: &Graph,
    graph: &Graph,
    reader: crate::ir::NodeId,
    slot: usize,
) -> Option<(crate::ir::NodeId, usize)> {
    let value = original.get_node(reader)?.inputs().get(slot)?;
    let still_reads = graph
        .get_node(reader)
        .is_some_and(|n| n.inputs().get(slot) == Some(value));
    if still_reads {
        return Some((reader, slot));
    }
    // Only an unambiguous new reader: a bias shared with other layers
    // (deduplicated initializers) could otherwise be refitted for the
    // wrong one.
    match graph.uses(value).as_slice() {
        [only] => match only.slot {
            crate::ir::Slot::Input(slot) => Some((only.node, slot)),
            crate::ir::Slot::Implicit => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`least_squares`] with G·W' and tr(W'ᵀGW') made for this one fit.
    fn fit_alone(gram: &Array2<f64>, full: &Array2<f64>, k: &[usize]) -> Fitted {
        let g_full = gram.dot(full);
        let total = (full * &g_full).sum();
        let mean_diagonal = gram.diag().mean().unwrap_or(0.0);
        let solver = Solver::Direct { mean_diagonal };
        least_squares(gram, full, k, &g_full, total, solver, Threads::All)
    }

    /// tr(ΔᵀGΔ) / tr(W'ᵀGW') computed directly, with Δ = W' − X̃.
    fn direct_error(gram: &Array2<f64>, full: &Array2<f64>, k: &[usize], x: &Array2<f64>) -> f64 {
        let mut delta = full.clone();
        for (r, &i) in k.iter().enumerate() {
            let fitted = &delta.row(i) - &x.row(r);
            delta.row_mut(i).assign(&fitted);
        }
        let quadratic = |d: &Array2<f64>| (d * &gram.dot(d)).sum();
        quadratic(&delta) / quadratic(full)
    }

    #[test]
    fn the_closed_form_errors_equal_the_direct_ones() {
        // Activations of 300 tokens, 40 wide plus the constant, correlated
        // so that the kept rows can take over part of the removed ones.
        let (tokens, width, outputs) = (300, 40, 9);
        let a = Array2::from_shape_fn((tokens, width + 1), |(t, i)| {
            if i == width {
                1.0
            } else {
                ((t * 31 + i * 17) % 97) as f64 / 97.0 + 0.3 * ((t * 7 + (i / 3) * 5) % 13) as f64
            }
        });
        let gram = a.t().dot(&a) / tokens as f64;
        let full = Array2::from_shape_fn((width + 1, outputs), |(i, o)| {
            ((i * 13 + o * 7) % 19) as f64 / 19.0 - 0.5
        });
        // Every other row kept, and the bias; then every fourth (more rows
        // removed than kept: the dropped error comes from the kept side).
        for step in [2, 4] {
            let k: Vec<usize> = (0..width).step_by(step).chain([width]).collect();
            let fitted = fit_alone(&gram, &full, &k);
            let x = fitted.solution.expect("the system is positive definite");
            let dropped = full.select(Axis(0), &k);
            let expect_dropped = direct_error(&gram, &full, &k, &dropped);
            let expect_refit = direct_error(&gram, &full, &k, &x);
            assert!(
                (fitted.error_dropped - expect_dropped).abs() < 1e-11 * expect_dropped.max(1.0)
            );
            let refit = fitted.error_refit.unwrap();
            assert!(
                (refit - expect_refit).abs() < 1e-9,
                "{refit} vs {expect_refit}"
            );
            assert!(
                refit < expect_dropped,
                "the refit helps: {refit} vs {expect_dropped}"
            );
            // X solves the normal equations (up to the small ridge).
            let g_kk = gram.select(Axis(0), &k).select(Axis(1), &k);
            let rhs = gram.select(Axis(0), &k).dot(&full);
            let residual = (g_kk.dot(&x) - &rhs)
                .mapv(f64::abs)
                .fold(0.0, |m: f64, &v| m.max(v));
            assert!(residual < 1e-4, "normal-equation residual {residual}");
        }
    }

    /// Correlated activations of `width` channels and the constant, and
    /// weights for `outputs` outputs with a bias row.
    fn layer(width: usize, outputs: usize) -> (Array2<f64>, Array2<f64>) {
        let tokens = 400;
        let a = Array2::from_shape_fn((tokens, width + 1), |(t, i)| {
            if i == width {
                1.0
            } else {
                ((t * 31 + i * 17) % 97) as f64 / 97.0 * (1.0 + (i % 5) as f64)
                    + 0.3 * ((t * 7 + (i / 3) * 5) % 13) as f64
            }
        });
        let gram = a.t().dot(&a) / tokens as f64;
        let full = Array2::from_shape_fn((width + 1, outputs), |(i, o)| {
            ((i * 13 + o * 7) % 19) as f64 / 19.0 - 0.5
        });
        (gram, full)
    }

    #[test]
    fn plans_keeping_leading_rows_of_the_rank_share_one_factor() {
        let (width, outputs) = (300, 7);
        let (gram, full) = layer(width, outputs);
        let mut order = vec![width];
        order.extend(rank(&gram, &full, width, 1));
        let product = Product::new(&gram, &full, order.clone(), Threads::All);
        let direct = Solver::Direct {
            mean_diagonal: product.mean_diagonal,
        };
        // Across the factorisation's 128-wide blocks, down to one row.
        let mut first = None;
        for rows in [1, 2, 127, 128, 129, 200, 299] {
            let mut k: Vec<usize> = order[1..=rows].to_vec();
            k.sort_unstable();
            k.push(width);
            let leading = Solver::Leading { product: &product };
            let (g_full, total) = (&product.g_full, product.energy);
            let shared = least_squares(&gram, &full, &k, g_full, total, leading, Threads::All);
            let alone = least_squares(&gram, &full, &k, g_full, total, direct, Threads::One);
            let (x, y) = (shared.solution.unwrap(), alone.solution.unwrap());
            let scale = y.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let gap = (&x - &y).iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(gap <= 1e-6 * scale, "{rows} rows: {gap} apart");
            let (a, b) = (shared.error_refit.unwrap(), alone.error_refit.unwrap());
            assert!((a - b).abs() <= 1e-9, "{rows} rows: {a} vs {b}");
            assert_eq!(shared.error_dropped, alone.error_dropped);
            // One factor made for all of them, at the first ridge.
            let levels = product.levels.lock().unwrap();
            let made = levels[0].clone().expect("the first ridge's factor");
            assert!(levels[1..].iter().all(Option::is_none), "no ridge retried");
            let first = first.get_or_insert_with(|| made.clone());
            assert!(std::sync::Arc::ptr_eq(first, &made), "made again");
        }
    }

    #[test]
    fn the_rank_orders_units_by_moment_times_weight() {
        // Four units of two rows: unit 2 carries the most, unit 0 and
        // unit 3 tie (the higher index ranks first), unit 1 the least.
        let diagonal = [1.0, 1.0, 0.5, 0.5, 3.0, 3.0, 1.0, 1.0, 1.0];
        let gram = Array2::from_diag(&ndarray::arr1(&diagonal));
        let full = Array2::from_shape_fn((9, 2), |(r, _)| if r == 8 { 5.0 } else { 1.0 });
        assert_eq!(rank(&gram, &full, 8, 2), vec![4, 5, 6, 7, 0, 1, 2, 3]);
        assert_eq!(rank(&gram, &full, 8, 1), vec![5, 4, 7, 6, 1, 0, 3, 2]);
    }

    #[test]
    fn keeping_every_row_refits_nothing() {
        // With a bias (the constant's row in K) and without one (its row of
        // W' is zero then and outside K): no input row removed, no refit.
        let a = Array2::from_shape_fn((50, 4), |(t, i)| {
            if i == 3 {
                1.0
            } else {
                ((t * 5 + i * 3) % 7) as f64
            }
        });
        let gram = a.t().dot(&a) / 50.0;
        let mut full = Array2::from_shape_fn((4, 2), |(i, o)| (i + o) as f64 - 1.5);
        let with_bias = fit_alone(&gram, &full, &[0, 1, 2, 3]);
        full.row_mut(3).fill(0.0);
        let without_bias = fit_alone(&gram, &full, &[0, 1, 2]);
        for fitted in [with_bias, without_bias] {
            assert!(fitted.solution.is_none());
            assert!(fitted.error_refit.is_none());
            assert_eq!(fitted.error_dropped, 0.0);
        }
    }

    #[test]
    fn a_gram_with_nan_gives_no_fit_and_a_nan_error() {
        let mut gram = Array2::<f64>::eye(5);
        gram[[1, 1]] = f64::NAN;
        let full = Array2::<f64>::ones((5, 2));
        let fitted = fit_alone(&gram, &full, &[0, 1, 4]);
        assert!(fitted.solution.is_none());
        assert!(fitted.error_dropped.is_nan(), "{}", fitted.error_dropped);
        assert!(fitted.error_refit.is_none());
    }
}
