//! Attribute tables and the hierarchy: built-in defaults → global → site → node.
//!
//! Pure: tables in, merged table and the level that set each value out. Tables merge deeply
//! (a lower level adds keys to a higher level's table or replaces single keys); any other value
//! (string, number, bool, array) is replaced as a whole.

use std::collections::BTreeMap;
use std::fmt;

use toml::{Table, Value};

use crate::model::names::{NodeName, SiteName};

/// The built-in defaults. `tlm` writes this text as the first `config.toml`, and the same values
/// apply when an attribute is removed from every level.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../defaults/config.toml");

/// The built-in default attributes.
pub fn defaults() -> Table {
    // The text is part of the binary and covered by tests; failing to parse is a build defect.
    DEFAULT_CONFIG_TOML
        .parse()
        .expect("built-in defaults/config.toml is valid TOML")
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Default,
    Global,
    Site(SiteName),
    Node(SiteName, NodeName),
    /// Allocated by `tlm` (generated/config.toml) or derived from the topology.
    Generated,
}

impl Level {
    /// The file (relative to the configuration directory) that holds this level's attributes.
    pub fn file(&self) -> String {
        match self {
            Level::Default => "built-in default".to_string(),
            Level::Global => "config.toml".to_string(),
            Level::Site(site) => format!("site_{site}/config.toml"),
            Level::Node(site, node) => format!("site_{site}/node_{node}/config.toml"),
            Level::Generated => "generated/config.toml".to_string(),
        }
    }

    /// Short name for listings: default, global, site, node, generated.
    pub fn kind(&self) -> &'static str {
        match self {
            Level::Default => "default",
            Level::Global => "global",
            Level::Site(_) => "site",
            Level::Node(..) => "node",
            Level::Generated => "generated",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file())
    }
}

/// A merged attribute table with the level that set each leaf (dotted path).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Merged {
    pub values: Table,
    pub origins: BTreeMap<String, Level>,
}

impl Merged {
    /// Merges layers from highest (defaults) to lowest (node).
    pub fn from_layers<'a>(layers: impl IntoIterator<Item = (Level, &'a Table)>) -> Merged {
        let mut merged = Merged::default();
        for (level, table) in layers {
            merged.overlay(&level, table);
        }
        merged
    }

    /// Lays `table` over the current values.
    pub fn overlay(&mut self, level: &Level, table: &Table) {
        let mut path = Vec::new();
        merge_into(&mut self.values, table, level, &mut path, &mut self.origins);
    }

    /// Sets one top-level value (used for generated attributes).
    pub fn set(&mut self, key: &str, value: Value, level: Level) {
        let prefix = format!("{}.", dotted(&[key]));
        self.origins.retain(|k, _| !k.starts_with(&prefix));
        self.origins.insert(dotted(&[key]), level);
        self.values.insert(key.to_string(), value);
    }

    /// Where a top-level attribute (or any leaf under it) was set.
    pub fn origin(&self, key: &str) -> Option<&Level> {
        let name = dotted(&[key]);
        self.origins.get(&name).or_else(|| {
            let prefix = format!("{name}.");
            self.origins
                .iter()
                .find(|(k, _)| k.starts_with(&prefix))
                .map(|(_, l)| l)
        })
    }

    /// Where the value at a key path was set: the leaf itself, else any leaf under it, else
    /// the nearest enclosing value (a missing field belongs to the table that lacks it).
    pub fn origin_of_path<S: AsRef<str>>(&self, path: &[S]) -> Option<&Level> {
        (1..=path.len()).rev().find_map(|n| {
            let name = dotted(&path[..n]);
            let prefix = format!("{name}.");
            self.origins.get(&name).or_else(|| {
                self.origins
                    .iter()
                    .find(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, l)| l)
            })
        })
    }

    /// Flattened `(dotted path, value, origin)` for every leaf, sorted by path.
    pub fn leaves(&self) -> Vec<(String, Value, Level)> {
        let mut out = Vec::new();
        flatten(&self.values, &mut Vec::new(), &self.origins, &mut out);
        out
    }
}

fn merge_into(
    base: &mut Table,
    over: &Table,
    level: &Level,
    path: &mut Vec<String>,
    origins: &mut BTreeMap<String, Level>,
) {
    for (key, value) in over {
        path.push(key.clone());
        let name = dotted(path);
        match (base.get_mut(key), value) {
            (Some(Value::Table(existing)), Value::Table(incoming)) => {
                merge_into(existing, incoming, level, path, origins);
            }
            _ => {
                let prefix = format!("{name}.");
                origins.retain(|k, _| !k.starts_with(&prefix));
                origins.remove(&name);
                record_origins(value, path, level, origins);
                base.insert(key.clone(), value.clone());
            }
        }
        path.pop();
    }
}

fn record_origins(
    value: &Value,
    path: &mut Vec<String>,
    level: &Level,
    origins: &mut BTreeMap<String, Level>,
) {
    match value {
        Value::Table(table) if !table.is_empty() => {
            for (key, inner) in table {
                path.push(key.clone());
                record_origins(inner, path, level, origins);
                path.pop();
            }
        }
        _ => {
            origins.insert(dotted(path), level.clone());
        }
    }
}

fn flatten(
    table: &Table,
    path: &mut Vec<String>,
    origins: &BTreeMap<String, Level>,
    out: &mut Vec<(String, Value, Level)>,
) {
    for (key, value) in table {
        path.push(key.clone());
        match value {
            Value::Table(inner) if !inner.is_empty() => flatten(inner, path, origins, out),
            _ => {
                let name = dotted(path);
                let level = origins.get(&name).cloned().unwrap_or(Level::Default);
                out.push((name, value.clone(), level));
            }
        }
        path.pop();
    }
}

/// Formats a key path the way TOML writes dotted keys, quoting segments that need it.
pub fn dotted<S: AsRef<str>>(path: &[S]) -> String {
    path.iter()
        .map(|segment| {
            let s = segment.as_ref();
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                s.to_string()
            } else {
                format!("{s:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Why an attribute name or value given on the command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributeInputError {
    #[error("invalid attribute name `{0}`: use letters, digits, '_' and '-', with '.' between table keys")]
    Name(String),
    #[error("invalid value for `{attribute}`: {message}")]
    Value { attribute: String, message: String },
}

/// Splits and checks an attribute path such as `wg_keepalive` or `services.bird.reload`.
pub fn parse_attribute_path(name: &str) -> Result<Vec<String>, AttributeInputError> {
    let segments: Vec<String> = name.split('.').map(str::to_string).collect();
    let ok = segments.iter().all(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    if ok {
        Ok(segments)
    } else {
        Err(AttributeInputError::Name(name.to_string()))
    }
}

/// Parses a value from the command line as TOML (`25`, `true`, `'[ "hubs" ]'`, `"text"`).
/// A bare word that is not TOML (`berlin`, `10.0.0.1`, `host.example.net`) is taken as a string.
pub fn parse_value(attribute: &str, text: &str) -> Result<Value, AttributeInputError> {
    let document = format!("value = {text}");
    match document.parse::<Table>() {
        Ok(mut table) => table
            .remove("value")
            .ok_or_else(|| AttributeInputError::Value {
                attribute: attribute.to_string(),
                message: "no value".to_string(),
            }),
        Err(error) => {
            let bare = !text.is_empty()
                && !text.contains(['"', '\'', '[', ']', '{', '}', '=', '\n', '#'])
                && !text.starts_with(char::is_whitespace)
                && !text.ends_with(char::is_whitespace);
            if bare {
                Ok(Value::String(text.to_string()))
            } else {
                let message = error.message().trim().replace('\n', " ");
                Err(AttributeInputError::Value {
                    attribute: attribute.to_string(),
                    message: format!("not a TOML value ({message})"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn lower_level_replaces_scalars_and_extends_tables() {
        let global = table("a = 1\nb = [1, 2]\n[t]\nx = 1\ny = 2\n");
        let site = table("b = [3]\n[t]\ny = 20\nz = 30\n");
        let node = table("a = 100\n");
        let site_level = Level::Site("s".parse().unwrap());
        let node_level = Level::Node("s".parse().unwrap(), "n".parse().unwrap());
        let merged = Merged::from_layers([
            (Level::Global, &global),
            (site_level.clone(), &site),
            (node_level.clone(), &node),
        ]);
        assert_eq!(
            merged.values,
            table("a = 100\nb = [3]\n[t]\nx = 1\ny = 20\nz = 30\n")
        );
        assert_eq!(merged.origins["a"], node_level);
        assert_eq!(merged.origins["b"], site_level);
        assert_eq!(merged.origins["t.x"], Level::Global);
        assert_eq!(merged.origins["t.y"], site_level);
        assert_eq!(merged.origin("t"), Some(&Level::Global));
    }

    #[test]
    fn scalar_replacing_table_drops_old_origins() {
        let global = table("[t]\nx = 1\n");
        let node = table("t = 5\n");
        let merged = Merged::from_layers([(Level::Global, &global), (Level::Default, &node)]);
        assert_eq!(merged.values["t"], Value::Integer(5));
        assert!(!merged.origins.contains_key("t.x"));
    }

    #[test]
    fn values_parse_as_toml_with_bare_word_fallback() {
        assert_eq!(parse_value("a", "25").unwrap(), Value::Integer(25));
        assert_eq!(
            parse_value("a", r#"[ "hubs" ]"#).unwrap(),
            Value::Array(vec![Value::String("hubs".into())])
        );
        assert_eq!(
            parse_value("a", "10.0.0.1").unwrap(),
            Value::String("10.0.0.1".into())
        );
        assert_eq!(
            parse_value("a", "berlin").unwrap(),
            Value::String("berlin".into())
        );
        assert!(parse_value("a", "[1, ").is_err());
        assert!(parse_value("a", "\"open").is_err());
    }

    #[test]
    fn dotted_quotes_when_needed() {
        assert_eq!(dotted(&["a", "b*.conf", "c"]), r#"a."b*.conf".c"#);
    }

    #[test]
    fn defaults_parse() {
        let d = defaults();
        assert_eq!(d["topology"].as_str(), Some("mesh"));
    }
}
