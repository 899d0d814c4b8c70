#!/usr/bin/env bash
# Side-by-side benchmarks: repnoise and the reference (PyTorch + transformers, PEFT for LoRA, the
# authors' RepNoise loss) on the same model, shapes and data, in one run on one machine.
# Results: bench/out/results.jsonl (the side-by-side shapes), bench/out/scaling.jsonl (more
# shapes of the step benchmarks), bench/out/table.md (the tables of docs/BENCHMARKS.md, copied
# there by hand with the machine description) and bench/out/scaling-*.svg (the charts).
#
# Usage: bash bench/run.sh [STEPS]     (STEPS timed repetitions per benchmark, default 3;
#                                       the scaling shapes use 2; SCALING=0 leaves them out)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
bash bench/setup.sh
cargo build --release -q
# The build measured (the tree may change while the harness runs).
BUILD="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src vendor Cargo.toml Cargo.lock || echo -dirty)"
BIN=target/release/repnoise
OUT=bench/out
mkdir -p "$OUT"
MODEL="$OUT/smollm2-hf"
# Both sides load the same f32 safetensors directory, converted from the embedded GGUF.
[ -f "$MODEL/config.json" ] || "$BIN" convert --model smollm2-135m-instruct --out "$MODEL"
PY=bench/.venv/bin/python
: > "$OUT/results.jsonl"
: > "$OUT/scaling.jsonl"
"$BIN" bench matmul --model "$MODEL" --steps 5 >> "$OUT/results.jsonl"
run() {  # run FILE STEPS WHAT [--ours-only] EXTRA_ARGS...
  local file=$1 steps=$2 what=$3; shift 3
  local ref=1
  if [ "${1:-}" = --ours-only ]; then ref=0; shift; fi
  echo "== $what $* (repnoise)" >&2
  "$BIN" bench "$what" --model "$MODEL" --steps "$steps" "$@" >> "$file"
  if [ $ref = 1 ]; then
    echo "== $what $* (pytorch)" >&2
    "$PY" bench/reference.py "$what" "$MODEL" --steps "$steps" "$@" >> "$file"
  fi
}
R="$OUT/results.jsonl"
run "$R" "$STEPS" train-step --batch 4 --seq 128
run "$R" "$STEPS" lora-step --batch 4 --seq 128
run "$R" "$STEPS" repnoise-step --batch 4 --seq 128
run "$R" "$STEPS" generate --batch 8 --new-tokens 64
run "$R" "$STEPS" score --batch 4 --seq 128
# The study's evaluation work (configs/study-embedded.toml): the held-out cross-entropy of 100
# items' harmful answers and refusals ([heldout.config]: max_len 64, batch 16; repnoise packs an
# item's two answers behind their prompt, and once more scores them apart as it used to) and 50
# tokens for 100 prompts at the generation batch of 50; generation at batch 64 and 1 (per-token
# latency) too.
run "$R" "$STEPS" heldout-ce --batch 16 --seq 64 --items 100
run "$R" "$STEPS" heldout-ce --ours-only --apart --batch 16 --seq 64 --items 100
run "$R" "$STEPS" generate-eval --batch 50 --new-tokens 50 --items 100
run "$R" "$STEPS" generate --batch 64 --new-tokens 64
run "$R" "$STEPS" generate --batch 1 --new-tokens 64
# Scaling: time per step against sequence length (batch 4) and batch size (128 tokens).
S="$OUT/scaling.jsonl"
if [ "${SCALING:-1}" != 0 ]; then
  for shape in "4 64" "4 256" "1 128" "2 128" "8 128"; do
    set -- $shape
    run "$S" 2 train-step --batch "$1" --seq "$2"
  done
  for shape in "4 64" "4 256" "2 128" "8 128"; do
    set -- $shape
    run "$S" 2 repnoise-step --ours-only --batch "$1" --seq "$2"
  done
fi
cat "$R" "$S" > "$OUT/all.jsonl"
"$BIN" bench plot --results "$OUT/all.jsonl" --out "$OUT"
{
  echo "Machine: $(lscpu | sed -n 's/Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(date -u +%Y-%m-%d)"
  echo "Command: $([ "${SCALING:-1}" = 0 ] && echo "SCALING=0 ")bash bench/run.sh $STEPS (build $BUILD)"
  echo
  python3 bench/report.py "$R" "$S"
} | tee "$OUT/table.md"
