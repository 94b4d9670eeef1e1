//! Named input arrays of the element types models take, and how a set of
//! calibration samples is divided between decisions and verification.

use std::path::PathBuf;

use indexmap::IndexMap;
use ndarray::{ArrayD, Axis};

use crate::ir::Graph;
use crate::onnx::dtype;

/// An array of one of the element types model inputs use.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    /// float32
    F32(ArrayD<f32>),
    /// int64
    I64(ArrayD<i64>),
    /// int32
    I32(ArrayD<i32>),
    /// bool
    Bool(ArrayD<bool>),
}

impl Array {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Array::F32(a) => a.shape(),
            Array::I64(a) => a.shape(),
            Array::I32(a) => a.shape(),
            Array::Bool(a) => a.shape(),
        }
    }

    /// `TensorProto.DataType` code of the elements.
    pub fn data_type(&self) -> i32 {
        match self {
            Array::F32(_) => dtype::code::FLOAT,
            Array::I64(_) => dtype::code::INT64,
            Array::I32(_) => dtype::code::INT32,
            Array::Bool(_) => dtype::code::BOOL,
        }
    }

    /// Rows `start..end` of axis 0.
    pub fn rows(&self, start: usize, end: usize) -> Array {
        let s = ndarray::Slice::from(start..end);
        match self {
            Array::F32(a) => Array::F32(a.slice_axis(Axis(0), s).to_owned()),
            Array::I64(a) => Array::I64(a.slice_axis(Axis(0), s).to_owned()),
            Array::I32(a) => Array::I32(a.slice_axis(Axis(0), s).to_owned()),
            Array::Bool(a) => Array::Bool(a.slice_axis(Axis(0), s).to_owned()),
        }
    }

    /// The rows at `index` of axis 0, in that order.
    pub fn select_rows(&self, index: &[usize]) -> Array {
        match self {
            Array::F32(a) => Array::F32(a.select(Axis(0), index)),
            Array::I64(a) => Array::I64(a.select(Axis(0), index)),
            Array::I32(a) => Array::I32(a.select(Axis(0), index)),
            Array::Bool(a) => Array::Bool(a.select(Axis(0), index)),
        }
    }

    /// Whether any element is NaN or infinite (integers never are).
    pub fn has_non_finite(&self) -> bool {
        matches!(self, Array::F32(a) if a.iter().any(|v| !v.is_finite()))
    }
}

/// Named arrays in input order.
pub type Inputs = IndexMap<String, Array>;

/// Problems with input data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be read or is not a valid npz archive.
    #[error("cannot read {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An array does not fit the model input of the same name.
    #[error("{}: {reason}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
}

/// The graph input that marks real tokens (`attention_mask` and the like)
/// when the calibration data provides it: the padding mask for text taps.
pub fn mask_input(graph: &Graph, inputs: &Inputs) -> Option<String> {
    graph
        .inputs
        .iter()
        .map(|i| i.name().to_string())
        .find(|n| n.contains("mask") && inputs.contains_key(n))
}

/// Calibration samples divided between deciding and verifying: the first
/// ones drive the decisions, the last ones are held out for verification
/// and never seen by a decision.
#[derive(Debug, Clone)]
pub struct Split {
    /// Inputs of the decision samples.
    pub decision: Inputs,
    /// Number of decision samples.
    pub samples: usize,
    /// Inputs of the held-out samples.
    pub holdout: Inputs,
    /// Number of held-out samples (0 when the set is too small to spare any).
    pub holdout_samples: usize,
}

/// Fewest decision samples a split leaves (nearest-neighbour estimates and
/// cosines over fewer mean nothing).
pub const MIN_DECISION_SAMPLES: usize = 8;

impl Split {
    /// Divides `total` loaded samples: at most `holdout` from the end (and at
    /// most a quarter of them) are held out, at most `samples` of the rest
    /// from the start decide. `label` names the source in errors.
    pub fn of(
        inputs: &Inputs,
        total: usize,
        samples: usize,
        holdout: usize,
        label: PathBuf,
    ) -> Result<Self, DataError> {
        let holdout_samples = if total >= MIN_DECISION_SAMPLES {
            holdout.min(total / 4)
        } else {
            0
        };
        let samples = samples.min(total - holdout_samples);
        if samples < MIN_DECISION_SAMPLES {
            return Err(DataError::Mismatch {
                path: label,
                reason: format!(
                    "{total} samples leave {samples} for decisions after {holdout_samples} held out; at least {MIN_DECISION_SAMPLES} are needed"
                ),
            });
        }
        Ok(Self {
            decision: rows(inputs, 0, samples),
            samples,
            holdout: rows(inputs, total - holdout_samples, total),
            holdout_samples,
        })
    }
}

/// Rows `start..end` of every input.
pub fn rows(inputs: &Inputs, start: usize, end: usize) -> Inputs {
    inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.rows(start, end)))
        .collect()
}
