//! The `towalink-node` command line. Exit status: 0 ok, 1 failed or refused, 2 usage.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::apply::Reloader;
use crate::bird::BirdControl;
pub use crate::daemon::DataPlaneKind;
use crate::lifecycle::Node;
use crate::state::Installed;
pub use towalink_bundle::args::{LogLevel, VersionSpec};

/// towalink-node: keep signed configuration versions in A/B slots, activate, apply, roll back.
#[derive(Debug, Parser)]
#[command(name = "towalink-node", version, about, max_term_width = 100)]
pub struct Cli {
    /// Node state directory (identity, versions, slots).
    #[arg(
        long,
        env = "TOWALINK_STATE_DIR",
        default_value = "/var/lib/towalink",
        global = true
    )]
    pub state_dir: PathBuf,
    /// Directory the versions' files are applied under (their targets are absolute paths below it).
    #[arg(long, default_value = "/", global = true)]
    pub root: PathBuf,
    /// BIRD's control socket.
    #[arg(long, default_value = "/run/bird/bird.ctl", global = true)]
    pub bird_socket: PathBuf,
    /// WireGuard implementation the daemon drives: `auto` takes the kernel's when its module is
    /// there and the in-process `batched` one otherwise (boringtun's protocol, batched socket
    /// I/O and TUN offloads); `boringtun` is boringtun's own device; `none` manages only files
    /// and BIRD (where another tool owns the tunnels).
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub dataplane: DataPlaneKind,
    /// Log level on stderr.
    #[arg(
        short = 'l',
        long,
        value_parser = clap::builder::TypedValueParser::try_map(clap::builder::PossibleValuesParser::new(LogLevel::NAMES), |s| s.parse::<LogLevel>()),
        default_value = "info",
        global = true
    )]
    pub loglevel: LogLevel,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify a bundle (signature, node id, hashes) and store its version. A version older
    /// than the newest installed is refused unless --allow-older.
    Install {
        file: PathBuf,
        /// Install it even when it is older than the newest installed version (anti-rollback
        /// otherwise refuses a replayed old bundle).
        #[arg(long)]
        allow_older: bool,
    },
    /// Activate a version: fill the inactive slot, switch, apply; it stays pending until blessed.
    Activate {
        /// Version number (5 or v5) or `latest` (the highest installed).
        version: String,
        /// Roll back unless confirmed (mark-good) within this many seconds.
        #[arg(long, value_name = "SECONDS")]
        confirm: Option<u64>,
    },
    /// Active and last good version, slot, tries left, health, last rollback.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Bless the active version now (also confirms an activation made with --confirm).
    MarkGood,
    /// Mark the active version bad and roll back to the last good one.
    MarkBad {
        #[arg(long, default_value = "marked bad by the operator")]
        reason: String,
    },
    /// Ask a controller running `tlm attach` for this device's identity (until the operator
    /// picks this device), and write it to the state directory.
    Bootstrap {
        /// The controller's attach endpoint, `host:port` (port 8000 by default).
        #[arg(long)]
        controller: String,
        /// PEM file with the certificate(s) to trust for the controller (its self-signed
        /// certificate or its CA); default: the system's CA bundle.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Milliseconds between requests.
        #[arg(long, default_value = "2000")]
        interval_ms: u64,
        /// Give up after this many seconds (default: keep asking).
        #[arg(long, value_name = "SECONDS")]
        timeout_s: Option<u64>,
        /// Use this pairing code (`XXXX-XXXX`, e.g. agreed with the operator beforehand)
        /// instead of a random one; the device shows it either way.
        #[arg(long, value_name = "CODE")]
        code: Option<towalink_bundle::pairing::PairingCode>,
        /// First make this existing host a node (what `setup-host` does: BIRD, this binary,
        /// the service, forwarding), then pair, then start the service. Run again, it changes
        /// nothing and pairs no second time.
        #[arg(long)]
        setup_host: bool,
    },
    /// Make this existing host (Alpine with OpenRC; Debian, Raspberry Pi OS or Ubuntu with
    /// systemd) a node: BIRD 2 from the package manager, this binary as
    /// /usr/sbin/towalink-node, the node service, forwarding sysctls, the services enabled and
    /// started. Each step is skipped when already so; another host is refused, unchanged.
    SetupHost {
        /// Print the steps and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Install and enable, but do not start the services now.
        #[arg(long)]
        no_start: bool,
    },
    /// The daemon: recover from disk, then keep the tunnels in line with the active version and
    /// watch pending versions (bless or roll back). SIGTERM or SIGINT stops it (exit 0).
    Run {
        /// Do the start-up work and one check, then exit.
        #[arg(long)]
        once: bool,
        /// Milliseconds between checks.
        #[arg(long, default_value = "1000")]
        interval_ms: u64,
        /// A directory of mounted media (`/media` on images): each `<DIR>/*/towalink-recovery/`
        /// is looked at for this node's recovery object when the controller cannot be reached
        /// (docs/recovery.md). May be given more than once.
        #[arg(long, value_name = "DIR")]
        recovery_media: Vec<PathBuf>,
        /// Also serve the metrics (Prometheus text, `/metrics`) on this address, e.g.
        /// `127.0.0.1:9469` or a LAN address; they are always served to the controller on the
        /// management link. May be given more than once.
        #[arg(long, value_name = "ADDRESS:PORT")]
        metrics_listen: Vec<std::net::SocketAddr>,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let node = Node::new(
        &cli.state_dir,
        &cli.root,
        Reloader {
            bird: BirdControl {
                socket: cli.bird_socket.clone(),
            },
        },
    );
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Install { file, allow_older } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("cannot read bundle `{}`", file.display()))?;
            let older = if allow_older {
                crate::state::Older::Operator
            } else {
                crate::state::Older::Refuse
            };
            match node.install(&bytes, older)? {
                Installed::New(v) => writeln!(out, "installed v{v}")?,
                Installed::AlreadyPresent(v) => writeln!(out, "v{v} is already installed")?,
            }
        }
        Command::Activate { version, confirm } => {
            let spec: VersionSpec = version.parse()?;
            let report = node.activate(spec, confirm)?;
            writeln!(
                out,
                "activated v{} in slot {} (pending, {} tries{}); wrote {} file(s), reloaded {}; {:.1} ms",
                report.version,
                report.slot,
                report.tries,
                report
                    .confirm_by
                    .map(|t| format!(", confirm by {t}"))
                    .unwrap_or_default(),
                report.apply.written.len(),
                if report.apply.reloaded.is_empty() { "nothing".to_string() } else { report.apply.reloaded.join(", ") },
                report.activation_ms
            )?;
        }
        Command::Status { format } => {
            let status = node.status()?;
            if format == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
            } else {
                let v = |x: Option<u32>| x.map_or("-".to_string(), |v| format!("v{v}"));
                writeln!(
                    out,
                    "node:          {} (id {})",
                    status.node, status.node_id
                )?;
                writeln!(
                    out,
                    "active:        {} in slot {} ({}{})",
                    v(status.active_version),
                    status.active_slot.as_deref().unwrap_or("-"),
                    status.state.map_or("none", |s| s.name()),
                    status
                        .tries_left
                        .map(|t| format!(", {t} tries left"))
                        .unwrap_or_default()
                )?;
                if let Some(t) = status.confirm_by {
                    writeln!(out, "confirm by:    {t} (unix time)")?;
                }
                writeln!(
                    out,
                    "last good:     {} in slot {}",
                    v(status.last_good_version),
                    status.last_good_slot.as_deref().unwrap_or("-")
                )?;
                let installed: Vec<String> = status
                    .installed_versions
                    .iter()
                    .map(|v| format!("v{v}"))
                    .collect();
                writeln!(out, "installed:     {}", installed.join(" "))?;
                for check in &status.health {
                    writeln!(
                        out,
                        "health {:<7} {} ({})",
                        format!("{}:", check.check),
                        if check.ok { "ok" } else { "failing" },
                        check.detail
                    )?;
                }
                if let Some(r) = &status.last_rollback {
                    writeln!(
                        out,
                        "last rollback: {} -> {} at {}: {}",
                        v(r.from_version),
                        v(r.to_version),
                        r.time,
                        r.reason
                    )?;
                }
            }
        }
        Command::MarkGood => {
            let v = node.mark_good()?;
            writeln!(out, "v{v} is good")?;
        }
        Command::MarkBad { reason } => match node.mark_bad(&reason)? {
            Some(v) => writeln!(out, "rolled back; v{v} is active")?,
            None => writeln!(out, "marked bad; no version to roll back to")?,
        },
        Command::Run {
            once,
            interval_ms,
            recovery_media,
            metrics_listen,
        } => {
            // Before any thread starts: they inherit the blocked signals.
            let shutdown =
                towalink_system::Shutdown::new().context("cannot make the stop signal")?;
            towalink_system::stop_on_signals(&shutdown, "shutting down")
                .context("cannot set up SIGTERM/SIGINT handling")?;
            let options = crate::daemon::Options {
                dataplane: cli.dataplane,
                once,
                interval: Duration::from_millis(interval_ms),
                recovery_media,
                metrics_listen,
            };
            crate::daemon::run(node, options, &shutdown)?;
        }
        Command::Bootstrap {
            controller,
            ca,
            interval_ms,
            timeout_s,
            code,
            setup_host,
        } => {
            let mut restart = std::collections::BTreeSet::new();
            let host = if setup_host {
                crate::host::require_root()?;
                anyhow::ensure!(
                    cli.state_dir == std::path::Path::new(crate::host::STATE_DIR),
                    "--setup-host: the node service uses the state directory {}; pair into it (no --state-dir), or set the service's TOWALINK_STATE_DIR and pair without --setup-host",
                    crate::host::STATE_DIR
                );
                let host = crate::host::detect_here()?;
                let steps = crate::host::plan(&host);
                crate::host::carry_out(&host, &steps, false, &mut restart, &mut out)?;
                Some((host, steps))
            } else {
                None
            };
            let paired = node.state.path(towalink_bundle::identity::NODE_TOML);
            if host.is_some() && paired.exists() {
                let who = node
                    .state
                    .identity()
                    .map(|i| format!("{}.{} (id {})", i.node, i.site, i.node_id))?;
                writeln!(out, "pairing: already so (this device is {who})")?;
            } else {
                let outcome = crate::bootstrap::bootstrap(
                    &node.state,
                    &controller,
                    ca.as_deref(),
                    Duration::from_millis(interval_ms),
                    timeout_s.map(Duration::from_secs),
                    code.as_ref(),
                )?;
                writeln!(
                    out,
                    "attached as {} (id {}){}",
                    outcome.node,
                    outcome.node_id,
                    if host.is_some() {
                        ""
                    } else {
                        "; start `towalink-node run` (or restart its service)"
                    }
                )?;
                if let Some((host, _)) = &host {
                    // A daemon that ran unpaired learns its management link at its start.
                    restart.insert(crate::host::node_service(host.family));
                }
            }
            if let Some((host, steps)) = host {
                let start: Vec<_> = steps
                    .into_iter()
                    .filter(|s| matches!(s, crate::host::Step::Start { .. }))
                    .collect();
                crate::host::carry_out(&host, &start, true, &mut restart, &mut out)?;
            }
        }
        Command::SetupHost { dry_run, no_start } => {
            let host = crate::host::detect_here()?;
            let steps = crate::host::plan(&host);
            writeln!(out, "host: {}", host.name)?;
            if dry_run {
                for step in &steps {
                    writeln!(out, "{step}")?;
                }
            } else {
                crate::host::require_root()?;
                let mut restart = std::collections::BTreeSet::new();
                crate::host::carry_out(&host, &steps, !no_start, &mut restart, &mut out)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
