#!/usr/bin/env bash
# One-shot CUDA check of a `--features cuda` build of repnoise (docs/BENCHMARKS.md, "CUDA (H200)").
#
# Runs from the repository root. Inputs, all in $DEVBIN (default .devbin):
#   repnoise.xz or repnoise   the release binary built with --features cuda (stripped)
#   model/                    config.json, tokenizer*.json, generation_config.json and shapes.json
#                             of SmolLM2-135M-Instruct (`repnoise convert`, weights left out)
#   pairs.jsonl               defence pairs {prompt, harmful, harmless}
#   it.xz (optional)          the integration-test binary built with --features cuda, stripped and
#                             xz-compressed: runs the CUDA correctness tests (`precision::`)
# The weights are drawn at random here (SmolLM2-135M's exact shapes, numpy, seed 0): the real
# ones do not fit the 64 MiB that can travel to the device machine. Shapes, not values, set the
# speed; the CPU-vs-CUDA agreement is checked on the same random weights.
#
# Environment: OUT (results folder, required), DEV (default cuda), SMALL=1 (tiny sizes, to test
# the script itself on a CPU machine with DEV=cpu).
# Writes $OUT/log.txt (everything), $OUT/summary.json, $OUT/runs.tar.gz (run metrics).
set -u
: "${OUT:?set OUT}"
DEV=${DEV:-cuda}
SMALL=${SMALL:-0}
DEVBIN=${DEVBIN:-.devbin}
REPO=$(pwd)
W=${WORK:-/tmp/gpu_check}
rm -rf "$W" && mkdir -p "$W" "$OUT"
LOG=$OUT/log.txt
SUM=$W/summary.jsonl
: >"$SUM"
exec > >(tee -a "$LOG") 2>&1

say() { printf '\n==== %s [%s]\n' "$*" "$(date +%T)" >&2; }
# rec NAME SECONDS RC: one line of summary.jsonl per step.
rec() { printf '{"step": "%s", "wall_s": %s, "rc": %s}\n' "$1" "$2" "$3" >>"$SUM"; }
# step NAME TIMEOUT CMD...: run with a time limit, log wall time and exit status.
step() {
    local name=$1 lim=$2
    shift 2
    say "$name: $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout "$lim" "$@"
    rc=$?
    t1=$(date +%s.%N)
    local dt
    dt=$(python3 -c "print(round($t1-$t0,3))")
    echo "---- $name: rc=$rc wall=${dt}s" >&2
    rec "$name" "$dt" "$rc"
    return $rc
}

say "machine"
uname -a
nproc
free -g | head -2
nvidia-smi || echo "no nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null

# The binary.
BIN=$W/repnoise
if [ -f "$DEVBIN/repnoise.xz" ]; then
    (xz -dc "$DEVBIN/repnoise.xz" 2>/dev/null ||
        python3 -c "import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" "$DEVBIN/repnoise.xz") >"$BIN"
else
    cp "$DEVBIN/repnoise" "$BIN"
fi
chmod +x "$BIN"

# CUDA libraries: the driver's libcuda from the system, the toolkit's (cuBLAS, cuRAND, NVRTC,
# runtime) from the Python nvidia-* wheels when there is no system toolkit.
LIBS=$(python3 - <<'EOF'
import glob, os, sys
dirs = []
for p in sys.path:
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib"):
        for d in glob.glob(os.path.join(p, pat)):
            if glob.glob(os.path.join(d, "lib*.so*")) and d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH=${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc|stdc|not found"
export RUST_BACKTRACE=1

# The binary looks for the shipped data under the path it was built in; point that at this
# checkout too (only matters for defaults; the commands below pass paths explicitly).
BUILT_IN=$(strings "$BIN" 2>/dev/null | grep -m1 -o '/work/wt-cuda' || true)
if [ -n "$BUILT_IN" ] && [ ! -e "$BUILT_IN" ]; then
    mkdir -p "$(dirname "$BUILT_IN")" && ln -s "$REPO" "$BUILT_IN"
fi

# Random-weight model with SmolLM2-135M's shapes.
M=$W/model
mkdir -p "$M"
cp "$DEVBIN"/model/*.json "$M"/
rm -f "$M/shapes.json"
step make-model 120 python3 - "$DEVBIN/model/shapes.json" "$M/model.safetensors" "$SMALL" <<'EOF'
import json, sys
import numpy as np
from safetensors.numpy import save_file
shapes = json.load(open(sys.argv[1]))
rng = np.random.default_rng(0)
out = {}
for name in sorted(shapes):
    s = shapes[name]
    if len(s) == 1:                      # RMSNorm weights
        out[name] = np.ones(s, dtype=np.float32)
    elif "embed_tokens" in name:         # tied input embedding / LM head
        out[name] = (0.1 * rng.standard_normal(s, dtype=np.float32)).astype(np.float32)
    else:                                # linear maps [out, in]
        out[name] = (rng.standard_normal(s, dtype=np.float32) / np.sqrt(s[1])).astype(np.float32)
save_file(out, sys.argv[2])
print("params", sum(v.size for v in out.values()))
EOF

if [ "$SMALL" = 1 ]; then
    GB=2; GN=4; GREPS=1; TB=1; TS=16; TSTEPS=1; SAMPLES=4; PAIRS=2; ML=128
else
    GB=8; GN=64; GREPS=3; TB=4; TS=128; TSTEPS=5; SAMPLES=32; PAIRS=16; ML=128
fi

step info-$DEV 120 "$BIN" --device "$DEV" info --model "$M"

# 1. Log-probabilities of the same text on CPU and on the device.
TEXT="The quick brown fox jumps over the lazy dog. Representation noising removes harmful information from the hidden states of a language model, so that fine-tuning cannot easily recover it. We measure the log-probability of every token of this paragraph on both devices and compare them."
step logprobs-cpu 120 "$BIN" --device cpu logprobs --model "$M" --text "$TEXT" --json >"$W/lp_cpu.json"
step logprobs-$DEV 120 "$BIN" --device "$DEV" logprobs --model "$M" --text "$TEXT" --json >"$W/lp_dev.json"
python3 - "$W/lp_cpu.json" "$W/lp_dev.json" "$SUM" <<'EOF'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    la, lb = a["logprobs"], b["logprobs"]
    d = [abs(x - y) for x, y in zip(la, lb)]
    r = {"step": "logprob-agreement", "tokens": len(la), "same_ids": a["ids"] == b["ids"],
         "max_abs_diff": max(d), "mean_abs_diff": sum(d) / len(d),
         "logprob_min": min(la), "logprob_max": max(la), "logprob_mean": sum(la) / len(la)}
except Exception as e:
    r = {"step": "logprob-agreement", "error": repr(e)}
print(json.dumps(r))
open(sys.argv[3], "a").write(json.dumps(r) + "\n")
EOF

# 2. The user-facing batched greedy generate: same tokens on CPU and on the device?
P=(--prompt "Write a haiku about the sea." --prompt "What is the capital of France?" --prompt "List three prime numbers." --prompt "Explain gravity to a child.")
step generate-cpu 180 "$BIN" --device cpu generate --model "$M" --chat "${P[@]}" --max-new-tokens 32 --json >"$W/gen_cpu.json"
step generate-$DEV 180 "$BIN" --device "$DEV" generate --model "$M" --chat "${P[@]}" --max-new-tokens 32 --json >"$W/gen_dev.json"
python3 - "$W/gen_cpu.json" "$W/gen_dev.json" "$SUM" <<'EOF'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    r = {"step": "generate-agreement", "same_completions": a["completions"] == b["completions"],
         "same_new_tokens": a["new_tokens"] == b["new_tokens"],
         "rows_identical": sum(x == y for x, y in zip(a["completions"], b["completions"])),
         "rows": len(a["completions"]), "seconds_cpu": a["seconds"], "seconds_dev": b["seconds"]}
    print(json.dumps(a)[:600]); print(json.dumps(b)[:600])
except Exception as e:
    r = {"step": "generate-agreement", "error": repr(e)}
print(json.dumps(r))
open(sys.argv[3], "a").write(json.dumps(r) + "\n")
EOF

# 3. Benchmarks (the hidden `bench` subcommand prints one JSON line each).
bench() {
    local name=$1 lim=$2
    shift 2
    step "$name" "$lim" "$BIN" "$@" | tee "$W/$name.json"
    python3 - "$W/$name.json" "$name" "$SUM" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
if lines:
    d = json.loads(lines[-1])
    d["step"] = sys.argv[2]
    open(sys.argv[3], "a").write(json.dumps(d) + "\n")
PY
}
bench bench-generate-$DEV-b$GB 180 --device "$DEV" bench --model "$M" generate --batch $GB --new-tokens $GN --steps $GREPS
bench bench-generate-cpu-b$GB 180 --device cpu bench --model "$M" generate --batch $GB --new-tokens $GN --steps 1
if [ "$SMALL" != 1 ]; then
    bench bench-generate-$DEV-b64 180 --device "$DEV" bench --model "$M" generate --batch 64 --new-tokens 64 --steps 2
fi
bench bench-score-$DEV 120 --device "$DEV" bench --model "$M" score --batch $TB --seq $TS --steps $TSTEPS
bench bench-train-$DEV-b$TB 180 --device "$DEV" bench --model "$M" train-step --batch $TB --seq $TS --steps $TSTEPS --warmup 2
bench bench-train-cpu-b$TB 180 --device cpu bench --model "$M" train-step --batch $TB --seq $TS --steps 2 --warmup 1
if [ "$SMALL" != 1 ]; then
    bench bench-train-$DEV-b16x512 180 --device "$DEV" bench --model "$M" train-step --batch 16 --seq 512 --steps 3 --warmup 1
fi

# 4. A few steps of the full fine-tuning attack and of the RepNoise defence.
step attack-full-$DEV 240 "$BIN" --device "$DEV" attack --model "$M" \
    --data data/beavertails_subset_gammaguard/prompt_response_classified.csv \
    --samples $SAMPLES --max-len $ML --batch-size 4 --epochs 1 --eval-tokens 0 --out "$W/attack"
step defend-repnoise-$DEV 240 "$BIN" --device "$DEV" defend --method repnoise --model "$M" \
    --pairs "$DEVBIN/pairs.jsonl" --max-pairs $PAIRS --batch-size 4 --max-len $ML --epochs 1 \
    --out "$W/defend"

# 5. Mixed precision (issue 29): bf16 beside f32 on the device, the device's memory peak
# sampled by nvidia-smi beside `repnoise memory`'s plan, then a Llama-2-7B-shaped model made
# here (`repnoise init`) and its steps in bf16. PyTorch runs beside it when this machine has a
# CUDA build of torch with transformers (bench/reference.py --device cuda --dtype bf16).
gpu_peak_start() { # FILE: sample used GPU memory (MiB) every 100 ms until gpu_peak_stop
    GPU_PEAK_PID=
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$1" 2>/dev/null &
        GPU_PEAK_PID=$!
    fi
}
gpu_peak_stop() { # FILE NAME: record the largest sample
    [ -n "$GPU_PEAK_PID" ] && kill "$GPU_PEAK_PID" 2>/dev/null
    python3 - "$1" "$2" "$SUM" <<'PY'
import json, os, sys
f = sys.argv[1]
v = [int(l) for l in open(f) if l.strip().isdigit()] if os.path.exists(f) else []
r = {"step": sys.argv[2] + "-gpu-peak", "peak_mib": max(v) if v else None, "samples": len(v)}
print(json.dumps(r)); open(sys.argv[3], "a").write(json.dumps(r) + "\n")
PY
}
mp_bench() { # NAME LIMIT MODEL WHAT MEMORY_WORKLOAD BATCH SEQ DTYPE [more bench args]
    local name=$1 lim=$2 model=$3 what=$4 mw=$5 b=$6 s=$7 dt=$8
    shift 8
    "$BIN" --device "$DEV" --dtype "$dt" memory --model "$model" --workload "$mw" --batch "$b" --seq "$s" |
        tee "$W/$name.plan.txt"
    gpu_peak_start "$W/$name.smi"
    bench "$name" "$lim" --device "$DEV" --dtype "$dt" bench --model "$model" "$what" --batch "$b" --seq "$s" "$@"
    gpu_peak_stop "$W/$name.smi" "$name"
}
# The CUDA correctness test (every fused op's composed CUDA path and the tiny model's logits
# against the CPU, f32/bf16/f16), when the integration-test binary built with `--features cuda`
# came along as $DEVBIN/it.xz (`cargo test --release --features cuda --no-run`, stripped).
if [ -f "$DEVBIN/it.xz" ]; then
    (xz -dc "$DEVBIN/it.xz" 2>/dev/null ||
        python3 -c "import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" "$DEVBIN/it.xz") >"$W/it"
    chmod +x "$W/it"
    step cuda-correctness 300 "$W/it" precision:: --nocapture
else
    echo '{"step": "cuda-correctness", "skipped": "no it.xz (the test binary) in DEVBIN"}' >>"$SUM"
fi
for dt in f32 bf16; do
    step logprobs-$DEV-$dt 120 "$BIN" --device "$DEV" --dtype $dt logprobs --model "$M" --text "$TEXT" --json >"$W/lp_dev_$dt.json"
    mp_bench mp-train-$DEV-$dt 240 "$M" train-step finetune $TB $TS $dt --steps $TSTEPS --warmup 1
    mp_bench mp-repnoise-$DEV-$dt 300 "$M" repnoise-step repnoise $TB $TS $dt --steps $TSTEPS --warmup 1
    mp_bench mp-lora-$DEV-$dt 240 "$M" lora-step lora $TB $TS $dt --steps $TSTEPS --warmup 1
    bench mp-generate-$DEV-$dt-b$GB 180 --device "$DEV" --dtype $dt bench --model "$M" generate --batch $GB --new-tokens $GN --steps $GREPS
done
python3 - "$W/lp_dev_f32.json" "$W/lp_dev_bf16.json" "$SUM" <<'PY'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    d = [abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])]
    r = {"step": "logprob-bf16-vs-f32", "max_abs_diff": max(d), "mean_abs_diff": sum(d) / len(d)}
except Exception as e:
    r = {"step": "logprob-bf16-vs-f32", "error": repr(e)}
print(json.dumps(r)); open(sys.argv[3], "a").write(json.dumps(r) + "\n")
PY
if python3 -c "import torch, transformers, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    for what in train-step repnoise-step; do
        step ref-$what-bf16 300 python3 bench/reference.py $what "$M" --device cuda --dtype bf16 \
            --batch $TB --seq $TS --steps $TSTEPS --threads 16 | tee "$W/ref-$what.json"
        python3 - "$W/ref-$what.json" "ref-$what-bf16" "$SUM" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
if lines:
    d = json.loads(lines[-1]); d["step"] = sys.argv[2]
    open(sys.argv[3], "a").write(json.dumps(d) + "\n")
PY
    done
else
    echo '{"step": "reference", "skipped": "no CUDA build of torch with transformers here"}' >>"$SUM"
fi
if [ "$SMALL" = 1 ]; then
    SHAPE=$W/shape.json # a 2-layer shape with Llama-2's vocabulary, to test the script itself
    python3 - "$SHAPE" <<'PY'
import json, sys
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False}, open(sys.argv[1], "w"))
PY
    B7=1; S7=64
else
    SHAPE=llama-2-7b; B7=8; S7=256
fi
M7=$W/llama-2-7b-random
step init-7b 900 "$BIN" init --config "$SHAPE" --random --seed 0 --store-dtype bf16 --out "$M7"
mp_bench mp7b-lora-$DEV-bf16 600 "$M7" lora-step lora $B7 $S7 bf16 --steps 2 --warmup 1
mp_bench mp7b-generate-$DEV-bf16 600 "$M7" generate generate $B7 $S7 bf16 --new-tokens 50 --steps 1
# Full fine-tuning and RepNoise of 7B with f32 weights and moments need about 113 and 141 GiB
# by `repnoise memory` (docs/BENCHMARKS.md): tried at batch 1, to see where they stop.
mp_bench mp7b-train-$DEV-bf16-b1 600 "$M7" train-step finetune 1 $S7 bf16 --steps 1 --warmup 0
mp_bench mp7b-repnoise-$DEV-bf16-b1 600 "$M7" repnoise-step repnoise 1 $S7 bf16 --steps 1 --warmup 0

say "summary"
cat "$SUM"
cp "$SUM" "$OUT/summary.jsonl"
(cd "$W" && find attack defend -maxdepth 2 -type f \( -name '*.jsonl' -o -name '*.json' -o -name '*.toml' -o -name DONE -o -name '*.txt' \) -size -2M 2>/dev/null |
    tar czf "$OUT/runs.tar.gz" -T - 2>/dev/null)
ls -la "$OUT"
