//! Tier 1: `tlm recovery publish` and `tlm recovery make` (docs/recovery.md) with the real
//! `tlm`: the objects a node would fetch, checked with the node's own function
//! (`towalink_bundle::recovery::open`), the node's token and the controller's public key.

use std::collections::BTreeMap;

use towalink_bundle::recovery::{self, RecoveryError};
use towalink_bundle::VerifyingKey;
use towalink_tests::Installation;

/// Two sites, three committed nodes and one node without a committed version.
fn installation() -> Installation {
    let t = Installation::new();
    t.ok(&["add", "site", "a"]);
    t.ok(&["add", "site", "b"]);
    for node in ["x.a", "y.b", "z.b"] {
        t.ok(&["add", "node", node]);
    }
    t.ok(&["commit", "all"]);
    t.ok(&["add", "node", "fresh.b"]);
    t
}

/// `<node>.<site>` → (id, recovery token), read from the store as the node's identity gets it.
fn nodes(t: &Installation) -> BTreeMap<String, (u32, String)> {
    let generated: toml::Table = t.read("generated/config.toml").parse().unwrap();
    let token = |id: i64| t.recovery_token(id);
    generated["node"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let id = n["id"].as_integer().unwrap();
            (
                format!(
                    "{}.{}",
                    n["name"].as_str().unwrap(),
                    n["site"].as_str().unwrap()
                ),
                (u32::try_from(id).unwrap(), token(id)),
            )
        })
        .collect()
}

fn controller_key(t: &Installation) -> VerifyingKey {
    towalink_bundle::verifying_key_from_base64(&t.read("certs/signing.pub")).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn publish_writes_one_object_per_committed_node_named_by_its_token() {
    let t = installation();
    let nodes = nodes(&t);
    let key = controller_key(&t);
    let dir = t.temp.path().join("www/recovery");
    // Other files in the directory are left alone.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), "hello").unwrap();

    let run = t.run(&["recovery", "publish", dir.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let mut expected: Vec<String> = ["x.a", "y.b", "z.b"]
        .iter()
        .map(|n| recovery::object_name(&nodes[*n].1))
        .collect();
    expected.push("index.html".into());
    expected.sort();
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, expected);
    assert_eq!(
        std::fs::read_to_string(dir.join("index.html")).unwrap(),
        "hello"
    );

    // One line per node: node, version, file name; the node without a version is named on
    // stderr, not published.
    for node in ["x.a", "y.b", "z.b"] {
        let name = recovery::object_name(&nodes[node].1);
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with(node) && l.contains("v1") && l.contains(&name)),
            "{node} missing from:\n{}",
            run.stdout
        );
    }
    assert!(run.stderr.contains("fresh.b"), "{}", run.stderr);

    // Each object opens for its node with its token, and for no other.
    for (node, (id, token)) in &nodes {
        if node == "fresh.b" {
            continue;
        }
        let bytes = std::fs::read(dir.join(recovery::object_name(token))).unwrap();
        let opened = recovery::open(&bytes, *id, Some(token), &[key], false, None)
            .unwrap_or_else(|e| panic!("{node}: {e}"));
        assert_eq!((opened.node_id, opened.version), (*id, 1));
        assert!(opened.token_bound);
        opened.verify_bundle().unwrap();
        // No token, and nothing in clear: not the node's name nor its configuration.
        for (_, any_token) in nodes.values() {
            assert!(
                !contains(&bytes, any_token),
                "{node}: a token in the object"
            );
        }
        assert!(!contains(&bytes, "bird"), "{node}: configuration in clear");
        let (site, name) = node.split_once('.').map(|(n, s)| (s, n)).unwrap();
        assert!(!contains(&bytes, &format!("{site}-{name}")));
        assert!(!run.stdout.contains(token.as_str()) && !run.stderr.contains(token.as_str()));
    }

    // The seq is kept per node, outside git, and grows with each publish.
    let git_before = t.git(&["status", "--porcelain"]);
    let seqs: toml::Table = t.read("effective/recovery.toml").parse().unwrap();
    let first = seqs["nodes"]["x.a"].as_integer().unwrap() as u64;
    t.ok(&["recovery", "publish", dir.to_str().unwrap()]);
    let (id, token) = &nodes["x.a"];
    let bytes = std::fs::read(dir.join(recovery::object_name(token))).unwrap();
    let again = recovery::open(&bytes, *id, Some(token), &[key], false, Some(first)).unwrap();
    assert!(again.seq > first);
    assert_eq!(
        t.git(&["status", "--porcelain"]),
        git_before,
        "recovery adds nothing for git"
    );
    assert!(!git_before.contains("recovery"), "{git_before}");
}

#[test]
fn make_writes_one_nodes_object_that_only_that_node_opens() {
    let t = installation();
    let nodes = nodes(&t);
    let key = controller_key(&t);
    let file = t.temp.path().join("usb/x.tlr");
    let run = t.run(&[
        "recovery",
        "make",
        "node",
        "x.a",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (id, token) = &nodes["x.a"];
    let name = recovery::object_name(token);
    assert!(run.stdout.contains(&name), "{}", run.stdout);
    assert!(
        run.stdout
            .contains(&format!("{}/{name}", recovery::BOOT_DIR)),
        "{}",
        run.stdout
    );
    for text in [&run.stdout, &run.stderr] {
        for (_, token) in nodes.values() {
            assert!(!text.contains(token.as_str()), "a token in tlm's output");
        }
    }

    let bytes = std::fs::read(&file).unwrap();
    assert!(!contains(&bytes, token));
    let opened = recovery::open(&bytes, *id, Some(token), &[key], false, None).unwrap();
    assert_eq!(opened.version, 1);
    assert_eq!(opened.verify_bundle().unwrap().manifest().node, "x");

    // Another node (with its own token), or the wrong token: refused.
    let (other_id, other_token) = &nodes["y.b"];
    assert!(matches!(
        recovery::open(&bytes, *other_id, Some(other_token), &[key], false, None),
        Err(RecoveryError::WrongToken)
    ));
    assert!(matches!(
        recovery::open(&bytes, *id, Some(other_token), &[key], false, None),
        Err(RecoveryError::WrongToken)
    ));
    // A replay of it after it was applied: refused.
    assert!(matches!(
        recovery::open(&bytes, *id, Some(token), &[key], false, Some(opened.seq)),
        Err(RecoveryError::Replay { .. })
    ));
}

#[test]
fn the_lost_token_form_is_written_only_when_asked() {
    let t = installation();
    let nodes = nodes(&t);
    let key = controller_key(&t);
    let dir = t.temp.path().join("www");
    let out = t.ok(&[
        "recovery",
        "publish",
        dir.to_str().unwrap(),
        "--without-token",
    ]);
    let (id, token) = &nodes["z.b"];
    let lost = recovery::lost_token_name(*id, &key);
    assert!(
        out.contains(&lost) && out.contains("without token"),
        "{out}"
    );
    assert!(dir.join(recovery::object_name(token)).is_file());
    let bytes = std::fs::read(dir.join(&lost)).unwrap();
    assert!(matches!(
        recovery::open(&bytes, *id, Some(token), &[key], false, None),
        Err(RecoveryError::WithoutTokenRefused)
    ));
    let opened = recovery::open(&bytes, *id, None, &[key], true, None).unwrap();
    assert!(!opened.token_bound);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 6);

    let file = t.temp.path().join("lost.tlr");
    let out = t.ok(&[
        "recovery",
        "make",
        "node",
        "z.b",
        "-o",
        file.to_str().unwrap(),
        "--without-token",
    ]);
    assert!(out.contains(&lost), "{out}");
    let bytes = std::fs::read(&file).unwrap();
    let newer = recovery::open(&bytes, *id, None, &[key], true, Some(opened.seq)).unwrap();
    assert!(newer.seq > opened.seq);
}

#[test]
fn bad_arguments_are_refused_with_one_line() {
    let t = installation();
    let file = t.temp.path().join("o.tlr");
    let file = file.to_str().unwrap();
    let err = t.refused(&["recovery", "make", "node", "nope.a", "-o", file], 1);
    assert!(err.contains("nope.a"), "{err}");
    let err = t.refused(&["recovery", "make", "node", "fresh.b", "-o", file], 1);
    assert!(
        err.contains("fresh.b") && err.contains("no committed version"),
        "{err}"
    );
    let err = t.refused(&["recovery", "make", "node", "not a name", "-o", file], 1);
    assert!(err.contains("not a name"), "{err}");
    let inside = t.path("recovery-objects");
    let err = t.refused(&["recovery", "publish", inside.to_str().unwrap()], 1);
    assert!(err.contains("inside the configuration directory"), "{err}");
    assert!(!std::path::Path::new(file).exists());

    // Before the first commit there is no signing key.
    let fresh = Installation::new();
    fresh.ok(&["add", "site", "a"]);
    fresh.ok(&["add", "node", "x.a"]);
    let err = fresh.refused(
        &[
            "recovery",
            "publish",
            t.temp.path().join("w").to_str().unwrap(),
        ],
        1,
    );
    assert!(err.contains("signing.key"), "{err}");
}

#[test]
fn rotating_a_recovery_token_changes_that_nodes_token_only_and_its_object_name() {
    let t = installation();
    let before = nodes(&t);
    let out = t.ok(&["rotate", "recovery-token", "node", "x.a"]);
    assert!(out.contains("x.a: recovery token replaced"), "{out}");
    let after = nodes(&t);
    assert_ne!(after["x.a"].1, before["x.a"].1);
    assert_eq!(after["x.a"].1.len(), 64, "32 random bytes in hex");
    assert_eq!(after["y.b"], before["y.b"]);
    assert!(!out.contains(&after["x.a"].1) && !out.contains(&before["x.a"].1));
    // Objects published now carry the new name.
    let dir = t.temp.path().join("published");
    t.ok(&["recovery", "publish", dir.to_str().unwrap()]);
    assert!(dir.join(recovery::object_name(&after["x.a"].1)).exists());
    assert!(!dir.join(recovery::object_name(&before["x.a"].1)).exists());
    let error = t.refused(&["rotate", "recovery-token", "node", "nope.a"], 1);
    assert!(error.contains("nope.a"), "{error}");
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert_eq!(nodes(&t), after, "a refused rotation changes nothing");
}

/// `tlm rotate node`: a new key pair for that node only, the replaced public key kept as the
/// previous one (the hub's fallback until the node is heard on the new one), the private key
/// never printed; the next commit makes versions for the node and its peers.
#[test]
fn rotating_a_nodes_key_replaces_it_keeps_the_previous_and_renews_the_peers_versions() {
    let t = installation();
    let keys = |t: &Installation| -> BTreeMap<String, (String, Option<String>, String)> {
        let generated: toml::Table = t.read("generated/config.toml").parse().unwrap();
        let secrets: toml::Table = t.read("generated/secrets.toml").parse().unwrap();
        generated["node"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let private = secrets["node"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["id"] == n["id"])
                    .unwrap()["wg_private_key"]
                    .as_str()
                    .unwrap()
                    .to_string();
                (
                    format!(
                        "{}.{}",
                        n["name"].as_str().unwrap(),
                        n["site"].as_str().unwrap()
                    ),
                    (
                        n["wg_public_key"].as_str().unwrap().to_string(),
                        n.get("wg_public_key_previous")
                            .map(|k| k.as_str().unwrap().to_string()),
                        private,
                    ),
                )
            })
            .collect()
    };
    let before = keys(&t);
    assert!(before.values().all(|(_, previous, _)| previous.is_none()));
    let out = t.ok(&["rotate", "node", "x.a"]);
    let after = keys(&t);
    let (public, previous, private) = &after["x.a"];
    assert_ne!(public, &before["x.a"].0);
    assert_eq!(previous.as_ref(), Some(&before["x.a"].0));
    assert_ne!(private, &before["x.a"].2);
    assert!(
        out.contains(&format!("x.a: new WireGuard key {public}")),
        "{out}"
    );
    assert!(
        !out.contains(private.as_str()) && !out.contains(before["x.a"].2.as_str()),
        "{out}"
    );
    for other in ["y.b", "z.b", "fresh.b"] {
        assert_eq!(after[other], before[other], "{other} is not rotated");
    }
    // The node and its two peers get new versions (fresh.b's first one comes with them).
    let out = t.ok(&["commit", "all"]);
    assert!(out.contains("4 new version(s)"), "{out}");
    // A second rotation before the node took the first keeps the key the node runs with as
    // the previous one.
    t.ok(&["rotate", "node", "x.a"]);
    let again = keys(&t);
    assert_ne!(again["x.a"].0, after["x.a"].0);
    assert_eq!(again["x.a"].1.as_ref(), Some(&before["x.a"].0));
    let error = t.refused(&["rotate", "node", "nope.a"], 1);
    assert!(error.contains("nope.a"), "{error}");
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert_eq!(keys(&t), again, "a refused rotation changes nothing");
}

/// What `tlm rotate` refuses, and the crash windows it recovers from: a node whose reports
/// show a `towalink-node` from before key rotation is not rotated; a private key that does not
/// match the node's public key (a crash between `rotate node`'s two writes) goes into no
/// identity; a signing-key start cut short between its writes is taken up again.
#[test]
fn rotation_refuses_old_nodes_and_mismatched_keys_and_resumes_an_interrupted_start() {
    let t = installation();
    // x.a reported once, from a node before key rotation (no `wg_public_keys`).
    t.write(
        "status/nodes/x.a.json",
        r#"{"node":"x.a","node_id":1,"last_seen_ms":1,"endpoint":null,"report":{"node_id":1,"node":"x.a","daemon_version":"0.1.0","uptime_s":1,"daemon_uptime_s":1,"active_version":1,"state":"good","tries_left":null,"confirm_by":null,"last_good_version":1,"installed_versions":[1],"health":[],"last_rollback":null,"tunnels":[],"bgp":[],"order_done":null}}"#,
    );
    let before = t.read("generated/config.toml");
    let error = t.refused(&["rotate", "node", "x.a"], 1);
    assert!(
        error.contains("x.a runs a towalink-node from before key rotation"),
        "{error}"
    );
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert_eq!(t.read("generated/config.toml"), before);

    // y.b's private key replaced behind tlm's back (as a crash after the first write would).
    let secrets = t.read("generated/secrets.toml");
    let private = |index: usize| {
        let table: toml::Table = secrets.parse().unwrap();
        table["node"].as_array().unwrap()[index]["wg_private_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (x_private, y_private) = (private(0), private(1));
    t.write(
        "generated/secrets.toml",
        &secrets.replace(&y_private, &x_private),
    );
    let state = t.temp.path().join("y-state");
    let error = t.refused(&["provision", "node", "y.b", state.to_str().unwrap()], 1);
    assert!(
        error.contains("does not match its public key") && error.contains("y.b"),
        "{error}"
    );
    assert!(
        !error.contains(&x_private),
        "a private key was printed: {error}"
    );
    t.ok(&["rotate", "node", "y.b"]);
    t.ok(&["provision", "node", "y.b", state.to_str().unwrap()]);

    // A signing-key start cut short after the next key was written: taken up again.
    t.ok(&["rotate", "signing-key"]);
    let listed: toml::Table = t.read("generated/config.toml").parse().unwrap();
    let keys = listed["signing_keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 2);
    t.write(
        "generated/config.toml",
        &t.read("generated/config.toml")
            .lines()
            .filter(|l| !l.starts_with("signing_keys"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    t.ok(&["rotate", "signing-key"]);
    let again: toml::Table = t.read("generated/config.toml").parse().unwrap();
    assert_eq!(again["signing_keys"].as_array().unwrap(), &keys);
    let error = t.refused(&["rotate", "signing-key"], 1);
    assert!(error.contains("under way"), "{error}");
}
