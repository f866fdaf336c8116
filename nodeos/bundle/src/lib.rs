//! The signed configuration bundle: what a Towalink controller sends and a node accepts.
//!
//! A bundle is one file per node version, `<site>-<node>-v<N>.tar.zst`: a zstd-compressed tar
//! archive holding, in this order,
//!
//! - `manifest.toml`: node id, version, parent version, creation time, the services and, per
//!   file, its path in the bundle, its target path on the node, mode, sha256 and service;
//! - `manifest.sig`: the base64 ed25519 signature of the exact bytes of `manifest.toml`;
//! - `files/<path>`: the files, sorted by path.
//!
//! Everything here is pure: bytes in, bytes out. The same input gives byte-identical output
//! (fixed tar headers, sorted entries, deterministic zstd and ed25519).
//!
//! Only [`verify`] makes a [`VerifiedBundle`], so code that stages files on a node can only take
//! a bundle whose signature, node id and hashes have been checked.
//!
//! Verification order (what an unsigned or forged bundle can cost a node): the archive is read
//! as a stream, never decompressed in full first. The manifest and its signature must be the
//! first two entries; at most [`MAX_MANIFEST_BYTES`] plus a few tar blocks are decompressed
//! before the signature and the node id are checked. Only then is the payload read, each file
//! only if the signed manifest lists it, and never more bytes than the manifest declares (its
//! per-file `size`, when present) or [`MAX_UNCOMPRESSED_BYTES`] in all. The zstd window is
//! capped at [`MAX_WINDOW_LOG`], so a frame cannot make the decoder allocate a large buffer.

pub mod args;
pub mod contract;
pub mod identity;
pub mod messages;
pub mod orders;
pub mod pairing;
pub mod printable;
pub mod recovery;
pub mod ssh;
#[doc(hidden)]
pub mod test_support;
pub mod wire;

use std::collections::BTreeMap;
use std::io::Read;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier as _};
pub use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the bundle format this crate writes and accepts.
pub const FORMAT: u32 = 1;
/// Name of the manifest inside the archive.
pub const MANIFEST_NAME: &str = "manifest.toml";
/// Name of the manifest signature inside the archive.
pub const SIGNATURE_NAME: &str = "manifest.sig";
/// Directory of the payload files inside the archive.
pub const FILES_PREFIX: &str = "files/";
/// Largest uncompressed archive a node accepts (guards against decompression bombs).
pub const MAX_UNCOMPRESSED_BYTES: u64 = 256 * 1024 * 1024;
/// Largest `manifest.toml` (about 5,000 files' entries).
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// Largest `manifest.sig` (base64 of 64 bytes is 88; whitespace allowed).
pub const MAX_SIGNATURE_BYTES: u64 = 1024;
/// Uncompressed bytes read before the signature is checked: the manifest, its signature and
/// their tar headers (and GNU long-name blocks) fit.
pub const UNSIGNED_READ_LIMIT: u64 = MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + 16 * 1024;
/// Largest zstd window a node accepts (8 MiB; bundles are written with level 1, whose window
/// is at most 512 KiB), so a crafted frame cannot make the decoder allocate more.
pub const MAX_WINDOW_LOG: u32 = 23;
/// zstd level used for bundles. Level 1: on a 1,000-node mesh's 1.4 MB versions it made
/// bundles 5 % smaller than level 3 and compressed a third faster (configuration text is
/// repetitive; the faster level's matches suffice).
const ZSTD_LEVEL: i32 = 1;

/// Why a bundle could not be built or was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not a valid zstd-compressed tar archive: {0}")]
    Archive(String),
    #[error("bundle is larger than {MAX_UNCOMPRESSED_BYTES} bytes uncompressed")]
    TooLarge,
    #[error(
        "bundle holds more than {limit} bytes before {stage}: refused without reading further"
    )]
    OverBudget { limit: u64, stage: &'static str },
    #[error("bundle layout: {0}")]
    Layout(String),
    #[error("`{name}` is {size} bytes; at most {limit}")]
    EntryTooLarge { name: String, size: u64, limit: u64 },
    #[error("file `{path}`: {found} bytes, the manifest declares {declared}")]
    SizeMismatch {
        path: String,
        declared: u64,
        found: u64,
    },
    #[error("bundle has no `{0}`")]
    Missing(&'static str),
    #[error("bundle entry `{0}` is not allowed (only regular files under files/, manifest.toml and manifest.sig)")]
    UnexpectedEntry(String),
    #[error("bundle entry `{0}` appears twice")]
    DuplicateEntry(String),
    #[error("manifest.toml is invalid: {0}")]
    Manifest(String),
    #[error("manifest.sig is not a base64 ed25519 signature")]
    SignatureFormat,
    #[error("signature does not verify against the controller key this node trusts")]
    BadSignature,
    #[error("bundle is for node id {found}, this node is {expected}")]
    WrongNode { expected: u32, found: u32 },
    #[error("bundle format {0} is not supported (this node understands format {FORMAT})")]
    Format(u32),
    #[error("file `{path}`: sha256 mismatch (manifest {expected}, content {found})")]
    HashMismatch {
        path: String,
        expected: String,
        found: String,
    },
    #[error("file `{0}` is listed in the manifest but missing from the bundle")]
    MissingFile(String),
    #[error("file `{0}` is in the bundle but not listed in the manifest")]
    UnlistedFile(String),
    #[error("file `{path}`: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("file `{path}`: mode `{mode}` is not an octal permission like 0644")]
    BadMode { path: String, mode: String },
    #[error("file `{path}`: service `{service}` is not defined in the manifest")]
    UnknownService { path: String, service: String },
    #[error("key is not a base64 ed25519 key of 32 bytes")]
    KeyFormat,
}

/// How a node reloads one service when files belonging to it change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Program and arguments run on the node after the service's files changed.
    pub reload: Vec<String>,
}

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path inside the bundle, below `files/`; relative, no `..`.
    pub path: String,
    /// Absolute target path on the node; none for files only the daemon reads from its slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Octal permission bits, e.g. `0644`.
    pub mode: String,
    /// Hex sha256 of the content.
    pub sha256: String,
    /// Service to reload when this file changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Size in bytes. Optional (manifests written before it lack it); when present, a node
    /// reads no more than this from the archive for the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl FileEntry {
    /// The permission bits as a number.
    pub fn mode_bits(&self) -> Result<u32, BundleError> {
        parse_mode(&self.path, &self.mode)
    }
}

/// The signed description of one node version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub node_id: u32,
    pub site: String,
    pub node: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// The file name of a bundle: `<site>-<node>-v<N>.tar.zst`.
pub fn bundle_file_name(site: &str, node: &str, version: u32) -> String {
    format!("{site}-{node}-v{version}.tar.zst")
}

/// Hex sha256 of some bytes, as used in manifests.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Parses a base64 ed25519 public key (32 bytes).
pub fn verifying_key_from_base64(text: &str) -> Result<VerifyingKey, BundleError> {
    let bytes: [u8; 32] = BASE64
        .decode(text.trim())
        .map_err(|_| BundleError::KeyFormat)?
        .try_into()
        .map_err(|_| BundleError::KeyFormat)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| BundleError::KeyFormat)
}

/// Parses a base64 ed25519 secret key (32 bytes).
pub fn signing_key_from_base64(text: &str) -> Result<SigningKey, BundleError> {
    let bytes: [u8; 32] = BASE64
        .decode(text.trim())
        .map_err(|_| BundleError::KeyFormat)?
        .try_into()
        .map_err(|_| BundleError::KeyFormat)?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Base64 text of a public key.
pub fn verifying_key_to_base64(key: &VerifyingKey) -> String {
    BASE64.encode(key.as_bytes())
}

/// Base64 text of a secret key. Callers write it only to 0600 files.
pub fn signing_key_to_base64(key: &SigningKey) -> String {
    BASE64.encode(key.to_bytes())
}

/// Builds the bundle bytes for a manifest and its files, signing the manifest.
///
/// The manifest's hashes must match the files: a mismatch is a bug in the caller and is
/// reported rather than written.
pub fn build(
    manifest: &Manifest,
    files: &BTreeMap<String, Vec<u8>>,
    key: &SigningKey,
) -> Result<Vec<u8>, BundleError> {
    check_manifest(manifest)?;
    check_files_match(manifest, files)?;
    archive(
        manifest,
        files.iter().map(|(p, c)| (p.as_str(), c.as_slice())),
        key,
    )
}

/// [`build`] for files hashed when they were added: the manifest is checked against those
/// digests, so a large version is hashed once, not twice.
pub fn build_hashed(
    manifest: &Manifest,
    files: &HashedFiles,
    key: &SigningKey,
) -> Result<Vec<u8>, BundleError> {
    check_manifest(manifest)?;
    check_hashed_files_match(manifest, files)?;
    archive(manifest, files.iter(), key)
}

/// The compressed archive: manifest, signature, then the files in path order.
fn archive<'a>(
    manifest: &Manifest,
    files: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
    key: &SigningKey,
) -> Result<Vec<u8>, BundleError> {
    let (manifest_text, signature_text) = signed_manifest(manifest, key)?;
    // Sized up front: a header and padding per entry, two end blocks (no copy as it grows).
    let padded = |len: usize| 512 + len.div_ceil(512) * 512;
    let size = padded(manifest_text.len())
        + padded(signature_text.len())
        + files
            .clone()
            .map(|(path, content)| padded(content.len()) + padded(path.len() + 16))
            .sum::<usize>()
        + 1024;
    let mut archive = tar::Builder::new(Vec::with_capacity(size));
    archive.mode(tar::HeaderMode::Deterministic);
    append(&mut archive, MANIFEST_NAME, manifest_text.as_bytes())?;
    append(&mut archive, SIGNATURE_NAME, signature_text.as_bytes())?;
    for (path, content) in files {
        append(&mut archive, &format!("{FILES_PREFIX}{path}"), content)?;
    }
    let tar_bytes = archive
        .into_inner()
        .map_err(|e| BundleError::Archive(e.to_string()))?;
    zstd::bulk::compress(&tar_bytes, ZSTD_LEVEL).map_err(|e| BundleError::Archive(e.to_string()))
}

/// Files by path, each with its SHA-256, computed once when the file is added (only here:
/// a digest always belongs to its content).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashedFiles {
    files: BTreeMap<String, (Vec<u8>, String)>,
}

impl HashedFiles {
    pub fn new() -> HashedFiles {
        HashedFiles::default()
    }

    /// Adds a file, hashing it; returns the content it replaced.
    pub fn insert(&mut self, path: String, content: Vec<u8>) -> Option<Vec<u8>> {
        let digest = sha256_hex(&content);
        self.files.insert(path, (content, digest)).map(|(c, _)| c)
    }

    pub fn get(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(|(content, _)| content.as_slice())
    }

    /// The hex SHA-256 of a file, as manifests write it.
    pub fn sha256(&self, path: &str) -> Option<&str> {
        self.files.get(path).map(|(_, digest)| digest.as_str())
    }

    /// Path and content, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.files
            .iter()
            .map(|(path, (content, _))| (path.as_str(), content.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl FromIterator<(String, Vec<u8>)> for HashedFiles {
    fn from_iter<I: IntoIterator<Item = (String, Vec<u8>)>>(items: I) -> HashedFiles {
        let mut files = HashedFiles::new();
        for (path, content) in items {
            files.insert(path, content);
        }
        files
    }
}

/// The manifest's text and its signature file's text (base64 and a newline), exactly as
/// they are stored in a bundle.
pub fn signed_manifest(
    manifest: &Manifest,
    key: &SigningKey,
) -> Result<(String, String), BundleError> {
    let manifest_text =
        toml::to_string(manifest).map_err(|e| BundleError::Manifest(e.to_string()))?;
    let signature = key.sign(manifest_text.as_bytes());
    Ok((
        manifest_text,
        format!("{}\n", BASE64.encode(signature.to_bytes())),
    ))
}

fn append(
    archive: &mut tar::Builder<Vec<u8>>,
    path: &str,
    content: &[u8],
) -> Result<(), BundleError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    archive
        .append_data(&mut header, path, content)
        .map_err(|e| BundleError::Archive(e.to_string()))
}

/// A bundle whose signature, node id, paths and file hashes have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    manifest: Manifest,
    manifest_text: String,
    signature_text: String,
    files: BTreeMap<String, Vec<u8>>,
}

impl VerifiedBundle {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The exact signed manifest bytes.
    pub fn manifest_text(&self) -> &str {
        &self.manifest_text
    }
    /// The signature file's text, as stored in the bundle.
    pub fn signature_text(&self) -> &str {
        &self.signature_text
    }
    /// File contents by their path in the bundle.
    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.files
    }
}

/// The controller keys a node trusts: one (its identity's), or several while the controller's
/// signing key is rotated (`tlm rotate signing-key`: old and new until every node blessed a
/// version naming the new one). A signature by any of them is accepted.
pub trait TrustedKeys {
    fn trusted(&self) -> &[VerifyingKey];
}

impl TrustedKeys for VerifyingKey {
    fn trusted(&self) -> &[VerifyingKey] {
        std::slice::from_ref(self)
    }
}

impl TrustedKeys for [VerifyingKey] {
    fn trusted(&self) -> &[VerifyingKey] {
        self
    }
}

impl TrustedKeys for Vec<VerifyingKey> {
    fn trusted(&self) -> &[VerifyingKey] {
        self
    }
}

/// Checks a bundle for a node: archive shape, signature against the trusted controller key,
/// node id, format, paths, modes, and every file's hash. Anything off is an error with the
/// reason; nothing partial is returned. See the crate documentation for the order of the
/// checks and the bounds on what is decompressed.
pub fn verify(
    bytes: &[u8],
    controller_key: &(impl TrustedKeys + ?Sized),
    node_id: u32,
) -> Result<VerifiedBundle, BundleError> {
    verify_reader(bytes, controller_key, node_id, &Meter::default())
}

/// [`verify`] reading the compressed bundle from a stream, with the uncompressed bytes read
/// counted by `meter`.
pub fn verify_reader<R: Read>(
    compressed: R,
    controller_key: &(impl TrustedKeys + ?Sized),
    node_id: u32,
    meter: &Meter,
) -> Result<VerifiedBundle, BundleError> {
    let mut decoder = zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| BundleError::Archive(e.to_string()))?;
    decoder
        .window_log_max(MAX_WINDOW_LOG)
        .map_err(|e| BundleError::Archive(e.to_string()))?;
    verify_tar(decoder, controller_key, node_id, meter)
}

/// Counts the uncompressed bytes read and refuses to read past the current limit.
#[derive(Debug, Default)]
pub struct Meter {
    read: std::cell::Cell<u64>,
    limit: std::cell::Cell<u64>,
    exceeded: std::cell::Cell<bool>,
}

impl Meter {
    /// Uncompressed bytes read so far.
    pub fn read(&self) -> u64 {
        self.read.get()
    }
}

struct Metered<'a, R> {
    inner: R,
    meter: &'a Meter,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.meter.limit.get().saturating_sub(self.meter.read.get());
        if left == 0 && !buf.is_empty() {
            self.meter.exceeded.set(true);
            return Err(std::io::Error::other("over the bundle's read limit"));
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..take])?;
        self.meter.read.set(self.meter.read.get() + n as u64);
        Ok(n)
    }
}

/// Bytes a tar archive spends on one regular file: header, content padded to 512 bytes, and a
/// GNU long-name entry when the name does not fit the header.
fn tar_cost(name_len: u64, size: u64) -> u64 {
    let pad = |n: u64| n.div_ceil(512) * 512;
    let long_name = if name_len >= 100 {
        512 + pad(name_len + 1)
    } else {
        0
    };
    long_name + 512 + pad(size)
}

/// [`verify`] on the uncompressed tar stream, reading through `meter` (which tests use to see
/// how much was decompressed before a refusal).
pub fn verify_tar<R: Read>(
    tar_stream: R,
    controller_key: &(impl TrustedKeys + ?Sized),
    node_id: u32,
    meter: &Meter,
) -> Result<VerifiedBundle, BundleError> {
    meter.limit.set(UNSIGNED_READ_LIMIT);
    let over = |stage| {
        move |e: std::io::Error| {
            if meter.exceeded.get() {
                BundleError::OverBudget {
                    limit: meter.limit.get(),
                    stage,
                }
            } else {
                BundleError::Archive(e.to_string())
            }
        }
    };
    let mut archive = tar::Archive::new(Metered {
        inner: tar_stream,
        meter,
    });
    let mut entries = archive
        .entries()
        .map_err(over("the signature is checked"))?;

    // The manifest and its signature come first; nothing else is read before they verify.
    let mut head = |expected: &'static str, limit: u64| -> Result<String, BundleError> {
        let mut entry = entries
            .next()
            .ok_or(BundleError::Missing(expected))?
            .map_err(over("the signature is checked"))?;
        // Shown in logs and errors: escaped, so a crafted name stays one line.
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .escape_debug()
            .to_string();
        if name != expected {
            return Err(BundleError::Layout(format!(
                "`{expected}` must come before any other entry, found `{name}` (manifest.toml, manifest.sig, then files/)"
            )));
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(BundleError::UnexpectedEntry(name));
        }
        let size = entry.size();
        if size > limit {
            return Err(BundleError::EntryTooLarge { name, size, limit });
        }
        // Grows with what arrives, not with what a header claims.
        let mut content = Vec::with_capacity(usize::try_from(size.min(1 << 20)).unwrap_or(0));
        entry
            .read_to_end(&mut content)
            .map_err(over("the signature is checked"))?;
        String::from_utf8(content)
            .map_err(|_| BundleError::Manifest(format!("{name} is not UTF-8")))
    };
    let manifest_text = head(MANIFEST_NAME, MAX_MANIFEST_BYTES)?;
    let signature_text = head(SIGNATURE_NAME, MAX_SIGNATURE_BYTES)?;
    let manifest = check_signed_manifest(&manifest_text, &signature_text, controller_key, node_id)?;

    // The payload: only files the signed manifest lists, no more bytes than it declares.
    let declared: Option<u64> = manifest
        .files
        .iter()
        .map(|f| {
            f.size
                .map(|size| tar_cost((FILES_PREFIX.len() + f.path.len()) as u64, size))
        })
        .sum();
    let budget = declared
        .map_or(MAX_UNCOMPRESSED_BYTES, |d| d.saturating_add(1024))
        .min(MAX_UNCOMPRESSED_BYTES);
    meter.limit.set(meter.read().saturating_add(budget));
    let listed: BTreeMap<&str, &FileEntry> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let mut files = BTreeMap::new();
    for entry in entries {
        let mut entry = entry.map_err(over("the end of the files its manifest declares"))?;
        let name = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| BundleError::UnexpectedEntry("<non-UTF-8 name>".into()))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(BundleError::UnexpectedEntry(name));
        }
        let path = match name.strip_prefix(FILES_PREFIX) {
            Some(path) => path,
            None if name == MANIFEST_NAME || name == SIGNATURE_NAME => {
                return Err(BundleError::DuplicateEntry(name))
            }
            None => return Err(BundleError::UnexpectedEntry(name)),
        };
        check_relative_path(path)?;
        let Some(file) = listed.get(path) else {
            return Err(BundleError::UnlistedFile(path.to_string()));
        };
        if files.contains_key(path) {
            return Err(BundleError::DuplicateEntry(name));
        }
        let size = entry.size();
        if let Some(declared) = file.size.filter(|d| *d != size) {
            return Err(BundleError::SizeMismatch {
                path: path.to_string(),
                declared,
                found: size,
            });
        }
        let left = meter.limit.get().saturating_sub(meter.read());
        if size > left {
            return Err(BundleError::OverBudget {
                limit: meter.limit.get(),
                stage: "the end of the files its manifest declares",
            });
        }
        // Grows with what arrives, not with what a header claims.
        let mut content = Vec::with_capacity(usize::try_from(size.min(1 << 20)).unwrap_or(0));
        entry
            .read_to_end(&mut content)
            .map_err(over("the end of the files its manifest declares"))?;
        files.insert(path.to_string(), content);
    }
    verify_parts(
        manifest_text,
        signature_text,
        files,
        controller_key,
        node_id,
    )
}

/// Checks an unpacked version (manifest text, signature text, files) exactly as [`verify`]
/// checks a bundle: for versions a node keeps on disk and re-checks before using them.
pub fn verify_parts(
    manifest_text: String,
    signature_text: String,
    files: BTreeMap<String, Vec<u8>>,
    controller_key: &(impl TrustedKeys + ?Sized),
    node_id: u32,
) -> Result<VerifiedBundle, BundleError> {
    for path in files.keys() {
        check_relative_path(path)?;
    }
    let manifest = check_signed_manifest(&manifest_text, &signature_text, controller_key, node_id)?;
    check_files_match(&manifest, &files)?;
    Ok(VerifiedBundle {
        manifest,
        manifest_text,
        signature_text,
        files,
    })
}

/// The signature over the exact manifest bytes, then the manifest itself: format, node id,
/// paths, modes, services.
fn check_signed_manifest(
    manifest_text: &str,
    signature_text: &str,
    controller_key: &(impl TrustedKeys + ?Sized),
    node_id: u32,
) -> Result<Manifest, BundleError> {
    let signature_bytes: [u8; 64] = BASE64
        .decode(signature_text.trim())
        .map_err(|_| BundleError::SignatureFormat)?
        .try_into()
        .map_err(|_| BundleError::SignatureFormat)?;
    let signature = Signature::from_bytes(&signature_bytes);
    if !controller_key
        .trusted()
        .iter()
        .any(|key| key.verify(manifest_text.as_bytes(), &signature).is_ok())
    {
        return Err(BundleError::BadSignature);
    }
    let manifest: Manifest =
        toml::from_str(manifest_text).map_err(|e| BundleError::Manifest(e.to_string()))?;
    if manifest.format != FORMAT {
        return Err(BundleError::Format(manifest.format));
    }
    if manifest.node_id != node_id {
        return Err(BundleError::WrongNode {
            expected: node_id,
            found: manifest.node_id,
        });
    }
    check_manifest(&manifest)?;
    Ok(manifest)
}

fn check_manifest(manifest: &Manifest) -> Result<(), BundleError> {
    if manifest.format != FORMAT {
        return Err(BundleError::Format(manifest.format));
    }
    if manifest.version == 0 {
        return Err(BundleError::Manifest("version must be 1 or more".into()));
    }
    let mut seen_paths = std::collections::BTreeSet::new();
    let mut seen_targets = std::collections::BTreeSet::new();
    for file in &manifest.files {
        check_relative_path(&file.path)?;
        if !seen_paths.insert(file.path.as_str()) {
            return Err(BundleError::DuplicateEntry(file.path.clone()));
        }
        if let Some(target) = &file.target {
            check_target_path(&file.path, target)?;
            if !seen_targets.insert(target.as_str()) {
                return Err(BundleError::BadPath {
                    path: file.path.clone(),
                    reason: "target path is used by two files",
                });
            }
        }
        file.mode_bits()?;
        if let Some(service) = &file.service {
            if !manifest.services.contains_key(service) {
                return Err(BundleError::UnknownService {
                    path: file.path.clone(),
                    service: service.clone(),
                });
            }
        }
    }
    Ok(())
}

fn check_files_match(
    manifest: &Manifest,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<(), BundleError> {
    check_listed_files(
        manifest,
        |path| files.get(path).map(|content| (content.as_slice(), None)),
        files.keys().map(String::as_str),
        files.len(),
    )
}

/// [`check_files_match`] against digests taken when the files were added.
fn check_hashed_files_match(manifest: &Manifest, files: &HashedFiles) -> Result<(), BundleError> {
    check_listed_files(
        manifest,
        |path| {
            files
                .files
                .get(path)
                .map(|(content, digest)| (content.as_slice(), Some(digest.as_str())))
        },
        files.iter().map(|(path, _)| path),
        files.len(),
    )
}

/// Every file the manifest lists is there, of its declared size and digest, and no other file
/// is. `lookup` gives a file's content and, when known, its hex SHA-256 (hashed here if not).
fn check_listed_files<'a>(
    manifest: &Manifest,
    lookup: impl Fn(&str) -> Option<(&'a [u8], Option<&'a str>)>,
    mut paths: impl Iterator<Item = &'a str>,
    count: usize,
) -> Result<(), BundleError> {
    for entry in &manifest.files {
        let (content, known) =
            lookup(&entry.path).ok_or_else(|| BundleError::MissingFile(entry.path.clone()))?;
        if let Some(declared) = entry.size.filter(|d| *d != content.len() as u64) {
            return Err(BundleError::SizeMismatch {
                path: entry.path.clone(),
                declared,
                found: content.len() as u64,
            });
        }
        let found = known.map_or_else(|| sha256_hex(content), str::to_string);
        if found != entry.sha256 {
            return Err(BundleError::HashMismatch {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                found,
            });
        }
    }
    if count != manifest.files.len() {
        let listed: std::collections::BTreeSet<&str> =
            manifest.files.iter().map(|f| f.path.as_str()).collect();
        if let Some(extra) = paths.find(|p| !listed.contains(p)) {
            return Err(BundleError::UnlistedFile(extra.to_string()));
        }
    }
    Ok(())
}

fn parse_mode(path: &str, mode: &str) -> Result<u32, BundleError> {
    let bad = || BundleError::BadMode {
        path: path.to_string(),
        mode: mode.to_string(),
    };
    if mode.len() != 4 || !mode.starts_with('0') {
        return Err(bad());
    }
    let bits = u32::from_str_radix(mode, 8).map_err(|_| bad())?;
    if bits > 0o777 {
        return Err(bad());
    }
    Ok(bits)
}

/// A path inside the bundle: relative, plain components, no `.`/`..`, no backslash or NUL.
pub fn check_relative_path(path: &str) -> Result<(), BundleError> {
    let bad = |reason| BundleError::BadPath {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("path is empty"));
    }
    if path.starts_with('/') {
        return Err(bad("path inside the bundle must be relative"));
    }
    check_components(path, bad)
}

/// A target path on the node: absolute, normalised, no `.`/`..` components.
pub fn check_target_path(file: &str, target: &str) -> Result<(), BundleError> {
    let bad = |reason| BundleError::BadPath {
        path: file.to_string(),
        reason,
    };
    let Some(rest) = target.strip_prefix('/') else {
        return Err(bad("target path must be absolute"));
    };
    if rest.is_empty() {
        return Err(bad("target path must name a file"));
    }
    check_components(rest, bad)
}

fn check_components(
    path: &str,
    bad: impl Fn(&'static str) -> BundleError,
) -> Result<(), BundleError> {
    if path.contains('\0') || path.contains('\\') {
        return Err(bad("path contains NUL or backslash"));
    }
    for component in path.split('/') {
        match component {
            "" => return Err(bad("path has an empty component or a trailing slash")),
            "." | ".." => return Err(bad("path contains `.` or `..`")),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn sample() -> (Manifest, BTreeMap<String, Vec<u8>>) {
        let mut files = BTreeMap::new();
        files.insert("bird.conf".to_string(), b"router id 10.0.0.1;\n".to_vec());
        files.insert("node.toml".to_string(), b"node_id = 7\n".to_vec());
        let manifest = Manifest {
            format: FORMAT,
            node_id: 7,
            site: "berlin".into(),
            node: "primary".into(),
            version: 2,
            parent: Some(1),
            created: "2026-11-25T10:00:00Z".into(),
            services: BTreeMap::from([(
                "bird".to_string(),
                Service {
                    reload: vec!["birdc".into(), "configure".into()],
                },
            )]),
            files: vec![
                FileEntry {
                    path: "bird.conf".into(),
                    target: Some("/etc/bird/bird.conf".into()),
                    mode: "0644".into(),
                    sha256: sha256_hex(&files["bird.conf"]),
                    service: Some("bird".into()),
                    size: None,
                },
                FileEntry {
                    path: "node.toml".into(),
                    target: None,
                    mode: "0600".into(),
                    sha256: sha256_hex(&files["node.toml"]),
                    service: None,
                    size: Some(files["node.toml"].len() as u64),
                },
            ],
        };
        (manifest, files)
    }

    #[test]
    fn round_trip_and_deterministic() {
        let (manifest, files) = sample();
        let a = build(&manifest, &files, &key(1)).unwrap();
        let b = build(&manifest, &files, &key(1)).unwrap();
        assert_eq!(a, b, "same input must give the same bytes");
        let verified = verify(&a, &key(1).verifying_key(), 7).unwrap();
        assert_eq!(verified.manifest(), &manifest);
        assert_eq!(verified.files(), &files);
    }

    #[test]
    fn files_hashed_once_build_the_same_bundle_and_refuse_the_same_mismatches() {
        let (manifest, files) = sample();
        let hashed: HashedFiles = files.clone().into_iter().collect();
        assert_eq!(
            build_hashed(&manifest, &hashed, &key(1)).unwrap(),
            build(&manifest, &files, &key(1)).unwrap()
        );
        for (path, content) in &files {
            assert_eq!(hashed.sha256(path), Some(sha256_hex(content).as_str()));
        }
        // A file changed after the manifest was made.
        let mut changed = hashed.clone();
        changed.insert("bird.conf".into(), b"router id 10.0.0.2;\n".to_vec());
        assert!(matches!(
            build_hashed(&manifest, &changed, &key(1)),
            Err(BundleError::HashMismatch { path, .. }) if path == "bird.conf"
        ));
        // A file the manifest lists but the files lack, and one it does not list.
        let missing: HashedFiles = files
            .clone()
            .into_iter()
            .filter(|(p, _)| p != "node.toml")
            .collect();
        assert!(matches!(
            build_hashed(&manifest, &missing, &key(1)),
            Err(BundleError::MissingFile(path)) if path == "node.toml"
        ));
        let mut extra = hashed.clone();
        extra.insert("extra.conf".into(), b"x".to_vec());
        assert!(matches!(
            build_hashed(&manifest, &extra, &key(1)),
            Err(BundleError::UnlistedFile(path)) if path == "extra.conf"
        ));
        // A declared size that is not the file's.
        let mut sized = manifest.clone();
        sized.files[0].size = Some(1);
        assert!(matches!(
            build_hashed(&sized, &hashed, &key(1)),
            Err(BundleError::SizeMismatch { declared: 1, .. })
        ));
    }

    #[test]
    fn rejects_wrong_key_and_node() {
        let (manifest, files) = sample();
        let bytes = build(&manifest, &files, &key(1)).unwrap();
        assert!(matches!(
            verify(&bytes, &key(2).verifying_key(), 7),
            Err(BundleError::BadSignature)
        ));
        assert!(matches!(
            verify(&bytes, &key(1).verifying_key(), 8),
            Err(BundleError::WrongNode {
                expected: 8,
                found: 7
            })
        ));
    }

    #[test]
    fn rejects_tampered_file() {
        let (manifest, files) = sample();
        let mut tampered = files.clone();
        tampered.insert("bird.conf".into(), b"router id 6.6.6.6;\n".to_vec());
        // Sign a manifest with the honest hashes but ship other content.
        let manifest_text = toml::to_string(&manifest).unwrap();
        let sig = key(1).sign(manifest_text.as_bytes());
        let mut archive = tar::Builder::new(Vec::new());
        append(&mut archive, MANIFEST_NAME, manifest_text.as_bytes()).unwrap();
        append(
            &mut archive,
            SIGNATURE_NAME,
            BASE64.encode(sig.to_bytes()).as_bytes(),
        )
        .unwrap();
        for (p, c) in &tampered {
            append(&mut archive, &format!("files/{p}"), c).unwrap();
        }
        let bytes = zstd::bulk::compress(&archive.into_inner().unwrap(), 3).unwrap();
        assert!(matches!(
            verify(&bytes, &key(1).verifying_key(), 7),
            Err(BundleError::HashMismatch { .. })
        ));
    }

    #[test]
    fn rejects_truncated() {
        let (manifest, files) = sample();
        let bytes = build(&manifest, &files, &key(1)).unwrap();
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(verify(&bytes[..cut], &key(1).verifying_key(), 7).is_err());
        }
    }

    #[test]
    fn rejects_escaping_paths() {
        for target in ["etc/passwd", "/etc/../passwd", "/etc/./x", "/", "/etc//x"] {
            let (mut manifest, files) = sample();
            manifest.files[0].target = Some(target.into());
            assert!(
                matches!(
                    build(&manifest, &files, &key(1)),
                    Err(BundleError::BadPath { .. })
                ),
                "{target}"
            );
        }
        assert!(check_relative_path("../x").is_err());
        assert!(check_relative_path("/x").is_err());
        assert!(check_relative_path("a/b").is_ok());
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("f", "0644").unwrap(), 0o644);
        assert!(parse_mode("f", "644").is_err());
        assert!(parse_mode("f", "0999").is_err());
    }

    use crate::test_support::tar_header;

    const GIB2: u64 = 2 << 30;

    #[test]
    fn a_2_gib_bomb_is_refused_before_it_is_decompressed() {
        // The bomb is a real zstd frame: it decodes (the first 16 MiB of it are checked here).
        let payload = tar_header("files/big", GIB2 - 512);
        let bomb = crate::test_support::zstd_bomb(&payload, GIB2, 17);
        assert!(bomb.len() < 100 * 1024, "{}", bomb.len());
        let mut head = vec![0u8; 16 << 20];
        zstd::stream::read::Decoder::new(bomb.as_slice())
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert_eq!(&head[..512], payload.as_slice());

        // A payload file before any manifest: refused after one tar header.
        let meter = Meter::default();
        let refused = verify_reader(bomb.as_slice(), &key(1).verifying_key(), 7, &meter);
        assert!(
            matches!(refused, Err(BundleError::Layout(_))),
            "{refused:?}"
        );
        assert!(meter.read() <= 128 * 1024, "read {} bytes", meter.read());

        // A manifest claiming 2 GiB: refused from its header.
        let bomb = crate::test_support::zstd_bomb(&tar_header(MANIFEST_NAME, GIB2 - 512), GIB2, 17);
        let meter = Meter::default();
        let refused = verify_reader(bomb.as_slice(), &key(1).verifying_key(), 7, &meter);
        assert!(
            matches!(refused, Err(BundleError::EntryTooLarge { .. })),
            "{refused:?}"
        );
        assert!(meter.read() <= 128 * 1024, "read {} bytes", meter.read());

        // Nothing but zeros: an empty archive, refused at once.
        let bomb = crate::test_support::zstd_bomb(&[0; 512], GIB2, 17);
        let meter = Meter::default();
        let refused = verify_reader(bomb.as_slice(), &key(1).verifying_key(), 7, &meter);
        assert!(
            matches!(refused, Err(BundleError::Missing(_))),
            "{refused:?}"
        );
        assert!(meter.read() <= 128 * 1024, "read {} bytes", meter.read());
    }

    #[test]
    fn unsigned_bytes_read_are_bounded_by_the_manifest_limit() {
        // A manifest of the largest size, then a 2 GiB "signature": at most the unsigned read
        // limit is decompressed, whatever follows.
        let mut prefix = tar_header(MANIFEST_NAME, MAX_MANIFEST_BYTES);
        prefix.extend(std::iter::repeat_n(b'#', MAX_MANIFEST_BYTES as usize));
        prefix.extend(tar_header(SIGNATURE_NAME, 64));
        let mut stream = prefix.clone();
        stream.extend(std::iter::repeat_n(b'A', 64 + 448));
        let meter = Meter::default();
        let refused = verify_tar(stream.as_slice(), &key(1).verifying_key(), 7, &meter);
        assert!(
            matches!(refused, Err(BundleError::SignatureFormat)),
            "{refused:?}"
        );
        assert!(meter.read() <= UNSIGNED_READ_LIMIT);
        // The same with a signature entry claiming 2 GiB.
        let mut prefix = tar_header(MANIFEST_NAME, MAX_MANIFEST_BYTES);
        prefix.extend(std::iter::repeat_n(b'#', MAX_MANIFEST_BYTES as usize));
        prefix.extend(tar_header(SIGNATURE_NAME, GIB2));
        let meter = Meter::default();
        let refused = verify_reader(
            crate::test_support::zstd_bomb(&prefix, GIB2, 17).as_slice(),
            &key(1).verifying_key(),
            7,
            &meter,
        );
        assert!(
            matches!(refused, Err(BundleError::EntryTooLarge { .. })),
            "{refused:?}"
        );
        assert!(meter.read() <= UNSIGNED_READ_LIMIT, "read {}", meter.read());
    }

    #[test]
    fn a_large_bundle_fits_the_window_limit() {
        let (mut manifest, mut files) = sample();
        let mut x = 1u64;
        let big: Vec<u8> = (0..12 << 20)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8 % 16
            })
            .collect();
        manifest.files[0].sha256 = sha256_hex(&big);
        files.insert("bird.conf".into(), big);
        let bytes = build(&manifest, &files, &key(1)).unwrap();
        verify(&bytes, &key(1).verifying_key(), 7).unwrap();
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused() {
        let bomb = crate::test_support::zstd_bomb(&tar_header(MANIFEST_NAME, 10), GIB2, 31);
        let meter = Meter::default();
        let refused = verify_reader(bomb.as_slice(), &key(1).verifying_key(), 7, &meter);
        assert!(
            matches!(refused, Err(BundleError::Archive(_))),
            "{refused:?}"
        );
        assert_eq!(meter.read(), 0);
    }

    /// A signed manifest and signature, then `payload` as the archive's files.
    fn signed_stream(manifest: &Manifest, payload: &[(&str, &[u8], u64)]) -> Vec<u8> {
        let (text, sig) = signed_manifest(manifest, &key(1)).unwrap();
        let mut bytes = Vec::new();
        let head: [(&str, &[u8], u64); 2] = [
            (MANIFEST_NAME, text.as_bytes(), text.len() as u64),
            (SIGNATURE_NAME, sig.as_bytes(), sig.len() as u64),
        ];
        for (name, content, size) in head.iter().chain(payload) {
            bytes.extend(tar_header(name, *size));
            bytes.extend_from_slice(content);
            bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        }
        bytes
    }

    #[test]
    fn a_signed_payload_is_read_no_further_than_its_manifest_declares() {
        let (manifest, files) = sample();
        // node.toml declares its size: an entry claiming more is refused from its header.
        let content = &files["node.toml"];
        let stream = signed_stream(
            &manifest,
            &[
                (
                    "files/bird.conf",
                    &files["bird.conf"],
                    files["bird.conf"].len() as u64,
                ),
                ("files/node.toml", content, 1 << 30),
            ],
        );
        let meter = Meter::default();
        let refused = verify_tar(stream.as_slice(), &key(1).verifying_key(), 7, &meter);
        assert!(
            matches!(refused, Err(BundleError::SizeMismatch { .. })),
            "{refused:?}"
        );
        // An entry the signed manifest does not list: refused before its content is read.
        let stream = signed_stream(&manifest, &[("files/extra", b"", GIB2)]);
        let refused = verify_tar(
            stream.as_slice(),
            &key(1).verifying_key(),
            7,
            &Meter::default(),
        );
        assert!(
            matches!(refused, Err(BundleError::UnlistedFile(_))),
            "{refused:?}"
        );
        // With every size declared the budget is their sum: a listed file may not grow past it.
        let (mut manifest, files) = sample();
        for f in &mut manifest.files {
            f.size = Some(files[&f.path].len() as u64);
        }
        let bytes = build(&manifest, &files, &key(1)).unwrap();
        let meter = Meter::default();
        verify_reader(bytes.as_slice(), &key(1).verifying_key(), 7, &meter).unwrap();
        assert!(meter.read() < 8 * 1024, "{}", meter.read());
        // Old manifests (no sizes) still verify.
        let (mut manifest, files) = sample();
        for f in &mut manifest.files {
            f.size = None;
        }
        let bytes = build(&manifest, &files, &key(1)).unwrap();
        verify(&bytes, &key(1).verifying_key(), 7).unwrap();
    }

    #[test]
    fn a_bundle_with_a_wrong_signature_has_its_payload_unread() {
        let (manifest, files) = sample();
        // Another key's signature: the 2 GiB file after it is never read.
        let mut stream = signed_stream(&manifest, &[]);
        let (_, foreign) = signed_manifest(&manifest, &key(2)).unwrap();
        let (_, genuine) = signed_manifest(&manifest, &key(1)).unwrap();
        let at = stream
            .windows(genuine.len())
            .position(|w| w == genuine.as_bytes())
            .unwrap();
        stream[at..at + foreign.len()].copy_from_slice(foreign.as_bytes());
        let signed_part = stream.len() as u64;
        stream.extend(tar_header("files/bird.conf", GIB2));
        let bomb = crate::test_support::zstd_bomb(&stream, GIB2, 17);
        let meter = Meter::default();
        let refused = verify_reader(bomb.as_slice(), &key(1).verifying_key(), 7, &meter);
        assert!(
            matches!(refused, Err(BundleError::BadSignature)),
            "{refused:?}"
        );
        assert!(meter.read() <= signed_part + 512, "{}", meter.read());
        let _ = files;
    }

    proptest::proptest! {
        #[test]
        fn any_single_byte_flip_is_rejected(index in 0usize..4096, bit in 0u8..8) {
            let (manifest, files) = sample();
            let mut bytes = build(&manifest, &files, &key(1)).unwrap();
            let index = index % bytes.len();
            bytes[index] ^= 1 << bit;
            // Either the archive no longer decodes, or the checks catch the change; it never
            // verifies with different content.
            if let Ok(v) = verify(&bytes, &key(1).verifying_key(), 7) {
                proptest::prop_assert_eq!(v.manifest(), &manifest);
                proptest::prop_assert_eq!(v.files(), &files);
            }
        }
    }
}
