//! Tier 1: the real `tlm` binary on temporary configuration directories.
//!
//! Covers the original command reference end to end, the hierarchy, stable allocation,
//! topologies, versions and bundles, bad input (exit status, one-line message, directory
//! byte-identical), interrupted commits, and BIRD-parser-valid output (real `bird -p`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;

use serde_json::Value as Json;
use towalink_tests::{bird_parse, tree_hash, Installation};

fn json(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn mode(install: &Installation, relative: &str) -> u32 {
    std::fs::metadata(install.path(relative))
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

/// Three sites, one node each (plus a second node at the first site).
fn three_sites() -> Installation {
    let t = Installation::new();
    for site in ["mysite1", "mysite2", "hq"] {
        t.ok(&["add", "site", site]);
    }
    for node in [
        "primary.mysite1",
        "backup.mysite1",
        "edge.mysite2",
        "main.hq",
    ] {
        t.ok(&["add", "node", node]);
    }
    t
}

#[test]
fn quickstart_runs_unchanged() {
    let t = Installation::new();
    t.ok(&["add", "site", "mysite1"]);
    t.ok(&["add", "node", "primary.mysite1"]);
    let out = t.ok(&["commit", "all"]);
    assert!(out.contains("primary.mysite1: v1"), "{out}");

    // The first command made a working directory and a git repository.
    for file in [
        "config.toml",
        "bird.conf.jinja",
        "bird_base.conf.jinja",
        "bird_peers.conf.jinja",
        "generated/config.toml",
        "site_mysite1/config.toml",
        "site_mysite1/node_primary/config.toml",
        "effective/mysite1/primary/v1/manifest.toml",
        "effective/mysite1/primary/v1/files/bird.conf",
        "effective/mysite1/primary/v1/mysite1-primary-v1.tar.zst",
    ] {
        assert!(t.path(file).is_file(), "{file} missing");
    }
    let log = t.git(&["log", "--format=%s"]);
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["tlm commit all", "tlm: initial configuration"]
    );
    assert_eq!(
        t.git(&["status", "--porcelain"]),
        "",
        "commit leaves git clean"
    );

    // Secrets are 0600 and out of git.
    assert_eq!(mode(&t, "generated/secrets.toml"), 0o600);
    assert_eq!(mode(&t, "certs/signing.key"), 0o600);
    let tracked = t.git(&["ls-files"]);
    assert!(
        !tracked.contains("secrets.toml") && !tracked.contains("signing.key"),
        "{tracked}"
    );
    // Git records the inputs and the index of versions; version directories stay on disk.
    assert!(tracked.contains("effective/index.toml"), "{tracked}");
    assert!(!tracked.contains("effective/mysite1/"), "{tracked}");
    let index: toml::Table = t.read("effective/index.toml").parse().unwrap();
    assert_eq!(
        index["nodes"]["primary.mysite1"]["latest"].as_integer(),
        Some(1)
    );
}

#[test]
fn bundle_verifies_with_the_controller_key() {
    let t = Installation::new();
    t.ok(&["add", "site", "a"]);
    t.ok(&["add", "site", "b"]);
    t.ok(&["add", "node", "x.a"]);
    t.ok(&["add", "node", "y.b"]);
    t.ok(&["commit", "all"]);
    let key = towalink_bundle::verifying_key_from_base64(&t.read("certs/signing.pub")).unwrap();
    let bytes = std::fs::read(t.path("effective/a/x/v1/a-x-v1.tar.zst")).unwrap();
    let bundle = towalink_bundle::verify(&bytes, &key, 1).expect("bundle verifies for node 1");
    let m = bundle.manifest();
    assert_eq!(
        (
            m.node_id,
            m.version,
            m.parent,
            m.site.as_str(),
            m.node.as_str()
        ),
        (1, 1, None, "a", "x")
    );
    let bird = m.files.iter().find(|f| f.path == "bird.conf").unwrap();
    assert_eq!(bird.target.as_deref(), Some("/etc/bird/bird.conf"));
    assert_eq!(bird.service.as_deref(), Some("bird"));
    assert_eq!(m.services["bird"].reload, ["birdc", "configure"]);
    // The unpacked copy is what the bundle carries.
    assert_eq!(
        bundle.files()["bird.conf"],
        std::fs::read(t.path("effective/a/x/v1/files/bird.conf")).unwrap()
    );
    assert_eq!(
        bundle.manifest_text(),
        t.read("effective/a/x/v1/manifest.toml")
    );
    // Wrong node id is refused.
    assert!(towalink_bundle::verify(&bytes, &key, 2).is_err());
    // The node file carries the peer with its keys and ports, and no private key.
    let node: toml::Table = std::str::from_utf8(&bundle.files()["towalink/node.toml"])
        .unwrap()
        .parse()
        .unwrap();
    let peer = &node["peers"].as_array().unwrap()[0];
    assert_eq!(peer["peer_id"].as_integer(), Some(2));
    assert_eq!(peer["listen_port"].as_integer(), Some(51822));
    let secrets = t.read("generated/secrets.toml");
    for line in secrets.lines().filter(|l| l.contains("wg_private_key")) {
        let key = line.split('"').nth(1).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(key));
        for f in bundle.files().values() {
            assert!(
                !String::from_utf8_lossy(f).contains(key),
                "private key in bundle"
            );
        }
    }
}

#[test]
fn command_reference_listing_and_showing() {
    let t = three_sites();
    let sites = t.ok(&["list", "sites"]);
    assert!(sites.starts_with("ID  SITE"), "{sites}");
    let sites = json(&t.ok(&["list", "sites", "--format", "json"]));
    let names: Vec<&str> = sites
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["site"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mysite1", "mysite2", "hq"]);
    assert_eq!(sites[0]["nodes"], 2);
    assert_eq!(sites[2]["asn"], 4_200_000_003u64);

    let nodes = json(&t.ok(&["list", "nodes", "all", "--format", "json"]));
    assert_eq!(nodes.as_array().unwrap().len(), 4);
    assert_eq!(nodes[0]["node"], "primary.mysite1");
    assert_eq!(nodes[0]["loopback_ipv4"], "10.254.0.1");
    let site_nodes = t.ok(&["list", "nodes", "mysite1"]);
    assert!(site_nodes.contains("primary.mysite1") && site_nodes.contains("backup.mysite1"));
    assert!(!site_nodes.contains("edge.mysite2"));

    t.ok(&["set", "global", "wg_keepalive", "30"]);
    t.ok(&["set", "site", "mysite1", "wg_keepalive", "25"]);
    t.ok(&["set", "node", "1", "wg_keepalive", "15"]);
    t.ok(&["set", "node", "main.hq", "groups", r#"[ "hubs" ]"#]);
    assert!(t.ok(&["show", "global"]).contains("wg_keepalive = 30"));
    assert_eq!(t.ok(&["show", "site", "mysite1"]), "wg_keepalive = 25\n");
    assert_eq!(
        t.ok(&["show", "node", "primary.mysite1"]),
        "wg_keepalive = 15\n"
    );
    let hq = json(&t.ok(&["show", "node", "main.hq", "--format", "json"]));
    assert_eq!(hq["groups"], serde_json::json!(["hubs"]));

    // show_all merges global → site → node and says who set what.
    let all = json(&t.ok(&["show_all", "node", "primary.mysite1", "--format", "json"]));
    assert_eq!(all["wg_keepalive"], 15);
    assert_eq!(all["node_id"], 1);
    assert_eq!(all["asn"], 4_200_000_001u64);
    let backup = json(&t.ok(&["show_all", "node", "backup.mysite1", "--format", "json"]));
    assert_eq!(backup["wg_keepalive"], 25);
    let origins = t.ok(&["show_all", "node", "backup.mysite1", "--origin"]);
    let line = |key: &str| {
        origins
            .lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap()
            .to_string()
    };
    assert!(
        line("wg_keepalive").ends_with("# site_mysite1/config.toml"),
        "{origins}"
    );
    assert!(line("wg_mtu").ends_with("# config.toml"), "{origins}");
    assert!(
        line("node_id").ends_with("# generated/config.toml"),
        "{origins}"
    );
    let origins = json(&t.ok(&["show_all", "node", "1", "--origin", "--format", "json"]));
    assert_eq!(origins["wg_keepalive"]["level"], "node");
    assert_eq!(
        origins["wg_keepalive"]["file"],
        "site_mysite1/node_primary/config.toml"
    );
    let site_all = json(&t.ok(&["show_all", "site", "mysite1", "--format", "json"]));
    assert_eq!(site_all["wg_keepalive"], 25);
    assert_eq!(site_all["asn"], 4_200_000_001u64);

    // `empty` removes an attribute; the level above shows through again.
    t.ok(&["set", "node", "primary.mysite1", "wg_keepalive", "empty"]);
    assert_eq!(t.ok(&["show", "node", "primary.mysite1"]), "");
    let all = json(&t.ok(&["show_all", "node", "primary.mysite1", "--format", "json"]));
    assert_eq!(all["wg_keepalive"], 25);
    // Removing from every level falls back to the built-in default.
    t.ok(&["set", "site", "mysite1", "wg_keepalive", "empty"]);
    t.ok(&["set", "global", "wg_keepalive", "empty"]);
    let all = json(&t.ok(&[
        "show_all",
        "node",
        "primary.mysite1",
        "--origin",
        "--format",
        "json",
    ]));
    assert_eq!(all["wg_keepalive"]["value"], 25);
    assert_eq!(all["wg_keepalive"]["level"], "default");

    // `set` keeps the operator's comments.
    assert!(t.read("config.toml").contains("# Topology:"));
}

#[test]
fn command_reference_add_remove_aliases_and_git() {
    let t = Installation::new();
    t.ok(&["create", "site", "berlin"]);
    t.ok(&["create", "node", "r1.berlin"]);
    t.ok(&["add", "node", "r2.berlin"]);
    t.ok(&["remove", "node", "r2.berlin"]);
    assert!(!t.path("site_berlin/node_r2").exists());
    t.ok(&["del", "node", "1"]);
    t.ok(&["del", "site", "berlin"]);
    assert!(!t.path("site_berlin").exists());
    assert_eq!(
        json(&t.ok(&["list", "sites", "--format", "json"])),
        serde_json::json!([])
    );
    // git passes through, in the configuration directory, with git's exit status.
    let log = t.ok(&["git", "log", "--oneline"]);
    assert!(log.contains("tlm: initial configuration"));
    assert_eq!(
        t.run(&["git", "rev-parse", "--verify", "no-such-ref"]).code,
        128
    );
    t.ok(&["git", "branch", "new-branch"]);
    assert!(t.git(&["branch"]).contains("new-branch"));
    // --loglevel debug works and still prints no secret.
    let run = t.run(&["--loglevel", "debug", "add", "site", "paris"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = t.run(&["-l", "info", "add", "node", "r1.paris"]);
    assert!(run.stderr.contains("added node"), "{}", run.stderr);
}

#[test]
fn commit_creates_a_version_only_when_content_changed() {
    let t = three_sites();
    let changed = t.ok(&["list", "changed"]);
    assert_eq!(changed.lines().count(), 4, "{changed}");
    assert!(changed.contains("primary.mysite1 (no version yet)"));
    let out = t.ok(&["-m", "first", "commit", "all"]);
    assert!(out.contains("4 new version(s)"), "{out}");
    assert_eq!(t.ok(&["list", "changed"]), "");
    let out = t.ok(&["commit", "all"]);
    assert!(
        out.contains("0 new version(s), 4 node(s) unchanged"),
        "{out}"
    );
    // The controller's own attributes (alerts) reach no version.
    t.ok(&[
        "set",
        "global",
        "alert_webhooks",
        "[\"https://hooks.example/towalink\"]",
    ]);
    t.ok(&["set", "global", "alert_bgp_down_after_s", "30"]);
    assert_eq!(t.ok(&["list", "changed"]), "");
    let out = t.ok(&["commit", "all"]);
    assert!(out.contains("0 new version(s)"), "{out}");

    // A global attribute that reaches every node's files: every node gets v2.
    t.ok(&["set", "global", "bird_bfd_interval_ms", "200"]);
    let changed = json(&t.ok(&["list", "changed", "--format", "json"]));
    assert_eq!(changed.as_array().unwrap().len(), 4);
    assert_eq!(changed[0]["latest_version"], 1);
    // Commit one site, then one node, then the rest.
    let out = t.ok(&["-m", "Change BFD timer", "commit", "site", "mysite1"]);
    assert!(
        out.contains("primary.mysite1: v2") && out.contains("backup.mysite1: v2"),
        "{out}"
    );
    assert!(!out.contains("edge.mysite2"), "{out}");
    let out = t.ok(&["commit", "node", "edge.mysite2"]);
    assert!(out.contains("edge.mysite2: v2"), "{out}");
    assert_eq!(t.ok(&["list", "changed"]), "main.hq (latest v1)\n");
    t.ok(&["commit", "node", "4"]);
    let m = t.read("effective/hq/main/v2/manifest.toml");
    assert!(m.contains("version = 2") && m.contains("parent = 1"), "{m}");
    let bfd = t.read("effective/hq/main/v2/files/bird_base.conf");
    assert!(bfd.contains("min rx interval 200 ms;"), "{bfd}");
    assert!(t.git(&["log", "--format=%s"]).contains("Change BFD timer"));
    assert_eq!(t.git(&["status", "--porcelain"]), "");

    // Adding a node changes its peers' files (a new link), not the others' ids.
    t.ok(&["add", "site", "lab"]);
    t.ok(&["add", "node", "test.lab"]);
    let out = t.ok(&["commit", "all"]);
    assert!(
        out.contains("test.lab: v1") && out.contains("main.hq: v3"),
        "{out}"
    );
}

#[test]
fn activate_records_the_wanted_version() {
    let t = three_sites();
    t.ok(&["commit", "all"]);
    t.ok(&["set", "global", "bird_bfd_multiplier", "5"]);
    t.ok(&["commit", "all"]);
    let out = t.ok(&["activate", "all"]);
    assert!(out.contains("primary.mysite1: v2"), "{out}");
    let activation: toml::Table = t.read("effective/activation.toml").parse().unwrap();
    assert_eq!(
        activation["nodes"]["primary.mysite1"]["version"].as_integer(),
        Some(2)
    );
    assert_eq!(
        activation["nodes"]["primary.mysite1"]["order"].as_integer(),
        Some(1)
    );
    let run = t.run(&["activate", "site", "mysite1", "v1"]);
    assert_eq!(run.code, 0);
    assert!(
        run.stdout.contains("primary.mysite1: v1 (was v2)"),
        "{}",
        run.stdout
    );
    // Without the service the activation is recorded and the nodes take it later.
    assert!(
        run.stderr.contains("the controller service is not running"),
        "{}",
        run.stderr
    );
    let activation: toml::Table = t.read("effective/activation.toml").parse().unwrap();
    assert_eq!(
        activation["nodes"]["primary.mysite1"]["order"].as_integer(),
        Some(2)
    );
    // --canary needs the service; nothing is recorded.
    let before = t.read("effective/activation.toml");
    let run = t.run(&["activate", "all", "--canary", "mysite1"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("--canary needs the controller service"),
        "{}",
        run.stderr
    );
    assert_eq!(t.read("effective/activation.toml"), before);
    t.ok(&["activate", "node", "edge.mysite2", "1"]);
    t.ok(&["activate", "node", "4", "latest"]);
    let nodes = json(&t.ok(&["list", "nodes", "all", "--format", "json"]));
    let wanted: BTreeMap<String, u64> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_string(),
                n["activate_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(wanted["primary.mysite1"], 1);
    assert_eq!(wanted["edge.mysite2"], 1);
    assert_eq!(wanted["main.hq"], 2);
    assert_eq!(
        t.git(&["status", "--porcelain"]),
        "",
        "activation is recorded in git"
    );
    assert!(t
        .git(&["log", "-1", "--format=%s"])
        .contains("tlm activate node 4 latest"));
}

#[test]
fn site_and_node_files_replace_global_files() {
    let t = three_sites();
    // A site-level part replaces the global one for that site's nodes only.
    t.write(
        "site_mysite2/bird_peers.conf.jinja",
        "# custom peers for {{ site_name }}\n{% for peer in peers %}# {{ peer.interface }}\n{% endfor %}\n",
    );
    // A node-level extra part is added for that node only.
    t.write(
        "site_hq/node_main/bird_local.conf.jinja",
        "# local policy of {{ node_name }}\n",
    );
    // A plain (non-template) file is copied as it is; no target → stays in the slot.
    t.write("motd.txt", "welcome {{ not a template }}\n");
    t.ok(&["commit", "all"]);
    let peers2 = t.read("effective/mysite2/edge/v1/files/bird_peers.conf");
    assert!(
        peers2.starts_with("# custom peers for mysite2\n# tlwg1\n"),
        "{peers2}"
    );
    let peers1 = t.read("effective/mysite1/primary/v1/files/bird_peers.conf");
    assert!(peers1.contains("protocol bgp peer3_v4"), "{peers1}");
    assert_eq!(
        t.read("effective/hq/main/v1/files/bird_local.conf"),
        "# local policy of main\n"
    );
    assert!(!t
        .path("effective/mysite1/primary/v1/files/bird_local.conf")
        .exists());
    assert_eq!(
        t.read("effective/mysite1/primary/v1/files/motd.txt"),
        "welcome {{ not a template }}\n"
    );
    let manifest = t.read("effective/hq/main/v1/manifest.toml");
    assert!(
        manifest.contains("target = \"/etc/bird/bird_local.conf\""),
        "{manifest}"
    );
    // All of them are still valid BIRD configurations.
    for node in [
        "mysite1/primary",
        "mysite1/backup",
        "mysite2/edge",
        "hq/main",
    ] {
        bird_parse(&t.path(&format!("effective/{node}/v1/files/bird.conf")))
            .unwrap_or_else(|e| panic!("{node}: {e}"));
    }
}

fn links(t: &Installation) -> Vec<(String, String)> {
    json(&t.ok(&["list", "links", "--format", "json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["a"].as_str().unwrap().to_string(),
                l["b"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn topologies_mesh_star_and_custom() {
    let t = three_sites();
    t.ok(&["add", "site", "branch"]);
    t.ok(&["add", "node", "r.branch"]);
    // Full mesh: every pair of nodes at different sites (5 nodes, 2 at one site): 10 - 1.
    assert_eq!(links(&t).len(), 9);
    assert!(!links(&t).contains(&("primary.mysite1".into(), "backup.mysite1".into())));

    // Star: spokes link to the hub only.
    t.ok(&["set", "global", "topology", "star"]);
    t.ok(&["set", "node", "main.hq", "groups", r#"[ "hubs" ]"#]);
    let star = links(&t);
    assert_eq!(star.len(), 4, "{star:?}");
    assert!(
        star.iter().all(|(a, b)| a == "main.hq" || b == "main.hq"),
        "{star:?}"
    );

    // Custom: an extra link between two spokes, in any topology.
    t.ok(&["set", "node", "edge.mysite2", "links", r#"[ "r.branch" ]"#]);
    let custom = links(&t);
    assert_eq!(custom.len(), 5);
    assert!(
        custom.contains(&("edge.mysite2".into(), "r.branch".into())),
        "{custom:?}"
    );

    // Only custom links.
    t.ok(&["set", "global", "topology", "none"]);
    assert_eq!(
        links(&t),
        vec![("edge.mysite2".to_string(), "r.branch".to_string())]
    );
    t.ok(&["commit", "all"]);
    let peers = t.read("effective/mysite2/edge/v1/files/bird_peers.conf");
    assert!(peers.contains("protocol bgp peer5_v4"), "{peers}");
    let lonely = t.read("effective/mysite1/primary/v1/files/bird_peers.conf");
    assert!(
        lonely.contains("no links yet") && !lonely.contains("protocol bgp"),
        "{lonely}"
    );
    bird_parse(&t.path("effective/mysite1/primary/v1/files/bird.conf")).unwrap();
    bird_parse(&t.path("effective/mysite2/edge/v1/files/bird.conf")).unwrap();
}

#[test]
fn rendered_bird_configurations_pass_the_bird_parser() {
    // Mesh of 3 sites and a star of 4 sites with endpoints and custom timers.
    let t = Installation::new();
    for (i, site) in ["alpha", "beta", "gamma", "delta"].iter().enumerate() {
        t.ok(&["add", "site", site]);
        let node = format!("r{i}.{site}");
        t.ok(&["add", "node", &node]);
        t.ok(&[
            "set",
            "node",
            &node,
            "wg_endpoint",
            &format!("192.0.2.{}", i + 1),
        ]);
    }
    t.ok(&["set", "global", "bird_bfd_interval_ms", "50"]);
    t.ok(&["commit", "all"]);
    t.ok(&["set", "global", "topology", "star"]);
    t.ok(&["set", "node", "r0.alpha", "groups", r#"["hubs"]"#]);
    t.ok(&["commit", "all"]);
    for (site, node) in [
        ("alpha", "r0"),
        ("beta", "r1"),
        ("gamma", "r2"),
        ("delta", "r3"),
    ] {
        for version in [1, 2] {
            let conf = t.path(&format!(
                "effective/{site}/{node}/v{version}/files/bird.conf"
            ));
            bird_parse(&conf).unwrap_or_else(|e| panic!("{node}.{site} v{version}: {e}"));
        }
    }
    // The hub has a session pair per spoke, a spoke only to the hub.
    let hub = t.read("effective/alpha/r0/v2/files/bird_peers.conf");
    assert_eq!(hub.matches("protocol bgp").count(), 6);
    let spoke = t.read("effective/beta/r1/v2/files/bird_peers.conf");
    assert_eq!(spoke.matches("protocol bgp").count(), 2);
    // The default routing design, as rendered.
    let main = t.read("effective/beta/r1/v2/files/bird.conf");
    assert!(main.contains("router id 10.254.0.2;"), "{main}");
    assert!(spoke.contains("local 10.254.0.2 as LOCAL_AS;"));
    assert!(spoke.contains("neighbor 10.254.0.1 as 4200000001;"));
    assert!(spoke.contains("direct;") && spoke.contains("bfd on;"));
    assert!(
        !spoke
            .lines()
            .any(|l| l.trim_start().starts_with("multihop")),
        "{spoke}"
    );
    assert!(
        spoke.contains("route fd54:6f77:616c::1/128 via fe80::1:0:2%tlwg1 bfd;"),
        "{spoke}"
    );
    // The tunnel to a peer is never routed into a tunnel: routes covering its endpoint are refused.
    let base = t.read("effective/beta/r1/v2/files/bird_base.conf");
    assert!(base.contains("if 192.0.2.1 ~ net then reject;"), "{base}");
    assert!(spoke.contains("ipv6 { preference 50; };"), "{spoke}");
    let node: toml::Table = t
        .read("effective/beta/r1/v2/files/towalink/node.toml")
        .parse()
        .unwrap();
    let peer = &node["peers"].as_array().unwrap()[0];
    assert_eq!(peer["peer_endpoint"].as_str(), Some("192.0.2.1:51822"));
}

#[test]
fn allocation_is_stable_across_adds_and_removes() {
    let t = three_sites();
    t.ok(&["commit", "all"]);
    let before = json(&t.ok(&["list", "nodes", "all", "--format", "json"]));
    let links_before = json(&t.ok(&["list", "links", "--format", "json"]));
    let secrets_before: toml::Table = t.read("generated/secrets.toml").parse().unwrap();
    t.ok(&["del", "node", "backup.mysite1"]);
    t.ok(&["add", "node", "new.mysite2"]);
    t.ok(&["add", "site", "zeta"]);
    t.ok(&["add", "node", "z.zeta"]);
    let after = json(&t.ok(&["list", "nodes", "all", "--format", "json"]));
    for node in before.as_array().unwrap() {
        if node["node"] == "backup.mysite1" {
            continue;
        }
        let now = after
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node["node"])
            .unwrap();
        for key in ["id", "loopback_ipv4", "loopback_ipv6", "wg_public_key"] {
            assert_eq!(now[key], node[key], "{} {key} changed", node["node"]);
        }
    }
    let new = after
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "new.mysite2")
        .unwrap();
    assert_eq!(new["id"], 5, "ids are never reused");
    assert_eq!(
        new["loopback_ipv4"], "10.254.0.2",
        "the freed address is reused"
    );
    // Links between surviving nodes keep their interfaces, ports and link-locals.
    let links_after = json(&t.ok(&["list", "links", "--format", "json"]));
    for link in links_before.as_array().unwrap() {
        if link["a"] == "backup.mysite1" || link["b"] == "backup.mysite1" {
            continue;
        }
        assert!(
            links_after.as_array().unwrap().contains(link),
            "link {link} changed"
        );
    }
    // Private keys of surviving nodes are unchanged.
    let secrets_after: toml::Table = t.read("generated/secrets.toml").parse().unwrap();
    let keys = |s: &toml::Table| -> BTreeMap<i64, String> {
        s["node"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_integer().unwrap(),
                    n["wg_private_key"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let (kb, ka) = (keys(&secrets_before), keys(&secrets_after));
    for id in [1, 3, 4] {
        assert_eq!(kb[&id], ka[&id]);
    }
    assert!(!ka.contains_key(&2));
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let t = three_sites();
    t.ok(&["commit", "all"]);
    let cases: &[(&[&str], &str)] = &[
        (&["add", "site", "Bad_Name"], "invalid site name `Bad_Name`"),
        (&["add", "site", "mysite1"], "site `mysite1` already exists"),
        (&["add", "site", "all"], "site name `all` is reserved"),
        (&["add", "site", "15"], "site name `15` is reserved"),
        (
            &["add", "node", "primary.mysite1"],
            "node `primary.mysite1` already exists",
        ),
        (
            &["add", "node", "x.nosuchsite"],
            "unknown site `nosuchsite`",
        ),
        (&["add", "node", "nosite"], "invalid node `nosite`"),
        (
            &["show", "node", "ghost.mysite1"],
            "unknown node `ghost.mysite1`",
        ),
        (&["show", "node", "99"], "unknown node `99`"),
        (&["show", "site", "nowhere"], "unknown site `nowhere`"),
        (&["del", "node", "ghost.hq"], "unknown node `ghost.hq`"),
        (
            &["del", "site", "mysite1"],
            "site `mysite1` still has nodes",
        ),
        (
            &["set", "node", "ghost.hq", "a", "1"],
            "unknown node `ghost.hq`",
        ),
        (
            &["set", "global", "wg_keepalive", "[1,"],
            "invalid value for `wg_keepalive`",
        ),
        (
            &["set", "global", "bad name", "1"],
            "invalid attribute name `bad name`",
        ),
        (
            &["set", "global", "topology", "ring"],
            r#"`config.toml`: attribute `topology` must be one of "mesh", "star", "none", not "ring""#,
        ),
        (
            &["set", "site", "hq", "wg_mtu", "70000"],
            "`site_hq/config.toml`: attribute `wg_mtu` must be an integer",
        ),
        (
            &["set", "node", "main.hq", "links", r#"["ghost.hq"]"#],
            "attribute `links` names unknown node `ghost.hq`",
        ),
        (&["commit", "site", "nowhere"], "unknown site `nowhere`"),
        (&["commit", "node", "42"], "unknown node `42`"),
        (
            &["activate", "node", "main.hq", "v9"],
            "node main.hq has no version v9 (latest is v1)",
        ),
        (&["activate", "all", "v2"], "has no version v2"),
        (
            &["activate", "node", "main.hq", "vx"],
            "invalid version `vx`",
        ),
        (&["list", "nodes", "nowhere"], "unknown site `nowhere`"),
    ];
    for (args, expected) in cases {
        let error = t.refused(args, 1);
        assert!(
            error.contains(expected),
            "tlm {args:?}: {error:?} does not contain {expected:?}"
        );
    }
    // Usage errors exit 2.
    t.refused(&["frobnicate"], 2);
    t.refused(&["list"], 2);
    t.refused(&["add", "site"], 2);
}

#[test]
fn malformed_files_and_template_errors_name_the_file_and_line() {
    let t = three_sites();
    t.ok(&["commit", "all"]);
    let original = t.read("site_mysite2/config.toml");

    t.write(
        "site_mysite2/config.toml",
        "wg_keepalive = 25\nwg_mtu = = 1\n",
    );
    for args in [
        &["commit", "all"][..],
        &["list", "changed"],
        &["show_all", "node", "edge.mysite2"],
        &["set", "site", "mysite2", "x", "1"],
    ] {
        let error = t.refused(args, 1);
        assert!(
            error.contains("`site_mysite2/config.toml`: line 2, column"),
            "{args:?}: {error}"
        );
    }
    t.write("site_mysite2/config.toml", &original);

    t.write("site_hq/node_main/config.toml", "groups = \"hubs\"\n");
    let error = t.refused(&["commit", "all"], 1);
    assert!(
        error.contains(
            "`site_hq/node_main/config.toml`: attribute `groups` must be a list of strings"
        ),
        "{error}"
    );
    t.write("site_hq/node_main/config.toml", "");

    // Strict templates: an undefined variable names the template file and line.
    t.write(
        "site_mysite1/bird_extra.conf.jinja",
        "# ok\n# line two\nrouter id {{ no_such_attribute }};\n",
    );
    let error = t.refused(&["commit", "all"], 1);
    assert!(
        error.contains("template `site_mysite1/bird_extra.conf.jinja` line 3: undefined value"),
        "{error}"
    );
    t.refused(&["list", "changed"], 1);
    std::fs::remove_file(t.path("site_mysite1/bird_extra.conf.jinja")).unwrap();

    t.write("bird_extra.conf.jinja", "{% for x in %}\n");
    let error = t.refused(&["commit", "all"], 1);
    assert!(
        error.contains("template `bird_extra.conf.jinja` line 1: syntax error"),
        "{error}"
    );
    std::fs::remove_file(t.path("bird_extra.conf.jinja")).unwrap();

    // Nothing was committed by the failures.
    assert_eq!(t.ok(&["list", "changed"]), "");
    assert!(!t.path("effective/mysite1/primary/v2").exists());
}

#[test]
fn a_non_towalink_directory_is_refused() {
    let t = Installation::new();
    std::fs::create_dir_all(&t.dir).unwrap();
    std::fs::write(t.dir.join("important.txt"), "keep me").unwrap();
    let error = t.refused(&["list", "sites"], 1);
    assert!(
        error.contains("is not a Towalink configuration directory"),
        "{error}"
    );
}

/// Kill `tlm commit` at every step of publishing: the next `tlm` finds the versions on disk
/// and in git in step, and a later commit works.
#[test]
fn interrupted_commits_leave_versions_and_git_in_step() {
    for point in [
        "staged",
        "journal",
        "index",
        "git",
        "renamed-one",
        "published",
    ] {
        let t = three_sites();
        t.ok(&["commit", "all"]);
        t.ok(&["set", "global", "bird_bfd_multiplier", "4"]);
        let run: towalink_tests::Run = t
            .command(&["-m", "timers", "commit", "all"])
            .env("TLM_CRASH_AT", point)
            .output()
            .unwrap()
            .into();
        assert_ne!(run.code, 0, "{point}: the crash point was not reached");
        // Any command recovers.
        t.ok(&["list", "sites"]);
        // Only the operator's uncommitted `set` may remain when the commit never published.
        let expected = if point == "staged" {
            " M config.toml\n"
        } else {
            ""
        };
        assert_eq!(
            t.git(&["status", "--porcelain"]),
            expected,
            "{point}: git not in step"
        );
        let on_disk: Vec<bool> = [
            "mysite1/primary",
            "mysite1/backup",
            "mysite2/edge",
            "hq/main",
        ]
        .iter()
        .map(|n| t.path(&format!("effective/{n}/v2/manifest.toml")).exists())
        .collect();
        if point == "staged" {
            assert_eq!(
                on_disk, [false; 4],
                "{point}: nothing published before the journal"
            );
            assert_eq!(t.ok(&["list", "changed"]).lines().count(), 4);
        } else {
            assert_eq!(
                on_disk, [true; 4],
                "{point}: the journal finishes the commit"
            );
            assert!(
                t.git(&["log", "-1", "--format=%s"]).starts_with("timers"),
                "{point}"
            );
            assert_eq!(t.ok(&["list", "changed"]), "");
        }
        assert!(!t.path("effective/.commit-journal.toml").exists());
        let leftovers: Vec<_> = std::fs::read_dir(t.path("effective"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
        // And the next commit works.
        t.ok(&["set", "global", "bird_bfd_multiplier", "6"]);
        let out = t.ok(&["commit", "all"]);
        assert!(out.contains("4 new version(s)"), "{point}: {out}");
    }
}

#[test]
fn no_secret_is_ever_printed() {
    let t = three_sites();
    let mut printed = String::new();
    for args in [
        &["--loglevel", "debug", "commit", "all"][..],
        &["list", "nodes", "all", "--format", "json"],
        &["show_all", "node", "1", "--origin"],
        &["show_all", "node", "1", "--format", "json"],
        &["show", "global"],
        &["list", "links", "--format", "json"],
        &["--loglevel", "debug", "add", "node", "extra.hq"],
    ] {
        let run = t.run(args);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        printed.push_str(&run.stdout);
        printed.push_str(&run.stderr);
    }
    let secrets: toml::Table = t.read("generated/secrets.toml").parse().unwrap();
    for node in secrets["node"].as_array().unwrap() {
        for key in ["wg_private_key", "recovery_token"] {
            let secret = node[key].as_str().unwrap();
            assert!(!printed.contains(secret), "{key} was printed");
        }
    }
    let signing = t.read("certs/signing.key");
    assert!(!printed.contains(signing.trim()));
    // And none is in git.
    let everything_in_git = t.git(&["log", "-p", "--all"]);
    for node in secrets["node"].as_array().unwrap() {
        assert!(!everything_in_git.contains(node["wg_private_key"].as_str().unwrap()));
    }
}

#[test]
fn commits_work_without_a_git_identity() {
    let t = Installation::new();
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| -> towalink_tests::Run {
        t.command(args)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("LANG", "de_DE.UTF-8")
            .env_remove("GIT_AUTHOR_NAME")
            .env_remove("GIT_AUTHOR_EMAIL")
            .env_remove("GIT_COMMITTER_NAME")
            .env_remove("GIT_COMMITTER_EMAIL")
            .env_remove("EMAIL")
            .output()
            .unwrap()
            .into()
    };
    for args in [
        &["add", "site", "a"][..],
        &["add", "node", "x.a"],
        &["commit", "all"],
        &["commit", "all"],
        &["activate", "all"],
        &["activate", "all"],
    ] {
        let r = run(args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
    }
    assert!(t
        .git(&["log", "--format=%an %s"])
        .contains("tlm tlm commit all"));
}

#[test]
fn a_refused_first_command_creates_nothing() {
    let t = Installation::new();
    for args in [
        &["show", "site", "Bad_Name"][..],
        &["add", "node", "nosite"],
        &["activate", "node", "x.a", "vx"],
    ] {
        let run = t.run(args);
        assert_eq!(run.code, 1, "{args:?}");
        assert!(!t.dir.exists(), "{args:?} created the directory");
    }
}

#[test]
fn provision_refuses_a_directory_inside_the_configuration() {
    let t = Installation::new();
    t.ok(&["add", "site", "a"]);
    t.ok(&["add", "node", "x.a"]);
    t.ok(&["commit", "all"]);
    let inside = t.path("node-state");
    let error = t.refused(&["provision", "node", "x.a", inside.to_str().unwrap()], 1);
    assert!(
        error.contains("inside the configuration directory"),
        "{error}"
    );
    // Elsewhere it works, and the keys are 0600.
    let outside = t.temp.path().join("node-state");
    t.ok(&["provision", "node", "x.a", outside.to_str().unwrap()]);
    let mode = std::fs::metadata(outside.join("identity/wg_private_key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(outside.join("incoming/a-x-v1.tar.zst").is_file());
}

#[test]
fn help_and_version() {
    let t = Installation::new();
    let help = t.ok(&["--help"]);
    for verb in [
        "list", "show", "show_all", "add", "del", "set", "commit", "activate", "git",
    ] {
        assert!(help.contains(verb), "{verb} missing from --help");
    }
    assert!(!t.dir.exists(), "--help creates nothing");
    assert!(t.ok(&["--version"]).starts_with("tlm "));
    let before = tree_hash(t.temp.path());
    t.refused(&["show", "frob"], 2);
    assert_eq!(before, tree_hash(t.temp.path()));
}

/// A directory made by an earlier `tlm` has that release's `bird_base.conf.jinja`: unchanged,
/// the next commit brings the current one (with the management filters) and says so; a
/// customized one is left alone, with a warning naming what it lacks.
#[test]
fn an_earlier_default_bird_template_gets_the_management_filters_at_the_next_commit() {
    let earlier = include_str!("fixtures/bird_base.conf.jinja-before-security");
    for customized in [false, true] {
        let t = Installation::new();
        t.ok(&["add", "site", "a"]);
        t.ok(&["add", "node", "x.a"]);
        t.ok(&["add", "node", "y.a"]);
        t.ok(&["commit", "all"]);
        let mut old = earlier.to_string();
        if customized {
            old.push_str("# our own line\n");
        }
        t.write("bird_base.conf.jinja", &old);
        t.git(&["commit", "-qam", "as an earlier tlm left it"]);
        let run = t.run(&["commit", "all"]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        // The newest version of x.a (this tlm rendered v1 already with the current template,
        // so an upgraded template renders the same: no v2 then).
        let latest = (1..=2)
            .rev()
            .map(|v| t.path(&format!("effective/a/x/v{v}/files/bird_base.conf")))
            .find(|p| p.exists())
            .expect("a version of x.a");
        let rendered = std::fs::read_to_string(latest).unwrap();
        if customized {
            assert_eq!(
                t.read("bird_base.conf.jinja"),
                old,
                "a customized template was changed"
            );
            assert!(
                run.stderr
                    .contains("bird_base.conf.jinja: customized and without `towalink_management`"),
                "{}",
                run.stderr
            );
        } else {
            assert!(
                run.stderr
                    .contains("bird_base.conf.jinja: was the unchanged built-in template"),
                "{}",
                run.stderr
            );
            assert!(t
                .read("bird_base.conf.jinja")
                .contains("towalink_management"));
            assert!(
                rendered.contains("if net ~ towalink_management then reject;"),
                "{rendered}"
            );
            assert!(
                t.git(&["log", "-1", "--stat"])
                    .contains("bird_base.conf.jinja"),
                "the updated template was not recorded"
            );
        }
    }
}

/// The original's help flag `-?` (and `-h`, `--help`) on every command, each top-level command
/// with examples; shell completions and manual pages generated from the same grammar.
#[test]
fn help_on_every_command_completions_and_manual_pages() {
    let t = Installation::new();
    for args in [
        &["-?"][..],
        &["-h"],
        &["--help"],
        &["set", "-?"],
        &["set", "node", "-?"],
        &["activate", "--help"],
        &["token", "add", "-h"],
    ] {
        let run = t.run(args);
        assert_eq!(run.code, 0, "tlm {args:?}: {}", run.stderr);
        assert!(
            run.stdout.contains("Usage: tlm"),
            "tlm {args:?}: {}",
            run.stdout
        );
    }
    let top = t.run(&["-?"]).stdout;
    assert!(top.contains("-?, --help"), "{top}");
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 20, "{commands:?}");
    for command in &commands {
        let help = t.run(&[command, "-?"]).stdout;
        assert!(
            help.contains("Examples:\n  tlm "),
            "tlm {command} -? has no examples:\n{help}"
        );
    }
    assert!(t
        .run(&["set", "-?"])
        .stdout
        .contains("  tlm set global bird_bfd_interval_ms 200"));

    let bash = t.run(&["completions", "bash"]);
    assert_eq!(bash.code, 0, "{}", bash.stderr);
    assert!(
        bash.stdout.contains("_tlm()") && bash.stdout.contains("show_all"),
        "{}",
        bash.stdout
    );
    assert!(t
        .run(&["completions", "zsh"])
        .stdout
        .starts_with("#compdef tlm"));
    let refused = t.run(&["completions", "tcsh"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);

    let pages = tempfile::tempdir().unwrap();
    let dir = pages.path().join("man1");
    let out = t.ok(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(out.contains("manual page(s) written"), "{out}");
    let top_page = std::fs::read_to_string(dir.join("tlm.1")).unwrap();
    assert!(top_page.contains(".TH tlm"), "{top_page}");
    let set_node = std::fs::read_to_string(dir.join("tlm-set-node.1")).unwrap();
    assert!(
        set_node.contains(".TH tlm-set-node") && set_node.contains("ATTRIBUTE"),
        "{set_node}"
    );
    assert!(dir.join("tlm-token-add.1").exists());
}

/// `tlm inventory` and the original's Ansible wrappers, with the real `ansible` and
/// `ansible-playbook` (Debian's `ansible-core`) asked which hosts each command targets.
#[test]
fn ansible_wrappers_target_the_nodes_in_scope() {
    let t = three_sites();
    let inventory = json(&t.ok(&["inventory"]));
    let groups = inventory["all"]["children"].as_object().unwrap();
    assert_eq!(
        groups.keys().map(String::as_str).collect::<Vec<_>>(),
        ["site_hq", "site_mysite1", "site_mysite2"]
    );
    let primary = &groups["site_mysite1"]["hosts"]["primary.mysite1"];
    assert!(
        primary["ansible_host"]
            .as_str()
            .unwrap()
            .starts_with("fd54:6f77:616c:ffff::1:"),
        "the management address: {primary}"
    );
    assert_eq!(primary["towalink_node_id"], 1);
    let site = json(&t.ok(&["inventory", "site", "hq"]));
    assert_eq!(site["all"]["children"].as_object().unwrap().len(), 1);

    // The hosts Ansible itself lists for each wrapper (`--list-hosts` runs nothing on them).
    let hosts = |args: &[&str]| -> Vec<String> {
        let run = t.run(args);
        assert_eq!(run.code, 0, "tlm {args:?}: {}{}", run.stdout, run.stderr);
        let mut hosts: Vec<String> = run
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| l.contains('.') && !l.contains([' ', ':', '/']))
            .map(str::to_string)
            .collect();
        hosts.sort();
        hosts
    };
    assert_eq!(
        hosts(&["ansible", "site", "mysite1", "all", "--list-hosts"]),
        ["backup.mysite1", "primary.mysite1"]
    );
    assert_eq!(
        hosts(&["ansible", "node", "main.hq", "all", "--list-hosts"]),
        ["main.hq"]
    );
    assert_eq!(
        hosts(&["ansible", "node", "3", "all", "--list-hosts"]),
        ["edge.mysite2"],
        "a node by id"
    );
    assert_eq!(hosts(&["ansible", "all", "all", "--list-hosts"]).len(), 4);
    let dir = tempfile::tempdir().unwrap();
    let playbook = dir.path().join("playbook");
    std::fs::write(
        &playbook,
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - debug: msg=hi\n",
    )
    .unwrap();
    assert_eq!(
        hosts(&[
            "ansible_playbook",
            "site",
            "mysite2",
            playbook.to_str().unwrap(),
            "--list-hosts"
        ]),
        ["edge.mysite2"]
    );
    let refused = t.refused(&["ansible", "site", "nope", "all", "--list-hosts"], 1);
    assert!(refused.contains("nope"), "{refused}");
}
