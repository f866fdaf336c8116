//! Tier 1, hardening of the controller (issue 15, parts 4, 7 and 8): git can never wedge
//! `tlm` (stale locks, git missing or failing, power-cut kills of `tlm commit`), secrets
//! never enter git, and templates render within bounds. The real `tlm` on temporary
//! configuration directories.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::time::{Duration, Instant};

use towalink_tests::{tree_hash, Installation};

/// Two sites, `nodes` nodes each, committed once.
fn mesh(nodes: usize) -> Installation {
    let t = Installation::new();
    for site in ["a", "b"] {
        t.ok(&["add", "site", site]);
        for n in 0..nodes {
            t.ok(&["add", "node", &format!("n{n}.{site}")]);
        }
    }
    t.ok(&["commit", "all"]);
    t
}

/// Git's lock files in the directory.
fn git_locks(t: &Installation) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![t.path(".git")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("objects") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "lock") {
                found.push(path.strip_prefix(&t.dir).unwrap().display().to_string());
            }
        }
    }
    found
}

/// The highest version directory of each node on disk (what `tlm serve` offers).
fn versions_on_disk(t: &Installation) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for site in std::fs::read_dir(t.path("effective")).unwrap().flatten() {
        if !site.path().is_dir() || site.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for node in std::fs::read_dir(site.path()).unwrap().flatten() {
            let latest = std::fs::read_dir(node.path())
                .unwrap()
                .flatten()
                .filter_map(|v| v.file_name().to_str()?.strip_prefix('v')?.parse().ok())
                .max();
            if let Some(latest) = latest {
                found.push((
                    format!(
                        "{}.{}",
                        node.file_name().to_string_lossy(),
                        site.file_name().to_string_lossy()
                    ),
                    latest,
                ));
            }
        }
    }
    found.sort();
    found
}

/// Every version on disk is recorded by git's last commit (the service offers only
/// versions whose commit is complete).
fn assert_versions_on_disk_are_in_git(t: &Installation, context: &str) {
    let index: toml::Table = t
        .git(&["show", "HEAD:effective/index.toml"])
        .parse()
        .unwrap();
    let nodes = index.get("nodes").and_then(|n| n.as_table());
    for (node, version) in versions_on_disk(t) {
        let in_git = nodes
            .and_then(|n| n.get(&node))
            .and_then(|e| e.get("latest"))
            .and_then(|l| l.as_integer())
            .unwrap_or(0);
        assert!(
            i64::from(version) <= in_git,
            "{context}: {node} v{version} is on disk (visible to the service) but git's last commit has v{in_git}"
        );
    }
}

/// A one-node-per-site mesh with a change whose `tlm commit` stopped (crash point) right
/// after writing its journal.
fn commit_stopped_after_its_journal() -> Installation {
    let t = mesh(1);
    t.ok(&["set", "global", "bird_bfd_multiplier", "4"]);
    let run: towalink_tests::Run = t
        .command(&["commit", "all"])
        .env("TLM_CRASH_AT", "journal")
        .output()
        .unwrap()
        .into();
    assert_ne!(run.code, 0, "the crash point was not reached");
    t
}

#[test]
fn a_stale_git_lock_is_removed_with_a_warning_naming_it() {
    // A commit killed inside git: its journal, and the locks git left.
    let t = commit_stopped_after_its_journal();
    for lock in [
        ".git/index.lock",
        ".git/HEAD.lock",
        ".git/refs/heads/main.lock",
    ] {
        t.write(lock, "");
    }
    // The first command finishes the commit, naming each lock it removes.
    let run = t.run(&["list", "nodes", "all"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("n0.a"));
    for lock in [
        ".git/index.lock",
        ".git/HEAD.lock",
        ".git/refs/heads/main.lock",
    ] {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains(lock)),
            "no warning names {lock}: {}",
            run.stderr
        );
    }
    assert!(git_locks(&t).is_empty(), "{:?}", git_locks(&t));
    assert_eq!(t.git(&["status", "--porcelain"]), "");
    t.ok(&["show", "global"]);
    t.ok(&["set", "global", "bird_bfd_multiplier", "5"]);
    // A lock left while no commit was under way: the next commit removes it.
    t.write(".git/index.lock", "");
    let run = t.run(&["commit", "all"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains(".git/index.lock"), "{}", run.stderr);
    assert!(run.stdout.contains("2 new version(s)"), "{}", run.stdout);
    assert_eq!(t.git(&["status", "--porcelain"]), "");
}

#[test]
fn a_lock_held_by_a_running_git_is_named_and_left_alone() {
    let t = mesh(1);
    t.write(".git/index.lock", "");
    // A git that stays alive in the repository (it waits for input).
    let mut git = std::process::Command::new("git")
        .args(["cat-file", "--batch"])
        .current_dir(&t.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    t.ok(&["set", "global", "bird_bfd_multiplier", "4"]);
    let error = t.refused(&["commit", "all"], 1);
    drop(git.stdin.take());
    git.wait().unwrap();
    assert!(
        error.contains(".git/index.lock") && error.contains("running git"),
        "{error}"
    );
    assert!(t.path(".git/index.lock").exists());
    // Once that git ended, the lock is stale.
    assert!(t.ok(&["commit", "all"]).contains("2 new version(s)"));
}

#[test]
fn reading_commands_never_need_git() {
    // A commit that stopped right after its journal: finishing it needs git.
    let t = commit_stopped_after_its_journal();
    let no_git = t.temp.path().join("no-git");
    std::fs::create_dir_all(&no_git).unwrap();
    for args in [
        &["list", "nodes", "all"][..],
        &["list", "sites"],
        &["list", "changed"],
        &["show", "global"],
        &["show_all", "node", "1"],
        &["status"],
    ] {
        let run: towalink_tests::Run = t
            .command(args)
            .env("PATH", &no_git)
            .output()
            .unwrap()
            .into();
        assert_eq!(run.code, 0, "{args:?} without git: {}", run.stderr);
    }
    // The service would offer no version of the unfinished commit.
    assert_versions_on_disk_are_in_git(&t, "unfinished commit");
    // With git, the next change finishes the commit.
    t.ok(&["set", "global", "bird_bfd_multiplier", "5"]);
    assert_eq!(
        versions_on_disk(&t)
            .iter()
            .map(|(_, v)| *v)
            .collect::<Vec<_>>(),
        [2, 2]
    );
    assert!(t
        .git(&["log", "--format=%s"])
        .contains("completed after an interrupted commit"));
}

#[test]
fn a_failing_git_publishes_no_version() {
    let t = mesh(1);
    t.ok(&["set", "global", "bird_bfd_multiplier", "4"]);
    let index_before = t.read("effective/index.toml");
    // Git fails to update its refs, as on a full disk.
    let hook = t.path(".git/hooks/reference-transaction");
    std::fs::write(
        &hook,
        "#!/bin/sh\nif [ \"$1\" = prepared ]; then echo 'fatal: No space left on device' >&2; exit 1; fi\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = t.run(&["commit", "all"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("No space left on device"),
        "{}",
        run.stderr
    );
    assert_eq!(
        versions_on_disk(&t),
        [("n0.a".to_string(), 1), ("n0.b".to_string(), 1)],
        "a version of the failed commit is visible to the service"
    );
    assert_eq!(t.read("effective/index.toml"), index_before);
    assert!(!t.path("effective/.commit-journal.toml").exists());
    // Nor is an activation git did not record left for the service to carry out.
    let activations_before = std::fs::read_to_string(t.path("effective/activation.toml")).ok();
    let run = t.run(&["activate", "all", "--no-wait"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(t.path("effective/activation.toml")).ok(),
        activations_before
    );
    std::fs::remove_file(&hook).unwrap();
    assert!(t.ok(&["commit", "all"]).contains("2 new version(s)"));
    assert_versions_on_disk_are_in_git(&t, "after the retry");
    assert_eq!(t.git(&["status", "--porcelain"]), "");
}

#[test]
fn git_records_only_the_configuration_even_without_gitignore() {
    let t = mesh(1);
    std::fs::remove_file(t.path(".gitignore")).unwrap();
    // An image written next to the configuration (by hand: `tlm image build` refuses that).
    t.write("images/x.img.zst", "not really an image");
    t.ok(&["set", "global", "bird_bfd_multiplier", "4"]);
    t.ok(&["commit", "all"]);
    let in_git = t.git(&["ls-files"]);
    for secret in [
        "certs/signing.key",
        "certs/management.key",
        "generated/secrets.toml",
        "images/x.img.zst",
    ] {
        assert!(!in_git.contains(secret), "{secret} is in git:\n{in_git}");
    }
    assert!(in_git.contains("generated/config.toml"));
    assert!(in_git.contains("effective/index.toml"));
}

#[test]
fn a_secret_among_the_configuration_files_refuses_every_change() {
    let t = mesh(1);
    let key = t.read("certs/signing.key");
    let cases: [(&str, &str, u32); 4] = [
        ("site_a/signing.key", key.as_str(), 0o644),
        ("site_a/node_n0/private.conf", "password = x\n", 0o600),
        ("copy-of-secrets", &t.read("generated/secrets.toml"), 0o644),
        ("x.img.zst", "(pretend image)", 0o644),
    ];
    for (path, content, mode) in cases {
        t.write(path, content);
        std::fs::set_permissions(t.path(path), std::fs::Permissions::from_mode(mode)).unwrap();
        for args in [
            &["set", "global", "bird_bfd_multiplier", "4"][..],
            &["commit", "all"],
            &["add", "site", "c"],
        ] {
            let error = t.refused(args, 1);
            assert!(error.contains(&format!("`{path}`")), "{args:?}: {error}");
        }
        std::fs::remove_file(t.path(path)).unwrap();
    }
    assert!(!t.git(&["log", "-p", "--all"]).contains(key.trim()));
}

#[test]
fn image_build_refuses_an_output_inside_the_configuration() {
    let t = mesh(1);
    let before = tree_hash(&t.dir);
    for output in [
        t.path("images/x.img.zst"),
        t.path("x.img"),
        t.dir.join("site_a/../images/y.img"),
    ] {
        let output = output.display().to_string();
        let error = t.refused(
            &[
                "image", "build", "node", "n0.a", "--board", "x86_64", "-o", &output,
            ],
            1,
        );
        assert!(
            error.contains(&output) && error.contains("inside the configuration directory"),
            "{error}"
        );
    }
    assert_eq!(tree_hash(&t.dir), before);
}

#[test]
fn the_public_signing_key_is_always_derived_from_the_private_key() {
    let t = mesh(1);
    let good = t.read("certs/signing.pub");
    // Truncated: provisioning must not hand it to a node.
    t.write("certs/signing.pub", &good[..10]);
    let state = t.temp.path().join("state");
    let run = t.run(&["provision", "node", "n0.a", state.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("signing.pub"),
        "no warning: {}",
        run.stderr
    );
    assert_eq!(t.read("certs/signing.pub"), good);
    let identity = std::fs::read_to_string(state.join("identity/node.toml")).unwrap();
    assert!(identity.contains(good.trim()), "{identity}");
    // Missing: recreated by the next command that changes the directory.
    std::fs::remove_file(t.path("certs/signing.pub")).unwrap();
    t.ok(&["set", "global", "bird_bfd_multiplier", "4"]);
    assert_eq!(t.read("certs/signing.pub"), good);
}

#[test]
fn a_refused_provision_writes_nothing() {
    let t = mesh(1);
    // With management configured (the commit makes the management key: versions carry its
    // public half).
    t.ok(&["set", "global", "controller_endpoint", "192.0.2.1"]);
    t.ok(&["commit", "all"]);
    let certs = || {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(t.path("certs"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let before = certs();
    assert!(before.iter().any(|(name, _)| name == "management.key"));
    let inside = t.path("node-state");
    let error = t.refused(&["provision", "node", "n0.a", inside.to_str().unwrap()], 1);
    assert!(
        error.contains("inside the configuration directory"),
        "{error}"
    );
    assert!(!inside.exists());
    assert!(certs() == before, "a refused provision changed certs/");
}

/// Appends `body` to the global BIRD template.
fn with_template(t: &Installation, body: &str) {
    let mut template = t.read("bird.conf.jinja");
    template.push_str(body);
    t.write("bird.conf.jinja", &template);
}

#[test]
fn runaway_templates_stop_with_the_template_and_line() {
    let t = mesh(1);
    let original = t.read("bird.conf.jinja");
    let line = original.lines().count() + 1;
    for (body, expected) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n",
            format!("template `bird.conf.jinja` line {line}:"),
        ),
        (
            "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}\n",
            "template `bird.conf.jinja`".to_string(),
        ),
        (
            "{% set ns = namespace(s='x' * 100000000) %}{% for i in range(8) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}\n",
            "template `bird.conf.jinja`".to_string(),
        ),
    ] {
        t.write("bird.conf.jinja", &original);
        with_template(&t, body);
        for args in [&["list", "changed"][..], &["commit", "all"]] {
            let started = Instant::now();
            let error = t.refused(args, 1);
            assert!(error.contains(&expected), "{args:?}: {error}");
            // Not a timing assertion on the machine's speed: an unbounded run takes minutes
            // and gigabytes; this only reports.
            eprintln!("{args:?} stopped after {:?}: {error}", started.elapsed());
        }
        // Another command runs right after: nothing stays locked.
        t.ok(&["list", "nodes", "all"]);
    }
    t.write("bird.conf.jinja", &original);
    assert_eq!(t.ok(&["list", "changed"]), "");
}

/// A small deterministic generator for the kill delays (seed printed, `TLM_CRASH_SEED`
/// repeats a run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Where a killed commit was, from its debug log.
fn landed(log: &str) -> &'static str {
    if log.contains("recorded in git") {
        "after git"
    } else if log.contains("git: recording") {
        "in git"
    } else {
        "before git"
    }
}

/// SIGKILL to the whole process group of `tlm commit` (git children included) at random
/// moments, as a power cut would: afterwards every command works, and the versions the
/// service would offer are always recorded in git.
#[test]
fn power_cut_kills_of_commit_never_wedge_the_controller() {
    // Runs until this many kills landed inside a commit (at most MAX_RUNS runs).
    const KILLS: usize = 100;
    const MAX_RUNS: usize = 300;
    let t = mesh(3);
    let commit = |value: usize| -> Duration {
        t.ok(&["set", "global", "bird_bfd_multiplier", &value.to_string()]);
        let started = Instant::now();
        t.ok(&["commit", "all"]);
        started.elapsed()
    };
    let mut measured: Vec<Duration> = (0..5).map(|i| commit(3 + i % 2)).collect();
    measured.sort();
    let typical = measured[measured.len() / 2];
    let seed = std::env::var("TLM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut rng = Rng(seed);
    let mut span = typical;
    eprintln!("commit takes about {typical:?}; seed {seed}");
    let mut landed_at = std::collections::BTreeMap::<&str, usize>::new();
    let mut finished = 0;
    let mut locks_left = 0;
    let mut run = 0;
    while run < MAX_RUNS && landed_at.values().sum::<usize>() < KILLS {
        run += 1;
        let value = 3 + run % 5;
        t.ok(&["set", "global", "bird_bfd_multiplier", &value.to_string()]);
        let log_path = t.temp.path().join("killed.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = t
            .command(&["--loglevel", "debug", "commit", "all"])
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Delays drawn up to `span`, which follows the commit's duration under the current
        // load: it shrinks when a commit ended before its kill and grows when the kill landed.
        let delay = span.mul_f64(rng.next());
        std::thread::sleep(delay);
        // SAFETY: signalling the process group we made.
        unsafe { libc::killpg(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        let log = std::fs::read_to_string(&log_path).unwrap();
        if status.success() {
            finished += 1;
            span = span.mul_f64(0.85);
        } else {
            span = span.mul_f64(1.05);
            *landed_at.entry(landed(&log)).or_default() += 1;
        }
        if !git_locks(&t).is_empty() {
            locks_left += 1;
        }
        let context = format!("run {run} (killed after {delay:?}, {})", landed(&log));
        assert_versions_on_disk_are_in_git(&t, &context);
        // Nothing is wedged.
        for args in [
            &["list", "nodes", "all"][..],
            &["show", "node", "n0.a"],
            &[
                "set",
                "global",
                "bird_bfd_multiplier",
                &(value + 1).to_string(),
            ],
            &["commit", "all"],
        ] {
            let r = t.run(args);
            assert_eq!(r.code, 0, "{context}: tlm {args:?}: {}", r.stderr);
        }
        assert_eq!(t.git(&["status", "--porcelain"]), "", "{context}");
        assert!(git_locks(&t).is_empty(), "{context}: {:?}", git_locks(&t));
        assert_eq!(t.ok(&["list", "changed"]), "", "{context}");
        assert_versions_on_disk_are_in_git(&t, &context);
    }
    eprintln!(
        "{run} runs: {finished} kills after the commit ended, {landed_at:?}; {locks_left} left a git lock, 0 wedged"
    );
    assert_eq!(
        landed_at.values().sum::<usize>(),
        KILLS,
        "too few kills landed inside a commit in {run} runs"
    );
    // The kills covered git itself, not only the steps around it.
    assert!(
        landed_at.get("in git").copied().unwrap_or(0) > 0,
        "no kill landed in git: {landed_at:?} (seed {seed})"
    );
}

/// `tlm activate` killed after writing `activation.toml`, before git recorded it: the marker
/// it left keeps `tlm serve` from carrying the order out (docs/security.md), and the next
/// `tlm` completes the activation, so git and the file agree again.
#[test]
fn an_activation_git_has_not_recorded_is_completed_by_the_next_tlm() {
    let t = mesh(1);
    let run: towalink_tests::Run = t
        .command(&["activate", "node", "n0.a", "1", "--timeout", "0"])
        .env("TLM_CRASH_AT", "activation-saved")
        .output()
        .unwrap()
        .into();
    assert_ne!(
        run.code, 0,
        "the crash point was not reached: {}",
        run.stderr
    );
    assert!(t.path("effective/.activation-pending").exists());
    assert!(t.read("effective/activation.toml").contains("n0.a"));
    assert!(
        !t.git(&["log", "--format=%s"]).contains("activate"),
        "git recorded it already"
    );
    let run = t.run(&["list", "nodes", "all"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("completing an interrupted activation"),
        "{}",
        run.stderr
    );
    assert!(!t.path("effective/.activation-pending").exists());
    assert!(
        t.git(&["log", "-1", "--format=%s"])
            .contains("(completed after an interrupted activate)"),
        "{}",
        t.git(&["log", "-3", "--format=%s"])
    );
    assert_eq!(
        t.git(&["status", "--porcelain", "effective/activation.toml"])
            .trim(),
        ""
    );
}
