//! Micro-benchmarks of the hot paths: load + IR + encode of a model, the
//! Gram-matrix distances, and a whole TwoNN estimate.
//!
//!     cargo bench --bench micro [-- MODEL.onnx]
//!
//! Prints the median of 5 runs of each (default model: the trained
//! fixture, else the tiny CLIP).

use std::path::PathBuf;
use std::time::Instant;

use ndarray::Array2;
use onnx_idprune::id::{self, IdOptions, knn};

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
        println!("gram distances      {gram:>9.4} s  N={n} D={dim}");
        println!("TwoNN (facco)       {twonn:>9.4} s  N={n} D={dim}");
    }
}
