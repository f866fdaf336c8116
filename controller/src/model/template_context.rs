//! What a template sees: every effective attribute as a variable, `peers` among them.
//!
//! The peers are the contract's typed [`Peer`]s, shown to the templates as mappings whose
//! fields are made when a template reads them. A node of a 1,000-node mesh has 999 peers and
//! its templates read a few fields of each: building every peer as a map of values first cost
//! more than rendering. A peer behaves as the map of its fields that serde makes of it (the
//! same keys in the same order, the same values; an absent optional field is no key): the
//! tests compare the two on random peers, field by field and through a template using the
//! map operations templates use.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};

use crate::model::resolve::{Effective, Peer};

/// The template context of one node: its attributes and its peers.
pub fn context(effective: &Effective) -> Value {
    let mut root: BTreeMap<String, Value> = effective
        .attributes
        .iter()
        .map(|(key, value)| (key.clone(), Value::from_serialize(value)))
        .collect();
    let peers = &effective.peers;
    let peers: Vec<Value> = (0..peers.len())
        .map(|index| {
            Value::from_object(PeerFields {
                peers: peers.clone(),
                index,
            })
        })
        .collect();
    root.insert("peers".to_string(), Value::from(peers));
    Value::from(root)
}

/// The field names of a peer, in the order serde's maps keep them (sorted).
const FIELDS: [&str; 16] = [
    "interface",
    "keepalive",
    "listen_port",
    "local_link_local",
    "mtu",
    "peer_asn",
    "peer_endpoint",
    "peer_endpoint_ip",
    "peer_id",
    "peer_link_local",
    "peer_loopback_ipv4",
    "peer_loopback_ipv6",
    "peer_node",
    "peer_port",
    "peer_public_key",
    "peer_site",
];

/// One peer of a node, as a mapping of its fields.
#[derive(Debug)]
struct PeerFields {
    peers: Arc<[Peer]>,
    index: usize,
}

impl PeerFields {
    fn peer(&self) -> &Peer {
        &self.peers[self.index]
    }

    /// A field's value as serde's map of the peer holds it (integers as i64, addresses as
    /// text); `None` for an absent optional field or a name that is no field.
    fn field(&self, name: &str) -> Option<Value> {
        let peer = self.peer();
        let text = |value: &dyn std::fmt::Display| Value::from(value.to_string());
        Some(match name {
            "interface" => Value::from(peer.interface.as_str()),
            "keepalive" => Value::from(i64::from(peer.keepalive)),
            "listen_port" => Value::from(i64::from(peer.listen_port)),
            "local_link_local" => text(&peer.local_link_local),
            "mtu" => Value::from(i64::from(peer.mtu)),
            "peer_asn" => Value::from(i64::from(peer.peer_asn)),
            "peer_endpoint" => Value::from(peer.peer_endpoint.as_deref()?),
            "peer_endpoint_ip" => text(peer.peer_endpoint_ip.as_ref()?),
            "peer_id" => Value::from(i64::from(peer.peer_id)),
            "peer_link_local" => text(&peer.peer_link_local),
            "peer_loopback_ipv4" => text(&peer.peer_loopback_ipv4),
            "peer_loopback_ipv6" => text(&peer.peer_loopback_ipv6),
            "peer_node" => Value::from(peer.peer_node.as_str()),
            "peer_port" => Value::from(i64::from(peer.peer_port)),
            "peer_public_key" => Value::from(peer.peer_public_key.as_str()),
            "peer_site" => Value::from(peer.peer_site.as_str()),
            _ => return None,
        })
    }

    fn present(&self) -> impl Iterator<Item = &'static str> + '_ {
        let peer = self.peer();
        FIELDS.into_iter().filter(move |name| match *name {
            "peer_endpoint" => peer.peer_endpoint.is_some(),
            "peer_endpoint_ip" => peer.peer_endpoint_ip.is_some(),
            _ => true,
        })
    }
}

impl Object for PeerFields {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.field(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        self.field(key)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let pairs: Vec<(Value, Value)> = self
            .present()
            .map(|name| {
                let value = self.field(name).expect("a present field has a value");
                (Value::from(name), value)
            })
            .collect();
        Enumerator::KeyValueIter(Box::new(pairs.into_iter()))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.present().count())
    }
}

/// Random peers, for the property tests here and in `toml_text`.
#[cfg(test)]
pub(crate) mod strategies {
    use super::Peer;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    pub(crate) fn peer() -> impl Strategy<Value = Peer> {
        let names = "[a-z][a-z0-9-]{0,8}";
        (
            (any::<u32>(), names, names, any::<u32>(), any::<u32>()),
            (
                any::<u128>(),
                "[A-Za-z0-9+/]{43}=",
                any::<u16>(),
                any::<u16>(),
            ),
            (
                proptest::option::of(prop_oneof![
                    4 => "[a-z0-9.:\\[\\]]{1,20}",
                    1 => "[a-z\"\\\\é]{1,4}",
                ]),
                proptest::option::of(prop_oneof![
                    any::<u32>().prop_map(|ip| IpAddr::V4(Ipv4Addr::from(ip))),
                    any::<u128>().prop_map(|ip| IpAddr::V6(Ipv6Addr::from(ip))),
                ]),
                any::<u128>(),
                any::<u128>(),
                any::<u32>(),
                any::<u32>(),
            ),
        )
            .prop_map(
                |(
                    (peer_id, peer_node, peer_site, peer_asn, v4),
                    (v6, peer_public_key, listen_port, peer_port),
                    (peer_endpoint, endpoint_ip, local, remote, keepalive, mtu),
                )| Peer {
                    interface: format!("tlwg{peer_id}"),
                    peer_id,
                    peer_node,
                    peer_site,
                    peer_asn,
                    peer_loopback_ipv4: Ipv4Addr::from(v4),
                    peer_loopback_ipv6: Ipv6Addr::from(v6),
                    peer_public_key,
                    peer_endpoint,
                    peer_endpoint_ip: endpoint_ip,
                    listen_port,
                    peer_port,
                    local_link_local: Ipv6Addr::from(local),
                    peer_link_local: Ipv6Addr::from(remote),
                    keepalive,
                    mtu,
                },
            )
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::peer;
    use super::*;
    use minijinja::Environment;
    use proptest::prelude::*;
    use toml::Table;

    fn typed_context(attributes: &Table, peers: &[Peer]) -> Value {
        context(&Effective {
            attributes: attributes.clone(),
            peers: Arc::from(peers.to_vec()),
        })
    }

    /// The context as it was made before: the attributes with `peers` as TOML values,
    /// converted by serde.
    fn serde_context(attributes: &Table, peers: &[Peer]) -> Value {
        let mut table = attributes.clone();
        table.insert(
            "peers".into(),
            toml::Value::try_from(peers).expect("peers serialize"),
        );
        Value::from_serialize(&table)
    }

    /// A template reading the peers every way a template can.
    const EVERY_USE: &str = r#"{{ peers|length }} {{ peers is sequence }} {{ peers }}
{% for peer in peers %}{{ loop.index }} {{ peer }} {{ peer|length }} {{ peer is mapping }}
{% for k, v in peer|items %}{{ k }}={{ v }} {{ v is number }} {{ v is string }};{% endfor %}
{% for k in peer %}{{ k }},{% endfor %} {{ peer|dictsort }} {{ peer.peer_endpoint is defined }}
{{ peer.peer_endpoint|default("none") }} {{ peer["peer_id"] + 1 }} {{ peer.mtu // 2 }}
{{ peer == peers[loop.index0] }} {{ peer.nonexistent is defined }} {{ "peer_asn" in peer }}
{% endfor %}{{ peers|map(attribute="peer_id")|list }} {{ peers|sort(attribute="peer_asn")|map(attribute="interface")|join(",") }}
{{ peers|selectattr("peer_endpoint", "defined")|list|length }} {{ asn }} {{ loopback_ipv4 }}
"#;

    fn render(context: &Value) -> String {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template("t", EVERY_USE).unwrap();
        env.get_template("t").unwrap().render(context).unwrap()
    }

    fn attributes() -> Table {
        "asn = 4200000001\nloopback_ipv4 = \"10.0.0.1\"\nfile_targets = { x = { directory = \"/x\" } }"
            .parse()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// A peer holds the keys and values serde's map of it holds, in the same order.
        #[test]
        fn a_peer_is_the_map_serde_makes_of_it(peers in proptest::collection::vec(peer(), 0..4)) {
            let attributes = attributes();
            let typed = typed_context(&attributes, &peers);
            let serde = serde_context(&attributes, &peers);
            let typed_peers = typed.get_attr("peers").unwrap();
            let serde_peers = serde.get_attr("peers").unwrap();
            prop_assert_eq!(typed_peers.len(), serde_peers.len());
            for (typed, serde) in typed_peers.try_iter().unwrap().zip(serde_peers.try_iter().unwrap()) {
                let typed_keys: Vec<Value> = typed.try_iter().unwrap().collect();
                let serde_keys: Vec<Value> = serde.try_iter().unwrap().collect();
                prop_assert_eq!(&typed_keys, &serde_keys);
                for key in &serde_keys {
                    let (t, s) = (typed.get_item(key).unwrap(), serde.get_item(key).unwrap());
                    prop_assert_eq!(t.kind(), s.kind(), "{}", key);
                    prop_assert_eq!(t, s, "{}", key);
                }
                prop_assert!(typed.get_attr("no_such_field").unwrap().is_undefined());
            }
        }

        /// A template that reads the peers every way renders the same from both contexts.
        #[test]
        fn templates_render_as_from_serdes_map(peers in proptest::collection::vec(peer(), 0..4)) {
            let attributes = attributes();
            prop_assert_eq!(
                render(&typed_context(&attributes, &peers)),
                render(&serde_context(&attributes, &peers))
            );
        }
    }

    #[test]
    fn every_field_is_named_once_in_serdes_order() {
        let mut sorted = FIELDS;
        sorted.sort_unstable();
        assert_eq!(sorted, FIELDS);
        assert!(FIELDS.windows(2).all(|w| w[0] != w[1]));
    }
}
