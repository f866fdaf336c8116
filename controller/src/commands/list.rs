//! `tlm list sites|nodes|changes|…`: what the directory holds, as a table or JSON.

use serde_json::json;

use crate::cli::output::{print_json, table};
use crate::cli::{Format, ListWhat};
use crate::model::allocation::NodeAllocation;
use crate::model::names::NodeRef;
use crate::model::resolve::resolve;
use crate::store::{versions, Store};
use crate::Error;

pub fn run(
    store: &Store,
    what: ListWhat,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    match what {
        ListWhat::Sites => {
            let generated = store.load_generated()?;
            if format == Format::Json {
                let sites: Vec<_> = generated
                    .sites
                    .iter()
                    .map(|s| json!({"site": s.name, "id": s.id, "asn": s.asn, "nodes": generated.nodes_of(&s.name).count()}))
                    .collect();
                print_json(out, &json!(sites));
            } else {
                let rows: Vec<Vec<String>> = generated
                    .sites
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.to_string(),
                            s.name.to_string(),
                            s.asn.to_string(),
                            generated.nodes_of(&s.name).count().to_string(),
                        ]
                    })
                    .collect();
                table(out, &["ID", "SITE", "ASN", "NODES"], &rows);
            }
        }
        ListWhat::Nodes { site } => {
            let generated = store.load_generated()?;
            if site != "all" {
                generated.site(&site)?;
            }
            let nodes: Vec<&NodeAllocation> = generated
                .nodes
                .iter()
                .filter(|n| site == "all" || n.site.as_str() == site)
                .collect();
            let index = versions::load_index(store)?;
            let activations = versions::load_activations(store)?;
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            for n in nodes {
                let full = n.full_name();
                let latest = index.nodes.get(&full.to_string()).map(|e| e.latest);
                let active = activations.nodes.get(&full.to_string()).map(|a| a.version);
                objects.push(json!({
                    "node": full.to_string(), "id": n.id, "site": n.site, "name": n.name,
                    "loopback_ipv4": n.loopback_ipv4, "loopback_ipv6": n.loopback_ipv6,
                    "wg_public_key": n.wg_public_key, "latest_version": latest, "activate_version": active,
                }));
                let v = |x: Option<u32>| x.map_or("-".to_string(), |v| format!("v{v}"));
                rows.push(vec![
                    n.id.to_string(),
                    full.to_string(),
                    n.loopback_ipv4.to_string(),
                    n.loopback_ipv6.to_string(),
                    v(latest),
                    v(active),
                ]);
            }
            if format == Format::Json {
                print_json(out, &json!(objects));
            } else {
                table(
                    out,
                    &[
                        "ID",
                        "NODE",
                        "LOOPBACK_IPV4",
                        "LOOPBACK_IPV6",
                        "LATEST",
                        "ACTIVATE",
                    ],
                    &rows,
                );
            }
        }
        ListWhat::Versions { node } => {
            super::diff::list_versions(store, &node, format, out)?;
        }
        ListWhat::Changed => {
            let tree = store.load_tree()?;
            let nodes = versions::nodes_in_scope(&tree, |_| true);
            let states = versions::changed_nodes(store, &tree, &nodes)?;
            let changed: Vec<_> = states.iter().filter(|s| s.changed).collect();
            if format == Format::Json {
                let objects: Vec<_> = changed
                    .iter()
                    .map(|s| json!({"node": s.node.to_string(), "latest_version": s.latest}))
                    .collect();
                print_json(out, &json!(objects));
            } else {
                for s in changed {
                    match s.latest {
                        Some(v) => writeln!(out, "{} (latest v{v})", s.node),
                        None => writeln!(out, "{} (no version yet)", s.node),
                    }
                    .ok();
                }
            }
        }
        ListWhat::Links { target } => {
            let tree = store.load_tree()?;
            let resolved = resolve(&tree)?;
            let target = target.unwrap_or_else(|| "all".into());
            let filter: Box<dyn Fn(&NodeAllocation) -> bool> = if target == "all" {
                Box::new(|_| true)
            } else if target.contains('.') || target.bytes().all(|b| b.is_ascii_digit()) {
                let id = tree.generated.node(&target.parse::<NodeRef>()?)?.id;
                Box::new(move |n| n.id == id)
            } else {
                tree.generated.site(&target)?;
                let site = target.clone();
                Box::new(move |n| n.site.as_str() == site)
            };
            let by_id: std::collections::BTreeMap<u32, &NodeAllocation> =
                tree.generated.nodes.iter().map(|n| (n.id, n)).collect();
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            for link in resolved.links() {
                let (a, b) = (by_id[&link.low], by_id[&link.high]);
                if !filter(a) && !filter(b) {
                    continue;
                }
                let Some(p) = resolved.link_peer(link) else {
                    continue;
                };
                // Only what the format prints: a JSON value per link costs ten times its row.
                if format == Format::Json {
                    objects.push(json!({
                        "a": a.full_name().to_string(), "b": b.full_name().to_string(),
                        "a_interface": p.interface, "a_port": p.listen_port,
                        "b_interface": crate::model::topology::interface_name(a.id), "b_port": p.peer_port,
                        "a_link_local": p.local_link_local, "b_link_local": p.peer_link_local,
                    }));
                } else {
                    rows.push(vec![
                        a.full_name().to_string(),
                        format!("{}:{}", p.interface, p.listen_port),
                        b.full_name().to_string(),
                        format!(
                            "{}:{}",
                            crate::model::topology::interface_name(a.id),
                            p.peer_port
                        ),
                    ]);
                }
            }
            if format == Format::Json {
                print_json(out, &json!(objects));
            } else {
                table(out, &["NODE_A", "A_IF:PORT", "NODE_B", "B_IF:PORT"], &rows);
            }
        }
    }
    Ok(())
}
