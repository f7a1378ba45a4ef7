"""``golore-relora``: GoLore's ReLoRA-structure path (the GoLore code's ``--use_peft --golore``).

Every target linear layer becomes ``W − s·A·B`` (``loralab.golore.ReLoRaModel``): one factor is a
fixed orthonormal projector, the other is trained by a plain optimizer (AdamW or momentum SGD), so
that factor holds GaLore's low-rank state. Every ``update_proj_gap`` steps the step collects W's full
gradient, and before the optimizer step ``merge_and_reinit`` folds the adapter into W and draws the
next projector: the SVD of that gradient (GaLore), or a random Stiefel one once
``step / max_steps >= rand_ratio`` (GoLore, arXiv 2410.11289).

The refresh runs in the loop's per-step hooks (:class:`ReLoRaRefresh`); a loop that calls only
``on_step_end`` is refused at the first step rather than training without refreshes. W trains on
refresh steps only, so DDP (which registers its hooks once) cannot average its gradient
(``ddp_wrappable = False``): the loop all-reduces the gradients itself.

QLoRA-style (C4's ``--quantize 4bit|8bit`` / ``--use_double_quant``, the GoLore scripts' flags, read as
``args.quantize`` / ``args.use_double_quant``): ``ReLoRaModel(quantize=...)`` stores every wrapped
``W`` with bitsandbytes (NF4 with blocksize 64 and optional double quantization, or int8 row-wise)
while ``A``/``B``, norms, embeddings and the head stay float; a refresh step collects ``W``'s full
gradient through a float zero matrix and the merge dequantizes ``W``, folds ``−s·A·B`` in and
re-quantizes it. Checkpoints hold the quantized ``W`` (codes and scales) and resume bit for bit.
``final/`` is a plain *float* model: ``W_eff = deq(W) − s·A·B`` (see :meth:`GoLoreReLoRA.save_final`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn
from torch.optim import Optimizer

from loralab.runners.methods.base import (
    Callback,
    FinalDirectory,
    Method,
    MethodError,
    option_flag,
)
from loralab.runners.methods.galore import check_rank

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from loralab.golore import ReLoRaModel

__all__ = ["METHOD", "GoLoreReLoRA", "ReLoRaRefresh"]


class ReLoRaRefresh(Callback):
    """Collect W's gradient on refresh steps and call ``merge_and_reinit`` before their optimizer step.

    ``n_resets`` counts the refreshes so far (a function of the step, so a resumed run agrees).
    """

    def __init__(self, model: nn.Module, update_proj_gap: int, rand_ratio: float, max_steps: int):
        # the model GoLoreReLoRA.wrap returned
        self.model, self.update_proj_gap = cast("ReLoRaModel", model), update_proj_gap
        self.rand_ratio, self.max_steps = rand_ratio, max_steps
        self.n_resets = 0
        self.refreshing = False
        self._begun: int | None = None

    def on_step_begin(self, step: int, model: nn.Module) -> None:
        self._begun = step
        self.n_resets = -(
            -step // self.update_proj_gap
        )  # refresh steps 0, gap, 2·gap, ... before step
        self.refreshing = step % self.update_proj_gap == 0
        if self.refreshing:
            self.model.collect_full_gradients()

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if self.refreshing:
            # GoLore's switch: random projectors once step / total >= rand_ratio
            self.model.merge_and_reinit(optimizer, step / self.max_steps >= self.rand_ratio)
            self.n_resets += 1

    def on_step_end(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if self._begun != step - 1:
            raise RuntimeError(
                "--method golore-relora needs a training loop that calls on_step_begin and "
                "before_optimizer_step on the method's callbacks (runners.loop does); this one "
                "does not, so no projector would ever be refreshed"
            )
        self.refreshing = False


class GoLoreReLoRA(Method):
    name = "golore-relora"
    module = "loralab.golore"
    pip_name = "loralab-golore"
    extra = "golore"
    requires = ("ReLoRaModel",)
    description = "GaLore/GoLore as W - s·A·B with a fixed projector factor, merged every update_proj_gap steps"
    # merge_and_reinit needs whole W, A, B matrices
    sharded_engines: ClassVar[frozenset[str]] = frozenset()
    ddp_wrappable = False  # W trains on refresh steps only: DDP would never average its gradient
    optimizers = ("adamw", "sgd")
    # W trains (merged every gap) and final/ is the merged full model
    has_adapter = False
    # It cannot take a model bitsandbytes quantized while loading (--load_in_4bit/8bit): it wraps
    # nn.Linear layers and folds every merge into W. It quantizes the frozen W of the float model it
    # is given itself (args.quantize: C4's --quantize), and re-quantizes W after every merge.
    quantized_base = False
    quantizes_frozen_weights = True
    defaults: ClassVar[dict[str, Any]] = dict(
        galore_rank=128,
        update_proj_gap=200,
        galore_scale=0.25,
        rand_ratio=0.0,
        target_modules="all-linear",
    )

    def check_model(self, model: nn.Module, args: Any) -> None:
        self.import_package()
        quantize = getattr(args, "quantize", None)
        if quantize is not None:
            if quantize not in ("4bit", "8bit"):
                raise MethodError(f"--quantize must be 4bit or 8bit, got {quantize!r}")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError(
                    f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes "
                    '(or pip install "loralab-golore[quant]")'
                )
        if getattr(args, "use_double_quant", None) and quantize != "4bit":
            raise MethodError(
                f"--use_double_quant quantizes the NF4 block scales: it needs --quantize 4bit, got {quantize!r}"
            )
        # ReLoRaLinear picks the smaller side, as proj_type "std"
        check_rank(
            model,
            args.galore_rank,
            args.target_modules,
            "std",
            flag=option_flag(args, "galore_rank"),
        )

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        pkg = self.package()
        from loralab.core.targets import find_targets

        # the registry's target selection; ReLoRaModel matches substrings, so hand it full names
        names = list(find_targets(model, args.target_modules))
        return pkg.ReLoRaModel(
            model,
            target_modules=names,
            r=args.galore_rank,
            lora_dropout=0.0,
            keep_original_weights=True,
            lora_only=False,
            scale=args.galore_scale,
            quantize=getattr(args, "quantize", None),
            use_double_quant=bool(getattr(args, "use_double_quant", None)),
            seed=args.seed,
        )

    def callbacks(self, model: nn.Module, args: Any) -> list[Callback]:
        return [ReLoRaRefresh(model, args.update_proj_gap, args.rand_ratio, args.max_steps)]

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # the random (GoLore) projectors' generator: an exact resume draws the same next projector
        # model: the ReLoRaModel wrap() returned
        return {"relora_generator": cast("ReLoRaModel", model).generator.get_state()}

    def load_checkpoint_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        cast("ReLoRaModel", model).generator.set_state(state["relora_generator"])

    def save_final(self, model: nn.Module, out: FinalDirectory) -> None:
        """A plain transformers model with ``W_eff = W - s·A·B`` in every adapted layer (what the
        run trained), so ``AutoModelForCausalLM.from_pretrained(directory)`` reproduces it.

        With a quantized ``W`` (``--quantize``) the saved weights are float, in the model's dtype:
        ``W_eff = deq(W) - s·A·B``, with no ``quantization_config``. The reloaded model computes in
        float what the run computed through bitsandbytes' kernels: on the CPU the 4-bit matmul
        dequantizes the same NF4 values (equal up to float rounding), while LLM.int8 also rounds the
        activations to int8 per row, which the float model does not (see the runners' README for the
        measured differences).
        """
        from loralab.golore import ReLoRaLinear

        # model: the ReLoRaModel wrap() returned; its wrapped_model is the transformers model
        inner = cast("PreTrainedModel", cast("ReLoRaModel", model).wrapped_model)
        state: dict[str, torch.Tensor] = {}
        wrapped: list[str] = []
        for name, mod in inner.named_modules():
            if isinstance(mod, ReLoRaLinear):
                wrapped.append(f"{name}.")
                state[f"{name}.weight"] = mod.effective_weight().detach()
                if mod.bias is not None:
                    state[f"{name}.bias"] = mod.bias.detach()
        for name, p in inner.named_parameters():
            # a wrapped layer's own tensors (A, B, a quantized W in base_layer) are in W_eff above
            if not name.startswith(tuple(wrapped)):
                state[name] = p.detach()
        plain = type(inner)(inner.config)
        cast(nn.Module, plain).to(next(inner.parameters()).dtype)  # transformers types .to oddly
        plain.load_state_dict(state, strict=True)
        plain.save_pretrained(out.path, safe_serialization=True)


METHOD = GoLoreReLoRA()
