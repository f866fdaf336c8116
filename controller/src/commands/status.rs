//! `tlm status`: each node's versions and what it last reported (from `status/`).

use std::process::ExitCode;

use super::scope_filter;
use crate::cli::{Format, Scope};
use crate::commands::operate;
use crate::store::{versions, Store};
use crate::Error;

/// Prints the status of the nodes in `scope`.
pub fn run(
    config_dir: &std::path::Path,
    scope: Option<Scope>,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<ExitCode, Error> {
    let store = Store::open_existing(config_dir)?;
    let generated = store.load_generated()?;
    let scope = scope.unwrap_or(Scope::All);
    let detailed = matches!(scope, Scope::Node { .. });
    let filter = scope_filter(&generated, &scope)?;
    let index = versions::load_index(&store)?;
    let activations = versions::load_activations(&store)?;
    let nodes: Vec<operate::NodeStatus> = generated
        .nodes
        .iter()
        .filter(|n| filter(n))
        .map(|n| {
            let full = n.full_name();
            operate::NodeStatus {
                latest: index.nodes.get(&full.to_string()).map(|e| e.latest),
                desired: activations.nodes.get(&full.to_string()).map(|a| a.version),
                record: crate::service::records::read_node(&store, &full),
                node: full,
                id: n.id,
            }
        })
        .collect();
    operate::print_status(&store, &nodes, detailed, format == Format::Json, out).ok();
    Ok(ExitCode::SUCCESS)
}
