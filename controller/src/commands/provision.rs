//! `tlm provision node <node> <dir>`: a node state directory with the identity and the latest version.

use std::path::Path;

use crate::store::{installation, Store};
use crate::Error;

/// Writes the node's state directory `dir`.
pub fn run(
    store: &Store,
    node: &str,
    dir: &Path,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let store = store.clone();
    let (n, version) = installation::provision_node(&store, &node.parse()?, dir)?;
    writeln!(
        out,
        "provisioned {} (id {}) with v{version} in {}",
        n.full_name(),
        n.id,
        dir.display()
    )
    .ok();
    Ok(())
}
