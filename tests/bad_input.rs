//! Bad input: every case exits non-zero with one line naming the problem,
//! writes no OUT (and no temporary file), and leaves the input untouched.

mod util;

use std::path::{Path, PathBuf};

use onnx_idprune::onnx::proto::{ModelProto, NodeProto};
use prost::Message;
use util::{Sandbox, assert_no_output, fingerprint, run, run_plan};

const MODEL: &str = "clip_tiny_torchscript_op17.onnx";

/// Runs `IN OUT --plan empty` (plus `extra`) and checks the failure.
fn expect_failure(sandbox: &Sandbox, input: &Path, extra: &[&str], code: i32, needle: &str) {
    let plan = sandbox.path("empty.json");
    if !plan.exists() {
        sandbox.empty_plan();
    }
    let out = sandbox.path("out.onnx");
    let before = sandbox.listing();
    let input_before = input.is_file().then(|| fingerprint(input));
    let mut args: Vec<&std::ffi::OsStr> = vec![
        input.as_os_str(),
        out.as_os_str(),
        "--plan".as_ref(),
        plan.as_os_str(),
    ];
    args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    run(args).assert_error(code, needle);
    assert_no_output(sandbox, &out, &before);
    if let Some(fp) = input_before {
        assert!(fingerprint(input) == fp, "the input was modified");
    }
}

fn decode(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

/// A copy of the fixture with its weights in `m.onnx.data`, and that path.
fn external_model(sandbox: &Sandbox) -> (PathBuf, PathBuf) {
    let plan = sandbox.empty_plan();
    let model = sandbox.path("m.onnx");
    run([
        util::fixtures().join(MODEL).as_os_str(),
        model.as_os_str(),
        "--plan".as_ref(),
        plan.as_os_str(),
        "--external-data".as_ref(),
        "always".as_ref(),
    ])
    .assert_ok();
    (model, sandbox.path("m.onnx.data"))
}

/// Rewrites the first external tensor's entry `key` to `value`.
fn set_external_entry(model: &Path, key: &str, value: &str) {
    let mut proto = decode(model);
    let tensor = proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| !t.external_data.is_empty())
        .unwrap();
    tensor
        .external_data
        .iter_mut()
        .find(|e| e.key() == key)
        .unwrap()
        .value = Some(value.to_string());
    std::fs::write(model, proto.encode_to_vec()).unwrap();
}

#[test]
fn truncated_model() {
    let sandbox = Sandbox::new();
    let bytes = std::fs::read(util::fixtures().join(MODEL)).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 1, 10] {
        let input = sandbox.write("cut.onnx", &bytes[..cut]);
        expect_failure(&sandbox, &input, &[], 1, "not a valid ONNX model");
    }
}

#[test]
fn random_bytes_and_empty_file() {
    let sandbox = Sandbox::new();
    let mut state = 0x9e3779b97f4a7c15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let input = sandbox.write("noise.onnx", &noise);
    expect_failure(&sandbox, &input, &[], 1, "not a valid ONNX model");
    let empty = sandbox.write("empty.onnx", b"");
    expect_failure(&sandbox, &empty, &[], 1, "empty");
}

#[test]
fn missing_input_and_folder_input() {
    let sandbox = Sandbox::new();
    expect_failure(&sandbox, &sandbox.path("nope.onnx"), &[], 1, "cannot read");
    std::fs::create_dir(sandbox.path("dir.onnx")).unwrap();
    // A folder is read as a model folder: an empty one has no model.
    expect_failure(
        &sandbox,
        &sandbox.path("dir.onnx"),
        &[],
        1,
        "no model file in this folder",
    );
}

#[test]
fn missing_external_data() {
    let sandbox = Sandbox::new();
    let (model, data) = external_model(&sandbox);
    std::fs::remove_file(data).unwrap();
    expect_failure(&sandbox, &model, &[], 1, "cannot be opened");
}

#[test]
fn short_external_data() {
    let sandbox = Sandbox::new();
    let (model, data) = external_model(&sandbox);
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    expect_failure(&sandbox, &model, &[], 1, "which has only");
}

#[test]
fn external_data_offset_past_the_end() {
    let sandbox = Sandbox::new();
    let (model, _) = external_model(&sandbox);
    set_external_entry(&model, "offset", "99999999999");
    expect_failure(&sandbox, &model, &[], 1, "past the end");
    set_external_entry(&model, "offset", "12x");
    expect_failure(&sandbox, &model, &[], 1, "non-numeric offset");
}

#[test]
fn external_data_escaping_the_model_folder() {
    let sandbox = Sandbox::new();
    let (model, data) = external_model(&sandbox);
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(&data, outside.path().join("w.bin")).unwrap();

    set_external_entry(&model, "location", "../w.bin");
    expect_failure(&sandbox, &model, &[], 1, "escapes the model's folder");

    let absolute = outside.path().join("w.bin");
    set_external_entry(&model, "location", absolute.to_str().unwrap());
    expect_failure(&sandbox, &model, &[], 1, "is absolute");

    std::os::unix::fs::symlink(&absolute, sandbox.path("link.bin")).unwrap();
    set_external_entry(&model, "location", "link.bin");
    expect_failure(&sandbox, &model, &[], 1, "resolves outside");
}

#[test]
fn refuses_to_overwrite_the_input() {
    let sandbox = Sandbox::new();
    let input = sandbox.copy_fixture(MODEL);
    let plan = sandbox.empty_plan();
    let before = fingerprint(&input);
    for out in [input.clone(), sandbox.root().join(".").join(MODEL)] {
        run_plan(&input, &out, &plan, &[]).assert_error(1, "is an input file");
    }
    // the plan may not overwrite the input either
    let out = sandbox.path("out.onnx");
    run([
        input.as_os_str(),
        out.as_os_str(),
        "--plan".as_ref(),
        plan.as_os_str(),
        "--plan-out".as_ref(),
        input.as_os_str(),
    ])
    .assert_error(1, "is an input file");
    assert!(!out.exists());
    assert!(fingerprint(&input) == before);
}

#[test]
fn refuses_to_overwrite_the_inputs_external_data() {
    let sandbox = Sandbox::new();
    let (model, data) = external_model(&sandbox);
    // OUT = "m.onnx.data" would put its own data in "m.onnx.data.data", but
    // OUT itself is the input's data file.
    let plan = sandbox.path("empty.json");
    let before = fingerprint(&data);
    run_plan(&model, &data, &plan, &[]).assert_error(1, "is an input file");
    assert!(fingerprint(&data) == before);
}

#[test]
fn graph_defects_are_named() {
    let sandbox = Sandbox::new();
    let mut proto = decode(&util::fixtures().join(MODEL));
    let graph = proto.graph.as_mut().unwrap();
    graph.node[3].input[0] = "ghost_tensor".into();
    let input = sandbox.write("dangling.onnx", proto.encode_to_vec());
    expect_failure(
        &sandbox,
        &input,
        &[],
        1,
        "'ghost_tensor', which nothing defines",
    );

    let mut proto = decode(&util::fixtures().join(MODEL));
    let graph = proto.graph.as_mut().unwrap();
    let first_output = graph.node[0].output[0].clone();
    graph.node[1].output[0] = first_output.clone();
    let input = sandbox.write("duplicate.onnx", proto.encode_to_vec());
    expect_failure(&sandbox, &input, &[], 1, "more than one producer");

    let mut proto = decode(&util::fixtures().join(MODEL));
    let graph = proto.graph.as_mut().unwrap();
    let later = graph.node[5].output[0].clone();
    graph.node.push(NodeProto {
        op_type: Some("Identity".into()),
        input: vec![later],
        output: vec!["loop_a".into()],
        ..Default::default()
    });
    graph.node[5].input.push("loop_a".into());
    let input = sandbox.write("cycle.onnx", proto.encode_to_vec());
    expect_failure(&sandbox, &input, &[], 1, "cycle");
}

#[test]
fn tensor_payload_not_matching_dims() {
    let sandbox = Sandbox::new();
    let mut proto = decode(&util::fixtures().join(MODEL));
    let tensor = proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.raw_data.is_some())
        .unwrap();
    tensor.dims.push(1_000_000_000);
    let input = sandbox.write("dims.onnx", proto.encode_to_vec());
    expect_failure(&sandbox, &input, &[], 1, "but the tensor holds");
}

#[test]
fn plan_problems() {
    let sandbox = Sandbox::new();
    let input = sandbox.copy_fixture(MODEL);
    let out = sandbox.path("out.onnx");
    let cases = [
        ("{not json", "plan"),
        (
            r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"audio","index":0,"drop":true}]}"#,
            "unknown tower",
        ),
        (
            r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"text","index":0,"keep_heads":[2,2]}]}"#,
            "duplicated",
        ),
        // plans made for another model
        (
            r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"text","index":0,"drop":true},{"tower":"text","index":7,"drop":true}]}"#,
            "plan entry 1 (text/7): the text tower has 2 blocks",
        ),
        (
            r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"vision","index":1,"keep_heads":[0,4]}]}"#,
            "head 4 does not exist: the block has 4 heads",
        ),
        (
            r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"text","index":1,"keep_mlp":[3,48]}]}"#,
            "neuron 48 does not exist: the MLP has 48 neurons",
        ),
    ];
    for (text, needle) in cases {
        let plan = sandbox.write("plan.json", text);
        let before = sandbox.listing();
        run_plan(&input, &out, &plan, &[]).assert_error(1, needle);
        assert_no_output(&sandbox, &out, &before);
    }
    let text_only = sandbox.copy_fixture("clip_tiny_text_torchscript_op17.onnx");
    let plan = sandbox.write(
        "plan.json",
        r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"vision","index":0,"drop":true}]}"#,
    );
    let before = sandbox.listing();
    run_plan(&text_only, &out, &plan, &[]).assert_error(1, "the model has no vision tower");
    assert_no_output(&sandbox, &out, &before);
    let missing = sandbox.path("missing.json");
    run_plan(&input, &out, &missing, &[]).assert_error(1, "cannot read plan");
}

#[test]
fn usage_errors_exit_2() {
    let sandbox = Sandbox::new();
    let input = sandbox.copy_fixture(MODEL);
    let out = sandbox.path("out.onnx");
    for args in [
        vec!["--keep-params", "1.5"],
        vec!["--keep-params", "0"],
        vec!["--ep", "tpu"],
        vec!["--no-such-flag"],
    ] {
        let mut all: Vec<&std::ffi::OsStr> = vec![input.as_os_str(), out.as_os_str()];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        let result = run(all);
        assert_eq!(result.code, 2, "{args:?}: {}", result.stderr);
        assert!(!out.exists());
    }
    assert_eq!(run([input.as_os_str()]).code, 2);
    assert_eq!(run(["--help"]).code, 0);
}

#[test]
fn output_folder_missing() {
    let sandbox = Sandbox::new();
    let input = sandbox.copy_fixture(MODEL);
    let plan = sandbox.empty_plan();
    let out = sandbox.path("no/such/folder/out.onnx");
    run_plan(&input, &out, &plan, &[]).assert_error(1, "cannot write");
}

/// Single-bit flips all over a real export. A flip may land in a weight's
/// bytes and leave a valid model (exit 0, complete OUT); anything else must
/// be a clean exit 1 with one line, no OUT, and never a panic.
#[test]
fn bit_flips() {
    let sandbox = Sandbox::new();
    let bytes = std::fs::read(util::fixtures().join(MODEL)).unwrap();
    let plan = sandbox.empty_plan();
    let out = sandbox.path("out.onnx");
    let (mut accepted, mut refused) = (0, 0);
    // 97 positions, evenly spread (a prime step, so the bit varies too).
    let step = bytes.len() * 8 / 97;
    for n in 0..97 {
        let bit = n * step + n % 8;
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        let input = sandbox.write("flipped.onnx", &flipped);
        let before = sandbox.listing();
        let result = run_plan(&input, &out, &plan, &[]);
        if result.code == 0 {
            accepted += 1;
            assert!(out.is_file(), "bit {bit}: exit 0 without OUT");
            std::fs::remove_file(&out).unwrap();
            let data = sandbox.path("out.onnx.data");
            if data.exists() {
                std::fs::remove_file(data).unwrap();
            }
        } else {
            refused += 1;
            result.assert_error(1, "");
            assert_no_output(&sandbox, &out, &before);
        }
        assert_eq!(
            std::fs::read(&input).unwrap(),
            flipped,
            "bit {bit}: the input was modified"
        );
    }
    // Most of the file is weight bytes, but the structure is dense enough
    // that both outcomes must occur; otherwise the test is not flipping
    // what it thinks it flips.
    assert!(
        accepted > 0 && refused > 0,
        "accepted {accepted}, refused {refused}"
    );
}

/// The MatMul weight of vision block 0's query projection, re-encoded as
/// `data_type` with `bytes_per_value` bytes per element by `convert`.
fn retyped_query_weight(data_type: i32, convert: impl Fn(f32) -> Vec<u8>) -> ModelProto {
    let mut proto = decode(&util::fixtures().join(MODEL));
    let tensor = util::vision_query_weight(proto.graph.as_mut().unwrap());
    let raw = tensor.raw_data.clone().unwrap();
    let values: Vec<u8> = raw
        .chunks_exact(4)
        .flat_map(|c| convert(f32::from_le_bytes(c.try_into().unwrap())))
        .collect();
    tensor.data_type = Some(data_type);
    tensor.raw_data = Some(values.into());
    proto
}

/// A block weight of another element type than the rest of its block (or
/// not floating-point at all) is named; pruning would only carry the
/// defect into OUT, and no runtime would run either.
#[test]
fn weights_of_the_wrong_element_type() {
    let sandbox = Sandbox::new();
    let cases: [(&str, ModelProto, &str); 3] = [
        (
            "double.onnx",
            retyped_query_weight(11, |v| (v as f64).to_le_bytes().to_vec()),
            "the q weight 'onnx::MatMul_702' is float64",
        ),
        (
            "int64.onnx",
            retyped_query_weight(7, |v| ((v * 100.0) as i64).to_le_bytes().to_vec()),
            "holds int64 values, not floating-point numbers",
        ),
        (
            "int32.onnx",
            retyped_query_weight(6, |v| ((v * 100.0) as i32).to_le_bytes().to_vec()),
            "holds int32 values",
        ),
    ];
    // A plan that edits the block (an empty plan copies the model as it is).
    let plan = sandbox.write(
        "heads.json",
        r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"vision","index":0,"keep_heads":[0,1]}]}"#,
    );
    let out = sandbox.path("out.onnx");
    for (name, proto, needle) in cases {
        let input = sandbox.write(name, proto.encode_to_vec());
        let before = sandbox.listing();
        let result = run_plan(&input, &out, &plan, &[]);
        result
            .assert_error(1, needle)
            .assert_error(1, "vision block 0");
        assert_no_output(&sandbox, &out, &before);
        run(["inspect".as_ref(), input.as_os_str()]).assert_error(1, needle);
    }
}

/// A weight initializer removed: the MatMul reads a name nothing defines.
#[test]
fn missing_initializer() {
    let sandbox = Sandbox::new();
    let mut proto = decode(&util::fixtures().join(MODEL));
    let graph = proto.graph.as_mut().unwrap();
    let at = graph
        .initializer
        .iter()
        .position(|t| t.dims.len() == 2)
        .unwrap();
    let name = graph.initializer.remove(at).name().to_string();
    let input = sandbox.write("missing.onnx", proto.encode_to_vec());
    expect_failure(
        &sandbox,
        &input,
        &[],
        1,
        &format!("'{name}', which nothing defines"),
    );
}

/// Named pipes (and other non-regular files) as the model or as an
/// external data file are refused before they are opened: opening a pipe
/// would wait for a writer forever.
#[test]
fn named_pipes_are_refused_without_blocking() {
    let sandbox = Sandbox::new();
    let fifo = sandbox.path("pipe.onnx");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    expect_failure(&sandbox, &fifo, &[], 1, "not a regular file");

    let (model, data) = external_model(&sandbox);
    std::fs::remove_file(&data).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&data)
        .status()
        .unwrap();
    assert!(made.success());
    expect_failure(&sandbox, &model, &[], 1, "not a regular file");
}

/// The other side of the element-type check: a model whose float weights
/// are all float64 (one type everywhere, as in a float16 or float64 export)
/// is accepted and pruned.
#[test]
fn weights_of_one_other_float_type_are_accepted() {
    let sandbox = Sandbox::new();
    let mut proto = decode(&util::fixtures().join(MODEL));
    for tensor in &mut proto.graph.as_mut().unwrap().initializer {
        if tensor.data_type() != 1 {
            continue;
        }
        let raw = tensor.raw_data.clone().unwrap();
        let values: Vec<u8> = raw
            .chunks_exact(4)
            .flat_map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
            .collect();
        tensor.data_type = Some(11);
        tensor.raw_data = Some(values.into());
    }
    let input = sandbox.write("double.onnx", proto.encode_to_vec());
    run(["inspect".as_ref(), input.as_os_str()]).assert_ok();
    let plan = sandbox.write(
        "heads.json",
        r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"vision","index":0,"keep_heads":[0,1]}]}"#,
    );
    let out = sandbox.path("out.onnx");
    run_plan(&input, &out, &plan, &[]).assert_ok();
    assert!(out.is_file());
}
