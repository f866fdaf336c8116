//! The `towalink-node` command line. Exit status: 0 ok, 1 failed or refused, 2 usage.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use towalink_bundle::messages::TunnelReport;

use crate::apply::Reloader;
use crate::bird::BirdControl;
use crate::dataplane::{Boringtun, DataPlane, DesiredState, KernelWireGuard};
use crate::lifecycle::{Node, VersionSpec, Watch};
use crate::management::{self, Shared};
use crate::state::Installed;

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
    /// there and in-process boringtun otherwise; `none` manages only files and BIRD (where
    /// another tool owns the tunnels).
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub dataplane: DataPlaneKind,
    /// Log level on stderr.
    #[arg(short = 'l', long, value_enum, default_value = "info", global = true)]
    pub loglevel: LogLevel,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    pub fn tracing_level(self) -> tracing::Level {
        match self {
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Warning => tracing::Level::WARN,
            LogLevel::Error => tracing::Level::ERROR,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DataPlaneKind {
    Auto,
    Boringtun,
    Kernel,
    None,
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
    },
    /// The daemon: recover from disk, then watch pending versions (bless or roll back).
    Run {
        /// Do the start-up work and one check, then exit.
        #[arg(long)]
        once: bool,
        /// Milliseconds between checks.
        #[arg(long, default_value = "1000")]
        interval_ms: u64,
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
            let spec: VersionSpec = version.parse().map_err(anyhow::Error::msg)?;
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
        Command::Run { once, interval_ms } => {
            crate::dataplane::netlink::enable_forwarding();
            node.startup()?;
            let mut dataplane = match cli.dataplane {
                DataPlaneKind::Boringtun => Some(DataPlane::new(Box::new(Boringtun::new()))?),
                DataPlaneKind::Kernel => Some(DataPlane::new(Box::new(KernelWireGuard::probe()?))?),
                DataPlaneKind::Auto => Some(match KernelWireGuard::probe() {
                    Ok(kernel) => {
                        tracing::info!("WireGuard: kernel module");
                        DataPlane::new(Box::new(kernel))?
                    }
                    Err(reason) => {
                        tracing::info!(%reason, "WireGuard: in-process boringtun");
                        DataPlane::new(Box::new(Boringtun::new()))?
                    }
                }),
                DataPlaneKind::None => None,
            };
            let shared = Arc::new(Shared::default());
            match node.controller_api() {
                Some(api) if !once => {
                    let node = Node::new(&cli.state_dir, &cli.root, node.reloader.clone());
                    let shared = Arc::clone(&shared);
                    std::thread::Builder::new()
                        .name("management".into())
                        .spawn(move || management::run(node, api, shared))
                        .context("cannot start the management thread")?;
                    tracing::info!(%api, "syncing with the controller through the management link");
                }
                Some(_) => {}
                None => tracing::info!(
                    "no management link in the identity: running without a controller"
                ),
            }
            let mut applied: Option<DesiredState> = None;
            let mut retry_in = 0u32;
            let mut watch = Watch::default();
            let mut last_rx: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
            let mut fingerprint = String::new();
            loop {
                let seen = shared.generation.load(Ordering::SeqCst);
                if let Some(dataplane) = dataplane.as_mut() {
                    // The tunnels follow the current version and the identity; unresolved
                    // endpoints are retried every ten checks.
                    match node.desired_dataplane() {
                        Ok(desired) => {
                            retry_in = retry_in.saturating_sub(1);
                            if applied.as_ref() != Some(&desired) || retry_in == 0 {
                                match dataplane.reconcile(&desired) {
                                    Ok(report) => {
                                        if report.changed() {
                                            tracing::info!(created = ?report.created, reconfigured = ?report.reconfigured, removed = ?report.removed, "data plane reconciled");
                                        }
                                        retry_in = if report.unresolved.is_empty() {
                                            u32::MAX
                                        } else {
                                            10
                                        };
                                        applied = Some(desired);
                                    }
                                    Err(error) => {
                                        tracing::error!(%error, "data plane reconciliation failed");
                                        retry_in = 10;
                                    }
                                }
                            }
                            let tunnels = tunnel_reports(dataplane, applied.as_ref(), &mut last_rx);
                            if let Ok(mut shared_tunnels) = shared.tunnels.lock() {
                                *shared_tunnels = tunnels;
                            }
                        }
                        Err(error) => tracing::error!(%error, "cannot read the active version"),
                    }
                }
                if let Err(error) = node.tick(&mut watch) {
                    tracing::error!(%error, "check failed");
                }
                // Report at once when the disk state or a BGP session changes.
                let bgp: Vec<(String, String, String)> = node
                    .reloader
                    .bird
                    .protocols()
                    .map(|ps| {
                        ps.into_iter()
                            .filter(|p| p.proto == "BGP")
                            .map(|p| (p.name, p.state, p.info))
                            .collect()
                    })
                    .unwrap_or_default();
                let now_state = format!("{:?} {bgp:?}", node.state.read().ok());
                if now_state != fingerprint {
                    fingerprint = now_state;
                    shared.changed();
                }
                if once {
                    break;
                }
                // Sleep, but wake early when the management thread changed something.
                let until = Instant::now() + Duration::from_millis(interval_ms);
                while Instant::now() < until && shared.generation.load(Ordering::SeqCst) == seen {
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
        }
        Command::Bootstrap {
            controller,
            ca,
            interval_ms,
            timeout_s,
            code,
        } => {
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
                "attached as {} (id {}); start `towalink-node run`",
                outcome.node, outcome.node_id
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Counters of the node's links, with how long ago each last received something.
fn tunnel_reports(
    dataplane: &mut DataPlane,
    desired: Option<&DesiredState>,
    last_rx: &mut BTreeMap<String, (u64, Instant)>,
) -> Vec<TunnelReport> {
    let Some(desired) = desired else {
        return Vec::new();
    };
    let names = desired.links.keys().cloned().chain(
        desired
            .management
            .as_ref()
            .map(|m| m.wireguard.name.clone()),
    );
    let mut reports = Vec::new();
    for name in names {
        let Ok(stats) = dataplane.stats(&name) else {
            continue;
        };
        let entry = last_rx.entry(name.clone()).or_insert((0, Instant::now()));
        if stats.rx_bytes != entry.0 {
            *entry = (stats.rx_bytes, Instant::now());
        }
        reports.push(TunnelReport {
            interface: name,
            rx_bytes: stats.rx_bytes,
            tx_bytes: stats.tx_bytes,
            last_rx_age_s: (stats.rx_bytes > 0).then(|| entry.1.elapsed().as_secs()),
        });
    }
    last_rx.retain(|name, _| reports.iter().any(|r| &r.interface == name));
    reports
}
