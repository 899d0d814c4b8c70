"""Turn bench/out/results.jsonl into the Markdown table of docs/BENCHMARKS.md (standard library
only). Usage: python3 bench/report.py bench/out/results.jsonl"""
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = next((r["extra"]["gflops"] for r in rows if r["what"] == "matmul"), None)
rows = [r for r in rows if r["what"] != "matmul"]
by = {}
for r in rows:
    by.setdefault((r["what"], r["batch"], r["seq"], r["new_tokens"]), []).append(r)

def shape(what, b, t, k):
    return f"batch {b} x {k} new tokens" if what == "generate" else f"batch {b} x {t} tokens"

if peak:
    print(f"f32 matmul peak (2048^3, repnoise/candle gemm): {peak:.0f} GFLOP/s\n")
print("| benchmark | shape | implementation | median | spread (min-max) | peak memory | time ratio | memory ratio |")
print("|---|---|---|---|---|---|---|---|")
for (what, b, t, k), rs in by.items():
    ref = next((r for r in rs if not r["impl"].startswith("repnoise")), None)
    for r in rs:
        s = r["seconds"]
        med = statistics.median(s)
        if what == "generate":
            tps = statistics.median(r["extra"]["tokens_per_second"])
            value = f"{med:.2f} s ({tps:.0f} tok/s)"
        elif what == "train-step" and peak and "step_flops" in r["extra"]:
            achieved = r["extra"]["step_flops"] / med / 1e9
            value = f"{med:.2f} s ({achieved:.0f} GFLOP/s, {100 * achieved / peak:.0f}% of peak)"
        else:
            value = f"{med:.2f} s"
        mem = r["peak_rss_bytes"] / 2**30
        ratio = mratio = ""
        if r is ref and what == "train-step":
            fl = next((x["extra"].get("step_flops") for x in rs if "step_flops" in x["extra"]), None)
            if fl and peak:
                achieved = fl / med / 1e9
                value = f"{med:.2f} s ({achieved:.0f} GFLOP/s, {100 * achieved / peak:.0f}% of peak)"
        if ref is not None and r is not ref:
            ratio = f"{med / statistics.median(ref['seconds']):.2f}x"
            mratio = f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x"
        print(f"| {what} | {shape(what, b, t, k)} | {r['impl']} | {value} | {min(s):.2f}-{max(s):.2f} s "
              f"| {mem:.2f} GiB | {ratio} | {mratio} |")
