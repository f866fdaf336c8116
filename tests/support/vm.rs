//! Tier 3: qemu boots of built images (TCG: no KVM here), each in a network namespace of its
//! own so qemu's user network (guest 10.0.2.2 = the namespace's loopback) reaches only a
//! controller the test started there. Everything is killed and deleted on drop; a serial log
//! is kept under `target/tier3-logs/` when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::binary;
use crate::network::sh;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The prepared test assets (tests/assets.sh), `TOWALINK_TEST_ASSETS` or `target/test-assets`.
pub fn assets() -> PathBuf {
    let dir = match std::env::var_os("TOWALINK_TEST_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-assets"),
    };
    assert!(
        dir.join("alpine-x86_64/boot/vmlinuz-virt").is_file(),
        "{} has no test assets: run tests/assets.sh first",
        dir.display()
    );
    dir
}

/// The static node binary for a Rust target (built by tests/run-all.sh).
pub fn node_binary(target: &str) -> PathBuf {
    let tlm = binary("tlm");
    let path = tlm
        .parent()
        .and_then(Path::parent)
        .expect("tlm lives in target/<profile>/")
        .join(target)
        .join("release/towalink-node");
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --release -p towalink-node --target {target}`",
        path.display()
    );
    path
}

/// A network namespace with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        assert!(
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() } == 0,
            "the image tier needs root (network namespaces): run it as root, as .ci/run does"
        );
        let name = format!(
            "tl3x{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A child process killed on drop.
pub struct Guard(pub Option<Child>);

impl Guard {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a machine boots.
pub enum Firmware {
    /// SeaBIOS (qemu's default): MBR → syslinux.
    Bios,
    /// OVMF: EFI/BOOT/BOOTX64.EFI (systemd-boot).
    Uefi,
    /// qemu -M virt with the kernel, initramfs and command line given to qemu.
    Aarch64Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
    /// x86_64 (SeaBIOS) with the kernel, initramfs and command line given to qemu: an
    /// installed Alpine whose root is the disk.
    X86_64Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
}

/// A qemu machine with a disk image and qemu's user network; its serial console goes to a file.
pub struct Vm {
    pub name: String,
    pub serial: PathBuf,
    process: Guard,
    _temp: tempfile::TempDir,
}

/// A network card of a machine.
pub enum Nic {
    /// qemu's user network (guest 10.0.2.2 = the namespace's loopback).
    User,
    /// A tap device of the namespace (created by the caller), with this MAC address.
    Tap { ifname: String, mac: String },
}

/// Size and cards of a machine.
pub struct Hardware {
    pub cpus: u32,
    pub memory_mib: u32,
    pub nics: Vec<Nic>,
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            cpus: 2,
            memory_mib: 1024,
            nics: vec![Nic::User],
        }
    }
}

impl Vm {
    pub fn boot(netns: &Netns, name: &str, disk: &Path, firmware: Firmware) -> Vm {
        Vm::boot_with(netns, name, disk, firmware, Hardware::default())
    }

    pub fn boot_with(
        netns: &Netns,
        name: &str,
        disk: &Path,
        firmware: Firmware,
        hardware: Hardware,
    ) -> Vm {
        let temp = tempfile::tempdir().unwrap();
        let serial = temp.path().join("serial.log");
        let (program, mut args): (&str, Vec<String>) = match &firmware {
            Firmware::Bios | Firmware::Uefi | Firmware::X86_64Kernel { .. } => {
                ("qemu-system-x86_64", vec![])
            }
            Firmware::Aarch64Kernel { .. } => (
                "qemu-system-aarch64",
                vec![
                    "-M".into(),
                    "virt".into(),
                    "-cpu".into(),
                    "cortex-a72".into(),
                ],
            ),
        };
        args.extend(
            [
                // One host thread for all vCPUs: multi-threaded TCG raced the
                // guest kernel's live code patching (an `int3` oops in
                // sched_clock_cpu under a loaded CI host, 1 boot in ~30).
                "-accel",
                "tcg,thread=single",
                "-smp",
                &hardware.cpus.to_string(),
                "-m",
                &hardware.memory_mib.to_string(),
                "-nographic",
                "-no-reboot",
                "-monitor",
                "none",
            ]
            .map(String::from),
        );
        args.push("-serial".into());
        args.push(format!("file:{}", serial.display()));
        args.push("-drive".into());
        args.push(format!("file={},format=raw,if=virtio", disk.display()));
        for (i, nic) in hardware.nics.iter().enumerate() {
            args.push("-netdev".into());
            args.push(match nic {
                Nic::User => format!("user,id=n{i}"),
                Nic::Tap { ifname, .. } => {
                    format!("tap,id=n{i},ifname={ifname},script=no,downscript=no")
                }
            });
            args.push("-device".into());
            args.push(match nic {
                Nic::User => format!("virtio-net-pci,netdev=n{i}"),
                Nic::Tap { mac, .. } => format!("virtio-net-pci,netdev=n{i},mac={mac}"),
            });
        }
        match firmware {
            Firmware::Bios => {}
            Firmware::Uefi => {
                let vars = temp.path().join("OVMF_VARS.fd");
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                    .expect("OVMF (Debian package ovmf) installed by tests/setup.sh");
                args.push("-drive".into());
                args.push(
                    "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                );
                args.push("-drive".into());
                args.push(format!("if=pflash,format=raw,file={}", vars.display()));
            }
            Firmware::Aarch64Kernel {
                kernel,
                initrd,
                cmdline,
            }
            | Firmware::X86_64Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                args.push("-kernel".into());
                args.push(kernel.display().to_string());
                args.push("-initrd".into());
                args.push(initrd.display().to_string());
                args.push("-append".into());
                args.push(cmdline);
            }
        }
        let child = netns
            .exec(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        Vm {
            name: name.to_string(),
            serial,
            process: Guard(Some(child)),
            _temp: temp,
        }
    }

    /// What the serial console printed so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows `text`; fails naming the last lines.
    pub fn wait_console(&self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.console().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{}: `{text}` not on the console after {limit:?}:\n{}",
                self.name,
                crate::network::tail(&self.console(), 30)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Pulls the plug.
    pub fn power_off(&mut self) {
        self.process.kill();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tier3-logs");
            let _ = std::fs::create_dir_all(&dir);
            let kept = dir.join(format!("{}-{}.log", self.name, std::process::id()));
            if std::fs::copy(&self.serial, &kept).is_ok() {
                eprintln!("{}: serial log kept in {}", self.name, kept.display());
            }
        }
    }
}

/// The wiring of a lab of booted images, all inside one namespace (deleted on drop, with its
/// taps and bridges): an underlay bridge `ul` joining every machine's first card (tap `u<i>`)
/// and the controller's address 192.168.50.254 (the namespace's side of the bridge), and per
/// machine a LAN: its second card (tap `l<i>`) bridged to a namespace of its own holding one
/// host, 192.168.(10+i).2/24, whose default route is the machine (192.168.(10+i).1).
pub struct LabWiring {
    pub netns: Netns,
    pub lans: Vec<Netns>,
}

/// The controller's address on a lab's underlay.
pub const LAB_CONTROLLER: &str = "192.168.50.254";

impl LabWiring {
    pub fn new(machines: u32) -> LabWiring {
        let netns = Netns::new();
        let n = netns.name.clone();
        let ip = |args: &[&str]| sh("ip", &[&["-n", n.as_str()][..], args].concat());
        ip(&["link", "add", "ul", "type", "bridge"]);
        ip(&["addr", "add", &format!("{LAB_CONTROLLER}/24"), "dev", "ul"]);
        ip(&["link", "set", "ul", "up"]);
        let mut lans = Vec::new();
        for i in 1..=machines {
            ip(&["tuntap", "add", "dev", &format!("u{i}"), "mode", "tap"]);
            ip(&["link", "set", &format!("u{i}"), "master", "ul", "up"]);
            ip(&["link", "add", &format!("lb{i}"), "type", "bridge"]);
            ip(&["link", "set", &format!("lb{i}"), "up"]);
            ip(&["tuntap", "add", "dev", &format!("l{i}"), "mode", "tap"]);
            ip(&[
                "link",
                "set",
                &format!("l{i}"),
                "master",
                &format!("lb{i}"),
                "up",
            ]);
            let lan = Netns::new();
            ip(&[
                "link",
                "add",
                &format!("lv{i}"),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &lan.name,
            ]);
            ip(&[
                "link",
                "set",
                &format!("lv{i}"),
                "master",
                &format!("lb{i}"),
                "up",
            ]);
            let lip = |args: &[&str]| sh("ip", &[&["-n", lan.name.as_str()][..], args].concat());
            lip(&[
                "addr",
                "add",
                &format!("{}/24", Self::lan_host(i)),
                "dev",
                "eth0",
            ]);
            lip(&["link", "set", "eth0", "up"]);
            lip(&["route", "add", "default", "via", &Self::lan_router(i)]);
            lans.push(lan);
        }
        LabWiring { netns, lans }
    }

    /// Machine `i`'s address on the underlay.
    pub fn underlay(i: u32) -> String {
        format!("192.168.50.{i}")
    }

    /// Machine `i`'s LAN address (its second card).
    pub fn lan_router(i: u32) -> String {
        format!("192.168.{}.1", 10 + i)
    }

    /// The host on machine `i`'s LAN.
    pub fn lan_host(i: u32) -> String {
        format!("192.168.{}.2", 10 + i)
    }

    /// The cards of machine `i`: underlay, LAN.
    pub fn hardware(i: u32) -> Hardware {
        Hardware {
            cpus: 1,
            memory_mib: 512,
            nics: vec![
                Nic::Tap {
                    ifname: format!("u{i}"),
                    mac: format!("52:54:00:50:00:{i:02x}"),
                },
                Nic::Tap {
                    ifname: format!("l{i}"),
                    mac: format!("52:54:00:51:00:{i:02x}"),
                },
            ],
        }
    }

    /// Cuts (or restores) the underlay between machines `a` and `b` only: both bridge ports
    /// isolated, so they reach neither each other nor any other isolated port, but still the
    /// third machine and the controller.
    pub fn isolate(&self, machines: &[u32], on: bool) {
        for i in machines {
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.netns.name,
                    "bridge",
                    "link",
                    "set",
                    "dev",
                    &format!("u{i}"),
                    "isolated",
                    if on { "on" } else { "off" },
                ],
            );
        }
    }

    /// One ping from the host on LAN `from` to the host on LAN `to`; true on a reply.
    pub fn lan_ping(&self, from: u32, to: u32) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.lans[from as usize - 1].name])
            .args(["ping", "-c", "1", "-W", "1", &Self::lan_host(to)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `traceroute`-like: the hops `ip route get` would not tell; instead the TTL a reply
    /// comes back with tells how many routers it crossed (64 minus hops).
    pub fn lan_ping_ttl(&self, from: u32, to: u32) -> Option<u32> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lans[from as usize - 1].name])
            .args(["ping", "-c", "1", "-W", "1", &Self::lan_host(to)])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("ttl=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

/// A test installation for booted images: one site `s1` with `nodes`, reaching the
/// controller at qemu's host address (10.0.2.2), blessed once the controller answers through
/// the management link and BIRD answers on its control socket; `global` attributes set before
/// the first commit.
pub fn installation_with(nodes: &[&str], global: &[(&str, &str)]) -> crate::Installation {
    let ctl = crate::Installation::new();
    for (attribute, value) in global {
        ctl.ok(&["set", "global", attribute, value]);
    }
    ctl.ok(&["add", "site", "s1"]);
    for n in nodes {
        ctl.ok(&["add", "node", &format!("{n}.s1")]);
    }
    ctl.ok(&["set", "global", "controller_endpoint", "10.0.2.2"]);
    ctl.ok(&[
        "set",
        "global",
        "node_health_checks",
        r#"["controller", "bird"]"#,
    ]);
    ctl.ok(&["set", "global", "mgmt_report_interval_s", "2"]);
    ctl.ok(&["-m", "first", "commit", "all"]);
    ctl
}
