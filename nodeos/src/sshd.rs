//! The node's management sshd: what `tlm ansible` reaches. When the active version lists
//! `node_ssh_authorized_keys`, the daemon listens on port 22 of the management address, the
//! socket bound to the management interface (as the metrics listener), and hands each
//! connection to the system's OpenSSH server in inetd mode (`/usr/sbin/sshd -i`, package
//! `openssh-server`), configured entirely on its command line (the host's
//! `/etc/ssh/sshd_config` is not read):
//! - only the management link reaches it: a packet for the management address that arrives on
//!   a LAN or underlay interface finds no listener; moved to the new address when the link is
//!   remade;
//! - root logs in with those keys only (`<state>/ssh/authorized_keys`, rewritten when a version
//!   changes them; sshd reads it at every login), no passwords, no other user;
//! - its host key is made once in the state directory (`<state>/ssh/ssh_host_ed25519_key`, on
//!   the data partition on images), so it stays the same across boots and versions;
//! - at most [`MAX_SESSIONS`] connections at once; a session outlives a daemon restart (an
//!   Ansible task that upgrades the node keeps its connection), a dead peer ends it within a
//!   minute (`ClientAlive*`);
//! - the listener closes when a version lists no keys, and when the daemon stops.
//!
//! [`decide`] is the pure rule; [`supervise`] carries it out.

use std::net::{Ipv6Addr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use towalink_system::Shutdown;

use crate::lifecycle::Node;

/// The port sshd serves on the management address.
pub const SSH_PORT: u16 = 22;

/// Connections served at once; more are closed at once.
pub const MAX_SESSIONS: usize = 16;

/// Where the system's sshd may be.
const SSHD: &[&str] = &["/usr/sbin/sshd", "/usr/bin/sshd"];

const CHECK_EVERY: Duration = Duration::from_secs(2);
const ACCEPT_EVERY: Duration = Duration::from_millis(100);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What to do with the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Listen(Ipv6Addr),
    /// It listens on another address than the management link has now.
    Move(Ipv6Addr),
    Close,
}

/// The rule: the listener is open exactly when the active version has keys and the
/// management link has its address, on that address. `listening`: the address it is open on;
/// `retry_due`: the backoff after a failed bind is over.
pub fn decide(
    has_keys: bool,
    address: Option<Ipv6Addr>,
    listening: Option<Ipv6Addr>,
    retry_due: bool,
) -> Action {
    match (has_keys, address, listening) {
        (true, Some(now), Some(was)) if now == was => Action::Nothing,
        (true, Some(now), Some(_)) => Action::Move(now),
        (true, Some(now), None) if retry_due => Action::Listen(now),
        (true, Some(_), None) => Action::Nothing,
        (_, _, Some(_)) => Action::Close,
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

/// sshd's arguments for one connection on stdin/stdout: everything on the command line,
/// nothing from `/etc/ssh`.
pub fn sshd_args(host_key: &Path, authorized_keys: &Path) -> Vec<String> {
    let mut args = vec![
        "-i".to_string(),
        "-e".to_string(),
        "-f".to_string(),
        "/dev/null".to_string(),
        "-h".to_string(),
        host_key.display().to_string(),
    ];
    for option in [
        format!("AuthorizedKeysFile={}", authorized_keys.display()),
        "AllowUsers=root".into(),
        "PermitRootLogin=prohibit-password".into(),
        "PasswordAuthentication=no".into(),
        "KbdInteractiveAuthentication=no".into(),
        // Where sshd has PAM (Debian), its account checks instead of the locked-password test
        // a root without a password (`!` in shadow) fails; elsewhere sshd notes it unsupported.
        "UsePAM=yes".into(),
        "ClientAliveInterval=15".into(),
        "ClientAliveCountMax=4".into(),
        "Subsystem=sftp internal-sftp".into(),
    ] {
        args.push("-o".into());
        args.push(option);
    }
    args
}

fn sshd_binary() -> Option<PathBuf> {
    SSHD.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Makes the host key once: written beside and renamed into place, so a power cut leaves the
/// whole key or none.
fn ensure_host_key(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let temp = path.with_file_name(".ssh_host_ed25519_key.new");
    let _ = std::fs::remove_file(&temp);
    let _ = std::fs::remove_file(temp.with_extension("new.pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "towalink-node", "-f"])
        .arg(&temp)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run ssh-keygen (openssh): {e}"))?;
    anyhow::ensure!(status.success(), "ssh-keygen failed ({status})");
    std::fs::rename(
        format!("{}.pub", temp.display()),
        format!("{}.pub", path.display()),
    )?;
    std::fs::rename(&temp, path)?;
    crate::state::sync_dir(path.parent().expect("in the state directory"))?;
    Ok(())
}

/// Writes the keys file when its content changes (0600 in a 0700 directory: sshd's strict
/// modes accept it).
fn write_keys(dir: &Path, text: &str) -> anyhow::Result<()> {
    let path = dir.join("authorized_keys");
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    crate::state::write_atomic(&path, text.as_bytes(), 0o600)?;
    Ok(())
}

/// One connection handed to `sshd -i`.
fn serve(sshd: &Path, dir: &Path, stream: std::net::TcpStream) -> anyhow::Result<Child> {
    stream.set_nonblocking(false)?;
    let socket: OwnedFd = stream.into();
    let child = Command::new(sshd)
        .args(sshd_args(
            &dir.join("ssh_host_ed25519_key"),
            &dir.join("authorized_keys"),
        ))
        .stdin(Stdio::from(socket.try_clone()?))
        .stdout(Stdio::from(socket))
        .spawn()?;
    Ok(child)
}

fn listen(dir: &Path, address: Ipv6Addr) -> anyhow::Result<TcpListener> {
    anyhow::ensure!(
        sshd_binary().is_some(),
        "no sshd installed ({}): install openssh-server",
        SSHD.join(", ")
    );
    ensure_host_key(&dir.join("ssh_host_ed25519_key"))?;
    // Debian's sshd wants its privilege separation directory (Alpine's is /var/empty); its
    // own service makes it, which need not run.
    if !Path::new("/run/sshd").exists() {
        let _ = std::fs::create_dir_all("/run/sshd");
    }
    let listener = crate::dataplane::management_listener(address, SSH_PORT).map_err(|e| {
        anyhow::anyhow!("cannot listen on [{address}]:{SSH_PORT} (the host's own sshd on every address? docs/host-setup.md): {e}")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Runs until `shutdown`: keeps the listener as [`decide`] says and serves its connections.
pub fn supervise(
    node: Node,
    management_address: impl Fn() -> Option<Ipv6Addr>,
    shutdown: &Shutdown,
) {
    let dir = node.state.path("ssh");
    let mut listening: Option<(TcpListener, Ipv6Addr)> = None;
    let mut sessions: Vec<Child> = Vec::new();
    let mut backoff = FIRST_BACKOFF;
    let mut retry_at = Instant::now();
    let mut last_error = String::new();
    let mut checked: Option<Instant> = None;
    // The last keys read: a version that cannot be read for a moment keeps them.
    let mut keys_text = String::new();
    while !shutdown.is_triggered() {
        if checked.is_none_or(|c| c.elapsed() >= CHECK_EVERY) {
            checked = Some(Instant::now());
            if let Some(config) = node.active_config() {
                keys_text = authorized_keys(&config.node_ssh_authorized_keys);
            } else if node.state.current().is_none() {
                keys_text.clear();
            }
            if !keys_text.is_empty() {
                if let Err(error) = write_keys(&dir, &keys_text) {
                    tracing::warn!(error = %format!("{error:#}"), "cannot write the management sshd's authorized_keys");
                }
            }
            let action = decide(
                !keys_text.is_empty(),
                management_address(),
                listening.as_ref().map(|(_, a)| *a),
                Instant::now() >= retry_at,
            );
            match action {
                Action::Nothing => {}
                Action::Close => {
                    tracing::info!("management sshd closed (no keys or no management address)");
                    listening = None;
                }
                Action::Listen(address) | Action::Move(address) => {
                    listening = None;
                    match listen(&dir, address) {
                        Ok(listener) => {
                            tracing::info!(%address, port = SSH_PORT, "management sshd listening");
                            listening = Some((listener, address));
                            last_error.clear();
                            backoff = FIRST_BACKOFF;
                        }
                        Err(error) => {
                            let message = format!("{error:#}");
                            if message != last_error {
                                tracing::warn!(error = %message, "management sshd: cannot listen; retrying");
                                last_error = message;
                            }
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
        }
        sessions.retain_mut(|child| !matches!(child.try_wait(), Ok(Some(_))));
        if let Some((listener, _)) = &listening {
            while let Ok((stream, peer)) = listener.accept() {
                if sessions.len() >= MAX_SESSIONS {
                    tracing::warn!(%peer, "management sshd: {MAX_SESSIONS} sessions already; connection closed");
                    continue;
                }
                match sshd_binary().map(|sshd| serve(&sshd, &dir, stream)) {
                    Some(Ok(child)) => sessions.push(child),
                    Some(Err(error)) => {
                        tracing::warn!(error = %format!("{error:#}"), "management sshd: cannot start sshd -i")
                    }
                    None => tracing::warn!("management sshd: sshd is gone"),
                }
            }
        }
        shutdown.sleep(ACCEPT_EVERY);
    }
    // Sessions in progress are left to end by themselves (a restart keeps them).
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv6Addr = Ipv6Addr::new(0xfd54, 0, 0, 0, 0, 0, 1, 1);
    const B: Ipv6Addr = Ipv6Addr::new(0xfd54, 0, 0, 0, 0, 0, 1, 2);

    #[test]
    fn listening_exactly_with_keys_and_an_address_on_that_address() {
        assert_eq!(decide(true, Some(A), None, true), Action::Listen(A));
        assert_eq!(
            decide(true, Some(A), None, false),
            Action::Nothing,
            "backoff"
        );
        assert_eq!(decide(true, Some(A), Some(A), true), Action::Nothing);
        assert_eq!(decide(true, Some(B), Some(A), true), Action::Move(B));
        assert_eq!(decide(false, Some(A), Some(A), true), Action::Close);
        assert_eq!(decide(true, None, Some(A), true), Action::Close);
        assert_eq!(decide(false, Some(A), None, true), Action::Nothing);
        assert_eq!(decide(true, None, None, true), Action::Nothing);
    }

    #[test]
    fn root_with_the_keys_only_and_nothing_from_etc_ssh() {
        let args = sshd_args(Path::new("/s/k"), Path::new("/s/ak")).join(" ");
        assert!(args.starts_with("-i -e -f /dev/null -h /s/k"), "{args}");
        for option in [
            "-o AuthorizedKeysFile=/s/ak",
            "-o AllowUsers=root",
            "-o PasswordAuthentication=no",
            "-o KbdInteractiveAuthentication=no",
        ] {
            assert!(args.contains(option), "{option} in {args}");
        }
    }

    #[test]
    fn bad_keys_are_left_out_of_authorized_keys() {
        let good =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqJ5Ql0nU7G0C5oCaVb2NOdU7I4Ux3cYJxG6qkV3T6P a@b";
        let text = authorized_keys(&[good.into(), "ssh-ed25519 nope".into()]);
        assert_eq!(text, format!("{good}\n"));
    }
}
