//! Output shared by the commands: JSON documents and aligned text tables.

pub fn print_json(out: &mut impl std::io::Write, value: &serde_json::Value) {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    )
    .ok();
}

pub fn table(out: &mut impl std::io::Write, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    writeln!(out, "{}", line(header.to_vec())).ok();
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect())).ok();
    }
}
