//! Writing a model: deterministic, streaming, atomic.
//!
//! The encoder writes fields in tag order, as protobuf's reference
//! serializer does, so an unchanged model re-encodes to the bytes it was read
//! from. Tensor payloads go straight from their (memory-mapped) buffers to the
//! file: peak memory stays near the model's size instead of twice it.
//! Output goes to a temporary file in the destination folder that is renamed
//! over OUT only when everything succeeded.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use prost::encoding::{self, WireType};

use super::PROTOBUF_LIMIT;
use super::proto::{
    GraphProto, ModelProto, StringStringEntryProto, TensorProto, tensor_proto::DataLocation,
};

/// Where tensor payloads go when saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalData {
    /// Embedded, unless the model would exceed protobuf's 2 GiB limit.
    #[default]
    Auto,
    /// Initializers of at least `SaveOptions::inline_threshold` bytes go to
    /// `OUT.data` next to the model.
    Always,
    /// Always embedded; a model over 2 GiB is an error.
    Never,
}

/// How to save.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Placement of tensor payloads.
    pub external_data: ExternalData,
    /// Initializers smaller than this stay inside the model file.
    pub inline_threshold: usize,
    /// Offsets in the external data file are multiples of this (mmap-able).
    pub alignment: u64,
    /// Largest model file allowed; above it `Auto` moves weights out and
    /// `Never` fails. Protobuf's 2 GiB unless a test lowers it.
    pub size_limit: u64,
    /// File name of the external data file, in OUT's folder (default:
    /// [`external_path`], `OUT.data`).
    pub external_name: Option<String>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            external_data: ExternalData::Auto,
            inline_threshold: 1024,
            size_limit: PROTOBUF_LIMIT,
            alignment: 4096,
            external_name: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveSummary {
    /// Bytes in the model file.
    pub model_bytes: u64,
    /// The external data file, when one was written.
    pub external_file: Option<PathBuf>,
    /// Bytes in the external data file (padding included).
    pub external_bytes: u64,
}

/// Why a model could not be saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaveError {
    /// Writing, renaming or creating the temporary file failed.
    #[error("cannot write {}: {error}", path.display())]
    Io {
        /// The destination.
        path: PathBuf,
        /// The operating system's error.
        error: io::Error,
    },
    /// The model does not fit one protobuf message.
    #[error(
        "{}: the model needs {bytes} bytes, over the {limit}-byte limit of one protobuf message; store weights as external data (--external-data auto or always)",
        path.display()
    )]
    TooLarge {
        /// The destination.
        path: PathBuf,
        /// Encoded size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The destination would overwrite one of the input files.
    #[error("refusing to write {}{}: it is an input file ({})", path.display(), role_note(*role), input.display())]
    OverwritesInput {
        /// The destination.
        path: PathBuf,
        /// What the destination is, when its name does not come from one
        /// option directly (`OUT's external data file`, the report's SVG plot).
        role: Option<&'static str>,
        /// The input it collides with.
        input: PathBuf,
    },
    /// The destination lies inside an input folder.
    #[error("refusing to write {}{}: it is inside the input folder {} (inputs are never modified)", path.display(), role_note(*role), folder.display())]
    InsideInput {
        /// The destination.
        path: PathBuf,
        /// What the destination is, when its name is derived.
        role: Option<&'static str>,
        /// The input folder.
        folder: PathBuf,
    },
    /// The destination lies inside an output folder written whole.
    #[error("refusing to write {}{}: it is inside {} (OUT_DIR is written whole, and its files are the model's)", path.display(), role_note(*role), folder.display())]
    InsideOutput {
        /// The destination.
        path: PathBuf,
        /// What the destination is, when its name is derived.
        role: Option<&'static str>,
        /// The output folder.
        folder: PathBuf,
    },
    /// Two outputs of one run would be the same file.
    #[error("refusing to write {}{}: it is also {other}", path.display(), role_note(*role))]
    OverwritesOutput {
        /// The destination.
        path: PathBuf,
        /// What the destination is, when its name is derived (see `OverwritesInput`).
        role: Option<&'static str>,
        /// The other output it collides with (`OUT`, `the --plan-out file`, …).
        other: &'static str,
    },
}

fn role_note(role: Option<&'static str>) -> String {
    role.map(|r| format!(" ({r})")).unwrap_or_default()
}

/// The external data file that goes with model file `out`.
pub fn external_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".data");
    out.with_file_name(name)
}

/// Saves `model` to `out` atomically. The model is not modified; external
/// data placement is applied to a copy (tensor payloads are shared, not copied).
pub fn save(
    model: &ModelProto,
    out: &Path,
    options: &SaveOptions,
) -> Result<SaveSummary, SaveError> {
    let io_err = |error| SaveError::Io {
        path: out.to_path_buf(),
        error,
    };
    let folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = out
        .file_name()
        .ok_or_else(|| {
            io_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a file path",
            ))
        })?
        .to_string_lossy()
        .into_owned();

    if !folder.is_dir() {
        let reason = format!("folder {} does not exist", folder.display());
        return Err(io_err(io::Error::new(io::ErrorKind::NotFound, reason)));
    }
    let externalize = match options.external_data {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => model.encoded_len() as u64 > options.size_limit,
    };
    let mut staged_data = None;
    let owned;
    let model = if externalize {
        let mut copy = model.clone();
        let data_path = match &options.external_name {
            Some(name) => out.with_file_name(name),
            None => external_path(out),
        };
        let location = data_path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut tmp = temp_in(&folder, &location).map_err(io_err)?;
        let written =
            write_external(&mut copy, tmp.as_file_mut(), &location, options).map_err(io_err)?;
        staged_data = Some((tmp, data_path, written));
        owned = copy;
        &owned
    } else {
        model
    };

    let len = model.encoded_len() as u64;
    if len > options.size_limit {
        return Err(SaveError::TooLarge {
            path: out.to_path_buf(),
            bytes: len,
            limit: options.size_limit,
        });
    }
    let mut tmp = temp_in(&folder, &file_name).map_err(io_err)?;
    {
        let mut writer = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        write_model(&mut writer, model).map_err(io_err)?;
        writer.flush().map_err(io_err)?;
    }

    let mut summary = SaveSummary {
        model_bytes: len,
        external_file: None,
        external_bytes: 0,
    };
    if let Some((data_tmp, data_path, written)) = staged_data {
        data_tmp.persist(&data_path).map_err(io_err)?;
        summary.external_file = Some(data_path);
        summary.external_bytes = written;
    }
    tmp.persist(out).map_err(io_err)?;
    Ok(summary)
}

/// A temporary file next to the destination (same filesystem, so the final
/// rename is atomic). It is deleted if dropped before being persisted, and
/// by the signal handler if the run is interrupted.
fn temp_in(folder: &Path, name: &str) -> io::Result<super::staging::Staged> {
    super::staging::Staged::new_in(folder, name)
}

/// Moves every large enough raw initializer of the main graph into `file`
/// and points the tensor at it. Returns the bytes written.
fn write_external(
    model: &mut ModelProto,
    file: &mut File,
    location: &str,
    options: &SaveOptions,
) -> io::Result<u64> {
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    let zeros = vec![0u8; options.alignment.max(1) as usize];
    if let Some(graph) = model.graph.as_mut() {
        for tensor in &mut graph.initializer {
            let Some(raw) = tensor
                .raw_data
                .take_if(|raw| raw.len() >= options.inline_threshold)
            else {
                continue;
            };
            let aligned = offset.next_multiple_of(options.alignment.max(1));
            writer.write_all(&zeros[..(aligned - offset) as usize])?;
            writer.write_all(&raw)?;
            tensor.external_data = vec![
                entry("location", location),
                entry("offset", &aligned.to_string()),
                entry("length", &raw.len().to_string()),
            ];
            tensor.data_location = Some(DataLocation::External as i32);
            offset = aligned + raw.len() as u64;
        }
    }
    writer.flush()?;
    Ok(offset)
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(key.into()),
        value: Some(value.into()),
    }
}

/// Payloads above this size bypass the scratch buffer.
const STREAM_THRESHOLD: usize = 64 * 1024;

/// Encodes `model` to `w` field by field in tag order, byte-identical to
/// `model.encode_to_vec()` but without materialising the whole message.
fn write_model(w: &mut impl Write, model: &ModelProto) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 16);
    let head = ModelProto {
        ir_version: model.ir_version,
        producer_name: model.producer_name.clone(),
        producer_version: model.producer_version.clone(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        doc_string: model.doc_string.clone(),
        ..Default::default()
    };
    head.encode_raw(&mut buf);
    if let Some(graph) = &model.graph {
        encoding::encode_key(7, WireType::LengthDelimited, &mut buf);
        encoding::encode_varint(graph.encoded_len() as u64, &mut buf);
        write_graph(w, graph, &mut buf)?;
    }
    let tail = ModelProto {
        opset_import: model.opset_import.clone(),
        metadata_props: model.metadata_props.clone(),
        training_info: model.training_info.clone(),
        functions: model.functions.clone(),
        configuration: model.configuration.clone(),
        ..Default::default()
    };
    tail.encode_raw(&mut buf);
    w.write_all(&buf)
}

fn write_graph(w: &mut impl Write, graph: &GraphProto, buf: &mut Vec<u8>) -> io::Result<()> {
    for node in &graph.node {
        encoding::message::encode(1, node, buf);
        drain(w, buf, false)?;
    }
    if let Some(name) = &graph.name {
        encoding::string::encode(2, name, buf);
    }
    for tensor in &graph.initializer {
        write_tensor(w, 5, tensor, buf)?;
    }
    let tail = GraphProto {
        doc_string: graph.doc_string.clone(),
        input: graph.input.clone(),
        output: graph.output.clone(),
        value_info: graph.value_info.clone(),
        quantization_annotation: graph.quantization_annotation.clone(),
        sparse_initializer: graph.sparse_initializer.clone(),
        metadata_props: graph.metadata_props.clone(),
        ..Default::default()
    };
    tail.encode_raw(buf);
    drain(w, buf, true)
}

/// Writes `tensor` as field `tag`; a large `raw_data` is written directly
/// from its buffer.
fn write_tensor(
    w: &mut impl Write,
    tag: u32,
    tensor: &TensorProto,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let raw = match &tensor.raw_data {
        Some(raw) if raw.len() >= STREAM_THRESHOLD => raw,
        _ => {
            encoding::message::encode(tag, tensor, buf);
            return drain(w, buf, false);
        }
    };
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(tensor.encoded_len() as u64, buf);
    // Fields 1..=8 precede raw_data (9); 10.. follow it.
    let head = TensorProto {
        dims: tensor.dims.clone(),
        data_type: tensor.data_type,
        segment: tensor.segment,
        float_data: tensor.float_data.clone(),
        int32_data: tensor.int32_data.clone(),
        string_data: tensor.string_data.clone(),
        int64_data: tensor.int64_data.clone(),
        name: tensor.name.clone(),
        ..Default::default()
    };
    head.encode_raw(buf);
    encoding::encode_key(9, WireType::LengthDelimited, buf);
    encoding::encode_varint(raw.len() as u64, buf);
    drain(w, buf, true)?;
    w.write_all(raw)?;
    let tail = TensorProto {
        double_data: tensor.double_data.clone(),
        uint64_data: tensor.uint64_data.clone(),
        doc_string: tensor.doc_string.clone(),
        external_data: tensor.external_data.clone(),
        data_location: tensor.data_location,
        metadata_props: tensor.metadata_props.clone(),
        ..Default::default()
    };
    tail.encode_raw(buf);
    drain(w, buf, false)
}

/// Flushes the scratch buffer to `w` when it is large (or when `force`).
fn drain(w: &mut impl Write, buf: &mut Vec<u8>, force: bool) -> io::Result<()> {
    if force || buf.len() >= 1 << 16 {
        w.write_all(buf)?;
        buf.clear();
    }
    Ok(())
}

/// Encodes a model to memory with the same encoder as `save` (for tests and
/// small models).
pub fn encode_to_vec(model: &ModelProto) -> Vec<u8> {
    let mut out = Vec::with_capacity(model.encoded_len());
    write_model(&mut out, model).expect("writing to a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{NodeProto, OperatorSetIdProto};
    use bytes::Bytes;

    fn sample_model() -> ModelProto {
        let big = TensorProto {
            name: Some("w".into()),
            dims: vec![300, 100],
            data_type: Some(1),
            raw_data: Some(Bytes::from(
                (0..120_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
            )),
            doc_string: Some("after raw".into()),
            ..Default::default()
        };
        let small = TensorProto {
            name: Some("b".into()),
            dims: vec![2],
            data_type: Some(7),
            int64_data: vec![1, -2],
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(8),
            producer_name: Some("test".into()),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![NodeProto {
                    op_type: Some("Identity".into()),
                    input: vec!["w".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                initializer: vec![big, small],
                doc_string: Some("doc".into()),
                ..Default::default()
            }),
            metadata_props: vec![entry("k", "v")],
            ..Default::default()
        }
    }

    #[test]
    fn streaming_encoder_matches_prost() {
        let model = sample_model();
        assert_eq!(encode_to_vec(&model), model.encode_to_vec());
    }

    #[test]
    fn external_data_is_aligned_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.onnx");
        let options = SaveOptions {
            external_data: ExternalData::Always,
            ..Default::default()
        };
        let summary = save(&sample_model(), &out, &options).unwrap();
        assert_eq!(
            summary.external_file.as_deref(),
            Some(dir.path().join("m.onnx.data").as_path())
        );
        assert_eq!(summary.external_bytes, 120_000);
        let loaded = crate::onnx::load(&out).unwrap();
        let graph = loaded.proto.graph.unwrap();
        assert_eq!(
            graph.initializer[0].raw_data,
            sample_model().graph.unwrap().initializer[0].raw_data
        );
        assert_eq!(graph.initializer[1].int64_data, vec![1, -2]);
        // nothing but the two outputs in the folder: temporaries are gone
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["m.onnx", "m.onnx.data"]);
    }

    #[test]
    fn auto_moves_weights_out_only_above_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let model = sample_model();
        let size = model.encoded_len() as u64;
        let small = dir.path().join("small.onnx");
        let fits = SaveOptions {
            size_limit: size,
            ..Default::default()
        };
        assert_eq!(save(&model, &small, &fits).unwrap().external_file, None);

        let big = dir.path().join("big.onnx");
        let over = SaveOptions {
            size_limit: size - 1,
            ..Default::default()
        };
        let summary = save(&model, &big, &over).unwrap();
        assert!(summary.external_file.is_some() && summary.model_bytes < 1000);

        let never = SaveOptions {
            external_data: ExternalData::Never,
            ..over
        };
        let err = save(&model, &dir.path().join("never.onnx"), &never).unwrap_err();
        assert!(err.to_string().contains("external data"), "{err}");
        assert!(!dir.path().join("never.onnx").exists());
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["big.onnx", "big.onnx.data", "small.onnx"]);
    }
}
