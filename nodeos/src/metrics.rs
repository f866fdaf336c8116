//! The node's metrics (Prometheus text, docs/operations.md): [`render`] is pure, from the
//! report the node sends the controller, its slots on disk and what the process counted;
//! [`serve`] answers `GET /metrics` on the management link (the management address, port
//! [`NODE_METRICS_PORT`], the socket bound to the management interface too, so only the
//! controller reaches it) and on the addresses the operator gives (`--metrics-listen`).
//!
//! Each scrape builds a fresh report: BIRD is asked for its sessions then, the slots are read
//! from disk. Connections are answered one at a time, each within [`CONNECTION_DEADLINE`].

use std::io::{BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use towalink_bundle::messages::{NodeReport, SlotState, METRICS_PATH, NODE_METRICS_PORT};
use towalink_bundle::wire;
use towalink_metrics::{Exposition, Kind};
use towalink_system::Shutdown;

use crate::lifecycle::{Counters, Node, RollbackCause};
use crate::management::{build_report, Shared};
use crate::slots::{DiskState, Marker, Slot};

/// How long one connection may take, request and response.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// How often the management listener checks that it is bound to the interface there is now
/// (the link is made once the daemon reconciled; a new one has a new index).
const REBIND_EVERY: Duration = Duration::from_secs(5);

fn one_hot(e: &mut Exposition, label: &str, fixed: &[(&str, &str)], choices: &[&str], on: &str) {
    for choice in choices {
        let mut labels = fixed.to_vec();
        labels.push((label, choice));
        e.sample(&labels, f64::from(u8::from(*choice == on)));
    }
}

/// The exposition of a node: `report` as it would be sent now, `disk` its slots, `counters`
/// what the daemon counted, `rss_bytes` its resident memory.
pub fn render(
    report: &NodeReport,
    disk: Option<&DiskState>,
    counters: &Counters,
    rss_bytes: Option<u64>,
) -> String {
    let mut e = Exposition::new();
    let id = report.node_id.to_string();
    e.family(
        "towalink_node_info",
        Kind::Gauge,
        "The node: name, id and daemon version (always 1).",
    )
    .sample(
        &[
            ("name", &report.node),
            ("node_id", &id),
            ("daemon_version", &report.daemon_version),
        ],
        1.0,
    );
    if let Some(v) = report.active_version {
        e.family(
            "towalink_node_active_version",
            Kind::Gauge,
            "The version the node runs.",
        )
        .sample(&[], f64::from(v));
    }
    if let Some(v) = report.last_good_version {
        e.family(
            "towalink_node_last_good_version",
            Kind::Gauge,
            "The newest blessed version a rollback would go back to.",
        )
        .sample(&[], f64::from(v));
    }
    let state = report.state.map_or("none", SlotState::name);
    e.family(
        "towalink_node_active_state",
        Kind::Gauge,
        "The active version's state: 1 for the one it is in (good, pending, bad, none).",
    );
    one_hot(
        &mut e,
        "state",
        &[],
        &["good", "pending", "bad", "none"],
        state,
    );
    if let Some(tries) = report.tries_left {
        e.family(
            "towalink_node_tries_left",
            Kind::Gauge,
            "Boots a pending version has left before it is rolled back.",
        )
        .sample(&[], f64::from(tries));
    }
    if let Some(deadline) = report.confirm_by {
        e.family(
            "towalink_node_confirm_deadline_timestamp_seconds",
            Kind::Gauge,
            "When a pending version's confirm timer expires (Unix time).",
        )
        .sample(&[], deadline as f64);
    }
    if let Some(disk) = disk {
        e.family(
            "towalink_node_slot_version",
            Kind::Gauge,
            "The version each slot holds.",
        );
        for slot in [Slot::A, Slot::B] {
            if let Some(v) = disk.slot(slot).version {
                e.sample(&[("slot", slot.name())], f64::from(v));
            }
        }
        e.family(
            "towalink_node_slot_marker",
            Kind::Gauge,
            "Each slot's marker: 1 for the one it has (good, pending, bad, none).",
        );
        for slot in [Slot::A, Slot::B] {
            let marker = match disk.slot(slot).marker {
                Some(Marker::Good) => "good",
                Some(Marker::Pending { .. }) => "pending",
                Some(Marker::Bad) => "bad",
                None => "none",
            };
            let choices = ["good", "pending", "bad", "none"];
            one_hot(&mut e, "marker", &[("slot", slot.name())], &choices, marker);
        }
        e.family(
            "towalink_node_current_slot",
            Kind::Gauge,
            "1 for the slot `current` points at.",
        );
        for slot in [Slot::A, Slot::B] {
            e.sample(
                &[("slot", slot.name())],
                f64::from(u8::from(disk.current == Some(slot))),
            );
        }
    }
    e.family(
        "towalink_node_installed_versions",
        Kind::Gauge,
        "How many verified versions the node keeps.",
    )
    .sample(&[], report.installed_versions.len() as f64);
    e.family(
        "towalink_node_rollbacks_total",
        Kind::Counter,
        "Rollbacks since the daemon started, by reason.",
    );
    for cause in RollbackCause::ALL {
        e.sample(
            &[("reason", cause.label())],
            counters.rollbacks(cause) as f64,
        );
    }
    if let Some(rollback) = &report.last_rollback {
        e.family(
            "towalink_node_last_rollback_timestamp_seconds",
            Kind::Gauge,
            "When the node last rolled back (Unix time; kept across restarts).",
        )
        .sample(&[], rollback.time as f64);
    }
    let (applies, last_apply_s) = counters.applies();
    e.family(
        "towalink_node_applies_total",
        Kind::Counter,
        "Versions applied (files written, services reloaded) since the daemon started.",
    )
    .sample(&[], applies as f64);
    if applies > 0 {
        e.family(
            "towalink_node_apply_duration_seconds",
            Kind::Gauge,
            "How long the last apply took.",
        )
        .sample(&[], last_apply_s);
    }
    e.family(
        "towalink_node_health_check_ok",
        Kind::Gauge,
        "The active version's health checks: 1 passing, 0 failing.",
    );
    for check in &report.health {
        e.sample(&[("check", &check.check)], f64::from(u8::from(check.ok)));
    }
    e.family(
        "towalink_bgp_session_up",
        Kind::Gauge,
        "BGP sessions in BIRD: 1 when Established.",
    );
    for session in &report.bgp {
        let up = session.info.starts_with("Established");
        e.sample(&[("protocol", &session.name)], f64::from(u8::from(up)));
    }
    e.family(
        "towalink_bgp_session_info",
        Kind::Gauge,
        "BGP sessions in BIRD with their state and info (always 1).",
    );
    for session in &report.bgp {
        let info = session.info.split_whitespace().next().unwrap_or("");
        e.sample(
            &[
                ("protocol", &session.name),
                ("state", &session.state),
                ("info", info),
            ],
            1.0,
        );
    }
    e.family(
        "towalink_bfd_session_up",
        Kind::Gauge,
        "BFD sessions in BIRD: 1 when Up.",
    );
    for session in &report.bfd {
        e.sample(
            &[("peer", &session.peer), ("interface", &session.interface)],
            f64::from(u8::from(session.state == "Up")),
        );
    }
    e.family(
        "towalink_wireguard_receive_bytes_total",
        Kind::Counter,
        "Bytes received on each WireGuard link (the management link is tlmgmt).",
    );
    for t in &report.tunnels {
        e.sample(&[("interface", &t.interface)], t.rx_bytes as f64);
    }
    e.family(
        "towalink_wireguard_transmit_bytes_total",
        Kind::Counter,
        "Bytes sent on each WireGuard link.",
    );
    for t in &report.tunnels {
        e.sample(&[("interface", &t.interface)], t.tx_bytes as f64);
    }
    e.family(
        "towalink_wireguard_last_receive_age_seconds",
        Kind::Gauge,
        "Seconds since a link last received anything (handshake, keepalive, data); \
         absent until it received something. A keepalive arrives every 25 s on a live link.",
    );
    for t in &report.tunnels {
        if let Some(age) = t.last_rx_age_s {
            e.sample(&[("interface", &t.interface)], age as f64);
        }
    }
    e.family(
        "towalink_node_uptime_seconds",
        Kind::Gauge,
        "Seconds since the node booted.",
    )
    .sample(&[], report.uptime_s as f64);
    e.family(
        "towalink_daemon_uptime_seconds",
        Kind::Gauge,
        "Seconds since the daemon started.",
    )
    .sample(&[], report.daemon_uptime_s as f64);
    if let Some(rss) = rss_bytes {
        e.family(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the daemon.",
        )
        .sample(&[], rss as f64);
    }
    e.finish()
}

/// The daemon's resident memory (`VmRSS` of `/proc/self/status`).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The exposition of the node now.
fn scrape(node: &Node, shared: &Shared) -> Result<String, String> {
    let report = build_report(node, shared).map_err(|e| e.to_string())?;
    let disk = node.state.read().ok();
    Ok(render(&report, disk.as_ref(), &node.counters, rss_bytes()))
}

/// Answers one connection: `GET /metrics`, else 404 or 405.
fn answer(stream: TcpStream, node: &Node, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(CONNECTION_DEADLINE));
    let _ = stream.set_write_timeout(Some(CONNECTION_DEADLINE));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let (status, content_type, body) = match wire::read_request(&mut reader, 0) {
        Err(error) => (400, "text/plain", format!("{error}\n")),
        Ok(request) if request.path != METRICS_PATH => (
            404,
            "text/plain",
            "not found: the node serves /metrics\n".into(),
        ),
        Ok(request) if request.method != "GET" => {
            (405, "text/plain", "only GET is allowed\n".into())
        }
        Ok(_) => match scrape(node, shared) {
            Ok(text) => (200, towalink_metrics::CONTENT_TYPE, text),
            Err(error) => (500, "text/plain", format!("{error}\n")),
        },
    };
    let _ = wire::write_response(&mut writer, status, content_type, body.as_bytes());
    let _ = writer.flush();
}

/// Serves the metrics until `shutdown`: on the management address (when `management`), kept
/// bound to the address and interface there are now, and on each of `listen`. Runs on the
/// calling thread.
pub fn serve(
    node: Node,
    shared: Arc<Shared>,
    listen: Vec<TcpListener>,
    management: bool,
    shutdown: &Shutdown,
) {
    for listener in &listen {
        let _ = listener.set_nonblocking(true);
    }
    let mut bound: Option<(TcpListener, (std::net::Ipv6Addr, u32))> = None;
    let mut checked = std::time::Instant::now() - REBIND_EVERY;
    let mut logged_error = false;
    loop {
        if management && checked.elapsed() >= REBIND_EVERY {
            checked = std::time::Instant::now();
            let now = crate::dataplane::management_address();
            if bound.as_ref().map(|(_, at)| *at) != now {
                bound = None;
                if let Some((address, index)) = now {
                    match crate::dataplane::management_listener(address, NODE_METRICS_PORT) {
                        Ok(listener) => {
                            let _ = listener.set_nonblocking(true);
                            tracing::info!(%address, port = NODE_METRICS_PORT, "metrics served on the management link");
                            bound = Some((listener, (address, index)));
                            logged_error = false;
                        }
                        Err(error) if !logged_error => {
                            tracing::warn!(%error, %address, port = NODE_METRICS_PORT, "cannot serve metrics on the management link");
                            logged_error = true;
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        let mut served = false;
        for listener in listen.iter().chain(bound.as_ref().map(|(l, _)| l)) {
            if let Ok((stream, _)) = listener.accept() {
                let _ = stream.set_nonblocking(false);
                answer(stream, &node, &shared);
                served = true;
            }
        }
        if !served && shutdown.sleep(Duration::from_millis(100)) {
            return;
        }
        if shutdown.is_triggered() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::SlotView;
    use towalink_bundle::messages::{BfdSession, BgpSession, HealthReport, TunnelReport};

    fn report() -> NodeReport {
        NodeReport {
            node_id: 2,
            node: "r.s2".into(),
            daemon_version: "0.1.0".into(),
            uptime_s: 100,
            daemon_uptime_s: 90,
            active_version: Some(3),
            state: Some(SlotState::Pending),
            tries_left: Some(2),
            last_good_version: Some(2),
            installed_versions: vec![1, 2, 3],
            health: vec![HealthReport {
                check: "bird".into(),
                ok: false,
                detail: "peer3 Active".into(),
            }],
            tunnels: vec![TunnelReport {
                interface: "tlwg3".into(),
                rx_bytes: 1500,
                tx_bytes: 900,
                last_rx_age_s: Some(4),
            }],
            bgp: vec![BgpSession {
                name: "peer3".into(),
                state: "start".into(),
                info: "Active        Socket: Connection refused".into(),
            }],
            bfd: vec![BfdSession {
                peer: "fe80::2:3".into(),
                interface: "tlwg3".into(),
                state: "Down".into(),
            }],
            ..NodeReport::default()
        }
    }

    #[test]
    fn a_pending_node_with_a_session_down_reads_so() {
        let disk = DiskState {
            current: Some(Slot::B),
            a: SlotView {
                version: Some(2),
                marker: Some(Marker::Good),
            },
            b: SlotView {
                version: Some(3),
                marker: Some(Marker::Pending { tries_left: 2 }),
            },
            confirm_by: None,
        };
        let counters = Counters::default();
        let text = render(&report(), Some(&disk), &counters, Some(4096));
        for line in [
            "towalink_node_info{name=\"r.s2\",node_id=\"2\",daemon_version=\"0.1.0\"} 1",
            "towalink_node_active_version 3",
            "towalink_node_last_good_version 2",
            "towalink_node_active_state{state=\"pending\"} 1",
            "towalink_node_active_state{state=\"good\"} 0",
            "towalink_node_tries_left 2",
            "towalink_node_slot_version{slot=\"b\"} 3",
            "towalink_node_slot_marker{slot=\"a\",marker=\"good\"} 1",
            "towalink_node_slot_marker{slot=\"b\",marker=\"pending\"} 1",
            "towalink_node_current_slot{slot=\"b\"} 1",
            "towalink_node_rollbacks_total{reason=\"boot_tries\"} 0",
            "towalink_node_health_check_ok{check=\"bird\"} 0",
            "towalink_bgp_session_up{protocol=\"peer3\"} 0",
            "towalink_bgp_session_info{protocol=\"peer3\",state=\"start\",info=\"Active\"} 1",
            "towalink_bfd_session_up{peer=\"fe80::2:3\",interface=\"tlwg3\"} 0",
            "towalink_wireguard_receive_bytes_total{interface=\"tlwg3\"} 1500",
            "towalink_wireguard_transmit_bytes_total{interface=\"tlwg3\"} 900",
            "towalink_wireguard_last_receive_age_seconds{interface=\"tlwg3\"} 4",
            "towalink_node_uptime_seconds 100",
            "process_resident_memory_bytes 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("towalink_node_apply_duration_seconds "));
        assert!(!text.contains("towalink_node_confirm_deadline"));
        // Every family once, and the whole text is a valid exposition for a relay.
        let mut relay = towalink_metrics::Relay::new("node");
        assert_eq!(relay.add(&text, "r.s2", |_| true), 0, "{text}");
    }
}
