//! The device secret of `tlm attach`: a short pairing code the device shows on its console and
//! the operator types (or passes as `--code`). Only the device whose request carries the code
//! the operator entered gets the node's identity; a stranger who asks first gets nothing.
//!
//! Eight characters of Crockford's base32 (40 bits), shown as `XXXX-XXXX`; reading is lenient
//! (case, dashes and spaces ignored, `I`/`L` read as `1`, `O` as `0`).

use std::fmt;
use std::str::FromStr;

/// Crockford's base32: no I, L, O, U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in a code.
pub const LENGTH: usize = 8;

/// A pairing code, normalized.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode([u8; LENGTH]);

/// Why a text is not a pairing code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a pairing code (8 characters of 0-9 and A-Z without I, L, O, U, e.g. `7KQ2-M9XD`)")]
pub struct BadPairingCode(pub String);

impl PairingCode {
    /// A code from 5 random bytes (40 bits).
    pub fn from_random(bytes: [u8; 5]) -> PairingCode {
        let bits = bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let mut code = [0u8; LENGTH];
        for (i, c) in code.iter_mut().enumerate() {
            let shift = 5 * (LENGTH - 1 - i);
            *c = ALPHABET[((bits >> shift) & 31) as usize];
        }
        PairingCode(code)
    }

    /// Compares in constant time (a request's code against the operator's).
    pub fn matches(&self, other: &PairingCode) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// The normalized text without the dash (as sent in a request).
    pub fn as_compact(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl FromStr for PairingCode {
    type Err = BadPairingCode;

    fn from_str(text: &str) -> Result<PairingCode, BadPairingCode> {
        let bad = || {
            BadPairingCode(crate::printable::printable(
                &text.chars().take(32).collect::<String>(),
            ))
        };
        let mut code = [0u8; LENGTH];
        let mut n = 0;
        for c in text.chars() {
            let c = match c.to_ascii_uppercase() {
                '-' | ' ' => continue,
                'I' | 'L' => '1',
                'O' => '0',
                c => c,
            };
            if !c.is_ascii() || !ALPHABET.contains(&(c as u8)) || n == LENGTH {
                return Err(bad());
            }
            code[n] = c as u8;
            n += 1;
        }
        if n != LENGTH {
            return Err(bad());
        }
        Ok(PairingCode(code))
    }
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = String::from_utf8_lossy(&self.0);
        write!(f, "{}-{}", &text[..4], &text[4..])
    }
}

impl fmt::Debug for PairingCode {
    /// Never printed by accident (logs, errors): it is a secret until used.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairingCode([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_leniently_and_print_grouped() {
        let code: PairingCode = "7kq2-m9xd".parse().unwrap();
        assert_eq!(code.to_string(), "7KQ2-M9XD");
        assert_eq!(code.as_compact(), "7KQ2M9XD");
        assert!(code.matches(&"7KQ2 M9XD".parse().unwrap()));
        assert!(!code.matches(&"7KQ2-M9XE".parse().unwrap()));
        let confusable: PairingCode = "IL0O-1100".parse().unwrap();
        assert_eq!(confusable.to_string(), "1100-1100");
        assert_eq!(format!("{code:?}"), "PairingCode([redacted])");
    }

    #[test]
    fn malformed_codes_are_refused_with_the_text_escaped() {
        for text in [
            "",
            "7KQ2-M9X",
            "7KQ2-M9XD0",
            "7KQ2-M9XU",
            "7KQ2-M9X!",
            "ÄKQ2-M9XD",
        ] {
            assert!(text.parse::<PairingCode>().is_err(), "{text}");
        }
        let error = "\u{1b}[2J".parse::<PairingCode>().unwrap_err().to_string();
        assert!(!error.contains('\u{1b}'), "{error}");
    }

    #[test]
    fn random_codes_use_all_40_bits() {
        assert_eq!(PairingCode::from_random([0; 5]).to_string(), "0000-0000");
        assert_eq!(PairingCode::from_random([0xff; 5]).to_string(), "ZZZZ-ZZZZ");
        assert_eq!(
            PairingCode::from_random([0, 0, 0, 0, 1]).to_string(),
            "0000-0001"
        );
        assert_eq!(
            PairingCode::from_random([0x80, 0, 0, 0, 0]).to_string(),
            "G000-0000"
        );
    }
}
