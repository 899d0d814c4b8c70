//! Records the commit the binary was built from (`REPNOISE_BUILD_COMMIT`, with `-dirty` when
//! the sources it is built from differed from that commit), so reports name the code that
//! produced them.
//!
//! When cargo re-runs this script (and so re-links the binary): when the commit changes (the
//! watched `.git/HEAD`, `.git/refs` (a commit writes the branch's loose ref there, even where it
//! was packed) and `.git/packed-refs`), or when a source the binary is built from changes (`src`,
//! `configs`, `Cargo.toml`, `Cargo.lock`, `vendor`, this script), which rebuilds the binary
//! anyway. Not `.git/index`: every `git status` or `git add` rewrites it, and each rewrite used to
//! re-link the whole binary. `-dirty` looks at those sources only, so edits to docs or tests do
//! not mark a binary whose code is the commit's. Only paths that exist are watched (cargo re-runs
//! a script on every build while a watched path is missing); in a git worktree (`.git` is a file)
//! no git path is, and the commit is read again only when a source changes.
use std::path::Path;
use std::process::Command;

/// What the binary is built from: watched, and what `-dirty` looks at.
const SOURCES: &[&str] = &[
    "src",
    "configs",
    "Cargo.toml",
    "Cargo.lock",
    "vendor",
    "build.rs",
];

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
        && git(&[
            &["status", "--porcelain", "--untracked-files=no", "--"],
            SOURCES,
        ]
        .concat())
        .is_some_and(|o| !o.stdout.is_empty());
    let value = if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    };
    println!("cargo:rustc-env=REPNOISE_BUILD_COMMIT={value}");
    for p in [".git/HEAD", ".git/refs", ".git/packed-refs"]
        .iter()
        .chain(SOURCES)
        .filter(|p| Path::new(p).exists())
    {
        println!("cargo:rerun-if-changed={p}");
    }
}
