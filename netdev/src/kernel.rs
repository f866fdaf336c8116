//! Kernel WireGuard through netlink: the link is created with rtnetlink (kind `wireguard`) and
//! configured over the `wireguard` generic-netlink family, as `wg` does it. Chosen where the
//! kernel has the module ([`KernelWireGuard::probe`] asks for the family); elsewhere the node
//! runs boringtun.

use std::collections::BTreeMap;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlMessage};
use netlink_packet_wireguard::constants::{
    AF_INET, AF_INET6, WGDEVICE_F_REPLACE_PEERS, WGPEER_F_REPLACE_ALLOWEDIPS, WGPEER_F_UPDATE_ONLY,
};
use netlink_packet_wireguard::nlas::{
    WgAllowedIp, WgAllowedIpAttrs, WgDeviceAttrs, WgPeer, WgPeerAttrs,
};
use netlink_packet_wireguard::{Wireguard, WireguardCmd};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr as NetlinkAddr};

use crate::netlink::Netlink;
use crate::wireguard::{Ensured, LinkStats, WireGuard, WireGuardLink};
use crate::Error;
use crate::INTERFACE_PREFIX;

fn failed(what: String) -> Error {
    Error::Netlink(what)
}

/// A generic-netlink socket that sends one request and collects the replies.
struct Genl {
    socket: Socket,
    sequence: u32,
}

impl Genl {
    fn open() -> Result<Genl, Error> {
        let mut socket = Socket::new(NETLINK_GENERIC)
            .map_err(|e| failed(format!("generic netlink socket: {e}")))?;
        socket
            .bind_auto()
            .map_err(|e| failed(format!("generic netlink bind: {e}")))?;
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(|e| failed(format!("generic netlink connect: {e}")))?;
        Ok(Genl {
            socket,
            sequence: 0,
        })
    }

    fn request<F>(
        &mut self,
        mut message: GenlMessage<F>,
        family: u16,
        flags: u16,
    ) -> Result<Vec<F>, Error>
    where
        F: GenlFamily + std::fmt::Debug + Clone + PartialEq + Eq,
        GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
    {
        message.set_resolved_family_id(family);
        let mut request = NetlinkMessage::from(message);
        self.sequence += 1;
        request.header.flags = flags;
        request.header.sequence_number = self.sequence;
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);
        self.socket
            .send(&buffer, 0)
            .map_err(|e| failed(format!("generic netlink send: {e}")))?;
        let mut replies = Vec::new();
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|e| failed(format!("generic netlink receive: {e}")))?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<GenlMessage<F>>::deserialize(&data[offset..])
                    .map_err(|e| failed(format!("generic netlink reply: {e}")))?;
                offset += reply.header.length as usize;
                match reply.payload {
                    NetlinkPayload::InnerMessage(inner) => {
                        replies.push(inner.payload);
                        if flags & NLM_F_DUMP == 0 {
                            // A single answer; an ACK may follow.
                        }
                    }
                    NetlinkPayload::Error(error) => {
                        if let Some(code) = error.code {
                            return Err(failed(format!(
                                "netlink error {}",
                                std::io::Error::from_raw_os_error(-code.get())
                            )));
                        }
                        return Ok(replies); // the ACK
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    _ => {}
                }
                if reply.header.length == 0 {
                    break;
                }
            }
            if flags & (NLM_F_DUMP | NLM_F_ACK) == 0 {
                return Ok(replies);
            }
        }
    }
}

/// Kernel WireGuard, one link per peer.
pub struct KernelWireGuard {
    genl: Genl,
    family: u16,
    netlink: Netlink,
    links: BTreeMap<String, WireGuardLink>,
}

impl KernelWireGuard {
    /// Finds the kernel's `wireguard` netlink family; an error says why the kernel path is not
    /// available (typically: the module is missing).
    pub fn probe() -> Result<KernelWireGuard, Error> {
        let mut genl = Genl::open()?;
        let ask = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".to_string())],
        });
        let replies = genl
            .request(
                ask,
                netlink_packet_generic::constants::GENL_ID_CTRL,
                NLM_F_REQUEST | NLM_F_ACK,
            )
            .map_err(|e| Error::KernelUnavailable(e.to_string()))?;
        let family = replies
            .iter()
            .flat_map(|r| r.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or_else(|| Error::KernelUnavailable("no family id".into()))?;
        let netlink = Netlink::new()?;
        let links = netlink
            .links_with_prefix(INTERFACE_PREFIX)?
            .into_iter()
            .map(|name| {
                // Links left by an earlier run: configured afresh by the first ensure().
                let unknown = WireGuardLink {
                    name: name.clone(),
                    private_key_hex: String::new(),
                    listen_port: 0,
                    peer_public_key_hex: String::new(),
                    endpoint: None,
                    keepalive: 0,
                };
                (name, unknown)
            })
            .collect();
        Ok(KernelWireGuard {
            genl,
            family,
            netlink,
            links,
        })
    }

    fn set(&mut self, link: &WireGuardLink, full: bool) -> Result<(), Error> {
        let mut peer = vec![
            WgPeerAttrs::PublicKey(link.peer_public_key()?),
            WgPeerAttrs::PersistentKeepalive(link.keepalive),
        ];
        if let Some(address) = link.endpoint_address()? {
            peer.push(WgPeerAttrs::Endpoint(address));
        }
        let mut device = vec![WgDeviceAttrs::IfName(link.name.clone())];
        if full {
            peer.push(WgPeerAttrs::Flags(WGPEER_F_REPLACE_ALLOWEDIPS));
            peer.push(WgPeerAttrs::AllowedIps(vec![
                WgAllowedIp(vec![
                    WgAllowedIpAttrs::Family(AF_INET),
                    WgAllowedIpAttrs::IpAddr(IpAddr::from([0, 0, 0, 0])),
                    WgAllowedIpAttrs::Cidr(0),
                ]),
                WgAllowedIp(vec![
                    WgAllowedIpAttrs::Family(AF_INET6),
                    WgAllowedIpAttrs::IpAddr(IpAddr::from([0u16; 8])),
                    WgAllowedIpAttrs::Cidr(0),
                ]),
            ]));
            device.push(WgDeviceAttrs::PrivateKey(link.private_key()?));
            device.push(WgDeviceAttrs::ListenPort(link.listen_port));
            device.push(WgDeviceAttrs::Flags(WGDEVICE_F_REPLACE_PEERS));
        } else {
            peer.push(WgPeerAttrs::Flags(WGPEER_F_UPDATE_ONLY));
        }
        device.push(WgDeviceAttrs::Peers(vec![WgPeer(peer)]));
        let message = GenlMessage::from_payload(Wireguard {
            cmd: WireguardCmd::SetDevice,
            nlas: device,
        });
        self.genl
            .request(message, self.family, NLM_F_REQUEST | NLM_F_ACK)
            .map_err(|e| {
                Error::WireGuard(format!(
                    "configuring kernel WireGuard link {}: {e}",
                    link.name
                ))
            })?;
        Ok(())
    }
}

impl WireGuard for KernelWireGuard {
    fn ensure(&mut self, link: &WireGuardLink) -> Result<Ensured, Error> {
        let outcome = match self.links.get(&link.name) {
            Some(current) if current == link => return Ok(Ensured::Unchanged),
            Some(current) => {
                let same_identity = current.private_key_hex == link.private_key_hex
                    && current.listen_port == link.listen_port
                    && current.peer_public_key_hex == link.peer_public_key_hex;
                // A new endpoint replaces the peer (a new session, as with boringtun), so
                // packets of the old session from the old address cannot roam it back, and a
                // sync that succeeds afterwards went through the new endpoint.
                let full = !same_identity || current.endpoint != link.endpoint;
                self.set(link, full)?;
                Ensured::Reconfigured
            }
            None => {
                self.netlink.add_wireguard_link(&link.name)?;
                self.set(link, true)?;
                tracing::info!(link = %link.name, port = link.listen_port, "created kernel WireGuard link");
                Ensured::Created
            }
        };
        self.links.insert(link.name.clone(), link.clone());
        Ok(outcome)
    }

    fn remove(&mut self, name: &str) -> Result<(), Error> {
        if self.links.remove(name).is_some() {
            self.netlink.delete_link(name)?;
            tracing::info!(link = %name, "removed kernel WireGuard link");
        }
        Ok(())
    }

    fn names(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    fn stats(&mut self, name: &str) -> Result<LinkStats, Error> {
        let message = GenlMessage::from_payload(Wireguard {
            cmd: WireguardCmd::GetDevice,
            nlas: vec![WgDeviceAttrs::IfName(name.to_string())],
        });
        let replies = self
            .genl
            .request(message, self.family, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut stats = LinkStats::default();
        for reply in replies {
            for attribute in reply.nlas {
                if let WgDeviceAttrs::Peers(peers) = attribute {
                    for WgPeer(peer) in peers {
                        for a in peer {
                            match a {
                                WgPeerAttrs::RxBytes(b) => stats.rx_bytes += b,
                                WgPeerAttrs::TxBytes(b) => stats.tx_bytes += b,
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
        Ok(stats)
    }
}
