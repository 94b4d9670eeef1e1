//! Micro-benchmarks of the hot paths: load + IR + encode of a model, the
//! Gram-matrix distances, and a whole TwoNN estimate — next to the f32
//! GEMM's own achieved rate on this machine (one N×N product on every
//! core), which is the floor the Gram distances are measured against.
//!
//!     cargo bench --bench micro [-- MODEL.onnx]
//!
//! Prints the median of 5 runs of each (default model: the trained
//! fixture, else the tiny CLIP).

use std::path::PathBuf;
use std::time::Instant;

use ndarray::Array2;
use onnx_idprune::id::{self, IdOptions, knn};

/// `data · dataᵀ` in one f32 GEMM call on every core: the best rate the
/// GEMM reaches on this machine for this shape.
fn full_product(data: &Array2<f32>) -> Array2<f32> {
    let (n, k) = data.dim();
    let mut out = Array2::<f32>::zeros((n, n));
    let stride = data.strides()[0];
    // SAFETY: the pointers and strides describe `data` (n×k, read as k×n
    // through swapped strides) and the n×n output, which nothing else
    // borrows.
    unsafe {
        gemm::gemm(
            n,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            data.as_ptr(),
            1,
            stride,
            data.as_ptr(),
            stride,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    out
}

fn median_seconds(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}

/// A 12-dimensional Gaussian pushed through a fixed nonlinear map into
/// `dim` dimensions (like flattened activations).
fn manifold(n: usize, dim: usize) -> Array2<f32> {
    let mut state = 9u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let z = Array2::from_shape_fn((n, 12), |_| next());
    let w = Array2::from_shape_fn((12, dim), |_| next());
    z.dot(&w).mapv(f32::tanh)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".onnx"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let trained = root.join("fixtures/trained/clip_trained.onnx");
            if trained.exists() {
                trained
            } else {
                root.join("fixtures/clip_tiny_torchscript_op17.onnx")
            }
        });
    let bytes = std::fs::metadata(&model).map(|m| m.len()).unwrap_or(0);
    let load = median_seconds(|| {
        let source = onnx_idprune::open(&model).expect("model loads");
        std::hint::black_box(onnx_idprune::onnx::encode_to_vec(&source.model.to_proto()));
    });
    println!(
        "load + IR + encode  {:>9.4} s  {} ({:.1} MB, {:.0} MB/s)",
        load,
        model.display(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / load
    );
    // `cargo bench` passes --bench; under `cargo test --all-targets` a small
    // run only checks that the benchmark still works.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[(usize, usize)] = if full {
        &[(2000, 768), (2000, 38400)]
    } else {
        &[(200, 64)]
    };
    for &(n, dim) in sizes {
        let data = manifold(n, dim);
        let gram = median_seconds(|| {
            std::hint::black_box(knn::pairwise_squared(data.view()));
        });
        let twonn = median_seconds(|| {
            std::hint::black_box(id::estimate(data.view(), &IdOptions::default()).unwrap());
        });
        let full = median_seconds(|| {
            std::hint::black_box(full_product(&data));
        });
        let rate = 2.0 * (n * n * dim) as f64 / full;
        // The Gram computes the tiles on and above the diagonal.
        let sizes: Vec<usize> = (0..n.div_ceil(knn::BLOCK))
            .map(|b| knn::BLOCK.min(n - b * knn::BLOCK))
            .collect();
        let tile_pairs: usize = (0..sizes.len())
            .flat_map(|a| (a..sizes.len()).map(move |b| (a, b)))
            .map(|(a, b)| sizes[a] * sizes[b])
            .sum();
        let floor = 2.0 * (tile_pairs * dim) as f64 / rate;
        println!(
            "f32 GEMM N×N       {full:>9.4} s  N={n} D={dim}  ({:.0} GFLOP/s achieved)",
            rate / 1e9
        );
        println!(
            "gram distances      {gram:>9.4} s  N={n} D={dim}  ({:.2}× its GEMM work at that rate, {floor:.4} s)",
            gram / floor
        );
        println!(
            "TwoNN (facco)       {twonn:>9.4} s  N={n} D={dim}  ({:.2}× the same)",
            twonn / floor
        );
    }
}
