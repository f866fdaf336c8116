//! The node's management sshd: what `tlm ansible` reaches. When the active version lists
//! `node_ssh_authorized_keys`, the daemon runs the system's OpenSSH server (`/usr/sbin/sshd`,
//! package `openssh-server`) as its own child, configured entirely on its command line (the
//! host's `/etc/ssh/sshd_config` is not read):
//! - listening on the management address only, port 22, so nothing on a site's LAN or the
//!   underlay can reach it; restarted on the new address when the management link is remade;
//! - root logs in with those keys only (`<state>/ssh/authorized_keys`, rewritten when a version
//!   changes them; sshd reads it at every login), no passwords;
//! - its host key is made once in the state directory (`<state>/ssh/ssh_host_ed25519_key`, on
//!   the data partition on images), so it stays the same across boots and versions;
//! - restarted when it exits, after 1 s doubling to a minute; stopped when a version lists no
//!   keys, and when the daemon stops.
//!
//! [`decide`] is the pure rule; [`supervise`] carries it out.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use towalink_system::Shutdown;

use crate::lifecycle::Node;

/// The port sshd listens on, on the management address.
pub const SSH_PORT: u16 = 22;

/// Where the system's sshd may be.
const SSHD: &[&str] = &["/usr/sbin/sshd", "/usr/bin/sshd"];

const CHECK_EVERY: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What to do with the sshd child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Start(Ipv6Addr),
    /// It listens on another address than the management link has now.
    Restart(Ipv6Addr),
    Stop,
}

/// The rule: an sshd runs exactly when the active version has keys and the management link
/// has its address, listening on that address. `running`: the address the running sshd was
/// started on; `retry_due`: the backoff after its last exit is over.
pub fn decide(
    has_keys: bool,
    address: Option<Ipv6Addr>,
    running: Option<Ipv6Addr>,
    retry_due: bool,
) -> Action {
    match (has_keys, address, running) {
        (true, Some(now), Some(was)) if now == was => Action::Nothing,
        (true, Some(now), Some(_)) => Action::Restart(now),
        (true, Some(now), None) if retry_due => Action::Start(now),
        (true, Some(_), None) => Action::Nothing,
        (_, _, Some(_)) => Action::Stop,
        (_, _, None) => Action::Nothing,
    }
}

/// The `authorized_keys` text of `keys` (each checked; a bad one is skipped with a warning).
pub fn authorized_keys(keys: &[String]) -> String {
    let mut text = String::new();
    for key in keys {
        match towalink_bundle::ssh::check_public_key(key) {
            Ok(()) => {
                text.push_str(key.trim());
                text.push('\n');
            }
            Err(why) => tracing::warn!(why, "node_ssh_authorized_keys: a key is skipped"),
        }
    }
    text
}

/// sshd's arguments: everything on the command line, nothing from `/etc/ssh`.
pub fn sshd_args(
    address: Ipv6Addr,
    host_key: &Path,
    authorized_keys: &Path,
    pid_file: &Path,
) -> Vec<String> {
    let option = |o: String| ["-o".to_string(), o];
    let mut args = vec![
        "-D".to_string(),
        "-e".to_string(),
        "-f".to_string(),
        "/dev/null".to_string(),
        "-h".to_string(),
        host_key.display().to_string(),
    ];
    for o in [
        format!("ListenAddress=[{address}]:{SSH_PORT}"),
        format!("AuthorizedKeysFile={}", authorized_keys.display()),
        "PermitRootLogin=prohibit-password".into(),
        "PasswordAuthentication=no".into(),
        "KbdInteractiveAuthentication=no".into(),
        "Subsystem=sftp internal-sftp".into(),
        format!("PidFile={}", pid_file.display()),
    ] {
        args.extend(option(o));
    }
    args
}

struct Running {
    child: Child,
    address: Ipv6Addr,
    since: Instant,
}

fn stop(running: &mut Option<Running>) {
    if let Some(mut r) = running.take() {
        // SIGTERM: sshd closes its listener; logged-in sessions keep their own processes.
        let _ = towalink_system::shutdown::terminate(r.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = r.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}

fn ensure_host_key(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "towalink-node", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run ssh-keygen (openssh): {e}"))?;
    anyhow::ensure!(status.success(), "ssh-keygen failed ({status})");
    Ok(())
}

fn start(node: &Node, address: Ipv6Addr) -> anyhow::Result<Child> {
    let sshd = SSHD
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no sshd installed ({}): install openssh-server",
                SSHD.join(", ")
            )
        })?;
    let dir = node.state.path("ssh");
    let host_key = dir.join("ssh_host_ed25519_key");
    ensure_host_key(&host_key)?;
    // Debian's sshd wants its privilege separation directory (Alpine's is /var/empty).
    if !Path::new("/run/sshd").exists() {
        let _ = std::fs::create_dir_all("/run/sshd");
    }
    let mut command = Command::new(&sshd);
    // SAFETY: between fork and exec only prctl(2), which is async-signal-safe, is called.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        command.pre_exec(|| {
            // The daemon gone (even by SIGKILL), its sshd goes too: no listener left on an
            // address the next daemon start needs.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let child = command
        .args(sshd_args(
            address,
            &host_key,
            &dir.join("authorized_keys"),
            &dir.join("sshd.pid"),
        ))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", sshd.display()))?;
    Ok(child)
}

/// Writes the keys file when its content changes (0600 in a 0700 directory: sshd's strict
/// modes accept it).
fn write_keys(node: &Node, text: &str) -> anyhow::Result<()> {
    let dir = node.state.path("ssh");
    let path = dir.join("authorized_keys");
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    crate::state::write_atomic(&path, text.as_bytes(), 0o600)?;
    Ok(())
}

/// Runs until `shutdown`: keeps the sshd child as [`decide`] says.
pub fn supervise(
    node: Node,
    management_address: impl Fn() -> Option<Ipv6Addr>,
    shutdown: &Shutdown,
) {
    let mut running: Option<Running> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut retry_at = Instant::now();
    let mut last_error = String::new();
    loop {
        let keys = node
            .active_config()
            .map(|c| c.node_ssh_authorized_keys)
            .unwrap_or_default();
        let text = if keys.is_empty() {
            String::new()
        } else {
            authorized_keys(&keys)
        };
        if !text.is_empty() {
            if let Err(error) = write_keys(&node, &text) {
                tracing::warn!(error = %format!("{error:#}"), "cannot write the management sshd's authorized_keys");
            }
        }
        if let Some(r) = running.as_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                if r.since.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                if r.since.elapsed() < Duration::from_secs(5) {
                    tracing::warn!(%status, address = %r.address, port = SSH_PORT, retry_in_s = backoff.as_secs(), "management sshd exited at start (its log above says why; port 22 of the management address taken by the host's own sshd listening on every address? docs/host-setup.md)");
                } else {
                    tracing::warn!(%status, address = %r.address, retry_in_s = backoff.as_secs(), "management sshd exited");
                }
                running = None;
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        let address = management_address();
        let action = decide(
            !text.is_empty(),
            address,
            running.as_ref().map(|r| r.address),
            Instant::now() >= retry_at,
        );
        match action {
            Action::Nothing => {}
            Action::Stop => {
                tracing::info!("management sshd stopped (no keys or no management address)");
                stop(&mut running);
            }
            Action::Start(address) | Action::Restart(address) => {
                stop(&mut running);
                match start(&node, address) {
                    Ok(child) => {
                        tracing::info!(%address, port = SSH_PORT, "management sshd started");
                        last_error.clear();
                        running = Some(Running {
                            child,
                            address,
                            since: Instant::now(),
                        });
                    }
                    Err(error) => {
                        let message = format!("{error:#}");
                        if message != last_error {
                            tracing::warn!(error = %message, "cannot start the management sshd");
                            last_error = message;
                        }
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        if shutdown.sleep(CHECK_EVERY) {
            break;
        }
    }
    stop(&mut running);
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv6Addr = Ipv6Addr::new(0xfd54, 0, 0, 0, 0, 0, 1, 1);
    const B: Ipv6Addr = Ipv6Addr::new(0xfd54, 0, 0, 0, 0, 0, 1, 2);

    #[test]
    fn sshd_runs_exactly_with_keys_and_an_address_on_that_address() {
        assert_eq!(decide(true, Some(A), None, true), Action::Start(A));
        assert_eq!(
            decide(true, Some(A), None, false),
            Action::Nothing,
            "backoff"
        );
        assert_eq!(decide(true, Some(A), Some(A), true), Action::Nothing);
        assert_eq!(decide(true, Some(B), Some(A), true), Action::Restart(B));
        assert_eq!(decide(false, Some(A), Some(A), true), Action::Stop);
        assert_eq!(decide(true, None, Some(A), true), Action::Stop);
        assert_eq!(decide(false, Some(A), None, true), Action::Nothing);
        assert_eq!(decide(true, None, None, true), Action::Nothing);
    }

    #[test]
    fn listens_on_the_management_address_only_with_keys_only() {
        let args = sshd_args(
            A,
            Path::new("/s/k"),
            Path::new("/s/ak"),
            Path::new("/s/pid"),
        )
        .join(" ");
        assert!(args.contains("-f /dev/null"), "{args}");
        assert!(args.contains("-o ListenAddress=[fd54::1:1]:22"), "{args}");
        assert!(args.contains("-o PasswordAuthentication=no"), "{args}");
        assert!(args.contains("-o AuthorizedKeysFile=/s/ak"), "{args}");
        assert_eq!(args.matches("ListenAddress").count(), 1);
    }

    #[test]
    fn bad_keys_are_left_out_of_authorized_keys() {
        let good =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqJ5Ql0nU7G0C5oCaVb2NOdU7I4Ux3cYJxG6qkV3T6P a@b";
        let text = authorized_keys(&[good.into(), "ssh-ed25519 nope".into()]);
        assert_eq!(text, format!("{good}\n"));
    }
}
