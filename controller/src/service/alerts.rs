//! Alerts (docs/operations.md): `tlm serve` posts JSON to the `alert_webhooks` when a node has
//! not reported for `alert_unreachable_after_s`, when a node rolls back, and when a reachable
//! node reports a BGP session not established for `alert_bgp_down_after_s`; and again when
//! each is over.
//!
//! - [`observe`] is the rule, pure: the fleet now and what was seen before ([`AlertState`]) →
//!   the alerts to send. The state is kept in `status/alerts.json` (soft state, like the rest
//!   of `status/`), so a restarted service neither repeats an alert nor forgets to resolve it,
//!   and a rollback while it was down is still told.
//! - [`run`] is the loop: once a second, read the settings (the global attributes), observe,
//!   log, hand each alert to every webhook's [`Courier`].
//! - A [`Courier`] per URL posts in order on a thread of its own, retrying a failed post with
//!   backoff ([`retry_after`]: 1 s doubling to 5 min, for a day), so a slow or dead receiver
//!   never holds up the service or another receiver. Its queue is bounded
//!   ([`QUEUE_LIMIT`], the oldest dropped and counted).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use towalink_bundle::messages::SlotState;
use towalink_system::Shutdown;

use super::fleet::Fleet;
use super::metrics::{reachable, FleetNode};
use super::records;
use crate::model::attributes::Merged;
use crate::model::resolve::{complete_error, ResolveError};
use crate::model::schema;

/// When `alert_unreachable_after_s` is unset.
pub const UNREACHABLE_AFTER_S: u64 = 300;
/// When `alert_bgp_down_after_s` is unset.
pub const BGP_DOWN_AFTER_S: u64 = 120;
/// Alerts a courier holds for one URL at most.
pub const QUEUE_LIMIT: usize = 10_000;
/// How long one post may take.
pub const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an alert is retried before it is given up.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The alert settings (global attributes `alert_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    pub webhooks: Vec<String>,
    pub unreachable_after_s: u64,
    pub bgp_down_after_s: u64,
}

impl AlertSettings {
    /// Reads the settings from merged global attributes, checked against the schema. Pure.
    pub fn from_attributes(merged: &Merged) -> Result<AlertSettings, ResolveError> {
        for name in schema::CONTROLLER_ONLY {
            if let (Some(attribute), Some(value)) = (schema::lookup(name), merged.values.get(name))
            {
                schema::check_value(attribute, value, true)
                    .map_err(|violation| complete_error(merged, &violation))?;
            }
        }
        let seconds = |name: &str, default: u64| {
            merged
                .values
                .get(name)
                .and_then(toml::Value::as_integer)
                .map_or(default, |n| n as u64)
        };
        Ok(AlertSettings {
            webhooks: merged
                .values
                .get("alert_webhooks")
                .and_then(toml::Value::as_array)
                .map(|urls| {
                    urls.iter()
                        .filter_map(|u| u.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            unreachable_after_s: seconds("alert_unreachable_after_s", UNREACHABLE_AFTER_S),
            bgp_down_after_s: seconds("alert_bgp_down_after_s", BGP_DOWN_AFTER_S),
        })
    }
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    NodeUnreachable,
    NodeRolledBack,
    BgpSessionDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

/// One alert as posted (the JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub alert: AlertKind,
    pub status: AlertStatus,
    /// `<node>.<site>`.
    pub node: String,
    /// The BGP protocol, or the version rolled back from (`v4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When the condition began (Unix seconds).
    pub since: u64,
    /// When this was decided (Unix seconds).
    pub at: u64,
    /// One line for people.
    pub summary: String,
}

/// A condition seen: waiting for its threshold, or firing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub alert: AlertKind,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Unix milliseconds.
    pub since_ms: u64,
    pub firing: bool,
}

/// What the rule remembers between rounds (`status/alerts.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertState {
    pub conditions: Vec<Condition>,
    /// Per node: the time (Unix seconds) of the newest rollback already told.
    pub rollbacks_told: BTreeMap<String, u64>,
}

fn age_text(ms: u64) -> String {
    crate::commands::operate::age_text(ms / 1000)
}

impl AlertState {
    fn find(&self, alert: AlertKind, node: &str, subject: Option<&str>) -> Option<usize> {
        self.conditions
            .iter()
            .position(|c| c.alert == alert && c.node == node && c.subject.as_deref() == subject)
    }

    fn find_kind(&self, alert: AlertKind, node: &str) -> Option<usize> {
        self.conditions
            .iter()
            .position(|c| c.alert == alert && c.node == node)
    }

    /// The alerts firing now.
    pub fn firing(&self) -> impl Iterator<Item = &Condition> {
        self.conditions.iter().filter(|c| c.firing)
    }
}

/// The alerts due at `now_ms` for `nodes`, updating `state`. `started_ms`: when the service
/// started (a node never heard counts as silent since then). Pure.
pub fn observe(
    state: &mut AlertState,
    settings: &AlertSettings,
    nodes: &[FleetNode],
    now_ms: u64,
    started_ms: u64,
    report_interval_s: u64,
) -> Vec<Alert> {
    let mut alerts = Vec::new();
    let at = now_ms / 1000;
    let mut emit = |c: &Condition, status: AlertStatus, summary: String| {
        alerts.push(Alert {
            alert: c.alert,
            status,
            node: c.node.clone(),
            subject: c.subject.clone(),
            since: c.since_ms / 1000,
            at,
            summary,
        })
    };
    // Nodes gone from the configuration: their alerts end.
    state.conditions.retain(|c| {
        let kept = nodes.iter().any(|n| n.name == c.node);
        if !kept && c.firing {
            let summary = format!("{} was removed from the configuration", c.node);
            emit(c, AlertStatus::Resolved, summary);
        }
        kept
    });
    state
        .rollbacks_told
        .retain(|node, _| nodes.iter().any(|n| &n.name == node));
    for n in nodes {
        let record = n.record.as_ref();
        let last_ms = record.map_or(started_ms, |r| r.last_seen_ms);
        // Unreachable.
        let silent_ms = now_ms.saturating_sub(last_ms);
        let at_unreachable = state.find(AlertKind::NodeUnreachable, &n.name, None);
        if silent_ms >= settings.unreachable_after_s * 1000 {
            if at_unreachable.is_none() {
                let c = Condition {
                    alert: AlertKind::NodeUnreachable,
                    node: n.name.clone(),
                    subject: None,
                    since_ms: last_ms,
                    firing: true,
                };
                let summary = match record {
                    Some(_) => format!("{} has not reported for {}", n.name, age_text(silent_ms)),
                    None => format!(
                        "{} has not reported since the service started {} ago",
                        n.name,
                        age_text(silent_ms)
                    ),
                };
                emit(&c, AlertStatus::Firing, summary);
                state.conditions.push(c);
            }
        } else if let Some(i) = at_unreachable {
            let c = state.conditions.remove(i);
            let summary = format!("{} reports again", n.name);
            emit(&c, AlertStatus::Resolved, summary);
        }
        let Some(record) = record else {
            continue;
        };
        let report = &record.report;
        // Rolled back: told once per rollback; over when the node runs, blessed, the version
        // it was told to (or, never told one, another than the one it left).
        let at_rollback = state.find_kind(AlertKind::NodeRolledBack, &n.name);
        if let Some(rollback) = &report.last_rollback {
            let told = state.rollbacks_told.get(&n.name).copied();
            let new = match told {
                Some(t) => rollback.time > t,
                None => rollback.time.saturating_mul(1000) >= started_ms,
            };
            if new || told.is_none() {
                state.rollbacks_told.insert(n.name.clone(), rollback.time);
            }
            if new {
                if let Some(i) = at_rollback {
                    state.conditions.remove(i);
                }
                let version = |v: Option<u32>| v.map_or("-".to_string(), |v| format!("v{v}"));
                let c = Condition {
                    alert: AlertKind::NodeRolledBack,
                    node: n.name.clone(),
                    subject: rollback.from_version.map(|v| format!("v{v}")),
                    since_ms: rollback.time * 1000,
                    firing: true,
                };
                let summary = format!(
                    "{} rolled back from {} to {}: {}",
                    n.name,
                    version(rollback.from_version),
                    version(rollback.to_version),
                    towalink_bundle::printable::printable(&rollback.reason)
                );
                emit(&c, AlertStatus::Firing, summary);
                state.conditions.push(c);
            }
        }
        if let Some(i) = state.find_kind(AlertKind::NodeRolledBack, &n.name) {
            let c = &state.conditions[i];
            let left = c.subject.as_deref();
            let runs = report
                .active_version
                .filter(|_| report.state == Some(SlotState::Good));
            let over = match (runs, n.desired) {
                (Some(active), Some((desired, _))) => active == desired,
                (Some(active), None) => Some(format!("v{active}").as_str()) != left,
                (None, _) => false,
            };
            if over {
                let c = state.conditions.remove(i);
                let summary = format!(
                    "{} runs v{}, blessed",
                    n.name,
                    report.active_version.unwrap_or_default()
                );
                emit(&c, AlertStatus::Resolved, summary);
            }
        }
        // BGP sessions, judged only while the node's reports are current.
        if !reachable(last_ms, now_ms, report_interval_s) {
            continue;
        }
        for session in &report.bgp {
            let subject = Some(session.name.as_str());
            let at_session = state.find(AlertKind::BgpSessionDown, &n.name, subject);
            if session.info.starts_with("Established") {
                if let Some(i) = at_session {
                    let c = state.conditions.remove(i);
                    if c.firing {
                        let summary =
                            format!("{}: BGP session {} is established", n.name, session.name);
                        emit(&c, AlertStatus::Resolved, summary);
                    }
                }
                continue;
            }
            let i = match at_session {
                Some(i) => i,
                None => {
                    state.conditions.push(Condition {
                        alert: AlertKind::BgpSessionDown,
                        node: n.name.clone(),
                        subject: Some(session.name.clone()),
                        since_ms: now_ms,
                        firing: false,
                    });
                    state.conditions.len() - 1
                }
            };
            let c = &mut state.conditions[i];
            if !c.firing && now_ms.saturating_sub(c.since_ms) >= settings.bgp_down_after_s * 1000 {
                c.firing = true;
                let summary = format!(
                    "{}: BGP session {} is not established ({} {}) for {}",
                    n.name,
                    session.name,
                    towalink_bundle::printable::printable(&session.state),
                    towalink_bundle::printable::printable(&session.info),
                    age_text(now_ms.saturating_sub(c.since_ms))
                );
                let c = c.clone();
                emit(&c, AlertStatus::Firing, summary);
            }
        }
        // Sessions the node no longer has (a version without them).
        state.conditions.retain(|c| {
            let gone = c.alert == AlertKind::BgpSessionDown
                && c.node == n.name
                && !report
                    .bgp
                    .iter()
                    .any(|s| Some(&s.name) == c.subject.as_ref());
            if gone && c.firing {
                let summary = format!(
                    "{}: BGP session {} is gone from the node's configuration",
                    n.name,
                    c.subject.as_deref().unwrap_or("")
                );
                emit(c, AlertStatus::Resolved, summary);
            }
            !gone
        });
    }
    alerts
}

/// How long to wait before the attempt after `attempts` failed ones: 1 s, doubling, at most
/// 5 minutes. Pure.
pub fn retry_after(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(9)).min(Duration::from_secs(300))
}

/// Whether a failed post is worth another try: no answer, a server error, 408 or 429 are;
/// another refusal by the receiver is not. Pure.
pub fn worth_retrying(status: Option<u16>) -> bool {
    match status {
        None => true,
        Some(code) => code >= 500 || code == 408 || code == 429,
    }
}

/// An alert waiting to be posted.
#[derive(Debug)]
struct Parcel {
    body: String,
    queued: Instant,
    attempts: u32,
}

/// The alerts for one URL and the thread that posts them in order.
pub struct Courier {
    url: String,
    queue: Arc<(Mutex<VecDeque<Parcel>>, Condvar)>,
}

impl Courier {
    /// Starts the courier's thread; it ends when `shutdown` is triggered.
    pub fn start(url: String, shutdown: Shutdown) -> Courier {
        let queue: Arc<(Mutex<VecDeque<Parcel>>, Condvar)> = Arc::default();
        let (target, held) = (url.clone(), Arc::clone(&queue));
        let spawned = std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || deliver(&target, &held, &shutdown));
        if let Err(error) = spawned {
            tracing::error!(%error, %url, "cannot start the alert courier");
        }
        Courier { url, queue }
    }

    pub fn send(&self, alert: &Alert) {
        let body = serde_json::to_string(alert).expect("an alert serializes");
        let (lock, ready) = &*self.queue;
        let mut queue = lock.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= QUEUE_LIMIT {
            queue.pop_front();
            tracing::warn!(url = %self.url, "alert queue full: the oldest alert was dropped");
        }
        queue.push_back(Parcel {
            body,
            queued: Instant::now(),
            attempts: 0,
        });
        ready.notify_one();
    }
}

/// Posts one alert: `Ok` on a 2xx, else the status (none: no answer) and why.
fn post(url: &str, body: &str) -> Result<(), (Option<u16>, String)> {
    let agent = ureq::AgentBuilder::new().timeout(POST_TIMEOUT).build();
    match agent
        .post(url)
        .set("Content-Type", "application/json")
        .set(
            "User-Agent",
            concat!("towalink-tlm/", env!("CARGO_PKG_VERSION")),
        )
        .send_string(body)
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, _)) => Err((Some(code), format!("HTTP {code}"))),
        Err(error) => Err((None, error.to_string())),
    }
}

/// The courier's loop: the oldest alert first, retried with backoff until it is taken,
/// refused for good, or older than [`GIVE_UP_AFTER`].
fn deliver(url: &str, queue: &(Mutex<VecDeque<Parcel>>, Condvar), shutdown: &Shutdown) {
    let (lock, ready) = queue;
    while !shutdown.is_triggered() {
        let parcel = {
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (mut guard, _) = ready
                .wait_timeout_while(guard, Duration::from_millis(200), |q| q.is_empty())
                .unwrap_or_else(|e| e.into_inner());
            match guard.pop_front() {
                Some(parcel) => parcel,
                None => continue,
            }
        };
        let mut parcel = parcel;
        match post(url, &parcel.body) {
            Ok(()) => {
                tracing::debug!(%url, attempts = parcel.attempts + 1, "alert delivered");
            }
            Err((status, error)) => {
                parcel.attempts += 1;
                if !worth_retrying(status) {
                    tracing::error!(%url, %error, "the receiver refused the alert; dropped");
                } else if parcel.queued.elapsed() >= GIVE_UP_AFTER {
                    tracing::error!(%url, %error, "alert not delivered within a day; dropped");
                } else {
                    let wait = retry_after(parcel.attempts - 1);
                    tracing::warn!(%url, %error, attempt = parcel.attempts, retry_in_s = wait.as_secs(), "cannot deliver an alert");
                    lock.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_front(parcel);
                    if shutdown.sleep(wait) {
                        return;
                    }
                }
            }
        }
    }
}

/// The alert loop of `tlm serve`, once a second until `shutdown`.
pub fn run(fleet: &Fleet, started_ms: u64, shutdown: &Shutdown) {
    let store = fleet.store();
    let path = records::alerts_path(store);
    let mut state: AlertState = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let mut couriers: BTreeMap<String, Courier> = BTreeMap::new();
    let mut settings: Option<AlertSettings> = None;
    let mut last_error = String::new();
    loop {
        match crate::store::keys::alert_settings(store) {
            Ok(read) => {
                if settings.as_ref() != Some(&read) {
                    tracing::info!(
                        webhooks = read.webhooks.len(),
                        unreachable_after_s = read.unreachable_after_s,
                        bgp_down_after_s = read.bgp_down_after_s,
                        "alert settings"
                    );
                }
                couriers.retain(|url, _| read.webhooks.contains(url));
                for url in &read.webhooks {
                    if !couriers.contains_key(url) {
                        couriers.insert(url.clone(), Courier::start(url.clone(), shutdown.clone()));
                    }
                }
                settings = Some(read);
                last_error.clear();
            }
            Err(error) => {
                let text = error.to_string();
                if text != last_error {
                    tracing::error!(%error, "cannot read the alert settings; keeping the last ones");
                    last_error = text;
                }
            }
        }
        if let Some(settings) = &settings {
            let before = state.clone();
            let alerts = observe(
                &mut state,
                settings,
                &fleet.fleet_nodes(),
                records::now_ms(),
                started_ms,
                fleet.settings.report_interval_s,
            );
            for alert in &alerts {
                match alert.status {
                    AlertStatus::Firing => {
                        tracing::warn!(alert = ?alert.alert, node = %alert.node, summary = %alert.summary, "alert")
                    }
                    AlertStatus::Resolved => {
                        tracing::info!(alert = ?alert.alert, node = %alert.node, summary = %alert.summary, "alert resolved")
                    }
                }
                for courier in couriers.values() {
                    courier.send(alert);
                }
            }
            if state != before {
                let bytes = serde_json::to_vec_pretty(&state).expect("alert state serializes");
                if let Err(error) = records::write_soft(&path, &bytes) {
                    tracing::error!(%error, "cannot write status/alerts.json");
                }
            }
        }
        if shutdown.sleep(Duration::from_secs(1)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::records::NodeRecord;
    use towalink_bundle::messages::{BgpSession, NodeReport, RollbackReport};

    const S: u64 = 1000;

    fn settings() -> AlertSettings {
        AlertSettings {
            webhooks: vec![],
            unreachable_after_s: 60,
            bgp_down_after_s: 30,
        }
    }

    fn node(seen_ms: Option<u64>, report: NodeReport, desired: Option<u32>) -> FleetNode {
        FleetNode {
            name: "r.s1".into(),
            id: 1,
            latest: Some(3),
            desired: desired.map(|v| (v, 1)),
            record: seen_ms.map(|t| NodeRecord {
                node: "r.s1".into(),
                node_id: 1,
                last_seen_ms: t,
                endpoint: None,
                via_key: None,
                report,
            }),
        }
    }

    fn bgp(info: &str) -> NodeReport {
        NodeReport {
            active_version: Some(2),
            state: Some(SlotState::Good),
            bgp: vec![BgpSession {
                name: "peer2".into(),
                state: "up".into(),
                info: info.into(),
            }],
            ..NodeReport::default()
        }
    }

    fn kinds(alerts: &[Alert]) -> Vec<(AlertKind, AlertStatus)> {
        alerts.iter().map(|a| (a.alert, a.status)).collect()
    }

    #[test]
    fn a_silent_node_fires_after_the_threshold_once_and_resolves_when_it_reports() {
        let mut state = AlertState::default();
        let t0 = 1_000_000 * S;
        let report = bgp("Established");
        let observe_at = |state: &mut AlertState, now: u64, seen: u64| {
            observe(
                state,
                &settings(),
                &[node(Some(seen), report.clone(), None)],
                now,
                t0,
                5,
            )
        };
        assert!(observe_at(&mut state, t0 + 59 * S, t0).is_empty());
        let fired = observe_at(&mut state, t0 + 60 * S, t0);
        assert_eq!(
            kinds(&fired),
            [(AlertKind::NodeUnreachable, AlertStatus::Firing)]
        );
        assert_eq!(fired[0].since, t0 / S);
        assert_eq!(fired[0].summary, "r.s1 has not reported for 60s");
        assert!(
            observe_at(&mut state, t0 + 600 * S, t0).is_empty(),
            "told once"
        );
        let back = observe_at(&mut state, t0 + 601 * S, t0 + 600 * S);
        assert_eq!(
            kinds(&back),
            [(AlertKind::NodeUnreachable, AlertStatus::Resolved)]
        );
        assert!(state.conditions.is_empty());
        // Never heard at all: silent since the service started.
        let mut fresh = AlertState::default();
        let never = observe(
            &mut fresh,
            &settings(),
            &[node(None, NodeReport::default(), None)],
            t0 + 60 * S,
            t0,
            5,
        );
        assert!(
            never[0].summary.contains("since the service started"),
            "{never:?}"
        );
    }

    #[test]
    fn a_session_down_past_the_threshold_fires_and_resolves_when_established() {
        let mut state = AlertState::default();
        let t0 = 1_000_000 * S;
        let at = |state: &mut AlertState, now: u64, info: &str| {
            observe(
                state,
                &settings(),
                &[node(Some(now), bgp(info), None)],
                now,
                t0,
                5,
            )
        };
        assert!(at(&mut state, t0, "Established").is_empty());
        assert!(at(&mut state, t0 + S, "Active").is_empty(), "not yet");
        assert!(
            at(&mut state, t0 + 30 * S, "Active").is_empty(),
            "29 s down"
        );
        let fired = at(&mut state, t0 + 31 * S, "Connect");
        assert_eq!(
            kinds(&fired),
            [(AlertKind::BgpSessionDown, AlertStatus::Firing)]
        );
        assert_eq!(fired[0].subject.as_deref(), Some("peer2"));
        assert!(at(&mut state, t0 + 40 * S, "Active").is_empty());
        let up = at(&mut state, t0 + 41 * S, "Established");
        assert_eq!(
            kinds(&up),
            [(AlertKind::BgpSessionDown, AlertStatus::Resolved)]
        );
        // A short flap never fires.
        assert!(at(&mut state, t0 + 50 * S, "Active").is_empty());
        assert!(at(&mut state, t0 + 60 * S, "Established").is_empty());
        assert!(state.conditions.is_empty());
    }

    #[test]
    fn a_silent_nodes_stale_sessions_are_not_judged() {
        let mut state = AlertState::default();
        let t0 = 1_000_000 * S;
        // Last report at t0 said Active; the node is silent since.
        let alerts = observe(
            &mut state,
            &settings(),
            &[node(Some(t0), bgp("Active"), None)],
            t0 + 100 * S,
            t0,
            5,
        );
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::NodeUnreachable, AlertStatus::Firing)]
        );
    }

    #[test]
    fn a_rollback_is_told_once_and_over_when_the_node_runs_what_it_was_told() {
        let mut state = AlertState::default();
        let t0 = 1_000_000 * S;
        let rolled = |time: u64, active: u32| NodeReport {
            active_version: Some(active),
            state: Some(SlotState::Good),
            last_rollback: Some(RollbackReport {
                time,
                from_version: Some(3),
                to_version: Some(2),
                reason: "v3 did not pass its health checks".into(),
            }),
            ..NodeReport::default()
        };
        // A rollback from before the service started (and no saved state) is not news.
        let old = observe(
            &mut state,
            &settings(),
            &[node(Some(t0), rolled(t0 / S - 10, 2), Some(2))],
            t0,
            t0,
            5,
        );
        assert!(old.is_empty(), "{old:?}");
        // One after it is.
        let at = t0 + 10 * S;
        let fired = observe(
            &mut state,
            &settings(),
            &[node(Some(at), rolled(at / S, 2), Some(3))],
            at,
            t0,
            5,
        );
        assert_eq!(
            kinds(&fired),
            [(AlertKind::NodeRolledBack, AlertStatus::Firing)]
        );
        assert_eq!(fired[0].subject.as_deref(), Some("v3"));
        assert!(
            fired[0]
                .summary
                .contains("rolled back from v3 to v2: v3 did not pass"),
            "{}",
            fired[0].summary
        );
        let again = observe(
            &mut state,
            &settings(),
            &[node(Some(at + S), rolled(at / S, 2), Some(3))],
            at + S,
            t0,
            5,
        );
        assert!(again.is_empty(), "told once: {again:?}");
        // The operator orders v2 again: the node runs what it was told.
        let over = observe(
            &mut state,
            &settings(),
            &[node(Some(at + 2 * S), rolled(at / S, 2), Some(2))],
            at + 2 * S,
            t0,
            5,
        );
        assert_eq!(
            kinds(&over),
            [(AlertKind::NodeRolledBack, AlertStatus::Resolved)]
        );
        // A saved state survives a restart: the same rollback is not told again.
        let saved: AlertState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let mut restarted = saved;
        let later = t0 + 1000 * S;
        assert!(observe(
            &mut restarted,
            &settings(),
            &[node(Some(later), rolled(at / S, 2), Some(3))],
            later,
            later,
            5
        )
        .is_empty());
    }

    #[test]
    fn a_removed_node_resolves_its_alerts() {
        let mut state = AlertState::default();
        let t0 = 1_000_000 * S;
        observe(
            &mut state,
            &settings(),
            &[node(Some(t0), bgp("Established"), None)],
            t0 + 100 * S,
            t0,
            5,
        );
        assert_eq!(state.firing().count(), 1);
        let gone = observe(&mut state, &settings(), &[], t0 + 101 * S, t0, 5);
        assert_eq!(
            kinds(&gone),
            [(AlertKind::NodeUnreachable, AlertStatus::Resolved)]
        );
        assert!(state.conditions.is_empty());
    }

    #[test]
    fn retries_back_off_to_five_minutes_and_only_for_what_may_pass_later() {
        let waits: Vec<u64> = (0..12).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert!(worth_retrying(None));
        assert!(worth_retrying(Some(503)));
        assert!(worth_retrying(Some(429)));
        assert!(!worth_retrying(Some(404)));
        assert!(!worth_retrying(Some(400)));
    }

    #[test]
    fn settings_are_read_from_the_attributes_with_their_defaults() {
        use crate::model::attributes::Level;
        let table = |text: &str| -> toml::Table { text.parse().unwrap() };
        let empty = table("");
        let merged = Merged::from_layers([(Level::Global, &empty)]);
        assert_eq!(
            AlertSettings::from_attributes(&merged).unwrap(),
            AlertSettings {
                webhooks: vec![],
                unreachable_after_s: UNREACHABLE_AFTER_S,
                bgp_down_after_s: BGP_DOWN_AFTER_S
            }
        );
        let set =
            table("alert_webhooks = [\"https://hooks.example/x\"]\nalert_bgp_down_after_s = 10");
        let merged = Merged::from_layers([(Level::Global, &set)]);
        let read = AlertSettings::from_attributes(&merged).unwrap();
        assert_eq!(read.webhooks, ["https://hooks.example/x"]);
        assert_eq!(read.bgp_down_after_s, 10);
        let bad = table("alert_webhooks = [\"ftp://x\"]");
        let merged = Merged::from_layers([(Level::Global, &bad)]);
        let error = AlertSettings::from_attributes(&merged)
            .unwrap_err()
            .to_string();
        assert!(error.contains("alert_webhooks"), "{error}");
    }
}
