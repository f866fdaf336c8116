//! Shared pieces of the integration tiers: finding the real binaries, a temporary Towalink
//! configuration directory driven through the real `tlm`, and hashing a tree to prove that a
//! refused command changed nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

pub mod browser;
pub mod fleetlab;
pub mod fleetsim;
pub mod hostcopy;
pub mod network;
pub mod vm;

/// Path of a workspace binary (built by `cargo build --workspace --bins` before the tests),
/// overridable by `TOWALINK_BIN_DIR`.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TOWALINK_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            // target/<profile>/deps/<test binary> → target/<profile>/
            let exe = std::env::current_exe().expect("test binary path");
            exe.parent()
                .and_then(Path::parent)
                .expect("test binary lives in target/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (or set TOWALINK_BIN_DIR)",
        path.display()
    );
    path
}

/// `ssh` options of a test's client: no prompts, a node's host key taken on first sight and
/// not kept, a generous connect timeout.
pub const SSH_TEST_OPTIONS: [&str; 8] = [
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "ConnectTimeout=30",
];

/// The result of one `tlm` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A temporary configuration directory and the real `tlm` pointed at it.
pub struct Installation {
    pub temp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Default for Installation {
    fn default() -> Self {
        Self::new()
    }
}

impl Installation {
    /// The recovery token of node `id`, as the store keeps it (`generated/secrets.toml`).
    pub fn recovery_token(&self, id: i64) -> String {
        let secrets: toml::Table = std::fs::read_to_string(self.dir.join("generated/secrets.toml"))
            .expect("generated/secrets.toml")
            .parse()
            .expect("secrets.toml is TOML");
        secrets["node"]
            .as_array()
            .expect("a node list")
            .iter()
            .find(|n| n["id"].as_integer() == Some(id))
            .and_then(|n| n["recovery_token"].as_str())
            .expect("a token for every node")
            .to_string()
    }

    pub fn new() -> Installation {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("towalink");
        Installation { temp, dir }
    }

    /// A `tlm` command for this directory (environment cleared of the operator's settings).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary("tlm"));
        command
            .args(args)
            .env("TOWALINK_CONFIG_DIR", &self.dir)
            .env_remove("TLM_CRASH_AT")
            .env("NO_COLOR", "1");
        command
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.command(args).output().expect("run tlm").into()
    }

    /// Runs `tlm`, expecting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args);
        assert_eq!(
            run.code, 0,
            "tlm {args:?} failed:\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        run.stdout
    }

    /// Runs `tlm`, expecting failure with `code`; checks stderr is one `tlm: error:` line and
    /// that the directory is byte-identical afterwards. Returns the error line.
    pub fn refused(&self, args: &[&str], code: i32) -> String {
        let before = tree_hash(&self.dir);
        let run = self.run(args);
        assert_eq!(
            run.code, code,
            "tlm {args:?}: expected exit {code}\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        let after = tree_hash(&self.dir);
        assert_eq!(
            before, after,
            "tlm {args:?} changed the configuration directory"
        );
        if code == 1 {
            let lines: Vec<&str> = run.stderr.lines().collect();
            assert_eq!(
                lines.len(),
                1,
                "tlm {args:?}: stderr is not one line: {:?}",
                run.stderr
            );
            assert!(lines[0].starts_with("tlm: error: "), "{}", lines[0]);
        }
        run.stderr.trim_end().to_string()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative))
            .unwrap_or_else(|e| panic!("read {relative}: {e}"))
    }

    pub fn write(&self, relative: &str, content: &str) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    /// Runs git in the directory; returns stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// sha256 over every file, directory and symlink below `root` (paths, modes, contents), so any
/// change to the tree changes the hash; a top-level `status/` (the records a running `tlm
/// serve` keeps writing) is left out.
pub fn tree_hash(root: &Path) -> String {
    let mut entries = BTreeMap::new();
    collect(root, root, &mut entries);
    let mut hasher = Sha256::new();
    for (path, (mode, digest)) in entries {
        hasher.update(format!("{path}\0{mode:o}\0{digest}\n"));
    }
    hex::encode(hasher.finalize())
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap().display().to_string();
        // What a running `tlm serve` writes as nodes report: its records, not configuration.
        if relative == "status" {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode();
        if meta.is_dir() {
            out.insert(relative, (mode, "dir".into()));
            collect(root, &path, out);
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            out.insert(relative, (mode, target.display().to_string()));
        } else {
            let content = std::fs::read(&path).unwrap();
            out.insert(relative, (mode, hex::encode(Sha256::digest(&content))));
        }
    }
}

/// Checks a rendered BIRD configuration with the real BIRD 2 parser (`bird -p -c FILE`).
/// Fails (never skips) when BIRD is not installed.
pub fn bird_parse(config: &Path) -> Result<(), String> {
    let out = Command::new("bird")
        .args(["-p", "-c"])
        .arg(config)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `bird` ({e}): install BIRD 2 (Debian package bird2); .ci/run does")
        });
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A node for tier-2 tests: a state directory and a root for the real `towalink-node`, and,
/// when started, a real BIRD 2 in a network namespace of its own (so nothing it does touches
/// the host's routes) with its own control socket. BIRD is killed on drop, also when the test
/// fails.
pub struct NodeEnv {
    pub temp: tempfile::TempDir,
    pub state: PathBuf,
    pub root: PathBuf,
    pub socket: PathBuf,
    bird: Option<std::process::Child>,
}

impl Default for NodeEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeEnv {
    pub fn new() -> NodeEnv {
        let temp = tempfile::tempdir().expect("temp dir");
        let state = temp.path().join("state");
        let root = temp.path().join("root");
        let socket = temp.path().join("bird.ctl");
        std::fs::create_dir_all(root.join("etc/bird")).unwrap();
        NodeEnv {
            temp,
            state,
            root,
            socket,
            bird: None,
        }
    }

    /// A `towalink-node` command on this node.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary("towalink-node"));
        command
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--root")
            .arg(&self.root)
            .arg("--bird-socket")
            .arg(&self.socket)
            .args(["--dataplane", "none"])
            .args(args)
            .env_remove("TOWALINK_NODE_CRASH_AT");
        command
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.command(args)
            .output()
            .expect("run towalink-node")
            .into()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args);
        assert_eq!(
            run.code, 0,
            "towalink-node {args:?} failed:\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        run.stdout
    }

    /// `status --format json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--format", "json"])).expect("status JSON")
    }

    /// Starts BIRD on the root's /etc/bird/bird.conf in a new network namespace.
    pub fn start_bird(&mut self) {
        assert!(
            unsafe_is_root(),
            "tier-2 tests run BIRD in a network namespace: run them as root (.ci/run does)"
        );
        let child = Command::new("unshare")
            .args(["--net", "bird", "-f", "-c"])
            .arg(self.root.join("etc/bird/bird.conf"))
            .arg("-s")
            .arg(&self.socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start bird (needs `bird2` and `unshare`)");
        self.bird = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.bird.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "bird exited at start ({status}): is {} valid?",
                    self.root.join("etc/bird/bird.conf").display()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "bird did not open its control socket"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// A `birdc` command on this node's BIRD.
    pub fn birdc(&self, command: &str) -> String {
        birdc(&self.socket, command)
    }

    /// The files under the root, relative path → content.
    pub fn root_files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        collect_files(&self.root, &self.root, &mut files);
        files
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            let relative = path.strip_prefix(root).unwrap().display().to_string();
            out.insert(relative, std::fs::read(&path).unwrap());
        }
    }
}

/// Runs the real `birdc` against a control socket; returns what it printed.
pub fn birdc(socket: &Path, command: &str) -> String {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(command.split_whitespace())
        .output()
        .expect("run birdc (Debian package bird2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unsafe_is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

impl Drop for NodeEnv {
    fn drop(&mut self) {
        if let Some(mut child) = self.bird.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The files a version puts under the root, from the controller's copy of the version:
/// `etc/bird/bird.conf` → content.
pub fn version_targets(version_dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let manifest: toml::Table = std::fs::read_to_string(version_dir.join("manifest.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut files = BTreeMap::new();
    for file in manifest["files"].as_array().unwrap() {
        if let Some(target) = file.get("target").and_then(|t| t.as_str()) {
            let path = file["path"].as_str().unwrap();
            files.insert(
                target.trim_start_matches('/').to_string(),
                std::fs::read(version_dir.join("files").join(path)).unwrap(),
            );
        }
    }
    files
}

/// The default `bird_peers.conf.jinja` with every peer's AS number off by one: a version
/// rendered from it never gets a BGP session up (the peers refuse the OPEN).
pub fn bird_peers_breaking_bgp() -> String {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../controller/defaults/bird_peers.conf.jinja"
    ))
    .expect("the default BIRD peers template");
    let broken = template.replace("as {{ peer.peer_asn }};", "as {{ peer.peer_asn + 1 }};");
    assert_ne!(
        broken, template,
        "the template no longer names the peer's AS that way"
    );
    broken
}

/// A 2 GiB-style zstd bomb with a 128 KiB window (see `towalink_bundle::test_support`).
pub fn zstd_bomb(prefix: &[u8], total: u64) -> Vec<u8> {
    towalink_bundle::test_support::zstd_bomb(prefix, total, 17)
}

pub use towalink_bundle::test_support::tar_header;
