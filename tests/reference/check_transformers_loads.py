"""Check that a directory written by `repnoise convert` loads in transformers with the same
tokens, chat template and log-probabilities as repnoise gives.

Run: ./target/release/repnoise convert --out /tmp/smol-hf
     bench/.venv/bin/python tests/reference/check_transformers_loads.py /tmp/smol-hf
"""
import json, subprocess, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

d = sys.argv[1]
binary = sys.argv[2] if len(sys.argv) > 2 else "./target/release/repnoise"
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
text = tok.apply_chat_template([{"role": "user", "content": "Name 3 colours, 1 2 3."}], tokenize=False, add_generation_prompt=True)
ids = tok(text, add_special_tokens=False).input_ids
ours = json.loads(subprocess.run([binary, "logprobs", "--model", d, "--text", text, "--json"],
                                 capture_output=True, text=True, check=True).stdout)
assert ours["ids"] == ids, (ours["ids"], ids)
with torch.no_grad():
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
ref = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
diff = max(abs(a - b) for a, b in zip(ours["logprobs"], ref))
print(f"transformers loaded {d}: {len(ids)} tokens identical, max |logprob diff| = {diff:.2e}")
assert diff < 2e-3
