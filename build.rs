//! Records the commit the binary was built from (`REPNOISE_BUILD_COMMIT`, with `-dirty` when
//! tracked files differed from it), so reports name the code that produced them.
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
    for p in [
        ".git/HEAD",
        ".git/index",
        ".git/refs",
        ".git/packed-refs",
        "src",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
}
