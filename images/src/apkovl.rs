//! The apkovl: the tar.gz that Alpine's initramfs unpacks over the fresh tmpfs root in diskless
//! mode. Built in memory, sorted, with fixed times and owners: same entries, same bytes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use crate::Error;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// A file tree to become an apkovl; paths are relative to `/`, without a leading slash.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    entries: BTreeMap<String, Entry>,
}

impl Overlay {
    pub fn new() -> Overlay {
        Overlay::default()
    }

    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Entry {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
        }
    }

    fn put(&mut self, path: &str, kind: Kind, mode: u32) {
        let path = path
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        self.parents(&path);
        self.entries.insert(
            path,
            Entry {
                kind,
                mode,
                uid: 0,
                gid: 0,
            },
        );
    }

    /// A directory owned by root.
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.put(path, Kind::Dir, mode);
    }

    /// A file owned by root; replaces what was there.
    pub fn file(&mut self, path: &str, content: impl Into<Vec<u8>>, mode: u32) {
        self.put(path, Kind::File(content.into()), mode);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.put(path, Kind::Symlink(target.to_string()), 0o777);
    }

    /// Adds a directory tree from disk under `prefix` as it is (modes, symlinks, and owners
    /// unless `owner` overrides them), except the paths in `skip` (relative to `root`).
    /// Sockets, devices and fifos are left out.
    pub fn add_tree(
        &mut self,
        root: &Path,
        prefix: &str,
        skip: &[&str],
        owner: Option<(u64, u64)>,
    ) -> Result<(), Error> {
        struct Walk<'a> {
            root: &'a Path,
            prefix: &'a str,
            skip: &'a [&'a str],
            owner: Option<(u64, u64)>,
        }
        fn walk(overlay: &mut Overlay, w: &Walk, dir: &Path) -> Result<(), Error> {
            let (root, skip) = (w.root, w.skip);
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .map_err(Error::io("cannot read directory", dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            names.sort();
            for path in names {
                let rel = path
                    .strip_prefix(root)
                    .expect("walked below the root")
                    .to_string_lossy()
                    .into_owned();
                if skip
                    .iter()
                    .any(|s| rel == *s || rel.starts_with(&format!("{s}/")))
                {
                    continue;
                }
                let meta =
                    std::fs::symlink_metadata(&path).map_err(Error::io("cannot stat", &path))?;
                let kind = if meta.file_type().is_symlink() {
                    let target =
                        std::fs::read_link(&path).map_err(Error::io("cannot read link", &path))?;
                    Kind::Symlink(target.to_string_lossy().into_owned())
                } else if meta.is_dir() {
                    Kind::Dir
                } else if meta.is_file() {
                    Kind::File(std::fs::read(&path).map_err(Error::io("cannot read", &path))?)
                } else {
                    continue;
                };
                let is_dir = kind == Kind::Dir;
                let (uid, gid) = w
                    .owner
                    .unwrap_or((u64::from(meta.uid()), u64::from(meta.gid())));
                let at = if w.prefix.is_empty() {
                    rel
                } else {
                    format!("{}/{rel}", w.prefix.trim_end_matches('/'))
                };
                overlay.parents(&at);
                overlay.entries.insert(
                    at,
                    Entry {
                        kind,
                        mode: meta.permissions().mode() & 0o7777,
                        uid,
                        gid,
                    },
                );
                if is_dir {
                    walk(overlay, w, &path)?;
                }
            }
            Ok(())
        }
        let w = Walk {
            root,
            prefix,
            skip,
            owner,
        };
        walk(self, &w, root)
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_start_matches('/'))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// The uncompressed tar: sorted entries, mtime 0, numeric owners only.
    pub fn tar(&self) -> Result<Vec<u8>, Error> {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        let io = |e: std::io::Error| Error::Io {
            action: "cannot write the apkovl",
            path: "<memory>".into(),
            source: e,
        };
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(entry.mode);
            header.set_uid(entry.uid);
            header.set_gid(entry.gid);
            header.set_mtime(0);
            match &entry.kind {
                Kind::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    builder
                        .append_data(&mut header, format!("{path}/"), std::io::empty())
                        .map_err(io)?;
                }
                Kind::File(data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    builder
                        .append_data(&mut header, path, data.as_slice())
                        .map_err(io)?;
                }
                Kind::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target).map_err(io)?;
                }
            }
        }
        builder.into_inner().map_err(io)
    }

    /// The apkovl: the tar, gzip-compressed with no name and time in the gzip header.
    pub fn tar_gz(&self) -> Result<Vec<u8>, Error> {
        let tar = self.tar()?;
        let mut gz = flate2::GzBuilder::new().mtime(0).operating_system(3).write(
            Vec::with_capacity(tar.len() / 2),
            flate2::Compression::new(6),
        );
        let io = |e: std::io::Error| Error::Io {
            action: "cannot compress the apkovl",
            path: "<memory>".into(),
            source: e,
        };
        gz.write_all(&tar).map_err(io)?;
        gz.finish().map_err(io)
    }
}

/// Reads an apkovl back: path → entry (for inspection and tests).
pub fn read_tar_gz(bytes: &[u8]) -> Result<Overlay, std::io::Error> {
    use std::io::Read as _;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut overlay = Overlay::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let header = entry.header().clone();
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let kind = match header.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink(
                entry
                    .link_name()?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            _ => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                Kind::File(data)
            }
        };
        overlay.entries.insert(
            path,
            Entry {
                kind,
                mode: header.mode()?,
                uid: header.uid()?,
                gid: header.gid()?,
            },
        );
    }
    Ok(overlay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_entries_in_any_order_give_the_same_bytes_and_read_back() {
        let mut a = Overlay::new();
        a.file("etc/hostname", "r1\n", 0o644);
        a.file("var/lib/towalink/identity/wg_private_key", "k\n", 0o600);
        a.symlink(
            "etc/runlevels/default/towalink-node",
            "/etc/init.d/towalink-node",
        );
        let mut b = Overlay::new();
        b.symlink(
            "etc/runlevels/default/towalink-node",
            "/etc/init.d/towalink-node",
        );
        b.file("var/lib/towalink/identity/wg_private_key", "k\n", 0o600);
        b.file("etc/hostname", "r1\n", 0o644);
        let bytes = a.tar_gz().unwrap();
        assert_eq!(bytes, b.tar_gz().unwrap());
        let back = read_tar_gz(&bytes).unwrap();
        assert_eq!(back.get("etc").unwrap().kind, Kind::Dir);
        let key = back
            .get("var/lib/towalink/identity/wg_private_key")
            .unwrap();
        assert_eq!(key.mode, 0o600);
        assert_eq!((key.uid, key.gid), (0, 0));
        assert_eq!(
            back.get("etc/runlevels/default/towalink-node")
                .unwrap()
                .kind,
            Kind::Symlink("/etc/init.d/towalink-node".into())
        );
    }
}
