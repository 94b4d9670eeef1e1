//! Reading a model file (and its external data) without copying tensor data.
//!
//! Threat model for external data: the model file is untrusted. A tensor's
//! `location` must be a relative path that stays inside the model's folder —
//! absolute paths, `..` components and symbolic links that resolve elsewhere
//! are refused — and the claimed `offset`/`length` must lie inside the file.
//! Every tensor's payload size is checked against its dims and element type,
//! so later stages can trust `dims` when they allocate.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use super::dtype;
use super::proto::{ModelProto, TensorProto, tensor_proto::DataLocation};
use super::walk;

/// A decoded model together with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The model; tensor payloads (including resolved external data) are
    /// slices of memory-mapped files.
    pub proto: ModelProto,
    /// The model file as given.
    pub path: PathBuf,
    /// Canonical paths of the external data files the model refers to, in
    /// first-use order. Empty when all data is embedded.
    pub external_files: Vec<PathBuf>,
    /// Size of the model file in bytes.
    pub file_len: u64,
}

/// Why a model could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be opened, mapped or read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: io::Error,
    },
    /// The bytes are not a decodable ONNX model.
    #[error("{} is not a valid ONNX model: {reason}", path.display())]
    NotOnnx {
        /// The model file.
        path: PathBuf,
        /// What is wrong, e.g. the protobuf decoder's message.
        reason: String,
    },
    /// A tensor's external data cannot be used.
    #[error("{}: tensor '{tensor}': external data {reason}", path.display())]
    ExternalData {
        /// The model file.
        path: PathBuf,
        /// Name of the tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's payload disagrees with its dims or element type.
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    BadTensor {
        /// The model file.
        path: PathBuf,
        /// Name of the tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
}

/// Opens `path` for reading if it is a regular file. Looks before opening:
/// opening a named pipe would wait for a writer, and reading a device such
/// as `/dev/zero` would never end.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::other("is a folder, not a file"));
    }
    if !meta.is_file() {
        return Err(io::Error::other("is not a regular file"));
    }
    File::open(path)
}

/// Reads a small text input (a plan, captions, a JSON config) of at most
/// `limit` bytes, refusing anything that is not a regular file.
pub fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    use std::io::Read;
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > limit {
        return Err(io::Error::other(format!(
            "is {len} bytes; at most {limit} are accepted"
        )));
    }
    let mut text = String::new();
    file.take(limit)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => io::Error::other("is not UTF-8 text"),
            _ => e,
        })?;
    Ok(text)
}

/// Loads the model at `path`, resolving external data relative to its folder.
pub fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    let io_err = |error| LoadError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = open_regular(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    let bytes = map_file(&file, meta.len()).map_err(io_err)?;
    let file_len = bytes.len() as u64;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut loaded = decode(bytes, path)?;
    loaded.file_len = file_len;
    let mut resolver = ExternalResolver::new(path, &folder);
    walk::tensors_mut(&mut loaded.proto, &mut |t| resolver.resolve(t))?;
    loaded.external_files = resolver.files;
    walk::tensors_mut(&mut loaded.proto, &mut |t| check_tensor(path, t))?;
    Ok(loaded)
}

/// Decodes a model held in memory. External data is not allowed here (there
/// is no folder to resolve it against); `label` names the source in errors.
pub fn load_bytes(bytes: Bytes, label: &Path) -> Result<LoadedModel, LoadError> {
    let file_len = bytes.len() as u64;
    let mut loaded = decode(bytes, label)?;
    loaded.file_len = file_len;
    walk::tensors_mut(&mut loaded.proto, &mut |t| {
        if t.data_location == Some(DataLocation::External as i32) {
            return Err(LoadError::ExternalData {
                path: label.to_path_buf(),
                tensor: t.name().to_string(),
                reason: "cannot be resolved for a model that is not read from a file".into(),
            });
        }
        check_tensor(label, t)
    })?;
    Ok(loaded)
}

fn decode(bytes: Bytes, path: &Path) -> Result<LoadedModel, LoadError> {
    let not_onnx = |reason: String| LoadError::NotOnnx {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(not_onnx("the file is empty".into()));
    }
    let proto = ModelProto::decode(bytes)
        .map_err(|e| not_onnx(format!("protobuf decoding failed ({e})")))?;
    if proto.ir_version.is_none() {
        return Err(not_onnx(
            "ir_version is missing (truncated or not a model file?)".into(),
        ));
    }
    if proto.graph.is_none() {
        return Err(not_onnx("the model has no graph".into()));
    }
    Ok(LoadedModel {
        proto,
        path: path.to_path_buf(),
        external_files: Vec::new(),
        file_len: 0,
    })
}

/// Maps a whole file read-only. Falls back to reading when the file cannot be
/// mapped (a pipe, say).
fn map_file(file: &File, len: u64) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only. As with any mmap, another process
    // truncating the file while we run can fault; inputs are not expected to
    // change under a running build step, and we never write to them.
    match unsafe { memmap2::Mmap::map(file) } {
        Ok(map) => Ok(Bytes::from_owner(map)),
        Err(_) => {
            let mut buf = Vec::new();
            io::Read::read_to_end(&mut &*file, &mut buf)?;
            Ok(Bytes::from(buf))
        }
    }
}

struct ExternalResolver<'a> {
    model: &'a Path,
    folder: &'a Path,
    canonical_folder: Option<PathBuf>,
    mapped: HashMap<PathBuf, Bytes>,
    files: Vec<PathBuf>,
}

impl<'a> ExternalResolver<'a> {
    fn new(model: &'a Path, folder: &'a Path) -> Self {
        Self {
            model,
            folder,
            canonical_folder: None,
            mapped: HashMap::new(),
            files: Vec::new(),
        }
    }

    fn resolve(&mut self, tensor: &mut TensorProto) -> Result<(), LoadError> {
        if tensor.data_location != Some(DataLocation::External as i32) {
            return Ok(());
        }
        let err = |reason: String| LoadError::ExternalData {
            path: self.model.to_path_buf(),
            tensor: tensor.name().to_string(),
            reason,
        };
        let mut location = None;
        let mut offset = 0u64;
        let mut length = None;
        for entry in &tensor.external_data {
            let value = entry.value();
            let number = |what: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| err(format!("has a non-numeric {what} '{value}'")))
            };
            match entry.key() {
                "location" => location = Some(value.to_string()),
                "offset" => offset = number("offset")?,
                "length" => length = Some(number("length")?),
                _ => {} // checksum and future keys: not needed to read the data
            }
        }
        let location = location.ok_or_else(|| err("has no 'location' entry".into()))?;
        check_relative(&location).map_err(&err)?;
        let canonical_folder = match &self.canonical_folder {
            Some(f) => f.clone(),
            None => {
                let f = std::fs::canonicalize(self.folder).map_err(|e| {
                    err(format!(
                        "folder {} cannot be resolved: {e}",
                        self.folder.display()
                    ))
                })?;
                self.canonical_folder = Some(f.clone());
                f
            }
        };
        let joined = self.folder.join(&location);
        let target = std::fs::canonicalize(&joined)
            .map_err(|e| err(format!("file '{location}' cannot be opened: {e}")))?;
        if !target.starts_with(&canonical_folder) {
            return Err(err(format!(
                "file '{location}' resolves outside the model's folder"
            )));
        }
        let data = match self.mapped.get(&target) {
            Some(data) => data.clone(),
            None => {
                let file = open_regular(&target)
                    .map_err(|e| err(format!("file '{location}' cannot be opened: {e}")))?;
                let meta = file
                    .metadata()
                    .map_err(|e| err(format!("file '{location}': {e}")))?;
                let data = map_file(&file, meta.len())
                    .map_err(|e| err(format!("file '{location}': {e}")))?;
                self.mapped.insert(target.clone(), data.clone());
                self.files.push(target);
                data
            }
        };
        let available = data.len() as u64;
        if offset > available {
            return Err(err(format!(
                "offset {offset} is past the end of '{location}' ({available} bytes)"
            )));
        }
        let length = length.unwrap_or(available - offset);
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= available)
            .ok_or_else(|| {
                err(format!(
                    "claims bytes {offset}..{} of '{location}', which has only {available} bytes",
                    offset.saturating_add(length)
                ))
            })?;
        if tensor.raw_data.is_some() || has_typed_data(tensor) {
            // Which of the two payloads counts is not defined anywhere.
            return Err(err("holds values inline as well as in external data".into()));
        }
        tensor.raw_data = Some(data.slice(offset as usize..end as usize));
        tensor.external_data.clear();
        tensor.data_location = None;
        Ok(())
    }
}

/// Accepts only plain relative paths that cannot climb out of their folder.
fn check_relative(location: &str) -> Result<(), String> {
    if location.is_empty() {
        return Err("has an empty location".into());
    }
    if location.contains('\0') {
        return Err("location contains a NUL byte".into());
    }
    for component in Path::new(location).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "location '{location}' escapes the model's folder with '..'"
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "location '{location}' is absolute; it must be relative to the model's folder"
                ));
            }
        }
    }
    Ok(())
}

/// Checks that a tensor's payload matches its dims and element type.
fn check_tensor(path: &Path, tensor: &TensorProto) -> Result<(), LoadError> {
    let bad = |reason: String| LoadError::BadTensor {
        path: path.to_path_buf(),
        tensor: tensor.name().to_string(),
        reason,
    };
    if tensor.segment.is_some() {
        // A chunk of a larger tensor whose dims describe the whole: no
        // exporter writes these and ONNX Runtime does not read them; their
        // sizes could not be checked against a payload.
        return Err(bad(
            "is a segment of a larger tensor, which is not supported".into(),
        ));
    }
    let mut elements = 1u64;
    for &d in &tensor.dims {
        let d = u64::try_from(d).map_err(|_| bad(format!("has a negative dimension {d}")))?;
        elements = elements.checked_mul(d).ok_or_else(|| {
            bad(format!(
                "claims an impossible number of elements (dims {:?})",
                tensor.dims
            ))
        })?;
    }
    let dt = tensor.data_type();
    // The values live in exactly one place, and a typed field only holds
    // the element types the ONNX spec assigns to it: a float tensor whose
    // numbers sit in int64_data has no float payload at all.
    let fields = data_fields(tensor);
    if fields.len() > 1 {
        return Err(bad(format!(
            "holds values in both {} and {}; only one may be set",
            fields[0], fields[1]
        )));
    }
    if let Some(&field) = fields.first()
        && field != "raw_data"
        && field != typed_field(dt)
    {
        return Err(bad(format!(
            "is {} but stores its values in {field} (which holds {} values)",
            dtype::name(dt),
            field.trim_end_matches("_data")
        )));
    }
    let mismatch = |what: &str, got: usize, want: u64| {
        bad(format!(
            "dims {:?} of {} need {want} {what}, but the tensor holds {got}",
            tensor.dims,
            dtype::name(dt)
        ))
    };
    if let Some(raw) = &tensor.raw_data {
        if dt == dtype::code::STRING || dt == 0 {
            return Err(bad(format!(
                "raw_data cannot hold {} elements",
                dtype::name(dt)
            )));
        }
        if dtype::bits(dt).is_some() {
            // None here is an overflow: more bytes than any file holds.
            let want = dtype::raw_len(dt, elements).ok_or_else(|| {
                bad(format!(
                    "claims an impossible number of bytes (dims {:?})",
                    tensor.dims
                ))
            })?;
            if raw.len() as u64 != want {
                return Err(mismatch("bytes", raw.len(), want));
            }
        }
        return Ok(());
    }
    let complex = |n: u64| {
        if matches!(dt, 14 | 15) {
            n.saturating_mul(2)
        } else {
            n
        }
    };
    let typed: Option<(&str, usize, u64)> = match dt {
        1 | 14 if !tensor.float_data.is_empty() => {
            Some(("floats", tensor.float_data.len(), complex(elements)))
        }
        11 | 15 if !tensor.double_data.is_empty() => {
            Some(("doubles", tensor.double_data.len(), complex(elements)))
        }
        7 if !tensor.int64_data.is_empty() => {
            Some(("int64 values", tensor.int64_data.len(), elements))
        }
        12 | 13 if !tensor.uint64_data.is_empty() => {
            Some(("uint64 values", tensor.uint64_data.len(), elements))
        }
        8 => Some(("strings", tensor.string_data.len(), elements)),
        _ if !tensor.int32_data.is_empty() => {
            let per_word = match dtype::bits(dt) {
                Some(4) => 2,
                Some(2) => 4,
                _ => 1,
            };
            Some((
                "int32 values",
                tensor.int32_data.len(),
                elements.div_ceil(per_word),
            ))
        }
        _ => None,
    };
    match typed {
        Some((what, got, want)) if got as u64 != want => Err(mismatch(what, got, want)),
        Some(_) => Ok(()),
        None if elements > 0 && !has_typed_data(tensor) => Err(bad(format!(
            "dims {:?} claim {elements} elements but the tensor holds no data",
            tensor.dims
        ))),
        None => Ok(()),
    }
}

/// The payload fields of `t` that are set, by their proto names.
fn data_fields(t: &TensorProto) -> Vec<&'static str> {
    [
        ("raw_data", t.raw_data.is_some()),
        ("float_data", !t.float_data.is_empty()),
        ("int32_data", !t.int32_data.is_empty()),
        ("string_data", !t.string_data.is_empty()),
        ("int64_data", !t.int64_data.is_empty()),
        ("double_data", !t.double_data.is_empty()),
        ("uint64_data", !t.uint64_data.is_empty()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(name, _)| name)
    .collect()
}

/// The typed field that holds element type `data_type` (onnx.proto's
/// comments on each field): everything not listed goes in int32_data.
fn typed_field(data_type: i32) -> &'static str {
    match data_type {
        1 | 14 => "float_data",
        11 | 15 => "double_data",
        7 => "int64_data",
        12 | 13 => "uint64_data",
        8 => "string_data",
        _ => "int32_data",
    }
}

fn has_typed_data(t: &TensorProto) -> bool {
    !(t.float_data.is_empty()
        && t.int32_data.is_empty()
        && t.string_data.is_empty()
        && t.int64_data.is_empty()
        && t.double_data.is_empty()
        && t.uint64_data.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locations() {
        assert!(check_relative("weights.bin").is_ok());
        assert!(check_relative("./sub/weights.bin").is_ok());
        assert!(
            check_relative("../weights.bin")
                .unwrap_err()
                .contains("escapes")
        );
        assert!(
            check_relative("sub/../../x")
                .unwrap_err()
                .contains("escapes")
        );
        assert!(
            check_relative("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(check_relative("").is_err());
    }

    #[test]
    fn tensor_size_mismatch_is_reported() {
        let tensor = TensorProto {
            name: Some("w".into()),
            dims: vec![2, 3],
            data_type: Some(1),
            raw_data: Some(Bytes::from(vec![0u8; 20])),
            ..Default::default()
        };
        let msg = check_tensor(Path::new("m.onnx"), &tensor)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("need 24 bytes") && msg.contains("holds 20"),
            "{msg}"
        );
        let huge = TensorProto {
            dims: vec![i64::MAX, i64::MAX],
            data_type: Some(1),
            ..Default::default()
        };
        assert!(check_tensor(Path::new("m.onnx"), &huge).is_err());
    }
}
