"""MetaMathQA -> GSM8K entrypoint: SFT data (loss on the response only), every method end to end on a
tiny Llama with MetaMathQA/GSM8K-format fixture files, evaluation-only mode, and errors naming the flag."""

import json
from pathlib import Path

import pytest

from loralab.core.testing import offline_tokenizer
from loralab.runners import metamath
from loralab.runners.gsm8k import format_prompt
from loralab.runners.methods import METHODS

STEPS = 2


def common(tiny_dirs, metamath_files, out: Path) -> list[str]:
    return [
        "--model_name_or_path", tiny_dirs["llama"],
        "--train_file", metamath_files["train"],
        "--eval_file", metamath_files["eval"],
        "--output_dir", str(out),
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--max_length", "96",
        "--max_new_tokens", "4",
        "--prompt_template", "qa",  # the byte-level test tokenizer makes the alpaca prompt ~170 tokens
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def test_sft_example_masks_the_prompt():
    tok = offline_tokenizer()
    prompt = format_prompt("alpaca", "What is 2 plus 3?")
    response = "2 + 3 = 5.\nThe answer is: 5"
    ex = metamath.encode_sft(tok, prompt, response, max_length=512)
    n_prompt = len(tok(prompt)["input_ids"])
    # the prompt is tokenized exactly as at evaluation, and its labels are ignored
    assert ex["input_ids"][:n_prompt] == tok(prompt)["input_ids"]
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:], skip_special_tokens=True) == response
    assert ex["input_ids"][-1] == tok.eos_token_id
    # max_length cuts from the right; a prompt that fills it leaves nothing to train: dropped
    cut = metamath.encode_sft(tok, prompt, response, max_length=n_prompt + 3)
    assert len(cut["input_ids"]) == n_prompt + 3 and cut["labels"][-3:] == cut["input_ids"][-3:]
    assert metamath.encode_sft(tok, prompt, response, max_length=n_prompt) is None


@pytest.mark.parametrize("method", METHODS)  # every method: a missing package fails, never skips
def test_metamath_end_to_end(method, tiny_dirs, metamath_files, tmp_path, helpers):
    out = tmp_path / method
    argv = [
        *common(tiny_dirs, metamath_files, out),
        "--method",
        method,
        "--max_steps",
        str(STEPS),
        *helpers.method_flags(method),
    ]
    metrics = metamath.main(argv)
    assert metrics["num_examples"] == 6.0 and 0.0 <= metrics["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "gsm8k_predictions.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == list(range(6))
    # every fixture reference parsed from "#### X"
    assert all(r["reference"] is not None for r in rows)
    assert sum(r["correct"] for r in rows) / 6 == metrics["accuracy"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == STEPS and all(x == x for x in losses)
    assert logged[-1]["kind"] == "summary" and logged[-1]["eval_accuracy"] == metrics["accuracy"]
    assert (out / "run_config.json").is_file() and (out / "final").is_dir()
    # final/ loaded the bare way regenerates the run's final completions (greedy, same batching)
    from transformers import AutoTokenizer

    from loralab.runners.gsm8k import generate_batched, stop_at

    model = helpers.reload_final(tiny_dirs["llama"], out / "final", "AutoModelForCausalLM")
    tokenizer = AutoTokenizer.from_pretrained(str(out / "final"))
    prompts = [format_prompt("qa", r["question"]) for r in rows]
    completions = generate_batched(model, tokenizer, prompts, batch_size=4, max_new_tokens=4)
    assert [stop_at(c) for c in completions] == [r["completion"] for r in rows]


def test_alpaca_template_and_query_types(tiny_dirs, metamath_files, tmp_path):
    out = tmp_path / "alpaca"
    argv = [
        *common(tiny_dirs, metamath_files, out),
        "--method", "lora", "--lora_r", "2", "--max_steps", "1", "--prompt_template", "alpaca", "--max_length", "220",
        "--query_types", "GSM", "--max_train_samples", "8", "--max_eval_samples", "2", "--save_final_model", "false",
    ]  # fmt: skip
    metrics = metamath.main(argv)
    assert metrics["num_examples"] == 2.0
    config = json.loads((out / "run_config.json").read_text())
    assert config["prompt_template"] == "alpaca" and config["method"] == "lora"


def test_evaluate_only(tiny_dirs, metamath_files, tmp_path):
    out = tmp_path / "eval"
    argv = [
        *common(tiny_dirs, metamath_files, out),
        "--do_train",
        "false",
        "--max_eval_samples",
        "3",
    ]
    metrics = metamath.main(argv)
    assert metrics["num_examples"] == 3.0
    assert len((out / "gsm8k_predictions.jsonl").read_text().splitlines()) == 3


def test_evaluate_only_refuses_fsdp(tiny_dirs, metamath_files, tmp_path):
    argv = [
        *common(tiny_dirs, metamath_files, tmp_path / "e"),
        "--do_train",
        "false",
        "--fsdp",
        "full_shard",
    ]
    with pytest.raises(
        ValueError,
        match="--fsdp full_shard shards training; --do_train false evaluates without it: drop it",
    ):
        metamath.main(argv)


def test_bad_inputs_name_the_argument(tiny_dirs, metamath_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    base = [
        *common(tiny_dirs, metamath_files, tmp_path / "x"),
        "--method",
        "lora",
        "--max_steps",
        "1",
    ]
    with pytest.raises(
        ValueError, match=r"--train_file .*bad.jsonl lacks column\(s\) query, response"
    ):
        metamath.main([*base, "--train_file", str(bad)])
    with pytest.raises(ValueError, match=r"--eval_file .*lacks column\(s\) question, answer"):
        metamath.main([*base, "--eval_file", metamath_files["train"]])
    with pytest.raises(FileNotFoundError, match=r"--train_file .*missing\.json: no such file"):
        metamath.main([*base, "--train_file", str(tmp_path / "missing.json")])
    with pytest.raises(ValueError, match="--prompt_template"):
        metamath.main([*base, "--prompt_template", "no placeholder"])
    with pytest.raises(ValueError, match="--query_types MATH: no row"):
        metamath.main([*base, "--query_types", "MATH"])
    with pytest.raises(ValueError, match="--rand_ratio does not apply to --method lora"):
        metamath.main([*base, "--rand_ratio", "0.5"])
