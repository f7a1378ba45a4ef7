"""Build the small sentiment task that ``loralab compare`` runs on by default.

The task ships with the package (``compare/data/*.jsonl``) so the default comparison needs no download.
It is regenerated bit-for-bit by::

    python -m loralab.runners.compare.make_task

Each example is one English sentence in the format of GLUE's SST-2 (``sentence``, ``label``, ``idx``;
label 1 = positive). Sentences are drawn from templates that need more than a bag of words to get
right, so fine-tuning has something to learn beyond the pretrained embedding:

* plain statements ("the soup was delicious .")
* negation, which flips the polarity ("the soup was not delicious .")
* contrast, where the clause after "but" decides ("the staff was rude , but the soup was superb .")
* hedges and intensifiers that keep the polarity ("the soup was really quite bland .")

Nouns and adjectives are split by a fixed seed into train-only and shared sets, so the evaluation split
contains adjectives never seen in training, which measures use of the pretrained knowledge.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import cast

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 20261122
NUM_TRAIN = 2000
NUM_EVAL = 400

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


def _split(words: list[str], rng: random.Random, held_out: int) -> tuple[list[str], list[str]]:
    shuffled = words[:]
    rng.shuffle(shuffled)
    return shuffled[held_out:], shuffled[:held_out]


def _clause(noun: str, adjective: str, positive: bool, rng: random.Random) -> tuple[str, bool]:
    """One clause and its polarity (negation flips it)."""
    verb = rng.choice(VERBS)
    form = rng.random()
    if form < 0.3:
        return f"the {noun} {verb} not {adjective}", not positive
    if form < 0.55:
        return f"the {noun} {verb} {rng.choice(INTENSIFIERS)} {adjective}", positive
    return f"the {noun} {verb} {adjective}", positive


def _example(pos: list[str], neg: list[str], rng: random.Random) -> tuple[str, int]:
    def pick() -> tuple[str, bool]:
        positive = rng.random() < 0.5
        return rng.choice(pos if positive else neg), positive

    noun = rng.choice(NOUNS)
    adjective, positive = pick()
    text, label = _clause(noun, adjective, positive, rng)
    if rng.random() < 0.35:
        # Contrast: the clause after "but" decides the label.
        other_adjective, other_positive = pick()
        other_text, other_label = _clause(rng.choice(NOUNS), other_adjective, other_positive, rng)
        text, label = f"{text} , but {other_text}", other_label
    return f"{text} .", int(label)


def build(seed: int = SEED) -> dict[str, list[dict[str, object]]]:
    """Return the ``train`` and ``validation`` splits as lists of SST-2 style rows."""
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
        positives = sum(int(cast(int, r["label"])) for r in rows)  # build() makes 0/1 labels
        print(f"wrote {len(rows)} rows ({positives} positive) to {path}")


if __name__ == "__main__":
    main()
