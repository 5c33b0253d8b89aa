//! Command dispatch: lookup, Redis's checks in Redis's order (unknown command, arity,
//! authentication, subscribed context), then the handler of the command's module.
//!
//! One module per command family, as in mini-redis: [`connection`] (PING, ECHO, HELLO, AUTH,
//! SELECT, QUIT, RESET), [`pubsub`] (the pub/sub set), [`client`] (CLIENT), [`server`]
//! (INFO, COMMAND, CONFIG), [`transaction`] (MULTI, EXEC, DISCARD). Handlers reply through
//! [`Session::reply`].

mod client;
mod connection;
mod history;
mod pubsub;
mod server;
pub mod table;
pub(crate) mod transaction;

use crate::resp::connection::Session;
use crate::resp::frame::Frame;
use crate::resp::frame::Protocol;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::time::Instant;
use table::{ALLOWED_WHILE_SUBSCRIBED, CommandSpec};

/// The request's arguments, the command name first.
pub(crate) type Args = Vec<Bytes>;

/// Runs one request (or queues it, inside a transaction) and queues its reply (or replies)
/// on the session.
pub(crate) async fn execute(session: &mut Session, args: Args) {
    session
        .ctx
        .stats
        .commands_processed
        .fetch_add(1, Ordering::Relaxed);
    let (command, subcommand) = match check(session, &args) {
        Ok(found) => found,
        Err(refusal) if session.transaction.is_some() && args[0].eq_ignore_ascii_case(b"exec") => {
            transaction::exec_refused(session, refusal);
            return;
        }
        Err(refusal) => {
            // As in Redis, a command refused inside a transaction dooms the transaction.
            transaction::abort(session);
            session.reply(refusal);
            return;
        }
    };
    {
        let mut meta = session.client.meta.lock();
        meta.last_command = (command.name, subcommand);
        meta.last_active = Instant::now();
    }
    match command.name {
        "multi" => transaction::multi(session),
        "exec" => transaction::exec(session).await,
        "discard" => transaction::discard(session),
        // QUIT and RESET act at once, as in Redis; RESET also ends the transaction.
        "quit" | "reset" => run(session, command.name, subcommand, &args).await,
        name if session.transaction.is_some() => {
            transaction::queue(session, name, subcommand, args)
        }
        name => run(session, name, subcommand, &args).await,
    }
}

/// Redis's checks in Redis's order: the command (and subcommand) exists, its arity, the
/// connection's authentication, the RESP2 subscribed context. Returns the command and the
/// subcommand's name (or ""), or the error to reply.
fn check(session: &Session, args: &Args) -> Result<(&'static CommandSpec, &'static str), Frame> {
    let Some(command) = table::lookup(&args[0]) else {
        return Err(unknown_command(args));
    };
    let (spec, subcommand) = if command.subcommands.is_empty() {
        (command, "")
    } else if args.len() < 2 && command.arity_ok(1) {
        // A container its name alone runs (`COMMAND`: every command's info).
        (command, "")
    } else if args.len() < 2 {
        return Err(wrong_arity(command.name));
    } else {
        match command.subcommand(&args[1]) {
            Some(sub) => (sub, sub.name),
            None => {
                return Err(Frame::error(format!(
                    "ERR unknown subcommand '{}'. Try {} HELP.",
                    truncate_lossy(&args[1], 128),
                    command.name.to_ascii_uppercase()
                )));
            }
        }
    };
    if !spec.arity_ok(args.len()) {
        return Err(wrong_arity(&full_name(command, subcommand)));
    }
    if !session.authenticated && !spec.no_auth() {
        return Err(Frame::error("NOAUTH Authentication required."));
    }
    if session.protocol == Protocol::Resp2
        && session.in_pubsub_context()
        && !ALLOWED_WHILE_SUBSCRIBED.contains(&command.name)
    {
        return Err(Frame::error(format!(
            "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
            full_name(command, subcommand)
        )));
    }
    Ok((command, subcommand))
}

/// Runs a checked command: `name` is the command's, `subcommand` the subcommand's (or "").
/// Also what `EXEC` runs each queued command with.
async fn run(session: &mut Session, name: &'static str, subcommand: &'static str, args: &Args) {
    // Commands take effect in the order they were sent. A durable PUBLISH is answered once
    // committed, and those read together are staged to share one commit, so a later command
    // that could observe them (reads history, changes what is delivered to whom, reports
    // counters...) first waits until they took effect. PING, ECHO, PUBSUB (subscriber counts)
    // and COMMAND observe nothing of them: they leave the staged ones staged (their replies
    // keep their place), so that a pipeline mixing them with PUBLISH keeps one commit per
    // read (handing the staged publishes to the log at each of them made a pipeline of
    // PUBLISH and PING 30 times slower than Redis: a commit per publish). HPUBLISH's commit
    // is queued behind theirs: it hands them to the log first.
    match name {
        "publish" | "ping" | "echo" | "pubsub" | "command" => {}
        "hpublish" => session.submit_staged().await,
        _ => session.settle_publishes().await,
    }
    match name {
        "auth" => connection::auth(session, args),
        "client" => client::client(session, subcommand, args),
        "command" => server::command(session, subcommand, args),
        "config" => server::config(session, subcommand, args),
        "echo" => session.reply(Frame::Bulk(args[1].clone())),
        "hello" => connection::hello(session, args),
        "history" => history::history(session, args).await,
        "hpublish" => history::hpublish(session, args).await,
        "hsubscribe" => history::hsubscribe(session, args).await,
        "hunsubscribe" => history::hunsubscribe(session).await,
        "info" => server::info(session, args),
        "ping" => connection::ping(session, args),
        "psubscribe" => pubsub::subscribe(session, crate::hub::Kind::Pattern, args).await,
        "publish" => pubsub::publish(session, args).await,
        "pubsub" => pubsub::introspect(session, subcommand, args),
        "punsubscribe" => pubsub::unsubscribe(session, crate::hub::Kind::Pattern, args).await,
        "quit" => {
            session.reply(Frame::OK);
            session.closing = true;
        }
        "reset" => connection::reset(session).await,
        "select" => connection::select(session, args),
        "spublish" => pubsub::spublish(session, args),
        "ssubscribe" => pubsub::subscribe(session, crate::hub::Kind::Shard, args).await,
        "subscribe" => pubsub::subscribe(session, crate::hub::Kind::Channel, args).await,
        "sunsubscribe" => pubsub::unsubscribe(session, crate::hub::Kind::Shard, args).await,
        "unsubscribe" => pubsub::unsubscribe(session, crate::hub::Kind::Channel, args).await,
        other => unreachable!("command {other} is in the table but has no handler"),
    }
}

fn full_name(command: &CommandSpec, subcommand: &str) -> String {
    if subcommand.is_empty() {
        command.name.to_string()
    } else {
        format!("{}|{}", command.name, subcommand)
    }
}

/// Redis's arity error.
pub(crate) fn wrong_arity(name: &str) -> Frame {
    Frame::error(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// Redis's syntax error.
pub(crate) fn syntax_error() -> Frame {
    Frame::error("ERR syntax error")
}

/// Replies with an error and returns true when a glob pattern among `patterns` is longer than
/// [`MAX_PATTERN_LEN`](crate::hub::glob::MAX_PATTERN_LEN): a compiled pattern takes tens of
/// bytes per pattern byte, so an unbounded one (up to `proto-max-bulk-len`) could take
/// gigabytes.
pub(super) fn refuse_long_pattern(session: &mut Session, patterns: &[Bytes]) -> bool {
    use crate::hub::glob::MAX_PATTERN_LEN;
    if patterns.iter().any(|p| p.len() > MAX_PATTERN_LEN) {
        session.reply(Frame::error(format!(
            "ERR pattern too long (herald accepts up to {MAX_PATTERN_LEN} bytes)"
        )));
        return true;
    }
    false
}

/// Redis's error for an unknown command, quoting the first arguments.
fn unknown_command(args: &Args) -> Frame {
    let mut quoted = String::new();
    for arg in &args[1..] {
        if quoted.len() >= 128 {
            break;
        }
        let room = 128 - quoted.len();
        quoted.push('\'');
        quoted.push_str(&truncate_lossy(arg, room));
        quoted.push_str("' ");
    }
    Frame::error(format!(
        "ERR unknown command '{}', with args beginning with: {}",
        truncate_lossy(&args[0], 128),
        quoted
    ))
}

/// At most `max` bytes of `bytes`, as text (invalid UTF-8 replaced).
pub(crate) fn truncate_lossy(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

/// Parses an integer argument the way Redis does, with Redis's error.
pub(crate) fn integer_arg(arg: &[u8]) -> Result<i64, Frame> {
    crate::resp::parse::parse_strict_i64(arg)
        .ok_or_else(|| Frame::error("ERR value is not an integer or out of range"))
}

/// A `HELP` reply: the title line then the lines, as simple strings in an array.
pub(crate) fn help(command: &str, lines: &[&'static str]) -> Frame {
    let mut items = vec![Frame::simple(format!(
        "{command} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
    ))];
    items.extend(lines.iter().map(|&line| Frame::simple(line)));
    Frame::Array(items)
}
