//! Which files a run may write: outputs are checked against every input
//! and against each other before any work, and small outputs (plans,
//! reports, plots, npz files) are written atomically like models are.

use std::path::{Path, PathBuf};

use super::{LoadedModel, SaveError};

/// The files of a loaded model that no output may replace: the model and
/// its external data, canonical paths.
pub fn model_files(file: &LoadedModel) -> Vec<PathBuf> {
    let model = std::fs::canonicalize(&file.path).unwrap_or_else(|_| file.path.clone());
    std::iter::once(model)
        .chain(file.external_files.iter().cloned())
        .collect()
}

/// The files one run reads and the files it writes, checked together before
/// any work: no output may replace an input, and no two outputs may be the
/// same file — also through another spelling of the path (`./`, `..`), a
/// symbolic link or a hard link. A refused run writes nothing.
#[derive(Debug, Clone, Default)]
pub struct FileGuard {
    inputs: Vec<PathBuf>,
    /// Folders read as a whole: nothing may be written inside them.
    folders: Vec<PathBuf>,
    /// Folders written as a whole: no other output may lie inside them.
    output_folders: Vec<PathBuf>,
    outputs: Vec<Destination>,
}

#[derive(Debug, Clone)]
struct Destination {
    path: PathBuf,
    /// How messages name it as the other side of a collision.
    name: &'static str,
    /// Whether its own name is derived from another output's (messages then
    /// say what it is).
    derived: bool,
}

/// What identifies a file: its canonical path, and its device and inode
/// when it exists.
#[derive(Debug)]
struct Identity {
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

impl Identity {
    fn of(resolved: PathBuf) -> Self {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&resolved)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Self {
            path: resolved,
            inode,
        }
    }

    fn input(path: &Path) -> Self {
        Self::of(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }

    fn output(path: &Path) -> Self {
        Self::of(resolve_destination(path).unwrap_or_else(|| path.to_path_buf()))
    }

    fn same(&self, other: &Identity) -> bool {
        self.path == other.path || (self.inode.is_some() && self.inode == other.inode)
    }
}

impl FileGuard {
    /// No files yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A file (or folder) the run reads.
    pub fn input(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.inputs.push(path.into());
        self
    }

    /// A folder the run reads as a whole (a model folder): no output may be
    /// it or lie inside it.
    pub fn input_folder(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        let path = path.into();
        self.inputs.push(path.clone());
        self.folders.push(path);
        self
    }

    /// A folder the run writes as a whole (OUT_DIR): no other output may
    /// lie inside it. It is checked as an output too (`name` in messages).
    pub fn output_folder(&mut self, path: impl Into<PathBuf>, name: &'static str) -> &mut Self {
        let path = path.into();
        self.output_folders.push(path.clone());
        self.output(path, name)
    }

    /// Files the run reads.
    pub fn inputs(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> &mut Self {
        self.inputs.extend(paths);
        self
    }

    /// A file the run writes, given by the user; `name` is how messages
    /// refer to it (`OUT`, `the --plan-out file`).
    pub fn output(&mut self, path: impl Into<PathBuf>, name: &'static str) -> &mut Self {
        self.outputs.push(Destination {
            path: path.into(),
            name,
            derived: false,
        });
        self
    }

    /// A file the run writes whose name is derived from another output's
    /// (`OUT.data`, the report's Markdown summary): messages say what it is.
    pub fn derived_output(&mut self, path: impl Into<PathBuf>, name: &'static str) -> &mut Self {
        self.outputs.push(Destination {
            path: path.into(),
            name,
            derived: true,
        });
        self
    }

    /// Refuses the first output, in the order given, that is an input or
    /// the same file as an earlier output. Reads file metadata only.
    pub fn check(&self) -> Result<(), SaveError> {
        let inputs: Vec<Identity> = self.inputs.iter().map(|p| Identity::input(p)).collect();
        let folders: Vec<PathBuf> = self
            .folders
            .iter()
            .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
            .collect();
        let mut earlier: Vec<(Identity, &Destination)> = Vec::new();
        for out in &self.outputs {
            let identity = Identity::output(&out.path);
            let role = out.derived.then_some(out.name);
            if let Some(i) = folders
                .iter()
                .position(|f| identity.path != *f && identity.path.starts_with(f))
            {
                return Err(SaveError::InsideInput {
                    path: out.path.clone(),
                    role,
                    folder: self.folders[i].clone(),
                });
            }
            let written_whole = self.output_folders.iter().find(|f| {
                let f = Identity::output(f).path;
                identity.path != f && identity.path.starts_with(&f)
            });
            if let Some(folder) = written_whole {
                return Err(SaveError::InsideOutput {
                    path: out.path.clone(),
                    role,
                    folder: folder.clone(),
                });
            }
            if let Some(i) = inputs.iter().position(|i| i.same(&identity)) {
                return Err(SaveError::OverwritesInput {
                    path: out.path.clone(),
                    role,
                    input: self.inputs[i].clone(),
                });
            }
            if let Some((_, other)) = earlier.iter().find(|(e, _)| e.same(&identity)) {
                return Err(SaveError::OverwritesOutput {
                    path: out.path.clone(),
                    role,
                    other: other.name,
                });
            }
            earlier.push((identity, out));
        }
        Ok(())
    }
}

/// Where writing `path` lands: the canonical file it names (through
/// symbolic links), or for a file that does not exist yet its canonical
/// folder joined with its name. `None` when the folder does not exist.
fn resolve_destination(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
}

/// Writes a small file atomically (temporary file in the same folder, then
/// rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), SaveError> {
    use std::io::Write;
    let err = |error| SaveError::Io {
        path: path.to_path_buf(),
        error,
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = super::staging::Staged::new_in(folder, &name).map_err(err)?;
    tmp.as_file_mut().write_all(contents).map_err(err)?;
    tmp.persist(path).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_guard_finds_collisions_through_any_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.npz");
        std::fs::write(&input, b"x").unwrap();
        let hard = dir.path().join("hard.bin");
        std::fs::hard_link(&input, &hard).unwrap();
        let soft = dir.path().join("soft.bin");
        std::os::unix::fs::symlink(&input, &soft).unwrap();
        let dotted = dir.path().join(".").join("in.npz");
        for out in [&input, &hard, &soft, &dotted] {
            let mut guard = FileGuard::new();
            guard.input(&input).output(out, "OUT");
            let err = guard.check().unwrap_err().to_string();
            assert!(err.contains("it is an input file"), "{err}");
        }
        // two outputs that do not exist yet, spelled differently
        let mut guard = FileGuard::new();
        guard
            .input(&input)
            .output(dir.path().join("a.json"), "the --plan-out file")
            .derived_output(dir.path().join(".").join("a.json"), "the report's plot");
        let err = guard.check().unwrap_err().to_string();
        assert!(
            err.ends_with("a.json (the report's plot): it is also the --plan-out file"),
            "{err}"
        );
        let mut guard = FileGuard::new();
        guard
            .input(&input)
            .output(dir.path().join("a.json"), "OUT")
            .output(dir.path().join("b.json"), "the --plan-out file");
        guard.check().unwrap();
    }
}
