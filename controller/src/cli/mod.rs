//! The `tlm` command line: the original Towalink grammar, `tlm <verb> <noun> [target]`.
//!
//! This module holds the grammar (clap types); [`output`] the shared output helpers;
//! [`crate::commands`] what each command does.
//!
//! Data goes to stdout, diagnostics to stderr. Exit status: 0 ok, 1 failed or invalid input,
//! 2 usage error.

pub mod output;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
pub use towalink_bundle::args::LogLevel;

/// tlm: manage a Towalink installation (sites, nodes, configuration versions).
#[derive(Debug, Parser)]
#[command(
    name = "tlm",
    version,
    about,
    long_about = None,
    max_term_width = 100,
    disable_help_flag = true,
    after_help = "Examples:\n  \
        tlm add site mysite1 && tlm add node primary.mysite1\n  \
        tlm set global topology star\n  \
        tlm -m \"first\" commit all\n  \
        tlm activate all --canary mysite1\n  \
        tlm set -?            (help on any command: -?, -h or --help)\n\n\
        Docs: README.md, docs/ (operations.md, controller-service.md, images.md, recovery.md)."
)]
pub struct Cli {
    /// Print help (`-?`, `-h` or `--help`, on every command).
    #[arg(short = '?', short_alias = 'h', long = "help", action = clap::ArgAction::Help, global = true)]
    help: Option<bool>,
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
        value_parser = clap::builder::TypedValueParser::try_map(clap::builder::PossibleValuesParser::new(LogLevel::NAMES), |s| s.parse::<LogLevel>()),
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
    #[command(
        after_help = "Examples:\n  tlm list sites\n  tlm list nodes all --format json\n  tlm list links mysite1\n  tlm list changed\n  tlm list versions primary.mysite1"
    )]
    List {
        #[command(subcommand)]
        what: ListWhat,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show the attributes set at one level (global, a site or a node).
    #[command(
        after_help = "Examples:\n  tlm show global\n  tlm show site mysite1\n  tlm show node primary.mysite1 --format json"
    )]
    Show {
        #[command(subcommand)]
        what: ShowWhat,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show the complete attributes of a site or node after merging global → site → node.
    #[command(name = "show_all")]
    #[command(
        after_help = "Examples:\n  tlm show_all node primary.mysite1 --origin\n  tlm show_all site mysite1 --explain"
    )]
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
    #[command(after_help = "Examples:\n  tlm add site mysite1\n  tlm add node primary.mysite1")]
    Add {
        #[command(subcommand)]
        what: AddWhat,
    },
    /// Remove a site (without nodes) or a node.
    #[command(alias = "remove")]
    #[command(after_help = "Examples:\n  tlm del node primary.mysite1\n  tlm del site mysite1")]
    Del {
        #[command(subcommand)]
        what: DelWhat,
    },
    /// Set an attribute; the value is TOML (25, true, '[ "hubs" ]'), checked against the
    /// attribute schema; `empty` removes it. Names of your own start with `user_`.
    #[command(
        after_help = "Examples:\n  tlm set global bird_bfd_interval_ms 200\n  tlm set node primary.mysite1 wg_endpoint 203.0.113.10\n  tlm set site mysite1 groups '[ \"hubs\" ]'\n  tlm set node primary.mysite1 wg_endpoint empty"
    )]
    Set {
        #[command(subcommand)]
        what: SetWhat,
    },
    /// Create a new version for every node in scope whose configuration changed, and a git commit.
    #[command(
        after_help = "Examples:\n  tlm -m \"BFD 200 ms\" commit all\n  tlm commit site mysite1\n  tlm commit node 15"
    )]
    Commit {
        #[command(subcommand)]
        scope: Scope,
    },
    /// Make nodes run a version (default: latest): recorded, then carried out by the nodes
    /// through the controller service; prints what each node did.
    #[command(
        after_help = "Examples:\n  tlm activate all\n  tlm activate all --canary mysite1 --wait-blessed\n  tlm activate node primary.mysite1 3 --confirm 300\n  tlm activate site mysite1 --no-wait"
    )]
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
    #[command(
        after_help = "Examples:\n  tlm status\n  tlm status node primary.mysite1\n  tlm status --format json"
    )]
    Status {
        #[command(subcommand)]
        scope: Option<Scope>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Run the controller service: the management WireGuard endpoint and the nodes' API.
    #[command(
        after_help = "Examples:\n  tlm serve\n  tlm serve --operator-listen 192.0.2.5:9468\n  curl -s 127.0.0.1:9468/metrics"
    )]
    Serve {
        /// Name of the management interface.
        #[arg(long, default_value = "tlmgmt0")]
        interface: String,
        /// Address of the operator listener: metrics (`/metrics`, `/metrics/nodes`), the
        /// operator API and the web UI (docs/operations.md). Loopback by default.
        #[arg(long, value_name = "ADDRESS:PORT", default_value = "127.0.0.1:9468")]
        operator_listen: std::net::SocketAddr,
        /// Run without the operator listener.
        #[arg(long, conflicts_with = "operator_listen")]
        no_operator: bool,
    },
    /// Pair a device running `towalink-node bootstrap` with a node (HTTPS, port 8000).
    #[command(
        after_help = "Examples:\n  tlm attach node primary.mysite1\n  tlm attach node primary.mysite1 --code 7KQ2-M9XD --yes"
    )]
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
        /// Extra host name or address the attach certificate carries, now and when it is remade
        /// (repeatable).
        #[arg(long, value_name = "NAME", global = true)]
        san: Vec<String>,
    },
    /// Write a node state directory (identity + latest version) to start `towalink-node` from.
    #[command(after_help = "Examples:\n  tlm provision node primary.mysite1 /var/lib/towalink")]
    Provision {
        #[command(subcommand)]
        what: ProvisionWhat,
    },
    /// Node disk images: build (Alpine, diskless, with the node baked in), inspect.
    #[command(
        after_help = "Examples:\n  tlm image build node primary.mysite1 --board rpi4 -o primary.img.zst\n  tlm image build site mysite1 --board x86_64 -o images/ --zstd\n  tlm image inspect primary.img.zst"
    )]
    Image {
        #[command(subcommand)]
        what: ImageWhat,
    },
    /// Recovery objects: each node's latest version as a static file, signed and bound to the
    /// node's recovery token, for a node that lost its management connection (docs/recovery.md).
    #[command(
        after_help = "Examples:\n  tlm recovery publish /srv/www/recovery\n  tlm recovery make node primary.mysite1 -o primary.tlr"
    )]
    Recovery {
        #[command(subcommand)]
        what: RecoveryWhat,
    },
    /// Replace a node's secrets: `node <node>.<site>` (its WireGuard key),
    /// `recovery-token node <node>.<site>` (docs/recovery.md).
    #[command(
        after_help = "Examples:\n  tlm rotate node primary.mysite1\n  tlm rotate recovery-token node primary.mysite1\n  tlm rotate signing-key\n  tlm rotate signing-key --finish"
    )]
    Rotate {
        #[command(subcommand)]
        what: RotateWhat,
    },
    /// What changed between two versions of a node (default: its latest and the one before),
    /// file by file, as a unified diff.
    #[command(
        after_help = "Examples:\n  tlm diff node primary.mysite1\n  tlm diff node primary.mysite1 --from 2 --to 5 --format json"
    )]
    Diff {
        #[command(subcommand)]
        what: DiffWhat,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Bearer tokens of the operator API (`tlm serve --operator-listen`): `add NAME --file
    /// FILE` writes a new token to FILE (0600), `list`, `revoke NAME`.
    #[command(
        after_help = "Examples:\n  tlm token add ops --file ~/.towalink-ops.token\n  tlm token add grafana --read-only --file grafana.token\n  tlm token list\n  tlm token revoke grafana"
    )]
    Token {
        #[command(subcommand)]
        what: TokenWhat,
    },
    /// The Ansible inventory of the nodes in scope (default: all), as JSON: a group per site
    /// (`site_<site>`), each node `<node>.<site>` with its management address as `ansible_host`.
    #[command(
        after_help = "Examples:\n  tlm inventory > hosts.json && ansible -i hosts.json all -m ping\n  tlm inventory site mysite1"
    )]
    Inventory {
        #[command(subcommand)]
        scope: Option<Scope>,
    },
    /// Run `ansible` on the nodes in scope (the rest of the arguments are Ansible's; the
    /// pattern `all` means the nodes in scope).
    #[command(
        after_help = "Examples:\n  tlm ansible all all -a whoami\n  tlm ansible site mysite1 all -a whoami\n  tlm ansible node primary.mysite1 all -m ping"
    )]
    Ansible {
        #[command(subcommand)]
        scope: AnsibleScope,
    },
    /// Run `ansible-playbook` on the nodes in scope (the rest of the arguments are its own).
    #[command(
        name = "ansible_playbook",
        after_help = "Examples:\n  tlm ansible_playbook all myplaybook.yml -e test_variable=test\n  tlm ansible_playbook node 15 myplaybook.yml"
    )]
    AnsiblePlaybook {
        #[command(subcommand)]
        scope: AnsibleScope,
    },
    /// Shell completions for tlm, to stdout (e.g. `tlm completions bash >
    /// /etc/bash_completion.d/tlm`).
    #[command(
        after_help = "Examples:\n  tlm completions bash > /etc/bash_completion.d/tlm\n  tlm completions zsh > ~/.zfunc/_tlm"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Manual pages for tlm and each of its commands (`tlm.1`, `tlm-set.1`, ...) into DIR.
    #[command(after_help = "Examples:\n  tlm man --dir /usr/local/share/man/man1")]
    Man {
        /// Where to write the pages (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Run git in the configuration directory.
    #[command(after_help = "Examples:\n  tlm git log --oneline\n  tlm git show HEAD --stat")]
    Git {
        /// Arguments for git.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RotateWhat {
    /// The controller's signing key, with an overlap: first versions trusting the current and
    /// a new key (commit, activate), then `--finish` once every node blessed one.
    SigningKey {
        /// Sign with the new key from now on (refused until every node trusts it).
        #[arg(long)]
        finish: bool,
    },
    /// A node's WireGuard key (its links and its management link): the next commit names the
    /// new key in its and its peers' versions; the node receives the private key at its next
    /// sync through `tlm serve`, before the activation order.
    Node { node: String },
    /// A node's recovery token: recovery objects made from now on need the new one; the node
    /// receives it at its next sync through `tlm serve`.
    RecoveryToken {
        #[command(subcommand)]
        target: RotateTarget,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiffWhat {
    /// <node>.<site> or id.
    Node {
        node: String,
        /// The older version (default: the one before --to).
        #[arg(long, value_name = "N")]
        from: Option<u32>,
        /// The newer version (default: the latest).
        #[arg(long, value_name = "N")]
        to: Option<u32>,
    },
}

/// Where `tlm ansible` runs, and Ansible's own arguments.
#[derive(Debug, Subcommand)]
pub enum AnsibleScope {
    All {
        /// Ansible's arguments (a host pattern first: `all`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    Site {
        site: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// <node>.<site> or id.
    Node {
        node: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
}

impl AnsibleScope {
    /// The scope and Ansible's arguments.
    pub fn split(self) -> (Scope, Vec<String>) {
        match self {
            AnsibleScope::All { args } => (Scope::All, args),
            AnsibleScope::Site { site, args } => (Scope::Site { site }, args),
            AnsibleScope::Node { node, args } => (Scope::Node { node }, args),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenWhat {
    /// Make a token; it is written to FILE only (created with mode 0600), never printed.
    Add {
        name: String,
        /// Where to write the token (must not exist).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Reads only: every write through the API is refused.
        #[arg(long)]
        read_only: bool,
    },
    /// The tokens: name, access, when made (never the tokens themselves).
    List {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Remove a token: the API refuses it from the next request on.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RotateTarget {
    /// <node>.<site>
    Node { node: String },
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
    /// A node's committed versions: number, parent, when made, files.
    Versions { node: String },
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
pub enum RecoveryWhat {
    /// Write each node's recovery object into DIR (created if missing) for a plain web server
    /// or object store; other files in DIR are left alone.
    Publish {
        /// Directory to write the objects into, named as each node looks for its own.
        dir: PathBuf,
        /// Also write each node's token-less object (the lost-token form: accepted by a node
        /// only after several boots without a management connection, and readable by whoever
        /// fetches it; see docs/recovery.md for the trade-off).
        #[arg(long)]
        without_token: bool,
    },
    /// Write one node's recovery object to a file (a technician's USB stick, a card's boot
    /// partition under `towalink-recovery/`).
    Make {
        #[command(subcommand)]
        target: RecoveryTarget,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecoveryTarget {
    /// <node>.<site> or id: `-o FILE`; prints the name the node looks for.
    Node {
        node: String,
        /// Output file.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Write the token-less object instead (the lost-token form, for a node whose token
        /// the controller lost; see docs/recovery.md for the trade-off).
        #[arg(long)]
        without_token: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageWhat {
    /// Write a bootable disk image for a node (or one per node of a site) from its latest
    /// committed version.
    Build {
        #[command(subcommand)]
        target: Box<ImageTarget>,
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
    pub fn sources(&self) -> crate::commands::image::ImageSources {
        let cache = self
            .cache_dir
            .clone()
            .unwrap_or_else(crate::commands::image::default_cache_dir);
        let alpine = match &self.alpine_dir {
            Some(dir) => towalink_images::assets::AlpineSource::Dir(dir.clone()),
            None => towalink_images::assets::AlpineSource::Release {
                version: self.alpine_version.clone(),
                mirror: self.mirror.clone(),
                cache: cache.clone(),
            },
        };
        crate::commands::image::ImageSources {
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
