"""``--method lora-xs``: LoRA-XS (Bałazy et al., 2024, arXiv 2405.17604) from ``loralab-lora-sb``.

``W = W0 + s·B·R·A`` with ``B`` (m×r) and ``A`` (r×n) frozen and only the r×r ``R`` trainable,
``R = 0`` at the start: LoRA-SB's architecture and parameter count, without its gradient-based init.
``xs_init`` picks the frozen factors: ``weight_svd`` (LoRA-XS's own: ``B = U_r·Σ_r``, ``A = V_rᵀ``
from the truncated SVD of the pretrained weight, exact by default: ``xs_svd_method``) or ``random``
(random orthonormal columns / rows).
Built on ``loralab.lora_sb.LoraSBConfig(sb_init=...)``, whose inits are tested against a dense
float64 SVD; it is the baseline for LoRA-SB's claim of beating LoRA-XS at the same parameter count.

``final/`` is the plain PEFT LoRA export (``B' = B·R``, ``A' = A``), which loads with
``PeftModel.from_pretrained(original_base, final)``; the native adapter is in ``final/lora_sb_native/``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from loralab.runners.methods.base import (
    LORA_DEFAULTS,
    LORA_OPTIONS,
    Method,
    Option,
    lora_kwargs,
)
from loralab.runners.methods.lora_sb import LoraSB

__all__ = ["METHOD", "XS_INITS", "LoraXS"]

XS_INITS = ("weight_svd", "random")
"""``--xs_init`` choices: ``LoraSBConfig.sb_init``'s LoRA-XS values (its ``gradient`` is LoRA-SB)."""


class LoraXS(Method):
    name = "lora-xs"
    module = "loralab.lora_sb"
    pip_name = "loralab-lora-sb"
    extra = "lora-sb"
    requires = ("LoraSBConfig", "save_lora_sb_as_lora")
    description = (
        "LoRA-XS: only an r x r matrix trains, between frozen factors from the weight's SVD"
    )
    # FSDP2: the frozen factors come from the whole weights before sharding (the default
    # wrap_sharded: wrap, then shard); only the r x r R trains (torch AdamW on its row shards)
    sharded_engines: ClassVar[frozenset[str]] = frozenset({"deepspeed_zero", "fsdp2"})
    builds_from_weights = True  # the frozen factors: the weights' SVD (or a seeded draw) in wrap()
    options = (
        *LORA_OPTIONS,
        Option(
            "xs_init",
            str,
            "LoRA-XS: the frozen factors; 'weight_svd' = B = U_r S_r, A = V_r^T of the pretrained "
            "weight (the paper's), 'random' = random orthonormal (loralab.lora_sb "
            "LoraSBConfig.sb_init)",
            choices=XS_INITS,
        ),
        Option(
            "xs_svd_method",
            str,
            "LoRA-XS default: 'full' (exact; 'randomized' or 'auto' for large layers)",
            choices=("auto", "full", "randomized"),
            source="loralab.lora_sb:LoraSBConfig.svd_method",
        ),
    )
    defaults: ClassVar[dict[str, Any]] = {
        **LORA_DEFAULTS,
        "lora_alpha": None,
        "lora_dropout": 0.0,
        "xs_init": "weight_svd",
        # exact: a randomized sketch of a flat spectrum (a random weight) misses the top-r subspace
        "xs_svd_method": "full",
    }

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        from peft import get_peft_model

        pkg = self.package()
        kw = lora_kwargs(args)
        if kw["lora_alpha"] is None:
            kw.pop("lora_alpha")  # LoraSBConfig's default: alpha = r (s = 1)
        # R = 0: the adapter starts as a no-op; on resume the checkpoint restores R (A and B are
        # rebuilt identically from W0's SVD, or from the seeded generator for 'random')
        return get_peft_model(
            model, pkg.LoraSBConfig(**kw, sb_init=args.xs_init, svd_method=args.xs_svd_method)
        )

    # the same adapter structure as LoRA-SB: the same exporter (plain LoRA + native sub-directory)
    save_final = LoraSB.save_final


METHOD = LoraXS()
