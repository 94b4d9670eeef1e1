//! Checks by tools nobody here wrote: `onnx.checker` with full shape
//! inference and the Python ONNX Runtime package, on every round-tripped
//! fixture (embedded and external data).
//!
//! Needs the test Python environment (`scripts/install-python-env.sh`, or a
//! Python with tests/requirements.txt given in ONNX_IDPRUNE_PYTHON); fails,
//! rather than skips, without it.

mod util;

use std::path::PathBuf;
use std::process::Command;

use util::{Sandbox, run};

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ONNX_IDPRUNE_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no test Python at {}: run scripts/install-python-env.sh",
        venv.display()
    );
    venv
}

/// Runs tests/scripts/check_models.py with `mode` on ORIGINAL OUTPUT pairs
/// and requires every pair to pass.
fn check_models(mode: &str, pairs: &[PathBuf]) {
    check_models_with(
        &util::fixtures().join("calib/clip_tiny_calib.npz"),
        mode,
        pairs,
    )
}

/// [`check_models`] with the inputs of `calib`.
fn check_models_with(calib: &std::path::Path, mode: &str, pairs: &[PathBuf]) {
    let mut args: Vec<std::ffi::OsString> = vec![mode.into(), "--calib".into(), calib.into()];
    args.extend(pairs.iter().map(Into::into));
    run_check("check_models.py", &args, pairs.len() / 2);
}

/// Runs tests/scripts/SCRIPT with `args` and requires it to succeed with
/// `oks` lines ending in ": ok".
fn run_check(script: &str, args: &[std::ffi::OsString], oks: usize) {
    let script = util::fixtures().join("../tests/scripts").join(script);
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(": ok")).count(),
        oks,
        "{stdout}"
    );
}

#[test]
fn round_trips_pass_onnx_checker_and_onnxruntime() {
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    let mut pairs = Vec::new();
    for model in util::fixture_models() {
        let name = model.file_name().unwrap().to_string_lossy().into_owned();
        for external in ["never", "always"] {
            let out = sandbox.path(&format!("{external}-{name}"));
            util::run_plan(&model, &out, &plan, &["--external-data", external]).assert_ok();
            pairs.push(model.clone());
            pairs.push(out);
        }
    }
    check_models("--exact", &pairs);
}

#[test]
fn pruned_models_pass_onnx_checker_with_full_shape_inference() {
    let sandbox = Sandbox::new();
    let mut pairs = Vec::new();
    for (plan, forms) in [
        (
            "clip_mixed",
            &[
                "clip_tiny_torchscript_op17.onnx",
                "clip_tiny_torchscript_op16.onnx",
                "clip_tiny_dynamo_op18.onnx",
                "clip_tiny_ort_fused.onnx",
            ][..],
        ),
        (
            "clip_drop_blocks",
            &["clip_tiny_dynamo_op18.onnx", "clip_tiny_ort_fused.onnx"][..],
        ),
        (
            "clip_slim",
            &[
                "clip_tiny_torchscript_op16.onnx",
                "clip_tiny_dynamo_op18.onnx",
            ][..],
        ),
        (
            "blip_mixed",
            &[
                "blip_itm_tiny_torchscript_op17.onnx",
                "blip_itm_tiny_dynamo_op18.onnx",
            ][..],
        ),
        (
            "blip_sub_blocks",
            &[
                "blip_itm_tiny_torchscript_op17.onnx",
                "blip_itm_tiny_dynamo_op18.onnx",
            ][..],
        ),
    ] {
        let plan_path = util::fixtures().join(format!("plans/{plan}.json"));
        for form in forms {
            let model = util::fixtures().join(form);
            let out = sandbox.path(&format!("{plan}-{form}"));
            run([
                model.as_os_str(),
                out.as_os_str(),
                "--plan".as_ref(),
                plan_path.as_os_str(),
            ])
            .assert_ok();
            pairs.push(model);
            pairs.push(out);
        }
    }
    check_models("--no-compare", &pairs);
}

/// Every file of the exporter-default corpus, pruned by its model's plan
/// mixing every action: the ONNX checker with full shape inference accepts
/// it and the Python ONNX Runtime runs it, keeping the output names.
#[test]
fn pruned_default_exports_pass_onnx_checker_with_full_shape_inference() {
    let sandbox = Sandbox::new();
    let corpus = util::fixtures().join("defaults");
    let expected: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(corpus.join("expected.json")).unwrap())
            .unwrap();
    let mut by_inputs: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
    for (file, want) in &expected {
        let model = want["model"].as_str().unwrap();
        let plan = corpus.join(format!("plans/{model}_mixed.json"));
        let input = corpus.join(file);
        let out = sandbox.path(&format!("mixed-{file}"));
        run([
            input.as_os_str(),
            out.as_os_str(),
            "--plan".as_ref(),
            plan.as_os_str(),
        ])
        .assert_ok();
        let pairs = by_inputs
            .entry(want["inputs"].as_str().unwrap().to_string())
            .or_default();
        pairs.push(input);
        pairs.push(out);
    }
    for (inputs, pairs) in by_inputs {
        check_models_with(&corpus.join(inputs), "--no-compare", &pairs);
    }
}

/// Bias compensation adds a constant in the stream's element type also
/// where an earlier compensation made the stream (neighbouring removals:
/// that value has no declared type), so a float16 model still loads.
#[test]
fn compensated_neighbouring_removals_keep_the_stream_type() {
    let sandbox = util::Sandbox::new();
    let corpus = util::fixtures().join("defaults");
    let calib = corpus.join("inputs/clip.npz");
    let plan = sandbox.write(
        "neighbours.json",
        r#"{"format": "onnx-idprune-plan", "version": 1, "blocks": [
            {"tower": "text", "index": 0, "drop_mlp": true},
            {"tower": "text", "index": 1, "drop_attention": true},
            {"tower": "vision", "index": 0, "drop_mlp": true},
            {"tower": "vision", "index": 1, "drop": true}],
           "repair": {"method": "bias", "samples": 12}}"#,
    );
    let mut pairs = Vec::new();
    for file in ["clip_ts_op17_fp16.onnx", "clip_ts_op17.onnx"] {
        let input = corpus.join(file);
        let out = sandbox.path(&format!("compensated-{file}"));
        run([
            input.as_os_str(),
            out.as_os_str(),
            "--plan".as_ref(),
            plan.as_os_str(),
            "--calib".as_ref(),
            calib.as_os_str(),
        ])
        .assert_ok();
        pairs.push(input);
        pairs.push(out);
    }
    check_models_with(&calib, "--no-compare", &pairs);
}

#[test]
fn decided_models_of_every_mode_pass_onnx_checker_and_onnxruntime() {
    let sandbox = util::Sandbox::new();
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let mut pairs = Vec::new();
    for form in [
        "clip_tiny_torchscript_op17.onnx",
        "clip_tiny_dynamo_op18.onnx",
        "clip_tiny_ort_fused.onnx",
    ] {
        for (tag, flags) in [
            (
                "all",
                &["--mode", "all", "--keep-params", "0.7", "--repair", "lsq"][..],
            ),
            (
                "units",
                &["--mode", "units", "--keep-params", "0.6", "--repair", "lsq"][..],
            ),
            (
                "unstructured",
                &["--mode", "unstructured", "--sparsity", "0.5"][..],
            ),
        ] {
            let model = util::fixtures().join(form);
            let out = sandbox.path(&format!("{tag}-{form}"));
            let mut args: Vec<std::ffi::OsString> = vec![
                model.clone().into(),
                out.clone().into(),
                "--calib".into(),
                calib.clone().into(),
                "--samples".into(),
                "32".into(),
            ];
            args.extend(flags.iter().map(std::ffi::OsString::from));
            run(args).assert_ok();
            pairs.push(model);
            pairs.push(out);
        }
    }
    check_models("--no-compare", &pairs);
}

#[test]
fn images_and_captions_become_what_hugging_face_makes_of_them() {
    let sandbox = util::Sandbox::new();
    let pairs = util::fixtures().join("pairs");
    let out = sandbox.path("pairs.npz");
    run([
        "calib".as_ref(),
        util::fixtures()
            .join("clip_tiny_torchscript_op17.onnx")
            .as_os_str(),
        "--images".as_ref(),
        pairs.join("images").as_os_str(),
        "--texts".as_ref(),
        pairs.join("captions.txt").as_os_str(),
        "--tokenizer".as_ref(),
        pairs.join("tokenizer.json").as_os_str(),
        "--preprocessor".as_ref(),
        pairs.join("preprocessor_config.json").as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ])
    .assert_ok();
    let script = util::fixtures().join("../tests/scripts/check_pairs.py");
    let output = Command::new(python())
        .arg(script)
        .arg(&out)
        .arg(&pairs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("pairs: ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What a fixture's evaluation script (`fixtures/SCRIPT TARGET --json`,
/// onnxruntime) prints for `target`.
fn evaluate(script: &str, target: &std::path::Path) -> serde_json::Value {
    let output = Command::new(python())
        .arg(util::fixtures().join(script))
        .arg(target)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Zero-shot top-1 of a model on the trained fixture's evaluation set
/// (fixtures/trained/eval.py).
fn zero_shot_top1(model: &std::path::Path) -> f64 {
    evaluate("trained/eval.py", model)["top1"].as_f64().unwrap()
}

#[test]
fn the_trained_clip_keeps_its_accuracy_at_half_its_block_parameters() {
    // The default mode (closed-loop search over sub-blocks, heads and
    // neurons, least-squares refit plus bias compensation) on the trained
    // fixture the defaults were tuned on; the held-out trained fixtures
    // are measured in benches/study.py, not asserted here.
    let sandbox = util::Sandbox::new();
    let model = util::fixtures().join("trained/clip_trained.onnx");
    let calib = util::fixtures().join("trained/calib.npz");
    let base = zero_shot_top1(&model);
    assert!(base > 0.985, "the fixture itself: {base}");
    let out = sandbox.path("pruned.onnx");
    let report = sandbox.path("report.json");
    run([
        model.as_os_str(),
        out.as_os_str(),
        "--calib".as_ref(),
        calib.as_os_str(),
        "--keep-params".as_ref(),
        "0.5".as_ref(),
        "--report".as_ref(),
        report.as_os_str(),
    ])
    .assert_ok();
    let top1 = zero_shot_top1(&out);
    assert!(
        top1 >= 0.97 * base,
        "top-1 after keeping half: {top1} (unpruned {base})"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let p = &json["params"];
    assert!(p["blocks_kept"].as_f64().unwrap() <= 0.5);
    // Neither tower is spent below its floor, however the search split it.
    for tower in ["vision", "text"] {
        let kept = p["towers_after"][tower].as_f64().unwrap()
            / p["towers_before"][tower].as_f64().unwrap();
        assert!(
            kept >= onnx_idprune::decide::budget::MIN_TOWER_KEEP,
            "{tower} kept {kept}"
        );
    }
    // More than one allocation was judged, and the chosen one is reported.
    let trials = json["trials"].as_array().unwrap();
    assert!(trials.len() > 5);
    assert_eq!(trials.iter().filter(|t| t["chosen"] == true).count(), 1);
    // The file shrinks with the parameters.
    let before = std::fs::metadata(&model).unwrap().len() as f64;
    let after = std::fs::metadata(&out).unwrap().len() as f64;
    assert!(after < 0.7 * before, "{after} vs {before}");
}

/// Prunes `folder` with `calib` and has tests/scripts/check_folder.py check
/// the written files against the originals, chained as deployed.
fn check_pruned_folder(
    folder: &std::path::Path,
    calib: &std::path::Path,
    files: &str,
    extra: &[&str],
) {
    let sandbox = Sandbox::new();
    let out = sandbox.path("pruned");
    let mut args: Vec<std::ffi::OsString> = vec![
        folder.into(),
        out.clone().into(),
        "--calib".into(),
        calib.into(),
        "--keep-params".into(),
        "0.6".into(),
    ];
    args.extend(extra.iter().map(std::ffi::OsString::from));
    run(args).assert_ok();
    let args: Vec<std::ffi::OsString> = vec![
        folder.into(),
        out.into(),
        "--calib".into(),
        calib.into(),
        "--files".into(),
        files.into(),
    ];
    run_check("check_folder.py", &args, files.split(',').count());
}

#[test]
fn pruned_folders_pass_onnx_checker_and_run_chained_in_onnxruntime() {
    let sandbox = Sandbox::new();
    // BLIP captioning: the vision encoder's output feeds the decoder.
    let blip = sandbox.path("blip/onnx");
    std::fs::create_dir_all(&blip).unwrap();
    let defaults = util::fixtures().join("defaults");
    std::fs::copy(
        defaults.join("blip_cap_vision_ts_op17.onnx"),
        blip.join("vision_model.onnx"),
    )
    .unwrap();
    std::fs::copy(
        defaults.join("blip_cap_decoder_ts_op17.onnx"),
        blip.join("text_decoder.onnx"),
    )
    .unwrap();
    check_pruned_folder(
        blip.parent().unwrap(),
        &defaults.join("inputs/blip_itm.npz"),
        "onnx/vision_model.onnx,onnx/text_decoder.onnx",
        &["--samples", "12", "--holdout", "4"],
    );
    // A CLIP split into its towers.
    let clip = sandbox.path("clip");
    std::fs::create_dir_all(&clip).unwrap();
    for (from, to) in [
        (
            "clip_tiny_vision_torchscript_op17.onnx",
            "vision_model.onnx",
        ),
        ("clip_tiny_text_torchscript_op17.onnx", "text_model.onnx"),
    ] {
        std::fs::copy(util::fixtures().join(from), clip.join(to)).unwrap();
    }
    check_pruned_folder(
        &clip,
        &util::fixtures().join("calib/clip_tiny_calib.npz"),
        "vision_model.onnx,text_model.onnx",
        &[],
    );
}

/// Caption accuracy of a captioner folder (fixtures/trained_captioner/eval.py).
fn caption_accuracy(folder: &std::path::Path) -> serde_json::Value {
    evaluate("trained_captioner/eval.py", folder)
}

#[test]
fn the_trained_captioner_keeps_its_captions_when_pruned_as_a_folder() {
    // Vision encoder and text decoder, two files, one decision (the default
    // mode); accuracy on eval images no decision saw.
    let sandbox = util::Sandbox::new();
    let folder = util::fixtures().join("trained_captioner/model");
    let calib = util::fixtures().join("trained_captioner/calib.npz");
    let base = caption_accuracy(&folder)["all_three"].as_f64().unwrap();
    assert!(base > 0.99, "the fixture itself: {base}");
    let out = sandbox.path("pruned");
    let report = sandbox.path("report.json");
    run([
        folder.as_os_str(),
        out.as_os_str(),
        "--calib".as_ref(),
        calib.as_os_str(),
        "--keep-params".as_ref(),
        "0.6".as_ref(),
        "--report".as_ref(),
        report.as_os_str(),
    ])
    .assert_ok();
    let pruned = caption_accuracy(&out)["all_three"].as_f64().unwrap();
    assert!(
        pruned >= 0.97 * base,
        "captions right in all three attributes after keeping 60%: {pruned} (unpruned {base})"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let p = &json["params"];
    assert!(p["blocks_kept"].as_f64().unwrap() <= 0.6, "{p}");
    let kept = |tower: &str| {
        p["towers_after"][tower].as_f64().unwrap() / p["towers_before"][tower].as_f64().unwrap()
    };
    assert!(
        kept("vision") < 1.0 && kept("text") < 1.0,
        "both towers pruned: {p}"
    );
    let fidelity = &json["fidelity"];
    assert!(
        fidelity["next_token_agreement"].as_f64().unwrap() > 0.9,
        "{fidelity}"
    );
}

/// Decoders pruned by a plan and by the main job pass `onnx.checker`, keep
/// their interface but for removed or narrowed cache entries, and generate
/// greedily with their cache exactly as without it (check_decoders.py).
#[test]
fn pruned_decoders_generate_with_their_cache_as_without_it() {
    let sandbox = Sandbox::new();
    let corpus = util::fixtures().join("decoders");
    let mut args: Vec<std::ffi::OsString> =
        vec!["--calib".into(), corpus.join("inputs/llama.npz").into()];
    let mut pairs = 0;
    for family in ["llama", "qwen2", "gemma"] {
        let forms = ["", "_cache", "_ts", "_ts_cache", "_merged", "_genai"];
        for file in forms.map(|form| format!("{family}{form}.onnx")) {
            let model = corpus.join(&file);
            let planned = sandbox.path(&format!("mixed-{file}"));
            util::run_plan(
                &model,
                &planned,
                &corpus.join(format!("plans/{family}_mixed.json")),
                &[],
            )
            .assert_ok();
            let auto = sandbox.path(&format!("auto-{file}"));
            run([
                model.as_os_str(),
                auto.as_os_str(),
                "--calib".as_ref(),
                corpus.join(format!("inputs/{family}.npz")).as_os_str(),
                "--keep-params".as_ref(),
                "0.6".as_ref(),
            ])
            .assert_ok();
            for out in [planned, auto] {
                args.push(model.clone().into());
                args.push(out.into());
                pairs += 1;
            }
        }
    }
    run_check("check_decoders.py", &args, pairs);
}

/// The LLaVA-style folder pruned by a plan over both towers equals the
/// PyTorch LLaVA pruned the same way, its three files chained as
/// transformers.js chains them; pruned by the main job, it generates with
/// its cache exactly as without it (check_llava.py).
#[test]
fn the_pruned_llava_folder_matches_pytorch_and_generates_with_its_cache_as_without_it() {
    let sandbox = Sandbox::new();
    let corpus = util::fixtures().join("llava");
    let model = corpus.join("model");
    let calib = corpus.join("inputs/llava.npz");
    let planned = sandbox.path("planned");
    util::run_plan(
        &model,
        &planned,
        &corpus.join("plans/llava_mixed.json"),
        &[],
    )
    .assert_ok();
    let args: Vec<std::ffi::OsString> = vec![
        "--calib".into(),
        calib.clone().into(),
        "--reference".into(),
        corpus.join("reference/llava_mixed.npz").into(),
        model.clone().into(),
        planned.into(),
    ];
    run_check("check_llava.py", &args, 3);
    let decided = sandbox.path("decided");
    run([
        model.as_os_str(),
        decided.as_os_str(),
        "--calib".as_ref(),
        calib.as_os_str(),
        "--keep-params".as_ref(),
        "0.6".as_ref(),
    ])
    .assert_ok();
    let args: Vec<std::ffi::OsString> =
        vec!["--calib".into(), calib.into(), model.into(), decided.into()];
    run_check("check_llava.py", &args, 2);
}
