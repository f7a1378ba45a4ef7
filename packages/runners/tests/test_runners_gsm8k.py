"""GSM8K evaluation: answer extraction on real-format strings, batched == unbatched greedy generation."""

import json

import pytest
import torch

from loralab.core.testing import offline_tokenizer, tiny_llama
from loralab.runners.gsm8k import (
    answers_match,
    extract_answer,
    format_prompt,
    generate_batched,
    gsm8k_accuracy,
    parse_number,
    stop_at,
    write_predictions,
)

NEW_TOKENS = 8

# openai/gsm8k "answer" strings (test split, verbatim format: <<calculator>> annotations, "#### X")
GSM8K_ANSWERS = [
    (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18",
        "18",
    ),
    (
        "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3",
        "3",
    ),
    (
        "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
        "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
        "So the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\n"
        "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70,000",
        "70000",
    ),
    ("The temperature dropped 8 - 11 = <<8-11=-3>>-3 degrees.\n#### -3", "-3"),
    ("Each share is 7/2 = <<7/2=3.5>>3.5 pounds.\n#### 3.5", "3.5"),
]

# meta-math/MetaMathQA "response" strings (GSM_* rows keep the "#### X" line; MATH_* rows do not)
METAMATH_RESPONSES = [
    (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72\nThe answer is: 72",
        "72",
    ),
    ("The total cost is $1,250 + $2,000 = $3,250.\n#### 3,250\nThe answer is: 3250", "3250"),
    ("The change in altitude is $-12 + 5 = -7$ meters.\nThe answer is: -7", "-7"),
    ("Half of a dollar is $0.50, so each apple costs $0.25.\nThe answer is: 0.25", "0.25"),
    (
        "We have $x = \\frac{3}{4}$. Therefore, the answer is $\\boxed{3/4}$.The answer is: 3/4",
        "3/4",
    ),
    ("The total is 1,234,567 people.\nThe answer is: 1,234,567", "1234567"),
]


@pytest.mark.parametrize(("text", "expected"), GSM8K_ANSWERS + METAMATH_RESPONSES)
def test_extract_answer_real_formats(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = 18 dollars every day.",  # numbers but no marker
        "The answer is: unknown",
        "",
        "#### ",
    ],
)
def test_missing_answer_is_none_and_counts_wrong(text):
    assert extract_answer(text) is None
    acc, records = gsm8k_accuracy(["q"], ["#### 18"], [text])
    assert acc == 0.0 and records[0]["prediction"] is None and records[0]["correct"] is False


def test_the_answer_is_wins_over_hashes_and_the_last_marker_counts():
    # a GSM-style completion whose "####" line disagrees with the final statement: MetaMath's marker wins
    assert extract_answer("#### 12\nThe answer is: 13") == "13"
    # a completion restating an intermediate answer then the final one: the last marker counts
    assert extract_answer("The answer is: 4. Wait, recompute.\nThe answer is: 5") == "5"


def test_numbers_compare_by_value():
    assert answers_match("18.00", "18") and answers_match("+7", "7") and answers_match("0.5", "1/2")
    assert (
        not answers_match("18", "-18")
        and not answers_match(None, "18")
        and not answers_match("3/0", "3")
    )
    assert parse_number("1250.50") == parse_number("1250.5")


def test_accuracy_and_jsonl(tmp_path):
    questions = ["q1", "q2", "q3", "q4"]
    refs = ["x\n#### 1,000", "#### -3", "#### 2.5", "#### 7"]
    completions = [
        "so 1000.\nThe answer is: 1000",
        "drops by 3.\nThe answer is: -3\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\nThe answer is: 4",
        "The answer is: 2.50",
        "I think 7 but no marker",
    ]
    acc, records = gsm8k_accuracy(questions, refs, completions)
    assert acc == 0.75
    assert records[1]["completion"] == "drops by 3.\nThe answer is: -3"  # cut at the next turn
    path = write_predictions(tmp_path / "p.jsonl", records)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, True, False]
    assert set(rows[0]) == {"idx", "question", "completion", "prediction", "reference", "correct"}
    assert stop_at("a\nQ: b") == "a"


def test_prompt_templates():
    assert format_prompt("qa", "What is 1+1?") == "Q: What is 1+1?\nA: "
    assert format_prompt("alpaca", "X").endswith("### Instruction:\nX\n\n### Response:\n")
    assert format_prompt("Question: {query}\nAnswer:", "X") == "Question: X\nAnswer:"
    with pytest.raises(ValueError, match="--prompt_template"):
        format_prompt("nonsense", "X")


PROMPTS = [
    "Q: What is 3 plus 4?\nA: ",
    "Q: A farmer has 12 cows and buys 7 more. How many cows?\nA: ",
    "Q: 2*9?\nA: ",
    "Q: Janet's ducks lay 16 eggs per day. She eats three for breakfast.\nA: ",
    "Q: 1?\nA: ",
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_llama(seed=3).eval(), offline_tokenizer()


def test_batched_generation_equals_unbatched(model_and_tokenizer):
    model, tok = model_and_tokenizer
    one = generate_batched(model, tok, PROMPTS, batch_size=1, max_new_tokens=NEW_TOKENS)
    batched = generate_batched(
        model, tok, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=NEW_TOKENS
    )
    assert batched == one
    assert any(len(s) > 0 for s in one)


def test_generation_without_the_mask_would_differ(model_and_tokenizer):
    # what the LoRA-Pro evaluation did (left padding, no attention mask): outputs change with the batch
    model, tok = model_and_tokenizer
    ref = generate_batched(model, tok, PROMPTS, batch_size=1, max_new_tokens=NEW_TOKENS)
    enc = [tok(p)["input_ids"] for p in PROMPTS]
    longest = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (longest - len(e)) + e for e in enc])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    unmasked = [tok.decode(row[longest:], skip_special_tokens=True) for row in out]
    assert unmasked != ref


def test_generation_errors(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_batched(model, tok, PROMPTS, batch_size=0)
