//! A folder of model files pruned as one model: optimum's and
//! transformers.js's layouts (`vision_model.onnx` + `text_model.onnx`, with
//! `_fp16`/`_quantized` siblings), a captioner's vision encoder beside a
//! text decoder that reads `encoder_hidden_states`, and a LLaVA-style
//! vision encoder, token embeddings and (merged) decoder language model.
//!
//! - [`layout`]: which files are the towers (by their graph inputs, one
//!   variant per tower) and which are copied unchanged;
//! - [`join`]: the chosen files made into one graph — every name prefixed by
//!   its file, inputs of the same name shared, a decoder's
//!   `encoder_hidden_states` wired to the vision encoder's output, a
//!   language model's `inputs_embeds` made of the image features and the
//!   token embeddings — so that
//!   discovery, calibration, one decision across both towers, rewriting and
//!   verification see what a single-file export would give them;
//!   [`join::Joined::split`] cuts the rewritten graph back into the files.
//!
//! Nothing here runs a model or discovers blocks: the pipeline does that on
//! the joined graph.

pub mod join;
pub mod layout;
pub mod write;

use std::path::PathBuf;

pub use join::{Joined, join};
pub use layout::{Layout, Part, Role, Unpruned, scan};
pub use write::{WrittenFile, check_destination, write};

/// Why a folder cannot be pruned as one model. Every variant names the
/// folder or the file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FolderError {
    /// The folder (or a file in it) could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// No file of the folder is a model tower.
    #[error("{}: no model file in this folder (looked for *.onnx in it and in onnx/ reading pixel_values, input_ids, inputs_embeds or encoder_hidden_states)", path.display())]
    NoModels {
        /// The folder.
        path: PathBuf,
    },
    /// Two files could be the same tower.
    #[error(
        "{}: two candidates for the {role}: {} and {}; choose the files with --files",
        root.display(), first.display(), second.display()
    )]
    TwoCandidates {
        /// The folder.
        root: PathBuf,
        /// What both would be (`vision encoder`, `text decoder`, …).
        role: &'static str,
        /// One file, relative to the folder.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// A `--files` entry is not a model file inside the folder.
    #[error("--files {}: {reason}", path.display())]
    BadChoice {
        /// The entry as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The chosen files do not make one model.
    #[error("{}: {reason}", root.display())]
    Misfit {
        /// The folder.
        root: PathBuf,
        /// What does not fit (a decoder without its vision encoder, widths
        /// that differ across files, …).
        reason: String,
    },
    /// Writing a pruned file failed.
    #[error(transparent)]
    Save(#[from] crate::onnx::SaveError),
    /// A model file could not be read.
    #[error(transparent)]
    Load(#[from] crate::onnx::LoadError),
    /// The pruned graph cannot be cut back into the files.
    #[error("{}: cannot split the pruned model back into its files: {reason}", file.display())]
    Split {
        /// The file, relative to the folder.
        file: PathBuf,
        /// What went wrong.
        reason: String,
    },
}
