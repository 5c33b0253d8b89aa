//! Reply frames and their wire encoding in RESP2 and RESP3.
//!
//! Commands build a [`Frame`] tree and the connection encodes it for the protocol version the
//! client negotiated (`HELLO 2` / `HELLO 3`). RESP3-only types degrade the way Redis degrades
//! them for RESP2 clients: maps and sets become flat arrays, pushes become arrays, verbatim
//! strings become bulk strings, and both nulls become the RESP2 null bulk string.

use bytes::{BufMut, Bytes, BytesMut};
use std::borrow::Cow;

/// The protocol version a client speaks; chosen with `HELLO`, RESP2 until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Protocol {
    /// RESP2: what every Redis client speaks on connect.
    Resp2 = 2,
    /// RESP3: typed replies, out-of-band push frames for pub/sub messages.
    Resp3 = 3,
}

impl Protocol {
    /// The protocol for a `HELLO` version number, if herald speaks it.
    pub fn from_version(version: i64) -> Option<Protocol> {
        match version {
            2 => Some(Protocol::Resp2),
            3 => Some(Protocol::Resp3),
            _ => None,
        }
    }

    /// The number `HELLO` reports for this protocol.
    pub fn version(self) -> i64 {
        self as i64
    }
}

/// One reply value, independent of the protocol version it will be written in.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `+OK`: a short status string without CR or LF.
    Simple(Cow<'static, str>),
    /// `-ERR ...`: the full error line, code included (`ERR`, `NOAUTH`, `WRONGPASS`...).
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$3\r\nfoo`: a binary-safe string.
    Bulk(Bytes),
    /// The null reply: `$-1` in RESP2, `_` in RESP3.
    Null,
    /// `*N`: an ordered list.
    Array(Vec<Frame>),
    /// `%N` in RESP3, a flat key/value array in RESP2.
    Map(Vec<(Frame, Frame)>),
    /// `~N` in RESP3, an array in RESP2.
    Set(Vec<Frame>),
    /// `>N` in RESP3 (out-of-band, e.g. pub/sub), an array in RESP2.
    Push(Vec<Frame>),
    /// `=N\r\ntxt:...` in RESP3, a bulk string in RESP2 (what `INFO` and `CLIENT LIST` return).
    Verbatim(Bytes),
}

impl Frame {
    /// `+OK`, the most common reply.
    pub const OK: Frame = Frame::Simple(Cow::Borrowed("OK"));

    /// A status reply (`+PONG`); `status` must not contain CR or LF.
    pub fn simple(status: impl Into<Cow<'static, str>>) -> Frame {
        Frame::Simple(status.into())
    }

    /// An error reply; `message` must start with the error code, e.g. `ERR syntax error`.
    pub fn error(message: impl Into<String>) -> Frame {
        Frame::Error(message.into())
    }

    /// A bulk string reply from anything byte-like.
    pub fn bulk(data: impl Into<Bytes>) -> Frame {
        Frame::Bulk(data.into())
    }

    /// A bulk string reply copied from a static or borrowed string.
    pub fn text(data: &str) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(data.as_bytes()))
    }

    /// Appends this frame's encoding for `protocol` to `out`.
    pub fn encode(&self, protocol: Protocol, out: &mut BytesMut) {
        match self {
            Frame::Simple(s) => {
                out.put_u8(b'+');
                out.put_slice(s.as_bytes());
                out.put_slice(b"\r\n");
            }
            Frame::Error(message) => {
                out.put_u8(b'-');
                // An error line cannot carry CR or LF: Redis replaces them with spaces.
                for &b in message.as_bytes() {
                    out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
                }
                out.put_slice(b"\r\n");
            }
            Frame::Integer(n) => encode_header(out, b':', *n),
            Frame::Bulk(data) => encode_bulk(out, data),
            Frame::Null => match protocol {
                Protocol::Resp2 => out.put_slice(b"$-1\r\n"),
                Protocol::Resp3 => out.put_slice(b"_\r\n"),
            },
            Frame::Array(items) => encode_items(out, b'*', items, protocol),
            Frame::Set(items) => {
                let kind = if protocol == Protocol::Resp3 {
                    b'~'
                } else {
                    b'*'
                };
                encode_items(out, kind, items, protocol)
            }
            Frame::Push(items) => {
                let kind = if protocol == Protocol::Resp3 {
                    b'>'
                } else {
                    b'*'
                };
                encode_items(out, kind, items, protocol)
            }
            Frame::Map(pairs) => {
                match protocol {
                    Protocol::Resp3 => encode_header(out, b'%', pairs.len() as i64),
                    Protocol::Resp2 => encode_header(out, b'*', 2 * pairs.len() as i64),
                }
                for (key, value) in pairs {
                    key.encode(protocol, out);
                    value.encode(protocol, out);
                }
            }
            Frame::Verbatim(text) => match protocol {
                Protocol::Resp2 => encode_bulk(out, text),
                Protocol::Resp3 => {
                    encode_header(out, b'=', text.len() as i64 + 4);
                    out.put_slice(b"txt:");
                    out.put_slice(text);
                    out.put_slice(b"\r\n");
                }
            },
        }
    }

    /// This frame encoded for `protocol`, as one buffer.
    pub fn to_bytes(&self, protocol: Protocol) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(protocol, &mut out);
        out.freeze()
    }
}

/// Writes `<kind><n>\r\n`, the header shared by integers, lengths and aggregate counts.
pub(crate) fn encode_header(out: &mut BytesMut, kind: u8, n: i64) {
    let mut digits = itoa::Buffer::new();
    out.put_u8(kind);
    out.put_slice(digits.format(n).as_bytes());
    out.put_slice(b"\r\n");
}

/// Writes a bulk string: `$<len>\r\n<data>\r\n`.
pub(crate) fn encode_bulk(out: &mut BytesMut, data: &[u8]) {
    encode_header(out, b'$', data.len() as i64);
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

fn encode_items(out: &mut BytesMut, kind: u8, items: &[Frame], protocol: Protocol) {
    encode_header(out, kind, items.len() as i64);
    for item in items {
        item.encode(protocol, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(frame: &Frame, protocol: Protocol) -> String {
        String::from_utf8(frame.to_bytes(protocol).to_vec()).unwrap()
    }

    #[test]
    fn resp3_types_degrade_to_resp2_like_redis() {
        let map = Frame::Map(vec![(Frame::text("proto"), Frame::Integer(2))]);
        assert_eq!(enc(&map, Protocol::Resp2), "*2\r\n$5\r\nproto\r\n:2\r\n");
        assert_eq!(enc(&map, Protocol::Resp3), "%1\r\n$5\r\nproto\r\n:2\r\n");
        assert_eq!(enc(&Frame::Null, Protocol::Resp2), "$-1\r\n");
        assert_eq!(enc(&Frame::Null, Protocol::Resp3), "_\r\n");
        let push = Frame::Push(vec![Frame::text("message")]);
        assert_eq!(enc(&push, Protocol::Resp2), "*1\r\n$7\r\nmessage\r\n");
        assert_eq!(enc(&push, Protocol::Resp3), ">1\r\n$7\r\nmessage\r\n");
        let verbatim = Frame::Verbatim(Bytes::from_static(b"a:1"));
        assert_eq!(enc(&verbatim, Protocol::Resp2), "$3\r\na:1\r\n");
        assert_eq!(enc(&verbatim, Protocol::Resp3), "=7\r\ntxt:a:1\r\n");
    }

    #[test]
    fn error_lines_never_break_the_stream() {
        let frame = Frame::error("ERR bad\r\nthing");
        assert_eq!(enc(&frame, Protocol::Resp2), "-ERR bad  thing\r\n");
    }
}
