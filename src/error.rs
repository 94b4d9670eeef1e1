//! The library's error type: every stage's typed error, with the file it
//! concerns where the stage does not know it. Each variant prints as one
//! line that names the file, node, plan entry or flag at fault.

use std::path::PathBuf;

use crate::{arch, calib, decide, folder, ir, measure, merged, onnx, plan, rewrite};

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the model failed.
    #[error(transparent)]
    Load(#[from] onnx::LoadError),
    /// A folder's files cannot be pruned as one model.
    #[error(transparent)]
    Folder(#[from] folder::FolderError),
    /// A merged decoder's branches cannot be pruned alike.
    #[error("{}: {error}", path.display())]
    Merged {
        /// The model.
        path: PathBuf,
        /// What is wrong.
        error: merged::MergedError,
    },
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
    /// An intrinsic dimension could not be estimated.
    #[error(transparent)]
    Measure(measure::MeasureError),
    /// No plan could be made.
    #[error(transparent)]
    Decide(#[from] decide::DecideError),
    /// The request needs something this build does not do, or data it
    /// does not have.
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
    /// The intrinsic dimension of a data matrix could not be estimated.
    #[error("{}: {error}", path.display())]
    Estimate {
        /// The `.npy` file.
        path: PathBuf,
        /// What the estimator said.
        error: crate::id::IdError,
    },
}

impl Error {
    /// A measurement error of the model at `path`: graph edits name the
    /// model, runtime errors stand alone.
    pub fn measuring(path: &std::path::Path) -> impl Fn(measure::MeasureError) -> Self + '_ {
        move |error| match error {
            measure::MeasureError::Graph(error) => Error::Graph {
                path: path.to_path_buf(),
                error,
            },
            measure::MeasureError::Runtime(error) => Error::Runtime(error),
            other => Error::Measure(other),
        }
    }
}
