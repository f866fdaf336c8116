//! Operating the running fleet from the CLI: waiting for an activation to take effect (and
//! judging each node's outcome from what it reports), and `tlm status`. Both read what the
//! service writes under `status/` and never take the directory lock while they wait, so they
//! do not hold up other `tlm` commands.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;
use towalink_bundle::messages::{OrderResult, SlotState};
use towalink_bundle::printable::printable;

use crate::model::names::NodeFullName;
use crate::service::records::{self, NodeRecord, ServiceRecord};
use crate::store::Store;

/// An activation to watch on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub node: NodeFullName,
    pub version: u32,
    pub order: u64,
}

/// What became of an activation on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No answer to this order yet.
    Waiting,
    /// Active, waiting for its health checks (or confirmation).
    Pending,
    Blessed,
    RolledBack(String),
    Refused(String),
    /// No report within the time limit; `last_seen_s` ago, if ever.
    Unreachable(Option<u64>),
}

impl Outcome {
    pub fn word(&self) -> String {
        match self {
            Outcome::Waiting => "no answer yet".into(),
            Outcome::Pending => "activated, pending (health checks running)".into(),
            Outcome::Blessed => "activated, blessed".into(),
            Outcome::RolledBack(reason) => format!("rolled back: {}", printable(reason)),
            Outcome::Refused(reason) => format!("refused: {}", printable(reason)),
            Outcome::Unreachable(Some(age)) => {
                format!(
                    "unreachable (last seen {} ago): takes it when it returns",
                    age_text(*age)
                )
            }
            Outcome::Unreachable(None) => {
                "unreachable (never seen): takes it when it comes up".into()
            }
        }
    }

    fn settled(&self, until_blessed: bool) -> bool {
        match self {
            Outcome::Waiting => false,
            Outcome::Pending => !until_blessed,
            _ => true,
        }
    }

    pub fn success(&self, until_blessed: bool) -> bool {
        match self {
            Outcome::Blessed => true,
            Outcome::Pending => !until_blessed,
            _ => false,
        }
    }
}

/// Judges a node's outcome from its latest record. Pure.
pub fn judge(target: &Target, record: Option<&NodeRecord>) -> Outcome {
    let Some(record) = record else {
        return Outcome::Waiting;
    };
    let report = &record.report;
    // A later order answers for this one too; a number far beyond it is no answer (a node's
    // record from before signed orders may hold anything).
    let answers = |seq: u64| {
        seq >= target.order && seq - target.order < towalink_bundle::orders::MAX_ORDER_STEP
    };
    let Some(done) = report.order_done.as_ref().filter(|d| answers(d.seq)) else {
        return Outcome::Waiting;
    };
    let rollback_reason = || {
        report
            .last_rollback
            .as_ref()
            .filter(|r| r.from_version == Some(target.version))
            .map(|r| r.reason.clone())
    };
    match &done.result {
        OrderResult::RolledBack(reason) => return Outcome::RolledBack(reason.clone()),
        OrderResult::Refused(reason) => return Outcome::Refused(reason.clone()),
        // Taken: what became of it shows in the state (below). A result this build does not
        // know is judged the same way.
        OrderResult::Activated | OrderResult::AlreadyActive | OrderResult::Other(_) => {}
    }
    if report.active_version == Some(target.version) {
        match report.state {
            Some(SlotState::Good) => Outcome::Blessed,
            Some(SlotState::Bad) => {
                Outcome::RolledBack(rollback_reason().unwrap_or_else(|| "marked bad".into()))
            }
            Some(SlotState::Pending | SlotState::Unknown) | None => Outcome::Pending,
        }
    } else {
        match rollback_reason() {
            Some(reason) => Outcome::RolledBack(reason),
            None => Outcome::Waiting,
        }
    }
}

/// Waits until every target settled (taken, or blessed with `until_blessed`; rolled back or
/// refused) or `timeout`; nodes that never answered are unreachable.
pub fn wait(
    store: &Store,
    targets: &[Target],
    until_blessed: bool,
    timeout: Duration,
) -> Vec<Outcome> {
    let started = Instant::now();
    let judge_now =
        |target: &Target| judge(target, records::read_node(store, &target.node).as_ref());
    // Only the nodes not yet settled are read again every round (a fleet of 1,000 would be
    // 50,000 status files a second); all of them once more at the end, for what is printed.
    let mut settled = vec![false; targets.len()];
    loop {
        for (target, done) in targets.iter().zip(settled.iter_mut()) {
            if !*done {
                *done = judge_now(target).settled(until_blessed);
            }
        }
        if settled.iter().all(|done| *done) || started.elapsed() >= timeout {
            let now = records::now_ms();
            return targets
                .iter()
                .map(|target| match judge_now(target) {
                    Outcome::Waiting => {
                        let seen = records::read_node(store, &target.node)
                            .map(|r| now.saturating_sub(r.last_seen_ms) / 1000);
                        Outcome::Unreachable(seen)
                    }
                    other => other,
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn age_text(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d", s / 86_400),
    }
}

/// Per node in scope: what `tlm status` knows.
pub struct NodeStatus {
    pub node: NodeFullName,
    pub id: u32,
    pub latest: Option<u32>,
    pub desired: Option<u32>,
    pub record: Option<NodeRecord>,
}

/// Whether a node counts as reachable: the service runs and the node reported recently.
fn reachable(service: Option<&ServiceRecord>, record: Option<&NodeRecord>, now: u64) -> bool {
    match (service, record) {
        (Some(service), Some(record)) => {
            crate::service::metrics::reachable(record.last_seen_ms, now, service.report_interval_s)
        }
        _ => false,
    }
}

fn version_text(v: Option<u32>) -> String {
    v.map_or("-".to_string(), |v| format!("v{v}"))
}

/// Prints `tlm status`.
pub fn print_status(
    store: &Store,
    nodes: &[NodeStatus],
    detailed: bool,
    json_format: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let service = records::running_service(store);
    let now = records::now_ms();
    let peer = |id: u32| {
        service
            .as_ref()
            .and_then(|s| s.peers.iter().find(|p| p.node_id == id).cloned())
    };
    if json_format {
        let list: Vec<_> = nodes
            .iter()
            .map(|n| {
                let report = n.record.as_ref().map(|r| &r.report);
                json!({
                    "node": n.node.to_string(),
                    "id": n.id,
                    "reachable": reachable(service.as_ref(), n.record.as_ref(), now),
                    "last_seen_ms": n.record.as_ref().map(|r| r.last_seen_ms),
                    "last_seen_age_s": n.record.as_ref().map(|r| now.saturating_sub(r.last_seen_ms) / 1000),
                    "endpoint": peer(n.id).and_then(|p| p.endpoint).or_else(|| n.record.as_ref().and_then(|r| r.endpoint.clone())),
                    "latest_version": n.latest,
                    "desired_version": n.desired,
                    "active_version": report.and_then(|r| r.active_version),
                    "state": report.and_then(|r| r.state),
                    "pending_version": report.filter(|r| r.state == Some(SlotState::Pending)).and_then(|r| r.active_version),
                    "tries_left": report.and_then(|r| r.tries_left),
                    "last_good_version": report.and_then(|r| r.last_good_version),
                    "installed_versions": report.map(|r| r.installed_versions.clone()),
                    "uptime_s": report.map(|r| r.uptime_s),
                    "boot_id": report.map(|r| r.boot_id.clone()),
                    "daemon_uptime_s": report.map(|r| r.daemon_uptime_s),
                    "tunnels": report.map(|r| r.tunnels.clone()),
                    "bgp": report.map(|r| r.bgp.clone()),
                    "bfd": report.map(|r| r.bfd.clone()),
                    "health": report.map(|r| r.health.clone()),
                    "last_rollback": report.and_then(|r| r.last_rollback.clone()),
                    "last_order": report.and_then(|r| r.order_done.clone()),
                    "management": peer(n.id),
                })
            })
            .collect();
        let document = json!({
            "service": service.as_ref().map(|s| json!({"pid": s.pid, "api": s.api, "listen_port": s.listen_port})),
            "nodes": list,
        });
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&document).expect("json")
        )?;
        return Ok(());
    }
    match &service {
        Some(s) => writeln!(
            out,
            "controller service: running (pid {}, API {})",
            s.pid, s.api
        )?,
        None => writeln!(
            out,
            "controller service: not running (start `tlm serve`); last known state shown"
        )?,
    }
    let header = [
        "NODE",
        "REACHABLE",
        "LAST SEEN",
        "ACTIVE",
        "STATE",
        "DESIRED",
        "LATEST",
        "TUNNELS",
        "BGP",
        "UPTIME",
        "LAST ROLLBACK",
    ];
    let mut rows = Vec::new();
    for n in nodes {
        let report = n.record.as_ref().map(|r| &r.report);
        let tunnels = report.map_or("-".to_string(), |r| {
            let data: Vec<_> = r
                .tunnels
                .iter()
                .filter(|t| t.interface != "tlmgmt")
                .collect();
            let live = data
                .iter()
                .filter(|t| t.last_rx_age_s.is_some_and(|a| a < 30))
                .count();
            format!("{live}/{} live", data.len())
        });
        let bgp = report.map_or("-".to_string(), |r| {
            let up = r
                .bgp
                .iter()
                .filter(|b| b.info.starts_with("Established"))
                .count();
            format!("{up}/{} up", r.bgp.len())
        });
        rows.push(vec![
            n.node.to_string(),
            if reachable(service.as_ref(), n.record.as_ref(), now) {
                "yes"
            } else {
                "no"
            }
            .to_string(),
            n.record.as_ref().map_or("never".to_string(), |r| {
                format!(
                    "{} ago",
                    age_text(now.saturating_sub(r.last_seen_ms) / 1000)
                )
            }),
            version_text(report.and_then(|r| r.active_version)),
            report
                .and_then(|r| r.state)
                .map_or_else(|| "-".into(), |s| s.to_string()),
            version_text(n.desired),
            version_text(n.latest),
            tunnels,
            bgp,
            report.map_or("-".to_string(), |r| age_text(r.uptime_s)),
            report
                .and_then(|r| r.last_rollback.as_ref())
                .map_or("-".to_string(), |r| {
                    format!(
                        "{} -> {}: {}",
                        version_text(r.from_version),
                        version_text(r.to_version),
                        printable(&r.reason)
                    )
                }),
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        text.trim_end().to_string()
    };
    writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    )?;
    for row in rows {
        writeln!(out, "{}", line(row))?;
    }
    if detailed {
        // The object name of each node's current recovery token, to tell whether the node
        // holds it (nodes report theirs since token rotation).
        let token_ids: std::collections::BTreeMap<u32, String> = store
            .load_secrets()
            .map(|s| {
                s.nodes
                    .iter()
                    .map(|n| {
                        let id = towalink_bundle::recovery::object_name(n.recovery_token.expose());
                        (n.id, id)
                    })
                    .collect()
            })
            .unwrap_or_default();
        for n in nodes {
            let Some(record) = &n.record else { continue };
            let r = &record.report;
            writeln!(
                out,
                "\n{} (id {}), daemon {}, up {}",
                n.node,
                n.id,
                printable(&r.daemon_version),
                age_text(r.daemon_uptime_s)
            )?;
            if let Some(p) = peer(n.id) {
                writeln!(
                    out,
                    "  management link: endpoint {}, rx {} B, tx {} B",
                    p.endpoint.as_deref().unwrap_or("-"),
                    p.rx_bytes,
                    p.tx_bytes
                )?;
            }
            let installed: Vec<String> = r
                .installed_versions
                .iter()
                .map(|v| format!("v{v}"))
                .collect();
            writeln!(out, "  installed: {}", installed.join(" "))?;
            for t in &r.tunnels {
                writeln!(
                    out,
                    "  tunnel {:<10} rx {:>12} B  tx {:>12} B  last rx {}",
                    printable(&t.interface),
                    t.rx_bytes,
                    t.tx_bytes,
                    t.last_rx_age_s
                        .map_or("never".to_string(), |a| format!("{} ago", age_text(a)))
                )?;
            }
            for b in &r.bgp {
                writeln!(
                    out,
                    "  bgp {:<16} {:<6} {}",
                    printable(&b.name),
                    printable(&b.state),
                    printable(&b.info)
                )?;
            }
            for h in &r.health {
                writeln!(
                    out,
                    "  health {:<10} {} ({})",
                    printable(&h.check),
                    if h.ok { "ok" } else { "failing" },
                    printable(&h.detail)
                )?;
            }
            if let Some(o) = &r.order_done {
                writeln!(
                    out,
                    "  last order: #{} v{}: {}",
                    o.seq,
                    o.version,
                    printable(&o.result.to_string())
                )?;
            }
            if let (Some(held), Some(current)) = (&r.recovery_token_id, token_ids.get(&n.id)) {
                let state = if held == current {
                    "current"
                } else {
                    "an earlier one (rotated; the node takes the new one at its next sync)"
                };
                writeln!(out, "  recovery token: {state}")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use towalink_bundle::messages::{NodeReport, OrderOutcome, RollbackReport};

    fn record(
        active: u32,
        state: SlotState,
        done: Option<(u64, &str)>,
        rollback_from: Option<u32>,
    ) -> NodeRecord {
        NodeRecord {
            node: "r.s1".into(),
            node_id: 1,
            last_seen_ms: 0,
            endpoint: None,
            via_key: None,
            report: NodeReport {
                active_version: Some(active),
                state: Some(state),
                order_done: done.map(|(seq, result)| OrderOutcome {
                    seq,
                    version: 3,
                    result: result.into(),
                    time: 0,
                }),
                last_rollback: rollback_from.map(|from| RollbackReport {
                    time: 0,
                    from_version: Some(from),
                    to_version: Some(2),
                    reason: "v3 did not pass".into(),
                }),
                ..NodeReport::default()
            },
        }
    }

    #[test]
    fn outcomes_follow_the_report() {
        let t = Target {
            node: "r.s1".parse().unwrap(),
            version: 3,
            order: 5,
        };
        assert_eq!(judge(&t, None), Outcome::Waiting);
        assert_eq!(
            judge(
                &t,
                Some(&record(2, SlotState::Good, Some((4, "activated")), None))
            ),
            Outcome::Waiting
        );
        assert_eq!(
            judge(
                &t,
                Some(&record(3, SlotState::Pending, Some((5, "activated")), None))
            ),
            Outcome::Pending
        );
        assert_eq!(
            judge(
                &t,
                Some(&record(
                    3,
                    SlotState::Good,
                    Some((5, "already active")),
                    None
                ))
            ),
            Outcome::Blessed
        );
        assert_eq!(
            judge(
                &t,
                Some(&record(2, SlotState::Good, Some((5, "activated")), Some(3)))
            ),
            Outcome::RolledBack("v3 did not pass".into())
        );
        assert_eq!(
            judge(
                &t,
                Some(&record(
                    2,
                    SlotState::Good,
                    Some((5, "refused: no version v3")),
                    None
                ))
            ),
            Outcome::Refused("no version v3".into())
        );
        // An order rolled back at once (apply failed), as every node release reports it.
        assert_eq!(
            judge(
                &t,
                Some(&record(
                    2,
                    SlotState::Good,
                    Some((5, "rolled back: apply of v3 failed: x")),
                    None
                ))
            ),
            Outcome::RolledBack("apply of v3 failed: x".into())
        );
        // A result this controller does not know is judged by the state.
        assert_eq!(
            judge(
                &t,
                Some(&record(3, SlotState::Good, Some((5, "deferred")), None))
            ),
            Outcome::Blessed
        );
        assert!(Outcome::Pending.settled(false) && !Outcome::Pending.settled(true));
        assert!(Outcome::Blessed.success(true) && !Outcome::Pending.success(true));
    }
}
