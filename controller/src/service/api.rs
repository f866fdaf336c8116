//! The management API's rules, without I/O: who is asking ([`identify`]), what a request
//! asks for ([`route`]), and every refusal as an [`ApiError`] whose HTTP status follows from
//! its kind ([`ApiError::status`]).
//!
//! The router decides; the server ([`super::server`]) does the effects around it: reading the
//! request before, and after, for a [`Reply`], recording the node's report and waiting for its
//! answer (sync) or reading the bundle file (bundle; a file that cannot be read is
//! [`ApiError::BundleUnreadable`], 500). The fleet is asked only about its view in memory.
//!
//! Endpoints (see docs/controller-service.md, "The API"):
//! - `POST /v1/sync?wait_ms=N` with the node's [`NodeReport`] → its signed [`SyncReply`],
//!   at once when there is news for it, else within N ms (at most [`MAX_WAIT_MS`]).
//! - `GET /v1/bundle/<N>` (or `v<N>`) → the signed bundle of one of its committed versions.
//!
//! [`SyncReply`]: towalink_bundle::messages::SyncReply

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use towalink_bundle::messages::{NodeReport, BUNDLE_PATH, MAX_WAIT_MS, SYNC_PATH};
use towalink_bundle::wire::{Request, WireError};

use super::fleet::Fleet;
use super::limits::{self, ApiLimits, Refusal};
use crate::model::names::NodeFullName;

/// What a request from a node asks the server to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Record `report` as the node's status, then answer with its sync reply: at once when
    /// there is news for it, else when there is or `wait` passed.
    Sync {
        node: NodeFullName,
        report: Box<NodeReport>,
        wait: Duration,
    },
    /// Send this bundle file (`application/zstd`).
    Bundle { file: PathBuf },
}

/// Why the API refuses a connection or a request. The message (`Display`) is what the client
/// reads; [`status`](Self::status) is the HTTP status it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The source address is no node's management address (a local process, a removed node).
    #[error("not a node's management address")]
    NotANode,
    /// The request line, a header or the framing is not HTTP as the API takes it.
    #[error("{0}")]
    Malformed(String),
    /// The body of a sync is not a node report.
    #[error("report is not valid: {0}")]
    BadReport(String),
    /// The report names another node than the one whose link it came through.
    #[error("this link belongs to node {link}, not {claimed}")]
    ForeignReport { link: u32, claimed: u32 },
    /// The node was removed while its request was under way.
    #[error("node removed")]
    NodeRemoved,
    #[error("no such version for this node")]
    NoSuchVersion,
    #[error("unknown request")]
    UnknownRequest { method: String, path: String },
    /// A known path with a method it does not take.
    #[error("{path} takes {allow} only")]
    MethodNotAllowed {
        path: &'static str,
        allow: &'static str,
    },
    /// The request did not arrive whole within the deadline.
    #[error("request not complete within {}", in_words(*within))]
    Expired { within: Duration },
    #[error("body of {length} bytes; at most {limit}")]
    TooLarge { length: u64, limit: u64 },
    /// The bundle of an offered version cannot be read from the directory.
    #[error("cannot read the bundle")]
    BundleUnreadable,
    /// The source holds its share of connections already.
    #[error("too many connections from this address: at most {per_node} at once")]
    TooManyFromNode { per_node: usize },
    /// The service holds its maximum of connections.
    #[error("the controller serves its maximum of {total} connections")]
    Full { total: usize },
}

impl ApiError {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Malformed(_) | ApiError::BadReport(_) => 400,
            ApiError::NotANode | ApiError::ForeignReport { .. } | ApiError::NodeRemoved => 403,
            ApiError::NoSuchVersion | ApiError::UnknownRequest { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Expired { .. } => 408,
            ApiError::TooLarge { .. } => 413,
            ApiError::BundleUnreadable => 500,
            ApiError::TooManyFromNode { .. } | ApiError::Full { .. } => 503,
        }
    }

    /// Headers the refusal needs besides the usual ones (405 names what the path allows).
    pub fn headers(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            ApiError::MethodNotAllowed { allow, .. } => vec![("Allow", allow)],
            _ => Vec::new(),
        }
    }

    /// The kind of refusal, for logs paced per kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NotANode => "not-a-node",
            ApiError::Malformed(_) => "malformed",
            ApiError::BadReport(_) => "malformed-report",
            ApiError::ForeignReport { .. } => "foreign-report",
            ApiError::NodeRemoved => "node-removed",
            ApiError::NoSuchVersion => "no-such-version",
            ApiError::UnknownRequest { .. } | ApiError::MethodNotAllowed { .. } => "unknown",
            ApiError::Expired { .. } => "expired",
            ApiError::TooLarge { .. } => "oversize",
            ApiError::BundleUnreadable => "bundle-read",
            ApiError::TooManyFromNode { .. } | ApiError::Full { .. } => "refused",
        }
    }

    /// The refusal for a connection over one of the caps of `limits`.
    pub fn from_refusal(refusal: Refusal, limits: &ApiLimits) -> ApiError {
        match refusal {
            Refusal::Source => ApiError::TooManyFromNode {
                per_node: limits.per_node,
            },
            Refusal::Total => ApiError::Full {
                total: limits.connections,
            },
        }
    }

    /// The refusal for a request that could not be read; `None` when the client closed the
    /// connection before a whole request (nobody to answer). `deadline` is the request
    /// deadline a timeout means.
    pub fn from_wire(error: WireError, deadline: Duration) -> Option<ApiError> {
        match error {
            WireError::Closed => None,
            WireError::Io(e) if limits::is_timeout(&e) => {
                Some(ApiError::Expired { within: deadline })
            }
            WireError::BodyTooLarge { length, limit } => Some(ApiError::TooLarge { length, limit }),
            other => Some(ApiError::Malformed(other.to_string())),
        }
    }
}

/// `10 s`, or `500 ms` for a time that is no whole number of seconds.
fn in_words(time: Duration) -> String {
    if time.subsec_millis() == 0 {
        format!("{} s", time.as_secs())
    } else {
        format!("{} ms", time.as_millis())
    }
}

/// The node whose management address `source` is, if it is one of the fleet's nodes.
pub fn identify(fleet: &Fleet, source: IpAddr) -> Result<u32, ApiError> {
    fleet
        .settings
        .node_id_of(source)
        .filter(|id| fleet.node(*id).is_some())
        .ok_or(ApiError::NotANode)
}

/// What node `node` (identified by its link) asks for with `request`. Pure: the fleet is
/// asked about its view in memory only.
pub fn route(node: u32, request: &Request, fleet: &Fleet) -> Result<Reply, ApiError> {
    let method = request.method.as_str();
    let path = request.path.as_str();
    if path == SYNC_PATH {
        if method != "POST" {
            return Err(ApiError::MethodNotAllowed {
                path: SYNC_PATH,
                allow: "POST",
            });
        }
        return sync(node, request, fleet);
    }
    if let Some(version) = path.strip_prefix(BUNDLE_PATH) {
        if method != "GET" {
            return Err(ApiError::MethodNotAllowed {
                path: "/v1/bundle/<version>",
                allow: "GET",
            });
        }
        let file = version
            .trim_start_matches('v')
            .parse::<u32>()
            .ok()
            .and_then(|v| fleet.bundle_path(node, v))
            .ok_or(ApiError::NoSuchVersion)?;
        return Ok(Reply::Bundle { file });
    }
    Err(ApiError::UnknownRequest {
        method: method.to_string(),
        path: path.to_string(),
    })
}

fn sync(node: u32, request: &Request, fleet: &Fleet) -> Result<Reply, ApiError> {
    let report: NodeReport =
        serde_json::from_slice(&request.body).map_err(|e| ApiError::BadReport(e.to_string()))?;
    if report.node_id != node {
        return Err(ApiError::ForeignReport {
            link: node,
            claimed: report.node_id,
        });
    }
    let entry = fleet.node(node).ok_or(ApiError::NodeRemoved)?;
    let wait_ms = request
        .query_value("wait_ms")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(0)
        .min(MAX_WAIT_MS);
    Ok(Reply::Sync {
        node: entry.name,
        report: Box::new(report),
        wait: Duration::from_millis(wait_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::fleet::NodeEntry;
    use std::collections::BTreeMap;

    /// A fleet of nodes 1 (r.s1, versions 1 and 2) and 2 (r.s2, version 1), in memory.
    fn fleet() -> (tempfile::TempDir, Fleet) {
        let (dir, fleet) = crate::service::fleet::empty_fleet();
        let entry = |name: &str, versions: Vec<u32>| NodeEntry {
            name: name.parse().unwrap(),
            public_key: String::new(),
            versions,
            order: None,
            recovery_token: None,
            previous_key: None,
            wg_private_key: None,
        };
        fleet.publish(
            BTreeMap::from([(1, entry("r.s1", vec![1, 2])), (2, entry("r.s2", vec![1]))]),
            None,
        );
        (dir, fleet)
    }

    fn request(method: &str, target: &str, body: &[u8]) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.into(),
            path: path.into(),
            query: query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            body: body.to_vec(),
        }
    }

    fn report_of(node_id: u32) -> Vec<u8> {
        serde_json::to_vec(&NodeReport {
            node_id,
            ..NodeReport::default()
        })
        .unwrap()
    }

    fn status(result: Result<Reply, ApiError>) -> u16 {
        result.expect_err("a refusal").status()
    }

    #[test]
    fn only_the_fleets_management_addresses_are_nodes() {
        let (_dir, fleet) = fleet();
        let node = |s: &str| identify(&fleet, s.parse().unwrap());
        assert_eq!(node("fd54:6f77:616c:ffff::1:1"), Ok(1));
        assert_eq!(node("fd54:6f77:616c:ffff::1:2"), Ok(2));
        for stranger in [
            "fd54:6f77:616c:ffff::1",   // the controller itself
            "fd54:6f77:616c:ffff::1:3", // no such node (removed, or never added)
            "fd00::1:1",                // outside the pool
            "10.0.0.1",
        ] {
            let refused = node(stranger).unwrap_err();
            assert_eq!(refused, ApiError::NotANode, "{stranger}");
            assert_eq!(refused.status(), 403);
            assert_eq!(refused.to_string(), "not a node's management address");
        }
    }

    #[test]
    fn a_sync_records_the_report_and_waits_at_most_the_maximum() {
        let (_dir, fleet) = fleet();
        let reply = route(
            1,
            &request("POST", "/v1/sync?wait_ms=5000", &report_of(1)),
            &fleet,
        );
        match reply.unwrap() {
            Reply::Sync { node, report, wait } => {
                assert_eq!(node.to_string(), "r.s1");
                assert_eq!(report.node_id, 1);
                assert_eq!(wait, Duration::from_secs(5));
            }
            other => panic!("expected a sync, got {other:?}"),
        }
        let wait = |target: &str| match route(1, &request("POST", target, &report_of(1)), &fleet) {
            Ok(Reply::Sync { wait, .. }) => wait,
            other => panic!("expected a sync, got {other:?}"),
        };
        assert_eq!(wait("/v1/sync"), Duration::ZERO);
        assert_eq!(wait("/v1/sync?wait_ms=soon"), Duration::ZERO);
        assert_eq!(
            wait("/v1/sync?wait_ms=99999999"),
            Duration::from_millis(MAX_WAIT_MS)
        );
    }

    #[test]
    fn a_bundle_request_names_one_of_the_nodes_versions() {
        let (_dir, fleet) = fleet();
        for target in ["/v1/bundle/2", "/v1/bundle/v2"] {
            match route(1, &request("GET", target, b""), &fleet).unwrap() {
                Reply::Bundle { file } => assert_eq!(file, fleet.bundle_path(1, 2).unwrap()),
                other => panic!("expected a bundle, got {other:?}"),
            }
        }
        // Node 2 has no version 2; nobody has version 9; names that are no version.
        for (node, target) in [
            (2, "/v1/bundle/2"),
            (1, "/v1/bundle/9"),
            (1, "/v1/bundle/"),
            (1, "/v1/bundle/two"),
            (1, "/v1/bundle/-1"),
            (1, "/v1/bundle/99999999999"),
        ] {
            let refused = route(node, &request("GET", target, b""), &fleet).unwrap_err();
            assert_eq!(refused, ApiError::NoSuchVersion, "{target}");
            assert_eq!(refused.status(), 404);
        }
    }

    #[test]
    fn a_report_that_is_not_one_is_a_bad_request() {
        let (_dir, fleet) = fleet();
        for body in [&b""[..], b"{", b"[]", b"{\"node_id\":\"one\"}", b"\xff\xfe"] {
            let refused = route(1, &request("POST", "/v1/sync", body), &fleet).unwrap_err();
            assert!(matches!(refused, ApiError::BadReport(_)), "{refused:?}");
            assert_eq!(refused.status(), 400);
            assert!(refused.to_string().starts_with("report is not valid: "));
        }
    }

    #[test]
    fn a_report_for_another_node_is_forbidden() {
        let (_dir, fleet) = fleet();
        let refused = route(1, &request("POST", "/v1/sync", &report_of(2)), &fleet).unwrap_err();
        assert_eq!(refused.status(), 403);
        assert_eq!(
            refused.to_string(),
            "this link belongs to node 1, not 2",
            "names both nodes"
        );
    }

    #[test]
    fn a_node_removed_meanwhile_is_forbidden() {
        let (_dir, fleet) = fleet();
        // Identified (its connection was taken), then removed before its request was read.
        fleet.publish(BTreeMap::new(), None);
        let refused = route(1, &request("POST", "/v1/sync", &report_of(1)), &fleet).unwrap_err();
        assert_eq!(refused, ApiError::NodeRemoved);
        assert_eq!(refused.status(), 403);
        assert_eq!(
            status(route(1, &request("GET", "/v1/bundle/1", b""), &fleet)),
            404
        );
    }

    #[test]
    fn unknown_paths_are_not_found_and_wrong_methods_not_allowed() {
        let (_dir, fleet) = fleet();
        for (method, target) in [
            ("GET", "/"),
            ("GET", "/v1"),
            ("POST", "/v1/sync/"),
            ("GET", "/v2/sync"),
            ("GET", "/v1/bundle"),
            ("DELETE", "/etc/passwd"),
        ] {
            let refused = route(1, &request(method, target, b""), &fleet).unwrap_err();
            assert!(
                matches!(refused, ApiError::UnknownRequest { .. }),
                "{method} {target}: {refused:?}"
            );
            assert_eq!(refused.status(), 404);
            assert!(refused.headers().is_empty());
        }
        for (method, target, allow) in [
            ("GET", "/v1/sync", "POST"),
            ("PUT", "/v1/sync", "POST"),
            ("POST", "/v1/bundle/1", "GET"),
            ("HEAD", "/v1/bundle/1", "GET"),
        ] {
            let refused = route(1, &request(method, target, &report_of(1)), &fleet).unwrap_err();
            assert_eq!(refused.status(), 405, "{method} {target}");
            assert_eq!(refused.headers(), [("Allow", allow)]);
            assert!(refused
                .to_string()
                .ends_with(&format!("takes {allow} only")));
        }
    }

    #[test]
    fn framing_errors_map_to_their_status() {
        let deadline = Duration::from_secs(10);
        let status = |e: WireError| ApiError::from_wire(e, deadline).map(|e| e.status());
        assert_eq!(status(WireError::Closed), None, "nobody to answer");
        assert_eq!(
            status(WireError::Io(std::io::ErrorKind::TimedOut.into())),
            Some(408)
        );
        assert_eq!(
            status(WireError::Io(std::io::ErrorKind::WouldBlock.into())),
            Some(408)
        );
        assert_eq!(
            status(WireError::BodyTooLarge {
                length: 50_000_000,
                limit: 262_144
            }),
            Some(413)
        );
        assert_eq!(status(WireError::Malformed("x".into())), Some(400));
        assert_eq!(status(WireError::HeadTooLarge), Some(400));
        assert_eq!(
            status(WireError::Io(std::io::ErrorKind::ConnectionReset.into())),
            Some(400)
        );
        assert_eq!(
            ApiError::from_wire(WireError::Io(std::io::ErrorKind::TimedOut.into()), deadline)
                .unwrap()
                .to_string(),
            "request not complete within 10 s"
        );
        assert_eq!(
            ApiError::Expired {
                within: Duration::from_millis(1500)
            }
            .to_string(),
            "request not complete within 1500 ms"
        );
        assert_eq!(
            ApiError::from_wire(
                WireError::BodyTooLarge {
                    length: 50_000_000,
                    limit: 262_144
                },
                deadline
            )
            .unwrap()
            .to_string(),
            "body of 50000000 bytes; at most 262144"
        );
    }

    #[test]
    fn connections_over_a_cap_are_unavailable() {
        let limits = ApiLimits::for_file_limit(1024);
        let source = ApiError::from_refusal(Refusal::Source, &limits);
        assert_eq!(source.status(), 503);
        assert_eq!(
            source.to_string(),
            "too many connections from this address: at most 8 at once"
        );
        let total = ApiError::from_refusal(Refusal::Total, &limits);
        assert_eq!(total.status(), 503);
        assert_eq!(
            total.to_string(),
            "the controller serves its maximum of 480 connections"
        );
        assert_eq!(ApiError::BundleUnreadable.status(), 500);
    }
}
