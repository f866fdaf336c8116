//! A commit: render every node in scope, stage the new versions, journal, index, git,
//! publish; the undo when git fails; change detection against the index.

use std::path::Path;

use ed25519_dalek::SigningKey;
use towalink_bundle::Manifest;

use super::index::{
    content_digest, index_text, list_versions, load_index, save_index, Index, IndexEntry,
};
use super::rendered::{renderer_id, RenderRecord};
use super::{crash_point, remove, restore, Journal, INDEX, JOURNAL};
use crate::model::allocation::NodeAllocation;
use crate::model::inputs::{input_digests, InputDigest};
use crate::model::management::VersionManagement;
use crate::model::names::NodeFullName;
use crate::model::render::{RenderedNode, Renderer};
use crate::model::resolve::{resolve, ConfigTree, Resolved};
use crate::store::keys::{save_signing_key, signing_key};
use crate::store::{Store, EFFECTIVE_DIR};
use crate::Error;
use towalink_system::durable;

/// Moves the journal's staged versions into place (those not there yet), synced.
pub(super) fn publish_staged(store: &Store, journal: &Journal) -> Result<(), Error> {
    for version in &journal.versions {
        let from = store.root().join(&journal.staging).join(version);
        let to = store.root().join(EFFECTIVE_DIR).join(version);
        if from.is_dir() && !to.exists() {
            durable::create_dir_all(to.parent().expect("version dir has a parent"))?;
            durable::rename(&from, &to)?;
            crash_point("renamed-one");
        }
    }
    durable::sync_filesystem(store.root())?;
    Ok(())
}

/// Which nodes a command applies to.
pub fn nodes_in_scope(
    tree: &ConfigTree,
    filter: impl Fn(&NodeAllocation) -> bool,
) -> Vec<&NodeAllocation> {
    tree.generated.nodes.iter().filter(|n| filter(n)).collect()
}

/// A node's rendered working configuration compared with its latest version.
pub struct NodeState {
    pub node: NodeFullName,
    pub latest: Option<u32>,
    pub changed: bool,
}

fn render_node(
    resolved: &Resolved,
    renderer: &mut Renderer<'_>,
    node: &NodeAllocation,
    management: Option<&VersionManagement>,
) -> Result<RenderedNode, Error> {
    let complete = resolved
        .complete_attributes(node.id)
        .expect("every allocated node is resolved");
    let effective = resolved.effective_attributes(node.id, &complete);
    let link = management.and_then(|m| m.for_node(node.id));
    Ok(renderer.render(&node.full_name(), &complete, &effective, link.as_ref())?)
}

/// Tells which nodes differ from their latest version: those whose inputs are not those
/// their latest content was rendered from are rendered.
pub fn changed_nodes(
    store: &Store,
    tree: &ConfigTree,
    nodes: &[&NodeAllocation],
) -> Result<Vec<NodeState>, Error> {
    node_states(store, tree, nodes, true)
}

/// [`changed_nodes`], rendering every node when `trust_record` is false.
pub(super) fn node_states(
    store: &Store,
    tree: &ConfigTree,
    nodes: &[&NodeAllocation],
    trust_record: bool,
) -> Result<Vec<NodeState>, Error> {
    let resolved = resolve(tree)?;
    let index = load_index(store)?;
    let management = crate::store::keys::version_management(store, false)?;
    let renderer_id = renderer_id();
    let inputs = input_digests(tree, &resolved, management.as_ref(), &renderer_id);
    let record = RenderRecord::load(store, &renderer_id);
    let mut renderer = Renderer::new(tree);
    let mut states = Vec::new();
    for node in nodes {
        let full = node.full_name();
        let entry = index.nodes.get(&full.to_string());
        let changed =
            if trust_record && record.unchanged(&full.to_string(), &inputs[&node.id], entry) {
                false
            } else {
                let rendered = render_node(&resolved, &mut renderer, node, management.as_ref())?;
                let digest = content_digest(&rendered.entries, &rendered.services);
                entry.map(|e| &e.content) != Some(&digest)
            };
        states.push(NodeState {
            node: full,
            latest: entry.map(|e| e.latest),
            changed,
        });
    }
    Ok(states)
}

/// Result of a commit.
#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// Nodes that got a new version, with the version.
    pub created: Vec<(NodeFullName, u32)>,
    /// Nodes whose content did not change.
    pub unchanged: Vec<NodeFullName>,
    /// Whether a git commit was recorded.
    pub git_committed: bool,
    /// How many nodes were rendered (the others' inputs had not changed).
    pub rendered: usize,
}

/// Creation time of new versions: now, or `SOURCE_DATE_EPOCH` when set (reproducible builds).
fn creation_time() -> String {
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    rfc3339(seconds)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let rem = seconds.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Commits the nodes chosen by `filter`: a new version for each node whose content changed,
/// its bundle, and a git commit with `message`.
pub fn commit(
    store: &Store,
    filter: impl Fn(&NodeAllocation) -> bool,
    message: &str,
) -> Result<CommitOutcome, Error> {
    // A directory of an earlier tlm learns to keep this one's soft state out of git.
    store.ensure_gitignore()?;
    // A secret about to enter git refuses the commit before anything is written.
    crate::store::git::check_recorded_paths(store.root())?;
    crate::store::git::recover_stale_locks(store.root())?;
    for upgrade in store.upgrade_default_templates()? {
        match upgrade {
            crate::store::TemplateUpgrade::Updated(file) => tracing::warn!(
                "{file}: was the unchanged built-in template of an earlier tlm; replaced by the current one (its filters keep the management plane out of BGP, docs/security.md)"
            ),
            crate::store::TemplateUpgrade::LacksManagementFilter(file) => tracing::warn!(
                "{file}: customized and without `towalink_management`: peers may import the controller's management address; add the filters of the built-in template (docs/security.md, \"Management plane\")"
            ),
        }
    }
    let tree = store.load_tree()?;
    let resolved = resolve(&tree)?;
    for warning in resolved.warnings() {
        tracing::warn!("{warning}");
    }
    let nodes = nodes_in_scope(&tree, filter);
    let mut index = load_index(store)?;
    let (key, new_key) = signing_key(store)?;
    let management = crate::store::keys::version_management(store, true)?;
    let created_at = creation_time();
    let renderer_id = renderer_id();
    let inputs = input_digests(&tree, &resolved, management.as_ref(), &renderer_id);
    let mut record = RenderRecord::load(store, &renderer_id);
    let staging = store
        .root()
        .join(EFFECTIVE_DIR)
        .join(format!(".staging-{}", std::process::id()));
    let mut outcome = CommitOutcome::default();

    // Phase 1: render and stage, on every core. Any error removes the staging area: nothing
    // changed.
    let started = std::time::Instant::now();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(nodes.len().max(1));
    let results: Vec<Result<Vec<(usize, Staged)>, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                let (tree, resolved, nodes, key, management, staging, created_at, index) = (
                    &tree,
                    &resolved,
                    &nodes,
                    &key,
                    management.as_ref(),
                    &staging,
                    &created_at,
                    &index,
                );
                let (inputs, record) = (&inputs, &record);
                scope.spawn(move || {
                    let mut renderer = Renderer::new(tree);
                    let mut done = Vec::new();
                    for (position, node) in nodes.iter().enumerate().skip(worker).step_by(workers) {
                        let staged = stage_node(
                            store,
                            resolved,
                            &mut renderer,
                            node,
                            (&inputs[&node.id], record),
                            index,
                            key,
                            management,
                            staging,
                            created_at,
                        )?;
                        done.push((position, staged));
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("render worker does not panic"))
            .collect()
    });
    let mut all = Vec::with_capacity(nodes.len());
    let mut failure = None;
    for result in results {
        match result {
            Ok(done) => all.extend(done),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        let _ = durable::remove_dir_all(&staging);
        return Err(e);
    }
    all.sort_by_key(|(position, _)| *position);
    let mut staged = Vec::new();
    let mut rendered = 0;
    for (position, result) in all {
        let node_inputs = || inputs[&nodes[position].id].clone();
        match result {
            Staged::Skipped(node) => outcome.unchanged.push(node),
            Staged::Unchanged(node, content) => {
                rendered += 1;
                record.rendered(node.to_string(), node_inputs(), content);
                outcome.unchanged.push(node);
            }
            Staged::New(node, entry) => {
                rendered += 1;
                record.rendered(node.to_string(), node_inputs(), entry.content.clone());
                staged.push((node.clone(), entry.latest));
                index.nodes.insert(node.to_string(), entry);
            }
        }
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        rendered,
        skipped = nodes.len() - rendered,
        new = staged.len(),
        "rendered and staged"
    );

    // Phase 2: journal, index, git, publish. From the journal on, a crash is finished by
    // `recover`; a failing git undoes the commit.
    crash_point("staged");
    if new_key && !staged.is_empty() {
        save_signing_key(store, &key)?;
    }
    let previous_index = durable::read_optional(&store.root().join(INDEX))?;
    let journal = Journal {
        message: message.to_string(),
        staging: format!("{EFFECTIVE_DIR}/.staging-{}", std::process::id()),
        versions: staged
            .iter()
            .map(|(n, v)| format!("{}/{}/v{v}", n.site, n.node))
            .collect(),
        index: Some(index_text(&index)),
    };
    if !staged.is_empty() {
        durable::sync_filesystem(store.root())?;
        durable::write_atomic(
            &store.root().join(JOURNAL),
            toml::to_string(&journal)
                .expect("journal serializes")
                .as_bytes(),
            0o644,
        )?;
        crash_point("journal");
        save_index(store, &index)?;
        crash_point("index");
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "git: recording"
    );
    outcome.git_committed = match store.git_commit(message) {
        Ok(committed) => committed,
        Err(e) => {
            if !staged.is_empty() {
                undo_commit(store, previous_index.as_deref(), &staging);
            }
            return Err(e);
        }
    };
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recorded in git"
    );
    crash_point("git");
    if !staged.is_empty() {
        publish_staged(store, &journal)?;
        durable::remove_dir_all(&staging)?;
        crash_point("published");
        remove(&store.root().join(JOURNAL))?;
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "published"
    );
    // Soft state: a record not written costs the next commit a full render, nothing else.
    record.retain(|node| index.nodes.contains_key(node));
    if let Err(e) = record.save(store) {
        tracing::warn!("{e}: the next commit renders every node");
    }
    outcome.created = staged;
    outcome.rendered = rendered;
    Ok(outcome)
}

/// Undoes a commit whose git step failed: the old index back, then the journal and the
/// staged versions removed; nothing was published. Best effort: should a step fail, the
/// journal stays and the next `tlm` finishes the commit instead.
fn undo_commit(store: &Store, previous_index: Option<&str>, staging: &Path) {
    let restored = restore(&store.root().join(INDEX), previous_index);
    let undone = restored.and_then(|()| remove(&store.root().join(JOURNAL)));
    match undone {
        Ok(()) => {
            let _ = durable::remove_dir_all(staging);
            crate::store::git::unstage(store.root());
            tracing::warn!("git failed: the commit was undone, no version was published");
        }
        Err(e) => tracing::warn!(
            "git failed and the commit could not be undone ({e}): the next tlm finishes it"
        ),
    }
}

enum Staged {
    /// Its inputs are those its latest version was rendered from: not rendered.
    Skipped(NodeFullName),
    /// Rendered to its latest version's content digest.
    Unchanged(NodeFullName, String),
    /// Rendered to a new version.
    New(NodeFullName, IndexEntry),
}

/// Renders one node unless its inputs are those its latest version was rendered from and, when
/// its content changed, writes its next version to the staging area.
#[allow(clippy::too_many_arguments)]
fn stage_node(
    store: &Store,
    resolved: &Resolved,
    renderer: &mut Renderer<'_>,
    node: &NodeAllocation,
    (inputs, record): (&InputDigest, &RenderRecord),
    index: &Index,
    key: &SigningKey,
    management: Option<&VersionManagement>,
    staging: &Path,
    created_at: &str,
) -> Result<Staged, Error> {
    let full = node.full_name();
    let previous = index.nodes.get(&full.to_string());
    if record.unchanged(&full.to_string(), inputs, previous) {
        return Ok(Staged::Skipped(full));
    }
    let rendered = render_node(resolved, renderer, node, management)?;
    let digest = content_digest(&rendered.entries, &rendered.services);
    if previous.map(|e| &e.content) == Some(&digest) {
        return Ok(Staged::Unchanged(full, digest));
    }
    // The index may be older than the disk (a `git checkout` of it): never reuse a number.
    let on_disk = list_versions(store, &full)?.last().copied();
    let latest = previous.map(|e| e.latest).max(on_disk);
    let version = latest.map_or(1, |v| v + 1);
    let manifest = Manifest {
        format: towalink_bundle::FORMAT,
        node_id: node.id,
        site: node.site.to_string(),
        node: node.name.to_string(),
        version,
        parent: latest,
        created: created_at.to_string(),
        services: rendered.services,
        files: rendered.entries,
    };
    let bundle = towalink_bundle::build_hashed(&manifest, &rendered.files, key)?;
    let dir = staging
        .join(node.site.as_str())
        .join(node.name.as_str())
        .join(format!("v{version}"));
    write_version_dir(&dir, &manifest, &rendered.files, &bundle, key)?;
    Ok(Staged::New(
        full,
        IndexEntry {
            id: node.id,
            latest: version,
            content: digest,
            created: created_at.to_string(),
        },
    ))
}

fn write_version_dir(
    dir: &Path,
    manifest: &Manifest,
    files: &towalink_bundle::HashedFiles,
    bundle: &[u8],
    key: &SigningKey,
) -> Result<(), Error> {
    durable::create_dir_all(&dir.join("files"))?;
    let (manifest_text, signature) = towalink_bundle::signed_manifest(manifest, key)?;
    durable::write_new(
        &dir.join(towalink_bundle::MANIFEST_NAME),
        manifest_text.as_bytes(),
        0o644,
    )?;
    durable::write_new(
        &dir.join(towalink_bundle::SIGNATURE_NAME),
        signature.as_bytes(),
        0o644,
    )?;
    let mut made = std::collections::BTreeSet::new();
    for (path, content) in files.iter() {
        let target = dir.join("files").join(path);
        if let Some(parent) = target.parent() {
            if made.insert(parent.to_path_buf()) {
                durable::create_dir_all(parent)?;
            }
        }
        durable::write_new(&target, content, 0o644)?;
    }
    durable::write_new(
        &dir.join(towalink_bundle::bundle_file_name(
            &manifest.site,
            &manifest.node,
            manifest.version,
        )),
        bundle,
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
