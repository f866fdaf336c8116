//! A lab of one controller and many simulated nodes: `tlm serve` in its own namespace, the
//! nodes ([`crate::fleetsim`]) in another, linked by one veth. The installation has
//! `sites × nodes_per_site` nodes without links between them (`topology = "none"`), so what
//! is measured is the management path: handshakes, reports, long polls, downloads, orders.
//! Everything is torn down on drop, also when a test fails.

use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};

use towalink_controller::model::allocation::Pools;
use towalink_controller::store::{keys, Store};

use crate::fleetsim::{ControllerLink, Fleet, SimNode};
use crate::network::{sh, start_service, stop_service, CONTROLLER_ENDPOINT};
use crate::Installation;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct FleetLab {
    pub ctl: Installation,
    pub controller_netns: String,
    pub fleet_netns: String,
    /// `tlm serve`'s log.
    pub log: PathBuf,
    service: Option<Child>,
    pub fleet: Option<Fleet>,
}

/// `site<s>` for s in 0..sites, nodes `n<i>.site<s>`.
pub fn site_name(site: u32) -> String {
    format!("site{site}")
}

impl FleetLab {
    /// Makes the installation (through the library: adding 1,000 nodes one `tlm` at a time
    /// would take minutes), commits it, starts `tlm serve` and the simulated nodes.
    pub fn start(sites: u32, nodes_per_site: u32) -> FleetLab {
        assert!(
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() } == 0,
            "the fleet lab needs root (network namespaces): run it as root, as .ci/run does"
        );
        let prefix = format!(
            "tf{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let ctl = Installation::new();
        let mut lab = FleetLab {
            log: ctl.dir.with_file_name("controller.log"),
            ctl,
            controller_netns: format!("{prefix}c"),
            fleet_netns: format!("{prefix}f"),
            service: None,
            fleet: None,
        };
        lab.build_network();
        lab.configure(sites, nodes_per_site);
        lab.service = Some(start_service(
            &lab.ctl,
            &lab.controller_netns,
            &lab.log,
            "info",
        ));
        let (link, nodes) = lab.identities();
        lab.fleet = Some(Fleet::start(&lab.fleet_netns, link, nodes));
        lab
    }

    pub fn fleet(&self) -> &Fleet {
        self.fleet.as_ref().expect("the fleet runs")
    }

    pub fn controller_pid(&self) -> u32 {
        self.service.as_ref().expect("tlm serve runs").id()
    }

    /// The controller's namespace with its endpoint on `lo`, the fleet's, one veth between.
    fn build_network(&self) {
        let (c, f) = (&self.controller_netns, &self.fleet_netns);
        sh("ip", &["netns", "add", c]);
        sh("ip", &["netns", "add", f]);
        for netns in [c, f] {
            sh("ip", &["-n", netns, "link", "set", "lo", "up"]);
        }
        sh(
            "ip",
            &[
                "-n",
                c,
                "addr",
                "add",
                &format!("{CONTROLLER_ENDPOINT}/32"),
                "dev",
                "lo",
            ],
        );
        sh(
            "ip",
            &[
                "-n", c, "link", "add", "fleet", "type", "veth", "peer", "name", "ctl", "netns", f,
            ],
        );
        sh(
            "ip",
            &["-n", c, "addr", "add", "192.0.2.0/31", "dev", "fleet"],
        );
        sh(
            "ip",
            &["-n", f, "addr", "add", "192.0.2.1/31", "dev", "ctl"],
        );
        sh("ip", &["-n", c, "link", "set", "fleet", "up"]);
        sh("ip", &["-n", f, "link", "set", "ctl", "up"]);
        sh(
            "ip",
            &[
                "-n",
                f,
                "route",
                "add",
                &format!("{CONTROLLER_ENDPOINT}/32"),
                "via",
                "192.0.2.0",
            ],
        );
    }

    fn configure(&self, sites: u32, nodes_per_site: u32) {
        let t = &self.ctl;
        t.ok(&["set", "global", "topology", "none"]);
        t.ok(&[
            "set",
            "global",
            "controller_endpoint",
            &format!("\"{CONTROLLER_ENDPOINT}\""),
        ]);
        let store = Store::open_existing(&t.dir).expect("the installation");
        let mut generated = store.load_generated().unwrap();
        let mut secrets = store.load_secrets().unwrap();
        let pools = Pools {
            ipv4: "10.254.0.0/16".parse().unwrap(),
            ipv6: "fd54:6f77:616c::/64".parse().unwrap(),
        };
        for s in 0..sites {
            let site = site_name(s).parse().unwrap();
            generated.add_site(site, 4_200_000_000).unwrap();
            for n in 0..nodes_per_site {
                let full = format!("n{n}.{}", site_name(s)).parse().unwrap();
                let (_, node_secrets) = generated
                    .add_node(full, &pools, &mut rand_core::OsRng)
                    .unwrap();
                secrets.nodes.push(node_secrets);
            }
        }
        store.save_secrets(&secrets).unwrap();
        store.save_generated(&generated).unwrap();
        t.ok(&["commit", "all"]);
    }

    /// What each node would be provisioned with: its id, management address and WireGuard
    /// key, the hub's endpoint and key, the controller's signing key.
    fn identities(&self) -> (ControllerLink, Vec<SimNode>) {
        let store = Store::open_existing(&self.ctl.dir).unwrap();
        let settings = keys::settings(&store).unwrap();
        let (_, hub_public) = keys::controller_key(&store).unwrap();
        let signing = keys::controller_public_key(&store)
            .unwrap()
            .expect("a commit made the signing key");
        let endpoint = &settings.controller_endpoints[0];
        let hub = endpoint.parse().unwrap_or_else(|_| {
            format!("{endpoint}:{}", settings.listen_port)
                .parse()
                .unwrap()
        });
        let any = store.load_generated().unwrap().nodes[0].id;
        let template = settings.node_link(any, &hub_public).unwrap();
        let link = ControllerLink {
            hub,
            hub_public_key: key32(&hub_public),
            keepalive_s: settings.keepalive_s,
            api: template.api(),
            trusted: towalink_bundle::verifying_key_from_base64(&signing).unwrap(),
        };
        let secrets = store.load_secrets().unwrap();
        let private: std::collections::HashMap<u32, String> = secrets
            .nodes
            .iter()
            .map(|s| (s.id, s.wg_private_key.expose().to_string()))
            .collect();
        let nodes = store
            .load_generated()
            .unwrap()
            .nodes
            .iter()
            .map(|node| {
                let management = settings.node_link(node.id, &hub_public).unwrap();
                let std::net::IpAddr::V6(address) = management.address else {
                    panic!("management addresses are IPv6")
                };
                SimNode {
                    id: node.id,
                    name: format!("{}.{}", node.name, node.site),
                    address,
                    wg_private_key: key32(&private[&node.id]),
                }
            })
            .collect();
        (link, nodes)
    }
}

fn key32(base64_text: &str) -> [u8; 32] {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(base64_text.trim())
        .expect("a base64 key")
        .try_into()
        .expect("a 32-byte key")
}

impl Drop for FleetLab {
    fn drop(&mut self) {
        // The nodes first: their threads and TUN live in the fleet's namespace.
        self.fleet = None;
        if let Some(child) = self.service.take() {
            stop_service(child);
        }
        for netns in [&self.fleet_netns, &self.controller_netns] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", netns])
                .status();
        }
    }
}
