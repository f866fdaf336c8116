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
}

/// A qemu machine with a disk image and qemu's user network; its serial console goes to a file.
pub struct Vm {
    pub name: String,
    pub serial: PathBuf,
    process: Guard,
    _temp: tempfile::TempDir,
}

impl Vm {
    pub fn boot(netns: &Netns, name: &str, disk: &Path, firmware: Firmware) -> Vm {
        let temp = tempfile::tempdir().unwrap();
        let serial = temp.path().join("serial.log");
        let (program, mut args): (&str, Vec<String>) = match &firmware {
            Firmware::Bios | Firmware::Uefi => ("qemu-system-x86_64", vec![]),
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
                "-accel",
                "tcg",
                "-smp",
                "2",
                "-m",
                "1024",
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
        args.extend(
            [
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]
            .map(String::from),
        );
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
