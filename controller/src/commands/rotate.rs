//! `tlm rotate recovery-token node X`: a new recovery token for a node (docs/recovery.md,
//! "Rotating the token"). The store keeps only the new one; `tlm serve` sends it to the node
//! at its next sync (inside the management link, signed for the node and its report) when the
//! node reports holding another one. Recovery objects made from now on need the new token, so
//! an old card or a stolen copy of the old token opens none of them.

use std::io::Write;

use crate::model::allocation::new_recovery_token;
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
