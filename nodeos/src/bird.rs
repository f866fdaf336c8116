//! A client for BIRD 2's control socket (the protocol `birdc` speaks): reconfigure and read the
//! protocol table for health checks.
//!
//! Replies are lines `NNNN<sep>text`: `-` continues, a space ends the reply when the code is
//! 0xxx (done), 8xxx (runtime error) or 9xxx (parse error); a line starting with a space
//! continues the previous code.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;

/// One row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Protocol {
    pub name: String,
    pub proto: String,
    pub state: String,
    pub info: String,
}

#[derive(Debug, Clone)]
pub struct BirdControl {
    pub socket: PathBuf,
}

impl BirdControl {
    fn request(&self, command: &str) -> Result<Vec<(u16, String)>, Error> {
        let error = |message: String| Error::Bird {
            socket: self.socket.clone(),
            message,
        };
        let stream = UnixStream::connect(&self.socket).map_err(|e| Error::BirdNotRunning {
            socket: self.socket.clone(),
            message: e.to_string(),
        })?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| error(e.to_string()))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| error(e.to_string()))?);
        let mut lines = Vec::new();
        let mut read_reply = |lines: &mut Vec<(u16, String)>| -> Result<(), Error> {
            let mut last_code = 0u16;
            loop {
                let mut line = String::new();
                if reader
                    .read_line(&mut line)
                    .map_err(|e| error(format!("read: {e}")))?
                    == 0
                {
                    return Err(error("connection closed mid-reply".into()));
                }
                let line = line.trim_end_matches('\n');
                if let Some(rest) = line.strip_prefix(' ') {
                    lines.push((last_code, rest.to_string()));
                    continue;
                }
                let code: u16 = line
                    .get(..4)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| error(format!("unexpected reply line `{line}`")))?;
                let separator = line.as_bytes().get(4).copied().unwrap_or(b' ');
                let text = line.get(5..).unwrap_or("").to_string();
                last_code = code;
                lines.push((code, text));
                if separator == b' ' && !(1000..8000).contains(&code) {
                    return Ok(());
                }
            }
        };
        let mut welcome = Vec::new();
        read_reply(&mut welcome)?;
        (&stream)
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| error(format!("write: {e}")))?;
        read_reply(&mut lines)?;
        if let Some((code, text)) = lines.last() {
            if *code >= 8000 {
                return Err(error(format!("`{command}` refused: {text}")));
            }
        }
        Ok(lines)
    }

    /// `configure`: BIRD re-reads its configuration file; an invalid file is an error and
    /// BIRD keeps running the old configuration.
    pub fn configure(&self) -> Result<(), Error> {
        let reply = self.request("configure")?;
        tracing::debug!(?reply, "bird configure");
        Ok(())
    }

    /// `show bfd sessions`: (neighbor, interface, state).
    pub fn bfd_sessions(&self) -> Result<Vec<(String, String, String)>, Error> {
        let reply = self.request("show bfd sessions")?;
        Ok(reply
            .iter()
            .filter_map(|(_, text)| {
                let f: Vec<&str> = text.split_whitespace().collect();
                (f.len() >= 3 && ["Up", "Down", "Init", "AdminDown"].contains(&f[2]))
                    .then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
            })
            .collect())
    }

    /// `show protocols`.
    pub fn protocols(&self) -> Result<Vec<Protocol>, Error> {
        let reply = self.request("show protocols")?;
        Ok(reply
            .iter()
            .filter(|(code, _)| *code == 1002)
            .filter_map(|(_, text)| {
                let mut fields = text.split_whitespace();
                let name = fields.next()?.to_string();
                let proto = fields.next()?.to_string();
                let _table = fields.next()?;
                let state = fields.next()?.to_string();
                let _since = fields.next();
                let info = fields.collect::<Vec<_>>().join(" ");
                Some(Protocol {
                    name,
                    proto,
                    state,
                    info,
                })
            })
            .collect())
    }

    /// The BGP sessions as a node reports them; none when BIRD does not answer.
    pub fn bgp_sessions(&self) -> Vec<towalink_bundle::messages::BgpSession> {
        self.protocols()
            .map(|protocols| {
                protocols
                    .into_iter()
                    .filter(|p| p.proto == "BGP")
                    .map(|p| towalink_bundle::messages::BgpSession {
                        name: p.name,
                        state: p.state,
                        info: p.info,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
