//! `tlm diff node <node> [--from N] [--to M]`: what changed between two committed versions
//! of a node, file by file (the files of `effective/<site>/<node>/v<N>/files/`), as unified
//! diffs; `tlm list versions <node>` lists the versions. Both read only.

use std::collections::BTreeMap;

use serde_json::json;

use crate::cli::output::{print_json, table};
use crate::cli::Format;
use crate::model::names::{NodeFullName, NodeRef};
use crate::store::{versions, Store};
use crate::Error;

/// The most of a file a diff shows: longer files are said to differ, not shown.
pub const DIFF_LIMIT_BYTES: usize = 1024 * 1024;

fn node_name(store: &Store, node: &str) -> Result<NodeFullName, Error> {
    let generated = store.load_generated()?;
    Ok(generated.node(&node.parse::<NodeRef>()?)?.full_name())
}

/// `tlm list versions <node>`.
pub fn list_versions(
    store: &Store,
    node: &str,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let name = node_name(store, node)?;
    let mut rows = Vec::new();
    let mut objects = Vec::new();
    for version in versions::list_versions(store, &name)?.into_iter().rev() {
        let manifest = versions::read_manifest(store, &name, version)?;
        objects.push(json!({
            "version": version,
            "parent": manifest.parent,
            "created": manifest.created,
            "files": manifest.files.len(),
        }));
        rows.push(vec![
            format!("v{version}"),
            manifest.parent.map_or("-".into(), |p| format!("v{p}")),
            manifest.created.clone(),
            manifest.files.len().to_string(),
        ]);
    }
    if format == Format::Json {
        print_json(out, &json!(objects));
    } else {
        table(out, &["VERSION", "PARENT", "CREATED", "FILES"], &rows);
    }
    Ok(())
}

/// The files of a version: path → content (`None`: not text, or too large to show).
fn files(
    store: &Store,
    node: &NodeFullName,
    version: u32,
) -> Result<BTreeMap<String, (String, Option<String>)>, Error> {
    let manifest = versions::read_manifest(store, node, version)?;
    let dir = versions::version_dir(store, node, version).join("files");
    let mut files = BTreeMap::new();
    for entry in manifest.files {
        let bytes = std::fs::read(dir.join(&entry.path))
            .map_err(|e| towalink_system::IoError::new("cannot read", &dir.join(&entry.path), e))?;
        let text = (bytes.len() <= DIFF_LIMIT_BYTES)
            .then(|| String::from_utf8(bytes).ok())
            .flatten();
        files.insert(entry.path, (entry.sha256, text));
    }
    Ok(files)
}

/// One file's change: `added`, `removed` or `changed`, with its unified diff. Pure.
pub fn file_diff(
    path: &str,
    from: Option<&(String, Option<String>)>,
    to: Option<&(String, Option<String>)>,
    versions: (u32, u32),
) -> Option<(&'static str, String)> {
    let change = match (from, to) {
        (None, None) => return None,
        (Some(a), Some(b)) if a.0 == b.0 => return None,
        (None, Some(_)) => "added",
        (Some(_), None) => "removed",
        (Some(_), Some(_)) => "changed",
    };
    let text = |f: Option<&(String, Option<String>)>| f.map(|(_, t)| t.clone());
    let diff = match (text(from), text(to)) {
        (Some(None), _) | (_, Some(None)) => "(binary or larger than 1 MiB: not shown)\n".into(),
        (a, b) => {
            let (a, b) = (
                a.flatten().unwrap_or_default(),
                b.flatten().unwrap_or_default(),
            );
            similar::TextDiff::from_lines(&a, &b)
                .unified_diff()
                .context_radius(3)
                .header(
                    &format!("v{}/{path}", versions.0),
                    &format!("v{}/{path}", versions.1),
                )
                .to_string()
        }
    };
    Some((change, diff))
}

/// `tlm diff node <node> [--from N] [--to M]`.
pub fn run(
    store: &Store,
    node: &str,
    from: Option<u32>,
    to: Option<u32>,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let name = node_name(store, node)?;
    let all = versions::list_versions(store, &name)?;
    let missing = |version: u32| Error::UnknownVersion {
        node: name.clone(),
        version,
        latest: all.last().copied(),
    };
    let to = match to {
        Some(v) if all.contains(&v) => v,
        Some(v) => return Err(missing(v)),
        None => *all.last().ok_or_else(|| Error::NoVersion(name.clone()))?,
    };
    let from = match from {
        Some(v) if all.contains(&v) => Some(v),
        Some(v) => return Err(missing(v)),
        None => versions::read_manifest(store, &name, to)?.parent,
    };
    let old = match from {
        Some(v) => files(store, &name, v)?,
        None => BTreeMap::new(),
    };
    let new = files(store, &name, to)?;
    let paths: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let changes: Vec<(String, &'static str, String)> = paths
        .into_iter()
        .filter_map(|path| {
            file_diff(path, old.get(path), new.get(path), (from.unwrap_or(0), to))
                .map(|(change, diff)| (path.clone(), change, diff))
        })
        .collect();
    if format == Format::Json {
        let files: Vec<_> = changes
            .iter()
            .map(|(path, change, diff)| json!({"path": path, "change": change, "diff": diff}))
            .collect();
        print_json(
            out,
            &json!({"node": name.to_string(), "from": from, "to": to, "files": files}),
        );
    } else {
        for (_, _, diff) in &changes {
            write!(out, "{diff}").ok();
        }
        if changes.is_empty() {
            writeln!(out, "no file differs").ok();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (String, Option<String>) {
        (
            towalink_bundle::sha256_hex(text.as_bytes()),
            Some(text.into()),
        )
    }

    #[test]
    fn a_changed_file_reads_as_a_unified_diff() {
        let (change, diff) = file_diff(
            "bird_base.conf",
            Some(&file("a\nmin rx interval 100 ms;\nc\n")),
            Some(&file("a\nmin rx interval 200 ms;\nc\n")),
            (1, 2),
        )
        .unwrap();
        assert_eq!(change, "changed");
        assert!(
            diff.starts_with("--- v1/bird_base.conf\n+++ v2/bird_base.conf\n"),
            "{diff}"
        );
        assert!(
            diff.contains("-min rx interval 100 ms;\n+min rx interval 200 ms;\n"),
            "{diff}"
        );
        assert_eq!(
            file_diff("x", Some(&file("same")), Some(&file("same")), (1, 2)),
            None
        );
        assert_eq!(
            file_diff("x", None, Some(&file("new\n")), (1, 2))
                .unwrap()
                .0,
            "added"
        );
        assert_eq!(
            file_diff("x", Some(&file("old\n")), None, (1, 2))
                .unwrap()
                .0,
            "removed"
        );
        let binary = ("00".into(), None);
        assert!(file_diff("x", Some(&binary), Some(&file("t")), (1, 2))
            .unwrap()
            .1
            .contains("not shown"));
    }
}
