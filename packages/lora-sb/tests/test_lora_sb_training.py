"""Fine-tuning: LoRA-SB vs LoRA-XS inits (the paper's ordering in miniature), and the HF Trainer."""

import torch

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_sb import LoraSBConfig, get_lora_sb_model, load_lora_sb_model

RANK = 8
LR = 3e-3
STEPS = 40


def _data():
    return make_lm_batches(4, batch_size=4, seq_len=16, seed=5)


def _final_loss(init: str) -> float:
    data = _data()
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules="all-linear", sb_init=init),
        data,
        lr=LR,
        progress=False,
    )
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    model.train()
    for step in range(STEPS):
        model(**data[step % len(data)]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in data) / len(data)


def test_lora_sb_beats_lora_xs_inits():
    # same r, same optimizer, same steps and data; only the init differs (paper Tables 1-3 ordering)
    losses = {init: _final_loss(init) for init in ("gradient", "random", "weight_svd")}
    assert losses["gradient"] < losses["random"] - 0.05, losses
    assert losses["gradient"] < losses["weight_svd"] - 0.05, losses


def test_hf_trainer_trains_only_r(tmp_path):
    from transformers import Trainer, TrainingArguments

    data = _data()
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=4, target_modules=["q_proj", "v_proj"]),
        data,
        lr=1e-3,
        progress=False,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (".lora_R." in n), n
    trainer.save_model(str(tmp_path / "final"))
    x = make_lm_batches(1, seed=11)[0]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(
            load_lora_sb_model(tiny_llama(), tmp_path / "final")(**x).logits,
            model(**x).logits,
            atol=1e-5,
        )


def test_hf_trainer_resume_gives_the_same_steps(tmp_path):
    # an interrupted run resumed from its checkpoint (structure rebuilt with sb_init="random": the checkpoint
    # restores A, B, R and the optimizer) ends exactly where the uninterrupted run does
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = _data()
    rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(4)]
    targets = ["q_proj", "v_proj"]

    def args(out):
        return TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=4,
            max_steps=4,
            learning_rate=1e-2,
            warmup_steps=0,
            save_strategy="steps",
            save_steps=2,
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def r_of(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full = get_lora_sb_model(
        tiny_llama(), LoraSBConfig(r=4, target_modules=targets), data, lr=1e-3, progress=False
    )
    Trainer(model=full, args=args(tmp_path / "a"), train_dataset=rows).train()
    first = get_lora_sb_model(
        tiny_llama(), LoraSBConfig(r=4, target_modules=targets), data, lr=1e-3, progress=False
    )
    Trainer(
        model=first, args=args(tmp_path / "b"), train_dataset=rows, callbacks=[StopAt2()]
    ).train()
    resumed = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=4, target_modules=targets, sb_init="random"),
        [],
        progress=False,
    )
    Trainer(model=resumed, args=args(tmp_path / "b"), train_dataset=rows).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2")
    )
    want, got = r_of(full), r_of(resumed)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    for n, p in full.named_parameters():  # A and B came back from the checkpoint too
        assert torch.equal(p, resumed.get_parameter(n)), n
