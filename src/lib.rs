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
pub mod id;
pub mod ir;
pub mod onnx;
pub mod plan;
pub mod profile;
pub mod report;
pub mod rewrite;

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
        let Some(plan) = self.plan.clone() else {
            return Err(Error::Unsupported(
                "calibration-driven pruning is not available in this build yet; pass --plan FILE to apply a plan".into(),
            ));
        };
        let source = open(&self.input)?;
        let protected = source.protected_files();
        onnx::check_not_input(&self.output, &protected)?;
        if let Some(plan_out) = &self.plan_out {
            let mut taken = protected.clone();
            taken.push(self.output.clone());
            taken.push(onnx::external_path(&self.output));
            onnx::check_distinct(plan_out, &taken)?;
        }
        lap("load", &mut timings);

        let mut model = source.model;
        let mut rewrites = Vec::new();
        if !plan.is_empty() {
            let arch = arch::discover(&model.graph).map_err(|error| Error::Discover {
                path: self.input.clone(),
                error,
            })?;
            rewrites = rewrite::apply(&mut model, &arch, &plan)?.rewrites;
        }
        lap("rewrite", &mut timings);

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
        let saved = onnx::save(&model.to_proto(), &self.output, &options)?;
        let plan_written = match &self.plan_out {
            Some(plan_out) => write_atomic(plan_out, plan.to_json().as_bytes()),
            None => Ok(()),
        };
        if let Err(e) = plan_written {
            // OUT and the plan go together: without the plan, no OUT.
            let _ = std::fs::remove_file(&self.output);
            if let Some(data) = &saved.external_file {
                let _ = std::fs::remove_file(data);
            }
            return Err(e);
        }
        lap("save", &mut timings);
        Ok(Outcome {
            saved,
            plan: plan.normalized(),
            rewrites,
            timings,
        })
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
    let mut tmp = tempfile::Builder::new()
        .prefix(".onnx-idprune.")
        .suffix(".tmp")
        .tempfile_in(folder)
        .map_err(err)?;
    tmp.write_all(contents).map_err(err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(err)?;
    }
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}
