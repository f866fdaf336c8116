//! `tlm commit`: a new version for every node in scope whose files changed ([`crate::store::versions::commit`]).

use super::scope_filter;
use crate::cli::Scope;
use crate::store::{versions, Store};
use crate::Error;

/// Commits the nodes in `scope`; prints each new version and a summary line.
pub fn run(
    store: &Store,
    scope: Scope,
    message: Option<String>,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let store = store.clone();
    let generated = store.load_generated()?;
    let filter = scope_filter(&generated, &scope)?;
    let message = message.unwrap_or_else(|| match &scope {
        Scope::All => "tlm commit all".to_string(),
        Scope::Site { site } => format!("tlm commit site {site}"),
        Scope::Node { node } => format!("tlm commit node {node}"),
    });
    let outcome = versions::commit(&store, filter, &message)?;
    for (node, version) in &outcome.created {
        writeln!(out, "{node}: v{version}").ok();
    }
    writeln!(
        out,
        "committed: {} new version(s), {} node(s) unchanged{}",
        outcome.created.len(),
        outcome.unchanged.len(),
        if outcome.git_committed {
            ""
        } else {
            ", nothing new for git"
        }
    )
    .ok();
    Ok(())
}
