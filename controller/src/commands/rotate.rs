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
    let refused =
        |message: String| Err(Error::Rotation(format!("signing-key rotation: {message}")));
    let current = keys::load_signing_key(store)?.ok_or_else(|| {
        Error::Rotation(
            "signing-key rotation: there is no signing key yet: `tlm commit` makes the first one"
                .into(),
        )
    })?;
    let current_public = keys::public_key_text(&current);
    let next = keys::load_next_signing_key(store)?;
    let mut generated = store.load_generated()?;
    if !finish {
        let next_public = match &next {
            // Listed already: the rotation is under way. Not listed: an earlier start was
            // cut short between its two writes; it goes on with that key.
            Some(next)
                if generated
                    .signing_keys
                    .contains(&keys::public_key_text(next)) =>
            {
                return refused(format!(
                    "a rotation is under way (`{}` exists): finish it with `tlm rotate signing-key --finish`",
                    keys::SIGNING_NEXT_KEY
                ));
            }
            Some(next) => keys::public_key_text(next),
            None => keys::make_next_signing_key(store)?,
        };
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
        // An earlier --finish cut short after the key was promoted: versions must name the
        // signing key alone.
        if !generated.signing_keys.is_empty() && generated.signing_keys != [current_public.clone()]
        {
            generated.signing_keys = vec![current_public.clone()];
            store.save_generated(&generated)?;
            writeln!(
                out,
                "finished an interrupted --finish: signing key {current_public}; `tlm commit all` and `tlm activate all`"
            )
            .ok();
            return Ok(());
        }
        return refused("no rotation is under way: `tlm rotate signing-key` starts one".into());
    };
    let next_public = keys::public_key_text(&next);
    // Every node must trust the new key before anything is signed with it: its last report
    // lists it among the keys it trusts (taken when it blessed a version naming them).
    let mut behind = Vec::new();
    for node in &generated.nodes {
        let name = node.full_name();
        let record = records::read_node(store, &name);
        let trusted = record
            .as_ref()
            .is_some_and(|r| r.report.trusted_keys.contains(&next_public));
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
    // A node that reported without the keys it holds runs a towalink-node from before key
    // rotation: it would never take the new key, and its peers would stop reaching it.
    let record = records::read_node(store, &name);
    if record
        .as_ref()
        .is_some_and(|r| r.report.wg_public_keys.is_empty())
    {
        return Err(Error::Rotation(format!(
            "{name} runs a towalink-node from before key rotation (its reports do not list the keys it holds): upgrade it first"
        )));
    }
    // A node not yet settled on its current key (a rotation not carried out) still runs with
    // the previous one: that one stays the fallback.
    let heard_on_current = record.is_some_and(|r| {
        crate::service::fleet::settled_on(
            &r.report,
            r.via_key.as_deref(),
            &allocation.wg_public_key,
        )
    });
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
