//! Alpine release assets: a local directory, or the official release file fetched from a mirror,
//! verified against the release's published sha256, cached, and unpacked.
//!
//! Cache layout (default `~/.cache/towalink/alpine`): `<file>` (the verified download) and
//! `<file without .tar.gz>/` (its unpacked contents, complete once `.towalink-unpacked` holds
//! the file's sha256). Downloads go to a temporary file first: a failed or corrupt download
//! leaves nothing behind.

use std::io::{IsTerminal as _, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::profile::Board;
use crate::Error;

/// Where the Alpine files come from.
#[derive(Debug, Clone)]
pub enum AlpineSource {
    /// A directory laid out as the release file unpacks (`boot/vmlinuz-virt`, `apks/`, ...).
    Dir(PathBuf),
    /// The official release: `version` is `3.23` (the newest point release, from the
    /// mirror's `latest-releases.yaml`) or `3.23.2`.
    Release {
        version: String,
        mirror: String,
        cache: PathBuf,
    },
}

/// The default mirror.
pub const DEFAULT_MIRROR: &str = "https://dl-cdn.alpinelinux.org/alpine";

/// Release files ready to use: a directory and the Alpine version they are.
#[derive(Debug, Clone)]
pub struct ReleaseFiles {
    pub root: PathBuf,
    pub version: String,
    /// Where they came from (a URL with its sha256, or the directory).
    pub origin: String,
    /// The mirror's package repository for this release (`<mirror>/v3.23/main`): the node
    /// installs its packages from there at boot when the medium carries no `apks/`.
    pub package_repo: Option<String>,
}

/// Finds (fetching if needed) the release files `board` needs.
pub fn resolve(source: &AlpineSource, board: &Board) -> Result<ReleaseFiles, Error> {
    let files = match source {
        AlpineSource::Dir(dir) => {
            let version = std::fs::read_to_string(dir.join(".alpine-release"))
                .ok()
                .and_then(|t| release_version(&t))
                .unwrap_or_else(|| "local".to_string());
            ReleaseFiles {
                root: dir.clone(),
                version,
                origin: dir.display().to_string(),
                package_repo: None,
            }
        }
        AlpineSource::Release {
            version,
            mirror,
            cache,
        } => fetch_release(version, mirror, cache, board)?,
    };
    for f in &board.profile.boot_files {
        if !f.optional && !files.root.join(&f.path).exists() {
            return Err(Error::MissingAsset {
                dir: files.root.clone(),
                file: f.path.clone(),
                board: board.profile.name.clone(),
            });
        }
    }
    Ok(files)
}

/// `alpine-rpi-3.23.2 251203` (an `.alpine-release` file) → `3.23.2`.
fn release_version(text: &str) -> Option<String> {
    let first = text.split_whitespace().next()?;
    let v = first.rsplit('-').next()?;
    v.chars()
        .next()
        .filter(char::is_ascii_digit)
        .map(|_| v.to_string())
}

/// One entry of a mirror's `latest-releases.yaml`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishedFile {
    pub file: String,
    pub version: String,
    pub sha256: String,
}

/// Reads the entries of `latest-releases.yaml` (a list of flat maps; only the keys
/// `file`, `version` and `sha256` matter).
pub fn parse_latest_releases(text: &str) -> Vec<PublishedFile> {
    let mut out = Vec::new();
    let mut current: Option<PublishedFile> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let item = trimmed.strip_prefix("- ");
        if item.is_some() || trimmed == "-" {
            if let Some(done) = current.take() {
                out.push(done);
            }
            current = Some(PublishedFile::default());
        }
        let Some(entry) = current.as_mut() else {
            continue;
        };
        let kv = item.unwrap_or(trimmed);
        if let Some((k, v)) = kv.split_once(':') {
            let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
            match k.trim() {
                "file" => entry.file = v,
                "version" => entry.version = v,
                "sha256" => entry.sha256 = v,
                _ => {}
            }
        }
    }
    out.extend(current);
    out
}

/// The file a board needs for `version` from a published list: its name is the profile's
/// pattern with `{arch}` filled in and any version.
pub fn pick_published(
    published: &[PublishedFile],
    pattern: &str,
    arch: &str,
) -> Option<PublishedFile> {
    let pattern = pattern.replace("{arch}", arch);
    let (prefix, suffix) = pattern.split_once("{version}")?;
    published
        .iter()
        .find(|p| p.file.starts_with(prefix) && p.file.ends_with(suffix) && !p.sha256.is_empty())
        .cloned()
}

fn fetch_release(
    version: &str,
    mirror: &str,
    cache: &Path,
    board: &Board,
) -> Result<ReleaseFiles, Error> {
    let arch = &board.profile.alpine_arch;
    let release_err = |message: String| Error::Release {
        version: version.to_string(),
        arch: arch.clone(),
        message,
    };
    let parts: Vec<&str> = version.split('.').collect();
    if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.parse::<u32>().is_err()) {
        return Err(release_err(
            "the version is `X.Y` (newest point release) or `X.Y.Z`".into(),
        ));
    }
    let branch = format!("v{}.{}", parts[0], parts[1]);
    let base = format!("{}/{branch}/releases/{arch}", mirror.trim_end_matches('/'));
    let published = if parts.len() == 2 {
        let url = format!("{base}/latest-releases.yaml");
        let text = String::from_utf8_lossy(&fetch_bytes(&url)?).into_owned();
        pick_published(
            &parse_latest_releases(&text),
            &board.profile.release.file,
            arch,
        )
        .ok_or_else(|| release_err(format!("{url} lists no `{}`", board.profile.release.file)))?
    } else {
        let file = board
            .profile
            .release
            .file
            .replace("{arch}", arch)
            .replace("{version}", version);
        let url = format!("{base}/{file}.sha256");
        let text = String::from_utf8_lossy(&fetch_bytes(&url)?).into_owned();
        let sha256 = text
            .split_whitespace()
            .next()
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| release_err(format!("{url} holds no sha256")))?
            .to_lowercase();
        PublishedFile {
            file,
            version: version.to_string(),
            sha256,
        }
    };
    if published.file.contains('/') || published.file.starts_with('.') {
        return Err(release_err(format!(
            "refusing the published file name `{}`",
            published.file
        )));
    }
    std::fs::create_dir_all(cache).map_err(Error::io("cannot create the asset cache", cache))?;
    let url = format!("{base}/{}", published.file);
    let archive = cache.join(&published.file);
    let cached_ok = archive.exists() && sha256_file(&archive)? == published.sha256;
    if cached_ok {
        tracing::info!(file = %published.file, "using the cached release file");
    } else {
        download_verified(&url, &published.file, &published.sha256, &archive)?;
    }
    let stem = published
        .file
        .strip_suffix(".tar.gz")
        .ok_or_else(|| release_err(format!("`{}` is not a .tar.gz", published.file)))?;
    let root = cache.join(stem);
    unpack_once(&archive, &published.sha256, &root)?;
    let version = if published.version.is_empty() {
        version.to_string()
    } else {
        published.version
    };
    Ok(ReleaseFiles {
        root,
        version,
        origin: format!("{url} (sha256 {})", published.sha256),
        package_repo: Some(format!("{}/{branch}/main", mirror.trim_end_matches('/'))),
    })
}

/// `http://`, `https://` or `file://`.
fn open_url(url: &str) -> Result<(Box<dyn Read + Send>, Option<u64>), Error> {
    let fetch_err = |message: String| Error::Fetch {
        url: url.to_string(),
        message,
    };
    if let Some(path) = url.strip_prefix("file://") {
        let file = std::fs::File::open(path).map_err(|e| fetch_err(e.to_string()))?;
        let len = file.metadata().ok().map(|m| m.len());
        return Ok((Box::new(file), len));
    }
    let response = ureq::get(url)
        .timeout(std::time::Duration::from_secs(300))
        .call()
        .map_err(|e| match e {
            ureq::Error::Status(code, _) => fetch_err(format!("HTTP {code}")),
            other => fetch_err(other.to_string()),
        })?;
    let len = response
        .header("content-length")
        .and_then(|l| l.parse().ok());
    Ok((Box::new(response.into_reader()), len))
}

fn fetch_bytes(url: &str) -> Result<Vec<u8>, Error> {
    let (mut reader, _) = open_url(url)?;
    let mut out = Vec::new();
    reader
        .by_ref()
        .take(1 << 20)
        .read_to_end(&mut out)
        .map_err(|e| Error::Fetch {
            url: url.to_string(),
            message: e.to_string(),
        })?;
    Ok(out)
}

/// Fetches `url` into memory, refusing more than `limit` bytes.
pub(crate) fn fetch_limited(url: &str, limit: u64) -> Result<Vec<u8>, Error> {
    let (reader, _) = open_url(url)?;
    let mut out = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::Fetch {
            url: url.to_string(),
            message: e.to_string(),
        })?;
    if out.len() as u64 > limit {
        return Err(Error::Fetch {
            url: url.to_string(),
            message: format!("larger than the {limit} bytes expected"),
        });
    }
    Ok(out)
}

/// Downloads `url` to `dest` through a temporary file, hashing as it goes; keeps it only when
/// the hash is `expected`.
fn download_verified(url: &str, file: &str, expected: &str, dest: &Path) -> Result<(), Error> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let (mut reader, len) = open_url(url)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(Error::io("cannot create a temporary file in", dir))?;
    let mut hasher = Sha256::new();
    let mut progress = Progress::new(file, len);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| Error::Fetch {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])
            .map_err(Error::io("cannot write", tmp.path()))?;
        progress.advance(n as u64);
    }
    progress.finish();
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(Error::Checksum {
            url: url.to_string(),
            file: file.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    tmp.as_file()
        .sync_all()
        .map_err(Error::io("cannot sync", tmp.path()))?;
    tmp.persist(dest)
        .map_err(|e| Error::io("cannot store", dest)(e.error))?;
    Ok(())
}

/// Unpacks a verified `.tar.gz` into `root` unless a complete unpacking of the same file is
/// there already (its marker names the sha256).
fn unpack_once(archive: &Path, sha256: &str, root: &Path) -> Result<(), Error> {
    let marker = root.join(".towalink-unpacked");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(sha256) {
        return Ok(());
    }
    let parent = root.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)
        .map_err(Error::io("cannot create a temporary directory in", parent))?;
    let file = std::fs::File::open(archive).map_err(Error::io("cannot open", archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    tar.set_preserve_permissions(false);
    tar.unpack(tmp.path())
        .map_err(Error::io("cannot unpack", archive))?;
    std::fs::write(tmp.path().join(".towalink-unpacked"), sha256)
        .map_err(Error::io("cannot write", tmp.path()))?;
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(Error::io("cannot remove", root))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, root).map_err(Error::io("cannot rename into", root))?;
    Ok(())
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut file = std::fs::File::open(path).map_err(Error::io("cannot open", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(Error::io("cannot read", path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
pub(crate) struct Progress {
    name: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
}

impl Progress {
    pub(crate) fn new(name: &str, total: Option<u64>) -> Progress {
        Progress {
            name: name.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            last_draw: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub(crate) fn advance(&mut self, n: u64) {
        self.done += n;
        let due = !matches!(self.last_draw, Some(t) if t.elapsed().as_millis() < 100);
        if self.tty && due {
            self.last_draw = Some(Instant::now());
            eprint!("\r{}", self.line());
        }
    }

    fn line(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        let rate = mib(self.done) / self.started.elapsed().as_secs_f64().max(0.001);
        match self.total {
            Some(t) if t > 0 => {
                let frac = self.done as f64 / t as f64;
                let filled = (frac * 30.0).round().min(30.0) as usize;
                format!(
                    "{} [{}{}] {:.1}/{:.1} MiB {:3.0}% {:.1} MiB/s ",
                    self.name,
                    "#".repeat(filled),
                    "-".repeat(30 - filled),
                    mib(self.done),
                    mib(t),
                    frac * 100.0,
                    rate
                )
            }
            _ => format!("{} {:.1} MiB {:.1} MiB/s ", self.name, mib(self.done), rate),
        }
    }

    pub(crate) fn finish(&self) {
        if self.tty {
            eprintln!("\r{}", self.line());
        }
        tracing::info!(file = %self.name, bytes = self.done, "downloaded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "---\n-\n  title: \"Netboot\"\n  branch: v3.23\n  arch: x86_64\n  version: 3.23.2\n  flavor: alpine-netboot\n  file: alpine-netboot-3.23.2-x86_64.tar.gz\n  iso: alpine-netboot-3.23.2-x86_64.tar.gz\n  date: 2026-10-20\n  size: 123\n  sha256: aaaa\n-\n  title: \"Mini root filesystem\"\n  version: 3.23.2\n  file: alpine-minirootfs-3.23.2-x86_64.tar.gz\n  sha256: bbbb\n";

    #[test]
    fn latest_releases_yaml_gives_the_board_file_and_checksum() {
        let published = parse_latest_releases(YAML);
        assert_eq!(published.len(), 2);
        let pick = pick_published(
            &published,
            "alpine-netboot-{version}-{arch}.tar.gz",
            "x86_64",
        )
        .unwrap();
        assert_eq!(pick.file, "alpine-netboot-3.23.2-x86_64.tar.gz");
        assert_eq!(pick.version, "3.23.2");
        assert_eq!(pick.sha256, "aaaa");
        assert!(
            pick_published(&published, "alpine-rpi-{version}-{arch}.tar.gz", "aarch64").is_none()
        );
    }

    #[test]
    fn release_version_from_the_alpine_release_file() {
        assert_eq!(
            release_version("alpine-rpi-3.23.2 251203\n").as_deref(),
            Some("3.23.2")
        );
        assert_eq!(release_version("garbage"), None);
    }
}
