//! `tlm`: parse arguments, set up logging, run, map the outcome to an exit status
//! (0 ok, 1 failed or invalid input, 2 usage).

use std::process::ExitCode;

use clap::Parser as _;
use towalink_controller::cli::{Cli, Command};
use towalink_controller::commands::run;

/// Templates render with bounded memory (see `render_memory`).
#[global_allocator]
static ALLOCATOR: towalink_controller::model::render_memory::Allocator =
    towalink_controller::model::render_memory::Allocator;

/// A command that ends soon keeps the memory it frees for its next allocation instead of
/// handing it back to the kernel: a commit of a 1,000-node mesh renders about 4,000 buffers of
/// 0.3 to 1.4 MB, each of which glibc otherwise maps fresh (and the kernel zeroes and faults
/// in again). Measured: system time 1.5 s -> 0.7 s. `tlm serve` runs for months and
/// keeps glibc's defaults.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc allocator parameters; no thread has started yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Files in the configuration directory get exactly the modes tlm asks for (0644, 0600 for
    // secrets), whatever the operator's umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    if !matches!(cli.command, Command::Serve { .. }) {
        keep_freed_memory();
    }
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
