//! The configuration model: pure functions from the directory's text to per-node versions.
//! No module here touches the disk, the network or the clock; each is unit-tested on values.
//!
//! names → attributes (hierarchy merge) → allocation (ids, keys) and topology (links) →
//! resolve (per-node settings and peers) → render (templates to files); inputs (what a node's
//! files are rendered from, as a digest: a commit re-renders only nodes whose inputs changed).

pub mod allocation;
pub mod attributes;
pub mod inputs;
pub mod management;
pub mod names;
pub mod render;
pub mod render_memory;
pub mod resolve;
pub mod schema;
pub mod template_context;
pub mod toml_text;
pub mod topology;
