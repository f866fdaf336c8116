//! Minimal, strict HTTP/1.1 framing for the management API and the attach endpoint: one
//! request per connection (`Connection: close`), bodies framed by `Content-Length` only, hard
//! limits on the head and the body. Works on any `BufRead`/`Write` (a TCP stream, a TLS
//! stream, a byte slice in tests); opens nothing itself.

use crate::printable::printable;
use std::io::{BufRead, Read as _, Write};

/// Largest request or status line plus headers.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not `#[from]`: the message quotes the I/O error, which is therefore not also a source.
    #[error("connection: {0}")]
    Io(std::io::Error),
    #[error("connection closed before a complete message")]
    Closed,
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    #[error("message head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("body of {length} bytes is larger than the {limit} allowed")]
    BodyTooLarge { length: u64, limit: u64 },
}

impl From<std::io::Error> for WireError {
    fn from(error: std::io::Error) -> WireError {
        WireError::Io(error)
    }
}

/// A request as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// `key=value` pairs of the query, in order.
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn query_value(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A response as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

fn read_head(reader: &mut impl BufRead) -> Result<Vec<String>, WireError> {
    let mut lines = Vec::new();
    let mut total = 0usize;
    loop {
        let mut line = Vec::new();
        let n = reader
            .take((MAX_HEAD_BYTES - total + 1) as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(WireError::Closed);
        }
        total += n;
        if total > MAX_HEAD_BYTES {
            return Err(WireError::HeadTooLarge);
        }
        if !line.ends_with(b"\n") {
            return Err(WireError::Closed);
        }
        let line = String::from_utf8(line)
            .map_err(|_| WireError::Malformed("head is not UTF-8".into()))?;
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // tolerate a stray empty line before the start line
            }
            return Ok(lines);
        }
        lines.push(line);
    }
}

/// Content-Length (0 when absent); chunked bodies are refused.
fn content_length(headers: &[String], limit: u64) -> Result<(u64, Option<String>), WireError> {
    let mut length = 0u64;
    let mut content_type = None;
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| WireError::Malformed(format!("header line `{}`", printable(header))))?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = value.parse().map_err(|_| {
                    WireError::Malformed(format!("Content-Length `{}`", printable(value)))
                })?
            }
            "transfer-encoding" => {
                return Err(WireError::Malformed(
                    "Transfer-Encoding is not supported: send Content-Length".into(),
                ))
            }
            "content-type" => content_type = Some(value.to_string()),
            _ => {}
        }
    }
    if length > limit {
        return Err(WireError::BodyTooLarge { length, limit });
    }
    Ok((length, content_type))
}

fn read_body(reader: &mut impl BufRead, length: u64) -> Result<Vec<u8>, WireError> {
    let mut body = Vec::with_capacity(length.min(1 << 20) as usize);
    reader.take(length).read_to_end(&mut body)?;
    if (body.len() as u64) < length {
        return Err(WireError::Closed);
    }
    Ok(body)
}

/// Reads one request; the body may be at most `body_limit` bytes.
pub fn read_request(reader: &mut impl BufRead, body_limit: u64) -> Result<Request, WireError> {
    let head = read_head(reader)?;
    let mut start = head[0].split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (start.next(), start.next(), start.next(), start.next())
    else {
        return Err(WireError::Malformed(format!(
            "request line `{}`",
            printable(&head[0])
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(WireError::Malformed(format!(
            "protocol `{}`",
            printable(version)
        )));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(WireError::Malformed(format!(
            "method `{}`",
            printable(method)
        )));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return Err(WireError::Malformed(format!(
            "target `{}`",
            printable(target)
        )));
    }
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let (length, _) = content_length(&head[1..], body_limit)?;
    let body = read_body(reader, length)?;
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
        body,
    })
}

/// A response's status line and headers; its body (`length` bytes) is still in the reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub content_type: Option<String>,
    pub length: u64,
}

/// Reads a response's head; a body announced larger than `body_limit` is refused here, before
/// a byte of it is read.
pub fn read_response_head(
    reader: &mut impl BufRead,
    body_limit: u64,
) -> Result<ResponseHead, WireError> {
    let head = read_head(reader)?;
    let mut start = head[0].splitn(3, ' ');
    let (Some(version), Some(status)) = (start.next(), start.next()) else {
        return Err(WireError::Malformed(format!(
            "status line `{}`",
            printable(&head[0])
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(WireError::Malformed(format!(
            "protocol `{}`",
            printable(version)
        )));
    }
    let status = status
        .parse()
        .map_err(|_| WireError::Malformed(format!("status `{status}`")))?;
    let (length, content_type) = content_length(&head[1..], body_limit)?;
    Ok(ResponseHead {
        status,
        content_type,
        length,
    })
}

/// Reads one response; the body may be at most `body_limit` bytes.
pub fn read_response(reader: &mut impl BufRead, body_limit: u64) -> Result<Response, WireError> {
    let head = read_response_head(reader, body_limit)?;
    let body = read_body(reader, head.length)?;
    Ok(Response {
        status: head.status,
        content_type: head.content_type,
        body,
    })
}

/// Writes a request (`host` is the Host header).
pub fn write_request(
    writer: &mut impl Write,
    method: &str,
    host: &str,
    target: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes())?;
    writer.write_all(body)?;
    writer.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a response.
pub fn write_response(
    writer: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    write_response_with(writer, status, &[], content_type, body)
}

/// Writes a response with more header lines (`Allow` for a 405, say).
pub fn write_response_with(
    writer: &mut impl Write,
    status: u16,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        reason(status),
        body.len()
    );
    writer.write_all(head.as_bytes())?;
    writer.write_all(body)?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let mut bytes = Vec::new();
        write_request(
            &mut bytes,
            "POST",
            "h",
            "/v1/sync?wait_ms=500&x",
            "application/json",
            b"{}",
        )
        .unwrap();
        let request = read_request(&mut &bytes[..], 10).unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v1/sync");
        assert_eq!(request.query_value("wait_ms"), Some("500"));
        assert_eq!(request.query_value("x"), Some(""));
        assert_eq!(request.body, b"{}");
    }

    #[test]
    fn response_round_trips() {
        let mut bytes = Vec::new();
        write_response(&mut bytes, 403, "text/plain", b"no").unwrap();
        let response = read_response(&mut &bytes[..], 10).unwrap();
        assert_eq!(response.status, 403);
        assert_eq!(response.body, b"no");
        assert_eq!(response.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        let big = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world";
        assert!(matches!(
            read_request(&mut &big[..], 10),
            Err(WireError::BodyTooLarge {
                length: 11,
                limit: 10
            })
        ));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(
            read_request(&mut long.as_bytes(), 10),
            Err(WireError::HeadTooLarge)
        ));
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            assert!(read_request(&mut &garbage[..], 10).is_err(), "{garbage:?}");
        }
        let short = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab";
        assert!(matches!(
            read_request(&mut &short[..], 10),
            Err(WireError::Closed)
        ));
        assert!(matches!(
            read_request(&mut &b"GET / HT"[..], 10),
            Err(WireError::Closed)
        ));
    }
}
