//! Tier 2, operating the fleet (docs/operations.md): a real Prometheus server (Debian's
//! `prometheus`) in the controller's namespace scrapes `tlm serve`'s operator listener — the
//! fleet view (`/metrics`) and every node's own metrics relayed over the management links
//! (`/metrics/nodes`) — and the test asks it over its HTTP API what an operator would: are
//! the nodes up, does a link's traffic count grow while iperf3 runs, does a BGP session read
//! down after its link is cut and up again after the repair. A webhook receiver in the same
//! namespace takes the alerts `tlm serve` posts (refusing the first, so it must be retried):
//! a BGP session down, a node unreachable, a rollback, and each one's end.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use towalink_tests::network::{
    in_netns, spawn_in_netns, tail, wait_for, Network, Options, Topology,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Where the operator listener is, inside the controller's namespace (`tlm serve`'s default).
const OPERATOR: &str = "127.0.0.1:9468";
/// Where the test's Prometheus listens, inside the controller's namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";

/// One HTTP/1.0 request from inside `netns` (the server closes the connection after the
/// response): the status code and the body.
fn http(netns: &str, method: &str, address: &str, target: &str) -> (u16, String) {
    request(netns, method, address, target, &[], "")
}

/// A request with header lines and a body.
fn request(
    netns: &str,
    method: &str,
    address: &str,
    target: &str,
    headers: &[String],
    body: &str,
) -> (u16, String) {
    let mut head = format!("{method} {target} HTTP/1.0\r\nHost: {address}\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body);
    let address = address.to_string();
    in_netns(netns, move || {
        let to: SocketAddr = address.parse().unwrap();
        let Ok(mut stream) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
            return (0, String::new());
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        if stream.write_all(head.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
}

fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server in the controller's namespace, scraping the operator listener every
/// second; killed (and its data removed) on drop.
struct Prometheus {
    netns: String,
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(netns: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            [
                "global: {scrape_interval: 1s, scrape_timeout: 1s}".to_string(),
                "scrape_configs:".into(),
                "- job_name: towalink-fleet".into(),
                format!("  static_configs: [{{targets: ['{OPERATOR}']}}]"),
                "- job_name: towalink-nodes".into(),
                "  metrics_path: /metrics/nodes".into(),
                format!("  static_configs: [{{targets: ['{OPERATOR}']}}]"),
            ]
            .join("\n"),
        )
        .unwrap();
        let log = dir.path().join("prometheus.log");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus (tests/setup.sh installs it)");
        let prometheus = Prometheus {
            netns: netns.to_string(),
            child,
            log,
            _dir: dir,
        };
        wait_for(
            Duration::from_secs(60),
            || http(netns, "GET", PROMETHEUS, "/-/ready").0 == 200,
            || format!("Prometheus to be ready:\n{}", prometheus.log_tail()),
        );
        prometheus
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 15)
    }

    /// An instant query: each series' labels and value.
    fn query(&self, expression: &str) -> Vec<(serde_json::Value, f64)> {
        let target = format!("/api/v1/query?query={}", url_encoded(expression));
        let (status, body) = http(&self.netns, "GET", PROMETHEUS, &target);
        assert_eq!(status, 200, "query {expression}: {body}");
        let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
        reply["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| {
                let value = series["value"][1].as_str().unwrap().parse().unwrap();
                (series["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of a query that names one series, if it has one now.
    fn value(&self, expression: &str) -> Option<f64> {
        let result = self.query(expression);
        assert!(
            result.len() <= 1,
            "{expression} names more than one series: {result:?}"
        );
        result.first().map(|(_, v)| *v)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes iperf3 sent from `from`'s LAN to `to`'s LAN in `seconds`.
fn iperf(net: &Network, from: u32, to: u32, seconds: u32) -> u64 {
    let (client, server) = (net.site(from), net.site(to));
    let mut listening = server
        .exec("iperf3")
        .args(["-s", "-1", "-B", &server.lan().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 -s");
    let mut sent = None;
    wait_for(
        Duration::from_secs(30),
        || {
            let out = client
                .exec("iperf3")
                .args(["-J", "-c", &server.lan().to_string()])
                .args(["-B", &client.lan().to_string(), "-t", &seconds.to_string()])
                .output()
                .unwrap();
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            sent = report["end"]["sum_sent"]["bytes"].as_u64();
            sent.is_some()
        },
        || "iperf3 to run between the two LANs".into(),
    );
    let _ = listening.kill();
    let _ = listening.wait();
    sent.unwrap()
}

#[test]
fn prometheus_scrapes_the_fleet_and_every_node_through_the_controller() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut options = Options::new(2, Topology::Mesh);
    options.controller = true;
    // Each node also serves its metrics on its own loopback, on the same port as on its
    // management link.
    options.daemon_args = vec!["--metrics-listen".into(), "127.0.0.1:9469".into()];
    let net = Network::build(options);
    let ctl = net.controller.as_ref().unwrap().netns.clone();
    net.wait_established(Duration::from_secs(120));
    let prometheus = Prometheus::start(&ctl);
    let controller_log = || tail(&net.controller_log(), 20);

    // The fleet view: both nodes configured and reachable, both relayed.
    wait_for(
        Duration::from_secs(90),
        || {
            prometheus.value("towalink_fleet_nodes_reachable") == Some(2.0)
                && prometheus.value("sum(towalink_relay_up)") == Some(2.0)
        },
        || {
            format!(
                "Prometheus to read both nodes reachable and relayed: {:?} {:?}\n{}\n{}",
                prometheus.query("towalink_fleet_node_reachable"),
                prometheus.query("towalink_relay_up"),
                prometheus.log_tail(),
                controller_log()
            )
        },
    );
    assert_eq!(prometheus.value("towalink_fleet_nodes"), Some(2.0));
    assert_eq!(
        prometheus.value("towalink_fleet_node_active_version{node=\"r.s1\"}"),
        prometheus.value("towalink_fleet_node_latest_version{node=\"r.s1\"}"),
        "r.s1 runs its latest version"
    );
    // The nodes' own metrics, under their names: the active version, its state, a session up.
    assert_eq!(
        prometheus.value("towalink_node_active_version{node=\"r.s2\"}"),
        prometheus.value("towalink_fleet_node_active_version{node=\"r.s2\"}"),
    );
    assert_eq!(
        prometheus.value("towalink_node_active_state{node=\"r.s2\",state=\"good\"}"),
        Some(1.0)
    );
    wait_for(
        Duration::from_secs(60),
        || prometheus.value("min(towalink_bgp_session_up{node=\"r.s1\"})") == Some(1.0),
        || {
            format!(
                "r.s1's BGP sessions to read up: {:?}",
                prometheus.query("towalink_bgp_session_info{node=\"r.s1\"}")
            )
        },
    );

    // A link's bytes grow while iperf3 runs through it.
    let link = net.site(1).route_dev(net.site(2).lan());
    assert!(
        link.starts_with("tlwg"),
        "s1 reaches s2's LAN through {link}"
    );
    let tx =
        format!("towalink_wireguard_transmit_bytes_total{{node=\"r.s1\",interface=\"{link}\"}}");
    let before = prometheus
        .value(&tx)
        .expect("a transmit counter of the link");
    let sent = iperf(&net, 1, 2, 3);
    assert!(sent > 1_000_000, "iperf3 sent {sent} bytes");
    wait_for(
        Duration::from_secs(30),
        || {
            prometheus
                .value(&tx)
                .is_some_and(|after| after - before >= sent as f64)
        },
        || {
            format!(
                "{tx} to grow by the {sent} bytes iperf3 sent (from {before}): {:?}",
                prometheus.value(&tx)
            )
        },
    );

    // The underlay between s1 and s2 is cut: r.s1's session to r.s2 reads down, in the
    // node's own metrics and in the fleet view; after the repair, up again.
    net.cut(1, 2);
    let down = "sum(towalink_fleet_node_bgp_sessions{node=\"r.s1\",state=\"down\"})";
    wait_for(
        Duration::from_secs(60),
        || {
            prometheus.value("min(towalink_bgp_session_up{node=\"r.s1\"})") == Some(0.0)
                && prometheus.value(down).is_some_and(|d| d >= 1.0)
        },
        || {
            format!(
                "a BGP session of r.s1 to read down after the cut: {:?} {:?}",
                prometheus.query("towalink_bgp_session_info{node=\"r.s1\"}"),
                prometheus.query(down)
            )
        },
    );
    net.restore(1, 2);
    wait_for(
        Duration::from_secs(120),
        || {
            prometheus.value("min(towalink_bgp_session_up{node=\"r.s1\"})") == Some(1.0)
                && prometheus.value(down) == Some(0.0)
        },
        || {
            format!(
                "r.s1's sessions to read up again: {:?}",
                prometheus.query("towalink_bgp_session_info{node=\"r.s1\"}")
            )
        },
    );

    // The operator listener refuses what it does not serve, with the right status.
    assert_eq!(http(&ctl, "POST", OPERATOR, "/metrics").0, 405);
    assert_eq!(http(&ctl, "GET", OPERATOR, "/nothing/here").0, 404);
    // A node's metrics on the address the operator chose, answering only GET /metrics.
    let s1 = &net.site(1).netns;
    let (status, local) = http(s1, "GET", "127.0.0.1:9469", "/metrics");
    assert_eq!(status, 200);
    assert!(
        local.contains("towalink_node_info{name=\"r.s1\""),
        "{}",
        tail(&local, 5)
    );
    assert_eq!(http(s1, "POST", "127.0.0.1:9469", "/metrics").0, 405);
    assert_eq!(http(s1, "GET", "127.0.0.1:9469", "/other").0, 404);
    // Each node's metrics answer only on its management link, not on its underlay address.
    let s2 = net.site(2);
    let underlay = format!("{}:9469", s2.endpoint());
    assert_eq!(
        http(&net.site(1).netns, "GET", &underlay, "/metrics").0,
        0,
        "a neighbour reached r.s2's metrics over the underlay"
    );
}

/// What the webhook receiver got: the status it answered and the JSON body.
type Received = Arc<Mutex<Vec<(u16, serde_json::Value)>>>;

/// A webhook receiver in a namespace: answers 503 to the first post, 200 to the others, and
/// keeps every body; stopped on drop.
struct Receiver {
    received: Received,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(netns: &str, address: &str) -> Receiver {
        let received: Received = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (held, stopping, address) = (
            Arc::clone(&received),
            Arc::clone(&stop),
            address.to_string(),
        );
        let thread = spawn_in_netns(netns, move || {
            let listener = std::net::TcpListener::bind(&address).expect("bind the receiver");
            listener.set_nonblocking(true).unwrap();
            while !stopping.load(Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                // The head, then as much body as Content-Length says.
                let body = loop {
                    let Ok(n) = stream.read(&mut buffer) else {
                        break None;
                    };
                    if n == 0 {
                        break None;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break Some(body[..length].to_string());
                    }
                };
                let Some(body) = body else { continue };
                let mut received = held.lock().unwrap();
                let status = if received.is_empty() { 503 } else { 200 };
                received.push((status, serde_json::from_str(&body).unwrap_or_default()));
                drop(received);
                let reason = if status == 200 {
                    "OK"
                } else {
                    "Service Unavailable"
                };
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Receiver {
            received,
            stop,
            thread: Some(thread),
        }
    }

    fn all(&self) -> Vec<(u16, serde_json::Value)> {
        self.received.lock().unwrap().clone()
    }

    /// Whether an alert was taken (answered 200) with these fields.
    fn taken(&self, alert: &str, status: &str, node: &str) -> bool {
        self.all().iter().any(|(code, body)| {
            *code == 200
                && body["alert"] == alert
                && body["status"] == status
                && body["node"] == node
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn alerts_reach_a_webhook_retried_and_each_one_ends() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const HOOK: &str = "127.0.0.1:9471";
    let mut options = Options::new(2, Topology::Mesh);
    options.controller = true;
    options.global = vec![
        ("alert_webhooks".into(), format!("[\"http://{HOOK}/hook\"]")),
        ("alert_unreachable_after_s".into(), "10".into()),
        ("alert_bgp_down_after_s".into(), "5".into()),
    ];
    let mut net = Network::build(options);
    let ctl = net.controller.as_ref().unwrap().netns.clone();
    let receiver = Receiver::start(&ctl, HOOK);
    net.wait_established(Duration::from_secs(120));
    let seen = |receiver: &Receiver| {
        receiver
            .all()
            .iter()
            .map(|(code, body)| format!("{code} {body}"))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // A BGP session down past its threshold: alerted; the first post is refused (503) and
    // the same alert is posted again.
    net.cut(1, 2);
    wait_for(
        Duration::from_secs(90),
        || receiver.taken("bgp_session_down", "firing", "r.s1"),
        || {
            format!(
                "a bgp_session_down alert for r.s1 to be taken:\n{}\n{}",
                seen(&receiver),
                tail(&net.controller_log(), 20)
            )
        },
    );
    let all = receiver.all();
    assert_eq!(all[0].0, 503, "{}", seen(&receiver));
    assert!(
        all[1..]
            .iter()
            .any(|(code, body)| *code == 200 && *body == all[0].1),
        "the refused alert was posted again:\n{}",
        seen(&receiver)
    );
    let firing = all
        .iter()
        .find(|(_, b)| b["alert"] == "bgp_session_down" && b["node"] == "r.s1")
        .unwrap()
        .1
        .clone();
    assert!(firing["subject"].is_string(), "{firing}");
    assert!(
        firing["summary"]
            .as_str()
            .unwrap()
            .contains("is not established"),
        "{firing}"
    );
    net.restore(1, 2);
    wait_for(
        Duration::from_secs(120),
        || receiver.taken("bgp_session_down", "resolved", "r.s1"),
        || format!("the BGP alert of r.s1 to be resolved:\n{}", seen(&receiver)),
    );

    // A node that stops reporting: unreachable after 10 s; back when it reports again.
    net.site_mut(2).kill_daemon();
    wait_for(
        Duration::from_secs(90),
        || receiver.taken("node_unreachable", "firing", "r.s2"),
        || format!("a node_unreachable alert for r.s2:\n{}", seen(&receiver)),
    );
    net.site_mut(2).start_daemon();
    wait_for(
        Duration::from_secs(90),
        || receiver.taken("node_unreachable", "resolved", "r.s2"),
        || {
            format!(
                "r.s2's unreachable alert to be resolved:\n{}",
                seen(&receiver)
            )
        },
    );
    net.wait_established(Duration::from_secs(120));

    // A version that breaks BGP on r.s2 is rolled back: alerted, naming the version; over
    // once the operator orders the version it runs.
    let status = net.fleet_status();
    let running = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "r.s2")
        .unwrap()["active_version"]
        .as_u64()
        .unwrap();
    std::fs::write(
        net.ctl.dir.join("site_s2/node_r/bird_peers.conf.jinja"),
        towalink_tests::bird_peers_breaking_bgp(),
    )
    .unwrap();
    net.ctl.ok(&["commit", "all"]);
    let run = net.ctl.run(&[
        "activate",
        "node",
        "r.s2",
        "--wait-blessed",
        "--timeout",
        "120",
    ]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    wait_for(
        Duration::from_secs(60),
        || receiver.taken("node_rolled_back", "firing", "r.s2"),
        || format!("a node_rolled_back alert for r.s2:\n{}", seen(&receiver)),
    );
    let rolled = receiver
        .all()
        .into_iter()
        .find(|(_, b)| b["alert"] == "node_rolled_back")
        .unwrap()
        .1;
    assert_eq!(rolled["subject"], format!("v{}", running + 1), "{rolled}");
    assert!(
        rolled["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("rolled back from v{} to v{running}", running + 1)),
        "{rolled}"
    );
    // The node counted it, by cause (relayed by the controller).
    let (status, relayed) = http(&ctl, "GET", OPERATOR, "/metrics/nodes");
    assert_eq!(status, 200);
    assert!(
        relayed
            .contains("towalink_node_rollbacks_total{node=\"r.s2\",reason=\"health_checks\"} 1\n"),
        "{}",
        relayed
            .lines()
            .filter(|l| l.contains("rollbacks"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    net.ctl.ok(&[
        "activate",
        "node",
        "r.s2",
        &running.to_string(),
        "--no-wait",
    ]);
    wait_for(
        Duration::from_secs(60),
        || receiver.taken("node_rolled_back", "resolved", "r.s2"),
        || format!("r.s2's rollback alert to end:\n{}", seen(&receiver)),
    );
}

/// The operator API as a client sees it: one token, JSON in and out.
struct Api<'a> {
    netns: &'a str,
    token: Option<String>,
}

impl Api<'_> {
    fn headers(&self, json: bool) -> Vec<String> {
        let mut headers = Vec::new();
        if let Some(token) = &self.token {
            headers.push(format!("Authorization: Bearer {token}"));
        }
        if json {
            headers.push("Content-Type: application/json".into());
        }
        headers
    }

    fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = request(self.netns, "GET", OPERATOR, path, &self.headers(false), "");
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
        )
    }

    fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, reply) = request(
            self.netns,
            "POST",
            OPERATOR,
            path,
            &self.headers(true),
            body,
        );
        (
            status,
            serde_json::from_str(&reply).unwrap_or(serde_json::Value::String(reply)),
        )
    }
}

/// `tlm token add NAME --file <temp>/NAME.token` (with `extra` options): the file, the token
/// in it, and what tlm printed.
fn add_token(net: &Network, name: &str, extra: &[&str]) -> (std::path::PathBuf, String, String) {
    let file = net.temp.path().join(format!("{name}.token"));
    let mut args = vec!["token", "add", name, "--file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = net.ctl.ok(&args);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    (file, token, out)
}

fn file_mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_operator_api_runs_tlms_own_commands_for_token_holders_only() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut options = Options::new(2, Topology::Mesh);
    options.controller = true;
    let net = Network::build(options);
    let ctl = net.controller.as_ref().unwrap().netns.clone();
    net.wait_established(Duration::from_secs(120));

    // Tokens: written to the file asked for (0600), stored hashed (0600), never printed.
    let (ops_file, ops, out) = add_token(&net, "ops", &[]);
    assert!(!out.contains(&ops), "{out}");
    let (_, viewer, _) = add_token(&net, "viewer", &["--read-only"]);
    assert_eq!(file_mode(&ops_file), 0o600);
    assert_eq!(
        file_mode(&net.ctl.path("certs/operator-tokens.toml")),
        0o600
    );
    let stored = net.ctl.read("certs/operator-tokens.toml");
    assert!(
        !stored.contains(&ops) && !stored.contains(&viewer),
        "{stored}"
    );
    let listed = net.ctl.ok(&["token", "list"]);
    assert!(
        listed.contains("ops") && listed.contains("read-only") && !listed.contains(&ops),
        "{listed}"
    );
    let again = net.ctl.run(&[
        "token",
        "add",
        "ops",
        "--file",
        "/tmp/towalink-never-written",
    ]);
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains("a token named `ops` exists"),
        "{}",
        again.stderr
    );
    assert!(!std::path::Path::new("/tmp/towalink-never-written").exists());

    let anonymous = Api {
        netns: &ctl,
        token: None,
    };
    let forged = Api {
        netns: &ctl,
        token: Some(format!("tlo_{}", "A".repeat(43))),
    };
    let reader = Api {
        netns: &ctl,
        token: Some(viewer.clone()),
    };
    let admin = Api {
        netns: &ctl,
        token: Some(ops.clone()),
    };

    // Reads.
    assert_eq!(anonymous.get("/api/v1/nodes").0, 401);
    assert_eq!(forged.get("/api/v1/nodes").0, 401);
    let (status, nodes) = reader.get("/api/v1/nodes");
    assert_eq!(status, 200, "{nodes}");
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r.s1", "r.s2"]);
    let (status, attributes) = reader.get("/api/v1/nodes/r.s1/attributes");
    assert_eq!(status, 200, "{attributes}");
    assert!(
        attributes.to_string().contains("\"generated\""),
        "origins are given: {attributes}"
    );
    let (status, error) = reader.get("/api/v1/nodes/nope.s1/attributes");
    assert_eq!(status, 404, "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("nope.s1"),
        "{error}"
    );
    assert_eq!(reader.get("/api/v1/links").0, 200);
    let (status, fleet) = reader.get("/api/v1/status");
    assert_eq!(status, 200, "{fleet}");
    assert_eq!(fleet["nodes"].as_array().unwrap().len(), 2, "{fleet}");
    let (status, document) = anonymous.get("/api/v1/openapi.json");
    assert_eq!(status, 200);
    assert!(
        document["paths"]["/api/v1/activate"].is_object(),
        "{document}"
    );

    // Writes: refused for the read-only token, for bad values and malformed bodies, each
    // leaving the directory as it was.
    let before = towalink_tests::tree_hash(&net.ctl.dir);
    let set = |value: &str| {
        format!(r#"{{"scope":"global","attribute":"bird_bfd_interval_ms","value":{value}}}"#)
    };
    assert_eq!(reader.post("/api/v1/set", &set("200")).0, 403);
    assert_eq!(anonymous.post("/api/v1/set", &set("200")).0, 401);
    let (status, refused) = admin.post("/api/v1/set", &set("\"fast\""));
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("bird_bfd_interval_ms"),
        "{refused}"
    );
    assert_eq!(admin.post("/api/v1/set", "{not json").0, 400);
    assert_eq!(
        admin
            .post(
                "/api/v1/set",
                r#"{"scope":"global","attribute":"x","value":1,"extra":1}"#
            )
            .0,
        422
    );
    let (status, refused) = admin.post(
        "/api/v1/set",
        r#"{"scope":"site","attribute":"bird_bfd_interval_ms","value":200}"#,
    );
    assert_eq!(status, 400, "{refused}");
    assert_eq!(
        towalink_tests::tree_hash(&net.ctl.dir),
        before,
        "a refused write changed the directory"
    );

    // A change, its commit with a message and a canary activation, as `tlm` would.
    let (status, done) = admin.post("/api/v1/set", &set("200"));
    assert_eq!((status, done["ok"].as_bool()), (200, Some(true)), "{done}");
    assert!(net
        .ctl
        .ok(&["show", "global"])
        .contains("bird_bfd_interval_ms = 200"));
    let (status, changed) = reader.get("/api/v1/changed");
    assert_eq!(
        (status, changed.as_array().map(Vec::len)),
        (200, Some(2)),
        "{changed}"
    );
    let (status, done) = admin.post(
        "/api/v1/commit",
        r#"{"scope":"all","message":"BFD 200 ms from the API"}"#,
    );
    assert_eq!((status, done["ok"].as_bool()), (200, Some(true)), "{done}");
    assert!(net
        .ctl
        .git(&["log", "--format=%s"])
        .contains("BFD 200 ms from the API"));
    let latest = |node: &str| {
        net.fleet_status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node)
            .unwrap()["latest_version"]
            .as_u64()
            .unwrap() as u32
    };
    let (status, done) = admin.post(
        "/api/v1/activate",
        r#"{"scope":"all","canary":"r.s1","wait_blessed":true,"timeout":120}"#,
    );
    assert_eq!((status, done["ok"].as_bool()), (200, Some(true)), "{done}");
    let output = done["output"].as_str().unwrap();
    assert!(
        output.contains("r.s1") && output.contains("blessed"),
        "{output}"
    );
    net.wait_reported(&[1, 2], latest("r.s2"), "good", Duration::from_secs(120));

    // A revoked token is refused from the next request on.
    net.ctl.ok(&["token", "revoke", "viewer"]);
    assert_eq!(reader.get("/api/v1/nodes").0, 401);
    assert_eq!(admin.get("/api/v1/nodes").0, 200);
}

/// The colour the browser draws a link in.
fn stroke(browser: &mut towalink_tests::browser::Browser, link: &str) -> String {
    browser
        .eval(&format!(
            "getComputedStyle(document.querySelector('line[data-link=\"{link}\"]')).stroke"
        ))
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_web_ui_shows_the_map_a_cut_link_turning_red_and_activates_with_a_canary() {
    use towalink_tests::browser::{artifacts, Browser};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let shots = artifacts("web-ui");
    let mut options = Options::new(3, Topology::Mesh);
    options.controller = true;
    let net = Network::build(options);
    let ctl = net.controller.as_ref().unwrap().netns.clone();
    net.wait_established(Duration::from_secs(120));
    let (_, token, _) = add_token(&net, "ops", &[]);

    // The page itself: embedded files, a policy that allows nothing from elsewhere.
    let (status, page) = http(&ctl, "GET", OPERATOR, "/");
    assert_eq!(status, 200);
    assert!(
        page.contains("/ui/app.js") && !page.contains("https://"),
        "{page}"
    );

    let mut browser = Browser::start(&ctl);
    browser.navigate(&format!("http://{OPERATOR}/"));
    browser.wait_until(
        Duration::from_secs(30),
        "document.getElementById('login')",
        "the login form",
    );
    // A wrong token is refused on the form.
    browser.eval(&format!(
        "document.getElementById('token').value = 'tlo_{}'; document.getElementById('login-submit').click()",
        "B".repeat(43)
    ));
    browser.wait_until(
        Duration::from_secs(30),
        "document.getElementById('login-error').textContent.includes('unknown or revoked token')",
        "the refusal of a wrong token",
    );
    browser.eval(&format!(
        "document.getElementById('token').value = '{token}'; document.getElementById('login-submit').click()"
    ));
    let links = ["r.s1--r.s2", "r.s1--r.s3", "r.s2--r.s3"];
    let all_up = links
        .iter()
        .map(|l| {
            format!("document.querySelector('line[data-link=\"{l}\"]').dataset.state === 'up'")
        })
        .collect::<Vec<_>>()
        .join(" && ");
    browser.wait_until(
        Duration::from_secs(60),
        &all_up,
        "the three links up on the map",
    );
    assert_eq!(
        stroke(&mut browser, "r.s1--r.s2"),
        "rgb(30, 142, 62)",
        "up is green"
    );
    let rows = browser.eval(
        "[...document.querySelectorAll('#fleet tbody tr')].map(r => r.dataset.node + ' ' + r.children[1].textContent)",
    );
    assert_eq!(
        rows,
        json!(["r.s1 yes", "r.s2 yes", "r.s3 yes"]),
        "the fleet table"
    );
    browser.screenshot(&shots.join("fleet.png"));

    // The underlay between s1 and s2 is cut: the map shows that link red within seconds.
    net.cut(1, 2);
    let cut = std::time::Instant::now();
    browser.wait_until(
        Duration::from_secs(60),
        "document.querySelector('line[data-link=\"r.s1--r.s2\"]').dataset.state === 'down'",
        "the cut link r.s1--r.s2 down",
    );
    eprintln!(
        "the cut link turned red on the map after {:.1} s",
        cut.elapsed().as_secs_f64()
    );
    assert_eq!(
        stroke(&mut browser, "r.s1--r.s2"),
        "rgb(217, 48, 37)",
        "down is red"
    );
    assert_eq!(
        browser.eval("document.querySelector('line[data-link=\"r.s1--r.s3\"]').dataset.state"),
        json!("up"),
        "the other links stay up"
    );
    browser.screenshot(&shots.join("link-cut.png"));
    net.restore(1, 2);
    browser.wait_until(
        Duration::from_secs(120),
        &all_up,
        "the repaired link up again",
    );

    // A change committed with tlm, activated from the page with r.s1 as the canary.
    net.ctl
        .ok(&["set", "global", "bird_bfd_interval_ms", "200"]);
    net.ctl.ok(&["-m", "BFD 200 ms", "commit", "all"]);
    browser.eval(
        "document.querySelector('#activate input[name=canary]').value = 'r.s1'; \
         document.getElementById('activate-submit').click()",
    );
    browser.wait_until(
        Duration::from_secs(180),
        "document.getElementById('activate-output').dataset.ok === 'true'",
        "the activation's outcome",
    );
    let output = browser.eval("document.getElementById('activate-output').textContent");
    let output = output.as_str().unwrap();
    assert!(
        output.contains("canary `r.s1` blessed the version")
            && output.contains("r.s3: v2 activated, blessed"),
        "{output}"
    );
    net.wait_reported(&[1, 2, 3], 2, "good", Duration::from_secs(60));

    // A node's page: its attributes with their origin, its links, its versions and a diff.
    browser.navigate(&format!("http://{OPERATOR}/#/node/r.s1"));
    browser.wait_until(
        Duration::from_secs(30),
        "document.querySelectorAll('#versions tbody tr').length === 2",
        "r.s1's two versions",
    );
    let origin = browser.eval(
        "[...document.querySelectorAll('#attributes tbody tr')].find(r => r.children[0].textContent === 'bird_bfd_interval_ms').children[2].textContent",
    );
    assert_eq!(origin, json!("global"), "where the attribute was set");
    let peers = browser.eval(
        "[...document.querySelectorAll('#links tbody tr')].map(r => r.children[0].textContent)",
    );
    assert_eq!(peers, json!(["r.s2", "r.s3"]));
    browser.eval("document.querySelector('#versions tr[data-version=\"2\"] button').click()");
    browser.wait_until(
        Duration::from_secs(30),
        "document.getElementById('diff').textContent.includes('+    min rx interval 200 ms;')",
        "the diff of v1 → v2",
    );
    browser.screenshot(&shots.join("node.png"));
}
