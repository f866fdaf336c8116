//! Apply: make the files under the root match a version, and reload the services whose files
//! changed. Reconciliation: what already matches is left alone, so applying the same version
//! twice writes nothing and reloads nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use towalink_bundle::{Manifest, Service, VerifiedBundle};

use crate::bird::BirdControl;
use crate::state::crash_point;
use crate::Error;

/// What an apply changed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub written: Vec<String>,
    pub removed: Vec<String>,
    pub reloaded: Vec<String>,
    /// Time spent writing files and running reloads other than BIRD's, milliseconds.
    pub files_ms: f64,
    /// Time BIRD took to reconfigure, milliseconds.
    pub bird_reload_ms: f64,
}

/// The target path under `root`, refusing anything that would leave it: the bundle checks
/// already refuse `..` and relative targets; here every existing directory on the way must be
/// a real directory, not a symlink.
pub fn resolve_target(root: &Path, target: &str) -> Result<PathBuf, Error> {
    let relative = Path::new(target)
        .strip_prefix("/")
        .map_err(|_| Error::Unsafe {
            target: target.to_string(),
            reason: "not absolute",
        })?;
    let mut path = root.to_path_buf();
    let components: Vec<Component> = relative.components().collect();
    for (i, component) in components.iter().enumerate() {
        let Component::Normal(name) = component else {
            return Err(Error::Unsafe {
                target: target.to_string(),
                reason: "has `.` or `..`",
            });
        };
        path.push(name);
        let last = i + 1 == components.len();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !last && !meta.is_dir() {
                return Err(Error::Unsafe {
                    target: target.to_string(),
                    reason: "goes through a symlink or file",
                });
            }
            if last && meta.is_dir() {
                return Err(Error::Unsafe {
                    target: target.to_string(),
                    reason: "is a directory",
                });
            }
        }
    }
    Ok(path)
}

fn file_differs(path: &Path, content: &[u8], mode: u32) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o7777 == mode => {
            std::fs::read(path).map_or(true, |old| old != content)
        }
        _ => true,
    }
}

fn write_target(path: &Path, content: &[u8], mode: u32) -> Result<(), Error> {
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io {
            action,
            path: p,
            error: source,
        }
    };
    let dir = path.parent().expect("target has a parent");
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let temp = dir.join(format!(
        ".{}.towalink-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(io("cannot create", &temp))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot set mode of", &temp))?;
    file.write_all(content).map_err(io("cannot write", &temp))?;
    // No fsync per file: readers see old or new content (rename), `apply` syncs the
    // filesystem once at the end, and every start re-applies the current slot, so a target
    // torn by a power cut is repaired from the (durable) slot.
    std::fs::rename(&temp, path).map_err(io("cannot replace", path))
}

/// Where reloads go: BIRD's control socket for `birdc configure`, commands otherwise.
#[derive(Debug, Clone)]
pub struct Reloader {
    pub bird: BirdControl,
}

impl Reloader {
    fn reload(&self, name: &str, service: &Service, report: &mut ApplyReport) -> Result<(), Error> {
        let started = Instant::now();
        let argv = &service.reload;
        if argv.first().map(String::as_str) == Some("birdc") && argv[1..] == ["configure"] {
            // Talk to BIRD directly: `birdc` exits 0 even when the configuration is refused.
            match self.bird.configure() {
                // Not running: it reads the new files when it starts.
                Err(Error::BirdNotRunning { socket, message }) => {
                    tracing::warn!(socket = %socket.display(), %message, "BIRD is not running; not reloaded");
                    return Ok(());
                }
                other => other?,
            }
            report.bird_reload_ms += started.elapsed().as_secs_f64() * 1000.0;
        } else {
            let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
            towalink_system::program::run(&argv[0], &args, Path::new("/"), &[]).map_err(|e| {
                Error::Reload {
                    service: name.to_string(),
                    message: e.to_string(),
                }
            })?;
        }
        report.reloaded.push(name.to_string());
        Ok(())
    }
}

/// Makes the targets under `root` match `bundle`, removes targets only `previous` had, and
/// reloads the services whose files changed.
pub fn apply(
    bundle: &VerifiedBundle,
    previous: Option<&Manifest>,
    root: &Path,
    reloader: &Reloader,
) -> Result<ApplyReport, Error> {
    let started = Instant::now();
    let manifest = bundle.manifest();
    let mut report = ApplyReport::default();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    let mut services: BTreeMap<String, Service> = manifest.services.clone();
    let mut wanted = BTreeSet::new();
    for entry in &manifest.files {
        let Some(target) = &entry.target else {
            continue;
        };
        wanted.insert(target.clone());
        let path = resolve_target(root, target)?;
        let content = &bundle.files()[&entry.path];
        let mode = entry.mode_bits()?;
        if file_differs(&path, content, mode) {
            write_target(&path, content, mode)?;
            report.written.push(target.clone());
            crash_point("apply-wrote-file");
            if let Some(service) = &entry.service {
                changed.insert(service.clone());
            }
        }
    }
    if let Some(previous) = previous {
        for entry in &previous.files {
            let Some(target) = &entry.target else {
                continue;
            };
            if wanted.contains(target) {
                continue;
            }
            let path = resolve_target(root, target)?;
            if path.exists() {
                std::fs::remove_file(&path).map_err(|source| Error::Io {
                    action: "cannot remove",
                    path: path.clone(),
                    error: source,
                })?;
                report.removed.push(target.clone());
                if let Some(service) = &entry.service {
                    changed.insert(service.clone());
                    if let Some(s) = previous.services.get(service) {
                        services.entry(service.clone()).or_insert_with(|| s.clone());
                    }
                }
            }
        }
    }
    if !report.written.is_empty() || !report.removed.is_empty() {
        crate::state::sync_filesystem(root)?;
    }
    crash_point("apply-files-done");
    for name in &changed {
        if let Some(service) = services.get(name) {
            reloader.reload(name, service, &mut report)?;
        }
    }
    report.files_ms = started.elapsed().as_secs_f64() * 1000.0 - report.bird_reload_ms;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_stay_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc/bird")).unwrap();
        assert!(resolve_target(root.path(), "/etc/bird/bird.conf").is_err());
        assert!(resolve_target(root.path(), "/etc/../x").is_err());
        assert!(resolve_target(root.path(), "relative").is_err());
        assert_eq!(
            resolve_target(root.path(), "/etc/x.conf").unwrap(),
            root.path().join("etc/x.conf")
        );
    }
}
