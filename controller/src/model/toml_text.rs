//! TOML text exactly as `toml::to_string` writes a table, for what `towalink/node.toml` is made
//! of, at a fraction of the cost (a node of a 1,000-node mesh has 999 peer tables; `toml`
//! builds an editable document of them first). Byte-for-byte equality matters: a version's
//! content digest covers node.toml, so another spelling would make a new version of every node.
//!
//! The subset written here: integers, booleans, strings of printable ASCII without `"` or
//! `\`, arrays of those, tables, and arrays of tables, under keys of printable ASCII without
//! quotes or backslashes. Anything else (floats, dates, escapes, other characters) is written by
//! `toml::to_string` itself. The property test below compares the two on random tables.
//!
//! The layout `toml` 0.8 gives a table: the root's plain values first (`key = value`), then
//! every table depth-first in key order, each with its `[header]` (hidden for a table that has
//! only tables in it) or `[[header]]` and its plain values, a blank line before every header
//! but a first one that opens the text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use toml::Value;

use crate::model::resolve::Peer;

/// `toml::to_string` of the table made of these entries (keys unique, in order).
pub fn to_string(table: &BTreeMap<&str, &Value>) -> Result<String, toml::ser::Error> {
    match fast(table, None) {
        Some(text) => Ok(text),
        None => toml::to_string(table),
    }
}

/// `toml::to_string` of the table made of these entries and, under `peers` (not among them),
/// the peers as serde makes them into TOML: written from their type, without TOML values.
pub fn to_string_with_peers(
    table: &BTreeMap<&str, &Value>,
    peers: &[Peer],
) -> Result<String, toml::ser::Error> {
    if let Some(text) = fast(table, Some(peers)) {
        return Ok(text);
    }
    let peers = Value::try_from(peers)?;
    let mut all = table.clone();
    all.insert("peers", &peers);
    toml::to_string(&all)
}

/// The text, or `None` when the table holds something outside the subset.
fn fast(table: &BTreeMap<&str, &Value>, peers: Option<&[Peer]>) -> Option<String> {
    let mut writer = Writer {
        out: String::with_capacity(4096 + peers.map_or(0, |p| p.len() * 400)),
        path: Vec::new(),
        first_header: true,
    };
    let mut entries: Vec<(&str, Item)> = table.iter().map(|(k, v)| (*k, Item::Toml(v))).collect();
    if let Some(peers) = peers {
        if table.contains_key("peers") {
            return None;
        }
        let at = entries.partition_point(|(key, _)| *key < "peers");
        entries.insert(at, ("peers", Item::Peers(peers)));
    }
    writer.table(&entries, false)?;
    Some(writer.out)
}

struct Writer<'a> {
    out: String,
    path: Vec<&'a str>,
    first_header: bool,
}

/// A value of a table: TOML's own, or the typed peers.
#[derive(Clone, Copy)]
enum Item<'a> {
    Toml(&'a Value),
    Peers(&'a [Peer]),
}

/// How `toml` writes a value found in a table.
enum Kind<'a> {
    Plain,
    Table(&'a toml::Table),
    ArrayOfTables(&'a [Value]),
    Peers(&'a [Peer]),
}

fn kind(item: Item<'_>) -> Kind<'_> {
    match item {
        Item::Toml(Value::Table(table)) => Kind::Table(table),
        Item::Toml(Value::Array(items))
            if !items.is_empty() && items.iter().all(Value::is_table) =>
        {
            Kind::ArrayOfTables(items)
        }
        Item::Peers(peers) if !peers.is_empty() => Kind::Peers(peers),
        _ => Kind::Plain,
    }
}

impl<'a> Writer<'a> {
    /// One table: its header (unless it is the root), its plain values, then its tables.
    fn table(&mut self, entries: &[(&'a str, Item<'a>)], array_element: bool) -> Option<()> {
        let has_plain = entries.iter().any(|(_, v)| matches!(kind(*v), Kind::Plain));
        let is_empty = entries.is_empty();
        if self.path.is_empty() {
            if has_plain {
                self.first_header = false;
            }
        } else if array_element || has_plain || is_empty {
            self.header(array_element)?;
        }
        for &(key, item) in entries {
            if let Kind::Plain = kind(item) {
                push_key(&mut self.out, key)?;
                self.out.push_str(" = ");
                match item {
                    Item::Toml(value) => push_value(&mut self.out, value, true)?,
                    Item::Peers(_) => self.out.push_str("[]"),
                }
                self.out.push('\n');
            }
        }
        for &(key, item) in entries {
            match kind(item) {
                Kind::Plain => {}
                Kind::Table(table) => {
                    self.path.push(key);
                    self.table(&entries_of(table), false)?;
                    self.path.pop();
                }
                Kind::ArrayOfTables(items) => {
                    for item in items {
                        let table = item.as_table().expect("kind() checked");
                        self.path.push(key);
                        self.table(&entries_of(table), true)?;
                        self.path.pop();
                    }
                }
                Kind::Peers(peers) => {
                    for peer in peers {
                        self.path.push(key);
                        self.header(true)?;
                        self.path.pop();
                        push_peer(&mut self.out, peer)?;
                    }
                }
            }
        }
        Some(())
    }

    /// `[path]` or `[[path]]`, after a blank line unless it opens the text.
    fn header(&mut self, array_element: bool) -> Option<()> {
        if !std::mem::take(&mut self.first_header) {
            self.out.push('\n');
        }
        let (open, close) = if array_element {
            ("[[", "]]")
        } else {
            ("[", "]")
        };
        self.out.push_str(open);
        for (i, key) in self.path.iter().enumerate() {
            if i > 0 {
                self.out.push('.');
            }
            push_key(&mut self.out, key)?;
        }
        self.out.push_str(close);
        self.out.push('\n');
        Some(())
    }
}

fn entries_of(table: &toml::Table) -> Vec<(&str, Item<'_>)> {
    table
        .iter()
        .map(|(k, v)| (k.as_str(), Item::Toml(v)))
        .collect()
}

/// A peer's values as serde makes them into a TOML table: keys sorted, addresses as strings,
/// absent optional fields left out. The property test compares this with `toml`'s text of
/// the peers as TOML values, so a field added to [`Peer`] and not here fails it.
fn push_peer(out: &mut String, peer: &Peer) -> Option<()> {
    let string = |out: &mut String, key: &str, text: &str| {
        if !text.chars().all(plain_char) {
            return None;
        }
        let _ = writeln!(out, "{key} = \"{text}\"");
        Some(())
    };
    let display = |out: &mut String, key: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{key} = \"{value}\"");
    };
    let integer = |out: &mut String, key: &str, value: i64| {
        let _ = writeln!(out, "{key} = {value}");
    };
    string(out, "interface", &peer.interface)?;
    integer(out, "keepalive", peer.keepalive.into());
    integer(out, "listen_port", peer.listen_port.into());
    display(out, "local_link_local", &peer.local_link_local);
    integer(out, "mtu", peer.mtu.into());
    integer(out, "peer_asn", peer.peer_asn.into());
    if let Some(endpoint) = &peer.peer_endpoint {
        string(out, "peer_endpoint", endpoint)?;
    }
    if let Some(ip) = &peer.peer_endpoint_ip {
        display(out, "peer_endpoint_ip", ip);
    }
    integer(out, "peer_id", peer.peer_id.into());
    display(out, "peer_link_local", &peer.peer_link_local);
    display(out, "peer_loopback_ipv4", &peer.peer_loopback_ipv4);
    display(out, "peer_loopback_ipv6", &peer.peer_loopback_ipv6);
    string(out, "peer_node", &peer.peer_node)?;
    integer(out, "peer_port", peer.peer_port.into());
    string(out, "peer_public_key", &peer.peer_public_key)?;
    string(out, "peer_site", &peer.peer_site)
}

/// A character `toml` writes as it is in a basic string or a quoted key.
fn plain_char(c: char) -> bool {
    matches!(c, ' '..='~') && c != '"' && c != '\\'
}

fn push_key(out: &mut String, key: &str) -> Option<()> {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        out.push_str(key);
        return Some(());
    }
    // `toml` quotes other keys; a key with a quote or backslash may get a literal string.
    if !key.chars().all(plain_char) || key.contains('\'') {
        return None;
    }
    out.push('"');
    out.push_str(key);
    out.push('"');
    Some(())
}

fn push_value(out: &mut String, value: &Value, top: bool) -> Option<()> {
    match value {
        Value::String(s) if s.chars().all(plain_char) => {
            out.push('"');
            out.push_str(s);
            out.push('"');
        }
        Value::Integer(n) => {
            write!(out, "{n}").expect("writing to a String");
        }
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Array(items) if top => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_value(out, item, false)?;
            }
            out.push(']');
        }
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(table: &toml::Table) -> BTreeMap<&str, &Value> {
        table.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }

    /// Keys `toml_text` writes itself (bare or quoted), and keys it leaves to `toml`.
    const SUBSET_KEYS: [&str; 6] = ["a", "peers", "b-c_9", "bird*.conf", "d.e", "x y"];
    const OTHER_KEYS: [&str; 4] = ["", "it's", "q\"k", "é"];

    fn key() -> impl Strategy<Value = String> {
        let all: Vec<&str> = SUBSET_KEYS.iter().chain(&OTHER_KEYS).copied().collect();
        proptest::sample::select(all).prop_map(String::from)
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            "[ -~]{0,12}".prop_map(Value::String),
            "[a-z\"'\\\\\n\té]{0,6}".prop_map(Value::String),
            any::<i64>().prop_map(Value::Integer),
            any::<bool>().prop_map(Value::Boolean),
            prop_oneof![Just(1.0f64), Just(-0.5), Just(1e300)].prop_map(Value::Float),
        ]
    }

    /// A table of up to 3 `inner` values under `key`s.
    fn table_of(
        key: impl Strategy<Value = String>,
        inner: impl Strategy<Value = Value>,
    ) -> impl Strategy<Value = Value> {
        proptest::collection::btree_map(key, inner, 0..4)
            .prop_map(|m| Value::Table(m.into_iter().collect()))
    }

    fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                table_of(key(), inner.clone()),
                proptest::collection::vec(table_of(key(), inner), 1..3).prop_map(Value::Array),
            ]
        })
    }

    /// Keys and values within the subset only.
    fn subset_key() -> impl Strategy<Value = String> {
        proptest::sample::select(SUBSET_KEYS.to_vec()).prop_map(String::from)
    }

    fn subset_value() -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            "[ !#-\\[\\]-~]{0,12}".prop_map(Value::String),
            any::<i64>().prop_map(Value::Integer),
            any::<bool>().prop_map(Value::Boolean),
        ];
        scalar.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(
                    prop_oneof![
                        "[a-z0-9:./ ]{0,8}".prop_map(Value::String),
                        any::<i64>().prop_map(Value::Integer)
                    ],
                    0..4
                )
                .prop_map(Value::Array),
                table_of(subset_key(), inner.clone()),
                proptest::collection::vec(table_of(subset_key(), inner), 1..3)
                    .prop_map(Value::Array),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Within the subset, the text is written here, and it is `toml::to_string`'s.
        #[test]
        fn the_subset_is_written_here_as_toml_would(entries in proptest::collection::btree_map(subset_key(), subset_value(), 0..6)) {
            let table: toml::Table = entries.into_iter().collect();
            let view = view(&table);
            let text = fast(&view, None);
            prop_assert!(text.is_some(), "{:?}", table);
            prop_assert_eq!(text.unwrap(), toml::to_string(&view).unwrap());
        }

        /// Whatever the table, the text is `toml::to_string`'s.
        #[test]
        fn the_text_is_tomls(entries in proptest::collection::btree_map(key(), value(), 0..6)) {
            let table: toml::Table = entries.into_iter().collect();
            let view = view(&table);
            prop_assert_eq!(to_string(&view).unwrap(), toml::to_string(&view).unwrap());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Typed peers are written as `toml` writes them as TOML values among the attributes.
        #[test]
        fn typed_peers_are_written_as_toml_would(
            entries in proptest::collection::btree_map(subset_key(), subset_value(), 0..6),
            peers in proptest::collection::vec(crate::model::template_context::strategies::peer(), 0..4),
        ) {
            let table: toml::Table = entries.into_iter().collect();
            let view = view(&table);
            let as_values = Value::try_from(&peers).unwrap();
            let mut all = view.clone();
            all.insert("peers", &as_values);
            prop_assert_eq!(to_string_with_peers(&view, &peers).unwrap(), toml::to_string(&all).unwrap());
            let plain = peers.iter().all(|p| p.peer_endpoint.as_deref().is_none_or(|e| e.chars().all(plain_char)));
            if plain && !table.contains_key("peers") {
                prop_assert!(fast(&view, Some(&peers)).is_some(), "written here: {:?}", peers);
            }
        }
    }

    #[test]
    fn node_toml_is_written_without_toml() {
        let text = include_str!("../../../tests/fixtures/node-toml-contract1/r1.s1.toml");
        let table: toml::Table = text.parse().unwrap();
        let view = view(&table);
        let fast = fast(&view, None).expect("node.toml is within the subset");
        assert_eq!(fast, toml::to_string(&view).unwrap());
        assert!(fast.contains("[[peers]]"), "{fast}");
    }
}
