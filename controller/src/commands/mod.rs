//! What each `tlm` command does, one module per command, on top of [`crate::model`] (pure)
//! and [`crate::store`] (the directory). [`crate::cli`] holds the grammar; [`run`] dispatches.
//!
//! Reading commands (`list`, `show`, `show_all`, `status`) never hold the lock while templates
//! render and never need git; changing commands run under the directory's lock, after an
//! interrupted commit was finished, and only when no secret is about to enter git.

pub mod activate;
pub mod ansible;
pub mod attach;
pub mod commit;
pub mod diff;
pub mod edit;
pub mod git;
pub mod image;
pub mod list;
pub mod manual;
pub mod operate;
pub mod provision;
pub mod recovery;
pub mod rotate;
pub mod serve;
pub mod show;
pub mod status;
pub mod token;

use std::path::Path;
use std::process::ExitCode;

use crate::cli::{
    ActivateScope, AddWhat, AttachWhat, Cli, Command, DelWhat, DiffWhat, ListWhat, ProvisionWhat,
    RecoveryTarget, RecoveryWhat, RotateTarget, RotateWhat, Scope, SetWhat, ShowAllWhat, ShowWhat,
    TokenWhat,
};
use crate::model::allocation::NodeAllocation;
use crate::model::names::{NodeFullName, NodeRef, SiteName, VersionSpec};
use crate::store::{versions, Store, StoreLock};
use crate::Error;

/// Runs a parsed command, its output to stdout.
pub fn run(cli: Cli) -> Result<ExitCode, Error> {
    run_to(cli, &mut std::io::stdout().lock())
}

/// Runs a parsed command, its output (of the commands the operator API runs) to `out`.
pub fn run_to(cli: Cli, out: &mut impl std::io::Write) -> Result<ExitCode, Error> {
    let Cli {
        config_dir,
        message,
        command,
        ..
    } = cli;
    if let Command::Git { args } = &command {
        return git::run(&config_dir, args);
    }
    // Bad names are refused before the directory is opened (or created by a first command).
    check_arguments(&command)?;
    let mut out = out;
    match command {
        Command::Git { .. } => unreachable!("handled above"),
        Command::Serve {
            interface,
            operator_listen,
            no_operator,
        } => serve::run(
            &config_dir,
            &interface,
            (!no_operator).then_some(operator_listen),
        ),
        Command::Image { what } => image::run(&config_dir, &what),
        Command::Inventory { scope } => {
            let store = reading(&config_dir)?;
            ansible::print(&store, &scope.unwrap_or(Scope::All), &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ansible { scope } => {
            let store = reading(&config_dir)?;
            let (scope, args) = scope.split();
            ansible::run(&store, "ansible", &scope, &args)
        }
        Command::AnsiblePlaybook { scope } => {
            let store = reading(&config_dir)?;
            let (scope, args) = scope.split();
            ansible::run(&store, "ansible-playbook", &scope, &args)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "tlm", &mut out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let written = manual::write_pages(&dir)?;
            writeln!(out, "{written} manual page(s) written to {}", dir.display()).ok();
            Ok(ExitCode::SUCCESS)
        }
        Command::Recovery { what } => recovery::run(&config_dir, &what),
        Command::Status { scope, format } => {
            status::run(&config_dir, scope, format.format, &mut out)
        }
        Command::Attach {
            what: AttachWhat::Node { node },
            listen,
            collect,
            device,
            code,
            yes,
            timeout,
            san,
        } => attach::run(
            &config_dir,
            &node,
            listen,
            collect,
            device,
            code,
            yes,
            timeout,
            san,
        ),
        Command::List { what, format } => {
            let store = reading(&config_dir)?;
            list::run(&store, what, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff {
            what: DiffWhat::Node { node, from, to },
            format,
        } => {
            let store = reading(&config_dir)?;
            diff::run(&store, &node, from, to, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { what, format } => {
            let store = reading(&config_dir)?;
            show::show(&store, what, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ShowAll {
            what,
            origin,
            explain,
            format,
        } => {
            let store = reading(&config_dir)?;
            show::show_all(&store, what, origin, explain, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Add { what } => changing(&config_dir, |store, _lock| {
            edit::add(store, what, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Del { what } => changing(&config_dir, |store, _lock| {
            edit::del(store, what, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Set { what } => changing(&config_dir, |store, _lock| {
            edit::set(store, what).map(|()| ExitCode::SUCCESS)
        }),
        Command::Commit { scope } => changing(&config_dir, |store, _lock| {
            commit::run(store, scope, message, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Activate {
            scope,
            confirm,
            canary,
            timeout,
            wait_blessed,
            no_wait,
        } => changing(&config_dir, |store, lock| {
            let request = activate::ActivateRequest {
                scope,
                confirm,
                canary,
                timeout,
                wait_blessed,
                no_wait,
                message,
            };
            activate::run(store, lock, request, &mut out)
        }),
        Command::Provision {
            what: ProvisionWhat::Node { node, dir },
        } => changing(&config_dir, |store, _lock| {
            provision::run(store, &node, &dir, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Rotate {
            what:
                RotateWhat::RecoveryToken {
                    target: RotateTarget::Node { node },
                },
        } => changing(&config_dir, |store, _lock| {
            rotate::recovery_token(store, &node, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Rotate {
            what: RotateWhat::SigningKey { finish },
        } => changing(&config_dir, |store, _lock| {
            rotate::signing_key(store, finish, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Rotate {
            what: RotateWhat::Node { node },
        } => changing(&config_dir, |store, _lock| {
            rotate::node(store, &node, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Token {
            what:
                TokenWhat::Add {
                    name,
                    file,
                    read_only,
                },
        } => changing(&config_dir, |store, _lock| {
            token::add(store, &name, &file, read_only, &mut out).map(|()| ExitCode::SUCCESS)
        }),
        Command::Token {
            what: TokenWhat::List { format },
        } => {
            let store = reading(&config_dir)?;
            token::list(&store, format.format, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            what: TokenWhat::Revoke { name },
        } => changing(&config_dir, |store, _lock| {
            token::revoke(store, &name, &mut out).map(|()| ExitCode::SUCCESS)
        }),
    }
}

/// Opens (or makes) the directory for a reading command: finishes an interrupted commit under
/// the lock, then reads without it.
fn reading(config_dir: &Path) -> Result<Store, Error> {
    let store = Store::open_or_init(config_dir)?;
    drop_after_recovery(&store)?;
    Ok(store)
}

/// Runs a command that changes the directory, holding its lock (passed on: `activate` lets it
/// go before it waits for the nodes).
fn changing(
    config_dir: &Path,
    command: impl FnOnce(&Store, StoreLock) -> Result<ExitCode, Error>,
) -> Result<ExitCode, Error> {
    let store = Store::open_or_init(config_dir)?;
    let lock = store.lock()?;
    versions::recover(&store)?;
    // A secret about to enter git refuses any change before anything is written.
    crate::store::git::check_recorded_paths(store.root())?;
    let code = command(&store, lock)?;
    // `signing.pub` is rewritten from the signing key when missing or different (after the
    // command succeeded: a refused command writes nothing).
    versions::controller_public_key(&store)?;
    Ok(code)
}

/// Finishes an interrupted commit when possible; a reading command goes on without it (with
/// a warning) when that fails, e.g. because git cannot run.
fn recover_for_reading(store: &Store) {
    if let Err(e) = versions::recover(store) {
        tracing::warn!(
            "could not finish an interrupted commit ({e}); reading the directory as it is"
        );
    }
}

/// Takes the lock for recovery only: reading commands run without it.
fn drop_after_recovery(store: &Store) -> Result<(), Error> {
    let _lock = store.lock()?;
    recover_for_reading(store);
    Ok(())
}

/// Parses every name, node and version argument, so a refused command touches nothing.
fn check_arguments(command: &Command) -> Result<(), Error> {
    let site = |s: &str| parse_site(s).map(|_| ());
    let node = |s: &str| s.parse::<NodeRef>().map(|_| ()).map_err(Error::from);
    let version = |v: &Option<String>| parse_version(v).map(|_| ());
    match command {
        Command::Show {
            what: ShowWhat::Site { site: s },
            ..
        }
        | Command::ShowAll {
            what: ShowAllWhat::Site { site: s },
            ..
        }
        | Command::Add {
            what: AddWhat::Site { site: s },
        }
        | Command::Del {
            what: DelWhat::Site { site: s },
        }
        | Command::Set {
            what: SetWhat::Site { site: s, .. },
        }
        | Command::Commit {
            scope: Scope::Site { site: s },
        } => site(s),
        Command::Show {
            what: ShowWhat::Node { node: n },
            ..
        }
        | Command::ShowAll {
            what: ShowAllWhat::Node { node: n },
            ..
        }
        | Command::Del {
            what: DelWhat::Node { node: n },
        }
        | Command::Set {
            what: SetWhat::Node { node: n, .. },
        }
        | Command::Commit {
            scope: Scope::Node { node: n },
        }
        | Command::Provision {
            what: ProvisionWhat::Node { node: n, .. },
        }
        | Command::Rotate {
            what:
                RotateWhat::RecoveryToken {
                    target: RotateTarget::Node { node: n },
                },
        }
        | Command::Rotate {
            what: RotateWhat::Node { node: n },
        }
        | Command::Recovery {
            what:
                RecoveryWhat::Make {
                    target: RecoveryTarget::Node { node: n, .. },
                },
        } => node(n),
        Command::Add {
            what: AddWhat::Node { node: n },
        } => n.parse::<NodeFullName>().map(|_| ()).map_err(Error::from),
        Command::Activate {
            scope: ActivateScope::All { version: v },
            ..
        } => version(v),
        Command::Activate {
            scope:
                ActivateScope::Site {
                    site: s,
                    version: v,
                },
            ..
        } => site(s).and_then(|_| version(v)),
        Command::Activate {
            scope:
                ActivateScope::Node {
                    node: n,
                    version: v,
                },
            ..
        } => node(n).and_then(|_| version(v)),
        Command::List {
            what: ListWhat::Nodes { site: s },
            ..
        } if s != "all" => site(s),
        _ => Ok(()),
    }
}

pub(crate) fn parse_site(text: &str) -> Result<SiteName, Error> {
    Ok(text.parse()?)
}

pub(crate) fn parse_version(text: &Option<String>) -> Result<VersionSpec, Error> {
    match text {
        None => Ok(VersionSpec::Latest),
        Some(text) => Ok(text.parse().map_err(crate::model::names::NameError::from)?),
    }
}

/// Whether a node is in a command's scope.
pub(crate) type NodeFilter = Box<dyn Fn(&NodeAllocation) -> bool>;

pub(crate) fn scope_filter(
    generated: &crate::model::allocation::Generated,
    scope: &Scope,
) -> Result<NodeFilter, Error> {
    Ok(match scope {
        Scope::All => Box::new(|_| true),
        Scope::Site { site } => {
            let site = parse_site(site)?;
            generated.site(site.as_str())?;
            Box::new(move |n| n.site == site)
        }
        Scope::Node { node } => {
            let id = generated.node(&node.parse()?)?.id;
            Box::new(move |n| n.id == id)
        }
    })
}
