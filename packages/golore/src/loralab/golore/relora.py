"""The seed project's ReLoRA-style GoLore wrapper: ``ReLoRaModel`` and ``merge_and_reinit``.

GoLore's official code (pkumelon/Golore ``peft_pretraining/GoLore.py``) realises GaLore/GoLore as a
LoRA-like re-parameterisation, so that any stock optimizer (AdamW, momentum SGD) does the subspace
optimization. Each targeted ``nn.Linear`` becomes :class:`ReLoRaLinear`::

    y = W x + b − s · A (B x)        W_eff = W − s·A·B,    A (out, r), B (r, in)

One factor is a fixed orthonormal projector and the other is trained, chosen by shape
(``out >= in``: ``B`` is the right projector and ``A`` trains, else ``A`` is the left projector and
``B`` trains), so ``A`` or ``B`` holds exactly GaLore's low-rank state. Every ``update_proj_gap``
steps the training loop sets ``model._config.forward_type = True``: the forward then collects the
full gradient ``G`` of ``W`` (W is trainable only for that step), and
:meth:`ReLoRaModel.merge_and_reinit` folds the adapter into ``W``, draws the new projector from the
SVD of ``G`` (GaLore) or uniformly from the Stiefel manifold (GoLore, ``rand=True``), carries the
optimizer's first moment of the trained factor into the new basis, zeroes that factor and sets its
gradient to ``−s·G·Bᵀ`` (resp. ``−s·Aᵀ·G``) so that the optimizer step that follows is the step of
that iteration.

Differences from the reference (deliberate): moments are carried for any optimizer whose state uses
``exp_avg`` / ``momentum_buffer`` (the reference only for its own AdamW class and torch's SGD); the
second moment is left as is (the reference's policy; ``second_moment="project"`` carries it as
independent variances); the random projector is an exact Haar sample from a seeded generator;
``W`` is frozen at construction (the reference leaves it trainable until the first reset, so an
optimizer built before it would train it in full); a missing full gradient and ``lora_only`` with
kept weights raise clear errors instead of crashing later.

``quantize="4bit"`` / ``"8bit"`` (the seed's flags, whose code crashes there) store the frozen ``W``
with bitsandbytes (NF4 with optional double quantization, or int8 row-wise) while ``A``/``B`` stay
float (QLoRA-style). On ``forward_type`` steps a zero float matrix is added to ``W`` for that one
forward so that its gradient is the full gradient ``G``; :meth:`ReLoRaLinear.merge_and_reinit`
dequantizes ``W``, folds the adapter in and re-quantizes with the layer's own settings. That zero
matrix is a registered parameter for its step, so a loop that all-reduces the model's gradients
averages ``G`` over processes as it does a float ``W``'s. ``state_dict()`` holds the quantized ``W``
as bitsandbytes writes it (codes and block / row scales under ``<layer>.base_layer.``) and
``load_state_dict`` restores both exactly (:func:`loralab.core.quant.load_quantized_weight_`; torch's
own loading refuses the 4-bit statistics as unexpected keys, and with ``strict=False`` keeps the stale
scales of a re-quantized ``W``), so a checkpoint resumes bit for bit.

Example (the seed README's loop, with the import changed):
    >>> import torch
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.golore import ReLoRaModel
    >>> model = ReLoRaModel(tiny_llama(), r=4, lora_dropout=0, target_modules=["attn", "mlp"], scale=0.25,
    ...                     keep_original_weights=True, lora_only=False, quantize=None, use_double_quant=False)
    >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    >>> for step, batch in enumerate(make_lm_batches(4)):
    ...     reset_relora = step % 2 == 0
    ...     model._config.forward_type = reset_relora
    ...     model(**batch).loss.backward()
    ...     if reset_relora:
    ...         model.merge_and_reinit(optimizer, step / 4 >= 0.5)
    ...     optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import bitsandbytes as bnb
    from transformers import PreTrainedModel

from loralab.core.linalg import stiefel_sample, truncated_svd
from loralab.core.targets import TargetNotFoundError, find_targets, replace_module
from loralab.golore.projector import Side, reproject_second_moment

__all__ = ["ReLoRaCallback", "ReLoRaConfig", "ReLoRaLinear", "ReLoRaModel", "merge_and_reinit"]

logger = logging.getLogger(__name__)

FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")
QUANTIZE = (None, "4bit", "8bit")


@dataclass
class ReLoRaConfig:
    """Settings of :class:`ReLoRaModel` (the reference's fields, same names)."""

    r: int = field(metadata={"help": "projector rank (clipped per layer to min(in, out))"})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "dropout on the input of the low-rank path"}
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["attn", "attention", "mlp"],
        metadata={"help": "substrings of the qualified names of the nn.Linear layers to wrap"},
    )
    keep_original_weights: bool = field(
        default=True, metadata={"help": "start W from the model's weights (else zeros)"}
    )
    lora_only: bool = field(
        default=False,
        metadata={"help": "drop W and train only the low-rank path (plain LoRA-like; no merging)"},
    )
    scale: float = field(default=1.0, metadata={"help": "s in W_eff = W − s·A·B (GaLore's scale)"})
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "store the frozen W quantized with bitsandbytes: '4bit' (NF4, blocksize 64) or '8bit' "
            "(int8 row-wise, LLM.int8 without outliers); None keeps W in float"
        },
    )
    use_double_quant: bool = field(
        default=False,
        metadata={
            "help": "QLoRA double quantization of the NF4 block scales (quantize='4bit' only)"
        },
    )
    forward_type: bool = field(
        default=False,
        metadata={
            "help": "True: collect the full gradient of W this step (y = W_eff x with W trainable)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random (GoLore) projectors"})

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(
                f"r must be a positive int (for r == 0 use the original model), got {self.r!r}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_only and self.keep_original_weights:
            raise ValueError(
                "lora_only=True drops W, so keep_original_weights must be False (the reference asserts the same)"
            )
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if not isinstance(self.use_double_quant, bool):
            raise ValueError(f"use_double_quant must be a bool, got {self.use_double_quant!r}")
        if self.use_double_quant and self.quantize != "4bit":
            raise ValueError(
                "use_double_quant=True quantizes the NF4 block scales, so it needs quantize='4bit', "
                f"got quantize={self.quantize!r}"
            )
        if self.quantize is not None and self.lora_only:
            raise ValueError(
                f"quantize={self.quantize!r} quantizes W, but lora_only=True has no W; use one or the other"
            )


class ReLoRaLinear(nn.Module):
    """``y = W x + b − s·A(B(dropout(x)))`` with one factor a fixed projector (see module docstring)."""

    _grad_probe: nn.Parameter | None  # registered in __init__ (a parameter only while it exists)

    def __init__(self, base: nn.Linear, r: int, config: ReLoRaConfig) -> None:
        super().__init__()
        out_f, in_f = base.out_features, base.in_features
        self.in_features, self.out_features = in_f, out_f
        self.r = min(r, in_f, out_f)
        self.relora_config = config
        self.scale = config.scale
        self.lora_only = config.lora_only
        self.lora_dropout = nn.Dropout(p=config.lora_dropout)
        w = base.weight
        if config.lora_only:
            self.weight = None
            self.bias = None
        else:
            data = w.detach().clone() if config.keep_original_weights else torch.zeros_like(w)
            # frozen until a forward with forward_type=True (the reference leaves it trainable)
            self.weight = nn.Parameter(data, requires_grad=False)
            if base.bias is not None:
                b = (
                    base.bias.detach().clone()
                    if config.keep_original_weights
                    else torch.zeros_like(base.bias)
                )
                self.bias = nn.Parameter(b, requires_grad=base.bias.requires_grad)
            else:
                self.bias = None
        # proj_type True: B (r, in) is the right projector and A trains; False: A (out, r) projects.
        self.proj_type = out_f >= in_f
        self.lora_B = nn.Linear(in_f, self.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_A = nn.Linear(self.r, out_f, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_B.requires_grad_(not self.proj_type)
        self.lora_A.requires_grad_(self.proj_type)
        self.base_layer: nn.Module | None = None
        # the zero float matrix added to a quantized W on forward_type steps (see _forward_quantized);
        # a registered parameter while it exists, so code that reduces the model's gradients (a
        # multi-process loop's all-reduce) averages W's full gradient as it does a float W's
        self.register_parameter("_grad_probe", None)
        if config.quantize is not None:
            self.quantize_(config.quantize, config.use_double_quant)

    @property
    def quantized(self) -> bool:
        """Whether the frozen W is stored quantized (in ``base_layer``, a bitsandbytes layer)."""
        return self.base_layer is not None

    @torch.no_grad()
    def quantize_(self, quantize: str, use_double_quant: bool = False) -> None:
        """Move the float W into a bitsandbytes layer: ``"4bit"`` NF4 (blocksize 64, double quantization
        of the block scales if ``use_double_quant``, compute dtype = W's dtype) or ``"8bit"`` int8 row-wise.

        The LoRA-style factors stay float; the bias stays a float parameter next to the quantized layer.
        """
        import bitsandbytes as bnb

        if self.weight is None:
            raise ValueError("quantize_: lora_only=True has no W to quantize")
        if quantize not in ("4bit", "8bit"):
            raise ValueError(f"quantize must be '4bit' or '8bit', got {quantize!r}")
        if use_double_quant and quantize != "4bit":
            raise ValueError(
                f"use_double_quant=True needs quantize='4bit', got quantize={quantize!r}"
            )
        w = self.weight.detach()
        layer: bnb.nn.Linear4bit | bnb.nn.Linear8bitLt
        if quantize == "4bit":
            layer = bnb.nn.Linear4bit(
                self.in_features, self.out_features, bias=False, compute_dtype=w.dtype,
                compress_statistics=use_double_quant, quant_type="nf4", device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Params4bit(
                w.to("cpu").clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                compress_statistics=use_double_quant, module=layer,
            )  # fmt: skip
        else:
            layer = bnb.nn.Linear8bitLt(
                self.in_features, self.out_features, bias=False, has_fp16_weights=False,
                device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Int8Params(
                w.to("cpu", torch.float16).clone(), requires_grad=False, has_fp16_weights=False
            )
        # bitsandbytes repacks a 4-bit weight for its CPU kernel at a no-grad eval-mode forward on CPUs
        # with AVX512-BF16 (an evaluation during training), a layout backward and the merge's
        # re-quantization are not checked on: keep the standard layout (as the runners' QLoRA models)
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
        self.base_layer = layer.to(w.device)  # bitsandbytes quantizes on the move to the device
        self.weight = None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Every merge re-quantizes W, so its block / row scales differ from those of the model a
        # checkpoint is loaded into; torch's load_state_dict refuses a 4-bit layer's statistics as
        # unexpected keys (and with strict=False copies the codes but keeps the stale scales).
        # Rebuild W from the saved codes and statistics, then let torch copy the codes (and int8's
        # SCB, which bitsandbytes loads itself).
        base = f"{prefix}base_layer."
        if self.quantized and f"{base}weight" in state_dict:
            from loralab.core.quant import load_quantized_weight_

            entries = {k[len(base) :]: v for k, v in state_dict.items() if k.startswith(base)}
            load_quantized_weight_(self._quantized_layer(), entries)
            for k in [k for k in state_dict if k.startswith(f"{base}weight.")]:
                del state_dict[k]  # 4-bit statistics, restored above
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def trained_factor(self) -> Tensor:
        """The factor the optimizer trains (``A`` for a right projector, ``B`` for a left one)."""
        return self.lora_A.weight if self.proj_type else self.lora_B.weight

    @property
    def projector(self) -> Tensor:
        """The fixed orthonormal factor (``B`` (r, in) for a right projector, ``A`` (out, r) for a left one)."""
        return self.lora_B.weight if self.proj_type else self.lora_A.weight

    def effective_weight(self) -> Tensor:
        """``W − s·A·B`` (out, in)."""
        delta = self.lora_A.weight @ self.lora_B.weight
        if self.quantized:
            return self._dequantized().to(delta.dtype) - self.scale * delta
        if self.weight is None:
            return -self.scale * delta
        return self.weight - self.scale * delta

    def _quantized_layer(self) -> nn.Module:
        # the quantized paths run only when self.quantized, i.e. base_layer is set
        return cast(nn.Module, self.base_layer)

    def _dequantized(self) -> Tensor:
        from loralab.core.quant import dequantize_weight

        return dequantize_weight(self._quantized_layer(), dtype=self.lora_A.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.quantized:
            return self._forward_quantized(x)
        if (
            self.relora_config.forward_type
            and self.weight is not None
            and not self.weight.requires_grad
        ):
            # collect the full gradient of W this step; the trained factor sits out (its gradient
            # is derived from W's in merge_and_reinit)
            self.weight.requires_grad_(True)
            self.trained_factor.requires_grad_(False)
        low = self.lora_A(self.lora_B(self.lora_dropout(x))) * self.scale
        if self.lora_only:
            # the reference's lora_only path returns +s·A·B·x (no W at all)
            return low
        return F.linear(x, cast(Tensor, self.weight), self.bias) - low  # W exists unless lora_only

    def _forward_quantized(self, x: Tensor) -> Tensor:
        y = self._quantized_layer()(x).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        if self.relora_config.forward_type and self._grad_probe is None:
            # A quantized W has no gradient: add a zero float matrix to W for this step, whose
            # gradient is the full gradient G of W (the float path makes W itself trainable instead).
            self._grad_probe = nn.Parameter(
                torch.zeros(
                    self.out_features,
                    self.in_features,
                    device=x.device,
                    dtype=self.lora_A.weight.dtype,
                )
            )
            self.trained_factor.requires_grad_(False)
        if self._grad_probe is not None:
            y = y + F.linear(x, self._grad_probe.to(x.dtype))
        return y - self.lora_A(self.lora_B(self.lora_dropout(x))) * self.scale

    def _new_projector(self, grad: Tensor, rand: bool, generator: torch.Generator) -> Tensor:
        out_f, in_f = grad.shape
        if rand:
            if self.proj_type:
                return stiefel_sample(in_f, self.r, generator=generator, dtype=torch.float64).T
            return stiefel_sample(out_f, self.r, generator=generator, dtype=torch.float64)
        U, _, Vh = truncated_svd(grad, self.r, method="full")
        return Vh if self.proj_type else U

    @torch.no_grad()
    def merge_and_reinit(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        rand: bool = False,
        *,
        generator: torch.Generator | None = None,
        second_moment: str = "keep",
    ) -> None:
        """Fold ``−s·A·B`` into ``W``, draw a new projector from ``W``'s gradient (or at random),
        carry the optimizer's moments of the trained factor into it, and set that factor's gradient.
        """
        if self.lora_only:
            logger.warning("merge_and_reinit skipped: lora_only=True has no W to merge into")
            return
        holder = self._grad_probe if self.quantized else self.weight
        if holder is None or holder.grad is None:
            raise RuntimeError(
                "merge_and_reinit needs the full gradient of W: set model._config.forward_type = True before the "
                "forward/backward of this step (the seed loop sets it on the steps where reset_relora is True)"
            )
        if second_moment not in ("keep", "project"):
            raise ValueError(f"second_moment must be 'keep' or 'project', got {second_moment!r}")
        wg = holder.grad.detach().clone()
        if not torch.isfinite(wg).all():
            raise FloatingPointError(
                f"merge_and_reinit: the gradient of W ({tuple(wg.shape)}) has NaN/Inf values"
            )
        if self.quantized:
            from loralab.core.quant import requantize_weight_

            self._grad_probe = None
            # W ← W_eff, re-quantized with the layer's own settings (NF4/int8, blocksize, double
            # quantization, quantization dtype); the compute dtype of the layer is untouched
            merged = self._dequantized() - self.scale * (self.lora_A.weight @ self.lora_B.weight)
            requantize_weight_(self._quantized_layer(), merged)
        else:
            # holder is the float W here (checked above to have a gradient)
            holder.grad = None
            holder.requires_grad_(False)
            holder.add_(self.lora_A.weight @ self.lora_B.weight, alpha=-self.scale)  # W ← W_eff
        old = self.projector.detach().clone()
        new = self._new_projector(wg, rand, generator or torch.Generator().manual_seed(0)).to(
            old.dtype
        )
        self.projector.copy_(new)
        factor = self.trained_factor
        # change of basis of the trained factor's coordinates: right: M ← M·B₀·B_newᵀ; left: M ← A_newᵀ·A₀·M
        trans = old @ new.T if self.proj_type else new.T @ old
        state = optimizer.state.get(factor, {}) if optimizer is not None else {}
        for key in FIRST_MOMENT_KEYS:
            if key in state and isinstance(state[key], Tensor) and state[key].shape == factor.shape:
                t = trans.to(state[key].dtype)
                state[key].copy_(state[key] @ t if self.proj_type else t @ state[key])
        if second_moment == "project" and isinstance(state.get("exp_avg_sq"), Tensor):
            v = state["exp_avg_sq"]
            side: Side = "right" if self.proj_type else "left"
            v.copy_(reproject_second_moment(v, (trans.to(v.dtype),), side))
        factor.zero_()
        factor.requires_grad_(True)
        # dL/dA = −s·G·Bᵀ (right) and dL/dB = −s·Aᵀ·G (left), since W_eff = W − s·A·B
        g = -self.scale * (wg @ new.T.to(wg.dtype) if self.proj_type else new.T.to(wg.dtype) @ wg)
        factor.grad = g.to(factor.dtype)


def merge_and_reinit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rand: bool = False,
    **kwargs: Any,
) -> int:
    """Call :meth:`ReLoRaLinear.merge_and_reinit` on every wrapped layer of ``model``; returns how many.

    ``optimizer`` may be an accelerate/DeepSpeed wrapper exposing ``.optimizer``.
    """
    opt = _unwrap_optimizer(optimizer)
    layers = [m for m in model.modules() if isinstance(m, ReLoRaLinear)]
    gen = kwargs.pop("generator", None)
    for layer in layers:
        layer.merge_and_reinit(opt, rand, generator=gen, **kwargs)
    return len(layers)


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    seen = 0
    while (
        optimizer is not None
        and not isinstance(optimizer, torch.optim.Optimizer)
        and hasattr(optimizer, "optimizer")
        and seen < 5
    ):
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


class ReLoRaModel(nn.Module):
    """Wrap every ``nn.Linear`` whose name contains one of ``target_modules`` in :class:`ReLoRaLinear`.

    Same constructor as the reference (keyword arguments) plus ``seed``; ``model._config`` is a
    :class:`ReLoRaConfig` whose ``forward_type`` the training loop toggles. Attributes the wrapper does
    not have (``config``, ``generate``, ...) are looked up on the wrapped model.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> model = ReLoRaModel(tiny_llama(), r=4, target_modules=["attn", "mlp"], lora_dropout=0.0)
        >>> sum(isinstance(m, ReLoRaLinear) for m in model.modules())
        14
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target_modules: Sequence[str] | str = ("attn", "attention", "mlp"),
        r: int = 128,
        lora_dropout: float = 0.1,
        keep_original_weights: bool = True,
        lora_only: bool = False,
        scale: float = 1.0,
        quantize: str | None = None,
        use_double_quant: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        keys = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        self._config = ReLoRaConfig(
            r=r,
            lora_dropout=lora_dropout,
            target_modules=keys,
            keep_original_weights=keep_original_weights,
            lora_only=lora_only,
            scale=scale,
            quantize=quantize,
            use_double_quant=use_double_quant,
            forward_type=False,
            seed=seed,
        )
        self.wrapped_model = model
        self.r, self.scale = r, scale
        self._generator = torch.Generator().manual_seed(seed)
        # the reference's substring match on qualified names, among the adaptable layers (heads excluded)
        found = {
            n: t for n, t in find_targets(model, "all-linear").items() if any(k in n for k in keys)
        }
        if not found:
            names = sorted({n.rsplit(".", 1)[-1] for n in find_targets(model, "all-linear")})
            raise TargetNotFoundError(
                f"ReLoRaModel: target_modules={keys} matched no linear layer (substring match on qualified names); layer names: {', '.join(names)}"
            )
        others = [f"{n} ({t.kind})" for n, t in found.items() if t.kind != "linear"]
        if others:
            raise TypeError(
                f"ReLoRaModel wraps nn.Linear layers only (as the reference); these matched layers are not: {', '.join(others[:5])}"
            )
        for name, t in found.items():
            # only kind "linear" is left: nn.Linear
            replace_module(model, name, ReLoRaLinear(cast(nn.Linear, t.module), r, self._config))
        # expose the wrapped forward's signature (HF Trainer keeps dataset columns by it)
        self.forward = model.forward  # type: ignore[method-assign]  # an instance attribute on purpose
        logger.info("ReLoRaModel: wrapped %d linear layers", len(found))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = super().__getattr__("wrapped_model")
            return getattr(wrapped, name)

    def merge_and_reinit(
        self,
        optimizer: Any = None,
        rand: bool = False,
        *,
        use_rand: bool | None = None,
        second_moment: str = "keep",
    ) -> None:
        """Merge every adapter into W and draw new projectors (SVD of W's gradient, or random if ``rand``).

        Call it after the backward of a step run with ``_config.forward_type = True`` and before
        ``optimizer.step()``. ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer``):
        ``.optimizer`` is followed. ``use_rand`` is an alias of ``rand``.
        """
        rand = rand if use_rand is None else use_rand
        merge_and_reinit(
            self, optimizer, bool(rand), generator=self._generator, second_moment=second_moment
        )
        self._config.forward_type = False

    def collect_full_gradients(self) -> None:
        """Make the next forward/backward collect the full gradient of every wrapped ``W``.

        Call it before the first forward of a step that ends with :meth:`merge_and_reinit` (the seed
        loop's ``model._config.forward_type = True``); :meth:`merge_and_reinit` switches it off.
        """
        self._config.forward_type = True

    @property
    def generator(self) -> torch.Generator:
        """The generator of the random (GoLore) projectors; checkpoint its state for an exact resume."""
        return self._generator

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        """The wrapped model's ``save_pretrained`` plus ``relora_config.json`` (as the reference).

        A quantized W is saved as its dequantized float values under the float layout's key
        (``<layer>.weight``), so the checkpoint has one layout; :meth:`from_pretrained` quantizes it
        again with the saved ``quantize`` / ``use_double_quant``.
        """
        layers = {
            n: m for n, m in self.wrapped_model.named_modules() if isinstance(m, ReLoRaLinear)
        }
        if any(m.quantized for m in layers.values()) and "state_dict" not in kwargs:
            sd = self.wrapped_model.state_dict()
            for name, m in layers.items():
                if m.quantized:
                    for k in [k for k in sd if k.startswith(f"{name}.base_layer.")]:
                        del sd[k]
                    sd[f"{name}.weight"] = m._dequantized().detach().clone()
            kwargs["state_dict"] = sd
        # save_pretrained needs a transformers model as the wrapped one (as the reference)
        cast("PreTrainedModel", self.wrapped_model).save_pretrained(path, **kwargs)
        with open(os.path.join(path, "relora_config.json"), "w") as fh:
            json.dump(asdict(self._config), fh, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ReLoRaModel:
        """Rebuild a model saved by :meth:`save_pretrained` (causal-LM architectures)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        with open(os.path.join(path, "relora_config.json")) as fh:
            cfg = json.load(fh)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        model = cls(
            base,
            target_modules=cfg["target_modules"],
            r=cfg["r"],
            lora_dropout=cfg["lora_dropout"],
            keep_original_weights=cfg["keep_original_weights"],
            lora_only=cfg["lora_only"],
            scale=cfg["scale"],
            seed=cfg.get("seed", 0),
        )
        from safetensors.torch import load_file

        state = load_file(os.path.join(path, "model.safetensors"))
        missing, unexpected = model.wrapped_model.load_state_dict(state, strict=False)
        missing = [
            k for k in missing if not k.endswith("lm_head.weight") or "lm_head.weight" in state
        ]
        if missing or unexpected:
            raise RuntimeError(
                f"ReLoRaModel.from_pretrained: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        if cfg.get("quantize") is not None:
            ReLoRaConfig(**{**cfg, "forward_type": False})  # validates the saved settings by name
            model._config.quantize = cfg["quantize"]
            model._config.use_double_quant = cfg.get("use_double_quant", False)
            for m in model.modules():
                if isinstance(m, ReLoRaLinear):
                    m.quantize_(cfg["quantize"], model._config.use_double_quant)
        return model


try:  # the HF Trainer face; transformers is a dependency, but keep the import local to this class
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    # never taken (transformers is a dependency); the checker sees the real class
    TrainerCallback = object  # type: ignore[misc,assignment]


class ReLoRaCallback(TrainerCallback):
    """Drive :class:`ReLoRaModel` from ``transformers.Trainer``: the seed loop as a callback.

    Sets ``forward_type`` at the start of every ``update_proj_gap``-th optimizer step (before its first
    micro-batch, so gradient accumulation collects W's full gradient over the whole step) and calls
    ``merge_and_reinit`` right before that step's ``optimizer.step()``. ``rand_ratio`` as GoLore
    (fraction of ``max_steps`` that uses SVD projectors; 1.0 = GaLore).

    Example:
        >>> cb = ReLoRaCallback(update_proj_gap=200, rand_ratio=0.8)
    """

    def __init__(
        self,
        update_proj_gap: int = 200,
        rand_ratio: float = 1.0,
        *,
        max_steps: int | None = None,
        second_moment: str = "keep",
    ) -> None:
        if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
        if not 0.0 <= rand_ratio <= 1.0:
            raise ValueError(f"rand_ratio must be in [0, 1], got {rand_ratio}")
        self.update_proj_gap, self.rand_ratio, self.max_steps, self.second_moment = (
            update_proj_gap,
            rand_ratio,
            max_steps,
            second_moment,
        )
        self._reset = False
        self.n_resets = 0

    @staticmethod
    def _relora(model: Any) -> ReLoRaModel:
        m = model
        for _ in range(4):
            if isinstance(m, ReLoRaModel):
                return m
            m = getattr(m, "module", None)
        raise TypeError(
            f"ReLoRaCallback needs the Trainer's model to be a ReLoRaModel, got {type(model).__name__}"
        )

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self._reset = state.global_step % self.update_proj_gap == 0
        self._relora(model)._config.forward_type = self._reset

    def on_pre_optimizer_step(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self._reset:
            return
        total = self.max_steps or state.max_steps
        use_rand = total > 0 and state.global_step / total >= self.rand_ratio
        self._relora(model).merge_and_reinit(optimizer, use_rand, second_moment=self.second_moment)
        self.n_resets += 1
        self._reset = False
