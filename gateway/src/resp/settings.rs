//! Settings of the Redis-protocol server that `CONFIG GET` / `CONFIG SET` read and change at
//! run time, with the names, units and formats Redis uses for them. [`RespSettings::set`] is
//! their one parser: the node reads its flags, variables and file keys for them through it too,
//! as Redis reads its config file and command line with `CONFIG SET`'s code.

use crate::hub::outbox::OutputLimit;
use crate::resp::parse::RequestLimits;

/// The RESP server's run-time settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RespSettings {
    /// `requirepass`: the password of the default user; `None` means no password.
    pub requirepass: Option<String>,
    /// `protected-mode`: without a password, accept only loopback clients.
    pub protected_mode: bool,
    /// `maxclients`: most simultaneous RESP clients.
    pub maxclients: usize,
    /// `proto-max-bulk-len`: longest argument of a request, in bytes.
    pub proto_max_bulk_len: usize,
    /// Most arguments in one request (Redis hard-codes 1024*1024 in 6.x; herald keeps that as
    /// a setting so a `*20000000` header is refused before any memory is committed).
    pub max_multibulk_len: usize,
    /// `client-query-buffer-limit`: most unparsed bytes buffered for one client.
    pub client_query_buffer_limit: usize,
    /// `client-output-buffer-limit pubsub`: when a subscriber that does not read is closed.
    pub pubsub_output_limit: OutputLimit,
    /// `timeout`: close clients idle this many seconds (0 = never). Subscribers are exempt,
    /// as in Redis.
    pub timeout_seconds: u64,
}

impl Default for RespSettings {
    fn default() -> Self {
        let limits = RequestLimits::default();
        RespSettings {
            requirepass: None,
            protected_mode: true,
            maxclients: 10_000,
            proto_max_bulk_len: limits.max_bulk_len,
            max_multibulk_len: limits.max_multibulk_len,
            client_query_buffer_limit: 1024 * 1024 * 1024,
            pubsub_output_limit: OutputLimit::PUBSUB_DEFAULT,
            timeout_seconds: 0,
        }
    }
}

/// Why a `CONFIG SET` value was refused; the text follows Redis's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingError {
    /// Not a herald setting.
    Unknown,
    /// Known, but fixed at start-up.
    Immutable,
    /// The value does not parse, or is out of the setting's bounds.
    Invalid(String),
}

/// Names `CONFIG GET` knows, in the order it lists them.
pub const SETTING_NAMES: &[&str] = &[
    "requirepass",
    "protected-mode",
    "maxclients",
    "proto-max-bulk-len",
    "client-query-buffer-limit",
    "client-output-buffer-limit",
    "timeout",
    "databases",
    "port",
    "bind",
];

/// The settings `CONFIG SET` refuses: fixed at start-up (in Redis, `port` and `bind` are not,
/// but herald does not move its listeners at run time).
const IMMUTABLE: &[&str] = &["databases", "port", "bind"];

/// `name`'s setting for `CONFIG SET` (names are case-insensitive), or why it cannot be set.
pub fn setting_to_set(name: &str) -> Result<&'static str, SettingError> {
    let name = SETTING_NAMES
        .iter()
        .copied()
        .find(|known| known.eq_ignore_ascii_case(name))
        .ok_or(SettingError::Unknown)?;
    if IMMUTABLE.contains(&name) {
        return Err(SettingError::Immutable);
    }
    Ok(name)
}

/// The bounds Redis 7 gives its memory settings `proto-max-bulk-len` and
/// `client-query-buffer-limit`.
const MEMORY_SETTING_BOUNDS: (i64, i64) = (1024 * 1024, i64::MAX);

/// The range a number setting takes (Redis 7's bounds, inclusive), at start-up as from
/// `CONFIG SET`: the one table of them.
fn bounds(name: &str) -> (i64, i64) {
    match name {
        "maxclients" => (1, u32::MAX.into()),
        "proto-max-bulk-len" | "client-query-buffer-limit" => MEMORY_SETTING_BOUNDS,
        "timeout" => (0, i32::MAX.into()),
        _ => (i64::MIN, i64::MAX),
    }
}

impl RespSettings {
    /// The request-parsing limits these settings imply.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_multibulk_len: self.max_multibulk_len,
            max_bulk_len: self.proto_max_bulk_len,
        }
    }

    /// A setting's value as `CONFIG GET` shows it; `port` and `bind` come from the listener.
    pub fn get(&self, name: &str, listen: std::net::SocketAddr) -> Option<String> {
        Some(match name {
            "requirepass" => self.requirepass.clone().unwrap_or_default(),
            "protected-mode" => yes_no(self.protected_mode).to_string(),
            "maxclients" => self.maxclients.to_string(),
            "proto-max-bulk-len" => self.proto_max_bulk_len.to_string(),
            "client-query-buffer-limit" => self.client_query_buffer_limit.to_string(),
            "client-output-buffer-limit" => {
                let l = self.pubsub_output_limit;
                format!(
                    "normal 0 0 0 slave 268435456 67108864 60 pubsub {} {} {}",
                    l.hard_bytes, l.soft_bytes, l.soft_seconds
                )
            }
            "timeout" => self.timeout_seconds.to_string(),
            "databases" => "16".to_string(),
            "port" => listen.port().to_string(),
            "bind" => listen.ip().to_string(),
            _ => return None,
        })
    }

    /// Applies `CONFIG SET name value`, `name` as [`setting_to_set`] returns it; values are
    /// parsed and bounded as Redis 7 does. The node's start-up settings for these are applied
    /// with it too, so a value is taken, and refused for the same reason, whichever way it
    /// comes.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), SettingError> {
        match name {
            "requirepass" => {
                self.requirepass = (!value.is_empty()).then(|| value.to_string());
            }
            "protected-mode" => self.protected_mode = parse_yes_no(value)?,
            "maxclients" => self.maxclients = parse_integer(value, bounds(name))? as usize,
            "proto-max-bulk-len" => {
                self.proto_max_bulk_len = parse_memory_setting(value, bounds(name))?
            }
            "client-query-buffer-limit" => {
                self.client_query_buffer_limit = parse_memory_setting(value, bounds(name))?
            }
            "client-output-buffer-limit" => {
                self.pubsub_output_limit = parse_output_limit(value, self.pubsub_output_limit)?
            }
            "timeout" => self.timeout_seconds = parse_integer(value, bounds(name))? as u64,
            "databases" | "port" | "bind" => return Err(SettingError::Immutable),
            _ => return Err(SettingError::Unknown),
        }
        Ok(())
    }
}

fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}

fn parse_yes_no(value: &str) -> Result<bool, SettingError> {
    match value.to_ascii_lowercase().as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(SettingError::Invalid(
            "argument must be 'yes' or 'no'".into(),
        )),
    }
}

/// An integer setting as Redis parses it (`string2ll`: no `+`, no leading zeros), within
/// `min..=max`.
fn parse_integer(value: &str, (min, max): (i64, i64)) -> Result<i64, SettingError> {
    let n = crate::resp::parse::parse_strict_i64(value.as_bytes()).ok_or_else(|| {
        SettingError::Invalid("argument couldn't be parsed into an integer".into())
    })?;
    if n < min || n > max {
        return Err(out_of_bounds(min, max));
    }
    Ok(n)
}

fn out_of_bounds(min: i64, max: i64) -> SettingError {
    SettingError::Invalid(format!(
        "argument must be between {min} and {max} inclusive"
    ))
}

/// The bytes in one of Redis's memory units (lower case; none is bytes).
fn memory_unit(unit: &str) -> Option<u64> {
    Some(match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return None,
    })
}

/// A memory value as Redis's `memtoull` reads it: digits (none is 0; past `u64::MAX` is
/// `u64::MAX`) and a unit, multiplied with wrap-around; `None` when it is no memory value.
fn redis_memtoull(value: &str) -> Option<u64> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let multiplier = memory_unit(&unit.to_ascii_lowercase())?;
    if digits.len() >= 128 {
        return None;
    }
    let number = if digits.is_empty() {
        0
    } else {
        digits.parse::<u64>().unwrap_or(u64::MAX)
    };
    Some(number.wrapping_mul(multiplier))
}

/// A memory setting as Redis 7 checks it: a memory value, then (read as a signed 64-bit
/// number) within `bounds`.
fn parse_memory_setting(value: &str, (min, max): (i64, i64)) -> Result<usize, SettingError> {
    let bytes = redis_memtoull(value)
        .ok_or_else(|| SettingError::Invalid("argument must be a memory value".into()))?
        as i64;
    if bytes < min || bytes > max {
        return Err(out_of_bounds(min, max));
    }
    Ok(bytes as usize)
}

/// Parses `client-output-buffer-limit` as Redis 7 does: `<class> <hard> <soft> <seconds>`
/// groups, split at each single space (an empty value is no group, and changes nothing);
/// herald keeps the `pubsub` class and accepts (and ignores) `normal` and `replica`/`slave`.
/// Nothing changes unless every group is valid.
fn parse_output_limit(value: &str, current: OutputLimit) -> Result<OutputLimit, SettingError> {
    let words: Vec<&str> = if value.is_empty() {
        Vec::new()
    } else {
        value.split(' ').collect()
    };
    if !words.len().is_multiple_of(4) {
        return Err(SettingError::Invalid(
            "Wrong number of arguments in buffer limit configuration.".into(),
        ));
    }
    let mut limit = current;
    for group in words.chunks(4) {
        let class = group[0].to_ascii_lowercase();
        if !matches!(class.as_str(), "pubsub" | "normal" | "replica" | "slave") {
            return Err(SettingError::Invalid(
                "Invalid client class specified in buffer limit configuration.".into(),
            ));
        }
        // Redis reads the seconds with `strtoll` into an `int`: 2147483648 is negative and
        // refused, 4294967297 is 1. It does so from its config file and command line too (they
        // share `CONFIG SET`'s code), so herald's start-up takes them this way as well
        // (`--pubsub-output-limit` is this `pubsub` group), rather than refusing at start-up
        // what `CONFIG SET` takes.
        let seconds = redis_strtoll(group[3]).map(|s| s as i32);
        let (Some(hard), Some(soft), Some(seconds @ 0..)) =
            (redis_memtoull(group[1]), redis_memtoull(group[2]), seconds)
        else {
            return Err(SettingError::Invalid(
                "Error in hard, soft or soft_seconds setting in buffer limit configuration.".into(),
            ));
        };
        if class == "pubsub" {
            limit = OutputLimit {
                hard_bytes: hard as usize,
                soft_bytes: soft as usize,
                soft_seconds: seconds as u64,
            };
        }
    }
    Ok(limit)
}

/// A whole string read by C's `strtoll` (base 10): leading white space, a sign, digits
/// (saturating); an empty string is 0. `None` when anything is left over.
fn redis_strtoll(text: &str) -> Option<i64> {
    if text.is_empty() {
        return Some(0);
    }
    let rest = text.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, digits) = match rest.as_bytes().first() {
        Some(b'-') => (true, &rest[1..]),
        Some(b'+') => (false, &rest[1..]),
        _ => (false, rest),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match (digits.parse::<i64>(), negative) {
        (Ok(n), false) => n,
        (Ok(n), true) => -n,
        (Err(_), false) => i64::MAX,
        (Err(_), true) => i64::MIN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_values_like_redis() {
        assert_eq!(redis_memtoull("32mb"), Some(32 * 1024 * 1024));
        assert_eq!(redis_memtoull("1k"), Some(1000));
        assert_eq!(redis_memtoull("1GB"), Some(1 << 30));
        assert_eq!(redis_memtoull("mb"), Some(0), "no digits are 0");
        assert_eq!(
            redis_memtoull("9000000000gb"),
            Some(9_663_676_416_000_000_000),
            "multiplied with wrap-around"
        );
        assert_eq!(redis_memtoull("12xb"), None);
        assert_eq!(redis_memtoull("1.5mb"), None);
    }

    #[test]
    fn output_limit_round_trips_through_config() {
        let mut settings = RespSettings::default();
        settings
            .set("client-output-buffer-limit", "pubsub 1mb 512kb 5")
            .unwrap();
        let addr = "127.0.0.1:6379".parse().unwrap();
        assert_eq!(
            settings.get("client-output-buffer-limit", addr).unwrap(),
            "normal 0 0 0 slave 268435456 67108864 60 pubsub 1048576 524288 5"
        );
        settings
            .set("client-output-buffer-limit", "pubsub 1 2 4294967297")
            .unwrap();
        assert_eq!(
            settings.pubsub_output_limit.soft_seconds, 1,
            "an int, as Redis"
        );
        assert!(
            settings
                .set("client-output-buffer-limit", "pubsub 1 2 2147483648")
                .is_err()
        );
        assert_eq!(settings.set("port", "1"), Err(SettingError::Immutable));
        assert_eq!(settings.set("nope", "1"), Err(SettingError::Unknown));
    }
}
