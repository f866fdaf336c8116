//! Tier 1: state written by an earlier release keeps working with this one.
//!
//! `tests/fixtures/previous-release.tar.gz` holds a configuration directory and a node state
//! directory that the binaries of an earlier commit wrote (`MADE_BY` names it; `make.sh` beside
//! it is how): two sites, an attribute outside today's schema, two committed versions, an
//! activation record; a node that took v2, then v1, and rolled back to v2. Its secrets were
//! removed before packing (they are never in git), so nothing here needs them: reading, a
//! commit with nothing new, `set`, and the node's own lifecycle commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use towalink_tests::{binary, tree_hash, Installation, Run};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/previous-release/previous-release.tar.gz"
);

/// The fixture unpacked into a temporary directory.
struct Previous {
    temp: tempfile::TempDir,
}

impl Previous {
    fn unpack() -> Previous {
        let temp = tempfile::tempdir().expect("temp dir");
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(FIXTURE)
            .arg("-C")
            .arg(temp.path())
            .status()
            .expect("run tar");
        assert!(status.success(), "tar could not unpack {FIXTURE}");
        Previous { temp }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.temp.path().join(relative)
    }

    /// The configuration directory, as an installation the real `tlm` works on.
    fn installation(self) -> (Installation, tempfile::TempDir) {
        let t = Installation::new();
        std::fs::rename(self.path("config"), &t.dir).expect("move the configuration directory");
        (t, self.temp)
    }

    /// `towalink-node` on the node state directory (no data plane, BIRD's socket in the temp).
    fn node(&self, args: &[&str]) -> Run {
        Command::new(binary("towalink-node"))
            .arg("--state-dir")
            .arg(self.path("node"))
            .arg("--root")
            .arg(self.path("root"))
            .arg("--bird-socket")
            .arg(self.path("bird.ctl"))
            .args(["--dataplane", "none"])
            .args(args)
            .output()
            .expect("run towalink-node")
            .into()
    }

    fn node_ok(&self, args: &[&str]) -> String {
        let run = self.node(args);
        assert_eq!(
            run.code, 0,
            "towalink-node {args:?} failed on the earlier release's state:\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        run.stdout
    }

    fn node_status(&self) -> serde_json::Value {
        serde_json::from_str(&self.node_ok(&["status", "--format", "json"])).expect("status JSON")
    }
}

fn made_by(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("MADE_BY")).unwrap_or_default()
}

#[test]
fn a_configuration_directory_of_the_earlier_release_reads_and_commits_nothing_new() {
    let previous = Previous::unpack();
    let commit = made_by(previous.temp.path());
    let (t, _keep) = previous.installation();

    let nodes = t.ok(&["list", "nodes", "all"]);
    assert!(
        nodes.contains("r1.s1") && nodes.contains("r2.s2"),
        "the nodes of the directory made by {commit}: {nodes}"
    );
    let shown = t.ok(&["show_all", "node", "r1.s1"]);
    assert!(shown.contains("bird_bgp_hold_time = 30"), "{shown}");
    assert!(shown.contains("my_community = \"65000:1\""), "{shown}");

    // The same files render again: no node gets a new version, nothing in effective/ moves.
    let effective_before = tree_hash(&t.path("effective"));
    let run = t.run(&["commit", "all"]);
    assert_eq!(run.code, 0, "commit failed: {}", run.stderr);
    assert!(
        run.stdout
            .contains("committed: 0 new version(s), 2 node(s) unchanged"),
        "this release renders the earlier release's directory differently:\n{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("my_community"),
        "the attribute outside the schema is named in a warning: {}",
        run.stderr
    );
    // What this release records about its renders (soft state) is the only new file.
    let record = t.path("effective/render-inputs.toml");
    assert!(record.is_file(), "the commit records what it rendered");
    std::fs::remove_file(record).unwrap();
    assert_eq!(effective_before, tree_hash(&t.path("effective")));

    let status = t.ok(&["status"]);
    assert!(status.contains("r1.s1"), "{status}");
    let versions = t.ok(&["list", "nodes", "all", "--format", "json"]);
    assert!(versions.contains("\"r1.s1\""), "{versions}");

    // Changing it goes on as before; a value the schema refuses is refused at `set`.
    t.ok(&["set", "node", "r1.s1", "bird_bgp_hold_time", "40"]);
    assert!(t
        .read("site_s1/node_r1/config.toml")
        .contains("bird_bgp_hold_time = 40"));
    t.refused(
        &["set", "node", "r1.s1", "bird_bgp_hold_time", "\"long\""],
        1,
    );
}

#[test]
fn a_node_state_directory_of_the_earlier_release_keeps_its_versions_and_lifecycle() {
    let previous = Previous::unpack();
    let commit = made_by(previous.temp.path());

    let status = previous.node_status();
    assert_eq!(
        status["active_version"], 2,
        "state made by {commit}: {status}"
    );
    assert_eq!(status["state"], "good", "{status}");
    assert_eq!(status["last_rollback"]["from_version"], 1, "{status}");
    assert_eq!(
        status["last_rollback"]["reason"], "fixture: rolled back on purpose",
        "{status}"
    );
    let installed = status["installed_versions"].to_string();
    assert_eq!(installed, "[1,2]", "{status}");

    // The daemon's start on that state changes nothing that was settled.
    let root_before = tree_hash(&previous.path("root"));
    previous.node_ok(&["run", "--once"]);
    assert_eq!(previous.node_status()["active_version"], 2);
    assert_eq!(root_before, tree_hash(&previous.path("root")));

    // The lifecycle goes on: activate the other installed version, bless it, roll back.
    previous.node_ok(&["activate", "1"]);
    let pending = previous.node_status();
    assert_eq!(pending["active_version"], 1, "{pending}");
    assert_eq!(pending["state"], "pending", "{pending}");
    previous.node_ok(&["mark-good"]);
    assert_eq!(previous.node_status()["state"], "good");
    previous.node_ok(&["activate", "2"]);
    previous.node_ok(&["mark-bad", "--reason", "back to v1"]);
    let back = previous.node_status();
    assert_eq!(back["active_version"], 1, "{back}");
    assert_eq!(back["last_rollback"]["reason"], "back to v1", "{back}");
}
