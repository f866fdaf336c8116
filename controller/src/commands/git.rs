//! `tlm git …`: git in the configuration directory, its exit status passed through.

use std::process::ExitCode;

use crate::store::Store;
use crate::Error;

/// Runs git with `args` in the directory.
pub fn run(config_dir: &std::path::Path, args: &[String]) -> Result<ExitCode, Error> {
    let store = Store::open_existing(config_dir)?;
    let status = std::process::Command::new("git")
        .args(args)
        .current_dir(store.root())
        .status()
        .map_err(|e| {
            towalink_system::durable::IoError::new("cannot run git in", store.root(), e)
        })?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}
