//! The configuration directory on disk (compatible with the original Towalink layout):
//!
//! ```text
//! config.toml, *.jinja, other service files     global level
//! site_<site>/config.toml, files                site level
//! site_<site>/node_<node>/config.toml, files    node level
//! generated/config.toml                         allocations (ids, AS, loopbacks, public keys)
//! generated/secrets.toml                        private keys, recovery tokens (0600, not in git)
//! effective/<site>/<node>/v<N>/                 committed versions (see crate::store::versions)
//! certs/                                        controller signing key (0600, not in git)
//! ```
//!
//! The store reads and writes these files; every replacement is atomic ([`towalink_system::durable`]).
//! Which sites and nodes exist is decided by `generated/config.toml` alone, so a half-finished
//! add or remove never leaves an entity half there.

pub mod git;
pub mod installation;
pub mod keys;
pub mod tokens;
pub mod versions;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::Table;

use crate::model::allocation::{Generated, NodeAllocation, Secrets};
use crate::model::attributes::{Level, DEFAULT_CONFIG_TOML};
use crate::model::names::{NodeFullName, SiteName};
use crate::model::resolve::{ConfigTree, LevelConfig};
use crate::Error;
use towalink_system::durable::{self, IoError};
use towalink_system::program as external;

pub const CONFIG_TOML: &str = "config.toml";
pub const GENERATED_DIR: &str = "generated";
pub const EFFECTIVE_DIR: &str = "effective";
pub const CERTS_DIR: &str = "certs";
const LOCK_FILE: &str = ".tlm.lock";

/// Files written on first use, besides config.toml.
pub const DEFAULT_TEMPLATES: &[(&str, &str)] = &[
    (
        "bird.conf.jinja",
        include_str!("../../defaults/bird.conf.jinja"),
    ),
    (
        "bird_base.conf.jinja",
        include_str!("../../defaults/bird_base.conf.jinja"),
    ),
    (
        "bird_peers.conf.jinja",
        include_str!("../../defaults/bird_peers.conf.jinja"),
    ),
];

/// SHA-256 of every earlier built-in `bird_base.conf.jinja`: a configuration directory that
/// still has one of them unchanged gets the current default at its next commit (the current
/// one keeps the management plane out of BGP, docs/security.md).
const EARLIER_BIRD_BASE: &[&str] = &[
    "294a76bdd0c20eeffb9dfe241052c23e5c374c08d2fc80cc095a8347e22e59fc",
    "610273e0469c68df5d91256938e96a8b2085c3f0aee80007ef22d495e47f28c3",
    "d860a123e1e64ff6deb25fc5e7d16bd9e7cacaf405969a06d996f2561d55799c",
];

/// What [`Store::upgrade_default_templates`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateUpgrade {
    /// An unchanged earlier default, replaced by the current one.
    Updated(&'static str),
    /// A customized `bird_base.conf.jinja` without the management filters.
    LacksManagementFilter(&'static str),
}

const GITIGNORE: &str = "\
# Secrets never go into git: back them up separately.
/generated/secrets.toml
/certs/*.key
/certs/key.pem
# The controller's keys and certificates (public halves are derived from the private keys).
/certs/
# What `tlm serve` reports about the running fleet (soft state).
/status/
# tlm's lock, journal, staging and temporary files.
/.tlm.lock
/effective/.commit-journal.toml
# The last seq of each node's recovery object (tlm recovery): soft state.
/effective/recovery.toml
# What each node's latest content was rendered from (tlm commit skips unchanged nodes): soft state.
/effective/render-inputs.toml
# Versions live on disk, immutable; git records effective/index.toml and activation.toml.
/effective/*/
.*.tmp-*
";

/// A configuration directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Held while a command changes the directory: one `tlm` at a time.
pub type StoreLock = towalink_system::lock::FileLock;

/// Parses TOML text, turning errors into `file: line L, column C: message`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, Error> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((1, 1));
        Error::Toml {
            file: file.to_string(),
            line,
            column,
            message: e.message().trim().replace('\n', " "),
        }
    })
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

impl Store {
    /// Brings built-in templates the operator never changed up to date (an unchanged earlier
    /// `bird_base.conf.jinja` becomes the current one, atomically) and reports a customized
    /// one that lacks the management filters. Call with the lock held.
    pub fn upgrade_default_templates(&self) -> Result<Vec<TemplateUpgrade>, Error> {
        const FILE: &str = "bird_base.conf.jinja";
        let current = DEFAULT_TEMPLATES
            .iter()
            .find(|(name, _)| *name == FILE)
            .map(|(_, content)| *content)
            .expect("a built-in bird_base.conf.jinja");
        let path = self.root.join(FILE);
        let Some(text) = durable::read_optional(&path)? else {
            return Ok(Vec::new());
        };
        if text == current {
            return Ok(Vec::new());
        }
        let digest = towalink_bundle::sha256_hex(text.as_bytes());
        if EARLIER_BIRD_BASE.contains(&digest.as_str()) {
            durable::write_atomic(&path, current.as_bytes(), 0o644)?;
            return Ok(vec![TemplateUpgrade::Updated(FILE)]);
        }
        if !text.contains("towalink_management") {
            return Ok(vec![TemplateUpgrade::LacksManagementFilter(FILE)]);
        }
        Ok(Vec::new())
    }

    /// Opens the directory, creating it with working defaults if it does not exist or is
    /// empty. A non-empty directory without config.toml is refused.
    pub fn open_or_init(root: &Path) -> Result<Store, Error> {
        let store = Store {
            root: root.to_path_buf(),
        };
        if root.join(CONFIG_TOML).is_file() {
            return Ok(store);
        }
        let is_empty = match std::fs::read_dir(root) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(IoError::new("cannot read directory", root, e).into()),
        };
        if !is_empty {
            return Err(Error::NotConfigDir(root.to_path_buf()));
        }
        store.init()?;
        Ok(store)
    }

    /// Opens an existing directory without creating anything.
    pub fn open_existing(root: &Path) -> Result<Store, Error> {
        if root.join(CONFIG_TOML).is_file() {
            Ok(Store {
                root: root.to_path_buf(),
            })
        } else {
            Err(Error::NotConfigDir(root.to_path_buf()))
        }
    }

    /// Adds to `.gitignore` the entries of this version that a directory made by an earlier
    /// version lacks (the service's status, the TLS key).
    pub fn ensure_gitignore(&self) -> Result<(), Error> {
        let path = self.root.join(".gitignore");
        let existing = durable::read_optional(&path)?.unwrap_or_default();
        let missing: Vec<&str> = GITIGNORE
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter(|l| !existing.lines().any(|e| e.trim() == *l))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut text = existing;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for line in missing {
            text.push_str(line);
            text.push('\n');
        }
        durable::write_atomic(&path, text.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Builds the default directory next to the target and moves it into place, so an
    /// interrupted first run leaves nothing behind.
    fn init(&self) -> Result<(), Error> {
        let parent = self
            .root
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        durable::create_dir_all(parent)?;
        let name = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "towalink".into());
        let staging = parent.join(format!(".{name}.tmp-init-{}", std::process::id()));
        durable::remove_dir_all(&staging)?;
        let result = (|| -> Result<(), Error> {
            durable::create_dir_all(&staging)?;
            let at = |p: &str| staging.join(p);
            for (file, content) in DEFAULT_TEMPLATES {
                durable::write_unsynced(&at(file), content.as_bytes(), 0o644)?;
            }
            durable::write_unsynced(&at(".gitignore"), GITIGNORE.as_bytes(), 0o644)?;
            durable::create_dir_all(&at(GENERATED_DIR))?;
            durable::create_dir_all(&at(EFFECTIVE_DIR))?;
            let generated = toml::to_string(&Generated::default()).expect("serializable");
            durable::write_unsynced(
                &at("generated/config.toml"),
                generated_text(&generated).as_bytes(),
                0o644,
            )?;
            durable::write_unsynced(&at("generated/secrets.toml"), b"", 0o600)?;
            durable::write_unsynced(&at(LOCK_FILE), b"", 0o644)?;
            durable::write_unsynced(&at(CONFIG_TOML), DEFAULT_CONFIG_TOML.as_bytes(), 0o644)?;
            external::run("git", &["init", "-q", "-b", "main"], &staging, &[])?;
            git_commit(&staging, "tlm: initial configuration")?;
            durable::sync_filesystem(&staging)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = durable::remove_dir_all(&staging);
            return Err(e);
        }
        // An empty target directory (perhaps a mount point, or the one the Debian package
        // made with mode 0700) is replaced when possible, otherwise filled in place; its mode
        // is kept either way.
        let kept_mode = std::fs::metadata(&self.root).ok().map(|m| m.permissions());
        if let Some(mode) = &kept_mode {
            std::fs::set_permissions(&staging, mode.clone())
                .map_err(|e| IoError::new("cannot set the mode of", &staging, e))?;
        }
        if self.root.exists() && std::fs::remove_dir(&self.root).is_err() {
            for entry in std::fs::read_dir(&staging)
                .map_err(|e| IoError::new("cannot read directory", &staging, e))?
            {
                let entry =
                    entry.map_err(|e| IoError::new("cannot read directory", &staging, e))?;
                durable::rename(&entry.path(), &self.root.join(entry.file_name()))?;
            }
            durable::remove_dir_all(&staging)?;
        } else {
            durable::rename(&staging, &self.root)?;
        }
        durable::sync_dir(parent)?;
        tracing::info!(dir = %self.root.display(), "created configuration directory");
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `path` (existing or not) lies inside the directory, symbolic links resolved.
    pub fn contains(&self, path: &Path) -> bool {
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(path)
        };
        let mut probe = absolute.as_path();
        while !probe.exists() {
            match probe.parent() {
                Some(p) => probe = p,
                None => break,
            }
        }
        let canonical = |d: &Path| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf());
        canonical(probe).starts_with(canonical(&self.root))
    }

    /// Takes the directory's lock (blocking while another `tlm` changes it).
    pub fn lock(&self) -> Result<StoreLock, Error> {
        Ok(towalink_system::lock::lock_exclusive(
            &self.root.join(LOCK_FILE),
        )?)
    }

    /// Directory of a level, relative to the root.
    pub fn level_dir(level: &Level) -> PathBuf {
        match level {
            Level::Site(site) => PathBuf::from(format!("site_{site}")),
            Level::Node(site, node) => PathBuf::from(format!("site_{site}/node_{node}")),
            _ => PathBuf::new(),
        }
    }

    fn path(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.root.join(relative)
    }

    /// The attribute table of one level's config.toml (empty if the file is absent).
    pub fn level_attributes(&self, level: &Level) -> Result<Table, Error> {
        let file = level.file();
        match durable::read_optional(&self.path(&file))? {
            Some(text) => parse_toml(&text, &file),
            None => Ok(Table::new()),
        }
    }

    /// The text of one level's config.toml ("" if absent).
    pub fn level_text(&self, level: &Level) -> Result<String, Error> {
        Ok(durable::read_optional(&self.path(level.file()))?.unwrap_or_default())
    }

    /// Replaces one level's config.toml.
    pub fn write_level_text(&self, level: &Level, text: &str) -> Result<(), Error> {
        let dir = self.path(Self::level_dir(level));
        durable::create_dir_all(&dir)?;
        durable::write_atomic(&self.path(level.file()), text.as_bytes(), 0o644)?;
        Ok(())
    }

    fn level_config(&self, level: &Level) -> Result<LevelConfig, Error> {
        let dir_relative = Self::level_dir(level);
        let dir = self.path(&dir_relative);
        let attributes = self.level_attributes(level)?;
        let mut files = BTreeMap::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LevelConfig { attributes, files });
            }
            Err(e) => return Err(IoError::new("cannot read directory", &dir, e).into()),
        };
        for entry in entries {
            let entry = entry.map_err(|e| IoError::new("cannot read directory", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == CONFIG_TOML || name.starts_with('.') {
                continue;
            }
            let file_type = entry
                .file_type()
                .map_err(|e| IoError::new("cannot stat", &entry.path(), e))?;
            if !file_type.is_file() {
                continue;
            }
            let content = std::fs::read(entry.path())
                .map_err(|e| IoError::new("cannot read", &entry.path(), e))?;
            let content = String::from_utf8(content).map_err(|_| Error::NotUtf8 {
                file: dir_relative.join(&name).display().to_string(),
            })?;
            files.insert(name, content);
        }
        Ok(LevelConfig { attributes, files })
    }

    /// Reads everything resolution needs.
    pub fn load_tree(&self) -> Result<ConfigTree, Error> {
        let generated = self.load_generated()?;
        let mut tree = ConfigTree {
            global: self.level_config(&Level::Global)?,
            sites: BTreeMap::new(),
            nodes: BTreeMap::new(),
            generated,
        };
        for site in &tree.generated.sites {
            tree.sites.insert(
                site.name.clone(),
                self.level_config(&Level::Site(site.name.clone()))?,
            );
        }
        for node in &tree.generated.nodes {
            tree.nodes.insert(
                node.full_name(),
                self.level_config(&Level::Node(node.site.clone(), node.name.clone()))?,
            );
        }
        Ok(tree)
    }

    pub fn load_generated(&self) -> Result<Generated, Error> {
        let file = "generated/config.toml";
        match durable::read_optional(&self.path(file))? {
            Some(text) => parse_toml(&text, file),
            None => Ok(Generated::default()),
        }
    }

    pub fn save_generated(&self, generated: &Generated) -> Result<(), Error> {
        let text = toml::to_string(generated).expect("generated config serializes");
        durable::create_dir_all(&self.path(GENERATED_DIR))?;
        durable::write_atomic(
            &self.path("generated/config.toml"),
            generated_text(&text).as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    pub fn load_secrets(&self) -> Result<Secrets, Error> {
        let file = "generated/secrets.toml";
        match durable::read_optional(&self.path(file))? {
            Some(text) => parse_toml(&text, file),
            None => Ok(Secrets::default()),
        }
    }

    pub fn save_secrets(&self, secrets: &Secrets) -> Result<(), Error> {
        let text = toml::to_string(secrets).expect("secrets serialize");
        durable::write_atomic(&self.path("generated/secrets.toml"), text.as_bytes(), 0o600)?;
        Ok(())
    }

    /// Creates a site's directory with a commented config.toml if it has none.
    pub fn create_site_dir(&self, site: &SiteName) -> Result<(), Error> {
        let level = Level::Site(site.clone());
        if !self.path(level.file()).exists() {
            self.write_level_text(
                &level,
                &format!("# Attributes of site {site}: they extend or replace config.toml.\n"),
            )?;
        }
        Ok(())
    }

    /// Creates a node's directory with a commented config.toml if it has none.
    pub fn create_node_dir(&self, node: &NodeAllocation) -> Result<(), Error> {
        let level = Level::Node(node.site.clone(), node.name.clone());
        if !self.path(level.file()).exists() {
            self.write_level_text(
                &level,
                &format!(
                    "# Attributes of node {} (id {}): they extend or replace the site's and config.toml.\n",
                    node.full_name(),
                    node.id
                ),
            )?;
        }
        Ok(())
    }

    /// Removes a directory tree below the root by moving it aside first, so a crash leaves
    /// either the whole tree or none of it at its place.
    pub fn remove_tree(&self, relative: &Path) -> Result<(), Error> {
        let path = self.path(relative);
        if !path.exists() {
            return Ok(());
        }
        let trash = self.path(format!(".trash.tmp-{}", std::process::id()));
        durable::remove_dir_all(&trash)?;
        durable::rename(&path, &trash)?;
        durable::remove_dir_all(&trash)?;
        Ok(())
    }

    /// Directory of a node's versions.
    pub fn effective_dir(&self, node: &NodeFullName) -> PathBuf {
        self.path(EFFECTIVE_DIR)
            .join(node.site.as_str())
            .join(node.node.as_str())
    }

    /// Records a git commit of the recorded files that changed (if any changed).
    pub fn git_commit(&self, message: &str) -> Result<bool, Error> {
        git_commit(&self.root, message)
    }
}

fn generated_text(body: &str) -> String {
    format!(
        "# Generated by tlm: allocated ids, AS numbers, loopbacks and public keys.\n\
         # Private keys are in secrets.toml (mode 0600, not in git). Edit with care.\n\n{body}"
    )
}

/// Records a git commit of the directory's recorded files (see [`crate::store::git`]).
pub fn git_commit(dir: &Path, message: &str) -> Result<bool, Error> {
    crate::store::git::commit(dir, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_errors_have_line_and_column() {
        let err = parse_toml::<Table>("a = 1\nb = = 2\n", "site_x/config.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("`site_x/config.toml`: line 2, column "),
            "{text}"
        );
    }
}
