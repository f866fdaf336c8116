//! Tier 2 (node): the real `towalink-node` binary on temporary state directories, fed by the
//! real `tlm`, with a real BIRD 2 (own network namespace, own control socket) for reloads and
//! health checks. Install, activate, bless, roll back (broken BIRD configuration, BGP never
//! Established, tries used up, confirm timer, mark-bad), refused bundles, and a crash at every
//! step of install, activate, apply and rollback.

use std::time::{Duration, Instant};

use towalink_tests::{
    tar_header, tree_hash, version_targets, zstd_bomb, Installation, NodeEnv, Run,
};

/// A controller with one node `x.a` provisioned into a node state directory and started once:
/// v1 is active and good.
struct Fixture {
    ctl: Installation,
    node: NodeEnv,
}

impl Fixture {
    fn new() -> Fixture {
        let ctl = Installation::new();
        ctl.ok(&["add", "site", "a"]);
        ctl.ok(&["add", "node", "x.a"]);
        ctl.ok(&["commit", "all"]);
        let node = NodeEnv::new();
        let out = ctl.ok(&["provision", "node", "x.a", node.state.to_str().unwrap()]);
        assert!(out.contains("with v1"), "{out}");
        node.ok(&["run", "--once"]);
        Fixture { ctl, node }
    }

    fn bundle(&self, version: u32) -> String {
        self.ctl
            .path(&format!("effective/a/x/v{version}/a-x-v{version}.tar.zst"))
            .display()
            .to_string()
    }

    /// Sets a global attribute, commits, installs the new version on the node.
    fn commit_and_install(&self, attribute: &str, value: &str) -> u32 {
        self.ctl.ok(&["set", "global", attribute, value]);
        let out = self.ctl.ok(&["commit", "all"]);
        let version: u32 = out
            .lines()
            .find_map(|l| l.strip_prefix("x.a: v"))
            .unwrap_or_else(|| panic!("no new version: {out}"))
            .parse()
            .unwrap();
        self.node.ok(&["install", &self.bundle(version)]);
        version
    }

    /// The root holds exactly what the controller's copy of `version` targets.
    fn assert_root_is(&self, version: u32) {
        let expected = version_targets(&self.ctl.path(&format!("effective/a/x/v{version}")));
        assert_eq!(
            self.node.root_files(),
            expected,
            "root is not exactly v{version}"
        );
    }
}

/// Runs the daemon while `busy(status)` holds (at most `limit`), then kills it; returns the
/// last status.
fn run_daemon_while(
    node: &NodeEnv,
    limit: Duration,
    busy: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut daemon = node
        .command(&["run", "--interval-ms", "200"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut status = node.status();
    while busy(&status) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        status = node.status();
    }
    // Stop it between two steps: `status` already shows a rollback once `current` is switched,
    // while the daemon still holds the state lock to apply the old version's files. Taking that
    // lock waits for the step to finish (a kill inside it is repaired only by the next start).
    let lock = std::fs::File::open(node.state.join(".lock")).ok();
    if let Some(lock) = &lock {
        // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
        unsafe {
            libc::flock(std::os::fd::AsRawFd::as_raw_fd(lock), libc::LOCK_EX);
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    drop(lock);
    status
}

/// The cause an error line ends with twice (`a: X: X`, also when X has `: ` in it), if any.
fn repeated_cause(line: &str) -> Option<String> {
    let parts: Vec<&str> = line.split(": ").collect();
    let n = parts.len();
    (1..=n / 2)
        .find(|&k| parts[n - k..] == parts[n - 2 * k..n - k])
        .map(|k| parts[n - k..].join(": "))
}

#[test]
fn repeated_causes_are_found() {
    assert_eq!(
        repeated_cause("towalink-node: error: bundle refused: bad: x: bad: x"),
        Some("bad: x".into())
    );
    assert_eq!(
        repeated_cause("towalink-node: error: bundle refused: bad: x"),
        None
    );
}

fn active(status: &serde_json::Value) -> (u64, String) {
    (
        status["active_version"].as_u64().unwrap_or(0),
        status["state"].as_str().unwrap_or("none").to_string(),
    )
}

#[test]
fn provisioned_node_starts_with_its_version_good_and_secrets_private() {
    let f = Fixture::new();
    let status = f.node.status();
    assert_eq!(active(&status), (1, "good".into()));
    assert_eq!(status["node"], "x.a");
    f.assert_root_is(1);
    use std::os::unix::fs::PermissionsExt as _;
    for secret in ["identity/wg_private_key", "identity/recovery_token"] {
        let mode = std::fs::metadata(f.node.state.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    // No secret in anything the node prints.
    let key = std::fs::read_to_string(f.node.state.join("identity/wg_private_key")).unwrap();
    let token = std::fs::read_to_string(f.node.state.join("identity/recovery_token")).unwrap();
    let run = f.node.run(&["--loglevel", "debug", "run", "--once"]);
    let printed = format!("{}{}", run.stdout, run.stderr);
    assert!(!printed.contains(key.trim()) && !printed.contains(token.trim()));
}

#[test]
fn activate_reloads_bird_and_blesses_when_healthy() {
    let mut f = Fixture::new();
    f.node.start_bird();
    let v2 = f.commit_and_install("bird_bfd_interval_ms", "300");
    let out = f.node.ok(&["activate", "latest"]);
    assert!(
        out.contains(&format!("activated v{v2} in slot B")) && out.contains("reloaded bird"),
        "{out}"
    );
    assert_eq!(active(&f.node.status()), (u64::from(v2), "pending".into()));
    f.assert_root_is(v2);
    // BIRD runs the new configuration.
    let bfd = f.node.birdc("show bfd sessions");
    assert!(!bfd.contains("syntax error"), "{bfd}");
    let conf = std::fs::read_to_string(f.node.root.join("etc/bird/bird_base.conf")).unwrap();
    assert!(conf.contains("min rx interval 300 ms"));
    // The daemon blesses it: every BGP session (none on a lone node) is Established.
    f.node.ok(&["run", "--once"]);
    let status = f.node.status();
    assert_eq!(active(&status), (u64::from(v2), "good".into()));
    assert_eq!(status["health"][0]["ok"], true);
    // Activating the same version again changes nothing.
    let run = f.node.run(&["activate", &format!("v{v2}")]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("already the active version"),
        "{}",
        run.stderr
    );
}

#[test]
fn broken_bird_configuration_rolls_back_by_itself() {
    let mut f = Fixture::new();
    f.node.start_bird();
    f.ctl
        .write("site_a/bird_broken.conf.jinja", "protocol nonsense {\n");
    let v2 = f.commit_and_install("wg_keepalive", "20");
    let run = f.node.run(&["activate", "latest"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("rolled back") && run.stderr.contains("syntax error"),
        "{}",
        run.stderr
    );
    let status = f.node.status();
    assert_eq!(active(&status), (1, "good".into()));
    assert_eq!(status["last_rollback"]["from_version"], u64::from(v2));
    assert_eq!(status["last_rollback"]["to_version"], 1);
    // Every target is byte-identical to v1 again (the broken part is gone) and BIRD,
    // reloaded, runs v1's configuration.
    f.assert_root_is(1);
    assert!(f.node.birdc("show protocols").contains("static6"));
    assert!(f.node.birdc("configure check").contains("Configuration OK"));
}

#[test]
fn bgp_that_never_comes_up_rolls_back_by_itself() {
    let mut f = Fixture::new();
    f.node.start_bird();
    // A peer at another site: the version has BGP sessions that can never be Established here.
    f.ctl.ok(&["add", "site", "b"]);
    f.ctl.ok(&["add", "node", "y.b"]);
    f.ctl.ok(&["set", "global", "node_health_timeout_s", "2"]);
    let out = f.ctl.ok(&["commit", "all"]);
    assert!(out.contains("x.a: v2"), "{out}");
    f.node.ok(&["install", &f.bundle(2)]);
    f.node.ok(&["activate", "v2"]);
    assert!(f.node.birdc("show protocols").contains("peer2_v4"));
    let status = run_daemon_while(&f.node, Duration::from_secs(30), |status| {
        active(status).0 != 1
    });
    assert_eq!(active(&status), (1, "good".into()), "{status:#}");
    let reason = status["last_rollback"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("did not pass its health checks within 2 s") && reason.contains("peer2_v4"),
        "{reason}"
    );
    f.assert_root_is(1);
    assert!(
        !f.node.birdc("show protocols").contains("peer2_v4"),
        "BIRD still runs v2"
    );
}

#[test]
fn each_start_uses_a_try_until_none_is_left() {
    let f = Fixture::new();
    f.ctl.ok(&["set", "global", "node_boot_tries", "2"]);
    // A long health timeout and BIRD not running: the checks fail, only starts count.
    let v2 = f.commit_and_install("node_health_timeout_s", "3600");
    f.node.ok(&["activate", "latest"]);
    let tries = |s: &serde_json::Value| s["tries_left"].as_u64();
    assert_eq!(tries(&f.node.status()), Some(2));
    f.node.ok(&["run", "--once"]);
    assert_eq!(tries(&f.node.status()), Some(1));
    f.node.ok(&["run", "--once"]);
    assert_eq!(tries(&f.node.status()), Some(0));
    assert_eq!(active(&f.node.status()), (u64::from(v2), "pending".into()));
    f.node.ok(&["run", "--once"]);
    let status = f.node.status();
    assert_eq!(active(&status), (1, "good".into()));
    assert!(status["last_rollback"]["reason"]
        .as_str()
        .unwrap()
        .contains("no tries left"));
    f.assert_root_is(1);
}

#[test]
fn confirm_timer_rolls_back_unless_confirmed() {
    let f = Fixture::new();
    let v2 = f.commit_and_install("wg_mtu", "1400");
    f.node.ok(&["activate", "latest", "--confirm", "1"]);
    std::thread::sleep(Duration::from_millis(2100));
    f.node.ok(&["run", "--once"]);
    let status = f.node.status();
    assert_eq!(active(&status), (1, "good".into()));
    assert!(status["last_rollback"]["reason"]
        .as_str()
        .unwrap()
        .contains("confirm timer expired"));

    // Confirmed in time: it stays.
    let v3 = f.commit_and_install("wg_mtu", "1380");
    f.node.ok(&["activate", "latest", "--confirm", "600"]);
    assert!(f.node.status()["confirm_by"].as_u64().is_some());
    assert!(f
        .node
        .ok(&["mark-good"])
        .contains(&format!("v{v3} is good")));
    f.node.ok(&["run", "--once"]);
    let status = f.node.status();
    assert_eq!(active(&status), (u64::from(v3), "good".into()));
    assert!(status["confirm_by"].is_null());
    let _ = v2;
}

#[test]
fn mark_bad_rolls_back_and_latest_is_the_highest_number() {
    let f = Fixture::new();
    let v2 = f.commit_and_install("wg_mtu", "1400");
    f.node.ok(&["activate", "latest"]);
    let out = f.node.ok(&["mark-bad", "--reason", "operator says no"]);
    assert!(out.contains("v1 is active"), "{out}");
    assert_eq!(
        f.node.status()["last_rollback"]["reason"],
        "operator says no"
    );
    f.assert_root_is(1);
    // Replaying v1 (already installed) is a no-op; `latest` stays v2, not the last received.
    let out = f.node.ok(&["install", &f.bundle(1)]);
    assert!(out.contains("already installed"), "{out}");
    assert!(f
        .node
        .ok(&["activate", "latest"])
        .contains(&format!("activated v{v2}")));
}

#[test]
fn bad_bundles_are_refused_and_change_nothing() {
    let f = Fixture::new();
    let v2 = f.commit_and_install("wg_mtu", "1400");
    f.ctl.ok(&["set", "global", "wg_mtu", "1300"]);
    f.ctl.ok(&["commit", "all"]);
    let good = std::fs::read(f.bundle(v2 + 1)).unwrap();
    let dir = f.node.temp.path();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };

    // Another controller (another signing key) with a node of the same id.
    let other = Installation::new();
    other.ok(&["add", "site", "a"]);
    other.ok(&["add", "node", "x.a"]);
    other.ok(&["commit", "all"]);
    let foreign = std::fs::read(other.path("effective/a/x/v1/a-x-v1.tar.zst")).unwrap();
    // Another node of this controller.
    f.ctl.ok(&["add", "site", "b"]);
    f.ctl.ok(&["add", "node", "y.b"]);
    f.ctl.ok(&["commit", "all"]);
    let for_y = std::fs::read(f.ctl.path("effective/b/y/v1/b-y-v1.tar.zst")).unwrap();
    // A different bundle claiming an installed version number.
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;

    let cases: Vec<(String, &str)> = vec![
        (write("tampered.tar.zst", &flipped), "bundle refused"),
        (
            write("truncated.tar.zst", &good[..good.len() - 20]),
            "bundle refused",
        ),
        (
            write("foreign.tar.zst", &foreign),
            "signature does not verify",
        ),
        (
            write("other-node.tar.zst", &for_y),
            "bundle is for node id 2, this node is 1",
        ),
        (write("empty.tar.zst", b""), "bundle refused"),
    ];
    for (file, expected) in cases {
        let before = tree_hash(&f.node.state);
        let run: Run = f.node.run(&["install", &file]);
        assert_eq!(run.code, 1, "{file}: {}", run.stdout);
        assert!(run.stderr.contains(expected), "{file}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
        // Each cause once: not `bundle refused: X: X`.
        assert_eq!(
            run.stderr.matches("bundle refused").count(),
            1,
            "{}",
            run.stderr
        );
        assert_eq!(
            repeated_cause(run.stderr.trim_end()),
            None,
            "{file}: a cause printed twice: {}",
            run.stderr
        );
        assert_eq!(before, tree_hash(&f.node.state), "{file} changed the state");
    }
    // A well-signed bundle claiming v2 with other content (the controller directory was reset).
    let reset = Installation::new();
    std::fs::create_dir_all(&reset.dir).unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        assert!(std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success());
    };
    copy(&f.ctl.dir.join("."), &reset.dir);
    let before = tree_hash(&f.node.state);
    let conflicting = reset.path(&format!("effective/a/x/v{v2}/a-x-v{v2}.tar.zst"));
    // Same version number, different content: make the reset controller re-create v2.
    std::fs::remove_dir_all(reset.path("effective/a")).unwrap();
    std::fs::remove_dir_all(reset.path("effective/b")).unwrap();
    std::fs::remove_file(reset.path("effective/index.toml")).unwrap();
    reset.ok(&["set", "global", "wg_mtu", "1280"]);
    reset.ok(&["commit", "all"]);
    reset.ok(&["set", "global", "wg_mtu", "1281"]);
    reset.ok(&["commit", "all"]);
    let run = f.node.run(&["install", conflicting.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(&format!(
            "v{v2} is already installed with different content"
        )),
        "{}",
        run.stderr
    );
    assert_eq!(before, tree_hash(&f.node.state));
}

/// A version signed by the real controller but made for a newer node contract (its
/// `towalink/node.toml` says `contract = 3`): `towalink-node install` refuses it naming both
/// contract numbers, stores nothing, and the node keeps its active version.
#[test]
fn a_version_for_a_newer_node_contract_is_refused_at_install() {
    let f = Fixture::new();
    let key = towalink_bundle::signing_key_from_base64(&f.ctl.read("certs/signing.key")).unwrap();
    let v1 = towalink_bundle::verify(
        &std::fs::read(f.bundle(1)).unwrap(),
        &key.verifying_key(),
        1,
    )
    .unwrap();
    let node_toml = towalink_bundle::contract::NODE_TOML;
    let mut files = v1.files().clone();
    let newer = format!(
        "contract = 3\n{}",
        String::from_utf8(files[node_toml].clone()).unwrap()
    );
    files.insert(node_toml.into(), newer.into_bytes());
    let mut manifest = v1.manifest().clone();
    manifest.version = 7;
    manifest.parent = Some(1);
    for entry in &mut manifest.files {
        entry.sha256 = towalink_bundle::sha256_hex(&files[&entry.path]);
    }
    let bytes = towalink_bundle::build(&manifest, &files, &key).unwrap();
    let file = f.node.temp.path().join("a-x-v7.tar.zst");
    std::fs::write(&file, bytes).unwrap();

    let before = tree_hash(&f.node.state);
    let run = f.node.run(&["install", file.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(
        run.stderr.trim(),
        "towalink-node: error: version v7 needs node contract 3; this node understands up to 2: upgrade towalink-node"
    );
    assert_eq!(
        before,
        tree_hash(&f.node.state),
        "the refusal changed the state"
    );
    let status = f.node.status();
    assert_eq!(status["active_version"], 1, "{status:#}");
    assert_eq!(
        status["installed_versions"],
        serde_json::json!([1]),
        "{status:#}"
    );
}

/// A bundle signed with the real controller key but naming paths that leave the root.
#[test]
fn signed_bundles_with_escaping_paths_are_refused() {
    let f = Fixture::new();
    let key = towalink_bundle::signing_key_from_base64(&f.ctl.read("certs/signing.key")).unwrap();
    let cases = [
        ("x.conf", "/etc/../../escape", "path contains `.` or `..`"),
        ("x.conf", "etc/relative", "target path must be absolute"),
        ("../x.conf", "/etc/x.conf", "path contains `.` or `..`"),
        (
            "/abs.conf",
            "/etc/x.conf",
            "path inside the bundle must be relative",
        ),
    ];
    for (path, target, expected) in cases {
        let content = b"protocol device {}\n";
        let manifest = format!(
            "format = 1\nnode_id = 1\nsite = \"a\"\nnode = \"x\"\nversion = 9\ncreated = \"2026-11-25T00:00:00Z\"\n\n[services]\n\n[[files]]\npath = \"{path}\"\ntarget = \"{target}\"\nmode = \"0644\"\nsha256 = \"{}\"\n",
            towalink_bundle::sha256_hex(content)
        );
        use ed25519_dalek_sign::Signer as _;
        let signature = base64_encode(&key.sign(manifest.as_bytes()).to_bytes());
        let mut archive = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("manifest.toml".to_string(), manifest.as_bytes().to_vec()),
            (
                "manifest.sig".to_string(),
                format!("{signature}\n").into_bytes(),
            ),
            (format!("files/{path}"), content.to_vec()),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // Write the raw name: the tar crate itself refuses `..` in names.
            let bytes = name.as_bytes();
            header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            header.set_cksum();
            archive.append(&header, data.as_slice()).unwrap();
        }
        let bytes = zstd::bulk::compress(&archive.into_inner().unwrap(), 3).unwrap();
        let file = f.node.temp.path().join("escape.tar.zst");
        std::fs::write(&file, bytes).unwrap();
        let before = tree_hash(&f.node.state);
        let run = f.node.run(&["install", file.to_str().unwrap()]);
        assert_eq!(run.code, 1, "{path} {target}: {}", run.stdout);
        assert!(
            run.stderr.contains(expected),
            "{path} {target}: {}",
            run.stderr
        );
        assert_eq!(before, tree_hash(&f.node.state));
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

mod ed25519_dalek_sign {
    pub use towalink_bundle::Signer;
}

#[test]
fn a_symlink_cannot_lead_files_out_of_the_root() {
    let f = Fixture::new();
    let v2 = f.commit_and_install("wg_mtu", "1400");
    let outside = tempfile::tempdir().unwrap();
    std::fs::remove_dir_all(f.node.root.join("etc/bird")).unwrap();
    std::os::unix::fs::symlink(outside.path(), f.node.root.join("etc/bird")).unwrap();
    let run = f.node.run(&["activate", &format!("v{v2}")]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("goes through a symlink"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "a file escaped the root"
    );
    assert_eq!(active(&f.node.status()).0, 1);
}

/// Kill the node at every step of install, activate, apply and rollback: the next start finds
/// exactly one complete version active with the root matching it, and a later activation works.
#[test]
fn a_crash_at_any_step_leaves_one_complete_version() {
    let install_points = ["install-written", "install-renamed"];
    let activate_points = [
        "fill-marker-removed",
        "fill-written",
        "fill-renamed",
        "fill-marked",
        "activate-before-switch",
        "activate-switched",
        "apply-wrote-file",
        "apply-files-done",
    ];
    let rollback_points = [
        "rollback-recorded",
        "rollback-marked-bad",
        "rollback-switched",
        "rollback-applied",
    ];
    let all: Vec<(&str, &str)> = install_points
        .iter()
        .map(|p| ("install", *p))
        .chain(activate_points.iter().map(|p| ("activate", *p)))
        .chain(rollback_points.iter().map(|p| ("rollback", *p)))
        .collect();
    for (operation, point) in all {
        let f = Fixture::new();
        // v2 differs from v1 in two files and adds one, so a half-done apply is visible.
        f.ctl.write(
            "site_a/bird_extra.conf.jinja",
            "# extra for {{ node_name }}\n",
        );
        f.ctl.ok(&["set", "global", "bird_bfd_multiplier", "5"]);
        f.ctl.ok(&["commit", "all"]);
        let crash = |args: &[&str]| {
            let out = f
                .node
                .command(args)
                .env("TOWALINK_NODE_CRASH_AT", point)
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "{operation}/{point}: crash point not reached"
            );
        };
        match operation {
            "install" => crash(&["install", &f.bundle(2)]),
            "activate" => {
                f.node.ok(&["install", &f.bundle(2)]);
                crash(&["activate", "v2"]);
            }
            _ => {
                f.node.ok(&["install", &f.bundle(2)]);
                f.node.ok(&["activate", "v2"]);
                crash(&["mark-bad"]);
            }
        }
        // The next start.
        f.node.ok(&["run", "--once"]);
        let status = f.node.status();
        let (version, _) = active(&status);
        assert!(
            version == 1 || version == 2,
            "{operation}/{point}: {status:#}"
        );
        f.assert_root_is(version as u32);
        if operation == "rollback" {
            assert_eq!(version, 1, "{point}: a started rollback finishes");
        }
        // A later activation still works.
        f.node.run(&["install", &f.bundle(2)]);
        let target = if version == 2 { "v1" } else { "v2" };
        if version == 2 && status["state"] == "pending" {
            f.node.ok(&["mark-good"]);
        }
        f.node.ok(&["activate", target]);
        f.assert_root_is(if version == 2 { 1 } else { 2 });
        let leftovers: Vec<String> = std::fs::read_dir(f.node.state.join("slots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") || n.ends_with(".old"))
            .collect();
        assert!(
            leftovers.is_empty() || operation != "activate",
            "{point}: {leftovers:?}"
        );
    }
}

/// Points the node's identity at a management API address (as attach or an image would).
fn set_controller_api(f: &Fixture, api: std::net::SocketAddr) {
    let path = f.node.state.join("identity/node.toml");
    let mut identity: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let management: toml::Table = format!(
        "controller_endpoints = [\"192.0.2.1:51819\"]\ncontroller_wg_public_key = \"{}\"\naddress = \"127.0.0.2\"\ncontroller_address = \"{}\"\napi_port = {}\nkeepalive_s = 25\n",
        identity["wg_public_key"].as_str().unwrap(),
        api.ip(),
        api.port()
    )
    .parse()
    .unwrap();
    identity.insert("management".into(), management.into());
    std::fs::write(&path, toml::to_string(&identity).unwrap()).unwrap();
}

/// The `controller` check: the management API answering (a real listener) blesses; an API
/// that does not answer rolls back.
#[test]
fn controller_check_blesses_when_reachable_and_rolls_back_when_not() {
    let f = Fixture::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap();
    set_controller_api(&f, open);
    f.ctl
        .ok(&["set", "global", "node_health_checks", r#"["controller"]"#]);
    let v2 = f.commit_and_install("node_health_timeout_s", "1");
    f.node.ok(&["activate", "latest"]);
    f.node.ok(&["run", "--once"]);
    let status = f.node.status();
    assert_eq!(
        active(&status),
        (u64::from(v2), "good".into()),
        "{status:#}"
    );
    assert_eq!(status["health"][0]["check"], "controller");

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    set_controller_api(&f, closed);
    let v3 = f.commit_and_install("node_health_timeout_s", "2");
    f.node.ok(&["activate", "latest"]);
    let status = run_daemon_while(&f.node, Duration::from_secs(20), |status| {
        active(status).0 == u64::from(v3)
    });
    assert_eq!(
        active(&status),
        (u64::from(v2), "good".into()),
        "{status:#}"
    );
    let reason = status["last_rollback"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("controller") && reason.contains(&closed.to_string()),
        "{reason}"
    );
    drop(listener);
}

/// Anti-rollback: a node that runs v13 refuses a replayed v1 bundle (a genuine, signed, old
/// one); the operator at the node may still install it by name.
#[test]
fn a_replayed_old_bundle_is_refused() {
    let f = Fixture::new();
    for mtu in 1400..1412 {
        f.ctl.ok(&["set", "global", "wg_mtu", &mtu.to_string()]);
        f.ctl.ok(&["commit", "all"]);
    }
    // A node provisioned now starts on v13.
    let node = NodeEnv::new();
    f.ctl
        .ok(&["provision", "node", "x.a", node.state.to_str().unwrap()]);
    node.ok(&["run", "--once"]);
    assert_eq!(node.status()["active_version"], 13);
    let run = node.run(&["install", &f.bundle(1)]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("bundle refused: v1 is older than v13, the newest installed"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert_eq!(node.status()["installed_versions"], serde_json::json!([13]));
    let run = node.run(&["activate", "1"]);
    assert_ne!(run.code, 0, "v1 could be activated: {}", run.stdout);
    // The operator's word installs it.
    let out = node.ok(&["install", "--allow-older", &f.bundle(1)]);
    assert!(out.contains("installed v1"), "{out}");
}

/// Runs `towalink-node install FILE`; returns its result and its peak RSS in KiB.
fn install_measured(node: &NodeEnv, file: &std::path::Path) -> (Run, i64) {
    // Reaped by wait4 below, which also gives its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = node
        .command(&["install", file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.unwrap(), &mut stderr).unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (
        Run {
            code,
            stdout: String::new(),
            stderr,
        },
        usage.ru_maxrss,
    )
}

/// Bombs: a 2 GiB-declared zstd frame and a 250 MiB unsigned payload are refused with bounded
/// memory (they took 392 MB and 585 MB of RSS when the whole archive was decompressed before
/// the signature was checked).
#[test]
fn decompression_bombs_are_refused_with_bounded_memory() {
    let f = Fixture::new();
    let dir = f.node.temp.path();
    let cases = [
        (
            "bomb-2gib.tar.zst",
            zstd_bomb(&[0; 512], 2 << 30),
            "bundle has no `manifest.toml`",
        ),
        (
            "unsigned-250mib.tar.zst",
            zstd_bomb(&tar_header("files/big", 250 << 20), (250 << 20) + 512),
            "`manifest.toml` must come before any other entry",
        ),
        (
            "manifest-2gib.tar.zst",
            zstd_bomb(&tar_header("manifest.toml", 2 << 30), (2 << 30) + 512),
            "`manifest.toml` is 2147483648 bytes; at most 1048576",
        ),
    ];
    let before = f.node.status();
    for (name, bytes, expected) in cases {
        let file = dir.join(name);
        std::fs::write(&file, &bytes).unwrap();
        let (run, rss_kib) = install_measured(&f.node, &file);
        assert_eq!(run.code, 1, "{name}: {}", run.stderr);
        assert!(run.stderr.contains(expected), "{name}: {}", run.stderr);
        assert!(
            rss_kib < 64 * 1024,
            "{name}: peak RSS {rss_kib} KiB while refusing"
        );
        eprintln!("{name}: refused with a peak RSS of {} KiB", rss_kib);
    }
    assert_eq!(
        f.node.status()["installed_versions"],
        before["installed_versions"]
    );
}

/// With `bundle_file_sizes` on, the signed manifest declares every file's size; the node
/// installs and runs such a bundle (and reads no file beyond its declared size, unit-tested in
/// `towalink-bundle`). Off (the default, for nodes before this release) nothing changes.
#[test]
fn bundles_declaring_file_sizes_install_and_activate() {
    let f = Fixture::new();
    let manifest = |v: u32| f.ctl.read(&format!("effective/a/x/v{v}/manifest.toml"));
    assert!(!manifest(1).contains("size ="), "{}", manifest(1));
    let v2 = f.commit_and_install("bundle_file_sizes", "true");
    let text = manifest(v2);
    let declared: toml::Table = text.parse().unwrap();
    let files = declared["files"].as_array().unwrap();
    assert!(!files.is_empty());
    for file in files {
        let path = file["path"].as_str().unwrap();
        let on_disk = std::fs::metadata(f.ctl.path(&format!("effective/a/x/v{v2}/files/{path}")))
            .unwrap()
            .len();
        assert_eq!(
            file["size"].as_integer(),
            Some(on_disk as i64),
            "{path}: {text}"
        );
    }
    let out = f.node.ok(&["activate", "latest"]);
    assert!(out.contains(&format!("activated v{v2}")), "{out}");
    f.assert_root_is(v2);
}

#[test]
fn the_daemon_stops_cleanly_on_sigterm_and_sigint() {
    use std::io::BufRead as _;
    let f = Fixture::new();
    for signal in ["TERM", "INT"] {
        let mut daemon = f
            .node
            .command(&["run", "--interval-ms", "200"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, seen) = std::sync::mpsc::channel();
        let stderr = daemon.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = lines.send(line);
            }
        });
        // The daemon handles signals from before its start-up work, which it logs.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut log = Vec::new();
        while !log.iter().any(|l: &String| l.contains("startup")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok(line) => log.push(line),
                Err(_) => panic!("no `startup` line from the daemon within 60 s: {log:?}"),
            }
        }
        let killed = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &daemon.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = daemon.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = daemon.kill();
                panic!("SIG{signal}: the daemon did not stop within 60 s: {log:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        log.extend(seen.iter());
        assert_eq!(status.code(), Some(0), "SIG{signal}: {status}: {log:?}");
        assert!(
            log.iter().any(|l| l.contains("shutting down")),
            "SIG{signal}: {log:?}"
        );
        // It left the state as it was: the next start finds v1 good.
        assert_eq!(active(&f.node.status()), (1, "good".into()));
    }
}
