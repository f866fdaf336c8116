//! The stop signal of a long-running program (`tlm serve`, `towalink-node run`): one
//! [`Shutdown`], cloned into every loop that must end. It is triggered once, by SIGTERM or
//! SIGINT ([`stop_on_signals`]) or by a test, and every loop notices at once, whether it
//! checks it between steps ([`Shutdown::is_triggered`]), sleeps ([`Shutdown::sleep`]) or
//! waits on a socket ([`Shutdown::wake_fd`] in its `poll`).

use std::io::Write as _;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

/// A stop signal shared by a program's threads. Cloning it shares it.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    triggered: Mutex<bool>,
    changed: Condvar,
    /// Readable once triggered (a byte is written to `sender` and never read), so a thread
    /// waiting in `poll` on a socket can wait on this too.
    receiver: UnixStream,
    sender: UnixStream,
}

impl Shutdown {
    /// A stop signal not triggered yet. Fails only when no socket pair can be made (out of
    /// descriptors).
    pub fn new() -> std::io::Result<Shutdown> {
        let (receiver, sender) = UnixStream::pair()?;
        Ok(Shutdown(Arc::new(Inner {
            triggered: Mutex::new(false),
            changed: Condvar::new(),
            receiver,
            sender,
        })))
    }

    /// Asks every loop to stop. Later calls change nothing.
    pub fn trigger(&self) {
        let mut triggered = self.0.triggered.lock().unwrap_or_else(|e| e.into_inner());
        if !*triggered {
            *triggered = true;
            let _ = (&self.0.sender).write_all(&[1]);
            self.0.changed.notify_all();
        }
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.triggered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps for `duration`, or less when the stop is (or was) triggered; returns whether
    /// it was.
    pub fn sleep(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        let mut triggered = self.0.triggered.lock().unwrap_or_else(|e| e.into_inner());
        while !*triggered {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            triggered = self
                .0
                .changed
                .wait_timeout(triggered, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *triggered
    }

    /// A descriptor that becomes readable (and stays so) when the stop is triggered.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.0.receiver.as_fd()
    }
}

/// Makes SIGTERM and SIGINT trigger `shutdown`, logging `stopping` (at info, with the
/// signal's name) before it does; a second one ends the process at once with exit status 1.
///
/// The signals are blocked in the calling thread and taken by a thread of their own
/// (`sigwait`), so no code runs in a signal handler. Call this before the program starts any
/// other thread: threads inherit the blocked set (programs they run do not: the standard
/// library resets their signal mask).
pub fn stop_on_signals(shutdown: &Shutdown, stopping: &'static str) -> std::io::Result<()> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(std::io::Error::from)?;
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(signal) = signals.wait() {
                if shutdown.is_triggered() {
                    tracing::warn!(%signal, "second stop signal: exiting now");
                    std::process::exit(1);
                }
                // Logged before the trigger: the process may end as soon as it is triggered.
                tracing::info!(%signal, "{stopping}");
                shutdown.trigger();
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags};

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        poll(&mut fds, Some(&rustix::event::Timespec::default())).unwrap() == 1
    }

    #[test]
    fn a_trigger_wakes_sleepers_and_pollers() {
        let shutdown = Shutdown::new().unwrap();
        assert!(!shutdown.is_triggered());
        assert!(!shutdown.sleep(Duration::from_millis(1)));
        assert!(!readable(shutdown.wake_fd()));
        let sleeper = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || shutdown.sleep(Duration::from_secs(60)))
        };
        shutdown.trigger();
        shutdown.trigger();
        assert!(
            sleeper.join().unwrap(),
            "the sleeper did not see the trigger"
        );
        assert!(shutdown.is_triggered());
        assert!(shutdown.sleep(Duration::from_secs(60)));
        assert!(readable(shutdown.wake_fd()));
        assert!(readable(shutdown.wake_fd()), "stays readable");
    }
}
