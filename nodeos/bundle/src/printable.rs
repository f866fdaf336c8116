//! Strings from the other side (a device's host name, a node's health detail, BGP info or
//! rollback reason) are shown through [`printable`]: control characters (C0, DEL, C1 — escape
//! sequences, CR/LF, backspace) are escaped, so a hostile string can neither redraw the
//! operator's terminal nor forge lines in a list or a log.

/// `text` with every control character as `\u{..}` (and `\` as `\\`, so the escape is
/// unambiguous); everything else as is.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || is_bidi_control(c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Unicode's bidirectional overrides and isolates, which reorder what a terminal shows.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped_the_rest_is_kept() {
        assert_eq!(printable("r3-s1 héllo"), "r3-s1 héllo");
        assert_eq!(
            printable("x\u{1b}[2J\r\n1) fake\u{7}\u{9b}\u{202e}"),
            "x\\u{1b}[2J\\u{d}\\u{a}1) fake\\u{7}\\u{9b}\\u{202e}"
        );
        assert_eq!(printable("a\\u{1b}"), "a\\\\u{1b}");
        assert!(printable("\t").chars().all(|c| !c.is_control()));
    }
}
