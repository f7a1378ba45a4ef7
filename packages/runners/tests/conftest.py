"""Shared fixtures of the runners' tests: tiny models saved to disk, fixture files in the real formats."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest

from loralab.core.testing import (
    free_port,
    freeing_deepspeed_shm_buffers,
    save_tiny,
    tiny_llama,
    tiny_roberta,
    tiny_t5,
)

NEUTRAL = "the a movie film plot actor story scene".split()
POSITIVE = "great good fun best".split()
NEGATIVE = "bad awful dull worst".split()


SMALL_METHOD_OPTIONS = {
    "lora_r": 4,
    "galore_rank": 4,
    "update_proj_gap": 2,
    "ga_iters": 2,
    "sb_num_batches": 2,
}
"""Small ranks, projector gaps and estimation batches for the end-to-end tests of every method."""


def small_options(method: str) -> dict:
    """The :data:`SMALL_METHOD_OPTIONS` that ``method`` takes, as ``method_args`` keywords."""
    from loralab.runners.methods import get_method

    defaults = get_method(method).defaults
    return {k: v for k, v in SMALL_METHOD_OPTIONS.items() if k in defaults}


def method_flags(method: str) -> list[str]:
    """:func:`small_options` as command-line flags (``["--lora_r", "4", ...]``)."""
    return [x for k, v in small_options(method).items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="session")
def _deepspeed_shm_buffers_of_the_session():
    with freeing_deepspeed_shm_buffers() as free_now:
        yield free_now


@pytest.fixture(autouse=True)
def _free_deepspeed_shm_buffers(_deepspeed_shm_buffers_of_the_session):
    """The runners' tests (and their module fixtures) launch DeepSpeed processes themselves: after
    each test, free the RAM those processes left in /dev/shm."""
    yield
    _deepspeed_shm_buffers_of_the_session()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """``{"roberta": path, "llama": path, "t5": path}``: tiny models + offline tokenizer via save_pretrained."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "roberta": str(save_tiny(tiny_roberta(), root / "roberta")),
        "llama": str(save_tiny(tiny_llama(), root / "llama")),
        "t5": str(save_tiny(tiny_t5(), root / "t5")),
    }


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sst2_rows(n: int, seed: int) -> list[dict]:
    # nyu-mll/glue sst2 columns: sentence, label, idx. Two sentiment words of the label among two neutral
    # ones, shuffled: a byte-level 2-layer RoBERTa generalises from ~100 of these in a few dozen steps
    # (with one sentiment word among five it only memorises the training set, in a plain AdamW loop too)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(NEUTRAL, k=2) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words) + " ", "label": label, "idx": i})
    return rows


@pytest.fixture(scope="session")
def glue_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    return {
        "train": write_jsonl(root / "sst2_train.jsonl", sst2_rows(32, 0)),
        "validation": write_jsonl(root / "sst2_validation.jsonl", sst2_rows(16, 1)),
    }


def metamath_rows(n: int, seed: int) -> list[dict]:
    # meta-math/MetaMathQA: query, response ("... The answer is: X"), type, original_question
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        q = f"What is {a} plus {b}?"
        rows.append(
            {
                "query": q,
                "response": f"{a} + {b} = {a + b}.\nThe answer is: {a + b}",
                "type": "GSM_Rephrased",
                "original_question": q,
            }
        )
    return rows


def gsm8k_rows(n: int, seed: int) -> list[dict]:
    # openai/gsm8k main: question, answer ("reasoning <<a+b=c>>c\n#### c")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(
            {
                "question": f"What is {a} plus {b}?",
                "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}",
            }
        )
    return rows


@pytest.fixture(scope="session")
def metamath_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("metamath")
    train = root / "MetaMathQA-395K.json"  # the hub file is one JSON array
    train.write_text(json.dumps(metamath_rows(24, 0)))
    return {"train": str(train), "eval": write_jsonl(root / "gsm8k_test.jsonl", gsm8k_rows(6, 1))}


HEAVY = ("rock", "brick", "anvil")
LIGHT = ("feather", "leaf", "paper")


def winogrande_rows(n: int, seed: int) -> list[dict]:
    # allenai/winogrande columns: qID, sentence with one "_", option1, option2, answer "1"/"2". Whether the
    # blank is the heavy or the light object follows from the word after it ("sank" / "floated"), an
    # association a 2-layer byte-level Llama picks up in a few dozen steps
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        heavy, light = rng.choice(HEAVY), rng.choice(LIGHT)
        options = [heavy, light] if rng.random() < 0.5 else [light, heavy]
        sinks = rng.random() < 0.5
        answer = options.index(heavy if sinks else light) + 1
        sentence = f"I dropped a {options[0]} and a {options[1]} into the pond, and the _ {'sank' if sinks else 'floated'}."
        rows.append(
            {
                "qID": f"q{i}",
                "sentence": sentence,
                "option1": options[0],
                "option2": options[1],
                "answer": str(answer),
            }
        )
    return rows


@pytest.fixture(scope="session")
def winogrande_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("winogrande")
    return {
        "train": write_jsonl(root / "train_xs.jsonl", winogrande_rows(16, 0)),
        "validation": write_jsonl(root / "dev.jsonl", winogrande_rows(8, 1)),
    }


def reload_final(base: str, final: Path, auto_class: str, **kwargs):
    """``final/`` loaded the bare way, in eval mode: ``PeftModel.from_pretrained(original base, final)`` for
    an adapter, ``AutoModel*.from_pretrained(final)`` for a full model (``auto_class`` names the class)."""
    import transformers
    from peft import PeftModel

    cls = getattr(transformers, auto_class)
    if (final / "adapter_config.json").is_file():
        base_model = cls.from_pretrained(base, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base_model, str(final)).eval()
        # an adapter config PEFT does not know (a method's own fields) warns the user on every load
        unknown = [str(w.message) for w in caught if "Unexpected keyword" in str(w.message)]
        assert not unknown, f"{final}/adapter_config.json: {unknown}"
        return model
    return cls.from_pretrained(str(final), **kwargs).eval()


@pytest.fixture(scope="session")
def helpers():
    """The module's row makers, writers and small method options (test modules cannot import conftest
    under importlib mode)."""
    import types

    return types.SimpleNamespace(
        free_port=free_port,
        reload_final=reload_final,
        small_options=small_options,
        method_flags=method_flags,
        write_jsonl=write_jsonl,
        sst2_rows=sst2_rows,
        metamath_rows=metamath_rows,
        gsm8k_rows=gsm8k_rows,
        winogrande_rows=winogrande_rows,
    )
