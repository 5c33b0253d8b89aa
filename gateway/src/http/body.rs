//! Request bodies of the `POST` endpoints (`/api/publish`, `/api/cluster/*`): at most
//! [`MAX_BODY_BYTES`], read in full by [`limit`] before the handler runs.
//!
//! - A `Content-Length` over the limit is answered 413 at once: the body is not read (no
//!   `100 Continue` invites it), and hyper closes the connection after the answer, as it does
//!   whenever a request's body is left unread.
//! - A body without a length (`Transfer-Encoding: chunked`) that passes the limit while it is
//!   read gets the same 413, once the rest of it is read and dropped (at most
//!   [`MAX_DISCARDED_BYTES`] more, for at most [`DISCARD_TIME`], each piece within
//!   [`DISCARD_IDLE`]). Answering at once and closing would lose the answer for most clients:
//!   they read only once their request is sent, and closing a socket with unread bytes in it
//!   sends a TCP reset, which fails their next write and can discard the answer sent just
//!   before. Read to its end, the body leaves the connection usable for the next request; a
//!   client that sends more than the bound gets the 413 and the connection closed.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// Largest request body. Equal to axum's own `DefaultBodyLimit`, which the handlers' `Bytes`
/// and `Json` extractors still apply: raising this alone would leave bodies over 2 MiB refused
/// by axum; raise that limit (`DefaultBodyLimit::max`) with it.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Most bytes of a body over the limit read and dropped before the 413 goes out.
pub const MAX_DISCARDED_BYTES: usize = 64 * 1024 * 1024;

/// Longest time spent reading and dropping a body over the limit before the 413 goes out.
pub const DISCARD_TIME: Duration = Duration::from_secs(30);

/// Longest wait for the next piece of a body being dropped.
pub const DISCARD_IDLE: Duration = Duration::from_secs(5);

/// How an endpoint words its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errors {
    /// A plain-text line (`/api/publish`).
    Text,
    /// `{"error": "..."}` (`/api/cluster/*`, whose CLI reads that field).
    Json,
}

impl Errors {
    /// The answer to a body over [`MAX_BODY_BYTES`].
    pub fn too_large(self) -> Response {
        let over = format!("the request body is over the limit of {MAX_BODY_BYTES} bytes (2 MiB)");
        match self {
            // The publish API's other errors' shape, with what to do (axum's own words,
            // "length limit exceeded", said neither).
            Errors::Text => super::error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{over}: split the events over several requests; one event's data must \
                     fit in one request"
                ),
            ),
            Errors::Json => self.error(StatusCode::PAYLOAD_TOO_LARGE, over),
        }
    }

    /// An error answer with `message`.
    fn error(self, status: StatusCode, message: String) -> Response {
        match self {
            Errors::Text => (status, message).into_response(),
            Errors::Json => (status, Json(json!({ "error": message }))).into_response(),
        }
    }
}

/// Middleware: reads the request's body (see the module docs for one over the limit) and runs
/// the handler with it in memory, or answers 413 (400 if the body cannot be read: a malformed
/// chunk, a client gone) worded as `errors` says.
pub async fn limit(errors: Errors, request: Request, next: Next) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return errors.too_large();
    }
    let (parts, body) = request.into_parts();
    match read(body).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(Refused::TooLarge) => errors.too_large(),
        Err(Refused::Unreadable(error)) => errors.error(
            StatusCode::BAD_REQUEST,
            format!("Failed to buffer the request body: {error}"),
        ),
    }
}

/// Why a body was not read.
#[derive(Debug)]
enum Refused {
    /// It passed [`MAX_BODY_BYTES`] (and was dropped as far as the bounds allow).
    TooLarge,
    /// It could not be read.
    Unreadable(axum::Error),
}

/// The whole of `body` if it is at most [`MAX_BODY_BYTES`]; once it passes that, the rest is
/// read and dropped within the bounds before `TooLarge` is returned.
async fn read(body: Body) -> Result<Bytes, Refused> {
    let mut pieces = body.into_data_stream();
    let (mut kept, mut len) = (Vec::new(), 0);
    while let Some(piece) = pieces.next().await {
        let piece = piece.map_err(Refused::Unreadable)?;
        len += piece.len();
        if len > MAX_BODY_BYTES {
            discard(pieces, len - MAX_BODY_BYTES).await;
            return Err(Refused::TooLarge);
        }
        kept.push(piece);
    }
    // A body that came in one piece (as a short one usually does) is not copied.
    Ok(match <[Bytes; 1]>::try_from(kept) {
        Ok([one]) => one,
        Err(kept) => Bytes::from(kept.concat()),
    })
}

/// Reads and drops what is left of a body over the limit (`over` bytes past it read so far),
/// until it ends or a bound is reached (see the module docs).
async fn discard(
    mut pieces: impl futures::Stream<Item = Result<Bytes, axum::Error>> + Unpin,
    mut over: usize,
) {
    let deadline = Instant::now() + DISCARD_TIME;
    while over <= MAX_DISCARDED_BYTES {
        let wait = (Instant::now() + DISCARD_IDLE).min(deadline);
        match tokio::time::timeout_at(wait, pieces.next()).await {
            Ok(Some(Ok(piece))) => over += piece.len(),
            // The end of the body, a broken one, or the time is up.
            Ok(None) | Ok(Some(Err(_))) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Piece = Result<Bytes, std::io::Error>;

    fn piece(len: usize) -> Piece {
        Ok(Bytes::from(vec![b'x'; len]))
    }

    /// A chunked body of `pieces`, and how many of them were taken from it.
    fn counted(pieces: impl Iterator<Item = Piece> + Send + 'static) -> (Body, Arc<AtomicUsize>) {
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = taken.clone();
        let pieces = pieces.inspect(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        (Body::from_stream(futures::stream::iter(pieces)), taken)
    }

    #[tokio::test]
    async fn bodies_up_to_the_limit_are_read_whole_and_longer_ones_drained_then_refused() {
        const HALF_MIB: usize = 512 * 1024;
        let (body, _) = counted((0..4).map(|_| piece(HALF_MIB)));
        assert_eq!(read(body).await.unwrap().len(), MAX_BODY_BYTES);

        // One byte over, then more: every piece is taken (the client is not left writing into
        // a connection about to close), and the body is refused.
        let (body, taken) = counted(
            (0..4)
                .map(|_| piece(HALF_MIB))
                .chain((0..17).map(|_| piece(1))),
        );
        assert!(matches!(read(body).await, Err(Refused::TooLarge)));
        assert_eq!(taken.load(Ordering::Relaxed), 21);

        // A body that never ends is dropped only up to the bound.
        let (body, taken) = counted(std::iter::repeat_with(|| piece(1024 * 1024)));
        assert!(matches!(read(body).await, Err(Refused::TooLarge)));
        let mib = taken.load(Ordering::Relaxed);
        let bound = MAX_DISCARDED_BYTES >> 20;
        assert!((bound..=bound + 4).contains(&mib), "{mib} MiB read");

        // A broken body is unreadable, not too large.
        let (body, _) = counted([piece(1), Err(std::io::Error::other("reset"))].into_iter());
        assert!(matches!(read(body).await, Err(Refused::Unreadable(_))));
    }
}
