//! Intrinsic dimension: TwoNN (two variants) and the Levina–Bickel MLE.
//!
//! TwoNN (Facco et al., 2017): with r1, r2 the distances of a point to its
//! first and second neighbour, μ = r2/r1 follows F(μ) = 1 - μ^(-d), so
//! -log(1 - F(μ)) = d·log μ. With μ sorted ascending and F_emp(i) = i/N, d
//! is the least-squares slope through the origin, Σxy / Σx², over
//! x = log μ_i, y = -log(1 - i/N).
//!
//! - `facco` fits the smallest 90% of μ (the common library convention;
//!   equal to scikit-dimension's `TwoNN()` on duplicate-free data).
//! - `paper` (the ID-pruning paper's code) fits all μ but the two largest,
//!   and averages a block analysis: for b = 1..=20 the points are shuffled
//!   (seeded) into b disjoint blocks of ⌊N/b⌋, each block is estimated on its
//!   own, the b estimates are averaged, and the result is the mean over b.
//!
//! Exact duplicate points are removed first and counted (identical captions
//! are common; with them r1 = 0 and the estimate collapses). Points with
//! r1 = r2 carry no information (log μ = 0) and are dropped.
//!
//! MLE (Levina & Bickel, 2004): per point,
//! m(x) = [ 1/(k-1) · Σ_{j<k} log(T_k(x) / T_j(x)) ]^(-1) with T_j the
//! distance to the j-th neighbour; the estimate is the mean of m(x).

pub mod knn;

use std::collections::HashMap;

use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;
use serde::Serialize;

/// Which estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// Two nearest neighbours.
    Twonn,
    /// Levina–Bickel maximum likelihood with k neighbours.
    Mle,
}

/// Which TwoNN variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Fit the smallest 90% of μ.
    Facco,
    /// All μ but the last two, averaged over a 20-level block analysis.
    Paper,
}

impl std::str::FromStr for Estimator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "twonn" => Ok(Estimator::Twonn),
            "mle" => Ok(Estimator::Mle),
            other => Err(format!(
                "unknown estimator '{other}' (expected twonn or mle)"
            )),
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "facco" => Ok(Variant::Facco),
            "paper" => Ok(Variant::Paper),
            other => Err(format!(
                "unknown variant '{other}' (expected facco or paper)"
            )),
        }
    }
}

/// Estimation settings.
#[derive(Debug, Clone, Copy)]
pub struct IdOptions {
    /// The estimator.
    pub estimator: Estimator,
    /// TwoNN variant.
    pub variant: Variant,
    /// Neighbours for MLE.
    pub k: usize,
    /// Seed of the block analysis.
    pub seed: u64,
}

impl Default for IdOptions {
    fn default() -> Self {
        Self {
            estimator: Estimator::Twonn,
            variant: Variant::Facco,
            k: 20,
            seed: 0,
        }
    }
}

/// An estimate and what it was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IdEstimate {
    /// The estimator.
    pub estimator: Estimator,
    /// TwoNN variant (reported for MLE too, where it has no effect).
    pub variant: Variant,
    /// Samples given.
    pub n: usize,
    /// Features per sample.
    pub dim: usize,
    /// Exact duplicate samples removed before estimating.
    pub duplicates_removed: usize,
    /// The intrinsic dimension.
    pub id: f64,
}

/// Why no estimate could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Too few distinct points.
    #[error(
        "too few distinct samples for an estimate ({distinct} after removing {duplicates} duplicates; need at least {need})"
    )]
    TooFew {
        /// Distinct samples.
        distinct: usize,
        /// Duplicates removed.
        duplicates: usize,
        /// Minimum.
        need: usize,
    },
    /// NaN or infinite features.
    #[error("the data contain NaN or infinite values (sample {row})")]
    NonFinite {
        /// First offending sample.
        row: usize,
    },
    /// More samples than the exact method handles in memory.
    #[error("{n} samples need a {n}×{n} distance matrix ({gib:.1} GiB); use at most 20000 samples")]
    TooMany {
        /// Samples.
        n: usize,
        /// Memory needed.
        gib: f64,
    },
}

/// Largest sample count (the N×N f32 distance matrix is 1.6 GB at 20000).
const MAX_SAMPLES: usize = 20_000;

/// Estimates the intrinsic dimension of `data` (rows = samples).
pub fn estimate(data: ArrayView2<'_, f32>, options: &IdOptions) -> Result<IdEstimate, IdError> {
    let (n, dim) = data.dim();
    // In parallel: on a freshly mapped file this pass is also the one that
    // reads it from disk.
    if let Some(row) = data
        .axis_iter(Axis(0))
        .into_par_iter()
        .position_first(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(IdError::NonFinite { row });
    }
    if n > MAX_SAMPLES && !knn::uses_tree(n, dim) {
        return Err(IdError::TooMany {
            n,
            gib: (n * n * 4) as f64 / (1u64 << 30) as f64,
        });
    }
    let (deduped, duplicates) = dedupe(data);
    let unique = deduped.as_ref().map_or(data, |d| d.view());
    let need = match options.estimator {
        Estimator::Twonn => 4,
        Estimator::Mle => options.k + 1,
    };
    if unique.nrows() < need {
        return Err(IdError::TooFew {
            distinct: unique.nrows(),
            duplicates,
            need,
        });
    }
    let search = knn::Search::new(unique);
    let all: Vec<usize> = (0..unique.nrows()).collect();
    let id = match (options.estimator, options.variant) {
        (Estimator::Mle, _) => mle(&search.neighbours(unique, &all, options.k)),
        (Estimator::Twonn, Variant::Facco) => twonn_fit(
            ratios(&search.neighbours(unique, &all, 2)),
            Discard::Fraction(0.1),
        ),
        (Estimator::Twonn, Variant::Paper) => {
            let mut per_level = Vec::with_capacity(20);
            for blocks in 1..=20usize {
                let size = all.len() / blocks;
                if size < 4 {
                    break;
                }
                let mut order = all.clone();
                shuffle(
                    &mut order,
                    options.seed ^ (blocks as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                let estimates: Vec<f64> = order
                    .chunks_exact(size)
                    .map(|block| {
                        twonn_fit(
                            ratios(&search.neighbours(unique, block, 2)),
                            Discard::LastTwo,
                        )
                    })
                    .collect();
                per_level.push(estimates.iter().sum::<f64>() / estimates.len() as f64);
            }
            per_level.iter().sum::<f64>() / per_level.len() as f64
        }
    };
    Ok(IdEstimate {
        estimator: options.estimator,
        variant: options.variant,
        n,
        dim,
        duplicates_removed: duplicates,
        id,
    })
}

/// Removes exact duplicate rows (bitwise, with -0.0 == 0.0), keeping the
/// first of each; returns the rows left (`None`: no duplicates, use the
/// input) and how many were removed.
pub fn dedupe(data: ArrayView2<'_, f32>) -> (Option<Array2<f32>>, usize) {
    let bits = |v: f32| if v == 0.0 { 0 } else { v.to_bits() };
    // Hash rows without copying them; compare rows only on equal hashes.
    let hashes: Vec<u64> = data
        .axis_iter(Axis(0))
        .into_par_iter()
        .map(|row| {
            row.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &v| {
                (h ^ bits(v) as u64).wrapping_mul(0x0000_0100_0000_01b3)
            })
        })
        .collect();
    let mut first: HashMap<u64, Vec<usize>> = HashMap::with_capacity(data.nrows());
    let mut keep = Vec::with_capacity(data.nrows());
    for (i, &h) in hashes.iter().enumerate() {
        let same = |j: &usize| {
            data.row(*j)
                .iter()
                .zip(data.row(i).iter())
                .all(|(a, b)| bits(*a) == bits(*b))
        };
        let bucket = first.entry(h).or_default();
        if !bucket.iter().any(same) {
            bucket.push(i);
            keep.push(i);
        }
    }
    let removed = data.nrows() - keep.len();
    if removed == 0 {
        (None, 0)
    } else {
        (Some(data.select(Axis(0), &keep)), removed)
    }
}

/// μ = r2/r1 of every point with r1 < r2.
fn ratios(neighbours: &[Vec<f64>]) -> Vec<f64> {
    neighbours
        .iter()
        .filter(|d| d.len() == 2 && d[0] > 0.0 && d[1] > d[0])
        .map(|d| d[1] / d[0])
        .collect()
}

enum Discard {
    Fraction(f64),
    LastTwo,
}

/// The TwoNN slope for μ values.
fn twonn_fit(mut mu: Vec<f64>, discard: Discard) -> f64 {
    mu.sort_by(f64::total_cmp);
    let n = mu.len();
    let keep = match discard {
        Discard::Fraction(f) => (n as f64 * (1.0 - f)) as usize,
        Discard::LastTwo => n.saturating_sub(2),
    };
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, m) in mu.iter().take(keep).enumerate() {
        let x = m.ln();
        let y = -(1.0 - (i + 1) as f64 / n as f64).ln();
        sxy += x * y;
        sxx += x * x;
    }
    if sxx > 0.0 { sxy / sxx } else { f64::NAN }
}

/// Levina–Bickel: mean over points of the inverse mean log-ratio.
fn mle(neighbours: &[Vec<f64>]) -> f64 {
    let per_point: Vec<f64> = neighbours
        .iter()
        .filter_map(|d| {
            let k = d.len();
            let tk = *d.last()?;
            if k < 2 || d[0] <= 0.0 {
                return None;
            }
            let s: f64 = d[..k - 1].iter().map(|t| (tk / t).ln()).sum();
            (s > 0.0).then(|| (k - 1) as f64 / s)
        })
        .collect();
    per_point.iter().sum::<f64>() / per_point.len().max(1) as f64
}

/// Fisher–Yates with SplitMix64: deterministic for a seed.
fn shuffle(items: &mut [usize], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points on a d-dimensional linear subspace embedded in `ambient`
    /// dimensions, Gaussian within it (no boundary to bias the estimate).
    fn subspace(n: usize, d: usize, ambient: usize, seed: u64) -> Array2<f32> {
        let mut state = seed;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let basis: Vec<Vec<f64>> = (0..d)
            .map(|_| (0..ambient).map(|_| uniform() - 0.5).collect())
            .collect();
        Array2::from_shape_fn((n, ambient), |_| 0.0)
            .to_owned()
            .tap(|a| {
                for mut row in a.outer_iter_mut() {
                    let coords: Vec<f64> = (0..d)
                        .map(|_| {
                            (-2.0 * (1.0 - uniform()).ln()).sqrt()
                                * (std::f64::consts::TAU * uniform()).cos()
                        })
                        .collect();
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = coords
                            .iter()
                            .zip(&basis)
                            .map(|(c, b)| c * b[j])
                            .sum::<f64>() as f32;
                    }
                }
            })
    }

    trait Tap: Sized {
        fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
    }
    impl<T> Tap for T {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }

    #[test]
    fn recovers_known_dimensions() {
        for d in [2usize, 5, 10] {
            let data = subspace(1500, d, 50, d as u64);
            for (estimator, variant) in [
                (Estimator::Twonn, Variant::Facco),
                (Estimator::Twonn, Variant::Paper),
                (Estimator::Mle, Variant::Facco),
            ] {
                let options = IdOptions {
                    estimator,
                    variant,
                    ..Default::default()
                };
                let got = estimate(data.view(), &options).unwrap().id;
                assert!(
                    (got - d as f64).abs() < 0.15 * d as f64,
                    "{estimator:?}/{variant:?}: d={d}, got {got}"
                );
            }
        }
    }

    #[test]
    fn duplicates_are_removed_and_counted() {
        let data = subspace(600, 4, 20, 3);
        let mut doubled =
            ndarray::concatenate(Axis(0), &[data.view(), data.slice(ndarray::s![..200, ..])])
                .unwrap();
        doubled.row_mut(0).fill(0.0);
        doubled.row_mut(1).fill(-0.0);
        let clean = estimate(data.view(), &IdOptions::default()).unwrap();
        let dup = estimate(doubled.view(), &IdOptions::default()).unwrap();
        // 200 repeated rows, minus rows 0 and 1 (now zeros, no longer equal
        // to their copies), plus row 1 now equal to row 0.
        assert_eq!(dup.duplicates_removed, 199);
        assert!(
            (dup.id - clean.id).abs() < 0.5,
            "{} vs {}",
            dup.id,
            clean.id
        );
    }

    #[test]
    fn deterministic_and_guarded() {
        let data = subspace(300, 3, 10, 9);
        let options = IdOptions {
            variant: Variant::Paper,
            ..Default::default()
        };
        assert_eq!(
            estimate(data.view(), &options).unwrap(),
            estimate(data.view(), &options).unwrap()
        );
        let mut bad = data.clone();
        bad[[5, 2]] = f32::NAN;
        assert!(matches!(
            estimate(bad.view(), &options),
            Err(IdError::NonFinite { row: 5 })
        ));
        let tiny = Array2::<f32>::zeros((10, 3));
        assert!(matches!(
            estimate(tiny.view(), &options),
            Err(IdError::TooFew {
                distinct: 1,
                duplicates: 9,
                ..
            })
        ));
    }

    #[test]
    fn the_estimate_does_not_depend_on_the_datas_scale() {
        // Above about 1e19 the f32 Gram products overflow, below about
        // 1e-19 they vanish; scaling by a power of two is exact, so the
        // estimate must be the same to the bit.
        let data = subspace(800, 6, 50, 5);
        assert!(
            !knn::uses_tree(800, 50),
            "the GEMM path is the one under test"
        );
        for options in [
            IdOptions::default(),
            IdOptions {
                estimator: Estimator::Mle,
                ..Default::default()
            },
        ] {
            let reference = estimate(data.view(), &options).unwrap();
            for power in [100, 60, -60, -100] {
                let scaled = data.mapv(|v| v * 2f32.powi(power));
                let got = estimate(scaled.view(), &options).unwrap();
                assert_eq!(got.id, reference.id, "{options:?} at 2^{power}");
            }
        }
    }

    #[test]
    fn twonn_fit_matches_the_formula() {
        // μ = e^(1/d)-spaced so that the fit is exact for the kept points.
        let mu: Vec<f64> = (1..=10)
            .map(|i| (1.0 - i as f64 / 10.0).powf(-1.0 / 3.0))
            .take(9)
            .collect();
        let mut with_tail = mu.clone();
        with_tail.push(1e9);
        let d = twonn_fit(with_tail, Discard::Fraction(0.1));
        assert!((d - 3.0).abs() < 1e-9, "{d}");
    }
}
