//! Tier 2, the controller service: the real `tlm serve` in its own namespace with its
//! in-process WireGuard management endpoint, real `towalink-node` daemons (boringtun, BIRD 2)
//! in site namespaces. Versions reach the nodes over the management links, `tlm activate`
//! takes effect across the fleet and reports per node, a version that breaks BGP on one node
//! rolls back there, a fresh device is attached by the bootstrap flow, the API refuses
//! anything outside the management link and bad requests, and routing survives the
//! controller's death.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use towalink_tests::binary;
use towalink_tests::network::{
    in_netns, tail, wait_for, Network, Options, Topology, CONTROLLER_ENDPOINT,
};

static SERIAL: Mutex<()> = Mutex::new(());

const CONTROLLER_MGMT: &str = "fd54:6f77:616c:ffff::1";

fn node_entry<'a>(status: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("{node} not in {status:#}"))
}

/// One raw request to the management API from inside a namespace; returns the status line.
fn raw_request(netns: &str, request: Vec<u8>) -> String {
    in_netns(netns, move || {
        let api: SocketAddr = format!("[{CONTROLLER_MGMT}]:8001").parse().unwrap();
        let mut stream =
            TcpStream::connect_timeout(&api, Duration::from_secs(5)).expect("connect to the API");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(&request);
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

fn connect_error(netns: &str, to: SocketAddr) -> std::io::ErrorKind {
    in_netns(netns, move || {
        match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
            Ok(_) => panic!("{to} accepted a connection"),
            Err(e) => e.kind(),
        }
    })
}

#[test]
fn fleet_versions_activation_rollback_attach_and_controller_loss() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut options = Options::new(4, Topology::Mesh);
    options.controller = true;
    options.spare = vec![4];
    options.global = vec![("node_health_timeout_s".into(), "10".into())];
    let mut net = Network::build(options);
    net.wait_established(Duration::from_secs(30));
    net.wait_reported(&[1, 2, 3], 1, "good", Duration::from_secs(20));
    wait_for(
        Duration::from_secs(10),
        || {
            let status = net.fleet_status();
            let bgp = node_entry(&status, "r.s1")["bgp"]
                .as_array()
                .unwrap()
                .clone();
            !bgp.is_empty()
                && bgp
                    .iter()
                    .all(|b| b["info"].as_str().unwrap().starts_with("Established"))
        },
        || {
            format!(
                "r.s1 never reported its sessions Established:\n{}",
                net.ctl.ok(&["status", "node", "r.s1"])
            )
        },
    );
    let status = net.fleet_status();
    let s1 = node_entry(&status, "r.s1");
    assert!(
        s1["endpoint"]
            .as_str()
            .unwrap_or_default()
            .starts_with("192.0.2.1:"),
        "{s1:#}\n{:#}",
        status["service"]
    );
    assert_eq!(
        s1["bgp"].as_array().unwrap().len(),
        4,
        "two peers, v4 and v6: {s1:#}"
    );
    assert!(s1["management"]["rx_bytes"].as_u64().unwrap() > 0, "{s1:#}");
    let tunnels: Vec<&str> = s1["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["interface"].as_str().unwrap())
        .collect();
    assert_eq!(tunnels, ["tlwg2", "tlwg3", "tlmgmt"], "{s1:#}");

    // The API is not reachable outside the management link.
    let underlay_api = SocketAddr::new(CONTROLLER_ENDPOINT.into(), 8001);
    assert_eq!(
        connect_error(&net.site(1).netns, underlay_api),
        std::io::ErrorKind::ConnectionRefused
    );
    let mgmt_api: SocketAddr = format!("[{CONTROLLER_MGMT}]:8001").parse().unwrap();
    let ctl_netns = net.controller.as_ref().unwrap().netns.clone();
    // The controller host itself reaches the address locally, but is no node: 403.
    assert!(
        raw_request(&ctl_netns, b"GET /v1/bundle/1 HTTP/1.1\r\n\r\n".to_vec()).contains(" 403 ")
    );
    // From a site's underlay with a route to the controller's management address.
    let s4 = net.site(4).netns.clone();
    net.site(4).sh(
        "ip",
        &["-6", "addr", "add", "fd00:99::2/64", "dev", "uc", "nodad"],
    );
    let sh = |args: &[&str]| towalink_tests::network::sh("ip", args);
    sh(&[
        "-n",
        &ctl_netns,
        "-6",
        "addr",
        "add",
        "fd00:99::1/64",
        "dev",
        "c4",
        "nodad",
    ]);
    net.site(4).sh(
        "ip",
        &[
            "-6",
            "route",
            "add",
            &format!("{CONTROLLER_MGMT}/128"),
            "via",
            "fd00:99::1",
        ],
    );
    assert_eq!(
        connect_error(&s4, mgmt_api),
        std::io::ErrorKind::ConnectionRefused
    );
    net.site(4).sh(
        "ip",
        &["-6", "route", "del", &format!("{CONTROLLER_MGMT}/128")],
    );

    // Bad requests through a node's link: refused, logged, the service goes on.
    let s1_netns = net.site(1).netns.clone();
    assert!(raw_request(&s1_netns, b"\x16\x03\x01garbage\r\n\r\n".to_vec()).contains(" 400 "));
    let oversize = b"POST /v1/sync HTTP/1.1\r\nContent-Length: 50000000\r\n\r\n{".to_vec();
    assert!(raw_request(&s1_netns, oversize).contains(" 413 "));
    let foreign = br#"{"node_id":2,"node":"r.s2","daemon_version":"x","uptime_s":0,"daemon_uptime_s":0,"active_version":null,"state":null,"tries_left":null,"confirm_by":null,"last_good_version":null,"installed_versions":[],"health":[],"last_rollback":null,"tunnels":[],"bgp":[],"order_done":null}"#;
    let mut request = format!(
        "POST /v1/sync HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        foreign.len()
    )
    .into_bytes();
    request.extend_from_slice(foreign);
    assert!(raw_request(&s1_netns, request).contains(" 403 "));
    assert!(
        raw_request(&s1_netns, b"GET /v1/bundle/99 HTTP/1.1\r\n\r\n".to_vec()).contains(" 404 ")
    );
    let log = net.controller_log();
    for expected in [
        "malformed request refused",
        "oversize request refused",
        "report for another node refused",
    ] {
        assert!(
            log.contains(expected),
            "controller log lacks `{expected}`:\n{}",
            tail(&log, 30)
        );
    }
    let before = node_entry(&net.fleet_status(), "r.s1")["last_seen_ms"]
        .as_u64()
        .unwrap();
    wait_for(
        Duration::from_secs(15),
        || {
            node_entry(&net.fleet_status(), "r.s1")["last_seen_ms"]
                .as_u64()
                .unwrap()
                > before
        },
        || "r.s1 stopped reporting after the bad requests".into(),
    );

    // A change: committed versions reach every node without being activated.
    net.ctl
        .ok(&["set", "global", "bird_bfd_interval_ms", "200"]);
    net.ctl.ok(&["commit", "all"]);
    wait_for(
        Duration::from_secs(10),
        || {
            let status = net.fleet_status();
            (1..=3).all(|i| {
                let n = node_entry(&status, &format!("r.s{i}"));
                n["installed_versions"]
                    .as_array()
                    .unwrap()
                    .contains(&2.into())
                    && n["active_version"] == 1
            })
        },
        || format!("v2 did not reach every node:\n{}", net.ctl.ok(&["status"])),
    );
    // Activated across the fleet: live everywhere.
    let out = net.ctl.ok(&["activate", "all"]);
    for i in 1..=3 {
        assert!(out.contains(&format!("r.s{i}: v2 activated")), "{out}");
        let conf =
            std::fs::read_to_string(net.site(i).root.join("etc/bird/bird_base.conf")).unwrap();
        assert!(conf.contains("min rx interval 200 ms"), "{conf}");
    }
    assert!(out.contains("3 of 3 node(s) took the version"), "{out}");
    net.wait_reported(&[1, 2, 3], 2, "good", Duration::from_secs(20));
    net.wait_established(Duration::from_secs(30));

    // A version that breaks BGP on r.s2 only (its peers' AS numbers off by one): rolled back
    // there, the others keep theirs, `tlm activate` and `tlm status` say so.
    let broken = towalink_tests::bird_peers_breaking_bgp();
    let node_file = net.ctl.dir.join("site_s2/node_r/bird_peers.conf.jinja");
    std::fs::write(&node_file, broken).unwrap();
    let out = net.ctl.ok(&["commit", "all"]);
    assert!(
        out.contains("r.s2: v3") && !out.contains("r.s1: v3"),
        "{out}"
    );
    // Staged: r.s2 first; it does not bless, so the rollout stops there.
    let run = net
        .ctl
        .run(&["activate", "all", "--canary", "s2", "--timeout", "60"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("r.s1: v2"), "{}", run.stdout);
    assert!(
        run.stdout.contains("r.s2: v3 rolled back:")
            && run.stdout.contains("did not pass its health checks"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(
            "stopped: canary `s2` did not bless the version; 2 other node(s) keep their version"
        ),
        "{}",
        run.stdout
    );
    let status = net.fleet_status();
    let s2 = node_entry(&status, "r.s2");
    assert_eq!(s2["active_version"], 2, "{s2:#}");
    assert_eq!(s2["last_rollback"]["from_version"], 3, "{s2:#}");
    let text = net.ctl.ok(&["status"]);
    assert!(text.contains("v3 -> v2"), "{text}");
    net.wait_established(Duration::from_secs(30));
    std::fs::remove_file(&node_file).unwrap();
    net.ctl.ok(&["commit", "all"]);
    let out = net
        .ctl
        .ok(&["activate", "all", "--canary", "r.s2", "--wait-blessed"]);
    assert!(out.contains("r.s2: v4 activated, blessed"), "{out}");
    assert!(
        out.contains("canary `r.s2` blessed the version; activating the other 2 node(s)"),
        "{out}"
    );
    assert!(
        out.contains("r.s1: v2 activated, blessed")
            && out.contains("2 of 2 node(s) blessed the version"),
        "{out}"
    );

    // A fresh device attached by the bootstrap flow; a second device asking gets nothing.
    net.ctl.ok(&["add", "site", "s4"]);
    net.ctl.ok(&["add", "node", "r.s4"]);
    net.ctl
        .ok(&["set", "node", "r.s4", "wg_endpoint", "\"203.0.113.4\""]);
    net.ctl.ok(&["commit", "all"]);
    // The first attach makes the certificate (no device yet: it gives up after collecting).
    let first = net
        .ctl_in_netns(&["attach", "node", "r.s4", "--collect", "0"])
        .output()
        .unwrap();
    assert_eq!(first.status.code(), Some(1));
    let first_out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first_out.contains("certificate SHA-256 fingerprint"),
        "{first_out}"
    );
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("no device asked"),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let cert = net.ctl.dir.join("certs/server.pem");
    let key_mode = std::os::unix::fs::MetadataExt::mode(
        &std::fs::metadata(net.ctl.dir.join("certs/key.pem")).unwrap(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    let bootstrap = |state: &std::path::Path| {
        net.site(4)
            .exec(binary("towalink-node").to_str().unwrap())
            .arg("--state-dir")
            .arg(state)
            .args([
                "bootstrap",
                "--controller",
                &format!("{CONTROLLER_ENDPOINT}:8000"),
                "--interval-ms",
                "300",
                "--timeout-s",
                "90",
                "--ca",
            ])
            .arg(&cert)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let chosen_state = net.site(4).state.clone();
    let other_state = net.temp.path().join("s4-other");
    let mut chosen = bootstrap(&chosen_state);
    let other = bootstrap(&other_state);
    let mut chosen_err = std::io::BufReader::new(chosen.stderr.take().unwrap());
    let mut first_line = String::new();
    while !first_line.starts_with("device id ") {
        first_line.clear();
        assert!(
            std::io::BufRead::read_line(&mut chosen_err, &mut first_line).unwrap() > 0,
            "bootstrap printed no device id"
        );
    }
    let device = first_line
        .strip_prefix("device id ")
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no device id in `{first_line}`"))
        .to_string();
    // Let the other device ask too before the choice.
    std::thread::sleep(Duration::from_secs(2));
    let attach = net
        .ctl_in_netns(&[
            "attach",
            "node",
            "r.s4",
            "--collect",
            "30",
            "--timeout",
            "60",
            "--device",
            &device,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = chosen.wait().unwrap();
    let mut rest = String::new();
    chosen_err.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "bootstrap: {first_line}{rest}");
    let identity = std::fs::read_to_string(chosen_state.join("identity/node.toml")).unwrap();
    assert!(
        identity.contains("node = \"r\"") && identity.contains("site = \"s4\""),
        "{identity}"
    );
    let key_mode = std::os::unix::fs::MetadataExt::mode(
        &std::fs::metadata(chosen_state.join("identity/wg_private_key")).unwrap(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    net.site_mut(4).start_daemon();
    let attached = attach.wait_with_output().unwrap();
    let attach_out = String::from_utf8_lossy(&attached.stdout);
    assert!(
        attached.status.success(),
        "{attach_out}{}",
        String::from_utf8_lossy(&attached.stderr)
    );
    assert!(
        attach_out.contains(&format!("handed the identity of r.s4 to device {device}")),
        "{attach_out}"
    );
    assert!(
        attach_out.contains("management link up: r.s4 reports from 192.0.2.7:"),
        "{attach_out}"
    );
    let other_out = other.wait_with_output().unwrap();
    assert_eq!(other_out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&other_out.stderr).contains("turned this device away"),
        "{}",
        String::from_utf8_lossy(&other_out.stderr)
    );
    assert!(
        !other_state.join("identity").exists(),
        "the device not chosen got an identity"
    );
    net.site_mut(4).start_bird();
    let out = net.ctl.ok(&["activate", "all"]);
    assert!(out.contains("4 of 4 node(s) took the version"), "{out}");
    net.wait_established(Duration::from_secs(30));
    assert!(
        net.site(1).ping(net.site(4).lan()),
        "s1 cannot reach s4's LAN"
    );

    // The controller dies: traffic keeps flowing, status says the service is gone.
    net.kill_controller();
    std::thread::sleep(Duration::from_secs(3));
    for (a, b) in [(1, 2), (2, 3), (4, 1)] {
        assert!(
            net.site(a).ping(net.site(b).lan()),
            "s{a} cannot reach s{b} without the controller"
        );
    }
    let text = net.ctl.ok(&["status"]);
    assert!(text.contains("controller service: not running"), "{text}");
    for i in 1..=4 {
        let status = net.site(i).status();
        assert_eq!(status["state"], "good", "s{i}: {status:#}");
    }
}

/// What the attacker on the management address answers, one sync after another.
enum Attack {
    /// The original attack: an unsigned order with a huge seq, a downgrade, a 300 s interval.
    Unsigned,
    /// The same signed by a key that is not the controller's.
    ForeignKey,
    /// Signed by the controller's key (stolen), with a seq past the bound.
    HugeSeq,
    /// Signed, with a report interval out of range.
    BadInterval,
    /// A genuine signed reply recorded earlier (another report's nonce): a replay.
    Replay,
    /// Signed, offering the pruned v1 (its genuine bundle served on request), no order.
    OldVersion,
    /// Signed (the key is stolen), offering v99, served as an unsigned 2 GiB zstd bomb.
    Bomb,
    /// Not JSON at all, with terminal control sequences.
    Garbage,
}

/// A fake management API in the site's namespace, on the controller's management address
/// (added to the site's `lo`: local addresses win over the tunnel's route, as a hijacked
/// address would). Serves `attacks` in turn; returns (syncs answered, bundles requested).
struct FakeController {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    served: std::sync::Arc<Mutex<(usize, Vec<String>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeController {
    fn start(
        netns: &str,
        attacks: Vec<Attack>,
        key: towalink_bundle::SigningKey,
        bundles: std::path::PathBuf,
    ) -> FakeController {
        use std::sync::atomic::{AtomicBool, Ordering};
        use towalink_bundle::messages::{NodeReport, Order, SyncReply};
        use towalink_bundle::orders::{sign_reply, ReplyBody};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let served = std::sync::Arc::new(Mutex::new((0usize, Vec::new())));
        let path = std::path::PathBuf::from("/var/run/netns").join(netns);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let served = served.clone();
            std::thread::spawn(move || {
                let file = std::fs::File::open(&path).unwrap();
                // SAFETY: setns on a namespace file we hold open; this thread only.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0);
                let listener =
                    std::net::TcpListener::bind(format!("[{CONTROLLER_MGMT}]:8001")).unwrap();
                listener.set_nonblocking(true).unwrap();
                ready_tx.send(()).unwrap();
                let foreign = towalink_bundle::SigningKey::from_bytes(&[0x66; 32]);
                while !stop.load(Ordering::SeqCst) {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = std::io::BufReader::new(stream);
                    let Ok(request) = towalink_bundle::wire::read_request(&mut reader, 1 << 20)
                    else {
                        continue;
                    };
                    if let Some(v) = request.path.strip_prefix("/v1/bundle/") {
                        served.lock().unwrap().1.push(request.path.clone());
                        let file = bundles.join(format!("v{v}/s1-r-v{v}.tar.zst"));
                        let body = std::fs::read(file).unwrap_or_else(|_| {
                            let header = towalink_tests::tar_header("files/big", 2 << 30);
                            towalink_tests::zstd_bomb(&header, (2 << 30) + 512)
                        });
                        let _ = towalink_bundle::wire::write_response(
                            &mut writer,
                            200,
                            "application/zstd",
                            &body,
                        );
                        continue;
                    }
                    let report: NodeReport = serde_json::from_slice(&request.body).unwrap();
                    let index = {
                        let mut s = served.lock().unwrap();
                        s.0 += 1;
                        (s.0 - 1).min(attacks.len() - 1)
                    };
                    let downgrade = Some(Order {
                        seq: i64::MAX as u64,
                        version: 1,
                        confirm_s: None,
                    });
                    let body = |nonce: &str, order, interval| ReplyBody {
                        node_id: report.node_id,
                        nonce: nonce.to_string(),
                        versions: vec![1],
                        order,
                        report_interval_s: interval,
                    };
                    let unsigned = SyncReply {
                        versions: vec![1],
                        order: downgrade,
                        report_interval_s: 300,
                        signed: None,
                    };
                    let reply = match attacks[index] {
                        Attack::Unsigned | Attack::Garbage => unsigned,
                        Attack::ForeignKey => SyncReply {
                            signed: Some(sign_reply(
                                &body(&report.nonce, downgrade, 300),
                                &foreign,
                            )),
                            ..unsigned
                        },
                        Attack::HugeSeq => SyncReply {
                            signed: Some(sign_reply(&body(&report.nonce, downgrade, 2), &key)),
                            ..unsigned
                        },
                        Attack::BadInterval => SyncReply {
                            signed: Some(sign_reply(&body(&report.nonce, None, 0), &key)),
                            ..unsigned
                        },
                        Attack::Replay => SyncReply {
                            signed: Some(sign_reply(
                                &body("00000000000000000000000000000000", None, 300),
                                &key,
                            )),
                            ..unsigned
                        },
                        Attack::OldVersion => SyncReply {
                            signed: Some(sign_reply(&body(&report.nonce, None, 2), &key)),
                            ..unsigned
                        },
                        Attack::Bomb => {
                            let mut offer = body(&report.nonce, None, 2);
                            offer.versions = vec![99];
                            SyncReply {
                                signed: Some(sign_reply(&offer, &key)),
                                ..unsigned
                            }
                        }
                    };
                    let bytes = match attacks[index] {
                        Attack::Garbage => b"\x1b[2J\x1b[31m{\"versions\": [1],\n".to_vec(),
                        _ => serde_json::to_vec(&reply).unwrap(),
                    };
                    let _ = towalink_bundle::wire::write_response(
                        &mut writer,
                        200,
                        "application/json",
                        &bytes,
                    );
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the fake controller did not start");
        FakeController {
            stop,
            served,
            thread: Some(thread),
        }
    }

    fn syncs(&self) -> usize {
        self.served.lock().unwrap().0
    }

    fn bundles(&self) -> Vec<String> {
        self.served.lock().unwrap().1.clone()
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whoever holds the controller's management address gets no obedience: a forged or unsigned
/// order, a huge seq, a bad report interval, a replayed reply and a replayed old version are
/// refused by a real node (logged, settings kept), which keeps reporting and later takes
/// genuine `tlm activate`s, including one naming a version it had pruned; a `last-order.toml`
/// left by the original attack does not wedge it.
#[test]
fn hostile_replies_on_the_management_address_are_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut options = Options::new(1, Topology::None);
    options.controller = true;
    options.global = vec![("mgmt_report_interval_s".into(), "2".into())];
    let mut net = Network::build(options);
    net.wait_reported(&[1], 1, "good", Duration::from_secs(30));
    // v2 then v3 activated (so v1 leaves the slots), then v4..v13: the node prunes v1.
    let commit = |value: u32| {
        net.ctl
            .ok(&["set", "global", "bird_bfd_interval_ms", &value.to_string()]);
        net.ctl.ok(&["commit", "all"]);
    };
    for version in 2..=3 {
        commit(200 + version);
        let out = net.ctl.ok(&["activate", "all"]);
        assert!(
            out.contains(&format!("r.s1: v{version} activated")),
            "{out}"
        );
    }
    for version in 4..=13 {
        commit(200 + version);
    }
    wait_for(
        Duration::from_secs(60),
        || {
            let status = net.fleet_status();
            let installed = node_entry(&status, "r.s1")["installed_versions"].clone();
            installed
                .as_array()
                .is_some_and(|v| v.contains(&13.into()) && !v.contains(&1.into()))
        },
        || {
            format!(
                "r.s1 did not mirror v13 and prune v1:\n{}",
                net.ctl.ok(&["status", "node", "r.s1"])
            )
        },
    );

    let key_text = std::fs::read_to_string(net.ctl.dir.join("certs/signing.key")).unwrap();
    let key = towalink_bundle::signing_key_from_base64(&key_text).unwrap();
    let s1 = net.site(1).netns.clone();
    net.site(1).sh(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{CONTROLLER_MGMT}/128"),
            "dev",
            "lo",
            "nodad",
        ],
    );
    let attacks = vec![
        Attack::Unsigned,
        Attack::ForeignKey,
        Attack::HugeSeq,
        Attack::BadInterval,
        Attack::Replay,
        Attack::OldVersion,
        Attack::Bomb,
        Attack::Garbage,
        Attack::Unsigned,
    ];
    let count = attacks.len();
    let fake = FakeController::start(&s1, attacks, key, net.ctl.dir.join("effective/s1/r"));
    wait_for(
        Duration::from_secs(120),
        || fake.syncs() >= count,
        || {
            format!(
                "the node synced only {} times with the fake controller:\n{}",
                fake.syncs(),
                tail(&net.site(1).log(), 30)
            )
        },
    );
    let log = net.site(1).log();
    for reason in [
        "reply is not signed",
        "reply signature does not verify against the controller key this node trusts",
        "order seq 9223372036854775807 is outside 1..=9007199254740991",
        "report interval 0 s is outside 1..=300 s",
        "reply answers another report (nonce mismatch)",
        "reply is not valid: expected value at line 1 column 1",
    ] {
        assert!(
            log.contains(reason)
                && log.contains("sync reply refused; keeping the last good settings"),
            "the node log lacks `{reason}`:\n{}",
            tail(&log, 40)
        );
    }
    assert!(!log.contains("panicked"), "{}", tail(&log, 40));
    assert!(!log.contains('\x1b'), "a control sequence reached the log");
    for line in log
        .lines()
        .filter(|l| l.contains("refused") || l.contains("cannot take"))
    {
        eprintln!("{line}");
    }
    // The bomb: downloaded (the stolen key offered it), refused from its first tar header.
    assert!(
        log.contains("cannot take version")
            && log.contains("`manifest.toml` must come before any other entry"),
        "{}",
        tail(&log, 40)
    );
    assert_eq!(fake.bundles(), ["/v1/bundle/99"], "v1 must not be fetched");
    let status = net.site(1).status();
    assert_eq!(status["active_version"], 3, "{status:#}");
    assert_eq!(status["state"], "good", "{status:#}");
    assert!(
        !status["installed_versions"]
            .as_array()
            .unwrap()
            .contains(&1.into()),
        "{status:#}"
    );
    drop(fake);
    net.site(1).sh(
        "ip",
        &[
            "-6",
            "addr",
            "del",
            &format!("{CONTROLLER_MGMT}/128"),
            "dev",
            "lo",
        ],
    );

    // Back with the real controller: reports resume at the controller's interval (a forged
    // 300 s would keep it silent for 5 minutes).
    let seen = node_entry(&net.fleet_status(), "r.s1")["last_seen_ms"]
        .as_u64()
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        || {
            node_entry(&net.fleet_status(), "r.s1")["last_seen_ms"]
                .as_u64()
                .unwrap()
                > seen
        },
        || format!("r.s1 stopped reporting:\n{}", tail(&net.site(1).log(), 30)),
    );
    // A genuine order for the pruned v1: downloaded (the order names it) and activated.
    let out = net.ctl.ok(&["activate", "node", "r.s1", "1"]);
    assert!(out.contains("r.s1: v1 activated"), "{out}");
    assert_eq!(net.site(1).status()["active_version"], 1);

    // The original attack's record on disk (unsigned, seq 2^63 - 1) does not wedge the node.
    net.site_mut(1).kill_daemon();
    std::fs::write(
        net.site(1).state.join("last-order.toml"),
        "seq = 9223372036854775807\nversion = 1\nresult = \"activated\"\ntime = 1\n",
    )
    .unwrap();
    net.site_mut(1).start_daemon();
    let out = net.ctl.ok(&["activate", "all"]);
    assert!(out.contains("r.s1: v13 activated"), "{out}");
    assert!(out.contains("1 of 1 node(s) took the version"), "{out}");
}
