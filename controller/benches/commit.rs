//! Benchmark: `tlm commit all` from scratch and after changing one global attribute, for full
//! meshes of 10, 100 and 500 nodes (5 sites) and a 2,000-node star. Prints wall time and the
//! peak RSS of the real `tlm` process. Not a pass/fail test: figures for docs/benchmarks.md.
//!
//! Run: `cargo bench -p towalink-controller --bench commit` (add `-- quick` to skip 500/2000).

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use towalink_controller::allocation::Pools;
use towalink_controller::store::Store;

struct Scenario {
    name: &'static str,
    sites: usize,
    nodes_per_site: usize,
    star: bool,
}

/// Writes an installation directly through the library (adding 2,000 nodes one `tlm` at a time
/// would measure the setup, not the commit).
fn build_installation(dir: &Path, scenario: &Scenario) {
    let store = Store::open_or_init(dir).expect("init");
    let mut generated = store.load_generated().expect("generated");
    let mut secrets = store.load_secrets().expect("secrets");
    let pools = Pools {
        ipv4: "10.254.0.0/16".parse().unwrap(),
        ipv6: "fd54:6f77:616c::/64".parse().unwrap(),
    };
    for s in 0..scenario.sites {
        let site = format!("site{s}").parse().unwrap();
        generated.add_site(site, 4_200_000_000).unwrap();
        for n in 0..scenario.nodes_per_site {
            let full = format!("n{n}.site{s}").parse().unwrap();
            let (_, node_secrets) = generated
                .add_node(full, &pools, &mut rand_core::OsRng)
                .unwrap();
            secrets.nodes.push(node_secrets);
        }
    }
    store.save_generated(&generated).unwrap();
    store.save_secrets(&secrets).unwrap();
    if scenario.star {
        std::fs::create_dir_all(dir.join("site_site0/node_n0")).unwrap();
        std::fs::write(
            dir.join("site_site0/node_n0/config.toml"),
            "groups = [\"hubs\"]\n",
        )
        .unwrap();
        tlm(dir, &["set", "global", "topology", "star"]);
    }
    tlm(dir, &["git", "add", "-A"]);
}

/// Runs tlm, returning wall time and peak RSS in KiB (from wait4's rusage of that process).
fn tlm(dir: &Path, args: &[&str]) -> (Duration, i64) {
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_tlm"))
        .args(args)
        .env("TOWALINK_CONFIG_DIR", dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn tlm");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be filled by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let elapsed = start.elapsed();
    assert_eq!(pid, child.id() as i32, "wait4");
    let exit = std::process::ExitStatus::from_raw(status);
    assert!(exit.success(), "tlm {args:?} failed: {exit}");
    (elapsed, usage.ru_maxrss)
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let mut scenarios = vec![
        Scenario {
            name: "mesh 10 nodes (5 sites)",
            sites: 5,
            nodes_per_site: 2,
            star: false,
        },
        Scenario {
            name: "mesh 100 nodes (5 sites)",
            sites: 5,
            nodes_per_site: 20,
            star: false,
        },
    ];
    if !quick {
        scenarios.push(Scenario {
            name: "mesh 500 nodes (5 sites)",
            sites: 5,
            nodes_per_site: 100,
            star: false,
        });
        scenarios.push(Scenario {
            name: "star 2000 nodes (100 sites, 1 hub)",
            sites: 100,
            nodes_per_site: 20,
            star: true,
        });
    }
    println!(
        "{:<36} {:>10} {:>12} {:>10} {:>12} {:>10}",
        "scenario", "links", "commit s", "RSS MB", "1 attr s", "RSS MB"
    );
    for scenario in &scenarios {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("towalink");
        build_installation(&dir, scenario);
        let (scratch, scratch_rss) = tlm(&dir, &["commit", "all"]);
        tlm(&dir, &["set", "global", "bird_bfd_interval_ms", "150"]);
        let (change, change_rss) = tlm(&dir, &["commit", "all"]);
        let links = Command::new(env!("CARGO_BIN_EXE_tlm"))
            .args(["list", "links"])
            .env("TOWALINK_CONFIG_DIR", &dir)
            .output()
            .map(|o| {
                o.stdout
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    .saturating_sub(1)
            })
            .unwrap_or(0);
        println!(
            "{:<36} {:>10} {:>12.3} {:>10.1} {:>12.3} {:>10.1}",
            scenario.name,
            links,
            scratch.as_secs_f64(),
            scratch_rss as f64 / 1024.0,
            change.as_secs_f64(),
            change_rss as f64 / 1024.0
        );
    }
}
