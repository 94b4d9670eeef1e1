//! The main job: `IN OUT --calib c.npz --keep-params F` — decisions from
//! calibration, the fidelity gate, the report, determinism.

mod util;

use serde_json::Value;
use util::{Sandbox, assert_no_output, run};

const CLIP: &str = "clip_tiny_torchscript_op17.onnx";

fn prune(sandbox: &Sandbox, model: &str, out: &str, extra: &[&str]) -> util::Run {
    let model = util::fixtures().join(model);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let mut args: Vec<std::ffi::OsString> = vec![
        model.into(),
        sandbox.path(out).into(),
        "--calib".into(),
        calib.into(),
    ];
    args.extend(extra.iter().map(|s| std::ffi::OsString::from(*s)));
    run(args)
}

#[test]
fn prunes_to_the_budget_with_a_report() {
    let sandbox = Sandbox::new();
    let report = sandbox.path("report.json");
    let result = prune(
        &sandbox,
        CLIP,
        "out.onnx",
        &[
            "--mode",
            "blocks",
            "--keep-params",
            "0.75",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert!(
        result.stderr.contains("held-out cosine"),
        "{}",
        result.stderr
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let kept = json["params"]["blocks_kept"].as_f64().unwrap();
    assert!(kept <= 0.75 && kept > 0.4, "kept {kept}");
    // 5 blocks × 2 sub-blocks, each measured.
    let candidates = json["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 10);
    for c in candidates {
        assert!(
            c["id"].as_f64().unwrap() > 0.0 && c["influence"].as_f64().unwrap().is_finite(),
            "{c}"
        );
        assert!(
            (c["score"].as_f64().unwrap()
                - c["id"].as_f64().unwrap() * c["influence"].as_f64().unwrap())
            .abs()
                < 1e-9
        );
    }
    // The plan is exactly the removed sub-blocks (a block losing both is dropped whole).
    let removed = candidates.iter().filter(|c| c["removed"] == true).count();
    assert!(removed > 0);
    let actions: usize = json["plan"]["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| if b["drop"] == true { 2 } else { 1 })
        .sum();
    assert_eq!(actions, removed);
    let fidelity = &json["fidelity"];
    assert_eq!(fidelity["samples"], 16, "a quarter of 64 held out");
    assert!(fidelity["min_cosine"].as_f64().unwrap() > 0.0);
    assert!(fidelity["top1_agreement"].as_f64().is_some());
    assert_eq!(json["provider"], "cpu");
    assert!(json["bytes"][1].as_u64().unwrap() < json["bytes"][0].as_u64().unwrap());
    let md = std::fs::read_to_string(sandbox.path("report.md")).unwrap();
    assert!(md.contains("| block parameters |") && md.contains("## Sub-blocks"));
    let svg = std::fs::read_to_string(sandbox.path("report.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("removed"));
}

#[test]
fn deterministic_and_the_plan_re_applies_byte_for_byte() {
    let sandbox = Sandbox::new();
    let mut outputs = Vec::new();
    for i in 0..2 {
        let plan = sandbox.path(&format!("plan{i}.json"));
        let result = prune(
            &sandbox,
            CLIP,
            &format!("out{i}.onnx"),
            &["--keep-params", "0.6", "--plan-out", plan.to_str().unwrap()],
        );
        assert_eq!(result.code, 0, "{}", result.stderr);
        outputs.push((
            std::fs::read(sandbox.path(&format!("out{i}.onnx"))).unwrap(),
            std::fs::read(plan).unwrap(),
        ));
    }
    assert!(
        outputs[0] == outputs[1],
        "same input and flags must give identical bytes"
    );
    // The default repair refits on calibration data: the plan re-applies
    // with the same file. (The decided run's repair statistics come out of
    // its measuring pass, the re-applied plan's from a pass of their own
    // over the same samples: the two must agree to the bit.)
    let again = sandbox.path("again.onnx");
    let model = util::fixtures().join(CLIP);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    run([
        model.as_os_str(),
        again.as_os_str(),
        "--plan".as_ref(),
        sandbox.path("plan0.json").as_os_str(),
        "--calib".as_ref(),
        calib.as_os_str(),
    ])
    .assert_ok();
    assert!(std::fs::read(again).unwrap() == outputs[0].0);
}

#[test]
fn the_fidelity_gate_exits_3_and_writes_nothing() {
    let sandbox = Sandbox::new();
    let before = sandbox.listing();
    let result = prune(
        &sandbox,
        CLIP,
        "out.onnx",
        &["--keep-params", "0.5", "--min-fidelity", "0.99999"],
    );
    result.assert_error(3, "fidelity gate not met");
    assert_no_output(&sandbox, &sandbox.path("out.onnx"), &before);
    let result = prune(
        &sandbox,
        CLIP,
        "ok.onnx",
        &["--keep-params", "0.9", "--min-fidelity", "0.0"],
    );
    assert_eq!(result.code, 0, "{}", result.stderr);
}

#[test]
fn works_on_other_export_forms() {
    let sandbox = Sandbox::new();
    for model in [
        "clip_tiny_ort_fused.onnx",
        "clip_tiny_dynamo_op18.onnx",
        "blip_itm_tiny_torchscript_op17.onnx",
    ] {
        let result = prune(
            &sandbox,
            model,
            &format!("p-{model}"),
            &["--keep-params", "0.7", "--samples", "32"],
        );
        assert_eq!(result.code, 0, "{model}: {}", result.stderr);
    }
}

#[test]
fn usage_mistakes_are_explained() {
    let sandbox = Sandbox::new();
    prune(&sandbox, CLIP, "out.onnx", &[]).assert_error(1, "--calib needs --keep-params");
    let unknown_mode = prune(
        &sandbox,
        CLIP,
        "out.onnx",
        &["--keep-params", "0.7", "--mode", "pruned"],
    );
    assert_eq!(unknown_mode.code, 2, "{}", unknown_mode.stderr);
    assert!(!sandbox.path("out.onnx").exists());
    let model = util::fixtures().join(CLIP);
    let out = sandbox.path("x.onnx");
    assert_eq!(
        run([
            model.as_os_str(),
            out.as_os_str(),
            "--keep-params".as_ref(),
            "0.5".as_ref()
        ])
        .code,
        2
    );
    run([model.as_os_str(), out.as_os_str()]).assert_error(1, "give --plan FILE, or --calib");
    prune(&sandbox, CLIP, "out.onnx", &["--sparsity", "0.5"])
        .assert_error(1, "--sparsity is for --mode unstructured");
    prune(
        &sandbox,
        CLIP,
        "out.onnx",
        &[
            "--keep-params",
            "0.7",
            "--vision-keep",
            "0.8",
            "--text-keep",
            "0.6",
        ],
    )
    .assert_error(1, "not all three");
    prune(
        &sandbox,
        CLIP,
        "out.onnx",
        &[
            "--mode",
            "unstructured",
            "--sparsity",
            "0.5",
            "--text-keep",
            "0.5",
        ],
    )
    .assert_error(1, "do not apply");
    for flag in ["--repair", "--sensitivity"] {
        let mut extra = vec!["--mode", "unstructured", "--keep-params", "0.7", flag];
        if flag == "--repair" {
            extra.push("bias");
        }
        prune(&sandbox, CLIP, "out.onnx", &extra).assert_error(1, "--mode unstructured");
    }
    assert!(!sandbox.path("out.onnx").exists());
    let out_of_range = prune(
        &sandbox,
        CLIP,
        "out.onnx",
        &["--mode", "unstructured", "--sparsity", "1"],
    );
    assert_eq!(out_of_range.code, 2, "{}", out_of_range.stderr);
    assert!(!sandbox.path("out.onnx").exists());
}

fn report(sandbox: &Sandbox, name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(sandbox.path(name)).unwrap()).unwrap()
}

#[test]
fn tower_overrides_bound_each_tower() {
    let sandbox = Sandbox::new();
    prune(
        &sandbox,
        CLIP,
        "a.onnx",
        &[
            "--vision-keep",
            "1",
            "--text-keep",
            "0.5",
            "--report",
            sandbox.path("a.json").to_str().unwrap(),
        ],
    )
    .assert_ok();
    let json = report(&sandbox, "a.json");
    let (before, after) = (
        &json["params"]["towers_before"],
        &json["params"]["towers_after"],
    );
    assert_eq!(before["vision"], after["vision"], "vision kept whole");
    let text = after["text"].as_f64().unwrap() / before["text"].as_f64().unwrap();
    assert!(text <= 0.5, "text kept {text}");
    assert!(
        json["plan"]["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["tower"] == "text"),
        "{}",
        json["plan"]
    );
    // The symmetric variant: the same fraction in each tower.
    prune(
        &sandbox,
        CLIP,
        "b.onnx",
        &[
            "--mode",
            "units",
            "--vision-keep",
            "0.7",
            "--text-keep",
            "0.7",
            "--report",
            sandbox.path("b.json").to_str().unwrap(),
        ],
    )
    .assert_ok();
    let json = report(&sandbox, "b.json");
    for tower in ["vision", "text"] {
        let kept = json["params"]["towers_after"][tower].as_f64().unwrap()
            / json["params"]["towers_before"][tower].as_f64().unwrap();
        assert!(kept <= 0.7 && kept > 0.5, "{tower} kept {kept}");
    }
    assert_eq!(json["tower_keep"]["vision"], 0.7);
}

#[test]
fn unstructured_zeroes_the_requested_share_of_weights() {
    let sandbox = Sandbox::new();
    let plan = sandbox.path("plan.json");
    prune(
        &sandbox,
        CLIP,
        "u.onnx",
        &[
            "--mode",
            "unstructured",
            "--sparsity",
            "0.4",
            "--plan-out",
            plan.to_str().unwrap(),
            "--report",
            sandbox.path("u.json").to_str().unwrap(),
        ],
    )
    .assert_ok();
    let json = report(&sandbox, "u.json");
    let masks = json["masks"].as_array().unwrap();
    // 5 blocks × (q, k, v, out, fc1, fc2).
    assert_eq!(masks.len(), 30);
    let zeroed: f64 = masks.iter().map(|m| m["zeroed"].as_f64().unwrap()).sum();
    let total: f64 = masks.iter().map(|m| m["total"].as_f64().unwrap()).sum();
    assert!(
        (zeroed / total - 0.4).abs() < 0.002,
        "zeroed {zeroed} of {total}"
    );
    // One global quantile: threshold × ID is the same for every layer.
    let tau: Vec<f64> = masks
        .iter()
        .map(|m| m["threshold"].as_f64().unwrap() * m["id"].as_f64().unwrap())
        .collect();
    assert!(
        tau.iter().all(|t| (t / tau[0] - 1.0).abs() < 1e-9),
        "{tau:?}"
    );
    // Higher-ID layers lose fewer weights: thresholds fall as ID rises.
    let mut by_id: Vec<(f64, f64)> = masks
        .iter()
        .map(|m| (m["id"].as_f64().unwrap(), m["threshold"].as_f64().unwrap()))
        .collect();
    by_id.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(by_id.windows(2).all(|w| w[0].1 >= w[1].1));
    // Nothing is removed: same block parameter count; the plan re-applies exactly.
    assert_eq!(
        json["params"]["blocks_before"],
        json["params"]["blocks_after"]
    );
    let model = util::fixtures().join(CLIP);
    let again = sandbox.path("again.onnx");
    run([
        model.as_os_str(),
        again.as_os_str(),
        "--plan".as_ref(),
        plan.as_os_str(),
    ])
    .assert_ok();
    assert!(std::fs::read(again).unwrap() == std::fs::read(sandbox.path("u.onnx")).unwrap());
    // --keep-params F means sparsity 1 − F.
    prune(
        &sandbox,
        CLIP,
        "k.onnx",
        &[
            "--mode",
            "unstructured",
            "--keep-params",
            "0.6",
            "--plan-out",
            sandbox.path("k.json").to_str().unwrap(),
        ],
    )
    .assert_ok();
    assert_eq!(
        std::fs::read(sandbox.path("k.json")).unwrap(),
        std::fs::read(&plan).unwrap()
    );
}

#[test]
fn all_mode_picks_the_best_split_on_decision_samples() {
    let sandbox = Sandbox::new();
    prune(
        &sandbox,
        CLIP,
        "all.onnx",
        &[
            "--mode",
            "all",
            "--keep-params",
            "0.7",
            "--report",
            sandbox.path("all.json").to_str().unwrap(),
        ],
    )
    .assert_ok();
    let json = report(&sandbox, "all.json");
    let trials = json["trials"].as_array().unwrap();
    // Every sub-block share under the global threshold (both unit orders
    // where units are taken), then the tower splits of the best.
    assert!(trials.len() >= 5, "{} trials", trials.len());
    let shares: Vec<f64> = trials
        .iter()
        .filter_map(|t| t["sub_block_share"].as_f64())
        .collect();
    for share in [0.0, 0.25, 0.5, 0.75, 1.0] {
        assert!(shares.contains(&share), "share {share} not tried");
    }
    let chosen: Vec<&Value> = trials.iter().filter(|t| t["chosen"] == true).collect();
    assert_eq!(chosen.len(), 1);
    // Task agreement first, cosine among equals: nothing tried beats the
    // chosen allocation on both. Except where the original's top-1 picks
    // are concentrated on a few texts (this untrained fixture ranks the
    // same text first for most images): there the cosine alone ranks.
    let spread = chosen[0]["top1_spread"].as_f64().unwrap();
    let informative = spread >= 0.5;
    let key = |t: &Value| {
        (
            if informative {
                t["top1_agreement"].as_f64().unwrap()
            } else {
                0.0
            },
            t["min_cosine"].as_f64().unwrap(),
        )
    };
    let best = key(chosen[0]);
    for t in trials {
        let k = key(t);
        assert!(
            k.0 < best.0 || (k.0 == best.0 && k.1 <= best.1),
            "{k:?} beats the chosen {best:?}"
        );
    }
    let md = std::fs::read_to_string(sandbox.path("all.md")).unwrap();
    assert_eq!(
        md.contains("too few for the agreement to mean much"),
        !informative,
        "{md}"
    );
    let kept = json["params"]["blocks_kept"].as_f64().unwrap();
    assert!(kept <= 0.7 && kept > 0.55, "kept {kept}");
}

#[test]
fn the_multi_pass_path_makes_the_same_decisions() {
    let sandbox = Sandbox::new();
    let one = sandbox.path("one.json");
    let many = sandbox.path("many.json");
    prune(
        &sandbox,
        CLIP,
        "a.onnx",
        &["--keep-params", "0.7", "--plan-out", one.to_str().unwrap()],
    )
    .assert_ok();
    prune(
        &sandbox,
        CLIP,
        "b.onnx",
        &[
            "--keep-params",
            "0.7",
            "--max-memory",
            "100K",
            "--plan-out",
            many.to_str().unwrap(),
        ],
    )
    .assert_ok();
    assert_eq!(std::fs::read(one).unwrap(), std::fs::read(many).unwrap());
    assert!(
        std::fs::read(sandbox.path("a.onnx")).unwrap()
            == std::fs::read(sandbox.path("b.onnx")).unwrap()
    );
}

#[test]
fn units_mode_prunes_heads_and_neurons_in_hardware_friendly_widths() {
    let sandbox = Sandbox::new();
    let report = sandbox.path("units.json");
    let plan = sandbox.path("units-plan.json");
    for model in [
        CLIP,
        "clip_tiny_ort_fused.onnx",
        "blip_itm_tiny_dynamo_op18.onnx",
    ] {
        let out = format!("u-{model}");
        let result = prune(
            &sandbox,
            model,
            &out,
            &[
                "--keep-params",
                "0.75",
                "--mode",
                "units",
                "--report",
                report.to_str().unwrap(),
                "--plan-out",
                plan.to_str().unwrap(),
            ],
        );
        assert_eq!(result.code, 0, "{model}: {}", result.stderr);
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let blocks = json["plan"]["blocks"].as_array().unwrap();
        assert!(!blocks.is_empty(), "{model}: nothing pruned");
        for b in blocks {
            assert!(
                b.get("drop").is_none()
                    && b.get("drop_attention").is_none()
                    && b.get("drop_mlp").is_none(),
                "{b}"
            );
            if let Some(kept) = b["keep_mlp"].as_array() {
                assert!(
                    kept.len() % 8 == 0 && !kept.is_empty(),
                    "{model}: {} neurons kept",
                    kept.len()
                );
            }
            if let Some(kept) = b["keep_heads"].as_array() {
                assert!(!kept.is_empty());
            }
        }
        // Widths round down to multiples of 8: the budget holds.
        let kept = json["params"]["blocks_kept"].as_f64().unwrap();
        assert!(kept <= 0.75, "{model}: kept {kept}");
        // The recorded plan (with its least-squares repair, the default)
        // reproduces the output from the same calibration file.
        let again = sandbox.path(&format!("again-{model}"));
        let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
        util::run_plan(
            &util::fixtures().join(model),
            &again,
            &plan,
            &["--calib", calib.to_str().unwrap()],
        )
        .assert_ok();
        assert!(
            std::fs::read(again).unwrap() == std::fs::read(sandbox.path(&out)).unwrap(),
            "{model}"
        );
    }
}

#[test]
fn least_squares_repair_brings_the_slimmed_model_closer() {
    let sandbox = Sandbox::new();
    let mut cosines = Vec::new();
    for repair in ["none", "lsq"] {
        let json = format!("{repair}.json");
        let plan = format!("{repair}.plan.json");
        prune(
            &sandbox,
            CLIP,
            &format!("{repair}.onnx"),
            &[
                "--mode",
                "units",
                "--keep-params",
                "0.7",
                "--repair",
                repair,
                "--report",
                sandbox.path(&json).to_str().unwrap(),
                "--plan-out",
                sandbox.path(&plan).to_str().unwrap(),
            ],
        )
        .assert_ok();
        cosines.push(
            report(&sandbox, &json)["fidelity"]["min_cosine"]
                .as_f64()
                .unwrap(),
        );
    }
    assert!(
        cosines[1] > cosines[0],
        "held-out cosine without/with repair: {cosines:?}"
    );
    let json = report(&sandbox, "lsq.json");
    let refits = json["refits"].as_array().unwrap();
    assert!(!refits.is_empty());
    for r in refits {
        let (dropped, refit) = (
            r["error_dropped"].as_f64().unwrap(),
            r["error_refit"].as_f64().unwrap(),
        );
        assert!(refit <= dropped && refit >= 0.0, "{r}");
    }
    assert!(
        refits
            .iter()
            .any(|r| r["error_refit"].as_f64() < r["error_dropped"].as_f64())
    );
    // Same decisions either way: repair only changes the kept weights.
    let strip = |p: &str| {
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(sandbox.path(p)).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("repair");
        v
    };
    assert_eq!(strip("lsq.plan.json"), strip("none.plan.json"));
    // The plan re-applies byte for byte with the same calibration file, and
    // asks for it otherwise.
    let model = util::fixtures().join(CLIP);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let again = sandbox.path("again.onnx");
    let plan = sandbox.path("lsq.plan.json");
    run([
        model.as_os_str(),
        again.as_os_str(),
        "--plan".as_ref(),
        plan.as_os_str(),
        "--calib".as_ref(),
        calib.as_os_str(),
    ])
    .assert_ok();
    assert!(std::fs::read(&again).unwrap() == std::fs::read(sandbox.path("lsq.onnx")).unwrap());
    let before = sandbox.listing();
    run([
        model.as_os_str(),
        sandbox.path("x.onnx").as_os_str(),
        "--plan".as_ref(),
        plan.as_os_str(),
    ])
    .assert_error(1, "give the same --calib file");
    assert_no_output(&sandbox, &sandbox.path("x.onnx"), &before);
}

#[test]
fn the_judged_statistics_repair_the_chosen_plan_as_a_fresh_pass_does() {
    // The default mode judges candidate plans with repair and keeps the
    // activation statistics it gathered for the final repair (refits and
    // mean-output compensation) instead of reading the model again. The
    // recorded plan, re-applied from the same file in a fresh run, must give
    // the same bytes.
    let sandbox = Sandbox::new();
    let plan = sandbox.path("plan.json");
    prune(
        &sandbox,
        CLIP,
        "out.onnx",
        &["--keep-params", "0.6", "--plan-out", plan.to_str().unwrap()],
    )
    .assert_ok();
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert!(
        recorded["repair"].is_object(),
        "the default plan records its repair: {recorded}"
    );
    let again = sandbox.path("again.onnx");
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    util::run_plan(
        &util::fixtures().join(CLIP),
        &again,
        &plan,
        &["--calib", calib.to_str().unwrap()],
    )
    .assert_ok();
    assert!(std::fs::read(&again).unwrap() == std::fs::read(sandbox.path("out.onnx")).unwrap());
}
