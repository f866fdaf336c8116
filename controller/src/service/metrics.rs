//! The controller's metrics (Prometheus text, docs/operations.md):
//!
//! - [`fleet`] (`/metrics`): the fleet as the service sees it, from the directory's view and
//!   the nodes' last reports held in memory; pure, so a scrape of thousands of nodes costs
//!   what writing the text costs.
//! - [`relay`] (`/metrics/nodes`): every node's own metrics, fetched over the management link
//!   (`[<management address>]:9469/metrics`, strict framing, bounded in time and size) and
//!   merged under a `node` label with [`towalink_metrics::Relay`], plus whether each fetch
//!   worked. One scrape target covers the fleet.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use towalink_bundle::messages::{SlotState, METRICS_PATH, NODE_METRICS_PORT};
use towalink_bundle::wire;
use towalink_metrics::{Exposition, Kind, Relay};

use super::records::NodeRecord;
use crate::commands::operate::{judge, Outcome, Target};

/// One node as [`fleet`] sees it.
#[derive(Debug, Clone)]
pub struct FleetNode {
    pub name: String,
    pub id: u32,
    /// The newest committed version.
    pub latest: Option<u32>,
    /// The version `tlm activate` ordered, and the order's number.
    pub desired: Option<(u32, u64)>,
    pub record: Option<NodeRecord>,
}

/// Whether a node counts as reachable: it reported within three report intervals (and two
/// seconds). `tlm status` and the metrics say the same. Pure.
pub fn reachable(last_seen_ms: u64, now_ms: u64, report_interval_s: u64) -> bool {
    now_ms.saturating_sub(last_seen_ms) <= 3 * 1000 * report_interval_s + 2000
}

/// The label value of an activation's outcome.
fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Waiting => "waiting",
        Outcome::Pending => "pending",
        Outcome::Blessed => "blessed",
        Outcome::RolledBack(_) => "rolled_back",
        Outcome::Refused(_) => "refused",
        Outcome::Unreachable(_) => "unreachable",
    }
}

const OUTCOMES: [&str; 6] = [
    "none",
    "waiting",
    "pending",
    "blessed",
    "rolled_back",
    "refused",
];

/// The fleet's exposition at `now_ms`. Pure.
pub fn fleet(nodes: &[FleetNode], now_ms: u64, report_interval_s: u64, started_ms: u64) -> String {
    let seen = |n: &FleetNode| n.record.as_ref().map(|r| r.last_seen_ms);
    let is_reachable =
        |n: &FleetNode| seen(n).is_some_and(|t| reachable(t, now_ms, report_interval_s));
    let mut e = Exposition::new();
    e.family(
        "towalink_controller_start_time_seconds",
        Kind::Gauge,
        "When tlm serve started (Unix time).",
    )
    .sample(&[], started_ms as f64 / 1000.0);
    e.family(
        "towalink_fleet_nodes",
        Kind::Gauge,
        "Nodes in the configuration.",
    )
    .sample(&[], nodes.len() as f64);
    e.family(
        "towalink_fleet_nodes_reachable",
        Kind::Gauge,
        "Nodes that reported within three report intervals.",
    )
    .sample(&[], nodes.iter().filter(|n| is_reachable(n)).count() as f64);
    e.family(
        "towalink_fleet_node_reachable",
        Kind::Gauge,
        "1 when the node reported within three report intervals.",
    );
    for n in nodes {
        e.sample(&[("node", &n.name)], f64::from(u8::from(is_reachable(n))));
    }
    e.family(
        "towalink_fleet_node_last_report_age_seconds",
        Kind::Gauge,
        "Seconds since the node's last report (absent when it never reported).",
    );
    for n in nodes {
        if let Some(t) = seen(n) {
            e.sample(
                &[("node", &n.name)],
                now_ms.saturating_sub(t) as f64 / 1000.0,
            );
        }
    }
    let version_family =
        |e: &mut Exposition, name: &str, help: &str, of: &dyn Fn(&FleetNode) -> Option<u32>| {
            e.family(name, Kind::Gauge, help);
            for n in nodes {
                if let Some(v) = of(n) {
                    e.sample(&[("node", &n.name)], f64::from(v));
                }
            }
        };
    version_family(
        &mut e,
        "towalink_fleet_node_latest_version",
        "The node's newest committed version.",
        &|n| n.latest,
    );
    version_family(
        &mut e,
        "towalink_fleet_node_desired_version",
        "The version tlm activate ordered for the node.",
        &|n| n.desired.map(|(v, _)| v),
    );
    version_family(
        &mut e,
        "towalink_fleet_node_active_version",
        "The version the node last reported running.",
        &|n| n.record.as_ref().and_then(|r| r.report.active_version),
    );
    e.family(
        "towalink_fleet_node_pending",
        Kind::Gauge,
        "1 when the node's active version is pending (health checks or confirmation).",
    );
    for n in nodes {
        if let Some(r) = &n.record {
            let pending = r.report.state == Some(SlotState::Pending);
            e.sample(&[("node", &n.name)], f64::from(u8::from(pending)));
        }
    }
    e.family(
        "towalink_fleet_node_activation",
        Kind::Gauge,
        "What became of the node's last ordered activation: 1 for its outcome \
         (none, waiting, pending, blessed, rolled_back, refused).",
    );
    for n in nodes {
        let outcome = match n.desired {
            None => "none",
            Some((version, order)) => {
                let target = Target {
                    node: n
                        .name
                        .parse()
                        .expect("a node's name from the view is valid"),
                    version,
                    order,
                };
                outcome_label(&judge(&target, n.record.as_ref()))
            }
        };
        for choice in OUTCOMES {
            e.sample(
                &[("node", &n.name), ("outcome", choice)],
                f64::from(u8::from(choice == outcome)),
            );
        }
    }
    e.family(
        "towalink_fleet_node_last_rollback_timestamp_seconds",
        Kind::Gauge,
        "When the node last rolled back (Unix time), as it reported.",
    );
    for n in nodes {
        if let Some(rollback) = n
            .record
            .as_ref()
            .and_then(|r| r.report.last_rollback.as_ref())
        {
            e.sample(&[("node", &n.name)], rollback.time as f64);
        }
    }
    e.family(
        "towalink_fleet_node_bgp_sessions",
        Kind::Gauge,
        "The node's BGP sessions as it last reported, by whether they are established.",
    );
    for n in nodes {
        if let Some(r) = &n.record {
            let up = r
                .report
                .bgp
                .iter()
                .filter(|b| b.info.starts_with("Established"))
                .count();
            let down = r.report.bgp.len() - up;
            e.sample(&[("node", &n.name), ("state", "established")], up as f64);
            e.sample(&[("node", &n.name), ("state", "down")], down as f64);
        }
    }
    e.finish()
}

/// The most a node's metrics may be.
pub const NODE_METRICS_LIMIT: u64 = 4 * 1024 * 1024;
/// How long one node's fetch may take, connection and response.
pub const NODE_FETCH_DEADLINE: Duration = Duration::from_secs(5);

/// Fetches a node's exposition from `address` (blocking; bounded by [`NODE_FETCH_DEADLINE`]).
pub fn fetch_node(address: SocketAddr) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&address, NODE_FETCH_DEADLINE)
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = stream.set_read_timeout(Some(NODE_FETCH_DEADLINE));
    let _ = stream.set_write_timeout(Some(NODE_FETCH_DEADLINE));
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    wire::write_request(
        &mut writer,
        "GET",
        &address.to_string(),
        METRICS_PATH,
        "text/plain",
        b"",
    )
    .map_err(|e| format!("cannot send the request: {e}"))?;
    let response = wire::read_response(&mut BufReader::new(stream), NODE_METRICS_LIMIT)
        .map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!("status {}", response.status));
    }
    String::from_utf8(response.body).map_err(|_| "not UTF-8".to_string())
}

/// What fetching one node came to.
#[derive(Debug)]
pub struct Fetched {
    pub name: String,
    pub result: Result<String, String>,
    pub took: Duration,
}

/// The relayed exposition of every node fetched: each node's `towalink_*` and `process_*`
/// families under `node`, then whether each fetch worked and what it took. Pure.
pub fn relay(fetched: &[Fetched]) -> String {
    let mut relay = Relay::new("node");
    let mut dropped = Vec::new();
    for f in fetched {
        if let Ok(text) = &f.result {
            let accept = |name: &str| name.starts_with("towalink_") || name.starts_with("process_");
            dropped.push((f.name.as_str(), relay.add(text, &f.name, accept)));
        }
    }
    let mut e = Exposition::new();
    e.family(
        "towalink_relay_up",
        Kind::Gauge,
        "1 when the node's metrics could be fetched over its management link.",
    );
    for f in fetched {
        e.sample(&[("node", &f.name)], f64::from(u8::from(f.result.is_ok())));
    }
    e.family(
        "towalink_relay_fetch_duration_seconds",
        Kind::Gauge,
        "How long fetching the node's metrics took.",
    );
    for f in fetched {
        e.sample(&[("node", &f.name)], f.took.as_secs_f64());
    }
    e.family(
        "towalink_relay_dropped_lines",
        Kind::Gauge,
        "Lines of the node's metrics the relay dropped (malformed or not the node's to write).",
    );
    for (name, count) in dropped {
        e.sample(&[("node", name)], count as f64);
    }
    let mut text = relay.finish();
    text.push_str(&e.finish());
    text
}

/// Fetches one node, timing it.
pub fn fetch_timed(name: String, address: SocketAddr) -> Fetched {
    let started = Instant::now();
    let result = fetch_node(address);
    if let Err(error) = &result {
        tracing::debug!(node = %name, %error, "cannot fetch the node's metrics");
    }
    Fetched {
        name,
        result,
        took: started.elapsed(),
    }
}

/// The address of a node's metrics on the management link.
pub fn node_metrics_address(node_address: std::net::Ipv6Addr) -> SocketAddr {
    SocketAddr::from((node_address, NODE_METRICS_PORT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use towalink_bundle::messages::{
        BgpSession, NodeReport, OrderOutcome, OrderResult, RollbackReport,
    };

    fn record(
        seen_ms: u64,
        active: u32,
        state: SlotState,
        done: Option<(u64, OrderResult)>,
    ) -> NodeRecord {
        NodeRecord {
            node: "r.s1".into(),
            node_id: 1,
            last_seen_ms: seen_ms,
            endpoint: None,
            via_key: None,
            report: NodeReport {
                active_version: Some(active),
                state: Some(state),
                order_done: done.map(|(seq, result)| OrderOutcome {
                    seq,
                    version: active,
                    result,
                    time: 0,
                }),
                bgp: vec![
                    BgpSession {
                        name: "peer2".into(),
                        state: "up".into(),
                        info: "Established".into(),
                    },
                    BgpSession {
                        name: "peer3".into(),
                        state: "start".into(),
                        info: "Active".into(),
                    },
                ],
                last_rollback: Some(RollbackReport {
                    time: 1_700_000_000,
                    from_version: Some(4),
                    to_version: Some(3),
                    reason: "health".into(),
                }),
                ..NodeReport::default()
            },
        }
    }

    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn the_fleet_reads_reachability_versions_and_outcomes() {
        let now = 1_000_000_000;
        let nodes = [
            FleetNode {
                name: "r.s1".into(),
                id: 1,
                latest: Some(3),
                desired: Some((3, 7)),
                record: Some(record(
                    now - 5_000,
                    3,
                    SlotState::Good,
                    Some((7, OrderResult::Activated)),
                )),
            },
            FleetNode {
                name: "r.s2".into(),
                id: 2,
                latest: Some(3),
                desired: Some((3, 8)),
                record: Some(record(
                    now - 200_000,
                    2,
                    SlotState::Good,
                    Some((8, OrderResult::RolledBack("bird".into()))),
                )),
            },
            FleetNode {
                name: "r.s3".into(),
                id: 3,
                latest: None,
                desired: None,
                record: None,
            },
        ];
        let text = fleet(&nodes, now, 10, now - 60_000);
        for line in [
            "towalink_fleet_nodes 3",
            "towalink_fleet_nodes_reachable 1",
            "towalink_fleet_node_reachable{node=\"r.s1\"} 1",
            "towalink_fleet_node_reachable{node=\"r.s2\"} 0",
            "towalink_fleet_node_reachable{node=\"r.s3\"} 0",
            "towalink_fleet_node_last_report_age_seconds{node=\"r.s1\"} 5",
            "towalink_fleet_node_latest_version{node=\"r.s1\"} 3",
            "towalink_fleet_node_desired_version{node=\"r.s2\"} 3",
            "towalink_fleet_node_active_version{node=\"r.s2\"} 2",
            "towalink_fleet_node_activation{node=\"r.s1\",outcome=\"blessed\"} 1",
            "towalink_fleet_node_activation{node=\"r.s1\",outcome=\"waiting\"} 0",
            "towalink_fleet_node_activation{node=\"r.s2\",outcome=\"rolled_back\"} 1",
            "towalink_fleet_node_activation{node=\"r.s3\",outcome=\"none\"} 1",
            "towalink_fleet_node_bgp_sessions{node=\"r.s1\",state=\"established\"} 1",
            "towalink_fleet_node_bgp_sessions{node=\"r.s1\",state=\"down\"} 1",
            "towalink_fleet_node_last_rollback_timestamp_seconds{node=\"r.s1\"} 1700000000",
        ] {
            assert!(has(&text, line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("towalink_fleet_node_last_report_age_seconds{node=\"r.s3\"}"));
    }

    #[test]
    fn the_relay_labels_each_node_and_says_which_could_not_be_fetched() {
        let fetched = [
            Fetched {
                name: "r.s1".into(),
                result: Ok("# TYPE towalink_node_active_version gauge\ntowalink_node_active_version 3\nfoo_bar 1\n".into()),
                took: Duration::from_millis(20),
            },
            Fetched {
                name: "r.s2".into(),
                result: Err("cannot connect: timed out".into()),
                took: Duration::from_secs(5),
            },
        ];
        let text = relay(&fetched);
        for line in [
            "towalink_node_active_version{node=\"r.s1\"} 3",
            "towalink_relay_up{node=\"r.s1\"} 1",
            "towalink_relay_up{node=\"r.s2\"} 0",
            "towalink_relay_fetch_duration_seconds{node=\"r.s2\"} 5",
            "towalink_relay_dropped_lines{node=\"r.s1\"} 1",
        ] {
            assert!(has(&text, line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("foo_bar"));
    }
}
