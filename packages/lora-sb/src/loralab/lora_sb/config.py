"""``LoraSBConfig``: a ``peft.LoraConfig`` whose adapters are LoRA-SB (LoRA-XS form, only R trains).

LoRA-SB (Ponkshe et al., 2024, arXiv 2411.19557) adapts a weight as ``W = W0 + s·B·R·A`` with
``B`` (m×r) and ``A`` (r×n) frozen and only the r×r matrix ``R`` trained (the LoRA-XS architecture),
and initialises ``B, R, A`` from the truncated SVD of an approximation of the first full fine-tuning
update (paper Eq. 9: ``ΔW̃ = −lr · sign(Σ g)``, Adam's first step).

The config is a ``LoraConfig`` subclass, so every PEFT entry point accepts it. It carries the marker
field ``lora_sb`` tagged ``is_lora_variant``: PEFT's variant resolution then routes LoRA-SB adapters
to :class:`~loralab.lora_sb.layer.LoraSBVariant`, and a plain PEFT LoRA layer that is asked to host a
LoRA-SB adapter fails loudly instead of silently building a plain LoRA adapter.

Example:
    >>> from loralab.lora_sb import LoraSBConfig
    >>> cfg = LoraSBConfig(r=4, target_modules=["q_proj", "v_proj"])
    >>> cfg.lora_alpha  # defaults to r, i.e. s = 1 as in the reference scripts
    4
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from peft import LoraConfig
from peft.utils import CONFIG_NAME, PeftType

__all__ = ["LORA_SB_PEFT_TYPE", "LoraSBConfig"]

# The "peft_type" LoRA-SB adapters are saved with. It is no PeftType, so bare PEFT refuses the file
# (KeyError: 'LORA_SB' from its type registry) instead of reading it as a LoraConfig and building
# plain LoRA layers that compute B·A without R. LoraSBConfig.from_pretrained reads it.
LORA_SB_PEFT_TYPE = "LORA_SB"
_NOTE_KEY = "loralab_note"
_NOTE = (
    "LoRA-SB adapter (W = W0 + s*B*R*A). Load it with loralab.lora_sb.load_lora_sb_model(base, path); "
    "for plain LoRA tools export it with loralab.lora_sb.save_lora_sb_as_lora(model, dir)."
)

_INCOMPATIBLE_FLAGS = (
    "use_dora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
)


@dataclass
class LoraSBConfig(LoraConfig):
    """Configuration of LoRA-SB adapters (all ``peft.LoraConfig`` fields plus the init settings below).

    ``lora_alpha`` defaults to ``r`` (scaling ``s = 1``, the reference scripts' choice). The init sets
    ``R = Σ/s`` so that ``s·B·R·A`` equals the rank-r truncation of ``ΔW̃`` whatever ``α`` is; ``s``
    then only scales how fast ``R`` moves under the optimizer.
    """

    # None until __post_init__ resolves it to r; PEFT declares the field as a plain int
    lora_alpha: Optional[int] = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Scaling numerator: s = lora_alpha / r (or / sqrt(r) with use_rslora). None means r (s = 1)."
        },
    )
    lora_sb: bool = field(
        default=True,
        metadata={
            "help": "Marker that these adapters are LoRA-SB (always True); PEFT's variant resolution keys on it.",
            "is_lora_variant": True,
        },
    )
    sb_init: Literal["gradient", "random", "weight_svd"] = field(
        default="gradient",
        metadata={
            "help": "How A, B, R are set. 'gradient' (LoRA-SB): from the truncated SVD of the update approximation, "
            "done by initialize_lora_sb_weights / get_lora_sb_model (until then the adapter is a no-op with random "
            "orthonormal A, B and R = 0). 'random': LoRA-XS with random orthonormal A, B and R = 0. 'weight_svd': "
            "LoRA-XS with B = U_r·Σ_r, A = V_rᵀ from the base weight's SVD and R = 0."
        },
    )
    update_approximation: Literal["sign", "gradient"] = field(
        default="sign",
        metadata={
            "help": "First-step update to approximate: 'sign' = -lr·sign(G) (Adam's first step, the paper's choice), "
            "'gradient' = -lr·G (SGD's first step)."
        },
    )
    zero_gradient: Literal["error", "random"] = field(
        default="error",
        metadata={
            "help": "What to do with a target whose update approximation is all zeros (its gradient is exactly zero, "
            "e.g. an unused branch): 'error' raises naming the layer; 'random' falls back to the 'random' LoRA-XS "
            "init for that layer (logged)."
        },
    )
    init_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the local torch.Generator used by the randomized SVD and random inits (the global RNG is never used)."
        },
    )
    svd_method: Literal["auto", "full", "randomized"] = field(
        default="auto",
        metadata={
            "help": "Truncated SVD method (loralab.core.truncated_svd): exact 'full', 'randomized', or 'auto'."
        },
    )
    svd_oversample: int = field(
        default=10,
        metadata={
            "help": "Extra columns of the randomized SVD sketch. Sign matrices have flat spectra; the reference's "
            "q = r sketch lands far from the optimal rank-r truncation, q = r + 10 is optimal to ~5 digits."
        },
    )
    svd_niter: int = field(
        default=10,
        metadata={"help": "Power iterations of the randomized SVD (the reference uses 10)."},
    )

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        super().__post_init__()
        if not self.lora_sb:
            raise ValueError(
                "LoraSBConfig.lora_sb must be True (it marks the adapter type); use peft.LoraConfig for plain LoRA"
            )
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if self.sb_init not in ("gradient", "random", "weight_svd"):
            raise ValueError(
                f"sb_init must be 'gradient', 'random' or 'weight_svd', got {self.sb_init!r}"
            )
        if self.update_approximation not in ("sign", "gradient"):
            raise ValueError(
                f"update_approximation must be 'sign' or 'gradient', got {self.update_approximation!r}"
            )
        if self.zero_gradient not in ("error", "random"):
            raise ValueError(
                f"zero_gradient must be 'error' or 'random', got {self.zero_gradient!r}"
            )
        if self.svd_method not in ("auto", "full", "randomized"):
            raise ValueError(
                f"svd_method must be 'auto', 'full' or 'randomized', got {self.svd_method!r}"
            )
        if self.svd_oversample < 0 or self.svd_niter < 0:
            raise ValueError(
                f"svd_oversample and svd_niter must be >= 0, got {self.svd_oversample} and {self.svd_niter}"
            )
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"LoRA-SB sets A, B and R itself (see sb_init); init_lora_weights must be True or False, got {self.init_lora_weights!r}"
            )
        for flag in _INCOMPATIBLE_FLAGS:
            if getattr(self, flag, None):
                raise ValueError(
                    f"LoRA-SB cannot be combined with {flag}={getattr(self, flag)!r}; unset it"
                )
        if self.lora_bias:
            raise ValueError("LoRA-SB has no adapter bias (only R trains); lora_bias must be False")
        # PEFT's documented route for custom LoRA layer classes (dynamic dispatch); _custom_modules is not a
        # dataclass field, so it is never serialized and is re-created whenever a LoraSBConfig is built.
        from loralab.lora_sb.layer import custom_module_mapping

        self._register_custom_module(custom_module_mapping())

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's ``save_pretrained``, with ``"peft_type": "LORA_SB"`` written to ``adapter_config.json``.

        The live config keeps ``peft_type=LORA`` (PEFT dispatches on it); only the file says
        ``LORA_SB``, so bare PEFT (``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``,
        transformers' ``load_adapter``) raises ``KeyError: 'LORA_SB'`` instead of loading the adapter
        as plain LoRA (``B·A`` without ``R``). A ``loralab_note`` field says how to load or export it.
        """
        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path) as f:
            data = json.load(f)
        data["peft_type"] = LORA_SB_PEFT_TYPE
        data[_NOTE_KEY] = _NOTE
        with open(path, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> LoraSBConfig:
        """Build a ``LoraSBConfig`` from saved fields (PEFT's version would return a plain ``LoraConfig``).

        Reads ``peft_type`` ``"LORA_SB"`` (what :meth:`save_pretrained` writes) and, for adapters saved
        before it did, ``"LORA"`` with ``lora_sb: true``.
        """
        peft_type = kwargs.pop("peft_type", LORA_SB_PEFT_TYPE)
        kwargs.pop(_NOTE_KEY, None)
        if peft_type not in (LORA_SB_PEFT_TYPE, PeftType.LORA) or not kwargs.get("lora_sb", False):
            raise ValueError(
                f"this adapter config is not a LoRA-SB config (peft_type={peft_type!r}, lora_sb="
                f"{kwargs.get('lora_sb')!r}): load it with peft.PeftModel.from_pretrained"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names})
