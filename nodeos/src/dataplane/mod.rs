//! The data plane: the node's WireGuard links, their addresses and the loopbacks, made to match
//! the active version by reconciliation (desired state against what exists; applying the same
//! state twice changes nothing; links of removed peers disappear).
//!
//! The desired state is computed purely from the version's contract ([`NodeConfig`], its
//! `towalink/node.toml`) and the node's private key ([`desired`]); [`DataPlane::reconcile`]
//! carries it out through a [`WireGuard`] implementation (in-process boringtun, or kernel
//! WireGuard) and rtnetlink ([`netlink`]), all from the `towalink-netdev` crate.

pub use towalink_netdev::{kernel, netlink, wireguard};

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};

pub use towalink_netdev::{key_hex, INTERFACE_PREFIX, MANAGEMENT_MTU};
pub use towalink_netdev::{
    Batched, Boringtun, KernelWireGuard, LinkStats, WireGuard, WireGuardLink,
};

use towalink_bundle::contract::{NodeConfig, NODE_TOML};
use towalink_bundle::messages::Management;

use crate::Error;

/// The node's end of the management link to the controller.
pub const MANAGEMENT_INTERFACE: &str = "tlmgmt";

/// The management link: one WireGuard peer (the controller), the node's management address
/// with the controller's as point-to-point peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementLink {
    pub wireguard: WireGuardLink,
    /// The controller's endpoints (`host:port`); the first that resolves is used.
    pub endpoints: Vec<String>,
    pub address: IpAddr,
    pub controller_address: IpAddr,
}

/// The management link of these settings (none for a node without a controller).
pub fn management_link(
    management: Option<&Management>,
    private_key: &str,
) -> Result<Option<ManagementLink>, Error> {
    let Some(management) = management else {
        return Ok(None);
    };
    Ok(Some(ManagementLink {
        wireguard: WireGuardLink {
            name: MANAGEMENT_INTERFACE.to_string(),
            private_key_hex: key_hex(private_key, "identity/wg_private_key")?,
            listen_port: management.listen_port,
            peer_public_key_hex: key_hex(
                &management.controller_wg_public_key,
                "management.controller_wg_public_key",
            )?,
            endpoint: None,
            keepalive: management.keepalive_s,
        },
        endpoints: management.controller_endpoints.clone(),
        address: management.address,
        controller_address: management.controller_address,
    }))
}

/// One point-to-point link as the version wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredLink {
    pub wireguard: WireGuardLink,
    pub mtu: u32,
    pub local_ipv4: Ipv4Addr,
    pub peer_ipv4: Ipv4Addr,
    pub local_link_local: Ipv6Addr,
}

/// Everything the data plane should look like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    pub loopback_ipv4: Option<Ipv4Addr>,
    pub loopback_ipv6: Option<Ipv6Addr>,
    pub links: BTreeMap<String, DesiredLink>,
    pub management: Option<ManagementLink>,
}

/// The desired state of a version: pure, from its contract (`towalink/node.toml`) and the
/// node's private key.
pub fn desired(config: &NodeConfig, private_key: &str) -> Result<DesiredState, Error> {
    let bad = |what: String| Error::DataPlane(format!("{NODE_TOML}: {what}"));
    let private_key_hex = key_hex(private_key, "identity/wg_private_key")?;
    let mut state = DesiredState {
        loopback_ipv4: config.loopback_ipv4,
        loopback_ipv6: config.loopback_ipv6,
        links: BTreeMap::new(),
        management: None,
    };
    for peer in &config.peers {
        let name = peer.interface.clone();
        if !name.starts_with(INTERFACE_PREFIX) || name.len() > 15 {
            return Err(bad(format!(
                "interface `{name}` is not a Towalink interface name"
            )));
        }
        let local_ipv4 = config
            .loopback_ipv4
            .ok_or_else(|| bad("`loopback_ipv4` is missing".into()))?;
        let link = DesiredLink {
            wireguard: WireGuardLink {
                name: name.clone(),
                private_key_hex: private_key_hex.clone(),
                listen_port: peer.listen_port,
                peer_public_key_hex: key_hex(&peer.peer_public_key, "peer_public_key")?,
                endpoint: peer.peer_endpoint.clone(),
                keepalive: u16::try_from(peer.keepalive).unwrap_or(0),
            },
            mtu: peer.mtu,
            local_ipv4,
            peer_ipv4: peer.peer_loopback_ipv4,
            local_link_local: peer.local_link_local,
        };
        state.links.insert(name, link);
    }
    Ok(state)
}

impl DesiredState {
    /// Whether an endpoint names a host (resolved at each reconciliation) rather than an
    /// address.
    pub fn names_hosts(&self) -> bool {
        let named = |endpoint: &String| endpoint.parse::<SocketAddr>().is_err();
        self.links
            .values()
            .filter_map(|l| l.wireguard.endpoint.as_ref())
            .chain(self.management.iter().flat_map(|m| m.endpoints.iter()))
            .any(named)
    }
}

/// Resolves an endpoint (`host:port`, names or addresses) to one socket address.
pub fn resolve_endpoint(endpoint: &str) -> Option<SocketAddr> {
    endpoint.to_socket_addrs().ok()?.next()
}

/// What a reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub created: Vec<String>,
    pub reconfigured: Vec<String>,
    pub removed: Vec<String>,
    pub unresolved: Vec<String>,
}

impl ReconcileReport {
    pub fn changed(&self) -> bool {
        !(self.created.is_empty() && self.reconfigured.is_empty() && self.removed.is_empty())
    }
}

/// The node's data plane.
pub struct DataPlane {
    wireguard: Box<dyn WireGuard>,
    netlink: netlink::Netlink,
}

impl DataPlane {
    pub fn new(wireguard: Box<dyn WireGuard>) -> Result<DataPlane, Error> {
        Ok(DataPlane {
            wireguard,
            netlink: netlink::Netlink::new()?,
        })
    }

    /// Makes links, addresses and loopbacks match `desired`. A peer whose endpoint cannot be
    /// resolved gets its link without an endpoint (it may still connect to us); the others go on.
    pub fn reconcile(&mut self, desired: &DesiredState) -> Result<ReconcileReport, Error> {
        let mut report = ReconcileReport::default();
        for name in self.wireguard.names() {
            let wanted = desired.links.contains_key(&name)
                || desired
                    .management
                    .as_ref()
                    .map(|m| m.wireguard.name.as_str())
                    == Some(name.as_str());
            if !wanted {
                self.wireguard.remove(&name)?;
                report.removed.push(name);
            }
        }
        for (name, link) in &desired.links {
            let mut wireguard = link.wireguard.clone();
            if let Some(endpoint) = &link.wireguard.endpoint {
                match resolve_endpoint(endpoint) {
                    Some(address) => wireguard.endpoint = Some(address.to_string()),
                    None => {
                        tracing::warn!(link = %name, %endpoint, "cannot resolve endpoint; waiting for the peer");
                        report.unresolved.push(name.clone());
                        wireguard.endpoint = None;
                    }
                }
            }
            match self.wireguard.ensure(&wireguard)? {
                wireguard::Ensured::Created => report.created.push(name.clone()),
                wireguard::Ensured::Reconfigured => report.reconfigured.push(name.clone()),
                wireguard::Ensured::Unchanged => {}
            }
            self.netlink.ensure_point_to_point(
                name,
                link.mtu,
                link.local_ipv4,
                link.peer_ipv4,
                link.local_link_local,
            )?;
        }
        if let Some(management) = &desired.management {
            let mut wireguard = management.wireguard.clone();
            wireguard.endpoint = management
                .endpoints
                .iter()
                .find_map(|e| resolve_endpoint(e))
                .map(|a| a.to_string());
            if wireguard.endpoint.is_none() {
                tracing::warn!(endpoints = ?management.endpoints, "cannot resolve the controller's endpoint; retrying");
                report.unresolved.push(wireguard.name.clone());
            }
            match self.wireguard.ensure(&wireguard)? {
                wireguard::Ensured::Created => report.created.push(wireguard.name.clone()),
                wireguard::Ensured::Reconfigured => {
                    report.reconfigured.push(wireguard.name.clone())
                }
                wireguard::Ensured::Unchanged => {}
            }
            let prefix = if management.address.is_ipv4() {
                32
            } else {
                128
            };
            self.netlink.ensure_interface(
                &wireguard.name,
                MANAGEMENT_MTU,
                &[(management.address, management.controller_address, prefix)],
            )?;
            if let (IpAddr::V6(controller), IpAddr::V6(source)) =
                (management.controller_address, management.address)
            {
                self.netlink
                    .pin_management_route(&wireguard.name, controller, source)?;
            }
        }
        self.netlink
            .ensure_loopback(desired.loopback_ipv4, desired.loopback_ipv6)?;
        Ok(report)
    }

    pub fn stats(&mut self, name: &str) -> Result<LinkStats, Error> {
        Ok(self.wireguard.stats(name)?)
    }
}

/// The management interface's global IPv6 address and its index, from the kernel's list
/// (`/proc/net/if_inet6`: address, index, prefix length, scope, flags, name).
pub fn management_address() -> Option<(std::net::Ipv6Addr, u32)> {
    let table = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [address, index, _, scope, _, name] = fields[..] else {
            return None;
        };
        if name != MANAGEMENT_INTERFACE || scope != "00" {
            return None;
        }
        let bits = u128::from_str_radix(address, 16).ok()?;
        Some((bits.into(), u32::from_str_radix(index, 16).ok()?))
    })
}

/// A listener on the management address and `port`, bound to the management interface too
/// (SO_BINDTODEVICE): a packet for that address arriving on any other interface (a LAN or
/// underlay neighbour routing the address to this node) finds no listener. Bound to the
/// address, not to every address: a LAN address on the same port does not collide with it.
pub fn management_listener(
    address: std::net::Ipv6Addr,
    port: u16,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind_device(Some(MANAGEMENT_INTERFACE.as_bytes()))?;
    socket.bind(&std::net::SocketAddr::from((address, port)).into())?;
    socket.listen(16)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "v5baw1MF/aRJotly6e3ndIUEduDrJVE2qcnFlIYrbG8=";

    #[test]
    fn desired_state_from_node_toml() {
        let node = NodeConfig::from_toml(&format!(
            r#"
loopback_ipv4 = "10.254.0.1"
loopback_ipv6 = "fd00::1"
[[peers]]
interface = "tlwg2"
listen_port = 51822
peer_public_key = "{KEY}"
peer_endpoint = "192.0.2.2:51821"
keepalive = 25
mtu = 1420
peer_loopback_ipv4 = "10.254.0.2"
local_link_local = "fe80::1:0:2"
peer_id = 2
peer_node = "y"
peer_site = "b"
peer_asn = 4200000002
peer_loopback_ipv6 = "fd00::2"
peer_port = 51821
peer_link_local = "fe80::2:0:1"
"#
        ))
        .unwrap();
        let state = desired(&node, KEY).unwrap();
        let link = &state.links["tlwg2"];
        assert_eq!(link.wireguard.listen_port, 51822);
        assert_eq!(link.wireguard.endpoint.as_deref(), Some("192.0.2.2:51821"));
        assert_eq!(link.wireguard.private_key_hex.len(), 64);
        assert_eq!(link.peer_ipv4, "10.254.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(state.loopback_ipv6, Some("fd00::1".parse().unwrap()));
        assert!(desired(&node, "short").is_err());
    }

    #[test]
    fn desired_state_from_node_toml_as_earlier_controllers_wrote_it() {
        let node = NodeConfig::from_toml(include_str!(
            "../../../tests/fixtures/node-toml-contract1/r1.s1.toml"
        ))
        .unwrap();
        let state = desired(&node, KEY).unwrap();
        assert_eq!(state.loopback_ipv4, Some(Ipv4Addr::new(10, 254, 0, 1)));
        let link = &state.links["tlwg2"];
        assert_eq!(link.local_ipv4, Ipv4Addr::new(10, 254, 0, 1));
        assert_eq!(link.wireguard.listen_port, 51822);
        assert_eq!(link.wireguard.keepalive, 25);
        assert_eq!(link.mtu, 1420);
        assert_eq!(
            link.local_link_local,
            "fe80::1:0:2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            link.wireguard.endpoint.as_deref(),
            Some("203.0.113.30:51821")
        );
    }

    #[test]
    fn endpoints_resolve_names_and_addresses() {
        assert_eq!(
            resolve_endpoint("192.0.2.1:51820"),
            Some("192.0.2.1:51820".parse().unwrap())
        );
        assert_eq!(
            resolve_endpoint("[2001:db8::1]:51820"),
            Some("[2001:db8::1]:51820".parse().unwrap())
        );
        assert!(resolve_endpoint("localhost:51820").is_some());
        assert_eq!(resolve_endpoint("no-such-host.invalid:1"), None);
    }
}
