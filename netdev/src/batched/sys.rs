//! The system calls of [`super::Batched`]: a TUN with the kernel's offloads, a dual-stack UDP
//! socket, and batches of datagrams through `sendmmsg`/`recvmmsg`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A TUN interface; closing it removes the interface.
pub struct Tun {
    pub fd: OwnedFd,
    /// Frames carry a `virtio_net_hdr` and the kernel hands over TCP segments of up to 64 KiB.
    pub offload: bool,
}

fn open_tun_with(name: &str, flags: libc::c_short) -> Result<OwnedFd, String> {
    // SAFETY: a plain open; the descriptor is owned at once.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(last_error("open /dev/net/tun"));
    }
    // SAFETY: `fd` is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!("interface name {name} is too long"));
    }
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `request` is laid out as.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut request) } < 0 {
        return Err(last_error(&format!("create TUN {name}")));
    }
    Ok(fd)
}

impl Tun {
    /// Creates the TUN `name`, with checksum and TCP segmentation offload when the kernel
    /// allows them, else plain.
    pub fn open(name: &str) -> Result<Tun, String> {
        let with_offload = open_tun_with(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR).and_then(|fd| {
            let offloads = libc::c_ulong::from(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
            // SAFETY: TUNSETOFFLOAD takes its flags by value (the kernel reads an unsigned long).
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, offloads) } < 0 {
                Err(last_error("TUNSETOFFLOAD"))
            } else {
                Ok(fd)
            }
        });
        match with_offload {
            Ok(fd) => Ok(Tun { fd, offload: true }),
            Err(reason) => {
                tracing::info!(link = %name, %reason, "TUN offloads unavailable; plain packets");
                Ok(Tun {
                    fd: open_tun_with(name, IFF_TUN | IFF_NO_PI)?,
                    offload: false,
                })
            }
        }
    }

    /// Waits up to `timeout` for the TUN to be readable.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        poll_in(self.fd.as_raw_fd(), timeout)
    }

    /// One frame, or `None` when nothing is waiting.
    pub fn read(&self, buffer: &mut [u8]) -> Option<usize> {
        // SAFETY: reads into `buffer`, which is that long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        (n > 0).then_some(n as usize)
    }

    /// Writes one frame (a full TUN queue loses it, as a full NIC queue would).
    pub fn write(&self, frame: &[u8]) {
        // SAFETY: writes `frame`.
        unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    }
}

fn poll_in(fd: RawFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd.
    unsafe { libc::poll(&mut poll, 1, timeout.as_millis().min(60_000) as libc::c_int) > 0 }
}

/// The link's UDP socket: IPv6 with IPv4 mapped (one socket for either underlay), or IPv4
/// alone where the kernel has no IPv6.
pub struct Socket {
    fd: OwnedFd,
    v6: bool,
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, option: libc::c_int, value: libc::c_int) {
    // SAFETY: an int option on a socket we own.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// A socket address as the kernel takes it, and its length.
fn raw_address(address: SocketAddr, v6: bool) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let address = match (address, v6) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (other, _) => other,
    };
    let length = match address {
        SocketAddr::V4(v4) => {
            let raw = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), raw) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let raw = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), raw) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

/// The address a datagram came from (IPv4-mapped addresses as IPv4).
fn from_raw(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let raw: &libc::sockaddr_in = unsafe { &*(storage as *const _ as *const _) };
            Some(SocketAddr::new(
                IpAddr::from(u32::from_be(raw.sin_addr.s_addr).to_be_bytes()),
                u16::from_be(raw.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let raw: &libc::sockaddr_in6 = unsafe { &*(storage as *const _ as *const _) };
            let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
            let port = u16::from_be(raw.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
                // The scope stays: a link-local peer is reached through its interface.
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, raw.sin6_scope_id)),
            })
        }
        _ => None,
    }
}

impl Socket {
    /// Binds UDP `port` on every address (0: any port).
    pub fn bind(port: u16) -> Result<Socket, String> {
        let open = |family: libc::c_int| {
            // SAFETY: a new socket, owned at once.
            let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            // SAFETY: `fd` is ours when not negative.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let (fd, v6) = match open(libc::AF_INET6) {
            Some(fd) => {
                setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0);
                (fd, true)
            }
            None => (
                open(libc::AF_INET).ok_or_else(|| last_error("UDP socket"))?,
                false,
            ),
        };
        let any = if v6 {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from(([0, 0, 0, 0], port))
        };
        let (address, length) = raw_address(any, v6);
        // SAFETY: a sockaddr of the length given.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_storage).cast(),
                length,
            )
        } < 0
        {
            return Err(last_error(&format!("bind UDP port {port}")));
        }
        for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, option, 4 << 20);
        }
        Ok(Socket { fd, v6 })
    }

    /// Sends `datagrams` to `to`, as many per system call as the kernel takes. A datagram the
    /// kernel refuses (no route yet, a full buffer) is lost, as on a network.
    pub fn send_batch(&self, datagrams: &[&[u8]], to: SocketAddr) {
        let (address, length) = raw_address(to, self.v6);
        let mut iovecs: Vec<libc::iovec> = datagrams
            .iter()
            .map(|d| libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iovec| {
                // SAFETY: all-zero is a valid mmsghdr.
                let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
                message.msg_hdr.msg_name = (&address as *const libc::sockaddr_storage)
                    .cast_mut()
                    .cast();
                message.msg_hdr.msg_namelen = length;
                message.msg_hdr.msg_iov = iovec;
                message.msg_hdr.msg_iovlen = 1;
                message
            })
            .collect();
        let mut sent = 0;
        while sent < messages.len() {
            // SAFETY: the messages point at `iovecs`, `datagrams` and `address`, all alive.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    messages[sent..].as_mut_ptr(),
                    (messages.len() - sent) as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // Skip the one the kernel refused.
                sent += 1;
                continue;
            }
            sent += n as usize;
        }
    }

    /// Receives up to one datagram per `slot` bytes of `buffer`, waiting up to `timeout` for
    /// the first; for each: the slot it is in, its length and its source.
    pub fn receive_batch(
        &self,
        buffer: &mut [u8],
        slot: usize,
        timeout: Duration,
        received: &mut Vec<(usize, usize, SocketAddr)>,
    ) {
        let buffers: Vec<&mut [u8]> = buffer.chunks_exact_mut(slot).collect();
        received.clear();
        if !poll_in(self.fd.as_raw_fd(), timeout) {
            return;
        }
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut sources: Vec<libc::sockaddr_storage> =
            vec![unsafe { std::mem::zeroed() }; buffers.len()];
        // (The slots' memory is untouched until a datagram fills it: one allocation, mapped
        // lazily, so a link costs pages for what it receives, not 2 MiB.)
        let mut iovecs: Vec<libc::iovec> = buffers
            .into_iter()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .zip(sources.iter_mut())
            .map(|(iovec, source)| {
                // SAFETY: all-zero is a valid mmsghdr.
                let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
                message.msg_hdr.msg_name = (source as *mut libc::sockaddr_storage).cast();
                message.msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                message.msg_hdr.msg_iov = iovec;
                message.msg_hdr.msg_iovlen = 1;
                message
            })
            .collect();
        // SAFETY: the messages point at `iovecs`, `buffers` and `sources`, all alive.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                messages.as_mut_ptr(),
                messages.len() as libc::c_uint,
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut(),
            )
        };
        for (index, (message, source)) in messages
            .iter()
            .zip(&sources)
            .take(n.max(0) as usize)
            .enumerate()
        {
            // A truncated datagram cannot be authentic: skip it.
            if message.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                continue;
            }
            if let Some(from) = from_raw(source) {
                received.push((index, message.msg_len as usize, from));
            }
        }
    }

    /// The port it is bound to.
    pub fn port(&self) -> u16 {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `length` bytes.
        unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                (&mut storage as *mut libc::sockaddr_storage).cast(),
                &mut length,
            )
        };
        from_raw(&storage).map_or(0, |a| a.port())
    }
}
