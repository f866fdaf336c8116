//! System plumbing shared by the controller, the node daemon and the image builder, so each
//! of these exists once: the durable write (temp file, fsync, rename, fsync directory), the
//! 0600 secret file, the whole-filesystem sync, the exclusive lock file, running a program with
//! the tail of its stderr in the error, and random bytes from the kernel.

pub mod durable;
pub mod lock;
pub mod program;
pub mod random;

pub use durable::{IoError, Secret};
