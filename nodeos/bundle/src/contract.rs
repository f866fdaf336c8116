//! The controller–node contract: what a version tells its node in `towalink/node.toml`.
//!
//! The controller writes the node's effective attributes there (templates and operators read
//! them); [`NodeConfig`] is the part the node acts on: its links, loopbacks and the lifecycle
//! of the version (boot tries, health checks, health timeout). The fields keep the names and
//! shape the file has always had, so versions made by earlier controllers decode; anything
//! else in the file is ignored.
//!
//! The contract is numbered. `contract` in node.toml is the oldest node contract that
//! understands the version (absent: 1). A node refuses a version that needs a newer contract
//! than [`CONTRACT`] when it installs it, before anything is activated, with an error naming
//! both numbers. A controller writes the lowest number its version needs, so nodes keep
//! taking versions that use nothing new.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::messages::Management;
use crate::VerifiedBundle;

/// Path of the contract file inside a version.
pub const NODE_TOML: &str = "towalink/node.toml";

/// The newest contract this build understands. 2: `signing_keys` (a node that ignored it would
/// keep trusting only its identity's key and refuse every version after the rotation ends).
pub const CONTRACT: u32 = 2;

/// The contract a version listing `signing_keys` needs.
pub const SIGNING_KEYS_CONTRACT: u32 = 2;

/// The contract of a node.toml without a `contract` field (every controller before it).
const FIRST_CONTRACT: u32 = 1;

/// What `node_boot_tries` may be (the controller's schema says the same from here).
pub const BOOT_TRIES: RangeInclusive<u32> = 1..=100;

/// What `node_health_timeout_s` may be, in seconds.
pub const HEALTH_TIMEOUT_S: RangeInclusive<u64> = 1..=86_400;

/// What `recovery_after_s` may be, in seconds.
pub const RECOVERY_AFTER_S: RangeInclusive<u64> = 10..=604_800;
pub const DEFAULT_RECOVERY_AFTER_S: u64 = 3600;
/// What `recovery_confirm_s` may be, in seconds.
pub const RECOVERY_CONFIRM_S: RangeInclusive<u64> = 30..=86_400;
pub const DEFAULT_RECOVERY_CONFIRM_S: u64 = 600;
/// What `recovery_lost_token_boots` may be (0: never).
pub const RECOVERY_LOST_TOKEN_BOOTS: RangeInclusive<u32> = 0..=1000;

/// What a version tells its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// The oldest node contract that understands this version. Written only when above 1, so
    /// versions that use nothing new are byte for byte what earlier controllers made.
    #[serde(default = "first_contract", skip_serializing_if = "is_first_contract")]
    pub contract: u32,
    /// The node's IPv4 loopback (also the local address of every link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loopback_ipv4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loopback_ipv6: Option<Ipv6Addr>,
    /// One point-to-point WireGuard link per peer.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Daemon starts a pending version may use before it is rolled back ([`BOOT_TRIES`]).
    #[serde(default = "default_boot_tries")]
    pub node_boot_tries: u32,
    /// The checks that bless a pending version; absent: see [`NodeConfig::health_checks`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_health_checks: Option<Vec<HealthCheck>>,
    /// Seconds a pending version may take to pass its checks ([`HEALTH_TIMEOUT_S`]).
    #[serde(default = "default_health_timeout_s")]
    pub node_health_timeout_s: u64,
    /// How the node reaches the controller while this version is active: endpoints, the
    /// controller's management key, addresses. Absent (versions of earlier controllers, nodes
    /// without a controller): the settings that last worked, else the identity's. A node
    /// takes a version's settings for good only once it reached the controller through them
    /// (docs/lifecycle.md, "Management settings"). Nodes of contract 1 without this field
    /// ignore it and keep their identity's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management: Option<Management>,
    /// Where the node looks for its recovery objects when it cannot reach the controller
    /// (`http://` URLs, absolute directories; [`crate::recovery::Location`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovery_urls: Vec<String>,
    /// Seconds without reaching the controller before the node looks ([`RECOVERY_AFTER_S`];
    /// absent: [`DEFAULT_RECOVERY_AFTER_S`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_after_s: Option<u64>,
    /// Boots in a row without a management connection after which an object without the
    /// recovery token is accepted; 0: never (absent:
    /// [`crate::recovery::DEFAULT_LOST_TOKEN_BOOTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_lost_token_boots: Option<u32>,
    /// The confirm timer of a version taken from a recovery object ([`RECOVERY_CONFIRM_S`];
    /// absent: [`DEFAULT_RECOVERY_CONFIRM_S`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_confirm_s: Option<u64>,
    /// The node's own WireGuard public key in this version: the node runs its links and its
    /// management link with the private key of this public key (its identity's, or one
    /// `tlm rotate node` sent). Absent (versions before it was read): the identity's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<String>,
    /// The controller keys (base64 ed25519) the node trusts once it blessed this version,
    /// replacing the ones it trusted before (`tlm rotate signing-key`: the old and the new key
    /// while the rotation lasts, then the new one alone). Empty (every version before the
    /// first rotation): the node's trust stays as it is. Needs [`SIGNING_KEYS_CONTRACT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<String>,
    /// OpenSSH public keys the node's management sshd accepts for root (Ansible over the
    /// management link; [`crate::ssh`]). Empty: no sshd. Nodes before it ignore it (and run
    /// no sshd), so it needs no newer contract.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_ssh_authorized_keys: Vec<String>,
}

/// One peer link as the node sees it (the `peers` tables; templates read the same fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// `tlwg<peer id>`.
    pub interface: String,
    pub peer_id: u32,
    pub peer_node: String,
    pub peer_site: String,
    pub peer_asn: u32,
    pub peer_loopback_ipv4: Ipv4Addr,
    pub peer_loopback_ipv6: Ipv6Addr,
    /// The peer's WireGuard public key (base64).
    pub peer_public_key: String,
    /// `host:port` the node sends to; absent when the peer has no `wg_endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_endpoint: Option<String>,
    /// The peer's endpoint address when `wg_endpoint` is an IP address (not a name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_endpoint_ip: Option<IpAddr>,
    /// UDP port of this node's end of the link.
    pub listen_port: u16,
    /// UDP port of the peer's end.
    pub peer_port: u16,
    pub local_link_local: Ipv6Addr,
    pub peer_link_local: Ipv6Addr,
    /// Persistent keepalive in seconds (0: off).
    pub keepalive: u32,
    pub mtu: u32,
}

/// A check a pending version must pass before it is blessed. A new check goes into
/// [`HealthCheck::ALL`] too: the controller's schema accepts the names listed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// Every BGP protocol in BIRD is up and Established.
    Bird,
    /// Every WireGuard link has received traffic from its peer.
    Wireguard,
    /// The controller's management API accepts a connection through the management link.
    Controller,
}

impl HealthCheck {
    /// Every check, in the order the documentation lists them.
    pub const ALL: [HealthCheck; 3] = [
        HealthCheck::Bird,
        HealthCheck::Wireguard,
        HealthCheck::Controller,
    ];

    /// The names of [`HealthCheck::ALL`] (what the controller's schema accepts).
    pub const NAMES: [&'static str; HealthCheck::ALL.len()] = {
        let mut names = [""; HealthCheck::ALL.len()];
        let mut i = 0;
        while i < names.len() {
            names[i] = HealthCheck::ALL[i].name();
            i += 1;
        }
        names
    };

    /// The name in `node_health_checks` and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            HealthCheck::Bird => "bird",
            HealthCheck::Wireguard => "wireguard",
            HealthCheck::Controller => "controller",
        }
    }
}

impl std::fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a node.toml cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("needs node contract {needs}; this node understands up to {understands}: upgrade towalink-node")]
    Newer { needs: u32, understands: u32 },
    #[error("has an invalid `{NODE_TOML}`: {}{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default(), key.as_ref().map(|k| format!("`{k}` ")).unwrap_or_default())]
    Invalid {
        /// 1-based line of the file, when known.
        line: Option<usize>,
        /// The key on that line, when there is one.
        key: Option<String>,
        message: String,
    },
}

/// A version's node.toml refused: `version v7 needs node contract 3; …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version v{version} {error}")]
pub struct VersionRefused {
    pub version: u32,
    pub error: ContractError,
}

fn first_contract() -> u32 {
    FIRST_CONTRACT
}

fn is_first_contract(contract: &u32) -> bool {
    *contract == FIRST_CONTRACT
}

fn default_boot_tries() -> u32 {
    3
}

fn default_health_timeout_s() -> u64 {
    120
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            contract: FIRST_CONTRACT,
            loopback_ipv4: None,
            loopback_ipv6: None,
            peers: Vec::new(),
            node_boot_tries: default_boot_tries(),
            node_health_checks: None,
            node_health_timeout_s: default_health_timeout_s(),
            management: None,
            recovery_urls: Vec::new(),
            recovery_after_s: None,
            recovery_lost_token_boots: None,
            recovery_confirm_s: None,
            wg_public_key: None,
            signing_keys: Vec::new(),
            node_ssh_authorized_keys: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// The contract of a verified version. A version without node.toml (made by hand with no
    /// peers) has the defaults.
    pub fn of(bundle: &VerifiedBundle) -> Result<NodeConfig, VersionRefused> {
        let version = bundle.manifest().version;
        match bundle.files().get(NODE_TOML) {
            None => Ok(NodeConfig::default()),
            Some(bytes) => std::str::from_utf8(bytes)
                .map_err(|_| ContractError::Invalid {
                    line: None,
                    key: None,
                    message: "is not UTF-8".into(),
                })
                .and_then(NodeConfig::from_toml)
                .map_err(|error| VersionRefused { version, error }),
        }
    }

    /// Decodes node.toml: first its contract number (a newer one is refused before anything
    /// else is read, since its fields may mean something this build does not know), then the
    /// fields, then their ranges.
    pub fn from_toml(text: &str) -> Result<NodeConfig, ContractError> {
        let table: toml::Table = text.parse().map_err(|e| invalid(text, &e))?;
        check_contract(&table)?;
        let config: NodeConfig = toml::from_str(text).map_err(|e| invalid(text, &e))?;
        config.check_ranges()?;
        Ok(config)
    }

    /// Decodes node.toml's table as [`NodeConfig::from_toml`] decodes its text: what the
    /// controller is about to write, checked without writing and parsing it. Its errors name
    /// no line or key: decode the text for those.
    pub fn from_table(table: toml::Table) -> Result<NodeConfig, ContractError> {
        check_contract(&table)?;
        let config = NodeConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            ContractError::Invalid {
                line: None,
                key: None,
                message: e.message().trim().to_string(),
            }
        })?;
        config.check_ranges()?;
        Ok(config)
    }

    fn check_ranges(&self) -> Result<(), ContractError> {
        if self.signing_keys.len() > 4
            || self
                .signing_keys
                .iter()
                .any(|k| crate::verifying_key_from_base64(k).is_err())
        {
            return Err(ContractError::Invalid {
                line: None,
                key: Some("signing_keys".into()),
                message: "must be 1 to 4 base64 ed25519 public keys".into(),
            });
        }
        let out_of_range = |key: &str, min: u64, max: u64| ContractError::Invalid {
            line: None,
            key: Some(key.into()),
            message: format!("must be an integer from {min} to {max}"),
        };
        if !BOOT_TRIES.contains(&self.node_boot_tries) {
            return Err(out_of_range(
                "node_boot_tries",
                u64::from(*BOOT_TRIES.start()),
                u64::from(*BOOT_TRIES.end()),
            ));
        }
        if self
            .recovery_after_s
            .is_some_and(|s| !RECOVERY_AFTER_S.contains(&s))
        {
            return Err(out_of_range(
                "recovery_after_s",
                *RECOVERY_AFTER_S.start(),
                *RECOVERY_AFTER_S.end(),
            ));
        }
        if self
            .recovery_confirm_s
            .is_some_and(|s| !RECOVERY_CONFIRM_S.contains(&s))
        {
            return Err(out_of_range(
                "recovery_confirm_s",
                *RECOVERY_CONFIRM_S.start(),
                *RECOVERY_CONFIRM_S.end(),
            ));
        }
        if self
            .recovery_lost_token_boots
            .is_some_and(|n| !RECOVERY_LOST_TOKEN_BOOTS.contains(&n))
        {
            return Err(out_of_range(
                "recovery_lost_token_boots",
                u64::from(*RECOVERY_LOST_TOKEN_BOOTS.start()),
                u64::from(*RECOVERY_LOST_TOKEN_BOOTS.end()),
            ));
        }
        if let Some(bad) = self
            .recovery_urls
            .iter()
            .find_map(|u| crate::recovery::Location::parse(u).err())
        {
            return Err(ContractError::Invalid {
                line: None,
                key: Some("recovery_urls".into()),
                message: bad,
            });
        }
        if !HEALTH_TIMEOUT_S.contains(&self.node_health_timeout_s) {
            return Err(out_of_range(
                "node_health_timeout_s",
                *HEALTH_TIMEOUT_S.start(),
                *HEALTH_TIMEOUT_S.end(),
            ));
        }
        Ok(())
    }

    /// The checks that bless a pending version: `node_health_checks`, or `bird` when it is
    /// absent and the version configures BIRD (`configures_bird`), else none.
    pub fn health_checks(&self, configures_bird: bool) -> Vec<HealthCheck> {
        match &self.node_health_checks {
            Some(checks) => checks.clone(),
            None if configures_bird => vec![HealthCheck::Bird],
            None => Vec::new(),
        }
    }

    /// The WireGuard interfaces of the version.
    pub fn interfaces(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.interface.clone()).collect()
    }
}

/// The contract node.toml needs: refused when newer than this build's (before anything else
/// is read, since its fields may mean something this build does not know).
fn check_contract(table: &toml::Table) -> Result<(), ContractError> {
    let needs = match table.get("contract") {
        None => FIRST_CONTRACT,
        Some(toml::Value::Integer(n)) if *n >= 1 => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(_) => {
            return Err(ContractError::Invalid {
                line: None,
                key: Some("contract".into()),
                message: "must be a positive integer".into(),
            })
        }
    };
    if needs > CONTRACT {
        return Err(ContractError::Newer {
            needs,
            understands: CONTRACT,
        });
    }
    Ok(())
}

/// A TOML error as one line: where (line, key) and what.
fn invalid(text: &str, error: &toml::de::Error) -> ContractError {
    let line = error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let key = line
        .and_then(|l| text.lines().nth(l - 1))
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim().to_string())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    ContractError::Invalid {
        line,
        key,
        message: error.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// node.toml exactly as `tlm` wrote it before the contract was typed (one with a peer
    /// endpoint and every attribute set, one whose peer has none).
    const TODAY_R1: &str = include_str!("../../../tests/fixtures/node-toml-contract1/r1.s1.toml");
    const TODAY_MAIN: &str =
        include_str!("../../../tests/fixtures/node-toml-contract1/main.hq.toml");

    #[test]
    fn node_toml_from_controllers_before_the_contract_decodes() {
        let config = NodeConfig::from_toml(TODAY_R1).unwrap();
        assert_eq!(config.contract, 1);
        assert_eq!(config.loopback_ipv4, Some(Ipv4Addr::new(10, 254, 0, 1)));
        assert_eq!(config.node_boot_tries, 2);
        assert_eq!(config.node_health_timeout_s, 120);
        assert_eq!(
            config.health_checks(false),
            [HealthCheck::Bird, HealthCheck::Wireguard]
        );
        assert_eq!(config.interfaces(), ["tlwg2"]);
        let peer = &config.peers[0];
        assert_eq!(peer.listen_port, 51822);
        assert_eq!(peer.peer_endpoint.as_deref(), Some("203.0.113.30:51821"));
        assert_eq!(
            peer.local_link_local,
            "fe80::1:0:2".parse::<Ipv6Addr>().unwrap()
        );

        let main = NodeConfig::from_toml(TODAY_MAIN).unwrap();
        assert_eq!(main.peers[0].peer_endpoint, None);
        assert_eq!(main.node_boot_tries, 3);
    }

    #[test]
    fn the_contract_fields_serialize_as_node_toml_has_them() {
        // Writing the typed fields over the file's own values changes no byte: the controller
        // writes versions that nodes before the contract read as before.
        for today in [TODAY_R1, TODAY_MAIN] {
            let config = NodeConfig::from_toml(today).unwrap();
            let mut table: toml::Table = today.parse().unwrap();
            let typed = toml::Table::try_from(&config).unwrap();
            assert!(!typed.contains_key("contract"), "contract 1 is implied");
            table.extend(typed);
            assert_eq!(toml::to_string(&table).unwrap(), today);
        }
    }

    #[test]
    fn management_settings_travel_in_node_toml_and_are_optional() {
        let management = Management {
            controller_endpoints: vec!["ctl.example:51820".into(), "[2001:db8::9]:51820".into()],
            ..crate::test_support::management("")
        };
        let mut table: toml::Table = TODAY_R1.parse().unwrap();
        table.extend(
            toml::Table::try_from(&NodeConfig {
                management: Some(management.clone()),
                ..NodeConfig::from_toml(TODAY_R1).unwrap()
            })
            .unwrap(),
        );
        let text = toml::to_string(&table).unwrap();
        let config = NodeConfig::from_toml(&text).unwrap();
        assert_eq!(config.management, Some(management));
        assert_eq!(config.contract, 1, "nodes of contract 1 ignore it");
        assert_eq!(NodeConfig::from_toml(TODAY_R1).unwrap().management, None);
        let error = NodeConfig::from_toml(&text.replace("api_port = 8001", "api_port = 99999"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("`api_port`"), "{error}");
    }

    #[test]
    fn every_health_check_is_listed_once_under_the_name_node_toml_uses() {
        for (check, name) in HealthCheck::ALL.into_iter().zip(HealthCheck::NAMES) {
            assert_eq!(check.name(), name);
            let decoded = NodeConfig::from_toml(&format!("node_health_checks = [\"{name}\"]"))
                .unwrap()
                .health_checks(false);
            assert_eq!(decoded, [check]);
        }
        let unique: std::collections::BTreeSet<_> = HealthCheck::ALL.into_iter().collect();
        assert_eq!(unique.len(), HealthCheck::ALL.len());
    }

    #[test]
    fn missing_fields_take_the_defaults() {
        let config = NodeConfig::from_toml("").unwrap();
        assert_eq!(config, NodeConfig::default());
        assert_eq!(config.health_checks(true), [HealthCheck::Bird]);
        assert_eq!(config.health_checks(false), []);
        let none = NodeConfig::from_toml("node_health_checks = []").unwrap();
        assert_eq!(none.health_checks(true), []);
    }

    #[test]
    fn a_newer_contract_is_refused_naming_both_numbers() {
        // Even when the rest means nothing to this build.
        let text = "contract = 3\nnode_health_checks = [\"quantum\"]\n[peers]\nx = 1\n";
        assert_eq!(
            NodeConfig::from_toml(text),
            Err(ContractError::Newer {
                needs: 3,
                understands: 2
            })
        );
        let refused = VersionRefused {
            version: 7,
            error: NodeConfig::from_toml(text).unwrap_err(),
        };
        assert_eq!(
            refused.to_string(),
            "version v7 needs node contract 3; this node understands up to 2: upgrade towalink-node"
        );
        assert_eq!(NodeConfig::from_toml("contract = 1").unwrap().contract, 1);
        let written = toml::to_string(&NodeConfig {
            contract: 3,
            ..NodeConfig::default()
        })
        .unwrap();
        assert!(written.starts_with("contract = 3\n"), "{written}");
        for bad in ["contract = 0", "contract = \"2\"", "contract = -1"] {
            let error = NodeConfig::from_toml(bad).unwrap_err().to_string();
            assert!(
                error.contains("`contract` must be a positive integer"),
                "{error}"
            );
        }
    }

    fn any_peer() -> impl proptest::strategy::Strategy<Value = Peer> {
        use proptest::prelude::*;
        let ip = prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::from(Ipv6Addr::from(a))),
        ];
        (
            (
                "[a-z0-9]{1,15}",
                any::<u32>(),
                "[a-z0-9-]{1,20}",
                "[a-z0-9-]{1,20}",
            ),
            (
                any::<u32>(),
                any::<u32>(),
                any::<u128>(),
                "[A-Za-z0-9+/]{43}=",
            ),
            (
                proptest::option::of("[a-z0-9.:\\[\\]-]{1,30}"),
                proptest::option::of(ip),
            ),
            (any::<u16>(), any::<u16>(), any::<u128>(), any::<u128>()),
            (any::<u32>(), any::<u32>()),
        )
            .prop_map(|(a, b, c, d, e)| Peer {
                interface: a.0,
                peer_id: a.1,
                peer_node: a.2,
                peer_site: a.3,
                peer_asn: b.0,
                peer_loopback_ipv4: Ipv4Addr::from(b.1),
                peer_loopback_ipv6: Ipv6Addr::from(b.2),
                peer_public_key: b.3,
                peer_endpoint: c.0,
                peer_endpoint_ip: c.1,
                listen_port: d.0,
                peer_port: d.1,
                local_link_local: Ipv6Addr::from(d.2),
                peer_link_local: Ipv6Addr::from(d.3),
                keepalive: e.0,
                mtu: e.1,
            })
    }

    proptest::proptest! {
        /// The controller encodes peers with serde and does not decode them again before it
        /// writes node.toml: every peer decodes from that text as itself.
        #[test]
        fn every_peer_decodes_as_itself(peers in proptest::collection::vec(any_peer(), 0..4)) {
            let mut table = toml::Table::new();
            table.insert("peers".into(), toml::Value::try_from(&peers).unwrap());
            let text = toml::to_string(&table).unwrap();
            let config = NodeConfig::from_toml(&text).unwrap();
            proptest::prop_assert_eq!(config.peers, peers);
        }
    }

    #[test]
    fn the_table_decodes_as_the_text() {
        let mut newer = TODAY_R1.parse::<toml::Table>().unwrap();
        newer.insert(
            "contract".into(),
            toml::Value::Integer(i64::from(CONTRACT) + 1),
        );
        let newer = toml::to_string(&newer).unwrap();
        for text in [
            TODAY_R1,
            TODAY_MAIN,
            newer.as_str(),
            "node_boot_tries = 2\nnode_health_checks = [\"bogus\"]\n",
            "node_boot_tries = 0",
            "[[peers]]\ninterface = \"tlwg2\"\n",
            "node_health_timeout_s = 0",
            "loopback_ipv4 = \"not an address\"",
            "contract = \"one\"",
        ] {
            let table: toml::Table = text.parse().unwrap();
            match (NodeConfig::from_toml(text), NodeConfig::from_table(table)) {
                (Ok(from_text), Ok(from_table)) => assert_eq!(from_text, from_table),
                (Err(_), Err(_)) => {}
                (from_text, from_table) => {
                    panic!("{text}: the text gives {from_text:?}, the table {from_table:?}")
                }
            }
        }
    }

    #[test]
    fn invalid_values_are_one_line_naming_line_and_key() {
        let text = "node_boot_tries = 2\nnode_health_checks = [\"bogus\"]\n";
        let error = NodeConfig::from_toml(text).unwrap_err().to_string();
        assert!(
            error.starts_with("has an invalid `towalink/node.toml`: line 2: `node_health_checks` unknown variant `bogus`"),
            "{error}"
        );
        assert!(!error.contains('\n'), "{error}");
        let error = NodeConfig::from_toml("node_boot_tries = 0").unwrap_err();
        assert_eq!(
            error.to_string(),
            "has an invalid `towalink/node.toml`: `node_boot_tries` must be an integer from 1 to 100"
        );
        let error = NodeConfig::from_toml("[[peers]]\ninterface = \"tlwg2\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing field"), "{error}");
        assert!(NodeConfig::from_toml("node_health_timeout_s = 0").is_err());
        assert!(NodeConfig::from_toml("loopback_ipv4 = \"not an address\"").is_err());
    }
}
