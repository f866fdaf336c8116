//! Network benchmark (root): time from the daemons' start to every BGP session Established
//! for 3 and 6 sites, the failover outage when an underlay link is cut (pinging every 10 ms),
//! iperf3 throughput over one boringtun tunnel against the bare veth underneath, and the CPU
//! and memory of a node daemon with 10 links. Prints figures for docs/benchmarks.md.
//!
//! Run: `cargo bench -p towalink-tests --bench network` (after `cargo build --release --bins`
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

fn main() {
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
                "iperf3 TCP, 5 s: over one boringtun tunnel {tunnel:.0} Mbit/s, bare veth {bare:.0} Mbit/s, ratio {:.3}",
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
