//! Server introspection and settings: INFO, COMMAND, CONFIG.

use super::table::{COMMANDS, CommandSpec, lookup};
use super::{Args, help, wrong_arity};
use crate::hub::glob::Glob;
use crate::resp::cmd::connection::REDIS_COMPAT_VERSION;
use crate::resp::connection::Session;
use crate::resp::frame::Frame;
use crate::resp::settings::{self, SETTING_NAMES, SettingError};
use bytes::Bytes;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

/// `INFO [section ...]` in Redis's `# Section` / `field:value` format.
pub(super) fn info(session: &mut Session, args: &Args) {
    let requested: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let everything = requested.is_empty()
        || requested
            .iter()
            .any(|s| s == "all" || s == "everything" || s == "default");
    let wants = |section: &str| everything || requested.iter().any(|s| s == section);
    let ctx = &session.ctx;
    let mut out = String::with_capacity(2048);
    let mut section = |name: &str, body: String| {
        if wants(&name.to_ascii_lowercase()) {
            if !out.is_empty() {
                out.push_str("\r\n");
            }
            let _ = write!(out, "# {name}\r\n{body}");
        }
    };
    let uptime = ctx.started.elapsed().as_secs();
    let clients = ctx.clients.snapshot();
    let pubsub_clients = clients.iter().filter(|c| c.is_subscriber()).count();
    let hub = &ctx.hub;
    let (rss, cpu_user, cpu_sys) = process_usage();
    section(
        "Server",
        format!(
            "redis_version:{REDIS_COMPAT_VERSION}\r\nherald_version:{}\r\nherald_commit:{}\r\n\
             redis_mode:standalone\r\n\
             os:{} {}\r\narch_bits:{}\r\nprocess_id:{}\r\nrun_id:{}\r\ntcp_port:{}\r\n\
             uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n",
            crate::build::VERSION,
            crate::build::COMMIT,
            std::env::consts::OS,
            std::env::consts::ARCH,
            usize::BITS,
            std::process::id(),
            ctx.run_id,
            ctx.listen_addr.port(),
            uptime / 86_400,
        ),
    );
    section(
        "Clients",
        format!(
            "connected_clients:{}\r\nmaxclients:{}\r\npubsub_clients:{pubsub_clients}\r\nblocked_clients:0\r\n",
            clients.len(),
            ctx.settings.read().maxclients,
        ),
    );
    section(
        "Memory",
        format!("used_memory:{rss}\r\nused_memory_rss:{rss}\r\nmaxmemory:0\r\n"),
    );
    section("Persistence", "loading:0\r\n".to_string());
    let stats = &ctx.stats;
    section(
        "Stats",
        format!(
            "total_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\n\
             pubsub_channels:{}\r\npubsub_patterns:{}\r\npubsubshard_channels:{}\r\n\
             client_output_buffer_limit_disconnections:{}\r\n",
            stats.connections_received.load(Ordering::Relaxed),
            stats.commands_processed.load(Ordering::Relaxed),
            stats.rejected_connections.load(Ordering::Relaxed),
            hub.active_names(crate::hub::Kind::Channel, None).len(),
            hub.pattern_count(),
            hub.active_names(crate::hub::Kind::Shard, None).len(),
            hub.stats().slow_clients_closed.load(Ordering::Relaxed),
        ),
    );
    section(
        "Replication",
        "role:master\r\nconnected_slaves:0\r\n".to_string(),
    );
    section(
        "CPU",
        format!("used_cpu_sys:{cpu_sys:.6}\r\nused_cpu_user:{cpu_user:.6}\r\n"),
    );
    section("Cluster", "cluster_enabled:0\r\n".to_string());
    section(
        "Herald",
        format!(
            "herald_messages_published:{}\r\nherald_messages_delivered:{}\r\n",
            hub.stats().published.load(Ordering::Relaxed),
            hub.stats().delivered.load(Ordering::Relaxed),
        ),
    );
    section("Keyspace", String::new());
    session.reply(Frame::Verbatim(Bytes::from(out)));
}

/// Resident memory in bytes and CPU seconds (user, system), from `/proc` where it exists.
fn process_usage() -> (u64, f64, f64) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096);
    let (user, sys) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14th and 15th.
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some((
                fields.get(11)?.parse::<f64>().ok()? / 100.0,
                fields.get(12)?.parse::<f64>().ok()? / 100.0,
            ))
        })
        .unwrap_or((0.0, 0.0));
    (rss, user, sys)
}

fn command_info(spec: &CommandSpec, parent: Option<&str>) -> Frame {
    let name = match parent {
        Some(parent) => format!("{parent}|{}", spec.name),
        None => spec.name.to_string(),
    };
    let simple_set =
        |items: &[&'static str]| Frame::Set(items.iter().map(|&f| Frame::simple(f)).collect());
    Frame::Array(vec![
        Frame::Bulk(Bytes::from(name)),
        Frame::Integer(spec.arity as i64),
        simple_set(spec.flags),
        Frame::Integer(0),
        Frame::Integer(0),
        Frame::Integer(0),
        simple_set(spec.acl),
        Frame::Set(vec![]),
        Frame::Array(vec![]),
        Frame::Array(
            spec.subcommands
                .iter()
                .map(|s| command_info(s, Some(spec.name)))
                .collect(),
        ),
    ])
}

fn command_docs(spec: &CommandSpec, parent: Option<&str>) -> Frame {
    let mut doc = vec![
        (Frame::text("summary"), Frame::text(spec.summary)),
        (Frame::text("since"), Frame::text(spec.since)),
        (Frame::text("group"), Frame::text(spec.group)),
    ];
    if !spec.subcommands.is_empty() {
        let subs = spec
            .subcommands
            .iter()
            .map(|s| {
                (
                    Frame::Bulk(Bytes::from(format!("{}|{}", spec.name, s.name))),
                    command_docs(s, Some(spec.name)),
                )
            })
            .collect();
        doc.push((Frame::text("subcommands"), Frame::Map(subs)));
    }
    let _ = parent;
    Frame::Map(doc)
}

/// `COMMAND [COUNT | DOCS | INFO | LIST | HELP]` (alone: every command's info).
pub(super) fn command(session: &mut Session, subcommand: &str, args: &Args) {
    if subcommand == "list" && args.len() == 5 && super::refuse_long_pattern(session, &args[4..]) {
        return;
    }
    let reply = match subcommand {
        "count" => Frame::Integer(COMMANDS.len() as i64),
        "info" if args.len() > 2 => Frame::Array(
            args[2..]
                .iter()
                .map(|name| lookup(name).map_or(Frame::Null, |spec| command_info(spec, None)))
                .collect(),
        ),
        // `COMMAND` alone, as Redis: every command's info.
        "info" | "" => Frame::Array(
            COMMANDS
                .iter()
                .map(|spec| command_info(spec, None))
                .collect(),
        ),
        "docs" => {
            let specs: Vec<&CommandSpec> = if args.len() > 2 {
                args[2..].iter().filter_map(|name| lookup(name)).collect()
            } else {
                COMMANDS.iter().collect()
            };
            Frame::Map(
                specs
                    .into_iter()
                    .map(|spec| (Frame::text(spec.name), command_docs(spec, None)))
                    .collect(),
            )
        }
        "list" => {
            let filter = if args.len() == 5
                && args[2].eq_ignore_ascii_case(b"filterby")
                && args[3].eq_ignore_ascii_case(b"pattern")
            {
                Some(Glob::new(&args[4].to_ascii_lowercase()))
            } else {
                None
            };
            Frame::Array(
                COMMANDS
                    .iter()
                    .filter(|spec| {
                        filter
                            .as_ref()
                            .is_none_or(|g| g.matches(spec.name.as_bytes()))
                    })
                    .map(|spec| Frame::text(spec.name))
                    .collect(),
            )
        }
        "help" => help(
            "COMMAND",
            &[
                "(no subcommand)",
                "    Return details about all Redis commands.",
                "COUNT",
                "    Return the total number of commands in this Redis server.",
                "LIST",
                "    Return a list of all commands in this Redis server.",
                "INFO [<command-name> ...]",
                "    Return details about multiple Redis commands.",
                "DOCS [<command-name> ...]",
                "    Return documentation details about multiple Redis commands.",
                "HELP",
                "    Print this help.",
            ],
        ),
        _ => Frame::Array(
            COMMANDS
                .iter()
                .map(|spec| command_info(spec, None))
                .collect(),
        ),
    };
    session.reply(reply);
}

/// `CONFIG GET pattern [pattern ...]`, `CONFIG SET name value [name value ...]`,
/// `CONFIG RESETSTAT`.
pub(super) fn config(session: &mut Session, subcommand: &str, args: &Args) {
    if subcommand == "get" && super::refuse_long_pattern(session, &args[2.min(args.len())..]) {
        return;
    }
    let reply = match subcommand {
        "get" => {
            let settings = session.ctx.settings.read().clone();
            let globs: Vec<Glob> = args[2..]
                .iter()
                .map(|p| Glob::new(&p.to_ascii_lowercase()))
                .collect();
            let pairs = SETTING_NAMES
                .iter()
                .filter(|name| globs.iter().any(|g| g.matches(name.as_bytes())))
                .filter_map(|&name| {
                    settings
                        .get(name, session.ctx.listen_addr)
                        .map(|value| (Frame::text(name), Frame::text(&value)))
                })
                .collect();
            Frame::Map(pairs)
        }
        "set" if !args.len().is_multiple_of(2) => wrong_arity("config|set"),
        "set" => {
            // As Redis: every name is checked first (the first unknown, immutable or repeated
            // one fails the command, named as given), then the values are applied in order to
            // a copy, the first invalid one failing the command (named as the setting is) with
            // nothing changed.
            let pairs: Vec<&[bytes::Bytes]> = args[2..].chunks(2).collect();
            let mut names: Vec<&'static str> = Vec::with_capacity(pairs.len());
            let mut failure = None;
            for pair in &pairs {
                let given = String::from_utf8_lossy(&pair[0]);
                let why = match settings::setting_to_set(&given) {
                    Ok(name) if names.contains(&name) => "duplicate parameter",
                    Ok(name) => {
                        names.push(name);
                        continue;
                    }
                    Err(SettingError::Immutable) => "can't set immutable config",
                    Err(_) => {
                        failure = Some(format!(
                            "ERR Unknown option or number of arguments for CONFIG SET - '{given}'"
                        ));
                        break;
                    }
                };
                failure = Some(format!(
                    "ERR CONFIG SET failed (possibly related to argument '{given}') - {why}"
                ));
                break;
            }
            let mut updated = session.ctx.settings.read().clone();
            if failure.is_none() {
                for (name, pair) in names.iter().zip(&pairs) {
                    let value = String::from_utf8_lossy(&pair[1]);
                    if let Err(error) = updated.set(name, &value) {
                        let SettingError::Invalid(why) = error else {
                            unreachable!("{name} was found settable above")
                        };
                        failure = Some(format!(
                            "ERR CONFIG SET failed (possibly related to argument '{name}') - {why}"
                        ));
                        break;
                    }
                }
            }
            match failure {
                Some(error) => Frame::error(error),
                None => {
                    session
                        .ctx
                        .hub
                        .set_output_limit(updated.pubsub_output_limit);
                    tracing::info!("settings changed by CONFIG SET");
                    *session.ctx.settings.write() = updated;
                    Frame::OK
                }
            }
        }
        "resetstat" => {
            let stats = &session.ctx.stats;
            stats.commands_processed.store(0, Ordering::Relaxed);
            stats.connections_received.store(0, Ordering::Relaxed);
            stats.rejected_connections.store(0, Ordering::Relaxed);
            Frame::OK
        }
        _ => help(
            "CONFIG",
            &[
                "GET <pattern>",
                "    Return parameters matching the glob-like <pattern> and their values.",
                "SET <directive> <value>",
                "    Set the configuration <directive> to <value>.",
                "RESETSTAT",
                "    Reset statistics reported by the INFO command.",
                "HELP",
                "    Prints this help.",
            ],
        ),
    };
    session.reply(reply);
}
