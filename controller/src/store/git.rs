//! The configuration directory's git history.
//!
//! Git records the operator's inputs and the index of versions, nothing else, by construction:
//! a commit stages an explicit list of paths ([`recorded_paths`]: the level files, the
//! allocations and `effective/index.toml` / `activation.toml`), never `git add -A`, so a missing
//! or edited `.gitignore` cannot let a secret in. Each path is checked before anything is
//! written ([`check_recorded_paths`]): key material, owner-only (0600) files and images are
//! refused with one line naming the path.
//!
//! A `tlm` killed while git runs may leave git's lock files (`.git/index.lock`, `HEAD.lock`,
//! `refs/**.lock`). Git refuses to run while they exist; since `tlm` runs git only while it
//! holds the directory's lock, a lock file with no git process alive in the repository is
//! stale and is removed, with a warning naming it ([`recover_stale_locks`]).

use std::path::{Path, PathBuf};

use crate::Error;
use towalink_system::durable::IoError;
use towalink_system::program as external;

/// Files outside the level directories that git records.
const RECORDED_FILES: [&str; 4] = [
    ".gitignore",
    "generated/config.toml",
    "effective/index.toml",
    "effective/activation.toml",
];

/// Git's lock files directly in `.git/`.
const GIT_LOCKS: [&str; 7] = [
    "index.lock",
    "HEAD.lock",
    "ORIG_HEAD.lock",
    "AUTO_MERGE.lock",
    "config.lock",
    "packed-refs.lock",
    "shallow.lock",
];

/// How much of a file's start is searched for key material and image signatures.
const SNIFF_BYTES: usize = 64 * 1024;

/// Why a path must not enter git, if it must not. Pure: decided from the path (relative to
/// the configuration directory), its mode and the start of its content.
pub fn secret_reason(path: &str, mode: u32, head: &[u8]) -> Option<&'static str> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if path == "generated/secrets.toml" || name == "secrets.toml" {
        return Some("holds the nodes' private keys");
    }
    if path.starts_with("certs/")
        || name.ends_with(".key")
        || name.ends_with(".pem")
        || name == "key.pem"
    {
        return Some("is key material");
    }
    const IMAGE_SUFFIXES: [&str; 8] = [
        ".img", ".img.zst", ".img.gz", ".img.xz", ".iso", ".qcow2", ".raw", ".zst",
    ];
    if IMAGE_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return Some("is a disk image (images carry the node's private key)");
    }
    const MAGIC: [&[u8]; 3] = [
        &[0x28, 0xb5, 0x2f, 0xfd],             // zstd
        &[0x1f, 0x8b],                         // gzip
        &[0xfd, b'7', b'z', b'X', b'Z', 0x00], // xz
    ];
    if MAGIC.iter().any(|m| head.starts_with(m)) {
        return Some("is a compressed file or image");
    }
    let contains = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    // A key's value, not a mention of its name (a template comment may name it).
    if contains(b"PRIVATE KEY-----")
        || contains(b"wg_private_key = \"")
        || contains(b"wg_private_key=\"")
    {
        return Some("holds a private key");
    }
    if mode & 0o077 == 0 {
        return Some("is readable by its owner only (mode 0600): tlm keeps such files out of git");
    }
    None
}

/// The regular files of one directory whose names do not start with a dot, as paths
/// relative to the root.
fn level_files(root: &Path, relative: &str, into: &mut Vec<String>) -> Result<(), Error> {
    let dir = root.join(relative);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IoError::new("cannot read directory", &dir, e).into()),
    };
    for entry in entries {
        let entry = entry.map_err(|e| IoError::new("cannot read directory", &dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let file_type = entry
            .file_type()
            .map_err(|e| IoError::new("cannot stat", &entry.path(), e))?;
        let path = if relative.is_empty() {
            name.clone()
        } else {
            format!("{relative}/{name}")
        };
        if file_type.is_file() {
            into.push(path);
        } else if file_type.is_dir() {
            let is_level = if relative.is_empty() {
                name.starts_with("site_")
            } else {
                !relative.contains('/') && name.starts_with("node_")
            };
            if is_level {
                level_files(root, &path, into)?;
            }
        }
    }
    Ok(())
}

/// The existing files git records: the regular files of the global, site and node levels
/// (what rendering reads), the allocations, the index of versions and the activations.
/// Sorted.
pub fn recorded_paths(root: &Path) -> Result<Vec<String>, Error> {
    let mut paths = Vec::new();
    level_files(root, "", &mut paths)?;
    for file in RECORDED_FILES {
        if root.join(file).is_file() {
            paths.push(file.to_string());
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// Refuses, naming the path, when a file git would record is a secret or an image.
pub fn check_recorded_paths(root: &Path) -> Result<Vec<String>, Error> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let paths = recorded_paths(root)?;
    for path in &paths {
        let full = root.join(path);
        let mut file =
            std::fs::File::open(&full).map_err(|e| IoError::new("cannot read", &full, e))?;
        let mode = file
            .metadata()
            .map_err(|e| IoError::new("cannot stat", &full, e))?
            .permissions()
            .mode();
        let mut head = Vec::with_capacity(4096);
        (&mut file)
            .take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| IoError::new("cannot read", &full, e))?;
        if let Some(reason) = secret_reason(path, mode, &head) {
            return Err(Error::SecretForGit {
                path: path.clone(),
                reason,
            });
        }
    }
    Ok(paths)
}

/// Git's lock files present in the repository at `root`.
fn lock_files(root: &Path) -> Vec<PathBuf> {
    let git = root.join(".git");
    let mut found: Vec<PathBuf> = GIT_LOCKS
        .iter()
        .map(|l| git.join(l))
        .filter(|p| p.exists())
        .collect();
    let mut stack = vec![git.join("refs")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "lock") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// A git process (other than ours) working in the repository at `root`, if one is alive.
fn live_git_process(root: &Path) -> Option<u32> {
    let root = std::fs::canonicalize(root).ok()?;
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let is_git = std::fs::read_to_string(entry.path().join("comm"))
            .is_ok_and(|c| c.trim() == "git" || c.trim().starts_with("git-"));
        if !is_git {
            continue;
        }
        let in_repository =
            std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&root));
        if in_repository {
            return Some(pid);
        }
    }
    None
}

/// Removes git lock files left by a killed `tlm` (or git), naming each in a warning. A lock
/// held by a live git process in the repository is an error naming the file and process.
/// Call with the directory's lock held.
pub fn recover_stale_locks(root: &Path) -> Result<(), Error> {
    let locks = lock_files(root);
    if locks.is_empty() {
        return Ok(());
    }
    if let Some(pid) = live_git_process(root) {
        return Err(Error::GitBusy {
            lock: locks[0].clone(),
            pid,
        });
    }
    for lock in locks {
        tracing::warn!(
            "removing `{}`: a stale git lock (no git runs in this directory; an earlier tlm or git was killed)",
            lock.display()
        );
        match std::fs::remove_file(&lock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("cannot remove", &lock, e).into()),
        }
    }
    Ok(())
}

/// Stages the recorded paths (and the removal of recorded files that are gone) and commits
/// when something is staged. Git runs with `LC_ALL=C`; when the operator has no git
/// identity, the commit is made as `tlm`. Returns whether a commit was made.
pub fn commit(dir: &Path, message: &str) -> Result<bool, Error> {
    let c = [("LC_ALL", "C")];
    let mut paths = check_recorded_paths(dir)?;
    recover_stale_locks(dir)?;
    // Files git tracks that are gone: their removal is recorded too.
    let tracked = external::run("git", &["ls-files", "-z"], dir, &c)?;
    for path in tracked.stdout.split(|b| *b == 0) {
        let Ok(path) = std::str::from_utf8(path) else {
            continue;
        };
        if !path.is_empty() && !dir.join(path).exists() {
            paths.push(path.to_string());
        }
    }
    let mut args = vec!["--literal-pathspecs", "add", "-A", "--"];
    args.extend(paths.iter().map(String::as_str));
    external::run("git", &args, dir, &c)?;
    let nothing_staged = std::process::Command::new("git")
        .args(["diff", "--cached", "--quiet"])
        .current_dir(dir)
        .env("LC_ALL", "C")
        .status()
        .map_err(|e| IoError::new("cannot run git in", dir, e))?
        .success();
    if nothing_staged {
        return Ok(false);
    }
    let args = ["commit", "-q", "--no-verify", "-m", message];
    let first = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| IoError::new("cannot run git in", dir, e))?;
    if first.status.success() {
        return Ok(true);
    }
    let said = String::from_utf8_lossy(&first.stderr);
    let no_identity = said.contains("Please tell me who you are")
        || said.contains("identity unknown")
        || said.contains("unable to auto-detect");
    if !no_identity {
        external::run("git", &args, dir, &c)?;
        return Ok(true);
    }
    external::run(
        "git",
        &args,
        dir,
        &[
            ("LC_ALL", "C"),
            ("GIT_AUTHOR_NAME", "tlm"),
            ("GIT_AUTHOR_EMAIL", "tlm@localhost"),
            ("GIT_COMMITTER_NAME", "tlm"),
            ("GIT_COMMITTER_EMAIL", "tlm@localhost"),
        ],
    )?;
    Ok(true)
}

/// Undoes what a failed commit staged, so the next commit starts from the last one. Best
/// effort: the next commit stages the same paths again anyway.
pub fn unstage(dir: &Path) {
    if let Err(e) = external::run("git", &["reset", "-q"], dir, &[("LC_ALL", "C")]) {
        tracing::debug!("git reset after a failed commit: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_images_are_recognized() {
        assert!(secret_reason("generated/secrets.toml", 0o644, b"").is_some());
        assert!(secret_reason("site_a/secrets.toml", 0o644, b"").is_some());
        assert!(secret_reason("certs/signing.key", 0o644, b"").is_some());
        assert!(secret_reason("management.key", 0o644, b"").is_some());
        assert!(secret_reason("images/x.img.zst", 0o644, b"").is_some());
        assert!(secret_reason("x.bin", 0o644, &[0x28, 0xb5, 0x2f, 0xfd, 1]).is_some());
        assert!(
            secret_reason("notes.txt", 0o644, b"-----BEGIN PRIVATE KEY-----\nMC4CAQ\n").is_some()
        );
        assert!(secret_reason("copy.toml", 0o644, b"[[node]]\nwg_private_key = \"x\"").is_some());
        assert!(secret_reason("site_a/private.conf", 0o600, b"x").is_some());
        assert!(secret_reason("config.toml", 0o644, b"asn = 1\n").is_none());
        assert!(secret_reason("bird.conf.jinja", 0o664, b"router id").is_none());
    }
}
