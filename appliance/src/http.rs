//! A minimal HTTP/1.1: requests and responses with `Content-Length` bodies,
//! keep-alive, and hard limits on every size a peer controls.

use std::io::{self, BufRead, Read, Write};

/// Most hashes in one `POST /v1/chunks:batch` (the server refuses more;
/// the client never asks for more).
pub const MAX_BATCH: usize = 4096;

const MAX_LINE: usize = 8192;
const MAX_HEADERS: usize = 64;

#[derive(Debug)]
pub struct Message {
    /// Request: method; response: status code as text.
    pub first: String,
    /// Request: path; response: reason.
    pub second: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether the peer asked to close the connection after this message.
    pub fn wants_close(&self, http10: bool) -> bool {
        match self.header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => true,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => false,
            _ => http10,
        }
    }
}

/// Why a message could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The connection closed before the first byte (a clean keep-alive end).
    Closed,
    Io(io::Error),
    /// The peer sent something we do not accept: (status, reason).
    Bad(u16, String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn read_line<R: BufRead>(r: &mut R, first: bool) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = Read::take(&mut *r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(if first {
            ReadError::Closed
        } else {
            ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-message"))
        });
    }
    if line.len() > MAX_LINE {
        return Err(ReadError::Bad(431, "header line too long".into()));
    }
    if line.last() != Some(&b'\n') {
        return Err(ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-line")));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| ReadError::Bad(400, "non-UTF-8 header".into()))
}

/// Reads one message (request or response; `is_response` picks the first
/// line's shape). Bodies need `Content-Length` and at most `max_body` bytes.
/// Returns the message and whether the first line says HTTP/1.0.
pub fn read_message(r: &mut impl BufRead, is_response: bool, max_body: usize) -> Result<(Message, bool), ReadError> {
    read_message_with(r, is_response, &|_, _| max_body)
}

/// Like [`read_message`], with the body limit chosen from the first line
/// (method and path of a request).
pub fn read_message_with(
    r: &mut impl BufRead,
    is_response: bool,
    max_body: &dyn Fn(&str, &str) -> usize,
) -> Result<(Message, bool), ReadError> {
    let mut line = read_line(r, true)?;
    // Tolerate stray empty lines between messages (RFC 9112 2.2).
    let mut skipped = 0;
    while line.is_empty() && skipped < 4 {
        line = read_line(r, true)?;
        skipped += 1;
    }
    let mut parts = line.splitn(3, ' ');
    let (a, b, c) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (first, second, version) = if is_response { (b, c, a) } else { (a, b, c) };
    if !version.starts_with("HTTP/1.") || first.is_empty() || (!is_response && second.is_empty()) {
        return Err(ReadError::Bad(
            400,
            format!("malformed first line `{}`", line.chars().take(100).collect::<String>()),
        ));
    }
    let http10 = version == "HTTP/1.0";
    let mut headers = Vec::new();
    loop {
        let l = read_line(r, false)?;
        if l.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(ReadError::Bad(431, "too many headers".into()));
        }
        let Some((k, v)) = l.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header".into()));
        };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut m = Message { first: first.to_string(), second: second.to_string(), headers, body: Vec::new() };
    if m.header("transfer-encoding").is_some() {
        return Err(ReadError::Bad(501, "transfer-encoding is not supported; send Content-Length".into()));
    }
    let len = match m.header("content-length") {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| ReadError::Bad(400, "bad Content-Length".into()))?,
    };
    let limit = max_body(&m.first, &m.second);
    if len > limit {
        return Err(ReadError::Bad(413, format!("body of {len} bytes exceeds the limit of {limit}")));
    }
    // Grow with the bytes that actually arrive: a peer announcing a large
    // body and sending little costs little memory.
    m.body = Vec::with_capacity(len.min(1 << 20));
    Read::take(&mut *r, len as u64).read_to_end(&mut m.body)?;
    if m.body.len() != len {
        return Err(ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-body")));
    }
    Ok((m, http10))
}

pub fn write_response(
    w: &mut impl Write,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

pub fn write_request(
    w: &mut impl Write,
    method: &str,
    host: &str,
    path: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // One write for small requests: fewer segments on a slow link.
    let mut buf = Vec::with_capacity(head.len() + body.len());
    buf.extend_from_slice(head.as_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()
}

/// Marks a socket's packets interactive (SO_PRIORITY 6): a priority qdisc
/// under the link's shaper (as netsim's `tbf` + `pfifo_fast`, or DSCP on
/// a real network) sends them before bulk prefetch traffic.
pub(crate) fn set_interactive(s: &std::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(s).set_priority(6) {
        log::debug!("SO_PRIORITY 6: {e}");
    }
}
