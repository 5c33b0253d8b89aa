//! Settings of the Redis-protocol server that `CONFIG GET` / `CONFIG SET` read and change at
//! run time, with the names, units and formats Redis uses for them.

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

/// Why a `CONFIG SET` was refused; the text follows Redis's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingError {
    /// Not a herald setting.
    Unknown,
    /// Known, but fixed at start-up.
    Immutable,
    /// The value does not parse.
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

    /// Applies `CONFIG SET name value`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), SettingError> {
        match name {
            "requirepass" => {
                self.requirepass = (!value.is_empty()).then(|| value.to_string());
            }
            "protected-mode" => self.protected_mode = parse_yes_no(value)?,
            "maxclients" => self.maxclients = parse_integer(value)?.max(1) as usize,
            "proto-max-bulk-len" => {
                let bytes = parse_memory(value)?;
                if bytes < 1024 {
                    return Err(SettingError::Invalid(
                        "argument must be a memory value of at least 1kb".into(),
                    ));
                }
                self.proto_max_bulk_len = bytes;
            }
            "client-query-buffer-limit" => {
                let bytes = parse_memory(value)?;
                if bytes < 1024 * 1024 {
                    return Err(SettingError::Invalid(
                        "argument must be a memory value of at least 1mb".into(),
                    ));
                }
                self.client_query_buffer_limit = bytes;
            }
            "client-output-buffer-limit" => {
                self.pubsub_output_limit = parse_output_limit(value, self.pubsub_output_limit)?
            }
            "timeout" => self.timeout_seconds = parse_integer(value)?,
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

fn parse_integer(value: &str) -> Result<u64, SettingError> {
    value
        .parse::<u64>()
        .map_err(|_| SettingError::Invalid("argument couldn't be parsed into an integer".into()))
}

/// Parses a Redis memory value: `1024`, `64kb`, `32mb`, `1gb`, `1k` (1000), `1m` (1000000)...
pub fn parse_memory(value: &str) -> Result<usize, SettingError> {
    let lower = value.to_ascii_lowercase();
    let split = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(split);
    let multiplier: usize = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => {
            return Err(SettingError::Invalid(
                "argument must be a memory value".into(),
            ));
        }
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| SettingError::Invalid("argument must be a memory value".into()))
}

/// Parses `client-output-buffer-limit`: `<class> <hard> <soft> <seconds>` groups; herald keeps
/// the `pubsub` class and accepts (and ignores) `normal` and `replica`/`slave`.
fn parse_output_limit(value: &str, current: OutputLimit) -> Result<OutputLimit, SettingError> {
    let words: Vec<&str> = value.split_whitespace().collect();
    if words.is_empty() || !words.len().is_multiple_of(4) {
        return Err(SettingError::Invalid(
            "Wrong number of arguments in buffer limit configuration.".into(),
        ));
    }
    let mut limit = current;
    for group in words.chunks(4) {
        let hard = parse_memory(group[1])?;
        let soft = parse_memory(group[2])?;
        let seconds = group[3].parse::<u64>().map_err(|_| {
            SettingError::Invalid(
                "Error in soft_seconds setting in buffer limit configuration.".into(),
            )
        })?;
        match group[0].to_ascii_lowercase().as_str() {
            "pubsub" => {
                limit = OutputLimit {
                    hard_bytes: hard,
                    soft_bytes: soft,
                    soft_seconds: seconds,
                }
            }
            "normal" | "replica" | "slave" => {}
            _ => {
                return Err(SettingError::Invalid(
                    "Invalid client class specified in buffer limit configuration.".into(),
                ));
            }
        }
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_values_like_redis() {
        assert_eq!(parse_memory("32mb"), Ok(32 * 1024 * 1024));
        assert_eq!(parse_memory("1k"), Ok(1000));
        assert_eq!(parse_memory("1GB"), Ok(1 << 30));
        assert!(parse_memory("12xb").is_err());
        assert!(parse_memory("").is_err());
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
        assert_eq!(settings.set("port", "1"), Err(SettingError::Immutable));
        assert_eq!(settings.set("nope", "1"), Err(SettingError::Unknown));
    }
}
