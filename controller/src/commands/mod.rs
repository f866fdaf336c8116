//! What each `tlm` command does, one module per command, on top of [`crate::model`] and
//! [`crate::store`]. [`crate::cli`] parses arguments and dispatches here.

pub mod attach;
pub mod image;
pub mod operate;
