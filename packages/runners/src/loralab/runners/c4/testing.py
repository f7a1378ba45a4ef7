"""Offline fixtures in C4's real format (tests, CPU demos): json.gz shards, a tiny LLaMA config, a tokenizer.

C4 (``allenai/c4``, ``en``) ships ``en/c4-train.{00000..01023}-of-01024.json.gz`` and
``en/c4-validation.{00000..00007}-of-00008.json.gz``, one JSON object per line with ``text``,
``timestamp`` and ``url``. :func:`write_c4_shards` writes the same layout with synthetic English-like
text (a seeded Markov chain over a small word list, so a model can learn it).

Example:
    >>> import tempfile
    >>> from loralab.runners.c4.testing import write_c4_shards
    >>> d = write_c4_shards(tempfile.mkdtemp(), train_docs=20, validation_docs=4)
    >>> sorted(p.name for p in d.iterdir())[0]
    'c4-train.00000-of-00002.json.gz'
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path
from typing import Any

__all__ = ["TINY_LLAMA_CONFIG", "synthetic_documents", "write_c4_shards", "write_tiny_setup"]

WORDS = (
    "the model data train loss token layer weight rank step gradient subspace random projection optimizer memory "
    "language text web page sentence word learns predicts next small large fast slow good new old first last"
).split()

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "vocab_size": 260,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_cache": False,
}
"""A 2-layer, hidden-64 LLaMA for the byte-level :func:`loralab.core.testing.offline_tokenizer` (vocab 260)."""


def synthetic_documents(
    n: int, seed: int = 0, *, min_words: int = 20, max_words: int = 120
) -> list[str]:
    """``n`` English-like documents from a seeded first-order Markov chain over :data:`WORDS`."""
    rng = random.Random(seed)
    table = {w: rng.sample(WORDS, 4) for w in WORDS}
    docs = []
    for _ in range(n):
        w = rng.choice(WORDS)
        words = [w]
        for _ in range(rng.randint(min_words, max_words) - 1):
            w = rng.choice(table[w]) if rng.random() < 0.9 else rng.choice(WORDS)
            words.append(w)
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def write_c4_shards(
    directory: str | os.PathLike[str],
    *,
    train_docs: int = 400,
    validation_docs: int = 40,
    train_files: int = 2,
    validation_files: int = 1,
    seed: int = 0,
) -> Path:
    """C4-format ``c4-{train,validation}.NNNNN-of-MMMMM.json.gz`` files under ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for split, n, files, s in (
        ("train", train_docs, train_files, seed),
        ("validation", validation_docs, validation_files, seed + 1),
    ):
        docs = synthetic_documents(n, s)
        per = -(-n // files)
        for k in range(files):
            with gzip.open(
                out / f"c4-{split}.{k:05d}-of-{files:05d}.json.gz", "wt", encoding="utf-8"
            ) as fh:
                for i, text in enumerate(docs[k * per : (k + 1) * per]):
                    rec = {
                        "text": text,
                        "timestamp": f"2019-04-{1 + (i % 28):02d}T12:00:00Z",
                        "url": f"https://example.org/{split}/{k}/{i}",
                    }
                    fh.write(json.dumps(rec) + "\n")
    return out


def write_tiny_setup(directory: str | os.PathLike[str], **shard_kwargs: Any) -> dict[str, str]:
    """C4 shards, the offline tokenizer and a tiny LLaMA config under ``directory``; their paths."""
    from loralab.core.testing import offline_tokenizer

    root = Path(directory)
    data = write_c4_shards(root / "c4" / "en", **shard_kwargs)
    tok = root / "tokenizer"
    offline_tokenizer().save_pretrained(tok)
    cfg = root / "tiny_llama.json"
    cfg.write_text(json.dumps(TINY_LLAMA_CONFIG, indent=2))
    return {"train_data": str(data), "tokenizer": str(tok), "model_config": str(cfg)}
