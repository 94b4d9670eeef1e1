//! `id --data`: agreement with scikit-dimension (reference values committed
//! by fixtures/id/make_reference.py), duplicates, bad input.

mod util;

use serde_json::Value;
use util::{Sandbox, run};

fn id_json(path: &std::path::Path, extra: &[&str]) -> Value {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "id".as_ref(),
        "--data".as_ref(),
        path.as_os_str(),
        "--json".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let result = run(args);
    assert_eq!(result.code, 0, "{}", result.stderr);
    serde_json::from_str(&result.stdout).unwrap()
}

fn write_npy(
    sandbox: &Sandbox,
    name: &str,
    rows: usize,
    cols: usize,
    f: impl Fn(usize, usize) -> f32,
) -> std::path::PathBuf {
    use ndarray_npy::WriteNpyExt;
    let array = ndarray::Array2::from_shape_fn((rows, cols), |(i, j)| f(i, j));
    let path = sandbox.path(name);
    array
        .write_npy(std::fs::File::create(&path).unwrap())
        .unwrap();
    path
}

#[test]
fn facco_agrees_with_scikit_dimension() {
    let dir = util::fixtures().join("id");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for (name, want) in expected.as_object().unwrap() {
        let got = id_json(&dir.join(format!("{name}.npy")), &["--variant", "facco"]);
        assert_eq!(got["estimator"], "twonn");
        assert_eq!(got["variant"], "facco");
        assert_eq!(got["n"], want["n"], "{name}");
        assert_eq!(got["dim"], want["dim"], "{name}");
        assert_eq!(got["duplicates_removed"], 0, "{name}");
        let (g, w) = (
            got["id"].as_f64().unwrap(),
            want["skdim_twonn"].as_f64().unwrap(),
        );
        assert!(
            ((g - w) / w).abs() < 1e-3,
            "{name}: {g} vs scikit-dimension {w}"
        );
    }
}

#[test]
fn paper_variant_and_mle_are_near_the_true_dimension() {
    let dir = util::fixtures().join("id");
    for (name, d) in [
        ("gauss_d3_in_10", 3.0),
        ("gauss_d8_in_100", 8.0),
        ("curved_d5_in_400", 5.0),
    ] {
        for extra in [&["--variant", "paper"][..], &["--estimator", "mle"][..]] {
            let got = id_json(&dir.join(format!("{name}.npy")), extra)["id"]
                .as_f64()
                .unwrap();
            assert!((got - d).abs() < 0.2 * d, "{name} {extra:?}: {got}");
        }
    }
}

#[test]
fn duplicate_rows_give_a_sane_estimate() {
    // Every sample three times (identical captions): without removal, r1 = 0.
    let sandbox = Sandbox::new();
    let base = ndarray_npy::read_npy::<_, ndarray::Array2<f32>>(
        util::fixtures().join("id/gauss_d8_in_100.npy"),
    )
    .unwrap();
    let tripled = write_npy(
        &sandbox,
        "tripled.npy",
        base.nrows() * 3,
        base.ncols(),
        |i, j| base[[i % base.nrows(), j]],
    );
    let got = id_json(&tripled, &[]);
    assert_eq!(got["duplicates_removed"], 2 * base.nrows() as u64);
    let clean = id_json(&util::fixtures().join("id/gauss_d8_in_100.npy"), &[]);
    assert!((got["id"].as_f64().unwrap() - clean["id"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn bad_data_is_refused_clearly() {
    let sandbox = Sandbox::new();
    let nan = write_npy(&sandbox, "nan.npy", 50, 4, |i, j| {
        if i == 7 && j == 1 {
            f32::NAN
        } else {
            (i * 4 + j) as f32
        }
    });
    run(["id", "--data", nan.to_str().unwrap()])
        .assert_error(1, "NaN or infinite values (sample 7)");
    let same = write_npy(&sandbox, "same.npy", 50, 4, |_, _| 1.0);
    run(["id", "--data", same.to_str().unwrap()]).assert_error(1, "too few distinct samples");
    let text = sandbox.write("x.npy", "not numpy");
    run(["id", "--data", text.to_str().unwrap()])
        .assert_error(1, "not a 2-D float32 or float64 .npy matrix");
    run([
        "id",
        "--data",
        sandbox.path("missing.npy").to_str().unwrap(),
    ])
    .assert_error(1, "cannot read");
    assert_eq!(
        run(["id", "--data", nan.to_str().unwrap(), "--variant", "other"]).code,
        2
    );
}

#[test]
fn low_dimensional_data_beyond_the_gram_limit_goes_to_the_k_d_tree() {
    // 30 000 points on a 2-D sheet curved in 3-D: too many for the N×N
    // GEMM path (capped at 20 000), routine for the k-d tree.
    let sandbox = Sandbox::new();
    let mut state = 3u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut rows = Vec::new();
    for _ in 0..30_000 {
        let (u, v) = (next() * 3.0, next() * 3.0);
        rows.push([u, v, (u * 1.3).sin() + 0.5 * v * v]);
    }
    let path = write_npy(&sandbox, "sheet.npy", 30_000, 3, |i, j| rows[i][j]);
    let json = id_json(&path, &[]);
    assert_eq!(json["n"], 30_000);
    let id = json["id"].as_f64().unwrap();
    assert!((id - 2.0).abs() < 0.2, "id {id}");
}
