//! `tlm recovery publish DIR` and `tlm recovery make node X -o FILE`: recovery objects, each
//! node's latest committed version sealed for the node ([`towalink_bundle::recovery`]), as
//! static files for any web server or object store, a USB stick or a card's boot partition
//! (docs/recovery.md).
//!
//! Every object carries a `seq` the node must see grow: the time in unix milliseconds, never
//! lower than the last seq written for the node, which is kept in [`SEQ_FILE`] (not in git:
//! soft state that only has to survive a clock set back) and saved before any object is
//! written, so no object is ever written twice with one seq.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use towalink_bundle::recovery;
use towalink_system::durable::{self, IoError};

use crate::cli::RecoveryWhat;
use crate::model::allocation::{NodeAllocation, Secrets};
use crate::model::names::NodeRef;
use crate::store::keys::{load_signing_key, SIGNING_KEY};
use crate::store::{parse_toml, versions, Store};
use crate::Error;

/// The last seq of a recovery object written for each node (`<node>.<site>` → seq).
pub const SEQ_FILE: &str = "effective/recovery.toml";

/// The last seq written per node.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqRecord {
    #[serde(default)]
    pub nodes: BTreeMap<String, u64>,
}

/// The seq of a new object: the time in unix milliseconds, but above the last one written
/// for the node, so the node sees it grow even when the clock went back. Pure.
pub fn next_seq(now_ms: u64, last: Option<u64>) -> u64 {
    match last {
        Some(last) => now_ms.max(last.saturating_add(1)),
        None => now_ms.max(1),
    }
}

/// One object to write: whose, which form, its bytes and the name the node looks for.
struct Object {
    node: String,
    version: u32,
    name: String,
    token_bound: bool,
    bytes: Vec<u8>,
}

/// A node's committed version and its recovery token (if the store has one).
struct Candidate {
    node: NodeAllocation,
    version: u32,
    bundle: Vec<u8>,
    token: Option<durable::Secret>,
}

pub fn run(config_dir: &Path, what: &RecoveryWhat) -> Result<ExitCode, Error> {
    let store = Store::open_existing(config_dir)?;
    let output = match what {
        RecoveryWhat::Publish { dir, .. } => dir,
        RecoveryWhat::Make { target } => match target {
            crate::cli::RecoveryTarget::Node { output, .. } => output,
        },
    };
    if store.contains(output) {
        return Err(Error::RecoveryInsideConfig(output.clone()));
    }
    let _lock = store.lock()?;
    versions::recover(&store)?;
    let mut out = std::io::stdout().lock();
    match what {
        RecoveryWhat::Publish { dir, without_token } => {
            publish(&store, dir, *without_token, &mut out)?
        }
        RecoveryWhat::Make { target } => {
            let crate::cli::RecoveryTarget::Node {
                node,
                output,
                without_token,
            } = target;
            make(&store, &node.parse()?, output, *without_token, &mut out)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes every node's object into `dir` (created if missing); nothing else in `dir` changes.
pub fn publish(
    store: &Store,
    dir: &Path,
    without_token: bool,
    out: &mut impl Write,
) -> Result<(), Error> {
    let key = signing_key(store)?;
    let generated = store.load_generated()?;
    let index = versions::load_index(store)?;
    let secrets = store.load_secrets()?;
    let mut candidates = Vec::new();
    for node in &generated.nodes {
        let full = node.full_name();
        let Some(entry) = index.nodes.get(&full.to_string()) else {
            eprintln!("tlm: note: {full} has no committed version: no recovery object for it");
            continue;
        };
        let candidate = candidate(store, &secrets, node, entry.latest)?;
        if candidate.token.is_none() {
            if !without_token {
                return Err(no_token(node));
            }
            eprintln!(
                "tlm: warning: {full} has no recovery token in `generated/secrets.toml`: only its token-less object is written"
            );
        }
        candidates.push(candidate);
    }
    let objects = seal_all(store, &key, candidates, without_token, true)?;
    durable::create_dir_all(dir)?;
    for object in &objects {
        durable::write_atomic(&dir.join(&object.name), &object.bytes, 0o644)?;
        writeln!(
            out,
            "{}  v{}  {}{}",
            object.node,
            object.version,
            object.name,
            if object.token_bound {
                ""
            } else {
                "  (without token)"
            }
        )
        .ok();
    }
    if objects.is_empty() {
        eprintln!("tlm: note: no node has a committed version: nothing written");
    }
    Ok(())
}

/// Writes one node's object to `output`: token-bound, or the token-less form.
pub fn make(
    store: &Store,
    node_ref: &NodeRef,
    output: &Path,
    without_token: bool,
    out: &mut impl Write,
) -> Result<(), Error> {
    let generated = store.load_generated()?;
    let node = generated.node(node_ref)?.clone();
    let full = node.full_name();
    let latest = versions::load_index(store)?
        .nodes
        .get(&full.to_string())
        .map(|e| e.latest)
        .ok_or_else(|| Error::NoVersion(full.clone()))?;
    let key = signing_key(store)?;
    let candidate = candidate(store, &store.load_secrets()?, &node, latest)?;
    if candidate.token.is_none() && !without_token {
        return Err(no_token(&node));
    }
    let objects = seal_all(store, &key, vec![candidate], without_token, false)?;
    let object = objects.first().expect("one candidate, one object");
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        durable::create_dir_all(parent)?;
    }
    durable::write_atomic(output, &object.bytes, 0o644)?;
    writeln!(
        out,
        "wrote the {} recovery object of {} (v{}) to {}",
        if object.token_bound {
            "token-bound"
        } else {
            "token-less"
        },
        object.node,
        object.version,
        output.display()
    )
    .ok();
    writeln!(
        out,
        "the node looks for it as `{name}`: `{}/{name}` on its boot partition, `<url>/{name}` at each recovery URL",
        recovery::BOOT_DIR,
        name = object.name
    )
    .ok();
    Ok(())
}

fn signing_key(store: &Store) -> Result<SigningKey, Error> {
    load_signing_key(store)?.ok_or_else(|| Error::Corrupt {
        file: SIGNING_KEY.to_string(),
        message: "missing: no signing key yet (commit once to create the controller key)".into(),
    })
}

fn no_token(node: &NodeAllocation) -> Error {
    Error::Corrupt {
        file: "generated/secrets.toml".into(),
        message: format!(
            "has no recovery token for node {} (id {}): `--without-token` makes the lost-token form",
            node.full_name(),
            node.id
        ),
    }
}

fn candidate(
    store: &Store,
    secrets: &Secrets,
    node: &NodeAllocation,
    version: u32,
) -> Result<Candidate, Error> {
    let path = versions::bundle_path(store, &node.full_name(), version);
    let bundle = std::fs::read(&path).map_err(|e| IoError::new("cannot read", &path, e))?;
    let token = secrets
        .nodes
        .iter()
        .find(|s| s.id == node.id)
        .map(|s| s.recovery_token.clone())
        .filter(|t| !t.expose().trim().is_empty());
    Ok(Candidate {
        node: node.clone(),
        version,
        bundle,
        token,
    })
}

/// Seals the objects: the seqs are reserved (saved) first, then each object made. `make`
/// writes one object per node (token-less only when asked); `publish` writes the token-bound
/// one of every node with a token, plus the token-less one when asked.
fn seal_all(
    store: &Store,
    key: &SigningKey,
    candidates: Vec<Candidate>,
    without_token: bool,
    both: bool,
) -> Result<Vec<Object>, Error> {
    let mut record = load_seqs(store)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut seqs = Vec::with_capacity(candidates.len());
    for c in &candidates {
        let name = c.node.full_name().to_string();
        let seq = next_seq(now_ms, record.nodes.get(&name).copied());
        record.nodes.insert(name, seq);
        seqs.push(seq);
    }
    if !candidates.is_empty() {
        save_seqs(store, &record)?;
    }
    let public = key.verifying_key();
    let mut objects = Vec::new();
    for (c, seq) in candidates.iter().zip(seqs) {
        let node = c.node.full_name().to_string();
        let token_bound = match &c.token {
            Some(token) if both || !without_token => Some(token),
            _ => None,
        };
        if let Some(token) = token_bound {
            let mut nonce = [0u8; recovery::NONCE_LEN];
            towalink_system::random::fill(&mut nonce).map_err(|e| {
                IoError::new(
                    "cannot read random bytes from",
                    Path::new("getrandom(2)"),
                    e,
                )
            })?;
            let bytes = recovery::seal(
                c.node.id,
                token.expose(),
                seq,
                c.version,
                &c.bundle,
                key,
                nonce,
            )?;
            objects.push(Object {
                node: node.clone(),
                version: c.version,
                name: recovery::object_name(token.expose()),
                token_bound: true,
                bytes,
            });
        }
        if without_token {
            let bytes = recovery::seal_without_token(c.node.id, seq, c.version, &c.bundle, key)?;
            objects.push(Object {
                node,
                version: c.version,
                name: recovery::lost_token_name(c.node.id, &public),
                token_bound: false,
                bytes,
            });
        }
    }
    Ok(objects)
}

fn load_seqs(store: &Store) -> Result<SeqRecord, Error> {
    match durable::read_optional(&store.root().join(SEQ_FILE))? {
        Some(text) => parse_toml(&text, SEQ_FILE),
        None => Ok(SeqRecord::default()),
    }
}

fn save_seqs(store: &Store, record: &SeqRecord) -> Result<(), Error> {
    store.ensure_gitignore()?;
    let text = format!(
        "# Written by tlm recovery: the last seq of a recovery object made for each node.\n\n{}",
        toml::to_string(record).expect("a map of integers serializes")
    );
    durable::write_atomic(&store.root().join(SEQ_FILE), text.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_follows_the_clock_and_never_goes_back() {
        assert_eq!(next_seq(1_000, None), 1_000);
        assert_eq!(next_seq(1_000, Some(5)), 1_000);
        // The clock went back: one above the last.
        assert_eq!(next_seq(1_000, Some(2_000)), 2_001);
        assert_eq!(next_seq(2_000, Some(2_000)), 2_001);
        assert_eq!(next_seq(0, None), 1);
        assert_eq!(next_seq(0, Some(u64::MAX)), u64::MAX);
    }
}
