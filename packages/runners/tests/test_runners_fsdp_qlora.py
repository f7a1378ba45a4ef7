"""FSDP-QLoRA from the command line: ``--load_in_4bit --fsdp full_shard`` under torchrun, 2 CPU ranks.

MetaMath on a tiny Llama quantized to NF4 while loading: LoRA (codes stored as bfloat16, the storage
FSDP1 needed), LoRA-SB (its init on the float copy) and LoRA-GA (its init estimated on the float copy block by block, the offset
``W0 − s·B·A`` re-quantized into the sharded codes) train as one process with the same global batch;
LoRA-GA's ``final/offset_base`` (the base as trained, gathered from the shards) reloads the bare way;
interrupted after its checkpoint, LoRA-GA resumes exactly (the checkpoint keeps the re-quantized
layers' statistics, which FSDP2's sharded checkpoint does not hold). Refusals are tested in one
process, before any model loads.
"""

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from loralab.runners import metamath

sys.path.insert(0, str(Path(__file__).parent))
from test_runners_fsdp import adapter, records, rel_error, run_worker

STEPS = 3
LOSS_RTOL = 1e-5  # LoRA over the same NF4 codes: float32 reduction order only
ADAPTER_RTOL = 1e-4
# LoRA-GA re-quantizes W0 − s·B·A to NF4 on every rank and in the one process. The factors differ by
# float32 reduction order (1e-6), and a weight sitting on an NF4 rounding boundary then gets the
# neighbouring code: measured 2 codes of 2048 in 2 of 14 layers, each moving one weight by a
# quantization step. The step-1 losses then differ by 1.1e-4 (relative) and the adapters after 3
# steps by 1.5e-3 (worst tensor); the float base gives identical losses (test_runners_fsdp.py).
GA_LOSS_RTOL = 5e-4
GA_ADAPTER_RTOL = 5e-3
GA_CODE_FLIPS = 0.005  # at most this fraction of the re-quantized code bytes differ


def metamath_files(tmp_path: Path, helpers) -> tuple[str, str]:
    pairs = [(a, b) for a in range(5, 10) for b in range(5, 10)][:24]  # equal lengths
    train = [{"query": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}.\nThe answer is: {a + b}",
              "type": "GSM_Rephrased", "original_question": f"What is {a} plus {b}?"} for a, b in pairs]  # fmt: skip
    path = tmp_path / "MetaMathQA-395K.json"
    path.write_text(json.dumps(train))
    return str(path), helpers.write_jsonl(tmp_path / "gsm8k_test.jsonl", helpers.gsm8k_rows(5, 1))


def argv(
    model: str, files: tuple[str, str], out: Path, batch: int, method: str, *extra: str
) -> list[str]:
    return ["--model_name_or_path", model, "--train_file", files[0], "--eval_file", files[1], "--output_dir",
            str(out), "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "2",
            "--max_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "1e-3", "--max_length", "96",
            "--max_new_tokens", "4", "--prompt_template", "qa", "--method", method, "--lora_r", "4",
            "--lora_dropout", "0", "--adam_epsilon", "1e-4", "--disable_tqdm", "true", "--load_in_4bit", "true",
            *{"lora-ga": ["--ga_iters", "2"], "lora-sb": ["--sb_num_batches", "2"]}.get(method, []),
            *extra]  # fmt: skip


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out, "train")]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_qlora_lora_lora_sb_and_lora_ga_equal_one_process_reload_and_resume(
    tiny_dirs, tmp_path, helpers
):
    from safetensors.torch import load_file

    model, files = tiny_dirs["llama"], metamath_files(tmp_path, helpers)
    fsdp = ["--fsdp", "full_shard"]
    offload = ["--fsdp", "full_shard offload"]
    lora_extra = ["--bnb_4bit_quant_storage", "bfloat16"]
    ga, resumed = tmp_path / "ga", tmp_path / "ga_resumed"
    save, resume = ["--save_steps", "2"], ["--resume_from_checkpoint", "latest"]
    run_worker(
        [
            ("metamath", argv(model, files, tmp_path / "lora", 2, "lora", *lora_extra, *fsdp)),
            ("metamath", argv(model, files, tmp_path / "sb", 2, "lora-sb", *fsdp)),
            ("metamath", argv(model, files, ga, 2, "lora-ga", *save, *fsdp)),
            ("copy_run", [str(ga), str(resumed)]),
            ("metamath", argv(model, files, resumed, 2, "lora-ga", *save, *resume, *fsdp)),
            # FSDP-QLoRA with CPU offload (the 70B-on-few-GPUs setting): the same arithmetic here
            (
                "metamath",
                argv(model, files, tmp_path / "lora_off", 2, "lora", *lora_extra, *offload),
            ),
            ("metamath", argv(model, files, tmp_path / "ga_off", 2, "lora-ga", *save, *offload)),
        ],
        tmp_path,
        helpers.free_port(),
    )
    metamath.main(argv(model, files, tmp_path / "lora1", 4, "lora", *lora_extra))
    metamath.main(argv(model, files, tmp_path / "ga1", 4, "lora-ga"))
    metamath.main(argv(model, files, tmp_path / "sb1", 4, "lora-sb"))

    # QLoRA: the same codes on every rank, the adapters trained as in one process
    got, want = losses(tmp_path / "lora"), losses(tmp_path / "lora1")
    assert len(got) == STEPS and got == pytest.approx(want, rel=LOSS_RTOL)
    assert abs(want[-1] - want[0]) > 100 * LOSS_RTOL * abs(want[0])  # the updates moved the loss
    a, b = adapter(tmp_path / "lora"), adapter(tmp_path / "lora1")
    assert sorted(a) == sorted(b) and all(rel_error(a[k], b[k]) < ADAPTER_RTOL for k in b)
    run_config = json.loads((tmp_path / "lora" / "run_config.json").read_text())
    assert run_config["bnb_4bit_quant_storage"] == "bfloat16"
    # LoRA-SB: its init estimated on the float copy too (R from the gradient, A and B fixed)
    assert losses(tmp_path / "sb") == pytest.approx(losses(tmp_path / "sb1"), rel=LOSS_RTOL)

    # LoRA-GA: init on the float copy, offset base re-quantized into the shards
    got, want = losses(ga), losses(tmp_path / "ga1")
    assert len(got) == STEPS and got == pytest.approx(want, rel=GA_LOSS_RTOL)
    a, b = adapter(ga), adapter(tmp_path / "ga1")
    assert sorted(a) == sorted(b)
    worst = max(rel_error(a[k], b[k]) for k in b)
    assert worst < GA_ADAPTER_RTOL, worst
    base_got = load_file(str(ga / "final" / "offset_base" / "model.safetensors"))
    base_want = load_file(str(tmp_path / "ga1" / "final" / "offset_base" / "model.safetensors"))
    assert sorted(base_got) == sorted(base_want)  # the statistics of every 4-bit layer are there
    flips = total = 0
    for k, v in base_want.items():
        if v.dtype == torch.uint8 and k.endswith(".weight"):  # NF4 codes
            flips, total = flips + (base_got[k] != v).sum().item(), total + v.numel()
        elif v.is_floating_point():
            assert rel_error(base_got[k], v) < 1e-4, k
    assert total > 0 and flips <= GA_CODE_FLIPS * total, (flips, total)

    # final/ reloads the bare way: the offset base as trained (4-bit) + the rank-r adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def reloaded_logits(out: Path) -> torch.Tensor:
        base = AutoModelForCausalLM.from_pretrained(str(out / "final" / "offset_base"))
        assert getattr(base.config, "quantization_config", None) is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(base, str(out / "final")).eval()
        # a plain LoRA config (the LoRA-GA fields dropped): nothing for PEFT to warn about
        assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
        with torch.no_grad():
            return peft_model(torch.arange(1, 17).unsqueeze(0)).logits

    torch.testing.assert_close(
        reloaded_logits(ga), reloaded_logits(tmp_path / "ga1"), rtol=2e-2, atol=2e-2
    )

    # the interrupted run resumed from checkpoint-2 ends exactly as the uninterrupted one
    assert (ga / "checkpoint-2" / "quant_statistics.pt").exists()
    assert losses(resumed) == losses(ga)
    c = adapter(resumed)
    assert all(torch.equal(c[k], a[k]) for k in a)
    shutil.rmtree(tmp_path / "ga1")

    # CPU offload (CPUOffloadPolicy): the codes' shards on the CPU, each block's copied for its passes
    for plain, off in (("lora", "lora_off"), ("ga", "ga_off")):
        assert losses(tmp_path / off) == losses(tmp_path / plain), off
        a, b = adapter(tmp_path / off), adapter(tmp_path / plain)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b), off
        launch = json.loads((tmp_path / off / "launch.json").read_text())
        assert launch["offload"] == "cpu (CPUOffloadPolicy)", off


def test_fsdp_qlora_refusals_name_the_flag(tiny_dirs, tmp_path, helpers, monkeypatch):
    files = metamath_files(tmp_path, helpers)
    model = tiny_dirs["llama"]
    base = argv(model, files, tmp_path / "o", 2, "lora", "--fsdp", "full_shard")
    with pytest.raises(ValueError, match="--fsdp full_shard cannot shard an 8-bit"):
        metamath.main(
            [
                *base[: base.index("--load_in_4bit")],
                "--load_in_8bit",
                "true",
                "--fsdp",
                "full_shard",
            ]
        )
    with pytest.raises(ValueError, match="got --bnb_4bit_quant_storage float32"):
        metamath.main([*base, "--bf16", "true", "--bnb_4bit_quant_storage", "float32"])
    no_quant = argv(model, files, tmp_path / "p", 2, "lora")
    no_quant = no_quant[: no_quant.index("--load_in_4bit")]
    with pytest.raises(
        ValueError, match="--bnb_4bit_quant_storage only applies with --load_in_4bit"
    ):
        metamath.main([*no_quant, "--bnb_4bit_quant_storage", "bfloat16"])
    with pytest.raises(ValueError, match="--merge_and_save cannot merge an FSDP2-sharded model"):
        metamath.main([*base, "--merge_and_save", "true"])
    # torch < 2.13: FSDP2 fails on integer parameters (seen on 2.11 with CUDA): uint8 codes refused
    import loralab.core.quant as quant

    monkeypatch.setattr(quant, "fsdp2_shards_integer_storage", lambda: False)
    with pytest.raises(
        ValueError,
        match=r"cannot shard 4-bit codes stored as uint8.*--bnb_4bit_quant_storage bfloat16",
    ):
        metamath.main(base)
