//! The management API's server: [`serve`] takes a bound listener, the fleet and a stop
//! signal, and runs until the signal: one thread per connection, under the caps and deadlines
//! of [`limits`]. It reads each request, asks [`api::route`] what to do, and does it (records
//! the node's report and waits for its reply; reads a bundle), or answers the refusal with the
//! status [`ApiError::status`] gives.
//!
//! On the stop signal it stops accepting (the listener is closed, new connections are refused
//! by the kernel), answers the waiting long polls at once ([`Fleet::close`]), and waits up to
//! [`ApiLimits::grace`] for the connections in flight to end.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use towalink_bundle::wire;
use towalink_system::Shutdown;

use super::api::{self, ApiError, Reply};
use super::fleet::Fleet;
use super::limits::{self, ApiLimits, Backoff, Burst, Deadline, Slots};
use super::records::{self, NodeRecord};
use crate::Error;

/// Largest request body (a node report).
pub const MAX_REQUEST_BYTES: u64 = 256 * 1024;

/// What the API's threads share.
struct Api {
    fleet: Arc<Fleet>,
    limits: ApiLimits,
    slots: Slots,
    /// Log pacing, per kind of event: a node can cause refusals as fast as it can connect,
    /// and must not fill the disk with the log.
    bursts: Mutex<BTreeMap<&'static str, Burst>>,
}

impl Api {
    /// Whether to log an event of this kind now (once per burst), and how many went unlogged
    /// before it.
    fn pace(&self, kind: &'static str) -> Option<u64> {
        self.bursts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default()
            .note(Instant::now())
    }
}

/// Serves the API on `listener` until `shutdown` is triggered; then stops accepting, answers
/// the waiting long polls, waits up to `limits.grace` for the connections in flight, and
/// returns. Fails only when the listener cannot be waited on.
pub fn serve(
    listener: TcpListener,
    fleet: Arc<Fleet>,
    limits: ApiLimits,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Service(format!("cannot set up the API listener: {e}")))?;
    let api = Arc::new(Api {
        fleet,
        limits,
        slots: Slots::new(limits.per_node, limits.connections),
        bursts: Mutex::default(),
    });
    let result = accept_loop(&listener, &api, shutdown);
    drop(listener);
    api.fleet.close();
    let open = api.slots.drain(limits.grace);
    if open > 0 {
        tracing::warn!(
            open,
            grace_s = limits.grace.as_secs(),
            "API connections still open after the grace period; they end with the process"
        );
    }
    tracing::info!("API stopped");
    result
}

/// Waits until a connection is pending on `listener` (true) or `shutdown` is triggered (false).
fn wait_for_connection(listener: &TcpListener, shutdown: &Shutdown) -> Result<bool, Error> {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [
        PollFd::new(listener, PollFlags::IN),
        PollFd::from_borrowed_fd(shutdown.wake_fd(), PollFlags::IN),
    ];
    loop {
        if shutdown.is_triggered() {
            return Ok(false);
        }
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => {
                return Err(Error::Service(format!(
                    "cannot wait for API connections: {error}"
                )))
            }
        }
        if !fds[1].revents().is_empty() || shutdown.is_triggered() {
            return Ok(false);
        }
        if !fds[0].revents().is_empty() {
            return Ok(true);
        }
    }
}

/// Takes connections, one thread each, while their source and the service are under their
/// caps; refuses the others at once (503) without reading or waiting on them. When `accept`
/// fails for want of descriptors or memory, sleeps (20 ms doubling to 500 ms) instead of
/// spinning, and logs the start and the end of the burst only. Returns when `shutdown` is
/// triggered.
fn accept_loop(listener: &TcpListener, api: &Arc<Api>, shutdown: &Shutdown) -> Result<(), Error> {
    let mut backoff = Backoff::default();
    // At the file limit, every connection that ends lets one more in: bursts come one after
    // the other, and are logged once per 10 s.
    let (mut failing, mut recovering) = (Burst::default(), Burst::default());
    while wait_for_connection(listener, shutdown)? {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => {
                if let Some(failures) = backoff.succeeded() {
                    if let Some(unlogged) = recovering.note(Instant::now()) {
                        tracing::info!(failures, unlogged, "accepting API connections again");
                    }
                }
                accepted
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) if limits::is_transient(&error) => continue,
            Err(error) => {
                let (delay, first) = backoff.failed();
                if first {
                    if let Some(unlogged) = failing.note(Instant::now()) {
                        tracing::warn!(%error, unlogged, "cannot accept API connections; backing off until resources free up");
                    }
                }
                shutdown.sleep(delay);
                continue;
            }
        };
        // The listener is non-blocking so that the stop is seen; the connections block (with
        // their deadlines).
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let slot = match api.slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                let refused = ApiError::from_refusal(refusal, &api.limits);
                if let Some(unlogged) = api.pace(refused.kind()) {
                    let (held, total) = api.slots.held(peer.ip());
                    tracing::warn!(%peer, held, total, unlogged, "API connection refused: {refused}");
                }
                let mut response = Vec::new();
                let _ = wire::write_response(
                    &mut response,
                    refused.status(),
                    "text/plain",
                    format!("{refused}\n").as_bytes(),
                );
                limits::refuse_at_once(&stream, &response);
                continue;
            }
        };
        let api_thread = Arc::clone(api);
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                handle(stream, peer, &api_thread);
                drop(slot);
            });
        if let Err(error) = spawned {
            if let Some(unlogged) = api.pace("unthreaded") {
                tracing::error!(%error, unlogged, "cannot start a thread for an API connection; closed it");
            }
        }
    }
    Ok(())
}

/// Writes a response, all of it within [`limits::RESPONSE_DEADLINE`].
fn respond(stream: &mut TcpStream, content_type: &str, body: &[u8]) {
    let _ = wire::write_response(
        &mut Deadline::new(stream, limits::RESPONSE_DEADLINE),
        200,
        content_type,
        body,
    );
}

/// Writes a refusal, all of it within [`limits::REFUSAL_DEADLINE`].
fn refuse(stream: &mut TcpStream, refused: &ApiError) {
    let _ = wire::write_response_with(
        &mut Deadline::new(stream, limits::REFUSAL_DEADLINE),
        refused.status(),
        &refused.headers(),
        "text/plain",
        format!("{refused}\n").as_bytes(),
    );
}

/// Logs a refusal, once per burst of its kind.
fn log_refusal(api: &Api, peer: SocketAddr, node_id: Option<u32>, refused: &ApiError) {
    let Some(unlogged) = api.pace(refused.kind()) else {
        return;
    };
    match refused {
        ApiError::NotANode => {
            tracing::warn!(%peer, unlogged, "API request from an address that is no node's management address: refused")
        }
        ApiError::Expired { .. } => {
            tracing::warn!(%peer, node_id, unlogged, "{refused}: closed")
        }
        ApiError::TooLarge { length, limit } => {
            tracing::warn!(%peer, unlogged, node_id, length, limit, "oversize request refused")
        }
        ApiError::Malformed(error) => {
            tracing::warn!(%peer, unlogged, node_id, %error, "malformed request refused")
        }
        ApiError::BadReport(error) => {
            tracing::warn!(%peer, unlogged, node_id, %error, "malformed report refused")
        }
        ApiError::ForeignReport { claimed, .. } => {
            tracing::warn!(%peer, unlogged, node_id, claimed, "report for another node refused")
        }
        ApiError::UnknownRequest { method, path } => {
            tracing::warn!(%peer, unlogged, node_id, method, path, "unknown API request refused")
        }
        ApiError::MethodNotAllowed { path, allow } => {
            tracing::warn!(%peer, unlogged, node_id, path, allow, "API request with a method its path does not take refused")
        }
        // What a node asks in the normal course (a version it pruned, a removal under way).
        ApiError::NoSuchVersion | ApiError::NodeRemoved => {
            tracing::debug!(%peer, node_id, "API request refused: {refused}")
        }
        ApiError::BundleUnreadable | ApiError::TooManyFromNode { .. } | ApiError::Full { .. } => {
            tracing::warn!(%peer, unlogged, node_id, "API request refused: {refused}")
        }
    }
}

/// Serves one request on a connection: the whole request must arrive within the request
/// deadline of the accept (408 otherwise).
fn handle(mut stream: TcpStream, peer: SocketAddr, api: &Api) {
    let node_id = match api::identify(&api.fleet, peer.ip()) {
        Ok(id) => id,
        Err(refused) => {
            log_refusal(api, peer, None, &refused);
            return refuse(&mut stream, &refused);
        }
    };
    let deadline = api.limits.request_deadline;
    let request = {
        let mut reader = BufReader::new(Deadline::new(&stream, deadline));
        wire::read_request(&mut reader, MAX_REQUEST_BYTES)
    };
    let routed = match request {
        Ok(request) => api::route(node_id, &request, &api.fleet),
        Err(error) => match ApiError::from_wire(error, deadline) {
            Some(refused) => Err(refused),
            None => return,
        },
    };
    let done = match routed {
        Ok(Reply::Sync { node, report, wait }) => {
            sync(&mut stream, api, node_id, node, *report, wait)
        }
        Ok(Reply::Bundle { file }) => match std::fs::read(&file) {
            Ok(bytes) => {
                respond(&mut stream, "application/zstd", &bytes);
                Ok(())
            }
            Err(error) => {
                if let Some(unlogged) = api.pace("bundle-read") {
                    tracing::error!(file = %file.display(), %error, unlogged, "cannot read bundle");
                }
                Err(ApiError::BundleUnreadable)
            }
        },
        Err(refused) => {
            log_refusal(api, peer, Some(node_id), &refused);
            Err(refused)
        }
    };
    if let Err(refused) = done {
        refuse(&mut stream, &refused);
    }
}

/// Records a node's report, then answers with its reply when there is news for it, the
/// wait is over or the service stops; nothing when the node hung up meanwhile.
fn sync(
    stream: &mut TcpStream,
    api: &Api,
    node_id: u32,
    node: crate::model::names::NodeFullName,
    report: towalink_bundle::messages::NodeReport,
    wait: Duration,
) -> Result<(), ApiError> {
    let fleet = &*api.fleet;
    let via_key = fleet.heard(node_id, &report);
    let record = NodeRecord {
        node: node.to_string(),
        node_id,
        last_seen_ms: records::now_ms(),
        endpoint: fleet.endpoint(node_id),
        report,
        via_key,
    };
    let bytes = serde_json::to_vec(&record).expect("record serializes");
    if let Err(error) = records::write_soft(&records::node_path(fleet.store(), &node), &bytes) {
        if let Some(unlogged) = api.pace("status-write") {
            tracing::error!(%error, unlogged, %node, "cannot write the node's status");
        }
    }
    fleet.note(record.clone());
    let gone = || limits::peer_gone(stream);
    match fleet.wait_reply(node_id, &record.report, wait, limits::HANGUP_CHECK, &gone) {
        Some(reply) => {
            let body = serde_json::to_vec(&reply).expect("reply serializes");
            respond(stream, "application/json", &body);
            Ok(())
        }
        None if gone() => {
            tracing::debug!(node_id, "node stopped waiting for its reply");
            Ok(())
        }
        None => Err(ApiError::NodeRemoved),
    }
}

#[cfg(test)]
mod tests {
    //! The server in-process on a loopback listener: no namespace, no WireGuard. The fleet's
    //! management pool is made of IPv4-mapped addresses, so that a connection from 127.0.0.1
    //! to an IPv6 listener on `::ffff:127.0.0.1` comes from a node's management address.

    use super::*;
    use crate::model::management::ManagementSettings;
    use crate::service::fleet::NodeEntry;
    use crate::store::Store;
    use std::io::{Read as _, Write as _};
    use std::net::IpAddr;
    use towalink_bundle::messages::{NodeReport, SyncReply};

    struct Server {
        _dir: tempfile::TempDir,
        fleet: Arc<Fleet>,
        address: SocketAddr,
        node_id: u32,
        shutdown: Shutdown,
        thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    }

    impl Server {
        /// A server whose fleet has one node, r.s1, with a bundle for version 1; the node's
        /// management address is 127.0.0.1 when `loopback_is_a_node`.
        fn start(limits: ApiLimits, loopback_is_a_node: bool) -> Server {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_or_init(dir.path()).unwrap();
            let settings = ManagementSettings {
                pool: "::ffff:0.0.0.0/96".parse().unwrap(),
                listen_port: 51819,
                api_port: 8001,
                keepalive_s: 25,
                report_interval_s: 5,
                controller_endpoints: Vec::new(),
            };
            let loopback: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
            let node_id = settings.node_id_of(loopback).expect("loopback in the pool");
            let fleet = Arc::new(Fleet::new(store, settings));
            let id = if loopback_is_a_node {
                node_id
            } else {
                node_id + 1
            };
            let name: crate::model::names::NodeFullName = "r.s1".parse().unwrap();
            fleet.publish(
                BTreeMap::from([(
                    id,
                    NodeEntry {
                        name: name.clone(),
                        public_key: String::new(),
                        versions: vec![1],
                        order: None,
                        recovery_token: None,
                        previous_key: None,
                        wg_private_key: None,
                    },
                )]),
                None,
            );
            if let Some(file) = fleet.bundle_path(id, 1) {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, b"the bundle of v1").unwrap();
            }
            let listener = TcpListener::bind((loopback, 0)).expect(
                "cannot listen on ::ffff:127.0.0.1 (IPv4-mapped addresses need bindv6only=0)",
            );
            let address = listener.local_addr().unwrap();
            let shutdown = Shutdown::new().unwrap();
            let thread = {
                let (fleet, shutdown) = (Arc::clone(&fleet), shutdown.clone());
                std::thread::spawn(move || serve(listener, fleet, limits, &shutdown))
            };
            Server {
                _dir: dir,
                fleet,
                address,
                node_id,
                shutdown,
                thread: Some(thread),
            }
        }

        fn connect(&self) -> TcpStream {
            let stream = TcpStream::connect(self.address).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            stream
        }

        /// Sends `request` on a new connection and reads the whole response.
        fn exchange(&self, request: &[u8]) -> wire::Response {
            let mut stream = self.connect();
            stream.write_all(request).unwrap();
            read_response(stream)
        }

        fn report(&self) -> Vec<u8> {
            serde_json::to_vec(&NodeReport {
                node_id: self.node_id,
                installed_versions: vec![1],
                ..NodeReport::default()
            })
            .unwrap()
        }

        /// Stops the server and returns what `serve` returned.
        fn stop(&mut self) -> Result<(), Error> {
            self.shutdown.trigger();
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if self.thread.is_some() {
                let _ = self.stop();
            }
        }
    }

    fn read_response(stream: TcpStream) -> wire::Response {
        wire::read_response(&mut BufReader::new(stream), 1 << 20).expect("a whole response")
    }

    fn post_sync(body: &[u8], wait_ms: u64) -> Vec<u8> {
        let mut request = format!(
            "POST /v1/sync?wait_ms={wait_ms} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    }

    fn limits() -> ApiLimits {
        ApiLimits {
            per_node: 8,
            connections: 64,
            request_deadline: Duration::from_secs(10),
            grace: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_node_syncs_downloads_and_is_refused_over_the_wire() {
        let mut server = Server::start(limits(), true);
        let reply = server.exchange(&post_sync(&server.report(), 0));
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.content_type.as_deref(), Some("application/json"));
        let sync: SyncReply = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(sync.versions, [1]);
        let record = records::read_node(server.fleet.store(), &"r.s1".parse().unwrap())
            .expect("the report was recorded");
        assert_eq!(record.node_id, server.node_id);

        let bundle = server.exchange(b"GET /v1/bundle/1 HTTP/1.1\r\n\r\n");
        assert_eq!(bundle.status, 200);
        assert_eq!(bundle.content_type.as_deref(), Some("application/zstd"));
        assert_eq!(bundle.body, b"the bundle of v1");

        let refused = |request: &[u8]| {
            let response = server.exchange(request);
            (response.status, String::from_utf8(response.body).unwrap())
        };
        let (status, body) = refused(b"\x16\x03\x01garbage\r\n\r\n");
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            refused(b"POST /v1/sync HTTP/1.1\r\nContent-Length: 50000000\r\n\r\n{"),
            (413, "body of 50000000 bytes; at most 262144\n".into())
        );
        let foreign = serde_json::to_vec(&NodeReport {
            node_id: server.node_id + 1,
            ..NodeReport::default()
        })
        .unwrap();
        assert_eq!(refused(&post_sync(&foreign, 0)).0, 403);
        assert_eq!(refused(&post_sync(b"{", 0)).0, 400);
        assert_eq!(refused(b"GET /v1/bundle/99 HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(refused(b"GET /metrics HTTP/1.1\r\n\r\n").0, 404);
        let mut stream = server.connect();
        stream.write_all(b"GET /v1/sync HTTP/1.1\r\n\r\n").unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 405 "), "{raw}");
        assert!(raw.contains("\r\nAllow: POST\r\n"), "{raw}");

        // The file of an offered version went missing: the node learns it, the server goes on.
        std::fs::remove_file(server.fleet.bundle_path(server.node_id, 1).unwrap()).unwrap();
        assert_eq!(
            refused(b"GET /v1/bundle/1 HTTP/1.1\r\n\r\n"),
            (500, "cannot read the bundle\n".into())
        );
        assert_eq!(server.exchange(&post_sync(&server.report(), 0)).status, 200);
        server.stop().unwrap();
    }

    #[test]
    fn an_address_that_is_no_node_is_forbidden_before_its_request_is_read() {
        let server = Server::start(limits(), false);
        // Nothing sent: the refusal does not wait for a request.
        let response = read_response(server.connect());
        assert_eq!(response.status, 403);
        assert_eq!(response.body, b"not a node's management address\n");
    }

    /// Starts a long poll for the server's node (nothing new for it: it would wait a minute)
    /// and waits until the server holds it (its report recorded).
    fn long_poll(server: &Server) -> TcpStream {
        let mut poll = server.connect();
        poll.write_all(&post_sync(&server.report(), 60_000))
            .unwrap();
        let node = "r.s1".parse().unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while records::read_node(server.fleet.store(), &node).is_none() {
            assert!(
                Instant::now() < until,
                "the long poll's report was not recorded within 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        poll
    }

    #[test]
    fn connections_over_the_cap_are_refused_at_once() {
        let server = Server::start(
            ApiLimits {
                per_node: 1,
                ..limits()
            },
            true,
        );
        let _poll = long_poll(&server);
        // The node's next connection is refused without the service reading or waiting on it
        // (it sends nothing).
        let refused = read_response(server.connect());
        assert_eq!(refused.status, 503);
        assert_eq!(
            refused.body,
            b"too many connections from this address: at most 1 at once\n"
        );
    }

    #[test]
    fn a_request_not_complete_by_the_deadline_expires() {
        let server = Server::start(
            ApiLimits {
                request_deadline: Duration::from_millis(500),
                ..limits()
            },
            true,
        );
        let mut slow = server.connect();
        slow.write_all(b"POST /v1/sync HTTP/1.1\r\n").unwrap();
        let expired = read_response(slow);
        assert_eq!(expired.status, 408);
        assert_eq!(expired.body, b"request not complete within 500 ms\n");
    }

    #[test]
    fn stopping_answers_the_long_polls_then_refuses_connections() {
        // A short grace: were the poll not answered at the stop, `serve` would return with it
        // still waiting for its minute.
        let mut server = Server::start(
            ApiLimits {
                grace: Duration::from_secs(1),
                ..limits()
            },
            true,
        );
        let poll = long_poll(&server);
        let (answered, answer) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || answered.send(read_response(poll)).unwrap());
        server.stop().expect("serve returns Ok on shutdown");
        let reply = answer
            .recv_timeout(Duration::from_secs(30))
            .expect("the long poll was not answered within 30 s of the stop");
        assert_eq!(reply.status, 200);
        let sync: SyncReply = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(sync.versions, [1]);
        reader.join().unwrap();
        assert_eq!(
            TcpStream::connect(server.address).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused,
            "the stopped server still accepts"
        );
    }
}
