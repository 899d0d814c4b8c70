"""Turn the harness's JSON lines into the Markdown tables of docs/BENCHMARKS.md (standard
library only). Usage: python3 bench/report.py bench/out/results.jsonl [bench/out/scaling.jsonl]

The first file gives the side-by-side table (one shape per benchmark, ratios repnoise /
reference), the loss check of the RepNoise step, and the FLOP/s of the step benchmarks against
the machine's matmul peak; the second, if given, the scaling table."""
import json, statistics, sys

def load(path):
    return [json.loads(l) for l in open(path) if l.strip()]

rows = load(sys.argv[1])
peak = next((r["extra"]["gflops"] for r in rows if r["what"] == "matmul"), None)
rows = [r for r in rows if r["what"] != "matmul"]

def shape(r):
    if r["what"] == "generate":
        return f"batch {r['batch']} x {r['new_tokens']} new tokens"
    if r["what"] == "generate-eval":
        return f"{r['extra']['items']} prompts x {r['new_tokens']} new tokens, batch {r['batch']}"
    if r["what"] == "heldout-ce":
        p = r['seq'] // 2
        return (f"{r['extra']['items']} items: prompt {p} + answers {p} and {r['seq'] // 4} "
                f"tokens, batch {r['batch']}")
    unit = "pairs" if r["what"] == "repnoise-step" else "sequences"
    return f"{r['batch']} {unit} x {r['seq']} tokens"

def is_ref(r):
    return not r["impl"].startswith("repnoise")

def flops_note(r, fl, med):
    if not fl or not peak:
        return ""
    achieved = fl / med / 1e9
    return f" ({achieved:.0f} GFLOP/s, {100 * achieved / peak:.0f}% of peak)"

if peak:
    print(f"f32 matmul peak (2048^3, repnoise/candle gemm, best of 5): {peak:.0f} GFLOP/s\n")
print("| benchmark | shape | implementation | median | spread (min-max) | peak memory | time ratio | memory ratio |")
print("|---|---|---|---|---|---|---|---|")
by = {}
for r in rows:
    by.setdefault((r["what"], r["batch"], r["seq"], r["new_tokens"]), []).append(r)
for key, rs in by.items():
    what = key[0]
    ref = next((r for r in rs if is_ref(r)), None)
    ours_flops = next((r["extra"].get("step_flops") for r in rs if not is_ref(r)), None)
    for r in rs:
        s = r["seconds"]
        med = statistics.median(s)
        if what in ("generate", "generate-eval"):
            tps = statistics.median(r["extra"]["tokens_per_second"])
            value = f"{med:.2f} s ({tps:.0f} tok/s)"
        elif what in ("train-step", "lora-step"):
            # Both sides do the same arithmetic: the same FLOP count for both.
            value = f"{med:.2f} s" + flops_note(r, ours_flops, med)
        elif what == "repnoise-step" and not is_ref(r):
            # The reference does more arithmetic (the lens at every position): ours only.
            value = f"{med:.2f} s" + flops_note(r, ours_flops, med)
        elif what == "heldout-ce":
            e = r["extra"]
            value = f"{med:.2f} s (mean CE {e['mean_harmful_ce']:.5f} / {e['mean_refusal_ce']:.5f})"
        else:
            value = f"{med:.2f} s"
        mem = r["peak_rss_bytes"] / 2**30
        ratio = mratio = ""
        if ref is not None and r is not ref:
            ratio = f"{med / statistics.median(ref['seconds']):.2f}x"
            mratio = f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x"
        print(f"| {what} | {shape(r)} | {r['impl']} | {value} | {min(s):.2f}-{max(s):.2f} s "
              f"| {mem:.2f} GiB | {ratio} | {mratio} |")

# The RepNoise loss terms of the first (warm-up) step: same weights, same pairs on both sides.
rn = [r for r in rows if r["what"] == "repnoise-step" and r["extra"].get("terms")]
if rn:
    print("\nRepNoise loss terms of the first step (same weights and pairs; the noise differs):\n")
    print("| implementation | harmless_ce | harmful_ce | noise_mmd | loss |")
    print("|---|---|---|---|---|")
    for r in rn:
        t = r["extra"]["terms"][0]
        print(f"| {r['impl']} | {t['harmless_ce']:.7f} | {t['harmful_ce']:.7f} | "
              f"{t['noise_mmd']:.5f} | {t['loss']:.6f} |")

phase = [r for r in rows if "forward_s" in r["extra"]]
if phase:
    print("\nPhases, mean seconds per timed step:\n")
    print("| benchmark | implementation | forward + loss | backward | optimizer |")
    print("|---|---|---|---|---|")
    for r in phase:
        e = r["extra"]
        print(f"| {r['what']} | {r['impl']} | {e['forward_s']:.2f} | {e['backward_s']:.2f} | "
              f"{e['optimizer_s']:.2f} |")

if len(sys.argv) > 2:
    sc = load(sys.argv[2]) + [r for r in rows if r["what"].endswith("-step")]
    print("\nScaling, median seconds per step (charts: docs/bench/scaling-*.svg):\n")
    print("| benchmark | implementation | batch | tokens | median | peak memory |")
    print("|---|---|---|---|---|---|")
    for r in sorted(sc, key=lambda r: (r["what"], r["impl"], r["batch"], r["seq"])):
        print(f"| {r['what']} | {r['impl']} | {r['batch']} | {r['seq']} | "
              f"{statistics.median(r['seconds']):.2f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
