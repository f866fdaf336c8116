//! The operator API's bearer tokens (`tlm token`): `certs/operator-tokens.toml` (0600, under
//! `certs/`, which never enters git), each token kept as its SHA-256 only, so the file does
//! not hand out access. A token is 32 random bytes (`tlo_` and base64url): hashing it once is
//! enough, no slow hash needed. Making, naming and checking are pure; [`load`] and [`save`]
//! read and write the file (save under the directory lock).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::Store;
use crate::Error;
use towalink_system::durable;

/// The tokens file, relative to the configuration directory.
pub const TOKENS_FILE: &str = "certs/operator-tokens.toml";

/// Every token starts with this (so a leaked one is recognisable in logs and scanners).
pub const TOKEN_PREFIX: &str = "tlo_";

/// One token as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Unix time it was made.
    pub created: u64,
    /// Reads only: every write is refused (403).
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenRecord>,
}

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A token from 32 random bytes. Pure.
pub fn token_from(random: &[u8; 32]) -> String {
    use base64::Engine as _;
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

/// A token's name: 1 to 32 of `a-z`, `0-9`, `-`, `_`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::Token(format!(
            "token name `{}`: use 1 to 32 of a-z, 0-9, '-', '_', starting with a letter or digit",
            towalink_bundle::printable::printable(name)
        )))
    }
}

impl Tokens {
    /// The record of a presented token, if it is one of these. Pure.
    pub fn find(&self, presented: &str) -> Option<&TokenRecord> {
        if !presented.starts_with(TOKEN_PREFIX) {
            return None;
        }
        let digest = hash(presented);
        self.tokens.iter().find(|t| t.sha256 == digest)
    }

    pub fn named(&self, name: &str) -> Option<&TokenRecord> {
        self.tokens.iter().find(|t| t.name == name)
    }
}

/// The tokens (none when the file does not exist).
pub fn load(store: &Store) -> Result<Tokens, Error> {
    let path = store.root().join(TOKENS_FILE);
    match durable::read_optional(&path)? {
        None => Ok(Tokens::default()),
        Some(text) => toml::from_str(&text).map_err(|e| Error::Corrupt {
            file: TOKENS_FILE.into(),
            message: e.message().to_string(),
        }),
    }
}

/// Replaces the tokens file (0600).
pub fn save(store: &Store, tokens: &Tokens) -> Result<(), Error> {
    let path = store.root().join(TOKENS_FILE);
    if let Some(dir) = path.parent() {
        durable::create_dir_all(dir)?;
    }
    let text = toml::to_string(tokens).expect("tokens serialize");
    durable::write_atomic(&path, text.as_bytes(), 0o600)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_found_by_its_hash_only() {
        let token = token_from(&[7; 32]);
        assert!(
            token.starts_with("tlo_") && token.len() == 4 + 43,
            "{token}"
        );
        let tokens = Tokens {
            tokens: vec![TokenRecord {
                name: "ci".into(),
                sha256: hash(&token),
                created: 1,
                read_only: true,
            }],
        };
        assert_eq!(tokens.find(&token).unwrap().name, "ci");
        assert!(tokens.find(&token_from(&[8; 32])).is_none());
        assert!(tokens.find(&hash(&token)).is_none(), "the hash is no token");
        assert!(tokens.find("").is_none());
        let text = toml::to_string(&tokens).unwrap();
        assert!(!text.contains(&token), "{text}");
        assert_eq!(toml::from_str::<Tokens>(&text).unwrap(), tokens);
    }

    #[test]
    fn token_names_are_short_plain_words() {
        for good in ["ci", "grafana-1", "a_b", "9x"] {
            check_name(good).unwrap();
        }
        for bad in ["", "-x", "CI", "a b", "x/y", &"a".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
