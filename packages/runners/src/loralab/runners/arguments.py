"""Command-line arguments shared by every fine-tuning entrypoint (GLUE, MetaMath, WinoGrande).

Flags follow ``transformers.TrainingArguments`` names where one exists (``--per_device_train_batch_size``,
``--gradient_accumulation_steps``, ``--lr_scheduler_type``, ``--resume_from_checkpoint`` ...), so the seed
projects' ``run_glue.py`` style command lines carry over. Each entrypoint subclasses
:class:`TrainArgs` with its data flags; :func:`parse_args` builds ``argparse`` from the dataclass fields
plus the method registry's flags, then validates everything (a method option that does not apply to
``--method`` fails here, naming the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin, get_type_hints

from loralab.runners.launch import (
    ACCELERATE_FSDP_YAML,
    FSDP_OFFLOAD,
    accelerate_fsdp,
    check_fsdp_mode,
    fsdp_flag,
)
from loralab.runners.methods import (
    OPTIONS,
    add_method_arguments,
    get_method,
    resolve_method_options,
)
from loralab.runners.methods.base import _bool
from loralab.runners.preflight import bad_input_named
from loralab.runners.quantization import check_quantization_args

__all__ = ["REPORT_TO", "TrainArgs", "build_parser", "parse_args"]

REPORT_TO = ("none", "tensorboard", "wandb")
T = TypeVar("T", bound="TrainArgs")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with ``metadata={"help": ...}``; ``identity=False`` marks a setting that does not
    change what is trained (logging, evaluation, output paths): a resume may change it."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainArgs:
    """Training settings common to every entrypoint (the method's own options come from the registry)."""

    if TYPE_CHECKING:
        # --method, the method's options and run-time settings (progress, task_type, ...) are set as
        # plain attributes by parse_args and the recipes, not declared as fields
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    model_name_or_path: str = _f(
        None, "model directory or hub name (AutoModel*.from_pretrained) (required)"
    )
    output_dir: str = _f(
        None,
        "run directory: run_config.json, metrics.jsonl, checkpoint-N/, final/ (required)",
        identity=False,
    )
    overwrite_output_dir: bool = _f(
        False,
        "replace the previous run in a non-empty --output_dir (its checkpoints, metrics, predictions and "
        "final/ are removed first); without it a non-empty --output_dir is refused",
        identity=False,
    )
    tokenizer_name: str | None = _f(None, "tokenizer (default: model_name_or_path)")
    # optimisation
    learning_rate: float = _f(1e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "decoupled weight decay (matrices only)")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_epsilon: float = _f(1e-8, "Adam epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    lr_scheduler_type: str = _f(
        "linear", "transformers scheduler name (linear, cosine, constant_with_warmup, ...)"
    )
    warmup_steps: int = _f(0, "warm-up optimizer steps (overrides --warmup_ratio)")
    warmup_ratio: float = _f(0.0, "warm-up as a fraction of the optimizer steps")
    num_train_epochs: float = _f(1.0, "epochs (ignored when --max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps; -1 = num_train_epochs over the training set")
    per_device_train_batch_size: int = _f(8, "micro-batch per process")
    per_device_eval_batch_size: int = _f(8, "evaluation batch per process", identity=False)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    # precision and memory
    bf16: bool = _f(
        False,
        "bfloat16 mixed precision (autocast; DeepSpeed bf16 under --deepspeed; under --fsdp FSDP2's "
        "MixedPrecisionPolicy: bfloat16 parameters in compute, float32 gradient reduction)",
    )
    gradient_checkpointing: bool = _f(False, "activation checkpointing (non-reentrant)")
    # quantized base (QLoRA): transformers' BitsAndBytesConfig names, see loralab.runners.quantization
    load_in_4bit: bool = _f(
        False, "load the base in 4-bit (bitsandbytes NF4/FP4) and train the adapters on it (QLoRA)"
    )
    load_in_8bit: bool = _f(False, "load the base in 8-bit (bitsandbytes LLM.int8)")
    bnb_4bit_quant_type: str | None = _f(
        None, "4-bit data type (default nf4, QLoRA's)", choices=("nf4", "fp4")
    )
    bnb_4bit_use_double_quant: bool | None = _f(
        None, "4-bit: quantize the block scales too (QLoRA's double quantization; default false)"
    )
    bnb_4bit_compute_dtype: str | None = _f(
        None,
        "4-bit matmul dtype (default: the weights' dtype, --torch_dtype or float32)",
        choices=("float32", "bfloat16", "float16"),
    )
    bnb_4bit_quant_storage: str | None = _f(
        None,
        "4-bit: the dtype the packed codes are stored in (default uint8). FSDP2 (--fsdp full_shard) "
        "shards every storage; with --fsdp and --bf16 a float storage must be bfloat16 (FSDP2 casts "
        "float parameters to its compute dtype)",
        choices=("uint8", "bfloat16", "float16", "float32"),
    )
    merge_and_save: bool = _f(
        False,
        "also write output_dir/merged: the adapters merged into the (dequantized) base, a plain model",
    )
    # run control
    seed: int = _f(42, "seed of model init, data order and dropout")
    max_length: int = _f(512, "maximum tokens per training example")
    max_train_samples: int | None = _f(None, "truncate the training set (quick runs)")
    max_eval_samples: int | None = _f(
        None, "truncate the evaluation set (quick runs)", identity=False
    )
    logging_steps: int = _f(10, "log the training loss every N optimizer steps", identity=False)
    eval_steps: int = _f(0, "evaluate every N optimizer steps (0: only at the end)", identity=False)
    save_steps: int = _f(
        0, "checkpoint every N optimizer steps (0: no intermediate checkpoints)", identity=False
    )
    save_total_limit: int | None = _f(None, "keep only the newest N checkpoints", identity=False)
    resume_from_checkpoint: str | None = _f(
        None,
        "checkpoint directory, or 'latest' for the newest checkpoint-N in --output_dir",
        identity=False,
    )
    report_to: str = _f("none", "experiment tracker", choices=REPORT_TO, identity=False)
    run_name: str | None = _f(
        None, "tracker run name (default: the output_dir name)", identity=False
    )
    deepspeed: str | None = _f(
        None,
        "DeepSpeed config: a JSON path or a built-in name (zero2, zero3, zero3_offload); 'auto' values are filled from these flags",
    )
    fsdp: str | None = _f(
        None,
        "shard parameters, gradients and optimizer state with FSDP2 (torch.distributed.fsdp.fully_shard); "
        "launch with torchrun. 'full_shard' (weights gathered again for the backward, least memory) or "
        "'shard_grad_op' (kept from forward to backward: one all-gather per block and step); add "
        "'offload' (\"full_shard offload\") to keep the shards, gradients and optimizer step on the CPU",
    )
    disable_tqdm: bool = _f(False, "no progress bars", identity=False)
    save_final_model: bool = _f(
        True,
        "save the trained model (adapter for LoRA methods) to output_dir/final",
        identity=False,
    )
    local_rank: int = _f(
        -1,
        "set by the deepspeed launcher; the process rank comes from the environment",
        identity=False,
    )

    # method options are attached by parse_args (see loralab.runners.methods.OPTIONS)

    def validate(self) -> None:
        for name in ("model_name_or_path", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"--max_steps must be -1 (use --num_train_epochs) or >= 1, got {self.max_steps}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        launch = (
            accelerate_fsdp()
        )  # accelerate launch with an FSDP2 YAML: the same engine as --fsdp
        if launch is not None:
            if self.fsdp is not None:
                raise ValueError(
                    f"{ACCELERATE_FSDP_YAML} already shards with FSDP2: drop --fsdp, got --fsdp {self.fsdp}"
                )
            if launch.mixed_precision == "bf16" and not self.bf16:
                raise ValueError(
                    f"{ACCELERATE_FSDP_YAML} has mixed_precision: bf16: pass --bf16 true, got --bf16 false"
                )
            quantized = [f for f in ("load_in_4bit", "load_in_8bit") if getattr(self, f, False)]
            if launch.cpu_ram_efficient_loading and get_method(self.method).builds_from_weights:
                raise ValueError(
                    f"{ACCELERATE_FSDP_YAML}: fsdp_cpu_ram_efficient_loading builds the model without "
                    f"weights on every rank but the first, and --method {self.method} computes its "
                    "adapters from the weights before sharding; set fsdp_cpu_ram_efficient_loading: false"
                )
            if launch.cpu_ram_efficient_loading and quantized:
                # transformers quantizes while loading on every rank (no meta model to fill from rank 0)
                raise ValueError(
                    f"{ACCELERATE_FSDP_YAML}: fsdp_cpu_ram_efficient_loading does not load a quantized "
                    f"base (--{quantized[0]}): transformers quantizes it on every rank; set "
                    "fsdp_cpu_ram_efficient_loading: false"
                )
            self.fsdp = f"full_shard {FSDP_OFFLOAD}" if launch.offload_params else "full_shard"
        if self.fsdp is not None:
            check_fsdp_mode(self.fsdp)
            if self.deepspeed:
                raise ValueError(
                    f"{fsdp_flag(self.fsdp)} cannot be combined with --deepspeed (both shard the model), got "
                    f"--deepspeed {self.deepspeed}"
                )
            if self.load_in_8bit:
                # bitsandbytes' int8 layer keeps its row scales on the weight tensor, which FSDP2
                # replaces by its shard (loralab.core.quant.check_fsdp_quantized)
                raise ValueError(
                    f"{fsdp_flag(self.fsdp)} cannot shard an 8-bit (LLM.int8) base: use --load_in_4bit "
                    "(FSDP-QLoRA) or drop the sharding, got --load_in_8bit true"
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update({k: getattr(self, k) for k in (*OPTIONS, "method") if hasattr(self, k)})
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def _arg_type(tp: Any) -> Any:
    if get_origin(tp) is not None:  # X | None
        inner = [a for a in get_args(tp) if a is not type(None)]
        tp = inner[0]
    return _bool if tp is bool else tp


def build_parser(cls: type[TrainArgs], description: str = "") -> argparse.ArgumentParser:
    """``argparse`` parser with one ``--flag`` per dataclass field plus the method registry's flags."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kw: dict[str, Any] = dict(default=f.default, help=f.metadata.get("help", ""))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        tp = _arg_type(hints[f.name])
        if tp is _bool:
            kw["nargs"] = "?"
            kw["const"] = True
        kw["type"] = tp
        names = [f"--{f.name}"] + (["--local-rank"] if f.name == "local_rank" else [])
        parser.add_argument(*names, **kw)
    add_method_arguments(parser)
    return parser


def parse_args(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Parse ``argv`` into ``cls`` (a :class:`TrainArgs` subclass) and validate it and the method options."""
    ns = build_parser(cls, description).parse_args(argv)
    names = {f.name for f in dataclasses.fields(cls)}
    with bad_input_named():
        args = cls(**{k: v for k, v in vars(ns).items() if k in names})
        for k, v in vars(ns).items():
            if k not in names:
                setattr(args, k, v)
        args.validate()
        # max_steps may still be -1 here; the trainer fills it from the data before the method setup
        saved = args.max_steps
        args.max_steps = max(saved, 1)
        resolve_method_options(get_method(args.method), args)
        args.max_steps = saved
        check_quantization_args(args)  # before any model loads
    return args
