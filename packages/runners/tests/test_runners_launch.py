"""Launch configs and real multi-process runs.

The DeepSpeed JSON files equal the built-in configs and get their "auto" values from the flags; the
accelerate YAMLs load with accelerate's own reader. GLUE and MetaMath run with 2 CPU processes (gloo)
under the ``deepspeed`` launcher (ZeRO-2) and under ``accelerate launch`` (DDP, and DeepSpeed through the
accelerate plugin YAML); each run's losses equal one process's with the same global batch.

On a CPU-only machine ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate launches
several CPU processes only through an MPI hostfile), so the accelerate runs here use the multi-process
YAML (``--multi_gpu`` launch: torchrun underneath, gloo since there is no GPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loralab.runners import glue, metamath
from loralab.runners.launch import (
    DEEPSPEED_CONFIGS,
    fill_deepspeed_config,
    load_deepspeed_config,
    zero_stage,
)
from loralab.runners.methods import MethodError

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "packages" / "runners" / "configs"
TIMEOUT = 900  # seconds per launch; a launch takes ~30 s on an idle 2-core machine
STEPS = 2
# Step 2's loss is the first after an optimizer step on the all-reduced gradient: it must equal one process's
# to float32 reduction-order noise. Two things would make them differ for other reasons, and the runs here
# rule both out: (1) Adam's first steps are ~lr * sign(g), so reduction-order noise in near-zero gradient
# entries becomes whole-lr differences (seen: 2e-5 relative at step 2, 2e-4 at step 3 with the default eps
# 1e-8, identical for DDP and ZeRO-2): --adam_epsilon 1e-4 makes the update Lipschitz in g there; (2) a
# per-process mean over tokens weighs tokens differently from one process's mean when examples have
# different numbers of loss tokens: the causal-LM fixtures here have equal-length responses. Dropout is off
# (the models' own, and LoRA's 0.05 default): step 1's loss does not see LoRA dropout (B = 0), its gradient does.
ADAM_EPS = [
    "--adam_epsilon",
    "1e-4",
    "--lora_dropout",
    "0",
]  # LoRA dropout masks cannot match across process counts
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------- configs


def test_deepspeed_json_files_are_the_builtin_configs():
    for name, config in DEEPSPEED_CONFIGS.items():
        assert json.loads((CONFIGS / "deepspeed" / f"{name}.json").read_text()) == config, name
        assert load_deepspeed_config(
            str(CONFIGS / "deepspeed" / f"{name}.json")
        ) == load_deepspeed_config(name)
    assert [zero_stage(DEEPSPEED_CONFIGS[n]) for n in ("zero2", "zero3", "zero3_offload")] == [
        2,
        3,
        3,
    ]
    assert (
        DEEPSPEED_CONFIGS["zero3_offload"]["zero_optimization"]["offload_optimizer"]["device"]
        == "cpu"
    )


def test_auto_values_are_filled_from_the_flags():
    h = 64
    config = fill_deepspeed_config(
        load_deepspeed_config("zero3"),
        micro_batch_size=4,
        gradient_accumulation_steps=8,
        world_size=2,
        max_grad_norm=0.5,
        bf16=True,
        hidden_size=h,
    )
    assert (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
        config["train_batch_size"],
    ) == (4, 8, 64)
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is True
    zero = config["zero_optimization"]
    assert (
        zero["reduce_bucket_size"],
        zero["stage3_prefetch_bucket_size"],
        zero["stage3_param_persistence_threshold"],
    ) == (h * h, int(0.9 * h * h), 10 * h)
    assert "auto" not in json.dumps(config)
    # a value the runner has no flag for is named
    custom = {
        **load_deepspeed_config("zero2"),
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    }
    with pytest.raises(ValueError, match=r"cannot fill: optimizer\.params\.lr"):
        fill_deepspeed_config(
            custom,
            micro_batch_size=1,
            gradient_accumulation_steps=1,
            world_size=1,
            max_grad_norm=1.0,
            bf16=False,
        )
    with pytest.raises(FileNotFoundError, match="--deepspeed 'zero4' is neither a built-in config"):
        load_deepspeed_config("zero4")


def test_accelerate_yaml_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((CONFIGS / "accelerate").glob("*.yaml"))
    kinds = {
        f.stem: str(load_config_from_file(str(f)).distributed_type).split(".")[-1] for f in files
    }
    assert kinds == {
        "single_process": "NO",
        "multi_gpu": "MULTI_GPU",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
        "deepspeed_zero3_offload": "DEEPSPEED",
        "fsdp2": "FSDP",
        "fsdp2_offload": "FSDP",
    }
    offload = load_config_from_file(str(CONFIGS / "accelerate" / "fsdp2_offload.yaml"))
    assert offload.fsdp_config["fsdp_offload_params"] is True
    for stem in ("zero2", "zero3", "zero3_offload"):
        raw = yaml.safe_load((CONFIGS / "accelerate" / f"deepspeed_{stem}.yaml").read_text())
        # the plugin YAMLs point at the JSON files (path from the repository root)
        assert (
            raw["deepspeed_config"]["deepspeed_config_file"]
            == f"packages/runners/configs/deepspeed/{stem}.json"
        )


def test_method_that_needs_whole_matrices_refuses_zero():
    # every --method of the fine-tuning recipes runs under ZeRO (GaLore / GoLore gather each matrix to
    # an owner rank); C4's ReLoRA path (golore-relora) still needs the weights whole
    from loralab.runners.methods import get_method

    with pytest.raises(
        MethodError,
        match=r"--method golore-relora needs each weight's matrix .* ZeRO-2 \(--deepspeed zero2\)",
    ):
        get_method("golore-relora").check_zero(None, 2, "--deepspeed zero2")
    get_method("golore-relora").check_zero(None, 0, "--deepspeed zero0")  # stage 0: no partitioning


@pytest.mark.parametrize("name", ["lora-fa", "lora-pro", "galore", "golore"])
def test_method_with_its_own_optimizer_keeps_it_under_zero_cpu_offload(name: str):
    # accelerate swaps a client optimizer for DeepSpeedCPUAdam under offload_optimizer (and
    # deepspeed.initialize refuses any other): GaLore, LoRA-FA, LoRA-Pro and GoLore would silently
    # train plain Adam (a 2-rank GLUE run once differed from zero3 so). The check keeps the method's
    # optimizer on DeepSpeed's CPU partitions instead (2-rank runs: test_runners_zero_lora_methods.py)
    from loralab.runners.launch import load_deepspeed_config
    from loralab.runners.methods import get_method, method_args

    method = get_method(name)
    args = method_args(name, learning_rate=1e-3, max_steps=2)
    config = load_deepspeed_config("zero3_offload")
    method.check_zero(args, 3, "--deepspeed zero3_offload", config)
    assert config["zero_force_ds_cpu_optimizer"] is False
    config = load_deepspeed_config("zero3_offload")
    config["zero_optimization"].pop("offload_optimizer")  # parameters only: no optimizer swap
    method.check_zero(args, 3, "--deepspeed p.json", config)
    assert "zero_force_ds_cpu_optimizer" not in config
    # an explicit true would swap it: refused, naming the key
    config = {**load_deepspeed_config("zero3_offload"), "zero_force_ds_cpu_optimizer": True}
    with pytest.raises(
        MethodError,
        match=rf"--method {name} does not run with zero_force_ds_cpu_optimizer: true \(--deepspeed "
        r"x.json\).*DeepSpeed's CPU Adam \(plain Adam\); remove the key",
    ):
        method.check_zero(args, 3, "--deepspeed x.json", config)
    # NVMe: DeepSpeed swaps state whose layout it knows, not the method's
    for key in ("offload_optimizer", "offload_param"):
        config = load_deepspeed_config("zero3_offload")
        config["zero_optimization"][key] = {"device": "nvme", "nvme_path": "/tmp"}
        with pytest.raises(
            MethodError,
            match=rf"--method {name} does not run with DeepSpeed ZeRO offload to NVMe \(--deepspeed "
            rf"n.json: zero_optimization.{key} on nvme\).*offload to the CPU \(device: cpu",
        ):
            method.check_zero(args, 3, "--deepspeed n.json", config)
    method.check_zero(args, 3, "--deepspeed zero3", load_deepspeed_config("zero3"))


def test_zero_offload_keeps_sgd_and_lets_accelerate_run_adamw_as_cpu_adam():
    # DeepSpeedCPUAdam in adamw_mode is torch AdamW's update: accelerate's swap is kept for AdamW;
    # SGD is not Adam: the runner keeps torch's SGD on the CPU partitions
    from loralab.runners.launch import load_deepspeed_config
    from loralab.runners.methods import get_method, method_args

    for name in ("lora", "full", "lora-ga", "lora-sb"):
        config = load_deepspeed_config("zero3_offload")
        get_method(name).check_zero(method_args(name), 3, "--deepspeed zero3_offload", config)
        assert "zero_force_ds_cpu_optimizer" not in config, name
    config = load_deepspeed_config("zero3_offload")
    sgd = method_args("full", optim="sgd")
    get_method("full").check_zero(sgd, 3, "--deepspeed zero3_offload", config)
    assert config["zero_force_ds_cpu_optimizer"] is False
    # deepspeed.initialize without accelerate (the C4 runner) keeps every client optimizer, AdamW too
    config = load_deepspeed_config("zero3_offload")
    get_method("full").check_offload(
        method_args("full"), "--deepspeed_config c.json", config, cpu_adam_for_adamw=False
    )
    assert config["zero_force_ds_cpu_optimizer"] is False
    # NVMe optimizer state: DeepSpeed's own CPU Adam swaps it (AdamW), torch's SGD is refused
    config = load_deepspeed_config("zero3_offload")
    config["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    get_method("full").check_zero(method_args("full"), 3, "--deepspeed n.json", config)
    with pytest.raises(
        MethodError,
        match=r"--optim sgd does not run with DeepSpeed ZeRO offload to NVMe \(--deepspeed n.json: "
        r"zero_optimization.offload_optimizer on nvme\)",
    ):
        get_method("full").check_zero(sgd, 3, "--deepspeed n.json", config)


# ---------------------------------------------------------------- 2 CPU processes


def launch(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
        )


def deepspeed_cmd(port: int, module: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "--module",
        module,
    ]


def accelerate_cmd(port: int, config: str, module: str) -> list[str]:
    yaml_path = CONFIGS / "accelerate" / config
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml_path), "--num_processes", "2",
            "--main_process_port", str(port), "-m", module]  # fmt: skip


def losses(out: Path) -> list[float]:
    return [
        r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def assert_same_losses(out: Path, single_out: Path) -> None:
    got, want = losses(out), losses(single_out)
    assert len(got) == STEPS and got == pytest.approx(want, rel=LOSS_RTOL)
    assert abs(want[1] - want[0]) > 100 * LOSS_RTOL * abs(want[0]), (
        "the first update must move the loss well beyond the tolerance"
    )


def check_launch(out: Path, distributed_type: str, stage: int | None) -> None:
    info = json.loads((out / "launch.json").read_text())
    assert (info["num_processes"], info["backend"], info["distributed_type"]) == (
        2,
        "gloo",
        distributed_type,
    ), info
    if stage is None:
        assert info["deepspeed_config"] is None
    else:
        ds = info["deepspeed_config"]
        assert ds["zero_optimization"]["stage"] == stage
        # "auto" filled from the flags: 2 per process x 2 processes
        assert (
            ds["train_micro_batch_size_per_gpu"],
            ds["train_batch_size"],
            ds["gradient_clipping"],
        ) == (2, 4, 1.0)


@pytest.fixture(scope="module")
def roberta_no_dropout(tmp_path_factory):
    # dropout masks differ between ranks and a single process: without dropout the runs must agree
    from loralab.core.testing import save_tiny, tiny_roberta

    return str(
        save_tiny(
            tiny_roberta(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            tmp_path_factory.mktemp("rob") / "m",
        )
    )


def glue_args(model: str, files: dict, out: Path, batch: int) -> list[str]:
    return ["--model_name_or_path", model, "--task_name", "sst2", "--train_file", files["train"], "--validation_file", files["validation"],
            "--output_dir", str(out), "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "1e-3", "--method", "lora", "--lora_r", "4", "--disable_tqdm", "true", *ADAM_EPS]  # fmt: skip


def metamath_args(model: str, files: dict, out: Path, batch: int) -> list[str]:
    return ["--model_name_or_path", model, "--train_file", files["train"], "--eval_file", files["eval"], "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "4", "--max_steps", str(STEPS),
            "--logging_steps", "1", "--learning_rate", "1e-3", "--max_length", "96", "--max_new_tokens", "4", "--prompt_template", "qa",
            "--method", "lora", "--lora_r", "4", "--disable_tqdm", "true", *ADAM_EPS]  # fmt: skip


@pytest.fixture(scope="module")
def equal_length_metamath(tmp_path_factory, helpers):
    # MetaMathQA / GSM8K formats; every sum has two digits, so every response has the same number of tokens
    root = tmp_path_factory.mktemp("mm_equal")
    pairs = [(a, b) for a in range(5, 10) for b in range(5, 10)][:24]
    train = [{"query": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}.\nThe answer is: {a + b}", "type": "GSM_Rephrased",
              "original_question": f"What is {a} plus {b}?"} for a, b in pairs]  # fmt: skip
    (root / "MetaMathQA-395K.json").write_text(json.dumps(train))
    return {
        "train": str(root / "MetaMathQA-395K.json"),
        "eval": helpers.write_jsonl(root / "gsm8k_test.jsonl", helpers.gsm8k_rows(6, 1)),
    }


@pytest.fixture(scope="module")
def glue_single(roberta_no_dropout, glue_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("glue_single")
    metrics = glue.main(glue_args(roberta_no_dropout, glue_files, out, batch=4))
    return out, metrics


@pytest.fixture(scope="module")
def metamath_single(tiny_dirs, equal_length_metamath, tmp_path_factory):
    out = tmp_path_factory.mktemp("metamath_single")
    metrics = metamath.main(metamath_args(tiny_dirs["llama"], equal_length_metamath, out, batch=4))
    return out, metrics


def final_metrics(out: Path) -> dict:
    return next(
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "summary"
    )


@pytest.mark.multiprocess
def test_glue_deepspeed_launcher_zero2_two_ranks_equal_one_process(
    roberta_no_dropout, glue_files, glue_single, tmp_path, helpers
):
    out = tmp_path / "ds"
    launch(
        [
            *deepspeed_cmd(helpers.free_port(), "loralab.runners.glue"),
            *glue_args(roberta_no_dropout, glue_files, out, 2),
            "--deepspeed",
            "zero2",
        ],
        tmp_path,
    )
    check_launch(out, "DEEPSPEED", 2)
    single_out, single_metrics = glue_single
    assert_same_losses(out, single_out)
    assert final_metrics(out)["eval_accuracy"] == single_metrics["accuracy"]
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.multiprocess
def test_glue_accelerate_launch_two_processes_equal_one_process(
    roberta_no_dropout, glue_files, glue_single, tmp_path, helpers
):
    out = tmp_path / "acc"
    launch(
        [
            *accelerate_cmd(helpers.free_port(), "multi_gpu.yaml", "loralab.runners.glue"),
            *glue_args(roberta_no_dropout, glue_files, out, 2),
        ],
        tmp_path,
    )
    check_launch(out, "MULTI_CPU", None)
    single_out, single_metrics = glue_single
    assert_same_losses(out, single_out)
    assert final_metrics(out)["eval_accuracy"] == single_metrics["accuracy"]


@pytest.mark.multiprocess
def test_metamath_deepspeed_launcher_zero2_json_two_ranks_equal_one_process(
    tiny_dirs, equal_length_metamath, metamath_single, tmp_path, helpers
):
    out = tmp_path / "ds"
    config = str(CONFIGS / "deepspeed" / "zero2.json")
    launch(
        [
            *deepspeed_cmd(helpers.free_port(), "loralab.runners.metamath"),
            *metamath_args(tiny_dirs["llama"], equal_length_metamath, out, 2),
            "--deepspeed",
            config,
        ],
        tmp_path,
    )
    check_launch(out, "DEEPSPEED", 2)
    single_out, single_metrics = metamath_single
    assert_same_losses(out, single_out)
    assert final_metrics(out)["eval_accuracy"] == single_metrics["accuracy"]
    # every GSM8K question predicted once, in order, although the two ranks generated halves
    rows = [json.loads(line) for line in (out / metamath.PREDICTIONS_FILE).read_text().splitlines()]
    single_rows = [
        json.loads(line)
        for line in (single_out / metamath.PREDICTIONS_FILE).read_text().splitlines()
    ]
    assert [r["question"] for r in rows] == [r["question"] for r in single_rows]
    assert [r["completion"] for r in rows] == [r["completion"] for r in single_rows]


@pytest.mark.multiprocess
def test_metamath_accelerate_deepspeed_plugin_yaml_two_processes(
    tiny_dirs, equal_length_metamath, metamath_single, tmp_path, helpers
):
    out = tmp_path / "accds"
    # the YAML names its JSON relative to the repository root: launch from there
    launch(
        [
            *accelerate_cmd(
                helpers.free_port(), "deepspeed_zero2.yaml", "loralab.runners.metamath"
            ),
            *metamath_args(tiny_dirs["llama"], equal_length_metamath, out, 2),
        ],
        REPO,
    )
    check_launch(out, "DEEPSPEED", 2)
    single_out, single_metrics = metamath_single
    assert_same_losses(out, single_out)
    assert final_metrics(out)["eval_accuracy"] == single_metrics["accuracy"]


@pytest.mark.multiprocess
def test_winogrande_torchrun_script_two_processes_equal_one_process(tiny_dirs, tmp_path, helpers):
    from loralab.runners import winogrande

    # WinoGrande format; the continuation (the loss tokens) is " sank." in every row: equal token counts
    rows = [r for r in helpers.winogrande_rows(64, 0) if r["sentence"].endswith("_ sank.")]
    winogrande_files = {
        "train": helpers.write_jsonl(tmp_path / "train.jsonl", rows[:16]),
        "validation": helpers.write_jsonl(tmp_path / "dev.jsonl", rows[16:24]),
    }
    assert len(rows) >= 24

    def argv(out: Path, batch: int) -> list[str]:
        return ["--model_name_or_path", tiny_dirs["llama"], "--train_file", winogrande_files["train"], "--validation_file",
                winogrande_files["validation"], "--output_dir", str(out), "--per_device_train_batch_size", str(batch),
                "--max_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "1e-3", "--method", "lora", "--lora_r", "4",
                "--disable_tqdm", "true", *ADAM_EPS]  # fmt: skip

    single = tmp_path / "single"
    expected = winogrande.main(argv(single, 4))
    out = tmp_path / "torchrun"
    script = REPO / "packages" / "runners" / "scripts" / "winogrande.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(helpers.free_port()),
        str(script),
    ]
    launch([*cmd, *argv(out, 2)], tmp_path)
    check_launch(out, "MULTI_CPU", None)
    assert_same_losses(out, single)
    assert final_metrics(out)["eval_accuracy"] == expected["accuracy"]
    # the two ranks scored halves of the validation set; the gathered predictions equal one process's
    rows = (out / winogrande.PREDICTIONS_FILE).read_text().splitlines()
    assert [json.loads(r)["prediction"] for r in rows] == [
        json.loads(r)["prediction"]
        for r in (single / winogrande.PREDICTIONS_FILE).read_text().splitlines()
    ]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_elastic_checkpoints_are_refused_before_anything_trains(stage):
    # ZeRO-3 raises at the first save; ZeRO-1/2 elastic loading needs the step in the param groups
    # (DeepSpeed's fused optimizers), which no runner optimizer keeps: the resume would fail (C4's
    # --deepspeed_config: test_runners_c4_data.py)
    from loralab.runners.launch import check_elastic_checkpoint
    from loralab.runners.methods import get_method, method_args

    config = {"zero_optimization": {"stage": stage, "elastic_checkpoint": True}}
    for name in ("lora", "golore"):
        with pytest.raises(
            ValueError,
            match=r"--deepspeed e.json: zero_optimization.elastic_checkpoint true cannot be resumed.*"
            r"remove the key",
        ):
            get_method(name).check_zero(method_args(name), stage, "--deepspeed e.json", config)
    config["zero_optimization"]["elastic_checkpoint"] = False
    check_elastic_checkpoint(config, "--deepspeed e.json")
    check_elastic_checkpoint({"zero_optimization": {"stage": 0, "elastic_checkpoint": True}}, "x")


def test_zero_offload_reads_the_offload_sections_that_offload():
    from loralab.runners.launch import load_deepspeed_config, zero_offload

    assert zero_offload(load_deepspeed_config("zero3")) == {}
    assert zero_offload(load_deepspeed_config("zero3_offload")) == {
        "offload_optimizer": "cpu",
        "offload_param": "cpu",
    }
    none = {"zero_optimization": {"offload_param": {"device": "none"}, "offload_optimizer": None}}
    assert zero_offload(none) == {}
    assert zero_offload({"zero_optimization": {"offload_param": {"device": "NVMe"}}}) == {
        "offload_param": "nvme"
    }


# ---------------------------------------------------------------- the end of a run's process group


def _start_group() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_entrypoint_destroys_the_process_group_its_run_started():
    """A rank that exits with its group alive leaves the teardown to the interpreter's exit (gloo:
    SIGABRT there now and then, NCCL: a warning): the entrypoint destroys a group its run started once
    the run finished, and leaves it after bad input (another rank may wait in a collective) and when
    the group existed before (the caller's)."""
    import torch
    import torch.distributed as dist

    from loralab.core.distributed import end_process_group
    from loralab.runners.cli import run_entrypoint

    def finished(argv):
        _start_group()
        dist.all_reduce(torch.ones(1))
        return {"accuracy": 1.0}

    def refused(argv):
        _start_group()
        raise MethodError("--method x: refused")

    assert not dist.is_initialized()
    assert run_entrypoint(finished, [], prog="t") == 0
    assert not dist.is_initialized()
    try:
        assert run_entrypoint(refused, [], prog="t") == 2
        assert dist.is_initialized()  # after an error: left to the process exit
    finally:
        end_process_group()
    assert not dist.is_initialized()
    _start_group()  # the caller's group
    try:
        assert run_entrypoint(lambda argv: None, [], prog="t") == 0
        assert dist.is_initialized()
    finally:
        end_process_group()
    end_process_group()  # nothing left: no error
