//! `tlm activate`: the version each node should run, recorded with a new order number.

use super::index::{load_activations, load_index, save_activations, version_dir, Activation};
use super::{crash_point, remove, restore, ACTIVATION, ACTIVATION_PENDING};
use crate::model::allocation::NodeAllocation;
use crate::model::names::{NodeFullName, VersionSpec};
use crate::store::Store;
use crate::Error;
use towalink_system::durable;

/// The order number of a node's next activation: one above both the last one recorded and the
/// last one the node reported carrying out (so a controller restored from an older backup, whose
/// `activation.toml` is behind its nodes, still issues orders they take). A reported number
/// more than a node's step ahead of the record is not believed (a node cannot push its own
/// numbers up); none past [`towalink_bundle::orders::MAX_ORDER_SEQ`]. Pure.
pub fn next_order(recorded: Option<u64>, reported: Option<u64>) -> Option<u64> {
    use towalink_bundle::orders::{MAX_ORDER_SEQ, MAX_ORDER_STEP};
    let recorded = recorded.unwrap_or(0);
    let reported = reported
        .filter(|r| *r < recorded.saturating_add(MAX_ORDER_STEP))
        .unwrap_or(0);
    let next = recorded.max(reported).checked_add(1)?;
    (next <= MAX_ORDER_SEQ).then_some(next)
}

/// What `activate` recorded for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub node: NodeFullName,
    pub id: u32,
    pub activation: Activation,
    /// The version recorded before.
    pub previous: Option<u32>,
}

/// Resolves the version to activate for each node, then records all of them, each with a new
/// order number. An unknown version on any node changes nothing.
pub fn activate(
    store: &Store,
    nodes: &[&NodeAllocation],
    spec: VersionSpec,
    confirm_s: Option<u64>,
    message: &str,
) -> Result<Vec<Recorded>, Error> {
    let index = load_index(store)?;
    let mut activations = load_activations(store)?;
    let mut plan = Vec::new();
    for node in nodes {
        let full = node.full_name();
        let name = full.to_string();
        let latest = index.nodes.get(&name).map(|e| e.latest);
        let version = match spec {
            VersionSpec::Latest => latest.ok_or_else(|| Error::NoVersion(full.clone()))?,
            VersionSpec::Number(n) => {
                let manifest = version_dir(store, &full, n).join(towalink_bundle::MANIFEST_NAME);
                if !manifest.is_file() {
                    return Err(Error::UnknownVersion {
                        node: full,
                        version: n,
                        latest,
                    });
                }
                n
            }
        };
        let previous = activations.nodes.get(&name).copied();
        let order = next_order(
            previous.map(|p| p.order),
            crate::service::records::read_node(store, &full)
                .and_then(|r| r.report.order_done)
                .map(|d| d.seq),
        )
        .ok_or_else(|| Error::Corrupt {
            file: ACTIVATION.to_string(),
            message: format!(
                "node {full}: order number would pass {}",
                towalink_bundle::orders::MAX_ORDER_SEQ
            ),
        })?;
        plan.push(Recorded {
            node: full,
            id: node.id,
            activation: Activation {
                version,
                order,
                confirm_s,
            },
            previous: previous.map(|p| p.version),
        });
    }
    for recorded in &plan {
        activations
            .nodes
            .insert(recorded.node.to_string(), recorded.activation);
    }
    let previous = durable::read_optional(&store.root().join(ACTIVATION))?;
    let pending = store.root().join(ACTIVATION_PENDING);
    durable::write_atomic(&pending, format!("{message}\n").as_bytes(), 0o644)?;
    save_activations(store, &activations)?;
    crash_point("activation-saved");
    let recorded = store.git_commit(message);
    if recorded.is_ok() {
        remove(&pending)?;
    }
    if let Err(e) = recorded {
        // The service must not carry out an activation git did not record: put the old
        // activations back.
        let restored = restore(&store.root().join(ACTIVATION), previous.as_deref());
        match restored {
            Ok(()) => {
                let _ = std::fs::remove_file(&pending);
            }
            // The marker stays: the service keeps its view, the next tlm completes it.
            Err(undo) => {
                tracing::warn!("git failed and the activation could not be undone: {undo}")
            }
        }
        crate::store::git::unstage(store.root());
        return Err(e);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_numbers_grow_stay_bounded_and_follow_a_restored_node() {
        use towalink_bundle::orders::{MAX_ORDER_SEQ, MAX_ORDER_STEP};
        assert_eq!(next_order(None, None), Some(1));
        assert_eq!(next_order(Some(4), None), Some(5));
        assert_eq!(next_order(Some(4), Some(2)), Some(5));
        // Restored from an older backup: the node already did order 9.
        assert_eq!(next_order(Some(4), Some(9)), Some(10));
        assert_eq!(next_order(None, Some(9)), Some(10));
        // An implausible report (an attacker's seq) is not believed.
        assert_eq!(next_order(Some(4), Some(i64::MAX as u64)), Some(5));
        assert_eq!(next_order(Some(4), Some(4 + MAX_ORDER_STEP)), Some(5));
        assert_eq!(next_order(Some(MAX_ORDER_SEQ), None), None);
        assert_eq!(next_order(Some(u64::MAX), None), None);
    }
}
