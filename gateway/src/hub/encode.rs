//! How one published message becomes a frame for each kind of receiver, encoded at most once per
//! format and shared by all receivers of that format.
//!
//! - RESP2 / RESP3: the complete `message` / `pmessage` / `smessage` frame.
//! - SSE: the `data:` lines and the blank line that ends the event; the stream's writer puts the
//!   `id:` line (the stream's cursor) in front.
//! - WebSocket: a JSON object missing its opening: the writer puts `{"id":"<cursor>",` (or `{`) in
//!   front. A payload that is a JSON object is merged into the message, so the seed's messages
//!   (`{"type":"job_progress",...}`) reach browsers unchanged, plus `id` and `channel`; any other
//!   payload (an object whose own `channel`, or `id` next to a cursor, would clash included) is
//!   carried as `{"type":"message","channel":...,"data":...}`, where `data` is the payload itself
//!   when it is a JSON object or array, and otherwise its text as a JSON string (see
//!   [`websocket_tail`]).

use crate::resp::frame::{Protocol, encode_bulk, encode_header};
use bytes::{BufMut, Bytes, BytesMut};
use serde::de::IgnoredAny;

/// The wire format a receiver takes its frames in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Format {
    /// RESP2 arrays.
    Resp2 = 0,
    /// RESP3 push frames.
    Resp3 = 1,
    /// Server-Sent Events.
    Sse = 2,
    /// WebSocket text messages with JSON.
    WebSocket = 3,
    /// A RESP2 history subscription (`HSUBSCRIBE`): `hmessage` arrays carrying cursors.
    RespStream2 = 4,
    /// A RESP3 history subscription: `hmessage` push frames carrying cursors.
    RespStream3 = 5,
}

impl Format {
    /// The format of a RESP client speaking `protocol`.
    pub fn resp(protocol: Protocol) -> Format {
        match protocol {
            Protocol::Resp2 => Format::Resp2,
            Protocol::Resp3 => Format::Resp3,
        }
    }

    pub(crate) fn from_u8(value: u8) -> Format {
        match value {
            1 => Format::Resp3,
            2 => Format::Sse,
            3 => Format::WebSocket,
            4 => Format::RespStream2,
            5 => Format::RespStream3,
            _ => Format::Resp2,
        }
    }
}

/// A message's frames, encoded on first use per format.
pub(crate) struct Encoded<'a> {
    /// `message`, `pmessage` or `smessage`.
    kind: &'static [u8],
    /// The pattern, for `pmessage`.
    pattern: Option<&'a [u8]>,
    channel: &'a [u8],
    payload: &'a [u8],
    /// Whether the message has a history position (the stream writer adds the cursor).
    positioned: bool,
    frames: [Option<Bytes>; 6],
}

impl<'a> Encoded<'a> {
    pub(crate) fn new(
        kind: &'static [u8],
        pattern: Option<&'a [u8]>,
        channel: &'a [u8],
        payload: &'a [u8],
        positioned: bool,
    ) -> Self {
        Encoded {
            kind,
            pattern,
            channel,
            payload,
            positioned,
            frames: Default::default(),
        }
    }

    /// The frame for `format`, encoding it the first time.
    pub(crate) fn frame(&mut self, format: Format) -> Bytes {
        if let Some(frame) = &self.frames[format as usize] {
            return frame.clone();
        }
        let frame = match format {
            Format::Resp2 => self.resp(b'*'),
            Format::Resp3 => self.resp(b'>'),
            Format::Sse => sse_data(self.payload),
            Format::WebSocket => websocket_tail(self.channel, self.payload, self.positioned),
            Format::RespStream2 | Format::RespStream3 if self.positioned => {
                resp_payload(self.payload)
            }
            Format::RespStream2 => hmessage(b'*', self.channel, None, self.payload),
            Format::RespStream3 => hmessage(b'>', self.channel, None, self.payload),
        };
        self.frames[format as usize] = Some(frame.clone());
        frame
    }

    fn resp(&self, aggregate: u8) -> Bytes {
        let parts = 2 + self.pattern.is_some() as i64;
        let size = 48
            + self.kind.len()
            + self.channel.len()
            + self.payload.len()
            + self.pattern.map_or(0, <[u8]>::len);
        let mut out = BytesMut::with_capacity(size);
        encode_header(&mut out, aggregate, 1 + parts);
        encode_bulk(&mut out, self.kind);
        if let Some(pattern) = self.pattern {
            encode_bulk(&mut out, pattern);
        }
        encode_bulk(&mut out, self.channel);
        encode_bulk(&mut out, self.payload);
        out.freeze()
    }
}

/// The payload as a RESP bulk string: the part of an `hmessage` shared by all receivers.
pub fn resp_payload(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 16);
    encode_bulk(&mut out, payload);
    out.freeze()
}

/// A whole `hmessage` frame: `[hmessage, channel, cursor or nil, payload]`.
pub fn hmessage(aggregate: u8, channel: &[u8], cursor: Option<&[u8]>, payload: &[u8]) -> Bytes {
    let mut out = hmessage_head(aggregate, channel, cursor);
    encode_bulk(&mut out, payload);
    out.freeze()
}

/// Everything of an `hmessage` frame before its payload.
pub fn hmessage_head(aggregate: u8, channel: &[u8], cursor: Option<&[u8]>) -> BytesMut {
    let mut out = BytesMut::with_capacity(48 + channel.len());
    encode_header(&mut out, aggregate, 4);
    encode_bulk(&mut out, b"hmessage");
    encode_bulk(&mut out, channel);
    match cursor {
        Some(cursor) => encode_bulk(&mut out, cursor),
        None if aggregate == b'>' => out.put_slice(b"_\r\n"),
        None => out.put_slice(b"$-1\r\n"),
    }
    out
}

/// The `data:` lines of an SSE event and the blank line ending it. SSE treats CR, LF and CRLF
/// alike as line ends, so each becomes a line break the client rejoins with LF.
pub fn sse_data(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 16);
    let mut rest = payload;
    loop {
        out.put_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(end) => {
                out.put_slice(&rest[..end]);
                out.put_u8(b'\n');
                let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[end + skip..];
            }
            None => {
                out.put_slice(rest);
                out.put_u8(b'\n');
                break;
            }
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// The WebSocket message for `payload` on `channel`, without its opening `{`. `positioned`:
/// the writer puts an `id` (the cursor) in front, so a payload's own `id` would clash.
///
/// A payload that is not merged (see `json_object_body`) goes in `data`: as itself when it is
/// a JSON object or array (structured data, as `JSON.stringify` writes it), otherwise as its
/// text in a JSON string. Scalars are never re-read as JSON: `7` and `"7"`, `true` and `True`,
/// `quoted` and `"quoted"` stay the distinct texts they were published as (what SSE's
/// `event.data` gives too), and an id such as `12345678901234567890` cannot become a number
/// that JavaScript rounds. A payload that is not UTF-8 is always a string, its invalid bytes
/// replaced by U+FFFD.
pub fn websocket_tail(channel: &[u8], payload: &[u8], positioned: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + channel.len() + 48);
    out.put_slice(b"\"channel\":");
    put_json_string(&mut out, channel);
    // Invalid UTF-8 inside a JSON string passes serde's syntax checks (it skips strings it
    // does not build): copied raw, it would make the message invalid.
    let utf8 = std::str::from_utf8(payload).is_ok();
    match json_object_body(payload, positioned).filter(|_| utf8) {
        Some(body) if body.iter().filter(|b| !b.is_ascii_whitespace()).eq([&b'}']) => {
            out.put_u8(b'}')
        }
        Some(body) => {
            out.put_u8(b',');
            out.put_slice(body);
        }
        None => {
            out.put_slice(b",\"type\":\"message\",\"data\":");
            if utf8 && is_json_structure(payload) {
                out.put_slice(payload);
            } else {
                put_json_string(&mut out, payload);
            }
            out.put_u8(b'}');
        }
    }
    out.freeze()
}

/// Whether `payload` is one JSON object or array (surrounding whitespace allowed).
fn is_json_structure(payload: &[u8]) -> bool {
    matches!(
        payload.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    ) && serde_json::from_slice::<IgnoredAny>(payload).is_ok()
}

/// For a payload that is one JSON object without a field of its own named `channel` (nor
/// `id`, when the message gets a cursor), everything after its opening brace. An object with
/// such a field is sent wrapped in `data`: merged, the message would carry the key twice, and
/// a client's JSON parser would keep the payload's value, losing the event's cursor or channel.
/// A field counts whatever its value, `null` included.
fn json_object_body(payload: &[u8], positioned: bool) -> Option<&[u8]> {
    /// The fields that can clash (present or not: an `Option` would take `null` for absent);
    /// the rest are skipped without being built.
    #[derive(serde::Deserialize)]
    struct Clashing {
        #[serde(default, deserialize_with = "present")]
        id: bool,
        #[serde(default, deserialize_with = "present")]
        channel: bool,
    }
    fn present<'de, D: serde::Deserializer<'de>>(field: D) -> Result<bool, D::Error> {
        serde::Deserialize::deserialize(field).map(|IgnoredAny| true)
    }
    let start = payload.iter().position(|b| !b.is_ascii_whitespace())?;
    if payload[start] != b'{' {
        return None;
    }
    // A duplicate `id` or `channel` in the payload fails here too, and is wrapped.
    let fields: Clashing = serde_json::from_slice(payload).ok()?;
    let clash = fields.channel || (positioned && fields.id);
    (!clash).then(|| &payload[start + 1..])
}

/// Writes `bytes` as a JSON string (invalid UTF-8 replaced by U+FFFD).
pub fn put_json_string(out: &mut BytesMut, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let encoded = serde_json::to_string(&text).expect("strings always serialize");
    out.put_slice(encoded.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn resp_frames_keep_empty_parts() {
        let mut e = Encoded::new(b"message", None, b"", b"", false);
        assert_eq!(
            text(e.frame(Format::Resp2)),
            "*3\r\n$7\r\nmessage\r\n$0\r\n\r\n$0\r\n\r\n"
        );
        let mut p = Encoded::new(b"pmessage", Some(b"a*"), b"ab", b"x", false);
        assert_eq!(
            text(p.frame(Format::Resp3)),
            ">4\r\n$8\r\npmessage\r\n$2\r\na*\r\n$2\r\nab\r\n$1\r\nx\r\n"
        );
    }

    #[test]
    fn sse_lines() {
        assert_eq!(text(sse_data(b"{\"a\":1}")), "data: {\"a\":1}\n\n");
        assert_eq!(
            text(sse_data(b"a\nb\r\nc\rd")),
            "data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(text(sse_data(b"")), "data: \n\n");
        assert_eq!(text(sse_data(b"end\n")), "data: end\ndata: \n\n");
    }

    #[test]
    fn websocket_messages() {
        let merged = text(websocket_tail(
            b"job_progress:j1",
            br#"{"type":"job_progress","progress":0.5}"#,
            true,
        ));
        assert_eq!(
            merged,
            r#""channel":"job_progress:j1","type":"job_progress","progress":0.5}"#
        );
        assert_eq!(text(websocket_tail(b"c", b"{}", true)), r#""channel":"c"}"#);
        // Scalars are their text, never re-read as JSON.
        assert_eq!(
            text(websocket_tail(b"c", b"42", true)),
            r#""channel":"c","type":"message","data":"42"}"#
        );
        assert_eq!(
            text(websocket_tail(b"c", b"12345678901234567890", true)),
            r#""channel":"c","type":"message","data":"12345678901234567890"}"#
        );
        assert_eq!(
            text(websocket_tail(b"c", br#""quoted""#, true)),
            r#""channel":"c","type":"message","data":"\"quoted\""}"#
        );
        assert_eq!(
            text(websocket_tail(b"c", b"null", true)),
            r#""channel":"c","type":"message","data":"null"}"#
        );
        // Arrays are structured data, embedded as they are.
        assert_eq!(
            text(websocket_tail(b"c", b" [1,\"a\"]", true)),
            r#""channel":"c","type":"message","data": [1,"a"]}"#
        );
        assert_eq!(
            text(websocket_tail(b"c", b"hi\n\"x\"", true)),
            r#""channel":"c","type":"message","data":"hi\n\"x\""}"#
        );
        let full = format!(
            "{{{}",
            text(websocket_tail(b"c", br#" {"k":[1,2]} "#, true))
        );
        let value: serde_json::Value = serde_json::from_str(&full).unwrap();
        assert_eq!(value["k"][1], 2);
        // A payload with its own `id` or `channel` is wrapped, so neither key appears twice.
        assert_eq!(
            text(websocket_tail(b"c", br#"{"type":"t","id":"mine"}"#, true)),
            r#""channel":"c","type":"message","data":{"type":"t","id":"mine"}}"#
        );
        // Without a cursor (a non-durable event) the payload's `id` clashes with nothing.
        assert_eq!(
            text(websocket_tail(b"c", br#"{"type":"t","id":"mine"}"#, false)),
            r#""channel":"c","type":"t","id":"mine"}"#
        );
        assert_eq!(
            text(websocket_tail(b"c", br#"{"channel":"other"}"#, false)),
            r#""channel":"c","type":"message","data":{"channel":"other"}}"#
        );
        // A null of its own is a field of its own.
        assert_eq!(
            text(websocket_tail(b"c", br#"{"id":null}"#, true)),
            r#""channel":"c","type":"message","data":{"id":null}}"#
        );
        assert_eq!(
            text(websocket_tail(b"c", br#"{"channel":null,"x":1}"#, false)),
            r#""channel":"c","type":"message","data":{"channel":null,"x":1}}"#
        );
        // Invalid UTF-8, inside a JSON string or not, still makes a valid message.
        for payload in [&b"{\"a\":\"\xff\"}"[..], b"[\"\xff\"]", b"bad\xff"] {
            let tail = websocket_tail(b"c", payload, true);
            let message = format!("{{{}", std::str::from_utf8(&tail).unwrap());
            let value: serde_json::Value = serde_json::from_str(&message).unwrap();
            assert!(
                value["data"].as_str().unwrap().contains('\u{FFFD}'),
                "{message}"
            );
        }
    }
}
