"""The method interface: options, arguments, and what a method hands the training loop.

A *method* turns a loaded model (plus, for gradient-initialized methods, a few training batches) into
``MethodSetup(model, optimizer, scheduler, callbacks)``. Every entrypoint calls the registry
(:func:`loralab.runners.methods.get_method`) and nothing else, so adding a method is one module.

Method options are declared once in :data:`OPTIONS` (name, type, help); each method says which of
them apply to it and with which default. :func:`resolve_method_options` rejects an option given to a
method it does not apply to, naming the argument (``--rand_ratio does not apply to --method lora``).

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
import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "COMMON_DEFAULTS",
    "OPTIONS",
    "Callback",
    "Method",
    "MethodError",
    "MethodSetup",
    "Option",
    "resolve_method_options",
]

logger = logging.getLogger(__name__)


class MethodError(ValueError):
    """A method option or argument is wrong; the message names the argument and what to do."""


@dataclass(frozen=True)
class Option:
    """One method option (a ``--name`` flag). ``type`` converts the command-line string."""

    name: str
    type: Callable[[str], Any]
    help: str
    choices: tuple[Any, ...] | None = None


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        # LoRA family (lora, lora-ga, lora-fa, lora-sb, lora-pro)
        Option("lora_r", int, "LoRA rank r"),
        Option(
            "lora_alpha",
            float,
            "LoRA alpha; scaling s = alpha / r (alpha / sqrt(r) with --use_rslora)",
        ),
        Option("lora_dropout", float, "dropout on the LoRA branch input"),
        Option(
            "use_rslora",
            _bool,
            "rank-stabilized scaling s = alpha / sqrt(r) (the LoRA-GA paper's runs used it)",
        ),
        Option(
            "target_modules",
            str,
            "layers to adapt / project: 'all-linear' or comma-separated module-name suffixes (q_proj,v_proj)",
        ),
        # LoRA-GA
        Option(
            "ga_iters",
            int,
            "LoRA-GA: number of batches averaged for the gradient estimate (paper: 64 of 2)",
        ),
        Option(
            "ga_direction",
            str,
            "LoRA-GA: which singular vectors go to A and B",
            ("ArB2r", "ArBr", "A2rBr", "random"),
        ),
        Option(
            "ga_scale",
            str,
            "LoRA-GA: scaling of the initial A, B",
            ("stable", "gd", "unit", "weight_svd"),
        ),
        Option(
            "ga_stable_gamma",
            float,
            "LoRA-GA: gamma of the 'stable' scale (A, B x m^(1/4)/sqrt(gamma))",
        ),
        # LoRA-SB
        Option(
            "sb_num_batches",
            int,
            "LoRA-SB: number of batches summed for the first-step update approximation",
        ),
        Option(
            "sb_update_approximation",
            str,
            "LoRA-SB: first-step update approximated ('sign' = Adam's first step, 'gradient' = SGD's)",
            ("sign", "gradient"),
        ),
        # LoRA-Pro
        Option(
            "pro_mode",
            str,
            "LoRA-Pro: 'efficient' (Adam on adjusted LoRA gradients) or 'full' (full-space Adam)",
            ("efficient", "full"),
        ),
        Option(
            "pro_x_mode",
            str,
            "LoRA-Pro: how the free matrix X is chosen",
            ("sylvester", "zero", "symmetry"),
        ),
        # GaLore / GoLore
        Option("galore_rank", int, "GaLore/GoLore: projection rank"),
        Option("update_proj_gap", int, "GaLore/GoLore: steps between projector updates (T)"),
        Option("galore_scale", float, "GaLore/GoLore: scale alpha applied to the projected update"),
        Option(
            "proj_type",
            str,
            "GaLore/GoLore: projection side",
            ("std", "reverse_std", "left", "right", "full"),
        ),
        Option(
            "rand_ratio",
            float,
            "GoLore: fraction of training that uses SVD projectors before switching to random ones "
            "(GoLore code's convention: random when step/total_steps >= rand_ratio; 0 = random from the start)",
        ),
    ]
}
"""Every method option, declared once. Methods list the ones that apply with their defaults."""

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
)
"""Training hyper-parameters every method reads from ``args`` (entrypoints define them as flags).

``max_steps`` is the number of optimizer steps (schedulers and GoLore's switch point use it);
``task_type`` is PEFT's (``CAUSAL_LM``, ``SEQ_CLS``, ``SEQ_2_SEQ_LM``): it decides which heads stay
trainable under LoRA (``SEQ_CLS`` keeps ``classifier``/``score`` trainable); ``modules_to_save`` (a list of
module names, e.g. T5's ``classification_head``) adds more trainable heads to the LoRA-family methods.
"""


class Callback:
    """Hooks a method may need during training; every hook is optional (no-op by default)."""

    def on_train_begin(self, model: nn.Module, optimizer: Optimizer) -> None:
        """Called once after the model and optimizer are prepared (wrapped) for training."""

    def on_step_end(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        """Called after each optimizer step with the 1-based global step."""

    def on_save(self, output_dir: str, model: nn.Module) -> None:
        """Called on the main process after the final model is saved in ``output_dir``."""


@dataclass
class MethodSetup:
    """What a method hands the training loop."""

    model: nn.Module
    optimizer: Optimizer
    scheduler: Any = None
    callbacks: list[Callback] = field(default_factory=list)


class Method(ABC):
    """One fine-tuning method. Subclasses live one per module in ``loralab.runners.methods``.

    Class attributes:
        name: the ``--method`` value.
        module: the package it lazily imports (``None`` for methods built on PEFT/torch only).
        pip_name: what to ``pip install`` when ``module`` is missing.
        defaults: the method options (names in :data:`OPTIONS`) that apply, with their defaults.
        requires: names the package must export (its native API in the cross-package contract).
        needs_batches: whether :meth:`setup` needs training batches (gradient-based inits).
        zero_partitioning: whether the optimizer works when DeepSpeed ZeRO flattens and shards
            parameters (optimizers that need each weight's matrix shape or LoRA A/B pairing do not).
    """

    name: ClassVar[str]
    module: ClassVar[str | None] = None
    pip_name: ClassVar[str | None] = None
    defaults: ClassVar[Mapping[str, Any]] = {}
    requires: ClassVar[tuple[str, ...]] = ()
    needs_batches: ClassVar[bool] = False
    zero_partitioning: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def import_package(self) -> ModuleType | None:
        """Import the method's package, or raise ``ImportError`` saying what to install."""
        if self.module is None:
            return None
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ImportError(
                f"--method {self.name} needs {self.module}: pip install {self.pip_name} "
                f'(or pip install "loralab-runners[{self.name if self.name != "galore" else "golore"}]")'
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

    def setup(
        self,
        model: nn.Module,
        args: Any,
        train_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
        *,
        resume: bool = False,
    ) -> MethodSetup:
        """Wrap ``model`` and build its optimizer and scheduler from ``args``.

        Args:
            model: a loaded ``transformers`` model (float weights; quantized where the method allows).
            args: any object with the :data:`COMMON_DEFAULTS` attributes and this method's options
                (an entrypoint's parsed arguments, or :func:`loralab.runners.methods.method_args`).
            train_batches: batches ``model(**batch)`` accepts, with ``labels``; required when
                :attr:`needs_batches` (LoRA-GA / LoRA-SB estimate gradients on them).
            resume: the caller will load a checkpoint over every weight next, so gradient-based inits
                build the same structure without estimating (the checkpoint holds the initialized
                and offset weights).
        """
        resolve_method_options(self, args)
        if self.needs_batches and not resume and train_batches is None:
            raise MethodError(
                f"--method {self.name} initializes from gradients: train_batches are required"
            )
        model = self.wrap(model, args, train_batches, resume=resume)
        optimizer = self.build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, args)
        return MethodSetup(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            callbacks=self.callbacks(model, args),
        )

    @abstractmethod
    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        """Return the model to train (adapters attached, trainable parameters set)."""

    def build_optimizer(self, model: nn.Module, args: Any) -> Optimizer:
        """Default: ``torch.optim.AdamW`` over the trainable parameters (decay on matrices only)."""
        return adamw(model, args)

    def callbacks(self, model: nn.Module, args: Any) -> list[Callback]:
        return []


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MethodError(
            f"{type(model).__name__} has no trainable parameter after the method setup"
        )
    return params


def adamw(model: nn.Module, args: Any) -> Optimizer:
    """AdamW with weight decay on >= 2-D weights only (biases and norms undecayed, as HF Trainer)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in trainable_parameters(model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    return torch.optim.AdamW(
        groups,
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


def resolve_method_options(method: Method, args: Any) -> Any:
    """Check and fill ``args``'s method options for ``method`` (in place; returns ``args``).

    An option of another method that was set (not ``None``) raises :class:`MethodError` naming it;
    unset options of this method get the method's default; ``target_modules`` given as a
    comma-separated string becomes a list (``"all-linear"`` stays a string).
    """
    for name in OPTIONS:
        value = getattr(args, name, None)
        if name not in method.defaults:
            if value is not None:
                users = [n for n, m in _registry().items() if name in m.defaults]
                raise MethodError(
                    f"--{name} does not apply to --method {method.name} (it applies to: {', '.join(users) or 'none'}); remove it"
                )
            continue
        if value is None:
            value = method.defaults[name]
        opt = OPTIONS[name]
        if opt.choices is not None and value not in opt.choices:
            raise MethodError(
                f"--{name} must be one of {', '.join(map(str, opt.choices))}, got {value!r}"
            )
        if name == "target_modules" and isinstance(value, str) and value != "all-linear":
            value = [v.strip() for v in value.split(",") if v.strip()]
        setattr(args, name, value)
    for name in ("lora_r", "galore_rank", "ga_iters", "sb_num_batches", "update_proj_gap"):
        if name in method.defaults and getattr(args, name) is not None and getattr(args, name) < 1:
            raise MethodError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if "rand_ratio" in method.defaults and not 0.0 <= args.rand_ratio <= 1.0:
        raise MethodError(f"--rand_ratio must be in [0, 1], got {args.rand_ratio}")
    if "lora_dropout" in method.defaults and not 0.0 <= args.lora_dropout < 1.0:
        raise MethodError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    for name, default in COMMON_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.max_steps < 1:
        raise MethodError(
            f"max_steps must be >= 1 (the number of optimizer steps), got {args.max_steps}"
        )
    return args


def _registry() -> Mapping[str, Method]:
    from loralab.runners.methods import registry

    return registry.methods()


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
