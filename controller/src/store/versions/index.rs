//! The index of latest versions (`effective/index.toml`), the activations
//! (`effective/activation.toml`) and the version directories they point at.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use towalink_bundle::{FileEntry, Manifest, Service};

use super::{ACTIVATION, INDEX};
use crate::model::names::NodeFullName;
use crate::store::{parse_toml, Store};
use crate::Error;
use towalink_system::durable::{self, IoError};

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

pub(super) fn index_text(index: &Index) -> String {
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
pub(super) fn rebuild_index(store: &Store) -> Result<Index, Error> {
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
pub(super) fn content_digest(files: &[FileEntry], services: &BTreeMap<String, Service>) -> String {
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
}
