"""Reference values for the faithful RepNoise loss (tests/it/smollm2.rs), computed once with
PyTorch + transformers, written independently of the Rust code from the description of the
authors' loss in shared/docs/ALGORITHM.md and docs/REPNOISE.md.

Run: bench/.venv/bin/python tests/reference/make_repnoise_loss_reference.py
Writes tests/reference/repnoise_loss_reference.json.

The reference arithmetic reproduced here (the authors' code, as described):
- sequences `Question: {prompt}\nAnswer: {response}`, no special tokens added, cut to max_len,
  right-padded with the pad token; the pair mask is 1 where the two padded id sequences differ
  (a pad position facing a real token counts as different);
- masked CE: logits multiplied by the mask, labels multiplied by the mask with id 0 ignored,
  then shifted (position i predicts label i+1), mean over the kept labels;
- harmless_ce: that CE on the harmless sequence;
- harmful_ce: (CE of the final logits + the CE of lm_head(norm(h)) for every hidden state h of
  transformers' `output_hidden_states`, whose last entry is already normed) / (#hidden + 1).
"""
import json, os, pathlib
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken
import gguf

here = pathlib.Path(__file__).resolve().parent
root = here.parent.parent
cache = pathlib.Path(os.environ.get("REPNOISE_CACHE", pathlib.Path.home() / ".cache" / "repnoise"))
gguf_path = cache / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pairs_path = root / "tests" / "fixtures" / "pairs" / "small.jsonl"
MAX_LEN = 64

reader = gguf.GGUFReader(str(gguf_path))
def field(name):
    f = reader.fields[name]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
def scalar(name):
    f = reader.fields.get(name)
    return None if f is None else int(f.parts[f.data[0]][0])
tokens = field("tokenizer.ggml.tokens")
merges = field("tokenizer.ggml.merges")
types = reader.fields["tokenizer.ggml.token_type"]
types = [int(types.parts[i][0]) for i in types.data]
tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                          merges=[tuple(m.split(" ")) for m in merges]))
tk.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
tk.decoder = decoders.ByteLevel()
tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
pad_id = scalar("tokenizer.ggml.padding_token_id")
if pad_id is None:
    pad_id = scalar("tokenizer.ggml.eos_token_id")

model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                             torch_dtype=torch.float32).eval()
pairs = [json.loads(l) for l in pairs_path.read_text().splitlines() if l.strip()]

def enc(prompt, response):
    return tk.encode(f"Question: {prompt}\nAnswer: {response}").ids[:MAX_LEN]

harmful = [enc(p["prompt"], p["harmful"]) for p in pairs]
harmless = [enc(p["prompt"], p["harmless"]) for p in pairs]
T = max(len(x) for x in harmful + harmless)
def pad(seqs):
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    return ids, attn
h_ids, h_attn = pad(harmful)
s_ids, s_attn = pad(harmless)
# Pair mask: positions where the padded sequences differ, a pad facing a real token included.
real_h = h_attn.bool(); real_s = s_attn.bool()
mask = ((h_ids != s_ids) | (real_h != real_s)) & (real_h | real_s)
mask = mask.long()

def masked_ce(logits, labels, mask):
    logits = logits * mask.unsqueeze(-1)
    labels = labels * mask
    labels = labels.masked_fill(labels == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)

with torch.no_grad():
    out_s = model(s_ids, attention_mask=s_attn)
    harmless_ce = masked_ce(out_s.logits, s_ids, mask)
    out_h = model(h_ids, attention_mask=h_attn, output_hidden_states=True)
    hs = list(out_h.hidden_states)
    # The authors' transformers returned the final hidden state after the final norm. Make that
    # explicit whatever this transformers version returns.
    last_normed = torch.allclose(model.lm_head(hs[-1]), out_h.logits, atol=1e-4)
    if not last_normed:
        hs[-1] = model.model.norm(hs[-1])
    total = masked_ce(out_h.logits, h_ids, mask)
    for h in hs:
        total = total + masked_ce(model.lm_head(model.model.norm(h)), h_ids, mask)
    harmful_ce = total / (len(hs) + 1)

out = {
    "gguf": gguf_path.name, "torch": torch.__version__, "max_len": MAX_LEN, "pad_id": pad_id,
    "transformers_last_hidden_state_normed": bool(last_normed),
    "harmful_ids": harmful, "harmless_ids": harmless,
    "mask_positions": int(mask.sum()),
    "harmless_ce": harmless_ce.item(), "harmful_ce": harmful_ce.item(),
}
(here / "repnoise_loss_reference.json").write_text(json.dumps(out, indent=1) + "\n")
print({k: v for k, v in out.items() if not k.endswith("_ids")})
