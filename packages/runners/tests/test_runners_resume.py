"""Interrupt and resume: a run killed (``os._exit``, no cleanup) right after its first checkpoint and resumed
with ``--resume_from_checkpoint latest`` reaches the same losses and final metrics as an uninterrupted run.

GoLore (optimizer state with projectors, a step counter and a random-projector RNG) on GLUE, LoRA-GA
(gradient-estimated init and an offset base weight, not re-estimated on resume) on MetaMath, also on an
NF4 base (``--load_in_4bit``: the quantized weights come back with their statistics).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def quantized(method: str):
    """MetaMath on an NF4 base (``--load_in_4bit``): the checkpoint restores the quantized weights with
    their statistics (LoRA-GA's offset ``W0`` is quantized and trained from)."""

    def make(tiny_dirs, glue_files, metamath_files, out: Path) -> list[str]:
        argv = metamath_argv(tiny_dirs, glue_files, metamath_files, out)
        argv[argv.index("lora-ga")] = method
        if method != "lora-ga":
            i = argv.index("--ga_iters")
            del argv[i : i + 2]
        return [*argv, "--load_in_4bit"]

    return make


CASES = {
    "glue-golore": ("loralab.runners.glue", glue.main, glue_argv),
    "metamath-lora-ga": ("loralab.runners.metamath", metamath.main, metamath_argv),
    "metamath-lora-ga-4bit": ("loralab.runners.metamath", metamath.main, quantized("lora-ga")),
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

    # every run with one thread, as the killed subprocess: float32 sums in the same order, so the
    # resumed run must reproduce the uninterrupted one exactly (with the default threads the order
    # differed: 1.8e-7 on an AVX512/AMX CPU, above float32 noise on older ones)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = tmp_path / "uninterrupted"
        expected = main(argv(full))
        resumed = _interrupt_and_resume(module, main, argv, tmp_path / "interrupted")
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "interrupted"
    assert resumed == pytest.approx(expected, rel=1e-6, abs=1e-9)

    got, want = records(out), records(full)
    # the resumed run's log continues the killed one's: steps 1..4 once each, the same losses
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in got if "loss" in r] == pytest.approx(
        [r["loss"] for r in want if "loss" in r], rel=1e-6
    )
    # and its final/ export is the uninterrupted run's (LoRA-GA: the initial factors the rank-2r export
    # needs come back from the checkpoint, they are not re-estimated)
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if case.startswith("metamath") else "model.safetensors"
    got_w, want_w = load_file(out / "final" / name), load_file(full / "final" / name)
    assert got_w.keys() == want_w.keys()
    for k in want_w:
        assert torch.equal(got_w[k], want_w[k]), k


def _interrupt_and_resume(module, main, argv, out: Path):
    """Run ``module`` in a subprocess killed right after the first checkpoint, then resume it here."""
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
    return main([*argv(out), "--resume_from_checkpoint", "latest"])


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


THREE_STEPS_SAVING_EACH = ("--max_steps", "3", "--save_steps", "1", "--learning_rate", "1e-3")


def lora_argv(tiny_dirs, glue_files, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", tiny_dirs["roberta"], "--task_name", "sst2", "--train_file", glue_files["train"],
            "--validation_file", glue_files["validation"], "--method", "lora", "--lora_r", "4",
            "--per_device_train_batch_size", "4", "--output_dir", str(out), "--disable_tqdm", "true",
            "--logging_steps", "1", *extra]  # fmt: skip


def test_a_finished_output_dir_is_refused_before_the_model_loads(
    tiny_dirs, glue_files, tmp_path, monkeypatch
):
    from loralab.runners.loop import OutputDirError

    out = tmp_path / "run"
    glue.main(lora_argv(tiny_dirs, glue_files, out, *THREE_STEPS_SAVING_EACH))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output_dir check")

    with monkeypatch.context() as m:
        m.setattr(glue, "load_seq_cls_model", no_model)
        with pytest.raises(OutputDirError, match=r"is not empty .*pass --overwrite_output_dir"):
            glue.main(
                lora_argv(tiny_dirs, glue_files, out, "--max_steps", "2", "--learning_rate", "2e-3")
            )

    # --overwrite_output_dir: the first run's checkpoints, metrics and final/ go first
    glue.main(lora_argv(tiny_dirs, glue_files, out, "--max_steps", "2", "--learning_rate", "2e-3",
                        "--overwrite_output_dir", "true"))  # fmt: skip
    assert not list(out.glob("checkpoint-*"))
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2]
    # so 'latest' cannot pick up the first run's checkpoint (other learning rate) any more
    with pytest.raises(FileNotFoundError, match="no checkpoint-N directory of this run"):
        glue.main(lora_argv(tiny_dirs, glue_files, out, "--max_steps", "2", "--learning_rate", "2e-3",
                            "--resume_from_checkpoint", "latest"))  # fmt: skip


def test_resume_with_changed_settings_names_each_flag(tiny_dirs, glue_files, tmp_path, monkeypatch):
    from loralab.runners.loop import CheckpointError

    out = tmp_path / "run"
    base = ("--max_steps", "3", "--save_steps", "2", "--seed", "7")
    glue.main(lora_argv(tiny_dirs, glue_files, out, *base, "--learning_rate", "1e-3"))
    with pytest.raises(CheckpointError) as err:
        glue.main(lora_argv(tiny_dirs, glue_files, out, *base, "--learning_rate", "2e-3",
                            "--lora_r", "8", "--resume_from_checkpoint", "latest"))  # fmt: skip
    message = str(err.value)
    assert "--learning_rate: 0.001 -> 0.002" in message and "--lora_r: 4 -> 8" in message
    assert "train_file" not in message
    # the same run with the training file given by a relative path, more logging and another eval batch
    # size (not training settings) resumes
    monkeypatch.chdir(Path(glue_files["train"]).parent)
    argv = lora_argv(tiny_dirs, glue_files, out, *base, "--learning_rate", "1e-3", "--resume_from_checkpoint",
                     "latest", "--per_device_eval_batch_size", "3")  # fmt: skip
    argv[argv.index("--train_file") + 1] = Path(glue_files["train"]).name
    glue.main(argv)
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2, 3]


def test_torn_checkpoint_in_a_run_names_the_file(tiny_dirs, glue_files, tmp_path):
    from loralab.runners.loop import CheckpointError

    out = tmp_path / "run"
    argv = lora_argv(tiny_dirs, glue_files, out, *THREE_STEPS_SAVING_EACH)
    glue.main(argv)
    for name in ("optimizer.bin", "model.safetensors"):
        f = out / "checkpoint-2" / name
        data = f.read_bytes()
        f.write_bytes(data[:100])
        with pytest.raises(CheckpointError, match=rf"checkpoint-2/{name} is truncated: 100 of {len(data)} bytes.*"
                           rf"newest complete older checkpoint is {re.escape(str(out / 'checkpoint-1'))}"):  # fmt: skip
            glue.main([*argv, "--resume_from_checkpoint", "latest"])
        f.write_bytes(data)
    (out / "checkpoint-2" / "trainer_state.json").write_text("")
    with pytest.raises(CheckpointError, match=r"checkpoint-2/trainer_state\.json is empty"):
        glue.main([*argv, "--resume_from_checkpoint", "latest"])
