//! `tlm attach node <ref>`: pair a device running `towalink-node bootstrap` with a node.
//!
//! An HTTPS endpoint (rustls; `certs/server.pem` + `certs/key.pem`, made self-signed on first
//! use with its fingerprint printed) collects requests for a while; the operator picks the
//! device by the pairing code it shows on its console (typed at the prompt or `--code`; a
//! device secret: without it nothing is handed out, `--yes` included). Until the choice every
//! device hears "waiting" and nothing secret leaves the controller; then the chosen device
//! (same device id, same code) gets the node's identity and keys on its next request and every
//! other device is refused. Each source address may present a few devices only, and whatever
//! a device says about itself is shown escaped.
//! Afterwards `tlm attach` waits for the node to show up over the management link.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use towalink_bundle::messages::{
    AttachGrant, AttachRequest, AttachWaiting, NodeIdentity, ATTACH_PATH,
};
use towalink_bundle::pairing::PairingCode;
use towalink_bundle::printable::printable;
use towalink_bundle::wire;

use crate::model::allocation::NodeAllocation;
use crate::model::names::NodeRef;
use crate::service::records;
use crate::store::Store;
use crate::Error;

pub use crate::store::keys::{ATTACH_CERT_FILE as CERT_FILE, ATTACH_KEY_FILE as KEY_FILE};
/// Devices remembered at most (more are turned away until the choice).
const MAX_DEVICES: usize = 64;
/// Devices one source (an IPv4 address, an IPv6 /64) may present: a stranger cannot fill the
/// list and turn the real device away.
const MAX_DEVICES_PER_SOURCE: usize = 4;

fn failed(what: impl std::fmt::Display) -> Error {
    Error::Service(what.to_string())
}

/// How `tlm attach` runs.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub listen: SocketAddr,
    pub collect: Duration,
    pub device: Option<String>,
    /// The pairing code the device shows; asked for at the prompt when absent.
    pub code: Option<PairingCode>,
    pub yes: bool,
    pub timeout: Duration,
    /// Extra names or addresses for a certificate made now.
    pub extra_names: Vec<String>,
}

/// A device that asked (`hostname` and `machine` as it said them, escaped for display).
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub hostname: String,
    pub machine: String,
    code: PairingCode,
    pub address: SocketAddr,
    pub requests: u32,
}

#[derive(Default)]
struct Pairing {
    devices: BTreeMap<String, Device>,
    order: Vec<String>,
    /// Devices per source (see [`source_key`]).
    per_source: BTreeMap<std::net::IpAddr, usize>,
    chosen: Option<(String, PairingCode)>,
    granted: bool,
    /// TLS connections that failed before a request, per source: how many, the last reason
    /// (a device that does not trust the certificate ends its handshake with an alert).
    tls_failed: BTreeMap<std::net::IpAddr, (u32, String)>,
}

/// Sources whose failed TLS connections are remembered (the count of others is not kept).
const TLS_FAILED_SOURCES: usize = 64;

impl Pairing {
    fn tls_failed(&mut self, source: std::net::IpAddr, reason: String) {
        if self.tls_failed.len() >= TLS_FAILED_SOURCES && !self.tls_failed.contains_key(&source) {
            return;
        }
        let entry = self.tls_failed.entry(source).or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = reason;
    }

    /// `N TLS connection(s) failed (from <source>: <reason>, ...)`, when some did.
    fn tls_failed_summary(&self) -> Option<String> {
        if self.tls_failed.is_empty() {
            return None;
        }
        let total: u32 = self.tls_failed.values().map(|(n, _)| n).sum();
        let sources: Vec<String> = self
            .tls_failed
            .iter()
            .take(3)
            .map(|(source, (_, reason))| format!("from {source}: {reason}"))
            .collect();
        let more = self.tls_failed.len().saturating_sub(3);
        Some(format!(
            "{total} TLS connection(s) failed ({}{})",
            sources.join("; "),
            if more > 0 {
                format!("; {more} more source(s)")
            } else {
                String::new()
            }
        ))
    }

    /// The devices that asked, in the order they first did.
    fn asked(&self) -> Vec<Device> {
        self.order
            .iter()
            .map(|id| self.devices[id].clone())
            .collect()
    }
}

/// The source a device is counted against: its IPv4 address, or its IPv6 /64 (one host can
/// hold a whole /64).
fn source_key(address: &SocketAddr) -> std::net::IpAddr {
    match address.ip() {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(bits.into())
        }
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")),
        v4 => v4,
    }
}

/// The SHA-256 fingerprint of a certificate, as browsers and `openssl x509 -fingerprint`
/// print it.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = towalink_bundle::sha256_hex(der).to_uppercase();
    digest
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).expect("hex"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Loads the TLS certificate and key, making a self-signed pair when there is none. Returns
/// the config, the fingerprint and whether it was made now.
fn tls_identity(
    store: &Store,
    extra_names: &[String],
) -> Result<(Arc<rustls::ServerConfig>, String, bool), Error> {
    let (cert_path, key_path, made) = crate::store::keys::attach_tls_files(store, || {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            names.push(host.trim().to_string());
        }
        if let Ok(settings) = crate::store::keys::settings(store) {
            for endpoint in &settings.controller_endpoints {
                let host = endpoint
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                    .unwrap_or(endpoint);
                names.push(host.to_string());
            }
        }
        names.extend(extra_names.iter().cloned());
        names.retain(|n| !n.is_empty());
        names.sort();
        names.dedup();
        let certified = rcgen::generate_simple_self_signed(names)
            .map_err(|e| failed(format!("cannot make a certificate: {e}")))?;
        Ok((certified.key_pair.serialize_pem(), certified.cert.pem()))
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| failed(format!("`{}`: {e}", cert_path.display())))?;
    let first = certs
        .first()
        .ok_or_else(|| failed(format!("`{}` holds no certificate", cert_path.display())))?;
    let print = fingerprint(first);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| failed(format!("`{}`: {e}", key_path.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(failed)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            failed(format!(
                "`{}` and `{}` do not fit: {e}",
                CERT_FILE, KEY_FILE
            ))
        })?;
    Ok((Arc::new(config), print, made))
}

fn valid_device_id(id: &str) -> bool {
    (16..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn serve_one(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    pairing: &Mutex<Pairing>,
    grant: &AttachGrant,
) {
    let Ok(address) = tcp.peer_addr() else { return };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(connection) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    // The handshake first, so a device that refuses the certificate is told apart from a
    // malformed request: `tlm attach` reports it instead of "no device asked".
    while tls.conn.is_handshaking() {
        if let Err(error) = tls.conn.complete_io(&mut tls.sock) {
            let reason = printable(&error.to_string());
            tracing::warn!(%address, %reason, "TLS connection failed before a request");
            pairing
                .lock()
                .expect("pairing lock")
                .tls_failed(source_key(&address), reason);
            return;
        }
    }
    let request = match wire::read_request(&mut BufReader::new(&mut tls), 64 * 1024) {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(%address, %error, "attach request refused");
            let _ =
                wire::write_response(&mut tls, 400, "text/plain", format!("{error}\n").as_bytes());
            return;
        }
    };
    let mut answer = |status: u16, body: Vec<u8>| {
        let _ = wire::write_response(&mut tls, status, "application/json", &body);
        tls.conn.send_close_notify();
        let _ = tls.flush();
    };
    if request.method != "POST" || request.path != ATTACH_PATH {
        answer(404, b"{\"error\":\"unknown request\"}".to_vec());
        return;
    }
    let ask = match serde_json::from_slice::<AttachRequest>(&request.body) {
        Ok(a) if valid_device_id(&a.device_id) => a,
        _ => {
            tracing::warn!(%address, "malformed attach request refused");
            answer(400, b"{\"error\":\"not an attach request\"}".to_vec());
            return;
        }
    };
    if ask.pairing_code.is_empty() {
        tracing::warn!(%address, "attach request without a pairing code refused");
        answer(
            403,
            b"{\"error\":\"this controller pairs by the code the device shows: update towalink-node on the device\"}".to_vec(),
        );
        return;
    }
    let Ok(code) = ask.pairing_code.parse::<PairingCode>() else {
        tracing::warn!(%address, "attach request with a malformed pairing code refused");
        answer(400, b"{\"error\":\"malformed pairing code\"}".to_vec());
        return;
    };
    let mut state = pairing.lock().expect("pairing lock");
    match &state.chosen {
        Some((chosen, chosen_code)) if *chosen == ask.device_id && chosen_code.matches(&code) => {
            state.granted = true;
            drop(state);
            tracing::info!(device = %ask.device_id, %address, "identity handed out");
            answer(200, serde_json::to_vec(grant).expect("grant serializes"));
        }
        Some(_) => {
            drop(state);
            answer(
                403,
                b"{\"error\":\"the operator chose another device\"}".to_vec(),
            );
        }
        None => {
            let known = state.devices.contains_key(&ask.device_id);
            let source = source_key(&address);
            if !known
                && state.per_source.get(&source).copied().unwrap_or(0) >= MAX_DEVICES_PER_SOURCE
            {
                drop(state);
                tracing::warn!(%address, "too many devices from one source; request refused");
                answer(
                    429,
                    b"{\"error\":\"too many devices from this address\"}".to_vec(),
                );
                return;
            }
            if !known && state.devices.len() >= MAX_DEVICES {
                drop(state);
                answer(503, b"{\"error\":\"too many devices are asking\"}".to_vec());
                return;
            }
            if !known {
                *state.per_source.entry(source).or_insert(0) += 1;
            }
            let device = state
                .devices
                .entry(ask.device_id.clone())
                .or_insert_with(|| Device {
                    id: ask.device_id.clone(),
                    hostname: printable(&ask.hostname.chars().take(64).collect::<String>()),
                    machine: printable(&ask.machine.chars().take(32).collect::<String>()),
                    code: code.clone(),
                    address,
                    requests: 0,
                });
            // A device keeps the code it first showed (its id is per bootstrap run).
            if !device.code.matches(&code) {
                drop(state);
                answer(
                    400,
                    b"{\"error\":\"this device id came with another pairing code\"}".to_vec(),
                );
                return;
            }
            device.requests += 1;
            device.address = address;
            if !known {
                state.order.push(ask.device_id.clone());
                let device = &state.devices[&ask.device_id];
                eprintln!(
                    "request from device {} (host `{}`, {}) at {}",
                    device.id,
                    device.hostname,
                    device.machine,
                    address.ip()
                );
            }
            drop(state);
            let waiting = AttachWaiting {
                status: "waiting for the operator".into(),
            };
            answer(202, serde_json::to_vec(&waiting).expect("serializes"));
        }
    }
}

/// What attach did.
pub struct Attached {
    pub node: NodeAllocation,
    pub device: Device,
    /// The node's first report over the management link, if it came in time.
    pub reported: Option<records::NodeRecord>,
}

/// Runs the pairing. `input` answers the operator's question when neither `--device` nor
/// `--yes` decides.
pub fn attach(
    store: &Store,
    node_ref: &NodeRef,
    options: &AttachOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<Attached, Error> {
    if options.yes && options.code.is_none() {
        return Err(failed(
            "--yes needs --code <the pairing code the device shows on its console>: without it nothing is handed out",
        ));
    }
    let node = store.load_generated()?.node(node_ref)?.clone();
    let full = node.full_name();
    let (identity, secrets): (NodeIdentity, _) = {
        let _lock = store.lock()?;
        store.ensure_gitignore()?;
        crate::store::keys::node_identity(store, &node)?
    };
    if identity.management.is_none() {
        return Err(failed(
            "`controller_endpoint` is not set, so the node could not reach this controller: `tlm set global controller_endpoint <host or address>` first",
        ));
    }
    let grant = AttachGrant {
        identity,
        wg_private_key: secrets.wg_private_key.expose().to_string(),
        recovery_token: secrets.recovery_token.expose().to_string(),
    };
    let (config, print, made) = {
        let _lock = store.lock()?;
        tls_identity(store, &options.extra_names)?
    };
    if made {
        writeln!(
            out,
            "made a self-signed certificate {CERT_FILE}; give it to devices with `--ca`"
        )
        .ok();
    }
    writeln!(out, "certificate SHA-256 fingerprint {print}").ok();
    let listener = TcpListener::bind(options.listen)
        .map_err(|e| failed(format!("cannot listen on {}: {e}", options.listen)))?;
    listener.set_nonblocking(true).map_err(failed)?;
    writeln!(
        out,
        "waiting {} s for devices running `towalink-node bootstrap --controller <this host>:{}` to attach as {full}",
        options.collect.as_secs(),
        options.listen.port()
    )
    .ok();
    out.flush().ok();
    let pairing = Arc::new(Mutex::new(Pairing::default()));
    let grant = Arc::new(grant);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let pairing = Arc::clone(&pairing);
        let grant = Arc::clone(&grant);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nonblocking(false);
                        let pairing = Arc::clone(&pairing);
                        let grant = Arc::clone(&grant);
                        let config = Arc::clone(&config);
                        std::thread::spawn(move || serve_one(tcp, config, &pairing, &grant));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    // The endpoint stays open until attach ends: a chosen device whose grant was lost in
    // transit (a reset) asks again and gets it again.
    let _server = server;
    let _stop = stop;
    let device = choose_and_hand_out(store, &full, options, &pairing, input, out)?;
    writeln!(out, "handed the identity of {full} to device {}", device.id).ok();
    let since = records::now_ms();
    let reported = if records::running_service(store).is_some() {
        let started = Instant::now();
        loop {
            if let Some(record) =
                records::read_node(store, &full).filter(|r| r.last_seen_ms >= since)
            {
                // The service learns the peer's endpoint from WireGuard once a second.
                let endpoint = loop {
                    let known = records::running_service(store)
                        .and_then(|s| s.peers.into_iter().find(|p| p.node_id == node.id))
                        .and_then(|p| p.endpoint)
                        .or_else(|| record.endpoint.clone());
                    if known.is_some() || started.elapsed() >= options.timeout {
                        break known;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                };
                writeln!(
                    out,
                    "management link up: {full} reports from {}, active {}",
                    endpoint.as_deref().unwrap_or("?"),
                    record
                        .report
                        .active_version
                        .map_or("none yet".to_string(), |v| format!("v{v}"))
                )
                .ok();
                break Some(record);
            }
            if started.elapsed() >= options.timeout {
                writeln!(out, "{full} has not reported over the management link within {} s; `tlm status node {full}` shows when it does", options.timeout.as_secs()).ok();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        writeln!(out, "the controller service is not running: start `tlm serve` to bring the management link up").ok();
        None
    };
    Ok(Attached {
        node,
        device,
        reported,
    })
}

fn choose_and_hand_out(
    store: &Store,
    full: &crate::model::names::NodeFullName,
    options: &AttachOptions,
    pairing: &Mutex<Pairing>,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<Device, Error> {
    let started = Instant::now();
    // Collect: until the time is up, or a device showing the given code has asked.
    loop {
        let state = pairing.lock().expect("pairing lock");
        let code_seen = options
            .code
            .as_ref()
            .is_some_and(|code| state.devices.values().any(|d| d.code.matches(code)));
        drop(state);
        if code_seen || started.elapsed() >= options.collect {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (devices, tls_failed) = {
        let state = pairing.lock().expect("pairing lock");
        (state.asked(), state.tls_failed_summary())
    };
    if devices.is_empty() {
        return Err(failed(match tls_failed {
            Some(summary) => format!(
                "no device asked for a configuration within {} s, but {summary}: a device that does not trust this controller's certificate needs `--ca` with `{}`",
                options.collect.as_secs(),
                store.root().join(CERT_FILE).display()
            ),
            None => format!(
                "no device asked for a configuration within {} s: run `towalink-node bootstrap --controller <this host>:{}` on the device",
                options.collect.as_secs(),
                options.listen.port()
            ),
        }));
    }
    let code = match &options.code {
        Some(code) => code.clone(),
        None => {
            writeln!(out, "devices asking to become {full}:").ok();
            for d in &devices {
                writeln!(
                    out,
                    "  {}  host `{}`  {}  from {}  ({} requests)",
                    d.id,
                    d.hostname,
                    d.machine,
                    d.address.ip(),
                    d.requests
                )
                .ok();
            }
            write!(
                out,
                "type the pairing code shown on the console of the device to attach as {full} [empty to abort]: "
            )
            .ok();
            out.flush().ok();
            let mut line = String::new();
            input.read_line(&mut line).map_err(failed)?;
            let line = line.trim();
            if line.is_empty() {
                return Err(failed("aborted by the operator; no device got anything"));
            }
            line.parse::<PairingCode>().map_err(failed)?
        }
    };
    // The device showing the code may ask only now (the operator typed it off a device that
    // was still starting): wait for it as long as for the grant.
    let asked = Instant::now();
    let devices = loop {
        let now = pairing.lock().expect("pairing lock").asked();
        if now.iter().any(|d| d.code.matches(&code)) || asked.elapsed() >= options.timeout {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let chosen = choose(&devices, &code, options.device.as_deref())?;
    pairing.lock().expect("pairing lock").chosen = Some((chosen.id.clone(), chosen.code.clone()));
    writeln!(
        out,
        "chose device {}; waiting for it to ask again",
        chosen.id
    )
    .ok();
    let started = Instant::now();
    loop {
        if pairing.lock().expect("pairing lock").granted {
            return Ok(chosen);
        }
        if started.elapsed() >= options.timeout {
            return Err(failed(format!(
                "device {} did not come back within {} s; nothing was handed out",
                chosen.id,
                options.timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The one device that showed `code` (and whose id starts with `device`, when given).
fn choose(devices: &[Device], code: &PairingCode, device: Option<&str>) -> Result<Device, Error> {
    let matching: Vec<&Device> = devices
        .iter()
        .filter(|d| d.code.matches(code))
        .filter(|d| match device {
            None => true,
            Some(prefix) => d.id.starts_with(prefix),
        })
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(failed(format!(
            "no device that asked shows that pairing code{}; nothing was handed out",
            device.map(|p| format!(" with an id starting `{}`", printable(p))).unwrap_or_default()
        ))),
        _ => Err(failed(format!(
            "{} devices show that pairing code: someone copied it; nothing was handed out (restart `towalink-node bootstrap` on the device for a new code)",
            matching.len()
        ))),
    }
}

/// `tlm attach node <node>`: the options from the command line, stdin for the prompt.
#[allow(clippy::too_many_arguments)]
pub fn run(
    config_dir: &std::path::Path,
    node: &str,
    listen: SocketAddr,
    collect: u64,
    device: Option<String>,
    code: Option<PairingCode>,
    yes: bool,
    timeout: u64,
    san: Vec<String>,
) -> Result<std::process::ExitCode, Error> {
    let store = crate::store::Store::open_existing(config_dir)?;
    let options = AttachOptions {
        listen,
        collect: std::time::Duration::from_secs(collect),
        device,
        code,
        yes,
        timeout: std::time::Duration::from_secs(timeout),
        extra_names: san,
    };
    let mut input = std::io::stdin().lock();
    let mut out = std::io::stdout().lock();
    attach(&store, &node.parse()?, &options, &mut input, &mut out)?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, code: &str, address: &str) -> Device {
        Device {
            id: id.into(),
            hostname: "h".into(),
            machine: "x86_64".into(),
            code: code.parse().unwrap(),
            address: address.parse().unwrap(),
            requests: 1,
        }
    }

    #[test]
    fn the_code_chooses_and_nothing_else_does() {
        let devices = [
            device("aaaa0000aaaa0000", "AAAA-AAAA", "192.0.2.1:1"),
            device("bbbb0000bbbb0000", "BBBB-BBBB", "192.0.2.2:1"),
        ];
        let code: PairingCode = "bbbb-bbbb".parse().unwrap();
        assert_eq!(
            choose(&devices, &code, None).unwrap().id,
            "bbbb0000bbbb0000"
        );
        assert_eq!(
            choose(&devices, &code, Some("bbbb")).unwrap().id,
            "bbbb0000bbbb0000"
        );
        let error = choose(&devices, &code, Some("aaaa"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no device that asked shows that pairing code"),
            "{error}"
        );
        assert!(
            !error.contains("BBBB"),
            "the code is never printed: {error}"
        );
        let error = choose(&devices, &"CCCC-CCCC".parse().unwrap(), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("nothing was handed out"), "{error}");
        let copied = [
            device("aaaa0000aaaa0000", "BBBB-BBBB", "192.0.2.1:1"),
            device("bbbb0000bbbb0000", "BBBB-BBBB", "192.0.2.2:1"),
        ];
        let error = choose(&copied, &code, None).unwrap_err().to_string();
        assert!(
            error.contains("2 devices show that pairing code"),
            "{error}"
        );
    }

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        let key = |a: &str| source_key(&a.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7:5"), "192.0.2.7");
        assert_eq!(key("[2001:db8:1:2:3:4:5:6]:5"), "2001:db8:1:2::");
        assert_eq!(key("[2001:db8:1:2:ffff::1]:5"), "2001:db8:1:2::");
        assert_eq!(key("[::ffff:192.0.2.9]:5"), "192.0.2.9");
    }

    #[test]
    fn fingerprints_look_like_openssl() {
        let print = fingerprint(b"abc");
        assert_eq!(print.len(), 32 * 3 - 1);
        assert!(print.starts_with("BA:78:16:BF"));
    }

    #[test]
    fn device_ids_are_hex() {
        assert!(valid_device_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_device_id("short"));
        assert!(!valid_device_id("0123456789abcdef0123456789abcdeg"));
    }
}
