//! `tlm serve`: the controller service. It runs the management WireGuard endpoint in-process
//! (boringtun, one interface, one peer per node whose allowed address is the node's
//! management address), and the management API on the controller's management address only:
//! bound to that address and to the management interface, so a connection from anywhere
//! else is refused by the kernel. Because WireGuard only accepts packets from a node's
//! address when they come with that node's key, the source address of a connection
//! identifies the node. One node cannot take the API from the others: [`limits`] caps the
//! connections per node and in all, and bounds each request and response by a deadline.
//!
//! The service reads the configuration directory (it never writes it, except `status/` and
//! the management key on first start) and notices `tlm commit` / `tlm activate` within
//! 100 ms by watching `generated/config.toml`, `effective/index.toml` and
//! `effective/activation.toml`.

pub mod fleet;
pub mod limits;
pub mod records;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use towalink_bundle::messages::{NodeReport, BUNDLE_PATH, MAX_WAIT_MS, SYNC_PATH};
use towalink_bundle::wire::{self, WireError};
use towalink_netdev::netlink::Netlink;
use towalink_netdev::{boringtun_device, Uapi};

use crate::store::Store;
use crate::{management, Error};
use fleet::Fleet;
use limits::{Backoff, Burst, Deadline, Refusal, Slots};
use records::{NodeRecord, PeerRecord, ServiceRecord};

/// Largest request body (a node report).
pub const MAX_REQUEST_BYTES: u64 = 256 * 1024;

fn failed(what: impl std::fmt::Display) -> Error {
    Error::Service(what.to_string())
}

fn key_hex(base64_key: &str) -> Result<String, Error> {
    Ok(towalink_netdev::key_hex(base64_key, "WireGuard key")?)
}

/// The management endpoint: the boringtun device and its peers.
struct Hub {
    uapi: Uapi,
    /// Peer public key (hex) → node id.
    peers: BTreeMap<String, u32>,
}

impl Hub {
    /// Adds new nodes' peers, removes removed nodes' peers; unchanged peers keep their session.
    fn sync_peers(&mut self, fleet: &Fleet) -> Result<(), Error> {
        let mut wanted = BTreeMap::new();
        for (id, key) in fleet.peers() {
            wanted.insert(key_hex(&key)?, id);
        }
        let mut request = String::from("set=1\n");
        let mut changes = 0;
        for key in self.peers.keys() {
            if !wanted.contains_key(key) {
                request.push_str(&format!("public_key={key}\nremove=true\n"));
                changes += 1;
            }
        }
        for (key, id) in &wanted {
            if self.peers.get(key) != Some(id) {
                let address = fleet.settings.node_address(*id);
                request.push_str(&format!(
                    "public_key={key}\nreplace_allowed_ips=true\nallowed_ip={address}/128\n"
                ));
                changes += 1;
            }
        }
        if changes > 0 {
            request.push('\n');
            self.uapi.request(&request)?;
            tracing::info!(peers = wanted.len(), changes, "management peers updated");
            self.peers = wanted;
        }
        Ok(())
    }

    /// Endpoint and counters of every peer.
    fn peer_records(&mut self) -> Vec<PeerRecord> {
        let Ok(pairs) = self.uapi.request("get=1\n\n") else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for (key, value) in pairs {
            match key.as_str() {
                "public_key" => {
                    if let Some(&node_id) = self.peers.get(&value) {
                        records.push(PeerRecord {
                            node_id,
                            endpoint: None,
                            rx_bytes: 0,
                            tx_bytes: 0,
                        });
                    }
                }
                "endpoint" => {
                    if let Some(r) = records.last_mut() {
                        r.endpoint = Some(value);
                    }
                }
                "rx_bytes" => {
                    if let Some(r) = records.last_mut() {
                        r.rx_bytes = value.parse().unwrap_or(0);
                    }
                }
                "tx_bytes" => {
                    if let Some(r) = records.last_mut() {
                        r.tx_bytes = value.parse().unwrap_or(0);
                    }
                }
                _ => {}
            }
        }
        records
    }
}

/// Binds a listening socket to an interface: connections arriving on any other interface
/// are refused by the kernel.
fn bind_to_device(listener: &TcpListener, interface: &str) -> Result<(), Error> {
    // SAFETY: setsockopt with a valid descriptor and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            interface.as_ptr().cast(),
            interface.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(failed(format!(
            "cannot bind the API to interface {interface}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Runs the service until the process is stopped.
pub fn serve(store: &Store, interface: &str) -> Result<(), Error> {
    let settings = management::settings(store)?;
    let (secret, public) = {
        let _lock = store.lock()?;
        management::controller_key(store)?
    };
    let controller_address = IpAddr::V6(settings.controller_address());
    let (_device, mut uapi) = boringtun_device(interface)?;
    uapi.request(&format!(
        "set=1\nprivate_key={}\nlisten_port={}\nreplace_peers=true\n\n",
        key_hex(secret.expose())?,
        settings.listen_port
    ))?;
    Netlink::new()?.ensure_interface(
        interface,
        towalink_netdev::MANAGEMENT_MTU,
        &[(
            controller_address,
            controller_address,
            settings.pool.prefix_len(),
        )],
    )?;
    let fleet = Arc::new(Fleet::new(store.clone(), settings.clone()));
    fleet.reload_if_changed()?;
    let mut hub = Hub {
        uapi,
        peers: BTreeMap::new(),
    };
    hub.sync_peers(&fleet)?;
    let api = SocketAddr::new(controller_address, settings.api_port);
    let listener =
        TcpListener::bind(api).map_err(|e| failed(format!("cannot listen on {api}: {e}")))?;
    bind_to_device(&listener, interface)?;
    tracing::info!(%api, interface, listen_port = settings.listen_port, public_key = %public, "controller service running");
    eprintln!(
        "tlm serve: management endpoint UDP {} on {interface} (public key {public}), API {api}",
        settings.listen_port
    );
    let file_limit = match limits::raise_file_limit() {
        Ok((limit, before)) => {
            if limit > before {
                tracing::info!(from = before, to = limit, "raised the open-file limit");
            }
            limit
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read or raise the open-file limit; assuming 1024");
            1024
        }
    };
    let connections = limits::connection_cap(file_limit);
    tracing::info!(
        file_limit,
        connections,
        per_node = limits::PER_NODE_CONNECTIONS,
        request_deadline_s = limits::REQUEST_DEADLINE.as_secs(),
        "API limits"
    );
    let endpoints: Arc<Mutex<BTreeMap<u32, String>>> = Arc::default();
    let shared = Arc::new(Api {
        fleet: Arc::clone(&fleet),
        endpoints: Arc::clone(&endpoints),
        slots: Slots::new(limits::PER_NODE_CONNECTIONS, connections),
        bursts: Mutex::default(),
    });
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || accept_loop(listener, &shared))
        .map_err(failed)?;
    let started_ms = records::now_ms();
    let mut next_heartbeat = Instant::now();
    loop {
        match fleet.reload_if_changed() {
            Ok(true) => {
                if let Err(error) = hub.sync_peers(&fleet) {
                    tracing::error!(%error, "cannot update the management peers");
                }
            }
            Ok(false) => {}
            Err(error) => {
                tracing::error!(%error, "cannot read the configuration directory; keeping the last view")
            }
        }
        if Instant::now() >= next_heartbeat {
            next_heartbeat = Instant::now() + Duration::from_secs(1);
            let peers = hub.peer_records();
            if let Ok(mut map) = endpoints.lock() {
                *map = peers
                    .iter()
                    .filter_map(|p| p.endpoint.clone().map(|e| (p.node_id, e)))
                    .collect();
            }
            let record = ServiceRecord {
                pid: std::process::id(),
                started_ms,
                updated_ms: records::now_ms(),
                api: api.to_string(),
                listen_port: settings.listen_port,
                report_interval_s: settings.report_interval_s,
                peers,
            };
            let bytes = serde_json::to_vec_pretty(&record).expect("service record serializes");
            if let Err(error) = records::write_soft(&records::service_path(store), &bytes) {
                tracing::error!(%error, "cannot write the service heartbeat");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the API's threads share.
struct Api {
    fleet: Arc<Fleet>,
    endpoints: Arc<Mutex<BTreeMap<u32, String>>>,
    slots: Slots,
    /// Log pacing, per kind of event: a node can cause refusals as fast as it can connect,
    /// and must not fill the disk with the log.
    bursts: Mutex<BTreeMap<&'static str, Burst>>,
}

impl Api {
    /// Whether to log an event of this kind now (once per burst), and how many went unlogged
    /// before it.
    fn pace(&self, kind: &'static str) -> Option<u64> {
        self.bursts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default()
            .note(Instant::now())
    }
}

/// Takes connections, one thread each, while their source and the service are under their
/// caps; refuses the others at once (503) without reading or waiting on them. When `accept`
/// fails for want of descriptors or memory, sleeps (20 ms doubling to 500 ms) instead of
/// spinning, and logs the start and the end of the burst only.
fn accept_loop(listener: TcpListener, api: &Arc<Api>) {
    let mut backoff = Backoff::default();
    // At the file limit, every connection that ends lets one more in: bursts come one after
    // the other, and are logged once per 10 s.
    let (mut failing, mut recovering) = (Burst::default(), Burst::default());
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => {
                if let Some(failures) = backoff.succeeded() {
                    if let Some(unlogged) = recovering.note(Instant::now()) {
                        tracing::info!(failures, unlogged, "accepting API connections again");
                    }
                }
                accepted
            }
            Err(error) if limits::is_transient(&error) => continue,
            Err(error) => {
                let (delay, first) = backoff.failed();
                if first {
                    if let Some(unlogged) = failing.note(Instant::now()) {
                        tracing::warn!(%error, unlogged, "cannot accept API connections; backing off until resources free up");
                    }
                }
                std::thread::sleep(delay);
                continue;
            }
        };
        let slot = match api.slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                let (held, total) = api.slots.held(peer.ip());
                let message = match refusal {
                    Refusal::Source => format!(
                        "too many connections from this address: at most {} at once",
                        limits::PER_NODE_CONNECTIONS
                    ),
                    Refusal::Total => {
                        format!("the controller serves its maximum of {total} connections")
                    }
                };
                if let Some(unlogged) = api.pace("refused") {
                    tracing::warn!(%peer, held, total, unlogged, "API connection refused: {message}");
                }
                let mut response = Vec::new();
                let _ = wire::write_response(
                    &mut response,
                    503,
                    "text/plain",
                    format!("{message}\n").as_bytes(),
                );
                limits::refuse_at_once(&stream, &response);
                continue;
            }
        };
        let api_thread = Arc::clone(api);
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                handle(stream, peer, &api_thread);
                drop(slot);
            });
        if let Err(error) = spawned {
            if let Some(unlogged) = api.pace("unthreaded") {
                tracing::error!(%error, unlogged, "cannot start a thread for an API connection; closed it");
            }
        }
    }
}

/// Writes a response, all of it within [`limits::RESPONSE_DEADLINE`].
fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) {
    let _ = wire::write_response(
        &mut Deadline::new(stream, limits::RESPONSE_DEADLINE),
        status,
        content_type,
        body,
    );
}

/// Writes a refusal, all of it within [`limits::REFUSAL_DEADLINE`].
fn refuse(stream: &mut TcpStream, status: u16, message: &str) {
    let _ = wire::write_response(
        &mut Deadline::new(stream, limits::REFUSAL_DEADLINE),
        status,
        "text/plain",
        format!("{message}\n").as_bytes(),
    );
}

/// Serves one request on a connection: the whole request must arrive within
/// [`limits::REQUEST_DEADLINE`] of the accept (408 otherwise).
fn handle(mut stream: TcpStream, peer: SocketAddr, api: &Api) {
    let (fleet, endpoints) = (&*api.fleet, &*api.endpoints);
    let node_id = fleet
        .settings
        .node_id_of(peer.ip())
        .filter(|id| fleet.node(*id).is_some());
    let Some(node_id) = node_id else {
        if let Some(unlogged) = api.pace("not-a-node") {
            tracing::warn!(%peer, unlogged, "API request from an address that is no node's management address: refused");
        }
        refuse(&mut stream, 403, "not a node's management address");
        return;
    };
    let request = {
        let mut reader = BufReader::new(Deadline::new(&stream, limits::REQUEST_DEADLINE));
        wire::read_request(&mut reader, MAX_REQUEST_BYTES)
    };
    let request = match request {
        Ok(r) => r,
        Err(WireError::Io(error)) if limits::is_timeout(&error) => {
            let within = limits::REQUEST_DEADLINE.as_secs();
            if let Some(unlogged) = api.pace("expired") {
                tracing::warn!(%peer, node_id, unlogged, "request not complete within {within} s: closed");
            }
            refuse(
                &mut stream,
                408,
                &format!("request not complete within {within} s"),
            );
            return;
        }
        Err(WireError::BodyTooLarge { length, limit }) => {
            if let Some(unlogged) = api.pace("oversize") {
                tracing::warn!(%peer, unlogged, node_id, length, limit, "oversize request refused");
            }
            refuse(
                &mut stream,
                413,
                &format!("body of {length} bytes; at most {limit}"),
            );
            return;
        }
        Err(WireError::Closed) => return,
        Err(error) => {
            if let Some(unlogged) = api.pace("malformed") {
                tracing::warn!(%peer, unlogged, node_id, %error, "malformed request refused");
            }
            refuse(&mut stream, 400, &error.to_string());
            return;
        }
    };
    match (request.method.as_str(), request.path.as_str()) {
        ("POST", SYNC_PATH) => {
            let report: NodeReport = match serde_json::from_slice(&request.body) {
                Ok(r) => r,
                Err(error) => {
                    if let Some(unlogged) = api.pace("malformed-report") {
                        tracing::warn!(%peer, unlogged, node_id, %error, "malformed report refused");
                    }
                    refuse(&mut stream, 400, &format!("report is not valid: {error}"));
                    return;
                }
            };
            if report.node_id != node_id {
                if let Some(unlogged) = api.pace("foreign-report") {
                    tracing::warn!(%peer, unlogged, node_id, claimed = report.node_id, "report for another node refused");
                }
                refuse(
                    &mut stream,
                    403,
                    &format!(
                        "this link belongs to node {node_id}, not {}",
                        report.node_id
                    ),
                );
                return;
            }
            let Some(entry) = fleet.node(node_id) else {
                refuse(&mut stream, 403, "node removed");
                return;
            };
            let record = NodeRecord {
                node: entry.name.to_string(),
                node_id,
                last_seen_ms: records::now_ms(),
                endpoint: endpoints.lock().ok().and_then(|m| m.get(&node_id).cloned()),
                report,
            };
            let bytes = serde_json::to_vec(&record).expect("record serializes");
            if let Err(error) =
                records::write_soft(&records::node_path(fleet.store(), &entry.name), &bytes)
            {
                if let Some(unlogged) = api.pace("status-write") {
                    tracing::error!(%error, unlogged, node = %entry.name, "cannot write the node's status");
                }
            }
            let wait = request
                .query_value("wait_ms")
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
                .min(MAX_WAIT_MS);
            let gone = || limits::peer_gone(&stream);
            let waited = fleet.wait_reply(
                node_id,
                &record.report,
                Duration::from_millis(wait),
                limits::HANGUP_CHECK,
                &gone,
            );
            match waited {
                Some(reply) => respond(
                    &mut stream,
                    200,
                    "application/json",
                    &serde_json::to_vec(&reply).expect("reply serializes"),
                ),
                None if gone() => {
                    tracing::debug!(%peer, node_id, "node stopped waiting for its reply")
                }
                None => refuse(&mut stream, 403, "node removed"),
            }
        }
        ("GET", path) if path.starts_with(BUNDLE_PATH) => {
            let version = path[BUNDLE_PATH.len()..]
                .trim_start_matches('v')
                .parse::<u32>();
            match version.ok().and_then(|v| fleet.bundle_path(node_id, v)) {
                Some(file) => match std::fs::read(&file) {
                    Ok(bytes) => respond(&mut stream, 200, "application/zstd", &bytes),
                    Err(error) => {
                        if let Some(unlogged) = api.pace("bundle-read") {
                            tracing::error!(file = %file.display(), %error, unlogged, "cannot read bundle");
                        }
                        refuse(&mut stream, 500, "cannot read the bundle");
                    }
                },
                None => refuse(&mut stream, 404, "no such version for this node"),
            }
        }
        (method, path) => {
            if let Some(unlogged) = api.pace("unknown") {
                tracing::warn!(%peer, unlogged, node_id, method, path, "unknown API request refused");
            }
            refuse(&mut stream, 404, "unknown request");
        }
    }
}
