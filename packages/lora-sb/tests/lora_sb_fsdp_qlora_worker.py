"""Run by test_lora_sb_fsdp_qlora.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): FSDP-QLoRA.

Each rank loads the tiny Llama checkpoint in NF4 with bfloat16 code storage (``STORAGE``) and its float
copy (``load_float_model_for_estimation``), then calls ``get_lora_sb_model(quantized, config,
its_batches, estimation_model=float_copy, offload=True, shard=fully_shard_model)``: the estimate
streams the float copy block by block (gradients averaged over the ranks), the PEFT model of the
quantized base is sharded with FSDP2 and every rank writes its rows of ``B``, ``R``, ``A`` (W0 is not
modified). Then ``R`` trains for ``STEPS`` AdamW steps on the rank's micro-batches (batches and
optimizer as ``lora_sb_dist_worker``). Error modes, each caught before training:

- ``unused``: a Linear (``spare``) that the forward never calls is targeted (it is in the float copy
  too): the estimate raises naming it, on every rank;
- ``no_float``: quantized targets of the sharded model without ``estimation_model``;
- ``cast``: a ``MixedPrecisionPolicy(param_dtype=float16)`` that would cast the bfloat16 codes.

Each rank writes ``{prefix}.{rank}.pt``.
"""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loralab.core.distributed import end_process_group

_spec = importlib.util.spec_from_file_location(
    "lora_sb_dist_worker", Path(__file__).with_name("lora_sb_dist_worker.py")
)
w = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(w)

STORAGE = torch.bfloat16


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=STORAGE,
    )


def load_quantized(path):
    from transformers import AutoModelForCausalLM

    from loralab.core.quant import dtype_kwarg

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(), device_map="cpu", **{dtype_kwarg(): torch.float32}
    )


def float_copy(path):
    from loralab.core.quant import load_float_model_for_estimation

    return load_float_model_for_estimation(path, bnb_config())


def build(path, batches, **kwargs):
    from loralab.lora_sb import LoraSBConfig, get_lora_sb_model

    config = LoraSBConfig(r=w.RANK_R, target_modules=w.TARGETS)
    return get_lora_sb_model(
        load_quantized(path), config, batches, lr=w.INIT_LR, progress=False,
        estimation_model=float_copy(path), offload=True, **kwargs,
    )  # fmt: skip


def train(model, batches):
    opt = w.make_optimizer(model)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return torch.stack(losses)


def whole_state(state):
    from loralab.core.sharding import whole

    return {k: whole(v).clone() for k, v in state.items()}


def main(prefix: str, path: str) -> None:
    from loralab.core.quant import quant_config_of
    from loralab.core.sharding import is_dtensor
    from loralab.core.testing import fully_shard_model
    from loralab.lora_sb import LoraSBConfig, get_lora_sb_model, lora_sb_layers

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(path, w.init_batches(rank), shard=fully_shard_model)
    bases = [layer.get_base_layer() for layer in lora_sb_layers(model).values()]
    out: dict = {
        "sharded_nf4": torch.tensor(
            [is_dtensor(b.weight) and quant_config_of(b).kind == "nf4" for b in bases]
        ),
        "init": whole_state(w.factors(model)),
    }
    out["losses"] = train(model, w.train_batches(rank))
    out["final"] = whole_state(w.final_r(model))

    qmodel, fmodel = load_quantized(path), float_copy(path)
    for m in (qmodel, fmodel):
        m.model.layers[0].spare = torch.nn.Linear(64, 64)  # never called by the forward
    config = LoraSBConfig(r=w.RANK_R, target_modules=[*w.TARGETS, "spare"])
    try:
        get_lora_sb_model(
            qmodel, config, w.init_batches(rank), lr=w.INIT_LR, progress=False,
            estimation_model=fmodel, offload=True, shard=fully_shard_model,
        )  # fmt: skip
    except Exception as e:  # the test checks the type and message
        out["unused_error"] = f"{type(e).__name__}: {e}"
    config = LoraSBConfig(r=w.RANK_R, target_modules=w.TARGETS)
    try:
        get_lora_sb_model(
            load_quantized(path), config, w.init_batches(rank), lr=w.INIT_LR, progress=False,
            shard=fully_shard_model,
        )  # fmt: skip
    except Exception as e:
        out["no_float_error"] = f"{type(e).__name__}: {e}"

    def shard_fp16(peft_model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.float16)
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(peft_model, mp_policy=policy)

    try:
        build(path, w.init_batches(rank), shard=shard_fp16)
    except Exception as e:
        out["cast_error"] = f"{type(e).__name__}: {e}"
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
