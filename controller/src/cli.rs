//! The `tlm` command line: the original Towalink grammar, `tlm <verb> <noun> [target]`.
//!
//! Data goes to stdout, diagnostics to stderr. Exit status: 0 ok, 1 failed or invalid input,
//! 2 usage error.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use toml::Value;

use crate::allocation::NodeAllocation;
use crate::attributes::{parse_value, Level, Merged};
use crate::names::{NodeFullName, NodeRef, SiteName, VersionSpec};
use crate::resolve::{merge_site, resolve};
use crate::store::Store;
use crate::{installation, operate, versions, Error};

/// tlm: manage a Towalink installation (sites, nodes, configuration versions).
#[derive(Debug, Parser)]
#[command(name = "tlm", version, about, long_about = None, max_term_width = 100)]
pub struct Cli {
    /// Configuration directory.
    #[arg(
        short = 'c',
        long,
        env = "TOWALINK_CONFIG_DIR",
        default_value = "/etc/towalink",
        global = true
    )]
    pub config_dir: PathBuf,
    /// Log level of diagnostics on stderr.
    #[arg(
        short = 'l',
        long,
        value_enum,
        default_value = "warning",
        global = true
    )]
    pub loglevel: LogLevel,
    /// Commit message (for `commit`).
    #[arg(short = 'm', long = "message", global = true)]
    pub message: Option<String>,
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

#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct FormatArg {
    /// Output format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List sites, nodes, links, or nodes whose configuration changed since their last commit.
    List {
        #[command(subcommand)]
        what: ListWhat,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show the attributes set at one level (global, a site or a node).
    Show {
        #[command(subcommand)]
        what: ShowWhat,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show the complete attributes of a site or node after merging global → site → node.
    #[command(name = "show_all")]
    ShowAll {
        #[command(subcommand)]
        what: ShowAllWhat,
        /// Say which level (default, global, site, node, generated) set each value.
        #[arg(long, global = true)]
        origin: bool,
        /// Print each attribute's doc beside it (from the attribute schema).
        #[arg(long, global = true)]
        explain: bool,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Add a site or a node.
    #[command(alias = "create")]
    Add {
        #[command(subcommand)]
        what: AddWhat,
    },
    /// Remove a site (without nodes) or a node.
    #[command(alias = "remove")]
    Del {
        #[command(subcommand)]
        what: DelWhat,
    },
    /// Set an attribute; the value is TOML (25, true, '[ "hubs" ]'), checked against the
    /// attribute schema; `empty` removes it. Names of your own start with `user_`.
    Set {
        #[command(subcommand)]
        what: SetWhat,
    },
    /// Create a new version for every node in scope whose configuration changed, and a git commit.
    Commit {
        #[command(subcommand)]
        scope: Scope,
    },
    /// Make nodes run a version (default: latest): recorded, then carried out by the nodes
    /// through the controller service; prints what each node did.
    Activate {
        #[command(subcommand)]
        scope: ActivateScope,
        /// Each node rolls back unless the version is confirmed within SECONDS: healthy and
        /// the controller reached through it (1 to 604800, 7 days).
        #[arg(long, value_name = "SECONDS", global = true,
              value_parser = clap::value_parser!(u64).range(1..=towalink_bundle::orders::MAX_CONFIRM_S))]
        confirm: Option<u64>,
        /// Activate on this node or site first; go on only when all of it blesses the
        /// version (within --timeout), else stop.
        #[arg(long, value_name = "NODE-OR-SITE", global = true)]
        canary: Option<String>,
        /// How long to wait for the nodes (seconds).
        #[arg(long, value_name = "SECONDS", default_value = "30", global = true)]
        timeout: u64,
        /// Wait until each node blessed (or rolled back) the version, not only activated it.
        #[arg(long, global = true)]
        wait_blessed: bool,
        /// Record only; do not wait for the nodes.
        #[arg(long, global = true)]
        no_wait: bool,
    },
    /// Per node: reachable, last seen, active and pending version, tunnels, BGP, uptime,
    /// last rollback (from the controller service's view).
    Status {
        #[command(subcommand)]
        scope: Option<Scope>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Run the controller service: the management WireGuard endpoint and the nodes' API.
    Serve {
        /// Name of the management interface.
        #[arg(long, default_value = "tlmgmt0")]
        interface: String,
    },
    /// Pair a device running `towalink-node bootstrap` with a node (HTTPS, port 8000).
    Attach {
        #[command(subcommand)]
        what: AttachWhat,
        /// Address and port of the attach endpoint.
        #[arg(long, default_value = "0.0.0.0:8000", global = true)]
        listen: std::net::SocketAddr,
        /// How long to collect requests before choosing (seconds).
        #[arg(long, value_name = "SECONDS", default_value = "20", global = true)]
        collect: u64,
        /// Only a device whose id starts with this (the code still has to match).
        #[arg(long, global = true)]
        device: Option<String>,
        /// The pairing code the device shows on its console (`XXXX-XXXX`); asked for when
        /// absent. Nothing is handed out without it.
        #[arg(long, value_name = "CODE", global = true)]
        code: Option<towalink_bundle::pairing::PairingCode>,
        /// Do not ask: hand out to the device showing `--code` (required) as soon as it asks.
        #[arg(long, global = true)]
        yes: bool,
        /// How long to wait for the chosen device and its management link (seconds).
        #[arg(long, value_name = "SECONDS", default_value = "120", global = true)]
        timeout: u64,
        /// Extra host name or address for a certificate made now (repeatable).
        #[arg(long, value_name = "NAME", global = true)]
        san: Vec<String>,
    },
    /// Write a node state directory (identity + latest version) to start `towalink-node` from.
    Provision {
        #[command(subcommand)]
        what: ProvisionWhat,
    },
    /// Node disk images: build (Alpine, diskless, with the node baked in), inspect.
    Image {
        #[command(subcommand)]
        what: ImageWhat,
    },
    /// Run git in the configuration directory.
    Git {
        /// Arguments for git.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListWhat {
    /// All sites.
    Sites,
    /// Nodes of all sites (`all`) or of one site.
    Nodes { site: String },
    /// Nodes whose working configuration differs from their latest committed version.
    Changed,
    /// The WireGuard links of all nodes (`all`, the default), a site or a node.
    Links { target: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum ShowWhat {
    Global,
    Site { site: String },
    Node { node: String },
}

#[derive(Debug, Subcommand)]
pub enum ShowAllWhat {
    Site { site: String },
    Node { node: String },
}

#[derive(Debug, Subcommand)]
pub enum AddWhat {
    Site {
        site: String,
    },
    /// <node>.<site>
    Node {
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DelWhat {
    Site { site: String },
    Node { node: String },
}

#[derive(Debug, Subcommand)]
pub enum SetWhat {
    Global {
        attribute: String,
        value: String,
    },
    Site {
        site: String,
        attribute: String,
        value: String,
    },
    Node {
        node: String,
        attribute: String,
        value: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AttachWhat {
    /// <node>.<site> or id.
    Node { node: String },
}

#[derive(Debug, Subcommand)]
pub enum ProvisionWhat {
    /// <node>.<site> or id, and the directory to write (the node's --state-dir).
    Node { node: String, dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ImageWhat {
    /// Write a bootable disk image for a node (or one per node of a site) from its latest
    /// committed version.
    Build {
        #[command(subcommand)]
        target: ImageTarget,
    },
    /// Show an image's partitions, boot files, node, version and key fingerprints.
    Inspect {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageTarget {
    /// One node: `-o FILE` (`.img` raw and sparse, `.img.zst` zstd).
    Node {
        node: String,
        #[command(flatten)]
        options: ImageOptions,
    },
    /// Every node of a site: `-o DIR` gets `<site>-<node>.img` (`.img.zst` with --zstd).
    Site {
        site: String,
        #[command(flatten)]
        options: ImageOptions,
        /// Compress each image with zstd.
        #[arg(long)]
        zstd: bool,
    },
}

#[derive(Debug, Args)]
pub struct ImageOptions {
    /// Board profile: x86_64 or rpi4.
    #[arg(long)]
    pub board: String,
    /// Output file (node) or directory (site).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Alpine release to fetch (`3.23`: its newest point release; or `3.23.2`).
    #[arg(long, default_value = "3.23", conflicts_with = "alpine_dir")]
    pub alpine_version: String,
    /// Local Alpine release files (laid out as the release file unpacks) instead of a download.
    #[arg(long, value_name = "DIR")]
    pub alpine_dir: Option<PathBuf>,
    /// Alpine mirror (http, https or file URL): release files and the packages the card carries.
    #[arg(long, env = "TOWALINK_ALPINE_MIRROR", default_value = towalink_images::assets::DEFAULT_MIRROR)]
    pub mirror: String,
    /// Package repository of the Alpine branch to take packages from (repeatable, in order).
    #[arg(long = "repository", value_name = "NAME", default_values_t = vec!["main".to_string()])]
    pub repositories: Vec<String>,
    /// Trust this package-signing key besides Alpine's (a `*.rsa.pub` file; repeatable): the
    /// builder checks the index with it and the image's apk trusts it too.
    #[arg(long = "apk-key", value_name = "FILE")]
    pub apk_keys: Vec<PathBuf>,
    /// Cache of downloaded release files and packages (default: ~/.cache/towalink/alpine).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The towalink-node binary for the board (default: found by target, see docs/images.md).
    #[arg(long, value_name = "FILE")]
    pub node_binary: Option<PathBuf>,
}

impl ImageOptions {
    fn sources(&self) -> crate::image::ImageSources {
        let cache = self
            .cache_dir
            .clone()
            .unwrap_or_else(crate::image::default_cache_dir);
        let alpine = match &self.alpine_dir {
            Some(dir) => towalink_images::assets::AlpineSource::Dir(dir.clone()),
            None => towalink_images::assets::AlpineSource::Release {
                version: self.alpine_version.clone(),
                mirror: self.mirror.clone(),
                cache: cache.clone(),
            },
        };
        crate::image::ImageSources {
            alpine,
            packages: towalink_images::packages::PackageSource::new(
                self.mirror.clone(),
                self.repositories.clone(),
                self.apk_keys.clone(),
                cache.join("packages"),
            ),
            node_binary: self.node_binary.clone(),
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scope {
    All,
    Site { site: String },
    Node { node: String },
}

#[derive(Debug, Subcommand)]
pub enum ActivateScope {
    All {
        version: Option<String>,
    },
    Site {
        site: String,
        version: Option<String>,
    },
    Node {
        node: String,
        version: Option<String>,
    },
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<ExitCode, Error> {
    if let Command::Git { args } = &cli.command {
        let store = Store::open_existing(&cli.config_dir)?;
        let status = std::process::Command::new("git")
            .args(args)
            .current_dir(store.root())
            .status()
            .map_err(|e| crate::durable::IoError::new("cannot run git in", store.root(), e))?;
        return Ok(ExitCode::from(
            status.code().unwrap_or(1).clamp(0, 255) as u8
        ));
    }
    // Bad names are refused before the directory is opened (or created by a first command).
    check_arguments(&cli.command)?;
    match &cli.command {
        Command::Serve { interface } => {
            let store = Store::open_existing(&cli.config_dir)?;
            {
                let _lock = store.lock()?;
                recover_for_reading(&store);
                store.ensure_gitignore()?;
            }
            crate::service::serve(&store, interface)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Image { what } => return run_image(&cli.config_dir, what),
        Command::Status { scope, format } => {
            let store = Store::open_existing(&cli.config_dir)?;
            let generated = store.load_generated()?;
            let scope = scope.clone().unwrap_or(Scope::All);
            let detailed = matches!(scope, Scope::Node { .. });
            let filter = scope_filter(&generated, &scope)?;
            let index = versions::load_index(&store)?;
            let activations = versions::load_activations(&store)?;
            let nodes: Vec<operate::NodeStatus> = generated
                .nodes
                .iter()
                .filter(|n| filter(n))
                .map(|n| {
                    let full = n.full_name();
                    operate::NodeStatus {
                        latest: index.nodes.get(&full.to_string()).map(|e| e.latest),
                        desired: activations.nodes.get(&full.to_string()).map(|a| a.version),
                        record: crate::service::records::read_node(&store, &full),
                        node: full,
                        id: n.id,
                    }
                })
                .collect();
            let mut out = std::io::stdout().lock();
            operate::print_status(
                &store,
                &nodes,
                detailed,
                format.format == Format::Json,
                &mut out,
            )
            .ok();
            return Ok(ExitCode::SUCCESS);
        }
        Command::Attach {
            what: AttachWhat::Node { node },
            listen,
            collect,
            device,
            code,
            yes,
            timeout,
            san,
        } => {
            let store = Store::open_existing(&cli.config_dir)?;
            let options = crate::attach::AttachOptions {
                listen: *listen,
                collect: std::time::Duration::from_secs(*collect),
                device: device.clone(),
                code: code.clone(),
                yes: *yes,
                timeout: std::time::Duration::from_secs(*timeout),
                extra_names: san.clone(),
            };
            let mut input = std::io::stdin().lock();
            let mut out = std::io::stdout().lock();
            crate::attach::attach(&store, &node.parse()?, &options, &mut input, &mut out)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let store = Store::open_or_init(&cli.config_dir)?;
    let mut out = std::io::stdout().lock();
    // Reading never needs git, and never holds the lock while templates render.
    match cli.command {
        Command::List { what, format } => {
            drop_after_recovery(&store)?;
            list(&store, what, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { what, format } => {
            drop_after_recovery(&store)?;
            show(&store, what, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ShowAll {
            what,
            origin,
            explain,
            format,
        } => {
            drop_after_recovery(&store)?;
            show_all(&store, what, origin, explain, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        command => run_changing(&store, command, cli.message.clone(), &mut out),
    }
}

/// Finishes an interrupted commit when possible; a reading command goes on without it (with
/// a warning) when that fails, e.g. because git cannot run.
fn recover_for_reading(store: &Store) {
    if let Err(e) = versions::recover(store) {
        tracing::warn!(
            "could not finish an interrupted commit ({e}); reading the directory as it is"
        );
    }
}

/// Takes the lock for recovery only: reading commands run without it.
fn drop_after_recovery(store: &Store) -> Result<(), Error> {
    let _lock = store.lock()?;
    recover_for_reading(store);
    Ok(())
}

/// Runs a command that changes the directory, holding its lock.
fn run_changing(
    store: &Store,
    command: Command,
    message: Option<String>,
    out: &mut impl std::io::Write,
) -> Result<ExitCode, Error> {
    let store = store.clone();
    let lock = store.lock()?;
    versions::recover(&store)?;
    // A secret about to enter git refuses any change before anything is written.
    crate::git::check_recorded_paths(store.root())?;
    let mut out = out;
    match command {
        Command::List { .. } | Command::Show { .. } | Command::ShowAll { .. } => {
            unreachable!("handled by run")
        }
        Command::Add { what } => match what {
            AddWhat::Site { site } => {
                let site = parse_site(&site)?;
                let id = installation::add_site(&store, &site)?;
                let asn = store.load_generated()?.site(site.as_str())?.asn;
                writeln!(out, "added site {site} (id {id}, AS {asn})").ok();
            }
            AddWhat::Node { node } => {
                let node: NodeFullName = node.parse()?;
                let n = installation::add_node(&store, &node)?;
                writeln!(
                    out,
                    "added node {node} (id {}, loopbacks {} {})",
                    n.id, n.loopback_ipv4, n.loopback_ipv6
                )
                .ok();
            }
        },
        Command::Del { what } => match what {
            DelWhat::Site { site } => {
                let site = parse_site(&site)?;
                installation::remove_site(&store, &site)?;
                writeln!(out, "removed site {site}").ok();
            }
            DelWhat::Node { node } => {
                let n = installation::remove_node(&store, &node.parse()?)?;
                writeln!(out, "removed node {} (id {})", n.full_name(), n.id).ok();
            }
        },
        Command::Set { what } => {
            let (level, attribute, value) = match what {
                SetWhat::Global { attribute, value } => (Level::Global, attribute, value),
                SetWhat::Site {
                    site,
                    attribute,
                    value,
                } => {
                    let site = parse_site(&site)?;
                    store.load_generated()?.site(site.as_str())?;
                    (Level::Site(site), attribute, value)
                }
                SetWhat::Node {
                    node,
                    attribute,
                    value,
                } => {
                    let n = store.load_generated()?.node(&node.parse()?)?.clone();
                    (Level::Node(n.site, n.name), attribute, value)
                }
            };
            let parsed = if value == "empty" {
                None
            } else {
                Some(parse_value(&attribute, &value)?)
            };
            match installation::set_attribute(&store, &level, &attribute, parsed)? {
                installation::SetOutcome::Set => {}
                installation::SetOutcome::Removed => {}
                installation::SetOutcome::NotSet => {
                    tracing::warn!(
                        "`{}` does not set `{attribute}`: nothing removed",
                        level.file()
                    );
                }
            }
        }
        Command::Commit { scope } => {
            let generated = store.load_generated()?;
            let filter = scope_filter(&generated, &scope)?;
            let message = message.unwrap_or_else(|| match &scope {
                Scope::All => "tlm commit all".to_string(),
                Scope::Site { site } => format!("tlm commit site {site}"),
                Scope::Node { node } => format!("tlm commit node {node}"),
            });
            let outcome = versions::commit(&store, filter, &message)?;
            for (node, version) in &outcome.created {
                writeln!(out, "{node}: v{version}").ok();
            }
            writeln!(
                out,
                "committed: {} new version(s), {} node(s) unchanged{}",
                outcome.created.len(),
                outcome.unchanged.len(),
                if outcome.git_committed {
                    ""
                } else {
                    ", nothing new for git"
                }
            )
            .ok();
        }
        Command::Activate {
            scope,
            confirm,
            canary,
            timeout,
            wait_blessed,
            no_wait,
        } => {
            let tree = store.load_tree()?;
            let (filter, spec, words) = match &scope {
                ActivateScope::All { version } => (
                    scope_filter(&tree.generated, &Scope::All)?,
                    parse_version(version)?,
                    "all".to_string(),
                ),
                ActivateScope::Site { site, version } => (
                    scope_filter(&tree.generated, &Scope::Site { site: site.clone() })?,
                    parse_version(version)?,
                    format!("site {site}"),
                ),
                ActivateScope::Node { node, version } => (
                    scope_filter(&tree.generated, &Scope::Node { node: node.clone() })?,
                    parse_version(version)?,
                    format!("node {node}"),
                ),
            };
            let nodes = versions::nodes_in_scope(&tree, filter);
            let message = message.unwrap_or_else(|| format!("tlm activate {words} {spec}"));
            let service = crate::service::records::running_service(&store);
            let (first, rest): (Vec<&NodeAllocation>, Vec<&NodeAllocation>) = match &canary {
                None => (nodes, Vec::new()),
                Some(c) => {
                    if service.is_none() {
                        return Err(Error::Service(
                            "--canary needs the controller service running (`tlm serve`): it waits for the canary to bless".into(),
                        ));
                    }
                    let (canaries, rest): (Vec<_>, Vec<_>) =
                        nodes.into_iter().partition(|n| canary_matches(c, n));
                    if canaries.is_empty() {
                        return Err(Error::Service(format!(
                            "--canary `{c}` matches no node in the scope of this activation"
                        )));
                    }
                    (canaries, rest)
                }
            };
            let timeout = std::time::Duration::from_secs(timeout);
            let recorded = versions::activate(&store, &first, spec, confirm, &message)?;
            drop(lock);
            print_recorded(&recorded, &mut out);
            if no_wait {
                return Ok(ExitCode::SUCCESS);
            }
            if service.is_none() {
                eprintln!("the controller service is not running: recorded; the nodes take it when `tlm serve` runs");
                return Ok(ExitCode::SUCCESS);
            }
            let until_blessed = wait_blessed || canary.is_some();
            let ok = report_outcomes(&store, &recorded, until_blessed, timeout, &mut out);
            if let Some(c) = &canary {
                if !ok {
                    writeln!(
                        out,
                        "stopped: canary `{c}` did not bless the version; {} other node(s) keep their version",
                        rest.len()
                    )
                    .ok();
                    return Ok(ExitCode::FAILURE);
                }
                if rest.is_empty() {
                    return Ok(ExitCode::SUCCESS);
                }
                writeln!(
                    out,
                    "canary `{c}` blessed the version; activating the other {} node(s)",
                    rest.len()
                )
                .ok();
                let recorded = {
                    let _lock = store.lock()?;
                    versions::activate(&store, &rest, spec, confirm, &message)?
                };
                print_recorded(&recorded, &mut out);
                if !report_outcomes(&store, &recorded, wait_blessed, timeout, &mut out) {
                    return Ok(ExitCode::FAILURE);
                }
                return Ok(ExitCode::SUCCESS);
            }
            if !ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Provision {
            what: ProvisionWhat::Node { node, dir },
        } => {
            let (n, version) = installation::provision_node(&store, &node.parse()?, &dir)?;
            writeln!(
                out,
                "provisioned {} (id {}) with v{version} in {}",
                n.full_name(),
                n.id,
                dir.display()
            )
            .ok();
        }
        Command::Git { .. }
        | Command::Serve { .. }
        | Command::Status { .. }
        | Command::Image { .. }
        | Command::Attach { .. } => unreachable!("handled above"),
    }
    // `signing.pub` is rewritten from the signing key when missing or different (after the
    // command succeeded: a refused command writes nothing).
    versions::controller_public_key(&store)?;
    Ok(ExitCode::SUCCESS)
}

fn canary_matches(canary: &str, node: &NodeAllocation) -> bool {
    match canary.parse::<NodeRef>() {
        Ok(NodeRef::Id(id)) => node.id == id,
        Ok(NodeRef::Name(full)) => full == node.full_name(),
        Err(_) => node.site.as_str() == canary,
    }
}

fn print_recorded(recorded: &[versions::Recorded], out: &mut impl std::io::Write) {
    for r in recorded {
        let version = r.activation.version;
        match r.previous {
            Some(p) if p != version => writeln!(out, "{}: v{version} (was v{p})", r.node),
            Some(_) => writeln!(out, "{}: v{version} (unchanged)", r.node),
            None => writeln!(out, "{}: v{version}", r.node),
        }
        .ok();
    }
}

/// Waits for the nodes and prints each one's outcome; true when all succeeded.
fn report_outcomes(
    store: &Store,
    recorded: &[versions::Recorded],
    until_blessed: bool,
    timeout: std::time::Duration,
    out: &mut impl std::io::Write,
) -> bool {
    let targets: Vec<operate::Target> = recorded
        .iter()
        .map(|r| operate::Target {
            node: r.node.clone(),
            version: r.activation.version,
            order: r.activation.order,
        })
        .collect();
    let started = std::time::Instant::now();
    let outcomes = operate::wait(store, &targets, until_blessed, timeout);
    let elapsed = started.elapsed().as_secs_f64();
    let mut ok = true;
    for (target, outcome) in targets.iter().zip(&outcomes) {
        ok &= outcome.success(until_blessed);
        writeln!(
            out,
            "{}: v{} {}",
            target.node,
            target.version,
            outcome.word()
        )
        .ok();
    }
    let done = outcomes.iter().filter(|o| o.success(until_blessed)).count();
    writeln!(
        out,
        "{done} of {} node(s) {} in {elapsed:.2} s",
        targets.len(),
        if until_blessed {
            "blessed the version"
        } else {
            "took the version"
        }
    )
    .ok();
    ok
}

/// Parses every name, node and version argument, so a refused command touches nothing.
fn check_arguments(command: &Command) -> Result<(), Error> {
    let site = |s: &str| parse_site(s).map(|_| ());
    let node = |s: &str| s.parse::<NodeRef>().map(|_| ()).map_err(Error::from);
    let version = |v: &Option<String>| parse_version(v).map(|_| ());
    match command {
        Command::Show {
            what: ShowWhat::Site { site: s },
            ..
        }
        | Command::ShowAll {
            what: ShowAllWhat::Site { site: s },
            ..
        }
        | Command::Add {
            what: AddWhat::Site { site: s },
        }
        | Command::Del {
            what: DelWhat::Site { site: s },
        }
        | Command::Set {
            what: SetWhat::Site { site: s, .. },
        }
        | Command::Commit {
            scope: Scope::Site { site: s },
        } => site(s),
        Command::Show {
            what: ShowWhat::Node { node: n },
            ..
        }
        | Command::ShowAll {
            what: ShowAllWhat::Node { node: n },
            ..
        }
        | Command::Del {
            what: DelWhat::Node { node: n },
        }
        | Command::Set {
            what: SetWhat::Node { node: n, .. },
        }
        | Command::Commit {
            scope: Scope::Node { node: n },
        }
        | Command::Provision {
            what: ProvisionWhat::Node { node: n, .. },
        } => node(n),
        Command::Add {
            what: AddWhat::Node { node: n },
        } => n.parse::<NodeFullName>().map(|_| ()).map_err(Error::from),
        Command::Activate {
            scope: ActivateScope::All { version: v },
            ..
        } => version(v),
        Command::Activate {
            scope:
                ActivateScope::Site {
                    site: s,
                    version: v,
                },
            ..
        } => site(s).and_then(|_| version(v)),
        Command::Activate {
            scope:
                ActivateScope::Node {
                    node: n,
                    version: v,
                },
            ..
        } => node(n).and_then(|_| version(v)),
        Command::List {
            what: ListWhat::Nodes { site: s },
            ..
        } if s != "all" => site(s),
        _ => Ok(()),
    }
}

fn parse_site(text: &str) -> Result<SiteName, Error> {
    Ok(text.parse()?)
}

fn parse_version(text: &Option<String>) -> Result<VersionSpec, Error> {
    match text {
        None => Ok(VersionSpec::Latest),
        Some(text) => Ok(text.parse()?),
    }
}

fn scope_filter(
    generated: &crate::allocation::Generated,
    scope: &Scope,
) -> Result<Box<dyn Fn(&NodeAllocation) -> bool>, Error> {
    Ok(match scope {
        Scope::All => Box::new(|_| true),
        Scope::Site { site } => {
            let site = parse_site(site)?;
            generated.site(site.as_str())?;
            Box::new(move |n| n.site == site)
        }
        Scope::Node { node } => {
            let id = generated.node(&node.parse()?)?.id;
            Box::new(move |n| n.id == id)
        }
    })
}

fn print_json(out: &mut impl std::io::Write, value: &serde_json::Value) {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    )
    .ok();
}

fn list(
    store: &Store,
    what: ListWhat,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    match what {
        ListWhat::Sites => {
            let generated = store.load_generated()?;
            if format == Format::Json {
                let sites: Vec<_> = generated
                    .sites
                    .iter()
                    .map(|s| json!({"site": s.name, "id": s.id, "asn": s.asn, "nodes": generated.nodes_of(&s.name).count()}))
                    .collect();
                print_json(out, &json!(sites));
            } else {
                let rows: Vec<Vec<String>> = generated
                    .sites
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.to_string(),
                            s.name.to_string(),
                            s.asn.to_string(),
                            generated.nodes_of(&s.name).count().to_string(),
                        ]
                    })
                    .collect();
                table(out, &["ID", "SITE", "ASN", "NODES"], &rows);
            }
        }
        ListWhat::Nodes { site } => {
            let generated = store.load_generated()?;
            if site != "all" {
                generated.site(&site)?;
            }
            let nodes: Vec<&NodeAllocation> = generated
                .nodes
                .iter()
                .filter(|n| site == "all" || n.site.as_str() == site)
                .collect();
            let index = versions::load_index(store)?;
            let activations = versions::load_activations(store)?;
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            for n in nodes {
                let full = n.full_name();
                let latest = index.nodes.get(&full.to_string()).map(|e| e.latest);
                let active = activations.nodes.get(&full.to_string()).map(|a| a.version);
                objects.push(json!({
                    "node": full.to_string(), "id": n.id, "site": n.site, "name": n.name,
                    "loopback_ipv4": n.loopback_ipv4, "loopback_ipv6": n.loopback_ipv6,
                    "wg_public_key": n.wg_public_key, "latest_version": latest, "activate_version": active,
                }));
                let v = |x: Option<u32>| x.map_or("-".to_string(), |v| format!("v{v}"));
                rows.push(vec![
                    n.id.to_string(),
                    full.to_string(),
                    n.loopback_ipv4.to_string(),
                    n.loopback_ipv6.to_string(),
                    v(latest),
                    v(active),
                ]);
            }
            if format == Format::Json {
                print_json(out, &json!(objects));
            } else {
                table(
                    out,
                    &[
                        "ID",
                        "NODE",
                        "LOOPBACK_IPV4",
                        "LOOPBACK_IPV6",
                        "LATEST",
                        "ACTIVATE",
                    ],
                    &rows,
                );
            }
        }
        ListWhat::Changed => {
            let tree = store.load_tree()?;
            let nodes = versions::nodes_in_scope(&tree, |_| true);
            let states = versions::changed_nodes(store, &tree, &nodes)?;
            let changed: Vec<_> = states.iter().filter(|s| s.changed).collect();
            if format == Format::Json {
                let objects: Vec<_> = changed
                    .iter()
                    .map(|s| json!({"node": s.node.to_string(), "latest_version": s.latest}))
                    .collect();
                print_json(out, &json!(objects));
            } else {
                for s in changed {
                    match s.latest {
                        Some(v) => writeln!(out, "{} (latest v{v})", s.node),
                        None => writeln!(out, "{} (no version yet)", s.node),
                    }
                    .ok();
                }
            }
        }
        ListWhat::Links { target } => {
            let tree = store.load_tree()?;
            let resolved = resolve(&tree)?;
            let target = target.unwrap_or_else(|| "all".into());
            let filter: Box<dyn Fn(&NodeAllocation) -> bool> = if target == "all" {
                Box::new(|_| true)
            } else if target.contains('.') || target.bytes().all(|b| b.is_ascii_digit()) {
                let id = tree.generated.node(&target.parse::<NodeRef>()?)?.id;
                Box::new(move |n| n.id == id)
            } else {
                tree.generated.site(&target)?;
                let site = target.clone();
                Box::new(move |n| n.site.as_str() == site)
            };
            let by_id: std::collections::BTreeMap<u32, &NodeAllocation> =
                tree.generated.nodes.iter().map(|n| (n.id, n)).collect();
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            for link in resolved.links() {
                let (a, b) = (by_id[&link.low], by_id[&link.high]);
                if !filter(a) && !filter(b) {
                    continue;
                }
                let peer_ab = resolved.peers(a.id).into_iter().find(|p| p.peer_id == b.id);
                let Some(p) = peer_ab else { continue };
                objects.push(json!({
                    "a": a.full_name().to_string(), "b": b.full_name().to_string(),
                    "a_interface": p.interface, "a_port": p.listen_port,
                    "b_interface": crate::topology::interface_name(a.id), "b_port": p.peer_port,
                    "a_link_local": p.local_link_local, "b_link_local": p.peer_link_local,
                }));
                rows.push(vec![
                    a.full_name().to_string(),
                    format!("{}:{}", p.interface, p.listen_port),
                    b.full_name().to_string(),
                    format!("{}:{}", crate::topology::interface_name(a.id), p.peer_port),
                ]);
            }
            if format == Format::Json {
                print_json(out, &json!(objects));
            } else {
                table(out, &["NODE_A", "A_IF:PORT", "NODE_B", "B_IF:PORT"], &rows);
            }
        }
    }
    Ok(())
}

fn table(out: &mut impl std::io::Write, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    writeln!(out, "{}", line(header.to_vec())).ok();
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect())).ok();
    }
}

fn show(
    store: &Store,
    what: ShowWhat,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let level = match what {
        ShowWhat::Global => Level::Global,
        ShowWhat::Site { site } => {
            let site = parse_site(&site)?;
            store.load_generated()?.site(site.as_str())?;
            Level::Site(site)
        }
        ShowWhat::Node { node } => {
            let n = store.load_generated()?.node(&node.parse()?)?.clone();
            Level::Node(n.site, n.name)
        }
    };
    let table = store.level_attributes(&level)?;
    if format == Format::Json {
        print_json(
            out,
            &serde_json::to_value(&table).expect("TOML tables convert to JSON"),
        );
    } else {
        write!(
            out,
            "{}",
            toml::to_string(&table).expect("TOML tables serialize")
        )
        .ok();
    }
    Ok(())
}

fn show_all(
    store: &Store,
    what: ShowAllWhat,
    origin: bool,
    explain: bool,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    let tree = store.load_tree()?;
    let merged: Merged = match what {
        ShowAllWhat::Site { site } => {
            let site = parse_site(&site)?;
            tree.generated.site(site.as_str())?;
            let mut merged = merge_site(&tree, &site);
            let allocation = tree.generated.site(site.as_str())?;
            merged.set(
                "site_name",
                Value::String(site.to_string()),
                Level::Generated,
            );
            merged.set(
                "site_id",
                Value::Integer(allocation.id.into()),
                Level::Generated,
            );
            if !merged.values.contains_key("asn") {
                merged.set(
                    "asn",
                    Value::Integer(allocation.asn.into()),
                    Level::Generated,
                );
            }
            merged
        }
        ShowAllWhat::Node { node } => {
            let id = tree.generated.node(&node.parse()?)?.id;
            let resolved = resolve(&tree)?;
            resolved
                .complete_attributes(id)
                .expect("allocated nodes are resolved")
        }
    };
    match (format, origin || explain) {
        (Format::Json, false) => print_json(
            out,
            &serde_json::to_value(&merged.values).expect("TOML converts to JSON"),
        ),
        (Format::Json, true) => {
            let leaves: serde_json::Map<String, serde_json::Value> = merged
                .leaves()
                .into_iter()
                .map(|(path, value, level)| {
                    let mut entry = serde_json::Map::new();
                    entry.insert(
                        "value".into(),
                        serde_json::to_value(&value).expect("TOML converts to JSON"),
                    );
                    if origin {
                        entry.insert("level".into(), json!(level.kind()));
                        entry.insert("file".into(), json!(level.file()));
                    }
                    if explain {
                        entry.insert("doc".into(), json!(crate::schema::doc_for(&path)));
                    }
                    (path, serde_json::Value::Object(entry))
                })
                .collect();
            print_json(out, &serde_json::Value::Object(leaves));
        }
        (Format::Text, false) => {
            write!(
                out,
                "{}",
                toml::to_string(&merged.values).expect("TOML serializes")
            )
            .ok();
        }
        (Format::Text, true) => {
            let lines: Vec<(String, String)> = merged
                .leaves()
                .into_iter()
                .map(|(path, value, level)| {
                    let comment = match (origin, explain) {
                        (true, true) => {
                            format!("{}: {}", level.file(), crate::schema::doc_for(&path))
                        }
                        (true, false) => level.file(),
                        _ => crate::schema::doc_for(&path),
                    };
                    (format!("{path} = {value}"), comment)
                })
                .collect();
            let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
            for (line, comment) in lines {
                writeln!(out, "{line:<width$}  # {comment}").ok();
            }
        }
    }
    Ok(())
}

fn print_build(report: &towalink_images::build::BuildReport, out: &mut impl std::io::Write) {
    let mib = |b: u64| b as f64 / 1048576.0;
    let total: f64 = report.millis.values().sum();
    writeln!(
        out,
        "wrote {} for {} (id {}, v{}, board {}, Alpine {}): image {:.0} MiB, file {:.1} MiB, apkovl {:.1} MiB, {} packages; {:.0} ms",
        report.output.display(),
        report.manifest.node,
        report.manifest.node_id,
        report.manifest.version,
        report.manifest.board,
        report.manifest.alpine_version,
        mib(report.image_bytes),
        mib(report.output_bytes),
        mib(report.apkovl_bytes),
        report.manifest.packages.len(),
        total
    )
    .ok();
    tracing::debug!(phases = ?report.millis, "image build");
}

fn run_image(config_dir: &std::path::Path, what: &ImageWhat) -> Result<ExitCode, Error> {
    let mut out = std::io::stdout().lock();
    match what {
        ImageWhat::Inspect { file, format } => {
            let report = towalink_images::inspect::inspect(file).map_err(Error::Image)?;
            if *format == Format::Json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                )
                .ok();
            } else {
                print_inspection(&report, &mut out);
            }
        }
        ImageWhat::Build { target } => {
            let store = Store::open_existing(config_dir)?;
            let output = match target {
                ImageTarget::Node { options, .. } | ImageTarget::Site { options, .. } => {
                    &options.output
                }
            };
            if store.contains(output) {
                return Err(Error::ImageInsideConfig(output.clone()));
            }
            match target {
                ImageTarget::Node { node, options } => {
                    let node_ref: NodeRef = node.parse()?;
                    let board = crate::image::board(&options.board)?;
                    let report = crate::image::build_node_image(
                        &store,
                        &node_ref,
                        &board,
                        &options.sources(),
                        &options.output,
                    )?;
                    print_build(&report, &mut out);
                }
                ImageTarget::Site {
                    site,
                    options,
                    zstd,
                } => {
                    let site: SiteName = site.parse()?;
                    let board = crate::image::board(&options.board)?;
                    let generated = store.load_generated()?;
                    if !generated.sites.iter().any(|s| s.name == site) {
                        return Err(crate::allocation::AllocationError::UnknownSite(
                            site.to_string(),
                        )
                        .into());
                    }
                    let nodes: Vec<&NodeAllocation> =
                        generated.nodes.iter().filter(|n| n.site == site).collect();
                    crate::durable::create_dir_all(&options.output)?;
                    let sources = options.sources();
                    for n in nodes {
                        let file = options.output.join(format!(
                            "{}-{}.img{}",
                            n.site,
                            n.name,
                            if *zstd { ".zst" } else { "" }
                        ));
                        let report = crate::image::build_node_image(
                            &store,
                            &NodeRef::Id(n.id),
                            &board,
                            &sources,
                            &file,
                        )?;
                        print_build(&report, &mut out);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_inspection(r: &towalink_images::inspect::ImageReport, out: &mut impl std::io::Write) {
    let mib = |b: u64| b as f64 / 1048576.0;
    writeln!(
        out,
        "image:       {} ({}{:.0} MiB, disk id {})",
        r.file,
        if r.compressed { "zstd, " } else { "" },
        mib(r.image_bytes),
        r.disk_id
    )
    .ok();
    if let Some(m) = &r.manifest {
        writeln!(
            out,
            "node:        {} (id {}), version v{}, hostname {}",
            m.node, m.node_id, m.version, m.hostname
        )
        .ok();
        writeln!(
            out,
            "board:       {} ({}), Alpine {}",
            m.board, m.alpine_arch, m.alpine_version
        )
        .ok();
    }
    writeln!(
        out,
        "boot:        BIOS {}, UEFI {}",
        if r.bios_boot { "yes (syslinux)" } else { "no" },
        if r.uefi_boot { "yes" } else { "no" }
    )
    .ok();
    for p in &r.partitions {
        writeln!(
            out,
            "partition {}: {}{}, at {:.0} MiB, {:.0} MiB, {}",
            p.number,
            p.kind,
            if p.bootable { ", active" } else { "" },
            mib(p.start_bytes),
            mib(p.size_bytes),
            p.filesystem
        )
        .ok();
    }
    if let Some(n) = &r.node {
        writeln!(
            out,
            "identity:    {} (id {}), versions {}",
            n.node,
            n.node_id,
            n.versions
                .iter()
                .map(|v| format!("v{v}"))
                .collect::<Vec<_>>()
                .join(" ")
        )
        .ok();
        writeln!(
            out,
            "  wireguard key    {} ({})",
            n.wg_public_key, n.wg_key_fingerprint
        )
        .ok();
        writeln!(out, "  controller key   {}", n.controller_key_fingerprint).ok();
        if let Some(m) = &n.management_wg_key_fingerprint {
            writeln!(
                out,
                "  management key   {m}, endpoints {}",
                n.controller_endpoints.join(", ")
            )
            .ok();
        }
    }
    if let Some(a) = &r.apkovl {
        writeln!(
            out,
            "apkovl:      {} ({} entries, sha256 {}), towalink-node: {}",
            a.file,
            a.entries.len(),
            &a.sha256[..16],
            a.node_binary.as_deref().unwrap_or("missing")
        )
        .ok();
    }
    if r.packages.is_empty() {
        writeln!(
            out,
            "packages:    none on the card (installed from the network at boot)"
        )
        .ok();
    } else {
        writeln!(
            out,
            "packages:    {} on the card ({:.1} MiB), installed from it at every boot",
            r.packages.len(),
            mib(r.packages.iter().map(|p| p.size).sum())
        )
        .ok();
        for p in &r.packages {
            writeln!(out, "  {:<28} {:<16} {}", p.name, p.version, p.repository).ok();
        }
    }
    writeln!(out, "boot files:").ok();
    for f in &r.boot_files {
        writeln!(out, "  {:>10}  {}", f.size, f.path).ok();
    }
}
