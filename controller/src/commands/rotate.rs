//! `tlm rotate`: replace a node's secrets.
//!
//! - `recovery-token node X`: a new recovery token (docs/recovery.md, "Rotating the token").
//!   The store keeps only the new one; `tlm serve` sends it to the node at its next sync
//!   (inside the management link, signed for the node and its report) when the node reports
//!   holding another one. Recovery objects made from now on need the new token, so an old
//!   card or a stolen copy of the old token opens none of them.
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
