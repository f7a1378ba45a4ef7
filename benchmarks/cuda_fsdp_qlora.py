"""FSDP-QLoRA on a GPU: LoRA-GA and LoRA-SB initialised on an NF4 base with bitsandbytes' CUDA kernels,
sharded by FSDP2 over NCCL, then trained; against the same flow without FSDP2 on the same GPU.

What the CPU tests cannot run (``test_lora_ga_fsdp_qlora.py`` / ``test_lora_sb_fsdp_qlora.py`` use
gloo and bitsandbytes' CPU backend): the CUDA dequantization and 4-bit matmul kernels under FSDP2's
DTensor parameters, the NCCL collectives of the init (gradient all-reduce, rows gathered for the SVD,
written back) and of training, and the GPU memory of the 4-bit base against a bfloat16 one.

Per method and code-storage dtype (``bnb_4bit_quant_storage``: bfloat16, uint8) on a random Llama saved
to a temporary checkpoint: load it in NF4 on the GPU, the float copy on the CPU
(``load_float_model_for_estimation``), init (``estimation_model=float_copy, offload=True``, the blocks
streamed through the GPU), then ``STEPS`` AdamW steps in bfloat16 autocast. ``fsdp2`` passes
``shard=fully_shard_model``; ``plain`` does not. Reported: the init's factors (A, B and, LoRA-GA, the
dequantized W0 offset) of ``fsdp2`` vs ``plain`` (max relative difference), the training losses of
both, peak GPU memory of the training steps, and the same steps on a bfloat16 base (no quantization)
for the 4-bit memory saving.

Run: ``python benchmarks/cuda_fsdp_qlora.py`` (one rank on one GPU, whose FSDP2 mesh holds the whole
model) or under ``torchrun --nproc-per-node N`` (one rank per GPU); writes
``benchmarks/results/cuda_fsdp_qlora.md`` (``--out FILE`` also keeps the JSON, ``--report FILE`` prints
a JSON's markdown). Needs CUDA and bitsandbytes; without CUDA it writes nothing (``--cpu``: a dry run
of the script on gloo and bitsandbytes' CPU backend, small shape, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results" / "cuda_fsdp_qlora.md"
SHAPE = dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, vocab_size=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK_R, ALPHA, STEPS, LR = 8, 16, 4, 2e-4
QUICK_SHAPE = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, vocab_size=8000)
BATCH, SEQ = 4, 256
DEVICE = (
    "cuda"  # --cpu (a dry run of this script's logic on gloo and bitsandbytes' CPU backend): "cpu"
)


def bnb_config(storage: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,
    )


def batches(n: int, seed: int, device: str) -> list[dict[str, torch.Tensor]]:
    from loralab.core.testing import make_lm_batches

    out = make_lm_batches(
        n, batch_size=BATCH, seq_len=SEQ, vocab_size=SHAPE["vocab_size"], seed=seed
    )
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def load_base(path: str, storage: torch.dtype | None):
    from transformers import AutoModelForCausalLM

    from loralab.core.quant import dtype_kwarg

    kw = {"quantization_config": bnb_config(storage)} if storage is not None else {}
    return AutoModelForCausalLM.from_pretrained(
        path, device_map={"": DEVICE}, **{dtype_kwarg(): torch.bfloat16}, **kw
    )


def init(method: str, path: str, storage: torch.dtype, shard: bool):
    from loralab.core.quant import load_float_model_for_estimation
    from loralab.core.testing import fully_shard_model

    qmodel = load_base(path, storage)
    float_copy = load_float_model_for_estimation(path, bnb_config(storage))
    kw = dict(estimation_model=float_copy, offload=True, progress=False)
    if shard:
        kw["shard"] = fully_shard_model
    init_batches = batches(2, seed=5, device="cpu")
    if method == "lora-ga":
        from loralab.lora_ga import LoraGAConfig, get_lora_ga_model

        config = LoraGAConfig(r=RANK_R, lora_alpha=ALPHA, target_modules=TARGETS)
        return get_lora_ga_model(qmodel, config, init_batches, **kw)
    from loralab.lora_sb import LoraSBConfig, get_lora_sb_model

    config = LoraSBConfig(r=RANK_R, target_modules=TARGETS)
    return get_lora_sb_model(qmodel, config, init_batches, lr=1e-3, **kw)


def factors(model) -> dict[str, torch.Tensor]:
    """Every adapter tensor and (quantized bases) the dequantized base weight, whole, on the CPU."""
    from loralab.core.quant import dequantize_weight, is_quantized
    from loralab.core.sharding import whole

    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            for slot in ("lora_A", "lora_B", "lora_R"):
                if hasattr(mod, slot) and "default" in getattr(mod, slot):
                    w = getattr(mod, slot)["default"].weight.detach()
                    out[f"{name}.{slot}"] = whole(w).float().cpu()
            base = mod.get_base_layer()
            if is_quantized(base):
                out[f"{name}.W0"] = dequantize_weight(base).float().cpu()
    return out


def train(model) -> tuple[list[float], float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for b in batches(STEPS, seed=7, device=DEVICE):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if not cuda:
        return losses, float("nan")
    torch.cuda.synchronize()
    return losses, torch.cuda.max_memory_allocated() / 2**20


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:4]
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


def report(data: dict) -> str:
    """The markdown section of a run's JSON (``--report``)."""
    runs, shape = data["runs"], data["shape"]
    lines = [
        "## FSDP-QLoRA on a GPU: LoRA-GA / LoRA-SB init on an NF4 base, FSDP2 vs no FSDP2",
        "",
        f"- command: `torchrun --nproc-per-node {data['world_size']} benchmarks/cuda_fsdp_qlora.py"
        f"{' --quick' if data.get('quick') else ''}` "
        "(one rank: `python benchmarks/cuda_fsdp_qlora.py` is the same)",
        f"- machine: {data['device']}, torch {data['torch']}, bitsandbytes {data['bitsandbytes']}, "
        f"transformers {data['transformers']}; {data['world_size']} rank(s) (NCCL)",
        f"- model: random Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, intermediate "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}; NF4 with double quantization, bfloat16 compute; "
        f"LoRA r={RANK_R} on {', '.join(TARGETS)}; init on 2 batches of {BATCH}x{SEQ} (float copy on the CPU, "
        f"blocks streamed through the GPU), then {STEPS} AdamW steps (lr {LR}) in bfloat16 autocast",
        "",
        "| method / code storage | FSDP2 | init (s) | losses | train peak GPU alloc (MiB) | factors, FSDP2 vs plain (max rel.) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for key, r in runs.items():
        if key.endswith("_max_rel"):
            continue
        method, storage, mode = key.split("/")
        cmp = runs.get(f"{method}/{storage}/fsdp2_vs_plain_max_rel")
        cmp_s = f"{cmp:.1e}" if (mode == "fsdp2" and cmp is not None) else ""
        if "error" in r:
            last = r["error"].strip().splitlines()[-1]
            lines.append(f"| {method} / {storage} | {mode} | refused | `{last[:260]}` | | |")
            continue
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        lines.append(
            f"| {method} / {storage} | {mode} | {r['init_s']:.1f} | {losses} | {r['train_peak_mib']:.0f} | {cmp_s} |"
        )
    lines += [
        "",
        "Reading: with one rank the FSDP2 mesh holds the whole model, so this checks the CUDA code paths "
        "(bitsandbytes' kernels on DTensor-sharded codes, NCCL collectives, the sharded write-back), not the "
        "split over ranks, which the 2-rank CPU tests compare with one process. The factor difference "
        "FSDP2 vs plain also holds the GPU's run-to-run nondeterminism (atomic adds in the backward pass, "
        "amplified by the SVD where singular values are close); this run has no plain-vs-plain control "
        "to separate the two. A refused row is the error raised before `fully_shard` (the message's last "
        "line, cut).",
    ]
    bf = data.get("bf16_lora", {})
    if "train_peak_mib" in bf:
        lines += [
            "",
            f"The same {STEPS} steps with plain LoRA on a bfloat16 base (no quantization, no FSDP2): "
            f"peak {bf['train_peak_mib']:.0f} MiB.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the run's JSON here")
    ap.add_argument(
        "--results", type=Path, default=RESULTS, help="the markdown written by a GPU run"
    )
    ap.add_argument("--quick", action="store_true", help=f"a smaller model ({QUICK_SHAPE})")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (gloo), small shape")
    ap.add_argument(
        "--report", type=Path, default=None, help="print the markdown of a run's JSON and exit"
    )
    args = ap.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())), end="")
        return
    if not args.cpu and not torch.cuda.is_available():
        print(
            f"no CUDA device: {args.results} keeps the results recorded on a GPU", file=sys.stderr
        )
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)  # run without torchrun: one rank
    if "MASTER_PORT" not in os.environ:
        from loralab.core.testing import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    global DEVICE
    if args.quick:
        SHAPE.update(QUICK_SHAPE)
    if args.cpu:
        DEVICE = "cpu"
        SHAPE.update(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=512)
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("nccl")
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    import bitsandbytes
    import transformers

    from loralab.core.distributed import end_process_group
    from loralab.core.testing import save_tiny, tiny_llama

    result: dict = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
        "world_size": dist.get_world_size(),
        "quick": args.quick,
        "shape": SHAPE,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = str(
            save_tiny(
                tiny_llama(num_attention_heads=8, num_key_value_heads=8, **SHAPE),
                tmp,
                tokenizer=False,
            )
        )
        try:
            model = load_base(path, None)
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model, LoraConfig(r=RANK_R, lora_alpha=ALPHA, target_modules=TARGETS)
            )
            losses, peak = train(model)
            result["bf16_lora"] = {"losses": losses, "train_peak_mib": peak}
            del model
        except Exception:
            result["bf16_lora"] = {"error": traceback.format_exc()[-3000:]}
        for method in ("lora-ga", "lora-sb"):
            for storage in (torch.bfloat16, torch.uint8):
                got: dict = {}
                for mode in ("plain", "fsdp2"):
                    key = f"{method}/{str(storage).removeprefix('torch.')}/{mode}"
                    t0 = time.perf_counter()
                    try:
                        model = init(method, path, storage, shard=mode == "fsdp2")
                        got[mode] = factors(model)
                        init_s = time.perf_counter() - t0
                        losses, peak = train(model)
                        result["runs"][key] = {
                            "init_s": init_s,
                            "losses": losses,
                            "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
                            "train_peak_mib": peak,
                        }
                        del model
                    except Exception:
                        result["runs"][key] = {"error": traceback.format_exc()[-3000:]}
                    if DEVICE == "cuda":
                        torch.cuda.empty_cache()
                    print(key, json.dumps(result["runs"][key])[:400], flush=True)
                if len(got) == 2:
                    result["runs"][
                        f"{method}/{str(storage).removeprefix('torch.')}/fsdp2_vs_plain_max_rel"
                    ] = max_rel(got["fsdp2"], got["plain"])
    if dist.get_rank() == 0:
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1))
        text = report(result)
        print(text)
        if not args.cpu:  # a dry run does not replace the GPU's results
            args.results.write_text(text)
    end_process_group()  # not left to the interpreter's exit


if __name__ == "__main__":
    main()
