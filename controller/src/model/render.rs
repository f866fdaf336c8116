//! Rendering: a node's effective attributes and its level's service files → the files of a
//! version, with their manifest entries.
//!
//! Every file named `X.jinja` renders with minijinja to `X` (strict: an undefined variable is an
//! error naming the template file and line); other files are copied as they are. Templates see
//! every effective attribute as a variable (`loopback_ipv4`, `asn`, `peers`, ...) and may
//! `include` each other by file name. The effective attributes themselves become
//! `towalink/node.toml`; the node reads its contract from it ([`NodeConfig`]: links,
//! loopbacks, lifecycle), which is built from them here first, so a version never carries a
//! node.toml its node refuses.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use toml::{Table, Value};
use towalink_bundle::contract::{ContractError, NodeConfig};
use towalink_bundle::messages::Management;
use towalink_bundle::{FileEntry, HashedFiles, Service};

use crate::model::attributes::{Level, Merged};
use crate::model::names::{NodeFullName, SiteName};
use crate::model::resolve::{ConfigTree, Effective};

/// Path of the effective attributes (and the node's contract) inside a version.
pub use towalink_bundle::contract::NODE_TOML;
/// Suffix of template files.
pub const TEMPLATE_SUFFIX: &str = ".jinja";
/// Instructions one template may execute to render one node (minijinja's fuel). The default
/// templates take about 10,600 for a node with 99 peers (0.05%); a runaway loop stops within
/// seconds, with an error naming the template and line.
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Largest file a template may render.
pub const TEMPLATE_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// Why a node's files could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("template `{file}`{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Template {
        file: String,
        line: Option<usize>,
        message: String,
    },
    #[error("`{file}`: attribute `{attribute}` {message}")]
    Attribute {
        file: String,
        attribute: String,
        message: String,
    },
    #[error("node {node}: both `{first}` and `{second}` produce the file `{output}`")]
    Collision {
        node: NodeFullName,
        first: String,
        second: String,
        output: String,
    },
}

/// The files of one node version and their manifest entries.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedNode {
    /// Content (and its digest) by path in the bundle.
    pub files: HashedFiles,
    pub entries: Vec<FileEntry>,
    pub services: BTreeMap<String, Service>,
}

/// Which level's files a node sees: the lowest level that has files of its own decides.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FileSetKey {
    Global,
    Site(SiteName),
    Node(NodeFullName),
}

struct FileSet {
    /// File name → (path relative to the configuration directory, content).
    files: BTreeMap<String, (String, String)>,
    environment: Environment<'static>,
}

/// Renders nodes, caching one template environment per distinct set of files.
pub struct Renderer<'a> {
    tree: &'a ConfigTree,
    cache: HashMap<FileSetKey, Arc<FileSet>>,
    /// The size each template's output had last time: the next output starts that large.
    output_sizes: HashMap<String, usize>,
}

/// Which level's files `node` sees.
fn file_set_key(tree: &ConfigTree, node: &NodeFullName) -> FileSetKey {
    let has_files = |level: Option<&crate::model::resolve::LevelConfig>| {
        level.is_some_and(|l| !l.files.is_empty())
    };
    if has_files(tree.nodes.get(node)) {
        FileSetKey::Node(node.clone())
    } else if has_files(tree.sites.get(&node.site)) {
        FileSetKey::Site(node.site.clone())
    } else {
        FileSetKey::Global
    }
}

/// The files `node` sees: file name → (path relative to the configuration directory, content).
fn file_set_files(
    tree: &ConfigTree,
    node: &NodeFullName,
    key: &FileSetKey,
) -> BTreeMap<String, (String, String)> {
    let mut files = BTreeMap::new();
    for (name, content) in &tree.global.files {
        files.insert(name.clone(), (name.clone(), content.clone()));
    }
    if let Some(site) = tree.sites.get(&node.site) {
        for (name, content) in &site.files {
            files.insert(
                name.clone(),
                (format!("site_{}/{name}", node.site), content.clone()),
            );
        }
    }
    if let FileSetKey::Node(_) = key {
        for (name, content) in &tree.nodes[node].files {
            files.insert(
                name.clone(),
                (
                    format!("site_{}/node_{}/{name}", node.site, node.node),
                    content.clone(),
                ),
            );
        }
    }
    files
}

/// A digest of the files `node` sees (names, paths and contents), computed once per distinct
/// set: one of the inputs of [`crate::model::inputs`].
pub struct FileSetDigests<'a> {
    tree: &'a ConfigTree,
    cache: HashMap<FileSetKey, [u8; 32]>,
}

impl<'a> FileSetDigests<'a> {
    pub fn new(tree: &'a ConfigTree) -> FileSetDigests<'a> {
        FileSetDigests {
            tree,
            cache: HashMap::new(),
        }
    }

    pub fn digest(&mut self, node: &NodeFullName) -> [u8; 32] {
        use sha2::Digest as _;
        let key = file_set_key(self.tree, node);
        if let Some(digest) = self.cache.get(&key) {
            return *digest;
        }
        let mut hasher = sha2::Sha256::new();
        for (name, (path, content)) in file_set_files(self.tree, node, &key) {
            for part in [name, path, content] {
                hasher.update((part.len() as u64).to_le_bytes());
                hasher.update(part.as_bytes());
            }
        }
        let digest: [u8; 32] = hasher.finalize().into();
        self.cache.insert(key, digest);
        digest
    }
}

impl<'a> Renderer<'a> {
    pub fn new(tree: &'a ConfigTree) -> Renderer<'a> {
        Renderer {
            tree,
            cache: HashMap::new(),
            output_sizes: HashMap::new(),
        }
    }

    fn file_set(&mut self, node: &NodeFullName) -> Result<Arc<FileSet>, RenderError> {
        let key = file_set_key(self.tree, node);
        if let Some(set) = self.cache.get(&key) {
            return Ok(set.clone());
        }
        let files = file_set_files(self.tree, node, &key);
        let mut environment = Environment::new();
        environment.set_undefined_behavior(UndefinedBehavior::Strict);
        environment.set_keep_trailing_newline(true);
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment.set_fuel(Some(TEMPLATE_FUEL));
        for (name, (path, content)) in &files {
            if name.ends_with(TEMPLATE_SUFFIX) {
                environment
                    .add_template_owned(name.clone(), content.clone())
                    .map_err(|e| template_error(&e, path, &files))?;
            }
        }
        let set = Arc::new(FileSet { files, environment });
        self.cache.insert(key, set.clone());
        Ok(set)
    }

    /// Renders one node from its complete attributes (for targets and services) and its
    /// effective attributes (the template context and node.toml).
    pub fn render(
        &mut self,
        node: &NodeFullName,
        complete: &Merged,
        effective: &Effective,
        management: Option<&Management>,
    ) -> Result<RenderedNode, RenderError> {
        let set = self.file_set(node)?;
        let targets = FileTargets::from_attributes(complete)?;
        let context = crate::model::template_context::context(effective);
        let mut files = HashedFiles::new();
        let mut sources: BTreeMap<String, String> = BTreeMap::new();
        for (name, (path, content)) in &set.files {
            let (output, bytes) = match name.strip_suffix(TEMPLATE_SUFFIX) {
                Some(output) => {
                    let template = set
                        .environment
                        .get_template(name)
                        .map_err(|e| template_error(&e, path, &set.files))?;
                    let size = self.output_sizes.get(name).copied().unwrap_or(0);
                    let mut text = BoundedOutput {
                        bytes: Vec::with_capacity((size + size / 8).min(TEMPLATE_OUTPUT_LIMIT)),
                    };
                    let _memory = crate::model::render_memory::limit(path);
                    let captured = template
                        .render_captured_to(&context, &mut text)
                        .map_err(|e| template_error(&e, path, &set.files))?;
                    if let Some((used, _)) = captured.state().fuel_levels() {
                        tracing::trace!(template = %path, node = %node, steps = used, "rendered");
                    }
                    self.output_sizes.insert(name.clone(), text.bytes.len());
                    (output.to_string(), text.bytes)
                }
                None => (name.clone(), content.clone().into_bytes()),
            };
            if output.is_empty() || output == "towalink" {
                return Err(RenderError::Collision {
                    node: node.clone(),
                    first: path.clone(),
                    second: "towalink/".into(),
                    output,
                });
            }
            if let Some(first) = sources.insert(output.clone(), path.clone()) {
                return Err(RenderError::Collision {
                    node: node.clone(),
                    first,
                    second: path.clone(),
                    output,
                });
            }
            files.insert(output, bytes);
        }
        files.insert(
            NODE_TOML.to_string(),
            node_toml(complete, effective, management)?.into_bytes(),
        );

        // A boolean: the schema checked it.
        let declare_sizes = complete
            .values
            .get("bundle_file_sizes")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut entries = Vec::with_capacity(files.len());
        let mut services = BTreeMap::new();
        for (path, content) in files.iter() {
            let rule = if path == NODE_TOML {
                None
            } else {
                targets.rule_for(path)
            };
            let entry = FileEntry {
                path: path.to_string(),
                target: rule.map(|r| format!("{}/{path}", r.directory.trim_end_matches('/'))),
                mode: rule.map_or_else(|| "0644".to_string(), |r| r.mode.clone()),
                sha256: files.sha256(path).expect("listed").to_string(),
                service: rule.and_then(|r| r.service.clone()),
                // Opt-in per node (`bundle_file_sizes`): nodes before this field refuse a
                // manifest that has it (unknown field), and the controller is upgraded first.
                size: declare_sizes.then_some(content.len() as u64),
            };
            if let Some(service) = &entry.service {
                let definition =
                    targets
                        .services
                        .get(service)
                        .ok_or_else(|| RenderError::Attribute {
                            file: complete
                                .origin("file_targets")
                                .map(Level::file)
                                .unwrap_or_default(),
                            attribute: "file_targets".into(),
                            message: format!(
                            "names service `{service}`, which has no `services.{service}.reload`"
                        ),
                        })?;
                services.insert(service.clone(), definition.clone());
            }
            entries.push(entry);
        }
        Ok(RenderedNode {
            files,
            entries,
            services,
        })
    }
}

/// A template's output, refused beyond [`TEMPLATE_OUTPUT_LIMIT`] while it renders.
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_OUTPUT_LIMIT {
            return Err(std::io::Error::other(format!(
                "the rendered file exceeds {} MiB",
                TEMPLATE_OUTPUT_LIMIT / (1024 * 1024)
            )));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_error(
    error: &minijinja::Error,
    path: &str,
    files: &BTreeMap<String, (String, String)>,
) -> RenderError {
    // The failing template may be an included one: name its file.
    let file = error
        .name()
        .and_then(|name| files.get(name))
        .map_or_else(|| path.to_string(), |(p, _)| p.clone());
    let source = std::error::Error::source(error).map(ToString::to_string);
    let message = match (error.kind(), source) {
        (minijinja::ErrorKind::WriteFailure, Some(source)) => source,
        (minijinja::ErrorKind::OutOfFuel, _) => format!(
            "the template runs too long (more than {TEMPLATE_FUEL} steps): an unbounded loop?"
        ),
        _ => match error.detail() {
            Some(detail) => format!("{}: {detail}", error.kind()),
            None => error.kind().to_string(),
        },
    };
    RenderError::Template {
        file,
        line: error.line(),
        message,
    }
}

#[derive(Debug, Clone)]
struct TargetRule {
    pattern: String,
    directory: String,
    mode: String,
    service: Option<String>,
}

struct FileTargets {
    rules: Vec<TargetRule>,
    services: BTreeMap<String, Service>,
}

/// A `file_targets` entry as the schema checked it (directory absolute, mode octal, no other
/// fields).
#[derive(serde::Deserialize)]
struct TargetValue {
    directory: String,
    #[serde(default = "default_mode")]
    mode: String,
    #[serde(default)]
    service: Option<String>,
}

fn default_mode() -> String {
    "0644".to_string()
}

impl FileTargets {
    /// `file_targets` and `services` of complete attributes, which resolution checked against
    /// the schema (a bad shape, path or mode is refused there, naming the file that set it).
    fn from_attributes(complete: &Merged) -> Result<FileTargets, RenderError> {
        let rules = decode::<TargetValue>(complete, "file_targets")?
            .into_iter()
            .map(|(pattern, target)| TargetRule {
                pattern,
                directory: target.directory,
                mode: target.mode,
                service: target.service,
            })
            .collect();
        let services = decode::<Service>(complete, "services")?;
        Ok(FileTargets { rules, services })
    }

    /// The rule for a file: an exact name wins, then the longest matching pattern.
    fn rule_for(&self, file: &str) -> Option<&TargetRule> {
        self.rules
            .iter()
            .filter(|r| glob_match(&r.pattern, file))
            .max_by_key(|r| (r.pattern == file, r.pattern.len()))
    }
}

/// Matches `*` (any run of characters) and `?` (one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A table attribute the schema checked, typed (absent: empty).
fn decode<T: serde::de::DeserializeOwned>(
    complete: &Merged,
    attribute: &str,
) -> Result<BTreeMap<String, T>, RenderError> {
    match complete.values.get(attribute) {
        None => Ok(BTreeMap::new()),
        Some(value) => {
            value
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| RenderError::Attribute {
                    file: complete
                        .origin(attribute)
                        .map(Level::file)
                        .unwrap_or_default(),
                    attribute: attribute.to_string(),
                    message: e.message().trim().to_string(),
                })
        }
    }
}

/// `towalink/node.toml`: the effective attributes (what the templates saw, for operators and
/// for nodes before the typed contract) with the node's contract ([`NodeConfig`]) built from
/// them and written over them as the node reads it. A value the node would refuse is refused
/// here, naming the attribute and the file that set it.
fn node_toml(
    complete: &Merged,
    effective: &Effective,
    management: Option<&Management>,
) -> Result<String, RenderError> {
    let attributes = &effective.attributes;
    let attribute_error = |attribute: &str, message: String| RenderError::Attribute {
        file: complete
            .origin(attribute)
            .map_or_else(|| Level::Generated.file(), Level::file),
        attribute: attribute.to_string(),
        message,
    };
    if attributes.contains_key("contract") {
        return Err(attribute_error(
            "contract",
            "is reserved: it is the node contract number the controller writes into `towalink/node.toml`; use another name".into(),
        ));
    }
    let refused = |error| match error {
        ContractError::Invalid { key, message, .. } => {
            // Keys of `peers` entries (generated) are not top-level attributes.
            let attribute = key
                .filter(|k| attributes.contains_key(k))
                .unwrap_or_else(|| "peers".into());
            attribute_error(&attribute, message)
        }
        newer @ ContractError::Newer { .. } => attribute_error("contract", newer.to_string()),
    };
    // Checked as the node will decode it. Only a refusal writes and decodes the text, which
    // names the line and key. The peers are the contract's own type (`Resolved::peers`) and
    // decode as themselves (a property test of the contract): the attributes around them are
    // what is checked.
    let mut config = match NodeConfig::from_table(attributes.clone()) {
        Ok(config) => config,
        Err(error) => {
            let text =
                toml::to_string(attributes).map_err(|e| attribute_error("peers", e.to_string()))?;
            return Err(refused(NodeConfig::from_toml(&text).err().unwrap_or(error)));
        }
    };
    // Nothing in the attributes needs more than the first contract yet: `contract` stays 1
    // (implied, not written), and every node since the first release takes the version.
    config.management = management.cloned();
    if !config.signing_keys.is_empty() {
        // Nodes that would ignore the list would refuse every version after the rotation.
        config.contract = towalink_bundle::contract::SIGNING_KEYS_CONTRACT;
    }
    // The peers are written from their own type (not encoded a second time).
    let mut typed =
        Table::try_from(&config).map_err(|e| attribute_error("peers", e.to_string()))?;
    typed.remove("peers");
    let mut table: BTreeMap<&str, &Value> =
        attributes.iter().map(|(k, v)| (k.as_str(), v)).collect();
    table.extend(typed.iter().map(|(k, v)| (k.as_str(), v)));
    let text = crate::model::toml_text::to_string_with_peers(&table, &effective.peers)
        .map_err(|e| attribute_error("peers", e.to_string()))?;
    // Test builds decode what they wrote, as the node will.
    debug_assert!(
        NodeConfig::from_toml(&text).is_ok(),
        "node.toml the node refuses: {:?}",
        NodeConfig::from_toml(&text)
    );
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("bird*.conf", "bird.conf"));
        assert!(glob_match("bird*.conf", "bird_peers.conf"));
        assert!(!glob_match("bird*.conf", "bird.conf.bak"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
    }

    #[test]
    fn file_targets_and_services_decode_with_their_defaults() {
        let (complete, _) = attributes(
            r#"
            file_targets = { "bird*.conf" = { directory = "/etc/bird", service = "bird" }, "x" = { directory = "/x", mode = "0600" } }
            services = { bird = { reload = ["birdc", "configure"] } }
            "#,
            Level::Global,
        );
        let targets = FileTargets::from_attributes(&complete).unwrap();
        let bird = targets.rule_for("bird_peers.conf").unwrap();
        assert_eq!(
            (
                bird.directory.as_str(),
                bird.mode.as_str(),
                bird.service.as_deref()
            ),
            ("/etc/bird", "0644", Some("bird"))
        );
        assert_eq!(targets.rule_for("x").unwrap().mode, "0600");
        assert!(targets.rule_for("y").is_none());
        assert_eq!(targets.services["bird"].reload, ["birdc", "configure"]);
        let (empty, _) = attributes("", Level::Global);
        let none = FileTargets::from_attributes(&empty).unwrap();
        assert!(none.rules.is_empty() && none.services.is_empty());
    }

    /// node.toml as `tlm` wrote it before the contract was typed.
    const TODAY: &str = include_str!("../../../tests/fixtures/node-toml-contract1/r1.s1.toml");

    fn attributes(text: &str, level: Level) -> (Merged, Effective) {
        let mut table: Table = text.parse().unwrap();
        let merged = Merged::from_layers([(level, &table)]);
        let peers: Vec<crate::model::resolve::Peer> = table
            .remove("peers")
            .map(|peers| peers.try_into().unwrap())
            .unwrap_or_default();
        let effective = Effective {
            attributes: table,
            peers: peers.into(),
        };
        (merged, effective)
    }

    #[test]
    fn node_toml_is_the_effective_attributes_byte_for_byte() {
        // Versions of unchanged nodes stay unchanged: the contract adds no byte to what
        // earlier controllers wrote, and nodes before the contract read it as before.
        let (complete, effective) = attributes(TODAY, Level::Global);
        assert_eq!(node_toml(&complete, &effective, None).unwrap(), TODAY);
    }

    #[test]
    fn the_management_settings_are_written_for_the_node_to_read_back() {
        let management = towalink_bundle::test_support::management("ctl.example:51819");
        let (complete, effective) = attributes(TODAY, Level::Global);
        let text = node_toml(&complete, &effective, Some(&management)).unwrap();
        let mut table: Table = text.parse().unwrap();
        assert!(table.remove("management").is_some(), "{text}");
        assert_eq!(
            table,
            TODAY.parse::<Table>().unwrap(),
            "the attributes stay as they were"
        );
        let config = NodeConfig::from_toml(&text).unwrap();
        assert_eq!(config.management, Some(management));
        assert_eq!(config.contract, 1, "nodes of contract 1 ignore the table");
    }

    #[test]
    fn values_the_node_would_refuse_are_refused_naming_attribute_and_file() {
        let node = Level::Node("s1".parse().unwrap(), "r1".parse().unwrap());
        let (complete, effective) = attributes(
            &TODAY.replace(r#"["bird", "wireguard"]"#, r#"["bogus"]"#),
            node.clone(),
        );
        assert_eq!(
            node_toml(&complete, &effective, None).unwrap_err().to_string(),
            "`site_s1/node_r1/config.toml`: attribute `node_health_checks` unknown variant `bogus`, expected one of `bird`, `wireguard`, `controller`"
        );
        let (complete, effective) = attributes(
            &TODAY.replace("node_boot_tries = 2", "node_boot_tries = 0"),
            Level::Global,
        );
        assert_eq!(
            node_toml(&complete, &effective, None)
                .unwrap_err()
                .to_string(),
            "`config.toml`: attribute `node_boot_tries` must be an integer from 1 to 100"
        );
        let (complete, effective) = attributes(&format!("contract = 1\n{TODAY}"), node);
        assert!(node_toml(&complete, &effective, None)
            .unwrap_err()
            .to_string()
            .starts_with("`site_s1/node_r1/config.toml`: attribute `contract` is reserved"));
    }
}
