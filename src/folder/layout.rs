//! Which files of a folder are the model's towers.
//!
//! Files are found where the exporters put them — `*.onnx` in the folder
//! and in its `onnx/` subfolder — and told apart by what they read, not by
//! their names (a captioner's pair has no standard names): a file taking
//! images and token ids is a whole model, images only a vision encoder,
//! token ids only a text encoder, token ids and `encoder_hidden_states` a
//! text decoder. A file giving `inputs_embeds` from token ids is a token
//! embedding table, and one reading `inputs_embeds` or a KV cache (without
//! `encoder_hidden_states`) a decoder language model: beside a vision
//! encoder and the embedding table (transformers.js's LLaVA-style layout)
//! it reads the image features followed by the text's embeddings. A
//! captioner's decoder reading `encoder_hidden_states` through a KV cache is
//! not pruned.
//!
//! transformers.js keeps reduced-precision siblings (`vision_model_fp16.onnx`,
//! `…_quantized.onnx`, …): the full-precision file is the tower pruned, the
//! siblings are copied unchanged and listed, and `--files` chooses otherwise.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::FolderError;
use crate::onnx::proto::{GraphProto, TensorProto, ValueInfoProto, type_proto};
use crate::onnx::{self, LoadedModel};

/// What a model file of the folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Vision encoder (reads `pixel_values`).
    Vision,
    /// Vision and text towers in one file.
    Whole,
    /// Text encoder (reads `input_ids`).
    Text,
    /// Text decoder reading the vision encoder's `encoder_hidden_states`.
    Decoder,
    /// Token embedding table (`input_ids` → `inputs_embeds`) of a decoder
    /// language model.
    Embeddings,
    /// Decoder language model: reads `inputs_embeds` (or token ids) and,
    /// usually, a KV cache.
    Language,
}

impl Role {
    /// How messages and reports name it.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Vision => "vision encoder",
            Role::Whole => "whole model (vision and text)",
            Role::Text => "text encoder",
            Role::Decoder => "text decoder",
            Role::Embeddings => "token embeddings",
            Role::Language => "decoder language model",
        }
    }

    /// Short name for JSON.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vision => "vision",
            Role::Whole => "model",
            Role::Text => "text",
            Role::Decoder => "decoder",
            Role::Embeddings => "embeddings",
            Role::Language => "language_model",
        }
    }

    /// Whether it holds (or reads) a vision tower / a text tower.
    fn towers(self) -> (bool, bool) {
        match self {
            Role::Vision => (true, false),
            Role::Whole => (true, true),
            Role::Text | Role::Decoder | Role::Language => (false, true),
            // No tower of its own; two of them are refused by `add_part`.
            Role::Embeddings => (false, false),
        }
    }
}

/// A model file that is pruned.
#[derive(Debug, Clone)]
pub struct Part {
    /// Relative to the folder.
    pub path: PathBuf,
    /// What it is.
    pub role: Role,
    /// The file as loaded.
    pub file: LoadedModel,
}

/// A model file that is copied unchanged, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpruned {
    /// Relative to the folder.
    pub path: PathBuf,
    /// Why it is not pruned.
    pub reason: String,
}

/// The files of a folder: the parts pruned together, and everything else.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The folder.
    pub root: PathBuf,
    /// The files pruned together, vision first.
    pub parts: Vec<Part>,
    /// Model files copied unchanged (variants, cached decoders), with why.
    pub unpruned: Vec<Unpruned>,
    /// Every file copied unchanged (relative paths, sorted): all files of
    /// the folder but the parts and their external data.
    pub copied: Vec<PathBuf>,
}

/// Name endings of transformers.js's reduced-precision siblings.
const VARIANTS: &[&str] = &[
    "_fp16",
    "_q4f16",
    "_quantized",
    "_int8",
    "_uint8",
    "_q4",
    "_q8",
    "_bnb4",
];

/// The stem a variant belongs to, when `stem` names a variant.
fn variant_of(stem: &str) -> Option<&str> {
    VARIANTS
        .iter()
        .find_map(|suffix| stem.strip_suffix(suffix))
        .filter(|base| !base.is_empty())
}

/// Finds the parts of `root` (or takes `choice`, paths relative to it).
pub fn scan(root: &Path, choice: Option<&[PathBuf]>) -> Result<Layout, FolderError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| FolderError::Io { path, error }
    };
    let canonical_root = std::fs::canonicalize(root).map_err(io(root))?;
    let mut unpruned = Vec::new();
    let mut parts: Vec<Part> = Vec::new();
    match choice {
        Some(chosen) => {
            for entry in chosen {
                let relative = chosen_file(root, &canonical_root, entry)?;
                let file =
                    onnx::load(&root.join(&relative)).map_err(|e| FolderError::BadChoice {
                        path: entry.clone(),
                        reason: e.to_string(),
                    })?;
                match classify(file.proto.graph.as_ref()) {
                    Ok(role) => add_part(root, &mut parts, relative, role, file)?,
                    Err(reason) => {
                        return Err(FolderError::BadChoice {
                            path: entry.clone(),
                            reason: format!("not a tower to prune: it {reason}"),
                        });
                    }
                }
            }
            for relative in model_files(root)? {
                if !parts.iter().any(|p| p.path == relative) {
                    unpruned.push(Unpruned {
                        path: relative,
                        reason: "not chosen by --files".into(),
                    });
                }
            }
        }
        None => {
            let mut variants = Vec::new();
            let mut cached_decoders: Vec<PathBuf> = Vec::new();
            for relative in model_files(root)? {
                let stem = relative
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Some(base) = variant_of(&stem) {
                    variants.push((relative, base.to_string()));
                    continue;
                }
                let path = root.join(&relative);
                let file = onnx::load(&path)?;
                match classify(file.proto.graph.as_ref()) {
                    Ok(role) => add_part(root, &mut parts, relative, role, file)?,
                    Err(reason) => {
                        if reads_encoder_states(file.proto.graph.as_ref()) {
                            cached_decoders.push(relative.clone());
                        }
                        unpruned.push(Unpruned {
                            path: relative,
                            reason: format!("it {reason}"),
                        });
                    }
                }
            }
            // A decoder that generates from the vision encoder's states
            // through a cache would be left as it was beside a pruned
            // encoder (and decoder): say so rather than write that folder.
            if let Some(cached) = cached_decoders.first()
                && parts.iter().any(|p| p.role.towers().0)
            {
                return Err(FolderError::Misfit {
                    root: root.to_path_buf(),
                    reason: format!(
                        "{} reads encoder_hidden_states with a KV cache, and this build does not prune cached decoders: the folder would pair it, unchanged, with pruned files; choose the files to prune with --files to do so anyway (it is then copied unchanged)",
                        cached.display()
                    ),
                });
            }
            for (relative, base) in variants {
                let reason = match parts
                    .iter()
                    .find(|p| p.path.file_stem().is_some_and(|s| *s == *base))
                {
                    Some(part) => format!(
                        "a variant of {} (choose it with --files to prune it instead)",
                        part.path.display()
                    ),
                    None => "a reduced-precision variant (choose it with --files)".into(),
                };
                unpruned.push(Unpruned {
                    path: relative,
                    reason,
                });
            }
        }
    }
    if parts.is_empty() {
        return Err(FolderError::NoModels {
            path: root.to_path_buf(),
        });
    }
    parts.sort_by(|a, b| a.role.cmp(&b.role).then(a.path.cmp(&b.path)));
    let misfit = |reason: String| FolderError::Misfit {
        root: root.to_path_buf(),
        reason,
    };
    let has = |role: Role| parts.iter().find(|p| p.role == role);
    if let Some(lm) = has(Role::Language)
        && reads_input(lm, "inputs_embeds")
        && has(Role::Embeddings).is_none()
    {
        return Err(misfit(format!(
            "{} reads inputs_embeds, and no file of the folder gives them (the token embeddings, embed_tokens.onnx in transformers.js's layout; add it to --files)",
            lm.path.display()
        )));
    }
    if let Some(table) = has(Role::Embeddings)
        && !has(Role::Language).is_some_and(|lm| reads_input(lm, "inputs_embeds"))
    {
        return Err(misfit(format!(
            "{} gives inputs_embeds, and no decoder language model of the folder reads them (add it to --files)",
            table.path.display()
        )));
    }
    let has_vision = parts.iter().any(|p| p.role.towers().0);
    if parts.iter().any(|p| p.role == Role::Decoder) && !has_vision {
        return Err(FolderError::Misfit {
            root: root.to_path_buf(),
            reason: "the text decoder reads encoder_hidden_states, and no vision encoder of the folder gives them (add it to --files)".into(),
        });
    }
    unpruned.sort_by(|a, b| a.path.cmp(&b.path));
    let copied = copied_files(root, &parts)?;
    Ok(Layout {
        root: root.to_path_buf(),
        parts,
        unpruned,
        copied,
    })
}

/// Adds a part, refusing a second file for a tower already taken.
fn add_part(
    root: &Path,
    parts: &mut Vec<Part>,
    path: PathBuf,
    role: Role,
    file: LoadedModel,
) -> Result<(), FolderError> {
    let (vision, text) = role.towers();
    if let Some(other) = parts.iter().find(|p| {
        let (v, t) = p.role.towers();
        (vision && v) || (text && t) || (role == Role::Embeddings && p.role == role)
    }) {
        let tower = if role == Role::Embeddings {
            "token embeddings"
        } else if vision && other.role.towers().0 {
            "vision tower"
        } else {
            "text tower"
        };
        let (first, second) = if other.path <= path {
            (other.path.clone(), path)
        } else {
            (path, other.path.clone())
        };
        return Err(FolderError::TwoCandidates {
            root: root.to_path_buf(),
            role: tower,
            first,
            second,
        });
    }
    parts.push(Part { path, role, file });
    Ok(())
}

/// A `--files` entry as a path relative to the folder, checked to be a
/// regular `.onnx` file inside it.
fn chosen_file(root: &Path, canonical_root: &Path, entry: &Path) -> Result<PathBuf, FolderError> {
    let bad = |reason: &str| FolderError::BadChoice {
        path: entry.to_path_buf(),
        reason: reason.into(),
    };
    let full = if entry.is_absolute() {
        entry.to_path_buf()
    } else {
        root.join(entry)
    };
    let canonical = std::fs::canonicalize(&full).map_err(|e| bad(&e.to_string()))?;
    let relative = canonical
        .strip_prefix(canonical_root)
        .map_err(|_| bad(&format!("is not inside {}", root.display())))?
        .to_path_buf();
    if !canonical.is_file() {
        return Err(bad("is not a file"));
    }
    if relative.extension().is_none_or(|e| e != "onnx") {
        return Err(bad("is not an .onnx file"));
    }
    Ok(relative)
}

/// The entries of folder `dir`.
fn entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, FolderError> {
    let io = |error| FolderError::Io {
        path: dir.to_path_buf(),
        error,
    };
    std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map_err(io))
        .collect()
}

/// `*.onnx` in the folder and in `onnx/`, relative paths, sorted.
fn model_files(root: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let mut found = Vec::new();
    for sub in [PathBuf::new(), PathBuf::from("onnx")] {
        let dir = root.join(&sub);
        if !dir.is_dir() {
            continue;
        }
        for entry in entries(&dir)? {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "onnx") && path.is_file() {
                found.push(sub.join(entry.file_name()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// What a graph reads makes its role; `Err` says why it is no tower.
fn classify(graph: Option<&GraphProto>) -> Result<Role, String> {
    let Some(graph) = graph else {
        return Err("has no graph".into());
    };
    let constants: HashSet<&str> = graph.initializer.iter().map(TensorProto::name).collect();
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !constants.contains(i.name()))
        .collect();
    let (mut image, mut ids, mut encoded) = (false, false, false);
    let (mut cache, mut embeds) = (None, false);
    for input in &inputs {
        let name = input.name();
        // A cache entry is 4-D float too, and no image.
        // optimum's and onnxruntime-genai's cache names (`past_values` of a
        // time-series model is no cache).
        if name.starts_with("past_key_values") {
            cache.get_or_insert(name);
            continue;
        }
        embeds |= name == "inputs_embeds";
        let (elem, rank) = tensor_kind(input);
        let float = matches!(elem, 1 | 10 | 11 | 16);
        let integer = matches!(elem, 6 | 7);
        image |= name == "pixel_values" || (float && rank == Some(4));
        ids |= name == "input_ids" || (integer && rank == Some(2) && !name.contains("mask"));
        encoded |= name == "encoder_hidden_states";
    }
    if let Some(name) = cache
        && encoded
    {
        return Err(format!(
            "reads a KV cache ('{name}') and encoder_hidden_states; a captioner's decoder with a cache is not pruned by this build"
        ));
    }
    // A language model: a cache, or embeddings in and logits out (an
    // encoder reading `inputs_embeds`, Florence-2's, is none).
    let gives_logits = graph.output.iter().any(|o| o.name() == "logits");
    if let Some(name) = cache
        && image
    {
        return Err(format!(
            "reads a KV cache ('{name}') and images; a whole model with a cache is not pruned by this build"
        ));
    }
    if cache.is_some() || (embeds && gives_logits) {
        return Ok(Role::Language);
    }
    if embeds {
        return Err("reads inputs_embeds without a cache and gives no logits (an encoder of embeddings), which this build does not prune".into());
    }
    let gives_embeddings = graph.output.iter().any(|o| o.name() == "inputs_embeds");
    if ids && !image && !encoded && gives_embeddings {
        return Ok(Role::Embeddings);
    }
    match (image, ids, encoded) {
        (true, true, _) => Ok(Role::Whole),
        (false, true, true) => Ok(Role::Decoder),
        (true, false, _) => Ok(Role::Vision),
        (false, true, false) => Ok(Role::Text),
        (false, false, _) => {
            let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
            Err(format!(
                "reads neither images nor token ids (inputs: {})",
                names.join(", ")
            ))
        }
    }
}

/// Whether the part's graph has the input `name`.
fn reads_input(part: &Part, name: &str) -> bool {
    part.file
        .proto
        .graph
        .as_ref()
        .is_some_and(|g| g.input.iter().any(|i| i.name() == name))
}

/// Whether a graph reads `encoder_hidden_states` (a decoder of the vision
/// encoder's output).
fn reads_encoder_states(graph: Option<&GraphProto>) -> bool {
    graph.is_some_and(|g| g.input.iter().any(|i| i.name() == "encoder_hidden_states"))
}

/// Element type and rank of a tensor-typed value (0 and `None` when not known).
pub(super) fn tensor_kind(info: &ValueInfoProto) -> (i32, Option<usize>) {
    match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => (
            t.elem_type.unwrap_or(0),
            t.shape.as_ref().map(|s| s.dim.len()),
        ),
        _ => (0, None),
    }
}

/// Every file under `root` but the parts and their external data, relative
/// paths in sorted order. A link to a folder is refused (it could lead
/// back into the folder).
fn copied_files(root: &Path, parts: &[Part]) -> Result<Vec<PathBuf>, FolderError> {
    let mut skip: HashSet<PathBuf> = HashSet::new();
    for part in parts {
        skip.extend(onnx::model_files(&part.file));
    }
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(sub) = pending.pop() {
        let dir = root.join(&sub);
        for entry in entries(&dir)? {
            let relative = sub.join(entry.file_name());
            let path = root.join(&relative);
            let meta = std::fs::symlink_metadata(&path).map_err(|error| FolderError::Io {
                path: path.clone(),
                error,
            })?;
            let target = if meta.file_type().is_symlink() {
                std::fs::metadata(&path).map_err(|error| FolderError::Io {
                    path: path.clone(),
                    error,
                })?
            } else {
                meta.clone()
            };
            if target.is_dir() {
                if meta.file_type().is_symlink() {
                    return Err(FolderError::Misfit {
                        root: root.to_path_buf(),
                        reason: format!("{} is a link to a folder", relative.display()),
                    });
                }
                pending.push(relative);
            } else if target.is_file() {
                let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                if !skip.contains(&canonical) {
                    found.push(relative);
                }
            } else {
                return Err(FolderError::Misfit {
                    root: root.to_path_buf(),
                    reason: format!("{} is not a regular file", relative.display()),
                });
            }
        }
    }
    found.sort();
    Ok(found)
}
