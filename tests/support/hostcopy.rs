//! A throwaway copy of this Debian host to install things into: an overlay of `/` (writes land
//! on a tmpfs) in a mount and network namespace of its own, entered with `chroot`. A package
//! installed, a unit enabled or a sysctl set inside it is real for `dpkg`, `systemctl` and the
//! kernel's per-namespace settings, and gone with the copy; the machine itself is unchanged.
//! Dropping it kills what it started and the namespaces with them.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;

use crate::Run;

pub struct HostCopy {
    dir: PathBuf,
    holder: Child,
    started: Mutex<Vec<Child>>,
    neighbour: Option<String>,
}

/// The copy's address on its link to the neighbour namespace ([`HostCopy::add_neighbour`]).
pub const COPY_ADDRESS: &str = "192.0.2.2";
/// The neighbour's address on that link.
pub const NEIGHBOUR_ADDRESS: &str = "192.0.2.1";

impl HostCopy {
    /// Makes the copy; the repository (and so `target/`) is visible inside at its own path.
    pub fn new(name: &str) -> HostCopy {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ is in the repository")
            .to_path_buf();
        let dir = repo.join(format!("target/tmp/hostcopy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rw")).unwrap();
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let script = r#"set -e
D=$1 REPO=$2
mount -t tmpfs -o mode=0755 tmpfs "$D/rw"
mkdir "$D/rw/upper" "$D/rw/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$D/rw/upper,workdir=$D/rw/work" "$D/root"
mount --rbind /dev "$D/root/dev"
mount -t proc proc "$D/root/proc"
mount -t sysfs sysfs "$D/root/sys"
mount -t tmpfs -o mode=0755 tmpfs "$D/root/run"
mount -t tmpfs -o mode=1777 tmpfs "$D/root/tmp"
mount --bind "$REPO" "$D/root$REPO"
ip link set lo up
echo ready
exec sleep infinity
"#;
        // The holder dies with the test (SIGKILL on its parent's death), the namespaces with it.
        let mut holder = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .args(["unshare", "--mount", "--net", "--propagation", "private"])
            .args(["sh", "-c", script, "sh"])
            .arg(&dir)
            .arg(&repo)
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv and unshare (util-linux)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let _ = holder.kill();
            let status = holder.wait();
            panic!(
                "the host copy could not be made (overlay of / in a mount namespace): {status:?}"
            );
        }
        HostCopy {
            dir,
            holder,
            started: Mutex::new(Vec::new()),
            neighbour: None,
        }
    }

    /// A second network namespace linked to the copy's by a veth pair ([`COPY_ADDRESS`],
    /// [`NEIGHBOUR_ADDRESS`], /24), where [`HostCopy::command_next_door`] runs commands on the
    /// copy's files: a controller that is another machine on the network.
    pub fn add_neighbour(&mut self) {
        let name = format!("tlhost{}", std::process::id());
        let holder = self.holder.id().to_string();
        let script = format!(
            "set -e
ip netns add {name}
ip link add tlh-n netns {name} type veth peer name tlh-c netns {holder}
ip -n {name} addr add {NEIGHBOUR_ADDRESS}/24 dev tlh-n
ip -n {name} link set tlh-n up
ip -n {name} link set lo up
nsenter -t {holder} -n ip addr add {COPY_ADDRESS}/24 dev tlh-c
nsenter -t {holder} -n ip link set tlh-c up"
        );
        self.neighbour = Some(name);
        let status = Command::new("sh").args(["-c", &script]).status().unwrap();
        assert!(
            status.success(),
            "cannot link a neighbour namespace to the host copy"
        );
    }

    /// Like [`HostCopy::command`], in the neighbour's network namespace.
    pub fn command_next_door(&self, script: &str) -> Command {
        let name = self.neighbour.as_ref().expect("add_neighbour first");
        self.chrooted(&format!("--net=/run/netns/{name}"), script)
    }

    /// Starts `script` next door in the background, like [`HostCopy::spawn`].
    pub fn spawn_next_door(&self, script: &str, log: &str) {
        let command = self.command_next_door(&Self::logged(script, log));
        self.start(command);
    }

    /// A shell command line inside the copy (as root, in its network namespace).
    pub fn command(&self, script: &str) -> Command {
        self.chrooted("-n", script)
    }

    /// `script` in the copy's mount namespace and root, in the network namespace `net` names
    /// (an nsenter option).
    fn chrooted(&self, net: &str, script: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", net, "chroot"])
            .arg(self.dir.join("root"))
            .args(["/bin/sh", "-c", script])
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            );
        command
    }

    fn logged(script: &str, log: &str) -> String {
        format!("exec >{log} 2>&1; exec {script}")
    }

    fn start(&self, mut command: Command) {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .expect("nsenter (util-linux)");
        self.started.lock().unwrap().push(child);
    }

    pub fn run(&self, script: &str) -> Run {
        let output: Output = self.command(script).output().expect("nsenter (util-linux)");
        output.into()
    }

    /// Runs `script`, which must succeed; its stdout.
    pub fn ok(&self, script: &str) -> String {
        let run = self.run(script);
        assert_eq!(
            run.code, 0,
            "in the host copy, `{script}` failed:\n{}{}",
            run.stdout, run.stderr
        );
        run.stdout
    }

    /// Starts `script` in the background (killed when the copy is dropped), its output to
    /// `log` (a path inside the copy).
    pub fn spawn(&self, script: &str, log: &str) {
        self.start(self.command(&Self::logged(script, log)));
    }

    /// The copy's view of an absolute path, readable from outside while it lives (through
    /// the holder's root, which resolves in its mount namespace).
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.holder.id()))
            .join(self.dir.join("root").strip_prefix("/").expect("absolute"))
            .join(inside.trim_start_matches('/'))
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        for child in self.started.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever those left running inside (daemons that forked): every process whose root
        // is the copy, again until none is left (one may fork while the list is read).
        let root = self.dir.join("root");
        for _ in 0..10 {
            let inside: Vec<String> = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .filter(|e| std::fs::read_link(e.path().join("root")).is_ok_and(|r| r == root))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if inside.is_empty() {
                break;
            }
            let _ = Command::new("kill").arg("-9").args(&inside).status();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if let Some(name) = &self.neighbour {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
