"""Reference ROUGE-1 values for src/eval/rouge.rs, from Google's rouge_score (0.1.2, no
stemmer, the default of rouge_score and of Hugging Face `evaluate`'s "rouge").

    bench/.venv/bin/pip install rouge_score==0.1.2
    bench/.venv/bin/python tests/reference/rouge_pins.py

Prints Rust tuples (target, prediction, precision, recall, f) to paste into the test."""
import json

from rouge_score import rouge_scorer

PAIRS = [
    ("The cat sat on the mat.", "the cat is on the mat"),
    ("Bioshock is a first-person shooter released in 2007.",
     "BioShock, released 2007, is an FPS game!"),
    ("name[The Eagle], eatType[coffee shop]", "The Eagle is a coffee shop."),
    ("", "anything at all"),
    ("something", ""),
    ("Café déjà vu — naïve façade", "cafe deja vu naive facade"),
    ("a a a b", "a b b"),
    ("It's 3:45pm; rain (light) expected", "its 3 45pm rain light expected"),
    ("What a game: great graphics, great story.", "great great great"),
]

s = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
for t, p in PAIRS:
    r = s.score(t, p)["rouge1"]
    q = lambda x: json.dumps(x, ensure_ascii=False)
    print(f"({q(t)}, {q(p)}, {r.precision!r}, {r.recall!r}, {r.fmeasure!r}),")
