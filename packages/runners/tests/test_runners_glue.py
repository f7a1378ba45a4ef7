"""GLUE entrypoint: official metrics vs float64 references, every method end to end on a tiny RoBERTa with
fixture files in the GLUE formats, metrics JSONL / config echo / tensorboard, and errors naming the flag."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from loralab.runners import glue
from loralab.runners.methods import METHODS, MethodError

STEPS = 3


def common(model: str, files: dict, out: Path, task: str = "sst2") -> list[str]:
    return [
        "--model_name_or_path", model,
        "--task_name", task,
        "--train_file", files["train"],
        "--validation_file", files["validation"],
        "--output_dir", str(out),
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--max_length", "64",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- metrics vs float64 references


def mcc_reference(y: np.ndarray, p: np.ndarray) -> float:
    # Gorodkin's multiclass R_K from the confusion matrix, float64
    k = int(max(y.max(), p.max())) + 1
    c = np.zeros((k, k))
    for t, q in zip(y, p):
        c[t, q] += 1
    s, tr = c.sum(), np.trace(c)
    t_k, p_k = c.sum(1), c.sum(0)
    return (tr * s - t_k @ p_k) / np.sqrt((s * s - p_k @ p_k) * (s * s - t_k @ t_k))


def test_matthews_matches_phi_coefficient_and_multiclass_formula():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.7, y, 1 - y)
    # binary MCC = Pearson correlation of the 0/1 vectors (phi coefficient)
    assert glue.matthews_corrcoef(y, p) == pytest.approx(stats.pearsonr(y, p)[0], abs=1e-12)
    y3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    p3[:150] = y3[:150]
    assert glue.matthews_corrcoef(y3, p3) == pytest.approx(mcc_reference(y3, p3), abs=1e-12)
    # constant predictions: sklearn's convention is 0
    assert glue.matthews_corrcoef(y, np.zeros_like(y)) == 0.0


def test_pearson_spearman_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.normal(size=100)
    y = x + rng.normal(size=100)
    ties_x, ties_y = np.round(x * 2) / 2, np.round(y)  # STS-B labels are coarse: many ties
    for a, b in ((x, y), (ties_x, ties_y)):
        m = glue.glue_metrics("stsb", a, b)
        assert m["pearson"] == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
        assert m["spearmanr"] == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)


def test_accuracy_and_f1_against_counts():
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 2, 97), rng.integers(0, 2, 97)
    tp = np.sum((p == 1) & (y == 1))
    precision, recall = tp / np.sum(p == 1), tp / np.sum(y == 1)
    for task in ("mrpc", "qqp"):
        m = glue.glue_metrics(task, p, y)
        assert m["accuracy"] == pytest.approx(np.mean(p == y), abs=1e-15)
        assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)
    for task in ("sst2", "rte", "qnli", "mnli", "wnli"):
        assert set(glue.glue_metrics(task, p, y)) == {"accuracy"}
    assert set(glue.glue_metrics("cola", p, y)) == {"matthews_correlation"}


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def roberta_dir(tiny_dirs):
    return tiny_dirs["roberta"]


@pytest.mark.parametrize("method", METHODS)  # every method: a missing package fails, never skips
def test_every_method_trains_and_evaluates_sst2(method, roberta_dir, glue_files, tmp_path, helpers):
    out = tmp_path / method
    metrics = glue.main(
        [
            *common(roberta_dir, glue_files, out),
            "--method",
            method,
            "--max_steps",
            str(STEPS),
            *helpers.method_flags(method),
        ]
    )
    assert set(metrics) == {"accuracy", "num_examples"}
    assert metrics["num_examples"] == 16 and 0.0 <= metrics["accuracy"] <= 1.0
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert records[-1]["kind"] == "summary" and records[-1]["eval_accuracy"] == metrics["accuracy"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == method and config["task_name"] == "sst2"
    final = out / "final"
    assert (
        final
        / (
            "model.safetensors"
            if method in ("full", "galore", "golore")
            else "adapter_model.safetensors"
        )
    ).is_file()
    assert (final / "tokenizer_config.json").is_file()
    # final/ loaded the bare way (PeftModel on the original base, or AutoModel) reproduces the logits of
    # the run's final evaluation (LoRA-GA: the rank-2r export; LoRA-SB: R folded into B)
    rows = read_jsonl(out / "eval_predictions.jsonl")
    assert [r["idx"] for r in rows] == list(range(16))
    assert set(rows[0]) == {"idx", "label", "logits"} and len(rows[0]["logits"]) == 2
    model = helpers.reload_final(
        roberta_dir, final, "AutoModelForSequenceClassification", num_labels=2
    )
    assert_reproduces_logits(model, final, glue_files["validation"], rows)


def assert_reproduces_logits(model, final: Path, validation_file: str, rows: list[dict]) -> None:
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from loralab.runners.data import load_split, pad_collate

    tokenizer = AutoTokenizer.from_pretrained(str(final))
    args = SimpleNamespace(task_name="sst2", max_length=64)
    raw = load_split(None, None, "validation", validation_file, arg="--validation_file")
    examples, idx = glue.encode_glue(raw, tokenizer, args, "validation")
    assert idx == [r["idx"] for r in rows]
    assert [e["labels"] for e in examples] == [r["label"] for r in rows]
    with torch.no_grad():
        batch = pad_collate(tokenizer.pad_token_id)(examples)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # float32 forward of the same function; LoRA-GA's export regroups W0' + s·B·A as W0 + s·B'·A'
    torch.testing.assert_close(
        logits, torch.tensor([r["logits"] for r in rows]), rtol=1e-4, atol=1e-5
    )


def test_lora_trains_the_head_and_the_adapters_only(roberta_dir, glue_files, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora"
    glue.main(
        [
            *common(roberta_dir, glue_files, out),
            "--method",
            "lora",
            "--lora_r",
            "4",
            "--max_steps",
            "4",
        ]
    )
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)
    assert not any("embeddings" in k for k in saved)
    base = AutoModelForSequenceClassification.from_pretrained(roberta_dir)
    model = PeftModel.from_pretrained(base, out / "final")
    assert model.peft_config["default"].r == 4


def test_learns_sst2_fixture_with_full_fine_tuning(roberta_dir, tmp_path, helpers):
    # the fixture's label is carried by its sentiment words: 60 steps on 128 examples must generalise to
    # the held-out sentences well above the majority class (a plain AdamW loop reaches ~0.95 there too)
    sst2_rows, write_jsonl = helpers.sst2_rows, helpers.write_jsonl
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", sst2_rows(128, 3)),
        "validation": write_jsonl(tmp_path / "dev.jsonl", sst2_rows(32, 4)),
    }
    labels = [r["label"] for r in sst2_rows(32, 4)]
    majority = max(np.mean(labels), 1 - np.mean(labels))
    flags = [
        "--max_steps",
        "60",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "constant",
    ]
    metrics = glue.main(
        [
            *common(roberta_dir, files, tmp_path / "out"),
            "--method",
            "full",
            *flags,
            "--save_final_model",
            "false",
        ]
    )
    assert metrics["accuracy"] >= 0.8 and metrics["accuracy"] > majority + 0.2, (metrics, majority)


def stsb_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "a man woman is playing guitar cooking riding horse dog running".split()
    rows = []
    for i in range(n):
        s1 = rng.choices(words, k=5)
        s2 = s1[:3] + rng.choices(words, k=2)
        rows.append(
            {
                "sentence1": " ".join(s1),
                "sentence2": " ".join(s2),
                "label": round(rng.uniform(0, 5), 2),
                "idx": i,
            }
        )
    return rows


def _write_csv(path, rows, delimiter=","):
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _lora_two_steps(model, files, out, task):
    argv = [*common(model, files, out, task=task), "--method", "lora", "--max_steps", "2"]
    return glue.main([*argv, "--save_final_model", "false"])


def test_stsb_regression_from_tsv_and_cola_from_csv(roberta_dir, tmp_path, helpers):
    # GLUE's own files are TSV; the hub's csv/json exports keep the nyu-mll/glue column names
    from loralab.core.testing import save_tiny, tiny_roberta

    model1 = str(save_tiny(tiny_roberta(num_labels=1), tmp_path / "roberta1"))
    files = {
        split: _write_csv(tmp_path / f"stsb_{split}.tsv", stsb_rows(16, seed), delimiter="\t")
        for split, seed in (("train", 0), ("validation", 1))
    }
    m = _lora_two_steps(model1, files, tmp_path / "stsb", "stsb")
    assert set(m) == {"pearson", "spearmanr", "num_examples"} and -1 <= m["pearson"] <= 1

    files = {
        split: _write_csv(tmp_path / f"cola_{split}.csv", helpers.sst2_rows(16, seed))
        for split, seed in (("train", 0), ("validation", 1))
    }
    m = _lora_two_steps(roberta_dir, files, tmp_path / "cola", "cola")
    assert set(m) == {"matthews_correlation", "num_examples"}


def test_t5_sequence_classification_mrpc(tiny_dirs, tmp_path, helpers):
    rows = [
        {"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": i % 2, "idx": i}
        for i, r in enumerate(stsb_rows(16, 0))
    ]
    files = {
        "train": helpers.write_jsonl(tmp_path / "mrpc_train.jsonl", rows),
        "validation": helpers.write_jsonl(tmp_path / "mrpc_dev.jsonl", rows[:8]),
    }
    out = tmp_path / "t5"
    m = glue.main(
        [
            *common(tiny_dirs["t5"], files, out, task="mrpc"),
            "--method",
            "lora",
            "--lora_r",
            "4",
            "--max_steps",
            "2",
        ]
    )
    assert set(m) == {"accuracy", "f1", "num_examples"}
    from safetensors.torch import load_file

    # T5's head is `classification_head`: kept trainable and saved with the adapter
    assert any(
        "classification_head" in k for k in load_file(out / "final" / "adapter_model.safetensors")
    )


def test_bf16_gradient_accumulation_checkpointing_tensorboard(
    roberta_dir, glue_files, tmp_path, capsys
):
    out = tmp_path / "run"
    flags = [
        "--bf16",
        "true",
        "--gradient_accumulation_steps",
        "2",
        "--gradient_checkpointing",
        "true",
        "--report_to",
        "tensorboard",
        "--eval_steps",
        "1",
    ]
    m = glue.main(
        [
            *common(roberta_dir, glue_files, out),
            "--method",
            "lora",
            "--max_steps",
            "2",
            "--save_final_model",
            "false",
            *flags,
        ]
    )
    assert 0 <= m["accuracy"] <= 1
    printed = capsys.readouterr().out
    assert "[loralab.runners] config:" in printed and '"gradient_accumulation_steps": 2' in printed
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"


# ---------------------------------------------------------------- bad input names the argument


def test_unknown_task_names_the_flag(roberta_dir, glue_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        glue.main([*common(roberta_dir, glue_files, tmp_path, task="sst3")])
    assert "--task_name" in capsys.readouterr().err


def test_missing_column_names_the_file_and_column(roberta_dir, tmp_path, helpers):
    rows = [{"text": "good movie", "label": 1}] * 8
    files = {
        "train": helpers.write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": helpers.write_jsonl(tmp_path / "dev.jsonl", rows),
    }
    with pytest.raises(ValueError, match=r"--train_file .*train.jsonl lacks column\(s\) sentence"):
        glue.main(common(roberta_dir, files, tmp_path / "out"))


def test_missing_file_and_bad_extension(roberta_dir, glue_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="--validation_file"):
        glue.main(
            [
                *common(roberta_dir, glue_files, tmp_path),
                "--validation_file",
                str(tmp_path / "nope.jsonl"),
            ]
        )
    bad = tmp_path / "train.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"--train_file .*unsupported extension '.txt'"):
        # not tmp_path itself: a non-empty --output_dir is refused before the data is read
        glue.main([*common(roberta_dir, glue_files, tmp_path / "out"), "--train_file", str(bad)])


def test_method_option_of_another_method_is_rejected(roberta_dir, glue_files, tmp_path):
    with pytest.raises(MethodError, match="--rand_ratio does not apply to --method lora"):
        glue.main(
            [*common(roberta_dir, glue_files, tmp_path), "--method", "lora", "--rand_ratio", "0.5"]
        )
    with pytest.raises(ValueError, match="--per_device_train_batch_size must be >= 1"):
        glue.main(
            [*common(roberta_dir, glue_files, tmp_path), "--per_device_train_batch_size", "0"]
        )


def test_too_few_examples_for_a_batch(roberta_dir, glue_files, tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        glue.main([*common(roberta_dir, glue_files, tmp_path), "--max_train_samples", "2"])


def test_max_samples_truncate(roberta_dir, glue_files, tmp_path):
    m = glue.main(
        [
            *common(roberta_dir, glue_files, tmp_path),
            "--method",
            "lora",
            "--max_steps",
            "1",
            "--max_eval_samples",
            "5",
            "--save_final_model",
            "false",
        ]
    )
    assert m["num_examples"] == 5


def test_non_finite_loss_is_reported(roberta_dir, glue_files, tmp_path, monkeypatch):
    from transformers import RobertaForSequenceClassification

    forward = RobertaForSequenceClassification.forward

    def nan_forward(self, *a, **kw):
        out = forward(self, *a, **kw)
        if out.loss is not None:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(RobertaForSequenceClassification, "forward", nan_forward)
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 1"):
        glue.main(
            [*common(roberta_dir, glue_files, tmp_path), "--method", "full", "--max_steps", "2"]
        )
