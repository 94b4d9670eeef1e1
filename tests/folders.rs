//! Folders of model files pruned as one model: a CLIP split into its two
//! towers, a BLIP captioner's vision encoder + text decoder, and the ways a
//! folder can be wrong.

mod util;

use std::path::{Path, PathBuf};

use serde_json::Value;
use util::{Sandbox, contents, run};

const CLIP: &str = "clip_tiny_torchscript_op17.onnx";
const CLIP_VISION: &str = "clip_tiny_vision_torchscript_op17.onnx";
const CLIP_TEXT: &str = "clip_tiny_text_torchscript_op17.onnx";

fn defaults() -> PathBuf {
    util::fixtures().join("defaults")
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

/// An optimum-style CLIP folder: the two towers of the single-file fixture
/// (same weights, exported separately), a config, and a reduced-precision
/// sibling that is copied, not pruned.
fn clip_folder(sandbox: &Sandbox) -> PathBuf {
    let dir = sandbox.path("clip");
    copy(
        &util::fixtures().join(CLIP_VISION),
        &dir.join("vision_model.onnx"),
    );
    copy(
        &util::fixtures().join(CLIP_TEXT),
        &dir.join("text_model.onnx"),
    );
    copy(
        &util::fixtures().join(CLIP_VISION),
        &dir.join("vision_model_fp16.onnx"),
    );
    std::fs::write(dir.join("config.json"), br#"{"model_type": "clip"}"#).unwrap();
    dir
}

/// A BLIP captioner as it ships: vision encoder and text decoder in `onnx/`.
fn blip_folder(sandbox: &Sandbox) -> PathBuf {
    let dir = sandbox.path("blip");
    copy(
        &defaults().join("blip_cap_vision_ts_op17.onnx"),
        &dir.join("onnx/vision_model.onnx"),
    );
    copy(
        &defaults().join("blip_cap_decoder_ts_op17.onnx"),
        &dir.join("onnx/text_decoder.onnx"),
    );
    std::fs::write(dir.join("config.json"), br#"{"model_type": "blip"}"#).unwrap();
    dir
}

/// The float tensors of more than one element stored in `models`, as
/// (dims, bytes), sorted: the weights, whatever the exporter named them.
fn weights(models: &[PathBuf]) -> Vec<(Vec<i64>, Vec<u8>)> {
    let mut found = Vec::new();
    for path in models {
        let loaded = onnx_idprune::onnx::load(path).unwrap();
        let model = onnx_idprune::ir::Model::from_proto(loaded.proto).unwrap();
        for (_, tensor) in model.graph.initializers() {
            let elements: i64 = tensor.dims().iter().product();
            if tensor.data_type() == 1 && elements > 1 {
                found.push((
                    tensor.dims().to_vec(),
                    tensor.raw_bytes().unwrap().into_owned(),
                ));
            }
        }
    }
    found.sort();
    found
}

fn prune_args(
    input: &Path,
    output: &Path,
    calib: &Path,
    extra: &[&str],
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        vec![input.into(), output.into(), "--calib".into(), calib.into()];
    args.extend(extra.iter().map(std::ffi::OsString::from));
    args
}

#[test]
fn a_split_clip_prunes_like_the_single_file_model() {
    let sandbox = Sandbox::new();
    let folder = clip_folder(&sandbox);
    let before = contents(&folder);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let (single_plan, folder_plan) = (sandbox.path("single.json"), sandbox.path("folder.json"));
    let report = sandbox.path("report.json");
    let single = sandbox.path("single.onnx");
    let out = sandbox.path("pruned");
    let flags = ["--keep-params", "0.6"];
    let mut args = prune_args(&util::fixtures().join(CLIP), &single, &calib, &flags);
    args.extend(["--plan-out".into(), single_plan.clone().into()]);
    run(args).assert_ok();
    let mut args = prune_args(&folder, &out, &calib, &flags);
    args.extend([
        "--plan-out".into(),
        folder_plan.clone().into(),
        "--report".into(),
        report.clone().into(),
    ]);
    let result = run(args);
    result.assert_ok();
    assert!(
        result.stderr.contains("top-1 agreement"),
        "the split towers' similarities are judged: {}",
        result.stderr
    );

    // The same decision and the same pruned weights.
    let plan = std::fs::read_to_string(&folder_plan).unwrap();
    assert_eq!(plan, std::fs::read_to_string(&single_plan).unwrap());
    assert!(
        plan.contains("\"drop\"") || plan.contains("keep_"),
        "{plan}"
    );
    let parts = [out.join("vision_model.onnx"), out.join("text_model.onnx")];
    assert_eq!(weights(&parts), weights(std::slice::from_ref(&single)));
    assert_ne!(
        weights(&parts),
        weights(&[
            folder.join("vision_model.onnx"),
            folder.join("text_model.onnx")
        ]),
        "something was pruned"
    );

    // Everything else copied unchanged; the input folder untouched.
    let written = contents(&out);
    let names: Vec<_> = written.keys().cloned().collect();
    assert_eq!(
        names,
        [
            "config.json",
            "text_model.onnx",
            "vision_model.onnx",
            "vision_model_fp16.onnx"
        ]
        .map(PathBuf::from)
    );
    for copied in ["config.json", "vision_model_fp16.onnx"] {
        assert_eq!(
            written[Path::new(copied)],
            before[Path::new(copied)],
            "{copied}"
        );
    }
    assert_eq!(contents(&folder), before, "the input folder changed");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let files = &json["files"];
    assert_eq!(files["pruned"].as_array().unwrap().len(), 2, "{files}");
    assert_eq!(
        files["unpruned"][0]["path"], "vision_model_fp16.onnx",
        "{files}"
    );
    assert!(
        json["fidelity"]["top1_agreement"].as_f64().is_some(),
        "{}",
        json["fidelity"]
    );

    // Deterministic: the same folder again, byte for byte.
    let again = sandbox.path("again");
    run(prune_args(&folder, &again, &calib, &flags)).assert_ok();
    assert_eq!(contents(&again), written);
}

#[test]
fn a_blip_captioning_folder_prunes_both_towers_in_one_decision() {
    let sandbox = Sandbox::new();
    let folder = blip_folder(&sandbox);
    let before = contents(&folder);
    let calib = defaults().join("inputs/blip_itm.npz");
    let report = sandbox.path("report.json");
    let out = sandbox.path("pruned");
    let mut args = prune_args(
        &folder,
        &out,
        &calib,
        &["--keep-params", "0.6", "--samples", "12", "--holdout", "4"],
    );
    args.extend(["--report".into(), report.clone().into()]);
    let result = run(args);
    result.assert_ok();
    assert!(
        result.stderr.contains("greedy captions"),
        "{}",
        result.stderr
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let towers: Vec<&str> = json["plan"]["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["tower"].as_str().unwrap())
        .collect();
    assert!(
        towers.contains(&"vision") && towers.contains(&"text"),
        "one plan over both files: {towers:?}"
    );
    let fidelity = &json["fidelity"];
    let next = fidelity["next_token_agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&next), "{fidelity}");
    let captions = &fidelity["captions"];
    assert_eq!(captions["captions"], 4, "{fidelity}");
    assert_eq!(captions["tokens"], 6, "{fidelity}");
    let names: Vec<&str> = fidelity["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "onnx/vision_model/last_hidden_state",
            "onnx/text_decoder/logits"
        ]
    );
    // The pruned pair keeps the files' interfaces: same inputs and outputs.
    for file in ["onnx/vision_model.onnx", "onnx/text_decoder.onnx"] {
        let io = |path: &Path| {
            let loaded = onnx_idprune::onnx::load(path).unwrap();
            let graph = loaded.proto.graph.unwrap();
            let names = |v: &[onnx_idprune::onnx::proto::ValueInfoProto]| {
                v.iter().map(|i| i.name().to_string()).collect::<Vec<_>>()
            };
            (names(&graph.input), names(&graph.output))
        };
        assert_eq!(io(&out.join(file)), io(&folder.join(file)), "{file}");
    }
    assert_eq!(contents(&folder), before, "the input folder changed");
}

#[test]
fn inspect_shows_every_file_of_a_folder() {
    let sandbox = Sandbox::new();
    let folder = blip_folder(&sandbox);
    let result = run([
        std::ffi::OsString::from("inspect"),
        folder.clone().into(),
        "--json".into(),
    ]);
    result.assert_ok();
    let json: Value = serde_json::from_str(&result.stdout).unwrap();
    let files = json["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["path"], "onnx/vision_model.onnx");
    assert_eq!(files[0]["role"], "vision");
    assert_eq!(files[0]["towers"][0]["name"], "vision");
    assert_eq!(files[1]["role"], "decoder");
    assert_eq!(files[1]["towers"][0]["blocks"][0]["cross_attention"], true);

    let clip = clip_folder(&sandbox);
    let result = run([std::ffi::OsString::from("inspect"), clip.into()]);
    result.assert_ok();
    assert!(
        result
            .stdout
            .contains("## vision_model.onnx (vision encoder)"),
        "{}",
        result.stdout
    );
    assert!(
        result.stdout.contains("## text_model.onnx (text encoder)"),
        "{}",
        result.stdout
    );
    assert!(
        result
            .stdout
            .contains("vision_model_fp16.onnx: a variant of vision_model.onnx"),
        "{}",
        result.stdout
    );
}

#[test]
fn files_chooses_which_variant_is_pruned() {
    let sandbox = Sandbox::new();
    let folder = clip_folder(&sandbox);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let out = sandbox.path("pruned");
    let mut args = prune_args(
        &folder,
        &out,
        &calib,
        &[
            "--keep-params",
            "0.6",
            "--files",
            "vision_model_fp16.onnx,text_model.onnx",
        ],
    );
    let report = sandbox.path("r.json");
    args.extend(["--report".into(), report.clone().into()]);
    run(args).assert_ok();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let pruned: Vec<&str> = json["files"]["pruned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(pruned, ["vision_model_fp16.onnx", "text_model.onnx"]);
    assert_eq!(
        json["files"]["unpruned"][0]["path"], "vision_model.onnx",
        "{}",
        json["files"]
    );
    assert_eq!(
        json["files"]["unpruned"][0]["reason"],
        "not chosen by --files"
    );
    // The unchosen full-precision file is copied as it was.
    assert_eq!(
        std::fs::read(out.join("vision_model.onnx")).unwrap(),
        std::fs::read(folder.join("vision_model.onnx")).unwrap()
    );
}

/// Runs a prune that must fail with `needle`, leaving no OUT and nothing
/// new in the sandbox, and the input folder as it was.
fn refused(
    sandbox: &Sandbox,
    folder: &Path,
    out: &Path,
    calib: &Path,
    extra: &[&str],
    needle: &str,
) {
    let before = contents(folder);
    let listing = sandbox.listing();
    let mut flags = vec!["--keep-params", "0.6"];
    flags.extend_from_slice(extra);
    let result = run(prune_args(folder, out, calib, &flags));
    result.assert_error(1, needle);
    assert_eq!(result.stderr.trim().lines().count(), 1, "{}", result.stderr);
    assert_eq!(contents(folder), before, "the input folder changed");
    if !out.starts_with(folder) {
        assert_eq!(
            sandbox.listing(),
            listing,
            "the failed run left files behind"
        );
    }
}

#[test]
fn a_folder_that_is_no_model_is_refused_in_one_line() {
    let sandbox = Sandbox::new();
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let out = sandbox.path("out");

    // No model at all.
    let empty = sandbox.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    refused(
        &sandbox,
        &empty,
        &out,
        &calib,
        &[],
        "no model file in this folder",
    );

    // Two files for one tower: a whole model beside a split tower.
    let two = clip_folder(&sandbox);
    copy(&util::fixtures().join(CLIP), &two.join("model.onnx"));
    refused(
        &sandbox,
        &two,
        &out,
        &calib,
        &[],
        "two candidates for the text tower: model.onnx and text_model.onnx",
    );
    std::fs::remove_file(two.join("model.onnx")).unwrap();

    // A decoder without the encoder that feeds it.
    let blip = blip_folder(&sandbox);
    std::fs::remove_file(blip.join("onnx/vision_model.onnx")).unwrap();
    refused(&sandbox, &blip, &out, &calib, &[], "no vision encoder");

    // --files naming something outside the folder, or missing.
    let clip = sandbox.path("clip");
    refused(
        &sandbox,
        &clip,
        &out,
        &calib,
        &["--files", "../single.onnx"],
        "--files",
    );
    refused(
        &sandbox,
        &clip,
        &out,
        &calib,
        &["--files", "nope.onnx"],
        "--files nope.onnx",
    );

    // OUT inside IN (the input folder is never modified), and OUT == IN.
    refused(
        &sandbox,
        &clip,
        &clip.join("out"),
        &calib,
        &[],
        "inside the input folder",
    );
    refused(&sandbox, &clip, &clip, &calib, &[], "input");

    // A non-empty OUT_DIR is not replaced piecemeal.
    let taken = sandbox.path("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("keep.txt"), "mine").unwrap();
    refused(&sandbox, &clip, &taken, &calib, &[], "not empty");
    assert_eq!(
        std::fs::read_to_string(taken.join("keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn towers_that_do_not_fit_together_are_refused() {
    let sandbox = Sandbox::new();
    let calib = defaults().join("inputs/blip_itm.npz");
    let out = sandbox.path("out");
    // A decoder made for 48-wide encoder states (its cross-attention key and
    // value projections take 48 rows, and it says so), beside a 32-wide
    // vision encoder whose export leaves its output width symbolic.
    let blip = blip_folder(&sandbox);
    let decoder = blip.join("onnx/text_decoder.onnx");
    let mut proto = onnx_idprune::onnx::load(&decoder).unwrap().proto;
    let graph = proto.graph.as_mut().unwrap();
    let weights: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type() == "MatMul" && n.input[0] == "encoder_hidden_states")
        .map(|n| n.input[1].clone())
        .collect();
    assert_eq!(weights.len(), 4, "key and value projections of two blocks");
    for tensor in graph.initializer.iter_mut() {
        if weights.iter().any(|w| w == tensor.name()) {
            let columns = tensor.dims[1];
            tensor.dims = vec![48, columns];
            tensor.float_data.clear();
            tensor.raw_data = Some(vec![0u8; 48 * columns as usize * 4].into());
        }
    }
    let input = graph
        .input
        .iter_mut()
        .find(|i| i.name() == "encoder_hidden_states")
        .unwrap();
    use onnx_idprune::onnx::proto::{tensor_shape_proto::dimension, type_proto};
    let Some(type_proto::Value::TensorType(t)) = input.r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("tensor input")
    };
    t.shape.as_mut().unwrap().dim[2].value = Some(dimension::Value::DimValue(48));
    let tmp = sandbox.path("decoder.onnx");
    onnx_idprune::onnx::save(&proto, &tmp, &Default::default()).unwrap();
    std::fs::rename(&tmp, &decoder).unwrap();
    refused(
        &sandbox,
        &blip,
        &out,
        &calib,
        &[],
        "towers do not fit together: onnx/text_decoder.onnx's encoder_hidden_states are projected from width 48, and onnx/vision_model.onnx's output is 32 wide",
    );
    let result = run([std::ffi::OsString::from("inspect"), blip.into()]);
    result.assert_error(1, "towers do not fit together");
}

#[test]
fn images_and_captions_use_the_folders_own_tokenizer_and_preprocessor() {
    let sandbox = Sandbox::new();
    let folder = clip_folder(&sandbox);
    let pairs = util::fixtures().join("pairs");
    let args = |out: &Path| -> Vec<std::ffi::OsString> {
        vec![
            folder.clone().into(),
            out.into(),
            "--images".into(),
            pairs.join("images").into(),
            "--texts".into(),
            pairs.join("captions.txt").into(),
            "--keep-params".into(),
            "0.6".into(),
        ]
    };
    // Without them in the folder: one line naming the folder and the file.
    let out = sandbox.path("out");
    for (missing, next) in [
        (
            "has no preprocessor_config.json",
            "preprocessor_config.json",
        ),
        ("has no tokenizer.json", "tokenizer.json"),
    ] {
        let result = run(args(&out));
        result.assert_error(1, missing);
        assert_eq!(result.stderr.trim().lines().count(), 1, "{}", result.stderr);
        assert!(!out.exists());
        copy(&pairs.join(next), &folder.join(next));
    }
    run(args(&out)).assert_ok();
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(pairs.join("tokenizer.json")).unwrap()
    );
}

/// Rewrites the model file at `path` through `edit` (on its protobuf).
fn edit_model(path: &Path, edit: impl FnOnce(&mut onnx_idprune::onnx::proto::ModelProto)) {
    let mut proto = onnx_idprune::onnx::load(path).unwrap().proto;
    edit(&mut proto);
    let tmp = path.with_extension("edited");
    onnx_idprune::onnx::save(&proto, &tmp, &Default::default()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn dropping_the_block_whose_sum_another_file_reads_keeps_the_files_apart() {
    // A vision encoder without a final norm: its output is the last
    // block's residual sum, the value a dropped last block reroutes — while
    // the decoder reads it as its encoder_hidden_states.
    let sandbox = Sandbox::new();
    let folder = blip_folder(&sandbox);
    edit_model(&folder.join("onnx/vision_model.onnx"), |proto| {
        let graph = proto.graph.as_mut().unwrap();
        let at = graph
            .node
            .iter()
            .position(|n| n.output.first().is_some_and(|o| o == "last_hidden_state"))
            .unwrap();
        let norm = graph.node.remove(at);
        assert_eq!(norm.op_type(), "LayerNormalization");
        let sum = norm.input[0].clone();
        for node in &mut graph.node {
            for name in node.output.iter_mut().chain(node.input.iter_mut()) {
                if *name == sum {
                    *name = "last_hidden_state".into();
                }
            }
        }
    });
    let plan = sandbox.write(
        "plan.json",
        r#"{"format": "onnx-idprune-plan", "version": 1,
            "blocks": [{"tower": "vision", "index": 1, "drop": true}]}"#,
    );
    let out = sandbox.path("pruned");
    run([
        std::ffi::OsString::from(&folder),
        out.clone().into(),
        "--plan".into(),
        plan.into(),
    ])
    .assert_ok();
    // The decoder is untouched; the encoder lost a block.
    assert_eq!(
        weights(&[out.join("onnx/text_decoder.onnx")]),
        weights(&[folder.join("onnx/text_decoder.onnx")])
    );
    assert!(
        weights(&[out.join("onnx/vision_model.onnx")]).len()
            < weights(&[folder.join("onnx/vision_model.onnx")]).len()
    );
}

#[test]
fn a_folder_holding_one_whole_model_is_verified_like_the_file() {
    let sandbox = Sandbox::new();
    let folder = sandbox.path("whole");
    copy(
        &util::fixtures().join(CLIP),
        &folder.join("onnx/model.onnx"),
    );
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let result = run(prune_args(
        &folder,
        &sandbox.path("out"),
        &calib,
        &["--keep-params", "0.6"],
    ));
    result.assert_ok();
    assert!(
        result.stderr.contains("top-1 agreement"),
        "{}",
        result.stderr
    );
}

#[test]
fn outputs_that_would_land_in_out_dir_or_nowhere_are_refused_before_any_work() {
    let sandbox = Sandbox::new();
    let folder = clip_folder(&sandbox);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let out = sandbox.path("out");
    let plan_out = out.join("config.json");
    refused(
        &sandbox,
        &folder,
        &out,
        &calib,
        &["--plan-out", plan_out.to_str().unwrap()],
        "OUT_DIR is written whole",
    );
    refused(
        &sandbox,
        &folder,
        &sandbox.path("missing/out"),
        &calib,
        &[],
        "parent folder",
    );
}

#[test]
fn a_cached_decoder_beside_the_towers_is_not_left_behind_silently() {
    let sandbox = Sandbox::new();
    let folder = blip_folder(&sandbox);
    // What optimum adds for generation: the same decoder reading a cache.
    let cached = folder.join("onnx/decoder_with_past_model.onnx");
    copy(&folder.join("onnx/text_decoder.onnx"), &cached);
    edit_model(&cached, |proto| {
        let graph = proto.graph.as_mut().unwrap();
        let mut past = graph.input[0].clone();
        past.name = Some("past_key_values.0.key".into());
        graph.input.push(past);
    });
    let calib = defaults().join("inputs/blip_itm.npz");
    let out = sandbox.path("out");
    refused(&sandbox, &folder, &out, &calib, &[], "with a KV cache");
    // Chosen explicitly, the pair is pruned and the cached decoder copied.
    let args = prune_args(
        &folder,
        &out,
        &calib,
        &[
            "--keep-params",
            "0.6",
            "--samples",
            "12",
            "--holdout",
            "4",
            "--files",
            "onnx/vision_model.onnx,onnx/text_decoder.onnx",
        ],
    );
    run(args).assert_ok();
    assert_eq!(
        std::fs::read(out.join("onnx/decoder_with_past_model.onnx")).unwrap(),
        std::fs::read(&cached).unwrap()
    );
}
