//! Exact nearest-neighbour distances for high-dimensional data.
//!
//! Squared distances come from the Gram matrix, `|x|² + |y|² - 2 x·y`,
//! computed block by block with an f32 GEMM (rayon over row blocks). That
//! form loses precision when two points are close compared to their norms,
//! so it only nominates candidates: each point's few nearest candidates are
//! re-measured exactly in f64 from the raw rows, and those distances are the
//! ones returned.
//!
//! Why no k-d tree: the features measured here are layer activations with
//! hundreds to tens of thousands of dimensions, where a k-d tree degenerates
//! to a scan; a GEMM is the fastest exact method at these sizes.

use ndarray::{Array2, ArrayView2, Axis, s};
use rayon::prelude::*;

/// Rows per GEMM block.
const BLOCK: usize = 256;
/// Extra candidates re-measured exactly beyond the k requested.
const SLACK: usize = 6;

/// All pairwise squared distances (approximate, f32), row-major N×N.
///
/// The data are centred first (distances do not change): activations often
/// share a large common offset, and removing it keeps the Gram form's
/// cancellation error small.
pub fn pairwise_squared(data: ArrayView2<'_, f32>) -> Array2<f32> {
    let n = data.nrows();
    let mut mean = vec![0f64; data.ncols()];
    for row in data.outer_iter() {
        for (m, &v) in mean.iter_mut().zip(row.iter()) {
            *m += v as f64;
        }
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / n.max(1) as f64) as f32).collect();
    let mut centred = data.to_owned();
    centred
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .for_each(|mut row| {
            for (v, m) in row.iter_mut().zip(&mean) {
                *v -= m;
            }
        });
    let data = centred.view();
    let norms: Vec<f64> = data
        .outer_iter()
        .map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum())
        .collect();
    let mut out = Array2::<f32>::zeros((n, n));
    out.axis_chunks_iter_mut(Axis(0), BLOCK)
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut rows)| {
            let start = b * BLOCK;
            let block = data.slice(s![start..start + rows.nrows(), ..]);
            let gram = block.dot(&data.t());
            for (i, (mut row, grow)) in rows.outer_iter_mut().zip(gram.outer_iter()).enumerate() {
                let ni = norms[start + i];
                for (j, (d, &g)) in row.iter_mut().zip(grow.iter()).enumerate() {
                    *d = (ni + norms[j] - 2.0 * g as f64).max(0.0) as f32;
                }
            }
        });
    out
}

/// Exact Euclidean distance between two rows, in f64.
pub fn exact_distance(a: ndarray::ArrayView1<'_, f32>, b: ndarray::ArrayView1<'_, f32>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(&x, &y)| ((x as f64) - (y as f64)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// For every point of `subset` (indices into `data`), the distances to its
/// `k` nearest other points of `subset`, ascending. `squared` is
/// [`pairwise_squared`] of `data`.
pub fn neighbours(
    data: ArrayView2<'_, f32>,
    squared: &Array2<f32>,
    subset: &[usize],
    k: usize,
) -> Vec<Vec<f64>> {
    let want = (k + SLACK).min(subset.len().saturating_sub(1));
    subset
        .par_iter()
        .map(|&i| {
            let row = squared.row(i);
            let mut candidates: Vec<(f32, usize)> = subset
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| (row[j], j))
                .collect();
            if candidates.len() > want {
                candidates
                    .select_nth_unstable_by(want, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                candidates.truncate(want + 1);
            }
            let mut exact: Vec<f64> = candidates
                .iter()
                .map(|&(_, j)| exact_distance(data.row(i), data.row(j)))
                .collect();
            exact.sort_by(f64::total_cmp);
            exact.truncate(k);
            exact
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force in f64: the reference.
    fn naive(data: ArrayView2<'_, f32>, k: usize) -> Vec<Vec<f64>> {
        (0..data.nrows())
            .map(|i| {
                let mut d: Vec<f64> = (0..data.nrows())
                    .filter(|&j| j != i)
                    .map(|j| exact_distance(data.row(i), data.row(j)))
                    .collect();
                d.sort_by(f64::total_cmp);
                d.truncate(k);
                d
            })
            .collect()
    }

    #[test]
    fn gram_path_equals_brute_force() {
        // Points far from the origin and close to each other: the case where
        // the Gram form cancels badly.
        let mut state = 7u64;
        let data = Array2::from_shape_fn((300, 40), |(i, j)| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = (state >> 40) as f32 / (1u64 << 24) as f32;
            1000.0 + (i % 17) as f32 * 0.01 + j as f32 + noise * 1e-3
        });
        let squared = pairwise_squared(data.view());
        let all: Vec<usize> = (0..data.nrows()).collect();
        let fast = neighbours(data.view(), &squared, &all, 3);
        let slow = naive(data.view(), 3);
        for (f, s) in fast.iter().zip(&slow) {
            for (a, b) in f.iter().zip(s) {
                assert!((a - b).abs() <= 1e-9 * b.max(1.0), "{f:?} vs {s:?}");
            }
        }
    }
}
