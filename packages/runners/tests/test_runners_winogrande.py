"""WinoGrande entrypoint: the option substitution, continuation scores against the model's own loss,
batched == unbatched scores, and every method end to end on a tiny Llama with WinoGrande-format files."""

import json

import pytest
import torch

from loralab.core.testing import offline_tokenizer, tiny_llama
from loralab.runners import winogrande
from loralab.runners.methods import METHODS
from loralab.runners.winogrande import encode_continuation, score_options, split_sentence

STEPS = 2
SENTENCES = [
    {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
        "options": ("Sarah", "Maria"),
    },
    {
        "sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
        "options": ("trophy", "suitcase"),
    },
    {
        "sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine.",
        "options": ("Ian", "Dennis"),
    },
]


def test_split_sentence_substitutes_the_option():
    ctx, cont = split_sentence(SENTENCES[1]["sentence"], "suitcase")
    assert ctx == "The trophy doesn't fit into the brown suitcase because the suitcase"
    assert cont == " is too large."
    with pytest.raises(ValueError, match="exactly one '_'"):
        split_sentence("no blank here.", "x")
    with pytest.raises(ValueError, match="nothing follows the blank"):
        split_sentence("The answer is _", "x")


def test_encode_keeps_the_continuation_and_masks_the_context():
    tok = offline_tokenizer()
    ex = encode_continuation(
        tok, "The cat sat on the mat because the cat", " was tired.", max_length=64
    )
    n = len(tok(" was tired.", add_special_tokens=False)["input_ids"])
    assert ex["labels"][-n:] == ex["input_ids"][-n:] and set(ex["labels"][:-n]) == {-100}
    short = encode_continuation(
        tok, "The cat sat on the mat because the cat", " was tired.", max_length=n + 4
    )
    # context cut from the left
    assert len(short["input_ids"]) == n + 4 and short["input_ids"][-n:] == ex["input_ids"][-n:]
    with pytest.raises(ValueError, match="--max_length"):
        encode_continuation(tok, "ctx", " was tired.", max_length=n)


def test_scores_are_continuation_log_likelihoods_and_batch_invariant():
    model, tok = tiny_llama(seed=5), offline_tokenizer()
    scores = score_options(model, tok, SENTENCES, batch_size=len(SENTENCES))
    one = score_options(model, tok, SENTENCES, batch_size=1)
    torch.testing.assert_close(scores, one, rtol=1e-5, atol=1e-4)
    # reference: the model's own mean cross-entropy over the continuation tokens, times their number
    for i, ex in enumerate(SENTENCES):
        for j, opt in enumerate(ex["options"]):
            enc = encode_continuation(tok, *split_sentence(ex["sentence"], opt), 128)
            labels = torch.tensor([enc["labels"]])
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([enc["input_ids"]]), labels=labels).loss
            n = int((labels[:, 1:] != -100).sum())
            torch.testing.assert_close(scores[i, j], -loss * n, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)  # every method: a missing package fails, never skips
def test_winogrande_end_to_end(method, tiny_dirs, winogrande_files, tmp_path, helpers):
    out = tmp_path / method
    argv = [
        "--model_name_or_path", tiny_dirs["llama"],
        "--train_file", winogrande_files["train"],
        "--validation_file", winogrande_files["validation"],
        "--output_dir", str(out),
        "--method", method,
        "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
        *helpers.method_flags(method),
    ]  # fmt: skip
    metrics = winogrande.main(argv)
    assert metrics["num_examples"] == 8.0 and 0.0 <= metrics["accuracy"] <= 1.0
    rows = [
        json.loads(line) for line in (out / "winogrande_predictions.jsonl").read_text().splitlines()
    ]
    assert [r["idx"] for r in rows] == list(range(8))
    assert sum(r["correct"] for r in rows) / 8 == metrics["accuracy"]
    assert all(r["prediction"] == (2 if r["scores"][1] > r["scores"][0] else 1) for r in rows)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (
        len([r for r in logged if "loss" in r]) == STEPS
        and logged[-1]["eval_accuracy"] == metrics["accuracy"]
    )
    # final/ loaded the bare way reproduces the run's option scores
    from transformers import AutoTokenizer

    model = helpers.reload_final(tiny_dirs["llama"], out / "final", "AutoModelForCausalLM")
    tokenizer = AutoTokenizer.from_pretrained(str(out / "final"))
    examples = [{"sentence": r["sentence"], "options": tuple(r["options"])} for r in rows]
    scores = score_options(model, tokenizer, examples, batch_size=4, max_length=128)
    torch.testing.assert_close(
        scores, torch.tensor([r["scores"] for r in rows]), rtol=1e-4, atol=1e-4
    )


def test_winogrande_learns_the_fixture(tiny_dirs, winogrande_files, tmp_path):
    # the fixture's answer follows from "big"/"small": a few full fine-tuning steps must lower the
    # continuation loss of the right option relative to the wrong one on the training sentences
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    rows = [json.loads(line) for line in open(winogrande_files["train"])]
    examples = [
        {
            "sentence": r["sentence"],
            "options": (r["option1"], r["option2"]),
            "label": int(r["answer"]) - 1,
        }
        for r in rows
    ]

    def margin(model):
        s = score_options(model, tok, examples)
        right = s[torch.arange(len(examples)), [e["label"] for e in examples]]
        wrong = s[torch.arange(len(examples)), [1 - e["label"] for e in examples]]
        return float((right - wrong).mean())

    before = margin(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]))
    out = tmp_path / "learn"
    winogrande.main([
        "--model_name_or_path", tiny_dirs["llama"], "--train_file", winogrande_files["train"],
        "--validation_file", winogrande_files["validation"], "--output_dir", str(out), "--method", "full",
        "--max_steps", "30", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--disable_tqdm", "true",
        "--lr_scheduler_type", "constant", "--logging_steps", "10",
    ])  # fmt: skip
    after = margin(AutoModelForCausalLM.from_pretrained(out / "final"))
    assert after > before + 0.5, (before, after)


def test_bad_files_name_the_argument(tiny_dirs, winogrande_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "A _ b.", "option1": "x", "answer": "1"}) + "\n")
    unlabeled = tmp_path / "test.jsonl"
    unlabeled.write_text(
        json.dumps({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": ""}) + "\n"
    )
    base = [
        "--model_name_or_path",
        tiny_dirs["llama"],
        "--output_dir",
        str(tmp_path / "o"),
        "--method",
        "lora",
        "--max_steps",
        "1",
    ]
    with pytest.raises(ValueError, match=r"--train_file .*bad\.jsonl lacks column\(s\) option2"):
        winogrande.main(
            [*base, "--train_file", str(bad), "--validation_file", winogrande_files["validation"]]
        )
    with pytest.raises(ValueError, match=r"--validation_file .*test\.jsonl: no labeled example"):
        winogrande.main(
            [*base, "--train_file", winogrande_files["train"], "--validation_file", str(unlabeled)]
        )
    with pytest.raises(SystemExit):
        winogrande.main([*base, "--dataset_config", "winogrande_xxl"])
