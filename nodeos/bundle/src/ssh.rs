//! `node_ssh_authorized_keys`: OpenSSH public key lines the node's management sshd accepts
//! (Ansible over the management link). One check for both sides: `tlm set` refuses a bad line
//! where it is typed, and a node skips one that reaches it anyway.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// The key types accepted (what OpenSSH's `ssh-keygen -t` makes).
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Longest line accepted (an RSA 16384-bit key is about 2.8 KB).
const MAX_LINE: usize = 8192;

/// Checks one `authorized_keys` line: `<type> <base64 key> [comment]`, the key's own type
/// inside the blob matching the first word. Options (`command="…" ssh-ed25519 …`) are refused:
/// the node writes the lines as they are. The error says what is wrong, in a few words.
pub fn check_public_key(line: &str) -> Result<(), String> {
    if line.len() > MAX_LINE {
        return Err(format!("longer than {MAX_LINE} bytes"));
    }
    if line.chars().any(|c| c.is_control()) {
        return Err("has a control character (one key per list item)".into());
    }
    let mut words = line.split_whitespace();
    let kind = words.next().ok_or("is empty")?;
    if !KEY_TYPES.contains(&kind) {
        return Err(format!(
            "starts with `{}`, not a key type ({}); options before the key are not allowed",
            kind.chars().take(40).collect::<String>(),
            KEY_TYPES.join(", ")
        ));
    }
    let blob = words.next().ok_or("has no key after its type")?;
    let bytes = BASE64
        .decode(blob)
        .map_err(|_| "has a key that is not base64".to_string())?;
    let inner = bytes
        .get(..4)
        .map(|n| u32::from_be_bytes(n.try_into().expect("4 bytes")) as usize)
        .and_then(|n| bytes.get(4..n.checked_add(4)?))
        .ok_or("has a truncated key")?;
    if inner != kind.as_bytes() {
        return Err(format!(
            "says `{kind}` but holds a `{}` key",
            String::from_utf8_lossy(inner)
        ));
    }
    if bytes.len() < 4 + inner.len() + 16 {
        return Err("has a truncated key".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqJ5Ql0nU7G0C5oCaVb2NOdU7I4Ux3cYJxG6qkV3T6P ops@example";

    #[test]
    fn openssh_public_keys_pass_with_or_without_comment() {
        check_public_key(ED25519).unwrap();
        check_public_key(ED25519.rsplit_once(' ').unwrap().0).unwrap();
    }

    #[test]
    fn bad_lines_are_refused_saying_why() {
        let e = |line: &str| check_public_key(line).unwrap_err();
        assert!(e("").contains("empty"));
        assert!(e("ssh-ed25519").contains("no key"));
        assert!(e("ssh-dss AAAA").contains("not a key type"));
        assert!(e(&format!("command=\"rm -rf /\" {ED25519}")).contains("options"));
        assert!(e("ssh-ed25519 !!!").contains("not base64"));
        assert!(
            e("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIKqJ5Ql0nU7G0C5oCaVb2NOdU7I4Ux3cYJxG6qkV3T6P")
                .contains("holds a `ssh-ed25519` key")
        );
        assert!(e("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5").contains("truncated"));
        assert!(e(&format!("{ED25519}\nssh-ed25519 AAAA")).contains("control character"));
    }
}
