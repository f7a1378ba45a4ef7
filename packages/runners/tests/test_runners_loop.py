"""The loop package on its own (plain-torch engine, tiny linear model, in process): exact resume through the
checkpoint format, atomic saves, run identity, torn-file messages, the metrics schema, output-dir rules."""

import json
import os
from pathlib import Path

import pytest
import torch

from loralab.runners.loop import (
    CheckpointError,
    EpochBatches,
    ListBatches,
    LoopConfig,
    MetricsLog,
    OutputDirError,
    RunIdentity,
    TorchEngine,
    check_identity,
    find_checkpoint,
    list_checkpoints,
    prepare_output_dir,
    remove_run_artifacts,
    run_identity,
    run_loop,
    save_checkpoint,
)

STEPS, SAVE = 6, 3
DATA = [{"x": torch.randn(3), "y": torch.randn(1)} for _ in range(24)]


def collate(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows])}


def loss_fn(model, batch):
    # dropout makes the loss depend on the RNG: exact resume must restore it
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def build(out: Path | None, **config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    engine = TorchEngine(device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / STEPS)
    model, opt = engine.prepare(model, opt, sched)
    data = EpochBatches(DATA, collate, batch_size=4, seed=1)
    cfg = LoopConfig(
        max_steps=STEPS,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        save_steps=SAVE,
        output_dir=str(out) if out else None,
        **config,
    )
    return engine, model, opt, sched, data, cfg


def train(out: Path, resume=None, identity=None, **config):
    engine, model, opt, sched, data, cfg = build(out, **config)
    identity = identity or RunIdentity.new({"lr": 1e-2})
    log = MetricsLog(out / "metrics.jsonl")
    result = run_loop(
        engine, model, opt, sched, data, cfg, loss_fn=loss_fn, metrics=log, identity=identity,
        resume=resume, evaluate=lambda m: {"loss": 0.0},
    )  # fmt: skip
    return result, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_from_a_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    full, records = train(tmp_path / "full")
    assert {r["kind"] for r in records} == {"train", "eval"}
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == STEPS and all(r["time_s"] >= 0 for r in records)

    # a second run stopped right after its checkpoint: resume it from there
    part = tmp_path / "part"
    identity = RunIdentity.new({"lr": 1e-2})
    engine, model, opt, sched, data, cfg = build(part)
    cfg.max_steps = SAVE
    run_loop(engine, model, opt, sched, data, cfg, loss_fn=loss_fn, identity=identity,
             metrics=MetricsLog(part / "metrics.jsonl"))  # fmt: skip
    save_checkpoint(part, SAVE, engine=engine, model=model, optimizer=opt, identity=identity,
                    trainer_state={"step": SAVE, "data": [data.state_dict()]})  # fmt: skip
    ckpt, state = find_checkpoint("latest", part, identity.run_id)
    assert ckpt.name == f"checkpoint-{SAVE}" and state["run"]["run_id"] == identity.run_id
    resumed, got = train(part, resume=(ckpt, state), identity=identity)
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got if r["kind"] == "train"] == pytest.approx(losses, rel=1e-6)
    assert resumed.step == full.step == STEPS


def test_checkpoint_is_renamed_into_place_and_a_killed_save_is_ignored(tmp_path):
    engine, model, opt, _sched, data, _cfg = build(tmp_path)
    identity = RunIdentity.new({"lr": 1e-2})
    save_checkpoint(tmp_path, 1, engine=engine, model=model, optimizer=opt, identity=identity,
                    trainer_state={"step": 1, "data": [data.state_dict()]})  # fmt: skip
    # a save killed half way leaves only its temporary directory
    torn = tmp_path / ".checkpoint-2.tmp"
    torn.mkdir()
    (torn / "model.pt").write_bytes(b"\0" * 10)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert find_checkpoint("latest", tmp_path, identity.run_id)[0].name == "checkpoint-1"
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert {"model.pt", "optimizer.pt", "scheduler.pt", "rng_state_rank0.pt"} <= set(state["files"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("optimizer.pt", r"checkpoint-2/optimizer.pt is truncated: \d+ of \d+ bytes"),
        ("model.pt", r"checkpoint-2/model.pt is truncated"),
        ("trainer_state.json", r"checkpoint-2/trainer_state.json is empty"),
        ("missing:scheduler.pt", r"checkpoint-2/scheduler.pt is missing"),
    ],
)
def test_torn_checkpoint_names_the_file_and_the_older_complete_one(tmp_path, damage, message):
    engine, model, opt, _sched, data, _cfg = build(tmp_path)
    identity = RunIdentity.new({"lr": 1e-2})
    for step in (1, 2):
        save_checkpoint(tmp_path, step, engine=engine, model=model, optimizer=opt,
                        identity=identity, trainer_state={"step": step, "data": [data.state_dict()]})  # fmt: skip
    target = tmp_path / "checkpoint-2" / damage.removeprefix("missing:")
    if damage.startswith("missing:"):
        target.unlink()
    elif damage == "trainer_state.json":
        target.write_text("")
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=message) as err:
        find_checkpoint("latest", tmp_path, identity.run_id)
    assert f"the newest complete older checkpoint is {tmp_path / 'checkpoint-1'}" in str(err.value)
    # the explicit path of the complete one resumes
    assert find_checkpoint(str(tmp_path / "checkpoint-1"), tmp_path, None)[0].name == "checkpoint-1"
    # with the only checkpoint torn, the message says there is none older
    (tmp_path / "checkpoint-1" / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no older complete checkpoint"):
        find_checkpoint("latest", tmp_path, identity.run_id)


def test_latest_is_the_newest_checkpoint_of_this_run(tmp_path):
    engine, model, opt, _sched, data, _cfg = build(tmp_path)
    mine, other = RunIdentity.new({"lr": 1e-2}), RunIdentity.new({"lr": 5e-2})
    save_checkpoint(tmp_path, 2, engine=engine, model=model, optimizer=opt, identity=mine,
                    trainer_state={"step": 2, "data": [data.state_dict()]})  # fmt: skip
    save_checkpoint(tmp_path, 4, engine=engine, model=model, optimizer=opt, identity=other,
                    trainer_state={"step": 4, "data": [data.state_dict()]})  # fmt: skip
    assert find_checkpoint("latest", tmp_path, mine.run_id)[0].name == "checkpoint-2"
    with pytest.raises(CheckpointError, match="no checkpoint-N directory of this run"):
        find_checkpoint("latest", tmp_path, "another-run")


def test_identity_diff_names_every_changed_flag_and_resolves_paths(tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    saved = run_identity({"train_file": str(data), "learning_rate": 1e-3, "seed": 1, "logging_steps": 1},
                         exclude={"logging_steps"})  # fmt: skip
    same = run_identity({"train_file": "train.jsonl", "learning_rate": 1e-3, "seed": 1, "logging_steps": 9},
                        exclude={"logging_steps"})  # fmt: skip
    check_identity(Path("ckpt"), saved, same)  # relative == absolute; logging is not identity
    changed = {**same, "learning_rate": 2e-3, "seed": 2}
    with pytest.raises(CheckpointError) as err:
        check_identity(Path("ckpt"), saved, changed)
    assert "--learning_rate: 0.001 -> 0.002" in str(err.value) and "--seed: 1 -> 2" in str(
        err.value
    )


def test_output_dir_rules(tmp_path):
    out = tmp_path / "run"
    prepare_output_dir(out, overwrite=False, resume=None)  # missing: fine
    out.mkdir()
    prepare_output_dir(out, overwrite=False, resume=None)  # empty: fine
    for name in ("metrics.jsonl", "notes.txt"):
        (out / name).write_text("x")
    (out / "checkpoint-3").mkdir()
    (out / "final").mkdir()
    with pytest.raises(OutputDirError, match=r"is not empty \(checkpoint-3, final, metrics.jsonl, notes.txt\): pass --overwrite_output_dir"):  # fmt: skip
        prepare_output_dir(out, overwrite=False, resume=None)
    prepare_output_dir(out, overwrite=False, resume="latest")
    with pytest.raises(OutputDirError, match="contradict"):
        prepare_output_dir(out, overwrite=True, resume="latest")
    prepare_output_dir(out, overwrite=True, resume=None)
    assert remove_run_artifacts(out) == ["checkpoint-3", "final", "metrics.jsonl"]
    assert sorted(os.listdir(out)) == ["notes.txt"]  # not ours: kept
    (out / "x").write_text("")
    with pytest.raises(OutputDirError, match="is a file"):
        prepare_output_dir(out / "x", overwrite=False, resume=None)


def test_metrics_schema_and_restart(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", extra={"method": "lora"})
    log.train(1, loss=1.0, learning_rate=0.1, time_s=0.5)
    log.eval(1, {"accuracy": 0.5}, time_s=0.5)
    log.train(2, loss=0.9, learning_rate=0.1, time_s=1.0)
    log.summary(2, {"accuracy": 0.6}, status="ok")
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "eval", "train", "summary"]
    assert rows[1]["eval_accuracy"] == 0.5 and all(r["method"] == "lora" for r in rows)
    with pytest.raises(
        ValueError, match="metrics kind must be one of train, eval, summary, got 'step'"
    ):
        log.write("step", 3, {})
    log.restart(1)  # a resume from step 1: later records are redone
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        1,
        1,
    ]


def test_list_batches_run_out_and_the_loop_says_so(tmp_path):
    engine, model, opt, sched, _data, cfg = build(None)
    cfg.save_steps = 0
    batches = ListBatches([collate(DATA[:4])] * 3)
    result = run_loop(engine, model, opt, sched, batches, cfg, loss_fn=loss_fn)
    assert result.step == 1 and result.status.startswith("data exhausted at step 1")


def test_non_finite_loss_raises_or_stops(tmp_path):
    engine, model, opt, sched, data, cfg = build(None)
    cfg.save_steps = 0
    bad = lambda m, b: loss_fn(m, b) * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 1"):
        run_loop(engine, model, opt, sched, data, cfg, loss_fn=bad)
    cfg.stop_on_nonfinite = True
    result = run_loop(engine, model, opt, sched, data, cfg, loss_fn=bad)
    assert result.status.startswith("diverged: non-finite training loss") and result.step == 0
