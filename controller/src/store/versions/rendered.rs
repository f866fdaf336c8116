//! `effective/render-inputs.toml`: for each node, the input digest
//! ([`crate::model::inputs`]) its content was last rendered from, and that content's digest.
//!
//! A node whose inputs are those recorded, and whose latest version has the recorded content,
//! would render to its latest version again: a commit skips it. Soft state, out of git: a
//! missing, unreadable or foreign file (written by other rendering code) costs one full
//! render, never a wrong version. Written after a commit has published.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use towalink_system::durable;

use super::index::IndexEntry;
use crate::store::Store;
use crate::Error;

pub const RENDER_INPUTS: &str = "effective/render-inputs.toml";

/// What each node's latest rendering was made from.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderRecord {
    /// The code that rendered ([`renderer_id`]).
    renderer: String,
    #[serde(default)]
    nodes: BTreeMap<String, RenderedFrom>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenderedFrom {
    inputs: String,
    content: String,
}

/// Names the code that renders: `tlm`'s version and a digest of the sources that decide what
/// a version's files are (made by build.rs). Another build of the same sources trusts the
/// record; changed code renders every node once.
pub fn renderer_id() -> String {
    format!(
        "tlm {} (source {})",
        env!("CARGO_PKG_VERSION"),
        env!("TLM_RENDERER_SOURCE")
    )
}

impl RenderRecord {
    /// The record, when `renderer` wrote it; otherwise an empty one.
    pub fn load(store: &Store, renderer: &str) -> RenderRecord {
        let path = store.root().join(RENDER_INPUTS);
        let empty = || RenderRecord {
            renderer: renderer.to_string(),
            nodes: BTreeMap::new(),
        };
        let text = match durable::read_optional(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return empty(),
            Err(e) => {
                tracing::warn!("{e}: every node is rendered");
                return empty();
            }
        };
        match toml::from_str::<RenderRecord>(&text) {
            Ok(record) if record.renderer == renderer => record,
            Ok(_) => empty(),
            Err(e) => {
                tracing::warn!("{RENDER_INPUTS}: {e}: every node is rendered");
                empty()
            }
        }
    }

    /// Whether `node`, rendered from `inputs`, would give its latest version's content again.
    pub fn unchanged(&self, node: &str, inputs: &str, latest: Option<&IndexEntry>) -> bool {
        match (self.nodes.get(node), latest) {
            (Some(from), Some(latest)) => from.inputs == inputs && from.content == latest.content,
            _ => false,
        }
    }

    /// Records that `node`'s `inputs` rendered to `content`.
    pub fn rendered(&mut self, node: String, inputs: String, content: String) {
        self.nodes.insert(node, RenderedFrom { inputs, content });
    }

    /// Keeps only the nodes `keep` says still exist.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.nodes.retain(|node, _| keep(node));
    }

    pub fn save(&self, store: &Store) -> Result<(), Error> {
        let text = format!(
            "# Written by tlm commit: what each node's latest content was rendered from (soft state: without it, the next commit renders every node).\n\n{}",
            toml::to_string(self).expect("the record serializes")
        );
        durable::write_atomic(&store.root().join(RENDER_INPUTS), text.as_bytes(), 0o644)?;
        Ok(())
    }
}
