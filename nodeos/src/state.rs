//! The node's state directory (default `/var/lib/towalink`) and every change to it.
//!
//! ```text
//! identity/node.toml              node id, names, controller signing key (public)
//! identity/wg_private_key         WireGuard private key (0600)
//! identity/recovery_token         recovery token (0600)
//! identity/wg_keys/<hex>          WireGuard keys `tlm rotate node` sent (0600, newest 4)
//! trusted-keys.toml               controller keys trusted after a signing-key rotation
//! incoming/*.tar.zst              bundles waiting to be installed (from tlm provision, OTA)
//! versions/v<N>/                  installed, verified versions (manifest.toml, manifest.sig, files/)
//! slots/a/, slots/b/              the two slots, each a complete copy of one version
//! slots/a.good | a.pending+2 | a.bad   each slot's marker
//! current -> slots/a              the active slot (symlink, switched by rename)
//! confirm-by                      unix time by which a pending version must be confirmed
//! last-rollback.toml              the last rollback: when, from, to, why
//! last-order.toml                 the last controller order carried out (signed = true since
//!                                 orders are signed; older records are no seq floor)
//! .lock                           one writer at a time (CLI and daemon)
//! ```
//!
//! Every step is ordered so that a crash at any instant leaves exactly one complete version
//! active: a slot is filled beside its place and renamed in, its marker written, and only then
//! is `current` switched by renaming a new symlink over it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use towalink_bundle::messages::Management;
use towalink_bundle::{Manifest, VerifiedBundle};

use crate::slots::{DiskState, Marker, Slot, SlotView};
use crate::Error;

/// How many installed versions are kept besides the ones in the slots.
pub const KEEP_VERSIONS: usize = 10;

/// The controller keys the node trusts after a signing-key rotation (`keys = [...]`, from the
/// last blessed version that listed `signing_keys`); absent: the identity's key.
pub const TRUSTED_KEYS: &str = "trusted-keys.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TrustedKeysFile {
    keys: Vec<String>,
}

/// The management settings that last reached the controller (see
/// [`StateDir::working_management`]).
pub const WORKING_MANAGEMENT: &str = "management.toml";

/// The node's identity (`identity/node.toml`), baked into an image or written by
/// provisioning or attach.
pub type Identity = towalink_bundle::messages::NodeIdentity;

/// The last rollback, kept for `status` and the controller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RollbackRecord {
    pub time: u64,
    pub from_version: Option<u32>,
    pub to_version: Option<u32>,
    pub reason: String,
}

/// `last-order.toml`: the last controller order carried out or refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct OrderRecord {
    seq: u64,
    version: u32,
    result: towalink_bundle::messages::OrderResult,
    time: u64,
    /// Taken from a signed reply (records written before orders were signed lack it).
    #[serde(default)]
    signed: bool,
}

/// Test hook: `TOWALINK_NODE_CRASH_AT=<point>` aborts the process at that step, as a power
/// cut would, so tests can check the disk after every step.
pub fn crash_point(point: &str) {
    if std::env::var("TOWALINK_NODE_CRASH_AT").is_ok_and(|p| p == point) {
        std::process::abort();
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        error: source,
    }
}

/// Writes a file durably: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), Error> {
    Ok(towalink_system::durable::write_atomic(path, content, mode)?)
}

pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    Ok(towalink_system::durable::sync_dir(dir)?)
}

fn remove_tree(path: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("cannot remove", path)(e)),
        _ => Ok(()),
    }
}

/// Writes an unpacked version (manifest, signature, files) into `dir`, every file fsynced.
fn write_version_tree(dir: &Path, bundle: &VerifiedBundle) -> Result<(), Error> {
    remove_tree(dir)?;
    std::fs::create_dir_all(dir.join("files")).map_err(io("cannot create", dir))?;
    let mut dirs = std::collections::BTreeSet::new();
    dirs.insert(dir.to_path_buf());
    dirs.insert(dir.join("files"));
    let mut write = |path: PathBuf, content: &[u8]| -> Result<(), Error> {
        if let Some(parent) = path.parent() {
            if dirs.insert(parent.to_path_buf()) {
                std::fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
            }
        }
        let mut file = std::fs::File::create(&path).map_err(io("cannot create", &path))?;
        file.write_all(content).map_err(io("cannot write", &path))
    };
    write(
        dir.join(towalink_bundle::MANIFEST_NAME),
        bundle.manifest_text().as_bytes(),
    )?;
    write(
        dir.join(towalink_bundle::SIGNATURE_NAME),
        bundle.signature_text().as_bytes(),
    )?;
    for (path, content) in bundle.files() {
        write(dir.join("files").join(path), content)?;
    }
    // One syncfs for the whole tree instead of an fsync per file: the tree is renamed into
    // place only after this returns.
    sync_filesystem(dir)
}

/// Flushes the filesystem holding `path` (`syncfs(2)`).
pub fn sync_filesystem(path: &Path) -> Result<(), Error> {
    Ok(towalink_system::durable::sync_filesystem(path)?)
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Held while the state is changed; the CLI and the daemon take it alike.
pub struct StateLock {
    _lock: towalink_system::lock::FileLock,
}

/// Whether an install may take a version older than the newest installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Older {
    /// No: mirroring, `incoming/`, a plain `towalink-node install`.
    Refuse,
    /// Only this version, which a signed controller order names.
    Named(u32),
    /// The operator said so (`towalink-node install --allow-older`).
    Operator,
}

/// Outcome of an install.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    New(u32),
    AlreadyPresent(u32),
}

impl StateDir {
    pub fn new(root: &Path) -> StateDir {
        StateDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.root.join("slots").join(slot.name())
    }

    pub fn version_dir(&self, version: u32) -> PathBuf {
        self.root.join("versions").join(format!("v{version}"))
    }

    pub fn lock(&self) -> Result<StateLock, Error> {
        std::fs::create_dir_all(&self.root).map_err(io("cannot create", &self.root))?;
        let _lock = towalink_system::lock::lock_exclusive(&self.path(".lock"))?;
        Ok(StateLock { _lock })
    }

    pub fn identity(&self) -> Result<Identity, Error> {
        let path = self.path(towalink_bundle::identity::NODE_TOML);
        let text = std::fs::read_to_string(&path).map_err(io("cannot read identity", &path))?;
        toml::from_str(&text).map_err(|e| Error::Corrupt {
            path,
            message: e.message().to_string(),
        })
    }

    /// The controller keys this node trusts: those the last blessed version that named any
    /// listed ([`TRUSTED_KEYS`]), else its identity's `controller_key`. A trust file that
    /// cannot be read refuses everything (it is never guessed).
    pub fn trusted_keys(
        &self,
        identity: &Identity,
    ) -> Result<Vec<ed25519_dalek_key::VerifyingKey>, Error> {
        let path = self.path(TRUSTED_KEYS);
        let corrupt = |path: PathBuf, message: &str| Error::Corrupt {
            path,
            message: message.into(),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: TrustedKeysFile =
                    toml::from_str(&text).map_err(|e| corrupt(path.clone(), e.message()))?;
                let keys: Result<Vec<_>, _> = file
                    .keys
                    .iter()
                    .map(|k| towalink_bundle::verifying_key_from_base64(k))
                    .collect();
                match keys {
                    Ok(keys) if !keys.is_empty() => Ok(keys),
                    _ => Err(corrupt(path, "`keys` must list base64 ed25519 public keys")),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = towalink_bundle::verifying_key_from_base64(&identity.controller_key)
                    .map_err(|_| {
                        corrupt(
                            self.path(towalink_bundle::identity::NODE_TOML),
                            "controller_key is not a base64 ed25519 public key",
                        )
                    })?;
                Ok(vec![key])
            }
            Err(e) => Err(io("cannot read", &path)(e)),
        }
    }

    /// [`StateDir::trust_blessed`] for a slot already good (at startup), logging a failure.
    pub fn retrust_blessed(&self, slot: Slot) {
        if let Err(error) = self.trust_blessed(slot) {
            tracing::error!(%error, "cannot take the blessed version's signing keys");
        }
    }

    /// A version in `slot` was blessed: when it lists `signing_keys`, they become the keys
    /// this node trusts (`tlm rotate signing-key`).
    fn trust_blessed(&self, slot: Slot) -> Result<(), Error> {
        let bundle = self.slot_bundle(slot)?;
        let config = towalink_bundle::contract::NodeConfig::of(&bundle)?;
        if config.signing_keys.is_empty() {
            return Ok(());
        }
        let file = TrustedKeysFile {
            keys: config.signing_keys,
        };
        if std::fs::read_to_string(self.path(TRUSTED_KEYS))
            .ok()
            .and_then(|t| toml::from_str::<TrustedKeysFile>(&t).ok())
            .is_some_and(|old| old == file)
        {
            return Ok(());
        }
        let text = toml::to_string(&file).expect("trusted keys serialize");
        write_atomic(&self.path(TRUSTED_KEYS), text.as_bytes(), 0o644)?;
        tracing::info!(keys = %file.keys.join(","), version = bundle.manifest().version, "the blessed version names the controller keys to trust: trusting these now");
        Ok(())
    }

    /// Verifies a bundle and stores its version. Nothing changes when it is refused.
    ///
    /// Anti-rollback: a version lower than the highest one installed (which pruning never
    /// removes, so it is the highest ever installed) is refused unless `named` is that version:
    /// a signed controller order names it, or the operator installs it by hand with
    /// `--allow-older`. A replayed old bundle alone is never installed again.
    pub fn install(&self, bytes: &[u8], older: Older) -> Result<Installed, Error> {
        let bundle = self.verify(bytes)?;
        self.install_verified(&bundle, older)
    }

    /// Verifies a bundle against this node's identity (controller key, node id).
    pub fn verify(&self, bytes: &[u8]) -> Result<VerifiedBundle, Error> {
        self.verify_reader(bytes, &towalink_bundle::Meter::default())
    }

    /// [`StateDir::verify`] reading the bundle from a stream (a download), so an unsigned one
    /// is refused after its first bytes.
    pub fn verify_reader(
        &self,
        reader: impl std::io::Read,
        meter: &towalink_bundle::Meter,
    ) -> Result<VerifiedBundle, Error> {
        let identity = self.identity()?;
        let key = self.trusted_keys(&identity)?;
        Ok(towalink_bundle::verify_reader(
            reader,
            &key,
            identity.node_id,
            meter,
        )?)
    }

    /// Stores a verified version whose contract this node understands, under the anti-rollback
    /// rule of [`StateDir::install`].
    pub fn install_verified(
        &self,
        bundle: &VerifiedBundle,
        older: Older,
    ) -> Result<Installed, Error> {
        let version = bundle.manifest().version;
        // A version this node cannot act on (a newer contract, an invalid node.toml) is
        // refused here, before it is stored, never at activation.
        towalink_bundle::contract::NodeConfig::of(bundle)?;
        let dir = self.version_dir(version);
        if dir.exists() {
            let existing = std::fs::read_to_string(dir.join(towalink_bundle::MANIFEST_NAME))
                .map_err(io("cannot read", &dir))?;
            if existing == bundle.manifest_text() {
                return Ok(Installed::AlreadyPresent(version));
            }
            return Err(Error::VersionConflict(version));
        }
        if let Some(&highest) = self.versions()?.last() {
            let allowed = match older {
                Older::Refuse => false,
                Older::Named(named) => named == version,
                Older::Operator => true,
            };
            if version < highest && !allowed {
                return Err(Error::Older { version, highest });
            }
        }
        let versions = self.path("versions");
        std::fs::create_dir_all(&versions).map_err(io("cannot create", &versions))?;
        let temp = versions.join(format!(".v{version}.tmp"));
        write_version_tree(&temp, bundle)?;
        crash_point("install-written");
        std::fs::rename(&temp, &dir).map_err(io("cannot rename", &temp))?;
        sync_dir(&versions)?;
        crash_point("install-renamed");
        self.prune(version)?;
        Ok(Installed::New(version))
    }

    /// Installed versions, ascending.
    pub fn versions(&self) -> Result<Vec<u32>, Error> {
        let dir = self.path("versions");
        let mut versions = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(versions),
            Err(e) => return Err(io("cannot read", &dir)(e)),
        };
        for entry in entries.flatten() {
            if let Some(v) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.parse().ok())
            {
                versions.push(v);
            }
        }
        versions.sort_unstable();
        Ok(versions)
    }

    /// Keeps the newest installed versions, any version in a slot, and the one just installed.
    fn prune(&self, just_installed: u32) -> Result<(), Error> {
        let state = self.read()?;
        let in_slots = [state.a.version, state.b.version, Some(just_installed)];
        let versions = self.versions()?;
        let excess = versions.len().saturating_sub(KEEP_VERSIONS);
        for v in versions.into_iter().take(excess) {
            if !in_slots.contains(&Some(v)) {
                remove_tree(&self.version_dir(v))?;
            }
        }
        // Leftovers of interrupted installs.
        if let Ok(entries) = std::fs::read_dir(self.path("versions")) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    remove_tree(&e.path())?;
                }
            }
        }
        Ok(())
    }

    /// Reads and re-verifies a stored version (signature, node id, hashes).
    pub fn load_version_tree(&self, dir: &Path) -> Result<VerifiedBundle, Error> {
        let identity = self.identity()?;
        let key = self.trusted_keys(&identity)?;
        let manifest_text = std::fs::read_to_string(dir.join(towalink_bundle::MANIFEST_NAME))
            .map_err(io("cannot read", dir))?;
        let signature_text = std::fs::read_to_string(dir.join(towalink_bundle::SIGNATURE_NAME))
            .map_err(io("cannot read", dir))?;
        let manifest: Manifest = toml::from_str(&manifest_text).map_err(|e| Error::Corrupt {
            path: dir.join(towalink_bundle::MANIFEST_NAME),
            message: e.message().to_string(),
        })?;
        let mut files = BTreeMap::new();
        for entry in &manifest.files {
            towalink_bundle::check_relative_path(&entry.path)?;
            let path = dir.join("files").join(&entry.path);
            files.insert(
                entry.path.clone(),
                std::fs::read(&path).map_err(io("cannot read", &path))?,
            );
        }
        Ok(towalink_bundle::verify_parts(
            manifest_text,
            signature_text,
            files,
            &key,
            identity.node_id,
        )?)
    }

    fn marker(&self, slot: Slot) -> Option<Marker> {
        let entries = std::fs::read_dir(self.path("slots")).ok()?;
        let prefix = format!("{}.", slot.name());
        entries.flatten().find_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|s| s.parse().ok())
        })
    }

    fn marker_path(&self, slot: Slot, marker: Marker) -> PathBuf {
        self.path("slots")
            .join(format!("{}.{}", slot.name(), marker.suffix()))
    }

    /// The version in a slot, if the slot holds a complete, verified one.
    fn slot_version(&self, slot: Slot) -> Option<u32> {
        match self.load_version_tree(&self.slot_dir(slot)) {
            Ok(bundle) => Some(bundle.manifest().version),
            Err(_) => None,
        }
    }

    pub fn current(&self) -> Option<Slot> {
        let target = std::fs::read_link(self.path("current")).ok()?;
        match target.to_str()? {
            "slots/a" => Some(Slot::A),
            "slots/b" => Some(Slot::B),
            _ => None,
        }
    }

    /// Reads the slot state from disk.
    pub fn read(&self) -> Result<DiskState, Error> {
        let confirm_by = std::fs::read_to_string(self.path("confirm-by"))
            .ok()
            .and_then(|t| t.trim().parse().ok());
        Ok(DiskState {
            current: self.current(),
            a: SlotView {
                version: self.slot_version(Slot::A),
                marker: self.marker(Slot::A),
            },
            b: SlotView {
                version: self.slot_version(Slot::B),
                marker: self.marker(Slot::B),
            },
            confirm_by,
        })
    }

    /// The manifest of the version in a slot.
    pub fn slot_bundle(&self, slot: Slot) -> Result<VerifiedBundle, Error> {
        self.load_version_tree(&self.slot_dir(slot))
    }

    /// The manifest of the version in a slot, if the slot holds a complete one.
    pub fn slot_manifest(&self, slot: Slot) -> Option<Manifest> {
        self.slot_bundle(slot).ok().map(|b| b.manifest().clone())
    }

    pub fn slot_files_dir(&self, slot: Slot) -> PathBuf {
        self.slot_dir(slot).join("files")
    }

    /// Copies an installed version into a slot (beside it, then renamed in), with its marker.
    pub fn fill_slot(&self, slot: Slot, version: u32, marker: Marker) -> Result<(), Error> {
        let bundle = self.load_version_tree(&self.version_dir(version))?;
        let slots = self.path("slots");
        std::fs::create_dir_all(&slots).map_err(io("cannot create", &slots))?;
        // The slot stops being a valid fallback first: drop its marker.
        if let Some(old) = self.marker(slot) {
            let path = self.marker_path(slot, old);
            std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
            sync_dir(&slots)?;
        }
        crash_point("fill-marker-removed");
        let temp = slots.join(format!("{}.tmp", slot.name()));
        write_version_tree(&temp, &bundle)?;
        crash_point("fill-written");
        let dir = self.slot_dir(slot);
        let old = slots.join(format!("{}.old", slot.name()));
        remove_tree(&old)?;
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(io("cannot rename", &dir))?;
        }
        std::fs::rename(&temp, &dir).map_err(io("cannot rename", &temp))?;
        sync_dir(&slots)?;
        remove_tree(&old)?;
        crash_point("fill-renamed");
        let path = self.marker_path(slot, marker);
        write_atomic(&path, b"", 0o644)?;
        if marker == Marker::Good {
            // The version is good whatever happens here; the trust stays as it was.
            if let Err(error) = self.trust_blessed(slot) {
                tracing::error!(%error, "cannot take the blessed version's signing keys");
            }
        }
        crash_point("fill-marked");
        Ok(())
    }

    /// Changes a slot's marker by one atomic rename.
    pub fn set_marker(&self, slot: Slot, marker: Marker) -> Result<(), Error> {
        let to = self.marker_path(slot, marker);
        match self.marker(slot) {
            Some(old) if old == marker => return Ok(()),
            Some(old) => {
                let from = self.marker_path(slot, old);
                std::fs::rename(&from, &to).map_err(io("cannot rename", &from))?;
                sync_dir(&self.path("slots"))?;
            }
            None => write_atomic(&to, b"", 0o644)?,
        }
        if marker == Marker::Good {
            // The version is good whatever happens here; the trust stays as it was.
            if let Err(error) = self.trust_blessed(slot) {
                tracing::error!(%error, "cannot take the blessed version's signing keys");
            }
        }
        Ok(())
    }

    /// Points `current` at a slot: a new symlink renamed over the old one.
    pub fn switch_current(&self, slot: Slot) -> Result<(), Error> {
        let temp = self.path(".current.tmp");
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(format!("slots/{}", slot.name()), &temp)
            .map_err(io("cannot create symlink", &temp))?;
        let current = self.path("current");
        std::fs::rename(&temp, &current).map_err(io("cannot switch", &current))?;
        sync_dir(&self.root)
    }

    pub fn set_confirm_by(&self, deadline: Option<u64>) -> Result<(), Error> {
        let path = self.path("confirm-by");
        match deadline {
            Some(t) => write_atomic(&path, format!("{t}\n").as_bytes(), 0o644),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io("cannot remove", &path)(e))
                }
                _ => sync_dir(&self.root),
            },
        }
    }

    pub fn last_rollback(&self) -> Option<RollbackRecord> {
        let text = std::fs::read_to_string(self.path("last-rollback.toml")).ok()?;
        toml::from_str(&text).ok()
    }

    pub fn record_rollback(&self, record: &RollbackRecord) -> Result<(), Error> {
        let path = self.path("last-rollback.toml");
        let text = toml::to_string(record).map_err(|e| Error::Corrupt {
            path: path.clone(),
            message: format!("cannot serialize the rollback record: {e}"),
        })?;
        write_atomic(&path, text.as_bytes(), 0o644)
    }

    /// The management settings that last reached the controller (`management.toml`, written
    /// after a sync through them succeeded), else the identity's. A file that cannot be read
    /// falls back to the identity (logged): it never leaves the node without a way back.
    pub fn working_management(&self) -> Option<Management> {
        let path = self.path(WORKING_MANAGEMENT);
        // An identity written after the file (provisioned or attached again, perhaps for
        // another controller) wins over settings that worked for the one before.
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(identity), Some(working)) = (
            modified(&self.path(towalink_bundle::identity::NODE_TOML)),
            modified(&path),
        ) {
            if identity > working {
                return self.identity().ok()?.management;
            }
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => match toml::from_str::<Management>(&text) {
                Ok(management) => return Some(management),
                Err(error) => tracing::error!(
                    path = %path.display(),
                    error = %error.message(),
                    "unreadable; using the identity's management settings"
                ),
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot read; using the identity's management settings")
            }
        }
        self.identity().ok()?.management
    }

    /// Records settings that reached the controller, durably.
    pub fn save_working_management(&self, management: &Management) -> Result<(), Error> {
        let path = self.path(WORKING_MANAGEMENT);
        let text = toml::to_string(management).map_err(|e| Error::Corrupt {
            path: path.clone(),
            message: format!("cannot serialize the management settings: {e}"),
        })?;
        write_atomic(&path, text.as_bytes(), 0o644)
    }

    /// `last-order.toml` as written; none when missing or unreadable (a corrupt record is no
    /// reason to stop taking orders).
    fn last_order_record(&self) -> Option<OrderRecord> {
        let text = std::fs::read_to_string(self.path("last-order.toml")).ok()?;
        toml::from_str(&text).ok()
    }

    /// The last controller order this node carried out or refused, as it reports it. A record
    /// from before signed orders with a seq no controller issues (above
    /// [`towalink_bundle::orders::MAX_ORDER_SEQ`]: an attacker's) is not reported.
    pub fn last_order(&self) -> Option<towalink_bundle::messages::OrderOutcome> {
        let record = self.last_order_record()?;
        let reported = record.signed || record.seq <= towalink_bundle::orders::MAX_ORDER_SEQ;
        reported.then_some(towalink_bundle::messages::OrderOutcome {
            seq: record.seq,
            version: record.version,
            result: record.result,
            time: record.time,
        })
    }

    /// What new orders are judged against: see [`towalink_bundle::orders::LastOrder`].
    pub fn last_order_floor(&self) -> towalink_bundle::orders::LastOrder {
        use towalink_bundle::orders::LastOrder;
        match self.last_order_record() {
            None => LastOrder::None,
            Some(r) if r.signed && r.seq <= towalink_bundle::orders::MAX_ORDER_SEQ => {
                LastOrder::Signed { seq: r.seq }
            }
            Some(r) => LastOrder::Legacy {
                seq: r.seq,
                version: r.version,
            },
        }
    }

    /// Records an order from a signed reply.
    pub fn record_order(
        &self,
        outcome: &towalink_bundle::messages::OrderOutcome,
    ) -> Result<(), Error> {
        let path = self.path("last-order.toml");
        let record = OrderRecord {
            seq: outcome.seq,
            version: outcome.version,
            result: outcome.result.clone(),
            time: outcome.time,
            signed: true,
        };
        let text = toml::to_string(&record).map_err(|e| Error::Corrupt {
            path: path.clone(),
            message: format!("cannot serialize the order record: {e}"),
        })?;
        write_atomic(&path, text.as_bytes(), 0o644)
    }

    /// Bundles waiting in `incoming/`, oldest name first.
    pub fn incoming(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.path("incoming"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "zst"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

/// Re-exported so callers need not depend on ed25519-dalek themselves.
mod ed25519_dalek_key {
    pub use towalink_bundle::VerifyingKey;
}

#[cfg(test)]
mod tests {
    use super::*;
    use towalink_bundle::messages::{Order, OrderOutcome};
    use towalink_bundle::orders::{judge_order, LastOrder, OrderVerdict};
    use towalink_bundle::{FileEntry, SigningKey};

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    fn state() -> (tempfile::TempDir, StateDir) {
        let temp = tempfile::tempdir().unwrap();
        let state = StateDir::new(temp.path());
        let identity = Identity {
            node_id: 3,
            site: "s".into(),
            node: "r".into(),
            controller_key: towalink_bundle::verifying_key_to_base64(&key().verifying_key()),
            wg_public_key: "p".into(),
            management: None,
        };
        std::fs::create_dir_all(temp.path().join("identity")).unwrap();
        std::fs::write(
            temp.path().join("identity/node.toml"),
            toml::to_string(&identity).unwrap(),
        )
        .unwrap();
        (temp, state)
    }

    fn bundle(version: u32) -> Vec<u8> {
        bundle_with(version, "f", format!("version {version}\n").into_bytes())
    }

    fn bundle_with(version: u32, path: &str, content: Vec<u8>) -> Vec<u8> {
        let manifest = Manifest {
            format: towalink_bundle::FORMAT,
            node_id: 3,
            site: "s".into(),
            node: "r".into(),
            version,
            parent: None,
            created: "2026-12-01T00:00:00Z".into(),
            services: BTreeMap::new(),
            files: vec![FileEntry {
                path: path.into(),
                target: None,
                mode: "0644".into(),
                sha256: towalink_bundle::sha256_hex(&content),
                service: None,
                size: None,
            }],
        };
        towalink_bundle::build(&manifest, &BTreeMap::from([(path.into(), content)]), &key())
            .unwrap()
    }

    #[test]
    fn working_management_settings_win_until_the_identity_is_written_again() {
        let (temp, state) = state();
        let management = towalink_bundle::test_support::management;
        let write_identity = |endpoint: &str| {
            let mut identity = state.identity().unwrap();
            identity.management = Some(management(endpoint));
            std::fs::write(
                temp.path().join("identity/node.toml"),
                toml::to_string(&identity).unwrap(),
            )
            .unwrap();
        };
        let set_mtime = |relative: &str, seconds: u64| {
            std::fs::File::options()
                .write(true)
                .open(temp.path().join(relative))
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
                .unwrap();
        };
        write_identity("first:1");
        assert_eq!(state.working_management(), Some(management("first:1")));
        state
            .save_working_management(&management("moved:1"))
            .unwrap();
        set_mtime("identity/node.toml", 1_000);
        set_mtime(WORKING_MANAGEMENT, 2_000);
        assert_eq!(state.working_management(), Some(management("moved:1")));
        // Provisioned again (for another controller): the identity's settings.
        write_identity("other:1");
        set_mtime("identity/node.toml", 3_000);
        assert_eq!(state.working_management(), Some(management("other:1")));
    }

    #[test]
    fn a_version_needing_a_newer_contract_is_refused_at_install_and_not_stored() {
        let (temp, state) = state();
        let node_toml = towalink_bundle::contract::NODE_TOML;
        let newer = bundle_with(7, node_toml, b"contract = 3\n".to_vec());
        let refused = state.install(&newer, Older::Refuse).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "version v7 needs node contract 3; this node understands up to 2: upgrade towalink-node"
        );
        assert_eq!(state.versions().unwrap(), Vec::<u32>::new());
        assert!(!temp.path().join("versions/v7").exists());
        // So is one whose node.toml this node cannot act on.
        let invalid = bundle_with(7, node_toml, b"node_health_checks = [\"bogus\"]\n".to_vec());
        let refused = state
            .install(&invalid, Older::Refuse)
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("version v7 has an invalid `towalink/node.toml`: line 1: `node_health_checks` unknown variant `bogus`"),
            "{refused}"
        );
        // The contract it understands is taken, as is node.toml as earlier controllers wrote it.
        let today = include_bytes!("../../tests/fixtures/node-toml-contract1/r1.s1.toml");
        assert_eq!(
            state
                .install(&bundle_with(7, node_toml, today.to_vec()), Older::Refuse)
                .unwrap(),
            Installed::New(7)
        );
        let explicit = bundle_with(8, node_toml, b"contract = 1\n".to_vec());
        assert_eq!(
            state.install(&explicit, Older::Refuse).unwrap(),
            Installed::New(8)
        );
    }

    #[test]
    fn a_replayed_old_bundle_is_installed_only_when_an_order_names_it() {
        let (_temp, state) = state();
        for v in 4..=13 {
            assert_eq!(
                state.install(&bundle(v), Older::Refuse).unwrap(),
                Installed::New(v)
            );
        }
        // v1, long pruned on a real node (here never installed), replayed: refused.
        assert!(matches!(
            state.install(&bundle(1), Older::Refuse),
            Err(Error::Older {
                version: 1,
                highest: 13
            })
        ));
        assert!(matches!(
            state.install(&bundle(1), Older::Named(2)),
            Err(Error::Older { .. })
        ));
        assert_eq!(state.versions().unwrap(), (4..=13).collect::<Vec<_>>());
        // An installed version sent again stays a no-op.
        assert_eq!(
            state.install(&bundle(5), Older::Refuse).unwrap(),
            Installed::AlreadyPresent(5)
        );
        // A signed order naming v1, or the operator, installs it.
        assert_eq!(
            state.install(&bundle(1), Older::Named(1)).unwrap(),
            Installed::New(1)
        );
        assert_eq!(
            state.install(&bundle(2), Older::Operator).unwrap(),
            Installed::New(2)
        );
        // Newer versions need no one's word.
        assert_eq!(
            state.install(&bundle(14), Older::Refuse).unwrap(),
            Installed::New(14)
        );
    }

    fn order(seq: u64, version: u32) -> Order {
        Order {
            seq,
            version,
            confirm_s: None,
        }
    }

    #[test]
    fn a_huge_seq_left_by_an_unsigned_order_does_not_wedge_the_node() {
        let (temp, state) = state();
        // What the attack left (written by a node before signed orders).
        std::fs::write(
            temp.path().join("last-order.toml"),
            "seq = 9223372036854775807\nversion = 1\nresult = \"activated\"\ntime = 1\n",
        )
        .unwrap();
        assert_eq!(state.last_order(), None, "not reported to the controller");
        let floor = state.last_order_floor();
        assert_eq!(
            judge_order(&order(3, 2), floor),
            Ok(OrderVerdict::New),
            "the controller's next genuine order runs"
        );
        state
            .record_order(&OrderOutcome {
                seq: 3,
                version: 2,
                result: "activated".into(),
                time: 2,
            })
            .unwrap();
        assert_eq!(state.last_order_floor(), LastOrder::Signed { seq: 3 });
        assert_eq!(
            judge_order(&order(3, 2), state.last_order_floor()),
            Ok(OrderVerdict::Done)
        );
        assert_eq!(state.last_order().map(|o| o.seq), Some(3));

        // A genuine record from before signed orders stops that same order from running again.
        std::fs::write(
            temp.path().join("last-order.toml"),
            "seq = 7\nversion = 4\nresult = \"activated\"\ntime = 1\n",
        )
        .unwrap();
        assert_eq!(state.last_order().map(|o| o.seq), Some(7));
        assert_eq!(
            judge_order(&order(7, 4), state.last_order_floor()),
            Ok(OrderVerdict::Done)
        );
        // A corrupt record is no record.
        std::fs::write(temp.path().join("last-order.toml"), "seq = \"x").unwrap();
        assert_eq!(state.last_order_floor(), LastOrder::None);
    }

    #[test]
    fn records_that_cannot_be_written_are_errors_not_panics() {
        let (_temp, state) = state();
        // TOML integers are i64: the second huge seq of the attack panicked here before.
        let refused = state.record_order(&OrderOutcome {
            seq: u64::MAX,
            version: 1,
            result: "activated".into(),
            time: 0,
        });
        assert!(matches!(refused, Err(Error::Corrupt { .. })), "{refused:?}");
        let refused = state.record_rollback(&RollbackRecord {
            time: u64::MAX,
            from_version: None,
            to_version: None,
            reason: String::new(),
        });
        assert!(matches!(refused, Err(Error::Corrupt { .. })), "{refused:?}");
    }
}
