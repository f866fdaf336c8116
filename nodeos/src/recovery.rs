//! The node's side of the recovery channel (docs/recovery.md): when the controller cannot be
//! reached, look for this node's recovery object at the active version's `recovery_urls` and
//! on the boot media, and take the version in it like an activation with a confirm timer.
//!
//! - **When** ([`RecoveryTimer`], pure): once per boot when the first [`BOOT_GRACE`] pass
//!   without reaching the controller, then whenever the controller has not been reached for
//!   `recovery_after_s` (again after as long each time).
//! - **What** ([`towalink_bundle::recovery::open`]): the object sealed to this node's recovery
//!   token; after `recovery_lost_token_boots` boots in a row without a management connection
//!   also the token-less form ([`RecoveryState`] counts boots by the kernel's boot id).
//! - **How**: the bundle inside is verified like any other, installed (a signed object may
//!   name an older version, as a signed order may) and activated with `recovery_confirm_s` as
//!   confirm timer: it is rolled back unless the controller is reached through it. The
//!   object's seq is recorded; an older or replayed object is refused.

use std::io::{BufReader, Read as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use towalink_bundle::contract::{NodeConfig, DEFAULT_RECOVERY_AFTER_S, DEFAULT_RECOVERY_CONFIRM_S};
use towalink_bundle::recovery::{self, Location, Opened, DEFAULT_LOST_TOKEN_BOOTS};
use towalink_bundle::wire;

use crate::lifecycle::{Node, VersionSpec};
use crate::state::{write_atomic, Older};

/// The recovery state file in the state directory.
pub const STATE_FILE: &str = "recovery.toml";

/// How long a boot may take to reach the controller before the node looks for a recovery
/// object (a link needs a round and a handshake; DNS may be slow right after boot).
pub const BOOT_GRACE: Duration = Duration::from_secs(30);

/// How long one read or connection attempt of a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a whole fetch may take (a server trickling bytes cannot hold the node).
const FETCH_DEADLINE: Duration = Duration::from_secs(60);

/// A reader that fails once its deadline has passed.
struct Deadline<R> {
    inner: R,
    until: Instant,
}

impl<R: std::io::Read> std::io::Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() >= self.until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the fetch took longer than its deadline",
            ));
        }
        self.inner.read(buf)
    }
}

/// What the node remembers across boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryState {
    /// The seq of the last object applied (a replay or an older one is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Boots in a row that have not reached the controller (this one included).
    #[serde(default)]
    pub boots_without_controller: u32,
    /// The kernel's boot id of the last boot counted.
    #[serde(default)]
    pub boot_id: String,
}

impl RecoveryState {
    /// Counts a boot: a boot id not seen before is one more boot without the controller (until
    /// [`RecoveryState::reached_controller`]). Returns whether anything changed.
    pub fn count_boot(&mut self, boot_id: &str) -> bool {
        if boot_id.is_empty() || self.boot_id == boot_id {
            return false;
        }
        self.boot_id = boot_id.to_string();
        self.boots_without_controller = self.boots_without_controller.saturating_add(1);
        true
    }

    /// The controller was reached: the count starts over. Returns whether anything changed.
    pub fn reached_controller(&mut self) -> bool {
        std::mem::take(&mut self.boots_without_controller) != 0
    }

    pub fn load(node: &Node) -> RecoveryState {
        let path = node.state.path(STATE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).unwrap_or_else(|e| {
                // Starting over would forget the last seq applied and let a replayed object
                // in: no object is taken until the file is repaired or removed.
                tracing::error!(path = %path.display(), error = %e.message(), "unreadable: no recovery object is taken until it is removed");
                RecoveryState {
                    last_seq: Some(u64::MAX),
                    ..RecoveryState::default()
                }
            }),
            Err(_) => RecoveryState::default(),
        }
    }

    pub fn save(&self, node: &Node) {
        let path = node.state.path(STATE_FILE);
        let text = toml::to_string(self).expect("the recovery state serializes");
        if let Err(error) = write_atomic(&path, text.as_bytes(), 0o644) {
            tracing::error!(%error, "cannot record the recovery state");
        }
    }
}

/// When to look for a recovery object. Pure.
#[derive(Debug, Clone)]
pub struct RecoveryTimer {
    started: Instant,
    last_reached: Option<Instant>,
    last_look: Option<Instant>,
}

impl RecoveryTimer {
    pub fn new(started: Instant) -> RecoveryTimer {
        RecoveryTimer {
            started,
            last_reached: None,
            last_look: None,
        }
    }

    /// Whether to look now, with `after` the node's `recovery_after_s`.
    pub fn due(&self, now: Instant, after: Duration) -> bool {
        let since = |t: Instant| now.saturating_duration_since(t);
        match (self.last_reached, self.last_look) {
            // This boot has not reached the controller: look once after the grace time.
            (None, None) => since(self.started) >= BOOT_GRACE,
            (reached, look) => {
                let quiet_since = reached.into_iter().chain(look).max().expect("one is set");
                since(quiet_since) >= after
            }
        }
    }

    pub fn reached(&mut self, now: Instant) {
        self.last_reached = Some(now);
    }

    pub fn looked(&mut self, now: Instant) {
        self.last_look = Some(now);
    }
}

/// The management thread's recovery: its state on disk, when to look, where (`media`), and
/// the active version's `recovery_after_s` (read again when it looks or reaches the
/// controller, not at every failed sync).
pub struct Recovery {
    state: RecoveryState,
    timer: RecoveryTimer,
    after: Duration,
    media: Vec<PathBuf>,
}

impl Recovery {
    /// At the daemon's start: a new boot id counts one more boot without the controller.
    pub fn start(node: &Node, boot_id: &str, media: Vec<PathBuf>, now: Instant) -> Recovery {
        let mut state = RecoveryState::load(node);
        if state.count_boot(boot_id) {
            state.save(node);
        }
        Recovery {
            state,
            timer: RecoveryTimer::new(now),
            after: Settings::of(node.active_config().as_ref(), &[]).after,
            media,
        }
    }

    /// The controller was reached: the timer and the boot count start over.
    pub fn reached(&mut self, node: &Node, now: Instant) {
        self.timer.reached(now);
        self.after = Settings::of(node.active_config().as_ref(), &[]).after;
        if self.state.reached_controller() {
            self.state.save(node);
        }
    }

    /// The controller was not reached: looks for a recovery object when it is time. Returns
    /// whether a version was activated.
    pub fn look_if_due(&mut self, node: &Node, now: Instant) -> bool {
        if !self.timer.due(now, self.after) {
            return false;
        }
        self.timer.looked(now);
        self.after = Settings::of(node.active_config().as_ref(), &[]).after;
        look(node, &self.media, &mut self.state).is_some()
    }
}

/// The recovery settings of the active version (the defaults without one).
pub struct Settings {
    pub locations: Vec<Location>,
    pub after: Duration,
    pub lost_token_boots: Option<u32>,
    pub confirm_s: u64,
}

impl Settings {
    pub fn of(config: Option<&NodeConfig>, media: &[PathBuf]) -> Settings {
        let mut locations: Vec<Location> = config
            .map(|c| &c.recovery_urls[..])
            .unwrap_or_default()
            .iter()
            .filter_map(|u| Location::parse(u).ok())
            .collect();
        locations.extend(media_directories(media));
        let lost = config
            .and_then(|c| c.recovery_lost_token_boots)
            .unwrap_or(DEFAULT_LOST_TOKEN_BOOTS);
        Settings {
            locations,
            after: Duration::from_secs(
                config
                    .and_then(|c| c.recovery_after_s)
                    .unwrap_or(DEFAULT_RECOVERY_AFTER_S),
            ),
            lost_token_boots: (lost > 0).then_some(lost),
            confirm_s: config
                .and_then(|c| c.recovery_confirm_s)
                .unwrap_or(DEFAULT_RECOVERY_CONFIRM_S),
        }
    }
}

/// `<media>/*/towalink-recovery` for each media directory (`--recovery-media`, `/media` on
/// images: Alpine mounts the boot partition there).
fn media_directories(media: &[PathBuf]) -> Vec<Location> {
    let mut found = Vec::new();
    for root in media {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path().join(recovery::BOOT_DIR)))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        found.extend(
            dirs.into_iter()
                .map(|d| Location::Directory(d.display().to_string())),
        );
    }
    found
}

/// Fetches `name` at `location`: `Ok(None)` when it is not there.
fn fetch(location: &Location, name: &str) -> Result<Option<Vec<u8>>, String> {
    let limit = recovery::MAX_OBJECT_BYTES as u64;
    match location {
        Location::Directory(dir) => {
            let path = Path::new(dir).join(name);
            match std::fs::File::open(&path) {
                Ok(file) => {
                    let mut bytes = Vec::new();
                    file.take(limit + 1)
                        .read_to_end(&mut bytes)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    Ok(Some(bytes))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", path.display())),
            }
        }
        Location::Http { authority, path } => {
            let address = authority
                .to_socket_addrs()
                .map_err(|e| format!("{authority}: {e}"))?
                .next()
                .ok_or_else(|| format!("{authority}: no address"))?;
            let mut stream = TcpStream::connect_timeout(&address, FETCH_TIMEOUT)
                .map_err(|e| format!("{authority}: {e}"))?;
            stream
                .set_read_timeout(Some(FETCH_TIMEOUT))
                .and_then(|()| stream.set_write_timeout(Some(FETCH_TIMEOUT)))
                .map_err(|e| format!("{authority}: {e}"))?;
            let host = authority
                .rsplit_once(':')
                .map_or(&authority[..], |(h, _)| h);
            wire::write_request(
                &mut stream,
                "GET",
                host,
                &format!("{path}/{name}"),
                "application/octet-stream",
                b"",
            )
            .map_err(|e| format!("{authority}: {e}"))?;
            let reader = Deadline {
                inner: stream,
                until: Instant::now() + FETCH_DEADLINE,
            };
            let response = wire::read_response(&mut BufReader::new(reader), limit)
                .map_err(|e| format!("{authority}: {e}"))?;
            match response.status {
                200 => Ok(Some(response.body)),
                404 => Ok(None),
                status => Err(format!("{authority}{path}/{name}: HTTP {status}")),
            }
        }
    }
}

fn describe(location: &Location) -> String {
    match location {
        Location::Http { authority, path } => format!("http://{authority}{path}"),
        Location::Directory(dir) => dir.clone(),
    }
}

/// Looks for this node's recovery object everywhere it may be and applies the first valid
/// one. Returns the version activated, if any. Every refusal is one log line.
pub fn look(node: &Node, media: &[PathBuf], state: &mut RecoveryState) -> Option<u32> {
    let config = node.active_config();
    let settings = Settings::of(config.as_ref(), media);
    if settings.locations.is_empty() {
        tracing::debug!("no recovery location (recovery_urls, --recovery-media)");
        return None;
    }
    let identity = node.state.identity().ok()?;
    let keys = node.state.trusted_keys(&identity).ok()?;
    let token = node.recovery_token();
    let without_token =
        recovery::accepts_without_token(state.boots_without_controller, settings.lost_token_boots);
    let mut names = Vec::new();
    if let Some(token) = &token {
        names.push(recovery::object_name(token));
    }
    if without_token {
        // Named after the signing key: any the node trusts (two while it is rotated).
        for key in &keys {
            names.push(recovery::lost_token_name(identity.node_id, key));
        }
    }
    tracing::info!(
        locations = settings.locations.len(),
        without_token,
        boots_without_controller = state.boots_without_controller,
        "controller not reached: looking for a recovery object"
    );
    for location in &settings.locations {
        for name in &names {
            let bytes = match fetch(location, name) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(location = %describe(location), error = %crate::management::escaped(&error), "cannot fetch a recovery object");
                    continue;
                }
            };
            let opened = recovery::open(
                &bytes,
                identity.node_id,
                token.as_deref(),
                &keys,
                without_token,
                state.last_seq,
            );
            match opened
                .map_err(|e| e.to_string())
                .and_then(|o| apply(node, o, settings.confirm_s))
            {
                Ok((seq, version)) => {
                    state.last_seq = Some(seq);
                    state.save(node);
                    return version;
                }
                Err(error) => tracing::warn!(
                    location = %describe(location),
                    %name,
                    reason = %crate::management::escaped(&error),
                    "recovery object refused"
                ),
            }
        }
    }
    None
}

/// Installs and activates the version of an opened object. Returns its seq and the version
/// activated (none when it was active already).
fn apply(node: &Node, opened: Opened, confirm_s: u64) -> Result<(u64, Option<u32>), String> {
    let refused = |e: &dyn std::fmt::Display| e.to_string();
    let bundle = opened.verify_bundle().map_err(|e| refused(&e))?;
    let version = opened.version;
    // A recovery object never takes a node back: a stale object (saved and served again by
    // whoever blocks the controller) is refused even if its seq is new to this node.
    let active = node.state.read().ok().and_then(|d| d.active_version());
    if let Some(active) = active.filter(|a| version < *a) {
        return Err(format!(
            "holds v{version}, older than the active v{active}: a recovery object never goes back"
        ));
    }
    node.install_verified(&bundle, Older::Named(version))
        .map_err(|e| refused(&e))?;
    if active == Some(version) {
        tracing::info!(
            version,
            seq = opened.seq,
            token_bound = opened.token_bound,
            "recovery object holds the active version: nothing to do"
        );
        return Ok((opened.seq, None));
    }
    node.activate(VersionSpec::Number(version), Some(confirm_s))
        .map_err(|e| refused(&e))?;
    tracing::info!(
        version,
        seq = opened.seq,
        token_bound = opened.token_bound,
        confirm_s,
        "recovered: activated the version of a recovery object; rolled back unless the controller is reached through it"
    );
    Ok((opened.seq, Some(version)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_are_counted_by_boot_id_until_the_controller_is_reached() {
        let mut state = RecoveryState::default();
        assert!(state.count_boot("a"));
        assert!(!state.count_boot("a"), "a daemon restart is no boot");
        assert!(state.count_boot("b"));
        assert!(!state.count_boot(""), "no boot id: not counted");
        assert_eq!(state.boots_without_controller, 2);
        assert!(state.reached_controller());
        assert!(!state.reached_controller());
        assert_eq!(state.boots_without_controller, 0);
        assert!(state.count_boot("c"));
        assert_eq!(state.boots_without_controller, 1);
        // The lost-token rule on top of the count.
        let threshold = Some(DEFAULT_LOST_TOKEN_BOOTS);
        for boot in 2..=DEFAULT_LOST_TOKEN_BOOTS {
            assert!(!recovery::accepts_without_token(
                state.boots_without_controller,
                threshold
            ));
            state.count_boot(&format!("boot{boot}"));
        }
        assert!(recovery::accepts_without_token(
            state.boots_without_controller,
            threshold
        ));
        assert!(!recovery::accepts_without_token(
            state.boots_without_controller,
            None
        ));
    }

    #[test]
    fn the_node_looks_once_per_boot_after_the_grace_then_after_each_quiet_period() {
        let t0 = Instant::now();
        let after = Duration::from_secs(600);
        let mut timer = RecoveryTimer::new(t0);
        assert!(!timer.due(t0 + BOOT_GRACE / 2, after));
        assert!(timer.due(t0 + BOOT_GRACE, after));
        timer.looked(t0 + BOOT_GRACE);
        assert!(!timer.due(t0 + BOOT_GRACE + after / 2, after));
        assert!(timer.due(t0 + BOOT_GRACE + after, after));
        // Reaching the controller puts it off.
        let mut timer = RecoveryTimer::new(t0);
        timer.reached(t0 + Duration::from_secs(5));
        assert!(
            !timer.due(t0 + BOOT_GRACE, after),
            "reached at boot: no boot look"
        );
        assert!(!timer.due(t0 + after, after));
        assert!(timer.due(t0 + Duration::from_secs(5) + after, after));
    }

    #[test]
    fn settings_default_and_media_directories_are_found() {
        let media = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(media.path().join("sda1").join(recovery::BOOT_DIR)).unwrap();
        std::fs::create_dir_all(media.path().join("cdrom")).unwrap();
        let settings = Settings::of(None, &[media.path().to_path_buf()]);
        assert_eq!(
            settings.locations,
            [Location::Directory(
                media
                    .path()
                    .join("sda1/towalink-recovery")
                    .display()
                    .to_string()
            )]
        );
        assert_eq!(
            settings.after,
            Duration::from_secs(DEFAULT_RECOVERY_AFTER_S)
        );
        assert_eq!(settings.lost_token_boots, Some(DEFAULT_LOST_TOKEN_BOOTS));
        let config = NodeConfig::from_toml(
            "recovery_urls = [\"http://r.example:8080/x\"]\nrecovery_lost_token_boots = 0\nrecovery_after_s = 20\n",
        )
        .unwrap();
        let settings = Settings::of(Some(&config), &[]);
        assert_eq!(settings.lost_token_boots, None, "0: never");
        assert_eq!(settings.after, Duration::from_secs(20));
        assert_eq!(
            settings.locations,
            [Location::Http {
                authority: "r.example:8080".into(),
                path: "/x".into()
            }]
        );
    }
}
