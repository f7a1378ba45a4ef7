"""``LoraGAConfig``: a ``peft.LoraConfig`` carrying the LoRA-GA initialisation settings.

LoRA-GA (Wang, Yu & Li, 2024, arXiv 2407.05000) initialises LoRA's ``A`` and ``B`` from the SVD of
the full-weight gradient averaged over ``bsz × iters`` samples, so that the first low-rank step
approximates the first full fine-tuning step (paper §3.2), and offsets ``W0`` so the model's output
is unchanged at step 0 (paper §3.3). The field names and defaults are the reference's
(Outsider565/LoRA-GA): ``bsz=2, iters=64, max_length=1024, direction="ArB2r", scale="stable",
stable_gamma=16, dtype="fp32"``.

The paper's runs used rank-stabilised LoRA (``s = α/√r``): pass ``use_rslora=True``.

Example:
    >>> from loralab.lora_ga import LoraGAConfig
    >>> cfg = LoraGAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    >>> cfg.init_lora_weights, cfg.direction, cfg.scale, cfg.stable_gamma
    ('lora_ga', 'ArB2r', 'stable', 16)
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from peft import LoraConfig

from loralab.lora_ga.layer import LoraGASettings, custom_module_mapping

__all__ = ["DIRECTIONS", "DTYPES", "SCALES", "LoraGAConfig", "LoraGASettings"]

logger = logging.getLogger(__name__)

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
SCALES = ("stable", "gd", "unit", "weight_svd")
# names the reference fork ("weightS") and PEFT ("gd_scale") use for the same scales
_SCALE_ALIASES: dict[str, Literal["weight_svd", "gd"]] = {"weightS": "weight_svd", "gd_scale": "gd"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SETTINGS_FIELDS = ("direction", "scale", "stable_gamma", "dtype")
"""The fields LoRA-GA's init reads, mirrored in the ``lora_ga_config`` sub-config."""
_DTYPE_ALIASES: dict[str, Literal["fp32", "bf16", "fp16"]] = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
}


@dataclass
class LoraGAConfig(LoraConfig):
    """Configuration of a LoRA-GA model: every ``peft.LoraConfig`` field plus the fields below.

    ``init_lora_weights`` defaults to ``"lora_ga"``. Use it with :func:`get_lora_ga_model` (one call:
    estimate, decompose, initialise) or, as in the reference, with :func:`estimate_gradient` and
    ``with LoraGAContext(model, named_grad): model = peft.get_peft_model(model, config)``.
    """

    bsz: int = field(
        default=2,
        metadata={"help": "Batch size of the gradient-estimation batches (reference default 2)."},
    )
    iters: int = field(
        default=64,
        metadata={"help": "Number of batches averaged into the gradient (reference default 64)."},
    )
    max_length: int = field(
        default=1024, metadata={"help": "Maximum sequence length of the estimation samples."}
    )
    direction: Literal["ArB2r", "ArBr", "A2rBr", "random"] = field(
        default="ArB2r",
        metadata={
            "help": "Which singular vectors of G = U S Vh go where. ArB2r (paper): A = Vh[:r], B = U[:, r:2r]; "
            "A2rBr: A = Vh[r:2r], B = U[:, :r]; ArBr: A = odd rows of Vh[:2r], B = even columns of U[:, :2r]; "
            "random: a random split of the top 2r indices."
        },
    )
    scale: Literal["stable", "gd", "unit", "weight_svd"] = field(
        default="stable",
        metadata={
            "help": "Scaling of A and B. stable (paper Eq. 12): both times m^(1/4)/sqrt(stable_gamma); gd: both divided by "
            "the LoRA scaling s; unit: orthonormal as they come; weight_svd: both times the mean sqrt of the "
            "weight's top-r singular values divided by s (the reference's 'weightS')."
        },
    )
    stable_gamma: float = field(
        default=16, metadata={"help": "gamma of the stable scale (reference default 16)."}
    )
    dtype: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata={
            "help": "dtype of the A and B adapter weights (the offset W0 keeps the base weight's dtype)."
        },
    )

    def __post_init__(self) -> None:
        if (
            self.init_lora_weights is True
        ):  # LoraConfig's default: LoRA-GA is the point of this class
            # PEFT accepts "lora_ga" but its Literal annotation does not list it
            self.init_lora_weights = "lora_ga"  # type: ignore[assignment]
        self._check_fields()
        if self.init_lora_weights == "lora_ga":
            if self.use_dora:
                raise ValueError(
                    "LoraGAConfig: use_dora=True is not supported with LoRA-GA initialisation"
                )
            self.lora_ga_config = self._new_settings()
        super().__post_init__()
        if self.init_lora_weights == "lora_ga" and not isinstance(
            self.lora_ga_config, LoraGASettings
        ):
            # LoraConfig.__post_init__ rebuilds dict sub-configs with PEFT's class: keep our tag
            self.lora_ga_config = self._new_settings()
        # what the sub-config held when built: lora_ga_settings() tells which side a user edited later
        self.__dict__["_lora_ga_built"] = self._settings_tuple()
        # PEFT's route for custom LoRA layer classes (dynamic dispatch): PEFT builds loralab's LoRA-GA
        # layers for this config and keeps its own classes, unchanged, for every other config.
        # _custom_modules is not a dataclass field: never serialized, re-created with every config.
        self._register_custom_module(custom_module_mapping())

    def _check_fields(self) -> None:
        """Normalise the aliases and validate the LoRA-GA fields (at construction and at every use)."""
        self.scale = _SCALE_ALIASES.get(self.scale, self.scale)
        self.dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        for name in ("bsz", "iters", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LoraGAConfig.{name} must be a positive int, got {v!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"LoraGAConfig.direction must be one of {DIRECTIONS}, got {self.direction!r}"
            )
        if self.scale not in SCALES:
            raise ValueError(
                f"LoraGAConfig.scale must be one of {SCALES} (or 'weightS', 'gd_scale'), got {self.scale!r}"
            )
        if (
            isinstance(self.stable_gamma, bool)
            or not isinstance(self.stable_gamma, (int, float))
            or not self.stable_gamma > 0
        ):
            raise ValueError(
                f"LoraGAConfig.stable_gamma must be a positive number, got {self.stable_gamma!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"LoraGAConfig.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}"
            )

    def _new_settings(self) -> LoraGASettings:
        # PEFT's sub-config annotates scale with its own names and stable_gamma as int; loralab's layers
        # read these values (its scale names, a float gamma), PEFT's never do
        return LoraGASettings(
            direction=self.direction,
            scale=self.scale,  # type: ignore[arg-type]
            stable_gamma=self.stable_gamma,  # type: ignore[arg-type]
            dtype=self.dtype,
        )

    def _settings_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in _SETTINGS_FIELDS)

    def lora_ga_settings(self) -> LoraGASettings:
        """The LoRA-GA settings as they are now, validated; the sub-config is brought up to date.

        The fields can be changed after construction either on this config (``cfg.dtype = "bf16"``)
        or, PEFT's way, on its sub-config (``cfg.lora_ga_config.direction = "ArBr"``): both count.
        Changing the same setting to different values on both sides is refused, naming it.

        Example:
            >>> from loralab.lora_ga import LoraGAConfig
            >>> cfg = LoraGAConfig(r=4, target_modules=["q_proj"])
            >>> cfg.dtype = "bf16"
            >>> cfg.lora_ga_settings().dtype
            'bf16'
        """
        if self.use_dora:
            raise ValueError(
                "LoraGAConfig: use_dora=True is not supported with LoRA-GA initialisation"
            )
        built = self.__dict__.get("_lora_ga_built")
        sub = self.lora_ga_config
        if isinstance(sub, LoraGASettings) and built is not None:
            for i, name in enumerate(_SETTINGS_FIELDS):
                mine, theirs = getattr(self, name), getattr(sub, name)
                if theirs != built[i] and mine == built[i]:
                    setattr(self, name, theirs)  # edited on the sub-config only: that edit counts
                elif theirs != built[i] and mine != theirs:
                    raise ValueError(
                        f"LoraGAConfig.{name} = {mine!r} but LoraGAConfig.lora_ga_config.{name} = {theirs!r}: both "
                        "were changed after construction; set one of them"
                    )
        self._check_fields()
        settings = self._new_settings()
        self.lora_ga_config = settings
        self.__dict__["_lora_ga_built"] = self._settings_tuple()
        return settings

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's ``save_pretrained`` (the file is unchanged), warning that a raw LoRA-GA checkpoint
        (``model.save_pretrained``) fits only the offset base weights.

        Bare PEFT loads such a checkpoint on the original model with its own ``lora_ga`` init, which
        silently skips the init when no gradient is attached: right on the offset model (resuming),
        wrong on the original one. The warning is raised here, when the checkpoint is written, since
        loralab changes nothing in PEFT's loading.
        """
        if self.init_lora_weights == "lora_ga":
            self.lora_ga_settings()  # the file holds the settings as they are now
            warnings.warn(
                "saving a raw LoRA-GA checkpoint: its A and B only fit the offset base weights W0 - s*B0*A0 (fine to "
                "resume training on the same offset model). For the original base model export with "
                "loralab.lora_ga.save_lora_ga_adapter (or save_loraga_model_final), or save the offset model with "
                "save_lora_ga_model.",
                UserWarning,
                stacklevel=3,
            )
        super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> LoraGAConfig:
        """``LoraGAConfig.from_pretrained(path)`` gives a ``LoraGAConfig`` back (PEFT would build the class
        registered for ``peft_type``, a plain ``LoraConfig``, and drop the LoRA-GA fields)."""
        known = {f.name for f in fields(cls) if f.init}
        dropped = sorted(set(kwargs) - known)
        if dropped:
            logger.warning("LoraGAConfig: ignoring unknown config keys %s", dropped)
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of ``dtype``."""
        return DTYPES[self.dtype]
