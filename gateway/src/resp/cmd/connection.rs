//! Connection commands: PING, HELLO, AUTH, SELECT, RESET (ECHO and QUIT are one-liners in the
//! dispatcher).

use super::{Args, integer_arg, syntax_error, wrong_arity};
use crate::resp::connection::Session;
use crate::resp::frame::{Frame, Protocol};

/// The Redis version herald reports to clients that gate features on it.
pub(crate) const REDIS_COMPAT_VERSION: &str = "7.2.0";

/// `PING [message]`; in RESP2's subscribed context the reply is `["pong", message]`.
pub(super) fn ping(session: &mut Session, args: &Args) {
    if args.len() > 2 {
        session.reply(wrong_arity("ping"));
    } else if session.protocol == Protocol::Resp2 && session.in_pubsub_context() {
        let message = args.get(1).cloned().unwrap_or_default();
        session.reply(Frame::Array(vec![
            Frame::text("pong"),
            Frame::Bulk(message),
        ]));
    } else if let Some(message) = args.get(1) {
        session.reply(Frame::Bulk(message.clone()));
    } else {
        session.reply(Frame::simple("PONG"));
    }
}

/// `AUTH [username] password`; herald has one user, `default`.
pub(super) fn auth(session: &mut Session, args: &Args) {
    if args.len() > 3 {
        session.reply(syntax_error());
        return;
    }
    let (username, password) = if args.len() == 2 {
        if session.ctx.settings.read().requirepass.is_none() {
            session.reply(Frame::error(
                "ERR AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?",
            ));
            return;
        }
        (&b"default"[..], &args[1][..])
    } else {
        (&args[1][..], &args[2][..])
    };
    match check_credentials(session, username, password) {
        Ok(()) => session.reply(Frame::OK),
        Err(error) => session.reply(error),
    }
}

fn check_credentials(session: &mut Session, username: &[u8], password: &[u8]) -> Result<(), Frame> {
    let ok = username == b"default"
        && match &session.ctx.settings.read().requirepass {
            None => true,
            Some(expected) => constant_time_eq(expected.as_bytes(), password),
        };
    if ok {
        session.authenticated = true;
        Ok(())
    } else {
        tracing::info!(id = session.client.id, addr = %session.client.addr, "AUTH failed");
        Err(Frame::error(
            "WRONGPASS invalid username-password pair or user is disabled.",
        ))
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// `HELLO [protover [AUTH username password] [SETNAME clientname]]`.
pub(super) fn hello(session: &mut Session, args: &Args) {
    let mut protocol = None;
    let mut next = 1;
    if args.len() >= 2 {
        let Ok(version) = integer_arg(&args[1]) else {
            session.reply(Frame::error(
                "ERR Protocol version is not an integer or out of range",
            ));
            return;
        };
        match Protocol::from_version(version) {
            Some(p) => protocol = Some(p),
            None => {
                session.reply(Frame::error("NOPROTO unsupported protocol version"));
                return;
            }
        }
        next = 2;
    }
    let mut credentials = None;
    let mut name = None;
    while next < args.len() {
        let more = args.len() - 1 - next;
        let option = &args[next];
        if option.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            credentials = Some((args[next + 1].clone(), args[next + 2].clone()));
            next += 3;
        } else if option.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            if let Err(error) = super::client::validate_name(&args[next + 1]) {
                session.reply(error);
                return;
            }
            name = Some(args[next + 1].clone());
            next += 2;
        } else {
            session.reply(Frame::error(format!(
                "ERR Syntax error in HELLO option '{}'",
                super::truncate_lossy(option, 128)
            )));
            return;
        }
    }
    if let Some((username, password)) = credentials
        && let Err(error) = check_credentials(session, &username, &password)
    {
        session.reply(error);
        return;
    }
    if !session.authenticated {
        session.reply(Frame::error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
             HELLO AUTH <user> <pass> option can be used to authenticate the client and \
             select the RESP protocol version at the same time",
        ));
        return;
    }
    if let Some(name) = name {
        session.client.meta.lock().name = (!name.is_empty()).then_some(name);
    }
    if let Some(protocol) = protocol {
        session.protocol = protocol;
        session.subscriber().set_protocol(protocol);
    }
    session.reply(Frame::Map(vec![
        (Frame::text("server"), Frame::text("redis")),
        (Frame::text("version"), Frame::text(REDIS_COMPAT_VERSION)),
        (
            Frame::text("proto"),
            Frame::Integer(session.protocol.version()),
        ),
        (Frame::text("id"), Frame::Integer(session.client.id as i64)),
        (Frame::text("mode"), Frame::text("standalone")),
        (Frame::text("role"), Frame::text("master")),
        (Frame::text("modules"), Frame::Array(vec![])),
    ]));
}

/// `SELECT index`: herald's pub/sub is independent of databases, as Redis's is; the 16 indexes
/// are accepted so clients configured with a database keep working.
pub(super) fn select(session: &mut Session, args: &Args) {
    match integer_arg(&args[1]) {
        Err(error) => session.reply(error),
        Ok(index) if !(0..16).contains(&index) => {
            session.reply(Frame::error("ERR DB index is out of range"))
        }
        Ok(_) => session.reply(Frame::OK),
    }
}

/// `RESET`: back to a fresh connection's state.
pub(super) async fn reset(session: &mut Session) {
    super::transaction::end(session);
    session.flush_replies().await;
    session.end_history().await;
    session.drop_subscriptions();
    session.protocol = Protocol::Resp2;
    session.subscriber().set_protocol(Protocol::Resp2);
    session.authenticated = session.ctx.settings.read().requirepass.is_none();
    session.client.meta.lock().name = None;
    session.reply(Frame::simple("RESET"));
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn secret_comparison() {
        assert!(constant_time_eq(b"hunter2", b"hunter2"));
        assert!(!constant_time_eq(b"hunter2", b"hunter3"));
        assert!(!constant_time_eq(b"hunter2", b"hunter22"));
        assert!(!constant_time_eq(b"", b"\xff"));
    }
}
