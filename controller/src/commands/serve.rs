//! `tlm serve`: the controller service until SIGTERM/SIGINT (see [`crate::service`]).

use std::process::ExitCode;

use towalink_system::Shutdown;

use crate::store::Store;
use crate::Error;

/// Runs the service on `interface` until a stop signal.
pub fn run(
    config_dir: &std::path::Path,
    interface: &str,
    operator_listen: Option<std::net::SocketAddr>,
) -> Result<ExitCode, Error> {
    let store = Store::open_existing(config_dir)?;
    {
        let _lock = store.lock()?;
        super::recover_for_reading(&store);
        store.ensure_gitignore()?;
    }
    // Before any thread starts: they inherit the blocked signals.
    let shutdown =
        Shutdown::new().map_err(|e| Error::Service(format!("cannot make the stop signal: {e}")))?;
    towalink_system::stop_on_signals(
        &shutdown,
        "stopping: no new connections, the ones in flight finish",
    )
    .map_err(|e| Error::Service(format!("cannot set up SIGTERM/SIGINT handling: {e}")))?;
    crate::service::run(&store, interface, operator_listen, &shutdown)?;
    Ok(ExitCode::SUCCESS)
}
