//! Validated names: one `FromStr` each, used by the CLI and the store alike, so a bad name gets
//! the same message everywhere.

use std::fmt;
use std::str::FromStr;

/// Why a name or reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid {kind} name `{name}`: use 1 to 31 characters a-z, 0-9 and '-', starting with a letter or digit")]
    Invalid { kind: &'static str, name: String },
    #[error("site name `{0}` is reserved: `all` and names of digits only would be ambiguous in commands")]
    Reserved(String),
    #[error("invalid node `{0}`: use <node>.<site> (e.g. primary.berlin) or a numeric node id")]
    NodeRef(String),
    #[error(transparent)]
    Version(#[from] towalink_bundle::args::InvalidVersion),
}

fn check_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 31
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid {
            kind,
            name: name.to_string(),
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $type:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $type(String);

        impl $type {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $type {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                check_name($kind, s)?;
                if $kind == "site" && (s == "all" || s.bytes().all(|b| b.is_ascii_digit())) {
                    return Err(NameError::Reserved(s.to_string()));
                }
                Ok(Self(s.to_string()))
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A site name: `[a-z0-9][a-z0-9-]{0,30}`.
    SiteName,
    "site"
);
name_type!(
    /// A node name within its site: `[a-z0-9][a-z0-9-]{0,30}`.
    NodeName,
    "node"
);

/// A node's full name, `<node>.<site>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeFullName {
    pub site: SiteName,
    pub node: NodeName,
}

impl fmt::Display for NodeFullName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node, self.site)
    }
}

impl FromStr for NodeFullName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (node, site) = s
            .split_once('.')
            .ok_or_else(|| NameError::NodeRef(s.to_string()))?;
        Ok(Self {
            node: node.parse()?,
            site: site.parse()?,
        })
    }
}

/// How a user names a node: `<node>.<site>` or its numeric id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRef {
    Id(u32),
    Name(NodeFullName),
}

impl FromStr for NodeRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(NodeRef::Id)
                .map_err(|_| NameError::NodeRef(s.to_string()));
        }
        if !s.contains('.') {
            return Err(NameError::NodeRef(s.to_string()));
        }
        s.parse().map(NodeRef::Name)
    }
}

impl fmt::Display for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeRef::Id(id) => write!(f, "{id}"),
            NodeRef::Name(name) => write!(f, "{name}"),
        }
    }
}

/// Which version to activate: a number or the latest committed one (shared with the node).
pub use towalink_bundle::args::VersionSpec;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!("mysite1".parse::<SiteName>().is_ok());
        assert!("a-b".parse::<SiteName>().is_ok());
        for bad in ["", "-a", "A", "a_b", "a.b", &"x".repeat(32), "all", "15"] {
            assert!(bad.parse::<SiteName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn node_refs() {
        assert_eq!("15".parse::<NodeRef>().unwrap(), NodeRef::Id(15));
        let NodeRef::Name(name) = "primary.mysite1".parse::<NodeRef>().unwrap() else {
            panic!()
        };
        assert_eq!(name.to_string(), "primary.mysite1");
        assert!("primary".parse::<NodeRef>().is_err());
        assert!("a.b.c".parse::<NodeRef>().is_err());
        assert!("99999999999".parse::<NodeRef>().is_err());
    }
}
