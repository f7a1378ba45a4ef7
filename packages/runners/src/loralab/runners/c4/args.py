"""Command-line settings of the C4 pre-training runner, as one validated dataclass.

The flag names follow the GaLore / GoLore ``torchrun_main.py`` scripts (``--model_config``,
``--batch_size``, ``--total_batch_size``, ``--optimizer galore_adamw``, ``--rank``,
``--update_proj_gap``, ``--galore_scale``, ``--rand_ratio``, ``--use_peft --golore``, ``--quantize``,
``--use_double_quant``, ...) so their launch lines carry over; ``parse_args`` builds the ``argparse`` parser from the fields' metadata.

Options of one optimizer or schedule (``--rank``, ``--rand_ratio``, ``--momentum``, ``--adam_eps``,
``--min_lr_ratio``, ...) default to ``None`` = "not given": given to a run they do not apply to, they
are refused naming the flag and what it belongs to; not given, they take the defaults of
:data:`OPTION_DEFAULTS` for the run's optimizer. ``--optimizer`` maps onto the method registry
(:meth:`C4Args.method_name`, :meth:`C4Args.optim`), which builds the optimizer.

Example:
    >>> from loralab.runners.c4.args import parse_args
    >>> args = parse_args(["--output_dir", "/tmp/run", "--batch_size", "4", "--total_batch_size", "8"])
    >>> args.gradient_accumulation_for(world_size=1)
    2
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from loralab.runners.launch import check_fsdp_mode

__all__ = ["OPTIMIZERS", "OPTION_DEFAULTS", "SCHEDULERS", "C4Args", "build_parser", "parse_args"]

OPTIMIZERS = (
    "adamw", "adam", "sgd", "galore_adamw", "golore_adamw", "galore_adamw8bit", "golore_adamw8bit",
    "galore_sgd", "golore_sgd",
)  # fmt: skip
"""``--optimizer`` choices. ``galore_*`` / ``golore_*`` project the attention and MLP weights."""
SCHEDULERS = ("cosine", "linear", "cosine_restarts", "constant")
DTYPES = ("float32", "bfloat16")
QUANTIZE = ("4bit", "8bit")
PACKING = ("pack", "truncate")

OPTION_DEFAULTS: dict[str, Any] = dict(
    rank=128,
    update_proj_gap=200,
    galore_scale=0.25,
    proj_type="std",
    rand_ratio=0.8,
    adam_beta1=0.9,
    adam_beta2=0.999,
    momentum=0.9,
    min_lr_ratio=0.1,
)
"""Defaults of the per-optimizer / per-schedule options when they apply and are not given (the
GaLore / GoLore C4 settings). ``--adam_eps``: 1e-6 for GaLore/GoLore AdamW (galore-torch), else 1e-8."""

# C4 flag -> method-registry option (the GaLore scripts' names differ from the fine-tuning runners')
REGISTRY_NAMES = {
    "rank": "galore_rank",
    "update_proj_gap": "update_proj_gap",
    "galore_scale": "galore_scale",
    "proj_type": "proj_type",
    "rand_ratio": "rand_ratio",
}
# C4 flag -> the inner optimizer family it configures (adamw: AdamW and its 8-bit form)
OPTIM_FLAGS = {"adam_beta1": "adamw", "adam_beta2": "adamw", "adam_eps": "adamw", "momentum": "sgd"}
# C4 flag -> the --scheduler values it applies to
SCHEDULER_FLAGS = {
    "min_lr_ratio": ("cosine", "cosine_restarts"),
    "cycle_length": ("cosine_restarts",),
    "restart_warmup_steps": ("cosine_restarts",),
}


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class C4Args:
    """Everything one C4 pre-training run needs (see ``python -m loralab.runners.c4 --help``)."""

    output_dir: str = _f(
        None, "run directory: metrics.jsonl, checkpoints, plots, final model (required)"
    )
    # model
    model_config: str = _f(
        "llama_60m", "preset (llama_20m|60m|130m|350m|1b|7b) or a LLaMA config JSON path"
    )
    vocab_size: str | None = _f(
        None,
        "override the config's vocab size: an int, or 'auto' = the tokenizer's size rounded up to 64",
    )
    tokenizer: str = _f(
        "t5-base", "tokenizer name or local directory (AutoTokenizer.from_pretrained)"
    )
    dtype: str = _f(
        "float32",
        "parameter dtype: float32 | bfloat16 (pure bf16 as the reference)",
        choices=DTYPES,
    )
    activation_checkpointing: bool = _f(False, "gradient checkpointing of the decoder layers")
    # data
    dataset: str = _f(
        "allenai/c4", "datasets.load_dataset name streamed when --train_data is not given"
    )
    dataset_config: str | None = _f("en", "dataset config name (C4: en)")
    train_data: str | None = _f(
        None,
        "local C4 shards: a directory, file or glob of json/jsonl(.gz) files with a 'text' field",
    )
    eval_data: str | None = _f(
        None, "local validation shards (same forms); default: the dataset's validation split"
    )
    tokenized_dir: str | None = _f(
        None, "train from token shards written by 'pretokenize' instead of raw text"
    )
    text_field: str = _f("text", "name of the text field of each record")
    max_length: int = _f(256, "sequence length in tokens")
    packing: str = _f(
        "pack",
        "pack: documents joined with EOS and cut into full sequences; truncate: one document per sequence, padded (the GaLore reference)",
        choices=PACKING,
    )
    shuffle_seed: int = _f(42, "seed of the shard order (local) / streaming shuffle (hub)")
    shuffle_buffer: int = _f(10_000, "streaming shuffle buffer (hub datasets only; 0 = no shuffle)")
    data_streams: int | None = _f(
        None,
        "number of disjoint data streams the global batch is drawn from (default: world size); set it to replay a multi-GPU run on fewer processes",
    )
    eval_tokens: int = _f(10_000_000, "held-out tokens per evaluation (the reference's 10M)")
    # batch
    batch_size: int = _f(16, "sequences per device per micro-batch")
    total_batch_size: int | None = _f(
        None, "sequences per optimizer step (default: batch_size x world size)"
    )
    gradient_accumulation: int | None = _f(
        None, "derived from total_batch_size; if given it must agree"
    )
    # schedule
    num_training_steps: int = _f(10_000, "optimizer (update) steps")
    max_train_tokens: str | None = _f(
        None, "train on this many tokens instead (e.g. 100M, 1B): overrides num_training_steps"
    )
    lr: float = _f(1e-3, "peak learning rate")
    scheduler: str = _f("cosine", "learning-rate schedule", choices=SCHEDULERS)
    warmup_steps: int = _f(1_000, "linear warm-up steps")
    min_lr_ratio: float | None = _f(
        None, "cosine / cosine_restarts: floor as a fraction of --lr (default 0.1)"
    )
    cycle_length: int | None = _f(
        None, "cosine_restarts: steps per cycle (default: --update_proj_gap)"
    )
    restart_warmup_steps: int | None = _f(
        None, "cosine_restarts: warm-up steps after each restart (default: 10%% of the cycle)"
    )
    weight_decay: float = _f(0.0, "weight decay")
    adam_beta1: float | None = _f(None, "AdamW beta1 (default 0.9)")
    adam_beta2: float | None = _f(None, "AdamW beta2 (default 0.999)")
    adam_eps: float | None = _f(
        None,
        "AdamW epsilon (default: the optimizer's own, 1e-8 for torch AdamW, 1e-6 for GaLore/GoLore as galore-torch)",
    )
    momentum: float | None = _f(None, "SGD momentum (the *sgd optimizers; default 0.9)")
    grad_clipping: float = _f(
        0.0, "clip the global gradient norm to this (0 = off; GoLore uses 1.0)"
    )
    # optimizer
    optimizer: str = _f("adamw", "optimizer", choices=OPTIMIZERS)
    rank: int | None = _f(
        None,
        "GaLore/GoLore/ReLoRA-path projection rank (default 128; at most the narrowest target layer's width)",
    )
    update_proj_gap: int | None = _f(
        None, "GaLore/GoLore/ReLoRA path: steps between projector refreshes (default 200)"
    )
    galore_scale: float | None = _f(
        None,
        "GaLore/GoLore/ReLoRA path: scale of the projected update (GaLore's alpha; default 0.25)",
    )
    proj_type: str | None = _f(
        None,
        "GaLore/GoLore projection side: std | reverse_std | left | right | full (default std)",
    )
    rand_ratio: float | None = _f(
        None,
        "GoLore / ReLoRA path: fraction of the steps that use SVD projectors before switching to random ones (1.0 = GaLore; default 0.8)",
    )
    use_peft: bool = _f(
        False, "the seed's ReLoRA-structure path: wrap the model in ReLoRaModel (needs --golore)"
    )
    golore: bool = _f(
        False,
        "with --use_peft: GoLore's ReLoRaModel, merge_and_reinit every --update_proj_gap steps",
    )
    quantize: str | None = _f(
        None,
        "with --use_peft --golore: store the frozen W of every wrapped layer with bitsandbytes, 4bit (NF4, "
        "blocksize 64) or 8bit (int8 row-wise); A/B, norms, embeddings and the head stay float, every "
        "merge dequantizes W, folds A·B in and re-quantizes (the GoLore scripts' flag; default: float W)",
        choices=QUANTIZE,
    )
    use_double_quant: bool | None = _f(
        None,
        "with --quantize 4bit: QLoRA double quantization of the NF4 block scales (the GoLore scripts' flag; default off)",
    )
    # loop
    eval_every: int = _f(1_000, "evaluate every N update steps (and at the end)")
    save_every: int = _f(10_000, "checkpoint every N update steps (and at the end)")
    keep_checkpoints: int | None = _f(None, "keep only the newest N checkpoints")
    logging_steps: int = _f(1, "write a metrics line every N update steps")
    autoresume: bool = _f(
        False, "resume from the newest complete checkpoint in --output_dir if there is one"
    )
    resume_from_checkpoint: str | None = _f(None, "resume from this checkpoint directory")
    stop_at_step: int | None = _f(
        None,
        "stop (after checkpointing) at this update step without changing the schedule (pre-emptible jobs, tests)",
    )
    seed: int = _f(0, "seed of the model init and of everything random")
    report_to: str = _f("none", "also log to: none | tensorboard", choices=("none", "tensorboard"))
    plot: bool = _f(True, "write loss.png at the end")
    # launchers
    deepspeed_config: str | None = _f(
        None, "DeepSpeed JSON config: enables DeepSpeed ('auto' values are filled from these flags)"
    )
    fsdp: str | None = _f(
        None,
        "shard parameters, gradients and optimizer state with FSDP2 (torch.distributed.fsdp.fully_shard, "
        "one group per decoder layer); launch with torchrun. 'full_shard' (weights gathered again for the "
        "backward, least memory) or 'shard_grad_op' (kept from forward to backward); add 'offload' "
        '("full_shard offload") to keep the shards, gradients and optimizer step on the CPU',
    )
    local_rank: int = _f(-1, "set by the deepspeed launcher (the LOCAL_RANK variable is used)")

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        positive = (
            "max_length",
            "batch_size",
            "num_training_steps",
            "rank",
            "update_proj_gap",
            "eval_every",
            "save_every",
            "logging_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if value is None and name in OPTION_DEFAULTS:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name} must be a positive int, got {value!r}")
        for name in (
            "total_batch_size",
            "gradient_accumulation",
            "data_streams",
            "keep_checkpoints",
            "cycle_length",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        if self.warmup_steps < 0 or self.eval_tokens <= 0:
            raise ValueError(
                f"--warmup_steps must be >= 0 and --eval_tokens > 0, got {self.warmup_steps}, {self.eval_tokens}"
            )
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr_ratio is not None and not 0.0 < self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")
        if self.rand_ratio is not None and not 0.0 <= self.rand_ratio <= 1.0:
            raise ValueError(f"--rand_ratio must be in [0, 1], got {self.rand_ratio}")
        if self.grad_clipping < 0:
            raise ValueError(f"--grad_clipping must be >= 0, got {self.grad_clipping}")
        if (
            self.vocab_size is not None
            and self.vocab_size != "auto"
            and not str(self.vocab_size).isdigit()
        ):
            raise ValueError(f"--vocab_size must be an int or 'auto', got {self.vocab_size!r}")
        if self.use_peft and not self.golore:
            raise NotImplementedError(
                "--use_peft without --golore selects the original ReLoRA (Guitaricet/relora: random LoRA re-init and optimizer "
                "pruning), which is not implemented; pass --use_peft --golore for GoLore's ReLoRA-structure GaLore/GoLore"
            )
        if self.golore and not self.use_peft:
            raise ValueError(
                "--golore selects the ReLoRA-structure path and needs --use_peft; for the optimizer form use --optimizer golore_adamw"
            )
        if self.use_peft and self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(
                f"--use_peft --golore trains the low-rank factors with a plain optimizer (adamw | sgd), got --optimizer {self.optimizer}"
            )
        if self.max_train_tokens is not None:
            self.num_training_steps_from_tokens()  # validates the format
        if self.stop_at_step is not None and self.stop_at_step <= 0:
            raise ValueError(f"--stop_at_step must be positive, got {self.stop_at_step}")
        self._check_quantize()
        self._check_fsdp()
        self._refuse_foreign_options()
        self._fill_option_defaults()

    # optimizer / schedule options ---------------------------------------------------------------
    def method_name(self) -> str:
        """The method-registry name that builds this run's optimizer (``full``, ``galore``, ``golore``,
        ``golore-relora``)."""
        return "golore-relora" if self.use_peft else _c4_method(self.optimizer)

    def optim(self) -> str:
        """The inner optimizer: ``sgd`` for the ``*sgd`` choices, ``adamw8bit`` for the ``*adamw8bit``
        ones (bitsandbytes' block-wise 8-bit moments, galore-torch's ``GaLoreAdamW8bit``), else
        ``adamw`` (``adam`` = AdamW)."""
        return _c4_optim(self.optimizer)

    def registry_args(self, total_steps: int) -> Any:
        """The method registry's arguments for this run (C4's flag names mapped onto the registry's;
        errors about them name C4's flags)."""
        from loralab.runners.methods import get_method, method_args

        defaults = get_method(self.method_name()).defaults
        options = {v: getattr(self, k) for k, v in REGISTRY_NAMES.items() if v in defaults}
        inner = (
            dict(adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2, adam_epsilon=self.adam_eps)
            if _optim_family(self.optim()) == "adamw"
            else dict(momentum=self.momentum)
        )
        margs = method_args(
            self.method_name(),
            learning_rate=self.lr,
            weight_decay=self.weight_decay,
            optim=self.optim(),
            max_steps=total_steps,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            progress=False,
            **inner,
            **options,
        )
        margs.flag_names = {v: k for k, v in REGISTRY_NAMES.items()}
        if get_method(self.method_name()).quantizes_frozen_weights:
            # read by the method (golore-relora) as args.quantize / args.use_double_quant
            margs.quantize, margs.use_double_quant = self.quantize, bool(self.use_double_quant)
        return margs

    def _check_quantize(self) -> None:
        """``--quantize`` / ``--use_double_quant`` apply to a method that quantizes its frozen weights
        itself (``--use_peft --golore``); any other run trains full weights, which bitsandbytes
        weights cannot (as ``--load_in_4bit`` with ``--method full | galore | golore``)."""
        from loralab.runners.methods import MethodError, get_method

        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(
                f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}"
            )
        if self.use_double_quant is not None and self.quantize != "4bit":
            given = f"--quantize {self.quantize}" if self.quantize else "no --quantize"
            raise ValueError(
                "--use_double_quant quantizes the NF4 block scales: it only applies with --quantize 4bit "
                f"(and --use_peft --golore), got {given}; add --quantize 4bit or drop --use_double_quant"
            )
        if self.quantize is None:
            return
        if not get_method(self.method_name()).quantizes_frozen_weights:
            raise MethodError(
                f"--optimizer {self.optimizer} trains full weights, which a --quantize {self.quantize} model "
                "does not have (bitsandbytes weights get no gradient): use --use_peft --golore (GoLore's "
                "ReLoRA path: float A/B over a quantized frozen W) or drop --quantize"
            )
        if self.deepspeed_config is not None:
            raise ValueError(
                "--quantize with --deepspeed_config is not supported by the runners (not checked): run "
                "--use_peft --golore --quantize on one process or under torchrun"
            )
        if self.quantize == "4bit" and self.use_double_quant is None:
            self.use_double_quant = False

    def _check_fsdp(self) -> None:
        """``--fsdp full_shard | shard_grad_op``: FSDP2 for the methods whose optimizers run on its row shards (full
        AdamW / SGD, GaLore, GoLore); refused before anything loads otherwise."""
        if self.fsdp is None:
            return
        check_fsdp_mode(self.fsdp)
        if self.deepspeed_config is not None:
            raise ValueError(
                f"--fsdp {self.fsdp} cannot be combined with --deepspeed_config (both shard the model), "
                f"got --deepspeed_config {self.deepspeed_config}"
            )
        from loralab.runners.methods import MethodError, get_method

        method = get_method(self.method_name())
        if "fsdp2" not in method.sharded_engines:
            what = "--use_peft --golore" if self.use_peft else f"--optimizer {self.optimizer}"
            raise MethodError(
                f"{what} ({method.name}) does not run under --fsdp {self.fsdp} yet: drop --fsdp (one "
                "process or DDP via torchrun), or use --optimizer golore_adamw (GoLore's optimizer "
                "form, which runs under FSDP2)"
            )

    def _applies(self, flag: str, method: str, optim: str) -> bool:
        from loralab.runners.methods import get_method

        if flag in REGISTRY_NAMES:
            return REGISTRY_NAMES[flag] in get_method(method).defaults
        return OPTIM_FLAGS[flag] == _optim_family(optim)

    def _refuse_foreign_options(self) -> None:
        """Refuse every given option that the chosen optimizer / schedule does not read."""
        method, optim = self.method_name(), self.optim()
        what = ("--use_peft --golore " if self.use_peft else "") + f"--optimizer {self.optimizer}"
        wrong = []
        for flag in (*REGISTRY_NAMES, *OPTIM_FLAGS):
            if getattr(self, flag) is None or self._applies(flag, method, optim):
                continue
            owners = [o for o in OPTIMIZERS if self._applies(flag, _c4_method(o), _c4_optim(o))]
            relora = [o for o in ("adamw", "sgd") if self._applies(flag, "golore-relora", o)]
            where = f"--optimizer {' | '.join(owners)}" if owners else ""
            if relora:
                peft = "--use_peft --golore" + (
                    "" if len(relora) == 2 else f" --optimizer {relora[0]}"
                )
                where = f"{where} and {peft}" if where else peft
            wrong.append(f"--{flag} belongs to {where}, not to {what}")
        for flag, schedules in SCHEDULER_FLAGS.items():
            if getattr(self, flag) is not None and self.scheduler not in schedules:
                wrong.append(
                    f"--{flag} belongs to --scheduler {' | '.join(schedules)}, not to --scheduler {self.scheduler}"
                )
        if wrong:
            raise ValueError(f"options that this run would ignore: {'; '.join(wrong)}; remove them")

    def _fill_option_defaults(self) -> None:
        method, optim = self.method_name(), self.optim()
        for flag, default in OPTION_DEFAULTS.items():
            if flag in SCHEDULER_FLAGS:
                applies = self.scheduler in SCHEDULER_FLAGS[flag]
            else:
                applies = self._applies(flag, method, optim)
            if applies and getattr(self, flag) is None:
                setattr(self, flag, default)
        if _optim_family(optim) == "adamw" and self.adam_eps is None:
            # galore-torch's AdamW default, which the GaLore/GoLore C4 runs used
            self.adam_eps = 1e-6 if method in ("galore", "golore") else 1e-8

    # derived values -------------------------------------------------------------------------
    def gradient_accumulation_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process; checks the batch sizes divide."""
        total = self.total_batch_size or self.batch_size * world_size * (
            self.gradient_accumulation or 1
        )
        per_step = self.batch_size * world_size
        if total % per_step != 0:
            raise ValueError(
                f"--total_batch_size {total} must be a multiple of --batch_size x world size = {self.batch_size} x {world_size}"
            )
        accum = total // per_step
        if self.gradient_accumulation is not None and self.gradient_accumulation != accum:
            raise ValueError(
                f"--gradient_accumulation {self.gradient_accumulation} disagrees with --total_batch_size {total} / "
                f"(--batch_size {self.batch_size} x world size {world_size}) = {accum}"
            )
        return accum

    def global_batch_size(self, world_size: int) -> int:
        return self.batch_size * world_size * self.gradient_accumulation_for(world_size)

    def num_training_steps_from_tokens(self, world_size: int = 1) -> int:
        """Update steps from ``--max_train_tokens`` (``100M``, ``1B`` or an int) when given."""
        if self.max_train_tokens is None:
            return self.num_training_steps
        text = str(self.max_train_tokens).strip().upper()
        mult = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMB" else text
        try:
            tokens = int(float(digits) * mult)
        except ValueError:
            raise ValueError(
                f"--max_train_tokens must look like 100M, 1B or an int, got {self.max_train_tokens!r}"
            ) from None
        return max(1, tokens // (self.global_batch_size(world_size) * self.max_length))

    def is_subspace(self) -> bool:
        return self.optimizer.startswith(("galore", "golore"))


def _c4_method(optimizer: str) -> str:
    family = optimizer.split("_")[0]
    return family if family in ("galore", "golore") else "full"


def _c4_optim(optimizer: str) -> str:
    if optimizer.endswith("sgd"):
        return "sgd"
    return "adamw8bit" if optimizer.endswith("adamw8bit") else "adamw"


def _optim_family(optim: str) -> str:
    return "adamw" if optim in ("adamw", "adamw8bit") else optim


def _arg_type(tp: Any) -> tuple[Any, bool]:
    """(argparse type, is_bool) of a dataclass annotation like ``int | None``."""
    if get_origin(tp) is not None and type(None) in get_args(tp):
        tp = next(a for a in get_args(tp) if a is not type(None))
    return tp, tp is bool


def _str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of :class:`C4Args` (bools accept ``--flag`` and ``--flag true|false``)."""
    parser = argparse.ArgumentParser(
        prog="c4_pretrain",
        description="Pre-train LLaMA on C4 with AdamW, GaLore, GoLore or the ReLoRA-structure path.",
    )
    hints = get_type_hints(C4Args)
    for f in dataclasses.fields(C4Args):
        tp, is_bool = _arg_type(hints[f.name])
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": f.default}
        if is_bool:
            kw.update(nargs="?", const=True, type=_str2bool)
        else:
            kw["type"] = tp
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        names = [f"--{f.name}"]
        if f.name == "local_rank":
            names.append("--local-rank")
        parser.add_argument(*names, **kw)
    return parser


def parse_args(argv: list[str] | None = None) -> C4Args:
    """Parse command-line flags into a validated :class:`C4Args`."""
    from loralab.runners.preflight import bad_input_named

    ns = build_parser().parse_args(argv)
    with bad_input_named():
        return C4Args(**vars(ns))
