//! Values an operator types to `tlm` and to `towalink-node` alike, parsed the same way on both
//! sides: which version ([`VersionSpec`]) and how much to log ([`LogLevel`]). Each has one
//! `FromStr`; the command lines use it through clap's `value_parser`, so this crate does not
//! depend on clap.

use std::fmt;
use std::str::FromStr;

/// Which version: a number (`5` or `v5`) or `latest` (the highest committed or installed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSpec {
    Latest,
    Number(u32),
}

/// A version that is neither a positive number nor `latest`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version `{0}`: use a number (5 or v5) or `latest`")]
pub struct InvalidVersion(pub String);

impl FromStr for VersionSpec {
    type Err = InvalidVersion;
    fn from_str(s: &str) -> Result<VersionSpec, InvalidVersion> {
        if s == "latest" {
            return Ok(VersionSpec::Latest);
        }
        let digits = s.strip_prefix('v').unwrap_or(s);
        match digits.parse::<u32>() {
            Ok(n) if n > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(VersionSpec::Number(n))
            }
            _ => Err(InvalidVersion(s.to_string())),
        }
    }
}

impl fmt::Display for VersionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionSpec::Latest => f.write_str("latest"),
            VersionSpec::Number(n) => write!(f, "v{n}"),
        }
    }
}

/// The log level on stderr (`--loglevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

/// A log level that is not one of [`LogLevel::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid log level `{0}`: use debug, info, warning or error")]
pub struct InvalidLogLevel(pub String);

impl LogLevel {
    /// The names the command lines accept (and list in `--help`), in order of verbosity.
    pub const NAMES: [&'static str; 4] = ["debug", "info", "warning", "error"];

    pub fn tracing_level(self) -> tracing_core::Level {
        match self {
            LogLevel::Debug => tracing_core::Level::DEBUG,
            LogLevel::Info => tracing_core::Level::INFO,
            LogLevel::Warning => tracing_core::Level::WARN,
            LogLevel::Error => tracing_core::Level::ERROR,
        }
    }
}

impl FromStr for LogLevel {
    type Err = InvalidLogLevel;
    fn from_str(s: &str) -> Result<LogLevel, InvalidLogLevel> {
        match s {
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warning" => Ok(LogLevel::Warning),
            "error" => Ok(LogLevel::Error),
            _ => Err(InvalidLogLevel(s.to_string())),
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!("v5".parse::<VersionSpec>(), Ok(VersionSpec::Number(5)));
        assert_eq!("5".parse::<VersionSpec>(), Ok(VersionSpec::Number(5)));
        assert_eq!("latest".parse::<VersionSpec>(), Ok(VersionSpec::Latest));
        for bad in [
            "v0", "0", "v", "x", "-1", "v+1", "+1", "vv1", "v 1", "Latest",
        ] {
            assert_eq!(
                bad.parse::<VersionSpec>(),
                Err(InvalidVersion(bad.to_string())),
                "{bad}"
            );
        }
        assert_eq!(
            "vx".parse::<VersionSpec>().unwrap_err().to_string(),
            "invalid version `vx`: use a number (5 or v5) or `latest`"
        );
        assert_eq!(VersionSpec::Number(7).to_string(), "v7");
        assert_eq!(VersionSpec::Latest.to_string(), "latest");
    }

    #[test]
    fn log_levels_round_trip_through_their_names() {
        for name in LogLevel::NAMES {
            let level: LogLevel = name.parse().unwrap();
            assert_eq!(level.to_string(), name);
        }
        assert_eq!(
            "warning".parse::<LogLevel>().unwrap().tracing_level(),
            tracing_core::Level::WARN
        );
        assert_eq!(
            "warn".parse::<LogLevel>(),
            Err(InvalidLogLevel("warn".into()))
        );
    }
}
