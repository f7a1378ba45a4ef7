"""The LoRA-GA seed's example helpers (``initialize_text_to_text_model``, ``transform_dataset``,
``DATASET_MAP["meta_math"]``) and the seed's full MetaMathQA example on a tiny Llama with only its imports
changed (plus the model id, and its HF-Trainer ``train_text_to_text_model`` call stood in by a short loop)."""

import json
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from loralab.runners.seed_compat import (
    DATASET_MAP,
    GSM8K_FILE_ENV,
    METAMATH_FILE_ENV,
    METAMATH_TOKENIZER_ENV,
    causal_lm_encode,
    initialize_text_to_text_model,
    transform_dataset,
)

MAX_TOKENS = 512


@pytest.fixture
def metamath_env(monkeypatch, tiny_dirs, tmp_path, helpers):
    rows = helpers.metamath_rows(20, 0)
    rows.insert(3, {**rows[3], "type": "MATH_FOBAR"})  # not GSM-derived: the seed drops it
    # over max_tokens with the byte-level tokenizer: dropped
    rows.insert(5, {**rows[5], "query": "x" * 600})
    path = tmp_path / "MetaMathQA-395K.json"
    path.write_text(json.dumps(rows))
    monkeypatch.setenv(METAMATH_FILE_ENV, str(path))
    monkeypatch.setenv(METAMATH_TOKENIZER_ENV, tiny_dirs["llama"])
    return rows


def test_meta_math_rows_as_the_seed_builds_them(metamath_env):
    train, evaluation, same = DATASET_MAP["meta_math"](num_train=16, num_eval=4)
    kept = [r for r in metamath_env if "GSM" in r["type"] and len(r["query"]) < 600]
    assert len(train) == 16 and len(evaluation) == 4 and same is evaluation
    assert train[0] == {
        "x": f"Q: {kept[0]['query']}\nA: ",
        "y": kept[0]["response"].split("\nThe answer is:")[0],
    }
    assert "The answer is" not in "".join(train["y"])
    assert [r["x"] for r in evaluation] == [f"Q: {r['query']}\nA: " for r in kept[16:20]]


def test_gsm8k_from_a_local_file(monkeypatch, tmp_path, helpers):
    path = helpers.write_jsonl(tmp_path / "gsm8k.jsonl", helpers.gsm8k_rows(3, 0))
    monkeypatch.setenv(GSM8K_FILE_ENV, path)
    train, test, _ = DATASET_MAP["gsm8k"]()
    assert (
        train[0]["x"].startswith("Q: What is")
        and train[0]["y"].endswith(train[0]["y"].split("#### ")[-1])
        and len(test) == 3
    )


def test_causal_lm_encoding_trains_on_the_response_only(tiny_dirs):
    _, tok = initialize_text_to_text_model(tiny_dirs["llama"], "CausalLM", "fp32")
    batch = {"x": ["Q: 1+1?\nA: ", "Q: what is 12 plus 30?\nA: "], "y": ["2", "42"]}
    enc = causal_lm_encode(batch, tok, max_length=64)
    for i, (x, y) in enumerate(zip(batch["x"], batch["y"])):
        full = tok(x + " " + y + tok.eos_token)["input_ids"]
        n = len(tok(x)["input_ids"])
        assert enc["input_ids"][i, : len(full)].tolist() == full
        assert (
            enc["labels"][i, :n].eq(-100).all()
            and enc["labels"][i, n : len(full)].tolist() == full[n:]
        )
        assert enc["labels"][i, len(full) :].eq(-100).all() and enc["attention_mask"][
            i
        ].sum() == len(full)


def test_transform_dataset_batches_through_a_dataloader(tiny_dirs, metamath_env):
    model, tok = initialize_text_to_text_model(tiny_dirs["llama"], "CausalLM", "bf16")
    # the tokenizer's own pad is kept
    assert model.dtype == torch.bfloat16 and tok.pad_token == "<pad>"
    train, _, _ = DATASET_MAP["meta_math"](num_train=8, num_eval=0)
    transform_dataset(model_type="CausalLM", dataset=train, tokenizer=tok, max_length=MAX_TOKENS)
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    assert model(**batch).loss.isfinite()


def test_seq2seq_and_errors(tiny_dirs):
    from datasets import Dataset

    model, tok = initialize_text_to_text_model(tiny_dirs["t5"], "ConditionalGeneration", "fp32")
    ds = transform_dataset(
        "ConditionalGeneration",
        tok,
        Dataset.from_dict({"x": ["a b c", "d"], "y": ["pos", "negative"]}),
        32,
    )
    b = ds[:2]
    assert b["labels"][0].tolist()[-1] == -100 and model(**b).loss.isfinite()  # padded label masked
    with pytest.raises(
        ValueError, match="model_type must be one of CausalLM, ConditionalGeneration, got 'LM'"
    ):
        initialize_text_to_text_model(tiny_dirs["llama"], "LM", "fp32")
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, int8, nf4, got 'fp16'"):
        initialize_text_to_text_model(tiny_dirs["llama"], "CausalLM", "fp16")
    with pytest.raises(ValueError, match="lacks column"):
        transform_dataset("CausalLM", tok, Dataset.from_dict({"text": ["a"]}), 8)


# The seed's examples/float_llama2-7b_metamath.py (Outsider565/LoRA-GA), wandb lines left out. The seed's
# imports were `from peft import PeftModel, LoraGAConfig, get_peft_model`, `from peft.utils.lora_ga_utils
# import (...)`, `from utils import (transform_dataset, initialize_text_to_text_model, find_all_linear_modules,
# train_text_to_text_model)` and `from data import DATASET_MAP`.
SEED_IMPORTS = """
import os
import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model
from loralab.lora_ga import LoraGAConfig, estimate_gradient, LoraGAContext, save_loraga_model_init, save_loraga_model_final
from loralab.runners.seed_compat import transform_dataset, initialize_text_to_text_model, DATASET_MAP
from loralab.core.targets import find_all_linear_modules
"""
SEED_EXAMPLE = """
def main(lora_alpha=8, lora_rank=32, sample_size=128, seed=31):
    accelerator = Accelerator()
    model_id = "meta-llama/Llama-2-7b-hf"
    model_type = "CausalLM"
    model_dtype = "bf16"
    dataset_name = "meta_math"
    config = dict(
        model="llama",
        d=dataset_name,
        a=lora_alpha,
        r=lora_rank,
        s=sample_size,
        sd=seed,
    )
    wandb_name = "_".join([f"{k}={v}" for k, v in config.items()])
    model, tokenizer = initialize_text_to_text_model(
        model_id, model_type, model_dtype, flash_attention=False
    )

    peft_config = LoraGAConfig(
        target_modules=find_all_linear_modules(model=model),
        lora_alpha=config["a"],
        r=config["r"],
        iters=config["s"] // 2,
    )

    dataset_func = DATASET_MAP[dataset_name]
    train_set, val_set, _ = dataset_func()
    if isinstance(train_set, list):
        temp_set = train_set[: peft_config.bsz * peft_config.iters]
    else:
        temp_set = train_set.select(range(peft_config.bsz * peft_config.iters))
    transform_dataset(
        model_type=model_type,
        dataset=temp_set,
        tokenizer=tokenizer,
        max_length=peft_config.max_length,
    )
    dataloader = torch.utils.data.DataLoader(temp_set, batch_size=peft_config.bsz)

    named_grad = estimate_gradient(
        model=model,
        dataloader=dataloader,
        accelerator=accelerator,
        quant_flag=False,
    )
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=peft_config)

    save_dir = os.path.join("./snapshot", wandb_name)
    if accelerator.is_local_main_process:
        save_loraga_model_init(model=model, save_dir=save_dir)

    model = train_text_to_text_model(
        run_name=os.path.join("peft_test", wandb_name),
        train_dataset=train_set,
        valid_dataset=val_set,
        model=model,
        tokenizer=tokenizer,
        model_type=model_type,
        max_length=1024,
        learning_rate=2e-5,
        seed=seed,
    )
    if accelerator.is_local_main_process:
        save_loraga_model_final(model=model, save_dir=save_dir)
        model, tokenizer = initialize_text_to_text_model(
            model_id, model_type, model_dtype, flash_attention=False
        )
        model = PeftModel.from_pretrained(model, save_dir)
    return model
"""


def test_seed_metamath_example_runs_with_only_the_imports_changed(
    tiny_dirs, metamath_env, tmp_path, monkeypatch
):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    monkeypatch.chdir(tmp_path)
    probe = {}

    def train_text_to_text_model(*, train_dataset, model, tokenizer, model_type, max_length, **_):
        # stands in for the seed's HF-Trainer wrapper: a few SGD steps on the same transformed data
        transform_dataset(model_type, tokenizer, train_dataset, max_length)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        batches = list(DataLoader(train_dataset, batch_size=4))[:3]
        model.train()
        for b in batches:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            probe["batch"], probe["trained"] = batches[0], model(**batches[0]).logits.float()
        return model

    source = SEED_EXAMPLE.replace('"meta-llama/Llama-2-7b-hf"', repr(tiny_dirs["llama"]))
    env = {"train_text_to_text_model": train_text_to_text_model}
    exec(SEED_IMPORTS + textwrap.dedent(source), env)
    try:
        reloaded = env["main"](lora_rank=4, sample_size=8)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    save_dir = tmp_path / "snapshot" / "model=llama_d=meta_math_a=8_r=4_s=8_sd=31"
    adapter = json.loads((save_dir / "adapter_config.json").read_text())
    # a plain LoRA adapter of rank 2r on the original base (LoRA-GA's offset folded in), every linear layer
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    with torch.no_grad():
        logits = reloaded(**probe["batch"]).logits.float()
    # the reloaded bf16 model reproduces the trained one to bf16 rounding (eps 2^-8 relative, logits ~1)
    torch.testing.assert_close(logits, probe["trained"], rtol=0.05, atol=0.05)
