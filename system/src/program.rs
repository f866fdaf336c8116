//! External programs (git, service reload commands, the syslinux installer) go through here, so a failure always names the program, its
//! arguments, its exit status and the tail of what it printed.

use std::path::Path;
use std::process::{Command, Output};

/// A program that could not run or failed.
#[derive(Debug, thiserror::Error)]
#[error("`{program} {}` {outcome}{}", args.join(" "), if stderr_tail.is_empty() { String::new() } else { format!(": {stderr_tail}") })]
pub struct CommandError {
    pub program: String,
    pub args: Vec<String>,
    pub outcome: String,
    pub stderr_tail: String,
    /// The program is not installed (the callers turn this into "install package X").
    pub not_found: bool,
}

/// Runs a program in `dir`, capturing its output; a non-zero exit is an error.
pub fn run(
    program: &str,
    args: &[&str],
    dir: &Path,
    env: &[(&str, &str)],
) -> Result<Output, CommandError> {
    let failed = |outcome: String, stderr: &[u8], not_found: bool| CommandError {
        program: program.to_string(),
        args: args.iter().map(|a| a.to_string()).collect(),
        outcome,
        stderr_tail: tail(stderr),
        not_found,
    };
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| {
            let not_found = e.kind() == std::io::ErrorKind::NotFound;
            failed(format!("could not start ({e})"), b"", not_found)
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failed(
            format!("failed ({})", output.status),
            &output.stderr,
            false,
        ))
    }
}

/// The gist of a program's error output, trimmed for a one-line message: its `fatal:` /
/// `error:` lines when it has some (they name the file), else its last two lines.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("fatal:") || l.starts_with("error:"))
        .take(2)
        .collect();
    let chosen = if errors.is_empty() {
        &lines[lines.len().saturating_sub(2)..]
    } else {
        &errors[..]
    };
    let joined = chosen.join(" | ");
    if joined.len() > 300 {
        let mut cut = joined.len() - 300;
        while !joined.is_char_boundary(cut) {
            cut += 1;
        }
        format!("...{}", &joined[cut..])
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_line_naming_the_file() {
        let git = b"fatal: Unable to create '/c/.git/index.lock': File exists.\n\nAnother git process seems to be running in this repository, e.g.\nan editor opened by 'git commit'. Please make sure all processes\nare terminated then try again. If it still fails, a git process\nmay have crashed in this repository earlier:\nremove the file manually to continue.\n";
        assert_eq!(
            tail(git),
            "fatal: Unable to create '/c/.git/index.lock': File exists."
        );
        assert_eq!(tail(b"one\ntwo\nthree\n"), "two | three");
    }

    #[test]
    fn a_missing_program_is_named_and_marked_not_found() {
        let e = run("towalink-no-such-program", &["--x"], Path::new("/"), &[]).unwrap_err();
        assert!(e.not_found);
        assert!(
            e.to_string()
                .starts_with("`towalink-no-such-program --x` could not start"),
            "{e}"
        );
        let e = run("sh", &["-c", "echo boom >&2; exit 3"], Path::new("/"), &[]).unwrap_err();
        assert!(!e.not_found);
        assert_eq!(e.stderr_tail, "boom");
        assert!(
            e.to_string().contains("failed (exit status: 3): boom"),
            "{e}"
        );
    }
}
