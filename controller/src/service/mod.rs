//! `tlm serve`: the controller service. [`run`] sets up the management WireGuard endpoint
//! in-process (boringtun, one interface, one peer per node whose allowed address is the
//! node's management address: the hub), binds the management API on the controller's
//! management address only (to that address and to the management interface, so a
//! connection from anywhere else is refused by the kernel), and runs the API
//! ([`server::serve`]) beside the hub's loop until its [`Shutdown`] is triggered. Because
//! WireGuard only accepts packets from a node's address when they come with that node's key,
//! the source address of a connection identifies the node. One node cannot take the API from
//! the others: [`limits`] caps the connections per node and in all, and bounds each request
//! and response by a deadline.
//!
//! - [`api`]: the router and its refusals, pure; [`server`]: the connections around it.
//! - [`fleet`]: what the service knows (the view of the directory, the long polls).
//! - [`records`]: the `status/` files it leaves for `tlm status` and `tlm activate`.
//! - The stop signal every loop watches is [`towalink_system::Shutdown`] (SIGTERM/SIGINT
//!   trigger it in `tlm serve`: [`towalink_system::stop_on_signals`]).
//!
//! The service reads the configuration directory (it never writes it, except `status/` and
//! the management key on first start) and notices `tlm commit` / `tlm activate` within
//! 100 ms by watching `generated/config.toml`, `effective/index.toml` and
//! `effective/activation.toml`.

pub mod alerts;
pub mod api;
pub mod fleet;
pub mod limits;
pub mod metrics;
pub mod operator;
pub mod operator_api;
pub mod records;
pub mod server;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use towalink_netdev::netlink::Netlink;
use towalink_netdev::{boringtun_device, Uapi};
use towalink_system::Shutdown;

use crate::store::Store;
use crate::Error;
use fleet::Fleet;
use limits::ApiLimits;
use records::{PeerRecord, ServiceRecord};

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
        // boringtun keeps a peer's `remove` for the rest of a request: removals go in a
        // request of their own, before the additions (a rotated node's key is both).
        let mut removals = String::from("set=1\n");
        let mut additions = String::from("set=1\n");
        let mut changes = 0;
        for key in self.peers.keys() {
            if !wanted.contains_key(key) {
                removals.push_str(&format!("public_key={key}\nremove=true\n"));
                changes += 1;
            }
        }
        for (key, id) in &wanted {
            if self.peers.get(key) != Some(id) {
                let address = fleet.settings.node_address(*id);
                additions.push_str(&format!(
                    "public_key={key}\nreplace_allowed_ips=true\nallowed_ip={address}/128\n"
                ));
                changes += 1;
            }
        }
        if changes > 0 {
            for request in [removals, additions] {
                if request.len() > "set=1\n".len() {
                    self.uapi.request(&format!("{request}\n"))?;
                }
            }
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
    socket2::SockRef::from(listener)
        .bind_device(Some(interface.as_bytes()))
        .map_err(|e| failed(format!("cannot bind the API to interface {interface}: {e}")))
}

/// Runs the service until `shutdown` is triggered: sets up the management endpoint and the
/// API's listener, serves the API on a thread of its own, and runs the hub's loop (reload,
/// peers, heartbeat) on this one. On the stop, waits for the API to finish its requests (up to
/// [`limits::SHUTDOWN_GRACE`]) and removes the management interface.
pub fn run(
    store: &Store,
    interface: &str,
    operator_listen: Option<SocketAddr>,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let settings = crate::store::keys::settings(store)?;
    let (secret, public) = {
        let _lock = store.lock()?;
        crate::store::keys::controller_key(store)?
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
    // The operator's address first: refused before the nodes see a service.
    let operator_listener = operator_listen
        .map(|address| {
            TcpListener::bind(address)
                .map_err(|e| failed(format!("--operator-listen {address}: cannot listen: {e}")))
        })
        .transpose()?;
    let api = SocketAddr::new(controller_address, settings.api_port);
    let listener =
        TcpListener::bind(api).map_err(|e| failed(format!("cannot listen on {api}: {e}")))?;
    bind_to_device(&listener, interface)?;
    // std listens with a backlog of 128; a fleet reconnects together (1,000 long polls end at
    // once after an activation), and past the backlog a node waits for SYN retransmits or is
    // reset. The kernel caps it at net.core.somaxconn.
    socket2::SockRef::from(&listener)
        .listen(limits::LISTEN_BACKLOG)
        .map_err(|e| failed(format!("cannot listen on {api}: {e}")))?;
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
    let api_limits = ApiLimits::for_file_limit(file_limit);
    tracing::info!(
        file_limit,
        connections = api_limits.connections,
        per_node = api_limits.per_node,
        request_deadline_s = api_limits.request_deadline.as_secs(),
        "API limits"
    );
    let server = {
        let (fleet, shutdown) = (Arc::clone(&fleet), shutdown.clone());
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let served = server::serve(listener, fleet, api_limits, &shutdown);
                // A server that ends on its own ends the service.
                shutdown.trigger();
                served
            })
            .map_err(failed)?
    };
    let started_ms = records::now_ms();
    let operator = match operator_listener {
        Some(listener) => {
            let address = listener.local_addr().map_err(failed)?;
            tracing::info!(%address, "operator listener: /metrics, /metrics/nodes");
            let (shutdown, operator) = (
                shutdown.clone(),
                operator::Operator {
                    fleet: Arc::clone(&fleet),
                    started_ms,
                },
            );
            Some(
                std::thread::Builder::new()
                    .name("operator".into())
                    .spawn(move || {
                        let served = operator::serve(listener, operator, &shutdown);
                        if let Err(error) = &served {
                            tracing::error!(%error, "the operator listener stopped");
                        }
                        served
                    })
                    .map_err(failed)?,
            )
        }
        None => None,
    };
    let alerting = {
        let (fleet, shutdown) = (Arc::clone(&fleet), shutdown.clone());
        std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || alerts::run(&fleet, started_ms, &shutdown))
            .map_err(failed)?
    };
    let heartbeat = Heartbeat {
        path: records::service_path(store),
        started_ms,
        api: api.to_string(),
        listen_port: settings.listen_port,
        report_interval_s: settings.report_interval_s,
    };
    hub_loop(&mut hub, &fleet, &heartbeat, shutdown);
    let served = server
        .join()
        .unwrap_or_else(|_| Err(failed("the API thread panicked")));
    if let Some(operator) = operator {
        let _ = operator.join();
    }
    let _ = alerting.join();
    tracing::info!("controller service stopped");
    served
}

/// What the heartbeat (`status/service.json`) says besides the peers.
struct Heartbeat {
    path: std::path::PathBuf,
    started_ms: u64,
    api: String,
    listen_port: u16,
    report_interval_s: u64,
}

/// Every 100 ms until `shutdown`: reloads the fleet when `tlm` changed the directory (and then
/// the management peers); every second, reads the peers' endpoints and counters and writes
/// the heartbeat.
fn hub_loop(hub: &mut Hub, fleet: &Fleet, heartbeat: &Heartbeat, shutdown: &Shutdown) {
    let mut next_heartbeat = Instant::now();
    // A peer error that persists is logged once a minute, not every round.
    let mut last_peer_error: Option<(String, Instant)> = None;
    loop {
        if let Err(error) = fleet.reload_if_changed() {
            tracing::error!(%error, "cannot read the configuration directory; keeping the last view")
        }
        // Every round: a rotated node not heard on one key is offered the other.
        match hub.sync_peers(fleet) {
            Ok(()) => last_peer_error = None,
            Err(error) => {
                let text = error.to_string();
                let again = last_peer_error.as_ref().is_some_and(|(last, at)| {
                    *last == text && at.elapsed() < Duration::from_secs(60)
                });
                if !again {
                    tracing::error!(%error, "cannot update the management peers");
                    last_peer_error = Some((text, Instant::now()));
                }
            }
        }
        if Instant::now() >= next_heartbeat {
            next_heartbeat = Instant::now() + Duration::from_secs(1);
            let peers = hub.peer_records();
            fleet.received(peers.iter().map(|p| (p.node_id, p.rx_bytes)));
            fleet.set_endpoints(
                peers
                    .iter()
                    .filter_map(|p| p.endpoint.clone().map(|e| (p.node_id, e)))
                    .collect(),
            );
            let record = ServiceRecord {
                pid: std::process::id(),
                started_ms: heartbeat.started_ms,
                updated_ms: records::now_ms(),
                api: heartbeat.api.clone(),
                listen_port: heartbeat.listen_port,
                report_interval_s: heartbeat.report_interval_s,
                peers,
            };
            let bytes = serde_json::to_vec_pretty(&record).expect("service record serializes");
            if let Err(error) = records::write_soft(&heartbeat.path, &bytes) {
                tracing::error!(%error, "cannot write the service heartbeat");
            }
        }
        if shutdown.sleep(Duration::from_millis(100)) {
            return;
        }
    }
}
