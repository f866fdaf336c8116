//! The operator listener of `tlm serve` (`--operator-listen`, loopback by default): HTTP for
//! people and their tools, on axum over tokio (one current-thread runtime on a thread of its
//! own), apart from the nodes' strict API on the management link.
//!
//! - `GET /metrics`: the fleet as the service sees it ([`super::metrics::fleet`]).
//! - `GET /metrics/nodes`: every node's own metrics, relayed over the management link
//!   ([`super::metrics::relay`]), fetched [`RELAY_PARALLEL`] at a time.
//! - `/api/v1/…`: the operator API ([`super::operator_api`], [`API_ROUTES`]).
//! - `/`, `/ui/…`: the web UI (`ui/`: one page of plain JavaScript, embedded in the binary,
//!   served with a content security policy that allows nothing but this listener). It logs in
//!   with an API token and uses the API only.
//!
//! The listener stops accepting when `shutdown` is triggered and ends once the requests in
//! flight are answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use towalink_system::Shutdown;

use super::fleet::Fleet;
use super::metrics::{fetch_timed, fleet, node_metrics_address, relay};
use super::records;
use crate::Error;

/// How many nodes the relay fetches at once.
pub const RELAY_PARALLEL: usize = 64;

/// What the handlers share.
pub struct Operator {
    pub fleet: Arc<Fleet>,
    /// When the service started (Unix milliseconds).
    pub started_ms: u64,
}

fn metrics_response(text: String) -> Response {
    (
        [(header::CONTENT_TYPE, towalink_metrics::CONTENT_TYPE)],
        text,
    )
        .into_response()
}

async fn fleet_metrics(State(operator): State<Arc<Operator>>) -> Response {
    let nodes = operator.fleet.fleet_nodes();
    metrics_response(fleet(
        &nodes,
        records::now_ms(),
        operator.fleet.settings.report_interval_s,
        operator.started_ms,
    ))
}

async fn node_metrics(State(operator): State<Arc<Operator>>) -> Response {
    let settings = &operator.fleet.settings;
    let targets: Vec<(String, SocketAddr)> = operator
        .fleet
        .fleet_nodes()
        .into_iter()
        .map(|n| (n.name, node_metrics_address(settings.node_address(n.id))))
        .collect();
    let permits = Arc::new(tokio::sync::Semaphore::new(RELAY_PARALLEL));
    let mut fetches = Vec::with_capacity(targets.len());
    for (name, address) in targets {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        fetches.push(tokio::task::spawn_blocking(move || {
            let fetched = fetch_timed(name, address);
            drop(permit);
            fetched
        }));
    }
    let mut fetched = Vec::with_capacity(fetches.len());
    for fetch in fetches {
        if let Ok(f) = fetch.await {
            fetched.push(f);
        }
    }
    metrics_response(relay(&fetched))
}

/// The web UI's files, embedded in the binary (no CDN, nothing fetched from elsewhere).
const UI_INDEX: &str = include_str!("ui/index.html");
const UI_SCRIPT: &str = include_str!("ui/app.js");
const UI_STYLE: &str = include_str!("ui/app.css");

/// The page may load only its own files and talk only to this listener.
const UI_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                         connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

fn ui_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, UI_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn ui_index() -> Response {
    ui_file("text/html; charset=utf-8", UI_INDEX)
}
async fn ui_script() -> Response {
    ui_file("text/javascript; charset=utf-8", UI_SCRIPT)
}
async fn ui_style() -> Response {
    ui_file("text/css; charset=utf-8", UI_STYLE)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: tlm serve's operator listener serves /metrics, /metrics/nodes and /api/v1/ (see /api/v1/openapi.json)\n",
    )
        .into_response()
}

/// The operator API's routes (each in `openapi.json`).
pub const API_ROUTES: [&str; 16] = [
    "/api/v1/sites",
    "/api/v1/sites/{site}/nodes",
    "/api/v1/sites/{site}/attributes",
    "/api/v1/nodes",
    "/api/v1/nodes/{node}/status",
    "/api/v1/nodes/{node}/attributes",
    "/api/v1/nodes/{node}/versions",
    "/api/v1/nodes/{node}/diff",
    "/api/v1/links",
    "/api/v1/changed",
    "/api/v1/status",
    "/api/v1/attributes/global",
    "/api/v1/set",
    "/api/v1/commit",
    "/api/v1/activate",
    "/api/v1/openapi.json",
];

/// The routes.
pub fn router(operator: Arc<Operator>) -> Router {
    use super::operator_api as api;
    let [sites, site_nodes, site_attributes, nodes, node_status, node_attributes, node_versions, node_diff, links, changed, status, global, set, commit, activate, openapi] =
        API_ROUTES;
    Router::new()
        .route("/", get(ui_index))
        .route("/ui/app.js", get(ui_script))
        .route("/ui/app.css", get(ui_style))
        .route("/metrics", get(fleet_metrics))
        .route("/metrics/nodes", get(node_metrics))
        .route(sites, get(api::sites))
        .route(site_nodes, get(api::site_nodes))
        .route(site_attributes, get(api::site_attributes))
        .route(nodes, get(api::nodes))
        .route(node_status, get(api::node_status))
        .route(node_attributes, get(api::node_attributes))
        .route(node_versions, get(api::node_versions))
        .route(node_diff, get(api::node_diff))
        .route(links, get(api::links))
        .route(changed, get(api::changed))
        .route(status, get(api::status))
        .route(global, get(api::global_attributes))
        .route(set, post(api::set))
        .route(commit, post(api::commit))
        .route(activate, post(api::activate))
        .route(openapi, get(api::openapi))
        .fallback(not_found)
        .with_state(operator)
}

/// Serves `listener` until `shutdown` is triggered (blocking: runs its own runtime).
pub fn serve(
    listener: std::net::TcpListener,
    operator: Operator,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let failed = |what: &str, e: std::io::Error| Error::Service(format!("{what}: {e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .thread_name("operator")
        .build()
        .map_err(|e| failed("cannot start the operator listener's runtime", e))?;
    let shutdown = shutdown.clone();
    runtime.block_on(async move {
        listener
            .set_nonblocking(true)
            .map_err(|e| failed("operator listener", e))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| failed("operator listener", e))?;
        let stopped = async move {
            while !shutdown.is_triggered() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        axum::serve(listener, router(Arc::new(operator)))
            .with_graceful_shutdown(stopped)
            .await
            .map_err(|e| failed("operator listener", e))
    })
}
