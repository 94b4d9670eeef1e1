//! A LLaVA-style vision-language model as transformers.js lays it out
//! (`fixtures/llava/model/onnx/`: `vision_encoder.onnx`,
//! `embed_tokens.onnx`, `decoder_model_merged.onnx`; made by
//! `fixtures/llava/generate.py` from transformers' LlavaForConditionalGeneration
//! with stock initialisation, exported by TorchScript as optimum exports it).
//! The folder is pruned as one model: the image features go before the
//! text's embeddings into the language model, one decision spans the vision
//! tower and the language model, and the merged decoder goes back under its
//! `If`.
//!
//! `expected.json` holds each tower's blocks as the PyTorch modules have
//! them; tests/python_checks.rs chains the written files in ONNX Runtime
//! against the PyTorch model pruned by the same plan and generates with and
//! without the cache (tests/scripts/check_llava.py).
//! See: issue 17.

mod util;

use std::path::{Path, PathBuf};

use serde_json::Value;
use util::{Sandbox, run};

fn corpus() -> PathBuf {
    util::fixtures().join("llava")
}

fn model() -> PathBuf {
    corpus().join("model")
}

const FILES: [&str; 3] = [
    "onnx/vision_encoder.onnx",
    "onnx/embed_tokens.onnx",
    "onnx/decoder_model_merged.onnx",
];

const BLOCK_KEYS: &[&str] = &[
    "index",
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "gated",
    "norm_kind",
    "cache",
    "params",
];

/// `(tower, blocks)` with the keys compared.
fn towers(towers: &Value) -> Vec<(String, Vec<Value>)> {
    util::towers(towers, BLOCK_KEYS)
}

fn expected() -> Vec<(String, Vec<Value>)> {
    let text = std::fs::read_to_string(corpus().join("expected.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    towers(&json["towers"])
}

#[test]
fn inspect_finds_each_file_and_its_tower() {
    let result = run(["inspect".as_ref(), model().as_os_str(), "--json".as_ref()]);
    result.assert_ok();
    let got: Value = serde_json::from_str(&result.stdout).unwrap();
    let files = got["files"].as_array().unwrap();
    let roles: Vec<(&str, &str)> = files
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            (FILES[0], "vision"),
            (FILES[1], "embeddings"),
            (FILES[2], "language_model")
        ]
    );
    let want = expected();
    let found: Vec<(String, Vec<Value>)> =
        files.iter().flat_map(|f| towers(&f["towers"])).collect();
    let by_name = |list: &[(String, Vec<Value>)], name: &str| {
        list.iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("no {name} tower in {list:?}"))
    };
    for tower in ["vision", "text"] {
        assert_eq!(
            by_name(&found, tower),
            by_name(&want, tower),
            "{tower} tower"
        );
    }
    assert!(got["unpruned"].as_array().unwrap().is_empty());
}

/// The files of `dir` (relative paths, sorted).
fn listing(dir: &Path) -> Vec<PathBuf> {
    util::contents(dir).into_keys().collect()
}

/// Whether the model file's main graph is one `If` (a merged decoder).
fn is_merged(path: &Path) -> bool {
    let file = onnx_idprune::onnx::load(path).unwrap();
    let graph = file.proto.graph.unwrap();
    graph.node.len() == 1 && graph.node[0].op_type() == "If"
}

#[test]
fn the_main_job_prunes_both_towers_jointly_and_reports_each() {
    let sandbox = Sandbox::new();
    let out = sandbox.path("pruned");
    let report = sandbox.path("report.json");
    let calib = corpus().join("inputs/llava.npz");
    let args = |out: &Path, report: &Path| -> Vec<std::ffi::OsString> {
        vec![
            model().into(),
            out.into(),
            "--calib".into(),
            calib.clone().into(),
            "--keep-params".into(),
            "0.6".into(),
            "--report".into(),
            report.into(),
        ]
    };
    run(args(&out, &report)).assert_ok();
    assert_eq!(listing(&out), listing(&model()), "the same files, by name");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // One decision over both towers, each with its ID per sub-block.
    for tower in ["vision", "text"] {
        let ids: Vec<f64> = json["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["tower"] == tower)
            .map(|c| c["id"].as_f64().unwrap())
            .collect();
        let blocks = if tower == "vision" { 3 } else { 4 };
        assert_eq!(ids.len(), 2 * blocks, "{tower}: {ids:?}");
        assert!(ids.iter().all(|id| id.is_finite() && *id > 0.0), "{ids:?}");
        let before = json["params"]["towers_before"][tower].as_u64().unwrap();
        let after = json["params"]["towers_after"][tower].as_u64().unwrap();
        assert!(after <= before, "{tower}: {after} of {before}");
    }
    let kept = json["params"]["blocks_kept"].as_f64().unwrap();
    assert!((0.5..=0.7).contains(&kept), "blocks kept {kept}");
    // The files as written, each with its role; the embeddings as they were.
    let pruned = json["files"]["pruned"].as_array().unwrap();
    let roles: Vec<&str> = pruned.iter().map(|f| f["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["vision", "embeddings", "language_model"]);
    assert_eq!(
        std::fs::read(out.join(FILES[1])).unwrap(),
        std::fs::read(model().join(FILES[1])).unwrap()
    );
    let decoder = &pruned[2];
    assert!(decoder["bytes_after"].as_u64() < decoder["bytes_before"].as_u64());
    assert!(is_merged(&out.join(FILES[2])), "still a merged decoder");
    // Verified as deployed: the language model's logits after the image,
    // greedy generation from the image and each prompt.
    let fidelity = &json["fidelity"];
    let outputs: Vec<&str> = fidelity["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert!(
        outputs.contains(&"onnx/decoder_model_merged/logits"),
        "{outputs:?}"
    );
    assert!(fidelity["captions"]["captions"].as_u64().unwrap() > 0);
    assert!(fidelity["next_token_agreement"].as_f64().is_some());
    // Deterministic: the same run again writes the same bytes.
    let again = sandbox.path("again");
    run(args(&again, &sandbox.path("again.json"))).assert_ok();
    for file in FILES {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(again.join(file)).unwrap(),
            "{file} differs between two runs"
        );
    }
}

#[test]
fn an_empty_plan_gives_every_file_back_byte_for_byte() {
    let sandbox = Sandbox::new();
    let out = sandbox.path("same");
    util::run_plan(&model(), &out, &sandbox.empty_plan(), &[]).assert_ok();
    for file in FILES {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(model().join(file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
fn a_language_model_without_its_embeddings_is_refused() {
    let sandbox = Sandbox::new();
    let folder = sandbox.path("partial");
    std::fs::create_dir_all(folder.join("onnx")).unwrap();
    for file in [FILES[0], FILES[2]] {
        std::fs::copy(model().join(file), folder.join(file)).unwrap();
    }
    let out = sandbox.path("out");
    let before = sandbox.listing();
    let result = run([
        folder.as_os_str(),
        out.as_os_str(),
        "--plan".as_ref(),
        corpus().join("plans/llava_mixed.json").as_os_str(),
    ]);
    result.assert_error(
        1,
        "reads inputs_embeds, and no file of the folder gives them",
    );
    util::assert_no_output(&sandbox, &out, &before);
    // Chosen by --files, the same.
    let result = run([
        model().as_os_str(),
        out.as_os_str(),
        "--plan".as_ref(),
        corpus().join("plans/llava_mixed.json").as_os_str(),
        "--files".as_ref(),
        "onnx/vision_encoder.onnx,onnx/decoder_model_merged.onnx".as_ref(),
    ]);
    result.assert_error(1, "no file of the folder gives them");
    util::assert_no_output(&sandbox, &out, &before);
}
