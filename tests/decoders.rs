//! Decoder language models (`fixtures/decoders/`, made by
//! `fixtures/decoders/generate.py`: tiny Llama-, Qwen2- and Gemma-style
//! causal LMs with transformers' default SDPA attention, exported by the
//! torch exporter's defaults and by TorchScript as optimum exports them,
//! with and without a key/value cache, merged, and by onnxruntime-genai's
//! model builder: GroupQueryAttention, SkipSimplifiedLayerNormalization).
//!
//! Expectations come from the PyTorch models: `expected.json` holds each
//! file's layers as the source modules have them (heads, key/value heads,
//! head width, MLP width, gated, RMS norm, cache, parameters);
//! `reference/<family>_<plan>[_cache].npz` the outputs of the PyTorch model
//! pruned as the plan says, with the presents of the layers that keep their
//! attention sliced to the kept key/value heads.
//! See: issue 17.

mod util;

use std::path::PathBuf;

use onnx_idprune::calib::Array;
use serde_json::Value;
use util::{Sandbox, inputs, outputs_of, read_outputs, relative_error, run};

fn corpus() -> PathBuf {
    util::fixtures().join("decoders")
}

fn expected() -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(corpus().join("expected.json")).unwrap();
    let json: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    let files: Vec<(String, Value)> = json.into_iter().collect();
    assert_eq!(
        files.len(),
        18,
        "three families, with and without a cache, by both exporters, merged, and by onnxruntime-genai's builder"
    );
    files
}

const BLOCK_KEYS: &[&str] = &[
    "index",
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "gated",
    "norm",
    "norm_kind",
    "cross_attention",
    "cache",
    "params",
];

fn blocks(v: &Value) -> Vec<(String, Vec<Value>)> {
    util::towers(&v["towers"], BLOCK_KEYS)
}

#[test]
fn inspect_is_exact_on_every_decoder() {
    let mut failures = Vec::new();
    for (file, want) in expected() {
        let path = corpus().join(&file);
        let result = run(["inspect".as_ref(), path.as_os_str(), "--json".as_ref()]);
        if result.code != 0 {
            failures.push(format!("{file}: {}", result.stderr.trim()));
            continue;
        }
        let got: Value = serde_json::from_str(&result.stdout).unwrap();
        if blocks(&got) != blocks(&want) {
            failures.push(format!(
                "{file}:\n  got  {}\n  want {}",
                serde_json::to_value(blocks(&got)).unwrap(),
                serde_json::to_value(blocks(&want)).unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn plans_match_pytorch_on_every_decoder_with_and_without_cache() {
    let sandbox = Sandbox::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (file, want) in expected() {
        let family = want["family"].as_str().unwrap();
        let cached = want["cache"].as_bool().unwrap();
        let path = corpus().join(&file);
        // Two teacher-forced prompts; a cache file gets empty pasts.
        let calib = corpus().join(want["inputs"].as_str().unwrap());
        for plan in want["plans"].as_array().unwrap() {
            let plan = plan.as_str().unwrap();
            let label = format!("{file} with {plan}");
            let plan_path = corpus().join(format!("plans/{family}_{plan}.json"));
            let suffix = if cached { "_cache" } else { "" };
            let reference = corpus().join(format!("reference/{family}_{plan}{suffix}.npz"));
            let out = sandbox.path(&format!("{file}.{plan}.onnx"));
            let result = run([
                path.as_os_str(),
                out.as_os_str(),
                "--plan".as_ref(),
                plan_path.as_os_str(),
            ]);
            if result.code != 0 {
                failures.push(format!("{label}: {}", result.stderr.trim()));
                continue;
            }
            // Read for the pruned file: its cache inputs (empty pasts) are
            // fewer and narrower. A merged decoder runs both branches.
            let feed = inputs(&out, &calib, 2);
            let flags: &[Option<bool>] = if file.contains("merged") {
                &[Some(false), Some(true)]
            } else {
                &[None]
            };
            for flag in flags {
                let mut feed = feed.clone();
                if let Some(flag) = flag {
                    feed.insert(
                        "use_cache_branch".into(),
                        Array::Bool(ndarray::arr1(&[*flag]).into_dyn()),
                    );
                }
                let got = outputs_of(&out, &feed);
                checked += compare(
                    &format!("{label} ({flag:?})"),
                    got,
                    &reference,
                    &mut failures,
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 60, "only {checked} outputs compared");
}

/// Compares `got` with the PyTorch reference; the number of outputs
/// compared.
fn compare(
    label: &str,
    mut got_outputs: Vec<(String, ndarray::ArrayD<f32>)>,
    reference: &std::path::Path,
    failures: &mut Vec<String>,
) -> usize {
    let mut want_outputs = read_outputs(reference);
    want_outputs.sort_by(|a, b| a.0.cmp(&b.0));
    got_outputs.sort_by(|a, b| a.0.cmp(&b.0));
    let names = |v: &[(String, ndarray::ArrayD<f32>)]| -> Vec<String> {
        v.iter().map(|(n, _)| n.clone()).collect()
    };
    if names(&got_outputs) != names(&want_outputs) {
        failures.push(format!(
            "{label}: outputs {:?}, PyTorch's pruned model gives {:?}",
            names(&got_outputs),
            names(&want_outputs)
        ));
        return 0;
    }
    let mut checked = 0;
    for ((name, got), (_, want)) in got_outputs.iter().zip(&want_outputs) {
        if got.shape() != want.shape() {
            failures.push(format!(
                "{label}: {name} has shape {:?}, PyTorch {:?}",
                got.shape(),
                want.shape()
            ));
            continue;
        }
        let err = relative_error(got, want);
        if err > 1e-4 {
            failures.push(format!(
                "{label}: {name} relative error {err:.2e} against PyTorch"
            ));
        }
        checked += 1;
    }
    checked
}

#[test]
fn a_plan_splitting_a_key_value_group_is_refused() {
    let sandbox = Sandbox::new();
    let plan = sandbox.write(
        "split.json",
        r#"{"format": "onnx-idprune-plan", "version": 1,
            "blocks": [{"tower": "text", "index": 0, "keep_heads": [0, 2, 3]}]}"#,
    );
    let out = sandbox.path("out.onnx");
    let before = sandbox.listing();
    run([
        corpus().join("llama.onnx").as_os_str(),
        out.as_os_str(),
        "--plan".as_ref(),
        plan.as_os_str(),
    ])
    .assert_error(1, "keep_heads must keep whole groups");
    util::assert_no_output(&sandbox, &out, &before);
}

#[test]
fn the_report_lists_the_cache_entries_a_plan_removes_or_narrows() {
    let sandbox = Sandbox::new();
    let out = sandbox.path("out.onnx");
    let report = sandbox.path("report.json");
    run([
        corpus().join("llama_cache.onnx").as_os_str(),
        out.as_os_str(),
        "--plan".as_ref(),
        corpus().join("plans/llama_mixed.json").as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
    ])
    .assert_ok();
    let json: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let interface: Vec<&str> = json["interface"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Layer 1 dropped: its four entries go; layer 0 keeps one of two
    // key/value heads: its four entries narrow.
    for name in [
        "past_key_values.1.key",
        "past_key_values.1.value",
        "present.1.key",
        "present.1.value",
    ] {
        assert!(
            interface.contains(&format!("input '{name}' removed").as_str())
                || interface.contains(&format!("output '{name}' removed").as_str()),
            "{name}: {interface:?}"
        );
    }
    for name in ["past_key_values.0.key", "present.0.value"] {
        assert!(
            interface.contains(&format!("'{name}' holds 1 of 2 key/value heads").as_str()),
            "{name}: {interface:?}"
        );
    }
    assert_eq!(interface.len(), 8, "{interface:?}");
}

#[test]
fn the_main_job_prunes_every_decoder() {
    let sandbox = Sandbox::new();
    for (file, want) in expected() {
        let path = corpus().join(&file);
        let calib = corpus().join(want["inputs"].as_str().unwrap());
        let out = sandbox.path(&format!("auto-{file}"));
        let report = sandbox.path(&format!("auto-{file}.json"));
        run([
            path.as_os_str(),
            out.as_os_str(),
            "--calib".as_ref(),
            calib.as_os_str(),
            "--keep-params".as_ref(),
            "0.7".as_ref(),
            "--report".as_ref(),
            report.as_os_str(),
        ])
        .assert_ok();
        let json: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let kept = json["params"]["blocks_kept"].as_f64().unwrap();
        assert!(kept <= 0.7 + 1e-9 && kept > 0.5, "{file}: kept {kept}");
        let fidelity = &json["fidelity"];
        assert!(fidelity.is_object(), "{file}: {json}");
        // Cache files are also verified by greedy generation with their
        // caches against the original's.
        let generations = &fidelity["generations"];
        if want["cache"].as_bool().unwrap() {
            assert!(
                generations["prompts"].as_u64().unwrap() >= 1,
                "{file}: {fidelity}"
            );
            let agreement = generations["token_agreement"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&agreement), "{file}: {fidelity}");
        } else {
            assert!(generations.is_null(), "{file}: {fidelity}");
        }
    }
}

#[test]
fn an_unpruned_decoder_generates_with_its_cache_exactly_as_the_original() {
    // The comparison itself: a model against itself agrees everywhere, and
    // against a model with a dropped layer it does not.
    for file in [
        "llama_cache.onnx",
        "qwen2_ts_cache.onnx",
        "gemma_genai.onnx",
    ] {
        let path = corpus().join(file);
        let family = file.split('_').next().unwrap();
        let calib = corpus().join(format!("inputs/{family}.npz"));
        let source = onnx_idprune::open(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let feed = inputs(&path, &calib, 16);
        let options = onnx_idprune::calib::RuntimeOptions::default();
        let against = |pruned: &[u8]| {
            onnx_idprune::verify::compare_generations(
                &bytes,
                pruned,
                &source.model.graph,
                &feed,
                16,
                "logits",
                &options,
            )
            .unwrap()
            .expect("a cache decoder")
        };
        let same = against(&bytes);
        assert!(same.prompts >= 8, "{file}: {same:?}");
        assert_eq!((same.exact_match, same.token_agreement), (1.0, 1.0));
        let sandbox = Sandbox::new();
        let plan = sandbox.write(
            "drop.json",
            r#"{"format": "onnx-idprune-plan", "version": 1,
                "blocks": [{"tower": "text", "index": 0, "drop": true},
                           {"tower": "text", "index": 1, "drop": true}]}"#,
        );
        let out = sandbox.path("dropped.onnx");
        util::run_plan(&path, &out, &plan, &[]).assert_ok();
        let other = against(&std::fs::read(&out).unwrap());
        assert!(other.token_agreement < 1.0, "{file}: {other:?}");
    }
}

#[test]
fn an_empty_plan_gives_every_decoder_back_byte_for_byte() {
    // Merged decoders too: the branches lifted out and put back.
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    for (file, _) in expected() {
        let path = corpus().join(&file);
        let out = sandbox.path(&format!("rt-{file}"));
        util::run_plan(&path, &out, &plan, &[]).assert_ok();
        assert!(
            std::fs::read(&path).unwrap() == std::fs::read(&out).unwrap(),
            "{file}: the empty plan changed the file"
        );
    }
}

#[test]
fn a_merged_decoder_prunes_both_branches_alike() {
    // The main job decides on the with-past branch; the no-past branch
    // gets the same plan and the same (refitted) weights, stored once.
    let sandbox = Sandbox::new();
    let path = corpus().join("qwen2_merged.onnx");
    let out = sandbox.path("merged.onnx");
    run([
        path.as_os_str(),
        out.as_os_str(),
        "--calib".as_ref(),
        corpus().join("inputs/qwen2.npz").as_os_str(),
        "--keep-params".as_ref(),
        "0.6".as_ref(),
    ])
    .assert_ok();
    let feed = inputs(&out, &corpus().join("inputs/qwen2.npz"), 4);
    let run_branch = |flag: bool| {
        let mut feed = feed.clone();
        feed.insert(
            "use_cache_branch".into(),
            Array::Bool(ndarray::arr1(&[flag]).into_dyn()),
        );
        outputs_of(&out, &feed)
    };
    let (without, with) = (run_branch(false), run_branch(true));
    assert_eq!(without.len(), with.len());
    for ((name, a), (_, b)) in without.iter().zip(&with) {
        assert!(relative_error(a, b) < 1e-5, "{name}: the branches differ");
    }
    assert!(
        std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&path).unwrap().len(),
        "the pruned merged decoder is not smaller"
    );
}

#[test]
fn a_merged_decoder_alone_in_a_folder_prunes_as_the_file_does() {
    // transformers.js's layout of a language model: onnx/decoder_model_merged.onnx.
    let sandbox = Sandbox::new();
    let folder = sandbox.path("llm");
    std::fs::create_dir_all(folder.join("onnx")).unwrap();
    std::fs::copy(
        corpus().join("llama_merged.onnx"),
        folder.join("onnx/decoder_model_merged.onnx"),
    )
    .unwrap();
    let out = sandbox.path("pruned");
    let report = sandbox.path("report.json");
    run([
        folder.as_os_str(),
        out.as_os_str(),
        "--calib".as_ref(),
        corpus().join("inputs/llama.npz").as_os_str(),
        "--keep-params".as_ref(),
        "0.6".as_ref(),
        "--report".as_ref(),
        report.as_os_str(),
    ])
    .assert_ok();
    let json: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["files"]["pruned"][0]["role"], "language_model");
    // Verified by cached generation as the single file is.
    let generations = &json["fidelity"]["generations"];
    assert!(generations["prompts"].as_u64().unwrap() >= 1, "{json}");
    let written = onnx_idprune::onnx::load(&out.join("onnx/decoder_model_merged.onnx")).unwrap();
    let graph = written.proto.graph.unwrap();
    assert!(graph.node.len() == 1 && graph.node[0].op_type() == "If");
    // The same plan applied to the file alone gives the same graph.
    let plan = sandbox.path("plan.json");
    std::fs::write(&plan, serde_json::to_vec(&json["plan"]).unwrap()).unwrap();
    let single = sandbox.path("single.onnx");
    let calib = corpus().join("inputs/llama.npz");
    util::run_plan(
        &corpus().join("llama_merged.onnx"),
        &single,
        &plan,
        &["--calib", calib.to_str().unwrap()],
    )
    .assert_ok();
    let single = onnx_idprune::onnx::load(&single)
        .unwrap()
        .proto
        .graph
        .unwrap();
    assert!(
        single == graph,
        "the folder's decoder differs from the file pruned alone"
    );
}
