//! Exact nearest-neighbour distances for high-dimensional data.
//!
//! Squared distances come from the Gram matrix, `|x|² + |y|² - 2 x·y`,
//! computed block by block with an f32 GEMM (the `gemm` crate, whose
//! AVX-512 kernels ran at about twice the speed of ndarray's on the project
//! machine; rayon over row blocks). That form loses precision when two
//! points are close compared to their norms, so it only nominates
//! candidates: each point's few nearest candidates are
//! re-measured exactly in f64 from the raw rows, and those distances are the
//! ones returned.
//!
//! Low-dimensional data (`id --data` on embeddings reduced to a few
//! dimensions, synthetic manifolds) go to a k-d tree (kiddo) instead: exact
//! in f64 directly, O(N log N), and no N×N matrix — so N is not capped by
//! memory there. Where the tree wins was measured (`cargo bench --bench
//! knn`, 2-core machine, 2026-11-25): see [`TREE_MAX_DIM`]. Layer
//! activations (hundreds to tens of thousands of dimensions) always take
//! the GEMM: there a k-d tree degenerates to a scan.

use ndarray::{Array2, ArrayView2, Axis, s};
use rayon::prelude::*;

/// Rows per GEMM block: 256 computes 56% of the full product (the tiles on
/// and above the diagonal) against 62% for 512, at the same GEMM speed
/// (measured, 2-core machine, 2026-12-01: N = 2000, D = 38,400).
pub const BLOCK: usize = 256;
/// Relative error allowed for in the Gram-form squared distances (f32
/// accumulation over long rows): candidates within this margin of the k-th
/// nearest are re-measured too.
const MARGIN: f64 = 1e-5;
/// At most this many candidates per point are re-measured.
const MAX_CANDIDATES: usize = 64;

/// Highest dimension sent to the k-d tree.
///
/// Measured with `cargo bench --bench knn` (2 cores shared with other
/// work, 2026-11-25; uniform points, seconds for every point's two nearest
/// neighbours, GEMM / tree):
///
/// | N      | d = 2        | d = 4       | d = 8        | d = 12      | d = 16       |
/// |--------|--------------|-------------|--------------|-------------|--------------|
/// | 2 000  | 0.15 / 0.005 | 0.08 / 0.001| 0.05 / 0.024 | 0.06 / 0.08 | 0.06 / 0.09  |
/// | 20 000 | 11.6 / 0.02  | 9.2 / 0.07  | 10.2 / 0.63  | 8.9 / 3.1   | 8.3 / 12.1   |
///
/// The tree's cost grows steeply with d (its pruning fails), the GEMM's
/// barely: the crossover sits near d = 8 at N = 2 000 and between 12 and
/// 16 at N = 20 000. Hence: the tree up to d = 8 from [`TREE_MIN_POINTS`]
/// points, up to d = 12 from [`TREE_LARGE_N`] points, the GEMM otherwise.
pub const TREE_MAX_DIM: usize = 12;
/// Fewest points for the tree at d ≤ 8: below this both take milliseconds
/// and the GEMM path stays the one reference.
pub const TREE_MIN_POINTS: usize = 500;
/// From this many points the tree also takes 9 ≤ d ≤ [`TREE_MAX_DIM`].
pub const TREE_LARGE_N: usize = 10_000;

/// How nearest neighbours are found for one data set.
pub enum Search {
    /// Pairwise distances from a blocked GEMM (high dimensions).
    Gram(Distances),
    /// A k-d tree per queried subset (low dimensions).
    Tree,
}

impl Search {
    /// The method for `data` (see [`TREE_MAX_DIM`], [`TREE_MIN_POINTS`]).
    pub fn new(data: ArrayView2<'_, f32>) -> Self {
        if uses_tree(data.nrows(), data.ncols()) {
            Search::Tree
        } else {
            Search::Gram(pairwise_squared(data))
        }
    }

    /// For every point of `subset`, the distances to its `k` nearest other
    /// points of `subset`, ascending.
    pub fn neighbours(
        &self,
        data: ArrayView2<'_, f32>,
        subset: &[usize],
        k: usize,
    ) -> Vec<Vec<f64>> {
        match self {
            Search::Gram(distances) => neighbours(data, distances, subset, k),
            Search::Tree => tree_neighbours(data, subset, k),
        }
    }
}

/// Whether [`Search::new`] picks the k-d tree for `n` points of `dim`.
pub fn uses_tree(n: usize, dim: usize) -> bool {
    (dim <= 8 && n >= TREE_MIN_POINTS) || (dim <= TREE_MAX_DIM && n >= TREE_LARGE_N)
}

/// [`Search::neighbours`] through a k-d tree of the subset.
pub fn tree_neighbours(data: ArrayView2<'_, f32>, subset: &[usize], k: usize) -> Vec<Vec<f64>> {
    macro_rules! dispatch {
        ($($d:literal)*) => {
            match data.ncols() {
                $($d => tree_neighbours_in::<$d>(data, subset, k),)*
                other => panic!("k-d tree asked for {other} dimensions (at most {TREE_MAX_DIM})"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
}

fn tree_neighbours_in<const K: usize>(
    data: ArrayView2<'_, f32>,
    subset: &[usize],
    k: usize,
) -> Vec<Vec<f64>> {
    use kiddo::SquaredEuclidean;
    let points: Vec<[f64; K]> = subset
        .iter()
        .map(|&i| std::array::from_fn(|c| data[[i, c]] as f64))
        .collect();
    let tree: kiddo::ImmutableKdTree<f64, K> = kiddo::ImmutableKdTree::new_from_slice(&points);
    let want = std::num::NonZero::new(k + 1).expect("k + 1 > 0");
    points
        .par_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut d: Vec<f64> = tree
                .nearest_n::<SquaredEuclidean>(p, want)
                .into_iter()
                .filter(|n| n.item as usize != i)
                .map(|n| n.distance.sqrt())
                .collect();
            d.sort_by(f64::total_cmp);
            d.truncate(k);
            d
        })
        .collect()
}

/// Approximate squared distances and the (centred) squared norms they
/// came from.
pub struct Distances {
    /// N×N approximate squared distances.
    pub squared: Array2<f32>,
    /// Squared norms of the centred rows.
    pub norms: Vec<f64>,
}

/// All pairwise squared distances (approximate, f32), row-major N×N, in
/// the units of the data scaled by a power of two ([`Distances::norms`] in
/// the same units).
///
/// The data are centred first (distances do not change): activations often
/// share a large common offset, and removing it keeps the Gram form's
/// cancellation error small. They are then scaled by the power of two that
/// brings the largest magnitude into [0.5, 1): exact, so the candidates are
/// those of the unscaled data, and the f32 products can neither overflow
/// (values near 1e19 and up) nor vanish into subnormals.
pub fn pairwise_squared(data: ArrayView2<'_, f32>) -> Distances {
    let (n, dim) = data.dim();
    let (sum, largest) = data
        .axis_chunks_iter(Axis(0), 64)
        .into_par_iter()
        .map(|rows| {
            let mut partial = vec![0f64; dim];
            let mut largest = 0f32;
            for row in rows.outer_iter() {
                for (m, &v) in partial.iter_mut().zip(row.iter()) {
                    *m += v as f64;
                    largest = largest.max(v.abs());
                }
            }
            (partial, largest)
        })
        .reduce(
            || (vec![0f64; dim], 0f32),
            |(mut a, la), (b, lb)| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                (a, la.max(lb))
            },
        );
    let scale = power_of_two_scale(largest);
    // (v·s) − (m·s) in f32 is exactly s·(v − m): scaling by a power of two
    // commutes with rounding.
    let mean: Vec<f32> = sum
        .iter()
        .map(|m| ((m / n.max(1) as f64) * scale) as f32)
        .collect();
    let mut centred = Array2::<f32>::zeros((n, dim));
    let norms: Vec<f64> = centred
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(data.axis_iter(Axis(0)))
        .map(|(mut out, row)| {
            let mut norm = 0f64;
            for ((o, &v), m) in out.iter_mut().zip(row.iter()).zip(&mean) {
                *o = ((v as f64) * scale) as f32 - m;
                norm += (*o as f64) * (*o as f64);
            }
            norm
        })
        .collect();
    let data = centred.view();
    // The Gram matrix is symmetric: compute the tiles on and above the
    // diagonal (in parallel), mirror the rest.
    let blocks = n.div_ceil(BLOCK);
    let tiles: Vec<(usize, usize)> = (0..blocks)
        .flat_map(|a| (a..blocks).map(move |b| (a, b)))
        .collect();
    let products: Vec<((usize, usize), Array2<f32>)> = tiles
        .into_par_iter()
        .map(|(a, b)| {
            let rows = data.slice(s![a * BLOCK..((a + 1) * BLOCK).min(n), ..]);
            let cols = data.slice(s![b * BLOCK..((b + 1) * BLOCK).min(n), ..]);
            ((a, b), gram_tile(rows, cols))
        })
        .collect();
    let mut out = Array2::<f32>::zeros((n, n));
    for ((a, b), gram) in products {
        for ((i, j), &g) in gram.indexed_iter() {
            let (r, c) = (a * BLOCK + i, b * BLOCK + j);
            let d = (norms[r] + norms[c] - 2.0 * g as f64).max(0.0) as f32;
            out[[r, c]] = d;
            out[[c, r]] = d;
        }
    }
    Distances {
        squared: out,
        norms,
    }
}

/// The power of two `s` with `largest · s` in [0.5, 1) (1 for zeros).
fn power_of_two_scale(largest: f32) -> f64 {
    if largest > 0.0 && largest.is_finite() {
        // frexp: largest = f · 2^e with f in [0.5, 1).
        let exponent = (largest as f64).log2().floor() as i32 + 1;
        2f64.powi(-exponent)
    } else {
        1.0
    }
}

/// `rows · colsᵀ` with an f32 GEMM (f32 accumulation), on the calling
/// thread: the tiles already run in parallel.
fn gram_tile(rows: ArrayView2<'_, f32>, cols: ArrayView2<'_, f32>) -> Array2<f32> {
    crate::linalg::product(rows, cols.t(), crate::linalg::Threads::One)
}

/// Exact Euclidean distance between two rows, in f64.
///
/// Eight running sums (one per lane of a wide register) instead of one, so
/// the loop vectorises; the rows are contiguous in every caller, a strided
/// view takes the plain loop.
pub fn exact_distance(a: ndarray::ArrayView1<'_, f32>, b: ndarray::ArrayView1<'_, f32>) -> f64 {
    let (Some(a), Some(b)) = (a.as_slice(), b.as_slice()) else {
        return a
            .iter()
            .zip(b.iter())
            .map(|(&x, &y)| ((x as f64) - (y as f64)).powi(2))
            .sum::<f64>()
            .sqrt();
    };
    const LANES: usize = 8;
    let mut sums = [0f64; LANES];
    let (a_body, a_tail) = a.split_at(a.len() - a.len() % LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (x, y) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for lane in 0..LANES {
            let d = (x[lane] as f64) - (y[lane] as f64);
            sums[lane] += d * d;
        }
    }
    let tail: f64 = a_tail
        .iter()
        .zip(b_tail)
        .map(|(&x, &y)| ((x as f64) - (y as f64)).powi(2))
        .sum();
    (sums.iter().sum::<f64>() + tail).sqrt()
}

/// For every point of `subset` (indices into `data`), the distances to its
/// `k` nearest other points of `subset`, ascending. `distances` is
/// [`pairwise_squared`] of `data`. Candidates are the k nearest by the
/// approximate distances plus any within the error margin of the k-th; they
/// are re-measured exactly.
pub fn neighbours(
    data: ArrayView2<'_, f32>,
    distances: &Distances,
    subset: &[usize],
    k: usize,
) -> Vec<Vec<f64>> {
    let largest_norm = subset
        .iter()
        .map(|&j| distances.norms[j])
        .fold(0f64, f64::max);
    subset
        .par_iter()
        .map(|&i| {
            let row = distances.squared.row(i);
            let mut candidates: Vec<(f32, usize)> = subset
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| (row[j], j))
                .collect();
            let order =
                |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            if candidates.len() > k {
                candidates.select_nth_unstable_by(k - 1, order);
                let kth = candidates[k - 1].0 as f64;
                let limit = kth + MARGIN * (distances.norms[i] + largest_norm);
                let (near, rest) = candidates.split_at_mut(k);
                let mut extra: Vec<(f32, usize)> = rest
                    .iter()
                    .copied()
                    .filter(|c| (c.0 as f64) <= limit)
                    .collect();
                extra.sort_by(order);
                extra.truncate(MAX_CANDIDATES.saturating_sub(k));
                let mut chosen = near.to_vec();
                chosen.extend(extra);
                candidates = chosen;
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
                    .map(|j| {
                        let (a, b) = (data.row(i), data.row(j));
                        a.iter()
                            .zip(b.iter())
                            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .collect();
                d.sort_by(f64::total_cmp);
                d.truncate(k);
                d
            })
            .collect()
    }

    #[test]
    fn tree_path_equals_brute_force() {
        let mut state = 11u64;
        for dim in [1, 3, 8, 12] {
            let data = Array2::from_shape_fn((400, dim), |_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Coarse values: many points share a coordinate on an axis.
                ((state >> 40) % 50) as f32 * 0.5
            });
            let (unique, _) = crate::id::dedupe(data.view());
            let data = unique.unwrap_or(data);
            let all: Vec<usize> = (0..data.nrows()).collect();
            let tree = tree_neighbours(data.view(), &all, 3);
            let slow = naive(data.view(), 3);
            for (f, s) in tree.iter().zip(&slow) {
                for (a, b) in f.iter().zip(s) {
                    assert!(
                        (a - b).abs() <= 1e-9 * b.max(1.0),
                        "d={dim}: {f:?} vs {s:?}"
                    );
                }
            }
            // A subset is searched on its own.
            let half: Vec<usize> = (0..data.nrows()).step_by(2).collect();
            let sub = tree_neighbours(data.view(), &half, 2);
            let distances = pairwise_squared(data.view());
            let gram = neighbours(data.view(), &distances, &half, 2);
            for (a, b) in sub.iter().zip(&gram) {
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.max(1.0),
                        "d={dim}: {a:?} vs {b:?}"
                    );
                }
            }
        }
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
        let distances = pairwise_squared(data.view());
        let all: Vec<usize> = (0..data.nrows()).collect();
        let fast = neighbours(data.view(), &distances, &all, 3);
        let slow = naive(data.view(), 3);
        for (f, s) in fast.iter().zip(&slow) {
            for (a, b) in f.iter().zip(s) {
                assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{f:?} vs {s:?}");
            }
        }
    }
}
