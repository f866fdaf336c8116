//! Network benchmark (root): time from the daemons' start to every BGP session Established
//! for 3 and 6 sites, the failover outage when an underlay link is cut (pinging every 10 ms),
//! iperf3 throughput over one in-process tunnel against the bare veth underneath, and the CPU
//! and memory of a node daemon with 10 links. Prints figures for docs/benchmarks.md.
//!
//! Run: `cargo bench -p towalink-tests --bench network` (`-- throughput`: only iperf3 over one
//! tunnel, three runs, with the daemons' CPU per Gbit) (after `cargo build --release --bins`
//! the benchmark uses target/release binaries when TOWALINK_BIN_DIR points there).

use std::time::{Duration, Instant};

use towalink_tests::network::{wait_for, Network, Site, Topology};

fn ping_outage_ms(site: &Site, to: std::net::Ipv4Addr, during: impl FnOnce()) -> f64 {
    let pinger = site
        .exec("ping")
        .args([
            "-i",
            "0.01",
            "-c",
            "500",
            "-q",
            "-I",
            &site.lan().to_string(),
            &to.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    during();
    let output = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap();
    let numbers: Vec<f64> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter_map(|w| w.parse().ok())
        .collect();
    let (sent, received, time_ms) = (numbers[0], numbers[1], *numbers.last().unwrap());
    (sent - received) * time_ms / sent
}

fn iperf(client: &Site, server: &Site, server_address: &str, bind: &str) -> f64 {
    let mut daemon = server
        .exec("iperf3")
        .args(["-s", "-1", "-B", server_address])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = client
        .exec("iperf3")
        .args(["-c", server_address, "-B", bind, "-t", "5", "-J"])
        .output()
        .unwrap();
    let _ = daemon.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

fn process_usage(pid: u32) -> (f64, f64) {
    let ticks = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()
    };
    let rss_kb = || -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let hz = 100.0; // USER_HZ
    let before = ticks(pid);
    std::thread::sleep(Duration::from_secs(10));
    let cpu_percent = (ticks(pid) - before) / hz / 10.0 * 100.0;
    (cpu_percent, rss_kb() / 1024.0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of stat(5), counted after the command name's closing parenthesis.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// iperf3 over the tunnel between two sites, three runs, with the CPU both daemons used.
fn throughput() {
    let net = Network::start(2, Topology::Mesh);
    net.wait_established(Duration::from_secs(120));
    let (s1, s2) = (net.site(1), net.site(2));
    let pids = [s1.daemon_pid().unwrap(), s2.daemon_pid().unwrap()];
    if let Ok(out) = std::env::var("TOWALINK_PERF") {
        // Profiles both daemons during one more run (perf must be installed).
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-F", "999", "-g", "-o", &out, "-p"])
            .arg(format!("{},{}", pids[0], pids[1]))
            .spawn()
            .unwrap();
        iperf(s1, s2, &s2.lan().to_string(), &s1.lan().to_string());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        perf.wait().unwrap();
    }
    for run in 1..=3 {
        let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        let started = Instant::now();
        let mbits = iperf(s1, s2, &s2.lan().to_string(), &s1.lan().to_string());
        let wall = started.elapsed().as_secs_f64();
        let used: Vec<f64> = pids
            .iter()
            .zip(&before)
            .map(|(p, b)| cpu_seconds(*p) - b)
            .collect();
        println!(
            "run {run}: iperf3 TCP over one tunnel {mbits:.0} Mbit/s; daemon CPU sender {:.2} s, receiver {:.2} s in {wall:.1} s ({:.2} CPU-s per Gbit)",
            used[0],
            used[1],
            (used[0] + used[1]) / (mbits / 1000.0 * 5.0)
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "throughput") {
        throughput();
        return;
    }
    for count in [3, 6] {
        let net = Network::start(count, Topology::Mesh);
        net.wait_established(Duration::from_secs(120));
        println!(
            "{count} sites, full mesh: all BGP sessions Established {:.2} s after the daemons started",
            net.daemons_started.elapsed().as_secs_f64() - 0.0
        );
        if count == 3 {
            let mut outages = Vec::new();
            for _ in 0..5 {
                let (s1, s2) = (net.site(1), net.site(2));
                outages.push(ping_outage_ms(s1, s2.lan(), || net.cut(1, 2)));
                net.restore(1, 2);
                wait_for(
                    Duration::from_secs(60),
                    || s1.route_dev(s2.lan()) == "tlwg2",
                    || "direct path".into(),
                );
                std::thread::sleep(Duration::from_secs(2));
            }
            outages.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "failover (underlay cut, BFD 100 ms x 3), 5 runs: median {:.0} ms, max {:.0} ms",
                outages[2], outages[4]
            );
            let (s1, s2) = (net.site(1), net.site(2));
            let tunnel = iperf(s1, s2, &s2.lan().to_string(), &s1.lan().to_string());
            let bare = iperf(s1, s2, "198.51.100.1", "198.51.100.0");
            println!(
                "iperf3 TCP, 5 s: over one in-process tunnel {tunnel:.0} Mbit/s, bare veth {bare:.0} Mbit/s, ratio {:.3}",
                tunnel / bare
            );
        }
        let _ = Instant::now();
    }
    // A hub with 10 links.
    let net = Network::start(11, Topology::Star);
    net.wait_established(Duration::from_secs(180));
    let pid = net.site(1).daemon_pid().unwrap();
    let (cpu, rss) = process_usage(pid);
    println!("node daemon with 10 links (hub of an 11-site star), 10 s steady state: CPU {cpu:.1} %, RSS {rss:.1} MB");
}
