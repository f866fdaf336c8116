//! Resolution: raw configuration tree → per-node effective attributes.
//!
//! Every level's file is checked against the schema (`crate::model::schema`: a value of the wrong
//! type is an error naming the file; a name outside the schema or a value at a level where it
//! is not meant to be set is a warning, so directories of earlier releases keep working), the
//! hierarchy is merged (defaults → global → site → node), known attributes are typed,
//! generated values (ids, AS number, loopbacks, public key) are added, the topology is
//! computed over all nodes and each node gets its `peers`. Pure: no file access.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use toml::{Table, Value};

use crate::model::allocation::{Generated, NodeAllocation};
use crate::model::attributes::{defaults, Level, Merged};
use crate::model::names::{NodeFullName, NodeRef, SiteName};
use crate::model::schema::{self, Violation, ViolationKind};
use crate::model::topology::{self, TopologyKind, TopologyNode};

/// One level's attributes and service files, as read from disk.
#[derive(Debug, Clone, Default)]
pub struct LevelConfig {
    pub attributes: Table,
    /// Service files and templates by file name.
    pub files: BTreeMap<String, String>,
}

/// Everything the configuration directory holds that resolution needs.
#[derive(Debug, Clone, Default)]
pub struct ConfigTree {
    pub global: LevelConfig,
    pub sites: BTreeMap<SiteName, LevelConfig>,
    pub nodes: BTreeMap<NodeFullName, LevelConfig>,
    pub generated: Generated,
}

/// A semantic error in the configuration, naming the attribute and the file that set it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("`{file}`: attribute `{attribute}` {message}")]
    Attribute {
        file: String,
        attribute: String,
        message: String,
    },
}

pub(crate) fn attribute_error(
    merged: &Merged,
    attribute: &str,
    message: impl Into<String>,
) -> ResolveError {
    ResolveError::Attribute {
        file: merged
            .origin(attribute)
            .map(Level::file)
            .unwrap_or_else(|| "built-in default".to_string()),
        attribute: attribute.to_string(),
        message: message.into(),
    }
}

/// A file sets a name outside the schema, a generated attribute, or an attribute at a level
/// where it is not meant to be set: allowed (earlier releases wrote such files), said once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaWarning {
    pub file: String,
    pub violation: Violation,
}

impl std::fmt::Display for SchemaWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let advice = match &self.violation.kind {
            ViolationKind::Unknown { .. } => format!(
                "templates still see it, but `tlm set` refuses such names: rename it `{}{}` (the namespace for attributes of your own)",
                schema::USER_PREFIX,
                self.violation.attribute()
            ),
            ViolationKind::Generated => "tlm replaces it with the generated value".to_string(),
            _ => "left as it is, but `tlm set` refuses it there".to_string(),
        };
        write!(f, "`{}`: {}; {advice}", self.file, self.violation)
    }
}

/// Checks each level's own file against the schema: values of the wrong type are errors
/// naming the file, other findings warnings.
pub fn check_files(tree: &ConfigTree) -> Result<Vec<SchemaWarning>, ResolveError> {
    let levels = std::iter::once((Level::Global, &tree.global))
        .chain(
            tree.sites
                .iter()
                .map(|(site, config)| (Level::Site(site.clone()), config)),
        )
        .chain(
            tree.nodes
                .iter()
                .map(|(node, config)| (Level::Node(node.site.clone(), node.node.clone()), config)),
        );
    let mut warnings = Vec::new();
    for (level, config) in levels {
        for (name, value) in &config.attributes {
            if let Err(violation) = schema::check_in_level(&level, name, value) {
                if violation.is_value() {
                    return Err(ResolveError::Attribute {
                        file: level.file(),
                        attribute: violation.attribute(),
                        message: violation.message(),
                    });
                }
                warnings.push(SchemaWarning {
                    file: level.file(),
                    violation,
                });
            }
        }
    }
    Ok(warnings)
}

/// A value of the complete attributes the schema refuses (a record lacking a field), naming
/// the file that set it.
pub(crate) fn complete_error(merged: &Merged, violation: &Violation) -> ResolveError {
    ResolveError::Attribute {
        file: merged
            .origin_of_path(&violation.path)
            .map(Level::file)
            .unwrap_or_else(|| "built-in default".to_string()),
        attribute: violation.attribute(),
        message: violation.message(),
    }
}

/// The typed attributes resolution and the data plane rely on.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub allocation: NodeAllocation,
    pub site_id: u32,
    pub asn: u32,
    pub loopback_ipv4: Ipv4Addr,
    pub loopback_ipv6: Ipv6Addr,
    pub port_base: u32,
    pub keepalive: u32,
    pub mtu: u32,
    pub endpoint: Option<String>,
}

/// One peer link as the node sees it; rendered into `peers` for the templates and node.toml
/// (the contract's type: the controller writes what the node decodes).
pub use towalink_bundle::contract::Peer;

/// The whole installation resolved: merged attributes per node, settings and links.
#[derive(Debug)]
pub struct Resolved {
    merged: BTreeMap<u32, Merged>,
    settings: BTreeMap<u32, NodeSettings>,
    peers: BTreeMap<u32, Vec<u32>>,
    links: BTreeSet<topology::Link>,
    warnings: Vec<SchemaWarning>,
    /// `generated/config.toml`'s `signing_keys` (empty before any signing-key rotation).
    signing_keys: Vec<String>,
}

/// Merges the hierarchy for a site (defaults → global → site).
pub fn merge_site(tree: &ConfigTree, site: &SiteName) -> Merged {
    let defaults = defaults();
    let empty = Table::new();
    let site_attributes = tree.sites.get(site).map_or(&empty, |l| &l.attributes);
    Merged::from_layers([
        (Level::Default, &defaults),
        (Level::Global, &tree.global.attributes),
        (Level::Site(site.clone()), site_attributes),
    ])
}

/// Merges the hierarchy for a node (defaults → global → site → node).
pub fn merge_node(tree: &ConfigTree, node: &NodeFullName, defaults: &Table) -> Merged {
    let empty = Table::new();
    let site_attributes = tree.sites.get(&node.site).map_or(&empty, |l| &l.attributes);
    let node_attributes = tree.nodes.get(node).map_or(&empty, |l| &l.attributes);
    Merged::from_layers([
        (Level::Default, defaults),
        (Level::Global, &tree.global.attributes),
        (Level::Site(node.site.clone()), site_attributes),
        (
            Level::Node(node.site.clone(), node.node.clone()),
            node_attributes,
        ),
    ])
}

/// Resolves every node of the installation.
pub fn resolve(tree: &ConfigTree) -> Result<Resolved, ResolveError> {
    let warnings = check_files(tree)?;
    let defaults = defaults();
    let mut merged = BTreeMap::new();
    let mut settings = BTreeMap::new();
    let mut topology_nodes = Vec::with_capacity(tree.generated.nodes.len());
    for allocation in &tree.generated.nodes {
        let full = allocation.full_name();
        let attributes = merge_node(tree, &full, &defaults);
        schema::check_complete(&attributes.values)
            .map_err(|violation| complete_error(&attributes, &violation))?;
        let site = tree
            .generated
            .site(full.site.as_str())
            .map_err(|e| attribute_error(&attributes, "site", e.to_string()))?;
        let node_settings = NodeSettings {
            allocation: allocation.clone(),
            site_id: site.id,
            asn: optional_u32(&attributes, "asn")?.unwrap_or(site.asn),
            loopback_ipv4: optional_parsed(&attributes, "loopback_ipv4", "an IPv4 address")?
                .unwrap_or(allocation.loopback_ipv4),
            loopback_ipv6: optional_parsed(&attributes, "loopback_ipv6", "an IPv6 address")?
                .unwrap_or(allocation.loopback_ipv6),
            port_base: required_u32(&attributes, "wg_listen_port_base")?,
            keepalive: required_u32(&attributes, "wg_keepalive")?,
            mtu: required_u32(&attributes, "wg_mtu")?,
            endpoint: optional_string(&attributes, "wg_endpoint")?,
        };
        check_pool::<ipnet::Ipv4Net>(&attributes, "loopback_ipv4_pool")?;
        check_pool::<ipnet::Ipv6Net>(&attributes, "loopback_ipv6_pool")?;
        required_u32(&attributes, "asn_base")?;
        topology_nodes.push(topology_node(tree, allocation, &attributes)?);
        merged.insert(allocation.id, attributes);
        settings.insert(allocation.id, node_settings);
    }
    let links = topology::links(&topology_nodes);
    let peers = topology::peers_by_node(&links);
    for (id, peer_ids) in &peers {
        let node = &settings[id];
        for peer in peer_ids {
            if topology::listen_port(node.port_base, *peer).is_none() {
                return Err(attribute_error(
                    &merged[id],
                    "wg_listen_port_base",
                    format!(
                        "is too high: the port for peer node {peer} would exceed 65535 on node {}",
                        node.allocation.full_name()
                    ),
                ));
            }
        }
    }
    Ok(Resolved {
        merged,
        settings,
        peers,
        links,
        warnings,
        signing_keys: tree.generated.signing_keys.clone(),
    })
}

fn topology_node(
    tree: &ConfigTree,
    allocation: &NodeAllocation,
    attributes: &Merged,
) -> Result<TopologyNode, ResolveError> {
    let kind_text = required_string(attributes, "topology")?;
    let kind = kind_text.parse::<TopologyKind>().map_err(|()| {
        attribute_error(
            attributes,
            "topology",
            format!("is `{kind_text}`: use mesh, star or none"),
        )
    })?;
    let groups = string_list(attributes, "groups")?;
    let mut links = Vec::new();
    for text in string_list(attributes, "links")? {
        let node_ref: NodeRef = text.parse().map_err(|e: crate::model::names::NameError| {
            attribute_error(attributes, "links", e.to_string())
        })?;
        let peer = tree.generated.node(&node_ref).map_err(|_| {
            attribute_error(attributes, "links", format!("names unknown node `{text}`"))
        })?;
        if peer.id == allocation.id {
            return Err(attribute_error(
                attributes,
                "links",
                format!("links node `{text}` to itself"),
            ));
        }
        links.push(peer.id);
    }
    Ok(TopologyNode {
        id: allocation.id,
        name: allocation.full_name(),
        kind,
        groups: groups.into_iter().collect(),
        hub_group: required_string(attributes, "hub_group")?,
        links,
    })
}

impl Resolved {
    /// What the schema warns about in the files (see [`SchemaWarning`]).
    pub fn warnings(&self) -> &[SchemaWarning] {
        &self.warnings
    }

    pub fn links(&self) -> &BTreeSet<topology::Link> {
        &self.links
    }

    pub fn settings(&self, node_id: u32) -> Option<&NodeSettings> {
        self.settings.get(&node_id)
    }

    pub fn merged(&self, node_id: u32) -> Option<&Merged> {
        self.merged.get(&node_id)
    }

    /// The ids of a node's peers, in the order of [`Resolved::peers`].
    pub fn peer_ids(&self, node_id: u32) -> &[u32] {
        self.peers.get(&node_id).map_or(&[], Vec::as_slice)
    }

    /// The peers of a node with every per-link value.
    pub fn peers(&self, node_id: u32) -> Vec<Peer> {
        self.peers
            .get(&node_id)
            .into_iter()
            .flatten()
            .filter_map(|peer_id| self.peer_of(node_id, *peer_id))
            .collect()
    }

    /// A link of [`Resolved::links`] as its lower node sees it (its entry in that node's
    /// [`Resolved::peers`]), made alone: listing every link costs what it prints.
    pub fn link_peer(&self, link: &topology::Link) -> Option<Peer> {
        self.peer_of(link.low, link.high)
    }

    /// `peer_id` as `node_id`'s peer (the two are linked).
    fn peer_of(&self, node_id: u32, peer_id: u32) -> Option<Peer> {
        let node = self.settings.get(&node_id)?;
        let peer = self.settings.get(&peer_id)?;
        let peer_port =
            topology::listen_port(peer.port_base, node_id).expect("checked in resolve()");
        Some(Peer {
            interface: topology::interface_name(peer_id),
            peer_id,
            peer_node: peer.allocation.name.to_string(),
            peer_site: peer.allocation.site.to_string(),
            peer_asn: peer.asn,
            peer_loopback_ipv4: peer.loopback_ipv4,
            peer_loopback_ipv6: peer.loopback_ipv6,
            peer_public_key: peer.allocation.wg_public_key.clone(),
            peer_endpoint: peer.endpoint.as_ref().map(|host| {
                if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]:{peer_port}")
                } else {
                    format!("{host}:{peer_port}")
                }
            }),
            peer_endpoint_ip: peer.endpoint.as_ref().and_then(|host| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            }),
            listen_port: topology::listen_port(node.port_base, peer_id)
                .expect("checked in resolve()"),
            peer_port,
            local_link_local: topology::link_local(node_id, peer_id),
            peer_link_local: topology::link_local(peer_id, node_id),
            keepalive: node.keepalive,
            mtu: node.mtu.min(peer.mtu),
        })
    }

    /// The complete attributes of a node: merged hierarchy plus generated values (no peers).
    pub fn complete_attributes(&self, node_id: u32) -> Option<Merged> {
        let node = self.settings.get(&node_id)?;
        let mut merged = self.merged.get(&node_id)?.clone();
        let generated = [
            ("node_id", Value::Integer(i64::from(node_id))),
            ("node_name", Value::String(node.allocation.name.to_string())),
            ("site_name", Value::String(node.allocation.site.to_string())),
            ("site_id", Value::Integer(i64::from(node.site_id))),
            (
                "wg_public_key",
                Value::String(node.allocation.wg_public_key.clone()),
            ),
        ];
        for (key, value) in generated {
            merged.set(key, value, Level::Generated);
        }
        // Only once a signing key was rotated: versions of unchanged nodes stay byte for byte.
        if !self.signing_keys.is_empty() {
            let keys = self.signing_keys.iter().cloned().map(Value::String);
            merged.set(
                "signing_keys",
                Value::Array(keys.collect()),
                Level::Generated,
            );
        }
        // The controller's underlay addresses, for the templates' filters: the data plane
        // must never route the management link's own packets into a tunnel.
        let controller_ips = crate::model::management::controller_endpoint_ips(
            merged.values.get("controller_endpoint"),
        );
        merged.set(
            "controller_endpoint_ips",
            Value::Array(
                controller_ips
                    .iter()
                    .map(|ip| Value::String(ip.to_string()))
                    .collect(),
            ),
            Level::Generated,
        );
        // Values the user may override keep the user's origin.
        let overridable = [
            ("asn", Value::Integer(i64::from(node.asn))),
            (
                "loopback_ipv4",
                Value::String(node.loopback_ipv4.to_string()),
            ),
            (
                "loopback_ipv6",
                Value::String(node.loopback_ipv6.to_string()),
            ),
        ];
        for (key, value) in overridable {
            if !merged.values.contains_key(key) {
                merged.set(key, value, Level::Generated);
            } else {
                merged.values.insert(key.to_string(), value);
            }
        }
        Some(merged)
    }

    /// The effective attributes of a node: its complete attributes (without those only the
    /// controller uses) and, apart, its typed `peers` (not made into TOML values: a node of
    /// a large mesh has hundreds).
    pub fn effective_attributes(&self, node_id: u32, complete: &Merged) -> Effective {
        let mut attributes = complete.values.clone();
        // A `peers` set by hand in a file (a warning) is replaced by the generated one.
        attributes
            .retain(|name, _| name != "peers" && !super::schema::CONTROLLER_ONLY.contains(&name));
        Effective {
            attributes,
            peers: self.peers(node_id).into(),
        }
    }
}

/// A node's effective attributes: what its templates see and its node.toml holds.
#[derive(Debug, Clone)]
pub struct Effective {
    /// Every attribute but `peers`.
    pub attributes: Table,
    /// `peers`, in [`Resolved::peers`]'s order.
    pub peers: std::sync::Arc<[Peer]>,
}

fn get<'a>(merged: &'a Merged, key: &str) -> Option<&'a Value> {
    merged.values.get(key)
}

fn required_string(merged: &Merged, key: &str) -> Result<String, ResolveError> {
    optional_string(merged, key)?.ok_or_else(|| attribute_error(merged, key, "is missing"))
}

fn optional_string(merged: &Merged, key: &str) -> Result<Option<String>, ResolveError> {
    match get(merged, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(attribute_error(
            merged,
            key,
            format!("must be a string, not {}", other.type_str()),
        )),
    }
}

fn string_list(merged: &Merged, key: &str) -> Result<Vec<String>, ResolveError> {
    match get(merged, key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(attribute_error(
                    merged,
                    key,
                    format!("must be a list of strings, found {}", other.type_str()),
                )),
            })
            .collect(),
        Some(other) => Err(attribute_error(
            merged,
            key,
            format!("must be a list of strings, not {}", other.type_str()),
        )),
    }
}

/// An integer attribute within its range in the schema (which fits a u32).
fn optional_u32(merged: &Merged, key: &str) -> Result<Option<u32>, ResolveError> {
    let (min, max) = schema::integer_range(key).expect("an integer attribute of the schema");
    match get(merged, key) {
        None => Ok(None),
        Some(Value::Integer(n)) if (min..=max).contains(n) => u32::try_from(*n)
            .map(Some)
            .map_err(|_| attribute_error(merged, key, "does not fit 32 bits")),
        Some(_) => Err(attribute_error(
            merged,
            key,
            format!("must be an integer from {min} to {max}"),
        )),
    }
}

fn required_u32(merged: &Merged, key: &str) -> Result<u32, ResolveError> {
    optional_u32(merged, key)?.ok_or_else(|| attribute_error(merged, key, "is missing"))
}

fn optional_parsed<T: std::str::FromStr>(
    merged: &Merged,
    key: &str,
    what: &str,
) -> Result<Option<T>, ResolveError> {
    match optional_string(merged, key)? {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| attribute_error(merged, key, format!("is `{text}`, not {what}"))),
    }
}

fn check_pool<T: std::str::FromStr>(merged: &Merged, key: &str) -> Result<(), ResolveError> {
    optional_parsed::<T>(merged, key, "a prefix like 10.254.0.0/16")?;
    Ok(())
}

/// Reads the pools and AS base a new site or node would be allocated from.
pub fn allocation_settings(
    merged: &Merged,
) -> Result<(crate::model::allocation::Pools, u32), ResolveError> {
    let ipv4: ipnet::Ipv4Net = optional_parsed(merged, "loopback_ipv4_pool", "an IPv4 prefix")?
        .ok_or_else(|| attribute_error(merged, "loopback_ipv4_pool", "is missing"))?;
    let ipv6: ipnet::Ipv6Net = optional_parsed(merged, "loopback_ipv6_pool", "an IPv6 prefix")?
        .ok_or_else(|| attribute_error(merged, "loopback_ipv6_pool", "is missing"))?;
    let asn_base = required_u32(merged, "asn_base")?;
    Ok((crate::model::allocation::Pools { ipv4, ipv6 }, asn_base))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand_core::OsRng;

    /// A tree of these sites and nodes, allocated, with nothing set.
    pub(crate) fn tree(sites: &[(&str, &[&str])]) -> ConfigTree {
        let mut tree = ConfigTree::default();
        let pools = crate::model::allocation::Pools {
            ipv4: "10.254.0.0/16".parse().unwrap(),
            ipv6: "fd00::/64".parse().unwrap(),
        };
        for (site, nodes) in sites {
            tree.generated
                .add_site(site.parse().unwrap(), 4_200_000_000)
                .unwrap();
            for node in *nodes {
                tree.generated
                    .add_node(
                        format!("{node}.{site}").parse().unwrap(),
                        &pools,
                        &mut OsRng,
                    )
                    .unwrap();
            }
        }
        tree
    }

    #[test]
    fn peers_set_by_hand_are_replaced_by_the_generated_ones() {
        let mut t = tree(&[("a", &["x"]), ("b", &["y"])]);
        t.global.attributes.insert(
            "peers".into(),
            Value::Array(vec![Value::String("x".into())]),
        );
        let r = resolve(&t).unwrap();
        assert!(
            r.warnings().iter().any(|w| w.to_string().contains("peers")),
            "{:?}",
            r.warnings()
        );
        let complete = r.complete_attributes(1).unwrap();
        let effective = r.effective_attributes(1, &complete);
        assert!(!effective.attributes.contains_key("peers"));
        assert_eq!(effective.peers.len(), 1);
        let node: NodeFullName = "x.a".parse().unwrap();
        let rendered = crate::model::render::Renderer::new(&t)
            .render(&node, &complete, &effective, None)
            .unwrap();
        let text = rendered.files.get(crate::model::render::NODE_TOML).unwrap();
        let config =
            towalink_bundle::contract::NodeConfig::from_toml(std::str::from_utf8(text).unwrap())
                .unwrap();
        assert_eq!(config.peers, effective.peers.to_vec());
    }

    #[test]
    fn peers_carry_both_sides_of_the_link() {
        let mut t = tree(&[("a", &["x"]), ("b", &["y"])]);
        let mut node_attrs = Table::new();
        node_attrs.insert("wg_endpoint".into(), Value::String("2001:db8::2".into()));
        t.nodes.insert(
            "y.b".parse().unwrap(),
            LevelConfig {
                attributes: node_attrs,
                files: BTreeMap::new(),
            },
        );
        let r = resolve(&t).unwrap();
        let peers = r.peers(1);
        assert_eq!(peers.len(), 1);
        let p = &peers[0];
        assert_eq!(p.interface, "tlwg2");
        assert_eq!(p.listen_port, 51822);
        assert_eq!(p.peer_port, 51821);
        assert_eq!(p.peer_endpoint.as_deref(), Some("[2001:db8::2]:51821"));
        assert_eq!(p.peer_asn, 4_200_000_002);
        let back = &r.peers(2)[0];
        assert_eq!(back.peer_link_local, p.local_link_local);
        assert_eq!(back.peer_endpoint, None);
    }

    #[test]
    fn a_link_alone_is_what_its_lower_node_lists_among_its_peers() {
        let t = tree(&[("a", &["x", "y"]), ("b", &["z", "w"])]);
        let r = resolve(&t).unwrap();
        assert_eq!(
            r.links().len(),
            4,
            "each node linked to both of the other site"
        );
        for link in r.links() {
            let listed = r
                .peers(link.low)
                .into_iter()
                .find(|p| p.peer_id == link.high)
                .unwrap();
            assert_eq!(r.link_peer(link), Some(listed));
        }
    }

    #[test]
    fn bad_attribute_names_file_and_attribute() {
        let mut t = tree(&[("a", &["x"])]);
        let mut site = Table::new();
        site.insert("topology".into(), Value::String("ring".into()));
        t.sites.insert(
            "a".parse().unwrap(),
            LevelConfig {
                attributes: site,
                files: BTreeMap::new(),
            },
        );
        let err = resolve(&t).unwrap_err().to_string();
        assert_eq!(
            err,
            r#"`site_a/config.toml`: attribute `topology` must be one of "mesh", "star", "none", not "ring""#
        );
    }

    #[test]
    fn files_are_checked_against_the_schema() {
        let mut t = tree(&[("a", &["x"])]);
        t.global
            .attributes
            .insert("syslog".into(), Value::String("192.0.2.1".into()));
        t.global
            .attributes
            .insert("user_motd".into(), Value::String("hi".into()));
        let warnings: Vec<String> = resolve(&t)
            .unwrap()
            .warnings()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "`config.toml`: attribute `syslog` is unknown; templates still see it"
            ),
            "{warnings:?}"
        );
        let mut site = Table::new();
        site.insert("bird_bfd_interval_ms".into(), Value::String("fast".into()));
        t.sites.insert(
            "a".parse().unwrap(),
            LevelConfig {
                attributes: site,
                files: BTreeMap::new(),
            },
        );
        assert_eq!(
            resolve(&t).unwrap_err().to_string(),
            r#"`site_a/config.toml`: attribute `bird_bfd_interval_ms` must be an integer from 1 to 60000 (milliseconds), not "fast""#
        );
    }

    #[test]
    fn unknown_link_is_an_error() {
        let mut t = tree(&[("a", &["x"])]);
        t.global.attributes.insert(
            "links".into(),
            Value::Array(vec![Value::String("ghost.a".into())]),
        );
        let err = resolve(&t).unwrap_err().to_string();
        assert!(
            err.contains("`config.toml`: attribute `links` names unknown node `ghost.a`"),
            "{err}"
        );
    }
}
