//! The Towalink controller: the configuration store and everything `tlm` does with it.
//!
//! Stages, each pure and tested on its own, with effects at the edges:
//! raw files ([`store`]) → merged attributes ([`attributes`]) → allocations ([`allocation`])
//! and topology ([`topology`]) → resolved per-node attributes ([`resolve`]) → rendered files
//! ([`render`]) → signed versions and bundles ([`versions`]). [`cli`] maps the `tlm` grammar
//! onto these.

pub mod cli;
pub mod commands;
pub mod model;
pub mod service;
pub mod store;

use std::path::PathBuf;

use model::{allocation, attributes, names, render, resolve, schema};

/// Everything that can go wrong in the controller, each naming the file, field or argument.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] towalink_system::IoError),
    #[error("`{file}`: line {line}, column {column}: {message}")]
    Toml {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("`{file}` is not UTF-8 text")]
    NotUtf8 { file: String },
    #[error(
        "`{0}` is not a Towalink configuration directory: it is not empty and has no config.toml"
    )]
    NotConfigDir(PathBuf),
    #[error(transparent)]
    Name(#[from] names::NameError),
    #[error(transparent)]
    Allocation(#[from] allocation::AllocationError),
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error(transparent)]
    Attribute(#[from] attributes::AttributeInputError),
    /// A value or name `tlm set` refuses: the file it would go to and what is wrong.
    #[error("`{file}`: {violation}")]
    Schema {
        file: String,
        violation: schema::Violation,
    },
    #[error(transparent)]
    Command(#[from] towalink_system::program::CommandError),
    #[error("cannot build bundle: {0}")]
    Bundle(#[from] towalink_bundle::BundleError),
    #[error("node {node} has no version v{version}{}", latest.map(|l| format!(" (latest is v{l})")).unwrap_or_default())]
    UnknownVersion {
        node: names::NodeFullName,
        version: u32,
        latest: Option<u32>,
    },
    #[error("node {0} has no committed version yet")]
    NoVersion(names::NodeFullName),
    #[error("`{file}`: {message}")]
    Corrupt { file: String, message: String },
    #[error("controller service: {0}")]
    Service(String),
    #[error("management link: {0}")]
    Link(#[from] towalink_netdev::Error),
    #[error("image: {0}")]
    Image(towalink_images::Error),
    #[error("refusing to record `{path}` in git: it {reason}")]
    SecretForGit { path: String, reason: &'static str },
    #[error("git is busy: `{}` is held by a running git (pid {pid})", lock.display())]
    GitBusy { lock: PathBuf, pid: u32 },
    #[error("refusing to write the image to `{}`: it is inside the configuration directory, whose files go into git", .0.display())]
    ImageInsideConfig(PathBuf),
    #[error("refusing to write recovery objects to `{}`: it is inside the configuration directory, whose files go into git", .0.display())]
    RecoveryInsideConfig(PathBuf),
    #[error("recovery object: {0}")]
    Recovery(#[from] towalink_bundle::recovery::RecoveryError),
    /// `tlm rotate` refused: the step, or the node, is not ready for it.
    #[error("{0}")]
    Rotation(String),
    /// `tlm token` refused.
    #[error("{0}")]
    Token(String),
}

impl Error {
    /// A remedy to print after the error, where one is known.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Schema { violation, .. } => violation.hint(),
            Error::NoVersion(node) => Some(format!("run `tlm commit node {node}` first")),
            Error::Allocation(allocation::AllocationError::UnknownSite(_)) => {
                Some("`tlm list sites` shows the sites".into())
            }
            Error::Allocation(allocation::AllocationError::UnknownNode(_)) => {
                Some("`tlm list nodes all` shows the nodes".into())
            }
            Error::Allocation(allocation::AllocationError::SiteNotEmpty { .. }) => {
                Some("remove each node with `tlm del node <node>.<site>`".into())
            }
            Error::NotConfigDir(_) => Some(
                "pass --config-dir (or TOWALINK_CONFIG_DIR) with an existing Towalink directory or a new one".into(),
            ),
            Error::Image(towalink_images::Error::Fetch { .. }) => Some(
                "pass --mirror with a reachable Alpine mirror, or --alpine-dir with local release files".into(),
            ),
            Error::SecretForGit { .. } => Some(
                "move it out of the configuration directory; if it holds no secret, give it mode 0644 and another name".into(),
            ),
            Error::GitBusy { .. } => Some("wait for that git to finish, then run tlm again".into()),
            Error::ImageInsideConfig(_) => Some("pass -o with a path outside the configuration directory".into()),
            Error::RecoveryInsideConfig(_) => Some("write them outside the configuration directory".into()),
            _ => None,
        }
    }
}
