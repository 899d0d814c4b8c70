"""The reference side of `cargo run --release --example bench_matmul_shapes`: PyTorch's f32
matrix products (its CPU BLAS) at the same shapes and layouts, best of 3, GFLOP/s, 2 threads.
nn: both operands row-major; nt: the right one transposed (a linear map's `x w^T`); tn: the
left one transposed. Run: `bench/.venv/bin/python bench/matmul_shapes.py`."""
import argparse
import pathlib
import re
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=3)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

# The shapes are the Rust example's own, read from its source, so the two sides cannot drift.
EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "bench_matmul_shapes.rs"
_src = EXAMPLE.read_text()
_list = _src[_src.index("for (m, k, n) in [") : _src.index("] {", _src.index("for (m, k, n) in ["))]
SHAPES = [tuple(int(x) for x in t) for t in re.findall(r"\((\d+)\w*, (\d+)\w*, (\d+)\w*\)", _list)]
if not SHAPES:
    raise SystemExit(f"{EXAMPLE}: no shapes found in its `for (m, k, n) in [...]` list")

with torch.no_grad():
    for m, k, n in SHAPES:
        x = torch.randn(m, k)
        xt = torch.randn(k, m)
        y = torch.randn(k, n)
        yt = torch.randn(n, k)
        pairs = [(x, y), (x, yt.t()), (xt.t(), y)]
        best = [float("inf")] * 3
        for _ in range(a.reps):
            for i, (l, r) in enumerate(pairs):
                t0 = time.perf_counter()
                _ = l @ r
                best[i] = min(best[i], time.perf_counter() - t0)
        fl = 2.0 * m * k * n
        print(
            f"{m}x{k}x{n}: {fl / best[0] / 1e9:.1f} GFLOP/s (nn), "
            f"{fl / best[1] / 1e9:.1f} GFLOP/s (nt), {fl / best[2] / 1e9:.1f} GFLOP/s (tn)"
        )
