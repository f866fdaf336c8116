//! What the running service leaves for `tlm status` and `tlm activate`: one JSON file per node
//! (`status/nodes/<node>.<site>.json`, its last report and when it was seen) and the service's
//! heartbeat (`status/service.json`). Soft state: written atomically (temp file + rename) but
//! not fsynced, out of git; losing it in a power cut loses nothing the nodes will not report
//! again within seconds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use towalink_bundle::messages::NodeReport;

use crate::model::names::NodeFullName;
use crate::store::Store;

pub const STATUS_DIR: &str = "status";

/// The service is considered down when its heartbeat is older than this.
pub const HEARTBEAT_STALE_MS: u64 = 10_000;

/// A node's last report as the service received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub node_id: u32,
    /// Unix time in milliseconds.
    pub last_seen_ms: u64,
    /// The node's underlay address as WireGuard last saw it.
    pub endpoint: Option<String>,
    pub report: NodeReport,
    /// The WireGuard public key of the management peer the report came through (absent in
    /// records of services before key rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_key: Option<String>,
}

/// One management peer as the controller's WireGuard sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRecord {
    pub node_id: u32,
    pub endpoint: Option<String>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The service's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub pid: u32,
    pub started_ms: u64,
    pub updated_ms: u64,
    /// `[address]:port` of the management API.
    pub api: String,
    pub listen_port: u16,
    pub report_interval_s: u64,
    pub peers: Vec<PeerRecord>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn node_path(store: &Store, node: &NodeFullName) -> PathBuf {
    store
        .root()
        .join(STATUS_DIR)
        .join("nodes")
        .join(format!("{node}.json"))
}

/// What the alert rule remembers (`status/alerts.json`, [`super::alerts::AlertState`]).
pub fn alerts_path(store: &Store) -> PathBuf {
    store.root().join(STATUS_DIR).join("alerts.json")
}

pub fn service_path(store: &Store) -> PathBuf {
    store.root().join(STATUS_DIR).join("service.json")
}

/// Writes soft state: temp file and rename, no fsync.
pub fn write_soft(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, path)
}

pub fn read_node(store: &Store, node: &NodeFullName) -> Option<NodeRecord> {
    let bytes = std::fs::read(node_path(store, node)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The service's heartbeat, when the service is running (fresh heartbeat, live process).
pub fn running_service(store: &Store) -> Option<ServiceRecord> {
    let bytes = std::fs::read(service_path(store)).ok()?;
    let record: ServiceRecord = serde_json::from_slice(&bytes).ok()?;
    // Signal 0 only checks that the process exists (and may be signalled by us).
    let alive = i32::try_from(record.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok());
    (alive && now_ms().saturating_sub(record.updated_ms) < HEARTBEAT_STALE_MS).then_some(record)
}
