"""Run by test_lora_ga_distributed.py with 2 CPU ranks (gloo), every mode in one launch.

The launcher is ``accelerate launch --multi_gpu --num_processes 2`` (its torchrun path; accelerate's
``--cpu`` multi-process path needs mpirun) and the script runs ``Accelerator(cpu=True)`` (gloo). The
data is one DataLoader of 4 batches; rank ``r`` estimates on batches ``r`` and ``r + 2``:

- ``accelerate``: the seed's flow: ``estimate_gradient(model, dataloader, accelerator)`` (accelerate
  shards the DataLoader round-robin and the means are averaged with ``accelerator.reduce``), then
  ``with LoraGAContext(model, named_grad): peft.get_peft_model(model, config)``.
- ``offload``: the same with ``quant_flag=True`` (core's block offload, the seed's quantized flow).
- ``torchrun``: no accelerator: each rank passes its own batches, loralab.core all-reduces over
  ``torch.distributed``.
- ``zero3``: ``deepspeed.init_distributed("gloo")`` (reuses the group), the model partitioned with
  ``deepspeed.zero.Init(module=...)`` (ZeRO-3: each rank holds half of every weight); the estimate
  gathers one decoder block at a time, the init writes the offset W0 through ``GatheredParameters`` (rank 0's
  value, identical anyway), then ``deepspeed.initialize`` (stage 3) runs one training step.
  ``estimate_gradient`` on the DeepSpeed engine itself must raise a clear error.
- ``peft_flow``: PEFT's flow with loralab's drop-in: ``preprocess_loraga(model, peft.LoraConfig(...,
  init_lora_weights="lora_ga"), train_step)`` where each rank's ``train_step`` runs its own batches;
  loralab.core all-reduces the mean over ``torch.distributed`` (PEFT keeps each rank's own).
- ``native_zero3``: the model partitioned by ``deepspeed.zero.Init`` as in ``zero3``, then the native
  ``get_lora_ga_model`` (core's estimate gathers one block at a time; A, B, W0' written into the
  partitions), counting at every gather how much of the model is whole
  (:func:`loralab.core.testing.zero3_gather_peak`); then an estimate with one batch on rank 0 and two
  on rank 1, which must raise on both ranks.
- ``peft_flow_zero3``: PEFT's flow with the drop-in on a model partitioned the same way (the drop-in
  gathers it while ``train_step`` runs; ``get_peft_model`` writes into the partitions).
- ``hf_zero3``: the usual way a ZeRO-3 model is made: transformers' ``from_pretrained`` of a saved
  checkpoint while an ``HfDeepSpeedConfig`` (stage 3) is alive partitions it at load time (the
  gathers counted as in ``native_zero3``).

Each rank writes ``{prefix}.{mode}.{rank}.pt`` with every adapted layer's ``A``, ``B`` and offset
``W0`` (gathered for ZeRO-3). The constants are shared with the test (it loads this file).
"""

import sys

import torch

from loralab.core.distributed import end_process_group

RANK_R = 4
ALPHA = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
N_ROWS = 8
BATCH = 2
PREFIX = "base_model.model."


def rows():
    from loralab.core.testing import make_lm_batches

    b = make_lm_batches(1, batch_size=N_ROWS, seed=11)[0]
    return [{k: v[i] for k, v in b.items()} for i in range(N_ROWS)]


def loader():
    from torch.utils.data import DataLoader

    return DataLoader(rows(), batch_size=BATCH)


def rank_batches(rank: int):
    """The batches accelerate's round-robin sharding gives ``rank`` (out of 2)."""
    return [b for i, b in enumerate(loader()) if i % 2 == rank]


def config():
    from loralab.lora_ga import LoraGAConfig

    return LoraGAConfig(r=RANK_R, lora_alpha=ALPHA, target_modules=TARGETS, use_rslora=True)


def init_state(model):
    """``{layer: (A, B, W0)}`` of a LoRA-GA PeftModel (ZeRO-3 partitioned weights gathered)."""
    from loralab.core.distributed import gathered_parameters

    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            params = [
                mod.lora_A["default"].weight,
                mod.lora_B["default"].weight,
                mod.get_base_layer().weight,
            ]
            with gathered_parameters(params):
                out[name.removeprefix(PREFIX)] = tuple(p.detach().clone() for p in params)
    return out


def seed_flow(model, data, accelerator, **kwargs):
    import peft

    from loralab.lora_ga import LoraGAContext, estimate_gradient

    named_grad = estimate_gradient(
        model, data, accelerator, targets=TARGETS, progress=False, **kwargs
    )
    with LoraGAContext(model, named_grad):
        return peft.get_peft_model(model, config())


def peft_config(scale="stable"):
    import peft

    return peft.LoraConfig(
        r=RANK_R,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(scale=scale),
    )


def peft_flow(model, batches, scale="stable"):
    """PEFT's LoRA-GA code with ``preprocess_loraga`` imported from loralab."""
    import peft

    from loralab.lora_ga import preprocess_loraga

    cfg = peft_config(scale)

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    preprocess_loraga(model, cfg, train_step)
    return peft.get_peft_model(model, cfg)


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": BATCH,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def _assert_partitioned(model):
    q = model.model.layers[0].self_attn.q_proj.weight
    assert hasattr(q, "ds_id") and q.numel() == 0, "the model is not ZeRO-3 partitioned"


def run_zero3(rank: int) -> tuple[dict, str]:
    import deepspeed

    from loralab.core.testing import tiny_llama

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = DS_CONFIG
    model = tiny_llama()
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    _assert_partitioned(model)
    peft_model = seed_flow(model, rank_batches(rank), None)
    state = init_state(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=peft_model,
        model_parameters=params,
        optimizer=torch.optim.SGD(params, lr=0.1),
        config=ds_config,
    )
    batch = rank_batches(rank)[0]
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
    from loralab.lora_ga import estimate_gradient

    try:
        estimate_gradient(engine, rank_batches(rank), None, targets=TARGETS, progress=False)
        message = ""
    except Exception as e:  # the test checks the message
        message = f"{type(e).__name__}: {e}"
    return state, message


def partitioned_llama():
    import deepspeed

    from loralab.core.testing import tiny_llama

    model = tiny_llama()
    deepspeed.zero.Init(module=model, config_dict_or_path=DS_CONFIG)
    _assert_partitioned(model)
    return model


def run_native_zero3(rank: int) -> tuple[dict, dict, str]:
    from loralab.core.gradients import estimate_gradients
    from loralab.core.testing import zero3_gather_peak
    from loralab.lora_ga import get_lora_ga_model

    base = partitioned_llama()
    with zero3_gather_peak(
        base
    ) as gathered:  # never more than one block (+ embeddings, head) whole
        model = get_lora_ga_model(base, config(), rank_batches(rank), progress=False)
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q.numel() == 0, "W0 is no longer partitioned"
    try:  # rank 0 has one batch, rank 1 two: both ranks raise (the block gathers would not pair)
        estimate_gradients(partitioned_llama(), rank_batches(rank)[: 1 + rank], progress=False)
        message = ""
    except Exception as e:  # the test checks the message
        message = f"{type(e).__name__}: {e}"
    return init_state(model), gathered, message


def run_hf_zero3(rank: int, checkpoint: str) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from loralab.core.testing import zero3_gather_peak

    keep_alive = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 - transformers reads it while loading
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    _assert_partitioned(model)
    with zero3_gather_peak(model) as gathered:
        state = init_state(seed_flow(model, rank_batches(rank), None))
    return state, gathered


def main(prefix: str, checkpoint: str) -> None:
    from accelerate import Accelerator

    from loralab.core.testing import tiny_llama

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    results = {
        "accelerate": init_state(seed_flow(tiny_llama(), loader(), accelerator)),
        "offload": init_state(seed_flow(tiny_llama(), loader(), accelerator, quant_flag=True)),
        "torchrun": init_state(seed_flow(tiny_llama(), rank_batches(rank), None)),
        "peft_flow": init_state(peft_flow(tiny_llama(), rank_batches(rank))),
    }
    results["zero3"], results["engine_error"] = run_zero3(rank)
    results["native_zero3"], results["native_zero3_gathered"], results["uneven_error"] = (
        run_native_zero3(rank)
    )
    from loralab.core.testing import zero3_gather_peak

    base = partitioned_llama()
    with zero3_gather_peak(base) as gathered:  # train_step fetches one module at a time
        results["peft_flow_zero3"] = init_state(peft_flow(base, rank_batches(rank)))
    results["peft_flow_zero3_gathered"] = gathered
    # scale="weight_svd" reads each base weight after the estimate: gathered one layer at a time
    results["peft_flow_zero3_weight_svd"] = init_state(
        peft_flow(partitioned_llama(), rank_batches(rank), scale="weight_svd")
    )
    results["hf_zero3"], results["hf_zero3_gathered"] = run_hf_zero3(rank, checkpoint)
    torch.save(results, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
