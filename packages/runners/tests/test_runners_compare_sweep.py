"""``loralab compare --sweep --seeds N``: the learning-rate choice (on the held-out split, never the
reported validation split), the gap-closed score and steps-to-target arithmetic, the seed folding,
bad flags, and one real sweep on a tiny model."""

from __future__ import annotations

import json
import math

import pytest

from loralab.runners.cli import main as loralab_main
from loralab.runners.compare import CompareConfig, report, run_compare, run_id
from loralab.runners.compare.checks import DEFAULT_LR_FACTORS, check_compare_sweep
from loralab.runners.compare.task import CompareData
from loralab.runners.compare.testing import smoke_config
from loralab.runners.preflight import PreflightError

METRIC = "accuracy"


def _run(method, factor, seed=42, *, heldout, val, heldout_loss=0.5, status="ok", losses=None):
    return {
        "kind": "summary",
        "method": method,
        "run": run_id(method, factor, seed, 42),
        "lr_factor": factor,
        "seed": seed,
        "status": status,
        "heldout_accuracy": heldout,
        "heldout_loss": heldout_loss,
        "eval_accuracy": val,
        "eval_loss": 1.0 - val,
        "hparams": {"learning_rate": 1e-3 * factor},
        "train_losses": losses or [1.0, 0.5],
    }


# ------------------------------------------------------------------------- the choice of factor


def test_sweep_chooses_on_heldout_not_on_the_reported_validation_split():
    runs = [
        # best on validation, worst on the held-out split
        _run("lora", 0.25, heldout=0.70, val=0.99),
        _run("lora", 1.0, heldout=0.90, val=0.80),
        _run("lora", 4.0, heldout=0.80, val=0.95),
    ]
    assert report.choose_lr_factor(runs, METRIC) == 1.0
    # changing only the validation scores changes nothing
    flipped = [{**r, "eval_accuracy": 1.0 - r["eval_accuracy"]} for r in runs]
    assert report.choose_lr_factor(flipped, METRIC) == 1.0


def test_sweep_choice_ties_failures_and_nothing_left():
    runs = [
        _run("lora", 1.0, heldout=0.9, val=0.5, heldout_loss=0.30),
        _run("lora", 4.0, heldout=0.9, val=0.5, heldout_loss=0.20),  # same score, lower loss
        _run("lora", 16.0, heldout=1.0, val=1.0, status="failed: loss is nan"),
        {**_run("lora", 0.5, heldout=0.0, val=0.0), "heldout_accuracy": math.nan},
    ]
    assert report.choose_lr_factor(runs, METRIC) == 4.0
    same = [_run("lora", f, heldout=0.9, val=0.5, heldout_loss=0.2) for f in (4.0, 1.0)]
    assert report.choose_lr_factor(same, METRIC) == 1.0  # full tie: the smaller factor
    assert report.choose_lr_factor(runs[2:], METRIC) is None


def test_heldout_rows_are_disjoint_from_training_and_fixed_across_seeds():
    rows = [{"input_ids": [i + 1], "labels": i % 4} for i in range(50)]
    data = CompareData("embedded", rows, rows[:5], 4, METRIC, 0)
    split = data.split_heldout(0.1)
    assert len(split.heldout) == 5 and len(split.train) == 45
    train_ids = {r["input_ids"][0] for r in split.train}
    held_ids = {r["input_ids"][0] for r in split.heldout}
    assert not train_ids & held_ids and len(train_ids | held_ids) == 50
    # no training batch of any seed holds a held-out row
    for seed in (0, 1, 2):
        for batch in split.train_batches(20, 8, seed):
            assert not set(batch["input_ids"][:, 0].tolist()) & held_ids
    assert data.split_heldout(0.1).heldout == split.heldout  # the draw ignores --seed
    assert data.split_heldout(0.0).heldout == [] and len(data.split_heldout(0.0).train) == 50
    with pytest.raises(ValueError, match=r"--heldout_fraction must be in \[0, 1\), got 1.0"):
        data.split_heldout(1.0)
    with pytest.raises(ValueError, match="leaves no training example of 1"):
        CompareData("embedded", rows[:1], rows[:1], 4, METRIC, 0).split_heldout(0.5)


# --------------------------------------------------------------------------------- the scores


@pytest.mark.parametrize(
    ("value", "lora", "full", "expected"),
    [
        (0.8, 0.7, 0.9, 0.5),
        (0.7, 0.7, 0.9, 0.0),
        (0.9, 0.7, 0.9, 1.0),
        (0.95, 0.7, 0.9, 1.25),  # better than full fine-tuning
        (0.6, 0.7, 0.9, -0.5),  # worse than LoRA
        (0.2, 0.5, 0.3, 1.5),  # a metric where full is below LoRA: the same formula
    ],
)
def test_gap_closed_arithmetic(value, lora, full, expected):
    assert report.gap_closed(value, lora, full) == pytest.approx(expected, abs=1e-12)


def test_gap_closed_is_undefined_without_a_gap_or_a_value():
    assert math.isnan(report.gap_closed(0.8, 0.9, 0.9))
    assert math.isnan(report.gap_closed(math.nan, 0.7, 0.9))
    assert math.isnan(report.gap_closed(0.8, 0.7, None))


def test_steps_to_target_and_the_target():
    # full starts at 2.0 and its smoothed curve ends at 0.0: 90 % of the way down is 0.2
    assert report.loss_target([2.0] + [0.0] * 20, fraction=0.9) == pytest.approx(0.2)
    full = [2.0 - 0.1 * i for i in range(21)]  # 2.0 ... 0.0, linear
    smooth = report.moving_average(full)
    target = report.loss_target(full)
    assert target == pytest.approx(2.0 - 0.9 * (2.0 - smooth[-1]))
    step = report.steps_to_target(full, target)
    assert smooth[step - 1] <= target < smooth[step - 2]
    assert report.steps_to_target([5.0] * 30, target) is None
    assert report.steps_to_target([0.1, 0.1], 0.2, window=1) == 1


def test_mean_std():
    assert report.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert report.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in report.mean_std([]))


def test_aggregate_folds_seeds_at_the_chosen_factor_and_scores_against_full_and_lora():
    full_curve = [1.0 - 0.05 * i for i in range(20)]  # 1.0 -> 0.05
    runs = [
        _run("full", 1.0, 42, heldout=0.9, val=0.90, losses=full_curve),
        _run("full", 1.0, 43, heldout=0.9, val=0.94, losses=full_curve),
        _run("lora", 1.0, 42, heldout=0.9, val=0.70, losses=[1.0] * 20),
        _run("lora", 1.0, 43, heldout=0.9, val=0.74, losses=[1.0] * 20),
        _run("x", 4.0, 42, heldout=0.9, val=0.80, losses=full_curve),
        _run("x", 4.0, 43, heldout=0.9, val=0.84, losses=full_curve),
        _run("x", 1.0, 42, heldout=0.1, val=0.99),  # an unchosen factor: ignored
    ]
    summaries = {r["run"]: r for r in runs}
    rows = report.aggregate(summaries, {"full": 1.0, "lora": 1.0, "x": 4.0}, METRIC)
    assert rows["x"]["eval_accuracy"] == pytest.approx(0.82)
    assert rows["x"]["eval_accuracy_std"] == pytest.approx(math.sqrt(2) * 0.02)
    assert rows["x"]["seeds"] == 2 and rows["x"]["lr_factor"] == 4.0
    assert rows["x"]["learning_rate"] == pytest.approx(4e-3)
    # (0.82 - 0.72) / (0.92 - 0.72)
    assert rows["x"]["gap_closed"] == pytest.approx(0.5)
    assert rows["full"]["gap_closed"] == pytest.approx(1.0)
    assert rows["lora"]["gap_closed"] == pytest.approx(0.0)
    target = report.loss_target(full_curve)
    assert rows["x"]["steps_to_target"] == report.steps_to_target(full_curve, target)
    assert rows["lora"]["steps_to_target"] is None and rows["lora"]["steps_to_target_reached"] == 0
    table = report.markdown_table(rows, METRIC)
    assert "| x | 0.004 (4×) |" in table
    assert "0.8200 ± 0.0283 | 0.50 |" in table
    assert "| never |" in table
    sweep = report.sweep_table(summaries, ["x"], [1.0, 4.0], METRIC, {"x": 4.0}, 42)
    assert "| x | 0.1000 (0.5000) @ 0.001 | **0.9000 (0.5000) @ 0.004** |" in sweep


def test_aggregate_without_full_or_lora_leaves_the_scores_empty():
    rows = report.aggregate({"x": _run("x", 1.0, heldout=0.9, val=0.8)}, {"x": 1.0}, METRIC)
    assert math.isnan(rows["x"]["gap_closed"]) and "steps_to_target" not in rows["x"]
    assert "| – | – |" in report.markdown_table(rows, METRIC)


def test_run_ids():
    assert run_id("lora-ga", 1.0, 42, 42) == "lora-ga"
    assert run_id("lora-ga", 0.25, 42, 42) == "lora-ga_lr0.25"
    assert run_id("lora-ga", 1.0, 44, 42) == "lora-ga_seed44"


# --------------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sweep", "--lr_factors"], "--lr_factors: give at least one factor"),
        (["--sweep", "--lr_factors", "0", "1"], "--lr_factors must be positive finite"),
        (["--sweep", "--lr_factors", "-2"], "got -2"),
        (["--sweep", "--lr_factors", "nan"], "--lr_factors must be positive finite"),
        (["--sweep", "--lr_factors", "1", "1"], "--lr_factors lists a factor twice: 1 1"),
        (["--lr_factors", "1", "2"], "--lr_factors 1.0 2.0 is only used with --sweep"),
        (["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
        (["--seeds", "-1"], "--seeds must be an integer >= 1, got -1"),
        (["--heldout_fraction", "1"], r"--heldout_fraction must be in [0, 1), got 1.0"),
        (["--sweep", "--heldout_fraction", "0"], "--heldout_fraction must be > 0, got 0"),
    ],
)
def test_bad_sweep_flags_fail_before_any_model_loads(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    assert loralab_main(["compare", "--model", "tiny", "--output_dir", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written: no tiny model, no runs/


def test_check_compare_sweep_returns_the_grid():
    assert check_compare_sweep(CompareConfig(sweep=True)) == DEFAULT_LR_FACTORS
    assert check_compare_sweep(CompareConfig(sweep=True, lr_factors=[2, 0.5])) == (2.0, 0.5)
    assert check_compare_sweep(CompareConfig()) == (1.0,)
    with pytest.raises(PreflightError, match="--seeds must be an integer >= 1, got 0"):
        check_compare_sweep(CompareConfig(seeds=0))


# --------------------------------------------------------------------------------- a real sweep

SWEEP_SMOKE = dict(steps=4, batch_size=4, max_train_samples=40)
"""The smoke comparison with enough training rows for a held-out split."""


@pytest.mark.slow
def test_sweep_with_seeds_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    summaries = run_compare(
        smoke_config(
            str(out),
            methods=["full", "lora"],
            sweep=True,
            lr_factors=[1.0, 8.0],
            seeds=2,
            **SWEEP_SMOKE,
        ),
        command="loralab compare --sweep --seeds 2",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runs = {r["run"]: r for r in records if r["kind"] == "summary"}
    # every factor once at --seed, then the second seed at the chosen factor: 3 runs per method
    for method in ("full", "lora"):
        mine = [r for r in runs.values() if r["method"] == method]
        assert len(mine) == 3 and all(r["status"] == "ok" for r in mine)
        chosen = report.choose_lr_factor([r for r in mine if r["seed"] == 42], "accuracy")
        assert {r["chosen_lr_factor"] for r in mine} == {chosen}
        assert summaries[method]["lr_factor"] == chosen and summaries[method]["seeds"] == 2
        assert sorted(r["seed"] for r in mine if r["lr_factor"] == chosen) == [42, 43]
        # the factor multiplies the recipe's learning rate
        base = report.summarize(records)[method]["hparams"]["learning_rate"]
        lr8 = runs[run_id(method, 8.0, 42, 42)]["hparams"]["learning_rate"]
        assert lr8 == pytest.approx(8 * base)
        # 10 % of the 40 training rows held out and scored at the end
        assert all("heldout_accuracy" in r and "heldout_loss" in r for r in mine)
    assert summaries["full"]["gap_closed"] == pytest.approx(1.0) or math.isnan(
        summaries["full"]["gap_closed"]
    )
    table = (out / "results.md").read_text()
    assert "## Learning-rate sweep" in table and "**" in table
    assert "±" in table and "2 seeds per method" in table
    assert (out / "loss_vs_step.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["lr_factors"] == [1.0, 8.0] and len(config["runs"]["lora"]) == 3
