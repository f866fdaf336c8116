//! `tlm activate`: record the version each node in scope runs, then wait for the nodes to take it (or bless it), canary first when asked.

use std::process::ExitCode;

use super::{parse_version, scope_filter};
use crate::cli::{ActivateScope, Scope};
use crate::commands::operate;
use crate::model::allocation::NodeAllocation;
use crate::model::names::NodeRef;
use crate::store::{versions, Store, StoreLock};
use crate::Error;

/// What `tlm activate` was asked.
pub struct ActivateRequest {
    pub scope: ActivateScope,
    pub confirm: Option<u64>,
    pub canary: Option<String>,
    pub timeout: u64,
    pub wait_blessed: bool,
    pub no_wait: bool,
    pub message: Option<String>,
}

/// Records the activation (holding `lock`, released before waiting) and reports the outcome.
pub fn run(
    store: &Store,
    lock: StoreLock,
    request: ActivateRequest,
    out: &mut impl std::io::Write,
) -> Result<ExitCode, Error> {
    let store = store.clone();
    let mut out = out;
    let ActivateRequest {
        scope,
        confirm,
        canary,
        timeout,
        wait_blessed,
        no_wait,
        message,
    } = request;
    let tree = store.load_tree()?;
    let (filter, spec, words) = match &scope {
        ActivateScope::All { version } => (
            scope_filter(&tree.generated, &Scope::All)?,
            parse_version(version)?,
            "all".to_string(),
        ),
        ActivateScope::Site { site, version } => (
            scope_filter(&tree.generated, &Scope::Site { site: site.clone() })?,
            parse_version(version)?,
            format!("site {site}"),
        ),
        ActivateScope::Node { node, version } => (
            scope_filter(&tree.generated, &Scope::Node { node: node.clone() })?,
            parse_version(version)?,
            format!("node {node}"),
        ),
    };
    let nodes = versions::nodes_in_scope(&tree, filter);
    let message = message.unwrap_or_else(|| format!("tlm activate {words} {spec}"));
    let service = crate::service::records::running_service(&store);
    let (first, rest): (Vec<&NodeAllocation>, Vec<&NodeAllocation>) = match &canary {
        None => (nodes, Vec::new()),
        Some(c) => {
            if service.is_none() {
                return Err(Error::Service(
                    "--canary needs the controller service running (`tlm serve`): it waits for the canary to bless".into(),
                ));
            }
            let (canaries, rest): (Vec<_>, Vec<_>) =
                nodes.into_iter().partition(|n| canary_matches(c, n));
            if canaries.is_empty() {
                return Err(Error::Service(format!(
                    "--canary `{c}` matches no node in the scope of this activation"
                )));
            }
            (canaries, rest)
        }
    };
    let timeout = std::time::Duration::from_secs(timeout);
    let recorded = versions::activate(&store, &first, spec, confirm, &message)?;
    drop(lock);
    print_recorded(&recorded, &mut out);
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    if service.is_none() {
        eprintln!("the controller service is not running: recorded; the nodes take it when `tlm serve` runs");
        return Ok(ExitCode::SUCCESS);
    }
    let until_blessed = wait_blessed || canary.is_some();
    let ok = report_outcomes(&store, &recorded, until_blessed, timeout, &mut out);
    if let Some(c) = &canary {
        if !ok {
            writeln!(
                out,
                "stopped: canary `{c}` did not bless the version; {} other node(s) keep their version",
                rest.len()
            )
            .ok();
            return Ok(ExitCode::FAILURE);
        }
        if rest.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        writeln!(
            out,
            "canary `{c}` blessed the version; activating the other {} node(s)",
            rest.len()
        )
        .ok();
        let recorded = {
            let _lock = store.lock()?;
            versions::activate(&store, &rest, spec, confirm, &message)?
        };
        print_recorded(&recorded, &mut out);
        if !report_outcomes(&store, &recorded, wait_blessed, timeout, &mut out) {
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !ok {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn canary_matches(canary: &str, node: &NodeAllocation) -> bool {
    match canary.parse::<NodeRef>() {
        Ok(NodeRef::Id(id)) => node.id == id,
        Ok(NodeRef::Name(full)) => full == node.full_name(),
        Err(_) => node.site.as_str() == canary,
    }
}

fn print_recorded(recorded: &[versions::Recorded], out: &mut impl std::io::Write) {
    for r in recorded {
        let version = r.activation.version;
        match r.previous {
            Some(p) if p != version => writeln!(out, "{}: v{version} (was v{p})", r.node),
            Some(_) => writeln!(out, "{}: v{version} (unchanged)", r.node),
            None => writeln!(out, "{}: v{version}", r.node),
        }
        .ok();
    }
}

/// Waits for the nodes and prints each one's outcome; true when all succeeded.
fn report_outcomes(
    store: &Store,
    recorded: &[versions::Recorded],
    until_blessed: bool,
    timeout: std::time::Duration,
    out: &mut impl std::io::Write,
) -> bool {
    let targets: Vec<operate::Target> = recorded
        .iter()
        .map(|r| operate::Target {
            node: r.node.clone(),
            version: r.activation.version,
            order: r.activation.order,
        })
        .collect();
    let started = std::time::Instant::now();
    let outcomes = operate::wait(store, &targets, until_blessed, timeout);
    let elapsed = started.elapsed().as_secs_f64();
    let mut ok = true;
    for (target, outcome) in targets.iter().zip(&outcomes) {
        ok &= outcome.success(until_blessed);
        writeln!(
            out,
            "{}: v{} {}",
            target.node,
            target.version,
            outcome.word()
        )
        .ok();
    }
    let done = outcomes.iter().filter(|o| o.success(until_blessed)).count();
    writeln!(
        out,
        "{done} of {} node(s) {} in {elapsed:.2} s",
        targets.len(),
        if until_blessed {
            "blessed the version"
        } else {
            "took the version"
        }
    )
    .ok();
    ok
}
