//! `tlm image build` and `tlm image inspect`: the controller's side of node images. The
//! controller knows the node (identity, latest version, image attributes); `towalink-images`
//! knows boards, Alpine and disks.

use std::path::{Path, PathBuf};

use toml::Value;
use towalink_images::assets::{self, AlpineSource};
use towalink_images::build::{self, BuildReport, Network, NodeImage, UplinkAddress};
use towalink_images::profile::{self, Board};

use crate::allocation::NodeAllocation;
use crate::attributes::Merged;
use crate::names::NodeRef;
use crate::resolve::{attribute_error, resolve, ResolveError};
use crate::schema;
use crate::store::Store;
use crate::{installation, Error};

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
    let packages = string_list(merged, "image_packages")?;
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
    let state = crate::versions::changed_nodes(store, &tree, &[&node])?;
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
            crate::durable::IoError::new("cannot create", Path::new("temporary dir"), e)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::Level;

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
