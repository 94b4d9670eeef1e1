//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and any crash artifacts
//! (`fuzz/artifacts/<target>/`) through the fuzz targets' own bodies
//! (`fuzz/bodies.rs`), on stable and without libFuzzer: every file must run
//! without a panic, which includes the targets' property checks (the plan
//! round trip, the IR round trip, external data staying inside its folder).

#[path = "../fuzz/bodies.rs"]
mod bodies;
// The fuzz targets' allocation cap (it installs itself as the global
// allocator), so the replay enforces it on stable too.
#[path = "../fuzz/alloc_cap.rs"]
mod alloc_cap;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Fewest seed files each target's corpus must hold, so that an emptied or
/// misplaced corpus cannot make this test pass vacuously.
const MIN_FILES: &[(&str, usize)] = &[
    ("load_model", 20),
    ("parse_plan", 20),
    ("load_with_external", 20),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Runs `body` on every file, collecting the panics instead of stopping at
/// the first.
fn replay(body: bodies::Body, files: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for file in files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(non-text panic)");
            failures.push(format!("{}: {message}", file.display()));
        }
    }
    failures
}

#[test]
fn every_target_has_a_seed_corpus() {
    for (target, _) in bodies::TARGETS {
        let min = MIN_FILES
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("no minimum for target {target}"));
        let files = bodies::corpus_files(&fuzz_dir().join("corpus").join(target));
        assert!(
            files.len() >= min,
            "fuzz/corpus/{target} holds {} files, expected at least {min} \
             (regenerate with: python3 fuzz/make_corpus.py)",
            files.len()
        );
    }
}

#[test]
fn corpus_and_artifacts_replay_without_panics() {
    let mut failures = Vec::new();
    let mut total = 0;
    for (target, body) in bodies::TARGETS {
        for folder in ["corpus", "artifacts"] {
            let files = bodies::corpus_files(&fuzz_dir().join(folder).join(target));
            total += files.len();
            failures.extend(replay(*body, &files));
        }
    }
    assert!(total > 0, "nothing replayed");
    assert!(
        failures.is_empty(),
        "{} of {total} fuzz inputs panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Crash inputs found by fuzzing whose bug is not fixed yet
/// (`fuzz/known-crashes/<target>/`, see fuzz/README.md). Run with
/// `cargo test --test fuzz_corpus -- --ignored` after a fix; once an input
/// passes, move it to `fuzz/corpus/<target>/repro-*` so the test above
/// guards against the bug coming back.
#[test]
#[ignore = "open bugs: these inputs still crash"]
fn known_crashes_are_fixed() {
    let mut failures = Vec::new();
    for (target, body) in bodies::TARGETS {
        let files = bodies::corpus_files(&fuzz_dir().join("known-crashes").join(target));
        failures.extend(replay(*body, &files));
    }
    assert!(
        failures.is_empty(),
        "{} known crash inputs still fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The plan round trip is checked by the `parse_plan` body; make sure the
/// seeds include plans that parse, so the property is really exercised.
#[test]
fn plan_seeds_include_accepted_plans() {
    let files = bodies::corpus_files(&fuzz_dir().join("corpus").join("parse_plan"));
    let accepted = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .ok()
                .is_some_and(|text| onnx_idprune::plan::Plan::parse(&text).is_ok())
        })
        .count();
    assert!(accepted >= 5, "only {accepted} plan seeds parse");
}

/// Likewise, some model seeds must load and build an IR, and some must get
/// as far as a discovered architecture.
#[test]
fn model_seeds_reach_discovery() {
    let files = bodies::corpus_files(&fuzz_dir().join("corpus").join("load_model"));
    let (mut built, mut discovered) = (0, 0);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let Ok(loaded) = onnx_idprune::onnx::load_bytes(data.into(), file) else {
            continue;
        };
        let Ok(model) = onnx_idprune::ir::Model::from_proto(loaded.proto) else {
            continue;
        };
        built += 1;
        if onnx_idprune::arch::discover(&model.graph).is_ok() {
            discovered += 1;
        }
    }
    assert!(built >= 5, "only {built} model seeds build an IR");
    assert!(
        discovered >= 3,
        "only {discovered} model seeds discover blocks"
    );
}

/// Set by `allocation_cap_aborts_oversized_allocations` for the child
/// process it starts, which then runs `oversized_allocation_probe`.
const PROBE_ENV: &str = "IDPRUNE_ALLOC_CAP_PROBE";

/// Not a test of its own: the child half of the test below. It allocates
/// one byte more than the cap allows, which must abort the process.
#[test]
#[ignore = "run by allocation_cap_aborts_oversized_allocations in a child process"]
fn oversized_allocation_probe() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    let size = std::hint::black_box(alloc_cap::MAX_ALLOCATION);
    let buffer = vec![0u8; size];
    // Only reached when the cap failed.
    println!("allocated {} bytes", std::hint::black_box(buffer).len());
}

/// The cap is what turns "a 100-byte input allocated gigabytes" into a
/// crash on the stable toolchain, where libFuzzer's malloc limit does not
/// work: check that it really aborts, and that allocations just under it go
/// through.
#[test]
fn allocation_cap_aborts_oversized_allocations() {
    let just_under = vec![0u8; std::hint::black_box(alloc_cap::MAX_ALLOCATION - 1)];
    assert_eq!(just_under.len(), alloc_cap::MAX_ALLOCATION - 1);
    drop(just_under);

    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "oversized_allocation_probe",
            "--nocapture",
        ])
        .env(PROBE_ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "the probe finished normally:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "fuzz allocation cap: an allocation of {} bytes",
            alloc_cap::MAX_ALLOCATION
        )),
        "the probe did not stop at the cap:\n{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("allocated"), "{stdout}");
}
