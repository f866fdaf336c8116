//! WireGuard links behind one trait. [`Boringtun`] runs userspace WireGuard in this process
//! (the default: many hosts lack the kernel module); each link is its own TUN interface and
//! boringtun device, configured over the WireGuard UAPI through a socket pair (no shared
//! socket directory, so several nodes on one host cannot clash).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::IntoRawFd as _;
use std::os::unix::net::UnixStream;

use boringtun::device::{DeviceConfig, DeviceHandle};

use crate::Error;

/// One point-to-point WireGuard link: a single peer, every address allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireGuardLink {
    pub name: String,
    pub private_key_hex: String,
    pub listen_port: u16,
    pub peer_public_key_hex: String,
    /// A resolved `address:port`, or none (the peer connects to us).
    pub endpoint: Option<String>,
    pub keepalive: u16,
}

impl WireGuardLink {
    /// The private key's 32 bytes.
    pub fn private_key(&self) -> Result<[u8; 32], Error> {
        self.key(&self.private_key_hex, "the private key")
    }

    /// The peer's public key's 32 bytes.
    pub fn peer_public_key(&self) -> Result<[u8; 32], Error> {
        self.key(&self.peer_public_key_hex, "the peer's public key")
    }

    fn key(&self, hex_key: &str, what: &str) -> Result<[u8; 32], Error> {
        hex::decode(hex_key)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| {
                Error::WireGuard(format!(
                    "WireGuard link {}: {what} is not a 32-byte hex key",
                    self.name
                ))
            })
    }

    /// The endpoint as an address (names are resolved before a link is made).
    pub fn endpoint_address(&self) -> Result<Option<std::net::SocketAddr>, Error> {
        self.endpoint
            .as_deref()
            .map(|text| {
                text.parse().map_err(|_| {
                    Error::WireGuard(format!(
                        "WireGuard link {}: endpoint `{text}` is not resolved to an address:port",
                        self.name
                    ))
                })
            })
            .transpose()
    }
}

/// Traffic counters of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What `ensure` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Reconfigured,
    Unchanged,
}

/// A WireGuard implementation: in-process boringtun, or the kernel's.
pub trait WireGuard: Send {
    /// Creates the link or brings its configuration in line; an unchanged link is not touched
    /// (its session keeps running).
    fn ensure(&mut self, link: &WireGuardLink) -> Result<Ensured, Error>;
    fn remove(&mut self, name: &str) -> Result<(), Error>;
    fn names(&self) -> Vec<String>;
    fn stats(&mut self, name: &str) -> Result<LinkStats, Error>;
}

struct Device {
    // Dropping the handle stops the device's threads and closes the TUN interface.
    _handle: DeviceHandle,
    api: Uapi,
    config: WireGuardLink,
}

/// The WireGuard UAPI (`set=1` / `get=1` requests) of one boringtun device, spoken over a
/// socket pair.
pub struct Uapi {
    name: String,
    reader: BufReader<UnixStream>,
}

impl Uapi {
    /// Sends a request (ending with an empty line) and returns the reply's `key=value` pairs;
    /// a non-zero `errno` is an error.
    pub fn request(&mut self, request: &str) -> Result<Vec<(String, String)>, Error> {
        let name = self.name.clone();
        let failed = |what: String| Error::WireGuard(format!("WireGuard link {name}: {what}"));
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| failed(format!("UAPI write: {e}")))?;
        let mut pairs = Vec::new();
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| failed(format!("UAPI read: {e}")))?
                == 0
            {
                return Err(failed("UAPI closed".into()));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((key, value)) = line.split_once('=') {
                pairs.push((key.to_string(), value.to_string()));
            }
        }
        match pairs.iter().find(|(k, _)| k == "errno") {
            Some((_, errno)) if errno == "0" => Ok(pairs),
            Some((_, errno)) => Err(failed(format!("UAPI errno {errno}"))),
            None => Err(failed("UAPI reply without errno".into())),
        }
    }
}

/// Creates an in-process boringtun device (its TUN interface `name`) and its UAPI. Dropping
/// the handle removes the device.
pub fn boringtun_device(name: &str) -> Result<(DeviceHandle, Uapi), Error> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| Error::WireGuard(format!("socketpair for {name}: {e}")))?;
    let config = DeviceConfig {
        n_threads: 1,
        use_connected_socket: true,
        use_multi_queue: false,
        uapi_fd: theirs.into_raw_fd(),
    };
    let handle = DeviceHandle::new(name, config)
        .map_err(|e| Error::WireGuard(format!("cannot create WireGuard link {name}: {e:?}")))?;
    Ok((
        handle,
        Uapi {
            name: name.to_string(),
            reader: BufReader::new(ours),
        },
    ))
}

/// The in-process userspace implementation.
#[derive(Default)]
pub struct Boringtun {
    devices: BTreeMap<String, Device>,
}

impl Boringtun {
    pub fn new() -> Boringtun {
        Boringtun::default()
    }
}

/// The UAPI request that removes the peer of `link`.
fn remove_request(link: &WireGuardLink) -> String {
    format!(
        "set=1\npublic_key={}\nremove=true\n\n",
        link.peer_public_key_hex
    )
}

/// The UAPI request that configures `link`: from scratch (`full`: private key, port, the peer
/// replacing every other), or its peer only (added: see [`Boringtun`]'s `ensure`).
fn set_request(link: &WireGuardLink, full: bool) -> String {
    let mut request = String::from("set=1\n");
    if full {
        request.push_str(&format!(
            "private_key={}\nlisten_port={}\nreplace_peers=true\n",
            link.private_key_hex, link.listen_port
        ));
    }
    request.push_str(&format!("public_key={}\n", link.peer_public_key_hex));
    if let Some(endpoint) = &link.endpoint {
        request.push_str(&format!("endpoint={endpoint}\n"));
    }
    request.push_str(&format!(
        "persistent_keepalive_interval={}\n",
        link.keepalive
    ));
    request.push_str("replace_allowed_ips=true\nallowed_ip=0.0.0.0/0\nallowed_ip=::/0\n");
    request.push('\n');
    request
}

impl WireGuard for Boringtun {
    fn ensure(&mut self, link: &WireGuardLink) -> Result<Ensured, Error> {
        if let Some(device) = self.devices.get_mut(&link.name) {
            if device.config == *link {
                return Ok(Ensured::Unchanged);
            }
            let same_identity = device.config.private_key_hex == link.private_key_hex
                && device.config.listen_port == link.listen_port
                && device.config.peer_public_key_hex == link.peer_public_key_hex;
            // Only the endpoint or keepalive changed: the peer is added again (see
            // `set_request`). Otherwise configure from scratch.
            // boringtun cannot modify a peer it has (its device thread panics), and keeps
            // `remove` for the rest of a request: a changed peer is removed, then added again
            // in a second request; the session restarts with a handshake.
            if same_identity {
                device.api.request(&remove_request(link))?;
            }
            device.api.request(&set_request(link, !same_identity))?;
            device.config = link.clone();
            return Ok(Ensured::Reconfigured);
        }
        let (handle, api) = boringtun_device(&link.name)?;
        let mut device = Device {
            _handle: handle,
            api,
            config: link.clone(),
        };
        device.api.request(&set_request(link, true))?;
        tracing::info!(link = %link.name, port = link.listen_port, endpoint = ?link.endpoint, "created WireGuard link");
        self.devices.insert(link.name.clone(), device);
        Ok(Ensured::Created)
    }

    fn remove(&mut self, name: &str) -> Result<(), Error> {
        if self.devices.remove(name).is_some() {
            tracing::info!(link = %name, "removed WireGuard link");
        }
        Ok(())
    }

    fn names(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }

    fn stats(&mut self, name: &str) -> Result<LinkStats, Error> {
        let device = self
            .devices
            .get_mut(name)
            .ok_or_else(|| Error::WireGuard(format!("no WireGuard link {name}")))?;
        let pairs = device.api.request("get=1\n\n")?;
        let value = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(LinkStats {
            rx_bytes: value("rx_bytes"),
            tx_bytes: value("tx_bytes"),
        })
    }
}
