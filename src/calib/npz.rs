//! `.npz` and `.npy` files: calibration inputs read by model input name,
//! data matrices for `id --data`, and the npz the `calib` subcommand writes.
//!
//! What a header claims is checked against the bytes that are really there
//! before anything allocates by it. `ndarray-npy` sizes its buffer from the
//! header's `shape`, so a 100-byte file claiming `(10**12, 3, 224, 224)`
//! float32 would ask for petabytes and abort the process. Every `.npy`
//! (alone, or as an entry of an `.npz`) is therefore read here first: shape ×
//! item size must fit in the data that follows the header. For a compressed
//! npz entry the uncompressed size in the zip directory is itself only a
//! claim, so it is also bounded by what deflate can expand the compressed
//! bytes to.

use std::io::Read;
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;

use super::data::{Array, DataError, Inputs};
use crate::ir::{Dim, Graph};
use crate::onnx::dtype;

/// The `.npy` magic string.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Longest header accepted. NumPy's headers are a few hundred bytes; a
/// longer one is not a real file, and reading it would allocate by a claim.
const MAX_HEADER: u32 = 1 << 16;

/// Deflate cannot expand data by more than about 1032:1; a zip entry
/// claiming more than this many uncompressed bytes per compressed byte
/// lies about its size.
const MAX_DEFLATE_RATIO: u64 = 1100;

/// The parts of an `.npy` header that decide how many bytes follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The NumPy type string, e.g. `<f4`.
    pub descr: String,
    /// The claimed shape.
    pub shape: Vec<u64>,
    /// Bytes before the data: magic, version, length and the header text.
    pub len: u64,
}

impl Header {
    /// Reads the header from the start of `reader` (and nothing after it).
    pub fn read(reader: &mut impl Read) -> Result<Header, String> {
        let mut start = [0u8; 8];
        reader
            .read_exact(&mut start)
            .map_err(|_| "too short for an .npy header".to_string())?;
        if &start[..6] != MAGIC {
            return Err("not an .npy array (bad magic bytes)".into());
        }
        let (text_len, prefix) = match start[6] {
            1 => {
                let mut len = [0u8; 2];
                reader
                    .read_exact(&mut len)
                    .map_err(|_| "truncated .npy header".to_string())?;
                (u32::from(u16::from_le_bytes(len)), 10u64)
            }
            2 | 3 => {
                let mut len = [0u8; 4];
                reader
                    .read_exact(&mut len)
                    .map_err(|_| "truncated .npy header".to_string())?;
                (u32::from_le_bytes(len), 12u64)
            }
            v => return Err(format!("unsupported .npy format version {v}")),
        };
        if text_len > MAX_HEADER {
            return Err(format!(
                ".npy header claims {text_len} bytes (at most {MAX_HEADER} accepted)"
            ));
        }
        let mut text = Vec::with_capacity(text_len as usize);
        reader
            .take(u64::from(text_len))
            .read_to_end(&mut text)
            .map_err(|e| format!("cannot read the .npy header ({e})"))?;
        if text.len() != text_len as usize {
            return Err("truncated .npy header".into());
        }
        let text = String::from_utf8_lossy(&text);
        let descr = quoted_value(&text, "descr")
            .ok_or_else(|| format!("the .npy header has no readable 'descr': {}", text.trim()))?;
        let shape = shape_value(&text)
            .ok_or_else(|| format!("the .npy header has no readable 'shape': {}", text.trim()))?;
        Ok(Header {
            descr,
            shape,
            len: prefix + u64::from(text_len),
        })
    }

    /// Bytes per element, from the type string (`<f4` → 4, `<U8` → 32).
    pub fn item_size(&self) -> Option<u64> {
        let body = self.descr.trim_start_matches(['<', '>', '|', '=']);
        let kind = body.chars().next()?;
        let n: u64 = body[kind.len_utf8()..].parse().ok()?;
        Some(if kind == 'U' { n.checked_mul(4)? } else { n })
    }

    /// Bytes of data the header claims, or `None` when that overflows.
    pub fn data_len(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.item_size()?, |acc, &d| acc.checked_mul(d))
    }

    /// Checks that the claimed data fits in `available` bytes after the
    /// header.
    pub fn check_fits(&self, available: u64) -> Result<(), String> {
        let Some(item) = self.item_size() else {
            return Err(format!("unsupported element type '{}'", self.descr));
        };
        let claimed = self
            .data_len()
            .ok_or_else(|| format!("shape {:?} of {item}-byte elements overflows", self.shape))?;
        if claimed > available {
            return Err(format!(
                "shape {:?} of '{}' needs {claimed} bytes of data, but only {available} follow the header",
                self.shape, self.descr
            ));
        }
        Ok(())
    }
}

/// Checks entry `index` of an npz archive: its size claims are plausible
/// and its `.npy` header's shape fits in them.
pub fn check_npz_entry<R: Read + std::io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    index: usize,
) -> Result<(), String> {
    let mut entry = archive
        .by_index(index)
        .map_err(|e| format!("cannot open entry {index} ({e})"))?;
    let name = entry.name().to_string();
    let size = entry.size();
    let compressed = entry.compressed_size();
    let bound = match entry.compression() {
        zip::CompressionMethod::Stored => compressed,
        _ => compressed.saturating_mul(MAX_DEFLATE_RATIO),
    };
    if size > bound {
        return Err(format!(
            "entry '{name}' claims {size} bytes uncompressed from {compressed} stored bytes"
        ));
    }
    let header = Header::read(&mut entry)?;
    header.check_fits(size.saturating_sub(header.len))
}

/// The `'key': 'value'` string value of `key` in a header dict.
fn quoted_value(text: &str, key: &str) -> Option<String> {
    let rest = after_key(text, key)?;
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &rest[1..];
    let end = body.find(quote)?;
    Some(body[..end].to_string())
}

/// The `'shape': (a, b, …)` tuple of a header dict.
fn shape_value(text: &str) -> Option<Vec<u64>> {
    let rest = after_key(text, "shape")?;
    let body = rest.strip_prefix('(')?;
    let body = &body[..body.find(')')?];
    body.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.strip_suffix('L').unwrap_or(s).parse::<u64>().ok())
        .collect()
}

/// The text after `'key':` (quoted either way), with spaces skipped.
fn after_key<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = [format!("'{key}'"), format!("\"{key}\"")]
        .iter()
        .find_map(|k| text.find(k.as_str()).map(|i| i + k.len()))?;
    let rest = text[at..].trim_start().strip_prefix(':')?;
    Some(rest.trim_start())
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
    let mut empty_caches: Vec<(String, [usize; 2])> = Vec::new();
    for input in graph
        .inputs
        .iter()
        .filter(|i| graph.initializer(i.name()).is_none())
    {
        let name = input.name();
        let Some(index) = archive
            .index_for_name(name)
            .or_else(|| archive.index_for_name(&format!("{name}.npy")))
        else {
            // A decoder's past keys/values start empty: calibration runs
            // whole teacher-forced sequences without a cache.
            if let Some(dims) = cache_input(graph, name) {
                empty_caches.push((name.to_string(), dims));
                continue;
            }
            return Err(mismatch(format!(
                "no array named '{name}' (the model's input); it has {names:?}"
            )));
        };
        // Its claims are checked before `ndarray-npy` allocates by them.
        check_npz_entry(&mut archive, index).map_err(|e| read(format!("array '{name}': {e}")))?;
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
    let n = samples.unwrap_or(0);
    for (name, [heads, width]) in empty_caches {
        let empty = ArrayD::<f32>::zeros(ndarray::IxDyn(&[n, heads, 0, width]));
        inputs.insert(name, Array::F32(empty));
    }
    // Keep the model's input order.
    let order: Vec<&str> = graph.inputs.iter().map(|i| i.name()).collect();
    inputs.sort_by(|a, _, b, _| {
        let at = |k: &str| order.iter().position(|o| *o == k);
        at(a).cmp(&at(b))
    });
    Ok((inputs, n))
}

/// `(kv_heads, head_dim)` when graph input `name` is a key/value cache's
/// past: float, `[batch, kv_heads, past, head_dim]` with the head count
/// fixed, concatenated with the new keys or values along the sequence (the
/// head width declared), or read by `GroupQueryAttention` (the head width
/// declared or, symbolic, taken from its projection).
pub fn cache_input(graph: &Graph, name: &str) -> Option<[usize; 2]> {
    let declared = graph.value_type(name)?;
    if !dtype::is_float(declared.elem_type) {
        return None;
    }
    let shape = declared.shape?;
    let [_, Dim::Fixed(heads), past, width] = shape.as_slice() else {
        return None;
    };
    if matches!(past, Dim::Fixed(_)) {
        return None;
    }
    let heads = usize::try_from(*heads).ok()?;
    for c in graph.consumers(name) {
        let node = graph.node(c);
        let slot = node.inputs().iter().position(|i| i == name);
        let width = match (node.op(), slot, width) {
            ("Concat", Some(0), Dim::Fixed(w)) => usize::try_from(*w).ok(),
            // GroupQueryAttention reads the past at inputs 3 and 4; the
            // builder leaves the head width symbolic.
            ("GroupQueryAttention", Some(3 | 4), Dim::Fixed(w)) => usize::try_from(*w).ok(),
            ("GroupQueryAttention", Some(3 | 4), _) => group_query_head_dim(graph, node),
            _ => None,
        };
        if let Some(width) = width {
            return Some([heads, width]);
        }
    }
    None
}

/// The head width of a `GroupQueryAttention` node: its query projection's
/// width over `num_heads` (or, packed with keys and values, over
/// `num_heads + 2 · kv_num_heads`).
fn group_query_head_dim(graph: &Graph, node: &crate::ir::Node) -> Option<usize> {
    let heads = usize::try_from(node.attr_int("num_heads")?).ok()?;
    let kv = usize::try_from(node.attr_int("kv_num_heads")?).ok()?;
    let packed = node.inputs().get(1).is_none_or(|k| k.is_empty());
    let mut value = node.inputs().first()?.clone();
    // Through a bias Add to the projection's MatMul.
    for _ in 0..2 {
        let producer = graph.node(graph.producer_node(&value)?);
        match producer.op() {
            "MatMul" => {
                let dims = graph
                    .initializer(producer.inputs().get(1)?)?
                    .dims()
                    .to_vec();
                let width = usize::try_from(*dims.last()?).ok()?;
                let parts = if packed { heads + 2 * kv } else { heads };
                return (parts > 0 && width % parts == 0).then(|| width / parts);
            }
            // The bias may be either operand.
            "Add" => {
                value = producer
                    .inputs()
                    .iter()
                    .find(|i| graph.initializer(i).is_none())?
                    .clone()
            }
            _ => return None,
        }
    }
    None
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
    let header = Header::read(&mut file)
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

/// `inputs` as the bytes of a compressed `.npz` (one array per input, axis
/// 0 = sample): the form `--calib` reads back.
pub fn npz_bytes(inputs: &Inputs) -> Result<Vec<u8>, String> {
    let mut writer = ndarray_npy::NpzWriter::new_compressed(std::io::Cursor::new(Vec::new()));
    for (name, array) in inputs {
        let written = match array {
            Array::F32(a) => writer.add_array(name.as_str(), a),
            Array::I64(a) => writer.add_array(name.as_str(), a),
            Array::I32(a) => writer.add_array(name.as_str(), a),
            Array::Bool(a) => writer.add_array(name.as_str(), a),
        };
        written.map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(writer.finish().map_err(|e| e.to_string())?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn reads_numpy_headers() {
        let file = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n",
            &[0; 24],
        );
        let header = Header::read(&mut file.as_slice()).unwrap();
        assert_eq!(header.descr, "<f4");
        assert_eq!(header.shape, vec![2, 3]);
        assert_eq!(header.item_size(), Some(4));
        assert_eq!(header.data_len(), Some(24));
        assert_eq!(header.len as usize, file.len() - 24);
        header.check_fits(24).unwrap();
        // 1-D and 0-D shapes
        let one = npy(
            "{'descr': '|b1', 'fortran_order': False, 'shape': (5,), }",
            &[],
        );
        assert_eq!(Header::read(&mut one.as_slice()).unwrap().shape, vec![5]);
        let zero = npy(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (), }",
            &[],
        );
        let zero = Header::read(&mut zero.as_slice()).unwrap();
        assert_eq!(zero.shape, Vec::<u64>::new());
        assert_eq!(zero.data_len(), Some(8));
    }

    #[test]
    fn refuses_claims_larger_than_the_data() {
        let huge = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 224, 224), }",
            &[0; 16],
        );
        let header = Header::read(&mut huge.as_slice()).unwrap();
        let err = header.check_fits(16).unwrap_err();
        assert!(err.contains("only 16 follow the header"), "{err}");
        let overflow = npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
            &[],
        );
        let err = Header::read(&mut overflow.as_slice())
            .unwrap()
            .check_fits(0)
            .unwrap_err();
        assert!(err.contains("overflows"), "{err}");
    }

    #[test]
    fn refuses_malformed_headers() {
        for (bytes, needle) in [
            (b"\x93NUM".to_vec(), "too short"),
            (b"PK\x03\x04abcdefgh".to_vec(), "bad magic"),
            (
                {
                    let mut v = MAGIC.to_vec();
                    v.extend([2, 0, 0xff, 0xff, 0xff, 0x7f]);
                    v
                },
                "at most",
            ),
            (npy("{'descr': '<f4', 'shape': (2, x), }", &[]), "'shape'"),
            (npy("{'shape': (2,), }", &[]), "'descr'"),
            (
                npy("{'descr': '<f4', 'shape': (2,", &[])[..20].to_vec(),
                "truncated",
            ),
        ] {
            let err = Header::read(&mut bytes.as_slice()).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let odd = npy("{'descr': [('a', '<f4')], 'shape': (2,), }", &[]);
        assert!(Header::read(&mut odd.as_slice()).is_err());
    }
}
