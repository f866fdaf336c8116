//! System plumbing shared by the controller, the node daemon and the image builder, so each
//! of these exists once: the durable write (temp file, fsync, rename, fsync directory), the
//! 0600 secret file, the whole-filesystem sync, the exclusive lock file, running a program with
//! the tail of its stderr in the error, random bytes from the kernel, and the stop signal of
//! the long-running programs (a [`Shutdown`] triggered by SIGTERM/SIGINT).

pub mod durable;
pub mod lock;
pub mod program;
pub mod random;
pub mod shutdown;

pub use durable::{IoError, Secret};
pub use shutdown::{stop_on_signals, Shutdown};
