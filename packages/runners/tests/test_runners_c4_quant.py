"""C4's ``--use_peft --golore --quantize 4bit|8bit [--use_double_quant]``: GoLore's ReLoRA path with a
bitsandbytes frozen W, on the tiny LLaMA with local C4-format shards (CPU, bitsandbytes 0.50).

- a short run per setting (NF4, NF4 + double quantization, int8) with merges at steps 0, 2 and 4: the
  loss is finite and decreases, the checkpoints hold the quantized W (codes and scales), and
  ``final_model/`` is a float model whose logits match the trained quantized model's;
- stop at a checkpoint + ``--autoresume`` gives the uninterrupted losses bit for bit (W was
  re-quantized by two merges before the checkpoint, and is again after the resume);
- every refusal, each message checked, before the model is built.

Tolerance of ``final_model/`` against the quantized model (logits of |x| ~ 1-5): the 4-bit CPU
matmul multiplies by the same dequantized NF4 values the float model holds, so they differ by float32
rounding only (``deq(W)·x − s·A·(B·x)`` against ``(deq(W) − s·A·B)·x``): 1e-4 is asserted. LLM.int8
also rounds the activations to int8 per row (absmax / 127), which the float model does not: 0.05 is
asserted. Measured here (|logits| <= 1.05): 4.2e-7 for NF4 with and without double quantization,
5.6e-3 for int8.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from loralab.core.testing import free_port
from loralab.runners.c4 import C4Args, parse_args, run
from loralab.runners.c4.testing import write_tiny_setup
from loralab.runners.loop import CheckpointError
from loralab.runners.methods import MethodError

pytest.importorskip("bitsandbytes")

STEPS = 6
GAP = 2  # ReLoRA merges at steps 0, 2, 4
SAVE_EVERY = 3
RELORA = ["--use_peft", "--golore", "--optimizer", "adamw", "--rank", "8", "--update_proj_gap", str(GAP),
          "--galore_scale", "1.0", "--rand_ratio", "0.5"]  # fmt: skip
SETTINGS = {
    "nf4": ["--quantize", "4bit"],
    "nf4_dq": ["--quantize", "4bit", "--use_double_quant"],
    "int8": ["--quantize", "8bit"],
}
LOGIT_ATOL = {"nf4": 1e-4, "nf4_dq": 1e-4, "int8": 0.05}
WORKER = Path(__file__).with_name("runners_c4_worker.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(
        tmp_path_factory.mktemp("c4q") / "setup", train_docs=120, validation_docs=12
    )


def _argv(setup: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(out), "--model_config", setup["model_config"], "--tokenizer", setup["tokenizer"],
        "--train_data", setup["train_data"], "--max_length", "32", "--batch_size", "4", "--total_batch_size", "8",
        "--data_streams", "2", "--num_training_steps", str(STEPS), "--warmup_steps", "1", "--lr", "3e-3",
        "--grad_clipping", "1.0", "--eval_every", "3", "--save_every", str(SAVE_EVERY), "--eval_tokens", "320",
        "--plot", "false", "--seed", "1", *extra,
    ]  # fmt: skip


def _train_losses(run_dir: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """One uninterrupted run per quantization setting; cached."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"q_{name}")
            cache[name] = (out, run(parse_args(_argv(setup, out, *RELORA, *SETTINGS[name]))))
        return cache[name]

    return get


def _trained_model(out: Path, step: int) -> torch.nn.Module:
    """The run's quantized ReLoRA model, rebuilt as the run builds it, with checkpoint-``step`` loaded."""
    from loralab.runners.c4.model import build_model
    from loralab.runners.methods import get_method

    args = C4Args(**json.loads((out / "run_config.json").read_text()))
    method = get_method(args.method_name())
    model = build_model(args.model_config, seed=args.seed)
    setup = method.setup(model, args.registry_args(STEPS), scheduler=lambda opt: None)
    state = torch.load(out / f"checkpoint-{step}" / "model.pt", weights_only=True)
    setup.model.load_state_dict(state)
    return setup.model.eval()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_quantized_relora_run_trains_and_saves_a_float_final_model(single, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.golore import ReLoRaLinear
    from loralab.runners.c4.batches import eval_batches

    out, summary = single(name)
    losses = _train_losses(out)
    assert summary["finished"] and len(losses) == STEPS and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0] - 0.1, losses
    assert summary["final_eval_loss"] < losses[0] - 0.1
    assert summary["n_projector_resets"] == STEPS // GAP
    assert (
        summary["optimizer"]
        == {
            "nf4": "adamw+relora+4bit",
            "nf4_dq": "adamw+relora+4bit-dq",
            "int8": "adamw+relora+8bit",
        }[name]
    )
    config = json.loads((out / "run_config.json").read_text())
    assert (config["quantize"], config["use_double_quant"]) == {
        "nf4": ("4bit", False),
        "nf4_dq": ("4bit", True),
        "int8": ("8bit", None),
    }[name]

    # the checkpoint holds the quantized W as bitsandbytes writes it, no float copy of it
    state = torch.load(out / "checkpoint-6" / "model.pt", weights_only=True)
    q = "wrapped_model.model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in state and f"{q}.lora_A.weight" in state
    codes = state[f"{q}.base_layer.weight"]
    if name == "int8":
        assert codes.dtype == torch.int8 and f"{q}.base_layer.SCB" in state
    else:
        assert codes.dtype == torch.uint8 and f"{q}.base_layer.weight.absmax" in state
        assert (f"{q}.base_layer.weight.nested_absmax" in state) is (name == "nf4_dq")

    # final_model/: plain float weights (dequantized W - s·A·B), no quantization_config
    final = AutoModelForCausalLM.from_pretrained(out / "final_model").eval()
    assert getattr(final.config, "quantization_config", None) is None
    assert {p.dtype for p in final.parameters()} == {torch.float32}
    trained = _trained_model(out, STEPS)
    inner = trained.wrapped_model
    for mod_name, mod in inner.named_modules():
        if isinstance(mod, ReLoRaLinear):
            assert mod.quantized
            saved = final.get_submodule(mod_name).weight
            torch.testing.assert_close(saved, mod.effective_weight(), atol=0, rtol=0)
    args = C4Args(**config)
    batch = eval_batches(args, AutoTokenizer.from_pretrained(out / "final_model"), 0, 1)[0]
    with torch.no_grad():
        want = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = final(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = (got - want).abs().max().item()
    assert diff <= LOGIT_ATOL[name], diff


@pytest.mark.parametrize("name", list(SETTINGS))
def test_quantized_relora_resume_gives_the_uninterrupted_losses(setup, single, tmp_path, name):
    ref_dir, ref = single(name)
    out = tmp_path / "run"
    argv = _argv(setup, out, *RELORA, *SETTINGS[name])
    first = run(parse_args([*argv, "--stop_at_step", str(SAVE_EVERY)]))
    assert first["step"] == SAVE_EVERY and not (out / "final_model").exists()
    resumed = run(parse_args([*argv, "--autoresume"]))
    assert resumed["finished"]
    # bit-identical: W's codes and scales after two merges, A/B, moments, generator, RNG, data
    assert _train_losses(out) == _train_losses(ref_dir)
    assert resumed["final_eval_loss"] == ref["final_eval_loss"]


def test_resume_refuses_another_quantization(setup, single, tmp_path):
    ref_dir, _ = single("nf4")
    out = tmp_path / "run"
    shutil.copytree(ref_dir / "checkpoint-3", out / "checkpoint-3")
    argv = _argv(setup, out, *RELORA, "--quantize", "8bit", "--autoresume")
    with pytest.raises(
        CheckpointError, match="--quantize: '4bit' -> '8bit'; --use_double_quant: False -> None"
    ):
        run(parse_args(argv))


@pytest.mark.parametrize(
    "optimizer", ["adamw", "sgd", "galore_adamw", "golore_adamw", "golore_sgd"]
)
def test_quantize_refused_for_runs_that_train_full_weights(optimizer):
    subspace = ["--rank", "8"] if optimizer.startswith("g") else []
    with pytest.raises(
        MethodError,
        match=rf"^--optimizer {optimizer} trains full weights, which a --quantize 8bit model does not have "
        r"\(bitsandbytes weights get no gradient\): use --use_peft --golore \(GoLore's ReLoRA path: float "
        r"A/B over a quantized frozen W\) or drop --quantize$",
    ):
        parse_args(["--output_dir", "x", "--optimizer", optimizer, *subspace, "--quantize", "8bit"])


@pytest.mark.parametrize(
    ("flags", "given"),
    [
        (["--use_peft", "--golore", "--use_double_quant"], "no --quantize"),
        (["--use_peft", "--golore", "--quantize", "8bit", "--use_double_quant"], "--quantize 8bit"),
        (["--optimizer", "adamw", "--use_double_quant", "false"], "no --quantize"),
    ],
)
def test_double_quant_without_4bit_refused(flags, given):
    with pytest.raises(
        ValueError,
        match=r"^--use_double_quant quantizes the NF4 block scales: it only applies with --quantize 4bit "
        rf"\(and --use_peft --golore\), got {given}; add --quantize 4bit or drop --use_double_quant$",
    ):
        parse_args(["--output_dir", "x", *flags])


def test_other_quantize_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"^--quantize must be one of 4bit, 8bit, got '4bits'$"):
        C4Args(output_dir="x", use_peft=True, golore=True, quantize="4bits")
    ds = tmp_path / "zero0.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(ValueError, match=r"^--quantize with --deepspeed_config is not supported"):
        parse_args(["--output_dir", "x", "--use_peft", "--golore", "--quantize", "4bit",
                    "--deepspeed_config", str(ds)])  # fmt: skip
    with pytest.raises(SystemExit):  # argparse's choices
        parse_args(["--output_dir", "x", "--use_peft", "--golore", "--quantize", "2bit"])
    # defaults: off; 4-bit fills --use_double_quant false
    plain = parse_args(["--output_dir", "x", "--use_peft", "--golore"])
    assert (plain.quantize, plain.use_double_quant) == (None, None)
    four = parse_args(["--output_dir", "x", "--use_peft", "--golore", "--quantize", "4bit"])
    assert (four.quantize, four.use_double_quant) == ("4bit", False)


def test_missing_bitsandbytes_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    import loralab.runners.c4.train as c4_train

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was built before bitsandbytes was checked")

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a)
    )
    monkeypatch.setattr(c4_train, "build_model", no_loading)
    with pytest.raises(
        ImportError, match=r"^--quantize 4bit needs bitsandbytes: pip install bitsandbytes"
    ):
        run(parse_args(_argv(setup, tmp_path / "run", *RELORA, "--quantize", "4bit")))


def test_method_refuses_bad_quantize_arguments():
    from loralab.core.testing import tiny_llama
    from loralab.runners.methods import get_method, method_args

    method = get_method("golore-relora")
    assert method.quantizes_frozen_weights and not method.quantized_base
    args = method_args("golore-relora", galore_rank=4)
    args.quantize = "2bit"
    with pytest.raises(MethodError, match=r"^--quantize must be 4bit or 8bit, got '2bit'$"):
        method.setup(tiny_llama(), args)
    args.quantize, args.use_double_quant = "8bit", True
    with pytest.raises(
        MethodError,
        match=r"^--use_double_quant quantizes the NF4 block scales: it needs --quantize 4bit, got '8bit'$",
    ):
        method.setup(tiny_llama(), args)


@pytest.mark.multiprocess
def test_torchrun_two_processes_match_single_process(setup, single, tmp_path):
    """torchrun, 2 ranks (gloo): the loop all-reduces every gradient itself (golore-relora is not
    DDP-wrapped), the full-gradient holder of a quantized W included, so both ranks merge the same
    averaged gradient: the single-process losses on the same global batch (rtol 1e-5)."""
    import os
    import subprocess

    names = ["nf4_dq", "int8"]
    runs = {n: tmp_path / n for n in names}
    (tmp_path / "runs.json").write_text(
        json.dumps([_argv(setup, out, *RELORA, *SETTINGS[n]) for n, out in runs.items()])
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(WORKER), str(tmp_path / "runs.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    for name, out in runs.items():
        ref_dir, ref = single(name)
        got = json.loads((out / "run_summary.json").read_text())
        assert got["world_size"] == 2
        torch.testing.assert_close(
            torch.tensor(_train_losses(out)),
            torch.tensor(_train_losses(ref_dir)),
            rtol=1e-5,
            atol=1e-6,
        )
        assert got["final_eval_loss"] == pytest.approx(ref["final_eval_loss"], rel=1e-5, abs=1e-6)
