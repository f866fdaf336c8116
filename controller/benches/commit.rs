//! Benchmark: `tlm commit all` from scratch, after changing one node's attribute (only that
//! node renders) and after changing a global one (every node renders), then `tlm list links`
//! and `tlm list changed` (nothing changed: no node renders), for full meshes of 10, 100 and
//! 500 nodes (5 sites) and a 2,000-node star (and a 1,000-node mesh when named: `-- mesh1000`).
//! Prints wall times and the peak RSS of the real `tlm` process (of the scratch and the global
//! commit). Not a pass/fail test: figures for docs/benchmarks.md.
//!
//! Run: `cargo bench -p towalink-controller --bench commit` (add `-- quick` to skip 500/2000).

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use towalink_controller::model::allocation::Pools;
use towalink_controller::store::Store;

struct Scenario {
    key: &'static str,
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
    let verbose = std::env::var_os("TLM_BENCH_LOG").is_some();
    // Reaped by wait4 below (for its rusage), not by `Child::wait`.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_tlm"))
        .args(if verbose {
            &["--loglevel", "debug"][..]
        } else {
            &[][..]
        })
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

fn all_scenarios() -> Vec<Scenario> {
    let scenario = |key, name, sites, nodes_per_site, star| Scenario {
        key,
        name,
        sites,
        nodes_per_site,
        star,
    };
    vec![
        scenario("mesh10", "mesh 10 nodes (5 sites)", 5, 2, false),
        scenario("mesh100", "mesh 100 nodes (5 sites)", 5, 20, false),
        scenario("mesh500", "mesh 500 nodes (5 sites)", 5, 100, false),
        scenario("mesh1000", "mesh 1000 nodes (10 sites)", 10, 100, false),
        scenario(
            "star2000",
            "star 2000 nodes (100 sites, 1 hub)",
            100,
            20,
            true,
        ),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    let only: Vec<&String> = args
        .iter()
        .filter(|a| a.starts_with("mesh") || a.starts_with("star"))
        .collect();
    let mut scenarios: Vec<Scenario> = all_scenarios()
        .into_iter()
        .filter(|s| s.key != "mesh1000")
        .filter(|s| !quick || s.key == "mesh10" || s.key == "mesh100")
        .collect();
    println!(
        "{:<30} {:>7} {:>9} {:>7} {:>8} {:>9} {:>7} {:>9} {:>8}",
        "scenario",
        "links",
        "scratch s",
        "RSS MB",
        "1 node s",
        "global s",
        "RSS MB",
        "links s",
        "changed s"
    );
    if !only.is_empty() {
        scenarios = all_scenarios()
            .into_iter()
            .filter(|s| only.iter().any(|o| *o == s.key))
            .collect();
    }
    for scenario in &scenarios {
        let temp = tempfile::tempdir().unwrap();
        let dir = match std::env::var_os("TLM_BENCH_KEEP") {
            Some(keep) => std::path::PathBuf::from(keep).join(scenario.key),
            None => temp.path().join("towalink"),
        };
        build_installation(&dir, scenario);
        let (scratch, scratch_rss) = tlm(&dir, &["commit", "all"]);
        // One attribute of one node: only that node renders (its peers see none of it).
        tlm(
            &dir,
            &["set", "node", "n1.site1", "bird_bfd_interval_ms", "250"],
        );
        let (one, _) = tlm(&dir, &["commit", "all"]);
        // A global attribute every node's files carry: every node renders.
        tlm(&dir, &["set", "global", "bird_bfd_interval_ms", "150"]);
        let (global, global_rss) = tlm(&dir, &["commit", "all"]);
        let (list, _) = tlm(&dir, &["list", "links"]);
        let (changed, _) = tlm(&dir, &["list", "changed"]);
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
            "{:<30} {:>7} {:>9.3} {:>7.1} {:>8.3} {:>9.3} {:>7.1} {:>9.3} {:>8.3}",
            scenario.name,
            links,
            scratch.as_secs_f64(),
            scratch_rss as f64 / 1024.0,
            one.as_secs_f64(),
            global.as_secs_f64(),
            global_rss as f64 / 1024.0,
            list.as_secs_f64(),
            changed.as_secs_f64(),
        );
    }
}
