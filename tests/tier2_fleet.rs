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
    while !first_line.starts_with("pairing code ") {
        first_line.clear();
        assert!(
            std::io::BufRead::read_line(&mut chosen_err, &mut first_line).unwrap() > 0,
            "bootstrap printed no pairing code"
        );
    }
    // The operator reads the code off the device's console.
    let code = first_line
        .strip_prefix("pairing code ")
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no pairing code in `{first_line}`"))
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
            "--code",
            &code,
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
        attach_out.contains("handed the identity of r.s4 to device "),
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
