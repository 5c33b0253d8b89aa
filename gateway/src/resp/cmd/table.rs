//! The command table: every command herald answers, with Redis's arity, flags and docs.
//!
//! Dispatch, arity checks, authentication and subscribed-context rules, `COMMAND` and
//! `COMMAND DOCS` all read this one table, so they cannot disagree.

/// One command (or container subcommand) as `COMMAND INFO` describes it.
#[derive(Debug)]
pub struct CommandSpec {
    /// Lowercase name; subcommands use the bare subcommand name.
    pub name: &'static str,
    /// Redis arity: `n` exactly n arguments (name included), `-n` at least n.
    pub arity: i32,
    /// Redis command flags (`COMMAND INFO` shows them).
    pub flags: &'static [&'static str],
    /// ACL categories.
    pub acl: &'static [&'static str],
    /// `COMMAND DOCS` group.
    pub group: &'static str,
    /// `COMMAND DOCS` summary.
    pub summary: &'static str,
    /// Redis version that introduced it.
    pub since: &'static str,
    /// Subcommands of a container command (`CLIENT`, `CONFIG`, `PUBSUB`, `COMMAND`).
    pub subcommands: &'static [CommandSpec],
}

impl CommandSpec {
    /// Whether `argc` arguments (command name included) satisfy the arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        let argc = argc as i32;
        if self.arity >= 0 {
            argc == self.arity
        } else {
            argc >= -self.arity
        }
    }

    /// Whether the command runs before authentication.
    pub fn no_auth(&self) -> bool {
        self.flags.contains(&"no_auth")
    }

    /// The subcommand named `name` (any case).
    pub fn subcommand(&self, name: &[u8]) -> Option<&'static CommandSpec> {
        self.subcommands
            .iter()
            .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
    }
}

const fn spec(
    name: &'static str,
    arity: i32,
    flags: &'static [&'static str],
    acl: &'static [&'static str],
    group: &'static str,
    summary: &'static str,
    since: &'static str,
) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags,
        acl,
        group,
        summary,
        since,
        subcommands: &[],
    }
}

const fn container(
    name: &'static str,
    group: &'static str,
    summary: &'static str,
    since: &'static str,
    subcommands: &'static [CommandSpec],
) -> CommandSpec {
    CommandSpec {
        name,
        arity: -2,
        flags: &[],
        acl: &["@slow"],
        group,
        summary,
        since,
        subcommands,
    }
}

/// `spec` with another arity (a container its name alone runs, as `COMMAND`).
const fn with_arity(arity: i32, spec: CommandSpec) -> CommandSpec {
    CommandSpec { arity, ..spec }
}

const CONN: &str = "connection";
const PUBSUB: &str = "pubsub";
const SERVER: &str = "server";
const TRANSACTIONS: &str = "transactions";
const FAST_CONN: &[&str] = &[
    "noscript",
    "loading",
    "stale",
    "fast",
    "no_auth",
    "allow_busy",
];
const SUB_FLAGS: &[&str] = &["pubsub", "noscript", "loading", "stale"];
const PUB_FLAGS: &[&str] = &["pubsub", "loading", "stale", "fast"];
const TX_FLAGS: &[&str] = &["noscript", "loading", "stale", "fast", "allow_busy"];
const INTROSPECT: &[&str] = &["loading", "stale"];
const ADMIN: &[&str] = &["admin", "noscript", "loading", "stale"];
const CLIENT_FLAGS: &[&str] = &["noscript", "loading", "stale"];

/// Every top-level command herald answers, sorted by name.
pub static COMMANDS: &[CommandSpec] = &[
    spec(
        "auth",
        -2,
        FAST_CONN,
        &["@fast", "@connection"],
        CONN,
        "Authenticates the connection.",
        "1.0.0",
    ),
    container(
        "client",
        CONN,
        "A container for client connection commands.",
        "2.4.0",
        &[
            spec(
                "getname",
                2,
                CLIENT_FLAGS,
                &["@slow", "@connection"],
                CONN,
                "Returns the name of the connection.",
                "2.6.9",
            ),
            spec(
                "help",
                2,
                INTROSPECT,
                &["@slow", "@connection"],
                CONN,
                "Returns helpful text about the different subcommands.",
                "5.0.0",
            ),
            spec(
                "id",
                2,
                CLIENT_FLAGS,
                &["@slow", "@connection"],
                CONN,
                "Returns the unique client ID of the connection.",
                "5.0.0",
            ),
            spec(
                "info",
                2,
                CLIENT_FLAGS,
                &["@slow", "@connection"],
                CONN,
                "Returns information about the connection.",
                "6.2.0",
            ),
            spec(
                "kill",
                -3,
                ADMIN,
                &["@admin", "@slow", "@dangerous", "@connection"],
                CONN,
                "Terminates open connections.",
                "2.4.0",
            ),
            spec(
                "list",
                -2,
                ADMIN,
                &["@admin", "@slow", "@dangerous", "@connection"],
                CONN,
                "Lists open connections.",
                "2.4.0",
            ),
            spec(
                "no-evict",
                3,
                ADMIN,
                &["@admin", "@slow", "@dangerous", "@connection"],
                CONN,
                "Sets the client eviction mode of the connection.",
                "7.0.0",
            ),
            spec(
                "setinfo",
                4,
                CLIENT_FLAGS,
                &["@slow", "@connection"],
                CONN,
                "Sets information specific to the client or connection.",
                "7.2.0",
            ),
            spec(
                "setname",
                3,
                CLIENT_FLAGS,
                &["@slow", "@connection"],
                CONN,
                "Sets the connection name.",
                "2.6.9",
            ),
        ],
    ),
    // Redis's arity -1: `COMMAND` alone is every command's `COMMAND INFO`.
    with_arity(
        -1,
        container(
            "command",
            SERVER,
            "Returns detailed information about all commands.",
            "2.8.13",
            &[
                spec(
                    "count",
                    2,
                    INTROSPECT,
                    &["@slow", "@connection"],
                    SERVER,
                    "Returns a count of commands.",
                    "2.8.13",
                ),
                spec(
                    "docs",
                    -2,
                    INTROSPECT,
                    &["@slow", "@connection"],
                    SERVER,
                    "Returns documentary information about one, multiple or all commands.",
                    "7.0.0",
                ),
                spec(
                    "help",
                    2,
                    INTROSPECT,
                    &["@slow", "@connection"],
                    SERVER,
                    "Returns helpful text about the different subcommands.",
                    "5.0.0",
                ),
                spec(
                    "info",
                    -2,
                    INTROSPECT,
                    &["@slow", "@connection"],
                    SERVER,
                    "Returns information about one, multiple or all commands.",
                    "2.8.13",
                ),
                spec(
                    "list",
                    -2,
                    INTROSPECT,
                    &["@slow", "@connection"],
                    SERVER,
                    "Returns a list of command names.",
                    "7.0.0",
                ),
            ],
        ),
    ),
    container(
        "config",
        SERVER,
        "A container for server configuration commands.",
        "2.0.0",
        &[
            spec(
                "get",
                -3,
                ADMIN,
                &["@admin", "@slow", "@dangerous"],
                SERVER,
                "Returns the effective values of configuration parameters.",
                "2.0.0",
            ),
            spec(
                "help",
                2,
                INTROSPECT,
                &["@slow"],
                SERVER,
                "Returns helpful text about the different subcommands.",
                "5.0.0",
            ),
            spec(
                "resetstat",
                2,
                ADMIN,
                &["@admin", "@slow", "@dangerous"],
                SERVER,
                "Resets the server's statistics.",
                "2.0.0",
            ),
            spec(
                "set",
                -4,
                ADMIN,
                &["@admin", "@slow", "@dangerous"],
                SERVER,
                "Sets configuration parameters in-flight.",
                "2.0.0",
            ),
        ],
    ),
    spec(
        "discard",
        1,
        TX_FLAGS,
        &["@fast", "@transaction"],
        TRANSACTIONS,
        "Discards a transaction.",
        "2.0.0",
    ),
    spec(
        "echo",
        2,
        &["fast"],
        &["@fast", "@connection"],
        CONN,
        "Returns the given string.",
        "1.0.0",
    ),
    spec(
        "exec",
        1,
        &["noscript", "loading", "stale", "skip_slowlog"],
        &["@slow", "@transaction"],
        TRANSACTIONS,
        "Executes all commands in a transaction.",
        "1.2.0",
    ),
    spec(
        "hello",
        -1,
        FAST_CONN,
        &["@fast", "@connection"],
        CONN,
        "Handshakes with the Redis server.",
        "6.0.0",
    ),
    spec(
        "history",
        -2,
        &["readonly", "loading", "stale"],
        &["@pubsub", "@slow"],
        PUBSUB,
        "herald: returns retained events of a channel after a cursor.",
        "herald 0.1.0",
    ),
    spec(
        "hpublish",
        -3,
        &["pubsub", "loading", "stale"],
        &["@pubsub", "@fast"],
        PUBSUB,
        "herald: publishes with an optional message id; replies with the event's cursor.",
        "herald 0.1.0",
    ),
    spec(
        "hsubscribe",
        -3,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "herald: subscribes to channels with history, resuming after a cursor.",
        "herald 0.1.0",
    ),
    spec(
        "hunsubscribe",
        1,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "herald: ends the connection's history subscription.",
        "herald 0.1.0",
    ),
    spec(
        "info",
        -1,
        INTROSPECT,
        &["@slow", "@dangerous"],
        SERVER,
        "Returns information and statistics about the server.",
        "1.0.0",
    ),
    spec(
        "multi",
        1,
        TX_FLAGS,
        &["@fast", "@transaction"],
        TRANSACTIONS,
        "Starts a transaction.",
        "1.2.0",
    ),
    spec(
        "ping",
        -1,
        &["fast"],
        &["@fast", "@connection"],
        CONN,
        "Returns the server's liveliness response.",
        "1.0.0",
    ),
    spec(
        "psubscribe",
        -2,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "Listens for messages published to channels that match one or more patterns.",
        "2.0.0",
    ),
    spec(
        "publish",
        3,
        PUB_FLAGS,
        &["@pubsub", "@fast"],
        PUBSUB,
        "Posts a message to a channel.",
        "2.0.0",
    ),
    container(
        "pubsub",
        PUBSUB,
        "A container for Pub/Sub commands.",
        "2.8.0",
        &[
            spec(
                "channels",
                -2,
                &["pubsub", "loading", "stale"],
                &["@pubsub", "@slow"],
                PUBSUB,
                "Returns the active channels.",
                "2.8.0",
            ),
            spec(
                "help",
                2,
                INTROSPECT,
                &["@slow"],
                PUBSUB,
                "Returns helpful text about the different subcommands.",
                "6.2.0",
            ),
            spec(
                "numpat",
                2,
                &["pubsub", "loading", "stale"],
                &["@pubsub", "@slow"],
                PUBSUB,
                "Returns a count of unique pattern subscriptions.",
                "2.8.0",
            ),
            spec(
                "numsub",
                -2,
                &["pubsub", "loading", "stale"],
                &["@pubsub", "@slow"],
                PUBSUB,
                "Returns a count of subscribers to channels.",
                "2.8.0",
            ),
            spec(
                "shardchannels",
                -2,
                &["pubsub", "loading", "stale"],
                &["@pubsub", "@slow"],
                PUBSUB,
                "Returns the active shard channels.",
                "7.0.0",
            ),
            spec(
                "shardnumsub",
                -2,
                &["pubsub", "loading", "stale"],
                &["@pubsub", "@slow"],
                PUBSUB,
                "Returns the count of subscribers of shard channels.",
                "7.0.0",
            ),
        ],
    ),
    spec(
        "punsubscribe",
        -1,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "Stops listening to messages published to channels that match one or more patterns.",
        "2.0.0",
    ),
    spec(
        "quit",
        -1,
        FAST_CONN,
        &["@fast", "@connection"],
        CONN,
        "Closes the connection.",
        "1.0.0",
    ),
    spec(
        "reset",
        1,
        FAST_CONN,
        &["@fast", "@connection"],
        CONN,
        "Resets the connection.",
        "6.2.0",
    ),
    spec(
        "select",
        2,
        &["loading", "stale", "fast"],
        &["@fast", "@connection"],
        CONN,
        "Changes the selected database.",
        "1.0.0",
    ),
    spec(
        "spublish",
        3,
        PUB_FLAGS,
        &["@pubsub", "@fast"],
        PUBSUB,
        "Post a message to a shard channel",
        "7.0.0",
    ),
    spec(
        "ssubscribe",
        -2,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "Listens for messages published to shard channels.",
        "7.0.0",
    ),
    spec(
        "subscribe",
        -2,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "Listens for messages published to channels.",
        "2.0.0",
    ),
    spec(
        "sunsubscribe",
        -1,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "Stops listening to messages posted to shard channels.",
        "7.0.0",
    ),
    spec(
        "unsubscribe",
        -1,
        SUB_FLAGS,
        &["@pubsub", "@slow"],
        PUBSUB,
        "Stops listening to messages posted to channels.",
        "2.0.0",
    ),
];

/// The top-level command named `name` (any case).
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    COMMANDS
        .iter()
        .find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Commands a RESP2 client may run while subscribed (Redis's rule).
pub const ALLOWED_WHILE_SUBSCRIBED: &[&str] = &[
    "ping",
    "subscribe",
    "ssubscribe",
    "unsubscribe",
    "sunsubscribe",
    "psubscribe",
    "punsubscribe",
    "hsubscribe",
    "hunsubscribe",
    "quit",
    "reset",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_lookup_ignores_case() {
        assert!(COMMANDS.windows(2).all(|w| w[0].name < w[1].name));
        assert_eq!(lookup(b"PuBlIsH").unwrap().name, "publish");
        assert!(lookup(b"get").is_none());
        assert!(lookup(b"client").unwrap().subcommand(b"SETNAME").is_some());
    }
}
