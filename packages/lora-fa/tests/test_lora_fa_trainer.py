"""HF Trainer with ``optimizers=(opt, sched)``: PEFT's LoRA-FA README quick start with only the import
changed, on a tiny saved Llama; and Trainer (clipping + schedule) == a hand-written loop."""

import copy

import peft
import pytest
import torch

from loralab.core.testing import make_lm_batches, save_tiny, tiny_llama

TEXTS = [f"### Human: what is {i} plus {i}? ### Assistant: {2 * i}." for i in range(16)]


def test_peft_readme_quick_start_with_only_the_import_changed(tmp_path):
    model_id = str(save_tiny(tiny_llama(0), tmp_path / "tiny-llama"))
    # ---- PEFT examples/lorafa_finetune/README.md quick start, model id and dataset made local.
    # Changed: `from peft.optimizers import create_lorafa_optimizer` → loralab.lora_fa. Fixed (errors in
    # the README itself): `transformers` was not imported, `dataset_text_field` / `max_seq_length` are
    # trl SFTTrainer arguments (the dataset is tokenized here instead), `tokenizer=` is
    # `processing_class=` in transformers ≥ 4.46, and the Trainer needs `args` for a short run.
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.lora_fa import create_lorafa_optimizer

    model = AutoModelForCausalLM.from_pretrained(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64),
        batched=True,
        remove_columns=["text"],
    )

    lora_rank = 16
    lora_alpha = 32

    lora_config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        bias="none",
    )
    peft_model = get_peft_model(model, lora_config)
    optimizer = create_lorafa_optimizer(
        model=peft_model,
        r=lora_rank,
        lora_alpha=lora_alpha,
        lr=7e-5,
    )
    # you can also use scheduler, we recommend get_cosine_schedule_with_warmup from transformers
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=1, num_training_steps=4
    )

    A0 = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}
    trainer = transformers.Trainer(
        model=peft_model,
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=4,
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        ),
        train_dataset=dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
    )
    result = trainer.train()
    peft_model.save_pretrained(str(tmp_path / "lorafa-tiny-llama"))
    # ---- end of the quick start

    assert (
        getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer
        and result.global_step == 4
    )
    assert torch.isfinite(torch.tensor(result.training_loss))
    state = optimizer.state_dict()["state"]
    assert state and all(s["step"].item() == 4 for s in state.values())
    for n, p in peft_model.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p, A0[n]) and not p.requires_grad
        if "lora_B" in n:
            assert p.abs().max() > 0
    reloaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_id), str(tmp_path / "lorafa-tiny-llama")
    )
    for (n, p), (_, q) in zip(peft_model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_equals_a_hand_loop_with_clipping_and_schedule(tmp_path, accumulation):
    import transformers
    from datasets import Dataset

    from loralab.lora_fa import create_lorafa_optimizer

    torch.manual_seed(0)
    base = peft.get_peft_model(
        tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    steps, lr, clip = 3, 1e-2, 0.05  # a small max_grad_norm so clipping is active
    batches = make_lm_batches(steps * accumulation, batch_size=2, seq_len=12, seed=3)
    runs = []
    for use_trainer in (False, True):
        model = copy.deepcopy(base)
        opt = create_lorafa_optimizer(model, 4, 8, lr, weight_decay=0.01)
        sched = transformers.get_linear_schedule_with_warmup(opt, 1, steps)
        if use_trainer:
            rows = {k: [row for b in batches for row in b[k].tolist()] for k in batches[0]}
            trainer = transformers.Trainer(
                model=model,
                args=transformers.TrainingArguments(
                    output_dir=str(tmp_path / "t"),
                    max_steps=steps,
                    per_device_train_batch_size=2,
                    gradient_accumulation_steps=accumulation,
                    max_grad_norm=clip,
                    use_cpu=True,
                    report_to=[],
                    save_strategy="no",
                    disable_tqdm=True,
                    dataloader_drop_last=True,
                    seed=0,
                ),
                train_dataset=Dataset.from_dict(rows),
                optimizers=(opt, sched),
            )
            sequential = torch.utils.data.SequentialSampler(
                trainer.train_dataset
            )  # the hand loop's order
            trainer._get_train_sampler = lambda *a, sampler=sequential, **k: sampler
            trainer.train()
        else:
            model.train()
            for s in range(steps):
                for b in batches[s * accumulation : (s + 1) * accumulation]:
                    (model(**b).loss / accumulation).backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], clip
                )
                opt.step()
                sched.step()
                opt.zero_grad()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n})
    for n in runs[0]:
        torch.testing.assert_close(runs[1][n], runs[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_trainer_resume_from_checkpoint_equals_straight_run(tmp_path):
    import transformers
    from datasets import Dataset

    from loralab.lora_fa import create_lorafa_optimizer

    steps, lr = 4, 1e-2
    batches = make_lm_batches(steps, batch_size=2, seq_len=12, seed=4)
    rows = {k: [row for b in batches for row in b[k].tolist()] for k in batches[0]}

    class CountSteps(transformers.TrainerCallback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    def run(output_dir, resume=None):
        torch.manual_seed(
            0 if resume is None else 1
        )  # resumed: another A draw, the checkpoint must bring A back
        model = peft.get_peft_model(
            tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        )
        opt = create_lorafa_optimizer(model, 4, 8, lr, weight_decay=0.01)
        sched = transformers.get_linear_schedule_with_warmup(opt, 1, steps)
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=str(output_dir),
                max_steps=steps,
                per_device_train_batch_size=2,
                use_cpu=True,
                report_to=[],
                save_strategy="steps",
                save_steps=2,
                disable_tqdm=True,
                seed=0,
                data_seed=0,
            ),
            train_dataset=Dataset.from_dict(rows),
            optimizers=(opt, sched),
            callbacks=[counter := CountSteps()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return (
            {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
            opt,
            counter.steps,
        )

    straight, _, n_straight = run(tmp_path / "a")
    resumed, opt, n_resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert (n_straight, n_resumed) == (steps, steps // 2)
    assert all(s["step"].item() == steps for s in opt.state.values())
    for n in straight:
        torch.testing.assert_close(resumed[n], straight[n], rtol=0, atol=0, msg=n)
