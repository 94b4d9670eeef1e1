//! Malformed inputs found by a red-team pass after the first bad-input
//! corpus (`bad_input.rs`): each crashed, hung, allocated by a claimed size,
//! printed more than one line, or was accepted when it should not have
//! been. Every case must now exit 1 (or 2 for usage) with one line naming
//! the problem and write nothing.

mod util;

use std::io::Write;
use std::path::{Path, PathBuf};

use onnx_idprune::onnx::proto::{ModelProto, NodeProto, ValueInfoProto};
use prost::Message;
use util::{Sandbox, assert_no_output, run, run_plan};

const MODEL: &str = "clip_tiny_torchscript_op17.onnx";

fn model() -> PathBuf {
    util::fixtures().join(MODEL)
}

fn calib() -> PathBuf {
    util::fixtures().join("calib/clip_tiny_calib.npz")
}

fn decode(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

/// The bytes of an `.npy` file with `header` as its dict and `data` after.
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// The fixture calibration file's entry `entry` (raw `.npy` bytes).
fn fixture_entry(entry: &str) -> Vec<u8> {
    let mut source = zip::ZipArchive::new(std::fs::File::open(calib()).unwrap()).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut source.by_name(entry).unwrap(), &mut bytes).unwrap();
    bytes
}

/// An npz holding the fixture's three inputs, with `entry` replaced by
/// `bytes` (raw `.npy` bytes).
fn npz_replacing(sandbox: &Sandbox, name: &str, entry: &str, bytes: &[u8]) -> PathBuf {
    let path = sandbox.path(name);
    let mut out = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for name in ["input_ids.npy", "attention_mask.npy", "pixel_values.npy"] {
        out.start_file(name, stored).unwrap();
        if name == entry {
            out.write_all(bytes).unwrap();
        } else {
            out.write_all(&fixture_entry(name)).unwrap();
        }
    }
    out.finish().unwrap();
    path
}

/// `.npy` headers claiming petabytes over a few bytes of data used to be
/// allocated by ndarray-npy before it read anything, aborting the process.
#[test]
fn npy_headers_claiming_more_than_the_file_holds() {
    let sandbox = Sandbox::new();
    let huge = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 32, 32), }",
        &[0; 64],
    );
    let npz = npz_replacing(&sandbox, "huge.npz", "pixel_values.npy", &huge);
    run([
        "id".as_ref(),
        model().as_os_str(),
        "--calib".as_ref(),
        npz.as_os_str(),
    ])
    .assert_error(
        1,
        "needs 12288000000000000 bytes of data, but only 64 follow",
    );

    let overflow = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 3, 32), }",
        &[],
    );
    let npz = npz_replacing(&sandbox, "overflow.npz", "pixel_values.npy", &overflow);
    run([
        "id".as_ref(),
        model().as_os_str(),
        "--calib".as_ref(),
        npz.as_os_str(),
    ])
    .assert_error(1, "overflows");

    let matrix = sandbox.write(
        "x.npy",
        npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000, 50000000), }",
            &[0; 80],
        ),
    );
    run(["id".as_ref(), "--data".as_ref(), matrix.as_os_str()]).assert_error(
        1,
        "needs 400000000000000000 bytes of data, but only 80 follow",
    );
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Named pipes and devices as the plan, the calibration file or the data
/// matrix: refused before opening (a pipe without a writer blocks forever,
/// `/dev/zero` never ends).
#[test]
fn plans_and_data_that_are_not_regular_files() {
    let sandbox = Sandbox::new();
    let out = sandbox.path("out.onnx");
    let pipe = sandbox.path("pipe");
    mkfifo(&pipe);
    for plan in [Path::new("/dev/zero"), pipe.as_path()] {
        let before = sandbox.listing();
        run_plan(&model(), &out, plan, &[]).assert_error(1, "not a regular file");
        assert_no_output(&sandbox, &out, &before);
    }
    run([
        "id".as_ref(),
        model().as_os_str(),
        "--calib".as_ref(),
        pipe.as_os_str(),
    ])
    .assert_error(1, "not a regular file");
    run(["id".as_ref(), "--data".as_ref(), pipe.as_os_str()]).assert_error(1, "not a regular file");
    let before = sandbox.listing();
    run([
        model().as_os_str(),
        out.as_os_str(),
        "--calib".as_ref(),
        pipe.as_os_str(),
        "--keep-params".as_ref(),
        "0.7".as_ref(),
    ])
    .assert_error(1, "not a regular file");
    assert_no_output(&sandbox, &out, &before);
}

/// A model written to the sandbox after `edit`, and the plan-run result.
fn edited(sandbox: &Sandbox, name: &str, edit: impl FnOnce(&mut ModelProto)) -> PathBuf {
    let mut proto = decode(&model());
    edit(&mut proto);
    sandbox.write(name, proto.encode_to_vec())
}

fn expect_plan_failure(sandbox: &Sandbox, input: &Path, needle: &str) {
    // A plan that edits a block, so the blocks are looked for (an empty
    // plan only copies the model).
    let plan = sandbox.write(
        "heads.json",
        r#"{"format":"onnx-idprune-plan","version":1,"blocks":[{"tower":"text","index":1,"keep_heads":[0,1]}]}"#,
    );
    let out = sandbox.path("out.onnx");
    let before = sandbox.listing();
    run_plan(input, &out, &plan, &[]).assert_error(1, needle);
    assert_no_output(sandbox, &out, &before);
}

/// The first 2-D initializer of `proto`.
fn first_matrix(proto: &mut ModelProto) -> &mut onnx_idprune::onnx::proto::TensorProto {
    let graph = proto.graph.as_mut().unwrap();
    graph
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() == 2)
        .unwrap()
}

/// A tensor's values must sit in the one field its element type uses:
/// float32 numbers in int64_data left the float payload empty and panicked
/// when a plan sliced it; two payloads at once leave it undefined which
/// counts.
#[test]
fn tensor_values_in_the_wrong_or_in_two_fields() {
    let sandbox = Sandbox::new();
    let wrong = edited(&sandbox, "wrong_field.onnx", |proto| {
        let t = first_matrix(proto);
        let count = t.raw_data.as_ref().unwrap().len() / 4;
        t.raw_data = None;
        t.int64_data = vec![1; count];
    });
    expect_plan_failure(&sandbox, &wrong, "but stores its values in int64_data");

    let both = edited(&sandbox, "both.onnx", |proto| {
        let t = first_matrix(proto);
        let count = t.raw_data.as_ref().unwrap().len() / 4;
        t.float_data = vec![0.5; count];
    });
    expect_plan_failure(
        &sandbox,
        &both,
        "holds values in both raw_data and float_data",
    );
}

/// A layer whose weights do not fit a transformer block used to be skipped
/// with a note, renumbering every block after it, so `vision/0` in a plan
/// named source layer 1.
#[test]
fn a_layer_that_is_not_recognised_is_not_skipped() {
    let sandbox = Sandbox::new();
    let input = edited(&sandbox, "rank3.onnx", |proto| {
        let t = util::vision_query_weight(proto.graph.as_mut().unwrap());
        t.dims.push(1);
    });
    run(["inspect".as_ref(), input.as_os_str()]).assert_error(1, "not part of a recognised block");
    expect_plan_failure(
        &sandbox,
        &input,
        "would shift the index of every block after it",
    );
}

/// A fixed batch size in the billions: calibration pads every batch to it.
#[test]
fn absurd_fixed_batch_size() {
    let sandbox = Sandbox::new();
    let input = edited(&sandbox, "batch.onnx", |proto| {
        let graph = proto.graph.as_mut().unwrap();
        for input in &mut graph.input {
            set_first_dim(input, 1 << 62);
        }
    });
    run([
        "id".as_ref(),
        input.as_os_str(),
        "--calib".as_ref(),
        calib().as_os_str(),
        "--samples".as_ref(),
        "16".as_ref(),
    ])
    .assert_error(1, "fixed batch size of 4611686018427387904; at most 4096");
}

fn set_first_dim(value: &mut ValueInfoProto, size: i64) {
    use onnx_idprune::onnx::proto::{tensor_shape_proto, type_proto};
    let Some(type_proto::Value::TensorType(tensor)) =
        value.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return;
    };
    if let Some(dim) = tensor.shape.as_mut().and_then(|s| s.dim.first_mut()) {
        dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(size));
    }
}

/// An extra graph output without a batch axis (a scalar): verification
/// indexed it by rows and panicked. It is compared as one vector.
#[test]
fn outputs_without_a_batch_axis_are_verified() {
    let sandbox = Sandbox::new();
    let input = edited(&sandbox, "scalar.onnx", |proto| {
        let graph = proto.graph.as_mut().unwrap();
        graph.node.push(NodeProto {
            op_type: Some("ReduceMean".into()),
            name: Some("mean_logit".into()),
            input: vec!["logits_per_image".into()],
            output: vec!["mean_logit".into()],
            attribute: vec![onnx_idprune::onnx::proto::AttributeProto {
                name: Some("keepdims".into()),
                r#type: Some(2),
                i: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        });
        graph.output.push(ValueInfoProto {
            name: Some("mean_logit".into()),
            ..Default::default()
        });
    });
    let out = sandbox.path("out.onnx");
    let report = sandbox.path("report.json");
    run([
        input.as_os_str(),
        out.as_os_str(),
        "--calib".as_ref(),
        calib().as_os_str(),
        "--keep-params".as_ref(),
        "0.7".as_ref(),
        "--samples".as_ref(),
        "48".as_ref(),
        "--holdout".as_ref(),
        "16".as_ref(),
        "--report".as_ref(),
        report.as_os_str(),
    ])
    .assert_ok();
    assert!(out.is_file());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let text = json.to_string();
    assert!(text.contains("\"mean_logit\""), "{text}");
}

/// ONNX Runtime logged its own error lines (in colour) to stderr before
/// returning the error: token ids beyond the vocabulary gave three lines.
#[test]
fn onnx_runtime_errors_are_one_line() {
    let sandbox = Sandbox::new();
    let mut ids = fixture_entry("input_ids.npy");
    // The last 8 bytes are the last token id (int64): far past the vocabulary.
    let n = ids.len();
    ids[n - 8..].copy_from_slice(&1_000_000_000i64.to_le_bytes());
    let path = npz_replacing(&sandbox, "oov.npz", "input_ids.npy", &ids);
    run([
        "id".as_ref(),
        model().as_os_str(),
        "--calib".as_ref(),
        path.as_os_str(),
        "--samples".as_ref(),
        "64".as_ref(),
    ])
    .assert_error(1, "ONNX Runtime");
}

fn pairs() -> PathBuf {
    util::fixtures().join("pairs")
}

/// `calib` from images and captions: problems that used to panic or be
/// silently papered over.
#[test]
fn images_and_captions_that_do_not_fit() {
    let sandbox = Sandbox::new();
    let out = sandbox.path("c.npz");
    let calib_with = |texts: &Path, tokenizer: &Path, needle: &str| {
        let before = sandbox.listing();
        run([
            "calib".as_ref(),
            model().as_os_str(),
            "--images".as_ref(),
            pairs().join("images").as_os_str(),
            "--texts".as_ref(),
            texts.as_os_str(),
            "--tokenizer".as_ref(),
            tokenizer.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ])
        .assert_error(1, needle);
        assert_no_output(&sandbox, &out, &before);
    };
    let tokenizer = pairs().join("tokenizer.json");
    // one caption more than there are images
    let mut captions = std::fs::read_to_string(pairs().join("captions.txt")).unwrap();
    captions.push_str("one caption too many\n");
    let texts = sandbox.write("captions.txt", &captions);
    calib_with(&texts, &tokenizer, "captions for 12 images");

    // a tokenizer that truncates to nothing panicked on an index underflow
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer).unwrap()).unwrap();
    json["truncation"]["max_length"] = 0.into();
    let zero = sandbox.write("tokenizer.json", json.to_string());
    calib_with(
        &pairs().join("captions.txt"),
        &zero,
        "truncates captions to 0 tokens",
    );

    // a texts file that is a pipe
    let pipe = sandbox.path("pipe.txt");
    mkfifo(&pipe);
    calib_with(&pipe, &tokenizer, "not a regular file");
}

/// Usage errors for values that used to be accepted silently.
#[test]
fn nan_fidelity_and_zero_samples_are_usage_errors() {
    let sandbox = Sandbox::new();
    let out = sandbox.path("out.onnx");
    let gate = run([
        model().as_os_str(),
        out.as_os_str(),
        "--calib".as_ref(),
        calib().as_os_str(),
        "--keep-params".as_ref(),
        "0.7".as_ref(),
        "--min-fidelity".as_ref(),
        "NaN".as_ref(),
    ]);
    assert_eq!(gate.code, 2, "{}", gate.stderr);
    assert!(
        gate.stderr.contains("not a cosine in [-1, 1]"),
        "{}",
        gate.stderr
    );
    let zero = run([
        "calib".as_ref(),
        model().as_os_str(),
        "--images".as_ref(),
        pairs().join("images").as_os_str(),
        "--texts".as_ref(),
        pairs().join("captions.txt").as_os_str(),
        "-o".as_ref(),
        sandbox.path("c.npz").as_os_str(),
        "--samples".as_ref(),
        "0".as_ref(),
    ]);
    assert_eq!(zero.code, 2, "{}", zero.stderr);
    assert!(
        zero.stderr.contains("must be at least 1"),
        "{}",
        zero.stderr
    );
    assert!(!out.exists() && !sandbox.path("c.npz").exists());
}

/// `id --data X.npy --svg F` ignored `--svg` without a word.
#[test]
fn svg_of_a_data_matrix_is_refused() {
    let sandbox = Sandbox::new();
    let data = sandbox.write(
        "x.npy",
        npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
            &[0; 16],
        ),
    );
    let svg = sandbox.path("plot.svg");
    run([
        "id".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--svg".as_ref(),
        svg.as_os_str(),
    ])
    .assert_error(1, "a --data matrix has one ID");
    assert!(!svg.exists());
}

/// A tokenizer that does not fit the model: without truncation its long
/// captions ran past the position embedding (the npz `calib` wrote could
/// not be fed back), and ids past the vocabulary failed only later, inside
/// ONNX Runtime.
#[test]
fn tokenizers_that_do_not_fit_the_model() {
    let sandbox = Sandbox::new();
    let images = pairs().join("images");
    let tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pairs().join("tokenizer.json")).unwrap())
            .unwrap();
    let captions: String = std::fs::read_to_string(pairs().join("captions.txt"))
        .unwrap()
        .lines()
        .map(|l| format!("{l} {}\n", "and a red circle".repeat(20)))
        .collect();
    let texts = sandbox.write("long.txt", captions);
    let calib_with = |tokenizer: &Path| {
        run([
            "calib".as_ref(),
            model().as_os_str(),
            "--images".as_ref(),
            images.as_os_str(),
            "--texts".as_ref(),
            texts.as_os_str(),
            "--tokenizer".as_ref(),
            tokenizer.as_os_str(),
            "-o".as_ref(),
            sandbox.path("c.npz").as_os_str(),
        ])
    };

    let mut untruncated = tokenizer.clone();
    untruncated["truncation"] = serde_json::Value::Null;
    let path = sandbox.write("untruncated.json", untruncated.to_string());
    let made = calib_with(&path);
    made.assert_ok();
    // 16 position embeddings in the tiny CLIP text tower
    assert!(
        made.stderr.contains("input_ids [12, 16]"),
        "{}",
        made.stderr
    );
    run([
        "id".as_ref(),
        model().as_os_str(),
        "--calib".as_ref(),
        sandbox.path("c.npz").as_os_str(),
        "--samples".as_ref(),
        "12".as_ref(),
    ])
    .assert_ok();
    std::fs::remove_file(sandbox.path("c.npz")).unwrap();

    let mut shifted = tokenizer.clone();
    let vocab = shifted["model"]["vocab"].as_object_mut().unwrap();
    for id in vocab.values_mut() {
        *id = (id.as_u64().unwrap() + 1000).into();
    }
    let path = sandbox.write("shifted.json", shifted.to_string());
    calib_with(&path).assert_error(1, "but the model's token embedding has 99 rows");
    assert!(!sandbox.path("c.npz").exists());
}
