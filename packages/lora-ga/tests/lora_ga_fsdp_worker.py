"""Run by test_lora_ga_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank calls ``get_lora_ga_model(model, config, its_batches, shard=fully_shard_model)``: the PEFT
model is sharded with FSDP2 (``fully_shard`` on each decoder block, the inner model and the root)
before the estimate, which then runs on the sharded model. Rank ``r`` estimates on batches ``r`` and
``r + 2`` of ``lora_ga_dist_worker.loader()`` (as the other distributed modes). Modes:

- ``llama``: tiny Llama, ``nn.Linear`` targets (``q_proj``, ``v_proj``, ``down_proj``);
- ``gpt2``: tiny GPT-2, ``Conv1D`` targets (``c_attn``, ``c_fc``: weights stored (in, out), so the
  rows FSDP2 shards are the input features);
- ``unused``: a Linear (``spare``) added to block 0 that the forward never calls is also targeted:
  every rank must raise the estimation error naming it;
- ``dtype``: ``LoraGAConfig(dtype="bf16")`` with the factors sharded in float32 must raise;
- ``peft_flow``: PEFT's flow with loralab's drop-in on a sharded model: the base model sharded
  (``fully_shard_model``), ``preprocess_loraga(model, peft.LoraConfig(..., init_lora_weights="lora_ga"),
  train_step)`` with ``train_step`` running this rank's batches through the sharded model, then
  ``peft.get_peft_model`` (its warning recorded); then ``fully_shard`` on every new ``lora_A`` /
  ``lora_B`` module and one SGD step on this rank's first batch.

Each rank writes ``{prefix}.{rank}.pt``: per mode ``{layer: (A, B, W0)}`` gathered whole, the initial
factors the LoRA-GA export keeps (``_lora_ga_init``), whether the parameters were sharded, how many
layers' float32 gradient sums existed at once and in all (the estimate runs block by block on the
sharded model: one block's at a time; :func:`loralab.core.testing.gradient_sums_peak`), the
error messages of ``unused`` and ``dtype``, and for ``peft_flow`` the state after the SGD step and the
warning ``get_peft_model`` gave.
"""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loralab.core.distributed import end_process_group

_spec = importlib.util.spec_from_file_location(
    "lora_ga_dist_worker", Path(__file__).with_name("lora_ga_dist_worker.py")
)
w = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(w)

GPT2_TARGETS = ["c_attn", "c_fc"]


def gpt2_config():
    from loralab.lora_ga import LoraGAConfig

    return LoraGAConfig(r=w.RANK_R, lora_alpha=w.ALPHA, target_modules=GPT2_TARGETS)


def state(model):
    """``{layer: (A, B, W0)}`` whole, from the sharded (or plain) model; collective under FSDP2."""
    from loralab.core.sharding import whole

    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            params = [
                mod.lora_A["default"].weight,
                mod.lora_B["default"].weight,
                mod.get_base_layer().weight,
            ]
            out[name.removeprefix(w.PREFIX)] = tuple(whole(p.detach()).clone() for p in params)
    return out


def init_factors(model):
    return {
        name.removeprefix(w.PREFIX): mod._lora_ga_init["default"]
        for name, mod in model.named_modules()
        if "_lora_ga_init" in mod.__dict__
    }


STEP_LR = 0.1


def shard_adapters(model) -> None:
    """``fully_shard`` every ``lora_A`` / ``lora_B`` module PEFT added after the base was sharded."""
    from torch.distributed.fsdp import fully_shard

    for mod in model.modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            fully_shard(mod.lora_A["default"])
            fully_shard(mod.lora_B["default"])


def sgd_step(model, batch) -> None:
    """One SGD step (``STEP_LR``) of the trainable parameters on ``batch``, in train mode."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=STEP_LR)
    model.train()
    model(**batch).loss.backward()
    opt.step()


def run_peft_flow(batches) -> dict:
    import warnings

    import peft

    from loralab.core.sharding import is_sharded
    from loralab.core.testing import fully_shard_model, tiny_llama
    from loralab.lora_ga import preprocess_loraga

    model = fully_shard_model(tiny_llama())
    config = w.peft_config()

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    preprocess_loraga(model, config, train_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.get_peft_model(model, config)
    out = {
        "peft_flow": state(peft_model),
        "peft_flow_warnings": [str(c.message) for c in caught if "FSDP2" in str(c.message)],
    }
    shard_adapters(peft_model)
    out["peft_flow_sharded"] = torch.tensor(all(is_sharded(p) for p in peft_model.parameters()))
    sgd_step(peft_model, batches[0])
    out["peft_flow_step"] = state(peft_model)
    return out


def main(prefix: str) -> None:
    from loralab.core.sharding import is_sharded
    from loralab.core.testing import fully_shard_model, gradient_sums_peak, tiny_gpt2, tiny_llama
    from loralab.lora_ga import get_lora_ga_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batches = w.rank_batches(rank)
    out: dict = {}
    for mode, build, config in (
        ("llama", tiny_llama, w.config()),
        ("gpt2", tiny_gpt2, gpt2_config()),
    ):
        with gradient_sums_peak() as seen:  # the float32 sums held at once (this rank's rows)
            model = get_lora_ga_model(
                build(), config, batches, progress=False, shard=fully_shard_model
            )
        out[f"{mode}_sums"] = torch.tensor([seen["peak_layers"], seen["layers"]])
        out[mode] = state(model)
        out[f"{mode}_init"] = init_factors(model)
        out[f"{mode}_sharded"] = torch.tensor(all(is_sharded(p) for p in model.parameters()))
    model = tiny_llama()
    model.model.layers[0].spare = torch.nn.Linear(64, 64)  # never called by the forward
    config = w.config()
    config.target_modules = [*w.TARGETS, "spare"]
    try:
        get_lora_ga_model(model, config, batches, progress=False, shard=fully_shard_model)
    except Exception as e:  # the test checks the type and message
        out["unused_error"] = f"{type(e).__name__}: {e}"
    from loralab.lora_ga import LoraGAConfig

    # the sharded factors are float32: fully_shard fixed their dtype
    config = LoraGAConfig(r=w.RANK_R, lora_alpha=w.ALPHA, target_modules=w.TARGETS, dtype="bf16")
    try:
        get_lora_ga_model(tiny_llama(), config, batches, progress=False, shard=fully_shard_model)
    except Exception as e:  # the test checks the type and message
        out["dtype_error"] = f"{type(e).__name__}: {e}"
    out.update(run_peft_flow(batches))
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
