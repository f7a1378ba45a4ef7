"""C4 pre-training runs on the tiny LLaMA with local C4-format shards written here.

- one short single-process run per method: AdamW, GaLore, GoLore (SVD then random projectors) and the
  ReLoRA-structure path (``--use_peft --golore``);
- exact resume: stop at a checkpoint, ``--autoresume``, the loss curve continues bit for bit;
- the same runs under ``torchrun --nproc-per-node 2`` (DDP, gloo; and FSDP2 with ``--fsdp full_shard``
  for AdamW, GaLore and GoLore, which also resumes exactly) and ``deepspeed --num_gpus 2``
  (ZeRO-1/2 for AdamW, stage 0 for the subspace methods; ZeRO-3 for GoLore, whose final model is also
  compared; its stop-and-resume test, each run in its own launch, is skipped: see its reason) give the
  single-process losses on the same
  global batch: the single-process reference reads the same two data streams
  (``--data_streams 2``, two accumulated micro-batches of 4 = one micro-batch of 4 on each of 2 ranks).
  Tolerance: rtol 1e-5, atol 1e-6 on every step's loss and the final eval loss (float32; the
  reductions sum in a different order: observed differences are 0 or in the last bits).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralab.core.testing import free_port
from loralab.runners.c4 import C4Args, parse_args, run
from loralab.runners.c4.testing import write_tiny_setup
from loralab.runners.loop import CheckpointError

WORKER = Path(__file__).with_name("runners_c4_worker.py")
STEPS = 6
GAP = 2  # projector refresh / ReLoRA merge every 2 steps: refreshes at steps 0, 2, 4
SAVE_EVERY = 3
RTOL, ATOL = 1e-5, 1e-6
# 8-bit moments under FSDP2 / ZeRO: the reduce-scatter sums the gradient in another order than one process,
# and an element one float32 ulp off can fall into the next 8-bit code (steps of 1/127 of its block's
# absmax), moving that moment by a code step from then on: measured 3.9e-4 relative on the losses of
# steps 4-6 (steps 1-3 equal); DDP's all-reduce sums as one process does and stays within RTOL
RTOL_8BIT = 2e-3
# DeepSpeed bf16 under ZeRO-3, 2 ranks vs one process: measured equal bit for bit (0); allowed a
# quarter of a bfloat16 ulp (2^-10), the loss change one weight rounding differently could cause.
# Against the float32 run: measured 1.6e-4, allowed one bfloat16 ulp (2^-8).
BF16_RTOL, BF16_VS_FP32_RTOL = 2.0**-10, 2.0**-8
SUBSPACE = ["--rank", "8", "--update_proj_gap", str(GAP), "--galore_scale", "1.0"]
METHODS = {
    "adamw": ["--optimizer", "adamw"],
    "galore": ["--optimizer", "galore_adamw", *SUBSPACE],
    # rand_ratio 0.5 of 6 steps: SVD projectors at steps 0 and 2, a random one at step 4
    "golore": ["--optimizer", "golore_adamw", "--rand_ratio", "0.5", *SUBSPACE],
    "relora": ["--use_peft", "--golore", "--optimizer", "adamw", "--rand_ratio", "0.5", *SUBSPACE],
    # galore-torch's GaLoreAdamW8bit: rank 64 makes the low-rank moments 64x64 / 128x64, at least
    # bitsandbytes' min_8bit_size (4096), so they really are 8-bit
    "galore8bit": ["--optimizer", "galore_adamw8bit", "--rank", "64", "--update_proj_gap", str(GAP),
                   "--galore_scale", "1.0"],
}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("c4")
    return write_tiny_setup(root / "setup", train_docs=120, validation_docs=12)


def _argv(setup: dict[str, str], out: Path, method: str, *extra: str) -> list[str]:
    return [
        "--output_dir", str(out), "--model_config", setup["model_config"], "--tokenizer", setup["tokenizer"],
        "--train_data", setup["train_data"], "--max_length", "32", "--batch_size", "4", "--total_batch_size", "8",
        "--num_training_steps", str(STEPS), "--warmup_steps", "1", "--lr", "3e-3", "--grad_clipping", "1.0",
        "--eval_every", "3",
        "--save_every", str(SAVE_EVERY), "--eval_tokens", "320", "--plot", "false", "--seed", "1",
        *METHODS[method], *extra,
    ]  # fmt: skip


def _train_losses(run_dir: Path) -> list[float]:
    recs = [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), (
        "metrics.jsonl steps are not 1, 2, ... once each"
    )
    return [r["loss"] for r in train]


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """Single-process run per method on two data streams (the multi-process runs' global batch); cached."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(method: str) -> tuple[Path, dict]:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"single_{method}")
            cache[method] = (out, run(parse_args(_argv(setup, out, method, "--data_streams", "2"))))
        return cache[method]

    return get


@pytest.mark.parametrize("method", list(METHODS))
def test_single_process_run_trains_and_saves(single, method):
    out, summary = single(method)
    losses = _train_losses(out)
    assert summary["finished"] and summary["step"] == STEPS and len(losses) == STEPS
    assert all(math.isfinite(v) for v in losses)
    # the untrained model sits at ln(260) = 5.56 nats; six steps must have moved it down
    assert losses[-1] < losses[0] - 0.1, losses
    assert summary["final_eval_loss"] < losses[0] - 0.1
    assert summary["tokens_seen"] == STEPS * 8 * 32  # packed: no padding
    assert (
        summary["tokens_per_s"] > 0
        and summary["tokens_per_cpu_s"] > 0
        and summary["peak_mem_mb"] > 0
    )
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert records[-1]["kind"] == "summary" and records[-1]["status"] == "ok"
    assert records[-1]["eval_loss"] == summary["final_eval_loss"]
    assert [e["step"] for e in evals] == [3, 6]
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}

    opt_state = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)
    subspace_groups = [g for g in opt_state["param_groups"] if g.get("rank") is not None]
    if method in ("galore", "golore", "galore8bit"):
        # the projected weights are the 7 attention / MLP matrices of each of the 2 layers
        rank = 64 if method == "galore8bit" else 8
        assert all(g["rank"] == rank and g["update_proj_gap"] == GAP for g in subspace_groups)
        assert sum(len(g["params"]) for g in subspace_groups) == 2 * 7
        if method == "galore8bit":  # bitsandbytes' 8-bit moments, not float32 ones: the 14
            # projected matrices' and the embeddings' and head's (the norms, under 4096, stay 32-bit)
            states = [st for st in opt_state["state"].values() if "state1" in st]
            assert sum(st["state1"].dtype == torch.uint8 for st in states) == 2 * 7 + 2
    else:
        assert not subspace_groups
    if method == "relora":
        assert summary["n_projector_resets"] == STEPS // GAP
        assert summary["trainable_params"] < summary["params"]
    # the final model is a plain LlamaForCausalLM (ReLoRA adapters merged) that gives the run's eval loss
    _check_final_model(out, summary)


def _check_final_model(out: Path, summary: dict) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from loralab.runners.c4.batches import eval_batches
    from loralab.runners.c4.stats import evaluate

    model = LlamaForCausalLM.from_pretrained(out / "final_model")
    args = C4Args(**json.loads((out / "run_config.json").read_text()))
    tok = AutoTokenizer.from_pretrained(out / "final_model")
    loss, _ = evaluate(model, eval_batches(args, tok, 0, 1), torch.device("cpu"))
    assert loss == pytest.approx(summary["final_eval_loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["adamw", "golore", "relora", "galore8bit"])
def test_resume_continues_the_same_loss_curve(setup, single, tmp_path, method):
    ref_dir, ref = single(method)
    out = tmp_path / "run"
    first = run(
        parse_args(
            _argv(setup, out, method, "--data_streams", "2", "--stop_at_step", str(SAVE_EVERY))
        )
    )
    assert first["step"] == SAVE_EVERY and not first["finished"]
    assert not (out / "final_model").exists()
    resumed = run(parse_args(_argv(setup, out, method, "--data_streams", "2", "--autoresume")))
    assert resumed["finished"]
    # bit-identical: same weights, optimizer moments, projectors, RNG and data position after the resume
    assert _train_losses(out) == _train_losses(ref_dir)
    assert resumed["final_eval_loss"] == ref["final_eval_loss"]
    assert resumed["tokens_seen"] == ref["tokens_seen"]
    assert resumed["n_projector_resets"] == ref["n_projector_resets"]


def test_killed_run_resumes_exactly_and_skips_a_torn_save(setup, single, tmp_path):
    """kill -9 right after checkpoint 3 (the loop's crash hook: ``os._exit``, no cleanup), a save torn
    half-way (``.checkpoint-6.tmp``, as a job killed while saving leaves it): ``--autoresume`` skips and
    removes the torn save, continues from checkpoint 3, and gives the uninterrupted losses bit for bit."""
    from loralab.runners.loop import CRASH_ENV

    ref_dir, ref = single("adamw")
    out = tmp_path / "run"
    env = {**os.environ, CRASH_ENV: str(SAVE_EVERY), "OMP_NUM_THREADS": "1"}
    argv = _argv(setup, out, "adamw", "--data_streams", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "loralab.runners.c4", *argv], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-3"}
    torn = out / ".checkpoint-6.tmp"
    torn.mkdir()
    (torn / "model.pt").write_bytes(b"half")
    resumed = run(parse_args([*argv, "--autoresume"]))
    assert not torn.exists() and resumed["finished"]
    assert _train_losses(out) == _train_losses(ref_dir)
    assert resumed["final_eval_loss"] == ref["final_eval_loss"]


def test_resume_refuses_changed_settings(setup, single, tmp_path, monkeypatch):
    ref_dir, _ = single("golore")
    out = tmp_path / "run"
    shutil.copytree(ref_dir / "checkpoint-3", out / "checkpoint-3")
    shutil.copy(ref_dir / "metrics.jsonl", out / "metrics.jsonl")
    changed = ["--rank", "4", "--lr", "1e-3", "--warmup_steps", "2", "--scheduler", "linear", "--grad_clipping", "0.5"]  # fmt: skip
    with pytest.raises(
        CheckpointError,
        match=r"cannot resume from .*checkpoint-3: its run was trained with other settings",
    ) as info:
        run(
            parse_args(_argv(setup, out, "golore", "--data_streams", "2", "--autoresume", *changed))
        )
    for diff in (
        "--rank: 8 -> 4",
        "--lr: 0.003 -> 0.001",
        "--warmup_steps: 1 -> 2",
        "--scheduler: 'cosine' -> 'linear'",
        "--min_lr_ratio: 0.1 -> None",
        "--grad_clipping: 1.0 -> 0.5",
    ):
        assert diff in str(info.value)
    # the same files named relative to another working directory are the same run: it resumes
    monkeypatch.chdir(Path(setup["model_config"]).parent)
    relative = {k: os.path.relpath(v) for k, v in setup.items()}
    assert all(not Path(v).is_absolute() for v in relative.values())
    resumed = run(parse_args(_argv(relative, out, "golore", "--data_streams", "2", "--autoresume")))
    assert resumed["finished"] and _train_losses(out) == _train_losses(ref_dir)
    with pytest.raises(CheckpointError, match=r"--resume_from_checkpoint .*nope: not a checkpoint"):
        run(
            parse_args(
                _argv(
                    setup,
                    tmp_path / "x",
                    "adamw",
                    "--resume_from_checkpoint",
                    str(tmp_path / "nope"),
                )
            )
        )


def test_results_table_lists_every_run(single, tmp_path, capsys):
    from loralab.runners.c4 import main

    runs = tmp_path / "runs"
    for method in METHODS:
        src, _ = single(method)
        (runs / method).mkdir(parents=True)
        for name in ("run_summary.json", "metrics.jsonl"):
            shutil.copy(src / name, runs / method / name)
    (runs / "not_a_run").mkdir()  # directories without run_summary.json are not runs
    capsys.readouterr()  # drop what the runs printed (DeepSpeed's accelerator notice)
    main(["table", str(runs)])
    printed = capsys.readouterr().out.strip()
    assert (runs / "results.md").read_text().strip() == printed
    assert (runs / "eval_loss.png").stat().st_size > 0
    lines = printed.splitlines()
    assert lines[0].startswith(
        "| run | optimizer | model | steps | final eval loss | final ppl | tokens/s | peak mem (MiB) |"
    )
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    assert sorted(rows) == sorted(METHODS)
    for method, cells in rows.items():
        s = json.loads((runs / method / "run_summary.json").read_text())
        assert (
            cells[0]
            == {
                "adamw": "adamw",
                "galore": "galore_adamw",
                "golore": "golore_adamw",
                "relora": "adamw+relora",
                "galore8bit": "galore_adamw8bit",
            }[method]
        )
        assert cells[2] == f"{STEPS}/{STEPS}"
        assert float(cells[3]) == pytest.approx(s["final_eval_loss"], abs=1e-4)
        assert float(cells[4]) == pytest.approx(math.exp(s["final_eval_loss"]), rel=1e-3)
        assert float(cells[5]) == pytest.approx(s["tokens_per_s"], abs=0.5)
        assert cells[6] == f"{s['peak_mem_mb']:.0f} (CPU RSS)"
    with pytest.raises(FileNotFoundError, match=r"no run directories with run_summary\.json"):
        main(["table", str(tmp_path / "empty")])


def _launch(cmd: list[str], runs: list[list[str]], tmp_path: Path) -> str:
    runs_file = tmp_path / "runs.json"
    runs_file.write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*cmd, str(WORKER), str(runs_file)], env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _assert_same_run(run_dir: Path, ref_dir: Path, rtol: float = RTOL) -> None:
    got, want = (
        json.loads((run_dir / "run_summary.json").read_text()),
        json.loads((ref_dir / "run_summary.json").read_text()),
    )
    assert (
        got["world_size"] == 2
        and want["world_size"] == 1
        and got["global_batch_size"] == want["global_batch_size"] == 8
    )
    torch.testing.assert_close(
        torch.tensor(_train_losses(run_dir)),
        torch.tensor(_train_losses(ref_dir)),
        rtol=rtol,
        atol=ATOL,
    )
    assert got["final_eval_loss"] == pytest.approx(want["final_eval_loss"], rel=rtol, abs=ATOL)
    assert got["tokens_seen"] == want["tokens_seen"]


@pytest.mark.multiprocess
def test_torchrun_two_processes_match_single_process(setup, single, tmp_path):
    runs = {m: tmp_path / m for m in METHODS}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    _launch(cmd, [_argv(setup, out, m) for m, out in runs.items()], tmp_path)
    for method, out in runs.items():
        _assert_same_run(out, single(method)[0])
        # one checkpoint holds both ranks' RNG and every data stream's position
        assert {p.name for p in (out / "checkpoint-6").glob("rng_state_rank*.pt")} == {
            "rng_state_rank0.pt",
            "rng_state_rank1.pt",
        }
        data = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["data"]
        assert (
            len(data) == 2
        )  # the loop's format: one position per rank (here each holds all streams)
        assert all(d["world"] == 2 and sorted(d["streams"]) == ["0", "1"] for d in data)


@pytest.mark.multiprocess
def test_deepspeed_two_processes_match_single_process(setup, single, tmp_path):
    pytest.importorskip("deepspeed")
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which(
        "deepspeed"
    )
    assert launcher is not None, "the deepspeed launcher is not on PATH"
    configs = {}
    for stage in (0, 1, 2, "2_offload"):
        zero = {"stage": int(str(stage)[0])}
        if stage == "2_offload":
            zero["offload_optimizer"] = {"device": "cpu"}
        configs[stage] = tmp_path / f"zero{stage}.json"
        configs[stage].write_text(json.dumps({
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero,
        }))  # fmt: skip
    # AdamW under ZeRO-1 and ZeRO-2; GaLore / GoLore at stage 0 here (ZeRO-3: the tests below), GaLore
    # 8-bit under ZeRO-2 (every tensor stepped whole on its owner rank); the ReLoRA path needs whole
    # 2-D weights: stage 0. AdamW and GoLore under ZeRO-2 with the optimizer offloaded to the CPU:
    # deepspeed.initialize keeps the client optimizer only with zero_force_ds_cpu_optimizer false,
    # which the runner sets
    plan = [
        ("adamw", 1),
        ("adamw", 2),
        ("galore", 0),
        ("golore", 0),
        ("relora", 0),
        ("galore8bit", 2),
        ("adamw", "2_offload"),
        ("golore", "2_offload"),
    ]
    runs = [(m, s, tmp_path / f"{m}_zero{s}") for m, s in plan]
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port())]
    log = _launch(
        cmd,
        [_argv(setup, out, m, "--deepspeed_config", str(configs[s])) for m, s, out in runs],
        tmp_path,
    )
    assert (
        log.count("engine deepspeed ZeRO-2, optimizer offloaded to cpu on cpu") == 4
    )  # 2 runs x 2 ranks
    for method, _, out in runs:
        _assert_same_run(out, single(method)[0], rtol=RTOL_8BIT if method == "galore8bit" else RTOL)
        assert json.loads((out / "run_summary.json").read_text())["deepspeed"]
        assert (out / "checkpoint-6" / "deepspeed").is_dir()


ZERO3 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    # 0: every parameter partitioned (the default keeps parameters under 1e5 elements whole: all of them here)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}  # fmt: skip
# each deepspeed launch alone, with its own limit: a launch that hangs fails instead of blocking the suite
LAUNCH_TIMEOUT = 900


def _deepspeed_launch(runs: list[list[str]], tmp_path: Path, name: str, nproc: int = 2) -> str:
    pytest.importorskip("deepspeed")
    runs_file = tmp_path / f"{name}.json"
    runs_file.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(free_port()), str(WORKER), str(runs_file)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def golore_zero3(setup, tmp_path_factory):
    """GoLore under ``deepspeed --num_gpus 2`` with ZeRO-3 (one launch, one run); cached."""
    root = tmp_path_factory.mktemp("golore_zero3")
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    out = root / "run"
    log = _deepspeed_launch(
        [_argv(setup, out, "golore", "--deepspeed_config", str(root / "zero3.json"))], root, "full"
    )
    return out, log


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_zero3_golore_matches_single_process(single, golore_zero3):
    # every weight partitioned over 2 ranks; each projected matrix gathered whole to its owner rank,
    # its projector and moments kept there: the single-process run's losses (rtol 1e-5) and final model
    out, log = golore_zero3
    for r in (0, 1):
        assert f"[loralab.runners] rank {r}/2: engine deepspeed ZeRO-3 on cpu" in log
    _assert_same_run(out, single("golore")[0])
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["deepspeed"] and summary["engine"] == "deepspeed" and summary["finished"]
    assert (out / "checkpoint-6" / "deepspeed").is_dir()
    # final_model/ holds the weights gathered from the partitions: it reloads the plain way and gives
    # the run's eval loss; its weights equal the single-process run's
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(out / "final_model").state_dict()
    want = AutoModelForCausalLM.from_pretrained(single("golore")[0] / "final_model").state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    _check_final_model(out, summary)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 120)
def test_deepspeed_zero3_golore_resumes_exactly(setup, golore_zero3, tmp_path):
    # stopped at the step-3 checkpoint (DeepSpeed's ZeRO-3 layout: the low-rank projectors, moments
    # and step counters in each owner rank's optimizer partition state), then resumed in a new launch
    # with --autoresume: the uninterrupted ZeRO-3 run's losses and final eval loss, bit for bit
    ref, _ = golore_zero3
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    out = tmp_path / "run"
    argv = _argv(setup, out, "golore", "--deepspeed_config", str(tmp_path / "zero3.json"))
    _deepspeed_launch([[*argv, "--stop_at_step", str(SAVE_EVERY)]], tmp_path, "stop")
    first = json.loads((out / "run_summary.json").read_text())
    assert first["step"] == SAVE_EVERY and not first["finished"]
    assert not (out / "final_model").exists()
    _deepspeed_launch([[*argv, "--autoresume"]], tmp_path, "resume")
    resumed = json.loads((out / "run_summary.json").read_text())
    want = json.loads((ref / "run_summary.json").read_text())
    assert resumed["finished"]
    assert _train_losses(out) == _train_losses(ref)
    assert resumed["final_eval_loss"] == want["final_eval_loss"]
    assert resumed["tokens_seen"] == want["tokens_seen"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 120)
def test_deepspeed_zero3_bf16_golore_matches_one_process_bf16(setup, single, tmp_path):
    # --dtype bfloat16 under ZeRO-3 is DeepSpeed's bf16 (a bfloat16 model for forward and backward,
    # float32 master partitions the GoLore owner ranks read whole): 2 ranks against the same run in one
    # process on the same global batch (two data streams, two accumulated micro-batches)
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))  # no bf16 section: --dtype decides

    def argv(out: Path, *extra: str) -> list[str]:
        ds = ["--deepspeed_config", str(tmp_path / "zero3.json"), "--dtype", "bfloat16"]
        return _argv(setup, out, "golore", *ds, *extra)

    two, one = tmp_path / "two", tmp_path / "one"
    log = _deepspeed_launch([argv(two)], tmp_path, "two")
    for r in (0, 1):
        assert f"rank {r}/2: engine deepspeed ZeRO-3, bf16 (fp32 masters) on cpu" in log
    _deepspeed_launch([argv(one, "--data_streams", "2")], tmp_path, "one", nproc=1)
    got, want = _train_losses(two), _train_losses(one)
    assert all(math.isfinite(x) for x in got) and len(got) == STEPS
    # the ranks average bfloat16 gradients where one process accumulates two micro-batches in
    # bfloat16: the same step up to bfloat16 rounding (2^-8 relative), which later steps carry on
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=BF16_RTOL, atol=0)
    # and the same training as the float32 run, at bfloat16 precision
    fp32 = _train_losses(single("golore")[0])
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(fp32), rtol=BF16_VS_FP32_RTOL, atol=0
    )
    assert got != fp32, "the bf16 run computed the float32 run's losses: bf16 was not used"
    summary = json.loads((two / "run_summary.json").read_text())
    assert summary["finished"] and summary["deepspeed"]
    assert json.loads((two / "run_config.json").read_text())["dtype"] == "bfloat16"


def test_fsdp_refuses_what_it_cannot_shard_before_the_model_loads(setup, tmp_path):
    from loralab.runners.methods import MethodError

    with pytest.raises(
        MethodError,
        match=r"--use_peft --golore \(golore-relora\) does not run under --fsdp full_shard yet: "
        r"drop --fsdp .*or use --optimizer golore_adamw",
    ):
        parse_args(_argv(setup, tmp_path / "a", "relora", "--fsdp", "full_shard"))
    with pytest.raises(
        ValueError,
        match=r"--fsdp supports 'full_shard' or 'shard_grad_op' \(FSDP2\), optionally followed by "
        r"'offload' .*got 'hybrid'",
    ):
        parse_args(_argv(setup, tmp_path / "b", "adamw", "--fsdp", "hybrid"))
    with pytest.raises(
        ValueError, match=r"--fsdp full_shard cannot be combined with --deepspeed_config"
    ):
        parse_args(_argv(setup, tmp_path / "c", "adamw", "--fsdp", "full_shard", "--deepspeed_config", "ds.json"))  # fmt: skip


def test_every_rank_prints_its_engine_line():
    from loralab.runners.loop import DeepSpeedEngine, TorchEngine, engine_line

    assert engine_line(TorchEngine(device="cpu")) == (
        "[loralab.runners] rank 0/1: engine torch (one process) on cpu"
    )
    ds = DeepSpeedEngine({"zero_optimization": {"stage": 2}}, device="cpu")
    assert engine_line(ds) == "[loralab.runners] rank 0/1: engine deepspeed ZeRO-2 on cpu"


def test_each_engine_labels_its_stage():
    """The words of every engine's start line (each engine's label()), multi-rank ones without a
    process group: DDP or an explicit all-reduce, accelerate with and without DeepSpeed and its
    offload, DeepSpeed's bf16 masters."""
    import types

    from loralab.runners.loop import AccelerateEngine, DeepSpeedEngine, TorchEngine, engine_line

    torch_engine = object.__new__(TorchEngine)
    torch_engine.rank, torch_engine.world_size, torch_engine.device = 1, 2, torch.device("cpu")
    torch_engine.ddp = True
    assert engine_line(torch_engine) == "[loralab.runners] rank 1/2: engine torch (DDP) on cpu"
    torch_engine.ddp = False
    assert torch_engine.label() == "torch (gradient all-reduce)"

    zero3 = {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "bf16": {"enabled": True},
    }
    acc = object.__new__(AccelerateEngine)
    acc.acc = types.SimpleNamespace(
        state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=zero3)),
        distributed_type="DistributedType.DEEPSPEED",
    )
    assert acc.label() == "accelerate + DeepSpeed ZeRO-3, optimizer offloaded to cpu"
    acc.acc = types.SimpleNamespace(
        state=types.SimpleNamespace(deepspeed_plugin=None),
        distributed_type="DistributedType.MULTI_CPU",
    )
    assert acc.label() == "accelerate (MULTI_CPU)"
    ds = DeepSpeedEngine(zero3, device="cpu")
    assert ds.label() == "deepspeed ZeRO-3, bf16 (fp32 masters), optimizer offloaded to cpu"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_two_processes_match_single_process_and_resume_exactly(setup, single, tmp_path):
    # --fsdp full_shard: every weight a DTensor row shard; AdamW element-wise on the shards, GaLore /
    # GoLore project the row shards (their SVD / random projectors from the gathered matrix). GoLore is
    # also stopped at its step-3 checkpoint and resumed (projectors, moments, step counters and the
    # random-projector RNG restored) in the same launch. AdamW runs under --fsdp shard_grad_op (the
    # gathered weights kept from forward to backward): the same arithmetic. GaLore 8-bit steps each
    # sharded parameter whole on an owner rank (its 8-bit state there only); stopped and resumed too,
    # and run again under --fsdp "full_shard offload" (CPUOffloadPolicy: the same arithmetic here)
    runs = {m: tmp_path / m for m in ("adamw", "galore", "golore", "galore8bit")}
    fsdp = ["--fsdp", "full_shard"]
    mode = {
        "adamw": ["--fsdp", "shard_grad_op"],
        "galore": fsdp,
        "golore": fsdp,
        "galore8bit": fsdp,
    }
    argvs = [_argv(setup, out, m, *mode[m]) for m, out in runs.items()]
    offloaded = tmp_path / "galore8bit_offload"
    argvs.append(_argv(setup, offloaded, "galore8bit", "--fsdp", "full_shard offload"))
    resumed = tmp_path / "golore_resumed"
    resumed8 = tmp_path / "galore8bit_resumed"
    for method, out in (("golore", resumed), ("galore8bit", resumed8)):
        argvs += [
            _argv(setup, out, method, *fsdp, "--stop_at_step", str(SAVE_EVERY)),
            _argv(setup, out, method, *fsdp, "--autoresume"),
        ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port())]  # fmt: skip
    log = _launch(cmd, argvs, tmp_path)
    for r in (0, 1):  # every rank says which engine ran
        assert (
            f"[loralab.runners] rank {r}/2: engine fsdp2 (fully_shard, reshard after forward; "
            "launched by torchrun) on cpu"
        ) in log
        assert (
            f"[loralab.runners] rank {r}/2: engine fsdp2 (fully_shard, no reshard after forward; "
            "launched by torchrun) on cpu"
        ) in log
    for method, out in runs.items():
        _assert_same_run(out, single(method)[0], rtol=RTOL_8BIT if method == "galore8bit" else RTOL)
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["engine"] == "fsdp2"
        assert {p.name for p in (out / "checkpoint-6").iterdir()} >= {
            "model", "optimizer_rank0.pt", "optimizer_rank1.pt", "rng_state_rank0.pt", "rng_state_rank1.pt",
        }  # fmt: skip
        # final_model/ is the whole model gathered from the shards: a plain LlamaForCausalLM
        _check_final_model(out, summary)
    state = torch.load(resumed / "checkpoint-3" / "optimizer_rank1.pt", weights_only=True)
    keys = {k for st in state["state"].values() for k in st}
    assert {"exp_avg", "step"} <= keys and any(k.startswith("proj") for k in keys), keys
    ref = json.loads((runs["golore"] / "run_summary.json").read_text())
    got = json.loads((resumed / "run_summary.json").read_text())
    assert got["finished"] and _train_losses(resumed) == _train_losses(runs["golore"])
    assert got["final_eval_loss"] == ref["final_eval_loss"]
    assert got["n_projector_resets"] == ref["n_projector_resets"]
    # 8-bit: each rank's file holds the uint8 moments of the parameters it owns
    owned = [
        torch.load(resumed8 / "checkpoint-3" / f"optimizer_rank{r}.pt", weights_only=True)
        for r in (0, 1)
    ]
    assert all(
        any(st.get("state1", torch.empty(0)).dtype == torch.uint8 for st in o["state"].values())
        for o in owned
    )
    assert _train_losses(resumed8) == _train_losses(runs["galore8bit"])
    assert "reshard after forward, parameters offloaded to cpu; launched by torchrun" in log
    assert _train_losses(offloaded) == _train_losses(runs["galore8bit"])
    off = json.loads((offloaded / "run_summary.json").read_text())
    assert (
        off["final_eval_loss"]
        == json.loads((runs["galore8bit"] / "run_summary.json").read_text())["final_eval_loss"]
    )
    ref8 = json.loads((runs["galore8bit"] / "run_summary.json").read_text())
    assert (
        json.loads((resumed8 / "run_summary.json").read_text())["final_eval_loss"]
        == ref8["final_eval_loss"]
    )
