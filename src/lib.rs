//! # onnx-idprune
//!
//! A compiler pass for ONNX vision-language models (CLIP, BLIP): it measures
//! the intrinsic dimension of each transformer layer's representation and
//! writes a smaller model with the least important blocks, sub-blocks, heads
//! and neurons removed — more in the text tower than in the vision tower.
//!
//! The stages, one module each, in the order data flows (a module uses only
//! the ones before it):
//!
//! ```text
//! onnx ─► ir ─► arch ─► calib ─► id ─► measure ─► plan ─► decide ─► rewrite ─► verify ─► report ─► pipeline
//! load,    graph  discover  run     TwoNN   taps,      the      scores,   passes,   held-out  JSON,     the jobs
//! save            towers    models  MLE     features   contract budgets   repair    fidelity  MD, SVG
//! ```
//!
//! `linalg` (dense products and Cholesky solves on the `gemm` crate) is a
//! leaf that `calib`, `id` and `rewrite` share.
//!
//! [`pipeline`] puts them together once: [`PruneJob`] is the main job,
//! [`pipeline::apply_and_verify`] the one step every plan goes through.
//! Re-applying a saved plan:
//!
//! ```no_run
//! use onnx_idprune::{PruneJob, plan::Plan};
//! let job = PruneJob::apply("clip.onnx", "clip-pruned.onnx", Plan::read("plan.json".as_ref())?);
//! let outcome = job.run()?;
//! println!("wrote {} bytes", outcome.saved.model_bytes);
//! # Ok::<(), onnx_idprune::Error>(())
//! ```
#![deny(missing_docs)]

pub mod arch;
pub mod calib;
#[cfg(feature = "cli")]
pub mod cli;
pub mod decide;
mod error;
pub mod folder;
pub mod id;
pub mod ir;
mod linalg;
pub mod measure;
pub mod merged;
pub mod onnx;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod report;
pub mod rewrite;
pub mod verify;

pub use error::Error;
pub use pipeline::{Outcome, PlanSource, PruneJob, Source, open};
