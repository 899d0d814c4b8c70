"""Recompute `repnoise eval stability` log-likelihoods with transformers, the way
lm-evaluation-harness does (context/continuation split, summed continuation log-probs).

    bench/.venv/bin/python tests/reference/stability_logliks.py MODEL_DIR OUT/arc_easy.json

MODEL_DIR is a Hugging Face model directory (the one given to `repnoise eval stability`).
Prints the largest absolute and relative difference and whether acc / acc_norm agree."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, path = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
start = model.config.bos_token_id
if start is None:
    start = model.config.eos_token_id
    start = start[0] if isinstance(start, list) else start

def enc(text):
    return tok(text, add_special_tokens=False)["input_ids"]

def loglik(context, continuation):
    ctx = context.rstrip()
    cont = context[len(ctx):] + continuation
    if not ctx:
        c, k = [start], enc(cont)
    else:
        c = enc(ctx)
        k = enc(ctx + cont)[len(c):]
    ids = torch.tensor([c + k])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    tgt = ids[0, 1:]
    return lp[torch.arange(len(tgt)), tgt][-len(k):].sum().item()

d = json.load(open(path))
worst_abs = worst_rel = 0.0
acc_agree = norm_agree = n = 0
for item in d["items"]:
    ours = item["scores"]["logliks"]
    ref = [loglik(o["context"], o["continuation"]) for o in item["options"]]
    for a, b in zip(ours, ref):
        worst_abs = max(worst_abs, abs(a - b))
        worst_rel = max(worst_rel, abs(a - b) / max(abs(b), 1e-9))
    best = max(range(len(ref)), key=lambda i: (ref[i], -i))
    # The harness's acc_norm divides by len(choice), without the target delimiter " ".
    choice = lambda c: c[1:] if c.startswith(" ") else c
    norm = [l / max(len(choice(o["continuation"])), 1) for l, o in zip(ref, item["options"])]
    best_n = max(range(len(norm)), key=lambda i: (norm[i], -i))
    gold = item["scores"]["correct"][0]
    acc_agree += float(best == gold) == item["scores"]["acc"]
    norm_agree += float(best_n == gold) == item["scores"]["acc_norm"]
    n += 1
print(json.dumps({"items": n, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
                  "acc_agree": acc_agree, "acc_norm_agree": norm_agree}))
