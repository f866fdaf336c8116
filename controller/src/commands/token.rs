//! `tlm token add|list|revoke`: the operator API's bearer tokens ([`crate::store::tokens`]).
//! A new token is written to a file of the operator's choosing (0600, never printed), then
//! its hash is recorded; `tlm serve` takes the change with the next request.

use std::io::Write as _;
use std::path::Path;

use serde_json::json;

use crate::cli::output::{print_json, table};
use crate::cli::Format;
use crate::store::tokens::{self, TokenRecord};
use crate::store::Store;
use crate::Error;

/// Makes a token named `name`, writes it to `file` (which must not exist), records its hash.
pub fn add(
    store: &Store,
    name: &str,
    file: &Path,
    read_only: bool,
    out: &mut impl std::io::Write,
) -> Result<(), Error> {
    tokens::check_name(name)?;
    if store.contains(file) {
        return Err(Error::Token(format!(
            "--file {}: inside the configuration directory, whose files go into git; write the token elsewhere",
            file.display()
        )));
    }
    let mut all = tokens::load(store)?;
    if all.named(name).is_some() {
        return Err(Error::Token(format!(
            "a token named `{name}` exists: `tlm token revoke {name}` first, or choose another name"
        )));
    }
    let random: [u8; 32] = towalink_system::random::bytes(32)
        .map_err(|e| Error::Token(format!("cannot read random bytes: {e}")))?
        .try_into()
        .expect("32 bytes");
    let token = tokens::token_from(&random);
    // The file first: a token recorded but written nowhere would be useless, one written but
    // not recorded is refused by the API (and removed here when recording fails).
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut handle = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
            .map_err(|e| {
                Error::Token(format!("--file {}: cannot create it: {e}", file.display()))
            })?;
        handle
            .write_all(format!("{token}\n").as_bytes())
            .and_then(|()| handle.sync_all())
            .map_err(|e| {
                Error::Token(format!("--file {}: cannot write it: {e}", file.display()))
            })?;
    }
    all.tokens.push(TokenRecord {
        name: name.to_string(),
        sha256: tokens::hash(&token),
        created: crate::service::records::now_ms() / 1000,
        read_only,
    });
    if let Err(error) = tokens::save(store, &all) {
        let _ = std::fs::remove_file(file);
        return Err(error);
    }
    writeln!(
        out,
        "token `{name}` added ({}); it is in {} (mode 0600): send it as `Authorization: Bearer <token>`",
        if read_only { "read-only" } else { "read and write" },
        file.display()
    )
    .ok();
    Ok(())
}

/// Lists the tokens: name, access, created (never the tokens).
pub fn list(store: &Store, format: Format, out: &mut impl std::io::Write) -> Result<(), Error> {
    let all = tokens::load(store)?;
    let access = |t: &TokenRecord| {
        if t.read_only {
            "read-only"
        } else {
            "read-write"
        }
    };
    if format == Format::Json {
        let list: Vec<_> = all
            .tokens
            .iter()
            .map(|t| json!({"name": t.name, "access": access(t), "created": t.created}))
            .collect();
        print_json(out, &json!(list));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .tokens
        .iter()
        .map(|t| vec![t.name.clone(), access(t).to_string(), t.created.to_string()])
        .collect();
    table(out, &["NAME", "ACCESS", "CREATED (UNIX)"], &rows);
    Ok(())
}

/// Removes a token: the API refuses it from the next request on.
pub fn revoke(store: &Store, name: &str, out: &mut impl std::io::Write) -> Result<(), Error> {
    tokens::check_name(name)?;
    let mut all = tokens::load(store)?;
    let before = all.tokens.len();
    all.tokens.retain(|t| t.name != name);
    if all.tokens.len() == before {
        return Err(Error::Token(format!(
            "no token named `{name}` (`tlm token list` shows them)"
        )));
    }
    tokens::save(store, &all)?;
    writeln!(out, "token `{name}` revoked").ok();
    Ok(())
}
