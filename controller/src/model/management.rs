//! The management link's settings: where the controller listens, the management addresses
//! (derived from the pool and the never-reused node ids), the controller's endpoints and the
//! addresses they name. Pure; the keys and a node's identity are in [`crate::store::keys`].

use std::net::{IpAddr, Ipv6Addr};

use crate::model::attributes::Merged;
use crate::model::resolve::ResolveError;

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

use crate::model::resolve::attribute_error as bad;

fn integer(merged: &Merged, key: &str, min: i64, max: i64) -> Result<i64, ResolveError> {
    match merged.values.get(key) {
        Some(toml::Value::Integer(n)) if (min..=max).contains(n) => Ok(*n),
        None => Err(bad(merged, key, "is missing")),
        Some(_) => Err(bad(
            merged,
            key,
            format!("must be an integer from {min} to {max}"),
        )),
    }
}

impl ManagementSettings {
    /// Reads the settings from merged global attributes. Pure.
    pub fn from_attributes(merged: &Merged) -> Result<ManagementSettings, ResolveError> {
        let pool: ipnet::Ipv6Net = match merged.values.get("mgmt_ipv6_pool") {
            Some(toml::Value::String(s)) => s.parse().map_err(|_| {
                bad(
                    merged,
                    "mgmt_ipv6_pool",
                    format!("is `{s}`, not an IPv6 prefix"),
                )
            })?,
            None => return Err(bad(merged, "mgmt_ipv6_pool", "is missing")),
            Some(_) => return Err(bad(merged, "mgmt_ipv6_pool", "must be a string")),
        };
        if pool.prefix_len() > 96 {
            return Err(bad(
                merged,
                "mgmt_ipv6_pool",
                "must be a /96 or larger (node addresses are pool + 65536 + node id)",
            ));
        }
        let listen_port = integer(merged, "mgmt_listen_port", 1, 65535)? as u16;
        let endpoints = match merged.values.get("controller_endpoint") {
            None => Vec::new(),
            Some(toml::Value::String(s)) => vec![s.clone()],
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(merged, "controller_endpoint", "must hold strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(bad(
                    merged,
                    "controller_endpoint",
                    "must be a string `host[:port]` or a list of them",
                ))
            }
        };
        let controller_endpoints = endpoints
            .into_iter()
            .map(|e| {
                with_port(&e, listen_port).ok_or_else(|| {
                    bad(
                        merged,
                        "controller_endpoint",
                        format!("`{e}` is not `host[:port]`"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ManagementSettings {
            pool,
            listen_port,
            api_port: integer(merged, "mgmt_api_port", 1, 65535)? as u16,
            keepalive_s: integer(merged, "mgmt_keepalive", 0, 65535)? as u16,
            report_interval_s: integer(merged, "mgmt_report_interval_s", 1, 300)? as u64,
            controller_endpoints,
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

/// `host:port`, adding `port` when the endpoint has none.
fn with_port(endpoint: &str, port: u16) -> Option<String> {
    let endpoint = endpoint.trim();
    if endpoint.is_empty() {
        return None;
    }
    if let Ok(ip) = endpoint.parse::<IpAddr>() {
        return Some(std::net::SocketAddr::new(ip, port).to_string());
    }
    if endpoint.parse::<std::net::SocketAddr>().is_ok() {
        return Some(endpoint.to_string());
    }
    match endpoint.rsplit_once(':') {
        Some((host, p)) if !host.is_empty() && !host.contains(':') => {
            p.parse::<u16>().ok().map(|_| endpoint.to_string())
        }
        Some(_) => None,
        None => Some(format!("{endpoint}:{port}")),
    }
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
}
