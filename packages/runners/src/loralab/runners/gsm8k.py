"""GSM8K evaluation: batched greedy generation with left padding, answer extraction, accuracy, JSONL.

The official LoRA-Pro evaluation generated batches without an attention mask, so left-padded prompts
attended to their padding and GSM8K accuracy read 15% instead of 54% (mrflogs/LoRA-Pro issue #3).
Here every batch is left-padded *with* its attention mask (and the position ids generation derives
from it), and a test checks that batched predictions equal one-prompt-at-a-time predictions.

Answers are read as MetaMath writes them (``... The answer is: 18``) or as GSM8K does (``... #### 18``):
the number after the last ``The answer is:``, else after the last ``####``; thousands separators are
dropped (``1,234`` = 1234), signs and decimals kept (``-3``, ``0.5``), and numbers compare by value
(``18.00`` = ``18``). A completion with neither marker has no answer and counts as wrong.

Example:
    >>> extract_answer("Natalia sold 48/2 = 24 clips in May.\\n#### 72")
    '72'
    >>> extract_answer("So the total is $1,250.50.\\nThe answer is: 1,250.50")
    '1250.50'
    >>> extract_answer("I am not sure.") is None
    True
    >>> answers_match("18.00", "18")
    True
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PROMPT_TEMPLATES",
    "answers_match",
    "extract_answer",
    "format_prompt",
    "generate_batched",
    "gsm8k_accuracy",
    "parse_number",
    "stop_at",
    "write_predictions",
]

logger = logging.getLogger(__name__)

PROMPT_TEMPLATES: dict[str, str] = {
    # MetaMath's training/eval prompt (meta-math/MetaMath, also used by LoRA-Pro)
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{query}\n\n### Response:\n"
    ),
    # the LoRA-GA seed's prompt (examples/data.py: "Q: {query}\nA: ")
    "qa": "Q: {query}\nA: ",
}
"""``--prompt_template`` names; any other value must be a format string containing ``{query}``."""

STOP_STRINGS: tuple[str, ...] = ("\n\n### Instruction", "\n### Instruction", "\nQ: ", "\n\nQ:")
"""Where a completion is cut when the model starts a new turn (MetaMath's eval stops on these too)."""

# A number: optional sign, digits with optional thousands separators, optional decimals; or a bare
# decimal (.5); optionally a fraction a/b. Thousands groups must be exactly 3 digits ("1,234,567").
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_NUM_RE = re.compile(_NUM)
_MARKERS = ("The answer is:", "The answer is", "####")


def format_prompt(template: str, query: str) -> str:
    """``template`` by name (:data:`PROMPT_TEMPLATES`) or a format string with ``{query}``."""
    fmt = PROMPT_TEMPLATES.get(template, template)
    if "{query}" not in fmt:
        raise ValueError(
            f"--prompt_template must be one of {', '.join(PROMPT_TEMPLATES)} or contain '{{query}}', got {template!r}"
        )
    return fmt.format(query=query)


def stop_at(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` cut at the first stop string (the model starting another question)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_answer(text: str) -> str | None:
    """The final answer of a MetaMath (``The answer is: X``) or GSM8K (``#### X``) solution, or ``None``.

    Thousands separators are removed; ``None`` when no marker is followed by a number.
    """
    for marker in _MARKERS:
        pos = text.rfind(marker)
        if pos < 0:
            continue
        tail = text[pos + len(marker) :].lstrip(" :$\t")
        # the answer is the first number after the marker, on the marker's line or the next one
        m = _NUM_RE.search(tail[:80])
        if m is None:
            continue
        return m.group(0).replace(",", "").lstrip("+")
    return None


def parse_number(text: str | None) -> Fraction | None:
    """The exact value of an extracted answer (``"1250.50"``, ``"-3"``, ``"3/4"``), ``None`` if not a number."""
    if text is None:
        return None
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(Decimal(num)) / Fraction(Decimal(den)) if Decimal(den) != 0 else None
        return Fraction(Decimal(text))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Whether two extracted answers are the same number (``18.00`` = ``18``; ``None`` never matches)."""
    p, r = parse_number(prediction), parse_number(reference)
    return p is not None and r is not None and p == r


@torch.no_grad()
def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    device: torch.device | str | None = None,
    synced_gpus: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts``, ``batch_size`` at a time, left-padded with an attention mask.

    Prompts are grouped by length (less padding) and the completions returned in the input order.
    ``synced_gpus`` must be true under DeepSpeed ZeRO-3 with several processes (every rank keeps
    stepping until all are done, since each forward gathers parameters).

    Example:
        >>> from loralab.core.testing import tiny_llama, offline_tokenizer
        >>> outs = generate_batched(tiny_llama(), offline_tokenizer(), ["1+1=", "2+2="], max_new_tokens=3)
        >>> len(outs)
        2
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device or next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise ValueError(
            "the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token"
        )
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="generating"):
        idx = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in idx)
        # left padding: every prompt ends at the same position, so the first generated token of each
        # row follows its own last prompt token; the mask keeps padding out of attention and out of
        # the position ids generate() derives from it
        ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, longest - n :] = torch.tensor(encoded[i])
            mask[row, longest - n :] = 1
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if synced_gpus:
            kwargs["synced_gpus"] = True
        gen = model.generate(**kwargs)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, longest:], skip_special_tokens=True)
    model.train(was_training)
    return out


def gsm8k_accuracy(
    questions: Sequence[str], references: Sequence[str], completions: Sequence[str]
) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy of ``completions`` against GSM8K ``references`` (``#### X`` answers) and one record per example."""
    if not (len(questions) == len(references) == len(completions)):
        raise ValueError(
            f"lengths differ: {len(questions)} questions, {len(references)} references, {len(completions)} completions"
        )
    records = []
    correct = 0
    for i, (q, ref, comp) in enumerate(zip(questions, references, completions)):
        cut = stop_at(comp)
        pred, gold = extract_answer(cut), extract_answer(ref)
        ok = answers_match(pred, gold)
        correct += ok
        records.append(
            {
                "idx": i,
                "question": q,
                "completion": cut,
                "prediction": pred,
                "reference": gold,
                "correct": ok,
            }
        )
    return (correct / len(records) if records else 0.0), records


def write_predictions(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """One JSON object per line (``idx, question, completion, prediction, reference, correct``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path
