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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn
from torch.optim import Optimizer

from loralab.runners.methods.base import Callback, FinalDirectory, Method, option_flag
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
    # W trains (merged every gap) and final/ is the merged full model; ReLoRaModel(quantize=...) is
    # the package API for a quantized frozen W, not wired to the C4 command line
    has_adapter = False
    quantized_base = False
    defaults: ClassVar[dict[str, Any]] = dict(
        galore_rank=128,
        update_proj_gap=200,
        galore_scale=0.25,
        rand_ratio=0.0,
        target_modules="all-linear",
    )

    def check_model(self, model: nn.Module, args: Any) -> None:
        self.import_package()
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
        run trained), so ``AutoModelForCausalLM.from_pretrained(directory)`` reproduces it."""
        from loralab.golore import ReLoRaLinear

        # model: the ReLoRaModel wrap() returned; its wrapped_model is the transformers model
        inner = cast("PreTrainedModel", cast("ReLoRaModel", model).wrapped_model)
        state: dict[str, torch.Tensor] = {}
        for name, mod in inner.named_modules():
            if isinstance(mod, ReLoRaLinear):
                state[f"{name}.weight"] = mod.effective_weight().detach()
                if mod.bias is not None:
                    state[f"{name}.bias"] = mod.bias.detach()
        for name, p in inner.named_parameters():
            if ".lora_" not in name and name not in state:
                state[name] = p.detach()
        plain = type(inner)(inner.config)
        cast(nn.Module, plain).to(next(inner.parameters()).dtype)  # transformers types .to oddly
        plain.load_state_dict(state, strict=True)
        plain.save_pretrained(out.path, safe_serialization=True)


METHOD = GoLoreReLoRA()
