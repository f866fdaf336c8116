//! Tier 2 (network): sites as network namespaces joined by veth underlay links, each running
//! the real `towalink-node` (in-process WireGuard) and a real BIRD 2, configured by the real
//! `tlm`. What an engineer checks: BGP Established with BFD, LAN-to-LAN ping through the
//! tunnels, failover through a third site when the underlay is cut, the direct path back after
//! a restore, a star, no controller at all, and a BFD change that reloads only BIRD.

use std::time::Duration;

use towalink_tests::network::{ping_outage, tail, wait_for, Network, Topology};

/// One network at a time: on two cores, parallel networks would make BFD's 300 ms detection
/// time a test of the scheduler.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn three_sites_full_mesh_failover_restore_and_no_controller() {
    let _serial = serial();
    let mut net = Network::start(3, Topology::Mesh);
    let took = net.wait_established(Duration::from_secs(60));
    eprintln!(
        "3 sites: all BGP sessions Established {:.1} s after the daemons started",
        took.as_secs_f64()
    );
    for site in &net.sites {
        // Two peers, an IPv4 and an IPv6 session each, all with BFD.
        assert_eq!(
            site.bgp().len(),
            4,
            "[{}] {}",
            site.name,
            site.birdc("show protocols")
        );
        let bfd = site.birdc("show bfd sessions");
        assert_eq!(bfd.matches(" Up ").count(), 4, "[{}] {bfd}", site.name);
    }
    for a in &net.sites {
        for b in &net.sites {
            if a.index != b.index {
                assert!(
                    a.ping(b.lan()),
                    "{} cannot ping {}:\n{}\n{}\n{}",
                    a.name,
                    b.name,
                    a.sh("ip", &["route"]),
                    a.sh("ip", &["addr"]),
                    a.birdc("show route all")
                );
                // Sessions are up; BGP may still be choosing between the direct route and
                // the one through the third site (whichever update came first).
                let direct = format!("tlwg{}", b.index);
                wait_for(
                    Duration::from_secs(30),
                    || a.try_route_dev(b.lan()).as_deref() == Some(direct.as_str()),
                    || {
                        format!(
                            "{} -> {} never took the direct tunnel {direct}:\n{}\n{}",
                            a.name,
                            b.name,
                            a.birdc("show route all"),
                            a.birdc("show bfd sessions")
                        )
                    },
                );
            }
        }
    }

    // Cut the underlay between sites 1 and 2 while pinging across every 10 ms: traffic goes
    // on through site 3.
    let (s1, s2) = (net.site(1), net.site(2));
    let pinger = s1
        .exec("ping")
        .args([
            "-i",
            "0.01",
            "-c",
            "400",
            "-q",
            "-I",
            &s1.lan().to_string(),
            &s2.lan().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    net.cut(1, 2);
    let outage = ping_outage(pinger.wait_with_output().unwrap());
    eprintln!(
        "failover: {} of {} pings lost, outage about {:.0} ms",
        outage.0, outage.1, outage.2
    );
    assert!(outage.0 < outage.1 / 2, "traffic did not go on: {outage:?}");
    wait_for(
        Duration::from_secs(10),
        || s1.route_dev(s2.lan()) == "tlwg3",
        || {
            format!(
                "no failover: {}\n{}",
                s1.sh("ip", &["route"]),
                s1.birdc("show protocols")
            )
        },
    );
    assert!(s1.ping(s2.lan()), "no LAN-to-LAN path through site 3");

    // Restore it: the direct path returns.
    net.restore(1, 2);
    let (s1, s2) = (net.site(1), net.site(2));
    wait_for(
        Duration::from_secs(60),
        || s1.route_dev(s2.lan()) == "tlwg2",
        || {
            format!(
                "direct path not back: {}\n{}",
                s1.sh("ip", &["route"]),
                s1.birdc("show protocols")
            )
        },
    );
    assert!(s1.ping(s2.lan()));

    // No controller at all: routing keeps working; a node restart comes back to the same
    // version and the same routes.
    let ctl_dir = net.ctl.dir.clone();
    std::fs::remove_dir_all(&ctl_dir).unwrap();
    assert!(net.site(1).ping(net.site(3).lan()));
    let version_before = net.site(2).status()["active_version"].clone();
    let routes_before = net.site(2).sh("ip", &["route", "show", "proto", "bird"]);
    net.site_mut(2).kill_daemon();
    net.site_mut(2).start_daemon();
    net.wait_established(Duration::from_secs(60));
    let s2 = net.site(2);
    assert_eq!(s2.status()["active_version"], version_before);
    wait_for(
        Duration::from_secs(10),
        || s2.sh("ip", &["route", "show", "proto", "bird"]) == routes_before,
        || {
            format!(
                "routes differ after restart:\nbefore:\n{routes_before}\nafter:\n{}",
                s2.sh("ip", &["route", "show", "proto", "bird"])
            )
        },
    );
    assert!(net.site(1).ping(net.site(2).lan()));
    assert!(!s2.log().contains(
        &std::fs::read_to_string(s2.state.join("identity/wg_private_key"))
            .unwrap()
            .trim()
            .to_string()
    ));
}

#[test]
fn star_of_four_spokes_reach_each_other_through_the_hub() {
    let _serial = serial();
    let net = Network::start(4, Topology::Star);
    net.wait_established(Duration::from_secs(60));
    let hub = net.site(1);
    assert_eq!(hub.bgp().len(), 6, "{}", hub.birdc("show protocols"));
    for spoke in &net.sites[1..] {
        assert_eq!(
            spoke.bgp().len(),
            2,
            "[{}] {}",
            spoke.name,
            spoke.birdc("show protocols")
        );
    }
    // Sessions are up; the hub passes each spoke's LAN on to the others a moment later.
    for a in &net.sites[1..] {
        for b in &net.sites[1..] {
            if a.index != b.index {
                wait_for(
                    Duration::from_secs(10),
                    || a.try_route_dev(b.lan()).is_some(),
                    || {
                        format!(
                            "{} never learnt {}'s LAN: {}",
                            a.name,
                            b.name,
                            a.birdc("show route")
                        )
                    },
                );
            }
        }
    }
    for a in &net.sites[1..] {
        for b in &net.sites[1..] {
            if a.index != b.index {
                assert_eq!(
                    a.route_dev(b.lan()),
                    "tlwg1",
                    "{} -> {} not via the hub",
                    a.name,
                    b.name
                );
                assert!(
                    a.ping(b.lan()),
                    "{} cannot ping {} through the hub",
                    a.name,
                    b.name
                );
            }
        }
    }
}

#[test]
fn a_bfd_change_reloads_bird_only_and_no_tunnel_flaps() {
    let _serial = serial();
    let net = Network::start(3, Topology::Mesh);
    net.wait_established(Duration::from_secs(60));
    let (s1, s2, s3) = (net.site(1), net.site(2), net.site(3));
    // Let the sessions settle: BIRD stamps "Since" again when a fresh session finishes its
    // initial route exchange, a millisecond after Established.
    std::thread::sleep(Duration::from_secs(2));
    let ifindex_before: Vec<String> = ["tlwg2", "tlwg3"].iter().map(|i| s1.ifindex(i)).collect();
    let since_before: Vec<_> = [s2, s3].iter().map(|s| s.bgp()).collect();
    net.ctl
        .ok(&["set", "site", "s1", "bird_bfd_interval_ms", "200"]);
    let out = net.ctl.ok(&["commit", "all"]);
    assert_eq!(
        out.lines().filter(|l| l.contains(": v")).count(),
        1,
        "only s1 changes: {out}"
    );
    let bundle = net.ctl.path("effective/s1/r/v2/s1-r-v2.tar.zst");
    s1.node_ok(&["install", bundle.to_str().unwrap()]);
    let out = s1.node_ok(&["activate", "latest"]);
    assert!(out.contains("reloaded bird"), "{out}");
    // The daemon blesses it once every session is (still) Established.
    wait_for(
        Duration::from_secs(20),
        || s1.status()["state"] == "good",
        || {
            format!(
                "not blessed: {}\n{}",
                s1.birdc("show protocols"),
                tail(&s1.log(), 20)
            )
        },
    );
    // The endpoint of site 3 is a host name: its tunnel came up all the same.
    let node_toml =
        std::fs::read_to_string(s1.state.join("current/files/towalink/node.toml")).unwrap();
    assert!(
        node_toml.contains("peer_endpoint = \"s3.towalink.test:"),
        "{node_toml}"
    );
    assert!(
        s1.birdc("show bfd sessions").contains("    0.200"),
        "{}",
        s1.birdc("show bfd sessions")
    );
    let ifindex_after: Vec<String> = ["tlwg2", "tlwg3"].iter().map(|i| s1.ifindex(i)).collect();
    assert_eq!(ifindex_before, ifindex_after, "a tunnel was recreated");
    let since_after: Vec<_> = [s2, s3].iter().map(|s| s.bgp()).collect();
    // BIRD keeps "Since" on its monotonic clock and prints it as wall-clock time, so an
    // untouched session's stamp can move by a millisecond between two looks; a flap moves it
    // by the whole re-establishment (over a second with the 1 s connect delay).
    let ms = |t: &str| -> i64 {
        let (hms, frac) = t.split_once('.').unwrap_or((t, "0"));
        let p: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap_or(0)).collect();
        ((p[0] * 60 + p[1]) * 60 + p[2]) * 1000 + frac.parse::<i64>().unwrap_or(0)
    };
    let flapped = since_before
        .iter()
        .flatten()
        .zip(since_after.iter().flatten())
        .any(|((name_a, up_a, a), (name_b, up_b, b))| {
            name_a != name_b || !up_a || !up_b || (ms(a) - ms(b)).abs() > 100
        });
    assert!(
        !flapped && since_before.iter().flatten().count() == since_after.iter().flatten().count(),
        "a BGP session on another site flapped:\nbefore {since_before:?}\nafter  {since_after:?}"
    );
    assert!(
        !s1.log().contains("created WireGuard link tlwg2\n")
            || s1.log().matches("created WireGuard link").count() == 2
    );
}

/// A peer removed from the installation: its link disappears, the others stay.
#[test]
fn links_of_a_removed_peer_disappear() {
    let _serial = serial();
    let net = Network::start(3, Topology::Mesh);
    net.wait_established(Duration::from_secs(60));
    let s1 = net.site(1);
    let kept = s1.ifindex("tlwg2");
    net.ctl.ok(&["del", "node", "r.s3"]);
    let out = net.ctl.ok(&["commit", "all"]);
    assert!(out.contains("r.s1: v2"), "{out}");
    let bundle = net.ctl.path("effective/s1/r/v2/s1-r-v2.tar.zst");
    s1.node_ok(&["install", bundle.to_str().unwrap()]);
    s1.node_ok(&["activate", "latest"]);
    wait_for(
        Duration::from_secs(10),
        || !s1.sh("ip", &["-o", "link"]).contains("tlwg3"),
        || format!("tlwg3 still there: {}", s1.sh("ip", &["-o", "link"])),
    );
    assert_eq!(
        s1.ifindex("tlwg2"),
        kept,
        "the remaining link was recreated"
    );
    assert!(!s1.birdc("show protocols").contains("peer3_v4"));
    wait_for(
        Duration::from_secs(20),
        || s1.status()["state"] == "good",
        || s1.birdc("show protocols"),
    );
    assert!(s1.ping(net.site(2).lan()));
}

/// Kernel WireGuard is chosen only where the module exists (not on these build machines):
/// asking for it here fails with the reason, and `auto` falls back to boringtun.
#[test]
fn kernel_wireguard_is_probed_and_refused_without_the_module() {
    let _serial = serial();
    let netns = format!("tlk{}", std::process::id());
    towalink_tests::network::sh("ip", &["netns", "add", &netns]);
    struct Delete(String);
    impl Drop for Delete {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _delete = Delete(netns.clone());
    let state = tempfile::tempdir().unwrap();
    let node = towalink_tests::binary("towalink-node");
    let run = |mode: &str| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(&node)
            .arg("--state-dir")
            .arg(state.path())
            .args(["--dataplane", mode, "run", "--once"])
            .output()
            .unwrap()
    };
    let has_module = std::path::Path::new("/sys/module/wireguard").exists();
    let kernel = run("kernel");
    if has_module {
        assert!(
            kernel.status.success(),
            "{}",
            String::from_utf8_lossy(&kernel.stderr)
        );
    } else {
        assert_eq!(kernel.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&kernel.stderr);
        assert!(
            stderr.contains("kernel WireGuard is not available"),
            "{stderr}"
        );
        let auto = run("auto");
        assert!(auto.status.success());
        assert!(String::from_utf8_lossy(&auto.stderr).contains("WireGuard: in-process batched"));
    }
}

/// The image starts BIRD before the daemon (BIRD first takes a placeholder configuration, the
/// node's arrives with links that did not exist yet); tests usually start the daemon first.
/// Both orders end with every IPv4 and IPv6 session Established, every BFD session Up, the
/// peers' IPv6 loopbacks as statics, and forwarding on (the node turns it on itself).
#[test]
fn both_start_orders_converge_with_bfd_loopback_statics_and_forwarding() {
    for bird_first in [true, false] {
        let _serial = serial();
        let mut options = towalink_tests::network::Options::new(3, Topology::Mesh);
        options.bird_first = bird_first;
        let order = if bird_first {
            "BIRD first"
        } else {
            "daemon first"
        };
        let net = Network::build(options);
        let took = net.wait_established(Duration::from_secs(90));
        eprintln!(
            "{order}: all BGP sessions Established after {:.1} s",
            took.as_secs_f64()
        );
        for site in &net.sites {
            assert_eq!(site.bgp().len(), 4, "[{}] {order}", site.name);
            wait_for(
                Duration::from_secs(60),
                || {
                    site.birdc("show bfd sessions").matches(" Up ").count() == 4
                        && site
                            .birdc("show route protocol static6")
                            .matches("/128")
                            .count()
                            == 2
                },
                || {
                    format!(
                        "[{}] {order}: 4 BFD sessions Up and 2 IPv6 loopback statics:\n{}\n{}\n{}",
                        site.name,
                        site.birdc("show bfd sessions"),
                        site.birdc("show route protocol static6"),
                        tail(&site.log(), 20)
                    )
                },
            );
            for sysctl in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
                assert_eq!(
                    site.sh("sysctl", &["-n", sysctl]).trim(),
                    "1",
                    "[{}] {order}: {sysctl}",
                    site.name
                );
            }
        }
        for a in &net.sites {
            for b in &net.sites {
                if a.index != b.index {
                    assert!(
                        a.ping(b.lan()),
                        "{order}: {} cannot ping {}",
                        a.name,
                        b.name
                    );
                }
            }
        }
    }
}

/// The controller's management address with the default pool (`mgmt_ipv6_pool` + 1).
const CONTROLLER_MANAGEMENT: &str = "fd54:6f77:616c:ffff::1";

#[test]
fn a_node_announcing_the_controllers_management_address_cannot_take_the_management_link() {
    let _serial = serial();
    let mut options = towalink_tests::network::Options::new(3, Topology::Mesh);
    options.controller = true;
    let net = Network::build(options);
    net.wait_established(Duration::from_secs(90));
    net.wait_reported(&[1, 2, 3], 1, "good", Duration::from_secs(60));

    // s1 is compromised: it puts the controller's management address (and, as a canary that
    // proves its announcements arrive, an ordinary prefix) on its LAN and makes its BIRD
    // export both, whatever Towalink's filters say.
    let attacker = net.site(1);
    attacker.sh(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{CONTROLLER_MANAGEMENT}/128"),
            "dev",
            "lan0",
        ],
    );
    attacker.sh("ip", &["-6", "addr", "add", "fd99::1/128", "dev", "lan0"]);
    let bird_dir = attacker.root.join("etc/bird");
    let mut patched = 0;
    for entry in std::fs::read_dir(&bird_dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("filter towalink_export6 {") {
            let text = text.replace(
                "filter towalink_export6 {",
                &format!("filter towalink_export6 {{\n  if net = {CONTROLLER_MANAGEMENT}/128 then accept;"),
            );
            std::fs::write(&path, text).unwrap();
            patched += 1;
        }
    }
    assert_eq!(patched, 1, "the export filter in {}", bird_dir.display());
    let configured = attacker.birdc("configure");
    assert!(configured.contains("Reconfigured"), "{configured}");
    wait_for(
        Duration::from_secs(60),
        || {
            attacker
                .birdc("show route export peer2_v6")
                .contains(CONTROLLER_MANAGEMENT)
        },
        || {
            format!(
                "the attacker exports the controller's address:\n{}",
                attacker.birdc("show route export peer2_v6")
            )
        },
    );

    for victim in [net.site(2), net.site(3)] {
        wait_for(
            Duration::from_secs(60),
            || {
                victim
                    .sh("ip", &["-6", "route", "show", "fd99::1"])
                    .contains("proto bird")
            },
            || {
                format!(
                    "[{}] the attacker's canary prefix fd99::1 never arrived:\n{}",
                    victim.name,
                    victim.birdc("show route")
                )
            },
        );
        let routes = victim.sh(
            "ip",
            &["-6", "route", "show", "table", "all", CONTROLLER_MANAGEMENT],
        );
        assert!(
            !routes.contains("proto bird"),
            "[{}] BIRD imported the controller's management address from a peer:\n{routes}",
            victim.name
        );
        let bird = victim.birdc(&format!("show route for {CONTROLLER_MANAGEMENT}"));
        assert!(!bird.contains("peer1"), "[{}] {bird}", victim.name);
    }

    // Whatever reaches the main table (here a route with the best metric, as a data-plane
    // route or a careless static would be), the way to the controller stays the link.
    let victim = net.site(2);
    victim.sh(
        "ip",
        &[
            "-6",
            "route",
            "add",
            &format!("{CONTROLLER_MANAGEMENT}/128"),
            "dev",
            "lan0",
            "metric",
            "1",
        ],
    );
    let chosen = victim.sh("ip", &["-6", "route", "get", CONTROLLER_MANAGEMENT]);
    assert!(
        chosen.contains("dev tlmgmt"),
        "[{}] the controller is routed off the management link: {chosen}",
        victim.name
    );
    wait_for(
        Duration::from_secs(30),
        || {
            victim
                .exec("ping")
                .args(["-6", "-c", "1", "-W", "2", CONTROLLER_MANAGEMENT])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        },
        || {
            format!(
                "[{}] the controller's management address does not answer over tlmgmt",
                victim.name
            )
        },
    );
    // And the node keeps syncing: the controller hears from it after the hijack attempt.
    let since = std::time::Instant::now();
    let age = |net: &Network| -> Option<u64> {
        let status = net.fleet_status();
        status["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["node"] == "r.s2")?["last_seen_age_s"]
            .as_u64()
    };
    wait_for(
        Duration::from_secs(60),
        || since.elapsed() > Duration::from_secs(3) && age(&net).is_some_and(|a| a <= 1),
        || {
            format!(
                "r.s2 stopped reporting after the hijack attempt (last seen {:?} s ago)",
                age(&net)
            )
        },
    );
}

/// A deterministic stream of bytes (xorshift), `length` long, and its SHA-256.
fn pattern(seed: u64, length: usize) -> (Vec<u8>, String) {
    use sha2::Digest as _;
    let mut state = seed | 1;
    let bytes: Vec<u8> = (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    (bytes, digest)
}

/// Sends `bytes` over one TCP connection from `from`'s namespace to `to` (a listener on
/// `bound` in `to_site`'s), and returns the SHA-256 of what arrived and how long it took.
fn transfer(
    from: &towalink_tests::network::Site,
    to_site: &towalink_tests::network::Site,
    (bound, to): (std::net::SocketAddr, std::net::SocketAddr),
    bytes: Vec<u8>,
) -> (String, Duration) {
    use sha2::Digest as _;
    use std::io::{Read as _, Write as _};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = towalink_tests::network::spawn_in_netns(&to_site.netns, move || {
        let listener = std::net::TcpListener::bind(bound).expect("listen in the receiving site");
        ready_tx.send(()).unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut hash = sha2::Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = stream.read(&mut buffer).expect("read the transfer");
            if n == 0 {
                break;
            }
            hash.update(&buffer[..n]);
        }
        hex::encode(hash.finalize())
    });
    ready_rx.recv().unwrap();
    let started = std::time::Instant::now();
    towalink_tests::network::in_netns(&from.netns, move || {
        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .expect("connect through the tunnel");
        stream.write_all(&bytes).expect("send the transfer");
    });
    let digest = receiver.join().expect("receiver");
    (digest, started.elapsed())
}

/// The in-process WireGuard cuts the kernel's large TCP sends into packets and joins what it
/// receives into large frames again (TUN offloads): 64 MiB each way, over IPv4 between the
/// LANs and over IPv6 between the link's own addresses, arrive byte for byte.
#[test]
fn large_transfers_cross_the_tunnel_intact_both_ways_over_ipv4_and_ipv6() {
    let _serial = serial();
    let net = Network::start(2, Topology::Mesh);
    net.wait_established(Duration::from_secs(60));
    let (s1, s2) = (net.site(1), net.site(2));
    wait_for(
        Duration::from_secs(30),
        || s1.ping(s2.lan()) && s2.ping(s1.lan()),
        || format!("the LANs to reach each other:\n{}", s1.birdc("show route")),
    );
    for site in [s1, s2] {
        assert!(
            site.log().contains("offload=true"),
            "[{}] the links were not made with TUN offloads, so this test would not cover them:\n{}",
            site.name,
            tail(&site.log(), 20)
        );
    }
    let size = 64 << 20;
    // s2's end of its link to s1 (fe80::<node id, 32 bits>:<peer id, 32 bits>), on each
    // side's interface.
    let link_local = |site: &towalink_tests::network::Site, interface: &str| {
        std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::2:0:1".parse().unwrap(),
            5202,
            0,
            site.ifindex(interface).parse().unwrap(),
        ))
    };
    let lan = |site: &towalink_tests::network::Site| std::net::SocketAddr::from((site.lan(), 5201));
    let cases = [
        (s1, s2, (lan(s2), lan(s2))),
        (s2, s1, (lan(s1), lan(s1))),
        (s1, s2, (link_local(s2, "tlwg1"), link_local(s1, "tlwg2"))),
    ];
    for (seed, (from, to_site, addresses)) in cases.into_iter().enumerate() {
        let to = addresses.1;
        let (bytes, sent) = pattern(seed as u64 + 1, size);
        let (arrived, took) = transfer(from, to_site, addresses, bytes);
        assert_eq!(
            arrived, sent,
            "{} → {} ({to}): the bytes that arrived differ from those sent",
            from.name, to_site.name
        );
        eprintln!(
            "{} → {} ({to}): 64 MiB intact, {:.0} Mbit/s (debug build)",
            from.name,
            to_site.name,
            size as f64 * 8.0 / took.as_secs_f64() / 1e6
        );
    }
}
