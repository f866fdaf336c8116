//! `tlm attach node <ref>`: pair a device running `towalink-node bootstrap` with a node.
//!
//! An HTTPS endpoint (rustls; `certs/server.pem` + `certs/key.pem`, made self-signed on first
//! use and remade when tlm's own certificate lacks a name it must carry, its fingerprint
//! printed each time; a certificate the operator put there is kept) collects requests for a while; the operator picks the
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
    /// Extra names or addresses the certificate carries (`--san`; kept for later ones).
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

/// Names every attach certificate carries (a device on the controller itself, tests).
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The host of a `controller_endpoint` entry: `host:port`, `IPv4:port`, `[IPv6]:port`, or a
/// bare host or address.
fn endpoint_host(endpoint: &str) -> &str {
    let endpoint = endpoint.trim();
    if endpoint.parse::<std::net::IpAddr>().is_ok() {
        return endpoint;
    }
    if let Some(rest) = endpoint.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    endpoint.rsplit_once(':').map_or(endpoint, |(host, _)| host)
}

/// A name a certificate can carry and a device can check (a DNS name or an IP address), in
/// the form compared (DNS names lower-case); `None` otherwise.
fn certificate_name(name: &str) -> Option<String> {
    let name = name.trim().to_ascii_lowercase();
    let valid = rustls::pki_types::ServerName::try_from(name.as_str()).is_ok();
    valid.then_some(name)
}

/// Checks `--san` names: each must be a host name or an IP address.
fn checked_san(san: &[String]) -> Result<Vec<String>, Error> {
    san.iter()
        .map(|name| {
            certificate_name(name).ok_or_else(|| {
                failed(format!(
                    "--san `{}`: not a host name or an IP address",
                    printable(name)
                ))
            })
        })
        .collect()
}

/// The names the attach certificate must carry: the loopback names, the host name, the hosts
/// of the `controller_endpoint` entries and the `--san` names (of this run and earlier ones).
/// Sorted, without duplicates; a host name or endpoint host no certificate can carry is left
/// out.
fn certificate_names(host_name: Option<&str>, endpoints: &[String], san: &[String]) -> Vec<String> {
    let mut names: Vec<String> = LOOPBACK_NAMES
        .iter()
        .copied()
        .chain(host_name)
        .chain(endpoints.iter().map(|e| endpoint_host(e)))
        .chain(san.iter().map(String::as_str))
        .filter_map(certificate_name)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The `needed` names a certificate does not carry (`carries` checks one the way a device
/// does).
fn missing_names(needed: &[String], carries: impl Fn(&str) -> bool) -> Vec<String> {
    needed.iter().filter(|n| !carries(n)).cloned().collect()
}

/// The attach certificate on disk, as far as the choice goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExistingCertificate {
    /// No certificate (a key alone is of no use and is replaced).
    Nothing,
    /// One tlm made: its fingerprint is the one in `certs/attach-names.toml`.
    MadeByTlm { key_fits: bool },
    /// Any other: the operator's, never replaced.
    Operator,
}

/// What `tlm attach` does about its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CertificateChoice {
    Keep,
    Make,
    /// Remade: it lacked these names (empty when its key did not fit it).
    Remake {
        lacked: Vec<String>,
    },
    /// The operator's certificate lacks these names: kept, with a warning.
    WarnOperator {
        lacked: Vec<String>,
    },
}

/// Makes, remakes or keeps the certificate: tlm's own is remade when it lacks a name it must
/// carry (or its key does not fit); the operator's is only warned about.
fn choose_certificate(existing: ExistingCertificate, missing: &[String]) -> CertificateChoice {
    match existing {
        ExistingCertificate::Nothing => CertificateChoice::Make,
        ExistingCertificate::MadeByTlm { key_fits } if !key_fits || !missing.is_empty() => {
            CertificateChoice::Remake {
                lacked: missing.to_vec(),
            }
        }
        ExistingCertificate::Operator if !missing.is_empty() => CertificateChoice::WarnOperator {
            lacked: missing.to_vec(),
        },
        _ => CertificateChoice::Keep,
    }
}

/// The attach endpoint's TLS identity, ready to serve.
struct TlsIdentity {
    config: Arc<rustls::ServerConfig>,
    fingerprint: String,
    /// What was done about the certificate.
    choice: CertificateChoice,
    /// The names the certificate carried before it was remade (from its record).
    was: Vec<String>,
}

/// The certificates of a PEM text.
fn parse_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| failed(format!("`{CERT_FILE}`: {e}")))?;
    if certs.is_empty() {
        return Err(failed(format!("`{CERT_FILE}` holds no certificate")));
    }
    Ok(certs)
}

/// The server configuration of a certificate chain and its key.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key_pem: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let key_pem = key_pem.ok_or_else(|| failed(format!("`{KEY_FILE}` is missing")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| failed(format!("`{KEY_FILE}`: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(failed)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| failed(format!("`{CERT_FILE}` and `{KEY_FILE}` do not fit: {e}")))?;
    Ok(Arc::new(config))
}

/// The subject every certificate made by tlm before `certs/attach-names.toml` existed carries
/// (rcgen's default distinguished name); an operator's certificate names its owner.
const EARLIER_TLM_SUBJECT: &[u8] = b"rcgen self signed cert";

/// Whether a certificate without a record was made by an earlier tlm (so it may be remade).
fn made_by_earlier_tlm(der: &[u8]) -> bool {
    der.windows(EARLIER_TLM_SUBJECT.len())
        .any(|w| w == EARLIER_TLM_SUBJECT)
}

/// Loads the attach endpoint's certificate and key, making a self-signed pair when there is
/// none and remaking tlm's own when it lacks a name it must carry (see [`certificate_names`]).
/// Call with the lock held.
fn tls_identity(store: &Store, san: &[String]) -> Result<TlsIdentity, Error> {
    use crate::store::keys::{
        read_attach_tls_files, write_attach_record, write_attach_tls_files, AttachCertificateRecord,
    };
    let files = read_attach_tls_files(store)?;
    let mut all_san: Vec<String> = files
        .record
        .as_ref()
        .map(|r| r.san.clone())
        .unwrap_or_default();
    all_san.extend(san.iter().cloned());
    all_san.sort();
    all_san.dedup();
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let endpoints = crate::store::keys::settings(store)
        .map(|s| s.controller_endpoints)
        .unwrap_or_default();
    let needed = certificate_names(host_name.as_deref().map(str::trim), &endpoints, &all_san);

    let existing_certs = files
        .cert_pem
        .as_deref()
        .map(parse_certificates)
        .transpose()?;
    let (existing, missing, config) = match existing_certs {
        None => (ExistingCertificate::Nothing, needed.clone(), None),
        Some(certs) => {
            let print = fingerprint(&certs[0]);
            let parsed = rustls::server::ParsedCertificate::try_from(&certs[0])
                .map_err(|e| failed(format!("`{CERT_FILE}`: {e}")))?;
            let missing = missing_names(&needed, |name| {
                rustls::pki_types::ServerName::try_from(name)
                    .is_ok_and(|n| rustls::client::verify_server_name(&parsed, &n).is_ok())
            });
            drop(parsed);
            // tlm before the record: its certificates carry rcgen's default subject.
            let earlier_tlm = made_by_earlier_tlm(certs[0].as_ref());
            let config = server_config(certs, files.key_pem.as_deref());
            let tlms = match &files.record {
                Some(record) => record.fingerprint == print,
                None => earlier_tlm,
            };
            let existing = if tlms {
                ExistingCertificate::MadeByTlm {
                    key_fits: config.is_ok(),
                }
            } else {
                ExistingCertificate::Operator
            };
            (existing, missing, Some((config, print)))
        }
    };
    let choice = choose_certificate(existing, &missing);
    // A `--san` name tlm's certificate carries already is recorded all the same, so that a
    // later certificate carries it too.
    if let (ExistingCertificate::MadeByTlm { .. }, CertificateChoice::Keep, Some(record)) =
        (existing, &choice, &files.record)
    {
        if record.san != all_san {
            write_attach_record(
                store,
                &AttachCertificateRecord {
                    san: all_san.clone(),
                    ..record.clone()
                },
            )?;
        }
    }
    let was = files.record.map(|r| r.names).unwrap_or_default();
    let (config, print) = match (&choice, config) {
        (CertificateChoice::Make | CertificateChoice::Remake { .. }, _) | (_, None) => {
            let certified = rcgen::generate_simple_self_signed(needed.clone())
                .map_err(|e| failed(format!("cannot make a certificate: {e}")))?;
            let print = fingerprint(certified.cert.der());
            let key_pem = certified.key_pair.serialize_pem();
            write_attach_tls_files(
                store,
                &key_pem,
                &certified.cert.pem(),
                &AttachCertificateRecord {
                    fingerprint: print.clone(),
                    names: needed,
                    san: all_san,
                },
            )?;
            let config = server_config(vec![certified.cert.der().clone()], Some(&key_pem))?;
            (config, print)
        }
        (_, Some((config, print))) => (config?, print),
    };
    Ok(TlsIdentity {
        config,
        fingerprint: print,
        choice,
        was,
    })
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
    let san = checked_san(&options.extra_names)?;
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
    let tls = {
        let _lock = store.lock()?;
        tls_identity(store, &san)?
    };
    match &tls.choice {
        CertificateChoice::Make => {
            writeln!(
                out,
                "made a self-signed certificate {CERT_FILE}; give it to devices with `--ca`"
            )
            .ok();
        }
        CertificateChoice::Remake { lacked } if lacked.is_empty() => {
            writeln!(
                out,
                "attach certificate remade: `{KEY_FILE}` did not fit it; give the new {CERT_FILE} to devices with `--ca`"
            )
            .ok();
        }
        CertificateChoice::Remake { lacked } => {
            writeln!(
                out,
                "attach certificate remade: it now names {} (was: {}); give the new {CERT_FILE} to devices with `--ca`",
                lacked.join(", "),
                tls.was.join(", ")
            )
            .ok();
        }
        CertificateChoice::WarnOperator { lacked } => {
            tracing::warn!(
                "`{CERT_FILE}` (not made by tlm, so kept) does not name {}: a device reaching this controller by such a name refuses it; add them to it, or remove `{CERT_FILE}` and `{KEY_FILE}` for tlm to make one that does",
                lacked.join(", ")
            );
        }
        CertificateChoice::Keep => {}
    }
    writeln!(out, "certificate SHA-256 fingerprint {}", tls.fingerprint).ok();
    let config = tls.config;
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

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_certificate_names_the_endpoints_the_host_and_every_san() {
        let names = certificate_names(
            Some("Ctl1"),
            &strings(&[
                "ctl.example.net:51820",
                "192.0.2.1:51820",
                "[2001:db8::1]:51820",
                "2001:db8::2",
                "bare.example",
            ]),
            &strings(&["Extra.Example", "198.51.100.7", "localhost"]),
        );
        assert_eq!(
            names,
            strings(&[
                "127.0.0.1",
                "192.0.2.1",
                "198.51.100.7",
                "2001:db8::1",
                "2001:db8::2",
                "::1",
                "bare.example",
                "ctl.example.net",
                "ctl1",
                "extra.example",
                "localhost",
            ])
        );
        // A host name no certificate can carry is left out, not made into a broken name.
        let names = certificate_names(Some("bad host!"), &[], &[]);
        assert_eq!(names, strings(&["127.0.0.1", "::1", "localhost"]));
        assert!(checked_san(&strings(&["ok.example", "2001:db8::9"])).is_ok());
        let error = checked_san(&strings(&["not a name"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("--san `not a name`"), "{error}");
    }

    #[test]
    fn missing_names_are_those_the_certificate_does_not_carry() {
        let certified = rcgen::generate_simple_self_signed(strings(&[
            "old.example",
            "*.wild.example",
            "192.0.2.1",
        ]))
        .unwrap();
        let parsed = rustls::server::ParsedCertificate::try_from(certified.cert.der()).unwrap();
        let carries = |name: &str| {
            rustls::pki_types::ServerName::try_from(name)
                .is_ok_and(|n| rustls::client::verify_server_name(&parsed, &n).is_ok())
        };
        let needed = strings(&[
            "old.example",
            "a.wild.example",
            "192.0.2.1",
            "new.example",
            "192.0.2.2",
        ]);
        assert_eq!(
            missing_names(&needed, carries),
            strings(&["new.example", "192.0.2.2"])
        );
    }

    #[test]
    fn only_tlms_own_certificate_is_remade() {
        use CertificateChoice::*;
        use ExistingCertificate::*;
        let lacks = strings(&["new.example"]);
        assert_eq!(choose_certificate(Nothing, &[]), Make);
        assert_eq!(choose_certificate(MadeByTlm { key_fits: true }, &[]), Keep);
        assert_eq!(
            choose_certificate(MadeByTlm { key_fits: true }, &lacks),
            Remake {
                lacked: lacks.clone()
            }
        );
        assert_eq!(
            choose_certificate(MadeByTlm { key_fits: false }, &[]),
            Remake { lacked: vec![] }
        );
        assert_eq!(choose_certificate(Operator, &[]), Keep);
        assert_eq!(
            choose_certificate(Operator, &lacks),
            WarnOperator { lacked: lacks }
        );
    }

    #[test]
    fn device_ids_are_hex() {
        assert!(valid_device_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_device_id("short"));
        assert!(!valid_device_id("0123456789abcdef0123456789abcdeg"));
    }
}
