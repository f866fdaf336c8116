//! Making an existing host a node (`towalink-node setup-host`, `bootstrap --setup-host`): the
//! routing daemon from the host's package manager, this binary at `/usr/sbin/towalink-node`,
//! the node service for the host's init system, forwarding sysctls, the service enabled and
//! started. [`detect`] and [`plan`] are pure; [`carry_out`] runs the steps, each one skipped
//! when the host already is as it says, so running it twice changes nothing.
//!
//! Supported: Alpine Linux with OpenRC (the same services the images carry, from `overlays/`),
//! Debian, Raspberry Pi OS and Ubuntu with systemd (`dist/towalink-node.service` and the
//! distribution's `bird.service`). Anything else is refused before anything is changed.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// Where the services expect the binary.
pub const BINARY: &str = "/usr/sbin/towalink-node";

/// The state directory the services use.
pub const STATE_DIR: &str = "/var/lib/towalink";

const SYSCTL: &str = include_str!("../../overlays/etc/sysctl.d/towalink.conf");
const OPENRC_NODE: &str = include_str!("../../overlays/etc/init.d/towalink-node");
const OPENRC_BIRD: &str = include_str!("../../overlays/etc/init.d/towalink-bird");
const OPENRC_NODE_CONF: &str = include_str!("../../overlays/etc/conf.d/towalink-node");
const SYSTEMD_NODE: &str = include_str!("../dist/towalink-node.service");

/// The host families this sets up, each with its package manager and init system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Alpine Linux: apk, OpenRC.
    Alpine,
    /// Debian and its derivatives (Raspberry Pi OS, Ubuntu): apt, systemd.
    Debian,
}

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub family: Family,
    /// `PRETTY_NAME` of os-release.
    pub name: String,
}

/// What the host offers besides its os-release.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// `systemctl` is there.
    pub systemd: bool,
    /// `openrc-run` is there.
    pub openrc: bool,
}

/// A host this does not set up, and why (one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported host `{name}`: {why}; towalink-node sets up Alpine Linux with OpenRC and Debian, Raspberry Pi OS or Ubuntu with systemd (nothing was changed)")]
pub struct Unsupported {
    pub name: String,
    pub why: String,
}

/// The `KEY=value` lines of os-release (values unquoted).
fn os_release_fields(text: &str) -> Vec<(&str, String)> {
    text.lines()
        .filter_map(|line| line.trim().split_once('='))
        .filter(|(key, _)| !key.starts_with('#'))
        .map(|(key, value)| {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            (key.trim(), unquoted.to_string())
        })
        .collect()
}

/// Which family the host is, from `/etc/os-release` and its init system.
pub fn detect(os_release: &str, facts: Facts) -> Result<Host, Unsupported> {
    let fields = os_release_fields(os_release);
    let field = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    };
    let id = field("ID").unwrap_or_default();
    let like = field("ID_LIKE").unwrap_or_default();
    let name = field("PRETTY_NAME")
        .or_else(|| field("NAME"))
        .unwrap_or_else(|| "(no os-release)".to_string());
    let ids: Vec<&str> = std::iter::once(id.as_str())
        .chain(like.split_whitespace())
        .collect();
    let unsupported = |why: String| Unsupported {
        name: name.clone(),
        why,
    };
    if ids.contains(&"alpine") {
        if !facts.openrc {
            return Err(unsupported("Alpine without OpenRC (no openrc-run)".into()));
        }
        return Ok(Host {
            family: Family::Alpine,
            name,
        });
    }
    if ids
        .iter()
        .any(|i| matches!(*i, "debian" | "raspbian" | "ubuntu"))
    {
        if !facts.systemd {
            return Err(unsupported(format!("{id} without systemd (no systemctl)")));
        }
        return Ok(Host {
            family: Family::Debian,
            name,
        });
    }
    Err(unsupported(if id.is_empty() {
        "/etc/os-release names no ID".into()
    } else {
        format!(
            "ID={id}{}",
            if like.is_empty() {
                String::new()
            } else {
                format!(", ID_LIKE={like}")
            }
        )
    }))
}

/// One thing to make true on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// These packages installed.
    Packages {
        manager: Family,
        names: Vec<&'static str>,
    },
    /// This program (the running `towalink-node`) at [`BINARY`]; the node service restarts
    /// when it changed.
    Binary,
    /// A file with this content and mode; `service` restarts when it changed. A settings file
    /// (`keep`) is written only when missing: what the administrator put there stays.
    File {
        path: PathBuf,
        content: String,
        mode: u32,
        service: Option<&'static str>,
        keep: bool,
    },
    /// The sysctl file's settings in force now (they hold from the next boot anyway).
    Sysctl { file: PathBuf },
    /// Services started at boot.
    Enable { services: Vec<&'static str> },
    /// Services running, each restarted when one of its files changed (the routing daemon is
    /// not restarted for a new node binary: BGP sessions stay up).
    Start { services: Vec<&'static str> },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Packages { manager, names } => write!(
                f,
                "{} {}",
                match manager {
                    Family::Alpine => "apk add",
                    Family::Debian => "apt-get install",
                },
                names.join(" ")
            ),
            Step::Binary => write!(f, "install this towalink-node as {BINARY}"),
            Step::File {
                path, mode, keep, ..
            } => write!(
                f,
                "write {} (mode {mode:04o}{})",
                path.display(),
                if *keep { ", when missing" } else { "" }
            ),
            Step::Sysctl { file } => write!(f, "sysctl -p {}", file.display()),
            Step::Enable { services } => write!(f, "start at boot: {}", services.join(" ")),
            Step::Start { services } => write!(f, "start now: {}", services.join(" ")),
        }
    }
}

/// The steps that make `host` a node. The last step starts the services; `bootstrap` pairs the
/// device before it.
pub fn plan(host: &Host) -> Vec<Step> {
    let file = |path: &str, content: &str, mode: u32, service: Option<&'static str>| Step::File {
        path: PathBuf::from(path),
        content: content.to_string(),
        mode,
        service,
        keep: false,
    };
    let sysctl = "/etc/sysctl.d/90-towalink.conf";
    // The family's own steps, then the same tail: forwarding, at boot, now.
    let (mut steps, services) = match host.family {
        Family::Alpine => (
            vec![
                Step::Packages {
                    manager: Family::Alpine,
                    names: vec!["bird"],
                },
                Step::Binary,
                file(
                    "/etc/init.d/towalink-node",
                    OPENRC_NODE,
                    0o755,
                    Some("towalink-node"),
                ),
                file(
                    "/etc/init.d/towalink-bird",
                    OPENRC_BIRD,
                    0o755,
                    Some("towalink-bird"),
                ),
                Step::File {
                    path: PathBuf::from("/etc/conf.d/towalink-node"),
                    content: OPENRC_NODE_CONF.to_string(),
                    mode: 0o644,
                    service: Some("towalink-node"),
                    keep: true,
                },
            ],
            vec!["towalink-bird", "towalink-node"],
        ),
        Family::Debian => (
            vec![
                Step::Packages {
                    manager: Family::Debian,
                    names: vec!["bird2"],
                },
                Step::Binary,
                file(
                    "/etc/systemd/system/towalink-node.service",
                    SYSTEMD_NODE,
                    0o644,
                    Some("towalink-node.service"),
                ),
            ],
            vec!["bird.service", "towalink-node.service"],
        ),
    };
    steps.extend([
        file(sysctl, SYSCTL, 0o644, None),
        Step::Sysctl {
            file: PathBuf::from(sysctl),
        },
        Step::Enable {
            services: services.clone(),
        },
        Step::Start { services },
    ]);
    steps
}

/// The node daemon's service on `family`'s init system.
pub fn node_service(family: Family) -> &'static str {
    match family {
        Family::Alpine => "towalink-node",
        Family::Debian => "towalink-node.service",
    }
}

/// Refuses a user other than root in one line, before anything is changed.
pub fn require_root() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    anyhow::ensure!(
        uid == 0,
        "setting the host up needs root (it installs packages and services): run it as root"
    );
    Ok(())
}

/// Whether a running towalink-node runs a binary that was since replaced (a restart an earlier
/// run changed the binary for but did not get to, e.g. a pairing that timed out).
fn node_runs_a_replaced_binary() -> bool {
    let replaced = format!("{BINARY} (deleted)");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .any(|e| {
            std::fs::read_link(e.path().join("exe"))
                .is_ok_and(|exe| exe.as_os_str().to_string_lossy() == replaced)
        })
}

/// Reads this host's os-release and looks for its init system.
pub fn detect_here() -> anyhow::Result<Host> {
    let os_release = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let exists = |p: &str| Path::new(p).exists();
    let facts = Facts {
        systemd: exists("/bin/systemctl") || exists("/usr/bin/systemctl"),
        openrc: exists("/sbin/openrc-run") || exists("/usr/sbin/openrc-run"),
    };
    Ok(detect(&os_release, facts)?)
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Changed,
    Unchanged,
    /// Could not be done here (e.g. the init system is not running); the line says what to do.
    Skipped,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .with_context(|| format!("cannot run `{program}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            last.trim()
        );
    }
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn installed(manager: Family, name: &str) -> bool {
    match manager {
        Family::Alpine => succeeds("apk", &["info", "-e", name]),
        Family::Debian => Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", name])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).ends_with("install ok installed")),
    }
}

fn install_packages(manager: Family, names: &[&'static str]) -> anyhow::Result<Done> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !installed(manager, n))
        .collect();
    if missing.is_empty() {
        return Ok(Done::Unchanged);
    }
    match manager {
        Family::Alpine => run("apk", &[&["add", "--no-progress"][..], &missing].concat())?,
        Family::Debian => {
            // Waits for another apt (unattended-upgrades on a fresh Raspberry Pi OS) instead of
            // failing; keeps configuration files the administrator changed.
            let install = [
                &[
                    "-o",
                    "DPkg::Lock::Timeout=300",
                    "-o",
                    "Dpkg::Options::=--force-confold",
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                ][..],
                &missing,
            ]
            .concat();
            // Stale package lists are the usual reason for a failure: update once, retry.
            if run("apt-get", &install).is_err() {
                run("apt-get", &["update", "-q"])?;
                run("apt-get", &install)?;
            }
        }
    }
    Ok(Done::Changed)
}

fn place_binary(target: &Path) -> anyhow::Result<Done> {
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let content = std::fs::read(&me).with_context(|| format!("cannot read `{}`", me.display()))?;
    if std::fs::read(target).is_ok_and(|existing| existing == content) {
        return Ok(Done::Unchanged);
    }
    crate::state::write_atomic(target, &content, 0o755)?;
    Ok(Done::Changed)
}

fn place_file(path: &Path, content: &str, mode: u32, keep: bool) -> anyhow::Result<Done> {
    use std::os::unix::fs::PermissionsExt as _;
    if keep && path.exists() {
        return Ok(Done::Unchanged);
    }
    let same_content = std::fs::read(path).is_ok_and(|c| c == content.as_bytes());
    let same_mode = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if same_content && same_mode {
        return Ok(Done::Unchanged);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    crate::state::write_atomic(path, content.as_bytes(), mode)?;
    Ok(Done::Changed)
}

/// Whether the init system runs (not in a chroot, a container without it, or an image build).
fn init_running(family: Family) -> bool {
    match family {
        Family::Debian => Path::new("/run/systemd/system").is_dir(),
        Family::Alpine => Path::new("/run/openrc/softlevel").exists(),
    }
}

fn enable(family: Family, services: &[&str]) -> anyhow::Result<Done> {
    match family {
        Family::Debian => {
            let wanted = |s: &&str| {
                Path::new("/etc/systemd/system/multi-user.target.wants")
                    .join(s)
                    .exists()
            };
            if services.iter().all(wanted) {
                return Ok(Done::Unchanged);
            }
            if init_running(family) {
                run("systemctl", &["daemon-reload"])?;
            }
            run(
                "systemctl",
                &[&["enable", "--quiet"][..], services].concat(),
            )?;
        }
        Family::Alpine => {
            let missing: Vec<&str> = services
                .iter()
                .copied()
                .filter(|s| !Path::new("/etc/runlevels/default").join(s).exists())
                .collect();
            if missing.is_empty() {
                return Ok(Done::Unchanged);
            }
            for service in missing {
                run("rc-update", &["add", service, "default"])?;
            }
        }
    }
    Ok(Done::Changed)
}

/// Starts `services` not running and restarts those in `restart`, all of them even when one
/// fails (the node daemon starts when BIRD does not: it reports what is wrong); the first
/// failure is returned after.
fn start(
    family: Family,
    services: &[&'static str],
    restart: &BTreeSet<&'static str>,
) -> anyhow::Result<Done> {
    if !init_running(family) {
        return Ok(Done::Skipped);
    }
    let mut changed = false;
    let mut failed = None;
    if family == Family::Debian && services.iter().any(|s| restart.contains(s)) {
        run("systemctl", &["daemon-reload"])?;
    }
    for service in services {
        let result = match family {
            Family::Debian => {
                if restart.contains(service) {
                    run("systemctl", &["restart", service]).map(|()| true)
                } else if !succeeds("systemctl", &["is-active", "--quiet", service]) {
                    run("systemctl", &["start", service]).map(|()| true)
                } else {
                    Ok(false)
                }
            }
            Family::Alpine => {
                if restart.contains(service) {
                    run("rc-service", &[service, "restart"]).map(|()| true)
                } else if !succeeds("rc-service", &[service, "status"]) {
                    run("rc-service", &[service, "start"]).map(|()| true)
                } else {
                    Ok(false)
                }
            }
        };
        match result {
            Ok(done) => changed |= done,
            Err(error) => {
                failed.get_or_insert(error);
            }
        }
    }
    match failed {
        Some(error) => Err(error),
        None if changed => Ok(Done::Changed),
        None => Ok(Done::Unchanged),
    }
}

/// Carries out `steps` (their [`Step::Start`] only when `start_services`), printing a line per
/// step to `out`. The services whose files or binary changed are added to `restart` (a caller
/// that paired the device adds the node service too); [`Step::Start`] restarts those.
pub fn carry_out(
    host: &Host,
    steps: &[Step],
    start_services: bool,
    restart: &mut BTreeSet<&'static str>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for step in steps {
        let done = match step {
            Step::Packages { manager, names } => install_packages(*manager, names)?,
            Step::Binary => {
                let done = place_binary(Path::new(BINARY))?;
                if done == Done::Changed || node_runs_a_replaced_binary() {
                    restart.insert(node_service(host.family));
                }
                done
            }
            Step::File {
                path,
                content,
                mode,
                service,
                keep,
            } => {
                let done = place_file(path, content, *mode, *keep)?;
                if let (Done::Changed, Some(service)) = (done, service) {
                    restart.insert(service);
                }
                done
            }
            Step::Sysctl { file } => {
                // In force now; a read-only /proc/sys (a container) only postpones it to boot.
                match run("sysctl", &["-q", "-p", &file.to_string_lossy()]) {
                    Ok(()) => Done::Changed,
                    Err(error) => {
                        writeln!(
                            out,
                            "{step}: not applied now ({error:#}); it is from the next boot"
                        )?;
                        continue;
                    }
                }
            }
            Step::Enable { services } => enable(host.family, services)?,
            Step::Start { services } => {
                if !start_services {
                    continue;
                }
                start(host.family, services, restart)?
            }
        };
        let word = match (step, done) {
            (Step::Sysctl { .. }, _) => "applied",
            (_, Done::Changed) => "done",
            (_, Done::Unchanged) => "already so",
            (_, Done::Skipped) => match host.family {
                Family::Debian => "skipped: systemd is not running here (it starts at boot)",
                Family::Alpine => "skipped: OpenRC is not running here (it starts at boot)",
            },
        };
        writeln!(out, "{step}: {word}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n";
    const RASPBIAN: &str =
        "PRETTY_NAME=\"Raspbian GNU/Linux 11 (bullseye)\"\nID=raspbian\nID_LIKE=debian\n";
    const UBUNTU: &str = "PRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\nID=ubuntu\nID_LIKE=debian\n";
    const ALPINE: &str =
        "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.23.0\nPRETTY_NAME=\"Alpine Linux v3.23\"\n";
    const FEDORA: &str =
        "NAME=\"Fedora Linux\"\nID=fedora\nPRETTY_NAME=\"Fedora Linux 41 (Server Edition)\"\n";
    const SYSTEMD: Facts = Facts {
        systemd: true,
        openrc: false,
    };
    const OPENRC: Facts = Facts {
        systemd: false,
        openrc: true,
    };

    #[test]
    fn debian_and_its_derivatives_with_systemd_are_set_up_with_apt() {
        for text in [DEBIAN, RASPBIAN, UBUNTU] {
            let host = detect(text, SYSTEMD).unwrap();
            assert_eq!(host.family, Family::Debian, "{text}");
        }
        assert_eq!(
            detect(DEBIAN, SYSTEMD).unwrap().name,
            "Debian GNU/Linux 12 (bookworm)"
        );
        let steps = plan(&detect(RASPBIAN, SYSTEMD).unwrap());
        assert_eq!(
            steps[0],
            Step::Packages {
                manager: Family::Debian,
                names: vec!["bird2"]
            },
            "BIRD 2 is `bird2` on Debian (`bird` is BIRD 1.6 there)"
        );
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::File { path, content, .. }
            if path == Path::new("/etc/systemd/system/towalink-node.service")
               && content.contains("ExecStart=/usr/sbin/towalink-node "))));
        assert!(
            matches!(steps.last(), Some(Step::Start { services }) if services.contains(&"towalink-node.service"))
        );
    }

    #[test]
    fn alpine_gets_the_images_openrc_services() {
        let host = detect(ALPINE, OPENRC).unwrap();
        assert_eq!(host.family, Family::Alpine);
        let steps = plan(&host);
        assert_eq!(
            steps[0],
            Step::Packages {
                manager: Family::Alpine,
                names: vec!["bird"]
            }
        );
        let script = steps
            .iter()
            .find_map(|s| match s {
                Step::File { path, content, .. } if path.ends_with("init.d/towalink-node") => {
                    Some(content)
                }
                _ => None,
            })
            .expect("the OpenRC service");
        assert!(script.starts_with("#!/sbin/openrc-run"));
        assert!(
            !script.contains("need towalink-data"),
            "a host has no image data partition service"
        );
        assert!(steps.iter().any(|s| matches!(s, Step::File { path, content, .. }
            if path.ends_with("sysctl.d/90-towalink.conf") && content.contains("net.ipv4.ip_forward = 1"))));
    }

    #[test]
    fn other_hosts_are_refused_in_one_line_naming_them() {
        let error = detect(FEDORA, SYSTEMD).unwrap_err().to_string();
        assert!(
            error.starts_with("unsupported host `Fedora Linux 41 (Server Edition)`: ID=fedora"),
            "{error}"
        );
        assert!(!error.contains('\n'));
        let error = detect(DEBIAN, OPENRC).unwrap_err().to_string();
        assert!(error.contains("debian without systemd"), "{error}");
        let error = detect(ALPINE, SYSTEMD).unwrap_err().to_string();
        assert!(error.contains("Alpine without OpenRC"), "{error}");
        let error = detect("", SYSTEMD).unwrap_err().to_string();
        assert!(error.contains("names no ID"), "{error}");
    }

    #[test]
    fn os_release_values_are_unquoted_and_comments_ignored() {
        let fields = os_release_fields("# ID=fedora\nID='alpine'\nNAME=\"A B\"\nX=plain\n");
        assert_eq!(
            fields,
            vec![
                ("ID", "alpine".to_string()),
                ("NAME", "A B".to_string()),
                ("X", "plain".to_string())
            ]
        );
    }
}
