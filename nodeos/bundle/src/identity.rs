//! The identity files of a node state directory, the one description both writers use (`tlm`
//! provisioning a directory or an image, `towalink-node bootstrap` storing its grant): which
//! files, their modes, and their order: secrets first, `node.toml` last, so the presence of
//! `node.toml` means the identity is complete. Pure; the callers write them durably.

use crate::messages::NodeIdentity;

/// The identity directory, relative to the state directory (mode 0700).
pub const IDENTITY_DIR: &str = "identity";
/// The identity without secrets; written last.
pub const NODE_TOML: &str = "identity/node.toml";
/// The node's WireGuard private key (0600).
pub const WG_PRIVATE_KEY: &str = "identity/wg_private_key";
/// The node's recovery token (0600).
pub const RECOVERY_TOKEN: &str = "identity/recovery_token";
/// Private keys `tlm rotate node` sent after the identity was written, one file (0600) per
/// key, named by the hex of its public half.
pub const WG_KEYRING: &str = "identity/wg_keys";

/// One file to write: path relative to the state directory, content, mode.
#[derive(Debug)]
pub struct IdentityFile {
    pub path: &'static str,
    pub content: Vec<u8>,
    pub mode: u32,
}

/// The files of an identity, in the order they must be written.
pub fn identity_files(
    identity: &NodeIdentity,
    wg_private_key: &str,
    recovery_token: &str,
) -> Vec<IdentityFile> {
    let line = |text: &str| format!("{}\n", text.trim()).into_bytes();
    vec![
        IdentityFile {
            path: WG_PRIVATE_KEY,
            content: line(wg_private_key),
            mode: 0o600,
        },
        IdentityFile {
            path: RECOVERY_TOKEN,
            content: line(recovery_token),
            mode: 0o600,
        },
        IdentityFile {
            path: NODE_TOML,
            content: toml::to_string(identity)
                .expect("an identity always serializes")
                .into_bytes(),
            mode: 0o644,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_first_private_and_node_toml_last() {
        let identity = NodeIdentity {
            node_id: 3,
            site: "s".into(),
            node: "n".into(),
            controller_key: "c".into(),
            wg_public_key: "p".into(),
            management: None,
        };
        let files = identity_files(&identity, " key\n", "token");
        let order: Vec<_> = files.iter().map(|f| (f.path, f.mode)).collect();
        assert_eq!(
            order,
            [
                (WG_PRIVATE_KEY, 0o600),
                (RECOVERY_TOKEN, 0o600),
                (NODE_TOML, 0o644)
            ]
        );
        assert_eq!(files[0].content, b"key\n");
        let back: NodeIdentity =
            toml::from_str(std::str::from_utf8(&files[2].content).unwrap()).unwrap();
        assert_eq!(back, identity);
    }
}
