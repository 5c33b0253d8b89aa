//! `POST /api/publish`: publish one event (`{"channel", "data", "messageId"?}`) or several
//! (a JSON array of those, or `{"events": [...]}`), acknowledged after commit for durable
//! namespaces.
//!
//! A batch in which some events failed is answered 503 with a JSON body: `error` (how many
//! failed, and the first reason) and `results`, one per event in order, each either the
//! success fields or `{"channel", "error"}`: the others may be committed or delivered, so a
//! retry should send only the failed ones. A single event that fails gets a one-line 503.
//!
//! `data` that is a JSON string is published as its text; any other JSON value as its compact
//! JSON. The reply names the event's position and its `id`: a cursor that resumes a stream
//! right after this event. A `messageId` makes a retry safe: within the dedup window it returns
//! the original position with `"duplicate": true` and commits nothing.

use super::{HttpState, error_response};
use crate::broker::Published;
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
use serde_json::{Value, json};

/// One event to publish.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The channel.
    pub channel: String,
    /// The payload.
    pub data: Value,
    /// Makes retries idempotent within the dedup window.
    #[serde(rename = "messageId")]
    pub message_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Body {
    One(PublishRequest),
    Many(Vec<PublishRequest>),
    Wrapped { events: Vec<PublishRequest> },
}

/// Most events in one batch request.
const MAX_BATCH: usize = 10_000;

/// `POST /api/publish`.
pub async fn publish(State(state): State<HttpState>, body: Bytes) -> Response {
    let parsed: Body = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid publish request: {error}; expected {{\"channel\": \"...\", \"data\": ..., \"messageId\"?: \"...\"}} or an array of them"
                ),
            );
        }
    };
    let (events, batch) = match parsed {
        Body::One(one) => (vec![one], false),
        Body::Many(many) | Body::Wrapped { events: many } => (many, true),
    };
    if events.len() > MAX_BATCH {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_BATCH} events per request"),
        );
    }
    if let Some(empty) = events.iter().position(|e| e.channel.is_empty()) {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!("event {empty} has an empty channel"),
        );
    }
    let broker = state.broker().clone();
    // Queue every event first (in order, as one request), then wait: the batch shares one
    // commit.
    let mut wakes = Wakes::default();
    let publishes: Vec<Publish> = events
        .into_iter()
        .map(|event| Publish {
            channel: Bytes::from(event.channel),
            payload: match event.data {
                Value::String(text) => Bytes::from(text),
                other => Bytes::from(other.to_string()),
            },
            message_id: event.message_id.map(Bytes::from),
        })
        .collect();
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
        // A cluster error says itself whether anything may have committed.
        StorageError::Unavailable(_) => format!("publish failed: {error}"),
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
