//! Tier 1: the attribute schema through the real `tlm`: `set` refuses what the node or BIRD
//! would refuse later (one line naming the attribute, the expected type and the value; the
//! directory byte-identical), `commit` names the file a bad hand-edited value came from, a
//! directory written by an earlier `tlm` with attributes outside the schema still commits, and
//! `show_all --explain` prints each attribute's doc.

use serde_json::Value as Json;
use towalink_tests::Installation;

/// Two sites with a node each, committed once.
fn two_sites() -> Installation {
    let t = Installation::new();
    t.ok(&["add", "site", "a"]);
    t.ok(&["add", "site", "b"]);
    t.ok(&["add", "node", "x.a"]);
    t.ok(&["add", "node", "y.b"]);
    t.ok(&["commit", "all"]);
    t
}

/// The refusal names every piece in one line.
fn refused_naming(t: &Installation, args: &[&str], pieces: &[&str]) {
    let error = t.refused(args, 1);
    for piece in pieces {
        assert!(
            error.contains(piece),
            "tlm {args:?}: `{piece}` not in: {error}"
        );
    }
}

#[test]
fn set_refuses_the_values_the_node_or_bird_would_refuse() {
    let t = two_sites();
    // Recovery settings (docs/recovery.md): refused here, not on a node cut off from us.
    refused_naming(
        &t,
        &[
            "set",
            "global",
            "recovery_urls",
            r#"["https://r.example/"]"#,
        ],
        &[
            "attribute `recovery_urls`",
            "an `http://host[:port][/path]` URL or an absolute directory",
        ],
    );
    refused_naming(
        &t,
        &["set", "site", "a", "recovery_after_s", "5"],
        &["attribute `recovery_after_s`", "not 5"],
    );
    t.ok(&[
        "set",
        "global",
        "recovery_urls",
        r#"["http://[2001:db8::9]:8080/towalink", "/media/usb"]"#,
    ]);
    t.ok(&["set", "node", "y.b", "recovery_lost_token_boots", "0"]);
    refused_naming(
        &t,
        &["set", "global", "bird_bfd_interval_ms", r#""fast""#],
        &[
            "`config.toml`: attribute `bird_bfd_interval_ms`",
            "must be an integer from 1 to 60000 (milliseconds)",
            r#"not "fast""#,
        ],
    );
    refused_naming(
        &t,
        &["set", "global", "node_health_checks", r#"["bogus"]"#],
        &[
            "attribute `node_health_checks`",
            r#"a list of names from "bird", "wireguard", "controller""#,
            r#"not ["bogus"]"#,
        ],
    );
    refused_naming(
        &t,
        &["set", "site", "a", "node_boot_tries", "0"],
        &[
            "`site_a/config.toml`: attribute `node_boot_tries`",
            "an integer from 1 to 100",
            "not 0",
        ],
    );
    refused_naming(
        &t,
        &[
            "set",
            "node",
            "y.b",
            "wg_endpoint",
            r#""[2001:db8::2]:9999""#,
        ],
        &[
            "`site_b/node_y/config.toml`: attribute `wg_endpoint`",
            "a host name, IPv4 or IPv6 address without port",
            r#"not "[2001:db8::2]:9999""#,
        ],
    );
    refused_naming(
        &t,
        &["set", "node", "y.b", "wg_endpoint", "192.0.2.1:51820"],
        &["attribute `wg_endpoint`", r#"not "192.0.2.1:51820""#],
    );
    refused_naming(
        &t,
        &[
            "set",
            "global",
            "file_targets",
            r#"{ "bird*.conf" = { directory = "etc/bird" } }"#,
        ],
        &[
            r#"`config.toml`: attribute `file_targets."bird*.conf".directory`"#,
            "an absolute path without `..`",
            r#"not "etc/bird""#,
        ],
    );
    refused_naming(
        &t,
        &["set", "global", "services.bird.reload", "[]"],
        &[
            "attribute `services.bird.reload`",
            "a non-empty list of strings",
            "not []",
        ],
    );
    // BIRD refuses a keepalive time longer than the hold time.
    refused_naming(
        &t,
        &["set", "site", "b", "bird_bgp_keepalive_time", "10"],
        &[
            "`site_b/config.toml`: attribute `bird_bgp_keepalive_time`",
            "must be at most `bird_bgp_hold_time` (9), not 10",
        ],
    );
    refused_naming(
        &t,
        &["set", "global", "controller_endpoint", "h:x"],
        &[
            "attribute `controller_endpoint`",
            "`host[:port]`",
            r#"not "h:x""#,
        ],
    );
    // The values that are right still go through, and the endpoint gets the link's port.
    t.ok(&["set", "node", "y.b", "wg_endpoint", r#""2001:db8::2""#]);
    t.ok(&["set", "global", "bird_bfd_interval_ms", "200"]);
    t.ok(&[
        "set",
        "global",
        "node_health_checks",
        r#"["bird", "wireguard"]"#,
    ]);
    t.ok(&["commit", "all"]);
    let node_toml = t.read("effective/a/x/v2/files/towalink/node.toml");
    assert!(
        node_toml.contains(r#"peer_endpoint = "[2001:db8::2]:51821""#),
        "{node_toml}"
    );
    assert!(t
        .read("effective/a/x/v2/files/bird_base.conf")
        .contains("min rx interval 200 ms;"));
}

#[test]
fn set_refuses_levels_generated_and_unknown_names_with_a_hint() {
    let t = two_sites();
    refused_naming(
        &t,
        &["set", "global", "loopback_ipv4", "10.0.0.1"],
        &[
            "`config.toml`: attribute `loopback_ipv4`",
            "cannot be set at the global level (only: node)",
        ],
    );
    refused_naming(
        &t,
        &["set", "node", "x.a", "mgmt_api_port", "8002"],
        &[
            "attribute `mgmt_api_port`",
            "at the node level (only: global)",
        ],
    );
    refused_naming(
        &t,
        &["set", "site", "a", "node_id", "7"],
        &["attribute `node_id` is generated by tlm and cannot be set"],
    );
    refused_naming(
        &t,
        &["set", "global", "motd", "hello"],
        &[
            "`config.toml`: attribute `motd` is unknown",
            "hint: attributes of your own, for templates, start with `user_`, e.g. `user_motd`",
        ],
    );
    refused_naming(
        &t,
        &["set", "global", "wg_keepaliv", "5"],
        &[
            "attribute `wg_keepaliv` is unknown",
            "did you mean `wg_keepalive`?",
        ],
    );
    // The same attributes at their own level, and the user namespace at any level, any value.
    t.ok(&["set", "node", "x.a", "loopback_ipv4", "10.254.9.9"]);
    t.ok(&[
        "set",
        "global",
        "user_motd",
        r#""hello from {{ site_name }}""#,
    ]);
    t.ok(&["set", "site", "a", "user_motd", "greetings"]);
    t.ok(&["set", "global", "user_limits", "{ max = 1 }"]);
    t.ok(&["set", "node", "x.a", "user_limits", "{ max = 3 }"]);
    t.write("motd.jinja", "{{ user_motd }} {{ user_limits.max }}\n");
    t.ok(&["commit", "all"]);
    assert_eq!(t.read("effective/a/x/v2/files/motd"), "greetings 3\n");
    assert!(t
        .read("effective/a/x/v2/files/bird.conf")
        .contains("router id 10.254.9.9;"));
    // Removing is always allowed.
    t.ok(&["set", "node", "x.a", "user_limits", "empty"]);
}

#[test]
fn commit_names_the_file_that_set_a_bad_value() {
    let t = two_sites();
    let cases = [
        (
            "site_a/config.toml",
            "bird_bfd_interval_ms = \"fast\"\n",
            r#"`site_a/config.toml`: attribute `bird_bfd_interval_ms` must be an integer from 1 to 60000 (milliseconds), not "fast""#,
        ),
        (
            "site_b/node_y/config.toml",
            "[file_targets.\"bird*.conf\"]\ndirectory = \"etc/bird\"\n",
            r#"`site_b/node_y/config.toml`: attribute `file_targets."bird*.conf".directory` must be an absolute path without `..`, not "etc/bird""#,
        ),
        (
            "site_b/config.toml",
            "[file_targets.\"extra.conf\"]\nmode = \"0600\"\n",
            r#"`site_b/config.toml`: attribute `file_targets."extra.conf".directory` is missing"#,
        ),
        (
            "site_a/node_x/config.toml",
            "node_health_checks = [\"bogus\"]\n",
            "`site_a/node_x/config.toml`: attribute `node_health_checks` must be",
        ),
    ];
    for (file, text, expected) in cases {
        // Top-level keys before the file's tables.
        let original = t.read(file);
        t.write(file, &format!("{text}{original}"));
        let error = t.refused(&["commit", "all"], 1);
        assert!(error.contains(expected), "{file}: {error}");
        t.write(file, &original);
    }
    let global = t.read("config.toml");
    t.write(
        "config.toml",
        &global.replace("node_boot_tries = 3", "node_boot_tries = 0"),
    );
    let error = t.refused(&["commit", "all"], 1);
    assert!(
        error.contains(
            "`config.toml`: attribute `node_boot_tries` must be an integer from 1 to 100, not 0"
        ),
        "{error}"
    );
    t.write("config.toml", &global);
    // A field another level supplies is no error.
    let original = t.read("site_b/config.toml");
    t.write(
        "site_b/config.toml",
        &format!("{original}[file_targets.\"bird*.conf\"]\nmode = \"0640\"\n"),
    );
    t.ok(&["commit", "all"]);
    let manifest = t.read("effective/b/y/v2/manifest.toml");
    assert!(manifest.contains("mode = \"0640\""), "{manifest}");
}

#[test]
fn a_directory_with_attributes_outside_the_schema_still_commits() {
    // What `tlm set` of earlier releases wrote without a complaint: names outside the schema
    // (used by templates) and attributes at levels where they mean nothing.
    let t = two_sites();
    let global = t.read("config.toml");
    t.write(
        "config.toml",
        &format!("syslog_server = \"192.0.2.99\"\nasn = 4200000100\n{global}"),
    );
    let site = t.read("site_a/config.toml");
    t.write(
        "site_a/config.toml",
        &format!("{site}\n[my_settings]\nlevel = 2\n"),
    );
    t.write(
        "syslog.conf.jinja",
        "server {{ syslog_server }} level {% if my_settings is defined %}{{ my_settings.level }}{% else %}1{% endif %}\n",
    );
    let run = t.run(&["commit", "all"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for warning in [
        "`config.toml`: attribute `syslog_server` is unknown",
        "rename it `user_syslog_server`",
        "`site_a/config.toml`: attribute `my_settings` is unknown",
        "`config.toml`: attribute `asn` cannot be set at the global level (only: site, node)",
    ] {
        assert!(
            run.stderr.contains(warning),
            "`{warning}` not in:\n{}",
            run.stderr
        );
    }
    assert_eq!(
        t.read("effective/a/x/v2/files/syslog.conf").trim_end(),
        "server 192.0.2.99 level 2"
    );
    assert_eq!(
        t.read("effective/b/y/v2/files/syslog.conf").trim_end(),
        "server 192.0.2.99 level 1"
    );
    // The other commands read it as before; `set` still edits other attributes of the file.
    t.ok(&["show_all", "node", "x.a"]);
    t.ok(&["set", "global", "wg_keepalive", "20"]);
    assert!(t
        .read("config.toml")
        .contains("syslog_server = \"192.0.2.99\""));
    // Removing an unknown attribute is allowed.
    t.ok(&["set", "global", "syslog_server", "empty"]);
}

#[test]
fn show_all_explain_prints_the_doc_beside_each_attribute() {
    let t = two_sites();
    t.ok(&["set", "global", "user_motd", "hi"]);
    let plain = t.ok(&["show_all", "node", "x.a"]);
    assert!(plain.contains("bird_bfd_interval_ms = 100\n"), "{plain}");
    assert!(
        !plain.contains('#'),
        "default output has no comments: {plain}"
    );

    let explained = t.ok(&["show_all", "node", "x.a", "--explain"]);
    let line = |prefix: &str| -> String {
        explained
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{explained}"))
            .to_string()
    };
    assert!(
        line("bird_bfd_interval_ms = 100 ").ends_with("# BFD min rx/tx interval on the tunnels")
    );
    assert!(line("node_id = 1 ").contains("# numeric id, allocated once"));
    assert!(line(r#"file_targets."bird*.conf".directory = "/etc/bird""#)
        .ends_with("# directory on the node the matching files go to"));
    assert!(line("user_motd = \"hi\"").ends_with("# (your own attribute)"));

    let both = t.ok(&["show_all", "node", "x.a", "--explain", "--origin"]);
    assert!(
        both.lines().any(|l| l.starts_with("user_motd = \"hi\"")
            && l.ends_with("# config.toml: (your own attribute)")),
        "{both}"
    );
    let json: Json =
        serde_json::from_str(&t.ok(&["show_all", "site", "a", "--explain", "--format", "json"]))
            .unwrap();
    assert_eq!(json["wg_mtu"]["value"], 1420);
    assert_eq!(
        json["wg_mtu"]["doc"],
        "tunnel MTU (a link uses the smaller of both ends)"
    );
    assert!(json["wg_mtu"].get("file").is_none());
}
