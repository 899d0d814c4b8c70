"""The reference implementation's side of bench/run.sh: PyTorch + transformers on the same
model, shapes, data and thread count as `repnoise bench`, printing one JSON line.

Usage: bench/.venv/bin/python bench/reference.py WHAT MODEL_DIR [--batch B] [--seq T]
       [--steps N] [--warmup W] [--new-tokens K] [--items N]
WHAT: train-step | lora-step | repnoise-step | generate | score | heldout-ce | generate-eval

repnoise-step is the authors' RepNoise loss as shared/docs/ALGORITHM.md and docs/REPNOISE.md
describe it (written from that description, not copied): MLP outputs caught by forward hooks,
the logit lens over every position and the full vocabulary for every hidden state, masked
cross-entropies with the logits multiplied by the mask, the 5-kernel MMD against Gaussian noise.
"""
import argparse, json, math, resource, time
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

# The same prompts as `repnoise bench generate` (src/cli/bench.rs BENCH_PROMPTS).
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
p.add_argument("--items", type=int, default=100)
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"],
               help="as repnoise's --dtype: f32 weights and AdamW state, the forward under "
                    "torch.autocast in bf16/f16, f16 with GradScaler")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dev = torch.device(a.device)
# Tensors made below (batches, masks) go to the device; the seeded generators stay on the CPU.
torch.set_default_device(dev)
AMP = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]

def autocast():
    return torch.autocast(dev.type, dtype=AMP or torch.float32, enabled=AMP is not None)

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev)
tok = AutoTokenizer.from_pretrained(a.model)
vocab = model.config.vocab_size
gen = torch.Generator().manual_seed(0)

# src/dev/bench.rs synthetic_token: ordinary tokens spread over the vocabulary.
def synthetic_token(step, r, i, offset):
    return 256 + ((step * 131 + r) * 7919 + i * 104729 + offset) % (vocab - 256)

def batch(seed):
    # The same tokens as `repnoise bench` (src/dev/bench.rs synthetic_batch).
    return torch.tensor([[synthetic_token(seed, r, i, 13) for i in range(a.seq)] for r in range(a.batch)])

def timed_steps(params, lr, loss_of):
    """warmup + steps optimizer steps of loss_of(step) -> (loss, record): forward and loss,
    backward, clipping at 1.0, AdamW (no weight decay), timed as `repnoise bench` times them."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=a.dtype == "f16")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, records, ph = [], [], [0.0, 0.0, 0.0]
    for s in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with autocast():
            loss, record = loss_of(s)
        sync()
        t1 = time.perf_counter()
        scaler.scale(loss).backward()
        sync()
        t2 = time.perf_counter()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        records.append(record)
        if s >= a.warmup:
            times.append(t3 - t0)
            for i, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                ph[i] += d
    n = max(len(times), 1)
    return times, records, {"forward_s": ph[0] / n, "backward_s": ph[1] / n, "optimizer_s": ph[2] / n}

def lm_step(s):
    ids = batch(s)
    out = model(input_ids=ids, labels=ids)
    return out.loss, out.loss.item()

# The synthetic pairs of `repnoise bench repnoise-step` (src/dev/bench.rs synthetic_pairs).

def synthetic_pairs(step):
    p = a.seq // 2
    def seqs(answer):
        return torch.tensor([[synthetic_token(step, r, i, 13 if i < p else answer) for i in range(a.seq)]
                             for r in range(a.batch)])
    return seqs(77), seqs(5077)

def masked_ce(logits, labels, mask):
    # The reference code's masked cross-entropy: logits and labels multiplied by the mask, label
    # id 0 ignored, then shifted.
    logits = logits * mask.unsqueeze(-1)
    labels = (labels * mask).masked_fill(labels * mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)

def mmd(x, y, kernel_mul=2.0, kernel_num=5):
    # Biased MMD with a sum of 5 Gaussian kernels, the bandwidth from the detached mean distance.
    n = x.shape[0] + y.shape[0]
    total = torch.cat([x, y], 0)
    d2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    bw = d2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-d2 / (bw * kernel_mul ** i)) for i in range(kernel_num))
    b = x.shape[0]
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()

times, extra = [], {}
# Forward-only arms run under autocast too (the training arms enter it per step, above).
_amp = autocast()
if a.what not in ("train-step", "lora-step", "repnoise-step"):
    _amp.__enter__()

if a.what in ("train-step", "lora-step"):
    model.train()
    lr = 1e-5
    if a.what == "lora-step":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        lr = 1e-4
        extra["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        extra["peft"] = peft.__version__
    params = [p for p in model.parameters() if p.requires_grad]
    times, losses, ph = timed_steps(params, lr, lm_step)
    extra.update(ph, losses=losses)
elif a.what == "repnoise-step":
    model.train()
    alpha, beta = 1.0, 0.001
    layers = model.model.layers
    acts = {}
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_hook(lambda mod, inp, out, i=i: acts.__setitem__(i, out))
    mask = torch.zeros(a.batch, a.seq, dtype=torch.long)
    mask[:, a.seq // 2:] = 1
    mf = mask.unsqueeze(-1).float()
    attn = torch.ones(a.batch, a.seq, dtype=torch.long)
    # The authors' transformers returned the final hidden state after the final norm; make that
    # so whatever this version returns (checked once, outside the timing).
    with torch.no_grad():
        h0, _ = synthetic_pairs(0)
        o = model(h0, attention_mask=attn, output_hidden_states=True)
        last_normed = torch.allclose(model.lm_head(o.hidden_states[-1]), o.logits, atol=1e-4)
        del o
    gen_noise = torch.Generator().manual_seed(0)

    def rn_step(s):
        h_ids, s_ids = synthetic_pairs(s)
        harmless = masked_ce(model(s_ids, attention_mask=attn).logits, s_ids, mask)
        acts.clear()
        out_h = model(h_ids, attention_mask=attn, output_hidden_states=True)
        hs = list(out_h.hidden_states)
        if not last_normed:
            hs[-1] = model.model.norm(hs[-1])
        total = masked_ce(out_h.logits, h_ids, mask)
        for h in hs:
            total = total + masked_ce(model.lm_head(model.model.norm(h)), h_ids, mask)
        harm = total / (len(hs) + 1)
        noise = 0.0
        for i in range(len(layers)):
            x = acts[i] * mf
            y = torch.randn(x.shape, generator=gen_noise, device="cpu").to(x.device) * mf
            noise = noise + mmd(x.reshape(a.batch, -1), y.reshape(a.batch, -1))
        noise = noise / len(layers)
        loss = harmless + beta * noise - alpha * torch.log(harm + 1)
        return loss, {"harmless_ce": harmless.item(), "harmful_ce": harm.item(),
                      "noise_mmd": noise.item(), "loss": loss.item(),
                      "mask_positions": int(mask.sum())}

    params = [p for p in model.parameters() if p.requires_grad]
    times, terms, ph = timed_steps(params, 2e-5, rn_step)
    extra.update(ph, terms=terms, last_hidden_state_normed=bool(last_normed))
elif a.what == "generate":
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                     tokenize=False, add_generation_prompt=True) for i in range(a.batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
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
    # Per-token log-likelihood of every next token and the greedy flags, as lm-eval-harness's
    # loglikelihood requests do (and `repnoise`'s stability benchmarks).
    model.eval()
    for r in range(a.steps + 1):
        ids = batch(1000 + r)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            greedy = (logits.argmax(-1) == ids[:, 1:]).all(-1)
            lp.sum(-1).tolist(), greedy.tolist()
        if r > 0:
            times.append(time.perf_counter() - t0)
elif a.what == "heldout-ce":
    # The instrument's held-out cross-entropy (`repnoise`'s eval::heldout::score): --items items
    # of a prompt of --seq/2 tokens, a harmful answer of --seq/2 and a refusal of --seq/4, each
    # answer scored as its own sequence after the prompt (the plain way; repnoise packs the two
    # behind the prompt), --batch sequences at a time in order of length, forward only; the mean
    # cross-entropy of each sequence's answer tokens.
    model.eval()
    p = a.seq // 2
    def seqs(n, offset):
        return [[synthetic_token(7, r, i, 13 if i < p else offset) for i in range(p + n)]
                for r in range(a.items)]
    parts = [seqs(a.seq // 2, 77), seqs(a.seq // 4, 5077)]
    for r in range(a.steps):
        t0 = time.perf_counter()
        means = []
        with torch.no_grad():
            for part in parts:
                ces = []
                for c in range(0, a.items, a.batch):
                    ids = torch.tensor(part[c:c + a.batch])
                    # The LM head only where an answer token is predicted, as the instrument does.
                    h = model.model(input_ids=ids).last_hidden_state[:, p - 1:-1]
                    logits = model.lm_head(h)
                    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         ids[:, p:].reshape(-1), reduction="none")
                    ces += ce.view(ids.shape[0], -1).mean(-1).tolist()
                means.append(sum(ces) / len(ces))
        times.append(time.perf_counter() - t0)
    extra = {"items": a.items, "mean_harmful_ce": means[0], "mean_refusal_ce": means[1]}
elif a.what == "generate-eval":
    # The evaluation's generation: --items chat prompts, exactly --new-tokens greedy tokens
    # each, --batch at a time, left-padded, the batches in order of prompt length as `repnoise`
    # forms them.
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                     tokenize=False, add_generation_prompt=True)
             for i in range(a.items)]
    lens = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(a.items), key=lambda i: lens[i])
    tps = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        for c in range(0, a.items, a.batch):
            chunk = [texts[i] for i in order[c:c + a.batch]]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=a.new_tokens,
                                     min_new_tokens=a.new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            assert out.shape[1] - enc.input_ids.shape[1] == a.new_tokens
        dt = time.perf_counter() - t0
        times.append(dt)
        tps.append(a.items * a.new_tokens / dt)
    extra = {"items": a.items, "tokens_per_second": tps}
else:
    raise SystemExit(f"unknown benchmark {a.what}")

print(json.dumps({
    "impl": f"pytorch {torch.__version__} + transformers", "what": a.what, "batch": a.batch,
    "seq": a.seq, "new_tokens": a.new_tokens, "seconds": times, "extra": extra,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "peak_device_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    "device": a.device, "dtype": a.dtype,
    "threads": torch.get_num_threads(),
}))
