"""Interrupt and resume: a run killed (``os._exit``, no cleanup) right after its first checkpoint and resumed
with ``--resume_from_checkpoint latest`` reaches the same losses and final metrics as an uninterrupted run.

GoLore (optimizer state with projectors, a step counter and a random-projector RNG) on GLUE, and LoRA-GA
(gradient-estimated init and an offset base weight, not re-estimated on resume) on MetaMath.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.runners import glue, metamath
from loralab.runners.loop import CRASH_ENV

STEPS, SAVE = 4, 2


def glue_argv(tiny_dirs, glue_files, metamath_files, out: Path) -> list[str]:
    return ["--model_name_or_path", tiny_dirs["roberta"], "--task_name", "sst2", "--train_file", glue_files["train"],
            "--validation_file", glue_files["validation"], "--method", "golore", "--galore_rank", "4", "--update_proj_gap", "1",
            "--rand_ratio", "0.5", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"]  # fmt: skip


def metamath_argv(tiny_dirs, glue_files, metamath_files, out: Path) -> list[str]:
    return ["--model_name_or_path", tiny_dirs["llama"], "--train_file", metamath_files["train"], "--eval_file", metamath_files["eval"],
            "--method", "lora-ga", "--lora_r", "4", "--ga_iters", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--max_length", "96", "--max_new_tokens", "4", "--prompt_template", "qa"]  # fmt: skip


CASES = {
    "glue-golore": ("loralab.runners.glue", glue.main, glue_argv),
    "metamath-lora-ga": ("loralab.runners.metamath", metamath.main, metamath_argv),
}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_killed_after_first_checkpoint_and_resumed_matches_uninterrupted(
    case, tiny_dirs, glue_files, metamath_files, tmp_path
):
    module, main, make = CASES[case]

    def argv(out: Path) -> list[str]:
        flags = [
            "--output_dir",
            str(out),
            "--max_steps",
            str(STEPS),
            "--save_steps",
            str(SAVE),
            "--logging_steps",
            "1",
            "--disable_tqdm",
            "true",
        ]
        return [*make(tiny_dirs, glue_files, metamath_files, out), *flags]

    full = tmp_path / "uninterrupted"
    expected = main(argv(full))

    out = tmp_path / "interrupted"
    env = {**os.environ, CRASH_ENV: str(SAVE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 17, proc.stderr[-4000:]
    assert (out / f"checkpoint-{SAVE}" / "trainer_state.json").is_file() and not (
        out / "final"
    ).exists()
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]

    resumed = main([*argv(out), "--resume_from_checkpoint", "latest"])
    assert resumed == pytest.approx(expected, rel=1e-6, abs=1e-9)
    got, want = records(out), records(full)
    # the resumed run's log continues the killed one's: steps 1..4 once each, the same losses
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in got if "loss" in r] == pytest.approx(
        [r["loss"] for r in want if "loss" in r], rel=1e-6
    )
    assert (out / "final").is_dir()


def test_resume_errors_name_the_flag(tiny_dirs, glue_files, metamath_files, tmp_path):
    base = [
        *glue_argv(tiny_dirs, glue_files, metamath_files, tmp_path),
        "--output_dir",
        str(tmp_path / "empty"),
        "--max_steps",
        "2",
    ]
    with pytest.raises(
        FileNotFoundError, match="--resume_from_checkpoint latest: no checkpoint-N directory"
    ):
        glue.main([*base, "--resume_from_checkpoint", "latest"])
    with pytest.raises(
        FileNotFoundError, match=r"--resume_from_checkpoint .*nope: not a checkpoint"
    ):
        glue.main([*base, "--resume_from_checkpoint", str(tmp_path / "nope")])
