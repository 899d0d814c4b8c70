"""Reference values for tests/it/smollm2.rs, computed once with PyTorch + transformers.

Run: bench/.venv/bin/python tests/reference/make_reference.py  (after `bash bench/setup.sh`)
Writes tests/reference/smollm2_reference.json.

- logprobs: transformers dequantizes the same GGUF (gguf_file=...), float32, and scores the ids
  our tokenizer produced; logprobs[i] = log p(ids[i+1] | ids[..=i]).
- tokenizer: the `tokenizers` library configured as SmolLM2's published tokenizer.json
  (Sequence[Digits(individual_digits), ByteLevel], byte-level BPE from the GGUF's vocab and merges),
  and, for contrast, transformers' own GGUF tokenizer conversion.
"""
import json, os, sys, pathlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken
import gguf

here = pathlib.Path(__file__).resolve().parent
cache = pathlib.Path(os.environ.get("REPNOISE_CACHE", pathlib.Path.home() / ".cache" / "repnoise"))
gguf_path = cache / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
    "Question: How many legs does a spider have? In 2024, 1234 people asked.\nAnswer: A spider has 8 legs.",
]

reader = gguf.GGUFReader(str(gguf_path))
def field(name):
    f = reader.fields[name]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
tokens = field("tokenizer.ggml.tokens")
merges = field("tokenizer.ggml.merges")
types = reader.fields["tokenizer.ggml.token_type"]
types = [int(types.parts[i][0]) for i in types.data]
vocab = {t: i for i, t in enumerate(tokens)}
tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
tk.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
tk.decoder = decoders.ByteLevel()
tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

hf_gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32)
model.eval()

out = {"gguf": gguf_path.name, "torch": torch.__version__, "cases": []}
for text in TEXTS:
    ids = tk.encode(text).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    lps = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    out["cases"].append({
        "text": text,
        "ids": ids,
        "transformers_gguf_tokenizer_ids": hf_gguf_tok(text, add_special_tokens=False).input_ids,
        "logprobs": lps,
    })
    print(len(ids), "tokens; mean logprob", sum(lps) / len(lps), file=sys.stderr)
(here / "smollm2_reference.json").write_text(json.dumps(out, indent=1))
