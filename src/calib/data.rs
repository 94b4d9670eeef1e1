//! Named input arrays and `.npz` calibration files.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use ndarray::{ArrayD, Axis};
use ndarray_npy::ReadNpyExt;

use super::npy;
use crate::ir::{Dim, Graph};
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

/// Reads the arrays named after `graph`'s inputs from an npz file and
/// checks their element types and trailing shapes (axis 0 is the sample
/// axis). Arrays the model does not take are ignored; NaN or infinite
/// values are refused.
pub fn read_npz(path: &Path, graph: &Graph) -> Result<(Inputs, usize), DataError> {
    let read = |reason: String| DataError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let mismatch = |reason: String| DataError::Mismatch {
        path: path.to_path_buf(),
        reason,
    };
    let file = crate::onnx::open_regular(path).map_err(|e| read(e.to_string()))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| read(format!("not an npz archive ({e})")))?;
    // NumPy stores array `x` as entry `x.npy`.
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
        .collect();
    let mut inputs = Inputs::new();
    let mut samples: Option<usize> = None;
    for input in graph
        .inputs
        .iter()
        .filter(|i| graph.initializer(i.name()).is_none())
    {
        let name = input.name();
        let index = archive
            .index_for_name(name)
            .or_else(|| archive.index_for_name(&format!("{name}.npy")))
            .ok_or_else(|| {
                mismatch(format!(
                    "no array named '{name}' (the model's input); it has {names:?}"
                ))
            })?;
        // Its claims are checked before `ndarray-npy` allocates by them.
        npy::check_npz_entry(&mut archive, index)
            .map_err(|e| read(format!("array '{name}': {e}")))?;
        let mut entry = archive
            .by_index(index)
            .map_err(|e| read(format!("array '{name}': {e}")))?;
        let declared = graph.value_type(name);
        let want = declared.as_ref().map_or(0, |t| t.elem_type);
        let array = match want {
            dtype::code::FLOAT => ArrayD::<f32>::read_npy(&mut entry).map(Array::F32),
            dtype::code::INT64 => ArrayD::<i64>::read_npy(&mut entry).map(Array::I64),
            dtype::code::INT32 => ArrayD::<i32>::read_npy(&mut entry).map(Array::I32),
            dtype::code::BOOL => ArrayD::<bool>::read_npy(&mut entry).map(Array::Bool),
            other => {
                return Err(mismatch(format!(
                    "model input '{name}' takes {}, which calibration files do not support",
                    dtype::name(other)
                )));
            }
        }
        .map_err(|e| {
            mismatch(format!(
                "array '{name}' cannot be read as {} ({e})",
                dtype::name(want)
            ))
        })?;
        let shape = array.shape().to_vec();
        if let Some(dims) = declared.and_then(|t| t.shape) {
            if dims.len() != shape.len() {
                return Err(mismatch(format!(
                    "array '{name}' has {} axes {shape:?}, the model input has {}",
                    shape.len(),
                    dims.len()
                )));
            }
            for (axis, (dim, &got)) in dims.iter().zip(&shape).enumerate().skip(1) {
                if let Dim::Fixed(want) = dim
                    && *want != got as i64
                {
                    return Err(mismatch(format!(
                        "array '{name}' has shape {shape:?} but the model input needs {want} along axis {axis}"
                    )));
                }
            }
        }
        if array.has_non_finite() {
            return Err(mismatch(format!(
                "array '{name}' contains NaN or infinite values"
            )));
        }
        let n = shape.first().copied().unwrap_or(0);
        if let Some(prev) = samples.filter(|&p| p != n) {
            return Err(mismatch(format!(
                "array '{name}' has {n} samples, other inputs have {prev}"
            )));
        }
        samples = Some(n);
        inputs.insert(name.to_string(), array);
    }
    Ok((inputs, samples.unwrap_or(0)))
}

/// A 2-D matrix from an `.npy` file: float32 files are memory-mapped (no
/// copy), float64 files are read and converted.
pub enum Matrix {
    /// A mapped float32 file.
    Mapped(memmap2::Mmap),
    /// Converted data.
    Owned(ndarray::Array2<f32>),
}

impl Matrix {
    /// The matrix.
    pub fn view(&self) -> ndarray::ArrayView2<'_, f32> {
        use ndarray_npy::ViewNpyExt;
        match self {
            Matrix::Mapped(map) => {
                ndarray::ArrayView2::<f32>::view_npy(map).expect("checked when opened")
            }
            Matrix::Owned(a) => a.view(),
        }
    }
}

/// Opens a 2-D `.npy` matrix (rows = samples) of float32 or float64.
pub fn read_matrix(path: &Path) -> Result<Matrix, DataError> {
    use ndarray_npy::{ReadNpyExt, ViewNpyExt};
    let read = |reason: String| DataError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let open = || crate::onnx::open_regular(path).map_err(|e| read(e.to_string()));
    let mut file = open()?;
    // SAFETY: read-only mapping of an input file that is not modified while we run.
    if let Ok(map) = unsafe { memmap2::Mmap::map(&file) }
        && ndarray::ArrayView2::<f32>::view_npy(&map).is_ok()
    {
        return Ok(Matrix::Mapped(map));
    }
    // The readers below allocate by the header's shape: check it first.
    let len = file.metadata().map_err(|e| read(e.to_string()))?.len();
    let header = npy::Header::read(&mut file)
        .map_err(|e| read(format!("not a 2-D float32 or float64 .npy matrix ({e})")))?;
    header
        .check_fits(len.saturating_sub(header.len))
        .map_err(read)?;
    if let Ok(a) = ndarray::Array2::<f32>::read_npy(open()?) {
        return Ok(Matrix::Owned(a));
    }
    match ndarray::Array2::<f64>::read_npy(open()?) {
        Ok(a) => Ok(Matrix::Owned(a.mapv(|v| v as f32))),
        Err(e) => Err(read(format!(
            "not a 2-D float32 or float64 .npy matrix ({e})"
        ))),
    }
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
