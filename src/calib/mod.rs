//! Running models: ONNX Runtime sessions and the data fed to them.
//!
//! - [`runtime`] finds and loads the ONNX Runtime shared library, registers
//!   the requested execution provider strictly (no silent CPU fallback
//!   unless asked), and runs sessions.
//! - [`data`] holds named input arrays of the element types models take and
//!   divides samples between decisions and verification; [`npz`] reads and
//!   writes them as `.npz`/`.npy` files; [`sources`] makes them from images
//!   and captions.
//! - [`collect`] instruments a model with taps and runs it batch by batch;
//!   [`stats`] turns each batch's taps into features, cosines, energies and
//!   second moments.

pub mod collect;
pub mod data;
pub mod npz;
pub mod runtime;
pub mod sources;
pub mod stats;

pub use data::{Array, DataError, Inputs};
pub use runtime::{
    Provider, Runtime, RuntimeError, RuntimeOptions, locate_library, set_host_library,
};
pub use sources::{CalibSource, PairSource};
pub use stats::{Layout, Pooling, Tap};
