//! Which nodes are linked, and the per-link values derived from the two node ids.
//!
//! Each node states what it wants by its attributes: `topology` (`mesh`, `star`, `none`),
//! `groups`, `hub_group` and `links`. A link between two nodes exists when either end wants it:
//!
//! - `mesh`: every node of another site;
//! - `star`: every hub of another site (a hub is a node whose `groups` contain the asking node's
//!   `hub_group`); a hub itself wants every node of another site;
//! - `none`: nothing;
//! - in every topology, the nodes listed in `links` (`<node>.<site>`, any site).
//!
//! Pure: attribute values in, a sorted set of links out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;

use crate::model::names::{NodeFullName, SiteName};

/// How a node picks its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyKind {
    Mesh,
    Star,
    None,
}

impl std::str::FromStr for TopologyKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "mesh" => Ok(TopologyKind::Mesh),
            "star" => Ok(TopologyKind::Star),
            "none" => Ok(TopologyKind::None),
            _ => Err(()),
        }
    }
}

/// One node's topology attributes.
#[derive(Debug, Clone)]
pub struct TopologyNode {
    pub id: u32,
    pub name: NodeFullName,
    pub kind: TopologyKind,
    pub groups: BTreeSet<String>,
    pub hub_group: String,
    /// Extra peers from the `links` attribute, already resolved to node ids.
    pub links: Vec<u32>,
}

impl TopologyNode {
    fn site(&self) -> &SiteName {
        &self.name.site
    }
}

/// A link between two nodes, `low < high` by node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Link {
    pub low: u32,
    pub high: u32,
}

impl Link {
    pub fn new(a: u32, b: u32) -> Link {
        Link {
            low: a.min(b),
            high: a.max(b),
        }
    }
}

/// All links of an installation.
pub fn links(nodes: &[TopologyNode]) -> BTreeSet<Link> {
    let mut result = BTreeSet::new();
    // Group by site so a mesh or a hub pairs with "every node of another site" cheaply.
    for (i, a) in nodes.iter().enumerate() {
        for &peer in &a.links {
            if peer != a.id {
                result.insert(Link::new(a.id, peer));
            }
        }
        for b in &nodes[i + 1..] {
            if a.site() != b.site() && (wants(a, b) || wants(b, a)) {
                result.insert(Link::new(a.id, b.id));
            }
        }
    }
    result
}

fn wants(a: &TopologyNode, b: &TopologyNode) -> bool {
    match a.kind {
        TopologyKind::Mesh => true,
        TopologyKind::Star => a.groups.contains(&a.hub_group) || b.groups.contains(&a.hub_group),
        TopologyKind::None => false,
    }
}

/// The peers of every node, sorted by peer id.
pub fn peers_by_node(links: &BTreeSet<Link>) -> BTreeMap<u32, Vec<u32>> {
    let mut map: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for link in links {
        map.entry(link.low).or_default().push(link.high);
        map.entry(link.high).or_default().push(link.low);
    }
    for peers in map.values_mut() {
        peers.sort_unstable();
    }
    map
}

/// Name of the WireGuard interface on a node for its link to `peer_id`: `tlwg<peer id>`.
pub fn interface_name(peer_id: u32) -> String {
    format!("tlwg{peer_id}")
}

/// The UDP port a node listens on for its link to `peer_id`.
pub fn listen_port(port_base: u32, peer_id: u32) -> Option<u16> {
    u16::try_from(port_base.checked_add(peer_id)?).ok()
}

/// The IPv6 link-local address of `node_id` on its link to `peer_id`: `fe80::<node>:<peer>`
/// with both ids split into 16-bit groups, unique per link and side.
pub fn link_local(node_id: u32, peer_id: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        (node_id >> 16) as u16,
        node_id as u16,
        (peer_id >> 16) as u16,
        peer_id as u16,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32, site: &str, kind: TopologyKind, groups: &[&str]) -> TopologyNode {
        TopologyNode {
            id,
            name: format!("n{id}.{site}").parse().unwrap(),
            kind,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            hub_group: "hubs".into(),
            links: vec![],
        }
    }

    fn pairs(links: &BTreeSet<Link>) -> Vec<(u32, u32)> {
        links.iter().map(|l| (l.low, l.high)).collect()
    }

    #[test]
    fn mesh_links_all_sites_but_not_within_a_site() {
        let nodes = vec![
            node(1, "a", TopologyKind::Mesh, &[]),
            node(2, "a", TopologyKind::Mesh, &[]),
            node(3, "b", TopologyKind::Mesh, &[]),
            node(4, "c", TopologyKind::Mesh, &[]),
        ];
        assert_eq!(
            pairs(&links(&nodes)),
            vec![(1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
        );
    }

    #[test]
    fn star_links_spokes_to_hubs_and_hubs_together() {
        let nodes = vec![
            node(1, "hq", TopologyKind::Star, &["hubs"]),
            node(2, "dc", TopologyKind::Star, &["hubs"]),
            node(3, "b", TopologyKind::Star, &[]),
            node(4, "c", TopologyKind::Star, &[]),
        ];
        assert_eq!(
            pairs(&links(&nodes)),
            vec![(1, 2), (1, 3), (1, 4), (2, 3), (2, 4)]
        );
    }

    #[test]
    fn custom_links_add_to_any_topology() {
        let mut a = node(1, "a", TopologyKind::None, &[]);
        a.links = vec![3, 1];
        let nodes = vec![
            a,
            node(2, "b", TopologyKind::None, &[]),
            node(3, "a", TopologyKind::None, &[]),
        ];
        assert_eq!(pairs(&links(&nodes)), vec![(1, 3)]);
    }

    #[test]
    fn per_link_values() {
        assert_eq!(interface_name(12), "tlwg12");
        assert_eq!(listen_port(51820, 5), Some(51825));
        assert_eq!(listen_port(65535, 1), None);
        assert_eq!(link_local(3, 70000).to_string(), "fe80::3:1:1170");
        assert_ne!(link_local(1, 2), link_local(2, 1));
    }
}
