//! Durable file writes: the one place that replaces files on disk.
//!
//! A file is replaced by writing a temporary file in the same directory, fsyncing it, renaming
//! it over the target and fsyncing the directory, so a reader (or the next run after a power
//! cut) sees either the old or the new content, never a mix. Secret files are created with mode
//! 0600 before their first byte is written.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// A secret value (private key, token). Prints as `[redacted]`; its text is reachable only
/// through [`Secret::expose`], which callers use to write it to a 0600 file or derive a key.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An I/O failure on a named path.
#[derive(Debug, thiserror::Error)]
#[error("{action} `{path}`: {source}")]
pub struct IoError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    pub fn new(action: &'static str, path: &Path, source: std::io::Error) -> IoError {
        IoError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Replaces `path` atomically with `content` and the given mode (0600 for secrets).
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), IoError> {
    write_file(path, content, mode, true)
}

/// Writes `path` (replacing it atomically) without syncing; the caller syncs the filesystem
/// once for many files with [`sync_filesystem`] before publishing them.
pub fn write_unsynced(path: &Path, content: &[u8], mode: u32) -> Result<(), IoError> {
    write_file(path, content, mode, false)
}

/// Creates a new file (in a staging area no reader sees) without the temp-and-rename dance and
/// without syncing; the caller syncs the filesystem once before publishing.
pub fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), IoError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| IoError::new("cannot create", path, e))?;
    // Only `tlm` uses this, with umask 022 (its main sets it), so the mode given to open() is
    // the mode.
    file.write_all(content)
        .map_err(|e| IoError::new("cannot write", path, e))
}

fn write_file(path: &Path, content: &[u8], mode: u32, sync: bool) -> Result<(), IoError> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .map_err(|e| IoError::new("cannot create", &temp, e))?;
        // The mode given to open() is masked by the umask; set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| IoError::new("cannot set mode of", &temp, e))?;
        file.write_all(content)
            .map_err(|e| IoError::new("cannot write", &temp, e))?;
        if sync {
            file.sync_all()
                .map_err(|e| IoError::new("cannot sync", &temp, e))?;
        }
        std::fs::rename(&temp, path).map_err(|e| IoError::new("cannot replace", path, e))?;
        if sync {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a directory so renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IoError::new("cannot sync directory", dir, e))
}

/// Flushes every dirty file of the filesystem holding `path` (one `syncfs(2)`): cheaper than
/// one fsync per file when a commit writes thousands of files.
pub fn sync_filesystem(path: &Path) -> Result<(), IoError> {
    let dir = std::fs::File::open(path).map_err(|e| IoError::new("cannot open", path, e))?;
    rustix::fs::syncfs(&dir).map_err(|e| IoError::new("cannot sync filesystem of", path, e.into()))
}

/// Creates a directory and its parents (mode 0755 subject to umask).
pub fn create_dir_all(path: &Path) -> Result<(), IoError> {
    std::fs::create_dir_all(path).map_err(|e| IoError::new("cannot create directory", path, e))
}

/// Removes a directory tree if it exists.
pub fn remove_dir_all(path: &Path) -> Result<(), IoError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoError::new("cannot remove", path, e)),
    }
}

/// Renames a file or directory.
pub fn rename(from: &Path, to: &Path) -> Result<(), IoError> {
    std::fs::rename(from, to).map_err(|e| IoError::new("cannot rename", from, e))
}

/// Reads a file to a string, naming the path on failure.
pub fn read_to_string(path: &Path) -> Result<String, IoError> {
    std::fs::read_to_string(path).map_err(|e| IoError::new("cannot read", path, e))
}

/// Reads a file if it exists.
pub fn read_optional(path: &Path) -> Result<Option<String>, IoError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IoError::new("cannot read", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }
}
