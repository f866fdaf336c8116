//! `towalink-node`: parse arguments, set up logging, run, map the outcome to an exit status
//! (0 ok, 1 failed or refused, 2 usage).

use std::process::ExitCode;

use clap::Parser as _;
use towalink_node::cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.loglevel.tracing_level())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            let chain: Vec<String> = error.chain().map(|e| e.to_string()).collect();
            eprintln!("towalink-node: error: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}
