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
    HealthReport, NodeReport, Order, OrderOutcome, OrderResult, RollbackReport, SlotState,
    SyncReply, TunnelReport, BUNDLE_PATH, SYNC_PATH,
};
use towalink_bundle::orders::{self, OrderVerdict, ReplyBody};
use towalink_bundle::wire;

use crate::lifecycle::{Node, VersionSpec};
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
    pub started: Instant,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            generation: AtomicU64::new(0),
            tunnels: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }
}

impl Shared {
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
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
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::Interrupted,
                            "superseded",
                        ));
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
        Err(wire::WireError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
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
    let key = towalink_bundle::verifying_key_from_base64(&identity.controller_key)
        .map_err(|e| format!("identity: controller_key: {e}"))?;
    orders::open_reply(reply.signed.as_ref(), &key, identity.node_id, &report.nonce)
        .map_err(|e| e.to_string())
}

/// The management thread: sync, act on the reply, repeat. Never returns.
pub fn run(node: Node, api: SocketAddr, shared: Arc<Shared>) {
    let mut interval = Duration::from_secs(DEFAULT_INTERVAL_S);
    let mut reachable = true;
    let mut wait_ms = 0u64;
    loop {
        let seen = shared.generation.load(Ordering::SeqCst);
        let report = match build_report(&node, &shared) {
            Ok(report) => report,
            Err(error) => {
                tracing::error!(%error, "cannot build the status report");
                std::thread::sleep(interval);
                continue;
            }
        };
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
                if !reachable {
                    tracing::info!(%api, "controller reachable again");
                    reachable = true;
                }
                let reply = match open_sync_reply(&node, &response.body, &report) {
                    Ok(reply) => reply,
                    Err(reason) => {
                        tracing::warn!(
                            %api,
                            reason = %escaped(&reason),
                            interval_s = interval.as_secs(),
                            "sync reply refused; keeping the last good settings"
                        );
                        wait_ms = 0;
                        pause(interval, &abort);
                        continue;
                    }
                };
                interval = Duration::from_secs(reply.report_interval_s);
                let acted = act_on(&node, api, &reply, &report);
                // The controller (its signature, over this report's nonce) was reached
                // through the active version.
                confirm_if_healthy(&node, &report);
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
                    tracing::warn!(%api, %error, "controller unreachable; running on the active version, retrying");
                    reachable = false;
                } else {
                    tracing::debug!(%api, %error, "controller still unreachable");
                }
                wait_ms = 0;
                // Come back early when the local state changes, else after the interval.
                pause(interval.min(Duration::from_secs(2)), &abort);
            }
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
    if report.state == Some(SlotState::Pending)
        && report.confirm_by.is_some()
        && report.health.iter().all(|c| c.ok)
    {
        match node.mark_good() {
            Ok(version) => tracing::info!(
                version,
                "confirmed: controller reached and health checks pass"
            ),
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

    #[test]
    fn nonces_differ() {
        let a = nonce();
        assert_eq!(a.len(), 32);
        assert_ne!(a, nonce());
    }
}
