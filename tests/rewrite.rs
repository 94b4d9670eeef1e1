//! Plans applied to every export form agree with the same pruning done on
//! the PyTorch model (`fixtures/reference_plans.py` wrote the reference
//! outputs), the file shrinks, and the applied plan re-applies identically.

mod util;

use std::path::Path;

use ndarray_npy::NpzReader;
use onnx_idprune::calib::{Array, Runtime, RuntimeOptions, data, npz};
use util::{Sandbox, run};

const CLIP_FORMS: &[&str] = &[
    "clip_tiny_torchscript_op17.onnx",
    "clip_tiny_torchscript_op16.onnx",
    "clip_tiny_dynamo_op18.onnx",
    "clip_tiny_ort_fused.onnx",
    "clip_tiny_vision_torchscript_op17.onnx",
    "clip_tiny_text_torchscript_op17.onnx",
];
const BLIP_FORMS: &[&str] = &[
    "blip_itm_tiny_torchscript_op17.onnx",
    "blip_itm_tiny_dynamo_op18.onnx",
];

fn inputs(model: &Path) -> data::Inputs {
    let source = onnx_idprune::open(model).unwrap();
    let (inputs, _) = npz::read_npz(
        &util::fixtures().join("calib/clip_tiny_calib.npz"),
        &source.model.graph,
    )
    .unwrap();
    inputs.into_iter().map(|(k, v)| (k, v.rows(0, 2))).collect()
}

fn reference(plan: &str) -> Vec<(String, ndarray::ArrayD<f32>)> {
    let file = std::fs::File::open(util::fixtures().join(format!("reference/{plan}.npz"))).unwrap();
    let mut npz = NpzReader::new(file).unwrap();
    let names = npz.names().unwrap();
    names
        .iter()
        .map(|n| {
            (
                n.trim_end_matches(".npy").to_string(),
                npz.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(n)
                    .unwrap(),
            )
        })
        .collect()
}

fn check_plan(plan: &str, forms: &[&str]) {
    let sandbox = Sandbox::new();
    let plan_path = util::fixtures().join(format!("plans/{plan}.json"));
    let plan_text = std::fs::read_to_string(&plan_path).unwrap();
    let expected = reference(plan);
    let mut checked = 0;
    for form in forms {
        let label = format!("{plan} on {form}");
        let model = util::fixtures().join(form);
        let single_tower = form.contains("_vision_") || form.contains("_text_");
        let plan_for_form = if single_tower {
            // keep only the entries for the tower this file has
            let tower = if form.contains("_vision_") {
                "vision"
            } else {
                "text"
            };
            let mut json: serde_json::Value = serde_json::from_str(&plan_text).unwrap();
            json["blocks"]
                .as_array_mut()
                .unwrap()
                .retain(|b| b["tower"] == tower);
            sandbox.write(&format!("{form}.plan.json"), json.to_string())
        } else {
            plan_path.clone()
        };
        let out = sandbox.path(&format!("pruned-{form}"));
        let applied = sandbox.path(&format!("applied-{form}.json"));
        let report = sandbox.path(&format!("report-{form}.json"));
        let result = run([
            model.as_os_str(),
            out.as_os_str(),
            "--plan".as_ref(),
            plan_for_form.as_os_str(),
            "--plan-out".as_ref(),
            applied.as_os_str(),
            "--report".as_ref(),
            report.as_os_str(),
        ]);
        assert_eq!(result.code, 0, "{label}: {}", result.stderr);
        assert!(
            std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&model).unwrap().len(),
            "{label}: file did not shrink"
        );
        assert_file_holds_what_the_report_says(&out, &report, &label);

        // The applied plan is recorded in the model's metadata.
        let proto = {
            use prost::Message;
            onnx_idprune::onnx::proto::ModelProto::decode(std::fs::read(&out).unwrap().as_slice())
                .unwrap()
        };
        let recorded = proto
            .metadata_props
            .iter()
            .find(|e| e.key() == "onnx_idprune.plan")
            .map(|e| e.value().to_string());
        let recorded: serde_json::Value =
            serde_json::from_str(&recorded.unwrap_or_else(|| panic!("{label}: no plan metadata")))
                .unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&applied).unwrap()).unwrap();
        assert_eq!(recorded, written, "{label}: recorded plan");

        // The written plan reproduces the output byte for byte.
        let again = sandbox.path(&format!("again-{form}"));
        run([
            model.as_os_str(),
            again.as_os_str(),
            "--plan".as_ref(),
            applied.as_os_str(),
        ])
        .assert_ok();
        assert!(
            std::fs::read(&again).unwrap() == std::fs::read(&out).unwrap(),
            "{label}: --plan-out does not reproduce"
        );

        let mut runtime = Runtime::from_file(&out, &RuntimeOptions::default())
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let outputs = runtime
            .run(&inputs(&model))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        for (name, got) in outputs {
            let Array::F32(got) = got else {
                panic!("{label}: {name} is not float")
            };
            let want = &expected
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{label}: no reference for {name}"))
                .1;
            assert_eq!(got.shape(), want.shape(), "{label}: {name} shape");
            // Single-tower files return unnormalised embeddings, CLIPModel
            // normalised ones: compare directions.
            let (got, want) = if name.ends_with("_embeds") {
                (unit_rows(&got), unit_rows(want))
            } else {
                (got, want.clone())
            };
            let want = &want;
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let err = got
                .iter()
                .zip(want.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(
                err <= 1e-4,
                "{label}: {name} relative error {err:.2e} against PyTorch"
            );
            checked += 1;
        }
    }
    assert!(checked >= forms.len());
}

/// Every removal the plan names really happened: the parameters that left
/// the file are the block parameters the report says the plan removed (these
/// fixtures share no tensor between layers, so the two counts agree), and
/// the report's stored count is the file's.
fn assert_file_holds_what_the_report_says(out: &Path, report: &Path, label: &str) {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    let p = &report["params"];
    let in_file = float_params(out);
    assert_eq!(
        p["total_after"].as_u64(),
        Some(in_file),
        "{label}: stored parameters in the report vs the file"
    );
    let left_file = p["total_before"].as_u64().unwrap() - in_file;
    let left_blocks = p["blocks_before"].as_u64().unwrap() - p["blocks_after"].as_u64().unwrap();
    assert_eq!(
        left_file, left_blocks,
        "{label}: parameters removed from the file vs from the blocks"
    );
}

/// Elements of the floating-point initializers with more than one element
/// (how the tool counts parameters).
fn float_params(model: &Path) -> u64 {
    use prost::Message;
    let proto =
        onnx_idprune::onnx::proto::ModelProto::decode(std::fs::read(model).unwrap().as_slice())
            .unwrap();
    proto
        .graph
        .unwrap()
        .initializer
        .iter()
        .filter(|t| matches!(t.data_type(), 1 | 10 | 11 | 16))
        .map(|t| t.dims.iter().product::<i64>() as u64)
        .filter(|n| *n > 1)
        .sum()
}

/// Removing neighbouring blocks and sub-blocks removes each of them: the
/// second bypass goes to what carries the stream after the first, not to
/// the output of the block already removed (which would bring it back).
#[test]
fn neighbouring_removals_remove_every_block_they_name() {
    let sandbox = Sandbox::new();
    let plan = sandbox.write(
        "neighbours.json",
        r#"{"format": "onnx-idprune-plan", "version": 1, "blocks": [
            {"tower": "vision", "index": 0, "drop": true},
            {"tower": "vision", "index": 1, "drop": true},
            {"tower": "text", "index": 0, "drop_mlp": true},
            {"tower": "text", "index": 1, "drop_attention": true}]}"#,
    );
    for form in CLIP_FORMS
        .iter()
        .filter(|f| !f.contains("_vision_") && !f.contains("_text_"))
    {
        let model = util::fixtures().join(form);
        let out = sandbox.path(&format!("pruned-{form}"));
        let report = sandbox.path(&format!("report-{form}.json"));
        run([
            model.as_os_str(),
            out.as_os_str(),
            "--plan".as_ref(),
            plan.as_os_str(),
            "--report".as_ref(),
            report.as_os_str(),
        ])
        .assert_ok();
        assert_file_holds_what_the_report_says(&out, &report, form);
        let inspected = run(["inspect".as_ref(), out.as_os_str(), "--json".as_ref()]);
        let json: serde_json::Value = serde_json::from_str(&inspected.assert_ok().stdout).unwrap();
        assert_eq!(
            json["towers"][0]["blocks"].as_array().unwrap().len(),
            1,
            "{form}: one of three vision blocks is left"
        );
    }
}

fn unit_rows(a: &ndarray::ArrayD<f32>) -> ndarray::ArrayD<f32> {
    let mut a = a.clone();
    for mut row in a.rows_mut() {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.mapv_inplace(|v| v / norm);
    }
    a
}

#[test]
fn clip_mixed_actions_match_pytorch() {
    check_plan("clip_mixed", CLIP_FORMS);
}

#[test]
fn clip_block_drops_match_pytorch() {
    check_plan("clip_drop_blocks", CLIP_FORMS);
}

#[test]
fn clip_heads_and_neurons_match_pytorch() {
    check_plan("clip_slim", CLIP_FORMS);
}

#[test]
fn blip_mixed_actions_match_pytorch() {
    check_plan("blip_mixed", BLIP_FORMS);
}

#[test]
fn blip_sub_block_drops_match_pytorch() {
    check_plan("blip_sub_blocks", BLIP_FORMS);
}
