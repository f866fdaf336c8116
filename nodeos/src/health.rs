//! Health checks that decide whether a pending version is blessed, and the per-node settings
//! that configure them (attributes in the version's `towalink/node.toml`).

use towalink_bundle::VerifiedBundle;

use crate::bird::BirdControl;
use crate::Error;

/// Path of the effective attributes inside a version.
pub const NODE_TOML: &str = "towalink/node.toml";

/// A check a pending version must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// Every BGP protocol in BIRD is up and Established.
    Bird,
    /// The controller's management API accepts a connection through the management link.
    Controller,
    /// Every WireGuard link has received traffic from its peer (a completed handshake and
    /// data: with BFD and keepalives running, a live link always has).
    Wireguard,
}

/// Settings of the version lifecycle, from the version's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleSettings {
    /// `node_boot_tries`: daemon starts a pending version may use (default 3).
    pub boot_tries: u32,
    /// `node_health_checks`: default `["bird"]` when the version configures BIRD, else none.
    pub checks: Vec<Check>,
    /// `node_health_timeout_s`: how long a pending version may take to pass (default 120).
    pub timeout_s: u64,
    /// The WireGuard interfaces of the version (for the `wireguard` check).
    pub links: Vec<String>,
}

impl LifecycleSettings {
    pub fn from_bundle(bundle: &VerifiedBundle) -> Result<LifecycleSettings, Error> {
        let manifest = bundle.manifest();
        let bad = |attribute: &str, message: &str| Error::Setting {
            attribute: attribute.to_string(),
            version: manifest.version,
            message: message.to_string(),
        };
        let attributes: toml::Table = match bundle.files().get(NODE_TOML) {
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad(NODE_TOML, "is not valid TOML"))?,
            None => toml::Table::new(),
        };
        let integer = |key: &str, default: i64, min: i64, max: i64| -> Result<i64, Error> {
            match attributes.get(key) {
                None => Ok(default),
                Some(toml::Value::Integer(n)) if (min..=max).contains(n) => Ok(*n),
                Some(_) => Err(bad(key, &format!("must be an integer from {min} to {max}"))),
            }
        };
        let checks = match attributes.get("node_health_checks") {
            None => {
                if manifest.services.contains_key("bird") {
                    vec![Check::Bird]
                } else {
                    Vec::new()
                }
            }
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|item| match item.as_str() {
                    Some("bird") => Ok(Check::Bird),
                    Some("controller") => Ok(Check::Controller),
                    Some("wireguard") => Ok(Check::Wireguard),
                    _ => Err(bad(
                        "node_health_checks",
                        &format!(
                            "has `{item}`: this node knows the checks \"bird\", \"wireguard\" and \"controller\""
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("node_health_checks", "must be a list of check names")),
        };
        Ok(LifecycleSettings {
            boot_tries: integer("node_boot_tries", 3, 1, 100)? as u32,
            checks,
            timeout_s: integer("node_health_timeout_s", 120, 1, 86_400)? as u64,
            links: attributes
                .get("peers")
                .and_then(toml::Value::as_array)
                .map(|peers| {
                    peers
                        .iter()
                        .filter_map(|p| p.get("interface").and_then(toml::Value::as_str))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    pub check: Check,
    pub ok: bool,
    pub detail: String,
}

/// Runs the checks once. `controller_api` is the management API's address (from the
/// identity); without one the `controller` check fails.
pub fn evaluate(
    settings: &LifecycleSettings,
    bird: &BirdControl,
    controller_api: Option<std::net::SocketAddr>,
) -> Vec<CheckResult> {
    settings
        .checks
        .iter()
        .map(|check| match check {
            Check::Bird => bird_check(bird),
            Check::Controller => controller_check(controller_api),
            Check::Wireguard => wireguard_check(&settings.links),
        })
        .collect()
}

/// Reads the kernel's receive counter of each tunnel interface: what boringtun (or the kernel
/// module) delivered from the peer.
fn wireguard_check(links: &[String]) -> CheckResult {
    let silent: Vec<String> = links
        .iter()
        .filter(|link| {
            std::fs::read_to_string(format!("/sys/class/net/{link}/statistics/rx_bytes"))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .is_none_or(|bytes| bytes == 0)
        })
        .cloned()
        .collect();
    CheckResult {
        check: Check::Wireguard,
        ok: silent.is_empty(),
        detail: if silent.is_empty() {
            format!("{} link(s) receiving", links.len())
        } else {
            format!("nothing received on {}", silent.join(", "))
        },
    }
}

fn controller_check(api: Option<std::net::SocketAddr>) -> CheckResult {
    let timeout = std::time::Duration::from_secs(2);
    let result = match api {
        None => Err("this node's identity has no management link".to_string()),
        Some(address) => std::net::TcpStream::connect_timeout(&address, timeout)
            .map(|_| format!("management API at {address} reachable"))
            .map_err(|e| format!("management API at {address}: {e}")),
    };
    CheckResult {
        check: Check::Controller,
        ok: result.is_ok(),
        detail: result.unwrap_or_else(|e| e),
    }
}

fn bird_check(bird: &BirdControl) -> CheckResult {
    match bird.protocols() {
        Err(e) => CheckResult {
            check: Check::Bird,
            ok: false,
            detail: e.to_string(),
        },
        Ok(protocols) => {
            let bgp: Vec<_> = protocols.iter().filter(|p| p.proto == "BGP").collect();
            let down: Vec<String> = bgp
                .iter()
                .filter(|p| !(p.state == "up" && p.info.starts_with("Established")))
                .map(|p| {
                    format!("{} {} {}", p.name, p.state, p.info)
                        .trim()
                        .to_string()
                })
                .collect();
            CheckResult {
                check: Check::Bird,
                ok: down.is_empty(),
                detail: if down.is_empty() {
                    format!("{} BGP session(s) Established", bgp.len())
                } else {
                    format!("not Established: {}", down.join(", "))
                },
            }
        }
    }
}
