"""LoRA-FA, LoRA-Pro, GaLore and GoLore under the runners' DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU ranks,
gloo, the ``deepspeed`` launcher): the saved adapter (GaLore / GoLore: the whole model) after 3 steps
equals one process's with the same global batch, and so do the logged losses.

GaLore / GoLore: each projected matrix is gathered whole to one owner rank, which keeps its projector
and low-rank moments (:mod:`loralab.core.zero_views`); the two methods run one after the other in one
launch per stage. Tolerances: see ``GALORE_REL``.

Their optimizers find each layer's factors in DeepSpeed's flat partitions and gather them
(:mod:`loralab.core.zero_views`); LoRA-Pro runs in efficient mode under ZeRO-2 and in full mode (m×n
state on an owner rank) under ZeRO-3 (see ``CASES``). Tolerance: the losses within 1e-5 relative (1e-4
for LoRA-Pro's full mode), and the relative
difference of every saved tensor, ``‖ds − one‖ / ‖one‖``, below 1e-5 for LoRA-FA, 1e-3 for
LoRA-Pro and 2e-2 for its full mode (float32 reduction-order noise of the gradient averaging; see
``ADAPTER_REL``), with
``--adam_epsilon 1e-4`` so that Adam's first, sign-like steps do not amplify that noise in
near-zero gradient entries (see test_runners_launch.py); dropout off (masks differ by process count).
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loralab.runners import glue

TIMEOUT = 900
STEPS = 3
REL = 1e-5
# LoRA-Pro starts from B = 0 and inverts BᵀB of a B of norm ~1e-3 in its first steps: that amplifies
# the float32 reduction-order noise of the averaged gradient in the adapter (measured: 4.8e-4
# relative on one lora_B after 3 steps under ZeRO-3 with float32 Grams; 9.3e-5 under ZeRO-2 since
# the package forms them in float64; losses and classifier head within 1e-5, no structure in which
# elements differ); the 2-rank toy tests with a random B hold 1e-5
#
# Full mode is more sensitive: its step 2 moves A by (1/s)·B⁺N, with κ(B) ≈ 1e3 after the first step
# (measured). In one process, float32 differs from the same run in float64 by 3.5e-3 (worst saved
# tensor; 4.7e-2 before the package's Grams and factor map went to float64: u·κ(B)², the 4.4e-2 once
# seen here), and from a float64 run with 1e-7 relative noise on the gradients by 5.2e-4; 2 ranks
# under ZeRO-3 vs one process: 5.5e-3 (4.4e-2 before), losses 7e-7. Hence 2e-2 for full mode.
ADAPTER_REL = {"lora-fa": REL, "lora-pro": 1e-3, "lora-pro-full": 2e-2}
LOSS_REL = {"lora-fa": REL, "lora-pro": REL, "lora-pro-full": 1e-4}
METHODS: dict[str, list[str]] = {
    "lora-fa": [],
    "lora-pro": [],
    "lora-pro-full": ["--pro_mode", "full"],
}
# one deepspeed launch per case (CI time: no more launches than before). LoRA-Pro: efficient mode under
# ZeRO-2, full mode under ZeRO-3; the runners pass --pro_mode through and add no code per mode or
# stage. The optimizer's other pairs are tested elsewhere: efficient mode under ZeRO-1/2/3 and full
# mode under ZeRO-2/3 in the package's 2-rank tests (lora_pro_dist_worker.py), efficient mode under
# ZeRO-3 bf16 in test_runners_bf16_sharded.py.
# zero3_offload (optimizer and parameters offloaded to the CPU): the runner keeps LoRA-FA's optimizer
# (zero_force_ds_cpu_optimizer false; accelerate would swap in DeepSpeed's CPU Adam) on DeepSpeed's
# CPU partitions; LoRA-Pro's and GoLore's under offload in the packages' 2-rank tests and below
CASES = [
    ("lora-fa", "zero2"),
    ("lora-fa", "zero3"),
    ("lora-fa", "zero3_offload"),
    ("lora-pro", "zero2"),
    ("lora-pro-full", "zero3"),
]


@pytest.fixture(scope="module")
def roberta_no_dropout(tmp_path_factory):
    from loralab.core.testing import save_tiny, tiny_roberta

    return str(
        save_tiny(
            tiny_roberta(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            tmp_path_factory.mktemp("rob") / "m",
        )
    )


def _args(model: str, files: dict, out: Path, batch: int, method: str) -> list[str]:
    name = "lora-pro" if method.startswith("lora-pro") else method
    return ["--model_name_or_path", model, "--task_name", "sst2", "--train_file", files["train"],
            "--validation_file", files["validation"], "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "1e-3", "--method", name, "--lora_r", "4", "--disable_tqdm", "true",
            "--adam_epsilon", "1e-4", "--lora_dropout", "0", *METHODS[method]]  # fmt: skip


def _launch(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
        )
    return proc.stdout + proc.stderr


def _losses(out: Path) -> list[float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single_runs(roberta_no_dropout, glue_files, tmp_path_factory):
    """One process per method with the same global batch (4 = 2 ranks x 2), computed once."""
    done = {}

    def get(method: str) -> Path:
        if method not in done:
            out = tmp_path_factory.mktemp(f"single_{method}")
            glue.main(_args(roberta_no_dropout, glue_files, out, 4, method))
            done[method] = out
        return done[method]

    return get


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(("method", "stage"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_glue_deepspeed_two_ranks_equal_one_process(
    roberta_no_dropout, glue_files, single_runs, tmp_path, helpers, method, stage
):
    single = single_runs(method)
    want = _adapter(single)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in want.items())  # B moved from 0
    out = tmp_path / stage
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(helpers.free_port()), "--module", "loralab.runners.glue",
           *_args(roberta_no_dropout, glue_files, out, 2, method), "--deepspeed", stage]  # fmt: skip
    log = _launch(cmd, tmp_path)
    if stage.endswith("offload"):  # the offload ran, with the method's own optimizer
        ds = json.loads((out / "launch.json").read_text())["deepspeed_config"]
        assert ds["zero_force_ds_cpu_optimizer"] is False, ds
        assert "optimizer offloaded to cpu, parameters offloaded to cpu" in log
    assert _losses(out) == pytest.approx(_losses(single), rel=LOSS_REL[method])
    got = _adapter(out)
    assert set(got) == set(want)
    for k in want:
        rel = ((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)).item()
        print(f"{method} {stage}: {k} {rel:.2e}")
        assert rel < ADAPTER_REL[method], (k, rel)


def test_lora_fa_lora_pro_galore_golore_accept_deepspeed_zero():
    """The runners' engine check lets them through (the old refusal named --deepspeed)."""
    from loralab.runners.methods import get_method

    for name in ("lora-fa", "lora-pro", "galore", "golore"):
        get_method(name).check_engine("deepspeed_zero", "--deepspeed zero3")


# --------------------------------------------------------------------------------- GaLore / GoLore
GALORE_FLAGS = {
    "galore": ["--galore_rank", "4", "--update_proj_gap", "2"],
    # rand_ratio 0.5 of 3 steps: an SVD projector at step 0, a random one at step 2
    "golore": ["--galore_rank", "4", "--update_proj_gap", "2", "--rand_ratio", "0.5"],
}
# ‖ds − one‖ ≤ GALORE_REL·‖one‖ + GALORE_ATOL for each saved tensor: float32 reduction-order noise of
# the averaged gradient, through an SVD of it and Adam with eps 1e-4 (measured: 1.2e-6 relative, 7.2e-9
# absolute at most under ZeRO-2 and ZeRO-3); the absolute term is for the attention key biases, whose
# gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys): Adam moves them by
# round-off only (|w| ~ 1e-12, different on every reduction order)
GALORE_REL = 1e-5
GALORE_ATOL = 1e-8
GALORE_LOSS_REL = 1e-5
# GoLore and GaLore under ZeRO-3 in one launch (partitioned parameters; GoLore: an SVD projector at
# step 0 and a random one at step 2), then GoLore stopped after its step-2 checkpoint and resumed in
# the same launch. Several trainings in one ZeRO-3 launch used to hang in the second one's rank check:
# the first run's DeepSpeed config stayed registered with transformers, which then built the rank
# check's meta model under deepspeed.zero.Init (one rank gathering, the other broadcasting); the
# fine-tuning runs now unregister it when they end. ZeRO-1/2's flat partitions under the same
# owner-rank code are tested in the golore package (golore_dist_worker.py), and GaLore under ZeRO-2
# from the runners passed once by hand (2026-12-03). GoLore again under zero3_offload (optimizer and
# parameters on the CPU; the runner keeps GoLore's optimizer there), with its resume: DeepSpeed's
# checkpoint of the offloaded partitions carries the owner ranks' projectors and moments
GALORE_LAUNCHES = [("zero3", ("golore", "galore")), ("zero3_offload", ("golore",))]
WORKER = Path(__file__).with_name("runners_fsdp_worker.py")


def _galore_args(model: str, files: dict, out: Path, batch: int, method: str) -> list[str]:
    return ["--model_name_or_path", model, "--task_name", "sst2", "--train_file", files["train"],
            "--validation_file", files["validation"], "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "1e-3", "--method", method, "--disable_tqdm", "true",
            "--adam_epsilon", "1e-4", *GALORE_FLAGS[method]]  # fmt: skip


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "methods"), GALORE_LAUNCHES, ids=[f"{s}-{'+'.join(m)}" for s, m in GALORE_LAUNCHES]
)
def test_glue_galore_and_golore_under_deepspeed_equal_one_process_and_resume_exactly(
    roberta_no_dropout, glue_files, tmp_path, helpers, stage, methods
):
    outs = {m: tmp_path / f"{m}_{stage}" for m in methods}
    save = ["--save_steps", "2"]  # checkpoint-2 (and the last step's checkpoint-3)
    runs = [["glue", [*_galore_args(roberta_no_dropout, glue_files, out, 2, m), "--deepspeed", stage, *save]]
            for m, out in outs.items()]  # fmt: skip
    # the first method's run as an interrupted one (no final/, no checkpoint-3), resumed from checkpoint-2
    first, resumed = outs[methods[0]], tmp_path / f"{methods[0]}_{stage}_resumed"
    runs += [["copy_run", [str(first), str(resumed)]],
             ["glue", [*_galore_args(roberta_no_dropout, glue_files, resumed, 2, methods[0]), "--deepspeed", stage,
                       *save, "--resume_from_checkpoint", "latest"]]]  # fmt: skip
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(helpers.free_port()), str(WORKER), str(tmp_path / "runs.json")]  # fmt: skip
    start = time.monotonic()
    log = _launch(cmd, tmp_path)
    print(f"deepspeed launch ({stage}, {' + '.join(methods)}): {time.monotonic() - start:.0f} s")
    if stage.endswith("offload"):  # every rank's engine line names the offload
        assert (
            log.count("optimizer offloaded to cpu, parameters offloaded to cpu")
            >= 2 * len(runs) - 2
        )
    from transformers import AutoModelForSequenceClassification

    init = AutoModelForSequenceClassification.from_pretrained(roberta_no_dropout).state_dict()
    for method, out in outs.items():
        single = tmp_path / f"{method}_single"
        glue.main(_galore_args(roberta_no_dropout, glue_files, single, 4, method))
        assert _losses(out) == pytest.approx(_losses(single), rel=GALORE_LOSS_REL)
        got, want = _weights(out), _weights(single)
        assert set(got) == set(want)
        for k in want:
            diff = (got[k] - want[k]).norm().item()
            assert diff <= GALORE_REL * want[k].norm().item() + GALORE_ATOL, (method, k, diff)
        # every projected matrix trained (not a silent no-op): the attention and MLP weights moved
        moved = [k for k in want if k.endswith("dense.weight") and k in init]
        assert moved and all(not torch.allclose(got[k], init[k]) for k in moved)
    # the resume under ZeRO-3 (DeepSpeed's checkpoint through accelerate: each owner rank's projectors,
    # moments and step counters) continues the uninterrupted run exactly
    assert (first / "checkpoint-2").is_dir()
    assert f"resumed from {resumed / 'checkpoint-2'} at step 2" in log
    assert _losses(resumed) == _losses(first)
    got, want = _weights(resumed), _weights(first)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_galore_and_golore_accept_bf16_under_every_zero_stage():
    # refused until DeepSpeed's bf16 (ZeRO-1/2/3, and its BF16_Optimizer) was tested against one
    # process: test_runners_bf16_sharded.py and the launch below
    import types

    from loralab.runners.methods import get_method

    args = types.SimpleNamespace(bf16=True, optim="adamw")
    for name in GALORE_FLAGS:
        for stage in (1, 2, 3):
            config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
            get_method(name).check_zero(args, stage, f"--deepspeed zero{stage}", config)


# bf16 under DeepSpeed vs one process with --bf16. DeepSpeed's bf16 runs the whole model in bfloat16
# (norms and softmax included) over float32 master partitions and saves the bfloat16 weights (what its
# forward uses); accelerate's --bf16 in one process autocasts the matmuls over float32 weights and
# saves those. The package test (test_runners_bf16_sharded.py) holds GaLore / GoLore under ZeRO-1/2/3
# bf16 to the exact one-process arithmetic (0 difference); here the command line's path, against the
# nearest one-process run the runners offer. Measured: the logged losses within 1.9e-3 relative at
# every step (the ZeRO run logs them in bfloat16, 2^-8 = 3.9e-3 apart), and every projected weight
# matrix within 1 bfloat16 ulp (at its largest entry) of the one-process matrix rounded to bfloat16.
# The other parameters (embeddings, norms, biases, head) take plain AdamW steps whose sign-like first
# steps follow near-zero gradient entries that the two arithmetics round differently (biases at
# 0.5–2× their change apart): only their finiteness is asserted.
BF16_LOSS_REL = 5e-3
BF16_ULPS = 2


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got − bf16(want)| in units of the bfloat16 spacing at max|want|."""
    ulp = 2.0 ** (torch.frexp(want.float().abs().max()).exponent.item() - 8)
    return ((got.float() - want.bfloat16().float()).abs().max() / ulp).item()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_glue_galore_and_golore_bf16_under_deepspeed_zero2_track_one_process_bf16(
    roberta_no_dropout, glue_files, tmp_path, helpers
):
    # a learning rate that moves the weights by several bfloat16 ulps in 3 steps
    bf16 = ["--bf16", "true", "--learning_rate", "2e-2"]
    outs = {m: tmp_path / f"{m}_zero2_bf16" for m in ("galore", "golore")}
    runs = [["glue", [*_galore_args(roberta_no_dropout, glue_files, out, 2, m), *bf16, "--deepspeed", "zero2"]]
            for m, out in outs.items()]  # fmt: skip
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(helpers.free_port()), str(WORKER), str(tmp_path / "runs.json")]  # fmt: skip
    _launch(cmd, tmp_path)
    from transformers import AutoModelForSequenceClassification

    init = AutoModelForSequenceClassification.from_pretrained(roberta_no_dropout).state_dict()
    for method, out in outs.items():
        launch = json.loads((out / "launch.json").read_text())
        ds = launch["deepspeed_config"]
        assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2, launch
        single = tmp_path / f"{method}_single_bf16"
        glue.main([*_galore_args(roberta_no_dropout, glue_files, single, 4, method), *bf16])
        got_loss, want_loss = _losses(out), _losses(single)
        assert all(math.isfinite(x) for x in got_loss), got_loss
        assert got_loss == pytest.approx(want_loss, rel=BF16_LOSS_REL), (got_loss, want_loss)
        assert abs(want_loss[-1] - want_loss[0]) > 0.1  # it trained: the losses moved
        got, want = _weights(out), _weights(single)
        assert set(got) == set(want)
        assert all(torch.isfinite(t).all() for t in got.values())
        # GaLore's targets: every Linear weight of the encoder (attention and MLP)
        projected = [k for k in want if k.startswith("roberta.encoder.") and k.endswith(".weight")
                     and "LayerNorm" not in k]  # fmt: skip
        worst = max(_bf16_ulps(got[k], want[k]) for k in projected)
        print(
            f"{method} zero2 bf16: losses {got_loss} vs {want_loss}; matrices within {worst:.2f} ulps"
        )
        assert len(projected) == 12 and worst <= BF16_ULPS, (method, worst)
        # the projected matrices trained in the saved bfloat16 model (not a silent no-op)
        moved = [k for k in projected if k.endswith("dense.weight")]
        assert moved and all(not torch.equal(got[k], init[k].bfloat16()) for k in moved)


# accelerate launch with a DeepSpeed ZeRO-3 YAML whose zero3_init_flag is true: the entrypoint builds
# the Accelerator before the model, so transformers loads every weight partitioned
# (deepspeed.zero.Init) instead of whole on every rank. The environment is what `accelerate launch`
# sets for such a YAML; the deepspeed launcher starts the processes
ZERO3_INIT_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accelerate_zero3_init_loads_partitioned_and_trains_as_zero3(
    roberta_no_dropout, glue_files, tmp_path, helpers
):
    from loralab.runners.launch import DEEPSPEED_CONFIGS

    (tmp_path / "zero3.json").write_text(json.dumps(DEEPSPEED_CONFIGS["zero3"]))
    env = {**ZERO3_INIT_ENV, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "zero3.json")}

    def generic(model: str, files: dict, out: Path, batch: int, method: str) -> list[str]:
        return ["--model_name_or_path", model, "--task_name", "sst2", "--train_file", files["train"],
                "--validation_file", files["validation"], "--output_dir", str(out),
                "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS), "--logging_steps",
                "1", "--learning_rate", "1e-3", "--method", method, "--disable_tqdm", "true",
                "--adam_epsilon", "1e-4", *helpers.method_flags(method)]  # fmt: skip

    # LoRA-GA's init estimated on the partitioned model, LoRA-XS's factors from partitioned weights
    flags = {"lora-fa": _args, "golore": _galore_args, "lora-ga": generic, "lora-xs": generic}
    outs = {}
    for kind, extra, extra_env in (("init", [], env), ("whole", ["--deepspeed", "zero3"], {})):
        runs = []
        for m, make in flags.items():
            outs[kind, m] = tmp_path / kind / m
            runs.append(
                ["glue", [*make(roberta_no_dropout, glue_files, outs[kind, m], 2, m), *extra]]
            )
        (tmp_path / f"{kind}.json").write_text(json.dumps(runs))
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(helpers.free_port()), str(WORKER), str(tmp_path / f"{kind}.json")]  # fmt: skip
        os.environ.update(extra_env)
        try:
            log = _launch(cmd, tmp_path)
        finally:
            for k in extra_env:
                os.environ.pop(k)
        if kind == "init":
            assert "loaded partitioned (deepspeed.zero.Init)" in log, log[-3000:]
    from transformers import AutoModelForSequenceClassification

    for m in flags:
        got, want = outs["init", m], outs["whole", m]
        assert _losses(got) == pytest.approx(_losses(want), rel=1e-6), m
        if m != "golore":
            a, b = _adapter(got), _adapter(want)
        else:
            # GoLore's final/ is a whole model: compared as it reloads the bare way (the model loaded
            # under zero.Init saves its LayerNorms under the checkpoint's legacy names, gamma / beta,
            # which from_pretrained maps back)
            a, b = (
                AutoModelForSequenceClassification.from_pretrained(o / "final").state_dict()
                for o in (got, want)
            )
        assert sorted(a) == sorted(b), m
        for k in b:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), (m, k)
