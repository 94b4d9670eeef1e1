//! Empty-plan round trips: every export form comes back byte for byte, with
//! and without external data, and runs are deterministic.

mod util;

use util::{Sandbox, fixture_models, run};

#[test]
fn every_fixture_round_trips_byte_identically() {
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    for model in fixture_models() {
        let name = model.file_name().unwrap().to_string_lossy().into_owned();
        let out = sandbox.path(&format!("rt-{name}"));
        run([
            model.as_os_str(),
            out.as_os_str(),
            "--plan".as_ref(),
            plan.as_os_str(),
        ])
        .assert_ok();
        let original = std::fs::read(&model).unwrap();
        let written = std::fs::read(&out).unwrap();
        assert!(original == written, "{name}: round trip changed the bytes");
    }
}

#[test]
fn same_input_gives_identical_output_and_plan() {
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    let model = util::fixtures().join("clip_tiny_dynamo_op18.onnx");
    let mut outputs = Vec::new();
    for i in 0..2 {
        let out = sandbox.path(&format!("out{i}.onnx"));
        let plan_out = sandbox.path(&format!("plan{i}.json"));
        run([
            model.as_os_str(),
            out.as_os_str(),
            "--plan".as_ref(),
            plan.as_os_str(),
            "--plan-out".as_ref(),
            plan_out.as_os_str(),
        ])
        .assert_ok();
        outputs.push((
            std::fs::read(out).unwrap(),
            std::fs::read_to_string(plan_out).unwrap(),
        ));
    }
    assert!(outputs[0] == outputs[1]);
    // the written plan is itself a valid plan that reproduces the output
    let again = sandbox.path("again.onnx");
    run([
        model.as_os_str(),
        again.as_os_str(),
        "--plan".as_ref(),
        sandbox.path("plan0.json").as_os_str(),
    ])
    .assert_ok();
    assert!(std::fs::read(again).unwrap() == outputs[0].0);
}

#[test]
fn external_data_round_trip_restores_the_original() {
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    for name in [
        "clip_tiny_torchscript_op17.onnx",
        "blip_itm_tiny_dynamo_op18.onnx",
    ] {
        let model = util::fixtures().join(name);
        let external = sandbox.path(&format!("ext-{name}"));
        util::run_plan(&model, &external, &plan, &["--external-data", "always"]).assert_ok();
        let data = sandbox.path(&format!("ext-{name}.data"));
        let data_len = std::fs::metadata(&data).unwrap().len();
        let model_len = std::fs::metadata(&external).unwrap().len();
        let original_len = std::fs::metadata(&model).unwrap().len();
        assert!(
            data_len > 0 && model_len + data_len / 2 < original_len,
            "{name}: weights not moved out"
        );

        // An input with external data keeps it by default ...
        // (same file name in another folder, so the data location matches)
        std::fs::create_dir_all(sandbox.path("again")).unwrap();
        let again = sandbox.path(&format!("again/ext-{name}"));
        run([
            external.as_os_str(),
            again.as_os_str(),
            "--plan".as_ref(),
            plan.as_os_str(),
        ])
        .assert_ok();
        assert!(std::fs::read(&again).unwrap() == std::fs::read(&external).unwrap());
        let again_data = sandbox.path(&format!("again/ext-{name}.data"));
        assert!(std::fs::read(again_data).unwrap() == std::fs::read(&data).unwrap());

        // ... and embedding it again gives back the original file.
        let back = sandbox.path(&format!("back-{name}"));
        util::run_plan(&external, &back, &plan, &["--external-data", "never"]).assert_ok();
        assert!(
            std::fs::read(&back).unwrap() == std::fs::read(&model).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn external_data_offsets_are_page_aligned() {
    let sandbox = Sandbox::new();
    let plan = sandbox.empty_plan();
    let model = util::fixtures().join("clip_tiny_torchscript_op17.onnx");
    let out = sandbox.path("m.onnx");
    util::run_plan(&model, &out, &plan, &["--external-data", "always"]).assert_ok();
    use prost::Message;
    let proto =
        onnx_idprune::onnx::proto::ModelProto::decode(std::fs::read(&out).unwrap().as_slice())
            .unwrap();
    let mut externals = 0;
    for tensor in &proto.graph.unwrap().initializer {
        for entry in &tensor.external_data {
            if entry.key() == "offset" {
                externals += 1;
                assert_eq!(entry.value().parse::<u64>().unwrap() % 4096, 0);
            }
            if entry.key() == "location" {
                assert_eq!(entry.value(), "m.onnx.data");
            }
        }
    }
    assert!(externals > 10);
}
