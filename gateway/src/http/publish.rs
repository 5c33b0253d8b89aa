//! `POST /api/publish`: publish one event (`{"channel", "data", "messageId"?}`) or several
//! (a JSON array of those, or `{"events": [...]}`), acknowledged after commit for durable
//! namespaces.
//!
//! A batch in which some events failed is answered 503 with a JSON body: `error` (how many
//! failed, and the first reason) and `results`, one per event in order, each either the
//! success fields or `{"channel", "error"}`: the others may be committed or delivered, so a
//! retry should send only the failed ones. A single event that fails gets a one-line 503.
//!
//! `data` that is a JSON string is published as its text; any other JSON value as its JSON text,
//! byte for byte except for whitespace between tokens (numbers keep every digit, objects their
//! key order). The reply names the event's position and its `id`: a cursor that resumes a stream
//! right after this event. A `messageId` makes a retry safe: within the dedup window it returns
//! the original position with `"duplicate": true` and commits nothing.

use super::{HttpState, error_response};
use crate::broker::{MAX_MESSAGE_ID_BYTES, Published, check_publish_channel};
use crate::hub::Wakes;
use crate::stream::position_text;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_storage::StorageError;
use herald_storage::{Cursor, Publish};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// One event to publish.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The channel.
    pub channel: String,
    /// The payload, as the client wrote it (see `payload_of`).
    pub data: Box<RawValue>,
    /// Makes retries idempotent within the dedup window.
    #[serde(rename = "messageId")]
    pub message_id: Option<String>,
}

/// `{"events": [...]}`, the wrapped batch form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    events: Vec<PublishRequest>,
}

/// The events of a request body and whether it was a batch, or why it is not a publish
/// request. Each form is parsed on its own (not as an untagged enum): the error then names
/// the field at fault, and `data` can stay raw (serde's untagged enums cannot hold a
/// [`RawValue`]).
fn parse_body(body: &[u8]) -> Result<(Vec<PublishRequest>, bool), String> {
    // A UTF-8 byte order mark, as some Windows tools (PowerShell, .NET writers) put before
    // JSON: RFC 8259 lets a parser ignore it, and serde_json does not.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => parse::<Vec<PublishRequest>>(body).map(|events| (events, true)),
        Some(b'{') => match serde_json::from_slice::<PublishRequest>(body) {
            Ok(one) => Ok((vec![one], false)),
            Err(one_error) => {
                let wrapped = serde_json::from_slice::<
                    std::collections::HashMap<String, serde::de::IgnoredAny>,
                >(body)
                .is_ok_and(|fields| fields.contains_key("events"));
                if !wrapped {
                    return Err(explain::<PublishRequest>(body, one_error));
                }
                parse::<Wrapped>(body).map(|w| (w.events, true))
            }
        },
        _ => Err("the body is not a JSON object or array".into()),
    }
}

/// What an event is, as the errors name it.
const EVENT_SHAPE: &str = r#"an event object {"channel", "data", "messageId"?}"#;

/// `body` parsed as a `T`, or why it is not one (see [`explain`]).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|error| explain::<T>(body, error))
}

/// Why `body` is not a `T`, given `error`, the parse's own. A value of the wrong type, a
/// missing or an unknown field is told with where it is (``event 1: `channel`: invalid
/// type: ...``, events counted from 0 as in the other errors), without serde's position in
/// the body; malformed JSON keeps that position, its only pointer. The path is tracked by
/// parsing the body again, on this error path only: tracking it would slow every publish's
/// parse.
fn explain<T: serde::de::DeserializeOwned>(body: &[u8], error: serde_json::Error) -> String {
    if error.classify() != serde_json::error::Category::Data {
        return error.to_string();
    }
    let mut parser = serde_json::Deserializer::from_slice(body);
    let Err(tracked) = serde_path_to_error::deserialize::<_, T>(&mut parser) else {
        return error.to_string();
    };
    let mut told = Vec::new();
    let mut segments = tracked.path().iter().peekable();
    while let Some(segment) = segments.next() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => told.push(format!("event {index}")),
            // `{"events": [...]}`: the event's number says it.
            serde_path_to_error::Segment::Map { key }
                if key == "events"
                    && matches!(
                        segments.peek(),
                        Some(serde_path_to_error::Segment::Seq { .. })
                    ) => {}
            serde_path_to_error::Segment::Map { key } => told.push(format!("`{key}`")),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    let reason = tracked.into_inner();
    let mut reason = reason.to_string();
    // serde_json appends the position to the message: the path says it better.
    if let Some(at) = reason.rfind(" at line ") {
        reason.truncate(at);
    }
    // serde names the Rust type where a value is no object: say what the client is to send.
    reason = reason.replace("struct PublishRequest", EVENT_SHAPE);
    // The path of an unknown field ends with it, which the reason names already.
    if reason.starts_with("unknown field") {
        told.pop();
    }
    told.push(reason);
    told.join(": ")
}

/// The bytes an event's `data` publishes: a JSON string's text, else the JSON text as sent
/// without the whitespace between tokens. Re-serializing a parsed value instead would round
/// big numbers (`12345678901234567890123` became `1.2345678901234568e22`) and sort keys.
///
/// A string holding half of a UTF-16 surrogate pair (`"\ud800"`) is refused: its text has no
/// UTF-8 form. (Inside an object or array the escape is kept as written, valid JSON text.)
fn payload_of(data: &RawValue) -> Result<Bytes, String> {
    let raw = data.get();
    if raw.starts_with('"') {
        if let Some(escape) = unpaired_surrogate(raw) {
            return Err(format!(
                "the string holds an unpaired UTF-16 surrogate ({escape}), which no UTF-8 text \
                 can carry; send the whole character (a high and a low surrogate in a row), or \
                 the data as an object or array"
            ));
        }
        // The raw value passed the body's parse, so only a surrogate can fail here; the
        // position serde would give is inside the string, not the body, and is left out.
        return serde_json::from_str::<String>(raw)
            .map(Bytes::from)
            .map_err(|e| {
                let text = e.to_string();
                match text.find(" at line ") {
                    Some(at) => text[..at].to_string(),
                    None => text,
                }
            });
    }
    let mut out = Vec::with_capacity(raw.len());
    let (mut in_string, mut escaped) = (false, false);
    for &byte in raw.as_bytes() {
        if in_string {
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = byte == b'"';
            out.push(byte);
        }
    }
    Ok(Bytes::from(out))
}

/// The first `\uXXXX` escape of the JSON string `raw` that is half of a surrogate pair without
/// its other half, as written.
fn unpaired_surrogate(raw: &str) -> Option<&str> {
    let bytes = raw.as_bytes();
    // The code unit of the `\uXXXX` escape at `i`, if there is one.
    let unit = |i: usize| -> Option<u16> {
        if bytes.get(i..i + 2)? != b"\\u" {
            return None;
        }
        u16::from_str_radix(raw.get(i + 2..i + 6)?, 16).ok()
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        match unit(i) {
            Some(0xD800..=0xDBFF) if matches!(unit(i + 6), Some(0xDC00..=0xDFFF)) => i += 12,
            Some(0xD800..=0xDFFF) => return raw.get(i..i + 6),
            Some(_) => i += 6,
            // Any other escape is two bytes (`\\` included, so its second `\` is not read as
            // the start of another).
            None => i += 2,
        }
    }
    None
}

/// Most events in one batch request.
const MAX_BATCH: usize = 10_000;

/// Largest request body: see [`super::body`] for how one over it is answered.
pub const MAX_BODY_BYTES: usize = super::body::MAX_BODY_BYTES;

/// `POST /api/publish`. Its body is read by [`super::body::limit`] first: one over
/// [`MAX_BODY_BYTES`] gets a 413 and never reaches this handler.
pub async fn publish(State(state): State<HttpState>, body: Bytes) -> Response {
    let (events, batch) = match parse_body(&body) {
        Ok(parsed) => parsed,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid publish request: {error}; expected {{\"channel\": \"...\", \"data\": ..., \"messageId\"?: \"...\"}}, an array of them, or {{\"events\": [...]}}"
                ),
            );
        }
    };
    if events.len() > MAX_BATCH {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_BATCH} events per request"),
        );
    }
    if let Some(long) = events.iter().position(|e| {
        e.message_id
            .as_ref()
            .is_some_and(|id| id.len() > MAX_MESSAGE_ID_BYTES)
    }) {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!("event {long} has a messageId longer than {MAX_MESSAGE_ID_BYTES} bytes"),
        );
    }
    if let Some(empty) = events.iter().position(|e| e.channel.is_empty()) {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!("event {empty} has an empty channel"),
        );
    }
    for (i, event) in events.iter().enumerate() {
        if let Err(reason) = check_publish_channel(event.channel.as_bytes()) {
            return error_response(StatusCode::BAD_REQUEST, format!("event {i}: {reason}"));
        }
    }
    let broker = state.broker().clone();
    // Queue every event first (in order, as one request), then wait: the batch shares one
    // commit.
    let mut wakes = Wakes::default();
    let mut publishes = Vec::with_capacity(events.len());
    for (i, event) in events.into_iter().enumerate() {
        let payload = match payload_of(&event.data) {
            Ok(payload) => payload,
            Err(error) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    format!("event {i} has invalid data: {error}"),
                );
            }
        };
        publishes.push(Publish {
            channel: Bytes::from(event.channel),
            payload,
            message_id: event.message_id.map(Bytes::from),
        });
    }
    let channels: Vec<Bytes> = publishes.iter().map(|p| p.channel.clone()).collect();
    let tickets = broker.enqueue_many(publishes, &mut wakes).await;
    wakes.wake_all();
    let mut results = Vec::with_capacity(tickets.len());
    let (mut failures, mut first_failure) = (0usize, None);
    for (channel, ticket) in channels.into_iter().zip(tickets) {
        // A refusal at enqueue is certain (never queued); a failure after it may not be.
        let outcome = match ticket {
            Ok(ticket) => broker.wait(ticket).await.map_err(|e| failure(&e)),
            Err(error) => Err(format!("publish failed: {error}")),
        };
        match outcome {
            Ok(published) => results.push(describe(&state, &channel, published)),
            Err(message) => {
                failures += 1;
                first_failure.get_or_insert_with(|| message.clone());
                results.push(json!({
                    "channel": String::from_utf8_lossy(&channel),
                    "error": message,
                }));
            }
        }
    }
    match (first_failure, batch) {
        (None, true) => Json(json!({ "results": results })).into_response(),
        (None, false) => Json(results.pop().expect("one result")).into_response(),
        (Some(message), false) => error_response(StatusCode::SERVICE_UNAVAILABLE, message),
        // The others of the batch may be committed or delivered: say which, so that a retry
        // sends only the failed ones.
        (Some(first), true) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": format!("{failures} of {} events failed; the first: {first}", results.len()),
                "results": results,
            })),
        )
            .into_response(),
    }
}

/// What a client is told about a publish that failed after it was queued.
fn failure(error: &StorageError) -> String {
    match error {
        // A cluster error says itself whether anything may have committed; a broken store
        // refuses before it writes.
        StorageError::Unavailable(_) | StorageError::Broken => format!("publish failed: {error}"),
        _ => format!(
            "publish failed: {error}; its outcome is unknown: retry with the same messageId"
        ),
    }
}

fn describe(state: &HttpState, channel: &[u8], published: Published) -> Value {
    let id = published.position.map(|position| {
        let mut cursor = Cursor::new(state.broker().epoch());
        cursor.advance(position);
        cursor.encode()
    });
    json!({
        "channel": String::from_utf8_lossy(channel),
        "id": id,
        "position": position_text(published.position),
        "durable": published.position.is_some(),
        "duplicate": published.duplicate,
        "receivers": published.receivers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(json: &str) -> String {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        String::from_utf8(payload_of(&raw).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn data_keeps_its_digits_and_key_order_and_loses_only_whitespace() {
        assert_eq!(
            payload(r#" { "z" : 12345678901234567890123 , "a" : [ 1.10 , 1E2 ] } "#),
            r#"{"z":12345678901234567890123,"a":[1.10,1E2]}"#
        );
        // Whitespace and escapes inside strings are the client's.
        assert_eq!(
            payload(r#"{"s": "a b\t\" \\ \"c d"}"#),
            r#"{"s":"a b\t\" \\ \"c d"}"#
        );
        // A string is published as its text.
        assert_eq!(payload(r#""line 1\nline 2 \u00e9""#), "line 1\nline 2 é");
        assert_eq!(payload("null"), "null");
    }

    #[test]
    fn a_string_with_half_a_surrogate_pair_is_refused_without_a_misleading_position() {
        let error = |json: &str| {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            payload_of(&raw).unwrap_err()
        };
        for (json, escape) in [
            (r#""\ud800""#, r"\ud800"),
            (r#""ok \uDC00 then""#, r"\uDC00"),
            (r#""\ud83d\u0041""#, r"\ud83d"),
            (r#""\\ud800 \ud800""#, r"\ud800"),
        ] {
            let reason = error(json);
            assert!(
                reason.contains("unpaired UTF-16 surrogate") && reason.contains(escape),
                "{json}: {reason}"
            );
            assert!(
                !reason.contains("line") && !reason.contains('\n'),
                "{reason}"
            );
        }
        // A whole pair is a character; an escaped backslash before `u` is no escape.
        assert_eq!(payload(r#""\ud83d\ude00""#), "\u{1F600}");
        assert_eq!(payload(r#""\\ud800""#), r"\ud800");
        // Inside an object the escape is kept as written.
        assert_eq!(payload(r#"{"a":"\ud800"}"#), r#"{"a":"\ud800"}"#);
    }

    #[test]
    fn a_bad_body_is_told_by_the_field_at_fault() {
        let error = |body: &str| parse_body(body.as_bytes()).err().unwrap();
        assert!(error(r#"{"data": 1}"#).contains("missing field `channel`"));
        assert!(error(r#"{"channel": "a", "data": 1, "id": 2}"#).contains("unknown field `id`"));
        assert!(error(r#"{"channel": 5, "data": 1}"#).contains("invalid type: integer `5`"));
        assert_eq!(
            error(r#"{"channel": 5, "data": "x"}"#),
            "`channel`: invalid type: integer `5`, expected a string"
        );
        assert_eq!(
            error(r#"{"channel": "a", "data": "x", "messageId": 5}"#),
            "`messageId`: invalid type: integer `5`, expected a string"
        );
        assert_eq!(
            error(r#"[{"channel": "ok", "data": 1}, {"channel": 1, "data": 1}]"#),
            "event 1: `channel`: invalid type: integer `1`, expected a string"
        );
        assert_eq!(
            error(r#"{"events": [{"channel": "ok", "data": 1}, {"channel": [], "data": 1}]}"#),
            "event 1: `channel`: invalid type: sequence, expected a string"
        );
        assert_eq!(
            error(r#"[{"channel": "ok", "data": 1}, {"channel": "a"}]"#),
            "event 1: missing field `data`"
        );
        assert_eq!(
            error(r#"{"events": 5}"#),
            "`events`: invalid type: integer `5`, expected a sequence"
        );
        assert_eq!(
            error(r#"[{"channel": "a", "data": 1}, {"channel": "a", "data": 1, "id": 2}]"#),
            "event 1: unknown field `id`, expected one of `channel`, `data`, `messageId`"
        );
        // Malformed JSON keeps serde's position: it has no path.
        assert_eq!(
            error(r#"[{"channel": "a", "data": 1}, {"channel": "a""#),
            "EOF while parsing an object at line 1 column 45"
        );
        assert!(error(r#"{"events": [{"channel": "a"}]}"#).contains("missing field `data`"));
        assert!(error(r#"[{"channel": "a", "data": 1}, {}]"#).contains("missing field"));
        assert_eq!(error("42"), "the body is not a JSON object or array");
        // An element that is no object is told what an event is, not serde's type name.
        assert_eq!(
            error(r#"[{"channel": "a", "data": 1}, 7]"#),
            r#"event 1: invalid type: integer `7`, expected an event object {"channel", "data", "messageId"?}"#
        );
        assert_eq!(
            error(r#"{"events": ["x"]}"#),
            r#"event 0: invalid type: string "x", expected an event object {"channel", "data", "messageId"?}"#
        );
        let (events, batch) = parse_body(br#"{"events": [{"channel": "a", "data": 1}]}"#).unwrap();
        assert_eq!((events.len(), batch), (1, true));
        let (events, batch) = parse_body(br#"{"channel": "a", "data": {"x": 1}}"#).unwrap();
        assert_eq!((events.len(), batch), (1, false));
        assert_eq!(events[0].data.get(), r#"{"x": 1}"#);
        // A byte order mark before the JSON is skipped.
        let (events, batch) =
            parse_body(b"\xEF\xBB\xBF[{\"channel\": \"a\", \"data\": 1}]").unwrap();
        assert_eq!((events.len(), batch), (1, true));
    }
}
