//! Tier 2 (host workflows), each in a throwaway copy of this Debian machine
//! ([`towalink_tests::hostcopy`]: an overlay of `/` in namespaces of its own, so packages,
//! units and sysctls are real and the machine is left as it was):
//! - the controller's Debian package (`controller/dist/build-deb.sh`) installs with `apt-get
//!   install ./…deb`: `tlm` on the PATH, `/etc/towalink` 0700, the unit `systemd-analyze
//!   verify` accepts, man pages and completions; the seed's quickstart then runs against
//!   `/etc/towalink`, and removing or purging the package keeps the installation;
//! - `towalink-node bootstrap --setup-host` makes the host a node: BIRD through apt, the binary,
//!   the systemd unit (verified), forwarding on, the services enabled; pairs with `tlm attach`;
//!   run again it changes nothing; the services, started as systemd would start them, run the
//!   node's version through Debian's own `bird.service`;
//! - another distribution is refused in one line, with nothing changed.

use std::time::Duration;

use towalink_tests::hostcopy::{HostCopy, NEIGHBOUR_ADDRESS};
use towalink_tests::network::wait_for;
use towalink_tests::{binary, Run};

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn root_only() {
    assert!(
        rustix_is_root(),
        "tier-2 host tests make namespaces and mounts: run them as root (.ci/run does)"
    );
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// What systemd would run for `unit` (a unit file's text): its Environment= and
/// EnvironmentFile= settings, ExecStartPre= lines (a leading `-` lets one fail), then
/// ExecStart=, as one shell command line.
fn as_systemd_would_start(unit: &str) -> String {
    let mut script = vec!["set -a".to_string()];
    for line in unit.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "Environment" => script.push(value.to_string()),
            "EnvironmentFile" => match value.strip_prefix('-') {
                Some(optional) => script.push(format!("[ -e {optional} ] && . {optional}")),
                None => script.push(format!(". {value}")),
            },
            "ExecStartPre" => match value.strip_prefix('-') {
                Some(may_fail) => script.push(format!("{may_fail} || true")),
                None => script.push(format!("{value} || exit 1")),
            },
            "ExecStart" => script.push(format!("exec {value}")),
            _ => {}
        }
    }
    script.join("\n")
}

#[test]
fn controller_package_installs_in_one_command_and_runs_the_seed_quickstart() {
    root_only();
    std::fs::create_dir_all(repo().join("target/tmp")).unwrap();
    let out = tempfile::Builder::new()
        .prefix("deb-")
        .tempdir_in(repo().join("target/tmp"))
        .unwrap();
    let build = std::process::Command::new(repo().join("controller/dist/build-deb.sh"))
        .arg("--binary")
        .arg(binary("tlm"))
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("controller/dist/build-deb.sh");
    let build: Run = build.into();
    assert_eq!(build.code, 0, "build-deb.sh failed: {}", build.stderr);
    let deb = build.stdout.trim().to_string();
    assert!(
        deb.ends_with(".deb") && std::path::Path::new(&deb).is_file(),
        "build-deb.sh printed `{deb}`"
    );

    let copy = HostCopy::new("deb");
    assert!(
        !copy.path("/usr/bin/tlm").exists(),
        "this machine has a /usr/bin/tlm already: the test would not show the package's"
    );
    let install = copy.run(&format!(
        "apt-get install -y -q --no-install-recommends {deb}"
    ));
    assert_eq!(
        install.code, 0,
        "apt-get install of the package failed:\n{}{}",
        install.stdout, install.stderr
    );
    assert_eq!(copy.ok("command -v tlm").trim(), "/usr/bin/tlm");
    assert_eq!(
        copy.ok("stat -c '%a %U' /etc/towalink").trim(),
        "700 root",
        "the configuration directory holds the installation's keys: root only"
    );
    let verify = copy.run("systemd-analyze verify /lib/systemd/system/tlm-serve.service");
    assert_eq!(
        verify.code, 0,
        "systemd-analyze verify refused the packaged unit:\n{}{}",
        verify.stdout, verify.stderr
    );
    assert!(copy
        .ok("grep '^ExecStart=' /lib/systemd/system/tlm-serve.service")
        .contains("ExecStart=/usr/bin/tlm serve"));
    for page in [
        "tlm.1.gz",
        "tlm-add-node.1.gz",
        "tlm-ansible.1.gz",
        "tlm-serve.1.gz",
    ] {
        assert!(
            copy.path(&format!("/usr/share/man/man1/{page}")).is_file(),
            "man page {page} is not installed"
        );
    }
    assert!(copy
        .ok("bash -c '. /usr/share/bash-completion/completions/tlm && complete -p tlm'")
        .contains("tlm"));
    assert!(copy
        .path("/usr/share/zsh/vendor-completions/_tlm")
        .is_file());

    // The seed's quickstart (2.4.1 to 2.4.3) on the default directory, verbatim (its
    // `primary.mysitel` is a misprint of `primary.mysite1`).
    copy.ok("tlm add site mysite1");
    copy.ok("tlm add node primary.mysite1");
    let commit = copy.ok("tlm commit all");
    assert!(commit.contains("primary.mysite1"), "{commit}");
    assert_eq!(
        copy.ok("stat -c '%a' /etc/towalink").trim(),
        "700",
        "the first command kept the directory's mode"
    );
    let log = copy.ok("tlm git log --oneline");
    assert!(log.lines().count() >= 2, "{log}");
    let listed = copy.ok("tlm list nodes mysite1");
    assert!(listed.contains("primary.mysite1"), "{listed}");
    assert_eq!(
        copy.ok("stat -c %a /etc/towalink/certs/signing.key /etc/towalink/generated/secrets.toml"),
        "600\n600\n"
    );

    // Removing, then purging the package keeps the installation (its keys and history).
    copy.ok("apt-get remove -y -q towalink-controller");
    assert!(!copy.path("/usr/bin/tlm").exists());
    copy.ok("dpkg --purge towalink-controller");
    assert!(copy.path("/etc/towalink/config.toml").is_file());
    assert!(copy.path("/etc/towalink/.git").is_dir());
}

#[test]
fn existing_debian_host_becomes_a_node_with_bootstrap_setup_host_twice_the_same() {
    root_only();
    let mut copy = HostCopy::new("node");
    // The controller's service runs next door, as on another machine: the node reaches it
    // over the link (in one namespace its management address would be a local one).
    copy.add_neighbour();
    let tlm = binary("tlm").display().to_string();
    let node = binary("towalink-node").display().to_string();
    let ctl = "export TOWALINK_CONFIG_DIR=/root/controller;";
    copy.ok(&format!(
        "{ctl} {tlm} add site s1 && {tlm} add node r.s1 && \
         {tlm} set global controller_endpoint '\"{NEIGHBOUR_ADDRESS}\"' && {tlm} commit all"
    ));
    // The attach certificate first (an attach with no device gives up at once).
    copy.command_next_door(&format!(
        "{ctl} {tlm} attach node r.s1 --listen {NEIGHBOUR_ADDRESS}:8000 --collect 0 --code AAAA-AAAA"
    ))
    .output()
    .unwrap();
    assert!(copy.path("/root/controller/certs/server.pem").is_file());
    copy.spawn_next_door(
        &format!("env TOWALINK_CONFIG_DIR=/root/controller {tlm} attach node r.s1 --listen {NEIGHBOUR_ADDRESS}:8000 --code AAAA-AAAA --yes --collect 600 --timeout 600"),
        "/root/attach.log",
    );
    let bootstrap = format!(
        "{node} bootstrap --setup-host --controller {NEIGHBOUR_ADDRESS}:8000 \
         --ca /root/controller/certs/server.pem --code AAAA-AAAA --interval-ms 500 --timeout-s 600"
    );
    let first = copy.ok(&bootstrap);
    for line in [
        "apt-get install bird2: already so",
        "install this towalink-node as /usr/sbin/towalink-node: done",
        "write /etc/systemd/system/towalink-node.service (mode 0644): done",
        "write /etc/sysctl.d/90-towalink.conf (mode 0644): done",
        "sysctl -p /etc/sysctl.d/90-towalink.conf: applied",
        "start at boot: bird.service towalink-node.service: done",
        "attached as r.s1 (id 1)",
        "start now: bird.service towalink-node.service: skipped: systemd is not running here",
    ] {
        assert!(first.contains(line), "no `{line}` in:\n{first}");
    }
    assert_eq!(
        copy.ok("cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding"),
        "1\n1\n",
        "forwarding is on (in the copy's network namespace)"
    );
    assert_eq!(
        copy.ok(&format!("cmp /usr/sbin/towalink-node {node} && echo same")),
        "same\n"
    );
    for unit in ["towalink-node.service", "bird.service"] {
        assert_eq!(
            copy.run(&format!(
                "test -e /etc/systemd/system/multi-user.target.wants/{unit}"
            ))
            .code,
            0,
            "{unit} is not enabled"
        );
    }
    let verify = copy.run("systemd-analyze verify /etc/systemd/system/towalink-node.service");
    assert_eq!(
        verify.code, 0,
        "systemd-analyze verify refused the node unit:\n{}{}",
        verify.stdout, verify.stderr
    );

    // Again: nothing changes, no second pairing.
    let second = copy.ok(&bootstrap);
    assert!(
        second.contains("pairing: already so (this device is r.s1 (id 1))"),
        "{second}"
    );
    for line in second.lines() {
        assert!(
            line.ends_with("already so")
                || line.contains("already so (this device")
                || line.contains(": applied")
                || line.contains("skipped: systemd is not running"),
            "the second run changed something: `{line}` in:\n{second}"
        );
    }

    // The controller's service, then the node's services as systemd starts them: Debian's
    // bird.service and the node's unit; then the seed's `tlm activate all`.
    copy.spawn_next_door(
        &format!("env TOWALINK_CONFIG_DIR=/root/controller {tlm} serve"),
        "/root/serve.log",
    );
    let bird_unit = std::fs::read_to_string(copy.path("/lib/systemd/system/bird.service")).unwrap();
    copy.spawn(
        &format!(
            "sh -c '{}'",
            as_systemd_would_start(&bird_unit).replace('\'', "'\\''")
        ),
        "/root/bird.log",
    );
    let node_unit =
        std::fs::read_to_string(copy.path("/etc/systemd/system/towalink-node.service")).unwrap();
    copy.spawn(
        &format!(
            "sh -c '{}'",
            as_systemd_would_start(&node_unit).replace('\'', "'\\''")
        ),
        "/root/node.log",
    );
    let log = |name: &str| std::fs::read_to_string(copy.path(name)).unwrap_or_default();
    let activate: Run = copy
        .command_next_door(&format!("{ctl} {tlm} activate all --timeout 300"))
        .output()
        .unwrap()
        .into();
    assert_eq!(
        activate.code,
        0,
        "tlm activate all:\n{}{}\nnode log:\n{}\nserve log:\n{}",
        activate.stdout,
        activate.stderr,
        log("/root/node.log"),
        log("/root/serve.log")
    );
    wait_for(
        Duration::from_secs(180),
        || {
            copy.run("/usr/sbin/towalink-node status --format json")
                .stdout
                .contains("\"active_version\": 1")
                && copy
                    .run("birdc -s /run/bird/bird.ctl show status")
                    .stdout
                    .contains("Router ID is 10.")
        },
        || {
            format!(
                "the node service to activate v1 and Debian's BIRD (run as user bird) to take its configuration\nnode log:\n{}\nbird log:\n{}\nstatus: {}",
                log("/root/node.log"),
                log("/root/bird.log"),
                copy.run("/usr/sbin/towalink-node status").stdout
            )
        },
    );
    assert!(copy
        .ok("grep -c 'router id' /etc/bird/bird.conf")
        .trim()
        .parse::<u32>()
        .is_ok_and(|n| n >= 1));
}

#[test]
fn another_distribution_is_refused_in_one_line_and_nothing_is_changed() {
    root_only();
    let copy = HostCopy::new("fedora");
    copy.ok(
        "rm -f /etc/os-release && printf 'NAME=\"Fedora Linux\"\\nID=fedora\\nPRETTY_NAME=\"Fedora Linux 41 (Server Edition)\"\\n' > /usr/lib/os-release",
    );
    let node = binary("towalink-node").display().to_string();
    let run = copy.run(&format!("{node} setup-host"));
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let error = run.stderr.trim();
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        error.contains("unsupported host `Fedora Linux 41 (Server Edition)`: ID=fedora")
            && error.contains("nothing was changed"),
        "{error}"
    );
    assert!(!copy.path("/usr/sbin/towalink-node").exists());
    assert!(!copy
        .path("/etc/systemd/system/towalink-node.service")
        .exists());
    assert!(!copy.path("/etc/sysctl.d/90-towalink.conf").exists());
}

/// The listening TCP sockets on port 22 in `site`'s namespace (`ss` local addresses).
fn ssh_listeners(site: &towalink_tests::network::Site) -> Vec<String> {
    site.sh("ss", &["-Hltn", "sport = :22"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

#[test]
fn ansible_reaches_every_node_over_its_management_link_with_the_configured_keys_only() {
    use towalink_tests::network::{tail, Network, Options, Topology};
    root_only();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("ops");
    let made = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "ops@towalink-test",
            "-f",
        ])
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client)");
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut options = Options::new(2, Topology::Mesh);
    options.controller = true;
    options.global = vec![(
        "node_ssh_authorized_keys".into(),
        format!("[ \"{}\" ]", public.trim()),
    )];
    let net = Network::build(options);
    let ctl_netns = net.controller.as_ref().unwrap().netns.clone();
    let inventory: serde_json::Value = serde_json::from_str(&net.ctl.ok(&["inventory"])).unwrap();
    let address_of = |node: &str| {
        let site = node.split('.').nth(1).unwrap();
        inventory["all"]["children"][format!("site_{site}")]["hosts"][node]["ansible_host"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // Each node's sshd: on its management address, port 22, and nowhere else.
    for site in &net.sites {
        // `%tlmgmt`: the socket is bound to the management interface.
        let expected = format!("[{}]%tlmgmt:22", address_of(&site.node()));
        wait_for(
            Duration::from_secs(120),
            || ssh_listeners(site) == vec![expected.clone()],
            || {
                format!(
                    "{}'s sshd to listen on {expected} only: {:?}\n{}",
                    site.node(),
                    ssh_listeners(site),
                    tail(&site.log(), 20)
                )
            },
        );
        let mode = std::fs::metadata(site.state.join("ssh/ssh_host_ed25519_key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    // The original's grammar: `tlm ansible <scope> <ansible arguments>`, run where the
    // controller runs (its namespace), with the operator's key.
    let home = tempfile::tempdir().unwrap();
    let ansible = |program: &str, args: &[&str]| -> Run {
        let mut command = net.ctl_in_netns(&[&[program][..], args].concat());
        command
            .env("HOME", home.path())
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_PRIVATE_KEY_FILE", &key)
            // No connection kept open after each run (ControlPersist): nothing outlives the test.
            .env(
                "ANSIBLE_SSH_ARGS",
                "-o UserKnownHostsFile=/dev/null -o ControlMaster=no",
            )
            .env("ANSIBLE_NOCOLOR", "1");
        command.output().unwrap().into()
    };
    let whoami = ansible("ansible", &["all", "all", "-a", "whoami"]);
    assert_eq!(whoami.code, 0, "{}{}", whoami.stdout, whoami.stderr);
    for site in &net.sites {
        assert!(
            whoami
                .stdout
                .contains(&format!("{} | CHANGED | rc=0 >>\nroot", site.node())),
            "{}",
            whoami.stdout
        );
    }
    let playbook = home.path().join("mark.yml");
    let marks = home.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::write(
        &playbook,
        format!(
            "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.copy:\n        content: \"{{{{ towalink_node_id }}}} {{{{ test_variable }}}}\"\n        dest: \"{}/{{{{ inventory_hostname }}}}\"\n",
            marks.display()
        ),
    )
    .unwrap();
    let played = ansible(
        "ansible_playbook",
        // The seed's example: `tlm ansible_playbook node <node> myplaybook.yml -e test_variable="test"`.
        &[
            "node",
            "r.s2",
            &playbook.display().to_string(),
            "-e",
            "test_variable=\"test\"",
        ],
    );
    assert_eq!(played.code, 0, "{}{}", played.stdout, played.stderr);
    assert_eq!(
        std::fs::read_to_string(marks.join("r.s2")).unwrap().trim(),
        "2 test",
        "the playbook ran on r.s2 (file copied over SFTP/SCP)"
    );
    assert!(!marks.join("r.s1").exists(), "the scope was node r.s2 only");

    // Another key is turned away; a site neighbour on the underlay finds no sshd.
    let stranger = keys.path().join("stranger");
    std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .status()
        .unwrap();
    let refused = std::process::Command::new("ip")
        .args(["netns", "exec", &ctl_netns, "ssh", "-i"])
        .arg(&stranger)
        .args(towalink_tests::SSH_TEST_OPTIONS)
        .arg(format!("root@{}", address_of("r.s1")))
        .arg("true")
        .output()
        .unwrap();
    let refused: Run = refused.into();
    assert_eq!(refused.code, 255, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("Permission denied"),
        "{}",
        refused.stderr
    );
    // A neighbour on the underlay that routes r.s1's management address to r.s1: the packets
    // arrive (ping answers), the port does not (bound to the management interface). The
    // underlay link gets IPv6 addresses of its own (documentation prefix), so r.s1's replies go
    // back over it, not through the management link.
    let mgmt1 = address_of("r.s1");
    net.sites[0].sh(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:99::1/64",
            "dev",
            "u2",
            "nodad",
        ],
    );
    net.sites[1].sh(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:99::2/64",
            "dev",
            "u1",
            "nodad",
        ],
    );
    net.sites[1].sh(
        "ip",
        &[
            "-6",
            "route",
            "add",
            &format!("{mgmt1}/128"),
            "via",
            "2001:db8:99::1",
            "dev",
            "u1",
        ],
    );
    let ping = || {
        net.sites[1]
            .exec("ping")
            .args(["-6", "-I", "2001:db8:99::2", "-c", "1", "-W", "2", &mgmt1])
            .output()
            .unwrap()
    };
    wait_for(
        Duration::from_secs(30),
        || ping().status.success(),
        || {
            let out = ping();
            format!(
                "r.s2 to reach {mgmt1} over the underlay link: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        },
    );
    // A TCP connection the same way: refused, where an sshd listening on the address alone
    // would answer.
    let connect = "import socket, sys\n\
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
        s.bind(('2001:db8:99::2', 0))\n\
        s.settimeout(10)\n\
        try:\n    s.connect((sys.argv[1], 22)); print('open')\n\
        except OSError as e:\n    print('closed', e)\n";
    let probe = net.sites[1].sh("python3", &["-c", connect, &mgmt1]);
    assert!(
        probe.starts_with("closed") && probe.contains("refused"),
        "port 22 of the management address, from the underlay: {probe}"
    );
    let underlay = net.sites[0].endpoint();
    let probe = net.sites[1].sh(
        "sh",
        &["-c", &format!("timeout 10 bash -c 'echo > /dev/tcp/{underlay}/22' 2>/dev/null && echo open || echo closed")],
    );
    assert_eq!(probe.trim(), "closed", "port 22 on the underlay address");

    // No keys in the next version: the sshd goes.
    net.ctl
        .ok(&["set", "global", "node_ssh_authorized_keys", "empty"]);
    net.ctl.ok(&["commit", "all"]);
    net.activate_all_blessed("the version without SSH keys");
    for site in &net.sites {
        wait_for(
            Duration::from_secs(60),
            || ssh_listeners(site).is_empty(),
            || format!("{}'s sshd to stop: {:?}", site.node(), ssh_listeners(site)),
        );
    }
}
