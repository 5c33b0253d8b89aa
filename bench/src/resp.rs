//! The little RESP the benchmark has to read, parsed in place without allocating: push frames
//! on subscriber connections (`message`, `pmessage`, `subscribe` confirmations, errors) and the
//! one-line replies (`:N` or `-ERR ...`) publishers get for `PUBLISH`, and the acknowledgements
//! of durable writes (`PUBLISH`, `XADD`).
//!
//! Every parser takes the unconsumed part of a read buffer and returns `Ok(None)` when the frame
//! is not complete yet, so frames split across reads are simply parsed again after the next read.

use memchr::memchr;
use std::fmt;

/// Longest line (`*3`, `$1024`, `:50`, `-ERR ...`) accepted before the input is declared garbage.
const MAX_LINE: usize = 64 * 1024;

/// The server sent something that is not RESP, or not what a subscriber or publisher expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// One complete frame read on a subscriber connection, borrowing the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push<'a> {
    /// A delivery: `message <channel> <payload>` (or `pmessage <pattern> <channel> <payload>`).
    Message {
        /// The channel the message was published to.
        channel: &'a [u8],
        /// The published payload.
        payload: &'a [u8],
    },
    /// Any other push, e.g. a `subscribe` confirmation.
    Other {
        /// The push's kind (its first element), e.g. `subscribe`.
        kind: &'a [u8],
        /// Its last element when that is an integer (the subscription count of confirmations).
        count: Option<i64>,
    },
    /// An error reply, without the leading `-`.
    Error(&'a [u8]),
}

/// A reply to a command: `:N` or `-ERR ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// An integer reply (for `PUBLISH`, the number of receivers).
    Int(i64),
    /// An error reply, without the leading `-`.
    Error(&'a [u8]),
}

/// One element of an array frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem<'a> {
    Bulk(&'a [u8]),
    Int(i64),
    Simple(&'a [u8]),
    Null,
}

/// Finds the line starting at `pos`: its content (without `\r\n`) and the position after it.
#[inline]
fn line(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = &buf[pos..];
    match memchr(b'\r', rest) {
        None if rest.len() > MAX_LINE => Err(ProtocolError("line too long")),
        None => Ok(None),
        Some(i) => match rest.get(i + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some((&rest[..i], pos + i + 2))),
            Some(_) => Err(ProtocolError("CR not followed by LF")),
        },
    }
}

/// Parses a decimal integer, optionally negative.
#[inline]
fn parse_int(digits: &[u8]) -> Result<i64, ProtocolError> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(ProtocolError("bad integer"));
    }
    let mut value: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(ProtocolError("bad integer"));
        }
        value = value * 10 + i64::from(d - b'0');
    }
    Ok(if negative { -value } else { value })
}

/// Parses the element starting at `pos`.
#[inline]
fn element(buf: &[u8], pos: usize) -> Result<Option<(Elem<'_>, usize)>, ProtocolError> {
    let Some(&tag) = buf.get(pos) else {
        return Ok(None);
    };
    let Some((text, next)) = line(buf, pos + 1)? else {
        return Ok(None);
    };
    match tag {
        b'$' => {
            let len = parse_int(text)?;
            if len < 0 {
                return Ok(Some((Elem::Null, next)));
            }
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("bulk string not terminated by CRLF"));
            }
            Ok(Some((Elem::Bulk(&buf[next..end]), end + 2)))
        }
        b':' => Ok(Some((Elem::Int(parse_int(text)?), next))),
        b'+' => Ok(Some((Elem::Simple(text), next))),
        _ => Err(ProtocolError("unexpected element type in push")),
    }
}

/// Start of every `message` push in RESP2.
const MESSAGE_PREFIX: &[u8] = b"*3\r\n$7\r\nmessage\r\n";

/// Fast path for a complete, well-formed bulk string at `pos` (short lengths are parsed inline,
/// which beats a `memchr` call per line); `None` sends the caller to the general parser, which
/// also tells incomplete input from errors.
#[inline(always)]
fn fast_bulk(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    if *buf.get(pos)? != b'$' {
        return None;
    }
    let mut i = pos + 1;
    let mut len = 0usize;
    loop {
        let d = *buf.get(i)?;
        if d == b'\r' {
            break;
        }
        if !d.is_ascii_digit() || i - pos > 12 {
            return None;
        }
        len = len * 10 + usize::from(d - b'0');
        i += 1;
    }
    let start = i + 2;
    let end = start.checked_add(len)?;
    if i == pos + 1 || buf.len() < end + 2 || buf[i + 1] != b'\n' || &buf[end..end + 2] != b"\r\n" {
        return None;
    }
    Some((&buf[start..end], end + 2))
}

/// The common case, a complete well-formed `message` push; `None` for anything else.
#[inline(always)]
fn fast_message(buf: &[u8]) -> Option<(Push<'_>, usize)> {
    if !buf.starts_with(MESSAGE_PREFIX) {
        return None;
    }
    let (channel, pos) = fast_bulk(buf, MESSAGE_PREFIX.len())?;
    let (payload, pos) = fast_bulk(buf, pos)?;
    Some((Push::Message { channel, payload }, pos))
}

/// Parses one frame from the start of `buf`: the frame and how many bytes it took, or `None`
/// when `buf` holds only part of it.
#[inline]
pub fn parse_push(buf: &[u8]) -> Result<Option<(Push<'_>, usize)>, ProtocolError> {
    if let Some((push, used)) = fast_message(buf) {
        return Ok(Some((push, used)));
    }
    parse_push_general(buf)
}

/// Parses any push frame (arrays of bulk strings and integers, RESP2 `*` or RESP3 `>`).
fn parse_push_general(buf: &[u8]) -> Result<Option<(Push<'_>, usize)>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some((text, mut pos)) = line(buf, 1)? else {
        return Ok(None);
    };
    match tag {
        b'*' | b'>' => {}
        b'-' => return Ok(Some((Push::Error(text), pos))),
        b'+' => {
            return Ok(Some((
                Push::Other {
                    kind: text,
                    count: None,
                },
                pos,
            )));
        }
        b':' => {
            return Ok(Some((
                Push::Other {
                    kind: b"",
                    count: Some(parse_int(text)?),
                },
                pos,
            )));
        }
        _ => return Err(ProtocolError("expected an array")),
    }
    let len = parse_int(text)?;
    if !(1..=1024).contains(&len) {
        return Err(ProtocolError("unexpected array length"));
    }
    let len = len as usize;
    let mut elems = [Elem::Null; 4];
    let mut last = Elem::Null;
    for i in 0..len {
        let Some((elem, next)) = element(buf, pos)? else {
            return Ok(None);
        };
        if let Some(slot) = elems.get_mut(i) {
            *slot = elem;
        }
        last = elem;
        pos = next;
    }
    let kind = match elems[0] {
        Elem::Bulk(kind) | Elem::Simple(kind) => kind,
        _ => return Err(ProtocolError("push kind is not a string")),
    };
    let push = match (kind, len, elems[1], elems[2], elems[3]) {
        (b"message", 3, Elem::Bulk(channel), Elem::Bulk(payload), _)
        | (b"pmessage", 4, _, Elem::Bulk(channel), Elem::Bulk(payload)) => {
            Push::Message { channel, payload }
        }
        _ => Push::Other {
            kind,
            count: if let Elem::Int(n) = last {
                Some(n)
            } else {
                None
            },
        },
    };
    Ok(Some((push, pos)))
}

/// Parses one single-line reply (`:N` or `-ERR ...`) from the start of `buf`: the reply and
/// how many bytes it took, or `None` when the line is not complete yet.
#[inline]
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some((text, next)) = line(buf, 1)? else {
        return Ok(None);
    };
    match tag {
        b':' => Ok(Some((Reply::Int(parse_int(text)?), next))),
        b'-' => Ok(Some((Reply::Error(text), next))),
        _ => Err(ProtocolError("expected an integer reply")),
    }
}

/// The acknowledgement of a write command (`PUBLISH`'s `:N`, `XADD`'s `$len id`, `+OK`), or the
/// error that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack<'a> {
    /// The command succeeded (integer, simple string or non-null bulk string reply).
    Ok,
    /// The server refused it: an error reply (without the `-`), or a null bulk string.
    Error(&'a [u8]),
}

/// Parses one acknowledgement from the start of `buf`: what it said and how many bytes it took,
/// or `None` when it is not complete yet.
#[inline]
pub fn parse_ack(buf: &[u8]) -> Result<Option<(Ack<'_>, usize)>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some((text, next)) = line(buf, 1)? else {
        return Ok(None);
    };
    match tag {
        b':' => {
            parse_int(text)?;
            Ok(Some((Ack::Ok, next)))
        }
        b'+' => Ok(Some((Ack::Ok, next))),
        b'-' => Ok(Some((Ack::Error(text), next))),
        b'$' => {
            let len = parse_int(text)?;
            if len < 0 {
                return Ok(Some((Ack::Error(b"null reply"), next)));
            }
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("bulk string not terminated by CRLF"));
            }
            Ok(Some((Ack::Ok, end + 2)))
        }
        _ => Err(ProtocolError(
            "expected an integer, status or bulk string reply",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut v = b"*3\r\n$7\r\nmessage\r\n".to_vec();
        v.extend_from_slice(format!("${}\r\n", channel.len()).as_bytes());
        v.extend_from_slice(channel);
        v.extend_from_slice(b"\r\n");
        v.extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
        v.extend_from_slice(payload);
        v.extend_from_slice(b"\r\n");
        v
    }

    #[test]
    fn parses_a_message() {
        let frame = message(b"bench:0", b"hello\r\nworld");
        let (push, used) = parse_push(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            push,
            Push::Message {
                channel: b"bench:0",
                payload: b"hello\r\nworld"
            }
        );
    }

    #[test]
    fn every_split_of_a_message_is_incomplete() {
        let frame = message(b"bench:12", &[b'x'; 100]);
        for cut in 0..frame.len() {
            assert_eq!(parse_push(&frame[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn parses_back_to_back_frames_fed_in_pieces() {
        // Simulates a subscriber's read loop: a stream of frames arriving in odd-sized chunks.
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for i in 0..50u32 {
            let payload = vec![b'a' + (i % 26) as u8; (i as usize * 7) % 300];
            stream.extend_from_slice(&message(format!("bench:{i}").as_bytes(), &payload));
            expected.push(payload);
        }
        for chunk in [1, 2, 3, 7, 16, 100, 1000] {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                let mut start = 0;
                while let Some((push, used)) = parse_push(&buf[start..]).unwrap() {
                    let Push::Message { payload, .. } = push else {
                        panic!("not a message")
                    };
                    got.push(payload.to_vec());
                    start += used;
                }
                buf.drain(..start);
            }
            assert!(buf.is_empty());
            assert_eq!(got, expected, "chunk size {chunk}");
        }
    }

    #[test]
    fn fast_and_general_paths_agree() {
        let frame = message(b"bench:7", &[b'z'; 300]);
        let fast = parse_push(&frame).unwrap();
        assert_eq!(fast, parse_push_general(&frame).unwrap());
        assert_eq!(fast.unwrap().1, frame.len());
        // Shapes the fast path rejects still parse (or fail) through the general path.
        assert!(parse_push(b"*3\r\n$7\r\nmessage\r\n$-1\r\n$1\r\nx\r\n").is_ok());
        assert!(parse_push(b"*3\r\n$7\r\nmessage\r\n$\r\n\r\n$1\r\nx\r\n").is_err());
        assert!(parse_push(b"*3\r\n$7\r\nmessage\r\n$1\r\nab\r\n$1\r\nx\r\n").is_err());
    }

    #[test]
    fn parses_pmessage_and_resp3_push() {
        let frame = b"*4\r\n$8\r\npmessage\r\n$7\r\nbench:*\r\n$7\r\nbench:1\r\n$2\r\nhi\r\n";
        let (push, used) = parse_push(frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            push,
            Push::Message {
                channel: b"bench:1",
                payload: b"hi"
            }
        );
        let frame = b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$0\r\n\r\n";
        assert_eq!(
            parse_push(frame).unwrap().unwrap(),
            (
                Push::Message {
                    channel: b"c",
                    payload: b""
                },
                frame.len()
            )
        );
    }

    #[test]
    fn parses_subscribe_confirmation_and_errors() {
        let frame = b"*3\r\n$9\r\nsubscribe\r\n$7\r\nbench:0\r\n:1\r\n";
        assert_eq!(
            parse_push(frame).unwrap().unwrap(),
            (
                Push::Other {
                    kind: b"subscribe",
                    count: Some(1)
                },
                frame.len()
            )
        );
        assert_eq!(
            parse_push(b"-ERR nope\r\n").unwrap().unwrap(),
            (Push::Error(b"ERR nope"), 11)
        );
        assert!(parse_push(b"hello\r\n").is_err());
        assert!(parse_push(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nab\r\n").is_err());
        assert!(parse_push(b"*x\r\n").is_err());
        assert!(parse_push(b"*1\rx").is_err());
    }

    #[test]
    fn parses_replies() {
        assert_eq!(parse_reply(b":50\r\n:1"), Ok(Some((Reply::Int(50), 5))));
        assert_eq!(parse_reply(b":50\r"), Ok(None));
        assert_eq!(parse_reply(b""), Ok(None));
        assert_eq!(
            parse_reply(b"-ERR x\r\n"),
            Ok(Some((Reply::Error(b"ERR x"), 8)))
        );
        assert!(parse_reply(b"+OK\r\n").is_err());
        assert_eq!(parse_int(b"-12"), Ok(-12));
        assert!(parse_int(b"").is_err());
        assert!(parse_int(b"1a").is_err());
    }

    #[test]
    fn parses_acks() {
        assert_eq!(parse_ack(b":3\r\n"), Ok(Some((Ack::Ok, 4))));
        assert_eq!(parse_ack(b"+OK\r\n"), Ok(Some((Ack::Ok, 5))));
        let xadd = b"$15\r\n1700000000000-0\r\n:1";
        assert_eq!(parse_ack(xadd), Ok(Some((Ack::Ok, xadd.len() - 2))));
        for cut in 0..xadd.len() - 2 {
            assert_eq!(parse_ack(&xadd[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            parse_ack(b"-ERR no\r\n"),
            Ok(Some((Ack::Error(b"ERR no"), 9)))
        );
        assert_eq!(
            parse_ack(b"$-1\r\n"),
            Ok(Some((Ack::Error(b"null reply"), 5)))
        );
        assert!(parse_ack(b"*1\r\n").is_err());
        assert!(parse_ack(b"$2\r\nabc\r\n").is_err());
    }
}
