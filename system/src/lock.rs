//! The exclusive lock of a directory: `flock(2)` on a lock file, held while the value lives
//! and released by the kernel when the process dies, so a killed process never leaves it held.

use std::fs::File;
use std::path::Path;

use crate::durable::IoError;

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Takes the exclusive lock on `path` (created if missing), blocking while another process
/// holds it.
pub fn lock_exclusive(path: &Path) -> Result<FileLock, IoError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| IoError::new("cannot open", path, e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| IoError::new("cannot lock", path, e.into()))?;
    Ok(FileLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        let first = lock_exclusive(&path).unwrap();
        let other = File::open(&path).unwrap();
        let busy = rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive);
        assert!(busy.is_err(), "the lock must be held");
        drop(first);
        rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .expect("free after the holder dropped it");
    }
}
