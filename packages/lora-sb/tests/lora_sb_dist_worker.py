"""Run by test_lora_sb_distributed.py with 2 CPU ranks (gloo), all modes in one launch.

The launcher is ``accelerate launch --multi_gpu --num_processes 2`` (its torchrun path; accelerate's
``--cpu`` multi-process path needs mpirun) and the script runs ``Accelerator(cpu=True)`` (gloo):

- ``accelerate``: ``get_lora_sb_model`` estimates on this rank's batches (loralab.core all-reduces the
  gradients), then ``accelerator.prepare`` (DDP) trains ``R`` with AdamW.
- ``zero2``: ``deepspeed.init_distributed("gloo")`` (reuses the process group), a fresh model with the
  same init, then ``deepspeed.initialize`` with ZeRO stage 2 trains ``R`` with a torch AdamW client
  optimizer.
- ``trainer_zero2``: HF ``Trainer`` with ``TrainingArguments(deepspeed=<ZeRO-2 config>)`` (sequential
  sampler, constant lr, no clipping), so its steps are the same AdamW steps as the other two.
- ``zero3``: the base model partitioned by ``deepspeed.zero.Init(module=...)`` (ZeRO-3: each rank holds
  half of every weight), then ``get_lora_sb_model`` (the estimate gathers one decoder block at a
  time, counted by :func:`loralab.core.testing.zero3_gather_peak`; the LoRA-SB layers are new, whole
  parameters), then ``deepspeed.initialize`` with ZeRO stage 3 trains ``R``.
- ``zero3_peft``: ``get_peft_model`` with the LoRA-SB config first, then the whole ``PeftModel``
  partitioned by ``deepspeed.zero.Init`` (``A``, ``B``, ``R`` partitioned too), then
  ``initialize_lora_sb_weights`` with ``offload=True`` (kept for comparison), then again without it
  (gathers counted): the factors are written into the partitioned parameters; then stage 3 trains
  ``R`` as above.

One launch for all of them keeps the test inside its time budget (process start-up dominates).

Each rank writes ``{prefix}.{mode}.{rank}.pt``: the init factors (A, B, R per layer) and the final R
(ZeRO-3 partitions gathered), and for ZeRO-3 whether the weights were partitioned.
The constants are shared with the test (it loads this file).
"""

import sys

import torch

from loralab.core.distributed import end_process_group

RANK_R = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]
INIT_LR = 1e-3
TRAIN_LR = 1e-2
MICRO = 2  # per-rank micro-batch size; the global batch is 2 * MICRO
STEPS = 3


def init_batches(rank: int):
    from loralab.core.testing import make_lm_batches

    return make_lm_batches(2, batch_size=MICRO, seed=10 + rank)


def train_batches(rank: int):
    from loralab.core.testing import make_lm_batches

    return make_lm_batches(STEPS, batch_size=MICRO, seed=20 + rank)


def build(batches):
    from loralab.core.testing import tiny_llama
    from loralab.lora_sb import LoraSBConfig, get_lora_sb_model

    config = LoraSBConfig(r=RANK_R, target_modules=TARGETS)
    return get_lora_sb_model(tiny_llama(), config, batches, lr=INIT_LR, progress=False)


def factors(model, slots=("lora_A", "lora_B", "lora_R")):
    """``{"<layer>.<slot>": weight}`` of every LoRA-SB layer (ZeRO-3 partitions gathered)."""
    from loralab.core.distributed import gathered_parameters
    from loralab.lora_sb import lora_sb_layers

    out = {}
    for name, layer in lora_sb_layers(model).items():
        params = [getattr(layer, slot)["default"].weight for slot in slots]
        with gathered_parameters(params):
            out.update({f"{name}.{s}": p.detach().clone() for s, p in zip(slots, params)})
    return out


def final_r(model):
    return factors(model, ("lora_R",))


def make_optimizer(model):
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=TRAIN_LR, weight_decay=0.0
    )


def run_accelerate() -> tuple[int, dict, dict]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    model = build(init_batches(rank))
    init = factors(model)
    opt = make_optimizer(model)
    ddp_model, opt = accelerator.prepare(model, opt)
    ddp_model.train()
    for batch in train_batches(rank):
        accelerator.backward(ddp_model(**batch).loss)
        opt.step()
        opt.zero_grad()
    return rank, init, final_r(model)


def run_zero2() -> tuple[int, dict, dict]:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = build(init_batches(rank))
    init = factors(model)
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=config)
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer", type(
        engine.optimizer
    ).__name__
    engine.train()
    for batch in train_batches(rank):
        engine.backward(engine(**batch).loss)
        engine.step()
    return rank, init, final_r(model)


ZERO3 = {
    "train_micro_batch_size_per_gpu": MICRO,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


def _partitioned(model, names) -> bool:
    """Whether every named parameter holds only its ZeRO-3 partition (empty until gathered)."""
    params = dict(model.named_parameters())
    return all(hasattr(params[n], "ds_id") and params[n].numel() == 0 for n in names)


def _train_zero3(model, rank: int) -> None:
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=torch.optim.AdamW(params, lr=TRAIN_LR, weight_decay=0.0),
        config=ZERO3,
    )
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3", type(
        engine.optimizer
    ).__name__
    engine.train()
    for batch in train_batches(rank):
        engine.backward(engine(**batch).loss)
        engine.step()


def run_zero3() -> tuple[int, dict, dict, dict]:
    """Base model partitioned by zero.Init, then get_lora_sb_model, then ZeRO-3 training."""
    import deepspeed
    import torch.distributed as dist

    from loralab.core.testing import tiny_llama, zero3_gather_peak
    from loralab.lora_sb import LoraSBConfig, get_lora_sb_model

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    base = tiny_llama()
    deepspeed.zero.Init(module=base, config_dict_or_path=ZERO3)
    q = "model.layers.0.self_attn.q_proj"
    flags = {"base_partitioned": _partitioned(base, [f"{q}.weight"])}
    config = LoraSBConfig(r=RANK_R, target_modules=TARGETS)
    with zero3_gather_peak(base) as gathered:  # one block (+ embeddings, head) whole at a time
        model = get_lora_sb_model(base, config, init_batches(rank), lr=INIT_LR, progress=False)
    flags["gathered"] = gathered
    q = f"base_model.model.{q}.base_layer.weight"
    flags["base_partitioned_after_init"] = _partitioned(model, [q])
    init = factors(model)
    _train_zero3(model, rank)
    return rank, init, final_r(model), flags


def run_zero3_peft() -> tuple[int, dict, dict, dict]:
    """get_peft_model, the whole PeftModel partitioned by zero.Init, initialize_lora_sb_weights."""
    import deepspeed
    import torch.distributed as dist
    from peft import get_peft_model

    from loralab.core.testing import tiny_llama, zero3_gather_peak
    from loralab.lora_sb import LoraSBConfig, initialize_lora_sb_weights

    rank = dist.get_rank()
    config = LoraSBConfig(r=RANK_R, target_modules=TARGETS)
    model = get_peft_model(tiny_llama(), config, autocast_adapter_dtype=False)
    deepspeed.zero.Init(module=model, config_dict_or_path=ZERO3)
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    names = [f"{layer}.{s}.default.weight" for s in ("lora_A", "lora_B", "lora_R")]
    flags = {"factors_partitioned": _partitioned(model, [*names, f"{layer}.base_layer.weight"])}
    # offload=True on a partitioned model: the same block-wise estimate, boundary states on the CPU
    initialize_lora_sb_weights(model, init_batches(rank), lr=INIT_LR, offload=True, progress=False)
    flags["offload_init"] = factors(model)
    with zero3_gather_peak(model) as gathered:  # the PeftModel's own blocks (LoRA factors included)
        initialize_lora_sb_weights(model, init_batches(rank), lr=INIT_LR, progress=False)
    flags["gathered"] = gathered
    flags["factors_partitioned_after_init"] = _partitioned(model, names)
    init = factors(model)
    _train_zero3(model, rank)
    try:  # after deepspeed.initialize its hooks own the partitions: refused
        initialize_lora_sb_weights(model, init_batches(rank), lr=INIT_LR, progress=False)
    except Exception as e:  # the test checks the type and message
        flags["engine_error"] = f"{type(e).__name__}: {e}"
    return rank, init, final_r(model), flags


def run_trainer_zero2(prefix: str) -> tuple[int, dict, dict]:
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    # the Trainer builds its own Accelerator (with a DeepSpeed plugin): drop the first phase's state
    AcceleratorState._reset_state(reset_partial_state=True)
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    # constant lr, no clipping, no weight decay: the same AdamW steps as the manual loops
    args = TrainingArguments(
        output_dir=f"{prefix}.trainer",
        per_device_train_batch_size=MICRO,
        max_steps=STEPS,
        learning_rate=TRAIN_LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        deepspeed=ds_config,
        seed=0,
        disable_tqdm=True,
    )
    rank = dist.get_rank()
    model = build(init_batches(rank))
    init = factors(model)
    # Rows in order [rank 0's step-0 micro-batch, rank 1's, rank 0's step-1, ...]: with a sequential
    # sampler, accelerate's batch sharding hands each rank its own micro-batches.
    rows = []
    for b0, b1 in zip(train_batches(0), train_batches(1)):
        for b in (b0, b1):
            rows += [{k: v[i] for k, v in b.items()} for i in range(MICRO)]

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    trainer = SequentialTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine", type(
        trainer.model_wrapped
    ).__name__
    return rank, init, final_r(model)


def main(prefix: str) -> None:
    import torch.distributed as dist

    for mode, run in (
        ("accelerate", run_accelerate),
        ("zero2", run_zero2),
        ("trainer_zero2", lambda: run_trainer_zero2(prefix)),
        ("zero3", run_zero3),
        ("zero3_peft", run_zero3_peft),
    ):
        rank, init, final, *flags = run()
        out = {"init": init, "final": final, **(flags[0] if flags else {})}
        torch.save(out, f"{prefix}.{mode}.{rank}.pt")
        dist.barrier()
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
