//! `MULTI`, `EXEC` and `DISCARD`: Redis transactions, so that clients whose pipelines are
//! transactional by default (redis-py's `pipeline()`, ioredis's `multi()`, go-redis's
//! `TxPipelined`, the `redis` crate's `pipe().atomic()`) work unchanged.
//!
//! After `MULTI`, each command is checked as usual (unknown command, arity, authentication)
//! and queued, answered `+QUEUED`. A command refused at that point marks the transaction, and
//! `EXEC` then discards all of it with Redis's `EXECABORT` error. `EXEC` runs the queued
//! commands in order and answers with the array of their replies, written as one reply: no
//! pub/sub message of this connection lands inside it. As in Redis, a command that fails
//! while it runs (a publish that cannot be committed, a bad `CONFIG SET` value) has its error
//! in its place in the array and the others still run: there is no rollback.
//!
//! The durable publishes of one `EXEC` are staged together, as those of one pipelined read
//! are (see [`Session::stage_publish`]): on a single node they go to the log as one request
//! and share one sync; in a cluster each goes, in order, to its partition's leader.
//!
//! Bounds: the queued commands count against `client-query-buffer-limit` (their arguments are
//! copied out of the read buffer, so what is counted is what is held), and `EXEC`'s replies,
//! held until the last command ran, against [`EXEC_REPLY_LIMIT`]: the commands after that
//! point are not run, each answered with an error saying so.
//!
//! A `MULTI` refused with `-LOADING` while the node starts leaves the rest of its transaction
//! refused ([`Transaction::refused`]) once the node is ready, so that a transaction cut by the
//! moment the node became ready does not run its second half.
//!
//! Where herald differs from Redis, and why:
//! - Subscription commands (`SUBSCRIBE`, `UNSUBSCRIBE`, their pattern, shard and history
//!   forms) are refused inside a transaction and mark it. Redis queues them, but its `EXEC`
//!   then writes one reply per channel, more or fewer than its array announces when the
//!   command names no channel or several, which no client can parse.
//! - Other connections' commands may run between a transaction's commands. Redis runs a
//!   transaction with nothing in between; herald keeps each connection's own order, so a
//!   subscriber sees a transaction's events in order, but possibly with another client's
//!   events between them.
//! - There is no `WATCH`: herald keeps no keys, so there is nothing a transaction could
//!   depend on.

use super::Args;
use crate::resp::connection::Session;
use crate::resp::frame::Frame;
use bytes::Bytes;

/// Commands refused between `MULTI` and `EXEC` (see the module doc).
const REFUSED_IN_TRANSACTION: &[&str] = &[
    "subscribe",
    "psubscribe",
    "ssubscribe",
    "unsubscribe",
    "punsubscribe",
    "sunsubscribe",
    "hsubscribe",
    "hunsubscribe",
];

/// Most bytes of replies one `EXEC` holds: replies are held until the transaction's last
/// command ran (so that its array goes out whole), and a transaction of a few kilobytes of
/// `HISTORY` reads could otherwise hold gigabytes.
pub(crate) const EXEC_REPLY_LIMIT: usize = 64 * 1024 * 1024;

/// Bytes a queued command costs beyond its arguments' bytes (the argument list itself), so
/// that a transaction of many empty commands is bounded too.
const QUEUED_COMMAND_OVERHEAD: usize = 64;

/// One queued command: its name and subcommand, as dispatch resolved them, and its arguments.
struct Queued {
    name: &'static str,
    subcommand: &'static str,
    args: Args,
}

/// An open transaction: the commands queued since `MULTI`.
#[derive(Default)]
pub(crate) struct Transaction {
    queued: Vec<Queued>,
    /// What the queued commands hold, counted against `client-query-buffer-limit`.
    bytes: usize,
    /// Set when a command was refused while queueing: `EXEC` then runs nothing.
    aborted: bool,
}

impl Transaction {
    /// A transaction whose `MULTI` was refused (answered `-LOADING` while the node started):
    /// its commands are answered `QUEUED` and its `EXEC` with `EXECABORT`, so none of them
    /// runs.
    pub(crate) fn refused() -> Transaction {
        Transaction {
            aborted: true,
            ..Transaction::default()
        }
    }
}

/// `MULTI`.
pub(super) fn multi(session: &mut Session) {
    if session.transaction.is_some() {
        // As in Redis, this does not abort the open transaction.
        session.reply(Frame::error("ERR MULTI calls can not be nested"));
        return;
    }
    session.transaction = Some(Transaction::default());
    session.client.meta.lock().transaction = Some((0, 0));
    session.reply(Frame::OK);
}

/// `DISCARD`.
pub(super) fn discard(session: &mut Session) {
    if end(session).is_none() {
        session.reply(Frame::error("ERR DISCARD without MULTI"));
        return;
    }
    session.reply(Frame::OK);
}

/// Ends the open transaction, if any, without running it (`DISCARD`, `RESET`).
pub(crate) fn end(session: &mut Session) -> Option<Transaction> {
    let transaction = session.transaction.take()?;
    session.client.meta.lock().transaction = None;
    Some(transaction)
}

/// Marks the open transaction, if any, so that `EXEC` runs none of it: a command sent inside
/// it was refused.
pub(super) fn abort(session: &mut Session) {
    if let Some(transaction) = &mut session.transaction {
        transaction.aborted = true;
        transaction.queued = Vec::new();
        transaction.bytes = 0;
        session.client.meta.lock().transaction = Some((0, 0));
    }
}

/// Queues a command sent inside a transaction, or refuses it (and marks the transaction).
pub(super) fn queue(
    session: &mut Session,
    name: &'static str,
    subcommand: &'static str,
    args: Args,
) {
    if REFUSED_IN_TRANSACTION.contains(&name) {
        abort(session);
        session.reply(Frame::error(format!(
            "ERR {} inside MULTI is not allowed: subscribe before MULTI or after EXEC",
            name.to_ascii_uppercase()
        )));
        return;
    }
    let limit = session.ctx.settings.read().client_query_buffer_limit;
    let Some(transaction) = &mut session.transaction else {
        unreachable!("queue runs inside a transaction")
    };
    if transaction.aborted {
        // Nothing will run: keep nothing, but answer as Redis does.
        session.reply(Frame::simple("QUEUED"));
        return;
    }
    let cost = QUEUED_COMMAND_OVERHEAD
        + args
            .iter()
            .map(|arg| arg.len() + std::mem::size_of_val(arg))
            .sum::<usize>();
    if transaction.bytes + cost > limit {
        abort(session);
        session.reply(Frame::error(format!(
            "ERR transaction discarded: its queued commands would hold more than \
             client-query-buffer-limit ({limit} bytes)"
        )));
        return;
    }
    transaction.bytes += cost;
    // A copy: the arguments are slices of the read buffer, and held for long they would keep
    // every read they came in alive, far more than `bytes` counts.
    let args = args.iter().map(|arg| Bytes::copy_from_slice(arg)).collect();
    transaction.queued.push(Queued {
        name,
        subcommand,
        args,
    });
    let held = (transaction.queued.len(), transaction.bytes);
    session.client.meta.lock().transaction = Some(held);
    session.reply(Frame::simple("QUEUED"));
}

/// `EXEC`: runs the queued commands and replies with the array of their replies.
pub(super) async fn exec(session: &mut Session) {
    let Some(transaction) = end(session) else {
        session.reply(Frame::error("ERR EXEC without MULTI"));
        return;
    };
    if transaction.aborted {
        session.reply(Frame::error(
            "EXECABORT Transaction discarded because of previous errors.",
        ));
        return;
    }
    session.reply_array_header(transaction.queued.len());
    // Every command below adds exactly one reply (subscription commands, which add a
    // variable number, are never queued); holding the replies keeps the array whole.
    session.hold_replies = true;
    for queued in transaction.queued {
        if session.reply_bytes() > EXEC_REPLY_LIMIT {
            session.reply(Frame::error(format!(
                "ERR not run: this EXEC's replies passed {EXEC_REPLY_LIMIT} bytes"
            )));
            continue;
        }
        super::run(session, queued.name, queued.subcommand, &queued.args).await;
    }
    session.hold_replies = false;
}

/// `EXEC` refused by the checks (its arity): as in Redis, the transaction ends, and the reply
/// says why.
pub(super) fn exec_refused(session: &mut Session, refusal: Frame) {
    end(session);
    let Frame::Error(message) = refusal else {
        unreachable!("a refusal is an error")
    };
    let reason = message.strip_prefix("ERR ").unwrap_or(&message);
    session.reply(Frame::error(format!(
        "EXECABORT Transaction discarded because of: {reason}"
    )));
}
