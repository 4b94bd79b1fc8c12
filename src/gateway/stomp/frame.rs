//! STOMP 1.2 frames: an incremental decoder and an encoder, written against
//! the specification (<https://stomp.github.io/stomp-specification-1.2.html>).
//!
//! Why not a crate: the STOMP crates on crates.io are client libraries or
//! parse whole frames only; none decodes a stream across WebSocket messages
//! with the header-count, header-length and frame-size limits a server facing
//! the internet needs, so this is one file that does exactly that.
//!
//! What the decoder follows from the spec:
//! * a frame is `COMMAND EOL *(header EOL) EOL body NUL`, EOL being `\n` or
//!   `\r\n`; EOLs between frames are heart-beats and are skipped;
//! * with `content-length`, the body is exactly that many octets (it may hold
//!   NULs) and a NUL must follow; without it, the body ends at the first NUL;
//! * header names and values are unescaped (`\\`, `\n`, `\r`, `\c`) except in
//!   `CONNECT`/`CONNECTED`; any other escape is a protocol error;
//! * a repeated header: the first occurrence counts;
//! * a frame may arrive split over any number of WebSocket messages, and one
//!   message may carry several frames.

use bytes::{Buf, BytesMut};

/// Client and server commands of STOMP 1.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    Connected,
    Message,
    Receipt,
    Error,
}

impl Command {
    pub fn parse(s: &[u8]) -> Option<Command> {
        Some(match s {
            b"CONNECT" => Command::Connect,
            b"STOMP" => Command::Stomp,
            b"SEND" => Command::Send,
            b"SUBSCRIBE" => Command::Subscribe,
            b"UNSUBSCRIBE" => Command::Unsubscribe,
            b"ACK" => Command::Ack,
            b"NACK" => Command::Nack,
            b"BEGIN" => Command::Begin,
            b"COMMIT" => Command::Commit,
            b"ABORT" => Command::Abort,
            b"DISCONNECT" => Command::Disconnect,
            b"CONNECTED" => Command::Connected,
            b"MESSAGE" => Command::Message,
            b"RECEIPT" => Command::Receipt,
            b"ERROR" => Command::Error,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
            Command::Connected => "CONNECTED",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    /// `CONNECT`, `STOMP` and `CONNECTED` headers are not escaped (spec:
    /// "Value Encoding"), for compatibility with STOMP 1.0.
    fn escapes_headers(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    /// In arrival order, repeats kept (see [`Frame::header`]).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    /// The first value of header `name` (the spec's rule for repeated headers).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the decoder refuses; each becomes an `ERROR` frame's `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is larger than {0} bytes")]
    TooBig(usize),
    #[error("more than {0} headers")]
    TooManyHeaders(usize),
    #[error("a header line is longer than {0} bytes")]
    HeaderTooLong(usize),
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error("malformed header line (no ':')")]
    MalformedHeader,
    #[error("invalid escape sequence in a header")]
    BadEscape,
    #[error("headers are not valid UTF-8")]
    NotUtf8,
    #[error("content-length is not a number")]
    BadContentLength,
    #[error("the body is not followed by a NUL octet as content-length says")]
    MissingNul,
}

/// The decoder's limits (`MAX_FRAME_BYTES`, `STOMP_MAX_HEADERS`,
/// `STOMP_MAX_HEADER_BYTES`).
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_frame: usize,
    pub max_headers: usize,
    pub max_header_line: usize,
}

/// Accumulates the bytes of WebSocket messages and yields whole frames.
///
/// Memory is bounded: the buffer never holds more than one frame's limit plus
/// one WebSocket message (the caller's frame limit bounds that message).
pub struct Decoder {
    buf: BytesMut,
    limits: DecodeLimits,
}

impl Decoder {
    pub fn new(limits: DecodeLimits) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            limits,
        }
    }

    /// Appends bytes as they came off the socket.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes waiting for the rest of their frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed. After an
    /// error the stream cannot be resynchronised: the caller closes it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        // Heart-beats (and the optional EOLs after a frame's NUL).
        loop {
            if self.buf.starts_with(b"\n") {
                self.buf.advance(1);
            } else if self.buf.starts_with(b"\r\n") {
                self.buf.advance(2);
            } else {
                break;
            }
        }
        if self.buf.is_empty() || self.buf.as_ref() == b"\r" {
            return Ok(None);
        }
        let l = self.limits;
        let buf = &self.buf[..];
        // The command and header lines, up to the empty line.
        let mut pos = 0;
        let mut lines: Vec<&[u8]> = Vec::new();
        let body_start = loop {
            let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
                if buf.len() - pos > l.max_header_line {
                    return Err(FrameError::HeaderTooLong(l.max_header_line));
                }
                if buf.len() > l.max_frame {
                    return Err(FrameError::TooBig(l.max_frame));
                }
                return Ok(None);
            };
            let mut line = &buf[pos..pos + nl];
            if let Some(s) = line.strip_suffix(b"\r") {
                line = s;
            }
            if line.len() > l.max_header_line {
                return Err(FrameError::HeaderTooLong(l.max_header_line));
            }
            pos += nl + 1;
            if pos > l.max_frame {
                return Err(FrameError::TooBig(l.max_frame));
            }
            if line.is_empty() {
                break pos;
            }
            // The command line plus at most `max_headers` headers.
            if lines.len() > l.max_headers {
                return Err(FrameError::TooManyHeaders(l.max_headers));
            }
            lines.push(line);
        };
        let command = Command::parse(lines[0]).ok_or_else(|| {
            FrameError::UnknownCommand(String::from_utf8_lossy(lines[0]).chars().take(32).collect())
        })?;
        let mut headers = Vec::with_capacity(lines.len() - 1);
        for line in &lines[1..] {
            let colon = line
                .iter()
                .position(|&b| b == b':')
                .ok_or(FrameError::MalformedHeader)?;
            let (k, v) = (&line[..colon], &line[colon + 1..]);
            let (k, v) = if command.escapes_headers() {
                (unescape(k)?, unescape(v)?)
            } else {
                (utf8(k)?, utf8(v)?)
            };
            headers.push((k, v));
        }
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.trim().parse::<usize>())
            .transpose()
            .map_err(|_| FrameError::BadContentLength)?;
        let (body_end, frame_end) = match length {
            Some(n) => {
                if body_start.saturating_add(n) >= l.max_frame {
                    return Err(FrameError::TooBig(l.max_frame));
                }
                if buf.len() < body_start + n + 1 {
                    return Ok(None);
                }
                if buf[body_start + n] != 0 {
                    return Err(FrameError::MissingNul);
                }
                (body_start + n, body_start + n + 1)
            }
            None => match buf[body_start..].iter().position(|&b| b == 0) {
                Some(z) => (body_start + z, body_start + z + 1),
                None if buf.len() >= l.max_frame => return Err(FrameError::TooBig(l.max_frame)),
                None => return Ok(None),
            },
        };
        if frame_end > l.max_frame {
            return Err(FrameError::TooBig(l.max_frame));
        }
        let body = buf[body_start..body_end].to_vec();
        self.buf.advance(frame_end);
        Ok(Some(Frame {
            command,
            headers,
            body,
        }))
    }
}

fn utf8(b: &[u8]) -> Result<String, FrameError> {
    String::from_utf8(b.to_vec()).map_err(|_| FrameError::NotUtf8)
}

fn unescape(b: &[u8]) -> Result<String, FrameError> {
    if !b.contains(&b'\\') {
        return utf8(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut it = b.iter();
    while let Some(&c) = it.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        out.push(match it.next() {
            Some(b'\\') => b'\\',
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b'c') => b':',
            _ => return Err(FrameError::BadEscape),
        });
    }
    String::from_utf8(out).map_err(|_| FrameError::NotUtf8)
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            ':' => out.push_str("\\c"),
            c => out.push(c),
        }
    }
}

/// Encodes a frame with a `content-length` header for the body (so a body may
/// hold any octet). Header values are escaped unless the command is
/// `CONNECTED`.
pub fn encode(command: Command, headers: &[(&str, &str)], body: &str) -> String {
    let mut out = String::with_capacity(64 + body.len() + headers.len() * 24);
    out.push_str(command.as_str());
    out.push('\n');
    for (k, v) in headers {
        if command.escapes_headers() {
            escape_into(&mut out, k);
            out.push(':');
            escape_into(&mut out, v);
        } else {
            // Not escapable: strip what would break the frame instead.
            out.extend(k.chars().filter(|c| !matches!(c, '\n' | '\r' | ':')));
            out.push(':');
            out.extend(v.chars().filter(|c| !matches!(c, '\n' | '\r')));
        }
        out.push('\n');
    }
    if !body.is_empty() {
        out.push_str("content-length:");
        out.push_str(&body.len().to_string());
        out.push('\n');
    }
    out.push('\n');
    out.push_str(body);
    out.push('\0');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: DecodeLimits = DecodeLimits {
        max_frame: 1024,
        max_headers: 4,
        max_header_line: 64,
    };

    fn all(input: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut d = Decoder::new(L);
        d.extend(input);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn spec_examples() {
        let f = all(b"CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n\0").unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].command, Command::Connect);
        assert_eq!(f[0].header("host"), Some("stomp.github.org"));
        let f = all(
            b"SEND\r\ndestination:/queue/a\r\ncontent-type:text/plain\r\n\r\nhello queue a\0\n\n",
        )
        .unwrap();
        assert_eq!(f[0].body, b"hello queue a");
        assert_eq!(f[0].header("destination"), Some("/queue/a"));
    }

    #[test]
    fn content_length_allows_nul_in_body() {
        let f = all(b"SEND\ncontent-length:3\n\na\0b\0").unwrap();
        assert_eq!(f[0].body, b"a\0b");
        assert_eq!(
            all(b"SEND\ncontent-length:1\n\nab\0"),
            Err(FrameError::MissingNul)
        );
    }

    #[test]
    fn escapes_and_repeats() {
        let f = all(b"SEND\na\\cb:x\\\\y\\nz\nfoo:1\nfoo:2\n\n\0").unwrap();
        assert_eq!(f[0].header("a:b"), Some("x\\y\nz"));
        assert_eq!(f[0].header("foo"), Some("1"), "first occurrence wins");
        assert_eq!(all(b"SEND\na:\\t\n\n\0"), Err(FrameError::BadEscape));
        // CONNECT headers are not unescaped.
        let f = all(b"CONNECT\nlogin:a\\b\n\n\0").unwrap();
        assert_eq!(f[0].header("login"), Some("a\\b"));
    }

    #[test]
    fn split_anywhere_and_heartbeats() {
        let wire = b"\n\r\nSEND\ndestination:/x\n\nhi\0\nSUBSCRIBE\nid:1\n\n\0".to_vec();
        for cut in 0..wire.len() {
            let mut d = Decoder::new(L);
            let mut got = Vec::new();
            d.extend(&wire[..cut]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.extend(&wire[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].body, b"hi");
            assert_eq!(got[1].command, Command::Subscribe);
        }
    }

    #[test]
    fn limits() {
        assert_eq!(
            all(b"SEND\na:1\nb:2\nc:3\nd:4\ne:5\n\n\0"),
            Err(FrameError::TooManyHeaders(4))
        );
        let long = format!("SEND\nh:{}\n\n\0", "x".repeat(100));
        assert_eq!(all(long.as_bytes()), Err(FrameError::HeaderTooLong(64)));
        let big = format!("SEND\n\n{}", "x".repeat(2000));
        assert_eq!(all(big.as_bytes()), Err(FrameError::TooBig(1024)));
        assert_eq!(
            all(b"SEND\ncontent-length:99999\n\n"),
            Err(FrameError::TooBig(1024))
        );
        assert!(matches!(
            all(b"HELLO\n\n\0"),
            Err(FrameError::UnknownCommand(_))
        ));
    }

    #[test]
    fn encode_roundtrip() {
        let s = encode(
            Command::Message,
            &[("destination", "/sub/chat/room/1"), ("x", "a:b\nc")],
            "{\"a\":1}",
        );
        let f = all(s.as_bytes()).unwrap();
        assert_eq!(f[0].header("x"), Some("a:b\nc"));
        assert_eq!(f[0].header("content-length"), Some("7"));
        assert_eq!(f[0].body, b"{\"a\":1}");
    }
}
