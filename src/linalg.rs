//! Dense linear algebra on the `gemm` crate's kernels (picked at run time,
//! up to AVX-512): matrix products for `id`'s distance Gram, the second
//! moments the repair is fitted to, and the repair's blocked Cholesky
//! solve, whose work is almost all such products. A leaf: it uses no other
//! module of the crate.
//!
//! A refit of CLIP ViT-B/32's MLP output projection solves a 3073 × 3073
//! system for 768 right-hand sides. The scalar factorisation this replaces
//! was 71% of a whole job's profile at that size; here the trailing updates
//! and the triangular solves' off-diagonal parts are products, and only the
//! 128-wide diagonal blocks are done element by element.
//!
//! Deterministic: `gemm` splits its work between threads by output tiles,
//! never along the summed dimension, so every element is summed in the same
//! order whatever the thread count.

use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, s};

/// Width of the diagonal blocks the factorisation and the solves work on
/// element by element; everything outside them goes through `gemm`.
const BLOCK: usize = 128;

/// Side of the tiles a symmetric Gram matrix is computed in ([`gram`]).
const GRAM_TILE: usize = 256;

/// The element types the products take (`gemm` dispatches on the type).
pub trait Element: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// Whether one product may use every thread (a single large product) or
/// only the calling one (products that already run in parallel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// rayon's pool.
    All,
    /// The calling thread.
    One,
}

/// `dst ← dst + factor · a·b`, or `dst ← factor · a·b` when `accumulate` is
/// false. Views of any strides (a transposed view is read in place).
fn multiply_into<T: Element>(
    mut dst: ArrayViewMut2<'_, T>,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    factor: T,
    accumulate: bool,
    threads: Threads,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert_eq!(b.nrows(), k, "inner dimensions differ");
    assert_eq!(dst.dim(), (m, n), "output shape differs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::ZERO);
        }
        return;
    }
    let [dst_rs, dst_cs] = [dst.strides()[0], dst.strides()[1]];
    let [a_rs, a_cs] = [a.strides()[0], a.strides()[1]];
    let [b_rs, b_cs] = [b.strides()[0], b.strides()[1]];
    // SAFETY: each pointer and its strides describe exactly the elements of
    // its view (m×n, m×k and k×n); `dst` is borrowed mutably, so it overlaps
    // neither input, which are shared borrows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            factor,
            false,
            false,
            false,
            match threads {
                Threads::All => gemm::Parallelism::Rayon(0),
                Threads::One => gemm::Parallelism::None,
            },
        );
    }
}

/// `a · b`.
pub fn product<T: Element>(
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    threads: Threads,
) -> Array2<T> {
    let mut out = Array2::from_elem((a.nrows(), b.ncols()), T::ZERO);
    multiply_into(out.view_mut(), a, b, T::ONE, false, threads);
    out
}

/// `sum ← sum + x · xᵀ` on the tiles on and above the diagonal: each
/// tile's product in f32 (in parallel, one thread each), added in f64.
/// About half a general product's work, and no full-size f32 matrix per
/// call; the tiles below the diagonal are left for [`mirror_tiles`], once
/// the sum is complete. `x` may be a transposed view (the Gram of a
/// matrix's columns).
pub fn add_gram(x: ArrayView2<'_, f32>, sum: &mut Array2<f64>) {
    let n = x.nrows();
    assert_eq!(sum.dim(), (n, n), "the sum is not n × n");
    let blocks = n.div_ceil(GRAM_TILE);
    let tiles: Vec<(usize, usize)> = (0..blocks)
        .flat_map(|a| (a..blocks).map(move |b| (a, b)))
        .collect();
    let span = |t: usize| t * GRAM_TILE..((t + 1) * GRAM_TILE).min(n);
    let mut products: Vec<(usize, Array2<f32>)> = tiles
        .into_par_iter()
        .map(|(a, b)| {
            let rows = x.slice(s![span(a), ..]);
            let cols = x.slice(s![span(b), ..]);
            (b, product(rows, cols.t(), Threads::One))
        })
        .collect();
    // Tiles of row strip a are consecutive (a major), each strip of the sum
    // is added to by one thread.
    let mut strips: Vec<Vec<(usize, Array2<f32>)>> = Vec::with_capacity(blocks);
    for a in 0..blocks {
        strips.push(products.drain(..blocks - a).collect());
    }
    sum.axis_chunks_iter_mut(Axis(0), GRAM_TILE)
        .into_par_iter()
        .zip(strips)
        .for_each(|(mut strip, tiles)| {
            for (b, tile) in tiles {
                strip
                    .slice_mut(s![.., span(b)])
                    .zip_mut_with(&tile, |acc, &v| *acc += v as f64);
            }
        });
}

/// Completes a sum of [`add_gram`]: every tile below the diagonal becomes
/// the transpose of its mirror above (the diagonal tiles were summed whole).
pub fn mirror_tiles(sum: &mut Array2<f64>) {
    let n = sum.nrows();
    let blocks = n.div_ceil(GRAM_TILE);
    let span = |t: usize| t * GRAM_TILE..((t + 1) * GRAM_TILE).min(n);
    for a in 0..blocks {
        for b in a + 1..blocks {
            let upper = sum.slice(s![span(a), span(b)]).t().to_owned();
            sum.slice_mut(s![span(b), span(a)]).assign(&upper);
        }
    }
}

/// Σᵢⱼ aᵢⱼ bᵢⱼ, each row summed in eight lanes (so the loop vectorises),
/// the rows in order.
pub fn inner(a: ArrayView2<'_, f64>, b: ArrayView2<'_, f64>) -> f64 {
    assert_eq!(a.dim(), b.dim(), "shapes differ");
    a.outer_iter()
        .zip(b.outer_iter())
        .map(|(x, y)| match (x.as_slice(), y.as_slice()) {
            (Some(x), Some(y)) => dot(x, y),
            _ => x.iter().zip(y.iter()).map(|(p, q)| p * q).sum(),
        })
        .sum()
}

/// x·y over contiguous rows, in eight running sums.
fn dot(x: &[f64], y: &[f64]) -> f64 {
    const LANES: usize = 8;
    let body = x.len() - x.len() % LANES;
    let mut sums = [0f64; LANES];
    for (p, q) in x[..body]
        .chunks_exact(LANES)
        .zip(y[..body].chunks_exact(LANES))
    {
        for lane in 0..LANES {
            sums[lane] += p[lane] * q[lane];
        }
    }
    let tail: f64 = x[body..].iter().zip(&y[body..]).map(|(p, q)| p * q).sum();
    sums.iter().sum::<f64>() + tail
}

/// `row ← row − factor · other`, element by element (vectorises).
fn subtract_scaled(row: &mut [f64], other: &[f64], factor: f64) {
    for (r, o) in row.iter_mut().zip(other) {
        *r -= factor * o;
    }
}

/// Solves (A + ridge·I) X = B for symmetric positive definite A by
/// Cholesky factorisation; `None` if A + ridge·I is not positive definite
/// (a pivot that is zero, negative or NaN). Only A's lower triangle is read.
/// The products run on `threads` (the result is the same either way).
pub fn solve_spd(
    a: Array2<f64>,
    mut b: Array2<f64>,
    ridge: f64,
    threads: Threads,
) -> Option<Array2<f64>> {
    let n = a.nrows();
    assert_eq!(b.nrows(), n, "B has another number of rows than A");
    let factor = Cholesky::new(a, ridge, threads);
    if factor.pivots() < n {
        return None;
    }
    if b.ncols() > 0 {
        if !b.is_standard_layout() {
            b = b.as_standard_layout().into_owned();
        }
        factor.forward(b.view_mut(), threads);
        factor.backward(b.view_mut(), threads);
    }
    Some(b)
}

/// The Cholesky factor L of A + λI as far as it exists: the leading
/// [`Cholesky::pivots`] rows and columns, which are also the factor of A's
/// leading block of that size (each entry of L depends only on A's entries
/// above and left of it). Every system over a leading block of A solves
/// with the same factor: the repair's candidate plans keep leading rows of
/// one order, and the factor of the whole matrix serves them all.
#[derive(Debug, Clone)]
pub struct Cholesky {
    /// L's column panels over the leading `pivots` square: panel `b` holds
    /// rows `b·BLOCK..pivots` of columns `b·BLOCK..(b+1)·BLOCK` (the
    /// diagonal block on top), so the factor keeps only its lower half.
    panels: Vec<Array2<f64>>,
    pivots: usize,
}

impl Cholesky {
    /// Factors `a + ridge·I` (only its lower triangle is read) until the
    /// first pivot that is not positive (or NaN).
    pub fn new(mut a: Array2<f64>, ridge: f64, threads: Threads) -> Self {
        let n = a.nrows();
        assert_eq!(a.ncols(), n, "A is not square");
        for i in 0..n {
            a[[i, i]] += ridge;
        }
        let pivots = factorise(&mut a, threads);
        let panels = (0..pivots)
            .step_by(BLOCK)
            .map(|b0| {
                a.slice(s![b0..pivots, b0..(b0 + BLOCK).min(pivots)])
                    .to_owned()
            })
            .collect();
        Self { panels, pivots }
    }

    /// How many leading rows the factor covers (A's size when A + λI is
    /// positive definite).
    pub fn pivots(&self) -> usize {
        self.pivots
    }

    /// L_k Y = B in place, L_k the leading block as tall as `b`
    /// (standard layout, at most [`Cholesky::pivots`] rows).
    pub fn forward(&self, b: ArrayViewMut2<'_, f64>, threads: Threads) {
        assert!(b.nrows() <= self.pivots, "B reaches past the factor");
        forward(&self.panels, b, threads);
    }

    /// L_kᵀ X = Y in place ([`Cholesky::forward`]'s other half).
    pub fn backward(&self, y: ArrayViewMut2<'_, f64>, threads: Threads) {
        assert!(y.nrows() <= self.pivots, "Y reaches past the factor");
        backward(&self.panels, y, threads);
    }
}

/// A = L Lᵀ in place (L in the lower triangle; the upper one is left as
/// scratch), right-looking by blocks: factor the diagonal block, solve the
/// panel below it, subtract the panel's outer product from what remains.
/// Returns how many leading pivots were positive (all n when A is
/// positive definite); L is complete for that leading square.
fn factorise(a: &mut Array2<f64>, threads: Threads) -> usize {
    let n = a.nrows();
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + BLOCK).min(n);
        if let Err(column) = factorise_small(a.slice_mut(s![k0..k1, k0..k1])) {
            return k0 + column;
        }
        if k1 < n {
            let diagonal = a.slice(s![k0..k1, k0..k1]).to_owned();
            // Panel rows r solve L_kk · l_rᵀ = a_rᵀ (forward substitution).
            let mut panel = a.slice(s![k1..n, k0..k1]).to_owned();
            panel
                .axis_iter_mut(Axis(0))
                .into_par_iter()
                .for_each(|mut row| {
                    let row = row
                        .as_slice_mut()
                        .expect("an owned panel's rows are contiguous");
                    for j in 0..row.len() {
                        let l = diagonal.row(j);
                        let l = l.as_slice().expect("an owned block's rows are contiguous");
                        row[j] = (row[j] - dot(&row[..j], &l[..j])) / l[j];
                    }
                });
            a.slice_mut(s![k1..n, k0..k1]).assign(&panel);
            // The whole trailing square (its upper half is scratch): one
            // product instead of a lower-triangle-only update, twice the
            // arithmetic at several times the speed.
            multiply_into(
                a.slice_mut(s![k1..n, k1..n]),
                panel.view(),
                panel.t(),
                -1.0,
                true,
                threads,
            );
        }
        k0 = k1;
    }
    n
}

/// Unblocked Cholesky of a small block (its lower triangle); the column
/// of the first pivot that is not positive is the error (the columns
/// before it are complete).
fn factorise_small(mut a: ArrayViewMut2<'_, f64>) -> Result<(), usize> {
    let n = a.nrows();
    for j in 0..n {
        let mut d = a[[j, j]];
        for p in 0..j {
            d -= a[[j, p]] * a[[j, p]];
        }
        if d.is_nan() || d <= 0.0 {
            return Err(j);
        }
        let d = d.sqrt();
        a[[j, j]] = d;
        for i in j + 1..n {
            let mut s = a[[i, j]];
            for p in 0..j {
                s -= a[[i, p]] * a[[j, p]];
            }
            a[[i, j]] = s / d;
        }
    }
    Ok(())
}

/// L Y = B in place for the leading block of L as tall as B, by blocks of
/// rows: solve a block against its diagonal block (the top of its panel),
/// subtract its contribution from every row below with one product.
fn forward(panels: &[Array2<f64>], mut b: ArrayViewMut2<'_, f64>, threads: Threads) {
    let n = b.nrows();
    let mut i0 = 0;
    for panel in panels {
        if i0 >= n {
            break;
        }
        let i1 = (i0 + BLOCK).min(n);
        let width = i1 - i0;
        let (mut top, bottom) = b.view_mut().split_at(Axis(0), i1);
        let mut block = top.slice_mut(s![i0.., ..]);
        for r in 0..width {
            let (solved, mut rest) = block.view_mut().split_at(Axis(0), r);
            let mut row = rest.row_mut(0);
            let row = row.as_slice_mut().expect("B is in standard layout");
            for p in 0..r {
                let solved_row = solved.row(p);
                let solved_row = solved_row.as_slice().expect("B is in standard layout");
                subtract_scaled(row, solved_row, panel[[r, p]]);
            }
            let d = panel[[r, r]];
            row.iter_mut().for_each(|x| *x /= d);
        }
        if i1 < n {
            multiply_into(
                bottom,
                panel.slice(s![width..n - i0, ..width]),
                block.view(),
                -1.0,
                true,
                threads,
            );
        }
        i0 = i1;
    }
}

/// Lᵀ X = Y in place for the leading block of L as tall as Y, by blocks of
/// rows from the last: subtract what the solved rows below contribute (one
/// product with a transposed piece of the block's panel), then solve the
/// block against its diagonal block.
fn backward(panels: &[Array2<f64>], mut b: ArrayViewMut2<'_, f64>, threads: Threads) {
    let n = b.nrows();
    let blocks = n.div_ceil(BLOCK);
    for index in (0..blocks).rev() {
        let panel = &panels[index];
        let (i0, i1) = (index * BLOCK, ((index + 1) * BLOCK).min(n));
        let width = i1 - i0;
        let (mut top, bottom) = b.view_mut().split_at(Axis(0), i1);
        let mut block = top.slice_mut(s![i0.., ..]);
        if i1 < n {
            multiply_into(
                block.view_mut(),
                panel.slice(s![width..n - i0, ..width]).t(),
                bottom.view(),
                -1.0,
                true,
                threads,
            );
        }
        for r in (0..width).rev() {
            let (mut head, solved) = block.view_mut().split_at(Axis(0), r + 1);
            let mut row = head.row_mut(r);
            let row = row.as_slice_mut().expect("B is in standard layout");
            for p in 0..width - r - 1 {
                let solved_row = solved.row(p);
                let solved_row = solved_row.as_slice().expect("B is in standard layout");
                subtract_scaled(row, solved_row, panel[[r + 1 + p, r]]);
            }
            let d = panel[[r, r]];
            row.iter_mut().for_each(|x| *x /= d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A = M Mᵀ + I, SPD and reasonably conditioned.
    fn spd(n: usize) -> Array2<f64> {
        let m = Array2::from_shape_fn((n, n), |(i, j)| {
            (((i * 7919 + j * 104_729) % 1013) as f64 / 1013.0) - 0.5
        });
        m.dot(&m.t()) + Array2::<f64>::eye(n) * (n as f64).sqrt()
    }

    #[test]
    fn products_match_ndarray_for_every_layout() {
        let a = Array2::from_shape_fn((37, 300), |(i, j)| ((i * 13 + j * 7) % 17) as f64 - 8.0);
        let b = Array2::from_shape_fn((300, 45), |(i, j)| ((i * 5 + j * 11) % 19) as f64 - 9.0);
        let expected = a.dot(&b);
        // Small integers: every order of summation gives the exact result.
        assert_eq!(product(a.view(), b.view(), Threads::All), expected);
        let bt = b.t().to_owned();
        assert_eq!(product(a.view(), bt.t(), Threads::One), expected);
        let mut acc = expected.clone();
        multiply_into(acc.view_mut(), a.view(), b.view(), -1.0, true, Threads::All);
        assert!(acc.iter().all(|&x| x == 0.0));
        assert_eq!(inner(a.view(), a.view()), (&a * &a).sum());
        let a32 = a.mapv(|x| x as f32);
        let b32 = b.mapv(|x| x as f32);
        assert_eq!(
            product(a32.view(), b32.view(), Threads::All),
            expected.mapv(|x| x as f32)
        );
    }

    #[test]
    fn the_gram_of_rows_and_of_columns_is_the_full_product() {
        // Sizes across the tile edge; small integers keep every sum exact.
        // Two calls summed, then mirrored: twice the full product.
        for n in [1, GRAM_TILE - 1, GRAM_TILE + 3, 2 * GRAM_TILE + 17] {
            let x = Array2::from_shape_fn((n, 41), |(i, j)| ((i * 7 + j * 3) % 13) as f32 - 6.0);
            let expected = x.dot(&x.t()).mapv(|v| 2.0 * v as f64);
            let mut rows = Array2::zeros((n, n));
            add_gram(x.view(), &mut rows);
            add_gram(x.view(), &mut rows);
            mirror_tiles(&mut rows);
            assert_eq!(rows, expected, "rows, n = {n}");
            let y = x.t().to_owned();
            let mut columns = Array2::zeros((n, n));
            add_gram(y.t(), &mut columns);
            add_gram(y.t(), &mut columns);
            mirror_tiles(&mut columns);
            assert_eq!(columns, expected, "columns, n = {n}");
        }
    }

    #[test]
    fn cholesky_solves_known_systems_across_block_edges() {
        // Sizes below, at and across the block width, with a ragged last block.
        for n in [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 37] {
            let a = spd(n);
            let x = Array2::from_shape_fn((n, 5), |(i, j)| (i as f64).sin() - j as f64 * 0.5);
            let b = a.dot(&x);
            let got = solve_spd(a.clone(), b, 0.0, Threads::All).unwrap();
            let worst = got
                .iter()
                .zip(x.iter())
                .map(|(g, e)| (g - e).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-9, "n = {n}: worst error {worst}");
        }
    }

    #[test]
    fn the_ridge_is_added_and_only_the_lower_triangle_is_read() {
        let n = BLOCK + 9;
        let a = spd(n);
        let x = Array2::from_shape_fn((n, 3), |(i, j)| ((i + j) % 5) as f64);
        let ridge = 0.25;
        let b = (&a + &(Array2::<f64>::eye(n) * ridge)).dot(&x);
        let mut garbage = a.clone();
        for i in 0..n {
            for j in i + 1..n {
                garbage[[i, j]] = f64::NAN;
            }
        }
        let got = solve_spd(garbage, b, ridge, Threads::All).unwrap();
        for (g, e) in got.iter().zip(x.iter()) {
            assert!((g - e).abs() < 1e-9, "{g} vs {e}");
        }
    }

    #[test]
    fn a_leading_block_of_the_factor_solves_the_leading_system() {
        let n = 300;
        let a = spd(n);
        let b = Array2::from_shape_fn((n, 5), |(i, j)| ((i * 3 + j * 11) % 23) as f64 - 11.0);
        let whole = Cholesky::new(a.clone(), 1e-3, Threads::All);
        assert_eq!(whole.pivots(), n);
        let mut forward = b.clone();
        whole.forward(forward.view_mut(), Threads::All);
        for k in [1, 2, 127, 128, 129, 250, n] {
            let mut x = forward.slice(s![..k, ..]).to_owned();
            whole.backward(x.view_mut(), Threads::One);
            let alone = solve_spd(
                a.slice(s![..k, ..k]).to_owned(),
                b.slice(s![..k, ..]).to_owned(),
                1e-3,
                Threads::One,
            )
            .unwrap();
            let gap = (&x - &alone).iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(gap < 1e-12, "k = {k}: {gap}");
        }
    }

    #[test]
    fn the_factor_stops_at_the_first_pivot_that_is_not_positive() {
        // Pivots inside a block and on a block's first column.
        for bad in [0, 5, 128, 150] {
            let mut a = spd(200);
            for j in 0..200 {
                a[[bad, j]] = 0.0;
                a[[j, bad]] = 0.0;
            }
            a[[bad, bad]] = -1.0;
            let factor = Cholesky::new(a.clone(), 0.0, Threads::All);
            assert_eq!(factor.pivots(), bad);
            // The leading block before it is complete.
            if bad > 0 {
                let mut x = Array2::<f64>::ones((bad, 1));
                factor.forward(x.view_mut(), Threads::All);
                factor.backward(x.view_mut(), Threads::All);
                let residual = a.slice(s![..bad, ..bad]).dot(&x) - 1.0;
                assert!(residual.iter().all(|r| r.abs() < 1e-9), "{bad}");
            }
        }
    }

    #[test]
    fn indefinite_or_nan_systems_have_no_solution() {
        assert!(
            solve_spd(
                -Array2::<f64>::eye(3),
                Array2::zeros((3, 1)),
                0.0,
                Threads::All
            )
            .is_none()
        );
        // The failing pivot in a later block, after a trailing update.
        let n = BLOCK + 20;
        let mut a = spd(n);
        a[[n - 3, n - 3]] = -1e6;
        assert!(solve_spd(a.clone(), Array2::zeros((n, 2)), 0.0, Threads::All).is_none());
        a[[n - 3, n - 3]] = f64::NAN;
        assert!(solve_spd(a, Array2::zeros((n, 2)), 0.0, Threads::All).is_none());
    }

    #[test]
    fn the_solve_is_deterministic_and_leaves_a_small_residual() {
        let n = 3 * BLOCK + 5;
        let a = spd(n);
        let b = Array2::from_shape_fn((n, 70), |(i, j)| ((i * 3 + j) % 23) as f64 - 11.0);
        let first = solve_spd(a.clone(), b.clone(), 1e-3, Threads::All).unwrap();
        let second = solve_spd(a.clone(), b.clone(), 1e-3, Threads::All).unwrap();
        assert_eq!(first, second);
        // One thread sums every element in the same order as all of them.
        let alone = solve_spd(a.clone(), b.clone(), 1e-3, Threads::One).unwrap();
        assert_eq!(first, alone);
        let residual = (&a + &(Array2::<f64>::eye(n) * 1e-3)).dot(&first) - &b;
        let worst = residual.iter().map(|r| r.abs()).fold(0.0, f64::max);
        assert!(worst < 1e-8, "residual {worst}");
    }
}
