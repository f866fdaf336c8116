//! The Prometheus text exposition format (version 0.0.4), pure: no sockets, no clock.
//!
//! - [`Exposition`] writes one: each family's `# HELP` and `# TYPE` lines, then its samples,
//!   label values and help text escaped as the format says.
//! - [`Relay`] merges the expositions of many nodes into one, each sample under a label of the
//!   relay's own (`node="r.s1"`), each family once, its samples together (the format wants a
//!   family's lines in one group). What a node sent is checked line by line, since a node is
//!   not trusted to write the controller's scrape: a line that is not a well-formed sample of
//!   an accepted name, or that carries the relay's label itself, is dropped and counted.

use std::collections::HashMap;
use std::fmt::Write as _;

/// The `Content-Type` of an exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// An exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
    /// The family the next samples belong to.
    family: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its help and type; its samples follow ([`Exposition::sample`]).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Exposition {
        debug_assert!(valid_name(name), "metric name {name:?}");
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.word());
        self.family = name.to_string();
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Exposition {
        self.text.push_str(&self.family);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                debug_assert!(valid_label_name(name), "label name {name:?}");
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{name}=\"{}\"", escape_label_value(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", value_text(value));
        self
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// A label value as the format writes it: backslash, double quote and line feed escaped.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn value_text(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        // Rust prints floats without an exponent and integers without a fraction.
        format!("{value}")
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample line taken apart: name, the label names, the text between the braces (already
/// well escaped), the value and timestamp as written.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    label_names: Vec<&'a str>,
    labels: &'a str,
    rest: &'a str,
}

/// Parses a sample line strictly; `None` when it is not one.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_name(name) {
        return None;
    }
    let mut label_names = Vec::new();
    let (labels, after) = if line[name_end..].starts_with('{') {
        let body_start = name_end + 1;
        let bytes = line.as_bytes();
        let mut i = body_start;
        loop {
            if bytes.get(i) == Some(&b'}') {
                break;
            }
            let name_start = i;
            while bytes
                .get(i)
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
            {
                i += 1;
            }
            let label = &line[name_start..i];
            if !valid_label_name(label) || bytes.get(i) != Some(&b'=') {
                return None;
            }
            label_names.push(label);
            i += 1;
            if bytes.get(i) != Some(&b'"') {
                return None;
            }
            i += 1;
            loop {
                match bytes.get(i)? {
                    b'\\' => {
                        if !matches!(bytes.get(i + 1)?, b'\\' | b'"' | b'n') {
                            return None;
                        }
                        i += 2;
                    }
                    b'"' => break,
                    b'\n' => return None,
                    _ => i += 1,
                }
            }
            i += 1;
            match bytes.get(i)? {
                b',' => i += 1,
                b'}' => {}
                _ => return None,
            }
        }
        (&line[body_start..i], &line[i + 1..])
    } else {
        ("", &line[name_end..])
    };
    let rest = after.strip_prefix(' ')?.trim();
    let mut fields = rest.split(' ');
    let value = fields.next()?;
    let value_ok = matches!(value, "NaN" | "+Inf" | "-Inf") || value.parse::<f64>().is_ok();
    let timestamp_ok = fields.next().is_none_or(|t| t.parse::<i64>().is_ok());
    (value_ok && timestamp_ok && fields.next().is_none()).then_some(Sample {
        name,
        label_names,
        labels: labels.trim_end_matches(','),
        rest,
    })
}

#[derive(Debug)]
struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Many expositions merged into one, each sample under the relay's label ([`Relay::add`]).
#[derive(Debug)]
pub struct Relay {
    label: String,
    families: Vec<Family>,
    index: HashMap<String, usize>,
}

impl Relay {
    /// A relay that puts every sample under `label` (a valid label name).
    pub fn new(label: &str) -> Relay {
        debug_assert!(valid_label_name(label));
        Relay {
            label: label.to_string(),
            families: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn family(&mut self, name: &str) -> &mut Family {
        let next = self.families.len();
        let at = *self.index.entry(name.to_string()).or_insert(next);
        if at == next {
            self.families.push(Family {
                name: name.to_string(),
                help: None,
                kind: None,
                samples: Vec::new(),
            });
        }
        &mut self.families[at]
    }

    /// Adds one exposition, its samples labelled `label="value"`; only families whose name
    /// `accept` takes. Returns how many lines were dropped (malformed, not accepted, carrying
    /// the relay's label, or of a family a previous exposition typed differently).
    pub fn add(&mut self, exposition: &str, value: &str, accept: impl Fn(&str) -> bool) -> usize {
        let value = escape_label_value(value);
        let mut dropped = 0;
        // The family the last HELP or TYPE line named, and whether this exposition's type of
        // it agrees with the one already merged.
        let mut current: Option<(String, bool)> = None;
        for line in exposition.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                let (keyword, name, text) = (words.next(), words.next(), words.next());
                let (Some(keyword @ ("HELP" | "TYPE")), Some(name)) = (keyword, name) else {
                    continue; // another comment
                };
                if !valid_name(name) || !accept(name) {
                    dropped += 1;
                    current = None;
                    continue;
                }
                let text = text.unwrap_or("").to_string();
                let family = self.family(name);
                let agrees = if keyword == "HELP" {
                    family.help.get_or_insert(text);
                    current
                        .as_ref()
                        .filter(|(n, _)| n == name)
                        .is_none_or(|(_, ok)| *ok)
                } else if !matches!(
                    text.as_str(),
                    "counter" | "gauge" | "untyped" | "histogram" | "summary"
                ) {
                    false
                } else {
                    family.kind.get_or_insert_with(|| text.clone()) == &text
                };
                dropped += usize::from(!agrees && keyword == "TYPE");
                current = Some((name.to_string(), agrees));
                continue;
            }
            let Some(sample) = parse_sample(line) else {
                dropped += 1;
                continue;
            };
            // A sample belongs to the family named before it when its name is that family's
            // (or a histogram's or summary's series of it); else to a family of its own name.
            let family_name = match &current {
                Some((family, ok))
                    if sample.name == family
                        || sample
                            .name
                            .strip_prefix(family.as_str())
                            .is_some_and(|s| matches!(s, "_bucket" | "_sum" | "_count")) =>
                {
                    if !ok {
                        dropped += 1;
                        continue;
                    }
                    family.clone()
                }
                _ => sample.name.to_string(),
            };
            if !accept(&family_name) || sample.label_names.contains(&self.label.as_str()) {
                dropped += 1;
                continue;
            }
            let mut text = format!("{}{{{}=\"{value}\"", sample.name, self.label);
            if !sample.labels.is_empty() {
                text.push(',');
                text.push_str(sample.labels);
            }
            text.push_str("} ");
            text.push_str(sample.rest);
            self.family(&family_name).samples.push(text);
        }
        dropped
    }

    /// The merged exposition: each family's help, type and samples together.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for family in self.families {
            if family.samples.is_empty() {
                continue;
            }
            if let Some(help) = &family.help {
                let _ = writeln!(out, "# HELP {} {help}", family.name);
            }
            if let Some(kind) = &family.kind {
                let _ = writeln!(out, "# TYPE {} {kind}", family.name);
            }
            for sample in &family.samples {
                out.push_str(sample);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exposition_writes_help_type_and_escaped_samples() {
        let mut e = Exposition::new();
        e.family(
            "towalink_wireguard_receive_bytes_total",
            Kind::Counter,
            "Bytes received.\nOn a link.",
        )
        .sample(&[("interface", "tlwg2")], 1_234_567_890.0)
        .sample(&[("interface", "a\"b\\c\nd")], 0.5);
        e.family("towalink_up", Kind::Gauge, "Up.")
            .sample(&[], 1.0)
            .sample(&[("x", "")], f64::NAN)
            .sample(&[("x", "y")], f64::INFINITY);
        assert_eq!(
            e.finish(),
            "# HELP towalink_wireguard_receive_bytes_total Bytes received.\\nOn a link.\n\
             # TYPE towalink_wireguard_receive_bytes_total counter\n\
             towalink_wireguard_receive_bytes_total{interface=\"tlwg2\"} 1234567890\n\
             towalink_wireguard_receive_bytes_total{interface=\"a\\\"b\\\\c\\nd\"} 0.5\n\
             # HELP towalink_up Up.\n# TYPE towalink_up gauge\n\
             towalink_up 1\ntowalink_up{x=\"\"} NaN\ntowalink_up{x=\"y\"} +Inf\n"
        );
    }

    #[test]
    fn samples_parse_strictly() {
        let s = parse_sample("a_b{x=\"1\",y=\"q\\\"}\"} 2 1700000000000").unwrap();
        assert_eq!(s.name, "a_b");
        assert_eq!(s.label_names, ["x", "y"]);
        assert_eq!(s.labels, "x=\"1\",y=\"q\\\"}\"");
        assert_eq!(s.rest, "2 1700000000000");
        assert_eq!(parse_sample("a{x=\"1\",} 2").unwrap().labels, "x=\"1\"");
        assert_eq!(parse_sample("a 1e3").unwrap().rest, "1e3");
        assert!(parse_sample("a{} -Inf").is_some());
        for bad in [
            "",
            "1a 2",
            "a",
            "a{x=1} 2",
            "a{x=\"1\" 2",
            "a{x=\"1\"}2",
            "a{x=\"\\q\"} 2",
            "a{-x=\"1\"} 2",
            "a 2 3 4",
            "a two",
            "a 2 1.5",
            "a{x=\"1\"}} 2",
        ] {
            assert!(parse_sample(bad).is_none(), "{bad:?} parsed");
        }
    }

    fn node(version: f64, rx: f64) -> String {
        let mut e = Exposition::new();
        e.family("towalink_node_active_version", Kind::Gauge, "Active.")
            .sample(&[], version);
        e.family(
            "towalink_wireguard_receive_bytes_total",
            Kind::Counter,
            "Rx.",
        )
        .sample(&[("interface", "tlwg2")], rx)
        .sample(&[("interface", "tlwg3")], rx + 1.0);
        e.finish()
    }

    #[test]
    fn a_relay_groups_each_family_once_with_every_node_labelled() {
        let towalink = |name: &str| name.starts_with("towalink_");
        let mut relay = Relay::new("node");
        assert_eq!(relay.add(&node(3.0, 10.0), "r.s1", towalink), 0);
        assert_eq!(relay.add(&node(4.0, 20.0), "r.\"s2\"", towalink), 0);
        assert_eq!(
            relay.finish(),
            "# HELP towalink_node_active_version Active.\n\
             # TYPE towalink_node_active_version gauge\n\
             towalink_node_active_version{node=\"r.s1\"} 3\n\
             towalink_node_active_version{node=\"r.\\\"s2\\\"\"} 4\n\
             # HELP towalink_wireguard_receive_bytes_total Rx.\n\
             # TYPE towalink_wireguard_receive_bytes_total counter\n\
             towalink_wireguard_receive_bytes_total{node=\"r.s1\",interface=\"tlwg2\"} 10\n\
             towalink_wireguard_receive_bytes_total{node=\"r.s1\",interface=\"tlwg3\"} 11\n\
             towalink_wireguard_receive_bytes_total{node=\"r.\\\"s2\\\"\",interface=\"tlwg2\"} 20\n\
             towalink_wireguard_receive_bytes_total{node=\"r.\\\"s2\\\"\",interface=\"tlwg3\"} 21\n"
        );
    }

    #[test]
    fn a_relay_drops_what_a_node_may_not_write() {
        let towalink = |name: &str| name.starts_with("towalink_");
        let mut relay = Relay::new("node");
        relay.add(&node(3.0, 10.0), "r.s1", towalink);
        let hostile = "# TYPE towalink_node_active_version counter\n\
                       towalink_node_active_version 99\n\
                       towalink_x{node=\"r.s1\"} 1\n\
                       go_goroutines 7\n\
                       # TYPE other_thing gauge\n\
                       other_thing 1\n\
                       towalink_y{a=\"unterminated} 1\n\
                       towalink_z 1\n\
                       # just a comment\n";
        assert_eq!(relay.add(hostile, "r.s2", towalink), 7);
        let merged = relay.finish();
        assert!(!merged.contains("99"), "{merged}");
        assert!(!merged.contains("go_goroutines"), "{merged}");
        assert!(!merged.contains("other_thing"), "{merged}");
        assert!(
            merged.contains("towalink_z{node=\"r.s2\"} 1\n"),
            "an untyped sample of an accepted name stays: {merged}"
        );
        assert_eq!(
            merged
                .matches("# TYPE towalink_node_active_version")
                .count(),
            1
        );
    }
}
