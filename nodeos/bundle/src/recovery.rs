//! Recovery objects: a node's latest version in a file that any plain web server, object
//! store, USB stick or the card's boot partition can hold, for a node that lost its
//! management connection (docs/recovery.md).
//!
//! The controller writes them (`tlm recovery publish DIR`, `tlm recovery make node X -o FILE`);
//! a node fetches one by name and [`open`]s it. Pure: bytes in, bytes out; the caller passes
//! the random nonce and does all I/O.
//!
//! # Two forms
//!
//! - **Token-bound** ([`seal`]): the content is encrypted with ChaCha20-Poly1305 under a key
//!   derived from the node's recovery token (the secret in `identity/recovery_token`, also in
//!   the controller's `generated/secrets.toml`) and its node id; it is stored under
//!   [`object_name`]`(token)`, a hash of the token. Someone who has only the URL or the file
//!   learns nothing: not the node, not its version, not its configuration.
//! - **Token-less** ([`seal_without_token`], the lost-token form): signed but not encrypted, for
//!   a controller that lost the node's token (or a node that lost its own). Stored under
//!   [`lost_token_name`]`(node_id, controller_key)`. A node accepts it only when its policy
//!   allows ([`accepts_without_token`]: after N boots in a row without a management
//!   connection, N = [`DEFAULT_LOST_TOKEN_BOOTS`] unless configured, or never). The trade-off:
//!   whoever holds the controller's signing key but not the token can then recover the node,
//!   and whoever can fetch the file can read the version (bundles carry public keys only, but
//!   addresses, peers and the routing configuration are in it).
//!
//! Both forms are signed by the controller's ed25519 signing key, the key that signs bundles,
//! over a domain prefix of their own ([`SIGNATURE_DOMAIN`]), so a recovery signature can never
//! pass as a bundle manifest's or a sync reply's, nor the reverse. Holding a node's token
//! alone does not let anyone make an object for it.
//!
//! # Layout
//!
//! ```text
//! magic      7 bytes   "TLRECOV"
//! format     1 byte    FORMAT (1)
//! kind       1 byte    1 = token-bound, 2 = token-less
//! nonce     12 bytes   token-bound only (random, from the caller)
//! body       n bytes   token-bound: ChaCha20-Poly1305(body) with its 16-byte tag, the
//!                      header above as associated data; token-less: the body in clear
//! signature 64 bytes   ed25519 over SIGNATURE_DOMAIN || every byte before it
//!
//! body:  node_id u32 BE | seq u64 BE | version u32 BE | bundle bytes (the signed bundle
//!        of that version, `<site>-<node>-v<N>.tar.zst` as committed)
//! ```
//!
//! The key of a token-bound object is SHA-256([`KEY_DOMAIN`] || node_id u32 BE || token),
//! the token with surrounding whitespace removed (as the node reads its file).
//!
//! # What [`open`] checks, in order
//!
//! 1. size at most [`MAX_OBJECT_BYTES`] (a node reads no more than that plus one byte);
//! 2. magic, format, kind, length;
//! 3. the signature by one of the trusted keys, before anything is decrypted or parsed;
//! 4. token-bound: decrypted with the node's token (none → refused); token-less: refused
//!    unless the caller allows it now;
//! 5. the node id inside must be this node's;
//! 6. `seq` must be above the last one the node applied (a replayed or older object is
//!    refused).
//!
//! The bundle inside is still a bundle: [`Opened::verify_bundle`] verifies it as any other
//! (its own signature, node id, hashes) and checks that its version is the one the object
//! names. Only a verified bundle is installed.
//!
//! `seq` is the controller's time in unix milliseconds when it made the object, never lower
//! than the last seq it wrote for that node; a node keeps the highest seq it applied.

use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::{BundleError, VerifiedBundle};

/// The first bytes of every recovery object.
pub const MAGIC: &[u8; 7] = b"TLRECOV";
/// The recovery object format this crate writes and accepts.
pub const FORMAT: u8 = 1;
/// Largest recovery object a node reads (a node reads at most this plus one byte and refuses
/// anything longer).
pub const MAX_OBJECT_BYTES: usize = 64 * 1024 * 1024;
/// Length of the random nonce of a token-bound object.
pub const NONCE_LEN: usize = 12;
/// The file name suffix of recovery objects.
pub const NAME_SUFFIX: &str = ".tlr";
/// Where a node looks on its boot partition: `<boot>/towalink-recovery/<name>`.
pub const BOOT_DIR: &str = "towalink-recovery";
/// Consecutive boots without a management connection after which a node accepts a
/// token-less object, unless configured otherwise (or off).
pub const DEFAULT_LOST_TOKEN_BOOTS: u32 = 5;

/// What the controller's signature covers before the object's bytes.
pub const SIGNATURE_DOMAIN: &[u8] = b"towalink recovery object v1\n";
/// The label of the encryption key derived from a token.
pub const KEY_DOMAIN: &[u8] = b"towalink recovery key v1\n";
/// The label of a token-bound object's name.
pub const NAME_DOMAIN: &[u8] = b"towalink recovery name v1\n";
/// The label of a token-less object's name.
pub const LOST_TOKEN_NAME_DOMAIN: &[u8] = b"towalink recovery lost-token name v1\n";

const KIND_TOKEN_BOUND: u8 = 1;
const KIND_TOKEN_LESS: u8 = 2;
const SIGNATURE_LEN: usize = 64;
const TAG_LEN: usize = 16;
/// node_id + seq + version.
const BODY_FIXED_LEN: usize = 4 + 8 + 4;
/// Hex characters of a name (128 bits of the hash).
const NAME_HEX_LEN: usize = 32;

/// Why a recovery object could not be made or was refused. One line each.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("recovery object is {size} bytes; at most {MAX_OBJECT_BYTES}")]
    TooLarge { size: usize },
    #[error("not a Towalink recovery object (it does not start with `TLRECOV`)")]
    NotRecoveryObject,
    #[error("recovery object format {0} is not supported (this node understands format {FORMAT})")]
    Format(u8),
    #[error("recovery object kind {0} is unknown (1 token-bound, 2 token-less)")]
    Kind(u8),
    #[error("recovery object is truncated: {size} bytes, a complete one has at least {min}")]
    Truncated { size: usize, min: usize },
    #[error("tampered, or signed by a key this node does not trust: the signature verifies against none of its {trusted} trusted controller key(s)")]
    BadSignature { trusted: usize },
    #[error("needs the recovery token of the node it was made for, and this node has none")]
    NeedsToken,
    #[error("the recovery token is empty")]
    EmptyToken,
    #[error("cannot be opened with this node's recovery token: made for another node, or with another token")]
    WrongToken,
    #[error("made without the recovery token (the lost-token form), which this node does not accept now")]
    WithoutTokenRefused,
    #[error("malformed (though signed): {0}")]
    Malformed(&'static str),
    #[error("recovery object for node {found}, this is node {expected}")]
    WrongNode { expected: u32, found: u32 },
    #[error("older than the last applied (seq {seq} <= {last}): replayed or stale")]
    Replay { seq: u64, last: u64 },
    #[error("the bundle inside: {0}")]
    Bundle(#[from] BundleError),
    #[error("the bundle inside is version {found}, the object says version {declared}")]
    VersionMismatch { declared: u32, found: u32 },
}

/// A recovery object that passed every check of [`open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub node_id: u32,
    /// The controller's sequence number (unix milliseconds when it was made, or higher): the
    /// node stores it once it applied the version, and passes it as `last_seq` next time.
    pub seq: u64,
    /// The version the bundle holds, as the controller said.
    pub version: u32,
    /// The signed bundle of that version, still to be verified ([`Opened::verify_bundle`]).
    pub bundle: Vec<u8>,
    /// Whether it was bound to the node's token (false: the lost-token form).
    pub token_bound: bool,
    /// The trusted key whose signature it carried.
    pub signed_by: VerifyingKey,
}

impl Opened {
    /// Verifies the bundle inside as any bundle ([`crate::verify`]: signature by the key that
    /// signed the object, node id, paths, hashes) and checks that it is the version the
    /// object names.
    pub fn verify_bundle(&self) -> Result<VerifiedBundle, RecoveryError> {
        let verified = crate::verify(&self.bundle, &self.signed_by, self.node_id)?;
        let found = verified.manifest().version;
        if found != self.version {
            return Err(RecoveryError::VersionMismatch {
                declared: self.version,
                found,
            });
        }
        Ok(verified)
    }
}

/// The file name of a node's token-bound object: 32 hex characters of a domain-separated
/// SHA-256 of the token, and `.tlr`. A node looks for it at `<url>/<name>` for each
/// recovery URL and at `towalink-recovery/<name>` on its boot partition.
pub fn object_name(token: &str) -> String {
    let digest = Sha256::new()
        .chain_update(NAME_DOMAIN)
        .chain_update(token.trim().as_bytes())
        .finalize();
    name_from(&digest)
}

/// The file name of a node's token-less object (the lost-token form): a hash of the
/// controller's public key and the node id, so it can be made and found without the token.
pub fn lost_token_name(node_id: u32, controller_key: &VerifyingKey) -> String {
    let digest = Sha256::new()
        .chain_update(LOST_TOKEN_NAME_DOMAIN)
        .chain_update(controller_key.as_bytes())
        .chain_update(node_id.to_be_bytes())
        .finalize();
    name_from(&digest)
}

fn name_from(digest: &[u8]) -> String {
    let mut name = hex::encode(digest);
    name.truncate(NAME_HEX_LEN);
    name.push_str(NAME_SUFFIX);
    name
}

/// The lost-token rule: whether a node that has gone `boots_without_management` boots in a
/// row without a management connection accepts a token-less object now. `threshold` is the
/// node's setting: `Some(n)` (default [`DEFAULT_LOST_TOKEN_BOOTS`]) or `None` (off, never).
pub fn accepts_without_token(boots_without_management: u32, threshold: Option<u32>) -> bool {
    threshold.is_some_and(|n| boots_without_management >= n)
}

/// Makes the token-bound object of a version for a node (the controller's side). `nonce` must
/// be fresh random bytes for every object (the caller's RNG keeps this function pure).
pub fn seal(
    node_id: u32,
    token: &str,
    seq: u64,
    version: u32,
    bundle: &[u8],
    signing_key: &SigningKey,
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, RecoveryError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(RecoveryError::EmptyToken);
    }
    let size =
        header_len(KIND_TOKEN_BOUND) + BODY_FIXED_LEN + bundle.len() + TAG_LEN + SIGNATURE_LEN;
    if size > MAX_OBJECT_BYTES {
        return Err(RecoveryError::TooLarge { size });
    }
    let mut object = header(KIND_TOKEN_BOUND);
    object.extend_from_slice(&nonce);
    let body = body(node_id, seq, version, bundle);
    let ciphertext = cipher(node_id, token)
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &body,
                aad: &object,
            },
        )
        // Fails only for messages beyond 256 GiB, far above the size checked.
        .map_err(|_| RecoveryError::TooLarge { size })?;
    object.extend_from_slice(&ciphertext);
    sign(&mut object, signing_key);
    Ok(object)
}

/// Makes the token-less object (the lost-token form) of a version for a node: signed, not
/// encrypted. See the module documentation for the trade-off.
pub fn seal_without_token(
    node_id: u32,
    seq: u64,
    version: u32,
    bundle: &[u8],
    signing_key: &SigningKey,
) -> Result<Vec<u8>, RecoveryError> {
    let size = header_len(KIND_TOKEN_LESS) + BODY_FIXED_LEN + bundle.len() + SIGNATURE_LEN;
    if size > MAX_OBJECT_BYTES {
        return Err(RecoveryError::TooLarge { size });
    }
    let mut object = header(KIND_TOKEN_LESS);
    object.extend_from_slice(&body(node_id, seq, version, bundle));
    sign(&mut object, signing_key);
    Ok(object)
}

/// Checks a recovery object for this node (the node's side) and returns what it carries; see
/// the module documentation for the order of the checks.
///
/// - `token`: the node's recovery token, `None` when it has none;
/// - `trusted_keys`: the controller keys the node trusts (its identity's `controller_key`);
/// - `accept_without_token`: whether the lost-token form is accepted now
///   ([`accepts_without_token`]);
/// - `last_seq`: the seq of the last recovery object the node applied, if any.
pub fn open(
    bytes: &[u8],
    node_id: u32,
    token: Option<&str>,
    trusted_keys: &[VerifyingKey],
    accept_without_token: bool,
    last_seq: Option<u64>,
) -> Result<Opened, RecoveryError> {
    if bytes.len() > MAX_OBJECT_BYTES {
        return Err(RecoveryError::TooLarge { size: bytes.len() });
    }
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(RecoveryError::NotRecoveryObject);
    }
    let short = |min: usize| RecoveryError::Truncated {
        size: bytes.len(),
        min,
    };
    let format = *bytes.get(MAGIC.len()).ok_or(short(MAGIC.len() + 2))?;
    if format != FORMAT {
        return Err(RecoveryError::Format(format));
    }
    let kind = *bytes.get(MAGIC.len() + 1).ok_or(short(MAGIC.len() + 2))?;
    let min = match kind {
        KIND_TOKEN_BOUND => header_len(kind) + BODY_FIXED_LEN + TAG_LEN + SIGNATURE_LEN,
        KIND_TOKEN_LESS => header_len(kind) + BODY_FIXED_LEN + SIGNATURE_LEN,
        other => return Err(RecoveryError::Kind(other)),
    };
    if bytes.len() < min {
        return Err(short(min));
    }

    // The signature, before anything else is looked at.
    let (signed, signature) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
    let signature = Signature::from_bytes(
        signature
            .try_into()
            .expect("split at SIGNATURE_LEN from the end"),
    );
    let message = signed_message(signed);
    let signed_by = *trusted_keys
        .iter()
        .find(|key| key.verify(&message, &signature).is_ok())
        .ok_or(RecoveryError::BadSignature {
            trusted: trusted_keys.len(),
        })?;

    let header_end = header_len(kind);
    let body = if kind == KIND_TOKEN_BOUND {
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(RecoveryError::NeedsToken)?;
        let (header, ciphertext) = signed.split_at(header_end);
        let nonce = &header[header_end - NONCE_LEN..];
        cipher(node_id, token)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: header,
                },
            )
            .map_err(|_| RecoveryError::WrongToken)?
    } else {
        if !accept_without_token {
            return Err(RecoveryError::WithoutTokenRefused);
        }
        signed[header_end..].to_vec()
    };

    if body.len() < BODY_FIXED_LEN {
        return Err(RecoveryError::Malformed(
            "body shorter than its fixed fields",
        ));
    }
    let found = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
    let seq = u64::from_be_bytes(body[4..12].try_into().expect("8 bytes"));
    let version = u32::from_be_bytes(body[12..16].try_into().expect("4 bytes"));
    if found != node_id {
        return Err(RecoveryError::WrongNode {
            expected: node_id,
            found,
        });
    }
    if let Some(last) = last_seq {
        if seq <= last {
            return Err(RecoveryError::Replay { seq, last });
        }
    }
    Ok(Opened {
        node_id,
        seq,
        version,
        bundle: body[BODY_FIXED_LEN..].to_vec(),
        token_bound: kind == KIND_TOKEN_BOUND,
        signed_by,
    })
}

fn header_len(kind: u8) -> usize {
    MAGIC.len()
        + 2
        + if kind == KIND_TOKEN_BOUND {
            NONCE_LEN
        } else {
            0
        }
}

/// Magic, format, kind (the nonce follows for token-bound objects).
fn header(kind: u8) -> Vec<u8> {
    let mut header = Vec::with_capacity(header_len(kind));
    header.extend_from_slice(MAGIC);
    header.push(FORMAT);
    header.push(kind);
    header
}

fn body(node_id: u32, seq: u64, version: u32, bundle: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_FIXED_LEN + bundle.len());
    body.extend_from_slice(&node_id.to_be_bytes());
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(bundle);
    body
}

/// The AEAD of a node's token: key = SHA-256(KEY_DOMAIN || node_id || token).
fn cipher(node_id: u32, token: &str) -> ChaCha20Poly1305 {
    let key = Sha256::new()
        .chain_update(KEY_DOMAIN)
        .chain_update(node_id.to_be_bytes())
        .chain_update(token.as_bytes())
        .finalize();
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

fn signed_message(signed: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + signed.len());
    message.extend_from_slice(SIGNATURE_DOMAIN);
    message.extend_from_slice(signed);
    message
}

/// Appends the controller's signature over the domain and the object so far.
fn sign(object: &mut Vec<u8>, key: &SigningKey) {
    let signature = key.sign(&signed_message(object));
    object.extend_from_slice(&signature.to_bytes());
}

/// Where a node looks for its recovery objects: a `recovery_urls` entry. Parsed the same way
/// by the controller's schema (refused at `tlm set`) and by the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `http://host[:port][/path]`: the object is fetched from `<path>/<name>`.
    Http {
        /// `host:port` (port 80 unless given), as a socket address string to resolve.
        authority: String,
        /// The path prefix, starting with `/`, without a trailing `/`.
        path: String,
    },
    /// An absolute directory on the node (a mounted USB stick): `<dir>/<name>`.
    Directory(String),
}

impl Location {
    /// Parses `http://host[:port][/path]` or an absolute directory. `https` is not supported
    /// yet: objects are signed and sealed, so plain HTTP reveals and risks nothing.
    pub fn parse(text: &str) -> Result<Location, String> {
        let bad = |why: &str| format!("`{text}`: {why}");
        if text.chars().any(char::is_control) || text.contains(char::is_whitespace) {
            return Err(bad("has spaces or control characters"));
        }
        if let Some(rest) = text.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(at) => (&rest[..at], &rest[at..]),
                None => (rest, ""),
            };
            if authority.is_empty() || authority.contains('@') {
                return Err(bad("needs a host (and no user)"));
            }
            let has_port = match authority.rfind(']') {
                Some(close) => authority[close..].contains(':'),
                None => authority.matches(':').count() == 1,
            };
            if !authority.starts_with('[') && authority.matches(':').count() > 1 {
                return Err(bad(
                    "an IPv6 address goes in brackets: http://[2001:db8::1]:8080/",
                ));
            }
            let authority = if has_port {
                authority.to_string()
            } else {
                format!("{authority}:80")
            };
            if path.contains(['?', '#']) || path.split('/').any(|c| c == "..") {
                return Err(bad("the path may not hold `?`, `#` or `..`"));
            }
            return Ok(Location::Http {
                authority,
                path: path.trim_end_matches('/').to_string(),
            });
        }
        if text.contains("://") {
            return Err(bad(
                "only http:// URLs and absolute directories are supported",
            ));
        }
        if !text.starts_with('/') || text.split('/').any(|c| c == "..") {
            return Err(bad("neither an http:// URL nor an absolute directory"));
        }
        Ok(Location::Directory(text.trim_end_matches('/').to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{FileEntry, Manifest};

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER_TOKEN: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted() -> Vec<VerifyingKey> {
        vec![key(1).verifying_key()]
    }

    fn sealed(node_id: u32, seq: u64) -> Vec<u8> {
        seal(
            node_id,
            TOKEN,
            seq,
            4,
            b"bundle bytes",
            &key(1),
            [9; NONCE_LEN],
        )
        .unwrap()
    }

    fn open_as(bytes: &[u8], node_id: u32, token: Option<&str>) -> Result<Opened, RecoveryError> {
        open(bytes, node_id, token, &trusted(), false, Some(100))
    }

    #[test]
    fn a_token_bound_object_opens_for_its_node_with_its_token() {
        let opened = open_as(&sealed(7, 1_000), 7, Some(TOKEN)).unwrap();
        assert_eq!(
            opened,
            Opened {
                node_id: 7,
                seq: 1_000,
                version: 4,
                bundle: b"bundle bytes".to_vec(),
                token_bound: true,
                signed_by: key(1).verifying_key(),
            }
        );
        // The token as the node reads its file (with a newline) works the same.
        assert!(open_as(&sealed(7, 1_000), 7, Some(&format!("{TOKEN}\n"))).is_ok());
        // No last seq: the first recovery of a node.
        assert!(open(&sealed(7, 1), 7, Some(TOKEN), &trusted(), false, None).is_ok());
    }

    #[test]
    fn the_object_reveals_neither_token_nor_content() {
        let object = seal(7, TOKEN, 1_000, 4, b"SECRET-CONFIG", &key(1), [9; 12]).unwrap();
        let contains = |needle: &[u8]| object.windows(needle.len()).any(|w| w == needle);
        assert!(!contains(TOKEN.as_bytes()));
        assert!(!contains(b"SECRET-CONFIG"));
        let name = object_name(TOKEN);
        assert_eq!(name.len(), 32 + NAME_SUFFIX.len());
        assert!(name.ends_with(".tlr"));
        assert_ne!(name, object_name(OTHER_TOKEN));
        assert_eq!(name, object_name(&format!("  {TOKEN}\n")));
        assert_ne!(
            lost_token_name(7, &key(1).verifying_key()),
            lost_token_name(8, &key(1).verifying_key())
        );
        assert_ne!(
            lost_token_name(7, &key(1).verifying_key()),
            lost_token_name(7, &key(2).verifying_key())
        );
    }

    #[test]
    fn another_nodes_object_or_another_token_is_refused() {
        // Node 3 with its own token cannot open node 7's object.
        assert!(matches!(
            open_as(&sealed(7, 1_000), 3, Some(OTHER_TOKEN)),
            Err(RecoveryError::WrongToken)
        ));
        // Even with node 7's token, the key is bound to the node id.
        assert!(matches!(
            open_as(&sealed(7, 1_000), 3, Some(TOKEN)),
            Err(RecoveryError::WrongToken)
        ));
        assert!(matches!(
            open_as(&sealed(7, 1_000), 7, Some(OTHER_TOKEN)),
            Err(RecoveryError::WrongToken)
        ));
        assert!(matches!(
            open_as(&sealed(7, 1_000), 7, None),
            Err(RecoveryError::NeedsToken)
        ));
        assert!(matches!(
            open_as(&sealed(7, 1_000), 7, Some(" \n")),
            Err(RecoveryError::NeedsToken)
        ));
        // The token-less form names its node in the signed body.
        let lost = seal_without_token(7, 1_000, 4, b"b", &key(1)).unwrap();
        let err = open(&lost, 3, Some(TOKEN), &trusted(), true, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "recovery object for node 7, this is node 3"
        );
    }

    #[test]
    fn a_replayed_or_older_object_is_refused() {
        let err = open_as(&sealed(7, 100), 7, Some(TOKEN)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "older than the last applied (seq 100 <= 100): replayed or stale"
        );
        assert!(matches!(
            open_as(&sealed(7, 50), 7, Some(TOKEN)),
            Err(RecoveryError::Replay { seq: 50, last: 100 })
        ));
        assert!(open_as(&sealed(7, 101), 7, Some(TOKEN)).is_ok());
    }

    #[test]
    fn a_token_less_object_is_accepted_only_when_allowed() {
        let lost = seal_without_token(7, 1_000, 4, b"bundle bytes", &key(1)).unwrap();
        assert!(matches!(
            open(&lost, 7, Some(TOKEN), &trusted(), false, None),
            Err(RecoveryError::WithoutTokenRefused)
        ));
        let opened = open(&lost, 7, None, &trusted(), true, Some(999)).unwrap();
        assert!(!opened.token_bound);
        assert_eq!((opened.seq, opened.version), (1_000, 4));
        assert_eq!(opened.bundle, b"bundle bytes");
        // Replay holds for this form too.
        assert!(matches!(
            open(&lost, 7, None, &trusted(), true, Some(1_000)),
            Err(RecoveryError::Replay { .. })
        ));
        // Turning a token-bound object into a token-less one breaks the signature.
        let mut object = sealed(7, 1_000);
        object[MAGIC.len() + 1] = KIND_TOKEN_LESS;
        assert!(matches!(
            open(&object, 7, None, &trusted(), true, None),
            Err(RecoveryError::BadSignature { .. })
        ));
    }

    #[test]
    fn the_lost_token_rule_counts_boots_and_can_be_off() {
        assert!(!accepts_without_token(4, Some(DEFAULT_LOST_TOKEN_BOOTS)));
        assert!(accepts_without_token(5, Some(DEFAULT_LOST_TOKEN_BOOTS)));
        assert!(accepts_without_token(9, Some(DEFAULT_LOST_TOKEN_BOOTS)));
        assert!(!accepts_without_token(u32::MAX, None));
    }

    #[test]
    fn another_key_is_refused_and_any_trusted_key_is_accepted() {
        let foreign = seal(7, TOKEN, 1_000, 4, b"b", &key(2), [9; 12]).unwrap();
        let err = open_as(&foreign, 7, Some(TOKEN)).unwrap_err();
        assert!(err
            .to_string()
            .contains("signed by a key this node does not trust"));
        let both = [key(1).verifying_key(), key(2).verifying_key()];
        let opened = open(&foreign, 7, Some(TOKEN), &both, false, None).unwrap();
        assert_eq!(opened.signed_by, key(2).verifying_key());
        assert!(matches!(
            open(&foreign, 7, Some(TOKEN), &[], false, None),
            Err(RecoveryError::BadSignature { trusted: 0 })
        ));
        // A recovery signature is not a bundle manifest's: the same key signing the same
        // bytes without the domain does not verify.
        let mut object = sealed(7, 1_000);
        let at = object.len() - SIGNATURE_LEN;
        let plain = key(1).sign(&object[..at]);
        object[at..].copy_from_slice(&plain.to_bytes());
        assert!(matches!(
            open_as(&object, 7, Some(TOKEN)),
            Err(RecoveryError::BadSignature { .. })
        ));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        for object in [
            sealed(7, 1_000),
            seal_without_token(7, 1_000, 4, b"bundle bytes", &key(1)).unwrap(),
        ] {
            for index in 0..object.len() {
                for bit in [0x01u8, 0x80] {
                    let mut bad = object.clone();
                    bad[index] ^= bit;
                    assert!(
                        open(&bad, 7, Some(TOKEN), &trusted(), true, None).is_err(),
                        "flipping bit {bit:#x} of byte {index} was not noticed"
                    );
                }
            }
        }
    }

    #[test]
    fn truncated_or_foreign_input_is_refused() {
        let object = sealed(7, 1_000);
        for len in 0..object.len() {
            assert!(
                open_as(&object[..len], 7, Some(TOKEN)).is_err(),
                "{len} bytes opened"
            );
        }
        assert!(matches!(
            open_as(b"hello", 7, Some(TOKEN)),
            Err(RecoveryError::NotRecoveryObject)
        ));
        assert!(matches!(
            open_as(b"TLRECOV\x02\x01", 7, Some(TOKEN)),
            Err(RecoveryError::Format(2))
        ));
        assert!(matches!(
            open_as(b"TLRECOV\x01\x07", 7, Some(TOKEN)),
            Err(RecoveryError::Kind(7))
        ));
        assert!(matches!(
            open_as(b"TLRECOV\x01\x01abc", 7, Some(TOKEN)),
            Err(RecoveryError::Truncated { .. })
        ));
        let huge = vec![0u8; MAX_OBJECT_BYTES + 1];
        assert!(matches!(
            open_as(&huge, 7, Some(TOKEN)),
            Err(RecoveryError::TooLarge { .. })
        ));
    }

    #[test]
    fn making_refuses_an_empty_token_and_an_oversized_bundle() {
        assert!(matches!(
            seal(7, " \n", 1, 1, b"b", &key(1), [0; 12]),
            Err(RecoveryError::EmptyToken)
        ));
        let big = vec![0u8; MAX_OBJECT_BYTES];
        assert!(matches!(
            seal(7, TOKEN, 1, 1, &big, &key(1), [0; 12]),
            Err(RecoveryError::TooLarge { .. })
        ));
        assert!(matches!(
            seal_without_token(7, 1, 1, &big, &key(1)),
            Err(RecoveryError::TooLarge { .. })
        ));
    }

    fn bundle(version: u32) -> Vec<u8> {
        let mut files = BTreeMap::new();
        files.insert("bird.conf".to_string(), b"router id 1.2.3.4;\n".to_vec());
        let manifest = Manifest {
            format: crate::FORMAT,
            node_id: 7,
            site: "s".into(),
            node: "n".into(),
            version,
            parent: None,
            created: "2024-01-01T00:00:00Z".into(),
            services: BTreeMap::new(),
            files: vec![FileEntry {
                path: "bird.conf".into(),
                target: Some("/etc/bird.conf".into()),
                mode: "0644".into(),
                sha256: crate::sha256_hex(b"router id 1.2.3.4;\n"),
                service: None,
                size: Some(19),
            }],
        };
        crate::build(&manifest, &files, &key(1)).unwrap()
    }

    #[test]
    fn the_bundle_inside_is_verified_and_must_be_the_named_version() {
        let object = seal(7, TOKEN, 1_000, 3, &bundle(3), &key(1), [1; 12]).unwrap();
        let opened = open_as(&object, 7, Some(TOKEN)).unwrap();
        assert_eq!(opened.verify_bundle().unwrap().manifest().version, 3);
        let object = seal(7, TOKEN, 1_000, 4, &bundle(3), &key(1), [1; 12]).unwrap();
        let opened = open_as(&object, 7, Some(TOKEN)).unwrap();
        assert!(matches!(
            opened.verify_bundle(),
            Err(RecoveryError::VersionMismatch {
                declared: 4,
                found: 3
            })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            prefix in proptest::bool::ANY,
            kind in 0u8..4,
        ) {
            let mut input = bytes;
            if prefix {
                let mut head = header(kind);
                head.extend_from_slice(&input);
                input = head;
            }
            proptest::prop_assert!(
                open(&input, 7, Some(TOKEN), &trusted(), true, None).is_err()
            );
        }

        #[test]
        fn any_single_byte_change_is_refused(index in 0usize..4096, value in 1u8..=255) {
            let object = sealed(7, 1_000);
            let index = index % object.len();
            let mut bad = object.clone();
            bad[index] ^= value;
            proptest::prop_assert!(open(&bad, 7, Some(TOKEN), &trusted(), true, None).is_err());
        }
    }

    #[test]
    fn locations_parse_http_and_directories_and_refuse_the_rest() {
        assert_eq!(
            Location::parse("http://203.0.113.9:8080/towalink/").unwrap(),
            Location::Http {
                authority: "203.0.113.9:8080".into(),
                path: "/towalink".into()
            }
        );
        assert_eq!(
            Location::parse("http://r.example").unwrap(),
            Location::Http {
                authority: "r.example:80".into(),
                path: "".into()
            }
        );
        assert_eq!(
            Location::parse("http://[2001:db8::1]/x").unwrap(),
            Location::Http {
                authority: "[2001:db8::1]:80".into(),
                path: "/x".into()
            }
        );
        assert_eq!(
            Location::parse("/media/usb/").unwrap(),
            Location::Directory("/media/usb".into())
        );
        for bad in [
            "https://r.example/",
            "ftp://x/",
            "http://",
            "http://u@h/",
            "http://2001:db8::1/",
            "http://h/a/../b",
            "relative/dir",
            "/a/../b",
            "http://h/ x",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
    }
}
