//! `id MODEL --calib`: per-layer ID profiles through ONNX Runtime, and every
//! way calibration data can be wrong.

mod util;

use ndarray::{Array2, Array4};
use ndarray_npy::NpzWriter;
use serde_json::Value;
use util::{Sandbox, run};

const CLIP: &str = "clip_tiny_torchscript_op17.onnx";

fn profile(model: &str, extra: &[&str]) -> Value {
    let model = util::fixtures().join(model);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "id".as_ref(),
        model.as_os_str(),
        "--calib".as_ref(),
        calib.as_os_str(),
        "--json".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let result = run(args);
    assert_eq!(result.code, 0, "{}", result.stderr);
    serde_json::from_str(&result.stdout).unwrap()
}

#[test]
fn profiles_every_block_of_both_towers() {
    for (model, vision, text) in [
        (CLIP, 3, 2),
        ("clip_tiny_ort_fused.onnx", 3, 2),
        ("blip_itm_tiny_dynamo_op18.onnx", 2, 2),
    ] {
        let json = profile(model, &["--samples", "64"]);
        assert_eq!(json["samples"], 64);
        assert_eq!(json["provider"], "cpu");
        let towers = json["towers"].as_array().unwrap();
        assert_eq!(towers[0]["name"], "vision", "{model}");
        assert_eq!(
            towers[0]["layers"].as_array().unwrap().len(),
            vision,
            "{model}"
        );
        assert_eq!(towers[1]["name"], "text", "{model}");
        assert_eq!(
            towers[1]["layers"].as_array().unwrap().len(),
            text,
            "{model}"
        );
        for tower in towers {
            for (i, layer) in tower["layers"].as_array().unwrap().iter().enumerate() {
                assert_eq!(layer["block"], i as u64);
                let id = layer["id"].as_f64().unwrap();
                assert!(id.is_finite() && id > 0.5, "{model}: {layer}");
                assert_eq!(layer["n"], 64);
            }
        }
    }
}

#[test]
fn the_fused_and_unfused_exports_measure_the_same_function() {
    // ONNX Runtime's fusions change the graph, not the block outputs.
    let a = profile(CLIP, &["--samples", "48", "--pooling", "mean"]);
    let b = profile(
        "clip_tiny_ort_fused.onnx",
        &["--samples", "48", "--pooling", "mean"],
    );
    for (ta, tb) in a["towers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["towers"].as_array().unwrap())
    {
        for (la, lb) in ta["layers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(tb["layers"].as_array().unwrap())
        {
            let (x, y) = (la["id"].as_f64().unwrap(), lb["id"].as_f64().unwrap());
            assert!((x - y).abs() < 1e-3 * x, "{la} vs {lb}");
        }
    }
}

#[test]
fn deterministic_with_table_and_svg() {
    let sandbox = Sandbox::new();
    assert_eq!(
        profile(CLIP, &["--samples", "32"]),
        profile(CLIP, &["--samples", "32"])
    );
    let svg = sandbox.path("id.svg");
    let model = util::fixtures().join(CLIP);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let result = run([
        "id".as_ref(),
        model.as_os_str(),
        "--calib".as_ref(),
        calib.as_os_str(),
        "--samples".as_ref(),
        "32".as_ref(),
        "--svg".as_ref(),
        svg.as_os_str(),
    ]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert!(
        result.stdout.contains("| block | vision ID | text ID |"),
        "{}",
        result.stdout
    );
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.matches("<polyline").count() == 2);
}

/// Writes an npz with the given CLIP-like arrays.
fn npz(
    sandbox: &Sandbox,
    name: &str,
    ids: Option<Array2<i64>>,
    mask: Option<Array2<i64>>,
    pixels: Option<Array4<f32>>,
) -> std::path::PathBuf {
    let path = sandbox.path(name);
    let mut w = NpzWriter::new(std::fs::File::create(&path).unwrap());
    if let Some(a) = ids {
        w.add_array("input_ids", &a).unwrap();
    }
    if let Some(a) = mask {
        w.add_array("attention_mask", &a).unwrap();
    }
    if let Some(a) = pixels {
        w.add_array("pixel_values", &a).unwrap();
    }
    w.finish().unwrap();
    path
}

#[test]
fn bad_calibration_data_is_refused_clearly() {
    let sandbox = Sandbox::new();
    let model = util::fixtures().join(CLIP);
    let ids = || Some(Array2::<i64>::from_elem((8, 7), 5));
    let mask = || Some(Array2::<i64>::ones((8, 7)));
    let pixels = || Some(Array4::<f32>::from_elem((8, 3, 32, 32), 0.5));
    let try_calib = |calib: &std::path::Path, extra: &[&str], needle: &str| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "id".as_ref(),
            model.as_os_str(),
            "--calib".as_ref(),
            calib.as_os_str(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        run(args).assert_error(1, needle);
    };
    let missing = npz(&sandbox, "missing.npz", ids(), mask(), None);
    try_calib(
        &missing,
        &["--samples", "8"],
        "no array named 'pixel_values'",
    );

    let wrong_dtype = sandbox.path("dtype.npz");
    {
        let mut w = NpzWriter::new(std::fs::File::create(&wrong_dtype).unwrap());
        w.add_array("input_ids", &Array2::<f64>::from_elem((8, 7), 5.0))
            .unwrap();
        w.add_array("attention_mask", &mask().unwrap()).unwrap();
        w.add_array("pixel_values", &pixels().unwrap()).unwrap();
        w.finish().unwrap();
    }
    try_calib(&wrong_dtype, &["--samples", "8"], "cannot be read as int64");

    let small = npz(
        &sandbox,
        "small.npz",
        ids(),
        mask(),
        Some(Array4::<f32>::zeros((8, 3, 16, 16))),
    );
    try_calib(&small, &["--samples", "8"], "needs 32 along axis 2");

    let enough = npz(&sandbox, "ok.npz", ids(), mask(), pixels());
    try_calib(
        &enough,
        &["--samples", "100"],
        "it has 8 samples, 100 were asked for",
    );

    let mut nan = pixels().unwrap();
    nan[[3, 1, 2, 2]] = f32::NAN;
    let nan = npz(&sandbox, "nan.npz", ids(), mask(), Some(nan));
    try_calib(&nan, &["--samples", "8"], "NaN or infinite");

    let not_npz = sandbox.write("x.npz", "plain text");
    try_calib(&not_npz, &["--samples", "8"], "not an npz archive");
}

#[test]
fn requested_providers_are_strict() {
    let model = util::fixtures().join(CLIP);
    let calib = util::fixtures().join("calib/clip_tiny_calib.npz");
    let with = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "id".into(),
            model.clone().into(),
            "--calib".into(),
            calib.clone().into(),
            "--samples".into(),
            "16".into(),
        ];
        args.extend(extra.iter().map(|s| std::ffi::OsString::from(*s)));
        run(args)
    };
    with(&["--ep", "cuda"]).assert_error(1, "execution provider 'cuda' is not available");
    let result = with(&["--ep", "tensorrt", "--allow-fallback", "--json"]);
    assert_eq!(result.code, 0, "{}", result.stderr);
    let json: Value = serde_json::from_str(&result.stdout).unwrap();
    assert_eq!(json["provider"], "cpu", "the provider that ran is reported");
}

#[test]
fn a_small_memory_bound_splits_the_work_into_passes_with_the_same_result() {
    // 100 KiB holds less than one vision layer's flattened features (64 ×
    // 17 tokens × 32 channels × 4 bytes), so every layer gets its own pass.
    let all = profile(CLIP, &["--samples", "64"]);
    let passes = profile(CLIP, &["--samples", "64", "--max-memory", "100K"]);
    assert_eq!(all, passes);
}

/// `--images DIR --texts FILE` with the fixture's tokenizer and
/// preprocessor, as extra arguments.
fn pair_args(pairs: &std::path::Path) -> Vec<std::ffi::OsString> {
    vec![
        "--images".into(),
        pairs.join("images").into(),
        "--texts".into(),
        pairs.join("captions.txt").into(),
        "--tokenizer".into(),
        pairs.join("tokenizer.json").into(),
        "--preprocessor".into(),
        pairs.join("preprocessor_config.json").into(),
    ]
}

#[test]
fn images_and_captions_calibrate_like_the_npz_they_become() {
    let sandbox = Sandbox::new();
    let pairs = util::fixtures().join("pairs");
    let model = util::fixtures().join(CLIP);
    // The npz that `calib` writes and the folder give the same profile.
    let npz = sandbox.path("pairs.npz");
    let mut args: Vec<std::ffi::OsString> = vec![
        "calib".into(),
        model.clone().into(),
        "-o".into(),
        npz.clone().into(),
    ];
    args.extend(pair_args(&pairs));
    run(args).assert_ok();
    let mut from_pairs: Vec<std::ffi::OsString> = vec![
        "id".into(),
        model.clone().into(),
        "--samples".into(),
        "12".into(),
        "--json".into(),
    ];
    from_pairs.extend(pair_args(&pairs));
    let a = run(from_pairs);
    assert_eq!(a.code, 0, "{}", a.stderr);
    let b = run([
        "id".as_ref(),
        model.as_os_str(),
        "--calib".as_ref(),
        npz.as_os_str(),
        "--samples".as_ref(),
        "12".as_ref(),
        "--json".as_ref(),
    ]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    assert_eq!(a.stdout, b.stdout);
    let json: Value = serde_json::from_str(&a.stdout).unwrap();
    assert_eq!(json["samples"], 12);
    // The main job runs from the folder too (3 of 12 held out).
    let out = sandbox.path("out.onnx");
    let plan = sandbox.path("plan.json");
    let mut prune: Vec<std::ffi::OsString> = vec![
        model.clone().into(),
        out.clone().into(),
        "--keep-params".into(),
        "0.8".into(),
        "--plan-out".into(),
        plan.clone().into(),
    ];
    prune.extend(pair_args(&pairs));
    let result = run(prune);
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert!(out.exists() && result.stderr.contains("held-out cosine"));
    // Its plan re-applies from the same folder byte for byte: the repair
    // refits from the pairs a load of the plan's sample count picks (spread
    // over the folder by count), not from the statistics the search
    // gathered on the first decision samples of its larger load.
    let again = sandbox.path("again.onnx");
    let mut reapply: Vec<std::ffi::OsString> = vec![
        model.clone().into(),
        again.clone().into(),
        "--plan".into(),
        plan.into(),
    ];
    reapply.extend(pair_args(&pairs));
    run(reapply).assert_ok();
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&out).unwrap());
}

#[test]
fn bad_images_and_captions_are_refused_clearly() {
    let sandbox = Sandbox::new();
    let pairs = util::fixtures().join("pairs");
    let model = util::fixtures().join(CLIP);
    let calib = |extra: Vec<std::ffi::OsString>| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "calib".into(),
            model.clone().into(),
            "-o".into(),
            sandbox.path("x.npz").into(),
        ];
        args.extend(extra);
        run(args)
    };
    let empty = sandbox.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let broken = sandbox.path("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("a.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let texts = pairs.join("captions.txt");
    let one_caption = sandbox.path("one.txt");
    std::fs::write(&one_caption, "a red circle\n").unwrap();
    let tokenizer = pairs.join("tokenizer.json");
    let blank = sandbox.path("blank.txt");
    std::fs::write(&blank, "\n  \n").unwrap();
    let not_tokenizer = sandbox.path("tok.json");
    std::fs::write(&not_tokenizer, "{\"model\": 3}").unwrap();
    let bad_pre = sandbox.path("pre.json");
    std::fs::write(&bad_pre, "{\"image_std\": [0, 1, 1]}").unwrap();
    let wrong_crop = sandbox.path("crop.json");
    std::fs::write(&wrong_crop, "{\"crop_size\": 48}").unwrap();
    let os = |p: &std::path::Path| std::ffi::OsString::from(p);
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "--images".into(),
                os(&empty),
                "--texts".into(),
                os(&texts),
                "--tokenizer".into(),
                os(&tokenizer),
            ],
            "no .png or .jpg images",
        ),
        (
            vec![
                "--images".into(),
                os(&broken),
                "--texts".into(),
                os(&one_caption),
                "--tokenizer".into(),
                os(&tokenizer),
            ],
            "not a readable image",
        ),
        (
            vec![
                "--images".into(),
                pairs.join("images").into(),
                "--texts".into(),
                os(&blank),
                "--tokenizer".into(),
                os(&tokenizer),
            ],
            "holds no captions",
        ),
        (
            vec![
                "--images".into(),
                pairs.join("images").into(),
                "--texts".into(),
                os(&texts),
            ],
            "captions need a tokenizer",
        ),
        (
            vec![
                "--images".into(),
                pairs.join("images").into(),
                "--texts".into(),
                os(&texts),
                "--tokenizer".into(),
                os(&not_tokenizer),
            ],
            "not a Hugging Face tokenizer",
        ),
        (
            vec![
                "--images".into(),
                pairs.join("images").into(),
                "--texts".into(),
                os(&texts),
                "--tokenizer".into(),
                os(&tokenizer),
                "--preprocessor".into(),
                os(&bad_pre),
            ],
            "image_std",
        ),
        (
            vec![
                "--images".into(),
                pairs.join("images").into(),
                "--texts".into(),
                os(&texts),
                "--tokenizer".into(),
                os(&tokenizer),
                "--preprocessor".into(),
                os(&wrong_crop),
            ],
            "the model takes 32×32",
        ),
        (
            vec![
                "--texts".into(),
                os(&texts),
                "--tokenizer".into(),
                os(&tokenizer),
            ],
            "give --images DIR",
        ),
        (
            vec![
                "--images".into(),
                sandbox.path("missing").into(),
                "--texts".into(),
                os(&texts),
                "--tokenizer".into(),
                os(&tokenizer),
            ],
            "missing",
        ),
    ];
    for (args, message) in cases {
        calib(args).assert_error(1, message);
        assert!(!sandbox.path("x.npz").exists());
    }
}
