//! Records the commit herald is built from (`HERALD_COMMIT`), so that `--version`, `/health`,
//! `INFO` and `/metrics` tell operators which build each node runs (a rolling upgrade shows
//! which nodes are done). A `HERALD_COMMIT` set in the build's environment wins (a build from
//! a source archive); without git it is `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .filter(|text| !text.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=HERALD_COMMIT");
    let commit = std::env::var("HERALD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Only this workspace's own repository tells its commit: sources unpacked inside
            // another one (a packaging repository) would be given that one's.
            let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
            let top = git(&["rev-parse", "--show-toplevel"])?;
            if std::fs::canonicalize(top).ok()? != std::fs::canonicalize(workspace).ok()? {
                return None;
            }
            // Built again when HEAD moves: the files naming it (HEAD, its reflog, the branch's
            // ref, packed refs), those that exist: cargo takes a missing file for a changed
            // one and would build this crate again every time.
            let branch = git(&["symbolic-ref", "-q", "HEAD"]);
            for path in ["HEAD", "logs/HEAD", "packed-refs"]
                .into_iter()
                .map(str::to_string)
                .chain(branch)
            {
                if let Some(file) = git(&["rev-parse", "--git-path", &path])
                    .filter(|file| std::path::Path::new(file).exists())
                {
                    println!("cargo:rerun-if-changed={file}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=HERALD_COMMIT={commit}");
}
