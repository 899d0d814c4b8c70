"""The reference implementation's side of bench/run.sh: PyTorch + transformers on the same
model, shapes, data and thread count as `repnoise bench`, printing one JSON line.

Usage: bench/.venv/bin/python bench/reference.py WHAT MODEL_DIR [--batch B] [--seq T]
       [--steps N] [--warmup W] [--new-tokens K]
WHAT: train-step | generate | score
"""
import argparse, json, resource, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# The same prompts as `repnoise bench generate` (src/main.rs BENCH_PROMPTS).
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
    "What causes rain?",
    "Give me a tip for learning to code.",
    "Why is the sky blue?",
]

p = argparse.ArgumentParser()
p.add_argument("what")
p.add_argument("model")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--new-tokens", type=int, default=64)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(a.model)
vocab = model.config.vocab_size
gen = torch.Generator().manual_seed(0)

def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(256, vocab, (a.batch, a.seq), generator=g)

times, extra = [], {}
if a.what == "train-step":
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    losses, ph = [], [0.0, 0.0, 0.0]
    for s in range(a.warmup + a.steps):
        ids = batch(s)
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(out.loss.item())
        if s >= a.warmup:
            times.append(t3 - t0)
            for i, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                ph[i] += d
    n = max(len(times), 1)
    extra = {"losses": losses, "forward_s": ph[0] / n, "backward_s": ph[1] / n, "optimizer_s": ph[2] / n}
elif a.what == "generate":
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                     tokenize=False, add_generation_prompt=True) for i in range(a.batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tps = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t0
        assert out.shape[1] - enc.input_ids.shape[1] == a.new_tokens
        times.append(dt)
        tps.append(a.batch * a.new_tokens / dt)
    extra = {"tokens_per_second": tps}
elif a.what == "score":
    model.eval()
    for r in range(a.steps + 1):
        ids = batch(1000 + r)
        t0 = time.perf_counter()
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits, -1)
            lp.sum().item()
        if r > 0:
            times.append(time.perf_counter() - t0)
else:
    raise SystemExit(f"unknown benchmark {a.what}")

print(json.dumps({
    "impl": f"pytorch {torch.__version__} + transformers", "what": a.what, "batch": a.batch,
    "seq": a.seq, "new_tokens": a.new_tokens, "seconds": times, "extra": extra,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "threads": torch.get_num_threads(),
}))
