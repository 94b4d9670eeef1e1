//! Interrupted runs: whenever SIGTERM or SIGINT arrives, OUT is either absent
//! or complete, and no temporary file stays behind.

mod util;

use std::process::Command;
use std::time::Duration;

use onnx_idprune::onnx::proto::*;
use prost::Message;
use util::Sandbox;

/// y = x + w with a 64 MiB initializer: large enough that writing takes a
/// while.
fn big_model() -> Vec<u8> {
    let n: i64 = 16 << 20;
    let info = |name: &str| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(TensorShapeProto {
                    dim: vec![tensor_shape_proto::Dimension {
                        value: Some(tensor_shape_proto::dimension::Value::DimValue(n)),
                        denotation: None,
                    }],
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("big".into()),
            node: vec![NodeProto {
                op_type: Some("Add".into()),
                input: vec!["x".into(), "w".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: vec![TensorProto {
                name: Some("w".into()),
                data_type: Some(1),
                dims: vec![n],
                raw_data: Some(bytes::Bytes::from(vec![7u8; (n * 4) as usize])),
                ..Default::default()
            }],
            input: vec![info("x")],
            output: vec![info("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn signals_never_leave_partial_outputs() {
    let sandbox = Sandbox::new();
    let bytes = big_model();
    let input = sandbox.write("in.onnx", &bytes);
    let plan = sandbox.empty_plan();
    let out = sandbox.path("out.onnx");
    let mut interrupted = 0;
    for (i, delay_ms) in [0u64, 5, 10, 20, 30, 40, 60, 80, 120, 200]
        .iter()
        .enumerate()
    {
        let signal = if i % 2 == 0 { "TERM" } else { "INT" };
        let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-idprune"))
            .args([
                input.as_os_str(),
                out.as_os_str(),
                "--plan".as_ref(),
                plan.as_os_str(),
                "--external-data".as_ref(),
                "never".as_ref(),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*delay_ms));
        let _ = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        let leftovers: Vec<String> = sandbox
            .listing()
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "delay {delay_ms} ms: temporary files left: {leftovers:?}"
        );
        if out.exists() {
            assert!(
                std::fs::read(&out).unwrap() == bytes,
                "delay {delay_ms} ms: OUT exists but is not complete"
            );
            std::fs::remove_file(&out).unwrap();
        }
        if !status.success() {
            interrupted += 1;
            let code = status.code();
            assert!(
                code == Some(143) || code == Some(130) || code.is_none(),
                "delay {delay_ms} ms: {status:?}"
            );
        }
    }
    assert!(
        interrupted > 0,
        "no run was interrupted; the test did not test anything"
    );
}
