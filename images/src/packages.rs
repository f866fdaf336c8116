//! Alpine packages on the card: the node's package set resolved against the branch's signed
//! `APKINDEX`, the `.apk` files fetched from the mirror (each checked against the index),
//! cached, and laid out on the boot partition as a boot repository, so Alpine's diskless
//! init installs them at every boot without a network.
//!
//! Formats (apk-tools v2, which Alpine 3.23's apk 3 still reads): an `APKINDEX.tar.gz` is a
//! gzip stream holding a tar with one `.SIGN.RSA.<key>` (SHA-1) or `.SIGN.RSA256.<key>`
//! (SHA-256) member — the PKCS#1 v1.5 signature of the raw bytes that follow — and then a gzip
//! stream with the tar of `DESCRIPTION` and `APKINDEX`. A `.apk` is [signature stream] +
//! control stream (`.PKGINFO`) + data stream; the index's `C:Q1<base64>` is the SHA-1 of the
//! control stream's raw bytes, which names the package's content.
//!
//! The index goes onto the card as the mirror signed it: the node's `apk` verifies it with
//! the keys it trusts, exactly as it would a mirror's.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use rsa::pkcs8::DecodePublicKey as _;
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::assets;
use crate::Error;

/// Largest index and control sections read (a decompression bomb stops there).
const MAX_INDEX_BYTES: u64 = 64 << 20;
const MAX_CONTROL_BYTES: u64 = 4 << 20;

/// A public key `apk` and the builder trust for package indexes, by its file name.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// File name, e.g. `alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub`: what a
    /// signature names.
    pub name: String,
    pub pem: String,
    key: rsa::RsaPublicKey,
}

impl TrustedKey {
    pub fn new(name: &str, pem: &str, origin: &str) -> Result<TrustedKey, Error> {
        let key = rsa::RsaPublicKey::from_public_key_pem(pem.trim()).map_err(|e| {
            Error::Packages(format!("key `{origin}`: not an RSA public key in PEM: {e}"))
        })?;
        Ok(TrustedKey {
            name: name.to_string(),
            pem: pem.to_string(),
            key,
        })
    }

    /// A key file (`*.rsa.pub`); its file name is the key's name.
    pub fn from_file(path: &Path) -> Result<TrustedKey, Error> {
        let pem = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        TrustedKey::new(&name, &pem, &path.display().to_string())
    }
}

/// One package as an index lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Size of the `.apk` file.
    pub size: u64,
    /// SHA-1 of the control stream (`C:Q1...`).
    pub checksum: Vec<u8>,
    pub depends: Vec<String>,
    pub provides: Vec<String>,
    pub install_if: Vec<String>,
    pub provider_priority: u32,
}

impl IndexEntry {
    /// `<name>-<version>.apk`, the file name on mirrors.
    pub fn file_name(&self) -> String {
        format!("{}-{}.apk", self.name, self.version)
    }
}

/// Parses the text of an `APKINDEX` (blocks of `X:value` lines separated by blank lines).
pub fn parse_index(text: &str) -> Result<Vec<IndexEntry>, String> {
    let mut out = Vec::new();
    for (n, block) in text.split("\n\n").enumerate() {
        if block.trim().is_empty() {
            continue;
        }
        let mut e = IndexEntry {
            name: String::new(),
            version: String::new(),
            arch: String::new(),
            size: 0,
            checksum: Vec::new(),
            depends: Vec::new(),
            provides: Vec::new(),
            install_if: Vec::new(),
            provider_priority: 0,
        };
        for line in block.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k {
                "P" => e.name = v.to_string(),
                "V" => e.version = v.to_string(),
                "A" => e.arch = v.to_string(),
                "S" => {
                    e.size = v
                        .parse()
                        .map_err(|_| format!("entry {}: bad S:{v}", n + 1))?
                }
                "C" => {
                    let b64 = v
                        .strip_prefix("Q1")
                        .ok_or_else(|| format!("entry {}: checksum `{v}` is not Q1", n + 1))?;
                    e.checksum = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| format!("entry {}: bad checksum `{v}`", n + 1))?;
                }
                "D" => e.depends = v.split_whitespace().map(str::to_string).collect(),
                "p" => e.provides = v.split_whitespace().map(str::to_string).collect(),
                "i" => e.install_if = v.split_whitespace().map(str::to_string).collect(),
                "k" => e.provider_priority = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if e.name.is_empty() || e.version.is_empty() || e.checksum.len() != 20 {
            return Err(format!(
                "entry {} (`{}`) lacks a name, version or SHA-1 checksum",
                n + 1,
                e.name
            ));
        }
        out.push(e);
    }
    Ok(out)
}

/// The name a dependency or provides token is about: `so:libc.so=1` → `so:libc.so`,
/// `bird>=2` → `bird`. `None` for a conflict (`!name`).
pub fn dependency_name(token: &str) -> Option<&str> {
    if token.starts_with('!') {
        return None;
    }
    let end = token.find(['<', '>', '=', '~']).unwrap_or(token.len());
    Some(&token[..end])
}

/// Alpine version order, enough to pick the newest of several entries of one name: numbers
/// compare as numbers, everything else as text, segment by segment.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn segments(v: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in v.chars() {
            let digit = c.is_ascii_digit();
            match out.last_mut() {
                Some((d, s)) if *d == digit && c.is_ascii_alphanumeric() => s.push(c),
                _ if c.is_ascii_alphanumeric() => out.push((digit, c.to_string())),
                _ => out.push((false, String::new())),
            }
        }
        out
    }
    let (sa, sb) = (segments(a), segments(b));
    for (x, y) in sa.iter().zip(sb.iter()) {
        let o = if x.0 && y.0 {
            let (nx, ny) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
            nx.len().cmp(&ny.len()).then(nx.cmp(ny))
        } else {
            x.1.cmp(&y.1)
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    sa.len().cmp(&sb.len())
}

/// Which packages the card must carry so that `wanted` installs with nothing but the card:
/// every dependency, resolved by package name first, then by what packages provide (highest
/// `provider_priority`, then name); packages whose install-if condition the set meets (as
/// `apk` would add them); minus what `installed` (an offline system layer) already provides.
/// Sorted by name. Pure.
pub fn resolve<'a>(
    index: &'a [IndexEntry],
    wanted: &[String],
    installed: &BTreeSet<String>,
) -> Result<Vec<&'a IndexEntry>, String> {
    let mut by_name: BTreeMap<&str, &IndexEntry> = BTreeMap::new();
    for e in index {
        match by_name.get(e.name.as_str()) {
            Some(old) if compare_versions(&old.version, &e.version).is_ge() => {}
            _ => {
                by_name.insert(&e.name, e);
            }
        }
    }
    let mut providers: BTreeMap<&str, Vec<&IndexEntry>> = BTreeMap::new();
    for e in by_name.values() {
        for p in &e.provides {
            if let Some(name) = dependency_name(p) {
                providers.entry(name).or_default().push(e);
            }
        }
    }
    let mut chosen: BTreeMap<&str, &IndexEntry> = BTreeMap::new();
    let mut satisfied: BTreeSet<String> = installed.clone();
    let mut queue: Vec<(String, String)> = wanted
        .iter()
        .map(|w| (w.clone(), "the image's package list".to_string()))
        .collect();
    loop {
        while let Some((token, wanted_by)) = queue.pop() {
            let Some(name) = dependency_name(&token) else {
                continue;
            };
            if satisfied.contains(name) {
                continue;
            }
            let entry = match by_name.get(name) {
                Some(e) => *e,
                None => {
                    let mut candidates = providers.get(name).cloned().unwrap_or_default();
                    candidates.sort_by(|a, b| {
                        b.provider_priority
                            .cmp(&a.provider_priority)
                            .then(a.name.cmp(&b.name))
                    });
                    *candidates.first().ok_or_else(|| {
                        format!("no package provides `{name}` (wanted by {wanted_by})")
                    })?
                }
            };
            satisfied.insert(name.to_string());
            if chosen.insert(&entry.name, entry).is_some() {
                continue;
            }
            satisfied.insert(entry.name.clone());
            for p in &entry.provides {
                if let Some(n) = dependency_name(p) {
                    satisfied.insert(n.to_string());
                }
            }
            for d in &entry.depends {
                queue.push((d.clone(), entry.name.clone()));
            }
        }
        // Install-if: what apk adds by itself once its condition holds.
        let extra: Vec<&IndexEntry> = by_name
            .values()
            .filter(|e| {
                !e.install_if.is_empty()
                    && !chosen.contains_key(e.name.as_str())
                    && !satisfied.contains(&e.name)
                    && e.install_if.iter().all(|c| {
                        dependency_name(c).is_some_and(|n| satisfied.contains(n))
                            || c.starts_with('!')
                    })
            })
            .copied()
            .collect();
        if extra.is_empty() {
            break;
        }
        for e in extra {
            queue.push((
                e.name.clone(),
                format!("install-if {}", e.install_if.join(" ")),
            ));
        }
    }
    Ok(chosen.into_values().collect())
}

/// What an `installed` database (`lib/apk/db/installed`) provides: names and provides.
pub fn installed_names(db: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in db.lines() {
        if let Some(name) = line.strip_prefix("P:") {
            out.insert(name.to_string());
        } else if let Some(p) = line.strip_prefix("p:") {
            out.extend(
                p.split_whitespace()
                    .filter_map(dependency_name)
                    .map(str::to_string),
            );
        }
    }
    out
}

/// Splits the first `count` gzip members off `bytes`: their byte ranges and decompressed
/// contents (each at most `limit` bytes).
fn gzip_members(
    bytes: &[u8],
    count: usize,
    limit: u64,
) -> Result<Vec<(usize, usize, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut rest: &[u8] = bytes;
    for _ in 0..count {
        if rest.is_empty() {
            break;
        }
        let start = bytes.len() - rest.len();
        let mut data = Vec::new();
        {
            let decoder = flate2::bufread::GzDecoder::new(&mut rest);
            let mut limited = decoder.take(limit + 1);
            limited
                .read_to_end(&mut data)
                .map_err(|e| format!("not gzip at byte {start}: {e}"))?;
        }
        if data.len() as u64 > limit {
            return Err(format!("a section is larger than {limit} bytes"));
        }
        out.push((start, bytes.len() - rest.len(), data));
    }
    Ok(out)
}

/// The members of an uncompressed tar (name, content).
fn tar_members(tar_bytes: &[u8]) -> Result<TarMembers, String> {
    let mut out = Vec::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = entry
            .path()
            .map_err(|e| e.to_string())?
            .display()
            .to_string();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).map_err(|e| e.to_string())?;
        out.push((name, content));
    }
    Ok(out)
}

/// Verifies a signed `APKINDEX.tar.gz` with `keys` and returns the key name and the index text.
pub fn verify_index(bytes: &[u8], keys: &[TrustedKey]) -> Result<(String, String), String> {
    let members = gzip_members(bytes, 1, MAX_CONTROL_BYTES)?;
    let (_, sig_end, sig_tar) = members.first().ok_or("empty file")?;
    let signature = tar_members(sig_tar)?
        .into_iter()
        .find(|(n, _)| n.starts_with(".SIGN."))
        .ok_or("not signed (no .SIGN.* member)")?;
    let (sha256, key_name) = if let Some(k) = signature.0.strip_prefix(".SIGN.RSA256.") {
        (true, k)
    } else if let Some(k) = signature.0.strip_prefix(".SIGN.RSA.") {
        (false, k)
    } else {
        return Err(format!("unsupported signature `{}`", signature.0));
    };
    let key = keys.iter().find(|k| k.name == key_name).ok_or_else(|| {
        format!(
            "signed by `{key_name}`, which is not a trusted key (trusted: {})",
            keys.iter()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let signed = &bytes[*sig_end..];
    let ok = if sha256 {
        key.key.verify(
            rsa::Pkcs1v15Sign::new::<Sha256>(),
            &Sha256::digest(signed),
            &signature.1,
        )
    } else {
        key.key.verify(
            rsa::Pkcs1v15Sign::new::<Sha1>(),
            &Sha1::digest(signed),
            &signature.1,
        )
    };
    ok.map_err(|_| format!("bad signature by `{key_name}`"))?;
    let index = gzip_members(signed, 1, MAX_INDEX_BYTES)?;
    let (_, _, tar) = index.first().ok_or("no index after the signature")?;
    let text = tar_members(tar)?
        .into_iter()
        .find(|(n, _)| n == "APKINDEX")
        .ok_or("no APKINDEX member")?
        .1;
    Ok((
        key_name.to_string(),
        String::from_utf8(text).map_err(|_| "APKINDEX is not UTF-8".to_string())?,
    ))
}

/// Members of a tar: name and content.
type TarMembers = Vec<(String, Vec<u8>)>;

/// A `.apk`'s control section: its byte range and its tar's members. The signature section,
/// when there is one, comes first; the data section after the control one is not read.
fn control_section(bytes: &[u8]) -> Result<(usize, usize, TarMembers), String> {
    let (start, end, tar) = gzip_members(bytes, 1, MAX_CONTROL_BYTES)?
        .pop()
        .ok_or("empty package")?;
    let members = tar_members(&tar)?;
    if !members.iter().any(|(n, _)| n.starts_with(".SIGN.")) {
        return Ok((start, end, members));
    }
    let (s2, e2, tar) = gzip_members(&bytes[end..], 1, MAX_CONTROL_BYTES)?
        .pop()
        .ok_or("no control section after the signature")?;
    Ok((end + s2, end + e2, tar_members(&tar)?))
}

/// The value of `key` in a `.PKGINFO`.
fn pkginfo_field(members: &[(String, Vec<u8>)], key: &str) -> Option<String> {
    let (_, info) = members.iter().find(|(n, _)| n == ".PKGINFO")?;
    let prefix = format!("{key} = ");
    String::from_utf8_lossy(info)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_string()))
}

/// Checks a `.apk` against its index entry: its size, the SHA-1 of its control section (the
/// package identity the index signs) and, through the control section's `datahash`, the
/// SHA-256 of its data section (what apk checks when it installs).
pub fn verify_package(bytes: &[u8], entry: &IndexEntry) -> Result<(), String> {
    if bytes.len() as u64 != entry.size {
        return Err(format!(
            "{} bytes, the index says {}",
            bytes.len(),
            entry.size
        ));
    }
    let (start, end, members) = control_section(bytes)?;
    let digest = Sha1::digest(&bytes[start..end]);
    if digest.as_slice() != entry.checksum.as_slice() {
        return Err("control section does not match the index checksum".into());
    }
    if let Some(datahash) = pkginfo_field(&members, "datahash") {
        if hex::encode(Sha256::digest(&bytes[end..])) != datahash.to_lowercase() {
            return Err("data section does not match the datahash of its control section".into());
        }
    }
    Ok(())
}

/// `(pkgname, pkgver)` from a `.apk`'s `.PKGINFO`.
pub fn package_info(bytes: &[u8]) -> Option<(String, String)> {
    let (_, _, members) = control_section(bytes).ok()?;
    Some((
        pkginfo_field(&members, "pkgname")?,
        pkginfo_field(&members, "pkgver")?,
    ))
}

/// Where packages come from.
#[derive(Debug)]
pub struct PackageSource {
    /// Mirror base URL (`https://dl-cdn.alpinelinux.org/alpine`, `file:///...`).
    pub mirror: String,
    /// Repositories of the branch, in order (`main`, `community`).
    pub repositories: Vec<String>,
    /// Keys the builder and the node trust besides Alpine's (files `*.rsa.pub`).
    pub extra_keys: Vec<PathBuf>,
    /// Package cache (`<cache>/<branch>/<repo>/<arch>/<file>.apk`).
    pub cache: PathBuf,
    /// Indexes fetched by this process (a site build fetches each once).
    fetched: Mutex<BTreeMap<String, Arc<FetchedIndex>>>,
}

#[derive(Debug)]
struct FetchedIndex {
    url: String,
    bytes: Vec<u8>,
    signer: String,
    entries: Vec<IndexEntry>,
}

/// One repository on the card.
#[derive(Debug, Clone)]
pub struct CardRepository {
    /// `main`, `community`.
    pub name: String,
    /// The mirror's signed index, byte for byte.
    pub index: Vec<u8>,
    /// `(file name, bytes)`.
    pub packages: Vec<(String, Vec<u8>)>,
}

/// Everything about packages that goes onto a card.
#[derive(Debug, Clone, Default)]
pub struct CardPackages {
    pub repositories: Vec<CardRepository>,
    /// `name-version`, sorted: what `tlm image inspect` lists.
    pub packages: Vec<String>,
    /// Keys the node must trust besides the ones its initramfs brings (into `/etc/apk/keys`).
    pub extra_keys: Vec<TrustedKey>,
}

impl CardPackages {
    /// Bytes the packages and indexes add to the boot partition.
    pub fn bytes(&self) -> u64 {
        self.repositories
            .iter()
            .map(|r| {
                r.index.len() as u64 + r.packages.iter().map(|p| p.1.len() as u64).sum::<u64>()
            })
            .sum()
    }
}

/// Directory of the boot repository on the boot partition, as Alpine's own media have it:
/// `apks/.boot_repository` marks it, `apks/<arch>/` holds the index and packages. Alpine's
/// initramfs (nlplug-findfs) looks for the marker one level below the medium's root, so a
/// second repository goes beside it (`apks-community/`).
pub const CARD_DIR: &str = "apks";

/// The card directory of repository `repo`: `apks` for `main`, `apks-<repo>` for others.
pub fn card_dir(repo: &str) -> String {
    if repo == "main" {
        CARD_DIR.to_string()
    } else {
        format!("{CARD_DIR}-{repo}")
    }
}

impl PackageSource {
    pub fn new(
        mirror: String,
        repositories: Vec<String>,
        extra_keys: Vec<PathBuf>,
        cache: PathBuf,
    ) -> PackageSource {
        PackageSource {
            mirror,
            repositories,
            extra_keys,
            cache,
            fetched: Mutex::new(BTreeMap::new()),
        }
    }

    fn index(
        &self,
        branch: &str,
        repo: &str,
        arch: &str,
        keys: &[TrustedKey],
    ) -> Result<Arc<FetchedIndex>, Error> {
        let url = format!(
            "{}/{branch}/{repo}/{arch}/APKINDEX.tar.gz",
            self.mirror.trim_end_matches('/')
        );
        if let Some(i) = self.fetched.lock().ok().and_then(|m| m.get(&url).cloned()) {
            return Ok(i);
        }
        let bytes = assets::fetch_limited(&url, MAX_INDEX_BYTES)?;
        let (signer, text) = verify_index(&bytes, keys).map_err(|message| Error::PackageIndex {
            url: url.clone(),
            message,
        })?;
        let entries = parse_index(&text).map_err(|message| Error::PackageIndex {
            url: url.clone(),
            message,
        })?;
        let fetched = Arc::new(FetchedIndex {
            url: url.clone(),
            bytes,
            signer,
            entries,
        });
        if let Ok(mut m) = self.fetched.lock() {
            m.insert(url, Arc::clone(&fetched));
        }
        Ok(fetched)
    }

    /// Resolves `wanted` for `arch` on `branch` (`v3.23`) against the repositories' indexes,
    /// fetches (or takes from the cache) every package not in `installed`, checks each
    /// against its index, and returns what the card carries.
    pub fn prepare(
        &self,
        branch: &str,
        arch: &str,
        alpine_keys: &[TrustedKey],
        wanted: &[String],
        installed: &BTreeSet<String>,
    ) -> Result<CardPackages, Error> {
        let mut extra = Vec::new();
        for k in &self.extra_keys {
            extra.push(TrustedKey::from_file(k)?);
        }
        let keys: Vec<TrustedKey> = alpine_keys
            .iter()
            .cloned()
            .chain(extra.iter().cloned())
            .collect();
        let mut indexes = Vec::new();
        for repo in &self.repositories {
            indexes.push((repo.clone(), self.index(branch, repo, arch, &keys)?));
        }
        // One combined view: a package name from an earlier repository wins.
        let mut all: Vec<IndexEntry> = Vec::new();
        let mut origin: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut earlier: BTreeSet<String> = BTreeSet::new();
        for (i, (_, idx)) in indexes.iter().enumerate() {
            for e in &idx.entries {
                if !earlier.contains(&e.name) {
                    origin
                        .entry((e.name.clone(), e.version.clone()))
                        .or_insert(i);
                    all.push(e.clone());
                }
            }
            earlier.extend(idx.entries.iter().map(|e| e.name.clone()));
        }
        let chosen = resolve(&all, wanted, installed).map_err(|message| Error::PackageIndex {
            url: indexes
                .iter()
                .map(|(_, i)| i.url.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            message,
        })?;
        let mut repos: Vec<CardRepository> = indexes
            .iter()
            .map(|(name, idx)| CardRepository {
                name: name.clone(),
                index: idx.bytes.clone(),
                packages: Vec::new(),
            })
            .collect();
        let mut names = Vec::new();
        let mut progress =
            assets::Progress::new("packages", Some(chosen.iter().map(|e| e.size).sum()));
        for e in chosen {
            let i = origin[&(e.name.clone(), e.version.clone())];
            let repo = &indexes[i].0;
            let file = e.file_name();
            if file.contains('/') || file.starts_with('.') {
                return Err(Error::PackageIndex {
                    url: indexes[i].1.url.clone(),
                    message: format!("refusing the package file name `{file}`"),
                });
            }
            let url = format!(
                "{}/{branch}/{repo}/{arch}/{file}",
                self.mirror.trim_end_matches('/')
            );
            let cached = self.cache.join(branch).join(repo).join(arch).join(&file);
            let bytes = match std::fs::read(&cached) {
                Ok(b) if verify_package(&b, e).is_ok() => b,
                _ => {
                    let b = assets::fetch_limited(&url, e.size)?;
                    verify_package(&b, e).map_err(|message| Error::Package {
                        url: url.clone(),
                        message,
                    })?;
                    store_cached(&cached, &b)?;
                    b
                }
            };
            progress.advance(bytes.len() as u64);
            names.push(format!("{}-{}", e.name, e.version));
            repos[i].packages.push((file, bytes));
        }
        progress.finish();
        tracing::info!(
            packages = names.len(),
            signers = ?indexes.iter().map(|(_, i)| i.signer.as_str()).collect::<Vec<_>>(),
            "packages for the card"
        );
        names.sort();
        Ok(CardPackages {
            repositories: repos,
            packages: names,
            extra_keys: extra,
        })
    }
}

fn store_cached(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io("cannot create the package cache", dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(Error::io("cannot create a temporary file in", dir))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(Error::io("cannot write", tmp.path()))?;
    tmp.as_file()
        .sync_all()
        .map_err(Error::io("cannot sync", tmp.path()))?;
    tmp.persist(path)
        .map_err(|e| Error::io("cannot store", path)(e.error))?;
    Ok(())
}

/// `3.23.2` or `3.23` → `v3.23`.
pub fn branch_of(version: &str) -> Option<String> {
    let mut parts = version.split('.');
    let (a, b) = (parts.next()?, parts.next()?);
    (a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok()).then(|| format!("v{a}.{b}"))
}

/// The boot partition's files for `card` (`apks/.boot_repository`,
/// `apks/<arch>/APKINDEX.tar.gz`, the `.apk` files; `apks-<repo>/` for other repositories).
pub fn card_files(card: &CardPackages, arch: &str) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for r in &card.repositories {
        let dir = card_dir(&r.name);
        files.insert(format!("{dir}/.boot_repository"), Vec::new());
        files.insert(format!("{dir}/{arch}/APKINDEX.tar.gz"), r.index.clone());
        for (file, bytes) in &r.packages {
            files.insert(format!("{dir}/{arch}/{file}"), bytes.clone());
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, deps: &[&str], provides: &[&str], install_if: &[&str]) -> IndexEntry {
        IndexEntry {
            name: name.into(),
            version: "1.0-r0".into(),
            arch: "x86_64".into(),
            size: 1,
            checksum: vec![0; 20],
            depends: deps.iter().map(|s| s.to_string()).collect(),
            provides: provides.iter().map(|s| s.to_string()).collect(),
            install_if: install_if.iter().map(|s| s.to_string()).collect(),
            provider_priority: 0,
        }
    }

    fn names(v: Vec<&IndexEntry>) -> Vec<&str> {
        v.into_iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn index_text_parses_into_entries() {
        let text = "C:Q1AAAAAAAAAAAAAAAAAAAAAAAAAAA=\nP:bird\nV:2.17.1-r0\nA:x86_64\nS:123\nD:so:libc.musl-x86_64.so.1 so:libssh.so.4\np:cmd:bird=2.17.1-r0 cmd:birdc=2.17.1-r0\n\nC:Q1AAAAAAAAAAAAAAAAAAAAAAAAAAA=\nP:bird-openrc\nV:2.17.1-r0\nA:x86_64\nS:9\ni:openrc bird=2.17.1-r0\n\n";
        let e = parse_index(text).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, "bird");
        assert_eq!(e[0].size, 123);
        assert_eq!(e[0].depends.len(), 2);
        assert_eq!(e[1].install_if, vec!["openrc", "bird=2.17.1-r0"]);
        assert_eq!(e[0].file_name(), "bird-2.17.1-r0.apk");
        assert!(parse_index("P:x\nV:1\n\n").unwrap_err().contains("lacks"));
    }

    #[test]
    fn dependencies_resolve_by_name_provides_and_install_if_minus_installed() {
        let index = vec![
            entry(
                "bird",
                &["so:libssh.so.4", "so:libc.musl-x86_64.so.1", "!bird1"],
                &[],
                &[],
            ),
            entry(
                "libssh",
                &["so:libcrypto.so.3"],
                &["so:libssh.so.4=4.9"],
                &[],
            ),
            entry("libcrypto3", &[], &["so:libcrypto.so.3=3"], &[]),
            entry("musl", &[], &["so:libc.musl-x86_64.so.1=1"], &[]),
            entry("bird-openrc", &[], &[], &["openrc", "bird=1.0-r0"]),
            entry("bird-doc", &[], &[], &["docs", "bird"]),
            entry("unrelated", &[], &[], &[]),
        ];
        let installed: BTreeSet<String> =
            installed_names("P:musl\nV:1.2\np:so:libc.musl-x86_64.so.1=1\n\nP:openrc\nV:0.6\n");
        let got = resolve(&index, &["bird>=2".to_string()], &installed).unwrap();
        assert_eq!(names(got), ["bird", "bird-openrc", "libcrypto3", "libssh"]);
        let err = resolve(&index, &["nosuch".to_string()], &installed).unwrap_err();
        assert!(err.contains("no package provides `nosuch`"), "{err}");
        let err = resolve(
            &[entry("a", &["so:gone.so"], &[], &[])],
            &["a".into()],
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert!(err.contains("`so:gone.so` (wanted by a)"), "{err}");
    }

    #[test]
    fn an_install_if_package_provided_otherwise_ends_the_resolution() {
        // `x-compat` would be added by install-if, but `y` provides its name already.
        let index = vec![
            entry("y", &[], &["x-compat=1"], &[]),
            entry("x-compat", &[], &[], &["y"]),
        ];
        let got = resolve(&index, &["y".to_string()], &BTreeSet::new()).unwrap();
        assert_eq!(names(got), ["y"]);
    }

    #[test]
    fn newest_version_wins_and_versions_order_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("2.0.12-r0", "2.0.9-r3"), Greater);
        assert_eq!(compare_versions("1.36.1-r2", "1.36.1-r10"), Less);
        assert_eq!(compare_versions("3.0.8-r0", "3.0.8-r0"), Equal);
        let mut old = entry("a", &[], &[], &[]);
        old.version = "1.9-r0".into();
        let mut new = entry("a", &[], &[], &[]);
        new.version = "1.10-r0".into();
        let list = [new.clone(), old];
        let got = resolve(&list, &["a".into()], &BTreeSet::new()).unwrap();
        assert_eq!(got[0].version, "1.10-r0");
    }

    #[test]
    fn gzip_members_split_at_their_boundaries() {
        use std::io::Write as _;
        let gz = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let (a, b) = (gz(b"first"), gz(b"second one"));
        let mut both = a.clone();
        both.extend_from_slice(&b);
        let m = gzip_members(&both, 2, 100).unwrap();
        assert_eq!((m[0].0, m[0].1), (0, a.len()));
        assert_eq!((m[1].0, m[1].1), (a.len(), a.len() + b.len()));
        assert_eq!(m[1].2, b"second one");
        assert!(gzip_members(&both, 1, 3).unwrap_err().contains("larger"));
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *content).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_package_is_checked_by_size_control_checksum_and_datahash() {
        let data = gz(&tar_of(&[("usr/sbin/bird", b"\x7fELF...")]));
        let info = format!(
            "pkgname = bird\npkgver = 2.0.12-r0\ndatahash = {}\n",
            hex::encode(Sha256::digest(&data))
        );
        let control = gz(&tar_of(&[(".PKGINFO", info.as_bytes())]));
        let mut apk = control.clone();
        apk.extend_from_slice(&data);
        let mut e = entry("bird", &[], &[], &[]);
        e.size = apk.len() as u64;
        e.checksum = Sha1::digest(&control).to_vec();
        assert_eq!(verify_package(&apk, &e), Ok(()));
        assert_eq!(
            package_info(&apk),
            Some(("bird".into(), "2.0.12-r0".into()))
        );
        // A signature section first changes nothing.
        let mut signed = gz(&tar_of(&[(".SIGN.RSA.k.rsa.pub", b"sig")]));
        signed.extend_from_slice(&apk);
        let mut es = e.clone();
        es.size = signed.len() as u64;
        assert_eq!(verify_package(&signed, &es), Ok(()));
        let mut bad_data = apk.clone();
        let last = bad_data.len() - 12;
        bad_data[last] ^= 1;
        assert!(verify_package(&bad_data, &e)
            .unwrap_err()
            .contains("datahash"));
        assert!(verify_package(&apk[1..], &e)
            .unwrap_err()
            .contains("the index says"));
        let mut other = e.clone();
        other.checksum = vec![0; 20];
        assert!(verify_package(&apk, &other)
            .unwrap_err()
            .contains("index checksum"));
    }

    #[test]
    fn branch_from_the_release_version() {
        assert_eq!(branch_of("3.23.2").as_deref(), Some("v3.23"));
        assert_eq!(branch_of("3.23").as_deref(), Some("v3.23"));
        assert_eq!(branch_of("local"), None);
    }
}
