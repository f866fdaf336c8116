//! [`Batched`]: in-process WireGuard for point-to-point links. The protocol is boringtun's
//! (`noise::Tunn`: handshakes, keys, timers, counters); the I/O around it is this module's:
//! - each link has its own TUN and UDP socket, and three threads: transmit, receive, timers;
//! - datagrams travel in batches of up to 32 (`sendmmsg`, `recvmmsg`), one system call each;
//! - the TUN is opened with the kernel's offloads ([`offload`]): a read gives a TCP segment of
//!   up to 64 KiB, which is cut into packets here; received TCP/IPv4 segments of one flow are
//!   joined into one frame. Where the kernel refuses the offloads the TUN carries plain
//!   packets.
//!
//! The peer's address is learnt from what it sends (roaming), as WireGuard's own devices do,
//! but only from what authenticates it: a handshake it started (its key and a fresh timestamp
//! checked), or data or a keepalive that decrypts. A cookie sent under load teaches nothing.
//! Only the endpoint changing keeps the session, and a link without an endpoint now (a name
//! that did not resolve) keeps the one it has. Any other change (keys, port, keepalive) starts
//! a new session on the same interface, so its addresses and routes stay, and it starts from
//! the address the old one knew.
//!
//! Measured against boringtun's device on this machine: docs/benchmarks.md, "WireGuard
//! throughput".

pub mod offload;
mod sys;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::wireguard::{Ensured, LinkStats, WireGuard, WireGuardLink};
use crate::Error;
use sys::{Socket, Tun};

/// Datagrams per system call.
const BATCH: usize = 32;
/// Room for any datagram: a packet of up to 64 KiB (`wg_mtu` allows 65535) and WireGuard's
/// 32 bytes.
const DATAGRAM: usize = 65_536 + 64;
/// How long a thread waits for I/O before it looks whether it should stop.
const POLL: Duration = Duration::from_millis(200);
/// WireGuard's timers want a tick at least this often.
const TICK: Duration = Duration::from_millis(100);

const MESSAGE_HANDSHAKE_RESPONSE: u8 = 2;
const MESSAGE_DATA: u8 = 4;

/// The session index of each new engine (WireGuard only needs it unique per socket).
static NEXT_INDEX: AtomicU32 = AtomicU32::new(1);

/// Every link of this implementation.
#[derive(Default)]
pub struct Batched {
    links: BTreeMap<String, Link>,
}

impl Batched {
    pub fn new() -> Batched {
        Batched::default()
    }
}

struct Link {
    config: WireGuardLink,
    tun: Arc<Tun>,
    engine: Option<Engine>,
    /// What the link's earlier sessions carried (a new session counts from zero).
    carried: LinkStats,
}

/// What the threads of one session share.
struct Shared {
    name: String,
    tun: Arc<Tun>,
    socket: Socket,
    tunn: Mutex<Tunn>,
    endpoint: Mutex<Option<SocketAddr>>,
    stop: AtomicBool,
}

/// One session's threads; stopped and joined on drop.
struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts a session; the peer's address is the link's endpoint, else `known` (where an
    /// earlier session heard it), else learnt when it speaks.
    fn start(
        link: &WireGuardLink,
        tun: Arc<Tun>,
        known: Option<SocketAddr>,
    ) -> Result<Engine, Error> {
        let (private, public) = (link.private_key()?, link.peer_public_key()?);
        let socket = Socket::bind(link.listen_port)
            .map_err(|e| Error::WireGuard(format!("WireGuard link {}: {e}", link.name)))?;
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let tunn = Tunn::new(
            StaticSecret::from(private),
            PublicKey::from(public),
            None,
            (link.keepalive > 0).then_some(link.keepalive),
            index,
            None,
        );
        let shared = Arc::new(Shared {
            name: link.name.clone(),
            tun,
            socket,
            tunn: Mutex::new(tunn),
            endpoint: Mutex::new(link.endpoint_address()?.or(known)),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for (role, job) in [
            ("tx", transmit as fn(&Shared)),
            ("rx", receive),
            ("timers", timers),
        ] {
            let for_thread = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{role}", link.name))
                .spawn(move || job(&for_thread));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    let engine = Engine { shared, threads };
                    drop(engine);
                    return Err(Error::WireGuard(format!(
                        "WireGuard link {}: cannot start its {role} thread: {e}",
                        link.name
                    )));
                }
            }
        }
        Ok(Engine { shared, threads })
    }

    fn stats(&self) -> LinkStats {
        let (_, tx_bytes, rx_bytes, _, _) = lock(&self.shared.tunn).stats();
        LinkStats {
            rx_bytes: rx_bytes as u64,
            tx_bytes: tx_bytes as u64,
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A lock whose holder panicked is still usable: the session's state is plain data.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn endpoint(&self) -> Option<SocketAddr> {
        *lock(&self.endpoint)
    }

    /// Sends to the peer, when its address is known (else the datagrams are lost; a handshake
    /// is retried by the timers).
    fn send(&self, datagrams: &[&[u8]]) {
        if let (Some(to), false) = (self.endpoint(), datagrams.is_empty()) {
            self.socket.send_batch(datagrams, to);
        }
    }
}

/// Packets from the TUN, encrypted, to the peer in batches.
fn transmit(shared: &Shared) {
    let mut frame = vec![0u8; DATAGRAM];
    let mut packets: Vec<Vec<u8>> = Vec::new();
    // One allocation for the batch (mapped lazily: a link costs the pages it fills).
    let mut out = vec![0u8; BATCH * DATAGRAM];
    let mut lengths: Vec<usize> = Vec::with_capacity(BATCH);
    let flush = |out: &[u8], lengths: &mut Vec<usize>| {
        let datagrams: Vec<&[u8]> = lengths
            .iter()
            .zip(out.chunks_exact(DATAGRAM))
            .map(|(n, d)| &d[..*n])
            .collect();
        shared.send(&datagrams);
        lengths.clear();
    };
    while !shared.stopping() {
        if !shared.tun.wait_readable(POLL) {
            continue;
        }
        while let Some(n) = shared.tun.read(&mut frame) {
            if shared.stopping() {
                break;
            }
            packets.clear();
            if shared.tun.offload {
                if let Err(error) = offload::split(&frame[..n], &mut packets) {
                    tracing::debug!(link = %shared.name, %error, "frame from the TUN dropped");
                    continue;
                }
            } else {
                packets.push(frame[..n].to_vec());
            }
            let mut tunn = lock(&shared.tunn);
            for packet in &packets {
                if lengths.len() == BATCH {
                    flush(&out, &mut lengths);
                }
                let slot = lengths.len() * DATAGRAM;
                if let TunnResult::WriteToNetwork(datagram) =
                    tunn.encapsulate(packet, &mut out[slot..slot + DATAGRAM])
                {
                    lengths.push(datagram.len());
                }
            }
            drop(tunn);
            if lengths.len() >= BATCH / 2 {
                flush(&out, &mut lengths);
            }
        }
        flush(&out, &mut lengths);
    }
}

/// Datagrams from the peer, decrypted, to the TUN (TCP segments of one flow joined).
fn receive(shared: &Shared) {
    let mut buffers = vec![0u8; BATCH * DATAGRAM];
    let mut received = Vec::with_capacity(BATCH);
    let mut out = vec![0u8; DATAGRAM];
    let mut plain: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut frames = Vec::new();
    while !shared.stopping() {
        shared
            .socket
            .receive_batch(&mut buffers, DATAGRAM, POLL, &mut received);
        if received.is_empty() {
            continue;
        }
        plain.clear();
        let mut heard_from = None;
        {
            let mut tunn = lock(&shared.tunn);
            for &(index, length, from) in &received {
                let datagram = &buffers[index * DATAGRAM..index * DATAGRAM + length];
                match tunn.decapsulate(Some(from.ip()), datagram, &mut out) {
                    // Our answer to a handshake it started (its key and a fresh timestamp
                    // checked), or a keepalive after it answered ours: the peer is there, and
                    // what waited for the session goes to it. A cookie (we are under load)
                    // proves nothing and releases nothing.
                    TunnResult::WriteToNetwork(reply) => {
                        let authentic =
                            matches!(reply[0], MESSAGE_HANDSHAKE_RESPONSE | MESSAGE_DATA);
                        shared.socket.send_batch(&[reply], from);
                        if authentic {
                            heard_from = Some(from);
                            while let TunnResult::WriteToNetwork(queued) =
                                tunn.decapsulate(None, &[], &mut out)
                            {
                                shared.socket.send_batch(&[queued], from);
                            }
                        }
                    }
                    TunnResult::WriteToTunnelV4(packet, _)
                    | TunnResult::WriteToTunnelV6(packet, _) => {
                        heard_from = Some(from);
                        plain.push(packet.to_vec());
                    }
                    // A keepalive that decrypted: the peer is there.
                    TunnResult::Done if datagram.first() == Some(&MESSAGE_DATA) => {
                        heard_from = Some(from);
                    }
                    TunnResult::Done | TunnResult::Err(_) => {}
                }
            }
        }
        if let Some(from) = heard_from {
            let mut endpoint = lock(&shared.endpoint);
            if *endpoint != Some(from) {
                tracing::debug!(link = %shared.name, %from, "peer endpoint");
                *endpoint = Some(from);
            }
        }
        if shared.tun.offload {
            frames.clear();
            let views: Vec<&[u8]> = plain.iter().map(Vec::as_slice).collect();
            offload::join(&views, &mut frames);
            for frame in &frames {
                shared.tun.write(frame);
            }
        } else {
            for packet in &plain {
                shared.tun.write(packet);
            }
        }
    }
}

/// WireGuard's timers: handshake retries, rekeying, keepalives.
fn timers(shared: &Shared) {
    let mut out = vec![0u8; 256];
    while !shared.stopping() {
        std::thread::sleep(TICK);
        let mut tunn = lock(&shared.tunn);
        if let TunnResult::WriteToNetwork(datagram) = tunn.update_timers(&mut out) {
            shared.send(&[datagram]);
        }
    }
}

impl WireGuard for Batched {
    fn ensure(&mut self, link: &WireGuardLink) -> Result<Ensured, Error> {
        if let Some(existing) = self.links.get_mut(&link.name) {
            if existing.config == *link && existing.engine.is_some() {
                return Ok(Ensured::Unchanged);
            }
            let only_endpoint = WireGuardLink {
                endpoint: link.endpoint.clone(),
                ..existing.config.clone()
            } == *link;
            match &existing.engine {
                // No endpoint now (a name that did not resolve this time): the one the
                // session has stays, as the kernel's WireGuard keeps it.
                Some(engine) if only_endpoint => {
                    if let Some(to) = link.endpoint_address()? {
                        *lock(&engine.shared.endpoint) = Some(to);
                    }
                }
                _ => {
                    // The old session's socket is closed before the new one binds the port.
                    let mut known = None;
                    if let Some(engine) = existing.engine.take() {
                        let stats = engine.stats();
                        existing.carried.rx_bytes += stats.rx_bytes;
                        existing.carried.tx_bytes += stats.tx_bytes;
                        known = engine.shared.endpoint();
                    }
                    existing.engine = Some(Engine::start(link, Arc::clone(&existing.tun), known)?);
                }
            }
            existing.config = link.clone();
            return Ok(Ensured::Reconfigured);
        }
        let tun = Arc::new(Tun::open(&link.name).map_err(|e| {
            Error::WireGuard(format!("cannot create WireGuard link {}: {e}", link.name))
        })?);
        let engine = Engine::start(link, Arc::clone(&tun), None)?;
        tracing::info!(
            link = %link.name,
            port = engine.shared.socket.port(),
            endpoint = ?link.endpoint,
            offload = tun.offload,
            "created WireGuard link"
        );
        self.links.insert(
            link.name.clone(),
            Link {
                config: link.clone(),
                tun,
                engine: Some(engine),
                carried: LinkStats::default(),
            },
        );
        Ok(Ensured::Created)
    }

    fn remove(&mut self, name: &str) -> Result<(), Error> {
        if self.links.remove(name).is_some() {
            tracing::info!(link = %name, "removed WireGuard link");
        }
        Ok(())
    }

    fn names(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    fn stats(&mut self, name: &str) -> Result<LinkStats, Error> {
        let link = self
            .links
            .get(name)
            .ok_or_else(|| Error::WireGuard(format!("no WireGuard link {name}")))?;
        let now = link.engine.as_ref().map(Engine::stats).unwrap_or_default();
        Ok(LinkStats {
            rx_bytes: link.carried.rx_bytes + now.rx_bytes,
            tx_bytes: link.carried.tx_bytes + now.tx_bytes,
        })
    }
}
