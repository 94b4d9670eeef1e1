//! Where the k-d tree beats the GEMM for exact two-nearest-neighbour search
//! (the numbers behind `id::knn::TREE_MAX_DIM` and `TREE_MIN_POINTS`).
//!
//!     cargo bench --bench knn
//!
//! Prints, for uniform random points in [0, 1)^d, the seconds each method
//! takes to find every point's two nearest neighbours, and the ratio.

use std::time::Instant;

use ndarray::Array2;
use onnx_idprune::id::knn;

fn points(n: usize, dim: usize, seed: u64) -> Array2<f32> {
    let mut state = seed;
    Array2::from_shape_fn((n, dim), |_| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    })
}

fn seconds(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not:
    // there a small run checks that the benchmark still works.
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if quick { &[300] } else { &[500, 2000, 20000] };
    println!(
        "{:>7} {:>4} {:>10} {:>10} {:>8}",
        "N", "d", "gemm s", "tree s", "gemm/tree"
    );
    for &n in sizes {
        for dim in [2, 4, 8, 12, 16, 24] {
            let data = points(n, dim, 42);
            let all: Vec<usize> = (0..n).collect();
            let gemm = seconds(|| {
                let distances = knn::pairwise_squared(data.view());
                std::hint::black_box(knn::neighbours(data.view(), &distances, &all, 2));
            });
            let tree = if dim <= knn::TREE_MAX_DIM {
                seconds(|| {
                    std::hint::black_box(knn::tree_neighbours(data.view(), &all, 2));
                })
            } else {
                f64::NAN
            };
            println!(
                "{n:>7} {dim:>4} {gemm:>10.4} {tree:>10.4} {:>8.2}",
                gemm / tree
            );
        }
    }
}
