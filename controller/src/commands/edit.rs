//! `tlm add`, `tlm del`, `tlm set`: sites, nodes and attributes, each checked before anything is written ([`crate::store::installation`]).

use super::parse_site;
use crate::cli::{AddWhat, DelWhat, SetWhat};
use crate::model::attributes::{parse_value, Level};
use crate::model::names::NodeFullName;
use crate::store::{installation, Store};
use crate::Error;

/// `tlm add site|node`.
pub fn add(store: &Store, what: AddWhat, out: &mut impl std::io::Write) -> Result<(), Error> {
    let store = store.clone();
    match what {
        AddWhat::Site { site } => {
            let site = parse_site(&site)?;
            let id = installation::add_site(&store, &site)?;
            let asn = store.load_generated()?.site(site.as_str())?.asn;
            writeln!(out, "added site {site} (id {id}, AS {asn})").ok();
        }
        AddWhat::Node { node } => {
            let node: NodeFullName = node.parse()?;
            let n = installation::add_node(&store, &node)?;
            writeln!(
                out,
                "added node {node} (id {}, loopbacks {} {})",
                n.id, n.loopback_ipv4, n.loopback_ipv6
            )
            .ok();
        }
    }
    Ok(())
}

/// `tlm del site|node`.
pub fn del(store: &Store, what: DelWhat, out: &mut impl std::io::Write) -> Result<(), Error> {
    let store = store.clone();
    match what {
        DelWhat::Site { site } => {
            let site = parse_site(&site)?;
            installation::remove_site(&store, &site)?;
            writeln!(out, "removed site {site}").ok();
        }
        DelWhat::Node { node } => {
            let n = installation::remove_node(&store, &node.parse()?)?;
            writeln!(out, "removed node {} (id {})", n.full_name(), n.id).ok();
        }
    }
    Ok(())
}

/// `tlm set <level> <attribute> <value>` (`empty` removes it).
pub fn set(store: &Store, what: SetWhat) -> Result<(), Error> {
    let store = store.clone();
    let (level, attribute, value) = match what {
        SetWhat::Global { attribute, value } => (Level::Global, attribute, value),
        SetWhat::Site {
            site,
            attribute,
            value,
        } => {
            let site = parse_site(&site)?;
            store.load_generated()?.site(site.as_str())?;
            (Level::Site(site), attribute, value)
        }
        SetWhat::Node {
            node,
            attribute,
            value,
        } => {
            let n = store.load_generated()?.node(&node.parse()?)?.clone();
            (Level::Node(n.site, n.name), attribute, value)
        }
    };
    let parsed = if value == "empty" {
        None
    } else {
        Some(parse_value(&attribute, &value)?)
    };
    match installation::set_attribute(&store, &level, &attribute, parsed)? {
        installation::SetOutcome::Set => {}
        installation::SetOutcome::Removed => {}
        installation::SetOutcome::NotSet => {
            tracing::warn!(
                "`{}` does not set `{attribute}`: nothing removed",
                level.file()
            );
        }
    }
    Ok(())
}
