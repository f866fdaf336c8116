//! The service's view of the fleet: every node's management identity, committed versions and
//! activation order, reloaded when `tlm` changes the configuration directory; the nodes'
//! underlay endpoints as the management hub last saw them; and the long-poll rendezvous
//! between nodes waiting for news and those changes.
//!
//! Only [`Fleet::reload`] reads the disk; everything else works on the view in memory, so the
//! API's router ([`super::api::route`]) can ask it questions without I/O, and tests can set
//! a view with [`Fleet::publish`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use towalink_bundle::messages::{NodeReport, Order, SyncReply};
use towalink_bundle::orders::{sign_reply, ReplyBody};
use towalink_bundle::SigningKey;

use super::metrics::FleetNode;
use super::records::NodeRecord;
use crate::model::management::ManagementSettings;
use crate::model::names::NodeFullName;
use crate::store::Store;
use crate::{store::versions, Error};
use towalink_system::durable::Secret;

/// How many versions a reply offers (the node keeps as many).
pub const OFFERED_VERSIONS: usize = 10;

/// One node as the service knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: NodeFullName,
    pub public_key: String,
    /// Committed versions, oldest first.
    pub versions: Vec<u32>,
    pub order: Option<Order>,
    /// The node's recovery token (`generated/secrets.toml`), sent to a node that reports
    /// holding another one.
    pub recovery_token: Option<Secret>,
    /// The key `tlm rotate node` replaced, while the node has not been heard on the new one
    /// (`generated/config.toml`'s `wg_public_key_previous`, unless the node's status record
    /// says it was heard on `public_key`).
    pub previous_key: Option<String>,
    /// The node's current WireGuard private key, sent to a node that reports not holding it.
    pub wg_private_key: Option<Secret>,
}

/// Whether a rotated node settled on its current key: a report that came through it, from a
/// blessed version whose links run with it. Until then its previous key may still be needed
/// (a version naming the new key rolled back before it was blessed). Pure.
pub fn settled_on(report: &NodeReport, via_key: Option<&str>, current: &str) -> bool {
    via_key == Some(current)
        && report.state == Some(towalink_bundle::messages::SlotState::Good)
        && report.wg_public_key.as_deref() == Some(current)
}

/// How long the hub keeps offering one of a rotated node's two keys after the node was last
/// heard on it (or since it was offered): longer than the management link's keepalive, so a
/// node that is there is always heard within it.
pub fn try_key(keepalive_s: u16) -> Duration {
    Duration::from_secs(u64::from(keepalive_s) + 10)
}

/// The key the hub offers for a node's management peer now. A node never rotated, or heard on
/// its current key since, gets its current key. A node in the middle of a rotation switches
/// to the new key when it activates a version naming it: while it is not heard for `try_for`
/// on the key offered, the hub offers the other one. `offered`: the key offered now and when
/// the node was last heard on it (or it was offered, if later). Pure.
pub fn management_key<'a>(
    entry: &'a NodeEntry,
    offered: Option<(&str, Instant)>,
    try_for: Duration,
    now: Instant,
) -> &'a str {
    let current = entry.public_key.as_str();
    let Some(previous) = entry.previous_key.as_deref() else {
        return current;
    };
    match offered {
        Some((key, heard)) if key == current || key == previous => {
            let other = if key == current { previous } else { current };
            let mine = if key == current { current } else { previous };
            if now.saturating_duration_since(heard) < try_for {
                mine
            } else {
                other
            }
        }
        _ => current,
    }
}

/// What the nodes should know, by node id.
#[derive(Debug, Default)]
pub struct View {
    pub generation: u64,
    pub nodes: BTreeMap<u32, NodeEntry>,
    /// The signing key (`certs/signing.key`) that signs every reply; none before the first
    /// commit made it (nodes refuse unsigned replies, and have nothing to take yet anyway).
    pub key: Option<SigningKey>,
    /// The service is stopping: long polls are answered at once.
    pub closing: bool,
}

/// What a reply offers and sends the node, decided before anything is signed.
struct ReplyContent<'a> {
    offered: Vec<u32>,
    token: Option<&'a Secret>,
    wg_key: Option<&'a Secret>,
    /// A version the node lacks among the offered ones, an order it has not carried out, or a
    /// key or token to send.
    news: bool,
}

fn reply_content<'a>(entry: &'a NodeEntry, report: &NodeReport) -> ReplyContent<'a> {
    let skip = entry.versions.len().saturating_sub(OFFERED_VERSIONS);
    let offered: Vec<u32> = entry.versions[skip..].to_vec();
    let missing = offered
        .iter()
        .any(|v| !report.installed_versions.contains(v));
    let new_order = entry
        .order
        .is_some_and(|o| report.order_done.as_ref().is_none_or(|d| o.seq > d.seq));
    // A node that says which keys it holds (nodes before key rotation do not) gets its
    // current private key when it lacks it, in the reply that may order a version naming it.
    let wg_key = entry.wg_private_key.as_ref().filter(|_| {
        !report.wg_public_keys.is_empty() && !report.wg_public_keys.contains(&entry.public_key)
    });
    // A node that says which token it holds (nodes before rotation do not) gets the current
    // one when it holds another.
    let token = entry.recovery_token.as_ref().filter(|token| {
        report
            .recovery_token_id
            .as_ref()
            .is_some_and(|id| *id != towalink_bundle::recovery::object_name(token.expose()))
    });
    ReplyContent {
        news: missing || new_order || token.is_some() || wg_key.is_some(),
        offered,
        token,
        wg_key,
    }
}

/// Whether a reply to this report would carry news (see [`reply_for`]), without building or
/// signing it: a waiting long poll asks this at every change and hang-up check. Pure.
pub fn has_news(entry: &NodeEntry, report: &NodeReport) -> bool {
    reply_content(entry, report).news
}

/// The reply a node gets, and whether it carries news (a version the node lacks among the
/// offered ones, or an order it has not carried out). Its content is signed for this node and
/// this report's nonce; the unsigned copy serves nodes before signed orders. Pure.
pub fn reply_for(
    id: u32,
    entry: &NodeEntry,
    report: &NodeReport,
    interval_s: u64,
    key: Option<&SigningKey>,
) -> (SyncReply, bool) {
    let ReplyContent {
        offered,
        token,
        wg_key,
        news,
    } = reply_content(entry, report);
    let signed = key.map(|key| {
        sign_reply(
            &ReplyBody {
                node_id: id,
                nonce: report.nonce.clone(),
                versions: offered.clone(),
                order: entry.order,
                report_interval_s: interval_s,
                recovery_token: token.map(|t| t.expose().to_string()),
                wg_private_key: wg_key.map(|k| k.expose().to_string()),
            },
            key,
        )
    });
    (
        SyncReply {
            versions: offered,
            order: entry.order,
            report_interval_s: interval_s,
            signed,
        },
        news,
    )
}

/// Files whose change makes the service reload. A commit publishes its versions after git
/// recorded them and then removes its journal: that removal is what announces them.
const WATCHED: [&str; 7] = [
    "generated/config.toml",
    crate::store::keys::SIGNING_KEY,
    "generated/secrets.toml",
    "effective/index.toml",
    "effective/activation.toml",
    versions::JOURNAL,
    versions::ACTIVATION_PENDING,
];

type Stamp = Vec<Option<(i64, i64, u64, u64)>>;

pub struct Fleet {
    store: Store,
    pub settings: ManagementSettings,
    view: Mutex<View>,
    changed: Condvar,
    stamp: Mutex<Stamp>,
    /// Node id → underlay address of its management peer, from the hub.
    endpoints: Mutex<BTreeMap<u32, String>>,
    /// Node id → the key the hub offers for its management peer, since when, and whether the
    /// node was heard since.
    offered: Mutex<BTreeMap<u32, Offered>>,
    /// Node id → its last report (also in `status/`; read from there once, at the first load).
    records: Mutex<BTreeMap<u32, NodeRecord>>,
    records_loaded: std::sync::atomic::AtomicBool,
}

/// The key the hub offers a node ([`management_key`]).
#[derive(Debug, Clone)]
struct Offered {
    key: String,
    /// When it was offered, or the node was last heard on it, whichever is later.
    heard: Instant,
    /// The peer's received bytes as the hub last read them.
    rx_bytes: u64,
}

fn stamp(store: &Store) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    WATCHED
        .iter()
        .map(|f| {
            std::fs::metadata(store.root().join(f))
                .ok()
                .map(|m| (m.mtime(), m.mtime_nsec(), m.ino(), m.len()))
        })
        .collect()
}

impl Fleet {
    pub fn new(store: Store, settings: ManagementSettings) -> Fleet {
        Fleet {
            store,
            settings,
            view: Mutex::new(View::default()),
            changed: Condvar::new(),
            stamp: Mutex::new(Vec::new()),
            endpoints: Mutex::default(),
            offered: Mutex::default(),
            records: Mutex::default(),
            records_loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Keeps a node's last report in memory (the metrics and the operator API read it).
    pub fn note(&self, record: NodeRecord) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.node_id, record);
    }

    /// Every node with its versions, order and last report, in id order.
    pub fn fleet_nodes(&self) -> Vec<FleetNode> {
        let view = self.view.lock().expect("fleet lock");
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        view.nodes
            .iter()
            .map(|(id, entry)| FleetNode {
                name: entry.name.to_string(),
                id: *id,
                latest: entry.versions.last().copied(),
                desired: entry.order.map(|o| (o.version, o.seq)),
                record: records.get(id).cloned(),
            })
            .collect()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Reloads when a watched file changed; returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        // An activation git has not recorded yet is not carried out (nor announced).
        if self
            .store
            .root()
            .join(versions::ACTIVATION_PENDING)
            .exists()
        {
            return Ok(false);
        }
        let now = stamp(&self.store);
        if *self.stamp.lock().expect("stamp lock") == now {
            return Ok(false);
        }
        self.reload()?;
        *self.stamp.lock().expect("stamp lock") = now;
        Ok(true)
    }

    /// Reads nodes, versions and orders from the directory and wakes every waiting node.
    pub fn reload(&self) -> Result<(), Error> {
        let generated = self.store.load_generated()?;
        let activations = versions::load_activations(&self.store)?;
        let secrets = self.store.load_secrets()?;
        let mut nodes = BTreeMap::new();
        for node in &generated.nodes {
            let name = node.full_name();
            let node_secrets = secrets.nodes.iter().find(|s| s.id == node.id);
            // The status record says which key the node was last heard on: once that is the
            // current one and the node blessed a version running with it, the previous key is
            // no longer offered (an old card stays out).
            let heard_on_current = super::records::read_node(&self.store, &name)
                .is_some_and(|r| settled_on(&r.report, r.via_key.as_deref(), &node.wg_public_key));
            // A private key whose public half is not the node's (a crash inside `tlm rotate
            // node`) is never sent.
            let private = node_secrets.map(|s| s.wg_private_key.clone()).filter(|k| {
                crate::model::allocation::public_key_of(k).as_deref()
                    == Some(node.wg_public_key.as_str())
            });
            let order = activations.nodes.get(&name.to_string()).map(|a| Order {
                seq: a.order,
                version: a.version,
                confirm_s: a.confirm_s,
            });
            nodes.insert(
                node.id,
                NodeEntry {
                    versions: versions::list_versions(&self.store, &name)?,
                    name,
                    public_key: node.wg_public_key.clone(),
                    order,
                    recovery_token: node_secrets.map(|s| s.recovery_token.clone()),
                    previous_key: node
                        .wg_public_key_previous
                        .clone()
                        .filter(|_| !heard_on_current),
                    wg_private_key: private,
                },
            );
        }
        if !self
            .records_loaded
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            for (id, entry) in &nodes {
                if let Some(record) = super::records::read_node(&self.store, &entry.name) {
                    records.entry(*id).or_insert(record);
                }
            }
        }
        let key = versions::load_signing_key(&self.store)?;
        self.publish(nodes, key);
        Ok(())
    }

    /// Makes `nodes` and `key` the view; wakes every waiting node when the nodes changed.
    pub fn publish(&self, nodes: BTreeMap<u32, NodeEntry>, key: Option<SigningKey>) {
        let mut view = self.view.lock().expect("fleet lock");
        view.key = key;
        if view.nodes != nodes {
            view.nodes = nodes;
            view.generation += 1;
            tracing::info!(
                nodes = view.nodes.len(),
                generation = view.generation,
                "fleet reloaded"
            );
            self.changed.notify_all();
        }
    }

    /// The service is stopping: every waiting long poll gets its reply now, and later ones
    /// at once (the node asks the next service again).
    pub fn close(&self) {
        self.view.lock().expect("fleet lock").closing = true;
        self.changed.notify_all();
    }

    /// Records where the hub last saw each node's management peer.
    pub fn set_endpoints(&self, endpoints: BTreeMap<u32, String>) {
        *self.endpoints.lock().unwrap_or_else(|e| e.into_inner()) = endpoints;
    }

    /// The node's underlay address as the hub last saw it.
    pub fn endpoint(&self, id: u32) -> Option<String> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn node(&self, id: u32) -> Option<NodeEntry> {
        self.view
            .lock()
            .expect("fleet lock")
            .nodes
            .get(&id)
            .cloned()
    }

    /// The id and the key to offer of every node's management peer ([`management_key`]).
    pub fn peers(&self) -> Vec<(u32, String)> {
        let view = self.view.lock().expect("fleet lock");
        let mut offered = self.offered.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let try_for = try_key(self.settings.keepalive_s);
        offered.retain(|id, _| view.nodes.contains_key(id));
        view.nodes
            .iter()
            .map(|(id, entry)| {
                let before = offered.get(id);
                let key = management_key(
                    entry,
                    before.map(|o| (o.key.as_str(), o.heard)),
                    try_for,
                    now,
                );
                if before.is_none_or(|o| o.key != key) {
                    if before.is_some() {
                        tracing::info!(node = %entry.name, public_key = key, "rotated node not heard: offering its other key");
                    }
                    offered.insert(
                        *id,
                        Offered {
                            key: key.to_string(),
                            heard: now,
                            rx_bytes: 0,
                        },
                    );
                }
                (*id, key.to_string())
            })
            .collect()
    }

    /// The hub read its peers' counters: a node whose peer received bytes since was heard on
    /// the key offered (keepalives count: WireGuard takes them only with the peer's key).
    pub fn received(&self, counters: impl IntoIterator<Item = (u32, u64)>) {
        let mut offered = self.offered.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for (id, rx_bytes) in counters {
            if let Some(o) = offered.get_mut(&id) {
                if rx_bytes > o.rx_bytes {
                    o.heard = now;
                }
                o.rx_bytes = rx_bytes;
            }
        }
    }

    /// A node was heard (its report arrived through its management peer): returns the key
    /// the hub offered it, and forgets the previous key once the node settled on the current
    /// one ([`settled_on`]).
    pub fn heard(&self, id: u32, report: &NodeReport) -> Option<String> {
        let key = {
            let mut offered = self.offered.lock().unwrap_or_else(|e| e.into_inner());
            let o = offered.get_mut(&id)?;
            o.heard = Instant::now();
            o.key.clone()
        };
        let mut view = self.view.lock().expect("fleet lock");
        if let Some(entry) = view.nodes.get_mut(&id) {
            if settled_on(report, Some(&key), &entry.public_key)
                && entry.previous_key.take().is_some()
            {
                tracing::info!(node = %entry.name, "heard on its new key: the replaced one is no longer offered");
            }
        }
        Some(key)
    }

    /// The reply for a node: at once when there is news for it or the service is closing, else
    /// when the fleet changes with news for it, or after `wait`. `None` when the node is
    /// removed, or when `gone`
    /// (asked every `check`, without the fleet lock) says the node stopped waiting.
    pub fn wait_reply(
        &self,
        id: u32,
        report: &NodeReport,
        wait: Duration,
        check: Duration,
        gone: &dyn Fn() -> bool,
    ) -> Option<SyncReply> {
        let deadline = Instant::now() + wait;
        let mut view = self.view.lock().expect("fleet lock");
        loop {
            let entry = view.nodes.get(&id)?;
            let now = Instant::now();
            // Built and signed once, when it is sent.
            if view.closing || now >= deadline || has_news(entry, report) {
                let (reply, _) = reply_for(
                    id,
                    entry,
                    report,
                    self.settings.report_interval_s,
                    view.key.as_ref(),
                );
                return Some(reply);
            }
            let (guard, timeout) = self
                .changed
                .wait_timeout(view, (deadline - now).min(check))
                .expect("fleet lock");
            view = guard;
            if timeout.timed_out() && Instant::now() < deadline {
                drop(view);
                if gone() {
                    return None;
                }
                view = self.view.lock().expect("fleet lock");
            }
        }
    }

    /// Where the bundle of one of the node's committed versions is (the path only: reading it
    /// is the caller's I/O).
    pub fn bundle_path(&self, id: u32, version: u32) -> Option<PathBuf> {
        let entry = self.node(id)?;
        entry
            .versions
            .contains(&version)
            .then(|| versions::bundle_path(&self.store, &entry.name, version))
    }
}

/// A fleet with no nodes on a fresh directory, for the service's in-process tests.
#[cfg(test)]
pub(crate) fn empty_fleet() -> (tempfile::TempDir, Fleet) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_init(dir.path()).unwrap();
    let settings = ManagementSettings {
        pool: "fd54:6f77:616c:ffff::/64".parse().unwrap(),
        listen_port: 51819,
        api_port: 8001,
        keepalive_s: 25,
        report_interval_s: 5,
        controller_endpoints: Vec::new(),
    };
    (dir, Fleet::new(store, settings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use towalink_bundle::messages::OrderOutcome;

    fn entry(versions: Vec<u32>, order: Option<(u64, u32)>) -> NodeEntry {
        NodeEntry {
            name: "r.s1".parse().unwrap(),
            public_key: String::new(),
            versions,
            order: order.map(|(seq, version)| Order {
                seq,
                version,
                confirm_s: None,
            }),
            recovery_token: None,
            previous_key: None,
            wg_private_key: None,
        }
    }

    #[test]
    fn a_rotated_node_is_offered_its_keys_in_turn_until_heard() {
        let start = Instant::now();
        let mut e = entry(vec![1], None);
        e.public_key = "new".into();
        let at = |s: u64| start + Duration::from_secs(s);
        let try_for = try_key(25);
        assert_eq!(try_for, Duration::from_secs(35));
        // Never rotated: the current key, whatever was offered before.
        let key =
            |e: &NodeEntry, offered, now| management_key(e, offered, try_for, now).to_string();
        assert_eq!(key(&e, Some(("old", start)), at(600)), "new");
        e.previous_key = Some("old".into());
        assert_eq!(key(&e, None, start), "new");
        // Not heard for 35 s on one: the other; heard lately: it stays.
        assert_eq!(key(&e, Some(("new", start)), at(34)), "new");
        assert_eq!(key(&e, Some(("new", start)), at(35)), "old");
        assert_eq!(key(&e, Some(("old", at(35))), at(70)), "new");
        assert_eq!(key(&e, Some(("old", at(590))), at(600)), "old");
        // A key that is neither (a second rotation): the current one.
        assert_eq!(key(&e, Some(("older", start)), at(1)), "new");
    }

    #[test]
    fn a_node_settles_on_its_key_only_blessed_and_running_with_it() {
        let mut report = report(vec![1], None);
        assert!(!settled_on(&report, Some("new"), "new"), "no state");
        report.state = Some(towalink_bundle::messages::SlotState::Pending);
        report.wg_public_key = Some("new".into());
        assert!(
            !settled_on(&report, Some("new"), "new"),
            "pending: may roll back"
        );
        report.state = Some(towalink_bundle::messages::SlotState::Good);
        assert!(settled_on(&report, Some("new"), "new"));
        assert!(
            !settled_on(&report, Some("old"), "new"),
            "heard on the old key"
        );
        report.wg_public_key = Some("old".into());
        assert!(!settled_on(&report, Some("new"), "new"), "runs the old key");
    }

    #[test]
    fn the_private_key_goes_only_to_a_node_that_says_it_lacks_it() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut e = entry(vec![1], None);
        e.public_key = "new".into();
        e.wg_private_key = Some(Secret::new("private".into()));
        let body = |report: &NodeReport| {
            let (reply, news) = reply_for(1, &e, report, 5, Some(&key));
            let body: ReplyBody =
                serde_json::from_str(&reply.signed.expect("signed").body).unwrap();
            (body.wg_private_key, news)
        };
        let mut report = report(vec![1], None);
        // A node before key rotation says nothing: it could not use a key.
        assert_eq!(body(&report), (None, false));
        report.wg_public_keys = vec!["old".into()];
        assert_eq!(body(&report), (Some("private".into()), true));
        report.wg_public_keys = vec!["old".into(), "new".into()];
        assert_eq!(body(&report), (None, false));
    }

    fn report(installed: Vec<u32>, done: Option<u64>) -> NodeReport {
        NodeReport {
            installed_versions: installed,
            order_done: done.map(|seq| OrderOutcome {
                seq,
                version: 1,
                result: "activated".into(),
                time: 0,
            }),
            ..NodeReport::default()
        }
    }

    #[test]
    fn a_rotated_token_goes_to_a_node_that_holds_another_only() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let token = "ab".repeat(32);
        let mut with_token = entry(vec![1], None);
        with_token.recovery_token = Some(Secret::new(token.clone()));
        let sent = |recovery_token_id: Option<String>| {
            let report = NodeReport {
                installed_versions: vec![1],
                nonce: "n".into(),
                recovery_token_id,
                ..NodeReport::default()
            };
            let (reply, news) = reply_for(1, &with_token, &report, 5, Some(&key));
            let body = towalink_bundle::orders::open_reply(
                reply.signed.as_ref(),
                &key.verifying_key(),
                1,
                "n",
            )
            .unwrap();
            (body.recovery_token, news)
        };
        assert_eq!(sent(Some("old.tlr".into())), (Some(token.clone()), true));
        assert_eq!(
            sent(Some(towalink_bundle::recovery::object_name(&token))),
            (None, false),
            "the node holds it"
        );
        assert_eq!(
            sent(None),
            (None, false),
            "a node before rotation is sent no token"
        );
    }

    #[test]
    fn news_is_a_missing_version_or_a_new_order() {
        let news = |e: NodeEntry, r: NodeReport| reply_for(1, &e, &r, 5, None).1;
        let (reply, _) = reply_for(
            1,
            &entry(vec![1, 2], None),
            &report(vec![1, 2], None),
            5,
            None,
        );
        assert_eq!(reply.versions, [1, 2]);
        assert!(!news(entry(vec![1, 2], None), report(vec![1, 2], None)));
        assert!(news(entry(vec![1, 2, 3], None), report(vec![1, 2], None)));
        assert!(news(entry(vec![1], Some((1, 1))), report(vec![1], None)));
        assert!(!news(
            entry(vec![1], Some((1, 1))),
            report(vec![1], Some(1))
        ));
        assert!(news(entry(vec![1], Some((2, 1))), report(vec![1], Some(1))));
    }

    #[test]
    fn replies_are_signed_for_the_node_and_its_report() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut r = report(vec![1], None);
        r.nonce = "abc".into();
        let (reply, _) = reply_for(4, &entry(vec![1, 2], Some((2, 2))), &r, 7, Some(&key));
        let body = towalink_bundle::orders::open_reply(
            reply.signed.as_ref(),
            &key.verifying_key(),
            4,
            "abc",
        )
        .unwrap();
        assert_eq!(body.versions, [1, 2]);
        assert_eq!(body.order, reply.order);
        assert_eq!(body.report_interval_s, 7);
    }

    fn fleet_with(id: u32, entry: NodeEntry) -> (tempfile::TempDir, Fleet) {
        let (dir, fleet) = empty_fleet();
        fleet.view.lock().unwrap().nodes.insert(id, entry);
        (dir, fleet)
    }

    #[test]
    fn a_long_poll_ends_when_its_node_hangs_up() {
        let (_dir, fleet) = fleet_with(1, entry(vec![1], None));
        let asked = std::sync::atomic::AtomicU32::new(0);
        let gone = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2;
        let reply = fleet.wait_reply(
            1,
            &report(vec![1], None),
            Duration::from_secs(30),
            Duration::from_millis(10),
            &gone,
        );
        assert!(reply.is_none(), "waited out the poll of a node that left");
        // A node still there gets its reply when the wait is over.
        let reply = fleet.wait_reply(
            1,
            &report(vec![1], None),
            Duration::from_millis(50),
            Duration::from_millis(10),
            &|| false,
        );
        assert_eq!(reply.unwrap().versions, [1]);
    }

    #[test]
    fn closing_answers_waiting_polls_at_once() {
        let (_dir, fleet) = fleet_with(1, entry(vec![1], None));
        let fleet = std::sync::Arc::new(fleet);
        let (sent, answered) = std::sync::mpsc::channel();
        let poll = {
            let fleet = std::sync::Arc::clone(&fleet);
            std::thread::spawn(move || {
                let reply = fleet.wait_reply(
                    1,
                    &report(vec![1], None),
                    Duration::from_secs(3600),
                    Duration::from_secs(3600),
                    &|| false,
                );
                sent.send(reply).unwrap();
            })
        };
        fleet.close();
        let reply = answered
            .recv_timeout(Duration::from_secs(30))
            .expect("the long poll was not answered within 30 s of closing");
        assert_eq!(reply.unwrap().versions, [1]);
        poll.join().unwrap();
        // Later polls do not wait either.
        let reply = fleet.wait_reply(
            1,
            &report(vec![1], None),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            &|| false,
        );
        assert_eq!(reply.unwrap().versions, [1]);
    }

    #[test]
    fn only_the_newest_versions_are_offered() {
        let all: Vec<u32> = (1..=25).collect();
        let installed: Vec<u32> = (16..=25).collect();
        let (reply, news) = reply_for(
            1,
            &entry(all, None),
            &report(installed.clone(), None),
            5,
            None,
        );
        assert_eq!(reply.versions, installed);
        assert!(!news, "old versions the node pruned are not news");
    }
}
