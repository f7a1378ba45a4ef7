"""C4 runner options beyond the method runs: bf16, activation checkpointing, TensorBoard, checkpoint
rotation, ReLoRA's jagged schedule, running out of data, and the hub streaming path (``datasets``
streaming over local json files, split by stream, resumable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loralab.runners.c4 import parse_args, run
from loralab.runners.c4.data import HubSource, LocalSource, find_shards
from loralab.runners.c4.testing import write_tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(
        tmp_path_factory.mktemp("c4opt") / "setup", train_docs=60, validation_docs=8
    )


def _argv(setup: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(out), "--model_config", setup["model_config"], "--tokenizer", setup["tokenizer"],
        "--train_data", setup["train_data"], "--max_length", "32", "--batch_size", "4", "--warmup_steps", "1",
        "--lr", "3e-3", "--eval_tokens", "256", "--plot", "false", *extra,
    ]  # fmt: skip


def _records(out: Path, kind: str) -> list[dict]:
    return [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == kind
    ]


def test_bf16_checkpointing_tensorboard_rotation_and_jagged_schedule(setup, tmp_path):
    out = tmp_path / "run"
    summary = run(parse_args(_argv(
        setup, out, "--num_training_steps", "6", "--dtype", "bfloat16", "--activation_checkpointing", "--report_to", "tensorboard",
        "--save_every", "2", "--keep_checkpoints", "1", "--eval_every", "6", "--optimizer", "golore_adamw", "--rank", "4",
        "--update_proj_gap", "3", "--rand_ratio", "0.5", "--scheduler", "cosine_restarts", "--restart_warmup_steps", "1",
    )))  # fmt: skip
    train = _records(out, "train")
    losses = [r["loss"] for r in train]
    assert summary["finished"] and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert {p.name for p in out.glob("checkpoint-*")} == {
        "checkpoint-6"
    }  # rotation kept the newest only
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # jagged cosine: the rate drops to 0 at the cycle start (step index 3, logged as step 4) and warms up again
    lrs = [
        r["learning_rate"] for r in train
    ]  # the rate after each step's scheduler.step(): lr of the next step
    assert lrs[2] == 0.0 and lrs[3] > 0.0


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (
            ["--optimizer", "adamw", "--rank", "7", "--rand_ratio", "0.3"],
            [
                "--rank belongs to --optimizer galore_adamw | golore_adamw | galore_adamw8bit | golore_adamw8bit | galore_sgd | golore_sgd and --use_peft --golore, not to --optimizer adamw",
                "--rand_ratio belongs to --optimizer golore_adamw | golore_adamw8bit | golore_sgd and --use_peft --golore, not to --optimizer adamw",
            ],
        ),
        (
            ["--optimizer", "galore_sgd", "--adam_eps", "1e-6", "--rand_ratio", "0.5"],
            [
                "--adam_eps belongs to --optimizer adamw | adam | galore_adamw | golore_adamw | galore_adamw8bit | golore_adamw8bit and --use_peft --golore --optimizer adamw, not to --optimizer galore_sgd",
                "--rand_ratio belongs to --optimizer golore_adamw | golore_adamw8bit | golore_sgd and --use_peft --golore, not to --optimizer galore_sgd",
            ],
        ),
        (
            ["--optimizer", "adamw", "--momentum", "0.5"],
            ["--momentum belongs to --optimizer sgd | galore_sgd | golore_sgd and --use_peft --golore --optimizer sgd"],
        ),
        (
            ["--use_peft", "--golore", "--proj_type", "left"],
            ["--proj_type belongs to --optimizer galore_adamw | golore_adamw | galore_adamw8bit | golore_adamw8bit | galore_sgd | golore_sgd, not to --use_peft --golore --optimizer adamw"],
        ),
        (
            ["--scheduler", "linear", "--min_lr_ratio", "0.2", "--cycle_length", "10"],
            [
                "--min_lr_ratio belongs to --scheduler cosine | cosine_restarts, not to --scheduler linear",
                "--cycle_length belongs to --scheduler cosine_restarts, not to --scheduler linear",
            ],
        ),
    ],
)  # fmt: skip
def test_options_of_another_optimizer_are_refused_at_parse_time(flags, refused):
    """Refused while parsing the command line, before anything is loaded; every flag is named."""
    with pytest.raises(ValueError, match=r"^options that this run would ignore: ") as info:
        parse_args(["--output_dir", "x", *flags])
    for text in refused:
        assert text in str(info.value)
    assert str(info.value).count("belongs to") == len(refused)


def test_unset_options_take_the_defaults_of_the_chosen_optimizer():
    golore = parse_args(["--output_dir", "x", "--optimizer", "golore_adamw"])
    assert (golore.rank, golore.update_proj_gap, golore.galore_scale, golore.rand_ratio) == (
        128,
        200,
        0.25,
        0.8,
    )
    assert (golore.adam_eps, golore.momentum, golore.proj_type) == (1e-6, None, "std")
    adamw = parse_args(["--output_dir", "x"])
    assert (adamw.rank, adamw.rand_ratio, adamw.adam_eps, adamw.min_lr_ratio) == (
        None,
        None,
        1e-8,
        0.1,
    )
    sgd = parse_args(["--output_dir", "x", "--optimizer", "sgd", "--scheduler", "constant"])
    assert (sgd.momentum, sgd.adam_beta1, sgd.min_lr_ratio) == (0.9, None, None)


@pytest.mark.parametrize(
    ("flags", "layer", "limit"),
    [
        # the tiny config: hidden 64, intermediate 128; q/k/v/o are 64 x 64
        (["--optimizer", "golore_adamw", "--rank", "128"], r"model\.layers\.0\.self_attn\.q_proj \(64 x 64", 64),
        (["--use_peft", "--golore", "--rank", "4096"], r"model\.layers\.0\.self_attn\.q_proj \(64 x 64", 64),
    ],
)  # fmt: skip
def test_rank_above_a_layer_width_is_refused_before_the_model_loads(
    setup, tmp_path, monkeypatch, flags, layer, limit
):
    import loralab.runners.c4.train as c4_train

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was built before the rank was checked")

    monkeypatch.setattr(c4_train, "build_model", no_loading)
    with pytest.raises(
        ValueError,
        match=rf"^--rank {flags[-1]} is larger than layer {layer}.*the largest valid rank for this model is {limit}$",
    ):
        run(parse_args(_argv(setup, tmp_path / "run", "--num_training_steps", "2", *flags)))


def test_running_out_of_data_stops_with_a_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    summary = run(
        parse_args(
            _argv(
                setup,
                out,
                "--num_training_steps",
                "1000",
                "--save_every",
                "1000",
                "--eval_every",
                "1000",
            )
        )
    )
    assert summary["data_exhausted"] and not summary["finished"] and 0 < summary["step"] < 1000
    assert (out / f"checkpoint-{summary['step']}").is_dir()
    assert math.isfinite(summary["final_eval_loss"])


def test_hub_streaming_path_splits_streams_and_resumes(setup):
    files = [str(p) for p in find_shards(setup["train_data"], "train")]
    hub = HubSource("json", None, "train", data_files=files, shuffle_seed=None)
    local = LocalSource(files, shuffle_seed=None)
    everything = list(hub.iter_stream(0, 1))
    assert everything == list(local.iter_stream(0, 1)) and len(everything) == 60
    parts = [list(hub.iter_stream(s, 2)) for s in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(everything) and not set(parts[0]) & set(parts[1])
    assert list(hub.iter_stream(1, 2, skip=5)) == parts[1][5:]
    with pytest.raises(KeyError, match="records have no 'body' field"):
        next(
            HubSource("json", None, "train", data_files=files, text_field="body").iter_stream(0, 1)
        )
    with pytest.raises(RuntimeError, match=r"could not stream --dataset .*pass --train_data"):
        next(HubSource("json", None, "train", data_files=[files[0] + ".missing"]).iter_stream(0, 1))
