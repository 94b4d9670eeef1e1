//! onnx-idprune library.
#![deny(missing_docs)]
pub mod ir;
pub mod onnx;
