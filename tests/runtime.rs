//! ONNX Runtime through the library: the smoke test, bit-identical outputs
//! after round trips, and strict execution providers.
//!
//! Needs the ONNX Runtime library (`scripts/install-ort.sh`); these tests
//! fail, rather than skip, when it is missing.

mod util;

use std::path::Path;

use onnx_idprune::calib::{
    Array, Provider, Runtime, RuntimeError, RuntimeOptions, data, locate_library, npz,
};
use util::Sandbox;

fn require_ort() {
    if let Err(e) = locate_library(None) {
        panic!("{e}");
    }
}

/// The first `n` calibration samples, restricted to the model's inputs.
fn calib_inputs(model: &Path, n: usize) -> data::Inputs {
    let source = onnx_idprune::open(model).unwrap();
    let (inputs, samples) = npz::read_npz(
        &util::fixtures().join("calib/clip_tiny_calib.npz"),
        &source.model.graph,
    )
    .unwrap();
    assert!(samples >= n);
    inputs.into_iter().map(|(k, v)| (k, v.rows(0, n))).collect()
}

fn outputs_of(model: &Path, inputs: &data::Inputs) -> Vec<(String, Array)> {
    let mut runtime = Runtime::from_file(model, &RuntimeOptions::default()).unwrap();
    assert_eq!(runtime.provider, Provider::Cpu);
    runtime.run(inputs).unwrap()
}

fn assert_bit_identical(a: &[(String, Array)], b: &[(String, Array)], label: &str) {
    assert_eq!(a.len(), b.len(), "{label}");
    for ((na, xa), (nb, xb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{label}");
        match (xa, xb) {
            (Array::F32(x), Array::F32(y)) => {
                assert_eq!(x.shape(), y.shape(), "{label}/{na}");
                assert!(
                    x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{label}/{na}: outputs differ"
                );
            }
            _ => assert_eq!(xa, xb, "{label}/{na}"),
        }
    }
}

#[test]
fn smoke_clip_runs_with_expected_shapes() {
    require_ort();
    let model = util::fixtures().join("clip_tiny_torchscript_op17.onnx");
    let outputs = outputs_of(&model, &calib_inputs(&model, 4));
    let shapes: Vec<(&str, Vec<usize>)> = outputs
        .iter()
        .map(|(n, a)| (n.as_str(), a.shape().to_vec()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("logits_per_image", vec![4, 4]),
            ("logits_per_text", vec![4, 4]),
            ("text_embeds", vec![4, 16]),
            ("image_embeds", vec![4, 16])
        ]
    );
    for (name, array) in &outputs {
        assert!(!array.has_non_finite(), "{name}");
    }
}

#[test]
fn round_trips_give_bit_identical_outputs() {
    require_ort();
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    for model in util::fixture_models() {
        let name = model.file_name().unwrap().to_string_lossy().into_owned();
        // static dynamo exports take exactly 2 samples
        let inputs = calib_inputs(&model, 2);
        let reference = outputs_of(&model, &inputs);
        for external in ["never", "always"] {
            let out = sandbox.path(&format!("{external}-{name}"));
            util::run_plan(&model, &out, &plan, &["--external-data", external]).assert_ok();
            assert_bit_identical(
                &reference,
                &outputs_of(&out, &inputs),
                &format!("{name} ({external})"),
            );
        }
    }
}

#[test]
fn the_loader_and_encoder_feed_onnx_runtime_from_memory() {
    require_ort();
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    let model = util::fixtures().join("blip_itm_tiny_torchscript_op17.onnx");
    let external = sandbox.path("ext.onnx");
    util::run_plan(&model, &external, &plan, &["--external-data", "always"]).assert_ok();
    // our loader resolves the external data; the in-memory encoding embeds it
    let source = onnx_idprune::open(&external).unwrap();
    let bytes = onnx_idprune::onnx::encode_to_vec(&source.model.to_proto());
    let inputs = calib_inputs(&model, 3);
    let mut runtime = Runtime::from_bytes(&bytes, &RuntimeOptions::default()).unwrap();
    assert_bit_identical(
        &outputs_of(&model, &inputs),
        &runtime.run(&inputs).unwrap(),
        "from memory",
    );
}

#[test]
fn gpu_providers_are_strict_unless_fallback_is_allowed() {
    require_ort();
    let bytes =
        std::fs::read(util::fixtures().join("clip_tiny_vision_torchscript_op17.onnx")).unwrap();
    // The PyPI CPU wheel has neither CUDA nor TensorRT.
    for provider in [Provider::Cuda, Provider::Tensorrt] {
        let strict = RuntimeOptions {
            provider,
            ..Default::default()
        };
        match Runtime::from_bytes(&bytes, &strict) {
            Err(e @ RuntimeError::ProviderUnavailable { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&provider.to_string()) && msg.contains("--allow-fallback"),
                    "{msg}"
                );
            }
            other => panic!("{provider}: expected ProviderUnavailable, got {other:?}"),
        }
        let lenient = RuntimeOptions {
            provider,
            allow_fallback: true,
            ..Default::default()
        };
        let runtime = Runtime::from_bytes(&bytes, &lenient).unwrap();
        assert_eq!(
            runtime.provider,
            Provider::Cpu,
            "the provider that really runs is reported"
        );
        assert!(
            runtime
                .fallback
                .as_deref()
                .is_some_and(|why| why.contains("running on CPU"))
        );
    }
}

#[test]
fn a_missing_library_is_explained() {
    let err = locate_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/libonnxruntime.so") && msg.contains("install-ort.sh"),
        "{msg}"
    );
}
