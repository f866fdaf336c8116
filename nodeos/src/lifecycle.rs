//! The executor: carries out what the slot planner decides (install, activate, bless, roll
//! back, start) on the state directory and the root, under the state lock.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use towalink_bundle::messages::{Management, SlotState};

use crate::apply::{apply, ApplyReport, Reloader};
use crate::health::{evaluate, CheckResult, LifecycleSettings};
use crate::slots::{plan_activation, plan_startup, DiskState, Marker, Slot, StartupAction};
use crate::state::{crash_point, now, Installed, Older, RollbackRecord, StateDir};
use crate::Error;

/// How many keys the keyring keeps ([`Node::take_wireguard_key`]): the current one and the
/// ones older versions (a rollback) may still name.
pub const KEYRING_KEEP: usize = 4;

/// Which version to activate (the same rule as `tlm`'s).
pub use towalink_bundle::args::VersionSpec;

/// A node: its state directory, the root its files go to, and how it reloads services.
#[derive(Debug, Clone)]
pub struct Node {
    pub state: StateDir,
    pub root: PathBuf,
    pub reloader: Reloader,
    /// What this process counted (shared by the clones: the daemon's threads).
    pub counters: Arc<Counters>,
}

/// Why a version was rolled back: the `reason` label of `towalink_node_rollbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackCause {
    /// Its files could not be applied.
    ApplyFailed,
    /// It used up its boot tries without being blessed (a power cut, a hang).
    BootTries,
    /// Its confirm timer expired.
    ConfirmTimer,
    /// It did not pass its health checks in time.
    HealthChecks,
    /// `towalink-node mark-bad`.
    Operator,
    /// The slot was found bad, unmarked or incomplete at start.
    BrokenSlot,
}

impl RollbackCause {
    pub const ALL: [RollbackCause; 6] = [
        RollbackCause::ApplyFailed,
        RollbackCause::BootTries,
        RollbackCause::ConfirmTimer,
        RollbackCause::HealthChecks,
        RollbackCause::Operator,
        RollbackCause::BrokenSlot,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RollbackCause::ApplyFailed => "apply_failed",
            RollbackCause::BootTries => "boot_tries",
            RollbackCause::ConfirmTimer => "confirm_timer",
            RollbackCause::HealthChecks => "health_checks",
            RollbackCause::Operator => "operator",
            RollbackCause::BrokenSlot => "broken_slot",
        }
    }

    /// Why a start rolls `slot` back, from its marker.
    fn at_startup(disk: &DiskState, slot: Slot) -> RollbackCause {
        match disk.slot(slot).marker {
            Some(Marker::Pending { tries_left: 0 }) => RollbackCause::BootTries,
            Some(Marker::Pending { .. }) => RollbackCause::ConfirmTimer,
            _ => RollbackCause::BrokenSlot,
        }
    }
}

/// What this process counted since it started (the daemon's metrics: docs/operations.md).
#[derive(Debug, Default)]
pub struct Counters {
    rollbacks: [AtomicU64; RollbackCause::ALL.len()],
    applies: AtomicU64,
    /// The last apply's duration in microseconds.
    last_apply_us: AtomicU64,
}

impl Counters {
    pub fn rollbacks(&self, cause: RollbackCause) -> u64 {
        self.rollbacks[cause as usize].load(Ordering::Relaxed)
    }

    /// How many applies ran and how long the last one took.
    pub fn applies(&self) -> (u64, f64) {
        (
            self.applies.load(Ordering::Relaxed),
            self.last_apply_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }

    fn count_rollback(&self, cause: RollbackCause) {
        self.rollbacks[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn count_apply(&self, took: std::time::Duration) {
        self.applies.fetch_add(1, Ordering::Relaxed);
        self.last_apply_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// What an activation did.
#[derive(Debug, Serialize)]
pub struct ActivationReport {
    pub version: u32,
    pub slot: String,
    pub tries: u32,
    pub confirm_by: Option<u64>,
    pub apply: ApplyReport,
    /// Milliseconds from the start of the activation to the end of apply, BIRD's own reload
    /// time excluded.
    pub activation_ms: f64,
}

/// What `status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub node: String,
    pub node_id: u32,
    pub active_version: Option<u32>,
    pub active_slot: Option<String>,
    pub state: Option<SlotState>,
    pub tries_left: Option<u32>,
    pub confirm_by: Option<u64>,
    pub last_good_version: Option<u32>,
    pub last_good_slot: Option<String>,
    pub installed_versions: Vec<u32>,
    pub health: Vec<CheckResult>,
    pub last_rollback: Option<RollbackRecord>,
}

/// The daemon's watch over a pending version.
#[derive(Debug, Default)]
pub struct Watch {
    watching: Option<(Slot, u32, Instant)>,
}

impl Node {
    pub fn new(state_dir: &Path, root: &Path, reloader: Reloader) -> Node {
        Node {
            state: StateDir::new(state_dir),
            root: root.to_path_buf(),
            reloader,
            counters: Arc::default(),
        }
    }

    /// Applies a version's files, timing it for the metrics.
    fn apply_timed(
        &self,
        bundle: &towalink_bundle::VerifiedBundle,
        previous: Option<&towalink_bundle::Manifest>,
    ) -> Result<ApplyReport, Error> {
        let started = Instant::now();
        let report = apply(bundle, previous, &self.root, &self.reloader);
        self.counters.count_apply(started.elapsed());
        report
    }

    /// Verifies and stores a bundle; a version older than the newest installed only as
    /// `older` allows (see [`StateDir::install`]).
    pub fn install(&self, bytes: &[u8], older: Older) -> Result<Installed, Error> {
        let _lock = self.state.lock()?;
        self.state.install(bytes, older)
    }

    /// Stores a bundle verified already (a download verified as it streamed in).
    pub fn install_verified(
        &self,
        bundle: &towalink_bundle::VerifiedBundle,
        older: Older,
    ) -> Result<Installed, Error> {
        let _lock = self.state.lock()?;
        self.state.install_verified(bundle, older)
    }

    fn resolve_version(&self, spec: VersionSpec) -> Result<u32, Error> {
        let versions = self.state.versions()?;
        match spec {
            VersionSpec::Latest => versions.last().copied().ok_or(Error::NoVersions),
            VersionSpec::Number(n) if versions.contains(&n) => Ok(n),
            VersionSpec::Number(n) => Err(Error::UnknownVersion {
                version: n,
                installed: versions,
            }),
        }
    }

    /// Activates a version: fill the other slot, switch `current`, apply; the version is left
    /// pending (with a confirm deadline when `confirm_s` is given).
    pub fn activate(
        &self,
        spec: VersionSpec,
        confirm_s: Option<u64>,
    ) -> Result<ActivationReport, Error> {
        let started = Instant::now();
        let _lock = self.state.lock()?;
        let version = self.resolve_version(spec)?;
        let disk = self.state.read()?;
        let slot = plan_activation(&disk, version)?;
        let bundle = self
            .state
            .load_version_tree(&self.state.version_dir(version))?;
        let settings = LifecycleSettings::from_bundle(&bundle)?;
        let previous = disk.current.and_then(|s| self.state.slot_manifest(s));
        self.state.fill_slot(
            slot,
            version,
            Marker::Pending {
                tries_left: settings.boot_tries,
            },
        )?;
        let confirm_by = confirm_s.map(|s| now().saturating_add(s));
        self.state.set_confirm_by(confirm_by)?;
        crash_point("activate-before-switch");
        self.state.switch_current(slot)?;
        crash_point("activate-switched");
        tracing::info!(version, %slot, "activated; applying");
        let bundle = self.state.slot_bundle(slot)?;
        match self.apply_timed(&bundle, previous.as_ref()) {
            Ok(report) => {
                let activation_ms =
                    started.elapsed().as_secs_f64() * 1000.0 - report.bird_reload_ms;
                Ok(ActivationReport {
                    version,
                    slot: slot.to_string(),
                    tries: settings.boot_tries,
                    confirm_by,
                    apply: report,
                    activation_ms,
                })
            }
            Err(error) => {
                let reason = format!("apply of v{version} failed: {error}");
                tracing::error!(%reason);
                self.roll_back_locked(slot, RollbackCause::ApplyFailed, &reason)?;
                Err(Error::RolledBack(reason))
            }
        }
    }

    /// Goes back to the other slot (which must hold a good version), applies it, records why.
    fn roll_back_locked(
        &self,
        from: Slot,
        cause: RollbackCause,
        reason: &str,
    ) -> Result<Option<ApplyReport>, Error> {
        let disk = self.state.read()?;
        let to = from.other();
        let from_version = disk.slot(from).version;
        let to_version = disk.slot(to).version;
        let has_fallback = to_version.is_some() && disk.slot(to).marker == Some(Marker::Good);
        // Marking the slot bad is the decisive step: from here on every start finishes the
        // rollback. A rollback resumed after a crash keeps the reason first recorded.
        let resumed = disk.slot(from).marker == Some(Marker::Bad)
            && self
                .state
                .last_rollback()
                .is_some_and(|r| r.from_version == from_version);
        self.state.set_marker(from, Marker::Bad)?;
        crash_point("rollback-marked-bad");
        if !resumed {
            self.state.record_rollback(&RollbackRecord {
                time: now(),
                from_version,
                to_version: if has_fallback { to_version } else { None },
                reason: reason.to_string(),
            })?;
            self.counters.count_rollback(cause);
        }
        crash_point("rollback-recorded");
        if !has_fallback {
            tracing::error!(
                reason,
                "no good version to roll back to; keeping the current one"
            );
            return Ok(None);
        }
        self.state.switch_current(to)?;
        self.state.set_confirm_by(None)?;
        crash_point("rollback-switched");
        tracing::warn!(from = ?from_version, to = ?to_version, reason, "rolled back");
        let bundle = self.state.slot_bundle(to)?;
        let previous = self.state.slot_manifest(from);
        let report = self.apply_timed(&bundle, previous.as_ref())?;
        crash_point("rollback-applied");
        Ok(Some(report))
    }

    /// Blesses the pending current version (the `mark-good` escape hatch, or confirmation).
    pub fn mark_good(&self) -> Result<u32, Error> {
        let _lock = self.state.lock()?;
        let disk = self.state.read()?;
        let slot = disk.current.ok_or(Error::NothingActive)?;
        let version = disk.slot(slot).version.ok_or(Error::NothingActive)?;
        self.state.set_marker(slot, Marker::Good)?;
        self.state.set_confirm_by(None)?;
        tracing::info!(version, %slot, "blessed");
        Ok(version)
    }

    /// Blesses `version` only if it is still the current version and still pending with a
    /// confirm deadline (compare-and-set under the lock: an order or a rollback since the
    /// caller looked leaves it alone). Returns whether it did.
    pub fn confirm(&self, version: u32) -> Result<bool, Error> {
        let _lock = self.state.lock()?;
        let disk = self.state.read()?;
        let Some(slot) = disk.current else {
            return Ok(false);
        };
        let current = disk.slot(slot);
        let pending = matches!(current.marker, Some(Marker::Pending { .. }));
        if current.version != Some(version) || !pending || disk.confirm_by.is_none() {
            return Ok(false);
        }
        self.state.set_marker(slot, Marker::Good)?;
        self.state.set_confirm_by(None)?;
        tracing::info!(version, %slot, "blessed");
        Ok(true)
    }

    /// Marks the current version bad and rolls back to the last good one.
    pub fn mark_bad(&self, reason: &str) -> Result<Option<u32>, Error> {
        let _lock = self.state.lock()?;
        let disk = self.state.read()?;
        let slot = disk.current.ok_or(Error::NothingActive)?;
        self.roll_back_locked(slot, RollbackCause::Operator, reason)?;
        Ok(self.state.read()?.active_version())
    }

    /// Installs what waits in `incoming/`; a refused bundle is moved to `incoming/rejected/`.
    fn take_incoming(&self) -> Result<(), Error> {
        for path in self.state.incoming() {
            let result = std::fs::read(&path)
                .map_err(|source| Error::Io {
                    action: "cannot read",
                    path: path.clone(),
                    error: source,
                })
                .and_then(|bytes| self.state.install(&bytes, Older::Refuse));
            match result {
                Ok(installed) => {
                    tracing::info!(file = %path.display(), ?installed, "installed incoming bundle");
                    let _ = std::fs::remove_file(&path);
                }
                Err(error) => {
                    tracing::error!(file = %path.display(), %error, "refused incoming bundle");
                    let rejected = self.state.path("incoming/rejected");
                    let _ = std::fs::create_dir_all(&rejected);
                    if let Some(name) = path.file_name() {
                        let _ = std::fs::rename(&path, rejected.join(name));
                    }
                }
            }
        }
        Ok(())
    }

    /// What every daemon start does, from the disk alone: take incoming bundles, make the first
    /// version active if none is, use a try of a pending version or roll it back, and apply
    /// the current slot (reconciling whatever an interrupted step left behind).
    pub fn startup(&self) -> Result<StartupAction, Error> {
        let _lock = self.state.lock()?;
        self.take_incoming()?;
        let disk = self.state.read()?;
        // A crash between a bless and taking its signing keys is finished here.
        if let Some(slot) = disk
            .current
            .filter(|s| disk.slot(*s).marker == Some(Marker::Good))
        {
            self.state.retrust_blessed(slot);
        }
        let action = plan_startup(&disk, now());
        tracing::info!(?action, "startup");
        match &action {
            StartupAction::Idle => {
                self.adopt_first_version_locked(&disk)?;
            }
            StartupAction::Run { slot, .. } | StartupAction::NoFallback { slot, .. } => {
                // Reconcile against the other slot too: an interrupted rollback may have left
                // its files. The running version stays whatever apply says.
                let previous = self.state.slot_manifest(slot.other());
                if let Err(error) = self.apply_current(&disk, previous.as_ref()) {
                    tracing::error!(%error, "apply of the current version failed");
                }
            }
            StartupAction::UseTry { slot, tries_left } => {
                self.state.set_marker(
                    *slot,
                    Marker::Pending {
                        tries_left: *tries_left,
                    },
                )?;
                let previous = self.state.slot_manifest(slot.other());
                if let Err(error) = self.apply_current(&disk, previous.as_ref()) {
                    let reason = format!("apply failed: {error}");
                    self.roll_back_locked(*slot, RollbackCause::ApplyFailed, &reason)?;
                }
            }
            StartupAction::RollBack { from, reason, .. } => {
                let cause = RollbackCause::at_startup(&disk, *from);
                self.roll_back_locked(*from, cause, reason)?;
            }
        }
        Ok(action)
    }

    /// With nothing active, makes the newest installed version active. The first version
    /// (provisioned, baked into an image, or the first one an attached node receives) starts
    /// as good: there is nothing to roll back to. Returns the version when it did.
    pub fn adopt_first_version(&self) -> Result<Option<u32>, Error> {
        let _lock = self.state.lock()?;
        let disk = self.state.read()?;
        if disk.current.is_some() {
            return Ok(None);
        }
        self.adopt_first_version_locked(&disk)
    }

    fn adopt_first_version_locked(&self, disk: &DiskState) -> Result<Option<u32>, Error> {
        let Some(&latest) = self.state.versions()?.last() else {
            return Ok(None);
        };
        let slot = plan_activation(disk, latest)?;
        self.state.fill_slot(slot, latest, Marker::Good)?;
        self.state.switch_current(slot)?;
        self.apply_current(&self.state.read()?, None)?;
        tracing::info!(version = latest, "first version active");
        Ok(Some(latest))
    }

    fn apply_current(
        &self,
        disk: &DiskState,
        previous: Option<&towalink_bundle::Manifest>,
    ) -> Result<(), Error> {
        let Some(slot) = disk.current else {
            return Ok(());
        };
        let bundle = self.state.slot_bundle(slot)?;
        let report = self.apply_timed(&bundle, previous)?;
        tracing::info!(version = bundle.manifest().version, written = report.written.len(), reloaded = ?report.reloaded, "applied");
        Ok(())
    }

    /// One look at a pending version: roll back on an expired confirm timer or health timeout,
    /// bless when the checks pass (unless it waits for an explicit confirmation).
    pub fn tick(&self, watch: &mut Watch) -> Result<(), Error> {
        let _lock = self.state.lock()?;
        self.take_incoming()?;
        let disk = self.state.read()?;
        let Some(slot) = disk.current else {
            return Ok(());
        };
        let view = disk.slot(slot);
        let (Some(version), Some(Marker::Pending { .. })) = (view.version, view.marker) else {
            watch.watching = None;
            return Ok(());
        };
        if disk.confirm_by.is_some_and(|t| now() >= t) {
            let reason = format!("v{version}: the confirm timer expired");
            self.roll_back_locked(slot, RollbackCause::ConfirmTimer, &reason)?;
            watch.watching = None;
            return Ok(());
        }
        let since = match watch.watching {
            Some((s, v, since)) if s == slot && v == version => since,
            _ => {
                let since = Instant::now();
                watch.watching = Some((slot, version, since));
                since
            }
        };
        let bundle = self.state.slot_bundle(slot)?;
        let settings = LifecycleSettings::from_bundle(&bundle)?;
        let results = evaluate(&settings, &self.reloader.bird, self.controller_api());
        let healthy = results.iter().all(|r| r.ok);
        if healthy && disk.confirm_by.is_none() {
            self.state.set_marker(slot, Marker::Good)?;
            tracing::info!(version, %slot, "health checks passed: blessed");
            watch.watching = None;
        } else if !healthy && since.elapsed().as_secs() >= settings.timeout_s {
            let failed: Vec<String> = results
                .iter()
                .filter(|r| !r.ok)
                .map(|r| format!("{}: {}", r.check, r.detail))
                .collect();
            let reason = format!(
                "v{version} did not pass its health checks within {} s ({})",
                settings.timeout_s,
                failed.join("; ")
            );
            self.roll_back_locked(slot, RollbackCause::HealthChecks, &reason)?;
            watch.watching = None;
        }
        Ok(())
    }

    /// The node's recovery token (`identity/recovery_token`), if it has one.
    pub fn recovery_token(&self) -> Option<String> {
        std::fs::read_to_string(self.state.path(towalink_bundle::identity::RECOVERY_TOKEN))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }

    /// Replaces the node's recovery token (0600, durably), as the controller sent it.
    pub fn replace_recovery_token(&self, token: &str) -> Result<(), Error> {
        crate::state::write_atomic(
            &self.state.path(towalink_bundle::identity::RECOVERY_TOKEN),
            format!("{}\n", token.trim()).as_bytes(),
            0o600,
        )
    }

    /// The WireGuard private key whose public half is `public` (a version's `wg_public_key`):
    /// the identity's when it is that key or none is named, else the keyring's
    /// ([`towalink_bundle::identity::WG_KEYRING`]). A version naming a key this node does not
    /// hold runs with the identity's key (its peers will not answer; the node says so).
    pub fn wireguard_private_key(&self, public: Option<&str>) -> Result<String, Error> {
        let identity = self.state.identity()?;
        if let Some(public) = public.filter(|p| *p != identity.wg_public_key) {
            if let Some(key) = self.keyring_key(public) {
                return Ok(key);
            }
            tracing::warn!(
                public_key = public,
                "the active version names a WireGuard key this node does not hold; running with the identity's key"
            );
        }
        let path = self.state.path(towalink_bundle::identity::WG_PRIVATE_KEY);
        std::fs::read_to_string(&path).map_err(|error| Error::Io {
            action: "cannot read",
            path,
            error,
        })
    }

    fn keyring_path(&self, public: &str) -> Option<std::path::PathBuf> {
        let name = towalink_netdev::key_hex(public, "WireGuard public key").ok()?;
        Some(
            self.state
                .path(towalink_bundle::identity::WG_KEYRING)
                .join(name),
        )
    }

    fn keyring_key(&self, public: &str) -> Option<String> {
        let key = std::fs::read_to_string(self.keyring_path(public)?).ok()?;
        // A file that does not hold the named key's private half is not used.
        (towalink_netdev::public_key_of(&key, "keyring key").ok()? == public).then_some(key)
    }

    /// The public key the links run with now: the active version's, else the identity's.
    pub fn running_wireguard_key(&self) -> Option<String> {
        self.active_config()
            .and_then(|c| c.wg_public_key)
            .or_else(|| self.state.identity().ok().map(|i| i.wg_public_key))
    }

    /// The WireGuard public keys this node holds private keys for: the identity's first.
    pub fn held_wireguard_keys(&self) -> Vec<String> {
        let mut held: Vec<String> = self
            .state
            .identity()
            .map(|i| vec![i.wg_public_key])
            .unwrap_or_default();
        let dir = self.state.path(towalink_bundle::identity::WG_KEYRING);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let public = std::fs::read_to_string(&file)
                .ok()
                .and_then(|key| towalink_netdev::public_key_of(&key, "keyring key").ok());
            if let Some(public) = public.filter(|p| !held.contains(p)) {
                held.push(public);
            }
        }
        held
    }

    /// Keeps a WireGuard private key the controller sent (`tlm rotate node`) in the keyring
    /// (0600, durably), beside the keys it holds; the oldest beyond [`KEYRING_KEEP`] go.
    /// Returns whether the key was new. The key is never logged.
    pub fn take_wireguard_key(&self, private: &str) -> Result<bool, Error> {
        let public = towalink_netdev::public_key_of(private, "the WireGuard key sent")?;
        if self.held_wireguard_keys().contains(&public) {
            return Ok(false);
        }
        let path = self
            .keyring_path(&public)
            .expect("a derived public key is base64 of 32 bytes");
        let dir = self.state.path(towalink_bundle::identity::WG_KEYRING);
        std::fs::create_dir_all(&dir).map_err(|error| Error::Io {
            action: "cannot create",
            path: dir.clone(),
            error,
        })?;
        crate::state::write_atomic(&path, format!("{}\n", private.trim()).as_bytes(), 0o600)?;
        let mut files: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        files.sort();
        // Never the key the active version runs with, nor the one just taken.
        let running = self
            .running_wireguard_key()
            .and_then(|public| self.keyring_path(&public));
        let excess = files.len().saturating_sub(KEYRING_KEEP);
        for (_, old) in files.into_iter().take(excess) {
            if old != path && Some(&old) != running.as_ref() {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(true)
    }

    /// The contract of the active version (none without one, or when it cannot be read).
    pub fn active_config(&self) -> Option<towalink_bundle::contract::NodeConfig> {
        let slot = self.state.current()?;
        let bundle = self.state.slot_bundle(slot).ok()?;
        towalink_bundle::contract::NodeConfig::of(&bundle).ok()
    }

    /// The management settings of the active version (none: no version, or one from a
    /// controller before versions carried them).
    pub fn version_management(&self) -> Option<Management> {
        self.active_config()?.management
    }

    /// What the management link should use now, before the management thread learned
    /// anything: the active version's settings, else those that last worked, else the
    /// identity's.
    pub fn management_settings(&self) -> Option<Management> {
        self.version_management()
            .or_else(|| self.state.working_management())
    }

    /// The management API's address (none without a management link).
    pub fn controller_api(&self) -> Option<std::net::SocketAddr> {
        let management = self.management_settings()?;
        Some(management.api())
    }

    /// What the data plane should look like: the current version's links (none when no
    /// version is active) and the management link with `management` (the management
    /// thread's choice), else [`Node::management_settings`].
    pub fn desired_dataplane(
        &self,
        management: Option<&Management>,
    ) -> Result<crate::dataplane::DesiredState, Error> {
        let config = match self.state.current() {
            Some(slot) => Some(towalink_bundle::contract::NodeConfig::of(
                &self.state.slot_bundle(slot)?,
            )?),
            None => None,
        };
        // Links and management link run with the key the active version names.
        let key =
            self.wireguard_private_key(config.as_ref().and_then(|c| c.wg_public_key.as_deref()))?;
        let mut state = match &config {
            Some(config) => crate::dataplane::desired(config, &key)?,
            None => crate::dataplane::DesiredState::default(),
        };
        let settings = match management {
            Some(chosen) => Some(chosen.clone()),
            None => self.management_settings(),
        };
        state.management = crate::dataplane::management_link(settings.as_ref(), &key)?;
        Ok(state)
    }

    pub fn status(&self) -> Result<Status, Error> {
        let identity = self.state.identity()?;
        let disk = self.state.read()?;
        let current = disk.current;
        let marker = current.and_then(|s| disk.slot(s).marker);
        let last_good = disk.last_good();
        let health = match current.and_then(|s| self.state.slot_bundle(s).ok()) {
            Some(bundle) => {
                let settings = LifecycleSettings::from_bundle(&bundle)?;
                evaluate(&settings, &self.reloader.bird, self.controller_api())
            }
            None => Vec::new(),
        };
        Ok(Status {
            node: format!("{}.{}", identity.node, identity.site),
            node_id: identity.node_id,
            active_version: disk.active_version(),
            active_slot: current.map(|s| s.to_string()),
            state: marker.map(|m| match m {
                Marker::Good => SlotState::Good,
                Marker::Pending { .. } => SlotState::Pending,
                Marker::Bad => SlotState::Bad,
            }),
            tries_left: match marker {
                Some(Marker::Pending { tries_left }) => Some(tries_left),
                _ => None,
            },
            confirm_by: disk.confirm_by,
            last_good_version: last_good.and_then(|s| disk.slot(s).version),
            last_good_slot: last_good.map(|s| s.to_string()),
            installed_versions: self.state.versions()?,
            health,
            last_rollback: self.state.last_rollback(),
        })
    }
}
