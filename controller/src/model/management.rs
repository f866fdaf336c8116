//! The management link's settings: where the controller listens, the management addresses
//! (derived from the pool and the never-reused node ids), the controller's endpoints and the
//! addresses they name. Pure; the keys and a node's identity are in [`crate::store::keys`].

use std::net::{IpAddr, Ipv6Addr};

use towalink_bundle::messages::Management;

use crate::model::attributes::Merged;
use crate::model::resolve::{attribute_error, complete_error, ResolveError};
use crate::model::schema;

/// The controller's management WireGuard key.
pub const MANAGEMENT_KEY: &str = "certs/management.key";
pub const MANAGEMENT_PUB: &str = "certs/management.pub";

/// Offset of node addresses in the pool: node N gets pool + 0x1_0000 + N (`…::1:<N in hex>`),
/// the controller pool + 1.
const NODE_OFFSET: u128 = 0x1_0000;

/// The management settings (global attributes `mgmt_*` and `controller_endpoint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementSettings {
    pub pool: ipnet::Ipv6Net,
    pub listen_port: u16,
    pub api_port: u16,
    pub keepalive_s: u16,
    pub report_interval_s: u64,
    /// Where nodes reach the controller's WireGuard endpoint (`host:port`); empty when unset.
    pub controller_endpoints: Vec<String>,
}

/// The attributes the settings are read from.
const ATTRIBUTES: [&str; 6] = [
    "mgmt_ipv6_pool",
    "mgmt_listen_port",
    "mgmt_api_port",
    "mgmt_keepalive",
    "mgmt_report_interval_s",
    "controller_endpoint",
];

/// A value the schema has checked: absent is the only way to be unusable (the built-in
/// defaults set them all; a hand-edited global file may remove one from those).
fn checked<T: std::str::FromStr>(merged: &Merged, key: &str) -> Result<T, ResolveError> {
    let value = match merged.values.get(key) {
        Some(toml::Value::String(s)) => s.parse().ok(),
        Some(toml::Value::Integer(n)) => n.to_string().parse().ok(),
        _ => None,
    };
    value.ok_or_else(|| attribute_error(merged, key, "is missing"))
}

impl ManagementSettings {
    /// Reads the settings from merged global attributes, checked against the schema first (the
    /// global file may have been edited by hand). Pure.
    pub fn from_attributes(merged: &Merged) -> Result<ManagementSettings, ResolveError> {
        for name in ATTRIBUTES {
            if let (Some(attribute), Some(value)) = (schema::lookup(name), merged.values.get(name))
            {
                schema::check_value(attribute, value, true)
                    .map_err(|violation| complete_error(merged, &violation))?;
            }
        }
        let listen_port = checked(merged, "mgmt_listen_port")?;
        let endpoints: Vec<&str> = match merged.values.get("controller_endpoint") {
            Some(toml::Value::String(s)) => vec![s.as_str()],
            Some(toml::Value::Array(items)) => {
                items.iter().filter_map(toml::Value::as_str).collect()
            }
            _ => Vec::new(),
        };
        Ok(ManagementSettings {
            pool: checked(merged, "mgmt_ipv6_pool")?,
            listen_port,
            api_port: checked(merged, "mgmt_api_port")?,
            keepalive_s: checked(merged, "mgmt_keepalive")?,
            report_interval_s: checked(merged, "mgmt_report_interval_s")?,
            controller_endpoints: endpoints
                .into_iter()
                .map(|e| with_port(e, listen_port))
                .collect(),
        })
    }

    /// The controller's management address (the pool's first host).
    pub fn controller_address(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.pool.network()) + 1)
    }

    /// A node's management address.
    pub fn node_address(&self, node_id: u32) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.pool.network()) + NODE_OFFSET + u128::from(node_id))
    }

    /// What a node is told about its management link (identity and versions alike): none
    /// without a `controller_endpoint`.
    pub fn node_link(&self, node_id: u32, controller_wg_public_key: &str) -> Option<Management> {
        (!self.controller_endpoints.is_empty()).then(|| Management {
            controller_endpoints: self.controller_endpoints.clone(),
            controller_wg_public_key: controller_wg_public_key.to_string(),
            address: IpAddr::V6(self.node_address(node_id)),
            controller_address: IpAddr::V6(self.controller_address()),
            api_port: self.api_port,
            listen_port: 0,
            keepalive_s: self.keepalive_s,
        })
    }

    /// The node id a management address belongs to.
    pub fn node_id_of(&self, address: IpAddr) -> Option<u32> {
        let IpAddr::V6(v6) = address else {
            return None;
        };
        if !self.pool.contains(&v6) {
            return None;
        }
        let offset = u128::from(v6) - u128::from(self.pool.network());
        offset
            .checked_sub(NODE_OFFSET)
            .and_then(|id| u32::try_from(id).ok())
            .filter(|id| *id > 0)
    }
}

/// What versions tell their nodes about the management link: the settings and the
/// controller's management public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionManagement {
    pub settings: ManagementSettings,
    pub controller_wg_public_key: String,
}

impl VersionManagement {
    /// A node's management settings (none without a `controller_endpoint`).
    pub fn for_node(&self, node_id: u32) -> Option<Management> {
        self.settings
            .node_link(node_id, &self.controller_wg_public_key)
    }
}

/// `host:port`, adding `port` when the endpoint (`host[:port]`, checked by the schema) has
/// none.
fn with_port(endpoint: &str, port: u16) -> String {
    if let Ok(ip) = endpoint.parse::<IpAddr>() {
        return std::net::SocketAddr::new(ip, port).to_string();
    }
    if endpoint.contains(':') {
        // `host:port`, `IPv4:port` or `[IPv6]:port`.
        return endpoint.to_string();
    }
    format!("{endpoint}:{port}")
}

/// The IP address of an endpoint `host[:port]` when its host is an address literal (names are
/// resolved only on the node, later). Used to keep the data plane from routing the way to the
/// controller into a tunnel.
pub fn endpoint_ip(endpoint: &str) -> Option<IpAddr> {
    let endpoint = endpoint.trim();
    if let Ok(ip) = endpoint.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = endpoint.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    let (host, _) = endpoint.rsplit_once(':')?;
    host.parse().ok()
}

/// The address literals among `controller_endpoint`'s entries (a string or a list).
pub fn controller_endpoint_ips(value: Option<&toml::Value>) -> Vec<IpAddr> {
    let entries: Vec<&str> = match value {
        Some(toml::Value::String(s)) => vec![s.as_str()],
        Some(toml::Value::Array(items)) => items.iter().filter_map(toml::Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut ips: Vec<IpAddr> = entries.into_iter().filter_map(endpoint_ip).collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attributes::{defaults, Level};

    fn merged(extra: &str) -> Merged {
        let global: toml::Table = extra.parse().unwrap();
        let defaults = defaults();
        Merged::from_layers([(Level::Default, &defaults), (Level::Global, &global)])
    }

    #[test]
    fn endpoint_address_literals_are_found_names_are_not() {
        let value: toml::Value = toml::Value::Array(
            [
                "ctl.example.net",
                "192.0.2.1",
                "2001:db8::1",
                "[2001:db8::2]:4000",
                "198.51.100.7:51819",
                "h:1",
                "192.0.2.1",
            ]
            .map(|s| toml::Value::String(s.into()))
            .to_vec(),
        );
        let ips: Vec<String> = controller_endpoint_ips(Some(&value))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ips,
            ["192.0.2.1", "198.51.100.7", "2001:db8::1", "2001:db8::2"]
        );
        assert!(controller_endpoint_ips(None).is_empty());
        assert_eq!(
            controller_endpoint_ips(Some(&toml::Value::String("203.0.113.254".into()))),
            ["203.0.113.254".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn addresses_derive_from_pool_and_id() {
        let s = ManagementSettings::from_attributes(&merged("")).unwrap();
        assert_eq!(s.controller_address().to_string(), "fd54:6f77:616c:ffff::1");
        assert_eq!(s.node_address(10).to_string(), "fd54:6f77:616c:ffff::1:a");
        assert_eq!(s.node_id_of(s.node_address(10).into()), Some(10));
        assert_eq!(s.node_id_of(s.controller_address().into()), None);
        assert_eq!(s.node_id_of("fd00::1:a".parse().unwrap()), None);
        assert_eq!(s.node_id_of("192.0.2.1".parse().unwrap()), None);
        assert!(s.controller_endpoints.is_empty());
    }

    #[test]
    fn endpoints_get_the_listen_port() {
        let s = ManagementSettings::from_attributes(&merged(
            r#"controller_endpoint = ["ctl.example.net", "192.0.2.1", "2001:db8::1", "[2001:db8::2]:4000", "h:1"]"#,
        ))
        .unwrap();
        assert_eq!(
            s.controller_endpoints,
            [
                "ctl.example.net:51819",
                "192.0.2.1:51819",
                "[2001:db8::1]:51819",
                "[2001:db8::2]:4000",
                "h:1"
            ]
        );
        let error = ManagementSettings::from_attributes(&merged(r#"controller_endpoint = "h:x""#))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("controller_endpoint") && error.contains("config.toml"),
            "{error}"
        );
        let error =
            ManagementSettings::from_attributes(&merged(r#"mgmt_ipv6_pool = "10.0.0.0/8""#))
                .unwrap_err()
                .to_string();
        assert!(error.contains("mgmt_ipv6_pool"), "{error}");
    }

    #[test]
    fn a_hand_edited_global_file_is_checked_against_the_schema() {
        for (text, attribute) in [
            ("mgmt_listen_port = 0", "mgmt_listen_port"),
            ("mgmt_report_interval_s = 301", "mgmt_report_interval_s"),
            (r#"mgmt_ipv6_pool = "fd00::/112""#, "mgmt_ipv6_pool"),
            (
                r#"controller_endpoint = ["ok.example", 7]"#,
                "controller_endpoint",
            ),
        ] {
            let error = ManagementSettings::from_attributes(&merged(text))
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("`config.toml`: attribute `{attribute}` must be ")),
                "{text}: {error}"
            );
        }
    }
}
