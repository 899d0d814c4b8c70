//! Records the commit the binary was built from (`REPNOISE_BUILD_COMMIT`, with `-dirty` when
//! tracked files differed from it), so reports name the code that produced them.
//!
//! When cargo re-runs this script (and so re-links the binary): when the commit changes (the
//! watched `.git/HEAD`, and the branch ref it names: its loose file, or `.git/packed-refs` where
//! the ref is packed), or when a source the binary is built from changes (`src`, `configs`,
//! `Cargo.toml`, `Cargo.lock`, `vendor`), which rebuilds the binary anyway and re-reads the dirty
//! state. Not `.git/index`: every `git status` or `git add` rewrites it, and each rewrite used to
//! re-link the whole binary. So a tree whose only changes are outside those sources (docs, tests)
//! builds a binary named after the clean commit: its code is that commit's. Only paths that
//! exist are watched (cargo re-runs a script on every build while a watched path is missing).
use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<std::process::Output> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = !commit.is_empty()
        && git(&["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|o| !o.stdout.is_empty());
    let value = if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    };
    println!("cargo:rustc-env=REPNOISE_BUILD_COMMIT={value}");
    let mut watch: Vec<String> = [
        ".git/HEAD",
        "src",
        "configs",
        "Cargo.toml",
        "Cargo.lock",
        "vendor",
    ]
    .map(String::from)
    .to_vec();
    // The ref HEAD names ("ref: refs/heads/main"): its loose file, else the packed refs.
    if let Some(r) = std::fs::read_to_string(".git/HEAD")
        .ok()
        .and_then(|h| h.strip_prefix("ref:").map(|r| r.trim().to_string()))
    {
        let loose = format!(".git/{r}");
        watch.push(if Path::new(&loose).exists() {
            loose
        } else {
            ".git/packed-refs".into()
        });
    }
    for p in watch.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={p}");
    }
}
