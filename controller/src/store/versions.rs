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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use towalink_bundle::{FileEntry, Manifest, Service};

use crate::model::allocation::NodeAllocation;
use crate::model::names::{NodeFullName, VersionSpec};
use crate::model::render::{RenderedNode, Renderer};
use crate::model::resolve::{resolve, ConfigTree, Resolved};
use crate::store::{parse_toml, Store, CERTS_DIR, EFFECTIVE_DIR};
use crate::Error;
use towalink_system::durable::{self, IoError};

/// Present while a commit is under way (see [`recover`]).
pub const JOURNAL: &str = "effective/.commit-journal.toml";
/// Present while `tlm activate` has written `activation.toml` but git has not recorded it:
/// `tlm serve` does not read activations meanwhile, and the next `tlm` completes the
/// activation (records it) before anything else.
pub const ACTIVATION_PENDING: &str = "effective/.activation-pending";
const INDEX: &str = "effective/index.toml";
const ACTIVATION: &str = "effective/activation.toml";
pub const SIGNING_KEY: &str = "certs/signing.key";
pub const SIGNING_PUB: &str = "certs/signing.pub";

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

/// The latest committed version of every node, keyed by `<node>.<site>`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    #[serde(default)]
    pub nodes: BTreeMap<String, IndexEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub id: u32,
    pub latest: u32,
    /// sha256 over the manifest's files and services: equal digests, equal content.
    pub content: String,
    pub created: String,
}

/// The version each node should run, keyed by `<node>.<site>`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activations {
    #[serde(default)]
    pub nodes: BTreeMap<String, Activation>,
}

/// One node's activation: the version, and the order number the node acts on (it grows with
/// every `tlm activate` of the node, so a node carries out each activation once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ActivationOnDisk")]
pub struct Activation {
    pub version: u32,
    pub order: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_s: Option<u64>,
}

/// Earlier files held just the version number.
#[derive(Deserialize)]
#[serde(untagged)]
enum ActivationOnDisk {
    Version(u32),
    Full(FullActivation),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullActivation {
    version: u32,
    order: u64,
    #[serde(default)]
    confirm_s: Option<u64>,
}

impl From<ActivationOnDisk> for Activation {
    fn from(on_disk: ActivationOnDisk) -> Activation {
        match on_disk {
            ActivationOnDisk::Version(version) => Activation {
                version,
                order: 1,
                confirm_s: None,
            },
            ActivationOnDisk::Full(FullActivation {
                version,
                order,
                confirm_s,
            }) => Activation {
                version,
                order,
                confirm_s,
            },
        }
    }
}

/// The index; rebuilt from the version directories when the file is missing.
pub fn load_index(store: &Store) -> Result<Index, Error> {
    match durable::read_optional(&store.root().join(INDEX))? {
        Some(text) => parse_toml(&text, INDEX),
        None => rebuild_index(store),
    }
}

pub fn save_index(store: &Store, index: &Index) -> Result<(), Error> {
    durable::write_atomic(
        &store.root().join(INDEX),
        index_text(index).as_bytes(),
        0o644,
    )?;
    Ok(())
}

fn index_text(index: &Index) -> String {
    format!(
        "# Written by tlm commit: the latest version of each node and its content digest.\n\n{}",
        toml::to_string(index).expect("index serializes")
    )
}

pub fn load_activations(store: &Store) -> Result<Activations, Error> {
    match durable::read_optional(&store.root().join(ACTIVATION))? {
        Some(text) => parse_toml(&text, ACTIVATION),
        None => Ok(Activations::default()),
    }
}

pub fn save_activations(store: &Store, activations: &Activations) -> Result<(), Error> {
    let text = format!(
        "# Written by tlm activate: the version each node should run.\n\n{}",
        toml::to_string(activations).expect("activations serialize")
    );
    durable::write_atomic(&store.root().join(ACTIVATION), text.as_bytes(), 0o644)?;
    Ok(())
}

/// Forgets a removed node in the index and the activations.
pub fn forget_node(store: &Store, node: &NodeFullName) -> Result<(), Error> {
    let name = node.to_string();
    let mut index = load_index(store)?;
    if index.nodes.remove(&name).is_some() {
        save_index(store, &index)?;
    }
    let mut activations = load_activations(store)?;
    if activations.nodes.remove(&name).is_some() {
        save_activations(store, &activations)?;
    }
    Ok(())
}

/// Rebuilds the index from the version directories on disk.
fn rebuild_index(store: &Store) -> Result<Index, Error> {
    let generated = store.load_generated()?;
    let mut index = Index::default();
    for node in &generated.nodes {
        let full = node.full_name();
        if let Some(latest) = list_versions(store, &full)?.last().copied() {
            let manifest = read_manifest(store, &full, latest)?;
            index.nodes.insert(
                full.to_string(),
                IndexEntry {
                    id: node.id,
                    latest,
                    content: content_digest(&manifest.files, &manifest.services),
                    created: manifest.created,
                },
            );
        }
    }
    Ok(index)
}

/// The versions of one node found on disk, ascending.
pub fn list_versions(store: &Store, node: &NodeFullName) -> Result<Vec<u32>, Error> {
    let dir = store.effective_dir(node);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(IoError::new("cannot read directory", &dir, e).into()),
    };
    let mut versions = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| IoError::new("cannot read directory", &dir, e))?;
        let name = entry.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|n| n.parse::<u32>().ok())
        {
            versions.push(n);
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

pub fn version_dir(store: &Store, node: &NodeFullName, version: u32) -> PathBuf {
    store.effective_dir(node).join(format!("v{version}"))
}

/// Path of the bundle of a version.
pub fn bundle_path(store: &Store, node: &NodeFullName, version: u32) -> PathBuf {
    version_dir(store, node, version).join(towalink_bundle::bundle_file_name(
        node.site.as_str(),
        node.node.as_str(),
        version,
    ))
}

/// The manifest of a committed version.
pub fn read_manifest(store: &Store, node: &NodeFullName, version: u32) -> Result<Manifest, Error> {
    let path = version_dir(store, node, version).join(towalink_bundle::MANIFEST_NAME);
    let text = durable::read_to_string(&path)?;
    parse_toml(&text, &relative(store, &path))
}

fn relative(store: &Store, path: &Path) -> String {
    path.strip_prefix(store.root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// What of a manifest decides whether content changed: the files and services, not the
/// version number or time.
fn content_digest(files: &[FileEntry], services: &BTreeMap<String, Service>) -> String {
    let mut key = String::new();
    for f in files {
        key.push_str(&format!(
            "{}|{:?}|{}|{}|{:?}\n",
            f.path, f.target, f.mode, f.sha256, f.service
        ));
    }
    for (name, service) in services {
        key.push_str(&format!("{name}={:?}\n", service.reload));
    }
    towalink_bundle::sha256_hex(key.as_bytes())
}

/// Loads the controller's signing key, or makes a new one (not yet saved).
fn signing_key(store: &Store) -> Result<(SigningKey, bool), Error> {
    match load_signing_key(store)? {
        Some(key) => Ok((key, false)),
        None => Ok((SigningKey::generate(&mut rand_core::OsRng), true)),
    }
}

/// The controller's signing key, if a commit made one (never made here).
pub fn load_signing_key(store: &Store) -> Result<Option<SigningKey>, Error> {
    let path = store.root().join(SIGNING_KEY);
    let Some(text) = durable::read_optional(&path)? else {
        return Ok(None);
    };
    let key = towalink_bundle::signing_key_from_base64(&text).map_err(|_| Error::Corrupt {
        file: SIGNING_KEY.to_string(),
        message: "not a base64 ed25519 secret key".into(),
    })?;
    Ok(Some(key))
}

fn public_key_text(key: &SigningKey) -> String {
    towalink_bundle::verifying_key_to_base64(&key.verifying_key())
}

fn save_signing_key(store: &Store, key: &SigningKey) -> Result<(), Error> {
    durable::create_dir_all(&store.root().join(CERTS_DIR))?;
    durable::write_atomic(
        &store.root().join(SIGNING_KEY),
        format!("{}\n", towalink_bundle::signing_key_to_base64(key)).as_bytes(),
        0o600,
    )?;
    durable::write_atomic(
        &store.root().join(SIGNING_PUB),
        format!("{}\n", public_key_text(key)).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// The controller's signing key, if a commit made one.
/// The controller's public signing key, if it has a signing key: always derived from the
/// private key, never trusted from `signing.pub`. A missing or different `signing.pub` (a copy
/// for operators) is rewritten, with a warning. Call with the lock held.
pub fn controller_public_key(store: &Store) -> Result<Option<String>, Error> {
    let Some(key) = load_signing_key(store)? else {
        return Ok(None);
    };
    let public = public_key_text(&key);
    let path = store.root().join(SIGNING_PUB);
    let on_disk = durable::read_optional(&path)?;
    if on_disk.as_deref().map(str::trim) != Some(public.as_str()) {
        tracing::warn!(
            "`{SIGNING_PUB}` is {}: rewriting it from `{SIGNING_KEY}`",
            if on_disk.is_some() {
                "not the public half of the signing key"
            } else {
                "missing"
            }
        );
        durable::write_atomic(&path, format!("{public}\n").as_bytes(), 0o644)?;
    }
    Ok(Some(public))
}

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
        std::fs::remove_file(&journal_path)
            .map_err(|e| IoError::new("cannot remove", &journal_path, e))?;
    }
    let pending = store.root().join(ACTIVATION_PENDING);
    if let Some(message) = durable::read_optional(&pending)? {
        tracing::warn!("completing an interrupted activation");
        store.git_commit(&format!(
            "{} (completed after an interrupted activate)",
            message.trim()
        ))?;
        std::fs::remove_file(&pending).map_err(|e| IoError::new("cannot remove", &pending, e))?;
    }
    Ok(())
}

/// Moves the journal's staged versions into place (those not there yet), synced.
fn publish_staged(store: &Store, journal: &Journal) -> Result<(), Error> {
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
) -> Result<RenderedNode, Error> {
    let complete = resolved
        .complete_attributes(node.id)
        .expect("every allocated node is resolved");
    let effective = resolved.effective_attributes(node.id, &complete);
    Ok(renderer.render(&node.full_name(), &complete, &effective)?)
}

/// Renders the nodes and tells which differ from their latest version.
pub fn changed_nodes(
    store: &Store,
    tree: &ConfigTree,
    nodes: &[&NodeAllocation],
) -> Result<Vec<NodeState>, Error> {
    let resolved = resolve(tree)?;
    let index = load_index(store)?;
    let mut renderer = Renderer::new(tree);
    let mut states = Vec::new();
    for node in nodes {
        let rendered = render_node(&resolved, &mut renderer, node)?;
        let full = node.full_name();
        let entry = index.nodes.get(&full.to_string());
        let digest = content_digest(&rendered.entries, &rendered.services);
        states.push(NodeState {
            node: full,
            latest: entry.map(|e| e.latest),
            changed: entry.map(|e| &e.content) != Some(&digest),
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
    let created_at = creation_time();
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
                let (tree, resolved, nodes, key, staging, created_at, index) = (
                    &tree,
                    &resolved,
                    &nodes,
                    &key,
                    &staging,
                    &created_at,
                    &index,
                );
                scope.spawn(move || {
                    let mut renderer = Renderer::new(tree);
                    let mut done = Vec::new();
                    for (position, node) in nodes.iter().enumerate().skip(worker).step_by(workers) {
                        let staged = stage_node(
                            store,
                            resolved,
                            &mut renderer,
                            node,
                            index,
                            key,
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
    for (_, result) in all {
        match result {
            Staged::Unchanged(node) => outcome.unchanged.push(node),
            Staged::New(node, entry) => {
                staged.push((node.clone(), entry.latest));
                index.nodes.insert(node.to_string(), entry);
            }
        }
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
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
        let journal = store.root().join(JOURNAL);
        std::fs::remove_file(&journal).map_err(|e| IoError::new("cannot remove", &journal, e))?;
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "published"
    );
    outcome.created = staged;
    Ok(outcome)
}

/// Undoes a commit whose git step failed: the old index back, then the journal and the
/// staged versions removed; nothing was published. Best effort: should a step fail, the
/// journal stays and the next `tlm` finishes the commit instead.
fn undo_commit(store: &Store, previous_index: Option<&str>, staging: &Path) {
    let index = store.root().join(INDEX);
    let restored = match previous_index {
        Some(text) => durable::write_atomic(&index, text.as_bytes(), 0o644),
        None => std::fs::remove_file(&index)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| IoError::new("cannot remove", &index, e)),
    };
    let journal = store.root().join(JOURNAL);
    let undone = restored.and_then(|()| {
        std::fs::remove_file(&journal).map_err(|e| IoError::new("cannot remove", &journal, e))
    });
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
    Unchanged(NodeFullName),
    New(NodeFullName, IndexEntry),
}

/// Renders one node and, when its content changed, writes its next version to the staging
/// area.
#[allow(clippy::too_many_arguments)]
fn stage_node(
    store: &Store,
    resolved: &Resolved,
    renderer: &mut Renderer<'_>,
    node: &NodeAllocation,
    index: &Index,
    key: &SigningKey,
    staging: &Path,
    created_at: &str,
) -> Result<Staged, Error> {
    let full = node.full_name();
    let rendered = render_node(resolved, renderer, node)?;
    let previous = index.nodes.get(&full.to_string());
    let digest = content_digest(&rendered.entries, &rendered.services);
    if previous.map(|e| &e.content) == Some(&digest) {
        return Ok(Staged::Unchanged(full));
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
    let bundle = towalink_bundle::build(&manifest, &rendered.files, key)?;
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

/// Test hook: `TLM_CRASH_AT=<point>` kills the process at that point of a commit (as a power
/// cut would), so tests can check that the next `tlm` finds versions and git in step.
fn crash_point(point: &str) {
    if std::env::var("TLM_CRASH_AT").is_ok_and(|p| p == point) {
        std::process::abort();
    }
}

fn write_version_dir(
    dir: &Path,
    manifest: &Manifest,
    files: &BTreeMap<String, Vec<u8>>,
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
    for (path, content) in files {
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
        std::fs::remove_file(&pending).map_err(|e| IoError::new("cannot remove", &pending, e))?;
    }
    if let Err(e) = recorded {
        // The service must not carry out an activation git did not record: put the old
        // activations back.
        let path = store.root().join(ACTIVATION);
        let restored = match previous {
            Some(text) => durable::write_atomic(&path, text.as_bytes(), 0o644),
            None => {
                std::fs::remove_file(&path).map_err(|e| IoError::new("cannot remove", &path, e))
            }
        };
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
    fn activations_read_the_old_and_the_new_form() {
        let old: Activations = toml::from_str("[nodes]\n\"r.a\" = 3\n").unwrap();
        assert_eq!(
            old.nodes["r.a"],
            Activation {
                version: 3,
                order: 1,
                confirm_s: None
            }
        );
        let text = toml::to_string(&old).unwrap();
        let again: Activations = toml::from_str(&text).unwrap();
        assert_eq!(again.nodes["r.a"], old.nodes["r.a"]);
        assert!(toml::from_str::<Activations>(
            "[nodes.\"r.a\"]\nversion = 3\norder = 2\nbogus = 1\n"
        )
        .is_err());
    }

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

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
