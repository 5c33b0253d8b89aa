//! Which build this is: the version and the commit herald was built from (`gateway/build.rs`
//! sets `HERALD_COMMIT`), as `--version`, `/health`, `INFO`, `/metrics` and `herald cluster
//! status` report them.

/// herald's version, as every surface reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit herald was built from (12 hex digits; `unknown` for a build without git), as
/// `--version`, `/health`, `INFO` and `/metrics` report it: it tells builds of one version
/// apart, which nodes a rolling upgrade has reached.
pub const COMMIT: &str = env!("HERALD_COMMIT");

/// `0.1.0 (commit 0123456789ab)`: what `herald --version` prints after the name.
pub const VERSION_AND_COMMIT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("HERALD_COMMIT"),
    ")"
);
