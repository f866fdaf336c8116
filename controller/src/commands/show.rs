//! `tlm show` (the attributes a level sets) and `tlm show_all` (merged, with their origin).

use serde_json::json;
use toml::Value;

use super::parse_site;
use crate::cli::output::print_json;
use crate::cli::{Format, ShowAllWhat, ShowWhat};
use crate::model::attributes::{Level, Merged};
use crate::model::resolve::{merge_site, resolve};
use crate::store::Store;
use crate::Error;

pub fn show(
    store: &Store,
    what: ShowWhat,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let level = match what {
        ShowWhat::Global => Level::Global,
        ShowWhat::Site { site } => {
            let site = parse_site(&site)?;
            store.load_generated()?.site(site.as_str())?;
            Level::Site(site)
        }
        ShowWhat::Node { node } => {
            let n = store.load_generated()?.node(&node.parse()?)?.clone();
            Level::Node(n.site, n.name)
        }
    };
    let table = store.level_attributes(&level)?;
    if format == Format::Json {
        print_json(
            out,
            &serde_json::to_value(&table).expect("TOML tables convert to JSON"),
        );
    } else {
        write!(
            out,
            "{}",
            toml::to_string(&table).expect("TOML tables serialize")
        )
        .ok();
    }
    Ok(())
}

pub fn show_all(
    store: &Store,
    what: ShowAllWhat,
    origin: bool,
    explain: bool,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let tree = store.load_tree()?;
    let merged: Merged = match what {
        ShowAllWhat::Site { site } => {
            let site = parse_site(&site)?;
            tree.generated.site(site.as_str())?;
            let mut merged = merge_site(&tree, &site);
            let allocation = tree.generated.site(site.as_str())?;
            merged.set(
                "site_name",
                Value::String(site.to_string()),
                Level::Generated,
            );
            merged.set(
                "site_id",
                Value::Integer(allocation.id.into()),
                Level::Generated,
            );
            if !merged.values.contains_key("asn") {
                merged.set(
                    "asn",
                    Value::Integer(allocation.asn.into()),
                    Level::Generated,
                );
            }
            merged
        }
        ShowAllWhat::Node { node } => {
            let id = tree.generated.node(&node.parse()?)?.id;
            let resolved = resolve(&tree)?;
            resolved
                .complete_attributes(id)
                .expect("allocated nodes are resolved")
        }
    };
    match (format, origin || explain) {
        (Format::Json, false) => print_json(
            out,
            &serde_json::to_value(&merged.values).expect("TOML converts to JSON"),
        ),
        (Format::Json, true) => {
            let leaves: serde_json::Map<String, serde_json::Value> = merged
                .leaves()
                .into_iter()
                .map(|(path, value, level)| {
                    let mut entry = serde_json::Map::new();
                    entry.insert(
                        "value".into(),
                        serde_json::to_value(&value).expect("TOML converts to JSON"),
                    );
                    if origin {
                        entry.insert("level".into(), json!(level.kind()));
                        entry.insert("file".into(), json!(level.file()));
                    }
                    if explain {
                        entry.insert("doc".into(), json!(crate::model::schema::doc_for(&path)));
                    }
                    (path, serde_json::Value::Object(entry))
                })
                .collect();
            print_json(out, &serde_json::Value::Object(leaves));
        }
        (Format::Text, false) => {
            write!(
                out,
                "{}",
                toml::to_string(&merged.values).expect("TOML serializes")
            )
            .ok();
        }
        (Format::Text, true) => {
            let lines: Vec<(String, String)> = merged
                .leaves()
                .into_iter()
                .map(|(path, value, level)| {
                    let comment = match (origin, explain) {
                        (true, true) => {
                            format!("{}: {}", level.file(), crate::model::schema::doc_for(&path))
                        }
                        (true, false) => level.file(),
                        _ => crate::model::schema::doc_for(&path),
                    };
                    (format!("{path} = {value}"), comment)
                })
                .collect();
            let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
            for (line, comment) in lines {
                writeln!(out, "{line:<width$}  # {comment}").ok();
            }
        }
    }
    Ok(())
}
