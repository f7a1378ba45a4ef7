"""The method interface: options, arguments, and what a method hands the training loop.

A *method* turns a loaded model (plus, for gradient-initialized methods, a few training batches) into
``MethodSetup(model, optimizer, scheduler, callbacks)``. Every entrypoint calls the registry
(:func:`loralab.runners.methods.get_method`, :func:`loralab.runners.methods.setup_method`) and nothing
else, so adding a method is one module.

Each method module declares its options (:class:`Option`: name, type, and the config-dataclass field
whose ``metadata["help"]`` documents it) and their defaults; :meth:`Method.resolve_options` fills and
checks them. This module knows no method but the one at hand: the union of every method's options
(:data:`~loralab.runners.methods.registry.OPTIONS`) and the refusal of an option given to a method it
does not apply to (``--rand_ratio does not apply to --method lora``) need every method, so they live in
the registry (:func:`~loralab.runners.methods.registry.resolve_method_options`), which imports this
module and never the other way round.

Example:
    >>> from loralab.runners.methods import get_method, method_args
    >>> from loralab.core.testing import tiny_llama
    >>> args = method_args("lora", lora_r=4, learning_rate=1e-3, max_steps=10)
    >>> setup = get_method("lora").setup(tiny_llama(), args)
    >>> type(setup.optimizer).__name__
    'AdamW'
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import importlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn
from torch.optim import Optimizer

from loralab.runners.launch import check_elastic_checkpoint, zero_offload
from loralab.runners.loop.trainer import Callback

__all__ = [
    "COMMON_DEFAULTS",
    "LORA_OPTIONS",
    "SHARDING_ENGINES",
    "TARGET_MODULES",
    "Callback",
    "FinalDirectory",
    "Method",
    "MethodError",
    "MethodSetup",
    "Option",
    "base_optimizer",
]

logger = logging.getLogger(__name__)

SHARDING_ENGINES = ("deepspeed_zero", "fsdp2")
"""Engines that shard parameters, named in :attr:`Method.sharded_engines`."""


class MethodError(ValueError):
    """A method option or argument is wrong; the message names the argument and what to do."""


class SavesPretrained(Protocol):
    """A model that writes itself with ``save_pretrained``: a ``PeftModel`` or a transformers model."""

    def save_pretrained(self, save_directory: str | os.PathLike[str], /, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Option:
    """One method option (a ``--name`` flag), declared by the method module that uses it.

    ``type`` converts the command-line string; ``choices`` are checked by ``argparse``. ``source``
    (``"module:Class.field"``) names the method package's config-dataclass field the option sets: its
    ``metadata["help"]`` is the flag's help (read when the parser is built; the package is optional),
    and a test keeps ``choices`` equal to the field's ``Literal`` values. ``help`` is used for options
    without a config field (optimizer arguments) and appended after a source's help otherwise.
    """

    name: str
    type: Callable[[str], Any]
    help: str = ""
    choices: tuple[Any, ...] | None = None
    source: str | None = None

    # builtins.type: the field ``type`` above shadows the builtin in this class body
    def source_field(self) -> tuple[builtins.type, dataclasses.Field[Any]]:
        """The config dataclass and its field named by ``source`` (imports the package).

        Raises:
            ImportError: the package is not installed.
            ValueError: ``source`` does not name a dataclass field.
        """
        if self.source is None:
            raise ValueError(f"--{self.name} has no config-dataclass source")
        module, _, qual = self.source.partition(":")
        cls_name, _, field_name = qual.partition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if field_name not in fields:
            raise ValueError(f"--{self.name}: {cls_name} has no field {field_name!r}")
        return cls, fields[field_name]

    def describe(self) -> str:
        """The flag's help text (the source field's ``metadata["help"]`` when it can be imported)."""
        if self.source is None:
            return self.help
        try:
            cls, f = self.source_field()
        except ImportError:
            return f"{self.help} (sets {self.source}; install its package for the full description)"
        text = " ".join(str(f.metadata.get("help", "")).split())
        return f"{text} ({cls.__name__}.{f.name}){' ' + self.help if self.help else ''}".strip()


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


TARGET_MODULES = Option(
    "target_modules",
    str,
    "'all-linear' or comma-separated module-name suffixes (q_proj,v_proj); GaLore/GoLore: the layers projected",
)
LORA_OPTIONS: tuple[Option, ...] = (
    Option("lora_r", int, source="peft:LoraConfig.r"),
    Option("lora_alpha", float, source="peft:LoraConfig.lora_alpha"),
    Option("lora_dropout", float, source="peft:LoraConfig.lora_dropout"),
    Option("use_rslora", _bool, source="peft:LoraConfig.use_rslora"),
    TARGET_MODULES,
)
"""The options of the LoRA family (lora, lora-ga, lora-fa, lora-sb, lora-pro): ``peft.LoraConfig`` fields."""


COMMON_DEFAULTS: dict[str, Any] = dict(
    learning_rate=1e-4,
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    lr_scheduler_type="linear",
    warmup_steps=0,
    warmup_ratio=0.0,
    max_steps=100,
    seed=42,
    task_type="CAUSAL_LM",
    modules_to_save=None,
    progress=True,
    optim="adamw",
    momentum=0.9,
)
"""Training hyper-parameters every method reads from ``args`` (entrypoints define them as flags).

``max_steps`` is the number of optimizer steps (schedulers and GoLore's switch point use it);
``task_type`` is PEFT's (``CAUSAL_LM``, ``SEQ_CLS``, ``SEQ_2_SEQ_LM``): it decides which heads stay
trainable under LoRA (``SEQ_CLS`` keeps ``classifier``/``score`` trainable); ``modules_to_save`` (a list of
module names, e.g. T5's ``classification_head``) adds more trainable heads to the LoRA-family methods.
``optim`` is the optimizer a method runs its (projected) updates with: ``"adamw"`` (``adam_*`` apply)
or ``"sgd"`` (``momentum`` applies), one of the method's :attr:`Method.optimizers`.
"""


@dataclass
class MethodSetup:
    """What a method hands the training loop."""

    model: nn.Module
    optimizer: Optimizer
    scheduler: Any = None
    callbacks: list[Callback] = field(default_factory=list)


@dataclass(frozen=True)
class FinalDirectory:
    """Where :meth:`Method.save_final` writes the trained model, and what it writes from.

    Example:
        >>> FinalDirectory(Path("runs/a/.final.tmp"), final_path=Path("runs/a/final")).where
        PosixPath('runs/a/final')
    """

    path: Path
    """The directory to write (the loop writes a temporary one, renamed when complete)."""
    state_dict: dict[str, torch.Tensor] | None = None
    """The whole state dict when the engine shards the weights (ZeRO-3, FSDP2), else ``None``."""
    final_path: Path | None = None
    """Where :attr:`path` is renamed to once complete (``None``: :attr:`path` itself)."""

    @property
    def where(self) -> Path:
        """The directory's final location (for configs that name a path inside it)."""
        return self.final_path if self.final_path is not None else self.path


class Method(ABC):
    """One fine-tuning method. Subclasses live one per module in ``loralab.runners.methods``.

    Class attributes:
        name: the ``--method`` value.
        module: the package it lazily imports (``None`` for methods built on PEFT/torch only).
        pip_name: what to ``pip install`` when ``module`` is missing.
        options: the method's option flags (:class:`Option`), with help from its config dataclass.
        defaults: the default of each of ``options`` (same names).
        requires: names the package must export (its native API in the cross-package contract).
        needs_batches: whether :meth:`setup` needs training batches (gradient-based inits).
        sharded_engines: the sharding engines the method runs under (:data:`SHARDING_ENGINES`):
            ``"deepspeed_zero"`` (``--deepspeed`` with ZeRO stage >= 1, which flattens and shards the
            parameters: optimizers that need each weight's matrix or LoRA A/B pairing cannot) and
            ``"fsdp2"`` (``--fsdp full_shard``: ``DTensor`` row shards, tested per method). One process
            and DDP always work. :attr:`zero_partitioning` reads the first.
        ddp_wrappable: whether DDP may average the gradients. DDP registers its hooks once, on the
            parameters that require a gradient at wrap time; a method whose trainable set changes
            during training (``golore-relora``) needs the loop to all-reduce gradients itself.
        optimizers: the ``optim`` values (``adamw``, ``sgd``) the method can run with.
        extra: the ``loralab-runners[extra]`` that installs :attr:`module` (default: :attr:`name`).
        has_adapter: the method trains adapters over a frozen base (``--merge_and_save`` applies).
        quantized_base: :meth:`setup` takes a model that bitsandbytes quantized while loading
            (``--load_in_4bit`` / ``--load_in_8bit``) and trains adapters over it; methods that need
            the float base weights (they train them, or fold updates into them) cannot.
        quantizes_frozen_weights: the method stores the frozen weights of the float model it is
            given with bitsandbytes itself (C4's ``--quantize 4bit|8bit`` / ``--use_double_quant``,
            read as ``args.quantize`` / ``args.use_double_quant``): ``golore-relora``, whose merges
            dequantize, fold and re-quantize ``W``.
    """

    name: ClassVar[str]
    module: ClassVar[str | None] = None
    pip_name: ClassVar[str | None] = None
    options: ClassVar[tuple[Option, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}
    requires: ClassVar[tuple[str, ...]] = ()
    needs_batches: ClassVar[bool] = False
    sharded_engines: ClassVar[frozenset[str]] = frozenset({"deepspeed_zero"})
    builds_from_weights: ClassVar[bool] = False
    """Whether :meth:`wrap` reads the pretrained weights' values (LoRA-XS: their SVD), so it cannot
    run on a model built on the meta device (FSDP2's rank-0 loading)."""
    ddp_wrappable: ClassVar[bool] = True
    optimizers: ClassVar[tuple[str, ...]] = ("adamw",)
    extra: ClassVar[str | None] = None
    has_adapter: ClassVar[bool] = True
    quantized_base: ClassVar[bool] = True
    quantizes_frozen_weights: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @property
    def zero_partitioning(self) -> bool:
        """Whether the method runs under DeepSpeed ZeRO stage >= 1 (``"deepspeed_zero"`` in
        :attr:`sharded_engines`)."""
        return "deepspeed_zero" in self.sharded_engines

    def check_engine(self, engine: str, flag: str) -> None:
        """Raise :class:`MethodError` naming ``flag`` when the method cannot run under ``engine`` (one
        of :data:`SHARDING_ENGINES`)."""
        if engine not in SHARDING_ENGINES:
            raise ValueError(f"engine must be one of {SHARDING_ENGINES}, got {engine!r}")
        if engine not in self.sharded_engines:
            runs = sorted(self.sharded_engines) or ["none"]
            raise MethodError(
                f"--method {self.name} does not run under {flag} yet (its sharded engines: "
                f"{', '.join(runs)}); run it without {flag}: one process or DDP (torchrun / "
                "accelerate launch)"
            )

    def check_zero(
        self, args: Any, stage: int, flag: str, config: MutableMapping[str, Any] | None = None
    ) -> None:
        """Raise :class:`MethodError` naming ``flag`` when the method (with the options in ``args``)
        cannot run under DeepSpeed ZeRO ``stage`` (0: DeepSpeed without partitioning always runs).
        ``config``: the DeepSpeed config when known (accelerate's plugin: its ``bf16`` section); under
        offload it may be amended to keep the method's optimizer (:meth:`check_offload`)."""
        if stage >= 1 and not self.zero_partitioning:
            raise MethodError(
                f"--method {self.name} needs each weight's matrix in its optimizer, but DeepSpeed ZeRO-{stage} "
                f"({flag}) flattens and shards them: run it without {flag} (DDP via torchrun / accelerate launch)"
            )
        if config is not None:
            check_elastic_checkpoint(config, flag)
        self.check_offload(args, flag, config)

    def check_offload(
        self,
        args: Any,
        flag: str,
        config: MutableMapping[str, Any] | None,
        what: str | None = None,
        *,
        cpu_adam_for_adamw: bool = True,
    ) -> None:
        """Keep the method's optimizer under DeepSpeed ZeRO offload, or refuse what cannot run.

        Under ``offload_optimizer`` accelerate's DeepSpeed ``prepare`` replaces a client optimizer by
        ``DeepSpeedCPUAdam(optimizer.param_groups, lr, weight_decay)`` (``map_pytorch_optim_to_deepspeed``)
        and ``deepspeed.initialize`` refuses any other client optimizer, unless the config says
        ``zero_force_ds_cpu_optimizer: false``. DeepSpeed's CPU Adam is torch AdamW's update, so
        ``--optim adamw`` keeps it where the engine swaps (``cpu_adam_for_adamw``: accelerate does, the
        C4 runner's ``deepspeed.initialize`` does not); a method's own optimizer (GaLore's projection,
        LoRA-FA's, LoRA-Pro's gradient fix) or SGD would silently become plain Adam. For those this
        sets ``zero_force_ds_cpu_optimizer`` to false in ``config`` (in place: call it on the config
        the engine will use), and they step DeepSpeed's CPU partitions (:mod:`loralab.core.zero_views`
        routes their collectives through the process group's device). Refused, naming the key: an
        explicit ``zero_force_ds_cpu_optimizer: true`` for them, and offload to NVMe (DeepSpeed's
        swapper moves optimizer state it knows the shape of; the low-rank and owner-rank states are
        not that).
        """
        if config is None:
            return
        device = zero_offload(config)  # {offloaded section: device}
        if not device:
            return
        own_optimizer = type(self).build_optimizer is not Method.build_optimizer
        optim = getattr(args, "optim", "adamw") if args is not None else "adamw"
        name = what or (f"--method {self.name}" if own_optimizer else f"--optim {optim}")
        keeps_client = own_optimizer or optim != "adamw" or not cpu_adam_for_adamw
        # NVMe: the parameters of a method's own optimizer (it reads their partitions) and the
        # optimizer state of any optimizer DeepSpeed did not write
        nvme = [
            key
            for key, dev in device.items()
            if dev == "nvme" and (own_optimizer if key == "offload_param" else keeps_client)
        ]
        if nvme:
            raise MethodError(
                f"{name} does not run with DeepSpeed ZeRO offload to NVMe ({flag}: zero_optimization."
                f"{' and zero_optimization.'.join(nvme)} on nvme): DeepSpeed swaps state it knows the "
                "layout of, not this optimizer's; offload to the CPU (device: cpu, e.g. --deepspeed "
                "zero3_offload)"
            )
        if "offload_optimizer" not in device or not keeps_client:
            return
        if config.get("zero_force_ds_cpu_optimizer") is True:
            raise MethodError(
                f"{name} does not run with zero_force_ds_cpu_optimizer: true ({flag}): under "
                "zero_optimization.offload_optimizer it replaces the optimizer by DeepSpeed's CPU Adam "
                "(plain Adam); remove the key (the runner then keeps the optimizer) or set it to false"
            )
        config["zero_force_ds_cpu_optimizer"] = False

    def import_package(self) -> ModuleType | None:
        """Import the method's package, or raise ``ImportError`` saying what to install."""
        if self.module is None:
            return None
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ImportError(
                f"--method {self.name} needs {self.module}: pip install {self.pip_name} "
                f'(or pip install "loralab-runners[{self.extra or self.name}]")'
            ) from exc
        missing = [n for n in self.requires if not hasattr(module, n)]
        if missing:
            raise ImportError(
                f"--method {self.name}: the installed {self.module} lacks {', '.join(missing)}; "
                f"pip install -U {self.pip_name}"
            )
        return module

    def package(self) -> ModuleType:
        """:meth:`import_package` for a method that has a package (``module`` set)."""
        pkg = self.import_package()
        if pkg is None:
            raise TypeError(f"--method {self.name} has no package of its own")
        return pkg

    def check_available(self) -> None:
        """Raise the ``pip install`` error early (before any model is loaded) if the package is missing."""
        self.import_package()

    def resolve_options(self, args: Any) -> Any:
        """Check and fill this method's options and the common hyper-parameters in ``args`` (in place;
        returns ``args``).

        Unset options (``None`` or missing) get :attr:`defaults`; choices and ranges are checked;
        ``target_modules`` given as a comma-separated string becomes a list (``"all-linear"`` stays a
        string); missing :data:`COMMON_DEFAULTS` are filled, then ``optim`` and ``max_steps`` checked.
        Options of other methods are not looked at: refusing them needs every method, which is the
        registry's :func:`~loralab.runners.methods.registry.resolve_method_options`.
        """
        # a method may declare defaults without options (golore-relora, not a --method choice, takes
        # galore's and golore's flags): those have no choices to check here
        declared = {o.name: o for o in self.options}
        for name, default in self.defaults.items():
            value = getattr(args, name, None)
            if value is None:
                value = default
            opt = declared.get(name)
            if opt is not None and opt.choices is not None and value not in opt.choices:
                raise MethodError(
                    f"--{name} must be one of {', '.join(map(str, opt.choices))}, got {value!r}"
                )
            if name == "target_modules" and isinstance(value, str) and value != "all-linear":
                value = [v.strip() for v in value.split(",") if v.strip()]
            setattr(args, name, value)
        for name in ("lora_r", "galore_rank", "ga_iters", "sb_num_batches", "update_proj_gap"):
            if (
                name in self.defaults
                and getattr(args, name) is not None
                and getattr(args, name) < 1
            ):
                raise MethodError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if "rand_ratio" in self.defaults and not 0.0 <= args.rand_ratio <= 1.0:
            raise MethodError(f"--rand_ratio must be in [0, 1], got {args.rand_ratio}")
        if "lora_dropout" in self.defaults and not 0.0 <= args.lora_dropout < 1.0:
            raise MethodError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
        for name, default in COMMON_DEFAULTS.items():
            if not hasattr(args, name):
                setattr(args, name, default)
        if args.optim not in self.optimizers:
            raise MethodError(
                f"--optim {args.optim} does not apply to --method {self.name} (it runs with: {', '.join(self.optimizers)})"
            )
        if args.max_steps < 1:
            raise MethodError(
                f"max_steps must be >= 1 (the number of optimizer steps), got {args.max_steps}"
            )
        return args

    def setup(
        self,
        model: nn.Module,
        args: Any,
        train_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
        *,
        resume: bool = False,
        scheduler: Callable[[Optimizer], Any] | None = None,
        shard: Callable[[nn.Module], nn.Module] | None = None,
    ) -> MethodSetup:
        """Wrap ``model`` and build its optimizer and scheduler from ``args``.

        Checks this method's options (:meth:`resolve_options`) but not whether ``args`` sets an option
        of another method: entrypoints call :func:`loralab.runners.methods.setup_method`, which does.

        Args:
            model: a loaded ``transformers`` model (float weights; quantized where the method allows).
            args: any object with the :data:`COMMON_DEFAULTS` attributes and this method's options
                (an entrypoint's parsed arguments, or :func:`loralab.runners.methods.method_args`).
            train_batches: batches ``model(**batch)`` accepts, with ``labels``; required when
                :attr:`needs_batches` (LoRA-GA / LoRA-SB estimate gradients on them).
            resume: the caller will load a checkpoint over every weight next, so gradient-based inits
                build the same structure without estimating (the checkpoint holds the initialized
                and offset weights).
            scheduler: builds the learning-rate scheduler from the optimizer instead of
                ``transformers.get_scheduler(args.lr_scheduler_type, ...)`` (C4's cosine with a floor).
            shard: applied to the wrapped model before the optimizer is built (an engine that replaces
                the parameters by shards: :meth:`loralab.runners.loop.engine.Engine.shard`), through
                :meth:`wrap_sharded` (gradient-based inits shard before they estimate).
        """
        self.resolve_options(args)
        self.check_model(model, args)
        if self.needs_batches and not resume and train_batches is None:
            raise MethodError(
                f"--method {self.name} initializes from gradients: train_batches are required"
            )
        if shard is None:
            model = self.wrap(model, args, train_batches, resume=resume)
        else:
            model = self.wrap_sharded(model, args, train_batches, resume=resume, shard=shard)
        optimizer = self.build_optimizer(model, args)
        return MethodSetup(
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, args)
            if scheduler is None
            else scheduler(optimizer),
            callbacks=self.callbacks(model, args),
        )

    def check_model(self, model: nn.Module, args: Any) -> None:
        """Refuse options the model's shapes cannot honour (a rank above a layer's width).

        Reads shapes only, so a model built on the ``meta`` device works: entrypoints call it before
        loading the real weights. Default: nothing to check.
        """
        return None

    @abstractmethod
    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        """Return the model to train (adapters attached, trainable parameters set)."""

    def wrap_sharded(
        self,
        model: nn.Module,
        args: Any,
        train_batches: Any,
        *,
        resume: bool,
        shard: Callable[[nn.Module], nn.Module],
    ) -> nn.Module:
        """:meth:`wrap`, then ``shard`` (the engine's :meth:`~loralab.runners.loop.engine.Engine.shard`).

        A method whose data-driven init must run on the sharded model (LoRA-GA, LoRA-SB: the gradient
        estimate, so that no rank needs every layer's whole gradient) overrides this to shard between
        building the adapters and initialising them.
        """
        return shard(self.wrap(model, args, train_batches, resume=resume))

    def build_optimizer(self, model: nn.Module, args: Any) -> Optimizer:
        """Default: :func:`base_optimizer` (``args.optim``) over the trainable parameters."""
        return base_optimizer(model, args)

    def callbacks(self, model: nn.Module, args: Any) -> list[Callback]:
        return []

    def save_final(self, model: nn.Module, out: FinalDirectory) -> None:
        """Write the trained model to ``out.path`` so that it reloads the bare way and reproduces it.

        Default: ``model.save_pretrained`` (a PEFT adapter loads with
        ``PeftModel.from_pretrained(original_base, directory)``, a full model with
        ``AutoModel*.from_pretrained(directory)``). Methods whose trained weights do not fit the original
        base (LoRA-GA's offset ``W0``, LoRA-SB's ``B·R·A``) override it with their package's exporter.
        Called on the main process only.
        """
        # wrap() returns a PeftModel or a transformers model
        cast(SavesPretrained, model).save_pretrained(
            out.path, state_dict=out.state_dict, safe_serialization=True
        )

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors the method keeps outside the model's state dict, saved with every checkpoint (default:
        none). ``model`` is unwrapped."""
        return {}

    def load_checkpoint_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`checkpoint_state` on resume (default: nothing to restore).

        Raises:
            MethodError: ``state`` has entries though the method keeps none.
        """
        if state:
            raise MethodError(
                f"--method {self.name} keeps no state outside the model, but the checkpoint has "
                f"{', '.join(sorted(state)[:3])}: was it written by another method?"
            )


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MethodError(
            f"{type(model).__name__} has no trainable parameter after the method setup"
        )
    return params


def base_optimizer(model: nn.Module, args: Any) -> Optimizer:
    """``torch.optim.AdamW`` (``args.optim == "adamw"``) or momentum ``SGD`` (``"sgd"``, ``args.momentum``)
    over the trainable parameters, weight decay on >= 2-D weights only (as HF Trainer)."""
    if getattr(args, "optim", "adamw") == "sgd":
        return torch.optim.SGD(
            _decay_groups(model, args), lr=args.learning_rate, momentum=args.momentum
        )
    return adamw(model, args)


def _decay_groups(model: nn.Module, args: Any) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in trainable_parameters(model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        g
        for g in (
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]


def adamw(model: nn.Module, args: Any) -> Optimizer:
    """AdamW with weight decay on >= 2-D weights only (biases and norms undecayed, as HF Trainer)."""
    return torch.optim.AdamW(
        _decay_groups(model, args),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def warmup_steps(args: Any) -> int:
    if getattr(args, "warmup_steps", 0):
        return int(args.warmup_steps)
    return round(getattr(args, "warmup_ratio", 0.0) * args.max_steps)


def build_scheduler(optimizer: Optimizer, args: Any) -> Any:
    """``transformers.get_scheduler(lr_scheduler_type, ...)`` over ``max_steps`` optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args),
        num_training_steps=args.max_steps,
    )


def option_flag(args: Any, name: str) -> str:
    """How the entrypoint spells option ``name`` in error messages: ``--name``, or the entrypoint's
    own flag from ``args.flag_names`` (C4 follows the GaLore scripts: ``--rank`` for ``galore_rank``)."""
    return "--" + getattr(args, "flag_names", {}).get(name, name)


def lora_kwargs(args: Any) -> dict[str, Any]:
    """The ``peft.LoraConfig`` keyword arguments shared by the LoRA-family methods."""
    return dict(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        use_rslora=args.use_rslora,
        target_modules=args.target_modules,
        task_type=args.task_type,
        **(
            {"modules_to_save": list(args.modules_to_save)}
            if getattr(args, "modules_to_save", None)
            else {}
        ),
    )


def lora_scaling(args: Any) -> float:
    return args.lora_alpha / (args.lora_r**0.5 if args.use_rslora else args.lora_r)


LORA_DEFAULTS: dict[str, Any] = dict(
    lora_r=8, lora_alpha=16.0, lora_dropout=0.05, use_rslora=False, target_modules="all-linear"
)


def as_list(x: Sequence[Any] | Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]
