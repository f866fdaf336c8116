//! Benchmark of the controller service: time from `tlm activate all` to every node reporting
//! the new version active, for 3 and 20 nodes (each a `towalink-node` daemon with boringtun
//! and BIRD in its own namespace, linked to the controller's namespace; no links between the
//! sites, so only the management path is measured). Each round commits a change, waits until
//! every node has mirrored the new version, then times `tlm activate all` end to end (the
//! command returns once every node reported the version active). Needs root.

use std::time::{Duration, Instant};

use towalink_tests::network::{wait_for, Network, Options, Topology};

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let rounds = 7;
    for count in [3u32, 20] {
        let mut options = Options::new(count, Topology::None);
        options.controller = true;
        options.underlay_mesh = false;
        let net = Network::build(options);
        let all: Vec<u32> = (1..=count).collect();
        net.wait_reported(&all, 1, "good", Duration::from_secs(120));
        let mut times = Vec::new();
        for round in 0..rounds {
            let version = round + 2;
            net.ctl.ok(&[
                "set",
                "global",
                "bird_bgp_hold_time",
                &(10 + round).to_string(),
            ]);
            net.ctl.ok(&["commit", "all"]);
            wait_for(
                Duration::from_secs(60),
                || {
                    let status = net.fleet_status();
                    status["nodes"].as_array().unwrap().iter().all(|n| {
                        n["installed_versions"]
                            .as_array()
                            .is_some_and(|v| v.contains(&version.into()))
                    })
                },
                || format!("v{version} was not mirrored to every node"),
            );
            let started = Instant::now();
            let out = net.ctl.ok(&["activate", "all"]);
            let elapsed = started.elapsed();
            assert!(
                out.contains(&format!("{count} of {count} node(s) took the version")),
                "{out}"
            );
            times.push(elapsed.as_secs_f64() * 1000.0);
        }
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let rss = net.controller_pid().map(rss_kb).unwrap_or(0);
        println!(
            "activate all -> every node reports the version active, {count} nodes: median {:.0} ms, min {:.0} ms, max {:.0} ms over {rounds} rounds; tlm serve RSS {} MB",
            sorted[sorted.len() / 2],
            sorted[0],
            sorted[sorted.len() - 1],
            rss / 1024
        );
    }
}
