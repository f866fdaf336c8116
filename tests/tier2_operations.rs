//! Tier 2, operating the fleet (docs/operations.md): a real Prometheus server (Debian's
//! `prometheus`) in the controller's namespace scrapes `tlm serve`'s operator listener — the
//! fleet view (`/metrics`) and every node's own metrics relayed over the management links
//! (`/metrics/nodes`) — and the test asks it over its HTTP API what an operator would: are
//! the nodes up, does a link's traffic count grow while iperf3 runs, does a BGP session read
//! down after its link is cut and up again after the repair.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use towalink_tests::network::{in_netns, tail, wait_for, Network, Options, Topology};

static SERIAL: Mutex<()> = Mutex::new(());

/// Where the operator listener is, inside the controller's namespace (`tlm serve`'s default).
const OPERATOR: &str = "127.0.0.1:9468";
/// Where the test's Prometheus listens, inside the controller's namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";

/// One HTTP/1.0 request from inside `netns` (the server closes the connection after the
/// response): the status code and the body.
fn http(netns: &str, method: &str, address: &str, target: &str) -> (u16, String) {
    let (method, address, target) = (method.to_string(), address.to_string(), target.to_string());
    in_netns(netns, move || {
        let to: SocketAddr = address.parse().unwrap();
        let Ok(mut stream) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
            return (0, String::new());
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let request = format!("{method} {target} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
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
    // Each node's metrics answer only on its management link, not on its underlay address.
    let s2 = net.site(2);
    let underlay = format!("{}:9469", s2.endpoint());
    assert_eq!(
        http(&net.site(1).netns, "GET", &underlay, "/metrics").0,
        0,
        "a neighbour reached r.s2's metrics over the underlay"
    );
}
