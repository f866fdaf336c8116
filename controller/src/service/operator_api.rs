//! The operator API (`/api/v1/…`, JSON, bearer tokens from `tlm token`; docs/operations.md).
//!
//! Every request runs the `tlm` command it stands for, through the same grammar
//! ([`crate::cli::Cli`]) and the same code ([`crate::commands::run_to`]): the same checks,
//! the same lock, the same git commits, the same errors. A request is turned into the
//! command's arguments by [`Operation::argv`] (pure): options first, then `--`, then the
//! request's names and values, so nothing a client sends is read as an option. Reads run the
//! command's `--format json` and answer its JSON; writes answer the command's output.
//!
//! Refusals: no or an unknown token 401, a read-only token writing 403, a body that is not
//! the operation's JSON 400 (axum's), a command refusing its input 400, an unknown site or
//! node 404, git busy 409, the directory unreadable 500; each `{"error": "...", "hint"?}`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use clap::Parser as _;
use serde::Deserialize;
use serde_json::json;

use super::operator::Operator;
use crate::store::tokens;
use crate::Error;

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Where a write applies (the CLI's `global`, `site <site>`, `node <node>`, `all`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    All,
    Global,
    Site,
    Node,
}

/// `POST /api/v1/set`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRequest {
    pub scope: ScopeKind,
    #[serde(default)]
    pub target: Option<String>,
    pub attribute: String,
    /// A string is taken as `tlm set` takes its argument (TOML, bare words as strings,
    /// `empty` removes); any other JSON value as that value.
    pub value: serde_json::Value,
}

/// `POST /api/v1/commit`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    pub scope: ScopeKind,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// `POST /api/v1/activate`, with `tlm activate`'s options.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    pub scope: ScopeKind,
    #[serde(default)]
    pub target: Option<String>,
    /// A version number (default: the latest).
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub canary: Option<String>,
    #[serde(default)]
    pub confirm: Option<u64>,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub wait_blessed: bool,
    #[serde(default)]
    pub no_wait: bool,
}

/// `GET /api/v1/nodes/{node}/diff?from=N&to=M`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    #[serde(default)]
    pub from: Option<u32>,
    #[serde(default)]
    pub to: Option<u32>,
}

/// What a request asks `tlm` to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Sites,
    Nodes,
    SiteNodes(String),
    Links,
    Changed,
    Status,
    NodeStatus(String),
    GlobalAttributes,
    SiteAttributes(String),
    NodeAttributes(String),
    NodeVersions(String),
    NodeDiff(String, DiffQuery),
    Set(SetRequest),
    Commit(CommitRequest),
    Activate(ActivateRequest),
}

/// A request the API refuses before running anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub error: String,
    pub hint: Option<String>,
}

impl Refusal {
    fn bad(error: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            hint: None,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if let Some(hint) = self.hint {
            body["hint"] = json!(hint);
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"towalink\""),
            );
        }
        response
    }
}

/// The scope words of a write: `all`, `global`, or `site`/`node` with its target.
fn scope_words(
    scope: &ScopeKind,
    target: &Option<String>,
    allowed: &[ScopeKind],
) -> Result<(Vec<String>, Vec<String>), Refusal> {
    if !allowed.contains(scope) {
        return Err(Refusal::bad(format!(
            "scope: must be one of {}",
            allowed
                .iter()
                .map(|s| format!("{s:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let word = format!("{scope:?}").to_lowercase();
    match (scope, target) {
        (ScopeKind::Site | ScopeKind::Node, Some(t)) => Ok((vec![word], vec![t.clone()])),
        (ScopeKind::Site | ScopeKind::Node, None) => Err(Refusal::bad(format!(
            "target: a {word} scope needs the {word}'s name"
        ))),
        (_, Some(_)) => Err(Refusal::bad(format!("target: the {word} scope takes none"))),
        (_, None) => Ok((vec![word], Vec::new())),
    }
}

/// A JSON value as `tlm set` takes it: a string as typed, anything else as TOML.
fn set_value(value: &serde_json::Value) -> Result<String, Refusal> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Null => Err(Refusal::bad(
            "value: null; send \"empty\" to remove an attribute",
        )),
        other => {
            let toml_value = toml::Value::try_from(other)
                .map_err(|e| Refusal::bad(format!("value: not representable in TOML: {e}")))?;
            Ok(toml_value.to_string())
        }
    }
}

impl Operation {
    /// Whether it changes the directory (needs a token that may write).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Operation::Set(_) | Operation::Commit(_) | Operation::Activate(_)
        )
    }

    /// The `tlm` arguments (after the program name and `--config-dir`). Pure.
    pub fn argv(&self) -> Result<Vec<String>, Refusal> {
        let words = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        let json = ["--format", "json"];
        let (mut argv, positional): (Vec<String>, Vec<String>) = match self {
            Operation::Sites => (words(&["list", "sites"]), Vec::new()),
            Operation::Nodes => (words(&["list", "nodes"]), vec!["all".into()]),
            Operation::SiteNodes(site) => (words(&["list", "nodes"]), vec![site.clone()]),
            Operation::Links => (words(&["list", "links"]), Vec::new()),
            Operation::Changed => (words(&["list", "changed"]), Vec::new()),
            Operation::Status => (words(&["status"]), Vec::new()),
            Operation::NodeStatus(node) => (words(&["status", "node"]), vec![node.clone()]),
            Operation::GlobalAttributes => (words(&["show", "global"]), Vec::new()),
            Operation::SiteAttributes(site) => {
                (words(&["show_all", "--origin", "site"]), vec![site.clone()])
            }
            Operation::NodeAttributes(node) => {
                (words(&["show_all", "--origin", "node"]), vec![node.clone()])
            }
            Operation::NodeVersions(node) => (words(&["list", "versions"]), vec![node.clone()]),
            Operation::NodeDiff(node, query) => {
                let mut argv = words(&["diff", "node"]);
                if let Some(from) = query.from {
                    argv.extend(["--from".to_string(), from.to_string()]);
                }
                if let Some(to) = query.to {
                    argv.extend(["--to".to_string(), to.to_string()]);
                }
                (argv, vec![node.clone()])
            }
            Operation::Set(request) => {
                let allowed = [ScopeKind::Global, ScopeKind::Site, ScopeKind::Node];
                let (scope, mut target) = scope_words(&request.scope, &request.target, &allowed)?;
                target.push(request.attribute.clone());
                target.push(set_value(&request.value)?);
                ([vec!["set".to_string()], scope].concat(), target)
            }
            Operation::Commit(request) => {
                let allowed = [ScopeKind::All, ScopeKind::Site, ScopeKind::Node];
                let (scope, target) = scope_words(&request.scope, &request.target, &allowed)?;
                let mut argv = Vec::new();
                if let Some(message) = &request.message {
                    argv.extend(["-m".to_string(), message.clone()]);
                }
                argv.push("commit".into());
                argv.extend(scope);
                (argv, target)
            }
            Operation::Activate(request) => {
                let allowed = [ScopeKind::All, ScopeKind::Site, ScopeKind::Node];
                let (scope, mut target) = scope_words(&request.scope, &request.target, &allowed)?;
                let mut argv = vec!["activate".to_string()];
                if let Some(canary) = &request.canary {
                    argv.extend(["--canary".to_string(), canary.clone()]);
                }
                if let Some(confirm) = request.confirm {
                    argv.extend(["--confirm".to_string(), confirm.to_string()]);
                }
                if let Some(timeout) = request.timeout {
                    argv.extend(["--timeout".to_string(), timeout.to_string()]);
                }
                if request.wait_blessed {
                    argv.push("--wait-blessed".into());
                }
                if request.no_wait {
                    argv.push("--no-wait".into());
                }
                argv.extend(scope);
                if let Some(version) = request.version {
                    target.push(version.to_string());
                }
                (argv, target)
            }
        };
        if !self.writes() {
            argv.splice(1..1, json.iter().map(|s| s.to_string()));
        }
        if !positional.is_empty() {
            argv.push("--".into());
            argv.extend(positional);
        }
        Ok(argv)
    }
}

/// Who may do `operation` with the `Authorization` header given. Pure.
pub fn authorize(
    authorization: Option<&str>,
    tokens: &tokens::Tokens,
    writes: bool,
) -> Result<String, Refusal> {
    let unauthorized = |error: &str| Refusal {
        status: StatusCode::UNAUTHORIZED,
        error: error.into(),
        hint: Some(
            "send `Authorization: Bearer <token>`; `tlm token add NAME --file FILE` makes one"
                .into(),
        ),
    };
    let presented = authorization
        .ok_or_else(|| unauthorized("no bearer token"))?
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthorized("the Authorization header is not `Bearer <token>`"))?
        .trim();
    let record = tokens
        .find(presented)
        .ok_or_else(|| unauthorized("unknown or revoked token"))?;
    if writes && record.read_only {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            error: format!("token `{}` is read-only", record.name),
            hint: None,
        });
    }
    Ok(record.name.clone())
}

/// The status of a command's error.
fn status_of(error: &Error) -> StatusCode {
    use crate::model::allocation::AllocationError;
    match error {
        Error::Allocation(AllocationError::UnknownSite(_) | AllocationError::UnknownNode(_)) => {
            StatusCode::NOT_FOUND
        }
        Error::GitBusy { .. } => StatusCode::CONFLICT,
        Error::Io(_) | Error::Corrupt { .. } | Error::Command(_) | Error::Service(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::BAD_REQUEST,
    }
}

/// Runs `operation` for the holder of `headers`' token, on a blocking thread.
async fn perform(operator: Arc<Operator>, headers: HeaderMap, operation: Operation) -> Response {
    let store = operator.fleet.store().clone();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let job = move || -> Result<Response, Refusal> {
        let tokens = tokens::load(&store).map_err(|e| Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: e.to_string(),
            hint: None,
        })?;
        let who = authorize(authorization.as_deref(), &tokens, operation.writes())?;
        let mut argv = vec![
            "tlm".to_string(),
            "--config-dir".into(),
            store.root().display().to_string(),
        ];
        argv.extend(operation.argv()?);
        let cli = crate::cli::Cli::try_parse_from(&argv).map_err(|e| {
            let text = e.to_string();
            Refusal::bad(
                text.lines()
                    .next()
                    .unwrap_or("invalid request")
                    .trim_start_matches("error: "),
            )
        })?;
        if operation.writes() {
            tracing::info!(token = %who, operation = ?argv[3..], "operator API");
        }
        let mut output = Vec::new();
        let code = crate::commands::run_to(cli, &mut output).map_err(|error| Refusal {
            status: status_of(&error),
            error: error.to_string(),
            hint: error.hint(),
        })?;
        let text = String::from_utf8_lossy(&output).into_owned();
        let ok = code == std::process::ExitCode::SUCCESS;
        Ok(if operation.writes() {
            Json(json!({ "ok": ok, "output": text })).into_response()
        } else {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(value) => Json(value).into_response(),
                Err(_) => Json(json!({ "output": text })).into_response(),
            }
        })
    };
    match tokio::task::spawn_blocking(job).await {
        Ok(Ok(response)) => response,
        Ok(Err(refusal)) => refusal.into_response(),
        Err(_) => Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: "the command failed unexpectedly".into(),
            hint: None,
        }
        .into_response(),
    }
}

type Shared = State<Arc<Operator>>;

pub async fn sites(State(o): Shared, h: HeaderMap) -> Response {
    perform(o, h, Operation::Sites).await
}
pub async fn nodes(State(o): Shared, h: HeaderMap) -> Response {
    perform(o, h, Operation::Nodes).await
}
pub async fn site_nodes(State(o): Shared, h: HeaderMap, Path(site): Path<String>) -> Response {
    perform(o, h, Operation::SiteNodes(site)).await
}
pub async fn links(State(o): Shared, h: HeaderMap) -> Response {
    perform(o, h, Operation::Links).await
}
pub async fn changed(State(o): Shared, h: HeaderMap) -> Response {
    perform(o, h, Operation::Changed).await
}
pub async fn status(State(o): Shared, h: HeaderMap) -> Response {
    perform(o, h, Operation::Status).await
}
pub async fn node_status(State(o): Shared, h: HeaderMap, Path(node): Path<String>) -> Response {
    perform(o, h, Operation::NodeStatus(node)).await
}
pub async fn global_attributes(State(o): Shared, h: HeaderMap) -> Response {
    perform(o, h, Operation::GlobalAttributes).await
}
pub async fn site_attributes(State(o): Shared, h: HeaderMap, Path(site): Path<String>) -> Response {
    perform(o, h, Operation::SiteAttributes(site)).await
}
pub async fn node_attributes(State(o): Shared, h: HeaderMap, Path(node): Path<String>) -> Response {
    perform(o, h, Operation::NodeAttributes(node)).await
}
pub async fn node_versions(State(o): Shared, h: HeaderMap, Path(node): Path<String>) -> Response {
    perform(o, h, Operation::NodeVersions(node)).await
}
pub async fn node_diff(
    State(o): Shared,
    h: HeaderMap,
    Path(node): Path<String>,
    Query(query): Query<DiffQuery>,
) -> Response {
    perform(o, h, Operation::NodeDiff(node, query)).await
}
pub async fn set(State(o): Shared, h: HeaderMap, Json(request): Json<SetRequest>) -> Response {
    perform(o, h, Operation::Set(request)).await
}
pub async fn commit(State(o): Shared, h: HeaderMap, Json(r): Json<CommitRequest>) -> Response {
    perform(o, h, Operation::Commit(r)).await
}
pub async fn activate(State(o): Shared, h: HeaderMap, Json(r): Json<ActivateRequest>) -> Response {
    perform(o, h, Operation::Activate(r)).await
}
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(operation: Operation) -> Vec<String> {
        operation.argv().unwrap()
    }

    #[test]
    fn reads_ask_for_json_and_put_names_after_the_end_of_options() {
        assert_eq!(
            argv(Operation::Sites),
            ["list", "--format", "json", "sites"]
        );
        assert_eq!(
            argv(Operation::NodeAttributes("--help".into())),
            ["show_all", "--format", "json", "--origin", "node", "--", "--help"]
        );
        assert_eq!(
            argv(Operation::NodeStatus("r.s1".into())),
            ["status", "--format", "json", "node", "--", "r.s1"]
        );
    }

    #[test]
    fn writes_become_the_cli_commands_they_stand_for() {
        let set = |scope, target: Option<&str>, value| {
            Operation::Set(SetRequest {
                scope,
                target: target.map(str::to_string),
                attribute: "bird_bfd_interval_ms".into(),
                value,
            })
            .argv()
        };
        assert_eq!(
            set(ScopeKind::Node, Some("r.s1"), json!(200)).unwrap(),
            ["set", "node", "--", "r.s1", "bird_bfd_interval_ms", "200"]
        );
        assert_eq!(
            set(ScopeKind::Global, None, json!("-5")).unwrap(),
            ["set", "global", "--", "bird_bfd_interval_ms", "-5"]
        );
        assert_eq!(
            set(ScopeKind::Global, None, json!(["a", "b"])).unwrap(),
            [
                "set",
                "global",
                "--",
                "bird_bfd_interval_ms",
                "[\"a\", \"b\"]"
            ]
        );
        assert!(
            set(ScopeKind::Site, None, json!(1)).is_err(),
            "a site scope needs its site"
        );
        assert!(set(ScopeKind::Global, Some("x"), json!(1)).is_err());
        assert!(set(ScopeKind::All, None, json!(1)).is_err());
        assert!(set(ScopeKind::Global, None, json!(null)).is_err());
        let commit = Operation::Commit(CommitRequest {
            scope: ScopeKind::All,
            target: None,
            message: Some("--amend".into()),
        });
        assert_eq!(argv(commit), ["-m", "--amend", "commit", "all"]);
        let activate = Operation::Activate(ActivateRequest {
            scope: ScopeKind::Site,
            target: Some("s1".into()),
            version: Some(3),
            canary: Some("r.s1".into()),
            confirm: Some(120),
            timeout: Some(60),
            wait_blessed: true,
            no_wait: false,
        });
        assert_eq!(
            argv(activate),
            [
                "activate",
                "--canary",
                "r.s1",
                "--confirm",
                "120",
                "--timeout",
                "60",
                "--wait-blessed",
                "site",
                "--",
                "s1",
                "3"
            ]
        );
        // Every operation's arguments parse with tlm's own grammar.
        for operation in [
            Operation::Sites,
            Operation::Nodes,
            Operation::SiteNodes("s1".into()),
            Operation::Links,
            Operation::Changed,
            Operation::Status,
            Operation::NodeStatus("r.s1".into()),
            Operation::GlobalAttributes,
            Operation::SiteAttributes("s1".into()),
            Operation::NodeAttributes("r.s1".into()),
            Operation::NodeVersions("r.s1".into()),
            Operation::NodeDiff("r.s1".into(), DiffQuery::default()),
            Operation::NodeDiff(
                "r.s1".into(),
                DiffQuery {
                    from: Some(1),
                    to: Some(2),
                },
            ),
        ] {
            let mut full = vec!["tlm".to_string()];
            full.extend(argv(operation.clone()));
            crate::cli::Cli::try_parse_from(&full).unwrap_or_else(|e| panic!("{operation:?}: {e}"));
        }
    }

    #[test]
    fn tokens_are_required_and_read_only_ones_cannot_write() {
        let token = tokens::token_from(&[1; 32]);
        let reader = tokens::token_from(&[2; 32]);
        let all = tokens::Tokens {
            tokens: vec![
                tokens::TokenRecord {
                    name: "ops".into(),
                    sha256: tokens::hash(&token),
                    created: 0,
                    read_only: false,
                },
                tokens::TokenRecord {
                    name: "grafana".into(),
                    sha256: tokens::hash(&reader),
                    created: 0,
                    read_only: true,
                },
            ],
        };
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(authorize(Some(&bearer(&token)), &all, true).unwrap(), "ops");
        assert_eq!(
            authorize(Some(&bearer(&reader)), &all, false).unwrap(),
            "grafana"
        );
        assert_eq!(
            authorize(Some(&bearer(&reader)), &all, true)
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        for bad in [
            None,
            Some("Basic abc".to_string()),
            Some(bearer("tlo_nope")),
            Some(token.clone()),
        ] {
            assert_eq!(
                authorize(bad.as_deref(), &all, false).unwrap_err().status,
                StatusCode::UNAUTHORIZED,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_openapi_document_names_every_route() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths: Vec<&str> = document["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for route in super::super::operator::API_ROUTES {
            assert!(paths.contains(&route), "{route} is not in openapi.json");
        }
        assert_eq!(
            paths.len(),
            super::super::operator::API_ROUTES.len(),
            "{paths:?}"
        );
    }
}
