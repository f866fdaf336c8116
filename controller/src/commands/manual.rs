//! `tlm man --dir DIR`: manual pages generated from the clap grammar (clap_mangen), one for
//! `tlm` and one for each command and subcommand (`tlm-set.1`, `tlm-set-node.1`, ...).

use std::path::Path;

use crate::cli::Cli;
use crate::Error;
use towalink_system::durable;

/// Writes the pages of `command` and its subcommands, each named after its path (the display
/// name a built command has: `tlm-set-node`); returns how many.
fn write_tree(dir: &Path, command: &clap::Command) -> Result<usize, Error> {
    let name = command
        .get_display_name()
        .unwrap_or(command.get_name())
        .to_string();
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .map_err(|e| Error::Io(durable::IoError::new("cannot render", &path, e)))?;
    durable::write_atomic(&path, &page, 0o644)?;
    let mut written = 1;
    for sub in command.get_subcommands() {
        if sub.get_name() != "help" {
            written += write_tree(dir, sub)?;
        }
    }
    Ok(written)
}

/// Writes every page into `dir` (made when missing).
pub fn write_pages(dir: &Path) -> Result<usize, Error> {
    durable::create_dir_all(dir)?;
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    write_tree(dir, &command)
}
