//! `tlm rotate`: replace a node's secrets.
//!
//! - `recovery-token node X`: a new recovery token (docs/recovery.md, "Rotating the token").
//!   The store keeps only the new one; `tlm serve` sends it to the node at its next sync
//!   (inside the management link, signed for the node and its report) when the node reports
//!   holding another one. Recovery objects made from now on need the new token, so an old
//!   card or a stolen copy of the old token opens none of them.
//! - `signing-key [--finish]`: the controller's signing key, with an overlap (docs/recovery.md,
//!   "Rotating the signing key"): first every version names the current and a new key as the
//!   keys to trust (a node takes them when it blesses such a version); once every node has,
//!   `--finish` makes the new key the signing key and versions name it alone.
//! - `node X`: a new WireGuard key pair for the node's links and its management link
//!   (docs/recovery.md, "Rotating a node's keys"). The next commit names the new public key in
//!   the node's version and in its peers' versions; `tlm serve` sends the private key in the
//!   node's next sync reply, before the order that activates a version naming it; until the
//!   node is heard on the new key, the service lets it in with the replaced one too.

use std::io::Write;

use crate::model::allocation::{new_recovery_token, rotate_wireguard_key};
use crate::service::records;
use crate::store::Store;
use crate::Error;

pub fn recovery_token(store: &Store, node: &str, out: &mut impl Write) -> Result<(), Error> {
    let generated = store.load_generated()?;
    let node = generated.node(&node.parse()?)?.clone();
    let mut secrets = store.load_secrets()?;
    let entry = secrets
        .nodes
        .iter_mut()
        .find(|s| s.id == node.id)
        .ok_or_else(|| crate::store::keys::no_secrets(&node))?;
    entry.recovery_token = new_recovery_token(&mut rand_core::OsRng);
    store.save_secrets(&secrets)?;
    writeln!(
        out,
        "{}: recovery token replaced; the node takes it at its next sync through `tlm serve`; recovery objects made from now on need it (`tlm recovery publish` again)",
        node.full_name()
    )
    .ok();
    Ok(())
}

pub fn signing_key(store: &Store, finish: bool, out: &mut impl Write) -> Result<(), Error> {
    use crate::store::keys;
    let refused = |message: String| Err(Error::SigningRotation(message));
    let current = keys::load_signing_key(store)?.ok_or_else(|| {
        Error::SigningRotation(
            "there is no signing key yet: `tlm commit` makes the first one".into(),
        )
    })?;
    let current_public = keys::public_key_text(&current);
    let next = keys::load_next_signing_key(store)?;
    let mut generated = store.load_generated()?;
    if !finish {
        if next.is_some() {
            return refused(format!(
                "a rotation is under way (`{}` exists): finish it with `tlm rotate signing-key --finish`",
                keys::SIGNING_NEXT_KEY
            ));
        }
        let next_public = keys::make_next_signing_key(store)?;
        generated.signing_keys = vec![current_public, next_public.clone()];
        store.save_generated(&generated)?;
        writeln!(
            out,
            "new signing key {next_public} (in {}); `tlm commit all` and `tlm activate all` give every node a version trusting both keys; once every node blessed it, `tlm rotate signing-key --finish`",
            keys::SIGNING_NEXT_KEY
        )
        .ok();
        return Ok(());
    }
    let Some(next) = next else {
        return refused("no rotation is under way: `tlm rotate signing-key` starts one".into());
    };
    let next_public = keys::public_key_text(&next);
    // Every node must trust the new key before anything is signed with it: its status
    // record says it runs a blessed version that names it.
    let mut behind = Vec::new();
    for node in &generated.nodes {
        let name = node.full_name();
        let record = records::read_node(store, &name);
        let trusted = record.as_ref().is_some_and(|r| {
            r.report.state == Some(towalink_bundle::messages::SlotState::Good)
                && r.report.active_version.is_some_and(|v| {
                    version_trusts(store, &name, node.id, v, &current, &next_public)
                })
        });
        if !trusted {
            behind.push(match record.and_then(|r| r.report.active_version) {
                Some(v) => format!("{name} (v{v} active)"),
                None => format!("{name} (not reported)"),
            });
        }
    }
    if !behind.is_empty() {
        return refused(format!(
            "not every node blessed a version that trusts the new key: {}; commit and activate all first (a removed or retired node: `tlm del node`)",
            behind.join(", ")
        ));
    }
    keys::promote_next_signing_key(store)?;
    generated.signing_keys = vec![next_public.clone()];
    store.save_generated(&generated)?;
    writeln!(
        out,
        "signing key is now {next_public}; `tlm commit all` and `tlm activate all`: versions signed by it name it alone, and nodes stop trusting the old key when they bless them"
    )
    .ok();
    Ok(())
}

/// Whether a node's committed version `version` (checked against the current key) names
/// `key` among the keys to trust.
fn version_trusts(
    store: &Store,
    name: &crate::model::names::NodeFullName,
    node_id: u32,
    version: u32,
    signer: &towalink_bundle::SigningKey,
    key: &str,
) -> bool {
    let path = crate::store::versions::bundle_path(store, name, version);
    let Ok(bytes) = std::fs::read(&path) else {
        return false;
    };
    towalink_bundle::verify(&bytes, &signer.verifying_key(), node_id)
        .ok()
        .and_then(|bundle| towalink_bundle::contract::NodeConfig::of(&bundle).ok())
        .is_some_and(|config| config.signing_keys.iter().any(|k| k == key))
}

pub fn node(store: &Store, node: &str, out: &mut impl Write) -> Result<(), Error> {
    let mut generated = store.load_generated()?;
    let id = generated.node(&node.parse()?)?.id;
    let allocation = generated
        .nodes
        .iter_mut()
        .find(|n| n.id == id)
        .expect("found by reference above");
    let name = allocation.full_name();
    let mut secrets = store.load_secrets()?;
    let entry = secrets
        .nodes
        .iter_mut()
        .find(|s| s.id == id)
        .ok_or_else(|| crate::store::keys::no_secrets(allocation))?;
    // A node not yet heard on its current key (a rotation not carried out) still runs with
    // the previous one: that one stays the fallback.
    let heard_on_current = records::read_node(store, &name)
        .and_then(|r| r.via_key)
        .is_some_and(|key| key == allocation.wg_public_key);
    rotate_wireguard_key(allocation, entry, !heard_on_current, &mut rand_core::OsRng);
    let public = allocation.wg_public_key.clone();
    // The private key first: a crash between the two writes leaves the old public key in
    // use, and the node at most holding a key no version names (rotate again).
    store.save_secrets(&secrets)?;
    store.save_generated(&generated)?;
    writeln!(
        out,
        "{name}: new WireGuard key {public}; `tlm commit` names it in the node's and its peers' versions, `tlm activate` switches the links; the node receives the private key at its next sync through `tlm serve`, before the order"
    )
    .ok();
    Ok(())
}
