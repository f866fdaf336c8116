//! The node's side of the management API: a thread that keeps syncing with the controller
//! through the management link. Each sync sends a fresh [`NodeReport`]; the reply names the
//! versions the controller has (missing ones are downloaded and installed, not activated:
//! mirroring) and the latest activation order (carried out once, by its sequence number).
//!
//! The node trusts nothing that arrives over the link for being there: it acts only on a
//! reply signed by the controller's signing key for this node and this report's nonce
//! ([`towalink_bundle::orders::open_reply`]), within every bound. Anything else is refused
//! with one log line (escaped) and the node keeps its last good settings; no value from the
//! network can stop this thread.
//!
//! The controller holds a sync open (long poll) until it has something new; the node drops a
//! held sync and reports at once when its own state changes (a version blessed or rolled
//! back), so the controller learns within a fraction of a second. Nothing here is needed for
//! routing: when the controller is unreachable the node keeps running its active version and
//! retries quietly.

use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use towalink_bundle::messages::{
    HealthReport, Management, NodeReport, Order, OrderOutcome, OrderResult, RollbackReport,
    SlotState, SyncReply, TunnelReport, BUNDLE_PATH, SYNC_PATH,
};
use towalink_bundle::orders::{self, OrderVerdict, ReplyBody};
use towalink_bundle::wire;

use crate::lifecycle::{Node, VersionSpec};
use crate::recovery::Recovery;
use crate::state::{now, Installed, Older, KEEP_VERSIONS};
use crate::Error;

/// Largest bundle the node downloads.
const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest sync reply.
const MAX_REPLY_BYTES: u64 = 1024 * 1024;
/// The report interval until the controller's first good reply.
const DEFAULT_INTERVAL_S: u64 = 5;
/// Longest text from the network put into a log line.
const MAX_LOGGED_CHARS: usize = 300;

/// Text from the network as one log line: control characters and quotes escaped, cut short.
pub fn escaped(text: &str) -> String {
    let mut out: String = text.escape_debug().take(MAX_LOGGED_CHARS).collect();
    if text.escape_debug().nth(MAX_LOGGED_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// A fresh nonce for a report (hex of 16 bytes from the kernel's random source).
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    if towalink_system::random::fill(&mut bytes).is_err() {
        // Still unique enough for freshness: time and a counter never repeat in a process.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::SeqCst).to_le_bytes());
    }
    hex::encode(bytes)
}

/// What the daemon's main loop shares with the management thread.
pub struct Shared {
    /// Bumped by the main loop whenever the node's state on disk changes.
    pub generation: AtomicU64,
    /// The data plane links as the main loop last saw them.
    pub tunnels: Mutex<Vec<TunnelReport>>,
    /// The management settings the link should use ([`LinkChoice`]) and their number (bumped
    /// at each change); none until the management thread chose.
    pub link: Mutex<(Option<Management>, u64)>,
    /// The number of the settings the data plane has applied to the link.
    pub link_applied: AtomicU64,
    pub started: Instant,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            generation: AtomicU64::new(0),
            tunnels: Mutex::new(Vec::new()),
            link: Mutex::new((None, 0)),
            link_applied: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

impl Shared {
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// How long the management thread waits for the daemon to apply new link settings.
const LINK_APPLIED_WITHIN: Duration = Duration::from_secs(10);

/// How long one controller endpoint is tried before the next: a reconfigured link needs a
/// round of the daemon and a WireGuard handshake before a sync can pass.
pub const TRY_ENDPOINT: Duration = Duration::from_secs(20);

/// Which management settings the link uses: the active version's, or those that last reached
/// the controller (the working ones). Pure; the management thread tells it what happened.
///
/// - A version's settings are tried first. While the version is pending, only they are tried,
///   so an activation with a confirm timer (or the `controller` check) judges them: a version
///   that cannot reach the controller is rolled back.
/// - Once blessed, a version whose settings do not reach the controller is not allowed to cut
///   the node off: the working settings are tried in turn with the version's.
/// - Within a set, each endpoint is tried for [`TRY_ENDPOINT`], then the next.
/// - Settings that reached the controller become the working ones (the caller saves them).
#[derive(Debug, Clone)]
pub struct LinkChoice {
    working: Option<Management>,
    version: Option<Management>,
    pending: bool,
    using: Using,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Version,
    Working,
}

#[derive(Debug, Clone, Copy)]
struct Using {
    which: Which,
    endpoint: usize,
    since: Instant,
}

impl LinkChoice {
    pub fn new(working: Option<Management>, now: Instant) -> LinkChoice {
        LinkChoice {
            working,
            version: None,
            pending: false,
            using: Using {
                which: Which::Working,
                endpoint: 0,
                since: now,
            },
        }
    }

    /// The sets to try, in order.
    fn sets(&self) -> Vec<Which> {
        match &self.version {
            Some(version) if Some(version) != self.working.as_ref() => {
                if self.pending || self.working.is_none() {
                    vec![Which::Version]
                } else {
                    vec![Which::Version, Which::Working]
                }
            }
            _ => vec![Which::Working],
        }
    }

    fn set(&self, which: Which) -> Option<&Management> {
        match which {
            Which::Version => self.version.as_ref(),
            Which::Working => self.working.as_ref(),
        }
    }

    /// The active version's settings and whether it is pending. New settings are tried from
    /// their first endpoint.
    pub fn observe(&mut self, version: Option<Management>, pending: bool, now: Instant) {
        let before = self.set(self.using.which).cloned();
        let version_changed = self.version != version;
        self.version = version;
        self.pending = pending;
        let sets = self.sets();
        if version_changed || !sets.contains(&self.using.which) {
            // A new version's settings come first; when they are the ones in use already (a
            // version with the working settings), the endpoint in use stays.
            self.using = if before.is_some() && self.set(sets[0]) == before.as_ref() {
                Using {
                    which: sets[0],
                    ..self.using
                }
            } else {
                Using {
                    which: sets[0],
                    endpoint: 0,
                    since: now,
                }
            };
        }
    }

    /// The settings to use now, their endpoints narrowed to the one being tried.
    pub fn settings(&self) -> Option<Management> {
        let mut settings = self.set(self.using.which)?.clone();
        if let Some(endpoint) = settings.controller_endpoints.get(self.using.endpoint) {
            settings.controller_endpoints = vec![endpoint.clone()];
        }
        Some(settings)
    }

    /// A sync through [`LinkChoice::settings`] did not reach the controller at `now`.
    pub fn failed(&mut self, now: Instant) {
        if now.saturating_duration_since(self.using.since) < TRY_ENDPOINT {
            return;
        }
        let endpoints = self
            .set(self.using.which)
            .map_or(0, |s| s.controller_endpoints.len());
        let sets = self.sets();
        self.using = if self.using.endpoint + 1 < endpoints {
            Using {
                endpoint: self.using.endpoint + 1,
                since: now,
                ..self.using
            }
        } else {
            let at = sets
                .iter()
                .position(|w| *w == self.using.which)
                .unwrap_or(0);
            Using {
                which: sets[(at + 1) % sets.len()],
                endpoint: 0,
                since: now,
            }
        };
    }

    /// A sync through [`LinkChoice::settings`] reached the controller. Returns the settings
    /// that became the working ones, when they changed (to be saved).
    pub fn reached(&mut self) -> Option<Management> {
        if self.using.which == Which::Version && self.version != self.working {
            self.working = self.version.clone();
            self.using.which = Which::Working;
            return self.working.clone();
        }
        None
    }

    /// Which settings are in use, for the log.
    pub fn describe(&self) -> &'static str {
        match (self.using.which, self.through_version()) {
            (_, true) if self.version.is_some() => "the active version's",
            (Which::Working, _) => "the last that reached the controller",
            (Which::Version, _) => "the active version's",
        }
    }

    /// Whether the settings in use are the active version's (or the version names none): a
    /// pending version is confirmed only through its own settings.
    pub fn through_version(&self) -> bool {
        self.version.is_none() || self.set(self.using.which) == self.version.as_ref()
    }
}

/// Why a call to the controller failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("controller answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("dropped for a fresh report")]
    Superseded,
}

/// Why a read gave up: the node's state changed and a fresh report is due.
#[derive(Debug)]
struct Superseded;

impl std::fmt::Display for Superseded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("superseded by a fresh report")
    }
}

impl std::error::Error for Superseded {}

/// A stream whose reads give up when `abort` says so (checked every 200 ms) or at `deadline`.
struct Interruptible<'a> {
    stream: TcpStream,
    deadline: Instant,
    abort: &'a dyn Fn() -> bool,
}

impl Read for Interruptible<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if (self.abort)() {
                        // Not `Interrupted`: `read_until` retries that forever.
                        return Err(std::io::Error::other(Superseded));
                    }
                    if Instant::now() >= self.deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "controller did not answer in time",
                        ));
                    }
                }
                other => return other,
            }
        }
    }
}

/// One HTTP exchange with the management API.
fn call(
    api: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
    limit: u64,
    timeout: Duration,
    abort: &dyn Fn() -> bool,
) -> Result<wire::Response, CallError> {
    let mut stream = TcpStream::connect_timeout(&api, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    wire::write_request(
        &mut stream,
        method,
        &api.to_string(),
        target,
        "application/json",
        body,
    )?;
    let mut reader = BufReader::new(Interruptible {
        stream,
        deadline: Instant::now() + timeout,
        abort,
    });
    match wire::read_response(&mut reader, limit) {
        Ok(response) if response.status == 200 => Ok(response),
        Ok(response) => Err(CallError::Status {
            status: response.status,
            body: String::from_utf8_lossy(&response.body).trim().to_string(),
        }),
        Err(wire::WireError::Io(e)) if e.get_ref().is_some_and(|e| e.is::<Superseded>()) => {
            Err(CallError::Superseded)
        }
        Err(e) => Err(e.into()),
    }
}

fn system_uptime_s() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split('.').next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// The kernel's boot id, or empty where there is none.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

/// The report the node sends now.
pub fn build_report(node: &Node, shared: &Shared) -> Result<NodeReport, Error> {
    let status = node.status()?;
    let bgp = node.reloader.bird.bgp_sessions();
    Ok(NodeReport {
        node_id: status.node_id,
        node: status.node,
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s: system_uptime_s(),
        boot_id: boot_id(),
        daemon_uptime_s: shared.started.elapsed().as_secs(),
        active_version: status.active_version,
        state: status.state,
        tries_left: status.tries_left,
        confirm_by: status.confirm_by,
        last_good_version: status.last_good_version,
        installed_versions: status.installed_versions,
        health: status
            .health
            .into_iter()
            .map(|c| HealthReport {
                check: c.check.to_string(),
                ok: c.ok,
                detail: c.detail,
            })
            .collect(),
        last_rollback: status.last_rollback.map(|r| RollbackReport {
            time: r.time,
            from_version: r.from_version,
            to_version: r.to_version,
            reason: r.reason,
        }),
        tunnels: shared.tunnels.lock().map(|t| t.clone()).unwrap_or_default(),
        bgp,
        bfd: node
            .reloader
            .bird
            .bfd_sessions()
            .map(|sessions| {
                sessions
                    .into_iter()
                    .map(
                        |(peer, interface, state)| towalink_bundle::messages::BfdSession {
                            peer,
                            interface,
                            state,
                        },
                    )
                    .collect()
            })
            .unwrap_or_default(),
        order_done: node.state.last_order(),
        nonce: nonce(),
        recovery_token_id: node
            .recovery_token()
            .map(|token| towalink_bundle::recovery::object_name(&token)),
        wg_public_keys: node.held_wireguard_keys(),
        wg_public_key: node.running_wireguard_key(),
        trusted_keys: node
            .state
            .identity()
            .and_then(|identity| node.state.trusted_keys(&identity))
            .map(|keys| {
                keys.iter()
                    .map(towalink_bundle::verifying_key_to_base64)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Sleeps up to `duration`, waking early when `abort` says so.
fn pause(duration: Duration, abort: &dyn Fn() -> bool) {
    let until = Instant::now() + duration;
    while Instant::now() < until && !abort() {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Parses and opens a sync reply: JSON, then the controller's signature for this node and
/// report, then every bound. The error is the one-line reason it was refused.
fn open_sync_reply(node: &Node, body: &[u8], report: &NodeReport) -> Result<ReplyBody, String> {
    let reply: SyncReply =
        serde_json::from_slice(body).map_err(|e| format!("reply is not valid: {e}"))?;
    let identity = node.state.identity().map_err(|e| e.to_string())?;
    let keys = node
        .state
        .trusted_keys(&identity)
        .map_err(|e| e.to_string())?;
    orders::open_reply(
        reply.signed.as_ref(),
        &keys,
        identity.node_id,
        &report.nonce,
    )
    .map_err(|e| e.to_string())
}

/// Publishes the settings the link should use; the daemon's next round reconfigures it.
/// Returns their number when they changed.
fn publish_link(shared: &Shared, settings: Option<Management>) -> Option<u64> {
    let published = match shared.link.lock() {
        Ok(mut link) if link.0 != settings => {
            link.0 = settings;
            link.1 += 1;
            Some(link.1)
        }
        _ => None,
    };
    if published.is_some() {
        shared.changed();
    }
    published
}

/// Waits until the data plane applied settings number `number` to the link (at most
/// `limit`); whether it did.
fn wait_applied(shared: &Shared, number: u64, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if shared.link_applied.load(Ordering::SeqCst) >= number {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The management thread: choose the settings, sync, act on the reply, repeat; when the
/// controller stays out of reach, look for a recovery object ([`crate::recovery`]) at the
/// active version's `recovery_urls` and under `media`. Never returns.
pub fn run(node: Node, shared: Arc<Shared>, media: Vec<std::path::PathBuf>) {
    let mut interval = Duration::from_secs(DEFAULT_INTERVAL_S);
    let mut reachable = true;
    let mut wait_ms = 0u64;
    let mut choice = LinkChoice::new(node.state.working_management(), Instant::now());
    // The number of the settings last published: a sync proves them only once the daemon has
    // applied them to the link (checked when the reply arrives).
    let mut published = 0u64;
    let mut recovery = Recovery::start(&node, &boot_id(), media, Instant::now());
    loop {
        let report = match build_report(&node, &shared) {
            Ok(report) => report,
            Err(error) => {
                tracing::error!(%error, "cannot build the status report");
                std::thread::sleep(interval);
                continue;
            }
        };
        choice.observe(
            node.version_management(),
            report.state == Some(SlotState::Pending),
            Instant::now(),
        );
        let settings = choice.settings();
        if let Some(number) = publish_link(&shared, settings.clone()) {
            if let Some(settings) = &settings {
                tracing::info!(
                    endpoint = %settings.controller_endpoints.join(","),
                    settings = choice.describe(),
                    "management link: trying"
                );
            }
            published = number;
            // A sync proves settings only once the link runs with them.
            if !wait_applied(&shared, number, LINK_APPLIED_WITHIN) {
                tracing::warn!("the data plane did not apply the management link's new settings in time; trying anyway");
            }
        }
        let Some(settings) = settings else {
            // No management settings at all (a version took them away and none ever worked):
            // only a recovery object can bring the node back.
            if recovery.look_if_due(&node, Instant::now()) {
                shared.changed();
            }
            std::thread::sleep(interval);
            continue;
        };
        let api = settings.api();
        let endpoint = settings.controller_endpoints.join(",");
        let seen = shared.generation.load(Ordering::SeqCst);
        let body = match serde_json::to_vec(&report) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%error, "cannot serialize the status report");
                std::thread::sleep(interval);
                continue;
            }
        };
        let abort = || shared.generation.load(Ordering::SeqCst) != seen;
        let target = format!("{SYNC_PATH}?wait_ms={wait_ms}");
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(10);
        let asked = Instant::now();
        let asked_wait = wait_ms;
        match call(
            api,
            "POST",
            &target,
            &body,
            MAX_REPLY_BYTES,
            timeout,
            &abort,
        ) {
            Ok(response) => {
                let reply = match open_sync_reply(&node, &response.body, &report) {
                    Ok(reply) => reply,
                    Err(reason) => {
                        tracing::warn!(
                            %api,
                            %endpoint,
                            reason = %escaped(&reason),
                            interval_s = interval.as_secs(),
                            "sync reply refused; keeping the last good settings"
                        );
                        choice.failed(Instant::now());
                        if recovery.look_if_due(&node, Instant::now()) {
                            shared.changed();
                        }
                        wait_ms = 0;
                        pause(interval, &abort);
                        continue;
                    }
                };
                if !reachable {
                    tracing::info!(%api, %endpoint, "controller reachable again");
                    reachable = true;
                }
                recovery.reached(&node, Instant::now());
                let link_ready = shared.link_applied.load(Ordering::SeqCst) >= published;
                if let Some(working) = link_ready.then(|| choice.reached()).flatten() {
                    match node.state.save_working_management(&working) {
                        Ok(()) => tracing::info!(
                            endpoints = %working.controller_endpoints.join(","),
                            "the active version's management settings reached the controller: they are now the ones to fall back to"
                        ),
                        Err(error) => {
                            tracing::error!(%error, "cannot record the working management settings")
                        }
                    }
                }
                interval = Duration::from_secs(reply.report_interval_s);
                if let Some(token) = reply.recovery_token.as_deref() {
                    if take_recovery_token(&node, token) {
                        shared.changed();
                    }
                }
                // A rotated key comes before the order that may activate a version naming it.
                if let Some(key) = reply.wg_private_key.as_deref() {
                    match node.take_wireguard_key(key) {
                        Ok(true) => tracing::info!(
                            "new WireGuard key kept, as the controller sent it (tlm rotate node); versions naming it will use it"
                        ),
                        Ok(false) => {}
                        Err(error) => {
                            tracing::error!(%error, "cannot keep the WireGuard key the controller sent")
                        }
                    }
                }
                // The controller (its signature, over this report's nonce) was reached
                // through the active version's own settings, applied to the link: confirm
                // before an order in this reply changes the active version.
                if link_ready && choice.through_version() {
                    confirm_if_healthy(&node, &report);
                }
                let acted = act_on(&node, api, &reply, &report);
                if acted {
                    shared.changed();
                    wait_ms = 0;
                } else {
                    wait_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
                    // The controller answered a long poll at once with news this node could
                    // not take (a bundle it refuses): do not ask again right away.
                    if asked_wait > 0 && asked.elapsed() < Duration::from_millis(500) {
                        pause(interval, &abort);
                    }
                }
            }
            Err(CallError::Superseded) => wait_ms = 0,
            Err(error) => {
                let error = escaped(&error.to_string());
                if reachable {
                    tracing::warn!(%api, %endpoint, %error, "controller unreachable; running on the active version, retrying");
                    reachable = false;
                } else {
                    tracing::debug!(%api, %endpoint, %error, "controller still unreachable");
                }
                choice.failed(Instant::now());
                if recovery.look_if_due(&node, Instant::now()) {
                    shared.changed();
                }
                wait_ms = 0;
                // Come back early when the local state changes, else after the interval.
                pause(interval.min(Duration::from_secs(2)), &abort);
            }
        }
    }
}

/// Takes a recovery token the controller sent (`tlm rotate recovery-token`) when it differs
/// from the node's. Returns whether it did. The token is never logged.
fn take_recovery_token(node: &Node, token: &str) -> bool {
    let token = token.trim();
    if !(16..=256).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        tracing::warn!("the controller sent a recovery token that is not 16 to 256 hex digits; keeping the current one");
        return false;
    }
    if node.recovery_token().as_deref() == Some(token) {
        return false;
    }
    match node.replace_recovery_token(token) {
        Ok(()) => {
            tracing::info!(
                "recovery token replaced, as the controller sent it (tlm rotate recovery-token)"
            );
            true
        }
        Err(error) => {
            tracing::error!(%error, "cannot store the new recovery token");
            false
        }
    }
}

/// Downloads and installs the versions the node lacks, adopts a first version, carries out a
/// new order. Returns whether anything changed.
fn act_on(node: &Node, api: SocketAddr, reply: &ReplyBody, report: &NodeReport) -> bool {
    let mut changed = false;
    let order = reply.order.filter(|o| {
        match orders::judge_order(o, node.state.last_order_floor()) {
            Ok(OrderVerdict::New) => true,
            Ok(OrderVerdict::Done) => false,
            Err(error) => {
                tracing::warn!(seq = o.seq, version = o.version, reason = %escaped(&error.to_string()), "order refused");
                false
            }
        }
    });
    // Mirroring takes the newest versions, none older than the newest installed (an install
    // would refuse them: anti-rollback); an order may name any version.
    let highest = report.installed_versions.iter().max().copied().unwrap_or(0);
    let newest: Vec<u32> = reply
        .versions
        .iter()
        .rev()
        .take(KEEP_VERSIONS)
        .copied()
        .filter(|v| *v >= highest)
        .collect();
    let mut wanted: Vec<u32> = newest
        .into_iter()
        .chain(order.map(|o| o.version))
        .filter(|v| !report.installed_versions.contains(v))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut not_installed = None;
    for version in wanted {
        let older = match order {
            Some(o) if o.version == version => Older::Named(version),
            _ => Older::Refuse,
        };
        match fetch_and_install(node, api, version, older) {
            Ok(Installed::New(v)) => {
                tracing::info!(version = v, "received and installed");
                changed = true;
            }
            Ok(Installed::AlreadyPresent(_)) => {}
            Err(error) => {
                tracing::error!(version, error = %escaped(&error), "cannot take version");
                if order.is_some_and(|o| o.version == version) {
                    not_installed = Some(error);
                }
            }
        }
    }
    if report.active_version.is_none() {
        match node.adopt_first_version() {
            Ok(Some(_)) => changed = true,
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "cannot make the first version active"),
        }
    }
    if let Some(order) = order {
        carry_out(node, order, not_installed);
        changed = true;
    }
    changed
}

/// Downloads a version and installs it. The bundle is verified as it streams in: an unsigned
/// or forged one is refused after its first bytes (about 1 MiB decompressed), and the
/// connection dropped, whatever its announced length (at most [`MAX_BUNDLE_BYTES`]).
fn fetch_and_install(
    node: &Node,
    api: SocketAddr,
    version: u32,
    older: Older,
) -> Result<Installed, String> {
    let download = |e: &dyn std::fmt::Display| format!("download: {e}");
    let mut stream =
        TcpStream::connect_timeout(&api, Duration::from_secs(3)).map_err(|e| download(&e))?;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| download(&e))?;
    wire::write_request(
        &mut stream,
        "GET",
        &api.to_string(),
        &format!("{BUNDLE_PATH}{version}"),
        "application/json",
        b"",
    )
    .map_err(|e| download(&e))?;
    let mut reader = BufReader::new(Interruptible {
        stream,
        deadline: Instant::now() + Duration::from_secs(60),
        abort: &|| false,
    });
    let head = wire::read_response_head(&mut reader, MAX_BUNDLE_BYTES).map_err(|e| download(&e))?;
    if head.status != 200 {
        let mut body = Vec::new();
        let _ = reader.take(head.length.min(4096)).read_to_end(&mut body);
        return Err(download(&CallError::Status {
            status: head.status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        }));
    }
    let meter = towalink_bundle::Meter::default();
    let bundle = node
        .state
        .verify_reader((&mut reader).take(head.length), &meter)
        .map_err(|e| e.to_string())?;
    node.install_verified(&bundle, older)
        .map_err(|e| e.to_string())
}

/// Carries out an order; `not_installed` is why its version could not be taken, if it could not.
fn carry_out(node: &Node, order: Order, not_installed: Option<String>) {
    let already = node.state.read().ok().is_some_and(|disk| {
        disk.active_version() == Some(order.version)
            && disk
                .current
                .is_some_and(|s| disk.slot(s).marker != Some(crate::slots::Marker::Bad))
    });
    let result = if already {
        OrderResult::AlreadyActive
    } else if let Some(reason) = not_installed {
        // The version could not be taken: say why, not only that it is missing.
        tracing::error!(version = order.version, reason = %escaped(&reason), "cannot carry out the controller's order");
        OrderResult::Refused(reason)
    } else {
        match node.activate(VersionSpec::Number(order.version), order.confirm_s) {
            Ok(report) => {
                tracing::info!(
                    version = order.version,
                    seq = order.seq,
                    ms = report.activation_ms,
                    "activated by the controller"
                );
                OrderResult::Activated
            }
            Err(Error::RolledBack(reason)) => OrderResult::RolledBack(reason),
            Err(error) => {
                tracing::error!(version = order.version, %error, "cannot carry out the controller's order");
                OrderResult::Refused(error.to_string())
            }
        }
    };
    let outcome = OrderOutcome {
        seq: order.seq,
        version: order.version,
        result,
        time: now(),
    };
    if let Err(error) = node.state.record_order(&outcome) {
        tracing::error!(%error, "cannot record the order");
    }
}

/// An activation made with a confirm timer is confirmed once the controller was reached
/// through it (this sync's reply carried the controller's signature over this report's nonce)
/// and its health checks pass.
fn confirm_if_healthy(node: &Node, report: &NodeReport) {
    let Some(version) = report.active_version else {
        return;
    };
    if report.state == Some(SlotState::Pending)
        && report.confirm_by.is_some()
        && report.health.iter().all(|c| c.ok)
    {
        // Only the version the report was about (an order in this reply may have activated
        // another one since, which has yet to prove itself).
        match node.confirm(version) {
            Ok(true) => tracing::info!(
                version,
                "confirmed: controller reached and health checks pass"
            ),
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "cannot confirm"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_text_is_logged_on_one_line_escaped_and_short() {
        let hostile = format!("\x1b[2J\r\nfake log line\n{}", "x".repeat(1000));
        let line = escaped(&hostile);
        assert!(!line.contains(['\x1b', '\n', '\r']), "{line}");
        assert!(
            line.starts_with("\\u{1b}[2J\\r\\nfake log line\\n"),
            "{line}"
        );
        assert_eq!(line.chars().count(), MAX_LOGGED_CHARS + 1);
        assert_eq!(escaped("seq 5"), "seq 5");
    }

    fn settings(endpoints: &[&str]) -> Management {
        Management {
            controller_endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            ..towalink_bundle::test_support::management("")
        }
    }

    fn endpoint(choice: &LinkChoice) -> String {
        choice.settings().unwrap().controller_endpoints.join(",")
    }

    #[test]
    fn a_pending_versions_settings_are_the_only_ones_tried_endpoint_by_endpoint() {
        let t0 = Instant::now();
        let mut choice = LinkChoice::new(Some(settings(&["old:1"])), t0);
        assert_eq!(endpoint(&choice), "old:1");
        choice.observe(Some(settings(&["new-a:1", "new-b:1"])), true, t0);
        assert_eq!(endpoint(&choice), "new-a:1");
        assert!(choice.through_version());
        // Failures within the try time keep the endpoint.
        choice.failed(t0 + Duration::from_secs(5));
        assert_eq!(endpoint(&choice), "new-a:1");
        choice.failed(t0 + TRY_ENDPOINT);
        assert_eq!(endpoint(&choice), "new-b:1");
        choice.failed(t0 + TRY_ENDPOINT * 2);
        assert_eq!(
            endpoint(&choice),
            "new-a:1",
            "pending: never the old settings"
        );
        assert!(choice.through_version());
    }

    #[test]
    fn a_blessed_version_that_cannot_reach_the_controller_falls_back_in_turn() {
        let t0 = Instant::now();
        let mut choice = LinkChoice::new(Some(settings(&["old:1"])), t0);
        choice.observe(Some(settings(&["wrong:1"])), false, t0);
        assert_eq!(endpoint(&choice), "wrong:1");
        choice.failed(t0 + TRY_ENDPOINT);
        assert_eq!(endpoint(&choice), "old:1");
        assert!(!choice.through_version(), "a fallback confirms nothing");
        assert_eq!(choice.reached(), None, "the working settings stay");
        // Observing the same version again keeps the fallback that works.
        choice.observe(Some(settings(&["wrong:1"])), false, t0 + TRY_ENDPOINT);
        assert_eq!(endpoint(&choice), "old:1");
        // It keeps trying the version's in turn.
        choice.failed(t0 + TRY_ENDPOINT * 2);
        assert_eq!(endpoint(&choice), "wrong:1");
    }

    #[test]
    fn settings_that_reached_the_controller_become_the_working_ones() {
        let t0 = Instant::now();
        let mut choice = LinkChoice::new(Some(settings(&["old:1"])), t0);
        let new = settings(&["new:1"]);
        choice.observe(Some(new.clone()), true, t0);
        assert_eq!(choice.reached(), Some(new.clone()));
        assert_eq!(choice.reached(), None, "saved once");
        assert!(choice.through_version());
        // Blessed later, rolled back to a version without settings: the new ones stay.
        choice.observe(Some(new.clone()), false, t0);
        assert_eq!(endpoint(&choice), "new:1");
        choice.observe(None, false, t0);
        assert_eq!(endpoint(&choice), "new:1");
        assert!(
            choice.through_version(),
            "a version without settings has nothing to prove"
        );
    }

    #[test]
    fn a_rollback_to_the_working_settings_uses_them_at_once() {
        let t0 = Instant::now();
        let old = settings(&["old:1"]);
        let mut choice = LinkChoice::new(Some(old.clone()), t0);
        choice.observe(Some(settings(&["wrong:1"])), true, t0);
        assert_eq!(endpoint(&choice), "wrong:1");
        choice.observe(Some(old), false, t0 + Duration::from_secs(1));
        assert_eq!(endpoint(&choice), "old:1");
        assert!(choice.through_version());
        assert_eq!(choice.reached(), None);
    }

    #[test]
    fn without_any_settings_there_is_no_link() {
        let t0 = Instant::now();
        let mut choice = LinkChoice::new(None, t0);
        assert_eq!(choice.settings(), None);
        choice.failed(t0 + TRY_ENDPOINT);
        assert_eq!(choice.settings(), None);
        choice.observe(Some(settings(&["a:1"])), false, t0);
        assert_eq!(endpoint(&choice), "a:1");
    }

    #[test]
    fn a_held_sync_is_dropped_at_once_when_a_fresh_report_is_due() {
        // A controller that accepts and never answers (a long poll).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api = listener.local_addr().unwrap();
        let holder = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let started = Instant::now();
        let result = call(
            api,
            "POST",
            "/v1/sync",
            b"{}",
            1024,
            Duration::from_secs(60),
            &|| started.elapsed() > Duration::from_millis(300),
        );
        assert!(matches!(result, Err(CallError::Superseded)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(30));
        drop(holder.join());
    }

    #[test]
    fn nonces_differ() {
        let a = nonce();
        assert_eq!(a.len(), 32);
        assert_ne!(a, nonce());
    }
}
