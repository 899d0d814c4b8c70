"""Reference ROUGE-1 values for src/eval/rouge.rs, from Google's rouge_score (0.1.2), without a
stemmer (the default of rouge_score and of Hugging Face `evaluate`'s "rouge") on PAIRS, and with
use_stemmer=True (NLTK's Porter stemmer; run with nltk 3.10.4) on PAIRS + STEMMED.

    bench/.venv/bin/pip install rouge_score==0.1.2 nltk==3.10.4
    bench/.venv/bin/python tests/reference/rouge_pins.py

Prints Rust tuples (target, prediction, precision, recall, f) to paste into the tests: first the
unstemmed pins, then, after a blank line, the stemmed ones."""
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

STEMMED = [
    ("The runners were running quickly to the generalized races",
     "a runner runs quick in generalizing race"),
    ("Skies were cloudy; the dogs died and cats are dying", "sky was cloud, dog dies, cat die"),
    ("Relational conditioning hopefully adjusts", "relate condition hopeful adjustment"),
    ("was has does his", "wa ha doe hi"),
]


def pins(stem, pairs):
    s = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stem)
    for t, p in pairs:
        r = s.score(t, p)["rouge1"]
        q = lambda x: json.dumps(x, ensure_ascii=False)
        print(f"({q(t)}, {q(p)}, {r.precision!r}, {r.recall!r}, {r.fmeasure!r}),")


pins(False, PAIRS)
print()
pins(True, PAIRS + STEMMED)
