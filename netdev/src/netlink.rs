//! Link state and addresses through rtnetlink (never by spawning `ip`): the point-to-point
//! addresses of each tunnel (the node's IPv4 loopback, peer = the peer's loopback; the link's
//! IPv6 link-local address) and the loopbacks on `lo`. Only missing addresses are added, so
//! reconciling twice changes nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlag};
use netlink_packet_route::link::{LinkAttribute, LinkFlag};
use rtnetlink::Handle;

use crate::Error;

fn failed(what: String) -> Error {
    Error::Netlink(what)
}

/// A netlink connection driven by a small single-threaded runtime.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
}

/// One address on an interface: local, peer (point-to-point) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Address {
    local: IpAddr,
    peer: IpAddr,
    prefix: u8,
}

impl Netlink {
    pub fn new() -> Result<Netlink, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| failed(format!("netlink runtime: {e}")))?;
        Ok(Netlink { runtime })
    }

    fn with_handle<T>(
        &self,
        job: impl AsyncFnOnce(Handle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(|e| failed(format!("netlink socket: {e}")))?;
            let task = tokio::spawn(connection);
            let result = job(handle).await;
            task.abort();
            result
        })
    }

    /// Sets MTU and up, and adds the missing addresses of a tunnel interface: the node's IPv4
    /// loopback with the peer's as point-to-point peer, and the link's IPv6 link-local address.
    pub fn ensure_point_to_point(
        &self,
        name: &str,
        mtu: u32,
        local: Ipv4Addr,
        peer: Ipv4Addr,
        link_local: Ipv6Addr,
    ) -> Result<(), Error> {
        // The link's only link-local address is the one the peers' BIRD expects: no address
        // of the kernel's own (stable-privacy/EUI-64) that BIRD could take as the source of
        // its IPv6 BFD packets, which the peer would not answer.
        no_kernel_link_local(name);
        self.ensure_interface(
            name,
            mtu,
            &[
                (IpAddr::V4(local), IpAddr::V4(peer), 32),
                (IpAddr::V6(link_local), IpAddr::V6(link_local), 64),
            ],
        )?;
        let name = name.to_string();
        self.with_handle(async move |handle| {
            let index = link_index(&handle, &name).await?;
            let mut stream = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            let mut stray = Vec::new();
            while let Some(message) = stream
                .try_next()
                .await
                .map_err(|e| failed(format!("addresses of {name}: {e}")))?
            {
                let is_stray = message.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Address(IpAddr::V6(v6))
                        if v6.segments()[0] & 0xffc0 == 0xfe80 && *v6 != link_local)
                });
                if is_stray {
                    stray.push(message);
                }
            }
            for message in stray {
                handle.address().del(message).execute().await.map_err(|e| {
                    failed(format!(
                        "cannot remove a kernel link-local address of {name}: {e}"
                    ))
                })?;
            }
            Ok(())
        })
    }

    /// Sets MTU and up, and adds the missing addresses (`local`, `peer`, prefix length; `peer`
    /// equal to `local` for an ordinary address) of an interface.
    pub fn ensure_interface(
        &self,
        name: &str,
        mtu: u32,
        wanted: &[(IpAddr, IpAddr, u8)],
    ) -> Result<(), Error> {
        let name = name.to_string();
        let wanted: Vec<Address> = wanted
            .iter()
            .map(|&(local, peer, prefix)| Address {
                local,
                peer,
                prefix,
            })
            .collect();
        self.with_handle(async move |handle| {
            let index = link_index(&handle, &name).await?;
            let (current_mtu, up) = link_state(&handle, index).await?;
            if current_mtu != Some(mtu) || !up {
                handle
                    .link()
                    .set(index)
                    .mtu(mtu)
                    .up()
                    .execute()
                    .await
                    .map_err(|e| failed(format!("cannot set {name} up (mtu {mtu}): {e}")))?;
            }
            let existing = addresses(&handle, index).await?;
            for address in wanted {
                if !existing.contains(&address) {
                    add_address(&handle, index, address)
                        .await
                        .map_err(|e| failed(format!("cannot add {address:?} to {name}: {e}")))?;
                }
            }
            Ok(())
        })
    }

    /// Names of the interfaces starting with `prefix`.
    pub fn links_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let prefix = prefix.to_string();
        self.with_handle(async move |handle| {
            let mut links = handle.link().get().execute();
            let mut names = Vec::new();
            while let Some(link) = links
                .try_next()
                .await
                .map_err(|e| failed(format!("listing interfaces: {e}")))?
            {
                for attribute in &link.attributes {
                    if let LinkAttribute::IfName(name) = attribute {
                        if name.starts_with(&prefix) {
                            names.push(name.clone());
                        }
                    }
                }
            }
            Ok(names)
        })
    }

    /// Creates a kernel WireGuard interface.
    pub fn add_wireguard_link(&self, name: &str) -> Result<(), Error> {
        let name = name.to_string();
        self.with_handle(async move |handle| {
            handle
                .link()
                .add()
                .wireguard(name.clone())
                .execute()
                .await
                .map_err(|e| failed(format!("cannot create WireGuard interface {name}: {e}")))
        })
    }

    /// Deletes an interface.
    pub fn delete_link(&self, name: &str) -> Result<(), Error> {
        let name = name.to_string();
        self.with_handle(async move |handle| {
            let index = link_index(&handle, &name).await?;
            handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(|e| failed(format!("cannot delete {name}: {e}")))
        })
    }

    /// Puts the node's loopbacks on `lo` (/32 and /128) and `lo` up.
    pub fn ensure_loopback(&self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> Result<(), Error> {
        self.with_handle(async move |handle| {
            let index = link_index(&handle, "lo").await?;
            let (_, up) = link_state(&handle, index).await?;
            if !up {
                handle
                    .link()
                    .set(index)
                    .up()
                    .execute()
                    .await
                    .map_err(|e| failed(format!("cannot set lo up: {e}")))?;
            }
            let existing = addresses(&handle, index).await?;
            let wanted = v4
                .map(|a| Address {
                    local: a.into(),
                    peer: a.into(),
                    prefix: 32,
                })
                .into_iter()
                .chain(v6.map(|a| Address {
                    local: a.into(),
                    peer: a.into(),
                    prefix: 128,
                }));
            for address in wanted {
                if !existing.contains(&address) {
                    add_address(&handle, index, address)
                        .await
                        .map_err(|e| failed(format!("cannot add {address:?} to lo: {e}")))?;
                }
            }
            Ok(())
        })
    }
}

/// The routing table that holds the route to the controller's management address, apart from
/// the main table where BIRD writes the routes the peers announce.
pub const MANAGEMENT_TABLE: u32 = 0x746c; // "tl"
/// Priority of the rule that sends the controller's management address to
/// [`MANAGEMENT_TABLE`]: before the main table's rule (32766), after `local` (0).
pub const MANAGEMENT_RULE_PRIORITY: u32 = 100;
/// Metrics in [`MANAGEMENT_TABLE`]: the link, and behind it an `unreachable` route so that
/// without the link the lookup ends there instead of falling through to the main table.
const MANAGEMENT_ROUTE_METRIC: u32 = 1;
const MANAGEMENT_FALLBACK_METRIC: u32 = 4096;

impl Netlink {
    /// Pins the route to the controller's management address to the management interface,
    /// independently of what the data plane (BIRD, a peer's announcement) puts in the main
    /// table: a rule sends the address to [`MANAGEMENT_TABLE`], where only the management
    /// link and an `unreachable` fallback exist. Idempotent.
    pub fn pin_management_route(
        &self,
        interface: &str,
        controller: Ipv6Addr,
        source: Ipv6Addr,
    ) -> Result<(), Error> {
        let interface = interface.to_string();
        self.with_handle(async move |handle| {
            let index = link_index(&handle, &interface).await?;
            handle
                .route()
                .add()
                .v6()
                .destination_prefix(controller, 128)
                .output_interface(index)
                .pref_source(source)
                .table_id(MANAGEMENT_TABLE)
                .priority(MANAGEMENT_ROUTE_METRIC)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    failed(format!(
                        "cannot route {controller} to {interface} in table {MANAGEMENT_TABLE}: {e}"
                    ))
                })?;
            handle
                .route()
                .add()
                .v6()
                .destination_prefix(controller, 128)
                .kind(netlink_packet_route::route::RouteType::Unreachable)
                .table_id(MANAGEMENT_TABLE)
                .priority(MANAGEMENT_FALLBACK_METRIC)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    failed(format!(
                        "cannot add the unreachable fallback for {controller} in table {MANAGEMENT_TABLE}: {e}"
                    ))
                })?;
            let added = handle
                .rule()
                .add()
                .v6()
                .destination_prefix(controller, 128)
                .table_id(MANAGEMENT_TABLE)
                .priority(MANAGEMENT_RULE_PRIORITY)
                .action(netlink_packet_route::rule::RuleAction::ToTable)
                .execute()
                .await;
            match added {
                Ok(()) => Ok(()),
                // The rule is there already.
                Err(rtnetlink::Error::NetlinkError(message))
                    if std::io::Error::from_raw_os_error(-message.raw_code()).kind()
                        == std::io::ErrorKind::AlreadyExists =>
                {
                    Ok(())
                }
                Err(e) => Err(failed(format!(
                    "cannot add the rule `to {controller} lookup {MANAGEMENT_TABLE}`: {e}"
                ))),
            }
        })
    }
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(failed(format!("no interface {name}"))),
        Err(e) => Err(failed(format!("no interface {name}: {e}"))),
    }
}

async fn link_state(handle: &Handle, index: u32) -> Result<(Option<u32>, bool), Error> {
    let mut links = handle.link().get().match_index(index).execute();
    let link = links
        .try_next()
        .await
        .map_err(|e| failed(format!("interface {index}: {e}")))?
        .ok_or_else(|| failed(format!("interface {index} vanished")))?;
    let mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    Ok((mtu, link.header.flags.contains(&LinkFlag::Up)))
}

async fn addresses(handle: &Handle, index: u32) -> Result<Vec<Address>, Error> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut found = Vec::new();
    while let Some(message) = stream
        .try_next()
        .await
        .map_err(|e| failed(format!("addresses of interface {index}: {e}")))?
    {
        let mut local = None;
        let mut peer = None;
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Local(a) => local = Some(*a),
                AddressAttribute::Address(a) => peer = Some(*a),
                _ => {}
            }
        }
        // IPv6 addresses carry only IFA_ADDRESS.
        if let Some(peer) = peer {
            found.push(Address {
                local: local.unwrap_or(peer),
                peer,
                prefix: message.header.prefix_len,
            });
        }
    }
    Ok(found)
}

async fn add_address(
    handle: &Handle,
    index: u32,
    address: Address,
) -> Result<(), rtnetlink::Error> {
    let mut request = handle.address().add(index, address.local, address.prefix);
    let message = request.message_mut();
    message.attributes.retain(|a| {
        !matches!(
            a,
            AddressAttribute::Address(_) | AddressAttribute::Broadcast(_)
        )
    });
    message
        .attributes
        .push(AddressAttribute::Address(address.peer));
    if address.local.is_ipv6() {
        // No duplicate address detection: the address is usable at once, and on a
        // point-to-point tunnel nobody else can hold it.
        message.header.flags.push(AddressHeaderFlag::Nodad);
        message
            .attributes
            .retain(|a| !matches!(a, AddressAttribute::Local(_)));
        if address.local != address.peer {
            message
                .attributes
                .push(AddressAttribute::Local(address.local));
        }
    }
    request.execute().await
}

/// Tells the kernel not to give `interface` an IPv6 link-local address of its own
/// (`addr_gen_mode` 1, "none"); effective when the interface goes up next.
fn no_kernel_link_local(interface: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/addr_gen_mode");
    if std::fs::read_to_string(&path)
        .map(|v| v.trim() != "1")
        .unwrap_or(false)
    {
        if let Err(error) = std::fs::write(&path, "1\n") {
            tracing::warn!(%path, %error, "cannot turn off the kernel's link-local address");
        }
    }
}

/// The sysctls that make a host a router: IPv4 and IPv6 forwarding.
pub const FORWARDING_SYSCTLS: &[&str] = &[
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// Turns forwarding on (a node routes between its LAN and its links, on images and on any
/// other host); a sysctl that cannot be written is logged, not fatal (the node still routes
/// its own traffic).
pub fn enable_forwarding() {
    for path in FORWARDING_SYSCTLS {
        match std::fs::read_to_string(path) {
            Ok(v) if v.trim() == "1" => {}
            _ => match std::fs::write(path, "1\n") {
                Ok(()) => tracing::info!(sysctl = path, "forwarding enabled"),
                Err(error) => tracing::warn!(sysctl = path, %error, "cannot enable forwarding"),
            },
        }
    }
}
