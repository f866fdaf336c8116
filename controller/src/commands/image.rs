//! `tlm image build` and `tlm image inspect`: the controller's side of node images. The
//! controller knows the node (identity, latest version, image attributes); `towalink-images`
//! knows boards, Alpine and disks.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use toml::Value;
use towalink_images::assets::{self, AlpineSource};
use towalink_images::build::{self, BuildReport, Network, NodeImage, UplinkAddress};
use towalink_images::profile::{self, Board};

use crate::cli::{Format, ImageTarget, ImageWhat};
use crate::model::allocation::NodeAllocation;
use crate::model::attributes::Merged;
use crate::model::names::{NodeRef, SiteName};
use crate::model::resolve::{attribute_error, resolve, ResolveError};
use crate::model::schema;
use crate::store::Store;
use crate::{store::installation, Error};

/// The image attributes of one node, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSettings {
    pub hostname: String,
    pub network: (String, UplinkAddress, Vec<String>),
    /// `image_interfaces`: more ports with their addresses.
    pub interfaces: Vec<(String, UplinkAddress)>,
    pub packages: Vec<String>,
}

fn string_list(merged: &Merged, key: &str) -> Result<Vec<String>, ResolveError> {
    match merged.values.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| attribute_error(merged, key, "must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(attribute_error(merged, key, "must be a list of strings")),
    }
}

fn optional_string(merged: &Merged, key: &str) -> Result<Option<String>, ResolveError> {
    match merged.values.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(attribute_error(merged, key, "must be a string")),
    }
}

/// Reads `image_*` attributes (all optional) of a node's complete attributes. Pure.
pub fn image_settings(
    merged: &Merged,
    node: &NodeAllocation,
    default_uplink: &str,
) -> Result<ImageSettings, ResolveError> {
    let hostname = optional_string(merged, "image_hostname")?
        .unwrap_or_else(|| format!("{}-{}", node.site, node.name));
    // The default (`<site>-<node>`) is checked too.
    if !schema::is_label(&hostname) {
        return Err(attribute_error(
            merged,
            "image_hostname",
            "must be a host name (letters, digits, '-', at most 63)",
        ));
    }
    let interface =
        optional_string(merged, "image_uplink")?.unwrap_or_else(|| default_uplink.to_string());
    if !schema::is_interface_name(&interface) {
        return Err(attribute_error(
            merged,
            "image_uplink",
            "must be an interface name (at most 15 characters)",
        ));
    }
    let address = match optional_string(merged, "image_uplink_address")?.as_deref() {
        None | Some("dhcp") => UplinkAddress::Dhcp,
        Some(cidr) => {
            if cidr.parse::<ipnet::IpNet>().is_err() {
                return Err(attribute_error(
                    merged,
                    "image_uplink_address",
                    format!("is `{cidr}`: expected \"dhcp\" or an address with prefix length, e.g. \"192.0.2.10/24\""),
                ));
            }
            let gateway = optional_string(merged, "image_uplink_gateway")?;
            if let Some(g) = &gateway {
                if g.parse::<std::net::IpAddr>().is_err() {
                    return Err(attribute_error(
                        merged,
                        "image_uplink_gateway",
                        format!("is `{g}`: expected an IP address"),
                    ));
                }
            }
            UplinkAddress::Static {
                cidr: cidr.to_string(),
                gateway,
            }
        }
    };
    // More ports (LANs): interface name -> "dhcp" or an address with prefix length.
    let mut interfaces = Vec::new();
    match merged.values.get("image_interfaces") {
        None => {}
        Some(Value::Table(table)) => {
            for (name, value) in table {
                let bad = |what: String| attribute_error(merged, "image_interfaces", what);
                if !schema::is_interface_name(name) || *name == interface {
                    return Err(bad(format!(
                        "has `{name}`: expected an interface name other than the uplink `{interface}`"
                    )));
                }
                let address = match value.as_str() {
                    Some("dhcp") => UplinkAddress::Dhcp,
                    Some(cidr) if cidr.parse::<ipnet::IpNet>().is_ok() => UplinkAddress::Static {
                        cidr: cidr.to_string(),
                        gateway: None,
                    },
                    _ => {
                        return Err(bad(format!(
                            "`{name}` is `{value}`: expected \"dhcp\" or an address with prefix length, e.g. \"192.168.1.1/24\""
                        )))
                    }
                };
                interfaces.push((name.clone(), address));
            }
        }
        Some(_) => {
            return Err(attribute_error(
                merged,
                "image_interfaces",
                "must be a table of interface = \"dhcp\" or \"address/prefix\"",
            ))
        }
    }
    let dns = string_list(merged, "image_dns")?;
    for d in &dns {
        if d.parse::<std::net::IpAddr>().is_err() {
            return Err(attribute_error(
                merged,
                "image_dns",
                format!("has `{d}`: expected IP addresses"),
            ));
        }
    }
    let mut packages = string_list(merged, "image_packages")?;
    // The node's management sshd (towalink-node runs it when the version lists keys).
    if !string_list(merged, "node_ssh_authorized_keys")?.is_empty()
        && !packages.iter().any(|p| p == "openssh-server")
    {
        packages.push("openssh-server".into());
    }
    for p in &packages {
        if !schema::is_package_name(p) {
            return Err(attribute_error(
                merged,
                "image_packages",
                format!("has `{p}`: not an Alpine package name"),
            ));
        }
    }
    Ok(ImageSettings {
        hostname,
        network: (interface, address, dns),
        interfaces,
        packages,
    })
}

/// Where the Alpine files, the packages and the node binary come from.
#[derive(Debug)]
pub struct ImageSources {
    pub alpine: AlpineSource,
    pub packages: towalink_images::packages::PackageSource,
    pub node_binary: Option<PathBuf>,
}

/// The default cache of Alpine release files.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("towalink/alpine");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache/towalink/alpine"),
        None => PathBuf::from("/var/cache/towalink/alpine"),
    }
}

/// The `towalink-node` binary for a board: `--node-binary`, else `$TOWALINK_NODE_BIN_DIR/<target>/`,
/// a cargo target directory beside `tlm` (`target/<target>/release/`), or
/// `/usr/lib/towalink/<target>/`.
pub fn find_node_binary(board: &Board, given: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let target = &board.profile.rust_target;
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("TOWALINK_NODE_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(target).join("towalink-node"));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile_dir) = exe.parent() {
            if let Some(target_dir) = profile_dir.parent() {
                candidates.push(target_dir.join(target).join("release/towalink-node"));
            }
        }
    }
    candidates.push(
        PathBuf::from("/usr/lib/towalink")
            .join(target)
            .join("towalink-node"),
    );
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .ok_or_else(|| Error::Image(towalink_images::Error::NodeBinary {
            path: PathBuf::from("towalink-node"),
            message: format!(
                "none found for {target} (build it with `cargo build --release -p towalink-node --target {target}`, or pass --node-binary)"
            ),
        }))
}

/// Builds the image of one node from its latest committed version.
pub fn build_node_image(
    store: &Store,
    node_ref: &NodeRef,
    board: &Board,
    sources: &ImageSources,
    output: &Path,
) -> Result<BuildReport, Error> {
    let generated = store.load_generated()?;
    let node = generated.node(node_ref)?.clone();
    let tree = store.load_tree()?;
    let resolved = resolve(&tree)?;
    let merged = resolved
        .complete_attributes(node.id)
        .expect("every allocated node resolves");
    let settings = image_settings(&merged, &node, &board.profile.uplink)?;
    let state = crate::store::versions::changed_nodes(store, &tree, &[&node])?;
    if let Some(s) = state.first().filter(|s| s.changed) {
        eprintln!(
            "tlm: warning: {} has changes that are not committed; the image carries v{} (`tlm commit node {}` first to include them)",
            s.node,
            s.latest.unwrap_or(0),
            s.node
        );
    }
    let node_binary = find_node_binary(board, sources.node_binary.as_deref())?;
    let release = assets::resolve(&sources.alpine, board).map_err(Error::Image)?;
    let branch = towalink_images::packages::branch_of(&release.version).ok_or_else(|| {
        Error::Image(towalink_images::Error::Release {
            version: release.version.clone(),
            arch: board.profile.alpine_arch.clone(),
            message: format!(
                "cannot tell the Alpine branch of `{}` (its `.alpine-release` names no version such as 3.23.2), so not which packages fit it",
                release.origin
            ),
        })
    })?;
    let wanted = build::world(&release, &settings.packages);
    let card = sources
        .packages
        .prepare(
            &branch,
            &board.profile.alpine_arch,
            &board.apk_keys().map_err(Error::Image)?,
            &wanted,
            &build::layer_installed(&release),
        )
        .map_err(Error::Image)?;
    let state = tempfile::Builder::new()
        .prefix("towalink-image-state-")
        .tempdir()
        .map_err(|e| {
            towalink_system::durable::IoError::new("cannot create", Path::new("temporary dir"), e)
        })?;
    let (_, version) = installation::provision_node(store, node_ref, state.path())?;
    let (interface, address, dns) = settings.network;
    let spec = NodeImage {
        board,
        release: &release,
        node_binary: &node_binary,
        node: node.full_name().to_string(),
        node_id: node.id,
        version,
        hostname: settings.hostname,
        state_dir: state.path(),
        network: Network {
            interface,
            address,
            dns,
            interfaces: settings.interfaces,
        },
        packages: settings.packages,
        card: &card,
    };
    build::build(&spec, output).map_err(Error::Image)
}

/// The board called `name`, as a `tlm` error.
pub fn board(name: &str) -> Result<Board, Error> {
    profile::board(name).map_err(Error::Image)
}

pub fn run(config_dir: &std::path::Path, what: &ImageWhat) -> Result<ExitCode, Error> {
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
            let output = match target.as_ref() {
                ImageTarget::Node { options, .. } | ImageTarget::Site { options, .. } => {
                    &options.output
                }
            };
            if store.contains(output) {
                return Err(Error::ImageInsideConfig(output.clone()));
            }
            match target.as_ref() {
                ImageTarget::Node { node, options } => {
                    let node_ref: NodeRef = node.parse()?;
                    let board = crate::commands::image::board(&options.board)?;
                    let report = crate::commands::image::build_node_image(
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
                    let board = crate::commands::image::board(&options.board)?;
                    let generated = store.load_generated()?;
                    if !generated.sites.iter().any(|s| s.name == site) {
                        return Err(crate::model::allocation::AllocationError::UnknownSite(
                            site.to_string(),
                        )
                        .into());
                    }
                    let nodes: Vec<&NodeAllocation> =
                        generated.nodes.iter().filter(|n| n.site == site).collect();
                    towalink_system::durable::create_dir_all(&options.output)?;
                    let sources = options.sources();
                    for n in nodes {
                        let file = options.output.join(format!(
                            "{}-{}.img{}",
                            n.site,
                            n.name,
                            if *zstd { ".zst" } else { "" }
                        ));
                        let report = crate::commands::image::build_node_image(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attributes::Level;

    fn node() -> NodeAllocation {
        toml::from_str(
            "id = 3\nsite = \"s1\"\nname = \"r1\"\nloopback_ipv4 = \"10.254.0.3\"\nloopback_ipv6 = \"fd54:6f77:616c::3\"\nwg_public_key = \"k\"",
        )
        .unwrap()
    }

    fn merged(toml_text: &str) -> Merged {
        let t: toml::Table = toml::from_str(toml_text).unwrap();
        Merged::from_layers([(Level::Global, &t)])
    }

    #[test]
    fn defaults_are_dhcp_on_the_board_uplink_and_site_node_hostname() {
        let s = image_settings(&merged(""), &node(), "eth0").unwrap();
        assert_eq!(s.hostname, "s1-r1");
        assert_eq!(s.network, ("eth0".into(), UplinkAddress::Dhcp, vec![]));
    }

    #[test]
    fn static_uplink_and_bad_values_name_the_attribute() {
        let s = image_settings(
            &merged("image_uplink = \"enp1s0\"\nimage_uplink_address = \"192.0.2.10/24\"\nimage_uplink_gateway = \"192.0.2.1\"\nimage_dns = [\"192.0.2.53\"]"),
            &node(),
            "eth0",
        )
        .unwrap();
        assert_eq!(
            s.network.1,
            UplinkAddress::Static {
                cidr: "192.0.2.10/24".into(),
                gateway: Some("192.0.2.1".into())
            }
        );
        let e = image_settings(
            &merged("image_uplink_address = \"192.0.2.10\""),
            &node(),
            "eth0",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("config.toml") && e.contains("image_uplink_address"),
            "{e}"
        );
        let e = image_settings(&merged("image_packages = [\"bird; rm\"]"), &node(), "eth0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_packages"), "{e}");
        let e = image_settings(&merged("image_hostname = \"a b\""), &node(), "eth0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_hostname"), "{e}");
    }

    #[test]
    fn nodes_with_ssh_keys_carry_openssh_server_once() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqJ5Ql0nU7G0C5oCaVb2NOdU7I4Ux3cYJxG6qkV3T6P";
        let s = image_settings(&merged(""), &node(), "eth0").unwrap();
        assert!(!s.packages.iter().any(|p| p == "openssh-server"));
        let s = image_settings(
            &merged(&format!("node_ssh_authorized_keys = [\"{key}\"]")),
            &node(),
            "eth0",
        )
        .unwrap();
        assert_eq!(s.packages, vec!["openssh-server".to_string()]);
        let s = image_settings(
            &merged(&format!(
                "node_ssh_authorized_keys = [\"{key}\"]\nimage_packages = [\"openssh-server\"]"
            )),
            &node(),
            "eth0",
        )
        .unwrap();
        assert_eq!(s.packages, vec!["openssh-server".to_string()]);
    }

    #[test]
    fn more_ports_get_dhcp_or_a_static_address() {
        let s = image_settings(
            &merged("image_interfaces = { eth1 = \"192.168.1.1/24\", eth2 = \"dhcp\" }"),
            &node(),
            "eth0",
        )
        .unwrap();
        assert_eq!(
            s.interfaces,
            vec![
                (
                    "eth1".to_string(),
                    UplinkAddress::Static {
                        cidr: "192.168.1.1/24".into(),
                        gateway: None
                    }
                ),
                ("eth2".to_string(), UplinkAddress::Dhcp),
            ]
        );
        for bad in [
            "image_interfaces = { eth0 = \"dhcp\" }",
            "image_interfaces = { eth1 = \"192.168.1.1\" }",
            "image_interfaces = { \"a b\" = \"dhcp\" }",
            "image_interfaces = [\"eth1\"]",
        ] {
            let e = image_settings(&merged(bad), &node(), "eth0")
                .unwrap_err()
                .to_string();
            assert!(e.contains("image_interfaces"), "{bad}: {e}");
        }
    }
}
