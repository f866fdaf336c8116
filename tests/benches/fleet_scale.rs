//! Benchmark of the controller service with a large fleet: `tlm serve` against simulated nodes
//! ([`towalink_tests::fleetlab`]; 1,000 by default, `-- <count>` for another, in sites of 10).
//! Prints:
//! - how long the fleet takes to come up (every node handshakes, reports, downloads v1);
//! - `tlm serve`'s CPU while the fleet idles in long polls;
//! - a rollout: `tlm commit all`, then `tlm activate all`; the time until 99.9 % and 100 % of
//!   the nodes reported the new version active (as the controller answered them), the
//!   command's own time, the controller's CPU and peak RSS, and the latency of the nodes'
//!   requests that did not wait on purpose (syncs without a long poll, downloads);
//! - a 1 % canary (the first site) whose nodes roll back: the time until `tlm activate
//!   --canary` stops, and a check that no other node took the version.
//!
//! Needs root. Run: `cargo build --release --bins && TOWALINK_BIN_DIR=$PWD/target/release
//! cargo bench -p towalink-tests --bench fleet_scale`.

use std::time::{Duration, Instant};

use towalink_tests::fleetlab::FleetLab;
use towalink_tests::network::wait_for;

/// (CPU seconds, peak RSS MB) of a process so far.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = fields
        .get(11..13)
        .map(|t| t.iter().filter_map(|v| v.parse::<f64>().ok()).sum::<f64>() / ticks)
        .unwrap_or(0.0);
    let peak_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    (cpu, peak_kb / 1024)
}

/// CPU seconds of the children this process has reaped so far (here: the `tlm` commands).
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

/// The time after `since` by which `share` of the nodes had reported `version` active.
fn reached(lab: &FleetLab, version: u32, since: Instant, share: f64) -> Option<f64> {
    let mut times: Vec<f64> = lab
        .fleet()
        .views()
        .iter()
        .filter_map(|(_, v)| v.reported.get(&version))
        .map(|t| t.saturating_duration_since(since).as_secs_f64())
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let need = (lab.fleet().len() as f64 * share).ceil() as usize;
    times.get(need.checked_sub(1)?).copied()
}

fn main() {
    let count: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let sites = count.div_ceil(10);
    let started = Instant::now();
    let lab = FleetLab::start(sites, 10);
    let fleet = lab.fleet();
    let n = fleet.len();
    let pid = lab.controller_pid();
    println!(
        "{n} simulated nodes in {sites} sites; installation, commit and start took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let up = Instant::now();
    wait_for(
        Duration::from_secs(600),
        || fleet.count(|v| v.reported.contains_key(&1)) == n,
        || {
            format!(
                "every node to report v1: {} of {n}",
                fleet.count(|v| v.reported.contains_key(&1))
            )
        },
    );
    println!(
        "fleet up (handshake, report, download and adopt v1): 100 % after {:.1} s",
        up.elapsed().as_secs_f64()
    );

    let errors = || -> u64 { fleet.views().iter().map(|(_, v)| v.errors).sum() };
    println!("  node-side failed exchanges so far: {}", errors());
    let idle = Duration::from_secs(20);
    let (cpu0, _) = usage(pid);
    // TOWALINK_PERF=<file>: a perf profile of tlm serve while the fleet idles.
    let perf = std::env::var_os("TOWALINK_PERF").map(|file| {
        std::process::Command::new("perf")
            .args(["record", "-g", "-o"])
            .arg(file)
            .args(["-p", &pid.to_string(), "--", "sleep", "15"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf")
    });
    std::thread::sleep(idle);
    if let Some(mut perf) = perf {
        let _ = perf.wait();
    }
    let (cpu1, rss) = usage(pid);
    println!(
        "idle (long polls): tlm serve {:.1} % of one core, peak RSS {rss} MB so far",
        (cpu1 - cpu0) / idle.as_secs_f64() * 100.0
    );

    lab.ctl.ok(&["set", "global", "bird_bgp_hold_time", "12"]);
    let commit = Instant::now();
    lab.ctl.ok(&["commit", "all"]);
    let commit = commit.elapsed();
    let (cpu0, _) = usage(pid);
    let rollout = Instant::now();
    let before = children_cpu();
    let out = lab.ctl.ok(&["activate", "all", "--timeout", "600"]);
    let command = rollout.elapsed();
    let activate_cpu = children_cpu() - before;
    assert!(
        out.contains(&format!("{n} of {n} node(s) took the version")),
        "{out}"
    );
    wait_for(
        Duration::from_secs(60),
        || fleet.count(|v| v.reported.contains_key(&2)) == n,
        || "every node's report of v2 answered".into(),
    );
    let (cpu1, rss) = usage(pid);
    let mut latencies = fleet.latencies_since(rollout);
    latencies.sort();
    println!(
        "rollout: commit all {:.1} s; activate all → 99.9 % reported v2 active after {:.1} s, 100 % after {:.1} s (the command returned after {:.1} s)",
        commit.as_secs_f64(),
        reached(&lab, 2, rollout, 0.999).unwrap(),
        reached(&lab, 2, rollout, 1.0).unwrap(),
        command.as_secs_f64()
    );
    println!(
        "  tlm serve: {:.1} CPU-s during the rollout, peak RSS {rss} MB; tlm activate {activate_cpu:.1} CPU-s; node requests that did not wait ({}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        cpu1 - cpu0,
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );

    println!("  node-side failed exchanges so far: {}", errors());
    fleet.set_failing(|name| name.ends_with(".site0"));
    lab.ctl.ok(&["set", "global", "bird_bgp_hold_time", "13"]);
    lab.ctl.ok(&["commit", "all"]);
    let canary = Instant::now();
    let run = lab
        .ctl
        .run(&["activate", "all", "--canary", "site0", "--timeout", "600"]);
    let stopped = canary.elapsed();
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        run.code != 0 && said.contains("did not bless the version"),
        "{said}"
    );
    let others_on_v3 = fleet.count(|v| !v.fails && v.active == Some(3));
    assert_eq!(others_on_v3, 0, "nodes outside the canary took v3");
    println!(
        "canary of {} nodes rolling back: the rollout stopped after {:.1} s; {} other nodes kept v2",
        fleet.count(|v| v.fails),
        stopped.as_secs_f64(),
        fleet.count(|v| !v.fails && v.active == Some(2))
    );
    let errors = errors();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for (_, view) in fleet.views() {
        if let Some(reason) = view.last_error {
            *reasons
                .entry(reason.chars().take(90).collect())
                .or_default() += 1;
        }
    }
    let log = std::fs::read_to_string(&lab.log).unwrap_or_default();
    let mut warnings = std::collections::BTreeMap::<String, usize>::new();
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        let message: String = line
            .split_once(": ")
            .map_or(line, |(_, m)| m)
            .chars()
            .take(100)
            .collect();
        *warnings.entry(message).or_default() += 1;
    }
    println!("tlm serve warnings and errors: {warnings:#?}");
    let listen = towalink_tests::network::sh(
        "ip",
        &[
            "netns",
            "exec",
            &lab.controller_netns,
            "sh",
            "-c",
            "ss -ltn; nstat -az TcpExtListenOverflows TcpExtListenDrops TcpExtTCPReqQFullDrop TcpExtSyncookiesSent TcpOutRsts",
        ],
    );
    println!("the controller's listener and TCP counters:\n{listen}");
    println!("node-side failed exchanges over the whole run: {errors}; last reasons: {reasons:?}");
}
