//! What `tlm` does to an installation: add and remove sites and nodes, set attributes. Each
//! operation checks everything first and writes last, so a refused command changes nothing.

use toml::Value;

use crate::model::allocation::NodeAllocation;
use crate::model::attributes::{parse_attribute_path, Level};
use crate::model::names::{NodeFullName, NodeRef, SiteName};
use crate::model::resolve::{allocation_settings, merge_node, merge_site, resolve};
use crate::store::Store;
use crate::Error;

/// Adds a site: allocates its id and AS number, creates `site_<site>/`.
pub fn add_site(store: &Store, site: &SiteName) -> Result<u32, Error> {
    let mut tree = store.load_tree()?;
    let merged = merge_site(&tree, site);
    let (_, asn_base) = allocation_settings(&merged)?;
    let allocation = tree.generated.add_site(site.clone(), asn_base)?.clone();
    store.save_generated(&tree.generated)?;
    store.create_site_dir(site)?;
    tracing::info!(site = %site, id = allocation.id, asn = allocation.asn, "added site");
    Ok(allocation.id)
}

/// Adds a node: allocates id, loopbacks, WireGuard keys and recovery token.
pub fn add_node(store: &Store, full: &NodeFullName) -> Result<NodeAllocation, Error> {
    let mut tree = store.load_tree()?;
    tree.generated.site(full.site.as_str())?;
    let merged = merge_node(&tree, full, &crate::model::attributes::defaults());
    let (pools, _) = allocation_settings(&merged)?;
    let (node, node_secrets) =
        tree.generated
            .add_node(full.clone(), &pools, &mut rand_core::OsRng)?;
    let mut secrets = store.load_secrets()?;
    secrets.nodes.retain(|s| s.id != node.id);
    secrets.nodes.push(node_secrets);
    // Leftovers of an earlier node of this name (a removal interrupted after its record was
    // saved) must not become the new node's configuration or versions.
    remove_node_leftovers(store, full)?;
    // Secrets first: a crash before the generated config is saved leaves only an unused entry.
    store.save_secrets(&secrets)?;
    store.save_generated(&tree.generated)?;
    store.create_node_dir(&node)?;
    tracing::info!(node = %full, id = node.id, "added node");
    Ok(node)
}

/// Removes a node, its directory and its versions. Its id is never reused.
pub fn remove_node(store: &Store, node_ref: &NodeRef) -> Result<NodeAllocation, Error> {
    let mut generated = store.load_generated()?;
    let node = generated.remove_node(node_ref)?;
    let full = node.full_name();
    // The record first: once it is saved the node is gone, and what is left below is only
    // leftovers (removed again if a node of that name is added later).
    store.save_generated(&generated)?;
    crate::store::versions::forget_node(store, &full)?;
    let mut secrets = store.load_secrets()?;
    secrets.nodes.retain(|s| s.id != node.id);
    store.save_secrets(&secrets)?;
    remove_node_leftovers(store, &full)?;
    tracing::info!(node = %full, id = node.id, "removed node");
    Ok(node)
}

fn remove_node_leftovers(store: &Store, full: &NodeFullName) -> Result<(), Error> {
    store.remove_tree(&Store::level_dir(&Level::Node(
        full.site.clone(),
        full.node.clone(),
    )))?;
    store.remove_tree(
        store
            .effective_dir(full)
            .strip_prefix(store.root())
            .expect("effective dir is inside the root"),
    )
}

/// Removes a site that has no nodes left.
pub fn remove_site(store: &Store, site: &SiteName) -> Result<(), Error> {
    let mut generated = store.load_generated()?;
    generated.remove_site(site)?;
    store.save_generated(&generated)?;
    store.remove_tree(&Store::level_dir(&Level::Site(site.clone())))?;
    store.remove_tree(&std::path::Path::new(crate::store::EFFECTIVE_DIR).join(site.as_str()))?;
    tracing::info!(site = %site, "removed site");
    Ok(())
}

/// What `set` did.
#[derive(Debug, PartialEq, Eq)]
pub enum SetOutcome {
    Set,
    Removed,
    /// `empty` for an attribute the level does not set.
    NotSet,
}

/// Sets (or with `None`, removes) one attribute in one level's config.toml, keeping the file's
/// comments and layout. Refused when the schema refuses the name, the level or the value
/// (`schema::check_in_level`), or when it would make a valid configuration invalid.
pub fn set_attribute(
    store: &Store,
    level: &Level,
    attribute: &str,
    value: Option<Value>,
) -> Result<SetOutcome, Error> {
    let path = parse_attribute_path(attribute)?;
    let file = level.file();
    let old_text = store.level_text(level)?;
    // Validate the current file first: edits to a malformed file are refused.
    let _: toml::Table = crate::store::parse_toml(&old_text, &file)?;
    let mut document: toml_edit::DocumentMut =
        old_text
            .parse()
            .map_err(|e: toml_edit::TomlError| Error::Toml {
                file: file.clone(),
                line: 1,
                column: 1,
                message: e.message().to_string(),
            })?;
    let outcome = match value {
        Some(value) => {
            let item = toml_edit::value(to_edit_value(&value));
            let mut table = document.as_table_mut();
            for segment in &path[..path.len() - 1] {
                let entry = table.entry(segment).or_insert_with(|| {
                    let mut t = toml_edit::Table::new();
                    t.set_implicit(true);
                    toml_edit::Item::Table(t)
                });
                table = entry.as_table_mut().ok_or_else(|| {
                    Error::Attribute(crate::model::attributes::AttributeInputError::Value {
                        attribute: attribute.to_string(),
                        message: format!("`{segment}` in `{file}` is not a table"),
                    })
                })?;
            }
            table.insert(&path[path.len() - 1], item);
            SetOutcome::Set
        }
        None => {
            let mut table = Some(document.as_table_mut());
            for segment in &path[..path.len() - 1] {
                table = table
                    .and_then(|t| t.get_mut(segment))
                    .and_then(|i| i.as_table_mut());
            }
            match table.and_then(|t| t.remove(&path[path.len() - 1])) {
                Some(_) => SetOutcome::Removed,
                None => return Ok(SetOutcome::NotSet),
            }
        }
    };
    let new_text = document.to_string();
    let new_table: toml::Table = crate::store::parse_toml(&new_text, &file)?;
    // The schema: a known name (or one of the user namespace), set at a level where it may be
    // set, with a value of its type. Removing needs no check.
    if outcome == SetOutcome::Set {
        if let Some(value) = new_table.get(&path[0]) {
            crate::model::schema::check_in_level(level, &path[0], value).map_err(|violation| {
                Error::Schema {
                    file: file.clone(),
                    violation,
                }
            })?;
        }
    }
    // Refuse a change that breaks a configuration that resolved before.
    let mut tree = store.load_tree()?;
    let valid_before = resolve(&tree).is_ok();
    match level {
        Level::Global => tree.global.attributes = new_table,
        Level::Site(site) => tree.sites.entry(site.clone()).or_default().attributes = new_table,
        Level::Node(site, node) => {
            tree.nodes
                .entry(NodeFullName {
                    site: site.clone(),
                    node: node.clone(),
                })
                .or_default()
                .attributes = new_table
        }
        Level::Default | Level::Generated => unreachable!("set applies to global, site or node"),
    }
    if valid_before {
        resolve(&tree)?;
    }
    store.write_level_text(level, &new_text)?;
    Ok(outcome)
}

fn to_edit_value(value: &Value) -> toml_edit::Value {
    match value {
        Value::String(s) => s.as_str().into(),
        Value::Integer(i) => (*i).into(),
        Value::Float(f) => (*f).into(),
        Value::Boolean(b) => (*b).into(),
        Value::Datetime(d) => d
            .to_string()
            .parse()
            .unwrap_or_else(|_| d.to_string().into()),
        Value::Array(items) => {
            let mut array = toml_edit::Array::new();
            for item in items {
                array.push(to_edit_value(item));
            }
            toml_edit::Value::Array(array)
        }
        Value::Table(table) => {
            let mut inline = toml_edit::InlineTable::new();
            for (k, v) in table {
                inline.insert(k, to_edit_value(v));
            }
            toml_edit::Value::InlineTable(inline)
        }
    }
}

/// Writes a node state directory: the node's identity (WireGuard key and recovery token 0600,
/// the controller's signing key) and its latest committed bundle in `incoming/`, which
/// `towalink-node` installs and activates on its first start. The same thing an image bakes in.
pub fn provision_node(
    store: &Store,
    node_ref: &NodeRef,
    dir: &std::path::Path,
) -> Result<(NodeAllocation, u32), Error> {
    use towalink_system::durable::{create_dir_all, write_atomic, IoError};
    let generated = store.load_generated()?;
    let node = generated.node(node_ref)?.clone();
    let full = node.full_name();
    let index = crate::store::versions::load_index(store)?;
    let latest = index
        .nodes
        .get(&full.to_string())
        .map(|e| e.latest)
        .ok_or_else(|| Error::NoVersion(full.clone()))?;
    // Everything is checked before the first write (node_identity may create keys).
    if store.contains(dir) {
        return Err(Error::Corrupt {
            file: dir.display().to_string(),
            message: "is inside the configuration directory, whose files go into git: choose another directory for the node's private key".into(),
        });
    }
    let identity_file = dir.join(towalink_bundle::identity::NODE_TOML);
    if let Some(existing) = towalink_system::durable::read_optional(&identity_file)? {
        let same = existing
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("node_id").and_then(Value::as_integer))
            == Some(i64::from(node.id));
        if !same {
            return Err(Error::Corrupt {
                file: identity_file.display().to_string(),
                message: format!("belongs to another node; refusing to provision {full} there"),
            });
        }
    }
    let (identity, node_secrets) = crate::store::keys::node_identity(store, &node)?;
    let identity_dir = dir.join(towalink_bundle::identity::IDENTITY_DIR);
    create_dir_all(&identity_dir)?;
    create_dir_all(&dir.join("incoming"))?;
    std::fs::set_permissions(
        &identity_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|e| IoError::new("cannot set mode of", &identity_dir, e))?;
    for file in towalink_bundle::identity::identity_files(
        &identity,
        node_secrets.wg_private_key.expose(),
        node_secrets.recovery_token.expose(),
    ) {
        write_atomic(&dir.join(file.path), &file.content, file.mode)?;
    }
    let bundle = crate::store::versions::bundle_path(store, &full, latest);
    let bytes = std::fs::read(&bundle).map_err(|e| IoError::new("cannot read", &bundle, e))?;
    let name = bundle.file_name().expect("bundle has a name");
    write_atomic(&dir.join("incoming").join(name), &bytes, 0o644)?;
    Ok((node, latest))
}
