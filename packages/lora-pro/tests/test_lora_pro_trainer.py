"""HF Trainer with ``optimizers=(LoraProAdamW, scheduler)``, grad clipping and grad accumulation equals a hand loop."""

import peft
import pytest
import torch
from torch.utils.data import SequentialSampler

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_pro import create_lora_pro_optimizer

STEPS, ACCUM, MICRO, LR, MAX_NORM = 3, 2, 2, 5e-3, 0.05


def _model():
    torch.manual_seed(0)
    return peft.get_peft_model(
        tiny_llama(hidden_size=32, num_hidden_layers=1),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )


def _samples():
    batch = make_lm_batches(1, batch_size=STEPS * ACCUM * MICRO, seq_len=8, seed=3)[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(STEPS * ACCUM * MICRO)]


def _sched(opt):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=STEPS)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_trainer_with_clipping_accumulation_and_scheduler_matches_a_hand_loop(tmp_path, mode):
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    samples = _samples()
    model = _model()
    opt = create_lora_pro_optimizer(model, LR, mode=mode)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        max_grad_norm=MAX_NORM,
        learning_rate=LR,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    SequentialTrainer(
        model=model, args=args, train_dataset=samples, optimizers=(opt, _sched(opt))
    ).train()
    assert all(int(s["step"]) == STEPS for s in opt.state.values())

    # the same by hand: token-sum loss over the accumulated micro-batches, global-norm clip, step, schedule
    ref = _model()
    ropt = create_lora_pro_optimizer(ref, LR, mode=mode)
    rsched = _sched(ropt)
    params = [p for p in ref.parameters() if p.requires_grad]
    clipped = False
    for step in range(STEPS):
        micro = [
            samples[(step * ACCUM + j) * MICRO : (step * ACCUM + j + 1) * MICRO]
            for j in range(ACCUM)
        ]
        micro = [{k: torch.stack([s[k] for s in m]) for k in m[0]} for m in micro]
        n_items = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        for m in micro:
            ref(**m, num_items_in_batch=torch.tensor(n_items)).loss.backward()
        clipped |= bool(torch.nn.utils.clip_grad_norm_(params, MAX_NORM) > MAX_NORM)
        ropt.step()
        rsched.step()
        ropt.zero_grad()
    assert clipped  # the clip was active, so the comparison covers it
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-6, msg=name)
    assert opt.param_groups[0]["lr"] == pytest.approx(ropt.param_groups[0]["lr"])
