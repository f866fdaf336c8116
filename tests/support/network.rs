//! A real multi-site network on one machine: each site is a network namespace running the real
//! `towalink-node` (in-process WireGuard) and a real BIRD 2; the sites are joined by an underlay
//! of veth links (documentation addresses, only inside the namespaces), each site has a LAN
//! address, and the real `tlm` configures the installation.
//!
//! Names carry the process id and a counter, so two runs (or two tests) never clash. Dropping
//! the [`Network`] kills every process and deletes every namespace (and with them their links),
//! also when a test fails.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{binary, Installation};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The overlay topology the installation is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Mesh,
    /// Site 1 is the hub.
    Star,
    /// No links between the sites (only management links to the controller).
    None,
}

/// How to build a [`Network`].
#[derive(Debug, Clone)]
pub struct Options {
    pub sites: u32,
    pub topology: Topology,
    /// A controller namespace running `tlm serve`, linked to every site.
    pub controller: bool,
    /// Underlay links between every pair of sites (else only site–controller links).
    pub underlay_mesh: bool,
    /// Sites whose node is configured but not provisioned nor started (for attach).
    pub spare: Vec<u32>,
    /// Global attributes set before the first commit.
    pub global: Vec<(String, String)>,
    /// Start BIRD before the node daemons (as the image's OpenRC order does), with the
    /// placeholder configuration the image's BIRD service starts with.
    pub bird_first: bool,
    /// More arguments for every `towalink-node run`.
    pub daemon_args: Vec<String>,
}

impl Options {
    pub fn new(sites: u32, topology: Topology) -> Options {
        Options {
            sites,
            topology,
            controller: false,
            underlay_mesh: true,
            spare: Vec::new(),
            global: Vec::new(),
            bird_first: false,
            daemon_args: Vec::new(),
        }
    }
}

/// The controller's namespace and service.
pub struct Controller {
    pub netns: String,
    pub log: PathBuf,
    service: Option<Child>,
}

/// The controller's underlay address (on its `lo`), the nodes' `controller_endpoint`.
pub const CONTROLLER_ENDPOINT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);

/// One site: a namespace with one node.
pub struct Site {
    pub index: u32,
    pub name: String,
    pub netns: String,
    pub state: PathBuf,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The daemon's `--recovery-media` (as `/media` on an image): `<media>/<disk>/towalink-recovery/`.
    pub media: PathBuf,
    /// More arguments for `towalink-node run` ([`Options::daemon_args`]).
    pub daemon_args: Vec<String>,
    daemon: Option<Child>,
    bird: Option<Child>,
}

impl Site {
    /// `<node>.<site>` of this site's node.
    pub fn node(&self) -> String {
        format!("r.{}", self.name)
    }
    pub fn lan(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.index as u8, 0, 1)
    }
    pub fn endpoint(&self) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, self.index as u8)
    }
    /// The host name of the endpoint, resolvable inside every site's namespace.
    pub fn endpoint_name(&self) -> String {
        format!("{}.towalink.test", self.name)
    }

    /// A command run inside the site's namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .exec(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "[{}] {program} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `towalink-node` on this site's node, inside its namespace.
    pub fn node_command(&self, args: &[&str]) -> Command {
        let mut command = self.exec(binary("towalink-node").to_str().unwrap());
        command
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--root")
            .arg(&self.root)
            .arg("--bird-socket")
            .arg(&self.socket)
            .args(args);
        command
    }

    pub fn node_ok(&self, args: &[&str]) -> String {
        let out = self.node_command(args).output().unwrap();
        assert!(
            out.status.success(),
            "[{}] towalink-node {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.node_ok(&["status", "--format", "json"])).unwrap()
    }

    pub fn birdc(&self, command: &str) -> String {
        crate::birdc(&self.socket, command)
    }

    /// BGP protocols and whether each is Established.
    pub fn bgp(&self) -> Vec<(String, bool, String)> {
        self.birdc("show protocols")
            .lines()
            .filter(|l| l.contains(" BGP "))
            .map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                (
                    fields[0].to_string(),
                    l.contains("Established"),
                    fields.get(4).unwrap_or(&"").to_string(),
                )
            })
            .collect()
    }

    /// Starts (or restarts) the node daemon.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        std::fs::create_dir_all(&self.media).unwrap();
        let media = self.media.display().to_string();
        let mut args = vec![
            "--loglevel",
            "debug",
            "run",
            "--interval-ms",
            "200",
            "--recovery-media",
            &media,
        ];
        args.extend(self.daemon_args.iter().map(String::as_str));
        let child = self
            .node_command(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start towalink-node");
        self.daemon = Some(child);
    }

    /// Kills the node daemon as a power cut would (its in-process tunnels die with it).
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    pub fn start_bird(&mut self) {
        let conf = self.root.join("etc/bird/bird.conf");
        wait_for(
            Duration::from_secs(20),
            || conf.exists(),
            || format!("{}: the node never wrote {}", self.name, conf.display()),
        );
        let child = self
            .exec("bird")
            .args(["-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&self.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bird");
        self.bird = Some(child);
        let socket = self.socket.clone();
        wait_for(
            Duration::from_secs(10),
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            || format!("{}: BIRD did not start", self.name),
        );
    }

    /// Pings a LAN address from this site's LAN address; true when a reply came.
    pub fn ping(&self, to: Ipv4Addr) -> bool {
        self.exec("ping")
            .args([
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                &self.lan().to_string(),
                &to.to_string(),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The interface the kernel would send a packet to `to` through.
    pub fn route_dev(&self, to: Ipv4Addr) -> String {
        self.try_route_dev(to)
            .unwrap_or_else(|| panic!("[{}] no route to {to} from {}", self.name, self.lan()))
    }

    /// The interface towards `to`, or None while the kernel has no route there.
    pub fn try_route_dev(&self, to: Ipv4Addr) -> Option<String> {
        let out = self
            .exec("ip")
            .args([
                "-o",
                "route",
                "get",
                &to.to_string(),
                "from",
                &self.lan().to_string(),
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .map(str::to_string)
    }

    pub fn ifindex(&self, interface: &str) -> String {
        self.sh("cat", &[&format!("/sys/class/net/{interface}/ifindex")])
            .trim()
            .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Polls `check` until it holds or `limit` passes (then panics with `what()`).
pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {}", what());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The network: the controller directory, the sites and the underlay.
pub struct Network {
    pub ctl: Installation,
    pub sites: Vec<Site>,
    pub temp: tempfile::TempDir,
    /// When the node daemons were started.
    pub daemons_started: Instant,
    pub controller: Option<Controller>,
    prefix: String,
}

impl Network {
    /// Builds `count` sites joined by a full underlay mesh, configures the installation with
    /// `tlm` (`topology`, BFD 100 ms × 3), provisions each node, starts daemons and BIRDs.
    pub fn start(count: u32, topology: Topology) -> Network {
        Network::build(Options::new(count, topology))
    }

    /// Builds the sites (and the controller), configures and provisions the nodes, starts the
    /// controller service, the daemons and the BIRDs (spare sites stay dark).
    pub fn build(options: Options) -> Network {
        assert!(
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() } == 0,
            "the network tier needs root (network namespaces): run it as root, as .ci/run does"
        );
        let prefix = format!(
            "tl{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        // Under target/tmp, not /tmp: each node's management sshd (OpenSSH's strict modes)
        // refuses keys below a world-writable directory.
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&base).unwrap();
        let temp = tempfile::Builder::new()
            .prefix("tlnet-")
            .tempdir_in(&base)
            .unwrap();
        let mut network = Network {
            ctl: Installation::new(),
            sites: Vec::new(),
            temp,
            daemons_started: Instant::now(),
            controller: None,
            prefix,
        };
        for index in 1..=options.sites {
            let netns = format!("{}s{index}", network.prefix);
            let dir = network.temp.path().join(format!("s{index}"));
            std::fs::create_dir_all(dir.join("root/etc/bird")).unwrap();
            network.sites.push(Site {
                index,
                name: format!("s{index}"),
                netns,
                state: dir.join("state"),
                root: dir.join("root"),
                socket: dir.join("bird.ctl"),
                log: dir.join("node.log"),
                media: dir.join("media"),
                daemon_args: options.daemon_args.clone(),
                daemon: None,
                bird: None,
            });
        }
        network.build_underlay(options.underlay_mesh);
        if options.controller {
            network.build_controller();
        }
        network.configure(&options);
        if network.controller.is_some() {
            network.start_controller();
        }
        network.daemons_started = Instant::now();
        if options.bird_first {
            for site in &mut network.sites {
                if !options.spare.contains(&site.index) {
                    std::fs::write(
                        site.root.join("etc/bird/bird.conf"),
                        "log stderr all; protocol device {}\n",
                    )
                    .unwrap();
                    site.start_bird();
                }
            }
        }
        for site in &mut network.sites {
            if !options.spare.contains(&site.index) {
                site.start_daemon();
            }
        }
        if !options.bird_first {
            for site in &mut network.sites {
                if !options.spare.contains(&site.index) {
                    site.start_bird();
                }
            }
        }
        network
    }

    /// The controller's namespace, one veth to each site (192.0.2.2(i-1)/31 on the controller's
    /// side, .2(i-1)+1 on the site's), its endpoint on `lo`, a route to it in every site.
    fn build_controller(&mut self) {
        let netns = format!("{}c", self.prefix);
        self.controller_host(&netns, CONTROLLER_ENDPOINT, 2, "uc");
        self.controller = Some(Controller {
            netns,
            log: self.temp.path().join("controller.log"),
            service: None,
        });
    }

    /// A controller host: namespace `netns` with `address` on its `lo` and a veth to each site
    /// (192.0.`subnet`.2(i-1)/31 on the host's side as `c<i>`, .2(i-1)+1 as `site_if` in the
    /// site), and a route to `address` in every site.
    fn controller_host(&self, netns: &str, address: Ipv4Addr, subnet: u8, site_if: &str) {
        sh("ip", &["netns", "add", netns]);
        sh("ip", &["-n", netns, "link", "set", "lo", "up"]);
        sh(
            "ip",
            &[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                "lo",
            ],
        );
        for site in &self.sites {
            let i = site.index;
            assert!(i < 128, "at most 127 sites with a controller");
            let (ctl_addr, site_addr) = (
                format!("192.0.{subnet}.{}", 2 * (i - 1)),
                format!("192.0.{subnet}.{}", 2 * (i - 1) + 1),
            );
            let ctl_if = format!("c{i}");
            sh(
                "ip",
                &[
                    "-n",
                    netns,
                    "link",
                    "add",
                    &ctl_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    site_if,
                    "netns",
                    &site.netns,
                ],
            );
            sh(
                "ip",
                &[
                    "-n",
                    netns,
                    "addr",
                    "add",
                    &format!("{ctl_addr}/31"),
                    "dev",
                    &ctl_if,
                ],
            );
            sh(
                "ip",
                &[
                    "-n",
                    &site.netns,
                    "addr",
                    "add",
                    &format!("{site_addr}/31"),
                    "dev",
                    site_if,
                ],
            );
            sh("ip", &["-n", netns, "link", "set", &ctl_if, "up"]);
            sh("ip", &["-n", &site.netns, "link", "set", site_if, "up"]);
            sh(
                "ip",
                &[
                    "-n",
                    &site.netns,
                    "route",
                    "add",
                    &format!("{address}/32"),
                    "via",
                    &ctl_addr,
                ],
            );
        }
    }

    /// The controller moves to another host: a new namespace linked to every site
    /// (192.0.3.2(i-1)/31 on its side, `uc2` in the site), `address` on its `lo`, a route to it
    /// in every site; the service stops in the old namespace, which is deleted (its links and
    /// the old endpoint with it), and starts in the new one.
    pub fn move_controller(&mut self, address: Ipv4Addr) {
        let netns = format!("{}c2", self.prefix);
        self.controller_host(&netns, address, 3, "uc2");
        self.kill_controller();
        let controller = self
            .controller
            .as_mut()
            .expect("a network with a controller");
        let old = std::mem::replace(&mut controller.netns, netns);
        sh("ip", &["netns", "del", &old]);
        self.start_controller();
    }

    /// `tlm` run inside the controller's namespace.
    pub fn ctl_in_netns(&self, args: &[&str]) -> Command {
        let controller = self
            .controller
            .as_ref()
            .expect("a network with a controller");
        tlm_in_netns(&self.ctl, &controller.netns, args)
    }

    /// Starts `tlm serve` in the controller's namespace and waits for its heartbeat.
    pub fn start_controller(&mut self) {
        let controller = self
            .controller
            .as_mut()
            .expect("a network with a controller");
        controller.service = Some(start_service(
            &self.ctl,
            &controller.netns,
            &controller.log,
            "debug",
        ));
    }

    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref()?.service.as_ref().map(Child::id)
    }

    /// Kills the controller service.
    pub fn kill_controller(&mut self) {
        if let Some(controller) = self.controller.as_mut() {
            if let Some(child) = controller.service.take() {
                stop_service(child);
            }
        }
    }

    /// Stops the controller service as its unit does (SIGTERM) and waits up to `limit` for it
    /// to exit; returns its exit status.
    pub fn stop_controller(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self
            .controller
            .as_mut()
            .and_then(|c| c.service.take())
            .expect("tlm serve runs");
        sh("kill", &["-TERM", &child.id().to_string()]);
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait for tlm serve") {
                return status;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tlm serve did not exit within {limit:?} of SIGTERM:\n{}",
                    tail(&self.controller_log(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn controller_log(&self) -> String {
        self.controller
            .as_ref()
            .and_then(|c| std::fs::read_to_string(&c.log).ok())
            .unwrap_or_default()
    }

    /// `tlm status --format json`, node by name.
    /// `tlm activate all --confirm 120 --wait-blessed` (up to 180 s); asserts that every site's
    /// node blessed the version, else shows the output and the last lines of each log (without
    /// debug lines) under `what`.
    pub fn activate_all_blessed(&self, what: &str) {
        let run = self.ctl.run(&[
            "activate",
            "all",
            "--confirm",
            "120",
            "--wait-blessed",
            "--timeout",
            "180",
        ]);
        let n = self.sites.len();
        let quiet = |log: String| {
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("DEBUG") && !l.contains("HANDSHAKE"))
                .collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        assert!(
            run.code == 0
                && run
                    .stdout
                    .contains(&format!("{n} of {n} node(s) blessed the version")),
            "{what}: {}{}{}\n[controller]\n{}",
            run.stdout,
            run.stderr,
            self.sites
                .iter()
                .map(|s| format!("\n[{}]\n{}", s.name, quiet(s.log())))
                .collect::<String>(),
            self.controller
                .as_ref()
                .map(|c| quiet(std::fs::read_to_string(&c.log).unwrap_or_default()))
                .unwrap_or_default()
        );
    }

    pub fn fleet_status(&self) -> serde_json::Value {
        let text = self.ctl.ok(&["status", "--format", "json"]);
        serde_json::from_str(&text).unwrap()
    }

    /// Waits until every given site's node reports `version` active with `state`.
    pub fn wait_reported(&self, sites: &[u32], version: u32, state: &str, limit: Duration) {
        wait_for(
            limit,
            || {
                let status = self.fleet_status();
                sites.iter().all(|i| {
                    let node = self.site(*i).node();
                    status["nodes"].as_array().unwrap().iter().any(|n| {
                        n["node"] == node.as_str()
                            && n["reachable"] == true
                            && n["active_version"] == version
                            && n["state"] == state
                    })
                })
            },
            || {
                format!(
                    "nodes {sites:?} never reported v{version} {state}:\n{}\ncontroller log:\n{}",
                    self.ctl.ok(&["status"]),
                    tail(&self.controller_log(), 20)
                )
            },
        );
    }

    fn build_underlay(&self, mesh: bool) {
        // `ip netns exec` bind-mounts /etc/netns/<name>/hosts over /etc/hosts: the endpoints'
        // names resolve inside the namespaces only.
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for site in &self.sites {
            hosts.push_str(&format!("{} {}\n", site.endpoint(), site.endpoint_name()));
        }
        for site in &self.sites {
            let dir = PathBuf::from("/etc/netns").join(&site.netns);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("hosts"), &hosts).unwrap();
        }
        for site in &self.sites {
            sh("ip", &["netns", "add", &site.netns]);
            let n = ["-n", site.netns.as_str()];
            let ip = |args: &[&str]| sh("ip", &[&n[..], args].concat());
            ip(&["link", "set", "lo", "up"]);
            ip(&[
                "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p",
            ]);
            ip(&["link", "set", "lan0", "up"]);
            ip(&["link", "set", "lan0p", "up"]);
            ip(&["addr", "add", &format!("{}/24", site.lan()), "dev", "lan0"]);
            ip(&[
                "addr",
                "add",
                &format!("{}/32", site.endpoint()),
                "dev",
                "lo",
            ]);
            // Forwarding is the node's business (towalink-node turns it on).
            for setting in [
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ] {
                sh(
                    "ip",
                    &["netns", "exec", &site.netns, "sysctl", "-q", "-w", setting],
                );
            }
        }
        let mut pair = 0;
        let pairs = if mesh { self.sites.len() } else { 0 };
        for a in 0..pairs {
            for b in a + 1..self.sites.len() {
                let (sa, sb) = (&self.sites[a], &self.sites[b]);
                let (ia, ib) = (format!("u{}", sb.index), format!("u{}", sa.index));
                sh(
                    "ip",
                    &[
                        "-n", &sa.netns, "link", "add", &ia, "type", "veth", "peer", "name", &ib,
                        "netns", &sb.netns,
                    ],
                );
                let (addr_a, addr_b) = (
                    format!("198.51.100.{}", 2 * pair),
                    format!("198.51.100.{}", 2 * pair + 1),
                );
                sh(
                    "ip",
                    &[
                        "-n",
                        &sa.netns,
                        "addr",
                        "add",
                        &format!("{addr_a}/31"),
                        "dev",
                        &ia,
                    ],
                );
                sh(
                    "ip",
                    &[
                        "-n",
                        &sb.netns,
                        "addr",
                        "add",
                        &format!("{addr_b}/31"),
                        "dev",
                        &ib,
                    ],
                );
                sh("ip", &["-n", &sa.netns, "link", "set", &ia, "up"]);
                sh("ip", &["-n", &sb.netns, "link", "set", &ib, "up"]);
                sh(
                    "ip",
                    &[
                        "-n",
                        &sa.netns,
                        "route",
                        "add",
                        &format!("{}/32", sb.endpoint()),
                        "via",
                        &addr_b,
                    ],
                );
                sh(
                    "ip",
                    &[
                        "-n",
                        &sb.netns,
                        "route",
                        "add",
                        &format!("{}/32", sa.endpoint()),
                        "via",
                        &addr_a,
                    ],
                );
                pair += 1;
            }
        }
    }

    fn configure(&self, options: &Options) {
        let topology = options.topology;
        let t = &self.ctl;
        t.ok(&["set", "global", "bird_announce_interfaces", r#"["lan*"]"#]);
        t.ok(&["set", "global", "bird_bfd_interval_ms", "100"]);
        t.ok(&["set", "global", "bird_bfd_multiplier", "3"]);
        match topology {
            Topology::Star => {
                t.ok(&["set", "global", "topology", "star"]);
            }
            Topology::None => {
                t.ok(&["set", "global", "topology", "none"]);
            }
            Topology::Mesh => {}
        }
        if self.controller.is_some() {
            t.ok(&[
                "set",
                "global",
                "controller_endpoint",
                &format!("\"{CONTROLLER_ENDPOINT}\""),
            ]);
        }
        for (attribute, value) in &options.global {
            t.ok(&["set", "global", attribute, value]);
        }
        let last = self.sites.len() as u32;
        for site in self
            .sites
            .iter()
            .filter(|s| !options.spare.contains(&s.index))
        {
            t.ok(&["add", "site", &site.name]);
            t.ok(&["add", "node", &site.node()]);
            // The last site's endpoint is a name, the others are addresses.
            let endpoint = if site.index == last {
                site.endpoint_name()
            } else {
                site.endpoint().to_string()
            };
            t.ok(&["set", "node", &site.node(), "wg_endpoint", &endpoint]);
        }
        if topology == Topology::Star {
            t.ok(&[
                "set",
                "node",
                &self.sites[0].node(),
                "groups",
                r#"["hubs"]"#,
            ]);
        }
        t.ok(&["commit", "all"]);
        for site in self
            .sites
            .iter()
            .filter(|s| !options.spare.contains(&s.index))
        {
            t.ok(&[
                "provision",
                "node",
                &site.node(),
                site.state.to_str().unwrap(),
            ]);
        }
    }

    /// Waits until every BGP session of every site is Established; returns how long it took.
    pub fn wait_established(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        wait_for(
            limit,
            || {
                self.sites.iter().filter(|s| s.bird.is_some()).all(|s| {
                    let bgp = s.bgp();
                    !bgp.is_empty() && bgp.iter().all(|(_, up, _)| *up)
                })
            },
            || {
                self.sites
                    .iter()
                    .map(|s| {
                        format!(
                            "\n[{}] {}\n{}",
                            s.name,
                            s.birdc("show protocols"),
                            tail(&s.log(), 15)
                        )
                    })
                    .collect::<String>()
            },
        );
        started.elapsed()
    }

    pub fn site(&self, index: u32) -> &Site {
        &self.sites[index as usize - 1]
    }

    pub fn site_mut(&mut self, index: u32) -> &mut Site {
        &mut self.sites[index as usize - 1]
    }

    /// Takes the underlay link between two sites down (both ends).
    pub fn cut(&self, a: u32, b: u32) {
        sh(
            "ip",
            &[
                "-n",
                &self.site(a).netns,
                "link",
                "set",
                &format!("u{b}"),
                "down",
            ],
        );
        sh(
            "ip",
            &[
                "-n",
                &self.site(b).netns,
                "link",
                "set",
                &format!("u{a}"),
                "down",
            ],
        );
    }

    /// Brings it back, with the routes to the endpoints the kernel dropped with the link.
    pub fn restore(&self, a: u32, b: u32) {
        for (x, y) in [(a, b), (b, a)] {
            let site = self.site(x);
            sh(
                "ip",
                &["-n", &site.netns, "link", "set", &format!("u{y}"), "up"],
            );
            let peer = self.site(y);
            let out = sh(
                "ip",
                &[
                    "-n",
                    &peer.netns,
                    "-o",
                    "-4",
                    "addr",
                    "show",
                    "dev",
                    &format!("u{x}"),
                ],
            );
            let via = out
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .unwrap()
                .to_string();
            sh(
                "ip",
                &[
                    "-n",
                    &site.netns,
                    "route",
                    "replace",
                    &format!("{}/32", peer.endpoint()),
                    "via",
                    &via,
                ],
            );
        }
    }
}

/// `tlm` on `ctl`'s directory, run inside the namespace `netns`.
pub fn tlm_in_netns(ctl: &Installation, netns: &str, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", netns])
        .arg(binary("tlm"))
        .args(args)
        .env("TOWALINK_CONFIG_DIR", &ctl.dir)
        .env("NO_COLOR", "1");
    command
}

/// Starts `tlm serve` for `ctl` in the namespace `netns`, its log appended to `log`, and waits
/// for its heartbeat.
pub fn start_service(ctl: &Installation, netns: &str, log: &Path, loglevel: &str) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let heartbeat = ctl.dir.join("status/service.json");
    let _ = std::fs::remove_file(&heartbeat);
    let child = tlm_in_netns(ctl, netns, &["--loglevel", loglevel, "serve"])
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start tlm serve");
    wait_for(
        Duration::from_secs(10),
        || heartbeat.exists(),
        || {
            format!(
                "tlm serve did not start:\n{}",
                tail(&std::fs::read_to_string(log).unwrap_or_default(), 20)
            )
        },
    );
    child
}

/// Kills a `tlm serve` and reaps it.
pub fn stop_service(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Network {
    fn drop(&mut self) {
        self.kill_controller();
        if let Some(controller) = &self.controller {
            let _ = Command::new("ip")
                .args(["netns", "del", &controller.netns])
                .status();
        }
        for site in &mut self.sites {
            site.kill_daemon();
            if let Some(mut bird) = site.bird.take() {
                let _ = bird.kill();
                let _ = bird.wait();
            }
            // What the daemon left (its management SSH sessions outlive it by design).
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &site.netns])
                .output()
            {
                let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                if !pids.is_empty() {
                    let _ = Command::new("kill").arg("-9").args(&pids).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &site.netns])
                .status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&site.netns));
        }
    }
}

/// A ping every 20 ms from one site's LAN address to another's, for a figure of what a change
/// cost the traffic; killed on drop (also when the test fails).
pub struct LanPinger {
    child: Option<Child>,
}

impl LanPinger {
    /// Waits (generously) until `from` reaches `to`'s LAN, then starts pinging.
    pub fn start(from: &Site, to: &Site) -> LanPinger {
        wait_for(
            Duration::from_secs(60),
            || from.ping(to.lan()),
            || {
                format!(
                    "{} cannot reach {}'s LAN:\n{}",
                    from.name,
                    to.name,
                    from.birdc("show protocols")
                )
            },
        );
        let child = from
            .exec("ping")
            .args([
                "-i",
                "0.02",
                "-q",
                "-I",
                &from.lan().to_string(),
                &to.lan().to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start ping");
        LanPinger { child: Some(child) }
    }

    /// Stops it (SIGINT, so ping prints its summary): (lost, sent, outage ms).
    pub fn finish(mut self) -> (u64, u64, f64) {
        let child = self.child.take().expect("running");
        sh("kill", &["-INT", &child.id().to_string()]);
        ping_outage(child.wait_with_output().expect("ping output"))
    }
}

impl Drop for LanPinger {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// (lost, sent, outage ms) from `ping -q` output: lost packets times the real interval.
pub fn ping_outage(output: std::process::Output) -> (u64, u64, f64) {
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("{text}"));
    let numbers: Vec<f64> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter_map(|w| w.parse().ok())
        .collect();
    let (sent, received) = (numbers[0] as u64, numbers[1] as u64);
    let time_ms = *numbers.last().unwrap();
    let lost = sent - received;
    (lost, sent, lost as f64 * time_ms / sent as f64)
}

/// Runs `job` on a thread that joined the network namespace `netns` (sockets it opens live
/// there), and returns its result.
pub fn in_netns<T: Send + 'static>(netns: &str, job: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(netns, job).join().expect("namespace thread")
}

/// Starts `job` on a thread that joined the network namespace `netns`, and returns at once.
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &str,
    job: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        enter_netns(&netns);
        job()
    })
}

/// Moves the calling thread into the network namespace `netns` (sockets it opens live there).
pub fn enter_netns(netns: &str) {
    let path = PathBuf::from("/var/run/netns").join(netns);
    let file = std::fs::File::open(&path).expect("open the namespace");
    // SAFETY: setns on a namespace file we hold open; it affects this thread only.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}
