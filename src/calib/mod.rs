//! Running models: ONNX Runtime sessions and the data fed to them.
//!
//! [`runtime`] finds and loads the ONNX Runtime shared library, registers
//! the requested execution provider strictly (no silent CPU fallback unless
//! asked), and runs sessions. [`data`] holds named input arrays of the
//! element types models take, read from `.npz` files and checked against the
//! model's declared inputs.

pub mod collect;
pub mod data;
pub mod npy;
pub mod runtime;
pub mod sources;

pub use data::{Array, DataError, Inputs};
pub use runtime::{Provider, Runtime, RuntimeError, RuntimeOptions, locate_library};
pub use sources::{CalibSource, PairSource};
