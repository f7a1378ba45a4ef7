"""``--fsdp full_shard``: FSDP2 (``fully_shard``) under torchrun with 2 CPU processes (gloo).

GLUE with LoRA-Pro (its optimizer gathers the row-sharded LoRA factors, :mod:`loralab.core.sharding`)
trains as one process with the same global batch, evaluates an odd-sized validation set (the shorter
shard is padded: every forward is a collective), writes ``final/`` from the gathered weights, and resumes
from its checkpoint exactly. Unsupported combinations are refused before anything loads.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralab.runners import glue
from loralab.runners.loop.fsdp2_engine import FSDP2Engine
from loralab.runners.methods import MethodError, get_method

TIMEOUT = 900
STEPS = 3
LOSS_RTOL = 1e-5  # float32 reduction order (as test_runners_launch)
# LoRA-Pro's r×r (pseudo-)inverses of BᵀB with B ≈ 0 (PEFT's init) amplify that float32 round-off: the
# final adapters of one process and of 2 ranks differ by 4.8e-4 (relative, worst tensor) under FSDP2 and
# under DDP alike (FSDP2 and DDP gave bit-identical adapters)
ADAPTER_RTOL = 2e-3
# GaLore/GoLore full fine-tuning, float32: the reduction order moves the SVD projectors' last bits;
# measured 1.2e-6 (worst tensor, both methods)
GALORE_RTOL = 1e-3
# LoRA-GA / LoRA-SB: the init's SVD amplifies the float32 round-off of the averaged gradient by
# 1/(singular-value gap) (1e-4 bound in test_lora_ga_distributed.py), then the training steps as LoRA's;
# measured on final/: 1.6e-5 (lora-ga), 2.9e-6 (lora-sb, plain and native)
INIT_ADAPTER_RTOL = 1e-4
BF16_LOSS_RTOL = 2e-2  # bfloat16 compute (8 mantissa bits) against float32


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ relative to ‖b‖, with a floor of 1e-6 per entry: attention key biases get a zero gradient
    (softmax is invariant to them), so in full fine-tuning they hold pure round-off (~1e-12)."""
    return ((a - b).norm() / (b.norm() + 1e-6 * b.numel() ** 0.5)).item()


def glue_argv(model: str, root: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--task_name", "sst2", "--train_file", str(root / "train.jsonl"),
            "--validation_file", str(root / "val.jsonl"), "--output_dir", str(out), "--per_device_train_batch_size",
            str(batch), "--max_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "1e-3", "--method",
            "lora-pro", "--lora_r", "4", "--disable_tqdm", "true", "--adam_epsilon", "1e-4", "--lora_dropout", "0",
            *extra]  # fmt: skip


def torchrun(argv: list[str], cwd: Path, port: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(port), "-m", "loralab.runners.glue", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
        )
    return proc.stdout + proc.stderr


def run_worker(
    runs: list[tuple[str, list[str]]], root: Path, port: int, env: dict[str, str] | None = None
) -> str:
    """Several ``(recipe, argv)`` trainings in one 2-process torchrun launch (runners_fsdp_worker.py);
    ``env``: extra environment (what ``accelerate launch`` would set)."""
    (root / "runs.json").write_text(json.dumps(runs))
    worker = Path(__file__).with_name("runners_fsdp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(port), str(worker), str(root / "runs.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout + proc.stderr


def records(out: Path, kind: str) -> list[dict]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == kind]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "adapter_model.safetensors"))


@pytest.fixture
def small_glue(tmp_path, helpers):
    from loralab.core.testing import save_tiny, tiny_roberta

    # no dropout: masks differ between ranks and one process
    model = save_tiny(
        tiny_roberta(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), tmp_path / "m"
    )
    helpers.write_jsonl(tmp_path / "train.jsonl", helpers.sst2_rows(32, 0))
    helpers.write_jsonl(tmp_path / "val.jsonl", helpers.sst2_rows(15, 1))  # odd: shards of 8 and 7
    return str(model), tmp_path


def test_fsdp_other_values_and_combinations_are_refused(small_glue):
    model, root = small_glue
    with pytest.raises(
        ValueError,
        match=r"--fsdp supports 'full_shard' or 'shard_grad_op' \(FSDP2\), optionally followed by "
        r"'offload' .*got 'hybrid_shard'",
    ):
        glue.main(glue_argv(model, root, root / "o1", 4, "--fsdp", "hybrid_shard"))
    with pytest.raises(
        ValueError, match="--fsdp shard_grad_op cannot be combined with --deepspeed"
    ):
        glue.main(
            glue_argv(
                model, root, root / "o4", 4, "--fsdp", "shard_grad_op", "--deepspeed", "zero2"
            )
        )
    with pytest.raises(ValueError, match="--fsdp full_shard cannot be combined with --deepspeed"):
        glue.main(
            glue_argv(model, root, root / "o2", 4, "--fsdp", "full_shard", "--deepspeed", "zero2")
        )
    with pytest.raises(ValueError, match="--fsdp full_shard cannot shard an 8-bit"):
        glue.main(
            glue_argv(model, root, root / "o3", 4, "--fsdp", "full_shard", "--load_in_8bit", "true")
        )


def _without_fsdp2(monkeypatch, method: str) -> None:
    # every fine-tuning method runs under FSDP2 now: the refusal of one that does not (a method whose
    # sharded_engines lacks "fsdp2") is tested on LoRA-XS with FSDP2 taken out of its engines
    cls = type(get_method(method))
    monkeypatch.setattr(cls, "sharded_engines", cls.sharded_engines - {"fsdp2"})


@pytest.mark.parametrize("method", ["lora-xs"])
def test_methods_not_yet_sharded_are_refused_under_fsdp(small_glue, helpers, monkeypatch, method):
    _without_fsdp2(monkeypatch, method)
    model, root = small_glue
    argv = ["--model_name_or_path", model, "--task_name", "sst2", "--train_file", str(root / "train.jsonl"),
            "--validation_file", str(root / "val.jsonl"), "--output_dir", str(root / method), "--max_steps", "1",
            "--method", method, *helpers.method_flags(method), "--fsdp", "full_shard"]  # fmt: skip
    with pytest.raises(
        MethodError, match=f"--method {method} does not run under --fsdp full_shard"
    ):
        glue.main(argv)


def test_sharded_engines_capability():
    for name in (
        *("lora", "lora-fa", "lora-pro", "full", "lora-ga", "lora-sb", "lora-xs", "galore"),
        "golore",
    ):
        get_method(name).check_engine("fsdp2", "--fsdp full_shard")
    assert get_method("lora-ga").zero_partitioning and get_method("lora-sb").zero_partitioning
    assert get_method("lora").zero_partitioning and get_method("full").zero_partitioning
    assert get_method("lora-pro").zero_partitioning and get_method("lora-fa").zero_partitioning
    assert get_method("galore").zero_partitioning and get_method("golore").zero_partitioning
    assert not get_method("golore-relora").zero_partitioning
    with pytest.raises(ValueError, match=r"engine must be one of .* got 'fsdp1'"):
        get_method("lora").check_engine("fsdp1", "--fsdp")


def test_every_rank_prints_its_engine(small_glue):
    from loralab.runners.arguments import parse_args
    from loralab.runners.glue import GlueArgs
    from loralab.runners.loop.engine import engine_line
    from loralab.runners.loop.finetune import build_engine

    model, root = small_glue
    args = parse_args(GlueArgs, glue_argv(model, root, root / "e", 4))
    line = engine_line(build_engine(args))
    assert line == "[loralab.runners] rank 0/1: engine accelerate (NO) on cpu"
    engine = object.__new__(FSDP2Engine)  # the FSDP2 line without a process group
    engine.rank, engine.world_size, engine.device = 1, 2, torch.device("cpu")
    engine.bf16, engine.reshard_after_forward, engine.launcher = True, False, "accelerate"
    engine.offload = False
    assert engine_line(engine) == (
        "[loralab.runners] rank 1/2: engine fsdp2 (fully_shard, no reshard after forward, bf16 "
        "params, fp32 reduce; launched by accelerate) on cpu"
    )
    engine.offload = True  # fsdp_offload_params / --fsdp "shard_grad_op offload"
    assert engine_line(engine) == (
        "[loralab.runners] rank 1/2: engine fsdp2 (fully_shard, no reshard after forward, bf16 "
        "params, fp32 reduce, parameters offloaded to cpu; launched by accelerate) on cpu"
    )


def test_fsdp2_engine_needs_a_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match=r"--fsdp full_shard needs a launcher .*torchrun"):
        FSDP2Engine()


def test_prepare_refuses_a_model_that_was_not_sharded(monkeypatch):
    engine = object.__new__(FSDP2Engine)  # no process group needed to reach the check
    with pytest.raises(
        RuntimeError, match=r"call engine.shard\(model\) before building its optimizer"
    ):
        engine.prepare(torch.nn.Linear(2, 2), None)


def test_accelerate_fsdp_plugin_is_refused(monkeypatch):
    import types

    import accelerate

    from loralab.runners.loop.finetune import build_accelerator

    class FakeAccelerator:  # what `accelerate launch` with an FSDP YAML builds
        def __init__(self, **kw):
            self.state = types.SimpleNamespace(fsdp_plugin=object(), deepspeed_plugin=None)

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    args = types.SimpleNamespace(deepspeed=None, gradient_accumulation_steps=1, bf16=False, report_to="none",
                                 per_device_train_batch_size=2, max_grad_norm=1.0)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"accelerate launch with an FSDP config .* --fsdp full_shard"
    ):
        build_accelerator(args)


# what `accelerate launch --config_file configs/accelerate/fsdp2.yaml` puts in each process's environment
FSDP_YAML_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "ACCELERATE_MIXED_PRECISION": "no",
}


@pytest.mark.parametrize(
    ("env", "extra", "message"),
    [
        ({"FSDP_VERSION": "1"}, [], r"only FSDP2 is supported, set fsdp_version: 2, got fsdp_version 1"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, ["--method", "lora-xs", "--lora_r", "4"], r"fsdp_cpu_ram_efficient_loading builds the model without weights .* --method lora-xs computes its adapters from the weights"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, ["--load_in_4bit", "true"], r"fsdp_cpu_ram_efficient_loading does not load a quantized base \(--load_in_4bit\)"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, [], r"fsdp_activation_checkpointing is not supported \(use --gradient_checkpointing true\)"),
        ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, [], r"must be TRANSFORMER_BASED_WRAP .*got fsdp_auto_wrap_policy SIZE_BASED_WRAP"),
        ({"FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}, [], r"must be SHARDED_STATE_DICT .*got fsdp_state_dict_type FULL_STATE_DICT"),
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, [], r"mixed_precision must be 'no' or 'bf16', got 'fp16'"),
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, [], r"has mixed_precision: bf16: pass --bf16 true, got --bf16 false"),
        ({}, ["--fsdp", "full_shard"], r"already shards with FSDP2: drop --fsdp, got --fsdp full_shard"),
        ({}, ["--deepspeed", "zero2"], r"accelerate launch with an FSDP config .* cannot be combined with --deepspeed"),
    ],
)  # fmt: skip
def test_accelerate_fsdp_yaml_settings_it_cannot_honour_are_refused(
    small_glue, monkeypatch, env, extra, message
):
    model, root = small_glue
    for k, v in {**FSDP_YAML_ENV, **env}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        glue.main(glue_argv(model, root, root / "o", 4, *extra))


def test_accelerate_fsdp_yaml_is_read_and_refuses_unsharded_methods(
    small_glue, helpers, monkeypatch
):
    from loralab.runners.launch import FSDPLaunch, accelerate_fsdp

    assert accelerate_fsdp() is None  # not launched by accelerate with an FSDP config
    _without_fsdp2(monkeypatch, "lora-xs")
    model, root = small_glue
    for k, v in FSDP_YAML_ENV.items():
        monkeypatch.setenv(k, v)
    assert accelerate_fsdp() == FSDPLaunch(reshard_after_forward=True, wrap_classes=None)
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "RobertaLayer,RobertaEmbeddings")
    assert accelerate_fsdp() == FSDPLaunch(False, ("RobertaLayer", "RobertaEmbeddings"))
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")  # FSDP2's CPUOffloadPolicy
    assert accelerate_fsdp().offload_params is True
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")  # rank 0 loads, the others on meta
    assert accelerate_fsdp().cpu_ram_efficient_loading is True
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    argv = ["--model_name_or_path", model, "--task_name", "sst2", "--train_file", str(root / "train.jsonl"),
            "--validation_file", str(root / "val.jsonl"), "--output_dir", str(root / "xs"), "--max_steps", "1",
            "--method", "lora-xs", *helpers.method_flags("lora-xs")]  # fmt: skip
    with pytest.raises(
        MethodError,
        match=r"--method lora-xs does not run under accelerate launch with an FSDP config",
    ):
        glue.main(argv)


def test_metamath_evaluation_only_refuses_fsdp(small_glue, monkeypatch):
    from loralab.runners import metamath

    model, root = small_glue
    argv = ["--model_name_or_path", model, "--train_file", "x.json", "--eval_file", "y.jsonl", "--output_dir",
            str(root / "mm"), "--do_train", "false"]  # fmt: skip
    with pytest.raises(ValueError, match=r"^--fsdp full_shard shards training; --do_train false"):
        metamath.main([*argv, "--fsdp", "full_shard"])
    for k, v in FSDP_YAML_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(
        ValueError, match=r"^accelerate launch with an FSDP config .* shards training"
    ):
        metamath.main(argv)


def test_fsdp2_engine_refuses_wrap_classes_the_model_lacks():
    engine = object.__new__(FSDP2Engine)  # no process group needed to reach the check
    engine.bf16, engine.reshard_after_forward, engine.device = False, True, torch.device("cpu")
    engine.wrap_classes, engine.offload, engine.rank0_loading = ("LlamaDecoderLayer",), False, False
    with pytest.raises(
        ValueError,
        match=r"fsdp_transformer_layer_cls_to_wrap names classes the model does not have: \['LlamaDecoderLayer'\]",
    ):
        engine.shard(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_glue_lora_pro_fsdp_two_ranks_equal_one_process_and_resume_exactly(small_glue, helpers):
    model, root = small_glue
    single = root / "single"
    expected = glue.main(glue_argv(model, root, single, 4))
    out = root / "fsdp"
    log = torchrun(glue_argv(model, root, out, 2, "--fsdp", "full_shard", "--save_steps", "2"), root,
                   helpers.free_port())  # fmt: skip
    for r in (0, 1):  # every rank says which engine ran
        assert (
            f"[loralab.runners] rank {r}/2: engine fsdp2 (fully_shard, reshard after forward; launched by torchrun) on cpu"
            in log
        )
    launch = json.loads((out / "launch.json").read_text())
    assert (launch["engine"], launch["num_processes"], launch["backend"]) == ("fsdp2", 2, "gloo")
    got = [r["loss"] for r in records(out, "train")]
    want = [r["loss"] for r in records(single, "train")]
    assert len(got) == STEPS and got == pytest.approx(want, rel=LOSS_RTOL)
    assert abs(want[1] - want[0]) > 100 * LOSS_RTOL * abs(want[0])  # the updates moved the loss
    assert records(out, "summary")[0]["eval_accuracy"] == expected["accuracy"]
    assert records(out, "summary")[0]["eval_num_examples"] == 15
    a, b = adapter(out), adapter(single)
    assert sorted(a) == sorted(b)
    for k in b:
        assert rel_error(a[k], b[k]) < ADAPTER_RTOL, k
    # final/ reloads the bare way onto the original base
    reloaded = helpers.reload_final(model, out / "final", "AutoModelForSequenceClassification")
    assert any("lora_B" in n for n, _ in reloaded.named_parameters())

    # interrupted after the checkpoint at step 2: resuming gives the uninterrupted run's adapter exactly
    resumed = root / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("final"))
    assert sorted(p.name for p in (resumed / "checkpoint-2").iterdir()) == [
        "model", "optimizer_rank0.pt", "optimizer_rank1.pt", "rng_state_rank0.pt", "rng_state_rank1.pt",
        "scheduler.pt", "trainer_state.json",
    ]  # fmt: skip
    torchrun(glue_argv(model, root, resumed, 2, "--fsdp", "full_shard", "--save_steps", "2",
                       "--resume_from_checkpoint", "latest"), root, helpers.free_port())  # fmt: skip
    c = adapter(resumed)
    assert all(torch.equal(c[k], a[k]) for k in a)
    assert [r["loss"] for r in records(resumed, "train")][-1] == got[-1]


def _method_argv(
    model: str, root: Path, out: Path, batch: int, method: str, *extra: str
) -> list[str]:
    argv = glue_argv(model, root, out, batch, *extra)
    argv[argv.index("lora-pro")] = method
    if method in ("full", "galore", "golore"):  # no adapter options
        for flag in ("--lora_r", "--lora_dropout"):
            i = argv.index(flag)
            del argv[i : i + 2]
    return argv


@pytest.mark.multiprocess
@pytest.mark.slow
def test_glue_lora_lora_fa_and_full_fine_tuning_under_fsdp_equal_one_process(small_glue, helpers):
    # torch's AdamW on the DTensor shards (lora, full) and LoRA-FA's optimizer (gathers A), one launch;
    # full fine-tuning under --fsdp shard_grad_op (gathered weights kept from forward to backward)
    model, root = small_glue
    # LoRA-XS: its frozen factors from each whole weight's SVD before sharding, only R trains
    methods = ("lora", "lora-fa", "full", "lora-xs")
    mode = {
        "lora": "full_shard",
        "lora-fa": "full_shard",
        "full": "shard_grad_op",
        "lora-xs": "full_shard",
    }
    flags = {m: helpers.method_flags(m) if m == "lora-xs" else [] for m in methods}
    runs = [
        _method_argv(model, root, root / "fsdp" / m, 2, m, *flags[m], "--fsdp", mode[m])
        for m in methods
    ]
    # bf16 under FSDP2's MixedPrecisionPolicy (bfloat16 compute, float32 reduction and master weights)
    bf16 = ["--fsdp", "full_shard", "--bf16", "true"]
    runs.append(_method_argv(model, root, root / "fsdp" / "lora-bf16", 2, "lora", *bf16))
    log = run_worker([("glue", argv) for argv in runs], root, helpers.free_port())
    for m in methods:
        single = root / "single" / m
        expected = glue.main(_method_argv(model, root, single, 4, m, *flags[m]))
        out = root / "fsdp" / m
        got = [r["loss"] for r in records(out, "train")]
        want = [r["loss"] for r in records(single, "train")]
        assert got == pytest.approx(want, rel=LOSS_RTOL), m
        assert abs(want[1] - want[0]) > 100 * LOSS_RTOL * abs(want[0]), m
        assert records(out, "summary")[0]["eval_accuracy"] == expected["accuracy"], m
        final = "adapter_model.safetensors" if m != "full" else "model.safetensors"
        from safetensors.torch import load_file

        a, b = load_file(str(out / "final" / final)), load_file(str(single / "final" / final))
        assert sorted(a) == sorted(b), m
        err = max(rel_error(a[k], b[k]) for k in b)
        assert err < ADAPTER_RTOL, (m, err)
        launch = json.loads((out / "launch.json").read_text())
        assert launch["reshard_after_forward"] is (mode[m] == "full_shard"), m
    assert "engine fsdp2 (fully_shard, no reshard after forward; launched by torchrun)" in log
    out = root / "fsdp" / "lora-bf16"
    launch = json.loads((out / "launch.json").read_text())
    assert launch["mixed_precision"] == "bf16 (param bfloat16, reduce float32)"
    assert (
        "engine fsdp2 (fully_shard, reshard after forward, bf16 params, fp32 reduce; launched by torchrun)"
        in log
    )
    got = [r["loss"] for r in records(out, "train")]
    want = [r["loss"] for r in records(root / "single" / "lora", "train")]
    assert got == pytest.approx(want, rel=BF16_LOSS_RTOL)
    from safetensors.torch import load_file

    a = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in a.values())  # the master weights stay float32


@pytest.mark.multiprocess
@pytest.mark.slow
def test_glue_lora_ga_and_lora_sb_under_fsdp_equal_one_process(small_glue, helpers):
    # the gradient-based inits run on the sharded model (each rank estimates on its own init batches,
    # FSDP2's reduce-scatter averages them, each rank writes its rows of the factors and of LoRA-GA's
    # offset W0), then training runs as LoRA's FSDP2 path; final/ holds the same adapters as one process
    from safetensors.torch import load_file

    model, root = small_glue
    methods = ("lora-ga", "lora-sb")
    # key/value: their gradients have full rank. The last layer's FFN and query see only the <s> token
    # the classifier reads, so their gradient has rank <= 8 (the examples, some identical): LoRA-GA's
    # singular vectors r..2r then span a near-null space that float32 round-off turns (measured: 1.4e-2
    # relative in B0 of layer.1.output.dense between 2 ranks and one process, losses still to 1e-5)
    kv = ["--target_modules", "key,value"]
    small = {"lora-ga": ["--ga_iters", "2", *kv], "lora-sb": ["--sb_num_batches", "2", *kv]}
    runs = [
        _method_argv(model, root, root / "fsdp" / m, 2, m, *small[m], "--fsdp", "full_shard")
        for m in methods
    ]
    run_worker([("glue", argv) for argv in runs], root, helpers.free_port())
    for m in methods:
        single = root / "single" / m
        expected = glue.main(_method_argv(model, root, single, 4, m, *small[m]))
        out = root / "fsdp" / m
        got = [r["loss"] for r in records(out, "train")]
        want = [r["loss"] for r in records(single, "train")]
        assert len(got) == STEPS and got == pytest.approx(want, rel=LOSS_RTOL), m
        assert abs(want[-1] - want[0]) > 100 * LOSS_RTOL * abs(want[0]), m
        assert records(out, "summary")[0]["eval_accuracy"] == expected["accuracy"], m
        # the parameters after the steps: LoRA-GA's rank-2r export holds the trained A, B and the
        # initial A0, B0; LoRA-SB's plain export holds A and B·R, its native adapter R
        pairs = [("adapter_model.safetensors",)]
        if m == "lora-sb":
            pairs.append(("lora_sb_native", "adapter_model.safetensors"))
        for parts in pairs:
            a = load_file(str(out.joinpath("final", *parts)))
            b = load_file(str(single.joinpath("final", *parts)))
            assert sorted(a) == sorted(b), (m, parts)
            err = max(rel_error(a[k], b[k]) for k in b)
            assert err < INIT_ADAPTER_RTOL, (m, parts, err)
        # final/ reloads the bare way onto the original base, as the one-process run's
        reloaded = helpers.reload_final(model, out / "final", "AutoModelForSequenceClassification")
        assert any("lora_B" in n for n, _ in reloaded.named_parameters()), m


@pytest.mark.multiprocess
@pytest.mark.slow
def test_metamath_and_winogrande_under_fsdp_equal_one_process(tiny_dirs, tmp_path, helpers):
    # odd evaluation sets (5 GSM8K questions: generation with synced forwards; 7 WinoGrande examples):
    # the shorter shard is padded, and the gathered predictions equal one process's
    from loralab.runners import metamath, winogrande

    pairs = [(a, b) for a in range(5, 10) for b in range(5, 10)][
        :24
    ]  # two-digit sums: equal lengths
    train = [{"query": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}.\nThe answer is: {a + b}",
              "type": "GSM_Rephrased", "original_question": f"What is {a} plus {b}?"} for a, b in pairs]  # fmt: skip
    (tmp_path / "MetaMathQA-395K.json").write_text(json.dumps(train))
    gsm8k = helpers.write_jsonl(tmp_path / "gsm8k_test.jsonl", helpers.gsm8k_rows(5, 1))
    rows = [r for r in helpers.winogrande_rows(64, 0) if r["sentence"].endswith("_ sank.")]
    assert len(rows) >= 23
    wg_train = helpers.write_jsonl(tmp_path / "wg_train.jsonl", rows[:16])
    wg_dev = helpers.write_jsonl(tmp_path / "wg_dev.jsonl", rows[16:23])

    def mm(out: Path, batch: int, *extra: str) -> list[str]:
        return ["--model_name_or_path", tiny_dirs["llama"], "--train_file", str(tmp_path / "MetaMathQA-395K.json"),
                "--eval_file", gsm8k, "--output_dir", str(out), "--per_device_train_batch_size", str(batch),
                "--per_device_eval_batch_size", "2", "--max_steps", str(STEPS), "--logging_steps", "1",
                "--learning_rate", "1e-3", "--max_length", "96", "--max_new_tokens", "4", "--prompt_template", "qa",
                "--method", "lora-fa", "--lora_r", "4", "--lora_dropout", "0", "--adam_epsilon", "1e-4",
                "--disable_tqdm", "true", *extra]  # fmt: skip

    def wg(out: Path, batch: int, *extra: str) -> list[str]:
        return ["--model_name_or_path", tiny_dirs["llama"], "--train_file", wg_train, "--validation_file", wg_dev,
                "--output_dir", str(out), "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size",
                "2", "--max_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "1e-3", "--method",
                "lora-pro", "--lora_r", "4", "--lora_dropout", "0", "--adam_epsilon", "1e-4", "--disable_tqdm",
                "true", *extra]  # fmt: skip

    fsdp = ["--fsdp", "full_shard"]
    run_worker(
        [
            ("metamath", mm(tmp_path / "mm", 2, *fsdp)),
            ("winogrande", wg(tmp_path / "wg", 2, *fsdp)),
        ],
        tmp_path,
        helpers.free_port(),
    )
    mm_single = metamath.main(mm(tmp_path / "mm1", 4))
    wg_single = winogrande.main(wg(tmp_path / "wg1", 4))
    for out, single, expected in (("mm", "mm1", mm_single), ("wg", "wg1", wg_single)):
        got = [r["loss"] for r in records(tmp_path / out, "train")]
        want = [r["loss"] for r in records(tmp_path / single, "train")]
        assert len(got) == STEPS and got == pytest.approx(want, rel=LOSS_RTOL), out
        summary = records(tmp_path / out, "summary")[0]
        assert summary["eval_accuracy"] == expected["accuracy"], out
    for out, single, name in (
        ("mm", "mm1", metamath.PREDICTIONS_FILE),
        ("wg", "wg1", winogrande.PREDICTIONS_FILE),
    ):
        got = [json.loads(r) for r in (tmp_path / out / name).read_text().splitlines()]
        want = [json.loads(r) for r in (tmp_path / single / name).read_text().splitlines()]
        assert len(got) == len(want) == (5 if out == "mm" else 7)
        key = "completion" if out == "mm" else "prediction"
        assert [r[key] for r in got] == [r[key] for r in want], out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_glue_galore_and_golore_under_fsdp_equal_one_process_and_resume_exactly(
    small_glue, helpers
):
    # full fine-tuning with the projected optimizers on the row shards: a refresh at steps 0 (SVD)
    # and 2 (SVD for GaLore, random for GoLore: rand_ratio 0.5 of 3 steps)
    model, root = small_glue
    flags = {
        "galore": ["--galore_rank", "4", "--update_proj_gap", "2"],
        "golore": ["--galore_rank", "4", "--update_proj_gap", "2", "--rand_ratio", "0.5"],
    }
    fsdp = ["--fsdp", "full_shard", "--save_steps", "2"]
    runs = [_method_argv(model, root, root / "fsdp" / m, 2, m, *f, *fsdp) for m, f in flags.items()]
    log = run_worker([("glue", argv) for argv in runs], root, helpers.free_port())
    assert "engine fsdp2 (fully_shard, reshard after forward; launched by torchrun)" in log
    from safetensors.torch import load_file

    for m, f in flags.items():
        single = root / "single" / m
        expected = glue.main(_method_argv(model, root, single, 4, m, *f))
        out = root / "fsdp" / m
        got = [r["loss"] for r in records(out, "train")]
        want = [r["loss"] for r in records(single, "train")]
        assert len(got) == STEPS and got == pytest.approx(want, rel=LOSS_RTOL), m
        assert abs(want[1] - want[0]) > 100 * LOSS_RTOL * abs(want[0]), m
        assert records(out, "summary")[0]["eval_accuracy"] == expected["accuracy"], m
        a = load_file(str(out / "final" / "model.safetensors"))
        b = load_file(str(single / "final" / "model.safetensors"))
        assert sorted(a) == sorted(b), m
        err = max(rel_error(a[k], b[k]) for k in b)
        assert err < GALORE_RTOL, (m, err)

    # interrupted after the checkpoint at step 2 (projectors, moments and step counters in each
    # rank's optimizer file): resuming gives the uninterrupted run's losses and weights exactly
    resumed = root / "resumed"
    shutil.copytree(root / "fsdp" / "galore", resumed, ignore=shutil.ignore_patterns("final"))
    state = torch.load(resumed / "checkpoint-2" / "optimizer_rank1.pt", weights_only=True)
    keys = {k for st in state["state"].values() for k in st}
    assert {"proj_right", "proj_left", "exp_avg", "step"} <= keys
    argv = _method_argv(model, root, resumed, 2, "galore", *flags["galore"], *fsdp,
                        "--resume_from_checkpoint", "latest")  # fmt: skip
    torchrun(argv, root, helpers.free_port())
    got = [r["loss"] for r in records(root / "fsdp" / "galore", "train")]
    assert [r["loss"] for r in records(resumed, "train")][-1] == got[-1]
    a = load_file(str(root / "fsdp" / "galore" / "final" / "model.safetensors"))
    c = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(c[k], a[k]) for k in a)


# --fsdp "full_shard offload" (FSDP2's CPUOffloadPolicy): the shards, their gradients and every
# optimizer's state and step on the CPU. On these CPU ranks the arithmetic is the run without offload's,
# so each method is compared with it bit for bit: torch's AdamW (lora), LoRA-FA and LoRA-Pro (gathered
# factors), GoLore (row-shard projections), LoRA-GA's and LoRA-SB's inits (estimated on the offloaded
# shards), LoRA-XS, full fine-tuning; GoLore also resumes from its step-2 checkpoint. GaLore 8-bit
# (owner ranks): the C4 runner's test
OFFLOAD_RUNS = {
    "lora": [],
    "lora-fa": [],
    "lora-pro": [],
    "golore": ["--galore_rank", "4", "--update_proj_gap", "2", "--rand_ratio", "0.5"],
    "lora-ga": ["--ga_iters", "2", "--target_modules", "key,value"],
    "lora-sb": ["--sb_num_batches", "2", "--target_modules", "key,value"],
    "lora-xs": ["--lora_r", "4"],
    "full": [],
}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_glue_fsdp_cpu_offload_equals_fsdp_for_every_method_family_and_resumes(small_glue, helpers):
    from safetensors.torch import load_file

    model, root = small_glue
    runs = []
    for m, f in OFFLOAD_RUNS.items():
        for mode in ("full_shard", "full_shard offload"):
            out = root / mode.replace(" ", "_") / m
            runs.append(
                (
                    "glue",
                    _method_argv(model, root, out, 2, m, *f, "--fsdp", mode, "--save_steps", "2"),
                )
            )
    # GoLore's offloaded run as one interrupted after its step-2 checkpoint (no final/, no
    # checkpoint-3), resumed under offload in the same launch
    uninterrupted, resumed = root / "full_shard_offload" / "golore", root / "resumed"
    golore = _method_argv(model, root, resumed, 2, "golore", *OFFLOAD_RUNS["golore"], "--fsdp",
                          "full_shard offload", "--save_steps", "2")  # fmt: skip
    runs += [("copy_run", [str(uninterrupted), str(resumed)]),
             ("glue", [*golore, "--resume_from_checkpoint", "latest"])]  # fmt: skip
    log = run_worker(runs, root, helpers.free_port())
    # every rank of every offloaded run (and of the resumed one) names the offload
    assert (
        log.count("reshard after forward, parameters offloaded to cpu; launched by torchrun") == 18
    )
    for m in OFFLOAD_RUNS:
        plain, off = root / "full_shard" / m, root / "full_shard_offload" / m
        assert json.loads((off / "launch.json").read_text())["offload"] == "cpu (CPUOffloadPolicy)"
        got = [r["loss"] for r in records(off, "train")]
        assert len(got) == STEPS and got == [r["loss"] for r in records(plain, "train")], m
        final = "model.safetensors" if m in ("golore", "full") else "adapter_model.safetensors"
        a, b = load_file(str(off / "final" / final)), load_file(str(plain / "final" / final))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b), m
    assert f"resumed from {resumed / 'checkpoint-2'} at step 2" in log
    assert [r["loss"] for r in records(resumed, "train")][-1] == got_last(uninterrupted)
    a = load_file(str(resumed / "final" / "model.safetensors"))
    b = load_file(str(uninterrupted / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def got_last(out: Path) -> float:
    return [r["loss"] for r in records(out, "train")][-1]


def launch(cmd: list[str], cwd: Path, timeout: int = TIMEOUT) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout + proc.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_glue_lora_and_galore_under_accelerate_fsdp2_yaml_equal_one_process(small_glue, helpers):
    # `accelerate launch --config_file configs/accelerate/fsdp2.yaml`: the plugin's settings, the same
    # FSDP2 engine as --fsdp full_shard (sharded before the method's optimizer is built); LoRA with
    # torch's AdamW on the DTensor shards, GaLore's projected optimizer on the row shards
    from safetensors.torch import load_file

    model, root = small_glue
    flags = {"lora": [], "galore": ["--galore_rank", "4", "--update_proj_gap", "2"]}
    runs = [
        ("glue", _method_argv(model, root, root / "acc" / m, 2, m, *f)) for m, f in flags.items()
    ]
    (root / "runs.json").write_text(json.dumps(runs))
    yaml_path = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp2.yaml"
    worker = Path(__file__).with_name("runners_fsdp_worker.py")
    log = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml_path),
                  "--num_processes", "2", "--main_process_port", str(helpers.free_port()), str(worker),
                  str(root / "runs.json")], root)  # fmt: skip
    for r in (0, 1):  # every rank says which engine ran, its reshard policy and the launcher
        assert (
            f"[loralab.runners] rank {r}/2: engine fsdp2 (fully_shard, reshard after forward; "
            "launched by accelerate) on cpu"
        ) in log
    for m, f in flags.items():
        out, single = root / "acc" / m, root / "single" / m
        launch_info = json.loads((out / "launch.json").read_text())
        assert (launch_info["engine"], launch_info["launcher"], launch_info["num_processes"]) == (
            "fsdp2", "accelerate", 2,
        )  # fmt: skip
        expected = glue.main(_method_argv(model, root, single, 4, m, *f))
        got = [r["loss"] for r in records(out, "train")]
        want = [r["loss"] for r in records(single, "train")]
        assert len(got) == STEPS and got == pytest.approx(want, rel=LOSS_RTOL), m
        assert abs(want[1] - want[0]) > 100 * LOSS_RTOL * abs(want[0]), m
        assert records(out, "summary")[0]["eval_accuracy"] == expected["accuracy"], m
        name = "adapter_model.safetensors" if m == "lora" else "model.safetensors"
        a, b = load_file(str(out / "final" / name)), load_file(str(single / "final" / name))
        assert sorted(a) == sorted(b), m
        err = max(rel_error(a[k], b[k]) for k in b)
        assert err < (ADAPTER_RTOL if m == "lora" else GALORE_RTOL), (m, err)
        # final/ reloads the bare way (PeftModel on the original base; AutoModel for full weights)
        reloaded = helpers.reload_final(model, out / "final", "AutoModelForSequenceClassification")
        got_sd = {k: v for k, v in reloaded.state_dict().items()}
        if m == "galore":
            assert all(torch.equal(got_sd[k], a[k]) for k in a if k in got_sd)
        else:
            assert any("lora_B" in n for n, _ in reloaded.named_parameters())


def test_fsdp2_offload_refuses_a_process_group_that_cannot_reduce_cpu_shards(monkeypatch):
    # on GPUs the runner makes its process group "cuda:nccl,cpu:gloo"; one made elsewhere with NCCL
    # alone could not reduce the offloaded (CPU) shards: refused before any model is sharded
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    with pytest.raises(
        RuntimeError, match=r"FSDP2 CPU offload needs a process group that reduces CPU"
    ):
        FSDP2Engine(offload=True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accelerate_fsdp2_cpu_ram_efficient_loading_loads_on_rank0_only_and_trains_the_same(
    small_glue, tiny_dirs, tmp_path, helpers
):
    # fsdp_cpu_ram_efficient_loading: true (accelerate's YAML; here its environment under torchrun):
    # transformers loads the weights on rank 0 only and builds rank 1's model on the meta device; the
    # engine shards on the meta device and fills both ranks' shards from rank 0. Every method family
    # on GLUE (LoRA with a new head initialised on rank 0, LoRA-GA / LoRA-SB with their inits
    # estimated after the broadcast, ...) and LoRA on MetaMath's Llama (rotary buffers not in the
    # state dict: broadcast) equal the same runs loaded on every rank (--fsdp full_shard), bit for bit
    from safetensors.torch import load_file

    model, root = small_glue
    flags = {
        "lora": [],
        "lora-ga": ["--ga_iters", "2", "--target_modules", "key,value"],
        "golore": ["--galore_rank", "4", "--update_proj_gap", "2", "--rand_ratio", "0.5"],
        # and the other families: LoRA-FA (A frozen), LoRA-Pro, LoRA-SB (its init after the
        # broadcast), full fine-tuning
        "lora-fa": [],
        "lora-pro": [],
        "lora-sb": ["--sb_num_batches", "2", "--target_modules", "key,value"],
        "full": [],
    }
    rows = [
        {"query": f"What is {a} plus {a}?", "response": f"The answer is: {2 * a}"} for a in range(8)
    ]
    (root / "MetaMathQA-395K.json").write_text(json.dumps(rows))
    gsm8k = helpers.write_jsonl(root / "gsm8k_test.jsonl", helpers.gsm8k_rows(3, 1))
    llama = ["--model_name_or_path", tiny_dirs["llama"], "--train_file", str(root / "MetaMathQA-395K.json"),
             "--eval_file", gsm8k, "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
             "--max_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "1e-3", "--max_length", "64",
             "--max_new_tokens", "2", "--prompt_template", "qa", "--method", "lora", "--lora_r", "4",
             "--lora_dropout", "0", "--disable_tqdm", "true"]  # fmt: skip

    def runs(kind: str, fsdp: list[str]) -> list[tuple[str, list[str]]]:
        out = [
            ("glue", _method_argv(model, root, root / kind / m, 2, m, *f, *fsdp))
            for m, f in flags.items()
        ]
        return [*out, ("metamath", [*llama, "--output_dir", str(root / kind / "metamath"), *fsdp])]

    run_worker(runs("every_rank", ["--fsdp", "full_shard"]), root, helpers.free_port())
    env = {**FSDP_YAML_ENV, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    log = run_worker(runs("rank0", []), root, helpers.free_port(), env=env)
    # rank 1 built every model on the meta device; rank 0 loaded them
    assert log.count("rank 1: 0 of ") == 8 and "rank 0: 0 of " not in log, log[-3000:]
    for m in (*flags, "metamath"):
        one, two = root / "rank0" / m, root / "every_rank" / m
        assert json.loads((one / "launch.json").read_text())["rank0_loading"] is True, m
        assert [r["loss"] for r in records(one, "train")] == [
            r["loss"] for r in records(two, "train")
        ], m
        final = "model.safetensors" if m in ("golore", "full") else "adapter_model.safetensors"
        a, b = load_file(str(one / "final" / final)), load_file(str(two / "final" / final))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b), m


@pytest.mark.multiprocess
def test_a_slower_rank_does_not_refuse_the_output_dir_of_the_next_run_in_one_launch(
    small_glue, helpers
):
    # two runs in one launch (the process group made once): rank 1 starts the second one 4 s late;
    # rank 0 used to write that run's run_config.json / launch.json before rank 1 had checked the
    # directory, which rank 1 then refused as "not empty" (seen in CI, 2026-12-05)
    model, root = small_glue
    first, second = root / "first", root / "second"
    runs = [
        ("glue", _method_argv(model, root, first, 2, "lora", "--fsdp", "full_shard")),
        ("slow_rank", ["4"]),
        ("glue", _method_argv(model, root, second, 2, "lora", "--fsdp", "full_shard")),
    ]
    run_worker(runs, root, helpers.free_port())
    assert (second / "final").is_dir() and (second / "launch.json").is_file()
