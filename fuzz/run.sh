#!/usr/bin/env bash
# Fuzz every target with cargo fuzz (libFuzzer) for a fixed number of executions, starting from
# the seeds of the CI mutation test (tests/it/fuzz.rs). Needs cargo-fuzz (installed if missing)
# and a C++ compiler; works on the stable toolchain (no sanitizer: `-s none`).
#
#   bash fuzz/run.sh [RUNS_PER_TARGET]     (default 100000)
#
# Prints libFuzzer's last status line per target; a crash stops with the input saved under
# fuzz/artifacts/<target>/ (replay: cargo fuzz run -s none --release <target> <file>).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-100000}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
REPNOISE_FUZZ_SEEDS="$PWD/fuzz/corpus" cargo test --release --test it fuzz:: >/dev/null
for t in gguf safetensors dataset config; do
  start=$(date +%s)
  cargo fuzz run -s none --release "$t" "fuzz/corpus/$t" -- -runs="$RUNS" -rss_limit_mb=4096 \
    >"fuzz/$t.log" 2>&1 || { tail -n 30 "fuzz/$t.log"; exit 1; }
  echo "$t: $(grep -E '^#[0-9]+' "fuzz/$t.log" | tail -n 1) ($(( $(date +%s) - start )) s)"
done
