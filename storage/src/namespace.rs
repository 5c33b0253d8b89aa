//! Namespaces: per-channel-family retention and durability settings.
//!
//! A channel's namespace is the part before its first `:` (`job_progress:job_1` ->
//! `job_progress`); a channel without `:`, or whose namespace is not configured, uses the default
//! namespace. The node parses the config with serde (e.g. from TOML):
//!
//! ```toml
//! [namespace.default]      # applies where no namespace matches
//! history_size = 100       # events kept per channel (0 = no history)
//! history_ttl = "24h"      # age limit ("500ms", "30s", "15m", "24h", "7d"; "0" or "none" = none)
//! durable = true           # publish is acknowledged after commit
//!
//! [namespace.cursor]
//! history_size = 0
//! durable = false
//! ```
//!
//! Keys a table leaves out are inherited from `[namespace.default]`, whose own missing keys come
//! from [`NamespaceConfig::default`]. Unknown keys are rejected.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::{Deserialize, Deserializer, Serialize};

/// The name of the namespace that applies where no other matches.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How the channels of one namespace behave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceConfig {
    /// Events kept per channel, oldest dropped first (0 = no history).
    pub history_size: usize,
    /// How long an event is kept after it was applied (`None` = no age limit).
    pub history_ttl: Option<Duration>,
    /// Whether a publish goes through the log (sequenced, stored, acknowledged after commit).
    /// Non-durable namespaces are fan-out only: the gateway does not call the store for them.
    pub durable: bool,
}

impl Default for NamespaceConfig {
    /// The implicit default namespace: 100 events, 24 hours, durable.
    fn default() -> Self {
        NamespaceConfig {
            history_size: 100,
            history_ttl: Some(Duration::from_secs(24 * 3600)),
            durable: true,
        }
    }
}

/// The default namespace plus the named ones; answers "which config applies to this channel".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    default: NamespaceConfig,
    named: HashMap<Box<[u8]>, NamespaceConfig>,
}

impl Namespaces {
    /// Namespaces with `default` for unmatched channels and no named namespace.
    pub fn new(default: NamespaceConfig) -> Self {
        Namespaces {
            default,
            named: HashMap::new(),
        }
    }

    /// Adds (or replaces) the namespace `name`. Naming `"default"` replaces the default.
    pub fn with(mut self, name: &str, config: NamespaceConfig) -> Self {
        self.insert(name, config);
        self
    }

    /// Adds (or replaces) the namespace `name`. Naming `"default"` replaces the default.
    pub fn insert(&mut self, name: &str, config: NamespaceConfig) {
        if name == DEFAULT_NAMESPACE {
            self.default = config;
        } else {
            self.named.insert(name.as_bytes().into(), config);
        }
    }

    /// The config of the default namespace.
    pub fn default_config(&self) -> &NamespaceConfig {
        &self.default
    }

    /// The config of the namespace `name` (the default one for `"default"`), if configured.
    pub fn get(&self, name: &str) -> Option<&NamespaceConfig> {
        if name == DEFAULT_NAMESPACE {
            Some(&self.default)
        } else {
            self.named.get(name.as_bytes())
        }
    }

    /// The config that applies to `channel`: that of the bytes before its first `:`, or the
    /// default one when there is no `:` or that namespace is not configured.
    pub fn for_channel(&self, channel: &[u8]) -> &NamespaceConfig {
        if self.named.is_empty() {
            return &self.default;
        }
        match channel.iter().position(|&b| b == b':') {
            Some(i) => self.named.get(&channel[..i]).unwrap_or(&self.default),
            None => &self.default,
        }
    }

    /// The names of the configured namespaces other than the default one, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .named
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        v.sort();
        v
    }
}

/// A [`Namespaces`] as the cluster's meta group stores it: every namespace resolved (nothing
/// inherited), the default one first, the others sorted by name. Two nodes with the same
/// effective config produce the same spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespacesSpec {
    /// `(name, config)`, `"default"` first.
    pub namespaces: Vec<(String, NamespaceSpec)>,
}

/// One namespace of a [`NamespacesSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSpec {
    /// [`NamespaceConfig::history_size`].
    pub history_size: u64,
    /// [`NamespaceConfig::history_ttl`] in milliseconds (`None`: no age limit).
    pub history_ttl_ms: Option<u64>,
    /// [`NamespaceConfig::durable`].
    pub durable: bool,
}

impl NamespaceSpec {
    fn of(c: &NamespaceConfig) -> NamespaceSpec {
        NamespaceSpec {
            history_size: c.history_size as u64,
            history_ttl_ms: c
                .history_ttl
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            durable: c.durable,
        }
    }

    fn config(&self) -> NamespaceConfig {
        NamespaceConfig {
            history_size: usize::try_from(self.history_size).unwrap_or(usize::MAX),
            history_ttl: self.history_ttl_ms.map(Duration::from_millis),
            durable: self.durable,
        }
    }
}

impl Namespaces {
    /// Parses the `[namespace.NAME]` tables of a TOML document, e.g. a node's config file
    /// (its other keys are not looked at): what `herald cluster namespaces --set FILE` sends.
    /// A document without a `namespace` table is refused, so that a wrong file does not reset
    /// every namespace to the defaults.
    pub fn from_toml(text: &str) -> Result<Namespaces, String> {
        /// The document's namespace tables; its other keys are ignored.
        #[derive(Deserialize)]
        struct Document {
            namespace: Option<Namespaces>,
        }
        // Parsed from the text (not from a parsed table) so that an error has its line.
        let doc: Document = toml::from_str(text).map_err(|e| match toml_error_place(text, &e) {
            place if place.is_empty() => e.message().to_string(),
            place => format!("line{place}: {}", e.message()),
        })?;
        doc.namespace.ok_or_else(|| {
            "no [namespace.NAME] table (write [namespace.default] for the defaults)".into()
        })
    }

    /// The resolved form the cluster stores (see [`NamespacesSpec`]).
    pub fn to_spec(&self) -> NamespacesSpec {
        let mut namespaces = vec![(
            DEFAULT_NAMESPACE.to_string(),
            NamespaceSpec::of(&self.default),
        )];
        for name in self.names() {
            if let Some(c) = self.get(&name) {
                namespaces.push((name, NamespaceSpec::of(c)));
            }
        }
        NamespacesSpec { namespaces }
    }

    /// The namespaces a spec describes.
    pub fn from_spec(spec: &NamespacesSpec) -> Namespaces {
        let mut ns = Namespaces::default();
        for (name, config) in &spec.namespaces {
            ns.insert(name, config.config());
        }
        ns
    }

    /// The config as TOML tables, every key written out, the default namespace first: what
    /// `herald cluster namespaces` shows, and what `--set` reads back unchanged.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (name, c) in self.to_spec().namespaces {
            let ttl = match c.history_ttl_ms {
                None => "none".to_string(),
                Some(ms) if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
                Some(ms) if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
                Some(ms) if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
                Some(ms) if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
                Some(ms) => format!("{ms}ms"),
            };
            let key = if name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                name
            } else {
                format!("{name:?}")
            };
            out.push_str(&format!(
                "[namespace.{key}]\nhistory_size = {}\nhistory_ttl = \"{ttl}\"\ndurable = {}\n\n",
                c.history_size, c.durable
            ));
        }
        out.pop();
        out
    }
}

/// The namespace config in force on this node: the cluster's, once its meta group holds one
/// (every member then applies the same retention and routes the same namespaces through Raft),
/// otherwise this node's own file's (a single node, or a cluster formed before the cluster kept
/// one). Read once per publish batch, so a change applies from the next batch on.
#[derive(Debug)]
pub struct LiveNamespaces {
    local: Arc<Namespaces>,
    cluster: RwLock<Option<Arc<Namespaces>>>,
}

impl LiveNamespaces {
    /// This node's file config, no cluster config yet.
    pub fn new(local: Namespaces) -> Arc<LiveNamespaces> {
        Arc::new(LiveNamespaces {
            local: Arc::new(local),
            cluster: RwLock::new(None),
        })
    }

    /// The config in force.
    pub fn current(&self) -> Arc<Namespaces> {
        self.cluster
            .read()
            .clone()
            .unwrap_or_else(|| self.local.clone())
    }

    /// Runs `f` on the config in force (no reference count taken: for per-publish lookups).
    pub fn with<R>(&self, f: impl FnOnce(&Namespaces) -> R) -> R {
        match &*self.cluster.read() {
            Some(cluster) => f(cluster),
            None => f(&self.local),
        }
    }

    /// This node's own (file) config.
    pub fn local(&self) -> &Arc<Namespaces> {
        &self.local
    }

    /// The cluster's config, if its meta group holds one.
    pub fn cluster(&self) -> Option<Arc<Namespaces>> {
        self.cluster.read().clone()
    }

    /// Replaces the cluster's config (the meta group applied one, or a snapshot); says so in
    /// the log when it changes. When it differs from this node's file, the first one (at
    /// start, or when the cluster forms) is a warning: the file does not say what the node
    /// does. A later change is an operator's `namespaces --set`, logged as information: a
    /// warning on every node for an intended change would teach operators to ignore them.
    pub(crate) fn set_cluster(&self, spec: Option<&NamespacesSpec>) {
        let next = spec.map(|s| Arc::new(Namespaces::from_spec(s)));
        let mut cluster = self.cluster.write();
        if *cluster == next {
            return;
        }
        match &next {
            Some(ns) if **ns != *self.local && cluster.is_none() => tracing::warn!(
                cluster = %ns.to_toml().replace('\n', " "),
                file = %self.local.to_toml().replace('\n', " "),
                "the cluster's namespace config differs from this node's config file; the cluster's applies (`herald cluster namespaces --set FILE` changes it for every node)"
            ),
            Some(ns) if **ns != *self.local => tracing::info!(
                cluster = %ns.to_toml().replace('\n', " "),
                file = %self.local.to_toml().replace('\n', " "),
                "the cluster's namespace config changed; it differs from this node's config file, and the cluster's applies"
            ),
            Some(_) => tracing::info!(
                "the cluster's namespace config is in force (the same as this node's file)"
            ),
            None => {
                tracing::info!("the cluster holds no namespace config; this node's file applies")
            }
        }
        *cluster = next;
    }
}

/// One `[namespace.NAME]` table as written: every key optional, unknown keys rejected.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    history_size: Option<usize>,
    #[serde(default, deserialize_with = "de_ttl")]
    history_ttl: Option<Option<Duration>>,
    durable: Option<bool>,
}

impl RawNamespace {
    fn over(self, base: &NamespaceConfig) -> NamespaceConfig {
        NamespaceConfig {
            history_size: self.history_size.unwrap_or(base.history_size),
            history_ttl: self.history_ttl.unwrap_or(base.history_ttl),
            durable: self.durable.unwrap_or(base.durable),
        }
    }
}

fn de_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Duration>>, D::Error> {
    let s = String::deserialize(d)?;
    let s = s.trim();
    if s == "none" || s == "0" {
        return Ok(Some(None));
    }
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Ok(Some(None)),
        Ok(d) => Ok(Some(Some(d))),
        Err(e) => Err(serde::de::Error::custom(format!(
            "{e}; or \"none\" for no age limit"
        ))),
    }
}

impl<'de> Deserialize<'de> for NamespaceConfig {
    /// A single namespace table; missing keys come from [`NamespaceConfig::default`].
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(RawNamespace::deserialize(d)?.over(&NamespaceConfig::default()))
    }
}

impl<'de> Deserialize<'de> for Namespaces {
    /// The `namespace` table: a map from namespace name to its table (see the module docs).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut raw = BTreeMap::<String, RawNamespace>::deserialize(d)?;
        let default = raw
            .remove(DEFAULT_NAMESPACE)
            .unwrap_or_default()
            .over(&NamespaceConfig::default());
        let mut ns = Namespaces::new(default);
        for (name, table) in raw {
            if name.is_empty() || name.contains(':') {
                return Err(serde::de::Error::custom(format!(
                    "namespace name {name:?} must be non-empty and contain no ':'"
                )));
            }
            let config = table.over(&ns.default);
            ns.insert(&name, config);
        }
        Ok(ns)
    }
}

/// Where a TOML parse error is, as ` N (`the line as written`)`, or nothing when it has no
/// place: error messages name the line because a type error's own message names no key.
pub fn toml_error_place(text: &str, error: &toml::de::Error) -> String {
    error
        .span()
        .and_then(|span| {
            let line = text[..span.start.min(text.len())].matches('\n').count();
            text.lines()
                .nth(line)
                .map(|l| format!(" {} (`{}`)", line + 1, l.trim()))
        })
        .unwrap_or_default()
}

/// Why a duration string was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: expected a whole number with a unit, like \"500ms\", \"30s\", \"15m\", \"24h\" or \"7d\"",
            self.0
        )
    }
}

impl std::error::Error for DurationError {}

/// Parses `"500ms"`, `"30s"`, `"15m"`, `"24h"`, `"7d"`: a whole number and one unit
/// (`ms`, `s`, `m`, `h`, `d`). Config files use it for every duration.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err());
    }
    let n: u64 = num.parse().map_err(|_| err())?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(err()),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_form_round_trips_and_reads_back() {
        let ns = parse(
            "[namespace.default]\nhistory_size = 7\nhistory_ttl = \"90s\"\n\
             [namespace.cursor]\nhistory_size = 0\ndurable = false\n\
             [namespace.jobs]\nhistory_ttl = \"none\"\n",
        )
        .unwrap();
        assert_eq!(Namespaces::from_spec(&ns.to_spec()), ns);
        let text = ns.to_toml();
        assert_eq!(
            text,
            "[namespace.default]\nhistory_size = 7\nhistory_ttl = \"90s\"\ndurable = true\n\n\
             [namespace.cursor]\nhistory_size = 0\nhistory_ttl = \"90s\"\ndurable = false\n\n\
             [namespace.jobs]\nhistory_size = 7\nhistory_ttl = \"none\"\ndurable = true\n"
        );
        assert_eq!(Namespaces::from_toml(&text).unwrap(), ns);
        // A node's whole config file: only its namespace tables count.
        let file = format!("resp_addr = \"127.0.0.1:6379\"\n{text}");
        assert_eq!(Namespaces::from_toml(&file).unwrap(), ns);
    }

    #[test]
    fn a_document_without_namespaces_or_with_bad_ones_is_refused() {
        assert_eq!(
            Namespaces::from_toml("resp_addr = \"x\"\n").unwrap_err(),
            "no [namespace.NAME] table (write [namespace.default] for the defaults)"
        );
        // Errors name the line, as written.
        let e = Namespaces::from_toml("[namespace.x]\nhistory_size = \"many\"\n").unwrap_err();
        assert_eq!(
            e,
            "line 2 (`history_size = \"many\"`): invalid type: string \"many\", expected usize"
        );
        let e = Namespaces::from_toml("[namespace.x]\nhistory_ttl = \"forever\"\n").unwrap_err();
        assert!(
            e.starts_with("line 2 (`history_ttl = \"forever\"`): invalid duration \"forever\"")
                && e.ends_with("; or \"none\" for no age limit"),
            "{e}"
        );
        let e = Namespaces::from_toml("[namespace.x\n").unwrap_err();
        assert!(e.starts_with("line 1 (`[namespace.x`): "), "{e}");
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NodeConfig {
        #[serde(default)]
        namespace: Namespaces,
    }

    fn parse(s: &str) -> Result<Namespaces, String> {
        toml::from_str::<NodeConfig>(s)
            .map(|c| c.namespace)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn default_namespace() {
        let ns = Namespaces::default();
        let d = ns.for_channel(b"anything");
        assert_eq!(d.history_size, 100);
        assert_eq!(d.history_ttl, Some(Duration::from_secs(86_400)));
        assert!(d.durable);
        assert_eq!(parse("").unwrap(), ns);
    }

    #[test]
    fn channel_lookup() {
        let cursor = NamespaceConfig {
            history_size: 0,
            history_ttl: None,
            durable: false,
        };
        let ns = Namespaces::default().with("cursor", cursor.clone());
        assert_eq!(ns.for_channel(b"cursor:user_1"), &cursor);
        assert_eq!(ns.for_channel(b"cursor:a:b"), &cursor);
        assert_eq!(ns.for_channel(b"cursor"), ns.default_config());
        assert_eq!(ns.for_channel(b"cursors:x"), ns.default_config());
        assert_eq!(ns.for_channel(b":x"), ns.default_config());
        assert_eq!(ns.for_channel(b"job_progress:job_1"), ns.default_config());
        assert_eq!(ns.get("cursor"), Some(&cursor));
        assert_eq!(ns.names(), vec!["cursor".to_string()]);
    }

    #[test]
    fn parses_the_design_example() {
        let ns = parse(
            r#"
            [namespace.default]
            history_size = 100
            history_ttl = "24h"
            durable = true

            [namespace.cursor]
            history_size = 0
            durable = false

            [namespace.audit]
            history_size = 1000
            history_ttl = "7d"

            [namespace.forever]
            history_ttl = "none"
            "#,
        )
        .unwrap();
        let cursor = ns.for_channel(b"cursor:1");
        assert_eq!(cursor.history_size, 0);
        assert!(!cursor.durable);
        assert_eq!(cursor.history_ttl, Some(Duration::from_secs(86_400)));
        let audit = ns.for_channel(b"audit:x");
        assert_eq!(audit.history_ttl, Some(Duration::from_secs(7 * 86_400)));
        assert!(audit.durable);
        assert_eq!(ns.for_channel(b"forever:x").history_ttl, None);
    }

    #[test]
    fn named_namespaces_inherit_the_configured_default() {
        let ns = parse(
            r#"
            [namespace.default]
            history_size = 5
            history_ttl = "30s"
            [namespace.a]
            durable = false
            "#,
        )
        .unwrap();
        let a = ns.for_channel(b"a:1");
        assert_eq!(a.history_size, 5);
        assert_eq!(a.history_ttl, Some(Duration::from_secs(30)));
        assert!(!a.durable);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_durations() {
        let e = parse("[namespace.default]\nhistory_sise = 3\n").unwrap_err();
        assert!(e.contains("unknown field `history_sise`"), "{e}");
        let e = parse("[namespace.x]\nhistory_ttl = \"10 parsecs\"\n").unwrap_err();
        assert!(e.contains("invalid duration \"10 parsecs\""), "{e}");
        let e = parse("[namespace.x]\nhistory_ttl = \"forever\"\n").unwrap_err();
        assert!(
            e.contains("or \"7d\"; or \"none\" for no age limit") && e.contains("line 2"),
            "{e}"
        );
        let e = parse("[namespace.x]\nhistory_ttl = 10\n").unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse("[namespace.x]\nhistory_size = -1\n").unwrap_err();
        assert!(e.contains("history_size"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "s",
            "10",
            "1.5h",
            "-1s",
            "10x",
            "99999999999999999999d",
            "1 h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let msg = parse_duration("1y").unwrap_err().to_string();
        assert!(msg.starts_with("invalid duration \"1y\""), "{msg}");
    }
}
