//! The controller's keys and what a node receives: the management settings of a directory,
//! the controller's management WireGuard key (made 0600 on first use), the signing key of
//! versions (its public half always derived from it), the attach endpoint's TLS files, a
//! node's identity and secrets. The disk half of [`crate::model::management`].

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use towalink_bundle::messages::NodeIdentity;
use towalink_system::durable::{self, Secret};

use crate::model::allocation::{NodeAllocation, NodeSecrets};
use crate::model::attributes::{defaults, Level, Merged};
use crate::model::management::{
    ManagementSettings, VersionManagement, MANAGEMENT_KEY, MANAGEMENT_PUB,
};
use crate::store::{Store, CERTS_DIR};
use crate::Error;

/// The management settings of a configuration directory (defaults → global).
pub fn settings(store: &Store) -> Result<ManagementSettings, Error> {
    let global = store.level_attributes(&Level::Global)?;
    let defaults = defaults();
    let merged = Merged::from_layers([(Level::Default, &defaults), (Level::Global, &global)]);
    Ok(ManagementSettings::from_attributes(&merged)?)
}

/// The alert settings of `tlm serve` (global attributes `alert_*`).
pub fn alert_settings(store: &Store) -> Result<crate::service::alerts::AlertSettings, Error> {
    let global = store.level_attributes(&Level::Global)?;
    let merged = Merged::from_layers([(Level::Global, &global)]);
    Ok(crate::service::alerts::AlertSettings::from_attributes(
        &merged,
    )?)
}

/// What versions tell their nodes about the management link; none without a
/// `controller_endpoint`. `may_create`: make the controller's management key when there is
/// none (a commit, under the lock); otherwise a directory without one yet gives none.
pub fn version_management(
    store: &Store,
    may_create: bool,
) -> Result<Option<VersionManagement>, Error> {
    let settings = settings(store)?;
    if settings.controller_endpoints.is_empty() {
        return Ok(None);
    }
    let exists = store.root().join(MANAGEMENT_KEY).exists();
    if !exists && !may_create {
        return Ok(None);
    }
    let (_, controller_wg_public_key) = controller_key(store)?;
    Ok(Some(VersionManagement {
        settings,
        controller_wg_public_key,
    }))
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
/// `generated/secrets.toml` lacks a node's keys.
pub fn no_secrets(node: &NodeAllocation) -> Error {
    Error::Corrupt {
        file: "generated/secrets.toml".into(),
        message: format!("has no keys for node {} (id {})", node.full_name(), node.id),
    }
}

pub fn node_identity(
    store: &Store,
    node: &NodeAllocation,
) -> Result<(NodeIdentity, NodeSecrets), Error> {
    let signing_key = controller_public_key(store)?.ok_or_else(|| Error::Corrupt {
        file: SIGNING_PUB.to_string(),
        message: "missing: commit once to create the controller key".into(),
    })?;
    let secrets = store.load_secrets()?;
    let node_secrets = secrets
        .nodes
        .into_iter()
        .find(|s| s.id == node.id)
        .ok_or_else(|| no_secrets(node))?;
    // A crash inside `tlm rotate node` can leave the new private key beside the old public
    // one: such an identity would make a node nobody can reach.
    if crate::model::allocation::public_key_of(&node_secrets.wg_private_key).as_deref()
        != Some(node.wg_public_key.as_str())
    {
        return Err(Error::Corrupt {
            file: "generated/secrets.toml".into(),
            message: format!(
                "the WireGuard private key of node {} does not match its public key in generated/config.toml: run `tlm rotate node {}` again",
                node.full_name(),
                node.full_name()
            ),
        });
    }
    let settings = settings(store)?;
    let management = if settings.controller_endpoints.is_empty() {
        None
    } else {
        let (_, controller_public) = controller_key(store)?;
        settings.node_link(node.id, &controller_public)
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

/// The controller's ed25519 key that signs every version (0600, not in git), made by the
/// first commit that creates a version.
pub const SIGNING_KEY: &str = "certs/signing.key";
/// Its public half, a copy for operators (the key a node trusts comes from [`SIGNING_KEY`]).
pub const SIGNING_PUB: &str = "certs/signing.pub";

/// The next signing key while `tlm rotate signing-key` lasts (0600, not in git); `--finish`
/// renames it over [`SIGNING_KEY`].
pub const SIGNING_NEXT_KEY: &str = "certs/signing.next.key";

/// The next signing key, if a rotation is under way.
pub fn load_next_signing_key(store: &Store) -> Result<Option<SigningKey>, Error> {
    load_secret_signing_key(store, SIGNING_NEXT_KEY)
}

/// An ed25519 secret key file of the directory, if it exists.
fn load_secret_signing_key(store: &Store, file: &str) -> Result<Option<SigningKey>, Error> {
    let Some(text) = durable::read_optional(&store.root().join(file))? else {
        return Ok(None);
    };
    let key = towalink_bundle::signing_key_from_base64(&text).map_err(|_| Error::Corrupt {
        file: file.to_string(),
        message: "not a base64 ed25519 secret key".into(),
    })?;
    Ok(Some(key))
}

/// Makes and stores the next signing key (0600); returns its public half.
pub fn make_next_signing_key(store: &Store) -> Result<String, Error> {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    durable::write_atomic(
        &store.root().join(SIGNING_NEXT_KEY),
        format!("{}\n", towalink_bundle::signing_key_to_base64(&key)).as_bytes(),
        0o600,
    )?;
    Ok(public_key_text(&key))
}

/// Makes the next signing key the signing key: renamed over it (atomic), `signing.pub`
/// rewritten.
pub fn promote_next_signing_key(store: &Store) -> Result<(), Error> {
    let next = load_next_signing_key(store)?.ok_or_else(|| Error::Corrupt {
        file: SIGNING_NEXT_KEY.to_string(),
        message: "missing".into(),
    })?;
    durable::rename(
        &store.root().join(SIGNING_NEXT_KEY),
        &store.root().join(SIGNING_KEY),
    )?;
    durable::write_atomic(
        &store.root().join(SIGNING_PUB),
        format!("{}\n", public_key_text(&next)).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Loads the controller's signing key, or makes a new one (not yet saved).
pub(crate) fn signing_key(store: &Store) -> Result<(SigningKey, bool), Error> {
    match load_signing_key(store)? {
        Some(key) => Ok((key, false)),
        None => Ok((SigningKey::generate(&mut rand_core::OsRng), true)),
    }
}

/// The controller's signing key, if a commit made one (never made here).
pub fn load_signing_key(store: &Store) -> Result<Option<SigningKey>, Error> {
    load_secret_signing_key(store, SIGNING_KEY)
}

pub fn public_key_text(key: &SigningKey) -> String {
    towalink_bundle::verifying_key_to_base64(&key.verifying_key())
}

pub(crate) fn save_signing_key(store: &Store, key: &SigningKey) -> Result<(), Error> {
    durable::create_dir_all(&store.root().join(CERTS_DIR))?;
    durable::write_atomic(
        &store.root().join(SIGNING_KEY),
        format!("{}\n", towalink_bundle::signing_key_to_base64(key)).as_bytes(),
        0o600,
    )?;
    durable::write_atomic(
        &store.root().join(SIGNING_PUB),
        format!("{}\n", public_key_text(key)).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// The controller's public signing key, if it has a signing key: always derived from the
/// private key, never trusted from `signing.pub`. A missing or different `signing.pub` (a copy
/// for operators) is rewritten, with a warning. Call with the lock held.
pub fn controller_public_key(store: &Store) -> Result<Option<String>, Error> {
    let Some(key) = load_signing_key(store)? else {
        return Ok(None);
    };
    let public = public_key_text(&key);
    let path = store.root().join(SIGNING_PUB);
    let on_disk = durable::read_optional(&path)?;
    if on_disk.as_deref().map(str::trim) != Some(public.as_str()) {
        tracing::warn!(
            "`{SIGNING_PUB}` is {}: rewriting it from `{SIGNING_KEY}`",
            if on_disk.is_some() {
                "not the public half of the signing key"
            } else {
                "missing"
            }
        );
        durable::write_atomic(&path, format!("{public}\n").as_bytes(), 0o644)?;
    }
    Ok(Some(public))
}

/// The attach endpoint's TLS certificate (`tlm attach`).
pub const ATTACH_CERT_FILE: &str = "certs/server.pem";
/// Its private key (0600).
pub const ATTACH_KEY_FILE: &str = "certs/key.pem";

/// What `tlm attach` records beside a certificate it made: its fingerprint (the marker that
/// tells tlm's certificate from one the operator put there), the names it carries and the
/// names ever given with `--san` (carried into every certificate made later).
pub const ATTACH_NAMES_FILE: &str = "certs/attach-names.toml";

/// The contents of [`ATTACH_NAMES_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachCertificateRecord {
    /// The SHA-256 fingerprint of the certificate tlm made (the first in
    /// [`ATTACH_CERT_FILE`]); a certificate with another one is the operator's.
    pub fingerprint: String,
    /// The names (host names and addresses) that certificate carries.
    pub names: Vec<String>,
    /// The names given with `--san`, by this and earlier `tlm attach` runs.
    pub san: Vec<String>,
}

/// The attach endpoint's files as they are on disk (each `None` when absent).
pub struct AttachTlsFiles {
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
    pub record: Option<AttachCertificateRecord>,
}

/// Reads the attach endpoint's certificate, key and [`ATTACH_NAMES_FILE`].
pub fn read_attach_tls_files(store: &Store) -> Result<AttachTlsFiles, Error> {
    let record = match durable::read_optional(&store.root().join(ATTACH_NAMES_FILE))? {
        None => None,
        Some(text) => Some(toml::from_str(&text).map_err(|e| Error::Corrupt {
            file: ATTACH_NAMES_FILE.into(),
            message: e.message().to_string(),
        })?),
    };
    Ok(AttachTlsFiles {
        cert_pem: durable::read_optional(&store.root().join(ATTACH_CERT_FILE))?,
        key_pem: durable::read_optional(&store.root().join(ATTACH_KEY_FILE))?,
        record,
    })
}

/// Writes a certificate tlm made for the attach endpoint: the key (0600), the certificate,
/// then its record, each durably. In this order a crash leaves either the old record beside
/// the old certificate (a key that does not fit it is remade) or the new certificate and key
/// without their record (the operator's, as far as tlm can tell: kept, warned about).
pub fn write_attach_tls_files(
    store: &Store,
    key_pem: &str,
    cert_pem: &str,
    record: &AttachCertificateRecord,
) -> Result<(), Error> {
    durable::create_dir_all(&store.root().join(CERTS_DIR))?;
    durable::write_atomic(
        &store.root().join(ATTACH_KEY_FILE),
        key_pem.as_bytes(),
        0o600,
    )?;
    durable::write_atomic(
        &store.root().join(ATTACH_CERT_FILE),
        cert_pem.as_bytes(),
        0o644,
    )?;
    write_attach_record(store, record)
}

/// Writes [`ATTACH_NAMES_FILE`] (durably).
pub fn write_attach_record(store: &Store, record: &AttachCertificateRecord) -> Result<(), Error> {
    let text = format!(
        "# Written by `tlm attach` with the certificate it made ({ATTACH_CERT_FILE}). Without\n\
         # this file (or with another fingerprint) tlm never replaces that certificate.\n{}",
        toml::to_string(record)
            .map_err(|e| Error::Service(format!("cannot write `{ATTACH_NAMES_FILE}`: {e}")))?
    );
    durable::create_dir_all(&store.root().join(CERTS_DIR))?;
    durable::write_atomic(
        &store.root().join(ATTACH_NAMES_FILE),
        text.as_bytes(),
        0o644,
    )?;
    Ok(())
}
