//! The pub/sub commands: (P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE, PUBLISH, SPUBLISH and PUBSUB.

use super::{Args, help};
use crate::broker::Ticket;
use crate::hub::Kind;
use crate::hub::glob::Glob;
use crate::resp::connection::Session;
use crate::resp::frame::Frame;
use bytes::Bytes;
use herald_storage::Publish;

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Channel => 0,
        Kind::Pattern => 1,
        Kind::Shard => 2,
    }
}

fn words(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Channel => ("subscribe", "unsubscribe"),
        Kind::Pattern => ("psubscribe", "punsubscribe"),
        Kind::Shard => ("ssubscribe", "sunsubscribe"),
    }
}

fn confirmation(session: &Session, word: &'static str, name: Frame, kind: Kind) -> Bytes {
    let count = session.subscription_count(kind) as i64;
    Frame::Push(vec![Frame::text(word), name, Frame::Integer(count)]).to_bytes(session.protocol)
}

/// `SUBSCRIBE` / `PSUBSCRIBE` / `SSUBSCRIBE name [name ...]`: one confirmation per name.
pub(super) async fn subscribe(session: &mut Session, kind: Kind, args: &Args) {
    let names = &args[1..];
    if kind == Kind::Pattern && super::refuse_long_pattern(session, names) {
        return;
    }
    let (word, _) = words(kind);
    let mut replies = Vec::with_capacity(names.len());
    for name in names {
        session.subscriptions[slot(kind)].insert(name.clone());
        replies.push(confirmation(session, word, Frame::Bulk(name.clone()), kind));
    }
    session.flush_replies().await;
    // In a cluster, the confirmations go out once the other members know of new interest.
    let _reserved = session.ctx.broker.announce(kind, names).await;
    session
        .ctx
        .hub
        .subscribe(kind, session.subscriber(), names, replies);
    session.record_subscription_counts();
}

/// `UNSUBSCRIBE` / `PUNSUBSCRIBE` / `SUNSUBSCRIBE [name ...]`: without names, from everything
/// of that kind; from nothing, one confirmation with a null name.
pub(super) async fn unsubscribe(session: &mut Session, kind: Kind, args: &Args) {
    let (_, word) = words(kind);
    let names: Vec<Bytes> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        session.subscriptions[slot(kind)].iter().cloned().collect()
    };
    let mut replies = Vec::with_capacity(names.len().max(1));
    for name in &names {
        session.subscriptions[slot(kind)].swap_remove(name);
        replies.push(confirmation(session, word, Frame::Bulk(name.clone()), kind));
    }
    if names.is_empty() {
        replies.push(confirmation(session, word, Frame::Null, kind));
    }
    session.flush_replies().await;
    session
        .ctx
        .hub
        .unsubscribe(kind, session.subscriber(), &names, replies);
    session.record_subscription_counts();
}

/// `PUBLISH channel message`: the number of receivers. To a durable namespace the reply comes
/// once the message is committed; pipelined publishes share one commit (they are staged and
/// go to the log together).
///
/// A durable channel's name must not be empty and is limited to
/// [`MAX_CHANNEL_NAME_BYTES`](crate::broker::MAX_CHANNEL_NAME_BYTES) (its history is read by
/// streams, which take no such name); a non-durable one's is not, as in Redis.
pub(super) async fn publish(session: &mut Session, args: &Args) {
    let broker = session.ctx.broker.clone();
    if broker.is_durable(&args[1]) {
        if let Err(reason) = crate::broker::check_publish_channel(&args[1]) {
            let refused = if args[1].is_empty() {
                "empty"
            } else {
                "longer"
            };
            session.reply(Frame::error(format!(
                "ERR {reason} for a durable channel (streams read its history, and take no {refused} name)"
            )));
            return;
        }
        let publish = Publish {
            channel: args[1].clone(),
            payload: args[2].clone(),
            message_id: None,
        };
        session.stage_publish(publish).await;
        return;
    }
    let ticket = broker
        .enqueue(args[1].clone(), args[2].clone(), None, &mut session.wakes)
        .await;
    match ticket {
        Ok(Ticket::Done(published)) => session.reply(Frame::Integer(published.receivers as i64)),
        Ok(ticket) => session.reply_later(ticket),
        Err(error) => session.reply(Frame::error(format!("ERR publish failed: {error}"))),
    }
}

/// `SPUBLISH shardchannel message`: the number of receivers.
pub(super) fn spublish(session: &mut Session, args: &Args) {
    let receivers = session
        .ctx
        .broker
        .spublish(&args[1], &args[2], &mut session.wakes);
    session.reply(Frame::Integer(receivers as i64));
}

/// `PUBSUB CHANNELS | NUMSUB | NUMPAT | SHARDCHANNELS | SHARDNUMSUB | HELP`.
pub(super) fn introspect(session: &mut Session, subcommand: &str, args: &Args) {
    // The broker answers for the whole cluster (local hub + the other nodes' interest).
    let hub = session.ctx.broker.clone();
    if matches!(subcommand, "channels" | "shardchannels") {
        // At most one pattern: the command table says `-2`, as Redis's does, and Redis refuses
        // more in the command itself.
        if args.len() > 3 {
            session.reply(Frame::error(format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try PUBSUB HELP.",
                super::truncate_lossy(&args[1], 128)
            )));
            return;
        }
        if super::refuse_long_pattern(session, &args[2..]) {
            return;
        }
    }
    let reply = match subcommand {
        "channels" | "shardchannels" => {
            let kind = if subcommand == "channels" {
                Kind::Channel
            } else {
                Kind::Shard
            };
            let filter = args.get(2).map(|p| Glob::new(p));
            Frame::Array(
                hub.active_names(kind, filter.as_ref())
                    .into_iter()
                    .map(Frame::Bulk)
                    .collect(),
            )
        }
        "numsub" | "shardnumsub" => {
            let kind = if subcommand == "numsub" {
                Kind::Channel
            } else {
                Kind::Shard
            };
            let names = &args[2..];
            let counts = hub.subscriber_counts(kind, names);
            // A flat array in RESP3 too, as Redis 7 replies.
            let mut items = Vec::with_capacity(2 * names.len());
            for (name, n) in names.iter().zip(counts) {
                items.push(Frame::Bulk(name.clone()));
                items.push(Frame::Integer(n as i64));
            }
            Frame::Array(items)
        }
        "numpat" => Frame::Integer(hub.pattern_count() as i64),
        _ => help(
            "PUBSUB",
            &[
                "CHANNELS [<pattern>]",
                "    Return the currently active channels matching a <pattern> (default: '*').",
                "NUMPAT",
                "    Return number of subscriptions to patterns.",
                "NUMSUB [<channel> ...]",
                "    Return the number of subscribers for the specified channels, excluding",
                "    pattern subscriptions(default: no channels).",
                "SHARDCHANNELS [<pattern>]",
                "    Return the currently active shard level channels matching a <pattern> (default: '*').",
                "SHARDNUMSUB [<shardchannel> ...]",
                "    Return the number of subscribers for the specified shard level channel(s)",
                "HELP",
                "    Prints this help.",
            ],
        ),
    };
    session.reply(reply);
}
