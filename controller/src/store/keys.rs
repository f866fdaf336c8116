//! The controller's keys and what a node receives: the management settings of a directory,
//! the controller's management WireGuard key (made 0600 on first use), a node's identity and
//! secrets. The disk half of [`crate::model::management`].

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use towalink_bundle::messages::{Management, NodeIdentity};
use towalink_system::durable::{self, Secret};

use std::path::PathBuf;

use crate::model::allocation::{NodeAllocation, NodeSecrets};
use crate::model::attributes::{defaults, Level, Merged};
use crate::model::management::{ManagementSettings, MANAGEMENT_KEY, MANAGEMENT_PUB};
use crate::store::Store;
use crate::Error;

/// The management settings of a configuration directory (defaults → global).
pub fn settings(store: &Store) -> Result<ManagementSettings, Error> {
    let global = store.level_attributes(&Level::Global)?;
    let defaults = defaults();
    let merged = Merged::from_layers([(Level::Default, &defaults), (Level::Global, &global)]);
    Ok(ManagementSettings::from_attributes(&merged)?)
}

/// The controller's management key pair, made (0600) on first use. The caller holds the lock
/// when it may create it.
pub fn controller_key(store: &Store) -> Result<(Secret, String), Error> {
    let path = store.root().join(MANAGEMENT_KEY);
    if let Some(text) = durable::read_optional(&path)? {
        let bytes: [u8; 32] = BASE64
            .decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::Corrupt {
                file: MANAGEMENT_KEY.into(),
                message: "is not a base64 WireGuard private key".into(),
            })?;
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = BASE64.encode(x25519_dalek::PublicKey::from(&secret).as_bytes());
        return Ok((Secret::new(text.trim().to_string()), public));
    }
    let (secret, public) = crate::model::allocation::wireguard_key_pair(&mut rand_core::OsRng);
    durable::create_dir_all(&store.root().join("certs"))?;
    durable::write_atomic(&path, format!("{}\n", secret.expose()).as_bytes(), 0o600)?;
    durable::write_atomic(
        &store.root().join(MANAGEMENT_PUB),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    Ok((secret, public))
}

/// A node's identity (what goes to `identity/node.toml`) and its secrets. Without a
/// `controller_endpoint` the identity has no management link (the node runs alone).
pub fn node_identity(
    store: &Store,
    node: &NodeAllocation,
) -> Result<(NodeIdentity, NodeSecrets), Error> {
    let signing_key =
        crate::store::versions::controller_public_key(store)?.ok_or_else(|| Error::Corrupt {
            file: crate::store::versions::SIGNING_PUB.to_string(),
            message: "missing: commit once to create the controller key".into(),
        })?;
    let secrets = store.load_secrets()?;
    let node_secrets = secrets
        .nodes
        .into_iter()
        .find(|s| s.id == node.id)
        .ok_or_else(|| Error::Corrupt {
            file: "generated/secrets.toml".into(),
            message: format!("has no keys for node {} (id {})", node.full_name(), node.id),
        })?;
    let settings = settings(store)?;
    let management = if settings.controller_endpoints.is_empty() {
        None
    } else {
        let (_, controller_public) = controller_key(store)?;
        Some(Management {
            controller_endpoints: settings.controller_endpoints.clone(),
            controller_wg_public_key: controller_public,
            address: IpAddr::V6(settings.node_address(node.id)),
            controller_address: IpAddr::V6(settings.controller_address()),
            api_port: settings.api_port,
            listen_port: 0,
            keepalive_s: settings.keepalive_s,
        })
    };
    Ok((
        NodeIdentity {
            node_id: node.id,
            site: node.site.to_string(),
            node: node.name.to_string(),
            controller_key: signing_key,
            wg_public_key: node.wg_public_key.clone(),
            management,
        },
        node_secrets,
    ))
}

/// The attach endpoint's TLS certificate (`tlm attach`).
pub const ATTACH_CERT_FILE: &str = "certs/server.pem";
/// Its private key (0600).
pub const ATTACH_KEY_FILE: &str = "certs/key.pem";

/// The attach endpoint's certificate and key files; when neither exists, `make` gives the key
/// and certificate PEM and they are written (the key 0600). Returns the certificate's and the
/// key's path and whether they were made now.
pub fn attach_tls_files(
    store: &Store,
    make: impl FnOnce() -> Result<(String, String), Error>,
) -> Result<(PathBuf, PathBuf, bool), Error> {
    let cert_path = store.root().join(ATTACH_CERT_FILE);
    let key_path = store.root().join(ATTACH_KEY_FILE);
    if cert_path.exists() || key_path.exists() {
        return Ok((cert_path, key_path, false));
    }
    let (key_pem, cert_pem) = make()?;
    durable::create_dir_all(&store.root().join("certs"))?;
    durable::write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
    durable::write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path, true))
}
