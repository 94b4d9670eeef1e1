//! Initializer tensors: shared, copy-on-write payloads of any element type.
//!
//! A [`Tensor`] wraps a `TensorProto` whose `raw_data` is a `bytes::Bytes`
//! slice, usually of the memory-mapped model file. Cloning a tensor shares
//! the payload; producing an edited tensor allocates a new payload and leaves
//! every other reader of the old one untouched. Payload access works on raw
//! little-endian bytes for any fixed-width type, so slicing needs no
//! per-type code; numeric views convert to `f32` for analysis.

use std::borrow::Cow;

use bytes::Bytes;

use crate::onnx::dtype;
use crate::onnx::proto::TensorProto;

/// A tensor value (initializer or constant).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    proto: TensorProto,
}

/// Why a tensor's payload cannot be used as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The element type has no fixed width (string) or is unknown.
    #[error("tensor '{name}': {what} is not supported for {dtype} tensors")]
    Unsupported {
        /// Tensor name.
        name: String,
        /// Element type name.
        dtype: String,
        /// The operation.
        what: &'static str,
    },
    /// Slicing arguments do not fit the tensor.
    #[error("tensor '{name}': {reason}")]
    Shape {
        /// Tensor name.
        name: String,
        /// What does not fit.
        reason: String,
    },
}

impl Tensor {
    /// Wraps a proto (its payload checked at load time).
    pub fn new(proto: TensorProto) -> Self {
        Self { proto }
    }

    /// A tensor from raw little-endian bytes.
    pub fn from_raw(name: &str, data_type: i32, dims: Vec<i64>, raw: Bytes) -> Self {
        Self::new(TensorProto {
            name: Some(name.to_string()),
            data_type: Some(data_type),
            dims,
            raw_data: Some(raw),
            ..Default::default()
        })
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        self.proto.name()
    }

    /// `TensorProto.DataType` code.
    pub fn data_type(&self) -> i32 {
        self.proto.data_type()
    }

    /// Dimensions.
    pub fn dims(&self) -> &[i64] {
        &self.proto.dims
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        // Saturating: dims of a segment tensor are not checked against a
        // payload at load time and may claim any size.
        self.proto
            .dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d.max(0) as usize))
            .unwrap_or(usize::MAX)
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The underlying proto.
    pub fn proto(&self) -> &TensorProto {
        &self.proto
    }

    /// The same payload under another name (shares the bytes).
    pub fn renamed(&self, name: &str) -> Self {
        let mut proto = self.proto.clone();
        proto.name = Some(name.to_string());
        Self { proto }
    }

    /// The payload as raw little-endian bytes: borrowed from `raw_data`, or
    /// encoded from the typed fields.
    pub fn raw_bytes(&self) -> Result<Cow<'_, [u8]>, TensorError> {
        if let Some(raw) = &self.proto.raw_data {
            return Ok(Cow::Borrowed(raw));
        }
        let bits = dtype::bits(self.data_type()).ok_or_else(|| self.unsupported("raw access"))?;
        let p = &self.proto;
        let bytes: Vec<u8> = match self.data_type() {
            1 | 14 => p.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            11 | 15 => p.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            7 => p.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            12 => p
                .uint64_data
                .iter()
                .flat_map(|v| (*v as u32).to_le_bytes())
                .collect(),
            13 => p.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            6 => p.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ if bits == 16 => p
                .int32_data
                .iter()
                .flat_map(|v| (*v as u16).to_le_bytes())
                .collect(),
            _ if bits == 8 => p.int32_data.iter().map(|v| *v as u8).collect(),
            _ => return Err(self.unsupported("raw access")),
        };
        Ok(Cow::Owned(bytes))
    }

    /// Values converted to `f32` (floating types and integers).
    pub fn to_f32(&self) -> Result<Vec<f32>, TensorError> {
        let raw = self.raw_bytes()?;
        let dt = self.data_type();
        let out = match dt {
            1 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            10 => raw
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            16 => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            11 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            6 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            7 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            2 => raw.iter().map(|&b| b as f32).collect(),
            3 => raw.iter().map(|&b| b as i8 as f32).collect(),
            _ => return Err(self.unsupported("numeric conversion")),
        };
        Ok(out)
    }

    /// A tensor of element type `data_type` (float32, float16, bfloat16 or
    /// float64) holding `values`, rounded to that type.
    pub fn from_f32(
        name: &str,
        data_type: i32,
        dims: Vec<i64>,
        values: &[f32],
    ) -> Result<Tensor, TensorError> {
        let raw: Vec<u8> = match data_type {
            1 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            10 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            11 => values
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect(),
            other => {
                return Err(TensorError::Unsupported {
                    name: name.to_string(),
                    dtype: dtype::name(other),
                    what: "writing float values",
                });
            }
        };
        Ok(Tensor::from_raw(name, data_type, dims, Bytes::from(raw)))
    }

    /// Values of an integer (or bool) tensor as `i64`, e.g. shape
    /// constants.
    pub fn to_i64(&self) -> Result<Vec<i64>, TensorError> {
        let raw = self.raw_bytes()?;
        match self.data_type() {
            7 => Ok(raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()),
            6 => Ok(raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect()),
            12 => Ok(raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect()),
            5 => Ok(raw
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect()),
            4 => Ok(raw
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect()),
            3 => Ok(raw.iter().map(|&b| b as i8 as i64).collect()),
            2 | 9 => Ok(raw.iter().map(|&b| b as i64).collect()),
            _ => Err(self.unsupported("integer conversion")),
        }
    }

    /// A new tensor named `name` holding only `keep` (ascending or not,
    /// each in range) along `axis`. Works on raw bytes, so any element type
    /// of at least 8 bits is supported.
    pub fn select(&self, name: &str, axis: usize, keep: &[usize]) -> Result<Tensor, TensorError> {
        let dims = self.dims();
        let bits = dtype::bits(self.data_type())
            .filter(|b| b % 8 == 0)
            .ok_or_else(|| self.unsupported("slicing"))?;
        if axis >= dims.len() {
            return Err(self.shape_err(format!("axis {axis} out of range for dims {dims:?}")));
        }
        let extent = dims[axis] as usize;
        if let Some(&bad) = keep.iter().find(|&&k| k >= extent) {
            return Err(self.shape_err(format!(
                "index {bad} out of range for axis {axis} of size {extent}"
            )));
        }
        let elem = (bits / 8) as usize;
        let outer: usize = dims[..axis].iter().map(|&d| d as usize).product();
        let inner: usize = dims[axis + 1..]
            .iter()
            .map(|&d| d as usize)
            .product::<usize>()
            * elem;
        let raw = self.raw_bytes()?;
        let mut out = Vec::with_capacity(outer * keep.len() * inner);
        for o in 0..outer {
            let base = o * extent * inner;
            for &k in keep {
                let start = base + k * inner;
                out.extend_from_slice(&raw[start..start + inner]);
            }
        }
        let mut new_dims = dims.to_vec();
        new_dims[axis] = keep.len() as i64;
        Ok(Tensor::from_raw(
            name,
            self.data_type(),
            new_dims,
            Bytes::from(out),
        ))
    }

    fn unsupported(&self, what: &'static str) -> TensorError {
        TensorError::Unsupported {
            name: self.name().to_string(),
            dtype: dtype::name(self.data_type()),
            what,
        }
    }

    fn shape_err(&self, reason: String) -> TensorError {
        TensorError::Shape {
            name: self.name().to_string(),
            reason,
        }
    }
}

/// IEEE 754 half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(dims: Vec<i64>, values: &[f32]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw("t", 1, dims, Bytes::from(raw))
    }

    #[test]
    fn select_rows_and_columns() {
        let t = floats(vec![2, 3], &[0., 1., 2., 3., 4., 5.]);
        assert_eq!(
            t.select("c", 1, &[0, 2]).unwrap().to_f32().unwrap(),
            vec![0., 2., 3., 5.]
        );
        assert_eq!(
            t.select("r", 0, &[1]).unwrap().to_f32().unwrap(),
            vec![3., 4., 5.]
        );
        assert!(t.select("x", 1, &[3]).is_err());
        assert!(t.select("x", 2, &[0]).is_err());
    }

    #[test]
    fn select_shares_nothing_with_the_source() {
        let t = floats(vec![3], &[1., 2., 3.]);
        let s = t.select("s", 0, &[2, 0]).unwrap();
        assert_eq!(s.to_f32().unwrap(), vec![3., 1.]);
        assert_eq!(t.to_f32().unwrap(), vec![1., 2., 3.]);
    }

    #[test]
    fn half_precision() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }

    #[test]
    fn typed_fields_become_raw() {
        let t = Tensor::new(TensorProto {
            name: Some("i".into()),
            data_type: Some(7),
            dims: vec![2],
            int64_data: vec![-1, 5],
            ..Default::default()
        });
        assert_eq!(t.to_i64().unwrap(), vec![-1, 5]);
    }
}
