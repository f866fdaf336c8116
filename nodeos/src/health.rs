//! Health checks that decide whether a pending version is blessed, and the per-node settings
//! that configure them (the version's [`NodeConfig`], from its `towalink/node.toml`).

use towalink_bundle::contract::NodeConfig;
use towalink_bundle::VerifiedBundle;

use crate::bird::BirdControl;
use crate::Error;

pub use towalink_bundle::contract::{HealthCheck as Check, NODE_TOML};

/// Settings of the version lifecycle, from the version's contract.
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
        let config = NodeConfig::of(bundle)?;
        Ok(LifecycleSettings::from_config(
            &config,
            bundle.manifest().services.contains_key("bird"),
        ))
    }

    /// `configures_bird`: the version has a `bird` service (then `bird` is the default check).
    pub fn from_config(config: &NodeConfig, configures_bird: bool) -> LifecycleSettings {
        LifecycleSettings {
            boot_tries: config.node_boot_tries,
            checks: config.health_checks(configures_bird),
            timeout_s: config.node_health_timeout_s,
            links: config.interfaces(),
        }
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
