//! Temporary files that become outputs, tracked so that an interrupted run
//! (SIGINT, SIGTERM, SIGHUP) can remove them before exiting.
//!
//! Every output is written to a temporary file in its destination folder and
//! renamed at the end. The file is registered while it exists; the CLI's
//! signal handler calls [`remove_staged_files`], so an interruption leaves
//! neither a partial output nor a stray temporary file. An output already
//! renamed is complete and stays.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary file in the destination's folder, registered for cleanup.
pub struct Staged {
    file: Option<tempfile::NamedTempFile>,
    path: PathBuf,
}

impl Staged {
    /// Creates `.NAME.XXXXXX.tmp` in `folder` (same filesystem as the
    /// destination, so the final rename is atomic).
    pub fn new_in(folder: &Path, name: &str) -> io::Result<Self> {
        let file = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(folder)?;
        let path = file.path().to_path_buf();
        STAGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Ok(Self {
            file: Some(file),
            path,
        })
    }

    /// The open file.
    pub fn as_file(&self) -> &File {
        self.file
            .as_ref()
            .expect("present until persisted")
            .as_file()
    }

    /// The open file, for writing.
    pub fn as_file_mut(&mut self) -> &mut File {
        self.file
            .as_mut()
            .expect("present until persisted")
            .as_file_mut()
    }

    /// Makes the file an ordinary readable one (temporary files are created
    /// 0600) and renames it to `destination`.
    pub fn persist(mut self, destination: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let file = self.file.take().expect("present until persisted");
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.persist(destination).map_err(|e| e.error)?;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Dropping the NamedTempFile (if not persisted) deletes it; then the
        // path is no longer ours to clean up.
        self.file.take();
        STAGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != self.path);
    }
}

/// Removes every registered temporary file (for signal handlers; never
/// blocks on a poisoned lock).
pub fn remove_staged_files() {
    let staged = match STAGED.try_lock() {
        Ok(list) => list.clone(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().clone(),
        Err(std::sync::TryLockError::WouldBlock) => {
            // Another thread holds the lock for a moment: wait for it.
            STAGED.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    };
    for path in staged {
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(path);
        } else {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A temporary folder beside a destination folder, registered for cleanup
/// like [`Staged`] files: filled, then renamed to the destination, so the
/// destination appears complete or not at all.
pub struct StagedDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl StagedDir {
    /// Creates `.NAME.XXXXXX.tmp/` in the folder that will hold `destination`.
    pub fn beside(destination: &Path) -> io::Result<Self> {
        let parent = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = destination
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a folder path"))?
            .to_string_lossy()
            .into_owned();
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempdir_in(parent)?;
        let path = dir.path().to_path_buf();
        STAGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Ok(Self {
            dir: Some(dir),
            path,
        })
    }

    /// The temporary folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the folder an ordinary readable one (temporary folders are
    /// created 0700) and renames it to `destination` (which must not exist,
    /// or be an empty folder).
    pub fn persist(mut self, destination: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.take().expect("present until persisted");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let kept = dir.keep();
        if let Err(e) = std::fs::rename(&kept, destination) {
            let _ = std::fs::remove_dir_all(&kept);
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        // Dropping the TempDir (if not persisted) deletes it.
        self.dir.take();
        STAGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cleanup_removes_open_staged_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut open = Staged::new_in(dir.path(), "a.onnx").unwrap();
        open.as_file_mut().write_all(b"partial").unwrap();
        let done = Staged::new_in(dir.path(), "b.onnx").unwrap();
        done.persist(&dir.path().join("b.onnx")).unwrap();
        remove_staged_files();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["b.onnx"]);
        drop(open);
    }
}
