//! Tier 3 (host workflows on Alpine): an installed Alpine Linux (the test assets' x86_64
//! rootfs, OpenRC, on an ext4 disk) booted in qemu becomes a node with
//! `towalink-node bootstrap --setup-host`: BIRD from its apk repository (the signed test
//! mirror, as a mirror of Alpine's would be), the OpenRC services, forwarding, pairing with
//! `tlm attach`, the services started; run again it changes nothing. The controller then
//! activates v1 on it over the management link (Alpine's kernel WireGuard), and after a power
//! cut the node is back with its version from its own disk: the service starts at boot.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use towalink_tests::network::{sh, tail, wait_for};
use towalink_tests::vm::{assets, installation_with, node_binary, Firmware, Guard, Netns, Vm};
use towalink_tests::{binary, Installation};

const X86: &str = "x86_64-unknown-linux-musl";
/// What the attach and the device agree on beforehand (`--code` on both sides).
const CODE: &str = "AAAA-AAAA";

fn write(path: &Path, content: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// The Alpine host's disk: the test assets' rootfs, its apk repositories pointed at the test
/// mirror (copied onto the disk, its key trusted), `towalink-node` and the controller's
/// attach certificate copied on, and a boot script that runs the bootstrap twice, printing
/// its output and exit status on the console.
fn alpine_disk(dir: &Path, certificate: &Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    sh(
        "cp",
        &[
            "-a",
            &assets().join("alpine-x86_64/rootfs").display().to_string(),
            &root.display().to_string(),
        ],
    );
    sh(
        "cp",
        &[
            "-a",
            &assets().join("apk-mirror").display().to_string(),
            &root.join("srv/apk-mirror").display().to_string(),
        ],
    );
    for key in std::fs::read_dir(assets().join("apk-keys")).unwrap() {
        let key = key.unwrap().path();
        if key.extension().is_some_and(|e| e == "pub") {
            let name = key
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches(".pub")
                .to_string();
            std::fs::copy(&key, root.join("etc/apk/keys").join(format!("{name}.pub"))).unwrap();
        }
    }
    let release = std::fs::read_to_string(root.join("etc/alpine-release")).unwrap();
    let branch: Vec<&str> = release.trim().split('.').take(2).collect();
    write(
        &root.join("etc/apk/repositories"),
        &format!("/srv/apk-mirror/v{}/main\n", branch.join(".")),
        0o644,
    );
    std::fs::copy(node_binary(X86), root.join("usr/local/bin/towalink-node")).unwrap();
    std::fs::copy(certificate, root.join("root/controller.pem")).unwrap();
    let bootstrap = format!(
        "/usr/local/bin/towalink-node bootstrap --setup-host --controller 10.0.2.2:8000 \
         --ca /root/controller.pem --code {CODE} --interval-ms 1000 --timeout-s 900"
    );
    write(
        &root.join("etc/local.d/towalink-test.start"),
        &format!(
            "#!/bin/sh\n\
             # Once: the test's bootstrap, twice, after the boot finished.\n\
             [ -e /root/bootstrapped ] && exit 0\n\
             touch /root/bootstrapped\n\
             (\n\
               sleep 2\n\
               ( {bootstrap}; echo \"EXIT $?\" ) 2>&1 | sed 's/^/FIRST: /'\n\
               echo \"FORWARDING $(cat /proc/sys/net/ipv4/ip_forward)\"\n\
               ( {bootstrap}; echo \"EXIT $?\" ) 2>&1 | sed 's/^/SECOND: /'\n\
             ) > /dev/console 2>&1 &\n"
        ),
        0o755,
    );
    std::os::unix::fs::symlink(
        "/etc/init.d/local",
        root.join("etc/runlevels/default/local"),
    )
    .unwrap();
    // As an installed Alpine on a machine has it (the rootfs was made for a container-like
    // guest): OpenRC not told it runs in a container, none of that guest's own services, the
    // root filesystem in fstab, remounted read-write by the `root` service at boot (the
    // initramfs mounts it read-only).
    let rc_conf = std::fs::read_to_string(root.join("etc/rc.conf")).unwrap();
    write(
        &root.join("etc/rc.conf"),
        &rc_conf.replace("\nrc_sys=\"lxc\"", "\nrc_sys=\"\""),
        0o644,
    );
    for service in ["boot/quicksand-guest-agent", "sysinit/setup-dns"] {
        let _ = std::fs::remove_file(root.join("etc/runlevels").join(service));
    }
    let fstab = std::fs::read_to_string(root.join("etc/fstab")).unwrap_or_default();
    write(
        &root.join("etc/fstab"),
        &format!("/dev/vda\t/\text4\trw,relatime 0 1\n{fstab}"),
        0o644,
    );
    std::os::unix::fs::symlink("/etc/init.d/root", root.join("etc/runlevels/boot/root")).unwrap();
    let disk = dir.join("alpine.img");
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "alpine",
            "-d",
            &root.display().to_string(),
            &disk.display().to_string(),
            "1G",
        ],
    );
    disk
}

fn boot(netns: &Netns, disk: &Path, name: &str) -> Vm {
    let boot = assets().join("alpine-x86_64/boot");
    Vm::boot(
        netns,
        name,
        disk,
        Firmware::X86_64Kernel {
            kernel: boot.join("vmlinuz-virt"),
            initrd: boot.join("initramfs-virt"),
            cmdline: "root=/dev/vda rootfstype=ext4 rw modules=ext4,virtio_blk console=ttyS0"
                .into(),
        },
    )
}

/// `tlm` in the namespace (where qemu's 10.0.2.2 is the loopback), killed on drop.
fn tlm_in(ctl: &Installation, netns: &Netns, args: &[&str], log: &Path) -> Guard {
    let child = netns
        .exec(binary("tlm"))
        .args(args)
        .env("TOWALINK_CONFIG_DIR", &ctl.dir)
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("start tlm");
    Guard(Some(child))
}

fn node_status(ctl: &Installation) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["status", "--format", "json"])).unwrap();
    status["nodes"][0].clone()
}

/// The console lines that start with `prefix` (without it).
fn lines_of(console: &str, prefix: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix(prefix)
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn alpine_host_becomes_a_node_with_bootstrap_setup_host_and_runs_it_from_every_boot() {
    let ctl = installation_with(&["r1"], &[]);
    let netns = Netns::new();
    let temp = tempfile::tempdir().unwrap();
    // The attach certificate (an attach with no device gives up at once), then the attach
    // that waits for the device with the agreed code, and the controller service.
    let first = netns
        .exec(binary("tlm"))
        .args([
            "attach",
            "node",
            "r1.s1",
            "--listen",
            "127.0.0.1:8000",
            "--collect",
            "0",
            "--code",
            CODE,
        ])
        .env("TOWALINK_CONFIG_DIR", &ctl.dir)
        .output()
        .unwrap();
    assert_eq!(
        first.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let certificate = ctl.path("certs/server.pem");
    let disk = alpine_disk(temp.path(), &certificate);
    let attach_log = temp.path().join("attach.log");
    let _attach = tlm_in(
        &ctl,
        &netns,
        &[
            "attach",
            "node",
            "r1.s1",
            "--listen",
            "127.0.0.1:8000",
            "--code",
            CODE,
            "--yes",
            "--collect",
            "900",
            "--timeout",
            "900",
        ],
        &attach_log,
    );
    let serve_log = temp.path().join("serve.log");
    let _serve = tlm_in(&ctl, &netns, &["--loglevel", "info", "serve"], &serve_log);

    let mut vm = boot(&netns, &disk, "alpine-host");
    vm.wait_console("FIRST: EXIT", Duration::from_secs(900));
    let console = vm.console();
    let first = lines_of(&console, "FIRST: ");
    let shown = || {
        format!(
            "first run:\n{}\nattach log:\n{}",
            first.join("\n"),
            tail(
                &std::fs::read_to_string(&attach_log).unwrap_or_default(),
                20
            )
        )
    };
    assert!(first.iter().any(|l| l == "EXIT 0"), "{}", shown());
    for line in [
        "apk add bird: done",
        "install this towalink-node as /usr/sbin/towalink-node: done",
        "write /etc/init.d/towalink-node (mode 0755): done",
        "write /etc/init.d/towalink-bird (mode 0755): done",
        "sysctl -p /etc/sysctl.d/90-towalink.conf: applied",
        "start at boot: towalink-bird towalink-node: done",
        "attached as r1.s1 (id 1)",
        "start now: towalink-bird towalink-node: done",
    ] {
        assert!(
            first.iter().any(|l| l == line),
            "no `{line}` in the {}",
            shown()
        );
    }
    assert!(console.contains("FORWARDING 1"), "{}", tail(&console, 40));
    vm.wait_console("SECOND: EXIT", Duration::from_secs(300));
    let console = vm.console();
    let second = lines_of(&console, "SECOND: ");
    assert!(second.iter().any(|l| l == "EXIT 0"), "{second:?}");
    assert!(
        second
            .iter()
            .any(|l| l.starts_with("pairing: already so (this device is r1.s1")),
        "{second:?}"
    );
    for line in &second {
        assert!(
            line.ends_with("already so")
                || line.starts_with("pairing: already so")
                || line.ends_with(": applied")
                || line == "EXIT 0",
            "the second run changed something: `{line}` in {second:?}"
        );
    }

    // The controller activates v1 on the new node, over its management link.
    let activate = netns
        .exec(binary("tlm"))
        .args(["activate", "all", "--wait-blessed", "--timeout", "600"])
        .env("TOWALINK_CONFIG_DIR", &ctl.dir)
        .output()
        .unwrap();
    assert!(
        activate.status.success(),
        "tlm activate all: {}{}\nserve log:\n{}\nconsole:\n{}",
        String::from_utf8_lossy(&activate.stdout),
        String::from_utf8_lossy(&activate.stderr),
        tail(&std::fs::read_to_string(&serve_log).unwrap_or_default(), 20),
        tail(&vm.console(), 30)
    );
    wait_for(
        Duration::from_secs(300),
        || {
            let n = node_status(&ctl);
            n["active_version"] == 1 && n["state"] == "good"
        },
        || format!("r1.s1 to report v1 good (blessed): {:#}", node_status(&ctl)),
    );
    let before = node_status(&ctl);

    // A power cut: the services start at boot from the disk, v1 with them.
    vm.power_off();
    let booted_before = before["boot_id"].as_str().unwrap_or_default().to_string();
    let vm = boot(&netns, &disk, "alpine-host-again");
    let deadline = Instant::now() + Duration::from_secs(600);
    wait_for(
        deadline.saturating_duration_since(Instant::now()),
        || {
            let n = node_status(&ctl);
            n["reachable"] == true
                && n["active_version"] == 1
                && n["boot_id"]
                    .as_str()
                    .is_some_and(|b| !b.is_empty() && b != booted_before)
        },
        || {
            format!(
                "the node back after the power cut, v1 active, a new boot: {:#}\nconsole:\n{}",
                node_status(&ctl),
                tail(&vm.console(), 30)
            )
        },
    );
}
