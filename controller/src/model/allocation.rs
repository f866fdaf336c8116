//! Generated configuration: what `tlm` allocates once and never changes afterwards.
//!
//! Site ids and AS numbers, node ids, loopback addresses and WireGuard key pairs. Ids come from
//! counters that only grow, so a removed node's id is never given to another node; addresses
//! are the lowest free ones of the pool at the time of allocation and stay with the node.
//! Adding or removing a node never changes anything allocated to another node.
//!
//! Per-link values (listen ports, IPv6 link-local addresses, interface names) are pure functions
//! of the two node ids (see [`crate::model::topology`]), so they are as stable as the ids.
//!
//! Pure: randomness comes in as an RNG; reading and writing the files is the store's job.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};

use crate::model::names::{NodeFullName, NodeName, NodeRef, SiteName};
use towalink_system::durable::Secret;

/// Why an allocation or lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("site `{0}` already exists")]
    DuplicateSite(SiteName),
    #[error("node `{0}` already exists")]
    DuplicateNode(NodeFullName),
    #[error("unknown site `{0}`")]
    UnknownSite(String),
    #[error("unknown node `{0}`")]
    UnknownNode(String),
    #[error("loopback pool `{pool}` (attribute `{attribute}`) has no free address left")]
    PoolExhausted {
        attribute: &'static str,
        pool: String,
    },
    #[error("site `{site}` still has nodes ({nodes}); remove them first")]
    SiteNotEmpty { site: SiteName, nodes: String },
    #[error("AS number {0} is out of range: lower `asn_base`")]
    AsnOverflow(u64),
}

/// Everything allocated, stored in `generated/config.toml` (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generated {
    pub next_site_id: u32,
    pub next_node_id: u32,
    /// The controller keys versions tell their nodes to trust (`tlm rotate signing-key`): the
    /// current and the next while a rotation lasts, then the new one. Empty (every directory
    /// before the first rotation): versions name none and nodes trust their identity's key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<String>,
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteAllocation>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeAllocation>,
}

impl Default for Generated {
    fn default() -> Self {
        Generated {
            next_site_id: 1,
            next_node_id: 1,
            signing_keys: Vec::new(),
            sites: Vec::new(),
            nodes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteAllocation {
    pub name: SiteName,
    pub id: u32,
    pub asn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAllocation {
    pub id: u32,
    pub site: SiteName,
    pub name: NodeName,
    pub loopback_ipv4: Ipv4Addr,
    pub loopback_ipv6: Ipv6Addr,
    pub wg_public_key: String,
    /// The key `tlm rotate node` replaced: `tlm serve` still lets the node reach it with
    /// this one until the node has been heard on the new one (docs/recovery.md, "Rotating a
    /// node's keys"). Absent for a node never rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key_previous: Option<String>,
}

impl NodeAllocation {
    pub fn full_name(&self) -> NodeFullName {
        NodeFullName {
            site: self.site.clone(),
            node: self.name.clone(),
        }
    }
}

/// The secrets, stored in `generated/secrets.toml` (mode 0600, not in git).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeSecrets>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSecrets {
    pub id: u32,
    pub wg_private_key: Secret,
    pub recovery_token: Secret,
}

/// A new recovery token: 32 random bytes in hex.
pub fn new_recovery_token(rng: &mut impl rand_core::RngCore) -> Secret {
    let mut token = [0u8; 32];
    rng.fill_bytes(&mut token);
    Secret::new(hex::encode(token))
}

/// The address pools new nodes draw from.
#[derive(Debug, Clone)]
pub struct Pools {
    pub ipv4: ipnet::Ipv4Net,
    pub ipv6: ipnet::Ipv6Net,
}

impl Generated {
    pub fn site(&self, name: &str) -> Result<&SiteAllocation, AllocationError> {
        self.sites
            .iter()
            .find(|s| s.name.as_str() == name)
            .ok_or_else(|| AllocationError::UnknownSite(name.to_string()))
    }

    pub fn node(&self, node_ref: &NodeRef) -> Result<&NodeAllocation, AllocationError> {
        let found = match node_ref {
            NodeRef::Id(id) => self.nodes.iter().find(|n| n.id == *id),
            NodeRef::Name(full) => self
                .nodes
                .iter()
                .find(|n| n.site == full.site && n.name == full.node),
        };
        found.ok_or_else(|| AllocationError::UnknownNode(node_ref.to_string()))
    }

    pub fn nodes_of<'a>(&'a self, site: &'a SiteName) -> impl Iterator<Item = &'a NodeAllocation> {
        self.nodes.iter().filter(move |n| &n.site == site)
    }

    /// Allocates a site id and its AS number.
    pub fn add_site(
        &mut self,
        name: SiteName,
        asn_base: u32,
    ) -> Result<&SiteAllocation, AllocationError> {
        if self.sites.iter().any(|s| s.name == name) {
            return Err(AllocationError::DuplicateSite(name));
        }
        let id = self.next_site_id;
        let asn = u64::from(asn_base) + u64::from(id);
        let asn = u32::try_from(asn)
            .ok()
            .filter(|a| *a < u32::MAX)
            .ok_or(AllocationError::AsnOverflow(asn))?;
        self.next_site_id += 1;
        self.sites.push(SiteAllocation { name, id, asn });
        Ok(self.sites.last().expect("just pushed"))
    }

    /// Allocates a node: id, loopbacks, WireGuard key pair and recovery token.
    pub fn add_node(
        &mut self,
        full: NodeFullName,
        pools: &Pools,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(NodeAllocation, NodeSecrets), AllocationError> {
        self.site(full.site.as_str())?;
        if self
            .nodes
            .iter()
            .any(|n| n.site == full.site && n.name == full.node)
        {
            return Err(AllocationError::DuplicateNode(full));
        }
        let used4: HashSet<Ipv4Addr> = self.nodes.iter().map(|n| n.loopback_ipv4).collect();
        let used6: HashSet<Ipv6Addr> = self.nodes.iter().map(|n| n.loopback_ipv6).collect();
        let loopback_ipv4 = pools
            .ipv4
            .hosts()
            .find(|a| !used4.contains(a))
            .ok_or_else(|| AllocationError::PoolExhausted {
                attribute: "loopback_ipv4_pool",
                pool: pools.ipv4.to_string(),
            })?;
        // Skip the subnet-router anycast address (the pool's first address).
        let loopback_ipv6 = pools
            .ipv6
            .hosts()
            .skip(1)
            .find(|a| !used6.contains(a))
            .ok_or_else(|| AllocationError::PoolExhausted {
                attribute: "loopback_ipv6_pool",
                pool: pools.ipv6.to_string(),
            })?;
        let (private, public) = wireguard_key_pair(rng);
        let id = self.next_node_id;
        self.next_node_id += 1;
        let node = NodeAllocation {
            id,
            site: full.site,
            name: full.node,
            loopback_ipv4,
            loopback_ipv6,
            wg_public_key: public,
            wg_public_key_previous: None,
        };
        self.nodes.push(node.clone());
        let secrets = NodeSecrets {
            id,
            wg_private_key: private,
            recovery_token: new_recovery_token(rng),
        };
        Ok((node, secrets))
    }

    /// Forgets a node. Its id is never reused; its addresses become free.
    pub fn remove_node(&mut self, node_ref: &NodeRef) -> Result<NodeAllocation, AllocationError> {
        let id = self.node(node_ref)?.id;
        let index = self
            .nodes
            .iter()
            .position(|n| n.id == id)
            .expect("found above");
        Ok(self.nodes.remove(index))
    }

    /// Forgets a site that has no nodes.
    pub fn remove_site(&mut self, name: &SiteName) -> Result<SiteAllocation, AllocationError> {
        self.site(name.as_str())?;
        let nodes: Vec<String> = self.nodes_of(name).map(|n| n.name.to_string()).collect();
        if !nodes.is_empty() {
            return Err(AllocationError::SiteNotEmpty {
                site: name.clone(),
                nodes: nodes.join(", "),
            });
        }
        let index = self
            .sites
            .iter()
            .position(|s| &s.name == name)
            .expect("found above");
        Ok(self.sites.remove(index))
    }
}

/// Gives a node a new WireGuard key pair (`tlm rotate node`): the replaced public key is kept
/// as the previous one (a rotation before the node took the last one keeps the key the node
/// still runs with: the previous key is only replaced once it is the proven one, see
/// `tlm serve`).
pub fn rotate_wireguard_key(
    node: &mut NodeAllocation,
    secrets: &mut NodeSecrets,
    keep_previous: bool,
    rng: &mut impl CryptoRngCore,
) {
    let (private, public) = wireguard_key_pair(rng);
    let replaced = std::mem::replace(&mut node.wg_public_key, public);
    if !keep_previous || node.wg_public_key_previous.is_none() {
        node.wg_public_key_previous = Some(replaced);
    }
    secrets.wg_private_key = private;
}

/// The public half (base64) of a WireGuard private key (base64); none when it is not one.
pub fn public_key_of(private: &Secret) -> Option<String> {
    let bytes: [u8; 32] = BASE64
        .decode(private.expose().trim())
        .ok()?
        .try_into()
        .ok()?;
    let secret = x25519_dalek::StaticSecret::from(bytes);
    Some(BASE64.encode(x25519_dalek::PublicKey::from(&secret).as_bytes()))
}

/// A fresh WireGuard (x25519) key pair: (private, public), base64 as `wg` prints them.
pub fn wireguard_key_pair(rng: &mut impl CryptoRngCore) -> (Secret, String) {
    let secret = x25519_dalek::StaticSecret::random_from_rng(rng);
    let public = x25519_dalek::PublicKey::from(&secret);
    (
        Secret::new(BASE64.encode(secret.to_bytes())),
        BASE64.encode(public.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    fn pools() -> Pools {
        Pools {
            ipv4: "10.254.0.0/29".parse().unwrap(),
            ipv6: "fd00::/120".parse().unwrap(),
        }
    }

    fn full(node: &str, site: &str) -> NodeFullName {
        format!("{node}.{site}").parse().unwrap()
    }

    #[test]
    fn allocates_lowest_free_and_never_reuses_ids() {
        let mut g = Generated::default();
        g.add_site("a".parse().unwrap(), 4_200_000_000).unwrap();
        let (n1, _) = g.add_node(full("x", "a"), &pools(), &mut OsRng).unwrap();
        let (n2, _) = g.add_node(full("y", "a"), &pools(), &mut OsRng).unwrap();
        assert_eq!((n1.id, n2.id), (1, 2));
        assert_eq!(n1.loopback_ipv4, "10.254.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(n1.loopback_ipv6, "fd00::1".parse::<Ipv6Addr>().unwrap());
        g.remove_node(&NodeRef::Id(1)).unwrap();
        let (n3, _) = g.add_node(full("z", "a"), &pools(), &mut OsRng).unwrap();
        assert_eq!(n3.id, 3, "ids are never reused");
        assert_eq!(
            n3.loopback_ipv4, n1.loopback_ipv4,
            "freed address is reused"
        );
        assert_eq!(g.site("a").unwrap().asn, 4_200_000_001);
    }

    #[test]
    fn errors_name_the_thing() {
        let mut g = Generated::default();
        g.add_site("a".parse().unwrap(), 0).unwrap();
        assert_eq!(
            g.add_site("a".parse().unwrap(), 0).unwrap_err().to_string(),
            "site `a` already exists"
        );
        g.add_node(full("x", "a"), &pools(), &mut OsRng).unwrap();
        assert!(matches!(
            g.add_node(full("x", "a"), &pools(), &mut OsRng),
            Err(AllocationError::DuplicateNode(_))
        ));
        assert!(matches!(
            g.add_node(full("x", "b"), &pools(), &mut OsRng),
            Err(AllocationError::UnknownSite(_))
        ));
        assert!(matches!(
            g.remove_site(&"a".parse().unwrap()),
            Err(AllocationError::SiteNotEmpty { .. })
        ));
        // A /29 has 6 hosts.
        for i in 0..5 {
            g.add_node(full(&format!("n{i}"), "a"), &pools(), &mut OsRng)
                .unwrap();
        }
        assert!(matches!(
            g.add_node(full("full", "a"), &pools(), &mut OsRng),
            Err(AllocationError::PoolExhausted { .. })
        ));
    }

    #[test]
    fn key_pair_matches() {
        let (private, public) = wireguard_key_pair(&mut OsRng);
        let bytes: [u8; 32] = BASE64.decode(private.expose()).unwrap().try_into().unwrap();
        let derived = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(bytes));
        assert_eq!(BASE64.encode(derived.as_bytes()), public);
    }

    #[derive(Debug, Clone)]
    enum Op {
        AddSite(u8),
        AddNode(u8, u8),
        RemoveNode(u8),
        RemoveSite(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4).prop_map(Op::AddSite),
            (0u8..12, 0u8..4).prop_map(|(n, s)| Op::AddNode(n, s)),
            (0u8..30).prop_map(Op::RemoveNode),
            (0u8..4).prop_map(Op::RemoveSite),
        ]
    }

    proptest! {
        /// Whatever sequence of additions and removals: nothing allocated to a node that stays
        /// ever changes, ids are unique and never reused, addresses are unique.
        #[test]
        fn allocation_is_stable(ops in proptest::collection::vec(op(), 1..60)) {
            let pools = Pools { ipv4: "10.0.0.0/24".parse().unwrap(), ipv6: "fd00::/64".parse().unwrap() };
            let mut g = Generated::default();
            let mut ever_ids = HashSet::new();
            for op in ops {
                let before = g.clone();
                let result = match op {
                    Op::AddSite(s) => g.add_site(format!("s{s}").parse().unwrap(), 64512).map(|_| ()),
                    Op::AddNode(n, s) => g.add_node(full(&format!("n{n}"), &format!("s{s}")), &pools, &mut OsRng).map(|(node, _)| {
                        assert!(ever_ids.insert(node.id), "id {} reused", node.id);
                    }),
                    Op::RemoveNode(id) => g.remove_node(&NodeRef::Id(u32::from(id))).map(|_| ()),
                    Op::RemoveSite(s) => g.remove_site(&format!("s{s}").parse().unwrap()).map(|_| ()),
                };
                if result.is_err() {
                    prop_assert_eq!(&g, &before, "a failed operation changes nothing");
                }
                for node in &before.nodes {
                    if let Some(now) = g.nodes.iter().find(|n| n.id == node.id) {
                        prop_assert_eq!(now, node);
                    }
                }
                for site in &before.sites {
                    if let Some(now) = g.sites.iter().find(|s| s.id == site.id) {
                        prop_assert_eq!(now, site);
                    }
                }
                let v4: HashSet<_> = g.nodes.iter().map(|n| n.loopback_ipv4).collect();
                let v6: HashSet<_> = g.nodes.iter().map(|n| n.loopback_ipv6).collect();
                prop_assert_eq!(v4.len(), g.nodes.len());
                prop_assert_eq!(v6.len(), g.nodes.len());
            }
        }
    }
}
