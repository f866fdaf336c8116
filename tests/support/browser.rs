//! A real browser for the web UI's tests: headless Chromium (Debian's `chromium`) in a
//! network namespace, driven over the Chrome DevTools Protocol (a websocket; `Page.navigate`,
//! `Runtime.evaluate`, `Page.captureScreenshot`). Killed, and its profile removed, on drop.

use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::network::{in_netns, wait_for};

/// Where the browser's DevTools endpoint listens inside its namespace.
const DEVTOOLS: &str = "127.0.0.1:9222";

pub struct Browser {
    child: Child,
    socket: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
    log: PathBuf,
}

/// `GET path` on the DevTools endpoint from inside `netns`.
fn devtools_get(netns: &str, path: &str) -> Option<Value> {
    let path = path.to_string();
    in_netns(netns, move || {
        let mut stream =
            TcpStream::connect_timeout(&DEVTOOLS.parse().unwrap(), Duration::from_secs(2)).ok()?;
        std::io::Write::write_all(
            &mut stream,
            format!("GET {path} HTTP/1.1\r\nHost: {DEVTOOLS}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        // Read until the body is whole (Content-Length), the peer closes, or 2 s pass.
        let mut reply = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            let text = String::from_utf8_lossy(&reply).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                });
                if length.is_some_and(|n| body.len() >= n) {
                    return serde_json::from_str(body).ok();
                }
            }
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buffer[..n]),
            }
        }
        let text = String::from_utf8_lossy(&reply).into_owned();
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    })
}

impl Browser {
    /// Starts Chromium in `netns` with an empty page and connects to it.
    pub fn start(netns: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "chromium"])
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--window-size=1280,1100",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=9222",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            // Its own process group: the drop kills the renderers with it.
            .process_group(0)
            .spawn()
            .expect("start chromium (tests/setup.sh installs it)");
        let mut target = None;
        wait_for(
            Duration::from_secs(60),
            || {
                target = devtools_get(netns, "/json/list").and_then(|list| {
                    list.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                        .as_str()
                        .map(str::to_string)
                });
                target.is_some()
            },
            || {
                format!(
                    "Chromium's DevTools endpoint to list a page:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            },
        );
        let url = target.unwrap();
        let stream = in_netns(netns, || {
            let address: SocketAddr = DEVTOOLS.parse().unwrap();
            TcpStream::connect_timeout(&address, Duration::from_secs(5))
                .expect("connect to DevTools")
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let (socket, _) = tungstenite::client(url.as_str(), stream).expect("DevTools websocket");
        let mut browser = Browser {
            child,
            socket,
            next_id: 1,
            _profile: profile,
            log,
        };
        browser.call("Page.enable", json!({}));
        browser.call("Runtime.enable", json!({}));
        browser
    }

    /// One DevTools command; its result (events meanwhile are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket
            .send(Message::text(request))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        loop {
            let message = self
                .socket
                .read()
                .unwrap_or_else(|e| panic!("DevTools {method}: {e}\n{}", self.log_tail()));
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    panic!("DevTools {method}: {error}");
                }
                return reply["result"].clone();
            }
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// Evaluates a JavaScript expression in the page (awaiting a promise); its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("the page threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page, saying what it waited for.
    pub fn wait_until(&mut self, limit: Duration, expression: &str, what: &str) {
        let mut last = Value::Null;
        let check = format!(
            "(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"
        );
        wait_for(
            limit,
            || {
                last = self.eval(&check);
                last == Value::Bool(true)
            },
            || format!("the page to show {what} ({expression})"),
        );
    }

    /// A PNG of the page, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }

    fn log_tail(&self) -> String {
        crate::network::tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 20)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.socket.close(None);
        // SAFETY: kill(2) on the process group this browser leads; no memory involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Where tests keep artefacts (screenshots): `target/test-artifacts/<test>/`.
pub fn artifacts(test: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join(test)
}
