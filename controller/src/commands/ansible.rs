//! `tlm inventory`, `tlm ansible`, `tlm ansible_playbook`: the original's Ansible wrappers.
//! The inventory (pure: [`inventory`]) has a group per site (`site_<site>`, `-` as `_`) under
//! `all`, each node a host named `<node>.<site>` with its management address as
//! `ansible_host` and its ids as host variables. The wrappers write the inventory of their
//! scope to a temporary file (Ansible's YAML inventory, written as JSON) and run `ansible` or
//! `ansible-playbook -i <file>` with the rest of the arguments, so the pattern `all` means the
//! nodes in scope; Ansible's exit status is tlm's.

use std::process::ExitCode;

use serde_json::{json, Map, Value};

use super::{scope_filter, NodeFilter};
use crate::cli::Scope;
use crate::model::allocation::Generated;
use crate::model::management::ManagementSettings;
use crate::store::Store;
use crate::Error;

/// The inventory of the nodes `filter` takes. Pure.
pub fn inventory(
    generated: &Generated,
    settings: &ManagementSettings,
    filter: &NodeFilter,
) -> Value {
    let mut groups = Map::new();
    for site in &generated.sites {
        let mut hosts = Map::new();
        for node in generated.nodes_of(&site.name).filter(|n| filter(n)) {
            hosts.insert(
                node.full_name().to_string(),
                json!({
                    "ansible_host": settings.node_address(node.id).to_string(),
                    // The node's management sshd lets root in with `node_ssh_authorized_keys`.
                    "ansible_user": "root",
                    "towalink_node_id": node.id,
                    "towalink_node": node.name.as_str(),
                    "towalink_site": site.name.as_str(),
                    "towalink_site_id": site.id,
                }),
            );
        }
        if !hosts.is_empty() {
            groups.insert(
                format!("site_{}", site.name.as_str().replace('-', "_")),
                json!({ "hosts": hosts }),
            );
        }
    }
    json!({ "all": { "children": groups } })
}

fn scoped_inventory(store: &Store, scope: &Scope) -> Result<Value, Error> {
    let generated = store.load_generated()?;
    let settings = crate::store::keys::settings(store)?;
    let filter = scope_filter(&generated, scope)?;
    Ok(inventory(&generated, &settings, &filter))
}

/// `tlm inventory [all|site S|node N]`: the inventory as JSON (a static inventory file for
/// `ansible -i`).
pub fn print(store: &Store, scope: &Scope, out: &mut impl std::io::Write) -> Result<(), Error> {
    crate::cli::output::print_json(out, &scoped_inventory(store, scope)?);
    Ok(())
}

/// Runs `program` (`ansible` or `ansible-playbook`) with the scope's inventory and `args`.
pub fn run(
    store: &Store,
    program: &str,
    scope: &Scope,
    args: &[String],
) -> Result<ExitCode, Error> {
    let inventory = scoped_inventory(store, scope)?;
    let file = tempfile::Builder::new()
        .prefix("tlm-inventory-")
        .suffix(".json")
        .tempfile()
        .map_err(|e| Error::Service(format!("cannot make the inventory file: {e}")))?;
    std::fs::write(file.path(), inventory.to_string())
        .map_err(|e| Error::Service(format!("cannot write the inventory file: {e}")))?;
    let status = std::process::Command::new(program)
        .arg("-i")
        .arg(file.path())
        .args(args)
        .status()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Service(format!(
                "{program} not found: install Ansible (Debian: apt install ansible-core)"
            )),
            _ => Error::Service(format!("cannot run {program}: {e}")),
        })?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::allocation::Pools;

    #[test]
    fn a_group_per_site_and_the_management_address_per_node() {
        let mut generated = Generated::default();
        let pools = Pools {
            ipv4: "10.254.0.0/16".parse().unwrap(),
            ipv6: "fd54:6f77:616c::/64".parse().unwrap(),
        };
        for (site, nodes) in [("my-site1", &["primary", "backup"][..]), ("hq", &["main"])] {
            generated
                .add_site(site.parse().unwrap(), 4_200_000_000)
                .unwrap();
            for node in nodes {
                generated
                    .add_node(
                        format!("{node}.{site}").parse().unwrap(),
                        &pools,
                        &mut rand_core::OsRng,
                    )
                    .unwrap();
            }
        }
        let settings = ManagementSettings {
            pool: "fd54:6f77:616c:ffff::/64".parse().unwrap(),
            listen_port: 51819,
            api_port: 8001,
            keepalive_s: 25,
            report_interval_s: 5,
            controller_endpoints: Vec::new(),
        };
        let all: NodeFilter = Box::new(|_| true);
        let value = inventory(&generated, &settings, &all);
        let groups = value["all"]["children"].as_object().unwrap();
        assert_eq!(
            groups.keys().map(String::as_str).collect::<Vec<_>>(),
            ["site_hq", "site_my_site1"]
        );
        let host = &groups["site_my_site1"]["hosts"]["backup.my-site1"];
        assert_eq!(host["towalink_node_id"], 2);
        assert_eq!(host["ansible_host"], settings.node_address(2).to_string());
        let only_hq: NodeFilter = Box::new(|n| n.site.as_str() == "hq");
        let value = inventory(&generated, &settings, &only_hq);
        assert_eq!(value["all"]["children"].as_object().unwrap().len(), 1);
    }
}
