//! How the node API holds under a hostile node: a cap on the connections one source (one
//! node's management address) holds at once, a global cap sized from the process's file limit,
//! a deadline for the whole request (not per read), a deadline for the whole response, back-off
//! when `accept` runs out of descriptors, and logs that say so once per burst instead of once
//! per connection. Long polls are the service's wait, not the node's: the request deadline ends
//! when the request is read, and a waiting long poll notices when its node hangs up, so it
//! frees its slot at once.
//!
//! The counting and the pacing are pure ([`Tally`], [`Burst`], [`Backoff`],
//! [`connection_cap`]); the effects are small functions on a socket or the process.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Connections one source may hold at once. A node needs one (its sync, then its downloads one
/// after another); the rest is headroom for a restarted daemon whose old long poll the service
/// has not yet noticed is gone.
pub const PER_NODE_CONNECTIONS: usize = 8;
/// The whole request (head and body) must arrive within this time of the accept.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The whole response must be written within this time (the node gives a bundle download
/// 60 s).
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(60);
/// A refusal (400, 403, 408, 413, 503) is a few bytes: the peer gets this long to take them.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);
/// The API listener's backlog: every node of a large fleet may connect at the same moment
/// (the fleet benchmark: with std's 128, 1,000 nodes overflowed it 296 times, and nodes saw
/// second-long SYN retransmits and resets).
pub const LISTEN_BACKLOG: i32 = 4096;
/// How often a waiting long poll checks whether its node hung up.
pub const HANGUP_CHECK: Duration = Duration::from_secs(1);
/// How long a stopping service waits for the connections in flight to end (long polls are
/// answered at once; a request being read gets its deadline). Connections still open after
/// it are closed when the process exits; their nodes ask again.
pub const SHUTDOWN_GRACE: Duration = REQUEST_DEADLINE;
/// Descriptors kept for everything but connections (the WireGuard device, the listener,
/// status writes, bundle reads, logs).
const FD_RESERVE: u64 = 64;
/// Bounds of the global cap: every connection is a thread.
const MIN_CONNECTIONS: usize = 16;
const MAX_CONNECTIONS: usize = 8192;
/// One log line per burst: a burst ends after this long without the event.
const BURST_QUIET: Duration = Duration::from_secs(10);
/// Back-off after `accept` fails for want of descriptors or memory.
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The global connection cap for a file limit: half of what is left after the reserve (a
/// connection may briefly need a second descriptor, to read a bundle or write a status file),
/// within [16, 8192]. Pure.
pub fn connection_cap(file_limit: u64) -> usize {
    let cap = file_limit.saturating_sub(FD_RESERVE) / 2;
    (cap.min(MAX_CONNECTIONS as u64) as usize).max(MIN_CONNECTIONS)
}

/// The limits one API server runs with: [`ApiLimits::for_file_limit`] in `tlm serve`, smaller
/// ones in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections one source may hold at once.
    pub per_node: usize,
    /// Connections in all.
    pub connections: usize,
    /// The whole request must arrive within this time of the accept.
    pub request_deadline: Duration,
    /// How long a stopping server waits for its connections to end.
    pub grace: Duration,
}

impl ApiLimits {
    /// The service's limits for a process allowed `file_limit` open files. Pure.
    pub fn for_file_limit(file_limit: u64) -> ApiLimits {
        ApiLimits {
            per_node: PER_NODE_CONNECTIONS,
            connections: connection_cap(file_limit),
            request_deadline: REQUEST_DEADLINE,
            grace: SHUTDOWN_GRACE,
        }
    }
}

/// Raises the soft limit on open files to the hard one (at most 2^20, the kernel's default
/// `nr_open`). Returns the limit in force afterwards, and the one before.
pub fn raise_file_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None`: no limit (RLIM_INFINITY).
    let before = limit.current.unwrap_or(u64::MAX);
    let wanted = limit.maximum.unwrap_or(u64::MAX).min(1 << 20);
    if wanted <= before {
        return Ok((before, before));
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised)?;
    Ok((wanted, before))
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source holds [`PER_NODE_CONNECTIONS`] already.
    Source,
    /// The service holds its global cap.
    Total,
}

/// Connections held, per source and in all. Pure.
#[derive(Debug)]
pub struct Tally {
    per_source: HashMap<IpAddr, usize>,
    total: usize,
    source_cap: usize,
    total_cap: usize,
}

impl Tally {
    pub fn new(source_cap: usize, total_cap: usize) -> Tally {
        Tally {
            per_source: HashMap::new(),
            total: 0,
            source_cap,
            total_cap,
        }
    }

    /// Counts a connection from `source`, or says why not.
    pub fn admit(&mut self, source: IpAddr) -> Result<(), Refusal> {
        let held = self.per_source.get(&source).copied().unwrap_or(0);
        if held >= self.source_cap {
            return Err(Refusal::Source);
        }
        if self.total >= self.total_cap {
            return Err(Refusal::Total);
        }
        self.per_source.insert(source, held + 1);
        self.total += 1;
        Ok(())
    }

    /// Forgets a connection [`admit`](Self::admit) counted.
    pub fn release(&mut self, source: IpAddr) {
        if let Some(held) = self.per_source.get_mut(&source) {
            *held -= 1;
            self.total -= 1;
            if *held == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    pub fn held(&self, source: IpAddr) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// The shared [`Tally`] of the running service, and the signal that a slot was released.
#[derive(Debug, Clone)]
pub struct Slots(Arc<(Mutex<Tally>, Condvar)>);

/// A connection counted in [`Slots`]; dropping it releases the slot.
#[derive(Debug)]
pub struct Slot {
    slots: Slots,
    source: IpAddr,
}

impl Slots {
    pub fn new(source_cap: usize, total_cap: usize) -> Slots {
        Slots(Arc::new((
            Mutex::new(Tally::new(source_cap, total_cap)),
            Condvar::new(),
        )))
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn take(&self, source: IpAddr) -> Result<Slot, Refusal> {
        self.tally().admit(source)?;
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }

    /// Connections held from `source`, and in all.
    pub fn held(&self, source: IpAddr) -> (usize, usize) {
        let tally = self.tally();
        (tally.held(source), tally.total())
    }

    /// Waits until every slot is released, or `within` passed; returns how many are held.
    pub fn drain(&self, within: Duration) -> usize {
        let until = Instant::now() + within;
        let mut tally = self.tally();
        while tally.total() > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tally = self
                .0
                 .1
                .wait_timeout(tally, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        tally.total()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.tally().release(self.source);
        self.slots.0 .1.notify_all();
    }
}

/// One log line per burst of the same event: the first event of a burst is logged, the
/// following ones are counted, and the next event after [`BURST_QUIET`] is logged with that
/// count. Pure (time is passed in).
#[derive(Debug, Default)]
pub struct Burst {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl Burst {
    /// Notes an event; `Some(n)` when it should be logged, `n` events having gone unlogged
    /// since the last line.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(at) if now.duration_since(at) < BURST_QUIET => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Pacing of `accept` after it failed for want of resources: sleep 20 ms, doubling up to
/// 500 ms, until an accept succeeds. Pure.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u64,
    delay: Duration,
}

impl Backoff {
    /// Notes a failure; returns how long to sleep and whether it starts a burst (log it).
    pub fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.delay = if self.failures == 1 {
            BACKOFF_FIRST
        } else {
            (self.delay * 2).min(BACKOFF_MAX)
        };
        (self.delay, self.failures == 1)
    }

    /// Notes a success; returns the failures of the burst it ends, if any.
    pub fn succeeded(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0).then_some(failures)
    }
}

/// Whether `accept` failed for the one connection only (it was reset before it was taken,
/// or a signal came): the next one may be taken at once. Any other failure (out of
/// descriptors, EMFILE/ENFILE, or of buffers or memory) leaves the pending connection queued,
/// so trying again at once would only spin: the accept loop backs off.
pub fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    ) || matches!(
        rustix::io::Errno::from_io_error(error),
        Some(rustix::io::Errno::PROTO | rustix::io::Errno::PERM)
    )
}

/// A socket whose reads and writes all end by one instant: each call gets the time left as
/// its timeout, so a peer sending a byte now and then cannot stretch the exchange.
pub struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl<'a> Deadline<'a> {
    pub fn new(stream: &'a TcpStream, within: Duration) -> Deadline<'a> {
        Deadline {
            stream,
            until: Instant::now() + within,
        }
    }

    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deadline passed",
            ));
        }
        Ok(left)
    }
}

/// Whether an I/O error means the deadline (or a socket timeout under it) passed.
pub fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether the peer closed or reset the connection, checked without blocking and without
/// reading anything (also when it sent more before closing). A client that shuts down its
/// sending side while waiting for the answer counts as gone; the nodes never do.
pub fn peer_gone(stream: &TcpStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
    let n = poll(&mut fds, Some(&Timespec::default())).unwrap_or(0);
    n > 0
        && fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
}

/// Reads what the peer already sent without waiting (so closing does not reset the
/// connection and lose the refusal), then writes `response` without waiting. For refusals
/// made in the accept loop, which must never block on a peer.
pub fn refuse_at_once(stream: &TcpStream, response: &[u8]) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut stream = stream;
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = stream.write(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, TcpListener};

    fn node(n: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd54, 0, 0, 0, 0, 0, 1, n))
    }

    #[test]
    fn the_global_cap_follows_the_file_limit_within_bounds() {
        assert_eq!(connection_cap(1024), 480);
        assert_eq!(connection_cap(20_000), 9968.min(MAX_CONNECTIONS));
        assert_eq!(connection_cap(65_536), MAX_CONNECTIONS);
        assert_eq!(connection_cap(40), MIN_CONNECTIONS);
        assert_eq!(connection_cap(0), MIN_CONNECTIONS);
        assert_eq!(connection_cap(u64::MAX), MAX_CONNECTIONS);
    }

    #[test]
    fn one_source_cannot_take_the_slots_of_the_others() {
        let mut tally = Tally::new(3, 5);
        for _ in 0..3 {
            tally.admit(node(1)).unwrap();
        }
        assert_eq!(tally.admit(node(1)), Err(Refusal::Source));
        assert_eq!(tally.admit(node(1)), Err(Refusal::Source));
        tally.admit(node(2)).unwrap();
        tally.admit(node(3)).unwrap();
        assert_eq!(tally.admit(node(4)), Err(Refusal::Total));
        assert_eq!(tally.total(), 5);
        tally.release(node(1));
        assert_eq!(tally.held(node(1)), 2);
        tally.admit(node(4)).unwrap();
        for _ in 0..2 {
            tally.release(node(1));
        }
        assert_eq!(tally.held(node(1)), 0);
        // Releasing what was never admitted changes nothing.
        tally.release(node(1));
        tally.release(node(9));
        assert_eq!(tally.total(), 3);
    }

    #[test]
    fn a_dropped_slot_is_free_again() {
        let slots = Slots::new(1, 10);
        let slot = slots.take(node(1)).unwrap();
        assert_eq!(slots.take(node(1)).unwrap_err(), Refusal::Source);
        assert_eq!(slots.held(node(1)), (1, 1));
        drop(slot);
        assert_eq!(slots.held(node(1)), (0, 0));
        assert!(slots.take(node(1)).is_ok());
    }

    #[test]
    fn draining_waits_for_the_last_slot() {
        let slots = Slots::new(4, 10);
        assert_eq!(
            slots.drain(Duration::ZERO),
            0,
            "nothing held, nothing to wait for"
        );
        let held = slots.take(node(1)).unwrap();
        assert_eq!(slots.drain(Duration::from_millis(10)), 1, "still held");
        let release = std::thread::spawn(move || drop(held));
        assert_eq!(
            slots.drain(Duration::from_secs(60)),
            0,
            "the slot released by another thread was not noticed within 60 s"
        );
        release.join().unwrap();
    }

    #[test]
    fn the_service_limits_follow_the_file_limit() {
        let limits = ApiLimits::for_file_limit(1024);
        assert_eq!(limits.connections, 480);
        assert_eq!(limits.per_node, PER_NODE_CONNECTIONS);
        assert_eq!(limits.request_deadline, REQUEST_DEADLINE);
    }

    #[test]
    fn a_burst_is_logged_once_with_its_count() {
        let mut burst = Burst::default();
        let t0 = Instant::now();
        assert_eq!(burst.note(t0), Some(0));
        for ms in [1, 500, 9_000] {
            assert_eq!(burst.note(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(burst.note(t0 + Duration::from_secs(11)), Some(3));
        assert_eq!(burst.note(t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn accept_backs_off_and_says_so_once() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.succeeded(), None);
        assert_eq!(backoff.failed(), (BACKOFF_FIRST, true));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.failed()).map(|(d, _)| d).collect();
        assert_eq!(delays[0], BACKOFF_FIRST * 2);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX);
        assert_eq!(backoff.succeeded(), Some(9));
        assert_eq!(backoff.failed(), (BACKOFF_FIRST, true));
    }

    #[test]
    fn exhaustion_is_told_apart_from_a_lost_connection() {
        use rustix::io::Errno;
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM] {
            let error = std::io::Error::from(errno);
            assert!(!is_transient(&error), "{error}");
        }
        for errno in [Errno::CONNABORTED, Errno::INTR, Errno::PROTO] {
            let error = std::io::Error::from(errno);
            assert!(is_transient(&error), "{error}");
        }
    }

    /// A peer that sends a byte every 100 ms never waits out a 300 ms per-read timeout, but
    /// does run out a 300 ms deadline.
    #[test]
    fn a_trickling_peer_runs_out_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let trickle = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut client = TcpStream::connect(address).unwrap();
                for byte in b"POST /v1/sync HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst)
                        || client.write_all(&[*byte]).is_err()
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let (server, _) = listener.accept().unwrap();
        let mut reader =
            std::io::BufReader::new(Deadline::new(&server, Duration::from_millis(300)));
        let error = towalink_bundle::wire::read_request(&mut reader, 1024).unwrap_err();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        match error {
            towalink_bundle::wire::WireError::Io(e) => assert!(is_timeout(&e), "{e}"),
            other => panic!("expected a timeout, got {other}"),
        }
        drop(server);
        trickle.join().unwrap();
    }

    #[test]
    fn a_closed_peer_is_noticed_without_reading_its_data() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!peer_gone(&server));
        client.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!peer_gone(&server), "data waiting is not a hangup");
        // Closed with a byte still unread: still noticed.
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !peer_gone(&server) {
            assert!(Instant::now() < deadline, "the hangup was never seen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
