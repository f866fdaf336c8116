//! Incremental commit = full commit: after any sequence of edits, each followed by a commit
//! that skips the nodes whose inputs did not change, rendering every node afresh finds each
//! one byte-identical (same content digest) to its latest version.

use proptest::prelude::*;
use toml::Value;

use super::commit::node_states;
use super::{commit, load_index};
use crate::model::attributes::Level;
use crate::model::names::NodeRef;
use crate::store::{installation, Store};

const SITES: [&str; 3] = ["s0", "s1", "s2"];

#[derive(Debug, Clone)]
enum Op {
    /// `tlm set <level> <attribute> <value>`; refused values change nothing.
    Set(u8, u8, u8),
    /// `tlm set <level> <attribute> empty`.
    Unset(u8, u8),
    /// Writes (or, with `None`, removes) a template of a site or node level.
    Template(u8, Option<u8>),
    AddNode(u8, u8),
    RemoveNode(u8),
    /// `tlm commit node <id>` before the `commit all` that follows every step.
    CommitOne(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, 0u8..ATTRIBUTES.len() as u8, 0u8..3).prop_map(|(l, a, v)| Op::Set(l, a, v)),
        1 => (0u8..8, 0u8..ATTRIBUTES.len() as u8).prop_map(|(l, a)| Op::Unset(l, a)),
        2 => (0u8..8, proptest::option::of(0u8..2)).prop_map(|(l, v)| Op::Template(l, v)),
        1 => (0u8..6, 0u8..3).prop_map(|(n, s)| Op::AddNode(n, s)),
        1 => (1u8..12).prop_map(Op::RemoveNode),
        1 => (1u8..12).prop_map(Op::CommitOne),
    ]
}

/// Attributes that reach a node's own files, its peers' files (published values), the
/// topology, the management link, or only the controller; three values each.
const ATTRIBUTES: [(&str, [&str; 3]); 12] = [
    ("bird_bfd_interval_ms", ["100", "200", "300"]),
    ("wg_endpoint", ["192.0.2.1", "192.0.2.2", "router.example"]),
    ("wg_mtu", ["1380", "1420", "1300"]),
    ("wg_keepalive", ["10", "25", "0"]),
    ("topology", ["mesh", "star", "none"]),
    ("groups", ["[\"hubs\"]", "[]", "[\"hubs\", \"x\"]"]),
    ("asn", ["4200000100", "4200000200", "65001"]),
    ("user_note", ["a", "b", "\"c\""]),
    ("wg_listen_port_base", ["52000", "51820", "53000"]),
    ("alert_unreachable_after_s", ["60", "120", "300"]),
    ("bundle_file_sizes", ["true", "false", "true"]),
    (
        "controller_endpoint",
        ["192.0.2.250", "ctl.example:51000", "[2001:db8::1]:51819"],
    ),
];

/// Level `l`: the global level, a site, or one of the nodes there are (by position).
fn level(store: &Store, l: u8) -> Level {
    let generated = store.load_generated().unwrap();
    match l {
        0 => Level::Global,
        1..=3 => Level::Site(SITES[usize::from(l - 1)].parse().unwrap()),
        _ => match generated.nodes.get(usize::from(l - 4)) {
            Some(node) => Level::Node(node.site.clone(), node.name.clone()),
            None => Level::Global,
        },
    }
}

fn parse_value(text: &str) -> Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(text.to_string()))
}

fn apply(store: &Store, op: &Op) {
    // Refusals (a value at a level where it does not belong, an unknown node) change nothing;
    // the commit after them must still agree with a full render.
    match op {
        Op::Set(l, a, v) => {
            let (name, values) = ATTRIBUTES[usize::from(*a)];
            let value = parse_value(values[usize::from(*v)]);
            let _ = installation::set_attribute(store, &level(store, *l), name, Some(value));
        }
        Op::Unset(l, a) => {
            let (name, _) = ATTRIBUTES[usize::from(*a)];
            let _ = installation::set_attribute(store, &level(store, *l), name, None);
        }
        Op::Template(l, variant) => {
            let level = level(store, *l);
            let dir = store.root().join(Store::level_dir(&level));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("extra.conf.jinja");
            match variant {
                Some(v) => std::fs::write(
                    path,
                    format!(
                        "# {v}\n{{% for p in peers %}}{{{{ p.peer_node }}}} {{{{ p.peer_asn }}}} {{{{ p.mtu }}}}\n{{% endfor %}}"
                    ),
                )
                .unwrap(),
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Op::AddNode(n, s) => {
            let _ = installation::add_node(
                store,
                &format!("n{n}.{}", SITES[usize::from(*s)]).parse().unwrap(),
            );
        }
        Op::RemoveNode(id) => {
            let _ = installation::remove_node(store, &NodeRef::Id(u32::from(*id)));
        }
        Op::CommitOne(id) => {
            let id = u32::from(*id);
            let _ = commit(store, |n| n.id == id, "one node");
        }
    }
}

fn installation() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_init(&dir.path().join("towalink")).unwrap();
    for site in SITES {
        installation::add_site(&store, &site.parse().unwrap()).unwrap();
        for node in ["n0", "n1"] {
            installation::add_node(&store, &format!("{node}.{site}").parse().unwrap()).unwrap();
        }
    }
    commit(&store, |_| true, "first").unwrap();
    (dir, store)
}

/// Commits everything and checks that a full render finds every node as its latest version.
fn commit_and_compare(store: &Store, after: &Op) {
    if commit(store, |_| true, "step").is_err() {
        // A configuration the resolver refuses (a port base that overflows): nothing committed.
        return;
    }
    let tree = store.load_tree().unwrap();
    let nodes = super::nodes_in_scope(&tree, |_| true);
    let full = node_states(store, &tree, &nodes, false).unwrap();
    let stale: Vec<String> = full
        .iter()
        .filter(|s| s.changed)
        .map(|s| s.node.to_string())
        .collect();
    assert!(
        stale.is_empty(),
        "after {after:?}, a full render differs from the latest version of {stale:?}"
    );
    assert_eq!(load_index(store).unwrap().nodes.len(), nodes.len());
}

/// Every attribute at every level, then every template at every level, each followed by a
/// commit: one edit of each kind for certain (the property test below combines them).
#[test]
fn every_input_once_then_incremental_equals_full() {
    let (_dir, store) = installation();
    for a in 0..ATTRIBUTES.len() as u8 {
        for l in 0..10 {
            let op = Op::Set(l, a, l % 3);
            apply(&store, &op);
            commit_and_compare(&store, &op);
        }
    }
    for l in 0..10 {
        for variant in [Some(0), Some(1), None] {
            let op = Op::Template(l, variant);
            apply(&store, &op);
            commit_and_compare(&store, &op);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn incremental_commit_equals_full_render(ops in proptest::collection::vec(op(), 1..14)) {
        let (_dir, store) = installation();
        for op in &ops {
            apply(&store, op);
            commit_and_compare(&store, op);
        }
    }
}

#[test]
fn an_unchanged_node_is_not_rendered_and_a_changed_one_is() {
    let (_dir, store) = installation();
    let record = store.root().join(super::RENDER_INPUTS);
    assert!(record.is_file(), "the first commit records its inputs");
    let outcome = commit(&store, |_| true, "again").unwrap();
    assert!(outcome.created.is_empty());
    assert_eq!(outcome.rendered, 0, "nothing changed: nothing rendered");
    installation::set_attribute(
        &store,
        &level(&store, 4),
        "bird_bfd_interval_ms",
        Some(Value::Integer(150)),
    )
    .unwrap();
    let outcome = commit(&store, |_| true, "one").unwrap();
    let created: Vec<String> = outcome.created.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(created, ["n0.s0"]);
    assert_eq!(outcome.rendered, 1, "only the changed node rendered");
    // A record of another build is not trusted: everything renders, nothing changes.
    let text = std::fs::read_to_string(&record).unwrap();
    let foreign = text.replacen("renderer = \"tlm ", "renderer = \"tlm-other ", 1);
    assert_ne!(text, foreign);
    std::fs::write(&record, foreign).unwrap();
    let outcome = commit(&store, |_| true, "foreign").unwrap();
    assert!(outcome.created.is_empty());
    assert_eq!(
        outcome.rendered, 6,
        "another build's record: every node rendered"
    );
    assert_eq!(std::fs::read_to_string(&record).unwrap(), text);
    // A damaged record is no record.
    std::fs::write(&record, "nodes = 3").unwrap();
    let outcome = commit(&store, |_| true, "damaged").unwrap();
    assert_eq!((outcome.created.len(), outcome.rendered), (0, 6));
    assert_eq!(std::fs::read_to_string(&record).unwrap(), text);
}
