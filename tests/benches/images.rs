//! Benchmark of `tlm image build` from cached assets and a warm package cache: one x86_64 and
//! one rpi4 image, raw and zstd, with the release layout (kernel, initramfs, modloop, firmware:
//! what a real Alpine release gives; only the layer's package database kept, so the card's
//! packages resolve the same) and with the test assets' offline system layer (`rootfs/`, 22 MB
//! more in the apkovl). Every build resolves, checks and puts the packages on the card (from
//! the test mirror, `file://`). Prints the median of 5 builds of the real release `tlm`, its
//! phases, the image sizes, the packages on the card and their size, and `zstd -3` (single
//! thread, the same level) on the same raw image for comparison.
//! Run: `cargo build --release --bins && cargo bench -p towalink-tests --bench images`
//! (after tests/assets.sh and the musl node builds).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use towalink_tests::vm::assets;
use towalink_tests::Installation;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Copies a release directory without its `rootfs/` layer but the layer's package database
/// and world (what the card's packages are resolved against).
fn release_layout(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["lib/apk/db/installed", "etc/apk/world"] {
        let dest = to.join("rootfs").join(f);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from.join("rootfs").join(f), dest).unwrap();
    }
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() == "rootfs" {
            continue;
        }
        let status = Command::new("cp")
            .arg("-a")
            .arg(e.path())
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// One `tlm --loglevel debug image build` of r1.s1 (the phases are on stderr).
fn build(ctl: &Installation, board: &str, dir: &Path, out: &Path) -> towalink_tests::Run {
    let run = ctl.run(&[
        "--loglevel",
        "debug",
        "image",
        "build",
        "node",
        "r1.s1",
        "--board",
        board,
        "--alpine-dir",
        &dir.display().to_string(),
        "--mirror",
        &format!("file://{}", assets().join("apk-mirror").display()),
        "--apk-key",
        &apk_key(),
        "--cache-dir",
        &assets().join("cache").display().to_string(),
        "-o",
        &out.display().to_string(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    run
}

/// The test repository's signing key (tests/apk-repo.sh).
fn apk_key() -> String {
    std::fs::read_dir(assets().join("apk-keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".rsa.pub"))
        .expect("the test package key")
        .display()
        .to_string()
}

/// The phase timings `tlm --loglevel debug` logs.
fn phases(stderr: &str) -> BTreeMap<String, f64> {
    let Some(line) = stderr.lines().find(|l| l.contains("image build phases=")) else {
        return BTreeMap::new();
    };
    let inner = line
        .split("phases={")
        .nth(1)
        .unwrap_or("")
        .trim_end_matches('}');
    inner
        .split(", ")
        .filter_map(|kv| {
            let (k, v) = kv.split_once(": ")?;
            Some((k.trim_matches('"').to_string(), v.parse().ok()?))
        })
        .collect()
}

fn main() {
    let ctl = Installation::new();
    ctl.ok(&["add", "site", "s1"]);
    ctl.ok(&["add", "node", "r1.s1"]);
    ctl.ok(&["set", "global", "controller_endpoint", "ctl.example.net"]);
    ctl.ok(&["-m", "bench", "commit", "all"]);
    let work = tempfile::tempdir().unwrap();
    println!(
        "| board | assets | output | build (median of 5) | phases (ms) | image | file | apkovl | packages on the card |"
    );
    println!("|---|---|---|---:|---|---:|---:|---:|---:|");
    let mut raw_for_zstd = Vec::new();
    for board in ["x86_64", "rpi4"] {
        let full = assets().join(if board == "rpi4" {
            "alpine-rpi4"
        } else {
            "alpine-x86_64"
        });
        let plain = work.path().join(format!("release-{board}"));
        release_layout(&full, &plain);
        for (label, dir) in [("release layout", &plain), ("with rootfs layer", &full)] {
            for ext in ["img", "img.zst"] {
                let out = work.path().join(format!("{board}.{ext}"));
                let mut times = Vec::new();
                let mut last = None;
                for _ in 0..5 {
                    let started = Instant::now();
                    let run = build(&ctl, board, dir, &out);
                    times.push(started.elapsed().as_secs_f64());
                    last = Some(run);
                }
                let run = last.unwrap();
                let p = phases(&run.stderr);
                let phase_text: Vec<String> =
                    p.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
                let file = std::fs::metadata(&out).unwrap().len();
                let apkovl = run
                    .stdout
                    .split("apkovl ")
                    .nth(1)
                    .and_then(|s| s.split(' ').next())
                    .unwrap_or("?")
                    .to_string();
                let image = run
                    .stdout
                    .split("image ")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .unwrap_or("?")
                    .to_string();
                let inspected: serde_json::Value = serde_json::from_str(&ctl.ok(&[
                    "image",
                    "inspect",
                    &out.display().to_string(),
                    "--format",
                    "json",
                ]))
                .unwrap();
                let card: u64 = inspected["boot_files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|f| f["path"].as_str().unwrap_or("").starts_with("apks"))
                    .map(|f| f["size"].as_u64().unwrap_or(0))
                    .sum();
                println!(
                    "| {board} | {label} | {ext} | {:.2} s | {} | {image} | {:.1} MiB | {apkovl} MiB | {} ({:.2} MiB with the index) |",
                    median(times),
                    phase_text.join(", "),
                    file as f64 / 1048576.0,
                    inspected["packages"].as_array().map_or(0, |p| p.len()),
                    card as f64 / 1048576.0
                );
                if ext == "img" && label == "release layout" {
                    let keep = work.path().join(format!("{board}-raw.img"));
                    std::fs::copy(&out, &keep).unwrap();
                    raw_for_zstd.push((board, keep, p));
                }
            }
        }
    }
    println!();
    println!("| board | `zstd -3 -T1` on the raw image, then `sync` of its output | tlm's zstd stage (same file, level 3, synced) |");
    println!("|---|---:|---:|");
    for (board, raw, _) in &raw_for_zstd {
        let mut zstd_times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let status = Command::new("zstd")
                .args(["-3", "-T1", "-q", "-f", "-o"])
                .arg(work.path().join("cli.zst"))
                .arg(raw)
                .status()
                .expect("zstd (Debian package zstd)");
            assert!(status.success());
            // tlm syncs its output before renaming it into place; so does this comparison.
            let status = Command::new("sync")
                .arg(work.path().join("cli.zst"))
                .status()
                .unwrap();
            assert!(status.success());
            zstd_times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        // tlm's compression stage: the `output` phase of a .zst build minus a raw build's.
        let plain = work.path().join(format!("release-{board}"));
        let mut stage = Vec::new();
        for _ in 0..5 {
            let get = |ext: &str| {
                let out = work.path().join(format!("stage.{ext}"));
                let run = build(&ctl, board, &plain, &out);
                phases(&run.stderr).get("output").copied().unwrap_or(0.0)
            };
            let z = get("img.zst");
            let r = get("img");
            stage.push(z - r);
        }
        println!(
            "| {board} | {:.0} ms | {:.0} ms |",
            median(zstd_times),
            median(stage)
        );
    }
}
