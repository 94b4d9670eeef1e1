//! No output may replace an input, and no two outputs may be one file: every
//! subcommand that writes (the main job, `id --svg`, `calib -o`) checks all
//! its paths before any work, exits 1 with one line and writes nothing —
//! also when the collision goes through `./`, a symbolic link or a hard link,
//! or through a name derived from an option (`OUT.data`, the report's `.md`
//! and `.svg`).

mod util;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use util::{Run, Sandbox, fingerprint};

const MODEL: &str = "clip_tiny_torchscript_op17.onnx";

/// A sandbox holding every input a run can read: the model `m.onnx`, the
/// calibration file `c.npz`, the plan `p.json`, and images and captions
/// with their tokenizer and preprocessor config (next to the model, where
/// they are also found without `--tokenizer`/`--preprocessor`).
struct Inputs {
    sandbox: Sandbox,
    model: PathBuf,
    calib: PathBuf,
    plan: PathBuf,
    images: PathBuf,
    texts: PathBuf,
    tokenizer: PathBuf,
    preprocessor: PathBuf,
}

/// What the sandbox holds: names at the top and in `images/`, and the
/// contents and modification time of every file.
#[derive(Debug, PartialEq)]
struct Snapshot {
    listing: Vec<String>,
    images: Vec<String>,
    files: Vec<(PathBuf, (SystemTime, Vec<u8>))>,
}

impl Inputs {
    fn new() -> Self {
        let sandbox = Sandbox::new();
        let fixtures = util::fixtures();
        let copy = |from: &Path, name: &str| sandbox.write(name, std::fs::read(from).unwrap());
        let model = copy(&fixtures.join(MODEL), "m.onnx");
        let calib = copy(&fixtures.join("calib/clip_tiny_calib.npz"), "c.npz");
        let plan = copy(&fixtures.join("plans/empty.json"), "p.json");
        let pairs = fixtures.join("pairs");
        let texts = copy(&pairs.join("captions.txt"), "captions.txt");
        let tokenizer = copy(&pairs.join("tokenizer.json"), "tokenizer.json");
        let preprocessor = copy(
            &pairs.join("preprocessor_config.json"),
            "preprocessor_config.json",
        );
        for entry in std::fs::read_dir(pairs.join("images")).unwrap() {
            let entry = entry.unwrap();
            let name = format!("images/{}", entry.file_name().to_string_lossy());
            copy(&entry.path(), &name);
        }
        let images = sandbox.path("images");
        Self {
            sandbox,
            model,
            calib,
            plan,
            images,
            texts,
            tokenizer,
            preprocessor,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.sandbox.path(name)
    }

    /// `name` spelled through `./`.
    fn dotted(&self, name: &str) -> PathBuf {
        self.sandbox.root().join(".").join(name)
    }

    /// The first image of the folder.
    fn image(&self) -> PathBuf {
        self.images.join("img_00.png")
    }

    /// A symbolic link `name` to `target`.
    fn symlink(&self, target: &Path, name: &str) -> PathBuf {
        let link = self.path(name);
        std::os::unix::fs::symlink(target, &link).unwrap();
        link
    }

    /// A hard link `name` to `target`.
    fn hard_link(&self, target: &Path, name: &str) -> PathBuf {
        let link = self.path(name);
        std::fs::hard_link(target, &link).unwrap();
        link
    }

    /// `--images DIR --texts FILE`; the tokenizer and the preprocessor
    /// config are found next to the model.
    /// `MODEL OUT --plan PLAN` plus `extra`.
    fn plan_run(&self, out: &Path, extra: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
        with(
            args(&[&self.model, &out, &"--plan", &self.plan]),
            args(extra),
        )
    }

    fn pairs(&self) -> Vec<OsString> {
        vec![
            "--images".into(),
            self.images.clone().into(),
            "--texts".into(),
            self.texts.clone().into(),
        ]
    }

    fn snapshot(&self) -> Snapshot {
        let names = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let mut files = Vec::new();
        for dir in [self.sandbox.root(), self.images.as_path()] {
            for name in names(dir) {
                let path = dir.join(name);
                if path.is_file() {
                    files.push((path.clone(), fingerprint(&path)));
                }
            }
        }
        Snapshot {
            listing: self.sandbox.listing(),
            images: names(&self.images),
            files,
        }
    }

    /// Runs `args` and checks that it was refused with one line containing
    /// every needle, and that the sandbox is exactly as before.
    fn refused(&self, args: Vec<OsString>, needles: &[&str]) {
        let before = self.snapshot();
        let result = util::run(&args);
        check_refused(&result, &args, needles);
        assert!(
            self.snapshot() == before,
            "{args:?} changed, added or removed files"
        );
    }
}

fn check_refused(result: &Run, args: &[OsString], needles: &[&str]) {
    assert_eq!(result.code, 1, "{args:?}: {}", result.stderr);
    result.assert_error(1, "refusing to write");
    for needle in needles {
        assert!(
            result.stderr.contains(needle),
            "{args:?}: stderr should mention '{needle}': {}",
            result.stderr
        );
    }
}

/// An argument list from paths and strings.
fn args(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

fn with(mut args: Vec<OsString>, extra: Vec<OsString>) -> Vec<OsString> {
    args.extend(extra);
    args
}

const INPUT: &str = "is an input file";

#[test]
fn id_svg_may_not_replace_an_input() {
    let inputs = Inputs::new();
    let calib_link = inputs.symlink(&inputs.calib, "link.npz");
    let model_link = inputs.hard_link(&inputs.model, "hard.onnx");
    let npz = |svg: &Path| {
        args(&[
            &"id",
            &inputs.model,
            &"--calib",
            &inputs.calib,
            &"--samples",
            &"16",
            &"--svg",
            &svg,
        ])
    };
    for svg in [
        inputs.model.clone(),
        inputs.calib.clone(),
        inputs.dotted("c.npz"),
        inputs.dotted("m.onnx"),
        calib_link,
        model_link,
    ] {
        inputs.refused(npz(&svg), &[INPUT, &svg.display().to_string()]);
    }
    // images and captions: each file they read, the folder, and the
    // tokenizer and preprocessor config found next to the model
    let pairs = |svg: &Path| {
        with(
            args(&[&"id", &inputs.model, &"--samples", &"12", &"--svg", &svg]),
            inputs.pairs(),
        )
    };
    for svg in [
        inputs.texts.clone(),
        inputs.tokenizer.clone(),
        inputs.preprocessor.clone(),
        inputs.image(),
        inputs.images.clone(),
    ] {
        inputs.refused(pairs(&svg), &[INPUT]);
    }

    // distinct paths work
    let svg = inputs.path("plot.svg");
    let before = inputs.snapshot();
    util::run(npz(&svg)).assert_ok();
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg"), "{svg_text}");
    std::fs::remove_file(&svg).unwrap();
    assert!(inputs.snapshot() == before, "inputs changed");
}

#[test]
fn calib_output_may_not_replace_an_input() {
    let inputs = Inputs::new();
    let model_link = inputs.hard_link(&inputs.model, "hard.onnx");
    let texts_link = inputs.symlink(&inputs.texts, "link.txt");
    let calib = |out: &Path, extra: Vec<OsString>| {
        with(
            with(
                args(&[&"calib", &inputs.model, &"-o", &out]),
                inputs.pairs(),
            ),
            extra,
        )
    };
    for out in [
        inputs.model.clone(),
        inputs.dotted("m.onnx"),
        model_link,
        inputs.texts.clone(),
        texts_link,
        inputs.tokenizer.clone(),
        inputs.preprocessor.clone(),
        inputs.image(),
        inputs.images.clone(),
    ] {
        inputs.refused(calib(&out, Vec::new()), &[INPUT]);
    }
    // given explicitly, elsewhere: the same
    let elsewhere = inputs.path("other.json");
    std::fs::copy(&inputs.tokenizer, &elsewhere).unwrap();
    inputs.refused(
        calib(
            &elsewhere,
            vec!["--tokenizer".into(), elsewhere.clone().into()],
        ),
        &[INPUT, "other.json"],
    );

    // distinct paths work
    let out = inputs.path("pairs.npz");
    let before = inputs.snapshot();
    util::run(calib(&out, Vec::new())).assert_ok();
    assert!(std::fs::metadata(&out).unwrap().len() > 0);
    std::fs::remove_file(&out).unwrap();
    assert!(inputs.snapshot() == before, "inputs changed");
}

#[test]
fn main_job_outputs_may_not_replace_inputs() {
    let inputs = Inputs::new();
    let out = inputs.path("o.onnx");
    let plan = |out: &Path, extra: &[&dyn AsRef<OsStr>]| inputs.plan_run(out, extra);
    // OUT, --plan-out or --report = the plan
    inputs.refused(plan(&inputs.plan, &[]), &[INPUT, "p.json"]);
    inputs.refused(plan(&out, &[&"--plan-out", &inputs.plan]), &[INPUT]);
    inputs.refused(
        plan(&out, &[&"--report", &inputs.dotted("p.json")]),
        &[INPUT],
    );
    inputs.refused(plan(&out, &[&"--report", &inputs.model]), &[INPUT]);

    let calibrated = |out: &Path, calib: &Path, extra: &[&dyn AsRef<OsStr>]| {
        with(
            args(&[
                &inputs.model,
                &out,
                &"--calib",
                &calib,
                &"--keep-params",
                &"0.7",
                &"--samples",
                &"16",
                &"--holdout",
                &"8",
            ]),
            args(extra),
        )
    };
    // OUT, --plan-out or --report = the calibration file
    let calib = &inputs.calib;
    inputs.refused(calibrated(calib, calib, &[]), &[INPUT, "c.npz"]);
    inputs.refused(calibrated(&out, calib, &[&"--plan-out", calib]), &[INPUT]);
    inputs.refused(calibrated(&out, calib, &[&"--report", calib]), &[INPUT]);
    // the report's derived files: r.json writes r.svg, the calibration file
    let r_svg = inputs.path("r.svg");
    std::fs::copy(calib, &r_svg).unwrap();
    inputs.refused(
        calibrated(&out, &r_svg, &[&"--report", &inputs.path("r.json")]),
        &[INPUT, "r.svg (the --report SVG plot)"],
    );
    // r.md would replace the model
    let r_md = inputs.hard_link(&inputs.model, "r.md");
    inputs.refused(
        calibrated(&out, calib, &[&"--report", &inputs.path("r.json")]),
        &[INPUT, "r.md (the --report Markdown summary)"],
    );
    std::fs::remove_file(&r_md).unwrap();
    // the ONNX Runtime library
    let library = inputs.sandbox.write("libfake.so", b"not a library");
    inputs.refused(
        calibrated(
            &out,
            calib,
            &[&"--ort-lib", &library, &"--plan-out", &library],
        ),
        &[INPUT, "libfake.so"],
    );

    // images and captions (also with --plan, which reads them for repair)
    let paired = |out: &Path, extra: &[&dyn AsRef<OsStr>]| {
        with(
            with(
                args(&[&inputs.model, &out, &"--keep-params", &"0.7"]),
                inputs.pairs(),
            ),
            args(extra),
        )
    };
    for target in [
        inputs.texts.clone(),
        inputs.tokenizer.clone(),
        inputs.preprocessor.clone(),
        inputs.image(),
        inputs.images.clone(),
    ] {
        inputs.refused(paired(&target, &[]), &[INPUT]);
        inputs.refused(paired(&out, &[&"--plan-out", &target]), &[INPUT]);
    }
    inputs.refused(
        with(plan(&out, &[&"--report", &inputs.texts]), inputs.pairs()),
        &[INPUT],
    );
}

#[test]
fn main_job_outputs_may_not_collide() {
    let inputs = Inputs::new();
    let out = inputs.path("o.onnx");
    let plan = |out: &Path, extra: &[&dyn AsRef<OsStr>]| inputs.plan_run(out, extra);
    let x = inputs.path("x.json");
    inputs.refused(
        plan(&out, &[&"--report", &x, &"--plan-out", &x]),
        &["x.json", "is also the --plan-out file"],
    );
    inputs.refused(
        plan(
            &out,
            &[&"--report", &x, &"--plan-out", &inputs.dotted("x.json")],
        ),
        &["is also the --plan-out file"],
    );
    inputs.refused(
        plan(
            &out,
            &[
                &"--report",
                &inputs.path("r.json"),
                &"--plan-out",
                &inputs.path("r.md"),
            ],
        ),
        &[
            "r.md (the --report Markdown summary)",
            "is also the --plan-out file",
        ],
    );
    // OUT = the report's SVG plot
    inputs.refused(
        plan(
            &inputs.path("r.svg"),
            &[&"--report", &inputs.path("r.json")],
        ),
        &["r.svg (the --report SVG plot)", "is also OUT"],
    );
    // a report named .md or .svg would be replaced by its own summary/plot
    inputs.refused(
        plan(&out, &[&"--report", &inputs.path("r.md")]),
        &["is also the --report file"],
    );
    inputs.refused(
        plan(&out, &[&"--report", &inputs.path("r.svg")]),
        &["is also the --report file"],
    );
    // --plan-out = OUT or OUT.data
    inputs.refused(plan(&out, &[&"--plan-out", &out]), &["is also OUT"]);
    inputs.refused(
        plan(&out, &[&"--plan-out", &inputs.path("o.onnx.data")]),
        &["is also OUT's external data file"],
    );
    // OUT through a hard link to an existing report path
    let existing = inputs.sandbox.write("old.json", b"{}");
    let linked = inputs.hard_link(&existing, "old.onnx");
    inputs.refused(plan(&linked, &[&"--plan-out", &existing]), &["is also OUT"]);

    // the red-team case: a calibrated run whose OUT is the report's plot
    inputs.refused(
        args(&[
            &inputs.model,
            &inputs.path("r.svg"),
            &"--calib",
            &inputs.calib,
            &"--keep-params",
            &"0.7",
            &"--samples",
            &"16",
            &"--holdout",
            &"8",
            &"--report",
            &inputs.path("r.json"),
        ]),
        &["is also OUT"],
    );
}

#[test]
fn distinct_outputs_still_work() {
    let inputs = Inputs::new();
    let before = inputs.snapshot();
    let written = ["o.onnx", "applied.json", "r.json", "r.md", "r.svg"];
    util::run(args(&[
        &inputs.model,
        &inputs.path("o.onnx"),
        &"--plan",
        &inputs.plan,
        &"--plan-out",
        &inputs.path("applied.json"),
        &"--report",
        &inputs.path("r.json"),
    ]))
    .assert_ok();
    // the empty plan is a byte-identical round trip
    assert_eq!(
        std::fs::read(inputs.path("o.onnx")).unwrap(),
        std::fs::read(&inputs.model).unwrap()
    );
    let calibrated = util::run(args(&[
        &inputs.model,
        &inputs.path("c.onnx"),
        &"--calib",
        &inputs.calib,
        &"--keep-params",
        &"0.7",
        &"--samples",
        &"16",
        &"--holdout",
        &"8",
        &"--plan-out",
        &inputs.path("c.json"),
        &"--report",
        &inputs.path("c-report.json"),
    ]));
    calibrated.assert_ok();
    for name in written.iter().chain(&[
        "c.onnx",
        "c.json",
        "c-report.json",
        "c-report.md",
        "c-report.svg",
    ]) {
        let path = inputs.path(name);
        assert!(
            std::fs::metadata(&path).unwrap().len() > 0,
            "{name} missing"
        );
        std::fs::remove_file(path).unwrap();
    }
    assert!(inputs.snapshot() == before, "inputs changed");
}
