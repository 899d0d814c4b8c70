"""Reference values for the faithful RepNoise loss (tests/it/smollm2.rs), computed once with
PyTorch + transformers by the authors' published arithmetic: `representation_noising/loss.py`
of domenicrosati/representation-noising at commit 03689ff (`rep_noise_loss`, lines 74-130, and
`masked_token_ce_loss`, lines 52-71). Written from that file, not from the Rust code: every
step below names the line it follows.

Run: bench/.venv/bin/python tests/reference/make_repnoise_loss_reference.py
Writes tests/reference/repnoise_loss_reference.json: one case per (pairs file, max_len).

What is reproduced:
- pair mask `~torch.eq(harmful_ids, harmless_ids)` over the two batches padded to one length
  with the pad token (line 93; the authors pad both to `max_length`, and positions where both
  are padding are equal, so they are out of the mask whatever the padded length);
- `masked_token_ce_loss` (lines 58-70): logits at position i multiplied by mask[i], labels
  multiplied by the mask and every resulting 0 set to -100 (ignored), shifted so that position i
  predicts label i+1, `CrossEntropyLoss()` (mean over the kept labels);
- harmless term (lines 108-115): that CE on the harmless batch with the same mask;
- harmful term (lines 103-128): the CE of the model's own logits, plus, for every entry of
  `output_hidden_states` (transformers' last entry is already normed), the CE of
  `lm_head(norm(h))`, the sum divided by `len(hidden_states)` (L + 1 entries for L layers)
  and then 1 added: `harmful_losses / len(harmful_outputs.hidden_states) + 1` (line 128; the
  official repository's issue #6 asks whether `/ (len + 1)` was meant; this is the code as
  published). `harmful_ce` below is the quotient before the `+ 1`; `ascent` is
  `log(quotient + 1)`, the term that is multiplied by alpha (line 129).
The texts are the authors': the harmful one `Question: {prompt}\nAnswer:{response}`, no space
(boyiwei/RepNoise-Reproduce a35c98a, `immunization_llms/datasets.py` lines 386-388), and the
refusal the decoded generation that followed `Question: {prompt}\nAnswer:`, i.e.
`Question: {prompt}\nAnswer: {refusal}`; tokenised with the tokenizer's own special tokens
(SmolLM2's adds none), cut to max_len. The MMD term is random (fresh Gaussian noise) and is
not pinned.
"""
import json, os, pathlib
import torch
from transformers import AutoModelForCausalLM
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken
import gguf

here = pathlib.Path(__file__).resolve().parent
root = here.parent.parent
cache = pathlib.Path(os.environ.get("REPNOISE_CACHE", pathlib.Path.home() / ".cache" / "repnoise"))
gguf_path = cache / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CASES = [
    ("tests/fixtures/pairs/small.jsonl", 64),
    ("tests/fixtures/pairs/beavertails5.jsonl", 40),
    ("tests/fixtures/pairs/beavertails5.jsonl", 128),
]

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


def masked_token_ce_loss(logits, labels, mask):
    # loss.py lines 58-70.
    shift_logits = logits[..., :-1, :]
    shift_labels = labels[..., 1:]
    shift_logits = shift_logits * mask[..., :-1].unsqueeze(-1)
    shift_labels = shift_labels * mask[..., 1:]
    shift_labels = shift_labels.masked_fill(shift_labels == 0, -100).long()
    return torch.nn.CrossEntropyLoss()(shift_logits.reshape(-1, shift_logits.size(-1)),
                                       shift_labels.reshape(-1))


def case(pairs_file, max_len):
    pairs = [json.loads(l) for l in (root / pairs_file).read_text().splitlines() if l.strip()]
    enc = lambda text: tk.encode(text).ids[:max_len]
    harmful = [enc(f"Question: {p['prompt']}\nAnswer:{p['harmful']}") for p in pairs]
    harmless = [enc(f"Question: {p['prompt']}\nAnswer: {p['harmless']}") for p in pairs]
    T = max_len  # padding="max_length"
    def pad(seqs):
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
        return ids, attn
    h_ids, h_attn = pad(harmful)
    s_ids, s_attn = pad(harmless)
    mask = (~torch.eq(h_ids, s_ids)).float()  # line 93 (then .float(), line 102)
    with torch.no_grad():
        out_h = model(h_ids, attention_mask=h_attn, output_hidden_states=True)
        harmful_losses = masked_token_ce_loss(out_h.logits, h_ids, mask)  # lines 103-107
        out_s = model(s_ids, attention_mask=s_attn, output_hidden_states=True)
        harmless_ce = masked_token_ce_loss(out_s.logits, s_ids, mask)  # lines 108-113
        norm, head = model.model.norm, model.get_output_embeddings()  # lines 117-118
        hs = out_h.hidden_states
        # transformers' last hidden state must be the normed one, as in the authors' version.
        assert torch.allclose(head(hs[-1]), out_h.logits, atol=1e-4)
        for h in hs:  # lines 121-127
            harmful_losses = harmful_losses + masked_token_ce_loss(head(norm(h)), h_ids, mask)
        harmful_ce = harmful_losses / len(hs)  # line 128, before its `+ 1`
    return {
        "pairs": pairs_file, "max_len": max_len, "hidden_states": len(hs),
        "harmful_ids": harmful, "harmless_ids": harmless,
        "mask_positions": int(mask.sum()),
        "harmless_ce": harmless_ce.item(), "harmful_ce": harmful_ce.item(),
        "ascent": torch.log(harmful_ce + 1).item(),
    }


out = {
    "source": "domenicrosati/representation-noising@03689ff representation_noising/loss.py",
    "gguf": gguf_path.name, "torch": torch.__version__, "pad_id": pad_id,
    "cases": [case(p, n) for p, n in CASES],
}
(here / "repnoise_loss_reference.json").write_text(json.dumps(out, indent=1) + "\n")
for c in out["cases"]:
    print({k: v for k, v in c.items() if not k.endswith("_ids")})
