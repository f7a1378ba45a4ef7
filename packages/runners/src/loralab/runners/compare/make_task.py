"""Build the task that ``loralab compare`` runs on by default: count the positive clauses.

The task ships with the package (``compare/data/*.jsonl``) so the default comparison needs no download.
It is regenerated bit-for-bit by::

    python -m loralab.runners.compare.make_task

Each example is one English sentence of three clauses about different things, each with its own
polarity; the label is **how many of the three clauses are positive** (0, 1, 2 or 3: four classes,
rows ``sentence``, ``label``, ``idx`` as in GLUE's SST-2, which makes the files readable by any
SST-2 tool except for the label count). A clause's polarity is its adjective's, flipped by a
negation ("not", "never", "hardly"); intensifiers ("really", "somewhat") keep it::

    the soup was not bland ; the staff seemed rude ; the view looked really superb .   -> 2

Why it has headroom (the shipped sentiment task it replaces was solved by 7 of 8 methods, final
accuracy >= 0.995, so final quality separated nothing):

* the answer needs every clause: one clause's sentiment, which the pretrained sentence embedding
  carries, decides nothing; the classifier must read three polarities and add them up, a rule over
  the whole sentence that the pretrained MiniLM does not hold out of the box (its step-0 accuracy is
  chance level, and a linear probe over its frozen features stays far from solved);
* negation has to be bound to its own clause (a "not" in the first clause does not flip the third);
* four classes instead of two, and the middle classes (1 and 2 positives) are the common ones;
* adjectives are split by a fixed seed into train-only and held-out sets: 12 of the validation
  split's adjectives never appear in training, so the score also needs the pretrained knowledge of
  which words are positive.

The class balance follows from drawing each clause's polarity with probability 1/2: about 1/8, 3/8,
3/8, 1/8 of the rows have 0, 1, 2, 3 positive clauses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import cast

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 20261203
NUM_TRAIN = 2000
NUM_EVAL = 400
NUM_CLAUSES = 3
NUM_LABELS = NUM_CLAUSES + 1
"""Labels 0..NUM_CLAUSES: the number of positive clauses."""

NOUNS = [
    "soup",
    "movie",
    "service",
    "hotel room",
    "concert",
    "book",
    "coffee",
    "staff",
    "flight",
    "laptop",
    "game",
    "lecture",
    "pizza",
    "show",
    "garden",
    "museum",
    "album",
    "car",
    "beach",
    "interview",
    "app",
    "salad",
    "trip",
    "play",
    "seminar",
    "phone",
    "meal",
    "song",
    "team",
    "view",
]
POSITIVE = [
    "delicious",
    "wonderful",
    "superb",
    "excellent",
    "delightful",
    "great",
    "lovely",
    "brilliant",
    "fantastic",
    "charming",
    "pleasant",
    "impressive",
    "enjoyable",
    "outstanding",
    "beautiful",
    "terrific",
    "marvelous",
    "fun",
    "remarkable",
    "splendid",
    "superior",
    "elegant",
    "friendly",
    "inspiring",
]
NEGATIVE = [
    "awful",
    "terrible",
    "bland",
    "boring",
    "rude",
    "disappointing",
    "dreadful",
    "horrible",
    "dull",
    "mediocre",
    "unpleasant",
    "poor",
    "annoying",
    "tedious",
    "lousy",
    "miserable",
    "clumsy",
    "shabby",
    "stale",
    "noisy",
    "painful",
    "sloppy",
    "gloomy",
    "tasteless",
]
INTENSIFIERS = ["really", "truly", "quite", "very", "rather", "absolutely", "somewhat", "fairly"]
VERBS = ["was", "is", "seemed", "felt", "looked"]


INTENSIFIERS = ["really", "truly", "quite", "very", "rather", "absolutely", "somewhat", "fairly"]
NEGATIONS = ["not", "never", "hardly"]
VERBS = ["was", "is", "seemed", "felt", "looked"]


def _split(words: list[str], rng: random.Random, held_out: int) -> tuple[list[str], list[str]]:
    shuffled = words[:]
    rng.shuffle(shuffled)
    return shuffled[held_out:], shuffled[:held_out]


def _clause(noun: str, adjective: str, positive: bool, rng: random.Random) -> tuple[str, bool]:
    """One clause and its polarity (a negation flips it, an intensifier keeps it)."""
    verb = rng.choice(VERBS)
    form = rng.random()
    if form < 0.4:
        return f"the {noun} {verb} {rng.choice(NEGATIONS)} {adjective}", not positive
    if form < 0.65:
        return f"the {noun} {verb} {rng.choice(INTENSIFIERS)} {adjective}", positive
    return f"the {noun} {verb} {adjective}", positive


def _example(pos: list[str], neg: list[str], rng: random.Random) -> tuple[str, int]:
    clauses, count = [], 0
    for noun in rng.sample(NOUNS, NUM_CLAUSES):
        positive = rng.random() < 0.5
        text, polarity = _clause(noun, rng.choice(pos if positive else neg), positive, rng)
        clauses.append(text)
        count += int(polarity)
    return " ; ".join(clauses) + " .", count


def build(seed: int = SEED) -> dict[str, list[dict[str, object]]]:
    """Return the ``train`` and ``validation`` splits as lists of rows (``sentence``, ``label``, ``idx``)."""
    rng = random.Random(seed)
    pos_train, pos_held = _split(POSITIVE, rng, held_out=6)
    neg_train, neg_held = _split(NEGATIVE, rng, held_out=6)
    splits: dict[str, list[dict[str, object]]] = {"train": [], "validation": []}
    seen: set[str] = set()
    for split, count, pos, neg in (
        ("train", NUM_TRAIN, pos_train, neg_train),
        ("validation", NUM_EVAL, pos_held + pos_train[:6], neg_held + neg_train[:6]),
    ):
        while len(splits[split]) < count:
            sentence, label = _example(pos, neg, rng)
            if sentence in seen:
                continue
            seen.add(sentence)
            splits[split].append({"sentence": sentence, "label": label, "idx": len(splits[split])})
    return splits


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split, rows in build().items():
        path = DATA_DIR / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts = [sum(cast(int, r["label"]) == k for r in rows) for k in range(NUM_LABELS)]
        print(f"wrote {len(rows)} rows (labels 0..{NUM_LABELS - 1}: {counts}) to {path}")


if __name__ == "__main__":
    main()
