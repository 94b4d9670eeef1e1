//! # onnx-idprune
//!
//! A compiler pass for ONNX vision-language models (CLIP, BLIP): it measures
//! the intrinsic dimension of each transformer layer's representation and
//! writes a smaller model with the least important blocks, sub-blocks, heads
//! and neurons removed — more in the text tower than in the vision tower.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! onnx (load) ─► ir ─► arch (discover) ─► calib (run) ─► id ─► plan ─► rewrite ─► verify ─► onnx (save)
//! ```
//!
//! This crate is usable without the CLI. Re-applying a saved plan:
//!
//! ```no_run
//! use onnx_idprune::{PruneJob, plan::Plan};
//! let job = PruneJob::new("clip.onnx", "clip-pruned.onnx").with_plan(Plan::read("plan.json".as_ref())?);
//! let outcome = job.run()?;
//! println!("wrote {} bytes", outcome.saved.model_bytes);
//! # Ok::<(), onnx_idprune::Error>(())
//! ```
#![deny(missing_docs)]

pub mod arch;
pub mod calib;
pub mod decide;
pub mod id;
pub mod ir;
pub mod onnx;
pub mod plan;
pub mod profile;
pub mod report;
pub mod rewrite;
pub mod verify;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ir::Model;
use onnx::{ExternalData, LoadedModel, SaveOptions, SaveSummary};
use plan::Plan;

/// Everything that can stop a run. Each variant carries the context (file,
/// node, plan entry) needed for a one-line message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the model failed.
    #[error(transparent)]
    Load(#[from] onnx::LoadError),
    /// The model's graph is malformed.
    #[error("{}: {error}", path.display())]
    Graph {
        /// The model file.
        path: PathBuf,
        /// The problem.
        error: ir::IrError,
    },
    /// Writing the output failed.
    #[error(transparent)]
    Save(#[from] onnx::SaveError),
    /// The plan is invalid.
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// The model's architecture could not be discovered.
    #[error("{}: {error}", path.display())]
    Discover {
        /// The model file.
        path: PathBuf,
        /// What went wrong.
        error: arch::DiscoverError,
    },
    /// The plan does not fit the model or a rewrite failed.
    #[error(transparent)]
    Rewrite(#[from] rewrite::RewriteError),
    /// ONNX Runtime could not be loaded or failed.
    #[error(transparent)]
    Runtime(#[from] calib::RuntimeError),
    /// Input data is unusable.
    #[error(transparent)]
    Data(#[from] calib::DataError),
    /// The request needs a feature this build does not have yet.
    #[error("{0}")]
    Unsupported(String),
    /// The pruned model does not follow the original closely enough.
    #[error(
        "fidelity gate not met: held-out output cosine {got:.6} is below --min-fidelity {required}; nothing written"
    )]
    Fidelity {
        /// Measured minimum cosine.
        got: f64,
        /// Required.
        required: f64,
    },
    /// Writing the plan file failed.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
}

/// A model read from disk: its file facts and the IR built from it.
#[derive(Debug, Clone)]
pub struct Source {
    /// File facts (path, size, external data files).
    pub file: LoadedModel,
    /// The IR.
    pub model: Model,
}

impl Source {
    /// Files that an output must never replace: the model and its external
    /// data, canonicalised.
    pub fn protected_files(&self) -> Vec<PathBuf> {
        let model =
            std::fs::canonicalize(&self.file.path).unwrap_or_else(|_| self.file.path.clone());
        std::iter::once(model)
            .chain(self.file.external_files.iter().cloned())
            .collect()
    }
}

/// Loads a model file and builds its IR.
pub fn open(path: &Path) -> Result<Source, Error> {
    let mut file = onnx::load(path)?;
    let proto = std::mem::take(&mut file.proto);
    let model = Model::from_proto(proto).map_err(|error| Error::Graph {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(Source { file, model })
}

/// The main job: read IN, apply a plan, write OUT.
#[derive(Debug, Clone)]
pub struct PruneJob {
    /// Model to read.
    pub input: PathBuf,
    /// Model to write.
    pub output: PathBuf,
    /// Plan to apply.
    pub plan: Option<Plan>,
    /// The file `plan` was read from, if any: no output may replace it.
    pub plan_file: Option<PathBuf>,
    /// Where to write the applied (normalised) plan.
    pub plan_out: Option<PathBuf>,
    /// External data placement. `None`: like the input (external if the
    /// input used external data), and external anyway above 2 GiB.
    pub external_data: Option<ExternalData>,
    /// Calibration data and decision settings: make the plan from
    /// measurements (used when `plan` is `None`).
    pub decide: Option<(calib::CalibSource, decide::DecideOptions)>,
    /// Refuse to write OUT when the held-out output cosine is below this.
    pub min_fidelity: Option<f64>,
    /// Write a JSON report here, and a Markdown summary and an SVG plot
    /// next to it ([`report::files`]: the extension replaced by `md`, `svg`).
    pub report: Option<PathBuf>,
    /// Calibration data and runtime for re-applying a `plan` that records a
    /// least-squares repair (decided runs use their own calibration file).
    pub repair_data: Option<(calib::CalibSource, calib::RuntimeOptions)>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was written.
    pub saved: SaveSummary,
    /// The plan that was applied.
    pub plan: Plan,
    /// The rewrites made, in order (`drop_block vision/3`, …).
    pub rewrites: Vec<String>,
    /// Seconds spent in each stage, in order.
    pub timings: Vec<(&'static str, f64)>,
    /// The decision stage's measurements, when the plan was made here.
    pub decision: Option<decide::Decision>,
    /// Fidelity on held-out samples, when measured.
    pub fidelity: Option<verify::Fidelity>,
    /// Least-squares refits made, when the plan asks for repair.
    pub refits: Vec<rewrite::repair::Refit>,
}

impl PruneJob {
    /// A job reading `input` and writing `output`.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            output: output.into(),
            plan: None,
            plan_file: None,
            plan_out: None,
            external_data: None,
            decide: None,
            min_fidelity: None,
            report: None,
            repair_data: None,
        }
    }

    /// Applies `plan` (no calibration).
    pub fn with_plan(mut self, plan: Plan) -> Self {
        self.plan = Some(plan);
        self
    }

    /// Runs the job. On error nothing is written. Before any work the
    /// job's files are checked ([`PruneJob::files`]): no output may replace
    /// an input, and no two outputs may be the same file.
    pub fn run(&self) -> Result<Outcome, Error> {
        let mut timings = Vec::new();
        let mut clock = Instant::now();
        let mut lap = |name: &'static str, timings: &mut Vec<(&'static str, f64)>| {
            timings.push((name, clock.elapsed().as_secs_f64()));
            clock = Instant::now();
        };
        if self.plan.is_none() && self.decide.is_none() {
            return Err(Error::Unsupported(
                "give --plan FILE, or --calib FILE.npz with --keep-params F".into(),
            ));
        }
        let source = open(&self.input)?;
        self.files(&source).check()?;
        lap("load", &mut timings);

        let needs_arch = self.plan.as_ref().is_none_or(|p| !p.is_empty());
        let arch = if needs_arch {
            Some(
                arch::discover(&source.model.graph).map_err(|error| Error::Discover {
                    path: self.input.clone(),
                    error,
                })?,
            )
        } else {
            None
        };
        lap("discover", &mut timings);
        let (plan, decision) = match (&self.plan, &self.decide, &arch) {
            (Some(plan), _, _) => (plan.clone(), None),
            (None, Some((calib, options)), Some(arch)) => {
                let decision = decide::decide(&source, arch, calib, options)?;
                (decision.plan.clone(), Some(decision))
            }
            _ => unreachable!("checked above"),
        };
        lap("calibrate+decide", &mut timings);

        let mut model = source.model.clone();
        let mut rewrites = Vec::new();
        if let (false, Some(arch)) = (plan.is_empty(), &arch) {
            rewrites = rewrite::apply(&mut model, arch, &plan)?.rewrites;
        }
        lap("rewrite", &mut timings);
        let mut refits = Vec::new();
        if let (Some(spec), Some(arch)) = (&plan.repair, &arch) {
            refits = self.repair(&source, &mut model, arch, &plan, spec)?;
            lap("repair", &mut timings);
        }
        let pruned = model.to_proto();

        let mut fidelity = None;
        if let (Some(decision), Some((_, options))) = (&decision, &self.decide)
            && decision.holdout_samples > 0
        {
            let original = onnx::encode_to_vec(&source.model.to_proto());
            let candidate = onnx::encode_to_vec(&pruned);
            let fixed = calib::collect::static_batch(&source.model);
            let measured = verify::compare(
                &original,
                &candidate,
                &decision.holdout,
                decision.holdout_samples,
                fixed,
                &options.profile.runtime,
            )?;
            if let Some(required) = self.min_fidelity
                && measured.min_cosine < required
            {
                return Err(Error::Fidelity {
                    got: measured.min_cosine,
                    required,
                });
            }
            fidelity = Some(measured);
        } else if self.min_fidelity.is_some() {
            return Err(Error::Unsupported(
                "--min-fidelity needs held-out calibration samples (--calib with at least 8 samples)".into(),
            ));
        }
        lap("verify", &mut timings);

        let external_data =
            self.external_data
                .unwrap_or(if source.file.external_files.is_empty() {
                    ExternalData::Auto
                } else {
                    ExternalData::Always
                });
        let options = SaveOptions {
            external_data,
            ..Default::default()
        };
        let saved = onnx::save(&pruned, &self.output, &options)?;
        lap("save", &mut timings);
        let mut outcome = Outcome {
            saved,
            plan: plan.normalized(),
            rewrites,
            timings: Vec::new(),
            decision,
            fidelity,
            refits,
        };
        let written = self.write_companions(&source, arch.as_ref(), &outcome, &timings);
        if let Err(e) = written {
            // OUT and its plan/report go together: without them, no OUT.
            let _ = std::fs::remove_file(&self.output);
            if let Some(data) = &outcome.saved.external_file {
                let _ = std::fs::remove_file(data);
            }
            return Err(e);
        }
        outcome.timings = timings;
        Ok(outcome)
    }

    /// Every file the job reads (`source` and its external data, the plan
    /// file, the calibration data, the ONNX Runtime library) and writes
    /// (OUT, `OUT.data`, `--plan-out`, the report's three files).
    pub fn files(&self, source: &Source) -> FileGuard {
        let mut guard = FileGuard::new();
        guard.inputs(source.protected_files());
        guard.inputs(self.plan_file.clone());
        if let Some((calib, options)) = &self.decide {
            guard.inputs(calib_files(calib));
            guard.inputs(runtime_files(&options.profile.runtime));
        }
        if let Some((calib, runtime)) = &self.repair_data {
            guard.inputs(calib_files(calib));
            guard.inputs(runtime_files(runtime));
        }
        guard.output(&self.output, "OUT");
        if self.external_data != Some(ExternalData::Never) {
            guard.derived_output(
                onnx::external_path(&self.output),
                "OUT's external data file",
            );
        }
        if let Some(plan_out) = &self.plan_out {
            guard.output(plan_out, "the --plan-out file");
        }
        if let Some(report) = &self.report {
            let [json, markdown, svg] = report::files(report);
            guard
                .output(json, "the --report file")
                .derived_output(markdown, "the --report Markdown summary")
                .derived_output(svg, "the --report SVG plot");
        }
        guard
    }

    /// Least-squares repair of the slimmed sub-blocks of `model` (`source`
    /// rewritten by `plan`) on the calibration samples `spec` names.
    fn repair(
        &self,
        source: &Source,
        model: &mut Model,
        arch: &arch::Architecture,
        plan: &Plan,
        spec: &plan::Repair,
    ) -> Result<Vec<rewrite::repair::Refit>, Error> {
        let (calib, runtime) = match (&self.decide, &self.repair_data) {
            (Some((calib, options)), _) => (calib, &options.profile.runtime),
            (None, Some((calib, runtime))) => (calib, runtime),
            (None, None) => {
                return Err(Error::Unsupported(
                    "the plan refits weights on calibration data (\"repair\"); give the same --calib file".into(),
                ));
            }
        };
        let graph = &source.model.graph;
        let (inputs, total) = calib.load(graph, spec.samples)?;
        if total < spec.samples {
            return Err(Error::Data(calib::data::DataError::Mismatch {
                path: calib.label(),
                reason: format!(
                    "the plan's repair read {} samples, the file has {total}",
                    spec.samples
                ),
            }));
        }
        let mask = calib::data::mask_input(graph, &inputs);
        let statistics = rewrite::repair::statistics(
            &source.model,
            arch,
            &[plan],
            &inputs,
            spec.samples,
            mask.as_deref(),
            runtime,
        )?;
        Ok(rewrite::repair::apply(
            &source.model,
            model,
            arch,
            plan,
            &statistics,
        )?)
    }

    fn write_companions(
        &self,
        source: &Source,
        arch: Option<&arch::Architecture>,
        outcome: &Outcome,
        timings: &[(&'static str, f64)],
    ) -> Result<(), Error> {
        if let Some(plan_out) = &self.plan_out {
            write_atomic(plan_out, outcome.plan.to_json().as_bytes())?;
        }
        let Some(path) = &self.report else {
            return Ok(());
        };
        let report = report::Report::new(self, source, arch, outcome, timings);
        let [json, markdown, svg] = report::files(path);
        write_atomic(&json, report.to_json().as_bytes())?;
        write_atomic(&markdown, report.to_markdown().as_bytes())?;
        write_atomic(&svg, report.to_svg().as_bytes())?;
        Ok(())
    }
}

/// The files a calibration source reads: the npz, or the captions, the
/// tokenizer and preprocessor files (given, or found next to the model), the
/// image folder and every image in it. Files that do not exist are left
/// out (reading them fails later with its own message).
pub fn calib_files(source: &calib::CalibSource) -> Vec<PathBuf> {
    let pairs = match source {
        calib::CalibSource::Npz(path) => return vec![path.clone()],
        calib::CalibSource::Pairs(pairs) => pairs,
    };
    let near_model = |given: &Option<PathBuf>, name: &str| {
        given.clone().or_else(|| {
            pairs
                .model_dir
                .as_ref()
                .map(|d| d.join(name))
                .filter(|p| p.is_file())
        })
    };
    let mut files = Vec::new();
    if let Some(texts) = &pairs.texts {
        files.push(texts.clone());
        files.extend(near_model(&pairs.tokenizer, "tokenizer.json"));
    }
    if let Some(images) = &pairs.images {
        files.push(images.clone());
        files.extend(near_model(&pairs.preprocessor, "preprocessor_config.json"));
        if let Ok(entries) = std::fs::read_dir(images) {
            // What the loader reads: regular files named *.png, *.jpg, *.jpeg.
            files.extend(
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_file()
                            && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                                matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                            })
                    }),
            );
        }
    }
    files
}

/// The ONNX Runtime library a run with `options` would load, when found.
pub fn runtime_files(options: &calib::RuntimeOptions) -> Vec<PathBuf> {
    calib::locate_library(options.library.as_deref())
        .ok()
        .into_iter()
        .collect()
}

/// The files of the model at `path` that no output may replace: the model
/// and its external data (canonical paths). Loads the model to find them.
pub fn model_files(path: &Path) -> Result<Vec<PathBuf>, Error> {
    let file = onnx::load(path)?;
    let model = std::fs::canonicalize(&file.path).unwrap_or_else(|_| file.path.clone());
    Ok(std::iter::once(model).chain(file.external_files).collect())
}

/// The files one run reads and the files it writes, checked together before
/// any work: no output may replace an input, and no two outputs may be the
/// same file — also through another spelling of the path (`./`, `..`), a
/// symbolic link or a hard link. A refused run writes nothing.
#[derive(Debug, Clone, Default)]
pub struct FileGuard {
    inputs: Vec<PathBuf>,
    outputs: Vec<Destination>,
}

#[derive(Debug, Clone)]
struct Destination {
    path: PathBuf,
    /// How messages name it as the other side of a collision.
    name: &'static str,
    /// Whether its own name is derived from another output's (messages then
    /// say what it is).
    derived: bool,
}

/// What identifies a file: its canonical path, and its device and inode
/// when it exists.
#[derive(Debug)]
struct Identity {
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

impl Identity {
    fn of(resolved: PathBuf) -> Self {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&resolved)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Self {
            path: resolved,
            inode,
        }
    }

    fn input(path: &Path) -> Self {
        Self::of(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }

    fn output(path: &Path) -> Self {
        Self::of(resolve_destination(path).unwrap_or_else(|| path.to_path_buf()))
    }

    fn same(&self, other: &Identity) -> bool {
        self.path == other.path || (self.inode.is_some() && self.inode == other.inode)
    }
}

impl FileGuard {
    /// No files yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A file (or folder) the run reads.
    pub fn input(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.inputs.push(path.into());
        self
    }

    /// Files the run reads.
    pub fn inputs(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> &mut Self {
        self.inputs.extend(paths);
        self
    }

    /// A file the run writes, given by the user; `name` is how messages
    /// refer to it (`OUT`, `the --plan-out file`).
    pub fn output(&mut self, path: impl Into<PathBuf>, name: &'static str) -> &mut Self {
        self.outputs.push(Destination {
            path: path.into(),
            name,
            derived: false,
        });
        self
    }

    /// A file the run writes whose name is derived from another output's
    /// (`OUT.data`, the report's Markdown summary): messages say what it is.
    pub fn derived_output(&mut self, path: impl Into<PathBuf>, name: &'static str) -> &mut Self {
        self.outputs.push(Destination {
            path: path.into(),
            name,
            derived: true,
        });
        self
    }

    /// Refuses the first output, in the order given, that is an input or
    /// the same file as an earlier output. Reads file metadata only.
    pub fn check(&self) -> Result<(), onnx::SaveError> {
        let inputs: Vec<Identity> = self.inputs.iter().map(|p| Identity::input(p)).collect();
        let mut earlier: Vec<(Identity, &Destination)> = Vec::new();
        for out in &self.outputs {
            let identity = Identity::output(&out.path);
            let role = out.derived.then_some(out.name);
            if let Some(i) = inputs.iter().position(|i| i.same(&identity)) {
                return Err(onnx::SaveError::OverwritesInput {
                    path: out.path.clone(),
                    role,
                    input: self.inputs[i].clone(),
                });
            }
            if let Some((_, other)) = earlier.iter().find(|(e, _)| e.same(&identity)) {
                return Err(onnx::SaveError::OverwritesOutput {
                    path: out.path.clone(),
                    role,
                    other: other.name,
                });
            }
            earlier.push((identity, out));
        }
        Ok(())
    }
}

/// Where writing `path` lands: the canonical file it names (through
/// symbolic links), or for a file that does not exist yet its canonical
/// folder joined with its name. `None` when the folder does not exist.
fn resolve_destination(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
}

/// Writes a small file atomically (temporary file in the same folder, then
/// rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let err = |error| Error::Write {
        path: path.to_path_buf(),
        error,
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = onnx::staging::Staged::new_in(folder, &name).map_err(err)?;
    tmp.as_file_mut().write_all(contents).map_err(err)?;
    tmp.persist(path).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_guard_finds_collisions_through_any_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.npz");
        std::fs::write(&input, b"x").unwrap();
        let hard = dir.path().join("hard.bin");
        std::fs::hard_link(&input, &hard).unwrap();
        let soft = dir.path().join("soft.bin");
        std::os::unix::fs::symlink(&input, &soft).unwrap();
        let dotted = dir.path().join(".").join("in.npz");
        for out in [&input, &hard, &soft, &dotted] {
            let mut guard = FileGuard::new();
            guard.input(&input).output(out, "OUT");
            let err = guard.check().unwrap_err().to_string();
            assert!(err.contains("it is an input file"), "{err}");
        }
        // two outputs that do not exist yet, spelled differently
        let mut guard = FileGuard::new();
        guard
            .input(&input)
            .output(dir.path().join("a.json"), "the --plan-out file")
            .derived_output(dir.path().join(".").join("a.json"), "the report's plot");
        let err = guard.check().unwrap_err().to_string();
        assert!(
            err.ends_with("a.json (the report's plot): it is also the --plan-out file"),
            "{err}"
        );
        let mut guard = FileGuard::new();
        guard
            .input(&input)
            .output(dir.path().join("a.json"), "OUT")
            .output(dir.path().join("b.json"), "the --plan-out file");
        guard.check().unwrap();
    }
}
