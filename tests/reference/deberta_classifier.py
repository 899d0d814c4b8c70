"""Tiny random DeBERTa-v2 sequence classifiers and their reference logits, for
tests/it/classifier.rs::deberta_classifier_matches_transformers.

Two configurations cover the code paths real checkpoints use:
  v3: DeBERTa-v3 style (the paper's deberta-v3-xsmall classifier): relative attention with
      log-bucketed positions, shared attention keys, layer-normed relative embeddings, no absolute
      positions, no token types.
  v2: DeBERTa-v2 style: the same plus absolute positions added to the input, an embedding
      projection (embedding_size != hidden_size), `pos_att_type` in its old "p2c|c2p" string
      form and three classes. (deberta-v2-xlarge's convolution layer is not covered: the
      candle-transformers model we run has no forward for it, and `repnoise` refuses such a
      config with an error.)

Each is saved with `save_pretrained` (safetensors) into tests/fixtures/deberta/<name>/ with a
word-level tokenizer.json ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, then words w4 ... w47), and the
logits of a padded batch of token ids (with its attention mask) are written beside it as
reference.json. Run from the repository root with the reference environment (bench/setup.sh):

    bench/.venv/bin/python tests/reference/deberta_classifier.py
"""
import json
import os

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

VOCAB = 48
ROWS = [
    [1, 5, 9, 13, 17, 21, 25, 2],
    [1, 30, 31, 2],
    [1, 7, 7, 7, 40, 41, 42, 43, 44, 45, 2],
]

CONFIGS = {
    "v3": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=64,
        type_vocab_size=0,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=8,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        pooler_hidden_size=32,
        pooler_hidden_act="gelu",
        pooler_dropout=0.0,
        id2label={0: "SAFE", 1: "HARMFUL"},
        label2id={"SAFE": 0, "HARMFUL": 1},
    ),
    "v2": dict(
        hidden_size=32,
        embedding_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=64,
        type_vocab_size=0,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=8,
        pos_att_type="p2c|c2p",
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=True,
        pooler_hidden_size=32,
        pooler_hidden_act="gelu",
        pooler_dropout=0.0,
        id2label={0: "neutral", 1: "toxic", 2: "other"},
        label2id={"neutral": 0, "toxic": 1, "other": 2},
    ),
}


def tokenizer():
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tok


def main():
    root = "tests/fixtures/deberta"
    t = max(len(r) for r in ROWS)
    ids = torch.tensor([r + [0] * (t - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in ROWS])
    for i, (name, kw) in enumerate(CONFIGS.items()):
        torch.manual_seed(1234 + i)
        cfg = DebertaV2Config(
            vocab_size=VOCAB,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            cls_dropout=0.0,
            # Large random weights, so that every row (and every weight) moves the logits.
            initializer_range=0.4,
            **kw,
        )
        model = DebertaV2ForSequenceClassification(cfg).eval()
        # Non-trivial layer norms and biases, so a mix-up of weights shows in the logits.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") or "LayerNorm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        out = os.path.join(root, name)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer().save(os.path.join(out, "tokenizer.json"))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        ref = {"input_ids": ROWS, "logits": logits.tolist(),
               "torch": torch.__version__,
               "transformers": __import__("transformers").__version__}
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(ref, f, indent=1)
        print(name, logits.tolist())


if __name__ == "__main__":
    main()
