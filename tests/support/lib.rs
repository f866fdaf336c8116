//! Shared pieces of the integration tiers: finding the real binaries, a temporary Towalink
//! configuration directory driven through the real `tlm`, and hashing a tree to prove that a
//! refused command changed nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

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
/// change to the tree changes the hash.
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
