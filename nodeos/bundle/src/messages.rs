//! What the controller and a node say to each other, as JSON over the management API (inside
//! the management WireGuard tunnel) and over the attach endpoint (HTTPS, before the node has
//! an identity). Pure data: both sides serialize these types and nothing else.
//!
//! Management API (plain HTTP/1.1 on the controller's management address; WireGuard already
//! authenticates and encrypts, the controller identifies the node by the tunnel address):
//!
//! - `POST /v1/sync?wait_ms=N` with a [`NodeReport`]: the controller records the report and
//!   answers with a [`SyncReply`] at once when it has something new for the node (a version the
//!   node lacks, an order it has not done), otherwise after at most `N` ms or as soon as
//!   something changes (long poll).
//! - `GET /v1/bundle/<N>`: the signed bundle of the node's version N.
//!
//! Attach endpoint (HTTPS, port 8000, open while `tlm attach` runs):
//!
//! - `POST /attach/v1/request` with an [`AttachRequest`]: `202` with an [`AttachWaiting`] until the
//!   operator has chosen, then `200` with an [`AttachGrant`] for the chosen device and `403` for
//!   every other one.

use serde::{Deserialize, Serialize};

/// Path of the sync call.
pub const SYNC_PATH: &str = "/v1/sync";
/// Path prefix of the bundle download.
pub const BUNDLE_PATH: &str = "/v1/bundle/";
/// Path of the attach request.
pub const ATTACH_PATH: &str = "/attach/v1/request";
/// Longest long poll a controller holds.
pub const MAX_WAIT_MS: u64 = 60_000;
/// The TCP port of a node's metrics (Prometheus text), on its management address: the
/// controller relays them (`tlm serve`'s `/metrics/nodes`).
pub const NODE_METRICS_PORT: u16 = 9469;
/// The path of a node's metrics.
pub const METRICS_PATH: &str = "/metrics";

/// A node's report: everything `tlm status` shows about it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: u32,
    /// `<node>.<site>` as the node's identity says.
    pub node: String,
    pub daemon_version: String,
    /// Seconds since the node booted.
    pub uptime_s: u64,
    /// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`): a report from a new
    /// boot has a new one. Empty from nodes before it was reported.
    #[serde(default)]
    pub boot_id: String,
    /// Seconds since the daemon started.
    pub daemon_uptime_s: u64,
    pub active_version: Option<u32>,
    /// The active slot's state.
    pub state: Option<SlotState>,
    pub tries_left: Option<u32>,
    pub confirm_by: Option<u64>,
    pub last_good_version: Option<u32>,
    pub installed_versions: Vec<u32>,
    pub health: Vec<HealthReport>,
    pub last_rollback: Option<RollbackReport>,
    pub tunnels: Vec<TunnelReport>,
    pub bgp: Vec<BgpSession>,
    /// BFD sessions (empty from nodes before they were reported).
    #[serde(default)]
    pub bfd: Vec<BfdSession>,
    /// The last order the node carried out (or refused).
    pub order_done: Option<OrderOutcome>,
    /// Random, new for every report: the controller signs it back in its reply
    /// ([`crate::orders::ReplyBody::nonce`]), so a recorded reply cannot be replayed. Empty from
    /// nodes before signed orders.
    #[serde(default)]
    pub nonce: String,
    /// The name of the node's recovery object (`recovery::object_name` of its token: no
    /// secret), so the controller knows which token the node holds. Absent from nodes before
    /// token rotation: the controller then sends no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_token_id: Option<String>,
    /// The WireGuard public keys the node holds private keys for (its identity's and those
    /// `tlm rotate node` sent), so the controller knows whether to send the current one.
    /// Empty from nodes before key rotation: the controller then sends no key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wg_public_keys: Vec<String>,
    /// The WireGuard public key the node's links run with now (its active version's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<String>,
    /// The controller keys the node trusts now (base64 ed25519): `tlm rotate signing-key
    /// --finish` waits until every node lists the new one. Empty from nodes before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackReport {
    /// Unix time.
    pub time: u64,
    pub from_version: Option<u32>,
    pub to_version: Option<u32>,
    pub reason: String,
}

/// One WireGuard link of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelReport {
    pub interface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds since the link last received anything (a handshake, a keepalive, data), as
    /// seen by the daemon; none when it has received nothing since the daemon started. The
    /// kernel module reports handshake times, boringtun does not: this works for both.
    pub last_rx_age_s: Option<u64>,
}

/// One BGP protocol in BIRD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSession {
    pub name: String,
    /// BIRD's state (`up`, `start`, …) and info (`Established`, `Active`, …).
    pub state: String,
    pub info: String,
}

/// One BFD session as BIRD shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BfdSession {
    /// The neighbor's address.
    pub peer: String,
    pub interface: String,
    /// `Up`, `Down`, `Init`, `AdminDown`.
    pub state: String,
}

/// An activation the controller asks for. `seq` grows with every `tlm activate` of the node
/// (at most [`crate::orders::MAX_ORDER_SEQ`]); a node carries out each order once (it never
/// re-activates a version it rolled back). Only orders inside a signed reply count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub seq: u64,
    pub version: u32,
    /// Roll back unless the version is confirmed (healthy and the controller reached through
    /// it) within this many seconds.
    pub confirm_s: Option<u64>,
}

/// What became of an order on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderOutcome {
    pub seq: u64,
    pub version: u32,
    pub result: OrderResult,
    /// Unix time.
    pub time: u64,
}

/// The state of a slot's version: `good`, `pending` or `bad` on the wire and on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Blessed: its health checks passed or it was confirmed.
    Good,
    /// Activated, waiting for its health checks (or confirmation).
    Pending,
    /// Rolled back (or marked bad).
    Bad,
    /// A state this build does not know (from a newer node): the report is still read.
    #[serde(other)]
    Unknown,
}

impl SlotState {
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Good => "good",
            SlotState::Pending => "pending",
            SlotState::Bad => "bad",
            SlotState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a node made of an order. On the wire (reports) and on disk (the node's
/// `last-order.toml`, the controller's `status/` records) it is the one string every release
/// wrote: `activated`, `already active`, `rolled back: <reason>`, `refused: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderResult {
    Activated,
    /// The version was active (and not bad) already.
    AlreadyActive,
    /// Activated, then rolled back at once (its apply failed).
    RolledBack(String),
    /// Not carried out (the version is missing, refused, ...).
    Refused(String),
    /// A result this build does not know (from a newer node), kept as written.
    Other(String),
}

const ROLLED_BACK: &str = "rolled back: ";
const REFUSED: &str = "refused: ";

impl std::fmt::Display for OrderResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OrderResult::Activated => f.write_str("activated"),
            OrderResult::AlreadyActive => f.write_str("already active"),
            OrderResult::RolledBack(reason) => write!(f, "{ROLLED_BACK}{reason}"),
            OrderResult::Refused(reason) => write!(f, "{REFUSED}{reason}"),
            OrderResult::Other(text) => f.write_str(text),
        }
    }
}

impl From<&str> for OrderResult {
    /// Reads the string form; never fails (an unknown form is [`OrderResult::Other`]).
    fn from(text: &str) -> OrderResult {
        if text == "activated" {
            OrderResult::Activated
        } else if text == "already active" {
            OrderResult::AlreadyActive
        } else if let Some(reason) = text.strip_prefix(ROLLED_BACK) {
            OrderResult::RolledBack(reason.to_string())
        } else if let Some(reason) = text.strip_prefix(REFUSED) {
            OrderResult::Refused(reason.to_string())
        } else {
            OrderResult::Other(text.to_string())
        }
    }
}

impl Serialize for OrderResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OrderResult {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<OrderResult, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(OrderResult::from(text.as_ref()))
    }
}

/// The controller's answer to a sync.
///
/// Nodes from this release act on `signed` only (checked by [`crate::orders::open_reply`]);
/// the unsigned fields repeat its content for nodes before signed orders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// The versions the controller has for this node, oldest first (at most the newest few).
    pub versions: Vec<u32>,
    pub order: Option<Order>,
    /// How long the node should wait before its next sync when nothing happens.
    pub report_interval_s: u64,
    /// The same, signed by the controller for this node and report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<crate::orders::SignedReply>,
}

/// A device asking for a configuration while `tlm attach` runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    /// Random, made by the device for this bootstrap run; the operator picks by it.
    pub device_id: String,
    pub hostname: String,
    /// `uname -m` of the device.
    pub machine: String,
    /// The pairing code the device shows on its console ([`crate::pairing::PairingCode`],
    /// compact): the device secret the operator types. Absent from devices before it; such
    /// devices are turned away.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pairing_code: String,
}

/// The answer until the operator has chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachWaiting {
    pub status: String,
}

/// Everything a chosen device needs to become the node: its identity and secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachGrant {
    pub identity: NodeIdentity,
    /// base64 WireGuard private key.
    pub wg_private_key: String,
    pub recovery_token: String,
}

/// A node's identity without its secrets: `identity/node.toml` on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentity {
    pub node_id: u32,
    pub site: String,
    pub node: String,
    /// The controller's ed25519 public key (base64) that signs bundles.
    pub controller_key: String,
    /// The node's WireGuard public key (base64).
    pub wg_public_key: String,
    /// The management link; absent on a node that runs without a controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management: Option<Management>,
}

/// Where and how the node reaches the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Management {
    /// The controller's WireGuard endpoint(s), `host:port`, tried in order.
    pub controller_endpoints: Vec<String>,
    /// The controller's management WireGuard public key (base64).
    pub controller_wg_public_key: String,
    /// The node's address on the management link.
    pub address: std::net::IpAddr,
    /// The controller's address on the management link (the API listens there).
    pub controller_address: std::net::IpAddr,
    /// TCP port of the management API.
    pub api_port: u16,
    /// UDP port the node's end of the management link uses (0: any).
    #[serde(default)]
    pub listen_port: u16,
    /// Persistent keepalive (seconds) so NAT keeps the link open.
    pub keepalive_s: u16,
}

impl Management {
    /// The management API's address (inside the link).
    pub fn api(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.controller_address, self.api_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_results_keep_the_string_form_both_ways() {
        let cases = [
            ("activated", OrderResult::Activated),
            ("already active", OrderResult::AlreadyActive),
            (
                "rolled back: apply of v3 failed: x",
                OrderResult::RolledBack("apply of v3 failed: x".into()),
            ),
            (
                "refused: no version v3 is installed",
                OrderResult::Refused("no version v3 is installed".into()),
            ),
            ("exploded", OrderResult::Other("exploded".into())),
        ];
        for (text, result) in cases {
            // JSON reports from nodes before the enum, and to controllers before it.
            let json = format!(r#"{{"seq":4,"version":3,"result":{text:?},"time":9}}"#);
            let outcome: OrderOutcome = serde_json::from_str(&json).unwrap();
            assert_eq!(outcome.result, result);
            assert_eq!(serde_json::to_string(&outcome).unwrap(), json);
            // TOML records (last-order.toml, status/ records).
            let toml_text = toml::to_string(&outcome).unwrap();
            assert!(
                toml_text.contains(&format!("result = {text:?}")),
                "{toml_text}"
            );
            assert_eq!(toml::from_str::<OrderOutcome>(&toml_text).unwrap(), outcome);
        }
    }

    #[test]
    fn slot_states_are_the_words_reports_always_had() {
        let report: NodeReport = serde_json::from_str(
            &serde_json::to_string(&NodeReport {
                state: Some(SlotState::Pending),
                ..NodeReport::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(report.state, Some(SlotState::Pending));
        for (word, state) in [
            ("good", SlotState::Good),
            ("pending", SlotState::Pending),
            ("bad", SlotState::Bad),
        ] {
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("{word:?}"));
            assert_eq!(state.to_string(), word);
        }
        // A newer node's state does not make its whole report unreadable.
        assert_eq!(
            serde_json::from_str::<SlotState>(r#""quarantined""#).unwrap(),
            SlotState::Unknown
        );
    }

    #[test]
    fn identity_round_trips_and_rejects_unknown_fields() {
        let identity = NodeIdentity {
            node_id: 3,
            site: "s1".into(),
            node: "r".into(),
            controller_key: "k".into(),
            wg_public_key: "p".into(),
            management: Some(Management {
                controller_endpoints: vec!["192.0.2.1:51819".into()],
                controller_wg_public_key: "c".into(),
                address: "fd54:6f77:616c:ffff::1:3".parse().unwrap(),
                controller_address: "fd54:6f77:616c:ffff::1".parse().unwrap(),
                api_port: 8001,
                listen_port: 0,
                keepalive_s: 25,
            }),
        };
        let text = toml::to_string(&identity).unwrap();
        assert_eq!(toml::from_str::<NodeIdentity>(&text).unwrap(), identity);
        assert!(toml::from_str::<NodeIdentity>(&format!("{text}\nextra = 1\n")).is_err());
        let without: NodeIdentity = toml::from_str(
            "node_id = 1\nsite = \"a\"\nnode = \"x\"\ncontroller_key = \"k\"\nwg_public_key = \"p\"\n",
        )
        .unwrap();
        assert_eq!(without.management, None);
    }
}
