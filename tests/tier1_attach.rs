//! Tier 1 (attach): the real `tlm attach` and the real `towalink-node bootstrap` on loopback,
//! with a stranger (curl from another loopback address) asking too. What an operator checks:
//! nothing is handed out without the pairing code the device shows, `--yes` included; the
//! stranger who asks first gets nothing; one source cannot crowd the real device out; what a
//! device says about itself cannot redraw the operator's terminal; `tlm status` shows what
//! nodes report escaped; the attach certificate names the controller's current endpoints and
//! every `--san` (checked by curl against the name), and a certificate tlm did not make is
//! kept.

use std::cell::Cell;
use std::io::{BufRead as _, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::Duration;

use towalink_tests::{binary, Installation};

/// The stranger's source address (the real device asks from 127.0.0.1).
const STRANGER: &str = "127.0.0.9";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn installation() -> Installation {
    let t = Installation::new();
    t.ok(&["add", "site", "s1"]);
    t.ok(&["add", "node", "r.s1"]);
    t.ok(&["set", "global", "controller_endpoint", "\"127.0.0.1\""]);
    t.ok(&["commit", "all"]);
    t
}

/// A stranger's attach request over real TLS from [`STRANGER`]; returns the HTTP status.
fn stranger_asks(
    port: u16,
    cert: &std::path::Path,
    device_id: &str,
    hostname: &str,
    code: &str,
) -> u16 {
    let body = serde_json::json!({
        "device_id": device_id,
        "hostname": hostname,
        "machine": "x86_64",
        "pairing_code": code,
    })
    .to_string();
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--interface", STRANGER, "--cacert"])
        .arg(cert)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
        ])
        .arg(format!("https://127.0.0.1:{port}/attach/v1/request"))
        .output()
        .expect("curl (installed by tests/setup.sh)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Makes the attach certificate (an attach with no device gives up at once).
fn make_certificate(t: &Installation, port: u16) -> std::path::PathBuf {
    let run = t.run(&[
        "attach",
        "node",
        "r.s1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--collect",
        "0",
        "--code",
        "AAAA-AAAA",
    ]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("no device asked"), "{}", run.stderr);
    t.dir.join("certs/server.pem")
}

#[test]
fn yes_without_a_pairing_code_hands_out_nothing() {
    let t = installation();
    let error = t.refused(
        &[
            "attach",
            "node",
            "r.s1",
            "--yes",
            "--listen",
            "127.0.0.1:1",
            "--collect",
            "1",
        ],
        1,
    );
    assert!(error.contains("--yes needs --code"), "{error}");
    let error = t.refused(&["attach", "node", "r.s1", "--code", "7KQ2-M9XU"], 2);
    assert!(error.contains("not a pairing code"), "{error}");
}

#[test]
fn only_the_device_showing_the_typed_code_gets_the_identity() {
    let t = installation();
    let port = free_port();
    let cert = make_certificate(&t, port);

    // The operator runs attach and will type the code read off the device's console; the
    // device may start asking after the list was shown (attach then waits for it).
    let mut attach = t
        .command(&[
            "attach",
            "node",
            "r.s1",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--collect",
            "15",
            "--timeout",
            "120",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The stranger asks first, with a host name built to redraw the operator's list, and
    // then crowds the list from its one address.
    let evil = "r3-s1\u{1b}[2J\u{1b}[H\r\n  1) 0123456789abcdef0123456789abcdef  host `r.s1`";
    let first = Cell::new(0);
    towalink_tests::network::wait_for(
        Duration::from_secs(120),
        || {
            first.set(stranger_asks(
                port,
                &cert,
                "5757575757575757",
                evil,
                "ZZZZ-ZZZZ",
            ));
            first.get() == 202
        },
        || format!("attach never answered the stranger ({})", first.get()),
    );
    let crowd: Vec<u16> = (0..8)
        .map(|i| stranger_asks(port, &cert, &format!("{i:016x}"), "crowd", "ZZZZ-ZZZZ"))
        .collect();
    assert_eq!(
        crowd.iter().filter(|s| **s == 202).count(),
        3,
        "one source presents 4 devices at most: {crowd:?}"
    );
    assert!(
        crowd.iter().filter(|s| **s != 202).all(|s| *s == 429),
        "{crowd:?}"
    );
    let without_code = stranger_asks(port, &cert, "6767676767676767", "old", "");
    assert_eq!(
        without_code, 403,
        "a request without a pairing code is turned away"
    );

    // The real device, crowded out by nobody.
    let state = t.temp.path().join("device");
    let mut device = Command::new(binary("towalink-node"))
        .arg("--state-dir")
        .arg(&state)
        .args([
            "bootstrap",
            "--controller",
            &format!("127.0.0.1:{port}"),
            "--interval-ms",
            "300",
            "--timeout-s",
            "60",
            "--ca",
        ])
        .arg(&cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut console = std::io::BufReader::new(device.stderr.take().unwrap());
    let mut line = String::new();
    let code = loop {
        line.clear();
        assert!(
            console.read_line(&mut line).unwrap() > 0,
            "bootstrap showed no pairing code"
        );
        if let Some(rest) = line.strip_prefix("pairing code ") {
            break rest.split(':').next().unwrap().to_string();
        }
    };
    attach
        .stdin
        .as_mut()
        .unwrap()
        .write_all(format!("{}\n", code.to_lowercase()).as_bytes())
        .unwrap();
    let status = device.wait().unwrap();
    let mut rest = String::new();
    console.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "bootstrap: {line}{rest}");
    assert!(state.join("identity/node.toml").exists());
    let attached = attach.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&attached.stdout);
    let stderr = String::from_utf8_lossy(&attached.stderr);
    assert!(attached.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("handed the identity of r.s1 to device "),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&code) && !stderr.contains(&code),
        "attach printed the device's code"
    );
    // The operator's screen: no escape sequence, no carriage return, no forged list line.
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains('\u{1b}') && !text.contains('\r'),
            "raw control characters reached the terminal: {text:?}"
        );
    }
    assert!(
        stdout.contains("r3-s1\\u{1b}[2J\\u{1b}[H\\u{d}\\u{a}  1) "),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("1) "))
            .count(),
        0,
        "{stdout}"
    );
    // After the choice the stranger is turned away, with its own code or the real one.
    assert_eq!(
        stranger_asks(port, &cert, "5757575757575757", "x", "ZZZZ-ZZZZ"),
        0,
        "attach has ended; nobody listens"
    );
    let _ = code;
}

#[test]
fn status_shows_what_nodes_report_escaped() {
    let t = installation();
    // What `tlm serve` stores from a hostile node's report (soft state, status/nodes/).
    let hostile = "x\u{1b}[31mred\r\nr.s2  yes  fake";
    let record = serde_json::json!({
        "node": "r.s1",
        "node_id": 1,
        "last_seen_ms": 0,
        "endpoint": null,
        "report": {
            "node_id": 1,
            "node": "r.s1",
            "daemon_version": hostile,
            "uptime_s": 1,
            "daemon_uptime_s": 1,
            "active_version": 1,
            "state": hostile,
            "installed_versions": [1],
            "tunnels": [],
            "bgp": [{"name": hostile, "state": "up", "info": hostile}],
            "health": [{"check": "bird", "ok": false, "detail": hostile}],
            "last_rollback": {"time": 0, "from_version": 2, "to_version": 1, "reason": hostile},
        }
    });
    std::fs::create_dir_all(t.dir.join("status/nodes")).unwrap();
    std::fs::write(t.dir.join("status/nodes/r.s1.json"), record.to_string()).unwrap();
    let text = t.ok(&["status"]) + &t.ok(&["status", "node", "r.s1"]);
    assert!(text.contains("x\\u{1b}[31mred\\u{d}\\u{a}r.s2"), "{text}");
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert!(
        !text.lines().any(|l| l.starts_with("r.s2")),
        "a forged line: {text}"
    );
}

#[test]
fn a_device_that_does_not_trust_the_certificate_is_reported() {
    let t = installation();
    let port = free_port();
    make_certificate(&t, port);
    let attach = t
        .command(&[
            "attach",
            "node",
            "r.s1",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--collect",
            "8",
            "--code",
            "AAAA-AAAA",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A device checking the certificate against the system's CAs (not this controller's
    // self-signed one) refuses it: curl exits 60 once attach listens (7 before).
    let last = Cell::new(None);
    towalink_tests::network::wait_for(
        Duration::from_secs(120),
        || {
            let status = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "--max-time", "10"])
                .args(["--interface", STRANGER])
                .arg(format!("https://127.0.0.1:{port}/attach/v1/request"))
                .status()
                .expect("curl (installed by tests/setup.sh)");
            last.set(status.code());
            status.code() == Some(60)
        },
        || {
            format!(
                "attach never refused a TLS attempt on port {port} (curl exit {:?})",
                last.get()
            )
        },
    );
    let out = attach.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("tlm: error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains("TLS connection(s) failed"), "{line}");
    assert!(line.contains(&format!("from {STRANGER}")), "{line}");
    assert!(line.contains("certs/server.pem"), "{line}");
    assert!(!line.contains("run `towalink-node bootstrap"), "{line}");
}

/// `tlm attach` with no device: it makes or remakes its certificate, listens, gives up at once.
fn attach_once(t: &Installation, port: u16, extra: &[&str]) -> towalink_tests::Run {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "attach",
        "node",
        "r.s1",
        "--listen",
        &listen,
        "--collect",
        "0",
        "--code",
        "AAAA-AAAA",
    ];
    args.extend_from_slice(extra);
    let run = t.run(&args);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("no device asked"), "{}", run.stderr);
    run
}

/// A running `tlm attach` that no device answers; ended when dropped (test failures included).
struct Listening(std::process::Child);

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tlm attach` on `port` and waits until it answers HTTPS.
fn listening(t: &Installation, port: u16) -> Listening {
    let child = t
        .command(&[
            "attach",
            "node",
            "r.s1",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--collect",
            "600",
            "--code",
            "AAAA-AAAA",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let attach = Listening(child);
    towalink_tests::network::wait_for(
        Duration::from_secs(120),
        || {
            Command::new("curl")
                .args(["-s", "-k", "-o", "/dev/null", "--max-time", "10"])
                .arg(format!("https://127.0.0.1:{port}/attach/v1/request"))
                .status()
                .expect("curl (installed by tests/setup.sh)")
                .success()
        },
        || format!("tlm attach never answered HTTPS on port {port}"),
    );
    attach
}

/// curl's exit code for `https://<name>:<port>/…` with `name` resolved to 127.0.0.1 and the
/// certificate checked against `ca`, names included: 0 when trusted (any HTTP answer), 60
/// when not.
fn curl_by_name(port: u16, name: &str, ca: &std::path::Path) -> Option<i32> {
    Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "10", "--resolve"])
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{name}:{port}/attach/v1/request"))
        .status()
        .expect("curl (installed by tests/setup.sh)")
        .code()
}

#[test]
fn the_certificate_follows_the_controller_endpoint_and_keeps_every_san() {
    let t = installation();
    let port = free_port();
    let made = attach_once(&t, port, &["--san", "first.example"]);
    assert!(
        made.stdout.contains("made a self-signed certificate"),
        "{}",
        made.stdout
    );
    let cert = t.dir.join("certs/server.pem");
    let old = t.temp.path().join("old.pem");
    std::fs::copy(&cert, &old).unwrap();
    {
        let _attach = listening(&t, port);
        assert_eq!(curl_by_name(port, "first.example", &old), Some(0));
        assert_eq!(
            curl_by_name(port, "ctl.example", &old),
            Some(60),
            "the first certificate does not name ctl.example"
        );
    }

    // The controller moves to a new name: the next attach remakes the certificate.
    t.ok(&["set", "global", "controller_endpoint", "\"ctl.example\""]);
    t.ok(&["commit", "all"]);
    let remade = attach_once(&t, port, &[]);
    let line = remade
        .stdout
        .lines()
        .find(|l| l.starts_with("attach certificate remade:"))
        .unwrap_or_else(|| panic!("no remade line: {}", remade.stdout));
    assert!(line.contains("it now names ctl.example (was: "), "{line}");
    assert!(line.contains("first.example"), "{line}");
    assert!(
        remade.stdout.contains("certificate SHA-256 fingerprint "),
        "{}",
        remade.stdout
    );
    assert_ne!(std::fs::read(&cert).unwrap(), std::fs::read(&old).unwrap());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(t.dir.join("certs/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the new key is 0600");
    {
        let _attach = listening(&t, port);
        assert_eq!(
            curl_by_name(port, "ctl.example", &cert),
            Some(0),
            "a device reaching the controller by its new name trusts the new certificate"
        );
        assert_eq!(
            curl_by_name(port, "first.example", &cert),
            Some(0),
            "the --san name given once is still in the remade certificate"
        );
        assert_eq!(
            curl_by_name(port, "ctl.example", &old),
            Some(60),
            "the old certificate is no longer the one served"
        );
    }

    // Nothing new to name: the certificate stays.
    let before = std::fs::read(&cert).unwrap();
    let kept = attach_once(&t, port, &["--san", "first.example"]);
    assert!(!kept.stdout.contains("remade"), "{}", kept.stdout);
    assert_eq!(std::fs::read(&cert).unwrap(), before);
}

#[test]
fn a_certificate_tlm_did_not_make_is_kept_and_its_missing_names_are_warned_about() {
    let t = installation();
    let port = free_port();
    let cert = make_certificate(&t, port);
    // The operator's own certificate and key in place of tlm's (tlm's record names the
    // certificate it made, by fingerprint).
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "30", "-subj", "/CN=ops.example", "-addext"])
        .arg("subjectAltName=DNS:ops.example,DNS:localhost,IP:127.0.0.1")
        .arg("-keyout")
        .arg(t.dir.join("certs/key.pem"))
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let before = std::fs::read(&cert).unwrap();
    t.ok(&["set", "global", "controller_endpoint", "\"ctl.example\""]);
    t.ok(&["commit", "all"]);
    let run = attach_once(&t, port, &["--san", "more.example"]);
    assert!(!run.stdout.contains("remade"), "{}", run.stdout);
    let warning = run
        .stderr
        .lines()
        .find(|l| l.contains("not made by tlm"))
        .unwrap_or_else(|| panic!("no warning: {}", run.stderr));
    // Among the names it lacks (the loopback and host names too): the endpoint and the --san.
    assert!(
        warning.contains("ctl.example") && warning.contains("more.example"),
        "{warning}"
    );
    assert_eq!(
        run.stderr.matches("not made by tlm").count(),
        1,
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read(&cert).unwrap(), before, "kept as it was");
}

/// A directory from a tlm before the certificate record: its self-signed certificate is still
/// tlm's (rcgen's subject), so it follows the endpoints too.
#[test]
fn a_certificate_an_earlier_tlm_made_follows_the_endpoints() {
    let t = installation();
    let port = free_port();
    let cert = make_certificate(&t, port);
    std::fs::remove_file(t.dir.join("certs/attach-names.toml")).unwrap();
    let before = std::fs::read(&cert).unwrap();
    t.ok(&["set", "global", "controller_endpoint", "\"ctl.example\""]);
    t.ok(&["commit", "all"]);
    let run = attach_once(&t, port, &[]);
    assert!(
        run.stdout
            .contains("attach certificate remade: it now names ctl.example"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert!(!run.stderr.contains("not made by tlm"), "{}", run.stderr);
    assert_ne!(std::fs::read(&cert).unwrap(), before);
}
