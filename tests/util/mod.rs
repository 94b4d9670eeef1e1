//! Shared helpers for integration tests: a fresh folder per test, a command
//! for the built binary, and checks for how a failed run must look.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use onnx_idprune::calib::{Array, Runtime, RuntimeOptions, npz};

/// Folder with the committed fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every committed fixture model, sorted by name.
pub fn fixture_models() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    assert!(models.len() >= 8, "fixtures missing: {models:?}");
    models
}

/// A fresh temporary folder for one test.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, bytes).unwrap();
        path
    }

    pub fn copy_fixture(&self, name: &str) -> PathBuf {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        self.write(name, bytes)
    }

    /// Names of all entries in the folder, sorted.
    pub fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Writes the empty plan and returns its path.
    pub fn empty_plan(&self) -> PathBuf {
        self.write(
            "empty.json",
            r#"{"format": "onnx-idprune-plan", "version": 1, "blocks": []}"#,
        )
    }
}

/// A finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args`.
pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_onnx-idprune"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Run {
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success, got {}: {}",
            self.code, self.stderr
        );
        self
    }

    /// The run failed with `code`, printed exactly one line to stderr that
    /// mentions `needle`, and did not panic.
    pub fn assert_error(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(self.code, code, "exit code; stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one line on stderr, got: {}",
            self.stderr
        );
        assert!(lines[0].starts_with("onnx-idprune: "), "{}", lines[0]);
        assert!(
            lines[0].to_lowercase().contains(&needle.to_lowercase()),
            "stderr should mention '{needle}': {}",
            lines[0]
        );
        self
    }
}

/// After a failed run: OUT, its data file and any temporary file are absent.
pub fn assert_no_output(sandbox: &Sandbox, out: &Path, before: &[String]) {
    assert!(
        !out.exists(),
        "{} must not exist after a failure",
        out.display()
    );
    let data = PathBuf::from(format!("{}.data", out.display()));
    assert!(
        !data.exists(),
        "{} must not exist after a failure",
        data.display()
    );
    assert_eq!(
        sandbox.listing(),
        before,
        "the failed run left files behind"
    );
}

/// Contents and modification time of a file, for "input unchanged" checks.
pub fn fingerprint(path: &Path) -> (std::time::SystemTime, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    (modified, bytes)
}

/// Runs `MODEL OUT --plan PLAN` with `extra` arguments.
pub fn run_plan(model: &Path, out: &Path, plan: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<std::ffi::OsString> =
        vec![model.into(), out.into(), "--plan".into(), plan.into()];
    args.extend(extra.iter().map(std::ffi::OsString::from));
    run(args)
}

/// The weight initializer of vision block 0's query projection in the
/// TorchScript CLIP fixtures, for tests that break that one layer.
pub fn vision_query_weight(
    graph: &mut onnx_idprune::onnx::proto::GraphProto,
) -> &mut onnx_idprune::onnx::proto::TensorProto {
    let weight = graph
        .node
        .iter()
        .find(|n| n.name() == "/vision_model/encoder/layers.0/self_attn/q_proj/MatMul")
        .map(|n| n.input[1].clone())
        .expect("the fixture's first vision q_proj MatMul");
    graph
        .initializer
        .iter_mut()
        .find(|t| t.name() == weight)
        .expect("the q_proj weight initializer")
}

/// The first `n` samples of the inputs the file takes.
pub fn inputs(model: &Path, npz_path: &Path, n: usize) -> onnx_idprune::calib::Inputs {
    let source = onnx_idprune::open(model).unwrap();
    let (inputs, _) = npz::read_npz(npz_path, &source.model.graph).unwrap();
    inputs.into_iter().map(|(k, v)| (k, v.rows(0, n))).collect()
}

pub fn read_outputs(path: &Path) -> Vec<(String, ndarray::ArrayD<f32>)> {
    let mut npz = ndarray_npy::NpzReader::new(std::fs::File::open(path).unwrap()).unwrap();
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

/// Largest absolute difference relative to the reference's largest
/// magnitude.
pub fn relative_error(got: &ndarray::ArrayD<f32>, want: &ndarray::ArrayD<f32>) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    got.iter()
        .zip(want.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Runs `model` on `inputs` and returns its float outputs.
pub fn outputs_of(
    model: &Path,
    feed: &onnx_idprune::calib::Inputs,
) -> Vec<(String, ndarray::ArrayD<f32>)> {
    let mut runtime = Runtime::from_file(model, &RuntimeOptions::default()).unwrap();
    runtime
        .run(feed)
        .unwrap()
        .into_iter()
        .filter_map(|(n, a)| match a {
            Array::F32(a) => Some((n, a)),
            _ => None,
        })
        .collect()
}

/// `inspect --json`'s `towers` (or an expectation of the same form) as
/// `(tower name, blocks)`, each block reduced to `keys`.
pub fn towers(towers: &serde_json::Value, keys: &[&str]) -> Vec<(String, Vec<serde_json::Value>)> {
    towers
        .as_array()
        .expect("towers is an array")
        .iter()
        .map(|t| {
            let blocks = t["blocks"]
                .as_array()
                .expect("blocks is an array")
                .iter()
                .map(|b| {
                    keys.iter()
                        .map(|k| (k.to_string(), b[*k].clone()))
                        .collect::<serde_json::Map<_, _>>()
                        .into()
                })
                .collect();
            (t["name"].as_str().unwrap_or_default().to_string(), blocks)
        })
        .collect()
}

/// Every file under `dir`: relative path → bytes.
pub fn contents(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut found = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                found.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    found
}
