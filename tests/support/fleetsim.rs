//! Many simulated nodes in one process, speaking the node API to `tlm serve` over real
//! management links.
//!
//! Each node has its own WireGuard session with the controller's hub: boringtun's `noise::Tunn`
//! with the node's private key, one per node. All of them share one UDP socket; a packet from
//! the hub goes to its node by the receiver index in its header. The kernel's TCP runs over one
//! TUN that holds every node's management address. Each node is a thread doing what
//! `towalink-node`'s management thread does:
//! - report its state (`POST /v1/sync`, long polls included);
//! - open the signed reply with the node's trusted key, for its id and its report's nonce;
//! - download the versions it lacks and verify them as a node does (`towalink_bundle`);
//! - carry out orders: activate, or roll back when told to fail (a bad canary).
//!
//! What it leaves out: slots on disk, services, BIRD. The controller sees the same traffic as
//! from real nodes: handshakes, reports, long polls, downloads.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ed25519_dalek::VerifyingKey;
use towalink_bundle::messages::{
    NodeReport, OrderOutcome, OrderResult, RollbackReport, SlotState, SyncReply, BUNDLE_PATH,
    SYNC_PATH,
};
use towalink_bundle::orders::{self, LastOrder, OrderVerdict, ReplyBody};
use towalink_bundle::wire;

use crate::network::{enter_netns, in_netns, sh};

/// The TUN that carries every simulated node's management address.
pub const TUN_NAME: &str = "fsim0";

/// Bundles larger than this are refused (a node's own bound is larger; these are small).
const MAX_BUNDLE_BYTES: u64 = 64 << 20;
const MAX_REPLY_BYTES: u64 = 1 << 20;

/// One simulated node.
#[derive(Clone)]
pub struct SimNode {
    pub id: u32,
    /// `<node>.<site>`.
    pub name: String,
    /// Its management address.
    pub address: Ipv6Addr,
    pub wg_private_key: [u8; 32],
}

/// Where the simulated nodes reach the controller.
#[derive(Clone)]
pub struct ControllerLink {
    /// The hub's WireGuard endpoint.
    pub hub: SocketAddr,
    pub hub_public_key: [u8; 32],
    pub keepalive_s: u16,
    /// The management API (inside the links).
    pub api: SocketAddr,
    /// The controller key the nodes trust (signs replies and bundles).
    pub trusted: VerifyingKey,
}

/// What a simulated node holds and did, as the test sees it.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    pub active: Option<u32>,
    pub state: Option<SlotState>,
    pub confirm_by: Option<u64>,
    pub installed: Vec<u32>,
    pub order_done: Option<OrderOutcome>,
    pub last_rollback: Option<RollbackReport>,
    /// When the controller first answered a report naming each version active.
    pub reported: BTreeMap<u32, Instant>,
    /// Failed exchanges (connection, status, refused reply), and the last one's reason.
    pub errors: u64,
    pub last_error: Option<String>,
    /// Roll back every version the controller orders (a canary whose health check fails).
    pub fails: bool,
}

/// The time an exchange took that did not wait on purpose (a sync without a long poll, a
/// download), and when it started.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub started: Instant,
    pub took: Duration,
}

struct Shared {
    views: Vec<Mutex<NodeView>>,
    latencies: Mutex<Vec<Latency>>,
    stop: AtomicBool,
}

/// A running simulated fleet; stopped (threads joined, TUN closed) on drop.
pub struct Fleet {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    names: Vec<String>,
}

impl Fleet {
    /// Starts `nodes` in the network namespace `netns`: makes the TUN there with every node's
    /// address, a route to the API through it and the tunnels' socket, then one thread per
    /// node. The namespace must already reach `link.hub`.
    pub fn start(netns: &str, link: ControllerLink, nodes: Vec<SimNode>) -> Fleet {
        let (tun, udp) = in_netns(netns, || (open_tun(TUN_NAME), bind_udp()));
        let mut batch = format!("link set {TUN_NAME} up mtu 1420 txqueuelen 10000\n");
        for node in &nodes {
            batch.push_str(&format!(
                "addr add {}/128 dev {TUN_NAME} nodad\n",
                node.address
            ));
        }
        let IpAddr::V6(api) = link.api.ip() else {
            panic!("the management API is on IPv6")
        };
        batch.push_str(&format!("route add {api}/128 dev {TUN_NAME}\n"));
        let batch_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(batch_file.path(), batch).unwrap();
        sh(
            "ip",
            &["-n", netns, "-batch", batch_file.path().to_str().unwrap()],
        );

        let shared = Arc::new(Shared {
            views: nodes.iter().map(|_| Mutex::default()).collect(),
            latencies: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let tunnels = Arc::new(Tunnels {
            tunns: nodes
                .iter()
                .enumerate()
                .map(|(slot, node)| {
                    Mutex::new(Tunn::new(
                        StaticSecret::from(node.wg_private_key),
                        PublicKey::from(link.hub_public_key),
                        None,
                        Some(link.keepalive_s),
                        slot as u32,
                        None,
                    ))
                })
                .collect(),
            by_address: nodes
                .iter()
                .enumerate()
                .map(|(slot, node)| (node.address, slot))
                .collect(),
            tun,
            udp,
            hub: link.hub,
        });
        let mut threads = Vec::new();
        for (name, job) in [
            (
                "fleet-tun",
                Tunnels::tun_to_hub as fn(&Tunnels, &AtomicBool),
            ),
            ("fleet-udp", Tunnels::hub_to_tun),
            ("fleet-timers", Tunnels::timers),
        ] {
            let (tunnels, shared) = (tunnels.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || job(&tunnels, &shared.stop))
                    .unwrap(),
            );
        }
        let names = nodes.iter().map(|n| n.name.clone()).collect();
        for (slot, node) in nodes.into_iter().enumerate() {
            let (shared, link, netns) = (shared.clone(), link.clone(), netns.to_string());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("node-{}", node.id))
                    .stack_size(256 << 10)
                    .spawn(move || {
                        enter_netns(&netns);
                        run_node(&node, &link, slot, &shared)
                    })
                    .unwrap(),
            );
        }
        Fleet {
            shared,
            threads,
            names,
        }
    }

    /// Every node's name and view, in the order they were given.
    pub fn views(&self) -> Vec<(String, NodeView)> {
        self.names
            .iter()
            .cloned()
            .zip(self.shared.views.iter().map(|v| v.lock().unwrap().clone()))
            .collect()
    }

    /// How many nodes `check` holds for.
    pub fn count(&self, check: impl Fn(&NodeView) -> bool) -> usize {
        self.shared
            .views
            .iter()
            .filter(|v| check(&v.lock().unwrap()))
            .count()
    }

    /// Makes the nodes whose name `which` picks roll back every ordered version (or not).
    pub fn set_failing(&self, which: impl Fn(&str) -> bool) {
        for (name, view) in self.names.iter().zip(&self.shared.views) {
            view.lock().unwrap().fails = which(name);
        }
    }

    /// The exchanges that did not wait on purpose, started at or after `since`.
    pub fn latencies_since(&self, since: Instant) -> Vec<Duration> {
        self.shared
            .latencies
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.started >= since)
            .map(|l| l.took)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A TUN without packet information (the calling thread's namespace).
fn open_tun(name: &str) -> OwnedFd {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `request` is laid out as.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut request) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file.into()
}

fn bind_udp() -> UdpSocket {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind the tunnels' socket");
    let size: libc::c_int = 8 << 20;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: an int option on a socket we own.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    socket
}

/// Every node's WireGuard session, the TUN and the socket they share.
struct Tunnels {
    tunns: Vec<Mutex<Tunn>>,
    by_address: HashMap<Ipv6Addr, usize>,
    tun: OwnedFd,
    udp: UdpSocket,
    hub: SocketAddr,
}

impl Tunnels {
    fn send(&self, datagram: &[u8]) {
        // A full socket buffer loses the datagram, as a network would.
        let _ = self.udp.send_to(datagram, self.hub);
    }

    fn write_tun(&self, packet: &[u8]) {
        // SAFETY: writes `packet` to the TUN we own.
        unsafe { libc::write(self.tun.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    }

    /// Packets the nodes' TCP sends: encrypted by the session of their source address.
    fn tun_to_hub(&self, stop: &AtomicBool) {
        let mut packet = vec![0u8; 65536];
        let mut out = vec![0u8; 65536 + 32];
        while !stop.load(Ordering::Relaxed) {
            let mut poll = libc::pollfd {
                fd: self.tun.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd.
            if unsafe { libc::poll(&mut poll, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: reads into `packet`, which is that long.
            let n = unsafe {
                libc::read(
                    self.tun.as_raw_fd(),
                    packet.as_mut_ptr().cast(),
                    packet.len(),
                )
            };
            if n < 40 || packet[0] >> 4 != 6 {
                continue;
            }
            let packet = &packet[..n as usize];
            let source = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[8..24]).unwrap());
            let Some(&slot) = self.by_address.get(&source) else {
                continue;
            };
            let mut tunn = self.tunns[slot].lock().unwrap();
            if let TunnResult::WriteToNetwork(datagram) = tunn.encapsulate(packet, &mut out) {
                self.send(datagram);
            }
        }
    }

    /// Datagrams from the hub: to the session their receiver index names (a handshake the hub
    /// starts is tried on each), decrypted packets to the TUN.
    fn hub_to_tun(&self, stop: &AtomicBool) {
        let mut datagram = vec![0u8; 65536];
        let mut out = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = self.udp.recv_from(&mut datagram) else {
                continue;
            };
            let datagram = &datagram[..n];
            let slots: Vec<usize> = match Tunn::parse_incoming_packet(datagram) {
                Ok(Packet::HandshakeResponse(p)) => vec![(p.receiver_idx >> 8) as usize],
                Ok(Packet::PacketCookieReply(p)) => vec![(p.receiver_idx >> 8) as usize],
                Ok(Packet::PacketData(p)) => vec![(p.receiver_idx >> 8) as usize],
                Ok(Packet::HandshakeInit(_)) => (0..self.tunns.len()).collect(),
                Err(_) => continue,
            };
            for slot in slots {
                let Some(tunn) = self.tunns.get(slot) else {
                    continue;
                };
                let mut tunn = tunn.lock().unwrap();
                match tunn.decapsulate(Some(from.ip()), datagram, &mut out) {
                    TunnResult::WriteToNetwork(reply) => {
                        self.send(reply);
                        // Packets queued while the handshake ran.
                        while let TunnResult::WriteToNetwork(queued) =
                            tunn.decapsulate(None, &[], &mut out)
                        {
                            self.send(queued);
                        }
                        break;
                    }
                    TunnResult::WriteToTunnelV6(packet, _)
                    | TunnResult::WriteToTunnelV4(packet, _) => {
                        self.write_tun(packet);
                        break;
                    }
                    TunnResult::Done => break,
                    TunnResult::Err(_) => {}
                }
            }
        }
    }

    /// Handshake retries, rekeying and keepalives of every session.
    fn timers(&self, stop: &AtomicBool) {
        let mut out = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            for tunn in &self.tunns {
                if let TunnResult::WriteToNetwork(datagram) =
                    tunn.lock().unwrap().update_timers(&mut out)
                {
                    self.send(datagram);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut buffer);
    hex::encode(buffer)
}

/// A TCP connection from `local` (a management address on the TUN) to `to`.
fn connect_from(local: Ipv6Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let address = |ip: Ipv6Addr, port: u16| libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: 0,
    };
    let IpAddr::V6(remote) = to.ip() else {
        return Err(std::io::Error::other("the API is on IPv6"));
    };
    let size = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: a new socket, owned by the stream at once.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // The send timeout bounds connect() too.
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let (here, there) = (address(local, 0), address(remote, to.port()));
    // SAFETY: sockaddr_in6 values of the size given.
    if unsafe { libc::bind(fd, (&here as *const libc::sockaddr_in6).cast(), size) } != 0
        || unsafe { libc::connect(fd, (&there as *const libc::sockaddr_in6).cast(), size) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_read_timeout(Some(Duration::from_millis(250)))?;
    Ok(stream)
}

/// A stream read until a deadline, or until the fleet stops.
struct Bounded<'a> {
    stream: TcpStream,
    deadline: Instant,
    stop: &'a AtomicBool,
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(std::io::Error::other("the fleet stops"));
                    }
                    if Instant::now() >= self.deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "controller did not answer in time",
                        ));
                    }
                }
                other => return other,
            }
        }
    }
}

/// Sends one request; returns the reader at the response (its head unread).
fn request<'a>(
    node: &SimNode,
    link: &ControllerLink,
    method: &str,
    target: &str,
    body: &[u8],
    timeout: Duration,
    stop: &'a AtomicBool,
) -> Result<BufReader<Bounded<'a>>, String> {
    let mut stream = connect_from(node.address, link.api).map_err(|e| format!("connect: {e}"))?;
    wire::write_request(
        &mut stream,
        method,
        &link.api.to_string(),
        target,
        "application/json",
        body,
    )
    .map_err(|e| format!("send: {e}"))?;
    Ok(BufReader::new(Bounded {
        stream,
        deadline: Instant::now() + timeout,
        stop,
    }))
}

fn report(node: &SimNode, view: &NodeView, born: Instant) -> NodeReport {
    NodeReport {
        node_id: node.id,
        node: node.name.clone(),
        daemon_version: "fleetsim".into(),
        uptime_s: born.elapsed().as_secs(),
        boot_id: format!("fleetsim-{}", node.id),
        daemon_uptime_s: born.elapsed().as_secs(),
        active_version: view.active,
        state: view.state,
        confirm_by: view.confirm_by,
        last_good_version: view.active.filter(|_| view.state == Some(SlotState::Good)),
        installed_versions: view.installed.clone(),
        last_rollback: view.last_rollback.clone(),
        order_done: view.order_done.clone(),
        nonce: random_hex(16),
        ..NodeReport::default()
    }
}

/// One node's life: sync, act on the reply, repeat until the fleet stops.
fn run_node(node: &SimNode, link: &ControllerLink, slot: usize, shared: &Shared) {
    let view = &shared.views[slot];
    let born = Instant::now();
    let mut wait_ms = 0u64;
    let fail = |reason: String| {
        let mut view = view.lock().unwrap();
        view.errors += 1;
        view.last_error = Some(reason);
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let sent = report(node, &view.lock().unwrap(), born);
        let body = serde_json::to_vec(&sent).unwrap();
        let started = Instant::now();
        let answer = request(
            node,
            link,
            "POST",
            &format!("{SYNC_PATH}?wait_ms={wait_ms}"),
            &body,
            Duration::from_millis(wait_ms) + Duration::from_secs(30),
            &shared.stop,
        )
        .and_then(|mut reader| {
            wire::read_response(&mut reader, MAX_REPLY_BYTES).map_err(|e| e.to_string())
        })
        .and_then(|response| match response.status {
            200 => serde_json::from_slice::<SyncReply>(&response.body)
                .map_err(|e| format!("reply: {e}")),
            status => Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&response.body).trim()
            )),
        })
        .and_then(|reply| {
            orders::open_reply(reply.signed.as_ref(), &link.trusted, node.id, &sent.nonce)
                .map_err(|e| format!("reply refused: {e}"))
        });
        let reply = match answer {
            Ok(reply) => reply,
            Err(reason) => {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                fail(reason);
                wait_ms = 0;
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if wait_ms == 0 {
            shared.latencies.lock().unwrap().push(Latency {
                started,
                took: started.elapsed(),
            });
        }
        {
            let mut view = view.lock().unwrap();
            if let Some(active) = sent.active_version {
                view.reported.entry(active).or_insert_with(Instant::now);
            }
            // Reached through the version it reported pending: confirmed.
            if sent.state == Some(SlotState::Pending) && view.active == sent.active_version {
                view.state = Some(SlotState::Good);
                view.confirm_by = None;
            }
        }
        let acted = act_on(node, link, &reply, view, shared, fail);
        wait_ms = if acted {
            0
        } else {
            reply.report_interval_s.saturating_mul(1000)
        };
    }
}

/// Takes the versions offered and carries out a new order, as a node does. Whether anything
/// changed.
fn act_on(
    node: &SimNode,
    link: &ControllerLink,
    reply: &ReplyBody,
    view: &Mutex<NodeView>,
    shared: &Shared,
    fail: impl Fn(String),
) -> bool {
    let (installed, last) = {
        let view = view.lock().unwrap();
        let last = match &view.order_done {
            Some(done) => LastOrder::Signed { seq: done.seq },
            None => LastOrder::None,
        };
        (view.installed.clone(), last)
    };
    let order = reply
        .order
        .filter(|o| orders::judge_order(o, last) == Ok(OrderVerdict::New));
    let highest = installed.iter().max().copied().unwrap_or(0);
    let mut wanted: Vec<u32> = reply
        .versions
        .iter()
        .rev()
        .take(2)
        .copied()
        .filter(|v| *v >= highest)
        .chain(order.map(|o| o.version))
        .filter(|v| !installed.contains(v))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut changed = false;
    for version in wanted {
        let started = Instant::now();
        match download(node, link, version, &shared.stop) {
            Ok(()) => {
                shared.latencies.lock().unwrap().push(Latency {
                    started,
                    took: started.elapsed(),
                });
                let mut view = view.lock().unwrap();
                view.installed.push(version);
                view.installed.sort_unstable();
                changed = true;
            }
            Err(reason) => fail(format!("v{version}: {reason}")),
        }
    }
    let mut view = view.lock().unwrap();
    if view.active.is_none() {
        if let Some(&first) = view.installed.last() {
            view.active = Some(first);
            view.state = Some(SlotState::Good);
            changed = true;
        }
    }
    if let Some(order) = order {
        let result = if view.active == Some(order.version) {
            OrderResult::AlreadyActive
        } else if !view.installed.contains(&order.version) {
            OrderResult::Refused(format!("version {} is not installed", order.version))
        } else if view.fails {
            let reason = "health check failed (simulated)".to_string();
            view.last_rollback = Some(RollbackReport {
                time: unix_now(),
                from_version: Some(order.version),
                to_version: view.active,
                reason: reason.clone(),
            });
            OrderResult::RolledBack(reason)
        } else {
            view.active = Some(order.version);
            match order.confirm_s {
                Some(seconds) => {
                    view.state = Some(SlotState::Pending);
                    view.confirm_by = Some(unix_now() + seconds);
                }
                None => {
                    view.state = Some(SlotState::Good);
                    view.confirm_by = None;
                }
            }
            OrderResult::Activated
        };
        view.order_done = Some(OrderOutcome {
            seq: order.seq,
            version: order.version,
            result,
            time: unix_now(),
        });
        changed = true;
    }
    changed
}

/// Downloads a version and verifies it as a node does (signature, node id, every file).
fn download(
    node: &SimNode,
    link: &ControllerLink,
    version: u32,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut reader = request(
        node,
        link,
        "GET",
        &format!("{BUNDLE_PATH}{version}"),
        b"",
        Duration::from_secs(60),
        stop,
    )?;
    let head =
        wire::read_response_head(&mut reader, MAX_BUNDLE_BYTES).map_err(|e| e.to_string())?;
    if head.status != 200 {
        return Err(format!("download: status {}", head.status));
    }
    towalink_bundle::verify_reader(
        (&mut reader).take(head.length),
        &link.trusted,
        node.id,
        &towalink_bundle::Meter::default(),
    )
    .map(drop)
    .map_err(|e| e.to_string())
}
