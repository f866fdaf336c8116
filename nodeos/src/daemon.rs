//! The daemon (`towalink-node run`): a state machine that decides, and a loop that does.
//!
//! [`Daemon::step`] is pure, in the manner of boringtun's `Tunn`: it is told what was
//! observed ([`Observed`]) and answers with what to do ([`Action`]); [`run`] observes the
//! node, performs the actions and feeds their outcomes back, one round per interval:
//!
//! 1. [`Observed::Round`]: what the active version and the identity want of the data plane.
//!    The daemon asks for a reconciliation when that differs from what it applied last, or
//!    when an endpoint that did not resolve is due for another try (every
//!    [`RETRY_ROUNDS`] rounds), or when endpoints naming hosts are due to be resolved again
//!    (every [`RESOLVE_ROUNDS`] rounds). The management link's settings are the management
//!    thread's choice ([`crate::management::LinkChoice`]).
//! 2. [`Observed::Reconciled`], [`Observed::Counters`]: the links' traffic counters become the
//!    tunnel reports the management thread sends.
//! 3. [`Action::Check`]: the lifecycle check (bless or roll back a pending version).
//! 4. [`Observed::Checked`]: the disk state and the BGP sessions after the check; when they
//!    differ from the last seen ([`PartialEq`]), the management thread is told to report at
//!    once ([`Action::Notify`]).
//!
//! The loop ends when `shutdown` is triggered (SIGTERM or SIGINT:
//! [`towalink_system::stop_on_signals`]); the in-process tunnels go down with the daemon, as
//! they do when it is killed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use towalink_bundle::messages::TunnelReport;
use towalink_system::Shutdown;

use crate::dataplane::ReconcileReport;
use crate::dataplane::{Batched, Boringtun, DataPlane, DesiredState, KernelWireGuard, LinkStats};
use crate::lifecycle::{Node, Watch};
use crate::management::{self, Shared};
use crate::slots::DiskState;

/// Rounds between two reconciliations while an endpoint does not resolve or the last one
/// failed.
pub const RETRY_ROUNDS: u32 = 10;

/// Rounds between two reconciliations of a state whose endpoints name hosts (resolved again:
/// dynamic DNS).
pub const RESOLVE_ROUNDS: u32 = 60;

pub use towalink_bundle::messages::BgpSession;

/// What a report to the controller is about: when it changes, the node reports at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    /// The slots on disk (none when they cannot be read).
    pub disk: Option<DiskState>,
    pub bgp: Vec<BgpSession>,
}

/// What the loop observed, or what an action it performed came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A round begins: the data plane the active version and the identity want, or why it
    /// cannot be read; `None` when the daemon drives no data plane (`--dataplane none`).
    Round(Option<Result<DesiredState, String>>),
    /// What [`Action::Reconcile`] did.
    Reconciled(Result<ReconcileReport, String>),
    /// The counters [`Action::ReadCounters`] could read, in the order asked.
    Counters(Vec<(String, LinkStats)>),
    /// After [`Action::Check`]: what the node reports on.
    Checked(Reported),
}

/// What the daemon wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make the links, addresses and loopbacks match this state.
    Reconcile(DesiredState),
    /// Read the traffic counters of these links.
    ReadCounters(Vec<String>),
    /// Hand these tunnel reports to the management thread.
    PublishTunnels(Vec<TunnelReport>),
    /// Run the lifecycle check (bless or roll back a pending version).
    Check,
    /// Tell the management thread that the node's state changed (report now).
    Notify,
}

/// The daemon's decisions and what it remembers between rounds. No I/O.
#[derive(Debug, Default)]
pub struct Daemon {
    /// The state the data plane was last reconciled to.
    applied: Option<DesiredState>,
    /// The state a reconciliation was asked for and has not come back yet.
    reconciling: Option<DesiredState>,
    /// Rounds left until the next reconciliation of an unchanged state (none: not needed).
    retry_in: Option<u32>,
    /// Per link: the receive counter last seen and when it last grew.
    last_rx: BTreeMap<String, (u64, Instant)>,
    /// What was last reported on.
    reported: Option<Reported>,
}

impl Daemon {
    pub fn new() -> Daemon {
        Daemon::default()
    }

    /// What to do about `observed`, at `now`.
    pub fn step(&mut self, now: Instant, observed: Observed) -> Vec<Action> {
        match observed {
            Observed::Round(None) => vec![Action::Check],
            Observed::Round(Some(Err(error))) => {
                tracing::error!(%error, "cannot read the active version");
                vec![Action::Check]
            }
            Observed::Round(Some(Ok(desired))) => {
                let due = match &mut self.retry_in {
                    Some(rounds) => {
                        *rounds = rounds.saturating_sub(1);
                        *rounds == 0
                    }
                    None => false,
                };
                if self.applied.as_ref() != Some(&desired) || due {
                    self.reconciling = Some(desired.clone());
                    vec![Action::Reconcile(desired)]
                } else {
                    self.read_counters()
                }
            }
            Observed::Reconciled(Ok(report)) => {
                if report.changed() {
                    tracing::info!(created = ?report.created, reconfigured = ?report.reconfigured, removed = ?report.removed, "data plane reconciled");
                }
                self.applied = self.reconciling.take().or(self.applied.take());
                // Names are resolved again now and then: a site on dynamic DNS, a
                // controller that moved.
                self.retry_in = if !report.unresolved.is_empty() {
                    Some(RETRY_ROUNDS)
                } else if self.applied.as_ref().is_some_and(DesiredState::names_hosts) {
                    Some(RESOLVE_ROUNDS)
                } else {
                    None
                };
                self.read_counters()
            }
            Observed::Reconciled(Err(error)) => {
                tracing::error!(%error, "data plane reconciliation failed");
                self.retry_in = Some(RETRY_ROUNDS);
                self.reconciling = None;
                self.read_counters()
            }
            Observed::Counters(counters) => {
                vec![
                    Action::PublishTunnels(self.tunnel_reports(now, counters)),
                    Action::Check,
                ]
            }
            Observed::Checked(reported) => {
                if self.reported.as_ref() == Some(&reported) {
                    Vec::new()
                } else {
                    self.reported = Some(reported);
                    vec![Action::Notify]
                }
            }
        }
    }

    /// The links of the applied state: the peers' (in name order), then the management link.
    fn read_counters(&self) -> Vec<Action> {
        match &self.applied {
            Some(applied) => {
                let names = applied
                    .links
                    .keys()
                    .cloned()
                    .chain(
                        applied
                            .management
                            .as_ref()
                            .map(|m| m.wireguard.name.clone()),
                    )
                    .collect();
                vec![Action::ReadCounters(names)]
            }
            None => vec![Action::PublishTunnels(Vec::new()), Action::Check],
        }
    }

    /// Counters of the node's links, with how long ago each last received something.
    fn tunnel_reports(
        &mut self,
        now: Instant,
        counters: Vec<(String, LinkStats)>,
    ) -> Vec<TunnelReport> {
        let reports: Vec<TunnelReport> = counters
            .into_iter()
            .map(|(name, stats)| {
                let entry = self.last_rx.entry(name.clone()).or_insert((0, now));
                if stats.rx_bytes != entry.0 {
                    *entry = (stats.rx_bytes, now);
                }
                TunnelReport {
                    interface: name,
                    rx_bytes: stats.rx_bytes,
                    tx_bytes: stats.tx_bytes,
                    last_rx_age_s: (stats.rx_bytes > 0)
                        .then(|| now.saturating_duration_since(entry.1).as_secs()),
                }
            })
            .collect();
        self.last_rx
            .retain(|name, _| reports.iter().any(|r| &r.interface == name));
        reports
    }
}

/// The WireGuard implementation the daemon drives (`--dataplane`).
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum DataPlaneKind {
    Auto,
    /// In-process WireGuard with batched I/O and TUN offloads (`towalink_netdev::Batched`).
    Batched,
    /// boringtun's own in-process device.
    Boringtun,
    Kernel,
    None,
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directories whose subdirectories may hold `towalink-recovery/` (mounted boot media).
    pub recovery_media: Vec<std::path::PathBuf>,
    pub dataplane: DataPlaneKind,
    /// Do the start-up work and one round, then return.
    pub once: bool,
    /// Time between rounds (a round starts early when the management thread changed something).
    pub interval: Duration,
    /// Addresses the metrics are served on besides the management link (`--metrics-listen`).
    pub metrics_listen: Vec<std::net::SocketAddr>,
}

fn open_dataplane(kind: DataPlaneKind) -> Result<Option<DataPlane>, crate::Error> {
    Ok(match kind {
        DataPlaneKind::Batched => Some(DataPlane::new(Box::new(Batched::new()))?),
        DataPlaneKind::Boringtun => Some(DataPlane::new(Box::new(Boringtun::new()))?),
        DataPlaneKind::Kernel => Some(DataPlane::new(Box::new(KernelWireGuard::probe()?))?),
        DataPlaneKind::Auto => Some(match KernelWireGuard::probe() {
            Ok(kernel) => {
                tracing::info!("WireGuard: kernel module");
                DataPlane::new(Box::new(kernel))?
            }
            Err(reason) => {
                tracing::info!(%reason, "WireGuard: in-process batched");
                DataPlane::new(Box::new(Batched::new()))?
            }
        }),
        DataPlaneKind::None => None,
    })
}

/// The daemon: recover from disk, start the management thread (when the identity has a
/// management link), then one round per interval until `shutdown` is triggered.
pub fn run(node: Node, options: Options, shutdown: &Shutdown) -> anyhow::Result<()> {
    crate::dataplane::netlink::enable_forwarding();
    node.startup()?;
    let mut dataplane = open_dataplane(options.dataplane)?;
    let shared = Arc::new(Shared::default());
    // Bound before anything else starts: an address that cannot be used is refused at once.
    let metrics_listeners = options
        .metrics_listen
        .iter()
        .map(|address| {
            std::net::TcpListener::bind(address)
                .with_context(|| format!("--metrics-listen {address}: cannot listen"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let on_management_link = node.controller_api().is_some() && dataplane.is_some();
    if !options.once && (on_management_link || !metrics_listeners.is_empty()) {
        let (node, shared, shutdown) = (node.clone(), Arc::clone(&shared), shutdown.clone());
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                crate::metrics::serve(
                    node,
                    shared,
                    metrics_listeners,
                    on_management_link,
                    &shutdown,
                )
            })
            .context("cannot start the metrics thread")?;
    }
    let mut sshd = None;
    if !options.once && on_management_link {
        let (node, shutdown) = (node.clone(), shutdown.clone());
        sshd = Some(
            std::thread::Builder::new()
                .name("sshd".into())
                .spawn(move || {
                    crate::sshd::supervise(
                        node,
                        || crate::dataplane::management_address().map(|(address, _)| address),
                        &shutdown,
                    )
                })
                .context("cannot start the sshd thread")?,
        );
    }
    match node.controller_api() {
        Some(api) if !options.once => {
            let node = node.clone();
            let recovery_media = options.recovery_media.clone();
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("management".into())
                .spawn(move || management::run(node, shared, recovery_media))
                .context("cannot start the management thread")?;
            tracing::info!(%api, "syncing with the controller through the management link");
        }
        Some(_) => {}
        None => {
            tracing::info!("no management link in the identity: running without a controller")
        }
    }
    let mut daemon = Daemon::new();
    let mut watch = Watch::default();
    // Whether the last reconciliation resolved the management link's endpoint.
    let mut link_resolved = true;
    while !shutdown.is_triggered() {
        let seen = shared.generation.load(Ordering::SeqCst);
        // The management link's settings as the management thread chose them, and their number.
        let (chosen, link_number) = shared
            .link
            .lock()
            .map(|link| link.clone())
            .unwrap_or_default();
        let round = dataplane.as_ref().map(|_| {
            // The tunnels follow the current version; the management link the chosen settings.
            node.desired_dataplane(chosen.as_ref())
                .map_err(|e| e.to_string())
        });
        // Without a data plane (`--dataplane none`) the host routes the management traffic:
        // whatever was chosen is in effect.
        let mut applied = link_resolved && round.as_ref().is_none_or(|r| r.is_ok());
        let mut actions = VecDeque::from(daemon.step(Instant::now(), Observed::Round(round)));
        while let Some(action) = actions.pop_front() {
            let outcome = match action {
                // Invariant: the daemon asks for reconciliations and counters only after a
                // round that had a data plane.
                Action::Reconcile(desired) => {
                    let dataplane = dataplane.as_mut().expect("only asked with a data plane");
                    let report = dataplane.reconcile(&desired).map_err(|e| e.to_string());
                    // A management link whose endpoint did not resolve still talks through
                    // its previous one (kernel WireGuard keeps it): not applied.
                    let management = desired.management.as_ref().map(|m| &m.wireguard.name);
                    link_resolved = report
                        .as_ref()
                        .is_ok_and(|r| !management.is_some_and(|name| r.unresolved.contains(name)));
                    applied &= link_resolved;
                    if applied {
                        shared.link_applied.store(link_number, Ordering::SeqCst);
                    }
                    Some(Observed::Reconciled(report))
                }
                Action::ReadCounters(names) => {
                    let dataplane = dataplane.as_mut().expect("only asked with a data plane");
                    let counters = names
                        .into_iter()
                        .filter_map(|name| Some((name.clone(), dataplane.stats(&name).ok()?)))
                        .collect();
                    Some(Observed::Counters(counters))
                }
                Action::PublishTunnels(tunnels) => {
                    if let Ok(mut shared_tunnels) = shared.tunnels.lock() {
                        *shared_tunnels = tunnels;
                    }
                    None
                }
                Action::Check => {
                    if let Err(error) = node.tick(&mut watch) {
                        tracing::error!(%error, "check failed");
                    }
                    Some(Observed::Checked(reported(&node)))
                }
                Action::Notify => {
                    shared.changed();
                    None
                }
            };
            if let Some(observed) = outcome {
                actions.extend(daemon.step(Instant::now(), observed));
            }
        }
        if applied {
            shared.link_applied.store(link_number, Ordering::SeqCst);
        }
        if options.once {
            break;
        }
        // Sleep, but wake early when the management thread changed something or on shutdown.
        let until = Instant::now() + options.interval;
        while Instant::now() < until && shared.generation.load(Ordering::SeqCst) == seen {
            if shutdown.sleep(Duration::from_millis(25)) {
                break;
            }
        }
    }
    if shutdown.is_triggered() {
        tracing::info!("stopping");
    }
    // The management sshd's listener closes before the daemon exits.
    if let Some(thread) = sshd {
        let _ = thread.join();
    }
    // Dropping the data plane takes the in-process tunnels down (kernel links stay, as
    // they do when the daemon is killed; the next start adopts them).
    drop(dataplane);
    Ok(())
}

/// The disk state and the BGP sessions (BIRD not answering: none).
fn reported(node: &Node) -> Reported {
    let bgp = node.reloader.bird.bgp_sessions();
    Reported {
        disk: node.state.read().ok(),
        bgp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{DesiredLink, ManagementLink, WireGuardLink};
    use crate::slots::Slot;

    fn wireguard(name: &str, endpoint: Option<&str>) -> WireGuardLink {
        WireGuardLink {
            name: name.to_string(),
            private_key_hex: "11".repeat(32),
            listen_port: 51822,
            peer_public_key_hex: "22".repeat(32),
            endpoint: endpoint.map(str::to_string),
            keepalive: 25,
        }
    }

    /// A version with links to the given peers and the management link.
    fn desired(peers: &[&str]) -> DesiredState {
        let links = peers
            .iter()
            .map(|name| {
                let link = DesiredLink {
                    wireguard: wireguard(name, Some("192.0.2.2:51821")),
                    mtu: 1420,
                    local_ipv4: "10.254.0.1".parse().unwrap(),
                    peer_ipv4: "10.254.0.2".parse().unwrap(),
                    local_link_local: "fe80::1:0:2".parse().unwrap(),
                };
                (name.to_string(), link)
            })
            .collect();
        DesiredState {
            loopback_ipv4: Some("10.254.0.1".parse().unwrap()),
            loopback_ipv6: None,
            links,
            management: Some(ManagementLink {
                wireguard: wireguard("tlmgmt", None),
                endpoints: vec!["controller.example:51820".into()],
                address: "fd00::2".parse().unwrap(),
                controller_address: "fd00::1".parse().unwrap(),
            }),
        }
    }

    fn round(state: &DesiredState) -> Observed {
        Observed::Round(Some(Ok(state.clone())))
    }

    fn reconciled(unresolved: &[&str]) -> Observed {
        Observed::Reconciled(Ok(ReconcileReport {
            created: vec!["tlwg2".into()],
            unresolved: unresolved.iter().map(|s| s.to_string()).collect(),
            ..ReconcileReport::default()
        }))
    }

    fn counters(links: &[(&str, u64)]) -> Observed {
        Observed::Counters(
            links
                .iter()
                .map(|&(name, rx)| {
                    let stats = LinkStats {
                        rx_bytes: rx,
                        tx_bytes: 7,
                    };
                    (name.to_string(), stats)
                })
                .collect(),
        )
    }

    fn reported(current: Option<Slot>, bgp_state: &str) -> Reported {
        Reported {
            disk: Some(DiskState {
                current,
                ..DiskState::default()
            }),
            bgp: vec![BgpSession {
                name: "peer2".into(),
                state: "up".into(),
                info: bgp_state.into(),
            }],
        }
    }

    /// Steps a whole round the way `run` does, each action's outcome given by `answer`.
    fn whole_round(
        daemon: &mut Daemon,
        now: Instant,
        first: Observed,
        mut answer: impl FnMut(&Action) -> Option<Observed>,
    ) -> Vec<Action> {
        let mut done = Vec::new();
        let mut queue = VecDeque::from(daemon.step(now, first));
        while let Some(action) = queue.pop_front() {
            if let Some(observed) = answer(&action) {
                queue.extend(daemon.step(now, observed));
            }
            done.push(action);
        }
        done
    }

    #[test]
    fn a_round_reconciles_reads_counters_checks_and_reports_a_change() {
        let mut daemon = Daemon::new();
        let now = Instant::now();
        let v1 = desired(&["tlwg2", "tlwg3"]);
        assert_eq!(
            daemon.step(now, round(&v1)),
            [Action::Reconcile(v1.clone())]
        );
        assert_eq!(
            daemon.step(now, reconciled(&[])),
            [Action::ReadCounters(vec![
                "tlwg2".into(),
                "tlwg3".into(),
                "tlmgmt".into()
            ])],
            "the peers' links in name order, then the management link"
        );
        let actions = daemon.step(now, counters(&[("tlwg2", 100), ("tlmgmt", 0)]));
        let [Action::PublishTunnels(tunnels), Action::Check] = &actions[..] else {
            panic!("{actions:?}");
        };
        let names: Vec<&str> = tunnels.iter().map(|t| t.interface.as_str()).collect();
        assert_eq!(
            names,
            ["tlwg2", "tlmgmt"],
            "only the links that could be read"
        );
        assert_eq!(tunnels[0].last_rx_age_s, Some(0));
        assert_eq!(tunnels[1].last_rx_age_s, None, "nothing received yet");
        assert_eq!(
            daemon.step(
                now,
                Observed::Checked(reported(Some(Slot::A), "Established"))
            ),
            [Action::Notify],
            "the first state seen is news"
        );
    }

    #[test]
    fn an_unchanged_version_is_not_reconciled_again_and_an_unchanged_state_not_reported() {
        let mut daemon = Daemon::new();
        let now = Instant::now();
        let v1 = desired(&["tlwg2"]);
        let state = reported(Some(Slot::A), "Established");
        let answer = |action: &Action| match action {
            Action::Reconcile(_) => Some(reconciled(&[])),
            Action::ReadCounters(_) => Some(counters(&[("tlwg2", 5)])),
            Action::Check => Some(Observed::Checked(state.clone())),
            _ => None,
        };
        let first = whole_round(&mut daemon, now, round(&v1), answer);
        assert!(first.contains(&Action::Reconcile(v1.clone())), "{first:?}");
        assert!(first.contains(&Action::Notify), "{first:?}");
        for _ in 0..3 * RETRY_ROUNDS {
            let again = whole_round(&mut daemon, now, round(&v1), answer);
            assert!(
                !again
                    .iter()
                    .any(|a| matches!(a, Action::Reconcile(_) | Action::Notify)),
                "{again:?}"
            );
            assert!(again.contains(&Action::Check), "{again:?}");
        }
        // The disk state or a BGP session changes: reported once.
        let changed = reported(Some(Slot::A), "Active");
        assert_eq!(
            daemon.step(now, Observed::Checked(changed.clone())),
            [Action::Notify]
        );
        assert_eq!(daemon.step(now, Observed::Checked(changed)), []);
        assert_eq!(
            daemon.step(now, Observed::Checked(reported(Some(Slot::B), "Active"))),
            [Action::Notify]
        );
    }

    #[test]
    fn a_new_version_is_reconciled_and_its_links_counted() {
        let mut daemon = Daemon::new();
        let now = Instant::now();
        let v1 = desired(&["tlwg2"]);
        let v2 = desired(&["tlwg3"]);
        daemon.step(now, round(&v1));
        daemon.step(now, reconciled(&[]));
        assert_eq!(
            daemon.step(now, round(&v2)),
            [Action::Reconcile(v2.clone())]
        );
        assert_eq!(
            daemon.step(now, reconciled(&[])),
            [Action::ReadCounters(vec!["tlwg3".into(), "tlmgmt".into()])]
        );
        assert_eq!(daemon.step(now, round(&v2)).len(), 1);
        assert!(matches!(
            &daemon.step(now, round(&v2))[..],
            [Action::ReadCounters(_)]
        ));
    }

    #[test]
    fn an_unresolved_endpoint_is_retried_every_ten_rounds() {
        let mut daemon = Daemon::new();
        let now = Instant::now();
        let v1 = desired(&["tlwg2"]);
        daemon.step(now, round(&v1));
        daemon.step(now, reconciled(&["tlwg2"]));
        let mut reconciled_at = Vec::new();
        for n in 1..=2 * RETRY_ROUNDS {
            let actions = daemon.step(now, round(&v1));
            if actions == [Action::Reconcile(v1.clone())] {
                reconciled_at.push(n);
                // Still unresolved the first time, resolved the second.
                let unresolved: &[&str] = if reconciled_at.len() == 1 {
                    &["tlwg2"]
                } else {
                    &[]
                };
                daemon.step(now, reconciled(unresolved));
            }
        }
        assert_eq!(reconciled_at, [RETRY_ROUNDS, 2 * RETRY_ROUNDS]);
        for _ in 0..3 * RETRY_ROUNDS {
            assert!(matches!(
                &daemon.step(now, round(&v1))[..],
                [Action::ReadCounters(_)]
            ));
        }
    }

    #[test]
    fn endpoints_naming_hosts_are_resolved_again_every_minute_addresses_never() {
        let now = Instant::now();
        let reconciles = |state: &DesiredState| {
            let mut daemon = Daemon::new();
            daemon.step(now, round(state));
            daemon.step(now, reconciled(&[]));
            (1..=2 * RESOLVE_ROUNDS)
                .filter(|_| {
                    let asked =
                        daemon.step(now, round(state)) == [Action::Reconcile(state.clone())];
                    if asked {
                        daemon.step(now, reconciled(&[]));
                    }
                    asked
                })
                .count()
        };
        let named = desired(&["tlwg2"]);
        assert!(named.names_hosts());
        assert_eq!(reconciles(&named), 2);
        let mut addresses = named.clone();
        addresses.management.as_mut().unwrap().endpoints = vec!["[2001:db8::1]:51820".into()];
        assert!(!addresses.names_hosts());
        assert_eq!(reconciles(&addresses), 0);
    }

    #[test]
    fn a_failed_reconciliation_is_tried_again_and_the_last_applied_links_still_counted() {
        let mut daemon = Daemon::new();
        let now = Instant::now();
        let v1 = desired(&["tlwg2"]);
        let v2 = desired(&["tlwg2", "tlwg3"]);
        daemon.step(now, round(&v1));
        daemon.step(now, reconciled(&[]));
        daemon.step(now, round(&v2));
        assert_eq!(
            daemon.step(now, Observed::Reconciled(Err("no interface tlwg3".into()))),
            [Action::ReadCounters(vec!["tlwg2".into(), "tlmgmt".into()])],
            "the links of v1 are still the ones applied"
        );
        assert_eq!(
            daemon.step(now, round(&v2)),
            [Action::Reconcile(v2.clone())],
            "the next round tries again"
        );
        // Failing before anything was applied: nothing to count, the check still runs.
        let mut fresh = Daemon::new();
        fresh.step(now, round(&v1));
        assert_eq!(
            fresh.step(now, Observed::Reconciled(Err("netlink".into()))),
            [Action::PublishTunnels(Vec::new()), Action::Check]
        );
    }

    #[test]
    fn without_a_data_plane_or_a_readable_version_only_the_check_runs() {
        let mut daemon = Daemon::new();
        let now = Instant::now();
        assert_eq!(daemon.step(now, Observed::Round(None)), [Action::Check]);
        assert_eq!(
            daemon.step(
                now,
                Observed::Round(Some(Err("cannot read the current slot".into())))
            ),
            [Action::Check],
            "the tunnel reports stay as they were"
        );
    }

    #[test]
    fn tunnel_reports_say_how_long_ago_a_link_last_received() {
        let mut daemon = Daemon::new();
        let start = Instant::now();
        let v1 = desired(&["tlwg2", "tlwg3"]);
        daemon.step(start, round(&v1));
        daemon.step(start, reconciled(&[]));
        let ages = |daemon: &mut Daemon, at: Instant, links: &[(&str, u64)]| match &daemon
            .step(at, counters(links))[..]
        {
            [Action::PublishTunnels(tunnels), Action::Check] => tunnels
                .iter()
                .map(|t| (t.interface.clone(), t.last_rx_age_s))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(
            ages(&mut daemon, at(0), &[("tlwg2", 10), ("tlwg3", 0)]),
            [("tlwg2".into(), Some(0)), ("tlwg3".into(), None)]
        );
        assert_eq!(
            ages(&mut daemon, at(30), &[("tlwg2", 10), ("tlwg3", 5)]),
            [("tlwg2".into(), Some(30)), ("tlwg3".into(), Some(0))],
            "tlwg2 received nothing for 30 s; tlwg3 just received"
        );
        assert_eq!(
            ages(&mut daemon, at(40), &[("tlwg2", 11)]),
            [("tlwg2".into(), Some(0))]
        );
        // tlwg3 vanished from the reports and was forgotten: when it returns, it counts afresh.
        assert_eq!(
            ages(&mut daemon, at(50), &[("tlwg2", 11), ("tlwg3", 5)]),
            [("tlwg2".into(), Some(10)), ("tlwg3".into(), Some(0))]
        );
    }
}
