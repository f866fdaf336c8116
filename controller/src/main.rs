//! `tlm`: parse arguments, set up logging, run, map the outcome to an exit status
//! (0 ok, 1 failed or invalid input, 2 usage).

use std::process::ExitCode;

use clap::Parser as _;
use towalink_controller::cli::Cli;
use towalink_controller::commands::run;

/// Templates render with bounded memory (see `render_memory`).
#[global_allocator]
static ALLOCATOR: towalink_controller::model::render_memory::Allocator =
    towalink_controller::model::render_memory::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Files in the configuration directory get exactly the modes tlm asks for (0644, 0600 for
    // secrets), whatever the operator's umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    tracing_subscriber::fmt()
        .with_max_level(cli.loglevel.tracing_level())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(
            std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .without_time()
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            let hint = error
                .hint()
                .map(|h| format!(" (hint: {h})"))
                .unwrap_or_default();
            eprintln!("tlm: error: {error}{hint}");
            ExitCode::from(1)
        }
    }
}
