//! Towalink node images: a disk image per node that boots Alpine diskless with the node baked in.
//!
//! Stages: a [`profile::Board`] (data from `board/<name>/`, embedded) says what the board needs;
//! [`assets`] finds the Alpine release files (a local directory, or the official release from a
//! mirror, checksum-verified and cached); [`apkovl`] assembles the node's overlay (the
//! `towalink-node` binary, the OpenRC services from `overlays/`, identity, first version,
//! hostname, network); [`disk`] writes MBR, FAT32 boot partition and an empty data partition
//! into a sparse file without root, loop devices or mounts; [`inspect`] reads an image back.
//! [`build`] ties them together.

pub mod apkovl;
pub mod assets;
pub mod build;
pub mod disk;
pub mod inspect;
pub mod packages;
pub mod profile;

use std::path::PathBuf;

/// What can go wrong building or reading an image; each names the file, board or asset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown board `{0}` (boards: x86_64, rpi4)")]
    UnknownBoard(String),
    #[error("board profile `{file}`: {message}")]
    Profile { file: String, message: String },
    #[error("Alpine release files `{}`: missing `{file}`, which board {board} needs", dir.display())]
    MissingAsset {
        dir: PathBuf,
        file: String,
        board: String,
    },
    #[error("`{file}` from {url}: checksum mismatch (published sha256 {expected}, got {actual}); the file was not kept")]
    Checksum {
        url: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("Alpine release {version} for {arch}: {message}")]
    Release {
        version: String,
        arch: String,
        message: String,
    },
    #[error("host file `{}` is missing (install the Debian package `{package}`)", path.display())]
    MissingHostFile { path: PathBuf, package: String },
    #[error("node binary `{}`: {message}", path.display())]
    NodeBinary { path: PathBuf, message: String },
    #[error("boot template `{template}`: {message}")]
    Template { template: String, message: String },
    #[error("the boot partition ({size_mib} MiB) is too small for its {needed_mib} MiB of files: raise `partitions.boot_mib` in the board profile")]
    BootPartitionFull { size_mib: u32, needed_mib: u64 },
    #[error("FAT file system: {0}")]
    Fat(String),
    #[error(transparent)]
    Command(towalink_system::program::CommandError),
    #[error("package index {url}: {message}")]
    PackageIndex { url: String, message: String },
    #[error("package {url}: {message}; it was not kept")]
    Package { url: String, message: String },
    #[error("packages: {0}")]
    Packages(String),
    #[error("`{}` is not a Towalink image: {message}", path.display())]
    NotAnImage { path: PathBuf, message: String },
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}
