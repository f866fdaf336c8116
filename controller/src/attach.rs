//! `tlm attach node <ref>`: pair a device running `towalink-node bootstrap` with a node.
//!
//! An HTTPS endpoint (rustls; `certs/server.pem` + `certs/key.pem`, made self-signed on first
//! use with its fingerprint printed) collects requests for a while; the operator picks one
//! device (or names it with `--device`, or `--yes` takes the only one). Until the choice every
//! device hears "waiting" and nothing secret leaves the controller; then the chosen device
//! gets the node's identity and keys on its next request and every other device is refused.
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
use towalink_bundle::wire;

use crate::allocation::NodeAllocation;
use crate::durable;
use crate::names::NodeRef;
use crate::service::records;
use crate::store::Store;
use crate::Error;

pub const CERT_FILE: &str = "certs/server.pem";
pub const KEY_FILE: &str = "certs/key.pem";
/// Devices remembered at most (more are turned away until the choice).
const MAX_DEVICES: usize = 64;

fn failed(what: impl std::fmt::Display) -> Error {
    Error::Service(what.to_string())
}

/// How `tlm attach` runs.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub listen: SocketAddr,
    pub collect: Duration,
    pub device: Option<String>,
    pub yes: bool,
    pub timeout: Duration,
    /// Extra names or addresses for a certificate made now.
    pub extra_names: Vec<String>,
}

/// A device that asked.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub hostname: String,
    pub machine: String,
    pub address: SocketAddr,
    pub requests: u32,
}

#[derive(Default)]
struct Pairing {
    devices: BTreeMap<String, Device>,
    order: Vec<String>,
    chosen: Option<String>,
    granted: bool,
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
    let cert_path = store.root().join(CERT_FILE);
    let key_path = store.root().join(KEY_FILE);
    let mut made = false;
    if !cert_path.exists() && !key_path.exists() {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            names.push(host.trim().to_string());
        }
        if let Ok(settings) = crate::management::settings(store) {
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
        durable::create_dir_all(&store.root().join("certs"))?;
        durable::write_atomic(
            &key_path,
            certified.key_pair.serialize_pem().as_bytes(),
            0o600,
        )?;
        durable::write_atomic(&cert_path, certified.cert.pem().as_bytes(), 0o644)?;
        made = true;
    }
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
        let _ = tls.conn.send_close_notify();
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
    let mut state = pairing.lock().expect("pairing lock");
    match &state.chosen {
        Some(chosen) if *chosen == ask.device_id => {
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
            if !known && state.devices.len() >= MAX_DEVICES {
                drop(state);
                answer(503, b"{\"error\":\"too many devices are asking\"}".to_vec());
                return;
            }
            let device = state
                .devices
                .entry(ask.device_id.clone())
                .or_insert_with(|| Device {
                    id: ask.device_id.clone(),
                    hostname: ask.hostname.chars().take(64).collect(),
                    machine: ask.machine.chars().take(32).collect(),
                    address,
                    requests: 0,
                });
            device.requests += 1;
            device.address = address;
            if !known {
                state.order.push(ask.device_id.clone());
                eprintln!(
                    "request from device {} (host `{}`, {}) at {}",
                    ask.device_id,
                    ask.hostname.chars().take(64).collect::<String>(),
                    ask.machine.chars().take(32).collect::<String>(),
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
    let node = store.load_generated()?.node(node_ref)?.clone();
    let full = node.full_name();
    let (identity, secrets): (NodeIdentity, _) = {
        let _lock = store.lock()?;
        store.ensure_gitignore()?;
        crate::management::node_identity(store, &node)?
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
    full: &crate::names::NodeFullName,
    options: &AttachOptions,
    pairing: &Mutex<Pairing>,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<Device, Error> {
    let _ = store;
    let started = Instant::now();
    // Collect: until the time is up, or the named device has asked.
    loop {
        let state = pairing.lock().expect("pairing lock");
        let named_seen = options.device.as_ref().is_some_and(|d| {
            state
                .devices
                .keys()
                .filter(|id| id.starts_with(d.as_str()))
                .count()
                == 1
        });
        drop(state);
        if named_seen || started.elapsed() >= options.collect {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let devices: Vec<Device> = {
        let state = pairing.lock().expect("pairing lock");
        state
            .order
            .iter()
            .map(|id| state.devices[id].clone())
            .collect()
    };
    if devices.is_empty() {
        return Err(failed(format!(
            "no device asked for a configuration within {} s: run `towalink-node bootstrap --controller <this host>:{}` on the device",
            options.collect.as_secs(),
            options.listen.port()
        )));
    }
    let chosen = if let Some(prefix) = &options.device {
        let matching: Vec<&Device> = devices
            .iter()
            .filter(|d| d.id.starts_with(prefix.as_str()))
            .collect();
        match matching.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(failed(format!(
                    "--device `{prefix}` has not asked (devices: {})",
                    devices
                        .iter()
                        .map(|d| d.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            _ => {
                return Err(failed(format!(
                    "--device `{prefix}` matches several devices: give more of its id"
                )))
            }
        }
    } else if options.yes {
        match devices.as_slice() {
            [one] => one.clone(),
            _ => {
                return Err(failed(format!(
                    "--yes needs exactly one requesting device, {} asked: pick one with --device",
                    devices.len()
                )))
            }
        }
    } else {
        writeln!(out, "devices asking to become {full}:").ok();
        for (i, d) in devices.iter().enumerate() {
            writeln!(
                out,
                "  {}) {}  host `{}`  {}  from {}  ({} requests)",
                i + 1,
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
            "attach which device as {full}? [1-{}, empty to abort] ",
            devices.len()
        )
        .ok();
        out.flush().ok();
        let mut line = String::new();
        input.read_line(&mut line).map_err(failed)?;
        let line = line.trim();
        if line.is_empty() {
            return Err(failed("aborted by the operator; no device got anything"));
        }
        match line
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| devices.get(i))
        {
            Some(d) => d.clone(),
            None => {
                return Err(failed(format!(
                    "`{line}` is not one of 1-{}",
                    devices.len()
                )))
            }
        }
    };
    pairing.lock().expect("pairing lock").chosen = Some(chosen.id.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

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
