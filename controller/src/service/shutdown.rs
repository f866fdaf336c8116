//! The service's stop signal: one [`Shutdown`], cloned into every loop of the service (the
//! API's accept loop, the hub's reload and heartbeat loop). Triggered once, by SIGTERM/SIGINT
//! in `tlm serve` ([`stop_on_signals`]) or by a test; every loop notices it at once, whether
//! it sleeps ([`Shutdown::sleep`]) or waits on a socket ([`Shutdown::wake_fd`] in its poll).

use std::io::Write as _;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::Error;

/// A stop signal shared by the service's threads. Cloning it shares it.
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
    pub fn new() -> Result<Shutdown, Error> {
        let (receiver, sender) = UnixStream::pair()
            .map_err(|e| Error::Service(format!("cannot make the stop signal: {e}")))?;
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

/// Makes SIGTERM and SIGINT trigger `shutdown`; a second one ends the process at once
/// (exit status 1). The signals are blocked in the calling thread and taken by a thread of
/// their own (`sigwait`), so no code runs in a signal handler: call this before the process
/// starts any other thread, which inherit the blocked set (programs it runs do not: the
/// standard library resets their signal mask).
pub fn stop_on_signals(shutdown: &Shutdown) -> Result<(), Error> {
    // SAFETY: sigset_t is plain data that sigemptyset initializes; sigaddset and
    // pthread_sigmask get valid pointers to it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(Error::Service(format!(
                "cannot block SIGTERM and SIGINT: {}",
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        set
    };
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut signal = 0;
            // SAFETY: sigwait reads the set and writes the signal number into `signal`.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            let name = if signal == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            if shutdown.is_triggered() {
                tracing::warn!(signal = name, "second stop signal: stopping at once");
                std::process::exit(1);
            }
            tracing::info!(
                signal = name,
                "stopping: no new connections, the ones in flight finish"
            );
            shutdown.trigger();
        })
        .map_err(|e| Error::Service(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_wakes_sleepers_and_pollers() {
        let shutdown = Shutdown::new().unwrap();
        assert!(!shutdown.sleep(Duration::from_millis(1)));
        let readable = |fd: BorrowedFd<'_>| {
            let mut poll = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd for a descriptor the shutdown keeps open; timeout 0.
            unsafe { libc::poll(&mut poll, 1, 0) == 1 }
        };
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
