//! ONNX files: the generated protobuf types, loading and saving.
//!
//! Loading memory-maps the model and decodes it with tensor payloads sliced
//! out of the mapping (`raw_data` is `bytes::Bytes`), so a 600 MB model costs
//! no 600 MB copy. External data is resolved at load time into the same kind
//! of slice, after checking that the referenced file stays inside the model's
//! folder and that the claimed range exists. Saving streams the model to a
//! temporary file in the destination folder and renames it at the end, so a
//! failed run never leaves a partial output behind; [`FileGuard`] checks
//! before any work that no output replaces an input or another output.

pub mod dtype;
mod files;
mod load;
mod save;
pub mod staging;
mod walk;

/// Types generated from `proto/onnx.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use files::{FileGuard, model_files, write_atomic};
pub use load::{LoadError, LoadedModel, load, load_bytes, open_regular, read_text};
pub use save::{
    ExternalData, SaveError, SaveOptions, SaveSummary, encode_to_vec, external_path, save,
};
pub use staging::{StagedDir, remove_staged_files};

/// Protobuf's hard limit for one message: models above it need external data.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;
