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
    /// Write a JSON report here (and a Markdown summary and an SVG plot
    /// next to it).
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

    /// Runs the job. On error nothing is written.
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
        let protected = source.protected_files();
        onnx::check_not_input(&self.output, &protected)?;
        let mut taken = protected.clone();
        taken.push(self.output.clone());
        taken.push(onnx::external_path(&self.output));
        for extra in [&self.plan_out, &self.report].into_iter().flatten() {
            onnx::check_distinct(extra, &taken)?;
        }
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
        write_atomic(path, report.to_json().as_bytes())?;
        write_atomic(&path.with_extension("md"), report.to_markdown().as_bytes())?;
        write_atomic(&path.with_extension("svg"), report.to_svg().as_bytes())?;
        Ok(())
    }
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
