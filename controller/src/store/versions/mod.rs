//! Committed versions of each node's effective configuration, their bundles, the index of
//! latest versions and the version each node is asked to activate.
//!
//! ```text
//! effective/<site>/<node>/v<N>/manifest.toml       the signed manifest
//! effective/<site>/<node>/v<N>/manifest.sig        its ed25519 signature
//! effective/<site>/<node>/v<N>/files/...           the rendered files (diff -r between versions)
//! effective/<site>/<node>/v<N>/<site>-<node>-v<N>.tar.zst   the bundle sent to the node
//! effective/index.toml                             latest version and content digest per node (in git)
//! effective/activation.toml                        the version each node should run (in git)
//! effective/render-inputs.toml                     what each node's latest content was rendered from (soft state)
//! ```
//!
//! Version directories are immutable once published and stay out of git (thousands of files per
//! commit would make git the slowest part of `tlm`); git records the inputs plus `index.toml`,
//! so each git commit names exactly the versions that existed when it was made.
//!
//! A commit renders every node in scope, stages new versions under `effective/.staging-<pid>/`,
//! syncs, writes a journal (holding the new index), rewrites the index, records the git commit,
//! and only then publishes: moves the versions into place and removes the journal. The service
//! (`tlm serve`) offers the version directories it finds in place, so a version becomes visible
//! only once git recorded it. Whatever instant a commit stops at, the next `tlm` either finds no
//! trace (before the journal) or finishes the commit (after it): versions, index and git never
//! stay out of step. When git fails (disk full), the commit is undone: the old index is put
//! back, the staged versions are removed and nothing was published.
//!
//! The parts: [`index`] (the index and activations files, the version directories),
//! [`commit`] (render, stage, journal, index, git, publish; undo; change detection),
//! [`recover`] (interrupted commits and activations) and [`activation`] (`tlm activate`'s
//! records and order numbers). The controller's signing key lives in [`crate::store::keys`].

mod activation;
mod commit;
#[cfg(test)]
mod incremental_tests;
mod index;
mod recover;
mod rendered;

use std::path::Path;

use serde::{Deserialize, Serialize};
use towalink_system::durable::{self, IoError};

pub use crate::store::keys::{controller_public_key, load_signing_key, SIGNING_KEY, SIGNING_PUB};
pub use activation::{activate, next_order, Recorded};
pub use commit::{changed_nodes, commit, nodes_in_scope, rfc3339, CommitOutcome, NodeState};
pub use index::{
    bundle_path, forget_node, list_versions, load_activations, load_index, read_manifest,
    save_activations, save_index, version_dir, Activation, Activations, Index, IndexEntry,
};
pub use recover::recover;
pub use rendered::RENDER_INPUTS;

/// Present while a commit is under way (see [`recover`]).
pub const JOURNAL: &str = "effective/.commit-journal.toml";
/// Present while `tlm activate` has written `activation.toml` but git has not recorded it:
/// `tlm serve` does not read activations meanwhile, and the next `tlm` completes the
/// activation (records it) before anything else.
pub const ACTIVATION_PENDING: &str = "effective/.activation-pending";
const INDEX: &str = "effective/index.toml";
const ACTIVATION: &str = "effective/activation.toml";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    message: String,
    /// Staging directory (relative to the root) holding the complete, synced versions.
    staging: String,
    /// `<site>/<node>/v<N>` of each new version.
    versions: Vec<String>,
    /// The new `effective/index.toml` (journals of earlier versions lack it: the index is then
    /// rebuilt from the version directories).
    #[serde(default)]
    index: Option<String>,
}

/// Removes a file this module wrote.
fn remove(path: &Path) -> Result<(), IoError> {
    std::fs::remove_file(path).map_err(|e| IoError::new("cannot remove", path, e))
}

/// Puts a file back as it was before (`None`: there was none), when git refused a change.
fn restore(path: &Path, previous: Option<&str>) -> Result<(), IoError> {
    match previous {
        Some(text) => durable::write_atomic(path, text.as_bytes(), 0o644),
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            removed => removed.map_err(|e| IoError::new("cannot remove", path, e)),
        },
    }
}

/// Test hook: `TLM_CRASH_AT=<point>` kills the process at that point of a commit (as a power
/// cut would), so tests can check that the next `tlm` finds versions and git in step.
fn crash_point(point: &str) {
    if std::env::var("TLM_CRASH_AT").is_ok_and(|p| p == point) {
        std::process::abort();
    }
}
