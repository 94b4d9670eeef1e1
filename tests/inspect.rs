//! `inspect` on every export form of the fixtures: towers, blocks, widths,
//! heads, norm placement and parameter counts, each failure labelled with
//! its form.

mod util;

use serde_json::Value;
use util::{Sandbox, run};

/// (hidden, heads, head_dim, mlp, norm, cross_attention, params) of every
/// block in a tower.
type BlockSpec = (u64, u64, u64, u64, &'static str, bool, u64);

// Tiny CLIP: vision 32 wide x 3 blocks (4 heads of 8, MLP 64);
// text 24 wide x 2 blocks (3 heads of 8, MLP 48).
// Params: 4 projections (w + b) + fc1/fc2 (w + b) + 2 layer norms (gamma + beta).
const CLIP_VISION: BlockSpec = (
    32,
    4,
    8,
    64,
    "pre",
    false,
    4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 4 * 32,
);
const CLIP_TEXT: BlockSpec = (
    24,
    3,
    8,
    48,
    "pre",
    false,
    4 * (24 * 24 + 24) + (24 * 48 + 48) + (48 * 24 + 24) + 4 * 24,
);
// Tiny BLIP: vision 32 wide x 2 (packed qkv), text 32 wide x 2 with
// cross-attention and 3 post-norms.
const BLIP_VISION: BlockSpec = (
    32,
    4,
    8,
    64,
    "pre",
    false,
    (32 * 96 + 96) + (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 4 * 32,
);
const BLIP_TEXT: BlockSpec = (
    32,
    4,
    8,
    64,
    "post",
    true,
    8 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 6 * 32,
);

fn fused(spec: BlockSpec) -> BlockSpec {
    (spec.0, spec.1, spec.2, spec.3, "fused", spec.5, spec.6)
}

fn check(fixture: &str, towers: &[(&str, usize, BlockSpec)]) {
    let model = util::fixtures().join(fixture);
    let result = run(["inspect".as_ref(), model.as_os_str(), "--json".as_ref()]);
    assert_eq!(result.code, 0, "{fixture}: {}", result.stderr);
    let json: Value =
        serde_json::from_str(&result.stdout).unwrap_or_else(|e| panic!("{fixture}: {e}"));
    let got = json["towers"].as_array().unwrap();
    let names: Vec<&str> = got.iter().map(|t| t["name"].as_str().unwrap()).collect();
    let want: Vec<&str> = towers.iter().map(|t| t.0).collect();
    assert_eq!(names, want, "{fixture}: towers");
    let mut total = 0;
    for (tower, (name, count, spec)) in got.iter().zip(towers) {
        let blocks = tower["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), *count, "{fixture}: {name} block count");
        for (i, b) in blocks.iter().enumerate() {
            let label = format!("{fixture}: {name}/{i}");
            assert_eq!(b["index"], i as u64, "{label}");
            let got_spec = (
                b["hidden"].as_u64().unwrap(),
                b["heads"].as_u64().unwrap(),
                b["head_dim"].as_u64().unwrap(),
                b["mlp"].as_u64().unwrap(),
                b["norm"].as_str().unwrap(),
                b["cross_attention"].as_bool().unwrap(),
                b["params"].as_u64().unwrap(),
            );
            assert_eq!(got_spec, *spec, "{label}");
            total += spec.6;
        }
    }
    assert_eq!(
        json["params_blocks"].as_u64().unwrap(),
        total,
        "{fixture}: params_blocks is the sum of the blocks"
    );
    assert!(
        json["params_total"].as_u64().unwrap() > total,
        "{fixture}: params_total"
    );
}

#[test]
fn clip_torchscript_opset17() {
    check(
        "clip_tiny_torchscript_op17.onnx",
        &[("vision", 3, CLIP_VISION), ("text", 2, CLIP_TEXT)],
    );
}

#[test]
fn clip_torchscript_opset16_decomposed_layer_norm() {
    check(
        "clip_tiny_torchscript_op16.onnx",
        &[("vision", 3, CLIP_VISION), ("text", 2, CLIP_TEXT)],
    );
}

#[test]
fn clip_dynamo_opset18_generic_names() {
    check(
        "clip_tiny_dynamo_op18.onnx",
        &[("vision", 3, CLIP_VISION), ("text", 2, CLIP_TEXT)],
    );
}

#[test]
fn clip_onnxruntime_fused() {
    check(
        "clip_tiny_ort_fused.onnx",
        &[
            ("vision", 3, fused(CLIP_VISION)),
            ("text", 2, fused(CLIP_TEXT)),
        ],
    );
}

#[test]
fn clip_separate_tower_files() {
    check(
        "clip_tiny_vision_torchscript_op17.onnx",
        &[("vision", 3, CLIP_VISION)],
    );
    check(
        "clip_tiny_text_torchscript_op17.onnx",
        &[("text", 2, CLIP_TEXT)],
    );
}

#[test]
fn blip_itm_torchscript_and_dynamo() {
    for fixture in [
        "blip_itm_tiny_torchscript_op17.onnx",
        "blip_itm_tiny_dynamo_op18.onnx",
    ] {
        check(
            fixture,
            &[("vision", 2, BLIP_VISION), ("text", 2, BLIP_TEXT)],
        );
    }
}

#[test]
fn table_output_is_readable() {
    let model = util::fixtures().join("blip_itm_tiny_torchscript_op17.onnx");
    let result = run(["inspect".as_ref(), model.as_os_str()]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert!(
        result
            .stdout
            .contains("| text | 1 | 32 | 4 × 8 | 64 | post | yes | 12832 |"),
        "{}",
        result.stdout
    );
    assert!(result.stdout.contains("in transformer blocks"));
}

#[test]
fn a_model_without_transformer_blocks_is_an_error() {
    // An MLP-only graph: Gemm ─► Relu ─► Gemm, no attention.
    use onnx_idprune::onnx::proto::*;
    use prost::Message;
    let sandbox = Sandbox::new();
    let weight = |name: &str, dims: Vec<i64>| TensorProto {
        name: Some(name.into()),
        data_type: Some(1),
        float_data: vec![0.5; dims.iter().product::<i64>() as usize],
        dims,
        ..Default::default()
    };
    let info = |name: &str| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(TensorShapeProto {
                    dim: [1, 4]
                        .iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(*d)),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str| NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("mlp".into()),
            node: vec![
                node("MatMul", &["x", "w1"], "h"),
                node("Relu", &["h"], "a"),
                node("MatMul", &["a", "w2"], "y"),
            ],
            initializer: vec![weight("w1", vec![4, 8]), weight("w2", vec![8, 4])],
            input: vec![info("x")],
            output: vec![info("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = sandbox.write("mlp.onnx", model.encode_to_vec());
    run(["inspect".as_ref(), path.as_os_str()]).assert_error(1, "no transformer block found");
    // --explain says where each pattern stopped, one line each.
    let explained = run(["inspect".as_ref(), path.as_os_str(), "--explain".as_ref()]);
    explained.assert_ok();
    // The MLP itself matches; it is its missing residual join that stops it.
    assert!(
        explained.stdout.contains(
            "MLP at (MatMul) -> h: stopped at value 'y', expected fc2's output joining a residual stream"
        ),
        "{}",
        explained.stdout
    );
    assert!(
        explained
            .stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("discovery: no transformer block found"),
        "{}",
        explained.stdout
    );
}

/// `inspect --explain` on an export it understands: every attention anchor
/// and MLP candidate has its line, what lies outside the block chain is
/// named, and the verdict comes last. See: issue 14.
#[test]
fn explain_names_every_anchor_and_what_lies_outside_the_chain() {
    let path = util::fixtures().join("defaults/siglip_ts_op17.onnx");
    let result = run(["inspect".as_ref(), path.as_os_str(), "--explain".as_ref()]);
    result.assert_ok();
    let lines: Vec<&str> = result.stdout.lines().collect();
    let matched = lines
        .iter()
        .filter(|l| l.starts_with("attention at ") && l.contains(": matched (4 heads × 8"))
        .count();
    // Two blocks per tower; the pooling head's attention has no residual.
    assert_eq!(matched, 4, "{}", result.stdout);
    let head = lines
        .iter()
        .find(|l| l.starts_with("attention at /vision_model/head/"))
        .unwrap_or_else(|| panic!("{}", result.stdout));
    assert!(head.contains("stopped at"), "{head}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("outside the block chain: MLP at /vision_model/head/")),
        "{}",
        result.stdout
    );
    assert!(lines.contains(&"vision tower: 2 blocks") && lines.contains(&"text tower: 2 blocks"));
    // The table lists what was left alone.
    let table = run(["inspect".as_ref(), path.as_os_str()]);
    assert!(
        table
            .assert_ok()
            .stdout
            .contains("outside the block chain (left as it is): MLP at /vision_model/head/"),
        "{}",
        table.stdout
    );
}
