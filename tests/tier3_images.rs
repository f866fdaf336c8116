//! Tier 3: images built by the real `tlm image build`, booted in qemu (TCG) or checked
//! structurally, from the pinned test assets (tests/assets.sh). Boots run one at a time.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use towalink_tests::network::{tail, wait_for};
use towalink_tests::vm::{
    assets, installation_with, node_binary, Firmware, Guard, LabWiring, Netns, Vm, LAB_CONTROLLER,
};
use towalink_tests::{binary, Installation};

static SERIAL: Mutex<()> = Mutex::new(());
const X86: &str = "x86_64-unknown-linux-musl";
const ARM: &str = "aarch64-unknown-linux-musl";

/// One site, the nodes reaching the controller at qemu's host address (support `vm`).
fn installation(nodes: &[&str]) -> Installation {
    installation_with(nodes, &[])
}

fn alpine(board: &str) -> String {
    assets()
        .join(match board {
            "rpi4" => "alpine-rpi4",
            _ => "alpine-x86_64",
        })
        .display()
        .to_string()
}

/// `tlm image build node <node> --board <board> --alpine-dir <dir> -o <out>` with the test
/// package mirror (`--mirror`, its signing key, a package cache of the test assets).
fn build_args(node: &str, board: &str, dir: &str, out: &Path) -> Vec<String> {
    let out = out.display().to_string();
    let mut args: Vec<String> = [
        "image",
        "build",
        "node",
        node,
        "--board",
        board,
        "--alpine-dir",
        dir,
        "-o",
        &out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(package_args());
    args
}

/// `--mirror file://<assets>/apk-mirror --apk-key <test key> --cache-dir <assets>/cache`.
fn package_args() -> Vec<String> {
    let assets = assets();
    vec![
        "--mirror".into(),
        format!("file://{}", assets.join("apk-mirror").display()),
        "--apk-key".into(),
        apk_key().display().to_string(),
        "--cache-dir".into(),
        assets.join("cache").display().to_string(),
    ]
}

/// The public key the test package repository is signed with (tests/apk-repo.sh).
fn apk_key() -> PathBuf {
    let dir = assets().join("apk-keys");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/assets.sh)", dir.display()))
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".rsa.pub"))
        .unwrap_or_else(|| panic!("no *.rsa.pub in {}", dir.display()))
}

fn build(ctl: &Installation, board: &str, out: &Path, extra: &[&str]) -> String {
    let mut args = build_args("r1.s1", board, &alpine(board), out);
    args.extend(extra.iter().map(|s| s.to_string()));
    ctl.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Every file of the image's FAT boot partition.
fn boot_files(image: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut bytes = std::fs::read(image).unwrap();
    let (_, parts) = towalink_images::disk::parse_mbr(&bytes).expect("an MBR");
    let start = parts[0].start_lba as usize * 512;
    let end = start + parts[0].sectors as usize * 512;
    towalink_images::disk::read_fat(&mut bytes[start..end]).unwrap()
}

fn apkovl(files: &BTreeMap<String, Vec<u8>>) -> towalink_images::apkovl::Overlay {
    let name = files
        .keys()
        .find(|k| k.ends_with(".apkovl.tar.gz"))
        .expect("an apkovl on the boot partition");
    towalink_images::apkovl::read_tar_gz(&files[name]).unwrap()
}

/// `tlm serve` in the namespace, killed on drop; waits for its heartbeat.
fn serve(ctl: &Installation, netns: &Netns, log: &Path) -> Guard {
    let heartbeat = ctl.path("status/service.json");
    let _ = std::fs::remove_file(&heartbeat);
    let child = netns
        .exec(binary("tlm"))
        .args(["--loglevel", "info", "serve"])
        .env("TOWALINK_CONFIG_DIR", &ctl.dir)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start tlm serve");
    let guard = Guard(Some(child));
    wait_for(
        Duration::from_secs(10),
        || heartbeat.exists(),
        || {
            format!(
                "tlm serve did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        },
    );
    guard
}

fn node_status(ctl: &Installation) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["status", "--format", "json"])).unwrap();
    status["nodes"][0].clone()
}

/// Waits until the controller sees r1.s1 reachable with `version` active in `state` in a
/// report from a boot other than `not_boot` (the kernel's boot id of an earlier boot); returns
/// the boot id of the report.
fn wait_online(
    ctl: &Installation,
    vm: &Vm,
    version: u32,
    state: &str,
    not_boot: Option<&str>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = node_status(ctl);
        let boot = n["boot_id"].as_str().unwrap_or_default().to_string();
        if n["reachable"] == true
            && n["active_version"] == version
            && n["state"] == state
            && !boot.is_empty()
            && Some(boot.as_str()) != not_boot
        {
            return boot;
        }
        assert!(
            Instant::now() < deadline,
            "{}: waited 600 s for the controller to see r1.s1 online with v{version} {state} (a boot other than {not_boot:?}): {n:#}\nconsole:\n{}",
            vm.name,
            tail(&vm.console(), 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn x86_64_image_boots_under_bios_and_uefi_reaches_the_controller_and_keeps_its_state() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    // An operator's key: the image then carries openssh-server and the node runs its sshd on
    // the management address.
    let ssh_key = work.path().join("ops");
    assert!(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&ssh_key)
        .status()
        .expect("ssh-keygen (openssh-client)")
        .success());
    let public = std::fs::read_to_string(ssh_key.with_extension("pub")).unwrap();
    let keys = format!("[ \"{}\" ]", public.trim());
    let ctl = installation_with(&["r1"], &[("node_ssh_authorized_keys", &keys)]);
    let image = work.path().join("r1.img");
    // No --node-binary: tlm finds the x86_64 musl build beside its own target directory.
    let out = build(&ctl, "x86_64", &image, &[]);
    assert!(out.contains("for r1.s1 (id 1, v1, board x86_64"), "{out}");
    let private_key = {
        let files = boot_files(&image);
        let ovl = apkovl(&files);
        match &ovl
            .get("usr/share/towalink/initial-state/identity/wg_private_key")
            .unwrap()
            .kind
        {
            towalink_images::apkovl::Kind::File(b) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("{other:?}"),
        }
    };

    let netns = Netns::new();
    let service = serve(&ctl, &netns, &work.path().join("serve.log"));

    // First boot, SeaBIOS → syslinux: the data partition is formatted and seeded, OpenRC starts
    // the daemon through the image's own service, the node reaches the controller.
    let mut vm = Vm::boot(&netns, "x86_64-bios", &image, Firmware::Bios);
    vm.wait_console(
        "towalink-node: r1.s1 (id 1), active v1",
        Duration::from_secs(240),
    );
    let first_boot = wait_online(&ctl, &vm, 1, "good", None);
    // Alpine's kernel has the WireGuard module: the management link runs on kernel WireGuard
    // (configured over generic netlink), the path the build machines cannot run themselves.
    vm.wait_console(
        "towalink-node: WireGuard: kernel module",
        Duration::from_secs(30),
    );
    let console = vm.console();
    assert!(
        console.contains("Formatting /dev/vda2 for the node state (first boot)"),
        "{}",
        tail(&console, 40)
    );
    assert!(console.contains("Seeding /var/lib/towalink"));
    assert!(
        console.contains("Removing the node's secrets from /media/"),
        "{}",
        tail(&console, 60)
    );
    assert!(
        console.contains("Setting hostname to s1-r1"),
        "{}",
        tail(&console, 60)
    );

    assert!(
        !console.contains(private_key.trim()),
        "the private key reached the console"
    );

    // SSH over the management link (what `tlm ansible` uses): root, with the operator's key,
    // to the card's openssh-server through the node's listener.
    let inventory: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["inventory", "node", "r1.s1"])).unwrap();
    let address = inventory["all"]["children"]["site_s1"]["hosts"]["r1.s1"]["ansible_host"]
        .as_str()
        .unwrap()
        .to_string();
    let whoami = std::cell::RefCell::new(String::new());
    wait_for(
        Duration::from_secs(120),
        || {
            let out = netns
                .exec("ssh")
                .arg("-i")
                .arg(&ssh_key)
                .args(towalink_tests::SSH_TEST_OPTIONS)
                .arg(format!("root@{address}"))
                .arg("whoami")
                .output()
                .unwrap();
            *whoami.borrow_mut() = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "root"
        },
        || {
            format!(
                "ssh root@{address} whoami over the management link: {}\n{}",
                whoami.borrow(),
                tail(&vm.console(), 20)
            )
        },
    );

    // A new version over the management link, activated and blessed on the running node.
    ctl.ok(&["set", "node", "r1.s1", "bird_bfd_interval_ms", "200"]);
    ctl.ok(&["-m", "bfd 200", "commit", "all"]);
    let activated = ctl.ok(&[
        "activate",
        "node",
        "r1.s1",
        "--wait-blessed",
        "--timeout",
        "120",
    ]);
    assert!(activated.contains("blessed"), "{activated}");
    wait_online(&ctl, &vm, 2, "good", None);

    // Power cut, then the same disk under UEFI (OVMF → systemd-boot): no second format, the
    // A/B state on the data partition survived, v2 comes up active.
    vm.power_off();
    drop(vm);
    // The card's FAT no longer holds the node's secrets: the first boot moved them to the
    // data partition and rewrote the apkovl without them (the public identity stays).
    let files = boot_files(&image);
    let ovl = apkovl(&files);
    for secret in ["wg_private_key", "recovery_token"] {
        assert!(
            ovl.get(&format!(
                "usr/share/towalink/initial-state/identity/{secret}"
            ))
            .is_none(),
            "the boot partition's apkovl still holds {secret}"
        );
    }
    assert!(ovl
        .get("usr/share/towalink/initial-state/identity/node.toml")
        .is_some());
    assert!(
        ovl.get("etc/init.d/towalink-node").is_some(),
        "the rewritten apkovl lost its files"
    );
    let key = private_key.trim().as_bytes();
    for (name, entry) in ovl.entries() {
        assert!(!name.starts_with("./"), "apkovl entry {name}");
        if let towalink_images::apkovl::Kind::File(bytes) = &entry.kind {
            assert!(
                !bytes.windows(key.len()).any(|w| w == key),
                "{name} in the apkovl holds the private key"
            );
        }
    }
    for (name, bytes) in &files {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key),
            "{name} on the boot partition holds the private key"
        );
    }
    let vm = Vm::boot(&netns, "x86_64-uefi", &image, Firmware::Uefi);
    vm.wait_console(
        "towalink-node: r1.s1 (id 1), active v2",
        Duration::from_secs(240),
    );
    let console = vm.console();
    assert!(
        console.contains("EFI v"),
        "not booted through UEFI:\n{}",
        tail(&console, 40)
    );
    assert!(
        !console.contains("Formatting /dev/vda2"),
        "formatted again:\n{}",
        tail(&console, 40)
    );
    assert!(
        !console.contains("Seeding"),
        "seeded again:\n{}",
        tail(&console, 40)
    );
    let second_boot = wait_online(&ctl, &vm, 2, "good", Some(&first_boot));

    // Issue 12: while the card is powered off the controller's management port changes. The
    // node's v2 names a port where nothing answers: it is cut off. A technician copies the
    // object `tlm recovery make` wrote to the card's boot partition; at boot the node finds
    // it, activates v3 with a confirm timer, reaches the controller through v3's settings and
    // blesses it.
    let mut vm = vm;
    vm.power_off();
    drop(vm);
    drop(service);
    ctl.ok(&["set", "global", "mgmt_listen_port", "51829"]);
    ctl.ok(&["-m", "management port 51829", "commit", "all"]);
    let object = work.path().join("recovery-object");
    let out = ctl.ok(&[
        "recovery",
        "make",
        "node",
        "r1.s1",
        "-o",
        object.to_str().unwrap(),
    ]);
    let name = out
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no object name in: {out}"))
        .to_string();
    let boot_partition = {
        let bytes = std::fs::read(&image).unwrap();
        let (_, parts) = towalink_images::disk::parse_mbr(&bytes).expect("an MBR");
        format!(
            "{}@@{}",
            image.display(),
            u64::from(parts[0].start_lba) * 512
        )
    };
    let mtools = |args: &[&str]| {
        let run = std::process::Command::new(args[0])
            .args(["-i", &boot_partition])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(run.status.success(), "{args:?}: {run:?}");
    };
    mtools(&["mmd", "::towalink-recovery"]);
    mtools(&[
        "mcopy",
        object.to_str().unwrap(),
        &format!("::towalink-recovery/{name}"),
    ]);
    let _service = serve(&ctl, &netns, &work.path().join("serve-moved.log"));
    let vm = Vm::boot(&netns, "x86_64-recovery", &image, Firmware::Bios);
    vm.wait_console(
        "towalink-node: r1.s1 (id 1), active v2",
        Duration::from_secs(240),
    );
    wait_online(&ctl, &vm, 3, "good", Some(&second_boot));
    let log = vm.console();
    assert!(
        !log.contains(private_key.trim()),
        "the private key reached the console"
    );
}

#[test]
fn aarch64_apkovl_and_binary_boot_under_qemu_virt_and_reach_the_controller() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctl = installation(&["r1"]);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("r1-rpi4.img");
    let arm = node_binary(ARM).display().to_string();
    build(&ctl, "rpi4", &image, &["--node-binary", &arm]);
    let files = boot_files(&image);
    let cmdline = String::from_utf8(files["cmdline.txt"].clone()).unwrap();
    let initrd = work.path().join("initramfs");
    std::fs::write(&initrd, &files["boot/initramfs-rpi"]).unwrap();
    let netns = Netns::new();
    let _service = serve(&ctl, &netns, &work.path().join("serve.log"));
    // No emulator runs the Pi's firmware: qemu's virt machine gets the kernel, the image's own
    // initramfs and the image's cmdline.txt (plus its serial console); the rest is the image.
    let vm = Vm::boot(
        &netns,
        "aarch64-virt",
        &image,
        Firmware::Aarch64Kernel {
            kernel: assets().join("aarch64-kernel"),
            initrd,
            cmdline: format!("{} console=ttyAMA0", cmdline.trim()),
        },
    );
    vm.wait_console(
        "towalink-node: r1.s1 (id 1), active v1",
        Duration::from_secs(400),
    );
    assert!(
        vm.console().contains("Mounting modloop"),
        "{}",
        tail(&vm.console(), 40)
    );
    vm.wait_console(
        "towalink-node: WireGuard: kernel module",
        Duration::from_secs(30),
    );
    wait_online(&ctl, &vm, 1, "good", None);
}

#[test]
fn rpi4_image_has_what_the_pi_firmware_and_alpine_need() {
    let ctl = installation(&["r1"]);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("r1.img");
    let arm = node_binary(ARM).display().to_string();
    build(&ctl, "rpi4", &image, &["--node-binary", &arm]);
    let inspected: serde_json::Value = serde_json::from_str(&ctl.ok(&[
        "image",
        "inspect",
        &image.display().to_string(),
        "--format",
        "json",
    ]))
    .unwrap();
    let parts = inspected["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{inspected:#}");
    assert_eq!(parts[0]["kind"], "FAT32 (LBA), 0x0c");
    assert_eq!(parts[0]["filesystem"], "fat32");
    assert_eq!(parts[0]["start_bytes"], 1 << 20);
    assert_eq!(parts[1]["kind"], "Linux, 0x83");
    assert_eq!(inspected["manifest"]["board"], "rpi4");
    assert_eq!(inspected["manifest"]["alpine_arch"], "aarch64");
    assert_eq!(inspected["node"]["node"], "r1.s1");
    assert_eq!(inspected["node"]["versions"], serde_json::json!([1]));
    assert_eq!(
        inspected["apkovl"]["node_binary"], "static ELF, aarch64",
        "{:#}",
        inspected["apkovl"]
    );

    // The firmware's files, the device trees and Alpine's boot files, byte for byte.
    let files = boot_files(&image);
    let rel = assets().join("alpine-rpi4");
    for f in [
        "start4.elf",
        "fixup4.dat",
        "bcm2711-rpi-4-b.dtb",
        "bcm2711-rpi-400.dtb",
        "bcm2711-rpi-cm4-io.dtb",
        "boot/vmlinuz-rpi",
        "boot/initramfs-rpi",
        "boot/modloop-rpi",
    ] {
        assert!(
            files.get(f) == Some(&std::fs::read(rel.join(f)).unwrap()),
            "{f} missing or different"
        );
    }
    let config = String::from_utf8(files["config.txt"].clone()).unwrap();
    for line in [
        "arm_64bit=1",
        "kernel=boot/vmlinuz-rpi",
        "initramfs boot/initramfs-rpi followkernel",
        "device_tree=bcm2711-rpi-4-b.dtb",
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "config.txt lacks `{line}`:\n{config}"
        );
    }
    let cmdline = String::from_utf8(files["cmdline.txt"].clone()).unwrap();
    assert_eq!(
        cmdline.lines().count(),
        1,
        "cmdline.txt is one line: {cmdline:?}"
    );
    assert!(
        cmdline.contains("modloop=/boot/modloop-rpi") && cmdline.contains("console=serial0,115200"),
        "{cmdline}"
    );

    // The apkovl: daemon, services, identity with private modes, owned by root.
    let ovl = apkovl(&files);
    let entry = |p: &str| {
        ovl.get(p)
            .unwrap_or_else(|| panic!("{p} not in the apkovl"))
    };
    let expect = |p: &str, mode: u32| {
        let e = entry(p);
        assert_eq!((e.mode, e.uid, e.gid), (mode, 0, 0), "{p}");
    };
    expect("usr/sbin/towalink-node", 0o755);
    expect("etc/init.d/towalink-node", 0o755);
    expect("etc/init.d/towalink-data", 0o755);
    expect("usr/share/towalink/initial-state/identity", 0o700);
    expect(
        "usr/share/towalink/initial-state/identity/wg_private_key",
        0o600,
    );
    expect(
        "usr/share/towalink/initial-state/identity/recovery_token",
        0o600,
    );
    expect(
        "usr/share/towalink/initial-state/incoming/s1-r1-v1.tar.zst",
        0o644,
    );
    assert_eq!(
        entry("etc/runlevels/default/towalink-node").kind,
        towalink_images::apkovl::Kind::Symlink("/etc/init.d/towalink-node".into())
    );
    assert_eq!(
        entry("etc/hostname").kind,
        towalink_images::apkovl::Kind::File(b"s1-r1\n".to_vec())
    );
    let towalink_images::apkovl::Kind::File(binary) = &entry("usr/sbin/towalink-node").kind else {
        panic!("not a file")
    };
    assert_eq!(
        u16::from_le_bytes([binary[18], binary[19]]),
        183,
        "aarch64 ELF"
    );
    let towalink_images::apkovl::Kind::File(key) =
        &entry("usr/share/towalink/initial-state/identity/wg_private_key").kind
    else {
        panic!("not a file")
    };
    let key = String::from_utf8(key.clone()).unwrap();
    let key = key.trim();

    // Inspection names the node and its key fingerprints, never the private key.
    let text = ctl.ok(&["image", "inspect", &image.display().to_string()]);
    assert!(
        text.contains("r1.s1 (id 1)") && text.contains("wireguard key"),
        "{text}"
    );
    let json = serde_json::to_string(&inspected).unwrap();
    assert!(
        !text.contains(key) && !json.contains(key),
        "inspect printed the private key"
    );
}

#[test]
fn images_are_reproducible_compressed_per_site_and_refused_cleanly() {
    let ctl = installation(&["r1", "r2"]);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a.img");
    let b = work.path().join("b.img");
    let z = work.path().join("a.img.zst");
    build(&ctl, "x86_64", &a, &[]);
    build(&ctl, "x86_64", &b, &[]);
    build(&ctl, "x86_64", &z, &[]);
    let raw = std::fs::read(&a).unwrap();
    assert!(
        raw == std::fs::read(&b).unwrap(),
        "two builds of the same inputs differ"
    );
    let zst = std::fs::read(&z).unwrap();
    assert!(
        zst.len() * 2 < raw.len(),
        "zstd: {} of {}",
        zst.len(),
        raw.len()
    );
    assert!(
        zstd::decode_all(zst.as_slice()).unwrap() == raw,
        "the .zst is not the raw image"
    );
    assert!(
        std::fs::metadata(&a).unwrap().len() == raw.len() as u64
            && file_blocks(&a) * 512 < raw.len() as u64,
        "the raw image is not sparse"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&a).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "an image holds the node's private key");

    // One image per node of a site.
    let site_dir = work.path().join("site");
    let mut site_args: Vec<String> = [
        "image",
        "build",
        "site",
        "s1",
        "--board",
        "x86_64",
        "--alpine-dir",
        &alpine("x86_64"),
        "-o",
        &site_dir.display().to_string(),
        "--zstd",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    site_args.extend(package_args());
    let out = ctl.ok(&site_args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut made: Vec<String> = std::fs::read_dir(&site_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(made, ["s1-r1.img.zst", "s1-r2.img.zst"], "{out}");

    // Refusals: one line naming the problem, exit 1, an older image untouched, no temp files.
    let target = work.path().join("kept.img");
    std::fs::write(&target, b"the image from last week").unwrap();
    let broken = work.path().join("broken-alpine");
    copy_tree(&assets().join("alpine-x86_64/boot"), &broken.join("boot"));
    std::fs::remove_file(broken.join("boot/vmlinuz-virt")).unwrap();
    let with = |mut a: Vec<String>, extra: &[&str]| {
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            build_args("r1.s1", "x86_64", &broken.display().to_string(), &target),
            "missing `boot/vmlinuz-virt`",
        ),
        (
            with(
                build_args("r1.s1", "rpi4", &alpine("rpi4"), &target),
                &["--node-binary", &node_binary(X86).display().to_string()],
            ),
            "built for x86_64 but the board needs aarch64",
        ),
        (
            build_args("r1.s1", "pi5", &alpine("x86_64"), &target),
            "unknown board `pi5`",
        ),
        (
            build_args("r9.s1", "x86_64", &alpine("x86_64"), &target),
            "r9.s1",
        ),
    ];
    for (a, expected) in &cases {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let line = ctl.refused(&a, 1);
        assert!(line.contains(expected), "{line}");
    }
    // `set` refuses an address without prefix length; written by hand, the build refuses it.
    let line = ctl.refused(
        &["set", "node", "r1.s1", "image_uplink_address", "192.0.2.10"],
        1,
    );
    assert!(
        line.contains("attribute `image_uplink_address` must be")
            && line.contains("\"192.0.2.10\""),
        "{line}"
    );
    let node_config = ctl.read("site_s1/node_r1/config.toml");
    ctl.write(
        "site_s1/node_r1/config.toml",
        &format!("image_uplink_address = \"192.0.2.10\"\n{node_config}"),
    );
    let uplink = build_args("r1.s1", "x86_64", &alpine("x86_64"), &target);
    let line = ctl.refused(&uplink.iter().map(String::as_str).collect::<Vec<_>>(), 1);
    assert!(
        line.contains("image_uplink_address") && line.contains("node_r1/config.toml"),
        "{line}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"the image from last week");
    // Uncommitted changes: built from the latest version, with a warning.
    ctl.ok(&["set", "node", "r1.s1", "image_uplink_address", "dhcp"]);
    let warned = build_args(
        "r1.s1",
        "x86_64",
        &alpine("x86_64"),
        &work.path().join("warned.img"),
    );
    let run = ctl.run(&warned.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("r1.s1 has changes that are not committed; the image carries v1"),
        "{}",
        run.stderr
    );
    // Inspecting something that is no image.
    let line = ctl.refused(&["image", "inspect", &target.display().to_string()], 1);
    assert!(line.contains("is not a Towalink image: no MBR"), "{line}");
    let leftovers: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn file_blocks(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap())
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A static-file HTTP/1.1 server on loopback that counts requests per path.
struct Mirror {
    url: String,
    hits: Arc<Mutex<BTreeMap<String, usize>>>,
    _served: Arc<AtomicUsize>,
}

fn mirror(root: PathBuf) -> Mirror {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/alpine", listener.local_addr().unwrap());
    let hits = Arc::new(Mutex::new(BTreeMap::new()));
    let served = Arc::new(AtomicUsize::new(0));
    let (h, s) = (Arc::clone(&hits), Arc::clone(&served));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            *h.lock().unwrap().entry(path.clone()).or_default() += 1;
            s.fetch_add(1, Ordering::SeqCst);
            let file = root.join(path.trim_start_matches("/alpine/"));
            match std::fs::read(&file) {
                Ok(body) => {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(&body);
                }
                Err(_) => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    Mirror {
        url,
        hits,
        _served: served,
    }
}

#[test]
fn release_files_come_from_a_mirror_verified_and_cached() {
    let ctl = installation(&["r1"]);
    let work = tempfile::tempdir().unwrap();
    // A mirror laid out as Alpine's: v3.23/releases/x86_64/{latest-releases.yaml, tarball}.
    let rel = work.path().join("mirror/v3.23/releases/x86_64");
    std::fs::create_dir_all(&rel).unwrap();
    let file = "alpine-netboot-3.23.9-x86_64.tar.gz";
    let status = std::process::Command::new("tar")
        .args([
            "-czf",
            &rel.join(file).display().to_string(),
            "-C",
            &alpine("x86_64"),
            "boot",
            "rootfs",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let mut tarball = Vec::new();
    std::fs::File::open(rel.join(file))
        .unwrap()
        .read_to_end(&mut tarball)
        .unwrap();
    let sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&tarball))
    };
    let yaml = |sha: &str| {
        format!("---\n-\n  title: \"Netboot\"\n  flavor: alpine-netboot\n  version: 3.23.9\n  file: {file}\n  sha256: {sha}\n")
    };
    std::fs::write(rel.join("latest-releases.yaml"), yaml(&sha)).unwrap();
    std::fs::write(
        rel.join(format!("{file}.sha256")),
        format!("{sha}  {file}\n"),
    )
    .unwrap();
    // The branch's package repository beside the releases, as on Alpine's mirrors.
    copy_tree(
        &assets().join("apk-mirror/v3.23"),
        &work.path().join("mirror/v3.23"),
    );
    let m = mirror(work.path().join("mirror"));
    let cache = work.path().join("cache");
    let out = work.path().join("r1.img");
    let key = apk_key().display().to_string();
    let run = |version: &str, cache: &Path| {
        ctl.run(&[
            "image",
            "build",
            "node",
            "r1.s1",
            "--board",
            "x86_64",
            "--alpine-version",
            version,
            "--mirror",
            &m.url,
            "--apk-key",
            &key,
            "--cache-dir",
            &cache.display().to_string(),
            "-o",
            &out.display().to_string(),
        ])
    };
    let tar_path = format!("/alpine/v3.23/releases/x86_64/{file}");

    let first = run("3.23", &cache);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(first.stdout.contains("Alpine 3.23.9"), "{}", first.stdout);
    assert_eq!(
        std::fs::read(cache.join(file)).unwrap(),
        tarball,
        "the verified download is cached"
    );
    assert_eq!(m.hits.lock().unwrap()[&tar_path], 1);
    let bird_apk = |hits: &BTreeMap<String, usize>| {
        hits.iter()
            .filter(|(p, _)| {
                p.starts_with("/alpine/v3.23/main/x86_64/bird-") && p.ends_with(".apk")
            })
            .map(|(_, n)| *n)
            .sum::<usize>()
    };
    assert_eq!(
        bird_apk(&m.hits.lock().unwrap()),
        1,
        "BIRD fetched from the mirror"
    );
    // Cached: the second build fetches the list and the index, not the release file nor the
    // packages again.
    let second = run("3.23", &cache);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(m.hits.lock().unwrap()[&tar_path], 1, "downloaded again");
    assert_eq!(
        bird_apk(&m.hits.lock().unwrap()),
        1,
        "package downloaded again"
    );
    // An exact version is checked against the release's .sha256 file.
    let exact = run("3.23.9", &work.path().join("cache-exact"));
    assert_eq!(exact.code, 0, "{}", exact.stderr);
    assert_eq!(m.hits.lock().unwrap()[&format!("{tar_path}.sha256")], 1);

    // A corrupt download (the published checksum does not match): refused, nothing kept.
    std::fs::write(rel.join("latest-releases.yaml"), yaml(&"0".repeat(64))).unwrap();
    std::fs::remove_file(&out).unwrap();
    let corrupt_cache = work.path().join("cache-corrupt");
    let bad = run("3.23", &corrupt_cache);
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("checksum mismatch") && bad.stderr.contains(file),
        "{}",
        bad.stderr
    );
    assert!(!out.exists(), "an image was written from a corrupt asset");
    let kept: Vec<_> = std::fs::read_dir(&corrupt_cache)
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert_eq!(kept, [0], "the corrupt download was kept");
    // An unreachable mirror: a clear error with a hint.
    let down = ctl.run(&[
        "image",
        "build",
        "node",
        "r1.s1",
        "--board",
        "x86_64",
        "--mirror",
        "http://127.0.0.1:9/alpine",
        "--cache-dir",
        &cache.display().to_string(),
        "-o",
        &out.display().to_string(),
    ]);
    assert_eq!(down.code, 1);
    assert!(
        down.stderr.contains(
            "cannot fetch http://127.0.0.1:9/alpine/v3.23/releases/x86_64/latest-releases.yaml"
        ),
        "{}",
        down.stderr
    );
    assert!(down.stderr.contains("--alpine-dir"), "{}", down.stderr);
}

/// `tlm status --format json`'s entry of `node`.
fn status_of(ctl: &Installation, node: &str) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["status", "--format", "json"])).unwrap();
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Every BGP session Established and every BFD session Up, `sessions` of each, as `node`
/// reports them.
fn sessions_up(n: &serde_json::Value, sessions: usize) -> bool {
    let all = |key: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        n[key]
            .as_array()
            .is_some_and(|a| a.len() == sessions && a.iter().all(ok))
    };
    n["reachable"] == true
        && all("bgp", &|s| {
            s["state"] == "up"
                && s["info"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("Established"))
        })
        && all("bfd", &|s| s["state"] == "Up")
}

/// The lab: the x86_64 images of three sites booted together under TCG, joined by an underlay
/// bridge, each with a LAN host of its own. Everything an engineer checks, inside the booted
/// images: every tunnel and IPv4/IPv6 BGP + BFD session up, LAN-to-LAN traffic, a cut underlay
/// link rerouted through the third site, a power cycle without the controller coming back
/// routing alone, and a version that breaks BGP rolled back by boot counting across power
/// cycles, which `tlm status` shows once the controller returns.
#[test]
fn lab_of_three_booted_images_routes_fails_over_survives_power_cuts_and_rolls_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctl = Installation::new();
    let nodes: Vec<String> = (1..=3).map(|i| format!("r.s{i}")).collect();
    for i in 1..=3u32 {
        ctl.ok(&["add", "site", &format!("s{i}")]);
        ctl.ok(&["add", "node", &nodes[i as usize - 1]]);
    }
    for (k, v) in [
        ("controller_endpoint", LAB_CONTROLLER),
        ("mgmt_report_interval_s", "2"),
        ("node_health_checks", r#"["bird"]"#),
        ("node_boot_tries", "2"),
        ("bird_announce_interfaces", r#"["eth1"]"#),
    ] {
        ctl.ok(&["set", "global", k, v]);
    }
    for i in 1..=3u32 {
        let node = &nodes[i as usize - 1];
        let underlay = LabWiring::underlay(i);
        ctl.ok(&["set", "node", node, "wg_endpoint", &underlay]);
        ctl.ok(&[
            "set",
            "node",
            node,
            "image_uplink_address",
            &format!("{underlay}/24"),
        ]);
        ctl.ok(&[
            "set",
            "node",
            node,
            "image_interfaces",
            &format!("{{ eth1 = \"{}/24\" }}", LabWiring::lan_router(i)),
        ]);
    }
    ctl.ok(&["-m", "lab", "commit", "all"]);
    let work = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (1..=3u32)
        .map(|i| {
            let image = work.path().join(format!("s{i}.img"));
            let args = build_args(&nodes[i as usize - 1], "x86_64", &alpine("x86_64"), &image);
            ctl.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
            image
        })
        .collect();
    let wiring = LabWiring::new(3);
    let mut service = serve(&ctl, &wiring.netns, &work.path().join("serve.log"));
    let boot = |i: u32, name: &str| {
        Vm::boot_with(
            &wiring.netns,
            name,
            &images[i as usize - 1],
            Firmware::Bios,
            LabWiring::hardware(i),
        )
    };
    let powered_on = Instant::now();
    let mut vms: Vec<Vm> = (1..=3u32).map(|i| boot(i, &format!("lab-s{i}"))).collect();
    let consoles = |vms: &[Vm]| {
        vms.iter()
            .map(|v| format!("\n[{}]\n{}", v.name, tail(&v.console(), 25)))
            .collect::<String>()
    };

    // Every tunnel, BGP session (IPv4 + IPv6 per peer) and BFD session up in every image.
    wait_for(
        Duration::from_secs(1200),
        || nodes.iter().all(|n| sessions_up(&status_of(&ctl, n), 4)),
        || {
            format!(
                "waited 1200 s for 4 BGP sessions Established and 4 BFD sessions Up on every node:\n{}\n{}",
                ctl.ok(&["status"]),
                consoles(&vms)
            )
        },
    );
    let routing_after = powered_on.elapsed();
    for v in &vms {
        assert!(
            v.console().contains("Installing bird (")
                && !v.console().contains("install completed with errors"),
            "{}: BIRD not installed from the card:\n{}",
            v.name,
            tail(&v.console(), 60)
        );
    }
    // LAN to LAN between every pair, over the direct tunnel (two routers: TTL 64 - 2).
    for a in 1..=3u32 {
        for b in 1..=3u32 {
            if a != b {
                wait_for(
                    Duration::from_secs(120),
                    || wiring.lan_ping_ttl(a, b) == Some(62),
                    || {
                        format!(
                            "LAN {a} -> LAN {b} over the direct tunnel (TTL 62): {:?}\n{}",
                            wiring.lan_ping_ttl(a, b),
                            ctl.ok(&["status"])
                        )
                    },
                );
            }
        }
    }
    eprintln!(
        "lab: 3 images powered on together under TCG: all BGP + BFD sessions up after {:.0} s",
        routing_after.as_secs_f64()
    );

    // Cut the underlay between s1 and s2: traffic goes through s3 (three routers: TTL 61).
    wiring.isolate(&[1, 2], true);
    let cut = Instant::now();
    wait_for(
        Duration::from_secs(180),
        || wiring.lan_ping_ttl(1, 2) == Some(61) && wiring.lan_ping_ttl(2, 1) == Some(61),
        || {
            format!(
                "LAN 1 <-> LAN 2 through s3 after the cut (TTL 61): {:?} {:?}\n{}",
                wiring.lan_ping_ttl(1, 2),
                wiring.lan_ping_ttl(2, 1),
                ctl.ok(&["status"])
            )
        },
    );
    eprintln!(
        "lab: s1-s2 underlay cut: LAN traffic through s3 after {:.1} s",
        cut.elapsed().as_secs_f64()
    );
    wiring.isolate(&[1, 2], false);
    wait_for(
        Duration::from_secs(180),
        || wiring.lan_ping_ttl(1, 2) == Some(62),
        || "LAN 1 -> LAN 2 back on the direct tunnel after the restore".to_string(),
    );

    // The controller goes away; s2 loses power and comes back routing its version alone.
    service.kill();
    vms[1].power_off();
    let restarted = Instant::now();
    vms[1] = boot(2, "lab-s2-no-controller");
    vms[1].wait_console(
        "towalink-node: r.s2 (id 2), active v1",
        Duration::from_secs(600),
    );
    wait_for(
        Duration::from_secs(300),
        || wiring.lan_ping_ttl(1, 2) == Some(62) && wiring.lan_ping_ttl(3, 2) == Some(62),
        || {
            format!(
                "s2 routing after its power cycle without a controller:\n{}",
                tail(&vms[1].console(), 40)
            )
        },
    );
    eprintln!(
        "lab: s2 power-cycled without a controller: LAN traffic through it {:.0} s after power-on",
        restarted.elapsed().as_secs_f64()
    );

    // A version that breaks BGP on s2 (its peers' AS numbers off by one), with a health
    // timeout long enough that only boot counting can end it.
    let broken = towalink_tests::bird_peers_breaking_bgp();
    std::fs::write(ctl.dir.join("site_s2/node_r/bird_peers.conf.jinja"), broken).unwrap();
    ctl.ok(&["set", "node", "r.s2", "node_health_timeout_s", "3600"]);
    let out = ctl.ok(&["-m", "breaks BGP on s2", "commit", "all"]);
    assert!(out.contains("r.s2: v2"), "{out}");
    service = serve(&ctl, &wiring.netns, &work.path().join("serve2.log"));
    let activated = ctl.ok(&["activate", "node", "r.s2", "2", "--timeout", "600"]);
    assert!(activated.contains("r.s2"), "{activated}");
    wait_for(
        Duration::from_secs(300),
        || {
            let n = status_of(&ctl, "r.s2");
            n["active_version"] == 2 && n["state"] == "pending"
        },
        || format!("r.s2 running v2 pending:\n{}", ctl.ok(&["status"])),
    );
    service.kill();
    // Power cycles until the tries run out: each start uses one of the 2 tries, the third
    // goes back to v1.
    let mut cycles = 0;
    loop {
        cycles += 1;
        assert!(
            cycles <= 3,
            "v1 not back after {} power cycles (2 boot tries)",
            cycles - 1
        );
        vms[1].power_off();
        vms[1] = boot(2, &format!("lab-s2-cycle{cycles}"));
        vms[1].wait_console(
            "towalink-node: r.s2 (id 2), active v",
            Duration::from_secs(600),
        );
        if vms[1]
            .console()
            .contains("towalink-node: r.s2 (id 2), active v1")
        {
            break;
        }
        let left = 2 - cycles;
        assert!(
            vms[1]
                .console()
                .contains(&format!("active v2 in slot B (pending, {left} tries left)")),
            "power cycle {cycles}: v2 with {left} tries left expected:\n{}",
            tail(&vms[1].console(), 30)
        );
    }
    assert_eq!(cycles, 3, "the third start after the activation rolls back");
    eprintln!(
        "lab: the BGP-breaking v2 rolled back to v1 by boot counting after {cycles} power cycles"
    );
    wait_for(
        Duration::from_secs(300),
        || wiring.lan_ping_ttl(1, 2) == Some(62),
        || format!("s2 routing again on v1:\n{}", tail(&vms[1].console(), 40)),
    );
    // The controller returns and hears of the rollback.
    let _service = serve(&ctl, &wiring.netns, &work.path().join("serve3.log"));
    wait_for(
        Duration::from_secs(300),
        || {
            let n = status_of(&ctl, "r.s2");
            n["reachable"] == true
                && n["active_version"] == 1
                && n["last_rollback"]["from_version"] == 2
        },
        || {
            format!(
                "tlm status showing r.s2's rollback from v2:\n{:#}",
                status_of(&ctl, "r.s2")
            )
        },
    );
    let text = ctl.ok(&["status"]);
    assert!(text.contains("r.s2"), "{text}");
}

/// The card's packages: resolved against the mirror's signed index, each checked against it,
/// listed by `tlm image inspect`; an index signed by an unknown key, a tampered index or a
/// package that does not match its index entry is refused with the URL named and no image;
/// a corrupt cached package is fetched again.
#[test]
fn packages_come_from_the_signed_index_checked_and_listed() {
    let ctl = installation(&["r1"]);
    let work = tempfile::tempdir().unwrap();
    let mirror_dir = work.path().join("mirror");
    copy_tree(&assets().join("apk-mirror"), &mirror_dir);
    let repo = mirror_dir.join("v3.23/main/x86_64");
    let cache = work.path().join("cache");
    let image = work.path().join("r1.img");
    let key = apk_key().display().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "image",
            "build",
            "node",
            "r1.s1",
            "--board",
            "x86_64",
            "--alpine-dir",
            &alpine("x86_64"),
            "--mirror",
            &format!("file://{}", mirror_dir.display()),
            "--cache-dir",
            &cache.display().to_string(),
            "-o",
            &image.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        ctl.run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let built = run(&["--apk-key", &key]);
    assert_eq!(built.code, 0, "{}", built.stderr);
    assert!(built.stdout.contains(", 2 packages;"), "{}", built.stdout);
    let text = ctl.ok(&["image", "inspect", &image.display().to_string()]);
    assert!(text.contains("packages:    2 on the card"), "{text}");
    let bird_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("bird "))
        .unwrap_or_else(|| panic!("no bird package listed:\n{text}"));
    assert!(
        bird_line.contains("2.0.12-r0") && bird_line.contains("apks"),
        "{bird_line}"
    );
    let files = boot_files(&image);
    assert!(files.contains_key("apks/.boot_repository"));
    assert_eq!(
        files["apks/x86_64/APKINDEX.tar.gz"],
        std::fs::read(repo.join("APKINDEX.tar.gz")).unwrap(),
        "the index goes onto the card as the mirror signed it"
    );
    let ovl = apkovl(&files);
    let key_name = apk_key()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        ovl.get(&format!("etc/apk/keys/{key_name}")).is_some(),
        "the image trusts the extra key"
    );
    let cmdline = String::from_utf8(files["syslinux.cfg"].clone()).unwrap();
    assert!(
        !cmdline.contains("alpine_repo="),
        "offline boot must not name a network repository: {cmdline}"
    );
    let before = std::fs::read(&image).unwrap();

    // A corrupt package in the cache is fetched again; the image is the same.
    let cached = cache.join("packages/v3.23/main/x86_64/bird-2.0.12-r0.apk");
    std::fs::write(&cached, b"junk").unwrap();
    let again = run(&["--apk-key", &key]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(repo.join("bird-2.0.12-r0.apk")).unwrap()
    );
    assert!(
        std::fs::read(&image).unwrap() == before,
        "same inputs, same image"
    );

    // Refusals name the index or package; the image from before stays as it was.
    let untrusted = run(&[]);
    assert_eq!(untrusted.code, 1);
    assert!(
        untrusted.stderr.contains("APKINDEX.tar.gz")
            && untrusted.stderr.contains(&format!(
                "signed by `{key_name}`, which is not a trusted key"
            )),
        "{}",
        untrusted.stderr
    );
    let bird = std::fs::read(repo.join("bird-2.0.12-r0.apk")).unwrap();
    std::fs::write(repo.join("bird-2.0.12-r0.apk"), &bird[..bird.len() - 1]).unwrap();
    std::fs::remove_file(&cached).unwrap();
    let tampered = run(&["--apk-key", &key]);
    assert_eq!(tampered.code, 1);
    assert!(
        tampered.stderr.contains("bird-2.0.12-r0.apk")
            && tampered.stderr.contains("the index says"),
        "{}",
        tampered.stderr
    );
    assert!(
        !cached.exists(),
        "a package that fails its check was cached"
    );
    std::fs::write(repo.join("bird-2.0.12-r0.apk"), &bird).unwrap();
    let mut index = std::fs::read(repo.join("APKINDEX.tar.gz")).unwrap();
    let last = index.len() - 20;
    index[last] ^= 0xff;
    std::fs::write(repo.join("APKINDEX.tar.gz"), &index).unwrap();
    let forged = run(&["--apk-key", &key]);
    assert_eq!(forged.code, 1);
    assert!(
        forged.stderr.contains("bad signature by"),
        "{}",
        forged.stderr
    );
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a refused build changed the image"
    );
    // A package nobody provides.
    ctl.ok(&[
        "set",
        "node",
        "r1.s1",
        "image_packages",
        r#"["no-such-package"]"#,
    ]);
    ctl.ok(&["commit", "all"]);
    std::fs::write(
        repo.join("APKINDEX.tar.gz"),
        std::fs::read(assets().join("apk-mirror/v3.23/main/x86_64/APKINDEX.tar.gz")).unwrap(),
    )
    .unwrap();
    let missing = run(&["--apk-key", &key]);
    assert_eq!(missing.code, 1);
    assert!(
        missing
            .stderr
            .contains("no package provides `no-such-package`"),
        "{}",
        missing.stderr
    );
    for r in [&untrusted, &tampered, &forged, &missing] {
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    }
}
