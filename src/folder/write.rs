//! Writing a pruned folder: the pruned files and a copy of every other file,
//! in a temporary folder beside OUT_DIR that is renamed to it at the end.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{FolderError, Joined, Layout};
use crate::onnx::proto::ModelProto;
use crate::onnx::{self, ExternalData, SaveOptions, SaveSummary};

/// One pruned file as written.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenFile {
    /// Relative to the folder.
    pub path: PathBuf,
    /// What it is (`vision`, `text`, `decoder`, `model`).
    pub role: &'static str,
    /// Bytes of the original (model + external data).
    pub bytes_before: u64,
    /// Bytes written (model + external data).
    pub bytes_after: u64,
}

/// Whether `out` can become the pruned folder: absent, or an empty folder.
pub fn check_destination(out: &Path) -> Result<(), FolderError> {
    let bad = |reason: &str| FolderError::Misfit {
        root: out.to_path_buf(),
        reason: reason.into(),
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(bad(&format!(
            "OUT_DIR's parent folder {} does not exist",
            parent.display()
        )));
    }
    match std::fs::symlink_metadata(out) {
        Err(_) => Ok(()),
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(out).map_err(|error| FolderError::Io {
                path: out.to_path_buf(),
                error,
            })?;
            if entries.next().is_some() {
                Err(bad(
                    "OUT_DIR exists and is not empty; give a new folder (it is written whole or not at all)",
                ))
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(bad("OUT_DIR exists and is not a folder")),
    }
}

/// Writes `files` (the joined model, pruned and split back by
/// [`Joined::split`], in member order) as the folder `out`: each part saved
/// at its path (external data like the original, or as `external` says),
/// every other file copied. On error nothing is left.
pub fn write(
    layout: &Layout,
    joined: &Joined,
    files: &[(PathBuf, ModelProto)],
    out: &Path,
    external: Option<ExternalData>,
) -> Result<(SaveSummary, Vec<WrittenFile>), FolderError> {
    check_destination(out)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| FolderError::Io { path, error }
    };
    let staged = onnx::StagedDir::beside(out).map_err(io(out))?;
    let mut summary = SaveSummary {
        model_bytes: 0,
        external_file: None,
        external_bytes: 0,
    };
    let mut written = Vec::new();
    for ((path, proto), member) in files.iter().zip(&joined.members) {
        let destination = staged.path().join(path);
        if let Some(parent) = destination.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let part = layout
            .parts
            .iter()
            .find(|p| p.path == *path)
            .expect("every member is a part");
        // The exporters' own name for the data file (optimum and
        // transformers.js: `model.onnx_data`), where the original had one.
        let data_name = match part.file.external_files.as_slice() {
            [one] => one.file_name().map(|n| n.to_string_lossy().into_owned()),
            _ => None,
        };
        let options = SaveOptions {
            external_data: external.unwrap_or(if member.external_data {
                ExternalData::Always
            } else {
                ExternalData::Auto
            }),
            external_name: data_name,
            ..Default::default()
        };
        let saved = onnx::save(proto, &destination, &options)?;
        summary.model_bytes += saved.model_bytes;
        summary.external_bytes += saved.external_bytes;
        written.push(WrittenFile {
            path: path.clone(),
            role: member.role.name(),
            bytes_before: onnx::model_files(&part.file)
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum(),
            bytes_after: saved.model_bytes + saved.external_bytes,
        });
    }
    for relative in &layout.copied {
        let from = layout.root.join(relative);
        let to = staged.path().join(relative);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::copy(&from, &to).map_err(io(&from))?;
    }
    staged.persist(out).map_err(io(out))?;
    Ok((summary, written))
}
