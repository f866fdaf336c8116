//! What a node's files are rendered from, as one digest per node.
//!
//! Rendering is a pure function of: the node's complete attributes (the merged hierarchy and
//! its generated values), the files of the level it takes them from, its management link, its
//! peer list, and, for each peer, the peer's own settings (what [`Resolved::peers`] copies into
//! the link). [`input_digests`] hashes exactly these, so two equal digests render the same
//! bytes with the same renderer; a commit re-renders only the nodes whose digest differs from
//! the one recorded when their latest content was rendered (`crate::store::versions`).
//!
//! Cost: linear in the nodes and their links, with no rendering: each node's settings are
//! hashed once and a node's peers contribute a 4-byte id and that 32-byte digest each.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};
use toml::Value;

use crate::model::management::VersionManagement;
use crate::model::render::FileSetDigests;
use crate::model::resolve::{ConfigTree, NodeSettings, Resolved};

/// A node's input digest, in hex.
pub type InputDigest = String;

/// The input digest of every resolved node, by node id. `renderer` names the code that renders
/// (a digest made by another build of `tlm` must not match).
pub fn input_digests(
    tree: &ConfigTree,
    resolved: &Resolved,
    management: Option<&VersionManagement>,
    renderer: &str,
) -> BTreeMap<u32, InputDigest> {
    let published: BTreeMap<u32, [u8; 32]> = tree
        .generated
        .nodes
        .iter()
        .filter_map(|node| {
            let settings = resolved.settings(node.id)?;
            Some((node.id, settings_digest(settings)))
        })
        .collect();
    let mut files = FileSetDigests::new(tree);
    let mut digests = BTreeMap::new();
    for node in &tree.generated.nodes {
        let Some(complete) = resolved.complete_attributes(node.id) else {
            continue;
        };
        let mut feed = Feed::default();
        feed.text(renderer);
        // The node's own settings: its id, name, keys, addresses, ports.
        feed.bytes(&published[&node.id]);
        feed.table(&complete.values);
        feed.bytes(&files.digest(&node.full_name()));
        match management.and_then(|m| m.for_node(node.id)) {
            None => feed.text("no management link"),
            Some(link) => feed.text(&serde_json::to_string(&link).expect("serializes")),
        }
        let peers = resolved.peer_ids(node.id);
        feed.number(u32::try_from(peers.len()).unwrap_or(u32::MAX));
        for peer in peers {
            feed.number(*peer);
            feed.bytes(published.get(peer).map_or(&[0; 32], |d| d));
        }
        digests.insert(node.id, hex::encode(feed.hasher.finalize()));
    }
    digests
}

/// Every setting a peer's link entry is made from (the destructuring fails to compile when a
/// field is added and not hashed here).
fn settings_digest(settings: &NodeSettings) -> [u8; 32] {
    let NodeSettings {
        allocation,
        site_id,
        asn,
        loopback_ipv4,
        loopback_ipv6,
        port_base,
        keepalive,
        mtu,
        endpoint,
    } = settings;
    let crate::model::allocation::NodeAllocation {
        id,
        site,
        name,
        loopback_ipv4: allocated_ipv4,
        loopback_ipv6: allocated_ipv6,
        wg_public_key,
        wg_public_key_previous,
    } = allocation;
    let mut feed = Feed::default();
    for number in [*id, *site_id, *asn, *port_base, *keepalive, *mtu] {
        feed.number(number);
    }
    for text in [
        site.as_str(),
        name.as_str(),
        &loopback_ipv4.to_string(),
        &loopback_ipv6.to_string(),
        &allocated_ipv4.to_string(),
        &allocated_ipv6.to_string(),
        wg_public_key,
        wg_public_key_previous.as_deref().unwrap_or("-"),
        endpoint.as_deref().unwrap_or("-"),
    ] {
        feed.text(text);
    }
    feed.hasher.finalize().into()
}

/// Feeds values into a hash unambiguously: every variable-length part carries its length,
/// every value its type.
#[derive(Default)]
struct Feed {
    hasher: Sha256,
}

impl Feed {
    fn bytes(&mut self, bytes: &[u8]) {
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    fn text(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn number(&mut self, number: u32) {
        self.hasher.update(number.to_le_bytes());
    }

    fn table(&mut self, table: &toml::Table) {
        self.hasher.update((table.len() as u64).to_le_bytes());
        for (key, value) in table {
            self.text(key);
            self.value(value);
        }
    }

    fn value(&mut self, value: &Value) {
        match value {
            Value::String(s) => {
                self.hasher.update(b"s");
                self.text(s);
            }
            Value::Integer(n) => {
                self.hasher.update(b"i");
                self.hasher.update(n.to_le_bytes());
            }
            Value::Float(f) => {
                self.hasher.update(b"f");
                self.hasher.update(f.to_bits().to_le_bytes());
            }
            Value::Boolean(b) => self.hasher.update(if *b { b"T" } else { b"F" }),
            Value::Datetime(d) => {
                self.hasher.update(b"d");
                self.text(&d.to_string());
            }
            Value::Array(items) => {
                self.hasher.update(b"a");
                self.hasher.update((items.len() as u64).to_le_bytes());
                for item in items {
                    self.value(item);
                }
            }
            Value::Table(table) => {
                self.hasher.update(b"t");
                self.table(table);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resolve::{resolve, LevelConfig};

    fn tree() -> ConfigTree {
        let mut tree =
            crate::model::resolve::tests::tree(&[("a", &["x", "y"]), ("b", &["x", "y"])]);
        tree.global
            .files
            .insert("bird.conf.jinja".into(), "{{ asn }}\n".into());
        tree
    }

    fn digests(tree: &ConfigTree) -> BTreeMap<u32, InputDigest> {
        input_digests(tree, &resolve(tree).unwrap(), None, "test")
    }

    fn node_level<'a>(tree: &'a mut ConfigTree, node: &str) -> &'a mut LevelConfig {
        tree.nodes.entry(node.parse().unwrap()).or_default()
    }

    /// Ids of the nodes whose digest differs between two trees.
    fn changed(before: &ConfigTree, after: &ConfigTree) -> Vec<u32> {
        let (a, b) = (digests(before), digests(after));
        b.iter()
            .filter(|(id, d)| a.get(id) != Some(d))
            .map(|(id, _)| *id)
            .collect()
    }

    #[test]
    fn a_node_only_attribute_changes_that_node_alone() {
        let before = tree();
        let mut after = before.clone();
        node_level(&mut after, "x.a")
            .attributes
            .insert("bird_bfd_interval_ms".into(), Value::Integer(150));
        assert_eq!(changed(&before, &after), vec![1]);
    }

    #[test]
    fn a_published_value_changes_the_node_and_its_peers() {
        let before = tree();
        let mut after = before.clone();
        node_level(&mut after, "x.a")
            .attributes
            .insert("wg_endpoint".into(), Value::String("192.0.2.1".into()));
        // Nodes 1 and 2 are in site a, 3 and 4 in site b: a mesh links across sites only.
        assert_eq!(changed(&before, &after), vec![1, 3, 4]);
    }

    #[test]
    fn files_change_the_nodes_that_see_them() {
        let before = tree();
        let mut after = before.clone();
        node_level(&mut after, "y.b")
            .files
            .insert("bird.conf.jinja".into(), "{{ asn }} mine\n".into());
        assert_eq!(changed(&before, &after), vec![4]);
        let mut global = before.clone();
        global
            .global
            .files
            .insert("extra.conf".into(), "x\n".into());
        assert_eq!(changed(&before, &global), vec![1, 2, 3, 4]);
        assert_eq!(
            digests(&before),
            digests(&before.clone()),
            "the same tree, the same digests"
        );
    }
}
