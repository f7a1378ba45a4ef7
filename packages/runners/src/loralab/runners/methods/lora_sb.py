"""``--method lora-sb``: LoRA-SB (Ponkshe et al., 2024, arXiv 2411.19557) from ``loralab-lora-sb``.

``W = W0 + s·B·R·A`` with only the r×r ``R`` trainable; A, B, R come from the truncated SVD of the
first-step update approximated on ``--sb_num_batches`` training batches (``-lr·sign(G)``, Adam's
first step, with ``lr`` the first optimizer step's learning rate). ``lora_alpha`` defaults to ``r``
(s = 1) as in the reference scripts. Then AdamW on R (and any classifier head).

``final/`` is the plain PEFT LoRA export (``B' = B·R``, ``A' = A``: ``loralab.lora_sb.save_lora_sb_as_lora``),
which loads with ``PeftModel.from_pretrained(original_base, final)`` and no loralab; the native LoRA-SB
adapter (A, B, R: resumable training, ``loralab.lora_sb.load_lora_sb_model``) is in
``final/lora_sb_native/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

from torch import nn

from loralab.runners.methods.base import (
    LORA_DEFAULTS,
    LORA_OPTIONS,
    FinalDirectory,
    Method,
    Option,
    SavesPretrained,
    lora_kwargs,
    warmup_steps,
)
from loralab.runners.quantization import estimation_kwargs

__all__ = ["METHOD", "NATIVE_DIR", "LoraSB", "first_step_lr"]

NATIVE_DIR = "lora_sb_native"
"""Sub-directory of ``final/`` holding the native LoRA-SB adapter."""


def first_step_lr(args: Any) -> float:
    """Learning rate of the first optimizer step: with a warm-up of w steps HF's schedulers give
    ``lr/w`` at step 1 (the paper's "first warm-up lr"), otherwise ``lr``."""
    w = warmup_steps(args)
    return args.learning_rate / w if w > 0 else args.learning_rate


class LoraSB(Method):
    name = "lora-sb"
    module = "loralab.lora_sb"
    pip_name = "loralab-lora-sb"
    requires = ("LoraSBConfig", "get_lora_sb_model", "save_lora_sb_as_lora")
    description = "LoRA-SB: only an r x r matrix trains; A, B, R from the first-step update's SVD"
    needs_batches = True
    sharded_engines = frozenset({"deepspeed_zero", "fsdp2"})
    options = (
        *LORA_OPTIONS,
        Option(
            "sb_num_batches",
            int,
            "LoRA-SB: number of training batches summed for the first-step update approximation",
        ),
        Option(
            "sb_update_approximation",
            str,
            choices=("sign", "gradient"),
            source="loralab.lora_sb:LoraSBConfig.update_approximation",
        ),
    )
    defaults: ClassVar[dict[str, Any]] = {
        **LORA_DEFAULTS,
        "lora_alpha": None,
        "lora_dropout": 0.0,
        "sb_num_batches": 8,
        "sb_update_approximation": "sign",
    }

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        return self._build(model, args, train_batches, resume=resume)

    def wrap_sharded(
        self,
        model: nn.Module,
        args: Any,
        train_batches: Any,
        *,
        resume: bool,
        shard: Callable[[nn.Module], nn.Module],
    ) -> nn.Module:
        """FSDP2: the adapters are built, the model sharded, then the gradient estimated on the
        sharded model (each rank writes its rows of B, R, A)."""
        return self._build(model, args, train_batches, resume=resume, shard=shard)

    def _build(
        self,
        model: nn.Module,
        args: Any,
        train_batches: Any,
        *,
        resume: bool,
        shard: Callable[[nn.Module], nn.Module] | None = None,
    ) -> nn.Module:
        pkg = self.package()
        kw = lora_kwargs(args)
        if kw["lora_alpha"] is None:
            kw.pop("lora_alpha")
        config = pkg.LoraSBConfig(
            **kw,
            update_approximation=args.sb_update_approximation,
            # on resume the checkpoint restores A, B and R: build the structure without estimating
            sb_init="random" if resume else "gradient",
        )
        # Quantized base: estimate on a float copy of the same checkpoint, block by block.
        return pkg.get_lora_sb_model(
            model,
            config,
            train_batches if not resume else [],
            lr=first_step_lr(args),
            num_batches=args.sb_num_batches,
            progress=args.progress,
            shard=shard,
            **(estimation_kwargs(model, args) if not resume else {}),
        )

    def save_final(self, model: nn.Module, out: FinalDirectory) -> None:
        """``out.path``: plain LoRA (R folded into B) for bare PEFT; ``out.path/lora_sb_native``: the
        native adapter."""
        self.package().save_lora_sb_as_lora(model, out.path, state_dict=out.state_dict)
        cast(SavesPretrained, model).save_pretrained(  # wrap() returned a PeftModel
            out.path / NATIVE_DIR, state_dict=out.state_dict, safe_serialization=True
        )


METHOD = LoraSB()
