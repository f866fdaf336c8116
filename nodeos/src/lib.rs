//! `towalink-node`: the node daemon's library.
//!
//! A pure planner ([`slots`]) decides from the disk state alone; the executor ([`lifecycle`])
//! carries decisions out on the state directory ([`state`]) and the root ([`apply`]), with BIRD
//! reached through its control socket ([`bird`]) and health judged by [`health`].

pub mod apply;
pub mod bird;
pub mod bootstrap;
pub mod cli;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod host;
pub mod lifecycle;
pub mod management;
pub mod metrics;
pub mod recovery;
pub mod slots;
pub mod sshd;
pub mod state;

use std::path::PathBuf;

impl From<towalink_system::IoError> for Error {
    fn from(e: towalink_system::IoError) -> Error {
        Error::Io {
            action: e.action,
            path: e.path,
            error: e.source,
        }
    }
}

/// Everything that can go wrong on a node, naming the file, version or service.
///
/// Each message is complete: where it quotes an underlying error, that error is not also its
/// `source`, so `towalink-node` (which prints the whole cause chain) prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} `{path}`: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("`{path}`: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("bundle refused: {0}")]
    Bundle(towalink_bundle::BundleError),
    #[error("bundle refused: v{0} is already installed with different content")]
    VersionConflict(u32),
    #[error("bundle refused: v{version} is older than v{highest}, the newest installed; an older version is installed only when the controller's order (`tlm activate … v{version}`) or the operator (`towalink-node install --allow-older`) names it")]
    Older { version: u32, highest: u32 },
    #[error("no version v{version} is installed (installed: {})", if installed.is_empty() { "none".to_string() } else { installed.iter().map(|v| format!("v{v}")).collect::<Vec<_>>().join(", ") })]
    UnknownVersion { version: u32, installed: Vec<u32> },
    #[error("no version is installed")]
    NoVersions,
    #[error("no version is active")]
    NothingActive,
    #[error(transparent)]
    Refused(#[from] slots::ActivationRefused),
    #[error("target `{target}` {reason}")]
    Unsafe {
        target: String,
        reason: &'static str,
    },
    #[error(transparent)]
    Contract(#[from] towalink_bundle::contract::VersionRefused),
    #[error("BIRD at `{socket}`: {message}")]
    Bird { socket: PathBuf, message: String },
    #[error("BIRD is not running at `{socket}`: {message}")]
    BirdNotRunning { socket: PathBuf, message: String },
    #[error("reload of service `{service}` failed: {message}")]
    Reload { service: String, message: String },
    #[error("rolled back: {0}")]
    RolledBack(String),
    #[error("data plane: {0}")]
    DataPlane(String),
    /// A network device (WireGuard link, address, route) could not be made or read.
    #[error("data plane: {0}")]
    NetDev(towalink_netdev::Error),
}

// By hand, not `#[from]` (which would make them a `source` too): the messages above quote
// them already.
impl From<towalink_bundle::BundleError> for Error {
    fn from(error: towalink_bundle::BundleError) -> Error {
        Error::Bundle(error)
    }
}

impl From<towalink_netdev::Error> for Error {
    fn from(error: towalink_netdev::Error) -> Error {
        Error::NetDev(error)
    }
}
