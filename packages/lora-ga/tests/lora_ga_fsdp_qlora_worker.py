"""Run by test_lora_ga_fsdp_qlora.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): FSDP-QLoRA.

Each rank loads the tiny Llama checkpoint in NF4 with a float storage dtype (``STORAGE``) and its float
copy (``load_float_model_for_estimation``), then calls ``get_lora_ga_model(quantized, config,
its_batches, estimation_model=float_copy, offload=True, shard=fully_shard_model)``: the estimate
streams the float copy block by block (gradients averaged over the ranks), the PEFT model of the
quantized base is sharded with FSDP2 and every rank writes its rows of ``A``, ``B`` and of the NF4
codes of ``W0 − s·B·A`` (re-quantized whole, the statistics on every rank). Then ``STEPS`` AdamW steps
on the rank's micro-batches. Error modes, each caught before training:

- ``unused``: a Linear (``spare``) that the forward never calls is targeted (it is in the float copy
  too): the estimate raises naming it, on every rank;
- ``no_float``: quantized targets without ``estimation_model``;
- ``cast``: a ``MixedPrecisionPolicy(param_dtype=bfloat16)`` that would cast the float32 codes.

Each rank writes ``{prefix}.{rank}.pt``. The constants are shared with the test (it loads this file).
"""

import sys

import torch
import torch.distributed as dist

from loralab.core.distributed import end_process_group

RANK_R = 4
ALPHA = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
STORAGE = torch.float32
STEPS = 3
LR = 1e-3
PREFIX = "base_model.model."


def bnb_config(storage=STORAGE):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )


def load_quantized(path, storage=STORAGE):
    from transformers import AutoModelForCausalLM

    from loralab.core.quant import dtype_kwarg

    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb_config(storage),
        device_map="cpu",
        **{dtype_kwarg(): torch.float32},
    )


def float_copy(path):
    from loralab.core.quant import load_float_model_for_estimation

    return load_float_model_for_estimation(path, bnb_config())


def config():
    from loralab.lora_ga import LoraGAConfig

    return LoraGAConfig(r=RANK_R, lora_alpha=ALPHA, target_modules=TARGETS, use_rslora=True)


def init_batches(rank):
    """Rank ``r`` estimates on batches ``r`` and ``r + 2`` of 4 (one process: all 4)."""
    from loralab.core.testing import make_lm_batches

    b = make_lm_batches(4, seed=5)
    return [b[rank], b[rank + 2]]


def train_batches(rank):
    """Step ``t``'s micro-batch of ``rank``: rows ``[2·rank, 2·rank + 2)`` of a global batch of 4."""
    from loralab.core.testing import make_lm_batches

    return [
        {k: v[2 * rank : 2 * rank + 2] for k, v in b.items()}
        for b in make_lm_batches(STEPS, batch_size=4, seed=7)
    ]


def state(model):
    """``{layer: (A, B, dequantized W0, W0's packed codes)}`` whole; collective under FSDP2."""
    from loralab.core.quant import dequantize_weight
    from loralab.core.sharding import whole

    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            base = mod.get_base_layer()
            out[name.removeprefix(PREFIX)] = (
                whole(mod.lora_A["default"].weight.detach()).clone(),
                whole(mod.lora_B["default"].weight.detach()).clone(),
                dequantize_weight(base),
                whole(base.weight.detach()).clone(),
            )
    return out


def train(model, batches):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return torch.stack(losses)


def main(prefix: str, path: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from loralab.core.quant import quant_config_of
    from loralab.core.sharding import is_dtensor
    from loralab.core.testing import fully_shard_model
    from loralab.lora_ga import get_lora_ga_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {}
    model = get_lora_ga_model(
        load_quantized(path), config(), init_batches(rank), estimation_model=float_copy(path),
        offload=True, progress=False, shard=fully_shard_model,
    )  # fmt: skip
    layers = [m.get_base_layer() for n, m in model.named_modules() if hasattr(m, "lora_A")]
    out["sharded_nf4"] = torch.tensor(
        [is_dtensor(b.weight) and quant_config_of(b).kind == "nf4" for b in layers]
    )
    out["init"] = state(model)
    out["losses"] = train(model, train_batches(rank))
    out["final"] = {k: v[:2] for k, v in state(model).items()}

    qmodel, fmodel = load_quantized(path), float_copy(path)
    for m in (qmodel, fmodel):
        m.model.layers[0].spare = torch.nn.Linear(64, 64)  # never called by the forward
    cfg = config()
    cfg.target_modules = [*TARGETS, "spare"]
    try:
        get_lora_ga_model(
            qmodel, cfg, init_batches(rank), estimation_model=fmodel, offload=True,
            progress=False, shard=fully_shard_model,
        )  # fmt: skip
    except Exception as e:  # the test checks the type and message
        out["unused_error"] = f"{type(e).__name__}: {e}"
    try:
        get_lora_ga_model(
            load_quantized(path), config(), init_batches(rank), progress=False,
            shard=fully_shard_model,
        )  # fmt: skip
    except Exception as e:
        out["no_float_error"] = f"{type(e).__name__}: {e}"

    def shard_bf16(peft_model):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(peft_model, mp_policy=policy)

    try:
        get_lora_ga_model(
            load_quantized(path), config(), init_batches(rank), estimation_model=float_copy(path),
            progress=False, shard=shard_bf16,
        )  # fmt: skip
    except Exception as e:
        out["cast_error"] = f"{type(e).__name__}: {e}"
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
