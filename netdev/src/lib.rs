//! `towalink-netdev`: the network devices Towalink drives, for the node daemon and the
//! controller's management hub alike.
//!
//! - [`wireguard`]: the [`WireGuard`] trait over one point-to-point link per peer, and
//!   [`Boringtun`], userspace WireGuard in this process configured over the WireGuard UAPI
//!   ([`Uapi`], [`boringtun_device`]).
//! - [`batched`]: [`Batched`], userspace WireGuard of our own on boringtun's protocol: batched
//!   socket I/O and the TUN's segmentation offloads (the node's default without the kernel
//!   module).
//! - [`kernel`]: [`KernelWireGuard`], the kernel's WireGuard through rtnetlink and the
//!   `wireguard` generic-netlink family.
//! - [`netlink`]: addresses, MTU, link state, loopbacks and the management route pin through
//!   rtnetlink (never by spawning `ip`).
//!
//! It knows nothing of versions, bundles or the controller: callers say what a link should be.

pub mod batched;
pub mod kernel;
pub mod netlink;
pub mod wireguard;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

pub use batched::Batched;
pub use kernel::KernelWireGuard;
pub use wireguard::{
    boringtun_device, Boringtun, Ensured, LinkStats, Uapi, WireGuard, WireGuardLink,
};

/// Prefix of the interfaces Towalink owns; anything else is never touched.
pub const INTERFACE_PREFIX: &str = "tlwg";
/// MTU of the management link (the same on the node's and the controller's end).
pub const MANAGEMENT_MTU: u32 = 1420;

/// What went wrong with a network device. Each message names the link or the operation and
/// carries the system's reason in its text (there is no separate source to print again).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key that is not a base64 WireGuard key; `what` names where it came from.
    #[error("{what} is not a base64 WireGuard key")]
    Key { what: String },
    /// Creating, configuring or reading a WireGuard link failed.
    #[error("{0}")]
    WireGuard(String),
    /// An rtnetlink or generic-netlink operation failed.
    #[error("{0}")]
    Netlink(String),
    /// The kernel has no WireGuard (no `wireguard` generic-netlink family).
    #[error("kernel WireGuard is not available (no `wireguard` netlink family: is the module loaded?): {0}")]
    KernelUnavailable(String),
}

/// A base64 WireGuard key as the hex the UAPI wants; `what` names it in the error.
pub fn key_hex(base64_key: &str, what: &str) -> Result<String, Error> {
    let bytes = BASE64
        .decode(base64_key.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| Error::Key {
            what: what.to_string(),
        })?;
    Ok(hex::encode(bytes))
}

/// The public half (base64) of a WireGuard private key (base64).
pub fn public_key_of(private_base64: &str, what: &str) -> Result<String, Error> {
    let bytes: [u8; 32] = BASE64
        .decode(private_base64.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Key {
            what: what.to_string(),
        })?;
    let secret = boringtun::x25519::StaticSecret::from(bytes);
    Ok(BASE64.encode(boringtun::x25519::PublicKey::from(&secret).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_hex_and_bad_keys_are_named() {
        let hex = key_hex("v5baw1MF/aRJotly6e3ndIUEduDrJVE2qcnFlIYrbG8=", "peer key").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("bf96dac3"), "{hex}");
        let error = key_hex("c2hvcnQ=", "identity/wg_private_key").unwrap_err();
        assert_eq!(
            error.to_string(),
            "identity/wg_private_key is not a base64 WireGuard key"
        );
        assert!(key_hex("not base64!", "k").is_err());
    }
}
