//! Benchmark: activation latency of a 50-file version (activate → files applied → BIRD
//! reloaded, BIRD's own reconfiguration time reported apart) and install time of a 1 MB
//! bundle, through the node library on a temporary state directory. With root and `bird`
//! installed, a real BIRD 2 runs in its own network namespace and is reconfigured each time.
//!
//! Run: `cargo bench -p towalink-node --bench lifecycle`

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use towalink_bundle::{sha256_hex, FileEntry, Manifest, Service, SigningKey};
use towalink_node::apply::Reloader;
use towalink_node::bird::BirdControl;
use towalink_node::lifecycle::{Node, VersionSpec};
use towalink_node::state::Older;

const NODE_ID: u32 = 1;

fn bundle(key: &SigningKey, version: u32, files: BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let entries = files
        .iter()
        .map(|(path, content)| FileEntry {
            path: path.clone(),
            target: path.ends_with(".conf").then(|| format!("/etc/bird/{path}")),
            mode: "0644".into(),
            sha256: sha256_hex(content),
            service: path.ends_with(".conf").then(|| "bird".to_string()),
            size: Some(content.len() as u64),
        })
        .collect();
    let manifest = Manifest {
        format: towalink_bundle::FORMAT,
        node_id: NODE_ID,
        site: "bench".into(),
        node: "n".into(),
        version,
        parent: version.checked_sub(1).filter(|v| *v > 0),
        created: "2026-11-25T00:00:00Z".into(),
        services: BTreeMap::from([(
            "bird".to_string(),
            Service {
                reload: vec!["birdc".into(), "configure".into()],
            },
        )]),
        files: entries,
    };
    towalink_bundle::build(&manifest, &files, key).expect("bundle")
}

/// 49 BIRD parts plus bird.conf: 50 files that all change with `variant`.
fn fifty_files(variant: u32) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert(
        "bird.conf".to_string(),
        format!("# variant {variant}\nrouter id 10.254.0.1;\nprotocol device {{ }}\ninclude \"bird_*.conf\";\n").into_bytes(),
    );
    for i in 0..49 {
        files.insert(
            format!("bird_part{i:02}.conf"),
            format!(
                "# part {i} of variant {variant}\ndefine PART_{i} = {};\n",
                variant * 100 + i
            )
            .into_bytes(),
        );
    }
    files
}

/// About 1 MB of text that compresses like configuration does.
fn one_megabyte(version: u32) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for f in 0..10 {
        let mut text = String::with_capacity(105_000);
        let mut x: u64 = u64::from(version) * 7919 + f;
        while text.len() < 104_857 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(&format!(
                "route 10.{}.{}.0/24 via 192.0.2.{};\n",
                (x >> 40) & 255,
                (x >> 32) & 255,
                (x >> 24) & 255
            ));
        }
        files.insert(format!("data{f}.txt"), text.into_bytes());
    }
    files
}

fn stats(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = values[values.len() / 2];
    let p95 = values[(values.len() * 95 / 100).min(values.len() - 1)];
    (median, p95, values[values.len() - 1])
}

fn write_identity(state: &Path, key: &SigningKey) {
    std::fs::create_dir_all(state.join("identity")).unwrap();
    std::fs::write(
        state.join("identity/node.toml"),
        format!(
            "node_id = {NODE_ID}\nsite = \"bench\"\nnode = \"n\"\ncontroller_key = \"{}\"\nwg_public_key = \"-\"\n",
            towalink_bundle::verifying_key_to_base64(&key.verifying_key())
        ),
    )
    .unwrap();
}

fn main() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let temp = tempfile::tempdir().unwrap();
    let state = temp.path().join("state");
    let root = temp.path().join("root");
    let socket = temp.path().join("bird.ctl");
    write_identity(&state, &key);
    let node = Node::new(
        &state,
        &root,
        Reloader {
            bird: BirdControl {
                socket: socket.clone(),
            },
        },
    );

    // Install time of a 1 MB bundle (on a state directory of its own).
    let install_state = temp.path().join("install-state");
    write_identity(&install_state, &key);
    let installer = Node::new(
        &install_state,
        &root,
        Reloader {
            bird: BirdControl {
                socket: socket.clone(),
            },
        },
    );
    let mut install_ms = Vec::new();
    let mut size = 0;
    for version in 1000..1010 {
        let bytes = bundle(&key, version, one_megabyte(version));
        size = bytes.len();
        let started = Instant::now();
        installer.install(&bytes, Older::Refuse).unwrap();
        install_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }

    // Activation latency of 50-file versions, with BIRD when it can run here.
    let first = bundle(&key, 1, fifty_files(1));
    node.install(&first, Older::Refuse).unwrap();
    node.activate(VersionSpec::Number(1), None).unwrap();
    node.mark_good().unwrap();
    // SAFETY: getuid has no preconditions.
    let can_run_bird = rustix::process::getuid().is_root() && which("bird") && which("unshare");
    let mut bird = None;
    if can_run_bird {
        bird = std::process::Command::new("unshare")
            .args(["--net", "bird", "-f", "-c"])
            .arg(root.join("etc/bird/bird.conf"))
            .arg("-s")
            .arg(&socket)
            .spawn()
            .ok();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let mut activation_ms = Vec::new();
    let mut bird_ms = Vec::new();
    for version in 2..=31 {
        node.install(&bundle(&key, version, fifty_files(version)), Older::Refuse)
            .unwrap();
        let report = node.activate(VersionSpec::Number(version), None).unwrap();
        assert_eq!(report.apply.written.len(), 50);
        activation_ms.push(report.activation_ms);
        bird_ms.push(report.apply.bird_reload_ms);
        node.mark_good().unwrap();
    }
    if let Some(mut child) = bird {
        let _ = child.kill();
        let _ = child.wait();
    }

    let (m, p, max) = stats(install_ms);
    println!("install, 1 MB of files ({:.0} KB bundle), 10 runs: median {m:.1} ms, p95 {p:.1} ms, max {max:.1} ms", size as f64 / 1024.0);
    let (m, p, max) = stats(activation_ms);
    println!("activate, 50 changed files, 30 runs, without BIRD's reload: median {m:.1} ms, p95 {p:.1} ms, max {max:.1} ms");
    if can_run_bird {
        let (m, p, max) = stats(bird_ms);
        println!("  BIRD's own reconfiguration (real BIRD 2): median {m:.1} ms, p95 {p:.1} ms, max {max:.1} ms");
    } else {
        println!("  (BIRD not measured: needs root and bird2)");
    }
}

fn which(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
