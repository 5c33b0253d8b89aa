//! `CLIENT ID | SETNAME | GETNAME | SETINFO | LIST | KILL | INFO | NO-EVICT | HELP`.

use super::{Args, help, syntax_error};
use crate::hub::outbox::CloseReason;
use crate::resp::clients::ClientInfo;
use crate::resp::connection::Session;
use crate::resp::frame::Frame;
use bytes::Bytes;
use std::sync::Arc;

/// Redis's rule for client names and library fields: printable ASCII without spaces.
fn printable(value: &[u8]) -> bool {
    value.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

/// Checks a `CLIENT SETNAME` / `HELLO SETNAME` value.
pub(super) fn validate_name(name: &[u8]) -> Result<(), Frame> {
    if printable(name) {
        Ok(())
    } else {
        Err(Frame::error(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ))
    }
}

pub(super) fn client(session: &mut Session, subcommand: &str, args: &Args) {
    let reply = match subcommand {
        "id" => Frame::Integer(session.client.id as i64),
        "setname" => match validate_name(&args[2]) {
            Ok(()) => {
                session.client.meta.lock().name = (!args[2].is_empty()).then(|| args[2].clone());
                Frame::OK
            }
            Err(error) => error,
        },
        "getname" => session
            .client
            .meta
            .lock()
            .name
            .clone()
            .map_or(Frame::Null, Frame::Bulk),
        "setinfo" => set_info(session, &args[2], &args[3]),
        "info" => Frame::Verbatim(Bytes::from(session.client.describe() + "\n")),
        "list" => list(session, args),
        "kill" => kill(session, args),
        "no-evict" => {
            if args[2].eq_ignore_ascii_case(b"on") || args[2].eq_ignore_ascii_case(b"off") {
                Frame::OK
            } else {
                syntax_error()
            }
        }
        _ => help(
            "CLIENT",
            &[
                "GETNAME",
                "    Return the name of the current connection.",
                "ID",
                "    Return the ID of the current connection.",
                "INFO",
                "    Return information about the current client connection.",
                "KILL <ip:port>",
                "    Kill connection made from <ip:port>.",
                "KILL <option> <value> [<option> <value> [...]]",
                "    Kill connections. Options are: ID, ADDR, LADDR, USER, SKIPME, MAXAGE.",
                "LIST [TYPE (NORMAL|PUBSUB) | ID <id> [<id> ...]]",
                "    Return information about client connections.",
                "SETINFO <option> <value>",
                "    Set client meta attr. Options are: LIB-NAME, LIB-VER.",
                "SETNAME <name>",
                "    Assign the name <name> to the current connection.",
                "HELP",
                "    Print this help.",
            ],
        ),
    };
    session.reply(reply);
}

fn set_info(session: &Session, attribute: &Bytes, value: &Bytes) -> Frame {
    let field = if attribute.eq_ignore_ascii_case(b"lib-name") {
        "lib-name"
    } else if attribute.eq_ignore_ascii_case(b"lib-ver") {
        "lib-ver"
    } else {
        return Frame::error(format!(
            "ERR Unrecognized option '{}'",
            super::truncate_lossy(attribute, 128)
        ));
    };
    if !printable(value) {
        return Frame::error(format!(
            "ERR {field} cannot contain spaces, newlines or special characters."
        ));
    }
    let mut meta = session.client.meta.lock();
    let slot = if field == "lib-name" {
        &mut meta.lib_name
    } else {
        &mut meta.lib_ver
    };
    *slot = (!value.is_empty()).then(|| value.clone());
    Frame::OK
}

/// `CLIENT LIST [TYPE normal|pubsub|master|replica] [ID id ...]`.
fn list(session: &Session, args: &Args) -> Frame {
    let clients = session.ctx.clients.snapshot();
    let mut text = String::new();
    // As Redis 7: no option, `TYPE type` alone, or `ID id [id ...]` (each id's client, in the
    // order given; an id no client has, zero or negative ones included, lists nothing).
    match &args[2..] {
        [] => clients.iter().for_each(|client| {
            text.push_str(&client.describe());
            text.push('\n');
        }),
        [option, wanted] if option.eq_ignore_ascii_case(b"type") => {
            let subscribers = match wanted.to_ascii_lowercase().as_slice() {
                b"normal" => Some(false),
                b"pubsub" => Some(true),
                b"master" | b"replica" | b"slave" => None,
                _ => {
                    return Frame::error(format!(
                        "ERR Unknown client type '{}'",
                        super::truncate_lossy(wanted, 128)
                    ));
                }
            };
            for client in clients
                .iter()
                .filter(|c| Some(c.is_subscriber()) == subscribers)
            {
                text.push_str(&client.describe());
                text.push('\n');
            }
        }
        [option, ids @ ..] if option.eq_ignore_ascii_case(b"id") && !ids.is_empty() => {
            for arg in ids {
                let Some(id) = crate::resp::parse::parse_strict_i64(arg) else {
                    return Frame::error("ERR Invalid client ID");
                };
                if let Some(client) = clients.iter().find(|c| i64::try_from(c.id) == Ok(id)) {
                    text.push_str(&client.describe());
                    text.push('\n');
                }
            }
        }
        _ => return syntax_error(),
    }
    Frame::Verbatim(Bytes::from(text))
}

/// One `CLIENT KILL` filter.
type ClientFilter = Box<dyn Fn(&ClientInfo) -> bool>;

/// `CLIENT KILL addr` (old form: `OK` or an error) or `CLIENT KILL <filter> <value> ...`
/// (new form: the number of clients killed).
fn kill(session: &mut Session, args: &Args) -> Frame {
    let all = session.ctx.clients.snapshot();
    if args.len() == 3 {
        let addr = String::from_utf8_lossy(&args[2]);
        return match all.iter().find(|c| c.addr.to_string() == addr) {
            Some(client) => {
                close(session, client);
                Frame::OK
            }
            None => Frame::error("ERR No such client"),
        };
    }
    if !args.len().is_multiple_of(2) {
        return syntax_error();
    }
    let mut skip_me = true;
    let mut filters: Vec<ClientFilter> = Vec::new();
    for pair in args[2..].chunks(2) {
        let (option, value) = (
            pair[0].to_ascii_lowercase(),
            String::from_utf8_lossy(&pair[1]).into_owned(),
        );
        match option.as_slice() {
            b"id" => match value.parse::<u64>() {
                Ok(id) if id > 0 => filters.push(Box::new(move |c| c.id == id)),
                _ => return Frame::error("ERR client-id should be greater than 0"),
            },
            b"addr" => filters.push(Box::new(move |c| c.addr.to_string() == value)),
            b"laddr" => filters.push(Box::new(move |c| c.laddr.to_string() == value)),
            // Every client is the `default` user (herald has no ACL users); another name is
            // Redis's error for a user that does not exist.
            b"user" if value == "default" => filters.push(Box::new(|_| true)),
            b"user" => return Frame::error(format!("ERR No such user '{value}'")),
            b"type" => match value.to_ascii_lowercase().as_str() {
                "normal" => filters.push(Box::new(|c| !c.is_subscriber())),
                "pubsub" => filters.push(Box::new(|c| c.is_subscriber())),
                "master" | "replica" | "slave" => filters.push(Box::new(|_| false)),
                _ => return Frame::error(format!("ERR Unknown client type '{value}'")),
            },
            b"maxage" => match value.parse::<u64>() {
                Ok(age) => filters.push(Box::new(move |c| c.connected.elapsed().as_secs() >= age)),
                // Redis's own wording here.
                Err(_) => return syntax_error(),
            },
            b"skipme" => match value.to_ascii_lowercase().as_str() {
                "yes" => skip_me = true,
                "no" => skip_me = false,
                _ => return syntax_error(),
            },
            _ => return syntax_error(),
        }
    }
    let mut killed = 0;
    for client in all.iter().filter(|c| filters.iter().all(|f| f(c))) {
        if skip_me && client.id == session.client.id {
            continue;
        }
        close(session, client);
        killed += 1;
    }
    Frame::Integer(killed)
}

/// Closes a client; a client killing itself gets its reply first, as in Redis.
fn close(session: &mut Session, client: &Arc<ClientInfo>) {
    tracing::info!(id = client.id, addr = %client.addr, "client killed by CLIENT KILL");
    if client.id == session.client.id {
        session.closing = true;
    } else {
        client.subscriber.outbox().close(CloseReason::Killed);
    }
}
