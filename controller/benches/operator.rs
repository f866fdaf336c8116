//! Benchmark of `tlm serve`'s operator listener with 2,000 simulated nodes: the time to
//! scrape the fleet's metrics (`/metrics`), to list every node through the API
//! (`/api/v1/nodes`) and the fleet status (`/api/v1/status`), and the service's memory. The
//! nodes are simulated by their reports: each has a status record (as `tlm serve` writes it
//! when a report arrives: two BGP sessions, two tunnels, a health check), recent, so every
//! node counts as reachable. The service runs in a network namespace of its own (it makes
//! its management interface); needs root. Not a pass/fail test: figures for
//! docs/benchmarks.md.
//!
//! Run: `sudo cargo bench -p towalink-controller --bench operator`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use towalink_controller::model::allocation::Pools;
use towalink_controller::store::Store;

const SITES: usize = 100;
const NODES_PER_SITE: usize = 20;
const SAMPLES: usize = 30;

fn tlm(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tlm"))
        .args(args)
        .env("TOWALINK_CONFIG_DIR", dir)
        .output()
        .expect("run tlm");
    assert!(
        out.status.success(),
        "tlm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 2,000-node star written through the library, committed, with a status record per node.
fn build(dir: &Path) {
    let store = Store::open_or_init(dir).expect("init");
    let mut generated = store.load_generated().expect("generated");
    let mut secrets = store.load_secrets().expect("secrets");
    let pools = Pools {
        ipv4: "10.254.0.0/16".parse().unwrap(),
        ipv6: "fd54:6f77:616c::/64".parse().unwrap(),
    };
    for s in 0..SITES {
        generated
            .add_site(format!("site{s}").parse().unwrap(), 4_200_000_000)
            .unwrap();
        for n in 0..NODES_PER_SITE {
            let (_, node_secrets) = generated
                .add_node(
                    format!("n{n}.site{s}").parse().unwrap(),
                    &pools,
                    &mut rand_core::OsRng,
                )
                .unwrap();
            secrets.nodes.push(node_secrets);
        }
    }
    store.save_generated(&generated).unwrap();
    store.save_secrets(&secrets).unwrap();
    std::fs::create_dir_all(dir.join("site_site0/node_n0")).unwrap();
    std::fs::write(
        dir.join("site_site0/node_n0/config.toml"),
        "groups = [\"hubs\"]\n",
    )
    .unwrap();
    tlm(dir, &["set", "global", "topology", "star"]);
    tlm(dir, &["commit", "all"]);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let nodes = dir.join("status/nodes");
    std::fs::create_dir_all(&nodes).unwrap();
    for node in &generated.nodes {
        let name = node.full_name().to_string();
        let record = serde_json::json!({
            "node": name, "node_id": node.id, "last_seen_ms": now_ms,
            "endpoint": "192.0.2.1:51820",
            "report": {
                "node_id": node.id, "node": name, "daemon_version": "0.1.0", "uptime_s": 86400,
                "boot_id": "b", "daemon_uptime_s": 86000, "active_version": 1, "state": "good",
                "tries_left": null, "confirm_by": null, "last_good_version": 1,
                "installed_versions": [1],
                "health": [{"check": "bird", "ok": true, "detail": "all sessions established"}],
                "last_rollback": null,
                "tunnels": [
                    {"interface": "tlwg1", "rx_bytes": 123456789, "tx_bytes": 98765432, "last_rx_age_s": 3},
                    {"interface": "tlmgmt", "rx_bytes": 12345, "tx_bytes": 23456, "last_rx_age_s": 1}
                ],
                "bgp": [
                    {"name": "peer1_v4", "state": "up", "info": "Established"},
                    {"name": "peer1_v6", "state": "up", "info": "Established"}
                ],
                "bfd": [{"peer": "fe80::1", "interface": "tlwg1", "state": "Up"}],
                "order_done": null
            }
        });
        std::fs::write(nodes.join(format!("{name}.json")), record.to_string()).unwrap();
    }
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// One GET to the operator listener from inside `netns`: status, body length, time.
fn get(netns: &str, path: &str, token: &str) -> (u16, usize, Duration) {
    let (netns, path, token) = (netns.to_string(), path.to_string(), token.to_string());
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
        // SAFETY: setns on a namespace file held open; affects this thread only.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        let started = Instant::now();
        let mut stream = TcpStream::connect("127.0.0.1:9468").unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&reply);
        let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, reply.len(), took)
    })
    .join()
    .unwrap()
}

fn main() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("operator benchmark: needs root (network namespace); skipped");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("ctl");
    let started = Instant::now();
    build(&dir);
    eprintln!(
        "{} nodes built, committed and given status records in {:.1} s",
        SITES * NODES_PER_SITE,
        started.elapsed().as_secs_f64()
    );
    let token_file = temp.path().join("bench.token");
    tlm(
        &dir,
        &[
            "token",
            "add",
            "bench",
            "--file",
            token_file.to_str().unwrap(),
        ],
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let netns = format!("tlbench{}", std::process::id());
    let ip = |args: &[&str]| {
        assert!(Command::new("ip").args(args).status().unwrap().success());
    };
    ip(&["netns", "add", &netns]);
    let _namespace = Namespace(netns.clone());
    ip(&["-n", &netns, "link", "set", "lo", "up"]);
    let service = Service {
        child: Command::new("ip")
            .args(["netns", "exec", &netns, env!("CARGO_BIN_EXE_tlm"), "serve"])
            .env("TOWALINK_CONFIG_DIR", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let pid = service.child.id();
    let ready = Instant::now();
    while get_ready(&netns) && ready.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle_rss = rss_mb(pid);
    println!(
        "tlm serve with {} simulated nodes: RSS {idle_rss:.1} MB after start",
        SITES * NODES_PER_SITE
    );
    println!("| request | median | p95 | max | response |");
    println!("|---|---:|---:|---:|---:|");
    for path in ["/metrics", "/api/v1/nodes", "/api/v1/status"] {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..SAMPLES {
            let (status, length, took) = get(&netns, path, &token);
            assert_eq!(status, 200, "{path}");
            size = length;
            times.push(took);
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| GET {path} | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} KB |",
            ms(times[SAMPLES / 2]),
            ms(times[SAMPLES * 95 / 100]),
            ms(times[SAMPLES - 1]),
            size as f64 / 1024.0
        );
    }
    println!("RSS after the requests: {:.1} MB", rss_mb(pid));
}

/// `tlm serve`, killed on drop (before its namespace: declared after it).
struct Service {
    child: std::process::Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace, deleted on drop.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Whether the listener is not answering yet.
fn get_ready(netns: &str) -> bool {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
        // SAFETY: as in `get`.
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        TcpStream::connect("127.0.0.1:9468").is_err()
    })
    .join()
    .unwrap()
}
