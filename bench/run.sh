#!/usr/bin/env bash
# Side-by-side benchmarks: repnoise and the reference (PyTorch + transformers) on the same model,
# shapes and data, in one run on one machine. Results: bench/out/results.jsonl and
# bench/out/table.md (copied by hand into docs/BENCHMARKS.md with the machine description).
#
# Usage: bash bench/run.sh [STEPS]     (STEPS timed repetitions per benchmark, default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-5}
bash bench/setup.sh
cargo build --release -q
BIN=target/release/repnoise
OUT=bench/out
mkdir -p "$OUT"
MODEL="$OUT/smollm2-hf"
# Both sides load the same f32 safetensors directory, converted from the embedded GGUF.
[ -f "$MODEL/config.json" ] || "$BIN" convert --model smollm2-135m-instruct --out "$MODEL"
PY=bench/.venv/bin/python
: > "$OUT/results.jsonl"
"$BIN" bench matmul --model "$MODEL" --steps 5 >> "$OUT/results.jsonl"
run() {  # run WHAT EXTRA_ARGS...
  echo "== $1 (repnoise)" >&2
  "$BIN" bench "$1" --model "$MODEL" --steps "$STEPS" "${@:2}" >> "$OUT/results.jsonl"
  echo "== $1 (pytorch)" >&2
  "$PY" bench/reference.py "$1" "$MODEL" --steps "$STEPS" "${@:2}" >> "$OUT/results.jsonl"
}
run train-step --batch 4 --seq 128
run generate --batch 8 --new-tokens 64
run score --batch 4 --seq 128
{
  echo "Machine: $(lscpu | sed -n 's/Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(date -u +%Y-%m-%d)"
  echo "Command: bash bench/run.sh $STEPS"
  echo
  python3 bench/report.py "$OUT/results.jsonl"
} | tee "$OUT/table.md"
