//! Recovery of what a killed `tlm` left: an interrupted commit (its journal and staging
//! directories) and an interrupted activation (the `.activation-pending` marker).

use super::commit::publish_staged;
use super::index::{rebuild_index, save_index};
use super::{remove, Journal, ACTIVATION_PENDING, INDEX, JOURNAL};
use crate::store::{parse_toml, Store, EFFECTIVE_DIR};
use crate::Error;
use towalink_system::durable;

/// Finishes or cleans up a commit that was interrupted. Call with the lock held.
///
/// After the journal, the commit is rolled forward in its own order: the index, git, then
/// the versions moved into place (so the service sees them only once git has them), then the
/// journal removed. Stale git locks are removed on the way ([`crate::store::git`]).
pub fn recover(store: &Store) -> Result<(), Error> {
    let journal_path = store.root().join(JOURNAL);
    let journal: Option<Journal> = match durable::read_optional(&journal_path)? {
        Some(text) => Some(parse_toml(&text, JOURNAL)?),
        None => None,
    };
    if let Some(journal) = &journal {
        tracing::warn!(
            versions = journal.versions.len(),
            "completing an interrupted commit"
        );
        match &journal.index {
            Some(text) => {
                durable::write_atomic(&store.root().join(INDEX), text.as_bytes(), 0o644)?;
                store.git_commit(&format!(
                    "{} (completed after an interrupted commit)",
                    journal.message
                ))?;
                publish_staged(store, journal)?;
            }
            None => {
                // A journal of an earlier tlm: versions first, as it did.
                publish_staged(store, journal)?;
                save_index(store, &rebuild_index(store)?)?;
                store.git_commit(&format!(
                    "{} (completed after an interrupted commit)",
                    journal.message
                ))?;
            }
        }
    }
    let effective = store.root().join(EFFECTIVE_DIR);
    if let Ok(entries) = std::fs::read_dir(&effective) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".staging-") {
                tracing::warn!(dir = %entry.path().display(), "removing staging directory of an interrupted commit");
                durable::remove_dir_all(&entry.path())?;
            }
        }
    }
    if journal.is_some() {
        remove(&journal_path)?;
    }
    let pending = store.root().join(ACTIVATION_PENDING);
    if let Some(message) = durable::read_optional(&pending)? {
        tracing::warn!("completing an interrupted activation");
        store.git_commit(&format!(
            "{} (completed after an interrupted activate)",
            message.trim()
        ))?;
        remove(&pending)?;
    }
    Ok(())
}
