//! `towalink-node bootstrap`: a device without an identity asks a controller running
//! `tlm attach` for one, over HTTPS (rustls, the controller's certificate checked against
//! `--ca` or the system's CA bundle). The device sends a random device id, its host name and
//! machine, and its pairing code (random, or `--code`), which it shows on its console: the
//! operator types that code into `tlm attach`, and only the device whose requests carry it
//! gets its identity and secrets; every other device is turned away.

use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use towalink_bundle::messages::{AttachGrant, AttachRequest, ATTACH_PATH};
use towalink_bundle::pairing::PairingCode;
use towalink_bundle::wire;

use crate::state::{write_atomic, StateDir};

/// The system CA bundle (Debian, Alpine).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Who the device became.
pub struct Outcome {
    pub node: String,
    pub node_id: u32,
}

fn random_bytes(bytes: usize) -> anyhow::Result<Vec<u8>> {
    let mut buffer = vec![0u8; bytes];
    match rustix::rand::getrandom(&mut buffer[..], rustix::rand::GetRandomFlags::empty()) {
        Ok(n) if n == bytes => {}
        Ok(n) => bail!("cannot get random bytes: got {n} of {bytes}"),
        Err(error) => bail!("cannot get random bytes: {error}"),
    }
    Ok(buffer)
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    Ok(hex::encode(random_bytes(bytes)?))
}

/// A fresh pairing code (40 random bits).
fn random_pairing_code() -> anyhow::Result<PairingCode> {
    let bytes: [u8; 5] = random_bytes(5)?.try_into().expect("5 bytes");
    Ok(PairingCode::from_random(bytes))
}

fn tls_config(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let file = ca.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
    let mut roots = rustls::RootCertStore::empty();
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .with_context(|| format!("cannot read certificates from `{}`", file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("`{}` is not a PEM certificate file", file.display()))?;
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        bail!("`{}` holds no usable certificate", file.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `host` of `host:port` or `[v6]:port`.
fn host_of(endpoint: &str) -> anyhow::Result<String> {
    let host = match endpoint.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map(|(h, _)| h),
        None => endpoint.rsplit_once(':').map(|(h, _)| h),
    };
    host.filter(|h| !h.is_empty())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("--controller `{endpoint}` is not `host:port`"))
}

enum Answer {
    Waiting,
    Granted(Box<AttachGrant>),
}

fn ask(
    config: &Arc<rustls::ClientConfig>,
    endpoint: &str,
    server_name: &ServerName<'static>,
    request: &[u8],
) -> anyhow::Result<Answer> {
    let address = endpoint
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve `{endpoint}`"))?
        .next()
        .ok_or_else(|| anyhow!("`{endpoint}` resolves to no address"))?;
    let tcp = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {address}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let connection = rustls::ClientConnection::new(Arc::clone(config), server_name.clone())?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    wire::write_request(
        &mut tls,
        "POST",
        endpoint,
        ATTACH_PATH,
        "application/json",
        request,
    )
    .context("TLS handshake or request")?;
    let response =
        wire::read_response(&mut BufReader::new(&mut tls), 1024 * 1024).context("reply")?;
    match response.status {
        202 => Ok(Answer::Waiting),
        200 => serde_json::from_slice(&response.body)
            .map(|grant| Answer::Granted(Box::new(grant)))
            .context("the controller's grant is not valid"),
        403 => bail!(
            "the controller turned this device away: {}",
            String::from_utf8_lossy(&response.body).trim()
        ),
        status => bail!(
            "the controller answered {status}: {}",
            String::from_utf8_lossy(&response.body).trim()
        ),
    }
}

/// Writes the granted identity: secrets 0600 first, `node.toml` last (its presence means the
/// identity is complete).
fn store(state: &StateDir, grant: &AttachGrant) -> anyhow::Result<()> {
    let dir = state.path("identity");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    std::fs::create_dir_all(state.path("incoming"))?;
    write_atomic(
        &dir.join("wg_private_key"),
        format!("{}\n", grant.wg_private_key.trim()).as_bytes(),
        0o600,
    )?;
    write_atomic(
        &dir.join("recovery_token"),
        format!("{}\n", grant.recovery_token.trim()).as_bytes(),
        0o600,
    )?;
    let text = toml::to_string(&grant.identity).context("identity")?;
    write_atomic(&dir.join("node.toml"), text.as_bytes(), 0o644)?;
    Ok(())
}

/// Asks until granted, turned away, or `timeout`.
pub fn bootstrap(
    state: &StateDir,
    controller: &str,
    ca: Option<&Path>,
    interval: Duration,
    timeout: Option<Duration>,
    code: Option<&PairingCode>,
) -> anyhow::Result<Outcome> {
    let identity = state.path("identity/node.toml");
    if identity.exists() {
        let who = state
            .identity()
            .map(|i| format!("node {}.{} (id {})", i.node, i.site, i.node_id))
            .unwrap_or_else(|_| "a node".into());
        bail!(
            "`{}` exists: this device already is {who}; remove the state directory to attach it anew",
            identity.display()
        );
    }
    let config = tls_config(ca)?;
    let host = host_of(controller)?;
    let server_name = ServerName::try_from(host.clone()).map_err(|_| {
        anyhow!("--controller `{controller}`: `{host}` is not a host name or address")
    })?;
    let device_id = random_hex(16)?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let code = match code {
        Some(code) => code.clone(),
        None => random_pairing_code()?,
    };
    let request = serde_json::to_vec(&AttachRequest {
        device_id: device_id.clone(),
        hostname,
        machine: std::env::consts::ARCH.to_string(),
        pairing_code: code.as_compact(),
    })?;
    tracing::debug!(device = %device_id, %controller, "asking for a configuration");
    // The console is where the operator reads the code; it is not logged.
    eprintln!("device id {device_id}");
    eprintln!("pairing code {code}: give it to the operator running `tlm attach` (it is this device's secret; waiting for the operator)");
    let started = Instant::now();
    let mut last_error = String::new();
    loop {
        match ask(&config, controller, &server_name, &request) {
            Ok(Answer::Granted(grant)) => {
                store(state, &grant)?;
                tracing::info!(node = %grant.identity.node, site = %grant.identity.site, "identity received");
                return Ok(Outcome {
                    node: format!("{}.{}", grant.identity.node, grant.identity.site),
                    node_id: grant.identity.node_id,
                });
            }
            Ok(Answer::Waiting) => {}
            Err(error) if error.to_string().contains("turned this device away") => {
                return Err(error)
            }
            Err(error) => {
                let message = format!("{error:#}");
                if message != last_error {
                    tracing::warn!(error = %message, "attach request failed; retrying");
                    last_error = message;
                }
            }
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            bail!(
                "no identity from {controller} within {} s{}",
                timeout.unwrap().as_secs(),
                if last_error.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last_error})")
                }
            );
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_endpoints() {
        assert_eq!(host_of("ctl.example.net:8000").unwrap(), "ctl.example.net");
        assert_eq!(host_of("192.0.2.1:8000").unwrap(), "192.0.2.1");
        assert_eq!(host_of("[2001:db8::1]:8000").unwrap(), "2001:db8::1");
        assert!(host_of("nohost").is_err());
        assert!(host_of(":8000").is_err());
    }
}
